//! The relying party's memory of revocations: the agent sessions and users
//! it must stop honouring, each for at least `revocation_ttl` (which the RP
//! sets to at least its longest access-token lifetime: a token must not
//! outlive the memory of its revocation).
//!
//! Fed by verified SETs ([`Revocations::feeding`] wraps the RP's handler;
//! [`Receiver::with_revocations`](crate::Receiver::with_revocations) does it for the push
//! router and the poll loop): CAEP `session-revoked` revokes its session (or
//! its user, when it names no session); RISC `account-disabled`,
//! `account-purged` and `credential-compromise` revoke the user; RISC
//! `account-enabled` lifts a user's revocation. A revocation is recorded
//! (and, with a file, committed to disk) before the SET is acknowledged, so
//! a crash or restart forgets nothing the transmitter was told was handled.
//!
//! Checks read an in-memory map: well under a microsecond each.

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use caep_schemas::event::{Event, event_type};
use caep_schemas::subject::SubjectId;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::ReceiverError;
use crate::event::{ReceivedEvent, now_ms};
use crate::handler::{EventHandler, HandlerError};

/// The event types the store acts on: those that revoke, and the one that
/// lifts. A stream that feeds a store requests at least these.
pub const ENFORCED_EVENTS: [&str; 5] = [
    event_type::SESSION_REVOKED,
    event_type::ACCOUNT_DISABLED,
    event_type::ACCOUNT_PURGED,
    event_type::CREDENTIAL_COMPROMISE,
    event_type::ACCOUNT_ENABLED,
];

/// session id → revoked until (ms since the epoch).
const SESSIONS: TableDefinition<&str, i64> = TableDefinition::new("revoked_sessions");
/// user key → revoked until.
const USERS: TableDefinition<&str, i64> = TableDefinition::new("revoked_users");

/// Key → revoked until (ms since the epoch). Hashed with foldhash: every
/// request looks keys up, and only verified SETs insert them.
type Expiries = std::collections::HashMap<String, i64, foldhash::fast::RandomState>;

/// What a request was refused for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Revoked {
    /// This agent session (or one of its actors) was revoked.
    Session(String),
    /// The user behind the token was disabled or revoked.
    User(String),
}

/// Revoked sessions and users, in memory and optionally in a redb file.
pub struct Revocations {
    ttl_ms: i64,
    sessions: RwLock<Expiries>,
    users: RwLock<Expiries>,
    file: Option<Arc<Database>>,
    /// When expired entries were last forgotten: each revocation recorded
    /// prunes too, at most every tenth of the TTL, so the store stays
    /// bounded without a task of its own.
    last_pruned: AtomicI64,
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (sessions, users) = self.len();
        f.debug_struct("Revocations").field("sessions", &sessions).field("users", &users).finish_non_exhaustive()
    }
}

/// The key a user is remembered under: the same user named by a SET's
/// subject and by a token's claims maps to one key.
pub fn user_key(subject: &SubjectId) -> String {
    match subject {
        SubjectId::IssSub { iss, sub } => iss_sub_key(iss, sub),
        SubjectId::Email { email } => email_key(email),
        other => format!("subject:{}", other.to_value()),
    }
}

/// The key of the user a token's `iss` and `sub` name.
pub fn iss_sub_key(iss: &str, sub: &str) -> String {
    format!("iss_sub:{}:{iss}{sub}", iss.len())
}

/// The key of the user a token's `email` names (case-insensitive).
pub fn email_key(email: &str) -> String {
    format!("email:{}", email.to_ascii_lowercase())
}

fn storage(error: impl std::fmt::Display) -> ReceiverError {
    ReceiverError::Config(format!("revocation store: {error}"))
}

impl Revocations {
    /// A store kept in memory only: a restart forgets it.
    pub fn in_memory(revocation_ttl: Duration) -> Arc<Self> {
        Arc::new(Revocations {
            ttl_ms: ttl_ms(revocation_ttl),
            sessions: RwLock::default(),
            users: RwLock::default(),
            file: None,
            last_pruned: AtomicI64::new(now_ms()),
        })
    }

    /// A store kept in the redb file at `path` too (created if missing);
    /// what it holds and has not expired is loaded.
    ///
    /// # Errors
    ///
    /// When the file cannot be opened or read.
    pub fn open(path: &Path, revocation_ttl: Duration) -> Result<Arc<Self>, ReceiverError> {
        let db = Database::create(path).map_err(storage)?;
        let now = now_ms();
        let load = |table: TableDefinition<&str, i64>| -> Result<Expiries, ReceiverError> {
            let read = db.begin_read().map_err(storage)?;
            let table = match read.open_table(table) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Expiries::default()),
                Err(error) => return Err(storage(error)),
            };
            let mut loaded = Expiries::default();
            for row in table.iter().map_err(storage)? {
                let (key, until) = row.map_err(storage)?;
                if until.value() > now {
                    loaded.insert(key.value().to_owned(), until.value());
                }
            }
            Ok(loaded)
        };
        let (sessions, users) = (load(SESSIONS)?, load(USERS)?);
        Ok(Arc::new(Revocations {
            ttl_ms: ttl_ms(revocation_ttl),
            sessions: RwLock::new(sessions),
            users: RwLock::new(users),
            file: Some(Arc::new(db)),
            last_pruned: AtomicI64::new(now),
        }))
    }

    /// Whether `session` is revoked now.
    pub fn is_session_revoked(&self, session: &str) -> bool {
        live(&self.sessions, session)
    }

    /// Whether the user under `key` (see [`user_key`]) is revoked now.
    pub fn is_user_revoked(&self, key: &str) -> bool {
        live(&self.users, key)
    }

    /// The first of `sessions`, then of `users` (keys), that is revoked now:
    /// one lock per kind and at most one clock read, for the per-request
    /// check.
    pub fn first_revoked(&self, sessions: &[String], users: &[String]) -> Option<Revoked> {
        // The clock is read only when a key is found: most requests find none.
        let now = std::cell::OnceCell::new();
        let first = |map: &RwLock<Expiries>, keys: &[String]| {
            let map = map.read().unwrap_or_else(|p| p.into_inner());
            if map.is_empty() {
                return None;
            }
            keys.iter()
                .find(|key| map.get(key.as_str()).is_some_and(|until| *until > *now.get_or_init(now_ms)))
                .cloned()
        };
        if let Some(session) = first(&self.sessions, sessions) {
            return Some(Revoked::Session(session));
        }
        first(&self.users, users).map(Revoked::User)
    }

    /// How many sessions and users are remembered.
    pub fn len(&self) -> (usize, usize) {
        let count = |map: &RwLock<Expiries>| map.read().unwrap_or_else(|p| p.into_inner()).len();
        (count(&self.sessions), count(&self.users))
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == (0, 0)
    }

    /// Revokes a session for the store's TTL from now.
    ///
    /// # Errors
    ///
    /// When the file cannot be written (the revocation is then in memory only).
    pub async fn revoke_session(&self, session: &str) -> Result<(), ReceiverError> {
        self.remember(&self.sessions, SESSIONS, session).await
    }

    /// Revokes a user (a key from [`user_key`]) for the store's TTL from now.
    ///
    /// # Errors
    ///
    /// When the file cannot be written (the revocation is then in memory only).
    pub async fn revoke_user(&self, key: &str) -> Result<(), ReceiverError> {
        self.remember(&self.users, USERS, key).await
    }

    /// Lifts a user's revocation (RISC account-enabled). Sessions revoked
    /// on their own stay revoked.
    ///
    /// # Errors
    ///
    /// When the file cannot be written.
    pub async fn lift_user(&self, key: &str) -> Result<(), ReceiverError> {
        self.users.write().unwrap_or_else(|p| p.into_inner()).remove(key);
        let owned = key.to_owned();
        self.write(move |txn| {
            txn.open_table(USERS).map_err(storage)?.remove(owned.as_str()).map_err(storage)?;
            Ok(())
        })
        .await
    }

    /// Applies a verified SET: returns what it revoked, if anything.
    ///
    /// # Errors
    ///
    /// When the revocation cannot be written to the file: the SET must then
    /// not be acknowledged, so it comes again.
    pub async fn record(&self, event: &ReceivedEvent) -> Result<Option<Revoked>, ReceiverError> {
        let user = event.user().map(user_key);
        match event.event() {
            Event::SessionRevoked(_) => match (event.session_id(), user) {
                (Some(session), _) => {
                    self.revoke_session(session).await?;
                    Ok(Some(Revoked::Session(session.to_owned())))
                }
                (None, Some(user)) => {
                    self.revoke_user(&user).await?;
                    Ok(Some(Revoked::User(user)))
                }
                (None, None) => Ok(None),
            },
            Event::AccountDisabled(_) | Event::AccountPurged(_) | Event::CredentialCompromise(_) => {
                let Some(user) = user else { return Ok(None) };
                self.revoke_user(&user).await?;
                Ok(Some(Revoked::User(user)))
            }
            Event::AccountEnabled(_) => {
                if let Some(user) = user {
                    self.lift_user(&user).await?;
                }
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    /// Wraps the RP's handler: every SET is first applied to this store,
    /// then handed to `handler` (which still runs for every event).
    pub fn feeding<H: EventHandler>(self: &Arc<Self>, handler: H) -> Feeding<H> {
        Feeding::new(Some(Arc::clone(self)), handler)
    }

    /// Forgets what expired (in memory and on disk); returns how many.
    ///
    /// # Errors
    ///
    /// When the file cannot be written.
    pub async fn prune(&self) -> Result<usize, ReceiverError> {
        let now = now_ms();
        let mut gone = Vec::new();
        for (map, table) in [(&self.sessions, SESSIONS), (&self.users, USERS)] {
            let mut map = map.write().unwrap_or_else(|p| p.into_inner());
            let expired: Vec<String> = map.iter().filter(|(_, until)| **until <= now).map(|(k, _)| k.clone()).collect();
            for key in &expired {
                map.remove(key);
            }
            gone.push((table, expired));
        }
        let count = gone.iter().map(|(_, keys)| keys.len()).sum();
        self.write(move |txn| {
            for (table, keys) in &gone {
                let mut table = txn.open_table(*table).map_err(storage)?;
                for key in keys {
                    table.remove(key.as_str()).map_err(storage)?;
                }
            }
            Ok(())
        })
        .await?;
        Ok(count)
    }

    /// Prunes every tenth of the TTL, for ever (spawn it where revocations
    /// are rare, so memory is returned without waiting for the next one).
    pub async fn prune_forever(self: Arc<Self>) {
        let every = Duration::from_millis((self.ttl_ms / 10).clamp(1_000, 3_600_000) as u64);
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            if let Err(error) = self.prune().await {
                tracing::warn!(%error, "cannot prune expired revocations");
            }
        }
    }

    async fn remember(
        &self,
        map: &RwLock<Expiries>,
        table: TableDefinition<'static, &'static str, i64>,
        key: &str,
    ) -> Result<(), ReceiverError> {
        let now = now_ms();
        let last = self.last_pruned.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= (self.ttl_ms / 10).max(1_000)
            && self.last_pruned.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            self.prune().await?;
        }
        let until = now.saturating_add(self.ttl_ms);
        {
            let mut map = map.write().unwrap_or_else(|p| p.into_inner());
            let entry = map.entry(key.to_owned()).or_insert(until);
            *entry = (*entry).max(until);
        }
        let owned = key.to_owned();
        self.write(move |txn| {
            let mut table = txn.open_table(table).map_err(storage)?;
            let kept = table.get(owned.as_str()).map_err(storage)?.map_or(0, |v| v.value());
            table.insert(owned.as_str(), kept.max(until)).map_err(storage)?;
            Ok(())
        })
        .await
    }

    /// Runs `op` in one durable write transaction of the file, if any.
    async fn write(
        &self,
        op: impl FnOnce(&redb::WriteTransaction) -> Result<(), ReceiverError> + Send + 'static,
    ) -> Result<(), ReceiverError> {
        let Some(db) = self.file.clone() else { return Ok(()) };
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write().map_err(storage)?;
            op(&txn)?;
            txn.commit().map_err(storage)
        })
        .await
        .map_err(storage)?
    }
}

fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

fn live(map: &RwLock<Expiries>, key: &str) -> bool {
    map.read().unwrap_or_else(|p| p.into_inner()).get(key).is_some_and(|until| *until > now_ms())
}

/// A handler that applies each SET to a [`Revocations`] store first (when
/// there is one). If the store cannot record a revocation, the SET is not
/// acknowledged, so it comes again.
pub struct Feeding<H> {
    revocations: Option<Arc<Revocations>>,
    inner: H,
}

impl<H> Feeding<H> {
    /// `handler`, fed after `revocations` (if any).
    pub fn new(revocations: Option<Arc<Revocations>>, handler: H) -> Self {
        Feeding { revocations, inner: handler }
    }
}

impl<H: EventHandler> EventHandler for Feeding<H> {
    async fn handle(&self, event: ReceivedEvent) -> Result<(), HandlerError> {
        if let Some(revocations) = &self.revocations
            && let Some(revoked) = revocations.record(&event).await.map_err(HandlerError::new)?
        {
            tracing::info!(?revoked, jti = event.jti(), "revocation recorded");
        }
        self.inner.handle(event).await
    }
}

#[cfg(test)]
mod tests {
    use caep_schemas::event::{AccountDisabled, PlainEvent, SessionRevoked};
    use caep_schemas::set::SecurityEventToken;

    use super::*;

    fn event(sub_id: SubjectId, event: Event) -> ReceivedEvent {
        ReceivedEvent::new(SecurityEventToken::new("https://hub", "https://rp", sub_id, event), String::new())
    }

    #[tokio::test]
    async fn revocations_survive_a_restart_and_expire() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("revocations.redb");
        let ada = SubjectId::email("Ada@Example.com");
        {
            let store = Revocations::open(&path, Duration::from_secs(3600)).expect("open");
            let revoked = event(
                SubjectId::session_of(SubjectId::opaque("s1"), None),
                Event::SessionRevoked(SessionRevoked::default()),
            );
            assert_eq!(store.record(&revoked).await.expect("record"), Some(Revoked::Session("s1".into())));
            let disabled = event(ada.clone(), Event::AccountDisabled(AccountDisabled::default()));
            assert_eq!(
                store.record(&disabled).await.expect("record"),
                Some(Revoked::User(email_key("ada@example.com")))
            );
        }
        let store = Revocations::open(&path, Duration::from_secs(3600)).expect("reopen");
        assert!(store.is_session_revoked("s1") && !store.is_session_revoked("s2"));
        assert!(store.is_user_revoked(&email_key("ADA@example.com")), "emails match case-insensitively");
        store.record(&event(ada, Event::AccountEnabled(PlainEvent::default()))).await.expect("record");
        assert!(!store.is_user_revoked(&email_key("ada@example.com")), "account-enabled lifts it");
        assert!(store.is_session_revoked("s1"), "a session revoked on its own stays revoked");

        let short = Revocations::open(&dir.path().join("short.redb"), Duration::from_millis(1)).expect("open");
        short.revoke_session("s9").await.expect("revoke");
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(!short.is_session_revoked("s9"), "kept for the TTL only");
        assert_eq!(short.prune().await.expect("prune"), 1);
        assert!(short.is_empty());
    }

    #[tokio::test]
    async fn recording_revocations_forgets_expired_ones_without_a_task() {
        let store = Revocations::in_memory(Duration::from_millis(1));
        store.revoke_session("old").await.expect("revoke");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        store.revoke_session("new").await.expect("revoke");
        assert_eq!(store.len(), (1, 0), "the expired one went when the next was recorded");
    }

    #[test]
    fn a_tokens_iss_and_sub_and_a_sets_iss_sub_are_one_user() {
        let from_set = user_key(&SubjectId::IssSub { iss: "https://idp".into(), sub: "u1".into() });
        assert_eq!(from_set, iss_sub_key("https://idp", "u1"));
        assert_ne!(iss_sub_key("https://idp", "u1"), iss_sub_key("https://idpu", "1"), "no boundary games");
    }
}
