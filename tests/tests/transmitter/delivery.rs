//! Delivery as the transmitter runs it: push retries and dead letters,
//! pause and resume, transmitter-initiated status changes, receiver removal
//! and stopping delivery (a file of its own to keep `transmitter.rs` short
//! enough to read).

use super::*;

// ---------------------------------------------------------------- push retries and dead letters

pub(super) async fn push_is_retried_with_the_same_jti_until_accepted(base: HubOptions) {
    let hub = Hub::start_with(base.clone()).await;
    let rp = hub.receiver("flaky").await;
    let receiver = PushReceiver::scripted(vec![Answer::Status(503), Answer::Status(503)], Answer::Status(202)).await;
    let stream_id = hub.push_stream(&rp, &receiver.url, Some("Bearer flaky")).await;
    hub.verify(&rp, &stream_id, "retry me").await;

    let pushes = receiver.wait_for(3).await;
    for push in &pushes {
        assert_push_request(push, Some("Bearer flaky"));
        assert_eq!(push.body, pushes[0].body, "a retry must resend the same SET");
    }
    assert_verification(&hub.verify_set(&pushes[0].body, &rp), &stream_id, "retry me");
    for pair in pushes.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(gap >= Duration::from_millis(20), "retried after only {gap:?}: no backoff");
    }
    hub.wait_queued(&stream_id, 0).await;
    receiver.assert_stays_at(3, Duration::from_millis(300)).await;
    assert_eq!(hub.dead_letters(&stream_id).await, Vec::<Value>::new());
}

pub(super) async fn a_rejected_push_is_dead_lettered_and_replayed_with_the_same_jti(base: HubOptions) {
    let hub = Hub::start_with(base.clone()).await;
    let rp = hub.receiver("rejecting").await;
    let rejection = Answer::Json(400, json!({"err": "invalid_key", "description": "x"}));
    let receiver = PushReceiver::scripted(Vec::new(), rejection).await;
    let stream_id = hub.push_stream(&rp, &receiver.url, None).await;
    hub.verify(&rp, &stream_id, "rejected").await;

    let pushes = receiver.wait_for(1).await;
    let set = hub.verify_set(&pushes[0].body, &rp);
    let deadline = Instant::now() + WAIT;
    let letters = loop {
        let letters = hub.dead_letters(&stream_id).await;
        if !letters.is_empty() {
            break letters;
        }
        assert!(Instant::now() < deadline, "never dead-lettered");
        tokio::time::sleep(TICK).await;
    };
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["stream_id"], stream_id);
    assert_eq!(letters[0]["jti"], set.jti);
    assert_eq!(letters[0]["err"], "invalid_key");
    // A 400 is permanent: not retried.
    receiver.assert_stays_at(1, Duration::from_millis(300)).await;
    hub.wait_queued(&stream_id, 0).await;

    receiver.answer_from_now(Answer::Status(202));
    let replayed = hub
        .admin(Method::POST, "/admin/dead-letters/replay", Body::Json(json!({"stream_id": stream_id})))
        .await
        .expect(200);
    assert_eq!(replayed.json(), json!({"replayed": 1}));
    let pushes = receiver.wait_for(2).await;
    assert_eq!(pushes[1].body, pushes[0].body, "the replay sends the same SET");
    assert_eq!(hub.verify_set(&pushes[1].body, &rp).jti, set.jti);
    hub.wait_queued(&stream_id, 0).await;
    assert_eq!(hub.dead_letters(&stream_id).await, Vec::<Value>::new());
    receiver.assert_stays_at(2, Duration::from_millis(200)).await;
}

// ---------------------------------------------------------------- pause and resume

pub(super) async fn a_paused_push_stream_holds_its_sets_until_resumed(base: HubOptions) {
    let hub = Hub::start_with(base.clone()).await;
    let rp = hub.receiver("pauser").await;
    let receiver = PushReceiver::accepting().await;
    let stream_id = hub.push_stream(&rp, &receiver.url, None).await;

    hub.set_status(&rp, &stream_id, "paused").await;
    hub.verify(&rp, &stream_id, "while paused").await;
    receiver.assert_stays_at(0, Duration::from_millis(500)).await;
    hub.wait_queued(&stream_id, 1).await;

    hub.set_status(&rp, &stream_id, "enabled").await;
    let pushes = receiver.wait_for(1).await;
    assert_push_request(&pushes[0], None);
    assert_verification(&hub.verify_set(&pushes[0].body, &rp), &stream_id, "while paused");
    hub.wait_queued(&stream_id, 0).await;
    receiver.assert_stays_at(1, Duration::from_millis(200)).await;
}

// ---------------------------------------------------------------- transmitter-initiated status

pub(super) async fn a_transmitter_initiated_pause_is_announced_by_a_stream_updated_set(base: HubOptions) {
    let hub = Hub::start_with(base.clone()).await;
    let rp = hub.receiver("announced").await;
    let receiver = PushReceiver::accepting().await;
    let stream_id = hub.push_stream(&rp, &receiver.url, Some("Bearer announced")).await;

    let started = Instant::now();
    let path = format!("/admin/streams/{stream_id}/status");
    let body = json!({"status": "paused", "reason": "maintenance"});
    let changed = hub.admin(Method::POST, &path, Body::Json(body)).await.expect(200).json();
    assert_eq!(changed["status"], "paused");
    // Acknowledged at once by the push receiver, so no need to wait out the announcement timeout.
    assert!(started.elapsed() < Duration::from_secs(4), "the change took {:?}", started.elapsed());

    let pushes = receiver.wait_for(1).await;
    assert_push_request(&pushes[0], Some("Bearer announced"));
    let set = hub.verify_set(&pushes[0].body, &rp);
    assert_stream_subject(&set, &stream_id);
    assert_eq!(set.event.type_uri(), STREAM_UPDATED);
    assert_eq!(set.event.payload(), json!({"status": "paused", "reason": "maintenance"}));

    let status = hub.get(&hub.status_url(&stream_id), &rp.token).await.expect(200).json();
    assert_eq!(status, json!({"stream_id": stream_id, "status": "paused", "reason": "maintenance"}));

    // The pause is real: a verification is held until the receiver resumes.
    hub.verify(&rp, &stream_id, "after the announcement").await;
    receiver.assert_stays_at(1, Duration::from_millis(300)).await;
    hub.set_status(&rp, &stream_id, "enabled").await;
    let pushes = receiver.wait_for(2).await;
    assert_verification(&hub.verify_set(&pushes[1].body, &rp), &stream_id, "after the announcement");
}

// Guards: a receiver's change (PATCH, delete) made while a transmitter-
// initiated status change waits for its stream-updated SET to be
// acknowledged is neither reverted nor undone: the status change applies to
// the stream as it is then, and a deleted stream stays deleted.
pub(super) async fn receiver_changes_during_a_transmitter_initiated_pause_are_not_lost(base: HubOptions) {
    let hub = Arc::new(Hub::start_with(base.clone()).await);
    let rp = hub.receiver("busy").await;
    // Receivers that never acknowledge, so the announcement is awaited.
    let patched_receiver = PushReceiver::scripted(Vec::new(), Answer::Status(503)).await;
    let deleted_receiver = PushReceiver::scripted(Vec::new(), Answer::Status(503)).await;
    let patched = hub.push_stream(&rp, &patched_receiver.url, None).await;
    let deleted = hub.push_stream(&rp, &deleted_receiver.url, None).await;

    let pause = |stream_id: &str| {
        let (hub, path) = (Arc::clone(&hub), format!("/admin/streams/{stream_id}/status"));
        tokio::spawn(async move {
            let body = json!({"status": "paused", "reason": "maintenance"});
            hub.admin(Method::POST, &path, Body::Json(body)).await.status
        })
    };
    let pausing_patched = pause(&patched);
    let pausing_deleted = pause(&deleted);
    // The announcements are out: the transmitter is waiting for their acknowledgement.
    patched_receiver.wait_for(1).await;
    deleted_receiver.wait_for(1).await;

    let body = json!({"stream_id": patched, "description": "changed during the announcement"});
    hub.patch(&hub.endpoint("configuration_endpoint"), &rp.token, body).await.expect(200);
    hub.delete(&hub.stream_url(&deleted), &rp.token).await.expect(204);

    let status = tokio::time::timeout(WAIT, pausing_patched).await.expect("pause returns").expect("join");
    assert_eq!(status, 200);
    tokio::time::timeout(WAIT, pausing_deleted).await.expect("pause returns").expect("join");

    let resurrected = hub.get(&hub.stream_url(&deleted), &rp.token).await;
    let config = hub.get(&hub.stream_url(&patched), &rp.token).await.expect(200).json();
    let status = hub.get(&hub.status_url(&patched), &rp.token).await.expect(200).json();
    assert_eq!(status["status"], "paused");
    assert!(
        resurrected.status == 404 && config["description"] == "changed during the announcement",
        "receiver changes made while the transmitter awaited its announcement were lost: the deleted stream \
         answers {} {}; the PATCHed stream's description is {}",
        resurrected.status,
        resurrected.text,
        config["description"]
    );
}

// ---------------------------------------------------------------- receiver removal

pub(super) async fn deleting_a_receiver_revokes_its_token_and_deletes_its_streams(base: HubOptions) {
    let hub = Hub::start_with(base.clone()).await;
    let rp = hub.receiver("leaving").await;
    let receiver = PushReceiver::accepting().await;
    let stream_id = hub.push_stream(&rp, &receiver.url, None).await;
    let streams = hub.endpoint("configuration_endpoint");
    hub.get(&streams, &rp.token).await.expect(200);

    let path = format!("/admin/receivers/{}", rp.receiver_id);
    hub.admin(Method::DELETE, &path, Body::None).await.expect(204);

    let refused = hub.get(&streams, &rp.token).await;
    assert_eq!(refused.status, 401, "{}", refused.text);
    let challenge = refused.header("www-authenticate").unwrap_or_default();
    assert!(challenge.starts_with("Bearer") && challenge.contains("invalid_token"), "{challenge:?}");
    hub.post(&hub.endpoint("verification_endpoint"), &rp.token, json!({"stream_id": stream_id})).await.expect(401);

    // Its stream is gone with it, and its push endpoint was told.
    let pushes = receiver.wait_for(1).await;
    let set = hub.verify_set(&pushes[0].body, &rp);
    assert_stream_subject(&set, &stream_id);
    assert_eq!(set.event.type_uri(), STREAM_UPDATED);
    assert_eq!(set.event.payload()["status"], "disabled");
    let all = hub.admin(Method::GET, "/admin/streams", Body::None).await.expect(200).json();
    assert!(!all.to_string().contains(&stream_id), "a removed receiver's stream is left: {all}");

    hub.admin(Method::DELETE, &path, Body::None).await.expect(404);
    let listed = hub.admin(Method::GET, "/admin/receivers", Body::None).await.expect(200).json();
    assert!(!listed.to_string().contains(&rp.receiver_id), "deleted receiver still listed: {listed}");
}

// ---------------------------------------------------------------- stopping delivery

// Guards: deleting a push stream stops the retries of a SET that keeps
// failing at once, rather than pushing it until `push_give_up_secs`.
pub(super) async fn deleting_a_push_stream_stops_retrying_its_sets(base: HubOptions) {
    let hub = Hub::start_with(base.clone()).await;
    let rp = hub.receiver("deleted-while-failing").await;
    let receiver = PushReceiver::scripted(Vec::new(), Answer::Status(503)).await;
    let stream_id = hub.push_stream(&rp, &receiver.url, None).await;
    hub.verify(&rp, &stream_id, "doomed").await;
    receiver.wait_for(1).await;

    hub.delete(&hub.stream_url(&stream_id), &rp.token).await.expect(204);
    let at_delete = receiver.requests().len();
    // One request may have been in flight when the stream was deleted.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = receiver.requests().len();
    assert!(later <= at_delete + 1, "{} pushes after the stream was deleted", later - at_delete);
}

// Guards: disabling a push stream drops the SET being retried (disabled
// means events are dropped, SSF 1.0 §8.1.2).
pub(super) async fn disabling_a_push_stream_drops_the_set_being_retried(base: HubOptions) {
    let hub = Hub::start_with(base.clone()).await;
    let rp = hub.receiver("disabled-while-failing").await;
    let receiver = PushReceiver::scripted(Vec::new(), Answer::Status(503)).await;
    let stream_id = hub.push_stream(&rp, &receiver.url, None).await;
    hub.verify(&rp, &stream_id, "dropped").await;
    receiver.wait_for(1).await;

    hub.set_status(&rp, &stream_id, "disabled").await;
    let at_disable = receiver.requests().len();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = receiver.requests().len();
    assert!(later <= at_disable + 1, "{} pushes after the stream was disabled", later - at_disable);
    assert_eq!(hub.admin_stream(&stream_id).await["queued"], 0);
}
