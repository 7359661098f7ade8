//! RFC 8936 poll delivery: acknowledgements and errors first, then up to
//! `maxEvents` of the stream's unacknowledged SETs, waiting (long poll) for
//! some when there are none and the receiver did not ask to return at once.
//!
//! Unacknowledged SETs are returned again on the next poll (RFC 8936 §2.4):
//! a SET leaves the queue only by `ack` or `setErrs`.

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use caep_schemas::event::StreamStatus;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::SsfError;
use crate::outbox::{Failure, FailureTarget, now_ms};
use crate::queue::DeliveryQueue;
use crate::store::StoreError;

/// SETs returned when the request does not say `maxEvents`.
pub const DEFAULT_MAX_EVENTS: usize = 100;
/// The most SETs one response carries, whatever was asked.
pub const MAX_EVENTS_CAP: usize = 1000;

/// An RFC 8936 poll request body.
#[derive(Clone, Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PollRequest {
    #[serde(default)]
    pub max_events: Option<u32>,
    #[serde(default)]
    pub return_immediately: bool,
    #[serde(default)]
    pub ack: Vec<String>,
    #[serde(default)]
    pub set_errs: HashMap<String, SetErr>,
}

/// A receiver's error report for one SET (RFC 8936 §2.4.3).
#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
pub struct SetErr {
    pub err: String,
    #[serde(default)]
    pub description: String,
}

/// An RFC 8936 poll response body.
#[derive(Clone, Debug, Default, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PollResponse {
    /// `jti` → compact SET.
    #[schema(value_type = std::collections::HashMap<String, String>)]
    pub sets: Map<String, Value>,
    pub more_available: bool,
}

/// Parses a poll body; an empty body is a default poll.
pub fn parse_request(body: &[u8]) -> Result<PollRequest, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(PollRequest::default());
    }
    // Through Value first: serde would otherwise accept a JSON array as a struct.
    match serde_json::from_slice(body) {
        Ok(Value::Object(members)) => {
            serde_json::from_value(Value::Object(members)).map_err(|error| format!("poll request: {error}"))
        }
        Ok(_) => Err("poll request: the body must be a JSON object".into()),
        Err(error) => Err(format!("poll request: {error}")),
    }
}

impl PollRequest {
    /// Whether the poll may wait for SETs (not `returnImmediately`, and it
    /// asks for some).
    pub fn is_long_poll(&self) -> bool {
        !self.return_immediately && self.max_events != Some(0)
    }
}

/// Serves one poll of `stream_id`, waiting at most `long_poll` for SETs.
/// `status` is read again each time the poll wakes: a stream paused (or
/// gone) while the poll waits answers at once with nothing.
pub async fn poll(
    outbox: &dyn DeliveryQueue,
    stream_id: &str,
    status: &(dyn Fn() -> StreamStatus + Send + Sync),
    request: PollRequest,
    long_poll: Duration,
    stopping: impl std::future::Future<Output = ()>,
) -> Result<PollResponse, StoreError> {
    settle(outbox, stream_id, &request).await?;
    let mut stopping = std::pin::pin!(stopping);
    let max = request.max_events.map_or(DEFAULT_MAX_EVENTS, |m| m as usize).min(MAX_EVENTS_CAP);
    let waker = outbox.waker(stream_id);
    let deadline = tokio::time::Instant::now() + long_poll;
    loop {
        // Register interest before reading, so an enqueue (or a status
        // change, which wakes the stream too) between the read and the wait
        // still wakes this poll.
        let notified = waker.notified();
        let status = status();
        // Paused streams hold their SETs; an ack-only poll (maxEvents 0) asks for none.
        if max == 0 || status != StreamStatus::Enabled {
            let more_available = status == StreamStatus::Enabled && outbox.depth(stream_id)? > 0;
            return Ok(PollResponse { sets: Map::new(), more_available });
        }
        let pending = outbox.pending(stream_id, 0, max + 1)?;
        if !pending.is_empty() || request.return_immediately {
            let more_available = pending.len() > max;
            let sets = pending.into_iter().take(max).map(|p| (p.set.jti, Value::String(p.set.token))).collect();
            metrics::counter!("caep_poll_sets_served_total").increment(1);
            return Ok(PollResponse { sets, more_available });
        }
        tokio::select! {
            woken = tokio::time::timeout_at(deadline, notified) => {
                if woken.is_err() {
                    return Ok(PollResponse::default());
                }
            }
            () = &mut stopping => return Ok(PollResponse::default()),
        }
    }
}

/// Marks a poll this instance forwarded to the instance serving the stream;
/// that instance answers 503 rather than forward it again.
pub const FORWARDED_HEADER: &str = "x-caep-forwarded";

/// Forwards an authenticated poll as-is to the instance serving the stream
/// (`base_url` + the request's own path and query, same body, its
/// `Authorization` and `Content-Type`) and relays the status, `Content-Type`
/// and body. An unreachable instance answers 503 with `Retry-After`: the
/// stream's placement may be moving and a retry will find it. So does a
/// forward still waiting when `stopping` resolves (this instance stops).
pub async fn forward(
    client: &reqwest::Client,
    base_url: &str,
    path_and_query: &str,
    headers: &HeaderMap,
    body: Bytes,
    stopping: impl std::future::Future<Output = ()>,
) -> Result<Response, SsfError> {
    tokio::select! {
        relayed = relay(client, base_url, path_and_query, headers, body) => relayed,
        // This instance is stopping: the receiver polls again, wherever the
        // balancer sends it (its acks may not have reached the owner: it
        // sends them again, and acks are idempotent).
        () = stopping => Err(SsfError::Unavailable { retry_after_secs: 1 }),
    }
}

async fn relay(
    client: &reqwest::Client,
    base_url: &str,
    path_and_query: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, SsfError> {
    let url = format!("{}{path_and_query}", base_url.trim_end_matches('/'));
    let mut request = client.post(&url).header(FORWARDED_HEADER, "1").body(body);
    for name in [header::AUTHORIZATION, header::CONTENT_TYPE] {
        if let Some(value) = headers.get(&name) {
            request = request.header(name, value.clone());
        }
    }
    let unavailable = |error: reqwest::Error| {
        tracing::warn!(url = %url, %error, "forwarding a poll failed");
        SsfError::Unavailable { retry_after_secs: 1 }
    };
    let answer = request.send().await.map_err(unavailable)?;
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = answer.headers().get(header::CONTENT_TYPE).cloned();
    let body = answer.bytes().await.map_err(unavailable)?;
    let mut response = (status, body).into_response();
    match content_type {
        Some(value) => {
            response.headers_mut().insert(header::CONTENT_TYPE, value);
        }
        None => {
            response.headers_mut().remove(header::CONTENT_TYPE);
        }
    }
    Ok(response)
}

/// Applies `ack` and `setErrs`; only SETs of this stream are affected.
async fn settle(outbox: &dyn DeliveryQueue, stream_id: &str, request: &PollRequest) -> Result<(), StoreError> {
    if !request.ack.is_empty() {
        let acked_at = now_ms();
        for set in outbox.ack(stream_id, request.ack.clone()).await? {
            metrics::counter!("caep_deliveries_total", "method" => "poll", "outcome" => "delivered").increment(1);
            let latency = acked_at.saturating_sub(set.enqueued_at_ms) as f64 / 1000.0;
            metrics::histogram!("caep_delivery_latency_seconds", "method" => "poll").record(latency);
        }
    }
    if !request.set_errs.is_empty() {
        let failures = request
            .set_errs
            .iter()
            .map(|(jti, error)| Failure {
                target: FailureTarget::Jti(jti.clone()),
                err: error.err.clone(),
                description: error.description.clone(),
            })
            .collect();
        for _ in outbox.dead_letter(stream_id, failures).await? {
            metrics::counter!("caep_deliveries_total", "method" => "poll", "outcome" => "failed").increment(1);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{NewSet, Outbox};
    use crate::store::Store;
    use std::future::pending;
    use std::sync::Arc;

    fn open() -> (tempfile::TempDir, Arc<Outbox>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("db.redb")).expect("open");
        (dir, Arc::new(Outbox::new(store, Arc::new(crate::outbox::NoSink))))
    }

    fn sets(stream: &str, jtis: &[&str]) -> Vec<NewSet> {
        jtis.iter()
            .map(|jti| NewSet { stream_id: stream.into(), jti: (*jti).into(), token: format!("tok-{jti}"), txn: None })
            .collect()
    }

    fn immediate(max: u32, ack: &[&str]) -> PollRequest {
        PollRequest {
            max_events: Some(max),
            return_immediately: true,
            ack: ack.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        }
    }

    async fn run(outbox: &Outbox, stream: &str, request: PollRequest) -> PollResponse {
        poll(outbox, stream, &|| StreamStatus::Enabled, request, Duration::from_secs(5), pending()).await.expect("poll")
    }

    #[tokio::test]
    async fn unacknowledged_sets_come_back_and_acks_remove_them() {
        let (_dir, outbox) = open();
        outbox.enqueue(sets("s", &["a", "b", "c"])).await.expect("enqueue");
        let first = run(&outbox, "s", immediate(2, &[])).await;
        assert_eq!(first.sets.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert!(first.more_available);
        assert_eq!(first.sets["a"], Value::String("tok-a".into()));

        let again = run(&outbox, "s", immediate(2, &[])).await;
        assert_eq!(again, first, "not acknowledged, so sent again");

        let next = run(&outbox, "s", immediate(2, &["a", "b"])).await;
        assert_eq!(next.sets.keys().collect::<Vec<_>>(), ["c"]);
        assert!(!next.more_available);

        let ack_only = run(&outbox, "s", immediate(0, &["c"])).await;
        assert!(ack_only.sets.is_empty() && !ack_only.more_available);
        assert_eq!(outbox.depth("s").expect("depth"), 0);
    }

    #[tokio::test]
    async fn set_errs_dead_letter_only_this_streams_sets() {
        let (_dir, outbox) = open();
        outbox.enqueue(sets("mine", &["a"])).await.expect("enqueue");
        outbox.enqueue(sets("theirs", &["b"])).await.expect("enqueue");
        let mut request = immediate(10, &["b"]);
        request.set_errs.insert("a".into(), SetErr { err: "invalid_key".into(), description: "kid?".into() });
        request.set_errs.insert("b".into(), SetErr { err: "invalid_key".into(), description: String::new() });
        let response = run(&outbox, "mine", request).await;
        assert!(response.sets.is_empty());
        assert_eq!(outbox.dead_letters(Some("mine"), None, 10).expect("list").0[0].err, "invalid_key");
        assert_eq!(outbox.depth("theirs").expect("depth"), 1, "another stream's SET is untouched by ack or setErrs");
    }

    #[tokio::test]
    async fn long_poll_waits_for_the_next_set_and_times_out_empty() {
        let (_dir, outbox) = open();
        let waiting = {
            let outbox = Arc::clone(&outbox);
            tokio::spawn(async move {
                let request = PollRequest { max_events: Some(5), ..Default::default() };
                poll(outbox.as_ref(), "s", &|| StreamStatus::Enabled, request, Duration::from_secs(10), pending()).await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        outbox.enqueue(sets("s", &["late"])).await.expect("enqueue");
        let response = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("in time").expect("join");
        assert_eq!(response.expect("poll").sets.keys().collect::<Vec<_>>(), ["late"]);

        let started = std::time::Instant::now();
        let request = PollRequest { max_events: Some(5), ..Default::default() };
        let empty =
            poll(outbox.as_ref(), "other", &|| StreamStatus::Enabled, request, Duration::from_millis(200), pending())
                .await
                .expect("poll");
        assert!(empty.sets.is_empty());
        assert!(started.elapsed() >= Duration::from_millis(190), "waited for the long-poll bound");
    }

    #[tokio::test]
    async fn paused_streams_hold_their_sets() {
        let (_dir, outbox) = open();
        outbox.enqueue(sets("s", &["a"])).await.expect("enqueue");
        let held = poll(outbox.as_ref(), "s", &|| StreamStatus::Paused, immediate(5, &[]), Duration::ZERO, pending())
            .await
            .expect("poll");
        assert!(held.sets.is_empty() && !held.more_available);
        assert_eq!(run(&outbox, "s", immediate(5, &[])).await.sets.len(), 1, "delivered once enabled");
    }

    #[tokio::test]
    async fn a_stream_paused_while_a_poll_waits_answers_at_once_with_nothing() {
        let (_dir, outbox) = open();
        let status = Arc::new(std::sync::Mutex::new(StreamStatus::Enabled));
        let waiting = {
            let (outbox, status) = (Arc::clone(&outbox), Arc::clone(&status));
            tokio::spawn(async move {
                let request = PollRequest { max_events: Some(5), ..Default::default() };
                let current = move || *status.lock().expect("status");
                poll(outbox.as_ref(), "s", &current, request, Duration::from_secs(30), pending()).await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        *status.lock().expect("status") = StreamStatus::Paused;
        // A SET arrives for the paused stream: it wakes the poll, which must
        // not hand it out.
        outbox.enqueue(sets("s", &["held"])).await.expect("enqueue");
        let response = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("in time").expect("join");
        let response = response.expect("poll");
        assert!(response.sets.is_empty() && !response.more_available, "{response:?}");
    }

    #[tokio::test]
    async fn a_stopping_process_ends_long_polls_at_once_with_nothing() {
        let (_dir, outbox) = open();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let waiting = {
            let outbox = Arc::clone(&outbox);
            tokio::spawn(async move {
                let request = PollRequest { max_events: Some(5), ..Default::default() };
                let stopping = async move {
                    let _ = stopped.await;
                };
                poll(outbox.as_ref(), "s", &|| StreamStatus::Enabled, request, Duration::from_secs(30), stopping).await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "a long poll with nothing to send waits");
        stop.send(()).expect("stop");
        let response = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("in time").expect("join");
        let response = response.expect("poll");
        assert!(response.sets.is_empty() && !response.more_available, "{response:?}");
    }

    #[tokio::test]
    async fn a_forwarded_poll_still_waiting_when_the_instance_stops_is_503() {
        // An owner that accepts the poll and holds it, as a long poll does.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let holding = axum::Router::new().fallback(|| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            "late"
        });
        tokio::spawn(async move { axum::serve(listener, holding).await });
        let client = reqwest::Client::new();
        let started = std::time::Instant::now();
        let stopping = tokio::time::sleep(Duration::from_millis(200));
        let answer =
            forward(&client, &base, "/ssf/poll/s", &HeaderMap::new(), Bytes::from_static(b"{}"), stopping).await;
        assert!(
            matches!(answer, Err(SsfError::Unavailable { retry_after_secs: 1 })),
            "{:?}",
            answer.map(|r| r.status())
        );
        assert!(started.elapsed() < Duration::from_secs(5), "answered when the stop came, not when the owner did");
    }

    #[test]
    fn request_parsing() {
        let parsed = parse_request(
            br#"{"maxEvents": 3, "returnImmediately": true, "ack": ["x"],
            "setErrs": {"y": {"err": "invalid_issuer", "description": "no"}}, "future": 1}"#,
        )
        .expect("parses");
        assert_eq!(parsed.max_events, Some(3));
        assert!(parsed.return_immediately);
        assert_eq!(parsed.set_errs["y"].err, "invalid_issuer");
        assert!(parse_request(b"").expect("empty body").ack.is_empty());
        assert!(parse_request(b"{\"maxEvents\": -1}").is_err());
        assert!(parse_request(b"[1]").is_err());
    }
}
