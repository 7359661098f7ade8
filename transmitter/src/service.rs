//! The transmitter as one service: keys, receivers, streams, the outbox and
//! the push workers, with the operations the HTTP layer and the hub call.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use caep_schemas::event::{Event, StreamStatus, StreamUpdated, Verification, event_type};
use caep_schemas::set::{Audience, SecurityEventToken};
use caep_schemas::subject::SubjectId;
use ipnet::IpNet;

use crate::error::SsfError;
use crate::keys::KeyStore;
use crate::metadata::{TransmitterMetadata, paths};
use crate::outbox::{NewSet, Outbox, OutcomeSink, now_ms};
use crate::push::{PushPolicy, PushRoute, Pusher};
use crate::queue::DeliveryQueue;
use crate::receivers::{Receiver, Receivers};
use crate::registry::{StreamRecord, StreamRegistry};
use crate::ssrf::PushUrlGuard;
use crate::store::{Store, StoreError};
use crate::streams::{self, Delivery, RequestKind, StreamConfig};

/// Every event type the hub can deliver to a stream.
pub const EVENTS_SUPPORTED: &[&str] = &[
    event_type::SESSION_REVOKED,
    event_type::TOKEN_CLAIMS_CHANGE,
    event_type::CREDENTIAL_CHANGE,
    event_type::ASSURANCE_LEVEL_CHANGE,
    event_type::DEVICE_COMPLIANCE_CHANGE,
    event_type::SESSION_ESTABLISHED,
    event_type::SESSION_PRESENTED,
    event_type::RISK_LEVEL_CHANGE,
    event_type::ACCOUNT_CREDENTIAL_CHANGE_REQUIRED,
    event_type::ACCOUNT_PURGED,
    event_type::ACCOUNT_DISABLED,
    event_type::ACCOUNT_ENABLED,
    event_type::IDENTIFIER_CHANGED,
    event_type::IDENTIFIER_RECYCLED,
    event_type::CREDENTIAL_COMPROMISE,
    event_type::OPT_IN,
    event_type::OPT_OUT_INITIATED,
    event_type::OPT_OUT_CANCELLED,
    event_type::OPT_OUT_EFFECTIVE,
    event_type::RECOVERY_ACTIVATED,
    event_type::RECOVERY_INFORMATION_CHANGED,
];

/// Tunable settings of the transmitter.
#[derive(Clone, Debug)]
pub struct TransmitterSettings {
    /// Absolute issuer URL: every SET's `iss`, and the base of every endpoint.
    pub issuer: String,
    /// Private ranges push endpoints may use despite the SSRF guard.
    pub push_allow: Vec<IpNet>,
    pub push_policy: PushPolicy,
    /// Longest a poll waits for SETs when not asked to return at once.
    pub long_poll: Duration,
    /// Seconds a receiver must wait between two verification requests.
    pub min_verification_interval: u64,
    /// Streams one receiver may hold; beyond it, create answers 409.
    pub max_streams_per_receiver: usize,
    /// How long a transmitter-initiated pause or disable waits for the
    /// stream-updated SET that announces it to be acknowledged.
    pub announce_timeout: Duration,
}

impl TransmitterSettings {
    /// Defaults for `issuer`.
    pub fn new(issuer: &str) -> Self {
        TransmitterSettings {
            issuer: issuer.trim_end_matches('/').to_owned(),
            push_allow: Vec::new(),
            push_policy: PushPolicy::default(),
            long_poll: Duration::from_secs(30),
            min_verification_interval: 5,
            max_streams_per_receiver: 100,
            announce_timeout: Duration::from_secs(5),
        }
    }
}

/// A boxed future, for the hook trait.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Told when a receiver adds a subject to a stream, after it is stored; the
/// hub records a session touch here.
pub trait SubjectHook: Send + Sync {
    fn subject_added<'a>(&'a self, stream: &'a StreamRecord, subject: &'a SubjectId) -> BoxFuture<'a, ()>;
}

/// A hook that does nothing.
pub struct NoHook;

impl SubjectHook for NoHook {
    fn subject_added<'a>(&'a self, _: &'a StreamRecord, _: &'a SubjectId) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// A SET bound for one stream.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub stream_id: String,
    pub set: SecurityEventToken,
}

/// The SSF transmitter.
pub struct Transmitter {
    pub(crate) metadata: TransmitterMetadata,
    pub(crate) issuer_path: String,
    pub(crate) settings: TransmitterSettings,
    keys: Arc<KeyStore>,
    outbox: Arc<Outbox>,
    receivers: Receivers,
    streams: StreamRegistry,
    pusher: Arc<Pusher>,
    pub(crate) guard: PushUrlGuard,
    subject_hook: Arc<dyn SubjectHook>,
}

/// Why the transmitter could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Issuer(#[from] InvalidIssuer),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("push HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// The issuer is not an absolute http(s) URL without query or fragment.
#[derive(Debug, thiserror::Error)]
#[error("issuer `{0}` must be an absolute http(s) URL without query or fragment")]
pub struct InvalidIssuer(pub String);

impl Transmitter {
    /// Builds the transmitter over `store` and starts delivering every
    /// push stream that is not disabled. Must run inside a tokio runtime.
    pub fn open(
        settings: TransmitterSettings,
        store: Store,
        keys: Arc<KeyStore>,
        sink: Arc<dyn OutcomeSink>,
        subject_hook: Arc<dyn SubjectHook>,
    ) -> Result<Arc<Self>, OpenError> {
        let issuer_path = issuer_path(&settings.issuer)?;
        let outbox = Arc::new(Outbox::new(store.clone(), sink));
        let guard = PushUrlGuard::new(settings.push_allow.clone());
        let queue: Arc<dyn DeliveryQueue> = outbox.clone();
        let pusher = Pusher::new(guard.clone(), queue, settings.push_policy.clone())?;
        let transmitter = Arc::new(Transmitter {
            metadata: crate::metadata::for_issuer(&settings.issuer),
            issuer_path,
            receivers: Receivers::new(store.clone()),
            streams: StreamRegistry::load(store)?,
            settings,
            keys,
            outbox,
            pusher,
            guard,
            subject_hook,
        });
        for record in transmitter.streams.all() {
            transmitter.route(&record);
        }
        Ok(transmitter)
    }

    /// The issuer URL.
    pub fn issuer(&self) -> &str {
        &self.settings.issuer
    }

    /// The metadata this transmitter publishes.
    pub fn metadata(&self) -> &TransmitterMetadata {
        &self.metadata
    }

    /// The signing keys.
    pub fn keys(&self) -> &Arc<KeyStore> {
        &self.keys
    }

    /// The receiver registry.
    pub fn receivers(&self) -> &Receivers {
        &self.receivers
    }

    /// The stream registry.
    pub fn streams(&self) -> &StreamRegistry {
        &self.streams
    }

    /// The outbox.
    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    pub(crate) fn subject_hook(&self) -> &dyn SubjectHook {
        self.subject_hook.as_ref()
    }

    /// The poll endpoint of a stream (set by the transmitter).
    pub fn poll_url(&self, stream_id: &str) -> String {
        format!("{}{}", self.settings.issuer, paths::POLL.replace("{stream_id}", stream_id))
    }

    /// Starts, updates or stops the push worker of a stream to match its record.
    pub(crate) fn route(&self, record: &StreamRecord) {
        match &record.config.delivery {
            Delivery::Push { endpoint_url, authorization_header } if record.status != StreamStatus::Disabled => {
                let route = PushRoute {
                    endpoint_url: endpoint_url.clone(),
                    authorization_header: authorization_header.clone(),
                    status: record.status,
                };
                self.pusher.route(&record.config.stream_id, route);
            }
            _ => self.pusher.stop(&record.config.stream_id),
        }
        self.outbox.wake(&record.config.stream_id);
    }

    /// Signs SETs for their streams, dropping those bound for unknown or
    /// disabled streams. CPU-bound; the caller chooses where it runs.
    pub fn sign(&self, outgoing: Vec<Outgoing>) -> Result<Vec<NewSet>, SsfError> {
        let key = self.keys.active();
        let mut signed = Vec::with_capacity(outgoing.len());
        for Outgoing { stream_id, set } in outgoing {
            if self.streams.get(&stream_id).is_none_or(|record| record.status == StreamStatus::Disabled) {
                continue;
            }
            let token = set.sign(&key).map_err(|error| SsfError::Storage(format!("signing: {error}")))?;
            signed.push(NewSet { stream_id, jti: set.jti, token, txn: set.txn });
        }
        Ok(signed)
    }

    /// Signs and durably enqueues SETs; returns once they are committed.
    /// Signing runs on the blocking pool, in parallel chunks.
    pub async fn emit(self: &Arc<Self>, outgoing: Vec<Outgoing>) -> Result<usize, SsfError> {
        let chunks = split_for_signing(outgoing);
        let mut tasks = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            let this = Arc::clone(self);
            tasks.push(tokio::task::spawn_blocking(move || this.sign(chunk)));
        }
        let mut signed = Vec::new();
        for task in tasks {
            signed.extend(task.await.map_err(|e| SsfError::Storage(format!("signing task: {e}")))??);
        }
        let count = signed.len();
        self.outbox.enqueue(signed).await.map_err(store_error)?;
        metrics::counter!("caep_sets_emitted_total").increment(count as u64);
        Ok(count)
    }

    /// Wakes the deliverers of these streams after a caller's own commit
    /// that included outbox rows (see [`Outbox::insert`]).
    pub fn wake(&self, stream_ids: impl IntoIterator<Item = impl AsRef<str>>) {
        for stream_id in stream_ids {
            self.outbox.wake(stream_id.as_ref());
        }
    }

    /// A SET about a stream itself (verification, stream-updated): subject
    /// `opaque` stream id, addressed to the stream's audience.
    pub(crate) fn stream_event(&self, record: &StreamRecord, event: Event) -> Outgoing {
        let mut set = SecurityEventToken::new(
            self.issuer(),
            record.config.aud.clone(),
            SubjectId::opaque(&record.config.stream_id),
            event,
        );
        set.txn = Some(caep_schemas::set::new_id());
        Outgoing { stream_id: record.config.stream_id.clone(), set }
    }

    /// Creates a stream for `receiver` from a create-request body (SSF 1.0
    /// §8.1.1.1): `aud` is the receiver's audience, the push endpoint passes
    /// the SSRF guard, and a receiver holds at most the configured number.
    pub async fn create_stream(&self, receiver: &Receiver, body: &[u8]) -> Result<Arc<StreamRecord>, SsfError> {
        let request = streams::parse_request(body, RequestKind::Create)?;
        let all_subjects = asks_for_all_subjects(body)?;
        let limit = self.settings.max_streams_per_receiver;
        if self.streams.owned_by(&receiver.receiver_id).len() >= limit {
            return Err(SsfError::Conflict(format!("this receiver already has the most streams allowed ({limit})")));
        }
        let config = streams::new_stream(
            streams::new_stream_id(),
            self.issuer(),
            Audience::One(receiver.audience.clone()),
            request,
            EVENTS_SUPPORTED,
            |id| self.poll_url(id),
            self.settings.min_verification_interval,
        );
        self.check_push_endpoint(&config).await?;
        let record = StreamRecord {
            config,
            receiver_id: receiver.receiver_id.clone(),
            status: StreamStatus::Enabled,
            reason: None,
            all_subjects,
            last_verification_ms: None,
            created_at_ms: now_ms(),
        };
        let record = self.streams.put(record).await.map_err(store_error)?;
        self.route(&record);
        tracing::info!(stream_id = %record.config.stream_id, receiver_id = %receiver.receiver_id,
            method = record.config.delivery.method(), "stream created");
        Ok(record)
    }

    /// Refuses a push endpoint the SSRF guard refuses (400 with the reason).
    pub(crate) async fn check_push_endpoint(&self, config: &StreamConfig) -> Result<(), SsfError> {
        if let Delivery::Push { endpoint_url, .. } = &config.delivery {
            self.guard.check_url(endpoint_url).await.map_err(|refused| SsfError::BadRequest(refused.to_string()))?;
        }
        Ok(())
    }

    /// Records a verification request and emits the verification SET; 429
    /// inside the minimum interval.
    pub async fn verify_stream(self: &Arc<Self>, record: &StreamRecord, state: Option<String>) -> Result<(), SsfError> {
        let now = now_ms();
        let interval_ms = self.settings.min_verification_interval * 1000;
        if let Some(last) = record.last_verification_ms {
            let elapsed = now.saturating_sub(last);
            if elapsed < interval_ms {
                return Err(SsfError::TooManyRequests { retry_after_secs: (interval_ms - elapsed).div_ceil(1000) });
            }
        }
        let updated = self.streams.update(&record.config.stream_id, |r| r.last_verification_ms = Some(now));
        updated.await.map_err(store_error)?.ok_or(SsfError::NotFound)?;
        let event = Event::Verification(Verification { state, ..Verification::default() });
        self.emit(vec![self.stream_event(record, event)]).await?;
        Ok(())
    }

    /// Changes a stream's status at the receiver's request.
    pub async fn set_status(
        &self,
        record: &StreamRecord,
        status: StreamStatus,
        reason: Option<String>,
    ) -> Result<Arc<StreamRecord>, SsfError> {
        let change = |r: &mut StreamRecord| {
            r.status = status;
            r.reason = reason;
        };
        let updated = self.streams.update(&record.config.stream_id, change).await.map_err(store_error)?;
        let updated = updated.ok_or(SsfError::NotFound)?;
        if status == StreamStatus::Disabled {
            // Disabled streams drop their events, queued ones included.
            self.outbox.purge(&record.config.stream_id).await.map_err(store_error)?;
        }
        self.route(&updated);
        tracing::info!(stream_id = %record.config.stream_id, status = ?status, "stream status changed");
        Ok(updated)
    }

    /// Changes a stream's status on the transmitter's own initiative: the
    /// receiver is told first by a stream-updated SET, which is given up to
    /// `announce_timeout` to be acknowledged before the change takes effect.
    pub async fn change_status_by_transmitter(
        self: &Arc<Self>,
        stream_id: &str,
        status: StreamStatus,
        reason: Option<String>,
    ) -> Result<Arc<StreamRecord>, SsfError> {
        let record = self.streams.get(stream_id).ok_or(SsfError::NotFound)?;
        if record.status == StreamStatus::Enabled {
            let event = Event::StreamUpdated(StreamUpdated { status, reason: reason.clone(), ..Default::default() });
            let announcement = self.stream_event(&record, event);
            let jti = announcement.set.jti.clone();
            self.emit(vec![announcement]).await?;
            self.await_acknowledgement(stream_id, &jti).await;
        }
        self.set_status(&record, status, reason).await
    }

    async fn await_acknowledgement(&self, stream_id: &str, jti: &str) {
        let deadline = tokio::time::Instant::now() + self.settings.announce_timeout;
        while tokio::time::Instant::now() < deadline {
            match self.outbox.contains(stream_id, jti) {
                Ok(false) => return,
                Ok(true) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(error) => {
                    tracing::warn!(%error, "cannot check the announcement's delivery");
                    return;
                }
            }
        }
        tracing::warn!(stream_id, jti, "stream-updated SET not acknowledged in time; changing status anyway");
    }

    /// Deletes a stream: its queue, subjects and worker.
    pub async fn delete_stream(&self, stream_id: &str) -> Result<(), SsfError> {
        self.pusher.stop(stream_id);
        self.outbox.purge(stream_id).await.map_err(store_error)?;
        self.streams.delete(stream_id).await.map_err(store_error)?;
        tracing::info!(stream_id, "stream deleted");
        Ok(())
    }

    /// Removes a receiver: revokes its token at once, then disables its
    /// streams (announcing it to them first).
    pub async fn delete_receiver(self: &Arc<Self>, receiver_id: &str) -> Result<bool, SsfError> {
        if !self.receivers.delete(receiver_id).await.map_err(store_error)? {
            return Ok(false);
        }
        for record in self.streams.owned_by(receiver_id) {
            let reason = Some("receiver removed by the transmitter's operator".to_owned());
            self.change_status_by_transmitter(&record.config.stream_id, StreamStatus::Disabled, reason).await?;
        }
        Ok(true)
    }
}

/// The hub's extension member `default_subjects` of a create request.
fn asks_for_all_subjects(body: &[u8]) -> Result<bool, SsfError> {
    let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    match value.get("default_subjects").and_then(|v| if v.is_null() { None } else { Some(v) }) {
        None => Ok(false),
        Some(serde_json::Value::String(s)) if s == "ALL" => Ok(true),
        Some(serde_json::Value::String(s)) if s == "NONE" => Ok(false),
        Some(_) => Err(SsfError::BadRequest("`default_subjects` must be \"ALL\" or \"NONE\"".into())),
    }
}

/// Maps storage failures to the HTTP edge's error.
pub(crate) fn store_error(error: StoreError) -> SsfError {
    SsfError::Storage(error.to_string())
}

/// Splits work for signing on every core; small batches stay whole.
fn split_for_signing(mut outgoing: Vec<Outgoing>) -> Vec<Vec<Outgoing>> {
    const MIN_CHUNK: usize = 64;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let size = outgoing.len().div_ceil(cores).max(MIN_CHUNK);
    let mut chunks = Vec::new();
    while outgoing.len() > size {
        let rest = outgoing.split_off(size);
        chunks.push(outgoing);
        outgoing = rest;
    }
    chunks.push(outgoing);
    chunks
}

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

/// Opens a transmitter in `data_dir` with default hooks (for tests and tools).
pub fn open_in(
    data_dir: &Path,
    settings: TransmitterSettings,
    keys: Arc<KeyStore>,
) -> Result<Arc<Transmitter>, OpenError> {
    let store = Store::open(&data_dir.join("caep-hub.redb"))?;
    Transmitter::open(settings, store, keys, Arc::new(crate::outbox::NoSink), Arc::new(NoHook))
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

    #[test]
    fn signing_work_is_split_across_cores_but_small_batches_stay_whole() {
        let one = |i: usize| Outgoing {
            stream_id: format!("s{i}"),
            set: SecurityEventToken::new(
                "https://hub",
                "aud",
                SubjectId::opaque("x"),
                Event::AccountPurged(Default::default()),
            ),
        };
        assert_eq!(split_for_signing((0..10).map(one).collect()).len(), 1);
        let chunks = split_for_signing((0..1000).map(one).collect());
        assert_eq!(chunks.iter().map(Vec::len).sum::<usize>(), 1000);
        assert!(chunks.iter().all(|c| c.len() >= 64));
    }
}
