//! `caep-hub serve`: assembles the hub's state from the configuration and
//! serves it over HTTP until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::routing::get;
use axum::{Json, Router};
use caep_transmitter::http::{Transmitter, router as transmitter_router};
use caep_transmitter::keys::KeyStore;
use serde_json::json;
use tokio::net::TcpListener;

use crate::admin_token::{AdminToken, NewToken};
use crate::config::HubConfig;
use crate::error::StartError;

/// A hub bound to its listen address, ready to serve.
pub struct BoundHub {
    listener: TcpListener,
    router: Router,
    /// The issuer URL this hub publishes.
    pub issuer: String,
    /// The address actually bound (differs from the configured one for port 0).
    pub local_addr: SocketAddr,
    /// The admin token minted on this start, to show the operator once.
    pub new_admin_token: Option<NewToken>,
}

/// Opens the data directory, keys and admin token, and binds the listener.
/// The issuer defaults to `http://` + the bound address, so port 0 works.
pub async fn bind(config: &HubConfig) -> Result<BoundHub, StartError> {
    create_private_dir(&config.data_dir)?;
    let keys = Arc::new(KeyStore::open(&config.data_dir, config.signing_alg)?);
    let (admin_token, new_admin_token) =
        AdminToken::load_or_create(&config.data_dir, config.admin_token.as_deref()).map_err(StartError::AdminToken)?;
    let listener =
        TcpListener::bind(config.listen).await.map_err(|source| StartError::Bind { addr: config.listen, source })?;
    let local_addr = listener.local_addr().map_err(|source| StartError::Bind { addr: config.listen, source })?;
    let issuer = match &config.issuer {
        Some(_) => config.issuer(),
        None => format!("http://{local_addr}"),
    };
    let transmitter = Arc::new(Transmitter::new(&issuer, keys)?);
    let router = app(transmitter, admin_token);
    Ok(BoundHub { listener, router, issuer, local_addr, new_admin_token })
}

impl BoundHub {
    /// Serves until SIGTERM or Ctrl-C, then drains in-flight requests.
    pub async fn serve(self) -> std::io::Result<()> {
        tracing::info!(issuer = %self.issuer, addr = %self.local_addr, "caep-hub listening");
        axum::serve(self.listener, self.router).with_graceful_shutdown(shutdown_signal()).await?;
        tracing::info!("caep-hub stopped");
        Ok(())
    }
}

fn app(transmitter: Arc<Transmitter>, _admin_token: AdminToken) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .merge(transmitter_router(transmitter))
}

fn create_private_dir(dir: &std::path::Path) -> Result<(), StartError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StartError::DataDir { dir: dir.to_owned(), source })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => tracing::info!(signal = "SIGINT", "shutting down"),
        () = terminate => tracing::info!(signal = "SIGTERM", "shutting down"),
    }
}
