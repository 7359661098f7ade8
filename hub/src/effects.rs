//! What a verified IdP event does: the graph changes and the cascade plan it
//! causes, decided and written inside one write transaction.
//!
//! This is the deterministic core every event log feeds: the embedded log
//! applies events here as they arrive; a partitioned log (Kafka) applies
//! them here on the instance that owns their partition. The same event
//! applied twice has no second effect (`(iss, jti)` is recorded).

use std::collections::BTreeMap;

use caep_schemas::event::{CaepCommon, Event, SessionRevoked, event_type};
use caep_schemas::set::{SecurityEventToken, new_id};
use caep_schemas::subject::SubjectId;
use caep_transmitter::registry::{StreamRecord, StreamRegistry};
use caep_transmitter::store::StoreError;
use redb::WriteTransaction;

use crate::cascade::{self, CascadeEvent, CascadeRecord, Leaf, LeafStatus};
use crate::graph::{self, Lifetimes, Revocation, SessionRecord};

/// What effects are decided against besides the graph: the streams that
/// may receive leaves, and how long sessions live.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    pub streams: &'a StreamRegistry,
    pub lifetimes: &'a Lifetimes,
    /// Where planned leaves start signing before their plan commits
    /// (embedded mode); `None` leaves them to whoever reads the [`Plan`].
    pub on_planned: Option<cascade::OnPlanned<'a>>,
}

/// Different events one cascade (one IdP `txn`) may carry: SETs with one
/// cause share a `txn`, but a handful, not thousands.
pub const MAX_EVENTS_PER_CASCADE: usize = 32;

/// What an event planned: its cascade and the new leaves, and revocations
/// for trees in other partitions (Kafka mode; empty in embedded mode).
#[derive(Debug, Default)]
pub struct Plan {
    pub cascades: Vec<(CascadeRecord, Vec<Leaf>)>,
    pub foreign: Vec<ForeignRevocation>,
}

impl Plan {
    pub(crate) fn add(&mut self, cascade: CascadeRecord, leaves: Vec<Leaf>) {
        self.cascades.push((cascade, leaves));
    }

    pub(crate) fn extend(&mut self, other: Plan) {
        self.cascades.extend(other.cascades);
        self.foreign.extend(other.foreign);
    }
}

/// A revocation that must continue in another partition: the tree under
/// `session` (rooted at `child_root`) joins `cascade`.
#[derive(Clone, Debug)]
pub struct ForeignRevocation {
    pub session: String,
    pub child_root: String,
    pub cascade: CascadeRecord,
    pub event: CascadeEvent,
}

/// Why an IdP event was refused, as RFC 8935 error JSON.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// 400 with `{"err", "description"}`.
    #[error("{err}: {description}")]
    Rejected { err: &'static str, description: String },
    /// The hub could not process it now (storage, key fetch); the IdP retries.
    #[error("temporarily unavailable: {0}")]
    Unavailable(String),
    /// A per-receiver bound is reached (pending touches); retry later.
    #[error("too many requests: {0}")]
    TooMany(String),
}

pub(crate) fn rejected(err: &'static str, description: impl Into<String>) -> IngestError {
    IngestError::Rejected { err, description: description.into() }
}

impl From<StoreError> for IngestError {
    fn from(error: StoreError) -> Self {
        IngestError::Unavailable(error.to_string())
    }
}

/// Where an IdP event takes effect in a partitioned log.
#[derive(Debug, PartialEq)]
pub enum Route {
    /// Where the session's delegation tree lives; an establish also names
    /// the parent whose tree the session joins. Both are graph keys (the
    /// event's IdP's sessions).
    Session { session_id: String, parent: Option<String> },
    /// A user-level event: that user's sessions may live in any partition.
    Everywhere,
}

/// Routes an event, refusing (before anything is written anywhere) what
/// [`apply`] would refuse without looking at the graph.
pub fn route(set: &SecurityEventToken) -> Result<Route, IngestError> {
    let key = |subject: &SubjectId| graph::session_key(&set.iss, subject);
    let session = set.sub_id.as_complex().and_then(|complex| complex.session.as_ref()).map(key);
    match (&set.event, session) {
        (Event::SessionEstablished(established), Some(session_id)) => {
            let parent = established.parent_session.as_ref().map(key);
            if parent.as_deref() == Some(session_id.as_str()) {
                return Err(rejected("invalid_request", "a session cannot be its own parent"));
            }
            Ok(Route::Session { session_id, parent })
        }
        (Event::SessionEstablished(_), None) => {
            Err(rejected("invalid_request", "session-established needs a complex sub_id with `session`"))
        }
        (_, Some(session_id)) => Ok(Route::Session { session_id, parent: None }),
        (_, None) => Ok(Route::Everywhere),
    }
}

/// Decides and writes an event's effects, once per `(iss, jti)`. Never
/// writes when it refuses.
pub fn apply(
    txn: &WriteTransaction,
    ctx: Context<'_>,
    set: &SecurityEventToken,
    now: u64,
) -> Result<Plan, IngestError> {
    if crate::replay::seen(txn, &set.iss, &set.jti)? {
        tracing::debug!(iss = %set.iss, jti = %set.jti, "replayed IdP SET: no second effect");
        return Ok(Plan::default());
    }
    let plan = effects(txn, ctx, set, now)?;
    crate::replay::record(txn, &set.iss, &set.jti, now)?;
    Ok(plan)
}

fn effects(txn: &WriteTransaction, ctx: Context<'_>, set: &SecurityEventToken, now: u64) -> Result<Plan, IngestError> {
    let effect = Effect { txn, set, now, ctx };
    match &set.event {
        Event::SessionEstablished(established) => effect.establish(established),
        Event::SessionPresented(presented) => effect.presented(presented.audience.as_deref()),
        Event::SessionRevoked(revoked) => effect.revoke(revoked.common.clone()),
        Event::AccountDisabled(_) | Event::AccountPurged(_) | Event::CredentialCompromise(_) => {
            effect.revoke_user_from_risc()
        }
        Event::CredentialChange(_)
        | Event::TokenClaimsChange(_)
        | Event::AssuranceLevelChange(_)
        | Event::DeviceComplianceChange(_)
        | Event::RiskLevelChange(_) => effect.forward(),
        _ => Ok(Plan::default()),
    }
}

/// One event's effect computation, inside the writer's transaction.
struct Effect<'a> {
    txn: &'a WriteTransaction,
    set: &'a SecurityEventToken,
    now: u64,
    ctx: Context<'a>,
}

impl Effect<'_> {
    fn txn_id(&self) -> String {
        self.set.txn.clone().unwrap_or_else(new_id)
    }

    /// What the leaves this event plans derive their `jti`s from: the IdP
    /// SET itself, so applying it again (a log replayed after a failover)
    /// plans the very same leaves.
    fn cause(&self) -> String {
        format!("set {} {}", self.set.iss, self.set.jti)
    }

    /// The session named by a complex `sub_id`, with its user.
    fn session_subject(&self) -> Option<(SubjectId, Option<SubjectId>)> {
        let complex = self.set.sub_id.as_complex()?;
        Some((complex.session.clone()?, complex.user.clone()))
    }

    /// A user named by `sub_id`: iss_sub, email, or complex with only `user`.
    fn user_subject(&self) -> Option<SubjectId> {
        match &self.set.sub_id {
            SubjectId::IssSub { .. } | SubjectId::Email { .. } => Some(self.set.sub_id.clone()),
            SubjectId::Complex(complex) if complex.session.is_none() => complex.user.clone(),
            _ => None,
        }
    }

    /// The graph key of one of this IdP's sessions.
    fn key(&self, subject: &SubjectId) -> String {
        graph::session_key(&self.set.iss, subject)
    }

    /// One of this IdP's sessions (keys are scoped by IdP, so another IdP's
    /// session of the same id is never read here).
    fn own_session(&self, key: &str) -> Result<Option<SessionRecord>, IngestError> {
        Ok(graph::session(self.txn, key)?.filter(|record| record.issuer == self.set.iss))
    }

    fn establish(&self, event: &caep_schemas::event::SessionEstablished) -> Result<Plan, IngestError> {
        let (subject, user) = self
            .session_subject()
            .ok_or_else(|| rejected("invalid_request", "session-established needs a complex sub_id with `session`"))?;
        let session_id = self.key(&subject);
        let parent = event.parent_session.as_ref().map(|parent| self.key(parent));
        if parent.as_deref() == Some(session_id.as_str()) {
            return Err(rejected("invalid_request", "a session cannot be its own parent"));
        }
        let existing = self.own_session(&session_id)?;
        let lifetimes = self.ctx.lifetimes;
        // A parent past the end its IdP stated is over: the child starts a
        // new tree. A parent never seen (or forgotten) keeps the edge, so a
        // child overtaking its parent's establish still joins its tree.
        let mut parent_record = match &parent {
            Some(parent) => self.own_session(parent)?,
            None => None,
        };
        let parent = match &parent_record {
            Some(record) if record.ended(self.now) => {
                parent_record = None;
                None
            }
            _ => parent,
        };
        if let Some(record) = parent_record.as_mut() {
            graph::keep_alive(self.txn, record, self.now, lifetimes)?; // spawning is activity
        }
        // Revoked at birth: under a revoked ancestor, or revoked before the
        // IdP's establish arrived (a tombstone).
        let revoked =
            existing.as_ref().and_then(|e| e.revoked.clone()).or_else(|| parent_record.and_then(|p| p.revoked));
        if let Some(mut live) = existing.clone().filter(|e| e.revoked.is_none()) {
            graph::keep_alive(self.txn, &mut live, self.now, lifetimes)?;
            return Ok(Plan::default()); // established already: idempotent
        }
        let mut record = SessionRecord {
            session_id: session_id.clone(),
            subject,
            issuer: self.set.iss.clone(),
            user,
            parent,
            authority: event.authority,
            established_at_ms: self.now,
            revoked: revoked.clone(),
            last_active_ms: self.now,
            expires_at_ms: event.expires_at.map(|secs| u64::try_from(secs).unwrap_or(0).saturating_mul(1000)),
            prune_at_ms: existing.as_ref().and_then(|tombstone| tombstone.prune_at_ms),
        };
        graph::insert_session(self.txn, &mut record, self.now, lifetimes)?;
        let Some(revocation) = revoked else { return Ok(Plan::default()) };
        // Born revoked. Touches of a session new to the graph must learn of it
        // now (a tombstone's touches were planned when they happened), and so
        // must sessions already established under it: a child's establish can
        // overtake its parent's, since push delivery is unordered.
        let mut sessions = if existing.is_none() { vec![record] } else { Vec::new() };
        for id in graph::subtree(self.txn, std::slice::from_ref(&session_id))?.into_iter().skip(1) {
            let Some(mut descendant) = graph::session(self.txn, &id)? else { continue };
            if descendant.revoked.is_some() || descendant.issuer != self.set.iss {
                continue;
            }
            descendant.revoked = Some(revocation.clone());
            graph::put_session(self.txn, &mut descendant, lifetimes)?;
            sessions.push(descendant);
        }
        self.plan_for_revoked(&sessions, &revocation)
    }

    /// The IdP addressed a receiver for the session: a touch that may name
    /// the session's user. Only receivers bound to this IdP are touched.
    fn presented(&self, audience: Option<&str>) -> Result<Plan, IngestError> {
        let (Some((subject, _)), Some(audience)) = (self.session_subject(), audience) else {
            return Ok(Plan::default());
        };
        let key = self.key(&subject);
        let touch = graph::Touch { at_ms: self.now, by_idp: true, named_user: None };
        let mut plan = Plan::default();
        let addressed = self.ctx.streams.all();
        let addressed = addressed.iter().filter(|s| s.config.aud.contains(audience) && s.hears_from(&self.set.iss));
        for stream in addressed {
            match late_touch_plan(self.txn, self.ctx, &key, &stream.config.stream_id, &touch) {
                Ok(more) => plan.extend(more),
                // A receiver that filled its own pending touches loses this
                // one; it must not make the IdP's SET fail for everyone.
                Err(IngestError::TooMany(reason)) => {
                    tracing::warn!(stream_id = %stream.config.stream_id, %reason, "presented touch dropped");
                }
                Err(error) => return Err(error),
            }
        }
        Ok(plan)
    }

    fn revoke(&self, common: CaepCommon) -> Result<Plan, IngestError> {
        let event = SessionRevoked { common: self.carried(common), ..SessionRevoked::default() };
        self.room_for(&Event::SessionRevoked(event.clone()))?;
        let roots = match (self.session_subject(), self.user_subject()) {
            (Some((subject, user)), _) => vec![self.session_root(subject, user)?],
            (None, Some(user)) => graph::sessions_of_user(self.txn, &self.set.iss, &user)?,
            (None, None) => return Ok(Plan::default()),
        };
        let root = self.root_label();
        self.revoke_subtrees(&roots, &root, event)
    }

    fn revoke_user_from_risc(&self) -> Result<Plan, IngestError> {
        let Some(user) = self.user_subject() else { return Ok(Plan::default()) };
        let roots = graph::sessions_of_user(self.txn, &self.set.iss, &user)?;
        let reason = format!("{} at the identity provider", short_type(self.set.event.type_uri()));
        let common = CaepCommon {
            event_timestamp: self.set.event.event_timestamp().or(Some(self.set.iat)),
            initiating_entity: Some(caep_schemas::event::InitiatingEntity::Policy),
            reason_admin: Some([("en".to_owned(), reason)].into()),
            reason_user: None,
        };
        let event = SessionRevoked { common, ..SessionRevoked::default() };
        self.room_for(&Event::SessionRevoked(event.clone()))?;
        self.revoke_subtrees(&roots, &self.root_label(), event)
    }

    /// Refuses, before anything is written, an event that would make its
    /// cascade carry more than [`MAX_EVENTS_PER_CASCADE`] different events:
    /// an IdP reusing one `txn` cannot grow a cascade record without bound.
    fn room_for(&self, event: &Event) -> Result<(), IngestError> {
        let Some(wire_txn) = &self.set.txn else { return Ok(()) }; // a fresh txn: a new cascade
        let Some(existing) = cascade::cascade(self.txn, &cascade::key(&self.set.iss, wire_txn))? else { return Ok(()) };
        let carried = carried_event(event);
        if existing.events.len() >= MAX_EVENTS_PER_CASCADE && !existing.events.contains(&carried) {
            return Err(rejected(
                "invalid_request",
                format!("txn `{wire_txn}` already carries {MAX_EVENTS_PER_CASCADE} different events; use another txn"),
            ));
        }
        Ok(())
    }

    /// A revoked session's id, creating a tombstone when the IdP revokes a
    /// session it has not established (yet): a later establish or touch of it
    /// is then revoked at birth.
    fn session_root(&self, subject: SubjectId, user: Option<SubjectId>) -> Result<String, IngestError> {
        let session_id = self.key(&subject);
        if self.own_session(&session_id)?.is_none() {
            let mut tombstone = SessionRecord {
                session_id: session_id.clone(),
                subject,
                issuer: self.set.iss.clone(),
                user,
                parent: None,
                authority: None,
                established_at_ms: self.now,
                revoked: None,
                last_active_ms: self.now,
                expires_at_ms: None,
                prune_at_ms: None,
            };
            graph::insert_session(self.txn, &mut tombstone, self.now, self.ctx.lifetimes)?;
        }
        Ok(session_id)
    }

    /// Marks every session under `roots` revoked and plans one leaf per
    /// (touched stream, newly revoked session).
    fn revoke_subtrees(&self, roots: &[String], root: &str, event: SessionRevoked) -> Result<Plan, IngestError> {
        let wire_txn = self.txn_id();
        let key = cascade::key(&self.set.iss, &wire_txn);
        let event = Event::SessionRevoked(event);
        let template = self.cascade_template(&key, &wire_txn, root, &event);
        let plan = revoke_trees(self.txn, self.ctx, roots, &template, &carried_event(&event), self.now, &self.cause())?;
        let leaves: usize = plan.cascades.iter().map(|(_, leaves)| leaves.len()).sum();
        tracing::info!(txn = %wire_txn, root, leaves, "revocation cascade planned");
        Ok(plan)
    }

    fn plan_for_revoked(&self, sessions: &[SessionRecord], revocation: &Revocation) -> Result<Plan, IngestError> {
        let mut plan = Plan::default();
        let (existing, event) = revoking_cascade(self.txn, revocation, &self.set.iss)?;
        plan.foreign = foreign_revocations(self.txn, sessions, &existing, &event)?;
        let leaves =
            plan_leaves(self.txn, self.ctx.streams, sessions, event_type::SESSION_REVOKED, self.now, &self.cause())?;
        if leaves.is_empty() {
            return Ok(plan);
        }
        let (record, leaves) = cascade::plan(self.txn, &existing, &event, leaves, self.ctx.on_planned)?;
        plan.add(record, leaves);
        Ok(plan)
    }

    /// Other CAEP events about a session (or a user's sessions) go to the
    /// streams that touched it and its descendants.
    fn forward(&self) -> Result<Plan, IngestError> {
        self.room_for(&self.set.event)?;
        let roots = match (self.session_subject(), self.user_subject()) {
            (Some((subject, _)), _) => {
                let id = self.key(&subject);
                let Some(mut record) = self.own_session(&id)? else { return Ok(Plan::default()) };
                graph::keep_alive(self.txn, &mut record, self.now, self.ctx.lifetimes)?;
                vec![id]
            }
            (None, Some(user)) => graph::sessions_of_user(self.txn, &self.set.iss, &user)?,
            (None, None) => return Ok(Plan::default()),
        };
        let mut sessions = Vec::new();
        for id in graph::subtree(self.txn, &roots)? {
            if let Some(record) = graph::session(self.txn, &id)?.filter(|r| r.issuer == self.set.iss) {
                sessions.push(record);
            }
        }
        let txn_id = self.txn_id();
        let key = cascade::key(&self.set.iss, &txn_id);
        let template = self.cascade_template(&key, &txn_id, &self.root_label(), &self.set.event);
        let leaves =
            plan_leaves(self.txn, self.ctx.streams, &sessions, self.set.event.type_uri(), self.now, &self.cause())?;
        let (record, leaves) =
            cascade::plan(self.txn, &template, &carried_event(&self.set.event), leaves, self.ctx.on_planned)?;
        let mut plan = Plan::default();
        plan.add(record, leaves);
        Ok(plan)
    }

    /// The origin's common members, carried onto every leaf; the event time
    /// defaults to the IdP SET's `iat`.
    fn carried(&self, mut common: CaepCommon) -> CaepCommon {
        common.event_timestamp = common.event_timestamp.or(Some(self.set.iat));
        common
    }

    fn root_label(&self) -> String {
        match self.session_subject() {
            Some((subject, _)) => format!("session:{}", graph::local_session_id(&subject)),
            None => format!("subject:{}", self.set.sub_id.to_value()),
        }
    }

    fn cascade_template(&self, key: &str, wire_txn: &str, root: &str, event: &Event) -> CascadeRecord {
        CascadeRecord {
            key: key.to_owned(),
            txn: wire_txn.to_owned(),
            root: root.to_owned(),
            issuer: self.set.iss.clone(),
            event_type: event.type_uri().to_owned(),
            events: Vec::new(),
            started_at_ms: self.now,
            total: 0,
            undispatched: 0,
            delivered: 0,
            failed: 0,
            completed_at_ms: None,
        }
    }
}

/// Revokes every session under `roots` (of the cascade's IdP) not revoked
/// yet, plans their leaves in `template`'s cascade, and names the trees in
/// other partitions the revocation must continue in.
fn revoke_trees(
    txn: &WriteTransaction,
    ctx: Context<'_>,
    roots: &[String],
    template: &CascadeRecord,
    event: &CascadeEvent,
    now: u64,
    cause: &str,
) -> Result<Plan, IngestError> {
    // A session remembers the cascade (by key) that revoked it.
    let revocation = Revocation { txn: template.key.clone(), at_ms: now };
    let mut newly = Vec::new();
    for session_id in graph::subtree(txn, roots)? {
        let Some(mut record) = graph::session(txn, &session_id)? else { continue };
        // Another IdP's sessions under this one are not this IdP's to revoke.
        if record.revoked.is_some() || record.issuer != template.issuer {
            continue;
        }
        record.revoked = Some(revocation.clone());
        graph::put_session(txn, &mut record, ctx.lifetimes)?;
        newly.push(record);
    }
    let leaves = plan_leaves(txn, ctx.streams, &newly, event_type::SESSION_REVOKED, now, cause)?;
    let (record, leaves) = cascade::plan(txn, template, event, leaves, ctx.on_planned)?;
    let mut plan = Plan { foreign: foreign_revocations(txn, &newly, &record, event)?, ..Plan::default() };
    plan.add(record, leaves);
    Ok(plan)
}

/// The trees in other partitions under newly revoked sessions.
fn foreign_revocations(
    txn: &WriteTransaction,
    revoked: &[SessionRecord],
    cascade: &CascadeRecord,
    event: &CascadeEvent,
) -> Result<Vec<ForeignRevocation>, StoreError> {
    let mut foreign = Vec::new();
    for session in revoked {
        for (child, child_root) in graph::foreign_children(txn, &session.session_id)? {
            foreign.push(ForeignRevocation {
                session: child,
                child_root,
                cascade: cascade.clone(),
                event: event.clone(),
            });
        }
    }
    Ok(foreign)
}

/// Kafka mode: `child`'s tree (in another partition) was established under
/// `parent`, whose tree is here. Records the edge; if `parent` is revoked
/// already, the revocation continues in the child's partition at once.
pub fn adopt(
    txn: &WriteTransaction,
    parent: &str,
    child: &str,
    child_root: &str,
    issuer: &str,
) -> Result<Plan, StoreError> {
    graph::add_foreign_child(txn, parent, child, child_root)?;
    let mut plan = Plan::default();
    let Some(record) = graph::session(txn, parent)?.filter(|record| record.issuer == issuer) else { return Ok(plan) };
    let Some(revocation) = record.revoked else { return Ok(plan) };
    let (existing, event) = revoking_cascade(txn, &revocation, issuer)?;
    plan.foreign.push(ForeignRevocation {
        session: child.to_owned(),
        child_root: child_root.to_owned(),
        cascade: existing,
        event,
    });
    Ok(plan)
}

/// Kafka mode: revokes the tree under `session` (this partition's) as part
/// of a cascade planned in another partition.
pub fn revoke_foreign(
    txn: &WriteTransaction,
    ctx: Context<'_>,
    session: &str,
    cascade: &CascadeRecord,
    event: &CascadeEvent,
    now: u64,
) -> Result<Plan, IngestError> {
    let template = cascade.template();
    let cause = format!("foreign {} {session}", cascade.key);
    revoke_trees(txn, ctx, &[session.to_owned()], &template, event, now, &cause)
}

fn carried_event(event: &Event) -> CascadeEvent {
    CascadeEvent { event_type: event.type_uri().to_owned(), event: event.payload() }
}

/// The session-revoked event a revocation cascade carries.
fn revocation_event(cascade: &CascadeRecord) -> Option<CascadeEvent> {
    cascade.events.iter().find(|e| e.event_type == event_type::SESSION_REVOKED).cloned()
}

/// The cascade that revoked a session (of `issuer`) and the session-revoked
/// event it carries. A late leaf must go out even when that cascade's record
/// was pruned already (kept for less time than the session): it then goes
/// out in a new record under the same key, carrying a session-revoked that
/// says only when.
fn revoking_cascade(
    txn: &WriteTransaction,
    revocation: &Revocation,
    issuer: &str,
) -> Result<(CascadeRecord, CascadeEvent), StoreError> {
    if let Some(existing) = cascade::cascade(txn, &revocation.txn)?
        && let Some(event) = revocation_event(&existing)
    {
        return Ok((existing, event));
    }
    let common = CaepCommon { event_timestamp: Some((revocation.at_ms / 1000) as i64), ..CaepCommon::default() };
    let event = carried_event(&Event::SessionRevoked(SessionRevoked { common, ..SessionRevoked::default() }));
    let wire_txn = crate::scope::local_id(&revocation.txn).to_owned();
    let record = CascadeRecord {
        key: revocation.txn.clone(),
        txn: wire_txn,
        root: "revoked before".into(),
        issuer: issuer.to_owned(),
        event_type: event_type::SESSION_REVOKED.to_owned(),
        events: Vec::new(),
        started_at_ms: revocation.at_ms,
        total: 0,
        undispatched: 0,
        delivered: 0,
        failed: 0,
        completed_at_ms: None,
    };
    Ok((record, event))
}

fn short_type(uri: &str) -> &str {
    uri.rsplit('/').next().unwrap_or(uri)
}

/// One leaf per (stream that wants `event_type` about the session, session):
/// streams the session touched, plus streams granted every subject of the
/// session's IdP. A leaf names the user only where the disclosure rule lets it.
fn plan_leaves(
    txn: &WriteTransaction,
    streams: &StreamRegistry,
    sessions: &[SessionRecord],
    event_type: &str,
    now: u64,
    cause: &str,
) -> Result<Vec<Leaf>, StoreError> {
    let all = streams.all();
    let mut leaves = Vec::new();
    for session in sessions {
        let wants = |stream: &StreamRecord| stream.delivers(event_type) && stream.hears_from(&session.issuer);
        // stream → whether the SET may name the user.
        let mut targets: BTreeMap<String, bool> =
            all.iter().filter(|s| s.all_subjects && wants(s)).map(|s| (s.config.stream_id.clone(), true)).collect();
        for (stream_id, touch) in graph::touches(txn, &session.session_id)? {
            if streams.get(&stream_id).is_some_and(|s| wants(&s)) {
                *targets.entry(stream_id).or_default() |= touch.discloses(session.user.as_ref());
            }
        }
        for (stream_id, with_user) in targets {
            if event_type == event_type::SESSION_REVOKED
                && !graph::claim_revocation(txn, &session.session_id, &stream_id)?
            {
                continue;
            }
            leaves.push(new_leaf(stream_id, session.session_id.clone(), with_user, now, cause));
        }
    }
    Ok(leaves)
}

fn new_leaf(stream_id: String, session_id: String, with_user: bool, now: u64, cause: &str) -> Leaf {
    Leaf {
        jti: leaf_jti(cause, &session_id, &stream_id),
        stream_id,
        session_id,
        with_user,
        event: 0, // set by cascade::plan
        planned_at_ms: now,
        status: LeafStatus::Planned,
        acked_at_ms: None,
        err: None,
    }
}

/// A leaf's `jti`, derived from its cause and its (session, stream): unique
/// per leaf, and the same when the cause is applied again, so a replayed
/// log re-sends a leaf under its first `jti` (receivers drop the duplicate).
fn leaf_jti(cause: &str, session_id: &str, stream_id: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    for part in [cause, session_id, stream_id] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&hash.finalize()[..16])
}

/// Records that the session `key` reached `stream_id`; when the session is
/// already revoked and the stream was never told, plans that stream's
/// revocation leaf in the revoking cascade. A session no IdP has named yet
/// keeps the touch pending until it is named (capped per stream).
pub(crate) fn late_touch_plan(
    txn: &WriteTransaction,
    ctx: Context<'_>,
    key: &str,
    stream_id: &str,
    touch: &graph::Touch,
) -> Result<Plan, IngestError> {
    let mut plan = Plan::default();
    // A receiver whose pending touches are full is refused every touch, of
    // known sessions too: its answers must not tell which ids exist.
    if !touch.by_idp && graph::pending_full(txn, stream_id)? {
        return Err(IngestError::TooMany(graph::PendingError::Full.to_string()));
    }
    let Some(mut record) = graph::session(txn, key)? else {
        return match graph::touch_pending(txn, key, stream_id, touch) {
            Ok(()) => Ok(plan),
            Err(graph::PendingError::Full) => Err(IngestError::TooMany(graph::PendingError::Full.to_string())),
            Err(graph::PendingError::Store(error)) => Err(error.into()),
        };
    };
    graph::touch(txn, key, stream_id, touch)?;
    graph::keep_alive(txn, &mut record, touch.at_ms, ctx.lifetimes)?;
    let Some(revocation) = record.revoked.clone() else { return Ok(plan) };
    if !ctx
        .streams
        .get(stream_id)
        .is_some_and(|s| s.delivers(event_type::SESSION_REVOKED) && s.hears_from(&record.issuer))
    {
        return Ok(plan);
    }
    // Told already (by the cascade, at birth, or by an earlier touch)?
    if !graph::claim_revocation(txn, key, stream_id)? {
        return Ok(plan);
    }
    let (existing, event) = revoking_cascade(txn, &revocation, &record.issuer)?;
    let with_user = touch.discloses(record.user.as_ref());
    let cause = format!("touch {}", revocation.txn);
    let leaf = new_leaf(stream_id.to_owned(), key.to_owned(), with_user, touch.at_ms, &cause);
    tracing::info!(txn = %existing.txn, session_id = record.local_id(), stream_id, "touch by a revoked session: revocation sent");
    let (updated, leaves) = cascade::plan(txn, &existing, &event, vec![leaf], ctx.on_planned)?;
    plan.add(updated, leaves);
    Ok(plan)
}
