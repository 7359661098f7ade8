//! The hub: verifies IdP events and hands them to the event log (whose
//! effects live in `effects.rs`; the `Dispatcher` in `dispatch.rs` signs the
//! leaves they plan). It also records RP touches, applies delivery outcomes
//! to leaves, and sweeps up leaves whose dispatch failed.

use std::sync::{Arc, OnceLock, Weak};

use caep_schemas::set::SecurityEventToken;
use caep_schemas::subject::SubjectId;
use caep_transmitter::error::SsfError;
use caep_transmitter::outbox::{OutcomeSink, SetOutcome, now_ms};
use caep_transmitter::registry::StreamRecord;
use caep_transmitter::service::{BoxFuture, SubjectHook, Transmitter};
use caep_transmitter::store::{Store, StoreError};
use redb::WriteTransaction;

use crate::cascade::{self, Outcome};
use crate::dispatch::Dispatcher;
use crate::effects::{IngestError, rejected};
use crate::graph;
use crate::issuers::Issuers;
use crate::log::EventLog;

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
    /// Every store open here now (to close them when the process stops).
    fn open_stores(&self) -> Vec<Store>;
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

    /// Every database this hub has open: its own and, in Kafka mode, its
    /// graph partitions'. The process closes them when it stops.
    pub fn open_stores(&self) -> Vec<Store> {
        let mut stores = vec![self.store.clone()];
        if let Some(graph) = self.graph_stores.get() {
            stores.extend(graph.open_stores());
        }
        stores
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
    use caep_schemas::event::{Event, event_type};
    use caep_transmitter::store::Commit;

    use super::*;
    use crate::dispatch::tests::transmitter_with_a_stream;

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
