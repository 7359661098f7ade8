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

use crate::effects::{self, IngestError, Plan, Route};
use crate::kafka::client::{KafkaSettings, OutRecord, Producer, partition_for};
use crate::kafka::records::{self, GraphRecord, SharedRecord};
use crate::kafka::shared::SharedLog;
use crate::log::EventLog;

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

    /// The root of a session's tree, recording `proposed` (or the session
    /// itself) when no instance has seen the session yet.
    async fn root(&self, session_id: &str, proposed: Option<String>) -> Result<String, StoreError> {
        if let Some(root) = self.shared.root_of(session_id)? {
            return Ok(root);
        }
        // Another instance may have just recorded it: catch up before writing.
        self.shared.barrier().await;
        if let Some(root) = self.shared.root_of(session_id)? {
            return Ok(root);
        }
        let root = proposed.unwrap_or_else(|| session_id.to_owned());
        let record = SharedRecord::Root { session_id: session_id.to_owned(), root: root.clone() };
        self.shared.append_and_apply(&record).await?;
        // Read back the winner: a concurrent first sighting elsewhere may have won.
        Ok(self.shared.root_of(session_id)?.unwrap_or(root))
    }

    async fn partition_of(&self, session_id: &str, parent: Option<&str>) -> Result<i32, StoreError> {
        let proposed = match parent {
            Some(parent) => Some(Box::pin(self.root(parent, None)).await?),
            None => None,
        };
        let root = self.root(session_id, proposed).await?;
        Ok(partition_for(&root, self.partitions))
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
}

impl EventLog for KafkaLog {
    fn append(&self, mut set: SecurityEventToken, received_at_ms: u64) -> BoxFuture<'_, Result<Plan, IngestError>> {
        Box::pin(async move {
            let route = effects::route(&set)?;
            // Every partition must derive the same cascade from this event.
            set.txn.get_or_insert_with(new_id);
            let record = GraphRecord::Event { claims: set.to_claims(), received_at_ms };
            match route {
                Route::Session { session_id, parent } => {
                    let partition = self.partition_of(&session_id, parent.as_deref()).await?;
                    self.send(vec![partition], &record, &session_id).await?;
                }
                Route::Everywhere => self.send((0..self.partitions).collect(), &record, &set.jti).await?,
            }
            Ok(Plan::default())
        })
    }

    fn touch(&self, session_id: String, stream_id: String, at_ms: u64) -> BoxFuture<'_, Result<Plan, IngestError>> {
        Box::pin(async move {
            let partition = self.partition_of(&session_id, None).await?;
            let record = GraphRecord::Touch { session_id: session_id.clone(), stream_id, at_ms };
            self.send(vec![partition], &record, &session_id).await?;
            Ok(Plan::default())
        })
    }
}
