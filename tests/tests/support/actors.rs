//! The actors of the cascade and boundary tests: a simulated IdP (its own
//! ES256 key, registered at `POST /admin/issuers`) pushing signed SETs to the
//! hub's `/ingest`, and relying parties receiving the hub's SETs by push
//! (scripted recorders on loopback) or poll (RFC 8936 with acknowledgement),
//! every SET verified against the hub's JWKS with the RP's own audience.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use caep_schemas::event::{Event, event_type};
use caep_schemas::jose::{Algorithm, Jwks, SigningKey};
use caep_schemas::set::SecurityEventToken;
use caep_schemas::subject::SubjectId;
use reqwest::Method;
use serde_json::{Value, json};

use super::{Body, Hub, POLL, PUSH, PushReceiver, Reply, Rp, SESSION_REVOKED, TICK, WAIT};

/// The simulated identity provider's issuer.
pub const IDP: &str = "https://idp.example";
/// How long "nothing more arrives" is watched for.
pub const QUIET: Duration = Duration::from_millis(600);

// ---------------------------------------------------------------- subjects

pub fn session(id: &str) -> Value {
    json!({"format": "opaque", "id": id})
}

pub fn email(address: &str) -> Value {
    json!({"format": "email", "email": address})
}

pub fn iss_sub(sub: &str) -> Value {
    json!({"format": "iss_sub", "iss": IDP, "sub": sub})
}

/// The `sub_id` of a session-scoped SET: complex `{session, user}`.
pub fn session_of(id: &str, user: &Value) -> Value {
    json!({"format": "complex", "session": session(id), "user": user})
}

// ---------------------------------------------------------------- the IdP

/// An identity provider trusted by the hub, pushing SETs to `/ingest`.
pub struct Idp {
    pub issuer: String,
    pub key: SigningKey,
    /// The hub's issuer URL: the `aud` of every SET the IdP sends it.
    pub hub_issuer: String,
}

impl Idp {
    /// Generates a key and registers the IdP with it (201).
    pub async fn register(hub: &Hub, issuer: &str) -> Idp {
        let key = SigningKey::generate(Algorithm::Es256).expect("IdP key");
        let body = json!({"issuer": issuer, "jwks": Jwks::from_keys([&key]).to_json()});
        let created = hub.admin(Method::POST, "/admin/issuers", Body::Json(body)).await.expect(201).json();
        assert_eq!(created["issuer"], issuer, "{created}");
        Idp { issuer: issuer.to_owned(), key, hub_issuer: hub.issuer.clone() }
    }

    /// An IdP with a fresh key that the hub does not trust.
    pub fn unregistered(hub: &Hub) -> Idp {
        let key = SigningKey::generate(Algorithm::Es256).expect("IdP key");
        Idp { issuer: "https://untrusted-idp.example".into(), key, hub_issuer: hub.issuer.clone() }
    }

    /// A SET from this IdP to the hub.
    pub fn set(&self, sub_id: Value, event_type: &str, payload: Value) -> SecurityEventToken {
        let sub_id = SubjectId::from_value(sub_id).expect("sub_id");
        let event = Event::from_parts(event_type, payload).expect("event payload");
        SecurityEventToken::new(self.issuer.clone(), self.hub_issuer.clone(), sub_id, event)
    }

    pub fn sign(&self, set: &SecurityEventToken) -> String {
        set.sign(&self.key).expect("IdP signs")
    }

    /// Signs and pushes `set`; 202 expected.
    pub async fn send(&self, hub: &Hub, set: &SecurityEventToken) {
        let reply = ingest(hub, &self.sign(set)).await;
        assert_eq!(reply.status, 202, "IdP SET refused: {}", reply.text);
        assert!(reply.text.is_empty(), "202 with a body: {}", reply.text);
    }

    /// `session-established` of `id` for `user`, under `parent` if given.
    pub async fn establish(&self, hub: &Hub, id: &str, user: &Value, parent: Option<&str>) {
        let mut payload = json!({"authority": "delegated"});
        if let Some(parent) = parent {
            payload["parent_session"] = session(parent);
        }
        self.send(hub, &self.set(session_of(id, user), event_type::SESSION_ESTABLISHED, payload)).await;
    }

    /// `session-presented`: session `id` reached the RP with `audience`.
    pub async fn presented(&self, hub: &Hub, id: &str, user: &Value, audience: &str) {
        let set = self.set(session_of(id, user), event_type::SESSION_PRESENTED, json!({"audience": audience}));
        self.send(hub, &set).await;
    }
}

/// `POST {issuer}/ingest` with `Content-Type: application/secevent+jwt`.
pub async fn ingest(hub: &Hub, token: &str) -> Reply {
    ingest_as(hub, token, Some("application/secevent+jwt")).await
}

/// `POST {issuer}/ingest` with the given body and Content-Type.
pub async fn ingest_as(hub: &Hub, body: &str, content_type: Option<&str>) -> Reply {
    let mut request =
        hub.http.post(format!("{}/ingest", hub.issuer)).header("accept", "application/json").body(body.to_owned());
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    let response = super::send_uploading(request, body.len() > super::OVERSIZED).await.expect("ingest request");
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.expect("ingest response body");
    Reply { status, headers, text }
}

// ---------------------------------------------------------------- relying parties

/// How an RP gets its SETs.
pub enum Inbox {
    Push(PushReceiver),
    /// RFC 8936: polled, each SET acknowledged at once; kept by jti (a
    /// redelivery of an unacknowledged SET is not a second SET).
    Poll {
        url: String,
        got: Mutex<Vec<(String, String)>>,
    },
}

/// A relying party with one stream.
pub struct Relying {
    pub name: String,
    pub rp: Rp,
    pub stream_id: String,
    inbox: Inbox,
}

impl Relying {
    /// A receiver with one stream requesting `events`; push or poll; granted
    /// every subject by the operator (`default_subjects: ALL`) when `all`.
    pub async fn new(hub: &Hub, name: &str, push: bool, events: &[&str], all: bool) -> Relying {
        Relying::bound(hub, name, push, events, json!({"all_subjects": all})).await
    }

    /// Like [`Relying::new`], the receiver registered with `binding` (the
    /// operator's `issuers` and `all_subjects` members).
    pub async fn bound(hub: &Hub, name: &str, push: bool, events: &[&str], binding: Value) -> Relying {
        let all = binding["all_subjects"] == true;
        let mut receiver = json!({"name": name, "audience": format!("https://{name}.example/")});
        for (member, value) in binding.as_object().into_iter().flatten() {
            receiver[member] = value.clone();
        }
        let rp = hub.receiver_with(receiver).await;
        let mut body = json!({"events_requested": events});
        let receiver = if push { Some(PushReceiver::accepting().await) } else { None };
        if let Some(receiver) = &receiver {
            body["delivery"] = json!({"method": PUSH, "endpoint_url": receiver.url});
        }
        let config = hub.create_stream(&rp, body).await;
        let stream_id = config["stream_id"].as_str().expect("stream_id").to_owned();
        if all {
            assert_eq!(config["default_subjects"], "ALL", "{config}");
        }
        let inbox = match receiver {
            Some(receiver) => Inbox::Push(receiver),
            None => {
                assert_eq!(config["delivery"]["method"], POLL);
                let url = config["delivery"]["endpoint_url"].as_str().expect("poll endpoint_url").to_owned();
                Inbox::Poll { url, got: Mutex::new(Vec::new()) }
            }
        };
        Relying { name: name.to_owned(), rp, stream_id, inbox }
    }

    /// The RP reports that session `id` reached it (SSF add-subject with a
    /// complex `session` subject).
    pub async fn add_subject(&self, hub: &Hub, id: &str) {
        self.add(hub, json!({"format": "complex", "session": session(id)})).await;
    }

    /// The RP reports session `id` with the user it knows is behind it.
    pub async fn add_subject_of(&self, hub: &Hub, id: &str, user: &Value) {
        self.add(hub, session_of(id, user)).await;
    }

    async fn add(&self, hub: &Hub, subject: Value) {
        let body = json!({"stream_id": self.stream_id, "subject": subject});
        hub.post(&hub.endpoint("add_subject_endpoint"), &self.rp.token, body).await.expect(200);
    }

    /// Every SET received so far (compact form); a poll RP polls once and
    /// acknowledges what it got.
    pub async fn received(&self, hub: &Hub) -> Vec<String> {
        match &self.inbox {
            Inbox::Push(receiver) => receiver.requests().into_iter().map(|request| request.body).collect(),
            Inbox::Poll { url, got } => {
                let response = hub.poll(&self.rp, url, json!({"returnImmediately": true, "maxEvents": 500})).await;
                let sets: Vec<(String, String)> = response["sets"]
                    .as_object()
                    .expect("sets")
                    .iter()
                    .map(|(jti, token)| (jti.clone(), token.as_str().expect("SET string").to_owned()))
                    .collect();
                if !sets.is_empty() {
                    let ack: Vec<&String> = sets.iter().map(|(jti, _)| jti).collect();
                    let body = json!({"ack": ack, "maxEvents": 0, "returnImmediately": true});
                    hub.poll(&self.rp, url, body).await;
                }
                let mut got = got.lock().expect("inbox lock");
                for (jti, token) in sets {
                    if !got.iter().any(|(seen, _)| *seen == jti) {
                        got.push((jti, token));
                    }
                }
                got.iter().map(|(_, token)| token.clone()).collect()
            }
        }
    }

    /// Waits until `count` SETs arrived, then watches for [`QUIET`] that no
    /// more come; returns them verified as this RP must verify them.
    pub async fn settle(&self, hub: &Hub, count: usize) -> Vec<SecurityEventToken> {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.received(hub).await;
            assert!(got.len() <= count, "{} got {} SETs, expected {count}: {:#?}", self.name, got.len(), claims(&got));
            if got.len() == count {
                break;
            }
            assert!(Instant::now() < deadline, "{} got {} of {count} SETs in {WAIT:?}", self.name, got.len());
            tokio::time::sleep(TICK).await;
        }
        let quiet = Instant::now() + QUIET;
        while Instant::now() < quiet {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let got = self.received(hub).await;
            assert_eq!(got.len(), count, "{} got more SETs than expected: {:#?}", self.name, claims(&got));
        }
        let got = self.received(hub).await;
        got.iter().map(|token| hub.verify_set(token, &self.rp)).collect()
    }
}

/// Payloads of compact SETs, for failure messages.
pub fn claims(tokens: &[String]) -> Vec<Value> {
    tokens
        .iter()
        .map(|token| {
            let payload = token.split('.').nth(1).unwrap_or_default();
            let bytes = URL_SAFE_NO_PAD.decode(payload).unwrap_or_default();
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        })
        .collect()
}

/// The session id a hub SET is about.
pub fn session_id(set: &SecurityEventToken) -> String {
    let session = set.sub_id.as_complex().and_then(|c| c.session.clone()).expect("sub_id has a session");
    match session {
        SubjectId::Opaque { id } => id,
        other => panic!("session is not opaque: {other:?}"),
    }
}

/// Asserts a hub session-revoked SET: `sub_id` complex `{session, user}`,
/// or `{session}` alone where the receiver never showed it knew the user
/// (the disclosure rule), and the cascade's `txn`.
#[track_caller]
pub fn assert_revoked_set(set: &SecurityEventToken, id: &str, user: Option<&Value>, txn: &str) {
    assert_eq!(set.event.type_uri(), SESSION_REVOKED, "{set:?}");
    let expected = match user {
        Some(user) => session_of(id, user),
        None => json!({"format": "complex", "session": session(id)}),
    };
    assert_eq!(set.sub_id.to_value(), expected, "sub_id of the revocation of {id}");
    assert_eq!(set.txn.as_deref(), Some(txn), "txn of the revocation of {id}");
}

/// (session id → jtis) of the SETs an RP got.
pub fn by_session(sets: &[SecurityEventToken]) -> BTreeMap<String, BTreeSet<String>> {
    let mut map: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for set in sets {
        map.entry(session_id(set)).or_default().insert(set.jti.clone());
    }
    map
}

pub fn ids(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

// ---------------------------------------------------------------- operator views

/// `GET /admin/sessions/{id}`; 200 expected.
pub async fn session_view(hub: &Hub, id: &str) -> Value {
    hub.admin(Method::GET, &format!("/admin/sessions/{id}"), Body::None).await.expect(200).json()
}

/// The `revoked` member of a session (None when absent or null).
pub async fn revoked(hub: &Hub, id: &str) -> Option<Value> {
    let view = session_view(hub, id).await;
    view["session"].get("revoked").filter(|r| !r.is_null()).cloned()
}

/// Waits (up to `WAIT`) for a session to be revoked, then checks by which
/// cascade. Embedded, a revocation is in effect when the IdP gets its 202;
/// on Kafka the 202 means it is logged, and a revocation continued in
/// another partition takes one more hop.
pub async fn assert_revoked_by(hub: &Hub, id: &str, txn: &str) {
    let deadline = Instant::now() + WAIT;
    let revocation = loop {
        if let Some(revocation) = revoked(hub, id).await {
            break revocation;
        }
        assert!(Instant::now() < deadline, "session {id} is not revoked");
        tokio::time::sleep(TICK).await;
    };
    assert_eq!(revocation["txn"], txn, "session {id} revoked by another cascade: {revocation}");
}

pub async fn assert_not_revoked(hub: &Hub, id: &str) {
    if let Some(revocation) = revoked(hub, id).await {
        panic!("session {id} was revoked: {revocation}");
    }
}

/// `GET /admin/cascades/{txn}`, waiting until it reports `total` leaves, all
/// acknowledged (complete).
pub async fn complete_cascade(hub: &Hub, txn: &str, total: u64) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let reply = hub.admin(Method::GET, &format!("/admin/cascades/{txn}"), Body::None).await;
        let report = if reply.status == 200 { reply.json() } else { Value::Null };
        if report["total"] == total && report["complete"] == true {
            return report;
        }
        assert!(Instant::now() < deadline, "cascade {txn} never completed with {total} leaves: {}", reply.text);
        tokio::time::sleep(TICK).await;
    }
}

/// Asserts the report's counters and latencies for a complete cascade, and
/// returns its leaves as (stream_id, session_id) → jti.
#[track_caller]
pub fn check_report(report: &Value, txn: &str, total: u64) -> BTreeMap<(String, String), String> {
    assert_eq!(report["txn"], txn, "{report:#}");
    assert_eq!(report["total"], total, "{report:#}");
    assert_eq!(report["delivered"], total, "{report:#}");
    assert_eq!(report["pending"], 0, "{report:#}");
    assert_eq!(report["failed"], 0, "{report:#}");
    assert_eq!(report["complete"], true, "{report:#}");
    assert!(report["started_at"].as_u64().is_some_and(|t| t > 0), "{report:#}");
    if total > 0 {
        for member in ["p50_ms", "p99_ms", "max_ms", "cascade_ms"] {
            assert!(report[member].is_u64(), "{member} missing: {report:#}");
        }
        assert!(report["p50_ms"].as_u64() <= report["p99_ms"].as_u64(), "{report:#}");
        assert!(report["p99_ms"].as_u64() <= report["max_ms"].as_u64(), "{report:#}");
    }
    let leaves = report["leaves"].as_array().expect("leaves");
    assert_eq!(leaves.len() as u64, total, "{report:#}");
    let mut pairs = BTreeMap::new();
    for leaf in leaves {
        assert_eq!(leaf["status"], "delivered", "{leaf}");
        assert!(leaf["latency_ms"].is_u64(), "leaf without latency: {leaf}");
        let key = (
            leaf["stream_id"].as_str().expect("stream_id").to_owned(),
            leaf["session_id"].as_str().expect("session_id").to_owned(),
        );
        let jti = leaf["jti"].as_str().expect("jti").to_owned();
        assert!(pairs.insert(key.clone(), jti).is_none(), "two leaves for {key:?}: {report:#}");
    }
    // The figures are those of the leaves listed (nearest rank), however
    // the hub keeps them.
    let mut latencies: Vec<u64> = leaves.iter().filter_map(|leaf| leaf["latency_ms"].as_u64()).collect();
    latencies.sort_unstable();
    let rank = |p: usize| latencies.get((latencies.len() * p).div_ceil(100).max(1) - 1).copied();
    if !latencies.is_empty() {
        assert_eq!(report["p50_ms"].as_u64(), rank(50), "p50 of {latencies:?}");
        assert_eq!(report["p99_ms"].as_u64(), rank(99), "p99 of {latencies:?}");
        assert_eq!(report["max_ms"].as_u64(), latencies.last().copied(), "max of {latencies:?}");
    }
    pairs
}

/// (stream, session) → jti of what the RPs received, asserting no pair got
/// two SETs and no jti was reused.
pub fn received_pairs(got: &[(&Relying, &[SecurityEventToken])]) -> BTreeMap<(String, String), String> {
    let mut pairs = BTreeMap::new();
    let mut jtis = BTreeSet::new();
    for (rp, sets) in got {
        for set in *sets {
            assert!(jtis.insert(set.jti.clone()), "jti {} received twice", set.jti);
            let key = (rp.stream_id.clone(), session_id(set));
            assert!(pairs.insert(key.clone(), set.jti.clone()).is_none(), "{} got two SETs about {}", rp.name, key.1);
        }
    }
    pairs
}

pub fn pairs_of(expected: &[(&Relying, &str)]) -> BTreeSet<(String, String)> {
    expected.iter().map(|(rp, id)| (rp.stream_id.clone(), (*id).to_owned())).collect()
}
