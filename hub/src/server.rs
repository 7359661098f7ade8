//! `caep-hub serve`: assembles the hub's state from the configuration and
//! serves it over HTTP until SIGTERM or Ctrl-C.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use caep_transmitter::error::SsfError;
use caep_transmitter::keys::KeyStore;
use caep_transmitter::push::PushPolicy;
use caep_transmitter::secrets::SecretBox;
use caep_transmitter::service::{Transmitter, TransmitterSettings};
use caep_transmitter::ssrf::PushUrlGuard;
use caep_transmitter::store::Store;
use caep_transmitter::{admin, http};
use serde_json::json;
use tokio::net::TcpListener;

use crate::admin_token::{AdminToken, NewToken};
use crate::config::HubConfig;
use crate::dispatch::Dispatcher;
use crate::error::StartError;
use crate::hub::{Hub, TouchHook, Tracker};
use crate::issuers::Issuers;
use crate::log::LocalLog;

/// The redb file inside the data directory.
pub const DATABASE_FILE: &str = "caep-hub.redb";

/// A hub bound to its listen address, ready to serve.
pub struct BoundHub {
    listener: TcpListener,
    router: Router,
    /// The metrics listener and its router, when `metrics_listen` is set.
    metrics: Option<(TcpListener, Router)>,
    /// The address the metrics listener bound.
    pub metrics_addr: Option<SocketAddr>,
    /// The issuer URL this hub publishes.
    pub issuer: String,
    /// The address actually bound (differs from the configured one for port 0).
    pub local_addr: SocketAddr,
    /// The admin token minted on this start, to show the operator once.
    pub new_admin_token: Option<NewToken>,
    /// The transmitter, for in-process callers (tests, tools).
    pub transmitter: Arc<Transmitter>,
    /// The hub, for in-process callers (tests, tools).
    pub hub: Arc<Hub>,
    /// How long requests in flight may take to finish after a stop signal.
    shutdown_grace: Duration,
}

/// Opens the data directory, keys, admin token and database, and binds the
/// listener. The issuer defaults to `http://` + the bound address, so port 0
/// works.
pub async fn bind(config: &HubConfig) -> Result<BoundHub, StartError> {
    // Install the recorder before anything counts, or early counts are lost.
    crate::metrics::handle();
    create_private_dir(&config.data_dir)?;
    let keys = Arc::new(KeyStore::open(&config.data_dir, config.signing_alg)?);
    let (admin_token, new_admin_token) =
        AdminToken::load_or_create(&config.data_dir, config.admin_token.as_deref()).map_err(StartError::AdminToken)?;
    let store = Store::open(&config.data_dir.join(DATABASE_FILE))?;
    let listener =
        TcpListener::bind(config.listen).await.map_err(|source| StartError::Bind { addr: config.listen, source })?;
    let local_addr = listener.local_addr().map_err(|source| StartError::Bind { addr: config.listen, source })?;
    let issuer = match &config.issuer {
        Some(_) => config.issuer(),
        None => format!("http://{local_addr}"),
    };
    let settings = settings(config, &issuer)?;
    let (transmitter, hub) = match config.kafka() {
        None => embedded(settings, store, keys, config.pruning())?,
        Some(kafka) => {
            let assembled = crate::kafka::assemble(config, kafka, store, keys, settings, local_addr).await?;
            (assembled.transmitter, assembled.hub)
        }
    };
    hub.start()?;
    let metrics = match config.metrics_listen {
        Some(addr) => {
            let bind_error = |source| StartError::Bind { addr, source };
            let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
            let router = Router::new().route("/metrics", get(render_metrics).with_state(Arc::clone(&hub)));
            Some((listener, router))
        }
        None => None,
    };
    let metrics_addr = metrics.as_ref().and_then(|(listener, _)| listener.local_addr().ok());
    let router = app(Arc::clone(&hub), admin_token);
    let shutdown_grace = Duration::from_secs(config.shutdown_grace_secs);
    Ok(BoundHub {
        listener,
        router,
        metrics,
        metrics_addr,
        issuer,
        local_addr,
        new_admin_token,
        transmitter,
        hub,
        shutdown_grace,
    })
}

/// The embedded default: one process, everything in the local redb file.
fn embedded(
    settings: TransmitterSettings,
    store: Store,
    keys: Arc<KeyStore>,
    pruning: crate::lifecycle::Pruning,
) -> Result<(Arc<Transmitter>, Arc<Hub>), StartError> {
    let issuer = settings.issuer.clone();
    let guard = PushUrlGuard::new(settings.push_allow.clone());
    let tracker = Tracker::new();
    let touch_hook = Arc::new(TouchHook::default());
    let transmitter = Transmitter::open(settings, store.clone(), keys, tracker.clone(), touch_hook.clone(), None)?;
    let issuers = Issuers::load(store.clone(), guard)?;
    let dispatcher = Dispatcher::local(&issuer, Arc::clone(&transmitter), store.clone());
    let lifetimes = pruning.keep.sessions;
    let log = Box::new(LocalLog::new(store.clone(), Arc::clone(&transmitter), lifetimes, Arc::clone(&dispatcher)));
    let hub = Hub::new(&issuer, Arc::clone(&transmitter), store, issuers, log, dispatcher, pruning);
    touch_hook.connect(&hub);
    Ok((transmitter, hub))
}

fn settings(config: &HubConfig, issuer: &str) -> Result<TransmitterSettings, StartError> {
    let mut settings = TransmitterSettings::new(issuer);
    settings.push_allow = config.push_allow_cidrs()?;
    settings.push_policy =
        PushPolicy { give_up_after: Duration::from_secs(config.delivery_give_up_secs), ..PushPolicy::default() };
    settings.dead_letter_retention = Duration::from_secs(config.dead_letter_retention_secs);
    settings.inactivity_timeout =
        Some(config.stream_inactivity_timeout_secs).filter(|secs| *secs > 0).map(Duration::from_secs);
    settings.long_poll = Duration::from_secs(config.long_poll_secs);
    settings.min_verification_interval = config.min_verification_interval_secs;
    settings.calls_per_second_per_receiver = config.receiver_calls_per_sec;
    settings.max_long_polls_per_receiver = config.max_long_polls_per_receiver;
    settings.secrets = Arc::new(SecretBox::load_or_create(&config.data_dir, config.secret_key.as_deref())?);
    Ok(settings)
}

impl BoundHub {
    /// Serves until SIGTERM or Ctrl-C, then ends open long polls (empty)
    /// and drains in-flight requests for at most the shutdown grace: a
    /// request that cannot finish (in Kafka mode, an IdP event whose broker
    /// is gone waits up to the producer's delivery timeout) must not hold
    /// the process past an orchestrator's kill deadline. Its caller gets no
    /// answer, so no 202 or 200 is ever claimed for it, and retries.
    pub async fn serve(self) -> std::io::Result<()> {
        tracing::info!(issuer = %self.issuer, addr = %self.local_addr, metrics = ?self.metrics_addr, "caep-hub listening");
        if let Some((listener, router)) = self.metrics {
            tokio::spawn(async move {
                if let Err(error) = axum::serve(listener, router).await {
                    tracing::error!(%error, "metrics listener stopped");
                }
            });
        }
        let signal = {
            let transmitter = Arc::clone(&self.transmitter);
            async move {
                shutdown_signal().await;
                transmitter.stop_long_polls();
            }
        };
        let server = axum::serve(self.listener, self.router).with_graceful_shutdown(signal);
        let (grace, stopping) = (self.shutdown_grace, self.transmitter.stopping());
        let grace_over = async move {
            stopping.await;
            tokio::time::sleep(grace).await;
        };
        // A stop that dropped requests still exits 0: it was asked for, and
        // their callers retry what was never acknowledged.
        tokio::select! {
            served = server.into_future() => served?,
            () = grace_over => tracing::warn!(
                grace_secs = grace.as_secs(),
                "requests still in flight at the end of the shutdown grace: stopping without them"
            ),
        }
        tracing::info!("caep-hub drained");
        Ok(())
    }
}

fn app(hub: Arc<Hub>, admin_token: AdminToken) -> Router {
    let admin_token = Arc::new(admin_token);
    let transmitter = Arc::clone(hub.transmitter());
    // Management reads see every write acknowledged at any instance, but
    // only authenticated callers make the hub wait for the shared log.
    let admin = admin::router(Arc::clone(&transmitter))
        .merge(crate::http::admin_router(Arc::clone(&hub)))
        .route("/metrics", get(render_metrics).with_state(Arc::clone(&hub)))
        .layer(middleware::from_fn_with_state(Arc::clone(&hub), catch_up))
        .layer(middleware::from_fn_with_state(Arc::clone(&admin_token), require_admin));
    let receivers = http::router(transmitter.clone())
        .layer(middleware::from_fn_with_state(Arc::clone(&hub), catch_up_for_receivers));
    let managed = admin.merge(receivers);
    let document = Arc::new(crate::openapi::document(hub.transmitter().issuer_path()));
    Router::new()
        .route("/healthz", get(health).with_state(Arc::clone(&hub)))
        .route("/openapi.json", get(crate::openapi::serve_document).with_state(document))
        .merge(managed)
        .merge(crate::console::router(Arc::clone(&hub), admin_token))
        .merge(crate::http::ingest_router(hub))
}

/// Liveness, and in Kafka mode the partitions this instance works. 503
/// with a reason when the storage writer has stopped (nothing can commit)
/// or a push delivery worker has.
#[utoipa::path(get, path = "/healthz", tag = "hub",
    responses((status = 200, description = "Serving", body = crate::openapi::Health),
        (status = 503, description = "The storage writer or a delivery worker has stopped", body = crate::openapi::Health)))]
pub(crate) async fn health(State(hub): State<Arc<Hub>>) -> Response {
    let fault = if hub.store().writer_running() {
        hub.transmitter().delivery_fault()
    } else {
        Some("the storage writer has stopped".to_owned())
    };
    if let Some(reason) = fault {
        let body = json!({"status": "unavailable", "reason": reason});
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    match hub.cluster_status() {
        Some(cluster) => Json(json!({"status": "ok", "kafka": cluster})).into_response(),
        None => Json(json!({"status": "ok"})).into_response(),
    }
}

async fn catch_up(State(hub): State<Arc<Hub>>, request: Request, next: Next) -> Response {
    hub.catch_up().await;
    next.run(request).await
}

/// Catches up only for a request whose bearer token names a receiver this
/// replica knows: a stranger's request costs no broker round trip. The
/// handler authenticates again after the catch-up (the receiver may have
/// been removed at another instance meanwhile).
///
/// A touch (add-subject, add-many) is the hot path, one per agent session
/// and RP: it skips the catch-up when this replica can answer it alone (see
/// [`answerable_locally`]).
async fn catch_up_for_receivers(State(hub): State<Arc<Hub>>, request: Request, next: Next) -> Response {
    let token = bearer(&request);
    let known = token.is_some_and(|token| matches!(hub.transmitter().receivers().authenticate(token), Ok(Some(_))));
    if !known {
        return next.run(request).await;
    }
    if !(hub.is_clustered() && is_touch(&request)) {
        hub.catch_up().await;
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    if parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        > Some(http::MAX_BODY)
    {
        return SsfError::PayloadTooLarge.into_response();
    }
    let body = match axum::body::to_bytes(body, http::MAX_BODY).await {
        Ok(body) => body,
        Err(_) => return SsfError::BadRequest("the request body could not be read whole".into()).into_response(),
    };
    if !answerable_locally(&hub, &body) {
        hub.catch_up().await;
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(body))).await
}

/// Add-subject and add-many, under whatever path the issuer has.
fn is_touch(request: &Request) -> bool {
    use caep_transmitter::metadata::paths::{ADD_SUBJECT, ADD_SUBJECTS};
    let path = request.uri().path();
    request.method() == axum::http::Method::POST && (path.ends_with(ADD_SUBJECT) || path.ends_with(ADD_SUBJECTS))
}

/// Whether this replica can take a touch without catching up first: it
/// knows the stream; the stream hears only from the IdPs it names (an
/// unbound stream's touch is recorded under every trusted IdP, and one
/// trusted at another instance an instant ago would be missed); and the
/// touch will not stamp the stream's activity (a whole-record write that,
/// from a replica a moment behind, would undo a change made elsewhere).
/// A touch taken a replication lag early then only adds graph edges, which
/// cascades check against the streams as they are when they run.
fn answerable_locally(hub: &Hub, body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Named {
        stream_id: String,
    }
    let Ok(named) = serde_json::from_slice::<Named>(body) else { return false };
    let transmitter = hub.transmitter();
    transmitter.streams().get(&named.stream_id).is_some_and(|record| {
        record.issuers.is_some() && !transmitter.activity_due(&record, caep_transmitter::outbox::now_ms())
    })
}

/// The token of an `Authorization: Bearer` header (scheme case-insensitive).
fn bearer(request: &Request) -> Option<&str> {
    let value = request.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

async fn require_admin(State(token): State<Arc<AdminToken>>, request: Request, next: Next) -> Response {
    let presented = bearer(&request);
    match presented {
        Some(presented) if token.accepts(presented) => next.run(request).await,
        Some(_) => SsfError::Unauthorized { invalid_token: true }.into_response(),
        None => SsfError::Unauthorized { invalid_token: false }.into_response(),
    }
}

#[utoipa::path(get, path = "/metrics", tag = "hub", security(("admin_token" = [])),
    responses((status = 200, description = "Prometheus text format (also on the metrics listener, without a token)",
        body = String, content_type = "text/plain"),
        (status = 401, description = "No admin token, or not this hub's", body = caep_transmitter::openapi::ErrorBody)))]
pub(crate) async fn render_metrics(State(hub): State<Arc<Hub>>) -> Response {
    let Some(handle) = crate::metrics::handle() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "metrics recorder unavailable").into_response();
    };
    let mut text = handle.render();
    text.push_str(&crate::metrics::render_streams(hub.transmitter()));
    text.push_str(&crate::metrics::render_kept(hub.store()));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

fn create_private_dir(dir: &std::path::Path) -> Result<(), StartError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StartError::DataDir { dir: dir.to_owned(), source })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => tracing::info!(signal = "SIGINT", "shutting down"),
        () = terminate => tracing::info!(signal = "SIGTERM", "shutting down"),
    }
}
