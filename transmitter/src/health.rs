//! What delivery to each stream looks like from this instance: the last SET
//! a receiver acknowledged, whether attempts are failing now and why, how
//! many SETs were dead-lettered, and whether the last verification the
//! operator or receiver asked for arrived. The operator console shows it.
//!
//! Kept in memory: one entry per stream that saw a delivery here, dropped
//! with the stream ([`StreamHealth::forget`]). In Kafka mode each instance
//! knows the streams whose deliveries it works.

use std::collections::HashMap;
use std::sync::Mutex;

/// Longest failure reason kept (receivers choose its text).
const MAX_REASON_CHARS: usize = 200;

/// One stream's delivery health.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// When a receiver last acknowledged a SET (push 2xx or poll `ack`).
    pub last_delivered_ms: Option<u64>,
    /// The last failed attempt or dead letter, and why.
    pub last_failure: Option<Failed>,
    /// Set while attempts fail since the last success: when the first failed.
    pub failing_since_ms: Option<u64>,
    /// Attempts that failed since the last success.
    pub failures_in_a_row: u64,
    /// SETs dead-lettered here since this process started.
    pub dead_lettered: u64,
    /// The last verification SET sent and whether it was acknowledged.
    pub verification: Option<VerificationSent>,
}

/// A failed delivery attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failed {
    pub at_ms: u64,
    pub reason: String,
}

/// A verification SET on its way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerificationSent {
    pub jti: String,
    pub sent_at_ms: u64,
    pub acknowledged_at_ms: Option<u64>,
    /// Dead-lettered instead, with the reason.
    pub failed: Option<String>,
}

/// Delivery health of every stream, by stream id.
#[derive(Default)]
pub struct StreamHealth {
    streams: Mutex<HashMap<String, Health>>,
}

impl StreamHealth {
    fn with(&self, stream_id: &str, change: impl FnOnce(&mut Health)) {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        change(streams.entry(stream_id.to_owned()).or_default());
    }

    /// The receiver acknowledged SET `jti`.
    pub fn delivered(&self, stream_id: &str, jti: &str, at_ms: u64) {
        self.with(stream_id, |health| {
            health.last_delivered_ms = Some(health.last_delivered_ms.unwrap_or(0).max(at_ms));
            health.failing_since_ms = None;
            health.failures_in_a_row = 0;
            if let Some(verification) = health.verification.as_mut().filter(|v| v.jti == jti) {
                verification.acknowledged_at_ms = Some(at_ms);
            }
        });
    }

    /// An attempt failed and will be retried.
    pub fn retrying(&self, stream_id: &str, reason: &str, at_ms: u64) {
        self.with(stream_id, |health| failed(health, reason, at_ms));
    }

    /// SET `jti` was dead-lettered.
    pub fn dead_lettered(&self, stream_id: &str, jti: &str, reason: &str, at_ms: u64) {
        self.with(stream_id, |health| {
            failed(health, reason, at_ms);
            health.dead_lettered += 1;
            if let Some(verification) = health.verification.as_mut().filter(|v| v.jti == jti) {
                verification.failed = Some(clipped(reason));
            }
        });
    }

    /// A verification SET `jti` is about to be queued.
    pub fn verification_sent(&self, stream_id: &str, jti: &str, at_ms: u64) {
        self.with(stream_id, |health| {
            health.verification = Some(VerificationSent {
                jti: jti.to_owned(),
                sent_at_ms: at_ms,
                acknowledged_at_ms: None,
                failed: None,
            });
        });
    }

    /// The health of a stream (default when nothing was delivered here).
    pub fn of(&self, stream_id: &str) -> Health {
        self.streams.lock().unwrap_or_else(|p| p.into_inner()).get(stream_id).cloned().unwrap_or_default()
    }

    /// Forgets a deleted stream.
    pub fn forget(&self, stream_id: &str) {
        self.streams.lock().unwrap_or_else(|p| p.into_inner()).remove(stream_id);
    }
}

fn failed(health: &mut Health, reason: &str, at_ms: u64) {
    health.last_failure = Some(Failed { at_ms, reason: clipped(reason) });
    health.failing_since_ms.get_or_insert(at_ms);
    health.failures_in_a_row += 1;
}

fn clipped(reason: &str) -> String {
    reason.chars().take(MAX_REASON_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_run_until_a_success_and_verification_is_matched_by_jti() {
        let health = StreamHealth::default();
        health.verification_sent("s", "v1", 5);
        health.retrying("s", "HTTP 503", 10);
        health.retrying("s", &"x".repeat(500), 20);
        let now = health.of("s");
        assert_eq!((now.failing_since_ms, now.failures_in_a_row), (Some(10), 2));
        assert_eq!(now.last_failure.as_ref().map(|f| f.reason.chars().count()), Some(MAX_REASON_CHARS));
        health.delivered("s", "other", 30);
        assert_eq!(health.of("s").verification.and_then(|v| v.acknowledged_at_ms), None, "another SET's ack");
        health.delivered("s", "v1", 40);
        let now = health.of("s");
        assert_eq!((now.failing_since_ms, now.failures_in_a_row, now.last_delivered_ms), (None, 0, Some(40)));
        assert_eq!(now.verification.and_then(|v| v.acknowledged_at_ms), Some(40));
        health.dead_lettered("s", "x", "gave up", 50);
        assert_eq!(health.of("s").dead_lettered, 1);
        health.forget("s");
        assert_eq!(health.of("s"), Health::default());
    }
}
