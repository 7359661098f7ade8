//! RFC 8935 push delivery: one worker per push stream drains that stream's
//! outbox queue, with a bounded number of SETs in flight, so a slow or dead
//! receiver only ever delays itself.
//!
//! Outcomes: 2xx (202 is the norm) is delivered; 400 with an RFC 8935 `err`
//! (and 413) is permanent and dead-lettered with that `err`; anything else
//! (5xx, 429, other 4xx, timeouts, connection errors) is retried with
//! exponential backoff and jitter, resending the same SET (same `jti`),
//! until the SET is older than the give-up age, when it is dead-lettered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backoff::ExponentialBackoffBuilder;
use backoff::backoff::Backoff;
use caep_schemas::event::StreamStatus;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

use crate::outbox::{Failure, FailureTarget, Pending, now_ms};
use crate::queue::DeliveryQueue;
use crate::ssrf::PushUrlGuard;

/// How many queued SETs a worker reads at once.
const READ_BATCH: usize = 256;

/// Retry and concurrency settings for push delivery.
#[derive(Clone, Debug)]
pub struct PushPolicy {
    /// First retry delay (before jitter).
    pub initial_retry: Duration,
    /// Longest delay between two attempts; also caps `Retry-After`.
    pub max_retry_interval: Duration,
    /// A SET older than this is dead-lettered instead of retried.
    pub give_up_after: Duration,
    /// SETs in flight per stream.
    pub max_in_flight_per_stream: usize,
}

impl Default for PushPolicy {
    fn default() -> Self {
        PushPolicy {
            initial_retry: Duration::from_millis(50),
            max_retry_interval: Duration::from_secs(180),
            give_up_after: Duration::from_secs(24 * 3600),
            max_in_flight_per_stream: 32,
        }
    }
}

/// Where and how a stream's SETs are pushed, and whether they may be.
#[derive(Clone)]
pub struct PushRoute {
    /// The endpoint, parsed once per route rather than once per SET
    /// (`Err`: why it does not parse, reported by every attempt).
    endpoint: Result<reqwest::Url, String>,
    /// Sent verbatim as `Authorization` on every request. A secret.
    authorization_header: Option<String>,
    pub status: StreamStatus,
}

impl PushRoute {
    /// A route to `endpoint_url`.
    pub fn new(endpoint_url: &str, authorization_header: Option<String>, status: StreamStatus) -> Self {
        let endpoint = reqwest::Url::parse(endpoint_url).map_err(|error| format!("endpoint URL: {error}"));
        PushRoute { endpoint, authorization_header, status }
    }
}

impl std::fmt::Debug for PushRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushRoute")
            .field("endpoint", &self.endpoint.as_ref().map(reqwest::Url::as_str))
            .field("authorization_header", &self.authorization_header.as_ref().map(|_| "<redacted>"))
            .field("status", &self.status)
            .finish()
    }
}

/// The result of one POST.
#[derive(Debug, PartialEq)]
enum Attempt {
    Delivered,
    Permanent { err: String, description: String },
    Retry { reason: String, retry_after: Option<Duration> },
}

/// A running stream worker and the handle that updates its route.
type Worker = (watch::Sender<PushRoute>, JoinHandle<()>);

/// Runs the push workers.
pub struct Pusher {
    client: reqwest::Client,
    guard: PushUrlGuard,
    queue: Arc<dyn DeliveryQueue>,
    /// Acknowledged SETs `(stream, seq, acked_at_ms)`, removed from the
    /// outbox in batches by one task.
    acknowledged: mpsc::UnboundedSender<(String, u64, u64)>,
    policy: PushPolicy,
    workers: Mutex<HashMap<String, Worker>>,
}

impl Pusher {
    /// A pusher whose HTTP client resolves names through the SSRF guard.
    /// Must run inside a tokio runtime.
    pub fn new(
        guard: PushUrlGuard,
        queue: Arc<dyn DeliveryQueue>,
        policy: PushPolicy,
    ) -> Result<Arc<Self>, reqwest::Error> {
        let client = guard.client_builder().build()?;
        let (acknowledged, acks) = mpsc::unbounded_channel();
        tokio::spawn(remove_acknowledged(Arc::clone(&queue), acks));
        Ok(Arc::new(Pusher { client, guard, queue, acknowledged, policy, workers: Mutex::new(HashMap::new()) }))
    }

    /// Starts delivering a stream, or updates a running worker's route.
    pub fn route(self: &Arc<Self>, stream_id: &str, route: PushRoute) {
        let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((sender, handle)) = workers.get(stream_id)
            && !handle.is_finished()
        {
            sender.send_replace(route);
            self.queue.waker(stream_id).notify_one();
            return;
        }
        let (sender, receiver) = watch::channel(route);
        let worker = StreamWorker { pusher: Arc::clone(self), stream_id: stream_id.to_owned(), route: receiver };
        let handle = tokio::spawn(worker.run());
        workers.insert(stream_id.to_owned(), (sender, handle));
    }

    /// How many stream workers have ended while their stream is still
    /// routed (a worker ends only when stopped, so this is a fault).
    pub fn stopped_workers(&self) -> usize {
        self.workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|(_, handle)| handle.is_finished())
            .count()
    }

    /// Stops a stream's worker and every SET it has in flight (stream
    /// deleted, disabled, or no longer push): they see the route disabled.
    pub fn stop(&self, stream_id: &str) {
        let removed = self.workers.lock().unwrap_or_else(|p| p.into_inner()).remove(stream_id);
        if let Some((sender, handle)) = removed {
            sender.send_modify(|route| route.status = StreamStatus::Disabled);
            handle.abort();
        }
    }

    /// Sends one SET once, outside any queue and with no retry, through the
    /// same SSRF guard: an announcement to a stream already disabled (whose
    /// queue drops everything). True when the receiver accepted it.
    pub(crate) async fn send_direct(&self, endpoint_url: &str, authorization: Option<String>, token: &str) -> bool {
        let route = PushRoute::new(endpoint_url, authorization, StreamStatus::Enabled);
        matches!(self.send_once(&route, token).await, Attempt::Delivered)
    }

    async fn send_once(&self, route: &PushRoute, token: &str) -> Attempt {
        let url = match &route.endpoint {
            Ok(url) => url.clone(),
            Err(reason) => return Attempt::Retry { reason: reason.clone(), retry_after: None },
        };
        if let Err(refused) = self.guard.check_request_url(&url) {
            return Attempt::Retry { reason: refused.to_string(), retry_after: None };
        }
        let mut request = self
            .client
            .post(url)
            .header(CONTENT_TYPE, "application/secevent+jwt")
            .header(ACCEPT, "application/json")
            .body(token.to_owned());
        if let Some(authorization) = &route.authorization_header {
            request = request.header(AUTHORIZATION, authorization);
        }
        match request.send().await {
            Ok(response) => classify(response).await,
            Err(error) => Attempt::Retry { reason: transport_reason(&error), retry_after: None },
        }
    }
}

async fn classify(response: reqwest::Response) -> Attempt {
    let status = response.status();
    if status.is_success() {
        return Attempt::Delivered;
    }
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    if status.as_u16() == 400 || status.as_u16() == 413 {
        let body = read_capped(response, MAX_ERROR_BODY).await.unwrap_or_default();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let text = |member: &str| body.get(member).and_then(|v| v.as_str()).map(|v| truncated(v, MAX_ERROR_TEXT));
        let err = text("err").unwrap_or_else(|| "invalid_request".to_owned());
        let description = text("description").unwrap_or_default();
        return Attempt::Permanent { err, description: format!("HTTP {status}: {description}") };
    }
    Attempt::Retry { reason: format!("HTTP {status}"), retry_after }
}

/// The most of a receiver's error body the pusher reads: an RFC 8935 error
/// is a few hundred bytes, and a hostile receiver must not make it buffer more.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// The most of an error's `err` or `description` kept (it is stored with the
/// dead letter and shown to operators).
const MAX_ERROR_TEXT: usize = 512;

/// The body, or `None` when it is longer than `cap` or cannot be read.
async fn read_capped(mut response: reqwest::Response, cap: usize) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.ok()? {
        if body.len() + chunk.len() > cap {
            return None;
        }
        body.extend_from_slice(&chunk);
    }
    Some(body)
}

fn truncated(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
}

fn transport_reason(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        "timeout".into()
    } else if error.is_connect() {
        "connection failed".into()
    } else {
        "transport error".into()
    }
}

/// One stream's delivery loop.
struct StreamWorker {
    pusher: Arc<Pusher>,
    stream_id: String,
    route: watch::Receiver<PushRoute>,
}

impl StreamWorker {
    async fn run(mut self) {
        let in_flight = Arc::new(Semaphore::new(self.pusher.policy.max_in_flight_per_stream.max(1)));
        let waker = self.pusher.queue.waker(&self.stream_id);
        // Highest sequence handed to a delivery task; rows stay in the outbox
        // until delivered, so a restart starts from zero and resends them.
        let mut cursor = 0;
        loop {
            if self.route.borrow().status != StreamStatus::Enabled {
                if self.route.changed().await.is_err() {
                    return;
                }
                continue;
            }
            let batch = match self.pusher.queue.pending(&self.stream_id, cursor, READ_BATCH) {
                Ok(batch) => batch,
                Err(error) => {
                    tracing::error!(stream_id = %self.stream_id, %error, "cannot read the outbox");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if batch.is_empty() {
                tokio::select! {
                    () = waker.notified() => {}
                    changed = self.route.changed() => if changed.is_err() { return },
                }
                continue;
            }
            for pending in batch {
                cursor = pending.seq;
                let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else { return };
                let delivery = Delivery {
                    pusher: Arc::clone(&self.pusher),
                    stream_id: self.stream_id.clone(),
                    route: self.route.clone(),
                    pending,
                };
                tokio::spawn(async move {
                    delivery.run().await;
                    drop(permit);
                });
            }
        }
    }
}

/// One SET's attempts, until delivered or given up.
struct Delivery {
    pusher: Arc<Pusher>,
    stream_id: String,
    route: watch::Receiver<PushRoute>,
    pending: Pending,
}

impl Delivery {
    async fn run(mut self) {
        let policy = &self.pusher.policy;
        let mut backoff = ExponentialBackoffBuilder::new()
            .with_initial_interval(policy.initial_retry)
            .with_randomization_factor(0.5)
            .with_multiplier(2.0)
            .with_max_interval(policy.max_retry_interval)
            .with_max_elapsed_time(None)
            .build();
        let mut attempts = 0u32;
        loop {
            // Paused: hold the SET until resumed. Disabled or gone: stop; the
            // stream's queue is purged by whoever disabled it.
            let route = loop {
                let route = self.route.borrow().clone();
                match route.status {
                    StreamStatus::Enabled => break route,
                    StreamStatus::Disabled => return,
                    StreamStatus::Paused => {
                        if self.route.changed().await.is_err() {
                            return;
                        }
                    }
                }
            };
            attempts += 1;
            let outcome = self.pusher.send_once(&route, &self.pending.set.token).await;
            metrics::counter!("caep_push_attempts_total", "outcome" => attempt_label(&outcome)).increment(1);
            match outcome {
                Attempt::Delivered => return self.delivered().await,
                Attempt::Permanent { err, description } => return self.give_up(err, description).await,
                Attempt::Retry { reason, retry_after } => {
                    let age = Duration::from_millis(now_ms().saturating_sub(self.pending.set.enqueued_at_ms));
                    if age >= policy.give_up_after {
                        let description = format!("gave up after {attempts} attempts; last: {reason}");
                        return self.give_up("delivery_timeout".into(), description).await;
                    }
                    let delay = backoff.next_backoff().unwrap_or(policy.max_retry_interval);
                    let delay = retry_after.map_or(delay, |asked| asked.min(policy.max_retry_interval).max(delay));
                    self.pusher.queue.health().retrying(&self.stream_id, &reason, now_ms());
                    tracing::debug!(stream_id = %self.stream_id, jti = %self.pending.set.jti, attempts, ?reason,
                        delay_ms = delay.as_millis() as u64, "push failed; will retry");
                    // Wake early when the route changes (paused, disabled, new URL).
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        changed = self.route.changed() => if changed.is_err() { return },
                    }
                }
            }
        }
    }

    async fn delivered(self) {
        let acked_at = now_ms();
        metrics::counter!("caep_deliveries_total", "method" => "push", "outcome" => "delivered").increment(1);
        let latency = acked_at.saturating_sub(self.pending.set.enqueued_at_ms);
        metrics::histogram!("caep_delivery_latency_seconds", "method" => "push").record(latency as f64 / 1000.0);
        if self.pusher.acknowledged.send((self.stream_id, self.pending.seq, acked_at)).is_err() {
            tracing::error!("acknowledgement recorder stopped; the SET will be sent again after a restart");
        }
    }

    async fn give_up(self, err: String, description: String) {
        // The receiver chose `err` and `description`: logged escaped (Debug).
        tracing::warn!(stream_id = %self.stream_id, jti = %self.pending.set.jti, ?err, ?description,
            "push delivery failed permanently; dead-lettered");
        let failure = Failure { target: FailureTarget::Seq(self.pending.seq), err: err.clone(), description };
        if let Err(error) = self.pusher.queue.dead_letter(&self.stream_id, vec![failure]).await {
            tracing::error!(stream_id = %self.stream_id, %error, "cannot dead-letter a SET");
        }
        metrics::counter!("caep_deliveries_total", "method" => "push", "outcome" => "failed").increment(1);
    }
}

/// How long the first acknowledgement of a batch waits for others to share
/// its commit. Each commit rewrites the paths to every table it touches, so
/// fewer, larger ones cost the hub less CPU per SET (the 10,000-leaf cascade
/// bench: 52 µs over the bare loop per SET instead of about 80 with a 5 ms
/// wait; 20 ms instead of 5 ms took the bench's median ratio to the bare loop
/// from 0.82x to 0.87x over five interleaved invocations each). The wait
/// delays no latency figure (a push is acknowledged at its 202), only when
/// the outcome is on disk and a cascade's report shows it; a removal lost
/// meanwhile is a redelivery of the same `jti`.
const ACK_LINGER: Duration = Duration::from_millis(20);

/// Removes acknowledged SETs from the outbox, as many per transaction as
/// arrive within [`ACK_LINGER`], so thousands of 202s a second cost a few commits.
async fn remove_acknowledged(queue: Arc<dyn DeliveryQueue>, mut acks: mpsc::UnboundedReceiver<(String, u64, u64)>) {
    const MAX_BATCH: usize = 2048;
    while let Some(first) = acks.recv().await {
        tokio::time::sleep(ACK_LINGER).await;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match acks.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        if let Err(error) = queue.remove_delivered(batch).await {
            tracing::error!(%error, "cannot record deliveries; they will be sent again after a restart");
        }
    }
}

fn attempt_label(attempt: &Attempt) -> &'static str {
    match attempt {
        Attempt::Delivered => "delivered",
        Attempt::Permanent { .. } => "rejected",
        Attempt::Retry { .. } => "retry",
    }
}
