//! The crate's one error type, [`ReceiverError`].
//!
//! Messages never contain the receiver's bearer token or push secret: URLs and
//! the transmitter's own `err`/`description` are the only peer-supplied text
//! they carry, truncated.

use std::time::Duration;

/// Longest piece of peer-supplied text kept in an error.
const MAX_PEER_TEXT: usize = 256;

/// Everything that can go wrong talking to a transmitter, fetching keys or
/// running a delivery loop.
///
/// Verification failures of individual SETs are not errors of this type: they
/// are answered to the transmitter (RFC 8935 `err`, RFC 8936 `setErrs`) and
/// described by [`VerifyError`](crate::verify::VerifyError).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiverError {
    /// The request could not be sent or its response not read (connection
    /// refused, DNS, TLS, timeout).
    #[error("HTTP request to {url} failed: {source}")]
    Transport {
        /// The URL requested.
        url: String,
        /// The client's error.
        #[source]
        source: reqwest::Error,
    },
    /// The transmitter answered with an error status. `err` and `description`
    /// come from its JSON body (`{"err", "description"}`) when it had one.
    #[error("{url} answered {status}{}", describe(.err, .description))]
    Status {
        /// The URL requested.
        url: String,
        /// The HTTP status code.
        status: u16,
        /// The body's `err` code, if any.
        err: Option<String>,
        /// The body's `description`, if any.
        description: Option<String>,
        /// `Retry-After` in seconds (429 and 503), if sent.
        retry_after: Option<Duration>,
    },
    /// A response body was larger than the SDK accepts from that endpoint.
    #[error("the response from {url} is larger than {limit} bytes")]
    BodyTooLarge {
        /// The URL requested.
        url: String,
        /// The limit, in bytes.
        limit: usize,
    },
    /// A response body did not have the expected shape.
    #[error("unexpected response from {url}: {reason}")]
    InvalidResponse {
        /// The URL requested.
        url: String,
        /// What was wrong with it.
        reason: String,
    },
    /// No keys are cached and the last fetch of the JWKS failed too recently
    /// to try again (see [`JwksCache::get`](crate::jwks::JwksCache::get)).
    #[error("the JWKS at {url} is unavailable (the last fetch failed moments ago)")]
    JwksUnavailable {
        /// The `jwks_uri`.
        url: String,
    },
    /// A token names a key the cached JWKS lacks, and the JWKS was fetched
    /// too recently to fetch it again (see
    /// [`JwksCache::refresh_for_unknown_kid`](crate::jwks::JwksCache::refresh_for_unknown_kid)).
    #[error("unknown key; the JWKS at {url} may be fetched again in {retry_in:?}")]
    RefetchRateLimited {
        /// The `jwks_uri`.
        url: String,
        /// Time until a refetch is allowed.
        retry_in: Duration,
    },
    /// The transmitter's metadata names a different issuer than the one the
    /// receiver was configured with, so its SETs could not be trusted.
    #[error("the transmitter metadata names issuer `{found}`, expected `{expected}`")]
    IssuerMismatch {
        /// The issuer URL the receiver was given.
        expected: String,
        /// The `issuer` of the metadata document.
        found: String,
    },
    /// A setting or argument is unusable (a URL that does not parse, an
    /// endpoint the transmitter does not advertise, ...).
    #[error("configuration: {0}")]
    Config(String),
    /// No verification SET echoing our `state` arrived in time.
    #[error("no verification SET for stream {stream_id} arrived within {timeout:?}")]
    VerificationTimeout {
        /// The stream being verified.
        stream_id: String,
        /// How long we waited.
        timeout: Duration,
    },
}

impl ReceiverError {
    /// The HTTP status the transmitter answered, for [`ReceiverError::Status`].
    ///
    /// ```
    /// use caep_receiver::ReceiverError;
    /// let error = ReceiverError::Status {
    ///     url: "https://hub.example/ssf/streams".into(),
    ///     status: 404,
    ///     err: Some("not_found".into()),
    ///     description: None,
    ///     retry_after: None,
    /// };
    /// assert_eq!(error.status(), Some(404));
    /// assert_eq!(error.err_code(), Some("not_found"));
    /// ```
    pub fn status(&self) -> Option<u16> {
        match self {
            ReceiverError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The `err` code of the transmitter's error body, if it sent one.
    pub fn err_code(&self) -> Option<&str> {
        match self {
            ReceiverError::Status { err, .. } => err.as_deref(),
            _ => None,
        }
    }

    /// Whether retrying the same request later may succeed: transport
    /// failures, 429 and 5xx answers.
    pub fn is_transient(&self) -> bool {
        match self {
            ReceiverError::Transport { .. }
            | ReceiverError::JwksUnavailable { .. }
            | ReceiverError::RefetchRateLimited { .. } => true,
            ReceiverError::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }

    pub(crate) fn transport(url: &str, source: reqwest::Error) -> Self {
        // reqwest includes the URL in its message; strip it there so it is
        // not printed twice (and a URL with a query never leaks twice).
        ReceiverError::Transport { url: url.to_owned(), source: source.without_url() }
    }

    pub(crate) fn invalid_response(url: &str, reason: impl Into<String>) -> Self {
        ReceiverError::InvalidResponse { url: url.to_owned(), reason: truncate(&reason.into()) }
    }
}

fn describe(err: &Option<String>, description: &Option<String>) -> String {
    match (err, description) {
        (Some(err), Some(description)) => format!(" {err}: {description}"),
        (Some(err), None) => format!(" {err}"),
        (None, Some(description)) => format!(": {description}"),
        (None, None) => String::new(),
    }
}

/// Cuts peer-supplied text to a size that is safe to log.
pub(crate) fn truncate(text: &str) -> String {
    if text.chars().count() > MAX_PEER_TEXT {
        let mut cut: String = text.chars().take(MAX_PEER_TEXT).collect();
        cut.push('…');
        cut
    } else {
        text.to_owned()
    }
}
