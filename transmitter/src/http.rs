//! The transmitter's HTTP surface (SSF 1.0 §7–8, RFC 8936): metadata, JWKS,
//! stream management, status, subjects, verification and poll. Routes are
//! relative to the issuer's path, so the hub can nest them.
//!
//! Every management call is authenticated by a receiver's bearer token and
//! sees only that receiver's streams: another receiver's stream answers 404,
//! exactly like a missing one.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router, middleware};
use caep_schemas::event::StreamStatus;
use serde::Deserialize;
use serde_json::Value;

use crate::control::Placement;
use crate::error::SsfError;
use crate::metadata::{paths, well_known_path};
#[allow(unused_imports)] // named by the #[utoipa::path] annotations
use crate::openapi::{
    ErrorBody, JwkSet, StreamConfiguration, StreamConfigurationMembers, StreamsRead, SubjectChange, SubjectsAdd,
    TransmitterMetadata, VerificationRequest,
};
use crate::poll;
#[allow(unused_imports)] // named by the #[utoipa::path] annotations
use crate::poll::{PollRequest, PollResponse};
use crate::receivers::{Receiver, SCOPE_MANAGE, SCOPE_READ};
use crate::registry::StreamRecord;
use crate::service::{EVENTS_SUPPORTED, Transmitter, store_error};
use crate::streams::{self, Delivery, RequestKind, StatusBody};

/// Largest management or poll request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

type Shared = State<Arc<Transmitter>>;

/// Routes at the server root: the well-known document (whose path carries the
/// issuer's path after it) and everything under the issuer's path.
pub fn router(transmitter: Arc<Transmitter>) -> Router {
    let management = Router::new()
        .route(
            paths::STREAMS,
            get(read_streams).post(create_stream).patch(update_stream).put(replace_stream).delete(delete_stream),
        )
        .route(paths::STATUS, get(read_status).post(update_status))
        .route(paths::ADD_SUBJECT, post(add_subject))
        .route(paths::ADD_SUBJECTS, post(add_subjects))
        .route(paths::REMOVE_SUBJECT, post(remove_subject))
        .route(paths::VERIFY, post(verify))
        .route(paths::POLL, post(poll_stream))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::map_response(no_store));
    let under_issuer = Router::new().route(paths::JWKS, get(jwks)).merge(management);
    let well_known = Router::new().route(&well_known_path(&transmitter.issuer_path), get(metadata));
    let under_issuer = if transmitter.issuer_path.is_empty() {
        under_issuer
    } else {
        Router::new().nest(&transmitter.issuer_path, under_issuer)
    };
    well_known.merge(under_issuer).with_state(transmitter)
}

async fn no_store(mut response: Response) -> Response {
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[utoipa::path(get, path = "/.well-known/ssf-configuration", tag = "ssf",
    responses((status = 200, description = "The transmitter configuration metadata", body = TransmitterMetadata)))]
pub(crate) async fn metadata(State(transmitter): Shared) -> impl IntoResponse {
    Json(transmitter.metadata().clone())
}

#[utoipa::path(get, path = "/ssf/jwks.json", tag = "ssf",
    responses((status = 200, description = "The keys that sign this hub's SETs", body = JwkSet, content_type = "application/jwk-set+json")))]
pub(crate) async fn jwks(State(transmitter): Shared) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/jwk-set+json"), (header::CACHE_CONTROL, "max-age=60")],
        transmitter.keys().jwks().to_json().to_string(),
    )
}

/// The receiver a request's bearer token belongs to.
pub struct Authed(pub Receiver);

impl FromRequestParts<Arc<Transmitter>> for Authed {
    type Rejection = SsfError;

    async fn from_request_parts(parts: &mut Parts, transmitter: &Arc<Transmitter>) -> Result<Self, SsfError> {
        let token = bearer_token(parts).ok_or(SsfError::Unauthorized { invalid_token: false })?;
        match transmitter.receivers().authenticate(token).map_err(store_error)? {
            Some(receiver) => {
                transmitter.limits().call(&receiver.receiver_id)?;
                Ok(Authed(receiver))
            }
            None => Err(SsfError::Unauthorized { invalid_token: true }),
        }
    }
}

/// The token of an `Authorization: Bearer` header (scheme case-insensitive).
pub fn bearer_token(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn require_manage(receiver: &Receiver) -> Result<(), SsfError> {
    if receiver.has_scope(SCOPE_MANAGE) { Ok(()) } else { Err(SsfError::Forbidden { scope: SCOPE_MANAGE }) }
}

fn require_read(receiver: &Receiver) -> Result<(), SsfError> {
    if receiver.has_scope(SCOPE_READ) || receiver.has_scope(SCOPE_MANAGE) {
        Ok(())
    } else {
        Err(SsfError::Forbidden { scope: SCOPE_READ })
    }
}

#[derive(Deserialize)]
struct StreamIdQuery {
    stream_id: Option<String>,
}

fn stream_id_query(uri: &Uri) -> Result<Option<String>, SsfError> {
    axum::extract::Query::<StreamIdQuery>::try_from_uri(uri)
        .map(|query| query.0.stream_id)
        .map_err(|_| SsfError::BadRequest("malformed query string".into()))
}

fn owned_stream(
    transmitter: &Transmitter,
    receiver: &Receiver,
    stream_id: &str,
) -> Result<Arc<StreamRecord>, SsfError> {
    transmitter.streams().owned(&receiver.receiver_id, stream_id).ok_or(SsfError::NotFound)
}

/// [`owned_stream`] for a call that counts as the receiver's activity on
/// the stream (SSF 1.0 §8.1.1): recorded before the call proceeds, so a
/// status change made by the same call starts from it.
async fn active_stream(
    transmitter: &Transmitter,
    receiver: &Receiver,
    stream_id: &str,
) -> Result<Arc<StreamRecord>, SsfError> {
    let record = owned_stream(transmitter, receiver, stream_id)?;
    transmitter.note_activity(&record).await;
    Ok(transmitter.streams().owned(&receiver.receiver_id, stream_id).unwrap_or(record))
}

/// The stream configuration as returned to its owner, with the hub's
/// `default_subjects` extension when the stream takes every subject.
fn config_json(record: &StreamRecord) -> Value {
    let mut value = serde_json::to_value(&record.config).unwrap_or_default();
    if record.all_subjects
        && let Value::Object(members) = &mut value
    {
        members.insert("default_subjects".into(), Value::String("ALL".into()));
    }
    value
}

#[utoipa::path(post, path = "/ssf/streams", tag = "ssf", security(("receiver_token" = [])),
    request_body(content = StreamConfigurationMembers, description = "Requested members; no `delivery`: poll"),
    responses((status = 201, description = "The stream created", body = StreamConfiguration), (status = 400, description = "A malformed or invalid request", body = ErrorBody), (status = 401, description = "No bearer token, or one not accepted", body = ErrorBody), (status = 403, description = "The token lacks the scope needed", body = ErrorBody),
        (status = 409, description = "The receiver has the most streams allowed", body = ErrorBody), (status = 413, description = "The body is larger than 64 KiB", body = ErrorBody), (status = 429, description = "Too many requests; see Retry-After", body = ErrorBody)))]
pub(crate) async fn create_stream(
    State(transmitter): Shared,
    Authed(receiver): Authed,
    body: Bytes,
) -> Result<Response, SsfError> {
    require_manage(&receiver)?;
    let record = transmitter.create_stream(&receiver, &body).await?;
    Ok((StatusCode::CREATED, Json(config_json(&record))).into_response())
}

#[utoipa::path(get, path = "/ssf/streams", tag = "ssf", security(("receiver_token" = [])), params(("stream_id" = Option<String>, Query, description = "The stream")),
    responses((status = 200, description = "The stream, or every stream of the receiver", body = StreamsRead), (status = 400, description = "A malformed or invalid request", body = ErrorBody), (status = 401, description = "No bearer token, or one not accepted", body = ErrorBody), (status = 403, description = "The token lacks the scope needed", body = ErrorBody), (status = 404, description = "No such stream for this receiver", body = ErrorBody), (status = 429, description = "Too many requests; see Retry-After", body = ErrorBody)))]
pub(crate) async fn read_streams(
    State(transmitter): Shared,
    Authed(receiver): Authed,
    uri: Uri,
) -> Result<Json<Value>, SsfError> {
    require_read(&receiver)?;
    match stream_id_query(&uri)? {
        Some(stream_id) => {
            let record = active_stream(&transmitter, &receiver, &stream_id).await?;
            Ok(Json(config_json(&record)))
        }
        None => {
            let all = transmitter.streams().owned_by(&receiver.receiver_id);
            for record in &all {
                transmitter.note_activity(record).await;
            }
            Ok(Json(Value::Array(all.iter().map(|record| config_json(record)).collect())))
        }
    }
}

#[utoipa::path(patch, path = "/ssf/streams", tag = "ssf", security(("receiver_token" = [])),
    request_body(content = StreamConfigurationMembers, description = "`stream_id` and the members to change"),
    responses((status = 200, description = "The stream updated", body = StreamConfiguration), (status = 400, description = "A malformed or invalid request", body = ErrorBody), (status = 401, description = "No bearer token, or one not accepted", body = ErrorBody), (status = 403, description = "The token lacks the scope needed", body = ErrorBody), (status = 404, description = "No such stream for this receiver", body = ErrorBody), (status = 413, description = "The body is larger than 64 KiB", body = ErrorBody), (status = 429, description = "Too many requests; see Retry-After", body = ErrorBody)))]
pub(crate) async fn update_stream(state: Shared, authed: Authed, body: Bytes) -> Result<Json<Value>, SsfError> {
    change_stream(state, authed, body, RequestKind::Update).await
}

#[utoipa::path(put, path = "/ssf/streams", tag = "ssf", security(("receiver_token" = [])),
    request_body(content = StreamConfigurationMembers, description = "`stream_id` and every receiver-supplied member"),
    responses((status = 200, description = "The stream replaced", body = StreamConfiguration), (status = 400, description = "A malformed or invalid request", body = ErrorBody), (status = 401, description = "No bearer token, or one not accepted", body = ErrorBody), (status = 403, description = "The token lacks the scope needed", body = ErrorBody), (status = 404, description = "No such stream for this receiver", body = ErrorBody), (status = 413, description = "The body is larger than 64 KiB", body = ErrorBody), (status = 429, description = "Too many requests; see Retry-After", body = ErrorBody)))]
pub(crate) async fn replace_stream(state: Shared, authed: Authed, body: Bytes) -> Result<Json<Value>, SsfError> {
    change_stream(state, authed, body, RequestKind::Replace).await
}

async fn change_stream(
    State(transmitter): Shared,
    Authed(receiver): Authed,
    body: Bytes,
    kind: RequestKind,
) -> Result<Json<Value>, SsfError> {
    require_manage(&receiver)?;
    let request = streams::parse_request(&body, kind)?;
    let stream_id = request.stream_id.clone().ok_or_else(|| SsfError::BadRequest("`stream_id` is required".into()))?;
    let existing = active_stream(&transmitter, &receiver, &stream_id).await?;
    let poll_url = |id: &str| transmitter.poll_url(id);
    let config = match kind {
        RequestKind::Replace => streams::apply_replace(&existing.config, request, EVENTS_SUPPORTED, poll_url)?,
        _ => streams::apply_update(&existing.config, request, EVENTS_SUPPORTED, poll_url)?,
    };
    transmitter.check_push_endpoint(&config).await?;
    // Applying the record reroutes the stream's push worker.
    let update = transmitter.update_stream(&stream_id, |record| record.config = config);
    let record = update.await?.ok_or(SsfError::NotFound)?;
    Ok(Json(config_json(&record)))
}

#[utoipa::path(delete, path = "/ssf/streams", tag = "ssf", security(("receiver_token" = [])), params(("stream_id" = String, Query, description = "The stream")),
    responses((status = 204, description = "Deleted, with its queue"), (status = 400, description = "A malformed or invalid request", body = ErrorBody), (status = 401, description = "No bearer token, or one not accepted", body = ErrorBody), (status = 403, description = "The token lacks the scope needed", body = ErrorBody), (status = 404, description = "No such stream for this receiver", body = ErrorBody), (status = 429, description = "Too many requests; see Retry-After", body = ErrorBody)))]
pub(crate) async fn delete_stream(
    State(transmitter): Shared,
    Authed(receiver): Authed,
    uri: Uri,
) -> Result<StatusCode, SsfError> {
    require_manage(&receiver)?;
    // A DELETE without stream_id must never mean "all streams".
    let stream_id = stream_id_query(&uri)?.ok_or_else(|| SsfError::BadRequest("`stream_id` is required".into()))?;
    owned_stream(&transmitter, &receiver, &stream_id)?;
    transmitter.delete_stream(&stream_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn status_body(record: &StreamRecord) -> StatusBody {
    StatusBody { stream_id: record.config.stream_id.clone(), status: record.status, reason: record.reason.clone() }
}

#[utoipa::path(get, path = "/ssf/status", tag = "ssf", security(("receiver_token" = [])), params(("stream_id" = String, Query, description = "The stream")),
    responses((status = 200, description = "The stream's status", body = StatusBody), (status = 400, description = "A malformed or invalid request", body = ErrorBody), (status = 401, description = "No bearer token, or one not accepted", body = ErrorBody), (status = 403, description = "The token lacks the scope needed", body = ErrorBody), (status = 404, description = "No such stream for this receiver", body = ErrorBody), (status = 429, description = "Too many requests; see Retry-After", body = ErrorBody)))]
pub(crate) async fn read_status(
    State(transmitter): Shared,
    Authed(receiver): Authed,
    uri: Uri,
) -> Result<Json<StatusBody>, SsfError> {
    require_read(&receiver)?;
    let stream_id = stream_id_query(&uri)?.ok_or_else(|| SsfError::BadRequest("`stream_id` is required".into()))?;
    let record = active_stream(&transmitter, &receiver, &stream_id).await?;
    Ok(Json(status_body(&record)))
}

#[utoipa::path(post, path = "/ssf/status", tag = "ssf", security(("receiver_token" = [])), request_body = StatusBody,
    responses((status = 200, description = "The status now", body = StatusBody), (status = 400, description = "A malformed or invalid request", body = ErrorBody), (status = 401, description = "No bearer token, or one not accepted", body = ErrorBody), (status = 403, description = "The token lacks the scope needed", body = ErrorBody), (status = 404, description = "No such stream for this receiver", body = ErrorBody), (status = 413, description = "The body is larger than 64 KiB", body = ErrorBody), (status = 429, description = "Too many requests; see Retry-After", body = ErrorBody)))]
pub(crate) async fn update_status(
    State(transmitter): Shared,
    Authed(receiver): Authed,
    body: Bytes,
) -> Result<Json<StatusBody>, SsfError> {
    require_manage(&receiver)?;
    let request = streams::parse_status_update(&body)?;
    let record = active_stream(&transmitter, &receiver, &request.stream_id).await?;
    let updated = transmitter.set_status(&record, request.status, request.reason).await?;
    Ok(Json(status_body(&updated)))
}

#[utoipa::path(post, path = "/ssf/subjects/add", tag = "ssf", security(("receiver_token" = [])), request_body = SubjectChange,
    responses((status = 200, description = "Added (for an agent session: the hub records that it reached this receiver)"),
        (status = 400, description = "A malformed or invalid request", body = ErrorBody), (status = 401, description = "No bearer token, or one not accepted", body = ErrorBody), (status = 403, description = "The token lacks the scope needed", body = ErrorBody), (status = 404, description = "No such stream for this receiver", body = ErrorBody), (status = 413, description = "The body is larger than 64 KiB", body = ErrorBody), (status = 429, description = "Too many requests; see Retry-After", body = ErrorBody)))]
pub(crate) async fn add_subject(
    State(transmitter): Shared,
    Authed(receiver): Authed,
    body: Bytes,
) -> Result<StatusCode, SsfError> {
    require_manage(&receiver)?;
    let request = streams::parse_subject_request(&body)?;
    let record = active_stream(&transmitter, &receiver, &request.stream_id).await?;
    transmitter.add_subject(&record, request.subject).await?;
    Ok(StatusCode::OK)
}

/// The add-many extension: every subject added, or the first refusal.
#[utoipa::path(post, path = "/ssf/subjects/add-many", tag = "ssf", security(("receiver_token" = [])), request_body = SubjectsAdd,
    responses((status = 200, description = "Every subject added"), (status = 400, description = "A malformed or invalid request", body = ErrorBody), (status = 401, description = "No bearer token, or one not accepted", body = ErrorBody), (status = 403, description = "The token lacks the scope needed", body = ErrorBody), (status = 404, description = "No such stream for this receiver", body = ErrorBody), (status = 413, description = "The body is larger than 64 KiB", body = ErrorBody), (status = 429, description = "Too many requests; see Retry-After", body = ErrorBody)))]
pub(crate) async fn add_subjects(
    State(transmitter): Shared,
    Authed(receiver): Authed,
    body: Bytes,
) -> Result<StatusCode, SsfError> {
    require_manage(&receiver)?;
    let request = streams::parse_subjects_request(&body)?;
    let record = active_stream(&transmitter, &receiver, &request.stream_id).await?;
    transmitter.add_subjects(&record, request.subjects).await?;
    Ok(StatusCode::OK)
}

#[utoipa::path(post, path = "/ssf/subjects/remove", tag = "ssf", security(("receiver_token" = [])), request_body = SubjectChange,
    responses((status = 204, description = "Removed"), (status = 400, description = "A malformed or invalid request", body = ErrorBody), (status = 401, description = "No bearer token, or one not accepted", body = ErrorBody), (status = 403, description = "The token lacks the scope needed", body = ErrorBody), (status = 404, description = "No such stream for this receiver", body = ErrorBody), (status = 413, description = "The body is larger than 64 KiB", body = ErrorBody), (status = 429, description = "Too many requests; see Retry-After", body = ErrorBody)))]
pub(crate) async fn remove_subject(
    State(transmitter): Shared,
    Authed(receiver): Authed,
    body: Bytes,
) -> Result<StatusCode, SsfError> {
    require_manage(&receiver)?;
    let request = streams::parse_subject_request(&body)?;
    active_stream(&transmitter, &receiver, &request.stream_id).await?;
    transmitter.remove_subject(&request.stream_id, request.subject).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/ssf/verify", tag = "ssf", security(("receiver_token" = [])), request_body = VerificationRequest,
    responses((status = 204, description = "A verification SET is on its way"), (status = 400, description = "A malformed or invalid request", body = ErrorBody), (status = 401, description = "No bearer token, or one not accepted", body = ErrorBody), (status = 403, description = "The token lacks the scope needed", body = ErrorBody), (status = 404, description = "No such stream for this receiver", body = ErrorBody), (status = 413, description = "The body is larger than 64 KiB", body = ErrorBody), (status = 429, description = "Too many requests; see Retry-After", body = ErrorBody)))]
pub(crate) async fn verify(
    State(transmitter): Shared,
    Authed(receiver): Authed,
    body: Bytes,
) -> Result<StatusCode, SsfError> {
    require_manage(&receiver)?;
    let request = streams::parse_verification_request(&body)?;
    let record = active_stream(&transmitter, &receiver, &request.stream_id).await?;
    transmitter.verify_stream(&record, request.state).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/ssf/poll/{stream_id}", tag = "ssf", security(("receiver_token" = [])),
    params(("stream_id" = String, Path, description = "The poll stream")),
    request_body(content = PollRequest, description = "Empty: a default poll"),
    responses((status = 200, description = "SETs, acknowledgements applied (RFC 8936)", body = PollResponse), (status = 400, description = "A malformed or invalid request", body = ErrorBody), (status = 401, description = "No bearer token, or one not accepted", body = ErrorBody), (status = 403, description = "The token lacks the scope needed", body = ErrorBody), (status = 404, description = "No such stream for this receiver", body = ErrorBody), (status = 413, description = "The body is larger than 64 KiB", body = ErrorBody), (status = 429, description = "Too many requests; see Retry-After", body = ErrorBody),
        (status = 503, description = "The stream's delivery is moving between instances; retry", body = ErrorBody)))]
pub(crate) async fn poll_stream(
    State(transmitter): Shared,
    Authed(receiver): Authed,
    Path(stream_id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, SsfError> {
    // Authenticated and owned here first, so a forward never serves a
    // caller this instance would refuse.
    require_read(&receiver)?;
    let record = active_stream(&transmitter, &receiver, &stream_id).await?;
    if !matches!(record.config.delivery, Delivery::Poll { .. }) {
        return Err(SsfError::NotFound);
    }
    match transmitter.placement().place(&stream_id) {
        Placement::Local => transmitter.placement().caught_up(&stream_id).await,
        Placement::Unknown => return Err(SsfError::Unavailable { retry_after_secs: 1 }),
        Placement::Remote { base_url } => {
            if headers.contains_key(poll::FORWARDED_HEADER) {
                // Forwarded to us, yet placed elsewhere: the instances
                // disagree (a rebalance in flight). Bouncing it on could
                // loop, so the receiver retries instead.
                tracing::warn!(stream_id = %stream_id, to = %base_url, "forwarded poll placed elsewhere again");
                return Err(SsfError::Unavailable { retry_after_secs: 1 });
            }
            // The path as the receiver sent it: nesting under the issuer's
            // path stripped that prefix from `uri`, so it is put back.
            let mut path = format!("{}{}", transmitter.issuer_path, paths::POLL.replace("{stream_id}", &stream_id));
            if let Some(query) = uri.query() {
                path = format!("{path}?{query}");
            }
            let stopping = transmitter.stopping();
            return poll::forward(transmitter.forward_client(), &base_url, &path, &headers, body, stopping).await;
        }
    }
    let request = poll::parse_request(&body).map_err(SsfError::BadRequest)?;
    let _slot =
        if request.is_long_poll() { Some(transmitter.limits().long_poll(&receiver.receiver_id)?) } else { None };
    // Read again while the poll waits: a stream paused, disabled or deleted
    // meanwhile answers at once with nothing.
    let streams = transmitter.streams();
    let status = || streams.owned(&receiver.receiver_id, &stream_id).map_or(StreamStatus::Disabled, |r| r.status);
    let long_poll = transmitter.settings.long_poll;
    let stopping = transmitter.stopping();
    let response = poll::poll(transmitter.outbox().as_ref(), &stream_id, &status, request, long_poll, stopping)
        .await
        .map_err(store_error)?;
    Ok(Json(response).into_response())
}
