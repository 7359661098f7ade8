//! Transmitter configuration metadata (SSF 1.0 §7.1) and where each
//! endpoint lives under the issuer.

pub use caep_schemas::ssf::{AuthorizationScheme, DefaultSubjects, POLL_METHOD, PUSH_METHOD, TransmitterMetadata};

/// OAuth 2.0 (RFC 6749) bearer tokens, the authorization scheme the hub uses.
pub const OAUTH_SPEC_URN: &str = "urn:ietf:rfc:6749";

/// Paths of the transmitter's endpoints, relative to the issuer URL. One
/// table so that routing and the advertised metadata cannot drift apart.
pub mod paths {
    /// The well-known metadata document (RFC 8615); the issuer's own path,
    /// if any, is appended after it.
    pub const WELL_KNOWN: &str = "/.well-known/ssf-configuration";
    pub const JWKS: &str = "/ssf/jwks.json";
    pub const STREAMS: &str = "/ssf/streams";
    pub const STATUS: &str = "/ssf/status";
    pub const ADD_SUBJECT: &str = "/ssf/subjects/add";
    /// Extension: many subjects added in one call (see [`super::ADD_SUBJECTS_MEMBER`]).
    pub const ADD_SUBJECTS: &str = "/ssf/subjects/add-many";
    pub const REMOVE_SUBJECT: &str = "/ssf/subjects/remove";
    pub const VERIFY: &str = "/ssf/verify";
    /// Per-stream RFC 8936 poll endpoint; `{stream_id}` is URL-safe by construction.
    pub const POLL: &str = "/ssf/poll/{stream_id}";
}

/// The metadata member advertising the batch form of add-subject, an
/// extension of this transmitter (SSF 1.0 §7.1 lets metadata carry more
/// members): `POST {"stream_id", "subjects": [subject, ...]}`, at most
/// [`crate::streams::MAX_SUBJECTS_PER_CALL`] subjects, each as add-subject
/// would take it. Relying parties that see many new agent sessions report
/// them with one request per batch.
pub const ADD_SUBJECTS_MEMBER: &str = "add_subjects_endpoint";

/// The hub's metadata for `issuer` (no trailing slash expected; one is
/// tolerated). Every endpoint is an absolute URL under the issuer.
pub fn for_issuer(issuer: &str) -> TransmitterMetadata {
    let base = issuer.trim_end_matches('/');
    let url = |path: &str| format!("{base}{path}");
    TransmitterMetadata {
        spec_version: "1_0".into(),
        issuer: issuer.to_owned(),
        jwks_uri: url(paths::JWKS),
        delivery_methods_supported: vec![PUSH_METHOD.into(), POLL_METHOD.into()],
        configuration_endpoint: Some(url(paths::STREAMS)),
        status_endpoint: Some(url(paths::STATUS)),
        add_subject_endpoint: Some(url(paths::ADD_SUBJECT)),
        remove_subject_endpoint: Some(url(paths::REMOVE_SUBJECT)),
        verification_endpoint: Some(url(paths::VERIFY)),
        critical_subject_members: Vec::new(),
        authorization_schemes: vec![AuthorizationScheme { spec_urn: OAUTH_SPEC_URN.into() }],
        default_subjects: Some(DefaultSubjects::None),
        extra: serde_json::Map::from_iter([(ADD_SUBJECTS_MEMBER.to_owned(), url(paths::ADD_SUBJECTS).into())]),
    }
}

/// Where the metadata document of `issuer` is served, as a path: the
/// well-known path with the issuer's own path appended (SSF 1.0 §7.2.1).
pub fn well_known_path(issuer_path: &str) -> String {
    let issuer_path = issuer_path.trim_end_matches('/');
    format!("{}{issuer_path}", paths::WELL_KNOWN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_absolute_under_the_issuer() {
        let metadata = for_issuer("https://hub.example.com/tenant-a");
        assert_eq!(metadata.jwks_uri, "https://hub.example.com/tenant-a/ssf/jwks.json");
        assert_eq!(metadata.configuration_endpoint.as_deref(), Some("https://hub.example.com/tenant-a/ssf/streams"));
        let json = serde_json::to_value(&metadata).expect("serializes");
        assert!(json.get("critical_subject_members").is_none(), "empty arrays are omitted");
        assert_eq!(json["authorization_schemes"][0]["spec_urn"], OAUTH_SPEC_URN);
        assert_eq!(json["default_subjects"], "NONE");
        assert_eq!(json[ADD_SUBJECTS_MEMBER], "https://hub.example.com/tenant-a/ssf/subjects/add-many");
    }

    #[test]
    fn well_known_path_appends_the_issuer_path() {
        assert_eq!(well_known_path(""), "/.well-known/ssf-configuration");
        assert_eq!(well_known_path("/"), "/.well-known/ssf-configuration");
        assert_eq!(well_known_path("/tenant-a"), "/.well-known/ssf-configuration/tenant-a");
    }
}
