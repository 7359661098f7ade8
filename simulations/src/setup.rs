//! A drill's set-up: the simulated IdP, the relying parties (receivers
//! with their streams, guards and services), the forest established, and
//! the touches (reported by the guards as the agents make their first
//! calls, or by the drill itself without guards).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use caep_receiver::guard::EnforceLayer;
use caep_receiver::revocations::ENFORCED_EVENTS;
use caep_receiver::{ReceivedEvent, Receiver, Revocations, StreamRequest};
use caep_schemas::event::{Authority, Event, SessionEstablished, event_type};
use caep_schemas::jose::{Jwks, SigningKey};
use caep_schemas::set::SecurityEventToken;
use caep_schemas::subject::SubjectId;
use indicatif::ProgressBar;
use serde_json::Value;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::accounting::Accounting;
use crate::agents::{Agents, Target, TokenClaims, mint};
use crate::drill::Faults;
use crate::forest::{AuthorityKind, Forest, LeafKey, user_email};
use crate::guards::{Authentication, Guarding, RpGuard, Sidecar, SidecarSpec, front_app, layer_app, relay_app};
use crate::receivers::{LoopbackServer, ReceiverCtx, ReceiverFaults, count_retries};

/// The hub's admin API, as the drill uses it.
pub struct Admin {
    /// The HTTP client.
    pub client: reqwest::Client,
    /// The hub's base URL.
    pub url: String,
    /// The admin bearer token.
    pub token: String,
}

impl Admin {
    /// `POST {path}` with a JSON body; the JSON answer.
    ///
    /// # Errors
    ///
    /// When the hub cannot be reached or answers non-2xx.
    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let response = self
            .client
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
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

    /// `GET {path}`: the JSON answer, or `None` on any failure.
    pub async fn get(&self, path: &str) -> Option<Value> {
        let response = self
            .client
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.json().await.ok()
    }
}

/// The simulated IdP.
pub struct Idp {
    /// Its issuer.
    pub issuer: String,
    hub: String,
    key: SigningKey,
    client: reqwest::Client,
}

impl Idp {
    /// An IdP of `issuer` posting to `hub`.
    pub fn new(issuer: String, hub: String, key: SigningKey, client: reqwest::Client) -> Idp {
        Idp { issuer, hub, key, client }
    }

    /// Its public keys.
    pub fn jwks(&self) -> Jwks {
        Jwks::from_keys([&self.key])
    }

    /// Posts one signed SET to `/ingest`, retrying while the hub is unavailable.
    ///
    /// # Errors
    ///
    /// When the hub refuses it, or stays unreachable.
    pub async fn ingest(&self, sub_id: SubjectId, event: Event, txn: &str) -> anyhow::Result<()> {
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

/// One relying party of the drill.
pub struct DrillReceiver {
    /// Its SDK receiver (not for sidecar RPs: the sidecar is the receiver).
    pub sdk: Option<Arc<Receiver>>,
    /// Its stream at the hub.
    pub stream_id: String,
    /// Its faults and recording.
    pub ctx: Arc<ReceiverCtx>,
    /// Where the hub pushes to (the SDK's push router, or the sidecar's relay).
    pub push: Option<LoopbackServer>,
    /// Its guard, if guarded.
    pub guard: Option<RpGuard>,
    /// Its audience.
    pub audience: String,
    /// The service the agents call, if guarded.
    pub resource_url: Option<String>,
    /// The layer's revocation store (layer RPs).
    pub revocations: Option<Arc<Revocations>>,
    /// Kept to serve and to stop with the receiver.
    _app: Option<LoopbackServer>,
    _sidecar: Option<Sidecar>,
}

/// What the relying parties are started with.
pub struct ReceiverPlan<'a> {
    /// The hub.
    pub admin: &'a Admin,
    /// The run id (prefix of names and audiences).
    pub run: &'a str,
    /// The drill's clock.
    pub epoch: Instant,
    /// Where deliveries are recorded.
    pub accounting: &'a Arc<Mutex<Accounting>>,
    /// The receivers' faults.
    pub faults: &'a Faults,
    /// Share of poll receivers.
    pub poll_share: f64,
    /// Self-test: receiver 0 drops its first this-many leaves.
    pub drop_deliveries: usize,
    /// Which guards.
    pub guarding: Guarding,
    /// The `caep-guard` binary, when sidecars are used.
    pub guard_bin: Option<&'a Path>,
    /// The IdP whose tokens the RPs accept.
    pub idp: &'a Idp,
    /// Self-test: receiver 0's layer is not fed its SETs.
    pub blind_receiver: bool,
    /// Where the RPs' services run (see [`crate::agents::TrafficRuntime`]).
    pub traffic: tokio::runtime::Handle,
}

/// The relying parties, and the poll loops that feed some of them.
pub struct Receivers {
    /// In index order.
    pub list: Vec<DrillReceiver>,
    /// How many are pushed to (the first ones).
    pub push_n: usize,
    polls: JoinSet<()>,
    stop_polls: watch::Sender<bool>,
}

impl Receivers {
    /// How many poll.
    pub fn poll_n(&self) -> usize {
        self.list.len() - self.push_n
    }

    /// How many use each guard: (layer, sidecar).
    pub fn guards(&self) -> (usize, usize) {
        let count = |kind| self.list.iter().filter(|r| r.guard == Some(kind)).count();
        (count(RpGuard::Layer), count(RpGuard::Sidecar))
    }

    /// Stops the poll loops and push listeners; sidecars end with the list.
    pub async fn shutdown(&mut self) {
        let _ = self.stop_polls.send(true);
        for receiver in &mut self.list {
            if let Some(server) = receiver.push.as_mut() {
                server.shutdown();
            }
        }
        let polls = &mut self.polls;
        let _ =
            tokio::time::timeout(Duration::from_secs(5), async { while polls.join_next().await.is_some() {} }).await;
    }
}

/// Starts `count` relying parties, each with a verified stream.
///
/// # Errors
///
/// When the hub refuses a receiver or stream, or a sidecar does not start.
pub async fn start_receivers(plan: &ReceiverPlan<'_>, count: usize, bar: &ProgressBar) -> anyhow::Result<Receivers> {
    let poll_n = ((count as f64) * plan.poll_share.clamp(0.0, 1.0)).round() as usize;
    let push_n = count - poll_n;
    let (stop_polls, _) = watch::channel(false);
    let mut receivers = Receivers { list: Vec::with_capacity(count), push_n, polls: JoinSet::new(), stop_polls };
    bar.set_message("starting receivers");
    bar.set_length(count as u64);
    for index in 0..count {
        let receiver = start_one(plan, index, index < push_n, &mut receivers).await?;
        receivers.list.push(receiver);
        bar.inc(1);
    }
    Ok(receivers)
}

async fn start_one(
    plan: &ReceiverPlan<'_>,
    index: usize,
    is_push: bool,
    receivers: &mut Receivers,
) -> anyhow::Result<DrillReceiver> {
    let run = plan.run;
    let faults = plan.faults;
    // Push receivers carry the faults: flaky first, then slow, then down.
    let flaky = is_push && index < faults.flaky_receivers;
    let slow = is_push && !flaky && index < faults.flaky_receivers + faults.slow_receivers;
    let audience = format!("https://rp{index}.{run}.drill.example");
    // Bound to the drill's IdP: it hears of no other IdP's sessions, so an
    // earlier drill's IdP still trusted by the hub adds no work to its touches.
    let body = serde_json::json!({
        "name": format!("drill {run} rp{index}"),
        "audience": audience,
        "issuers": [plan.idp.issuer],
    });
    let created = plan.admin.post("/admin/receivers", body).await?;
    let token = created["token"].as_str().context("receiver token")?.to_owned();
    let ctx = Arc::new(ReceiverCtx::new(
        index,
        plan.epoch,
        Arc::clone(plan.accounting),
        ReceiverFaults {
            flaky_failures: if flaky { faults.flaky_failures } else { 0 },
            slow: if slow { Duration::from_millis(faults.slow_ms) } else { Duration::ZERO },
            drop_deliveries: if index == 0 { plan.drop_deliveries } else { 0 },
        },
    ));
    let guard = plan.guarding.for_receiver(index, is_push);
    anyhow::ensure!(
        !(index == 0 && plan.blind_receiver && guard != Some(RpGuard::Layer)),
        "--self-test-blind needs receiver 0 on the layer"
    );
    let authentication = Authentication::new(plan.idp.jwks(), &plan.idp.issuer, &audience);
    if guard == Some(RpGuard::Sidecar) {
        return start_sidecar_rp(plan, ctx, audience, &token, authentication).await;
    }
    let revocations = guard.map(|_| Revocations::in_memory(Duration::from_secs(86_400)));
    let mut sdk = Receiver::discover(&plan.admin.url, audience.as_str(), token).await.context("discovering the hub")?;
    if let Some(revocations) = &revocations {
        if index == 0 && plan.blind_receiver {
            tracing::warn!("self-test: receiver 0's layer is not fed its SETs");
        } else {
            sdk = sdk.with_revocations(Arc::clone(revocations));
        }
    }
    let sdk = Arc::new(sdk);
    let handler = {
        let ctx = Arc::clone(&ctx);
        move |event: ReceivedEvent| {
            let ctx = Arc::clone(&ctx);
            async move { ctx.handle(event).await }
        }
    };
    // A guarded RP asks for what its revocation store acts on.
    let events: &[&str] = if guard.is_some() { &ENFORCED_EVENTS } else { &[event_type::SESSION_REVOKED] };
    let (stream, push) = if is_push {
        let secret = format!("Bearer drill-{run}-{index}");
        let router = count_retries(sdk.push_router(Some(secret.clone()), handler), Arc::clone(plan.accounting));
        let server = LoopbackServer::start(router).await?;
        let url = format!("http://{}/", server.addr);
        let request = StreamRequest::push(url, Some(secret)).events(events.iter().copied());
        (sdk.create_stream(&request).await?, Some(server))
    } else {
        let stream = sdk.create_stream(&StreamRequest::poll().events(events.iter().copied())).await?;
        let poll = sdk
            .poll_loop(&stream, handler)?
            .with_backoff(Duration::from_millis(50), Duration::from_millis(500))
            .with_request_timeout(Duration::from_secs(20));
        let mut stopped = receivers.stop_polls.subscribe();
        receivers.polls.spawn(async move {
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
    let app = match &revocations {
        Some(revocations) => {
            let layer =
                EnforceLayer::new(Arc::clone(revocations)).reporting_touches(Arc::clone(&sdk), &stream.stream_id);
            Some(LoopbackServer::start_on(layer_app(authentication, layer), plan.traffic.clone()).await?)
        }
        None => None,
    };
    Ok(DrillReceiver {
        sdk: Some(sdk),
        stream_id: stream.stream_id,
        ctx,
        push,
        guard,
        audience,
        resource_url: app.as_ref().map(|app| format!("http://{}/resource", app.addr)),
        revocations,
        _app: app,
        _sidecar: None,
    })
}

/// An RP behind a `caep-guard` process: the hub pushes to the drill's relay,
/// which forwards to the sidecar; the RP's front asks the sidecar first.
async fn start_sidecar_rp(
    plan: &ReceiverPlan<'_>,
    ctx: Arc<ReceiverCtx>,
    audience: String,
    token: &str,
    authentication: Arc<Authentication>,
) -> anyhow::Result<DrillReceiver> {
    let bin = plan.guard_bin.context("sidecar RPs need the caep-guard binary (--guard-bin)")?;
    let port = crate::hub::free_port()?;
    let relay = relay_app(Arc::clone(&ctx), format!("http://127.0.0.1:{port}/push"), plan.admin.client.clone());
    let push = LoopbackServer::start(count_retries(relay, Arc::clone(plan.accounting))).await?;
    let push_url = format!("http://{}/", push.addr);
    let spec = SidecarSpec { bin, hub: &plan.admin.url, audience: &audience, token, push_url: &push_url, port };
    let sidecar = Sidecar::start(&spec).await?;
    let front = front_app(authentication, sidecar.check_url.clone(), reqwest::Client::new());
    let app = LoopbackServer::start_on(front, plan.traffic.clone()).await?;
    Ok(DrillReceiver {
        sdk: None,
        stream_id: sidecar.stream_id.clone(),
        ctx,
        push: Some(push),
        guard: Some(RpGuard::Sidecar),
        audience,
        resource_url: Some(format!("http://{}/resource", app.addr)),
        revocations: None,
        _app: Some(app),
        _sidecar: Some(sidecar),
    })
}

fn authority(kind: AuthorityKind) -> Authority {
    match kind {
        AuthorityKind::Delegated => Authority::Delegated,
        AuthorityKind::Bounded => Authority::Bounded,
        AuthorityKind::Autonomous => Authority::Autonomous,
    }
}

/// Establishes the forest, level by level (parents first).
///
/// # Errors
///
/// When the hub refuses an event.
pub async fn establish(
    idp: &Arc<Idp>,
    forest: &Forest,
    run: &str,
    permits: &Arc<Semaphore>,
    bar: &ProgressBar,
) -> anyhow::Result<()> {
    bar.set_message("establishing sessions");
    bar.set_position(0);
    bar.set_length(forest.sessions.len() as u64);
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
            let (idp, permits, bar) = (Arc::clone(idp), Arc::clone(permits), bar.clone());
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
    Ok(())
}

/// Without guards: the drill reports every touch itself.
///
/// # Errors
///
/// When the hub refuses a touch.
pub async fn touch_directly(
    receivers: &Arc<Vec<DrillReceiver>>,
    forest: &Forest,
    permits: &Arc<Semaphore>,
    bar: &ProgressBar,
) -> anyhow::Result<()> {
    bar.set_message("touching");
    bar.set_position(0);
    bar.set_length(forest.touch_count() as u64);
    let mut tasks = JoinSet::new();
    for session in &forest.sessions {
        for &r in &session.touches {
            let (receivers, permits, bar, id) =
                (Arc::clone(receivers), Arc::clone(permits), bar.clone(), session.id.clone());
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await?;
                let receiver = &receivers[r];
                let sdk = receiver.sdk.as_ref().context("an unguarded receiver has an SDK receiver")?;
                sdk.touch(&receiver.stream_id, &id).await?;
                bar.inc(1);
                anyhow::Ok(())
            });
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// One agent per (session, receiver it touches), with its token for that RP.
///
/// # Errors
///
/// When a token cannot be signed or a receiver is not guarded.
pub fn agents_of(
    forest: &Forest,
    receivers: &[DrillReceiver],
    idp: &Idp,
    run: &str,
    epoch: Instant,
    traffic: tokio::runtime::Handle,
) -> anyhow::Result<Agents> {
    let mut targets = Vec::with_capacity(forest.touch_count());
    for session in &forest.sessions {
        let mut actors = Vec::new();
        let mut parent = session.parent;
        while let Some(p) = parent {
            actors.push(forest.sessions[p].id.clone());
            parent = forest.sessions[p].parent;
        }
        let email = user_email(run, session.user);
        for &r in &session.touches {
            let receiver = &receivers[r];
            let url = receiver.resource_url.clone().context("agents call guarded RPs only")?;
            let claims = TokenClaims {
                issuer: &idp.issuer,
                audience: &receiver.audience,
                session: &session.id,
                email: &email,
                actors: &actors,
            };
            let authorization = format!("Bearer {}", mint(&idp.key, &claims)?);
            targets.push(Target { pair: LeafKey { receiver: r, session: session.id.clone() }, url, authorization });
        }
    }
    Ok(Agents::new(targets, epoch, traffic))
}

/// Waits until the hub has recorded every touch of the forest (the guards
/// report them in the background after the agents' first calls).
///
/// # Errors
///
/// When touches are still missing at `deadline`.
pub async fn wait_touched(
    admin: &Admin,
    forest: &Forest,
    receivers: &[DrillReceiver],
    deadline: Instant,
) -> anyhow::Result<()> {
    let expected: BTreeMap<&str, BTreeSet<&str>> = forest
        .sessions
        .iter()
        .map(|s| (s.id.as_str(), s.touches.iter().map(|&r| receivers[r].stream_id.as_str()).collect()))
        .collect();
    let mut missing: BTreeSet<&str> = expected.keys().copied().collect();
    let mut rounds = 0usize;
    loop {
        rounds += 1;
        for &root in &forest.roots {
            let tree = forest.subtree(&[root]);
            if !tree.iter().any(|&i| missing.contains(forest.sessions[i].id.as_str())) {
                continue;
            }
            if let Some(view) = admin.get(&format!("/admin/sessions/{}", forest.sessions[root].id)).await {
                for entry in view["subtree"].as_array().into_iter().flatten() {
                    mark_touched(entry["session_id"].as_str(), &entry["touches"], &expected, &mut missing);
                }
            }
        }
        // In Kafka mode a subtree may live in another partition, and the
        // root's view then lacks its touches: from the second round on, ask
        // for a few of the sessions still missing by themselves.
        let alone: Vec<&str> = if rounds > 1 { missing.iter().take(64).copied().collect() } else { Vec::new() };
        for id in alone {
            if let Some(view) = admin.get(&format!("/admin/sessions/{id}")).await {
                mark_touched(Some(id), &view["touches"], &expected, &mut missing);
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the guards' touches of {} sessions never reached the hub (e.g. {:?})",
            missing.len(),
            missing.iter().take(3).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Marks session `id` touched when `touches` (the hub's view) covers every
/// stream it should.
fn mark_touched<'a>(
    id: Option<&str>,
    touches: &Value,
    expected: &BTreeMap<&'a str, BTreeSet<&'a str>>,
    missing: &mut BTreeSet<&'a str>,
) {
    let Some((&key, want)) = id.and_then(|id| expected.get_key_value(id)) else { return };
    let touched: BTreeSet<&str> =
        touches.as_array().into_iter().flatten().filter_map(|t| t["stream_id"].as_str()).collect();
    if want.is_subset(&touched) {
        missing.remove(key);
    }
}
