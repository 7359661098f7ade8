//! Delivering the `deliveries` partitions this instance owns.
//!
//! Signed SETs are keyed by stream, so one instance at a time pushes a
//! stream's SETs and serves its polls. The owner imports them into its local
//! outbox, and the existing pusher and poll endpoint deliver from there. The
//! outbox is only a working set: Kafka holds the truth, and the group's
//! committed offset moves past a SET only once it has left the outbox
//! (acknowledged, dead-lettered or purged). So when an owner dies, the next
//! owner imports every SET it had not finished, under the same `jti`.
//!
//! Invariants:
//! - On assignment and on revocation, the outbox rows of the partition's
//!   streams are dropped: what is unfinished comes back from the log.
//! - An import is committed to the outbox before its offset counts as
//!   imported, and an offset is committed only when every SET before it
//!   has left the outbox.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use caep_transmitter::control::{Placement, SetRouter, StreamPlacement};
use caep_transmitter::outbox::{NewSet, Outbox, OutcomeSink, SetOutcome};
use caep_transmitter::service::{BoxFuture, Transmitter};
use caep_transmitter::store::{Commit, StoreError};
use redb::WriteTransaction;
use tokio::sync::mpsc;

use crate::cascade::Outcome;
use crate::kafka::client::{GroupConsumer, InRecord, KafkaError, KafkaSettings, Rebalance, partition_for};
use crate::kafka::partitions::KafkaSink;
use crate::kafka::records::{self, DeliveryBatch, SharedRecord};
use crate::kafka::retry::until_ok;
use crate::kafka::shared::SharedLog;

/// SETs imported into the outbox in one transaction at most.
const IMPORT_BATCH: usize = 256;
/// How often finished SETs are looked for, to move committed offsets.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

fn kafka_error(error: KafkaError) -> StoreError {
    StoreError::storage(format!("kafka: {error}"))
}

/// The SETs one `deliveries` record carried: (stream, jti) each.
type Carried = Vec<(String, String)>;

/// Imported, unfinished SETs of one partition, by the offset of the record
/// that carried them.
#[derive(Default)]
struct Inflight {
    sets: BTreeMap<i64, Carried>,
    /// One past the last imported offset; `None` until something is imported.
    next: Option<i64>,
    committed: Option<i64>,
}

/// Who this instance is to the others.
#[derive(Clone, Debug)]
pub struct Instance {
    pub id: String,
    /// Base URL other instances forward polls to.
    pub url: String,
}

/// The deliveries side of one instance.
pub struct Deliveries {
    instance: Instance,
    topic: String,
    settings: KafkaSettings,
    sink: Arc<KafkaSink>,
    shared: Arc<SharedLog>,
    transmitter: OnceLock<Arc<Transmitter>>,
    assigned: RwLock<BTreeSet<i32>>,
    inflight: Mutex<HashMap<i32, Inflight>>,
    settled: mpsc::UnboundedSender<Outcome>,
    settled_rx: Mutex<Option<mpsc::UnboundedReceiver<Outcome>>>,
    consumer: OnceLock<Arc<GroupConsumer>>,
}

impl Deliveries {
    /// The deliveries side; it routes and places at once, and delivers once
    /// [`Deliveries::start`] has joined the group.
    pub fn new(
        settings: &KafkaSettings,
        instance: Instance,
        sink: Arc<KafkaSink>,
        shared: Arc<SharedLog>,
    ) -> Arc<Self> {
        let (settled, settled_rx) = mpsc::unbounded_channel();
        Arc::new(Deliveries {
            instance,
            topic: settings.topic(records::DELIVERIES),
            settings: settings.clone(),
            sink,
            shared,
            transmitter: OnceLock::new(),
            assigned: RwLock::new(BTreeSet::new()),
            inflight: Mutex::new(HashMap::new()),
            settled,
            settled_rx: Mutex::new(Some(settled_rx)),
            consumer: OnceLock::new(),
        })
    }

    /// Joins the deliveries group and starts importing, sweeping and
    /// reporting outcomes.
    pub fn start(self: &Arc<Self>, transmitter: Arc<Transmitter>) -> Result<(), StoreError> {
        let _ = self.transmitter.set(transmitter);
        let mut group = self.settings.clone();
        group.group_id = format!("{}.deliveries", self.settings.group_id);
        let (consumer, rebalances) =
            GroupConsumer::new(&group, std::slice::from_ref(&self.topic)).map_err(kafka_error)?;
        let consumer = Arc::new(consumer);
        let _ = self.consumer.set(Arc::clone(&consumer));
        tokio::spawn(Arc::clone(self).import(Arc::clone(&consumer), rebalances));
        tokio::spawn(Arc::clone(self).sweep(consumer));
        if let Some(settled) = self.settled_rx.lock().unwrap_or_else(|p| p.into_inner()).take() {
            tokio::spawn(Arc::clone(self).report(settled));
        }
        Ok(())
    }

    /// The partitions delivered here, ascending.
    pub fn partitions(&self) -> Vec<i32> {
        self.assigned.read().unwrap_or_else(|p| p.into_inner()).iter().copied().collect()
    }

    fn outbox(&self) -> Option<&Arc<Outbox>> {
        self.transmitter.get().map(|t| t.outbox())
    }

    fn owns(&self, partition: i32) -> bool {
        self.assigned.read().unwrap_or_else(|p| p.into_inner()).contains(&partition)
    }

    async fn import(self: Arc<Self>, consumer: Arc<GroupConsumer>, mut rebalances: mpsc::UnboundedReceiver<Rebalance>) {
        loop {
            tokio::select! {
                biased;
                Some(event) = rebalances.recv() => self.rebalance(event).await,
                record = consumer.next() => match record {
                    Ok(first) => {
                        let mut batch = vec![first];
                        while batch.len() < IMPORT_BATCH {
                            match tokio::time::timeout(Duration::ZERO, consumer.next()).await {
                                Ok(Ok(record)) => batch.push(record),
                                _ => break,
                            }
                        }
                        // Records of a partition assigned in the same poll can
                        // come before the assignment event: ownership is the
                        // consumer's, known by the time it returns a record.
                        batch.retain(|record| consumer.owns(&record.topic, record.partition));
                        until_ok("importing SETs into the outbox", || self.import_batch(&batch)).await;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "deliveries consumer");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
            }
        }
    }

    async fn import_batch(&self, batch: &[InRecord]) -> Result<(), StoreError> {
        let Some(outbox) = self.outbox() else { return Ok(()) };
        let mut sets = Vec::new();
        let mut imported: Vec<(i32, i64, Carried)> = Vec::new();
        for record in batch {
            self.take_over(record.partition).await;
            let carried = match DeliveryBatch::decode(&record.payload) {
                Ok(carried) => carried,
                Err(error) => {
                    tracing::error!(offset = record.offset, %error, "unreadable delivery record skipped");
                    Vec::new()
                }
            };
            let ids = carried.iter().map(|set| (set.stream_id.clone(), set.jti.clone())).collect();
            imported.push((record.partition, record.offset, ids));
            sets.extend(carried.into_iter().map(|set| NewSet {
                stream_id: set.stream_id,
                jti: set.jti,
                token: set.token,
                txn: set.txn,
            }));
        }
        let streams: BTreeSet<String> = sets.iter().map(|set| set.stream_id.clone()).collect();
        // Lazy: a lost import is imported again from the log.
        outbox.store().write(Commit::Lazy, move |txn| Outbox::insert(txn, &sets)).await?;
        for stream in &streams {
            outbox.wake(stream);
        }
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        for (partition, offset, ids) in imported {
            let Some(part) = inflight.get_mut(&partition) else { continue };
            if !ids.is_empty() {
                part.sets.insert(offset, ids);
            }
            part.next = Some(part.next.map_or(offset + 1, |next| next.max(offset + 1)));
        }
        Ok(())
    }

    async fn rebalance(&self, event: Rebalance) {
        match event {
            Rebalance::Assigned(parts) => {
                for (_, partition) in parts.into_iter().filter(|(topic, _)| *topic == self.topic) {
                    self.take_over(partition).await;
                    let owner = SharedRecord::Owner {
                        partition,
                        instance_id: self.instance.id.clone(),
                        url: self.instance.url.clone(),
                    };
                    if let Err(error) = self.shared.append(&owner).await {
                        tracing::error!(partition, %error, "cannot announce deliveries partition owner");
                    }
                }
            }
            Rebalance::Revoked(parts) => {
                for (_, partition) in parts.into_iter().filter(|(topic, _)| *topic == self.topic) {
                    self.assigned.write().unwrap_or_else(|p| p.into_inner()).remove(&partition);
                    self.inflight.lock().unwrap_or_else(|p| p.into_inner()).remove(&partition);
                    self.purge_partition(partition).await;
                    tracing::info!(partition, "deliveries partition revoked");
                }
            }
        }
    }

    /// Starts delivering a partition, once per assignment: what an earlier
    /// ownership left in the outbox goes, since the log has it all.
    async fn take_over(&self, partition: i32) {
        if self.owns(partition) {
            return;
        }
        self.purge_partition(partition).await;
        // Where importing resumes: the group's committed offset.
        let resumes = match self.consumer.get() {
            Some(consumer) => consumer.committed(&self.topic, partition).await.ok().flatten(),
            None => None,
        };
        let part = Inflight { next: resumes, ..Inflight::default() };
        self.inflight.lock().unwrap_or_else(|p| p.into_inner()).insert(partition, part);
        self.assigned.write().unwrap_or_else(|p| p.into_inner()).insert(partition);
        tracing::info!(partition, "deliveries partition assigned");
    }

    /// Drops the outbox rows of a partition's streams: whoever owns it now
    /// imports what is unfinished from the log.
    async fn purge_partition(&self, partition: i32) {
        let (Some(transmitter), Some(outbox)) = (self.transmitter.get(), self.outbox()) else { return };
        for record in transmitter.streams().all() {
            let stream_id = &record.config.stream_id;
            if partition_for(stream_id, self.settings.partitions) == partition
                && let Err(error) = outbox.purge(stream_id).await
            {
                tracing::error!(partition, stream_id, %error, "cannot purge a moved stream's outbox");
            }
        }
    }

    /// Moves each partition's committed offset past the SETs that have left
    /// the outbox.
    async fn sweep(self: Arc<Self>, consumer: Arc<GroupConsumer>) {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        loop {
            tick.tick().await;
            let Some(outbox) = self.outbox() else { continue };
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            for (partition, part) in inflight.iter_mut() {
                // A record's offset is passed once every SET it carried has left.
                while let Some(mut first) = part.sets.first_entry() {
                    match left_outbox(outbox, first.get_mut()) {
                        Ok(true) => {
                            first.remove();
                        }
                        Ok(false) => break,
                        Err(error) => {
                            tracing::warn!(%error, "cannot check the outbox");
                            break;
                        }
                    }
                }
                let commit = part.sets.first_key_value().map(|(offset, _)| *offset).or(part.next);
                if let Some(commit) = commit
                    && part.committed != Some(commit)
                {
                    match consumer.commit(&self.topic, *partition, commit) {
                        Ok(()) => part.committed = Some(commit),
                        Err(error) => tracing::debug!(partition, %error, "deliveries offset commit"),
                    }
                }
            }
        }
    }

    /// Appends delivery outcomes to the shared reports, in batches.
    async fn report(self: Arc<Self>, mut settled: mpsc::UnboundedReceiver<Outcome>) {
        while let Some(first) = settled.recv().await {
            let mut outcomes = vec![first];
            while outcomes.len() < 1024 {
                match settled.try_recv() {
                    Ok(outcome) => outcomes.push(outcome),
                    Err(_) => break,
                }
            }
            let record = SharedRecord::Settled { outcomes, instance_id: self.instance.id.clone() };
            until_ok("reporting delivery outcomes", || self.shared.append(&record)).await;
        }
    }
}

/// Drops from `ids` the SETs that have left the outbox; whether all have.
fn left_outbox(outbox: &Outbox, ids: &mut Carried) -> Result<bool, StoreError> {
    let mut error = None;
    ids.retain(|(stream_id, jti)| match outbox.contains(stream_id, jti) {
        Ok(contained) => contained,
        Err(e) => {
            error.get_or_insert(e);
            true
        }
    });
    match error {
        Some(error) => Err(error),
        None => Ok(ids.is_empty()),
    }
}

impl SetRouter for Deliveries {
    fn enqueue(&self, sets: Vec<NewSet>) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.sink.send_sets(sets))
    }
}

impl StreamPlacement for Deliveries {
    fn caught_up<'a>(&'a self, stream_id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let partition = partition_for(stream_id, self.settings.partitions);
            let Some(consumer) = self.consumer.get() else { return };
            if !self.owns(partition) {
                return;
            }
            let high = match consumer.high_watermark(&self.topic, partition).await {
                Ok(high) => high,
                Err(error) => {
                    tracing::warn!(partition, %error, "deliveries read barrier: no high watermark");
                    return;
                }
            };
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while tokio::time::Instant::now() < deadline {
                let imported = self
                    .inflight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&partition)
                    .and_then(|part| part.next)
                    .unwrap_or(0);
                if imported >= high || !self.owns(partition) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tracing::warn!(partition, high, "deliveries read barrier timed out");
        })
    }

    fn place(&self, stream_id: &str) -> Placement {
        let partition = partition_for(stream_id, self.settings.partitions);
        if self.owns(partition) {
            return Placement::Local;
        }
        match self.shared.owner_of(partition) {
            // Announced by this instance but no longer ours: moving now.
            Some((id, _)) if id == self.instance.id => Placement::Unknown,
            Some((_, url)) => Placement::Remote { base_url: url },
            None => Placement::Unknown,
        }
    }
}

/// Reports outcomes of cascade leaves delivered here to every instance
/// (through `shared`), once the outbox's transaction that settled them has
/// committed: an outcome a failed transaction undid is never reported.
pub struct KafkaTracker(pub Arc<Deliveries>);

impl OutcomeSink for KafkaTracker {
    fn record(&self, _txn: &WriteTransaction, _outcomes: &[SetOutcome<'_>]) -> Result<(), StoreError> {
        Ok(())
    }

    fn committed(&self, outcomes: &[SetOutcome<'_>]) {
        for outcome in outcomes {
            let Some(key) = outcome.set.txn.clone() else { continue };
            let _ = self.0.settled.send(Outcome {
                txn: key,
                jti: outcome.set.jti.clone(),
                delivered: outcome.delivered,
                at_ms: outcome.at_ms,
                err: outcome.err.map(str::to_owned),
            });
        }
    }
}
