//! Enforcement at the relying party, end to end against the real hub over
//! loopback: an MCP-style JSON-RPC service behind `EnforceLayer`, its
//! receiver polling the hub into a `Revocations` store on disk. Agents call
//! it with JWTs naming their session (`sid`), their actors (`act`) and
//! their user; the layer reports each session's touch by itself; after the
//! IdP revokes a session, or disables a user, their requests get RFC 6750
//! 401s before the service runs, and everyone else is still served. (That
//! the store survives a restart is `revocations::tests`.)

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::routing::post;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use caep_receiver::guard::EnforceLayer;
use caep_receiver::{Receiver, Revocations, StreamRequest};
use caep_schemas::event::{AccountDisabled, Event, SessionEstablished, SessionRevoked};
use caep_schemas::jose::{Algorithm, Jwks, SigningKey};
use caep_schemas::set::SecurityEventToken;
use caep_schemas::subject::SubjectId;
use serde_json::{Value, json};
use support::{TestHub, WAIT, serve};

const IDP: &str = "https://idp.example.com";
const AUDIENCE: &str = "https://mcp.example.com";

async fn ingest(hub: &TestHub, key: &SigningKey, sub_id: SubjectId, event: Event) {
    let set = SecurityEventToken::new(IDP, hub.issuer.as_str(), sub_id, event);
    hub.ingest(set.sign(key).expect("sign")).await;
}

fn session(id: &str, user: &str) -> SubjectId {
    SubjectId::session_of(SubjectId::opaque(id), Some(SubjectId::IssSub { iss: IDP.into(), sub: user.into() }))
}

/// An agent's access token: only its claims matter to the layer (the
/// service's own authentication would verify it).
fn token(claims: Value) -> String {
    let part = |value: &Value| URL_SAFE_NO_PAD.encode(value.to_string());
    format!("{}.{}.signature", part(&json!({"alg": "ES256", "typ": "at+jwt"})), part(&claims))
}

/// Calls the service's `tools/call`; returns the status and the challenge.
async fn call(http: &reqwest::Client, url: &str, token: &str) -> (u16, Option<String>) {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "lookup"}});
    let response = http.post(url).bearer_auth(token).json(&body).send().await.expect("call");
    let challenge = response.headers().get("www-authenticate").map(|v| v.to_str().unwrap_or_default().to_owned());
    (response.status().as_u16(), challenge)
}

async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_sessions_actors_and_users_are_refused_and_touches_are_reported_once() {
    let hub = TestHub::start().await;
    let idp_key = SigningKey::generate(Algorithm::Es256).expect("key");
    let issuer = json!({"issuer": IDP, "jwks": Jwks::from_keys([&idp_key]).to_json()});
    assert_eq!(hub.admin(reqwest::Method::POST, "/admin/issuers", issuer).await.0, 201);
    let sessions = [
        ("orchestrator", "ada"),
        ("worker", "ada"),
        ("bystander", "bob"),
        ("other-user", "carol"),
        ("targeted", "eve"),
    ];
    for (id, user) in sessions {
        ingest(&hub, &idp_key, session(id, user), Event::SessionEstablished(SessionEstablished::default())).await;
    }

    // The RP: discover, a poll stream into a store on disk, the layer (the ten lines).
    let dir = tempfile::tempdir().expect("temp dir");
    let store_path = dir.path().join("revocations.redb");
    let revocations = Revocations::open(&store_path, Duration::from_secs(3600)).expect("store");
    let rp_token = hub.new_receiver("mcp", AUDIENCE).await;
    let receiver = Receiver::discover(&hub.issuer, AUDIENCE, rp_token).await.expect("discover");
    let receiver = Arc::new(receiver.with_revocations(Arc::clone(&revocations)));
    let stream = receiver.create_stream(&StreamRequest::poll().all_events()).await.expect("stream");
    let poll = receiver.poll_loop(&stream, |_| async { Ok(()) }).expect("poll loop");
    tokio::spawn(poll.run(std::future::pending()));
    let served = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&served);
    // The service's own authentication (standing in for token validation):
    // it refuses mallory, whose tokens are forged.
    let service = axum::Router::new()
        .route(
            "/mcp",
            post(move |headers: axum::http::HeaderMap, Json(request): Json<Value>| {
                counter.fetch_add(1, Ordering::SeqCst);
                let forged = headers.get("x-forged").is_some();
                async move {
                    if forged {
                        return Err(axum::http::StatusCode::UNAUTHORIZED);
                    }
                    Ok(Json(json!({"jsonrpc": "2.0", "id": request["id"], "result": {"content": []}})))
                }
            }),
        )
        .layer(EnforceLayer::new(Arc::clone(&revocations)).reporting_touches(Arc::clone(&receiver), &stream.stream_id));
    let url = format!("http://{}/mcp", serve(service).await);

    let http = reqwest::Client::new();
    let orchestrator = token(json!({"iss": IDP, "sub": "ada", "sid": "orchestrator"}));
    let worker =
        token(json!({"iss": IDP, "sub": "ada", "sid": "worker", "act": {"sub": "agent", "sid": "orchestrator"}}));
    let bystander = token(json!({"iss": IDP, "sub": "bob", "sid": "bystander"}));
    let carol = token(json!({"iss": IDP, "sub": "carol", "sid": "other-user"}));
    // First, a forged token naming someone else's session, refused by the
    // service's authentication: the layer must report nothing for it (the
    // legitimate reports queued after it show that it had its chance).
    let forged = token(json!({"iss": IDP, "sub": "mallory", "sid": "targeted"}));
    let refused_by_service = http
        .post(&url)
        .bearer_auth(&forged)
        .header("x-forged", "1")
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}))
        .send()
        .await
        .expect("forged call");
    assert_eq!(refused_by_service.status().as_u16(), 401);
    for agent in [&orchestrator, &worker, &bystander, &carol, &orchestrator, &worker] {
        assert_eq!(call(&http, &url, agent).await, (200, None));
    }
    // The layer told the hub which sessions reached this RP, once each.
    for id in ["orchestrator", "worker", "bystander", "other-user"] {
        until(&format!("{id}'s touch reaches the hub"), async || {
            let (status, view) = hub.admin(reqwest::Method::GET, &format!("/admin/sessions/{id}"), Value::Null).await;
            status == 200 && view["touches"].as_array().is_some_and(|touches| touches.len() == 1)
        })
        .await;
    }
    let (_, targeted) = hub.admin(reqwest::Method::GET, "/admin/sessions/targeted", Value::Null).await;
    assert_eq!(targeted["touches"], json!([]), "a request the service refused reported a touch: {targeted}");

    // The IdP revokes the orchestrator: it, and the worker acting through
    // it, are refused; the bystander is not.
    let revoke = Event::SessionRevoked(SessionRevoked::default());
    ingest(&hub, &idp_key, SubjectId::session_of(SubjectId::opaque("orchestrator"), None), revoke).await;
    until("the revocation reaches the store", async || revocations.is_session_revoked("orchestrator")).await;
    let before = served.load(Ordering::SeqCst);
    let refused = call(&http, &url, &orchestrator).await;
    assert_eq!(refused.0, 401);
    assert_eq!(
        refused.1.as_deref(),
        Some(r#"Bearer error="invalid_token", error_description="session revoked""#),
        "RFC 6750"
    );
    assert_eq!(call(&http, &url, &worker).await.0, 401, "a revoked actor in the act chain");
    assert_eq!(served.load(Ordering::SeqCst), before, "the service never ran for them");
    assert_eq!(call(&http, &url, &bystander).await, (200, None));

    // A disabled user: the hub revokes each of their sessions, so their
    // tokens are refused.
    let disabled = Event::AccountDisabled(AccountDisabled::default());
    ingest(&hub, &idp_key, SubjectId::IssSub { iss: IDP.into(), sub: "carol".into() }, disabled).await;
    until("carol is disabled", async || call(&http, &url, &carol).await.0 == 401).await;
    assert_eq!(call(&http, &url, &bystander).await.0, 200);
}
