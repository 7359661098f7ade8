//! `/console/cascades`: recent cascades and search by `txn`; one cascade's
//! revoked tree with every leaf, its latency CDF and its timeline.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::Uri;
use axum::response::{IntoResponse, Redirect, Response};
use caep_schemas::event::StreamStatus;
use serde::Deserialize;

use super::auth::Operator;
use super::svg::Cdf;
use super::{Console, ConsoleError, auto_refresh, millis, render, when, when_or_dash};
use crate::cascade::{self, CascadeRecord, Leaf, LeafStatus};
use crate::graph;
use crate::hub::Hub;
use crate::scope;

/// Sessions without leaves looked up above a cascade's sessions (the
/// chains linking them to their roots).
const MAX_ANCESTORS: usize = 10_000;
/// Deepest nesting drawn (browsers flatten deeper markup anyway).
const MAX_DEPTH_SHOWN: usize = 32;
/// Leaves above which an incomplete cascade's page refreshes every 10 s, not 2.
const BIG_CASCADE: u64 = 1000;
/// Leaf rows a cascade page lists in its tree, at most (every session is
/// still shown, with its counts; the CLI and API list every leaf).
const MAX_LISTED_LEAVES: usize = 20_000;
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
    refresh: Option<String>,
    open: Vec<CascadeRow>,
    open_total: u64,
    completed: Vec<CascadeRow>,
}

/// `GET /console/cascades[?txn=]`: recent cascades, or straight to one.
pub(super) async fn list(
    State(console): State<Arc<Console>>,
    operator: Operator,
    uri: Uri,
    Query(search): Query<Search>,
) -> Result<Response, ConsoleError> {
    if let Some(txn) = search.txn.as_deref().map(str::trim).filter(|txn| !txn.is_empty()) {
        return Ok(Redirect::to(&format!("/console/cascades/{}", encode_segment(txn))).into_response());
    }
    console.fresh().await;
    let recent = console.hub.store().read(|txn| cascade::recent(txn, 100))?;
    let page = CascadeList {
        csrf: operator.csrf,
        refresh: (recent.open_total > 0).then(|| auto_refresh(&uri, 2)),
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
#[derive(Clone)]
struct LeafRow {
    /// The name of the stream's receiver (empty for a deleted stream).
    receiver: String,
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
    session_id: String,
    delivered: usize,
    /// Leaves of this session, listed or not.
    total: usize,
    leaves: Vec<LeafRow>,
    /// Some leaf here is not delivered.
    incomplete: bool,
    /// Shown unfolded: a root, or on the way to an incomplete leaf.
    unfold: bool,
}

#[derive(Template)]
#[template(path = "console/cascade.html")]
struct CascadePage {
    csrf: String,
    refresh: Option<String>,
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
    /// Leaves left out of the tree to keep the page bounded (counted still).
    unlisted: usize,
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
    uri: Uri,
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
    let mut page = cascade_page(hub, operator.csrf, record, leaves).await;
    if !page.row.complete {
        // A big page is costly to build and to render: refreshed less often.
        let seconds = if page.row.total > BIG_CASCADE { 10 } else { 2 };
        page.refresh = Some(auto_refresh(&uri, seconds));
    }
    Ok(render(&page))
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
    let mut receivers = ReceiverNames::default();
    for leaf in &leaves {
        let row = leaf_row(hub, leaf, receivers.of(hub, &leaf.stream_id));
        if !row.why.is_empty() {
            incomplete_total += 1;
            if incomplete.len() < LISTED_INCOMPLETE {
                incomplete.push((scope::local_id(&leaf.session_id).to_owned(), row.clone()));
            }
        }
        by_session.entry(leaf.session_id.clone()).or_default().push(row);
    }
    let (mut tree, closes_at_end) = tree_rows(hub, by_session).await;
    let unlisted = cap_leaves(&mut tree, MAX_LISTED_LEAVES);
    let issuer_query = format!("?issuer={}", super::cascades::encode_segment(&record.issuer));
    let row = CascadeRow::from(record);
    CascadePage {
        csrf,
        refresh: None,
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
        unlisted,
        row,
    }
}

/// Keeps at most `budget` leaf rows in the tree, in tree order, incomplete
/// ones first within each session; returns how many were left out.
fn cap_leaves(tree: &mut [TreeRow], mut budget: usize) -> usize {
    let mut unlisted = 0;
    for row in tree {
        row.leaves.sort_by_key(|leaf| leaf.why.is_empty());
        let kept = row.leaves.len().min(budget);
        unlisted += row.leaves.len() - kept;
        row.leaves.truncate(kept);
        budget -= kept;
    }
    unlisted
}

/// The receiver name of each stream, looked up once per stream.
#[derive(Default)]
struct ReceiverNames(BTreeMap<String, String>);

impl ReceiverNames {
    fn of(&mut self, hub: &Hub, stream_id: &str) -> String {
        if let Some(name) = self.0.get(stream_id) {
            return name.clone();
        }
        let transmitter = hub.transmitter();
        let name = transmitter
            .streams()
            .get(stream_id)
            .and_then(|record| transmitter.receivers().get(&record.receiver_id).ok().flatten())
            .map(|receiver| receiver.name)
            .unwrap_or_default();
        self.0.insert(stream_id.to_owned(), name.clone());
        name
    }
}

fn leaf_row(hub: &Hub, leaf: &Leaf, receiver: String) -> LeafRow {
    let (status, why) = match leaf.status {
        LeafStatus::Delivered => ("delivered", String::new()),
        LeafStatus::Failed => {
            ("dead-lettered", format!("dead-lettered: {}", leaf.err.as_deref().unwrap_or("delivery gave up")))
        }
        LeafStatus::Planned => ("planned", "planned, not yet signed into the outbox".to_owned()),
        LeafStatus::Pending => ("pending", why_pending(hub, &leaf.stream_id)),
    };
    LeafRow {
        receiver,
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
/// last one. Every session with leaves is shown: one whose parents form a
/// cycle (an IdP may name a parent it introduces later) or lie beyond the
/// ancestor budget starts a tree of its own.
async fn tree_rows(hub: &Hub, by_session: BTreeMap<String, Vec<LeafRow>>) -> (Vec<TreeRow>, usize) {
    let parent_of = parents(hub, by_session.keys().cloned().collect()).await;
    arrange(&parent_of, by_session)
}

/// [`tree_rows`] once the parents are known.
fn arrange(
    parent_of: &BTreeMap<String, Option<String>>,
    mut by_session: BTreeMap<String, Vec<LeafRow>>,
) -> (Vec<TreeRow>, usize) {
    let known = |parent: &Option<String>| parent.clone().filter(|parent| parent_of.contains_key(parent));
    let mut children: BTreeMap<Option<String>, Vec<String>> = BTreeMap::new();
    for (key, parent) in parent_of {
        children.entry(known(parent)).or_default().push(key.clone());
    }
    // Sessions to unfold: every incomplete one and all its ancestors.
    let mut unfolded = BTreeSet::new();
    for (key, leaves) in &by_session {
        if leaves.iter().any(|leaf| !leaf.why.is_empty()) {
            let mut at = Some(key.clone());
            while let Some(key) = at.filter(|key| unfolded.insert(key.clone())) {
                at = parent_of.get(&key).and_then(known);
            }
        }
    }
    let roots = children.get(&None).cloned().unwrap_or_default();
    let mut rows = Vec::new();
    let mut seen = BTreeSet::new();
    let mut depth_open = 0;
    // Roots first, then whatever no root reached (cycles).
    for start in roots.iter().chain(parent_of.keys()) {
        let mut stack = vec![(start.clone(), 0usize)];
        while let Some((key, depth)) = stack.pop() {
            if !seen.insert(key.clone()) {
                continue;
            }
            // Deeper nesting is drawn flat at the deepest level shown.
            let depth = depth.min(MAX_DEPTH_SHOWN);
            let closes = depth_open - depth;
            depth_open = depth + 1;
            let leaves = by_session.remove(&key).unwrap_or_default();
            let delivered = leaves.iter().filter(|leaf| leaf.why.is_empty()).count();
            rows.push(TreeRow {
                closes,
                session_id: scope::local_id(&key).to_owned(),
                delivered,
                total: leaves.len(),
                incomplete: delivered < leaves.len(),
                unfold: depth == 0 || unfolded.contains(&key),
                leaves,
            });
            for child in children.get(&Some(key)).into_iter().flatten().rev() {
                stack.push((child.clone(), depth + 1));
            }
        }
    }
    (rows, depth_open)
}

/// The parent of each session in `keys` and of their ancestors, up to
/// [`MAX_ANCESTORS`] ancestors without leaves; `None` for a root.
async fn parents(hub: &Hub, keys: Vec<String>) -> BTreeMap<String, Option<String>> {
    let mut parent_of: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut ancestors = Vec::new();
    for key in keys {
        let parent = parent_in_graph(hub, &key).await;
        ancestors.extend(parent.clone());
        parent_of.insert(key, parent);
    }
    let mut budget = MAX_ANCESTORS;
    while let Some(key) = ancestors.pop() {
        if parent_of.contains_key(&key) || budget == 0 {
            continue;
        }
        budget -= 1;
        let parent = parent_in_graph(hub, &key).await;
        ancestors.extend(parent.clone());
        parent_of.insert(key, parent);
    }
    parent_of
}

/// A session's parent key, from whichever store holds its graph.
async fn parent_in_graph(hub: &Hub, key: &str) -> Option<String> {
    let store = hub.graph_store_of(key).await?;
    store.read(|txn| graph::session_in(txn, key)).ok().flatten().and_then(|record| record.parent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(delivered: bool) -> LeafRow {
        LeafRow {
            receiver: "r".into(),
            stream_id: "s".into(),
            status: if delivered { "delivered" } else { "pending" },
            latency: String::new(),
            why: if delivered { String::new() } else { "in flight".into() },
            jti: "j".into(),
        }
    }

    fn shape(rows: &[TreeRow], closes_at_end: usize) -> String {
        let mut out: String = rows
            .iter()
            .map(|row| format!("{}<{}{}>", "/".repeat(row.closes), row.session_id, if row.unfold { "+" } else { "" }))
            .collect();
        out.push_str(&"/".repeat(closes_at_end));
        out
    }

    #[test]
    fn a_capped_tree_keeps_incomplete_leaves_first_and_counts_the_rest() {
        let row = |leaves: Vec<LeafRow>| TreeRow {
            closes: 0,
            session_id: "s".into(),
            delivered: 0,
            total: leaves.len(),
            leaves,
            incomplete: false,
            unfold: false,
        };
        let mut tree = vec![row(vec![leaf(true), leaf(false), leaf(true)]), row(vec![leaf(false), leaf(true)])];
        assert_eq!(cap_leaves(&mut tree, 2), 3);
        assert_eq!(tree[0].leaves.len(), 2);
        assert!(!tree[0].leaves[0].why.is_empty(), "the incomplete leaf is kept first");
        assert!(tree[1].leaves.is_empty());
        assert_eq!((tree[0].total, tree[1].total), (3, 2), "counts stay");
    }

    #[test]
    fn sessions_nest_under_parents_and_cycles_still_show() {
        let parent_of: BTreeMap<String, Option<String>> =
            [("R", None), ("C1", Some("R")), ("G", Some("C1")), ("C2", Some("R")), ("X", Some("Y")), ("Y", Some("X"))]
                .into_iter()
                .map(|(k, p)| (k.to_owned(), p.map(str::to_owned)))
                .collect();
        let by_session: BTreeMap<String, Vec<LeafRow>> = [
            ("R", leaf(true)),
            ("C1", leaf(true)),
            ("G", leaf(false)),
            ("C2", leaf(true)),
            ("X", leaf(true)),
            ("Y", leaf(true)),
        ]
        .into_iter()
        .map(|(k, l)| (k.to_owned(), vec![l]))
        .collect();
        let (rows, closes_at_end) = arrange(&parent_of, by_session);
        // G is incomplete: it and its ancestors are unfolded; the X-Y cycle
        // has no root but is shown, starting from X.
        assert_eq!(shape(&rows, closes_at_end), "<R+><C1+><G+>//<C2>//<X+><Y>//");
    }
}
