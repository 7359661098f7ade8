//! [`Receiver`]: a relying party's connection to one SSF transmitter —
//! discovery, the verifier for its SETs, stream management, touches and
//! stream verification.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use caep_schemas::event::{Event, StreamStatus};
use caep_schemas::set::new_id;
use caep_schemas::subject::{MAX_SUBJECT_BYTES, SubjectId};
use reqwest::header::{ACCEPT, AUTHORIZATION};
use reqwest::{Method, Url};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::error::ReceiverError;
use crate::event::ReceivedEvent;
use crate::handler::{EventHandler, HandlerError};
use crate::http;
use crate::jwks::JwksCache;
use crate::poll::PollLoop;
use crate::push::push_router;
use crate::revocations::{Feeding, Revocations};
use crate::streams::{StreamConfiguration, StreamRequest, StreamStatusInfo, TransmitterMetadata};
use crate::verify::SetVerifier;

/// The well-known path of SSF transmitter metadata (SSF 1.0 §7.2).
pub const WELL_KNOWN_PATH: &str = "/.well-known/ssf-configuration";
/// Timeout of one management request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest management response accepted (a list of streams included).
const MAX_RESPONSE: usize = 4 * 1024 * 1024;
/// Sessions per add-many call (the hub's bound).
const MAX_SUBJECTS_PER_CALL: usize = 100;
/// Bytes of subjects in one add-many body at most (the hub reads 64 KiB).
const MAX_SUBJECTS_BYTES_PER_CALL: usize = 32 * 1024;
/// Tries of a touch the transmitter answers 429 or 503.
const TOUCH_ATTEMPTS: u32 = 5;
/// The longest a touch waits before trying again.
const MAX_TOUCH_WAIT: Duration = Duration::from_secs(10);

/// A relying party's connection to one transmitter.
///
/// Built by [`Receiver::discover`] from the transmitter's issuer URL, the
/// receiver's audience (every SET must name it in `aud`) and its bearer
/// token at the transmitter. It carries the [`SetVerifier`] for the
/// transmitter's SETs, and the management calls of SSF 1.0 §8.
///
/// `Debug` does not show the token.
///
/// ```no_run
/// use std::time::Duration;
/// use caep_receiver::{HandlerError, ReceivedEvent, Receiver, Signal, StreamRequest};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let receiver = Receiver::discover("https://hub.example.com", "https://rp.example.com", "receiver-token").await?;
/// let router = receiver.push_router(Some("Bearer push-secret".into()), |event: ReceivedEvent| async move {
///     if let Signal::SessionRevoked { session: Some(session), .. } = event.signal() {
///         tracing::info!(session, "revoked");
///     }
///     Ok::<(), HandlerError>(())
/// });
/// let listener = tokio::net::TcpListener::bind("0.0.0.0:8443").await?;
/// tokio::spawn(async move { axum::serve(listener, router).await });
///
/// let stream = receiver
///     .create_stream(&StreamRequest::push("https://rp.example.com:8443/", Some("Bearer push-secret".into())).all_events())
///     .await?;
/// receiver.verify_stream(&stream.stream_id, Duration::from_secs(10)).await?;
/// receiver.touch(&stream.stream_id, "agent-session-42").await?;
/// # Ok(()) }
/// ```
pub struct Receiver {
    client: reqwest::Client,
    metadata: TransmitterMetadata,
    audience: String,
    token: String,
    verifier: Arc<SetVerifier>,
    verifications: Arc<Verifications>,
    /// Fed by every SET this receiver's push router and poll loop verify.
    revocations: Option<Arc<Revocations>>,
}

impl fmt::Debug for Receiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver")
            .field("issuer", &self.metadata.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

/// The metadata URL of `issuer`: the well-known path at the issuer's
/// origin, with the issuer's own path appended (SSF 1.0 §7.2.1).
///
/// ```
/// use caep_receiver::client::metadata_url;
/// assert_eq!(metadata_url("https://hub.example.com/").unwrap(), "https://hub.example.com/.well-known/ssf-configuration");
/// assert_eq!(
///     metadata_url("https://hub.example.com/tenant-a").unwrap(),
///     "https://hub.example.com/.well-known/ssf-configuration/tenant-a"
/// );
/// assert!(metadata_url("ftp://hub.example.com").is_err());
/// ```
pub fn metadata_url(issuer: &str) -> Result<String, ReceiverError> {
    let url = Url::parse(issuer).map_err(|error| ReceiverError::Config(format!("issuer `{issuer}`: {error}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(ReceiverError::Config(format!("issuer `{issuer}` is not an http(s) URL")));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ReceiverError::Config(format!("issuer `{issuer}` must not have a query or fragment")));
    }
    let origin = url.origin().ascii_serialization();
    let path = url.path().trim_end_matches('/');
    Ok(format!("{origin}{WELL_KNOWN_PATH}{path}"))
}

impl Receiver {
    /// Reads the transmitter's metadata and sets up verification of its
    /// SETs: the JWKS from its `jwks_uri` (fetched on first use, refetched
    /// on an unknown `kid` at most every 30 s), `iss` = the metadata's
    /// issuer, `aud` ∋ `audience`.
    ///
    /// # Errors
    ///
    /// When the metadata cannot be fetched or parsed, or its `issuer` is not
    /// `issuer_url` (ignoring a trailing slash): a document naming another
    /// issuer could make us trust another party's keys.
    pub async fn discover(
        issuer_url: &str,
        audience: impl Into<String>,
        token: impl Into<String>,
    ) -> Result<Receiver, ReceiverError> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // A redirect could carry the bearer token to another origin's
            // path; the SSF endpoints have no reason to redirect.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|source| ReceiverError::transport(issuer_url, source))?;
        Self::discover_with_client(client, issuer_url, audience, token).await
    }

    /// [`discover`](Self::discover) with the caller's HTTP client (proxies,
    /// TLS roots, timeouts), used for every request the receiver makes.
    pub async fn discover_with_client(
        client: reqwest::Client,
        issuer_url: &str,
        audience: impl Into<String>,
        token: impl Into<String>,
    ) -> Result<Receiver, ReceiverError> {
        let url = metadata_url(issuer_url)?;
        let request = client.get(&url).header(ACCEPT, "application/json").timeout(REQUEST_TIMEOUT);
        let metadata: TransmitterMetadata = http::send_json(&url, request, 256 * 1024).await?;
        if metadata.issuer.trim_end_matches('/') != issuer_url.trim_end_matches('/') {
            return Err(ReceiverError::IssuerMismatch { expected: issuer_url.to_owned(), found: metadata.issuer });
        }
        let jwks = JwksCache::new(client.clone(), metadata.jwks_uri.clone());
        let audience = audience.into();
        let verifier = Arc::new(SetVerifier::new(metadata.issuer.clone(), audience.clone(), jwks));
        tracing::info!(issuer = %metadata.issuer, audience = %audience, "transmitter discovered");
        Ok(Receiver {
            client,
            metadata,
            audience,
            token: token.into(),
            verifier,
            verifications: Arc::new(Verifications::default()),
            revocations: None,
        })
    }

    /// The transmitter's metadata.
    pub fn metadata(&self) -> &TransmitterMetadata {
        &self.metadata
    }

    /// The transmitter's issuer (every SET's `iss`).
    pub fn issuer(&self) -> &str {
        &self.metadata.issuer
    }

    /// This receiver's audience.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// The verifier of this transmitter's SETs.
    pub fn verifier(&self) -> &Arc<SetVerifier> {
        &self.verifier
    }

    /// The HTTP client.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Wraps `handler` so that verification SETs complete
    /// [`verify_stream`](Self::verify_stream) before reaching it. The push
    /// router and poll loop made by this receiver already do this; use it
    /// when wiring [`push_router`] or [`PollLoop`] by hand.
    pub fn tap<H: EventHandler>(&self, handler: H) -> VerificationTap<H> {
        VerificationTap { inner: handler, verifications: Arc::clone(&self.verifications) }
    }

    /// Has this receiver's push router and poll loop feed `revocations`
    /// with every verified SET, before the handler runs (see
    /// [`Revocations::feeding`]).
    pub fn with_revocations(mut self, revocations: Arc<Revocations>) -> Self {
        self.revocations = Some(revocations);
        self
    }

    /// The handler as this receiver runs it: the revocation store first, if any.
    fn fed<H: EventHandler>(&self, handler: H) -> VerificationTap<Feeding<H>> {
        self.tap(Feeding::new(self.revocations.clone(), handler))
    }

    /// An RFC 8935 push router for this transmitter's SETs (see
    /// [`push_router`]), which also completes
    /// [`verify_stream`](Self::verify_stream).
    pub fn push_router<H: EventHandler>(&self, expected_authorization: Option<String>, handler: H) -> Router {
        push_router(Arc::clone(&self.verifier), expected_authorization, self.fed(handler))
    }

    /// An RFC 8936 poll loop over `stream` (a poll stream), which also
    /// completes [`verify_stream`](Self::verify_stream). Start it with
    /// [`PollLoop::run`].
    ///
    /// # Errors
    ///
    /// [`ReceiverError::Config`] when the stream is not a poll stream.
    pub fn poll_loop<H: EventHandler>(
        &self,
        stream: &StreamConfiguration,
        handler: H,
    ) -> Result<PollLoop<VerificationTap<Feeding<H>>>, ReceiverError> {
        let poll_url = stream.poll_url().ok_or_else(|| {
            ReceiverError::Config(format!("stream {} is not a poll stream with an endpoint_url", stream.stream_id))
        })?;
        Ok(PollLoop::new(Arc::clone(&self.verifier), poll_url, self.token.clone(), self.fed(handler))
            .with_client(self.client.clone()))
    }

    fn endpoint(&self, name: &str, value: Option<&String>) -> Result<String, ReceiverError> {
        value.cloned().ok_or_else(|| ReceiverError::Config(format!("the transmitter does not advertise `{name}`")))
    }

    fn configuration_endpoint(&self) -> Result<String, ReceiverError> {
        self.endpoint("configuration_endpoint", self.metadata.configuration_endpoint.as_ref())
    }

    fn with_stream_id(endpoint: &str, stream_id: &str) -> Result<String, ReceiverError> {
        let mut url =
            Url::parse(endpoint).map_err(|error| ReceiverError::Config(format!("endpoint `{endpoint}`: {error}")))?;
        url.query_pairs_mut().append_pair("stream_id", stream_id);
        Ok(url.into())
    }

    fn request(&self, method: Method, url: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, url)
            .header(AUTHORIZATION, format!("Bearer {}", self.token))
            .header(ACCEPT, "application/json")
            .timeout(REQUEST_TIMEOUT)
    }

    async fn call_json<T: DeserializeOwned>(
        &self,
        method: Method,
        url: &str,
        body: Option<Value>,
    ) -> Result<T, ReceiverError> {
        let mut request = self.request(method, url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        http::send_json(url, request, MAX_RESPONSE).await
    }

    async fn call_empty(&self, method: Method, url: &str, body: Option<Value>) -> Result<(), ReceiverError> {
        let mut request = self.request(method, url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        http::send(url, request).await.map(drop)
    }

    /// Creates a stream (POST to the configuration endpoint).
    ///
    /// # Errors
    ///
    /// [`ReceiverError::Status`] with the transmitter's `err`, e.g. 400 for a
    /// push endpoint it refuses or 409 for too many streams.
    pub async fn create_stream(&self, request: &StreamRequest) -> Result<StreamConfiguration, ReceiverError> {
        let url = self.configuration_endpoint()?;
        let config: StreamConfiguration = self.call_json(Method::POST, &url, Some(request.to_body(None))).await?;
        let config = self.ours(&url, config)?;
        let method = config.delivery.as_ref().map_or("", |delivery| delivery.method.as_str());
        tracing::info!(stream_id = %config.stream_id, method, "stream created");
        Ok(config)
    }

    /// Reads one stream's configuration.
    ///
    /// # Errors
    ///
    /// [`ReceiverError::Status`] 404 for a stream this receiver does not own.
    pub async fn read_stream(&self, stream_id: &str) -> Result<StreamConfiguration, ReceiverError> {
        let url = Self::with_stream_id(&self.configuration_endpoint()?, stream_id)?;
        let config = self.call_json(Method::GET, &url, None).await?;
        self.ours(&url, config)
    }

    /// Lists this receiver's streams.
    ///
    /// # Errors
    ///
    /// [`ReceiverError::Status`] or transport errors.
    pub async fn list_streams(&self) -> Result<Vec<StreamConfiguration>, ReceiverError> {
        let url = self.configuration_endpoint()?;
        let configs: Vec<StreamConfiguration> = self.call_json(Method::GET, &url, None).await?;
        configs.into_iter().map(|config| self.ours(&url, config)).collect()
    }

    /// Updates the members present in `request` (PATCH); the others keep
    /// their values. Use [`StreamRequest::unchanged`] to leave delivery as it is.
    ///
    /// # Errors
    ///
    /// [`ReceiverError::Status`] (400, 404).
    pub async fn update_stream(
        &self,
        stream_id: &str,
        request: &StreamRequest,
    ) -> Result<StreamConfiguration, ReceiverError> {
        let url = self.configuration_endpoint()?;
        let config = self.call_json(Method::PATCH, &url, Some(request.to_body(Some(stream_id)))).await?;
        self.ours(&url, config)
    }

    /// Replaces every receiver-supplied member (PUT); a member missing from
    /// `request` is removed (delivery falls back to poll).
    ///
    /// # Errors
    ///
    /// [`ReceiverError::Status`] (400, 404).
    pub async fn replace_stream(
        &self,
        stream_id: &str,
        request: &StreamRequest,
    ) -> Result<StreamConfiguration, ReceiverError> {
        let url = self.configuration_endpoint()?;
        let config = self.call_json(Method::PUT, &url, Some(request.to_body(Some(stream_id)))).await?;
        self.ours(&url, config)
    }

    /// Refuses a stream configuration that names another issuer than the
    /// transmitter's metadata (SSF 1.0 §8.1.1: `iss` is the transmitter's):
    /// its SETs would be verified against the wrong issuer.
    fn ours(&self, url: &str, config: StreamConfiguration) -> Result<StreamConfiguration, ReceiverError> {
        let expected = self.metadata.issuer.trim_end_matches('/');
        match config.iss.as_deref().map(|iss| iss.trim_end_matches('/')) {
            Some(iss) if iss != expected => Err(ReceiverError::InvalidResponse {
                url: url.to_owned(),
                reason: format!("the stream configuration names issuer `{iss}`, not the transmitter's `{expected}`"),
            }),
            _ => Ok(config),
        }
    }

    /// Deletes a stream.
    ///
    /// # Errors
    ///
    /// [`ReceiverError::Status`] 404 for a stream this receiver does not own.
    pub async fn delete_stream(&self, stream_id: &str) -> Result<(), ReceiverError> {
        let url = Self::with_stream_id(&self.configuration_endpoint()?, stream_id)?;
        self.call_empty(Method::DELETE, &url, None).await?;
        tracing::info!(%stream_id, "stream deleted");
        Ok(())
    }

    /// Reads a stream's status.
    ///
    /// # Errors
    ///
    /// [`ReceiverError::Status`] (404) or [`ReceiverError::Config`] when the
    /// transmitter has no status endpoint.
    pub async fn status(&self, stream_id: &str) -> Result<StreamStatusInfo, ReceiverError> {
        let endpoint = self.endpoint("status_endpoint", self.metadata.status_endpoint.as_ref())?;
        let url = Self::with_stream_id(&endpoint, stream_id)?;
        self.call_json(Method::GET, &url, None).await
    }

    /// Sets a stream's status (`enabled`, `paused`: events are held,
    /// `disabled`: events are dropped).
    ///
    /// # Errors
    ///
    /// [`ReceiverError::Status`] (400, 404).
    pub async fn set_status(
        &self,
        stream_id: &str,
        status: StreamStatus,
        reason: Option<&str>,
    ) -> Result<StreamStatusInfo, ReceiverError> {
        let url = self.endpoint("status_endpoint", self.metadata.status_endpoint.as_ref())?;
        let mut body = json!({"stream_id": stream_id, "status": status});
        if let Some(reason) = reason {
            body["reason"] = Value::String(reason.to_owned());
        }
        self.call_json(Method::POST, &url, Some(body)).await
    }

    /// Adds a subject to a stream: the transmitter then sends events about it.
    ///
    /// # Errors
    ///
    /// [`ReceiverError::Status`] (400 for a format it does not support, 404, 429).
    pub async fn add_subject(&self, stream_id: &str, subject: &SubjectId) -> Result<(), ReceiverError> {
        let url = self.endpoint("add_subject_endpoint", self.metadata.add_subject_endpoint.as_ref())?;
        let body = json!({"stream_id": stream_id, "subject": subject.to_value(), "verified": true});
        self.call_empty(Method::POST, &url, Some(body)).await
    }

    /// Removes a subject from a stream.
    ///
    /// # Errors
    ///
    /// [`ReceiverError::Status`] (400, 404, 429).
    pub async fn remove_subject(&self, stream_id: &str, subject: &SubjectId) -> Result<(), ReceiverError> {
        let url = self.endpoint("remove_subject_endpoint", self.metadata.remove_subject_endpoint.as_ref())?;
        let body = json!({"stream_id": stream_id, "subject": subject.to_value()});
        self.call_empty(Method::POST, &url, Some(body)).await
    }

    /// Reports that the agent session `session_id` reached this relying
    /// party: adds the subject
    /// `{"format":"complex","session":{"format":"opaque","id":session_id}}`
    /// to the stream, so a revocation of that session — or of any session it
    /// descends from — is delivered here.
    ///
    /// # Errors
    ///
    /// As [`add_subject`](Self::add_subject); a 429 or 503 is retried after
    /// its `Retry-After` (at most 5 tries, each wait at most 10 s) first.
    pub async fn touch(&self, stream_id: &str, session_id: &str) -> Result<(), ReceiverError> {
        self.touch_of(stream_id, session_id, None).await
    }

    /// Like [`touch`](Self::touch), also naming the user the relying party
    /// knows is behind the session (e.g. the token's subject). A transmitter
    /// that keeps the disclosure rule names a session's user in its SETs only
    /// to a receiver that showed it knew that user; this is how to show it.
    ///
    /// # Errors
    ///
    /// As [`add_subject`](Self::add_subject).
    pub async fn touch_of(
        &self,
        stream_id: &str,
        session_id: &str,
        user: Option<SubjectId>,
    ) -> Result<(), ReceiverError> {
        let subject = SubjectId::session_of(SubjectId::opaque(session_id), user);
        // Adding a subject is idempotent, so a transmitter's "not now" (429
        // past its rate, 503 while it cannot record) is waited out, bounded.
        for attempt in 1.. {
            match self.add_subject(stream_id, &subject).await {
                Err(ReceiverError::Status { status: 429 | 503, retry_after, .. }) if attempt < TOUCH_ATTEMPTS => {
                    let wait = retry_after.unwrap_or(Duration::from_secs(1)).min(MAX_TOUCH_WAIT);
                    tracing::debug!(%stream_id, %session_id, attempt, ?wait, "touch deferred by the transmitter");
                    tokio::time::sleep(wait).await;
                }
                other => {
                    other?;
                    break;
                }
            }
        }
        tracing::debug!(%stream_id, %session_id, "touch reported");
        Ok(())
    }

    /// Reports many agent sessions at once, as [`touch`](Self::touch) does
    /// each: in one request per 100 through the transmitter's add-many
    /// extension (`add_subjects_endpoint`, served by caep-hub) when it
    /// advertises one on the add-subject endpoint's origin, else one touch
    /// per session.
    ///
    /// # Errors
    ///
    /// As [`touch`](Self::touch); the whole batch may be retried (touches
    /// are idempotent).
    pub async fn touch_many(&self, stream_id: &str, session_ids: &[String]) -> Result<(), ReceiverError> {
        let subjects = reportable_subjects(session_ids);
        let Some(url) = self.add_subjects_endpoint() else {
            for (session_id, _, _) in &subjects {
                self.touch(stream_id, session_id).await?;
            }
            return Ok(());
        };
        for chunk in batches(&subjects) {
            let subjects: Vec<&Value> = chunk.iter().map(|(_, subject, _)| subject).collect();
            let body = json!({"stream_id": stream_id, "subjects": subjects});
            for attempt in 1.. {
                match self.call_empty(Method::POST, &url, Some(body.clone())).await {
                    Err(ReceiverError::Status { status: 429 | 503, retry_after, .. }) if attempt < TOUCH_ATTEMPTS => {
                        let wait = retry_after.unwrap_or(Duration::from_secs(1)).min(MAX_TOUCH_WAIT);
                        tracing::debug!(%stream_id, sessions = chunk.len(), attempt, ?wait, "touches deferred by the transmitter");
                        tokio::time::sleep(wait).await;
                    }
                    other => {
                        other?;
                        break;
                    }
                }
            }
            tracing::debug!(%stream_id, sessions = chunk.len(), "touches reported");
        }
        Ok(())
    }

    /// The add-many extension's URL, when advertised on the same origin as
    /// the add-subject endpoint (the receiver's token goes to no other host).
    fn add_subjects_endpoint(&self) -> Option<String> {
        let many = Url::parse(self.metadata.extra.get("add_subjects_endpoint")?.as_str()?).ok()?;
        let one = Url::parse(self.metadata.add_subject_endpoint.as_deref()?).ok()?;
        (many.origin() == one.origin()).then(|| many.into())
    }

    /// Asks the transmitter for a verification SET echoing `state`. Nothing
    /// is awaited; see [`verify_stream`](Self::verify_stream).
    ///
    /// # Errors
    ///
    /// [`ReceiverError::Status`] (404; 429 inside `min_verification_interval`,
    /// with `retry_after`).
    pub async fn request_verification(&self, stream_id: &str, state: Option<&str>) -> Result<(), ReceiverError> {
        let url = self.endpoint("verification_endpoint", self.metadata.verification_endpoint.as_ref())?;
        let mut body = json!({"stream_id": stream_id});
        if let Some(state) = state {
            body["state"] = Value::String(state.to_owned());
        }
        self.call_empty(Method::POST, &url, Some(body)).await
    }

    /// Verifies a stream end to end: requests a verification SET with a
    /// fresh random `state` and waits until a SET echoing exactly that state,
    /// about this stream, arrives through this receiver's push router or
    /// poll loop (which must be running) and passes verification.
    ///
    /// # Errors
    ///
    /// The verification request's error, or
    /// [`ReceiverError::VerificationTimeout`] when no matching SET arrived
    /// within `timeout`.
    pub async fn verify_stream(&self, stream_id: &str, timeout: Duration) -> Result<(), ReceiverError> {
        let state = new_id();
        let mut waiter = self.verifications.register(stream_id, &state);
        self.request_verification(stream_id, Some(&state)).await?;
        match tokio::time::timeout(timeout, &mut waiter.receiver).await {
            Ok(Ok(())) => {
                tracing::info!(%stream_id, "stream verified");
                Ok(())
            }
            Ok(Err(_)) | Err(_) => Err(ReceiverError::VerificationTimeout { stream_id: stream_id.to_owned(), timeout }),
        }
    }
}

/// States awaiting their verification SET.
#[derive(Default)]
struct Verifications {
    pending: Mutex<HashMap<String, (String, oneshot::Sender<()>)>>,
}

/// A registered state; unregisters itself when dropped (on timeout or error).
struct Waiter {
    receiver: oneshot::Receiver<()>,
    state: String,
    verifications: Arc<Verifications>,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.verifications.lock().remove(&self.state);
    }
}

impl Verifications {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, oneshot::Sender<()>)>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn register(self: &Arc<Self>, stream_id: &str, state: &str) -> Waiter {
        let (sender, receiver) = oneshot::channel();
        self.lock().insert(state.to_owned(), (stream_id.to_owned(), sender));
        Waiter { receiver, state: state.to_owned(), verifications: Arc::clone(self) }
    }

    /// Completes the waiter of a verification SET that echoes a registered
    /// state and names that state's stream as its subject.
    fn complete(&self, event: &ReceivedEvent) {
        let Event::Verification(verification) = &event.set.event else { return };
        let Some(state) = &verification.state else { return };
        let mut pending = self.lock();
        let matches = pending
            .get(state)
            .is_some_and(|(stream_id, _)| matches!(&event.set.sub_id, SubjectId::Opaque { id } if id == stream_id));
        if matches && let Some((stream_id, sender)) = pending.remove(state) {
            tracing::debug!(%stream_id, jti = %event.set.jti, "verification SET received");
            // The waiter may have timed out meanwhile; nothing to do then.
            let _ = sender.send(());
        }
    }
}

/// A handler wrapped by [`Receiver::tap`]: completes pending
/// [`Receiver::verify_stream`] calls, then passes every event on.
pub struct VerificationTap<H> {
    inner: H,
    verifications: Arc<Verifications>,
}

impl<H> fmt::Debug for VerificationTap<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerificationTap").finish_non_exhaustive()
    }
}

impl<H: EventHandler> EventHandler for VerificationTap<H> {
    fn handle(&self, event: ReceivedEvent) -> impl Future<Output = Result<(), HandlerError>> + Send {
        self.verifications.complete(&event);
        self.inner.handle(event)
    }
}

/// Each session as the subject a touch names, with the ids no transmitter
/// would take left out: a session id comes from a request's token, which
/// the guard reads before the RP authenticates it, so a stranger can send
/// any id, and one over the hub's bound would fail the whole batch with it.
fn reportable_subjects(session_ids: &[String]) -> Vec<(&str, Value, usize)> {
    session_ids
        .iter()
        .filter_map(|id| {
            let subject = SubjectId::session_of(SubjectId::opaque(id.as_str()), None).to_value();
            let bytes = serde_json::to_string(&subject).map_or(usize::MAX, |json| json.len());
            if bytes > MAX_SUBJECT_BYTES {
                // Not the id itself: it is attacker-controlled.
                tracing::warn!(bytes, "a session id too long for any transmitter is not reported");
                return None;
            }
            Some((id.as_str(), subject, bytes))
        })
        .collect()
}

/// The subjects in add-many bodies of at most [`MAX_SUBJECTS_PER_CALL`]
/// subjects and [`MAX_SUBJECTS_BYTES_PER_CALL`] bytes.
fn batches<'a>(subjects: &'a [(&'a str, Value, usize)]) -> Vec<&'a [(&'a str, Value, usize)]> {
    let mut batches = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (at, (_, _, size)) in subjects.iter().enumerate() {
        if at > start && (at - start == MAX_SUBJECTS_PER_CALL || bytes + size > MAX_SUBJECTS_BYTES_PER_CALL) {
            batches.push(&subjects[start..at]);
            (start, bytes) = (at, 0);
        }
        bytes += *size;
    }
    if start < subjects.len() {
        batches.push(&subjects[start..]);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touches_leave_out_oversized_ids_and_split_by_count_and_bytes() {
        let mut ids: Vec<String> = (0..250).map(|i| format!("s-{i}")).collect();
        ids.insert(7, "x".repeat(MAX_SUBJECT_BYTES)); // from a stranger's token
        ids.insert(9, "\"".repeat(MAX_SUBJECT_BYTES / 2)); // half the bound, but escaping doubles it
        let subjects = reportable_subjects(&ids);
        assert_eq!(subjects.len(), 250, "only the two oversized ids are left out");
        let counts: Vec<usize> = batches(&subjects).iter().map(|batch| batch.len()).collect();
        assert_eq!(counts, [100, 100, 50]);

        let big: Vec<String> = (0..60).map(|i| format!("{i}-{}", "y".repeat(1900))).collect();
        let subjects = reportable_subjects(&big);
        assert_eq!(subjects.len(), 60);
        for batch in batches(&subjects) {
            let body = serde_json::to_string(&batch.iter().map(|(_, s, _)| s).collect::<Vec<_>>()).expect("json");
            assert!(body.len() <= MAX_SUBJECTS_BYTES_PER_CALL + 2, "{} bytes", body.len());
        }
        assert_eq!(batches(&subjects).iter().map(|batch| batch.len()).sum::<usize>(), 60);
        assert!(batches(&[]).is_empty());
    }

    #[test]
    fn metadata_url_keeps_ports_and_paths() {
        assert_eq!(
            metadata_url("http://127.0.0.1:8080").ok().as_deref(),
            Some("http://127.0.0.1:8080/.well-known/ssf-configuration")
        );
        assert_eq!(
            metadata_url("https://hub.example.com/a/b/").ok().as_deref(),
            Some("https://hub.example.com/.well-known/ssf-configuration/a/b")
        );
        assert!(metadata_url("not a url").is_err());
        assert!(metadata_url("https://hub.example.com/?x=1").is_err());
    }
}
