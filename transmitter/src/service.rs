//! The transmitter as one service: keys, receivers, streams, the outbox and
//! the push workers, with the operations the HTTP layer and the hub call.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use caep_schemas::event::{Event, StreamStatus, event_type};
use caep_schemas::set::SecurityEventToken;
use caep_schemas::subject::SubjectId;
use ipnet::IpNet;

use redb::{ReadableTable, TableDefinition};

use crate::control::{
    AllLocal, Cluster, ControlChange, ControlLog, ControlOutcome, LocalControl, SetRouter, StreamPlacement,
};
use crate::error::SsfError;
use crate::keys::KeyStore;
use crate::limits::ReceiverLimits;
use crate::metadata::{TransmitterMetadata, paths};
use crate::outbox::{NewSet, Outbox, OutcomeSink};
use crate::push::{PushPolicy, PushRoute, Pusher};
use crate::queue::DeliveryQueue;
use crate::receivers::{Receiver, ReceiverError, ReceiverSpec, Receivers};
use crate::registry::{MAX_SUBJECTS_PER_STREAM, StreamRecord, StreamRegistry};
use crate::secrets::SecretBox;
use crate::ssrf::PushUrlGuard;
use crate::store::{Commit, Store, StoreError};
use crate::streams::Delivery;

/// Other instances' public JWKS as applied from the control log, by
/// instance id, so they are published again after a restart.
const PEER_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("peer_keys");

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
    /// Authenticated SSF calls one receiver may make per second (bursts of
    /// twice that); beyond, 429 with `Retry-After`.
    pub calls_per_second_per_receiver: u32,
    /// Long polls one receiver may hold open at once; beyond, 429.
    pub max_long_polls_per_receiver: usize,
    /// Seals receivers' push credentials at rest. `new` makes a key that
    /// lives only as long as the process; the hub sets its persistent one.
    pub secrets: Arc<SecretBox>,
    /// How long a dead letter waits for an operator's replay.
    pub dead_letter_retention: Duration,
    /// SSF `inactivity_timeout` of new streams: paused after this long
    /// without eligible receiver activity. `None`: never.
    pub inactivity_timeout: Option<Duration>,
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
            secrets: Arc::new(SecretBox::ephemeral()),
            calls_per_second_per_receiver: 200,
            max_long_polls_per_receiver: 8,
            dead_letter_retention: Duration::from_secs(7 * 24 * 3600),
            inactivity_timeout: Some(Duration::from_secs(30 * 24 * 3600)),
        }
    }
}

/// Why a removed receiver's streams are gone (told to push receivers).
const RECEIVER_REMOVED: &str = "receiver removed by the transmitter's operator";

/// A boxed future, for the hook trait.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Told when a receiver adds a subject to a stream, before it is stored;
/// the hub records a session touch here. An error fails the add-subject
/// call, so the receiver retries (adding a subject again is harmless).
pub trait SubjectHook: Send + Sync {
    /// `Ok(true)` when the hook keeps the subject itself (the hub keeps agent
    /// sessions as touches in its graph, pruned with the sessions), so the
    /// stream's own subject list need not; `Ok(false)` to store it there.
    fn subject_added<'a>(
        &'a self,
        stream: &'a StreamRecord,
        subject: &'a SubjectId,
    ) -> BoxFuture<'a, Result<bool, SsfError>>;
}

/// A hook that keeps nothing: every subject is stored with its stream.
pub struct NoHook;

impl SubjectHook for NoHook {
    fn subject_added<'a>(&'a self, _: &'a StreamRecord, _: &'a SubjectId) -> BoxFuture<'a, Result<bool, SsfError>> {
        Box::pin(async { Ok(false) })
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
    /// What one receiver may make the transmitter do.
    limits: ReceiverLimits,
    /// Where every control-plane change is recorded (and so applied).
    control: Arc<dyn ControlLog>,
    /// Where signed SETs go to be delivered.
    router: Arc<dyn SetRouter>,
    /// Which instance serves each stream's polls.
    placement: Arc<dyn StreamPlacement>,
    /// Forwards polls to the instance serving the stream: our own instances'
    /// URLs, so no SSRF guard, but no redirects and a bound longer than any
    /// long poll.
    forward_client: reqwest::Client,
    /// Serializes read-modify-write changes of stream records at this
    /// originator, so two changes to one stream never lose each other's
    /// fields (e.g. a verification time and a status change).
    changing: tokio::sync::Mutex<()>,
    /// Set when the process is stopping: open long polls answer at once
    /// (RFC 8936 allows an early, empty answer) instead of holding the
    /// shutdown's drain for up to their full wait.
    stopping: tokio::sync::watch::Sender<bool>,
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
    /// `cluster` `None` is the embedded transmitter: changes apply at once
    /// ([`LocalControl`]), SETs go to the local outbox, every stream is local.
    pub fn open(
        settings: TransmitterSettings,
        store: Store,
        keys: Arc<KeyStore>,
        sink: Arc<dyn OutcomeSink>,
        subject_hook: Arc<dyn SubjectHook>,
        cluster: Option<Cluster>,
    ) -> Result<Arc<Self>, OpenError> {
        let issuer_path = issuer_path(&settings.issuer)?;
        let outbox = Arc::new(Outbox::new(store.clone(), sink));
        let guard = PushUrlGuard::new(settings.push_allow.clone());
        let queue: Arc<dyn DeliveryQueue> = outbox.clone();
        let pusher = Pusher::new(guard.clone(), queue, settings.push_policy.clone())?;
        let forward_client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(settings.long_poll + Duration::from_secs(10))
            .build()?;
        let local = Arc::new(LocalControl::new());
        let (control, router, placement): (Arc<dyn ControlLog>, Arc<dyn SetRouter>, Arc<dyn StreamPlacement>) =
            match cluster {
                Some(Cluster { control, router, placement }) => (control, router, placement),
                None => (local.clone(), outbox.clone(), Arc::new(AllLocal)),
            };
        load_peer_keys(&store, &keys)?;
        let limits = ReceiverLimits::new(settings.calls_per_second_per_receiver, settings.max_long_polls_per_receiver);
        let transmitter = Arc::new(Transmitter {
            metadata: crate::metadata::for_issuer(&settings.issuer),
            issuer_path,
            receivers: Receivers::new(store.clone()),
            streams: StreamRegistry::load(store, Arc::clone(&settings.secrets))?,
            settings,
            keys,
            outbox,
            pusher,
            guard,
            subject_hook,
            limits,
            control,
            router,
            placement,
            forward_client,
            changing: tokio::sync::Mutex::new(()),
            stopping: tokio::sync::watch::Sender::new(false),
        });
        // Unused (dropped) when a cluster brings its own control log.
        local.bind(&transmitter);
        for record in transmitter.streams.all() {
            transmitter.route(&record);
        }
        Ok(transmitter)
    }

    /// Ends every open long poll (now and later) with an empty answer: the
    /// process is stopping and its receivers should poll elsewhere or again.
    pub fn stop_long_polls(&self) {
        self.stopping.send_replace(true);
    }

    /// Resolves once [`stop_long_polls`](Self::stop_long_polls) was called.
    pub fn stopping(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut stopping = self.stopping.subscribe();
        async move {
            // An error means the sender (the transmitter) is gone: stop too.
            let _ = stopping.wait_for(|stopping| *stopping).await;
        }
    }

    /// The issuer URL.
    pub fn issuer(&self) -> &str {
        &self.settings.issuer
    }

    /// The path of the issuer URL (empty for none): where the SSF routes live.
    pub fn issuer_path(&self) -> &str {
        &self.issuer_path
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

    /// The control log every change goes through.
    pub fn control(&self) -> &Arc<dyn ControlLog> {
        &self.control
    }

    /// Where signed SETs go to be delivered.
    pub fn router(&self) -> &Arc<dyn SetRouter> {
        &self.router
    }

    /// Which instance serves each stream's polls.
    pub fn placement(&self) -> &Arc<dyn StreamPlacement> {
        &self.placement
    }

    /// The client that forwards polls to other instances.
    pub(crate) fn forward_client(&self) -> &reqwest::Client {
        &self.forward_client
    }

    /// Applies one control change to this instance's state: the redb
    /// tables, the caches, push workers and the outbox. Deterministic (the
    /// outcome depends only on the change and the state it meets, and every
    /// instance meets the same state in log order) and idempotent (applying
    /// a change again leaves the state as it was), so a replica may re-apply
    /// after a crash. A change the state refuses is a
    /// [`ControlOutcome::Conflict`], not an error; errors are storage failures
    /// the caller should retry.
    pub async fn apply_control(&self, change: ControlChange) -> Result<ControlOutcome, StoreError> {
        let kind = change.kind();
        let key = change.key().to_owned();
        let outcome = match change {
            ControlChange::ReceiverCreated { receiver, token_digest } => {
                conflict_if(self.receivers.apply_created(receiver, &token_digest).await?)
            }
            ControlChange::ReceiverDeleted { receiver_id } => {
                // One transaction: the token revoked, every stream of the
                // receiver deleted with its queue and dead letters. A crash
                // leaves all of it done or none.
                let gone = receiver_id.clone();
                let also = move |txn: &redb::WriteTransaction, streams: &[String]| {
                    crate::receivers::Receivers::delete_in(txn, &gone)?;
                    for stream_id in streams {
                        Outbox::forget_stream_in(txn, stream_id)?;
                    }
                    Ok(())
                };
                for record in self.streams.delete_owned_by(&receiver_id, also).await? {
                    self.pusher.stop(&record.config.stream_id);
                    self.outbox.forget_waker(&record.config.stream_id);
                }
                ControlOutcome::Applied
            }
            ControlChange::StreamPut { record } => self.apply_stream_put(record).await?,
            ControlChange::StreamDeleted { stream_id } => {
                self.pusher.stop(&stream_id);
                // One transaction: the stream, its subjects, queue and dead letters.
                let gone = stream_id.clone();
                self.streams.apply_delete(&stream_id, move |txn| Outbox::forget_stream_in(txn, &gone)).await?;
                self.outbox.forget_waker(&stream_id);
                ControlOutcome::Applied
            }
            ControlChange::SubjectAdded { stream_id, subject } => {
                conflict_if(self.streams.apply_add_subject(&stream_id, subject).await?)
            }
            ControlChange::SubjectRemoved { stream_id, subject } => {
                self.streams.apply_remove_subject(&stream_id, &subject).await?;
                ControlOutcome::Applied
            }
            ControlChange::PeerKeys { instance_id, jwks } => match self.keys.set_peer_keys(&instance_id, &jwks) {
                Ok(()) => {
                    store_peer_keys(self.outbox.store(), instance_id, &jwks).await?;
                    ControlOutcome::Applied
                }
                Err(refused) => ControlOutcome::Conflict(refused.to_string()),
            },
        };
        match &outcome {
            ControlOutcome::Applied => tracing::debug!(change = kind, key = %key, "control change applied"),
            ControlOutcome::Conflict(reason) => {
                tracing::info!(change = kind, key = %key, reason = %reason, "control change refused")
            }
        }
        Ok(outcome)
    }

    async fn apply_stream_put(&self, record: StreamRecord) -> Result<ControlOutcome, StoreError> {
        let stream_id = record.config.stream_id.clone();
        // A new stream needs its receiver: a creation ordered after the
        // receiver's deletion must not leave an orphan stream.
        if self.streams.get(&stream_id).is_none() && self.receivers.get(&record.receiver_id)?.is_none() {
            return Ok(ControlOutcome::Conflict(format!("receiver `{}` does not exist", record.receiver_id)));
        }
        let record = match self.streams.apply_put(record, self.settings.max_streams_per_receiver).await? {
            Ok(record) => record,
            Err(reason) => return Ok(ControlOutcome::Conflict(reason)),
        };
        if record.status == StreamStatus::Disabled {
            // Disabled streams drop their events, queued ones included.
            self.outbox.purge(&stream_id).await?;
        }
        self.route(&record);
        Ok(ControlOutcome::Applied)
    }

    /// Records `change` and maps a refusal to the HTTP edge's error.
    async fn record(&self, change: ControlChange, refused: impl FnOnce(String) -> SsfError) -> Result<(), SsfError> {
        match self.control.record(change).await.map_err(store_error)? {
            ControlOutcome::Applied => Ok(()),
            ControlOutcome::Conflict(reason) => Err(refused(reason)),
        }
    }

    /// Publishes this instance's own public keys to the other instances.
    pub async fn publish_keys(&self, instance_id: &str) -> Result<ControlOutcome, StoreError> {
        let jwks = self.keys.public_jwks_json();
        self.control.record(ControlChange::PeerKeys { instance_id: instance_id.to_owned(), jwks }).await
    }

    /// Registers a receiver and returns it with its token (shown only now).
    pub async fn create_receiver(&self, spec: ReceiverSpec) -> Result<(Receiver, String), ReceiverError> {
        let new = self.receivers.prepare(spec)?;
        let change = ControlChange::ReceiverCreated { receiver: new.receiver.clone(), token_digest: new.token_digest };
        match self.control.record(change).await? {
            ControlOutcome::Applied => {}
            ControlOutcome::Conflict(reason) => return Err(ReceiverError::Conflict(reason)),
        }
        tracing::info!(receiver_id = %new.receiver.receiver_id, audience = %new.receiver.audience, "receiver registered");
        Ok((new.receiver, new.token))
    }

    /// Changes a stream record as it is now (not as some caller read it
    /// earlier) and records the whole new record. `None` when the stream no
    /// longer exists, here or (decided at apply) anywhere.
    pub async fn update_stream(
        &self,
        stream_id: &str,
        change: impl FnOnce(&mut StreamRecord),
    ) -> Result<Option<Arc<StreamRecord>>, SsfError> {
        let _changing = self.changing.lock().await;
        let Some(current) = self.streams.get(stream_id) else { return Ok(None) };
        let mut record = (*current).clone();
        change(&mut record);
        match self.record(ControlChange::StreamPut { record }, |_| SsfError::NotFound).await {
            Ok(()) => Ok(self.streams.get(stream_id)),
            Err(SsfError::NotFound) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Tells the subject hook (on this instance only: the originator's hook
    /// speaks for the change), then adds the subject to the receiver's
    /// stream. The hook goes first so that a refusal (a receiver past its
    /// bounds) stores nothing; a retry after a failure in between is
    /// harmless, both steps being idempotent.
    pub async fn add_subject(&self, record: &StreamRecord, subject: SubjectId) -> Result<(), SsfError> {
        if self.subject_hook.subject_added(record, &subject).await? {
            return Ok(());
        }
        let stream_id = record.config.stream_id.clone();
        if self.streams.subject_count(&stream_id) >= MAX_SUBJECTS_PER_STREAM
            && !self.streams.has_subject(&stream_id, &subject).map_err(store_error)?
        {
            return Err(SsfError::BadRequest(format!(
                "this stream holds the most subjects allowed ({MAX_SUBJECTS_PER_STREAM}); remove some first"
            )));
        }
        let change = ControlChange::SubjectAdded { stream_id, subject };
        self.record(change, |_| SsfError::NotFound).await
    }

    /// Adds each of `subjects` as [`add_subject`](Self::add_subject) does,
    /// concurrently, so that their writes share the store's grouped commits;
    /// the first refusal is the answer (adding is idempotent: the caller
    /// retries the whole batch).
    pub async fn add_subjects(&self, record: &StreamRecord, subjects: Vec<SubjectId>) -> Result<(), SsfError> {
        let adds = subjects.into_iter().map(|subject| self.add_subject(record, subject));
        futures_util::future::join_all(adds).await.into_iter().collect()
    }

    /// Removes a subject from a stream (idempotent).
    pub async fn remove_subject(&self, stream_id: &str, subject: SubjectId) -> Result<(), SsfError> {
        let change = ControlChange::SubjectRemoved { stream_id: stream_id.to_owned(), subject };
        self.record(change, |_| SsfError::NotFound).await
    }

    /// The poll endpoint of a stream (set by the transmitter).
    pub fn poll_url(&self, stream_id: &str) -> String {
        format!("{}{}", self.settings.issuer, paths::POLL.replace("{stream_id}", stream_id))
    }

    /// Starts, updates or stops the push worker of a stream to match its record.
    pub(crate) fn route(&self, record: &StreamRecord) {
        match &record.config.delivery {
            Delivery::Push { endpoint_url, authorization_header } if record.status != StreamStatus::Disabled => {
                let route = PushRoute::new(endpoint_url, authorization_header.clone(), record.status);
                self.pusher.route(&record.config.stream_id, route);
            }
            _ => self.pusher.stop(&record.config.stream_id),
        }
        self.outbox.wake(&record.config.stream_id);
    }

    /// Why delivery is not healthy, if it is not (for `/healthz`): a push
    /// worker that ended while its stream is still routed. Counts only, so
    /// an unauthenticated caller learns no stream id.
    pub fn delivery_fault(&self) -> Option<String> {
        match self.pusher.stopped_workers() {
            0 => None,
            n => Some(format!("{n} push delivery worker(s) stopped")),
        }
    }

    /// The per-receiver limits.
    pub fn limits(&self) -> &ReceiverLimits {
        &self.limits
    }

    /// The settings the transmitter runs with.
    pub fn settings(&self) -> &TransmitterSettings {
        &self.settings
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
        self.router.enqueue(signed).await.map_err(store_error)?;
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
}

/// A refusal from a registry's apply as a control outcome.
fn conflict_if<T>(applied: Result<T, String>) -> ControlOutcome {
    match applied {
        Ok(_) => ControlOutcome::Applied,
        Err(reason) => ControlOutcome::Conflict(reason),
    }
}

/// Installs the peer keys applied before a restart. A stored set that no
/// longer validates is logged and skipped: it must not stop the hub.
fn load_peer_keys(store: &Store, keys: &KeyStore) -> Result<(), StoreError> {
    let stored = store.read(|txn| {
        let table = match txn.open_table(PEER_KEYS) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(error) => return Err(StoreError::storage(error)),
        };
        let mut all = Vec::new();
        for row in table.iter().map_err(StoreError::storage)? {
            let (instance_id, jwks) = row.map_err(StoreError::storage)?;
            all.push((instance_id.value().to_owned(), crate::store::decode::<serde_json::Value>(jwks.value())?));
        }
        Ok(all)
    })?;
    for (instance_id, jwks) in stored {
        if let Err(error) = keys.set_peer_keys(&instance_id, &jwks) {
            tracing::error!(instance_id = %instance_id, %error, "stored peer keys unusable");
        }
    }
    Ok(())
}

async fn store_peer_keys(store: &Store, instance_id: String, jwks: &serde_json::Value) -> Result<(), StoreError> {
    let bytes = crate::store::encode(jwks)?;
    store
        .write(Commit::Durable, move |txn| {
            let mut table = txn.open_table(PEER_KEYS).map_err(StoreError::storage)?;
            table.insert(instance_id.as_str(), bytes.as_slice()).map_err(StoreError::storage)?;
            Ok(())
        })
        .await
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
    Transmitter::open(settings, store, keys, Arc::new(crate::outbox::NoSink), Arc::new(NoHook), None)
}

mod stream_lifecycle;

#[cfg(test)]
mod tests;
