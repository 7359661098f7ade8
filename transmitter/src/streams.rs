//! Event streams (SSF 1.0 §8.1): the stream configuration model, the parsing
//! of management request bodies, and the pure rules of create, update
//! (PATCH), replace (PUT), status, subjects and verification. No storage and
//! no HTTP here: handlers call these functions and map [`SsfError`] to the
//! response.
//!
//! Decisions this module makes, each resting on the text of SSF 1.0:
//!
//! - A create without `delivery` means poll (§8.1.1.1: "If the request does
//!   not contain the `delivery` property, then the Transmitter MUST assume
//!   that the `method` is "urn:ietf:rfc:8936" (poll)"). The poll
//!   `endpoint_url` is always the transmitter's ("in the case of the poll
//!   method, the `endpoint_url` value is supplied by the Transmitter"), so a
//!   receiver's poll `endpoint_url` is ignored.
//! - An unsupported delivery method is a 400 (§8.1.1.1: "If the Transmitter
//!   does not support the delivery method, it MAY respond with HTTP Status
//!   Code "400 Bad Request."").
//! - `events_delivered` is `events_supported ∩ events_requested`, in the
//!   order of `events_supported` (§8.1.1: "a subset (not necessarily a proper
//!   subset) of the intersection"; "A Transmitter MUST ignore any array
//!   values that it does not understand"). Without `events_requested` the
//!   intersection is empty, so nothing is delivered (the stream still carries
//!   verification and stream-updated events, which §8.1.4 lets the
//!   transmitter send whatever the event lists say). `events_requested` is
//!   echoed as the receiver sent it, unknown URIs included, as the spec's
//!   examples show.
//! - Transmitter-supplied members in a PATCH or PUT "MAY be present, but
//!   they MUST match the expected value" (§8.1.1.3, §8.1.1.4), and a 400 is
//!   the answer when "a Transmitter-Supplied property is incorrect": so they
//!   are compared with the stored configuration and a mismatch is a 400.
//!   `events_delivered` is compared with the value "before any updates are
//!   applied". Arrays compare as sets and `aud` as a string or array of the
//!   same audiences. In a create (POST) they are ignored: §8.1.1.1 lists
//!   only the receiver-supplied members a POST may carry, and there is no
//!   expected value yet.
//! - PATCH: "Any Receiver-Supplied property present in the request MUST be
//!   updated by the Transmitter. Any properties missing in the request MUST
//!   NOT be changed". A member present as JSON `null` is updated to "no
//!   value": `description` and `events_requested` are removed, `delivery`
//!   goes back to the default, poll. `delivery` is one property, so a new
//!   `delivery` object replaces the old one whole (an `authorization_header`
//!   not repeated is dropped).
//! - PUT: "Missing Receiver-Supplied properties MUST be interpreted as
//!   requested to be deleted": missing `description` and `events_requested`
//!   are removed, missing `delivery` becomes poll (the create default).
//! - GET returns `authorization_header` to the stream's owner. §8.1.1.2
//!   returns "a JSON representation of the stream's configuration", of which
//!   `delivery` with its name/value pairs is part, and §8.1.1.4 expects
//!   receivers to "read the configuration first, modify the JSON
//!   representation, then make a replacement request": a GET without the
//!   header would make that read-modify-replace silently delete it. The value
//!   is the receiver's own credential for its own endpoint; it only ever goes
//!   back to the authenticated owner (responses carry `Cache-Control:
//!   no-store`) and is redacted from `Debug`, so it never reaches logs.
//! - `description` longer than [`MAX_DESCRIPTION_CHARS`] is truncated
//!   (§8.1.1: "The transmitter MAY truncate the string beyond an allowed max
//!   length").
//! - Unknown members of any request body are ignored.

use std::collections::BTreeSet;
use std::fmt;

use caep_schemas::set::Audience;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::error::SsfError;
use crate::metadata::{POLL_METHOD, PUSH_METHOD};

/// Longest `description` kept, in characters; longer ones are truncated.
pub const MAX_DESCRIPTION_CHARS: usize = 1024;

/// The transmitter-supplied members other than `stream_id` (SSF 1.0 §8.1.1).
/// In a PATCH or PUT body each one present must match the stream's value.
pub const TRANSMITTER_SUPPLIED: [&str; 6] =
    ["iss", "aud", "events_supported", "events_delivered", "min_verification_interval", "inactivity_timeout"];

/// A fresh stream id: 128 random bits as 32 lowercase hex digits. Only RFC
/// 3986 unreserved characters (SSF 1.0 §8.1.1: "Transmitters SHOULD use
/// character set described in Section 2.3 of RFC3986"), so the id can sit
/// in a poll URL path or a query string without escaping.
pub fn new_stream_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// A stream's delivery method and its parameters (SSF 1.0 §6.1), as stored
/// and returned.
///
/// `Debug` redacts `authorization_header`; serialization does not (it is
/// returned to the stream's owner, see the module docs), so never log a
/// serialized configuration.
#[derive(Clone, PartialEq, Eq)]
pub enum Delivery {
    /// RFC 8935 push to the receiver's `endpoint_url`.
    Push {
        /// Where SETs are POSTed; set by the receiver.
        endpoint_url: String,
        /// Sent verbatim as the `Authorization` header of every push.
        authorization_header: Option<String>,
    },
    /// RFC 8936 poll at the transmitter's per-stream `endpoint_url`.
    Poll {
        /// The poll URL; set by the transmitter.
        endpoint_url: String,
    },
}

impl Delivery {
    /// The method URN (`urn:ietf:rfc:8935` or `urn:ietf:rfc:8936`).
    pub fn method(&self) -> &'static str {
        match self {
            Delivery::Push { .. } => PUSH_METHOD,
            Delivery::Poll { .. } => POLL_METHOD,
        }
    }

    /// The push target or the poll URL.
    pub fn endpoint_url(&self) -> &str {
        match self {
            Delivery::Push { endpoint_url, .. } | Delivery::Poll { endpoint_url } => endpoint_url,
        }
    }
}

/// Stands in for a secret in `Debug` output.
struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Delivery::Push { endpoint_url, authorization_header } => f
                .debug_struct("Push")
                .field("endpoint_url", endpoint_url)
                .field("authorization_header", &authorization_header.as_ref().map(|_| Redacted))
                .finish(),
            Delivery::Poll { endpoint_url } => f.debug_struct("Poll").field("endpoint_url", endpoint_url).finish(),
        }
    }
}

/// The wire shape of a stored delivery object.
#[derive(Serialize, Deserialize)]
struct DeliveryWire {
    method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    endpoint_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    authorization_header: Option<String>,
}

impl Serialize for Delivery {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let authorization_header = match self {
            Delivery::Push { authorization_header, .. } => authorization_header.clone(),
            Delivery::Poll { .. } => None,
        };
        DeliveryWire {
            method: self.method().to_owned(),
            endpoint_url: Some(self.endpoint_url().to_owned()),
            authorization_header,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Delivery {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let wire = DeliveryWire::deserialize(deserializer)?;
        // A stored configuration always has its endpoint (the schema's
        // returned-configuration rule), whichever side set it.
        let endpoint_url = wire.endpoint_url.ok_or_else(|| D::Error::custom("`delivery` has no `endpoint_url`"))?;
        match wire.method.as_str() {
            PUSH_METHOD => Ok(Delivery::Push { endpoint_url, authorization_header: wire.authorization_header }),
            POLL_METHOD => Ok(Delivery::Poll { endpoint_url }),
            other => Err(D::Error::custom(format!("unsupported delivery method `{other}`"))),
        }
    }
}

/// `aud` as SSF prints it: a string or an array of strings.
mod audience_serde {
    use caep_schemas::set::Audience;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(aud: &Audience, serializer: S) -> Result<S::Ok, S::Error> {
        match aud {
            Audience::One(one) => serializer.serialize_str(one),
            Audience::Many(many) => many.serialize(serializer),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Audience, D::Error> {
        use serde::de::Error as _;
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            One(String),
            Many(Vec<String>),
        }
        match Wire::deserialize(deserializer)? {
            Wire::One(one) if !one.is_empty() => Ok(Audience::One(one)),
            Wire::Many(many) if !many.is_empty() && many.iter().all(|a| !a.is_empty()) => Ok(Audience::Many(many)),
            _ => Err(D::Error::custom("`aud` must be a non-empty string or a non-empty array of non-empty strings")),
        }
    }
}

/// A stream's configuration as the transmitter stores and returns it (SSF
/// 1.0 §8.1.1): the body of create, read, update and replace responses.
/// Absent optional members are omitted; `events_supported` is omitted when
/// empty. `Debug` redacts the push `authorization_header`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamConfig {
    /// Transmitter-supplied: unique per receiver, URL-safe (see [`new_stream_id`]).
    pub stream_id: String,
    /// Transmitter-supplied: the issuer, identical to every SET's `iss`.
    pub iss: String,
    /// Transmitter-supplied: the receiver audience; cannot be updated.
    #[serde(with = "audience_serde")]
    pub aud: Audience,
    /// How SETs reach the receiver.
    pub delivery: Delivery,
    /// Transmitter-supplied: event types the transmitter supports for this receiver.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events_supported: Vec<String>,
    /// Receiver-supplied: event types the receiver asked for, as it sent them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events_requested: Option<Vec<String>>,
    /// Transmitter-supplied: `events_supported ∩ events_requested`.
    pub events_delivered: Vec<String>,
    /// Transmitter-supplied: minimum seconds between verification requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_verification_interval: Option<u64>,
    /// Transmitter-supplied: refreshable inactivity timeout, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inactivity_timeout: Option<u64>,
    /// Receiver-supplied: a description for humans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Which management call a stream request body belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// POST: create a stream.
    Create,
    /// PUT: replace the receiver-supplied members of a stream.
    Replace,
    /// PATCH: update the receiver-supplied members present.
    Update,
}

/// A receiver-supplied member of a request body: missing, JSON `null`, or a
/// value. PATCH tells the first two apart (missing: unchanged; `null`:
/// removed); create and PUT treat both as "no value".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Member<T> {
    /// Not in the body.
    #[default]
    Absent,
    /// Present as `null`.
    Null,
    /// Present with a value.
    Value(T),
}

impl<T> Member<T> {
    /// The value, if one was given.
    pub fn into_option(self) -> Option<T> {
        match self {
            Member::Value(value) => Some(value),
            Member::Absent | Member::Null => None,
        }
    }

    /// PATCH semantics: missing keeps `current`, `null` removes, a value replaces.
    fn patch(self, current: Option<T>) -> Option<T> {
        match self {
            Member::Absent => current,
            Member::Null => None,
            Member::Value(value) => Some(value),
        }
    }
}

/// The delivery a receiver asked for. Poll carries no URL: the transmitter
/// sets it. `Debug` redacts `authorization_header`.
#[derive(Clone, PartialEq, Eq)]
pub enum DeliveryRequest {
    /// RFC 8935 push.
    Push {
        /// An absolute http(s) URL; whether the hub may reach it is the SSRF
        /// guard's decision at delivery time, not this parser's.
        endpoint_url: String,
        /// Sent verbatim as the `Authorization` header of every push.
        authorization_header: Option<String>,
    },
    /// RFC 8936 poll.
    Poll,
}

impl fmt::Debug for DeliveryRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeliveryRequest::Push { endpoint_url, authorization_header } => f
                .debug_struct("Push")
                .field("endpoint_url", endpoint_url)
                .field("authorization_header", &authorization_header.as_ref().map(|_| Redacted))
                .finish(),
            DeliveryRequest::Poll => f.write_str("Poll"),
        }
    }
}

/// A create (POST), replace (PUT) or update (PATCH) body: the
/// receiver-supplied members, plus for PUT/PATCH the stream id and any
/// transmitter-supplied members echoed (to be checked against the stream).
#[derive(Clone, Debug, PartialEq)]
pub struct StreamRequest {
    /// The target stream; required for PUT/PATCH, `None` for a create (where
    /// the transmitter chooses it).
    pub stream_id: Option<String>,
    /// `events_requested`.
    pub events_requested: Member<Vec<String>>,
    /// `description`, truncated to [`MAX_DESCRIPTION_CHARS`].
    pub description: Member<String>,
    /// `delivery`.
    pub delivery: Member<DeliveryRequest>,
    /// The members of [`TRANSMITTER_SUPPLIED`] present in a PUT/PATCH body,
    /// as sent; empty for a create.
    pub transmitter_supplied: Map<String, Value>,
}

/// Parses a stream management request body. A broken or non-object body, a
/// member of the wrong type, a missing `stream_id` (PUT/PATCH), an
/// unsupported delivery method or a push without a usable `endpoint_url` is
/// a 400 whose description names the problem.
pub fn parse_request(body: &[u8], kind: RequestKind) -> Result<StreamRequest, SsfError> {
    let mut object = parse_object(body)?;
    let stream_id = match kind {
        // The transmitter generates the id; one sent with a create is
        // ignored like any other transmitter-supplied member.
        RequestKind::Create => None,
        RequestKind::Replace | RequestKind::Update => Some(required_stream_id(&object)?),
    };
    let events_requested = member(&mut object, "events_requested", parse_event_list)?;
    let description = member(&mut object, "description", parse_description)?;
    let delivery = member(&mut object, "delivery", parse_delivery)?;
    let transmitter_supplied = match kind {
        RequestKind::Create => Map::new(),
        RequestKind::Replace | RequestKind::Update => TRANSMITTER_SUPPLIED
            .iter()
            .filter_map(|key| object.remove(*key).map(|value| ((*key).to_owned(), value)))
            .collect(),
    };
    Ok(StreamRequest { stream_id, events_requested, description, delivery, transmitter_supplied })
}

/// `events_supported ∩ requested`, in the order of `supported`. Nothing is
/// delivered when nothing was requested.
pub fn events_delivered(supported: &[&str], requested: Option<&[String]>) -> Vec<String> {
    let Some(requested) = requested else {
        return Vec::new();
    };
    supported.iter().filter(|event| requested.iter().any(|r| r == *event)).map(|event| (*event).to_owned()).collect()
}

/// The configuration of a new stream created by `request`: `iss` and `aud`
/// from the caller (the receiver's registered audience), `events_supported`
/// from `supported`, poll `endpoint_url` from `poll_url(stream_id)`.
pub fn new_stream(
    stream_id: String,
    iss: &str,
    aud: Audience,
    request: StreamRequest,
    supported: &[&str],
    poll_url: impl Fn(&str) -> String,
    min_verification_interval: u64,
) -> StreamConfig {
    let delivery = resolve_delivery(request.delivery.into_option(), &stream_id, &poll_url);
    let events_requested = request.events_requested.into_option();
    StreamConfig {
        events_delivered: events_delivered(supported, events_requested.as_deref()),
        events_supported: supported.iter().map(|event| (*event).to_owned()).collect(),
        stream_id,
        iss: iss.to_owned(),
        aud,
        delivery,
        events_requested,
        min_verification_interval: Some(min_verification_interval),
        inactivity_timeout: None,
        description: request.description.into_option(),
    }
}

/// PATCH (SSF 1.0 §8.1.1.3): the receiver-supplied members present in
/// `request` change, the others stay; `events_supported` becomes `supported`
/// and `events_delivered` is recomputed. A 400 when the request's
/// `stream_id` is not `existing`'s or an echoed transmitter-supplied member
/// differs from `existing`.
pub fn apply_update(
    existing: &StreamConfig,
    request: StreamRequest,
    supported: &[&str],
    poll_url: impl Fn(&str) -> String,
) -> Result<StreamConfig, SsfError> {
    check_echoes(existing, &request)?;
    let mut next = existing.clone();
    next.events_requested = request.events_requested.patch(next.events_requested);
    next.description = request.description.patch(next.description);
    match request.delivery {
        Member::Absent => {}
        delivery => next.delivery = resolve_delivery(delivery.into_option(), &next.stream_id, &poll_url),
    }
    recompute_events(&mut next, supported);
    Ok(next)
}

/// PUT (SSF 1.0 §8.1.1.4): every receiver-supplied member is replaced, a
/// missing one removed (`delivery` falls back to poll); `events_supported`
/// becomes `supported` and `events_delivered` is recomputed. The same 400s
/// as [`apply_update`].
pub fn apply_replace(
    existing: &StreamConfig,
    request: StreamRequest,
    supported: &[&str],
    poll_url: impl Fn(&str) -> String,
) -> Result<StreamConfig, SsfError> {
    check_echoes(existing, &request)?;
    let mut next = existing.clone();
    next.events_requested = request.events_requested.into_option();
    next.description = request.description.into_option();
    next.delivery = resolve_delivery(request.delivery.into_option(), &next.stream_id, &poll_url);
    recompute_events(&mut next, supported);
    Ok(next)
}

fn recompute_events(config: &mut StreamConfig, supported: &[&str]) {
    config.events_supported = supported.iter().map(|event| (*event).to_owned()).collect();
    config.events_delivered = events_delivered(supported, config.events_requested.as_deref());
}

fn resolve_delivery(
    requested: Option<DeliveryRequest>,
    stream_id: &str,
    poll_url: &impl Fn(&str) -> String,
) -> Delivery {
    match requested {
        Some(DeliveryRequest::Push { endpoint_url, authorization_header }) => {
            Delivery::Push { endpoint_url, authorization_header }
        }
        Some(DeliveryRequest::Poll) | None => Delivery::Poll { endpoint_url: poll_url(stream_id) },
    }
}

/// The stream id of a PUT/PATCH must be the stream's, and every
/// transmitter-supplied member echoed must match its current value.
fn check_echoes(existing: &StreamConfig, request: &StreamRequest) -> Result<(), SsfError> {
    match &request.stream_id {
        None => return Err(SsfError::BadRequest("`stream_id` is required".into())),
        Some(id) if *id != existing.stream_id => {
            return Err(SsfError::BadRequest("`stream_id` does not name this stream".into()));
        }
        Some(_) => {}
    }
    for (key, given) in &request.transmitter_supplied {
        if !echo_matches(key, given, expected_value(existing, key)) {
            return Err(SsfError::BadRequest(format!(
                "`{key}` is transmitter-supplied and does not match the stream's current value"
            )));
        }
    }
    Ok(())
}

/// The stream's current value of a transmitter-supplied member, as JSON;
/// `None` when the configuration omits it.
fn expected_value(existing: &StreamConfig, key: &str) -> Option<Value> {
    let strings = |list: &[String]| Value::Array(list.iter().cloned().map(Value::String).collect());
    match key {
        "iss" => Some(Value::String(existing.iss.clone())),
        "aud" => Some(match &existing.aud {
            Audience::One(one) => Value::String(one.clone()),
            Audience::Many(many) => strings(many),
        }),
        "events_supported" => Some(strings(&existing.events_supported)),
        "events_delivered" => Some(strings(&existing.events_delivered)),
        "min_verification_interval" => existing.min_verification_interval.map(Value::from),
        "inactivity_timeout" => existing.inactivity_timeout.map(Value::from),
        _ => None,
    }
}

/// Whether an echoed member equals the expected value. Event lists compare
/// as sets and `aud` as a set of audiences, since neither order nor a
/// string-versus-one-element-array spelling changes their meaning. A member
/// the configuration omits matches only `null`.
fn echo_matches(key: &str, given: &Value, expected: Option<Value>) -> bool {
    let Some(expected) = expected else {
        return given.is_null();
    };
    match key {
        "aud" => string_set(given, true).is_some_and(|set| Some(set) == string_set(&expected, true)),
        "events_supported" | "events_delivered" => {
            string_set(given, false).is_some_and(|set| Some(set) == string_set(&expected, false))
        }
        _ => match expected {
            Value::Number(_) => given.as_u64().is_some() && given.as_u64() == expected.as_u64(),
            _ => *given == expected,
        },
    }
}

fn string_set(value: &Value, allow_single: bool) -> Option<BTreeSet<&str>> {
    match value {
        Value::String(one) if allow_single => Some(BTreeSet::from([one.as_str()])),
        Value::Array(items) => items.iter().map(Value::as_str).collect(),
        _ => None,
    }
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, SsfError> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(SsfError::BadRequest("the request body must be a JSON object".into())),
        Err(error) => Err(SsfError::BadRequest(format!("the request body is not valid JSON: {error}"))),
    }
}

fn required_stream_id(object: &Map<String, Value>) -> Result<String, SsfError> {
    match object.get("stream_id") {
        Some(Value::String(id)) if !id.is_empty() => Ok(id.clone()),
        Some(Value::String(_)) => Err(SsfError::BadRequest("`stream_id` must not be empty".into())),
        None | Some(Value::Null) => Err(SsfError::BadRequest("`stream_id` is required".into())),
        Some(_) => Err(SsfError::BadRequest("`stream_id` must be a string".into())),
    }
}

fn optional_string(object: &mut Map<String, Value>, key: &str) -> Result<Option<String>, SsfError> {
    match object.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(SsfError::BadRequest(format!("`{key}` must be a string"))),
    }
}

fn member<T>(
    object: &mut Map<String, Value>,
    key: &str,
    parse: impl FnOnce(Value) -> Result<T, SsfError>,
) -> Result<Member<T>, SsfError> {
    match object.remove(key) {
        None => Ok(Member::Absent),
        Some(Value::Null) => Ok(Member::Null),
        Some(value) => parse(value).map(Member::Value),
    }
}

/// Event type URIs: non-empty strings (an empty one names no event type,
/// and the configuration echoing it back would break its own schema).
fn parse_event_list(value: Value) -> Result<Vec<String>, SsfError> {
    let bad = || SsfError::BadRequest("`events_requested` must be an array of non-empty strings".into());
    let Value::Array(items) = value else {
        return Err(bad());
    };
    items
        .into_iter()
        .map(|item| match item {
            Value::String(event) if !event.is_empty() => Ok(event),
            _ => Err(bad()),
        })
        .collect()
}

fn parse_description(value: Value) -> Result<String, SsfError> {
    match value {
        Value::String(text) if text.chars().count() > MAX_DESCRIPTION_CHARS => {
            Ok(text.chars().take(MAX_DESCRIPTION_CHARS).collect())
        }
        Value::String(text) => Ok(text),
        _ => Err(SsfError::BadRequest("`description` must be a string".into())),
    }
}

fn parse_delivery(value: Value) -> Result<DeliveryRequest, SsfError> {
    let Value::Object(mut delivery) = value else {
        return Err(SsfError::BadRequest("`delivery` must be an object".into()));
    };
    let method = match delivery.remove("method") {
        Some(Value::String(method)) => method,
        Some(_) => return Err(SsfError::BadRequest("`delivery.method` must be a string".into())),
        // Pre-1.0 drafts spelled it `delivery_method`; say so, since that is
        // the likeliest reason for a missing method.
        None if delivery.contains_key("delivery_method") => {
            return Err(SsfError::BadRequest(
                "`delivery.method` is required (`delivery_method` is a pre-1.0 draft name)".into(),
            ));
        }
        None => return Err(SsfError::BadRequest("`delivery.method` is required".into())),
    };
    match method.as_str() {
        PUSH_METHOD => {
            let endpoint_url = match delivery.remove("endpoint_url") {
                Some(Value::String(url)) => url,
                None | Some(Value::Null) => {
                    return Err(SsfError::BadRequest("push delivery needs `delivery.endpoint_url`".into()));
                }
                Some(_) => return Err(SsfError::BadRequest("`delivery.endpoint_url` must be a string".into())),
            };
            check_push_url(&endpoint_url)?;
            let authorization_header = match delivery.remove("authorization_header") {
                None | Some(Value::Null) => None,
                // It is sent as an HTTP header value on every push; refuse
                // now what the HTTP client would refuse at delivery time.
                Some(Value::String(header)) if axum::http::HeaderValue::from_str(&header).is_ok() => Some(header),
                Some(_) => {
                    return Err(SsfError::BadRequest(
                        "`delivery.authorization_header` must be a string usable as an HTTP header value".into(),
                    ));
                }
            };
            Ok(DeliveryRequest::Push { endpoint_url, authorization_header })
        }
        // The poll URL is the transmitter's; whatever the receiver put in
        // `endpoint_url` is ignored.
        POLL_METHOD => Ok(DeliveryRequest::Poll),
        other => Err(SsfError::BadRequest(format!(
            "unsupported delivery method {}; supported: `{PUSH_METHOD}` (push), `{POLL_METHOD}` (poll)",
            quoted(other)
        ))),
    }
}

/// A push endpoint must at least be an absolute http(s) URL with a host and
/// nothing that cannot appear in a request target. Which hosts the hub may
/// reach, and whether plain http is allowed, is the SSRF guard's call.
fn check_push_url(url: &str) -> Result<(), SsfError> {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"));
    let authority = rest.and_then(|rest| rest.split(['/', '?', '#']).next()).unwrap_or_default();
    if authority.is_empty() || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(SsfError::BadRequest(format!(
            "`delivery.endpoint_url` must be an absolute http(s) URL, got {}",
            quoted(url)
        )));
    }
    Ok(())
}

/// `text` in backquotes for an error description, cut short so a huge input
/// is not reflected whole.
fn quoted(text: &str) -> String {
    const MAX: usize = 80;
    if text.chars().count() > MAX {
        format!("`{}…`", text.chars().take(MAX).collect::<String>())
    } else {
        format!("`{text}`")
    }
}

mod calls;
pub use calls::*;

#[cfg(test)]
mod tests;
