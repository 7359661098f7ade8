//! A consumer-group member ([`GroupConsumer`]) with manual commits and
//! [`Rebalance`] events, and the workaround for Tansu's no-op rebalance.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance as RdRebalance, StreamConsumer,
};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use super::consumer::{InRecord, consumer_config, high_watermark};
use super::{KafkaError, KafkaSettings, REQUEST_TIMEOUT, blocking};

/// The least rebalance timeout (`max.poll.interval.ms`), whatever the
/// session timeout: a partition's catch-up may keep a loop from polling for
/// a few seconds, and a member that misses it leaves the group.
const MIN_REBALANCE_TIMEOUT_MS: u32 = 6_000;
/// Group partition assignment strategy (see the module documentation of `client`).
pub const ASSIGNMENT_STRATEGY: &str = "range";

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

logging_client_context!(GroupContext);

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

fn tpl_of(partitions: &[(String, i32)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (topic, partition) in partitions {
        tpl.add_partition(topic, *partition);
    }
    tpl
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::tests::{settings_for, timeout};
    use super::super::{Producer, ensure_topics};
    use super::*;
    use rdkafka::mocking::MockCluster;

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
    pub(in crate::kafka::client) async fn group_assign_commit_rebalance(s: &KafkaSettings) {
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
        // wait until the members' current assignments settle (the same
        // whole split twice in a row).
        assert!(!parts1.is_empty() || !parts2.is_empty());
        let (mut parts1, mut parts2) = (Vec::new(), Vec::new());
        let mut settled = 0;
        for _ in 0..200 {
            let now = (c1.assignment(), c2.assignment());
            let mut all: Vec<_> = now.0.iter().chain(&now.1).cloned().collect();
            all.sort();
            settled = if all == parts && now == (parts1.clone(), parts2.clone()) { settled + 1 } else { 0 };
            (parts1, parts2) = now;
            if settled >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
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
    async fn group_consumer_on_the_mock_cluster() {
        let mock = MockCluster::new(1).expect("mock cluster");
        let s = settings_for(mock.bootstrap_servers(), "g-group");
        mock.create_topic(&s.topic("events"), 4, 1).expect("create");
        mock.create_topic(&s.topic("deliveries"), 4, 1).expect("create");
        group_assign_commit_rebalance(&s).await;
    }
}
