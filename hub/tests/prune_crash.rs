//! `kill -9` while the pruning job works through expired sessions and a
//! cascade is being delivered: after a restart nothing is lost (every leaf
//! arrives, naming the user its receiver knew, so the revoked sessions were
//! not pruned before their leaves were signed), nothing is corrupt (the
//! database opens and pruning goes on), and the expired sessions still go.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use caep_schemas::event::{Event, SessionEstablished, SessionRevoked};
use caep_schemas::jose::{Algorithm, Jwks, SigningKey};
use caep_schemas::set::{Expectations, SecurityEventToken};
use caep_schemas::subject::SubjectId;
use serde_json::{Value, json};
use support::HubProcess;
use tokio::task::JoinSet;

const ADMIN: &str = "prune-crash-admin";
const IDP: &str = "https://idp.prune.example";
const AUDIENCE: &str = "https://rp.prune.example";
const FILLERS: usize = 1500;
const TREE: usize = 60;

fn envs() -> Vec<(&'static str, String)> {
    vec![
        ("CAEP_HUB_ADMIN_TOKEN", ADMIN.into()),
        ("CAEP_HUB_PUSH_ALLOW_CIDRS", "127.0.0.0/8".into()),
        ("CAEP_HUB_SESSION_IDLE_TTL_SECS", "5".into()),
        ("CAEP_HUB_REVOKED_RETENTION_SECS", "1".into()),
        ("CAEP_HUB_CASCADE_RETENTION_SECS", "120".into()),
        ("CAEP_HUB_PRUNE_INTERVAL_SECS", "1".into()),
    ]
}

async fn ingest(client: &reqwest::Client, base: &str, key: &SigningKey, set: SecurityEventToken) {
    let response = client
        .post(format!("{base}/ingest"))
        .header("content-type", "application/secevent+jwt")
        .body(set.sign(key).expect("sign"))
        .send()
        .await
        .expect("ingest");
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap_or_default());
}

fn established(base: &str, id: &str, parent: Option<String>) -> SecurityEventToken {
    let event = Event::SessionEstablished(SessionEstablished {
        parent_session: parent.map(SubjectId::opaque),
        ..Default::default()
    });
    let subject = SubjectId::session_of(SubjectId::opaque(id), Some(SubjectId::email("ada@prune.example")));
    SecurityEventToken::new(IDP, base, subject, event)
}

async fn admin_get(client: &reqwest::Client, base: &str, path: &str) -> reqwest::Response {
    client.get(format!("{base}{path}")).bearer_auth(ADMIN).send().await.expect("admin request")
}

/// `caep_pruned_total{kind="sessions"}` from `/metrics`.
async fn sessions_pruned(client: &reqwest::Client, base: &str) -> u64 {
    let text = admin_get(client, base, "/metrics").await.text().await.expect("metrics");
    text.lines()
        .find(|line| line.starts_with("caep_pruned_total{kind=\"sessions\"}"))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse::<f64>().ok())
        .map_or(0, |value| value as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_prune_loses_no_leaf_and_corrupts_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = support::free_port();
    let client = reqwest::Client::new();
    let mut hub = HubProcess::spawn_on("hub", port, dir.path(), &envs());
    hub.wait_healthy(&client, Duration::from_secs(30)).await;
    let base = hub.base.clone();

    let idp_key = SigningKey::generate(Algorithm::Es256).expect("key");
    let registered = client
        .post(format!("{base}/admin/issuers"))
        .bearer_auth(ADMIN)
        .json(&json!({"issuer": IDP, "jwks": Jwks::from_keys([&idp_key]).to_json()}))
        .send()
        .await
        .expect("issuer");
    assert_eq!(registered.status(), 201);
    // A slow receiver: the cascade is still being delivered at the kill.
    let (push_url, received) = support::recording_webhook(Duration::from_secs(3)).await;
    let stream = json!({"delivery": {"method": "urn:ietf:rfc:8935", "endpoint_url": push_url},
        "events_requested": ["https://schemas.openid.net/secevent/caep/event-type/session-revoked"]});
    let (token, stream_id) = support::push_receiver(&client, &base, ADMIN, "rp", AUDIENCE, stream).await;

    // Sessions nobody revokes: they expire while the rest goes on, so the
    // pruning job is busy with them.
    let mut fillers = JoinSet::new();
    for chunk in 0..16 {
        let (client, base, key) = (client.clone(), base.clone(), idp_key.clone());
        fillers.spawn(async move {
            for i in (chunk..FILLERS).step_by(16) {
                ingest(&client, &base, &key, established(&base, &format!("filler-{i}"), None)).await;
            }
        });
    }
    fillers.join_all().await;
    // A tree the receiver touched, naming the user it knows.
    for i in 0..TREE {
        let id = format!("s{i}");
        let parent = (i > 0).then(|| format!("s{}", (i - 1) / 3));
        ingest(&client, &base, &idp_key, established(&base, &id, parent)).await;
        let touch = json!({"stream_id": stream_id, "subject": {"format": "complex",
            "session": {"format": "opaque", "id": id}, "user": {"format": "email", "email": "ada@prune.example"}}});
        let response =
            client.post(format!("{base}/ssf/subjects/add")).bearer_auth(&token).json(&touch).send().await.expect("add");
        assert_eq!(response.status(), 200);
    }
    let revoke = SecurityEventToken::new(
        IDP,
        base.as_str(),
        SubjectId::session_of(SubjectId::opaque("s0"), None),
        Event::SessionRevoked(SessionRevoked::default()),
    )
    .with_txn("revoked-mid-prune");
    ingest(&client, &base, &idp_key, revoke).await;

    // Kill once pruning has removed sessions and some, not all, leaves arrived.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let delivered = received.lock().expect("lock").len();
        if delivered > 0 && sessions_pruned(&client, &base).await > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no pruning or delivery:\n{}", hub.log_tail(40));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    hub.kill_9();
    let before = received.lock().expect("lock").len();
    assert!(before < TREE, "the cascade was delivered before the kill; the test proves nothing");

    let mut hub = HubProcess::spawn_on("hub", port, dir.path(), &envs());
    hub.wait_healthy(&client, Duration::from_secs(30)).await;
    let jwks = Jwks::from_json(
        &client.get(format!("{base}/ssf/jwks.json")).send().await.expect("jwks").text().await.expect("text"),
    )
    .expect("jwks");
    let expected: BTreeSet<String> = (0..TREE).map(|i| format!("s{i}")).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let arrived = loop {
        let mut arrived = BTreeSet::new();
        for body in received.lock().expect("lock").iter() {
            let set = SecurityEventToken::verify(body, &jwks, &Expectations::new(&base, AUDIENCE)).expect("verifies");
            assert_eq!(set.txn.as_deref(), Some("revoked-mid-prune"));
            let complex = set.sub_id.as_complex().expect("complex sub_id");
            assert_eq!(complex.user, Some(SubjectId::email("ada@prune.example")), "the user the RP named: {set:?}");
            match complex.session.clone() {
                Some(SubjectId::Opaque { id }) => arrived.insert(id),
                other => panic!("unexpected session {other:?}"),
            };
        }
        if arrived == expected || Instant::now() > deadline {
            break arrived;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(arrived, expected, "a leaf was lost across kill -9 mid-prune (delivered before: {before})");
    let report: Value =
        admin_get(&client, &base, "/admin/cascades/revoked-mid-prune").await.json().await.expect("json");
    assert_eq!(report["total"], TREE as u64, "{report}");

    // Pruning goes on after the restart: every filler goes.
    let deadline = Instant::now() + Duration::from_secs(60);
    for id in ["filler-0", "filler-777", &format!("filler-{}", FILLERS - 1), "s0", "s59"] {
        loop {
            let status = admin_get(&client, &base, &format!("/admin/sessions/{id}")).await.status();
            if status == 404 {
                break;
            }
            assert!(Instant::now() < deadline, "{id} never pruned ({status}):\n{}", hub.log_tail(40));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert!(sessions_pruned(&client, &base).await > 0, "the restarted hub prunes");
}
