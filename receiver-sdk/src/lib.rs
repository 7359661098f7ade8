#![forbid(unsafe_code)]
#![deny(missing_docs)]
//! The relying party's SDK for caep-hub (and any SSF 1.0 transmitter):
//! verify Security Event Tokens as strictly as the standards ask, receive
//! them by push (RFC 8935) or poll (RFC 8936), manage streams, and report
//! which agent sessions reached you.
//!
//! # In a few lines
//!
//! ```no_run
//! use std::time::Duration;
//! use caep_receiver::{HandlerError, ReceivedEvent, Receiver, Signal, StreamRequest};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // 1. Discover the hub: metadata, JWKS, the verifier for its SETs.
//! let receiver = Receiver::discover("https://hub.example.com", "https://rp.example.com", "receiver-token").await?;
//!
//! // 2. Serve push: every SET is verified before the handler sees it.
//! let router = receiver.push_router(Some("Bearer push-secret".into()), |event: ReceivedEvent| async move {
//!     if let Signal::SessionRevoked { session: Some(session), txn, .. } = event.signal() {
//!         tracing::info!(session, txn, "ending the agent session");
//!     }
//!     Ok::<(), HandlerError>(())
//! });
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:8443").await?;
//! tokio::spawn(async move { axum::serve(listener, router).await });
//!
//! // 3. Subscribe, prove the delivery path works, report a touch.
//! let request = StreamRequest::push("https://rp.example.com:8443/", Some("Bearer push-secret".into())).all_events();
//! let stream = receiver.create_stream(&request).await?;
//! receiver.verify_stream(&stream.stream_id, Duration::from_secs(10)).await?;
//! receiver.touch(&stream.stream_id, "agent-session-42").await?;
//! # Ok(()) }
//! ```
//!
//! # Parts
//!
//! - [`Receiver`] ([`client`]): discovery, stream management (create, read,
//!   update, replace, delete, status, subjects), [`Receiver::touch`] and
//!   [`Receiver::verify_stream`].
//! - [`push_router`] ([`push`]): the RFC 8935 endpoint as an axum router.
//! - [`PollLoop`] ([`poll`]): the RFC 8936 client loop.
//! - [`SetVerifier`] ([`verify`]), [`JwksCache`] ([`jwks`]), [`ReplayCache`]
//!   ([`replay`]): verification, usable on their own.
//! - [`EventHandler`], [`ReceivedEvent`], [`Signal`]: what the application
//!   writes and receives.
//! - [`Revocations`] ([`revocations`]): the sessions and users to stop
//!   honouring, fed by verified SETs, optionally on disk; and
//!   [`guard::EnforceLayer`], the tower layer that refuses their requests and
//!   reports each new agent session as a touch.
//!
//! # What "verified" means
//!
//! A SET reaches a handler only if its JWS signature verifies with a key of
//! the transmitter's JWKS, named by `kid`, whose algorithm (ES256, RS256 or
//! EdDSA) matches the header's — so `alg: none` and HMAC tokens never pass —
//! with header `typ: secevent+jwt`; its claims follow the SSF profile
//! (`iss`, `aud`, `jti`, `iat`, `sub_id`, exactly one event, no `sub` or
//! `exp`); `iss` is the transmitter's issuer, `aud` names this receiver, and
//! `iat` is not more than 60 s in the future. A `jti` already accepted is
//! answered as accepted without calling the handler again.

pub mod client;
pub mod error;
pub mod event;
pub mod guard;
pub mod handler;
mod http;
pub mod jwks;
pub mod poll;
pub mod push;
pub mod replay;
pub mod revocations;
pub mod sidecar;
pub mod streams;
pub mod verify;

pub use client::{Receiver, VerificationTap};
pub use error::ReceiverError;
pub use event::{ReceivedEvent, Signal};
pub use handler::{EventHandler, HandlerError};
pub use jwks::JwksCache;
pub use poll::PollLoop;
pub use push::push_router;
pub use replay::ReplayCache;
pub use revocations::Revocations;
pub use streams::{StreamConfiguration, StreamRequest, StreamStatusInfo, TransmitterMetadata};
pub use verify::{SetVerifier, Verified, VerifyError};
