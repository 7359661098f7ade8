//! Streams through their lifetime: created, verified, paused or disabled
//! (by the receiver or the transmitter), deleted, and removed with their
//! receiver.

use std::sync::Arc;
use std::time::Duration;

use caep_schemas::event::{Event, StreamStatus, StreamUpdated, Verification};
use caep_schemas::set::Audience;

use super::{EVENTS_SUPPORTED, RECEIVER_REMOVED, Transmitter, store_error};
use crate::control::ControlChange;
use crate::error::SsfError;
use crate::outbox::now_ms;
use crate::receivers::Receiver;
use crate::registry::StreamRecord;
use crate::streams::{self, Delivery, RequestKind, StreamConfig};

impl Transmitter {
    /// Creates a stream for `receiver` from a create-request body (SSF 1.0
    /// §8.1.1.1): `aud` is the receiver's audience, the push endpoint passes
    /// the SSRF guard, and a receiver holds at most the configured number.
    pub async fn create_stream(&self, receiver: &Receiver, body: &[u8]) -> Result<Arc<StreamRecord>, SsfError> {
        let request = streams::parse_request(body, RequestKind::Create)?;
        let all_subjects = takes_all_subjects(body, receiver)?;
        let limit = self.settings.max_streams_per_receiver;
        if self.streams.owned_by(&receiver.receiver_id).len() >= limit {
            return Err(SsfError::Conflict(format!("this receiver already has the most streams allowed ({limit})")));
        }
        let mut config = streams::new_stream(
            streams::new_stream_id(),
            self.issuer(),
            Audience::One(receiver.audience.clone()),
            request,
            EVENTS_SUPPORTED,
            |id| self.poll_url(id),
            self.settings.min_verification_interval,
        );
        config.inactivity_timeout = self.settings.inactivity_timeout.map(|timeout| timeout.as_secs().max(1));
        self.check_push_endpoint(&config).await?;
        let record = StreamRecord {
            config,
            receiver_id: receiver.receiver_id.clone(),
            status: StreamStatus::Enabled,
            reason: None,
            all_subjects,
            issuers: receiver.issuers.clone(),
            last_verification_ms: None,
            created_at_ms: now_ms(),
            last_activity_ms: None,
        };
        let stream_id = record.config.stream_id.clone();
        self.record(ControlChange::StreamPut { record }, SsfError::Conflict).await?;
        // Read-your-writes: applied here before `record` resolved.
        let record = self.streams.get(&stream_id).ok_or(SsfError::NotFound)?;
        tracing::info!(stream_id = %record.config.stream_id, receiver_id = %receiver.receiver_id,
            method = record.config.delivery.method(), "stream created");
        Ok(record)
    }

    /// Refuses a push endpoint the SSRF guard refuses (400 with the reason).
    pub(crate) async fn check_push_endpoint(&self, config: &StreamConfig) -> Result<(), SsfError> {
        if let Delivery::Push { endpoint_url, .. } = &config.delivery {
            self.guard.check_url(endpoint_url).await.map_err(|refused| SsfError::BadRequest(refused.to_string()))?;
        }
        Ok(())
    }

    /// Records a verification request and emits the verification SET; 429
    /// inside the minimum interval.
    pub async fn verify_stream(self: &Arc<Self>, record: &StreamRecord, state: Option<String>) -> Result<(), SsfError> {
        let now = now_ms();
        let interval_ms = self.settings.min_verification_interval * 1000;
        if let Some(last) = record.last_verification_ms {
            let elapsed = now.saturating_sub(last);
            if elapsed < interval_ms {
                return Err(SsfError::TooManyRequests { retry_after_secs: (interval_ms - elapsed).div_ceil(1000) });
            }
        }
        let updated = self.update_stream(&record.config.stream_id, |r| r.last_verification_ms = Some(now));
        updated.await?.ok_or(SsfError::NotFound)?;
        let event = Event::Verification(Verification { state, ..Verification::default() });
        let outgoing = self.stream_event(record, event);
        // Noted first: the acknowledgement may arrive before `emit` returns.
        self.outbox.health().verification_sent(&record.config.stream_id, &outgoing.set.jti, now);
        self.emit(vec![outgoing]).await?;
        Ok(())
    }

    /// Changes a stream's status at the receiver's request.
    pub async fn set_status(
        &self,
        record: &StreamRecord,
        status: StreamStatus,
        reason: Option<String>,
    ) -> Result<Arc<StreamRecord>, SsfError> {
        let change = |r: &mut StreamRecord| {
            r.status = status;
            r.reason = reason;
        };
        // Applying the record purges a disabled stream's queue and reroutes it.
        let updated = self.update_stream(&record.config.stream_id, change).await?.ok_or(SsfError::NotFound)?;
        tracing::info!(stream_id = %record.config.stream_id, status = ?status, "stream status changed");
        Ok(updated)
    }

    /// Changes a stream's status on the transmitter's own initiative: the
    /// receiver is told first by a stream-updated SET, which is given up to
    /// `announce_timeout` to be acknowledged before the change takes effect.
    /// A stream enabled again is told after the change (it could not hear
    /// before).
    pub async fn change_status_by_transmitter(
        self: &Arc<Self>,
        stream_id: &str,
        status: StreamStatus,
        reason: Option<String>,
    ) -> Result<Arc<StreamRecord>, SsfError> {
        let record = self.streams.get(stream_id).ok_or(SsfError::NotFound)?;
        if record.status == StreamStatus::Enabled {
            let event = Event::StreamUpdated(StreamUpdated { status, reason: reason.clone(), ..Default::default() });
            let announcement = self.stream_event(&record, event);
            let jti = announcement.set.jti.clone();
            self.emit(vec![announcement]).await?;
            self.await_acknowledgement(stream_id, &jti).await;
        }
        let updated = self.set_status(&record, status, reason.clone()).await?;
        if record.status != StreamStatus::Enabled && status == StreamStatus::Enabled {
            // Resumed: told once delivery runs again, after the SETs it held.
            let event = Event::StreamUpdated(StreamUpdated { status, reason, ..Default::default() });
            self.emit(vec![self.stream_event(&updated, event)]).await?;
        }
        Ok(updated)
    }

    /// Waits (bounded) for the announcement to leave the outbox. Where SETs
    /// travel through a shared log, only the instance delivering the stream
    /// can see that; elsewhere this returns at once.
    async fn await_acknowledgement(&self, stream_id: &str, jti: &str) {
        self.placement().caught_up(stream_id).await;
        let deadline = tokio::time::Instant::now() + self.settings.announce_timeout;
        while tokio::time::Instant::now() < deadline {
            match self.outbox.contains(stream_id, jti) {
                Ok(false) => return,
                Ok(true) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(error) => {
                    tracing::warn!(%error, "cannot check the announcement's delivery");
                    return;
                }
            }
        }
        tracing::warn!(stream_id, jti, "stream-updated SET not acknowledged in time; changing status anyway");
    }

    /// Deletes a stream: its queue, subjects and worker (on every instance).
    pub async fn delete_stream(&self, stream_id: &str) -> Result<(), SsfError> {
        self.record(ControlChange::StreamDeleted { stream_id: stream_id.to_owned() }, SsfError::Conflict).await?;
        tracing::info!(stream_id, "stream deleted");
        Ok(())
    }

    /// Removes a receiver: in one transaction its token is revoked and every
    /// stream it owns is deleted with its queue and dead letters, so nothing
    /// of it is left. Then, best effort, each push stream that was enabled is
    /// told it is disabled by a stream-updated SET posted directly (a poll
    /// stream cannot be told: its receiver can no longer poll).
    pub async fn delete_receiver(self: &Arc<Self>, receiver_id: &str) -> Result<bool, SsfError> {
        let told = {
            // Check and delete as one step here, so of two concurrent
            // deletions only one answers true.
            let _changing = self.changing.lock().await;
            if self.receivers.get(receiver_id).map_err(store_error)?.is_none() {
                return Ok(false);
            }
            let told: Vec<Arc<StreamRecord>> =
                self.streams.owned_by(receiver_id).into_iter().filter(|r| r.status == StreamStatus::Enabled).collect();
            let change = ControlChange::ReceiverDeleted { receiver_id: receiver_id.to_owned() };
            self.record(change, SsfError::Conflict).await?;
            told
        };
        for record in told {
            let Delivery::Push { endpoint_url, authorization_header } = &record.config.delivery else { continue };
            let event = Event::StreamUpdated(StreamUpdated {
                status: StreamStatus::Disabled,
                reason: Some(RECEIVER_REMOVED.to_owned()),
                ..Default::default()
            });
            let announcement = self.stream_event(&record, event);
            let Ok(token) = announcement.set.sign(&self.keys.active()) else { continue };
            let sent = self.pusher.send_direct(endpoint_url, authorization_header.clone(), &token);
            let told = tokio::time::timeout(self.settings.announce_timeout, sent).await.unwrap_or(false);
            tracing::info!(stream_id = %record.config.stream_id, told, "removed receiver's stream disabled");
        }
        Ok(true)
    }
}

/// Whether a new stream takes every subject: only where the operator
/// granted it to the receiver. The request's `default_subjects` may narrow
/// that (`NONE`) but never widen it: `ALL` without the grant is refused.
fn takes_all_subjects(body: &[u8], receiver: &Receiver) -> Result<bool, SsfError> {
    let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    match value.get("default_subjects").and_then(|v| if v.is_null() { None } else { Some(v) }) {
        None => Ok(receiver.all_subjects),
        Some(serde_json::Value::String(s)) if s == "ALL" && receiver.all_subjects => Ok(true),
        Some(serde_json::Value::String(s)) if s == "ALL" => Err(SsfError::BadRequest(
            "`default_subjects: ALL` is granted only by the transmitter's operator; add subjects instead".into(),
        )),
        Some(serde_json::Value::String(s)) if s == "NONE" => Ok(false),
        Some(_) => Err(SsfError::BadRequest("`default_subjects` must be \"ALL\" or \"NONE\"".into())),
    }
}
