//! What the hub keeps, for how long, and the background job that prunes
//! the rest (ARCHITECTURE.md, "Lifecycle").
//!
//! Pruning runs in bounded batches, each its own write transaction: a large
//! backlog never holds the writer (and the ingest waiting behind it) for
//! long, and a crash mid-prune leaves every batch either done or not done.
//! Nothing with work left is pruned: a cascade is pruned only once complete,
//! and a revoked session only once its cascade has dispatched every leaf.

use std::time::Duration;

use caep_transmitter::outbox::now_ms;
use caep_transmitter::store::{Commit, Store, StoreError};
use redb::WriteTransaction;

use crate::cascade;
use crate::graph::{self, Lifetimes};

/// How long the hub keeps what it records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    pub sessions: Lifetimes,
    /// A complete cascade's report and leaves are kept this long after completion.
    pub cascade_ms: u64,
    /// The oldest IdP SET accepted (its `iat`), which bounds how long its
    /// `(iss, jti)` replay record must be kept.
    pub max_set_age_secs: u64,
}

/// [`Retention`] and how often the pruning job applies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pruning {
    pub keep: Retention,
    pub interval: Duration,
}

impl Default for Pruning {
    fn default() -> Self {
        Pruning { keep: Retention::default(), interval: Duration::from_secs(60) }
    }
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            sessions: Lifetimes::DEFAULT,
            cascade_ms: 7 * 86_400_000,
            max_set_age_secs: crate::replay::MAX_SET_AGE_SECS,
        }
    }
}

/// Sessions looked at per batch.
const SESSION_BATCH: usize = 1_000;
/// Cascade leaves removed per batch (a cascade can have very many).
const LEAF_BATCH: usize = 5_000;
/// Replay records and pending touches removed per batch.
const RECORD_BATCH: usize = 5_000;

/// What pruning removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub sessions: usize,
    /// Due sessions kept for now (they link live sub-agents, or their
    /// revocation is still being dispatched).
    pub sessions_kept: usize,
    pub cascades: usize,
    pub leaves: usize,
    /// Rows of pruned cascades' latency histograms.
    pub latency_rows: usize,
    pub replay_records: usize,
    pub pending_touches: usize,
}

impl Pruned {
    pub fn is_empty(&self) -> bool {
        *self == Pruned::default()
    }

    fn add(&mut self, other: Pruned) {
        self.sessions += other.sessions;
        self.sessions_kept += other.sessions_kept;
        self.cascades += other.cascades;
        self.leaves += other.leaves;
        self.latency_rows += other.latency_rows;
        self.replay_records += other.replay_records;
        self.pending_touches += other.pending_touches;
    }

    /// Whether a batch hit one of its bounds, so more may be left.
    fn filled(&self) -> bool {
        self.sessions + self.sessions_kept >= SESSION_BATCH
            || self.leaves + self.latency_rows >= LEAF_BATCH
            || self.cascades >= LEAF_BATCH
            || self.replay_records >= RECORD_BATCH
            || self.pending_touches >= RECORD_BATCH
    }

    /// Counts what went in `caep_pruned_total{kind}`.
    pub fn record_metrics(&self) {
        for (kind, count) in [
            ("sessions", self.sessions),
            ("cascades", self.cascades),
            ("leaves", self.leaves),
            ("cascade_latencies", self.latency_rows),
            ("replay_records", self.replay_records),
            ("pending_touches", self.pending_touches),
        ] {
            metrics::counter!("caep_pruned_total", "kind" => kind).increment(count as u64);
        }
    }
}

/// Whether a store notes the sessions it forgets, for its owner to announce
/// (a Kafka graph partition: the shared directory must forget their routes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forgetting {
    Silent,
    Noted,
}

/// One bounded batch of pruning in one transaction.
pub fn prune_batch(
    txn: &WriteTransaction,
    now: u64,
    retention: &Retention,
    forgetting: Forgetting,
) -> Result<Pruned, StoreError> {
    let noted = forgetting == Forgetting::Noted;
    let sessions = graph::prune_sessions(txn, now, &retention.sessions, SESSION_BATCH, noted, |record| {
        // A revoked session is needed until its cascade's leaves are signed:
        // signing reads the session's subject and user from the graph.
        match &record.revoked {
            Some(revocation) => cascade::dispatching(txn, &revocation.txn),
            None => Ok(false),
        }
    })?;
    let cascades = cascade::prune_completed(txn, now.saturating_sub(retention.cascade_ms), LEAF_BATCH)?;
    Ok(Pruned {
        sessions: sessions.removed,
        sessions_kept: sessions.postponed,
        cascades: cascades.cascades,
        leaves: cascades.leaves,
        latency_rows: cascades.latency_rows,
        replay_records: crate::replay::prune(
            txn,
            now,
            crate::replay::kept_ms(retention.max_set_age_secs),
            RECORD_BATCH,
        )?,
        pending_touches: graph::prune_pending_touches(txn, now, RECORD_BATCH, noted)?,
    })
}

/// Prunes `store` batch after batch until a batch finds less than its
/// bounds; returns the total.
pub async fn prune_store(store: &Store, retention: Retention, forgetting: Forgetting) -> Result<Pruned, StoreError> {
    let mut total = Pruned::default();
    loop {
        let batch = store.write(Commit::Lazy, move |txn| prune_batch(txn, now_ms(), &retention, forgetting)).await?;
        batch.record_metrics();
        total.add(batch);
        if !batch.filled() {
            return Ok(total);
        }
        // The next batch queues behind whatever ingest queued meanwhile.
        tokio::task::yield_now().await;
    }
}
