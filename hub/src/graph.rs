//! The agent-session graph in redb: sessions with their user and parent,
//! parent → child edges (sub-agents), session → stream touches, and the
//! user → sessions index.
//!
//! Every function here runs inside one transaction it is given; the caller
//! (the ingest and touch paths) runs them in the store's single writer, so
//! a revocation and a concurrent spawn or touch are serialized: whichever
//! commits second sees the other, and no leaf escapes.

use std::collections::{BTreeSet, VecDeque};

use caep_schemas::event::Authority;
use caep_schemas::subject::SubjectId;
use caep_transmitter::store::{StoreError, decode, encode};
use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
const CHILDREN: TableDefinition<(&str, &str), ()> = TableDefinition::new("session_children");
const TOUCHES: TableDefinition<(&str, &str), u64> = TableDefinition::new("session_touches");
const USER_SESSIONS: TableDefinition<(&str, &str), ()> = TableDefinition::new("user_sessions");
/// (parent, child) → the child's root, for a child whose tree lives in
/// another partition (Kafka mode: it was seen before its parent).
const FOREIGN_CHILDREN: TableDefinition<(&str, &str), &str> = TableDefinition::new("session_foreign_children");
/// (session, stream) pairs already sent a session-revoked: one per pair, ever.
const REVOCATIONS_SENT: TableDefinition<(&str, &str), ()> = TableDefinition::new("revocations_sent");

/// Why and when a session was revoked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Revocation {
    /// The cascade that revoked it.
    pub txn: String,
    pub at_ms: u64,
}

/// One agent session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub session_id: String,
    /// The session as the IdP named it (the `session` member of `sub_id`).
    pub subject: SubjectId,
    /// The IdP that established it; only that IdP may act on it.
    pub issuer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<SubjectId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<Authority>,
    pub established_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<Revocation>,
}

/// The graph key of a session subject: an opaque id is used as is, any
/// other format by its canonical JSON, so distinct subjects never collide.
pub fn session_key(subject: &SubjectId) -> String {
    match subject {
        SubjectId::Opaque { id } => id.clone(),
        other => other.to_value().to_string(),
    }
}

/// The index key of a user subject, scoped by the issuer that named it.
pub fn user_key(issuer: &str, user: &SubjectId) -> String {
    let normalized = match user {
        SubjectId::Email { email } => SubjectId::Email { email: email.to_ascii_lowercase() },
        other => other.clone(),
    };
    format!("{issuer} {}", normalized.to_value())
}

fn storage<E: std::fmt::Display>(error: E) -> StoreError {
    StoreError::storage(error)
}

/// Reads a session.
pub fn session(txn: &WriteTransaction, session_id: &str) -> Result<Option<SessionRecord>, StoreError> {
    let sessions = txn.open_table(SESSIONS).map_err(storage)?;
    let row = sessions.get(session_id).map_err(storage)?;
    row.map(|value| decode(value.value())).transpose()
}

/// Reads a session from a read snapshot.
pub fn session_in(txn: &redb::ReadTransaction, session_id: &str) -> Result<Option<SessionRecord>, StoreError> {
    let sessions = match txn.open_table(SESSIONS) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(error) => return Err(storage(error)),
    };
    let row = sessions.get(session_id).map_err(storage)?;
    row.map(|value| decode(value.value())).transpose()
}

/// Writes a session.
pub fn put_session(txn: &WriteTransaction, record: &SessionRecord) -> Result<(), StoreError> {
    let bytes = encode(record)?;
    let mut sessions = txn.open_table(SESSIONS).map_err(storage)?;
    sessions.insert(record.session_id.as_str(), bytes.as_slice()).map_err(storage)?;
    Ok(())
}

/// Records a new session, its parent edge and its user index entry.
pub fn insert_session(txn: &WriteTransaction, record: &SessionRecord) -> Result<(), StoreError> {
    put_session(txn, record)?;
    if let Some(parent) = &record.parent {
        let mut children = txn.open_table(CHILDREN).map_err(storage)?;
        children.insert((parent.as_str(), record.session_id.as_str()), ()).map_err(storage)?;
    }
    if let Some(user) = &record.user {
        let key = user_key(&record.issuer, user);
        let mut index = txn.open_table(USER_SESSIONS).map_err(storage)?;
        index.insert((key.as_str(), record.session_id.as_str()), ()).map_err(storage)?;
    }
    Ok(())
}

/// Records that `session_id` reached `stream_id`; true when it is new.
pub fn touch(txn: &WriteTransaction, session_id: &str, stream_id: &str, at_ms: u64) -> Result<bool, StoreError> {
    let mut touches = txn.open_table(TOUCHES).map_err(storage)?;
    if touches.get((session_id, stream_id)).map_err(storage)?.is_some() {
        return Ok(false);
    }
    touches.insert((session_id, stream_id), at_ms).map_err(storage)?;
    Ok(true)
}

/// Marks that `stream_id` is (being) told of `session_id`'s revocation;
/// false when it already was, so no path sends a pair twice.
pub fn claim_revocation(txn: &WriteTransaction, session_id: &str, stream_id: &str) -> Result<bool, StoreError> {
    let mut sent = txn.open_table(REVOCATIONS_SENT).map_err(storage)?;
    Ok(sent.insert((session_id, stream_id), ()).map_err(storage)?.is_none())
}

/// The streams a session touched.
pub fn touched_streams(txn: &WriteTransaction, session_id: &str) -> Result<Vec<String>, StoreError> {
    let touches = txn.open_table(TOUCHES).map_err(storage)?;
    let range = touches.range((session_id, "")..(session_id, "\u{10FFFF}")).map_err(storage)?;
    range.map(|row| row.map(|(key, _)| key.value().1.to_owned()).map_err(storage)).collect()
}

/// The streams a session touched, with when, from a read snapshot.
pub fn touches_in(txn: &redb::ReadTransaction, session_id: &str) -> Result<Vec<(String, u64)>, StoreError> {
    let touches = match txn.open_table(TOUCHES) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(error) => return Err(storage(error)),
    };
    let range = touches.range((session_id, "")..(session_id, "\u{10FFFF}")).map_err(storage)?;
    range.map(|row| row.map(|(key, at)| (key.value().1.to_owned(), at.value())).map_err(storage)).collect()
}

fn children_of(
    table: &impl ReadableTable<(&'static str, &'static str), ()>,
    parent: &str,
) -> Result<Vec<String>, StoreError> {
    let range = table.range((parent, "")..(parent, "\u{10FFFF}")).map_err(storage)?;
    range.map(|row| row.map(|(key, _)| key.value().1.to_owned()).map_err(storage)).collect()
}

/// `roots` and all their descendants, breadth first, each once.
pub fn subtree(txn: &WriteTransaction, roots: &[String]) -> Result<Vec<String>, StoreError> {
    let children = txn.open_table(CHILDREN).map_err(storage)?;
    walk(&children, roots)
}

/// The same walk over a read snapshot.
pub fn subtree_in(txn: &redb::ReadTransaction, roots: &[String]) -> Result<Vec<String>, StoreError> {
    match txn.open_table(CHILDREN) {
        Ok(children) => walk(&children, roots),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(roots.to_vec()),
        Err(error) => Err(storage(error)),
    }
}

fn walk(
    children: &impl ReadableTable<(&'static str, &'static str), ()>,
    roots: &[String],
) -> Result<Vec<String>, StoreError> {
    let mut seen: BTreeSet<String> = roots.iter().cloned().collect();
    let mut queue: VecDeque<String> = roots.iter().cloned().collect();
    let mut order = Vec::new();
    while let Some(id) = queue.pop_front() {
        for child in children_of(children, &id)? {
            if seen.insert(child.clone()) {
                queue.push_back(child);
            }
        }
        order.push(id);
    }
    Ok(order)
}

/// Records a child whose tree lives in another partition, under `child_root`.
pub fn add_foreign_child(
    txn: &WriteTransaction,
    parent: &str,
    child: &str,
    child_root: &str,
) -> Result<(), StoreError> {
    let mut foreign = txn.open_table(FOREIGN_CHILDREN).map_err(storage)?;
    foreign.insert((parent, child), child_root).map_err(storage)?;
    Ok(())
}

/// A session's children whose trees live in other partitions: (child, its root).
pub fn foreign_children(txn: &WriteTransaction, parent: &str) -> Result<Vec<(String, String)>, StoreError> {
    let foreign = txn.open_table(FOREIGN_CHILDREN).map_err(storage)?;
    let range = foreign.range((parent, "")..(parent, "\u{10FFFF}")).map_err(storage)?;
    range.map(|row| row.map(|(k, v)| (k.value().1.to_owned(), v.value().to_owned())).map_err(storage)).collect()
}

/// [`foreign_children`] in a read snapshot.
pub fn foreign_children_in(txn: &redb::ReadTransaction, parent: &str) -> Result<Vec<(String, String)>, StoreError> {
    let foreign = match txn.open_table(FOREIGN_CHILDREN) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(error) => return Err(storage(error)),
    };
    let range = foreign.range((parent, "")..(parent, "\u{10FFFF}")).map_err(storage)?;
    range.map(|row| row.map(|(k, v)| (k.value().1.to_owned(), v.value().to_owned())).map_err(storage)).collect()
}

/// The sessions of a user as named by `issuer`.
pub fn sessions_of_user(txn: &WriteTransaction, issuer: &str, user: &SubjectId) -> Result<Vec<String>, StoreError> {
    let key = user_key(issuer, user);
    let index = txn.open_table(USER_SESSIONS).map_err(storage)?;
    let range = index.range((key.as_str(), "")..(key.as_str(), "\u{10FFFF}")).map_err(storage)?;
    range.map(|row| row.map(|(k, _)| k.value().1.to_owned()).map_err(storage)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use caep_transmitter::store::{Commit, Store};

    fn record(id: &str, parent: Option<&str>, user: &str) -> SessionRecord {
        SessionRecord {
            session_id: id.into(),
            subject: SubjectId::opaque(id),
            issuer: "https://idp".into(),
            user: Some(SubjectId::email(user)),
            parent: parent.map(str::to_owned),
            authority: None,
            established_at_ms: 1,
            revoked: None,
        }
    }

    #[tokio::test]
    async fn subtrees_touches_and_users() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("g.redb")).expect("open");
        let (tree, touched, users) = store
            .write(Commit::Durable, |txn| {
                for (id, parent) in [("r", None), ("a", Some("r")), ("b", Some("r")), ("a1", Some("a")), ("x", None)] {
                    insert_session(txn, &record(id, parent, if id == "x" { "other@x" } else { "u@x" }))?;
                }
                assert!(touch(txn, "a1", "stream-1", 5)?);
                assert!(!touch(txn, "a1", "stream-1", 6)?, "a second touch is not new");
                touch(txn, "a1", "stream-2", 7)?;
                touch(txn, "a10", "stream-3", 7)?;
                let tree = subtree(txn, &["a".into()])?;
                Ok((tree, touched_streams(txn, "a1")?, sessions_of_user(txn, "https://idp", &SubjectId::email("U@X"))?))
            })
            .await
            .expect("write");
        assert_eq!(tree, ["a", "a1"]);
        assert_eq!(touched, ["stream-1", "stream-2"], "no prefix bleed from a10");
        assert_eq!(users, ["a", "a1", "b", "r"], "email users match case-insensitively; x is someone else");
        let whole = store.read(|txn| subtree_in(txn, &["r".into()])).expect("read");
        assert_eq!(whole, ["r", "a", "b", "a1"]);
    }

    #[test]
    fn session_keys_do_not_collide_across_formats() {
        assert_eq!(session_key(&SubjectId::opaque("S1")), "S1");
        let jwt = SubjectId::JwtId { iss: "i".into(), jti: "S1".into() };
        assert_ne!(session_key(&jwt), "S1");
        assert_ne!(user_key("https://a", &SubjectId::email("u@x")), user_key("https://b", &SubjectId::email("u@x")));
    }
}
