//! The delivery queue seam: what push workers and polls read and settle.
//!
//! The embedded implementation is the redb [`Outbox`]. A partitioned
//! implementation (Apache Kafka, deliveries keyed by stream; see
//! ARCHITECTURE.md) serves the same calls for the streams whose partitions
//! this instance owns.

use std::sync::Arc;

use tokio::sync::Notify;

use crate::health::StreamHealth;
use crate::outbox::{DeadLetter, Failure, NewSet, Outbox, Pending, QueuedSet};
use crate::service::BoxFuture;
use crate::store::StoreError;

/// Per-stream queues of signed SETs awaiting their receivers.
pub trait DeliveryQueue: Send + Sync {
    /// Durably enqueues SETs and wakes their streams.
    fn enqueue(&self, sets: Vec<NewSet>) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Up to `limit` queued SETs of a stream after sequence `after`, in order.
    fn pending(&self, stream_id: &str, after: u64, limit: usize) -> Result<Vec<Pending>, StoreError>;
    /// How many SETs wait for a stream.
    fn depth(&self, stream_id: &str) -> Result<u64, StoreError>;
    /// Notified when a stream's queue grows or its status changes.
    fn waker(&self, stream_id: &str) -> Arc<Notify>;
    /// Settles SETs acknowledged by push: `(stream, seq, acked_at_ms)`.
    fn remove_delivered(&self, delivered: Vec<(String, u64, u64)>) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Settles SETs acknowledged by poll (only this stream's).
    fn ack<'a>(&'a self, stream_id: &'a str, jtis: Vec<String>) -> BoxFuture<'a, Result<Vec<QueuedSet>, StoreError>>;
    /// Delivery health of the streams this queue serves.
    fn health(&self) -> &StreamHealth;
    /// Moves SETs delivery gave up on to the dead letters (only this stream's).
    fn dead_letter<'a>(
        &'a self,
        stream_id: &'a str,
        failures: Vec<Failure>,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>, StoreError>>;
}

impl DeliveryQueue for Outbox {
    fn enqueue(&self, sets: Vec<NewSet>) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(Outbox::enqueue(self, sets))
    }

    fn pending(&self, stream_id: &str, after: u64, limit: usize) -> Result<Vec<Pending>, StoreError> {
        Outbox::pending(self, stream_id, after, limit)
    }

    fn depth(&self, stream_id: &str) -> Result<u64, StoreError> {
        Outbox::depth(self, stream_id)
    }

    fn waker(&self, stream_id: &str) -> Arc<Notify> {
        Outbox::waker(self, stream_id)
    }

    fn remove_delivered(&self, delivered: Vec<(String, u64, u64)>) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(Outbox::remove_delivered(self, delivered))
    }

    fn ack<'a>(&'a self, stream_id: &'a str, jtis: Vec<String>) -> BoxFuture<'a, Result<Vec<QueuedSet>, StoreError>> {
        Box::pin(Outbox::ack(self, stream_id, jtis))
    }

    fn health(&self) -> &StreamHealth {
        Outbox::health(self)
    }

    fn dead_letter<'a>(
        &'a self,
        stream_id: &'a str,
        failures: Vec<Failure>,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>, StoreError>> {
        Box::pin(Outbox::dead_letter(self, stream_id, failures))
    }
}
