//! Who may use the console: an operator who presented the admin token at
//! the login form holds a session cookie (HttpOnly, SameSite=Strict, path
//! `/console`) for at most [`ABSOLUTE_LIFETIME`], ended early by logout or
//! [`IDLE_LIFETIME`] without a request. Every state-changing form carries
//! the session's CSRF token; the login form carries a double-submit nonce.
//!
//! Sessions live in this process's memory (at most [`MAX_SESSIONS`]; the
//! least recently used goes first): a restart logs everyone out, and in
//! Kafka mode a session holds at the instance that issued it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::header::{COOKIE, SET_COOKIE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cookie::{Cookie, SameSite};
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::{Console, ConsoleError};

/// The session cookie.
pub(super) const SESSION_COOKIE: &str = "caep_console";
/// The login form's double-submit cookie.
pub(super) const LOGIN_COOKIE: &str = "caep_console_login";
/// A session ends this long after login, whatever happens.
pub(super) const ABSOLUTE_LIFETIME: Duration = Duration::from_secs(8 * 3600);
/// A session ends after this long without a request.
pub(super) const IDLE_LIFETIME: Duration = Duration::from_secs(30 * 60);
/// Console sessions held at once.
const MAX_SESSIONS: usize = 64;

struct Held {
    csrf: String,
    created: Instant,
    seen: Instant,
    /// The admin token in force at login: a rotated token ends the session.
    token: [u8; 32],
}

/// Logged-in operators, by the SHA-256 of their cookie (the cookie itself
/// is never kept).
pub(crate) struct Sessions {
    held: Mutex<HashMap<[u8; 32], Held>>,
    /// Cookies get `Secure` when the hub is served over https.
    secure: bool,
}

/// A logged-in operator, extracted from the session cookie.
pub(crate) struct Operator {
    /// Goes into every state-changing form.
    pub csrf: String,
    key: [u8; 32],
}

/// A random URL-safe secret of 32 bytes.
pub(super) fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

fn digest(value: &str) -> [u8; 32] {
    Sha256::digest(value.as_bytes()).into()
}

/// Whether two secrets are equal, compared as digests so the time taken
/// tells nothing about how much of a guess was right.
pub(super) fn same_secret(a: &str, b: &str) -> bool {
    digest(a) == digest(b)
}

/// The value of cookie `name` in the request.
pub(super) fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| Cookie::split_parse(value.to_owned()))
        .filter_map(Result::ok)
        .find(|cookie| cookie.name() == name)
        .map(|cookie| cookie.value().to_owned())
}

impl Sessions {
    pub(crate) fn new(secure: bool) -> Self {
        Sessions { held: Mutex::new(HashMap::new()), secure }
    }

    /// Starts a session opened with the admin token `token` (its digest);
    /// returns its cookie value.
    pub(super) fn start(&self, token: [u8; 32]) -> String {
        let cookie = random_secret();
        let now = Instant::now();
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.retain(|_, session| alive(session, now));
        if held.len() >= MAX_SESSIONS
            && let Some(oldest) = held.iter().min_by_key(|(_, session)| session.seen).map(|(key, _)| *key)
        {
            held.remove(&oldest);
        }
        held.insert(digest(&cookie), Held { csrf: random_secret(), created: now, seen: now, token });
        cookie
    }

    /// The operator holding this cookie, if the session is alive and was
    /// opened with the admin token still in force. A request the page made
    /// by itself (`active` false: its timed refresh) does not count as the
    /// operator's activity, so an open tab still times out.
    fn operator(&self, cookie: &str, token_in_force: [u8; 32], active: bool) -> Option<Operator> {
        let key = digest(cookie);
        let now = Instant::now();
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let session = held.get_mut(&key)?;
        if !alive(session, now) || session.token != token_in_force {
            held.remove(&key);
            return None;
        }
        if active {
            session.seen = now;
        }
        Some(Operator { csrf: session.csrf.clone(), key })
    }

    /// Ends the operator's session.
    pub(super) fn end(&self, operator: &Operator) {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).remove(&operator.key);
    }

    /// `Set-Cookie` for a cookie of the console, or one that removes it.
    pub(super) fn set_cookie(&self, name: &'static str, value: Option<&str>, lifetime: Duration) -> HeaderValue {
        cookie_header(name, value, lifetime, self.secure)
    }

    /// Whether cookies are `Secure` (the hub is served over https).
    pub(super) fn secure(&self) -> bool {
        self.secure
    }

    /// Headers that set a new session cookie.
    pub(super) fn login_headers(&self, cookie: &str) -> [(axum::http::HeaderName, HeaderValue); 2] {
        [
            (SET_COOKIE, self.set_cookie(SESSION_COOKIE, Some(cookie), ABSOLUTE_LIFETIME)),
            (SET_COOKIE, self.set_cookie(LOGIN_COOKIE, None, Duration::ZERO)),
        ]
    }
}

/// `Set-Cookie` for a console cookie (HttpOnly, SameSite=Strict, path
/// `/console`), or one that removes it when `value` is `None`.
pub(super) fn cookie_header(name: &'static str, value: Option<&str>, lifetime: Duration, secure: bool) -> HeaderValue {
    let seconds = if value.is_some() { i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX) } else { 0 };
    let mut cookie = Cookie::build((name, value.unwrap_or("").to_owned()))
        .path("/console")
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(secure)
        .max_age(cookie::time::Duration::seconds(seconds))
        .build();
    if value.is_none() {
        cookie.make_removal();
    }
    // Names and values are ours (base64url): always a valid header.
    HeaderValue::from_str(&cookie.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn alive(session: &Held, now: Instant) -> bool {
    now.duration_since(session.created) < ABSOLUTE_LIFETIME && now.duration_since(session.seen) < IDLE_LIFETIME
}

impl Operator {
    /// Refuses a state-changing request whose form lacks this session's
    /// CSRF token, or that a browser says came from another site.
    pub(super) fn check(&self, headers: &HeaderMap, presented: &str) -> Result<(), ConsoleError> {
        if let Some(site) = headers.get("sec-fetch-site")
            && site.as_bytes() != b"same-origin"
        {
            return Err(ConsoleError::Forbidden);
        }
        if presented.is_empty() || !same_secret(presented, &self.csrf) {
            return Err(ConsoleError::Forbidden);
        }
        Ok(())
    }
}

impl FromRequestParts<std::sync::Arc<Console>> for Operator {
    type Rejection = ConsoleError;

    async fn from_request_parts(parts: &mut Parts, console: &std::sync::Arc<Console>) -> Result<Self, Self::Rejection> {
        let active = !super::is_auto_refresh(&parts.uri);
        cookie_value(&parts.headers, SESSION_COOKIE)
            .and_then(|cookie| console.sessions.operator(&cookie, console.admin.in_force(), active))
            .ok_or_else(|| ConsoleError::LoginNeeded {
                // Back to the page asked for; a form's target is not a page.
                next: if parts.method == axum::http::Method::GET {
                    super::login::next_of(&parts.uri)
                } else {
                    "/console".to_owned()
                },
                secure: console.sessions.secure(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: [u8; 32] = [7; 32];

    #[test]
    fn sessions_end_at_logout_and_are_bounded() {
        let sessions = Sessions::new(false);
        let first = sessions.start(TOKEN);
        let operator = sessions.operator(&first, TOKEN, true).expect("logged in");
        assert!(sessions.operator("forged", TOKEN, true).is_none());
        sessions.end(&operator);
        assert!(sessions.operator(&first, TOKEN, true).is_none(), "logout ends the session");
        let cookies: Vec<String> = (0..MAX_SESSIONS + 5).map(|_| sessions.start(TOKEN)).collect();
        assert_eq!(sessions.held.lock().expect("lock").len(), MAX_SESSIONS);
        assert!(sessions.operator(cookies.last().expect("one"), TOKEN, true).is_some());
    }

    #[test]
    fn a_rotated_admin_token_ends_sessions_opened_with_the_old_one() {
        let sessions = Sessions::new(false);
        let cookie = sessions.start(TOKEN);
        assert!(sessions.operator(&cookie, [9; 32], true).is_none(), "another token is in force");
        assert!(sessions.operator(&cookie, TOKEN, true).is_none(), "and the session is gone for good");
    }

    #[test]
    fn a_pages_own_refresh_is_not_activity() {
        let sessions = Sessions::new(false);
        let cookie = sessions.start(TOKEN);
        let seen = |sessions: &Sessions| sessions.held.lock().expect("lock").values().next().expect("one").seen;
        let before = seen(&sessions);
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(sessions.operator(&cookie, TOKEN, false).is_some());
        assert_eq!(seen(&sessions), before);
        assert!(sessions.operator(&cookie, TOKEN, true).is_some());
        assert!(seen(&sessions) > before);
    }

    #[test]
    fn csrf_needs_the_token_and_a_same_origin_request() {
        let sessions = Sessions::new(false);
        let operator = sessions.operator(&sessions.start(TOKEN), TOKEN, true).expect("logged in");
        let token = operator.csrf.clone();
        assert!(operator.check(&HeaderMap::new(), &token).is_ok());
        assert!(operator.check(&HeaderMap::new(), "").is_err());
        assert!(operator.check(&HeaderMap::new(), "guess").is_err());
        let mut cross = HeaderMap::new();
        cross.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(operator.check(&cross, &token).is_err());
    }

    #[test]
    fn cookies_are_http_only_strict_and_scoped_to_the_console() {
        let cookie = Sessions::new(true).set_cookie(SESSION_COOKIE, Some("v"), ABSOLUTE_LIFETIME);
        let text = cookie.to_str().expect("ASCII");
        for part in ["caep_console=v", "HttpOnly", "SameSite=Strict", "Path=/console", "Secure", "Max-Age=28800"] {
            assert!(text.contains(part), "{text} lacks {part}");
        }
    }
}
