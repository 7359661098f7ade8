//! RFC 8935 push delivery: an axum [`Router`] that receives SETs, verifies
//! them and hands them to the application.
//!
//! Answers, exactly as RFC 8935 §2 asks:
//!
//! | situation | answer |
//! |---|---|
//! | verified and handled, or a copy of one already handled | 202, empty body |
//! | `Authorization` missing or not the expected value | 400 `authentication_failed` |
//! | `Content-Type` not `application/secevent+jwt`, body too large or not a token | 400 `invalid_request` |
//! | JOSE, profile or claim failure | 400 with [`VerifyError::rfc8935_err`] |
//! | handler error, keys unreachable, a copy being handled concurrently | 503 (the transmitter retries) |
//!
//! RFC 8935 §2.3 would allow 401 for an authentication failure; the SDK
//! answers 400 with `err: authentication_failed` so every refusal has the
//! same shape and the transmitter dead-letters it with a code.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::error::truncate;
use crate::event::ReceivedEvent;
use crate::handler::EventHandler;
use crate::verify::{SetVerifier, VerifyError};

/// Largest push body accepted. A SET is a few hundred bytes to a few KiB.
pub const MAX_PUSH_BODY: usize = 64 * 1024;
/// The media type of a pushed SET (RFC 8417 §2.3, RFC 8935 §2).
pub const SET_MEDIA_TYPE: &str = "application/secevent+jwt";
/// Seconds a transmitter is asked to wait before retrying after a 503.
const RETRY_AFTER_SECS: &str = "1";

struct PushState<H> {
    verifier: Arc<SetVerifier>,
    expected_authorization: Option<[u8; 32]>,
    handler: H,
}

/// A router answering RFC 8935 pushes at `/` (nest it where the stream's
/// `endpoint_url` points).
///
/// `expected_authorization` is the exact `Authorization` header value the
/// stream was configured with (`delivery.authorization_header`); `None`
/// accepts pushes without one (only sensible behind another authenticating
/// layer, since anyone can then post SETs, although none will verify unless
/// the transmitter signed it for this audience).
///
/// For a stream managed through a [`Receiver`](crate::Receiver), use
/// [`Receiver::push_router`](crate::Receiver::push_router), which also
/// completes [`Receiver::verify_stream`](crate::Receiver::verify_stream).
///
/// ```no_run
/// use std::sync::Arc;
/// use caep_receiver::jwks::JwksCache;
/// use caep_receiver::verify::SetVerifier;
/// use caep_receiver::{HandlerError, ReceivedEvent, push_router};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let jwks = JwksCache::new(reqwest::Client::new(), "https://hub.example.com/ssf/jwks.json".into());
/// let verifier = Arc::new(SetVerifier::new("https://hub.example.com", "https://rp.example.com", jwks));
/// let router = push_router(verifier, Some("Bearer push-secret".into()), |event: ReceivedEvent| async move {
///     tracing::info!(event = event.event_type(), jti = event.jti(), "SET received");
///     Ok::<(), HandlerError>(())
/// });
/// let app = axum::Router::new().nest("/caep/events", router);
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8443").await?;
/// axum::serve(listener, app).await?;
/// # Ok(()) }
/// ```
pub fn push_router<H: EventHandler>(
    verifier: Arc<SetVerifier>,
    expected_authorization: Option<String>,
    handler: H,
) -> Router {
    // Keep only a digest of the secret: comparing fixed-size digests in
    // constant time reveals neither the value nor its length.
    let expected_authorization = expected_authorization.map(|value| digest(value.as_bytes()));
    let state = Arc::new(PushState { verifier, expected_authorization, handler });
    Router::new().route("/", post(receive::<H>)).layer(DefaultBodyLimit::max(MAX_PUSH_BODY)).with_state(state)
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Compares two digests without an early exit.
fn same_digest(left: &[u8; 32], right: &[u8; 32]) -> bool {
    left.iter().zip(right).fold(0u8, |acc, (l, r)| acc | (l ^ r)) == 0
}

/// An RFC 8935 §2.4 error answer.
fn refuse(err: &'static str, description: impl Into<String>) -> Response {
    let body = json!({"err": err, "description": truncate(&description.into())});
    (StatusCode::BAD_REQUEST, [(header::CACHE_CONTROL, "no-store")], axum::Json(body)).into_response()
}

/// "Not now": the transmitter keeps the SET and retries.
fn unavailable() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS))])
        .into_response()
}

fn is_set_media_type(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|media_type| media_type.trim().eq_ignore_ascii_case(SET_MEDIA_TYPE))
}

async fn receive<H: EventHandler>(
    State(state): State<Arc<PushState<H>>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    // Authentication first: nothing else is worth the effort for a caller
    // that cannot show the stream's secret.
    if let Some(expected) = &state.expected_authorization {
        match headers.get(header::AUTHORIZATION) {
            None => {
                tracing::info!(err = "authentication_failed", "push without Authorization refused");
                return refuse("authentication_failed", "the Authorization header is missing");
            }
            Some(presented) if !same_digest(&digest(presented.as_bytes()), expected) => {
                tracing::info!(err = "authentication_failed", "push with a wrong Authorization refused");
                return refuse("authentication_failed", "the Authorization header is not the expected one");
            }
            Some(_) => {}
        }
    }
    if !is_set_media_type(&headers) {
        return refuse("invalid_request", format!("the Content-Type must be {SET_MEDIA_TYPE}"));
    }
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return refuse("invalid_request", rejection.body_text()),
    };
    let Ok(token) = std::str::from_utf8(&body) else {
        return refuse("invalid_request", "the body is not UTF-8");
    };
    let token = token.trim();
    let verified = match state.verifier.verify(token).await {
        Ok(verified) => verified,
        Err(error) => return answer_error(&error),
    };
    let jti = verified.set.jti.clone();
    if verified.duplicate {
        return StatusCode::ACCEPTED.into_response();
    }
    let event = ReceivedEvent::new(verified.set.clone(), token.to_owned());
    let event_type = event.event_type().to_owned();
    match state.handler.handle(event).await {
        Ok(()) => {
            verified.accept();
            tracing::debug!(jti, event = %event_type, "pushed SET accepted");
            StatusCode::ACCEPTED.into_response()
        }
        Err(error) => {
            // Dropping `verified` releases the jti, so the retry is handled.
            tracing::warn!(jti, event = %event_type, %error, "handler failed; asking the transmitter to retry");
            unavailable()
        }
    }
}

fn answer_error(error: &VerifyError) -> Response {
    if error.is_transient() {
        tracing::warn!(%error, "SET cannot be verified now; asking the transmitter to retry");
        return unavailable();
    }
    let err = error.rfc8935_err();
    tracing::info!(err, %error, "pushed SET refused");
    refuse(err, error.description())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_type_ignores_case_and_parameters() {
        let mut headers = HeaderMap::new();
        assert!(!is_set_media_type(&headers));
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("Application/SecEvent+JWT; charset=utf-8"));
        assert!(is_set_media_type(&headers));
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/jwt"));
        assert!(!is_set_media_type(&headers));
    }

    #[test]
    fn digests_compare_exactly() {
        assert!(same_digest(&digest(b"Bearer a"), &digest(b"Bearer a")));
        assert!(!same_digest(&digest(b"Bearer a"), &digest(b"Bearer b")));
    }
}
