//! The event log on Kafka: a verified IdP event is appended to the `graph`
//! partition of its delegation tree, and the partition's owner applies it
//! (see `partitions.rs`). The IdP's 202 means the event is in the log,
//! acknowledged by every in-sync replica.
//!
//! Routing: a session's tree is named by its root, recorded in the shared
//! directory the first time any instance sees the session. A child joins its
//! parent's root; a session seen before its parent (or with none) is its own
//! root. The first record for a session wins everywhere, and the writer reads
//! the winner back, so two instances never route one session differently.
//! User-level events go to every partition: that user's sessions may be in
//! any of them.

use std::sync::Arc;

use caep_schemas::set::{SecurityEventToken, new_id};
use caep_transmitter::service::BoxFuture;
use caep_transmitter::store::StoreError;

use crate::effects::{self, IngestError, Route, rejected};
use crate::graph::Touch;
use crate::kafka::client::{KafkaSettings, OutRecord, Producer, partition_for};
use crate::kafka::records::{self, GraphRecord, SharedRecord};
use crate::kafka::shared::{RootEntry, SharedLog};
use crate::log::EventLog;
use crate::scope;

/// The Kafka event log.
pub struct KafkaLog {
    topic: String,
    partitions: i32,
    producer: Producer,
    shared: Arc<SharedLog>,
}

impl KafkaLog {
    /// The log over the `graph` topic.
    pub fn new(settings: &KafkaSettings, producer: Producer, shared: Arc<SharedLog>) -> Self {
        KafkaLog { topic: settings.topic(records::GRAPH), partitions: settings.partitions, producer, shared }
    }

    /// A session's root entry, recording `proposed` (or the session itself)
    /// as its root when no instance has seen it yet. `issuer` is the IdP
    /// whose session it is (session keys are scoped by IdP, so the check
    /// below only guards against a directory written by an older hub).
    async fn entry(
        &self,
        session_id: &str,
        proposed: Option<String>,
        issuer: Option<&str>,
    ) -> Result<RootEntry, IngestError> {
        // A miss here is not a barrier: a session another instance recorded
        // an instant ago is found by the append below, whose record loses to
        // the earlier one (the first record wins) and reads it back.
        let entry = match self.shared.root_of(session_id)? {
            Some(entry) => entry,
            None => {
                let root = proposed.unwrap_or_else(|| session_id.to_owned());
                let issuer = issuer.unwrap_or_default().to_owned();
                let record = SharedRecord::Root { session_id: session_id.to_owned(), root, issuer };
                self.shared.append_and_apply(&record).await?;
                // Read back the winner: a concurrent first sighting elsewhere may have won.
                self.shared.root_of(session_id)?.ok_or_else(|| {
                    IngestError::Unavailable(format!("the root of session `{session_id}` was not recorded"))
                })?
            }
        };
        // A session first named by a receiver's touch has no IdP yet (empty).
        if let Some(issuer) = issuer
            && !entry.issuer.is_empty()
            && entry.issuer != issuer
        {
            return Err(rejected("invalid_request", format!("session `{session_id}` belongs to another issuer")));
        }
        Ok(entry)
    }

    fn partition(&self, root: &str) -> i32 {
        partition_for(root, self.partitions)
    }

    async fn send(&self, partitions: Vec<i32>, record: &GraphRecord, key: &str) -> Result<(), StoreError> {
        let payload = records::to_bytes(record);
        let out = partitions
            .into_iter()
            .map(|partition| OutRecord {
                topic: self.topic.clone(),
                partition,
                key: key.as_bytes().to_vec(),
                payload: payload.clone(),
            })
            .collect();
        self.producer.send_all(out).await.map_err(|e| StoreError::storage(format!("kafka: {e}")))?;
        Ok(())
    }

    /// Appends a session event to its tree's partition; an establish whose
    /// session's tree started elsewhere (it was seen before its parent) also
    /// tells the parent's partition, so the parent's revocation reaches it.
    async fn append_session_event(
        &self,
        record: &GraphRecord,
        session_id: String,
        parent: Option<String>,
        issuer: String,
        at_ms: u64,
    ) -> Result<(), IngestError> {
        let parent = match parent {
            Some(parent) => {
                let entry = self.entry(&parent, None, Some(&issuer)).await?;
                Some((parent, entry))
            }
            None => None,
        };
        let proposed = parent.as_ref().map(|(_, entry)| entry.root.clone());
        let entry = self.entry(&session_id, proposed, Some(&issuer)).await?;
        self.send(vec![self.partition(&entry.root)], record, &session_id).await?;
        if let Some((parent, parent_entry)) = parent
            && parent_entry.root != entry.root
        {
            let adopt = GraphRecord::Adopt { parent, child: session_id.clone(), child_root: entry.root, issuer, at_ms };
            self.send(vec![self.partition(&parent_entry.root)], &adopt, &session_id).await?;
        }
        Ok(())
    }
}

impl EventLog for KafkaLog {
    fn append(&self, mut set: SecurityEventToken, received_at_ms: u64) -> BoxFuture<'_, Result<(), IngestError>> {
        Box::pin(async move {
            let route = effects::route(&set)?;
            // Every partition must derive the same cascade from this event.
            set.txn.get_or_insert_with(new_id);
            let record = GraphRecord::Event { claims: set.to_claims(), received_at_ms };
            match route {
                Route::Session { session_id, parent } => {
                    self.append_session_event(&record, session_id, parent, set.iss.clone(), received_at_ms).await?;
                }
                Route::Everywhere => self.send((0..self.partitions).collect(), &record, &set.jti).await?,
            }
            Ok(())
        })
    }

    fn touch(&self, keys: Vec<String>, stream_id: String, touch: Touch) -> BoxFuture<'_, Result<(), IngestError>> {
        Box::pin(async move {
            for key in keys {
                let issuer = scope::unscope(&key).map(|(issuer, _)| issuer.to_owned());
                let entry = self.entry(&key, None, issuer.as_deref()).await?;
                let record =
                    GraphRecord::Touch { session_id: key.clone(), stream_id: stream_id.clone(), touch: touch.clone() };
                self.send(vec![self.partition(&entry.root)], &record, &key).await?;
            }
            Ok(())
        })
    }
}
