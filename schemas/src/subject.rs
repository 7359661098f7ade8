//! Subject identifiers: RFC 9493 formats plus the ones SSF 1.0 adds
//! (`jwt_id`, `saml_assertion_id`, `ip-addresses`, `complex`).
//!
//! RFC 9493 §3 forbids members a format does not describe, so known formats
//! are modelled exactly; a format we do not know is kept whole in
//! [`SubjectId::Other`] so it survives a parse → serialize round trip.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// The largest subject identifier, as JSON, that the hub takes from a
/// receiver (add-subject, add-many) and that the receiver SDK reports.
/// Real ones are tens to hundreds of bytes; the bound keeps one call from
/// parking kilobytes per pending touch (they are kept for an hour,
/// thousands per stream).
pub const MAX_SUBJECT_BYTES: usize = 2048;

/// One subject identifier, tagged by its `format` member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubjectId {
    /// `account`: an `acct:` URI (RFC 7565).
    Account { uri: String },
    /// `email`: an email address.
    Email { email: String },
    /// `iss_sub`: an issuer and a subject scoped to it.
    IssSub { iss: String, sub: String },
    /// `opaque`: an identifier meaningful only to the parties.
    Opaque { id: String },
    /// `phone_number`: an E.164 number.
    PhoneNumber { phone_number: String },
    /// `did`: a decentralized identifier URL.
    Did { url: String },
    /// `uri`: any URI.
    Uri { uri: String },
    /// `aliases`: several identifiers of one subject.
    Aliases { identifiers: Vec<SubjectId> },
    /// `jwt_id` (SSF): a JWT by issuer and `jti`.
    JwtId { iss: String, jti: String },
    /// `saml_assertion_id` (SSF): a SAML assertion by issuer and id.
    SamlAssertionId { issuer: String, assertion_id: String },
    /// `ip-addresses` (SSF): one or more IP addresses.
    IpAddresses { ip_addresses: Vec<String> },
    /// `complex` (SSF): a subject made of several facets.
    Complex(Box<ComplexSubject>),
    /// A format this crate does not know; all members kept as received.
    Other { format: String, members: Map<String, Value> },
}

/// The facets of a `complex` subject (SSF 1.0 §3.3). Each member is itself a
/// simple subject identifier; a session is the `session` member.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComplexSubject {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<SubjectId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<SubjectId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SubjectId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application: Option<SubjectId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<SubjectId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_unit: Option<SubjectId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<SubjectId>,
}

impl ComplexSubject {
    /// The members as (name, value) pairs, present or not, in spec order.
    pub fn members(&self) -> [(&'static str, Option<&SubjectId>); 7] {
        [
            ("user", self.user.as_ref()),
            ("device", self.device.as_ref()),
            ("session", self.session.as_ref()),
            ("application", self.application.as_ref()),
            ("tenant", self.tenant.as_ref()),
            ("org_unit", self.org_unit.as_ref()),
            ("group", self.group.as_ref()),
        ]
    }

    /// True when no member is present (such a subject is invalid on the wire).
    pub fn is_empty(&self) -> bool {
        self.members().iter().all(|(_, member)| member.is_none())
    }
}

impl SubjectId {
    /// An `opaque` subject.
    pub fn opaque(id: impl Into<String>) -> Self {
        SubjectId::Opaque { id: id.into() }
    }

    /// An `email` subject.
    pub fn email(email: impl Into<String>) -> Self {
        SubjectId::Email { email: email.into() }
    }

    /// An `iss_sub` subject.
    pub fn iss_sub(iss: impl Into<String>, sub: impl Into<String>) -> Self {
        SubjectId::IssSub { iss: iss.into(), sub: sub.into() }
    }

    /// A `complex` subject naming a session and, when known, its user: the
    /// shape of every session-scoped SET the hub emits.
    pub fn session_of(session: SubjectId, user: Option<SubjectId>) -> Self {
        SubjectId::Complex(Box::new(ComplexSubject { user, session: Some(session), ..ComplexSubject::default() }))
    }

    /// The `format` member.
    pub fn format(&self) -> &str {
        match self {
            SubjectId::Account { .. } => "account",
            SubjectId::Email { .. } => "email",
            SubjectId::IssSub { .. } => "iss_sub",
            SubjectId::Opaque { .. } => "opaque",
            SubjectId::PhoneNumber { .. } => "phone_number",
            SubjectId::Did { .. } => "did",
            SubjectId::Uri { .. } => "uri",
            SubjectId::Aliases { .. } => "aliases",
            SubjectId::JwtId { .. } => "jwt_id",
            SubjectId::SamlAssertionId { .. } => "saml_assertion_id",
            SubjectId::IpAddresses { .. } => "ip-addresses",
            SubjectId::Complex(_) => "complex",
            SubjectId::Other { format, .. } => format,
        }
    }

    /// The complex members, when this is a complex subject.
    pub fn as_complex(&self) -> Option<&ComplexSubject> {
        match self {
            SubjectId::Complex(complex) => Some(complex),
            _ => None,
        }
    }

    /// Whether two subject identifiers denote the same subject.
    ///
    /// Simple formats compare member by member (email addresses ignore ASCII
    /// case, as mailbox domains and, in practice, providers do). `aliases`
    /// matches when any of its identifiers matches. Two complex subjects match
    /// when every member present on *both* sides matches: a member missing on
    /// either side is a wildcard (SSF 1.0 §3.3), but they must share at least
    /// one member so that, say, a device-only subject never matches a
    /// session-only one.
    pub fn matches(&self, other: &SubjectId) -> bool {
        match (self, other) {
            (SubjectId::Aliases { identifiers }, _) => identifiers.iter().any(|id| id.matches(other)),
            (_, SubjectId::Aliases { identifiers }) => identifiers.iter().any(|id| self.matches(id)),
            (SubjectId::Complex(left), SubjectId::Complex(right)) => complex_matches(left, right),
            (SubjectId::Email { email: left }, SubjectId::Email { email: right }) => left.eq_ignore_ascii_case(right),
            _ => self == other,
        }
    }

    /// Parse from a JSON value.
    pub fn from_value(value: Value) -> Result<Self, serde_json::Error> {
        serde_json::from_value(value)
    }

    /// Serialize to a JSON value.
    pub fn to_value(&self) -> Value {
        Value::Object(self.to_map())
    }

    fn to_map(&self) -> Map<String, Value> {
        let mut map = Map::new();
        map.insert("format".into(), Value::String(self.format().to_owned()));
        let mut put = |key: &str, value: &str| {
            map.insert(key.to_owned(), Value::String(value.to_owned()));
        };
        match self {
            SubjectId::Account { uri } | SubjectId::Uri { uri } => put("uri", uri),
            SubjectId::Email { email } => put("email", email),
            SubjectId::IssSub { iss, sub } => {
                put("iss", iss);
                put("sub", sub);
            }
            SubjectId::Opaque { id } => put("id", id),
            SubjectId::PhoneNumber { phone_number } => put("phone_number", phone_number),
            SubjectId::Did { url } => put("url", url),
            SubjectId::JwtId { iss, jti } => {
                put("iss", iss);
                put("jti", jti);
            }
            SubjectId::SamlAssertionId { issuer, assertion_id } => {
                put("issuer", issuer);
                put("assertion_id", assertion_id);
            }
            SubjectId::Aliases { identifiers } => {
                let list = identifiers.iter().map(SubjectId::to_value).collect();
                map.insert("identifiers".into(), Value::Array(list));
            }
            SubjectId::IpAddresses { ip_addresses } => {
                let list = ip_addresses.iter().cloned().map(Value::String).collect();
                map.insert("ip-addresses".into(), Value::Array(list));
            }
            SubjectId::Complex(complex) => {
                for (name, member) in complex.members() {
                    if let Some(member) = member {
                        map.insert(name.to_owned(), member.to_value());
                    }
                }
            }
            SubjectId::Other { members, .. } => {
                for (key, value) in members {
                    map.insert(key.clone(), value.clone());
                }
            }
        }
        map
    }
}

fn complex_matches(left: &ComplexSubject, right: &ComplexSubject) -> bool {
    let mut shared = 0;
    for ((_, l), (_, r)) in left.members().into_iter().zip(right.members()) {
        if let (Some(l), Some(r)) = (l, r) {
            if !l.matches(r) {
                return false;
            }
            shared += 1;
        }
    }
    shared > 0
}

impl Serialize for SubjectId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_map().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for SubjectId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut map = Map::<String, Value>::deserialize(deserializer)?;
        let format = match map.remove("format") {
            Some(Value::String(format)) => format,
            Some(_) => return Err(D::Error::custom("subject identifier `format` must be a string")),
            None => return Err(D::Error::custom("subject identifier has no `format`")),
        };
        parse_known(&format, &mut map)
            .unwrap_or_else(|| Ok(SubjectId::Other { format, members: map }))
            .map_err(D::Error::custom)
    }
}

/// Parses the members of a known format; `None` for an unknown format.
fn parse_known(format: &str, map: &mut Map<String, Value>) -> Option<Result<SubjectId, String>> {
    let subject = match format {
        "account" => take_str(map, format, "uri").map(|uri| SubjectId::Account { uri }),
        "email" => take_str(map, format, "email").map(|email| SubjectId::Email { email }),
        "iss_sub" => take_str(map, format, "iss")
            .and_then(|iss| Ok(SubjectId::IssSub { iss, sub: take_str(map, format, "sub")? })),
        "opaque" => take_str(map, format, "id").map(|id| SubjectId::Opaque { id }),
        "phone_number" => {
            take_str(map, format, "phone_number").map(|phone_number| SubjectId::PhoneNumber { phone_number })
        }
        "did" => take_str(map, format, "url").map(|url| SubjectId::Did { url }),
        "uri" => take_str(map, format, "uri").map(|uri| SubjectId::Uri { uri }),
        "jwt_id" => take_str(map, format, "iss")
            .and_then(|iss| Ok(SubjectId::JwtId { iss, jti: take_str(map, format, "jti")? })),
        "saml_assertion_id" => take_str(map, format, "issuer").and_then(|issuer| {
            Ok(SubjectId::SamlAssertionId { issuer, assertion_id: take_str(map, format, "assertion_id")? })
        }),
        "aliases" => parse_aliases(map),
        "ip-addresses" => parse_ip_addresses(map),
        "complex" => parse_complex(map),
        _ => return None,
    };
    Some(subject)
}

fn take_str(map: &mut Map<String, Value>, format: &str, key: &str) -> Result<String, String> {
    match map.remove(key) {
        Some(Value::String(value)) => Ok(value),
        Some(_) => Err(format!("`{key}` of a `{format}` subject must be a string")),
        None => Err(format!("a `{format}` subject needs `{key}`")),
    }
}

fn parse_aliases(map: &mut Map<String, Value>) -> Result<SubjectId, String> {
    let Some(Value::Array(items)) = map.remove("identifiers") else {
        return Err("an `aliases` subject needs an `identifiers` array".into());
    };
    let identifiers = items
        .into_iter()
        .map(SubjectId::from_value)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("in `aliases`: {error}"))?;
    if identifiers.iter().any(|id| matches!(id, SubjectId::Aliases { .. })) {
        return Err("`aliases` must not nest another `aliases`".into());
    }
    Ok(SubjectId::Aliases { identifiers })
}

fn parse_ip_addresses(map: &mut Map<String, Value>) -> Result<SubjectId, String> {
    let Some(Value::Array(items)) = map.remove("ip-addresses") else {
        return Err("an `ip-addresses` subject needs an `ip-addresses` array".into());
    };
    let ip_addresses = items
        .into_iter()
        .map(|item| match item {
            Value::String(address) => Ok(address),
            _ => Err("`ip-addresses` must hold strings".to_owned()),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(SubjectId::IpAddresses { ip_addresses })
}

fn parse_complex(map: &mut Map<String, Value>) -> Result<SubjectId, String> {
    let complex: ComplexSubject = serde_json::from_value(Value::Object(std::mem::take(map)))
        .map_err(|error| format!("in `complex` subject: {error}"))?;
    if complex.is_empty() {
        return Err("a `complex` subject needs at least one member".into());
    }
    Ok(SubjectId::Complex(Box::new(complex)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(value: Value) -> SubjectId {
        SubjectId::from_value(value).expect("valid subject")
    }

    #[test]
    fn every_format_round_trips() {
        let samples = [
            json!({"format": "account", "uri": "acct:alice@example.com"}),
            json!({"format": "email", "email": "alice@example.com"}),
            json!({"format": "iss_sub", "iss": "https://idp.example.com/", "sub": "145234573"}),
            json!({"format": "opaque", "id": "11112222333344445555"}),
            json!({"format": "phone_number", "phone_number": "+12065550100"}),
            json!({"format": "did", "url": "did:example:123456"}),
            json!({"format": "uri", "uri": "https://example.com/users/1"}),
            json!({"format": "aliases", "identifiers": [
                {"format": "email", "email": "alice@example.com"},
                {"format": "opaque", "id": "a1"}]}),
            json!({"format": "jwt_id", "iss": "https://idp.example.com/", "jti": "B70BA622"}),
            json!({"format": "saml_assertion_id", "issuer": "https://idp.example.com/", "assertion_id": "_8e8dc5f"}),
            json!({"format": "ip-addresses", "ip-addresses": ["10.29.37.75", "2001:db8::1"]}),
            json!({"format": "complex",
                "user": {"format": "iss_sub", "iss": "https://idp.example.com/", "sub": "u1"},
                "device": {"format": "opaque", "id": "d1"},
                "session": {"format": "opaque", "id": "s1"},
                "application": {"format": "opaque", "id": "app"},
                "tenant": {"format": "opaque", "id": "t"},
                "org_unit": {"format": "opaque", "id": "ou"},
                "group": {"format": "opaque", "id": "g"}}),
            json!({"format": "x-future", "anything": {"nested": [1, 2]}}),
        ];
        for sample in samples {
            let subject = parse(sample.clone());
            assert_eq!(subject.to_value(), sample);
            assert_eq!(serde_json::to_value(&subject).expect("serialize"), sample);
        }
    }

    #[test]
    fn missing_or_mistyped_members_are_errors() {
        let broken = [
            json!({"email": "alice@example.com"}),
            json!({"format": 7, "id": "x"}),
            json!({"format": "iss_sub", "iss": "https://idp.example.com/"}),
            json!({"format": "opaque", "id": 12}),
            json!({"format": "complex"}),
            json!({"format": "complex", "session": {"format": "opaque"}}),
            json!({"format": "aliases", "identifiers": [{"format": "aliases", "identifiers": []}]}),
            json!({"format": "ip-addresses", "ip-addresses": [1]}),
            json!("opaque"),
        ];
        for sample in broken {
            assert!(SubjectId::from_value(sample.clone()).is_err(), "accepted {sample}");
        }
    }

    #[test]
    fn complex_members_missing_on_either_side_are_wildcards() {
        let session_only = SubjectId::session_of(SubjectId::opaque("s1"), None);
        let session_and_user = SubjectId::session_of(SubjectId::opaque("s1"), Some(SubjectId::email("a@example.com")));
        let other_session = SubjectId::session_of(SubjectId::opaque("s2"), Some(SubjectId::email("a@example.com")));
        let user_only = parse(json!({"format": "complex", "user": {"format": "email", "email": "A@Example.com"}}));
        let device_only = parse(json!({"format": "complex", "device": {"format": "opaque", "id": "d"}}));

        assert!(session_only.matches(&session_and_user));
        assert!(session_and_user.matches(&session_only));
        assert!(user_only.matches(&session_and_user));
        assert!(user_only.matches(&other_session));
        assert!(!session_only.matches(&other_session));
        assert!(!device_only.matches(&session_only), "no shared member, no match");
    }

    #[test]
    fn aliases_match_any_identifier() {
        let aliases = parse(json!({"format": "aliases", "identifiers": [
            {"format": "email", "email": "alice@example.com"},
            {"format": "opaque", "id": "a1"}]}));
        assert!(aliases.matches(&SubjectId::opaque("a1")));
        assert!(SubjectId::email("ALICE@example.com").matches(&aliases));
        assert!(!aliases.matches(&SubjectId::opaque("a2")));
    }
}
