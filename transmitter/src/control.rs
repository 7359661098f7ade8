//! The control-plane seam: how changes to receivers, streams, subjects and
//! peer keys reach every instance's local state, and where signed SETs and
//! polls go when several instances share the work.
//!
//! Every mutation follows one pattern. The originator validates against its
//! local state and decides everything random (ids, tokens, timestamps), so a
//! [`ControlChange`] is a pure description of the result. It hands the change
//! to a [`ControlLog`], which resolves once the change has been applied to the
//! originator's own state; the originator then reads the result from there.
//! [`Transmitter::apply_control`] applies a change deterministically and
//! idempotently, so every instance that applies the same changes in the same
//! order ends in the same state, and a replica that re-applies after a crash
//! does no harm. Validation that depends on other changes (a duplicate
//! audience, the stream limit, a stream deleted meanwhile) is repeated at
//! apply time and answered with [`ControlOutcome::Conflict`], so two instances
//! racing each other are decided by log order, the same way everywhere.
//!
//! Embedded (one instance): [`LocalControl`] applies at once, the
//! [`Outbox`] is the [`SetRouter`], and every stream is [`Placement::Local`].

use std::sync::{Arc, OnceLock, Weak};

use caep_schemas::subject::SubjectId;
use serde::{Deserialize, Serialize};

use crate::outbox::{NewSet, Outbox};
use crate::receivers::Receiver;
use crate::registry::StreamRecord;
use crate::secrets::{SecretBox, SecretError};
use crate::service::{BoxFuture, Transmitter};
use crate::store::StoreError;

/// A control-plane change, replicated to every instance in order.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
// A change is built and moved once per control-plane operation, so its size
// is irrelevant, and the unboxed record is the agreed interface.
#[allow(clippy::large_enum_variant)]
pub enum ControlChange {
    /// A new receiver; `token_digest` is the hex SHA-256 of its bearer token
    /// (the token itself never leaves the originator).
    ReceiverCreated {
        receiver: Receiver,
        token_digest: String,
    },
    ReceiverDeleted {
        receiver_id: String,
    },
    /// Create, update, status change, verification time: the whole record.
    StreamPut {
        record: StreamRecord,
    },
    StreamDeleted {
        stream_id: String,
    },
    SubjectAdded {
        stream_id: String,
        subject: SubjectId,
    },
    SubjectRemoved {
        stream_id: String,
        subject: SubjectId,
    },
    /// Another instance's public JWKS, published beside ours.
    PeerKeys {
        instance_id: String,
        jwks: serde_json::Value,
    },
}

impl ControlChange {
    /// The change as it travels through a shared log: secrets sealed.
    pub fn sealed(self, secrets: &SecretBox) -> ControlChange {
        match self {
            ControlChange::StreamPut { record } => ControlChange::StreamPut { record: record.sealed(secrets) },
            other => other,
        }
    }

    /// The change as applied: secrets opened again.
    pub fn opened(self, secrets: &SecretBox) -> Result<ControlChange, SecretError> {
        Ok(match self {
            ControlChange::StreamPut { record } => ControlChange::StreamPut { record: record.opened(secrets)? },
            other => other,
        })
    }

    /// The change's kind, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ControlChange::ReceiverCreated { .. } => "receiver_created",
            ControlChange::ReceiverDeleted { .. } => "receiver_deleted",
            ControlChange::StreamPut { .. } => "stream_put",
            ControlChange::StreamDeleted { .. } => "stream_deleted",
            ControlChange::SubjectAdded { .. } => "subject_added",
            ControlChange::SubjectRemoved { .. } => "subject_removed",
            ControlChange::PeerKeys { .. } => "peer_keys",
        }
    }

    /// The key that orders changes about one thing (a Kafka partition key):
    /// changes about one receiver or stream must be applied in order.
    pub fn key(&self) -> &str {
        match self {
            ControlChange::ReceiverCreated { receiver, .. } => &receiver.receiver_id,
            ControlChange::ReceiverDeleted { receiver_id } => receiver_id,
            ControlChange::StreamPut { record } => &record.config.stream_id,
            ControlChange::StreamDeleted { stream_id }
            | ControlChange::SubjectAdded { stream_id, .. }
            | ControlChange::SubjectRemoved { stream_id, .. } => stream_id,
            ControlChange::PeerKeys { instance_id, .. } => instance_id,
        }
    }
}

/// What applying a change did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ControlOutcome {
    Applied,
    /// The change was refused by the state it met (e.g. a duplicate audience
    /// from a concurrent create at two instances), decided at apply time.
    Conflict(String),
}

/// Where control changes go to be applied on every instance.
pub trait ControlLog: Send + Sync {
    /// Resolves once `change` has been applied to THIS instance's local
    /// state (read-your-writes), with the outcome of applying it.
    fn record(&self, change: ControlChange) -> BoxFuture<'_, Result<ControlOutcome, StoreError>>;
}

/// Where signed SETs go to be delivered: the local outbox (embedded) or a
/// shared log that routes each stream's SETs to the instance delivering that
/// stream.
pub trait SetRouter: Send + Sync {
    fn enqueue(&self, sets: Vec<NewSet>) -> BoxFuture<'_, Result<(), StoreError>>;
}

impl SetRouter for Outbox {
    fn enqueue(&self, sets: Vec<NewSet>) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(Outbox::enqueue(self, sets))
    }
}

/// Which instance serves a stream's polls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    Local,
    /// Another instance, reachable at `base_url` (scheme and authority,
    /// without the path: the request's own path is appended).
    Remote {
        base_url: String,
    },
    /// Nobody owns the stream right now (e.g. a rebalance): try again soon.
    Unknown,
}

/// Which instance serves each stream.
pub trait StreamPlacement: Send + Sync {
    fn place(&self, stream_id: &str) -> Placement;

    /// Resolves once this instance holds every SET routed to the stream
    /// before the call (a poll or an announcement check then sees them); at
    /// once where SETs never travel (embedded) or the stream is not served here.
    fn caught_up<'a>(&'a self, _stream_id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// The embedded placement: this instance serves every stream.
pub struct AllLocal;

impl StreamPlacement for AllLocal {
    fn place(&self, _: &str) -> Placement {
        Placement::Local
    }
}

/// The replicated parts a scaled-out transmitter is built with.
pub struct Cluster {
    pub control: Arc<dyn ControlLog>,
    pub router: Arc<dyn SetRouter>,
    pub placement: Arc<dyn StreamPlacement>,
}

/// The embedded control log: applies each change to this transmitter at
/// once. It holds the transmitter weakly because the transmitter holds it:
/// a strong reference would keep both alive forever.
#[derive(Default)]
pub struct LocalControl {
    transmitter: OnceLock<Weak<Transmitter>>,
}

impl LocalControl {
    /// A log not yet bound; [`Transmitter::open`] binds it.
    pub fn new() -> Self {
        LocalControl::default()
    }

    /// Binds the log to the transmitter it applies to (once; later calls do
    /// nothing, since a log applying to two transmitters would be a bug).
    pub fn bind(&self, transmitter: &Arc<Transmitter>) {
        if self.transmitter.set(Arc::downgrade(transmitter)).is_err() {
            tracing::warn!("local control log bound twice; keeping the first transmitter");
        }
    }
}

impl ControlLog for LocalControl {
    fn record(&self, change: ControlChange) -> BoxFuture<'_, Result<ControlOutcome, StoreError>> {
        Box::pin(async move {
            let transmitter =
                self.transmitter.get().and_then(Weak::upgrade).ok_or_else(|| {
                    StoreError::storage("the transmitter is gone (control log not bound or shut down)")
                })?;
            transmitter.apply_control(change).await
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use axum::http::{HeaderMap, StatusCode};
    use caep_schemas::event::StreamStatus;
    use caep_schemas::jose::{Algorithm, SigningKey};
    use serde_json::{Value, json};

    use super::*;
    use crate::keys::KeyStore;
    use crate::receivers::SCOPE_READ;
    use crate::service::{TransmitterSettings, open_in};

    fn open(dir: &std::path::Path, issuer: &str) -> Arc<Transmitter> {
        let keys = Arc::new(KeyStore::open(dir, Algorithm::Es256).expect("keys"));
        open_in(dir, TransmitterSettings::new(issuer), keys).expect("open")
    }

    fn receiver(id: &str, audience: &str) -> Receiver {
        Receiver {
            receiver_id: id.into(),
            name: id.into(),
            audience: audience.into(),
            scopes: vec![SCOPE_READ.into()],
            created_at_ms: 7,
            issuers: None,
            all_subjects: false,
        }
    }

    fn created(id: &str, audience: &str) -> ControlChange {
        let token_digest = crate::receivers::token_digest_hex(&format!("token-of-{id}"));
        ControlChange::ReceiverCreated { receiver: receiver(id, audience), token_digest }
    }

    const POLL_BODY: &[u8] =
        br#"{"events_requested": ["https://schemas.openid.net/secevent/caep/event-type/session-revoked"]}"#;

    #[tokio::test]
    async fn every_change_applied_twice_is_harmless() {
        let dir = tempfile::tempdir().expect("temp dir");
        let transmitter = open(dir.path(), "https://hub.example");
        let apply = |change: ControlChange| {
            let transmitter = Arc::clone(&transmitter);
            async move {
                let first = transmitter.apply_control(change.clone()).await.expect("apply");
                let second = transmitter.apply_control(change).await.expect("apply again");
                assert_eq!(first, second, "same outcome when applied again");
                first
            }
        };
        assert_eq!(apply(created("r1", "https://rp.example")).await, ControlOutcome::Applied);
        let rp = transmitter.receivers().get("r1").expect("read").expect("created");
        assert_eq!(transmitter.receivers().authenticate("token-of-r1").expect("auth"), Some(rp.clone()));

        // The stream as the originator would have computed it.
        let stream = transmitter.create_stream(&rp, POLL_BODY).await.expect("create");
        let stream_id = stream.config.stream_id.clone();
        assert_eq!(apply(ControlChange::StreamPut { record: (*stream).clone() }).await, ControlOutcome::Applied);
        assert_eq!(transmitter.streams().owned_by("r1").len(), 1, "re-put is not a second stream");

        let subject = SubjectId::opaque("session-1");
        let added = ControlChange::SubjectAdded { stream_id: stream_id.clone(), subject: subject.clone() };
        assert_eq!(apply(added).await, ControlOutcome::Applied);
        assert_eq!(transmitter.streams().subject_count(&stream_id), 1);
        let removed = ControlChange::SubjectRemoved { stream_id: stream_id.clone(), subject };
        assert_eq!(apply(removed).await, ControlOutcome::Applied);
        assert_eq!(transmitter.streams().subject_count(&stream_id), 0);

        let mut disabled = (*stream).clone();
        disabled.status = StreamStatus::Disabled;
        assert_eq!(apply(ControlChange::StreamPut { record: disabled }).await, ControlOutcome::Applied);
        assert_eq!(transmitter.streams().get(&stream_id).expect("kept").status, StreamStatus::Disabled);

        assert_eq!(apply(ControlChange::StreamDeleted { stream_id: stream_id.clone() }).await, ControlOutcome::Applied);
        assert!(transmitter.streams().get(&stream_id).is_none());
        // A change ordered after the deletion does not bring the stream back.
        let late = ControlChange::StreamPut { record: (*stream).clone() };
        assert!(matches!(apply(late).await, ControlOutcome::Conflict(_)));
        assert!(transmitter.streams().get(&stream_id).is_none());
        let late_subject = ControlChange::SubjectAdded { stream_id, subject: SubjectId::opaque("s") };
        assert!(matches!(apply(late_subject).await, ControlOutcome::Conflict(_)));

        assert_eq!(apply(ControlChange::ReceiverDeleted { receiver_id: "r1".into() }).await, ControlOutcome::Applied);
        assert_eq!(transmitter.receivers().authenticate("token-of-r1").expect("auth"), None);
        // A stream for a receiver that is gone is refused, not orphaned.
        let orphan = transmitter.streams().all().len();
        let mut record = (*stream).clone();
        record.config.stream_id = "another".into();
        assert!(matches!(apply(ControlChange::StreamPut { record }).await, ControlOutcome::Conflict(_)));
        assert_eq!(transmitter.streams().all().len(), orphan);
    }

    #[tokio::test]
    async fn concurrent_creations_with_one_audience_conflict_the_same_way_everywhere() {
        // Two instances created a receiver for one audience at once; both
        // changes reach every instance in the same log order.
        let log = [created("from-a", "https://same.example"), created("from-b", "https://same.example")];
        let mut outcomes = Vec::new();
        for _ in 0..2 {
            let dir = tempfile::tempdir().expect("temp dir");
            let instance = open(dir.path(), "https://hub.example");
            let mut here = Vec::new();
            for change in &log {
                here.push(instance.apply_control(change.clone()).await.expect("apply"));
            }
            assert_eq!(instance.receivers().list().expect("list").len(), 1);
            assert_eq!(instance.receivers().authenticate("token-of-from-b").expect("auth"), None);
            outcomes.push(here);
        }
        assert_eq!(outcomes[0], outcomes[1], "decided the same on every instance");
        assert_eq!(outcomes[0][0], ControlOutcome::Applied);
        let ControlOutcome::Conflict(reason) = &outcomes[0][1] else { panic!("the later one must conflict") };
        assert!(reason.contains("https://same.example"), "{reason}");
    }

    #[tokio::test]
    async fn originators_record_through_the_log_and_read_their_writes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let transmitter = open(dir.path(), "https://hub.example");
        let (rp, _token) = transmitter
            .create_receiver(crate::receivers::ReceiverSpec::new("RP", "https://rp.example"))
            .await
            .expect("create");
        let duplicate =
            transmitter.create_receiver(crate::receivers::ReceiverSpec::new("RP2", "https://rp.example")).await;
        assert!(duplicate.is_err());
        let stream = transmitter.create_stream(&rp, POLL_BODY).await.expect("stream");
        let paused = transmitter.set_status(&stream, StreamStatus::Paused, None).await.expect("pause");
        assert_eq!(paused.status, StreamStatus::Paused);
        transmitter.delete_stream(&stream.config.stream_id).await.expect("delete");
        assert!(transmitter.set_status(&stream, StreamStatus::Enabled, None).await.is_err(), "gone");
        assert!(transmitter.delete_receiver(&rp.receiver_id).await.expect("delete"));
        assert!(!transmitter.delete_receiver(&rp.receiver_id).await.expect("delete"));
    }

    #[tokio::test]
    async fn peer_keys_are_published_after_ours_and_private_keys_are_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let transmitter = open(dir.path(), "https://hub.example");
        let own = transmitter.keys().jwks().kids().into_iter().map(str::to_owned).collect::<Vec<_>>();
        let peer = SigningKey::generate(Algorithm::Es256).expect("key");
        let change =
            ControlChange::PeerKeys { instance_id: "hub-2".into(), jwks: json!({"keys": [peer.public_jwk()]}) };
        assert_eq!(transmitter.apply_control(change.clone()).await.expect("apply"), ControlOutcome::Applied);
        assert_eq!(transmitter.apply_control(change).await.expect("apply"), ControlOutcome::Applied);
        let kids = transmitter.keys().jwks().kids().into_iter().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(kids, [own.clone(), vec![peer.kid().to_owned()]].concat(), "own keys first, peer once");

        let private: Value = serde_json::from_str(&peer.to_private_jwk_json()).expect("JSON");
        let refused = ControlChange::PeerKeys { instance_id: "hub-3".into(), jwks: json!({"keys": [private]}) };
        let outcome = transmitter.apply_control(refused).await.expect("apply");
        let ControlOutcome::Conflict(reason) = outcome else { panic!("a private key must be refused") };
        assert!(reason.contains("`d`") && !reason.contains(&peer.to_private_jwk_json()), "{reason}");
        let symmetric = json!({"keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0"}]});
        assert!(transmitter.keys().set_peer_keys("hub-4", &symmetric).is_err());
        let no_kid = json!({"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]});
        assert!(transmitter.keys().set_peer_keys("hub-4", &no_kid).is_err());
        assert_eq!(transmitter.keys().jwks().len(), own.len() + 1, "nothing refused is published");
        assert_eq!(transmitter.keys().public_jwks_json()["keys"].as_array().map(Vec::len), Some(own.len()));
    }

    /// A placement the test moves around.
    struct Movable(Mutex<Placement>);

    impl StreamPlacement for Movable {
        fn place(&self, _: &str) -> Placement {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
        }
    }

    async fn serve(router: axum::Router) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, router).await });
        addr
    }

    #[tokio::test]
    async fn polls_are_forwarded_to_the_instance_serving_the_stream() {
        // The "remote" instance: answers with what it was sent.
        let hits = Arc::new(Mutex::new(Vec::<(String, Option<String>, Option<String>, String)>::new()));
        let seen = Arc::clone(&hits);
        let remote = axum::Router::new().route(
            "/t/ssf/poll/{stream_id}",
            axum::routing::post(move |uri: axum::http::Uri, headers: HeaderMap, body: String| {
                let seen = Arc::clone(&seen);
                async move {
                    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
                    let hit = (uri.to_string(), header("authorization"), header("content-type"), body);
                    seen.lock().unwrap_or_else(|p| p.into_inner()).push(hit);
                    (StatusCode::ACCEPTED, [("content-type", "application/x-remote")], "from the remote")
                }
            }),
        );
        let remote_addr = serve(remote).await;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let dir = tempfile::tempdir().expect("temp dir");
        let store = crate::store::Store::open(&dir.path().join("db.redb")).expect("store");
        let keys = Arc::new(KeyStore::open(dir.path(), Algorithm::Es256).expect("keys"));
        let control = Arc::new(LocalControl::new());
        let placement = Arc::new(Movable(Mutex::new(Placement::Local)));
        let outbox_router: Arc<dyn SetRouter> = Arc::new(Outbox::new(store.clone(), Arc::new(crate::outbox::NoSink)));
        let cluster = Cluster { control: control.clone(), router: outbox_router, placement: placement.clone() };
        let transmitter = Transmitter::open(
            TransmitterSettings::new(&format!("http://{addr}/t")),
            store,
            keys,
            Arc::new(crate::outbox::NoSink),
            Arc::new(crate::service::NoHook),
            Some(cluster),
        )
        .expect("open");
        control.bind(&transmitter);
        let (rp, token) = transmitter
            .create_receiver(crate::receivers::ReceiverSpec::new("RP", "https://rp.example"))
            .await
            .expect("receiver");
        let stream_id = transmitter.create_stream(&rp, POLL_BODY).await.expect("stream").config.stream_id.clone();
        tokio::spawn(async move { axum::serve(listener, crate::http::router(transmitter)).await });

        let client = reqwest::Client::new();
        let admin = |path: &str| format!("http://{addr}/t{path}");
        let poll_url = admin(&format!("/ssf/poll/{stream_id}?x=1"));
        let poll = |token: Option<String>| {
            let mut request = client
                .post(&poll_url)
                .header("content-type", "application/json")
                .body(r#"{"returnImmediately": true}"#);
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            request.send()
        };

        let local = poll(Some(token.clone())).await.expect("poll");
        assert_eq!(local.status(), StatusCode::OK, "served here while local");

        *placement.0.lock().unwrap_or_else(|p| p.into_inner()) =
            Placement::Remote { base_url: format!("http://{remote_addr}/") };
        let forwarded = poll(Some(token.clone())).await.expect("poll");
        assert_eq!(forwarded.status(), StatusCode::ACCEPTED);
        assert_eq!(forwarded.headers()["content-type"], "application/x-remote");
        assert_eq!(forwarded.text().await.expect("body"), "from the remote");
        let sent = hits.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let expected_auth = format!("Bearer {token}");
        assert_eq!(
            sent,
            vec![(
                format!("/t/ssf/poll/{stream_id}?x=1"),
                Some(expected_auth),
                Some("application/json".to_owned()),
                r#"{"returnImmediately": true}"#.to_owned()
            )]
        );

        let refused = poll(Some("ssf_forged".into())).await.expect("poll");
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(poll(None).await.expect("poll").status(), StatusCode::UNAUTHORIZED);
        assert_eq!(hits.lock().unwrap_or_else(|p| p.into_inner()).len(), 1, "unauthenticated polls never forwarded");

        *placement.0.lock().unwrap_or_else(|p| p.into_inner()) = Placement::Unknown;
        let unknown = poll(Some(token)).await.expect("poll");
        assert_eq!(unknown.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(unknown.headers()["retry-after"], "1");
        let body: Value = unknown.json().await.expect("JSON error");
        assert_eq!(body["err"], "temporarily_unavailable");
    }
}
