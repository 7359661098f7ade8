//! Receiver conformance, after the OIDF SSF receiver test plan, against a
//! transmitter test double on loopback that misbehaves on purpose:
//! verification echoing the wrong state or naming another stream,
//! verification queued behind events, a stream configuration naming another
//! issuer, a SET redelivered, and a SET from a foreign issuer (refused
//! without fetching keys). The invalid-SET cases (bad signature, unknown
//! key, wrong issuer or audience, `alg: none`) are `push_forgeries.rs`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::routing::{get, post};
use caep_receiver::{HandlerError, ReceivedEvent, Receiver, ReceiverError, StreamRequest};
use caep_schemas::event::{Event, SessionRevoked, Verification};
use caep_schemas::jose::{Algorithm, Jwks, SigningKey};
use caep_schemas::set::SecurityEventToken;
use caep_schemas::subject::SubjectId;
use serde_json::{Value, json};

const AUDIENCE: &str = "https://rp.example.com";
const STREAM: &str = "stream-1";

/// How the double answers a verification request.
#[derive(Clone, Copy, PartialEq)]
enum Verify {
    /// Echo the state, about the stream.
    Right,
    /// Echo another state.
    WrongState,
    /// Echo the state, about another stream.
    WrongSubject,
    /// First push three queued session-revoked SETs, then the verification.
    BehindQueuedEvents,
}

struct Double {
    issuer: String,
    key: SigningKey,
    /// The `iss` its stream configurations name.
    config_iss: Mutex<String>,
    verify: Mutex<Verify>,
    push_url: Mutex<Option<String>>,
    jwks_fetches: AtomicUsize,
    http: reqwest::Client,
}

impl Double {
    fn set(&self, sub_id: SubjectId, event: Event) -> String {
        SecurityEventToken::new(self.issuer.as_str(), AUDIENCE, sub_id, event).sign(&self.key).expect("sign")
    }

    async fn push(&self, token: String) -> u16 {
        let url = self.push_url.lock().expect("lock").clone().expect("a push stream exists");
        let response = self
            .http
            .post(url)
            .header("content-type", "application/secevent+jwt")
            .body(token)
            .send()
            .await
            .expect("push");
        response.status().as_u16()
    }
}

type Shared = State<Arc<Double>>;

async fn metadata(State(double): Shared) -> Json<Value> {
    let issuer = &double.issuer;
    Json(json!({
        "issuer": issuer,
        "jwks_uri": format!("{issuer}/jwks"),
        "delivery_methods_supported": ["urn:ietf:rfc:8935", "urn:ietf:rfc:8936"],
        "configuration_endpoint": format!("{issuer}/streams"),
        "verification_endpoint": format!("{issuer}/verify"),
    }))
}

async fn jwks(State(double): Shared) -> String {
    double.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    Jwks::from_keys([&double.key]).to_json().to_string()
}

async fn create_stream(State(double): Shared, Json(request): Json<Value>) -> (axum::http::StatusCode, Json<Value>) {
    *double.push_url.lock().expect("lock") = request["delivery"]["endpoint_url"].as_str().map(str::to_owned);
    let config = json!({
        "stream_id": STREAM,
        "iss": *double.config_iss.lock().expect("lock"),
        "aud": AUDIENCE,
        "delivery": request["delivery"],
        "events_delivered": ["https://schemas.openid.net/secevent/caep/event-type/session-revoked"],
    });
    (axum::http::StatusCode::CREATED, Json(config))
}

async fn verify(State(double): Shared, Json(request): Json<Value>) -> axum::http::StatusCode {
    let state = request["state"].as_str().unwrap_or_default().to_owned();
    let mode = *double.verify.lock().expect("lock");
    tokio::spawn(async move {
        if mode == Verify::BehindQueuedEvents {
            for session in ["queued-1", "queued-2", "queued-3"] {
                let sub = SubjectId::session_of(SubjectId::opaque(session), None);
                double.push(double.set(sub, Event::SessionRevoked(SessionRevoked::default()))).await;
            }
        }
        let (state, stream) = match mode {
            Verify::WrongState => ("not-the-state".to_owned(), STREAM),
            Verify::WrongSubject => (state, "another-stream"),
            Verify::Right | Verify::BehindQueuedEvents => (state, STREAM),
        };
        let event = Event::Verification(Verification { state: Some(state), ..Verification::default() });
        double.push(double.set(SubjectId::opaque(stream), event)).await;
    });
    axum::http::StatusCode::NO_CONTENT
}

async fn start_double() -> Arc<Double> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let issuer = format!("http://{}", listener.local_addr().expect("addr"));
    let double = Arc::new(Double {
        config_iss: Mutex::new(issuer.clone()),
        issuer,
        key: SigningKey::generate(Algorithm::Es256).expect("key"),
        verify: Mutex::new(Verify::Right),
        push_url: Mutex::new(None),
        jwks_fetches: AtomicUsize::new(0),
        http: reqwest::Client::new(),
    });
    let app = axum::Router::new()
        .route("/.well-known/ssf-configuration", get(metadata))
        .route("/jwks", get(jwks))
        .route("/streams", post(create_stream))
        .route("/verify", post(verify))
        .with_state(Arc::clone(&double));
    tokio::spawn(async move { axum::serve(listener, app).await });
    double
}

/// The receiver under test, its push router served, and what its handler saw.
async fn receiver(double: &Double) -> (Receiver, Arc<Mutex<Vec<String>>>) {
    let receiver = Receiver::discover(&double.issuer, AUDIENCE, "token").await.expect("discover");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    let router = receiver.push_router(None, move |event: ReceivedEvent| {
        let sink = Arc::clone(&sink);
        async move {
            sink.lock().expect("lock").push(event.session_id().unwrap_or(event.jti()).to_owned());
            Ok::<(), HandlerError>(())
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, router).await });
    let stream = receiver.create_stream(&StreamRequest::push(format!("http://{addr}/"), None)).await.expect("stream");
    assert_eq!(stream.stream_id, STREAM);
    (receiver, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_completes_only_on_the_right_state_about_the_right_stream() {
    let double = start_double().await;
    let (receiver, _) = receiver(&double).await;
    for wrong in [Verify::WrongState, Verify::WrongSubject] {
        *double.verify.lock().expect("lock") = wrong;
        let outcome = receiver.verify_stream(STREAM, Duration::from_millis(800)).await;
        assert!(matches!(outcome, Err(ReceiverError::VerificationTimeout { .. })), "{outcome:?}");
    }
    *double.verify.lock().expect("lock") = Verify::Right;
    receiver.verify_stream(STREAM, Duration::from_secs(5)).await.expect("the right echo verifies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verification_behind_queued_events_completes_after_they_are_handled() {
    let double = start_double().await;
    let (receiver, seen) = receiver(&double).await;
    *double.verify.lock().expect("lock") = Verify::BehindQueuedEvents;
    receiver.verify_stream(STREAM, Duration::from_secs(5)).await.expect("verified");
    let seen = seen.lock().expect("lock").clone();
    assert!(seen.starts_with(&["queued-1".into(), "queued-2".into(), "queued-3".into()]), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_configuration_naming_another_issuer_is_refused() {
    let double = start_double().await;
    *double.config_iss.lock().expect("lock") = "https://evil.example.com".into();
    let receiver = Receiver::discover(&double.issuer, AUDIENCE, "token").await.expect("discover");
    let refused = receiver.create_stream(&StreamRequest::poll()).await;
    match refused {
        Err(ReceiverError::InvalidResponse { reason, .. }) => assert!(reason.contains("evil.example.com"), "{reason}"),
        other => panic!("accepted a stream of another issuer: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_set_is_handled_once_and_a_foreign_issuer_costs_no_key_fetch() {
    let double = start_double().await;
    let (_receiver, seen) = receiver(&double).await;
    let revoked = double
        .set(SubjectId::session_of(SubjectId::opaque("s1"), None), Event::SessionRevoked(SessionRevoked::default()));
    for _ in 0..3 {
        assert_eq!(double.push(revoked.clone()).await, 202);
    }
    assert_eq!(*seen.lock().expect("lock"), ["s1"], "redelivered, handled once");
    let fetches = double.jwks_fetches.load(Ordering::SeqCst);
    let stranger = SigningKey::generate(Algorithm::Es256).expect("key");
    let foreign = SecurityEventToken::new(
        "https://evil.example.com",
        AUDIENCE,
        SubjectId::session_of(SubjectId::opaque("s2"), None),
        Event::SessionRevoked(SessionRevoked::default()),
    )
    .sign(&stranger)
    .expect("sign");
    let url = double.push_url.lock().expect("lock").clone().expect("url");
    let response = double
        .http
        .post(url)
        .header("content-type", "application/secevent+jwt")
        .body(foreign)
        .send()
        .await
        .expect("push");
    assert_eq!(response.status().as_u16(), 400);
    let body: Value = response.json().await.expect("RFC 8935 error JSON");
    assert_eq!(body["err"], "invalid_issuer", "{body}");
    assert_eq!(double.jwks_fetches.load(Ordering::SeqCst), fetches, "no key fetch for a foreign issuer's unknown kid");
    assert_eq!(*seen.lock().expect("lock"), ["s1"]);
}
