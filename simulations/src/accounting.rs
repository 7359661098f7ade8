//! Exactness accounting: expected leaves against the deliveries the
//! receivers' handlers saw. A leaf delivered twice with the same `jti` is a
//! retry (a duplicate delivery), never a loss; a leaf not expected is
//! unexpected; a leaf arriving with another cascade's `txn` is flagged.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::forest::LeafKey;

/// One SET a receiver's handler accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The receiver (index) that got it.
    pub receiver: usize,
    /// The session it names.
    pub session: String,
    /// Its `jti`.
    pub jti: String,
    /// Its `txn`, if any.
    pub txn: Option<String>,
    /// When it arrived, in ms on the drill's clock.
    pub received_at_ms: f64,
}

/// Latency percentiles in milliseconds (nearest rank).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `values` (all zero when empty).
    pub fn of(values: &[f64]) -> Percentiles {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            return Percentiles::default();
        }
        sorted.sort_by(f64::total_cmp);
        let rank = |q: f64| sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1];
        Percentiles { p50: rank(0.50), p90: rank(0.90), p99: rank(0.99), max: sorted[sorted.len() - 1] }
    }
}

/// What the accounting found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Outcome {
    /// Leaves expected.
    pub expected_leaves: usize,
    /// Expected leaves delivered at least once.
    pub delivered_leaves: usize,
    /// Expected leaves never delivered.
    pub lost_leaves: usize,
    /// Distinct delivered leaves that were not expected.
    pub unexpected_leaves: usize,
    /// Deliveries beyond the first of a leaf: a handler seeing a leaf again (same or another `jti`), plus SETs
    /// that reached a push receiver again after it had acknowledged their `jti` (retries).
    pub duplicate_deliveries: usize,
    /// Of those, retries of an acknowledged `jti` seen on the wire (answered by the SDK without the handler).
    pub retried_jtis: usize,
    /// Of those, deliveries of a leaf under a second, different `jti`.
    pub duplicate_jtis: usize,
    /// Delivered leaves whose `txn` is not their cascade's.
    pub wrong_txn: usize,
    /// Latency from the revocation's post to each leaf's first delivery.
    pub latency_ms: Percentiles,
    /// Up to 10 lost leaves, for the report.
    pub lost_sample: Vec<LeafKey>,
    /// Up to 10 unexpected leaves, for the report.
    pub unexpected_sample: Vec<LeafKey>,
}

impl Outcome {
    /// Exact: nothing lost, nothing unexpected, every leaf in its cascade's txn.
    pub fn is_exact(&self) -> bool {
        self.lost_leaves == 0 && self.unexpected_leaves == 0 && self.wrong_txn == 0
    }
}

/// What one cascade must deliver.
#[derive(Debug, Clone)]
struct Phase {
    txn: String,
    started_at_ms: f64,
}

/// Expected leaves of one or more cascades and the deliveries seen.
#[derive(Debug, Default, Clone)]
pub struct Accounting {
    phases: Vec<Phase>,
    /// Leaf → index of its phase.
    expected: BTreeMap<LeafKey, usize>,
    /// Leaf → first delivery's (jti, txn, time), and the jtis seen.
    seen: BTreeMap<LeafKey, SeenLeaf>,
    duplicates: usize,
    duplicate_jtis: usize,
    retries: usize,
}

#[derive(Debug, Clone)]
struct SeenLeaf {
    first_at_ms: f64,
    txn: Option<String>,
    jtis: BTreeSet<String>,
}

impl Accounting {
    /// An empty accounting.
    pub fn new() -> Self {
        Accounting::default()
    }

    /// Expects `leaves` from the cascade `txn`, posted at `started_at_ms`.
    /// A leaf expected by an earlier cascade keeps its first expectation.
    pub fn expect(&mut self, txn: impl Into<String>, started_at_ms: f64, leaves: impl IntoIterator<Item = LeafKey>) {
        let phase = self.phases.len();
        self.phases.push(Phase { txn: txn.into(), started_at_ms });
        for leaf in leaves {
            self.expected.entry(leaf).or_insert(phase);
        }
    }

    /// Number of leaves expected so far.
    pub fn expected_count(&self) -> usize {
        self.expected.len()
    }

    /// Expected leaves delivered so far.
    pub fn delivered_count(&self) -> usize {
        self.seen.keys().filter(|leaf| self.expected.contains_key(*leaf)).count()
    }

    /// Records one delivery.
    pub fn record(&mut self, delivery: Delivery) {
        let key = LeafKey { receiver: delivery.receiver, session: delivery.session };
        match self.seen.get_mut(&key) {
            Some(seen) => {
                self.duplicates += 1;
                if seen.jtis.insert(delivery.jti) {
                    self.duplicate_jtis += 1;
                }
            }
            None => {
                let jtis = BTreeSet::from([delivery.jti]);
                self.seen.insert(key, SeenLeaf { first_at_ms: delivery.received_at_ms, txn: delivery.txn, jtis });
            }
        }
    }

    /// Records a SET that arrived again after its `jti` was acknowledged: a
    /// retry (a duplicate delivery), never a loss.
    pub fn record_retry(&mut self) {
        self.retries += 1;
    }

    /// The outcome so far.
    pub fn outcome(&self) -> Outcome {
        let mut outcome = Outcome {
            expected_leaves: self.expected.len(),
            duplicate_deliveries: self.duplicates + self.retries,
            retried_jtis: self.retries,
            duplicate_jtis: self.duplicate_jtis,
            ..Outcome::default()
        };
        let mut latencies = Vec::new();
        for (leaf, &phase) in &self.expected {
            let phase = &self.phases[phase];
            match self.seen.get(leaf) {
                Some(seen) => {
                    outcome.delivered_leaves += 1;
                    latencies.push((seen.first_at_ms - phase.started_at_ms).max(0.0));
                    if seen.txn.as_deref() != Some(phase.txn.as_str()) {
                        outcome.wrong_txn += 1;
                    }
                }
                None => {
                    outcome.lost_leaves += 1;
                    if outcome.lost_sample.len() < 10 {
                        outcome.lost_sample.push(leaf.clone());
                    }
                }
            }
        }
        for leaf in self.seen.keys().filter(|leaf| !self.expected.contains_key(*leaf)) {
            outcome.unexpected_leaves += 1;
            if outcome.unexpected_sample.len() < 10 {
                outcome.unexpected_sample.push(leaf.clone());
            }
        }
        outcome.latency_ms = Percentiles::of(&latencies);
        outcome
    }

    /// Leaf-latency percentiles of each cascade, in the order expected.
    pub fn phase_latencies(&self) -> Vec<Percentiles> {
        let mut per_phase = vec![Vec::new(); self.phases.len()];
        for (leaf, &phase) in &self.expected {
            if let Some(seen) = self.seen.get(leaf) {
                per_phase[phase].push((seen.first_at_ms - self.phases[phase].started_at_ms).max(0.0));
            }
        }
        per_phase.iter().map(|latencies| Percentiles::of(latencies)).collect()
    }

    /// Latencies (ms) of every delivered expected leaf, for the plot.
    pub fn latencies(&self) -> Vec<f64> {
        self.expected
            .iter()
            .filter_map(|(leaf, &phase)| {
                self.seen.get(leaf).map(|seen| (seen.first_at_ms - self.phases[phase].started_at_ms).max(0.0))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(receiver: usize, session: &str) -> LeafKey {
        LeafKey { receiver, session: session.into() }
    }

    fn delivery(receiver: usize, session: &str, jti: &str, txn: &str, at: f64) -> Delivery {
        Delivery { receiver, session: session.into(), jti: jti.into(), txn: Some(txn.into()), received_at_ms: at }
    }

    fn three_leaves() -> Accounting {
        let mut accounting = Accounting::new();
        accounting.expect("t1", 100.0, [leaf(0, "a"), leaf(1, "a"), leaf(0, "b")]);
        accounting
    }

    #[test]
    fn all_delivered_is_exact() {
        let mut accounting = three_leaves();
        accounting.record(delivery(0, "a", "j1", "t1", 110.0));
        accounting.record(delivery(1, "a", "j2", "t1", 120.0));
        accounting.record(delivery(0, "b", "j3", "t1", 130.0));
        let outcome = accounting.outcome();
        assert!(outcome.is_exact(), "{outcome:?}");
        assert_eq!((outcome.expected_leaves, outcome.delivered_leaves), (3, 3));
        assert_eq!(outcome.latency_ms, Percentiles { p50: 20.0, p90: 30.0, p99: 30.0, max: 30.0 });
    }

    #[test]
    fn a_dropped_leaf_is_reported_lost() {
        let mut accounting = three_leaves();
        accounting.record(delivery(0, "a", "j1", "t1", 110.0));
        accounting.record(delivery(0, "b", "j3", "t1", 130.0));
        let outcome = accounting.outcome();
        assert_eq!(outcome.lost_leaves, 1);
        assert_eq!(outcome.lost_sample, vec![leaf(1, "a")]);
        assert_eq!(outcome.delivered_leaves, 2);
        assert!(!outcome.is_exact());
    }

    #[test]
    fn an_extra_leaf_is_reported_unexpected() {
        let mut accounting = three_leaves();
        for (r, s, j) in [(0, "a", "j1"), (1, "a", "j2"), (0, "b", "j3"), (1, "b", "j4")] {
            accounting.record(delivery(r, s, j, "t1", 110.0));
        }
        let outcome = accounting.outcome();
        assert_eq!((outcome.lost_leaves, outcome.unexpected_leaves), (0, 1));
        assert_eq!(outcome.unexpected_sample, vec![leaf(1, "b")]);
        assert!(!outcome.is_exact());
    }

    #[test]
    fn the_same_jti_twice_is_a_duplicate_not_a_loss() {
        let mut accounting = three_leaves();
        accounting.record(delivery(0, "a", "j1", "t1", 110.0));
        accounting.record(delivery(0, "a", "j1", "t1", 150.0));
        accounting.record(delivery(1, "a", "j2", "t1", 120.0));
        accounting.record(delivery(0, "b", "j3", "t1", 130.0));
        let outcome = accounting.outcome();
        assert!(outcome.is_exact(), "{outcome:?}");
        assert_eq!((outcome.duplicate_deliveries, outcome.duplicate_jtis, outcome.lost_leaves), (1, 0, 0));
        assert_eq!(outcome.latency_ms.p50, 20.0, "latency counts the first delivery");
    }

    #[test]
    fn a_retry_on_the_wire_is_a_duplicate_not_a_loss() {
        let mut accounting = three_leaves();
        accounting.record(delivery(0, "a", "j1", "t1", 110.0));
        accounting.record_retry();
        let outcome = accounting.outcome();
        assert_eq!((outcome.duplicate_deliveries, outcome.retried_jtis, outcome.lost_leaves), (1, 1, 2));
        assert_eq!(outcome.delivered_leaves, 1);
    }

    #[test]
    fn a_leaf_redelivered_under_another_jti_is_counted() {
        let mut accounting = three_leaves();
        accounting.record(delivery(0, "a", "j1", "t1", 110.0));
        accounting.record(delivery(0, "a", "j9", "t1", 110.0));
        assert_eq!((accounting.outcome().duplicate_deliveries, accounting.outcome().duplicate_jtis), (1, 1));
    }

    #[test]
    fn a_wrong_txn_is_flagged() {
        let mut accounting = three_leaves();
        accounting.record(delivery(0, "a", "j1", "t1", 110.0));
        accounting.record(delivery(1, "a", "j2", "other", 120.0));
        accounting.record(delivery(0, "b", "j3", "t1", 130.0));
        let outcome = accounting.outcome();
        assert_eq!((outcome.wrong_txn, outcome.lost_leaves, outcome.unexpected_leaves), (1, 0, 0));
        assert!(!outcome.is_exact());
    }

    #[test]
    fn phases_keep_their_own_txn_and_start() {
        let mut accounting = Accounting::new();
        accounting.expect("mid", 0.0, [leaf(0, "a")]);
        accounting.expect("roots", 1000.0, [leaf(0, "b")]);
        accounting.record(delivery(0, "a", "j1", "mid", 5.0));
        accounting.record(delivery(0, "b", "j2", "roots", 1007.0));
        let outcome = accounting.outcome();
        assert!(outcome.is_exact());
        assert_eq!(outcome.latency_ms.max, 7.0);
        let phases = accounting.phase_latencies();
        assert_eq!((phases[0].max, phases[1].max), (5.0, 7.0));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(Percentiles::of(&values), Percentiles { p50: 50.0, p90: 90.0, p99: 99.0, max: 100.0 });
        assert_eq!(Percentiles::of(&[]), Percentiles::default());
    }
}
