//! The hub: verifies IdP events and hands them to the event log (whose
//! effects live in `effects.rs`); its `Dispatcher` signs the leaves they plan
//! and puts them in the outbox. It also records RP touches and applies
//! delivery outcomes to leaves.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, OnceLock, Weak};

use caep_schemas::event::Event;
use caep_schemas::set::SecurityEventToken;
use caep_schemas::subject::SubjectId;
use caep_transmitter::error::SsfError;
use caep_transmitter::outbox::{NewSet, Outbox, OutcomeSink, SetOutcome, now_ms};
use caep_transmitter::registry::StreamRecord;
use caep_transmitter::service::{BoxFuture, Outgoing, SubjectHook, Transmitter};
use caep_transmitter::store::{Commit, Store, StoreError};
use redb::WriteTransaction;

use crate::cascade::{self, CascadeRecord, Leaf, Outcome};
use crate::effects::{IngestError, rejected};
use crate::graph;
use crate::issuers::Issuers;
use crate::log::EventLog;

/// Leaves signed per blocking task.
const SIGN_CHUNK: usize = 256;
/// Tries to put a chunk of leaves in the outbox before leaving it to the sweep.
const DISPATCH_ATTEMPTS: u32 = 8;
/// How often leaves whose dispatch failed are picked up again.
const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// The hub's state.
pub struct Hub {
    issuer: String,
    /// Where verified events take effect (the embedded log by default).
    log: Box<dyn EventLog>,
    dispatcher: Arc<Dispatcher>,
    transmitter: Arc<Transmitter>,
    store: Store,
    issuers: Issuers,
    /// Catches this instance up with writes made at others (Kafka mode).
    barrier: OnceLock<Arc<dyn ReadBarrier>>,
    /// Where a session's graph is, when not in `store` (Kafka mode).
    graph_stores: OnceLock<Arc<dyn GraphStores>>,
    cluster: OnceLock<Arc<dyn ClusterStatus>>,
    /// What is kept how long, and how often pruning runs.
    retention: crate::lifecycle::Pruning,
}

/// What an instance of a scaled-out hub is doing, for `/healthz`.
pub trait ClusterStatus: Send + Sync {
    fn status(&self) -> serde_json::Value;
}

/// The store holding a session's graph on this instance, if any, once it
/// has applied every event logged before the call (read-your-writes).
pub trait GraphStores: Send + Sync {
    fn store_of<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, Option<Store>>;
    /// The store of the partition of trees rooted at `root`.
    fn store_of_root<'a>(&'a self, root: &'a str) -> BoxFuture<'a, Option<Store>>;
}

/// Waits until this instance has seen every control-plane write any
/// instance acknowledged before the call.
pub trait ReadBarrier: Send + Sync {
    fn barrier(&self) -> BoxFuture<'_, ()>;
}

impl Hub {
    /// The hub over a transmitter; call [`Hub::start`] next.
    pub fn new(
        issuer: &str,
        transmitter: Arc<Transmitter>,
        store: Store,
        issuers: Issuers,
        log: Box<dyn EventLog>,
        dispatcher: Arc<Dispatcher>,
        retention: crate::lifecycle::Pruning,
    ) -> Arc<Self> {
        Arc::new(Hub {
            issuer: issuer.to_owned(),
            log,
            dispatcher,
            transmitter,
            store,
            issuers,
            barrier: OnceLock::new(),
            graph_stores: OnceLock::new(),
            cluster: OnceLock::new(),
            retention,
        })
    }

    /// Re-dispatches leaves a crash left planned, and starts the sweep that
    /// re-dispatches leaves whose dispatch failed (so none waits for a
    /// restart) and the pruning job (see `lifecycle`).
    pub fn start(self: &Arc<Self>) -> Result<(), StoreError> {
        let dispatcher = Arc::clone(&self.dispatcher);
        tokio::spawn(async move {
            let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
            sweep.tick().await;
            loop {
                sweep.tick().await;
                // Older than a sweep: not a dispatch still in progress.
                let before = now_ms().saturating_sub(SWEEP_INTERVAL.as_millis() as u64);
                if let Err(error) = dispatcher.redispatch_planned_before(before) {
                    tracing::warn!(%error, "cannot sweep planned leaves");
                }
            }
        });
        let this = Arc::clone(self);
        tokio::spawn(async move { this.prune_forever().await });
        self.dispatcher.redispatch_planned()
    }

    /// Every `retention.interval`: prunes this hub's store and runs the
    /// transmitter's upkeep (dead letters, expired SETs, inactive streams).
    async fn prune_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.retention.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let started = std::time::Instant::now();
            match crate::lifecycle::prune_store(&self.store, self.retention.keep, crate::lifecycle::Forgetting::Silent)
                .await
            {
                Ok(pruned) if pruned.is_empty() => {}
                Ok(pruned) => tracing::info!(?pruned, "pruned"),
                Err(error) => tracing::warn!(%error, "cannot prune"),
            }
            match self.transmitter.upkeep(now_ms()).await {
                Ok(upkept) if upkept.is_empty() => {}
                Ok(upkept) => tracing::info!(?upkept, "transmitter upkeep"),
                Err(error) => tracing::warn!(%error, "cannot run the transmitter's upkeep"),
            }
            metrics::histogram!("caep_prune_seconds").record(started.elapsed().as_secs_f64());
        }
    }

    /// Sets the read barrier (once).
    pub fn set_barrier(&self, barrier: Arc<dyn ReadBarrier>) {
        let _ = self.barrier.set(barrier);
    }

    /// Sets the cluster status reporter (once).
    pub fn set_cluster_status(&self, status: Arc<dyn ClusterStatus>) {
        let _ = self.cluster.set(status);
    }

    /// The cluster status, in Kafka mode.
    pub fn cluster_status(&self) -> Option<serde_json::Value> {
        self.cluster.get().map(|status| status.status())
    }

    /// Sets where sessions' graphs live when not in the hub's store (once).
    pub fn set_graph_stores(&self, stores: Arc<dyn GraphStores>) {
        let _ = self.graph_stores.set(stores);
    }

    /// The store holding a session's graph here, if this instance has it.
    pub async fn graph_store_of(&self, session_id: &str) -> Option<Store> {
        match self.graph_stores.get() {
            Some(stores) => stores.store_of(session_id).await,
            None => Some(self.store.clone()),
        }
    }

    /// The store holding the trees rooted at `root` here, if this instance has it.
    pub async fn graph_store_of_root(&self, root: &str) -> Option<Store> {
        match self.graph_stores.get() {
            Some(stores) => stores.store_of_root(root).await,
            None => Some(self.store.clone()),
        }
    }

    /// Whether other instances may write (Kafka mode).
    pub fn is_clustered(&self) -> bool {
        self.barrier.get().is_some()
    }

    /// Waits for writes made at other instances, when there are others.
    pub async fn catch_up(&self) {
        if let Some(barrier) = self.barrier.get() {
            barrier.barrier().await;
        }
    }

    /// The transmitter.
    pub fn transmitter(&self) -> &Arc<Transmitter> {
        &self.transmitter
    }

    /// The trusted issuers.
    pub fn issuers(&self) -> &Issuers {
        &self.issuers
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Verifies an IdP's SET and applies it. Returns after the event and its
    /// cascade plan are durably committed; dispatch continues in the background.
    pub async fn ingest(self: &Arc<Self>, token: &str) -> Result<(), IngestError> {
        let received_at = now_ms();
        let set = self.verify(token).await?;
        let issuer = set.iss.clone();
        self.log.append(set, received_at).await?;
        self.issuers.note_event(&issuer, received_at);
        Ok(())
    }

    async fn verify(&self, token: &str) -> Result<SecurityEventToken, IngestError> {
        let issuer = unverified_issuer(token)?;
        // An unknown issuer is refused from local state: a stranger's SET
        // costs no broker round trip (an IdP trusted at another instance is
        // known here once the shared log is applied, within milliseconds).
        let keys = self.issuers.keys_for(&issuer).ok_or_else(|| rejected("invalid_issuer", "issuer is not trusted"))?;
        let mut expect = caep_schemas::set::Expectations::new(&issuer, &self.issuer);
        expect.max_age_secs = Some(i64::try_from(self.retention.keep.max_set_age_secs).unwrap_or(i64::MAX));
        let jwks = keys.get().await.map_err(|e| IngestError::Unavailable(format!("issuer keys: {e}")))?;
        match SecurityEventToken::verify(token, &jwks, &expect) {
            Err(caep_schemas::set::SetError::Jose(caep_schemas::jose::JoseError::UnknownKey { kid })) => {
                // Rate-limited or failed refetches are transient: the IdP retries
                // (a key rotated moments ago must not be refused for good).
                let jwks = keys.refresh_for_unknown_kid(&kid).await.map_err(|e| {
                    if e.is_transient() {
                        IngestError::Unavailable(e.to_string())
                    } else {
                        rejected("invalid_key", e.to_string())
                    }
                })?;
                SecurityEventToken::verify(token, &jwks, &expect).map_err(set_rejection)
            }
            other => other.map_err(set_rejection),
        }
    }

    /// A receiver reported that a session reached its stream (add-subject
    /// with a complex `session` subject): record the touch under each IdP
    /// the stream hears from, and if the session is already revoked, send
    /// that stream the revocation now. Fails (so the receiver retries) when
    /// the touch cannot be recorded.
    /// Answers true when the subject was an agent session (kept here as a
    /// touch, so the stream's subject list need not keep it).
    pub async fn touched(self: &Arc<Self>, stream: &StreamRecord, subject: &SubjectId) -> Result<bool, SsfError> {
        let Some(complex) = subject.as_complex() else { return Ok(false) };
        let Some(session) = &complex.session else { return Ok(false) };
        let issuers = match &stream.issuers {
            Some(bound) => bound.clone(),
            None => self.issuers.names(),
        };
        let keys: Vec<String> = issuers.iter().map(|issuer| graph::session_key(issuer, session)).collect();
        let touch = graph::Touch { at_ms: now_ms(), by_idp: false, named_user: complex.user.clone() };
        match self.log.touch(keys, stream.config.stream_id.clone(), touch).await {
            Ok(()) => Ok(true),
            Err(IngestError::TooMany(reason)) => {
                tracing::warn!(stream_id = %stream.config.stream_id, %reason, "touch refused");
                Err(SsfError::TooManyRequests { retry_after_secs: 60 })
            }
            Err(error) => {
                tracing::error!(stream_id = %stream.config.stream_id, %error, "cannot record a touch");
                Err(SsfError::Unavailable { retry_after_secs: 1 })
            }
        }
    }

    /// The reports of the cascades with wire `txn`: `issuer`'s, or (when
    /// `None`) every trusted IdP's that exists.
    pub fn reports(
        &self,
        txn: &str,
        issuer: Option<&str>,
        with_leaves: bool,
    ) -> Result<Vec<cascade::CascadeReport>, StoreError> {
        let issuers = match issuer {
            Some(issuer) => vec![issuer.to_owned()],
            None => self.issuers.names(),
        };
        self.store.read(|read| {
            let mut found = Vec::new();
            for issuer in &issuers {
                found.extend(cascade::report(read, &cascade::key(issuer, txn), with_leaves)?);
            }
            Ok(found)
        })
    }
}

/// Where signed leaves go: the local outbox (embedded) or the shared
/// delivery log (Kafka). Either way the leaves are marked pending in the
/// plan's store only once they are safely handed over.
pub trait LeafSink: Send + Sync {
    fn hand_over<'a>(
        &'a self,
        store: &'a Store,
        record: &'a CascadeRecord,
        leaves: Vec<Leaf>,
        signed: Vec<NewSet>,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// The embedded sink: the outbox rows and the leaves' move to pending in
/// one transaction.
pub struct LocalOutbox;

impl LeafSink for LocalOutbox {
    fn hand_over<'a>(
        &'a self,
        store: &'a Store,
        record: &'a CascadeRecord,
        _leaves: Vec<Leaf>,
        signed: Vec<NewSet>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let jtis: Vec<String> = signed.iter().map(|set| set.jti.clone()).collect();
            let cascade_key = record.key.clone();
            // Lazy: the durable plan already holds these leaves; a lost insert
            // leaves them planned, and start-up signs them again (same jti).
            store
                .write(Commit::Lazy, move |txn| {
                    let moved: BTreeSet<String> =
                        cascade::mark_pending(txn, &cascade_key, &jtis)?.into_iter().collect();
                    Outbox::insert(txn, signed.iter().filter(|set| moved.contains(&set.jti)))
                })
                .await
        })
    }
}

/// Signs planned leaves and hands them to a [`LeafSink`].
pub struct Dispatcher {
    issuer: String,
    transmitter: Arc<Transmitter>,
    /// The store holding the plans (the hub's, or one graph partition's).
    store: Store,
    /// Signing chunks at once: one per core, so early chunks reach the
    /// outbox (and the wire) while later ones are still being signed.
    signing: tokio::sync::Semaphore,
    sink: Arc<dyn LeafSink>,
    /// Dispatches start from the store's writer thread too (see
    /// [`Dispatcher::dispatch_planning`]), which is outside the runtime.
    runtime: tokio::runtime::Handle,
}

impl Dispatcher {
    /// A dispatcher of the plans in `store`.
    pub fn new(issuer: &str, transmitter: Arc<Transmitter>, store: Store, sink: Arc<dyn LeafSink>) -> Arc<Self> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let signing = tokio::sync::Semaphore::new(cores);
        let runtime = tokio::runtime::Handle::current();
        Arc::new(Dispatcher { issuer: issuer.to_owned(), transmitter, store, signing, sink, runtime })
    }

    /// A dispatcher of the plans in `store` into its local outbox.
    pub fn local(issuer: &str, transmitter: Arc<Transmitter>, store: Store) -> Arc<Self> {
        Dispatcher::new(issuer, transmitter, store, Arc::new(LocalOutbox))
    }

    /// Dispatches every leaf a crash left planned.
    pub fn redispatch_planned(self: &Arc<Self>) -> Result<(), StoreError> {
        self.redispatch_planned_before(u64::MAX)
    }

    /// Dispatches every leaf planned before `before_ms` and still not handed
    /// over (a dispatch that failed, or a crash). A leaf handed over twice is
    /// enqueued once: only still-planned leaves move to the outbox.
    pub fn redispatch_planned_before(self: &Arc<Self>, before_ms: u64) -> Result<(), StoreError> {
        let planned = self.store.read(|txn| cascade::planned_before(txn, before_ms))?;
        if !planned.is_empty() {
            tracing::info!(cascades = planned.len(), "re-dispatching planned leaves");
        }
        for (record, leaves) in planned {
            self.dispatch(record, leaves);
        }
        Ok(())
    }

    /// Signs and hands over a cascade's leaves in chunks on the blocking
    /// pool; each chunk is delivered as soon as it is handed over.
    pub fn dispatch(self: &Arc<Self>, record: CascadeRecord, leaves: Vec<Leaf>) {
        self.spawn_dispatch(record, leaves, None);
    }

    /// Starts signing leaves whose plan is still being written in `txn`, so
    /// signing overlaps the rest of the plan and its commit. Their sessions
    /// are read here, in the plan's transaction: a session named in the same
    /// transaction is not in any snapshot yet. Safe before the commit: only
    /// leaves that exist and are still planned are ever enqueued (see
    /// [`cascade::mark_pending`]).
    ///
    /// The leaves are signed at once but handed over only once `run`, the
    /// run of the write that planned them, is known to have committed: a
    /// write may run again (without another write of its group that failed),
    /// and its discarded run may have planned the same `jti` differently.
    pub fn dispatch_planning(
        self: &Arc<Self>,
        txn: &WriteTransaction,
        record: &CascadeRecord,
        leaves: &[Leaf],
        run: PlanningRun,
    ) -> Result<(), StoreError> {
        let mut sessions = SessionSubjects::new();
        for leaf in leaves {
            if !sessions.contains_key(&leaf.session_id)
                && let Some(session) = graph::session(txn, &leaf.session_id)?
            {
                sessions.insert(leaf.session_id.clone(), (session.subject, session.user));
            }
        }
        let planning = Planning { sessions: Arc::new(sessions), run };
        self.spawn_dispatch(record.clone(), leaves.to_vec(), Some(planning));
        Ok(())
    }

    fn spawn_dispatch(self: &Arc<Self>, record: CascadeRecord, leaves: Vec<Leaf>, planning: Option<Planning>) {
        let this = Arc::clone(self);
        self.runtime.spawn(async move {
            if let Err(error) = this.dispatch_chunks(record, leaves, planning).await {
                tracing::error!(%error, "cascade dispatch failed; leaves stay planned");
            }
        });
    }

    /// Like [`Dispatcher::dispatch`], resolving once every chunk is handed
    /// over (or has failed for good: the leaves then stay planned).
    pub async fn dispatch_all(self: &Arc<Self>, record: CascadeRecord, leaves: Vec<Leaf>) -> Result<(), StoreError> {
        self.dispatch_chunks(record, leaves, None).await
    }

    async fn dispatch_chunks(
        self: &Arc<Self>,
        record: CascadeRecord,
        leaves: Vec<Leaf>,
        planning: Option<Planning>,
    ) -> Result<(), StoreError> {
        let record = Arc::new(record);
        let mut chunks = tokio::task::JoinSet::new();
        for chunk in leaves.chunks(SIGN_CHUNK) {
            let (this, record, chunk, planning) =
                (Arc::clone(self), Arc::clone(&record), chunk.to_vec(), planning.clone());
            chunks.spawn(async move { this.dispatch_with_retries(&record, chunk, planning).await });
        }
        let mut outcome = Ok(());
        while let Some(joined) = chunks.join_next().await {
            if let Err(error) = joined.map_err(StoreError::storage).and_then(|done| done) {
                outcome = Err(error);
            }
        }
        outcome
    }

    /// A storage or broker hiccup must not strand leaves until the next
    /// restart: retry with backoff, then leave them planned (a restart signs
    /// them again with the same jti).
    async fn dispatch_with_retries(
        self: &Arc<Self>,
        record: &CascadeRecord,
        chunk: Vec<Leaf>,
        planning: Option<Planning>,
    ) -> Result<(), StoreError> {
        let mut delay = std::time::Duration::from_millis(50);
        for attempt in 1.. {
            match self.dispatch_chunk(record, chunk.clone(), planning.clone()).await {
                Ok(()) => return Ok(()),
                Err(error) if attempt < DISPATCH_ATTEMPTS => {
                    tracing::warn!(txn = %record.txn, attempt, %error, "cascade dispatch failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(5));
                }
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    async fn dispatch_chunk(
        self: &Arc<Self>,
        record: &CascadeRecord,
        leaves: Vec<Leaf>,
        planning: Option<Planning>,
    ) -> Result<(), StoreError> {
        let sessions = match &planning {
            // A run known to be discarded already: its re-run signs its own.
            Some(planning) if planning.run.discarded() => return Ok(()),
            Some(planning) => Arc::clone(&planning.sessions),
            None => Arc::new(self.store.read(|txn| sessions_of(txn, &leaves))?),
        };
        let outgoing: Vec<Outgoing> = leaves.iter().filter_map(|leaf| self.leaf_set(record, leaf, &sessions)).collect();
        let transmitter = Arc::clone(&self.transmitter);
        let permit = self.signing.acquire().await.map_err(StoreError::storage)?;
        let signed = tokio::task::spawn_blocking(move || transmitter.sign(outgoing))
            .await
            .map_err(StoreError::storage)?
            .map_err(StoreError::storage)?;
        drop(permit);
        // The outbox row carries the cascade key, so outcomes find their leaf.
        let signed: Vec<_> = signed.into_iter().map(|set| NewSet { txn: Some(record.key.clone()), ..set }).collect();
        let signed_jtis: BTreeSet<&str> = signed.iter().map(|set| set.jti.as_str()).collect();
        // A leaf whose stream vanished or was disabled meanwhile cannot be sent.
        let dropped: Vec<Outcome> = leaves
            .iter()
            .filter(|leaf| !signed_jtis.contains(leaf.jti.as_str()))
            .map(|leaf| Outcome {
                txn: record.key.clone(),
                jti: leaf.jti.clone(),
                delivered: false,
                at_ms: now_ms(),
                err: Some("stream_unavailable".into()),
            })
            .collect();
        let streams: BTreeSet<String> = signed.iter().map(|set| set.stream_id.clone()).collect();
        let count = signed.len() as u64;
        if let Some(planning) = planning
            && !planning.run.committed().await
        {
            return Ok(());
        }
        self.sink.hand_over(&self.store, record, leaves, signed).await?;
        metrics::counter!("caep_leaves_signed_total").increment(count);
        self.transmitter.wake(&streams);
        if !dropped.is_empty() {
            self.store.write(Commit::Lazy, move |txn| cascade::apply_outcomes(txn, &dropped).map(drop)).await?;
        }
        Ok(())
    }

    fn leaf_set(&self, record: &CascadeRecord, leaf: &Leaf, sessions: &SessionSubjects) -> Option<Outgoing> {
        let stream = self.transmitter.streams().get(&leaf.stream_id)?;
        let carried = record.events.get(leaf.event)?;
        let event = Event::from_parts(&carried.event_type, carried.event.clone()).ok()?;
        let mut set = SecurityEventToken::new(
            self.issuer.clone(),
            stream.config.aud.clone(),
            session_subject(leaf, sessions),
            event,
        );
        set.jti = leaf.jti.clone();
        set.txn = Some(record.txn.clone());
        Some(Outgoing { stream_id: leaf.stream_id.clone(), set })
    }
}

/// Session id → (session subject, user), for the leaves being signed.
type SessionSubjects = HashMap<String, (SubjectId, Option<SubjectId>)>;

/// Leaves handed to signing from inside the write that plans them.
#[derive(Clone)]
struct Planning {
    /// Their sessions, read in that write.
    sessions: Arc<SessionSubjects>,
    run: PlanningRun,
}

/// Whether one run of a planning write committed: unknown, then settled by
/// [`PlanningRuns::settle`]. A run whose outcome is never told (its writer
/// went away) counts as not committed; its leaves stay planned for the sweep.
#[derive(Clone)]
pub struct PlanningRun(tokio::sync::watch::Receiver<Option<bool>>);

impl PlanningRun {
    fn discarded(&self) -> bool {
        *self.0.borrow() == Some(false)
    }

    async fn committed(mut self) -> bool {
        matches!(self.0.wait_for(Option::is_some).await.map(|outcome| *outcome), Ok(Some(true)))
    }
}

/// The runs of one planning write (a write may run more than once; only its
/// last run can commit).
#[derive(Clone, Default)]
pub struct PlanningRuns(Arc<std::sync::Mutex<Vec<tokio::sync::watch::Sender<Option<bool>>>>>);

impl PlanningRuns {
    /// A new run of the write, not settled yet.
    pub fn start(&self) -> PlanningRun {
        let (tell, run) = tokio::sync::watch::channel(None);
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(tell);
        PlanningRun(run)
    }

    /// Tells every run how the write ended: only the last one can have
    /// committed, and did when `committed`.
    pub fn settle(&self, committed: bool) {
        let mut runs = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let last = runs.pop();
        for discarded in runs.drain(..) {
            discarded.send_replace(Some(false));
        }
        if let Some(last) = last {
            last.send_replace(Some(committed));
        }
    }
}

fn sessions_of(txn: &redb::ReadTransaction, leaves: &[Leaf]) -> Result<SessionSubjects, StoreError> {
    let mut found = SessionSubjects::new();
    for leaf in leaves {
        if !found.contains_key(&leaf.session_id)
            && let Some(record) = graph::session_in(txn, &leaf.session_id)?
        {
            found.insert(leaf.session_id.clone(), (record.subject, record.user));
        }
    }
    Ok(found)
}

/// The leaf's `sub_id`: complex `{session, user}` as the IdP named them.
/// The user is named only where the leaf may disclose it (see `Leaf::with_user`).
fn session_subject(leaf: &Leaf, sessions: &SessionSubjects) -> SubjectId {
    match sessions.get(&leaf.session_id) {
        Some((session, user)) => SubjectId::session_of(session.clone(), user.clone().filter(|_| leaf.with_user)),
        None => SubjectId::session_of(SubjectId::opaque(crate::scope::local_id(&leaf.session_id)), None),
    }
}

fn set_rejection(error: caep_schemas::set::SetError) -> IngestError {
    rejected(error.rfc8935_err(), error.to_string())
}

/// The `iss` of a compact JWS, read before verification only to choose the
/// keys to verify it with.
fn unverified_issuer(token: &str) -> Result<String, IngestError> {
    caep_schemas::set::unverified_issuer(token).map_err(|reason| rejected("invalid_request", reason))
}

/// Applies delivery outcomes to cascade leaves inside the transaction that
/// takes each SET out of the outbox, so a leaf's outcome and its SET's
/// removal are on disk together, or neither is.
pub struct Tracker;

impl Tracker {
    /// The tracker.
    pub fn new() -> Arc<Self> {
        Arc::new(Tracker)
    }
}

impl OutcomeSink for Tracker {
    fn record(&self, txn: &WriteTransaction, outcomes: &[SetOutcome<'_>]) -> Result<(), StoreError> {
        let outcomes: Vec<Outcome> = outcomes
            .iter()
            .filter_map(|o| {
                Some(Outcome {
                    txn: o.set.txn.clone()?,
                    jti: o.set.jti.clone(),
                    delivered: o.delivered,
                    at_ms: o.at_ms,
                    err: o.err.map(str::to_owned),
                })
            })
            .collect();
        if outcomes.is_empty() {
            return Ok(());
        }
        let applied = cascade::apply_outcomes(txn, &outcomes)?;
        crate::metrics::record_settled(&applied);
        Ok(())
    }
}

/// The transmitter's add-subject hook, pointing back at the hub once it exists.
#[derive(Default)]
pub struct TouchHook {
    hub: OnceLock<Weak<Hub>>,
}

impl TouchHook {
    /// Connects the hook to the hub.
    pub fn connect(&self, hub: &Arc<Hub>) {
        let _ = self.hub.set(Arc::downgrade(hub));
    }
}

impl SubjectHook for TouchHook {
    fn subject_added<'a>(
        &'a self,
        stream: &'a StreamRecord,
        subject: &'a SubjectId,
    ) -> BoxFuture<'a, Result<bool, SsfError>> {
        Box::pin(async move {
            match self.hub.get().and_then(Weak::upgrade) {
                Some(hub) => hub.touched(stream, subject).await,
                None => Err(SsfError::Unavailable { retry_after_secs: 1 }),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use caep_schemas::event::event_type;
    use caep_schemas::jose::Algorithm;
    use caep_transmitter::keys::KeyStore;
    use caep_transmitter::receivers::ReceiverSpec;
    use caep_transmitter::service::{TransmitterSettings, open_in};

    use super::*;
    use crate::cascade::{CascadeEvent, LeafStatus};

    /// A sink whose first `failures` hand-overs fail (a broker or disk
    /// outage), then hands over like the embedded outbox.
    struct Flaky {
        failures: AtomicU32,
        calls: AtomicU32,
    }

    impl LeafSink for Flaky {
        fn hand_over<'a>(
            &'a self,
            store: &'a Store,
            record: &'a CascadeRecord,
            leaves: Vec<Leaf>,
            signed: Vec<NewSet>,
        ) -> BoxFuture<'a, Result<(), StoreError>> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                if self.failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                    return Err(StoreError::Storage("outbox unreachable".into()));
                }
                LocalOutbox.hand_over(store, record, leaves, signed).await
            })
        }
    }

    async fn transmitter_with_a_stream(dir: &std::path::Path) -> (Arc<Transmitter>, String) {
        let keys = Arc::new(KeyStore::open(dir, Algorithm::Es256).expect("keys"));
        let transmitter = open_in(dir, TransmitterSettings::new("https://hub.test"), keys).expect("transmitter");
        let (receiver, _) =
            transmitter.create_receiver(ReceiverSpec::new("rp", "https://rp.test")).await.expect("receiver");
        let body = format!(r#"{{"events_requested": ["{}"]}}"#, event_type::SESSION_REVOKED);
        let stream = transmitter.create_stream(&receiver, body.as_bytes()).await.expect("stream");
        (transmitter, stream.config.stream_id.clone())
    }

    fn one_leaf(stream_id: &str) -> (CascadeRecord, Leaf) {
        let record = CascadeRecord {
            key: cascade::key("https://idp.test", "t1"),
            txn: "t1".into(),
            root: "session:s1".into(),
            issuer: "https://idp.test".into(),
            event_type: event_type::SESSION_REVOKED.into(),
            events: Vec::new(),
            started_at_ms: 1,
            total: 0,
            undispatched: 0,
            delivered: 0,
            failed: 0,
            completed_at_ms: None,
        };
        let leaf = Leaf {
            jti: "leaf-1".into(),
            stream_id: stream_id.into(),
            session_id: crate::scope::scoped("https://idp.test", "s1"),
            with_user: false,
            event: 0,
            planned_at_ms: 1,
            status: LeafStatus::Planned,
            acked_at_ms: None,
            err: None,
        };
        (record, leaf)
    }

    #[tokio::test(start_paused = true)]
    async fn a_dispatch_that_fails_for_good_is_picked_up_by_the_sweep() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (transmitter, stream_id) = transmitter_with_a_stream(dir.path()).await;
        let store = transmitter.outbox().store().clone();
        let (template, leaf) = one_leaf(&stream_id);
        let event = CascadeEvent { event_type: event_type::SESSION_REVOKED.into(), event: serde_json::json!({}) };
        let (record, leaves) = store
            .write(Commit::Durable, move |txn| cascade::plan(txn, &template, &event, vec![leaf.clone()], None))
            .await
            .expect("planned");
        let sink = Arc::new(Flaky { failures: AtomicU32::new(DISPATCH_ATTEMPTS), calls: AtomicU32::new(0) });
        let dispatcher = Dispatcher::new("https://hub.test", Arc::clone(&transmitter), store.clone(), sink.clone());

        let failed = dispatcher.dispatch_all(record, leaves).await;
        assert!(failed.is_err(), "every attempt failed");
        assert_eq!(sink.calls.load(Ordering::SeqCst), DISPATCH_ATTEMPTS);
        assert_eq!(store.read(cascade::all_planned).expect("read").len(), 1, "the leaf stays planned");
        assert_eq!(transmitter.outbox().depth(&stream_id).expect("depth"), 0);

        // What the periodic sweep runs: the leaf goes out now, no restart.
        dispatcher.redispatch_planned_before(now_ms()).expect("sweep");
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        while transmitter.outbox().depth(&stream_id).expect("depth") == 0 {
            assert!(tokio::time::Instant::now() < deadline, "the sweep never handed the leaf over");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(store.read(cascade::all_planned).expect("read").is_empty(), "handed over once");
        assert!(transmitter.outbox().contains(&stream_id, "leaf-1").expect("outbox"), "under its planned jti");
    }

    /// Leaves handed to signing by a run of a planning write go out only if
    /// that run committed: a discarded run may have planned the same `jti`
    /// differently (here: naming the user), and the leaf that exists is the
    /// committed run's.
    #[tokio::test]
    async fn leaves_signed_by_a_discarded_run_are_not_handed_over() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (transmitter, stream_id) = transmitter_with_a_stream(dir.path()).await;
        let store = transmitter.outbox().store().clone();
        let (template, leaf) = one_leaf(&stream_id);
        let event = CascadeEvent { event_type: event_type::SESSION_REVOKED.into(), event: serde_json::json!({}) };
        let committed_leaf = leaf.clone();
        let (record, _) = store
            .write(Commit::Durable, move |txn| {
                cascade::plan(txn, &template, &event, vec![committed_leaf.clone()], None)
            })
            .await
            .expect("planned");
        let dispatcher = Dispatcher::local("https://hub.test", Arc::clone(&transmitter), store.clone());
        let discarded_leaf = Leaf { with_user: true, ..leaf.clone() };
        let start = |leaf: Leaf| {
            let (dispatcher, record, runs) = (Arc::clone(&dispatcher), record.clone(), PlanningRuns::default());
            let run = runs.start();
            let store = store.clone();
            async move {
                store
                    .write(Commit::Lazy, move |txn| {
                        dispatcher.dispatch_planning(txn, &record, std::slice::from_ref(&leaf), run.clone())
                    })
                    .await
                    .expect("handed to signing");
                runs
            }
        };

        start(discarded_leaf).await.settle(false);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert_eq!(transmitter.outbox().depth(&stream_id).expect("depth"), 0, "nothing of the discarded run");
        assert_eq!(store.read(cascade::all_planned).expect("read").len(), 1, "the leaf stays planned");

        start(leaf).await.settle(true);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        while transmitter.outbox().depth(&stream_id).expect("depth") == 0 {
            assert!(tokio::time::Instant::now() < deadline, "the committed run's leaf never went out");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(store.read(cascade::all_planned).expect("read").is_empty(), "handed over once");
    }

    /// An event log that cannot record anything (its broker or disk is gone).
    struct Unreachable;

    impl EventLog for Unreachable {
        fn append(&self, _: SecurityEventToken, _: u64) -> BoxFuture<'_, Result<(), IngestError>> {
            Box::pin(async { Err(IngestError::Unavailable("log unreachable".into())) })
        }

        fn touch(&self, _: Vec<String>, _: String, _: graph::Touch) -> BoxFuture<'_, Result<(), IngestError>> {
            Box::pin(async { Err(IngestError::Unavailable("log unreachable".into())) })
        }
    }

    #[tokio::test]
    async fn a_touch_that_cannot_be_recorded_fails_the_call() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (transmitter, stream_id) = transmitter_with_a_stream(dir.path()).await;
        let store = transmitter.outbox().store().clone();
        let guard = caep_transmitter::ssrf::PushUrlGuard::new(Vec::new());
        let issuers = Issuers::load(store.clone(), guard).expect("issuers");
        let pruning = crate::lifecycle::Pruning::default();
        let dispatcher = Dispatcher::local("https://hub.test", Arc::clone(&transmitter), store.clone());
        let log = Box::new(Unreachable);
        let hub = Hub::new("https://hub.test", Arc::clone(&transmitter), store, issuers, log, dispatcher, pruning);
        let stream = transmitter.streams().get(&stream_id).expect("stream");
        let session = SubjectId::session_of(SubjectId::opaque("s1"), None);
        let refused = hub.touched(&stream, &session).await;
        assert!(matches!(refused, Err(SsfError::Unavailable { .. })), "{refused:?}: the RP must retry");
        let email = hub.touched(&stream, &SubjectId::email("ada@x")).await;
        assert!(matches!(email, Ok(false)), "{email:?}: not a session, so the stream stores it");
    }

    #[tokio::test]
    async fn a_late_touch_after_the_cascade_was_pruned_is_still_revoked() {
        use caep_schemas::event::SessionRevoked;
        let dir = tempfile::tempdir().expect("temp dir");
        let (transmitter, stream_id) = transmitter_with_a_stream(dir.path()).await;
        let store = transmitter.outbox().store().clone();
        let revoke = SecurityEventToken::new(
            "https://idp.test",
            "https://hub.test",
            SubjectId::session_of(SubjectId::opaque("s1"), None),
            Event::SessionRevoked(SessionRevoked::default()),
        )
        .with_txn("t1");
        let late = store
            .write(Commit::Durable, move |txn| {
                let lifetimes = graph::Lifetimes::DEFAULT;
                let ctx =
                    crate::effects::Context { streams: transmitter.streams(), lifetimes: &lifetimes, on_planned: None };
                let now = 1_000_000;
                crate::effects::apply(txn, ctx, &revoke, now).map_err(|e| StoreError::Storage(e.to_string()))?;
                let pruned = cascade::prune_completed(txn, now + 1, 100)?;
                assert_eq!(pruned.cascades, 1, "nothing touched it: complete at once, and pruned");
                let key = graph::session_key("https://idp.test", &SubjectId::opaque("s1"));
                let touch = graph::Touch { at_ms: now + 2, ..graph::Touch::default() };
                crate::effects::late_touch_plan(txn, ctx, &key, &stream_id, &touch)
                    .map_err(|e| StoreError::Storage(e.to_string()))
            })
            .await
            .expect("late touch");
        assert_eq!(late.cascades.len(), 1, "{late:?}");
        let (record, leaves) = &late.cascades[0];
        assert_eq!((record.key.as_str(), record.txn.as_str()), (cascade::key("https://idp.test", "t1").as_str(), "t1"));
        assert_eq!(leaves.len(), 1);
        assert_eq!(record.events[leaves[0].event].event_type, event_type::SESSION_REVOKED);
    }
}
