//! The `shared` topic and its local replica.
//!
//! Every instance replays the whole single-partition topic, in order, into
//! its main store: control-plane changes (receivers, streams, subjects,
//! issuers, peer keys), the session → root directory, who owns each
//! deliveries partition, and the cascade reports. Applying is deterministic
//! and idempotent, so every replica converges and a replay after a crash is
//! harmless.
//!
//! Read-your-writes: a writer produces its record, then waits until its
//! own replica has applied that offset. A reader elsewhere calls
//! [`SharedLog::barrier`], which waits for the replica to reach the topic's
//! high watermark as of the call.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

use caep_transmitter::control::{ControlChange, ControlLog, ControlOutcome};
use caep_transmitter::secrets::SecretBox;
use caep_transmitter::service::{BoxFuture, Transmitter};
use caep_transmitter::store::{Commit, Store, StoreError, decode, encode};
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::watch;

use crate::cascade;
use crate::hub::Hub;
use crate::issuers::{IssuerChange, IssuerLog};
use crate::kafka::client::{InRecord, KafkaError, KafkaSettings, Producer, TailReader, partition_for};
use crate::kafka::records::{self, SharedRecord};
use crate::kafka::retry::until_ok;

/// Next offset of `shared` to apply (everything before it is applied).
const SHARED_NEXT: TableDefinition<&str, i64> = TableDefinition::new("kafka_shared_next");
/// session → its [`RootEntry`] (JSON).
const ROOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("kafka_roots");

/// Where a session's tree lives and which IdP named the session first.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RootEntry {
    /// The delegation root: the `graph` partition key of the session's tree.
    pub root: String,
    pub issuer: String,
}

/// Records applied in one store transaction at most.
const APPLY_BATCH: usize = 512;
/// How long a read barrier waits for the replica before answering from the
/// state it has (a broker outage must not hang every request).
const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);

fn storage<E: std::fmt::Display>(error: E) -> StoreError {
    StoreError::storage(error)
}

fn kafka_error(error: KafkaError) -> StoreError {
    StoreError::storage(format!("kafka: {error}"))
}

/// The replica of the `shared` topic.
pub struct SharedLog {
    topic: String,
    producer: Producer,
    reader: TailReader,
    store: Store,
    /// Next offset to apply; waiters watch it.
    next: watch::Sender<i64>,
    /// Outcomes of control changes by offset, for the writers waiting on them.
    outcomes: Mutex<BTreeMap<i64, ControlOutcome>>,
    /// deliveries partition → (instance id, base URL).
    owners: RwLock<HashMap<i32, (String, String)>>,
    transmitter: OnceLock<Arc<Transmitter>>,
    hub: OnceLock<Weak<Hub>>,
    /// This instance: only the deliverer of a leaf counts it in metrics.
    instance_id: String,
    /// The last high-watermark fetch: (when it started, the watermark). One
    /// fetch runs at a time, and a barrier that arrived before a fetch
    /// started shares its answer, so a burst of requests costs the broker
    /// one request in flight, not one each.
    last_watermark: tokio::sync::Mutex<Option<(Instant, i64)>>,
    /// Barriers waited for (`/healthz`: shows that strangers cause none).
    barriers: AtomicU64,
    /// Partitions of the `graph` topic (which partition a root routes to).
    partitions: i32,
}

impl SharedLog {
    /// Opens the replica, resuming after the last offset the main store applied.
    pub fn open(
        settings: &KafkaSettings,
        producer: Producer,
        store: Store,
        instance_id: &str,
    ) -> Result<Arc<Self>, StoreError> {
        let topic = settings.topic(records::SHARED);
        let next = store.read(|txn| match txn.open_table(SHARED_NEXT) {
            Ok(table) => Ok(table.get("next").map_err(storage)?.map_or(0, |v| v.value())),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(error) => Err(storage(error)),
        })?;
        let reader = TailReader::new(settings, &topic, 0, next).map_err(kafka_error)?;
        let (next, _) = watch::channel(next);
        Ok(Arc::new(SharedLog {
            topic,
            producer,
            reader,
            store,
            next,
            outcomes: Mutex::new(BTreeMap::new()),
            owners: RwLock::new(HashMap::new()),
            transmitter: OnceLock::new(),
            hub: OnceLock::new(),
            instance_id: instance_id.to_owned(),
            last_watermark: tokio::sync::Mutex::new(None),
            barriers: AtomicU64::new(0),
            partitions: settings.partitions,
        }))
    }

    /// Connects the replica to what it applies control changes to, starts
    /// applying, and resolves once it has caught up with the topic.
    pub async fn start(self: &Arc<Self>, transmitter: Arc<Transmitter>, hub: &Arc<Hub>) -> Result<(), StoreError> {
        let _ = self.transmitter.set(transmitter);
        let _ = self.hub.set(Arc::downgrade(hub));
        let this = Arc::clone(self);
        tokio::spawn(async move { this.apply_forever().await });
        let high = self.reader.high_watermark().await.map_err(kafka_error)?;
        self.wait_applied(high).await;
        tracing::info!(offset = high, "shared log replica caught up");
        Ok(())
    }

    /// Appends a record; resolves with its offset once the broker has it.
    pub async fn append(&self, record: &SharedRecord) -> Result<i64, StoreError> {
        let payload = records::to_bytes(record);
        self.producer.send(&self.topic, 0, b"shared", &payload).await.map_err(kafka_error)
    }

    /// Appends a record and waits until this replica has applied it.
    pub async fn append_and_apply(&self, record: &SharedRecord) -> Result<i64, StoreError> {
        let offset = self.append(record).await?;
        self.wait_applied(offset + 1).await;
        Ok(offset)
    }

    /// Waits until every record before `next` is applied here.
    pub async fn wait_applied(&self, next: i64) {
        let mut watcher = self.next.subscribe();
        let _ = watcher.wait_for(|applied| *applied >= next).await;
    }

    /// Waits (bounded) until this replica has applied everything written
    /// to the topic before the call: a read after it sees every write any
    /// instance acknowledged before it.
    pub async fn barrier(&self) {
        self.barriers.fetch_add(1, Ordering::Relaxed);
        let Some(high) = self.high_watermark_since(Instant::now()).await else { return };
        if tokio::time::timeout(BARRIER_TIMEOUT, self.wait_applied(high)).await.is_err() {
            tracing::warn!(offset = high, "shared log barrier timed out; answering from local state");
        }
    }

    /// How many barriers this replica has waited for since it started.
    pub fn barriers(&self) -> u64 {
        self.barriers.load(Ordering::Relaxed)
    }

    /// A high watermark read by a fetch that started at or after `arrived`.
    async fn high_watermark_since(&self, arrived: Instant) -> Option<i64> {
        let mut last = self.last_watermark.lock().await;
        if let Some((started, high)) = *last
            && started >= arrived
        {
            return Some(high);
        }
        let started = Instant::now();
        match self.reader.high_watermark().await {
            Ok(high) => {
                *last = Some((started, high));
                Some(high)
            }
            Err(error) => {
                tracing::warn!(%error, "shared log barrier: cannot read the high watermark");
                None
            }
        }
    }

    /// The root entry recorded for a session.
    pub fn root_of(&self, session_id: &str) -> Result<Option<RootEntry>, StoreError> {
        self.store.read(|txn| match txn.open_table(ROOTS) {
            Ok(table) => table.get(session_id).map_err(storage)?.map(|v| decode(v.value())).transpose(),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
            Err(error) => Err(storage(error)),
        })
    }

    /// How many sessions the directory routes (`/healthz`).
    pub fn directory_entries(&self) -> u64 {
        self.store
            .read(|txn| match txn.open_table(ROOTS) {
                Ok(table) => table.len().map_err(storage),
                Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
                Err(error) => Err(storage(error)),
            })
            .unwrap_or(0)
    }

    /// The instance owning a deliveries partition, as last announced.
    pub fn owner_of(&self, partition: i32) -> Option<(String, String)> {
        self.owners.read().unwrap_or_else(|p| p.into_inner()).get(&partition).cloned()
    }

    async fn apply_forever(self: Arc<Self>) {
        loop {
            let batch = match self.next_batch().await {
                Ok(batch) => batch,
                Err(error) => {
                    tracing::warn!(%error, "shared log: cannot read; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let Some(last) = batch.last().map(|r| r.offset) else { continue };
            // Skipping a record would fork this replica from the others.
            until_ok("applying the shared log", || self.apply_batch(&batch)).await;
            self.next.send_replace(last + 1);
        }
    }

    /// One record (waiting for it), then whatever else is ready.
    async fn next_batch(&self) -> Result<Vec<InRecord>, KafkaError> {
        let mut batch = vec![self.reader.next().await?];
        while batch.len() < APPLY_BATCH {
            match tokio::time::timeout(Duration::ZERO, self.reader.next()).await {
                Ok(record) => batch.push(record?),
                Err(_) => break,
            }
        }
        Ok(batch)
    }

    async fn apply_batch(&self, batch: &[InRecord]) -> Result<(), StoreError> {
        let mut local = Vec::new();
        for record in batch {
            let parsed: SharedRecord = match serde_json::from_slice(&record.payload) {
                Ok(parsed) => parsed,
                Err(error) => {
                    tracing::error!(offset = record.offset, %error, "shared log: unreadable record skipped");
                    continue;
                }
            };
            match parsed {
                SharedRecord::Control { change } => {
                    // Store-only records before it go first: order matters.
                    self.apply_local(std::mem::take(&mut local)).await?;
                    self.apply_control(record.offset, change).await?;
                }
                SharedRecord::Issuer { change } => {
                    self.apply_local(std::mem::take(&mut local)).await?;
                    self.apply_issuer(change).await?;
                }
                SharedRecord::Owner { partition, instance_id, url } => {
                    tracing::info!(partition, %instance_id, %url, "deliveries partition owner");
                    self.owners.write().unwrap_or_else(|p| p.into_inner()).insert(partition, (instance_id, url));
                }
                other => local.push(other),
            }
        }
        self.apply_local(local).await?;
        let next = batch.last().map_or(0, |r| r.offset + 1);
        self.store
            .write(Commit::Lazy, move |txn| {
                txn.open_table(SHARED_NEXT).map_err(storage)?.insert("next", next).map_err(storage)?;
                Ok(())
            })
            .await
    }

    async fn apply_control(&self, offset: i64, change: ControlChange) -> Result<(), StoreError> {
        let Some(transmitter) = self.transmitter.get() else { return Ok(()) };
        // A change this instance cannot open is retried, never skipped: it
        // means the instances do not share CAEP_HUB_SECRET_KEY.
        let change = change.opened(&transmitter.settings().secrets).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let outcome = transmitter.apply_control(change).await?;
        let mut outcomes = self.outcomes.lock().unwrap_or_else(|p| p.into_inner());
        outcomes.insert(offset, outcome);
        // Writers collect theirs at once; keep a bounded tail for stragglers.
        while outcomes.len() > 10_000 {
            outcomes.pop_first();
        }
        Ok(())
    }

    async fn apply_issuer(&self, change: IssuerChange) -> Result<(), StoreError> {
        match self.hub.get().and_then(Weak::upgrade) {
            Some(hub) => hub.issuers().apply(change).await,
            None => Ok(()),
        }
    }

    /// Directory entries and reports, in one transaction.
    async fn apply_local(&self, records: Vec<SharedRecord>) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let me = self.instance_id.clone();
        let partitions = self.partitions;
        let applied = self
            .store
            .write(Commit::Lazy, move |txn| {
                let mut applied = cascade::Applied::default();
                for record in &records {
                    match record {
                        SharedRecord::Root { session_id, root, issuer } => {
                            let mut roots = txn.open_table(ROOTS).map_err(storage)?;
                            if roots.get(session_id.as_str()).map_err(storage)?.is_none() {
                                let entry = RootEntry { root: root.clone(), issuer: issuer.clone() };
                                roots.insert(session_id.as_str(), encode(&entry)?.as_slice()).map_err(storage)?;
                            }
                        }
                        SharedRecord::Forget { partition, sessions } => {
                            let mut roots = txn.open_table(ROOTS).map_err(storage)?;
                            for session in sessions {
                                let entry = roots.get(session.as_str()).map_err(storage)?;
                                let entry: Option<RootEntry> = entry.map(|v| decode(v.value())).transpose()?;
                                if entry.is_some_and(|entry| partition_for(&entry.root, partitions) == *partition) {
                                    roots.remove(session.as_str()).map_err(storage)?;
                                }
                            }
                        }
                        SharedRecord::Planned { cascade, leaves } => cascade::merge_planned(txn, cascade, leaves)?,
                        SharedRecord::Settled { outcomes, instance_id } => {
                            let done = cascade::apply_outcomes(txn, outcomes)?;
                            if *instance_id == me {
                                applied.leaf_latencies_ms.extend(done.leaf_latencies_ms);
                                applied.completed.extend(done.completed);
                            }
                        }
                        _ => {}
                    }
                }
                Ok(applied)
            })
            .await?;
        crate::metrics::record_settled(&applied);
        Ok(())
    }

    fn take_outcome(&self, offset: i64) -> ControlOutcome {
        self.outcomes.lock().unwrap_or_else(|p| p.into_inner()).remove(&offset).unwrap_or(ControlOutcome::Applied)
    }
}

/// The control log on Kafka: a change takes effect when this instance's
/// replica applies it, exactly as on every other instance. Receivers'
/// credentials travel sealed.
pub struct KafkaControl {
    pub shared: Arc<SharedLog>,
    pub secrets: Arc<SecretBox>,
}

impl ControlLog for KafkaControl {
    fn record(&self, change: ControlChange) -> BoxFuture<'_, Result<ControlOutcome, StoreError>> {
        Box::pin(async move {
            let change = change.sealed(&self.secrets);
            let offset = self.shared.append_and_apply(&SharedRecord::Control { change }).await?;
            Ok(self.shared.take_outcome(offset))
        })
    }
}

/// The trusted-issuer log on Kafka.
pub struct KafkaIssuers(pub Arc<SharedLog>);

impl IssuerLog for KafkaIssuers {
    fn record(&self, change: IssuerChange) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move { self.0.append_and_apply(&SharedRecord::Issuer { change }).await.map(drop) })
    }
}

impl crate::hub::ReadBarrier for SharedLog {
    fn barrier(&self) -> BoxFuture<'_, ()> {
        Box::pin(SharedLog::barrier(self))
    }
}
