//! Cascade benchmark, end to end over loopback: a simulated IdP revokes the
//! root of a 1,000-session agent tree that 10 push receivers all touched
//! (10,000 leaves), and revokes many 5-leaf sessions one by one. Figures come
//! from the hub's own cascade reports (ingest → each receiver's 202).
//! Run: `cargo bench -p caep-hub --bench cascade`. Prints medians.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::routing::post;
use caep_hub::config::HubConfig;
use caep_schemas::event::{Event, SessionEstablished, SessionRevoked};
use caep_schemas::jose::{Algorithm, Jwks, SigningKey};
use caep_schemas::set::SecurityEventToken;
use caep_schemas::subject::SubjectId;
use serde_json::{Value, json};

/// The same allocator as the `caep-hub` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RUNS: usize = 3;
const RECEIVERS: usize = 10;
const SMALL_CASCADES: usize = 100;
const IDP: &str = "https://idp.bench.example";
const ADMIN: &str = "bench-admin";
const REVOKED: &str = "https://schemas.openid.net/secevent/caep/event-type/session-revoked";

struct Bench {
    _dir: tempfile::TempDir,
    base: String,
    client: reqwest::Client,
    idp_key: SigningKey,
    streams: Vec<(String, String)>,
}

async fn receiver() -> String {
    let app = axum::Router::new().route("/events", post(|_: String| async { StatusCode::ACCEPTED }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/events", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
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
        ..HubConfig::default()
    };
    let hub = caep_hub::server::bind(&config).await.expect("bind");
    let base = hub.issuer.clone();
    tokio::spawn(hub.serve());
    let client = reqwest::Client::new();
    let idp_key = SigningKey::generate(Algorithm::Es256).expect("key");
    let jwks = Jwks::from_keys([&idp_key]).to_json();
    admin(&base, &client, "/admin/issuers", json!({"issuer": IDP, "jwks": jwks})).await;
    let mut streams = Vec::new();
    for i in 0..RECEIVERS {
        let created = admin(
            &base,
            &client,
            "/admin/receivers",
            json!({"name": format!("rp{i}"), "audience": format!("https://rp{i}.bench")}),
        )
        .await;
        let token = created["token"].as_str().expect("token").to_owned();
        let body = json!({"delivery": {"method": "urn:ietf:rfc:8935", "endpoint_url": receiver().await},
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
    Bench { _dir: dir, base, client, idp_key, streams }
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

    async fn report_when_complete(&self, txn: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let report: Value = self
                .client
                .get(format!("{}/admin/cascades/{txn}", self.base))
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
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
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

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let bench = Arc::new(start().await);
        println!("cascade benchmark: {RECEIVERS} push receivers on loopback, durable commits, {RUNS} runs");
        let (mut total_ms, mut p50s, mut p99s) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..RUNS {
            let root = big_tree(&bench, run).await;
            let txn = format!("big-{run}");
            let posted = Instant::now();
            bench.revoke(&root, &txn).await;
            let planned_ms = posted.elapsed().as_millis();
            let report = bench.report_when_complete(&txn).await;
            assert_eq!(report["total"], 1000 * RECEIVERS as u64, "every leaf planned");
            assert_eq!(report["delivered"], report["total"], "every leaf delivered");
            let (ms, p50, p99) = (report["cascade_ms"].as_f64().unwrap_or(f64::NAN), report["p50_ms"].as_f64().unwrap_or(f64::NAN), report["p99_ms"].as_f64().unwrap_or(f64::NAN));
            println!("run {}: 10,000 leaves: plan committed (202) after {planned_ms} ms, last leaf after {ms:.0} ms, leaf p50 {p50:.0} ms, p99 {p99:.0} ms", run + 1);
            total_ms.push(ms);
            p50s.push(p50);
            p99s.push(p99);
        }
        println!("median, 10,000-leaf cascade: time to last leaf {:.0} ms, leaf p50 {:.0} ms, leaf p99 {:.0} ms",
            median(total_ms), median(p50s), median(p99s));

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
            let report = bench.report_when_complete(&txn).await;
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
