//! Security Event Tokens: RFC 8417 claims under the SSF 1.0 profile (§4).
//!
//! A SET here always carries `sub_id` at the top level and exactly one event;
//! it never carries `sub` or `exp`. Claims this crate does not model are kept
//! in [`SecurityEventToken::extra`] and survive a round trip.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use crate::event::{Event, EventError};
use crate::jose::{self, JoseError, Jwks, SigningKey};
use crate::subject::SubjectId;

/// The JOSE `typ` header of every SET (SSF 1.0 §4.1.x, RFC 8417 §2.3).
pub const SET_TYP: &str = "secevent+jwt";

/// The `aud` claim: one audience or several.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    /// Whether `audience` is among the audiences.
    pub fn contains(&self, audience: &str) -> bool {
        match self {
            Audience::One(one) => one == audience,
            Audience::Many(many) => many.iter().any(|a| a == audience),
        }
    }

    fn to_value(&self) -> Value {
        match self {
            Audience::One(one) => Value::String(one.clone()),
            Audience::Many(many) => Value::Array(many.iter().cloned().map(Value::String).collect()),
        }
    }
}

impl From<&str> for Audience {
    fn from(audience: &str) -> Self {
        Audience::One(audience.to_owned())
    }
}

impl From<String> for Audience {
    fn from(audience: String) -> Self {
        Audience::One(audience)
    }
}

/// One Security Event Token's claim set.
#[derive(Clone, Debug, PartialEq)]
pub struct SecurityEventToken {
    pub iss: String,
    pub aud: Audience,
    pub jti: String,
    /// Issued-at, seconds since the epoch.
    pub iat: i64,
    /// Shared by every SET with one cause (a cascade's SETs share it).
    pub txn: Option<String>,
    pub sub_id: SubjectId,
    pub event: Event,
    /// Claims this crate does not model, kept as received (never `sub`/`exp`).
    pub extra: Map<String, Value>,
}

/// What a receiver of a SET expects of it.
#[derive(Clone, Debug)]
pub struct Expectations<'a> {
    /// The only acceptable `iss`.
    pub issuer: &'a str,
    /// An audience that must be in `aud`.
    pub audience: &'a str,
    /// How far in the future `iat` may be, for clock skew.
    pub max_future_skew_secs: i64,
    /// How old `iat` may be; `None` accepts any age (a push retried for a
    /// day is old but genuine).
    pub max_age_secs: Option<i64>,
}

impl<'a> Expectations<'a> {
    /// Expect this issuer and audience, 60 s of clock skew, any age.
    pub fn new(issuer: &'a str, audience: &'a str) -> Self {
        Expectations { issuer, audience, max_future_skew_secs: 60, max_age_secs: None }
    }
}

/// Why a SET was refused. [`SetError::rfc8935_err`] gives the RFC 8935 code.
#[derive(Debug, thiserror::Error)]
pub enum SetError {
    #[error(transparent)]
    Jose(#[from] JoseError),
    #[error("claim `{0}` is missing")]
    MissingClaim(&'static str),
    #[error("claim `{claim}` is invalid: {reason}")]
    InvalidClaim { claim: &'static str, reason: String },
    #[error("claim `{0}` must not appear in a SET (SSF 1.0 §4)")]
    ForbiddenClaim(&'static str),
    #[error("`events` must hold exactly one event, it holds {0}")]
    EventCount(usize),
    #[error(transparent)]
    Event(#[from] EventError),
    #[error("issuer `{found}` is not the expected one")]
    WrongIssuer { found: String },
    #[error("the SET is not addressed to this audience")]
    WrongAudience,
    #[error("`iat` is {0} s in the future")]
    IssuedInFuture(i64),
    #[error("`iat` is {0} s old, older than allowed")]
    TooOld(i64),
}

impl SetError {
    /// The RFC 8935 §2.4 error code for this refusal.
    pub fn rfc8935_err(&self) -> &'static str {
        match self {
            SetError::Jose(jose) => jose.rfc8935_err(),
            SetError::WrongIssuer { .. } => "invalid_issuer",
            SetError::WrongAudience => "invalid_audience",
            _ => "invalid_request",
        }
    }
}

/// The `iss` claim of a compact JWS, read *without* verifying anything: only
/// to choose the keys to verify it with, or to refuse at once a SET from an
/// issuer nobody expects (before any key fetch). `Err` says why it cannot
/// be read.
pub fn unverified_issuer(token: &str) -> Result<String, &'static str> {
    use base64::Engine;
    let payload = token.split('.').nth(1).ok_or("not a compact JWS")?;
    let bytes =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).map_err(|_| "payload is not base64url")?;
    let claims: Map<String, Value> = serde_json::from_slice(&bytes).map_err(|_| "payload is not a JSON object")?;
    match claims.get("iss") {
        Some(Value::String(iss)) => Ok(iss.clone()),
        _ => Err("claim `iss` is missing"),
    }
}

/// Seconds since the epoch, now.
pub fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// A fresh, URL-safe `jti` (or `txn`).
pub fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl SecurityEventToken {
    /// A SET issued now with a fresh `jti` and no `txn`.
    pub fn new(iss: impl Into<String>, aud: impl Into<Audience>, sub_id: SubjectId, event: Event) -> Self {
        SecurityEventToken {
            iss: iss.into(),
            aud: aud.into(),
            jti: new_id(),
            iat: now_secs(),
            txn: None,
            sub_id,
            event,
            extra: Map::new(),
        }
    }

    /// Sets `txn`.
    pub fn with_txn(mut self, txn: impl Into<String>) -> Self {
        self.txn = Some(txn.into());
        self
    }

    /// The claim set as a JSON object.
    pub fn to_claims(&self) -> Map<String, Value> {
        let mut claims = Map::new();
        claims.insert("iss".into(), Value::String(self.iss.clone()));
        claims.insert("aud".into(), self.aud.to_value());
        claims.insert("jti".into(), Value::String(self.jti.clone()));
        claims.insert("iat".into(), Value::from(self.iat));
        if let Some(txn) = &self.txn {
            claims.insert("txn".into(), Value::String(txn.clone()));
        }
        claims.insert("sub_id".into(), self.sub_id.to_value());
        let mut events = Map::new();
        events.insert(self.event.type_uri().to_owned(), self.event.payload());
        claims.insert("events".into(), Value::Object(events));
        for (name, value) in &self.extra {
            if !claims.contains_key(name) && !FORBIDDEN.contains(&name.as_str()) {
                claims.insert(name.clone(), value.clone());
            }
        }
        claims
    }

    /// Parses a claim set, enforcing the SSF profile.
    pub fn from_claims(mut claims: Map<String, Value>) -> Result<Self, SetError> {
        if let Some(forbidden) = FORBIDDEN.iter().find(|name| claims.contains_key(**name)) {
            return Err(SetError::ForbiddenClaim(forbidden));
        }
        let iss = take_string(&mut claims, "iss")?;
        let aud = take_audience(&mut claims)?;
        let jti = take_string(&mut claims, "jti")?;
        if jti.is_empty() {
            return Err(SetError::InvalidClaim { claim: "jti", reason: "empty".into() });
        }
        let iat = match claims.remove("iat") {
            Some(Value::Number(n)) => n.as_i64().ok_or_else(|| invalid("iat", "not an integer NumericDate"))?,
            Some(_) => return Err(invalid("iat", "not a number")),
            None => return Err(SetError::MissingClaim("iat")),
        };
        // RFC 8417 makes `txn` a string, but SSF 1.0's own examples send a
        // number; accept an integer and carry it on as its decimal string.
        let txn = match claims.remove("txn") {
            Some(Value::String(txn)) => Some(txn),
            Some(Value::Number(n)) if n.is_u64() || n.is_i64() => Some(n.to_string()),
            Some(_) => return Err(invalid("txn", "not a string")),
            None => None,
        };
        let sub_id = claims.remove("sub_id").ok_or(SetError::MissingClaim("sub_id"))?;
        let sub_id = SubjectId::from_value(sub_id).map_err(|e| invalid("sub_id", &e.to_string()))?;
        let event = take_event(&mut claims)?;
        Ok(SecurityEventToken { iss, aud, jti, iat, txn, sub_id, event, extra: claims })
    }

    /// Signs the SET as a compact JWS with `typ: secevent+jwt`.
    pub fn sign(&self, key: &SigningKey) -> Result<String, JoseError> {
        key.sign(SET_TYP, &self.to_claims())
    }

    /// Verifies a compact SET against `jwks` (algorithm pinned to the key),
    /// then checks its profile, issuer, audience and `iat`.
    pub fn verify(token: &str, jwks: &Jwks, expect: &Expectations<'_>) -> Result<Self, SetError> {
        let verified = jose::verify(token, jwks, SET_TYP)?;
        let set = SecurityEventToken::from_claims(verified.payload)?;
        set.check(expect, now_secs())?;
        Ok(set)
    }

    /// Checks issuer, audience and `iat` against `expect` at time `now`.
    pub fn check(&self, expect: &Expectations<'_>, now: i64) -> Result<(), SetError> {
        if self.iss != expect.issuer {
            return Err(SetError::WrongIssuer { found: self.iss.clone() });
        }
        if !self.aud.contains(expect.audience) {
            return Err(SetError::WrongAudience);
        }
        // `iat` is the sender's: saturate, so no value can overflow.
        let ahead = self.iat.saturating_sub(now);
        if ahead > expect.max_future_skew_secs {
            return Err(SetError::IssuedInFuture(ahead));
        }
        let age = now.saturating_sub(self.iat);
        match expect.max_age_secs {
            Some(max_age) if age > max_age => Err(SetError::TooOld(age)),
            _ => Ok(()),
        }
    }
}

/// Claims the SSF profile forbids in a SET.
const FORBIDDEN: [&str; 2] = ["sub", "exp"];

fn invalid(claim: &'static str, reason: &str) -> SetError {
    SetError::InvalidClaim { claim, reason: reason.to_owned() }
}

fn take_string(claims: &mut Map<String, Value>, claim: &'static str) -> Result<String, SetError> {
    match claims.remove(claim) {
        Some(Value::String(value)) => Ok(value),
        Some(_) => Err(invalid(claim, "not a string")),
        None => Err(SetError::MissingClaim(claim)),
    }
}

fn take_audience(claims: &mut Map<String, Value>) -> Result<Audience, SetError> {
    match claims.remove("aud") {
        Some(Value::String(one)) => Ok(Audience::One(one)),
        Some(Value::Array(items)) if !items.is_empty() => items
            .into_iter()
            .map(|item| match item {
                Value::String(audience) => Ok(audience),
                _ => Err(invalid("aud", "array members must be strings")),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Audience::Many),
        Some(_) => Err(invalid("aud", "must be a string or a non-empty array of strings")),
        None => Err(SetError::MissingClaim("aud")),
    }
}

fn take_event(claims: &mut Map<String, Value>) -> Result<Event, SetError> {
    let events = match claims.remove("events") {
        Some(Value::Object(events)) => events,
        Some(_) => return Err(invalid("events", "not a JSON object")),
        None => return Err(SetError::MissingClaim("events")),
    };
    if events.len() != 1 {
        return Err(SetError::EventCount(events.len()));
    }
    let Some((type_uri, payload)) = events.into_iter().next() else {
        return Err(SetError::EventCount(0));
    };
    Ok(Event::from_parts(&type_uri, payload)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{SessionRevoked, event_type};
    use serde_json::json;

    fn claims(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => panic!("test claims must be an object"),
        }
    }

    fn revoked_claims() -> Value {
        json!({
            "iss": "https://idp.example.com/",
            "aud": ["https://rp.example.com/", "https://other.example.com/"],
            "jti": "756E69717565206964656E746966696572",
            "iat": 1615305159,
            "txn": "8675309",
            "sub_id": {"format": "complex",
                "session": {"format": "opaque", "id": "dMTlD|1600802906337.16|16008.16"},
                "user": {"format": "iss_sub", "iss": "https://idp.example.com/", "sub": "u1"}},
            "events": {event_type::SESSION_REVOKED: {"initiating_entity": "policy", "event_timestamp": 1615304991}},
            "x_custom_claim": {"kept": true}
        })
    }

    #[test]
    fn claims_round_trip_with_unknown_members() {
        let original = revoked_claims();
        let set = SecurityEventToken::from_claims(claims(original.clone())).expect("parses");
        assert_eq!(set.txn.as_deref(), Some("8675309"));
        assert!(set.aud.contains("https://other.example.com/"));
        assert_eq!(Value::Object(set.to_claims()), original);
    }

    #[test]
    fn profile_violations_are_refused() {
        let mut cases = Vec::new();
        for (field, value) in [("sub", json!("x")), ("exp", json!(1))] {
            let mut c = revoked_claims();
            c[field] = value;
            cases.push(c);
        }
        for field in ["iss", "aud", "jti", "iat", "sub_id", "events"] {
            let mut c = revoked_claims();
            c.as_object_mut().expect("object").remove(field);
            cases.push(c);
        }
        let mut two_events = revoked_claims();
        two_events["events"][event_type::ACCOUNT_PURGED] = json!({});
        cases.push(two_events);
        let mut no_events = revoked_claims();
        no_events["events"] = json!({});
        cases.push(no_events);
        let mut float_iat = revoked_claims();
        float_iat["iat"] = json!(1.5);
        cases.push(float_iat);
        let mut empty_aud = revoked_claims();
        empty_aud["aud"] = json!([]);
        cases.push(empty_aud);
        for case in cases {
            let result = SecurityEventToken::from_claims(claims(case.clone()));
            let error = result.expect_err(&format!("accepted {case}"));
            assert_eq!(error.rfc8935_err(), "invalid_request");
        }
    }

    #[test]
    fn emitted_sets_never_carry_sub_or_exp() {
        let mut set = SecurityEventToken::new(
            "https://hub.example.com/",
            "https://rp.example.com/",
            SubjectId::opaque("s1"),
            Event::SessionRevoked(SessionRevoked::default()),
        );
        set.extra.insert("sub".into(), json!("smuggled"));
        set.extra.insert("exp".into(), json!(9));
        let claims = set.to_claims();
        assert!(!claims.contains_key("sub") && !claims.contains_key("exp"));
    }

    #[test]
    fn extreme_iat_values_are_refused_without_overflow() {
        let mut set = SecurityEventToken::from_claims(claims(revoked_claims())).expect("parses");
        let mut expect = Expectations::new("https://idp.example.com/", "https://rp.example.com/");
        expect.max_age_secs = Some(3600);
        for (iat, now) in
            [(i64::MIN, 1_700_000_000), (i64::MAX, 1_700_000_000), (i64::MIN, i64::MAX), (i64::MAX, i64::MIN)]
        {
            set.iat = iat;
            assert!(set.check(&expect, now).is_err(), "iat {iat} at {now} accepted");
        }
    }

    #[test]
    fn check_maps_failures_to_rfc8935_codes() {
        let set = SecurityEventToken::from_claims(claims(revoked_claims())).expect("parses");
        let now = set.iat;
        let ok = Expectations::new("https://idp.example.com/", "https://rp.example.com/");
        assert!(set.check(&ok, now).is_ok());
        let wrong_iss = Expectations::new("https://evil.example.com/", "https://rp.example.com/");
        assert_eq!(set.check(&wrong_iss, now).map_err(|e| e.rfc8935_err()), Err("invalid_issuer"));
        let wrong_aud = Expectations::new("https://idp.example.com/", "https://evil.example.com/");
        assert_eq!(set.check(&wrong_aud, now).map_err(|e| e.rfc8935_err()), Err("invalid_audience"));
        assert!(matches!(set.check(&ok, now - 3600), Err(SetError::IssuedInFuture(3600))));
        let fresh_only = Expectations { max_age_secs: Some(60), ..ok };
        assert!(matches!(set.check(&fresh_only, now + 61), Err(SetError::TooOld(61))));
    }
}
