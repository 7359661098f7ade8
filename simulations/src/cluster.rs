//! The hub of a Kafka-mode drill: N `caep-hub serve` instances on one broker
//! (given, or a private Tansu the drill starts and may restart), a unique
//! topic prefix and consumer group per run, each instance with its own data
//! dir and port, all sharing one issuer (the URL of a round-robin
//! [`Balancer`] in front of them) and one admin token.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;

use crate::balancer::Balancer;
use crate::hub::{SpawnedHub, free_port};
use crate::tansu::TansuBroker;

/// Where the instances find their broker.
#[derive(Debug, Clone)]
pub enum Brokers {
    /// An existing broker (`host:port[,host:port…]`).
    External(String),
    /// A private Tansu broker started from this binary.
    Tansu(PathBuf),
}

/// How to start the cluster.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// The `caep-hub` binary.
    pub hub_bin: PathBuf,
    /// The broker.
    pub brokers: Brokers,
    /// Instances.
    pub instances: usize,
    /// Partitions of the graph and deliveries topics.
    pub partitions: usize,
    /// More settings for every instance (the cluster's own win over these).
    pub extra_env: Vec<(String, String)>,
    /// The admin token every instance shares.
    pub admin_token: String,
}

/// Running instances, their balancer and maybe their broker.
#[derive(Debug)]
pub struct KafkaCluster {
    // Dropped in this order: the balancer, the hubs, then the broker.
    balancer: Balancer,
    hubs: Vec<SpawnedHub>,
    broker: Option<TansuBroker>,
    brokers: String,
    /// The topic prefix of this run.
    pub topic_prefix: String,
}

impl KafkaCluster {
    /// Starts the broker (if the drill owns it), the balancer and the
    /// instances, and waits until every instance is healthy and lists every
    /// instance's signing keys.
    ///
    /// # Errors
    ///
    /// When something does not start or the instances do not converge in a minute.
    pub async fn start(spec: &ClusterSpec) -> anyhow::Result<KafkaCluster> {
        anyhow::ensure!(spec.instances >= 1, "--hubs must be at least 1");
        let broker = match &spec.brokers {
            Brokers::External(_) => None,
            Brokers::Tansu(bin) => Some(TansuBroker::start(bin.clone()).await?),
        };
        let brokers = match (&spec.brokers, &broker) {
            (Brokers::External(list), _) => list.clone(),
            (_, Some(broker)) => broker.brokers(),
            (Brokers::Tansu(_), None) => anyhow::bail!("no broker"),
        };
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        let topic_prefix = format!("caep-drill-{}-{ms}", std::process::id());
        let ports: Vec<u16> = (0..spec.instances).map(|_| free_port()).collect::<anyhow::Result<_>>()?;
        let bases: Vec<String> = ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
        let balancer = Balancer::start("127.0.0.1:0".parse()?, bases.clone()).await?;
        let issuer = balancer.url();
        let mut hubs = Vec::with_capacity(spec.instances);
        let secret_key = caep_transmitter::secrets::SecretBox::generate_key();
        for (port, base) in ports.iter().zip(&bases) {
            // The cluster's own settings come last, so they win.
            let mut env = spec.extra_env.clone();
            env.extend([
                ("CAEP_HUB_KAFKA_BROKERS".to_owned(), brokers.clone()),
                ("CAEP_HUB_KAFKA_TOPIC_PREFIX".to_owned(), topic_prefix.clone()),
                ("CAEP_HUB_KAFKA_GROUP".to_owned(), format!("{topic_prefix}-group")),
                ("CAEP_HUB_KAFKA_PARTITIONS".to_owned(), spec.partitions.to_string()),
                ("CAEP_HUB_ADVERTISED_URL".to_owned(), base.clone()),
                ("CAEP_HUB_ISSUER".to_owned(), issuer.clone()),
                ("CAEP_HUB_SECRET_KEY".to_owned(), secret_key.clone()),
            ]);
            hubs.push(SpawnedHub::spawn_with(spec.hub_bin.clone(), spec.admin_token.clone(), *port, env)?);
        }
        let mut cluster = KafkaCluster { balancer, hubs, broker, brokers, topic_prefix };
        for hub in &mut cluster.hubs {
            hub.wait_ready().await?;
        }
        cluster.wait_keys_converged().await?;
        tracing::info!(instances = spec.instances, brokers = %cluster.brokers, issuer = %issuer, "Kafka cluster up");
        Ok(cluster)
    }

    /// Every instance's JWKS lists the same keys, at least one per instance:
    /// a receiver verifies every instance's SETs with the JWKS it fetched once.
    async fn wait_keys_converged(&self) -> anyhow::Result<()> {
        let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(10)).build()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut sets = Vec::new();
            for hub in &self.hubs {
                let kids = async {
                    let jwks: serde_json::Value =
                        client.get(format!("{}/ssf/jwks.json", hub.url())).send().await?.json().await?;
                    let mut kids: Vec<String> = jwks["keys"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|k| k["kid"].as_str().map(str::to_owned))
                        .collect();
                    kids.sort();
                    anyhow::Ok(kids)
                };
                sets.push(kids.await.unwrap_or_default());
            }
            let converged = sets.iter().all(|kids| kids.len() >= self.hubs.len() && *kids == sets[0]);
            if converged {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the instances' JWKS did not converge in 60 s: {sets:?}; logs: {:?}",
                self.log_paths()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The shared issuer: the balancer's URL.
    pub fn url(&self) -> String {
        self.balancer.url()
    }

    /// `CAEP_HUB_KAFKA_BROKERS` of the instances.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// Instances started.
    pub fn instances(&self) -> usize {
        self.hubs.len()
    }

    /// Instances still running.
    pub fn live_instances(&self) -> usize {
        self.hubs.iter().filter(|h| h.is_running()).count()
    }

    /// Each instance's own URL and admin token.
    pub fn instance_endpoints(&self) -> Vec<(String, String)> {
        self.hubs.iter().map(|hub| (hub.url(), hub.admin_token().to_owned())).collect()
    }

    /// The process ids of the instances (`None` for one killed).
    pub fn hub_pids(&self) -> Vec<Option<u32>> {
        self.hubs.iter().map(SpawnedHub::pid).collect()
    }

    /// The process id of the drill's own broker, if it runs one.
    pub fn broker_pid(&self) -> Option<u32> {
        self.broker.as_ref().and_then(TansuBroker::pid)
    }

    /// Whether the drill owns the broker (and can restart it).
    pub fn owns_broker(&self) -> bool {
        self.broker.is_some()
    }

    /// Requests the balancer forwarded to each instance.
    pub fn requests_per_instance(&self) -> Vec<u64> {
        self.balancer.requests()
    }

    /// SIGKILLs instance `index` (not restarted) and takes it out of the
    /// balancer: from now on the drill talks only to the others.
    ///
    /// # Errors
    ///
    /// When it cannot be killed.
    pub fn kill_instance(&mut self, index: usize) -> anyhow::Result<()> {
        let hub = self.hubs.get_mut(index).context("no such instance")?;
        self.balancer.take_out(index);
        hub.kill()?;
        tracing::warn!(instance = index, url = %hub.url(), "instance SIGKILLed (not restarted)");
        Ok(())
    }

    /// Stops the drill's broker, waits `down`, starts it again on the same
    /// port and storage.
    ///
    /// # Errors
    ///
    /// When the drill does not own the broker or it cannot be restarted.
    pub async fn restart_broker(&mut self, down: Duration) -> anyhow::Result<Duration> {
        let broker = self.broker.as_mut().context("the broker is not the drill's own (use --kafka tansu)")?;
        broker.restart(down).await
    }

    /// Keeps every instance's data dir and log, and the broker's, after the
    /// drill (for a failed drill); returns their paths.
    pub fn keep_logs(&mut self) -> Vec<PathBuf> {
        let mut kept: Vec<PathBuf> = self.hubs.iter_mut().map(|h| h.keep_dir()).collect();
        if let Some(broker) = self.broker.as_mut() {
            kept.push(broker.keep_dir());
        }
        kept
    }

    /// Every instance's log file, then the broker's.
    pub fn log_paths(&self) -> Vec<PathBuf> {
        let mut logs: Vec<PathBuf> = self.hubs.iter().map(SpawnedHub::log_path).collect();
        if let Some(broker) = &self.broker {
            logs.push(broker.log_path());
        }
        logs
    }
}
