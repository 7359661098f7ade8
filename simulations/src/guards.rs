//! The drill's relying parties as agents see them. Each serves
//! `GET /resource` and authenticates the agent's bearer token itself
//! (signature by the IdP, `iss`, `aud`, `exp`), behind one of the product's
//! two guards:
//!
//! - **layer**: the SDK's [`EnforceLayer`] in the RP's own router, its
//!   revocation store fed by the RP's stream (push or poll);
//! - **sidecar**: a `caep-guard` process the drill starts, which the RP's
//!   front consults like nginx `auth_request` (`GET /check` with the
//!   request's `Authorization`). The sidecar takes its SETs by push through
//!   the drill's relay, which injects the receiver's faults and records
//!   when the sidecar acknowledged each SET.
//!
//! Either way the guard reports each agent session's touch to the hub; the
//! drill does not.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use caep_receiver::ReceivedEvent;
use caep_receiver::guard::EnforceLayer;
use caep_schemas::event::event_type;
use caep_schemas::jose::{self, Jwks};
use serde::Serialize;

use crate::receivers::{ReceiverCtx, unverified_set};

/// Which guard protects the drill's relying parties.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Guarding {
    /// No guard, no agents: the drill reports the touches itself (hub-only figures).
    None,
    /// Every RP uses the SDK's layer.
    Layer,
    /// Every push RP uses a `caep-guard` sidecar; poll RPs use the layer.
    Sidecar,
    /// Half the push RPs use a sidecar, the others the layer.
    Mix,
}

/// The guard of one relying party.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RpGuard {
    /// The SDK's tower layer, in process.
    Layer,
    /// A `caep-guard` process, asked by the RP's front.
    Sidecar,
}

impl Guarding {
    /// The guard of receiver `index`, pushed to or not. Sidecars take
    /// their SETs by push through the drill's relay (which is how the drill
    /// sees them acknowledged), so poll receivers use the layer.
    pub fn for_receiver(self, index: usize, push: bool) -> Option<RpGuard> {
        match self {
            Guarding::None => None,
            Guarding::Sidecar | Guarding::Mix if push && (self == Guarding::Sidecar || index % 2 == 1) => {
                Some(RpGuard::Sidecar)
            }
            Guarding::Layer | Guarding::Sidecar | Guarding::Mix => Some(RpGuard::Layer),
        }
    }
}

/// Tokens remembered as verified, at most.
const MAX_VERIFIED: usize = 100_000;

/// The RP's own authentication of agent tokens (what a real RP does behind
/// the guard; the guard itself never validates).
pub struct Authentication {
    jwks: Jwks,
    issuer: String,
    audience: String,
    /// Tokens whose signature verified: a real RP caches too.
    verified: Mutex<HashSet<String>>,
}

impl Authentication {
    /// Accepts tokens `issuer` signed with a key of `jwks` for `audience`.
    pub fn new(jwks: Jwks, issuer: &str, audience: &str) -> Arc<Self> {
        Arc::new(Authentication {
            jwks,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            verified: Mutex::new(HashSet::new()),
        })
    }

    /// Whether the request carries a valid token for this RP.
    pub fn accepts(&self, headers: &HeaderMap) -> bool {
        let Some(token) =
            headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if verified.contains(token) {
            return true;
        }
        let Ok(token_ok) = jose::verify(token, &self.jwks, "at+jwt") else { return false };
        let claims = &token_ok.payload;
        let now = caep_schemas::set::now_secs();
        let valid = claims.get("iss").and_then(|v| v.as_str()) == Some(self.issuer.as_str())
            && claims.get("aud").and_then(|v| v.as_str()) == Some(self.audience.as_str())
            && claims.get("exp").and_then(serde_json::Value::as_i64).is_some_and(|exp| exp > now);
        if valid {
            if verified.len() >= MAX_VERIFIED {
                verified.clear();
            }
            verified.insert(token.to_owned());
        }
        valid
    }
}

/// The RP's service: `GET /resource`, 200 for an authenticated agent.
fn service(authentication: Arc<Authentication>) -> Router {
    Router::new()
        .route(
            "/resource",
            get(|State(auth): State<Arc<Authentication>>, headers: HeaderMap| async move {
                if auth.accepts(&headers) {
                    (StatusCode::OK, "served").into_response()
                } else {
                    // The RP's own refusal: no `session revoked` description.
                    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")]).into_response()
                }
            }),
        )
        .with_state(authentication)
}

/// An RP guarded by the SDK's layer.
pub fn layer_app(authentication: Arc<Authentication>, layer: EnforceLayer) -> Router {
    service(authentication).layer(layer)
}

struct Front {
    authentication: Arc<Authentication>,
    check_url: String,
    client: reqwest::Client,
}

/// An RP whose front asks a sidecar first, as nginx `auth_request` does:
/// 401 from the sidecar is passed on with its `WWW-Authenticate`; 200 lets
/// the request reach the service; anything else is a 500, as nginx answers.
pub fn front_app(authentication: Arc<Authentication>, check_url: String, client: reqwest::Client) -> Router {
    let front = Arc::new(Front { authentication, check_url, client });
    Router::new().route("/resource", get(front_resource)).with_state(front)
}

async fn front_resource(State(front): State<Arc<Front>>, headers: HeaderMap) -> Response {
    let mut check = front.client.get(&front.check_url);
    if let Some(authorization) = headers.get(header::AUTHORIZATION) {
        check = check.header(header::AUTHORIZATION, authorization);
    }
    match check.send().await.map(|r| (r.status().as_u16(), r.headers().get(header::WWW_AUTHENTICATE).cloned())) {
        Ok((200, _)) if front.authentication.accepts(&headers) => (StatusCode::OK, "served").into_response(),
        Ok((200, _)) => (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")]).into_response(),
        Ok((401, challenge)) => {
            let challenge = challenge.unwrap_or_else(|| HeaderValue::from_static("Bearer"));
            (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, challenge)]).into_response()
        }
        Ok((status, _)) => {
            tracing::warn!(status, "the sidecar's check failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
        Err(error) => {
            tracing::warn!(%error, "the sidecar is unreachable");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

struct Relay {
    ctx: Arc<ReceiverCtx>,
    push_url: String,
    client: reqwest::Client,
}

/// The path from the hub to a sidecar's `/push`: it injects the receiver's
/// faults, forwards the SET, and records a session-revoked leaf once the
/// sidecar acknowledged it (2xx), as the SDK's handler does for layer RPs.
pub fn relay_app(ctx: Arc<ReceiverCtx>, push_url: String, client: reqwest::Client) -> Router {
    Router::new().route("/", post(relay)).with_state(Arc::new(Relay { ctx, push_url, client }))
}

async fn relay(State(relay): State<Arc<Relay>>, headers: HeaderMap, body: Bytes) -> Response {
    let revoking = unverified_set(&body)
        .map(|set| ReceivedEvent::new(set, String::new()))
        .filter(|event| event.event_type() == event_type::SESSION_REVOKED);
    if let Some(event) = &revoking
        && let Err(error) = relay.ctx.admit(event.jti()).await
    {
        tracing::debug!(%error, "relay fault");
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let mut forward = relay.client.post(&relay.push_url).body(body);
    for name in [header::CONTENT_TYPE, header::ACCEPT] {
        if let Some(value) = headers.get(&name) {
            forward = forward.header(name, value);
        }
    }
    let answer = match forward.send().await {
        Ok(answer) => answer,
        Err(error) => {
            tracing::debug!(%error, "the sidecar did not take a SET");
            return StatusCode::BAD_GATEWAY.into_response();
        }
    };
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = answer.headers().get(header::CONTENT_TYPE).cloned();
    let body = answer.bytes().await.unwrap_or_default();
    if status.is_success()
        && let Some(event) = &revoking
        && relay.ctx.record(event).is_err()
    {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let mut response = (status, body).into_response();
    if let Some(content_type) = content_type {
        response.headers_mut().insert(header::CONTENT_TYPE, content_type);
    }
    response
}

/// A `caep-guard` process on a temp data dir, killed on drop.
pub struct Sidecar {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Its forward-auth URL.
    pub check_url: String,
    /// The stream it created at the hub.
    pub stream_id: String,
}

/// What a sidecar joins the hub with.
pub struct SidecarSpec<'a> {
    /// The `caep-guard` binary.
    pub bin: &'a Path,
    /// The hub's issuer URL.
    pub hub: &'a str,
    /// The receiver's audience.
    pub audience: &'a str,
    /// The receiver's token.
    pub token: &'a str,
    /// The URL the hub pushes to (the drill's relay).
    pub push_url: &'a str,
    /// The loopback port it serves on.
    pub port: u16,
}

impl Sidecar {
    /// Starts `caep-guard` in push mode and waits until it serves.
    ///
    /// # Errors
    ///
    /// When it cannot start, or exits, or does not serve within 30 s.
    pub async fn start(spec: &SidecarSpec<'_>) -> anyhow::Result<Sidecar> {
        let dir = tempfile::Builder::new().prefix("caep-drill-guard-").tempdir().context("temp dir")?;
        let port = spec.port;
        let log = std::fs::File::create(dir.path().join("guard.log"))?;
        let child = Command::new(spec.bin)
            .env("CAEP_GUARD_TRANSMITTER", spec.hub)
            .env("CAEP_GUARD_AUDIENCE", spec.audience)
            .env("CAEP_GUARD_TOKEN", spec.token)
            .env("CAEP_GUARD_LISTEN", format!("127.0.0.1:{port}"))
            .env("CAEP_GUARD_DELIVERY", "push")
            .env("CAEP_GUARD_PUSH_URL", spec.push_url)
            .env("CAEP_GUARD_DATA_DIR", dir.path().join("data"))
            .env("RUST_LOG", std::env::var("DRILL_GUARD_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", spec.bin.display()))?;
        let base = format!("http://127.0.0.1:{port}");
        let mut sidecar =
            Sidecar { child: Some(child), dir, check_url: format!("{base}/check"), stream_id: String::new() };
        sidecar.wait_serving(&base).await?;
        let saved = sidecar.dir.path().join("data").join("stream_id");
        sidecar.stream_id = std::fs::read_to_string(&saved).context("the sidecar's stream id")?.trim().to_owned();
        Ok(sidecar)
    }

    async fn wait_serving(&mut self, base: &str) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        let log = self.dir.path().join("guard.log");
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                anyhow::bail!("caep-guard exited with {status}: {text}");
            }
            if client.get(format!("{base}/healthz")).send().await.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        anyhow::bail!("caep-guard not serving after 30 s; see {}", log.display())
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Where the `caep-guard` binary is: `explicit` if given, else next to the
/// current executable (see [`crate::hub::locate_bin`]).
///
/// # Errors
///
/// When no binary is found; build it with `cargo build -p caep-receiver --bin caep-guard`.
pub fn locate_guard_bin(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    crate::hub::locate_bin("caep-guard", explicit, "cargo build -p caep-receiver --bin caep-guard", "--guard-bin")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_puts_sidecars_on_every_other_push_receiver() {
        let guards: Vec<_> = (0..4).map(|i| Guarding::Mix.for_receiver(i, i < 3)).collect();
        assert_eq!(guards, [Some(RpGuard::Layer), Some(RpGuard::Sidecar), Some(RpGuard::Layer), Some(RpGuard::Layer)]);
        assert_eq!(Guarding::Sidecar.for_receiver(0, true), Some(RpGuard::Sidecar));
        assert_eq!(Guarding::Sidecar.for_receiver(0, false), Some(RpGuard::Layer), "poll RPs use the layer");
        assert_eq!(Guarding::None.for_receiver(1, true), None);
    }
}
