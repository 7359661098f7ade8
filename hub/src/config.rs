//! Layered configuration: built-in defaults, then an optional TOML file, then
//! `CAEP_HUB_*` environment variables, each layer overriding the one before.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use caep_schemas::jose::Algorithm;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Environment variable naming the optional configuration file.
pub const CONFIG_FILE_ENV: &str = "CAEP_HUB_CONFIG";

/// The hub's settings as the layers combine them. `Debug` redacts the admin
/// token (see the impl below), so a logged configuration leaks no secret.
#[derive(Clone, Serialize, Deserialize)]
pub struct HubConfig {
    /// `CAEP_HUB_LISTEN`: address the HTTP server binds.
    pub listen: SocketAddr,
    /// `CAEP_HUB_ISSUER`: the hub's issuer URL; `http://` + listen when unset.
    pub issuer: Option<String>,
    /// `CAEP_HUB_DATA_DIR`: keys, the admin token hash and the redb file.
    pub data_dir: PathBuf,
    /// `CAEP_HUB_ADMIN_TOKEN`: bearer token for `/admin`; generated when unset.
    pub admin_token: Option<String>,
    /// `CAEP_HUB_SIGNING_ALG`: ES256 (default), RS256 or EdDSA.
    pub signing_alg: Algorithm,
    /// `CAEP_HUB_PUSH_ALLOW_CIDRS`: comma-separated private ranges that push
    /// endpoints may use despite the SSRF guard (empty by default).
    pub push_allow_cidrs: String,
    /// `CAEP_HUB_DELIVERY_GIVE_UP_SECS`: age at which a SET still not
    /// acknowledged is dead-lettered, pushed (after retries) or waiting for a
    /// poll (default 24 h).
    pub delivery_give_up_secs: u64,
    /// `CAEP_HUB_LONG_POLL_SECS`: longest an RFC 8936 poll waits for SETs.
    pub long_poll_secs: u64,
    /// `CAEP_HUB_SHUTDOWN_GRACE_SECS`: after SIGTERM or Ctrl-C, how long
    /// requests in flight may take to finish before the process stops
    /// without them (their callers see the connection close, no answer, and
    /// retry). Open long polls answer at once, empty.
    pub shutdown_grace_secs: u64,
    /// `CAEP_HUB_MIN_VERIFICATION_INTERVAL_SECS`: verification rate limit per stream.
    pub min_verification_interval_secs: u64,
    /// `CAEP_HUB_KAFKA_BROKERS`: bootstrap servers; when set, the event log,
    /// deliveries and control plane live on Kafka, shared by every instance.
    pub kafka_brokers: Option<String>,
    /// `CAEP_HUB_KAFKA_TOPIC_PREFIX`: topics are `<prefix>.shared|graph|deliveries`.
    pub kafka_topic_prefix: String,
    /// `CAEP_HUB_KAFKA_GROUP`: consumer group prefix shared by the instances.
    pub kafka_group: String,
    /// `CAEP_HUB_KAFKA_PARTITIONS`: partitions of `graph` and `deliveries`,
    /// fixed at topic creation (the most instances that share the work).
    pub kafka_partitions: i32,
    /// `CAEP_HUB_KAFKA_REPLICATION`: replication factor of new topics (3 in production).
    pub kafka_replication: i32,
    /// `CAEP_HUB_KAFKA_FETCH_WAIT_MS`: longest a fetch waits at the broker for
    /// new records. Apache Kafka answers as soon as records arrive, so only
    /// idle fetches wait it out; brokers that always wait it out (Tansu) add
    /// it to every hop, and answer more often the shorter it is.
    pub kafka_fetch_wait_ms: u32,
    /// `CAEP_HUB_KAFKA_LINGER_MS`: how long the producer waits to batch
    /// records before sending them. Every IdP event and touch waits for its
    /// produce, so this is added to their latency; a longer linger sends
    /// fewer, larger requests.
    pub kafka_linger_ms: u32,
    /// `CAEP_HUB_KAFKA_SESSION_TIMEOUT_MS`: consumer-group session timeout,
    /// after which a dead instance's partitions move (within the broker's
    /// `group.min.session.timeout.ms`, 6,000 on Apache Kafka by default).
    pub kafka_session_timeout_ms: u32,
    /// `CAEP_HUB_ADVERTISED_URL`: this instance's base URL for the others
    /// (polls are forwarded to a stream's owner); `http://` + the bound address when unset.
    pub advertised_url: Option<String>,
    /// `CAEP_HUB_METRICS_LISTEN`: an address of its own serving `GET /metrics`
    /// without a token (keep it on loopback or a private network). Unset:
    /// `/metrics` is served on the main address behind the admin token only.
    pub metrics_listen: Option<SocketAddr>,
    /// `CAEP_HUB_SECRET_KEY`: base64url of 32 bytes sealing receivers' push
    /// credentials at rest; unset: a key file in the data directory. Every
    /// instance of a scaled-out hub must have the same one.
    pub secret_key: Option<String>,
    /// `CAEP_HUB_RECEIVER_CALLS_PER_SEC`: authenticated SSF calls (management
    /// and poll) one receiver may make per second, bursts of twice that.
    pub receiver_calls_per_sec: u32,
    /// `CAEP_HUB_MAX_LONG_POLLS_PER_RECEIVER`: long polls one receiver may
    /// hold open at once.
    pub max_long_polls_per_receiver: usize,
    /// `CAEP_HUB_SESSION_IDLE_TTL_SECS`: a session no event or touch
    /// concerned for this long is forgotten.
    pub session_idle_ttl_secs: u64,
    /// `CAEP_HUB_REVOKED_RETENTION_SECS`: how long a revoked session is kept
    /// so a late spawn or touch of it is revoked at once; at least the
    /// longest access-token lifetime of the IdPs.
    pub revoked_retention_secs: u64,
    /// `CAEP_HUB_CASCADE_RETENTION_SECS`: how long a complete cascade's
    /// report and leaves are kept.
    pub cascade_retention_secs: u64,
    /// `CAEP_HUB_DEAD_LETTER_RETENTION_SECS`: how long a dead letter waits
    /// for an operator's replay.
    pub dead_letter_retention_secs: u64,
    /// `CAEP_HUB_STREAM_INACTIVITY_TIMEOUT_SECS`: a stream whose receiver
    /// shows no eligible activity (SSF 1.0 §8.1.1) for this long is paused;
    /// 0: never.
    pub stream_inactivity_timeout_secs: u64,
    /// `CAEP_HUB_PRUNE_INTERVAL_SECS`: how often the pruning job runs.
    pub prune_interval_secs: u64,
    /// `CAEP_HUB_MAX_SET_AGE_SECS`: the oldest IdP SET (`iat`) ingest
    /// accepts; replay records are kept that long (plus five minutes).
    pub max_set_age_secs: u64,
}

const DAY_SECS: u64 = 24 * 3600;

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            issuer: None,
            data_dir: PathBuf::from("./caep-hub-data"),
            admin_token: None,
            signing_alg: Algorithm::Es256,
            push_allow_cidrs: String::new(),
            delivery_give_up_secs: 24 * 3600,
            long_poll_secs: 30,
            shutdown_grace_secs: 10,
            min_verification_interval_secs: 5,
            kafka_brokers: None,
            kafka_topic_prefix: "caep".into(),
            kafka_group: "caep-hub".into(),
            kafka_partitions: 12,
            kafka_replication: 1,
            kafka_fetch_wait_ms: 10,
            kafka_linger_ms: 5,
            kafka_session_timeout_ms: 6000,
            advertised_url: None,
            metrics_listen: None,
            secret_key: None,
            receiver_calls_per_sec: 200,
            max_long_polls_per_receiver: 8,
            session_idle_ttl_secs: DAY_SECS,
            revoked_retention_secs: DAY_SECS,
            cascade_retention_secs: 7 * DAY_SECS,
            dead_letter_retention_secs: 7 * DAY_SECS,
            stream_inactivity_timeout_secs: 30 * DAY_SECS,
            prune_interval_secs: 60,
            max_set_age_secs: crate::replay::MAX_SET_AGE_SECS,
        }
    }
}

impl std::fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Through the serialized form so a new field is never forgotten here.
        let mut shown = serde_json::to_value(self).map_err(|_| std::fmt::Error)?;
        for secret in ["admin_token", "secret_key"] {
            if let Some(value) = shown.get_mut(secret).filter(|value| !value.is_null()) {
                *value = serde_json::Value::String("<redacted>".into());
            }
        }
        write!(f, "HubConfig {shown}")
    }
}

/// A configuration that cannot be used, with the setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("CAEP_HUB_PUSH_ALLOW_CIDRS: `{entry}` is not a CIDR range (e.g. 10.0.0.0/8)")]
    BadCidr { entry: String },
    #[error("CAEP_HUB_ISSUER: {0}")]
    BadIssuer(String),
    #[error("CAEP_HUB_KAFKA_{0}")]
    BadKafka(String),
    #[error("{old} was renamed {new}; set that instead")]
    Renamed { old: &'static str, new: &'static str },
    #[error("{0} must be at least 1")]
    Zero(&'static str),
}

impl HubConfig {
    /// Loads defaults, then `file` (or `$CAEP_HUB_CONFIG`) if given, then the
    /// environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        if std::env::var_os("CAEP_HUB_PUSH_GIVE_UP_SECS").is_some() {
            return Err(ConfigError::Renamed {
                old: "CAEP_HUB_PUSH_GIVE_UP_SECS",
                new: "CAEP_HUB_DELIVERY_GIVE_UP_SECS",
            });
        }
        let env_file = std::env::var_os(CONFIG_FILE_ENV).map(PathBuf::from);
        let mut figment = Figment::from(Serialized::defaults(HubConfig::default()));
        if let Some(file) = file.map(Path::to_path_buf).or(env_file) {
            if !file.exists() {
                return Err(ConfigError::MissingFile(file));
            }
            figment = figment.merge(Toml::file(file));
        }
        let config: HubConfig =
            figment.merge(Env::prefixed("CAEP_HUB_").ignore(&["config"])).extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// The issuer URL: the configured one, or `http://` + the listen address.
    pub fn issuer(&self) -> String {
        match &self.issuer {
            Some(issuer) => issuer.trim_end_matches('/').to_owned(),
            None => format!("http://{}", self.listen),
        }
    }

    /// The parsed `push_allow_cidrs`.
    pub fn push_allow_cidrs(&self) -> Result<Vec<IpNet>, ConfigError> {
        self.push_allow_cidrs
            .split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .map(|entry| entry.parse().map_err(|_| ConfigError::BadCidr { entry: entry.to_owned() }))
            .collect()
    }

    /// The Kafka settings, when Kafka mode is on.
    pub fn kafka(&self) -> Option<crate::kafka::client::KafkaSettings> {
        let brokers = self.kafka_brokers.as_deref().map(str::trim).filter(|b| !b.is_empty())?;
        Some(crate::kafka::client::KafkaSettings {
            brokers: brokers.to_owned(),
            topic_prefix: self.kafka_topic_prefix.clone(),
            group_id: self.kafka_group.clone(),
            partitions: self.kafka_partitions,
            replication_factor: self.kafka_replication,
            session_timeout_ms: self.kafka_session_timeout_ms,
            fetch_wait_ms: self.kafka_fetch_wait_ms,
            linger_ms: self.kafka_linger_ms,
        })
    }

    /// How long the hub keeps sessions and cascades, and how often it prunes.
    pub fn pruning(&self) -> crate::lifecycle::Pruning {
        let keep = crate::lifecycle::Retention {
            sessions: crate::graph::Lifetimes {
                idle_ms: self.session_idle_ttl_secs.saturating_mul(1000),
                revoked_retention_ms: self.revoked_retention_secs.saturating_mul(1000),
            },
            cascade_ms: self.cascade_retention_secs.saturating_mul(1000),
            max_set_age_secs: self.max_set_age_secs,
        };
        crate::lifecycle::Pruning { keep, interval: std::time::Duration::from_secs(self.prune_interval_secs) }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.push_allow_cidrs()?;
        for (value, name) in [
            (self.session_idle_ttl_secs, "CAEP_HUB_SESSION_IDLE_TTL_SECS"),
            (self.revoked_retention_secs, "CAEP_HUB_REVOKED_RETENTION_SECS"),
            (self.prune_interval_secs, "CAEP_HUB_PRUNE_INTERVAL_SECS"),
            (self.delivery_give_up_secs, "CAEP_HUB_DELIVERY_GIVE_UP_SECS"),
            (self.max_set_age_secs, "CAEP_HUB_MAX_SET_AGE_SECS"),
            // 0 would race the early answers of long polls against the stop.
            (self.shutdown_grace_secs, "CAEP_HUB_SHUTDOWN_GRACE_SECS"),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        if !(1..=10_000).contains(&self.kafka_partitions) {
            return Err(ConfigError::BadKafka(format!("PARTITIONS: {} is not in 1..=10000", self.kafka_partitions)));
        }
        if self.kafka_replication < 1 {
            return Err(ConfigError::BadKafka(format!("REPLICATION: {} is below 1", self.kafka_replication)));
        }
        let valid_name = |name: &str| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        };
        if !valid_name(&self.kafka_topic_prefix) || !valid_name(&self.kafka_group) {
            return Err(ConfigError::BadKafka("TOPIC_PREFIX and GROUP use only [A-Za-z0-9._-]".into()));
        }
        if self.kafka().is_some() && self.secret_key.is_none() {
            return Err(ConfigError::BadKafka(
                "BROKERS is set: every instance must share CAEP_HUB_SECRET_KEY, the key that seals receivers' \
                 credentials in the shared log (make one with `caep-hub secret-key generate`)"
                    .into(),
            ));
        }
        let issuer = self.issuer();
        if !(issuer.starts_with("http://") || issuer.starts_with("https://")) {
            return Err(ConfigError::BadIssuer(format!("`{issuer}` is not an http(s) URL")));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail fixes the closure's error type
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn defaults_then_file_then_environment() {
        Jail::expect_with(|jail| {
            let config = HubConfig::load(None).map_err(|e| e.to_string())?;
            assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
            assert_eq!(config.issuer(), "http://127.0.0.1:8080");
            assert_eq!(config.signing_alg, Algorithm::Es256);

            jail.create_file(
                "hub.toml",
                "listen = \"127.0.0.1:9000\"\nsigning_alg = \"RS256\"\ndata_dir = \"/srv/hub\"",
            )?;
            let config = HubConfig::load(Some(Path::new("hub.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(config.listen.to_string(), "127.0.0.1:9000");
            assert_eq!(config.signing_alg, Algorithm::Rs256);

            jail.set_env("CAEP_HUB_SIGNING_ALG", "EdDSA");
            jail.set_env("CAEP_HUB_ISSUER", "https://hub.example.com/");
            jail.set_env("CAEP_HUB_PUSH_ALLOW_CIDRS", "127.0.0.0/8, ::1/128");
            let config = HubConfig::load(Some(Path::new("hub.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(config.signing_alg, Algorithm::EdDsa);
            assert_eq!(config.data_dir, PathBuf::from("/srv/hub"), "file value kept");
            assert_eq!(config.issuer(), "https://hub.example.com");
            assert_eq!(config.push_allow_cidrs().map_err(|e| e.to_string())?.len(), 2);
            Ok(())
        });
    }

    #[test]
    fn bad_values_are_named() {
        Jail::expect_with(|jail| {
            jail.set_env("CAEP_HUB_PUSH_ALLOW_CIDRS", "10.0.0.0/8,not-a-range");
            let error = HubConfig::load(None).expect_err("bad CIDR accepted");
            assert!(error.to_string().contains("not-a-range"), "{error}");

            jail.set_env("CAEP_HUB_PUSH_ALLOW_CIDRS", "");
            jail.set_env("CAEP_HUB_SIGNING_ALG", "HS256");
            let error = HubConfig::load(None).expect_err("HS256 accepted");
            assert!(error.to_string().to_lowercase().contains("signing_alg"), "{error}");

            assert!(matches!(HubConfig::load(Some(Path::new("missing.toml"))), Err(ConfigError::MissingFile(_))));

            jail.set_env("CAEP_HUB_SIGNING_ALG", "ES256");
            jail.set_env("CAEP_HUB_KAFKA_BROKERS", "127.0.0.1:9092");
            let error = HubConfig::load(None).expect_err("Kafka mode without a shared secret key");
            assert!(error.to_string().contains("CAEP_HUB_SECRET_KEY"), "{error}");
            jail.set_env("CAEP_HUB_SECRET_KEY", "a2Fma2EtY2x1c3Rlci10ZXN0LXNlY3JldC1rZXktMzI");
            HubConfig::load(None).expect("Kafka mode with a shared secret key");

            jail.set_env("CAEP_HUB_PUSH_GIVE_UP_SECS", "60");
            let error = HubConfig::load(None).expect_err("the old name is silently ignored");
            assert!(error.to_string().contains("CAEP_HUB_DELIVERY_GIVE_UP_SECS"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn debug_redacts_the_admin_token() {
        let config = HubConfig {
            admin_token: Some("very-secret-token".into()),
            secret_key: Some("very-secret-key".into()),
            ..HubConfig::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("very-secret") && shown.contains("<redacted>"), "{shown}");
        assert!(shown.contains("delivery_give_up_secs"), "{shown}");
    }
}
