//! Owning `graph` partitions: applying their events and dispatching the
//! cascades they plan.
//!
//! Each partition has its own redb file (graph, cascade plans, replay
//! records and the next offset to apply), so its state can be rebuilt from
//! the log alone: a new owner replays the partition from where its file
//! left off (from the start, on an instance that never owned it).
//!
//! Invariants:
//! - An event's effects and the partition's next offset are committed in
//!   one transaction: each record takes effect exactly once per file.
//! - The group's committed offset moves past a record only after its
//!   leaves are handed to the `deliveries` topic (and its report to
//!   `shared`). Records before the committed offset therefore had their
//!   leaves sent by a previous owner: replaying them rebuilds state without
//!   sending again. Records after it are sent (again): the same `jti`s,
//!   derived from the IdP SET, so receivers drop the duplicates.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use caep_schemas::set::SecurityEventToken;
use caep_transmitter::outbox::{NewSet, now_ms};
use caep_transmitter::service::{BoxFuture, Transmitter};
use caep_transmitter::store::{Commit, Store, StoreError};
use redb::{TableDefinition, WriteTransaction};
use tokio::sync::{mpsc, watch};

use crate::cascade::{self, CascadeRecord, Leaf};
use crate::dispatch::{Dispatcher, LeafSink};
use crate::effects::{self, Context, ForeignRevocation, IngestError, Plan};
use crate::graph;
use crate::kafka::client::{
    GroupConsumer, InRecord, KafkaError, KafkaSettings, OutRecord, Producer, Rebalance, TailReader, partition_for,
};
use crate::kafka::records::{self, DeliveryBatch, DeliveryRecord, GraphRecord, SharedRecord};
use crate::kafka::retry::until_ok;
use crate::kafka::shared::SharedLog;
use crate::lifecycle::{Forgetting, Pruning, prune_store};

/// The next offset of this file's partition to apply.
const GRAPH_NEXT: TableDefinition<&str, i64> = TableDefinition::new("kafka_graph_next");
/// Records applied in one transaction at most.
const APPLY_BATCH: usize = 64;
/// Forgotten sessions announced per `Forget` record.
const FORGET_BATCH: usize = 1000;

fn storage<E: std::fmt::Display>(error: E) -> StoreError {
    StoreError::storage(error)
}

fn kafka_error(error: KafkaError) -> StoreError {
    StoreError::storage(format!("kafka: {error}"))
}

/// Hands signed leaves to the `deliveries` topic, keyed by stream, after
/// their report part is in `shared` (so no outcome can overtake its plan).
pub struct KafkaSink {
    pub(crate) producer: Producer,
    shared: Arc<SharedLog>,
    topic: String,
    partitions: i32,
}

impl KafkaSink {
    /// The sink for `settings`' deliveries topic.
    pub fn new(settings: &KafkaSettings, producer: Producer, shared: Arc<SharedLog>) -> Arc<Self> {
        Arc::new(KafkaSink {
            producer,
            shared,
            topic: settings.topic(records::DELIVERIES),
            partitions: settings.partitions,
        })
    }

    /// Sends signed SETs to the partitions of their streams, as few
    /// records as [`DeliveryBatch::split`] allows per partition.
    pub async fn send_sets(&self, sets: Vec<NewSet>) -> Result<(), StoreError> {
        let mut by_partition: BTreeMap<i32, Vec<DeliveryRecord>> = BTreeMap::new();
        for set in sets {
            let partition = partition_for(&set.stream_id, self.partitions);
            let record = DeliveryRecord { stream_id: set.stream_id, jti: set.jti, token: set.token, txn: set.txn };
            by_partition.entry(partition).or_default().push(record);
        }
        let out = by_partition
            .into_iter()
            .flat_map(|(partition, sets)| DeliveryBatch::split(sets).into_iter().map(move |batch| (partition, batch)))
            .map(|(partition, batch)| OutRecord {
                topic: self.topic.clone(),
                partition,
                // Placed by stream, not by key: the key names the first SET's stream.
                key: batch.sets.first().map(|set| set.stream_id.as_bytes().to_vec()).unwrap_or_default(),
                payload: records::to_bytes(&batch),
            })
            .collect();
        self.producer.send_all(out).await.map_err(kafka_error)?;
        Ok(())
    }
}

impl LeafSink for KafkaSink {
    fn hand_over<'a>(
        &'a self,
        store: &'a Store,
        record: &'a CascadeRecord,
        leaves: Vec<Leaf>,
        signed: Vec<NewSet>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let signed_jtis: std::collections::BTreeSet<&str> = signed.iter().map(|s| s.jti.as_str()).collect();
            let reported: Vec<Leaf> =
                leaves.into_iter().filter(|leaf| signed_jtis.contains(leaf.jti.as_str())).collect();
            let jtis: Vec<String> = reported.iter().map(|leaf| leaf.jti.clone()).collect();
            self.shared.append(&SharedRecord::Planned { cascade: record.clone(), leaves: reported }).await?;
            self.send_sets(signed).await?;
            let key = record.key.clone();
            store.write(Commit::Lazy, move |txn| cascade::mark_pending(txn, &key, &jtis).map(drop)).await
        })
    }
}

/// This instance's share of the `graph` topic.
pub struct GraphPartitions {
    topic: String,
    settings: KafkaSettings,
    dir: PathBuf,
    issuer: String,
    transmitter: Arc<Transmitter>,
    sink: Arc<KafkaSink>,
    consumer: Arc<GroupConsumer>,
    workers: Mutex<HashMap<i32, mpsc::UnboundedSender<InRecord>>>,
    /// The open store of each partition being worked here.
    stores: Mutex<HashMap<i32, Store>>,
    /// The next offset each partition worked here will apply.
    progress: Mutex<HashMap<i32, watch::Sender<i64>>>,
    shared: Arc<SharedLog>,
    /// What the partitions' graphs keep, and how often they are pruned.
    pruning: Pruning,
}

impl crate::hub::GraphStores for GraphPartitions {
    fn store_of<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, Option<Store>> {
        Box::pin(async move {
            let entry = self.shared.root_of(session_id).ok().flatten()?;
            self.store_of_root(&entry.root).await
        })
    }

    fn store_of_root<'a>(&'a self, root: &'a str) -> BoxFuture<'a, Option<Store>> {
        Box::pin(async move {
            let partition = partition_for(root, self.settings.partitions);
            let store = self.stores.lock().unwrap_or_else(|p| p.into_inner()).get(&partition).cloned()?;
            self.caught_up(partition).await;
            Some(store)
        })
    }

    fn open_stores(&self) -> Vec<Store> {
        self.stores.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }
}

impl GraphPartitions {
    /// Joins the group and starts applying whatever partitions it assigns.
    pub fn start(
        settings: &KafkaSettings,
        data_dir: PathBuf,
        issuer: &str,
        transmitter: Arc<Transmitter>,
        sink: Arc<KafkaSink>,
        shared: Arc<SharedLog>,
        pruning: Pruning,
    ) -> Result<Arc<Self>, StoreError> {
        let topic = settings.topic(records::GRAPH);
        let mut group = settings.clone();
        group.group_id = format!("{}.graph", settings.group_id);
        let (consumer, rebalances) = GroupConsumer::new(&group, std::slice::from_ref(&topic)).map_err(kafka_error)?;
        std::fs::create_dir_all(&data_dir).map_err(storage)?;
        let this = Arc::new(GraphPartitions {
            topic,
            settings: settings.clone(),
            dir: data_dir,
            issuer: issuer.to_owned(),
            transmitter,
            sink,
            consumer: Arc::new(consumer),
            workers: Mutex::new(HashMap::new()),
            stores: Mutex::new(HashMap::new()),
            progress: Mutex::new(HashMap::new()),
            shared,
            pruning,
        });
        tokio::spawn(Arc::clone(&this).run(rebalances));
        Ok(this)
    }

    async fn run(self: Arc<Self>, mut rebalances: mpsc::UnboundedReceiver<Rebalance>) {
        loop {
            tokio::select! {
                biased;
                Some(event) = rebalances.recv() => self.rebalance(event),
                record = self.consumer.next() => match record {
                    Ok(record) => self.route(record),
                    Err(error) => {
                        tracing::warn!(%error, "graph consumer");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
            }
        }
    }

    /// Waits (bounded) until this instance has applied every record of
    /// `partition` logged before the call.
    async fn caught_up(&self, partition: i32) {
        let high = match self.consumer.high_watermark(&self.topic, partition).await {
            Ok(high) => high,
            Err(error) => {
                tracing::warn!(partition, %error, "graph read barrier: no high watermark");
                return;
            }
        };
        let watcher =
            self.progress.lock().unwrap_or_else(|p| p.into_inner()).get(&partition).map(watch::Sender::subscribe);
        let Some(mut watcher) = watcher else { return };
        let waited = tokio::time::timeout(Duration::from_secs(5), watcher.wait_for(|next| *next >= high)).await;
        if waited.is_err() {
            tracing::warn!(partition, high, "graph read barrier timed out; answering from local state");
        }
    }

    fn set_progress(&self, partition: i32, next: i64) {
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(partition)
            .or_insert_with(|| watch::channel(next).0)
            .send_replace(next);
    }

    /// The partitions being worked here, ascending.
    pub fn partitions(&self) -> Vec<i32> {
        let mut partitions: Vec<i32> = self.workers.lock().unwrap_or_else(|p| p.into_inner()).keys().copied().collect();
        partitions.sort_unstable();
        partitions
    }

    fn rebalance(self: &Arc<Self>, event: Rebalance) {
        let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        match event {
            Rebalance::Assigned(assigned) => {
                for (_, partition) in assigned.into_iter().filter(|(topic, _)| *topic == self.topic) {
                    workers.entry(partition).or_insert_with(|| self.spawn_worker(partition));
                }
            }
            Rebalance::Revoked(revoked) => {
                for (_, partition) in revoked.into_iter().filter(|(topic, _)| *topic == self.topic) {
                    // Closing the channel ends the worker after its batch.
                    workers.remove(&partition);
                    tracing::info!(partition, "graph partition revoked");
                }
            }
        }
    }

    fn route(self: &Arc<Self>, record: InRecord) {
        // A record fetched before its partition was revoked: the next owner has it.
        if !self.consumer.owns(&record.topic, record.partition) {
            return;
        }
        let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        let partition = record.partition;
        let worker = workers.entry(partition).or_insert_with(|| self.spawn_worker(partition));
        if worker.send(record).is_err() {
            workers.remove(&partition);
        }
    }

    fn spawn_worker(self: &Arc<Self>, partition: i32) -> mpsc::UnboundedSender<InRecord> {
        let (sender, receiver) = mpsc::unbounded_channel();
        let this = Arc::clone(self);
        tokio::spawn(async move {
            tracing::info!(partition, "graph partition assigned");
            if let Err(error) = Arc::clone(&this).work(partition, receiver).await {
                tracing::error!(partition, %error, "graph partition worker stopped");
            }
            this.stores.lock().unwrap_or_else(|p| p.into_inner()).remove(&partition);
            this.progress.lock().unwrap_or_else(|p| p.into_inner()).remove(&partition);
        });
        sender
    }

    async fn open_store(&self, partition: i32) -> Store {
        let path = self.dir.join(format!("graph-{partition}.redb"));
        // The previous worker of this partition may still hold the file.
        until_ok("opening a graph partition's store", || std::future::ready(Store::open(&path))).await
    }

    async fn work(
        self: Arc<Self>,
        partition: i32,
        mut records: mpsc::UnboundedReceiver<InRecord>,
    ) -> Result<(), StoreError> {
        let store = self.open_store(partition).await;
        self.stores.lock().unwrap_or_else(|p| p.into_inner()).insert(partition, store.clone());
        let pruning = AbortOnDrop(tokio::spawn(Arc::clone(&self).prune_forever(partition, store.clone())));
        let sink: Arc<dyn LeafSink> = self.sink.clone();
        let dispatcher = Dispatcher::new(&self.issuer, Arc::clone(&self.transmitter), store.clone(), sink);
        // Leaves this file planned but never handed over (a crash between).
        self.dispatch_planned(&store, &dispatcher).await;
        let mut next = next_offset(&store)?;
        let committed = self.consumer.committed(&self.topic, partition).await.map_err(kafka_error)?.unwrap_or(0);
        if committed > next {
            next = self.catch_up(partition, &store, next, committed).await?;
        }
        self.set_progress(partition, next);
        while let Some(first) = records.recv().await {
            let mut batch = vec![first];
            while batch.len() < APPLY_BATCH {
                match records.try_recv() {
                    Ok(record) => batch.push(record),
                    Err(_) => break,
                }
            }
            batch.retain(|record| record.offset >= next);
            let Some(last) = batch.last().map(|r| r.offset) else { continue };
            let plans = self.apply(&store, batch, false).await?;
            next = last + 1;
            self.set_progress(partition, next);
            for plan in plans {
                self.continue_elsewhere(partition, plan.foreign).await;
                for (record, leaves) in plan.cascades {
                    if let Err(error) = dispatcher.dispatch_all(record, leaves).await {
                        tracing::warn!(partition, %error, "cascade dispatch failed; retrying until it succeeds");
                        self.dispatch_planned(&store, &dispatcher).await;
                    }
                }
            }
            if let Err(error) = self.consumer.commit(&self.topic, partition, next) {
                tracing::debug!(partition, %error, "graph offset commit");
            }
        }
        drop(pruning);
        Ok(())
    }

    /// Sends revocations on to the partitions of foreign trees, retrying
    /// until the broker has them: the offset must not pass them unsent.
    /// Prunes the partition's graph as the embedded hub prunes its own,
    /// then tells the shared directory which sessions it forgot (noted in
    /// the same transaction that removed them, so a crash between the two
    /// only repeats the announcement).
    async fn prune_forever(self: Arc<Self>, partition: i32, store: Store) {
        let mut tick = tokio::time::interval(self.pruning.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match prune_store(&store, self.pruning.keep, Forgetting::Noted).await {
                Ok(pruned) if pruned.is_empty() => {}
                Ok(pruned) => tracing::info!(partition, ?pruned, "graph partition pruned"),
                Err(error) => tracing::warn!(partition, %error, "cannot prune a graph partition"),
            }
            if let Err(error) = self.announce_forgotten(partition, &store).await {
                tracing::warn!(partition, %error, "cannot announce forgotten sessions; next time");
            }
        }
    }

    async fn announce_forgotten(&self, partition: i32, store: &Store) -> Result<(), StoreError> {
        if !store.read(graph::any_forgotten)? {
            return Ok(());
        }
        loop {
            let (looked_at, sessions) =
                store.write(Commit::Lazy, |txn| graph::unheld_forgotten(txn, FORGET_BATCH)).await?;
            if looked_at == 0 {
                return Ok(());
            }
            if sessions.is_empty() {
                continue;
            }
            self.shared.append(&SharedRecord::Forget { partition, sessions: sessions.clone() }).await?;
            store.write(Commit::Lazy, move |txn| graph::announced(txn, &sessions)).await?;
        }
    }

    async fn continue_elsewhere(&self, partition: i32, foreign: Vec<ForeignRevocation>) {
        if foreign.is_empty() {
            return;
        }
        let records: Vec<OutRecord> = foreign
            .into_iter()
            .map(|revocation| {
                let record = GraphRecord::RevokeForeign {
                    session: revocation.session.clone(),
                    cascade: Box::new(revocation.cascade),
                    event: revocation.event,
                    at_ms: now_ms(),
                };
                OutRecord {
                    topic: self.topic.clone(),
                    partition: partition_for(&revocation.child_root, self.settings.partitions),
                    key: revocation.session.into_bytes(),
                    payload: records::to_bytes(&record),
                }
            })
            .collect();
        tracing::debug!(partition, revocations = records.len(), "revocation continues in other partitions");
        until_ok("continuing a revocation in another partition", || self.sink.producer.send_all(records.clone())).await;
    }

    /// Replays records a previous owner already dispatched: state only.
    async fn catch_up(&self, partition: i32, store: &Store, from: i64, until: i64) -> Result<i64, StoreError> {
        tracing::info!(partition, from, until, "rebuilding graph partition from the log");
        let reader = TailReader::new(&self.settings, &self.topic, partition, from).map_err(kafka_error)?;
        let mut batch = Vec::new();
        while let Some(record) = reader_next(&reader, until).await? {
            let last = record.offset + 1 == until;
            batch.push(record);
            if last {
                break;
            }
            if batch.len() == APPLY_BATCH {
                self.apply(store, std::mem::take(&mut batch), true).await?;
            }
        }
        self.apply(store, batch, true).await?;
        Ok(until)
    }

    /// Applies records and the next offset in one durable transaction.
    /// `replayed`: their leaves were handed over before; mark them so.
    async fn apply(&self, store: &Store, batch: Vec<InRecord>, replayed: bool) -> Result<Vec<Plan>, StoreError> {
        let Some(next) = batch.last().map(|r| r.offset + 1) else { return Ok(Vec::new()) };
        let (transmitter, lifetimes) = (Arc::clone(&self.transmitter), self.pruning.keep.sessions);
        store
            .write(Commit::Durable, move |txn| {
                let ctx = Context { streams: transmitter.streams(), lifetimes: &lifetimes, on_planned: None };
                let mut plans = Vec::with_capacity(batch.len());
                for record in &batch {
                    let plan = apply_record(txn, ctx, record)?;
                    if replayed {
                        for (cascade, leaves) in &plan.cascades {
                            let jtis: Vec<String> = leaves.iter().map(|leaf| leaf.jti.clone()).collect();
                            cascade::mark_pending(txn, &cascade.key, &jtis)?;
                        }
                    } else {
                        plans.push(plan);
                    }
                }
                txn.open_table(GRAPH_NEXT).map_err(storage)?.insert("next", next).map_err(storage)?;
                Ok(plans)
            })
            .await
    }

    /// Dispatches every planned leaf in `store`, retrying until all are
    /// handed over: the partition must not move on past unsent leaves.
    async fn dispatch_planned(&self, store: &Store, dispatcher: &Arc<Dispatcher>) {
        until_ok("dispatching planned leaves", || async {
            for (record, leaves) in store.read(cascade::all_planned)? {
                dispatcher.dispatch_all(record, leaves).await?;
            }
            Ok::<(), StoreError>(())
        })
        .await;
    }
}

/// The next record before offset `until`, or `None` past it. Offsets may
/// skip (compaction, producer retries), so the end is found by offset, not
/// by count; the committed offset never exceeds the log's end, so this
/// never waits for records that may not come.
async fn reader_next(reader: &TailReader, until: i64) -> Result<Option<InRecord>, StoreError> {
    let record = reader.next().await.map_err(kafka_error)?;
    Ok((record.offset < until).then_some(record))
}

/// Aborts a task when dropped (the task lives as long as its owner).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn next_offset(store: &Store) -> Result<i64, StoreError> {
    store.read(|txn| match txn.open_table(GRAPH_NEXT) {
        Ok(table) => Ok(table.get("next").map_err(storage)?.map_or(0, |v| v.value())),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
        Err(error) => Err(storage(error)),
    })
}

/// One record's effects. A record this hub cannot read or an event the
/// graph refuses (another IdP's session) is logged and skipped: the IdP got
/// its 202 already, and stalling the partition would stall every tree in it.
fn apply_record(txn: &WriteTransaction, ctx: Context<'_>, record: &InRecord) -> Result<Plan, StoreError> {
    let parsed: GraphRecord = match serde_json::from_slice(&record.payload) {
        Ok(parsed) => parsed,
        Err(error) => {
            tracing::error!(partition = record.partition, offset = record.offset, %error, "unreadable graph record");
            return Ok(Plan::default());
        }
    };
    match parsed {
        GraphRecord::Event { claims, received_at_ms } => {
            let set = match SecurityEventToken::from_claims(claims) {
                Ok(set) => set,
                Err(error) => {
                    tracing::error!(offset = record.offset, %error, "graph record holds no valid SET");
                    return Ok(Plan::default());
                }
            };
            let applied = effects::apply(txn, ctx, &set, received_at_ms);
            // Its route was recorded before it got here: one that leads to
            // nothing (refused, or an event about a session never named)
            // goes with the next `Forget`.
            if let Ok(effects::Route::Session { session_id, .. }) = effects::route(&set) {
                graph::forget_if_unheld(txn, &session_id)?;
            }
            skip_refused(applied, &set.jti)
        }
        GraphRecord::Touch { session_id, stream_id, touch } => {
            let applied = effects::late_touch_plan(txn, ctx, &session_id, &stream_id, &touch);
            graph::forget_if_unheld(txn, &session_id)?;
            skip_refused(applied, &stream_id)
        }
        GraphRecord::Adopt { parent, child, child_root, issuer, .. } => {
            effects::adopt(txn, &parent, &child, &child_root, &issuer)
        }
        GraphRecord::RevokeForeign { session, cascade, event, at_ms } => {
            skip_refused(effects::revoke_foreign(txn, ctx, &session, &cascade, &event, at_ms), &session)
        }
    }
}

/// A record the graph refuses is logged and skipped (its sender was
/// answered already); only a storage failure stops the partition.
fn skip_refused(applied: Result<Plan, IngestError>, what: &str) -> Result<Plan, StoreError> {
    match applied {
        Ok(plan) => Ok(plan),
        Err(IngestError::Rejected { err, description }) => {
            tracing::warn!(what, err, %description, "graph record refused by its partition");
            Ok(Plan::default())
        }
        Err(IngestError::TooMany(reason)) => {
            tracing::warn!(what, %reason, "touch dropped by its partition");
            Ok(Plan::default())
        }
        Err(IngestError::Unavailable(reason)) => Err(StoreError::storage(reason)),
    }
}

#[cfg(test)]
mod tests {
    use caep_schemas::event::{Event, SessionEstablished};
    use caep_schemas::jose::Algorithm;
    use caep_schemas::subject::SubjectId;
    use caep_transmitter::keys::KeyStore;
    use caep_transmitter::service::{TransmitterSettings, open_in};

    use super::*;
    use crate::graph::{Lifetimes, Touch};

    const IDP: &str = "https://idp.test";

    fn record(graph: &GraphRecord) -> InRecord {
        InRecord { topic: "caep.graph".into(), partition: 0, offset: 0, key: None, payload: records::to_bytes(graph) }
    }

    fn touch_of(session_id: &str) -> InRecord {
        let touch = Touch { at_ms: now_ms(), by_idp: false, named_user: None };
        record(&GraphRecord::Touch { session_id: session_id.into(), stream_id: "full".into(), touch })
    }

    fn forgotten(store: &Store) -> Vec<String> {
        store.read(|txn| graph::forgotten(txn, 100)).expect("forgotten")
    }

    /// A touch refused because its stream's pending touches are full, or an
    /// event about a session never named, leaves its session's route to be
    /// forgotten, unless something of the session is held here (a pending
    /// touch, an edge to a child in another partition); one named after it
    /// was noted is not announced.
    #[tokio::test]
    async fn a_route_that_leads_to_nothing_is_forgotten() {
        let dir = tempfile::tempdir().expect("temp dir");
        let keys = Arc::new(KeyStore::open(dir.path(), Algorithm::Es256).expect("keys"));
        let transmitter = open_in(dir.path(), TransmitterSettings::new("https://hub.test"), keys).expect("transmitter");
        let store = transmitter.outbox().store().clone();
        let key = |id: &str| graph::session_key(IDP, &SubjectId::opaque(id));
        let (pending, parent, stranger, named) = (key("pending"), key("parent"), key("stranger"), key("named"));
        let t = Arc::clone(&transmitter);
        let (p, f, s, n) = (pending.clone(), parent.clone(), stranger.clone(), named.clone());
        store
            .write(Commit::Durable, move |txn| {
                let touch = Touch { at_ms: now_ms(), by_idp: false, named_user: None };
                let full = |e: graph::PendingError| StoreError::storage(e.to_string());
                graph::touch_pending(txn, &p, "full", &touch).map_err(full)?;
                for n in 1..graph::MAX_PENDING_TOUCHES_PER_STREAM {
                    graph::touch_pending(txn, &format!("filler-{n}"), "full", &touch).map_err(full)?;
                }
                // A child of `parent` whose tree started in another partition.
                graph::add_foreign_child(txn, &f, "child", "child")?;
                let ctx = Context { streams: t.streams(), lifetimes: &Lifetimes::DEFAULT, on_planned: None };
                for key in [&p, &f, &s, &n] {
                    let plan = apply_record(txn, ctx, &touch_of(key))?;
                    assert!(plan.cascades.is_empty());
                }
                Ok(())
            })
            .await
            .expect("touches applied");
        // An event accepted about a session never named leaves nothing either.
        let t = Arc::clone(&transmitter);
        store
            .write(Commit::Durable, move |txn| {
                let sub = SubjectId::session_of(SubjectId::opaque("ghost"), None);
                let set =
                    SecurityEventToken::new(IDP, "https://hub.test", sub, Event::TokenClaimsChange(Default::default()));
                let changed = GraphRecord::Event { claims: set.to_claims(), received_at_ms: now_ms() };
                let ctx = Context { streams: t.streams(), lifetimes: &Lifetimes::DEFAULT, on_planned: None };
                apply_record(txn, ctx, &record(&changed)).map(drop)
            })
            .await
            .expect("forwarded");
        let mut noted = forgotten(&store);
        noted.sort();
        let mut expected = vec![key("ghost"), named.clone(), stranger.clone()];
        expected.sort();
        assert_eq!(noted, expected, "only sessions held nowhere are noted");

        // The IdP names one of them before the announcement: its route is in use again.
        let t = Arc::clone(&transmitter);
        store
            .write(Commit::Durable, move |txn| {
                let sub = SubjectId::session_of(SubjectId::opaque("named"), None);
                let set = SecurityEventToken::new(
                    IDP,
                    "https://hub.test",
                    sub,
                    Event::SessionEstablished(SessionEstablished::default()),
                );
                let established = GraphRecord::Event { claims: set.to_claims(), received_at_ms: now_ms() };
                let ctx = Context { streams: t.streams(), lifetimes: &Lifetimes::DEFAULT, on_planned: None };
                apply_record(txn, ctx, &record(&established)).map(drop)
            })
            .await
            .expect("established");
        let (looked_at, announced) =
            store.write(Commit::Durable, |txn| graph::unheld_forgotten(txn, 10)).await.expect("announce");
        let mut still = vec![key("ghost"), stranger.clone()];
        still.sort();
        assert_eq!((looked_at, announced), (3, still.clone()));
        assert_eq!(forgotten(&store), still, "the named session is off the list");
    }
}
