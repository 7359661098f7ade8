//! Trusted identity providers: the issuers whose SETs the hub ingests, each
//! with its keys given inline (`jwks`) or fetched from a `jwks_uri` through
//! the SSRF-guarded client, cached, and re-fetched on an unknown `kid`
//! (rate-limited by the receiver SDK's [`JwksCache`]).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use caep_receiver::jwks::JwksCache;
use caep_schemas::jose::Jwks;
use caep_transmitter::outbox::now_ms;
use caep_transmitter::ssrf::PushUrlGuard;
use caep_transmitter::store::{Commit, Store, StoreError, decode, encode};
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::Value;

const ISSUERS: TableDefinition<&str, &[u8]> = TableDefinition::new("trusted_issuers");

/// A registered IdP.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrustedIssuer {
    pub issuer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    pub registered_at_ms: u64,
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
}

fn storage<E: std::fmt::Display>(error: E) -> StoreError {
    StoreError::storage(error)
}

impl Issuers {
    /// Loads the registered issuers. `guard` vets every `jwks_uri`.
    pub fn load(store: Store, guard: PushUrlGuard) -> Result<Self, IssuerError> {
        let client = guard.client_builder().build().map_err(|e| IssuerError::Invalid(e.to_string()))?;
        let registry = Issuers { store, guard, client, keys: RwLock::new(HashMap::new()) };
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

    /// Registers (or replaces) an issuer. A `jwks_uri` must pass the SSRF
    /// guard and answer with usable keys now. Returns true when it is new.
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
                .check_url(uri)
                .await
                .map_err(|refused| IssuerError::Invalid(format!("`jwks_uri`: {refused}")))?;
        }
        let record = TrustedIssuer { issuer, jwks, jwks_uri, registered_at_ms: now_ms() };
        let cache = self.cache_for(&record)?;
        let usable = cache.get().await.map_err(|e| IssuerError::Invalid(format!("cannot load the keys: {e}")))?;
        if usable.is_empty() {
            return Err(IssuerError::Invalid("the JWKS holds no usable verification key".into()));
        }
        let stored = record.clone();
        let is_new = self
            .store
            .write(Commit::Durable, move |txn| {
                let bytes = encode(&stored)?;
                let mut table = txn.open_table(ISSUERS).map_err(storage)?;
                Ok(table.insert(stored.issuer.as_str(), bytes.as_slice()).map_err(storage)?.is_none())
            })
            .await?;
        self.install(&record.issuer, cache);
        tracing::info!(issuer = %record.issuer, jwks_uri = ?record.jwks_uri, "trusted issuer registered");
        Ok((record, is_new))
    }
}
