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
use redb::{ReadableTable, TableDefinition, WriteTransaction};
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
    /// The IdPs whose sessions it may hear about; `None`: every trusted IdP
    /// (the single-IdP default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuers: Option<Vec<String>>,
    /// The operator granted its streams every subject of its IdPs
    /// (`default_subjects: ALL`); a receiver can never grant itself this.
    #[serde(default)]
    pub all_subjects: bool,
}

/// What the operator asks for a new receiver (`POST /admin/receivers`).
#[derive(Clone, Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReceiverSpec {
    #[schema(pattern = "\\S")]
    pub name: String,
    #[schema(pattern = "\\S")]
    pub audience: String,
    /// Empty: both `ssf.manage` and `ssf.read`.
    #[serde(default)]
    #[schema(value_type = Vec<crate::openapi::ScopeName>)]
    pub scopes: Vec<String>,
    /// The IdPs whose sessions it may hear about; omitted: every trusted IdP.
    #[serde(default)]
    #[schema(min_items = 1, value_type = Option<Vec<crate::openapi::NonBlank>>)]
    pub issuers: Option<Vec<String>>,
    #[serde(default)]
    pub all_subjects: bool,
}

impl ReceiverSpec {
    /// A receiver with both scopes, bound to every trusted IdP.
    pub fn new(name: &str, audience: &str) -> Self {
        ReceiverSpec { name: name.to_owned(), audience: audience.to_owned(), ..ReceiverSpec::default() }
    }
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
    /// Refused when the creation was applied (e.g. another instance created
    /// a receiver with the same audience first).
    #[error("{0}")]
    Conflict(String),
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

/// The hex SHA-256 digest of a token, as a control change carries it.
pub fn token_digest_hex(token: &str) -> String {
    digest(token).iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The digest bytes of a hex SHA-256 digest; `None` unless exactly 64 hex digits.
fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut bytes = [0u8; 32];
    for (at, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(at * 2..at * 2 + 2)?, 16).ok()?;
    }
    Some(bytes)
}

/// A receiver about to be created, with its token (shown to the operator
/// once) and the token's digest (the only form that is stored or replicated).
pub struct NewReceiver {
    pub receiver: Receiver,
    pub token: String,
    pub token_digest: String,
}

impl std::fmt::Debug for NewReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewReceiver").field("receiver", &self.receiver).field("token", &"<redacted>").finish()
    }
}

impl Receivers {
    /// The registry in `store`.
    pub fn new(store: Store) -> Self {
        Receivers { store }
    }

    /// Validates a new receiver and decides everything random about it (id,
    /// token, creation time), without storing anything: the caller records
    /// [`ControlChange::ReceiverCreated`](crate::control::ControlChange) with
    /// the receiver and the token's digest. The audience is checked against
    /// local state here for a prompt answer, and again when the change is applied.
    pub fn prepare(&self, spec: ReceiverSpec) -> Result<NewReceiver, ReceiverError> {
        let ReceiverSpec { name, audience, scopes, issuers, all_subjects } = spec;
        if name.trim().is_empty() || audience.trim().is_empty() {
            return Err(ReceiverError::Invalid("`name` and `audience` must be non-empty strings".into()));
        }
        let scopes = if scopes.is_empty() { vec![SCOPE_MANAGE.into(), SCOPE_READ.into()] } else { scopes };
        if let Some(unknown) = scopes.iter().find(|s| *s != SCOPE_MANAGE && *s != SCOPE_READ) {
            return Err(ReceiverError::Invalid(format!("unknown scope `{unknown}` (ssf.manage, ssf.read)")));
        }
        if let Some(issuers) = &issuers
            && (issuers.is_empty() || issuers.iter().any(|issuer| issuer.trim().is_empty()))
        {
            return Err(ReceiverError::Invalid(
                "`issuers` must list at least one issuer (omit it to bind every trusted issuer)".into(),
            ));
        }
        if self.list()?.iter().any(|existing| existing.audience == audience) {
            return Err(ReceiverError::DuplicateAudience(audience));
        }
        let receiver = Receiver {
            receiver_id: uuid::Uuid::new_v4().simple().to_string(),
            name,
            audience,
            scopes,
            created_at_ms: now_ms(),
            issuers,
            all_subjects,
        };
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        let token = format!("ssf_{}", URL_SAFE_NO_PAD.encode(secret));
        let token_digest = token_digest_hex(&token);
        Ok(NewReceiver { receiver, token, token_digest })
    }

    /// Applies a created receiver: refused (`Ok(Err(reason))`) when another
    /// receiver already has its audience or its id, or the digest is not a
    /// SHA-256 digest. Re-applying the same creation changes nothing.
    pub(crate) async fn apply_created(
        &self,
        receiver: Receiver,
        token_digest: &str,
    ) -> Result<Result<(), String>, StoreError> {
        let Some(token_digest) = parse_digest(token_digest) else {
            return Ok(Err("the token digest is not a hex SHA-256 digest".into()));
        };
        self.store
            .write(Commit::Durable, move |txn| {
                let mut receivers = txn.open_table(RECEIVERS).map_err(storage)?;
                if let Some(existing) = receivers.get(receiver.receiver_id.as_str()).map_err(storage)? {
                    let existing: Receiver = decode(existing.value())?;
                    return Ok(if existing == receiver {
                        Ok(())
                    } else {
                        Err(format!("receiver id `{}` exists already", receiver.receiver_id))
                    });
                }
                for row in receivers.iter().map_err(storage)? {
                    let (_, value) = row.map_err(storage)?;
                    let existing: Receiver = decode(value.value())?;
                    if existing.audience == receiver.audience {
                        return Ok(Err(ReceiverError::DuplicateAudience(receiver.audience.clone()).to_string()));
                    }
                }
                receivers.insert(receiver.receiver_id.as_str(), encode(&receiver)?.as_slice()).map_err(storage)?;
                let mut tokens = txn.open_table(TOKENS).map_err(storage)?;
                tokens.insert(token_digest.as_slice(), receiver.receiver_id.as_str()).map_err(storage)?;
                Ok(Ok(()))
            })
            .await
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

    /// Removes a receiver and revokes its token, inside a caller's
    /// transaction (which also disables its streams). Returns false when
    /// there was no such receiver, so re-applying does nothing.
    pub(crate) fn delete_in(txn: &WriteTransaction, receiver_id: &str) -> Result<bool, StoreError> {
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
        Ok(receivers.remove(receiver_id).map_err(storage)?.is_some())
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

    async fn create(
        receivers: &Receivers,
        name: &str,
        audience: &str,
        scopes: Vec<String>,
    ) -> Result<(Receiver, String), ReceiverError> {
        let new = receivers.prepare(ReceiverSpec { scopes, ..ReceiverSpec::new(name, audience) })?;
        match receivers.apply_created(new.receiver.clone(), &new.token_digest).await? {
            Ok(()) => Ok((new.receiver, new.token)),
            Err(_) => Err(ReceiverError::DuplicateAudience(audience.to_owned())),
        }
    }

    #[test]
    fn bindings_are_checked_and_unknown_members_refused() {
        let (_dir, receivers) = open();
        let unbound = ReceiverSpec { issuers: Some(Vec::new()), ..ReceiverSpec::new("A", "https://a.example") };
        assert!(matches!(receivers.prepare(unbound), Err(ReceiverError::Invalid(_))), "bound to no IdP");
        let blank = ReceiverSpec { issuers: Some(vec![" ".into()]), ..ReceiverSpec::new("A", "https://a.example") };
        assert!(matches!(receivers.prepare(blank), Err(ReceiverError::Invalid(_))));
        // A misspelt member must not silently leave the receiver bound to every IdP.
        let typo = serde_json::json!({"name": "A", "audience": "https://a.example", "issuer": ["https://idp"]});
        assert!(serde_json::from_value::<ReceiverSpec>(typo).is_err());
        let bound =
            ReceiverSpec { issuers: Some(vec!["https://idp".into()]), ..ReceiverSpec::new("A", "https://a.example") };
        let prepared = receivers.prepare(bound).expect("valid");
        assert_eq!(prepared.receiver.issuers, Some(vec!["https://idp".to_owned()]));
        assert!(!prepared.receiver.all_subjects, "every subject only when the operator grants it");
    }

    #[tokio::test]
    async fn concurrent_creations_with_one_audience_are_decided_by_apply_order() {
        let (_dir, receivers) = open();
        // Both pass the originators' checks: neither sees the other yet.
        let first = receivers.prepare(ReceiverSpec::new("A", "https://same.example")).expect("prepare");
        let second = receivers.prepare(ReceiverSpec::new("B", "https://same.example")).expect("prepare");
        assert_eq!(receivers.apply_created(first.receiver.clone(), &first.token_digest).await.expect("apply"), Ok(()));
        let refused = receivers.apply_created(second.receiver.clone(), &second.token_digest).await.expect("apply");
        assert!(refused.is_err(), "the later creation conflicts");
        // Re-applying the winner is harmless; the loser's token never works.
        assert_eq!(receivers.apply_created(first.receiver.clone(), &first.token_digest).await.expect("apply"), Ok(()));
        assert_eq!(receivers.authenticate(&first.token).expect("auth"), Some(first.receiver));
        assert_eq!(receivers.authenticate(&second.token).expect("auth"), None);
        assert_eq!(receivers.list().expect("list").len(), 1);
        let bad = receivers.apply_created(second.receiver, "not-hex").await.expect("apply");
        assert!(bad.is_err());
    }

    fn open() -> (tempfile::TempDir, Receivers) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("db.redb")).expect("open");
        (dir, Receivers::new(store))
    }

    #[tokio::test]
    async fn tokens_authenticate_their_receiver_until_deleted() {
        let (_dir, receivers) = open();
        let (alice, alice_token) =
            create(&receivers, "Alice RP", "https://alice.example", vec![]).await.expect("create");
        let (bob, bob_token) = create(&receivers, "Bob RP", "https://bob.example", vec![]).await.expect("create");
        assert!(alice.has_scope(SCOPE_MANAGE) && alice.has_scope(SCOPE_READ));
        assert_eq!(receivers.authenticate(&alice_token).expect("auth"), Some(alice.clone()));
        assert_eq!(receivers.authenticate(&bob_token).expect("auth"), Some(bob.clone()));
        assert_eq!(receivers.authenticate("ssf_forged").expect("auth"), None);
        assert_eq!(receivers.list().expect("list").len(), 2);

        let delete = |id: String| receivers.store.write(Commit::Durable, move |txn| Receivers::delete_in(txn, &id));
        assert!(delete(alice.receiver_id.clone()).await.expect("delete"));
        assert_eq!(receivers.authenticate(&alice_token).expect("auth"), None, "token revoked");
        assert!(!delete(alice.receiver_id.clone()).await.expect("delete"), "already gone");
        assert_eq!(receivers.authenticate(&bob_token).expect("auth"), Some(bob));
    }

    #[tokio::test]
    async fn audiences_are_unique_and_input_is_checked() {
        let (_dir, receivers) = open();
        create(&receivers, "A", "https://a.example", vec![]).await.expect("create");
        let duplicate = create(&receivers, "A2", "https://a.example", vec![]).await;
        assert!(matches!(duplicate, Err(ReceiverError::DuplicateAudience(_))));
        assert!(matches!(create(&receivers, "", "x", vec![]).await, Err(ReceiverError::Invalid(_))));
        let bad_scope = create(&receivers, "B", "https://b.example", vec!["admin".into()]).await;
        assert!(matches!(bad_scope, Err(ReceiverError::Invalid(_))));
        let (reader, _) = create(&receivers, "R", "https://r.example", vec![SCOPE_READ.into()]).await.expect("create");
        assert!(reader.has_scope(SCOPE_READ) && !reader.has_scope(SCOPE_MANAGE));
    }

    #[tokio::test]
    async fn tokens_are_stored_only_as_digests() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("db.redb");
        let token = {
            let receivers = Receivers::new(Store::open(&path).expect("open"));
            create(&receivers, "A", "https://a.example", vec![]).await.expect("create").1
        };
        // Give the writer thread a moment to release the file.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let bytes = std::fs::read(&path).expect("read db file");
        let needle = token.as_bytes();
        assert!(!bytes.windows(needle.len()).any(|w| w == needle), "token found in the database file");
    }
}
