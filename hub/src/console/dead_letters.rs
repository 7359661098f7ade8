//! `/console/dead-letters`: SETs delivery gave up on, a page at a time,
//! filtered by stream and by error; replay one, or all of a stream.

use std::sync::Arc;

use askama::Template;
use axum::Form;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use caep_transmitter::outbox::DeadLetter;
use serde::Deserialize;

use super::auth::Operator;
use super::cascades::encode_segment;
use super::{Console, ConsoleError, render, when};

/// Dead letters per page.
const PAGE: usize = 50;
/// Most dead letters read to fill one page when filtering by error.
const SCAN_BUDGET: usize = 10_000;

#[derive(Deserialize)]
pub(super) struct Filter {
    #[serde(default)]
    stream_id: Option<String>,
    #[serde(default)]
    err: Option<String>,
    /// The last row of the previous page: stream and sequence.
    #[serde(default)]
    after_stream: Option<String>,
    #[serde(default)]
    after_seq: Option<u64>,
    /// How many the last replay put back (shown once).
    #[serde(default)]
    replayed: Option<usize>,
}

struct LetterRow {
    stream_id: String,
    jti: String,
    txn: String,
    err: String,
    description: String,
    failed: String,
}

#[derive(Template)]
#[template(path = "console/dead_letters.html")]
struct DeadLetters {
    csrf: String,
    stream_id: String,
    err: String,
    letters: Vec<LetterRow>,
    /// The query string of the next page, when there is one.
    next: Option<String>,
    replayed: Option<usize>,
}

/// `GET /console/dead-letters[?stream_id=&err=&after_stream=&after_seq=]`.
pub(super) async fn page(
    State(console): State<Arc<Console>>,
    operator: Operator,
    Query(filter): Query<Filter>,
) -> Result<Response, ConsoleError> {
    console.fresh().await;
    let stream_id = filter.stream_id.clone().filter(|s| !s.is_empty());
    let err = filter.err.clone().filter(|e| !e.is_empty());
    let outbox = console.hub.transmitter().outbox();
    let mut after = filter.after_stream.clone().zip(filter.after_seq);
    let mut letters: Vec<DeadLetter> = Vec::new();
    let mut scanned = 0;
    let mut more = true;
    while letters.len() < PAGE && more && scanned < SCAN_BUDGET {
        let position = after.as_ref().map(|(stream, seq)| (stream.as_str(), *seq));
        let (page, has_more) = outbox.dead_letters(stream_id.as_deref(), position, PAGE)?;
        more = has_more;
        scanned += page.len();
        after = page.last().map(|last| (last.stream_id.clone(), last.seq)).or(after);
        letters.extend(page.into_iter().filter(|letter| err.as_ref().is_none_or(|err| &letter.err == err)));
    }
    letters.truncate(PAGE);
    let next = (more || letters.len() == PAGE).then(|| letters.last()).flatten().map(|last| {
        let mut query = format!("after_stream={}&after_seq={}", encode_segment(&last.stream_id), last.seq);
        for (name, value) in [("stream_id", &stream_id), ("err", &err)] {
            if let Some(value) = value {
                query.push_str(&format!("&{name}={}", encode_segment(value)));
            }
        }
        query
    });
    let page = DeadLetters {
        csrf: operator.csrf,
        stream_id: stream_id.unwrap_or_default(),
        err: err.unwrap_or_default(),
        letters: letters.into_iter().map(row).collect(),
        next,
        replayed: filter.replayed,
    };
    Ok(render(&page))
}

fn row(letter: DeadLetter) -> LetterRow {
    LetterRow {
        stream_id: letter.stream_id,
        jti: letter.set.jti,
        txn: letter.set.txn.map(|txn| crate::scope::local_id(&txn).to_owned()).unwrap_or_default(),
        err: letter.err,
        description: letter.description,
        failed: when(letter.failed_at_ms),
    }
}

#[derive(Deserialize)]
pub(super) struct ReplayForm {
    #[serde(default)]
    csrf: String,
    stream_id: String,
    /// One SET; empty: every dead letter of the stream.
    #[serde(default)]
    jti: String,
}

/// `POST /console/dead-letters/replay`.
pub(super) async fn replay(
    State(console): State<Arc<Console>>,
    operator: Operator,
    headers: HeaderMap,
    Form(form): Form<ReplayForm>,
) -> Result<Response, ConsoleError> {
    operator.check(&headers, &form.csrf)?;
    let transmitter = console.hub.transmitter();
    if transmitter.streams().get(&form.stream_id).is_none() {
        return Err(ConsoleError::NotFound("No stream has this id."));
    }
    let jtis = if form.jti.is_empty() { Vec::new() } else { vec![form.jti.clone()] };
    let replayed = transmitter.outbox().replay(&form.stream_id, jtis).await?;
    tracing::info!(stream_id = %form.stream_id, replayed, "dead letters replayed from the console");
    let target = format!("/console/dead-letters?stream_id={}&replayed={replayed}", encode_segment(&form.stream_id));
    Ok(Redirect::to(&target).into_response())
}
