//! Streams as stored: configuration, owner, status and subjects, in redb,
//! with every stream cached in memory so routing a SET never reads disk.
//!
//! Invariant: the cache changes only after the write that it mirrors has
//! committed, so nothing is routed by a change that could still be lost.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use caep_schemas::event::StreamStatus;
use caep_schemas::subject::SubjectId;
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::secrets::{SecretBox, SecretError};
use crate::store::{Commit, Store, StoreError, decode, encode};
use crate::streams::{Delivery, StreamConfig};

const STREAMS: TableDefinition<&str, &[u8]> = TableDefinition::new("streams");
const STREAM_SUBJECTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("stream_subjects");
/// Ids of deleted streams (value empty). Stream ids are random, so this only
/// ever refuses a late change about a stream that really was deleted.
const DELETED_STREAMS: TableDefinition<&str, &[u8]> = TableDefinition::new("deleted_streams");

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
    /// stream → subject key → subject; keyed so adding one is O(log n).
    subjects: RwLock<HashMap<String, BTreeMap<String, SubjectId>>>,
}

fn storage<E: std::fmt::Display>(error: E) -> StoreError {
    StoreError::storage(error)
}

/// The key a subject is stored under: its JSON, which is canonical because
/// `SubjectId` always serializes its members in one order.
fn subject_key(subject: &SubjectId) -> String {
    subject.to_value().to_string()
}

impl StreamRegistry {
    /// Loads every stream and subject from `store`, opening the sealed push
    /// credentials with `secrets`.
    pub fn load(store: Store, secrets: Arc<SecretBox>) -> Result<Self, StoreError> {
        let (cache, subjects) = store.read(|txn| {
            let mut cache = HashMap::new();
            let mut subjects: HashMap<String, BTreeMap<String, SubjectId>> = HashMap::new();
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
                        let (key, value) = row.map_err(storage)?;
                        let subject: SubjectId = decode(value.value())?;
                        let (stream_id, subject_key) = key.value();
                        subjects.entry(stream_id.to_owned()).or_default().insert(subject_key.to_owned(), subject);
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(error) => return Err(storage(error)),
            }
            Ok((cache, subjects))
        })?;
        Ok(StreamRegistry {
            store,
            secrets,
            changing: tokio::sync::Mutex::new(()),
            cache: RwLock::new(cache),
            subjects: RwLock::new(subjects),
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

    /// Deletes a stream and its subjects, and remembers the id so a change
    /// about it ordered after the deletion cannot bring it back. Idempotent.
    pub(crate) async fn apply_delete(&self, stream_id: &str) -> Result<(), StoreError> {
        let _changing = self.changing.lock().await;
        let owned = stream_id.to_owned();
        self.store
            .write(Commit::Durable, move |txn| {
                txn.open_table(STREAMS).map_err(storage)?.remove(owned.as_str()).map_err(storage)?;
                let mut subjects = txn.open_table(STREAM_SUBJECTS).map_err(storage)?;
                // NUL is the least character: (id + NUL, "") bounds exactly this stream's keys.
                let end = format!("{owned}\0");
                subjects.retain_in((owned.as_str(), "")..(end.as_str(), ""), |_, _| false).map_err(storage)?;
                let mut deleted = txn.open_table(DELETED_STREAMS).map_err(storage)?;
                deleted.insert(owned.as_str(), [].as_slice()).map_err(storage)?;
                Ok(())
            })
            .await?;
        self.cache.write().unwrap_or_else(|p| p.into_inner()).remove(stream_id);
        self.subjects.write().unwrap_or_else(|p| p.into_inner()).remove(stream_id);
        Ok(())
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
        let (owned, key, stored) = (stream_id.to_owned(), subject_key(&subject), subject.clone());
        self.store
            .write(Commit::Durable, move |txn| {
                let bytes = encode(&stored)?;
                let mut table = txn.open_table(STREAM_SUBJECTS).map_err(storage)?;
                table.insert((owned.as_str(), key.as_str()), bytes.as_slice()).map_err(storage)?;
                Ok(())
            })
            .await?;
        let mut subjects = self.subjects.write().unwrap_or_else(|p| p.into_inner());
        subjects.entry(stream_id.to_owned()).or_default().insert(subject_key(&subject), subject);
        Ok(Ok(()))
    }

    /// Removes a subject from a stream (idempotent).
    pub(crate) async fn apply_remove_subject(&self, stream_id: &str, subject: &SubjectId) -> Result<(), StoreError> {
        let _changing = self.changing.lock().await;
        let (owned, key) = (stream_id.to_owned(), subject_key(subject));
        self.store
            .write(Commit::Durable, move |txn| {
                let mut table = txn.open_table(STREAM_SUBJECTS).map_err(storage)?;
                table.remove((owned.as_str(), key.as_str())).map_err(storage)?;
                Ok(())
            })
            .await?;
        if let Some(list) = self.subjects.write().unwrap_or_else(|p| p.into_inner()).get_mut(stream_id) {
            list.remove(&subject_key(subject));
        }
        Ok(())
    }

    /// How many subjects were added to a stream.
    pub fn subject_count(&self, stream_id: &str) -> usize {
        self.subjects.read().unwrap_or_else(|p| p.into_inner()).get(stream_id).map_or(0, BTreeMap::len)
    }

    /// The subjects added to a stream.
    pub fn subjects(&self, stream_id: &str) -> Vec<SubjectId> {
        let subjects = self.subjects.read().unwrap_or_else(|p| p.into_inner());
        subjects.get(stream_id).map(|list| list.values().cloned().collect()).unwrap_or_default()
    }
}
