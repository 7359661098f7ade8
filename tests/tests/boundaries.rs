//! Trust boundaries, tried as an attacker would: a receiver that wants to
//! hear about sessions it never saw, or to learn who is behind a session id
//! it guessed; an IdP that wants to block or reach another IdP's sessions.
//! Each test drives a real hub over loopback with real receivers, on the
//! embedded default and in Kafka mode, and asserts the attempt fails.

#[macro_use]
mod support;

use std::collections::BTreeSet;
use std::time::Instant;

use caep_schemas::set::SecurityEventToken;
use reqwest::Method;
use serde_json::{Value, json};
use support::actors::*;
use support::{Body, Hub, HubOptions, SESSION_REVOKED, TICK, WAIT};

#[path = "boundaries/touches.rs"]
mod touches;
use touches::*;

const IDP_A: &str = "https://idp-a.example";
const IDP_M: &str = "https://idp-m.example";

/// `GET /admin/sessions/{id}?issuer=`; 200 expected.
async fn view_of(hub: &Hub, id: &str, issuer: &str) -> Value {
    let path = format!("/admin/sessions/{id}?issuer={}", urlencode(issuer));
    hub.admin(Method::GET, &path, Body::None).await.expect(200).json()
}

/// Waits (up to `WAIT`) until `issuer`'s session `id` is revoked by `txn`.
async fn assert_revoked_as(hub: &Hub, id: &str, issuer: &str, txn: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let view = view_of(hub, id, issuer).await;
        if !view["session"]["revoked"].is_null() {
            assert_eq!(view["session"]["revoked"]["txn"], txn, "{issuer}'s {id}: {view:#}");
            assert_eq!(view["session"]["issuer"], issuer);
            return;
        }
        assert!(Instant::now() < deadline, "{issuer}'s session {id} is not revoked: {view:#}");
        tokio::time::sleep(TICK).await;
    }
}

/// `GET /admin/cascades/{txn}?issuer=`, waiting until it is complete with `total` leaves.
async fn complete_cascade_of(hub: &Hub, txn: &str, issuer: &str, total: u64) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let path = format!("/admin/cascades/{txn}?issuer={}", urlencode(issuer));
        let reply = hub.admin(Method::GET, &path, Body::None).await;
        let report = if reply.status == 200 { reply.json() } else { Value::Null };
        if report["total"] == total && report["complete"] == true {
            assert_eq!(report["issuer"], issuer);
            return report;
        }
        assert!(Instant::now() < deadline, "{issuer}'s cascade {txn} never completed with {total}: {}", reply.text);
        tokio::time::sleep(TICK).await;
    }
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The `sub_id` of a hub SET that names the session alone.
fn session_only(id: &str) -> Value {
    json!({"format": "complex", "session": session(id)})
}

fn txns(sets: &[SecurityEventToken]) -> BTreeSet<String> {
    sets.iter().filter_map(|set| set.txn.clone()).collect()
}

// ---------------------------------------------------------------- probe 1: default_subjects ALL

/// A receiver cannot grant itself every subject: `default_subjects: ALL` in
/// its own create request is refused (400 `invalid_request`), its stream
/// hears nothing it did not touch, and the metadata says `NONE`. Only the
/// operator's grant makes an ALL stream, and only for its bound IdPs.
async fn a_receiver_cannot_grant_itself_every_subject(hub: Hub) {
    let idp = Idp::register(&hub, IDP_A).await;
    let other = Idp::register(&hub, IDP_M).await;
    assert_eq!(hub.metadata["default_subjects"], "NONE");
    let alice = email("alice@example.com");

    let attacker = hub.receiver("attacker").await;
    let asked = json!({"events_requested": [SESSION_REVOKED], "default_subjects": "ALL"});
    let refused = hub.post(&hub.endpoint("configuration_endpoint"), &attacker.token, asked).await.expect(400);
    assert_eq!(refused.json()["err"], "invalid_request", "{}", refused.text);
    let nosy = Relying::new(&hub, "nosy", false, &[SESSION_REVOKED], false).await;
    let reply = hub.get(&hub.stream_url(&nosy.stream_id), &nosy.rp.token).await.expect(200);
    assert!(reply.json().get("default_subjects").is_none_or(|v| v != "ALL"), "{}", reply.text);
    // The operator's grant, bound to IdP A only.
    let granted =
        Relying::bound(&hub, "granted", false, &[SESSION_REVOKED], json!({"all_subjects": true, "issuers": [IDP_A]}))
            .await;
    let reply = hub.get(&hub.stream_url(&granted.stream_id), &granted.rp.token).await.expect(200);
    assert_eq!(reply.json()["default_subjects"], "ALL", "{}", reply.text);

    idp.establish(&hub, "S", &alice, None).await;
    other.establish(&hub, "T", &alice, None).await;
    idp.send(&hub, &idp.set(session_of("S", &alice), SESSION_REVOKED, json!({})).with_txn("txn-S")).await;
    other.send(&hub, &other.set(session_of("T", &alice), SESSION_REVOKED, json!({})).with_txn("txn-T")).await;

    let sets = granted.settle(&hub, 1).await;
    assert_eq!(sets[0].sub_id.to_value(), session_of("S", &alice), "the grant covers A's sessions, not M's");
    nosy.settle(&hub, 0).await;
    complete_cascade_of(&hub, "txn-S", IDP_A, 1).await;
}

// ---------------------------------------------------------------- probe 2: a guessed session id

/// A receiver that names a revoked session it guessed learns that it is
/// revoked (it must stop honouring it) but not who is behind it; the user is
/// named only to a receiver that showed it knew (named the same user, or the
/// IdP presented the session to it).
async fn a_guessed_session_id_discloses_no_user(hub: Hub) {
    let idp = Idp::register(&hub, IDP_A).await;
    let alice = email("alice@example.com");
    idp.establish(&hub, "S", &alice, None).await;
    idp.send(&hub, &idp.set(session_of("S", &alice), SESSION_REVOKED, json!({})).with_txn("txn-S")).await;
    assert_revoked_as(&hub, "S", IDP_A, "txn-S").await;

    let guesser = Relying::new(&hub, "guesser", false, &[SESSION_REVOKED], false).await;
    let knower = Relying::new(&hub, "knower", true, &[SESSION_REVOKED], false).await;
    let wrong = Relying::new(&hub, "wrong", false, &[SESSION_REVOKED], false).await;
    let addressed = Relying::new(&hub, "addressed", true, &[SESSION_REVOKED], false).await;
    guesser.add_subject(&hub, "S").await;
    knower.add_subject_of(&hub, "S", &email("ALICE@example.com")).await;
    wrong.add_subject_of(&hub, "S", &email("mallory@example.com")).await;
    idp.presented(&hub, "S", &alice, &addressed.rp.audience).await;

    assert_eq!(guesser.settle(&hub, 1).await[0].sub_id.to_value(), session_only("S"));
    assert_eq!(knower.settle(&hub, 1).await[0].sub_id.to_value(), session_of("S", &alice));
    assert_eq!(wrong.settle(&hub, 1).await[0].sub_id.to_value(), session_only("S"), "a wrong guess learns nothing");
    assert_eq!(addressed.settle(&hub, 1).await[0].sub_id.to_value(), session_of("S", &alice));
    complete_cascade_of(&hub, "txn-S", IDP_A, 4).await;
}

// ---------------------------------------------------------------- probe 3: one IdP blocking another

/// IdP M revokes a session id before IdP A establishes it: A's establish and
/// revocation still work (202), A's receivers get exactly A's revocation,
/// and M's tombstone, children and cascade stay M's.
async fn an_idp_cannot_block_or_reach_another_idps_session(hub: Hub) {
    let a = Idp::register(&hub, IDP_A).await;
    let m = Idp::register(&hub, IDP_M).await;
    let alice = email("alice@example.com");
    let rp = Relying::bound(&hub, "rp", true, &[SESSION_REVOKED], json!({"issuers": [IDP_A]})).await;

    m.send(&hub, &m.set(session_of("S", &alice), SESSION_REVOKED, json!({})).with_txn("txn-M")).await;
    // M spawns a child under its own S: revoked at birth, in M's cascade.
    m.establish(&hub, "S-child", &alice, Some("S")).await;
    a.establish(&hub, "S", &alice, None).await;
    a.establish(&hub, "S1", &alice, Some("S")).await;
    rp.add_subject_of(&hub, "S1", &alice).await;
    rp.add_subject_of(&hub, "S", &alice).await;
    // Nothing of M's reaches A's receiver, and A's sessions are live.
    rp.settle(&hub, 0).await;
    assert!(view_of(&hub, "S", IDP_A).await["session"]["revoked"].is_null());
    assert_revoked_as(&hub, "S-child", IDP_M, "txn-M").await;

    a.send(&hub, &a.set(session_of("S", &alice), SESSION_REVOKED, json!({})).with_txn("txn-A")).await;
    let sets = rp.settle(&hub, 2).await;
    assert_eq!(txns(&sets), BTreeSet::from(["txn-A".to_owned()]));
    assert_revoked_as(&hub, "S", IDP_A, "txn-A").await;
    assert_revoked_as(&hub, "S1", IDP_A, "txn-A").await;
    assert_revoked_as(&hub, "S", IDP_M, "txn-M").await;
    let subtree = view_of(&hub, "S", IDP_A).await["subtree"].clone();
    let ids: BTreeSet<&str> =
        subtree.as_array().into_iter().flatten().filter_map(|s| s["session_id"].as_str()).collect();
    assert_eq!(ids, BTreeSet::from(["S", "S1"]), "M's child is not in A's tree: {subtree:#}");
    complete_cascade_of(&hub, "txn-A", IDP_A, 2).await;
}

// ---------------------------------------------------------------- same session id, same txn

/// Two IdPs using one session id and one `txn`: each revocation is its own
/// cascade, reaching exactly the receivers bound to its IdP.
async fn two_idps_with_one_session_id_and_one_txn_get_their_own_cascades(hub: Hub) {
    let a = Idp::register(&hub, IDP_A).await;
    let m = Idp::register(&hub, IDP_M).await;
    let (alice, mallory) = (email("alice@example.com"), email("mallory@example.com"));
    a.establish(&hub, "S", &alice, None).await;
    m.establish(&hub, "S", &mallory, None).await;
    let only_a = Relying::bound(&hub, "only-a", true, &[SESSION_REVOKED], json!({"issuers": [IDP_A]})).await;
    let only_m = Relying::bound(&hub, "only-m", false, &[SESSION_REVOKED], json!({"issuers": [IDP_M]})).await;
    let both = Relying::new(&hub, "both", false, &[SESSION_REVOKED], false).await;
    for rp in [&only_a, &only_m, &both] {
        rp.add_subject(&hub, "S").await;
    }
    // A txn shaped like the hub's old "txn~tag" keys, for good measure.
    let txn = "shared-txn~00000000";
    a.send(&hub, &a.set(session_of("S", &alice), SESSION_REVOKED, json!({})).with_txn(txn)).await;
    m.send(&hub, &m.set(session_of("S", &mallory), SESSION_REVOKED, json!({})).with_txn(txn)).await;

    assert_eq!(only_a.settle(&hub, 1).await.len(), 1);
    assert_eq!(only_m.settle(&hub, 1).await.len(), 1);
    assert_eq!(both.settle(&hub, 2).await.len(), 2, "one revocation from each IdP");
    let report_a = complete_cascade_of(&hub, txn, IDP_A, 2).await;
    let report_m = complete_cascade_of(&hub, txn, IDP_M, 2).await;
    let streams = |report: &Value| -> BTreeSet<String> {
        report["leaves"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["stream_id"].as_str().map(str::to_owned))
            .collect()
    };
    assert_eq!(streams(&report_a), BTreeSet::from([only_a.stream_id.clone(), both.stream_id.clone()]));
    assert_eq!(streams(&report_m), BTreeSet::from([only_m.stream_id.clone(), both.stream_id.clone()]));
    // Without ?issuer= the operator is told to choose.
    hub.admin(Method::GET, &format!("/admin/cascades/{txn}"), Body::None).await.expect(400);
    hub.admin(Method::GET, "/admin/sessions/S", Body::None).await.expect(400);
}

// ---------------------------------------------------------------- receivers bound to IdPs

/// A receiver bound to IdP A touching a session id that only IdP M uses,
/// or addressed by M, hears nothing of M's session; its touch waits for A to
/// name the session, and then counts.
async fn a_receiver_hears_nothing_of_an_idp_it_is_not_bound_to(hub: Hub) {
    let a = Idp::register(&hub, IDP_A).await;
    let m = Idp::register(&hub, IDP_M).await;
    let alice = email("alice@example.com");
    let rp = Relying::bound(&hub, "rp", true, &[SESSION_REVOKED], json!({"issuers": [IDP_A]})).await;

    m.establish(&hub, "S", &alice, None).await;
    m.presented(&hub, "S", &alice, &rp.rp.audience).await;
    rp.add_subject(&hub, "S").await;
    m.send(&hub, &m.set(session_of("S", &alice), SESSION_REVOKED, json!({})).with_txn("txn-M")).await;
    assert_revoked_as(&hub, "S", IDP_M, "txn-M").await;
    rp.settle(&hub, 0).await;
    assert_eq!(view_of(&hub, "S", IDP_M).await["touches"], json!([]), "M's session was never touched by rp");

    // A names S after rp's touch: the touch counts for A's S.
    a.establish(&hub, "S", &alice, None).await;
    a.send(&hub, &a.set(session_of("S", &alice), SESSION_REVOKED, json!({})).with_txn("txn-A")).await;
    let sets = rp.settle(&hub, 1).await;
    assert_eq!(sets[0].txn.as_deref(), Some("txn-A"));
    assert_eq!(sets[0].sub_id.to_value(), session_only("S"));
    complete_cascade_of(&hub, "txn-A", IDP_A, 1).await;
}

// ---------------------------------------------------------------- untrusting an IdP

/// `DELETE /admin/issuers/{issuer}`: the IdP's SETs are refused from then on
/// (400 `invalid_issuer`), and the cascade it caused before completes.
async fn an_untrusted_idp_is_refused_and_its_cascades_complete(hub: Hub) {
    let idp = Idp::register(&hub, IDP_A).await;
    let alice = email("alice@example.com");
    // Slow to acknowledge: the cascade is still delivering when the IdP goes.
    let rp = Relying::new(&hub, "rp", false, &[SESSION_REVOKED], false).await;
    idp.establish(&hub, "S", &alice, None).await;
    rp.add_subject(&hub, "S").await;
    idp.send(&hub, &idp.set(session_of("S", &alice), SESSION_REVOKED, json!({})).with_txn("txn-S")).await;

    let path = format!("/admin/issuers/{}", urlencode(IDP_A));
    hub.admin(Method::DELETE, &path, Body::None).await.expect(204);
    hub.admin(Method::DELETE, &path, Body::None).await.expect(404);
    let late = idp.sign(&idp.set(session_of("S2", &alice), SESSION_REVOKED, json!({})));
    let refused = ingest(&hub, &late).await.expect(400);
    assert_eq!(refused.json()["err"], "invalid_issuer", "{}", refused.text);

    assert_eq!(rp.settle(&hub, 1).await[0].txn.as_deref(), Some("txn-S"));
    complete_cascade_of(&hub, "txn-S", IDP_A, 1).await;
}

// ---------------------------------------------------------------- strangers cost nothing

/// `/healthz`'s count of read barriers (Kafka mode; `None` embedded).
async fn read_barriers(hub: &Hub) -> Option<u64> {
    let health: Value =
        hub.http.get(format!("{}/healthz", hub.issuer)).send().await.expect("healthz").json().await.expect("JSON");
    health["kafka"]["read_barriers"].as_u64()
}

/// Requests with forged credentials (a receiver token, the admin token, an
/// unknown IdP's SET) are refused from local state: in Kafka mode none of
/// them makes the hub wait for the shared log (a broker round trip), while
/// an authenticated request does.
async fn strangers_are_refused_before_any_work(hub: Hub) {
    let before = read_barriers(&hub).await;
    let stranger = Idp::unregistered(&hub);
    let alice = email("alice@example.com");
    for _ in 0..10 {
        hub.get(&hub.endpoint("configuration_endpoint"), "ssf_forged-token").await.expect(401);
        hub.send(Method::GET, &format!("{}/admin/streams", hub.issuer), Some("forged-admin"), Body::None)
            .await
            .expect(401);
        let refused =
            ingest(&hub, &stranger.sign(&stranger.set(session_of("S", &alice), SESSION_REVOKED, json!({})))).await;
        assert_eq!(refused.expect(400).json()["err"], "invalid_issuer");
    }
    assert_eq!(read_barriers(&hub).await, before, "forged requests waited for the shared log");

    let rp = hub.receiver("known").await;
    let known = read_barriers(&hub).await;
    hub.get(&hub.endpoint("configuration_endpoint"), &rp.token).await.expect(200);
    if let Some(known) = known {
        assert!(read_barriers(&hub).await > Some(known), "an authenticated read waits for the shared log");
    }
}

/// Touches are the hot path (one per agent session and RP): in Kafka mode a
/// touch on a stream this instance knows, bound to the IdPs it hears from,
/// is answered from its replica without waiting for the shared log. A touch
/// it cannot answer alone waits first: a stream it does not know (perhaps
/// created at another instance an instant ago), or an unbound stream (whose
/// touch is recorded under every trusted IdP, one of which may have been
/// trusted elsewhere an instant ago). The same answers on both backends.
async fn touches_wait_for_the_shared_log_only_when_the_replica_may_be_behind(hub: Hub) {
    Idp::register(&hub, IDP_A).await;
    let bound =
        hub.receiver_with(json!({"name": "bound", "audience": "https://bound.example/", "issuers": [IDP_A]})).await;
    let bound_stream = hub.push_stream(&bound, "http://127.0.0.1:9/events", None).await;
    let unbound = hub.receiver("unbound").await;
    let unbound_stream = hub.push_stream(&unbound, "http://127.0.0.1:9/events", None).await;
    let subject = |session: &str| json!({"format": "complex", "session": {"format": "opaque", "id": session}});
    let touch = |stream_id: &str, session: &str| json!({"stream_id": stream_id, "subject": subject(session)});
    let add = hub.endpoint("add_subject_endpoint");

    let before = read_barriers(&hub).await;
    for i in 0..5 {
        hub.post(&add, &bound.token, touch(&bound_stream, &format!("s{i}"))).await.expect(200);
    }
    let many = json!({"stream_id": bound_stream, "subjects": [subject("m1"), subject("m2")]});
    hub.post(&hub.endpoint("add_subjects_endpoint"), &bound.token, many).await.expect(200);
    assert_eq!(read_barriers(&hub).await, before, "a touch on a known, bound stream waited for the shared log");

    let before = read_barriers(&hub).await;
    hub.post(&add, &bound.token, touch("no-such-stream", "s0")).await.expect(404);
    assert_barriers_grew_by_one(&hub, before, "a touch on an unknown stream").await;
    let before = read_barriers(&hub).await;
    hub.post(&add, &unbound.token, touch(&unbound_stream, "s0")).await.expect(200);
    assert_barriers_grew_by_one(&hub, before, "a touch on an unbound stream").await;
    // Known and bound, but another receiver's: refused from local state.
    hub.post(&add, &unbound.token, touch(&bound_stream, "s0")).await.expect(404);
}

/// In Kafka mode, `what` waited for the shared log exactly once since `before`.
async fn assert_barriers_grew_by_one(hub: &Hub, before: Option<u64>, what: &str) {
    if let Some(before) = before {
        assert_eq!(read_barriers(hub).await, Some(before + 1), "{what} did not wait for the shared log once");
    }
}

// ---------------------------------------------------------------- secrets at rest

/// Every file under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() { files.extend(files_under(&path)) } else { files.push(path) }
    }
    files
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

/// A push stream's `authorization_header` is used on every push (after an
/// update too), but neither the database files nor (in Kafka mode) the
/// shared log ever hold it in clear.
async fn push_credentials_are_sealed_at_rest_and_in_the_log(hub: Hub) {
    let rp = hub.receiver("sealed").await;
    let receiver = support::PushReceiver::accepting().await;
    let first = "Bearer first-s3cret-5a9c1e";
    let stream_id = hub.push_stream(&rp, &receiver.url, Some(first)).await;
    hub.verify(&rp, &stream_id, "one").await;
    receiver.wait_for(1).await;
    let second = "Bearer second-s3cret-77b2d4";
    let body = json!({"stream_id": stream_id, "delivery": {"method": support::PUSH, "endpoint_url": receiver.url, "authorization_header": second}});
    hub.patch(&hub.endpoint("configuration_endpoint"), &rp.token, body).await.expect(200);
    hub.verify(&rp, &stream_id, "two").await;
    let pushed = receiver.wait_for(2).await;
    assert_eq!(pushed[0].header("authorization"), Some(first));
    assert_eq!(pushed[1].header("authorization"), Some(second));

    let files = files_under(hub.data_dir());
    assert!(files.iter().any(|f| f.extension().is_some_and(|e| e == "redb")), "{files:?}");
    for file in files {
        let bytes = std::fs::read(&file).expect("readable");
        for secret in [first, second] {
            assert!(!contains(&bytes, secret.as_bytes()), "{} holds a credential in clear", file.display());
        }
    }
    if let Some(records) = hub.kafka_payloads("shared") {
        assert!(records.iter().any(|r| contains(r, stream_id.as_bytes())), "the stream travelled through the log");
        for record in records {
            for secret in [first, second] {
                assert!(!contains(&record, secret.as_bytes()), "the shared log carries a credential in clear");
            }
        }
    }
}

// ---------------------------------------------------------------- hostile bodies

/// Oversized and deeply nested bodies at every door (IdP ingest, stream
/// management, subjects, poll, admin) get a 4xx, never a 5xx or a crash,
/// and the hub serves on.
async fn oversized_and_deeply_nested_bodies_are_refused_cleanly(hub: Hub) {
    let idp = Idp::register(&hub, IDP_A).await;
    let rp = hub.receiver("hostile").await;
    let (stream_id, poll_url) = hub.poll_stream(&rp).await;
    let huge = "x".repeat(200 * 1024);
    let nested = format!("{}{}", "[".repeat(50_000), "]".repeat(50_000));
    let nested_subject = {
        let mut subject = json!({"format": "opaque", "id": "s"});
        for _ in 0..1000 {
            subject = json!({"format": "complex", "session": subject});
        }
        subject
    };
    let management = [
        hub.endpoint("configuration_endpoint"),
        hub.endpoint("add_subject_endpoint"),
        hub.endpoint("status_endpoint"),
        hub.endpoint("verification_endpoint"),
        poll_url.clone(),
    ];
    for url in &management {
        for body in [&huge, &nested] {
            let reply = hub.send(Method::POST, url, Some(&rp.token), Body::Raw(body)).await;
            assert!(
                reply.status.is_client_error(),
                "{url}: {} {}",
                reply.status,
                &reply.text[..reply.text.len().min(200)]
            );
        }
    }
    let deep = json!({"stream_id": stream_id, "subject": nested_subject});
    let reply = hub.post(&hub.endpoint("add_subject_endpoint"), &rp.token, deep).await;
    assert!(reply.status.is_client_error(), "nested subject: {} {}", reply.status, reply.text);
    for path in ["/admin/receivers", "/admin/issuers"] {
        for body in [&huge, &nested] {
            let reply = hub.admin(Method::POST, path, Body::Raw(body)).await;
            assert!(reply.status.is_client_error(), "{path}: {}", reply.status);
        }
    }
    // IdP ingest: a huge body, and a signed SET whose claims nest deeply.
    let reply = ingest(&hub, &huge).await;
    assert!(reply.status.is_client_error(), "huge SET: {}", reply.status);
    let mut claims = idp.set(session_of("S", &email("a@x")), SESSION_REVOKED, json!({})).to_claims();
    let deep_value = (0..1000).fold(json!(1), |inner, _| json!([inner]));
    claims.insert("deep".into(), deep_value);
    let deep_set = idp.key.sign(caep_schemas::set::SET_TYP, &claims).expect("sign");
    assert!(ingest(&hub, &deep_set).await.status.is_client_error());

    hub.get(&hub.stream_url(&stream_id), &rp.token).await.expect(200);
    let health = hub.http.get(format!("{}/healthz", hub.issuer)).send().await.expect("healthz");
    assert_eq!(health.status(), 200);
}

// ---------------------------------------------------------------- trust anchors

/// A server on loopback answering every GET with a redirect to `to`; its
/// URL, and how many requests it got.
async fn redirecting_server(to: &'static str) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let asked = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&asked);
    let app = axum::Router::new().fallback(move || {
        counter.fetch_add(1, Ordering::SeqCst);
        async move { axum::response::Redirect::temporary(to) }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/jwks.json"), asked)
}

/// A `jwks_uri` must be https and public: plain http, private and metadata
/// addresses are refused before anything is fetched, and a key URL that
/// redirects (here to an internal address) is not followed.
async fn jwks_uris_must_be_https_public_and_not_redirect(hub: Hub) {
    let register = |uri: &str| json!({"issuer": "https://anchored.example", "jwks_uri": uri});
    for (uri, why) in [
        // No request leaves the machine: each is refused before any fetch.
        ("http://93.184.215.14/jwks.json", "https"),
        ("https://10.0.0.1/jwks.json", "private"),
        ("https://169.254.169.254/latest/meta-data", "link-local"),
        ("https://[::ffff:192.168.1.1]/jwks.json", "private"),
        ("file:///etc/passwd", "scheme"),
    ] {
        let reply = hub.admin(Method::POST, "/admin/issuers", Body::Json(register(uri))).await.expect(400);
        assert!(reply.text.contains(why), "{uri}: {}", reply.text);
    }
    // The test hub allows loopback (its local-trial allowlist): a key URL
    // there that redirects elsewhere is not followed.
    let (url, asked) = redirecting_server("http://10.0.0.1/jwks.json").await;
    let reply = hub.admin(Method::POST, "/admin/issuers", Body::Json(register(&url))).await.expect(400);
    assert!(reply.text.contains("keys"), "{}", reply.text);
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1, "one request, no redirect followed");
    hub.admin(Method::GET, "/admin/issuers", Body::None).await.expect(200);
}

// ---------------------------------------------------------------- one txn, many events

/// An IdP reusing one `txn` for ever more different events is refused past
/// the cap, so no cascade record grows without bound; an event the cascade
/// already carries is still accepted. (Embedded: in Kafka mode the IdP's 202
/// means "logged", and the partition drops the event past the cap.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_an_idp_cannot_grow_one_cascade_without_bound() {
    let hub = Hub::start().await;
    let idp = Idp::register(&hub, IDP_A).await;
    let alice = email("alice@example.com");
    idp.establish(&hub, "S", &alice, None).await;
    let change =
        |n: usize| json!({"credential_type": "password", "change_type": "update", "friendly_name": format!("key {n}")});
    let send = |n: usize| {
        idp.sign(&idp.set(session_of("S", &alice), support::CREDENTIAL_CHANGE, change(n)).with_txn("one-txn"))
    };
    for n in 0..caep_hub::effects::MAX_EVENTS_PER_CASCADE {
        ingest(&hub, &send(n)).await.expect(202);
    }
    let refused = ingest(&hub, &send(999)).await.expect(400);
    assert_eq!(refused.json()["err"], "invalid_request", "{}", refused.text);
    ingest(&hub, &send(0)).await.expect(202);
}

// ---------------------------------------------------------------- floods

/// A receiver flooding management calls gets 429 with `Retry-After`, and one
/// holding too many long polls gets 429 for the next; another receiver is
/// served throughout, and a long poll sees its stream paused mid-wait.
async fn a_flooding_receiver_is_throttled_and_others_are_served(kafka: bool) {
    let options = HubOptions {
        kafka,
        receiver_calls_per_sec: 10,
        max_long_polls_per_receiver: 2,
        long_poll_secs: 3,
        ..HubOptions::default()
    };
    let hub = std::sync::Arc::new(Hub::start_with(options).await);
    let flooder = hub.receiver("flooder").await;
    let bystander = hub.receiver("bystander").await;
    let (stream_id, poll_url) = hub.poll_stream(&flooder).await;
    let (other_stream, other_poll_url) = hub.poll_stream(&bystander).await;

    let mut refused = 0;
    for _ in 0..60 {
        let reply = hub.get(&hub.stream_url(&stream_id), &flooder.token).await;
        if reply.status == 429 {
            assert!(reply.header("retry-after").and_then(|v| v.parse::<u64>().ok()).is_some_and(|s| s >= 1));
            assert_eq!(reply.json()["err"], "too_many_requests", "{}", reply.text);
            refused += 1;
        } else {
            assert_eq!(reply.status, 200, "{}", reply.text);
        }
    }
    assert!(refused >= 20, "a burst of twice the rate, then 429: {refused} refused of 60");
    hub.get(&hub.stream_url(&other_stream), &bystander.token).await.expect(200);

    // The flooder's rate refills; then two long polls are all it may hold.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let mut polls = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let (hub, token, url) = (std::sync::Arc::clone(&hub), flooder.token.clone(), poll_url.clone());
        polls.spawn(async move { hub.post(&url, &token, json!({"maxEvents": 5})).await.status });
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    hub.post(&poll_url, &flooder.token, json!({"maxEvents": 5})).await.expect(429);
    // The bystander's long poll is not affected, and answers at once when
    // its stream is paused while it waits.
    let waiting = {
        let (hub, token, url) = (std::sync::Arc::clone(&hub), bystander.token.clone(), other_poll_url.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let reply = hub.post(&url, &token, json!({"maxEvents": 5})).await.expect(200);
            (started.elapsed(), reply.json())
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    hub.set_status(&bystander, &other_stream, "paused").await;
    let (took, answer) = waiting.await.expect("bystander's poll");
    assert_eq!(answer["sets"], json!({}), "{answer}");
    assert!(took < std::time::Duration::from_secs(2), "the paused stream's poll waited {took:?}");
    while let Some(status) = polls.join_next().await {
        assert_eq!(status.expect("poll task"), 200);
    }
    hub.post(&poll_url, &flooder.token, json!({"maxEvents": 5, "returnImmediately": true})).await.expect(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_flooding_receiver_is_throttled_and_others_are_served() {
    a_flooding_receiver_is_throttled_and_others_are_served(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_a_flooding_receiver_is_throttled_and_others_are_served() {
    a_flooding_receiver_is_throttled_and_others_are_served(true).await;
}

// ---------------------------------------------------------------- both backends

on_every_backend!(
    a_receiver_cannot_grant_itself_every_subject,
    a_guessed_session_id_discloses_no_user,
    an_idp_cannot_block_or_reach_another_idps_session,
    two_idps_with_one_session_id_and_one_txn_get_their_own_cascades,
    a_receiver_hears_nothing_of_an_idp_it_is_not_bound_to,
    an_untrusted_idp_is_refused_and_its_cascades_complete,
    strangers_are_refused_before_any_work,
    touches_wait_for_the_shared_log_only_when_the_replica_may_be_behind,
    push_credentials_are_sealed_at_rest_and_in_the_log,
    oversized_and_deeply_nested_bodies_are_refused_cleanly,
    jwks_uris_must_be_https_public_and_not_redirect,
    a_receiver_cannot_park_kilobytes_in_one_touch,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "known gap (ARCHITECTURE.md): a full pending-touch quota tells whether a guessed session id exists"]
async fn embedded_the_pending_cap_does_not_tell_which_ids_exist() {
    the_pending_cap_does_not_tell_which_ids_exist(Hub::start().await).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_stream_at_its_cap_is_refused_not_silently_dropped() {
    a_stream_at_its_cap_is_refused_not_silently_dropped(Hub::start().await).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "known gap (ARCHITECTURE.md): in Kafka mode a touch past the pending cap is answered 200 and dropped"]
async fn kafka_a_stream_at_its_cap_is_refused_not_silently_dropped() {
    a_stream_at_its_cap_is_refused_not_silently_dropped(Hub::start_on_kafka().await).await
}
