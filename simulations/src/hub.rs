//! The hub under test: a `caep-hub` process the drill spawns (and may
//! SIGKILL and restart on the same data dir and port), or an existing hub.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// Where the `caep-hub` binary is: `explicit` if given, else next to the
/// current executable (or one directory up, for test binaries in
/// `target/<profile>/deps`).
///
/// # Errors
///
/// When no binary is found; build it with `cargo build -p caep-hub`.
pub fn locate_hub_bin(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        anyhow::ensure!(path.is_file(), "--hub-bin {} does not exist", path.display());
        return Ok(path.to_path_buf());
    }
    let exe = std::env::current_exe().context("current executable")?;
    let name = format!("caep-hub{}", std::env::consts::EXE_SUFFIX);
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(&name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    anyhow::bail!(
        "no caep-hub binary next to {}: run `cargo build -p caep-hub` (same profile) or pass --hub-bin",
        exe.display()
    )
}

/// A `caep-hub` process on a temp data dir that the drill owns.
#[derive(Debug)]
pub struct SpawnedHub {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    admin_token: String,
    child: Option<Child>,
    /// How many times it was SIGKILLed.
    pub kills: usize,
}

impl SpawnedHub {
    /// Starts `bin serve` on a free loopback port and a fresh temp data dir.
    ///
    /// # Errors
    ///
    /// When the process cannot be started or does not become healthy.
    pub async fn start(bin: PathBuf, admin_token: String) -> anyhow::Result<SpawnedHub> {
        let dir = tempfile::Builder::new().prefix("caep-drill-").tempdir().context("temp data dir")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut hub = SpawnedHub { bin, dir, port, admin_token, child: None, kills: 0 };
        hub.spawn()?;
        hub.wait_healthy().await?;
        Ok(hub)
    }

    /// The hub's base URL (its issuer).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The admin token it was started with.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The hub's log file (stderr of every start).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("hub.log")
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path())?;
        let child = Command::new(&self.bin)
            .arg("serve")
            .env("CAEP_HUB_DATA_DIR", self.dir.path().join("data"))
            .env("CAEP_HUB_LISTEN", format!("127.0.0.1:{}", self.port))
            .env("CAEP_HUB_ADMIN_TOKEN", &self.admin_token)
            .env("CAEP_HUB_PUSH_ALLOW_CIDRS", "127.0.0.0/8")
            .env("CAEP_HUB_MIN_VERIFICATION_INTERVAL_SECS", "0")
            .env("CAEP_HUB_LONG_POLL_SECS", "5")
            .env_remove("CAEP_HUB_ISSUER")
            .env_remove("CAEP_HUB_CONFIG")
            .env_remove("CAEP_HUB_SIGNING_ALG")
            .env("RUST_LOG", std::env::var("DRILL_HUB_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        tracing::info!(pid = child.id(), port = self.port, "caep-hub started");
        self.child = Some(child);
        Ok(())
    }

    async fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let url = format!("{}/healthz", self.url());
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                anyhow::bail!("caep-hub exited with {status}; see {}", self.log_path().display());
            }
            if client.get(&url).send().await.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        anyhow::bail!("caep-hub not healthy after 60 s; see {}", self.log_path().display())
    }

    /// SIGKILLs the hub and starts it again on the same data dir and port.
    ///
    /// # Errors
    ///
    /// When it cannot be restarted.
    pub async fn kill_and_restart(&mut self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        if let Some(mut child) = self.child.take() {
            child.kill().context("SIGKILL caep-hub")?;
            child.wait().context("reaping caep-hub")?;
        }
        self.kills += 1;
        tracing::warn!(port = self.port, "caep-hub SIGKILLed; restarting");
        self.spawn()?;
        self.wait_healthy().await?;
        Ok(started.elapsed())
    }
}

impl Drop for SpawnedHub {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
