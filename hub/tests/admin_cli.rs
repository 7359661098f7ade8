//! `caep-hub admin ...` against a real hub process: every command group
//! through the admin API, tables and `--json`, errors as exit codes, and
//! control characters from receivers never reaching the terminal.

mod support;

use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::routing::post;
use caep_schemas::event::Event;
use caep_schemas::jose::{Algorithm, Jwks, SigningKey};
use caep_schemas::set::SecurityEventToken;
use caep_schemas::subject::SubjectId;
use serde_json::{Value, json};
use support::{BIN, HubProcess};

const ADMIN: &str = "cli-admin-token";
const IDP: &str = "https://idp.example";
const SESSION_REVOKED: &str = "https://schemas.openid.net/secevent/caep/event-type/session-revoked";

/// Runs `caep-hub admin --hub <hub> ARGS` with `token` as CAEP_HUB_ADMIN_TOKEN.
fn admin(hub: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut command = Command::new(BIN);
    command.arg("admin").arg("--hub").arg(hub).args(args).env_remove("CAEP_HUB_URL");
    match token {
        Some(token) => command.env("CAEP_HUB_ADMIN_TOKEN", token),
        None => command.env_remove("CAEP_HUB_ADMIN_TOKEN"),
    };
    command.output().expect("runs caep-hub admin")
}

/// The command's stdout; fails the test showing stderr unless it succeeded.
fn ok(hub: &str, args: &[&str]) -> String {
    let output = admin(hub, Some(ADMIN), args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "caep-hub admin {args:?} failed: {stderr}");
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

fn json_of(hub: &str, args: &[&str]) -> Value {
    let mut with_json = args.to_vec();
    with_json.push("--json");
    serde_json::from_str(&ok(hub, &with_json)).expect("--json prints JSON")
}

/// A push endpoint that refuses every SET (RFC 8935 `invalid_key`) until
/// told to accept; counts what it accepted.
async fn switchable_receiver() -> (String, Arc<AtomicBool>, Arc<std::sync::Mutex<Vec<String>>>) {
    let accept = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (flag, sink) = (Arc::clone(&accept), Arc::clone(&accepted));
    let app = axum::Router::new().route(
        "/events",
        post(move |body: String| {
            let (flag, sink) = (Arc::clone(&flag), Arc::clone(&sink));
            async move {
                if flag.load(Ordering::SeqCst) {
                    sink.lock().expect("lock").push(body);
                    (StatusCode::ACCEPTED, String::new())
                } else {
                    (StatusCode::BAD_REQUEST, json!({"err": "invalid_key", "description": "not yet"}).to_string())
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/events", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, accept, accepted)
}

/// A SET from the test IdP to the hub.
fn idp_set(key: &SigningKey, hub: &str, session: &str, event: Event, txn: &str) -> String {
    let sub_id = SubjectId::from_value(json!({"format": "complex", "session": {"format": "opaque", "id": session}}))
        .expect("sub_id");
    let mut set = SecurityEventToken::new(IDP.to_owned(), hub.to_owned(), sub_id, event);
    set.txn = Some(txn.to_owned());
    set.sign(key).expect("signs")
}

async fn ingest(client: &reqwest::Client, hub: &str, token: String) {
    let response = client
        .post(format!("{hub}/ingest"))
        .header("content-type", "application/secevent+jwt")
        .body(token)
        .send()
        .await
        .expect("ingest");
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap_or_default());
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "{what} never happened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_group_works_against_a_running_hub() {
    let dir = tempfile::tempdir().expect("temp dir");
    let envs = [
        ("CAEP_HUB_ADMIN_TOKEN", ADMIN.to_owned()),
        ("CAEP_HUB_PUSH_ALLOW_CIDRS", "127.0.0.0/8".to_owned()),
        ("CAEP_HUB_MIN_VERIFICATION_INTERVAL_SECS", "0".to_owned()),
    ];
    let mut process = HubProcess::spawn("cli", dir.path(), &envs);
    let client = reqwest::Client::builder().no_proxy().build().expect("client");
    process.wait_healthy(&client, Duration::from_secs(30)).await;
    let hub = process.base.clone();

    // Issuers: add with an inline JWKS file, list as a table and as JSON.
    let key = SigningKey::generate(Algorithm::Es256).expect("key");
    let jwks_file = dir.path().join("idp-jwks.json");
    std::fs::write(&jwks_file, Jwks::from_keys([&key]).to_json().to_string()).expect("write JWKS");
    let jwks_path = jwks_file.to_str().expect("UTF-8 path");
    assert_eq!(ok(&hub, &["issuers", "add", IDP, "--jwks-file", jwks_path]), format!("trusted {IDP}\n"));
    let table = ok(&hub, &["issuers", "list"]);
    assert!(table.starts_with("ISSUER") && table.contains(IDP) && table.contains("1 inline"), "{table}");
    assert_eq!(json_of(&hub, &["issuers", "list"])[0]["issuer"], IDP);

    // Receivers: a name with a terminal escape sequence is shown escaped.
    let name = "Payments\u{1b}[2J";
    let added =
        json_of(&hub, &["receivers", "add", "--name", name, "--audience", "https://pay.example", "--issuer", IDP]);
    let (receiver_id, rp_token) = (added["receiver_id"].as_str().expect("id"), added["token"].as_str().expect("token"));
    let listed = ok(&hub, &["receivers", "list"]);
    assert!(listed.contains("Payments\\u{1b}[2J") && !listed.contains('\u{1b}'), "{listed:?}");

    // The receiver's stream, refusing SETs for now.
    let (push_url, accept, accepted) = switchable_receiver().await;
    let stream: Value = client
        .post(format!("{hub}/ssf/streams"))
        .bearer_auth(rp_token)
        .json(&json!({"delivery": {"method": "urn:ietf:rfc:8935", "endpoint_url": push_url},
                      "events_requested": [SESSION_REVOKED]}))
        .send()
        .await
        .expect("create stream")
        .json()
        .await
        .expect("JSON");
    let stream_id = stream["stream_id"].as_str().expect("stream_id");
    assert!(ok(&hub, &["streams", "list"]).contains(stream_id));
    assert_eq!(json_of(&hub, &["streams", "show", stream_id])["receiver_id"], receiver_id);

    // A cascade: session S1 touched the receiver, then the IdP revokes it.
    let establish =
        Event::from_parts("https://schemas.openid.net/secevent/caep/event-type/session-established", json!({}))
            .expect("event");
    ingest(&client, &hub, idp_set(&key, &hub, "S1", establish, "txn-est")).await;
    let touch =
        json!({"stream_id": stream_id, "subject": {"format": "complex", "session": {"format": "opaque", "id": "S1"}}});
    let touched = client.post(format!("{hub}/ssf/subjects/add")).bearer_auth(rp_token).json(&touch).send().await;
    assert_eq!(touched.expect("add subject").status(), 200);
    let revoke = Event::from_parts(SESSION_REVOKED, json!({})).expect("event");
    ingest(&client, &hub, idp_set(&key, &hub, "S1", revoke, "txn-cli")).await;

    // The refused leaf is dead-lettered; the cascade lists it as failed.
    let mut letters = Value::Null;
    wait_until("a dead letter", || {
        letters = json_of(&hub, &["dead-letters", "list", "--stream", stream_id]);
        letters["dead_letters"].as_array().is_some_and(|all| !all.is_empty())
    })
    .await;
    assert_eq!(letters["dead_letters"][0]["err"], "invalid_key");
    assert!(ok(&hub, &["dead-letters", "list"]).contains("invalid_key"));
    let recent = ok(&hub, &["cascades", "list"]);
    assert!(recent.contains("txn-cli") && recent.contains("S1"), "{recent}");
    let report = ok(&hub, &["cascades", "show", "txn-cli", "--leaves"]);
    assert!(report.contains("failed") && report.contains(stream_id), "{report}");
    assert_eq!(json_of(&hub, &["cascades", "show", "txn-cli"])["failed"], 1);

    // Replay once the receiver accepts: delivered, and the dead letter is gone.
    accept.store(true, Ordering::SeqCst);
    assert_eq!(ok(&hub, &["dead-letters", "replay", stream_id]), format!("replayed 1 to stream {stream_id}\n"));
    wait_until("the replayed SET's delivery", || !accepted.lock().expect("lock").is_empty()).await;
    assert_eq!(json_of(&hub, &["dead-letters", "list", "--stream", stream_id])["dead_letters"], json!([]));

    // Streams: pause with a reason (the receiver hears of it), resume.
    assert_eq!(
        ok(&hub, &["streams", "pause", stream_id, "--reason", "maintenance"]),
        format!("stream {stream_id} is paused\n")
    );
    assert_eq!(json_of(&hub, &["streams", "show", stream_id])["status"], "paused");
    assert_eq!(ok(&hub, &["streams", "resume", stream_id]), format!("stream {stream_id} is enabled\n"));
    let heard: Vec<String> = accepted.lock().expect("lock").clone();
    assert!(heard.len() >= 2, "the receiver was told of the pause (and the resume): {}", heard.len());

    // Removal.
    assert!(ok(&hub, &["receivers", "remove", receiver_id]).starts_with("removed receiver"));
    assert_eq!(json_of(&hub, &["receivers", "list"]), json!([]));
    assert!(ok(&hub, &["issuers", "remove", IDP]).starts_with("no longer trusted"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_exit_non_zero_with_the_hubs_reason() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut process = HubProcess::spawn("cli-errors", dir.path(), &[("CAEP_HUB_ADMIN_TOKEN", ADMIN.to_owned())]);
    let client = reqwest::Client::builder().no_proxy().build().expect("client");
    process.wait_healthy(&client, Duration::from_secs(30)).await;
    let hub = &process.base;

    let missing = admin(hub, None, &["issuers", "list"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("CAEP_HUB_ADMIN_TOKEN"));

    let wrong = admin(hub, Some("not-the-token"), &["streams", "list"]);
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("401"), "{}", String::from_utf8_lossy(&wrong.stderr));

    let unknown = admin(hub, Some(ADMIN), &["receivers", "remove", "no-such-receiver"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("404"));

    let bad = admin(hub, Some(ADMIN), &["cascades", "list", "--limit", "0"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("`limit` must be 1 to 500"));

    let unreachable = admin("http://127.0.0.1:9", Some(ADMIN), &["issuers", "list"]);
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("cannot reach the hub"));
}
