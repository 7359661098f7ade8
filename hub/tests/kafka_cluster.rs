//! Kafka scale-out mode end to end: three `caep-hub serve` processes share a
//! private Kafka-protocol broker (Tansu). Issuers, receivers and streams are
//! created at different instances, an agent forest is established and
//! touched through all three, every root is revoked, and the instance owning
//! the most trees (by graph partition) is SIGKILLed while the cascades are in
//! flight. Every (stream, session) leaf must still reach its receiver (push,
//! or poll at a surviving instance) with the IdP's `txn`, exactly once by
//! `jti`, and the cascade reports of the surviving instances must show every
//! leaf delivered.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use caep_schemas::event::{Event, SessionEstablished, SessionRevoked};
use caep_schemas::jose::{Algorithm, Jwks, SigningKey};
use caep_schemas::set::{Expectations, SecurityEventToken};
use caep_schemas::subject::SubjectId;
use caep_simulations::tansu::TansuBroker;
use serde_json::{Value, json};
use support::HubProcess;
use tokio::task::JoinSet;

const ADMIN: &str = "kafka-cluster-admin";
/// Shared by every instance: the key sealing receivers' credentials in the shared log.
const SECRET_KEY: &str = "a2Fma2EtY2x1c3Rlci10ZXN0LXNlY3JldC1rZXktMzI";
/// The hub's issuer, shared by the three instances (a load balancer's name:
/// no instance ever needs to reach it).
const ISSUER: &str = "https://hub.kafka-cluster.test";
const IDP: &str = "https://idp.kafka-cluster.test";
const PUSH: &str = "urn:ietf:rfc:8935";
const SESSION_REVOKED: &str = "https://schemas.openid.net/secevent/caep/event-type/session-revoked";

const INSTANCES: usize = 3;
const TREES: usize = 3;
/// Sessions per tree: a root and a fan-out of 3 (levels of 1, 3, 9, 27, 27).
const PER_TREE: usize = 67;
const PUSH_RECEIVERS: usize = 4;
/// Receiver index of the poll receiver (after the push receivers).
const POLL_RECEIVER: usize = PUSH_RECEIVERS;

/// Control-plane propagation and touches taking effect.
const SETTLE: Duration = Duration::from_secs(60);
/// Delivery after the SIGKILL: a rebalance waits for the session timeout.
const DELIVERY: Duration = Duration::from_secs(120);

fn session_id(tree: usize, index: usize) -> String {
    format!("t{tree}-s{index}")
}

fn user(tree: usize) -> SubjectId {
    SubjectId::email(format!("owner-{tree}@kafka-cluster.test"))
}

/// Whether receiver `receiver` reports that session (`tree`, `index`) reached it.
fn touches(receiver: usize, tree: usize, index: usize) -> bool {
    !(index + 2 * tree + receiver).is_multiple_of(3)
}

/// The instance a request about session (`tree`, `index`) goes to.
fn spread(tree: usize, index: usize, salt: usize) -> usize {
    (tree + index + salt) % INSTANCES
}

/// Retries `probe` until it yields a value, panicking with `what` (and the
/// last probe's complaint) after `within`.
async fn until<T, F, Fut>(what: &str, within: Duration, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    try_until(what, within, probe).await.unwrap_or_else(|failure| panic!("{failure}"))
}

/// [`until`] that returns the failure instead of panicking.
async fn try_until<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + within;
    loop {
        match probe().await {
            Ok(value) => return Ok(value),
            Err(last) if Instant::now() >= deadline => {
                return Err(format!("{what}: not within {within:?}; last: {last}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A push receiver on loopback: records every SET, answers 202.
struct Webhook {
    url: String,
    received: Arc<Mutex<Vec<String>>>,
}

async fn webhook() -> Webhook {
    let (url, received) = support::recording_webhook(Duration::ZERO).await;
    Webhook { url, received }
}

/// A receiver and its stream.
struct Receiver {
    audience: String,
    token: String,
    stream_id: String,
    /// Every SET it got (push bodies, or poll results), duplicates included.
    received: Arc<Mutex<Vec<String>>>,
}

/// The cluster and its logs; on a panic, prints every log's tail and keeps
/// the directory.
struct Cluster {
    // Dropped in this order: the hubs, then the broker, then the directory.
    hubs: Vec<HubProcess>,
    tansu: TansuBroker,
    dir: Option<tempfile::TempDir>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for hub in &self.hubs {
                eprintln!("===== {} ({}) log tail =====\n{}", hub.name, hub.base, hub.log_tail(80));
            }
            eprintln!("===== tansu log tail =====\n{}", support::tail(&self.tansu.log_path(), 40));
            if let Some(dir) = self.dir.take() {
                let _ = std::fs::copy(self.tansu.log_path(), dir.path().join("tansu.log"));
                eprintln!("logs kept in {}", dir.keep().display());
            }
        }
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().expect("client")
}

/// Sends a request: (status, body), or the error with its causes.
async fn send(request: reqwest::RequestBuilder) -> Result<(u16, String), String> {
    let response = request.send().await.map_err(|error| {
        let mut text = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            text.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        text
    })?;
    let status = response.status().as_u16();
    Ok((status, response.text().await.unwrap_or_default()))
}

/// Posts a signed IdP SET to `base/ingest`; 202 expected.
async fn ingest(client: &reqwest::Client, base: &str, key: &SigningKey, set: SecurityEventToken) {
    let token = set.sign(key).expect("sign");
    let request = client.post(format!("{base}/ingest")).header("content-type", "application/secevent+jwt").body(token);
    let (status, body) = send(request).await.unwrap_or_else(|e| panic!("ingest at {base}: {e}"));
    assert_eq!(status, 202, "ingest at {base}: {body}");
}

fn unique_prefix() -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_nanos();
    format!("caep-test-{}-{nanos}", std::process::id())
}

fn start_hubs(dir: &Path, brokers: &str) -> Vec<HubProcess> {
    let prefix = unique_prefix();
    (0..INSTANCES)
        .map(|i| {
            let name = ["hub-a", "hub-b", "hub-c"][i];
            let port = support::free_port();
            HubProcess::spawn_on(
                name,
                port,
                dir,
                &[
                    ("CAEP_HUB_KAFKA_BROKERS", brokers.to_owned()),
                    ("CAEP_HUB_KAFKA_TOPIC_PREFIX", prefix.clone()),
                    ("CAEP_HUB_KAFKA_GROUP", format!("{prefix}-group")),
                    ("CAEP_HUB_KAFKA_PARTITIONS", "6".to_owned()),
                    ("CAEP_HUB_ADVERTISED_URL", format!("http://127.0.0.1:{port}")),
                    ("CAEP_HUB_ISSUER", ISSUER.to_owned()),
                    ("CAEP_HUB_ADMIN_TOKEN", ADMIN.to_owned()),
                    ("CAEP_HUB_SECRET_KEY", SECRET_KEY.to_owned()),
                    ("CAEP_HUB_PUSH_ALLOW_CIDRS", "127.0.0.0/8".to_owned()),
                    ("CAEP_HUB_LONG_POLL_SECS", "2".to_owned()),
                ],
            )
        })
        .collect()
}

/// Registers a receiver at `register_at`, then creates its stream at
/// `create_at` as soon as its token is known there.
async fn receiver(
    client: &reqwest::Client,
    register_at: &str,
    create_at: &str,
    name: &str,
    delivery: Option<&Webhook>,
) -> Receiver {
    let audience = format!("https://{name}.kafka-cluster.test");
    let request = client
        .post(format!("{register_at}/admin/receivers"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": name, "audience": audience}));
    let (status, body) = send(request).await.expect("register receiver");
    assert_eq!(status, 201, "register {name} at {register_at}: {body}");
    let token = serde_json::from_str::<Value>(&body).expect("json")["token"].as_str().expect("token").to_owned();
    let mut config = json!({"events_requested": [SESSION_REVOKED]});
    if let Some(webhook) = delivery {
        config["delivery"] = json!({"method": PUSH, "endpoint_url": webhook.url});
    }
    // Until the control plane brings the receiver to `create_at`, its token is unknown there (401).
    let (token_ref, config) = (&token, &config);
    let created: Value = until(&format!("stream of {name} created at {create_at}"), SETTLE, || async move {
        let request = client.post(format!("{create_at}/ssf/streams")).bearer_auth(token_ref).json(config);
        match send(request).await? {
            (201, body) => Ok(serde_json::from_str(&body).expect("json")),
            (401, body) => Err(format!("401 {body}")),
            (status, body) => panic!("create stream of {name} at {create_at}: {status} {body}"),
        }
    })
    .await;
    let stream_id = created["stream_id"].as_str().expect("stream_id").to_owned();
    let received = delivery.map_or_else(|| Arc::new(Mutex::new(Vec::new())), |w| Arc::clone(&w.received));
    Receiver { audience, token, stream_id, received }
}

/// Reads the touches of tree `tree` from `/admin/sessions/{root}` at `base`:
/// session → streams touched. Sessions not found are absent.
async fn tree_touches(
    client: &reqwest::Client,
    base: &str,
    tree: usize,
) -> Result<BTreeMap<String, BTreeSet<String>>, String> {
    let request = client.get(format!("{base}/admin/sessions/{}", session_id(tree, 0))).bearer_auth(ADMIN);
    let (status, body) = send(request).await?;
    if status != 200 {
        return Err(format!("{base}: {status} {body}"));
    }
    let view: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    let streams = |touches: &Value| -> BTreeSet<String> {
        touches.as_array().into_iter().flatten().filter_map(|t| t["stream_id"].as_str().map(str::to_owned)).collect()
    };
    let mut found = BTreeMap::new();
    found.insert(session_id(tree, 0), streams(&view["touches"]));
    for entry in view["subtree"].as_array().into_iter().flatten() {
        if let Some(id) = entry["session_id"].as_str() {
            found.entry(id.to_owned()).or_insert_with(BTreeSet::new).extend(streams(&entry["touches"]));
        }
    }
    Ok(found)
}

/// Polls `stream_id` at the surviving instances in turn, acknowledging
/// everything received, until aborted. Counts failed polls.
fn poll_forever(
    client: reqwest::Client,
    bases: Vec<String>,
    path: String,
    token: String,
    received: Arc<Mutex<Vec<String>>>,
    failures: Arc<Mutex<Vec<String>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ack: Vec<String> = Vec::new();
        for round in 0usize.. {
            let base = &bases[round % bases.len()];
            let request = client
                .post(format!("{base}{path}"))
                .bearer_auth(&token)
                .json(&json!({"maxEvents": 100, "returnImmediately": false, "ack": ack}));
            match send(request).await {
                Ok((200, body)) => {
                    let body: Value = serde_json::from_str(&body).expect("poll response is JSON");
                    ack.clear();
                    for (jti, set) in body["sets"].as_object().expect("sets object") {
                        received.lock().expect("lock").push(set.as_str().expect("compact JWS").to_owned());
                        ack.push(jti.clone());
                    }
                }
                Ok((status, body)) => {
                    // The acks were not taken: keep them for the next poll.
                    failures.lock().expect("lock").push(format!("{base}: {status} {body}"));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => {
                    failures.lock().expect("lock").push(format!("{base}: {error}"));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    })
}

/// What one receiver got: (session, jti) → copies, and SETs that are not
/// an expected kind of leaf (described).
#[derive(Default)]
struct Tally {
    copies: BTreeMap<(String, String), usize>,
    wrong: Vec<String>,
}

impl Tally {
    fn sessions(&self) -> BTreeSet<String> {
        self.copies.keys().map(|(session, _)| session.clone()).collect()
    }
}

/// Verifies every SET `receiver` got against each of `jwks` (each surviving
/// instance's JWKS must verify every SET: receivers fetch it from any).
fn tally(receiver: &Receiver, jwks: &[(String, Jwks)], txns: &BTreeMap<usize, String>) -> Tally {
    let mut tally = Tally::default();
    for token in receiver.received.lock().expect("lock").iter() {
        let mut verified = None;
        for (base, keys) in jwks {
            match SecurityEventToken::verify(token, keys, &Expectations::new(ISSUER, &receiver.audience)) {
                Ok(set) => verified = Some(set),
                Err(error) => {
                    let header = token.split('.').next().unwrap_or_default();
                    tally.wrong.push(format!("does not verify with the JWKS of {base}: {error} (header {header})"));
                }
            }
        }
        let Some(set) = verified else { continue };
        let Event::SessionRevoked(_) = &set.event else {
            tally.wrong.push(format!("not a session-revoked SET: {}", set.event.type_uri()));
            continue;
        };
        let Some(SubjectId::Opaque { id: session }) = set.sub_id.as_complex().and_then(|c| c.session.clone()) else {
            tally.wrong.push(format!("sub_id without an opaque session: {}", set.sub_id.to_value()));
            continue;
        };
        let tree = session.strip_prefix('t').and_then(|rest| rest.split('-').next()).and_then(|t| t.parse().ok());
        let expected_txn = tree.and_then(|t: usize| txns.get(&t));
        if set.txn.as_ref() != expected_txn {
            tally.wrong.push(format!("{session}: txn {:?}, expected {expected_txn:?}", set.txn));
        }
        *tally.copies.entry((session, set.jti.clone())).or_default() += 1;
    }
    tally
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_deliver_every_leaf_across_a_sigkill() {
    let started = Instant::now();
    let binary = caep_simulations::tansu::binary().unwrap_or_else(|e| panic!("{e:#}"));
    let tansu = TansuBroker::start(binary).await.unwrap_or_else(|e| panic!("tansu: {e:#}"));
    let dir = tempfile::Builder::new().prefix("kafka-cluster-").tempdir().expect("temp dir");
    let hubs = start_hubs(dir.path(), &tansu.brokers());
    let mut cluster = Cluster { tansu, hubs, dir: Some(dir) };
    let client = &client();
    for hub in &mut cluster.hubs {
        hub.wait_healthy(client, SETTLE).await;
    }
    let bases: Vec<String> = cluster.hubs.iter().map(|h| h.base.clone()).collect();
    eprintln!("broker and {INSTANCES} instances up after {:?}", started.elapsed());

    // The IdP, trusted at instance A, known at every instance.
    let idp_key = SigningKey::generate(Algorithm::Es256).expect("key");
    let request = client
        .post(format!("{}/admin/issuers", bases[0]))
        .bearer_auth(ADMIN)
        .json(&json!({"issuer": IDP, "jwks": Jwks::from_keys([&idp_key]).to_json()}));
    let (status, body) = send(request).await.expect("issuer");
    assert_eq!(status, 201, "{body}");
    for base in &bases {
        until(&format!("the IdP known at {base}"), SETTLE, || async move {
            let (status, body) = send(client.get(format!("{base}/admin/issuers")).bearer_auth(ADMIN)).await?;
            if status == 200 && body.contains(IDP) { Ok(()) } else { Err(format!("{status} {body}")) }
        })
        .await;
    }

    // Receivers registered at one instance, their streams created at the next.
    let mut receivers = Vec::new();
    for r in 0..=POLL_RECEIVER {
        let webhook = if r < PUSH_RECEIVERS { Some(webhook().await) } else { None };
        let (register_at, create_at) = (&bases[r % INSTANCES], &bases[(r + 1) % INSTANCES]);
        receivers.push(receiver(client, register_at, create_at, &format!("rp{r}"), webhook.as_ref()).await);
    }
    eprintln!("issuer, receivers and streams in place after {:?}", started.elapsed());

    // The forest, level by level (a child after its parent's 202), spread
    // over the instances.
    let levels = [0..1, 1..4, 4..13, 13..40, 40..PER_TREE];
    for level in levels {
        let mut ingests = JoinSet::new();
        for tree in 0..TREES {
            for index in level.clone() {
                let (client, key, base) = (client.clone(), idp_key.clone(), bases[spread(tree, index, 0)].clone());
                ingests.spawn(async move {
                    let parent = (index > 0).then(|| SubjectId::opaque(session_id(tree, (index - 1) / 3)));
                    let event =
                        Event::SessionEstablished(SessionEstablished { parent_session: parent, ..Default::default() });
                    let subject = SubjectId::session_of(SubjectId::opaque(session_id(tree, index)), Some(user(tree)));
                    ingest(&client, &base, &key, SecurityEventToken::new(IDP, ISSUER, subject, event)).await;
                });
            }
        }
        while let Some(done) = ingests.join_next().await {
            done.expect("ingest task");
        }
    }
    eprintln!("{} sessions established after {:?}", TREES * PER_TREE, started.elapsed());

    // Touches: add-subject at various instances, half with a complex
    // {session, user} subject, half as the SDK's touch ({session} only).
    let mut expected: Vec<BTreeMap<usize, BTreeSet<String>>> = vec![BTreeMap::new(); receivers.len()];
    let limit = Arc::new(tokio::sync::Semaphore::new(8));
    let mut touches_sent = JoinSet::new();
    for (r, receiver) in receivers.iter().enumerate() {
        for tree in 0..TREES {
            for index in 0..PER_TREE {
                if !touches(r, tree, index) {
                    continue;
                }
                expected[r].entry(tree).or_default().insert(session_id(tree, index));
                let mut subject =
                    json!({"format": "complex", "session": {"format": "opaque", "id": session_id(tree, index)}});
                if r % 2 == 0 {
                    subject["user"] = user(tree).to_value();
                }
                let body = json!({"stream_id": receiver.stream_id, "subject": subject});
                let url = format!("{}/ssf/subjects/add", bases[spread(tree, index, r)]);
                let (client, token, limit) = (client.clone(), receiver.token.clone(), Arc::clone(&limit));
                touches_sent.spawn(async move {
                    let _permit = limit.acquire().await.expect("semaphore");
                    let (status, text) = send(client.post(&url).bearer_auth(&token).json(&body)).await.expect("touch");
                    assert_eq!(status, 200, "touch at {url}: {text}");
                });
            }
        }
    }
    while let Some(done) = touches_sent.join_next().await {
        done.expect("touch task");
    }
    let leaves: usize = expected.iter().flat_map(|by_tree| by_tree.values()).map(BTreeSet::len).sum();
    eprintln!("{leaves} touches reported after {:?}", started.elapsed());

    // Wait until every touch is in effect: some instance's view of each
    // tree (`/admin/sessions/{root}`) has every session with every stream
    // that touched it. The revocations are sent only after this (or its
    // deadline): a failure here is recorded, and the test goes on to check
    // delivery (a touch answered 200 is ordered before a later revocation in
    // the tree's partition, and a late touch of a revoked session is sent
    // its revocation anyway), then fails with it at the end.
    let mut failures: Vec<String> = Vec::new();
    let touches_deadline = Instant::now() + SETTLE;
    let mut owners: Vec<Vec<usize>> = vec![Vec::new(); INSTANCES];
    for tree in 0..TREES {
        let want: BTreeMap<String, BTreeSet<String>> = (0..PER_TREE)
            .map(|index| {
                let streams = (0..receivers.len())
                    .filter(|&r| touches(r, tree, index))
                    .map(|r| receivers[r].stream_id.clone())
                    .collect();
                (session_id(tree, index), streams)
            })
            .collect();
        let (want, bases) = (&want, &bases);
        let within = touches_deadline.saturating_duration_since(Instant::now());
        let in_effect = try_until(&format!("tree {tree} established and touched"), within, || async move {
            let mut last = Vec::new();
            for (instance, base) in bases.iter().enumerate() {
                match tree_touches(client, base, tree).await {
                    Ok(found) => {
                        let short: Vec<&String> = want
                            .iter()
                            .filter(|(s, w)| !found.get(*s).is_some_and(|f| f.is_superset(w)))
                            .map(|(s, _)| s)
                            .collect();
                        if short.is_empty() {
                            return Ok(instance);
                        }
                        last.push(format!(
                            "{base}: {} sessions incomplete, e.g. {:?}",
                            short.len(),
                            &short[..short.len().min(3)]
                        ));
                    }
                    Err(error) => last.push(error),
                }
            }
            Err(last.join("; "))
        })
        .await;
        match in_effect {
            Ok(instance) => owners[instance].push(tree),
            Err(failure) => {
                eprintln!("FAILURE (the test goes on): {failure}");
                failures.push(failure);
            }
        }
    }
    // The victim: the instance that owns the most trees' graph partitions
    // (only the owner answers `/admin/sessions`), so the SIGKILL takes
    // planned cascades with it.
    let victim = (0..INSTANCES).max_by_key(|&i| (owners[i].len(), i == 1)).expect("instances");
    eprintln!("graph owners by instance: {owners:?}; the victim is {}", cluster.hubs[victim].name);
    eprintln!("touches in effect (or given up on) after {:?}", started.elapsed());

    // Revoke every root, each at a different instance, then SIGKILL the
    // victim as soon as the IdP has its 202s.
    let txns: BTreeMap<usize, String> =
        (0..TREES).map(|t| (t, format!("kafka-cluster-revoke-{t}-{}", unique_prefix()))).collect();
    let mut revocations = JoinSet::new();
    for (&tree, txn) in &txns {
        let (client, key, base) = (client.clone(), idp_key.clone(), bases[tree % INSTANCES].clone());
        let set = SecurityEventToken::new(
            IDP,
            ISSUER,
            SubjectId::session_of(SubjectId::opaque(session_id(tree, 0)), Some(user(tree))),
            Event::SessionRevoked(SessionRevoked::default()),
        )
        .with_txn(txn.clone());
        revocations.spawn(async move { ingest(&client, &base, &key, set).await });
    }
    while let Some(done) = revocations.join_next().await {
        done.expect("revocation task");
    }
    cluster.hubs[victim].kill_9();
    let revoked_at = Instant::now();
    let delivered_at_kill: usize = receivers.iter().map(|r| r.received.lock().expect("lock").len()).sum();
    eprintln!(
        "roots revoked, {} SIGKILLed after {:?} with {delivered_at_kill} of {leaves} leaves delivered",
        cluster.hubs[victim].name,
        started.elapsed()
    );
    assert!(delivered_at_kill < leaves, "every leaf was delivered before the SIGKILL: the test proves nothing");

    // The poll receiver polls the surviving instances, acknowledging.
    let survivors: Vec<String> = (0..INSTANCES).filter(|&i| i != victim).map(|i| bases[i].clone()).collect();
    let poll = &receivers[POLL_RECEIVER];
    let poll_failures = Arc::new(Mutex::new(Vec::new()));
    let poller = poll_forever(
        client.clone(),
        survivors.clone(),
        format!("/ssf/poll/{}", poll.stream_id),
        poll.token.clone(),
        Arc::clone(&poll.received),
        Arc::clone(&poll_failures),
    );

    // Each surviving instance's JWKS (receivers fetch it from any instance).
    let mut jwks = Vec::new();
    for base in &survivors {
        let (status, text) = send(client.get(format!("{base}/ssf/jwks.json"))).await.expect("jwks");
        assert_eq!(status, 200, "{text}");
        jwks.push((base.clone(), Jwks::from_json(&text).expect("jwks parses")));
    }

    // Every leaf arrives.
    let (receivers_ref, jwks_ref, txns_ref, expected_ref) = (&receivers, &jwks, &txns, &expected);
    let all_arrived = try_until("every leaf at its receiver", DELIVERY, || async move {
        let (mut missing, mut by) = (0, Vec::new());
        for (r, receiver) in receivers_ref.iter().enumerate() {
            let got = tally(receiver, jwks_ref, txns_ref).sessions();
            for (tree, sessions) in &expected_ref[r] {
                let lost = sessions.iter().filter(|s| !got.contains(*s)).count();
                if lost > 0 {
                    missing += lost;
                    by.push(format!("rp{r}/tree {tree}: {lost} of {}", sessions.len()));
                }
            }
        }
        if missing == 0 { Ok(()) } else { Err(format!("{missing} of {leaves} leaves missing ({})", by.join(", "))) }
    })
    .await;
    if let Err(failure) = all_arrived {
        // What the surviving instances say about each cascade, then fail.
        let mut reports = Vec::new();
        for base in &survivors {
            for txn in txns.values() {
                let reply = send(client.get(format!("{base}/admin/cascades/{txn}")).bearer_auth(ADMIN)).await;
                let summary = match reply {
                    Ok((200, body)) => {
                        let report: Value = serde_json::from_str(&body).unwrap_or_default();
                        ["root", "total", "delivered", "pending", "failed"]
                            .map(|k| format!("{k} {}", report[k]))
                            .join(", ")
                    }
                    Ok((status, body)) => format!("{status} {body}"),
                    Err(error) => error,
                };
                reports.push(format!("{base} {txn}: {summary}"));
            }
        }
        let polls = poll_failures.lock().expect("lock").clone();
        panic!(
            "{failure}\ncascade reports:\n  {}\nfailed polls: {} (last: {:?})\nearlier failures: {failures:?}",
            reports.join("\n  "),
            polls.len(),
            polls.last()
        );
    }
    eprintln!("every leaf delivered {:?} after the revocations", revoked_at.elapsed());

    // The cascade reports, from each surviving instance, show every leaf delivered.
    for base in &survivors {
        for (&tree, txn) in &txns {
            let want: BTreeSet<(String, String)> = receivers
                .iter()
                .enumerate()
                .flat_map(|(r, receiver)| {
                    expected[r].get(&tree).into_iter().flatten().map(|s| (receiver.stream_id.clone(), s.clone()))
                })
                .collect();
            let want_ref = &want;
            let report: Value = until(&format!("cascade {txn} complete at {base}"), DELIVERY, || async move {
                let (status, body) =
                    send(client.get(format!("{base}/admin/cascades/{txn}")).bearer_auth(ADMIN)).await?;
                if status != 200 {
                    return Err(format!("{status} {body}"));
                }
                let report: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
                if report["complete"] == true && report["delivered"] == want_ref.len() as u64 {
                    Ok(report)
                } else {
                    let counts = ["total", "delivered", "pending", "failed"].map(|k| format!("{k} {}", report[k]));
                    Err(format!("{} (want {} delivered)", counts.join(", "), want_ref.len()))
                }
            })
            .await;
            let got: BTreeSet<(String, String)> = report["leaves"]
                .as_array()
                .expect("leaves")
                .iter()
                .map(|l| {
                    (
                        l["stream_id"].as_str().unwrap_or("").to_owned(),
                        l["session_id"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect();
            assert_eq!(report["total"], want.len() as u64, "cascade {txn} at {base}: {report}");
            assert_eq!(report["failed"], 0, "cascade {txn} at {base}");
            assert_eq!(got, want, "cascade {txn} at {base}: the report's leaves");
        }
    }
    poller.abort();

    // Exactness: per receiver, the sessions it got are exactly those it
    // touched, each under one jti; same-jti redeliveries are counted.
    let mut duplicates = 0;
    for (r, receiver) in receivers.iter().enumerate() {
        let tally = tally(receiver, &jwks, &txns);
        assert!(
            tally.wrong.is_empty(),
            "rp{r}: {} bad SETs, e.g. {:?}",
            tally.wrong.len(),
            &tally.wrong[..tally.wrong.len().min(5)]
        );
        let want: BTreeSet<String> = expected[r].values().flatten().cloned().collect();
        let got = tally.sessions();
        let missing: Vec<_> = want.difference(&got).collect();
        let unexpected: Vec<_> = got.difference(&want).collect();
        assert!(missing.is_empty() && unexpected.is_empty(), "rp{r}: missing {missing:?}, unexpected {unexpected:?}");
        let mut jtis: BTreeMap<&String, usize> = BTreeMap::new();
        for ((session, _), copies) in &tally.copies {
            *jtis.entry(session).or_default() += 1;
            duplicates += copies - 1;
        }
        let twice: Vec<_> = jtis.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "rp{r}: sessions revoked under more than one jti: {twice:?}");
    }
    let failed_polls = poll_failures.lock().expect("lock").clone();
    eprintln!(
        "{leaves} leaves exact; {duplicates} same-jti redeliveries; {} failed polls{}; total {:?}",
        failed_polls.len(),
        failed_polls.first().map(|f| format!(" (first: {f})")).unwrap_or_default(),
        started.elapsed()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    drop(cluster);
}
