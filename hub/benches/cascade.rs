//! Cascade benchmark, end to end over loopback: a simulated IdP revokes the
//! root of a 1,000-session agent tree that 10 push receivers all touched
//! (10,000 leaves), and revokes many 5-leaf sessions one by one. Figures come
//! from the hub's own cascade reports (ingest → each receiver's 202). The
//! receivers verify every SET (ES256, `iss`, `aud`).
//!
//! In the same process, a bare loop does only what a cascade cannot avoid:
//! sign 10,000 SETs (ES256) and push them to the same receivers, which
//! verify them, with the hub's concurrency (32 in flight per receiver). The
//! cascade is reported as a ratio of it (1.0: the hub adds nothing).
//! Run: `cargo bench -p caep-hub --bench cascade`. Prints medians.
//!
//! To profile only the big cascades (not the set-up between them), give the
//! bench a `perf record --control` FIFO in `PERF_CTL`:
//! `mkfifo ctl; PERF_CTL=ctl perf record -e cpu-clock -g --control fifo:ctl -D -1 target/release/deps/cascade-*`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::routing::post;
use caep_hub::config::HubConfig;
use caep_schemas::event::{Event, SessionEstablished, SessionRevoked};
use caep_schemas::jose::{Algorithm, Jwks, SigningKey};
use caep_schemas::set::{Expectations, SecurityEventToken};
use caep_schemas::subject::SubjectId;
use serde_json::{Value, json};

/// The same allocator as the `caep-hub` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RUNS: usize = 5;
const RECEIVERS: usize = 10;
const SMALL_CASCADES: usize = 100;
/// Leaves of the big cascade (and SETs of the bare loop): 1,000 sessions × every receiver.
const LEAVES: f64 = 1000.0 * RECEIVERS as f64;
const IDP: &str = "https://idp.bench.example";
const ADMIN: &str = "bench-admin";
const REVOKED: &str = "https://schemas.openid.net/secevent/caep/event-type/session-revoked";

struct Bench {
    _dir: tempfile::TempDir,
    base: String,
    client: reqwest::Client,
    idp_key: SigningKey,
    streams: Vec<(String, String)>,
    /// Each receiver's push URL and audience.
    receivers: Vec<(String, String)>,
    /// The bare loop's signing key (the receivers trust it beside the hub's).
    bare_key: SigningKey,
}

/// SETs a bare-loop push keeps in flight per receiver: the hub's default.
const BARE_IN_FLIGHT: usize = 32;

/// A push receiver that verifies each SET against `jwks` (202, else 400).
async fn receiver(jwks: Arc<Jwks>, issuer: String, audience: String) -> String {
    let verify = move |body: String| {
        let (jwks, issuer, audience) = (Arc::clone(&jwks), issuer.clone(), audience.clone());
        async move {
            match SecurityEventToken::verify(&body, &jwks, &Expectations::new(&issuer, &audience)) {
                Ok(_) => StatusCode::ACCEPTED,
                Err(_) => StatusCode::BAD_REQUEST,
            }
        }
    };
    let app = axum::Router::new().route("/events", post(verify));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/events", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// The hub's signing keys and `bare`, as one JWKS.
async fn trusted_keys(base: &str, client: &reqwest::Client, bare: &SigningKey) -> Jwks {
    let metadata: Value = client
        .get(format!("{base}/.well-known/ssf-configuration"))
        .send()
        .await
        .expect("metadata")
        .json()
        .await
        .expect("json");
    let uri = metadata["jwks_uri"].as_str().expect("jwks_uri");
    let mut keys: Value = client.get(uri).send().await.expect("jwks").json().await.expect("json");
    let extra = Jwks::from_keys([bare]).to_json();
    let list = keys["keys"].as_array_mut().expect("keys");
    list.extend(extra["keys"].as_array().cloned().unwrap_or_default());
    Jwks::from_value(&keys).expect("a JWKS")
}

async fn admin(bench_base: &str, client: &reqwest::Client, path: &str, body: Value) -> Value {
    let response =
        client.post(format!("{bench_base}{path}")).bearer_auth(ADMIN).json(&body).send().await.expect("admin");
    assert!(response.status().is_success(), "{path}: {}", response.status());
    response.json().await.expect("json")
}

async fn start() -> Bench {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = HubConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.path().to_path_buf(),
        admin_token: Some(ADMIN.into()),
        push_allow_cidrs: "127.0.0.0/8".into(),
        // The hub's cost is measured here, not its per-receiver rate limit.
        receiver_calls_per_sec: 1_000_000,
        ..HubConfig::default()
    };
    let hub = caep_hub::server::bind(&config).await.expect("bind");
    let base = hub.issuer.clone();
    tokio::spawn(hub.serve());
    let client = reqwest::Client::new();
    let idp_key = SigningKey::generate(Algorithm::Es256).expect("key");
    let jwks = Jwks::from_keys([&idp_key]).to_json();
    admin(&base, &client, "/admin/issuers", json!({"issuer": IDP, "jwks": jwks})).await;
    let bare_key = SigningKey::generate(Algorithm::Es256).expect("key");
    let trusted = Arc::new(trusted_keys(&base, &client, &bare_key).await);
    let mut streams = Vec::new();
    let mut receivers = Vec::new();
    for i in 0..RECEIVERS {
        let audience = format!("https://rp{i}.bench");
        let created =
            admin(&base, &client, "/admin/receivers", json!({"name": format!("rp{i}"), "audience": audience})).await;
        let token = created["token"].as_str().expect("token").to_owned();
        let url = receiver(Arc::clone(&trusted), base.clone(), audience.clone()).await;
        receivers.push((url.clone(), audience));
        let body = json!({"delivery": {"method": "urn:ietf:rfc:8935", "endpoint_url": url},
                          "events_requested": [REVOKED]});
        let stream: Value = client
            .post(format!("{base}/ssf/streams"))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await
            .expect("stream")
            .json()
            .await
            .expect("json");
        streams.push((stream["stream_id"].as_str().expect("id").to_owned(), token));
    }
    Bench { _dir: dir, base, client, idp_key, streams, receivers, bare_key }
}

impl Bench {
    async fn ingest(&self, sub_id: SubjectId, event: Event, txn: &str) {
        let token = SecurityEventToken::new(IDP, self.base.as_str(), sub_id, event)
            .with_txn(txn)
            .sign(&self.idp_key)
            .expect("sign");
        let response = self
            .client
            .post(format!("{}/ingest", self.base))
            .header("content-type", "application/secevent+jwt")
            .body(token)
            .send()
            .await
            .expect("ingest");
        assert_eq!(response.status(), 202, "{}", response.text().await.unwrap_or_default());
    }

    async fn establish(&self, id: &str, parent: Option<&str>) {
        let event = SessionEstablished { parent_session: parent.map(SubjectId::opaque), ..Default::default() };
        let subject = SubjectId::session_of(SubjectId::opaque(id), Some(SubjectId::email("agent-owner@bench.example")));
        self.ingest(subject, Event::SessionEstablished(event), &format!("est-{id}")).await;
    }

    async fn touch_all(&self, session: &str) {
        let mut calls = Vec::new();
        for (stream_id, token) in &self.streams {
            let body = json!({"stream_id": stream_id, "subject": {"format": "complex", "session": {"format": "opaque", "id": session}}});
            calls.push(
                self.client.post(format!("{}/ssf/subjects/add", self.base)).bearer_auth(token).json(&body).send(),
            );
        }
        for call in calls {
            assert_eq!(call.await.expect("touch").status(), 200);
        }
    }

    async fn revoke(&self, session: &str, txn: &str) {
        let subject = SubjectId::session_of(SubjectId::opaque(session), None);
        self.ingest(subject, Event::SessionRevoked(SessionRevoked::default()), txn).await;
    }

    /// The cascade's report once complete, read every `poll`; without its
    /// leaves unless `with_leaves`.
    async fn report_when_complete(&self, txn: &str, poll: Duration, with_leaves: bool) -> Value {
        let query = if with_leaves { "" } else { "?leaves=false" };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let report: Value = self
                .client
                .get(format!("{}/admin/cascades/{txn}{query}", self.base))
                .bearer_auth(ADMIN)
                .send()
                .await
                .expect("report")
                .json()
                .await
                .expect("json");
            if report["complete"] == true {
                return report;
            }
            assert!(Instant::now() < deadline, "cascade {txn} incomplete: {report}");
            tokio::time::sleep(poll).await;
        }
    }
}

impl Bench {
    /// The bare loop: 1,000 signed SETs to each receiver, 32 in flight per
    /// receiver; the time until the last 202, in ms.
    async fn bare_loop(self: &Arc<Self>) -> f64 {
        let started = Instant::now();
        let mut pushes = tokio::task::JoinSet::new();
        for (r, (url, audience)) in self.receivers.iter().enumerate() {
            let permits = Arc::new(tokio::sync::Semaphore::new(BARE_IN_FLIGHT));
            for n in 0..1000 {
                let permit = Arc::clone(&permits).acquire_owned().await.expect("permit");
                let (bench, url, audience) = (Arc::clone(self), url.clone(), audience.clone());
                pushes.spawn(async move {
                    let subject = SubjectId::session_of(SubjectId::opaque(format!("bare-{r}-{n}")), None);
                    let set = SecurityEventToken::new(
                        bench.base.as_str(),
                        audience.as_str(),
                        subject,
                        Event::SessionRevoked(SessionRevoked::default()),
                    )
                    .with_txn("bare")
                    .sign(&bench.bare_key)
                    .expect("sign");
                    let response = bench
                        .client
                        .post(&url)
                        .header("content-type", "application/secevent+jwt")
                        .body(set)
                        .send()
                        .await
                        .expect("push");
                    assert_eq!(response.status(), 202, "the receiver verified the SET");
                    drop(permit);
                });
            }
        }
        while let Some(done) = pushes.join_next().await {
            done.expect("push task");
        }
        started.elapsed().as_secs_f64() * 1000.0
    }
}

/// A 1,000-session tree: root, 9 children, 110 grandchildren each, every
/// session touched by every receiver; grandchildren set up 16 at a time.
async fn big_tree(bench: &Arc<Bench>, run: usize) -> String {
    let root = format!("r{run}");
    bench.establish(&root, None).await;
    bench.touch_all(&root).await;
    for c in 0..9 {
        let child = format!("{root}-c{c}");
        bench.establish(&child, Some(&root)).await;
        bench.touch_all(&child).await;
        let mut tasks = tokio::task::JoinSet::new();
        for g in 0..110 {
            let (bench, child) = (Arc::clone(bench), child.clone());
            tasks.spawn(async move {
                let grandchild = format!("{child}-g{g}");
                bench.establish(&grandchild, Some(&child)).await;
                bench.touch_all(&grandchild).await;
            });
            if tasks.len() >= 16 {
                tasks.join_next().await;
            }
        }
        while tasks.join_next().await.is_some() {}
    }
    root
}

/// CPU seconds this process (hub, receivers and bench together) has used.
fn process_cpu_s() -> f64 {
    caep_simulations::cpu::cpu_seconds(std::process::id()).unwrap_or(f64::NAN)
}

/// Tells a `perf record --control fifo:$PERF_CTL` to `enable` or `disable` sampling.
fn perf_ctl(command: &str) {
    if let Ok(path) = std::env::var("PERF_CTL") {
        use std::io::Write;
        let mut fifo = std::fs::OpenOptions::new().write(true).open(&path).expect("PERF_CTL: a perf control FIFO");
        writeln!(fifo, "{command}").expect("writing to PERF_CTL");
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let bench = Arc::new(start().await);
        println!("cascade benchmark: {RECEIVERS} push receivers on loopback, durable commits, {RUNS} runs");
        let (mut total_ms, mut p50s, mut p99s, mut bare_ms, mut ratios) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut bare_cpu, mut cascade_cpu) = (Vec::new(), Vec::new());
        for run in 0..RUNS {
            let cpu_before_bare = process_cpu_s();
            let bare = bench.bare_loop().await;
            let bare_cpu_us = (process_cpu_s() - cpu_before_bare) * 1e6 / LEAVES;
            let root = big_tree(&bench, run).await;
            let txn = format!("big-{run}");
            let cpu_before_cascade = process_cpu_s();
            perf_ctl("enable");
            let posted = Instant::now();
            bench.revoke(&root, &txn).await;
            let planned_ms = posted.elapsed().as_millis();
            // The figures come from the hub's timestamps, not from when a poll
            // sees them. A summary, polled: reading 10,000 leaves each time
            // would take CPU from the cascade being measured.
            let report = bench.report_when_complete(&txn, Duration::from_millis(20), false).await;
            // Up to one poll interval of idle time after the last leaf: little CPU.
            perf_ctl("disable");
            let cascade_cpu_us = (process_cpu_s() - cpu_before_cascade) * 1e6 / LEAVES;
            assert_eq!(report["total"], 1000 * RECEIVERS as u64, "every leaf planned");
            assert_eq!(report["delivered"], report["total"], "every leaf delivered");
            let (ms, p50, p99) = (report["cascade_ms"].as_f64().unwrap_or(f64::NAN), report["p50_ms"].as_f64().unwrap_or(f64::NAN), report["p99_ms"].as_f64().unwrap_or(f64::NAN));
            println!("run {}: 10,000 leaves: plan committed (202) after {planned_ms} ms, last leaf after {ms:.0} ms, leaf p50 {p50:.0} ms, p99 {p99:.0} ms", run + 1);
            println!("run {}: bare loop (sign, push, verify 10,000 SETs) {bare:.0} ms: the cascade ran at {:.2}× the bare loop", run + 1, bare / ms);
            println!("run {}: CPU per SET, receivers' verification included: bare loop {bare_cpu_us:.0} µs, cascade {cascade_cpu_us:.0} µs", run + 1);
            bare_cpu.push(bare_cpu_us);
            cascade_cpu.push(cascade_cpu_us);
            total_ms.push(ms);
            p50s.push(p50);
            p99s.push(p99);
            bare_ms.push(bare);
            ratios.push(bare / ms);
        }
        println!("median, 10,000-leaf cascade: time to last leaf {:.0} ms, leaf p50 {:.0} ms, leaf p99 {:.0} ms; bare loop {:.0} ms; cascade at {:.2}× the bare loop",
            median(total_ms), median(p50s), median(p99s), median(bare_ms), median(ratios));
        println!("median CPU per SET (this process: hub, receivers, bench): bare loop {:.0} µs, cascade {:.0} µs",
            median(bare_cpu), median(cascade_cpu));

        let mut small = Vec::new();
        for i in 0..SMALL_CASCADES {
            let session = format!("small-{i}");
            bench.establish(&session, None).await;
            let mut touches = Vec::new();
            for (stream_id, token) in bench.streams.iter().take(5) {
                let body = json!({"stream_id": stream_id, "subject": {"format": "complex", "session": {"format": "opaque", "id": session}}});
                touches.push(bench.client.post(format!("{}/ssf/subjects/add", bench.base)).bearer_auth(token).json(&body).send());
            }
            for t in touches {
                assert_eq!(t.await.expect("touch").status(), 200);
            }
            let txn = format!("small-txn-{i}");
            bench.revoke(&session, &txn).await;
            let report = bench.report_when_complete(&txn, Duration::from_millis(5), true).await;
            for leaf in report["leaves"].as_array().expect("leaves") {
                small.push(leaf["latency_ms"].as_f64().unwrap_or(f64::NAN));
            }
        }
        small.sort_by(f64::total_cmp);
        let p = |q: f64| small[((small.len() as f64 * q).ceil() as usize).clamp(1, small.len()) - 1];
        println!("small cascades ({SMALL_CASCADES} × 5 leaves): leaf latency p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            p(0.50), p(0.99), small[small.len() - 1]);
    });
}
