//! A private Tansu broker (a Kafka-protocol broker with SQLite storage, see
//! `.ci/install-tansu`) that the drill owns: its
//! own free loopback port and database in a temporary directory, stopped and
//! restarted on the same port and storage for the broker-restart fault,
//! killed when dropped.
//!
//! The hub's multi-process Kafka test (`hub/tests/kafka_cluster.rs`) uses it
//! too. The binary is `$CAEP_TANSU`, then `tansu` on `PATH`, then
//! `~/.cache/caep-hub/tansu/bin/tansu`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use tempfile::TempDir;

/// How long the broker may take to answer its first request.
const READY: Duration = Duration::from_secs(60);
/// The longest one readiness probe (`tansu topic list`) may take.
const PROBE: Duration = Duration::from_secs(10);

/// The tansu binary: `$CAEP_TANSU`, then `tansu` on `PATH`, then the cache
/// `.ci/install-tansu` installs into.
///
/// # Errors
///
/// When there is none (saying how to install it), or `$CAEP_TANSU` is not an
/// executable file.
pub fn binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("CAEP_TANSU").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        anyhow::ensure!(
            is_executable(&path),
            "CAEP_TANSU={} is not an executable file; run .ci/install-tansu",
            path.display()
        );
        return Ok(path);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("tansu"))
        .find(|candidate| is_executable(candidate));
    if let Some(path) = on_path {
        return Ok(path);
    }
    match std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache/caep-hub/tansu/bin/tansu")) {
        Some(path) if is_executable(&path) => Ok(path),
        _ => anyhow::bail!(
            "the Tansu broker is not installed (looked at $CAEP_TANSU, PATH and ~/.cache/caep-hub/tansu/bin/tansu): \
             run .ci/install-tansu (about 10 minutes, once)"
        ),
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A broker on `127.0.0.1:port` that the drill started.
#[derive(Debug)]
pub struct TansuBroker {
    binary: PathBuf,
    /// The temp dir, until [`keep_dir`](Self::keep_dir).
    dir: Option<TempDir>,
    path: PathBuf,
    port: u16,
    child: Option<Child>,
    /// How many times it was stopped and started again.
    pub restarts: usize,
}

impl TansuBroker {
    /// Starts `binary` on a free loopback port with SQLite storage in a new
    /// temporary directory, and waits until it answers a metadata request.
    ///
    /// # Errors
    ///
    /// When it cannot be started or does not answer within a minute.
    pub async fn start(binary: PathBuf) -> anyhow::Result<TansuBroker> {
        let dir = tempfile::Builder::new().prefix("caep-drill-tansu-").tempdir().context("temp dir for tansu")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let path = dir.path().to_path_buf();
        let mut broker = TansuBroker { binary, dir: Some(dir), path, port, child: None, restarts: 0 };
        broker.spawn()?;
        broker.wait_ready().await?;
        Ok(broker)
    }

    /// The broker's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `127.0.0.1:port`, for `CAEP_HUB_KAFKA_BROKERS`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's stdout and stderr (every start appends).
    pub fn log_path(&self) -> PathBuf {
        self.path.join("tansu.log")
    }

    /// Keeps the directory (database and log) after the drill; returns it.
    pub fn keep_dir(&mut self) -> PathBuf {
        if let Some(dir) = self.dir.take() {
            let _ = dir.keep();
        }
        self.path.clone()
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path())?;
        let child = Command::new(&self.binary)
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            // Tansu 0.6 resolves the SQLite path against its working directory
            // (an absolute `sqlite:///abs/path` is appended to it too).
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(&self.path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        tracing::info!(pid = child.id(), port = self.port, "tansu started");
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILLs the broker, waits `down`, and starts it again on the same
    /// port and storage; returns once it answers again.
    ///
    /// # Errors
    ///
    /// When it cannot be restarted.
    pub async fn restart(&mut self, down: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        if let Some(mut child) = self.child.take() {
            child.kill().context("SIGKILL tansu")?;
            child.wait().context("reaping tansu")?;
        }
        tracing::warn!(port = self.port, down_ms = down.as_millis() as u64, "tansu stopped");
        tokio::time::sleep(down).await;
        self.spawn()?;
        self.wait_ready().await?;
        self.restarts += 1;
        tracing::warn!(port = self.port, "tansu back");
        Ok(started.elapsed())
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY;
        // First the port...
        loop {
            self.ensure_running()?;
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "tansu never opened port {}; see {}", self.port, self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // ...then a real request, each attempt bounded (it hangs on a broker
        // that accepts connections but does not answer).
        loop {
            self.ensure_running()?;
            let Err(last) = self.topic_list().await else { return Ok(()) };
            anyhow::ensure!(
                Instant::now() < deadline,
                "tansu on port {} never answered `topic list`: {last}; see {}",
                self.port,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn log(&self) -> String {
        self.log_path().display().to_string()
    }

    /// `tansu topic list --broker tcp://...`, killed after [`PROBE`].
    async fn topic_list(&self) -> Result<(), String> {
        let mut probe = Command::new(&self.binary)
            .args(["topic", "list", "--broker", &format!("tcp://{}", self.brokers())])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + PROBE;
        loop {
            if let Some(status) = probe.try_wait().map_err(|e| e.to_string())? {
                return if status.success() { Ok(()) } else { Err(status.to_string()) };
            }
            if Instant::now() > deadline {
                let _ = probe.kill();
                let _ = probe.wait();
                return Err(format!("no answer in {PROBE:?}"));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            anyhow::bail!("tansu exited early ({status}); see {}", self.log());
        }
        Ok(())
    }
}

impl Drop for TansuBroker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
