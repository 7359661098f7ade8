//! RFC 8936 poll delivery: a loop that long-polls the transmitter, verifies
//! and handles each SET, and acknowledges or reports it in the next request.
//!
//! - A SET the handler processed is acknowledged (`ack`) in the next poll.
//! - A SET that fails verification is reported (`setErrs`) with its RFC 8935
//!   code, so the transmitter stops sending it.
//! - A SET the handler failed on, or that cannot be verified right now (keys
//!   unreachable), is neither: the transmitter sends it again.
//! - Transport errors, 429 and 5xx answers back off exponentially (with
//!   jitter) and keep the pending acknowledgements for the next attempt;
//!   other error statuses (the token or stream is gone) end the loop.
//! - On shutdown the in-flight poll is given a short grace period, then the
//!   pending acknowledgements are sent with `maxEvents: 0` and
//!   `returnImmediately: true`, and the loop returns.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use backoff::ExponentialBackoffBuilder;
use backoff::backoff::Backoff;
use reqwest::header::{ACCEPT, AUTHORIZATION};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ReceiverError;
use crate::event::ReceivedEvent;
use crate::handler::EventHandler;
use crate::http;
use crate::verify::SetVerifier;

/// Default `maxEvents` of one poll.
pub const DEFAULT_MAX_EVENTS: u32 = 100;
/// Default timeout of one poll request: longer than any sensible long-poll
/// wait at the transmitter (the hub's default is 30 s).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(75);
/// Default time the in-flight poll may still take after shutdown was asked.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Default largest poll response accepted.
pub const DEFAULT_MAX_RESPONSE: usize = 16 * 1024 * 1024;

/// One `setErrs` entry.
#[derive(Clone, Debug, Serialize)]
struct SetErr {
    err: &'static str,
    description: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PollRequest<'a> {
    max_events: u32,
    return_immediately: bool,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    ack: &'a [String],
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    set_errs: &'a BTreeMap<String, SetErr>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PollResponse {
    #[serde(default)]
    sets: Map<String, Value>,
    #[serde(default)]
    more_available: bool,
}

/// Acknowledgements and errors not yet delivered to the transmitter.
#[derive(Default)]
struct Settlements {
    ack: Vec<String>,
    set_errs: BTreeMap<String, SetErr>,
}

impl Settlements {
    fn is_empty(&self) -> bool {
        self.ack.is_empty() && self.set_errs.is_empty()
    }
}

/// What became of one polled SET.
enum Outcome {
    Ack,
    Refuse(SetErr),
    /// Neither acknowledge nor refuse: it comes back.
    Again,
}

/// An RFC 8936 poll loop. Build it with [`PollLoop::new`] (or
/// [`Receiver::poll_loop`](crate::Receiver::poll_loop)) and drive it with
/// [`run`](PollLoop::run).
///
/// ```no_run
/// use std::sync::Arc;
/// use caep_receiver::jwks::JwksCache;
/// use caep_receiver::verify::SetVerifier;
/// use caep_receiver::{HandlerError, PollLoop, ReceivedEvent};
///
/// # async fn run() -> Result<(), caep_receiver::ReceiverError> {
/// let jwks = JwksCache::new(reqwest::Client::new(), "https://hub.example.com/ssf/jwks.json".into());
/// let verifier = Arc::new(SetVerifier::new("https://hub.example.com", "https://rp.example.com", jwks));
/// let poll = PollLoop::new(verifier, "https://hub.example.com/ssf/poll/STREAM", "receiver-token",
///     |event: ReceivedEvent| async move {
///         tracing::info!(jti = event.jti(), "SET");
///         Ok::<(), HandlerError>(())
///     });
/// poll.run(async { tokio::signal::ctrl_c().await.ok(); }).await?;
/// # Ok(()) }
/// ```
pub struct PollLoop<H> {
    client: reqwest::Client,
    poll_url: String,
    token: String,
    verifier: Arc<SetVerifier>,
    handler: H,
    max_events: u32,
    request_timeout: Duration,
    shutdown_grace: Duration,
    max_response: usize,
    initial_backoff: Duration,
    max_backoff: Duration,
}

impl<H> fmt::Debug for PollLoop<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PollLoop")
            .field("poll_url", &self.poll_url)
            .field("max_events", &self.max_events)
            .finish_non_exhaustive()
    }
}

impl<H: EventHandler> PollLoop<H> {
    /// A loop polling `poll_url` with the bearer `token`, verifying with
    /// `verifier` and handing SETs to `handler`.
    pub fn new(verifier: Arc<SetVerifier>, poll_url: impl Into<String>, token: impl Into<String>, handler: H) -> Self {
        PollLoop {
            client: reqwest::Client::new(),
            poll_url: poll_url.into(),
            token: token.into(),
            verifier,
            handler,
            max_events: DEFAULT_MAX_EVENTS,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            max_response: DEFAULT_MAX_RESPONSE,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
        }
    }

    /// Uses `client` for the polls.
    pub fn with_client(mut self, client: reqwest::Client) -> Self {
        self.client = client;
        self
    }

    /// Asks for at most `max_events` SETs per poll (default 100; at least 1).
    pub fn with_max_events(mut self, max_events: u32) -> Self {
        self.max_events = max_events.max(1);
        self
    }

    /// Sets the timeout of one poll request (default 75 s). Keep it above
    /// the transmitter's long-poll wait.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets how long the in-flight poll may still take after shutdown is
    /// asked (default 2 s). Abandoning it loses nothing: its
    /// acknowledgements are sent again, and any SETs it would have brought
    /// are delivered again later.
    pub fn with_shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Sets the back-off after transport errors and failed handlers:
    /// exponential from `initial` up to `max`, with jitter.
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }

    /// Polls until `shutdown` completes, then sends the pending
    /// acknowledgements and returns.
    ///
    /// # Errors
    ///
    /// [`ReceiverError::Status`] when the transmitter answers an error that
    /// retrying cannot fix (400, 401, 403, 404: bad request, token revoked,
    /// stream deleted). Transient failures are retried, never returned.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ReceiverError> {
        let mut shutdown = pin!(shutdown);
        let mut stopping = false;
        let mut pending = Settlements::default();
        let mut backoff = ExponentialBackoffBuilder::new()
            .with_initial_interval(self.initial_backoff)
            .with_max_interval(self.max_backoff)
            .with_max_elapsed_time(None)
            .build();
        tracing::info!(poll_url = %self.poll_url, "poll loop started");
        while !stopping {
            let body = self.body(&pending, self.max_events, false);
            let mut request = pin!(self.send(body, self.request_timeout));
            let result = tokio::select! {
                result = &mut request => Some(result),
                () = shutdown.as_mut() => None,
            };
            let result = match result {
                Some(result) => result,
                None => {
                    stopping = true;
                    match tokio::time::timeout(self.shutdown_grace, &mut request).await {
                        Ok(result) => result,
                        Err(_) => break,
                    }
                }
            };
            let response = match result {
                Ok(response) => response,
                Err(error) if error.is_transient() => {
                    let delay = backoff.next_backoff().unwrap_or(self.max_backoff);
                    tracing::warn!(poll_url = %self.poll_url, %error, delay_ms = delay.as_millis() as u64,
                        "poll failed; backing off");
                    if !stopping && self.sleep_or_shutdown(delay, shutdown.as_mut()).await {
                        stopping = true;
                    }
                    continue;
                }
                Err(error) => {
                    tracing::error!(poll_url = %self.poll_url, %error, "poll refused; stopping the poll loop");
                    return Err(error);
                }
            };
            // The request carrying them succeeded: the transmitter has them.
            pending = Settlements::default();
            let troubled = self.settle(response.sets, &mut pending).await;
            if troubled {
                let delay = backoff.next_backoff().unwrap_or(self.max_backoff);
                if !stopping && self.sleep_or_shutdown(delay, shutdown.as_mut()).await {
                    stopping = true;
                }
            } else {
                backoff.reset();
            }
            tracing::trace!(more_available = response.more_available, "poll round done");
        }
        self.flush(&pending).await;
        tracing::info!(poll_url = %self.poll_url, "poll loop stopped");
        Ok(())
    }

    /// Sleeps for `delay` unless shutdown comes first; true if it did.
    async fn sleep_or_shutdown(&self, delay: Duration, shutdown: std::pin::Pin<&mut impl Future<Output = ()>>) -> bool {
        tokio::select! {
            () = tokio::time::sleep(delay) => false,
            () = shutdown => true,
        }
    }

    /// Sends the last acknowledgements and errors without asking for SETs.
    async fn flush(&self, pending: &Settlements) {
        if pending.is_empty() {
            return;
        }
        let body = self.body(pending, 0, true);
        let timeout = self.request_timeout.min(Duration::from_secs(10));
        match self.send(body, timeout).await {
            Ok(_) => tracing::debug!(
                acks = pending.ack.len(),
                set_errs = pending.set_errs.len(),
                "final acknowledgements sent"
            ),
            Err(error) => {
                tracing::warn!(%error, acks = pending.ack.len(), "final acknowledgements not delivered; the SETs will come again");
            }
        }
    }

    fn body(&self, pending: &Settlements, max_events: u32, return_immediately: bool) -> Value {
        let request = PollRequest { max_events, return_immediately, ack: &pending.ack, set_errs: &pending.set_errs };
        serde_json::to_value(&request).unwrap_or_else(|_| Value::Object(Map::new()))
    }

    async fn send(&self, body: Value, timeout: Duration) -> Result<PollResponse, ReceiverError> {
        let request = self
            .client
            .post(&self.poll_url)
            .header(AUTHORIZATION, format!("Bearer {}", self.token))
            .header(ACCEPT, "application/json")
            .json(&body)
            .timeout(timeout);
        http::send_json(&self.poll_url, request, self.max_response).await
    }

    /// Verifies and handles each polled SET, in the order received, and
    /// records what to tell the transmitter. True when some SET must come
    /// again (handler failure, keys unavailable): a reason to slow down.
    async fn settle(&self, sets: Map<String, Value>, pending: &mut Settlements) -> bool {
        let mut troubled = false;
        for (jti, token) in sets {
            match self.process(&jti, token).await {
                Outcome::Ack => pending.ack.push(jti),
                Outcome::Refuse(set_err) => {
                    tracing::info!(jti, err = set_err.err, description = %set_err.description, "polled SET refused");
                    pending.set_errs.insert(jti, set_err);
                }
                Outcome::Again => troubled = true,
            }
        }
        troubled
    }

    async fn process(&self, jti: &str, token: Value) -> Outcome {
        let Value::String(token) = token else {
            return Outcome::Refuse(SetErr { err: "invalid_request", description: "the SET is not a string".into() });
        };
        let verified = match self.verifier.verify(&token).await {
            Ok(verified) => verified,
            Err(error) if error.is_transient() => {
                tracing::warn!(jti, %error, "polled SET cannot be verified now; it will come again");
                return Outcome::Again;
            }
            Err(error) => {
                return Outcome::Refuse(SetErr { err: error.rfc8935_err(), description: error.description() });
            }
        };
        // The transmitter files the SET under this key; a SET filed under
        // another jti than its own is not what it claims to be.
        if verified.set.jti != jti {
            return Outcome::Refuse(SetErr {
                err: "invalid_request",
                description: "the SET's jti differs from its key in `sets`".into(),
            });
        }
        if verified.duplicate {
            return Outcome::Ack;
        }
        let event = ReceivedEvent::new(verified.set.clone(), token);
        let event_type = event.event_type().to_owned();
        match self.handler.handle(event).await {
            Ok(()) => {
                verified.accept();
                tracing::debug!(jti, event = %event_type, "polled SET accepted");
                Outcome::Ack
            }
            Err(error) => {
                tracing::warn!(jti, event = %event_type, %error, "handler failed; the SET will come again");
                Outcome::Again
            }
        }
    }
}
