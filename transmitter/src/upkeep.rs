//! The transmitter's share of the hub's periodic upkeep: what it keeps is
//! bounded in time (ARCHITECTURE.md, "Lifecycle").
//!
//! - Dead letters are kept for `dead_letter_retention`, then removed.
//! - A SET nobody acknowledges is dead-lettered at the delivery give-up age:
//!   push workers do it for the SETs they retry; upkeep does it for poll
//!   streams (a receiver that stopped polling) and paused push streams.
//! - A stream whose receiver shows no eligible activity for its
//!   `inactivity_timeout` (SSF 1.0 §8.1.1) is paused, announced by a
//!   stream-updated SET first.
//! - Deleted streams' ids are forgotten after a day.
//!
//! In a scaled-out hub each instance upkeeps the streams placed with it.

use std::sync::Arc;

use caep_schemas::event::StreamStatus;

use crate::control::Placement;
use crate::outbox::now_ms;
use crate::registry::StreamRecord;
use crate::service::Transmitter;
use crate::store::StoreError;
use crate::streams::Delivery;

/// Rows handled per write.
const BATCH: usize = 5_000;

/// What one upkeep pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Upkept {
    pub dead_letters_removed: usize,
    pub sets_expired: usize,
    pub streams_paused: usize,
    pub deleted_ids_forgotten: usize,
}

impl Upkept {
    pub fn is_empty(&self) -> bool {
        *self == Upkept::default()
    }

    fn record_metrics(&self) {
        for (kind, count) in
            [("dead_letters", self.dead_letters_removed), ("deleted_stream_ids", self.deleted_ids_forgotten)]
        {
            metrics::counter!("caep_pruned_total", "kind" => kind).increment(count as u64);
        }
        metrics::counter!("caep_sets_expired_total").increment(self.sets_expired as u64);
        metrics::counter!("caep_streams_paused_inactive_total").increment(self.streams_paused as u64);
    }
}

/// Why an inactive stream is paused.
pub const INACTIVE_REASON: &str = "inactivity_timeout: no receiver activity within the stream's inactivity_timeout";

impl Transmitter {
    /// Runs one upkeep pass at `now` (ms since the epoch).
    pub async fn upkeep(self: &Arc<Self>, now: u64) -> Result<Upkept, StoreError> {
        let mut done = Upkept::default();
        let horizon = now.saturating_sub(self.settings().dead_letter_retention.as_millis() as u64);
        loop {
            let removed = self.outbox().prune_dead_letters(horizon, BATCH).await?;
            done.dead_letters_removed += removed;
            if removed < BATCH {
                break;
            }
        }
        let give_up = now.saturating_sub(self.settings().push_policy.give_up_after.as_millis() as u64);
        for record in self.streams().all() {
            if !matches!(self.placement().place(&record.config.stream_id), Placement::Local) {
                continue;
            }
            if held_without_worker(&record) {
                loop {
                    let expired = self.outbox().expire(&record.config.stream_id, give_up, BATCH).await?;
                    done.sets_expired += expired;
                    if expired < BATCH {
                        break;
                    }
                }
            }
            if self.inactive(&record, now) {
                let stream_id = &record.config.stream_id;
                match self
                    .change_status_by_transmitter(stream_id, StreamStatus::Paused, Some(INACTIVE_REASON.into()))
                    .await
                {
                    Ok(_) => {
                        tracing::info!(stream_id = %stream_id, "inactive stream paused");
                        done.streams_paused += 1;
                    }
                    Err(error) => tracing::warn!(stream_id = %stream_id, %error, "cannot pause an inactive stream"),
                }
            }
        }
        done.deleted_ids_forgotten = self.streams().prune_deleted(now).await?;
        done.record_metrics();
        Ok(done)
    }

    /// Whether an enabled stream's receiver has shown no eligible activity
    /// for its `inactivity_timeout`.
    fn inactive(&self, record: &StreamRecord, now: u64) -> bool {
        let Some(timeout_secs) = record.config.inactivity_timeout else { return false };
        record.status == StreamStatus::Enabled
            && now.saturating_sub(record.last_active_ms()) > timeout_secs.saturating_mul(1000)
    }

    /// Whether activity on the stream at `now` would be written (see
    /// [`note_activity`](Self::note_activity)): a tenth of its inactivity
    /// timeout has passed since the last stamp.
    pub fn activity_due(&self, record: &StreamRecord, now: u64) -> bool {
        record
            .config
            .inactivity_timeout
            .is_some_and(|timeout_secs| now.saturating_sub(record.last_active_ms()) >= timeout_secs.saturating_mul(100))
    }

    /// Records eligible receiver activity on a stream (SSF 1.0 §8.1.1: any
    /// management call naming it, and a poll of a poll stream), restarting
    /// its inactivity timeout. Written at most once per tenth of the
    /// timeout, so a busy poller costs no write per poll.
    pub async fn note_activity(&self, record: &StreamRecord) {
        let now = now_ms();
        if !self.activity_due(record, now) {
            return;
        }
        let stamp = self.update_stream(&record.config.stream_id, |r| r.last_activity_ms = Some(now));
        if let Err(error) = stamp.await {
            tracing::warn!(stream_id = %record.config.stream_id, %error, "cannot record receiver activity");
        }
    }
}

/// SETs no push worker retries (and so gives up on) by itself: a poll
/// stream's, or a paused push stream's.
fn held_without_worker(record: &StreamRecord) -> bool {
    match record.config.delivery {
        Delivery::Poll { .. } => record.status != StreamStatus::Disabled,
        Delivery::Push { .. } => record.status == StreamStatus::Paused,
    }
}
