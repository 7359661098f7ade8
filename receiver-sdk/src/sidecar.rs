//! `caep-guard`: enforcement for relying parties in any language. It joins
//! the transmitter as a receiver, keeps a [`Revocations`] store on disk fed
//! by its stream (poll by default, or push), and answers the forward-auth
//! convention that nginx `auth_request`, Envoy ext_authz (HTTP), Traefik
//! ForwardAuth and Caddy `forward_auth` share: `GET /check` with the original
//! request's `Authorization` header answers 200, or 401 with
//! `WWW-Authenticate: Bearer error="invalid_token", error_description="session
//! revoked"`. It reports each new agent session as a touch itself.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::client::Receiver;
use crate::error::ReceiverError;
use crate::event::ReceivedEvent;
use crate::guard::{EnforceLayer, refusal};
use crate::handler::HandlerError;
use crate::revocations::{ENFORCED_EVENTS, Revocations};
use crate::streams::StreamRequest;

/// How the guard receives its SETs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuardDelivery {
    /// RFC 8936: the guard polls; no inbound connection needed.
    Poll,
    /// RFC 8935: the transmitter posts to this guard's `/push`.
    Push {
        /// The URL that reaches `/push` (e.g. `https://guard.internal:9090/push`).
        url: String,
    },
}

/// What the guard runs with (the binary reads it from `CAEP_GUARD_*`).
#[derive(Clone, Debug)]
pub struct GuardConfig {
    /// The transmitter's issuer URL.
    pub transmitter: String,
    /// This receiver's audience (as registered with the transmitter).
    pub audience: String,
    /// This receiver's bearer token at the transmitter.
    pub token: String,
    /// Where `/check`, `/healthz`, `/metrics` (and `/push`) are served.
    pub listen: SocketAddr,
    /// How SETs arrive.
    pub delivery: GuardDelivery,
    /// The JWT claim naming the agent session (`sid`).
    pub session_claim: String,
    /// Where the revocation store and the stream id are kept.
    pub data_dir: PathBuf,
    /// How long a revocation is honoured (at least the longest access-token lifetime).
    pub revocation_ttl: Duration,
}

/// Counters for `/metrics`.
#[derive(Default)]
struct Counters {
    allowed: AtomicU64,
    refused: AtomicU64,
    no_agent: AtomicU64,
    sets: AtomicU64,
}

struct GuardState {
    layer: EnforceLayer,
    revocations: Arc<Revocations>,
    counters: Arc<Counters>,
}

/// A guard ready to serve.
pub struct Guard {
    router: Router,
    listener: tokio::net::TcpListener,
    /// The address it listens on.
    pub local_addr: SocketAddr,
    poll: Option<tokio::task::JoinHandle<()>>,
}

/// Joins the transmitter (reusing the stream of an earlier run, kept in the
/// data directory), opens the store and binds the listener.
///
/// # Errors
///
/// When the transmitter cannot be reached or refuses the receiver, or the
/// data directory or address cannot be used.
pub async fn start(config: GuardConfig) -> Result<Guard, ReceiverError> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| ReceiverError::Config(format!("data dir {}: {e}", config.data_dir.display())))?;
    let revocations = Revocations::open(&config.data_dir.join("revocations.redb"), config.revocation_ttl)?;
    tokio::spawn(Arc::clone(&revocations).prune_forever());
    let receiver = Receiver::discover(&config.transmitter, &config.audience, &config.token)
        .await?
        .with_revocations(Arc::clone(&revocations));
    let receiver = Arc::new(receiver);
    let counters = Arc::new(Counters::default());
    let counting = {
        let counters = Arc::clone(&counters);
        move |_: ReceivedEvent| {
            counters.sets.fetch_add(1, Ordering::Relaxed);
            async { Ok::<(), HandlerError>(()) }
        }
    };
    let stream = stream_of(&receiver, &config).await?;
    let mut router = Router::new();
    let mut poll = None;
    match &config.delivery {
        GuardDelivery::Poll => {
            let poll_loop = receiver.poll_loop(&stream, counting)?;
            poll = Some(tokio::spawn(async move {
                if let Err(error) = poll_loop.run(std::future::pending()).await {
                    tracing::error!(%error, "the poll loop stopped");
                }
            }));
        }
        GuardDelivery::Push { .. } => router = router.nest("/push", receiver.push_router(None, counting)),
    }
    let layer = EnforceLayer::new(Arc::clone(&revocations))
        .session_claim(&config.session_claim)
        .reporting_touches(Arc::clone(&receiver), &stream.stream_id);
    let state = Arc::new(GuardState { layer, revocations, counters });
    let router = Router::new()
        .route("/check", get(check).post(check).head(check))
        .route("/healthz", get(health))
        .route("/metrics", get(metrics))
        .with_state(state)
        .merge(router);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| ReceiverError::Config(format!("listen {}: {e}", config.listen)))?;
    let local_addr = listener.local_addr().map_err(|e| ReceiverError::Config(e.to_string()))?;
    tracing::info!(%local_addr, stream_id = %stream.stream_id, "caep-guard ready");
    Ok(Guard { router, listener, local_addr, poll })
}

impl Guard {
    /// Serves until the process ends.
    ///
    /// # Errors
    ///
    /// When the listener fails.
    pub async fn serve(self) -> std::io::Result<()> {
        let _poll = self.poll;
        axum::serve(self.listener, self.router).await
    }
}

/// The guard's stream: the one an earlier run created (its id kept in the
/// data directory), or a new one.
async fn stream_of(
    receiver: &Receiver,
    config: &GuardConfig,
) -> Result<crate::streams::StreamConfiguration, ReceiverError> {
    let saved = config.data_dir.join("stream_id");
    if let Ok(id) = std::fs::read_to_string(&saved) {
        match receiver.read_stream(id.trim()).await {
            Ok(stream) => return Ok(stream),
            Err(error) => tracing::warn!(%error, "the saved stream is gone; creating another"),
        }
    }
    let request = match &config.delivery {
        GuardDelivery::Poll => StreamRequest::poll(),
        GuardDelivery::Push { url } => StreamRequest::push(url.clone(), None),
    }
    .events(ENFORCED_EVENTS);
    let stream = receiver.create_stream(&request).await?;
    std::fs::write(&saved, &stream.stream_id)
        .map_err(|e| ReceiverError::Config(format!("saving the stream id: {e}")))?;
    Ok(stream)
}

/// The forward-auth answer for the original request's headers.
async fn check(State(state): State<Arc<GuardState>>, headers: HeaderMap) -> Response {
    let has_agent = headers.contains_key(header::AUTHORIZATION);
    match state.layer.check(&headers) {
        Some(revoked) => {
            state.counters.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(?revoked, "refused");
            refusal::<axum::body::Body>()
        }
        None => {
            let counter = if has_agent { &state.counters.allowed } else { &state.counters.no_agent };
            counter.fetch_add(1, Ordering::Relaxed);
            StatusCode::OK.into_response()
        }
    }
}

/// Liveness only: `/healthz` is unauthenticated, so it names no stream.
async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn metrics(State(state): State<Arc<GuardState>>) -> Response {
    let (sessions, users) = state.revocations.len();
    let c = &state.counters;
    let text = format!(
        "# HELP caep_guard_checks_total Forward-auth checks by outcome\n# TYPE caep_guard_checks_total counter\n\
         caep_guard_checks_total{{outcome=\"allowed\"}} {}\ncaep_guard_checks_total{{outcome=\"refused\"}} {}\n\
         caep_guard_checks_total{{outcome=\"no_agent\"}} {}\n\
         # HELP caep_guard_revoked Revocations held, by kind\n# TYPE caep_guard_revoked gauge\n\
         caep_guard_revoked{{kind=\"session\"}} {sessions}\ncaep_guard_revoked{{kind=\"user\"}} {users}\n\
         # HELP caep_guard_sets_received_total Verified SETs received\n# TYPE caep_guard_sets_received_total counter\n\
         caep_guard_sets_received_total {}\n",
        c.allowed.load(Ordering::Relaxed),
        c.refused.load(Ordering::Relaxed),
        c.no_agent.load(Ordering::Relaxed),
        c.sets.load(Ordering::Relaxed),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
