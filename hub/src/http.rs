//! The hub's own HTTP endpoints: `POST /ingest` (RFC 8935 receiving end for
//! IdP SETs) and the operator's `/admin` views of issuers, cascades and
//! sessions.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use caep_transmitter::error::SsfError;
use caep_transmitter::store::StoreError;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::cascade::CascadeReport;
use crate::effects::IngestError;
use crate::graph;
use crate::hub::Hub;
use crate::issuers::IssuerError;
use crate::issuers::TrustedIssuer;
#[allow(unused_imports)] // named by the #[utoipa::path] annotations
use crate::openapi::{CascadeList, CascadeSummary, SessionView};
#[allow(unused_imports)] // named by the #[utoipa::path] annotations
use caep_transmitter::openapi::ErrorBody;

/// Largest SET accepted at `/ingest`.
const MAX_SET_BYTES: usize = 64 * 1024;

type Shared = State<Arc<Hub>>;

/// `POST /ingest`, open to any IdP (SET signatures authenticate them).
pub fn ingest_router(hub: Arc<Hub>) -> Router {
    Router::new().route("/ingest", post(ingest)).layer(DefaultBodyLimit::max(MAX_SET_BYTES)).with_state(hub)
}

/// `/admin/...` routes of the hub; the caller adds authentication.
pub fn admin_router(hub: Arc<Hub>) -> Router {
    Router::new()
        .route("/admin/issuers", get(list_issuers).post(register_issuer))
        .route("/admin/issuers/{issuer}", delete(untrust_issuer))
        .route("/admin/cascades", get(recent_cascades))
        .route("/admin/cascades/{txn}", get(cascade_report))
        .route("/admin/sessions/{session_id}", get(session_view))
        .with_state(hub)
}

fn rfc8935_error(err: &str, description: &str) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"err": err, "description": description}))).into_response()
}

#[utoipa::path(post, path = "/ingest", tag = "hub",
    request_body(content = String, content_type = "application/secevent+jwt", description = "A SET signed by a trusted IdP (RFC 8935)"),
    responses((status = 202, description = "Verified and durably recorded; its cascade is under way"),
        (status = 400, description = "Refused (RFC 8935 error codes: invalid_request, invalid_key, invalid_issuer, invalid_audience, ...)", body = ErrorBody),
        (status = 413, description = "Larger than 64 KiB"),
        (status = 503, description = "Cannot process SETs now; retry (Retry-After)", body = ErrorBody)))]
pub(crate) async fn ingest(State(hub): Shared, headers: HeaderMap, body: Bytes) -> Response {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let media_type = content_type.split(';').next().unwrap_or("").trim();
    if !media_type.eq_ignore_ascii_case("application/secevent+jwt") {
        return rfc8935_error("invalid_request", "Content-Type must be application/secevent+jwt (RFC 8935)");
    }
    let Ok(token) = std::str::from_utf8(&body) else {
        return rfc8935_error("invalid_request", "the body is not a compact JWS");
    };
    match hub.ingest(token.trim()).await {
        Ok(()) => StatusCode::ACCEPTED.into_response(),
        Err(IngestError::Rejected { err, description }) => {
            tracing::info!(err, %description, "IdP SET refused");
            rfc8935_error(err, &description)
        }
        Err(IngestError::Unavailable(reason) | IngestError::TooMany(reason)) => {
            tracing::error!(%reason, "IdP SET not processed");
            let body =
                json!({"err": "temporarily_unavailable", "description": "the hub cannot process SETs now; retry"});
            (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], Json(body)).into_response()
        }
    }
}

/// An IdP to trust, with its keys inline or at an https `jwks_uri`.
#[derive(Deserialize, utoipa::ToSchema)]
struct NewIssuer {
    #[schema(pattern = "^https?://")]
    issuer: String,
    #[serde(default)]
    #[schema(value_type = Option<caep_transmitter::openapi::JwkSet>)]
    jwks: Option<Value>,
    #[serde(default)]
    jwks_uri: Option<String>,
}

#[utoipa::path(post, path = "/admin/issuers", tag = "admin", security(("admin_token" = [])), request_body = NewIssuer,
    responses((status = 201, description = "Trusted", body = TrustedIssuer), (status = 200, description = "Updated", body = TrustedIssuer),
        (status = 400, description = "Invalid (keys, or a jwks_uri the SSRF guard refuses)", body = ErrorBody), (status = 401, description = "No admin token, or not this hub's", body = ErrorBody)))]
pub(crate) async fn register_issuer(State(hub): Shared, body: Bytes) -> Result<Response, SsfError> {
    let request: NewIssuer = match serde_json::from_slice::<Value>(&body) {
        Ok(value @ Value::Object(_)) => {
            serde_json::from_value(value).map_err(|e| SsfError::BadRequest(e.to_string()))?
        }
        Ok(_) => return Err(SsfError::BadRequest("the body must be a JSON object".into())),
        Err(error) => return Err(SsfError::BadRequest(format!("malformed JSON: {error}"))),
    };
    let registered = hub.issuers().register(request.issuer, request.jwks, request.jwks_uri).await;
    let (issuer, is_new) = registered.map_err(|error| match error {
        IssuerError::Invalid(reason) => SsfError::BadRequest(reason),
        IssuerError::Store(error) => SsfError::Storage(error.to_string()),
    })?;
    let status = if is_new { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(issuer)).into_response())
}

/// Untrusts an IdP (its issuer percent-encoded in the path): its SETs are
/// refused from now on; cascades it already caused complete.
#[utoipa::path(delete, path = "/admin/issuers/{issuer}", tag = "admin", security(("admin_token" = [])),
    params(("issuer" = String, Path, description = "The issuer, percent-encoded")),
    responses((status = 204, description = "No longer trusted"), (status = 401, description = "No admin token, or not this hub's", body = ErrorBody), (status = 404, description = "Not found", body = ErrorBody)))]
pub(crate) async fn untrust_issuer(State(hub): Shared, Path(issuer): Path<String>) -> Result<StatusCode, SsfError> {
    match hub.issuers().delete(&issuer).await {
        Ok(true) => Ok(StatusCode::NO_CONTENT),
        Ok(false) => Err(SsfError::NotFound),
        Err(error) => Err(SsfError::Storage(error.to_string())),
    }
}

#[utoipa::path(get, path = "/admin/issuers", tag = "admin", security(("admin_token" = [])),
    responses((status = 200, description = "Every trusted IdP", body = Vec<TrustedIssuer>), (status = 401, description = "No admin token, or not this hub's", body = ErrorBody)))]
pub(crate) async fn list_issuers(State(hub): Shared) -> Result<Json<Value>, SsfError> {
    let issuers = hub.issuers().list().map_err(|e| SsfError::Storage(e.to_string()))?;
    Ok(Json(serde_json::to_value(issuers).unwrap_or_default()))
}

/// `?issuer=`: which IdP's cascade or session, when several used one id.
#[derive(Deserialize)]
pub(crate) struct IssuerQuery {
    #[serde(default)]
    issuer: Option<String>,
}

/// One match, or 404 for none and 400 naming the IdPs for several.
fn the_one<T>(mut found: Vec<(String, T)>, what: &str) -> Result<T, SsfError> {
    match found.len() {
        0 => Err(SsfError::NotFound),
        1 => Ok(found.remove(0).1),
        _ => {
            let issuers: Vec<String> = found.into_iter().map(|(issuer, _)| issuer).collect();
            Err(SsfError::BadRequest(format!("several IdPs used this {what}; add ?issuer= (one of {issuers:?})")))
        }
    }
}

/// The query string as `T`; a malformed one is a 400 naming the parameters.
fn query_of<T: serde::de::DeserializeOwned>(uri: &axum::http::Uri, parameters: &str) -> Result<T, SsfError> {
    Query::<T>::try_from_uri(uri)
        .map(|Query(query)| query)
        .map_err(|_| SsfError::BadRequest(format!("malformed query string ({parameters})")))
}

/// `?limit=`: how many cascades of each group `GET /admin/cascades` lists.
#[derive(Deserialize)]
struct RecentQuery {
    #[serde(default = "default_recent")]
    limit: usize,
}

fn default_recent() -> usize {
    50
}

/// Most cascades `GET /admin/cascades` lists per group.
const MAX_RECENT: usize = 500;

/// `GET /admin/cascades[?limit=]`: cascades in progress (newest first, with
/// how many there are) and the most recently completed, as summaries.
#[utoipa::path(get, path = "/admin/cascades", tag = "admin", security(("admin_token" = [])),
    params(("limit" = Option<u32>, Query, minimum = 1, maximum = 500, description = "Per group; default 50")),
    responses((status = 200, description = "Cascades in progress and recently completed", body = CascadeList),
        (status = 400, description = "Invalid", body = ErrorBody), (status = 401, description = "No admin token, or not this hub's", body = ErrorBody)))]
pub(crate) async fn recent_cascades(State(hub): Shared, uri: axum::http::Uri) -> Result<Json<CascadeList>, SsfError> {
    let query: RecentQuery = query_of(&uri, "limit")?;
    if !(1..=MAX_RECENT).contains(&query.limit) {
        return Err(SsfError::BadRequest(format!("`limit` must be 1 to {MAX_RECENT}")));
    }
    let recent = hub
        .store()
        .read(|txn| crate::cascade::recent(txn, query.limit))
        .map_err(|e| SsfError::Storage(e.to_string()))?;
    Ok(Json(CascadeList {
        in_progress: recent.open.into_iter().map(CascadeSummary::from).collect(),
        in_progress_total: recent.open_total,
        completed: recent.completed.into_iter().map(CascadeSummary::from).collect(),
    }))
}

/// `GET /admin/cascades/{txn}`: `?issuer=` picks the IdP when several used
/// the `txn`; `?leaves=false` leaves the leaves out (a summary).
#[derive(Deserialize)]
pub(crate) struct CascadeQuery {
    #[serde(default)]
    issuer: Option<String>,
    #[serde(default = "listed")]
    leaves: bool,
}

fn listed() -> bool {
    true
}

#[utoipa::path(get, path = "/admin/cascades/{txn}", tag = "admin", security(("admin_token" = [])),
    params(("txn" = String, Path, description = "The IdP's txn"), ("issuer" = Option<String>, Query),
        ("leaves" = Option<bool>, Query, description = "false: the summary only")),
    responses((status = 200, description = "The cascade's report", body = CascadeReport), (status = 400, description = "Invalid; or several IdPs used this id: add `?issuer=`", body = ErrorBody), (status = 401, description = "No admin token, or not this hub's", body = ErrorBody), (status = 404, description = "Not found", body = ErrorBody)))]
pub(crate) async fn cascade_report(
    State(hub): Shared,
    Path(txn): Path<String>,
    uri: axum::http::Uri,
) -> Result<Json<CascadeReport>, SsfError> {
    let query: CascadeQuery = query_of(&uri, "issuer, leaves")?;
    let reports =
        hub.reports(&txn, query.issuer.as_deref(), query.leaves).map_err(|e| SsfError::Storage(e.to_string()))?;
    Ok(Json(the_one(reports.into_iter().map(|report| (report.issuer.clone(), report)).collect(), "txn")?))
}

#[utoipa::path(get, path = "/admin/sessions/{session_id}", tag = "admin", security(("admin_token" = [])),
    params(("session_id" = String, Path), ("issuer" = Option<String>, Query)),
    responses((status = 200, description = "The session, its touches and subtree", body = SessionView), (status = 400, description = "Invalid; or several IdPs used this id: add `?issuer=`", body = ErrorBody), (status = 401, description = "No admin token, or not this hub's", body = ErrorBody), (status = 404, description = "Not found", body = ErrorBody)))]
pub(crate) async fn session_view(
    State(hub): Shared,
    Path(session_id): Path<String>,
    uri: axum::http::Uri,
) -> Result<Json<Value>, SsfError> {
    let query: IssuerQuery = query_of(&uri, "issuer")?;
    let issuers = match query.issuer {
        Some(issuer) => vec![issuer],
        None => hub.issuers().names(),
    };
    let mut found = Vec::new();
    for issuer in issuers {
        let key = crate::scope::scoped(&issuer, &session_id);
        if let Some(view) = session_view_of(&hub, &key).await? {
            found.push((issuer, view));
        }
    }
    Ok(Json(the_one(found, "session id")?))
}

/// The view of the session `key`, merged across partitions (Kafka mode).
pub(crate) async fn session_view_of(hub: &Hub, key: &str) -> Result<Option<Value>, SsfError> {
    // In Kafka mode a session's graph lives with its partition's owner.
    let Some(store) = hub.graph_store_of(key).await else { return Ok(None) };
    let storage = |e: StoreError| SsfError::Storage(e.to_string());
    let Some((mut view, mut foreign)) = store.read(|txn| session_view_in(txn, key)).map_err(storage)? else {
        return Ok(None);
    };
    // Subtrees that live in other partitions (Kafka mode: a session seen
    // before its parent), as far as this instance holds them.
    let mut seen: std::collections::BTreeSet<String> = view["subtree"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|entry| entry["key"].as_str().map(str::to_owned))
        .collect();
    while let Some((child, root)) = foreign.pop() {
        if !seen.insert(child.clone()) {
            continue;
        }
        let part = match hub.graph_store_of_root(&root).await {
            Some(store) => store.read(|txn| session_view_in(txn, &child)).map_err(storage)?,
            None => None,
        };
        let subtree = view["subtree"].as_array_mut().ok_or_else(|| SsfError::Storage("view".into()))?;
        match part {
            Some((part, more)) => {
                for entry in part["subtree"].as_array().cloned().unwrap_or_default() {
                    let id = entry["key"].as_str().unwrap_or_default().to_owned();
                    if id == child || seen.insert(id) {
                        subtree.push(entry);
                    }
                }
                foreign.extend(more);
            }
            None => subtree.push(json!({"session_id": crate::scope::local_id(&child), "elsewhere": true})),
        }
    }
    // The graph keys served to merge partitions; the operator sees ids.
    for entry in view["subtree"].as_array_mut().into_iter().flatten() {
        if let Some(entry) = entry.as_object_mut() {
            entry.remove("key");
        }
    }
    Ok(Some(view))
}

/// A session's view, and the (child, root) pairs of its subtree's children
/// whose trees live in other partitions.
type View = (Value, Vec<(String, String)>);

/// A session as the operator sees it: ids as the IdP named them.
fn session_json(record: &graph::SessionRecord) -> Value {
    json!({
        "session_id": record.local_id(),
        "issuer": record.issuer,
        "subject": record.subject,
        "user": record.user,
        "parent": record.parent.as_deref().map(crate::scope::local_id),
        "authority": record.authority,
        "established_at_ms": record.established_at_ms,
        "last_active_ms": record.last_active_ms.max(record.established_at_ms),
        "expires_at_ms": record.expires_at_ms,
        // When the pruner next looks at it (it goes then unless still in use).
        "kept_until_ms": record.prune_at_ms,
        "revoked": record.revoked.as_ref().map(|revoked| json!({
            "txn": crate::scope::local_id(&revoked.txn),
            "at_ms": revoked.at_ms,
        })),
    })
}

fn session_view_in(txn: &redb::ReadTransaction, key: &str) -> Result<Option<View>, StoreError> {
    let Some(session) = graph::session_in(txn, key)? else { return Ok(None) };
    let touches_of = |id: &str| -> Result<Vec<Value>, StoreError> {
        Ok(graph::touches_in(txn, id)?
            .into_iter()
            .map(|(stream_id, touch)| json!({"stream_id": stream_id, "touched_at_ms": touch.at_ms, "by_idp": touch.by_idp}))
            .collect())
    };
    let mut subtree = Vec::new();
    let mut foreign = Vec::new();
    for id in graph::subtree_in(txn, &[key.to_owned()])? {
        foreign.extend(graph::foreign_children_in(txn, &id)?);
        if let Some(record) = graph::session_in(txn, &id)? {
            let mut entry = session_json(&record);
            entry["key"] = json!(record.session_id);
            entry["touches"] = Value::Array(touches_of(&id)?);
            subtree.push(entry);
        }
    }
    let view = json!({"session": session_json(&session), "touches": touches_of(key)?, "subtree": subtree});
    Ok(Some((view, foreign)))
}
