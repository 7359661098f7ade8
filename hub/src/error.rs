//! The hub's errors. Start-up errors name the setting or file at fault.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Why the hub could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("data directory {dir}: {source}")]
    DataDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("signing keys: {0}")]
    Keys(#[from] caep_transmitter::keys::KeyError),
    #[error("admin token: {0}")]
    AdminToken(#[source] std::io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("database: {0}")]
    Store(#[from] caep_transmitter::store::StoreError),
    #[error(transparent)]
    Transmitter(#[from] caep_transmitter::service::OpenError),
    #[error("trusted issuers: {0}")]
    Issuers(#[from] crate::issuers::IssuerError),
    #[error("secret key: {0}")]
    Secrets(#[from] caep_transmitter::secrets::SecretError),
}
