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

use caep_schemas::event::StreamStatus;
use caep_schemas::set::Audience;
use caep_schemas::subject::SubjectId;
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

/// A stream's status as the status endpoint returns it (GET) and takes it
/// (POST) (SSF 1.0 §8.1.2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StatusBody {
    /// The stream.
    pub stream_id: String,
    /// `enabled`, `paused` or `disabled`.
    #[schema(value_type = crate::openapi::StreamStatusName)]
    pub status: StreamStatus,
    /// Why the stream has this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Parses a status update (POST) body: `stream_id` and `status` required,
/// `status` one of `enabled`, `paused`, `disabled`, `reason` an optional
/// string.
pub fn parse_status_update(body: &[u8]) -> Result<StatusBody, SsfError> {
    let mut object = parse_object(body)?;
    let stream_id = required_stream_id(&object)?;
    let bad_status = || SsfError::BadRequest("`status` must be one of `enabled`, `paused`, `disabled`".into());
    let status = match object.remove("status") {
        None | Some(Value::Null) => return Err(SsfError::BadRequest("`status` is required".into())),
        Some(value @ Value::String(_)) => serde_json::from_value(value).map_err(|_| bad_status())?,
        Some(_) => return Err(bad_status()),
    };
    let reason = optional_string(&mut object, "reason")?;
    Ok(StatusBody { stream_id, status, reason })
}

/// An add-subject or remove-subject body (SSF 1.0 §8.1.3.2, §8.1.3.3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SubjectRequest {
    /// The stream.
    pub stream_id: String,
    /// The subject, in a format the hub knows.
    pub subject: SubjectId,
    /// Add only: whether the receiver verified the subject.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
}

impl SubjectRequest {
    /// `verified`, defaulting to true: "If omitted, Event Transmitters
    /// SHOULD assume that the subject has been verified" (§8.1.3.2).
    pub fn is_verified(&self) -> bool {
        self.verified.unwrap_or(true)
    }
}

/// Parses an add-subject or remove-subject body. `stream_id` and `subject`
/// are required; a subject without a `format`, of a format the hub does not
/// know (at any depth of a complex or aliases subject) or with malformed
/// members is a 400. `verified`, when present, must be a boolean; a remove
/// handler ignores it.
pub fn parse_subject_request(body: &[u8]) -> Result<SubjectRequest, SsfError> {
    let mut object = parse_object(body)?;
    let stream_id = required_stream_id(&object)?;
    let subject = match object.remove("subject") {
        None | Some(Value::Null) => return Err(SsfError::BadRequest("`subject` is required".into())),
        Some(value) => subject_of(value, "subject")?,
    };
    let verified = match object.remove("verified") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(verified)) => Some(verified),
        Some(_) => return Err(SsfError::BadRequest("`verified` must be a boolean".into())),
    };
    Ok(SubjectRequest { stream_id, subject, verified })
}

/// Subjects one add-many call may carry, at most.
pub const MAX_SUBJECTS_PER_CALL: usize = 100;

/// A request of the add-many extension (see
/// [`crate::metadata::ADD_SUBJECTS_MEMBER`]).
#[derive(Clone, Debug, PartialEq)]
pub struct SubjectsRequest {
    /// The stream.
    pub stream_id: String,
    /// The subjects, each in a format the hub knows.
    pub subjects: Vec<SubjectId>,
}

/// Parses an add-many body: `stream_id` and 1 to
/// [`MAX_SUBJECTS_PER_CALL`] `subjects`, each as add-subject takes one.
pub fn parse_subjects_request(body: &[u8]) -> Result<SubjectsRequest, SsfError> {
    let mut object = parse_object(body)?;
    let stream_id = required_stream_id(&object)?;
    let values = match object.remove("subjects") {
        Some(Value::Array(values)) if !values.is_empty() => values,
        _ => return Err(SsfError::BadRequest("`subjects` must be a non-empty array of subject identifiers".into())),
    };
    if values.len() > MAX_SUBJECTS_PER_CALL {
        return Err(SsfError::BadRequest(format!("at most {MAX_SUBJECTS_PER_CALL} `subjects` per call")));
    }
    let subjects = values.into_iter().map(|value| subject_of(value, "subjects[]")).collect::<Result<_, _>>()?;
    Ok(SubjectsRequest { stream_id, subjects })
}

/// One subject identifier of a request body, in a format the hub knows.
fn subject_of(value: Value, member: &str) -> Result<SubjectId, SsfError> {
    let subject = match value {
        value @ Value::Object(_) => SubjectId::from_value(value)
            .map_err(|error| SsfError::BadRequest(format!("invalid `{member}`: {error}")))?,
        _ => return Err(SsfError::BadRequest(format!("`{member}` must be a subject identifier object"))),
    };
    if let Some(format) = unknown_format(&subject) {
        return Err(SsfError::BadRequest(format!("unsupported subject format {}", quoted(format))));
    }
    Ok(subject)
}

/// The first format the hub does not model, searching nested subjects: such
/// a subject could never match an event the hub emits.
fn unknown_format(subject: &SubjectId) -> Option<&str> {
    match subject {
        SubjectId::Other { format, .. } => Some(format),
        SubjectId::Aliases { identifiers } => identifiers.iter().find_map(unknown_format),
        SubjectId::Complex(complex) => {
            complex.members().into_iter().find_map(|(_, member)| member.and_then(unknown_format))
        }
        _ => None,
    }
}

/// A verification request body (SSF 1.0 §8.1.4.2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerificationRequest {
    /// The stream.
    pub stream_id: String,
    /// Echoed in the verification event's `state`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

/// Parses a verification request body: `stream_id` required, `state` an
/// optional string.
pub fn parse_verification_request(body: &[u8]) -> Result<VerificationRequest, SsfError> {
    let mut object = parse_object(body)?;
    let stream_id = required_stream_id(&object)?;
    let state = optional_string(&mut object, "state")?;
    Ok(VerificationRequest { stream_id, state })
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::PathBuf;

    const SUPPORTED: [&str; 3] = [
        "urn:example:secevent:events:type_1",
        "urn:example:secevent:events:type_2",
        "urn:example:secevent:events:type_3",
    ];
    const SPEC_ID: &str = "f67e39a0a4d34d56b3aa1bc4cff0069f";
    const ISS: &str = "https://tr.example.com";

    fn examples_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas/examples")
    }

    fn example(file: &str) -> Value {
        let text = std::fs::read_to_string(examples_dir().join(file)).expect("example file");
        serde_json::from_str(&text).expect("example is JSON")
    }

    /// The example files of `kind`, as `schemas/examples/index.json` lists them.
    fn examples_of(kind: &str) -> Vec<(String, Value)> {
        let index = example("index.json");
        let entries = index.as_array().expect("index is an array");
        let files: Vec<(String, Value)> = entries
            .iter()
            .filter(|entry| entry["kind"] == kind)
            .map(|entry| {
                let file = entry["file"].as_str().expect("file name").to_owned();
                let value = example(&file);
                (file, value)
            })
            .collect();
        assert!(!files.is_empty(), "no examples of kind {kind}");
        files
    }

    fn spec_aud() -> Audience {
        Audience::Many(vec!["https://receiver.example.com/web".into(), "https://receiver.example.com/mobile".into()])
    }

    fn poll_url(stream_id: &str) -> String {
        format!("https://hub.example.com/ssf/poll/{stream_id}")
    }

    fn parse(body: Value, kind: RequestKind) -> Result<StreamRequest, SsfError> {
        parse_request(body.to_string().as_bytes(), kind)
    }

    fn bad_request(result: Result<impl fmt::Debug, SsfError>) -> String {
        match result {
            Err(SsfError::BadRequest(description)) => description,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    fn config(value: Value) -> StreamConfig {
        serde_json::from_value(value).expect("a stream configuration")
    }

    fn create(body: Value) -> StreamConfig {
        let request = parse(body, RequestKind::Create).expect("valid create");
        new_stream(SPEC_ID.into(), ISS, spec_aud(), request, &SUPPORTED, poll_url, 30)
    }

    /// PATCH or PUT `request` onto `existing`, as `kind` says.
    fn apply(kind: RequestKind, existing: &StreamConfig, request: StreamRequest) -> Result<StreamConfig, SsfError> {
        match kind {
            RequestKind::Update => apply_update(existing, request, &SUPPORTED, poll_url),
            RequestKind::Replace => apply_replace(existing, request, &SUPPORTED, poll_url),
            RequestKind::Create => panic!("not an update"),
        }
    }

    fn push_stream() -> StreamConfig {
        config(example("ssf-18-read-stream-response.json"))
    }

    // --- stream ids

    #[test]
    fn stream_ids_are_128_bit_lowercase_hex() {
        let id = new_stream_id();
        assert_eq!(id.len(), 32);
        assert!(id.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)), "{id}");
        assert_ne!(id, new_stream_id());
    }

    // --- the spec's own examples

    #[test]
    fn spec_configurations_round_trip() {
        let mut all = examples_of("stream-configuration");
        for (file, list) in examples_of("stream-configuration-list") {
            let items = list.as_array().expect("a list").clone();
            all.extend(items.into_iter().map(|item| (file.clone(), item)));
        }
        for (file, value) in all {
            let parsed: StreamConfig =
                serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{file} does not parse: {e}"));
            assert_eq!(serde_json::to_value(&parsed).expect("serializes"), value, "{file}");
        }
    }

    #[test]
    fn spec_request_examples_parse() {
        for (file, value) in examples_of("stream-configuration-request") {
            let body = value.to_string();
            let create = parse_request(body.as_bytes(), RequestKind::Create);
            assert!(create.is_ok(), "{file} as create: {create:?}");
            if value.get("stream_id").is_some() {
                for kind in [RequestKind::Update, RequestKind::Replace] {
                    let request = parse_request(body.as_bytes(), kind).unwrap_or_else(|e| panic!("{file}: {e}"));
                    assert_eq!(request.stream_id.as_deref(), Some(SPEC_ID), "{file}");
                }
            }
        }
    }

    #[test]
    fn spec_create_example_gives_the_spec_response() {
        let created = create(example("ssf-16-create-stream-request.json"));
        let mut expected = example("ssf-17-create-stream-response.json");
        expected["min_verification_interval"] = json!(30);
        assert_eq!(serde_json::to_value(&created).expect("serializes"), expected);
    }

    #[test]
    fn spec_update_example_gives_the_spec_response() {
        let request = parse(example("ssf-22-update-stream-request.json"), RequestKind::Update).expect("valid");
        let updated = apply_update(&push_stream(), request, &SUPPORTED, poll_url).expect("applies");
        assert_eq!(updated, config(example("ssf-23-update-stream-response.json")));
    }

    #[test]
    fn spec_replace_example_gives_the_spec_response() {
        let request = parse(example("ssf-24-replace-stream-request.json"), RequestKind::Replace).expect("valid");
        let replaced = apply_replace(&push_stream(), request, &SUPPORTED, poll_url).expect("applies");
        assert_eq!(replaced, config(example("ssf-25-replace-stream-response.json")));
    }

    // --- create

    #[test]
    fn create_without_delivery_means_poll_at_the_transmitters_url() {
        let created = create(json!({"events_requested": [SUPPORTED[0]]}));
        assert_eq!(created.delivery, Delivery::Poll { endpoint_url: poll_url(SPEC_ID) });
        let json = serde_json::to_value(&created).expect("serializes");
        assert_eq!(json["delivery"], json!({"method": POLL_METHOD, "endpoint_url": poll_url(SPEC_ID)}));
        assert_eq!(created.iss, ISS);
        assert_eq!(created.aud, spec_aud());
        assert_eq!(created.min_verification_interval, Some(30));
        assert_eq!(created.inactivity_timeout, None);
    }

    #[test]
    fn create_with_null_delivery_means_poll() {
        let created = create(json!({"delivery": null}));
        assert_eq!(created.delivery, Delivery::Poll { endpoint_url: poll_url(SPEC_ID) });
    }

    #[test]
    fn a_receivers_poll_endpoint_url_is_ignored() {
        let created =
            create(json!({"delivery": {"method": POLL_METHOD, "endpoint_url": "https://evil.example/steal"}}));
        assert_eq!(created.delivery.endpoint_url(), poll_url(SPEC_ID));
    }

    #[test]
    fn create_keeps_push_parameters() {
        let created = create(json!({"delivery": {
            "method": PUSH_METHOD,
            "endpoint_url": "https://rp.example/events",
            "authorization_header": "Bearer s3cr3t"
        }}));
        assert_eq!(
            created.delivery,
            Delivery::Push {
                endpoint_url: "https://rp.example/events".into(),
                authorization_header: Some("Bearer s3cr3t".into())
            }
        );
    }

    #[test]
    fn create_ignores_transmitter_supplied_members_and_unknown_ones() {
        let created = create(json!({
            "stream_id": "chosen-by-receiver",
            "iss": "https://someone-else.example",
            "aud": "another-receiver",
            "events_delivered": ["urn:x"],
            "min_verification_interval": 1,
            "format": "email",
            "x-extension": {"anything": true}
        }));
        assert_eq!(created.stream_id, SPEC_ID);
        assert_eq!(created.iss, ISS);
        assert_eq!(created.aud, spec_aud());
        assert_eq!(created.events_delivered, Vec::<String>::new());
        assert_eq!(created.min_verification_interval, Some(30));
    }

    #[test]
    fn unsupported_delivery_method_is_a_clear_400() {
        let description =
            bad_request(parse(json!({"delivery": {"method": "urn:example:smoke-signals"}}), RequestKind::Create));
        assert!(description.contains("unsupported delivery method `urn:example:smoke-signals`"), "{description}");
        assert!(description.contains(PUSH_METHOD) && description.contains(POLL_METHOD), "{description}");
    }

    #[test]
    fn a_huge_method_is_not_reflected_whole() {
        let method = "x".repeat(10_000);
        let description = bad_request(parse(json!({"delivery": {"method": method}}), RequestKind::Create));
        assert!(description.len() < 400, "{description}");
    }

    #[test]
    fn delivery_must_name_a_method() {
        let description = bad_request(parse(json!({"delivery": {}}), RequestKind::Create));
        assert!(description.contains("`delivery.method` is required"), "{description}");
        let description = bad_request(parse(
            json!({"delivery": {"delivery_method": PUSH_METHOD, "url": "https://rp.example/e"}}),
            RequestKind::Create,
        ));
        assert!(description.contains("pre-1.0"), "{description}");
        bad_request(parse(json!({"delivery": {"method": 8935}}), RequestKind::Create));
        bad_request(parse(json!({"delivery": "push"}), RequestKind::Create));
    }

    #[test]
    fn push_needs_an_absolute_http_endpoint_url() {
        let description = bad_request(parse(json!({"delivery": {"method": PUSH_METHOD}}), RequestKind::Create));
        assert!(description.contains("endpoint_url"), "{description}");
        for url in [
            json!(null),
            json!(42),
            json!(""),
            json!("/relative"),
            json!("ftp://rp.example/x"),
            json!("https://"),
            json!("https:///path"),
            json!("https://rp.example/a b"),
            json!("https://rp.example/\n"),
        ] {
            bad_request(parse(json!({"delivery": {"method": PUSH_METHOD, "endpoint_url": url}}), RequestKind::Create));
        }
        for url in ["https://rp.example", "http://127.0.0.1:8080/events?x=1", "https://rp.example:8443/ssf#frag"] {
            parse(json!({"delivery": {"method": PUSH_METHOD, "endpoint_url": url}}), RequestKind::Create)
                .unwrap_or_else(|e| panic!("{url}: {e}"));
        }
    }

    #[test]
    fn authorization_header_must_be_a_valid_header_value() {
        for header in [json!(7), json!("Bearer x\r\nX-Injected: 1"), json!(["Bearer x"])] {
            let body = json!({"delivery": {
                "method": PUSH_METHOD, "endpoint_url": "https://rp.example/e", "authorization_header": header
            }});
            bad_request(parse(body, RequestKind::Create));
        }
    }

    #[test]
    fn broken_or_non_object_bodies_are_400() {
        for body in [&b"{"[..], b"", b"not json", b"[]", b"\"text\"", b"42", b"null"] {
            for kind in [RequestKind::Create, RequestKind::Replace, RequestKind::Update] {
                bad_request(parse_request(body, kind));
            }
        }
    }

    #[test]
    fn an_empty_event_type_is_refused() {
        let description = bad_request(parse(json!({"events_requested": [""]}), RequestKind::Create));
        assert!(description.contains("non-empty"), "{description}");
    }

    #[test]
    fn member_types_are_checked() {
        bad_request(parse(json!({"events_requested": "urn:x"}), RequestKind::Create));
        bad_request(parse(json!({"events_requested": ["urn:x", 3]}), RequestKind::Create));
        bad_request(parse(json!({"description": 5}), RequestKind::Create));
    }

    #[test]
    fn long_descriptions_are_truncated() {
        let created = create(json!({"description": "é".repeat(MAX_DESCRIPTION_CHARS + 10)}));
        assert_eq!(created.description.expect("kept").chars().count(), MAX_DESCRIPTION_CHARS);
    }

    // --- events_delivered

    #[test]
    fn events_delivered_is_the_intersection_in_supported_order() {
        let requested = vec![SUPPORTED[2].to_owned(), "urn:unknown".to_owned(), SUPPORTED[0].to_owned()];
        assert_eq!(events_delivered(&SUPPORTED, Some(&requested)), vec![SUPPORTED[0], SUPPORTED[2]]);
        assert_eq!(events_delivered(&SUPPORTED, Some(&[])), Vec::<String>::new());
        assert_eq!(events_delivered(&SUPPORTED, None), Vec::<String>::new());
    }

    #[test]
    fn without_events_requested_nothing_is_delivered() {
        let created = create(json!({}));
        assert_eq!(created.events_requested, None);
        assert!(created.events_delivered.is_empty());
        let json = serde_json::to_value(&created).expect("serializes");
        assert!(json.get("events_requested").is_none());
        assert_eq!(json["events_delivered"], json!([]), "events_delivered is REQUIRED, even empty");
    }

    #[test]
    fn unknown_requested_events_are_kept_but_not_delivered() {
        let created = create(json!({"events_requested": ["urn:unknown", SUPPORTED[1]]}));
        assert_eq!(created.events_requested, Some(vec!["urn:unknown".to_owned(), SUPPORTED[1].to_owned()]));
        assert_eq!(created.events_delivered, vec![SUPPORTED[1]]);
    }

    // --- update (PATCH) and replace (PUT)

    #[test]
    fn update_and_replace_need_a_stream_id() {
        for kind in [RequestKind::Update, RequestKind::Replace] {
            let description = bad_request(parse(json!({"description": "x"}), kind));
            assert!(description.contains("`stream_id` is required"), "{description}");
            bad_request(parse(json!({"stream_id": 7}), kind));
            bad_request(parse(json!({"stream_id": ""}), kind));
            bad_request(parse(json!({"stream_id": null}), kind));
        }
    }

    #[test]
    fn update_changes_only_the_members_present() {
        let existing = push_stream();
        let request =
            parse(json!({"stream_id": SPEC_ID, "description": "renamed"}), RequestKind::Update).expect("valid");
        let updated = apply_update(&existing, request, &SUPPORTED, poll_url).expect("applies");
        assert_eq!(updated.description.as_deref(), Some("renamed"));
        assert_eq!(updated.delivery, existing.delivery);
        assert_eq!(updated.events_requested, existing.events_requested);
        assert_eq!(updated.events_delivered, existing.events_delivered);
        assert_eq!(updated.iss, existing.iss);
        assert_eq!(updated.aud, existing.aud);
    }

    #[test]
    fn update_with_null_removes_a_member() {
        let request =
            parse(json!({"stream_id": SPEC_ID, "description": null, "events_requested": null}), RequestKind::Update)
                .expect("valid");
        let updated = apply_update(&push_stream(), request, &SUPPORTED, poll_url).expect("applies");
        assert_eq!(updated.description, None);
        assert_eq!(updated.events_requested, None);
        assert!(updated.events_delivered.is_empty());
    }

    #[test]
    fn update_can_switch_push_to_poll_and_back() {
        let request = parse(json!({"stream_id": SPEC_ID, "delivery": {"method": POLL_METHOD}}), RequestKind::Update)
            .expect("valid");
        let polled = apply_update(&push_stream(), request, &SUPPORTED, poll_url).expect("applies");
        assert_eq!(polled.delivery, Delivery::Poll { endpoint_url: poll_url(SPEC_ID) });

        let request = parse(json!({"stream_id": SPEC_ID, "delivery": null}), RequestKind::Update).expect("valid");
        let defaulted = apply_update(&push_stream(), request, &SUPPORTED, poll_url).expect("applies");
        assert_eq!(defaulted.delivery, Delivery::Poll { endpoint_url: poll_url(SPEC_ID) });

        let body = json!({"stream_id": SPEC_ID, "delivery": {"method": PUSH_METHOD, "endpoint_url": "https://rp.example/new"}});
        let request = parse(body, RequestKind::Update).expect("valid");
        let pushed = apply_update(&polled, request, &SUPPORTED, poll_url).expect("applies");
        assert_eq!(
            pushed.delivery,
            Delivery::Push { endpoint_url: "https://rp.example/new".into(), authorization_header: None }
        );
    }

    #[test]
    fn a_new_delivery_object_replaces_the_old_one_whole() {
        let mut existing = push_stream();
        existing.delivery = Delivery::Push {
            endpoint_url: "https://receiver.example.com/events".into(),
            authorization_header: Some("Bearer old".into()),
        };
        let body = json!({"stream_id": SPEC_ID, "delivery": {"method": PUSH_METHOD, "endpoint_url": "https://rp.example/new"}});
        let updated = apply_update(&existing, parse(body, RequestKind::Update).expect("valid"), &SUPPORTED, poll_url)
            .expect("applies");
        assert_eq!(
            updated.delivery,
            Delivery::Push { endpoint_url: "https://rp.example/new".into(), authorization_header: None }
        );
    }

    #[test]
    fn replace_removes_missing_receiver_supplied_members() {
        let request = parse(json!({"stream_id": SPEC_ID}), RequestKind::Replace).expect("valid");
        let replaced = apply_replace(&push_stream(), request, &SUPPORTED, poll_url).expect("applies");
        assert_eq!(replaced.description, None);
        assert_eq!(replaced.events_requested, None);
        assert!(replaced.events_delivered.is_empty());
        assert_eq!(replaced.delivery, Delivery::Poll { endpoint_url: poll_url(SPEC_ID) });
        assert_eq!(replaced.stream_id, SPEC_ID);
        assert_eq!(replaced.iss, ISS);
        assert_eq!(replaced.aud, spec_aud());
    }

    #[test]
    fn update_and_replace_recompute_against_the_current_supported_list() {
        let now_supported = [SUPPORTED[0], SUPPORTED[1], SUPPORTED[2], "urn:example:secevent:events:type_4"];
        let body = json!({"stream_id": SPEC_ID});
        let updated = apply_update(
            &push_stream(),
            parse(body.clone(), RequestKind::Update).expect("valid"),
            &now_supported,
            poll_url,
        )
        .expect("applies");
        assert_eq!(updated.events_supported.len(), 4);
        assert_eq!(updated.events_delivered, vec![SUPPORTED[1], SUPPORTED[2], now_supported[3]]);
    }

    #[test]
    fn echoed_transmitter_supplied_members_that_match_are_accepted() {
        let mut existing = push_stream();
        existing.min_verification_interval = Some(30);
        let body = json!({
            "stream_id": SPEC_ID,
            "iss": ISS,
            // Same audiences, other order.
            "aud": ["https://receiver.example.com/mobile", "https://receiver.example.com/web"],
            "events_supported": [SUPPORTED[2], SUPPORTED[1], SUPPORTED[0]],
            "events_delivered": [SUPPORTED[2], SUPPORTED[1]],
            "min_verification_interval": 30,
            "inactivity_timeout": null,
            "description": "echoed back"
        });
        for kind in [RequestKind::Update, RequestKind::Replace] {
            let request = parse(body.clone(), kind).expect("valid");
            assert_eq!(request.transmitter_supplied.len(), 6);
            apply(kind, &existing, request).expect("matching echoes are accepted");
        }
    }

    #[test]
    fn a_single_audience_matches_its_string_or_one_element_array() {
        let mut existing = push_stream();
        existing.aud = Audience::One("rp-1".into());
        for aud in [json!("rp-1"), json!(["rp-1"])] {
            let request = parse(json!({"stream_id": SPEC_ID, "aud": aud}), RequestKind::Update).expect("valid");
            apply_update(&existing, request, &SUPPORTED, poll_url).expect("matches");
        }
    }

    #[test]
    fn echoed_transmitter_supplied_members_that_differ_are_400() {
        let mismatches = [
            ("iss", json!("https://other.example")),
            ("aud", json!("https://receiver.example.com/web")),
            ("aud", json!(["https://receiver.example.com/web", "https://attacker.example"])),
            ("events_supported", json!([SUPPORTED[0]])),
            // The value before the update, not after: the request below asks
            // for type_1 only, but events_delivered must match the current one.
            ("events_delivered", json!([SUPPORTED[0]])),
            ("events_delivered", json!("not-a-list")),
            ("min_verification_interval", json!(5)),
            ("inactivity_timeout", json!(600)),
        ];
        for (key, value) in mismatches {
            let mut body = json!({"stream_id": SPEC_ID, "events_requested": [SUPPORTED[0]]});
            body[key] = value.clone();
            for kind in [RequestKind::Update, RequestKind::Replace] {
                let request = parse(body.clone(), kind).expect("parses");
                let description = bad_request(apply(kind, &push_stream(), request));
                assert!(description.contains(&format!("`{key}`")), "{key}={value}: {description}");
            }
        }
    }

    #[test]
    fn a_request_for_another_stream_is_refused() {
        let request = parse(json!({"stream_id": "someone-elses"}), RequestKind::Update).expect("valid");
        bad_request(apply_update(&push_stream(), request, &SUPPORTED, poll_url));
        let create_request = parse(json!({}), RequestKind::Create).expect("valid");
        bad_request(apply_replace(&push_stream(), create_request, &SUPPORTED, poll_url));
    }

    // --- secrets

    #[test]
    fn debug_never_shows_the_authorization_header() {
        let body = json!({"stream_id": SPEC_ID, "delivery": {
            "method": PUSH_METHOD, "endpoint_url": "https://rp.example/e", "authorization_header": "Bearer s3cr3t"
        }});
        let request = parse(body, RequestKind::Update).expect("valid");
        let printed = format!("{request:?}");
        assert!(!printed.contains("s3cr3t") && printed.contains("<redacted>"), "{printed}");
        let updated = apply_update(&push_stream(), request, &SUPPORTED, poll_url).expect("applies");
        for printed in [format!("{updated:?}"), format!("{:?}", updated.delivery), format!("{updated:#?}")] {
            assert!(!printed.contains("s3cr3t") && printed.contains("<redacted>"), "{printed}");
        }
    }

    #[test]
    fn the_configuration_returns_the_authorization_header_to_its_owner() {
        let created = create(json!({"delivery": {
            "method": PUSH_METHOD, "endpoint_url": "https://rp.example/e", "authorization_header": "Bearer s3cr3t"
        }}));
        let json = serde_json::to_value(&created).expect("serializes");
        assert_eq!(json["delivery"]["authorization_header"], "Bearer s3cr3t");
        // and a read-modify-replace with that body keeps it.
        let mut body = json.clone();
        body["description"] = json!("edited");
        let replaced = apply_replace(&created, parse(body, RequestKind::Replace).expect("valid"), &SUPPORTED, poll_url)
            .expect("the echoed configuration matches");
        assert_eq!(replaced.delivery, created.delivery);
        assert_eq!(replaced.description.as_deref(), Some("edited"));
    }

    // --- stored configuration parsing

    #[test]
    fn stored_delivery_needs_a_known_method_and_an_endpoint() {
        let mut value = example("ssf-18-read-stream-response.json");
        value["delivery"] = json!({"method": "urn:example:other", "endpoint_url": "https://x"});
        assert!(serde_json::from_value::<StreamConfig>(value.clone()).is_err());
        value["delivery"] = json!({"method": POLL_METHOD});
        assert!(serde_json::from_value::<StreamConfig>(value).is_err());
    }

    #[test]
    fn aud_is_a_non_empty_string_or_array() {
        let mut value = example("ssf-18-read-stream-response.json");
        value["aud"] = json!("rp-1");
        assert_eq!(config(value.clone()).aud, Audience::One("rp-1".into()));
        assert_eq!(serde_json::to_value(config(value.clone())).expect("serializes")["aud"], "rp-1");
        for bad in [json!(""), json!([]), json!([""]), json!(3)] {
            value["aud"] = bad;
            assert!(serde_json::from_value::<StreamConfig>(value.clone()).is_err());
        }
    }

    // --- status

    #[test]
    fn status_update_examples_parse() {
        let plain = parse_status_update(json!({"stream_id": SPEC_ID, "status": "paused"}).to_string().as_bytes())
            .expect("valid");
        assert_eq!(plain, StatusBody { stream_id: SPEC_ID.into(), status: StreamStatus::Paused, reason: None });
        let body = json!({"stream_id": SPEC_ID, "status": "paused", "reason": "Disabled by administrator action."});
        let with_reason = parse_status_update(body.to_string().as_bytes()).expect("valid");
        assert_eq!(with_reason.reason.as_deref(), Some("Disabled by administrator action."));
        // The response echoes the same fields.
        assert_eq!(serde_json::to_value(&with_reason).expect("serializes"), body);
        assert_eq!(
            serde_json::to_value(&plain).expect("serializes"),
            json!({"stream_id": SPEC_ID, "status": "paused"})
        );
        for status in ["enabled", "disabled"] {
            parse_status_update(json!({"stream_id": SPEC_ID, "status": status}).to_string().as_bytes()).expect("valid");
        }
    }

    #[test]
    fn the_spec_status_read_response_parses() {
        let body = json!({"stream_id": SPEC_ID, "status": "paused", "reason": "SYSTEM_DOWN_FOR_MAINTENANCE"});
        let parsed: StatusBody = serde_json::from_value(body).expect("valid");
        assert_eq!(parsed.status, StreamStatus::Paused);
    }

    #[test]
    fn bad_status_bodies_are_400() {
        let description =
            bad_request(parse_status_update(json!({"stream_id": SPEC_ID, "status": "stopped"}).to_string().as_bytes()));
        assert!(description.contains("enabled") && description.contains("disabled"), "{description}");
        for body in [
            json!({"stream_id": SPEC_ID, "status": "Enabled"}),
            json!({"stream_id": SPEC_ID, "status": 1}),
            json!({"stream_id": SPEC_ID}),
            json!({"stream_id": SPEC_ID, "status": null}),
            json!({"status": "enabled"}),
            json!({"stream_id": SPEC_ID, "status": "enabled", "reason": 3}),
            json!(["enabled"]),
        ] {
            bad_request(parse_status_update(body.to_string().as_bytes()));
        }
        bad_request(parse_status_update(b"{oops"));
    }

    // --- subjects

    #[test]
    fn the_spec_add_subject_example_parses() {
        let body = json!({
            "stream_id": SPEC_ID,
            "subject": {"format": "email", "email": "example.user@example.com"},
            "verified": true
        });
        let request = parse_subject_request(body.to_string().as_bytes()).expect("valid");
        assert_eq!(request.subject, SubjectId::email("example.user@example.com"));
        assert_eq!(request.verified, Some(true));
        assert_eq!(serde_json::to_value(&request).expect("serializes"), body);
    }

    #[test]
    fn add_many_takes_one_to_a_hundred_known_subjects() {
        let session = |n: usize| json!({"format": "complex", "session": {"format": "opaque", "id": format!("s{n}")}});
        let body = json!({"stream_id": SPEC_ID, "subjects": [session(1), session(2)]});
        let request = parse_subjects_request(body.to_string().as_bytes()).expect("valid");
        assert_eq!(request.subjects.len(), 2);
        assert_eq!(request.stream_id, SPEC_ID);
        let refused = [
            json!({"stream_id": SPEC_ID}),
            json!({"stream_id": SPEC_ID, "subjects": []}),
            json!({"stream_id": SPEC_ID, "subjects": session(1)}),
            json!({"stream_id": SPEC_ID, "subjects": [session(1), "s2"]}),
            json!({"stream_id": SPEC_ID, "subjects": [{"format": "x-unknown", "id": "s"}]}),
            json!({"stream_id": SPEC_ID, "subjects": (0..=MAX_SUBJECTS_PER_CALL).map(session).collect::<Vec<_>>()}),
            json!({"subjects": [session(1)]}),
        ];
        for body in refused {
            let error = parse_subjects_request(body.to_string().as_bytes()).expect_err("refused");
            assert!(matches!(error, SsfError::BadRequest(_)), "{body}: {error:?}");
        }
    }

    #[test]
    fn verified_defaults_to_true() {
        let body = json!({"stream_id": SPEC_ID, "subject": {"format": "opaque", "id": "abc"}});
        let request = parse_subject_request(body.to_string().as_bytes()).expect("valid");
        assert_eq!(request.verified, None);
        assert!(request.is_verified());
        let body = json!({"stream_id": SPEC_ID, "subject": {"format": "opaque", "id": "abc"}, "verified": false});
        assert!(!parse_subject_request(body.to_string().as_bytes()).expect("valid").is_verified());
    }

    #[test]
    fn complex_subjects_of_known_formats_parse() {
        let body = json!({"stream_id": SPEC_ID, "subject": {
            "format": "complex",
            "session": {"format": "opaque", "id": "s-1"},
            "user": {"format": "iss_sub", "iss": "https://idp.example.com/", "sub": "u-1"}
        }});
        let request = parse_subject_request(body.to_string().as_bytes()).expect("valid");
        assert!(request.subject.as_complex().is_some());
    }

    #[test]
    fn bad_subject_requests_are_400() {
        // The spec's own remove example uses `phone`, which is not an RFC
        // 9493 format (that is `phone_number`).
        let description = bad_request(parse_subject_request(
            json!({"stream_id": SPEC_ID, "subject": {"format": "phone", "phone_number": "+12065550123"}})
                .to_string()
                .as_bytes(),
        ));
        assert!(description.contains("unsupported subject format `phone`"), "{description}");
        for body in [
            json!({"stream_id": SPEC_ID, "subject": {"email": "a@example.com"}}),
            json!({"stream_id": SPEC_ID, "subject": {"format": "email"}}),
            json!({"stream_id": SPEC_ID, "subject": {"format": 7, "email": "a@example.com"}}),
            json!({"stream_id": SPEC_ID, "subject": {"format": "complex"}}),
            json!({"stream_id": SPEC_ID, "subject": {"format": "complex",
                "device": {"format": "catalog_item", "catalog_id": "c1"}}}),
            json!({"stream_id": SPEC_ID, "subject": {"format": "aliases",
                "identifiers": [{"format": "made_up", "x": "y"}]}}),
            json!({"stream_id": SPEC_ID, "subject": "a@example.com"}),
            json!({"stream_id": SPEC_ID}),
            json!({"stream_id": SPEC_ID, "subject": null}),
            json!({"subject": {"format": "email", "email": "a@example.com"}}),
            json!({"stream_id": SPEC_ID, "subject": {"format": "email", "email": "a@example.com"}, "verified": "yes"}),
        ] {
            bad_request(parse_subject_request(body.to_string().as_bytes()));
        }
        bad_request(parse_subject_request(b"[]"));
    }

    // --- verification

    #[test]
    fn the_spec_verification_example_parses() {
        let body = json!({"stream_id": SPEC_ID, "state": "VGhpcyBpcyBhbiBleGFtcGxlIHN0YXRlIHZhbHVlLgo="});
        let request = parse_verification_request(body.to_string().as_bytes()).expect("valid");
        assert_eq!(request.state.as_deref(), Some("VGhpcyBpcyBhbiBleGFtcGxlIHN0YXRlIHZhbHVlLgo="));
        assert_eq!(serde_json::to_value(&request).expect("serializes"), body);
    }

    #[test]
    fn verification_state_is_optional_but_a_string() {
        for body in [json!({"stream_id": SPEC_ID}), json!({"stream_id": SPEC_ID, "state": null})] {
            let request = parse_verification_request(body.to_string().as_bytes()).expect("valid");
            assert_eq!(request.state, None);
        }
        bad_request(parse_verification_request(json!({"stream_id": SPEC_ID, "state": 1}).to_string().as_bytes()));
        bad_request(parse_verification_request(json!({"state": "x"}).to_string().as_bytes()));
        bad_request(parse_verification_request(b"not json"));
    }
}
