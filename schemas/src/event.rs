//! Typed payloads of every CAEP 1.0, RISC 1.0 and SSF 1.0 event.
//!
//! Each payload keeps the members it does not know in `extra`, and an event
//! type it does not know becomes [`Event::Unknown`], so a parse → serialize
//! round trip loses nothing (SSF 1.0: receivers ignore unknown members, and
//! a hub that forwards events must not silently drop them).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::subject::SubjectId;

/// Event-type URIs.
pub mod event_type {
    const CAEP: &str = "https://schemas.openid.net/secevent/caep/event-type/";

    macro_rules! uris {
        ($($name:ident = $prefix:literal $suffix:literal;)*) => {
            $(#[doc = concat!("`", $prefix, $suffix, "`")]
            pub const $name: &str = concat!($prefix, $suffix);)*
            /// Every event type this crate models, in spec order.
            pub const ALL: &[&str] = &[$($name),*];
        };
    }

    uris! {
        SESSION_REVOKED = "https://schemas.openid.net/secevent/caep/event-type/" "session-revoked";
        TOKEN_CLAIMS_CHANGE = "https://schemas.openid.net/secevent/caep/event-type/" "token-claims-change";
        CREDENTIAL_CHANGE = "https://schemas.openid.net/secevent/caep/event-type/" "credential-change";
        ASSURANCE_LEVEL_CHANGE = "https://schemas.openid.net/secevent/caep/event-type/" "assurance-level-change";
        DEVICE_COMPLIANCE_CHANGE = "https://schemas.openid.net/secevent/caep/event-type/" "device-compliance-change";
        SESSION_ESTABLISHED = "https://schemas.openid.net/secevent/caep/event-type/" "session-established";
        SESSION_PRESENTED = "https://schemas.openid.net/secevent/caep/event-type/" "session-presented";
        RISK_LEVEL_CHANGE = "https://schemas.openid.net/secevent/caep/event-type/" "risk-level-change";
        ACCOUNT_CREDENTIAL_CHANGE_REQUIRED = "https://schemas.openid.net/secevent/risc/event-type/" "account-credential-change-required";
        ACCOUNT_PURGED = "https://schemas.openid.net/secevent/risc/event-type/" "account-purged";
        ACCOUNT_DISABLED = "https://schemas.openid.net/secevent/risc/event-type/" "account-disabled";
        ACCOUNT_ENABLED = "https://schemas.openid.net/secevent/risc/event-type/" "account-enabled";
        IDENTIFIER_CHANGED = "https://schemas.openid.net/secevent/risc/event-type/" "identifier-changed";
        IDENTIFIER_RECYCLED = "https://schemas.openid.net/secevent/risc/event-type/" "identifier-recycled";
        CREDENTIAL_COMPROMISE = "https://schemas.openid.net/secevent/risc/event-type/" "credential-compromise";
        OPT_IN = "https://schemas.openid.net/secevent/risc/event-type/" "opt-in";
        OPT_OUT_INITIATED = "https://schemas.openid.net/secevent/risc/event-type/" "opt-out-initiated";
        OPT_OUT_CANCELLED = "https://schemas.openid.net/secevent/risc/event-type/" "opt-out-cancelled";
        OPT_OUT_EFFECTIVE = "https://schemas.openid.net/secevent/risc/event-type/" "opt-out-effective";
        RECOVERY_ACTIVATED = "https://schemas.openid.net/secevent/risc/event-type/" "recovery-activated";
        RECOVERY_INFORMATION_CHANGED = "https://schemas.openid.net/secevent/risc/event-type/" "recovery-information-changed";
        VERIFICATION = "https://schemas.openid.net/secevent/ssf/event-type/" "verification";
        STREAM_UPDATED = "https://schemas.openid.net/secevent/ssf/event-type/" "stream-updated";
    }

    /// True for the CAEP event types.
    pub fn is_caep(uri: &str) -> bool {
        uri.starts_with(CAEP)
    }
}

/// Human-readable text keyed by language tag (`{"en": "...", "de": "..."}`).
pub type LocalizedText = BTreeMap<String, String>;

/// Who or what started the action an event reports (CAEP 1.0 §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InitiatingEntity {
    Admin,
    User,
    Policy,
    System,
}

/// Members every CAEP event may carry (CAEP 1.0 §2).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CaepCommon {
    /// When the event happened at the transmitter (NumericDate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_timestamp: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initiating_entity: Option<InitiatingEntity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_admin: Option<LocalizedText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_user: Option<LocalizedText>,
}

macro_rules! caep_payload {
    ($(#[$doc:meta])* $name:ident { $($(#[$fdoc:meta])* $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
        pub struct $name {
            $($(#[$fdoc])* pub $field: $ty,)*
            #[serde(flatten)]
            pub common: CaepCommon,
            /// Members this crate does not model, kept as received.
            #[serde(flatten)]
            pub extra: Map<String, Value>,
        }
    };
}

caep_payload!(
    /// `session-revoked`: the session is no longer valid.
    SessionRevoked {}
);

caep_payload!(
    /// `token-claims-change`: claims in a token changed.
    TokenClaimsChange {
        /// The changed claims and their new values.
        claims: Map<String, Value>,
    }
);

/// `change_type` of a credential change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CredentialChangeType {
    #[default]
    Create,
    Revoke,
    Update,
    Delete,
}

caep_payload!(
    /// `credential-change`: a credential was created, changed, revoked or deleted.
    CredentialChange {
        /// password, pin, x509, fido2-platform, fido2-roaming, fido-u2f,
        /// verifiable-credential, phone-voice, phone-sms, app, or another.
        credential_type: String,
        change_type: CredentialChangeType,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        friendly_name: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        x509_issuer: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        x509_serial: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fido2_aaguid: Option<String>,
    }
);

/// Direction of an assurance-level change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeDirection {
    Increase,
    Decrease,
}

caep_payload!(
    /// `assurance-level-change`: the authentication assurance level changed.
    AssuranceLevelChange {
        /// RFC8176, RFC6711, ISO-IEC-29115, NIST-IAL, NIST-AAL, NIST-FAL, Custom.
        namespace: String,
        current_level: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        previous_level: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        change_direction: Option<ChangeDirection>,
    }
);

/// A device's compliance status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ComplianceStatus {
    #[default]
    Compliant,
    NotCompliant,
}

caep_payload!(
    /// `device-compliance-change`: a device became (non-)compliant.
    DeviceComplianceChange {
        previous_status: ComplianceStatus,
        current_status: ComplianceStatus,
    }
);

/// How an agent session acts (hub extension member `authority`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Authority {
    /// Acts for a person.
    Delegated,
    /// Acts for a workflow within fixed bounds.
    Bounded,
    /// Acts on its own.
    Autonomous,
}

caep_payload!(
    /// `session-established`: a session started. The hub reads three
    /// extension members: `parent_session` (this is a sub-agent session of
    /// that one), `authority`, and `expires_at` (when the session ends).
    SessionEstablished {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fp_ua: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        acr: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        amr: Option<Vec<String>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ext_id: Option<String>,
        /// Extension: the session that spawned this one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parent_session: Option<SubjectId>,
        /// Extension: how the agent holding this session acts.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        authority: Option<Authority>,
        /// Extension: when the session ends at the latest (NumericDate);
        /// the hub forgets it then, unless it is revoked first.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<i64>,
    }
);

caep_payload!(
    /// `session-presented`: the session was seen. The hub reads the extension
    /// member `audience`: the relying party the session was presented to.
    SessionPresented {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fp_ua: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ext_id: Option<String>,
        /// Extension: the audience of the RP the session reached.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        audience: Option<String>,
    }
);

/// A risk level.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum RiskLevel {
    #[default]
    Low,
    Medium,
    High,
}

caep_payload!(
    /// `risk-level-change`: the assessed risk of a subject changed.
    RiskLevelChange {
        /// USER, DEVICE, SESSION, TENANT, ORG_UNIT, GROUP or another entity.
        principal: String,
        current_level: RiskLevel,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        previous_level: Option<RiskLevel>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        risk_reason: Option<String>,
    }
);

/// An event type with no members of its own (most RISC events).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PlainEvent {
    /// Members this crate does not model, kept as received.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// RISC `account-disabled`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AccountDisabled {
    /// `hijacking`, `bulk-account`, or another reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// RISC `identifier-changed`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IdentifierChanged {
    /// The new value of the identifier.
    #[serde(rename = "new-value", default, skip_serializing_if = "Option::is_none")]
    pub new_value: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// RISC `credential-compromise`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CredentialCompromise {
    /// The type of the compromised credential.
    pub credential_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_timestamp: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_admin: Option<LocalizedText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_user: Option<LocalizedText>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// SSF `verification`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Verification {
    /// Echo of the `state` the receiver sent in its verification request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A stream's status (SSF 1.0 §8.1.2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamStatus {
    /// Events are delivered.
    #[default]
    Enabled,
    /// Events are held and delivered on resume.
    Paused,
    /// Events are dropped.
    Disabled,
}

/// SSF `stream-updated`: the transmitter changed a stream's status.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamUpdated {
    pub status: StreamStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

macro_rules! events {
    ($($variant:ident($payload:ty) = $uri:path,)*) => {
        /// One event of a SET, typed by its event-type URI.
        #[derive(Clone, Debug, PartialEq)]
        pub enum Event {
            $(#[doc = concat!("`", stringify!($uri), "`")] $variant($payload),)*
            /// An event type this crate does not model, kept as received.
            Unknown { event_type: String, payload: Map<String, Value> },
        }

        impl Event {
            /// The event-type URI (the key of the SET's `events` claim).
            pub fn type_uri(&self) -> &str {
                match self {
                    $(Event::$variant(_) => $uri,)*
                    Event::Unknown { event_type, .. } => event_type,
                }
            }

            /// Parses the payload of the event `type_uri`. Unknown types are kept
            /// whole; a known type with missing or mistyped members is an error.
            pub fn from_parts(type_uri: &str, payload: Value) -> Result<Self, EventError> {
                let invalid = |source| EventError::InvalidPayload { event_type: type_uri.to_owned(), source };
                Ok(match type_uri {
                    $($uri => Event::$variant(serde_json::from_value(payload).map_err(invalid)?),)*
                    _ => match payload {
                        Value::Object(payload) => Event::Unknown { event_type: type_uri.to_owned(), payload },
                        _ => return Err(EventError::NotAnObject { event_type: type_uri.to_owned() }),
                    },
                })
            }

            /// The payload as JSON (the value under the event-type URI).
            pub fn payload(&self) -> Value {
                let serialized = match self {
                    $(Event::$variant(payload) => serde_json::to_value(payload),)*
                    Event::Unknown { payload, .. } => return Value::Object(payload.clone()),
                };
                // Every payload is a struct of strings, numbers, enums and maps
                // with string keys, which serde_json always serializes.
                serialized.unwrap_or_else(|_| Value::Object(Map::new()))
            }
        }
    };
}

events! {
    SessionRevoked(SessionRevoked) = event_type::SESSION_REVOKED,
    TokenClaimsChange(TokenClaimsChange) = event_type::TOKEN_CLAIMS_CHANGE,
    CredentialChange(CredentialChange) = event_type::CREDENTIAL_CHANGE,
    AssuranceLevelChange(AssuranceLevelChange) = event_type::ASSURANCE_LEVEL_CHANGE,
    DeviceComplianceChange(DeviceComplianceChange) = event_type::DEVICE_COMPLIANCE_CHANGE,
    SessionEstablished(SessionEstablished) = event_type::SESSION_ESTABLISHED,
    SessionPresented(SessionPresented) = event_type::SESSION_PRESENTED,
    RiskLevelChange(RiskLevelChange) = event_type::RISK_LEVEL_CHANGE,
    AccountCredentialChangeRequired(PlainEvent) = event_type::ACCOUNT_CREDENTIAL_CHANGE_REQUIRED,
    AccountPurged(PlainEvent) = event_type::ACCOUNT_PURGED,
    AccountDisabled(AccountDisabled) = event_type::ACCOUNT_DISABLED,
    AccountEnabled(PlainEvent) = event_type::ACCOUNT_ENABLED,
    IdentifierChanged(IdentifierChanged) = event_type::IDENTIFIER_CHANGED,
    IdentifierRecycled(PlainEvent) = event_type::IDENTIFIER_RECYCLED,
    CredentialCompromise(CredentialCompromise) = event_type::CREDENTIAL_COMPROMISE,
    OptIn(PlainEvent) = event_type::OPT_IN,
    OptOutInitiated(PlainEvent) = event_type::OPT_OUT_INITIATED,
    OptOutCancelled(PlainEvent) = event_type::OPT_OUT_CANCELLED,
    OptOutEffective(PlainEvent) = event_type::OPT_OUT_EFFECTIVE,
    RecoveryActivated(PlainEvent) = event_type::RECOVERY_ACTIVATED,
    RecoveryInformationChanged(PlainEvent) = event_type::RECOVERY_INFORMATION_CHANGED,
    Verification(Verification) = event_type::VERIFICATION,
    StreamUpdated(StreamUpdated) = event_type::STREAM_UPDATED,
}

impl Event {
    /// The CAEP common members, for CAEP events.
    pub fn caep_common(&self) -> Option<&CaepCommon> {
        match self {
            Event::SessionRevoked(e) => Some(&e.common),
            Event::TokenClaimsChange(e) => Some(&e.common),
            Event::CredentialChange(e) => Some(&e.common),
            Event::AssuranceLevelChange(e) => Some(&e.common),
            Event::DeviceComplianceChange(e) => Some(&e.common),
            Event::SessionEstablished(e) => Some(&e.common),
            Event::SessionPresented(e) => Some(&e.common),
            Event::RiskLevelChange(e) => Some(&e.common),
            _ => None,
        }
    }

    /// When the event happened at its origin, if the payload says so.
    pub fn event_timestamp(&self) -> Option<i64> {
        match self {
            Event::CredentialCompromise(e) => e.event_timestamp,
            Event::Unknown { payload, .. } => payload.get("event_timestamp").and_then(Value::as_i64),
            other => other.caep_common().and_then(|common| common.event_timestamp),
        }
    }
}

/// Why an event payload could not be parsed.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// A known event type whose members are missing or of the wrong type.
    #[error("invalid `{event_type}` event: {source}")]
    InvalidPayload {
        event_type: String,
        #[source]
        source: serde_json::Error,
    },
    /// The value under an event-type URI is not a JSON object.
    #[error("the `{event_type}` event is not a JSON object")]
    NotAnObject { event_type: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_known_type_parses_to_its_variant_and_back() {
        let minimal = |uri: &str| match uri {
            event_type::TOKEN_CLAIMS_CHANGE => json!({"claims": {"role": "ro-admin"}}),
            event_type::CREDENTIAL_CHANGE => json!({"credential_type": "fido2-roaming", "change_type": "create"}),
            event_type::ASSURANCE_LEVEL_CHANGE => json!({"namespace": "NIST-AAL", "current_level": "nist-aal2"}),
            event_type::DEVICE_COMPLIANCE_CHANGE => {
                json!({"previous_status": "compliant", "current_status": "not-compliant"})
            }
            event_type::RISK_LEVEL_CHANGE => json!({"principal": "USER", "current_level": "HIGH"}),
            event_type::CREDENTIAL_COMPROMISE => json!({"credential_type": "password"}),
            event_type::STREAM_UPDATED => json!({"status": "paused", "reason": "maintenance"}),
            _ => json!({}),
        };
        for uri in event_type::ALL {
            let payload = minimal(uri);
            let event = Event::from_parts(uri, payload.clone()).expect("parses");
            assert_eq!(event.type_uri(), *uri);
            assert!(!matches!(event, Event::Unknown { .. }), "{uri} fell through to Unknown");
            assert_eq!(event.payload(), payload, "{uri}");
        }
    }

    #[test]
    fn unknown_members_and_types_survive() {
        let payload = json!({
            "initiating_entity": "policy",
            "reason_admin": {"en": "Landspeed Policy Violation: C076E82F"},
            "event_timestamp": 1615304991,
            "x_vendor": {"deep": [1, 2, 3]}
        });
        let event = Event::from_parts(event_type::SESSION_REVOKED, payload.clone()).expect("parses");
        let Event::SessionRevoked(revoked) = &event else { panic!("wrong variant") };
        assert_eq!(revoked.common.initiating_entity, Some(InitiatingEntity::Policy));
        assert_eq!(revoked.extra.get("x_vendor"), Some(&json!({"deep": [1, 2, 3]})));
        assert_eq!(event.payload(), payload);

        let unknown = json!({"anything": true});
        let event = Event::from_parts("https://example.com/event/x", unknown.clone()).expect("parses");
        assert!(matches!(event, Event::Unknown { .. }));
        assert_eq!(event.payload(), unknown);
    }

    #[test]
    fn enumerations_are_enforced() {
        let bad = [
            (event_type::CREDENTIAL_CHANGE, json!({"credential_type": "password", "change_type": "rotate"})),
            (event_type::CREDENTIAL_CHANGE, json!({"change_type": "create"})),
            (event_type::DEVICE_COMPLIANCE_CHANGE, json!({"previous_status": "compliant"})),
            (event_type::RISK_LEVEL_CHANGE, json!({"principal": "USER", "current_level": "low"})),
            (event_type::SESSION_REVOKED, json!({"initiating_entity": "robot"})),
            (event_type::STREAM_UPDATED, json!({"status": "sleeping"})),
            (event_type::SESSION_REVOKED, json!("not an object")),
            ("https://example.com/unknown", json!([1])),
        ];
        for (uri, payload) in bad {
            assert!(Event::from_parts(uri, payload.clone()).is_err(), "{uri} accepted {payload}");
        }
    }

    #[test]
    fn session_established_reads_delegation_extensions() {
        let payload = json!({
            "parent_session": {"format": "opaque", "id": "S1"},
            "authority": "delegated",
            "expires_at": 1_900_000_000,
            "amr": ["otp"]
        });
        let event = Event::from_parts(event_type::SESSION_ESTABLISHED, payload.clone()).expect("parses");
        let Event::SessionEstablished(established) = &event else { panic!("wrong variant") };
        assert_eq!(established.parent_session, Some(SubjectId::opaque("S1")));
        assert_eq!(established.authority, Some(Authority::Delegated));
        assert_eq!(established.expires_at, Some(1_900_000_000));
        assert_eq!(event.payload(), payload);
    }
}
