//! The login form, login and logout.

use std::sync::Arc;
use std::time::Duration;

use askama::Template;
use axum::Form;
use axum::extract::State;
use axum::http::header::{LOCATION, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{AppendHeaders, IntoResponse, Response};
use serde::Deserialize;

use super::auth::{LOGIN_COOKIE, Operator, SESSION_COOKIE, cookie_header, cookie_value, random_secret, same_secret};
use super::{Console, ConsoleError, render};

/// How long a login form stays usable.
const LOGIN_FORM_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// Slows guessing: a wrong token costs the guesser this long.
const WRONG_TOKEN_DELAY: Duration = Duration::from_millis(300);

#[derive(Template)]
#[template(path = "console/login.html")]
struct LoginPage<'a> {
    nonce: &'a str,
    next: &'a str,
    refused: bool,
}

/// Where to go after logging in: the console page that was asked for.
pub(super) fn next_of(uri: &Uri) -> String {
    let wanted = uri.path_and_query().map_or("/console", |p| p.as_str());
    safe_next(wanted).to_owned()
}

/// Only a path inside the console: never another site (`//host`, `/\host`).
fn safe_next(next: &str) -> &str {
    let inside = next == "/console" || next.starts_with("/console/") || next.starts_with("/console?");
    if inside && !next.contains("//") && !next.contains('\\') && !next.chars().any(char::is_control) {
        next
    } else {
        "/console"
    }
}

/// The login form, with a fresh double-submit nonce.
pub(super) fn form(secure: bool, next: &str, refused: bool) -> Response {
    let nonce = random_secret();
    let page = LoginPage { nonce: &nonce, next: safe_next(next), refused };
    let status = if refused || next != "/console" { StatusCode::UNAUTHORIZED } else { StatusCode::OK };
    let cookie = cookie_header(LOGIN_COOKIE, Some(&nonce), LOGIN_FORM_LIFETIME, secure);
    (status, [(SET_COOKIE, cookie)], render(&page)).into_response()
}

#[derive(Deserialize)]
pub(super) struct Login {
    #[serde(default)]
    token: String,
    #[serde(default)]
    nonce: String,
    #[serde(default)]
    next: String,
}

/// `POST /console/login`: exchanges the admin token for a session cookie.
pub(super) async fn login(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Form(login): Form<Login>,
) -> Response {
    let nonce_matches = cookie_value(&headers, LOGIN_COOKIE)
        .is_some_and(|cookie| !login.nonce.is_empty() && same_secret(&cookie, &login.nonce));
    let same_origin = headers.get("sec-fetch-site").is_none_or(|site| site.as_bytes() == b"same-origin");
    if !nonce_matches || !same_origin {
        return ConsoleError::Forbidden.into_response();
    }
    if !console.admin.accepts(login.token.trim()) {
        tracing::warn!("console login refused: wrong admin token");
        tokio::time::sleep(WRONG_TOKEN_DELAY).await;
        return form(console.sessions.secure(), &login.next, true);
    }
    let cookie = console.sessions.start(console.admin.in_force());
    tracing::info!("console login");
    // Two cookies: appended, since a header array would keep only the last.
    let cookies = AppendHeaders(console.sessions.login_headers(&cookie));
    let mut response = (StatusCode::SEE_OTHER, cookies).into_response();
    let location = HeaderValue::from_str(safe_next(&login.next)).unwrap_or(HeaderValue::from_static("/console"));
    response.headers_mut().insert(LOCATION, location);
    response
}

#[derive(Deserialize)]
pub(super) struct Csrf {
    #[serde(default)]
    csrf: String,
}

/// `POST /console/logout`.
pub(super) async fn logout(
    State(console): State<Arc<Console>>,
    operator: Operator,
    headers: HeaderMap,
    Form(form): Form<Csrf>,
) -> Result<Response, ConsoleError> {
    operator.check(&headers, &form.csrf)?;
    console.sessions.end(&operator);
    tracing::info!("console logout");
    let removal = console.sessions.set_cookie(SESSION_COOKIE, None, Duration::ZERO);
    Ok((StatusCode::SEE_OTHER, [(SET_COOKIE, removal), (LOCATION, HeaderValue::from_static("/console"))])
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_stays_inside_the_console() {
        assert_eq!(safe_next("/console/cascades/t1?issuer=x"), "/console/cascades/t1?issuer=x");
        for outside in ["https://evil.example", "//evil.example", "/console//evil", "/\\evil", "/consoles", "/admin"] {
            assert_eq!(safe_next(outside), "/console", "{outside}");
        }
    }
}
