//! Trusted identity providers: the issuers whose SETs the hub ingests, each
//! with its keys given inline (`jwks`) or fetched from a `jwks_uri` through
//! the SSRF-guarded client, cached, and re-fetched on an unknown `kid`
//! (rate-limited by the receiver SDK's [`JwksCache`]).
//!
//! Scale-out: the registry is control-plane state every instance holds. A
//! change is validated (and the keys fetched) at the originator, described
//! whole as an [`IssuerChange`], recorded in an [`IssuerLog`] and applied on
//! every instance by [`Issuers::apply`], deterministically and idempotently.
//! Embedded, there is no log: changes apply here at once.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use caep_receiver::jwks::JwksCache;
use caep_schemas::jose::Jwks;
use caep_transmitter::outbox::now_ms;
use caep_transmitter::service::BoxFuture;
use caep_transmitter::ssrf::PushUrlGuard;
use caep_transmitter::store::{Commit, Store, StoreError, decode, encode};
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::Value;

const ISSUERS: TableDefinition<&str, &[u8]> = TableDefinition::new("trusted_issuers");

/// A registered IdP.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TrustedIssuer {
    pub issuer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub jwks: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    pub registered_at_ms: u64,
}

/// A change to the trusted issuers, replicated to every instance in order.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum IssuerChange {
    /// Registers or replaces an issuer: the whole record.
    Put { record: TrustedIssuer },
    /// Stops trusting an issuer.
    Deleted { issuer: String },
}

/// Where issuer changes go to be applied on every instance.
pub trait IssuerLog: Send + Sync {
    /// Resolves once `change` has been applied to THIS instance's registry
    /// (read-your-writes).
    fn record(&self, change: IssuerChange) -> BoxFuture<'_, Result<(), StoreError>>;
}

/// Why an issuer could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The registry, with one key cache per issuer.
pub struct Issuers {
    store: Store,
    guard: PushUrlGuard,
    client: reqwest::Client,
    keys: RwLock<HashMap<String, Arc<JwksCache>>>,
    /// `None` embedded: changes apply here at once. A replicated log applies
    /// them on every instance (this one included) through [`Issuers::apply`].
    log: Option<Arc<dyn IssuerLog>>,
    /// Serializes changes at this originator, so "is it new?" is answered
    /// against the state the change is applied to.
    changing: tokio::sync::Mutex<()>,
    /// When each trusted IdP's last SET was accepted here (the console
    /// shows it); one entry per trusted IdP, dropped when it is untrusted.
    last_events: std::sync::Mutex<HashMap<String, u64>>,
}

fn storage<E: std::fmt::Display>(error: E) -> StoreError {
    StoreError::storage(error)
}

impl Issuers {
    /// Loads the registered issuers. `guard` vets every `jwks_uri`.
    /// Embedded: changes apply here at once.
    pub fn load(store: Store, guard: PushUrlGuard) -> Result<Self, IssuerError> {
        Self::open(store, guard, None)
    }

    /// Loads the registered issuers of a scaled-out hub: every change goes
    /// through `log`, which must apply it here with [`Issuers::apply`].
    pub fn load_with(store: Store, guard: PushUrlGuard, log: Arc<dyn IssuerLog>) -> Result<Self, IssuerError> {
        Self::open(store, guard, Some(log))
    }

    fn open(store: Store, guard: PushUrlGuard, log: Option<Arc<dyn IssuerLog>>) -> Result<Self, IssuerError> {
        let client = guard.client_builder().build().map_err(|e| IssuerError::Invalid(e.to_string()))?;
        let registry = Issuers {
            store,
            guard,
            client,
            keys: RwLock::new(HashMap::new()),
            log,
            changing: tokio::sync::Mutex::new(()),
            last_events: std::sync::Mutex::new(HashMap::new()),
        };
        for issuer in registry.list()? {
            match registry.cache_for(&issuer) {
                Ok(cache) => registry.install(&issuer.issuer, cache),
                Err(error) => tracing::error!(issuer = %issuer.issuer, %error, "stored issuer unusable"),
            }
        }
        Ok(registry)
    }

    /// Every registered issuer.
    pub fn list(&self) -> Result<Vec<TrustedIssuer>, StoreError> {
        self.store.read(|txn| {
            let table = match txn.open_table(ISSUERS) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(error) => return Err(storage(error)),
            };
            let mut all = Vec::new();
            for row in table.iter().map_err(storage)? {
                let (_, value) = row.map_err(storage)?;
                all.push(decode(value.value())?);
            }
            Ok(all)
        })
    }

    /// One registered issuer.
    pub fn get(&self, issuer: &str) -> Result<Option<TrustedIssuer>, StoreError> {
        self.store.read(|txn| {
            let table = match txn.open_table(ISSUERS) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(error) => return Err(storage(error)),
            };
            let row = table.get(issuer).map_err(storage)?;
            row.map(|value| decode(value.value())).transpose()
        })
    }

    /// Applies a change to this instance's registry: the table and the key
    /// caches. Deterministic and idempotent: re-applying a `Put` of the
    /// stored record keeps its (warm) key cache; re-applying a `Deleted`
    /// finds nothing to delete. A record whose keys cannot be used (the
    /// originator checked them, so only a damaged log) is stored but not
    /// trusted, and logged.
    pub async fn apply(&self, change: IssuerChange) -> Result<(), StoreError> {
        match change {
            IssuerChange::Put { record } => {
                let stored = record.clone();
                let unchanged = self
                    .store
                    .write(Commit::Durable, move |txn| {
                        let bytes = encode(&stored)?;
                        let mut table = txn.open_table(ISSUERS).map_err(storage)?;
                        let previous = table.insert(stored.issuer.as_str(), bytes.as_slice()).map_err(storage)?;
                        Ok(previous.is_some_and(|old| old.value() == bytes.as_slice()))
                    })
                    .await?;
                if unchanged && self.keys_for(&record.issuer).is_some() {
                    return Ok(());
                }
                match self.cache_for(&record) {
                    Ok(cache) => self.install(&record.issuer, cache),
                    Err(error) => {
                        self.uninstall(&record.issuer);
                        tracing::error!(issuer = %record.issuer, %error, "applied issuer unusable; not trusted");
                    }
                }
            }
            IssuerChange::Deleted { issuer } => {
                let owned = issuer.clone();
                self.store
                    .write(Commit::Durable, move |txn| {
                        txn.open_table(ISSUERS).map_err(storage)?.remove(owned.as_str()).map_err(storage)?;
                        Ok(())
                    })
                    .await?;
                self.uninstall(&issuer);
            }
        }
        Ok(())
    }

    /// Records a change: through the replicated log, or applied here.
    async fn record(&self, change: IssuerChange) -> Result<(), StoreError> {
        match &self.log {
            Some(log) => log.record(change).await,
            None => self.apply(change).await,
        }
    }

    /// Stops trusting an issuer. Returns false when it was not registered.
    pub async fn delete(&self, issuer: &str) -> Result<bool, StoreError> {
        let _changing = self.changing.lock().await;
        if self.get(issuer)?.is_none() {
            return Ok(false);
        }
        self.record(IssuerChange::Deleted { issuer: issuer.to_owned() }).await?;
        tracing::info!(issuer = %issuer, "trusted issuer removed");
        Ok(true)
    }

    fn uninstall(&self, issuer: &str) {
        self.keys.write().unwrap_or_else(|p| p.into_inner()).remove(issuer);
        self.last_events.lock().unwrap_or_else(|p| p.into_inner()).remove(issuer);
    }

    /// Every trusted issuer, sorted: whom a receiver bound to "every
    /// trusted issuer" hears from.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.keys.read().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        names.sort();
        names
    }

    /// Notes that a verified SET of a trusted `issuer` was accepted at `at_ms`.
    pub fn note_event(&self, issuer: &str, at_ms: u64) {
        if self.keys.read().unwrap_or_else(|p| p.into_inner()).contains_key(issuer) {
            let mut last = self.last_events.lock().unwrap_or_else(|p| p.into_inner());
            let at = last.entry(issuer.to_owned()).or_default();
            *at = (*at).max(at_ms);
        }
    }

    /// When this instance last accepted a SET of `issuer`.
    pub fn last_event(&self, issuer: &str) -> Option<u64> {
        self.last_events.lock().unwrap_or_else(|p| p.into_inner()).get(issuer).copied()
    }

    /// The key cache of an issuer, if it is trusted.
    pub fn keys_for(&self, issuer: &str) -> Option<Arc<JwksCache>> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).get(issuer).cloned()
    }

    fn install(&self, issuer: &str, cache: JwksCache) {
        self.keys.write().unwrap_or_else(|p| p.into_inner()).insert(issuer.to_owned(), Arc::new(cache));
    }

    fn cache_for(&self, issuer: &TrustedIssuer) -> Result<JwksCache, IssuerError> {
        match (&issuer.jwks, &issuer.jwks_uri) {
            (Some(jwks), None) => {
                let jwks = Jwks::from_value(jwks).map_err(|e| IssuerError::Invalid(format!("`jwks`: {e}")))?;
                if jwks.is_empty() {
                    return Err(IssuerError::Invalid(
                        "`jwks` holds no usable verification key (ES256 P-256, RS256 ≥ 2048 bits, EdDSA Ed25519)"
                            .into(),
                    ));
                }
                Ok(JwksCache::from_jwks(jwks))
            }
            (None, Some(uri)) => Ok(JwksCache::new(self.client.clone(), uri.clone())),
            _ => Err(IssuerError::Invalid("give exactly one of `jwks` and `jwks_uri`".into())),
        }
    }

    /// Registers (or replaces) an issuer. A `jwks_uri` must be https (plain
    /// http only inside the allowlist), pass the SSRF guard and answer with
    /// usable keys now. Returns true when it is new.
    pub async fn register(
        &self,
        issuer: String,
        jwks: Option<Value>,
        jwks_uri: Option<String>,
    ) -> Result<(TrustedIssuer, bool), IssuerError> {
        if !(issuer.starts_with("https://") || issuer.starts_with("http://")) {
            return Err(IssuerError::Invalid("`issuer` must be an http(s) URL".into()));
        }
        if let Some(uri) = &jwks_uri {
            self.guard
                .check_key_url(uri)
                .await
                .map_err(|refused| IssuerError::Invalid(format!("`jwks_uri`: {refused}")))?;
        }
        let record = TrustedIssuer { issuer, jwks, jwks_uri, registered_at_ms: now_ms() };
        let cache = self.cache_for(&record)?;
        let usable = cache.get().await.map_err(|e| IssuerError::Invalid(format!("cannot load the keys: {e}")))?;
        if usable.is_empty() {
            return Err(IssuerError::Invalid("the JWKS holds no usable verification key".into()));
        }
        let _changing = self.changing.lock().await;
        let is_new = self.get(&record.issuer)?.is_none();
        self.record(IssuerChange::Put { record: record.clone() }).await?;
        // Keep the cache that just fetched the keys (apply made a cold one),
        // unless a later change for this issuer was applied meanwhile.
        if self.get(&record.issuer)?.as_ref() == Some(&record) {
            self.install(&record.issuer, cache);
        }
        tracing::info!(issuer = %record.issuer, jwks_uri = ?record.jwks_uri, "trusted issuer registered");
        Ok((record, is_new))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use caep_schemas::jose::{Algorithm, SigningKey};

    fn jwks() -> Value {
        let key = SigningKey::generate(Algorithm::Es256).expect("key");
        serde_json::json!({ "keys": [key.public_jwk()] })
    }

    #[tokio::test]
    async fn applying_changes_is_idempotent_and_survives_a_reload() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("db.redb")).expect("open");
        let issuers = Issuers::load(store.clone(), PushUrlGuard::new(Vec::new())).expect("load");
        let record = TrustedIssuer {
            issuer: "https://idp.example".into(),
            jwks: Some(jwks()),
            jwks_uri: None,
            registered_at_ms: 1,
        };
        let put = IssuerChange::Put { record: record.clone() };
        issuers.apply(put.clone()).await.expect("apply");
        let cache = issuers.keys_for(&record.issuer).expect("trusted");
        issuers.apply(put).await.expect("apply again");
        assert!(Arc::ptr_eq(&cache, &issuers.keys_for(&record.issuer).expect("trusted")), "cache kept");
        assert_eq!(issuers.list().expect("list"), vec![record.clone()]);

        let reloaded = Issuers::load(store.clone(), PushUrlGuard::new(Vec::new())).expect("reload");
        assert!(reloaded.keys_for(&record.issuer).is_some());

        let deleted = IssuerChange::Deleted { issuer: record.issuer.clone() };
        issuers.apply(deleted.clone()).await.expect("delete");
        issuers.apply(deleted).await.expect("delete again");
        assert!(issuers.keys_for(&record.issuer).is_none());
        assert!(issuers.list().expect("list").is_empty());
        assert!(!issuers.delete(&record.issuer).await.expect("delete"), "already gone");
    }

    #[tokio::test]
    async fn register_goes_through_the_log() {
        struct Recording(std::sync::Mutex<Vec<String>>, std::sync::OnceLock<std::sync::Weak<Issuers>>);
        impl IssuerLog for Recording {
            fn record(&self, change: IssuerChange) -> BoxFuture<'_, Result<(), StoreError>> {
                Box::pin(async move {
                    let name = serde_json::to_value(&change).expect("serializes")["change"].to_string();
                    self.0.lock().unwrap_or_else(|p| p.into_inner()).push(name);
                    let issuers = self.1.get().and_then(std::sync::Weak::upgrade).ok_or(StoreError::WriterStopped)?;
                    issuers.apply(change).await
                })
            }
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("db.redb")).expect("open");
        let log = Arc::new(Recording(Default::default(), Default::default()));
        let issuers = Arc::new(Issuers::load_with(store, PushUrlGuard::new(Vec::new()), log.clone()).expect("load"));
        log.1.set(Arc::downgrade(&issuers)).ok();
        let (_, is_new) = issuers.register("https://idp.example".into(), Some(jwks()), None).await.expect("register");
        assert!(is_new);
        assert!(issuers.keys_for("https://idp.example").is_some());
        assert!(issuers.delete("https://idp.example").await.expect("delete"));
        assert_eq!(*log.0.lock().unwrap_or_else(|p| p.into_inner()), vec!["\"put\"", "\"deleted\""]);
    }
}
