//! The drill's receivers as the hub sees them: the faults they inject
//! (flaky, slow, down), the deliveries they record for the accounting, and
//! push listeners that can go down and come back on their port.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::response::IntoResponse;
use caep_receiver::{HandlerError, ReceivedEvent};
use caep_schemas::event::event_type;
use caep_schemas::set::SecurityEventToken;
use serde_json::Value;

use crate::accounting::{Accounting, Delivery};
use crate::forest::LeafKey;

/// One receiver's faults and its view of the accounting.
pub struct ReceiverCtx {
    receiver: usize,
    epoch: Instant,
    accounting: Arc<Mutex<Accounting>>,
    flaky_failures: u32,
    failures: Mutex<HashMap<String, u32>>,
    slow: Duration,
    down: AtomicBool,
    drop_remaining: Mutex<usize>,
    /// Told of each leaf recorded (receiver, session): the agents call at once.
    on_record: OnceLock<RecordHook>,
}

/// What is told of each leaf a receiver recorded, and when (ms on the drill's clock).
pub type RecordHook = Arc<dyn Fn(&LeafKey, f64) + Send + Sync>;

/// The faults one receiver injects.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReceiverFaults {
    /// Fail each SET this many times first.
    pub flaky_failures: u32,
    /// Take this long to handle a SET.
    pub slow: Duration,
    /// Self-test: acknowledge but do not record this many leaves.
    pub drop_deliveries: usize,
}

impl ReceiverCtx {
    /// Receiver `receiver`'s context on the drill's clock `epoch`.
    pub fn new(receiver: usize, epoch: Instant, accounting: Arc<Mutex<Accounting>>, faults: ReceiverFaults) -> Self {
        ReceiverCtx {
            receiver,
            epoch,
            accounting,
            flaky_failures: faults.flaky_failures,
            failures: Mutex::new(HashMap::new()),
            slow: faults.slow,
            down: AtomicBool::new(false),
            drop_remaining: Mutex::new(faults.drop_deliveries),
            on_record: OnceLock::new(),
        }
    }

    /// Tells `hook` of every leaf recorded from now on (once set, it stays).
    pub fn on_record(&self, hook: RecordHook) {
        let _ = self.on_record.set(hook);
    }

    /// Takes the receiver down (every SET fails) or back up.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// The faults before a session-revoked SET is taken: down and flaky
    /// receivers fail it, slow ones wait.
    pub async fn admit(&self, jti: &str) -> Result<(), HandlerError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(HandlerError::new("receiver down"));
        }
        if self.flaky_failures > 0 {
            let mut failures = self.failures.lock().map_err(|_| HandlerError::new("poisoned"))?;
            let count = failures.entry(jti.to_owned()).or_insert(0);
            if *count < self.flaky_failures {
                *count += 1;
                return Err(HandlerError::new("flaky receiver: try again"));
            }
        }
        if !self.slow.is_zero() {
            tokio::time::sleep(self.slow).await;
        }
        Ok(())
    }

    /// Records a session-revoked SET the receiver took (and is about to
    /// acknowledge): its time is the acknowledgement time of the leaf.
    pub fn record(&self, event: &ReceivedEvent) -> Result<(), HandlerError> {
        {
            let mut drop = self.drop_remaining.lock().map_err(|_| HandlerError::new("poisoned"))?;
            if *drop > 0 {
                *drop -= 1;
                tracing::warn!(jti = event.jti(), "self-test: a delivered leaf is not recorded");
                return Ok(());
            }
        }
        let delivery = Delivery {
            receiver: self.receiver,
            session: event.session_id().unwrap_or_default().to_owned(),
            jti: event.jti().to_owned(),
            txn: event.txn().map(str::to_owned),
            received_at_ms: self.epoch.elapsed().as_secs_f64() * 1000.0,
        };
        let (leaf, at_ms) =
            (LeafKey { receiver: self.receiver, session: delivery.session.clone() }, delivery.received_at_ms);
        self.accounting.lock().map_err(|_| HandlerError::new("poisoned"))?.record(delivery);
        if let Some(hook) = self.on_record.get() {
            hook(&leaf, at_ms);
        }
        Ok(())
    }

    /// The handler of an SDK receiver: session-revoked SETs go through the
    /// faults and are recorded; others are acknowledged.
    pub async fn handle(&self, event: ReceivedEvent) -> Result<(), HandlerError> {
        if event.event_type() != event_type::SESSION_REVOKED {
            return Ok(());
        }
        self.admit(event.jti()).await?;
        self.record(&event)
    }
}

/// The claims of a compact SET, read without verification: the drill
/// only counts what a receiver that verified it acknowledged.
pub fn unverified_set(token: &[u8]) -> Option<SecurityEventToken> {
    use base64::Engine;
    let text = std::str::from_utf8(token).ok()?.trim();
    let payload = text.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    match serde_json::from_slice::<Value>(&bytes).ok()? {
        Value::Object(claims) => SecurityEventToken::from_claims(claims).ok(),
        _ => None,
    }
}

/// Wraps a push router to count SETs arriving again after their `jti` was
/// answered 2xx (the SDK answers such copies without calling the handler).
pub fn count_retries(router: axum::Router, accounting: Arc<Mutex<Accounting>>) -> axum::Router {
    let acknowledged: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    router.layer(axum::middleware::from_fn(move |request: axum::extract::Request, next: axum::middleware::Next| {
        let (accounting, acknowledged) = (Arc::clone(&accounting), Arc::clone(&acknowledged));
        async move {
            let (parts, body) = request.into_parts();
            let bytes = match axum::body::to_bytes(body, 1024 * 1024).await {
                Ok(bytes) => bytes,
                Err(_) => return axum::http::StatusCode::BAD_REQUEST.into_response(),
            };
            let jti = unverified_set(&bytes).map(|set| set.jti);
            let response = next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))).await;
            if response.status().is_success()
                && let Some(jti) = jti
            {
                let again = acknowledged.lock().map(|mut seen| !seen.insert(jti)).unwrap_or(false);
                if again && let Ok(mut accounting) = accounting.lock() {
                    accounting.record_retry();
                }
            }
            response
        }
    }))
}

/// A server on a loopback port (a push listener, an RP's service) that can
/// be stopped and restarted on its port.
pub struct LoopbackServer {
    /// Where it listens.
    pub addr: SocketAddr,
    router: axum::Router,
    /// The runtime it serves on.
    runtime: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl LoopbackServer {
    /// Serves `router` on a free loopback port, on the current runtime.
    ///
    /// # Errors
    ///
    /// When no port can be bound.
    pub async fn start(router: axum::Router) -> anyhow::Result<LoopbackServer> {
        LoopbackServer::start_on(router, tokio::runtime::Handle::current()).await
    }

    /// Serves `router` on a free loopback port, on `runtime`.
    ///
    /// # Errors
    ///
    /// When no port can be bound.
    pub async fn start_on(router: axum::Router, runtime: tokio::runtime::Handle) -> anyhow::Result<LoopbackServer> {
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut server = LoopbackServer { addr, router, runtime, stop: None };
        server.listen().await?;
        Ok(server)
    }

    /// Listens again (after [`shutdown`](Self::shutdown)) on the same port.
    ///
    /// # Errors
    ///
    /// When the port stays taken for 10 s.
    pub async fn listen(&mut self) -> anyhow::Result<()> {
        let (addr, router) = (self.addr, self.router.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (bound, listening) = tokio::sync::oneshot::channel();
        // Bound inside the task: a listener belongs to the runtime that made it.
        self.runtime.spawn(async move {
            let listener = match bind(addr).await {
                Ok(listener) => listener,
                Err(error) => {
                    let _ = bound.send(Err(error));
                    return;
                }
            };
            let _ = bound.send(listener.local_addr().map_err(anyhow::Error::from));
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(error) = axum::serve(listener, router).with_graceful_shutdown(shutdown).await {
                tracing::warn!(%error, "loopback server stopped");
            }
        });
        self.addr = listening.await.context("the server task ended")??;
        self.stop = Some(stop);
        Ok(())
    }

    /// Stops listening.
    pub fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Binds `addr`, retrying for 10 s while the port is still taken.
async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => return Ok(listener),
            Err(error) if Instant::now() < deadline => {
                tracing::debug!(%error, %addr, "rebinding");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => return Err(error).context("binding a loopback server"),
        }
    }
}

#[cfg(test)]
mod tests {
    use caep_schemas::event::{Event, SessionRevoked};
    use caep_schemas::jose::{Algorithm, SigningKey};
    use caep_schemas::subject::SubjectId;

    use super::*;

    #[test]
    fn an_unverified_set_is_read_for_counting() {
        let key = SigningKey::generate(Algorithm::Es256).expect("key");
        let subject = SubjectId::session_of(SubjectId::opaque("s1"), None);
        let set = SecurityEventToken::new(
            "https://hub",
            "https://rp",
            subject,
            Event::SessionRevoked(SessionRevoked::default()),
        )
        .with_txn("t1");
        let token = set.sign(&key).expect("sign");
        let read = unverified_set(token.as_bytes()).expect("read");
        assert_eq!((read.jti.as_str(), read.txn.as_deref()), (set.jti.as_str(), Some("t1")));
        assert!(unverified_set(b"not.a.set").is_none());
    }
}
