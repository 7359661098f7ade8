//! Wire shapes of SSF 1.0 stream management as the receiver sees them:
//! transmitter metadata (§7.1), stream configurations (§8.1.1), status
//! (§8.1.2), and the request builder for create, update and replace.
//!
//! Parsing is lenient where the spec lets transmitters vary (unknown members
//! are kept in `extra`, `aud` may be a string or an array) and strict only
//! where the SDK depends on a member.

use std::fmt;

use caep_schemas::event::{StreamStatus, event_type};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

pub use caep_schemas::ssf::{POLL_METHOD, PUSH_METHOD, TransmitterMetadata};

/// How a stream's SETs reach the receiver, as the transmitter returns it.
/// `Debug` redacts `authorization_header`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// [`PUSH_METHOD`] or [`POLL_METHOD`].
    pub method: String,
    /// The push target (set by the receiver) or the poll URL (set by the
    /// transmitter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    /// Push only: the `Authorization` value the transmitter sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_header: Option<String>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("method", &self.method)
            .field("endpoint_url", &self.endpoint_url)
            .field("authorization_header", &self.authorization_header.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Delivery {
    /// Whether this is RFC 8935 push.
    pub fn is_push(&self) -> bool {
        self.method == PUSH_METHOD
    }

    /// Whether this is RFC 8936 poll.
    pub fn is_poll(&self) -> bool {
        self.method == POLL_METHOD
    }
}

/// A stream's configuration as the transmitter returns it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StreamConfiguration {
    /// The stream's id.
    pub stream_id: String,
    /// The transmitter's issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// The receiver's audience(s).
    #[serde(default, deserialize_with = "one_or_many", skip_serializing_if = "Vec::is_empty")]
    pub aud: Vec<String>,
    /// How SETs are delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Delivery>,
    /// Event types the transmitter can send.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events_supported: Vec<String>,
    /// Event types the receiver asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events_requested: Option<Vec<String>>,
    /// Event types the transmitter will send (supported ∩ requested).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events_delivered: Vec<String>,
    /// Minimum seconds between two verification requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_verification_interval: Option<u64>,
    /// Seconds of receiver inactivity after which the transmitter may pause
    /// the stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inactivity_timeout: Option<u64>,
    /// A description for humans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Members the SDK does not model, as returned.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl StreamConfiguration {
    /// The RFC 8936 poll URL, for a poll stream.
    pub fn poll_url(&self) -> Option<&str> {
        self.delivery
            .as_ref()
            .filter(|delivery| delivery.is_poll())
            .and_then(|delivery| delivery.endpoint_url.as_deref())
    }
}

fn one_or_many<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Wire {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Wire::deserialize(deserializer)? {
        Wire::One(one) => vec![one],
        Wire::Many(many) => many,
    })
}

/// A stream's status (SSF 1.0 §8.1.2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamStatusInfo {
    /// The stream.
    pub stream_id: String,
    /// `enabled`, `paused` or `disabled`.
    pub status: StreamStatus,
    /// Why, if the transmitter said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The delivery a receiver asks for.
#[derive(Clone, PartialEq, Eq)]
enum DeliveryRequest {
    Push { endpoint_url: String, authorization_header: Option<String> },
    Poll,
}

/// The receiver-supplied members of a create, update (PATCH) or replace
/// (PUT) request.
///
/// ```
/// use caep_receiver::StreamRequest;
/// use caep_schemas::event::event_type;
///
/// let push = StreamRequest::push("https://rp.example.com/caep/events", Some("Bearer s3cr3t".into()))
///     .events([event_type::SESSION_REVOKED])
///     .description("revocations for the payments API");
/// let poll = StreamRequest::poll().all_events();
/// # let _ = (push, poll);
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct StreamRequest {
    delivery: Option<DeliveryRequest>,
    events_requested: Option<Vec<String>>,
    description: Option<String>,
}

impl fmt::Debug for StreamRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let delivery = match &self.delivery {
            Some(DeliveryRequest::Push { endpoint_url, .. }) => format!("push to {endpoint_url}"),
            Some(DeliveryRequest::Poll) => "poll".to_owned(),
            None => "unchanged".to_owned(),
        };
        f.debug_struct("StreamRequest")
            .field("delivery", &delivery)
            .field("events_requested", &self.events_requested)
            .field("description", &self.description)
            .finish()
    }
}

impl StreamRequest {
    /// Push delivery (RFC 8935) to `endpoint_url`; the transmitter sends
    /// `authorization_header` verbatim as `Authorization` with every SET.
    pub fn push(endpoint_url: impl Into<String>, authorization_header: Option<String>) -> Self {
        StreamRequest {
            delivery: Some(DeliveryRequest::Push { endpoint_url: endpoint_url.into(), authorization_header }),
            ..StreamRequest::default()
        }
    }

    /// Poll delivery (RFC 8936); the transmitter chooses the poll URL.
    pub fn poll() -> Self {
        StreamRequest { delivery: Some(DeliveryRequest::Poll), ..StreamRequest::default() }
    }

    /// No delivery member: for an update that leaves delivery unchanged.
    pub fn unchanged() -> Self {
        StreamRequest::default()
    }

    /// Requests these event types.
    pub fn events<I, S>(mut self, events: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.events_requested = Some(events.into_iter().map(Into::into).collect());
        self
    }

    /// Requests every CAEP, RISC and SSF event type the SDK knows.
    pub fn all_events(self) -> Self {
        self.events(event_type::ALL.iter().copied())
    }

    /// Sets the description.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    /// The JSON body, with `stream_id` for an update or replace.
    pub(crate) fn to_body(&self, stream_id: Option<&str>) -> Value {
        let mut body = Map::new();
        if let Some(stream_id) = stream_id {
            body.insert("stream_id".into(), Value::String(stream_id.to_owned()));
        }
        match &self.delivery {
            Some(DeliveryRequest::Push { endpoint_url, authorization_header }) => {
                let mut delivery = Map::new();
                delivery.insert("method".into(), Value::String(PUSH_METHOD.into()));
                delivery.insert("endpoint_url".into(), Value::String(endpoint_url.clone()));
                if let Some(header) = authorization_header {
                    delivery.insert("authorization_header".into(), Value::String(header.clone()));
                }
                body.insert("delivery".into(), Value::Object(delivery));
            }
            Some(DeliveryRequest::Poll) => {
                let mut delivery = Map::new();
                delivery.insert("method".into(), Value::String(POLL_METHOD.into()));
                body.insert("delivery".into(), Value::Object(delivery));
            }
            None => {}
        }
        if let Some(events) = &self.events_requested {
            body.insert("events_requested".into(), Value::from(events.clone()));
        }
        if let Some(description) = &self.description {
            body.insert("description".into(), Value::String(description.clone()));
        }
        Value::Object(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn request_bodies() {
        let push = StreamRequest::push("https://rp/x", Some("Bearer a".into())).events(["e1"]).description("d");
        assert_eq!(
            push.to_body(None),
            json!({"delivery": {"method": PUSH_METHOD, "endpoint_url": "https://rp/x", "authorization_header": "Bearer a"},
                "events_requested": ["e1"], "description": "d"})
        );
        assert!(!format!("{push:?}").contains("Bearer a"), "Debug leaks the push secret");
        assert_eq!(
            StreamRequest::poll().to_body(Some("s")),
            json!({"stream_id": "s", "delivery": {"method": POLL_METHOD}})
        );
        assert_eq!(
            StreamRequest::unchanged().description("x").to_body(Some("s")),
            json!({"stream_id": "s", "description": "x"})
        );
    }

    #[test]
    fn configurations_parse_leniently() {
        let config: StreamConfiguration = serde_json::from_value(json!({
            "stream_id": "s1", "iss": "https://hub", "aud": "https://rp",
            "delivery": {"method": POLL_METHOD, "endpoint_url": "https://hub/ssf/poll/s1"},
            "events_delivered": [], "default_subjects": "ALL"
        }))
        .expect("parses");
        assert_eq!(config.aud, ["https://rp"]);
        assert_eq!(config.poll_url(), Some("https://hub/ssf/poll/s1"));
        assert_eq!(config.extra["default_subjects"], "ALL");
        let many: StreamConfiguration =
            serde_json::from_value(json!({"stream_id": "s2", "aud": ["a", "b"]})).expect("parses");
        assert_eq!(many.aud, ["a", "b"]);
        assert_eq!(many.poll_url(), None);
    }
}
