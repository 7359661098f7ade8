//! The one typed error of the transmitter's HTTP edge (stream management,
//! status, subjects, verification, poll) and how it becomes a response.
//!
//! Every response carries `Cache-Control: no-store`, because SSF 1.0 §8.1
//! answers management calls with it and an error about a stream is no more
//! cacheable than the stream itself. The body is `{"err", "description"}`,
//! the shape RFC 8935 §2.4 uses, so receivers parse one error format from the
//! hub. Authentication errors follow RFC 6750 §3 (`WWW-Authenticate: Bearer`).

use axum::Json;
use axum::http::header::{CACHE_CONTROL, RETRY_AFTER, WWW_AUTHENTICATE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// The realm named in every `WWW-Authenticate` challenge.
pub const REALM: &str = "ssf";

/// What went wrong with a request to the transmitter, as the receiver may
/// learn it. Internal detail lives only in [`SsfError::Storage`] and is
/// logged, never answered.
#[derive(Debug, thiserror::Error)]
pub enum SsfError {
    /// 400: the body cannot be parsed or breaks a rule of the spec; the text
    /// tells the receiver which.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// 401: no bearer token, or one the transmitter does not accept.
    #[error("authentication failed")]
    Unauthorized {
        /// A token was presented but is not valid. RFC 6750 §3.1 adds
        /// `error="invalid_token"` only then: a request without credentials
        /// gets a bare challenge.
        invalid_token: bool,
    },
    /// 403: the token is valid but lacks the scope the operation needs.
    #[error("access denied: scope `{scope}` required")]
    Forbidden {
        /// The scope the operation needs (e.g. `ssf.manage`).
        scope: &'static str,
    },
    /// 404: no such stream for this receiver. Also the answer for another
    /// receiver's stream, so that stream ids reveal nothing about existence.
    #[error("not found")]
    NotFound,
    /// 409: the request conflicts with the current state (e.g. a second
    /// stream where only one per receiver is allowed, SSF 1.0 §8.1.1.1).
    #[error("conflict: {0}")]
    Conflict(String),
    /// 429: too many requests (e.g. verification more often than
    /// `min_verification_interval`).
    #[error("too many requests; retry after {retry_after_secs} s")]
    TooManyRequests {
        /// Seconds until a retry may succeed, sent as `Retry-After`.
        retry_after_secs: u64,
    },
    /// 500: storage failed. The detail is logged; the receiver gets a
    /// generic description, since paths and database errors are internals.
    #[error("storage error: {0}")]
    Storage(String),
    /// 413: the request body is larger than the transmitter accepts.
    #[error("payload too large")]
    PayloadTooLarge,
    /// 503: no instance serves the stream right now (scale-out: its
    /// delivery is moving between instances), or the one that does cannot
    /// be reached. Sent with `Retry-After`.
    #[error("temporarily unavailable; retry after {retry_after_secs} s")]
    Unavailable {
        /// Seconds until a retry may succeed, sent as `Retry-After`.
        retry_after_secs: u64,
    },
}

/// The JSON body of every error response.
#[derive(Serialize)]
struct ErrorBody {
    err: &'static str,
    description: String,
}

impl SsfError {
    /// The HTTP status of the response.
    pub fn status(&self) -> StatusCode {
        match self {
            SsfError::BadRequest(_) => StatusCode::BAD_REQUEST,
            SsfError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            SsfError::Forbidden { .. } => StatusCode::FORBIDDEN,
            SsfError::NotFound => StatusCode::NOT_FOUND,
            SsfError::Conflict(_) => StatusCode::CONFLICT,
            SsfError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            SsfError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
            SsfError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            SsfError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `err` code of the response body.
    pub fn code(&self) -> &'static str {
        match self {
            // An oversized body is a malformed request as far as the
            // receiver's error handling goes; the status says which kind.
            SsfError::BadRequest(_) | SsfError::PayloadTooLarge => "invalid_request",
            SsfError::Unauthorized { .. } => "authentication_failed",
            SsfError::Forbidden { .. } => "access_denied",
            SsfError::NotFound => "not_found",
            SsfError::Conflict(_) => "conflict",
            SsfError::TooManyRequests { .. } => "too_many_requests",
            SsfError::Storage(_) => "server_error",
            SsfError::Unavailable { .. } => "temporarily_unavailable",
        }
    }

    /// The `description` of the response body: safe to show the receiver.
    pub fn description(&self) -> String {
        match self {
            SsfError::BadRequest(text) | SsfError::Conflict(text) => text.clone(),
            SsfError::Unauthorized { invalid_token: false } => "a bearer token is required".into(),
            SsfError::Unauthorized { invalid_token: true } => "the bearer token is invalid".into(),
            SsfError::Forbidden { scope } => format!("the token lacks the scope `{scope}`"),
            SsfError::NotFound => "no such stream".into(),
            SsfError::TooManyRequests { retry_after_secs } => {
                format!("too many requests; retry after {retry_after_secs} seconds")
            }
            SsfError::Storage(_) => "internal server error".into(),
            SsfError::PayloadTooLarge => "the request body is too large".into(),
            SsfError::Unavailable { retry_after_secs } => {
                format!("the stream is not being served right now; retry after {retry_after_secs} seconds")
            }
        }
    }

    /// The `WWW-Authenticate` challenge, for the variants that carry one.
    fn challenge(&self) -> Option<String> {
        match self {
            SsfError::Unauthorized { invalid_token: false } => Some(format!("Bearer realm=\"{REALM}\"")),
            SsfError::Unauthorized { invalid_token: true } => {
                Some(format!("Bearer realm=\"{REALM}\", error=\"invalid_token\""))
            }
            SsfError::Forbidden { scope } => {
                Some(format!("Bearer realm=\"{REALM}\", error=\"insufficient_scope\", scope=\"{scope}\""))
            }
            _ => None,
        }
    }
}

impl IntoResponse for SsfError {
    fn into_response(self) -> Response {
        if let SsfError::Storage(detail) = &self {
            tracing::error!(detail = %detail, "storage error while serving an SSF request");
        }
        let body = ErrorBody { err: self.code(), description: self.description() };
        let mut response = (self.status(), Json(body)).into_response();
        let headers = response.headers_mut();
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        // The scope is a compile-time constant of ours, so the value is
        // always valid; should one ever not be, the status still tells the
        // receiver what happened, which beats failing the response.
        if let Some(challenge) = self.challenge().and_then(|c| HeaderValue::try_from(c).ok()) {
            headers.insert(WWW_AUTHENTICATE, challenge);
        }
        if let SsfError::TooManyRequests { retry_after_secs } | SsfError::Unavailable { retry_after_secs } = self {
            headers.insert(RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::to_bytes;
    use serde_json::{Value, json};

    /// Status, headers of interest and parsed body of `error`'s response.
    async fn render(error: SsfError) -> (StatusCode, axum::http::HeaderMap, Value) {
        let response = error.into_response();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = to_bytes(response.into_body(), 64 * 1024).await.expect("body fits");
        let body = serde_json::from_slice(&bytes).expect("body is JSON");
        (status, headers, body)
    }

    fn header(headers: &axum::http::HeaderMap, name: axum::http::HeaderName) -> Option<&str> {
        headers.get(name).map(|v| v.to_str().expect("ASCII header"))
    }

    #[tokio::test]
    async fn bad_request_is_400_invalid_request_with_the_reason() {
        let (status, headers, body) = render(SsfError::BadRequest("`delivery` must be an object".into())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body, json!({"err": "invalid_request", "description": "`delivery` must be an object"}));
        assert_eq!(header(&headers, CACHE_CONTROL), Some("no-store"));
        assert_eq!(header(&headers, axum::http::header::CONTENT_TYPE), Some("application/json"));
        assert_eq!(header(&headers, WWW_AUTHENTICATE), None);
    }

    #[tokio::test]
    async fn missing_token_gets_a_bare_bearer_challenge() {
        let (status, headers, body) = render(SsfError::Unauthorized { invalid_token: false }).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(header(&headers, WWW_AUTHENTICATE), Some("Bearer realm=\"ssf\""));
        assert_eq!(header(&headers, CACHE_CONTROL), Some("no-store"));
        assert_eq!(body["err"], "authentication_failed");
        assert_eq!(body["description"], "a bearer token is required");
    }

    #[tokio::test]
    async fn invalid_token_names_invalid_token_in_the_challenge() {
        let (status, headers, body) = render(SsfError::Unauthorized { invalid_token: true }).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(header(&headers, WWW_AUTHENTICATE), Some("Bearer realm=\"ssf\", error=\"invalid_token\""));
        assert_eq!(header(&headers, CACHE_CONTROL), Some("no-store"));
        assert_eq!(body["err"], "authentication_failed");
    }

    #[tokio::test]
    async fn forbidden_names_the_missing_scope() {
        let (status, headers, body) = render(SsfError::Forbidden { scope: "ssf.manage" }).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(
            header(&headers, WWW_AUTHENTICATE),
            Some("Bearer realm=\"ssf\", error=\"insufficient_scope\", scope=\"ssf.manage\"")
        );
        assert_eq!(header(&headers, CACHE_CONTROL), Some("no-store"));
        assert_eq!(body, json!({"err": "access_denied", "description": "the token lacks the scope `ssf.manage`"}));
    }

    #[tokio::test]
    async fn not_found_says_only_no_such_stream() {
        let (status, headers, body) = render(SsfError::NotFound).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body, json!({"err": "not_found", "description": "no such stream"}));
        assert_eq!(header(&headers, CACHE_CONTROL), Some("no-store"));
        assert_eq!(header(&headers, WWW_AUTHENTICATE), None);
    }

    #[tokio::test]
    async fn conflict_is_409_with_the_reason() {
        let (status, headers, body) = render(SsfError::Conflict("a stream already exists".into())).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(body, json!({"err": "conflict", "description": "a stream already exists"}));
        assert_eq!(header(&headers, CACHE_CONTROL), Some("no-store"));
    }

    #[tokio::test]
    async fn too_many_requests_sends_retry_after() {
        let (status, headers, body) = render(SsfError::TooManyRequests { retry_after_secs: 17 }).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(header(&headers, RETRY_AFTER), Some("17"));
        assert_eq!(header(&headers, CACHE_CONTROL), Some("no-store"));
        assert_eq!(body["err"], "too_many_requests");
        assert_eq!(body["description"], "too many requests; retry after 17 seconds");
    }

    #[tokio::test]
    async fn storage_errors_never_leak_their_detail() {
        let detail = "redb: cannot open /var/lib/caep-hub/streams.redb: permission denied";
        let error = SsfError::Storage(detail.into());
        // The detail stays available to logs through Display.
        assert!(error.to_string().contains("permission denied"));
        let response = error.into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(header(response.headers(), CACHE_CONTROL), Some("no-store"));
        let bytes = to_bytes(response.into_body(), 64 * 1024).await.expect("body fits");
        let text = String::from_utf8(bytes.to_vec()).expect("UTF-8");
        assert!(!text.contains("redb") && !text.contains("/var/lib"), "leaked: {text}");
        let body: Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(body, json!({"err": "server_error", "description": "internal server error"}));
    }

    #[tokio::test]
    async fn payload_too_large_is_413() {
        let (status, headers, body) = render(SsfError::PayloadTooLarge).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(body, json!({"err": "invalid_request", "description": "the request body is too large"}));
        assert_eq!(header(&headers, CACHE_CONTROL), Some("no-store"));
    }
}
