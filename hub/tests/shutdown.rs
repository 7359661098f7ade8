//! `caep-hub serve` stops on SIGTERM within its shutdown grace, whatever is
//! in flight: open RFC 8936 long polls answer at once (empty) instead of
//! holding the drain for their full wait, and a request that cannot finish
//! (a Kafka-mode IdP event whose broker is gone waits for the producer's
//! 30 s delivery timeout) is dropped at the end of the grace, never
//! answered 202. An orchestrator's kill deadline (30 s by default in
//! Kubernetes) must not be what stops the hub. Every database is closed
//! cleanly, so the next start needs no repair.

mod support;

use std::time::{Duration, Instant};

use caep_schemas::event::{Event, SessionEstablished};
use caep_schemas::jose::{Algorithm, Jwks, SigningKey};
use caep_schemas::set::SecurityEventToken;
use caep_schemas::subject::SubjectId;
use caep_simulations::tansu::TansuBroker;
use serde_json::json;
use support::HubProcess;

const ISSUER: &str = "https://hub.kafka-shutdown.test";
const IDP: &str = "https://idp.kafka-shutdown.test";
const ADMIN: &str = "kafka-shutdown-admin";

/// The grace the Kafka test gives the hub (`CAEP_HUB_SHUTDOWN_GRACE_SECS`).
const GRACE_SECS: u64 = 3;
/// What the hub may take to stop after SIGTERM: the grace and some slack,
/// well under the 30 s delivery timeout it must not wait out.
const STOP_WITHIN: Duration = Duration::from_secs(GRACE_SECS + 7);
/// The long-poll test's grace: longer than [`STOP_WITHIN`], so a stop that
/// waited for the polls instead of answering them fails.
const LONG_GRACE_SECS: u64 = 30;

fn sigterm(pid: u32) {
    let status = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("kill");
    assert!(status.success(), "kill -TERM {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_hub_whose_broker_was_sigkilled() {
    let binary = caep_simulations::tansu::binary().unwrap_or_else(|e| panic!("{e:#}"));
    let tansu = TansuBroker::start(binary).await.unwrap_or_else(|e| panic!("tansu: {e:#}"));
    let dir = tempfile::Builder::new().prefix("kafka-shutdown-").tempdir().expect("temp dir");
    let prefix = format!("caep-shutdown-{}", std::process::id());
    let mut hub = HubProcess::spawn(
        "hub",
        dir.path(),
        &[
            ("CAEP_HUB_KAFKA_BROKERS", tansu.brokers()),
            ("CAEP_HUB_KAFKA_TOPIC_PREFIX", prefix.clone()),
            ("CAEP_HUB_KAFKA_GROUP", format!("{prefix}-group")),
            ("CAEP_HUB_KAFKA_PARTITIONS", "3".to_owned()),
            ("CAEP_HUB_ISSUER", ISSUER.to_owned()),
            ("CAEP_HUB_ADMIN_TOKEN", ADMIN.to_owned()),
            ("CAEP_HUB_SHUTDOWN_GRACE_SECS", GRACE_SECS.to_string()),
            ("CAEP_HUB_SECRET_KEY", "a2Fma2Etc2h1dGRvd24tdGVzdC1zZWNyZXQta2V5MzI".to_owned()),
        ],
    );
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client");
    hub.wait_healthy(&client, Duration::from_secs(60)).await;
    // Healthy is not yet working: wait until the group gave it partitions.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let health: serde_json::Value =
            client.get(format!("{}/healthz", hub.base)).send().await.expect("healthz").json().await.expect("json");
        let owns = |list: &str| health["kafka"][list].as_array().is_some_and(|partitions| partitions.len() == 3);
        if owns("graph_partitions") && owns("delivery_partitions") {
            break;
        }
        assert!(Instant::now() < deadline, "partitions never assigned: {health}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let idp_key = SigningKey::generate(Algorithm::Es256).expect("key");
    let trusted = client
        .post(format!("{}/admin/issuers", hub.base))
        .bearer_auth(ADMIN)
        .json(&json!({"issuer": IDP, "jwks": Jwks::from_keys([&idp_key]).to_json()}))
        .send()
        .await
        .expect("trust the IdP");
    assert_eq!(trusted.status(), 201, "{}", trusted.text().await.unwrap_or_default());

    drop(tansu); // SIGKILL: the broker and its group coordinator are gone.
    // An IdP's event in flight: its record can reach no broker, so the
    // request waits for a delivery report that will not come soon.
    let subject = SubjectId::session_of(SubjectId::opaque("s-in-flight"), Some(SubjectId::email("u@idp.test")));
    let set = SecurityEventToken::new(IDP, ISSUER, subject, Event::SessionEstablished(SessionEstablished::default()));
    let in_flight = tokio::spawn(
        client
            .post(format!("{}/ingest", hub.base))
            .header("content-type", "application/secevent+jwt")
            .body(set.sign(&idp_key).expect("sign"))
            .timeout(Duration::from_secs(120))
            .send(),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!in_flight.is_finished(), "the ingest must still be waiting for its delivery report");
    stop(&mut hub).await;
    let data = dir.path().join("hub/data");
    assert_closed_cleanly(&data.join("caep-hub.redb"));
    let mut partitions = 0;
    for entry in std::fs::read_dir(data.join("kafka")).expect("the graph partitions' directory") {
        let path = entry.expect("entry").path();
        if path.file_name().is_some_and(|name| name.to_string_lossy().starts_with("graph-")) {
            assert_closed_cleanly(&path);
            partitions += 1;
        }
    }
    assert_eq!(partitions, 3, "a store per graph partition this instance owned");
    // Never a 202 for an event that is not in the log.
    match in_flight.await.expect("ingest task") {
        Ok(response) => assert_ne!(response.status(), 202, "an event accepted with no broker"),
        Err(error) => eprintln!("the in-flight ingest ended without an answer: {error}"),
    }
}

/// SIGTERMs `hub` and waits (at most [`STOP_WITHIN`]) for a clean exit.
async fn stop(hub: &mut HubProcess) {
    sigterm(hub.pid().expect("hub running"));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = hub.try_wait() {
            break status;
        }
        assert!(
            started.elapsed() < STOP_WITHIN,
            "{} did not stop within {STOP_WITHIN:?} of SIGTERM:\n{}",
            hub.name,
            hub.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("{} stopped {:?} after SIGTERM: {status}", hub.name, started.elapsed());
    assert!(status.success(), "exit status after SIGTERM: {status}\n{}", hub.log_tail(40));
}

#[tokio::test]
async fn sigterm_answers_open_long_polls_at_once_and_stops() {
    let dir = tempfile::Builder::new().prefix("shutdown-").tempdir().expect("temp dir");
    let mut hub = HubProcess::spawn(
        "hub",
        dir.path(),
        &[
            ("CAEP_HUB_ISSUER", ISSUER.to_owned()),
            ("CAEP_HUB_ADMIN_TOKEN", ADMIN.to_owned()),
            ("CAEP_HUB_SHUTDOWN_GRACE_SECS", LONG_GRACE_SECS.to_string()),
            // Far longer than the test waits: only the shutdown ends these polls.
            ("CAEP_HUB_LONG_POLL_SECS", "300".to_owned()),
            // Two open polls fill the receiver's slots: a third is refused,
            // which shows the two are open at the hub.
            ("CAEP_HUB_MAX_LONG_POLLS_PER_RECEIVER", "2".to_owned()),
        ],
    );
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("client");
    hub.wait_healthy(&client, Duration::from_secs(30)).await;
    let stream = json!({"delivery": {"method": "urn:ietf:rfc:8936"}});
    let (token, stream_id) =
        support::push_receiver(&client, &hub.base, ADMIN, "poller", "https://rp.shutdown.test", stream).await;
    // Long polls until one is refused: the ones still waiting then hold
    // both slots at the hub (a poll that was slow to arrive is the refused
    // one, not a held one).
    let poll = || {
        let request = client
            .post(format!("{}/ssf/poll/{stream_id}", hub.base))
            .bearer_auth(&token)
            .json(&json!({"maxEvents": 10}));
        tokio::spawn(async move { request.send().await })
    };
    let (mut polls, mut refused) = (Vec::new(), false);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(refused && polls.len() == 2) {
        assert!(Instant::now() < deadline, "two long polls never held both slots");
        if polls.len() < 2 || !refused {
            polls.push(poll());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (done, waiting): (Vec<_>, Vec<_>) = polls.into_iter().partition(|poll| poll.is_finished());
        polls = waiting;
        for poll in done {
            let answer = poll.await.expect("poll task").expect("an answer");
            assert_eq!(answer.status(), 429, "a long poll with nothing to send answered before the stop");
            refused = true;
        }
    }

    stop(&mut hub).await;
    assert_closed_cleanly(&dir.path().join("hub/data/caep-hub.redb"));
    for poll in polls {
        let response = poll.await.expect("poll task").expect("an answer, not a dropped connection");
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.expect("json");
        assert_eq!(body["sets"], json!({}), "{body}");
    }
}

/// Opens the database file the way the next start would, and fails if redb
/// has to repair it: a stop must close it cleanly, or every restart pays a
/// repair that grows with the file.
fn assert_closed_cleanly(path: &std::path::Path) {
    let repaired = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&repaired);
    let db = redb::Builder::new()
        .set_repair_callback(move |_| flag.store(true, std::sync::atomic::Ordering::SeqCst))
        .open(path)
        .expect("open the database after the stop");
    drop(db);
    assert!(!repaired.load(std::sync::atomic::Ordering::SeqCst), "{} needed a repair after the stop", path.display());
}
