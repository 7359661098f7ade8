//! The hub under test: a `caep-hub` process the drill spawns (and may
//! SIGKILL and restart on the same data dir and port), or an existing hub.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// Where the `caep-hub` binary is: `explicit` if given, else next to the
/// current executable (see [`locate_bin`]).
///
/// # Errors
///
/// When no binary is found; build it with `cargo build -p caep-hub`.
pub fn locate_hub_bin(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    locate_bin("caep-hub", explicit, "cargo build -p caep-hub", "--hub-bin")
}

/// Where binary `name` is: `explicit` if given, else next to the current
/// executable (or one directory up, for test binaries in
/// `target/<profile>/deps`).
///
/// # Errors
///
/// When no binary is found: the message says to run `build` or pass `flag`.
pub fn locate_bin(name: &str, explicit: Option<&Path>, build: &str, flag: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        anyhow::ensure!(path.is_file(), "{flag} {} does not exist", path.display());
        return Ok(path.to_path_buf());
    }
    let exe = std::env::current_exe().context("current executable")?;
    let file = format!("{name}{}", std::env::consts::EXE_SUFFIX);
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(&file);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    anyhow::bail!("no {name} binary next to {}: run `{build}` (same profile) or pass {flag}", exe.display())
}

/// A `caep-hub` process on a temp data dir that the drill owns.
#[derive(Debug)]
pub struct SpawnedHub {
    bin: PathBuf,
    /// The temp dir, until [`keep_dir`](Self::keep_dir).
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    port: u16,
    admin_token: String,
    /// Extra environment (Kafka mode).
    env: Vec<(String, String)>,
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
        let port = free_port()?;
        let mut hub = SpawnedHub::spawn_with(bin, admin_token, port, Vec::new())?;
        hub.wait_healthy().await?;
        Ok(hub)
    }

    /// [`start`](Self::start) with `env` added (e.g. short lifetimes).
    ///
    /// # Errors
    ///
    /// When the process cannot be started or does not become healthy.
    pub async fn start_with_env(
        bin: PathBuf,
        admin_token: String,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<SpawnedHub> {
        let mut hub = SpawnedHub::spawn_with(bin, admin_token, free_port()?, env)?;
        hub.wait_healthy().await?;
        Ok(hub)
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The hub's redb file.
    pub fn database_path(&self) -> PathBuf {
        self.path.join("data").join("caep-hub.redb")
    }

    /// Starts `bin serve` on `port` and a fresh temp data dir with `env`
    /// added (e.g. the Kafka settings), without waiting for it.
    ///
    /// # Errors
    ///
    /// When the process cannot be started.
    pub fn spawn_with(
        bin: PathBuf,
        admin_token: String,
        port: u16,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<SpawnedHub> {
        let dir = tempfile::Builder::new().prefix("caep-drill-").tempdir().context("temp data dir")?;
        let path = dir.path().to_path_buf();
        let mut hub = SpawnedHub { bin, dir: Some(dir), path, port, admin_token, env, child: None, kills: 0 };
        hub.spawn()?;
        Ok(hub)
    }

    /// Keeps the data dir and log after the drill; returns the dir.
    pub fn keep_dir(&mut self) -> PathBuf {
        if let Some(dir) = self.dir.take() {
            let _ = dir.keep();
        }
        self.path.clone()
    }

    /// Whether the process was started and not killed.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILLs the hub, without restarting it.
    ///
    /// # Errors
    ///
    /// When it cannot be killed.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("SIGKILL caep-hub")?;
            child.wait().context("reaping caep-hub")?;
            self.kills += 1;
            tracing::warn!(port = self.port, "caep-hub SIGKILLed");
        }
        Ok(())
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
        self.path.join("hub.log")
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path())?;
        let mut command = Command::new(&self.bin);
        // A clean `CAEP_HUB_*` environment: only what the drill sets.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CAEP_HUB_") {
                command.env_remove(key);
            }
        }
        let child = command
            .arg("serve")
            .env("CAEP_HUB_PUSH_ALLOW_CIDRS", "127.0.0.0/8")
            .env("CAEP_HUB_MIN_VERIFICATION_INTERVAL_SECS", "0")
            .env("CAEP_HUB_LONG_POLL_SECS", "5")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            // What the drill relies on to find and drive the hub wins over `env`.
            .env("CAEP_HUB_DATA_DIR", self.path.join("data"))
            .env("CAEP_HUB_LISTEN", format!("127.0.0.1:{}", self.port))
            .env("CAEP_HUB_ADMIN_TOKEN", &self.admin_token)
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

    /// Waits (up to a minute) until `/healthz` answers 200.
    ///
    /// # Errors
    ///
    /// When the process exits or stays unhealthy.
    pub async fn wait_ready(&mut self) -> anyhow::Result<()> {
        self.wait_healthy().await
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

/// A free loopback port.
///
/// # Errors
///
/// When no port can be bound.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Drop for SpawnedHub {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
