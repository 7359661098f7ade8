//! One drill run: real relying parties on loopback guarded by the SDK's
//! layer or a `caep-guard` sidecar, a simulated IdP, the forest established
//! and touched (by the guards, as agents call the RPs), revocations while
//! the agents keep calling, waiting for every leaf and every refusal,
//! faults, and the accounting of leaves and refusals.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use caep_schemas::event::{AccountDisabled, Event, SessionRevoked};
use caep_schemas::jose::{Algorithm, SigningKey};
use caep_schemas::subject::SubjectId;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::accounting::{Accounting, Outcome, Percentiles};
use crate::agents::{Agents, TrafficRuntime};
use crate::cluster::KafkaCluster;
use crate::counters::{Counters, CountersSpent};
use crate::cpu::{CpuSpent, Reading};
use crate::forest::{Forest, ForestParams, LeafKey, expected_leaves, user_email};
use crate::guards::Guarding;
use crate::hub::SpawnedHub;
use crate::refusals::RefusalOutcome;
use crate::setup::{Admin, Idp, ReceiverPlan, agents_of, establish, start_receivers, touch_directly, wait_touched};

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
    /// Which guards protect the RPs (none: the drill reports touches itself and no agent calls).
    pub guarding: Guarding,
    /// The `caep-guard` binary for sidecar RPs.
    pub guard_bin: Option<PathBuf>,
    /// Probe workers of the agents (concurrent calls to the RPs).
    pub probers: usize,
    /// Self-test of the refusal accounting: receiver 0's layer is not fed its SETs (stale accepts follow).
    pub blind_receiver: bool,
    /// Self-test of the refusal accounting: receiver 0 revokes an unaffected session when the first cascade starts.
    pub false_refusal: bool,
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
    /// Revocation post → each leaf's delivery (its RP acknowledged the SET).
    pub delivery_ms: Percentiles,
    /// With guards: revocation post → each revoked agent's first 401 at each RP it touched.
    pub refusal_ms: Option<Percentiles>,
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
    /// Of which establishing the sessions, in ms.
    pub establish_ms: f64,
    /// And then touching them (reported by the drill or by the guards), in ms.
    pub touch_ms: f64,
    /// Every delivered leaf's latency, for the plot.
    #[serde(skip)]
    pub latencies: Vec<f64>,
    /// Which guards protected the RPs.
    pub guarding: Guarding,
    /// RPs guarded by the layer and by a sidecar.
    pub guards: (usize, usize),
    /// With guards: what the agents saw.
    pub refusal: Option<RefusalOutcome>,
    /// With guards: every refused agent's refusal latency, for the plot.
    #[serde(skip)]
    pub refusal_latencies: Vec<f64>,
    /// CPU of the processes the drill started while sessions were
    /// established and touched (per operation: per establish or touch).
    pub cpu_setup: CpuSpent,
    /// The same over the revocations (per operation: per delivered leaf).
    pub cpu_revocations: CpuSpent,
    /// Broker requests and signed leaves while sessions were established and touched.
    pub counters_setup: CountersSpent,
    /// The same over the revocations.
    pub counters_revocations: CountersSpent,
}

impl DrillReport {
    /// Exact leaves and, with guards, sound enforcement: no stale accept, no
    /// false refusal, every revoked agent refused.
    pub fn passed(&self) -> bool {
        self.outcome.is_exact() && self.refusal.as_ref().is_none_or(RefusalOutcome::is_sound)
    }
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
            "establish_ms": self.establish_ms,
            "touch_ms": self.touch_ms,
            "phases": self.phases,
            "guarding": self.guarding,
            "guards": {"layer": self.guards.0, "sidecar": self.guards.1},
            "refusal": self.refusal,
            "cpu": {"setup": self.cpu_setup, "revocations": self.cpu_revocations},
            "counters": {"setup": self.counters_setup, "revocations": self.counters_revocations},
            "lost_sample": o.lost_sample,
            "unexpected_sample": o.unexpected_sample,
        })
    }
}

/// The longest wait for the guards' touches to reach the hub, at least.
const SETUP_WAIT: Duration = Duration::from_secs(60);

/// The IdP issuer of a run.
fn idp_issuer(run: &str) -> String {
    format!("https://idp.drill.example/{run}")
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

/// The faults of a run, completed from the defaults and checked against the target.
fn plan_faults(config: &DrillConfig, target: &HubTarget<'_>, total_expected: usize) -> anyhow::Result<Faults> {
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
    Ok(faults)
}

/// The timed faults injected so far.
#[derive(Default)]
struct Injected {
    hub_kills: usize,
    instance_kills: usize,
    broker_restarts: usize,
    instance_killed_after: Option<usize>,
    broker_stopped_after: Option<usize>,
}

impl Injected {
    /// Kills or restarts what is due once `delivered` leaves arrived.
    async fn inject(
        &mut self,
        faults: &Faults,
        target: &mut HubTarget<'_>,
        delivered: usize,
        bar: &ProgressBar,
    ) -> anyhow::Result<()> {
        let message = bar.message();
        if self.hub_kills == 0
            && let (Some(at), Some(hub)) = (faults.kill_hub_at, target.spawned.as_deref_mut())
            && delivered >= at
        {
            bar.set_message("hub SIGKILLed, restarting");
            let took = hub.kill_and_restart().await?;
            tracing::info!(after_leaves = delivered, restart_ms = took.as_millis() as u64, "hub restarted");
            bar.set_message(message.clone());
            self.hub_kills += 1;
        }
        if self.instance_kills == 0
            && let (Some(at), Some(cluster)) = (faults.kill_instance_at, target.cluster.as_deref_mut())
            && delivered >= at
        {
            // The last instance: the balancer's round robin spreads the rest over the others.
            let victim = cluster.instances() - 1;
            cluster.kill_instance(victim)?;
            tracing::info!(after_leaves = delivered, victim, "instance SIGKILLed");
            self.instance_kills += 1;
            self.instance_killed_after = Some(delivered);
        }
        if self.broker_restarts == 0
            && let (Some(at), Some(cluster)) = (faults.restart_broker_at, target.cluster.as_deref_mut())
            && delivered >= at
        {
            bar.set_message("broker restarting");
            self.broker_stopped_after = Some(delivered);
            let took = cluster.restart_broker(Duration::from_millis(faults.broker_down_ms)).await?;
            tracing::info!(after_leaves = delivered, restart_ms = took.as_millis() as u64, "broker restarted");
            bar.set_message(message);
            self.broker_restarts += 1;
        }
        Ok(())
    }
}

/// Self-test: receiver 0 refuses a session no cascade revoked yet.
async fn revoke_unaffected(
    receiver: &crate::setup::DrillReceiver,
    forest: &Forest,
    leaves: &BTreeSet<LeafKey>,
) -> anyhow::Result<()> {
    let store = receiver.revocations.as_ref().context("--self-test-false-refusal needs receiver 0 on the layer")?;
    let unaffected = forest
        .sessions
        .iter()
        .find(|s| s.touches.contains(&0) && !leaves.contains(&LeafKey { receiver: 0, session: s.id.clone() }));
    let session = unaffected.context("no unaffected agent at receiver 0")?;
    tracing::warn!(session = session.id, "self-test: receiver 0 refuses an unaffected agent");
    store.revoke_session(&session.id).await?;
    Ok(())
}

/// Posts a phase's revocations as the IdP.
async fn post_revocation(idp: &Arc<Idp>, phase: &Phase, permits: &Arc<Semaphore>) -> anyhow::Result<()> {
    match &phase.action {
        PhaseAction::Sessions(ids) => {
            let mut tasks = JoinSet::new();
            for id in ids {
                let (idp, permits, txn) = (Arc::clone(idp), Arc::clone(permits), phase.txn.clone());
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
    Ok(())
}

/// Runs one drill against `target`.
///
/// # Errors
///
/// Setup failures (the hub refusing registrations, receivers that cannot
/// start or verify their streams, guards' touches that never arrive). Lost
/// or unexpected leaves, stale accepts and false refusals are not errors:
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
    let faults = plan_faults(config, &target, total_expected)?;
    let bar = progress_bar(config.progress);
    let client = reqwest::Client::builder().pool_max_idle_per_host(64).build().context("HTTP client")?;
    let admin = Admin { client: client.clone(), url: target.url.clone(), token: target.admin_token.clone() };

    // The IdP.
    let key = SigningKey::generate(Algorithm::Es256).context("IdP key")?;
    let idp = Arc::new(Idp::new(idp_issuer(run), target.url.clone(), key, client.clone()));
    admin.post("/admin/issuers", json!({"issuer": idp.issuer, "jwks": idp.jwks().to_json()})).await?;

    // The relying parties.
    let traffic = TrafficRuntime::new()?;
    let accounting = Arc::new(Mutex::new(Accounting::new()));
    let plan = ReceiverPlan {
        admin: &admin,
        run,
        epoch,
        accounting: &accounting,
        faults: &faults,
        poll_share: config.poll_share,
        drop_deliveries: config.drop_deliveries,
        guarding: config.guarding,
        guard_bin: config.guard_bin.as_deref(),
        idp: &idp,
        blind_receiver: config.blind_receiver,
        traffic: traffic.handle(),
    };
    let mut receivers = start_receivers(&plan, forest.receivers, &bar).await?;

    // The forest, and its touches: reported by the guards as the agents make their first calls.
    let counters_before_setup = read_counters(&target).await;
    let cpu_before_setup = read_cpu(&target);
    let permits = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let establish_started = now_ms();
    establish(&idp, &forest, run, &permits, &bar).await?;
    let establish_ms = now_ms() - establish_started;
    let agents = if config.guarding == Guarding::None {
        let list = Arc::new(std::mem::take(&mut receivers.list));
        touch_directly(&list, &forest, &permits, &bar).await?;
        receivers.list = Arc::try_unwrap(list).map_err(|_| anyhow::anyhow!("receivers still shared"))?;
        None
    } else {
        bar.set_message("agents' first calls");
        let agents = agents_of(&forest, &receivers.list, &idp, run, epoch, traffic.handle())?;
        for receiver in &receivers.list {
            let agents = agents.clone();
            receiver.ctx.on_record(Arc::new(move |leaf, at_ms| agents.acknowledged(leaf, at_ms)));
        }
        agents.sweep(&agents.all(), config.concurrency).await;
        bar.set_message("waiting for the guards' touches");
        // Setup, not a revocation: --timeout-secs (the wait for leaves) does not bound it.
        wait_touched(&admin, &forest, &receivers.list, Instant::now() + config.timeout.max(SETUP_WAIT)).await?;
        Some(agents)
    };
    let setup_ms = now_ms();
    let touch_ms = setup_ms - establish_started - establish_ms;
    let cpu_after_setup = read_cpu(&target);
    let counters_after_setup = read_counters(&target).await;
    let mut probers = agents.as_ref().map(|agents| agents.start_probing(config.probers));

    // Revocations.
    let down_set: Vec<usize> = (0..receivers.push_n)
        .filter(|&i| {
            i >= faults.flaky_receivers + faults.slow_receivers
                && i < faults.flaky_receivers + faults.slow_receivers + faults.down_receivers
        })
        .collect();
    let mut phase_reports = Vec::new();
    let mut injected = Injected::default();
    for (phase_index, phase) in phases.iter().enumerate() {
        bar.set_message(format!("revoking: {} ({})", phase.name, phase.txn));
        let before = accounting.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.delivered_count();
        bar.set_length((before + phase.leaves.len()) as u64);
        bar.set_position(before as u64);
        if phase_index == 0 && !down_set.is_empty() {
            for &i in &down_set {
                receivers.list[i].ctx.set_down(true);
                if let Some(server) = receivers.list[i].push.as_mut() {
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
        let refusal_phase = agents.as_ref().map(|agents| agents.revoke(started, &phase.leaves));
        if phase_index == 0 && config.false_refusal {
            revoke_unaffected(&receivers.list[0], &forest, &phase.leaves).await?;
        }
        post_revocation(&idp, phase, &permits).await?;
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
                    if let Some(server) = receivers.list[i].push.as_mut() {
                        server.listen().await?;
                    }
                    receivers.list[i].ctx.set_down(false);
                }
                tracing::info!(receivers = ?down_set, "receivers back up");
                down_pending = false;
            }
            injected.inject(&faults, &mut target, delivered, &bar).await?;
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
        if let (Some(agents), Some(refusal_phase)) = (&agents, refusal_phase) {
            bar.set_message(format!("refusals: {} ({})", phase.name, phase.txn));
            let left = agents.wait_refused(refusal_phase, deadline).await;
            if left > 0 {
                tracing::warn!(phase = phase.name, left, "revoked agents not refused in time");
            }
            // Every agent no cascade revoked must still be served.
            agents.sweep(&agents.unaffected(), config.concurrency).await;
        }
        // The hub's own view of the cascade.
        let report = cascade_report(&admin, &phase.txn).await;
        phase_reports.push(PhaseReport {
            name: phase.name.to_owned(),
            txn: phase.txn.clone(),
            expected_leaves: phase.leaves.len(),
            hub_cascade_ms: report.as_ref().and_then(|r| r["cascade_ms"].as_f64()),
            hub_total: report.as_ref().and_then(|r| r["total"].as_u64()),
            wall_ms,
            delivery_ms: Percentiles::default(),
            refusal_ms: None,
        });
    }
    let cpu_after_revocations = read_cpu(&target);
    let counters_after_revocations = read_counters(&target).await;
    // Let stragglers (unexpected or duplicate deliveries) arrive.
    bar.set_message("settling");
    tokio::time::sleep(Duration::from_millis(300)).await;
    if let (Some(agents), Some(probers)) = (&agents, probers.as_mut()) {
        agents.stop();
        while probers.join_next().await.is_some() {}
        // Every agent was revoked by now: each must be refused.
        agents.sweep(&agents.all(), config.concurrency).await;
    }
    bar.finish_and_clear();
    receivers.shutdown().await;

    let accounting = accounting.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    let refusal = agents.as_ref().map(Agents::outcome);
    for ((phase, delivery), i) in phase_reports.iter_mut().zip(accounting.phase_latencies()).zip(0..) {
        phase.delivery_ms = delivery;
        phase.refusal_ms = refusal.as_ref().and_then(|r| r.phases.get(i)).map(|p| p.latency_ms);
    }
    let outcome = accounting.outcome();
    let cpu_setup =
        CpuSpent::between(&cpu_before_setup, &cpu_after_setup, forest.sessions.len() + forest.touch_count());
    let cpu_revocations = CpuSpent::between(&cpu_after_setup, &cpu_after_revocations, outcome.delivered_leaves);
    let counters_setup = CountersSpent::between(
        &counters_before_setup,
        &counters_after_setup,
        forest.sessions.len() + forest.touch_count(),
    );
    let counters_revocations =
        CountersSpent::between(&counters_after_setup, &counters_after_revocations, outcome.delivered_leaves);
    let revocation_ms = latencies_span(&phase_reports);
    let sets_per_second =
        if revocation_ms > 0.0 { outcome.delivered_leaves as f64 / (revocation_ms / 1000.0) } else { 0.0 };
    let cascade_ms = phase_reports.last().and_then(|p| p.hub_cascade_ms);
    Ok(DrillReport {
        outcome,
        cascade_ms,
        sets_per_second,
        faults,
        hub_kills: injected.hub_kills,
        instance_kills: injected.instance_kills,
        instance_killed_after: injected.instance_killed_after,
        broker_stopped_after: injected.broker_stopped_after,
        broker_restarts: injected.broker_restarts,
        instances: target.cluster.as_deref().map(KafkaCluster::requests_per_instance),
        phases: phase_reports,
        sessions: forest.sessions.len(),
        receivers: forest.receivers,
        poll_receivers: receivers.poll_n(),
        touches: forest.touch_count(),
        setup_ms,
        establish_ms,
        touch_ms,
        latencies: accounting.latencies(),
        guarding: config.guarding,
        guards: receivers.guards(),
        refusal_latencies: agents.as_ref().map(Agents::latencies).unwrap_or_default(),
        refusal,
        cpu_setup,
        cpu_revocations,
        counters_setup,
        counters_revocations,
    })
}

/// The CPU the processes the drill started have used so far.
fn read_cpu(target: &HubTarget<'_>) -> Reading {
    match (target.spawned.as_deref(), target.cluster.as_deref()) {
        (Some(hub), _) => Reading::take(&[hub.pid()], None),
        (None, Some(cluster)) => Reading::take(&cluster.hub_pids(), cluster.broker_pid()),
        (None, None) => Reading::take(&[], None),
    }
}

/// The counters of the hubs the drill started. In Kafka mode the reading
/// first waits for the instances' broker-request counts to catch up.
async fn read_counters(target: &HubTarget<'_>) -> Counters {
    let endpoints = match (target.spawned.as_deref(), target.cluster.as_deref()) {
        (Some(hub), _) => vec![(hub.url(), hub.admin_token().to_owned())],
        (None, Some(cluster)) => {
            tokio::time::sleep(crate::counters::STATS_LAG).await;
            cluster.instance_endpoints()
        }
        (None, None) => return Counters::default(),
    };
    let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(10)).build().unwrap_or_default();
    Counters::read(&client, &endpoints).await
}

/// Total wall time of the revocation phases.
fn latencies_span(phases: &[PhaseReport]) -> f64 {
    phases.iter().map(|p| p.wall_ms).sum()
}

/// `GET /admin/cascades/{txn}`, waiting briefly for the hub to see it complete.
async fn cascade_report(admin: &Admin, txn: &str) -> Option<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(report) = admin.get(&format!("/admin/cascades/{txn}?leaves=false")).await {
            if report["complete"] == true {
                return Some(report);
            }
            last = Some(report);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    last
}
