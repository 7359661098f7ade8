//! One drill run: real receivers on loopback, a simulated IdP, the forest
//! established and touched, revocations, waiting for every leaf, faults,
//! and the exactness accounting.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::response::IntoResponse;
use caep_receiver::{HandlerError, ReceivedEvent, Receiver, StreamRequest};
use caep_schemas::event::{AccountDisabled, Authority, Event, SessionEstablished, SessionRevoked, event_type};
use caep_schemas::jose::{Algorithm, Jwks, SigningKey};
use caep_schemas::set::SecurityEventToken;
use caep_schemas::subject::SubjectId;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::accounting::{Accounting, Delivery, Outcome};
use crate::cluster::KafkaCluster;
use crate::forest::{AuthorityKind, Forest, ForestParams, LeafKey, expected_leaves, user_email};
use crate::hub::SpawnedHub;

/// Which revocations a drill performs, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Every root, in one `txn`.
    Roots,
    /// A mid-tree session, then every root.
    Mid,
    /// A user by RISC account-disabled, then every root.
    User,
    /// Mid-tree session, user, then every root.
    All,
}

/// Faults to inject.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Faults {
    /// Push receivers whose handler fails the first `flaky_failures` times per SET (the SDK answers 503).
    pub flaky_receivers: usize,
    /// Failures per SET of a flaky receiver.
    pub flaky_failures: u32,
    /// Push receivers that answer slowly.
    pub slow_receivers: usize,
    /// Delay of a slow receiver's handler, in ms.
    pub slow_ms: u64,
    /// Push receivers whose listener is down when the first revocation is posted.
    pub down_receivers: usize,
    /// How long they stay down, in ms.
    pub down_ms: u64,
    /// SIGKILL the spawned hub once this many leaves were delivered, then restart it.
    pub kill_hub_at: Option<usize>,
    /// Kafka mode: SIGKILL one instance once this many leaves were delivered (not restarted).
    pub kill_instance_at: Option<usize>,
    /// Kafka mode: stop the drill's broker once this many leaves were delivered, restart it after `broker_down_ms`.
    pub restart_broker_at: Option<usize>,
    /// How long the broker stays down, in ms.
    pub broker_down_ms: u64,
}

impl Faults {
    /// The default mix of `--faults`: flaky, slow and down receivers and a hub SIGKILL at a third of the leaves.
    pub fn default_mix(receivers: usize) -> Faults {
        let each = (receivers / 5).max(1);
        Faults {
            flaky_receivers: each,
            flaky_failures: 2,
            slow_receivers: each,
            slow_ms: 20,
            down_receivers: each,
            down_ms: 1500,
            kill_hub_at: None, // set from the expected leaves
            kill_instance_at: None,
            restart_broker_at: None,
            broker_down_ms: 1500,
        }
    }

    /// Whether any fault is on.
    pub fn any(&self) -> bool {
        self.flaky_receivers + self.slow_receivers + self.down_receivers > 0
            || self.kill_hub_at.is_some()
            || self.kill_instance_at.is_some()
            || self.restart_broker_at.is_some()
    }
}

/// A drill's parameters.
#[derive(Debug, Clone)]
pub struct DrillConfig {
    /// The forest.
    pub forest: ForestParams,
    /// Share of receivers that poll (RFC 8936) instead of being pushed to.
    pub poll_share: f64,
    /// Revocations to perform.
    pub scenario: Scenario,
    /// Faults.
    pub faults: Faults,
    /// With `--faults`: kill the hub at a third of the expected leaves (in Kafka mode: kill an instance at a
    /// third and restart the drill's broker at two thirds).
    pub kill_hub_default: bool,
    /// Longest wait for the leaves of one revocation.
    pub timeout: Duration,
    /// Concurrent IdP and touch requests during setup.
    pub concurrency: usize,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Prefix of ids (sessions, users, txns, audiences), unique per run on one hub.
    pub run_id: String,
    /// Self-test of the accounting: receiver 0 acknowledges but does not record its first this-many leaves.
    pub drop_deliveries: usize,
    /// Self-test of the accounting: this many leaves are left out of the expectation.
    pub forget_expected: usize,
}

/// The hub a drill runs against.
#[derive(Debug)]
pub struct HubTarget<'a> {
    /// Base URL (issuer).
    pub url: String,
    /// Admin bearer token.
    pub admin_token: String,
    /// The spawned hub, when the drill started it (needed for SIGKILL).
    pub spawned: Option<&'a mut SpawnedHub>,
    /// The Kafka-mode instances, when the drill started them (`url` is their balancer).
    pub cluster: Option<&'a mut KafkaCluster>,
}

/// One revocation phase's figures.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    /// `mid`, `user` or `roots`.
    pub name: String,
    /// Its cascade's `txn`.
    pub txn: String,
    /// Leaves expected.
    pub expected_leaves: usize,
    /// The hub's cascade report: ingest to last acknowledgement.
    pub hub_cascade_ms: Option<f64>,
    /// Leaves the hub planned.
    pub hub_total: Option<u64>,
    /// Time from the first revocation post to the last expected leaf's delivery, on the drill's clock.
    pub wall_ms: f64,
}

/// Everything a drill found.
#[derive(Debug, Clone, Serialize)]
pub struct DrillReport {
    /// The exactness accounting.
    pub outcome: Outcome,
    /// The hub-reported cascade time of the largest phase (every root).
    pub cascade_ms: Option<f64>,
    /// Delivered leaves per second over the revocation phases.
    pub sets_per_second: f64,
    /// Faults injected.
    pub faults: Faults,
    /// Hub restarts after SIGKILL.
    pub hub_kills: usize,
    /// Kafka mode: instances SIGKILLed (not restarted).
    pub instance_kills: usize,
    /// Kafka mode: leaves delivered when the instance was killed.
    pub instance_killed_after: Option<usize>,
    /// Kafka mode: leaves delivered when the broker was stopped.
    pub broker_stopped_after: Option<usize>,
    /// Kafka mode: broker restarts.
    pub broker_restarts: usize,
    /// Kafka mode: instances started, and requests the balancer sent to each.
    pub instances: Option<Vec<u64>>,
    /// Per phase.
    pub phases: Vec<PhaseReport>,
    /// Sessions, receivers (push, poll), touches.
    pub sessions: usize,
    /// Receivers.
    pub receivers: usize,
    /// Of which poll receivers.
    pub poll_receivers: usize,
    /// Session → receiver touches reported.
    pub touches: usize,
    /// Setup (receivers, establish, touch) in ms.
    pub setup_ms: f64,
    /// Every delivered leaf's latency, for the plot.
    #[serde(skip)]
    pub latencies: Vec<f64>,
}

impl DrillReport {
    /// The `--json` document.
    pub fn to_json(&self) -> Value {
        let o = &self.outcome;
        json!({
            "expected_leaves": o.expected_leaves,
            "delivered_leaves": o.delivered_leaves,
            "lost_leaves": o.lost_leaves,
            "unexpected_leaves": o.unexpected_leaves,
            "duplicate_deliveries": o.duplicate_deliveries,
            "retried_jtis": o.retried_jtis,
            "wrong_txn": o.wrong_txn,
            "latency_ms": o.latency_ms,
            "cascade_ms": self.cascade_ms,
            "sets_per_second": self.sets_per_second,
            "faults": {
                "flaky_receivers": self.faults.flaky_receivers,
                "flaky_failures": self.faults.flaky_failures,
                "slow_receivers": self.faults.slow_receivers,
                "slow_ms": self.faults.slow_ms,
                "down_receivers": self.faults.down_receivers,
                "down_ms": self.faults.down_ms,
                "hub_kill_at": self.faults.kill_hub_at,
                "hub_kills": self.hub_kills,
                "instance_kill_at": self.faults.kill_instance_at,
                "instance_kills": self.instance_kills,
                "instance_killed_after_leaves": self.instance_killed_after,
                "broker_stopped_after_leaves": self.broker_stopped_after,
                "broker_restart_at": self.faults.restart_broker_at,
                "broker_down_ms": self.faults.broker_down_ms,
                "broker_restarts": self.broker_restarts,
            },
            "instances": self.instances.as_ref().map(Vec::len),
            "requests_per_instance": self.instances,
            "sessions": self.sessions,
            "receivers": self.receivers,
            "poll_receivers": self.poll_receivers,
            "touches": self.touches,
            "setup_ms": self.setup_ms,
            "phases": self.phases,
            "lost_sample": o.lost_sample,
            "unexpected_sample": o.unexpected_sample,
        })
    }
}

/// The IdP issuer of a run.
fn idp_issuer(run: &str) -> String {
    format!("https://idp.drill.example/{run}")
}

/// What one receiver's handler needs.
struct HandlerCtx {
    receiver: usize,
    epoch: Instant,
    accounting: Arc<Mutex<Accounting>>,
    flaky_failures: u32,
    failures: Mutex<HashMap<String, u32>>,
    slow: Duration,
    down: AtomicBool,
    drop_remaining: Mutex<usize>,
}

impl HandlerCtx {
    async fn handle(&self, event: ReceivedEvent) -> Result<(), HandlerError> {
        if event.event_type() != event_type::SESSION_REVOKED {
            return Ok(());
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(HandlerError::new("receiver down"));
        }
        if self.flaky_failures > 0 {
            let mut failures = self.failures.lock().map_err(|_| HandlerError::new("poisoned"))?;
            let count = failures.entry(event.jti().to_owned()).or_insert(0);
            if *count < self.flaky_failures {
                *count += 1;
                return Err(HandlerError::new("flaky receiver: try again"));
            }
        }
        if !self.slow.is_zero() {
            tokio::time::sleep(self.slow).await;
        }
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
        self.accounting.lock().map_err(|_| HandlerError::new("poisoned"))?.record(delivery);
        Ok(())
    }
}

/// The `jti` of a compact SET, read without verification (for counting only).
fn jti_of(token: &[u8]) -> Option<String> {
    use base64::Engine;
    let text = std::str::from_utf8(token).ok()?.trim();
    let payload = text.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims["jti"].as_str().map(str::to_owned)
}

/// Wraps a push router to count SETs arriving again after their `jti` was
/// answered 2xx (the SDK answers such copies without calling the handler).
fn count_retries(router: axum::Router, accounting: Arc<Mutex<Accounting>>) -> axum::Router {
    let acknowledged: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    router.layer(axum::middleware::from_fn(move |request: axum::extract::Request, next: axum::middleware::Next| {
        let (accounting, acknowledged) = (Arc::clone(&accounting), Arc::clone(&acknowledged));
        async move {
            let (parts, body) = request.into_parts();
            let bytes = match axum::body::to_bytes(body, 1024 * 1024).await {
                Ok(bytes) => bytes,
                Err(_) => return axum::http::StatusCode::BAD_REQUEST.into_response(),
            };
            let jti = jti_of(&bytes);
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

/// A running push listener that can be stopped and restarted on its port.
struct PushServer {
    addr: SocketAddr,
    router: axum::Router,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl PushServer {
    async fn start(addr: SocketAddr, router: axum::Router) -> anyhow::Result<PushServer> {
        let mut server = PushServer { addr, router, stop: None };
        server.listen().await?;
        Ok(server)
    }

    async fn listen(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(error) if Instant::now() < deadline => {
                    tracing::debug!(%error, addr = %self.addr, "rebinding");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => return Err(error).context("binding a push receiver"),
            }
        };
        self.addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let router = self.router.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(error) = axum::serve(listener, router).with_graceful_shutdown(shutdown).await {
                tracing::warn!(%error, "push receiver stopped");
            }
        });
        self.stop = Some(stop);
        Ok(())
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// One relying party of the drill.
struct DrillReceiver {
    sdk: Receiver,
    stream_id: String,
    ctx: Arc<HandlerCtx>,
    push: Option<PushServer>,
}

/// The simulated IdP.
struct Idp {
    issuer: String,
    hub: String,
    key: SigningKey,
    client: reqwest::Client,
}

impl Idp {
    /// Posts one signed SET to `/ingest`, retrying while the hub is unavailable.
    async fn ingest(&self, sub_id: SubjectId, event: Event, txn: &str) -> anyhow::Result<()> {
        let token = SecurityEventToken::new(self.issuer.as_str(), self.hub.as_str(), sub_id, event)
            .with_txn(txn)
            .sign(&self.key)
            .context("signing an IdP SET")?;
        let url = format!("{}/ingest", self.hub);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let sent = self
                .client
                .post(&url)
                .header("content-type", "application/secevent+jwt")
                .body(token.clone())
                .timeout(Duration::from_secs(30))
                .send()
                .await;
            match sent {
                Ok(response) if response.status().as_u16() == 202 => return Ok(()),
                Ok(response) if response.status().is_server_error() && attempt < 50 => {}
                Ok(response) => {
                    let status = response.status();
                    anyhow::bail!("ingest answered {status}: {}", response.text().await.unwrap_or_default())
                }
                Err(error) if attempt < 50 => tracing::debug!(%error, "ingest failed; retrying"),
                Err(error) => return Err(error).context("ingest"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn admin_post(
    client: &reqwest::Client,
    target: &HubTarget<'_>,
    path: &str,
    body: Value,
) -> anyhow::Result<Value> {
    let response = client
        .post(format!("{}{path}", target.url))
        .bearer_auth(&target.admin_token)
        .json(&body)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .with_context(|| format!("POST {path}"))?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    anyhow::ensure!(status.is_success(), "POST {path}: {status}: {text}");
    serde_json::from_str(&text).with_context(|| format!("POST {path}: not JSON"))
}

fn authority(kind: AuthorityKind) -> Authority {
    match kind {
        AuthorityKind::Delegated => Authority::Delegated,
        AuthorityKind::Bounded => Authority::Bounded,
        AuthorityKind::Autonomous => Authority::Autonomous,
    }
}

/// A revocation the drill performs.
struct Phase {
    name: &'static str,
    txn: String,
    action: PhaseAction,
    leaves: BTreeSet<LeafKey>,
}

enum PhaseAction {
    Sessions(Vec<String>),
    User(String),
}

fn plan_phases(forest: &Forest, scenario: Scenario, run: &str) -> Vec<Phase> {
    let mut revoked = BTreeSet::new();
    let mut phases = Vec::new();
    if matches!(scenario, Scenario::Mid | Scenario::All)
        && let Some(mid) = forest.mid_session()
    {
        let leaves = expected_leaves(forest, &[mid], &mut revoked);
        let action = PhaseAction::Sessions(vec![forest.sessions[mid].id.clone()]);
        phases.push(Phase { name: "mid", txn: format!("{run}-mid"), action, leaves });
    }
    if matches!(scenario, Scenario::User | Scenario::All) {
        // The user of the last tree: with several trees, the roots phase still has others to revoke.
        let user = forest.roots.last().map_or(0, |&r| forest.sessions[r].user);
        let roots = forest.roots_of_user(user);
        let leaves = expected_leaves(forest, &roots, &mut revoked);
        let action = PhaseAction::User(user_email(run, user));
        phases.push(Phase { name: "user", txn: format!("{run}-user"), action, leaves });
    }
    let leaves = expected_leaves(forest, &forest.roots, &mut revoked);
    let roots = forest.roots.iter().map(|&r| forest.sessions[r].id.clone()).collect();
    phases.push(Phase { name: "roots", txn: format!("{run}-roots"), action: PhaseAction::Sessions(roots), leaves });
    phases
}

fn progress_bar(enabled: bool) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(0),
        if enabled { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() },
    );
    let style = ProgressStyle::with_template("{spinner} {elapsed:>4} {msg:<28} [{bar:40}] {pos}/{len}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Runs one drill against `target`.
///
/// # Errors
///
/// Setup failures (the hub refusing registrations, receivers that cannot
/// start or verify their streams). Lost or unexpected leaves are not errors:
/// they are in the report.
pub async fn run(config: &DrillConfig, mut target: HubTarget<'_>) -> anyhow::Result<DrillReport> {
    let epoch = Instant::now();
    let now_ms = || epoch.elapsed().as_secs_f64() * 1000.0;
    let run = config.run_id.as_str();
    let forest = Forest::build(&config.forest, run);
    let mut phases = plan_phases(&forest, config.scenario, run);
    if let Some(last) = phases.last_mut() {
        for _ in 0..config.forget_expected {
            if let Some(leaf) = last.leaves.iter().next_back().cloned() {
                last.leaves.remove(&leaf);
            }
        }
    }
    let total_expected: usize = phases.iter().map(|p| p.leaves.len()).sum();
    let mut faults = config.faults.clone();
    if config.kill_hub_default && faults.kill_hub_at.is_none() && target.spawned.is_some() {
        faults.kill_hub_at = Some((total_expected / 3).max(1));
    }
    if faults.kill_hub_at.is_some() && target.spawned.is_none() {
        tracing::warn!("--kill-hub-at needs a hub the drill started (not in Kafka mode); ignored");
        faults.kill_hub_at = None;
    }
    if let Some(cluster) = target.cluster.as_deref() {
        if config.kill_hub_default && faults.kill_instance_at.is_none() && cluster.instances() >= 2 {
            faults.kill_instance_at = Some((total_expected / 3).max(1));
        }
        if config.kill_hub_default && faults.restart_broker_at.is_none() && cluster.owns_broker() {
            faults.restart_broker_at = Some((total_expected * 2 / 3).max(1));
        }
        anyhow::ensure!(
            faults.kill_instance_at.is_none() || cluster.live_instances() >= 2,
            "the instance-kill fault needs at least 2 live instances (--hubs)"
        );
        anyhow::ensure!(
            faults.restart_broker_at.is_none() || cluster.owns_broker(),
            "the broker-restart fault needs the drill's own broker (--kafka tansu)"
        );
    } else {
        anyhow::ensure!(
            faults.kill_instance_at.is_none() && faults.restart_broker_at.is_none(),
            "instance-kill and broker-restart faults need Kafka mode (--kafka)"
        );
    }
    let bar = progress_bar(config.progress);
    let client = reqwest::Client::builder().pool_max_idle_per_host(64).build().context("HTTP client")?;

    // The IdP.
    let key = SigningKey::generate(Algorithm::Es256).context("IdP key")?;
    let idp = Arc::new(Idp { issuer: idp_issuer(run), hub: target.url.clone(), key, client: client.clone() });
    let jwks = Jwks::from_keys([&idp.key]).to_json();
    admin_post(&client, &target, "/admin/issuers", json!({"issuer": idp.issuer, "jwks": jwks})).await?;

    // The receivers.
    let receivers_n = forest.receivers;
    let poll_n = ((receivers_n as f64) * config.poll_share.clamp(0.0, 1.0)).round() as usize;
    let push_n = receivers_n - poll_n;
    let accounting = Arc::new(Mutex::new(Accounting::new()));
    let (stop_polls, polls_stopped) = watch::channel(false);
    bar.set_message("starting receivers");
    bar.set_length(receivers_n as u64);
    let mut receivers: Vec<DrillReceiver> = Vec::with_capacity(receivers_n);
    let mut poll_tasks = JoinSet::new();
    for index in 0..receivers_n {
        let is_push = index < push_n;
        // Push receivers carry the faults: flaky first, then slow, then down.
        let flaky = is_push && index < faults.flaky_receivers;
        let slow = is_push && !flaky && index < faults.flaky_receivers + faults.slow_receivers;
        let audience = format!("https://rp{index}.{run}.drill.example");
        let created = admin_post(
            &client,
            &target,
            "/admin/receivers",
            json!({"name": format!("drill {run} rp{index}"), "audience": audience}),
        )
        .await?;
        let token = created["token"].as_str().context("receiver token")?.to_owned();
        let sdk = Receiver::discover(&target.url, audience, token).await.context("discovering the hub")?;
        let ctx = Arc::new(HandlerCtx {
            receiver: index,
            epoch,
            accounting: Arc::clone(&accounting),
            flaky_failures: if flaky { faults.flaky_failures } else { 0 },
            failures: Mutex::new(HashMap::new()),
            slow: if slow { Duration::from_millis(faults.slow_ms) } else { Duration::ZERO },
            down: AtomicBool::new(false),
            drop_remaining: Mutex::new(if index == 0 { config.drop_deliveries } else { 0 }),
        });
        let handler = {
            let ctx = Arc::clone(&ctx);
            move |event: ReceivedEvent| {
                let ctx = Arc::clone(&ctx);
                async move { ctx.handle(event).await }
            }
        };
        let request_events = [event_type::SESSION_REVOKED];
        let (stream, push) = if is_push {
            let secret = format!("Bearer drill-{run}-{index}");
            let router = count_retries(sdk.push_router(Some(secret.clone()), handler), Arc::clone(&accounting));
            let server = PushServer::start("127.0.0.1:0".parse()?, router).await?;
            let url = format!("http://{}/", server.addr);
            let stream = sdk.create_stream(&StreamRequest::push(url, Some(secret)).events(request_events)).await?;
            (stream, Some(server))
        } else {
            let stream = sdk.create_stream(&StreamRequest::poll().events(request_events)).await?;
            let poll = sdk
                .poll_loop(&stream, handler)?
                .with_backoff(Duration::from_millis(50), Duration::from_millis(500))
                .with_request_timeout(Duration::from_secs(20));
            let mut stopped = polls_stopped.clone();
            poll_tasks.spawn(async move {
                let shutdown = async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                };
                if let Err(error) = poll.run(shutdown).await {
                    tracing::warn!(%error, "poll loop ended");
                }
            });
            (stream, None)
        };
        sdk.verify_stream(&stream.stream_id, Duration::from_secs(20)).await.context("verifying a stream")?;
        receivers.push(DrillReceiver { sdk, stream_id: stream.stream_id, ctx, push });
        bar.inc(1);
    }
    let receivers = Arc::new(receivers);

    // Establish the forest, level by level (parents first).
    bar.set_message("establishing sessions");
    bar.set_position(0);
    bar.set_length(forest.sessions.len() as u64);
    let permits = Arc::new(Semaphore::new(config.concurrency.max(1)));
    for level in forest.levels() {
        let mut tasks = JoinSet::new();
        for index in level {
            let session = &forest.sessions[index];
            let event = SessionEstablished {
                parent_session: session.parent.map(|p| SubjectId::opaque(forest.sessions[p].id.clone())),
                authority: Some(authority(session.authority)),
                ..SessionEstablished::default()
            };
            let subject = SubjectId::session_of(
                SubjectId::opaque(session.id.clone()),
                Some(SubjectId::email(user_email(run, session.user))),
            );
            let txn = format!("est-{}", session.id);
            let (idp, permits, bar) = (Arc::clone(&idp), Arc::clone(&permits), bar.clone());
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await?;
                idp.ingest(subject, Event::SessionEstablished(event), &txn).await?;
                bar.inc(1);
                anyhow::Ok(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
    }

    // Receivers report their touches.
    bar.set_message("touching");
    bar.set_position(0);
    bar.set_length(forest.touch_count() as u64);
    let mut tasks = JoinSet::new();
    for session in &forest.sessions {
        for &r in &session.touches {
            let (receivers, permits, bar, id) =
                (Arc::clone(&receivers), Arc::clone(&permits), bar.clone(), session.id.clone());
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await?;
                let receiver = &receivers[r];
                receiver.sdk.touch(&receiver.stream_id, &id).await?;
                bar.inc(1);
                anyhow::Ok(())
            });
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let setup_ms = now_ms();
    let mut receivers = Arc::try_unwrap(receivers).map_err(|_| anyhow::anyhow!("receivers still shared"))?;

    // Revocations.
    let down_set: Vec<usize> = (0..push_n)
        .filter(|&i| {
            i >= faults.flaky_receivers + faults.slow_receivers
                && i < faults.flaky_receivers + faults.slow_receivers + faults.down_receivers
        })
        .collect();
    let mut phase_reports = Vec::new();
    let mut killed = false;
    let mut hub_kills = 0;
    let (mut instance_kills, mut broker_restarts) = (0, 0);
    let (mut instance_killed_after, mut broker_stopped_after) = (None, None);
    for (phase_index, phase) in phases.iter().enumerate() {
        bar.set_message(format!("revoking: {} ({})", phase.name, phase.txn));
        let before = accounting.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.delivered_count();
        bar.set_length((before + phase.leaves.len()) as u64);
        bar.set_position(before as u64);
        if phase_index == 0 && !down_set.is_empty() {
            for &i in &down_set {
                receivers[i].ctx.down.store(true, Ordering::SeqCst);
                if let Some(server) = receivers[i].push.as_mut() {
                    server.shutdown();
                }
            }
            tracing::info!(receivers = ?down_set, ms = faults.down_ms, "receivers down");
        }
        let started = now_ms();
        accounting.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.expect(
            phase.txn.clone(),
            started,
            phase.leaves.iter().cloned(),
        );
        match &phase.action {
            PhaseAction::Sessions(ids) => {
                let mut tasks = JoinSet::new();
                for id in ids {
                    let (idp, permits, txn) = (Arc::clone(&idp), Arc::clone(&permits), phase.txn.clone());
                    let subject = SubjectId::session_of(SubjectId::opaque(id.clone()), None);
                    tasks.spawn(async move {
                        let _permit = permits.acquire_owned().await?;
                        idp.ingest(subject, Event::SessionRevoked(SessionRevoked::default()), &txn).await
                    });
                }
                while let Some(done) = tasks.join_next().await {
                    done??;
                }
            }
            PhaseAction::User(email) => {
                let event = Event::AccountDisabled(AccountDisabled {
                    reason: Some("hijacking".into()),
                    ..AccountDisabled::default()
                });
                idp.ingest(SubjectId::email(email.clone()), event, &phase.txn).await?;
            }
        }
        // Wait for every leaf, injecting the timed faults.
        let deadline = Instant::now() + config.timeout;
        let back_up_at = Instant::now() + Duration::from_millis(faults.down_ms);
        let mut down_pending = phase_index == 0 && !down_set.is_empty();
        let target_count = before + phase.leaves.len();
        loop {
            let delivered = accounting.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.delivered_count();
            bar.set_position(delivered as u64);
            if down_pending && Instant::now() >= back_up_at {
                for &i in &down_set {
                    if let Some(server) = receivers[i].push.as_mut() {
                        server.listen().await?;
                    }
                    receivers[i].ctx.down.store(false, Ordering::SeqCst);
                }
                tracing::info!(receivers = ?down_set, "receivers back up");
                down_pending = false;
            }
            if !killed
                && let (Some(at), Some(hub)) = (faults.kill_hub_at, target.spawned.as_deref_mut())
                && delivered >= at
            {
                bar.set_message("hub SIGKILLed, restarting");
                let took = hub.kill_and_restart().await?;
                tracing::info!(after_leaves = delivered, restart_ms = took.as_millis() as u64, "hub restarted");
                bar.set_message(format!("revoking: {} ({})", phase.name, phase.txn));
                killed = true;
                hub_kills += 1;
            }
            if instance_kills == 0
                && let (Some(at), Some(cluster)) = (faults.kill_instance_at, target.cluster.as_deref_mut())
                && delivered >= at
            {
                // The last instance: the balancer's round robin spreads the rest over the others.
                let victim = cluster.instances() - 1;
                cluster.kill_instance(victim)?;
                tracing::info!(after_leaves = delivered, victim, "instance SIGKILLed");
                instance_kills += 1;
                instance_killed_after = Some(delivered);
            }
            if broker_restarts == 0
                && let (Some(at), Some(cluster)) = (faults.restart_broker_at, target.cluster.as_deref_mut())
                && delivered >= at
            {
                bar.set_message("broker restarting");
                broker_stopped_after = Some(delivered);
                let took = cluster.restart_broker(Duration::from_millis(faults.broker_down_ms)).await?;
                tracing::info!(after_leaves = delivered, restart_ms = took.as_millis() as u64, "broker restarted");
                bar.set_message(format!("revoking: {} ({})", phase.name, phase.txn));
                broker_restarts += 1;
            }
            if delivered >= target_count && !down_pending {
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!(phase = phase.name, delivered, expected = target_count, "timed out waiting for leaves");
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let wall_ms = now_ms() - started;
        // The hub's own view of the cascade.
        let report = cascade_report(&client, &target, &phase.txn).await;
        phase_reports.push(PhaseReport {
            name: phase.name.to_owned(),
            txn: phase.txn.clone(),
            expected_leaves: phase.leaves.len(),
            hub_cascade_ms: report.as_ref().and_then(|r| r["cascade_ms"].as_f64()),
            hub_total: report.as_ref().and_then(|r| r["total"].as_u64()),
            wall_ms,
        });
    }
    // Let stragglers (unexpected or duplicate deliveries) arrive.
    bar.set_message("settling");
    tokio::time::sleep(Duration::from_millis(300)).await;
    bar.finish_and_clear();

    let _ = stop_polls.send(true);
    for receiver in &mut receivers {
        if let Some(server) = receiver.push.as_mut() {
            server.shutdown();
        }
    }
    let _ =
        tokio::time::timeout(Duration::from_secs(5), async { while poll_tasks.join_next().await.is_some() {} }).await;

    let accounting = accounting.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    let outcome = accounting.outcome();
    let latencies = accounting.latencies();
    let revocation_ms = latencies_span(&phase_reports);
    let sets_per_second =
        if revocation_ms > 0.0 { outcome.delivered_leaves as f64 / (revocation_ms / 1000.0) } else { 0.0 };
    let cascade_ms = phase_reports.last().and_then(|p| p.hub_cascade_ms);
    Ok(DrillReport {
        outcome,
        cascade_ms,
        sets_per_second,
        faults,
        hub_kills,
        instance_kills,
        instance_killed_after,
        broker_stopped_after,
        broker_restarts,
        instances: target.cluster.as_deref().map(KafkaCluster::requests_per_instance),
        phases: phase_reports,
        sessions: forest.sessions.len(),
        receivers: receivers_n,
        poll_receivers: poll_n,
        touches: forest.touch_count(),
        setup_ms,
        latencies,
    })
}

/// Total wall time of the revocation phases.
fn latencies_span(phases: &[PhaseReport]) -> f64 {
    phases.iter().map(|p| p.wall_ms).sum()
}

/// `GET /admin/cascades/{txn}`, waiting briefly for the hub to see it complete.
async fn cascade_report(client: &reqwest::Client, target: &HubTarget<'_>, txn: &str) -> Option<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = None;
    while Instant::now() < deadline {
        let response = client
            .get(format!("{}/admin/cascades/{txn}", target.url))
            .bearer_auth(&target.admin_token)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        if let Ok(response) = response
            && response.status().is_success()
            && let Ok(report) = response.json::<Value>().await
        {
            if report["complete"] == true {
                return Some(report);
            }
            last = Some(report);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    last
}
