//! A private Tansu broker (a Kafka-protocol broker with SQLite storage, see
//! `.ci/install-tansu`) per test: its own port and its own database file in a
//! temporary directory, killed when dropped. Tests never use a shared broker.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long the broker may take to answer its first request.
const READY: Duration = Duration::from_secs(60);
/// The longest one readiness probe (`tansu topic list`) may take.
const PROBE: Duration = Duration::from_secs(10);

/// A running broker on `127.0.0.1:port`.
pub struct Tansu {
    child: Child,
    /// `127.0.0.1:port`, for `CAEP_HUB_KAFKA_BROKERS`.
    pub brokers: String,
    /// The broker's stdout and stderr.
    pub log: PathBuf,
    binary: PathBuf,
    _dir: TempDir,
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tansu binary: `$CAEP_TANSU`, then `tansu` on `PATH`, then the cache
/// `.ci/install-tansu` installs into. Panics, saying how to install it, when
/// there is none: a missing broker fails the test, it never skips it.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CAEP_TANSU").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(is_executable(&path), "CAEP_TANSU={} is not an executable file; run .ci/install-tansu", path.display());
        return path;
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("tansu"))
        .find(|candidate| is_executable(candidate));
    if let Some(path) = on_path {
        return path;
    }
    let cached = std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache/caep-hub/tansu/bin/tansu"));
    match cached {
        Some(path) if is_executable(&path) => path,
        _ => panic!(
            "the Tansu broker is not installed (looked at $CAEP_TANSU, PATH and ~/.cache/caep-hub/tansu/bin/tansu): \
             run .ci/install-tansu (about 10 minutes, once), or run the tests with .ci/test"
        ),
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

impl Tansu {
    /// Starts a broker on a free loopback port and waits until it answers a
    /// metadata request. Blocking (it runs before the test's servers).
    pub fn start() -> Tansu {
        let binary = binary();
        let dir = tempfile::Builder::new().prefix("tansu-").tempdir().expect("temp dir");
        let log = dir.path().join("tansu.log");
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let out = File::create(&log).expect("tansu log");
        let child = Command::new(&binary)
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            // Tansu 0.6 resolves the SQLite path against its working directory
            // (an absolute `sqlite:///abs/path` is appended to it too).
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(dir.path())
            // Group-coordinator decisions (joins, missed heartbeats) are what
            // a failover test needs to read; the rest at warn.
            .env("RUST_LOG", "warn,tansu_broker::coordinator::group=info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let mut tansu = Tansu { child, brokers: format!("127.0.0.1:{port}"), log, binary, _dir: dir };
        tansu.wait_ready(port);
        tansu
    }

    /// The last `lines` lines of the broker's log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    fn wait_ready(&mut self, port: u16) {
        let deadline = Instant::now() + READY;
        // First the port...
        loop {
            self.assert_running();
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "tansu never opened port {port}:\n{}", self.log_tail(40));
            std::thread::sleep(Duration::from_millis(50));
        }
        // ...then a real request, each attempt bounded (it hangs on a broker
        // that accepts connections but does not answer).
        loop {
            self.assert_running();
            let Err(last) = self.topic_list() else { return };
            assert!(
                Instant::now() < deadline,
                "tansu on port {port} never answered `topic list`: {last}\n{}",
                self.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `tansu topic list --broker tcp://...`, killed after [`PROBE`].
    fn topic_list(&self) -> Result<(), String> {
        let mut probe = Command::new(&self.binary)
            .args(["topic", "list", "--broker", &format!("tcp://{}", self.brokers)])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + PROBE;
        loop {
            if let Some(status) = probe.try_wait().map_err(|e| e.to_string())? {
                if status.success() {
                    return Ok(());
                }
                let mut stderr = String::new();
                if let Some(mut pipe) = probe.stderr.take() {
                    use std::io::Read;
                    let _ = pipe.read_to_string(&mut stderr);
                }
                return Err(format!("{status}: {}", stderr.trim()));
            }
            if Instant::now() > deadline {
                let _ = probe.kill();
                let _ = probe.wait();
                return Err(format!("no answer in {PROBE:?}"));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("tansu exited early ({status}):\n{}", self.log_tail(40));
        }
    }
}

/// The last `lines` lines of a text file (empty if it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).map(|bytes| String::from_utf8_lossy(&bytes).into_owned()).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
