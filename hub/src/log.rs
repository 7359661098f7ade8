//! The event log seam: where a verified IdP event goes to take effect.
//!
//! The embedded default, [`LocalLog`], applies each event in the local redb
//! store in the write transaction that records it (its `(iss, jti)` table is
//! the log). A partitioned log (Apache Kafka, see ARCHITECTURE.md) appends
//! the event to the partition of its delegation tree's root and lets that
//! partition's owner apply it with the same [`effects::apply`].

use std::sync::Arc;

use caep_schemas::set::SecurityEventToken;
use caep_transmitter::service::{BoxFuture, Transmitter};
use caep_transmitter::store::{Commit, Store};

use crate::effects::{self, IngestError, Plan};

/// Makes verified IdP events take effect durably.
pub trait EventLog: Send + Sync {
    /// Resolves once the event and the cascade plan it causes are durable;
    /// returns the plan, for the caller to dispatch.
    fn append(&self, set: SecurityEventToken, received_at_ms: u64) -> BoxFuture<'_, Result<Plan, IngestError>>;

    /// Records that a session reached a stream; resolves once durable, with
    /// the revocation it owes that stream if the session is revoked already.
    fn touch(&self, session_id: String, stream_id: String, at_ms: u64) -> BoxFuture<'_, Result<Plan, IngestError>>;
}

/// The embedded log: effects applied at once in the local store.
pub struct LocalLog {
    store: Store,
    transmitter: Arc<Transmitter>,
}

impl LocalLog {
    /// A log over `store`, routing leaves to `transmitter`'s streams.
    pub fn new(store: Store, transmitter: Arc<Transmitter>) -> Self {
        LocalLog { store, transmitter }
    }
}

impl EventLog for LocalLog {
    fn append(&self, set: SecurityEventToken, received_at_ms: u64) -> BoxFuture<'_, Result<Plan, IngestError>> {
        let transmitter = Arc::clone(&self.transmitter);
        Box::pin(async move {
            self.store
                .write(Commit::Durable, move |txn| Ok(effects::apply(txn, transmitter.streams(), &set, received_at_ms)))
                .await?
        })
    }

    fn touch(&self, session_id: String, stream_id: String, at_ms: u64) -> BoxFuture<'_, Result<Plan, IngestError>> {
        let transmitter = Arc::clone(&self.transmitter);
        Box::pin(async move {
            let plan = self
                .store
                .write(Commit::Durable, move |txn| {
                    effects::late_touch_plan(txn, transmitter.streams(), &session_id, &stream_id, at_ms)
                })
                .await?;
            Ok(plan)
        })
    }
}
