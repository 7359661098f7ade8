//! Streams as stored: configuration, owner, status and subjects, in redb,
//! with every stream cached in memory so routing a SET never reads disk.
//!
//! Invariant: the cache changes only after the write that it mirrors has
//! committed, so nothing is routed by a change that could still be lost.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use caep_schemas::event::StreamStatus;
use caep_schemas::subject::SubjectId;
use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use crate::outbox::now_ms;
use crate::secrets::{SecretBox, SecretError};
use crate::store::{Commit, Store, StoreError, decode, encode};
use crate::streams::{Delivery, StreamConfig};

const STREAMS: TableDefinition<&str, &[u8]> = TableDefinition::new("streams");
const STREAM_SUBJECTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("stream_subjects");
/// Ids of deleted streams (value: when, ms since the epoch as 8 big-endian
/// bytes; empty in older files). Stream ids are random, so this only ever
/// refuses a late change about a stream that really was deleted; it is
/// kept for [`DELETED_STREAM_MEMORY_MS`], far longer than any change takes
/// to be applied everywhere.
const DELETED_STREAMS: TableDefinition<&str, &[u8]> = TableDefinition::new("deleted_streams");

/// How long a deleted stream's id is remembered.
pub const DELETED_STREAM_MEMORY_MS: u64 = 24 * 3600 * 1000;

/// Subjects (other than agent sessions, which the hub keeps as touches in
/// its graph) one stream may hold.
pub const MAX_SUBJECTS_PER_STREAM: usize = 100_000;

/// A stream as the transmitter keeps it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StreamRecord {
    pub config: StreamConfig,
    /// The receiver that owns the stream; no other may see or change it.
    pub receiver_id: String,
    pub status: StreamStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The stream takes every subject of its issuers (`default_subjects:
    /// ALL`): only where the operator granted it to the receiver.
    #[serde(default)]
    pub all_subjects: bool,
    /// The IdPs whose sessions the stream may hear about, copied from its
    /// receiver's binding; `None`: every trusted IdP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuers: Option<Vec<String>>,
    /// When the last verification was requested, ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verification_ms: Option<u64>,
    pub created_at_ms: u64,
    /// The receiver's last eligible activity (SSF 1.0 §8.1.1), recorded
    /// coarsely (see `Transmitter::note_activity`); `None`: none since creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity_ms: Option<u64>,
}

impl StreamRecord {
    /// The record as stored and replicated: the push `authorization_header`
    /// sealed (bound to this stream), so no database or log holds it in clear.
    pub fn sealed(&self, secrets: &SecretBox) -> StreamRecord {
        let mut record = self.clone();
        let stream_id = record.config.stream_id.clone();
        if let Delivery::Push { authorization_header: Some(header), .. } = &mut record.config.delivery
            && !SecretBox::is_sealed(header)
        {
            *header = secrets.seal(header, &stream_id);
        }
        record
    }

    /// The record as used in memory: the header opened again.
    pub fn opened(mut self, secrets: &SecretBox) -> Result<StreamRecord, SecretError> {
        let stream_id = self.config.stream_id.clone();
        if let Delivery::Push { authorization_header: Some(header), .. } = &mut self.config.delivery {
            *header = secrets.open(header, &stream_id)?;
        }
        Ok(self)
    }

    /// When the receiver last showed eligible activity (creation counts).
    pub fn last_active_ms(&self) -> u64 {
        self.last_activity_ms.unwrap_or(self.created_at_ms).max(self.created_at_ms)
    }

    /// Whether the stream may hear about `issuer`'s sessions.
    pub fn hears_from(&self, issuer: &str) -> bool {
        self.issuers.as_ref().is_none_or(|issuers| issuers.iter().any(|bound| bound == issuer))
    }

    /// Whether the stream delivers `event_type` at all.
    pub fn delivers(&self, event_type: &str) -> bool {
        self.status != StreamStatus::Disabled && self.config.events_delivered.iter().any(|e| e == event_type)
    }
}

/// The registry of streams.
pub struct StreamRegistry {
    store: Store,
    /// Seals push credentials before they are written.
    secrets: Arc<SecretBox>,
    /// Serializes applied changes so the cache applies them in commit order.
    changing: tokio::sync::Mutex<()>,
    cache: RwLock<HashMap<String, Arc<StreamRecord>>>,
    /// stream → how many subjects it holds (the subjects stay on disk).
    subject_counts: RwLock<HashMap<String, usize>>,
}

fn storage<E: std::fmt::Display>(error: E) -> StoreError {
    StoreError::storage(error)
}

/// The key a subject is stored under: its JSON, which is canonical because
/// `SubjectId` always serializes its members in one order.
fn subject_key(subject: &SubjectId) -> String {
    subject.to_value().to_string()
}

/// A stream's row and subjects removed, its id remembered as deleted.
fn delete_in(txn: &WriteTransaction, stream_id: &str) -> Result<(), StoreError> {
    txn.open_table(STREAMS).map_err(storage)?.remove(stream_id).map_err(storage)?;
    let mut subjects = txn.open_table(STREAM_SUBJECTS).map_err(storage)?;
    // NUL is the least character: (id + NUL, "") bounds exactly this stream's keys.
    let end = format!("{stream_id}\0");
    subjects.retain_in((stream_id, "")..(end.as_str(), ""), |_, _| false).map_err(storage)?;
    let mut deleted = txn.open_table(DELETED_STREAMS).map_err(storage)?;
    deleted.insert(stream_id, now_ms().to_be_bytes().as_slice()).map_err(storage)?;
    Ok(())
}

impl StreamRegistry {
    /// Loads every stream and subject from `store`, opening the sealed push
    /// credentials with `secrets`.
    pub fn load(store: Store, secrets: Arc<SecretBox>) -> Result<Self, StoreError> {
        let (cache, subject_counts) = store.read(|txn| {
            let mut cache = HashMap::new();
            let mut subject_counts: HashMap<String, usize> = HashMap::new();
            match txn.open_table(STREAMS) {
                Ok(table) => {
                    for row in table.iter().map_err(storage)? {
                        let (key, value) = row.map_err(storage)?;
                        let record = decode::<StreamRecord>(value.value())?;
                        let record = record.opened(&secrets).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                        cache.insert(key.value().to_owned(), Arc::new(record));
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(error) => return Err(storage(error)),
            }
            match txn.open_table(STREAM_SUBJECTS) {
                Ok(table) => {
                    for row in table.iter().map_err(storage)? {
                        let (key, _) = row.map_err(storage)?;
                        *subject_counts.entry(key.value().0.to_owned()).or_default() += 1;
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(error) => return Err(storage(error)),
            }
            Ok((cache, subject_counts))
        })?;
        Ok(StreamRegistry {
            store,
            secrets,
            changing: tokio::sync::Mutex::new(()),
            cache: RwLock::new(cache),
            subject_counts: RwLock::new(subject_counts),
        })
    }

    /// A stream by id, whoever owns it.
    pub fn get(&self, stream_id: &str) -> Option<Arc<StreamRecord>> {
        self.cache.read().unwrap_or_else(|p| p.into_inner()).get(stream_id).cloned()
    }

    /// A stream by id if `receiver_id` owns it; another's stream is `None`,
    /// exactly like a missing one.
    pub fn owned(&self, receiver_id: &str, stream_id: &str) -> Option<Arc<StreamRecord>> {
        self.get(stream_id).filter(|record| record.receiver_id == receiver_id)
    }

    /// A receiver's streams, oldest first.
    pub fn owned_by(&self, receiver_id: &str) -> Vec<Arc<StreamRecord>> {
        let mut streams: Vec<_> = self
            .cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|record| record.receiver_id == receiver_id)
            .cloned()
            .collect();
        streams.sort_by(|a, b| (a.created_at_ms, &a.config.stream_id).cmp(&(b.created_at_ms, &b.config.stream_id)));
        streams
    }

    /// Every stream.
    pub fn all(&self) -> Vec<Arc<StreamRecord>> {
        self.cache.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// Applies a stream record as a control change carries it: a create
    /// when the stream is new, else an update. Refused (`Ok(Err(reason))`)
    /// when the stream was deleted (a concurrent update must not bring it
    /// back) or, for a new stream, when its receiver already holds
    /// `max_streams` streams. Re-applying the same record changes nothing.
    pub(crate) async fn apply_put(
        &self,
        record: StreamRecord,
        max_streams: usize,
    ) -> Result<Result<Arc<StreamRecord>, String>, StoreError> {
        let _changing = self.changing.lock().await;
        let is_new = self.get(&record.config.stream_id).is_none();
        if is_new && self.owned_by(&record.receiver_id).len() >= max_streams {
            return Ok(Err(format!("this receiver already has the most streams allowed ({max_streams})")));
        }
        let stored = record.sealed(&self.secrets);
        let written = self
            .store
            .write(Commit::Durable, move |txn| {
                let id = stored.config.stream_id.as_str();
                if txn.open_table(DELETED_STREAMS).map_err(storage)?.get(id).map_err(storage)?.is_some() {
                    return Ok(Err(format!("stream `{id}` was deleted")));
                }
                let bytes = encode(&stored)?;
                let mut table = txn.open_table(STREAMS).map_err(storage)?;
                table.insert(id, bytes.as_slice()).map_err(storage)?;
                Ok(Ok(()))
            })
            .await?;
        if let Err(reason) = written {
            return Ok(Err(reason));
        }
        let record = Arc::new(record);
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        cache.insert(record.config.stream_id.clone(), Arc::clone(&record));
        Ok(Ok(record))
    }

    /// Deletes every stream `receiver_id` owns, in one transaction with
    /// `also` (given their ids: the receiver's removal, their queues), then
    /// updates the caches. Returns the deleted records.
    pub(crate) async fn delete_owned_by(
        &self,
        receiver_id: &str,
        mut also: impl FnMut(&WriteTransaction, &[String]) -> Result<(), StoreError> + Send + 'static,
    ) -> Result<Vec<Arc<StreamRecord>>, StoreError> {
        let _changing = self.changing.lock().await;
        let gone = self.owned_by(receiver_id);
        let ids: Vec<String> = gone.iter().map(|record| record.config.stream_id.clone()).collect();
        let deleting = ids.clone();
        self.store
            .write(Commit::Durable, move |txn| {
                for id in &deleting {
                    delete_in(txn, id)?;
                }
                also(txn, &deleting)
            })
            .await?;
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        let mut counts = self.subject_counts.write().unwrap_or_else(|p| p.into_inner());
        for id in &ids {
            cache.remove(id);
            counts.remove(id);
        }
        Ok(gone)
    }

    /// Deletes a stream and its subjects, in one transaction with `also`
    /// (its queue), and remembers the id so a change about it ordered after
    /// the deletion cannot bring it back. Idempotent.
    pub(crate) async fn apply_delete(
        &self,
        stream_id: &str,
        mut also: impl FnMut(&WriteTransaction) -> Result<(), StoreError> + Send + 'static,
    ) -> Result<(), StoreError> {
        let _changing = self.changing.lock().await;
        let owned = stream_id.to_owned();
        self.store
            .write(Commit::Durable, move |txn| {
                delete_in(txn, &owned)?;
                also(txn)
            })
            .await?;
        self.cache.write().unwrap_or_else(|p| p.into_inner()).remove(stream_id);
        self.subject_counts.write().unwrap_or_else(|p| p.into_inner()).remove(stream_id);
        Ok(())
    }

    /// Forgets deleted streams' ids older than [`DELETED_STREAM_MEMORY_MS`]
    /// (a day's deletions: a small table). Returns how many went.
    pub async fn prune_deleted(&self, now: u64) -> Result<usize, StoreError> {
        let horizon = now.saturating_sub(DELETED_STREAM_MEMORY_MS);
        self.store
            .write(Commit::Lazy, move |txn| {
                let mut deleted = txn.open_table(DELETED_STREAMS).map_err(storage)?;
                let mut removed = 0;
                deleted
                    .retain(|_, at| {
                        // An entry without a time (written before they were) goes now.
                        let when = <[u8; 8]>::try_from(at).map_or(0, u64::from_be_bytes);
                        let keep = when >= horizon;
                        if !keep {
                            removed += 1;
                        }
                        keep
                    })
                    .map_err(storage)?;
                Ok(removed)
            })
            .await
    }

    /// Adds a subject to a stream (idempotent); refused when the stream does
    /// not exist (deleted meanwhile), so no subject outlives its stream.
    pub(crate) async fn apply_add_subject(
        &self,
        stream_id: &str,
        subject: SubjectId,
    ) -> Result<Result<(), String>, StoreError> {
        // Serialized with deletion: an add racing a delete must not leave an
        // orphan subject behind.
        let _changing = self.changing.lock().await;
        if self.get(stream_id).is_none() {
            return Ok(Err(format!("stream `{stream_id}` does not exist")));
        }
        let (owned, key) = (stream_id.to_owned(), subject_key(&subject));
        let added = self
            .store
            .write(Commit::Durable, move |txn| {
                let bytes = encode(&subject)?;
                let mut table = txn.open_table(STREAM_SUBJECTS).map_err(storage)?;
                Ok(table.insert((owned.as_str(), key.as_str()), bytes.as_slice()).map_err(storage)?.is_none())
            })
            .await?;
        if added {
            *self.subject_counts.write().unwrap_or_else(|p| p.into_inner()).entry(stream_id.to_owned()).or_default() +=
                1;
        }
        Ok(Ok(()))
    }

    /// Removes a subject from a stream (idempotent).
    pub(crate) async fn apply_remove_subject(&self, stream_id: &str, subject: &SubjectId) -> Result<(), StoreError> {
        let _changing = self.changing.lock().await;
        let (owned, key) = (stream_id.to_owned(), subject_key(subject));
        let removed = self
            .store
            .write(Commit::Durable, move |txn| {
                let mut table = txn.open_table(STREAM_SUBJECTS).map_err(storage)?;
                Ok(table.remove((owned.as_str(), key.as_str())).map_err(storage)?.is_some())
            })
            .await?;
        if removed
            && let Some(count) = self.subject_counts.write().unwrap_or_else(|p| p.into_inner()).get_mut(stream_id)
        {
            *count = count.saturating_sub(1);
        }
        Ok(())
    }

    /// How many subjects a stream holds (agent sessions are not among them:
    /// the hub keeps those as touches in its graph).
    pub fn subject_count(&self, stream_id: &str) -> usize {
        self.subject_counts.read().unwrap_or_else(|p| p.into_inner()).get(stream_id).copied().unwrap_or(0)
    }

    /// Whether the stream holds `subject`.
    pub fn has_subject(&self, stream_id: &str, subject: &SubjectId) -> Result<bool, StoreError> {
        let key = subject_key(subject);
        self.store.read(|txn| match txn.open_table(STREAM_SUBJECTS) {
            Ok(table) => Ok(table.get((stream_id, key.as_str())).map_err(storage)?.is_some()),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(false),
            Err(error) => Err(storage(error)),
        })
    }
}
