//! Helpers shared by the hub's process-level tests (`mod support;` in each
//! test file that uses them).
#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::routing::post;

pub const BIN: &str = env!("CARGO_BIN_EXE_caep-hub");

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A `caep-hub serve` process on `127.0.0.1:port` with its stdout and
/// stderr in files under its directory; killed on drop.
pub struct HubProcess {
    pub name: String,
    pub base: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl HubProcess {
    /// Spawns `caep-hub serve` with its own data directory `dir/<name>`,
    /// listening on a free port, with `envs` added to a clean `CAEP_HUB_*`
    /// environment. Does not wait for it.
    pub fn spawn(name: &str, dir: &Path, envs: &[(&str, String)]) -> HubProcess {
        HubProcess::spawn_on(name, free_port(), dir, envs)
    }

    /// [`spawn`](Self::spawn) on a given port.
    pub fn spawn_on(name: &str, port: u16, dir: &Path, envs: &[(&str, String)]) -> HubProcess {
        let data_dir = dir.join(name);
        std::fs::create_dir_all(&data_dir).expect("data dir");
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).expect("log file");
        let mut command = Command::new(BIN);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CAEP_HUB_") {
                command.env_remove(key);
            }
        }
        command
            .arg("serve")
            .env("CAEP_HUB_DATA_DIR", data_dir.join("data"))
            .env("CAEP_HUB_LISTEN", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out);
        for (key, value) in envs {
            command.env(key, value);
        }
        let child = command.spawn().expect("spawn caep-hub");
        HubProcess { name: name.to_owned(), base: format!("http://127.0.0.1:{port}"), log, child: Some(child) }
    }

    /// Waits (up to `within`) until `/healthz` answers 200.
    pub async fn wait_healthy(&mut self, client: &reqwest::Client, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("{} exited early ({status}):\n{}", self.name, self.log_tail(60));
            }
            let health = client.get(format!("{}/healthz", self.base)).send().await;
            if health.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            assert!(Instant::now() < deadline, "{} not healthy in {within:?}:\n{}", self.name, self.log_tail(60));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL, and reap.
    pub fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL");
            child.wait().expect("reaped");
        }
    }

    /// The process id, until it is reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status once it has exited (reaped), `None` while it runs.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().expect("try_wait")?;
        self.child = None;
        Some(status)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The last `lines` lines of a text file (empty if it cannot be read).
pub fn tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read(path).map(|bytes| String::from_utf8_lossy(&bytes).into_owned()).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A push receiver on loopback that records every SET body and answers 202
/// after `delay`; returns its endpoint URL and what it received.
pub async fn recording_webhook(delay: Duration) -> (String, Arc<Mutex<Vec<String>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&received);
    let app = axum::Router::new().route(
        "/events",
        post(move |body: String| {
            let sink = Arc::clone(&sink);
            async move {
                tokio::time::sleep(delay).await;
                sink.lock().expect("lock").push(body);
                StatusCode::ACCEPTED
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/events", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

/// Registers a receiver through the admin API (with the `admin` token) and creates its stream with
/// `stream` as the create body; returns (receiver token, stream id).
pub async fn push_receiver(
    client: &reqwest::Client,
    base: &str,
    admin: &str,
    name: &str,
    audience: &str,
    stream: serde_json::Value,
) -> (String, String) {
    let receiver: serde_json::Value = client
        .post(format!("{base}/admin/receivers"))
        .bearer_auth(admin)
        .json(&serde_json::json!({"name": name, "audience": audience}))
        .send()
        .await
        .expect("create receiver")
        .json()
        .await
        .expect("json");
    let token = receiver["token"].as_str().expect("token").to_owned();
    let created: serde_json::Value = client
        .post(format!("{base}/ssf/streams"))
        .bearer_auth(&token)
        .json(&stream)
        .send()
        .await
        .expect("create stream")
        .json()
        .await
        .expect("json");
    let stream_id = created["stream_id"].as_str().expect("stream_id").to_owned();
    (token, stream_id)
}
