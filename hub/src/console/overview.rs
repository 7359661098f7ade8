//! `/console`: IdPs, receivers and their streams' health, and cascades in
//! progress and recently completed.

use std::sync::Arc;

use askama::Template;
use axum::extract::State;
use axum::http::Uri;
use axum::response::Response;
use caep_transmitter::registry::StreamRecord;
use caep_transmitter::service::Transmitter;

use super::auth::Operator;
use super::cascades::CascadeRow;
use super::{Console, ConsoleError, auto_refresh, render, when, when_or_dash};
use crate::cascade;

/// Queued SETs and dead letters are counted up to this many per stream.
const COUNT_CAP: usize = 10_000;
/// Cascades listed per group (in progress, recently completed).
const LISTED_CASCADES: usize = 20;

#[derive(Template)]
#[template(path = "console/overview.html")]
struct Overview {
    csrf: String,
    refresh: Option<String>,
    issuers: Vec<IssuerRow>,
    receivers: Vec<ReceiverRow>,
    open: Vec<CascadeRow>,
    open_total: u64,
    completed: Vec<CascadeRow>,
}

struct IssuerRow {
    issuer: String,
    keys: String,
    registered: String,
    last_event: String,
}

struct ReceiverRow {
    name: String,
    receiver_id: String,
    audience: String,
    issuers: String,
    streams: Vec<StreamRow>,
}

/// One stream's line: configuration and delivery health.
pub(super) struct StreamRow {
    pub stream_id: String,
    pub method: &'static str,
    pub status: String,
    pub reason: String,
    pub queued: String,
    pub dead_letters: String,
    pub last_delivery: String,
    /// Empty when the last attempt succeeded.
    pub failing: String,
    pub verification: String,
}

impl StreamRow {
    pub(super) fn of(transmitter: &Transmitter, record: &StreamRecord) -> Self {
        let stream_id = record.config.stream_id.clone();
        let health = transmitter.outbox().health().of(&stream_id);
        let failing = match (&health.last_failure, health.failing_since_ms) {
            (Some(failure), Some(since)) => {
                format!("{} failed attempts since {}; last: {}", health.failures_in_a_row, when(since), failure.reason)
            }
            _ => String::new(),
        };
        let verification = match &health.verification {
            None => {
                record.last_verification_ms.map_or_else(|| "never asked".to_owned(), |at| format!("asked {}", when(at)))
            }
            Some(sent) => match (sent.acknowledged_at_ms, &sent.failed) {
                (Some(at), _) => format!("sent {}, acknowledged {}", when(sent.sent_at_ms), when(at)),
                (None, Some(reason)) => format!("sent {}, dead-lettered: {reason}", when(sent.sent_at_ms)),
                (None, None) => format!("sent {}, not yet acknowledged", when(sent.sent_at_ms)),
            },
        };
        let (queued, dead_letters) = transmitter.outbox().counts_up_to(&stream_id, COUNT_CAP).unwrap_or_default();
        let capped = |count: u64| if count >= COUNT_CAP as u64 { format!("{COUNT_CAP}+") } else { count.to_string() };
        StreamRow {
            method: record.config.delivery.method(),
            status: status_label(record),
            reason: record.reason.clone().unwrap_or_default(),
            queued: capped(queued),
            dead_letters: capped(dead_letters),
            last_delivery: when_or_dash(health.last_delivered_ms),
            failing,
            verification,
            stream_id,
        }
    }
}

/// `enabled`, `paused` or `disabled`.
pub(super) fn status_label(record: &StreamRecord) -> String {
    serde_json::to_value(record.status).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

pub(super) async fn page(
    State(console): State<Arc<Console>>,
    operator: Operator,
    uri: Uri,
) -> Result<Response, ConsoleError> {
    console.fresh().await;
    let hub = &console.hub;
    let transmitter = hub.transmitter();
    let issuers = hub
        .issuers()
        .list()?
        .into_iter()
        .map(|trusted| IssuerRow {
            keys: keys_of(&trusted),
            registered: when(trusted.registered_at_ms),
            last_event: when_or_dash(hub.issuers().last_event(&trusted.issuer)),
            issuer: trusted.issuer,
        })
        .collect();
    let mut receivers: Vec<ReceiverRow> = transmitter
        .receivers()
        .list()?
        .into_iter()
        .map(|receiver| ReceiverRow {
            streams: transmitter
                .streams()
                .owned_by(&receiver.receiver_id)
                .iter()
                .map(|record| StreamRow::of(transmitter, record))
                .collect(),
            issuers: receiver.issuers.as_ref().map_or_else(|| "every trusted IdP".to_owned(), |list| list.join(", ")),
            name: receiver.name,
            receiver_id: receiver.receiver_id,
            audience: receiver.audience,
        })
        .collect();
    receivers.sort_by(|a, b| (&a.name, &a.receiver_id).cmp(&(&b.name, &b.receiver_id)));
    let recent = hub.store().read(|txn| cascade::recent(txn, LISTED_CASCADES))?;
    let page = Overview {
        csrf: operator.csrf,
        refresh: (recent.open_total > 0).then(|| auto_refresh(&uri, 2)),
        issuers,
        receivers,
        open: recent.open.into_iter().map(CascadeRow::from).collect(),
        open_total: recent.open_total,
        completed: recent.completed.into_iter().map(CascadeRow::from).collect(),
    };
    Ok(render(&page))
}

/// The IdP's keys: inline key ids, or where they are fetched from.
fn keys_of(trusted: &crate::issuers::TrustedIssuer) -> String {
    if let Some(uri) = &trusted.jwks_uri {
        return format!("fetched from {uri}");
    }
    let kids: Vec<&str> = trusted
        .jwks
        .as_ref()
        .and_then(|jwks| jwks["keys"].as_array())
        .into_iter()
        .flatten()
        .map(|key| key["kid"].as_str().unwrap_or("(no kid)"))
        .collect();
    format!("{} inline: {}", kids.len(), kids.join(", "))
}
