//! Operator endpoints of the transmitter: receivers and their tokens, the
//! operator's view of streams, transmitter-initiated status changes, and the
//! dead letters. The hub mounts this router behind its admin token.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use caep_schemas::event::StreamStatus;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::SsfError;
#[allow(unused_imports)] // named by the #[utoipa::path] annotations
use crate::openapi::{
    CreatedReceiver, DeadLetterPage, ErrorBody, ReceiverView, Replayed, StreamStatusName, StreamView,
};
use crate::receivers::{ReceiverError, ReceiverSpec};
use crate::registry::StreamRecord;
use crate::service::{Transmitter, store_error};

type Shared = State<Arc<Transmitter>>;

/// `/admin/...` routes; the caller adds authentication.
pub fn router(transmitter: Arc<Transmitter>) -> Router {
    Router::new()
        .route("/admin/receivers", get(list_receivers).post(create_receiver))
        .route("/admin/receivers/{receiver_id}", delete(delete_receiver))
        .route("/admin/streams", get(list_streams))
        .route("/admin/streams/{stream_id}/status", post(change_status))
        .route("/admin/dead-letters", get(list_dead_letters))
        .route("/admin/dead-letters/replay", post(replay_dead_letters))
        .with_state(transmitter)
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, SsfError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(value @ Value::Object(_)) => serde_json::from_value(value).map_err(|e| SsfError::BadRequest(e.to_string())),
        Ok(_) => Err(SsfError::BadRequest("the body must be a JSON object".into())),
        Err(error) => Err(SsfError::BadRequest(format!("malformed JSON: {error}"))),
    }
}

#[utoipa::path(post, path = "/admin/receivers", tag = "admin", security(("admin_token" = [])), request_body = ReceiverSpec,
    responses((status = 201, description = "Created; its token is shown only now", body = CreatedReceiver),
        (status = 400, description = "Invalid", body = ErrorBody), (status = 401, description = "No admin token, or not this hub's", body = ErrorBody),
        (status = 409, description = "Another receiver has this audience", body = ErrorBody)))]
pub(crate) async fn create_receiver(State(transmitter): Shared, body: Bytes) -> Result<Response, SsfError> {
    let spec: ReceiverSpec = parse(&body)?;
    let created = transmitter.create_receiver(spec).await;
    let (receiver, token) = created.map_err(|error| match error {
        ReceiverError::Invalid(reason) => SsfError::BadRequest(reason),
        ReceiverError::DuplicateAudience(_) | ReceiverError::Conflict(_) => SsfError::Conflict(error.to_string()),
        ReceiverError::Store(error) => store_error(error),
    })?;
    let body = json!({
        "receiver_id": receiver.receiver_id,
        "token": token,
        "audience": receiver.audience,
        "name": receiver.name,
        "scopes": receiver.scopes,
        "issuers": receiver.issuers,
        "all_subjects": receiver.all_subjects,
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

#[utoipa::path(get, path = "/admin/receivers", tag = "admin", security(("admin_token" = [])),
    responses((status = 200, description = "Every receiver", body = Vec<ReceiverView>), (status = 401, description = "No admin token, or not this hub's", body = ErrorBody)))]
pub(crate) async fn list_receivers(State(transmitter): Shared) -> Result<Json<Value>, SsfError> {
    let receivers = transmitter.receivers().list().map_err(store_error)?;
    let listed = receivers
        .into_iter()
        .map(|receiver| {
            let streams: Vec<String> = transmitter
                .streams()
                .owned_by(&receiver.receiver_id)
                .iter()
                .map(|record| record.config.stream_id.clone())
                .collect();
            json!({
                "receiver_id": receiver.receiver_id,
                "name": receiver.name,
                "audience": receiver.audience,
                "scopes": receiver.scopes,
                "issuers": receiver.issuers,
                "all_subjects": receiver.all_subjects,
                "created_at_ms": receiver.created_at_ms,
                "streams": streams,
            })
        })
        .collect();
    Ok(Json(Value::Array(listed)))
}

#[utoipa::path(delete, path = "/admin/receivers/{receiver_id}", tag = "admin", security(("admin_token" = [])),
    params(("receiver_id" = String, Path)),
    responses((status = 204, description = "Removed with its streams"), (status = 401, description = "No admin token, or not this hub's", body = ErrorBody), (status = 404, description = "No such receiver", body = ErrorBody)))]
pub(crate) async fn delete_receiver(
    State(transmitter): Shared,
    Path(receiver_id): Path<String>,
) -> Result<StatusCode, SsfError> {
    if transmitter.delete_receiver(&receiver_id).await? { Ok(StatusCode::NO_CONTENT) } else { Err(SsfError::NotFound) }
}

fn operator_view(transmitter: &Transmitter, record: &StreamRecord) -> Value {
    json!({
        "stream_id": record.config.stream_id,
        "receiver_id": record.receiver_id,
        "aud": serde_json::to_value(&record.config).ok().and_then(|c| c.get("aud").cloned()),
        "method": record.config.delivery.method(),
        "endpoint_url": record.config.delivery.endpoint_url(),
        "status": record.status,
        "reason": record.reason,
        "events_delivered": record.config.events_delivered,
        "all_subjects": record.all_subjects,
        "issuers": record.issuers,
        "subjects": transmitter.streams().subject_count(&record.config.stream_id),
        "queued": transmitter.outbox().depth(&record.config.stream_id).unwrap_or(0),
    })
}

#[utoipa::path(get, path = "/admin/streams", tag = "admin", security(("admin_token" = [])),
    responses((status = 200, description = "Every stream", body = Vec<StreamView>), (status = 401, description = "No admin token, or not this hub's", body = ErrorBody)))]
pub(crate) async fn list_streams(State(transmitter): Shared) -> Json<Value> {
    let all = transmitter.streams().all();
    Json(Value::Array(all.iter().map(|record| operator_view(&transmitter, record)).collect()))
}

/// A transmitter-initiated status change (announced to the receiver).
#[derive(Deserialize, utoipa::ToSchema)]
struct StatusChange {
    #[schema(value_type = StreamStatusName)]
    status: StreamStatus,
    #[serde(default)]
    reason: Option<String>,
}

#[utoipa::path(post, path = "/admin/streams/{stream_id}/status", tag = "admin", security(("admin_token" = [])),
    params(("stream_id" = String, Path)), request_body = StatusChange,
    responses((status = 200, description = "Changed, after a stream-updated SET told the receiver", body = StreamView),
        (status = 400, description = "Invalid", body = ErrorBody), (status = 401, description = "No admin token, or not this hub's", body = ErrorBody), (status = 404, description = "No such stream", body = ErrorBody)))]
pub(crate) async fn change_status(
    State(transmitter): Shared,
    Path(stream_id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, SsfError> {
    let change: StatusChange = parse(&body)?;
    let record = transmitter.change_status_by_transmitter(&stream_id, change.status, change.reason).await?;
    Ok(Json(operator_view(&transmitter, &record)))
}

#[derive(Deserialize)]
struct DeadLetterQuery {
    stream_id: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// Dead letters listed per page by default, and at most.
const DEAD_LETTER_PAGE: usize = 100;
const MAX_DEAD_LETTER_PAGE: usize = 1000;

/// `GET /admin/dead-letters?stream_id=&limit=&cursor=`: a page of dead
/// letters and the cursor of the next page (`null` on the last).
#[utoipa::path(get, path = "/admin/dead-letters", tag = "admin", security(("admin_token" = [])),
    params(("stream_id" = Option<String>, Query),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Default 100"),
        ("cursor" = Option<String>, Query, description = "A previous page's `next_cursor`")),
    responses((status = 200, description = "A page of dead letters", body = DeadLetterPage),
        (status = 400, description = "Invalid", body = ErrorBody), (status = 401, description = "No admin token, or not this hub's", body = ErrorBody)))]
pub(crate) async fn list_dead_letters(State(transmitter): Shared, uri: Uri) -> Result<Json<Value>, SsfError> {
    let query = axum::extract::Query::<DeadLetterQuery>::try_from_uri(&uri)
        .map_err(|_| SsfError::BadRequest("malformed query string (stream_id, limit, cursor)".into()))?;
    let limit = query.0.limit.unwrap_or(DEAD_LETTER_PAGE);
    if !(1..=MAX_DEAD_LETTER_PAGE).contains(&limit) {
        return Err(SsfError::BadRequest(format!("`limit` must be 1 to {MAX_DEAD_LETTER_PAGE}")));
    }
    let after = query.0.cursor.as_deref().map(decode_cursor).transpose()?;
    let after_ref = after.as_ref().map(|(stream, seq)| (stream.as_str(), *seq));
    let (letters, more) =
        transmitter.outbox().dead_letters(query.0.stream_id.as_deref(), after_ref, limit).map_err(store_error)?;
    let next_cursor = match letters.last() {
        Some(last) if more => Some(encode_cursor(&last.stream_id, last.seq)),
        _ => None,
    };
    let listed: Vec<Value> = letters
        .into_iter()
        .map(|letter| {
            json!({
                "stream_id": letter.stream_id,
                "jti": letter.set.jti,
                "txn": letter.set.txn,
                "err": letter.err,
                "description": letter.description,
                "enqueued_at_ms": letter.set.enqueued_at_ms,
                "failed_at_ms": letter.failed_at_ms,
            })
        })
        .collect();
    Ok(Json(json!({ "dead_letters": listed, "next_cursor": next_cursor })))
}

/// A page cursor: the last listed position, opaque to the caller.
fn encode_cursor(stream_id: &str, seq: u64) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json!([stream_id, seq]).to_string())
}

fn decode_cursor(cursor: &str) -> Result<(String, u64), SsfError> {
    use base64::Engine;
    let invalid = || SsfError::BadRequest("`cursor` is not one this hub gave out".into());
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(cursor).map_err(|_| invalid())?;
    serde_json::from_slice::<(String, u64)>(&bytes).map_err(|_| invalid())
}

/// Dead letters to put back in a stream's queue; no `jtis`: all of the stream's.
#[derive(Deserialize, utoipa::ToSchema)]
struct Replay {
    stream_id: String,
    #[serde(default)]
    jtis: Vec<String>,
}

#[utoipa::path(post, path = "/admin/dead-letters/replay", tag = "admin", security(("admin_token" = [])), request_body = Replay,
    responses((status = 200, description = "Put back in the stream's queue, same jti", body = Replayed),
        (status = 400, description = "Invalid", body = ErrorBody), (status = 401, description = "No admin token, or not this hub's", body = ErrorBody), (status = 404, description = "No such stream", body = ErrorBody)))]
pub(crate) async fn replay_dead_letters(State(transmitter): Shared, body: Bytes) -> Result<Json<Value>, SsfError> {
    let replay: Replay = parse(&body)?;
    if transmitter.streams().get(&replay.stream_id).is_none() {
        return Err(SsfError::NotFound);
    }
    let replayed = transmitter.outbox().replay(&replay.stream_id, replay.jtis).await.map_err(store_error)?;
    Ok(Json(json!({ "replayed": replayed })))
}
