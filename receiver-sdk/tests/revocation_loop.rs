//! The full loop against the real hub over loopback: two relying parties
//! (one push, one poll) subscribe through the SDK, verify their streams and
//! report the agent sessions that reached them; the IdP establishes a parent
//! session and a sub-agent session and then revokes the parent at the hub's
//! `/ingest`; the revocation cascades to both relying parties' handlers,
//! with one shared `txn`.

mod support;

use caep_receiver::{Receiver, Signal, StreamRequest};
use caep_schemas::event::{Event, SessionEstablished, SessionRevoked};
use caep_schemas::jose::{Algorithm, Jwks, SigningKey};
use caep_schemas::set::SecurityEventToken;
use caep_schemas::subject::SubjectId;
use serde_json::json;
use support::{Recorder, TestHub, WAIT, serve};

const IDP: &str = "https://idp.example.com";
const PUSH_AUDIENCE: &str = "https://push-rp.example.com";
const POLL_AUDIENCE: &str = "https://poll-rp.example.com";
const PUSH_SECRET: &str = "Bearer push-secret";

/// Signs an IdP SET about `session` for the hub and posts it to `/ingest`.
async fn ingest(hub: &TestHub, key: &SigningKey, session: &str, event: Event, txn: &str) {
    let user = SubjectId::email("ada@example.com");
    let set = SecurityEventToken::new(
        IDP,
        hub.issuer.as_str(),
        SubjectId::session_of(SubjectId::opaque(session), Some(user)),
        event,
    )
    .with_txn(txn);
    hub.ingest(set.sign(key).expect("sign")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idp_revocation_reaches_push_and_poll_handlers() {
    let hub = TestHub::start().await;
    let idp_key = SigningKey::generate(Algorithm::Es256).expect("key");
    let (status, body) = hub
        .admin(
            reqwest::Method::POST,
            "/admin/issuers",
            json!({"issuer": IDP, "jwks": Jwks::from_keys([&idp_key]).to_json()}),
        )
        .await;
    assert_eq!(status, 201, "issuer registration: {body}");

    // A push relying party.
    let push_token = hub.new_receiver("push-rp", PUSH_AUDIENCE).await;
    let push_rp = Receiver::discover(&hub.issuer, PUSH_AUDIENCE, push_token).await.expect("discover");
    let pushed = Recorder::default();
    let addr = serve(push_rp.push_router(Some(PUSH_SECRET.into()), pushed.handler())).await;
    let push_stream = push_rp
        .create_stream(&StreamRequest::push(format!("http://{addr}/"), Some(PUSH_SECRET.into())).all_events())
        .await
        .expect("push stream");
    push_rp.verify_stream(&push_stream.stream_id, WAIT).await.expect("push stream verified");

    // A poll relying party.
    let poll_token = hub.new_receiver("poll-rp", POLL_AUDIENCE).await;
    let poll_rp = Receiver::discover(&hub.issuer, POLL_AUDIENCE, poll_token).await.expect("discover");
    let polled = Recorder::default();
    let poll_stream = poll_rp.create_stream(&StreamRequest::poll().all_events()).await.expect("poll stream");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let poll_loop = poll_rp.poll_loop(&poll_stream, polled.handler()).expect("poll loop");
    let running = tokio::spawn(poll_loop.run(async {
        stopped.await.ok();
    }));
    poll_rp.verify_stream(&poll_stream.stream_id, WAIT).await.expect("poll stream verified");

    // The IdP: an agent session and a sub-agent session it spawned.
    ingest(&hub, &idp_key, "root", Event::SessionEstablished(SessionEstablished::default()), "est-1").await;
    let child = SessionEstablished { parent_session: Some(SubjectId::opaque("root")), ..SessionEstablished::default() };
    ingest(&hub, &idp_key, "child", Event::SessionEstablished(child), "est-2").await;

    // The sub-agent reached the push RP (which knows its user from the
    // token it was shown), the parent the poll RP (which names no user).
    let ada = SubjectId::email("ada@example.com");
    push_rp.touch_of(&push_stream.stream_id, "child", Some(ada)).await.expect("touch child");
    poll_rp.touch(&poll_stream.stream_id, "root").await.expect("touch root");

    // The IdP revokes the parent: both relying parties hear of it.
    ingest(&hub, &idp_key, "root", Event::SessionRevoked(SessionRevoked::default()), "revoke-1").await;
    let is_revocation_of = |session: &'static str| move |event: &caep_receiver::ReceivedEvent| matches!(event.signal(), Signal::SessionRevoked { session: Some(ref s), .. } if s == session);
    let by_push = pushed.wait_for("revocation of child by push", is_revocation_of("child")).await;
    let by_poll = polled.wait_for("revocation of root by poll", is_revocation_of("root")).await;
    assert_eq!(by_push.set.iss, hub.issuer);
    assert!(by_push.set.aud.contains(PUSH_AUDIENCE) && by_poll.set.aud.contains(POLL_AUDIENCE));
    assert!(by_push.txn().is_some(), "cascade SETs carry a txn");
    assert_eq!(by_push.txn(), by_poll.txn(), "one cascade, one txn");
    assert_eq!(by_push.user(), Some(&SubjectId::email("ada@example.com")));
    assert_eq!(by_poll.user(), None, "the disclosure rule: the poll RP never named the user");
    assert!(by_push.latency_ms() >= -1000, "latency measured from the event: {}", by_push.latency_ms());

    stop.send(()).expect("poll loop running");
    running.await.expect("join").expect("clean stop");
}
