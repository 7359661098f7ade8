//! The SDK against the real hub over loopback: discovery, stream management,
//! end-to-end verification by push and by poll, touches, and errors that
//! carry the transmitter's status.

mod support;

use std::time::Duration;

use axum::Json;
use axum::routing::get;
use caep_receiver::{Receiver, ReceiverError, Signal, StreamRequest};
use caep_schemas::event::{StreamStatus, event_type};
use caep_schemas::subject::SubjectId;
use serde_json::{Value, json};
use support::{Recorder, TestHub, WAIT, serve};

const AUDIENCE: &str = "https://rp.example.com";
const PUSH_SECRET: &str = "Bearer push-secret";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_stream_is_created_verified_touched_and_managed() {
    let hub = TestHub::start().await;
    let token = hub.new_receiver("push-rp", AUDIENCE).await;
    let receiver = Receiver::discover(&hub.issuer, AUDIENCE, token).await.expect("discover");
    assert_eq!(receiver.issuer(), hub.issuer);
    assert_eq!(receiver.verifier().issuer(), hub.issuer);

    let recorder = Recorder::default();
    let addr = serve(receiver.push_router(Some(PUSH_SECRET.into()), recorder.handler())).await;
    let endpoint = format!("http://{addr}/");
    let request = StreamRequest::push(&endpoint, Some(PUSH_SECRET.into())).all_events().description("sdk test");
    let stream = receiver.create_stream(&request).await.expect("create");
    let id = stream.stream_id.clone();
    let delivery = stream.delivery.clone().expect("delivery");
    assert!(delivery.is_push());
    assert_eq!(delivery.endpoint_url.as_deref(), Some(endpoint.as_str()));
    assert!(stream.events_delivered.iter().any(|e| e == event_type::SESSION_REVOKED));
    assert_eq!(stream.aud, [AUDIENCE]);

    receiver.verify_stream(&id, WAIT).await.expect("verified over push");
    let verification =
        recorder.wait_for("verification SET", |e| matches!(e.signal(), Signal::Verification { .. })).await;
    assert_eq!(verification.set.sub_id, SubjectId::opaque(&id));
    assert_eq!(verification.set.iss, hub.issuer);
    assert_eq!(verification.session_id(), None, "a stream subject is not a session");

    receiver.touch(&id, "agent-session-1").await.expect("touch");
    receiver.touch(&id, "agent-session-1").await.expect("a second touch is fine");

    // Read, list, update, replace.
    assert_eq!(receiver.read_stream(&id).await.expect("read"), stream);
    let listed = receiver.list_streams().await.expect("list");
    assert_eq!(listed.iter().map(|s| s.stream_id.as_str()).collect::<Vec<_>>(), [id.as_str()]);
    let updated = receiver.update_stream(&id, &StreamRequest::unchanged().description("renamed")).await.expect("patch");
    assert_eq!(updated.description.as_deref(), Some("renamed"));
    assert!(updated.delivery.as_ref().is_some_and(|d| d.is_push()), "PATCH keeps the delivery");
    let replaced = receiver
        .replace_stream(
            &id,
            &StreamRequest::push(&endpoint, Some(PUSH_SECRET.into())).events([event_type::SESSION_REVOKED]),
        )
        .await
        .expect("put");
    assert_eq!(replaced.description, None, "PUT removes what it does not repeat");
    assert_eq!(replaced.events_delivered, [event_type::SESSION_REVOKED]);

    // Status.
    assert_eq!(receiver.status(&id).await.expect("status").status, StreamStatus::Enabled);
    let paused = receiver.set_status(&id, StreamStatus::Paused, Some("maintenance")).await.expect("pause");
    assert_eq!((paused.status, paused.reason.as_deref()), (StreamStatus::Paused, Some("maintenance")));
    assert_eq!(receiver.status(&id).await.expect("status").status, StreamStatus::Paused);
    receiver.set_status(&id, StreamStatus::Enabled, None).await.expect("resume");

    // Subjects.
    let user = SubjectId::email("ada@example.com");
    receiver.add_subject(&id, &user).await.expect("add subject");
    receiver.remove_subject(&id, &user).await.expect("remove subject");

    // Verification still works after the changes.
    receiver.verify_stream(&id, WAIT).await.expect("verified again");

    receiver.delete_stream(&id).await.expect("delete");
    let gone = receiver.read_stream(&id).await.expect_err("deleted");
    assert_eq!(gone.status(), Some(404), "{gone}");
    assert_eq!(gone.err_code(), Some("not_found"));
    assert_eq!(receiver.touch(&id, "agent-session-1").await.expect_err("deleted").status(), Some(404));
    assert!(receiver.list_streams().await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_stream_is_verified_through_the_poll_loop_which_stops_cleanly() {
    let hub = TestHub::start().await;
    let token = hub.new_receiver("poll-rp", AUDIENCE).await;
    let receiver = Receiver::discover(&hub.issuer, AUDIENCE, token.clone()).await.expect("discover");
    let stream = receiver.create_stream(&StreamRequest::poll().all_events()).await.expect("create");
    assert!(stream.poll_url().is_some_and(|url| url.starts_with(&hub.issuer)));

    let recorder = Recorder::default();
    let poll = receiver.poll_loop(&stream, recorder.handler()).expect("poll loop");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(poll.run(async {
        stopped.await.ok();
    }));

    receiver.verify_stream(&stream.stream_id, WAIT).await.expect("verified over poll");
    receiver.verify_stream(&stream.stream_id, WAIT).await.expect("verified over poll again");
    receiver.touch(&stream.stream_id, "agent-session-2").await.expect("touch");
    let verifications = recorder.events().iter().filter(|e| matches!(e.signal(), Signal::Verification { .. })).count();
    assert_eq!(verifications, 2, "each verification SET handled once");

    stop.send(()).expect("loop running");
    let stopped_in = tokio::time::timeout(Duration::from_secs(5), running).await;
    stopped_in.expect("the loop stops promptly").expect("join").expect("clean stop");

    // Everything handled was acknowledged: nothing is left to poll.
    let polled = hub
        .http
        .post(stream.poll_url().expect("poll url"))
        .bearer_auth(&token)
        .json(&json!({"returnImmediately": true}))
        .send()
        .await
        .expect("poll");
    assert_eq!(polled.status(), 200);
    let body: serde_json::Value = polled.json().await.expect("JSON");
    assert_eq!(body["sets"], json!({}), "all SETs were acknowledged: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_times_out_when_nothing_delivers_it() {
    let hub = TestHub::start().await;
    let token = hub.new_receiver("idle-rp", AUDIENCE).await;
    let receiver = Receiver::discover(&hub.issuer, AUDIENCE, token).await.expect("discover");
    let stream = receiver.create_stream(&StreamRequest::poll()).await.expect("create");
    let error = receiver.verify_stream(&stream.stream_id, Duration::from_millis(300)).await.expect_err("no poll loop");
    assert!(matches!(error, ReceiverError::VerificationTimeout { .. }), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_refuses_bad_tokens_and_foreign_issuers() {
    let hub = TestHub::start().await;
    let receiver = Receiver::discover(&format!("{}/", hub.issuer), AUDIENCE, "not-a-token").await.expect("discover");
    let refused = receiver.list_streams().await.expect_err("bad token");
    assert_eq!(refused.status(), Some(401));
    assert_eq!(refused.err_code(), Some("authentication_failed"));

    // Metadata naming another issuer must not be trusted.
    let lying = axum::Router::new().route(
        "/.well-known/ssf-configuration",
        get(|| async {
            Json(json!({"issuer": "https://evil.example.com", "jwks_uri": "https://evil.example.com/jwks"}))
        }),
    );
    let addr = serve(lying).await;
    let error = Receiver::discover(&format!("http://{addr}"), AUDIENCE, "t").await.expect_err("foreign issuer");
    assert!(matches!(error, ReceiverError::IssuerMismatch { .. }), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn touches_deferred_by_the_rate_limit_are_retried_after_retry_after() {
    // One call a second, bursts of two: the third touch meets a 429.
    let hub =
        TestHub::start_with(caep_hub::config::HubConfig { receiver_calls_per_sec: 1, ..Default::default() }).await;
    let token = hub.new_receiver("busy-rp", AUDIENCE).await;
    let receiver = Receiver::discover(&hub.issuer, AUDIENCE, token).await.expect("discover");
    let stream = receiver.create_stream(&StreamRequest::poll().all_events()).await.expect("create");
    // A full burst again before the touches start.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = std::time::Instant::now();
    for n in 0..4 {
        receiver.touch(&stream.stream_id, &format!("agent-{n}")).await.expect("touch waits out the 429");
    }
    assert!(started.elapsed() >= Duration::from_secs(1), "some touch waited for Retry-After");
    let direct = receiver.add_subject(&stream.stream_id, &SubjectId::opaque("x")).await;
    assert!(
        matches!(direct, Err(ReceiverError::Status { status: 429, retry_after: Some(_), .. })),
        "a plain add_subject reports the 429: {direct:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_sessions_are_touched_in_batches_through_the_add_many_extension() {
    use caep_schemas::event::{Event, SessionEstablished};
    use caep_schemas::jose::{Algorithm, Jwks, SigningKey};
    use caep_schemas::set::SecurityEventToken;

    let hub = TestHub::start().await;
    let idp = "https://idp.batch.example";
    let key = SigningKey::generate(Algorithm::Es256).expect("key");
    let jwks = Jwks::from_keys([&key]).to_json();
    let (status, body) = hub.admin(reqwest::Method::POST, "/admin/issuers", json!({"issuer": idp, "jwks": jwks})).await;
    assert!(status < 300, "issuer: {body}");
    let ids: Vec<String> = (0..150).map(|n| format!("batch-agent-{n}")).collect();
    for id in &ids {
        let subject = SubjectId::session_of(SubjectId::opaque(id.as_str()), None);
        let established = Event::SessionEstablished(SessionEstablished::default());
        hub.ingest(SecurityEventToken::new(idp, hub.issuer.as_str(), subject, established).sign(&key).expect("sign"))
            .await;
    }
    let token = hub.new_receiver("batch-rp", AUDIENCE).await;
    let receiver = Receiver::discover(&hub.issuer, AUDIENCE, token).await.expect("discover");
    assert!(
        receiver.metadata().extra.get("add_subjects_endpoint").is_some(),
        "the hub advertises its add-many extension"
    );
    let stream = receiver.create_stream(&StreamRequest::poll().all_events()).await.expect("create");
    // 150 sessions: two requests (100 + 50).
    receiver.touch_many(&stream.stream_id, &ids).await.expect("touch many");
    for id in [&ids[0], &ids[99], &ids[100], &ids[149]] {
        let (status, view) = hub.admin(reqwest::Method::GET, &format!("/admin/sessions/{id}"), Value::Null).await;
        assert_eq!(status, 200, "{view}");
        let touches = view["touches"].as_array().expect("touches");
        assert_eq!(touches.len(), 1, "{id} touched: {view}");
        assert_eq!(touches[0]["stream_id"], stream.stream_id.as_str());
    }
}
