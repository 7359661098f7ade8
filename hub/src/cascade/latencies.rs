//! Each cascade's latency histogram: delivered leaves counted by latency,
//! so a summary's percentiles come from a few rows rather than from every
//! leaf.

use std::collections::BTreeMap;

use caep_transmitter::store::StoreError;
use redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};

use super::{Leaf, storage};

/// Delivered leaves by latency, per cascade: (key, latency ms) → how many.
/// A summary's percentiles come from these few rows (one per distinct
/// millisecond) instead of from decoding every leaf, so a watcher polling a
/// 10,000-leaf cascade does not slow it down. Written with the leaves'
/// outcomes; removed with the cascade's leaves when it is pruned.
pub(super) const LATENCIES: TableDefinition<(&str, u64), u64> = TableDefinition::new("cascade_latencies");

/// Counts delivered leaves' latencies (ms → how many) into the histogram
/// of the cascade `key`.
pub(super) fn add_latencies(
    txn: &WriteTransaction,
    key: &str,
    latencies: &BTreeMap<u64, u64>,
) -> Result<(), StoreError> {
    if latencies.is_empty() {
        return Ok(());
    }
    let mut table = txn.open_table(LATENCIES).map_err(storage)?;
    for (&latency, &count) in latencies {
        let known = table.get((key, latency)).map_err(storage)?.map_or(0, |count| count.value());
        table.insert((key, latency), known + count).map_err(storage)?;
    }
    Ok(())
}

/// Removes up to `budget` latency rows of the cascade `key`; returns how
/// many, and whether none are left.
pub(super) fn remove_latencies(txn: &WriteTransaction, key: &str, budget: usize) -> Result<(usize, bool), StoreError> {
    let mut table = txn.open_table(LATENCIES).map_err(storage)?;
    let mut rows = Vec::new();
    let mut all_gone = true;
    for row in table.range((key, 0)..=(key, u64::MAX)).map_err(storage)? {
        if rows.len() >= budget {
            all_gone = false;
            break;
        }
        rows.push(row.map_err(storage)?.0.value().1);
    }
    for latency in &rows {
        table.remove((key, *latency)).map_err(storage)?;
    }
    Ok((rows.len(), all_gone))
}

/// Delivered leaves' latencies as (ms, how many), ascending.
#[derive(Debug, Default, PartialEq)]
pub(super) struct LatencyCounts(Vec<(u64, u64)>);

impl LatencyCounts {
    /// The cascade's histogram, if it accounts for exactly `delivered`
    /// leaves. It may not: a cascade recorded before histograms were kept,
    /// or one re-created while the leaves of its pruned predecessor are
    /// still being removed.
    pub(super) fn stored(txn: &ReadTransaction, id: &str, delivered: u64) -> Result<Option<Self>, StoreError> {
        let table = match txn.open_table(LATENCIES) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok((delivered == 0).then(Self::default)),
            Err(error) => return Err(storage(error)),
        };
        let mut counts = Vec::new();
        for row in table.range((id, 0)..=(id, u64::MAX)).map_err(storage)? {
            let (key, count) = row.map_err(storage)?;
            counts.push((key.value().1, count.value()));
        }
        let counts = LatencyCounts(counts);
        Ok((counts.total() == delivered).then_some(counts))
    }

    /// The histogram of `leaves` as they are.
    pub(super) fn of(leaves: &[Leaf]) -> Self {
        let mut counts: BTreeMap<u64, u64> = BTreeMap::new();
        for latency in leaves.iter().filter_map(Leaf::latency_ms) {
            *counts.entry(latency).or_default() += 1;
        }
        LatencyCounts(counts.into_iter().collect())
    }

    pub(super) fn total(&self) -> u64 {
        self.0.iter().map(|(_, count)| count).sum()
    }

    /// Nearest-rank percentile, as [`percentile`] over every latency.
    pub(super) fn percentile(&self, p: u32) -> Option<u64> {
        let rank = (self.total() * u64::from(p)).div_ceil(100).max(1);
        let mut seen = 0;
        self.0.iter().find_map(|(latency, count)| {
            seen += count;
            (seen >= rank).then_some(*latency)
        })
    }

    pub(super) fn max(&self) -> Option<u64> {
        self.0.last().map(|(latency, _)| *latency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cascade::{LeafStatus, percentile};

    #[test]
    fn histogram_percentiles_are_those_of_every_latency() {
        // Latencies with repeats, in no order (a simple LCG), checked at every size.
        let mut latencies = Vec::new();
        let mut x: u64 = 7;
        for _ in 0..500 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            latencies.push((x >> 33) % 97);
            let leaves: Vec<Leaf> = latencies
                .iter()
                .map(|&ms| Leaf {
                    jti: "j".into(),
                    stream_id: "s".into(),
                    session_id: "s".into(),
                    with_user: false,
                    event: 0,
                    planned_at_ms: 1000,
                    status: LeafStatus::Delivered,
                    acked_at_ms: Some(1000 + ms),
                    err: None,
                })
                .collect();
            let counts = LatencyCounts::of(&leaves);
            let mut sorted = latencies.clone();
            sorted.sort_unstable();
            for p in [1, 50, 90, 99, 100] {
                assert_eq!(counts.percentile(p), percentile(&sorted, p), "p{p} of {}", sorted.len());
            }
            assert_eq!(counts.max(), sorted.last().copied());
        }
        assert_eq!(LatencyCounts::default().percentile(50), None);
    }
}
