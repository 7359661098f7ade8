//! The OpenAPI document: what a hub serves at `/openapi.json` is the copy
//! checked in at `hub/openapi.json`, and real responses of every operation
//! (successes and errors, on both backends) are valid against it.

#[macro_use]
mod support;

use std::sync::Arc;

use jsonschema::Draft;
use reqwest::Method;
use serde_json::{Value, json};
use support::actors::{IDP, Idp, Relying, complete_cascade, email, session, session_of};
use support::{ADMIN_TOKEN, Body, Hub, POLL, Reply, SESSION_REVOKED};

/// The checked-in document.
const CHECKED_IN: &str = include_str!("../../hub/openapi.json");

/// The served document, and checks of responses against it.
struct Contract {
    document: Arc<Value>,
    checked: std::sync::Mutex<Vec<String>>,
}

impl Contract {
    async fn of(hub: &Hub) -> Contract {
        let reply = hub.send(Method::GET, &format!("{}/openapi.json", hub.issuer), None, Body::None).await.expect(200);
        Contract { document: Arc::new(reply.json()), checked: std::sync::Mutex::new(Vec::new()) }
    }

    /// Asserts `reply` to `method path` is a documented response whose body
    /// is valid against its schema (or empty where none is documented).
    #[track_caller]
    fn check(&self, method: &str, path: &str, reply: &Reply) {
        let operation = &self.document["paths"][path][method];
        assert!(operation.is_object(), "{method} {path} is not documented");
        let status = reply.status.as_str();
        let response = &operation["responses"][status];
        assert!(response.is_object(), "{method} {path} answered {status}, which is not documented: {}", reply.text);
        self.checked.lock().expect("lock").push(format!("{method} {path} {status}"));
        let Some(content) = response["content"].as_object() else {
            assert!(reply.text.is_empty(), "{method} {path} {status}: undocumented body {}", reply.text);
            return;
        };
        let content_type = reply.header("content-type").unwrap_or_default().split(';').next().unwrap_or_default();
        let Some(media) = content.get(content_type) else {
            panic!("{method} {path} {status}: content type {content_type} is not documented ({:?})", content.keys())
        };
        if !content_type.ends_with("json") {
            return;
        }
        let body: Value = serde_json::from_str(&reply.text).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        // The schema, resolved against the document (its `#/components/...` refs).
        let mut root = media["schema"].clone();
        if let Some(root) = root.as_object_mut() {
            root.insert("components".into(), self.document["components"].clone());
        }
        let validator = jsonschema::options()
            .with_draft(Draft::Draft202012)
            .build(&root)
            .unwrap_or_else(|e| panic!("{method} {path} {status}: the schema does not compile: {e}"));
        let errors: Vec<String> = validator.iter_errors(&body).map(|e| format!("{}: {e}", e.instance_path())).collect();
        assert!(errors.is_empty(), "{method} {path} {status} contradicts the document: {errors:#?}\n{body:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_document_is_the_checked_in_copy() {
    let hub = Hub::start().await;
    let served = Contract::of(&hub).await;
    let checked_in: Value = serde_json::from_str(CHECKED_IN).expect("hub/openapi.json is JSON");
    assert!(
        *served.document == checked_in,
        "the served OpenAPI document differs from hub/openapi.json: regenerate it with \
         `cargo run -p caep-hub -- openapi > hub/openapi.json` and review the change"
    );
}

async fn responses_match_the_document(hub: Hub) {
    let api = Contract::of(&hub).await;
    let base = hub.issuer.clone();
    let url = |path: &str| format!("{base}{path}");
    let admin = |method: Method, path: &str, body: Body<'static>| {
        let url = url(path);
        let hub = &hub;
        async move { hub.send(method, &url, Some(ADMIN_TOKEN), body).await }
    };

    api.check(
        "get",
        "/.well-known/ssf-configuration",
        &hub.send(Method::GET, &url("/.well-known/ssf-configuration"), None, Body::None).await,
    );
    api.check("get", "/ssf/jwks.json", &hub.send(Method::GET, &url("/ssf/jwks.json"), None, Body::None).await);
    api.check("get", "/healthz", &hub.send(Method::GET, &url("/healthz"), None, Body::None).await);
    api.check("get", "/metrics", &admin(Method::GET, "/metrics", Body::None).await);

    // A cascade to report on: R → C, both touched by a push RP.
    let idp = Idp::register(&hub, IDP).await;
    let ada = email("ada@example.com");
    idp.establish(&hub, "R", &ada, None).await;
    idp.establish(&hub, "C", &ada, Some("R")).await;
    let pusher = Relying::new(&hub, "pusher", true, &[SESSION_REVOKED], false).await;
    pusher.add_subject(&hub, "R").await;
    pusher.add_subject(&hub, "C").await;
    idp.send(&hub, &idp.set(session_of("R", &ada), SESSION_REVOKED, json!({})).with_txn("txn-doc")).await;
    pusher.settle(&hub, 2).await;
    complete_cascade(&hub, "txn-doc", 2).await;

    // Ingest: a refusal is RFC 8935 error JSON.
    let refused = hub.send(Method::POST, &url("/ingest"), None, Body::Raw("not a SET")).await;
    api.check("post", "/ingest", &refused);

    // SSF management as a receiver, on a poll stream of its own.
    let rp = hub.receiver("documented").await;
    let token = rp.token.as_str();
    let created = hub
        .post(&url("/ssf/streams"), token, json!({"events_requested": [SESSION_REVOKED], "description": "doc"}))
        .await;
    api.check("post", "/ssf/streams", &created);
    let config = created.json();
    let stream_id = config["stream_id"].as_str().expect("stream_id").to_owned();
    assert_eq!(config["delivery"]["method"], POLL);
    let poll_url = config["delivery"]["endpoint_url"].as_str().expect("poll URL").to_owned();
    api.check("get", "/ssf/streams", &hub.get(&hub.stream_url(&stream_id), token).await);
    api.check("get", "/ssf/streams", &hub.get(&url("/ssf/streams"), token).await);
    api.check("get", "/ssf/streams", &hub.get(&hub.stream_url("no-such-stream"), token).await);
    let patched =
        hub.patch(&url("/ssf/streams"), token, json!({"stream_id": stream_id, "description": "patched"})).await;
    api.check("patch", "/ssf/streams", &patched);
    let replaced = json!({"stream_id": stream_id, "events_requested": [SESSION_REVOKED], "delivery": {"method": POLL}});
    api.check("put", "/ssf/streams", &hub.put(&url("/ssf/streams"), token, replaced).await);
    api.check("get", "/ssf/status", &hub.get(&hub.status_url(&stream_id), token).await);
    let paused = hub.post(&url("/ssf/status"), token, json!({"stream_id": stream_id, "status": "paused"})).await;
    api.check("post", "/ssf/status", &paused);
    let enabled = hub.post(&url("/ssf/status"), token, json!({"stream_id": stream_id, "status": "enabled"})).await;
    api.check("post", "/ssf/status", &enabled);
    let subject = json!({"stream_id": stream_id, "subject": {"format": "complex", "session": session("C")}});
    api.check("post", "/ssf/subjects/add", &hub.post(&url("/ssf/subjects/add"), token, subject.clone()).await);
    let many = json!({"stream_id": stream_id, "subjects": [{"format": "complex", "session": session("R")}]});
    api.check("post", "/ssf/subjects/add-many", &hub.post(&url("/ssf/subjects/add-many"), token, many).await);
    api.check("post", "/ssf/subjects/remove", &hub.post(&url("/ssf/subjects/remove"), token, subject).await);
    let verify = json!({"stream_id": stream_id, "state": "documented"});
    api.check("post", "/ssf/verify", &hub.post(&url("/ssf/verify"), token, verify).await);
    let poll = hub.post(&poll_url, token, json!({"returnImmediately": true, "maxEvents": 10})).await;
    api.check("post", "/ssf/poll/{stream_id}", &poll);
    assert!(!poll.json()["sets"].as_object().expect("sets").is_empty(), "the verification SET was polled");
    let bad = hub.send(Method::POST, &url("/ssf/streams"), Some(token), Body::Raw("{not json")).await;
    api.check("post", "/ssf/streams", &bad);
    api.check("get", "/ssf/streams", &hub.send(Method::GET, &url("/ssf/streams"), None, Body::None).await);

    // The operator's views.
    api.check("get", "/admin/issuers", &admin(Method::GET, "/admin/issuers", Body::None).await);
    api.check("get", "/admin/receivers", &admin(Method::GET, "/admin/receivers", Body::None).await);
    let receiver = json!({"name": "another", "audience": "https://another.example/"});
    api.check("post", "/admin/receivers", &admin(Method::POST, "/admin/receivers", Body::Json(receiver)).await);
    api.check("get", "/admin/streams", &admin(Method::GET, "/admin/streams", Body::None).await);
    let change = json!({"status": "paused", "reason": "documented"});
    let status_path = format!("/admin/streams/{stream_id}/status");
    api.check(
        "post",
        "/admin/streams/{stream_id}/status",
        &admin(Method::POST, &status_path, Body::Json(change)).await,
    );
    api.check("get", "/admin/cascades", &admin(Method::GET, "/admin/cascades", Body::None).await);
    api.check("get", "/admin/cascades", &admin(Method::GET, "/admin/cascades?limit=0", Body::None).await);
    api.check("get", "/admin/cascades/{txn}", &admin(Method::GET, "/admin/cascades/txn-doc", Body::None).await);
    api.check(
        "get",
        "/admin/cascades/{txn}",
        &admin(Method::GET, "/admin/cascades/txn-doc?leaves=false", Body::None).await,
    );
    api.check("get", "/admin/cascades/{txn}", &admin(Method::GET, "/admin/cascades/unknown", Body::None).await);
    api.check("get", "/admin/sessions/{session_id}", &admin(Method::GET, "/admin/sessions/R", Body::None).await);
    api.check("get", "/admin/sessions/{session_id}", &admin(Method::GET, "/admin/sessions/C", Body::None).await);
    api.check("get", "/admin/dead-letters", &admin(Method::GET, "/admin/dead-letters", Body::None).await);
    let replay = json!({"stream_id": stream_id});
    api.check(
        "post",
        "/admin/dead-letters/replay",
        &admin(Method::POST, "/admin/dead-letters/replay", Body::Json(replay)).await,
    );
    let unknown = json!({"stream_id": "no-such-stream"});
    api.check(
        "post",
        "/admin/dead-letters/replay",
        &admin(Method::POST, "/admin/dead-letters/replay", Body::Json(unknown)).await,
    );
    api.check("get", "/admin/streams", &hub.send(Method::GET, &url("/admin/streams"), Some("wrong"), Body::None).await);
    api.check("delete", "/ssf/streams", &hub.delete(&hub.stream_url(&stream_id), token).await);
    let issuer_path = format!("/admin/issuers/{}", IDP.replace(':', "%3A").replace('/', "%2F"));
    api.check("delete", "/admin/issuers/{issuer}", &admin(Method::DELETE, &issuer_path, Body::None).await);

    let receivers = admin(Method::GET, "/admin/receivers", Body::None).await.json();
    let another = receivers.as_array().and_then(|all| all.iter().find(|r| r["name"] == "another")).expect("another");
    let path = format!("/admin/receivers/{}", another["receiver_id"].as_str().expect("id"));
    api.check("delete", "/admin/receivers/{receiver_id}", &admin(Method::DELETE, &path, Body::None).await);
    let issuer = json!({"issuer": "https://second-idp.example", "jwks": {"keys": []}});
    api.check("post", "/admin/issuers", &admin(Method::POST, "/admin/issuers", Body::Json(issuer)).await);
    api.check("get", "/openapi.json", &hub.send(Method::GET, &url("/openapi.json"), None, Body::None).await);

    // Every documented operation was exercised.
    let checked: std::collections::BTreeSet<String> = api
        .checked
        .lock()
        .expect("lock")
        .iter()
        .map(|entry| entry.rsplit_once(' ').map_or(entry.clone(), |(operation, _)| operation.to_owned()))
        .collect();
    for (path, item) in api.document["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            assert!(checked.contains(&format!("{method} {path}")), "{method} {path} was never exercised");
        }
    }
}

on_every_backend!(responses_match_the_document);
