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
/// Most dead letters examined to fill one page when filtering by error.
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
    /// The cascade page of a leaf's dead letter.
    cascade: Option<String>,
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
    // A position inside another stream than the filtered one is ignored:
    // a page of one stream never lists another's letters.
    let start = filter
        .after_stream
        .clone()
        .zip(filter.after_seq)
        .filter(|(stream, _)| stream_id.as_ref().is_none_or(|filtered| filtered == stream));
    let (letters, resume_at) = scan(outbox, stream_id.as_deref(), err.as_deref(), start)?;
    let next = resume_at.map(|(stream, seq)| {
        let mut query = format!("after_stream={}&after_seq={seq}", encode_segment(&stream));
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

/// A place in the dead letters: (stream, sequence).
type Position = (String, u64);

/// Up to a page of dead letters after `start` that match the filters, and
/// where the next page resumes (the last letter examined), unless the scan
/// reached the end. At most [`SCAN_BUDGET`] letters are examined.
fn scan(
    outbox: &caep_transmitter::outbox::Outbox,
    stream_id: Option<&str>,
    err: Option<&str>,
    start: Option<Position>,
) -> Result<(Vec<DeadLetter>, Option<Position>), ConsoleError> {
    let mut position = start;
    let mut letters = Vec::new();
    let mut scanned = 0;
    while scanned < SCAN_BUDGET {
        let after = position.as_ref().map(|(stream, seq)| (stream.as_str(), *seq));
        let (page, more) = outbox.dead_letters(stream_id, after, PAGE)?;
        for letter in page {
            scanned += 1;
            position = Some((letter.stream_id.clone(), letter.seq));
            if err.is_none_or(|err| letter.err == err) {
                letters.push(letter);
                if letters.len() == PAGE {
                    return Ok((letters, position));
                }
            }
        }
        if !more {
            return Ok((letters, None));
        }
    }
    Ok((letters, position))
}

fn row(letter: DeadLetter) -> LetterRow {
    LetterRow {
        stream_id: letter.stream_id,
        jti: letter.set.jti,
        // A cascade leaf's txn is its cascade's key: (IdP, txn).
        cascade: letter.set.txn.as_deref().and_then(crate::scope::unscope).map(|(issuer, txn)| {
            format!("/console/cascades/{}?issuer={}", encode_segment(txn), encode_segment(issuer))
        }),
        txn: letter.set.txn.as_deref().map(|txn| crate::scope::local_id(txn).to_owned()).unwrap_or_default(),
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
