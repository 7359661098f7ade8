//! The push router against forged and broken SETs, over real HTTP on
//! loopback: each is answered 400 with the right RFC 8935 `err` and never
//! reaches the handler; a genuine SET reaches it exactly once however often
//! it is sent.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use caep_receiver::jwks::JwksCache;
use caep_receiver::verify::SetVerifier;
use caep_receiver::{HandlerError, ReceivedEvent, Signal, push_router};
use caep_schemas::event::{Event, SessionRevoked, event_type};
use caep_schemas::jose::{Algorithm, Jwks, SigningKey};
use caep_schemas::set::{SecurityEventToken, now_secs};
use caep_schemas::subject::SubjectId;
use josekit::jws::JwsSigner as _;
use serde_json::{Map, Value, json};
use support::{Recorder, serve};

const ISS: &str = "https://hub.example.com";
const AUD: &str = "https://rp.example.com";
const SECRET: &str = "Bearer push-secret";
const SET_TYPE: &str = "application/secevent+jwt";

struct Rig {
    url: String,
    key: SigningKey,
    other_key: SigningKey,
    recorder: Recorder,
    http: reqwest::Client,
}

impl Rig {
    /// A push router trusting only `key`, serving on loopback.
    async fn start() -> Rig {
        let key = SigningKey::generate(Algorithm::Es256).expect("key");
        let other_key = SigningKey::generate(Algorithm::Es256).expect("key");
        let verifier = Arc::new(SetVerifier::new(ISS, AUD, JwksCache::from_jwks(Jwks::from_keys([&key]))));
        let recorder = Recorder::default();
        let addr = serve(push_router(verifier, Some(SECRET.into()), recorder.handler())).await;
        Rig { url: format!("http://{addr}/"), key, other_key, recorder, http: reqwest::Client::new() }
    }

    async fn post(&self, token: &str, authorization: Option<&str>, content_type: &str) -> (u16, Value) {
        let mut request = self.http.post(&self.url).header("content-type", content_type).body(token.to_owned());
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        let response = request.send().await.expect("push");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        let body = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).expect("JSON error body") };
        (status, body)
    }

    async fn push(&self, token: &str) -> (u16, Value) {
        self.post(token, Some(SECRET), SET_TYPE).await
    }
}

fn revoked(iss: &str, aud: &str) -> SecurityEventToken {
    SecurityEventToken::new(
        iss,
        aud,
        SubjectId::session_of(SubjectId::opaque("agent-1"), Some(SubjectId::email("ada@example.com"))),
        Event::SessionRevoked(SessionRevoked::default()),
    )
    .with_txn("txn-1")
}

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

/// A compact JWS with exactly this header, signed by `key`'s private half
/// through josekit directly (so the header can be anything).
fn sign_raw(key: &SigningKey, header: Value, claims: &Map<String, Value>) -> String {
    let jwk = josekit::jwk::Jwk::from_bytes(key.to_private_jwk_json().as_bytes()).expect("jwk");
    let signer = josekit::jws::ES256.signer_from_jwk(&jwk).expect("signer");
    let input = format!("{}.{}", b64(&header), b64(&Value::Object(claims.clone())));
    let signature = signer.sign(input.as_bytes()).expect("sign");
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

#[track_caller]
fn assert_refused(answer: (u16, Value), err: &str, case: &str) {
    assert_eq!(answer.0, 400, "{case}: status, body {}", answer.1);
    assert_eq!(answer.1["err"], err, "{case}: err, body {}", answer.1);
    assert!(answer.1["description"].is_string(), "{case}: description");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgeries_are_refused_with_the_right_err_and_never_reach_the_handler() {
    let rig = Rig::start().await;
    let claims = revoked(ISS, AUD).to_claims();
    let kid = rig.key.kid().to_owned();

    // Signed by a key the JWKS does not hold, but claiming the trusted kid.
    let good = revoked(ISS, AUD).sign(&rig.key).expect("sign");
    let (signing_input, _) = good.rsplit_once('.').expect("three parts");
    let jwk = josekit::jwk::Jwk::from_bytes(rig.other_key.to_private_jwk_json().as_bytes()).expect("jwk");
    let other_signature =
        josekit::jws::ES256.signer_from_jwk(&jwk).expect("signer").sign(signing_input.as_bytes()).expect("sign");
    let bad_signature = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(other_signature));
    assert_refused(rig.push(&bad_signature).await, "invalid_key", "bad signature");

    let unknown_kid = revoked(ISS, AUD).sign(&rig.other_key).expect("sign");
    assert_refused(rig.push(&unknown_kid).await, "invalid_key", "unknown kid");

    let wrong_aud = revoked(ISS, "https://other-rp.example.com").sign(&rig.key).expect("sign");
    assert_refused(rig.push(&wrong_aud).await, "invalid_audience", "wrong aud");

    let wrong_iss = revoked("https://evil.example.com", AUD).sign(&rig.key).expect("sign");
    assert_refused(rig.push(&wrong_iss).await, "invalid_issuer", "wrong iss");

    let header = json!({"alg": "none", "kid": kid, "typ": "secevent+jwt"});
    let alg_none = format!("{}.{}.", b64(&header), b64(&Value::Object(claims.clone())));
    assert_refused(rig.push(&alg_none).await, "invalid_request", "alg none");
    let alg_none_with_signature = format!("{alg_none}c2lnbmF0dXJl");
    assert_refused(rig.push(&alg_none_with_signature).await, "invalid_request", "alg none, junk signature");

    // The classic confusion: HMAC keyed with the public key, which the
    // attacker knows. There is no HMAC code path, so it cannot verify.
    let public_key = rig.key.public_jwk().to_string();
    let hmac = josekit::jws::HS256.signer_from_bytes(public_key.as_bytes()).expect("hmac signer");
    let header = json!({"alg": "HS256", "kid": kid, "typ": "secevent+jwt"});
    let input = format!("{}.{}", b64(&header), b64(&Value::Object(claims.clone())));
    let hs256 = format!("{input}.{}", URL_SAFE_NO_PAD.encode(hmac.sign(input.as_bytes()).expect("hmac")));
    assert_refused(rig.push(&hs256).await, "invalid_request", "HS256 with the public key");

    let missing_typ = sign_raw(&rig.key, json!({"alg": "ES256", "kid": kid}), &claims);
    assert_refused(rig.push(&missing_typ).await, "invalid_request", "missing typ");
    let wrong_typ = sign_raw(&rig.key, json!({"alg": "ES256", "kid": kid, "typ": "JWT"}), &claims);
    assert_refused(rig.push(&wrong_typ).await, "invalid_request", "wrong typ");

    let mut future = revoked(ISS, AUD);
    future.iat = now_secs() + 3600;
    let future = future.sign(&rig.key).expect("sign");
    assert_refused(rig.push(&future).await, "invalid_request", "iat an hour ahead");

    let genuine = revoked(ISS, AUD).sign(&rig.key).expect("sign");
    assert_refused(rig.post(&genuine, None, SET_TYPE).await, "authentication_failed", "missing Authorization");
    assert_refused(
        rig.post(&genuine, Some("Bearer not-the-secret"), SET_TYPE).await,
        "authentication_failed",
        "wrong Authorization",
    );
    assert_refused(rig.post(&genuine, Some(SECRET), "application/jwt").await, "invalid_request", "wrong content type");
    assert_refused(rig.post(&genuine, Some(SECRET), "text/plain").await, "invalid_request", "text/plain");
    assert_refused(rig.push("not.a.jws").await, "invalid_request", "garbage");
    assert_refused(rig.push(&"A".repeat(70 * 1024)).await, "invalid_request", "oversized body");

    // A refusal is remembered under the (genuinely signed) jti and repeated.
    assert_refused(rig.push(&wrong_aud).await, "invalid_audience", "wrong aud, again");

    assert!(rig.recorder.events().is_empty(), "a forgery reached the handler: {:?}", rig.recorder.events());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_genuine_set_reaches_the_handler_once_however_often_it_is_pushed() {
    let rig = Rig::start().await;
    let set = revoked(ISS, AUD);
    let token = set.sign(&rig.key).expect("sign");

    assert_eq!(rig.push(&token).await, (202, Value::Null));
    assert_eq!(rig.push(&token).await, (202, Value::Null), "a duplicate is answered as the first");
    assert_eq!(rig.push(&token).await, (202, Value::Null));
    let events = rig.recorder.events();
    assert_eq!(events.len(), 1, "the handler ran once");
    let event = &events[0];
    assert_eq!(event.set, set);
    assert_eq!(event.token, token);
    assert_eq!(event.session_id(), Some("agent-1"));
    assert_eq!(event.txn(), Some("txn-1"));
    assert!(matches!(
        event.signal(),
        Signal::SessionRevoked { session: Some(ref s), user: Some(SubjectId::Email { .. }), .. } if s == "agent-1"
    ));

    // A parameter on the media type is fine.
    let other = revoked(ISS, AUD).sign(&rig.key).expect("sign");
    assert_eq!(rig.post(&other, Some(SECRET), "application/secevent+jwt; charset=utf-8").await.0, 202);
    assert_eq!(rig.recorder.events().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_event_types_reach_the_handler_untouched() {
    let rig = Rig::start().await;
    let payload: Map<String, Value> =
        serde_json::from_value(json!({"anything": [1, {"deep": true}], "event_timestamp": 1})).expect("object");
    let event = Event::Unknown { event_type: "https://example.com/event/new-thing".into(), payload: payload.clone() };
    let set = SecurityEventToken::new(ISS, AUD, SubjectId::opaque("x"), event.clone());
    assert_eq!(rig.push(&set.sign(&rig.key).expect("sign")).await.0, 202);
    let received = rig.recorder.events().pop().expect("handled");
    assert_eq!(received.set.event, event);
    assert_eq!(received.event_type(), "https://example.com/event/new-thing");
    assert!(matches!(received.signal(), Signal::Other(Event::Unknown { .. })));
    assert_ne!(received.event_type(), event_type::SESSION_REVOKED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_handler_gets_the_set_again_on_retry() {
    let key = SigningKey::generate(Algorithm::Es256).expect("key");
    let verifier = Arc::new(SetVerifier::new(ISS, AUD, JwksCache::from_jwks(Jwks::from_keys([&key]))));
    let calls = Arc::new(AtomicUsize::new(0));
    let failing = Arc::new(AtomicBool::new(true));
    let handler = {
        let (calls, failing) = (Arc::clone(&calls), Arc::clone(&failing));
        move |_event: ReceivedEvent| {
            let (calls, failing) = (Arc::clone(&calls), Arc::clone(&failing));
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                if failing.load(Ordering::SeqCst) { Err(HandlerError::new("database down")) } else { Ok(()) }
            }
        }
    };
    let addr = serve(push_router(verifier, None, handler)).await;
    let token = revoked(ISS, AUD).sign(&key).expect("sign");
    let push = || async {
        reqwest::Client::new()
            .post(format!("http://{addr}/"))
            .header("content-type", SET_TYPE)
            .body(token.clone())
            .send()
            .await
            .expect("push")
            .status()
            .as_u16()
    };
    assert_eq!(push().await, 503, "not processed: the transmitter must retry");
    failing.store(false, Ordering::SeqCst);
    assert_eq!(push().await, 202);
    assert_eq!(push().await, 202);
    assert_eq!(calls.load(Ordering::SeqCst), 2, "retried once after the failure, then a duplicate");
}
