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
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use crate::scope::{local_id, scoped};

// Every session key below is a scoped key (`scope::scoped(issuer, id)`):
// a session belongs to the IdP that named it, and another IdP's session
// with the same id is another session.
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
const CHILDREN: TableDefinition<(&str, &str), ()> = TableDefinition::new("session_children");
/// (session, stream) → [`Touch`].
const TOUCHES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("session_touches_v2");
/// (session, stream) → [`Touch`] of a session no IdP has named yet: it
/// becomes a touch when the session appears, and expires otherwise.
const PENDING_TOUCHES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("pending_touches");
/// (when, session, stream): the pending touches by age, for pruning.
const PENDING_BY_AGE: TableDefinition<(u64, &str, &str), ()> = TableDefinition::new("pending_touches_by_age");
/// stream → how many pending touches it holds (capped per stream).
const PENDING_PER_STREAM: TableDefinition<&str, u64> = TableDefinition::new("pending_touches_per_stream");
const USER_SESSIONS: TableDefinition<(&str, &str), ()> = TableDefinition::new("user_sessions");
/// (parent, child) → the child's root, for a child whose tree lives in
/// another partition (Kafka mode: it was seen before its parent).
const FOREIGN_CHILDREN: TableDefinition<(&str, &str), &str> = TableDefinition::new("session_foreign_children");
/// (session, stream) pairs already sent a session-revoked: one per pair,
/// for as long as the session is kept.
const REVOCATIONS_SENT: TableDefinition<(&str, &str), ()> = TableDefinition::new("revocations_sent");
/// Sessions this store no longer holds anything of, to be announced (Kafka
/// mode: the shared directory forgets their routes); drained by the owner.
const FORGOTTEN: TableDefinition<&str, ()> = TableDefinition::new("sessions_forgotten");
/// (when, session): when the session is next looked at by the pruner. Each
/// session has exactly one entry, the one its record names (`prune_at_ms`).
const EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("session_expiry");

/// Pending touches one stream may hold: a receiver reporting sessions no
/// IdP ever names cannot grow the graph without bound.
pub const MAX_PENDING_TOUCHES_PER_STREAM: u64 = 10_000;
/// How long a touch of a session no IdP has named yet waits for it.
pub const PENDING_TOUCH_TTL_MS: u64 = 3600 * 1000;

/// How long sessions are kept (ARCHITECTURE.md "Lifecycle").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetimes {
    /// A live session unseen for this long expires.
    pub idle_ms: u64,
    /// A revoked session is kept this long after its revocation, so a late
    /// spawn or touch of it is still revoked at once.
    pub revoked_retention_ms: u64,
}

impl Lifetimes {
    /// A day each: the defaults of `CAEP_HUB_SESSION_IDLE_TTL_SECS` and
    /// `CAEP_HUB_REVOKED_RETENTION_SECS`.
    pub const DEFAULT: Lifetimes = Lifetimes { idle_ms: 86_400_000, revoked_retention_ms: 86_400_000 };

    /// How stale a session's last activity may get before a new activity is
    /// written: activity refreshes cost a write only this often per session.
    fn refresh_granularity_ms(&self) -> u64 {
        (self.idle_ms / 16).min(60_000)
    }
}

/// Why and when a session was revoked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Revocation {
    /// The cascade that revoked it (its key, see `cascade::key`).
    pub txn: String,
    pub at_ms: u64,
}

/// One agent session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The session's key: (issuer, id) scoped, see [`session_key`].
    pub session_id: String,
    /// The session as the IdP named it (the `session` member of `sub_id`).
    pub subject: SubjectId,
    /// The IdP that established it; only that IdP may act on it.
    pub issuer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<SubjectId>,
    /// The parent's key (always of the same IdP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<Authority>,
    pub established_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<Revocation>,
    /// The last event or touch concerning the session (refreshed coarsely,
    /// see `Lifetimes::refresh_granularity_ms`).
    #[serde(default)]
    pub last_active_ms: u64,
    /// The absolute end the IdP stated (`expires_at` on session-established).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// The session's entry in the expiry index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prune_at_ms: Option<u64>,
}

impl SessionRecord {
    /// The session's id as its IdP named it.
    pub fn local_id(&self) -> &str {
        local_id(&self.session_id)
    }

    /// When the session may be removed: a revoked one when its retention
    /// ends; a live one when it has been idle too long or reaches the end
    /// its IdP stated, whichever comes first.
    pub fn due_ms(&self, lifetimes: &Lifetimes) -> u64 {
        match &self.revoked {
            Some(revocation) => revocation.at_ms.saturating_add(lifetimes.revoked_retention_ms),
            None => {
                let idle = self.last_active_ms.max(self.established_at_ms).saturating_add(lifetimes.idle_ms);
                self.expires_at_ms.map_or(idle, |end| idle.min(end))
            }
        }
    }

    /// Whether the IdP's stated end has passed (the session is over even if
    /// it is still kept to link its sub-agents).
    pub fn ended(&self, now_ms: u64) -> bool {
        self.revoked.is_none() && self.expires_at_ms.is_some_and(|end| end <= now_ms)
    }
}

/// How a session reached a stream, and what that shows the receiver knows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Touch {
    pub at_ms: u64,
    /// The IdP itself addressed the receiver for this session
    /// (`session-presented` naming its audience).
    #[serde(default)]
    pub by_idp: bool,
    /// The user the receiver named with the session, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub named_user: Option<SubjectId>,
}

impl Touch {
    /// Whether a SET about the session may name its user to this stream:
    /// only when the IdP addressed the receiver, or the receiver itself
    /// named that same user (the disclosure rule, ARCHITECTURE.md).
    pub fn discloses(&self, user: Option<&SubjectId>) -> bool {
        match (user, &self.named_user) {
            (Some(_), _) if self.by_idp => true,
            (Some(user), Some(named)) => normalized(user) == normalized(named),
            _ => false,
        }
    }
}

/// The id a session subject has within its IdP: an opaque id as is, any
/// other format by its canonical JSON, so distinct subjects never collide.
pub fn local_session_id(subject: &SubjectId) -> String {
    match subject {
        SubjectId::Opaque { id } => id.clone(),
        other => other.to_value().to_string(),
    }
}

/// The graph key of `issuer`'s session `subject`.
pub fn session_key(issuer: &str, subject: &SubjectId) -> String {
    scoped(issuer, &local_session_id(subject))
}

fn normalized(user: &SubjectId) -> SubjectId {
    match user {
        SubjectId::Email { email } => SubjectId::Email { email: email.to_ascii_lowercase() },
        other => other.clone(),
    }
}

/// The index key of a user subject, scoped by the issuer that named it.
pub fn user_key(issuer: &str, user: &SubjectId) -> String {
    scoped(issuer, &normalized(user).to_value().to_string())
}

fn storage<E: std::fmt::Display>(error: E) -> StoreError {
    StoreError::storage(error)
}

/// The exclusive upper bound of the keys `(first, _)`: every such key sorts
/// below `(after(first), "")` (whatever its second element), and every key
/// with a greater first element sorts at or above it, since NUL is the
/// smallest character. So a range scan covers exactly one first element.
pub(crate) fn after(first: &str) -> String {
    format!("{first}\0")
}

/// Every `(first, second)` key's second element and value, in order.
fn scan<V, T>(
    table: &impl ReadableTable<(&'static str, &'static str), V>,
    first: &str,
    mut each: impl FnMut(&str, V::SelfType<'_>) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError>
where
    V: redb::Value + 'static,
{
    let end = after(first);
    let mut out = Vec::new();
    for row in table.range((first, "")..(end.as_str(), "")).map_err(storage)? {
        let (key, value) = row.map_err(storage)?;
        out.push(each(key.value().1, value.value())?);
    }
    Ok(out)
}

/// Reads a session.
pub fn session(txn: &WriteTransaction, key: &str) -> Result<Option<SessionRecord>, StoreError> {
    let sessions = txn.open_table(SESSIONS).map_err(storage)?;
    let row = sessions.get(key).map_err(storage)?;
    row.map(|value| decode(value.value())).transpose()
}

/// Reads a session from a read snapshot.
pub fn session_in(txn: &redb::ReadTransaction, key: &str) -> Result<Option<SessionRecord>, StoreError> {
    let sessions = match txn.open_table(SESSIONS) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(error) => return Err(storage(error)),
    };
    let row = sessions.get(key).map_err(storage)?;
    row.map(|value| decode(value.value())).transpose()
}

/// Writes a session, scheduling it in the expiry index for when it is due.
pub fn put_session(
    txn: &WriteTransaction,
    record: &mut SessionRecord,
    lifetimes: &Lifetimes,
) -> Result<(), StoreError> {
    let due = record.due_ms(lifetimes);
    schedule(txn, record, due)
}

/// Writes a session with its expiry index entry at `at_ms`.
fn schedule(txn: &WriteTransaction, record: &mut SessionRecord, at_ms: u64) -> Result<(), StoreError> {
    if record.prune_at_ms != Some(at_ms) {
        let mut expiry = txn.open_table(EXPIRY).map_err(storage)?;
        if let Some(old) = record.prune_at_ms {
            expiry.remove((old, record.session_id.as_str())).map_err(storage)?;
        }
        expiry.insert((at_ms, record.session_id.as_str()), ()).map_err(storage)?;
        record.prune_at_ms = Some(at_ms);
    }
    let bytes = encode(&*record)?;
    let mut sessions = txn.open_table(SESSIONS).map_err(storage)?;
    sessions.insert(record.session_id.as_str(), bytes.as_slice()).map_err(storage)?;
    Ok(())
}

/// Records activity of the session `key` at `now_ms` (an event or touch
/// concerning it), postponing its idle expiry. Writes only when the last
/// recorded activity is older than the refresh granularity. A revoked
/// session's retention runs from its revocation and is not extended.
pub fn keep_alive(
    txn: &WriteTransaction,
    record: &mut SessionRecord,
    now_ms: u64,
    lifetimes: &Lifetimes,
) -> Result<(), StoreError> {
    let last = record.last_active_ms.max(record.established_at_ms);
    if record.revoked.is_some() || now_ms < last.saturating_add(lifetimes.refresh_granularity_ms()) {
        return Ok(());
    }
    record.last_active_ms = now_ms;
    put_session(txn, record, lifetimes)
}

/// Records a new session, its parent edge and its user index entry, and
/// turns the touches that waited for it into touches.
pub fn insert_session(
    txn: &WriteTransaction,
    record: &mut SessionRecord,
    now_ms: u64,
    lifetimes: &Lifetimes,
) -> Result<(), StoreError> {
    put_session(txn, record, lifetimes)?;
    if let Some(parent) = &record.parent {
        let mut children = txn.open_table(CHILDREN).map_err(storage)?;
        children.insert((parent.as_str(), record.session_id.as_str()), ()).map_err(storage)?;
    }
    if let Some(user) = &record.user {
        let key = user_key(&record.issuer, user);
        let mut index = txn.open_table(USER_SESSIONS).map_err(storage)?;
        index.insert((key.as_str(), record.session_id.as_str()), ()).map_err(storage)?;
    }
    adopt_pending_touches(txn, &record.session_id, now_ms)
}

/// Records that the session `key` reached `stream_id`; true when it is new.
/// A later touch that shows more (the IdP's own, or a named user) is kept.
pub fn touch(txn: &WriteTransaction, key: &str, stream_id: &str, touch: &Touch) -> Result<bool, StoreError> {
    let mut touches = txn.open_table(TOUCHES).map_err(storage)?;
    let known: Option<Touch> =
        touches.get((key, stream_id)).map_err(storage)?.map(|v| decode(v.value())).transpose()?;
    let merged = match &known {
        None => touch.clone(),
        Some(known) => Touch {
            at_ms: known.at_ms,
            by_idp: known.by_idp || touch.by_idp,
            named_user: known.named_user.clone().or_else(|| touch.named_user.clone()),
        },
    };
    if known.as_ref() != Some(&merged) {
        touches.insert((key, stream_id), encode(&merged)?.as_slice()).map_err(storage)?;
    }
    Ok(known.is_none())
}

/// Why a pending touch was not kept.
#[derive(Debug, thiserror::Error)]
pub enum PendingError {
    #[error("this stream holds {MAX_PENDING_TOUCHES_PER_STREAM} touches of sessions no identity provider has named")]
    Full,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Whether `stream_id` holds as many pending touches as it may.
pub fn pending_full(txn: &WriteTransaction, stream_id: &str) -> Result<bool, StoreError> {
    let counts = txn.open_table(PENDING_PER_STREAM).map_err(storage)?;
    Ok(counts.get(stream_id).map_err(storage)?.map_or(0, |v| v.value()) >= MAX_PENDING_TOUCHES_PER_STREAM)
}

/// Keeps the touch of a session no IdP has named yet, until it is named
/// (then it becomes a touch) or expires.
pub fn touch_pending(txn: &WriteTransaction, key: &str, stream_id: &str, touch: &Touch) -> Result<(), PendingError> {
    let mut pending = txn.open_table(PENDING_TOUCHES).map_err(storage)?;
    let mut by_age = txn.open_table(PENDING_BY_AGE).map_err(storage)?;
    let mut counts = txn.open_table(PENDING_PER_STREAM).map_err(storage)?;
    let count = counts.get(stream_id).map_err(storage)?.map_or(0, |v| v.value());
    let known: Option<Touch> =
        pending.get((key, stream_id)).map_err(storage)?.map(|v| decode(v.value())).transpose()?;
    if known.is_none() && count >= MAX_PENDING_TOUCHES_PER_STREAM {
        return Err(PendingError::Full);
    }
    if let Some(known) = &known {
        by_age.remove((known.at_ms, key, stream_id)).map_err(storage)?;
    }
    pending.insert((key, stream_id), encode(touch)?.as_slice()).map_err(storage)?;
    by_age.insert((touch.at_ms, key, stream_id), ()).map_err(storage)?;
    if known.is_none() {
        counts.insert(stream_id, count + 1).map_err(storage)?;
    }
    Ok(())
}

fn adopt_pending_touches(txn: &WriteTransaction, key: &str, now_ms: u64) -> Result<(), StoreError> {
    let waiting: Vec<(String, Touch)> = {
        let pending = txn.open_table(PENDING_TOUCHES).map_err(storage)?;
        scan(&pending, key, |stream, value| Ok((stream.to_owned(), decode::<Touch>(value)?)))?
    };
    for (stream_id, pending) in waiting {
        forget_pending(txn, key, &stream_id)?;
        if pending.at_ms.saturating_add(PENDING_TOUCH_TTL_MS) >= now_ms {
            touch(txn, key, &stream_id, &pending)?;
        }
    }
    Ok(())
}

fn forget_pending(txn: &WriteTransaction, key: &str, stream_id: &str) -> Result<(), StoreError> {
    let mut pending = txn.open_table(PENDING_TOUCHES).map_err(storage)?;
    let Some(row) = pending.remove((key, stream_id)).map_err(storage)? else { return Ok(()) };
    let known: Touch = decode(row.value())?;
    drop(row);
    txn.open_table(PENDING_BY_AGE).map_err(storage)?.remove((known.at_ms, key, stream_id)).map_err(storage)?;
    let mut counts = txn.open_table(PENDING_PER_STREAM).map_err(storage)?;
    let count = counts.get(stream_id).map_err(storage)?.map_or(0, |v| v.value());
    if count <= 1 {
        counts.remove(stream_id).map_err(storage)?;
    } else {
        counts.insert(stream_id, count - 1).map_err(storage)?;
    }
    Ok(())
}

/// Removes up to `limit` pending touches older than [`PENDING_TOUCH_TTL_MS`],
/// oldest first; returns how many went.
pub fn prune_pending_touches(
    txn: &WriteTransaction,
    now_ms: u64,
    limit: usize,
    remember_forgotten: bool,
) -> Result<usize, StoreError> {
    let horizon = now_ms.saturating_sub(PENDING_TOUCH_TTL_MS);
    let expired: Vec<(String, String)> = {
        let by_age = txn.open_table(PENDING_BY_AGE).map_err(storage)?;
        let mut expired = Vec::new();
        for row in by_age.range((0, "", "")..(horizon, "", "")).map_err(storage)?.take(limit) {
            let (key, _) = row.map_err(storage)?;
            let (_, session, stream) = key.value();
            expired.push((session.to_owned(), stream.to_owned()));
        }
        expired
    };
    for (key, stream_id) in &expired {
        forget_pending(txn, key, stream_id)?;
        let pending = txn.open_table(PENDING_TOUCHES).map_err(storage)?;
        let more = pending.range((key.as_str(), "")..(after(key).as_str(), "")).map_err(storage)?.next().is_some();
        drop(pending);
        if remember_forgotten && !more && session(txn, key)?.is_none() {
            txn.open_table(FORGOTTEN).map_err(storage)?.insert(key.as_str(), ()).map_err(storage)?;
        }
    }
    Ok(expired.len())
}

/// What one pass over due sessions did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionsPruned {
    /// Sessions removed with everything hanging off them.
    pub removed: usize,
    /// Due sessions kept for now: they still link sub-agent sessions, or
    /// their revocation still has leaves to dispatch.
    pub postponed: usize,
}

/// How long a session kept because it is in use waits for its next look.
const RECHECK_MS: u64 = 5_000;

/// Removes up to `limit` due sessions, each with its edges, touches, user
/// index entry and revocation claims (and, when `remember_forgotten`, notes
/// it for [`forgotten`]). A due session that still has child
/// sessions is kept (expiry runs bottom-up, so revoking a root still
/// reaches every live sub-agent under it), and so is one `in_use` says
/// is needed; both are looked at again later.
pub fn prune_sessions(
    txn: &WriteTransaction,
    now_ms: u64,
    lifetimes: &Lifetimes,
    limit: usize,
    remember_forgotten: bool,
    in_use: impl Fn(&SessionRecord) -> Result<bool, StoreError>,
) -> Result<SessionsPruned, StoreError> {
    let due: Vec<(u64, String)> = {
        let expiry = txn.open_table(EXPIRY).map_err(storage)?;
        let mut due = Vec::new();
        for row in expiry.range((0, "")..(now_ms.saturating_add(1), "")).map_err(storage)?.take(limit) {
            let (key, _) = row.map_err(storage)?;
            let (at, session) = key.value();
            due.push((at, session.to_owned()));
        }
        due
    };
    let mut pruned = SessionsPruned::default();
    for (at, key) in due {
        let record = session(txn, &key)?;
        let Some(mut record) = record.filter(|record| record.prune_at_ms == Some(at)) else {
            txn.open_table(EXPIRY).map_err(storage)?.remove((at, key.as_str())).map_err(storage)?;
            continue;
        };
        let due = record.due_ms(lifetimes);
        if due > now_ms {
            // Active since it was scheduled, or the lifetimes changed.
            put_session(txn, &mut record, lifetimes)?;
            continue;
        }
        let children = children_of(&txn.open_table(CHILDREN).map_err(storage)?, &key)?;
        if !children.is_empty() {
            let next = next_look_at_children(txn, &children, now_ms)?;
            schedule(txn, &mut record, next)?;
            pruned.postponed += 1;
        } else if in_use(&record)? {
            schedule(txn, &mut record, now_ms.saturating_add(RECHECK_MS))?;
            pruned.postponed += 1;
        } else {
            remove_session(txn, &record)?;
            pruned.removed += 1;
            if remember_forgotten {
                txn.open_table(FORGOTTEN).map_err(storage)?.insert(key.as_str(), ()).map_err(storage)?;
            }
        }
    }
    Ok(pruned)
}

/// Notes session `key` as forgotten when this store holds nothing of it: a
/// record that leaves nothing of its session here (refused, or about a
/// session never named) must not leave its route in the shared directory
/// for good. Returns whether it was noted.
pub fn forget_if_unheld(txn: &WriteTransaction, key: &str) -> Result<bool, StoreError> {
    let unheld = !held(txn, key)?;
    if unheld {
        txn.open_table(FORGOTTEN).map_err(storage)?.insert(key, ()).map_err(storage)?;
    }
    Ok(unheld)
}

/// Whether this store holds anything of session `key` that its route must
/// keep leading to: the session, a pending touch, or an edge to a child
/// (here, or in another partition).
fn held(txn: &WriteTransaction, key: &str) -> Result<bool, StoreError> {
    let end = after(key);
    let range = (key, "")..(end.as_str(), "");
    Ok(txn.open_table(SESSIONS).map_err(storage)?.get(key).map_err(storage)?.is_some()
        || txn.open_table(PENDING_TOUCHES).map_err(storage)?.range(range.clone()).map_err(storage)?.next().is_some()
        || txn.open_table(CHILDREN).map_err(storage)?.range(range.clone()).map_err(storage)?.next().is_some()
        || txn.open_table(FOREIGN_CHILDREN).map_err(storage)?.range(range).map_err(storage)?.next().is_some())
}

/// Up to `limit` noted sessions, checked again just before they are
/// announced: one held here again since it was noted (named anew, touched,
/// or given a child) is taken off the list, since its route is in use.
/// Returns how many were looked at, and those still held nowhere.
pub fn unheld_forgotten(txn: &WriteTransaction, limit: usize) -> Result<(usize, Vec<String>), StoreError> {
    let noted: Vec<String> = {
        let table = txn.open_table(FORGOTTEN).map_err(storage)?;
        let mut keys = Vec::new();
        for row in table.iter().map_err(storage)?.take(limit) {
            keys.push(row.map_err(storage)?.0.value().to_owned());
        }
        keys
    };
    let mut unheld = Vec::with_capacity(noted.len());
    for key in &noted {
        if held(txn, key)? {
            txn.open_table(FORGOTTEN).map_err(storage)?.remove(key.as_str()).map_err(storage)?;
        } else {
            unheld.push(key.clone());
        }
    }
    Ok((noted.len(), unheld))
}

/// Whether any session is noted as forgotten and not yet announced: a read,
/// so that a partition with nothing to announce costs no write transaction.
pub fn any_forgotten(txn: &redb::ReadTransaction) -> Result<bool, StoreError> {
    Ok(!forgotten(txn, 1)?.is_empty())
}

/// Up to `limit` sessions this store has noted as forgotten and not yet
/// announced, as they stand (announcing goes through [`unheld_forgotten`]).
pub fn forgotten(txn: &redb::ReadTransaction, limit: usize) -> Result<Vec<String>, StoreError> {
    let table = match txn.open_table(FORGOTTEN) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(error) => return Err(storage(error)),
    };
    let mut keys = Vec::new();
    for row in table.iter().map_err(storage)?.take(limit) {
        keys.push(row.map_err(storage)?.0.value().to_owned());
    }
    Ok(keys)
}

/// Marks forgotten sessions as announced.
pub fn announced(txn: &WriteTransaction, keys: &[String]) -> Result<(), StoreError> {
    let mut table = txn.open_table(FORGOTTEN).map_err(storage)?;
    for key in keys {
        table.remove(key.as_str()).map_err(storage)?;
    }
    Ok(())
}

/// When a parent kept for its children is worth looking at again: when the
/// first of them may go (and no earlier than the next pass).
fn next_look_at_children(txn: &WriteTransaction, children: &[String], now_ms: u64) -> Result<u64, StoreError> {
    let mut first = u64::MAX;
    for child in children {
        let at = session(txn, child)?.and_then(|record| record.prune_at_ms).unwrap_or(now_ms);
        first = first.min(at);
    }
    Ok(first.max(now_ms.saturating_add(1)))
}

/// Removes a session and everything that hangs off it.
fn remove_session(txn: &WriteTransaction, record: &SessionRecord) -> Result<(), StoreError> {
    let key = record.session_id.as_str();
    txn.open_table(SESSIONS).map_err(storage)?.remove(key).map_err(storage)?;
    if let Some(at) = record.prune_at_ms {
        txn.open_table(EXPIRY).map_err(storage)?.remove((at, key)).map_err(storage)?;
    }
    if let Some(parent) = &record.parent {
        txn.open_table(CHILDREN).map_err(storage)?.remove((parent.as_str(), key)).map_err(storage)?;
    }
    if let Some(user) = &record.user {
        let user = user_key(&record.issuer, user);
        txn.open_table(USER_SESSIONS).map_err(storage)?.remove((user.as_str(), key)).map_err(storage)?;
    }
    let end = after(key);
    let range = (key, "")..(end.as_str(), "");
    txn.open_table(TOUCHES).map_err(storage)?.retain_in(range.clone(), |_, _| false).map_err(storage)?;
    txn.open_table(REVOCATIONS_SENT).map_err(storage)?.retain_in(range.clone(), |_, _| false).map_err(storage)?;
    txn.open_table(FOREIGN_CHILDREN).map_err(storage)?.retain_in(range, |_, _| false).map_err(storage)?;
    Ok(())
}

/// How many sessions the graph holds (live, kept, revoked).
pub fn session_count(txn: &redb::ReadTransaction) -> Result<u64, StoreError> {
    match txn.open_table(SESSIONS) {
        Ok(table) => table.len().map_err(storage),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
        Err(error) => Err(storage(error)),
    }
}

/// Marks that `stream_id` is (being) told of the session `key`'s revocation;
/// false when it already was, so no path sends a pair twice.
pub fn claim_revocation(txn: &WriteTransaction, key: &str, stream_id: &str) -> Result<bool, StoreError> {
    let mut sent = txn.open_table(REVOCATIONS_SENT).map_err(storage)?;
    Ok(sent.insert((key, stream_id), ()).map_err(storage)?.is_none())
}

/// The streams a session touched, with how.
pub fn touches(txn: &WriteTransaction, key: &str) -> Result<Vec<(String, Touch)>, StoreError> {
    let touches = txn.open_table(TOUCHES).map_err(storage)?;
    scan(&touches, key, |stream, value| Ok((stream.to_owned(), decode(value)?)))
}

/// The streams a session touched, with how, from a read snapshot.
pub fn touches_in(txn: &redb::ReadTransaction, key: &str) -> Result<Vec<(String, Touch)>, StoreError> {
    let touches = match txn.open_table(TOUCHES) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(error) => return Err(storage(error)),
    };
    scan(&touches, key, |stream, value| Ok((stream.to_owned(), decode(value)?)))
}

fn children_of(
    table: &impl ReadableTable<(&'static str, &'static str), ()>,
    parent: &str,
) -> Result<Vec<String>, StoreError> {
    scan(table, parent, |child, ()| Ok(child.to_owned()))
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
    scan(&foreign, parent, |child, root| Ok((child.to_owned(), root.to_owned())))
}

/// [`foreign_children`] in a read snapshot.
pub fn foreign_children_in(txn: &redb::ReadTransaction, parent: &str) -> Result<Vec<(String, String)>, StoreError> {
    let foreign = match txn.open_table(FOREIGN_CHILDREN) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(error) => return Err(storage(error)),
    };
    scan(&foreign, parent, |child, root| Ok((child.to_owned(), root.to_owned())))
}

/// The keys of a user's sessions as named by `issuer`.
pub fn sessions_of_user(txn: &WriteTransaction, issuer: &str, user: &SubjectId) -> Result<Vec<String>, StoreError> {
    let key = user_key(issuer, user);
    let index = txn.open_table(USER_SESSIONS).map_err(storage)?;
    scan(&index, &key, |session, ()| Ok(session.to_owned()))
}

#[cfg(test)]
mod tests;
