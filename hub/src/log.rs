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
use caep_transmitter::store::{Commit, Store, StoreError};

use crate::cascade::{CascadeRecord, Leaf};
use crate::dispatch::{Dispatcher, PlanningRuns};
use crate::effects::{self, Context, IngestError, Plan};
use crate::graph::{Lifetimes, Touch};

/// Makes verified IdP events take effect durably. The log dispatches the
/// leaves its events plan: its callers have nothing left to do.
pub trait EventLog: Send + Sync {
    /// Resolves once the event and the cascade plan it causes are durable.
    fn append(&self, set: SecurityEventToken, received_at_ms: u64) -> BoxFuture<'_, Result<(), IngestError>>;

    /// Records that a session reached a stream, under each of `keys` (the
    /// session as named by each IdP the stream hears from); resolves once
    /// durable, the revocations it owes that stream (if the session is
    /// revoked already) planned and on their way.
    fn touch(&self, keys: Vec<String>, stream_id: String, touch: Touch) -> BoxFuture<'_, Result<(), IngestError>>;
}

/// The embedded log: effects applied at once in the local store, their
/// leaves signed while the plan commits.
pub struct LocalLog {
    store: Store,
    transmitter: Arc<Transmitter>,
    lifetimes: Lifetimes,
    dispatcher: Arc<Dispatcher>,
}

impl LocalLog {
    /// A log over `store`, routing leaves to `transmitter`'s streams through
    /// `dispatcher` and keeping sessions for `lifetimes`.
    pub fn new(store: Store, transmitter: Arc<Transmitter>, lifetimes: Lifetimes, dispatcher: Arc<Dispatcher>) -> Self {
        LocalLog { store, transmitter, lifetimes, dispatcher }
    }

    /// Runs `effect` in a durable write with a context that hands each
    /// cascade's leaves to the dispatcher as they are planned.
    async fn apply<F>(&self, effect: F) -> Result<(), IngestError>
    where
        F: Fn(&redb::WriteTransaction, Context<'_>) -> Result<Plan, IngestError> + Send + 'static,
    {
        let (transmitter, lifetimes, dispatcher) =
            (Arc::clone(&self.transmitter), self.lifetimes, Arc::clone(&self.dispatcher));
        let (store, runs) = (self.store.clone(), PlanningRuns::default());
        let runs_of_op = runs.clone();
        let write = async move {
            store
                .write(Commit::Durable, move |txn| {
                    let run = runs_of_op.start();
                    // A failed hand-over fails the plan: its leaves must not
                    // wait for the sweep when the event can simply be retried.
                    let handed: std::cell::Cell<Result<(), StoreError>> = std::cell::Cell::new(Ok(()));
                    let on_planned = |record: &CascadeRecord, leaves: &[Leaf]| {
                        if let Err(error) = dispatcher.dispatch_planning(txn, record, leaves, run.clone()) {
                            handed.set(Err(error));
                        }
                    };
                    let ctx = Context {
                        streams: transmitter.streams(),
                        lifetimes: &lifetimes,
                        on_planned: Some(&on_planned),
                    };
                    let applied = effect(txn, ctx);
                    handed.into_inner()?;
                    match applied {
                        // A storage failure part-way through must not commit
                        // what was written before it (a refusal writes nothing).
                        Err(IngestError::Unavailable(reason)) => Err(StoreError::Storage(reason)),
                        other => Ok(other.map(drop)),
                    }
                })
                .await
        };
        // Settled even if our caller goes away meanwhile (a dropped request),
        // so the leaves being signed learn whether to hand themselves over.
        let outcome = tokio::spawn(async move {
            let outcome = write.await;
            runs.settle(outcome.is_ok());
            outcome
        })
        .await
        .map_err(|e| IngestError::Unavailable(format!("the planning write ended: {e}")))?;
        outcome?
    }
}

impl EventLog for LocalLog {
    fn append(&self, set: SecurityEventToken, received_at_ms: u64) -> BoxFuture<'_, Result<(), IngestError>> {
        Box::pin(self.apply(move |txn, ctx| effects::apply(txn, ctx, &set, received_at_ms)))
    }

    fn touch(&self, keys: Vec<String>, stream_id: String, touch: Touch) -> BoxFuture<'_, Result<(), IngestError>> {
        Box::pin(self.apply(move |txn, ctx| {
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
            match refused {
                Some(error) if recorded == 0 => Err(error),
                _ => Ok(plan),
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use caep_schemas::event::{Event, SessionEstablished, SessionRevoked, event_type};
    use caep_schemas::jose::Algorithm;
    use caep_schemas::subject::SubjectId;
    use caep_transmitter::keys::KeyStore;
    use caep_transmitter::receivers::ReceiverSpec;
    use caep_transmitter::service::{TransmitterSettings, open_in};

    use super::*;
    use crate::{cascade, graph};

    const IDP: &str = "https://idp.test";
    const HUB: &str = "https://hub.test";

    /// A log over a fresh transmitter with one polled stream for revocations.
    async fn log_with_a_stream(dir: &std::path::Path) -> (LocalLog, Arc<Transmitter>, String) {
        let keys = Arc::new(KeyStore::open(dir, Algorithm::Es256).expect("keys"));
        let transmitter = open_in(dir, TransmitterSettings::new(HUB), keys).expect("transmitter");
        let (receiver, _) =
            transmitter.create_receiver(ReceiverSpec::new("rp", "https://rp.test")).await.expect("receiver");
        let body = format!(r#"{{"events_requested": ["{}"]}}"#, event_type::SESSION_REVOKED);
        let stream = transmitter.create_stream(&receiver, body.as_bytes()).await.expect("stream");
        let store = transmitter.outbox().store().clone();
        let dispatcher = Dispatcher::local(HUB, Arc::clone(&transmitter), store.clone());
        let log = LocalLog::new(store, Arc::clone(&transmitter), Lifetimes::DEFAULT, dispatcher);
        (log, transmitter, stream.config.stream_id.clone())
    }

    fn ada() -> SubjectId {
        SubjectId::email("ada@example.com")
    }

    fn idp_set(event: Event) -> SecurityEventToken {
        SecurityEventToken::new(IDP, HUB, SubjectId::session_of(SubjectId::opaque("s1"), Some(ada())), event)
    }

    /// Names s1 (user ada), has the stream touch it naming ada, and
    /// revokes it: one leaf for the stream, in one transaction.
    fn name_touch_and_revoke(
        txn: &redb::WriteTransaction,
        ctx: Context<'_>,
        stream_id: &str,
    ) -> Result<Plan, IngestError> {
        effects::apply(txn, ctx, &idp_set(Event::SessionEstablished(SessionEstablished::default())), 1_000)?;
        let key = graph::session_key(IDP, &SubjectId::opaque("s1"));
        let touch = Touch { at_ms: 1_001, by_idp: false, named_user: Some(ada()) };
        effects::late_touch_plan(txn, ctx, &key, stream_id, &touch)?;
        let revoked = idp_set(Event::SessionRevoked(SessionRevoked::default())).with_txn("t1");
        let plan = effects::apply(txn, ctx, &revoked, 1_002)?;
        assert_eq!(plan.cascades.iter().map(|(_, leaves)| leaves.len()).sum::<usize>(), 1, "{plan:?}");
        Ok(plan)
    }

    async fn queued_tokens(transmitter: &Transmitter, stream_id: &str) -> Vec<String> {
        for _ in 0..200 {
            let pending = transmitter.outbox().pending(stream_id, 0, 10).expect("outbox");
            if !pending.is_empty() {
                return pending.into_iter().map(|p| p.set.token).collect();
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        Vec::new()
    }

    fn claims(token: &str) -> serde_json::Value {
        use base64::Engine;
        let payload = token.split('.').nth(1).expect("a compact JWS");
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).expect("base64url");
        serde_json::from_slice(&bytes).expect("claims")
    }

    /// Signing starts before the plan commits, so no snapshot holds a
    /// session named in the plan's own transaction: its leaves must still
    /// name it as its IdP did (with the user the receiver named), not by a
    /// fallback id.
    #[tokio::test]
    async fn a_session_named_in_the_planning_transaction_keeps_its_subject() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, transmitter, stream_id) = log_with_a_stream(dir.path()).await;
        let stream = stream_id.clone();
        log.apply(move |txn, ctx| name_touch_and_revoke(txn, ctx, &stream)).await.expect("applied");
        let tokens = queued_tokens(&transmitter, &stream_id).await;
        assert_eq!(tokens.len(), 1, "the leaf reached the outbox");
        let claims = claims(&tokens[0]);
        let expected = SubjectId::session_of(SubjectId::opaque("s1"), Some(ada())).to_value();
        assert_eq!(claims["sub_id"], expected, "{claims}");
        assert_eq!(claims["txn"], "t1");
    }

    /// A plan whose transaction is rolled back after its leaves were handed
    /// to signing leaves nothing behind: no cascade, no SET in the outbox.
    #[tokio::test]
    async fn a_rolled_back_plan_enqueues_nothing_though_its_leaves_were_signed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, transmitter, stream_id) = log_with_a_stream(dir.path()).await;
        let stream = stream_id.clone();
        // A write that fails (here: panics) is rolled back alone.
        let failed = log
            .apply(move |txn, ctx| {
                name_touch_and_revoke(txn, ctx, &stream)?;
                panic!("the plan's transaction fails after its leaves were handed over")
            })
            .await;
        assert!(matches!(failed, Err(IngestError::Unavailable(_))), "{failed:?}");
        // The same plan again, committed this time: once its leaf is queued,
        // the rolled-back run's signing (started first) has had its turn.
        let stream = stream_id.clone();
        log.apply(move |txn, ctx| name_touch_and_revoke(txn, ctx, &stream)).await.expect("applied");
        let tokens = queued_tokens(&transmitter, &stream_id).await;
        assert_eq!(tokens.len(), 1, "only the committed plan's leaf is queued");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(transmitter.outbox().depth(&stream_id).expect("depth"), 1, "and nothing came after it");
        let store = transmitter.outbox().store().clone();
        let report = store.read(|txn| cascade::report(txn, &cascade::key(IDP, "t1"), true)).expect("report");
        let report = report.expect("the committed cascade");
        assert_eq!(report.leaves.as_ref().map(Vec::len), Some(1), "{report:?}");
    }
}
