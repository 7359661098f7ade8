//! SSF 1.0 wire documents shared by transmitters and receivers: the
//! transmitter configuration metadata (§7.1) and the delivery-method URNs.
//! Parsing is lenient (unknown members kept in `extra`); emitting omits
//! empty arrays and absent values, as §7.1 asks.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// RFC 8935 push delivery method URN.
pub const PUSH_METHOD: &str = "urn:ietf:rfc:8935";
/// RFC 8936 poll delivery method URN.
pub const POLL_METHOD: &str = "urn:ietf:rfc:8936";

/// `authorization_schemes` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorizationScheme {
    pub spec_urn: String,
}

/// `default_subjects`: whether a new stream gets every subject or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum DefaultSubjects {
    All,
    None,
}

/// The transmitter configuration metadata document. Empty arrays and absent
/// values are omitted, as SSF 1.0 §7.1 asks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransmitterMetadata {
    /// `1_0` for SSF 1.0 (absent in older transmitters' documents).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub spec_version: String,
    /// Every SET's `iss`.
    pub issuer: String,
    pub jwks_uri: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delivery_methods_supported: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configuration_endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add_subject_endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove_subject_endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub critical_subject_members: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authorization_schemes: Vec<AuthorizationScheme>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_subjects: Option<DefaultSubjects>,
    /// Members this crate does not model, kept as received.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_leniently_and_keeps_unknown_members() {
        let document = json!({"issuer": "https://t", "jwks_uri": "https://t/jwks", "x_vendor": 1,
                              "default_subjects": "ALL"});
        let metadata: TransmitterMetadata = serde_json::from_value(document.clone()).expect("parses");
        assert_eq!(metadata.default_subjects, Some(DefaultSubjects::All));
        assert_eq!(metadata.extra["x_vendor"], 1);
        assert_eq!(serde_json::to_value(&metadata).expect("serializes"), document);
    }
}
