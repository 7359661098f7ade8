//! Refusal accounting: what the agents saw when they called the relying
//! parties they touch. Each (receiver, session) pair is one agent calling
//! one guarded RP. A cascade must make every pair it revokes answer 401,
//! and no other.
//!
//! - **Refusal latency** of a pair: from its cascade's revocation post to
//!   the agent's first 401 at that RP.
//! - **Stale accept**: a request *sent after* the RP acknowledged the pair's
//!   SET (its handler completed, or its guard answered the push 2xx) that
//!   the RP accepted, judged as each answer or acknowledgement arrives. The
//!   RP records a revocation before it acknowledges, so there must be none.
//! - **False refusal**: a 401 for a pair that no cascade started before the
//!   request was sent revokes.
//! - **Never refused**: a pair whose cascade ran, yet no 401 was seen by the
//!   end of the drill.
//! - **Failed**: any other answer (a 500, a 403, the RP's own 401): the
//!   RPs' services stay up under every fault, so there must be none.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::accounting::Percentiles;
use crate::forest::LeafKey;

/// What the RP answered an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// 2xx: the request was served.
    Accepted,
    /// 401 with `error_description="session revoked"`.
    Refused,
    /// Anything else (transport error, another status).
    Failed,
}

/// Accepted requests remembered per pair while its acknowledgement is not
/// known yet (the latest are kept: only they can have been sent after it).
const MAX_UNJUDGED: usize = 1_000;

#[derive(Debug, Clone, Default)]
struct PairState {
    /// The phase whose cascade revokes this pair.
    revoked_in: Option<usize>,
    first_refused_at_ms: Option<f64>,
    /// When its RP acknowledged its SET.
    acknowledged_at_ms: Option<f64>,
    /// Send times of accepted requests sent after the pair's cascade
    /// started, recorded before the acknowledgement was known.
    unjudged_accepts: std::collections::VecDeque<f64>,
}

/// One refused pair, for the report's samples.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Incident {
    /// Receiver index.
    pub receiver: usize,
    /// Session id.
    pub session: String,
    /// When the request was sent, in ms on the drill's clock.
    pub sent_at_ms: f64,
}

/// Per-cascade refusal figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PhaseRefusals {
    /// Pairs the cascade revokes.
    pub pairs: usize,
    /// Of which refused at least once.
    pub refused: usize,
    /// Revocation post → first 401, per refused pair.
    pub latency_ms: Percentiles,
}

/// What the agents saw.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RefusalOutcome {
    /// Requests sent by the agents.
    pub requests: u64,
    /// Of which accepted.
    pub accepted: u64,
    /// Of which refused.
    pub refused: u64,
    /// Of which failed otherwise (must be 0 without faults on the RPs themselves).
    pub failed: u64,
    /// Revocation post → first 401, over every revoked pair.
    pub latency_ms: Percentiles,
    /// Accepted after the RP acknowledged the revoking SET: must be 0.
    pub stale_accepts: usize,
    /// Refused without a revocation: must be 0.
    pub false_refusals: usize,
    /// Revoked pairs never refused: must be 0.
    pub never_refused: usize,
    /// Per phase, in order.
    pub phases: Vec<PhaseRefusals>,
    /// Up to 10 stale accepts.
    pub stale_sample: Vec<Incident>,
    /// Up to 10 false refusals.
    pub false_sample: Vec<Incident>,
}

impl RefusalOutcome {
    /// No stale accept, no false refusal, every revoked agent refused, and
    /// every other call answered (the RPs' services stay up under every
    /// fault: a 500, 403 or the RP's own 401 is a failure too).
    pub fn is_sound(&self) -> bool {
        self.stale_accepts == 0 && self.false_refusals == 0 && self.never_refused == 0 && self.failed == 0
    }
}

/// The agents' view of every pair, as requests complete.
#[derive(Debug, Clone, Default)]
pub struct Refusals {
    pairs: Vec<LeafKey>,
    index: BTreeMap<LeafKey, usize>,
    state: Vec<PairState>,
    phase_started_ms: Vec<f64>,
    requests: u64,
    accepted: u64,
    refused: u64,
    failed: u64,
    false_refusals: usize,
    false_sample: Vec<Incident>,
    stale_accepts: usize,
    stale_sample: Vec<Incident>,
}

impl Refusals {
    /// Tracks `pairs` (index order is the caller's pair numbering).
    pub fn new(pairs: Vec<LeafKey>) -> Self {
        let index = pairs.iter().cloned().enumerate().map(|(i, pair)| (pair, i)).collect();
        let state = vec![PairState::default(); pairs.len()];
        Refusals { pairs, index, state, ..Refusals::default() }
    }

    /// The pairs, in the caller's numbering.
    pub fn pairs(&self) -> &[LeafKey] {
        &self.pairs
    }

    /// The number of `pair`.
    pub fn index_of(&self, pair: &LeafKey) -> Option<usize> {
        self.index.get(pair).copied()
    }

    /// A cascade revoking `leaves` was posted at `started_at_ms`; returns its
    /// phase number. A pair an earlier phase revokes keeps that phase.
    pub fn revoke(&mut self, started_at_ms: f64, leaves: &BTreeSet<LeafKey>) -> usize {
        let phase = self.phase_started_ms.len();
        self.phase_started_ms.push(started_at_ms);
        for leaf in leaves {
            if let Some(&i) = self.index.get(leaf) {
                self.state[i].revoked_in.get_or_insert(phase);
            }
        }
        phase
    }

    /// Whether `pair` is revoked by a phase posted at or before `at_ms`.
    fn revoked_at(&self, pair: usize, at_ms: f64) -> bool {
        self.state[pair].revoked_in.is_some_and(|phase| self.phase_started_ms[phase] <= at_ms)
    }

    /// Whether `pair` has been refused.
    pub fn is_refused(&self, pair: usize) -> bool {
        self.state.get(pair).is_some_and(|s| s.first_refused_at_ms.is_some())
    }

    /// Pairs revoked by `phase` and not refused yet.
    pub fn unrefused_of(&self, phase: usize) -> Vec<usize> {
        (0..self.pairs.len())
            .filter(|&i| self.state[i].revoked_in == Some(phase) && self.state[i].first_refused_at_ms.is_none())
            .collect()
    }

    /// Pairs no phase so far revokes.
    pub fn unaffected(&self) -> Vec<usize> {
        (0..self.pairs.len()).filter(|&i| self.state[i].revoked_in.is_none()).collect()
    }

    /// `pair`'s RP acknowledged its SET at `at_ms` (the first time counts):
    /// accepted requests sent after it are stale.
    pub fn acknowledged(&mut self, pair: usize, at_ms: f64) {
        let Some(state) = self.state.get_mut(pair) else { return };
        if state.acknowledged_at_ms.is_some() {
            return;
        }
        state.acknowledged_at_ms = Some(at_ms);
        let stale: Vec<f64> = state.unjudged_accepts.drain(..).filter(|&sent| sent > at_ms).collect();
        for sent in stale {
            self.stale(pair, sent);
        }
    }

    fn stale(&mut self, pair: usize, sent_at_ms: f64) {
        self.stale_accepts += 1;
        // The sample names each pair once, at its first stale accept.
        let leaf = &self.pairs[pair];
        if self.stale_sample.len() < 10
            && !self.stale_sample.iter().any(|i| i.receiver == leaf.receiver && i.session == leaf.session)
        {
            self.stale_sample.push(Incident { receiver: leaf.receiver, session: leaf.session.clone(), sent_at_ms });
        }
    }

    /// One request of `pair`, sent at `sent_at_ms`, answered at `done_at_ms`.
    pub fn record(&mut self, pair: usize, sent_at_ms: f64, done_at_ms: f64, answer: Answer) {
        if pair >= self.pairs.len() {
            return;
        }
        self.requests += 1;
        let revoked = self.revoked_at(pair, sent_at_ms);
        let state = &mut self.state[pair];
        match answer {
            Answer::Accepted => {
                self.accepted += 1;
                match state.acknowledged_at_ms {
                    Some(acked) if sent_at_ms > acked => self.stale(pair, sent_at_ms),
                    Some(_) => {}
                    None if revoked => {
                        if state.unjudged_accepts.len() == MAX_UNJUDGED {
                            state.unjudged_accepts.pop_front();
                        }
                        state.unjudged_accepts.push_back(sent_at_ms);
                    }
                    None => {}
                }
            }
            Answer::Refused => {
                self.refused += 1;
                if !revoked {
                    self.false_refusals += 1;
                    if self.false_sample.len() < 10 {
                        let leaf = &self.pairs[pair];
                        let incident = Incident { receiver: leaf.receiver, session: leaf.session.clone(), sent_at_ms };
                        self.false_sample.push(incident);
                    }
                } else if state.first_refused_at_ms.is_none() {
                    state.first_refused_at_ms = Some(done_at_ms);
                }
            }
            Answer::Failed => self.failed += 1,
        }
    }

    /// The outcome so far.
    pub fn outcome(&self) -> RefusalOutcome {
        let mut outcome = RefusalOutcome {
            requests: self.requests,
            accepted: self.accepted,
            refused: self.refused,
            failed: self.failed,
            false_refusals: self.false_refusals,
            false_sample: self.false_sample.clone(),
            stale_accepts: self.stale_accepts,
            stale_sample: self.stale_sample.clone(),
            ..RefusalOutcome::default()
        };
        let mut all = Vec::new();
        let mut per_phase: Vec<(usize, Vec<f64>)> = vec![(0, Vec::new()); self.phase_started_ms.len()];
        for state in &self.state {
            let Some(phase) = state.revoked_in else { continue };
            per_phase[phase].0 += 1;
            match state.first_refused_at_ms {
                Some(at) => {
                    let latency = (at - self.phase_started_ms[phase]).max(0.0);
                    per_phase[phase].1.push(latency);
                    all.push(latency);
                }
                None => outcome.never_refused += 1,
            }
        }
        outcome.latency_ms = Percentiles::of(&all);
        outcome.phases = per_phase
            .into_iter()
            .map(|(pairs, latencies)| PhaseRefusals {
                pairs,
                refused: latencies.len(),
                latency_ms: Percentiles::of(&latencies),
            })
            .collect();
        outcome
    }

    /// Every refused pair's refusal latency (ms), for the plot.
    pub fn latencies(&self) -> Vec<f64> {
        self.state
            .iter()
            .filter_map(|s| Some((s.first_refused_at_ms? - self.phase_started_ms[s.revoked_in?]).max(0.0)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(receiver: usize, session: &str) -> LeafKey {
        LeafKey { receiver, session: session.into() }
    }

    /// Pairs a (revoked at 100 ms) and b (never revoked).
    fn two_pairs() -> Refusals {
        let mut refusals = Refusals::new(vec![leaf(0, "a"), leaf(1, "b")]);
        assert_eq!(refusals.revoke(100.0, &BTreeSet::from([leaf(0, "a")])), 0);
        refusals
    }

    #[test]
    fn refusal_latency_runs_from_the_post_to_the_first_401() {
        let mut refusals = two_pairs();
        refusals.record(0, 90.0, 95.0, Answer::Accepted);
        refusals.record(0, 110.0, 112.0, Answer::Accepted);
        refusals.record(0, 120.0, 130.0, Answer::Refused);
        refusals.record(0, 140.0, 150.0, Answer::Refused);
        refusals.record(1, 140.0, 150.0, Answer::Accepted);
        refusals.acknowledged(0, 115.0);
        let outcome = refusals.outcome();
        assert!(outcome.is_sound(), "{outcome:?}");
        assert_eq!(outcome.latency_ms.max, 30.0, "first 401 at 130, posted at 100");
        assert_eq!((outcome.requests, outcome.accepted, outcome.refused), (5, 3, 2));
        assert_eq!(outcome.phases, vec![PhaseRefusals { pairs: 1, refused: 1, latency_ms: outcome.latency_ms }]);
        assert_eq!(refusals.latencies(), vec![30.0]);
    }

    #[test]
    fn an_accept_sent_after_the_acknowledgement_is_stale() {
        let mut refusals = two_pairs();
        refusals.record(0, 110.0, 112.0, Answer::Accepted);
        // Answered before the acknowledgement was known: judged when it is.
        refusals.record(0, 116.0, 118.0, Answer::Accepted);
        refusals.acknowledged(0, 115.0);
        // Answered after: judged at once, however many came before.
        for n in 0..2_000 {
            refusals.record(0, 120.0 + f64::from(n), 121.0 + f64::from(n), Answer::Accepted);
        }
        refusals.record(0, 5_000.0, 5_001.0, Answer::Refused);
        let outcome = refusals.outcome();
        assert_eq!(outcome.stale_accepts, 2_001, "every accept sent after 115: {outcome:?}");
        assert_eq!(outcome.stale_sample.len(), 1, "one sample per pair");
        assert_eq!(outcome.stale_sample[0].sent_at_ms, 116.0);
        assert!(!outcome.is_sound());
    }

    #[test]
    fn a_401_of_an_unaffected_pair_is_a_false_refusal() {
        let mut refusals = two_pairs();
        refusals.record(1, 120.0, 121.0, Answer::Refused);
        // Sent before its cascade was posted: also false.
        refusals.record(0, 50.0, 101.0, Answer::Refused);
        let outcome = refusals.outcome();
        assert_eq!(outcome.false_refusals, 2, "{outcome:?}");
        assert_eq!(outcome.never_refused, 1, "a's only 401 came before its cascade");
        assert!(!outcome.is_sound());
    }

    #[test]
    fn a_revoked_pair_never_refused_is_reported() {
        let mut refusals = two_pairs();
        refusals.record(0, 110.0, 112.0, Answer::Failed);
        let outcome = refusals.outcome();
        assert_eq!((outcome.never_refused, outcome.failed), (1, 1));
        assert!(!outcome.is_sound());
        assert_eq!(refusals.unrefused_of(0), vec![0]);
        assert_eq!(refusals.unaffected(), vec![1]);
    }

    #[test]
    fn a_later_phase_does_not_move_an_earlier_revocation() {
        let mut refusals = two_pairs();
        let all = BTreeSet::from([leaf(0, "a"), leaf(1, "b")]);
        assert_eq!(refusals.revoke(1000.0, &all), 1);
        refusals.record(0, 120.0, 130.0, Answer::Refused);
        refusals.record(1, 1001.0, 1010.0, Answer::Refused);
        let outcome = refusals.outcome();
        assert!(outcome.is_sound(), "{outcome:?}");
        assert_eq!(outcome.phases[0].latency_ms.max, 30.0);
        assert_eq!(outcome.phases[1].latency_ms.max, 10.0);
    }
}
