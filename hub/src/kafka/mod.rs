//! Scale-out on Apache Kafka: several hub instances share one event log,
//! one delivery queue and one control plane through Kafka topics (see
//! `records.rs` for the topics and ARCHITECTURE.md for the model).
//!
//! Without `CAEP_HUB_KAFKA_BROKERS` none of this runs: the embedded redb
//! log and outbox serve alone.

pub mod client;
pub mod deliveries;
pub mod log;
pub mod partitions;
pub mod records;
pub mod retry;
pub mod shared;
pub mod stats;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use caep_transmitter::control::{Cluster, ControlChange};
use caep_transmitter::keys::KeyStore;
use caep_transmitter::service::{Transmitter, TransmitterSettings};
use caep_transmitter::ssrf::PushUrlGuard;
use caep_transmitter::store::{Store, StoreError};

use crate::config::HubConfig;
use crate::dispatch::Dispatcher;
use crate::error::StartError;
use crate::hub::{Hub, ReadBarrier, TouchHook};
use crate::issuers::Issuers;
use client::{KafkaSettings, Producer};
use deliveries::{Deliveries, Instance, KafkaTracker};
use partitions::{GraphPartitions, KafkaSink};
use records::SharedRecord;
use shared::{KafkaControl, KafkaIssuers, SharedLog};

/// The file holding this instance's id inside the data directory.
const INSTANCE_ID_FILE: &str = "instance-id";

/// A hub instance assembled on Kafka.
pub struct Assembled {
    pub transmitter: Arc<Transmitter>,
    pub hub: Arc<Hub>,
    pub shared: Arc<SharedLog>,
    pub graph: Arc<GraphPartitions>,
}

fn kafka_start(error: client::KafkaError) -> StartError {
    StartError::Store(StoreError::storage(format!("kafka: {error}")))
}

/// Creates the topics if needed, catches up with the shared log, and joins
/// the graph and deliveries groups.
pub async fn assemble(
    config: &HubConfig,
    settings: KafkaSettings,
    store: Store,
    keys: Arc<KeyStore>,
    transmitter_settings: TransmitterSettings,
    local_addr: SocketAddr,
) -> Result<Assembled, StartError> {
    let issuer = transmitter_settings.issuer.clone();
    let topics = [
        (settings.topic(records::SHARED), 1),
        (settings.topic(records::GRAPH), settings.partitions),
        (settings.topic(records::DELIVERIES), settings.partitions),
    ];
    client::ensure_topics(&settings, &topics).await.map_err(kafka_start)?;
    let producer = Producer::new(&settings).map_err(kafka_start)?;
    let instance = Instance {
        id: instance_id(&config.data_dir)?,
        url: config.advertised_url.clone().unwrap_or_else(|| format!("http://{local_addr}")),
    };
    let shared = SharedLog::open(&settings, producer.clone(), store.clone(), &instance.id)?;
    tracing::info!(instance_id = %instance.id, url = %instance.url, brokers = %settings.brokers, "joining the Kafka cluster");
    let sink = KafkaSink::new(&settings, producer.clone(), Arc::clone(&shared));
    let deliveries = Deliveries::new(&settings, instance.clone(), Arc::clone(&sink), Arc::clone(&shared));
    let cluster = Cluster {
        control: Arc::new(KafkaControl {
            shared: Arc::clone(&shared),
            secrets: Arc::clone(&transmitter_settings.secrets),
        }),
        router: deliveries.clone(),
        placement: deliveries.clone(),
    };
    let guard = PushUrlGuard::new(transmitter_settings.push_allow.clone());
    let touch_hook = Arc::new(TouchHook::default());
    let tracker = Arc::new(KafkaTracker(Arc::clone(&deliveries)));
    let transmitter = Transmitter::open(
        transmitter_settings,
        store.clone(),
        Arc::clone(&keys),
        tracker,
        touch_hook.clone(),
        Some(cluster),
    )?;
    let issuers = Issuers::load_with(store.clone(), guard, Arc::new(KafkaIssuers(Arc::clone(&shared))))?;
    let log = Box::new(log::KafkaLog::new(&settings, producer, Arc::clone(&shared)));
    let pruning = config.pruning();
    let dispatcher = Dispatcher::local(&issuer, Arc::clone(&transmitter), store.clone());
    let hub = Hub::new(&issuer, Arc::clone(&transmitter), store, issuers, log, dispatcher, pruning);
    touch_hook.connect(&hub);
    let barrier: Arc<dyn ReadBarrier> = shared.clone();
    hub.set_barrier(barrier);
    shared.start(Arc::clone(&transmitter), &hub).await?;
    // Receivers verify SETs signed by any instance: publish our public keys.
    let change = ControlChange::PeerKeys { instance_id: instance.id.clone(), jwks: keys.public_jwks_json() };
    shared.append_and_apply(&SharedRecord::Control { change }).await?;
    deliveries.start(Arc::clone(&transmitter))?;
    let graph = GraphPartitions::start(
        &settings,
        config.data_dir.join("kafka"),
        &issuer,
        Arc::clone(&transmitter),
        sink,
        Arc::clone(&shared),
        pruning,
    )?;
    hub.set_graph_stores(graph.clone());
    let status = Status { instance, graph: Arc::clone(&graph), deliveries, shared: Arc::clone(&shared) };
    hub.set_cluster_status(Arc::new(status));
    Ok(Assembled { transmitter, hub, shared, graph })
}

/// `/healthz`'s view of this instance.
struct Status {
    instance: Instance,
    graph: Arc<GraphPartitions>,
    deliveries: Arc<Deliveries>,
    shared: Arc<SharedLog>,
}

impl crate::hub::ClusterStatus for Status {
    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "instance_id": self.instance.id,
            "url": self.instance.url,
            "graph_partitions": self.graph.partitions(),
            "delivery_partitions": self.deliveries.partitions(),
            "read_barriers": self.shared.barriers(),
            "root_directory_entries": self.shared.directory_entries(),
        })
    }
}

/// This instance's id: made once, kept in the data directory.
fn instance_id(data_dir: &Path) -> Result<String, StartError> {
    let path = data_dir.join(INSTANCE_ID_FILE);
    let data_dir_error = |source| StartError::DataDir { dir: data_dir.to_owned(), source };
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_owned()),
        Ok(_) | Err(_) => {
            let id = uuid::Uuid::new_v4().simple().to_string();
            std::fs::write(&path, &id).map_err(data_dir_error)?;
            Ok(id)
        }
    }
}
