//! Transmitter throughput, end to end on this machine: SETs signed (ES256),
//! durably committed to the redb outbox and pushed over HTTP to loopback
//! receivers until each answered 202; and poll throughput (poll + ack over
//! HTTP). Prints medians of several runs. Run: `cargo bench -p caep-transmitter --bench delivery`.
//!
//! Everything shares the machine's cores: the hub, the receivers and the
//! pollers run in this one process.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::routing::post;
use caep_schemas::event::{Event, SessionRevoked};
use caep_schemas::jose::Algorithm;
use caep_schemas::set::SecurityEventToken;
use caep_schemas::subject::SubjectId;
use caep_transmitter::keys::KeyStore;
use caep_transmitter::outbox::{OutcomeSink, SetOutcome};
use caep_transmitter::service::{NoHook, Outgoing, Transmitter, TransmitterSettings};
use caep_transmitter::store::{Store, StoreError};
use redb::WriteTransaction;
use serde_json::{Value, json};

const RUNS: usize = 5;
const SETS: usize = 20_000;
const STREAMS: usize = 10;
const EMIT_BATCH: usize = 500;

#[derive(Default)]
struct Counter(AtomicU64);

impl OutcomeSink for Counter {
    fn record(&self, _: &WriteTransaction, outcomes: &[SetOutcome<'_>]) -> Result<(), StoreError> {
        for outcome in outcomes {
            if outcome.delivered {
                self.0.fetch_add(1, Ordering::Relaxed);
            } else {
                eprintln!("delivery failed: {:?}", outcome.err);
            }
        }
        Ok(())
    }
}

struct Bench {
    _dir: tempfile::TempDir,
    transmitter: Arc<Transmitter>,
    delivered: Arc<Counter>,
    base: String,
}

async fn start() -> Bench {
    let dir = tempfile::tempdir().expect("temp dir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let mut settings = TransmitterSettings::new(&base);
    settings.push_allow = vec!["127.0.0.0/8".parse().expect("cidr")];
    let keys = Arc::new(KeyStore::open(dir.path(), Algorithm::Es256).expect("keys"));
    let store = Store::open(&dir.path().join("bench.redb")).expect("store");
    let delivered = Arc::new(Counter::default());
    let sink: Arc<dyn OutcomeSink> = delivered.clone();
    let transmitter = Transmitter::open(settings, store, keys, sink, Arc::new(NoHook), None).expect("open");
    let app = caep_transmitter::http::router(Arc::clone(&transmitter));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Bench { _dir: dir, transmitter, delivered, base }
}

async fn push_receiver() -> String {
    let app = axum::Router::new().route("/events", post(|_: String| async { StatusCode::ACCEPTED }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/events", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

async fn streams(bench: &Bench, push: bool) -> Vec<(String, String)> {
    let mut created = Vec::new();
    for i in 0..STREAMS {
        let audience = format!("https://rp{i}.example/{}", if push { "push" } else { "poll" });
        let (receiver, token) = bench
            .transmitter
            .create_receiver(caep_transmitter::receivers::ReceiverSpec::new(&format!("rp{i}"), &audience))
            .await
            .expect("receiver");
        let body = if push {
            json!({"delivery": {"method": "urn:ietf:rfc:8935", "endpoint_url": push_receiver().await},
                   "events_requested": ["https://schemas.openid.net/secevent/caep/event-type/session-revoked"]})
        } else {
            json!({"events_requested": ["https://schemas.openid.net/secevent/caep/event-type/session-revoked"]})
        };
        let record = bench.transmitter.create_stream(&receiver, body.to_string().as_bytes()).await.expect("stream");
        created.push((record.config.stream_id.clone(), token));
    }
    created
}

fn outgoing(stream_ids: &[(String, String)], issuer: &str, n: usize) -> Vec<Outgoing> {
    (0..n)
        .map(|i| {
            let (stream_id, _) = &stream_ids[i % stream_ids.len()];
            let subject = SubjectId::session_of(SubjectId::opaque(format!("s{i}")), Some(SubjectId::email("u@x")));
            let event = Event::SessionRevoked(SessionRevoked::default());
            let set = SecurityEventToken::new(issuer, "aud", subject, event).with_txn("bench");
            Outgoing { stream_id: stream_id.clone(), set }
        })
        .collect()
}

/// Emits all SETs in concurrent batches; returns when all are committed.
async fn emit_all(bench: &Bench, sets: Vec<Outgoing>) {
    let mut tasks = Vec::new();
    let mut sets = sets;
    while !sets.is_empty() {
        let rest = sets.split_off(sets.len().min(EMIT_BATCH));
        let batch = std::mem::replace(&mut sets, rest);
        let transmitter = Arc::clone(&bench.transmitter);
        tasks.push(tokio::spawn(async move { transmitter.emit(batch).await.expect("emit") }));
    }
    for task in tasks {
        task.await.expect("join");
    }
}

/// (committed per second, pushed-and-acknowledged per second)
async fn push_run() -> (f64, f64) {
    let bench = start().await;
    let ids = streams(&bench, true).await;
    let sets = outgoing(&ids, &bench.base, SETS);
    let started = Instant::now();
    emit_all(&bench, sets).await;
    let committed = started.elapsed();
    while bench.delivered.0.load(Ordering::Relaxed) < SETS as u64 {
        assert!(started.elapsed() < Duration::from_secs(120), "push did not finish");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let pushed = started.elapsed();
    (SETS as f64 / committed.as_secs_f64(), SETS as f64 / pushed.as_secs_f64())
}

/// SETs polled and acknowledged per second (queue filled first).
async fn poll_run() -> f64 {
    let bench = start().await;
    let ids = streams(&bench, false).await;
    emit_all(&bench, outgoing(&ids, &bench.base, SETS)).await;
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut pollers = Vec::new();
    for (stream_id, token) in ids {
        let url = bench.transmitter.poll_url(&stream_id);
        let client = client.clone();
        pollers.push(tokio::spawn(async move {
            let mut ack: Vec<String> = Vec::new();
            loop {
                let body = json!({"maxEvents": 500, "returnImmediately": true, "ack": ack});
                let response: Value = client
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await
                    .expect("poll")
                    .json()
                    .await
                    .expect("json");
                let sets = response["sets"].as_object().cloned().unwrap_or_default();
                if sets.is_empty() {
                    break;
                }
                ack = sets.keys().cloned().collect();
            }
        }));
    }
    for poller in pollers {
        poller.await.expect("join");
    }
    SETS as f64 / started.elapsed().as_secs_f64()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("transmitter delivery benchmark: {SETS} ES256 SETs over {STREAMS} streams, {RUNS} runs, {cores} cores");
    let (mut committed, mut pushed, mut polled) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=RUNS {
        let (c, p) = runtime.block_on(push_run());
        let q = runtime.block_on(poll_run());
        println!("run {run}: signed+committed {c:>8.0}/s   pushed end to end {p:>8.0}/s   polled+acked {q:>8.0}/s");
        committed.push(c);
        pushed.push(p);
        polled.push(q);
    }
    println!(
        "median: signed+committed {:.0}/s, pushed end to end (202 received) {:.0}/s, polled+acked {:.0}/s",
        median(committed),
        median(pushed),
        median(polled)
    );
}
