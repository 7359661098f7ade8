//! The JSON Schemas (draft 2020-12) of everything the hub exchanges, embedded
//! in the binary.
//!
//! There is one schema per event type, whose `$id` is the event-type URI
//! itself (CAEP 1.0, RISC 1.0 and the two SSF 1.0 stream events), and one
//! schema each for the SET claim set, subject identifiers, stream
//! configurations and transmitter metadata, whose `$id`s live under
//! `https://caep-hub.dev/schemas/`. The CAEP event schemas share the
//! optional CAEP claims through [`CAEP_COMMON_SCHEMA_ID`].
//!
//! Schemas refer to each other by `$id` (for example the SET schema's
//! `sub_id` refers to [`SUBJECT_SCHEMA_ID`]), never by file path and never
//! over the network: a validator needs every schema of [`all`] registered
//! as a resource under its [`EmbeddedSchema::id`].
//!
//! The files live in `schemas/json/`; the spec examples they are tested
//! against live in `schemas/examples/`.

/// One embedded JSON Schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmbeddedSchema {
    /// The schema's `$id`: the event-type URI for an event schema, otherwise
    /// a `https://caep-hub.dev/schemas/...` URI.
    pub id: &'static str,
    /// Where the file lives, relative to the `caep-schemas` crate root
    /// (for example `json/caep/session-revoked.json`).
    pub path: &'static str,
    /// The schema document, as JSON text.
    pub text: &'static str,
}

impl EmbeddedSchema {
    /// Whether this schema describes the payload of one event type (its `id`
    /// is an event-type URI under `https://schemas.openid.net/secevent/`).
    pub fn is_event_type(&self) -> bool {
        self.id.starts_with(EVENT_TYPE_PREFIX)
    }
}

/// `$id` of the SET claim-set schema (RFC 8417 with the SSF 1.0 profile).
pub const SET_SCHEMA_ID: &str = "https://caep-hub.dev/schemas/set.json";

/// `$id` of the subject identifier schema (RFC 9493 plus the SSF 1.0 formats).
pub const SUBJECT_SCHEMA_ID: &str = "https://caep-hub.dev/schemas/subject-identifier.json";

/// `$id` of the stream configuration schema (SSF 1.0 section 8.1.1).
pub const STREAM_CONFIGURATION_SCHEMA_ID: &str = "https://caep-hub.dev/schemas/stream-configuration.json";

/// `$id` of the transmitter configuration metadata schema (SSF 1.0 section 7.1).
pub const TRANSMITTER_METADATA_SCHEMA_ID: &str = "https://caep-hub.dev/schemas/transmitter-metadata.json";

/// `$id` of the schema of the optional claims every CAEP event may carry
/// (`event_timestamp`, `initiating_entity`, `reason_admin`, `reason_user`),
/// which each CAEP event schema references.
pub const CAEP_COMMON_SCHEMA_ID: &str = "https://caep-hub.dev/schemas/caep/common.json";

/// The common prefix of every CAEP, RISC and SSF event-type URI.
const EVENT_TYPE_PREFIX: &str = "https://schemas.openid.net/secevent/";

/// An event schema: `$id` is the event-type URI, the file is
/// `json/<spec>/<name>.json`.
macro_rules! event_schema {
    ($spec:literal, $name:literal) => {
        EmbeddedSchema {
            id: concat!("https://schemas.openid.net/secevent/", $spec, "/event-type/", $name),
            path: concat!("json/", $spec, "/", $name, ".json"),
            text: include_str!(concat!("../json/", $spec, "/", $name, ".json")),
        }
    };
}

/// A non-event schema with the given `$id`, in `json/<file>`.
macro_rules! other_schema {
    ($id:expr, $file:literal) => {
        EmbeddedSchema { id: $id, path: concat!("json/", $file), text: include_str!(concat!("../json/", $file)) }
    };
}

static SCHEMAS: &[EmbeddedSchema] = &[
    other_schema!(SET_SCHEMA_ID, "set.json"),
    other_schema!(SUBJECT_SCHEMA_ID, "subject-identifier.json"),
    other_schema!(STREAM_CONFIGURATION_SCHEMA_ID, "stream-configuration.json"),
    other_schema!(TRANSMITTER_METADATA_SCHEMA_ID, "transmitter-metadata.json"),
    other_schema!(CAEP_COMMON_SCHEMA_ID, "caep/common.json"),
    // CAEP 1.0
    event_schema!("caep", "session-revoked"),
    event_schema!("caep", "token-claims-change"),
    event_schema!("caep", "credential-change"),
    event_schema!("caep", "assurance-level-change"),
    event_schema!("caep", "device-compliance-change"),
    event_schema!("caep", "session-established"),
    event_schema!("caep", "session-presented"),
    event_schema!("caep", "risk-level-change"),
    // RISC 1.0
    event_schema!("risc", "account-credential-change-required"),
    event_schema!("risc", "account-purged"),
    event_schema!("risc", "account-disabled"),
    event_schema!("risc", "account-enabled"),
    event_schema!("risc", "identifier-changed"),
    event_schema!("risc", "identifier-recycled"),
    event_schema!("risc", "credential-compromise"),
    event_schema!("risc", "opt-in"),
    event_schema!("risc", "opt-out-initiated"),
    event_schema!("risc", "opt-out-cancelled"),
    event_schema!("risc", "opt-out-effective"),
    event_schema!("risc", "recovery-activated"),
    event_schema!("risc", "recovery-information-changed"),
    // SSF 1.0
    event_schema!("ssf", "verification"),
    event_schema!("ssf", "stream-updated"),
];

/// Every embedded schema: the five shared schemas first, then one per event
/// type (CAEP, RISC, SSF).
pub fn all() -> &'static [EmbeddedSchema] {
    SCHEMAS
}

/// The schema whose `$id` is `id`: an event-type URI such as
/// `https://schemas.openid.net/secevent/caep/event-type/session-revoked`, or
/// one of the `*_SCHEMA_ID` constants. An empty fragment (`...#`) is ignored.
pub fn by_id(id: &str) -> Option<&'static EmbeddedSchema> {
    let id = id.strip_suffix('#').unwrap_or(id);
    SCHEMAS.iter().find(|schema| schema.id == id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::collections::HashSet;

    const CAEP: [&str; 8] = [
        "session-revoked",
        "token-claims-change",
        "credential-change",
        "assurance-level-change",
        "device-compliance-change",
        "session-established",
        "session-presented",
        "risk-level-change",
    ];
    const RISC: [&str; 13] = [
        "account-credential-change-required",
        "account-purged",
        "account-disabled",
        "account-enabled",
        "identifier-changed",
        "identifier-recycled",
        "credential-compromise",
        "opt-in",
        "opt-out-initiated",
        "opt-out-cancelled",
        "opt-out-effective",
        "recovery-activated",
        "recovery-information-changed",
    ];
    const SSF: [&str; 2] = ["verification", "stream-updated"];

    fn parse(schema: &EmbeddedSchema) -> Value {
        serde_json::from_str(schema.text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", schema.path))
    }

    #[test]
    fn each_id_equals_the_id_inside_its_text() {
        for schema in all() {
            let doc = parse(schema);
            assert_eq!(doc["$id"].as_str(), Some(schema.id), "{}", schema.path);
            assert_eq!(
                doc["$schema"].as_str(),
                Some("https://json-schema.org/draft/2020-12/schema"),
                "{}",
                schema.path
            );
        }
    }

    #[test]
    fn ids_and_paths_are_unique() {
        let ids: HashSet<_> = all().iter().map(|s| s.id).collect();
        let paths: HashSet<_> = all().iter().map(|s| s.path).collect();
        assert_eq!(ids.len(), all().len());
        assert_eq!(paths.len(), all().len());
    }

    #[test]
    fn every_event_type_file_is_present() {
        let expected: Vec<String> = CAEP
            .iter()
            .map(|n| format!("{EVENT_TYPE_PREFIX}caep/event-type/{n}"))
            .chain(RISC.iter().map(|n| format!("{EVENT_TYPE_PREFIX}risc/event-type/{n}")))
            .chain(SSF.iter().map(|n| format!("{EVENT_TYPE_PREFIX}ssf/event-type/{n}")))
            .collect();
        for uri in &expected {
            let schema = by_id(uri).unwrap_or_else(|| panic!("no schema for {uri}"));
            assert!(schema.is_event_type());
            let (spec, name) = uri
                .strip_prefix(EVENT_TYPE_PREFIX)
                .and_then(|rest| rest.split_once("/event-type/"))
                .unwrap_or_else(|| panic!("malformed {uri}"));
            assert_eq!(schema.path, format!("json/{spec}/{name}.json"));
        }
        let event_schemas = all().iter().filter(|s| s.is_event_type()).count();
        assert_eq!(event_schemas, expected.len(), "an unexpected event schema is embedded");
    }

    #[test]
    fn shared_schemas_are_found_by_id() {
        for id in [
            SET_SCHEMA_ID,
            SUBJECT_SCHEMA_ID,
            STREAM_CONFIGURATION_SCHEMA_ID,
            TRANSMITTER_METADATA_SCHEMA_ID,
            CAEP_COMMON_SCHEMA_ID,
        ] {
            let schema = by_id(id).unwrap_or_else(|| panic!("no schema {id}"));
            assert!(!schema.is_event_type());
        }
        assert_eq!(by_id(&format!("{SET_SCHEMA_ID}#")).map(|s| s.id), Some(SET_SCHEMA_ID));
        assert!(by_id("https://schemas.openid.net/secevent/caep/event-type/unknown").is_none());
    }

    #[test]
    fn every_reference_points_at_an_embedded_schema() {
        fn walk(value: &Value, refs: &mut Vec<String>) {
            match value {
                Value::Object(map) => {
                    if let Some(Value::String(r)) = map.get("$ref") {
                        refs.push(r.clone());
                    }
                    map.values().for_each(|v| walk(v, refs));
                }
                Value::Array(items) => items.iter().for_each(|v| walk(v, refs)),
                _ => {}
            }
        }
        for schema in all() {
            let mut refs = Vec::new();
            walk(&parse(schema), &mut refs);
            for r in refs {
                let target = r.split('#').next().unwrap_or_default();
                assert!(
                    target.is_empty() || by_id(target).is_some(),
                    "{} refers to {r}, which is not embedded",
                    schema.path
                );
            }
        }
    }
}
