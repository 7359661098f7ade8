//! Cascades and their leaves.
//!
//! A cascade is everything one IdP event causes: one leaf per (stream,
//! session), all sharing the cascade's `txn`. The plan (cascade record and
//! leaves with their `jti`s) is committed durably before the IdP gets its
//! 202; signing and enqueueing follow. A leaf still `planned` after a crash
//! is signed again with the same `jti` at start, so nothing planned is lost.
//!
//! Leaf latency runs from when the leaf was planned (the ingest of the IdP
//! event, or the late touch that created it) to the receiver's acknowledgement.

use std::collections::BTreeMap;

mod latencies;

use caep_transmitter::store::{StoreError, decode, encode};
use redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[cfg(test)]
use latencies::LATENCIES;
use latencies::{LatencyCounts, add_latencies, remove_latencies};

const CASCADES: TableDefinition<&str, &[u8]> = TableDefinition::new("cascades");
const LEAVES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("cascade_leaves");
/// Keys of the cascades with leaves still planned (`undispatched > 0`).
const UNDISPATCHED: TableDefinition<&str, ()> = TableDefinition::new("cascades_undispatched");
/// (completed at, key) of complete cascades, for retention. An entry whose
/// cascade reopened (a late leaf) is stale, and dropped when met.
const COMPLETED: TableDefinition<(u64, &str), ()> = TableDefinition::new("cascades_completed");
/// Pruned cascades whose leaves are still being removed (in bounded
/// batches): key → the completion time; only leaves planned by then go.
const PRUNING: TableDefinition<&str, u64> = TableDefinition::new("cascades_pruning");
/// Cascades not yet complete, by key, with when they started: what the
/// console lists as in progress without reading every kept cascade.
const OPEN: TableDefinition<&str, u64> = TableDefinition::new("cascades_open");

/// One event a cascade's leaves carry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CascadeEvent {
    pub event_type: String,
    pub event: Value,
}

/// One cascade: everything one cause (one IdP `txn`) sent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CascadeRecord {
    /// Where the cascade is stored: [`key`] of its IdP and `txn`.
    pub key: String,
    /// The `txn` every leaf carries on the wire.
    pub txn: String,
    /// What the cascade started from, e.g. `session:S1` or `user:...`.
    pub root: String,
    /// The IdP that caused it.
    pub issuer: String,
    /// The first event's type (for reports).
    pub event_type: String,
    /// Every event of this cause; each leaf names the one it carries. IdPs
    /// may send several events with one `txn` (SSF: SETs with one cause).
    pub events: Vec<CascadeEvent>,
    pub started_at_ms: u64,
    pub total: u64,
    /// Leaves still `planned` (not yet in the outbox): what a restart must
    /// sign again.
    #[serde(default)]
    pub undispatched: u64,
    pub delivered: u64,
    pub failed: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at_ms: Option<u64>,
}

/// Where a leaf is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LeafStatus {
    /// Committed in the plan, not yet signed into the outbox.
    Planned,
    /// In the outbox.
    Pending,
    /// Acknowledged by the receiver.
    Delivered,
    /// Dead-lettered.
    Failed,
}

/// One (stream, session) SET of a cascade.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Leaf {
    pub jti: String,
    pub stream_id: String,
    /// The session's graph key; its subject and user are read from the
    /// graph when the leaf is signed, rather than copied into every leaf.
    pub session_id: String,
    /// Whether the SET may name the session's user to this stream (the
    /// disclosure rule: the receiver showed it knew the user).
    #[serde(default)]
    pub with_user: bool,
    /// Index of the event it carries in the cascade's `events`.
    #[serde(default)]
    pub event: usize,
    pub planned_at_ms: u64,
    pub status: LeafStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub err: Option<String>,
}

impl CascadeRecord {
    /// The same cascade with no events or leaves counted yet: where another
    /// partition's part of it starts.
    pub fn template(&self) -> CascadeRecord {
        CascadeRecord {
            events: Vec::new(),
            total: 0,
            undispatched: 0,
            delivered: 0,
            failed: 0,
            completed_at_ms: None,
            ..self.clone()
        }
    }
}

impl Leaf {
    /// Milliseconds from plan to acknowledgement, once acknowledged.
    pub fn latency_ms(&self) -> Option<u64> {
        self.acked_at_ms.map(|acked| acked.saturating_sub(self.planned_at_ms))
    }
}

fn storage<E: std::fmt::Display>(error: E) -> StoreError {
    StoreError::storage(error)
}

/// A cascade by key, inside a write transaction.
pub fn cascade(txn: &WriteTransaction, key: &str) -> Result<Option<CascadeRecord>, StoreError> {
    let table = txn.open_table(CASCADES).map_err(storage)?;
    let row = table.get(key).map_err(storage)?;
    row.map(|value| decode(value.value())).transpose()
}

/// Writes a cascade record, keeping the index of cascades with leaves still
/// planned in step with it.
fn put_cascade(txn: &WriteTransaction, record: &CascadeRecord) -> Result<(), StoreError> {
    let bytes = encode(record)?;
    txn.open_table(CASCADES).map_err(storage)?.insert(record.key.as_str(), bytes.as_slice()).map_err(storage)?;
    let mut index = txn.open_table(UNDISPATCHED).map_err(storage)?;
    if record.undispatched > 0 {
        index.insert(record.key.as_str(), ()).map_err(storage)?;
    } else {
        index.remove(record.key.as_str()).map_err(storage)?;
    }
    let mut open = txn.open_table(OPEN).map_err(storage)?;
    if let Some(completed) = record.completed_at_ms {
        txn.open_table(COMPLETED).map_err(storage)?.insert((completed, record.key.as_str()), ()).map_err(storage)?;
        open.remove(record.key.as_str()).map_err(storage)?;
    } else {
        open.insert(record.key.as_str(), record.started_at_ms).map_err(storage)?;
    }
    Ok(())
}

/// Whether the cascade `key` still has leaves to sign and hand over.
pub fn dispatching(txn: &WriteTransaction, key: &str) -> Result<bool, StoreError> {
    Ok(txn.open_table(UNDISPATCHED).map_err(storage)?.get(key).map_err(storage)?.is_some())
}

/// What one retention pass removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CascadesPruned {
    pub cascades: usize,
    pub leaves: usize,
    /// Rows of the pruned cascades' latency histograms.
    pub latency_rows: usize,
}

impl CascadesPruned {
    /// Leaf and latency rows removed: what the budget bounds.
    pub fn rows(&self) -> usize {
        self.leaves + self.latency_rows
    }
}

/// Removes cascades complete since before `horizon_ms` (their reports
/// answer 404 from then on) and their leaves and latency rows, at most about
/// `leaf_budget` rows per call; the rest of a large cascade's go in later calls.
/// An incomplete cascade is never pruned: it has leaves still to deliver.
pub fn prune_completed(
    txn: &WriteTransaction,
    horizon_ms: u64,
    leaf_budget: usize,
) -> Result<CascadesPruned, StoreError> {
    let mut pruned = CascadesPruned::default();
    loop {
        let (leaves, latency_rows) = remove_pruned_leaves(txn, leaf_budget.saturating_sub(pruned.rows()))?;
        pruned.leaves += leaves;
        pruned.latency_rows += latency_rows;
        if pruned.rows() >= leaf_budget || pruned.cascades >= leaf_budget {
            return Ok(pruned);
        }
        let first = {
            let completed = txn.open_table(COMPLETED).map_err(storage)?;
            let mut rows = completed.range((0, "")..(horizon_ms, "")).map_err(storage)?;
            match rows.next() {
                Some(row) => {
                    let (key, _) = row.map_err(storage)?;
                    let (at, cascade) = key.value();
                    Some((at, cascade.to_owned()))
                }
                None => None,
            }
        };
        let Some((at, key)) = first else { return Ok(pruned) };
        txn.open_table(COMPLETED).map_err(storage)?.remove((at, key.as_str())).map_err(storage)?;
        let Some(record) = cascade(txn, &key)? else { continue };
        if record.completed_at_ms != Some(at) {
            continue; // reopened since: a stale entry
        }
        txn.open_table(CASCADES).map_err(storage)?.remove(key.as_str()).map_err(storage)?;
        txn.open_table(UNDISPATCHED).map_err(storage)?.remove(key.as_str()).map_err(storage)?;
        txn.open_table(PRUNING).map_err(storage)?.insert(key.as_str(), at).map_err(storage)?;
        pruned.cascades += 1;
    }
}

/// Removes up to `budget` leaves and latency rows of pruned cascades;
/// returns how many of each.
fn remove_pruned_leaves(txn: &WriteTransaction, budget: usize) -> Result<(usize, usize), StoreError> {
    let (mut removed, mut latency_rows) = (0, 0);
    while removed + latency_rows < budget {
        let first = {
            let pruning = txn.open_table(PRUNING).map_err(storage)?;
            let mut rows = pruning.iter().map_err(storage)?;
            match rows.next() {
                Some(row) => {
                    let (key, until) = row.map_err(storage)?;
                    Some((key.value().to_owned(), until.value()))
                }
                None => None,
            }
        };
        let Some((key, until)) = first else { break };
        let end = crate::graph::after(&key);
        let (jtis, exhausted) = {
            let leaves = txn.open_table(LEAVES).map_err(storage)?;
            let mut jtis = Vec::new();
            let mut exhausted = true;
            for row in leaves.range((key.as_str(), "")..(end.as_str(), "")).map_err(storage)? {
                let (leaf_key, value) = row.map_err(storage)?;
                // A leaf planned after completion belongs to the cascade as
                // re-created for a late touch: it stays.
                if decode::<Leaf>(value.value())?.planned_at_ms <= until {
                    if jtis.len() >= budget - removed - latency_rows {
                        exhausted = false;
                        break;
                    }
                    jtis.push(leaf_key.value().1.to_owned());
                }
            }
            (jtis, exhausted)
        };
        let mut leaves = txn.open_table(LEAVES).map_err(storage)?;
        for jti in &jtis {
            leaves.remove((key.as_str(), jti.as_str())).map_err(storage)?;
        }
        removed += jtis.len();
        if exhausted {
            // Then its latency rows, from the same budget.
            let (rows, all_gone) = remove_latencies(txn, &key, budget - removed - latency_rows)?;
            latency_rows += rows;
            if all_gone {
                txn.open_table(PRUNING).map_err(storage)?.remove(key.as_str()).map_err(storage)?;
            }
        }
    }
    Ok((removed, latency_rows))
}

/// Cascades still in progress (up to `limit`, newest first) and how many
/// there are, followed by the `limit` most recently completed.
pub fn recent(txn: &ReadTransaction, limit: usize) -> Result<RecentCascades, StoreError> {
    use redb::ReadableTableMetadata;
    let mut recent = RecentCascades::default();
    let cascades = match txn.open_table(CASCADES) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(recent),
        Err(error) => return Err(storage(error)),
    };
    let read = |key: &str| -> Result<Option<CascadeRecord>, StoreError> {
        cascades.get(key).map_err(storage)?.map(|row| decode(row.value())).transpose()
    };
    if let Ok(open) = txn.open_table(OPEN) {
        recent.open_total = open.len().map_err(storage)?;
        let mut started: Vec<(u64, String)> = Vec::new();
        for row in open.iter().map_err(storage)? {
            let (key, at) = row.map_err(storage)?;
            started.push((at.value(), key.value().to_owned()));
        }
        started.sort_unstable_by(|a, b| b.cmp(a));
        for (_, key) in started.into_iter().take(limit) {
            recent.open.extend(read(&key)?.filter(|record| record.completed_at_ms.is_none()));
        }
    }
    if let Ok(completed) = txn.open_table(COMPLETED) {
        for row in completed.iter().map_err(storage)?.rev() {
            if recent.completed.len() >= limit {
                break;
            }
            let (entry, _) = row.map_err(storage)?;
            let (at, key) = entry.value();
            // A stale entry: the cascade was reopened (a late touch) since.
            recent.completed.extend(read(key)?.filter(|record| record.completed_at_ms == Some(at)));
        }
    }
    Ok(recent)
}

/// What [`recent`] lists.
#[derive(Debug, Default)]
pub struct RecentCascades {
    pub open: Vec<CascadeRecord>,
    pub open_total: u64,
    pub completed: Vec<CascadeRecord>,
}

/// How many cascade records are kept.
pub fn cascade_count(txn: &ReadTransaction) -> Result<u64, StoreError> {
    use redb::ReadableTableMetadata;
    match txn.open_table(CASCADES) {
        Ok(table) => table.len().map_err(storage),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
        Err(error) => Err(storage(error)),
    }
}

/// The key of `issuer`'s cascade with wire `txn`: the pair, so two IdPs
/// using one `txn` never share a cascade, whatever `txn` either chooses.
pub fn key(issuer: &str, txn: &str) -> String {
    crate::scope::scoped(issuer, txn)
}

/// Told a cascade's new leaves while the transaction planning them is still
/// open, so they can start signing before it commits. Safe because signed
/// leaves are handed over only once that run of the write committed
/// (`dispatch::PlanningRuns`), and then only by [`mark_pending`], which moves
/// only leaves that exist and are still planned.
pub type OnPlanned<'a> = &'a (dyn Fn(&CascadeRecord, &[Leaf]) + 'a);

/// Adds leaves carrying `event` to the cascade `template.key` (created from
/// `template` if new), all `planned`, telling `on_planned` about them before
/// they are written. Returns the cascade and the leaves, each now naming its
/// event.
pub fn plan(
    txn: &WriteTransaction,
    template: &CascadeRecord,
    event: &CascadeEvent,
    mut leaves: Vec<Leaf>,
    on_planned: Option<OnPlanned<'_>>,
) -> Result<(CascadeRecord, Vec<Leaf>), StoreError> {
    let mut record = cascade(txn, &template.key)?.unwrap_or_else(|| template.clone());
    let index = match record.events.iter().position(|known| known == event) {
        Some(index) => index,
        None => {
            record.events.push(event.clone());
            record.events.len() - 1
        }
    };
    record.total += leaves.len() as u64;
    record.undispatched += leaves.len() as u64;
    if !leaves.is_empty() {
        record.completed_at_ms = None;
    } else if record.total == 0 {
        record.completed_at_ms = Some(record.started_at_ms);
    }
    for leaf in &mut leaves {
        leaf.event = index;
    }
    if let Some(hand_over) = on_planned
        && !leaves.is_empty()
    {
        hand_over(&record, &leaves);
    }
    {
        let mut table = txn.open_table(LEAVES).map_err(storage)?;
        for leaf in &leaves {
            table.insert((record.key.as_str(), leaf.jti.as_str()), encode(leaf)?.as_slice()).map_err(storage)?;
        }
    }
    put_cascade(txn, &record)?;
    Ok((record, leaves))
}

/// Merges leaves another instance planned (and handed to delivery) into the
/// cascade `planned.key` here, so its report is complete on every instance.
/// Leaves already known are left alone: a merge replayed after a crash, or
/// a plan sent twice, neither double-counts nor resets a delivered leaf.
pub fn merge_planned(txn: &WriteTransaction, planned: &CascadeRecord, leaves: &[Leaf]) -> Result<(), StoreError> {
    let mut record = cascade(txn, &planned.key)?.unwrap_or_else(|| planned.template());
    // Parts of one cascade start in several partitions: it started at the first.
    record.started_at_ms = record.started_at_ms.min(planned.started_at_ms);
    let mut added = 0;
    {
        let mut table = txn.open_table(LEAVES).map_err(storage)?;
        for leaf in leaves {
            let key = (planned.key.as_str(), leaf.jti.as_str());
            if table.get(key).map_err(storage)?.is_some() {
                continue;
            }
            let Some(event) = planned.events.get(leaf.event) else { continue };
            let index = match record.events.iter().position(|known| known == event) {
                Some(index) => index,
                None => {
                    record.events.push(event.clone());
                    record.events.len() - 1
                }
            };
            let merged = Leaf { event: index, status: LeafStatus::Pending, ..leaf.clone() };
            table.insert(key, encode(&merged)?.as_slice()).map_err(storage)?;
            added += 1;
        }
    }
    if added > 0 {
        record.total += added;
        record.completed_at_ms = None;
    } else if record.total == 0 {
        record.completed_at_ms = Some(record.started_at_ms);
    }
    put_cascade(txn, &record)
}

/// Marks planned leaves as in the outbox; returns the `jti`s that were still
/// planned (only those may be enqueued, so a retried dispatch enqueues none twice).
pub fn mark_pending(txn: &WriteTransaction, cascade_key: &str, jtis: &[String]) -> Result<Vec<String>, StoreError> {
    let mut moved = Vec::new();
    {
        let mut table = txn.open_table(LEAVES).map_err(storage)?;
        for jti in jtis {
            let Some(row) = table.get((cascade_key, jti.as_str())).map_err(storage)? else { continue };
            let mut leaf: Leaf = decode(row.value())?;
            drop(row);
            if leaf.status == LeafStatus::Planned {
                leaf.status = LeafStatus::Pending;
                table.insert((cascade_key, jti.as_str()), encode(&leaf)?.as_slice()).map_err(storage)?;
                moved.push(jti.clone());
            }
        }
    }
    if !moved.is_empty()
        && let Some(mut record) = cascade(txn, cascade_key)?
    {
        record.undispatched = record.undispatched.saturating_sub(moved.len() as u64);
        put_cascade(txn, &record)?;
    }
    Ok(moved)
}

/// Every leaf still planned, with its cascade (the restart recovery list).
pub fn all_planned(txn: &ReadTransaction) -> Result<Vec<(CascadeRecord, Vec<Leaf>)>, StoreError> {
    planned_before(txn, u64::MAX)
}

/// Leaves planned before `before_ms` and still not handed over, with their
/// cascades: what the periodic sweep dispatches again. Reads only the
/// cascades the `UNDISPATCHED` index names, so its cost follows the work
/// left, not the history kept.
pub fn planned_before(txn: &ReadTransaction, before_ms: u64) -> Result<Vec<(CascadeRecord, Vec<Leaf>)>, StoreError> {
    let (index, cascades, leaves) =
        match (txn.open_table(UNDISPATCHED), txn.open_table(CASCADES), txn.open_table(LEAVES)) {
            (Ok(index), Ok(cascades), Ok(leaves)) => (index, cascades, leaves),
            (Err(redb::TableError::TableDoesNotExist(_)), _, _) => return Ok(Vec::new()),
            (Err(error), _, _) | (_, Err(error), _) | (_, _, Err(error)) => return Err(storage(error)),
        };
    let mut out = Vec::new();
    for row in index.iter().map_err(storage)? {
        let (key, _) = row.map_err(storage)?;
        let key = key.value();
        let Some(value) = cascades.get(key).map_err(storage)? else { continue };
        let record: CascadeRecord = decode(value.value())?;
        let end = crate::graph::after(key);
        let mut planned = Vec::new();
        for leaf in leaves.range((key, "")..(end.as_str(), "")).map_err(storage)? {
            let (_, value) = leaf.map_err(storage)?;
            let leaf: Leaf = decode(value.value())?;
            if leaf.status == LeafStatus::Planned && leaf.planned_at_ms < before_ms {
                planned.push(leaf);
            }
        }
        if !planned.is_empty() {
            out.push((record, planned));
        }
    }
    Ok(out)
}

/// A delivery outcome reported by the transmitter.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Outcome {
    /// The cascade key (carried as the outbox row's `txn`).
    pub txn: String,
    pub jti: String,
    pub delivered: bool,
    pub at_ms: u64,
    pub err: Option<String>,
}

/// What applying outcomes changed: leaf latencies and cascades completed.
#[derive(Debug, Default)]
pub struct Applied {
    pub leaf_latencies_ms: Vec<u64>,
    pub completed: Vec<(String, u64)>,
}

/// Applies outcomes to leaves and cascade counters. A leaf counts once:
/// a duplicate acknowledgement (a retry that crossed a 202) changes nothing.
pub fn apply_outcomes(txn: &WriteTransaction, outcomes: &[Outcome]) -> Result<Applied, StoreError> {
    let mut applied = Applied::default();
    let mut touched: BTreeMap<String, Settled> = BTreeMap::new();
    {
        let mut table = txn.open_table(LEAVES).map_err(storage)?;
        for outcome in outcomes {
            let key = (outcome.txn.as_str(), outcome.jti.as_str());
            let Some(row) = table.get(key).map_err(storage)? else { continue };
            let mut leaf: Leaf = decode(row.value())?;
            drop(row);
            if matches!(leaf.status, LeafStatus::Delivered | LeafStatus::Failed) {
                continue;
            }
            let settled = touched.entry(outcome.txn.clone()).or_default();
            // A leaf settled before it was handed over (its stream vanished
            // while it was signed) is no longer waiting for dispatch either.
            if leaf.status == LeafStatus::Planned {
                settled.were_planned += 1;
            }
            if outcome.delivered {
                leaf.status = LeafStatus::Delivered;
                leaf.acked_at_ms = Some(outcome.at_ms);
                let latency = outcome.at_ms.saturating_sub(leaf.planned_at_ms);
                applied.leaf_latencies_ms.push(latency);
                *settled.latencies.entry(latency).or_default() += 1;
                settled.delivered += 1;
            } else {
                leaf.status = LeafStatus::Failed;
                leaf.err = outcome.err.clone();
                settled.failed += 1;
            }
            settled.last_at = settled.last_at.max(outcome.at_ms);
            table.insert(key, encode(&leaf)?.as_slice()).map_err(storage)?;
        }
    }
    for (cascade_txn, settled) in touched {
        add_latencies(txn, &cascade_txn, &settled.latencies)?;
        let Some(mut record) = cascade(txn, &cascade_txn)? else { continue };
        record.delivered += settled.delivered;
        record.failed += settled.failed;
        record.undispatched = record.undispatched.saturating_sub(settled.were_planned);
        if record.delivered + record.failed >= record.total && record.completed_at_ms.is_none() {
            record.completed_at_ms = Some(settled.last_at);
            applied.completed.push((cascade_txn.clone(), settled.last_at.saturating_sub(record.started_at_ms)));
        }
        put_cascade(txn, &record)?;
    }
    Ok(applied)
}

/// What outcomes did to one cascade's counters.
#[derive(Default)]
struct Settled {
    delivered: u64,
    failed: u64,
    were_planned: u64,
    last_at: u64,
    /// Delivered leaves by latency (ms → how many), for the histogram.
    latencies: BTreeMap<u64, u64>,
}

/// The cascade with key `id` and every one of its leaves, from a read snapshot.
pub fn cascade_and_leaves(txn: &ReadTransaction, id: &str) -> Result<Option<(CascadeRecord, Vec<Leaf>)>, StoreError> {
    let Some(record) = cascade_in(txn, id)? else { return Ok(None) };
    Ok(Some((record, leaves_in(txn, id)?)))
}

/// The cascade with key `id`, from a read snapshot.
fn cascade_in(txn: &ReadTransaction, id: &str) -> Result<Option<CascadeRecord>, StoreError> {
    let cascades = match txn.open_table(CASCADES) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(error) => return Err(storage(error)),
    };
    cascades.get(id).map_err(storage)?.map(|row| decode(row.value())).transpose()
}

/// Every leaf of the cascade `id`, from a read snapshot.
fn leaves_in(txn: &ReadTransaction, id: &str) -> Result<Vec<Leaf>, StoreError> {
    let table = match txn.open_table(LEAVES) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(error) => return Err(storage(error)),
    };
    let mut leaves = Vec::new();
    let end = crate::graph::after(id);
    for row in table.range((id, "")..(end.as_str(), "")).map_err(storage)? {
        let (_, value) = row.map_err(storage)?;
        leaves.push(decode::<Leaf>(value.value())?);
    }
    Ok(leaves)
}

/// The `GET /admin/cascades/{txn}` report.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct CascadeReport {
    pub txn: String,
    /// The IdP whose event caused it.
    pub issuer: String,
    pub root: String,
    pub event_type: String,
    pub started_at: u64,
    pub total: u64,
    pub delivered: u64,
    pub pending: u64,
    pub failed: u64,
    pub complete: bool,
    pub p50_ms: Option<u64>,
    pub p99_ms: Option<u64>,
    pub max_ms: Option<u64>,
    /// From the IdP event's ingest to the last leaf's acknowledgement.
    pub cascade_ms: Option<u64>,
    /// Every leaf; left out of a summary (`?leaves=false`), which a 10,000-leaf
    /// cascade's watcher can poll cheaply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leaves: Option<Vec<LeafReport>>,
}

/// One leaf in a report.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct LeafReport {
    pub stream_id: String,
    pub session_id: String,
    pub jti: String,
    pub status: LeafStatus,
    pub latency_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub err: Option<String>,
}

/// Builds the report of the cascade with key `id` from a read snapshot,
/// listing its leaves when `with_leaves`. Its counts are the cascade
/// record's and its percentiles come from the latency histogram, so a
/// summary reads a few rows however many leaves the cascade has.
pub fn report(txn: &ReadTransaction, id: &str, with_leaves: bool) -> Result<Option<CascadeReport>, StoreError> {
    let Some(record) = cascade_in(txn, id)? else { return Ok(None) };
    let leaves = with_leaves.then(|| leaves_in(txn, id)).transpose()?;
    let latencies = match (LatencyCounts::stored(txn, id, record.delivered)?, &leaves) {
        (Some(latencies), _) => latencies,
        (None, Some(leaves)) => LatencyCounts::of(leaves),
        (None, None) => LatencyCounts::of(&leaves_in(txn, id)?),
    };
    Ok(Some(CascadeReport {
        txn: record.txn,
        issuer: record.issuer,
        root: record.root,
        event_type: record.event_type,
        started_at: record.started_at_ms,
        total: record.total,
        delivered: record.delivered,
        pending: record.total.saturating_sub(record.delivered + record.failed),
        failed: record.failed,
        complete: record.completed_at_ms.is_some(),
        p50_ms: latencies.percentile(50),
        p99_ms: latencies.percentile(99),
        max_ms: latencies.max(),
        cascade_ms: record.completed_at_ms.map(|done| done.saturating_sub(record.started_at_ms)),
        leaves: leaves.map(|leaves| {
            leaves
                .into_iter()
                .map(|leaf| LeafReport {
                    latency_ms: leaf.latency_ms(),
                    stream_id: leaf.stream_id,
                    session_id: crate::scope::local_id(&leaf.session_id).to_owned(),
                    jti: leaf.jti,
                    status: leaf.status,
                    err: leaf.err,
                })
                .collect()
        }),
    }))
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[u64], p: u32) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (sorted.len() * p as usize).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

#[cfg(test)]
mod tests;
