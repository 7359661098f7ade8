//! `/console/sessions`: look a session up; its delegation chain up to the
//! root, its subtree, its touches, its user and its state.

use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use serde_json::Value;

use super::auth::Operator;
use super::cascades::encode_segment;
use super::{Console, ConsoleError, render, when, when_or_dash};
use crate::graph;
use crate::hub::Hub;
use crate::scope;

/// Longest delegation chain followed up to its root.
const MAX_CHAIN: usize = 64;

#[derive(Deserialize)]
pub(super) struct Search {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    issuer: Option<String>,
}

/// `GET /console/sessions?id=[&issuer=]`: to the session's page.
pub(super) async fn search(_operator: Operator, Query(search): Query<Search>) -> Result<Response, ConsoleError> {
    let id = search.id.as_deref().map(str::trim).filter(|id| !id.is_empty());
    let Some(id) = id else { return Err(ConsoleError::BadRequest("Give a session id to look up.".into())) };
    let mut target = format!("/console/sessions/{}", encode_segment(id));
    if let Some(issuer) = search.issuer.filter(|issuer| !issuer.is_empty()) {
        target.push_str(&format!("?issuer={}", encode_segment(&issuer)));
    }
    Ok(Redirect::to(&target).into_response())
}

/// A session as the page shows it.
struct SessionRow {
    session_id: String,
    state: String,
    revoked_txn: Option<String>,
    established: String,
    last_active: String,
    touches: usize,
    depth: usize,
}

struct TouchRow {
    stream_id: String,
    at: String,
    by_idp: bool,
}

#[derive(Template)]
#[template(path = "console/session.html")]
struct SessionPage {
    csrf: String,
    issuer: String,
    issuer_query: String,
    session: SessionRow,
    subject: String,
    user: String,
    authority: String,
    expires: String,
    chain: Vec<String>,
    chain_cut: bool,
    touches: Vec<TouchRow>,
    subtree: Vec<SessionRow>,
    elsewhere: Vec<String>,
}

#[derive(Deserialize)]
pub(super) struct Which {
    #[serde(default)]
    issuer: Option<String>,
}

/// `GET /console/sessions/{session_id}[?issuer=]`.
pub(super) async fn page(
    State(console): State<Arc<Console>>,
    operator: Operator,
    Path(session_id): Path<String>,
    Query(which): Query<Which>,
) -> Result<Response, ConsoleError> {
    console.fresh().await;
    let hub = &console.hub;
    let issuers = which.issuer.map_or_else(|| hub.issuers().names(), |issuer| vec![issuer]);
    let mut found = Vec::new();
    for issuer in issuers {
        let key = scope::scoped(&issuer, &session_id);
        let view =
            crate::http::session_view_of(hub, &key).await.map_err(|e| ConsoleError::Unavailable(e.to_string()))?;
        if let Some(view) = view {
            found.push((issuer, key, view));
        }
    }
    let (issuer, key, view) = match found.len() {
        0 => return Err(ConsoleError::NotFound("No session has this id (or it was pruned).")),
        1 => found.remove(0),
        _ => {
            let issuers = found.into_iter().map(|(issuer, _, _)| issuer).collect();
            let page =
                super::cascades::Choose::new(operator.csrf, "session id", session_id, "/console/sessions/", issuers);
            return Ok(render(&page));
        }
    };
    let (chain, chain_cut) = chain_of(hub, &key).await;
    let now = caep_transmitter::outbox::now_ms();
    let session = &view["session"];
    let own_id = session["session_id"].as_str().unwrap_or_default().to_owned();
    let (subtree, elsewhere) = subtree_rows(&view["subtree"], &own_id, now);
    let page = SessionPage {
        csrf: operator.csrf,
        issuer_query: format!("?issuer={}", encode_segment(&issuer)),
        issuer,
        session: session_row(session, 0, now),
        subject: compact(&session["subject"]),
        user: compact(&session["user"]),
        authority: compact(&session["authority"]),
        expires: when_or_dash(session["expires_at_ms"].as_u64()),
        chain,
        chain_cut,
        touches: view["touches"].as_array().into_iter().flatten().map(touch_row).collect(),
        subtree,
        elsewhere,
    };
    Ok(render(&page))
}

/// The subtree's sessions (the page's own left out) in pre-order, each
/// under its parent, and the ids of children held by other instances.
fn subtree_rows(subtree: &Value, own_id: &str, now: u64) -> (Vec<SessionRow>, Vec<String>) {
    let mut children: std::collections::BTreeMap<&str, Vec<&Value>> = std::collections::BTreeMap::new();
    let mut elsewhere = Vec::new();
    for entry in subtree.as_array().into_iter().flatten() {
        let id = entry["session_id"].as_str().unwrap_or_default();
        if entry["elsewhere"].as_bool() == Some(true) {
            elsewhere.push(id.to_owned());
        } else if id != own_id {
            children.entry(entry["parent"].as_str().unwrap_or(own_id)).or_default().push(entry);
        }
    }
    let mut rows = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut stack: Vec<(&Value, usize)> =
        children.get(own_id).into_iter().flatten().rev().map(|entry| (*entry, 1)).collect();
    while let Some((entry, depth)) = stack.pop() {
        let id = entry["session_id"].as_str().unwrap_or_default();
        if !seen.insert(id) {
            continue;
        }
        rows.push(session_row(entry, depth, now));
        for child in children.get(id).into_iter().flatten().rev() {
            stack.push((*child, depth + 1));
        }
    }
    // Under a parent not listed here (merged from another partition).
    for entry in children.values().flatten() {
        if !seen.contains(entry["session_id"].as_str().unwrap_or_default()) {
            rows.push(session_row(entry, 1, now));
        }
    }
    (rows, elsewhere)
}

fn session_row(entry: &Value, depth: usize, now: u64) -> SessionRow {
    let revoked_txn = entry["revoked"]["txn"].as_str().map(str::to_owned);
    let state = match (&entry["revoked"], entry["expires_at_ms"].as_u64()) {
        (Value::Object(revoked), _) => format!("revoked {}", when(revoked["at_ms"].as_u64().unwrap_or(0))),
        (_, Some(end)) if end <= now => format!("expired {}", when(end)),
        (_, Some(end)) => format!("live, expires {}", when(end)),
        _ => "live".to_owned(),
    };
    SessionRow {
        session_id: entry["session_id"].as_str().unwrap_or_default().to_owned(),
        state,
        revoked_txn,
        established: when_or_dash(entry["established_at_ms"].as_u64()),
        last_active: when_or_dash(entry["last_active_ms"].as_u64()),
        touches: entry["touches"].as_array().map_or(0, Vec::len),
        depth,
    }
}

fn touch_row(touch: &Value) -> TouchRow {
    TouchRow {
        stream_id: touch["stream_id"].as_str().unwrap_or_default().to_owned(),
        at: when_or_dash(touch["touched_at_ms"].as_u64()),
        by_idp: touch["by_idp"].as_bool().unwrap_or(false),
    }
}

/// A JSON value on one line, or a dash for none.
fn compact(value: &Value) -> String {
    if value.is_null() { "—".to_owned() } else { value.to_string() }
}

/// The session ids from the root down to the parent of `key`, and whether
/// the chain was cut (longer than [`MAX_CHAIN`], or a parent not known here).
async fn chain_of(hub: &Hub, key: &str) -> (Vec<String>, bool) {
    let mut chain = Vec::new();
    let mut at = key.to_owned();
    loop {
        let Some(store) = hub.graph_store_of(&at).await else { return (reversed(chain), true) };
        let Some(record) = store.read(|txn| graph::session_in(txn, &at)).ok().flatten() else {
            // A parent pruned or not known to this instance.
            return (reversed(chain), at != key);
        };
        let Some(parent) = record.parent else { return (reversed(chain), false) };
        if chain.len() >= MAX_CHAIN {
            return (reversed(chain), true);
        }
        chain.push(scope::local_id(&parent).to_owned());
        at = parent;
    }
}

fn reversed(mut chain: Vec<String>) -> Vec<String> {
    chain.reverse();
    chain
}
