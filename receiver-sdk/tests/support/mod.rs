//! Shared harness of the SDK's integration tests: a real caep-hub served
//! in-process on loopback (real redb in a temporary directory), the SDK push
//! router served on loopback, and recording handlers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use caep_hub::config::HubConfig;
use caep_receiver::{HandlerError, ReceivedEvent};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::sync::Notify;

/// The operator token of every test hub.
pub const ADMIN_TOKEN: &str = "t";
/// How long a test waits for something that should happen promptly.
pub const WAIT: Duration = Duration::from_secs(10);

/// A hub running in this process.
pub struct TestHub {
    pub issuer: String,
    pub http: reqwest::Client,
    _dir: TempDir,
}

impl TestHub {
    /// Binds a hub on 127.0.0.1:0 that may push to loopback, with no
    /// verification rate limit and a 2 s long poll, and serves it.
    pub async fn start() -> TestHub {
        TestHub::start_with(HubConfig::default()).await
    }

    /// A hub with `base`'s limits (listen address, data dir, admin token and
    /// loopback push are the test's own).
    pub async fn start_with(base: HubConfig) -> TestHub {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = HubConfig {
            listen: "127.0.0.1:0".parse().expect("address"),
            data_dir: dir.path().join("data"),
            admin_token: Some(ADMIN_TOKEN.into()),
            push_allow_cidrs: "127.0.0.0/8".into(),
            min_verification_interval_secs: 0,
            long_poll_secs: 2,
            ..base
        };
        let hub = caep_hub::server::bind(&config).await.expect("hub binds");
        let issuer = hub.issuer.clone();
        tokio::spawn(hub.serve());
        TestHub { issuer, http: reqwest::Client::new(), _dir: dir }
    }

    /// An admin call; returns (status, JSON body or Null).
    pub async fn admin(&self, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
        let response = self
            .http
            .request(method, format!("{}{path}", self.issuer))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .expect("admin call");
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    /// Posts a signed IdP SET to `/ingest`; the hub must take it (202).
    pub async fn ingest(&self, signed_set: String) {
        let response = self
            .http
            .post(format!("{}/ingest", self.issuer))
            .header("content-type", "application/secevent+jwt")
            .body(signed_set)
            .send()
            .await
            .expect("ingest");
        let status = response.status().as_u16();
        assert_eq!(status, 202, "ingest answered {status}: {}", response.text().await.unwrap_or_default());
    }

    /// Registers a receiver with `audience`; returns its bearer token.
    pub async fn new_receiver(&self, name: &str, audience: &str) -> String {
        let (status, body) =
            self.admin(reqwest::Method::POST, "/admin/receivers", json!({"name": name, "audience": audience})).await;
        assert_eq!(status, 201, "receiver creation: {body}");
        body["token"].as_str().expect("token").to_owned()
    }
}

/// Serves `router` on 127.0.0.1:0; returns its address.
pub async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

/// A handler that records every event it is given.
#[derive(Clone, Default)]
pub struct Recorder {
    events: Arc<Mutex<Vec<ReceivedEvent>>>,
    arrived: Arc<Notify>,
}

impl Recorder {
    /// The handler closure.
    pub fn handler(
        &self,
    ) -> impl Fn(ReceivedEvent) -> std::future::Ready<Result<(), HandlerError>> + Send + Sync + 'static {
        let recorder = self.clone();
        move |event| {
            recorder.events.lock().expect("lock").push(event);
            recorder.arrived.notify_waiters();
            std::future::ready(Ok(()))
        }
    }

    /// Everything recorded so far.
    pub fn events(&self) -> Vec<ReceivedEvent> {
        self.events.lock().expect("lock").clone()
    }

    /// Waits until an event satisfying `pred` has been recorded.
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&ReceivedEvent) -> bool) -> ReceivedEvent {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let notified = self.arrived.notified();
            if let Some(found) = self.events().into_iter().find(|event| pred(event)) {
                return found;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("no {what} arrived within {WAIT:?}; got {:?}", self.events());
            }
        }
    }
}
