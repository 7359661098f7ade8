//! The idempotent producer and the one key → partition map.

use std::time::{Duration, Instant};

use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use sha2::{Digest, Sha256};

use super::{KafkaError, KafkaSettings, LogContext, blocking};

/// How long a send retries while librdkafka's local queue is full.
const QUEUE_FULL_TIMEOUT: Duration = Duration::from_secs(30);
/// Delivery timeout of one record (retries included) before the send fails.
const MESSAGE_TIMEOUT_MS: &str = "30000";

/// A record to produce to an explicit partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutRecord {
    pub topic: String,
    pub partition: i32,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
}

/// Idempotent producer: `enable.idempotence=true`, `acks=all`, lz4 (never
/// snappy: Tansu drops the connection), `linger.ms` from the settings. Per partition,
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
            .set("linger.ms", settings.linger_ms.to_string())
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
