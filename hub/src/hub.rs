//! The hub: what an IdP event does to the session graph, and the cascade of
//! SETs it causes.
//!
//! An IdP event's effects (graph changes and the cascade plan) are decided
//! and written in one transaction of the store's single writer, so they are
//! serialized with every concurrent spawn, touch and revocation: a session
//! established under a revoked ancestor is revoked at birth, and a touch by
//! a revoked session plans that stream's revocation at once.

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock, Weak};

use caep_schemas::event::{CaepCommon, Event, SessionRevoked, event_type};
use caep_schemas::set::{SecurityEventToken, new_id};
use caep_schemas::subject::SubjectId;
use caep_transmitter::outbox::{NewSet, Outbox, OutcomeSink, SetOutcome, now_ms};
use caep_transmitter::registry::{StreamRecord, StreamRegistry};
use caep_transmitter::service::{BoxFuture, Outgoing, SubjectHook, Transmitter};
use caep_transmitter::store::{Commit, Store, StoreError};
use redb::{ReadableTable, TableDefinition, WriteTransaction};

use crate::cascade::{self, CascadeEvent, CascadeRecord, Leaf, LeafStatus, Outcome};
use crate::graph::{self, Revocation, SessionRecord};
use crate::issuers::Issuers;

/// `(iss, jti)` of every IdP SET ingested: a replay gets the first answer
/// and has no second effect.
const INGESTED: TableDefinition<(&str, &str), u64> = TableDefinition::new("ingested_jtis");
/// Leaves signed per blocking task.
const SIGN_CHUNK: usize = 256;

/// The hub's state.
pub struct Hub {
    issuer: String,
    /// Signing chunks at once: one per core, so early chunks reach the
    /// outbox (and the wire) while later ones are still being signed.
    signing: tokio::sync::Semaphore,
    transmitter: Arc<Transmitter>,
    store: Store,
    issuers: Issuers,
}

/// What an event planned: its cascade and the new leaves.
#[derive(Debug, Default)]
pub struct Plan {
    pub cascades: Vec<(CascadeRecord, Vec<Leaf>)>,
}

impl Plan {
    fn add(&mut self, cascade: CascadeRecord, leaves: Vec<Leaf>) {
        self.cascades.push((cascade, leaves));
    }
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
}

fn rejected(err: &'static str, description: impl Into<String>) -> IngestError {
    IngestError::Rejected { err, description: description.into() }
}

impl From<StoreError> for IngestError {
    fn from(error: StoreError) -> Self {
        IngestError::Unavailable(error.to_string())
    }
}

impl Hub {
    /// The hub over a transmitter; call [`Hub::start`] next.
    pub fn new(issuer: &str, transmitter: Arc<Transmitter>, store: Store, issuers: Issuers) -> Arc<Self> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let signing = tokio::sync::Semaphore::new(cores);
        Arc::new(Hub { issuer: issuer.to_owned(), signing, transmitter, store, issuers })
    }

    /// Re-dispatches leaves a crash left planned.
    pub fn start(self: &Arc<Self>) -> Result<(), StoreError> {
        let planned = self.store.read(cascade::all_planned)?;
        if !planned.is_empty() {
            tracing::info!(cascades = planned.len(), "re-dispatching leaves planned before a restart");
        }
        for (record, leaves) in planned {
            self.dispatch(record, leaves);
        }
        Ok(())
    }

    /// The transmitter.
    pub fn transmitter(&self) -> &Arc<Transmitter> {
        &self.transmitter
    }

    /// The trusted issuers.
    pub fn issuers(&self) -> &Issuers {
        &self.issuers
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Verifies an IdP's SET and applies it. Returns after the event and its
    /// cascade plan are durably committed; dispatch continues in the background.
    pub async fn ingest(self: &Arc<Self>, token: &str) -> Result<(), IngestError> {
        let received_at = now_ms();
        let set = self.verify(token).await?;
        let this = Arc::clone(self);
        let plan = self.store.write(Commit::Durable, move |txn| Ok(this.apply(txn, &set, received_at))).await??;
        for (record, leaves) in plan.cascades {
            self.dispatch(record, leaves);
        }
        Ok(())
    }

    async fn verify(&self, token: &str) -> Result<SecurityEventToken, IngestError> {
        let issuer = unverified_issuer(token)?;
        let keys = self.issuers.keys_for(&issuer).ok_or_else(|| rejected("invalid_issuer", "issuer is not trusted"))?;
        let mut expect = caep_schemas::set::Expectations::new(&issuer, &self.issuer);
        expect.max_age_secs = Some(24 * 3600);
        let jwks = keys.get().await.map_err(|e| IngestError::Unavailable(format!("issuer keys: {e}")))?;
        match SecurityEventToken::verify(token, &jwks, &expect) {
            Err(caep_schemas::set::SetError::Jose(caep_schemas::jose::JoseError::UnknownKey { kid })) => {
                // Rate-limited or failed refetches are transient: the IdP retries
                // (a key rotated moments ago must not be refused for good).
                let jwks = keys.refresh_for_unknown_kid(&kid).await.map_err(|e| {
                    if e.is_transient() {
                        IngestError::Unavailable(e.to_string())
                    } else {
                        rejected("invalid_key", e.to_string())
                    }
                })?;
                SecurityEventToken::verify(token, &jwks, &expect).map_err(set_rejection)
            }
            other => other.map_err(set_rejection),
        }
    }

    /// Decides and writes an event's effects. Never writes when it refuses.
    fn apply(&self, txn: &WriteTransaction, set: &SecurityEventToken, now: u64) -> Result<Plan, IngestError> {
        let mut ingested = txn.open_table(INGESTED).map_err(StoreError::storage)?;
        if ingested.get((set.iss.as_str(), set.jti.as_str())).map_err(StoreError::storage)?.is_some() {
            tracing::debug!(iss = %set.iss, jti = %set.jti, "replayed IdP SET: no second effect");
            return Ok(Plan::default());
        }
        let plan = self.effects(txn, set, now)?;
        ingested.insert((set.iss.as_str(), set.jti.as_str()), now).map_err(StoreError::storage)?;
        Ok(plan)
    }

    fn effects(&self, txn: &WriteTransaction, set: &SecurityEventToken, now: u64) -> Result<Plan, IngestError> {
        let ctx = Effect { txn, set, now, streams: self.transmitter.streams() };
        match &set.event {
            Event::SessionEstablished(established) => ctx.establish(established),
            Event::SessionPresented(presented) => ctx.presented(presented.audience.as_deref()),
            Event::SessionRevoked(revoked) => ctx.revoke(revoked.common.clone()),
            Event::AccountDisabled(_) | Event::AccountPurged(_) | Event::CredentialCompromise(_) => {
                ctx.revoke_user_from_risc()
            }
            Event::CredentialChange(_)
            | Event::TokenClaimsChange(_)
            | Event::AssuranceLevelChange(_)
            | Event::DeviceComplianceChange(_)
            | Event::RiskLevelChange(_) => ctx.forward(),
            _ => Ok(Plan::default()),
        }
    }

    /// Signs and enqueues a cascade's leaves in chunks on the blocking pool;
    /// each chunk is delivered as soon as it is in the outbox.
    pub fn dispatch(self: &Arc<Self>, record: CascadeRecord, leaves: Vec<Leaf>) {
        let record = Arc::new(record);
        for chunk in leaves.chunks(SIGN_CHUNK) {
            let (this, record, chunk) = (Arc::clone(self), Arc::clone(&record), chunk.to_vec());
            tokio::spawn(async move {
                if let Err(error) = this.dispatch_chunk(&record, chunk).await {
                    tracing::error!(txn = %record.txn, %error, "cascade dispatch failed; leaves stay planned");
                }
            });
        }
    }

    async fn dispatch_chunk(self: &Arc<Self>, record: &CascadeRecord, leaves: Vec<Leaf>) -> Result<(), StoreError> {
        let outgoing: Vec<Outgoing> = leaves.iter().filter_map(|leaf| self.leaf_set(record, leaf)).collect();
        let transmitter = Arc::clone(&self.transmitter);
        let permit = self.signing.acquire().await.map_err(StoreError::storage)?;
        let signed = tokio::task::spawn_blocking(move || transmitter.sign(outgoing))
            .await
            .map_err(StoreError::storage)?
            .map_err(StoreError::storage)?;
        drop(permit);
        // The outbox row carries the cascade key, so outcomes find their leaf.
        let signed: Vec<_> = signed.into_iter().map(|set| NewSet { txn: Some(record.key.clone()), ..set }).collect();
        let signed_jtis: BTreeSet<&str> = signed.iter().map(|set| set.jti.as_str()).collect();
        // A leaf whose stream vanished or was disabled meanwhile cannot be sent.
        let dropped: Vec<Outcome> = leaves
            .iter()
            .filter(|leaf| !signed_jtis.contains(leaf.jti.as_str()))
            .map(|leaf| Outcome {
                txn: record.key.clone(),
                jti: leaf.jti.clone(),
                delivered: false,
                at_ms: now_ms(),
                err: Some("stream_unavailable".into()),
            })
            .collect();
        let streams: BTreeSet<String> = signed.iter().map(|set| set.stream_id.clone()).collect();
        let jtis: Vec<String> = signed.iter().map(|set| set.jti.clone()).collect();
        let cascade_key = record.key.clone();
        // Lazy: the durable plan already holds these leaves; a lost insert
        // leaves them planned, and start-up signs them again (same jti).
        self.store
            .write(Commit::Lazy, move |txn| {
                Outbox::insert(txn, &signed)?;
                cascade::mark_pending(txn, &cascade_key, &jtis)
            })
            .await?;
        self.transmitter.wake(&streams);
        if !dropped.is_empty() {
            self.store.write(Commit::Lazy, move |txn| cascade::apply_outcomes(txn, &dropped).map(drop)).await?;
        }
        Ok(())
    }

    fn leaf_set(&self, record: &CascadeRecord, leaf: &Leaf) -> Option<Outgoing> {
        let stream = self.transmitter.streams().get(&leaf.stream_id)?;
        let carried = record.events.get(leaf.event)?;
        let event = Event::from_parts(&carried.event_type, carried.event.clone()).ok()?;
        let mut set = SecurityEventToken::new(
            self.issuer.clone(),
            stream.config.aud.clone(),
            SubjectId::session_of(leaf.session.clone(), leaf.user.clone()),
            event,
        );
        set.jti = leaf.jti.clone();
        set.txn = Some(record.txn.clone());
        Some(Outgoing { stream_id: leaf.stream_id.clone(), set })
    }

    /// A receiver reported that a session reached its stream (add-subject
    /// with a complex `session` subject): record the touch, and if the
    /// session is already revoked, send that stream the revocation now.
    pub async fn touched(self: &Arc<Self>, stream: &StreamRecord, subject: &SubjectId) {
        let Some(session) = subject.as_complex().and_then(|c| c.session.clone()) else { return };
        let (this, stream_id, now) = (Arc::clone(self), stream.config.stream_id.clone(), now_ms());
        let planned = self
            .store
            .write(Commit::Durable, move |txn| {
                let key = graph::session_key(&session);
                late_touch_plan(txn, this.transmitter.streams(), &key, &session, &stream_id, now)
            })
            .await;
        match planned {
            Ok(plan) => {
                for (record, leaves) in plan.cascades {
                    self.dispatch(record, leaves);
                }
            }
            Err(error) => tracing::error!(%error, "cannot record a touch"),
        }
    }

    /// The cascade report.
    pub fn report(&self, cascade_txn: &str) -> Result<Option<cascade::CascadeReport>, StoreError> {
        self.store.read(|txn| cascade::report(txn, cascade_txn))
    }
}

fn set_rejection(error: caep_schemas::set::SetError) -> IngestError {
    rejected(error.rfc8935_err(), error.to_string())
}

/// The `iss` of a compact JWS, read before verification only to choose the
/// keys to verify it with.
fn unverified_issuer(token: &str) -> Result<String, IngestError> {
    use base64::Engine;
    let payload = token.split('.').nth(1).ok_or_else(|| rejected("invalid_request", "not a compact JWS"))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| rejected("invalid_request", "payload is not base64url"))?;
    let claims: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| rejected("invalid_request", "payload is not JSON"))?;
    match claims.get("iss") {
        Some(serde_json::Value::String(iss)) => Ok(iss.clone()),
        _ => Err(rejected("invalid_request", "claim `iss` is missing")),
    }
}

/// One event's effect computation, inside the writer's transaction.
struct Effect<'a> {
    txn: &'a WriteTransaction,
    set: &'a SecurityEventToken,
    now: u64,
    streams: &'a StreamRegistry,
}

impl Effect<'_> {
    fn txn_id(&self) -> String {
        self.set.txn.clone().unwrap_or_else(new_id)
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

    /// A session record, refusing sessions another IdP established.
    fn own_session(&self, session_id: &str) -> Result<Option<SessionRecord>, IngestError> {
        match graph::session(self.txn, session_id)? {
            Some(record) if record.issuer != self.set.iss => {
                Err(rejected("invalid_request", format!("session `{session_id}` belongs to another issuer")))
            }
            other => Ok(other),
        }
    }

    fn establish(&self, event: &caep_schemas::event::SessionEstablished) -> Result<Plan, IngestError> {
        let (subject, user) = self
            .session_subject()
            .ok_or_else(|| rejected("invalid_request", "session-established needs a complex sub_id with `session`"))?;
        let session_id = graph::session_key(&subject);
        let parent = event.parent_session.as_ref().map(graph::session_key);
        if parent.as_deref() == Some(session_id.as_str()) {
            return Err(rejected("invalid_request", "a session cannot be its own parent"));
        }
        let existing = self.own_session(&session_id)?;
        let parent_record = match &parent {
            Some(parent) => self.own_session(parent)?,
            None => None,
        };
        // Revoked at birth: under a revoked ancestor, or revoked before the
        // IdP's establish arrived (a tombstone).
        let revoked =
            existing.as_ref().and_then(|e| e.revoked.clone()).or_else(|| parent_record.and_then(|p| p.revoked));
        if existing.as_ref().is_some_and(|e| e.revoked.is_none()) {
            return Ok(Plan::default()); // established already: idempotent
        }
        let record = SessionRecord {
            session_id: session_id.clone(),
            subject,
            issuer: self.set.iss.clone(),
            user,
            parent,
            authority: event.authority,
            established_at_ms: self.now,
            revoked: revoked.clone(),
        };
        graph::insert_session(self.txn, &record)?;
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
            graph::put_session(self.txn, &descendant)?;
            sessions.push(descendant);
        }
        self.plan_for_revoked(&sessions, &revocation)
    }

    fn presented(&self, audience: Option<&str>) -> Result<Plan, IngestError> {
        let (Some((subject, _)), Some(audience)) = (self.session_subject(), audience) else {
            return Ok(Plan::default());
        };
        let session_id = graph::session_key(&subject);
        self.own_session(&session_id)?;
        let mut plan = Plan::default();
        for stream in self.streams.all().iter().filter(|s| s.config.aud.contains(audience)) {
            let late =
                late_touch_plan(self.txn, self.streams, &session_id, &subject, &stream.config.stream_id, self.now)?;
            plan.cascades.extend(late.cascades);
        }
        Ok(plan)
    }

    fn revoke(&self, common: CaepCommon) -> Result<Plan, IngestError> {
        let roots = match (self.session_subject(), self.user_subject()) {
            (Some((subject, user)), _) => vec![self.session_root(subject, user)?],
            (None, Some(user)) => graph::sessions_of_user(self.txn, &self.set.iss, &user)?,
            (None, None) => return Ok(Plan::default()),
        };
        let event = SessionRevoked { common: self.carried(common), ..SessionRevoked::default() };
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
        self.revoke_subtrees(&roots, &self.root_label(), event)
    }

    /// A revoked session's id, creating a tombstone when the IdP revokes a
    /// session it has not established (yet): a later establish or touch of it
    /// is then revoked at birth.
    fn session_root(&self, subject: SubjectId, user: Option<SubjectId>) -> Result<String, IngestError> {
        let session_id = graph::session_key(&subject);
        if self.own_session(&session_id)?.is_none() {
            let tombstone = SessionRecord {
                session_id: session_id.clone(),
                subject,
                issuer: self.set.iss.clone(),
                user,
                parent: None,
                authority: None,
                established_at_ms: self.now,
                revoked: None,
            };
            graph::insert_session(self.txn, &tombstone)?;
        }
        Ok(session_id)
    }

    /// Marks every session under `roots` revoked and plans one leaf per
    /// (touched stream, newly revoked session).
    fn revoke_subtrees(&self, roots: &[String], root: &str, event: SessionRevoked) -> Result<Plan, IngestError> {
        let wire_txn = self.txn_id();
        let key = cascade::key_for(self.txn, &wire_txn, &self.set.iss)?;
        // A session remembers the cascade (by key) that revoked it.
        let revocation = Revocation { txn: key.clone(), at_ms: self.now };
        let mut newly = Vec::new();
        for session_id in graph::subtree(self.txn, roots)? {
            let Some(mut record) = graph::session(self.txn, &session_id)? else { continue };
            // Another IdP's sessions under this one are not this IdP's to revoke.
            if record.revoked.is_some() || record.issuer != self.set.iss {
                continue;
            }
            record.revoked = Some(revocation.clone());
            graph::put_session(self.txn, &record)?;
            newly.push(record);
        }
        let event = Event::SessionRevoked(event);
        let template = self.cascade_template(&key, &wire_txn, root, &event);
        let leaves = plan_leaves(self.txn, self.streams, &newly, event_type::SESSION_REVOKED, self.now)?;
        let (record, leaves) = cascade::plan(self.txn, &template, &carried_event(&event), leaves)?;
        tracing::info!(txn = %wire_txn, root, sessions = newly.len(), leaves = leaves.len(), "revocation cascade planned");
        let mut plan = Plan::default();
        plan.add(record, leaves);
        Ok(plan)
    }

    fn plan_for_revoked(&self, sessions: &[SessionRecord], revocation: &Revocation) -> Result<Plan, IngestError> {
        let leaves = plan_leaves(self.txn, self.streams, sessions, event_type::SESSION_REVOKED, self.now)?;
        let mut plan = Plan::default();
        if leaves.is_empty() {
            return Ok(plan);
        }
        let Some(existing) = cascade::cascade(self.txn, &revocation.txn)? else { return Ok(plan) };
        let Some(event) = revocation_event(&existing) else { return Ok(plan) };
        let (record, leaves) = cascade::plan(self.txn, &existing, &event, leaves)?;
        plan.add(record, leaves);
        Ok(plan)
    }

    /// Other CAEP events about a session (or a user's sessions) go to the
    /// streams that touched it and its descendants.
    fn forward(&self) -> Result<Plan, IngestError> {
        let roots = match (self.session_subject(), self.user_subject()) {
            (Some((subject, _)), _) => {
                let id = graph::session_key(&subject);
                if self.own_session(&id)?.is_none() {
                    return Ok(Plan::default());
                }
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
        let key = cascade::key_for(self.txn, &txn_id, &self.set.iss)?;
        let template = self.cascade_template(&key, &txn_id, &self.root_label(), &self.set.event);
        let leaves = plan_leaves(self.txn, self.streams, &sessions, self.set.event.type_uri(), self.now)?;
        let (record, leaves) = cascade::plan(self.txn, &template, &carried_event(&self.set.event), leaves)?;
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
            Some((subject, _)) => format!("session:{}", graph::session_key(&subject)),
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
            delivered: 0,
            failed: 0,
            completed_at_ms: None,
        }
    }
}

fn carried_event(event: &Event) -> CascadeEvent {
    CascadeEvent { event_type: event.type_uri().to_owned(), event: event.payload() }
}

/// The session-revoked event a revocation cascade carries.
fn revocation_event(cascade: &CascadeRecord) -> Option<CascadeEvent> {
    cascade.events.iter().find(|e| e.event_type == event_type::SESSION_REVOKED).cloned()
}

fn short_type(uri: &str) -> &str {
    uri.rsplit('/').next().unwrap_or(uri)
}

/// One leaf per (stream that wants `event_type` about the session, session):
/// streams the session touched, plus streams that take every subject.
fn plan_leaves(
    txn: &WriteTransaction,
    streams: &StreamRegistry,
    sessions: &[SessionRecord],
    event_type: &str,
    now: u64,
) -> Result<Vec<Leaf>, StoreError> {
    let takes_all: Vec<String> = streams
        .all()
        .iter()
        .filter(|s| s.all_subjects && s.delivers(event_type))
        .map(|s| s.config.stream_id.clone())
        .collect();
    let mut leaves = Vec::new();
    for session in sessions {
        let mut targets: BTreeSet<String> = graph::touched_streams(txn, &session.session_id)?
            .into_iter()
            .filter(|id| streams.get(id).is_some_and(|s| s.delivers(event_type)))
            .collect();
        targets.extend(takes_all.iter().cloned());
        for stream_id in targets {
            if event_type == event_type::SESSION_REVOKED
                && !graph::claim_revocation(txn, &session.session_id, &stream_id)?
            {
                continue;
            }
            leaves.push(new_leaf(
                stream_id,
                session.session_id.clone(),
                session.subject.clone(),
                session.user.clone(),
                now,
            ));
        }
    }
    Ok(leaves)
}

fn new_leaf(stream_id: String, session_id: String, session: SubjectId, user: Option<SubjectId>, now: u64) -> Leaf {
    Leaf {
        jti: new_id(),
        stream_id,
        session_id,
        session,
        user,
        event: 0, // set by cascade::plan
        planned_at_ms: now,
        status: LeafStatus::Planned,
        acked_at_ms: None,
        err: None,
    }
}

/// Records a touch; when the session is already revoked and the stream was
/// never told, plans that stream's revocation leaf in the revoking cascade.
fn late_touch_plan(
    txn: &WriteTransaction,
    streams: &StreamRegistry,
    session_id: &str,
    session: &SubjectId,
    stream_id: &str,
    now: u64,
) -> Result<Plan, StoreError> {
    let mut plan = Plan::default();
    graph::touch(txn, session_id, stream_id, now)?;
    let Some(record) = graph::session(txn, session_id)? else { return Ok(plan) };
    let Some(revocation) = record.revoked.clone() else { return Ok(plan) };
    if !streams.get(stream_id).is_some_and(|s| s.delivers(event_type::SESSION_REVOKED)) {
        return Ok(plan);
    }
    // Told already (by the cascade, at birth, or by an earlier touch)?
    if !graph::claim_revocation(txn, session_id, stream_id)? {
        return Ok(plan);
    }
    let Some(existing) = cascade::cascade(txn, &revocation.txn)? else { return Ok(plan) };
    let Some(event) = revocation_event(&existing) else { return Ok(plan) };
    let leaf = new_leaf(stream_id.to_owned(), session_id.to_owned(), session.clone(), record.user.clone(), now);
    tracing::info!(txn = %existing.txn, session_id, stream_id, "touch by a revoked session: revocation sent");
    let (updated, leaves) = cascade::plan(txn, &existing, &event, vec![leaf])?;
    plan.add(updated, leaves);
    Ok(plan)
}

/// Applies delivery outcomes to cascade leaves inside the transaction that
/// takes each SET out of the outbox, so a leaf's outcome and its SET's
/// removal are on disk together, or neither is.
pub struct Tracker;

impl Tracker {
    /// The tracker.
    pub fn new() -> Arc<Self> {
        Arc::new(Tracker)
    }
}

impl OutcomeSink for Tracker {
    fn record(&self, txn: &WriteTransaction, outcomes: &[SetOutcome<'_>]) -> Result<(), StoreError> {
        let outcomes: Vec<Outcome> = outcomes
            .iter()
            .filter_map(|o| {
                Some(Outcome {
                    txn: o.set.txn.clone()?,
                    jti: o.set.jti.clone(),
                    delivered: o.delivered,
                    at_ms: o.at_ms,
                    err: o.err.map(str::to_owned),
                })
            })
            .collect();
        if outcomes.is_empty() {
            return Ok(());
        }
        let applied = cascade::apply_outcomes(txn, &outcomes)?;
        for latency in applied.leaf_latencies_ms {
            metrics::histogram!("caep_leaf_latency_seconds").record(latency as f64 / 1000.0);
        }
        for (cascade_txn, took) in applied.completed {
            metrics::histogram!("caep_cascade_completion_seconds").record(took as f64 / 1000.0);
            tracing::info!(txn = %cascade_txn, cascade_ms = took, "cascade complete");
        }
        Ok(())
    }
}

/// The transmitter's add-subject hook, pointing back at the hub once it exists.
#[derive(Default)]
pub struct TouchHook {
    hub: OnceLock<Weak<Hub>>,
}

impl TouchHook {
    /// Connects the hook to the hub.
    pub fn connect(&self, hub: &Arc<Hub>) {
        let _ = self.hub.set(Arc::downgrade(hub));
    }
}

impl SubjectHook for TouchHook {
    fn subject_added<'a>(&'a self, stream: &'a StreamRecord, subject: &'a SubjectId) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Some(hub) = self.hub.get().and_then(Weak::upgrade) {
                hub.touched(stream, subject).await;
            }
        })
    }
}
