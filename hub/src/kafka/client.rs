//! Kafka client plumbing for the scale-out mode, over `rdkafka` (bundled
//! librdkafka, static build).
//!
//! What the rest of the hub builds on (split by purpose: this file holds the
//! settings, errors and topics; `producer.rs`, `consumer.rs` and `group.rs`
//! the clients):
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

/// Implements `ClientContext` for a context type the one way every client
/// here reports: librdkafka's logs and errors to `tracing`, its statistics
/// to `stats` (defined before the modules so that `group.rs` can use it).
macro_rules! logging_client_context {
    ($context:ty) => {
        impl rdkafka::client::ClientContext for $context {
            fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
                crate::kafka::client::route_log(level, fac, log_message);
            }

            fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
                tracing::warn!(target: "librdkafka", %error, "{reason}");
            }

            fn stats_raw(&self, statistics: &[u8]) {
                crate::kafka::stats::record(statistics);
            }
        }
    };
}

mod consumer;
mod group;
mod producer;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::metadata::Metadata;
use rdkafka::types::RDKafkaErrorCode;
use serde::{Deserialize, Serialize};

pub use consumer::{InRecord, TailReader};
pub use group::{ASSIGNMENT_STRATEGY, GroupConsumer, Rebalance};
pub use producer::{OutRecord, Producer, partition_for};

/// Timeout of one blocking metadata / offsets / watermark request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`ensure_topics`] waits for metadata to show the topics.
const TOPIC_READY_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// How long the producer waits to batch records (`linger.ms`).
    pub linger_ms: u32,
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
            linger_ms: 5,
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
        if self.linger_ms > 900_000 {
            return Err(KafkaError::InvalidSettings(format!(
                "linger must be at most 900000 ms, not {}",
                self.linger_ms
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

logging_client_context!(LogContext);

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

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn settings_for(brokers: String, group: &str) -> KafkaSettings {
        KafkaSettings {
            brokers,
            topic_prefix: format!("test-{}", uuid::Uuid::new_v4().simple()),
            group_id: group.into(),
            partitions: 4,
            replication_factor: 1,
            session_timeout_ms: 6000,
            fetch_wait_ms: 10,
            linger_ms: 5,
        }
    }

    pub(super) async fn timeout<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
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

    /// The same scenarios against a real Kafka-protocol broker (a private
    /// Tansu, as `.ci/install-tansu` provides), creating the topics with
    /// CreateTopics, which the mock cluster lacks.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn real_broker() {
        let binary = caep_simulations::tansu::binary().unwrap_or_else(|e| panic!("{e:#}"));
        let broker = caep_simulations::tansu::TansuBroker::start(binary).await.unwrap_or_else(|e| panic!("{e:#}"));
        let group = format!("g-{}", uuid::Uuid::new_v4().simple());
        let s = settings_for(broker.brokers(), &group);
        consumer::tests::produce_and_tail(&s, &s.topic("state")).await;
        group::tests::group_assign_commit_rebalance(&s).await;
    }
}
