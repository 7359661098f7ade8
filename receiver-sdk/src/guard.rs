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
//! revoked"` (RFC 6750 §3) before the inner service runs. A request the
//! service accepts (2xx or 3xx) reports its agent session as a touch; one
//! the service's authentication refuses reports nothing, so forged tokens
//! cannot make the RP report sessions it never served.
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

use std::collections::{HashMap, HashSet};
use std::future::{Ready, ready};
use std::sync::{Arc, RwLock};
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
        let payload = bearer_payload_b64(headers.get(header::AUTHORIZATION)?.as_bytes())?;
        read_agent(payload, &claim)
    })
}

/// Payloads up to this size are decoded on the stack (no allocation).
const STACK_PAYLOAD: usize = 2048;

/// The agent a base64url JWT payload names.
fn read_agent(payload_b64: &[u8], claim: &str) -> Option<Agent> {
    use base64::Engine;
    let engine = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let read = |payload: &[u8]| claims::read(payload, claim).map(claims::Claims::into_agent);
    let mut stack = [0u8; STACK_PAYLOAD];
    match engine.decode_slice(payload_b64, &mut stack) {
        Ok(len) => read(&stack[..len]),
        Err(base64::DecodeSliceError::OutputSliceTooSmall) => read(&engine.decode(payload_b64).ok()?),
        Err(base64::DecodeSliceError::DecodeError(_)) => None,
    }
}

/// The base64url payload segment of a `Bearer <header>.<payload>.<sig>`
/// value, read as bytes (a header value need not be text).
fn bearer_payload_b64(value: &[u8]) -> Option<&[u8]> {
    let space = memchr::memchr(b' ', value)?;
    let (scheme, token) = (&value[..space], value[space + 1..].trim_ascii());
    if !scheme.eq_ignore_ascii_case(b"bearer") || token.len() > MAX_TOKEN {
        return None;
    }
    let payload = &token[memchr::memchr(b'.', token)? + 1..];
    // The payload runs to the next dot, or to the end of a token cut short
    // (which the RP's authentication will refuse; the layer still reads it).
    let payload = &payload[..memchr::memchr(b'.', payload).unwrap_or(payload.len())];
    let unpadded = payload.iter().rposition(|&b| b != b'=').map_or(0, |last| last + 1);
    Some(&payload[..unpadded])
}

/// Agents read from recent bearer tokens, keyed by the token's payload
/// segment (the agent depends on nothing else): agents reuse an access
/// token for its lifetime, so most checks skip decoding and parsing. At
/// most [`CACHED_AGENTS`] entries, of payload segments up to
/// [`STACK_PAYLOAD`] base64 characters; full, it starts over. The keys come
/// from unauthenticated headers, so the map hashes with the standard
/// library's keyed SipHash. A client sending ever new tokens makes the
/// layer read them all, and others' tokens again after each start-over:
/// at worst every check costs what it costs without the cache.
#[derive(Default)]
struct AgentCache {
    agents: RwLock<HashMap<Box<[u8]>, Arc<Agent>>>,
}

/// Agents the layer remembers, at most.
const CACHED_AGENTS: usize = 4_096;

impl AgentCache {
    /// The agent of `payload_b64`, read once.
    fn agent(&self, payload_b64: &[u8], claim: &str) -> Option<Arc<Agent>> {
        if let Some(agent) = self.agents.read().unwrap_or_else(|p| p.into_inner()).get(payload_b64) {
            return Some(Arc::clone(agent));
        }
        let agent = Arc::new(read_agent(payload_b64, claim)?);
        if payload_b64.len() <= STACK_PAYLOAD {
            let mut agents = self.agents.write().unwrap_or_else(|p| p.into_inner());
            if agents.len() >= CACHED_AGENTS {
                agents.clear();
            }
            agents.insert(payload_b64.into(), Arc::clone(&agent));
        }
        Some(agent)
    }
}

/// Reads only the claims the layer needs from a JWT payload, without
/// building a JSON tree: this runs on every request.
mod claims {
    use std::borrow::Cow;
    use std::fmt;

    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

    use super::{Agent, MAX_ACTORS};
    use crate::revocations::{email_key, iss_sub_key};

    /// The claims the layer reads, borrowed from the payload where no
    /// escape forces a copy.
    pub(super) struct Claims<'a> {
        /// The agent's session first, then its actors' (nearest first).
        pub(super) sessions: Vec<Cow<'a, str>>,
        iss: Option<Cow<'a, str>>,
        sub: Option<Cow<'a, str>>,
        email: Option<Cow<'a, str>>,
    }

    impl Claims<'_> {
        /// Keys of the users the token names (see [`crate::revocations::user_key`]).
        pub(super) fn user_keys(&self) -> Vec<String> {
            let mut keys = Vec::new();
            if let (Some(iss), Some(sub)) = (&self.iss, &self.sub) {
                keys.push(iss_sub_key(iss, sub));
            }
            if let Some(email) = &self.email {
                keys.push(email_key(email));
            }
            keys
        }

        pub(super) fn into_agent(self) -> Agent {
            let users = self.user_keys();
            Agent { sessions: self.sessions.into_iter().map(Cow::into_owned).collect(), users }
        }
    }

    /// The claims of a payload; `None` when it is not a JSON object.
    pub(super) fn read<'a>(payload: &'a [u8], claim: &str) -> Option<Claims<'a>> {
        let mut deserializer = serde_json::Deserializer::from_slice(payload);
        let level = Level { claim, depth: 0 }.deserialize(&mut deserializer).ok()?;
        Some(Claims { sessions: level.sessions, iss: level.iss, sub: level.sub, email: level.email })
    }

    /// One level of the `act` chain.
    struct Level<'c> {
        claim: &'c str,
        depth: usize,
    }

    /// What one level (and the actors under it) names.
    #[derive(Default)]
    struct Found<'de> {
        /// This level's session first, then its actors'.
        sessions: Vec<Cow<'de, str>>,
        iss: Option<Cow<'de, str>>,
        sub: Option<Cow<'de, str>>,
        email: Option<Cow<'de, str>>,
    }

    impl<'de> DeserializeSeed<'de> for Level<'_> {
        type Value = Found<'de>;

        fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Found<'de>, D::Error> {
            deserializer.deserialize_map(self)
        }
    }

    impl<'de> Visitor<'de> for Level<'_> {
        type Value = Found<'de>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("JWT claims (an object)")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Found<'de>, A::Error> {
            let mut found = Found::default();
            let (mut own, mut actors) = (None, Vec::new());
            while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                let Some(key) = key else {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                };
                let user_claim = self.depth == 0 && matches!(&*key, "iss" | "sub" | "email");
                if key == self.claim || user_claim {
                    // The session claim may be a user claim too (`sub`): read once, used for both.
                    let value = map.next_value::<Text<'de>>()?.0;
                    if key == self.claim {
                        own = value.clone().filter(|s| !s.is_empty());
                    }
                    match &*key {
                        _ if !user_claim => {}
                        "iss" => found.iss = value,
                        "sub" => found.sub = value,
                        _ => found.email = value,
                    }
                } else if key == "act" && self.depth < MAX_ACTORS {
                    let nested = Level { claim: self.claim, depth: self.depth + 1 };
                    actors = map.next_value_seed(Actor(nested))?;
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            // One vector for the whole chain: the actors', with this level's first.
            found.sessions = actors;
            if let Some(own) = own {
                found.sessions.insert(0, own);
            }
            Ok(found)
        }
    }

    /// An `act` member: its sessions, or none when it is not an object.
    struct Actor<'c>(Level<'c>);

    impl<'de> DeserializeSeed<'de> for Actor<'_> {
        type Value = Vec<Cow<'de, str>>;

        fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Vec<Cow<'de, str>>, D::Error> {
            deserializer.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Actor<'_> {
        type Value = Vec<Cow<'de, str>>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an actor")
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Vec<Cow<'de, str>>, A::Error> {
            Ok(self.0.visit_map(map)?.sessions)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Cow<'de, str>>, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(Vec::new())
        }

        fn visit_str<E>(self, _: &str) -> Result<Vec<Cow<'de, str>>, E> {
            Ok(Vec::new())
        }

        fn visit_bool<E>(self, _: bool) -> Result<Vec<Cow<'de, str>>, E> {
            Ok(Vec::new())
        }

        fn visit_i64<E>(self, _: i64) -> Result<Vec<Cow<'de, str>>, E> {
            Ok(Vec::new())
        }

        fn visit_u64<E>(self, _: u64) -> Result<Vec<Cow<'de, str>>, E> {
            Ok(Vec::new())
        }

        fn visit_f64<E>(self, _: f64) -> Result<Vec<Cow<'de, str>>, E> {
            Ok(Vec::new())
        }

        fn visit_unit<E>(self) -> Result<Vec<Cow<'de, str>>, E> {
            Ok(Vec::new())
        }
    }

    /// A value kept when it is a string (borrowed where it can be).
    struct Text<'de>(Option<Cow<'de, str>>);

    impl<'de> serde::Deserialize<'de> for Text<'de> {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_any(TextVisitor)
        }
    }

    struct TextVisitor;

    impl<'de> Visitor<'de> for TextVisitor {
        type Value = Text<'de>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any value")
        }

        fn visit_borrowed_str<E>(self, value: &'de str) -> Result<Text<'de>, E> {
            Ok(Text(Some(Cow::Borrowed(value))))
        }

        fn visit_str<E>(self, value: &str) -> Result<Text<'de>, E> {
            Ok(Text(Some(Cow::Owned(value.to_owned()))))
        }

        fn visit_string<E>(self, value: String) -> Result<Text<'de>, E> {
            Ok(Text(Some(Cow::Owned(value))))
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Text<'de>, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(Text(None))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Text<'de>, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(Text(None))
        }

        fn visit_bool<E>(self, _: bool) -> Result<Text<'de>, E> {
            Ok(Text(None))
        }

        fn visit_i64<E>(self, _: i64) -> Result<Text<'de>, E> {
            Ok(Text(None))
        }

        fn visit_u64<E>(self, _: u64) -> Result<Text<'de>, E> {
            Ok(Text(None))
        }

        fn visit_f64<E>(self, _: f64) -> Result<Text<'de>, E> {
            Ok(Text(None))
        }

        fn visit_unit<E>(self) -> Result<Text<'de>, E> {
            Ok(Text(None))
        }
    }
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
/// touch, in the background: the request never waits for it. Sessions
/// waiting together go in one request (up to 100, through the hub's add-many
/// extension; one touch each where a transmitter has none). A session is
/// reported once (the memory of reported sessions is bounded: past it, a
/// session may be reported again, which the hub takes as the same touch);
/// a full queue drops the report and lets a later request of the session
/// try again.
#[derive(Clone)]
pub struct TouchReporter {
    queue: mpsc::Sender<String>,
    /// Read on every request, written once per new session: a read lock
    /// never makes concurrent requests wait on each other.
    reported: Arc<RwLock<HashSet<String>>>,
}

/// Sessions remembered as reported, at most.
const MAX_REPORTED: usize = 100_000;
/// Reports waiting, at most.
const QUEUE: usize = 10_000;
/// Reports in flight to the hub at once.
const IN_FLIGHT: usize = 8;
/// Sessions in one report, at most (the hub's add-many bound).
const BATCH: usize = 100;

impl TouchReporter {
    /// Starts reporting to `stream_id` through `receiver` (spawns a task).
    pub fn start(receiver: Arc<Receiver>, stream_id: &str) -> TouchReporter {
        let (queue, pending) = mpsc::channel(QUEUE);
        let reported = Arc::new(RwLock::new(HashSet::new()));
        tokio::spawn(report(receiver, stream_id.to_owned(), pending, Arc::clone(&reported)));
        TouchReporter { queue, reported }
    }

    /// Reports `session` unless it was already.
    pub fn seen(&self, session: &str) {
        if self.reported.read().unwrap_or_else(|p| p.into_inner()).contains(session) {
            return;
        }
        let mut reported = self.reported.write().unwrap_or_else(|p| p.into_inner());
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
    reported: Arc<RwLock<HashSet<String>>>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut batch = Vec::with_capacity(BATCH);
    // Whatever waits when a report can go out goes with it, in one request
    // (the hub's add-many): many new sessions cost few requests, and a lone
    // session goes at once.
    while pending.recv_many(&mut batch, BATCH).await > 0 {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else { return };
        let sessions = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
        let (receiver, stream_id, reported) = (Arc::clone(&receiver), stream_id.clone(), Arc::clone(&reported));
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            for attempt in 1..=8 {
                match receiver.touch_many(&stream_id, &sessions).await {
                    Ok(()) => {
                        drop(permit);
                        return;
                    }
                    Err(error) => {
                        tracing::debug!(%error, attempt, sessions = sessions.len(), "touch report failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(30));
                    }
                }
            }
            // Given up: a later request of each session reports it again.
            tracing::warn!(sessions = sessions.len(), "touches not reported to the transmitter");
            let mut reported = reported.write().unwrap_or_else(|p| p.into_inner());
            for session in &sessions {
                reported.remove(session);
            }
            drop(permit);
        });
    }
}

/// The layer: refuses revoked agents, reports new ones.
#[derive(Clone)]
pub struct EnforceLayer {
    revocations: Arc<Revocations>,
    source: Source,
    touches: Option<TouchReporter>,
}

/// Where the layer reads who a request speaks for.
#[derive(Clone)]
enum Source {
    /// The bearer JWT, its agent session under this claim: what
    /// [`bearer_jwt`] reads, remembered per token.
    Bearer(Arc<str>, Arc<AgentCache>),
    /// The RP's own extractor.
    Custom(Extract),
}

impl EnforceLayer {
    /// Enforces `revocations` on requests whose bearer JWT names an agent
    /// session by `sid` (see [`bearer_jwt`]).
    pub fn new(revocations: Arc<Revocations>) -> Self {
        EnforceLayer { revocations, source: Source::Bearer(Arc::from("sid"), Arc::default()), touches: None }
    }

    /// Reads the agent session from this claim of the bearer JWT (and of
    /// each actor in its `act` chain) instead of `sid`.
    pub fn session_claim(mut self, claim: &str) -> Self {
        self.source = Source::Bearer(Arc::from(claim), Arc::default());
        self
    }

    /// Reads agents with `extract` instead (a header, a claim of a token the
    /// RP verified, ...).
    pub fn extracting(mut self, extract: Extract) -> Self {
        self.source = Source::Custom(extract);
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

    /// Why a request with these headers is refused, if it is; otherwise
    /// reports its agent session at once. This is the forward-auth answer
    /// (`caep-guard`), which never sees the service's own answer.
    pub fn check(&self, headers: &HeaderMap) -> Option<Revoked> {
        match self.decide(headers) {
            Decision::Refuse(revoked) => Some(revoked),
            Decision::Pass(session) => {
                if let (Some(touches), Some(session)) = (&self.touches, session) {
                    touches.seen(&session);
                }
                None
            }
        }
    }

    fn decide(&self, headers: &HeaderMap) -> Decision {
        let agent = match &self.source {
            Source::Bearer(claim, cache) => headers
                .get(header::AUTHORIZATION)
                .and_then(|value| bearer_payload_b64(value.as_bytes()))
                .and_then(|payload| cache.agent(payload, claim)),
            Source::Custom(extract) => extract(headers).map(Arc::new),
        };
        let Some(agent) = agent else { return Decision::Pass(None) };
        match self.revocations.first_revoked(&agent.sessions, &agent.users) {
            Some(revoked) => Decision::Refuse(revoked),
            None => Decision::Pass(self.to_report(agent.sessions.first().map(String::as_str))),
        }
    }

    /// The agent's own session, when touches are reported.
    fn to_report(&self, session: Option<&str>) -> Option<String> {
        session.filter(|_| self.touches.is_some()).map(str::to_owned)
    }
}

/// What the layer does with a request.
enum Decision {
    Refuse(Revoked),
    /// Let it through; the agent's own session, to report as a touch.
    Pass(Option<String>),
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

pin_project_lite::pin_project! {
    /// The inner service's answer; its agent session is reported as a
    /// touch only if the service accepted the request (2xx or 3xx), so
    /// tokens the RP's own authentication refuses (forged ones naming any
    /// session) never make this RP report sessions.
    pub struct Reporting<F> {
        #[pin]
        inner: F,
        report: Option<(TouchReporter, String)>,
    }
}

impl<F, B, E> std::future::Future for Reporting<F>
where
    F: std::future::Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = std::task::ready!(this.inner.poll(cx));
        if let (Ok(response), Some((touches, session))) = (&output, this.report.take())
            && (response.status().is_success() || response.status().is_redirection())
        {
            touches.seen(&session);
        }
        Poll::Ready(output)
    }
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
    type Future = Either<Ready<Result<Response<ResBody>, S::Error>>, Reporting<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        match self.layer.decide(request.headers()) {
            Decision::Refuse(revoked) => {
                tracing::debug!(?revoked, "request of a revoked agent refused");
                Either::Left(ready(Ok(refusal())))
            }
            Decision::Pass(session) => {
                let report = self.layer.touches.clone().zip(session);
                Either::Right(Reporting { inner: self.inner.call(request), report })
            }
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
        // The per-request reader (no JSON tree) reads the same.
        for claims in [claims, deep, json!({"sid": 7, "act": "not an actor", "iss": ["x"], "sub": "u"})] {
            let payload = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, claims.to_string());
            let mut headers = HeaderMap::new();
            let value = HeaderValue::from_str(&format!("Bearer h.{payload}.s")).expect("header");
            headers.insert(header::AUTHORIZATION, value);
            assert_eq!(bearer_jwt("sid")(&headers), Some(agent_of(&claims, "sid")), "{claims}");
        }
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
        // An oversized token is not decoded at all (a client cannot make
        // every check parse megabytes).
        let padding = "x".repeat(MAX_TOKEN);
        assert!(extract(&headers(&format!("Bearer h.{payload}.{padding}"))).is_none());
    }

    #[tokio::test]
    async fn the_layer_decides_as_its_extractor_reads() {
        let store = Revocations::in_memory(Duration::from_secs(60));
        store.revoke_session("s-parent").await.expect("revoke");
        let bearer = |claims: &str| {
            let payload = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, claims);
            let mut headers = HeaderMap::new();
            let value = HeaderValue::from_str(&format!("Bearer h.{payload}.s")).expect("header");
            headers.insert(header::AUTHORIZATION, value);
            headers
        };
        let fast = EnforceLayer::new(Arc::clone(&store));
        let extracted = EnforceLayer::new(Arc::clone(&store)).extracting(bearer_jwt("sid"));
        let cases = [
            r#"{"sid": "s-agent"}"#,
            r#"{"sid": "s-agent", "act": {"sid": "s-parent"}}"#,
            // An escape makes the reader copy the string: same answer.
            r#"{"sid": "s-\u0070arent"}"#,
            r#"{"iss": "https://idp", "sub": "u1", "sid": "s-other"}"#,
            r#"{"email": "Ada@X", "sid": "s-other"}"#,
        ];
        let decide = |layer: &EnforceLayer| cases.iter().map(|c| layer.check(&bearer(c))).collect::<Vec<_>>();
        assert_eq!(
            decide(&fast),
            [None, Some(Revoked::Session("s-parent".into())), Some(Revoked::Session("s-parent".into())), None, None]
        );
        assert_eq!(decide(&fast), decide(&extracted));
        // Users are looked up once any is revoked.
        store.revoke_user(&email_key("ada@x")).await.expect("revoke user");
        store.revoke_user(&iss_sub_key("https://idp", "u1")).await.expect("revoke user");
        assert_eq!(decide(&fast)[3], Some(Revoked::User(iss_sub_key("https://idp", "u1"))));
        assert_eq!(decide(&fast)[4], Some(Revoked::User(email_key("ada@x"))));
        assert_eq!(decide(&fast), decide(&extracted));
        // A token cut short (no signature segment) is still read.
        let payload =
            base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, r#"{"sid":"s-parent"}"#);
        let mut short = HeaderMap::new();
        short.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer h.{payload}")).expect("header"));
        assert!(fast.check(&short).is_some());
        // A session claim that is also a user claim serves both.
        let by_sub = EnforceLayer::new(Arc::clone(&store)).session_claim("sub");
        assert_eq!(
            by_sub.check(&bearer(r#"{"iss": "https://idp", "sub": "u1"}"#)),
            Some(Revoked::User(iss_sub_key("https://idp", "u1")))
        );
        let by_claim = EnforceLayer::new(store).session_claim("session_id");
        assert!(by_claim.check(&bearer(r#"{"session_id": "s-parent"}"#)).is_some());
    }

    #[test]
    fn the_memory_of_tokens_is_bounded() {
        let cache = AgentCache::default();
        for n in 0..CACHED_AGENTS + 10 {
            let payload = base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                format!(r#"{{"sid":"s{n}"}}"#),
            );
            let agent = cache.agent(payload.as_bytes(), "sid").expect("an agent");
            assert_eq!(agent.sessions, [format!("s{n}")]);
        }
        assert!(cache.agents.read().expect("lock").len() <= CACHED_AGENTS);
        let huge = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            format!(r#"{{"sid":"s","x":"{}"}}"#, "y".repeat(STACK_PAYLOAD)),
        );
        assert!(cache.agent(huge.as_bytes(), "sid").is_some(), "a large payload is read");
        assert!(!cache.agents.read().expect("lock").contains_key(huge.as_bytes()), "but not remembered");
        assert!(cache.agent(b"!!!", "sid").is_none());
    }
}
