//! A round-robin HTTP load balancer on loopback in front of the hub
//! instances of a Kafka-mode drill. Its URL is the instances' shared issuer,
//! so the receivers' SDK (discovery, stream management, touches, polls) and
//! the simulated IdP reach the instances through it, one request to the
//! next instance in turn. An instance taken out (SIGKILLed by a fault) gets
//! no more requests; a request whose connection is refused goes to the next
//! instance (it never reached the refusing one).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// Largest request or response body forwarded.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// One instance behind the balancer.
#[derive(Debug, Clone)]
struct Backend {
    url: String,
    live: bool,
    requests: u64,
}

#[derive(Debug)]
struct Shared {
    backends: Mutex<Vec<Backend>>,
    next: AtomicUsize,
    client: reqwest::Client,
}

/// A running balancer; stops when dropped.
#[derive(Debug)]
pub struct Balancer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Balancer {
    /// Listens on `addr` (a loopback address; port 0 for any) in front of
    /// `backends` (base URLs).
    ///
    /// # Errors
    ///
    /// When it cannot listen.
    pub async fn start(addr: SocketAddr, backends: Vec<String>) -> anyhow::Result<Balancer> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            // Longer than the hub's long poll.
            .timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .build()
            .context("balancer HTTP client")?;
        let backends = backends.into_iter().map(|url| Backend { url, live: true, requests: 0 }).collect();
        let shared = Arc::new(Shared { backends: Mutex::new(backends), next: AtomicUsize::new(0), client });
        let listener = tokio::net::TcpListener::bind(addr).await.context("binding the balancer")?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new().fallback(forward).with_state(Arc::clone(&shared));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(error) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
                tracing::warn!(%error, "balancer stopped");
            }
        });
        Ok(Balancer { addr, shared, stop: Some(stop) })
    }

    /// The balancer's base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends no more requests to the backend at `index`.
    pub fn take_out(&self, index: usize) {
        if let Ok(mut backends) = self.shared.backends.lock()
            && let Some(backend) = backends.get_mut(index)
        {
            backend.live = false;
            tracing::info!(backend = %backend.url, "taken out of the balancer");
        }
    }

    /// Requests forwarded to each backend so far.
    pub fn requests(&self) -> Vec<u64> {
        self.shared.backends.lock().map(|b| b.iter().map(|b| b.requests).collect()).unwrap_or_default()
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and those the client recomputes.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    [
        header::CONNECTION,
        header::HOST,
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ]
    .contains(name)
        || name.as_str() == "keep-alive"
}

/// The next live backend after the round-robin cursor, counted as used.
fn pick(shared: &Shared, skip: &[usize]) -> Option<(usize, String)> {
    let mut backends = shared.backends.lock().ok()?;
    let n = backends.len();
    for _ in 0..n {
        let index = shared.next.fetch_add(1, Ordering::Relaxed) % n;
        if backends[index].live && !skip.contains(&index) {
            backends[index].requests += 1;
            return Some((index, backends[index].url.clone()));
        }
    }
    None
}

async fn forward(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(body) => body,
        Err(_) => return (StatusCode::PAYLOAD_TOO_LARGE, "balancer: body too large").into_response(),
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let mut tried = Vec::new();
    loop {
        let Some((index, base)) = pick(&shared, &tried) else {
            return (StatusCode::SERVICE_UNAVAILABLE, "balancer: no live instance").into_response();
        };
        tried.push(index);
        let mut outgoing = shared.client.request(parts.method.clone(), format!("{base}{path}")).body(body.clone());
        for (name, value) in &parts.headers {
            if !is_hop_by_hop(name) {
                outgoing = outgoing.header(name, value);
            }
        }
        let response = match outgoing.send().await {
            Ok(response) => response,
            Err(error) if error.is_connect() => {
                tracing::debug!(%error, backend = %base, "connection refused; next instance");
                continue;
            }
            Err(error) => {
                tracing::debug!(%error, backend = %base, "forwarding failed");
                return (StatusCode::BAD_GATEWAY, format!("balancer: {base}: {error}")).into_response();
            }
        };
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = match response.bytes().await {
            Ok(bytes) => bytes,
            Err(error) => return (StatusCode::BAD_GATEWAY, format!("balancer: {base}: {error}")).into_response(),
        };
        let mut reply = Response::new(Body::from(bytes));
        *reply.status_mut() = status;
        for (name, value) in &headers {
            if !is_hop_by_hop(name) {
                reply.headers_mut().append(name, value.clone());
            }
        }
        return reply;
    }
}
