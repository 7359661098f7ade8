//! The harness of the transmitter integration tests: a real hub served
//! in-process on loopback over a real redb file in a temporary directory, an
//! HTTP client that speaks to it as a receiver or operator would, and real
//! push receivers (small axum servers) that record every request and answer
//! by a scripted plan.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use caep_hub::config::HubConfig;
use caep_schemas::jose::Jwks;
use caep_schemas::json_schema;
use caep_schemas::set::{Expectations, SecurityEventToken};
use jsonschema::{Draft, Registry, Validator};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::task::JoinHandle;

pub mod actors;

/// Defines each named `async fn(Hub)` test twice: `embedded::NAME` on the
/// embedded default and `kafka::NAME` in Kafka mode against librdkafka's
/// in-process mock cluster; the same test, the same assertions.
#[allow(unused_macros)] // not every test binary that includes the harness uses it
macro_rules! on_every_backend {
    ($($test:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Hub::start().await).await
                }
            )*
        }
        mod kafka {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Hub::start_on_kafka().await).await
                }
            )*
        }
    };
}

/// The operator token every test hub is started with.
pub const ADMIN_TOKEN: &str = "test-admin";
/// RFC 8935 push.
pub const PUSH: &str = "urn:ietf:rfc:8935";
/// RFC 8936 poll.
pub const POLL: &str = "urn:ietf:rfc:8936";
/// The SSF verification event type.
pub const VERIFICATION: &str = "https://schemas.openid.net/secevent/ssf/event-type/verification";
/// The SSF stream-updated event type.
pub const STREAM_UPDATED: &str = "https://schemas.openid.net/secevent/ssf/event-type/stream-updated";
/// CAEP session revoked.
pub const SESSION_REVOKED: &str = "https://schemas.openid.net/secevent/caep/event-type/session-revoked";
/// CAEP credential change.
pub const CREDENTIAL_CHANGE: &str = "https://schemas.openid.net/secevent/caep/event-type/credential-change";
/// RISC account disabled.
pub const ACCOUNT_DISABLED: &str = "https://schemas.openid.net/secevent/risc/event-type/account-disabled";

/// How long a test waits for something that should happen promptly.
pub const WAIT: Duration = Duration::from_secs(10);
/// How often a waiting test looks again.
pub const TICK: Duration = Duration::from_millis(20);

/// How a test hub is configured.
#[derive(Clone, Debug)]
pub struct HubOptions {
    pub min_verification_interval_secs: u64,
    pub long_poll_secs: u64,
    /// Empty: the SSRF guard refuses every loopback push endpoint.
    pub push_allow_cidrs: &'static str,
    /// Run the hub in Kafka mode against librdkafka's in-process mock cluster.
    pub kafka: bool,
    /// Authenticated calls one receiver may make per second.
    pub receiver_calls_per_sec: u32,
    /// Long polls one receiver may hold open.
    pub max_long_polls_per_receiver: usize,
    /// Changes any other setting (lifetimes, retention, pruning interval).
    pub tune: fn(&mut HubConfig),
}

impl Default for HubOptions {
    fn default() -> Self {
        HubOptions {
            min_verification_interval_secs: 0,
            long_poll_secs: 5,
            push_allow_cidrs: "127.0.0.0/8",
            kafka: false,
            receiver_calls_per_sec: HubConfig::default().receiver_calls_per_sec,
            max_long_polls_per_receiver: HubConfig::default().max_long_polls_per_receiver,
            tune: |_| {},
        }
    }
}

/// Partitions of the test hub's partitioned topics in Kafka mode.
const KAFKA_PARTITIONS: i32 = 4;

/// librdkafka's in-process Kafka mock cluster, with the hub's topics made
/// (it has no CreateTopics). The cluster is not `Send`, so it lives on its
/// own thread until this handle is dropped, and [`MOCK_KAFKA_GRACE`] after:
/// the test's runtime drops the hub's consumers only after the test's `Hub`,
/// and a consumer closing against a cluster already gone can wait forever
/// (seen once: the runtime's shutdown hung in `BaseConsumer::drop`).
const MOCK_KAFKA_GRACE: Duration = Duration::from_secs(30);

struct MockKafka {
    brokers: String,
    _stop: std::sync::mpsc::Sender<()>,
}

impl MockKafka {
    fn start(prefix: &str) -> MockKafka {
        let (address, brokers) = std::sync::mpsc::channel();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let prefix = prefix.to_owned();
        std::thread::spawn(move || {
            let mock = rdkafka::mocking::MockCluster::new(1).expect("mock Kafka cluster");
            for (topic, partitions) in [("shared", 1), ("graph", KAFKA_PARTITIONS), ("deliveries", KAFKA_PARTITIONS)] {
                mock.create_topic(&format!("{prefix}.{topic}"), partitions, 1).expect("mock topic");
            }
            address.send(mock.bootstrap_servers()).expect("test waits for the address");
            let _ = stopped.recv(); // until the hub is dropped
            std::thread::sleep(MOCK_KAFKA_GRACE);
        });
        MockKafka { brokers: brokers.recv().expect("mock cluster address"), _stop: stop }
    }
}

/// A response as a test sees it.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Reply {
    /// The body as JSON; panics with the body when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {:?} {}", self.status, self.text))
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().expect("ASCII header"))
    }

    /// Panics unless the status is `expected`, showing the body.
    #[track_caller]
    pub fn expect(self, expected: u16) -> Self {
        assert_eq!(self.status.as_u16(), expected, "unexpected status; body: {}", self.text);
        self
    }

    /// Panics unless the response forbids caching (SSF management responses).
    #[track_caller]
    pub fn no_store(self) -> Self {
        assert_eq!(self.header("cache-control"), Some("no-store"), "{:?} {}", self.status, self.text);
        self
    }
}

/// A request body.
pub enum Body<'a> {
    None,
    Json(Value),
    /// Sent as is with `Content-Type: application/json`.
    Raw(&'a str),
}

/// A receiver registered through the admin API.
#[derive(Clone, Debug)]
pub struct Rp {
    pub receiver_id: String,
    pub token: String,
    pub audience: String,
}

/// A hub served in-process on 127.0.0.1; stops when dropped.
pub struct Hub {
    pub issuer: String,
    /// `GET /metrics` on the hub's metrics listener (no token).
    pub metrics_url: String,
    pub metadata: Value,
    pub jwks: Jwks,
    pub http: reqwest::Client,
    server: JoinHandle<std::io::Result<()>>,
    _data_dir: TempDir,
    _kafka: Option<MockKafka>,
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// An HTTP client for loopback only: no proxy, bounded time.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().expect("HTTP client")
}

impl Hub {
    /// The hub's data directory.
    pub fn data_dir(&self) -> &std::path::Path {
        self._data_dir.path()
    }

    /// Every record payload of a topic (`shared`, `graph`, `deliveries`) of
    /// the hub's mock Kafka cluster; `None` for an embedded hub.
    pub fn kafka_payloads(&self, topic: &str) -> Option<Vec<Vec<u8>>> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::{Message, Offset, TopicPartitionList};
        let kafka = self._kafka.as_ref()?;
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &kafka.brokers)
            .set("group.id", "test-reader")
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let topic = format!("caep.{topic}");
        let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10)).expect("metadata");
        let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len()) as i32;
        let mut payloads = Vec::new();
        for partition in 0..partitions {
            let (low, high) =
                consumer.fetch_watermarks(&topic, partition, Duration::from_secs(10)).expect("watermarks");
            if high <= low {
                continue;
            }
            let mut assignment = TopicPartitionList::new();
            assignment.add_partition_offset(&topic, partition, Offset::Offset(low)).expect("offset");
            consumer.assign(&assignment).expect("assign");
            let deadline = Instant::now() + WAIT;
            let mut next = low;
            while next < high && Instant::now() < deadline {
                if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
                    payloads.push(message.payload().unwrap_or_default().to_vec());
                    next = message.offset() + 1;
                }
            }
            assert!(next >= high, "read {topic}[{partition}] to {next} of {high}");
        }
        Some(payloads)
    }

    /// A hub with the default options (push to loopback allowed, no
    /// verification interval, 5 s long polls).
    pub async fn start() -> Hub {
        Hub::start_with(HubOptions::default()).await
    }

    /// A hub in Kafka mode on an in-process mock cluster, with the default options.
    pub async fn start_on_kafka() -> Hub {
        Hub::start_with(HubOptions { kafka: true, ..HubOptions::default() }).await
    }

    pub async fn start_with(options: HubOptions) -> Hub {
        let data_dir = tempfile::tempdir().expect("temp dir");
        let kafka = options.kafka.then(|| MockKafka::start("caep"));
        let mut config = HubConfig {
            kafka_brokers: kafka.as_ref().map(|k| k.brokers.clone()),
            kafka_partitions: KAFKA_PARTITIONS,
            listen: "127.0.0.1:0".parse().expect("address"),
            data_dir: data_dir.path().join("hub"),
            admin_token: Some(ADMIN_TOKEN.into()),
            push_allow_cidrs: options.push_allow_cidrs.into(),
            min_verification_interval_secs: options.min_verification_interval_secs,
            long_poll_secs: options.long_poll_secs,
            metrics_listen: Some("127.0.0.1:0".parse().expect("address")),
            receiver_calls_per_sec: options.receiver_calls_per_sec,
            max_long_polls_per_receiver: options.max_long_polls_per_receiver,
            secret_key: options.kafka.then(caep_transmitter::secrets::SecretBox::generate_key),
            ..HubConfig::default()
        };
        (options.tune)(&mut config);
        let hub = caep_hub::server::bind(&config).await.expect("hub binds");
        let issuer = hub.issuer.clone();
        assert_eq!(issuer, format!("http://{}", hub.local_addr));
        let metrics_url = format!("http://{}/metrics", hub.metrics_addr.expect("metrics listener"));
        let server = tokio::spawn(hub.serve());
        let http = client();
        let metadata = http
            .get(format!("{issuer}/.well-known/ssf-configuration"))
            .send()
            .await
            .expect("metadata request")
            .error_for_status()
            .expect("metadata status")
            .json::<Value>()
            .await
            .expect("metadata JSON");
        let jwks_uri = metadata["jwks_uri"].as_str().expect("jwks_uri").to_owned();
        let jwks_text = http.get(jwks_uri).send().await.expect("JWKS").text().await.expect("JWKS body");
        let jwks = Jwks::from_json(&jwks_text).expect("JWKS parses");
        let hub = Hub { issuer, metrics_url, metadata, jwks, http, server, _data_dir: data_dir, _kafka: kafka };
        if options.kafka {
            hub.wait_for_partitions().await;
        }
        hub
    }

    /// Waits until this (only) instance works every partition: the group
    /// has formed, so what a test does next is applied promptly.
    async fn wait_for_partitions(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let health: Value = self
                .http
                .get(format!("{}/healthz", self.issuer))
                .send()
                .await
                .expect("healthz")
                .json()
                .await
                .expect("JSON");
            let count = |key: &str| health["kafka"][key].as_array().map_or(0, Vec::len);
            if count("graph_partitions") == KAFKA_PARTITIONS as usize
                && count("delivery_partitions") == KAFKA_PARTITIONS as usize
            {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "Kafka partitions never assigned: {health}");
            tokio::time::sleep(TICK).await;
        }
    }

    /// An endpoint from the metadata document, e.g. `configuration_endpoint`.
    pub fn endpoint(&self, name: &str) -> String {
        self.metadata[name].as_str().unwrap_or_else(|| panic!("metadata has no {name}")).to_owned()
    }

    /// `configuration_endpoint?stream_id=...`.
    pub fn stream_url(&self, stream_id: &str) -> String {
        format!("{}?stream_id={stream_id}", self.endpoint("configuration_endpoint"))
    }

    /// `status_endpoint?stream_id=...`.
    pub fn status_url(&self, stream_id: &str) -> String {
        format!("{}?stream_id={stream_id}", self.endpoint("status_endpoint"))
    }

    /// Sends a request with an optional bearer token (an oversized raw body
    /// is sent again when the hub cut its upload short: see [`send_uploading`]).
    pub async fn send(&self, method: reqwest::Method, url: &str, token: Option<&str>, body: Body<'_>) -> Reply {
        let mut request = self.http.request(method, url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let oversized = matches!(body, Body::Raw(text) if text.len() > OVERSIZED);
        request = match body {
            Body::None => request,
            Body::Json(value) => request.json(&value),
            Body::Raw(text) => request.header("content-type", "application/json").body(text.to_owned()),
        };
        let response = send_uploading(request, oversized).await.unwrap_or_else(|e| panic!("request to {url}: {e}"));
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.expect("response body");
        Reply { status, headers, text }
    }

    pub async fn get(&self, url: &str, token: &str) -> Reply {
        self.send(reqwest::Method::GET, url, Some(token), Body::None).await
    }

    pub async fn post(&self, url: &str, token: &str, body: Value) -> Reply {
        self.send(reqwest::Method::POST, url, Some(token), Body::Json(body)).await
    }

    pub async fn patch(&self, url: &str, token: &str, body: Value) -> Reply {
        self.send(reqwest::Method::PATCH, url, Some(token), Body::Json(body)).await
    }

    pub async fn put(&self, url: &str, token: &str, body: Value) -> Reply {
        self.send(reqwest::Method::PUT, url, Some(token), Body::Json(body)).await
    }

    pub async fn delete(&self, url: &str, token: &str) -> Reply {
        self.send(reqwest::Method::DELETE, url, Some(token), Body::None).await
    }

    /// An admin API call (`path` under the issuer, e.g. `/admin/receivers`).
    pub async fn admin(&self, method: reqwest::Method, path: &str, body: Body<'_>) -> Reply {
        let url = format!("{}{path}", self.issuer);
        self.send(method, &url, Some(ADMIN_TOKEN), body).await
    }

    /// Registers a receiver with both scopes.
    pub async fn receiver(&self, name: &str) -> Rp {
        self.receiver_with(json!({"name": name, "audience": format!("https://{name}.example/")})).await
    }

    /// Registers a receiver from a full admin request body.
    pub async fn receiver_with(&self, body: Value) -> Rp {
        let created = self.admin(reqwest::Method::POST, "/admin/receivers", Body::Json(body.clone())).await.expect(201);
        let created = created.json();
        assert_eq!(created["audience"], body["audience"]);
        Rp {
            receiver_id: created["receiver_id"].as_str().expect("receiver_id").to_owned(),
            token: created["token"].as_str().expect("token").to_owned(),
            audience: created["audience"].as_str().expect("audience").to_owned(),
        }
    }

    /// Creates a stream; 201 expected; returns the configuration.
    pub async fn create_stream(&self, rp: &Rp, body: Value) -> Value {
        let created = self.post(&self.endpoint("configuration_endpoint"), &rp.token, body).await.expect(201).no_store();
        let config = created.json();
        assert_valid(json_schema::STREAM_CONFIGURATION_SCHEMA_ID, &config);
        config
    }

    /// Creates a push stream to `endpoint_url`, optionally with an
    /// `authorization_header`.
    pub async fn push_stream(&self, rp: &Rp, endpoint_url: &str, authorization: Option<&str>) -> String {
        let mut delivery = json!({"method": PUSH, "endpoint_url": endpoint_url});
        if let Some(authorization) = authorization {
            delivery["authorization_header"] = json!(authorization);
        }
        let config = self.create_stream(rp, json!({"delivery": delivery, "events_requested": [SESSION_REVOKED]})).await;
        assert_eq!(config["delivery"]["method"], PUSH);
        config["stream_id"].as_str().expect("stream_id").to_owned()
    }

    /// Creates a poll stream; returns (stream_id, poll endpoint).
    pub async fn poll_stream(&self, rp: &Rp) -> (String, String) {
        let config = self.create_stream(rp, json!({"events_requested": [SESSION_REVOKED]})).await;
        assert_eq!(config["delivery"]["method"], POLL);
        let stream_id = config["stream_id"].as_str().expect("stream_id").to_owned();
        let endpoint = config["delivery"]["endpoint_url"].as_str().expect("poll endpoint_url").to_owned();
        (stream_id, endpoint)
    }

    /// Requests a verification; 204 expected.
    pub async fn verify(&self, rp: &Rp, stream_id: &str, state: &str) {
        let body = json!({"stream_id": stream_id, "state": state});
        self.post(&self.endpoint("verification_endpoint"), &rp.token, body).await.expect(204).no_store();
    }

    /// Sets a stream's status as its receiver; 200 expected.
    pub async fn set_status(&self, rp: &Rp, stream_id: &str, status: &str) {
        let body = json!({"stream_id": stream_id, "status": status});
        let reply = self.post(&self.endpoint("status_endpoint"), &rp.token, body).await.expect(200).no_store();
        assert_eq!(reply.json()["status"], status);
    }

    /// An RFC 8936 poll; 200 expected; returns the response body.
    pub async fn poll(&self, rp: &Rp, poll_url: &str, request: Value) -> Value {
        let reply = self.post(poll_url, &rp.token, request).await.expect(200).no_store();
        let body = reply.json();
        assert!(body["sets"].is_object(), "{body}");
        assert!(body["moreAvailable"].is_boolean(), "{body}");
        body
    }

    /// Verifies a SET as the receiver `rp` must: signature against the
    /// hub's JWKS, `typ` secevent+jwt, the SSF profile, `iss` and `aud`.
    #[track_caller]
    pub fn verify_set(&self, token: &str, rp: &Rp) -> SecurityEventToken {
        SecurityEventToken::verify(token, &self.jwks, &Expectations::new(&self.issuer, &rp.audience))
            .unwrap_or_else(|e| panic!("SET does not verify: {e}\n{token}"))
    }

    /// `GET /admin/dead-letters?stream_id=`.
    pub async fn dead_letters(&self, stream_id: &str) -> Vec<Value> {
        let path = format!("/admin/dead-letters?stream_id={stream_id}");
        let reply = self.admin(reqwest::Method::GET, &path, Body::None).await.expect(200);
        reply.json()["dead_letters"].as_array().expect("array").clone()
    }

    /// The operator's view of one stream (`GET /admin/streams`).
    pub async fn admin_stream(&self, stream_id: &str) -> Value {
        let reply = self.admin(reqwest::Method::GET, "/admin/streams", Body::None).await.expect(200);
        let all = reply.json();
        all.as_array()
            .expect("array")
            .iter()
            .find(|s| s["stream_id"] == stream_id)
            .unwrap_or_else(|| panic!("stream {stream_id} not in {all}"))
            .clone()
    }

    /// Waits until the stream's outbox holds `queued` SETs.
    pub async fn wait_queued(&self, stream_id: &str, queued: u64) {
        let deadline = Instant::now() + WAIT;
        loop {
            let view = self.admin_stream(stream_id).await;
            if view["queued"] == queued {
                return;
            }
            assert!(Instant::now() < deadline, "stream {stream_id} never had {queued} queued: {view}");
            tokio::time::sleep(TICK).await;
        }
    }
}

/// Asserts the verification SET: subject is the stream, `state` echoed.
#[track_caller]
pub fn assert_verification(set: &SecurityEventToken, stream_id: &str, state: &str) {
    assert_stream_subject(set, stream_id);
    assert_eq!(set.event.type_uri(), VERIFICATION);
    assert_eq!(set.event.payload(), json!({"state": state}));
}

/// Asserts `sub_id` is `{format: opaque, id: stream_id}` and `txn` is set.
#[track_caller]
pub fn assert_stream_subject(set: &SecurityEventToken, stream_id: &str) {
    assert_eq!(set.sub_id.to_value(), json!({"format": "opaque", "id": stream_id}));
    assert!(set.txn.as_deref().is_some_and(|txn| !txn.is_empty()), "txn should be present");
}

/// Every embedded schema, registered under its `$id`, for offline `$ref`s.
static REGISTRY: LazyLock<Registry<'static>> = LazyLock::new(|| {
    let mut builder = Registry::new().draft(Draft::Draft202012);
    for schema in json_schema::all() {
        let value: Value = serde_json::from_str(schema.text).expect("schema is JSON");
        builder = builder.add(schema.id, value).unwrap_or_else(|e| panic!("cannot register {}: {e}", schema.id));
    }
    builder.prepare().unwrap_or_else(|e| panic!("cannot prepare the schema registry: {e}"))
});

fn validator(id: &str) -> Validator {
    let schema = json_schema::by_id(id).unwrap_or_else(|| panic!("no schema {id}"));
    let schema: Value = serde_json::from_str(schema.text).expect("schema is JSON");
    jsonschema::options()
        .with_draft(Draft::Draft202012)
        .with_registry(&REGISTRY)
        .offline()
        .build(&schema)
        .unwrap_or_else(|e| panic!("schema {id} does not compile: {e}"))
}

/// Panics with the validation errors unless `instance` is valid against the
/// embedded schema `id`.
#[track_caller]
pub fn assert_valid(id: &str, instance: &Value) {
    let validator = validator(id);
    let errors: Vec<String> = validator.iter_errors(instance).map(|e| format!("{}: {e}", e.instance_path())).collect();
    assert!(errors.is_empty(), "invalid against {id}: {errors:#?}\n{instance:#}");
}

/// How a push receiver answers one request.
#[derive(Clone, Debug)]
pub enum Answer {
    /// This status, empty body.
    Status(u16),
    /// This status with a JSON body.
    Json(u16, Value),
}

/// A request a push receiver got.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub headers: HeaderMap,
    pub body: String,
    pub at: Instant,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().expect("ASCII header"))
    }
}

struct Script {
    requests: Vec<Recorded>,
    /// Answers for the next requests, in order.
    plan: VecDeque<Answer>,
    /// The answer once the plan is used up.
    then: Answer,
}

/// An RFC 8935 push endpoint on 127.0.0.1 that records every POST and
/// answers by plan.
pub struct PushReceiver {
    pub url: String,
    script: Arc<Mutex<Script>>,
    server: JoinHandle<()>,
}

impl Drop for PushReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn record(State(script): State<Arc<Mutex<Script>>>, headers: HeaderMap, body: Bytes) -> Response {
    let mut script = script.lock().expect("script lock");
    let body = String::from_utf8(body.to_vec()).expect("UTF-8 body");
    script.requests.push(Recorded { headers, body, at: Instant::now() });
    let answer = script.plan.pop_front().unwrap_or_else(|| script.then.clone());
    drop(script);
    match answer {
        Answer::Status(code) => StatusCode::from_u16(code).expect("status").into_response(),
        Answer::Json(code, body) => (StatusCode::from_u16(code).expect("status"), axum::Json(body)).into_response(),
    }
}

impl PushReceiver {
    /// A receiver that answers 202 to everything.
    pub async fn accepting() -> PushReceiver {
        PushReceiver::scripted(Vec::new(), Answer::Status(202)).await
    }

    /// A receiver that answers `plan` in order, then `then` forever.
    pub async fn scripted(plan: Vec<Answer>, then: Answer) -> PushReceiver {
        let script = Arc::new(Mutex::new(Script { requests: Vec::new(), plan: plan.into(), then }));
        let app = Router::new().route("/events", post(record)).with_state(Arc::clone(&script));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind receiver");
        let url = format!("http://{}/events", listener.local_addr().expect("addr"));
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("receiver serves");
        });
        PushReceiver { url, script, server }
    }

    /// From now on, answer `then` (the plan is dropped).
    pub fn answer_from_now(&self, then: Answer) {
        let mut script = self.script.lock().expect("script lock");
        script.plan.clear();
        script.then = then;
    }

    /// Everything received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.script.lock().expect("script lock").requests.clone()
    }

    /// Waits (up to [`WAIT`]) until at least `count` requests arrived.
    pub async fn wait_for(&self, count: usize) -> Vec<Recorded> {
        let deadline = Instant::now() + WAIT;
        loop {
            let requests = self.requests();
            if requests.len() >= count {
                return requests;
            }
            assert!(Instant::now() < deadline, "got {} of {count} pushes in {WAIT:?}", requests.len());
            tokio::time::sleep(TICK).await;
        }
    }

    /// Asserts nothing more than `count` requests arrive within `quiet`.
    pub async fn assert_stays_at(&self, count: usize, quiet: Duration) {
        let deadline = Instant::now() + quiet;
        while Instant::now() < deadline {
            let got = self.requests().len();
            assert!(got <= count, "expected no more than {count} pushes, got {got}");
            tokio::time::sleep(TICK).await;
        }
        assert_eq!(self.requests().len(), count);
    }
}

/// Asserts a push request is RFC 8935: `Content-Type:
/// application/secevent+jwt`, `Accept: application/json`, and exactly the
/// stream's `authorization_header` (or none).
#[track_caller]
pub fn assert_push_request(request: &Recorded, authorization: Option<&str>) {
    assert_eq!(request.header("content-type"), Some("application/secevent+jwt"));
    assert_eq!(request.header("accept"), Some("application/json"));
    assert_eq!(request.header("authorization"), authorization);
    assert_eq!(request.body.split('.').count(), 3, "a compact JWS: {}", request.body);
}

/// Bodies past this size may be refused before the hub reads them all.
pub const OVERSIZED: usize = 64 * 1024;

/// Sends `request`; an `oversized` one is tried up to 3 times. The hub
/// answers an oversized body (413) without reading the rest of it, and
/// HTTP/1.1 gives the server no way to stop a client mid-upload (no
/// `Expect: 100-continue` here): when the connection closes while the client
/// is still writing, the client sees a reset instead of the 413. A hub that
/// died fails every try.
pub async fn send_uploading(request: reqwest::RequestBuilder, oversized: bool) -> reqwest::Result<reqwest::Response> {
    let tries = if oversized { 3 } else { 1 };
    let mut last = None;
    for _ in 0..tries {
        let Some(attempt) = request.try_clone() else { return request.send().await };
        match attempt.send().await {
            Ok(response) => return Ok(response),
            Err(error) if error.is_request() || error.is_body() || error.is_connect() => last = Some(error),
            Err(error) => return Err(error),
        }
    }
    match last {
        Some(error) => Err(error),
        None => request.send().await,
    }
}
