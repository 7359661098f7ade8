//! Reading without a group: [`TailReader`] replays one whole partition
//! (state every instance replicates); its high watermark is a read barrier.

use std::sync::Arc;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::{KafkaError, KafkaSettings, LogContext, REQUEST_TIMEOUT, blocking};

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
    pub(super) fn from_message<M: Message>(m: &M) -> Self {
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
pub(super) fn consumer_config(settings: &KafkaSettings) -> ClientConfig {
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

/// A partition's high watermark as `consumer` sees it (a blocking request).
pub(super) async fn high_watermark<X, C>(consumer: Arc<C>, topic: &str, partition: i32) -> Result<i64, KafkaError>
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

#[cfg(test)]
pub(super) mod tests {
    use super::super::tests::{settings_for, timeout};
    use super::super::{OutRecord, Producer, ensure_topics};
    use super::*;
    use rdkafka::mocking::MockCluster;

    /// Produce with `send` and `send_all`, read back with a tail reader,
    /// check the high watermark, measure produce → tail latency.
    pub(in crate::kafka::client) async fn produce_and_tail(s: &KafkaSettings, topic: &str) {
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
}
