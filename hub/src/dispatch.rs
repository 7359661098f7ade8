//! Signing planned leaves and handing them to delivery: the [`Dispatcher`]
//! signs a store's planned leaves in chunks on the blocking pool and hands
//! them to a [`LeafSink`] (the local outbox, or the Kafka delivery log),
//! which marks them pending only once they are safely handed over.
//! [`PlanningRuns`] gates leaves handed to signing from inside the write
//! that plans them (embedded mode) on that write's commit.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use caep_schemas::event::Event;
use caep_schemas::set::SecurityEventToken;
use caep_schemas::subject::SubjectId;
use caep_transmitter::outbox::{NewSet, Outbox, now_ms};
use caep_transmitter::service::{BoxFuture, Outgoing, Transmitter};
use caep_transmitter::store::{Commit, Store, StoreError};
use redb::WriteTransaction;

use crate::cascade::{self, CascadeRecord, Leaf, Outcome};
use crate::graph;

/// Leaves signed per blocking task.
const SIGN_CHUNK: usize = 256;
/// Tries to put a chunk of leaves in the outbox before leaving it to the sweep.
const DISPATCH_ATTEMPTS: u32 = 8;

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

#[cfg(test)]
pub(crate) mod tests {
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

    pub(crate) async fn transmitter_with_a_stream(dir: &std::path::Path) -> (Arc<Transmitter>, String) {
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
}
