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

use crate::effects::Context;
use crate::effects::{self, IngestError, Plan};
use crate::graph::{Lifetimes, Touch};

/// Makes verified IdP events take effect durably.
pub trait EventLog: Send + Sync {
    /// Resolves once the event and the cascade plan it causes are durable;
    /// returns the plan, for the caller to dispatch.
    fn append(&self, set: SecurityEventToken, received_at_ms: u64) -> BoxFuture<'_, Result<Plan, IngestError>>;

    /// Records that a session reached a stream, under each of `keys` (the
    /// session as named by each IdP the stream hears from); resolves once
    /// durable, with the revocations it owes that stream if the session is
    /// revoked already.
    fn touch(&self, keys: Vec<String>, stream_id: String, touch: Touch) -> BoxFuture<'_, Result<Plan, IngestError>>;
}

/// The embedded log: effects applied at once in the local store.
pub struct LocalLog {
    store: Store,
    transmitter: Arc<Transmitter>,
    lifetimes: Lifetimes,
}

impl LocalLog {
    /// A log over `store`, routing leaves to `transmitter`'s streams and
    /// keeping sessions for `lifetimes`.
    pub fn new(store: Store, transmitter: Arc<Transmitter>, lifetimes: Lifetimes) -> Self {
        LocalLog { store, transmitter, lifetimes }
    }
}

impl EventLog for LocalLog {
    fn append(&self, set: SecurityEventToken, received_at_ms: u64) -> BoxFuture<'_, Result<Plan, IngestError>> {
        let (transmitter, lifetimes) = (Arc::clone(&self.transmitter), self.lifetimes);
        Box::pin(async move {
            self.store
                .write(Commit::Durable, move |txn| {
                    let ctx = Context { streams: transmitter.streams(), lifetimes: &lifetimes };
                    Ok(effects::apply(txn, ctx, &set, received_at_ms))
                })
                .await?
        })
    }

    fn touch(&self, keys: Vec<String>, stream_id: String, touch: Touch) -> BoxFuture<'_, Result<Plan, IngestError>> {
        let (transmitter, lifetimes) = (Arc::clone(&self.transmitter), self.lifetimes);
        Box::pin(async move {
            self.store
                .write(Commit::Durable, move |txn| {
                    let ctx = Context { streams: transmitter.streams(), lifetimes: &lifetimes };
                    let mut plan = Plan::default();
                    let (mut recorded, mut refused) = (0, None);
                    for key in &keys {
                        match effects::late_touch_plan(txn, ctx, key, &stream_id, &touch) {
                            Ok(more) => {
                                recorded += 1;
                                plan.extend(more);
                            }
                            Err(error) => refused = Some(error),
                        }
                    }
                    // Refused only when nothing was recorded: a plan must be
                    // dispatched, and a full pending list only drops a guess
                    // about an IdP that never named the session.
                    Ok(match refused {
                        Some(error) if recorded == 0 => Err(error),
                        _ => Ok(plan),
                    })
                })
                .await?
        })
    }
}
