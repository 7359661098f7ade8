//! What the hub keeps, and for how long: sessions expire and take their
//! edges and touches with them, revoked sessions stay for their retention,
//! complete cascades and old dead letters are pruned while incomplete ones
//! stay, unacknowledged poll SETs expire, inactive streams are paused, and
//! deleting a stream or a receiver leaves nothing behind. Each test runs a
//! real hub with lifetimes of seconds over loopback, embedded and on Kafka.

#[macro_use]
mod support;

use std::time::{Duration, Instant};

use caep_hub::config::HubConfig;
use caep_schemas::event::event_type;
use reqwest::Method;
use serde_json::{Value, json};
use support::actors::*;
use support::{Body, Hub, HubOptions, SESSION_REVOKED, STREAM_UPDATED, TICK};

/// Long enough for a lifetime of seconds plus a pruning pass or two.
const LONG_WAIT: Duration = Duration::from_secs(20);

/// Runs each test on the embedded default and in Kafka mode.
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(false).await
                }
            )*
        }
        mod kafka {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(true).await
                }
            )*
        }
    };
}

on_both_backends!(
    an_expired_session_goes_with_its_edges_and_touches,
    a_revoked_session_is_kept_for_its_retention_then_goes,
    a_complete_cascade_is_pruned_and_an_incomplete_one_stays,
    an_unacknowledged_poll_set_is_dead_lettered_at_the_give_up_age,
    an_inactive_stream_is_paused_with_a_stream_updated_set,
    a_deleted_stream_and_a_deleted_receiver_leave_nothing_behind,
);

async fn start(kafka: bool, tune: fn(&mut HubConfig)) -> Hub {
    Hub::start_with(HubOptions { kafka, tune, ..HubOptions::default() }).await
}

/// `GET /admin/sessions/{id}`'s status.
async fn session_status(hub: &Hub, id: &str) -> u16 {
    hub.admin(Method::GET, &format!("/admin/sessions/{id}"), Body::None).await.status.as_u16()
}

/// Waits until `check` holds, for at most [`LONG_WAIT`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + LONG_WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(TICK * 5).await;
    }
}

async fn revoke(hub: &Hub, idp: &Idp, id: &str, txn: &str) {
    let set = idp.set(session_of(id, &email("ada@example.com")), SESSION_REVOKED, json!({})).with_txn(txn);
    idp.send(hub, &set).await;
}

/// Kafka mode: how many sessions the shared directory routes (`/healthz`).
async fn directory_entries(hub: &Hub) -> Option<u64> {
    let health: Value = hub.http.get(format!("{}/healthz", hub.issuer)).send().await.ok()?.json().await.ok()?;
    health["kafka"]["root_directory_entries"].as_u64()
}

/// `GET /admin/cascades/{txn}`: the report, or `None` on 404.
async fn report(hub: &Hub, txn: &str) -> Option<Value> {
    let reply = hub.admin(Method::GET, &format!("/admin/cascades/{txn}"), Body::None).await;
    match reply.status.as_u16() {
        200 => Some(reply.json()),
        404 => None,
        other => panic!("cascade report {txn}: {other} {}", reply.text),
    }
}

async fn an_expired_session_goes_with_its_edges_and_touches(kafka: bool) {
    let hub = start(kafka, |config| {
        config.session_idle_ttl_secs = 2;
        config.prune_interval_secs = 1;
    })
    .await;
    let idp = Idp::register(&hub, IDP).await;
    let rp = Relying::new(&hub, "rp", true, &[SESSION_REVOKED], false).await;
    let ada = email("ada@example.com");
    idp.establish(&hub, "root", &ada, None).await;
    idp.establish(&hub, "child", &ada, Some("root")).await;
    rp.add_subject(&hub, "child").await;
    eventually("the child's touch is recorded", || async {
        hub.admin(Method::GET, "/admin/sessions/child", Body::None).await.status == 200
            && session_view(&hub, "child").await["touches"].as_array().is_some_and(|t| t.len() == 1)
    })
    .await;
    let view = session_view(&hub, "root").await;
    assert!(view["session"]["kept_until_ms"].as_u64().is_some(), "{view:#}");
    eventually("both sessions expire", || async {
        session_status(&hub, "root").await == 404 && session_status(&hub, "child").await == 404
    })
    .await;
    if kafka {
        // The shared directory forgets their routes too: it is as bounded as the graphs.
        eventually("the directory forgets them", || async { directory_entries(&hub).await == Some(0) }).await;
    }
    // Nothing of the old tree is left: the old root's revocation (a new
    // tombstone) reaches no stream, since the child, its edge and its
    // touch went with it.
    revoke(&hub, &idp, "root", "after-expiry").await;
    assert_revoked_by(&hub, "root", "after-expiry").await;
    let view = session_view(&hub, "root").await;
    assert_eq!(view["subtree"].as_array().map(Vec::len), Some(1), "only the tombstone: {view:#}");
    rp.settle(&hub, 0).await;
}

async fn a_revoked_session_is_kept_for_its_retention_then_goes(kafka: bool) {
    let hub = start(kafka, |config| {
        config.revoked_retention_secs = 3;
        config.prune_interval_secs = 1;
    })
    .await;
    let idp = Idp::register(&hub, IDP).await;
    let rp = Relying::new(&hub, "rp", true, &[SESSION_REVOKED], false).await;
    let ada = email("ada@example.com");
    idp.establish(&hub, "root", &ada, None).await;
    revoke(&hub, &idp, "root", "revoke-root").await;
    // Within retention a late spawn is revoked at birth, and the RP it
    // touches is told at once.
    idp.establish(&hub, "late", &ada, Some("root")).await;
    assert_revoked_by(&hub, "late", "revoke-root").await;
    rp.add_subject(&hub, "late").await;
    let sets = rp.settle(&hub, 1).await;
    assert_revoked_set(&sets[0], "late", None, "revoke-root");
    // After it, both are gone, and a spawn under that id starts a new tree.
    eventually("the revoked sessions are pruned", || async {
        session_status(&hub, "root").await == 404 && session_status(&hub, "late").await == 404
    })
    .await;
    idp.establish(&hub, "later", &ada, Some("root")).await;
    eventually("the new session is recorded", || async { session_status(&hub, "later").await == 200 }).await;
    assert_not_revoked(&hub, "later").await;
}

async fn a_complete_cascade_is_pruned_and_an_incomplete_one_stays(kafka: bool) {
    let hub = start(kafka, |config| {
        config.cascade_retention_secs = 1;
        config.prune_interval_secs = 1;
    })
    .await;
    let idp = Idp::register(&hub, IDP).await;
    let pushed = Relying::new(&hub, "pushed", true, &[SESSION_REVOKED], false).await;
    let polled = Relying::new(&hub, "polled", false, &[SESSION_REVOKED], false).await;
    let ada = email("ada@example.com");
    for (id, rp) in [("to-push", &pushed), ("to-poll", &polled)] {
        idp.establish(&hub, id, &ada, None).await;
        rp.add_subject(&hub, id).await;
    }
    revoke(&hub, &idp, "to-push", "complete").await;
    revoke(&hub, &idp, "to-poll", "never-polled").await;
    pushed.settle(&hub, 1).await;
    eventually("the complete cascade's report is pruned", || async { report(&hub, "complete").await.is_none() }).await;
    let open = report(&hub, "never-polled").await.expect("the incomplete cascade is kept");
    assert_eq!((open["total"].as_u64(), open["complete"].as_bool()), (Some(1), Some(false)), "{open:#}");
}

async fn an_unacknowledged_poll_set_is_dead_lettered_at_the_give_up_age(kafka: bool) {
    let hub = start(kafka, |config| {
        config.delivery_give_up_secs = 2;
        config.prune_interval_secs = 1;
    })
    .await;
    let idp = Idp::register(&hub, IDP).await;
    let polled = Relying::new(&hub, "polled", false, &[SESSION_REVOKED], false).await;
    let ada = email("ada@example.com");
    for id in ["s1", "s2", "s3"] {
        idp.establish(&hub, id, &ada, None).await;
        polled.add_subject(&hub, id).await;
    }
    for id in ["s1", "s2", "s3"] {
        revoke(&hub, &idp, id, &format!("revoke-{id}")).await;
    }
    eventually("the SETs nobody polled are dead-lettered", || async {
        hub.dead_letters(&polled.stream_id).await.len() == 3
    })
    .await;
    let letters = hub.dead_letters(&polled.stream_id).await;
    assert!(letters.iter().all(|letter| letter["err"] == "delivery_timeout"), "{letters:#?}");
    let leaf = &report(&hub, "revoke-s1").await.expect("report")["leaves"][0];
    assert_eq!(leaf["status"], "failed", "{leaf}");
    polled.settle(&hub, 0).await;
    // The operator pages through them.
    let path = format!("/admin/dead-letters?stream_id={}&limit=2", polled.stream_id);
    let first = hub.admin(Method::GET, &path, Body::None).await.expect(200).json();
    assert_eq!(first["dead_letters"].as_array().map(Vec::len), Some(2), "{first}");
    let cursor = first["next_cursor"].as_str().expect("a second page");
    let second = hub.admin(Method::GET, &format!("{path}&cursor={cursor}"), Body::None).await.expect(200).json();
    assert_eq!(second["dead_letters"].as_array().map(Vec::len), Some(1), "{second}");
    assert!(second["next_cursor"].is_null(), "{second}");
    assert_ne!(first["dead_letters"][0]["jti"], second["dead_letters"][0]["jti"]);
    hub.admin(Method::GET, "/admin/dead-letters?cursor=forged", Body::None).await.expect(400);
    hub.admin(Method::GET, "/admin/dead-letters?limit=0", Body::None).await.expect(400);
}

async fn an_inactive_stream_is_paused_with_a_stream_updated_set(kafka: bool) {
    let hub = start(kafka, |config| {
        config.stream_inactivity_timeout_secs = 2;
        config.prune_interval_secs = 1;
    })
    .await;
    let quiet = Relying::new(&hub, "quiet", true, &[SESSION_REVOKED], false).await;
    let busy = Relying::new(&hub, "busy", false, &[SESSION_REVOKED], false).await;
    let config = hub.get(&hub.stream_url(&quiet.stream_id), &quiet.rp.token).await.expect(200).json();
    assert_eq!(config["inactivity_timeout"], 2, "advertised (SSF 1.0 §8.1.1): {config}");
    // The busy receiver polls (eligible activity for a poll stream); the
    // quiet one does nothing at all.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        busy.received(&hub).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eventually("the quiet stream is paused", || async {
        hub.admin_stream(&quiet.stream_id).await["status"] == "paused"
    })
    .await;
    assert_eq!(hub.admin_stream(&busy.stream_id).await["status"], "enabled");
    let sets = quiet.settle(&hub, 1).await;
    assert_eq!(sets[0].event.type_uri(), STREAM_UPDATED);
    assert_eq!(sets[0].event.payload()["status"], "paused", "{:?}", sets[0].event);
    // Re-enabling is activity: the stream stays enabled while its receiver is there.
    hub.set_status(&quiet.rp, &quiet.stream_id, "enabled").await;
    assert_eq!(hub.admin_stream(&quiet.stream_id).await["status"], "enabled");
}

async fn a_deleted_stream_and_a_deleted_receiver_leave_nothing_behind(kafka: bool) {
    let hub = start(kafka, |config| {
        config.delivery_give_up_secs = 1;
        config.prune_interval_secs = 1;
    })
    .await;
    let idp = Idp::register(&hub, IDP).await;
    let polled = Relying::new(&hub, "polled", false, &[SESSION_REVOKED], false).await;
    let pushed = Relying::new(&hub, "pushed", true, &[SESSION_REVOKED, event_type::STREAM_UPDATED], false).await;
    let ada = email("ada@example.com");
    idp.establish(&hub, "s1", &ada, None).await;
    polled.add_subject(&hub, "s1").await;
    revoke(&hub, &idp, "s1", "revoke-s1").await;
    eventually("a dead letter exists", || async { hub.dead_letters(&polled.stream_id).await.len() == 1 }).await;
    // The stream goes, and with it its dead letters and everything else.
    hub.delete(&hub.stream_url(&polled.stream_id), &polled.rp.token).await.expect(204);
    assert!(hub.dead_letters(&polled.stream_id).await.is_empty());
    let streams = hub.admin(Method::GET, "/admin/streams", Body::None).await.expect(200).json();
    assert!(!streams.to_string().contains(&polled.stream_id), "{streams}");
    hub.get(&hub.stream_url(&polled.stream_id), &polled.rp.token).await.expect(404);
    // Deleting a receiver: its token stops working, its stream is gone, and
    // its push endpoint is told after the fact.
    hub.admin(Method::DELETE, &format!("/admin/receivers/{}", pushed.rp.receiver_id), Body::None).await.expect(204);
    hub.get(&hub.stream_url(&pushed.stream_id), &pushed.rp.token).await.expect(401);
    let streams = hub.admin(Method::GET, "/admin/streams", Body::None).await.expect(200).json();
    assert!(!streams.to_string().contains(&pushed.stream_id), "{streams}");
    let sets = pushed.settle(&hub, 1).await;
    assert_eq!(sets[0].event.type_uri(), STREAM_UPDATED);
    assert_eq!(sets[0].event.payload()["status"], "disabled");
}
