//! Kafka client plumbing for the scale-out mode, over `rdkafka` (bundled
//! librdkafka, static build).
//!
//! What the rest of the hub builds on:
//! - [`KafkaSettings`]: brokers, topic prefix, group, partition count.
//! - [`ensure_topics`]: creates missing topics, then waits until metadata
//!   shows them with the wanted partition count.
//! - [`Producer`]: idempotent producer (`acks=all`, lz4) to explicit
//!   partitions; [`partition_for`] is the one stable key → partition map.
//! - [`TailReader`]: reads one whole topic-partition without a group (state
//!   every instance replicates), with the high watermark as a read barrier.
//! - [`GroupConsumer`]: a consumer-group member with manual commits and
//!   [`Rebalance`] events.
//!
//! Broker compatibility (Tansu, see `KAFKA.md`): no transactions, no
//! snappy, no CreatePartitions, so partition counts are fixed at creation
//! and delivery is at least once. Group assignment uses the eager `range`
//! strategy: it assigns the same partition numbers of equally partitioned
//! topics to the same member (co-partitioning) and needs nothing from the
//! broker beyond the classic JoinGroup/SyncGroup protocol.
//!
//! librdkafka's own log lines go to `tracing` (target `librdkafka`): errors
//! at `warn`, everything else at `debug`. The rdkafka crate's logs go to
//! `tracing` as well (its `tracing` feature).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance as RdRebalance, StreamConsumer,
};
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::message::Message;
use rdkafka::metadata::Metadata;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

/// Timeout of one blocking metadata / offsets / watermark request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`ensure_topics`] waits for metadata to show the topics.
const TOPIC_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a send retries while librdkafka's local queue is full.
const QUEUE_FULL_TIMEOUT: Duration = Duration::from_secs(30);
/// Delivery timeout of one record (retries included) before the send fails.
const MESSAGE_TIMEOUT_MS: &str = "30000";
/// Producer batching delay: small, latency matters more than batch size.
const LINGER_MS: &str = "5";
/// The least rebalance timeout (`max.poll.interval.ms`), whatever the
/// session timeout: a partition's catch-up may keep a loop from polling for
/// a few seconds, and a member that misses it leaves the group.
const MIN_REBALANCE_TIMEOUT_MS: u32 = 6_000;
/// Group partition assignment strategy (see the module documentation).
pub const ASSIGNMENT_STRATEGY: &str = "range";

/// Kafka settings (from `CAEP_HUB_KAFKA_*`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct KafkaSettings {
    /// Bootstrap servers, `host:port,host:port`.
    pub brokers: String,
    /// Prefix of every topic name: `{prefix}.{name}`.
    pub topic_prefix: String,
    /// Consumer group of the hub instances.
    pub group_id: String,
    /// Partitions of partitioned topics (fixed once created).
    pub partitions: i32,
    /// Replication factor of created topics (3 in production).
    pub replication_factor: i32,
    /// Consumer-group session timeout.
    pub session_timeout_ms: u32,
    /// Longest a fetch waits at the broker for new data. Apache Kafka answers
    /// as soon as data arrives, but Tansu and librdkafka's mock broker wait
    /// the whole time, so there this bounds produce → consume latency
    /// (measured on Tansu: p50 19 ms at 10 ms, 108 ms at 100 ms), and each
    /// consumer sends about 1,000 / `fetch_wait_ms` idle fetches a second.
    pub fetch_wait_ms: u32,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".to_owned(),
            topic_prefix: "caep".to_owned(),
            group_id: "caep-hub".to_owned(),
            partitions: 12,
            replication_factor: 1,
            session_timeout_ms: 6000,
            fetch_wait_ms: 10,
        }
    }
}

impl KafkaSettings {
    /// The full topic name: `{prefix}.{name}`.
    pub fn topic(&self, name: &str) -> String {
        format!("{}.{}", self.topic_prefix, name)
    }

    /// Settings every client shares.
    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", "caep-hub")
            .set("broker.address.ttl", "1000")
            .set("statistics.interval.ms", super::stats::STATS_INTERVAL_MS);
        config
    }

    fn validate(&self) -> Result<(), KafkaError> {
        if self.brokers.trim().is_empty() {
            return Err(KafkaError::InvalidSettings("brokers is empty".into()));
        }
        if self.partitions < 1 {
            return Err(KafkaError::InvalidSettings(format!("partitions must be at least 1, not {}", self.partitions)));
        }
        if self.replication_factor < 1 {
            return Err(KafkaError::InvalidSettings(format!(
                "replication factor must be at least 1, not {}",
                self.replication_factor
            )));
        }
        // librdkafka's ranges for fetch.wait.max.ms and session.timeout.ms.
        if self.fetch_wait_ms > 300_000 {
            return Err(KafkaError::InvalidSettings(format!(
                "fetch wait must be at most 300000 ms, not {}",
                self.fetch_wait_ms
            )));
        }
        if !(1..=3_600_000).contains(&self.session_timeout_ms) {
            return Err(KafkaError::InvalidSettings(format!(
                "session timeout must be 1 to 3600000 ms, not {}",
                self.session_timeout_ms
            )));
        }
        Ok(())
    }
}

/// Errors of the Kafka layer. Messages name the operation and the topic;
/// they never contain settings beyond broker addresses (no secrets).
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// An rdkafka / librdkafka error, with the operation that failed.
    #[error("kafka {op}: {source}")]
    Client {
        op: String,
        #[source]
        source: RdKafkaError,
    },
    /// The broker refused to create a topic.
    #[error("kafka: creating topic {topic}: {code}")]
    CreateTopic { topic: String, code: RDKafkaErrorCode },
    /// A topic exists with another partition count than the hub's.
    #[error(
        "kafka: topic {topic} has {actual} partitions, the hub needs {expected} \
         (partition counts are fixed: recreate the topic or change the setting)"
    )]
    PartitionCount { topic: String, expected: i32, actual: i32 },
    /// Something did not happen in time.
    #[error("kafka: timed out {0}")]
    Timeout(String),
    /// A setting is unusable.
    #[error("kafka: invalid setting: {0}")]
    InvalidSettings(String),
    /// A blocking helper task panicked or was cancelled.
    #[error("kafka: background task failed: {0}")]
    Task(String),
    /// The producer went away before a record's delivery report.
    #[error("kafka: producer closed before the delivery report of a record to {topic}")]
    Canceled { topic: String },
}

impl KafkaError {
    fn client(op: impl Into<String>, source: RdKafkaError) -> Self {
        Self::Client { op: op.into(), source }
    }

    /// The librdkafka error code, when there is one.
    pub fn code(&self) -> Option<RDKafkaErrorCode> {
        match self {
            Self::Client { source, .. } => source.rdkafka_error_code(),
            Self::CreateTopic { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Runs a blocking librdkafka call on the blocking pool.
async fn blocking<T, F>(f: F) -> Result<T, KafkaError>
where
    F: FnOnce() -> Result<T, KafkaError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(|e| KafkaError::Task(e.to_string()))?
}

// ---------------------------------------------------------------- logging

fn route_log(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
            tracing::warn!(target: "librdkafka", facility = fac, "{message}")
        }
        _ => tracing::debug!(target: "librdkafka", facility = fac, "{message}"),
    }
}

/// Client context of producers, admin clients and tail readers: routes
/// librdkafka's logs and errors to `tracing`.
#[derive(Clone, Default)]
struct LogContext;

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        route_log(level, fac, log_message);
    }

    fn error(&self, error: RdKafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", %error, "{reason}");
    }

    fn stats_raw(&self, statistics: &[u8]) {
        super::stats::record(statistics);
    }
}

impl ConsumerContext for LogContext {}

// ---------------------------------------------------------------- topics

/// A topic as metadata shows it.
struct TopicState {
    name: String,
    /// Partitions in the metadata.
    partitions: i32,
    /// Whether every partition has a leader.
    ready: bool,
}

/// The topics the cluster knows (topics whose metadata carries an error,
/// such as one still being created, are left out).
fn topic_states(metadata: &Metadata) -> Vec<TopicState> {
    metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| TopicState {
            name: t.name().to_owned(),
            partitions: i32::try_from(t.partitions().len()).unwrap_or(i32::MAX),
            ready: t.partitions().iter().all(|p| p.leader() >= 0 && p.error().is_none()),
        })
        .collect()
}

/// Checks the wanted topics against metadata: `Ok(None)` when all exist and
/// are ready, `Ok(Some(name))` for the first one missing or not ready yet,
/// and an error for a topic with another partition count.
fn check_topics<'a>(states: &[TopicState], topics: &'a [(String, i32)]) -> Result<Option<&'a str>, KafkaError> {
    let mut pending = None;
    for (name, want) in topics {
        match states.iter().find(|t| &t.name == name) {
            Some(t) if t.partitions > 0 && t.partitions != *want => {
                return Err(KafkaError::PartitionCount { topic: name.clone(), expected: *want, actual: t.partitions });
            }
            Some(t) if t.partitions == *want && t.ready => {}
            _ => {
                pending.get_or_insert(name.as_str());
            }
        }
    }
    Ok(pending)
}

/// Creates the `topics` (full name, partitions) that are missing and waits
/// until metadata shows every one with a leader for each partition.
/// Idempotent: existing topics are left alone, but one whose partition
/// count differs is an error ([`KafkaError::PartitionCount`]), since keys
/// map to partitions by count. Only missing topics are created, so no
/// CreateTopics request is sent when everything exists.
pub async fn ensure_topics(settings: &KafkaSettings, topics: &[(String, i32)]) -> Result<(), KafkaError> {
    settings.validate()?;
    if let Some((name, n)) = topics.iter().find(|(_, n)| *n < 1) {
        return Err(KafkaError::InvalidSettings(format!("topic {name}: {n} partitions")));
    }
    let admin: AdminClient<LogContext> = settings
        .client_config()
        .create_with_context(LogContext)
        .map_err(|e| KafkaError::client("creating the admin client", e))?;
    let admin = Arc::new(admin);

    let fetch = |admin: Arc<AdminClient<LogContext>>| {
        blocking(move || {
            admin
                .inner()
                .fetch_metadata(None, REQUEST_TIMEOUT)
                .map(|m| topic_states(&m))
                .map_err(|e| KafkaError::client("fetching metadata", e))
        })
    };

    let states = fetch(admin.clone()).await?;
    if check_topics(&states, topics)?.is_none() {
        return Ok(());
    }
    let missing: Vec<&(String, i32)> =
        topics.iter().filter(|(name, _)| !states.iter().any(|t| &t.name == name)).collect();
    if !missing.is_empty() {
        let new_topics: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|(name, n)| NewTopic::new(name, *n, TopicReplication::Fixed(settings.replication_factor)))
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
        let results =
            admin.create_topics(&new_topics, &options).await.map_err(|e| KafkaError::client("creating topics", e))?;
        for result in results {
            match result {
                Ok(name) => tracing::info!(topic = %name, "kafka topic created"),
                Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    tracing::debug!(topic = %name, "kafka topic created concurrently")
                }
                Err((topic, code)) => return Err(KafkaError::CreateTopic { topic, code }),
            }
        }
    }

    // Wait until metadata shows every topic with all partitions led.
    let deadline = Instant::now() + TOPIC_READY_TIMEOUT;
    loop {
        let states = fetch(admin.clone()).await?;
        let Some(pending) = check_topics(&states, topics)? else {
            return Ok(());
        };
        if Instant::now() >= deadline {
            return Err(KafkaError::Timeout(format!("waiting for topic {pending} to be ready")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------- producer

/// A record to produce to an explicit partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutRecord {
    pub topic: String,
    pub partition: i32,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
}

/// Idempotent producer: `enable.idempotence=true`, `acks=all`, lz4 (never
/// snappy: Tansu drops the connection), `linger.ms=1`. Per partition,
/// records keep the order in which they were handed over, retries included.
/// Cheap to clone (one librdkafka handle).
#[derive(Clone)]
pub struct Producer {
    inner: FutureProducer<LogContext>,
}

impl Producer {
    pub fn new(settings: &KafkaSettings) -> Result<Self, KafkaError> {
        settings.validate()?;
        let inner = settings
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", "lz4")
            .set("linger.ms", LINGER_MS)
            .set("message.timeout.ms", MESSAGE_TIMEOUT_MS)
            .create_with_context(LogContext)
            .map_err(|e| KafkaError::client("creating the producer", e))?;
        Ok(Self { inner })
    }

    /// Hands one record to librdkafka, waiting while its queue is full.
    async fn enqueue(
        &self,
        topic: &str,
        partition: i32,
        key: &[u8],
        payload: &[u8],
    ) -> Result<DeliveryFuture, KafkaError> {
        let deadline = Instant::now() + QUEUE_FULL_TIMEOUT;
        loop {
            let record = FutureRecord::to(topic).partition(partition).key(key).payload(payload);
            match self.inner.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
                    return Err(KafkaError::client(format!("producing to {topic}/{partition}"), e));
                }
            }
        }
    }

    async fn delivered(topic: &str, partition: i32, delivery: DeliveryFuture) -> Result<i64, KafkaError> {
        match delivery.await {
            Ok(Ok(delivery)) => Ok(delivery.offset),
            Ok(Err((e, _))) => Err(KafkaError::client(format!("delivering to {topic}/{partition}"), e)),
            Err(_) => Err(KafkaError::Canceled { topic: topic.to_owned() }),
        }
    }

    /// Sends to an explicit partition; resolves with the record's offset
    /// once all in-sync replicas have it.
    pub async fn send(&self, topic: &str, partition: i32, key: &[u8], payload: &[u8]) -> Result<i64, KafkaError> {
        let delivery = self.enqueue(topic, partition, key, payload).await?;
        Self::delivered(topic, partition, delivery).await
    }

    /// Sends many records with all of them in flight at once; per partition
    /// they are written in input order. Returns their offsets in input
    /// order. On an error some records may have been written (at least
    /// once: the caller retries the lot).
    pub async fn send_all(&self, records: Vec<OutRecord>) -> Result<Vec<i64>, KafkaError> {
        let mut in_flight = Vec::with_capacity(records.len());
        for r in &records {
            in_flight.push(self.enqueue(&r.topic, r.partition, &r.key, &r.payload).await?);
        }
        let mut offsets = Vec::with_capacity(records.len());
        for (r, delivery) in records.iter().zip(in_flight) {
            offsets.push(Self::delivered(&r.topic, r.partition, delivery).await?);
        }
        Ok(offsets)
    }

    /// Waits until every queued record is delivered (or `timeout` passes).
    pub async fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        let producer = self.inner.clone();
        blocking(move || {
            rdkafka::producer::Producer::flush(&producer, timeout)
                .map_err(|e| KafkaError::client("flushing the producer", e))
        })
        .await
    }
}

/// The partition of a key: the first 4 bytes of SHA-256(key) as a
/// big-endian u32, modulo `partitions`. The same on every instance and
/// release. A non-positive `partitions` gives 0.
pub fn partition_for(key: &str, partitions: i32) -> i32 {
    let Ok(n) = u32::try_from(partitions) else {
        return 0;
    };
    if n == 0 {
        return 0;
    }
    let digest = Sha256::digest(key.as_bytes());
    let h = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    // h % n < n <= i32::MAX.
    i32::try_from(h % n).unwrap_or(0)
}

// ---------------------------------------------------------------- consumers

/// A consumed record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    /// The value; empty for a tombstone.
    pub payload: Vec<u8>,
}

impl InRecord {
    fn from_message<M: Message>(m: &M) -> Self {
        Self {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        }
    }
}

/// Consumer settings both readers share.
fn consumer_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = settings.client_config();
    config
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", settings.fetch_wait_ms.max(1).to_string());
    config
}

/// Reads all of one topic-partition from a given offset, without a consumer
/// group (manual assignment, nothing committed): for state every instance
/// replicates.
pub struct TailReader {
    consumer: Arc<StreamConsumer<LogContext>>,
    topic: String,
    partition: i32,
}

impl TailReader {
    /// Starts reading `topic`/`partition` at `from_offset` (a negative
    /// offset means the beginning of the partition).
    pub fn new(settings: &KafkaSettings, topic: &str, partition: i32, from_offset: i64) -> Result<Self, KafkaError> {
        settings.validate()?;
        // librdkafka's consumer needs a group id even for manual assignment;
        // this one never joins (no subscribe) and never commits.
        let consumer: StreamConsumer<LogContext> = consumer_config(settings)
            .set("group.id", format!("{}.tail", settings.group_id))
            .create_with_context(LogContext)
            .map_err(|e| KafkaError::client("creating a tail reader", e))?;
        let offset = if from_offset < 0 { Offset::Beginning } else { Offset::Offset(from_offset) };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, offset)
            .map_err(|e| KafkaError::client(format!("assigning {topic}/{partition}"), e))?;
        consumer.assign(&tpl).map_err(|e| KafkaError::client(format!("assigning {topic}/{partition}"), e))?;
        Ok(Self { consumer: Arc::new(consumer), topic: topic.to_owned(), partition })
    }

    /// The next record (waits for one).
    pub async fn next(&self) -> Result<InRecord, KafkaError> {
        let message = self
            .consumer
            .recv()
            .await
            .map_err(|e| KafkaError::client(format!("reading {}/{}", self.topic, self.partition), e))?;
        Ok(InRecord::from_message(&message))
    }

    /// The partition's high watermark now: the offset the next produced
    /// record will get. Reading up to it (exclusive) is a read barrier.
    pub async fn high_watermark(&self) -> Result<i64, KafkaError> {
        high_watermark(self.consumer.clone(), &self.topic, self.partition).await
    }

    /// Moves the read position (the partition stays assigned).
    pub fn seek(&self, offset: i64) -> Result<(), KafkaError> {
        self.consumer
            .seek(&self.topic, self.partition, Offset::Offset(offset), REQUEST_TIMEOUT)
            .map_err(|e| KafkaError::client(format!("seeking {}/{}", self.topic, self.partition), e))
    }
}

/// A change of this member's partitions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rebalance {
    /// These partitions are now ours (the eager protocol assigns the whole
    /// new assignment at once, possibly empty).
    Assigned(Vec<(String, i32)>),
    /// These partitions are no longer ours: stop working on them.
    Revoked(Vec<(String, i32)>),
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect()
}

/// Group consumer context: logs, rebalance events, the owned partitions.
struct GroupContext {
    events: mpsc::UnboundedSender<Rebalance>,
    owned: Mutex<HashSet<(String, i32)>>,
    /// What the last rebalance revoked, to spot a round that changed nothing.
    revoked: Mutex<Option<HashSet<(String, i32)>>>,
    /// When this member last rejoined as a new one: at most one such rejoin
    /// per grace period, so two members can never keep forcing rounds.
    rejoined_at: Option<Instant>,
    /// The no-op grace: three session timeouts.
    grace: Duration,
    /// Set when this member should rejoin as a new member (see `rejoin`).
    rejoin: std::sync::atomic::AtomicBool,
}

impl GroupContext {
    fn new(events: mpsc::UnboundedSender<Rebalance>, session_timeout_ms: u32, rejoined_at: Option<Instant>) -> Self {
        GroupContext {
            events,
            owned: Mutex::new(HashSet::new()),
            revoked: Mutex::new(None),
            rejoined_at,
            grace: Duration::from_millis(u64::from(session_timeout_ms) * 3),
            rejoin: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn owned(&self) -> std::sync::MutexGuard<'_, HashSet<(String, i32)>> {
        self.owned.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A coordinator that notices a dead member may tell only the member
    /// that heartbeats first to rejoin, and then answer that rejoin with the
    /// same generation and assignment (Tansu 0.6 does): the dead member's
    /// partitions are then never reassigned. A round that revokes and
    /// assigns back exactly the same partitions is that symptom; rejoining
    /// as a new member starts a real generation every member joins. On Apache
    /// Kafka such a round does not happen after a member dies.
    fn note_assignment(&self, assigned: &HashSet<(String, i32)>) {
        let revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner()).take();
        if revoked.is_some_and(|revoked| !revoked.is_empty() && &revoked == assigned)
            && self.rejoined_at.is_none_or(|at| at.elapsed() > self.grace)
        {
            tracing::warn!("rebalance changed nothing; rejoining as a new member so every member rebalances");
            self.rejoin.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl ClientContext for GroupContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        route_log(level, fac, log_message);
    }

    fn error(&self, error: RdKafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", %error, "{reason}");
    }

    fn stats_raw(&self, statistics: &[u8]) {
        super::stats::record(statistics);
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &RdRebalance<'_>) {
        match rebalance {
            RdRebalance::Revoke(tpl) => {
                let parts = partitions_of(tpl);
                {
                    let mut owned = self.owned();
                    for p in &parts {
                        owned.remove(p);
                    }
                }
                *self.revoked.lock().unwrap_or_else(|e| e.into_inner()) = Some(parts.iter().cloned().collect());
                tracing::info!(partitions = ?parts, "kafka partitions revoked");
                let _ = self.events.send(Rebalance::Revoked(parts));
            }
            RdRebalance::Assign(_) => {}
            RdRebalance::Error(e) => tracing::warn!(error = %e, "kafka rebalance error"),
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &RdRebalance<'_>) {
        if let RdRebalance::Assign(tpl) = rebalance {
            let parts = partitions_of(tpl);
            self.owned().extend(parts.iter().cloned());
            self.note_assignment(&parts.iter().cloned().collect());
            tracing::info!(partitions = ?parts, "kafka partitions assigned");
            let _ = self.events.send(Rebalance::Assigned(parts));
        }
    }

    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::debug!(error = %e, partitions = ?partitions_of(offsets), "kafka offset commit failed");
        }
    }
}

/// A consumer-group member over several topics: manual offset commits,
/// rebalance events on a channel.
///
/// Rebalances are served while [`GroupConsumer::next`] is being awaited, so
/// keep one task calling it. [`Rebalance::Revoked`] is sent before
/// librdkafka gives the partitions up, but the receiver reads it
/// asynchronously: for a moment the next owner may work on a partition this
/// member still finishes. Effects must therefore be idempotent (they are:
/// by `(iss, jti)` and leaf `jti`); commits for partitions no longer owned
/// are dropped.
pub struct GroupConsumer {
    consumer: std::sync::RwLock<Arc<StreamConsumer<GroupContext>>>,
    settings: KafkaSettings,
    topics: Vec<String>,
    events: mpsc::UnboundedSender<Rebalance>,
}

impl GroupConsumer {
    /// Joins `settings.group_id` and subscribes to `topics` (full names).
    /// `enable.auto.commit=false`, `auto.offset.reset=earliest`, the
    /// [`ASSIGNMENT_STRATEGY`], the session timeout from the settings and a
    /// heartbeat of a third of it.
    pub fn new(
        settings: &KafkaSettings,
        topics: &[String],
    ) -> Result<(Self, mpsc::UnboundedReceiver<Rebalance>), KafkaError> {
        settings.validate()?;
        if settings.group_id.is_empty() {
            return Err(KafkaError::InvalidSettings("group id is empty".into()));
        }
        let (events, rx) = mpsc::unbounded_channel();
        let consumer = Self::join(settings, topics, events.clone(), None)?;
        let this = Self {
            consumer: std::sync::RwLock::new(Arc::new(consumer)),
            settings: settings.clone(),
            topics: topics.to_vec(),
            events,
        };
        Ok((this, rx))
    }

    fn join(
        settings: &KafkaSettings,
        topics: &[String],
        events: mpsc::UnboundedSender<Rebalance>,
        rejoined_at: Option<Instant>,
    ) -> Result<StreamConsumer<GroupContext>, KafkaError> {
        let context = GroupContext::new(events, settings.session_timeout_ms, rejoined_at);
        let heartbeat = (settings.session_timeout_ms / 3).max(100);
        let consumer: StreamConsumer<GroupContext> = consumer_config(settings)
            .set("group.id", &settings.group_id)
            .set("partition.assignment.strategy", ASSIGNMENT_STRATEGY)
            .set("session.timeout.ms", settings.session_timeout_ms.to_string())
            .set("heartbeat.interval.ms", heartbeat.to_string())
            // Also the rebalance timeout: how long a rebalance waits for a
            // member that does not rejoin (a killed instance). The default
            // (5 min) would stall failover; our loops poll continuously.
            .set(
                "max.poll.interval.ms",
                settings.session_timeout_ms.saturating_mul(2).max(MIN_REBALANCE_TIMEOUT_MS).to_string(),
            )
            .create_with_context(context)
            .map_err(|e| KafkaError::client("creating a group consumer", e))?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&names).map_err(|e| KafkaError::client("subscribing", e))?;
        Ok(consumer)
    }

    fn current(&self) -> Arc<StreamConsumer<GroupContext>> {
        Arc::clone(&self.consumer.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Replaces the member with a new one when its last rebalance was a
    /// no-op (see `GroupContext::note_assignment`). The old member leaves
    /// the group as it is dropped, revoking its partitions first.
    fn rejoin_if_needed(&self) -> Result<(), KafkaError> {
        let current = self.current();
        if !current.context().rejoin.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        let fresh = Self::join(&self.settings, &self.topics, self.events.clone(), Some(Instant::now()))?;
        *self.consumer.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
        // Closing leaves the group, which blocks: not on the runtime's threads.
        tokio::task::spawn_blocking(move || drop(current));
        Ok(())
    }

    /// The next record of any owned partition (waits; serves rebalances).
    pub async fn next(&self) -> Result<InRecord, KafkaError> {
        self.rejoin_if_needed()?;
        let consumer = self.current();
        let message = consumer.recv().await.map_err(|e| KafkaError::client("consuming", e))?;
        Ok(InRecord::from_message(&message))
    }

    /// Whether this member currently owns `topic`/`partition`.
    pub fn owns(&self, topic: &str, partition: i32) -> bool {
        self.current().context().owned().contains(&(topic.to_owned(), partition))
    }

    /// Commits `next_offset` (= last processed + 1) for a partition,
    /// asynchronously. A partition no longer owned is skipped (debug log);
    /// an asynchronous commit failure is logged at debug.
    pub fn commit(&self, topic: &str, partition: i32, next_offset: i64) -> Result<(), KafkaError> {
        if !self.owns(topic, partition) {
            tracing::debug!(topic, partition, next_offset, "kafka commit skipped: partition not owned");
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(next_offset))
            .map_err(|e| KafkaError::client(format!("committing {topic}/{partition}"), e))?;
        match self.current().commit(&tpl, CommitMode::Async) {
            Ok(()) => Ok(()),
            Err(e) => {
                if self.owns(topic, partition) {
                    Err(KafkaError::client(format!("committing {topic}/{partition}"), e))
                } else {
                    tracing::debug!(topic, partition, error = %e, "kafka commit failed for a revoked partition");
                    Ok(())
                }
            }
        }
    }

    /// The group's committed offset of a partition (the next offset to
    /// process), or `None` when nothing was committed.
    pub async fn committed(&self, topic: &str, partition: i32) -> Result<Option<i64>, KafkaError> {
        let consumer = self.current();
        let topic = topic.to_owned();
        blocking(move || {
            let op = || format!("reading the committed offset of {topic}/{partition}");
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&topic, partition);
            let committed =
                consumer.committed_offsets(tpl, REQUEST_TIMEOUT).map_err(|e| KafkaError::client(op(), e))?;
            let Some(elem) = committed.find_partition(&topic, partition) else {
                return Ok(None);
            };
            if let Err(e) = elem.error() {
                return Err(KafkaError::client(op(), e));
            }
            Ok(match elem.offset() {
                Offset::Offset(n) => Some(n),
                _ => None,
            })
        })
        .await
    }

    /// A partition's high watermark now (the offset the next record gets).
    pub async fn high_watermark(&self, topic: &str, partition: i32) -> Result<i64, KafkaError> {
        high_watermark(self.current(), topic, partition).await
    }

    /// Moves the read position of an owned partition (for replay).
    pub fn seek(&self, topic: &str, partition: i32, offset: i64) -> Result<(), KafkaError> {
        self.current()
            .seek(topic, partition, Offset::Offset(offset), REQUEST_TIMEOUT)
            .map_err(|e| KafkaError::client(format!("seeking {topic}/{partition}"), e))
    }

    /// Stops fetching these owned partitions until [`GroupConsumer::resume`].
    pub fn pause(&self, partitions: &[(String, i32)]) -> Result<(), KafkaError> {
        self.current().pause(&tpl_of(partitions)).map_err(|e| KafkaError::client("pausing partitions", e))
    }

    /// Resumes fetching paused partitions.
    pub fn resume(&self, partitions: &[(String, i32)]) -> Result<(), KafkaError> {
        self.current().resume(&tpl_of(partitions)).map_err(|e| KafkaError::client("resuming partitions", e))
    }

    /// The partitions owned now.
    pub fn assignment(&self) -> Vec<(String, i32)> {
        let mut parts: Vec<_> = self.current().context().owned().iter().cloned().collect();
        parts.sort();
        parts
    }
}

/// A partition's high watermark as `consumer` sees it (a blocking request).
async fn high_watermark<X, C>(consumer: Arc<C>, topic: &str, partition: i32) -> Result<i64, KafkaError>
where
    X: ConsumerContext + 'static,
    C: Consumer<X> + Send + Sync + 'static,
{
    let topic = topic.to_owned();
    blocking(move || {
        consumer
            .fetch_watermarks(&topic, partition, REQUEST_TIMEOUT)
            .map(|(_low, high)| high)
            .map_err(|e| KafkaError::client(format!("fetching watermarks of {topic}/{partition}"), e))
    })
    .await
}

fn tpl_of(partitions: &[(String, i32)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (topic, partition) in partitions {
        tpl.add_partition(topic, *partition);
    }
    tpl
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::MockCluster;

    fn settings_for(brokers: String, group: &str) -> KafkaSettings {
        KafkaSettings {
            brokers,
            topic_prefix: format!("test-{}", uuid::Uuid::new_v4().simple()),
            group_id: group.into(),
            partitions: 4,
            replication_factor: 1,
            session_timeout_ms: 6000,
            fetch_wait_ms: 10,
        }
    }

    async fn timeout<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
        match tokio::time::timeout(Duration::from_secs(30), f).await {
            Ok(v) => v,
            Err(_) => panic!("timed out: {what}"),
        }
    }

    #[test]
    fn topic_names_and_defaults() {
        let s = KafkaSettings::default();
        assert_eq!(s.topic("events"), "caep.events");
        assert_eq!(s.partitions, 12);
        let parsed: KafkaSettings = serde_json::from_str(r#"{"brokers":"k1:9092,k2:9092"}"#).expect("parse");
        assert_eq!(parsed.brokers, "k1:9092,k2:9092");
        assert_eq!(parsed.group_id, "caep-hub");
    }

    #[test]
    fn partition_for_is_stable_and_in_range() {
        // Pinned: every instance and release must agree.
        // SHA-256("") = e3b0c442..., 0xe3b0c442 = 3820012610.
        assert_eq!(partition_for("", 12), (3_820_012_610u32 % 12) as i32);
        assert_eq!(partition_for("root-session", 12), partition_for("root-session", 12));
        let mut seen = [0u32; 12];
        for i in 0..10_000 {
            let p = partition_for(&format!("session-{i}"), 12);
            assert!((0..12).contains(&p), "{p}");
            seen[p as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 600), "{seen:?}");
        assert_eq!(partition_for("x", 1), 0);
        assert_eq!(partition_for("x", 0), 0);
        assert_eq!(partition_for("x", -3), 0);
        assert!((0..i32::MAX).contains(&partition_for("x", i32::MAX)));
    }

    #[test]
    fn invalid_settings_are_refused() {
        let mut s = KafkaSettings { brokers: String::new(), ..KafkaSettings::default() };
        assert!(matches!(Producer::new(&s), Err(KafkaError::InvalidSettings(_))));
        s.brokers = "127.0.0.1:1".into();
        s.partitions = 0;
        assert!(matches!(TailReader::new(&s, "t", 0, 0), Err(KafkaError::InvalidSettings(_))));
        s.partitions = 1;
        s.fetch_wait_ms = 300_001;
        assert!(matches!(Producer::new(&s), Err(KafkaError::InvalidSettings(_))));
        s.fetch_wait_ms = 10;
        s.session_timeout_ms = 0;
        assert!(matches!(Producer::new(&s), Err(KafkaError::InvalidSettings(_))));
        s.session_timeout_ms = 6000;
        assert!(Producer::new(&s).is_ok(), "valid settings");
    }

    /// Produce with `send` and `send_all`, read back with a tail reader,
    /// check the high watermark, measure produce → tail latency.
    async fn produce_and_tail(s: &KafkaSettings, topic: &str) {
        timeout("ensure", ensure_topics(s, &[(topic.to_owned(), 4)])).await.expect("ensure_topics");
        // Idempotent.
        timeout("ensure", ensure_topics(s, &[(topic.to_owned(), 4)])).await.expect("ensure_topics again");
        let wrong = timeout("ensure", ensure_topics(s, &[(topic.to_owned(), 8)])).await;
        assert!(matches!(wrong, Err(KafkaError::PartitionCount { expected: 8, actual: 4, .. })), "{wrong:?}");

        let producer = Producer::new(s).expect("producer");
        let first = timeout("send", producer.send(topic, 2, b"k0", b"v0")).await.expect("send");
        assert_eq!(first, 0);
        let records: Vec<OutRecord> = (1..=20)
            .map(|i| OutRecord {
                topic: topic.to_owned(),
                partition: 2,
                key: format!("k{i}").into_bytes(),
                payload: format!("v{i}").into_bytes(),
            })
            .chain(std::iter::once(OutRecord {
                topic: topic.to_owned(),
                partition: 3,
                key: b"other".to_vec(),
                payload: b"elsewhere".to_vec(),
            }))
            .collect();
        let offsets = timeout("send_all", producer.send_all(records)).await.expect("send_all");
        assert_eq!(&offsets[..20], &(1..=20).collect::<Vec<i64>>()[..]);
        assert_eq!(offsets[20], 0);

        let reader = TailReader::new(s, topic, 2, 0).expect("reader");
        assert_eq!(timeout("hw", reader.high_watermark()).await.expect("hw"), 21);
        for i in 0..=20i64 {
            let r = timeout("next", reader.next()).await.expect("next");
            assert_eq!(r.offset, i);
            assert_eq!(r.partition, 2);
            assert_eq!(r.topic, topic);
            assert_eq!(r.key.as_deref(), Some(format!("k{i}").as_bytes()));
            assert_eq!(r.payload, format!("v{i}").into_bytes());
        }

        // From a later offset; seek back.
        let late = TailReader::new(s, topic, 2, 15).expect("reader");
        assert_eq!(timeout("next", late.next()).await.expect("next").offset, 15);
        late.seek(3).expect("seek");
        assert_eq!(timeout("next", late.next()).await.expect("next").offset, 3);

        // One record at a time: each is read back as the very record sent.
        for _ in 0..20 {
            let off = timeout("send", producer.send(topic, 2, b"lat", b"x")).await.expect("send");
            let r = timeout("next", reader.next()).await.expect("next");
            assert_eq!(r.offset, off);
        }
        assert_eq!(timeout("hw", reader.high_watermark()).await.expect("hw"), 41);
    }

    /// Spawns a task driving `next()` (rebalances are served there) and
    /// forwarding records tagged with `member`.
    fn drive(
        c: Arc<GroupConsumer>,
        member: u8,
        out: mpsc::UnboundedSender<(u8, InRecord)>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                match c.next().await {
                    Ok(r) => {
                        let _ = out.send((member, r));
                    }
                    Err(e) => tracing::debug!(%e, "next"),
                }
            }
        })
    }

    /// One member gets every partition, commits and reads the commit back;
    /// a second member splits the partitions with it (range: the same
    /// partition numbers of both topics), and the new owner of a
    /// partition sees the first member's commit.
    async fn group_assign_commit_rebalance(s: &KafkaSettings) {
        let a = s.topic("events");
        let b = s.topic("deliveries");
        let topics = vec![a.clone(), b.clone()];
        timeout("ensure", ensure_topics(s, &[(a.clone(), 4), (b.clone(), 4)])).await.expect("ensure_topics");

        let producer = Producer::new(s).expect("producer");
        for p in 0..4 {
            producer.send(&a, p, b"k", b"v").await.expect("send");
        }

        let (c1, mut ev1) = GroupConsumer::new(s, &topics).expect("consumer");
        let c1 = Arc::new(c1);
        let (rec_tx, mut rec_rx) = mpsc::unbounded_channel();
        let driver1 = drive(c1.clone(), 1, rec_tx.clone());
        let assigned = timeout("assigned", ev1.recv()).await.expect("event");
        let Rebalance::Assigned(mut parts) = assigned else {
            panic!("{assigned:?}");
        };
        parts.sort();
        assert_eq!(parts.len(), 8, "{parts:?}");
        assert_eq!(c1.assignment(), parts);
        for _ in 0..4 {
            let (_, r) = timeout("record", rec_rx.recv()).await.expect("record");
            assert_eq!(r.topic, a);
        }

        assert_eq!(c1.committed(&a, 1).await.expect("committed"), None);
        c1.commit(&a, 1, 1).expect("commit");
        // Not owned: skipped without error.
        c1.commit(&s.topic("unknown"), 0, 5).expect("skip");
        let mut seen = None;
        for _ in 0..100 {
            seen = c1.committed(&a, 1).await.expect("committed");
            if seen.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(seen, Some(1));

        // A second member: the partitions are split between the two.
        let (c2, mut ev2) = GroupConsumer::new(s, &topics).expect("consumer");
        let c2 = Arc::new(c2);
        let driver2 = drive(c2.clone(), 2, rec_tx);
        let mut revoked = false;
        let parts1 = loop {
            match timeout("rebalance 1", ev1.recv()).await.expect("event") {
                Rebalance::Revoked(p) => {
                    assert_eq!(p.len(), 8);
                    revoked = true;
                }
                Rebalance::Assigned(p) => break p,
            }
        };
        assert!(revoked, "the eager protocol revokes before reassigning");
        let parts2 = loop {
            if let Rebalance::Assigned(p) = timeout("rebalance 2", ev2.recv()).await.expect("event") {
                break p;
            }
        };
        // Under load a member can miss a round and the group rebalance once
        // more, so the first assignments seen may come from two generations:
        // wait until the members' current assignments settle.
        let (mut parts1, mut parts2) = (parts1, parts2);
        for _ in 0..200 {
            let mut all: Vec<_> = parts1.iter().chain(&parts2).cloned().collect();
            all.sort();
            if all == parts {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            (parts1, parts2) = (c1.assignment(), c2.assignment());
        }
        assert_eq!(parts1.len(), 4, "{parts1:?}");
        assert_eq!(parts2.len(), 4, "{parts2:?}");
        let nums = |p: &[(String, i32)], t: &str| {
            let mut v: Vec<i32> = p.iter().filter(|(x, _)| x == t).map(|(_, n)| *n).collect();
            v.sort();
            v
        };
        assert_eq!(nums(&parts1, &a), nums(&parts1, &b));
        assert_eq!(nums(&parts2, &a), nums(&parts2, &b));
        let mut all: Vec<_> = parts1.iter().chain(&parts2).cloned().collect();
        all.sort();
        assert_eq!(all, parts);

        // The new owner of a/1 sees the committed offset.
        let c1_has = parts1.contains(&(a.clone(), 1));
        let (owner, other) = if c1_has { (&c1, &c2) } else { (&c2, &c1) };
        assert!(owner.owns(&a, 1));
        assert!(!other.owns(&a, 1));
        assert_eq!(owner.committed(&a, 1).await.expect("committed"), Some(1));
        // A non-owner's commit is dropped.
        other.commit(&a, 1, 0).expect("skip");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(owner.committed(&a, 1).await.expect("committed"), Some(1));

        driver1.abort();
        driver2.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn produce_and_tail_on_the_mock_cluster() {
        let mock = MockCluster::new(1).expect("mock cluster");
        let s = settings_for(mock.bootstrap_servers(), "g-tail");
        let topic = s.topic("state");
        // The mock broker has no CreateTopics: create the topic there;
        // ensure_topics then sends no CreateTopics for it.
        mock.create_topic(&topic, 4, 1).expect("create");
        produce_and_tail(&s, &topic).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_consumer_on_the_mock_cluster() {
        let mock = MockCluster::new(1).expect("mock cluster");
        let s = settings_for(mock.bootstrap_servers(), "g-group");
        mock.create_topic(&s.topic("events"), 4, 1).expect("create");
        mock.create_topic(&s.topic("deliveries"), 4, 1).expect("create");
        group_assign_commit_rebalance(&s).await;
    }

    /// The same scenarios against a real Kafka-protocol broker (a private
    /// Tansu, as `.ci/install-tansu` provides), creating the topics with
    /// CreateTopics, which the mock cluster lacks.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn real_broker() {
        let binary = caep_simulations::tansu::binary().unwrap_or_else(|e| panic!("{e:#}"));
        let broker = caep_simulations::tansu::TansuBroker::start(binary).await.unwrap_or_else(|e| panic!("{e:#}"));
        let group = format!("g-{}", uuid::Uuid::new_v4().simple());
        let s = settings_for(broker.brokers(), &group);
        produce_and_tail(&s, &s.topic("state")).await;
        group_assign_commit_rebalance(&s).await;
    }
}
