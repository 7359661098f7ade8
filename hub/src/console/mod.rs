//! The operator console at `/console`: server-rendered pages over the same
//! state the `/admin` API serves, behind a login with the admin token.
//!
//! Every value shown is HTML-escaped by the templates (askama escapes all
//! output of `.html` templates): session ids, stream descriptions, URLs and
//! reasons come from IdPs and receivers. No page runs script: the
//! `Content-Security-Policy` allows none, trees fold with `<details>`, and a
//! page with work in progress refreshes itself with `<meta http-equiv="refresh">`.

mod auth;
mod cascades;
mod dead_letters;
mod login;
mod overview;
mod sessions;
mod streams;
mod svg;

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use askama::Template;
use axum::Router;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

pub(crate) use auth::Sessions;

use crate::admin_token::AdminToken;
use crate::hub::Hub;

/// No script, no plugin, no framing; styles and forms only from the hub.
const POLICY: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
                      frame-ancestors 'none'; base-uri 'none'";

/// The console's state.
pub(crate) struct Console {
    hub: Arc<Hub>,
    admin: Arc<AdminToken>,
    sessions: Sessions,
}

/// The `/console` routes.
pub(crate) fn router(hub: Arc<Hub>, admin: Arc<AdminToken>) -> Router {
    let secure = hub.transmitter().issuer().starts_with("https://");
    let console = Arc::new(Console { hub, admin, sessions: Sessions::new(secure) });
    Router::new()
        .route("/console", get(overview::page))
        .route("/console/style.css", get(stylesheet))
        .route("/console/login", post(login::login))
        .route("/console/logout", post(login::logout))
        .route("/console/cascades", get(cascades::list))
        .route("/console/cascades/{txn}", get(cascades::page))
        .route("/console/sessions", get(sessions::search))
        .route("/console/sessions/{session_id}", get(sessions::page))
        .route("/console/streams/{stream_id}", get(streams::page))
        .route("/console/streams/{stream_id}/status", post(streams::change_status))
        .route("/console/streams/{stream_id}/verify", post(streams::verify))
        .route("/console/dead-letters", get(dead_letters::page))
        .route("/console/dead-letters/replay", post(dead_letters::replay))
        .layer(axum::middleware::map_response(protect))
        // Compressed pages carry the CSRF token beside reflected text, the
        // BREACH pattern; it needs requests sent with the operator's cookie
        // from another site, which SameSite=Strict never sends.
        .layer(tower_http::compression::CompressionLayer::new().gzip(true))
        .with_state(console)
}

impl Console {
    /// In Kafka mode, waits until this replica has applied every change
    /// acknowledged anywhere, so a page shows what the operator just did.
    async fn fresh(&self) {
        self.hub.catch_up().await;
    }
}

/// Headers on every console response.
async fn protect(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    headers.insert("cross-origin-opener-policy", HeaderValue::from_static("same-origin"));
    if !headers.contains_key(CACHE_CONTROL) {
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

async fn stylesheet() -> Response {
    let headers = [
        (CONTENT_TYPE, HeaderValue::from_static("text/css; charset=utf-8")),
        (CACHE_CONTROL, HeaderValue::from_static("max-age=300")),
    ];
    (headers, include_str!("../../assets/console.css")).into_response()
}

/// A page as an HTML response.
fn render<T: Template>(page: &T) -> Response {
    match page.render() {
        Ok(html) => ([(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"))], html).into_response(),
        Err(error) => {
            tracing::error!(%error, "console page did not render");
            (StatusCode::INTERNAL_SERVER_ERROR, "the page did not render").into_response()
        }
    }
}

/// Why a console request failed; each renders as a page.
#[derive(Debug)]
pub(crate) enum ConsoleError {
    /// No live session: the login form, returning to `next` afterwards.
    LoginNeeded {
        next: String,
        secure: bool,
    },
    /// A state-changing request without this session's CSRF token.
    Forbidden,
    NotFound(&'static str),
    BadRequest(String),
    /// Storage or another instance failed; details go to the log only.
    Unavailable(String),
}

#[derive(Template)]
#[template(path = "console/error.html")]
struct ErrorPage<'a> {
    title: &'a str,
    message: &'a str,
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        let (status, title, message) = match &self {
            ConsoleError::LoginNeeded { next, secure } => return login::form(*secure, next, false),
            ConsoleError::Forbidden => (
                StatusCode::FORBIDDEN,
                "Refused",
                "This request did not carry the console's CSRF token for your session, or came from another site. \
                 Reload the page and try again.",
            ),
            ConsoleError::NotFound(what) => (StatusCode::NOT_FOUND, "Not found", *what),
            ConsoleError::BadRequest(reason) => (StatusCode::BAD_REQUEST, "Bad request", reason.as_str()),
            ConsoleError::Unavailable(reason) => {
                tracing::error!(%reason, "console page unavailable");
                (StatusCode::SERVICE_UNAVAILABLE, "Unavailable", "The hub could not read its state; see its log.")
            }
        };
        let mut response = render(&ErrorPage { title, message });
        *response.status_mut() = status;
        response
    }
}

impl From<caep_transmitter::store::StoreError> for ConsoleError {
    fn from(error: caep_transmitter::store::StoreError) -> Self {
        ConsoleError::Unavailable(error.to_string())
    }
}

/// The query parameter a page's timed refresh adds to its own URL.
const AUTO_REFRESH: &str = "refresh=1";

/// Whether a request is a page reloading itself (not the operator's doing).
fn is_auto_refresh(uri: &axum::http::Uri) -> bool {
    uri.query().is_some_and(|query| query.split('&').any(|pair| pair == AUTO_REFRESH))
}

/// The `content` of a page's `<meta http-equiv="refresh">`: reload the
/// page at `uri` after `seconds`, marked as the page's own refresh.
fn auto_refresh(uri: &axum::http::Uri, seconds: u32) -> String {
    let mut query: Vec<&str> =
        uri.query().unwrap_or("").split('&').filter(|pair| !pair.is_empty() && *pair != AUTO_REFRESH).collect();
    query.push(AUTO_REFRESH);
    format!("{seconds};url={}?{}", uri.path(), query.join("&"))
}

/// A time as the console shows it: RFC 3339 UTC to the millisecond.
fn when(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// An optional time, or a dash.
fn when_or_dash(ms: Option<u64>) -> String {
    ms.map_or_else(|| "—".to_owned(), when)
}

/// A duration in milliseconds, or a dash.
fn millis(ms: Option<u64>) -> String {
    ms.map_or_else(|| "—".to_owned(), |ms| format!("{ms} ms"))
}
