//! Small HTTP helpers shared by the JWKS cache, the stream client and the poll
//! loop: bounded body reads and the mapping of error answers.

use std::time::Duration;

use reqwest::header::RETRY_AFTER;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{ReceiverError, truncate};

/// Reads at most `limit` bytes of a response body; more is an error. The
/// `Content-Length` is checked first so an honest oversized answer is refused
/// without reading it, and the running count catches a dishonest one.
pub(crate) async fn read_limited(
    url: &str,
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, ReceiverError> {
    if response.content_length().is_some_and(|length| length > limit as u64) {
        return Err(ReceiverError::BodyTooLarge { url: url.to_owned(), limit });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|source| ReceiverError::transport(url, source))? {
        if body.len() + chunk.len() > limit {
            return Err(ReceiverError::BodyTooLarge { url: url.to_owned(), limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Turns a non-success response into [`ReceiverError::Status`], reading the
/// `{"err", "description"}` body the SSF and RFC 8935/8936 endpoints send.
pub(crate) async fn status_error(url: &str, response: reqwest::Response) -> ReceiverError {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    // An error body is small; a large one is not worth reading.
    let body = read_limited(url, response, 16 * 1024).await.unwrap_or_default();
    let parsed = serde_json::from_slice::<Value>(&body).ok();
    let member = |name: &str| parsed.as_ref().and_then(|body| body.get(name)).and_then(Value::as_str).map(truncate);
    ReceiverError::Status {
        url: url.to_owned(),
        status,
        err: member("err"),
        description: member("description"),
        retry_after,
    }
}

/// Sends `request`, checks for a success status, and parses a JSON body of at
/// most `limit` bytes.
pub(crate) async fn send_json<T: DeserializeOwned>(
    url: &str,
    request: reqwest::RequestBuilder,
    limit: usize,
) -> Result<T, ReceiverError> {
    let response = send(url, request).await?;
    let body = read_limited(url, response, limit).await?;
    serde_json::from_slice(&body).map_err(|error| ReceiverError::invalid_response(url, error.to_string()))
}

/// Sends `request` and checks for a success status; the body is left unread.
pub(crate) async fn send(url: &str, request: reqwest::RequestBuilder) -> Result<reqwest::Response, ReceiverError> {
    let response = request.send().await.map_err(|source| ReceiverError::transport(url, source))?;
    if response.status().is_success() { Ok(response) } else { Err(status_error(url, response).await) }
}
