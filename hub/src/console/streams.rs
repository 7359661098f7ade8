//! `/console/streams/{stream_id}`: a stream's configuration, subjects and
//! delivery health; pause, resume or disable it (announced to the receiver
//! with a stream-updated SET, SSF 1.0 §8.1.5) and request a verification.

use std::sync::Arc;

use askama::Template;
use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use caep_schemas::event::StreamStatus;
use caep_schemas::set::Audience;
use caep_transmitter::error::SsfError;
use serde::Deserialize;

use super::auth::Operator;
use super::cascades::encode_segment;
use super::overview::StreamRow;
use super::{Console, ConsoleError, render, when, when_or_dash};

/// What the last action did, shown once after its redirect. Only these
/// fixed messages can appear: the query string cannot put text on the page.
#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Done {
    Enabled,
    Paused,
    Disabled,
    VerificationSent,
    VerificationTooSoon,
}

impl Done {
    fn message(self) -> &'static str {
        match self {
            Done::Enabled => "Stream enabled; the receiver was sent a stream-updated SET.",
            Done::Paused => {
                "Stream paused; the receiver was sent a stream-updated SET. SETs are held until it resumes."
            }
            Done::Disabled => "Stream disabled; the receiver was told, and its queue was dropped.",
            Done::VerificationSent => "Verification SET queued; its arrival shows under Delivery.",
            Done::VerificationTooSoon => "Too soon after the last verification (the stream's minimum interval).",
        }
    }
}

#[derive(Deserialize)]
pub(super) struct Shown {
    #[serde(default)]
    done: Option<Done>,
}

#[derive(Template)]
#[template(path = "console/stream.html")]
struct StreamPage {
    csrf: String,
    message: &'static str,
    health: StreamRow,
    receiver_id: String,
    receiver_name: String,
    audience: String,
    endpoint_url: String,
    description: String,
    events_requested: String,
    events_delivered: String,
    subjects: usize,
    all_subjects: bool,
    issuers: String,
    created: String,
    last_activity: String,
    paused: bool,
    disabled: bool,
}

/// `GET /console/streams/{stream_id}`.
pub(super) async fn page(
    State(console): State<Arc<Console>>,
    operator: Operator,
    Path(stream_id): Path<String>,
    Query(shown): Query<Shown>,
) -> Result<Response, ConsoleError> {
    console.fresh().await;
    let transmitter = console.hub.transmitter();
    let record = transmitter.streams().get(&stream_id).ok_or(ConsoleError::NotFound("No stream has this id."))?;
    let receiver = transmitter.receivers().get(&record.receiver_id)?;
    let config = &record.config;
    let page = StreamPage {
        csrf: operator.csrf,
        message: shown.done.map_or("", Done::message),
        health: StreamRow::of(transmitter, &record),
        receiver_id: record.receiver_id.clone(),
        receiver_name: receiver.as_ref().map(|r| r.name.clone()).unwrap_or_default(),
        audience: match &config.aud {
            Audience::One(one) => one.clone(),
            Audience::Many(many) => many.join(", "),
        },
        endpoint_url: config.delivery.endpoint_url().to_owned(),
        description: config.description.clone().unwrap_or_default(),
        events_requested: config.events_requested.as_ref().map_or_else(|| "—".to_owned(), |events| events.join("\n")),
        events_delivered: config.events_delivered.join("\n"),
        subjects: transmitter.streams().subject_count(&stream_id),
        all_subjects: record.all_subjects,
        issuers: record.issuers.as_ref().map_or_else(|| "every trusted IdP".to_owned(), |list| list.join(", ")),
        created: when(record.created_at_ms),
        last_activity: when_or_dash(record.last_activity_ms),
        paused: record.status == StreamStatus::Paused,
        disabled: record.status == StreamStatus::Disabled,
    };
    Ok(render(&page))
}

#[derive(Deserialize)]
pub(super) struct StatusForm {
    #[serde(default)]
    csrf: String,
    status: StreamStatus,
    #[serde(default)]
    reason: String,
}

/// `POST /console/streams/{stream_id}/status`.
pub(super) async fn change_status(
    State(console): State<Arc<Console>>,
    operator: Operator,
    Path(stream_id): Path<String>,
    headers: HeaderMap,
    Form(form): Form<StatusForm>,
) -> Result<Response, ConsoleError> {
    operator.check(&headers, &form.csrf)?;
    let reason = Some(form.reason.trim().to_owned()).filter(|reason| !reason.is_empty());
    let transmitter = console.hub.transmitter();
    transmitter.change_status_by_transmitter(&stream_id, form.status, reason).await.map_err(refused)?;
    tracing::info!(%stream_id, status = ?form.status, "stream status changed from the console");
    let done = match form.status {
        StreamStatus::Enabled => "enabled",
        StreamStatus::Paused => "paused",
        StreamStatus::Disabled => "disabled",
    };
    Ok(Redirect::to(&format!("/console/streams/{}?done={done}", encode_segment(&stream_id))).into_response())
}

#[derive(Deserialize)]
pub(super) struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /console/streams/{stream_id}/verify`: an unsolicited verification
/// SET (SSF 1.0 §8.1.4), within the stream's minimum interval.
pub(super) async fn verify(
    State(console): State<Arc<Console>>,
    operator: Operator,
    Path(stream_id): Path<String>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, ConsoleError> {
    operator.check(&headers, &form.csrf)?;
    let transmitter = console.hub.transmitter();
    let record = transmitter.streams().get(&stream_id).ok_or(ConsoleError::NotFound("No stream has this id."))?;
    let done = match transmitter.verify_stream(&record, None).await {
        Ok(()) => "verification_sent",
        Err(SsfError::TooManyRequests { .. }) => "verification_too_soon",
        Err(error) => return Err(refused(error)),
    };
    Ok(Redirect::to(&format!("/console/streams/{}?done={done}", encode_segment(&stream_id))).into_response())
}

fn refused(error: SsfError) -> ConsoleError {
    match error {
        SsfError::NotFound => ConsoleError::NotFound("No stream has this id."),
        SsfError::Storage(reason) => ConsoleError::Unavailable(reason),
        other => ConsoleError::BadRequest(other.to_string()),
    }
}
