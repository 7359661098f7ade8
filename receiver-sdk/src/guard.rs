//! Enforcement at the relying party: a tower layer that refuses requests of
//! revoked agent sessions, actors and users, and reports each new agent
//! session to the transmitter as a touch.
//!
//! The layer does not authenticate: the RP's own authentication validates
//! tokens. It only reads who a request speaks for (by default the bearer
//! JWT's `sid`, the `sid` of each nested `act` actor of RFC 8693 §4.1, and
//! the token's `iss`/`sub` and `email` for user-level revocations; or what
//! an [`Extract`] function the RP supplies says) and denies with 401 and
//! `WWW-Authenticate: Bearer error="invalid_token", error_description="session
//! revoked"` (RFC 6750 §3) before the inner service runs.
//!
//! ```no_run
//! use std::time::Duration;
//! use caep_receiver::{Receiver, Revocations, StreamRequest, guard::EnforceLayer};
//!
//! # async fn run(app: axum::Router) -> Result<(), Box<dyn std::error::Error>> {
//! let revocations = Revocations::open("revocations.redb".as_ref(), Duration::from_secs(3600))?;
//! let receiver = Receiver::discover("https://hub.example.com", "https://rp.example.com", "receiver-token")
//!     .await?
//!     .with_revocations(revocations.clone());
//! let stream = receiver.create_stream(&StreamRequest::poll().all_events()).await?;
//! let poll = receiver.poll_loop(&stream, |_| async { Ok(()) })?;
//! tokio::spawn(poll.run(std::future::pending()));
//! let layer = EnforceLayer::new(revocations).reporting_touches(std::sync::Arc::new(receiver), &stream.stream_id);
//! let app = app.layer(layer);
//! # Ok(()) }
//! ```

use std::collections::HashSet;
use std::future::{Ready, ready};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use futures_util::future::Either;
use serde_json::Value;
use tokio::sync::mpsc;
use tower::{Layer, Service};

use crate::client::Receiver;
use crate::revocations::{Revocations, Revoked, email_key, iss_sub_key};

/// Who a request speaks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Agent {
    /// The agent session and the sessions of the actors it acts through.
    pub sessions: Vec<String>,
    /// Keys of the users behind it (see [`crate::revocations::user_key`]).
    pub users: Vec<String>,
}

/// Reads who a request speaks for from its headers (`None`: no agent; the
/// request passes).
pub type Extract = Arc<dyn Fn(&HeaderMap) -> Option<Agent> + Send + Sync>;

/// The longest bearer token the default extractor decodes.
const MAX_TOKEN: usize = 16 * 1024;
/// The deepest `act` chain it follows.
const MAX_ACTORS: usize = 16;

/// The default extractor: the bearer JWT's `claim` (normally `sid`), the
/// same claim of each nested `act`, its `iss`/`sub` and `email`. The token
/// is decoded, not verified: the RP's authentication does that.
pub fn bearer_jwt(claim: &str) -> Extract {
    let claim = claim.to_owned();
    Arc::new(move |headers: &HeaderMap| {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") || token.len() > MAX_TOKEN {
            return None;
        }
        let claims = jwt_claims(token.trim())?;
        Some(agent_of(&claims, &claim))
    })
}

fn jwt_claims(token: &str) -> Option<Value> {
    use base64::Engine;
    let mut parts = token.split('.');
    let (_, payload) = (parts.next()?, parts.next()?);
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    serde_json::from_slice::<Value>(&bytes).ok().filter(Value::is_object)
}

/// The agent a token's claims name.
pub fn agent_of(claims: &Value, claim: &str) -> Agent {
    let mut agent = Agent::default();
    if let (Some(iss), Some(sub)) = (claims["iss"].as_str(), claims["sub"].as_str()) {
        agent.users.push(iss_sub_key(iss, sub));
    }
    if let Some(email) = claims["email"].as_str() {
        agent.users.push(email_key(email));
    }
    let mut level = claims;
    for _ in 0..=MAX_ACTORS {
        if let Some(session) = level[claim].as_str().filter(|s| !s.is_empty()) {
            agent.sessions.push(session.to_owned());
        }
        match level.get("act") {
            Some(actor) if actor.is_object() => level = actor,
            _ => break,
        }
    }
    agent
}

/// Reports each agent session's first request to the transmitter as a
/// touch, in the background: the request never waits for it. A session is
/// reported once (the memory of reported sessions is bounded: past it, a
/// session may be reported again, which the hub takes as the same touch);
/// a full queue drops the report and lets a later request of the session
/// try again.
#[derive(Clone)]
pub struct TouchReporter {
    queue: mpsc::Sender<String>,
    reported: Arc<Mutex<HashSet<String>>>,
}

/// Sessions remembered as reported, at most.
const MAX_REPORTED: usize = 100_000;
/// Reports waiting, at most.
const QUEUE: usize = 10_000;
/// Reports in flight to the hub at once.
const IN_FLIGHT: usize = 8;

impl TouchReporter {
    /// Starts reporting to `stream_id` through `receiver` (spawns a task).
    pub fn start(receiver: Arc<Receiver>, stream_id: &str) -> TouchReporter {
        let (queue, pending) = mpsc::channel(QUEUE);
        let reported = Arc::new(Mutex::new(HashSet::new()));
        tokio::spawn(report(receiver, stream_id.to_owned(), pending, Arc::clone(&reported)));
        TouchReporter { queue, reported }
    }

    /// Reports `session` unless it was already.
    pub fn seen(&self, session: &str) {
        let mut reported = self.reported.lock().unwrap_or_else(|p| p.into_inner());
        if reported.contains(session) {
            return;
        }
        if reported.len() >= MAX_REPORTED {
            reported.clear();
        }
        if self.queue.try_send(session.to_owned()).is_ok() {
            reported.insert(session.to_owned());
        }
    }
}

async fn report(
    receiver: Arc<Receiver>,
    stream_id: String,
    mut pending: mpsc::Receiver<String>,
    reported: Arc<Mutex<HashSet<String>>>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    while let Some(session) = pending.recv().await {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else { return };
        let (receiver, stream_id, reported) = (Arc::clone(&receiver), stream_id.clone(), Arc::clone(&reported));
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            for attempt in 1..=8 {
                match receiver.touch(&stream_id, &session).await {
                    Ok(()) => {
                        drop(permit);
                        return;
                    }
                    Err(error) => {
                        tracing::debug!(%error, attempt, "touch report failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(30));
                    }
                }
            }
            // Given up: a later request of the session reports it again.
            tracing::warn!(session, "touch not reported to the transmitter");
            reported.lock().unwrap_or_else(|p| p.into_inner()).remove(&session);
            drop(permit);
        });
    }
}

/// The layer: refuses revoked agents, reports new ones.
#[derive(Clone)]
pub struct EnforceLayer {
    revocations: Arc<Revocations>,
    extract: Extract,
    touches: Option<TouchReporter>,
}

impl EnforceLayer {
    /// Enforces `revocations` on requests whose bearer JWT names an agent
    /// session by `sid` (see [`bearer_jwt`]).
    pub fn new(revocations: Arc<Revocations>) -> Self {
        EnforceLayer { revocations, extract: bearer_jwt("sid"), touches: None }
    }

    /// Reads agents with `extract` instead (a header, a claim of a token the
    /// RP verified, ...).
    pub fn extracting(mut self, extract: Extract) -> Self {
        self.extract = extract;
        self
    }

    /// Reports each new agent session as a touch of `stream_id`.
    pub fn reporting_touches(mut self, receiver: Arc<Receiver>, stream_id: &str) -> Self {
        self.touches = Some(TouchReporter::start(receiver, stream_id));
        self
    }

    /// Reports touches through an existing reporter.
    pub fn reporting_to(mut self, touches: TouchReporter) -> Self {
        self.touches = Some(touches);
        self
    }

    /// Why a request with these headers is refused, if it is; reports its
    /// sessions otherwise.
    pub fn check(&self, headers: &HeaderMap) -> Option<Revoked> {
        let agent = (self.extract)(headers)?;
        for session in &agent.sessions {
            if self.revocations.is_session_revoked(session) {
                return Some(Revoked::Session(session.clone()));
            }
        }
        for user in &agent.users {
            if self.revocations.is_user_revoked(user) {
                return Some(Revoked::User(user.clone()));
            }
        }
        if let (Some(touches), Some(session)) = (&self.touches, agent.sessions.first()) {
            touches.seen(session);
        }
        None
    }
}

impl<S> Layer<S> for EnforceLayer {
    type Service = Enforce<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Enforce { layer: self.clone(), inner }
    }
}

/// The layer's service.
#[derive(Clone)]
pub struct Enforce<S> {
    layer: EnforceLayer,
    inner: S,
}

/// The RFC 6750 refusal.
pub fn refusal<B: Default>() -> Response<B> {
    let mut response = Response::new(B::default());
    *response.status_mut() = StatusCode::UNAUTHORIZED;
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(r#"Bearer error="invalid_token", error_description="session revoked""#),
    );
    response
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Enforce<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Response<ResBody>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        match self.layer.check(request.headers()) {
            Some(revoked) => {
                tracing::debug!(?revoked, "request of a revoked agent refused");
                Either::Left(ready(Ok(refusal())))
            }
            None => Either::Right(self.inner.call(request)),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_default_extractor_reads_sid_the_act_chain_and_the_user() {
        let claims = json!({"iss": "https://idp", "sub": "u1", "email": "Ada@X", "sid": "s-agent",
            "act": {"sub": "orchestrator", "sid": "s-parent", "act": {"sid": "s-root"}}});
        let agent = agent_of(&claims, "sid");
        assert_eq!(agent.sessions, ["s-agent", "s-parent", "s-root"]);
        assert_eq!(agent.users, [iss_sub_key("https://idp", "u1"), email_key("ada@x")]);
        assert_eq!(agent_of(&json!({"session_id": "s"}), "session_id").sessions, ["s"]);
        let mut deep = json!({"sid": "s0"});
        for n in 1..100 {
            deep = json!({"sid": format!("s{n}"), "act": deep});
        }
        assert_eq!(agent_of(&deep, "sid").sessions.len(), MAX_ACTORS + 1, "the chain is followed a bounded depth");
    }

    #[test]
    fn tokens_that_are_not_bearer_jwts_name_no_agent() {
        let extract = bearer_jwt("sid");
        let headers = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).expect("header"));
            headers
        };
        assert!(extract(&HeaderMap::new()).is_none());
        assert!(extract(&headers("Basic dXNlcjpwdw==")).is_none());
        assert!(extract(&headers("Bearer opaque-token")).is_none());
        assert!(extract(&headers("Bearer a.bm90IGpzb24.c")).is_none(), "payload not JSON");
        let payload = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, r#"{"sid":"s1"}"#);
        let agent = extract(&headers(&format!("bearer h.{payload}.sig"))).expect("agent");
        assert_eq!(agent.sessions, ["s1"]);
    }
}
