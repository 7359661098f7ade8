//! Receivers (relying parties) and their bearer tokens.
//!
//! A receiver gets one OAuth-style bearer token, shown once at creation and
//! stored only as its SHA-256 digest. The token binds every management call
//! to that receiver: it sees and changes only its own streams, and its
//! streams' SETs carry its audience. Audiences are unique, so one receiver
//! can never be handed SETs addressed to another.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::outbox::now_ms;
use crate::store::{Commit, Store, StoreError, decode, encode};

const RECEIVERS: TableDefinition<&str, &[u8]> = TableDefinition::new("receivers");
const TOKENS: TableDefinition<&[u8], &str> = TableDefinition::new("receiver_tokens");

/// Scope to manage streams (CAEP Interoperability Profile).
pub const SCOPE_MANAGE: &str = "ssf.manage";
/// Scope to read streams and poll.
pub const SCOPE_READ: &str = "ssf.read";

/// A registered receiver.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Receiver {
    pub receiver_id: String,
    pub name: String,
    /// The `aud` of every SET its streams carry.
    pub audience: String,
    pub scopes: Vec<String>,
    pub created_at_ms: u64,
}

impl Receiver {
    /// Whether the receiver's token carries `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }
}

/// Why a receiver could not be created.
#[derive(Debug, thiserror::Error)]
pub enum ReceiverError {
    #[error("{0}")]
    Invalid(String),
    #[error("a receiver with audience `{0}` exists already")]
    DuplicateAudience(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The receiver registry.
#[derive(Clone)]
pub struct Receivers {
    store: Store,
}

fn storage<E: std::fmt::Display>(error: E) -> StoreError {
    StoreError::storage(error)
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Receivers {
    /// The registry in `store`.
    pub fn new(store: Store) -> Self {
        Receivers { store }
    }

    /// Registers a receiver and returns it with its token (shown only now).
    /// `scopes` empty means both `ssf.manage` and `ssf.read`.
    pub async fn create(
        &self,
        name: &str,
        audience: &str,
        scopes: Vec<String>,
    ) -> Result<(Receiver, String), ReceiverError> {
        if name.trim().is_empty() || audience.trim().is_empty() {
            return Err(ReceiverError::Invalid("`name` and `audience` must be non-empty strings".into()));
        }
        let scopes = if scopes.is_empty() { vec![SCOPE_MANAGE.into(), SCOPE_READ.into()] } else { scopes };
        if let Some(unknown) = scopes.iter().find(|s| *s != SCOPE_MANAGE && *s != SCOPE_READ) {
            return Err(ReceiverError::Invalid(format!("unknown scope `{unknown}` (ssf.manage, ssf.read)")));
        }
        let receiver = Receiver {
            receiver_id: uuid::Uuid::new_v4().simple().to_string(),
            name: name.to_owned(),
            audience: audience.to_owned(),
            scopes,
            created_at_ms: now_ms(),
        };
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        let token = format!("ssf_{}", URL_SAFE_NO_PAD.encode(secret));
        let token_digest = digest(&token);
        let record = receiver.clone();
        let created = self
            .store
            .write(Commit::Durable, move |txn| {
                let mut receivers = txn.open_table(RECEIVERS).map_err(storage)?;
                for row in receivers.iter().map_err(storage)? {
                    let (_, value) = row.map_err(storage)?;
                    let existing: Receiver = decode(value.value())?;
                    if existing.audience == record.audience {
                        return Ok(Err(ReceiverError::DuplicateAudience(record.audience.clone())));
                    }
                }
                receivers.insert(record.receiver_id.as_str(), encode(&record)?.as_slice()).map_err(storage)?;
                let mut tokens = txn.open_table(TOKENS).map_err(storage)?;
                tokens.insert(token_digest.as_slice(), record.receiver_id.as_str()).map_err(storage)?;
                Ok(Ok(()))
            })
            .await?;
        created?;
        tracing::info!(receiver_id = %receiver.receiver_id, audience = %receiver.audience, "receiver registered");
        Ok((receiver, token))
    }

    /// Every receiver.
    pub fn list(&self) -> Result<Vec<Receiver>, StoreError> {
        self.store.read(|txn| {
            let receivers = match txn.open_table(RECEIVERS) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(error) => return Err(storage(error)),
            };
            let mut all = Vec::new();
            for row in receivers.iter().map_err(storage)? {
                let (_, value) = row.map_err(storage)?;
                all.push(decode(value.value())?);
            }
            Ok(all)
        })
    }

    /// One receiver by id.
    pub fn get(&self, receiver_id: &str) -> Result<Option<Receiver>, StoreError> {
        self.store.read(|txn| {
            let receivers = match txn.open_table(RECEIVERS) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(error) => return Err(storage(error)),
            };
            let row = receivers.get(receiver_id).map_err(storage)?;
            row.map(|value| decode(value.value())).transpose()
        })
    }

    /// Removes a receiver and revokes its token at once. Returns false when
    /// there was no such receiver. Its streams are the caller's to disable.
    pub async fn delete(&self, receiver_id: &str) -> Result<bool, StoreError> {
        let receiver_id = receiver_id.to_owned();
        self.store
            .write(Commit::Durable, move |txn| {
                let mut tokens = txn.open_table(TOKENS).map_err(storage)?;
                let digests: Vec<Vec<u8>> = tokens
                    .iter()
                    .map_err(storage)?
                    .filter_map(Result::ok)
                    .filter(|(_, owner)| owner.value() == receiver_id)
                    .map(|(digest, _)| digest.value().to_vec())
                    .collect();
                for digest in digests {
                    tokens.remove(digest.as_slice()).map_err(storage)?;
                }
                let mut receivers = txn.open_table(RECEIVERS).map_err(storage)?;
                Ok(receivers.remove(receiver_id.as_str()).map_err(storage)?.is_some())
            })
            .await
    }

    /// The receiver a bearer token belongs to, if any.
    pub fn authenticate(&self, token: &str) -> Result<Option<Receiver>, StoreError> {
        let token_digest = digest(token);
        self.store.read(|txn| {
            let tokens = match txn.open_table(TOKENS) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(error) => return Err(storage(error)),
            };
            let Some(owner) = tokens.get(token_digest.as_slice()).map_err(storage)? else { return Ok(None) };
            let receivers = txn.open_table(RECEIVERS).map_err(storage)?;
            let row = receivers.get(owner.value()).map_err(storage)?;
            row.map(|value| decode(value.value())).transpose()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, Receivers) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("db.redb")).expect("open");
        (dir, Receivers::new(store))
    }

    #[tokio::test]
    async fn tokens_authenticate_their_receiver_until_deleted() {
        let (_dir, receivers) = open();
        let (alice, alice_token) = receivers.create("Alice RP", "https://alice.example", vec![]).await.expect("create");
        let (bob, bob_token) = receivers.create("Bob RP", "https://bob.example", vec![]).await.expect("create");
        assert!(alice.has_scope(SCOPE_MANAGE) && alice.has_scope(SCOPE_READ));
        assert_eq!(receivers.authenticate(&alice_token).expect("auth"), Some(alice.clone()));
        assert_eq!(receivers.authenticate(&bob_token).expect("auth"), Some(bob.clone()));
        assert_eq!(receivers.authenticate("ssf_forged").expect("auth"), None);
        assert_eq!(receivers.list().expect("list").len(), 2);

        assert!(receivers.delete(&alice.receiver_id).await.expect("delete"));
        assert_eq!(receivers.authenticate(&alice_token).expect("auth"), None, "token revoked");
        assert!(!receivers.delete(&alice.receiver_id).await.expect("delete"), "already gone");
        assert_eq!(receivers.authenticate(&bob_token).expect("auth"), Some(bob));
    }

    #[tokio::test]
    async fn audiences_are_unique_and_input_is_checked() {
        let (_dir, receivers) = open();
        receivers.create("A", "https://a.example", vec![]).await.expect("create");
        let duplicate = receivers.create("A2", "https://a.example", vec![]).await;
        assert!(matches!(duplicate, Err(ReceiverError::DuplicateAudience(_))));
        assert!(matches!(receivers.create("", "x", vec![]).await, Err(ReceiverError::Invalid(_))));
        let bad_scope = receivers.create("B", "https://b.example", vec!["admin".into()]).await;
        assert!(matches!(bad_scope, Err(ReceiverError::Invalid(_))));
        let (reader, _) = receivers.create("R", "https://r.example", vec![SCOPE_READ.into()]).await.expect("create");
        assert!(reader.has_scope(SCOPE_READ) && !reader.has_scope(SCOPE_MANAGE));
    }

    #[tokio::test]
    async fn tokens_are_stored_only_as_digests() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("db.redb");
        let token = {
            let receivers = Receivers::new(Store::open(&path).expect("open"));
            receivers.create("A", "https://a.example", vec![]).await.expect("create").1
        };
        // Give the writer thread a moment to release the file.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let bytes = std::fs::read(&path).expect("read db file");
        let needle = token.as_bytes();
        assert!(!bytes.windows(needle.len()).any(|w| w == needle), "token found in the database file");
    }
}
