//! The durable outbox: signed SETs waiting for their stream's receiver.
//!
//! A SET counts as emitted once its outbox row is durably committed; it
//! leaves the outbox when the receiver acknowledges it (push 202, poll ack)
//! or when delivery gives up, into the dead-letter table an operator can
//! replay from. Rows are keyed by (stream, sequence) so each stream reads its
//! own queue in order, and indexed by `jti` so a poll `ack` finds its row
//! and can be checked to belong to the acknowledging stream.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::health::StreamHealth;
use crate::store::{Commit, Store, StoreError, decode, encode};

const OUTBOX: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("outbox");
const JTI_INDEX: TableDefinition<&str, (&str, u64)> = TableDefinition::new("outbox_jti");
const DEAD_LETTERS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("dead_letters");
/// (failed at, stream, seq): the dead letters by age, for retention.
const DEAD_BY_AGE: TableDefinition<(u64, &str, u64), ()> = TableDefinition::new("dead_letters_by_age");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const NEXT_SEQ: &str = "outbox_seq";

/// A SET to put in the outbox.
#[derive(Clone, Debug)]
pub struct NewSet {
    pub stream_id: String,
    pub jti: String,
    /// The signed compact SET.
    pub token: String,
    /// The SET's `txn`, carried for reporting.
    pub txn: Option<String>,
}

/// An outbox row.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct QueuedSet {
    pub jti: String,
    pub token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txn: Option<String>,
    /// When the SET entered the outbox, ms since the epoch.
    pub enqueued_at_ms: u64,
}

/// An outbox row with its place in the stream's queue.
#[derive(Clone, Debug, PartialEq)]
pub struct Pending {
    pub seq: u64,
    pub set: QueuedSet,
}

/// A SET delivery gave up on.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DeadLetter {
    pub stream_id: String,
    pub seq: u64,
    pub set: QueuedSet,
    /// RFC 8935 `err` from the receiver, or why delivery gave up.
    pub err: String,
    pub description: String,
    pub failed_at_ms: u64,
}

/// How a SET left the outbox.
#[derive(Clone, Debug)]
pub struct SetOutcome<'a> {
    pub stream_id: &'a str,
    pub set: &'a QueuedSet,
    /// Acknowledged by the receiver (push 2xx, poll ack); otherwise dead-lettered.
    pub delivered: bool,
    pub at_ms: u64,
    pub err: Option<&'a str>,
}

/// Records delivery outcomes inside the very transaction that takes the SETs
/// out of the outbox, so an outcome is on disk exactly when its SET is gone
/// from the queue: a crash can lose both (and the SET is sent again) but
/// never one without the other. The hub records leaf latencies here.
pub trait OutcomeSink: Send + Sync {
    /// Called inside the outbox's write transaction; must write nothing when it fails.
    fn record(&self, txn: &WriteTransaction, outcomes: &[SetOutcome<'_>]) -> Result<(), StoreError>;

    /// Called once that transaction has committed: where outcomes are told
    /// to others (another instance must never hear of an outcome that a
    /// failed transaction then undid).
    fn committed(&self, _outcomes: &[SetOutcome<'_>]) {}
}

/// A sink that records nothing.
pub struct NoSink;

impl OutcomeSink for NoSink {
    fn record(&self, _: &WriteTransaction, _: &[SetOutcome<'_>]) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The outbox, with one wake-up signal per stream.
pub struct Outbox {
    store: Store,
    sink: Arc<dyn OutcomeSink>,
    wakers: Mutex<HashMap<String, Arc<Notify>>>,
    health: StreamHealth,
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn storage<E: std::fmt::Display>(error: E) -> StoreError {
    StoreError::storage(error)
}

impl Outbox {
    /// The outbox in `store`, reporting outcomes to `sink`.
    pub fn new(store: Store, sink: Arc<dyn OutcomeSink>) -> Self {
        Outbox { store, sink, wakers: Mutex::new(HashMap::new()), health: StreamHealth::default() }
    }

    /// The store this outbox lives in.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Delivery health of the streams delivered from here.
    pub fn health(&self) -> &StreamHealth {
        &self.health
    }

    /// Tells committed outcomes to the stream health and the sink.
    fn settled(&self, outcomes: &[SetOutcome<'_>]) {
        for outcome in outcomes {
            if outcome.delivered {
                self.health.delivered(outcome.stream_id, &outcome.set.jti, outcome.at_ms);
            } else {
                let reason = outcome.err.unwrap_or("failed");
                self.health.dead_lettered(outcome.stream_id, &outcome.set.jti, reason, outcome.at_ms);
            }
        }
        self.sink.committed(outcomes);
    }

    /// Inserts `sets` inside a caller's write transaction, so they commit
    /// together with the caller's own writes. Call [`Outbox::wake`] for each
    /// stream after the commit.
    pub fn insert<'a>(txn: &WriteTransaction, sets: impl IntoIterator<Item = &'a NewSet>) -> Result<(), StoreError> {
        let now = now_ms();
        let mut counters = txn.open_table(COUNTERS).map_err(storage)?;
        let mut seq = counters.get(NEXT_SEQ).map_err(storage)?.map(|v| v.value()).unwrap_or(1);
        let mut outbox = txn.open_table(OUTBOX).map_err(storage)?;
        let mut index = txn.open_table(JTI_INDEX).map_err(storage)?;
        for set in sets {
            // The same SET imported twice (a shared log read again after a
            // failover) is queued once, so acknowledging its jti settles it.
            if index.get(set.jti.as_str()).map_err(storage)?.is_some_and(|entry| entry.value().0 == set.stream_id) {
                continue;
            }
            let row =
                QueuedSet { jti: set.jti.clone(), token: set.token.clone(), txn: set.txn.clone(), enqueued_at_ms: now };
            outbox.insert((set.stream_id.as_str(), seq), encode(&row)?.as_slice()).map_err(storage)?;
            index.insert(set.jti.as_str(), (set.stream_id.as_str(), seq)).map_err(storage)?;
            seq += 1;
        }
        counters.insert(NEXT_SEQ, seq).map_err(storage)?;
        Ok(())
    }

    /// Durably enqueues `sets` and wakes their streams' deliverers.
    pub async fn enqueue(&self, sets: Vec<NewSet>) -> Result<(), StoreError> {
        let streams: BTreeSet<String> = sets.iter().map(|set| set.stream_id.clone()).collect();
        self.store.write(Commit::Durable, move |txn| Outbox::insert(txn, &sets)).await?;
        for stream_id in &streams {
            self.wake(stream_id);
        }
        Ok(())
    }

    /// The wake-up signal of a stream: notified whenever its queue grows or
    /// its status changes.
    pub fn waker(&self, stream_id: &str) -> Arc<Notify> {
        let mut wakers = self.wakers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        Arc::clone(wakers.entry(stream_id.to_owned()).or_default())
    }

    /// Wakes whoever waits on the stream: its push deliverer (which keeps the
    /// permit if it is busy) and every long poll.
    pub fn wake(&self, stream_id: &str) {
        let waker = self.waker(stream_id);
        waker.notify_waiters();
        waker.notify_one();
    }

    /// Up to `limit` queued SETs of a stream with sequence above `after`, in order.
    pub fn pending(&self, stream_id: &str, after: u64, limit: usize) -> Result<Vec<Pending>, StoreError> {
        self.store.read(|txn| {
            let outbox = match txn.open_table(OUTBOX) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(error) => return Err(storage(error)),
            };
            let range = outbox.range((stream_id, after.saturating_add(1))..=(stream_id, u64::MAX)).map_err(storage)?;
            let mut found = Vec::new();
            for entry in range.take(limit) {
                let (key, value) = entry.map_err(storage)?;
                found.push(Pending { seq: key.value().1, set: decode(value.value())? });
            }
            Ok(found)
        })
    }

    /// How many SETs wait for a stream and how many were dead-lettered,
    /// each counted up to `cap` (a page showing them stays cheap however
    /// long a queue grows).
    pub fn counts_up_to(&self, stream_id: &str, cap: usize) -> Result<(u64, u64), StoreError> {
        self.store.read(|txn| {
            let mut counts = [0u64; 2];
            for (count, table) in counts.iter_mut().zip([OUTBOX, DEAD_LETTERS]) {
                let rows = match txn.open_table(table) {
                    Ok(rows) => rows,
                    Err(redb::TableError::TableDoesNotExist(_)) => continue,
                    Err(error) => return Err(storage(error)),
                };
                *count = rows.range((stream_id, 0)..=(stream_id, u64::MAX)).map_err(storage)?.take(cap).count() as u64;
            }
            Ok((counts[0], counts[1]))
        })
    }

    /// How many SETs wait for a stream.
    pub fn depth(&self, stream_id: &str) -> Result<u64, StoreError> {
        self.store.read(|txn| {
            let outbox = match txn.open_table(OUTBOX) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
                Err(error) => return Err(storage(error)),
            };
            let range = outbox.range((stream_id, 0)..=(stream_id, u64::MAX)).map_err(storage)?;
            Ok(range.count() as u64)
        })
    }

    /// Removes SETs receivers acknowledged by push, `(stream, seq, acked_at_ms)`,
    /// recording their outcomes in the same transaction. A lost removal only
    /// causes a redelivery of the same `jti`, so the commit is lazy.
    pub async fn remove_delivered(&self, delivered: Vec<(String, u64, u64)>) -> Result<(), StoreError> {
        let sink = Arc::clone(&self.sink);
        let removed = self
            .store
            .write(Commit::Lazy, move |txn| {
                let mut removed = Vec::with_capacity(delivered.len());
                {
                    let mut outbox = txn.open_table(OUTBOX).map_err(storage)?;
                    let mut index = txn.open_table(JTI_INDEX).map_err(storage)?;
                    for (stream_id, seq, at_ms) in &delivered {
                        let Some(row) = outbox.remove((stream_id.as_str(), *seq)).map_err(storage)? else { continue };
                        let set: QueuedSet = decode(row.value())?;
                        drop(row);
                        index.remove(set.jti.as_str()).map_err(storage)?;
                        removed.push((stream_id.clone(), set, *at_ms));
                    }
                }
                sink.record(txn, &delivered_outcomes(&removed))?;
                Ok(removed)
            })
            .await?;
        self.settled(&delivered_outcomes(&removed));
        Ok(())
    }

    /// Acknowledges SETs of `stream_id` by `jti` (RFC 8936 `ack`). A `jti`
    /// that is unknown or belongs to another stream is ignored, so no
    /// receiver can acknowledge another's events. Returns the removed rows.
    pub async fn ack(&self, stream_id: &str, jtis: Vec<String>) -> Result<Vec<QueuedSet>, StoreError> {
        let owned = stream_id.to_owned();
        let sink = Arc::clone(&self.sink);
        let at_ms = now_ms();
        let acked = self
            .store
            .write(Commit::Lazy, move |txn| {
                let mut outbox = txn.open_table(OUTBOX).map_err(storage)?;
                let mut index = txn.open_table(JTI_INDEX).map_err(storage)?;
                let mut acked = Vec::new();
                for jti in &jtis {
                    let seq = match index.get(jti.as_str()).map_err(storage)? {
                        Some(entry) if entry.value().0 == owned => entry.value().1,
                        _ => continue,
                    };
                    index.remove(jti.as_str()).map_err(storage)?;
                    if let Some(row) = outbox.remove((owned.as_str(), seq)).map_err(storage)? {
                        acked.push((owned.clone(), decode::<QueuedSet>(row.value())?, at_ms));
                    }
                }
                drop((outbox, index));
                sink.record(txn, &delivered_outcomes(&acked))?;
                Ok(acked)
            })
            .await?;
        self.settled(&delivered_outcomes(&acked));
        Ok(acked.into_iter().map(|(_, set, _)| set).collect())
    }

    /// Moves SETs of a stream to the dead letters with the reason given for
    /// each (`(seq or jti lookup, err, description)`); durable, because an
    /// operator must be able to find them.
    pub async fn dead_letter(&self, stream_id: &str, failures: Vec<Failure>) -> Result<Vec<DeadLetter>, StoreError> {
        let stream_id = stream_id.to_owned();
        let sink = Arc::clone(&self.sink);
        let moved = self
            .store
            .write(Commit::Durable, move |txn| {
                let mut outbox = txn.open_table(OUTBOX).map_err(storage)?;
                let mut index = txn.open_table(JTI_INDEX).map_err(storage)?;
                let mut dead = txn.open_table(DEAD_LETTERS).map_err(storage)?;
                let mut by_age = txn.open_table(DEAD_BY_AGE).map_err(storage)?;
                let mut moved = Vec::new();
                let now = now_ms();
                for failure in &failures {
                    let seq = match failure.target {
                        FailureTarget::Seq(seq) => seq,
                        FailureTarget::Jti(ref jti) => match index.get(jti.as_str()).map_err(storage)? {
                            Some(entry) if entry.value().0 == stream_id => entry.value().1,
                            _ => continue,
                        },
                    };
                    let Some(row) = outbox.remove((stream_id.as_str(), seq)).map_err(storage)? else { continue };
                    let set: QueuedSet = decode(row.value())?;
                    drop(row);
                    index.remove(set.jti.as_str()).map_err(storage)?;
                    let letter = DeadLetter {
                        stream_id: stream_id.clone(),
                        seq,
                        set,
                        err: failure.err.clone(),
                        description: failure.description.clone(),
                        failed_at_ms: now,
                    };
                    dead.insert((stream_id.as_str(), seq), encode(&letter)?.as_slice()).map_err(storage)?;
                    by_age.insert((now, stream_id.as_str(), seq), ()).map_err(storage)?;
                    moved.push(letter);
                }
                drop((outbox, index, dead, by_age));
                sink.record(txn, &failed_outcomes(&moved))?;
                Ok(moved)
            })
            .await?;
        self.settled(&failed_outcomes(&moved));
        Ok(moved)
    }

    /// Dead letters, of one stream or of all, in (stream, sequence) order:
    /// up to `limit` after the position `after`, and whether more follow.
    pub fn dead_letters(
        &self,
        stream_id: Option<&str>,
        after: Option<(&str, u64)>,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, bool), StoreError> {
        use std::ops::Bound;
        self.store.read(|txn| {
            let dead = match txn.open_table(DEAD_LETTERS) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok((Vec::new(), false)),
                Err(error) => return Err(storage(error)),
            };
            let lower = match (after, stream_id) {
                (Some(position), _) => Bound::Excluded(position),
                (None, Some(stream)) => Bound::Included((stream, 0)),
                (None, None) => Bound::Unbounded,
            };
            let upper = match stream_id {
                Some(stream) => Bound::Included((stream, u64::MAX)),
                None => Bound::Unbounded,
            };
            let mut letters = Vec::new();
            for row in dead.range::<(&str, u64)>((lower, upper)).map_err(storage)? {
                if letters.len() == limit {
                    return Ok((letters, true));
                }
                let (_, value) = row.map_err(storage)?;
                letters.push(decode(value.value())?);
            }
            Ok((letters, false))
        })
    }

    /// Puts dead letters of a stream back in its queue, same `jti` and token,
    /// and wakes its deliverer. `jtis` empty means all of the stream's.
    pub async fn replay(&self, stream_id: &str, jtis: Vec<String>) -> Result<usize, StoreError> {
        let owned = stream_id.to_owned();
        let replayed = self
            .store
            .write(Commit::Durable, move |txn| {
                let letters: Vec<DeadLetter> = {
                    let dead = txn.open_table(DEAD_LETTERS).map_err(storage)?;
                    let rows = dead.range((owned.as_str(), 0)..=(owned.as_str(), u64::MAX)).map_err(storage)?;
                    let mut letters = Vec::new();
                    for row in rows {
                        let (_, value) = row.map_err(storage)?;
                        let letter: DeadLetter = decode(value.value())?;
                        if jtis.is_empty() || jtis.contains(&letter.set.jti) {
                            letters.push(letter);
                        }
                    }
                    letters
                };
                let mut dead = txn.open_table(DEAD_LETTERS).map_err(storage)?;
                let mut by_age = txn.open_table(DEAD_BY_AGE).map_err(storage)?;
                for letter in &letters {
                    dead.remove((owned.as_str(), letter.seq)).map_err(storage)?;
                    by_age.remove((letter.failed_at_ms, owned.as_str(), letter.seq)).map_err(storage)?;
                }
                // Back at the tail of the queue with a fresh sequence (the
                // stream's deliverer has moved past the old one); same jti.
                let again: Vec<NewSet> = letters
                    .iter()
                    .map(|letter| NewSet {
                        stream_id: owned.clone(),
                        jti: letter.set.jti.clone(),
                        token: letter.set.token.clone(),
                        txn: letter.set.txn.clone(),
                    })
                    .collect();
                Outbox::insert(txn, &again)?;
                Ok(letters.len())
            })
            .await?;
        self.wake(stream_id);
        Ok(replayed)
    }

    /// Drops every queued SET of a stream (stream disabled or moved away).
    pub async fn purge(&self, stream_id: &str) -> Result<u64, StoreError> {
        let owned = stream_id.to_owned();
        let purged = self.store.write(Commit::Durable, move |txn| Outbox::purge_in(txn, &owned)).await?;
        self.wake(stream_id);
        Ok(purged)
    }

    /// [`Outbox::purge`] inside a caller's transaction.
    pub fn purge_in(txn: &WriteTransaction, stream_id: &str) -> Result<u64, StoreError> {
        let mut outbox = txn.open_table(OUTBOX).map_err(storage)?;
        let mut index = txn.open_table(JTI_INDEX).map_err(storage)?;
        let mut jtis = Vec::new();
        let removed = outbox.extract_from_if((stream_id, 0)..=(stream_id, u64::MAX), |_, _| true).map_err(storage)?;
        for row in removed {
            let (_, value) = row.map_err(storage)?;
            let set: QueuedSet = decode(value.value())?;
            jtis.push(set.jti);
        }
        for jti in &jtis {
            index.remove(jti.as_str()).map_err(storage)?;
        }
        Ok(jtis.len() as u64)
    }

    /// A deleted stream's queue and dead letters, inside a caller's
    /// transaction; call [`Outbox::forget_waker`] after it commits.
    pub fn forget_stream_in(txn: &WriteTransaction, stream_id: &str) -> Result<(), StoreError> {
        Outbox::purge_in(txn, stream_id)?;
        let mut dead = txn.open_table(DEAD_LETTERS).map_err(storage)?;
        let mut by_age = txn.open_table(DEAD_BY_AGE).map_err(storage)?;
        let letters = dead.extract_from_if((stream_id, 0)..=(stream_id, u64::MAX), |_, _| true).map_err(storage)?;
        for row in letters {
            let (_, value) = row.map_err(storage)?;
            let letter: DeadLetter = decode(value.value())?;
            by_age.remove((letter.failed_at_ms, stream_id, letter.seq)).map_err(storage)?;
        }
        Ok(())
    }

    /// Wakes whoever still waits on a deleted stream (they find it gone),
    /// then forgets its signal.
    pub fn forget_waker(&self, stream_id: &str) {
        self.wake(stream_id);
        self.wakers.lock().unwrap_or_else(|p| p.into_inner()).remove(stream_id);
        self.health.forget(stream_id);
    }

    /// Removes up to `limit` dead letters that failed before `horizon_ms`,
    /// oldest first; returns how many went.
    pub async fn prune_dead_letters(&self, horizon_ms: u64, limit: usize) -> Result<usize, StoreError> {
        self.store
            .write(Commit::Lazy, move |txn| {
                let old: Vec<(u64, String, u64)> = {
                    let by_age = txn.open_table(DEAD_BY_AGE).map_err(storage)?;
                    let mut old = Vec::new();
                    for row in by_age.range((0, "", 0)..(horizon_ms, "", 0)).map_err(storage)?.take(limit) {
                        let (key, _) = row.map_err(storage)?;
                        let (at, stream, seq) = key.value();
                        old.push((at, stream.to_owned(), seq));
                    }
                    old
                };
                let mut dead = txn.open_table(DEAD_LETTERS).map_err(storage)?;
                let mut by_age = txn.open_table(DEAD_BY_AGE).map_err(storage)?;
                for (at, stream, seq) in &old {
                    dead.remove((stream.as_str(), *seq)).map_err(storage)?;
                    by_age.remove((*at, stream.as_str(), *seq)).map_err(storage)?;
                }
                Ok(old.len())
            })
            .await
    }

    /// Dead-letters up to `limit` SETs of a stream that entered the outbox
    /// before `horizon_ms` and were never acknowledged (a poll stream nobody
    /// polls, a paused stream). Returns how many went.
    pub async fn expire(&self, stream_id: &str, horizon_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let mut failures = Vec::new();
        // Sequences follow enqueue order, so the old SETs come first.
        for pending in self.pending(stream_id, 0, limit)? {
            if pending.set.enqueued_at_ms >= horizon_ms {
                break;
            }
            failures.push(Failure {
                target: FailureTarget::Seq(pending.seq),
                err: "delivery_timeout".into(),
                description: "not acknowledged before the delivery give-up age".into(),
            });
        }
        if failures.is_empty() {
            return Ok(0);
        }
        Ok(self.dead_letter(stream_id, failures).await?.len())
    }

    /// Whether the SET `jti` still waits in the stream's queue.
    pub fn contains(&self, stream_id: &str, jti: &str) -> Result<bool, StoreError> {
        self.store.read(|txn| {
            let index = match txn.open_table(JTI_INDEX) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
                Err(error) => return Err(storage(error)),
            };
            Ok(index.get(jti).map_err(storage)?.is_some_and(|entry| entry.value().0 == stream_id))
        })
    }

    /// Total SETs waiting, across streams (for metrics and tests).
    pub fn total_depth(&self) -> Result<u64, StoreError> {
        self.store.read(|txn| match txn.open_table(OUTBOX) {
            Ok(table) => table.len().map_err(storage),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(error) => Err(storage(error)),
        })
    }
}

fn delivered_outcomes(removed: &[(String, QueuedSet, u64)]) -> Vec<SetOutcome<'_>> {
    removed
        .iter()
        .map(|(stream_id, set, at_ms)| SetOutcome { stream_id, set, delivered: true, at_ms: *at_ms, err: None })
        .collect()
}

fn failed_outcomes(letters: &[DeadLetter]) -> Vec<SetOutcome<'_>> {
    letters
        .iter()
        .map(|letter| SetOutcome {
            stream_id: &letter.stream_id,
            set: &letter.set,
            delivered: false,
            at_ms: letter.failed_at_ms,
            err: Some(letter.err.as_str()),
        })
        .collect()
}

/// Which queued SET failed.
#[derive(Clone, Debug)]
pub enum FailureTarget {
    Seq(u64),
    Jti(String),
}

/// One SET to dead-letter, and why.
#[derive(Clone, Debug)]
pub struct Failure {
    pub target: FailureTarget,
    pub err: String,
    pub description: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(stream: &str, jti: &str) -> NewSet {
        NewSet { stream_id: stream.into(), jti: jti.into(), token: format!("token-{jti}"), txn: Some("t1".into()) }
    }

    fn open() -> (tempfile::TempDir, Outbox) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("db.redb")).expect("open");
        (dir, Outbox::new(store, Arc::new(NoSink)))
    }

    fn jtis(pending: &[Pending]) -> Vec<&str> {
        pending.iter().map(|p| p.set.jti.as_str()).collect()
    }

    #[tokio::test]
    async fn each_stream_reads_its_own_queue_in_order() {
        let (_dir, outbox) = open();
        outbox.enqueue(vec![set("a", "1"), set("b", "2"), set("a", "3")]).await.expect("enqueue");
        outbox.enqueue(vec![set("a", "4")]).await.expect("enqueue");
        let a = outbox.pending("a", 0, 10).expect("pending");
        assert_eq!(jtis(&a), ["1", "3", "4"]);
        assert_eq!(jtis(&outbox.pending("b", 0, 10).expect("pending")), ["2"]);
        assert_eq!(jtis(&outbox.pending("a", a[0].seq, 1).expect("pending")), ["3"], "after + limit");
        assert!(outbox.pending("ab", 0, 10).expect("pending").is_empty(), "no prefix bleed");
        assert_eq!(outbox.depth("a").expect("depth"), 3);
    }

    #[tokio::test]
    async fn acks_only_remove_the_acknowledging_streams_sets() {
        let (_dir, outbox) = open();
        outbox.enqueue(vec![set("a", "1"), set("b", "2")]).await.expect("enqueue");
        let acked = outbox.ack("a", vec!["1".into(), "2".into(), "unknown".into()]).await.expect("ack");
        assert_eq!(acked.len(), 1, "stream a cannot acknowledge b's SET");
        assert!(outbox.pending("a", 0, 10).expect("pending").is_empty());
        assert_eq!(jtis(&outbox.pending("b", 0, 10).expect("pending")), ["2"]);
        assert!(outbox.ack("a", vec!["1".into()]).await.expect("ack").is_empty(), "second ack is a no-op");
    }

    #[tokio::test]
    async fn dead_letters_keep_the_set_and_replay_with_the_same_jti() {
        let (_dir, outbox) = open();
        outbox.enqueue(vec![set("a", "1"), set("a", "2")]).await.expect("enqueue");
        let first = outbox.pending("a", 0, 1).expect("pending")[0].seq;
        let failures = vec![
            Failure { target: FailureTarget::Seq(first), err: "invalid_key".into(), description: "bad key".into() },
            Failure { target: FailureTarget::Jti("2".into()), err: "gave_up".into(), description: "24 h".into() },
        ];
        let moved = outbox.dead_letter("a", failures).await.expect("dead letter");
        assert_eq!(moved.len(), 2);
        assert_eq!(outbox.depth("a").expect("depth"), 0);
        assert_eq!(outbox.dead_letters(Some("a"), None, 10).expect("list").0.len(), 2);
        assert!(outbox.dead_letters(Some("b"), None, 10).expect("list").0.is_empty());
        let (first, more) = outbox.dead_letters(None, None, 1).expect("page");
        assert!(more, "a second page follows");
        let after = Some((first[0].stream_id.as_str(), first[0].seq));
        let (second, more) = outbox.dead_letters(None, after, 1).expect("page");
        assert!(!more && second[0].seq != first[0].seq, "the cursor moves past the first");

        assert_eq!(outbox.replay("a", vec!["2".into()]).await.expect("replay"), 1);
        let back = outbox.pending("a", 0, 10).expect("pending");
        assert_eq!(jtis(&back), ["2"]);
        assert_eq!(back[0].set.token, "token-2", "same SET, same jti");
        assert_eq!(outbox.dead_letters(None, None, 10).expect("list").0.len(), 1);
    }

    #[tokio::test]
    async fn purge_and_remove_clear_rows_and_index() {
        let (_dir, outbox) = open();
        outbox.enqueue(vec![set("a", "1"), set("a", "2"), set("b", "3")]).await.expect("enqueue");
        let seq = outbox.pending("a", 0, 1).expect("pending")[0].seq;
        outbox.remove_delivered(vec![("a".into(), seq, 1)]).await.expect("remove");
        assert!(outbox.ack("a", vec!["1".into()]).await.expect("ack").is_empty(), "index entry gone");
        assert_eq!(outbox.purge("a").await.expect("purge"), 1);
        assert_eq!(outbox.total_depth().expect("depth"), 1);
    }

    #[tokio::test]
    async fn a_set_queued_twice_is_queued_once_and_its_ack_settles_it() {
        let (_dir, outbox) = open();
        // A shared log read again after a failover imports the same SET twice.
        outbox.enqueue(vec![set("a", "1")]).await.expect("enqueue");
        outbox.enqueue(vec![set("a", "1")]).await.expect("enqueue again");
        assert_eq!(outbox.depth("a").expect("depth"), 1);
        assert_eq!(outbox.ack("a", vec!["1".into()]).await.expect("ack").len(), 1);
        assert_eq!(outbox.depth("a").expect("depth"), 0, "nothing left that no ack can reach");
    }

    /// Records which outcomes it was told of, and when.
    #[derive(Default)]
    struct Told(Mutex<Vec<(&'static str, String)>>);

    impl OutcomeSink for Told {
        fn record(&self, _: &WriteTransaction, outcomes: &[SetOutcome<'_>]) -> Result<(), StoreError> {
            let mut told = self.0.lock().expect("lock");
            told.extend(outcomes.iter().map(|o| ("in the transaction", o.set.jti.clone())));
            Ok(())
        }

        fn committed(&self, outcomes: &[SetOutcome<'_>]) {
            let mut told = self.0.lock().expect("lock");
            told.extend(outcomes.iter().map(|o| ("committed", o.set.jti.clone())));
        }
    }

    #[tokio::test]
    async fn outcomes_are_told_in_the_transaction_then_after_the_commit() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("db.redb")).expect("open");
        let sink = Arc::new(Told::default());
        let outbox = Outbox::new(store, sink.clone());
        outbox.enqueue(vec![set("a", "1"), set("a", "2")]).await.expect("enqueue");
        outbox.ack("a", vec!["1".into()]).await.expect("ack");
        let failure = Failure { target: FailureTarget::Jti("2".into()), err: "e".into(), description: "d".into() };
        outbox.dead_letter("a", vec![failure]).await.expect("dead letter");
        let told = sink.0.lock().expect("lock").clone();
        let expected =
            [("in the transaction", "1"), ("committed", "1"), ("in the transaction", "2"), ("committed", "2")];
        assert_eq!(told, expected.map(|(when, jti)| (when, jti.to_owned())));
    }

    #[tokio::test]
    async fn enqueue_wakes_the_stream() {
        let (_dir, outbox) = open();
        let waker = outbox.waker("a");
        let woken = tokio::spawn(async move { waker.notified().await });
        tokio::task::yield_now().await;
        outbox.enqueue(vec![set("a", "1")]).await.expect("enqueue");
        tokio::time::timeout(std::time::Duration::from_secs(2), woken).await.expect("woken").expect("join");
    }
}
