//! `/console/cascades`: recent cascades and search by `txn`; one cascade's
//! revoked tree with every leaf, its latency CDF and its timeline.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use caep_schemas::event::StreamStatus;
use serde::Deserialize;

use super::auth::Operator;
use super::svg::Cdf;
use super::{Console, ConsoleError, millis, render, when, when_or_dash};
use crate::cascade::{self, CascadeRecord, Leaf, LeafStatus};
use crate::graph;
use crate::hub::Hub;
use crate::scope;

/// Deepest parent chain followed above a cascade's sessions.
const MAX_DEPTH: usize = 64;
/// Incomplete leaves listed at the top of a cascade page.
const LISTED_INCOMPLETE: usize = 200;

/// One cascade in a list.
pub(super) struct CascadeRow {
    pub txn: String,
    pub issuer: String,
    pub root: String,
    pub event: String,
    pub started: String,
    pub total: u64,
    pub delivered: u64,
    pub failed: u64,
    pub complete: bool,
    pub took: String,
}

impl From<CascadeRecord> for CascadeRow {
    fn from(record: CascadeRecord) -> Self {
        CascadeRow {
            txn: scope::local_id(&record.key).to_owned(),
            root: record.root,
            event: short_type(&record.event_type).to_owned(),
            started: when(record.started_at_ms),
            total: record.total,
            delivered: record.delivered,
            failed: record.failed,
            complete: record.completed_at_ms.is_some(),
            took: millis(record.completed_at_ms.map(|done| done.saturating_sub(record.started_at_ms))),
            issuer: record.issuer,
        }
    }
}

/// The last path segment of an event type URI.
fn short_type(uri: &str) -> &str {
    uri.rsplit('/').next().unwrap_or(uri)
}

#[derive(Deserialize)]
pub(super) struct Search {
    #[serde(default)]
    txn: Option<String>,
}

#[derive(Template)]
#[template(path = "console/cascades.html")]
struct CascadeList {
    csrf: String,
    refresh: bool,
    open: Vec<CascadeRow>,
    open_total: u64,
    completed: Vec<CascadeRow>,
}

/// `GET /console/cascades[?txn=]`: recent cascades, or straight to one.
pub(super) async fn list(
    State(console): State<Arc<Console>>,
    operator: Operator,
    Query(search): Query<Search>,
) -> Result<Response, ConsoleError> {
    if let Some(txn) = search.txn.as_deref().map(str::trim).filter(|txn| !txn.is_empty()) {
        return Ok(Redirect::to(&format!("/console/cascades/{}", encode_segment(txn))).into_response());
    }
    console.fresh().await;
    let recent = console.hub.store().read(|txn| cascade::recent(txn, 100))?;
    let page = CascadeList {
        csrf: operator.csrf,
        refresh: recent.open_total > 0,
        open: recent.open.into_iter().map(CascadeRow::from).collect(),
        open_total: recent.open_total,
        completed: recent.completed.into_iter().map(CascadeRow::from).collect(),
    };
    Ok(render(&page))
}

/// A path segment, percent-encoded.
pub(super) fn encode_segment(segment: &str) -> String {
    askama::filters::urlencode_strict(segment).map(|encoded| encoded.to_string()).unwrap_or_default()
}

#[derive(Deserialize)]
pub(super) struct Which {
    #[serde(default)]
    issuer: Option<String>,
}

/// One leaf on the page.
struct LeafRow {
    stream_id: String,
    status: &'static str,
    latency: String,
    /// Why an incomplete leaf is not delivered; empty once delivered.
    why: String,
    jti: String,
}

/// One session of the revoked tree, in pre-order.
struct TreeRow {
    /// `</details>` to close before this row (leaving deeper subtrees).
    closes: usize,
    depth: usize,
    session_id: String,
    delivered: usize,
    leaves: Vec<LeafRow>,
    /// Has descendants or leaves to fold.
    incomplete: bool,
}

#[derive(Template)]
#[template(path = "console/cascade.html")]
struct CascadePage {
    csrf: String,
    refresh: bool,
    row: CascadeRow,
    issuer_query: String,
    pending: u64,
    p50: String,
    p99: String,
    max: String,
    first_leaf: String,
    last_leaf: String,
    cdf: Option<Cdf>,
    incomplete: Vec<(String, LeafRow)>,
    incomplete_total: usize,
    tree: Vec<TreeRow>,
    closes_at_end: usize,
}

/// Several IdPs used one id: the operator picks the IdP.
#[derive(Template)]
#[template(path = "console/choose.html")]
pub(super) struct Choose {
    csrf: String,
    what: &'static str,
    id: String,
    base: &'static str,
    issuers: Vec<String>,
}

impl Choose {
    pub(super) fn new(csrf: String, what: &'static str, id: String, base: &'static str, issuers: Vec<String>) -> Self {
        Choose { csrf, what, id, base, issuers }
    }
}

/// `GET /console/cascades/{txn}[?issuer=]`.
pub(super) async fn page(
    State(console): State<Arc<Console>>,
    operator: Operator,
    Path(txn): Path<String>,
    Query(which): Query<Which>,
) -> Result<Response, ConsoleError> {
    console.fresh().await;
    let hub = &console.hub;
    let issuers = which.issuer.map_or_else(|| hub.issuers().names(), |issuer| vec![issuer]);
    let mut found = Vec::new();
    for issuer in issuers {
        let key = cascade::key(&issuer, &txn);
        if let Some(cascade) = hub.store().read(|read| cascade::cascade_and_leaves(read, &key))? {
            found.push(cascade);
        }
    }
    let (record, leaves) = match found.len() {
        0 => return Err(ConsoleError::NotFound("No cascade has this txn (or it was pruned after its retention).")),
        1 => found.remove(0),
        _ => {
            let issuers = found.into_iter().map(|(record, _)| record.issuer).collect();
            let page = Choose::new(operator.csrf, "txn", txn, "/console/cascades/", issuers);
            return Ok(render(&page));
        }
    };
    Ok(render(&cascade_page(hub, operator.csrf, record, leaves).await))
}

async fn cascade_page(hub: &Hub, csrf: String, record: CascadeRecord, leaves: Vec<Leaf>) -> CascadePage {
    let mut latencies: Vec<u64> = leaves.iter().filter_map(Leaf::latency_ms).collect();
    latencies.sort_unstable();
    let first_leaf = leaves.iter().filter_map(|leaf| leaf.acked_at_ms).min();
    let last_leaf = leaves.iter().filter_map(|leaf| leaf.acked_at_ms).max();
    let settled = leaves.iter().filter(|leaf| matches!(leaf.status, LeafStatus::Delivered | LeafStatus::Failed));
    let pending = (leaves.len() - settled.count()) as u64;
    let mut incomplete = Vec::new();
    let mut incomplete_total = 0;
    let mut by_session: BTreeMap<String, Vec<LeafRow>> = BTreeMap::new();
    for leaf in &leaves {
        let row = leaf_row(hub, leaf);
        if !row.why.is_empty() {
            incomplete_total += 1;
            if incomplete.len() < LISTED_INCOMPLETE {
                incomplete.push((scope::local_id(&leaf.session_id).to_owned(), leaf_row(hub, leaf)));
            }
        }
        by_session.entry(leaf.session_id.clone()).or_default().push(row);
    }
    let (tree, closes_at_end) = tree_rows(hub, by_session).await;
    let issuer_query = format!("?issuer={}", super::cascades::encode_segment(&record.issuer));
    let row = CascadeRow::from(record);
    CascadePage {
        csrf,
        refresh: !row.complete,
        issuer_query,
        pending,
        p50: millis(cascade::percentile(&latencies, 50)),
        p99: millis(cascade::percentile(&latencies, 99)),
        max: millis(latencies.last().copied()),
        first_leaf: when_or_dash(first_leaf),
        last_leaf: when_or_dash(last_leaf),
        cdf: Cdf::of(&latencies),
        incomplete,
        incomplete_total,
        tree,
        closes_at_end,
        row,
    }
}

fn leaf_row(hub: &Hub, leaf: &Leaf) -> LeafRow {
    let (status, why) = match leaf.status {
        LeafStatus::Delivered => ("delivered", String::new()),
        LeafStatus::Failed => {
            ("dead-lettered", format!("dead-lettered: {}", leaf.err.as_deref().unwrap_or("delivery gave up")))
        }
        LeafStatus::Planned => ("planned", "planned, not yet signed into the outbox".to_owned()),
        LeafStatus::Pending => ("pending", why_pending(hub, &leaf.stream_id)),
    };
    LeafRow {
        stream_id: leaf.stream_id.clone(),
        status,
        latency: millis(leaf.latency_ms()),
        why,
        jti: leaf.jti.clone(),
    }
}

/// Why a leaf in the outbox is not acknowledged yet, from its stream.
fn why_pending(hub: &Hub, stream_id: &str) -> String {
    let transmitter = hub.transmitter();
    let Some(record) = transmitter.streams().get(stream_id) else { return "its stream was deleted".to_owned() };
    match record.status {
        StreamStatus::Paused => return "stream paused: held until resumed".to_owned(),
        StreamStatus::Disabled => return "stream disabled".to_owned(),
        StreamStatus::Enabled => {}
    }
    let health = transmitter.outbox().health().of(stream_id);
    match (&health.last_failure, health.failing_since_ms) {
        (Some(failure), Some(_)) => {
            format!("retrying ({} failed attempts): {}", health.failures_in_a_row, failure.reason)
        }
        _ if record.config.delivery.method() == caep_schemas::ssf::POLL_METHOD => {
            "waiting for the receiver to poll and acknowledge".to_owned()
        }
        _ => "in flight".to_owned(),
    }
}

/// The sessions in pre-order under their parents, with the chain above
/// them as far as the graph knows it; and how many `</details>` close the
/// last one.
async fn tree_rows(hub: &Hub, mut by_session: BTreeMap<String, Vec<LeafRow>>) -> (Vec<TreeRow>, usize) {
    let mut parent_of: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut to_visit: Vec<String> = by_session.keys().cloned().collect();
    while let Some(key) = to_visit.pop() {
        if parent_of.contains_key(&key) || parent_of.len() >= by_session.len() + MAX_DEPTH {
            continue;
        }
        let parent = parent_in_graph(hub, &key).await;
        if let Some(parent) = &parent {
            to_visit.push(parent.clone());
        }
        parent_of.insert(key, parent);
    }
    let mut children: BTreeMap<Option<String>, Vec<String>> = BTreeMap::new();
    for (key, parent) in &parent_of {
        let parent = parent.clone().filter(|parent| parent_of.contains_key(parent));
        children.entry(parent).or_default().push(key.clone());
    }
    let mut rows = Vec::new();
    let mut seen = BTreeSet::new();
    // (key, depth) in pre-order; a session's children follow it.
    let mut stack: Vec<(String, usize)> =
        children.get(&None).into_iter().flatten().rev().map(|key| (key.clone(), 0)).collect();
    let mut depth_open = 0;
    while let Some((key, depth)) = stack.pop() {
        if !seen.insert(key.clone()) {
            continue;
        }
        let closes = depth_open - depth;
        depth_open = depth + 1;
        let leaves = by_session.remove(&key).unwrap_or_default();
        let delivered = leaves.iter().filter(|leaf| leaf.why.is_empty()).count();
        let incomplete = delivered < leaves.len();
        rows.push(TreeRow {
            closes,
            depth,
            session_id: scope::local_id(&key).to_owned(),
            delivered,
            leaves,
            incomplete,
        });
        for child in children.get(&Some(key)).into_iter().flatten().rev() {
            stack.push((child.clone(), depth + 1));
        }
    }
    (rows, depth_open)
}

/// A session's parent key, from whichever store holds its graph.
async fn parent_in_graph(hub: &Hub, key: &str) -> Option<String> {
    let store = hub.graph_store_of(key).await?;
    store.read(|txn| graph::session_in(txn, key)).ok().flatten().and_then(|record| record.parent)
}
