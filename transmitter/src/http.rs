//! The transmitter's HTTP surface: the metadata document and the JWKS.
//! Routes are relative to the issuer's path, so the hub can nest them.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use crate::keys::KeyStore;
use crate::metadata::{TransmitterMetadata, paths, well_known_path};

/// What the transmitter's handlers share.
pub struct Transmitter {
    metadata: TransmitterMetadata,
    issuer_path: String,
    keys: Arc<KeyStore>,
}

impl Transmitter {
    /// A transmitter for `issuer` (an absolute URL) signing with `keys`.
    pub fn new(issuer: &str, keys: Arc<KeyStore>) -> Result<Self, InvalidIssuer> {
        let issuer_path = issuer_path(issuer)?;
        Ok(Transmitter { metadata: TransmitterMetadata::for_issuer(issuer), issuer_path, keys })
    }

    /// The metadata this transmitter publishes.
    pub fn metadata(&self) -> &TransmitterMetadata {
        &self.metadata
    }

    /// The path part of the issuer URL ("" for a bare origin).
    pub fn issuer_path(&self) -> &str {
        &self.issuer_path
    }

    /// The signing keys.
    pub fn keys(&self) -> &Arc<KeyStore> {
        &self.keys
    }
}

/// The issuer is not an absolute http(s) URL without query or fragment.
#[derive(Debug, thiserror::Error)]
#[error("issuer `{0}` must be an absolute http(s) URL without query or fragment")]
pub struct InvalidIssuer(pub String);

fn issuer_path(issuer: &str) -> Result<String, InvalidIssuer> {
    let invalid = || InvalidIssuer(issuer.to_owned());
    let rest = issuer.strip_prefix("https://").or_else(|| issuer.strip_prefix("http://")).ok_or_else(invalid)?;
    if rest.contains(['?', '#']) {
        return Err(invalid());
    }
    let path = rest.find('/').map(|at| &rest[at..]).unwrap_or("");
    let authority = &rest[..rest.len() - path.len()];
    if authority.is_empty() {
        return Err(invalid());
    }
    Ok(path.trim_end_matches('/').to_owned())
}

/// Routes at the server root: the well-known document (whose path carries the
/// issuer's path after it) and everything under the issuer's path.
pub fn router(transmitter: Arc<Transmitter>) -> Router {
    let under_issuer = Router::new().route(paths::JWKS, get(jwks));
    let well_known = Router::new().route(&well_known_path(&transmitter.issuer_path), get(metadata));
    let under_issuer = if transmitter.issuer_path.is_empty() {
        under_issuer
    } else {
        Router::new().nest(&transmitter.issuer_path, under_issuer)
    };
    well_known.merge(under_issuer).with_state(transmitter)
}

async fn metadata(State(transmitter): State<Arc<Transmitter>>) -> impl IntoResponse {
    Json(transmitter.metadata.clone())
}

async fn jwks(State(transmitter): State<Arc<Transmitter>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/jwk-set+json"), (header::CACHE_CONTROL, "max-age=60")],
        transmitter.keys.jwks().to_json().to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuer_paths() {
        assert_eq!(issuer_path("http://127.0.0.1:8080").expect("valid"), "");
        assert_eq!(issuer_path("https://hub.example.com/").expect("valid"), "");
        assert_eq!(issuer_path("https://hub.example.com/t/a/").expect("valid"), "/t/a");
        for bad in ["hub.example.com", "ftp://x", "https://", "https://h/?q", "https://h/#f"] {
            assert!(issuer_path(bad).is_err(), "accepted {bad}");
        }
    }
}
