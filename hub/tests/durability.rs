//! `kill -9` of a running hub mid-delivery loses nothing: every SET whose
//! request was answered is delivered after a restart, with its own `jti`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use caep_schemas::event::Event;
use caep_schemas::jose::Jwks;
use caep_schemas::set::{Expectations, SecurityEventToken};
use serde_json::{Value, json};

use support::BIN;
const ADMIN: &str = "durability-admin";

fn spawn_hub(data_dir: &Path, port: u16) -> Child {
    Command::new(BIN)
        .arg("serve")
        .env("CAEP_HUB_DATA_DIR", data_dir)
        .env("CAEP_HUB_LISTEN", format!("127.0.0.1:{port}"))
        .env("CAEP_HUB_ADMIN_TOKEN", ADMIN)
        .env("CAEP_HUB_PUSH_ALLOW_CIDRS", "127.0.0.0/8")
        .env("CAEP_HUB_MIN_VERIFICATION_INTERVAL_SECS", "0")
        .env_remove("CAEP_HUB_SIGNING_ALG")
        .env_remove("CAEP_HUB_CONFIG")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn caep-hub")
}

async fn wait_healthy(client: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if client.get(format!("{base}/healthz")).send().await.is_ok_and(|r| r.status().is_success()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("hub not healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_delivery_then_restart_delivers_every_set() {
    const SETS: usize = 120;
    let dir = tempfile::tempdir().expect("temp dir");
    let port = support::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let mut hub = spawn_hub(dir.path(), port);
    wait_healthy(&client, &base).await;

    let (push_url, received) = support::recording_webhook(Duration::from_millis(150)).await;
    let credential = "Bearer rp-credential-kept-sealed";
    let stream = json!({"delivery": {"method": "urn:ietf:rfc:8935", "endpoint_url": push_url,
                                     "authorization_header": credential}});
    let (token, stream_id) =
        support::push_receiver(&client, &base, ADMIN, "slow RP", "https://slow.example", stream).await;

    // Each 204 means the verification SET is durably in the outbox.
    for state in 0..SETS {
        let response = client
            .post(format!("{base}/ssf/verify"))
            .bearer_auth(&token)
            .json(&json!({"stream_id": stream_id, "state": format!("state-{state}")}))
            .send()
            .await
            .expect("verify");
        assert_eq!(response.status(), 204);
    }
    // Kill once some, but not all, have been delivered.
    let deadline = Instant::now() + Duration::from_secs(20);
    while received.lock().expect("lock").len() < 10 {
        assert!(Instant::now() < deadline, "nothing delivered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    hub.kill().expect("SIGKILL");
    hub.wait().expect("reaped");
    let before_restart = received.lock().expect("lock").len();
    assert!(before_restart < SETS, "all {SETS} delivered before the kill; the test proves nothing");

    let mut hub = spawn_hub(dir.path(), port);
    wait_healthy(&client, &base).await;
    // The credential, sealed at rest with the key file, opens after the restart.
    let config: Value = client
        .get(format!("{base}/ssf/streams?stream_id={stream_id}"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("read stream")
        .json()
        .await
        .expect("json");
    assert_eq!(config["delivery"]["authorization_header"], credential, "{config}");
    let jwks_text = client.get(format!("{base}/ssf/jwks.json")).send().await.expect("jwks").text().await.expect("text");
    let jwks = Jwks::from_json(&jwks_text).expect("jwks parses");

    let deadline = Instant::now() + Duration::from_secs(60);
    let states = loop {
        let states = verified_states(&received.lock().expect("lock"), &jwks, &base);
        if states.len() == SETS || Instant::now() > deadline {
            break states;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = hub.kill();
    let _ = hub.wait();
    let expected: BTreeSet<String> = (0..SETS).map(|i| format!("state-{i}")).collect();
    let got: BTreeSet<String> = states.keys().cloned().collect();
    assert_eq!(got, expected, "lost SETs across kill -9 (delivered before the kill: {before_restart})");
    for (state, jtis) in &states {
        assert_eq!(jtis.len(), 1, "{state}: a redelivery must keep its jti, got {jtis:?}");
    }
}

/// state → the distinct jtis it arrived with, for SETs that verify.
fn verified_states(bodies: &[String], jwks: &Jwks, issuer: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut states: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for body in bodies {
        let set = SecurityEventToken::verify(body, jwks, &Expectations::new(issuer, "https://slow.example"))
            .expect("every delivered SET verifies");
        let Event::Verification(verification) = &set.event else { panic!("unexpected event {:?}", set.event) };
        let state = verification.state.clone().expect("state echoed");
        states.entry(state).or_default().insert(set.jti);
    }
    states
}

/// Posts a signed IdP SET to `/ingest` and expects 202.
async fn ingest(client: &reqwest::Client, base: &str, key: &caep_schemas::jose::SigningKey, set: SecurityEventToken) {
    let token = set.sign(key).expect("sign");
    let response = client
        .post(format!("{base}/ingest"))
        .header("content-type", "application/secevent+jwt")
        .body(token)
        .send()
        .await
        .expect("ingest");
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap_or_default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_cascade_then_restart_delivers_every_leaf() {
    use caep_schemas::event::{SessionEstablished, SessionRevoked};
    use caep_schemas::jose::{Algorithm, SigningKey};
    use caep_schemas::subject::SubjectId;
    const IDP: &str = "https://idp.durability.example";
    const SESSIONS: usize = 60;

    let dir = tempfile::tempdir().expect("temp dir");
    let port = support::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let mut hub = spawn_hub(dir.path(), port);
    wait_healthy(&client, &base).await;

    let idp_key = SigningKey::generate(Algorithm::Es256).expect("key");
    let jwks = Jwks::from_keys([&idp_key]).to_json();
    let registered = client
        .post(format!("{base}/admin/issuers"))
        .bearer_auth(ADMIN)
        .json(&json!({"issuer": IDP, "jwks": jwks}))
        .send()
        .await
        .expect("issuer");
    assert_eq!(registered.status(), 201);

    // Two slow receivers, each touching every session of the tree.
    let mut receivers = Vec::new();
    for name in ["a", "b"] {
        let (push_url, received) = support::recording_webhook(Duration::from_millis(150)).await;
        let audience = format!("https://{name}.durability.example");
        let body = json!({"delivery": {"method": "urn:ietf:rfc:8935", "endpoint_url": push_url},
            "events_requested": ["https://schemas.openid.net/secevent/caep/event-type/session-revoked"]});
        let (token, stream_id) = support::push_receiver(&client, &base, ADMIN, name, &audience, body).await;
        receivers.push((audience, token, stream_id, received));
    }
    let user = SubjectId::email("owner@durability.example");
    for i in 0..SESSIONS {
        let id = format!("s{i}");
        let parent = (i > 0).then(|| SubjectId::opaque(format!("s{}", (i - 1) / 3)));
        let event = Event::SessionEstablished(SessionEstablished { parent_session: parent, ..Default::default() });
        let subject = SubjectId::session_of(SubjectId::opaque(&id), Some(user.clone()));
        ingest(&client, &base, &idp_key, SecurityEventToken::new(IDP, base.as_str(), subject, event)).await;
        for (_, token, stream_id, _) in &receivers {
            let touch = json!({"stream_id": stream_id, "subject": {"format": "complex", "session": {"format": "opaque", "id": id}}});
            let response = client
                .post(format!("{base}/ssf/subjects/add"))
                .bearer_auth(token)
                .json(&touch)
                .send()
                .await
                .expect("touch");
            assert_eq!(response.status(), 200);
        }
    }

    let revoke = SecurityEventToken::new(
        IDP,
        base.as_str(),
        SubjectId::session_of(SubjectId::opaque("s0"), None),
        Event::SessionRevoked(SessionRevoked::default()),
    )
    .with_txn("cascade-under-fire");
    ingest(&client, &base, &idp_key, revoke).await;
    let delivered = || receivers.iter().map(|(_, _, _, r)| r.lock().expect("lock").len()).sum::<usize>();
    let deadline = Instant::now() + Duration::from_secs(20);
    while delivered() < 10 {
        assert!(Instant::now() < deadline, "nothing delivered");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    hub.kill().expect("SIGKILL");
    hub.wait().expect("reaped");
    let before = delivered();
    assert!(before < 2 * SESSIONS, "the cascade finished before the kill; the test proves nothing");

    let mut hub = spawn_hub(dir.path(), port);
    wait_healthy(&client, &base).await;
    let jwks_text = client.get(format!("{base}/ssf/jwks.json")).send().await.expect("jwks").text().await.expect("text");
    let hub_jwks = Jwks::from_json(&jwks_text).expect("jwks");
    let expected: BTreeSet<String> = (0..SESSIONS).map(|i| format!("s{i}")).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut outcome = Vec::new();
    loop {
        outcome.clear();
        for (audience, _, _, received) in &receivers {
            let mut sessions = BTreeSet::new();
            for body in received.lock().expect("lock").iter() {
                let set = SecurityEventToken::verify(body, &hub_jwks, &Expectations::new(&base, audience))
                    .expect("every delivered SET verifies");
                assert_eq!(set.txn.as_deref(), Some("cascade-under-fire"));
                let session = set.sub_id.as_complex().and_then(|c| c.session.clone()).expect("session member");
                sessions.insert(match session {
                    SubjectId::Opaque { id } => id,
                    other => panic!("unexpected session subject {other:?}"),
                });
            }
            outcome.push(sessions);
        }
        if outcome.iter().all(|sessions| *sessions == expected) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every leaf's outcome is recorded with its SET's removal from the
    // outbox, so the report completes even across the kill.
    let deadline = Instant::now() + Duration::from_secs(20);
    let report = loop {
        let report: Value = client
            .get(format!("{base}/admin/cascades/cascade-under-fire"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .expect("report")
            .json()
            .await
            .expect("json");
        if report["complete"] == true || Instant::now() > deadline {
            break report;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = hub.kill();
    let _ = hub.wait();
    for sessions in &outcome {
        assert_eq!(sessions, &expected, "a leaf was lost across kill -9 (delivered before the kill: {before})");
    }
    assert_eq!(report["total"], 2 * SESSIONS as u64, "{report}");
    assert_eq!(report["complete"], true, "{report}");
    assert_eq!(report["delivered"], report["total"], "{report}");
}
