//! The embedded JSON Schemas: they compile as draft 2020-12, every example of
//! the spec texts (schemas/examples/index.json) validates against its schema,
//! and payloads that break the spec texts are rejected.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use caep_schemas::json_schema::{
    self, CAEP_COMMON_SCHEMA_ID, SET_SCHEMA_ID, STREAM_CONFIGURATION_SCHEMA_ID, SUBJECT_SCHEMA_ID,
    TRANSMITTER_METADATA_SCHEMA_ID,
};
use serde_json::{Value, json};
use support::{assert_invalid, assert_valid, compile, errors, schema_value, validator_for};

const CAEP: &str = "https://schemas.openid.net/secevent/caep/event-type/";
const RISC: &str = "https://schemas.openid.net/secevent/risc/event-type/";
const SSF: &str = "https://schemas.openid.net/secevent/ssf/event-type/";

fn caep(name: &str) -> String {
    format!("{CAEP}{name}")
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// The entries of schemas/examples/index.json: (file, kind).
fn index() -> Vec<(String, String)> {
    let index = read_json(&examples_dir().join("index.json"));
    let entries = index.as_array().unwrap_or_else(|| panic!("index.json is not an array"));
    entries
        .iter()
        .map(|entry| {
            let field = |name: &str| {
                entry[name].as_str().unwrap_or_else(|| panic!("index entry without string {name}: {entry}")).to_owned()
            };
            (field("file"), field("kind"))
        })
        .collect()
}

/// The one (event-type URI, event object) pair of a SET claim set.
fn single_event(set: &Value) -> (&str, &Value) {
    let events = set["events"].as_object().unwrap_or_else(|| panic!("no events object: {set}"));
    assert_eq!(events.len(), 1, "a spec SET carries more than one event: {set}");
    let (uri, payload) = events.iter().next().unwrap_or_else(|| unreachable!());
    (uri.as_str(), payload)
}

/// Validates the event payload of `set` against its event schema, when the
/// event type has one; returns whether it had.
fn check_event_payload(file: &str, set: &Value) -> bool {
    let (uri, payload) = single_event(set);
    if json_schema::by_id(uri).is_none() {
        return false;
    }
    let found = errors(&validator_for(uri), payload);
    assert!(found.is_empty(), "{file}: the {uri} payload is invalid: {found:#?}");
    true
}

// ---------------------------------------------------------------------------
// The schemas themselves

#[test]
fn every_schema_compiles_as_draft_2020_12() {
    for schema in json_schema::all() {
        let doc = schema_value(schema);
        assert_eq!(doc["$schema"], json!("https://json-schema.org/draft/2020-12/schema"), "{}", schema.path);
        if let Err(e) = jsonschema::draft202012::meta::validate(&doc) {
            panic!("{} is not a valid draft 2020-12 schema: {e}", schema.path);
        }
        if let Err(e) = compile(&doc) {
            panic!("{} does not compile: {e}", schema.path);
        }
    }
}

#[test]
fn embedded_texts_equal_the_files_on_disk() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut on_disk = BTreeSet::new();
    for dir in ["json", "json/caep", "json/risc", "json/ssf"] {
        let entries = std::fs::read_dir(root.join(dir)).unwrap_or_else(|e| panic!("cannot list {dir}: {e}"));
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".json") {
                on_disk.insert(format!("{dir}/{name}"));
            }
        }
    }
    let embedded: BTreeSet<String> = json_schema::all().iter().map(|s| s.path.to_owned()).collect();
    assert_eq!(embedded, on_disk, "every schema file must be embedded, and only those");
    for schema in json_schema::all() {
        let text = std::fs::read_to_string(root.join(schema.path))
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", schema.path));
        assert_eq!(text, schema.text, "{}", schema.path);
    }
}

// ---------------------------------------------------------------------------
// The spec examples

#[test]
fn index_lists_every_example_file() {
    let listed: BTreeSet<String> = index().into_iter().map(|(file, _)| file).collect();
    let mut on_disk = BTreeSet::new();
    let entries = std::fs::read_dir(examples_dir()).unwrap_or_else(|e| panic!("{e}"));
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".json") && name != "index.json" {
            on_disk.insert(name);
        }
    }
    assert_eq!(listed, on_disk);
    assert_eq!(listed.len(), index().len(), "a file is listed twice");
}

#[test]
fn every_spec_example_validates_against_its_schema() {
    let mut payloads_checked = 0;
    for (file, kind) in index() {
        let example = read_json(&examples_dir().join(&file));
        match kind.as_str() {
            "set" => {
                let found = errors(&validator_for(SET_SCHEMA_ID), &example);
                assert!(found.is_empty(), "{file}: invalid SET: {found:#?}");
                if check_event_payload(&file, &example) {
                    payloads_checked += 1;
                }
            }
            "set-legacy" => {
                // Printed in the spec but outside the SSF 1.0 SET profile: the
                // only violation is a numeric txn (see examples/README.md).
                let found = errors(&validator_for(SET_SCHEMA_ID), &example);
                assert!(!found.is_empty(), "{file} is marked set-legacy but is a valid SET");
                assert!(found.iter().all(|e| e.starts_with("/txn:")), "{file}: unexpected violations {found:#?}");
                let mut fixed = example.clone();
                fixed["txn"] = json!(example["txn"].to_string());
                assert_valid(SET_SCHEMA_ID, &fixed);
                if check_event_payload(&file, &example) {
                    payloads_checked += 1;
                }
            }
            "subject" => assert_example(&file, SUBJECT_SCHEMA_ID, &example),
            "stream-configuration" => assert_example(&file, STREAM_CONFIGURATION_SCHEMA_ID, &example),
            "stream-configuration-request" => {
                assert_example(&file, &format!("{STREAM_CONFIGURATION_SCHEMA_ID}#/$defs/members"), &example)
            }
            "stream-configuration-list" => {
                let list = example.as_array().unwrap_or_else(|| panic!("{file} is not an array"));
                for item in list {
                    assert_example(&file, STREAM_CONFIGURATION_SCHEMA_ID, item);
                }
            }
            "transmitter-metadata" => assert_example(&file, TRANSMITTER_METADATA_SCHEMA_ID, &example),
            "transmitter-metadata-fragment" => {
                assert_example(&file, &format!("{TRANSMITTER_METADATA_SCHEMA_ID}#/$defs/members"), &example)
            }
            "authorization-scheme" => assert_example(
                &file,
                &format!("{TRANSMITTER_METADATA_SCHEMA_ID}#/$defs/authorization_scheme"),
                &example,
            ),
            "caep-event-claims" => assert_example(&file, CAEP_COMMON_SCHEMA_ID, &example),
            other => match other.strip_prefix("event:") {
                Some(uri) => {
                    assert!(json_schema::by_id(uri).is_some(), "{file}: no schema for {uri}");
                    assert_example(&file, uri, &example);
                }
                None => panic!("{file}: unknown kind {other}"),
            },
        }
    }
    assert!(payloads_checked >= 20, "only {payloads_checked} event payloads were checked");
}

fn assert_example(file: &str, id: &str, example: &Value) {
    let found = errors(&validator_for(id), example);
    assert!(found.is_empty(), "{file}: invalid against {id}: {found:#?}");
}

#[test]
fn spec_examples_cover_every_caep_event_type() {
    let mut seen = BTreeSet::new();
    for (file, kind) in index() {
        if kind == "set" || kind == "set-legacy" {
            let example = read_json(&examples_dir().join(&file));
            seen.insert(single_event(&example).0.to_owned());
        }
    }
    for schema in json_schema::all() {
        if schema.id.starts_with(CAEP) {
            assert!(seen.contains(schema.id), "no spec example for {}", schema.id);
        }
    }
}

// ---------------------------------------------------------------------------
// Negative cases

fn set_with(events: Value) -> Value {
    json!({
        "iss": "https://tr.example.com",
        "aud": "https://rx.example.com",
        "jti": "4d3559ec67504aaba65d40b0363faad8",
        "iat": 1_700_000_000,
        "txn": "8675309",
        "sub_id": { "format": "email", "email": "user@example.com" },
        "events": events
    })
}

fn session_revoked_set() -> Value {
    set_with(json!({ caep("session-revoked"): { "event_timestamp": 1_700_000_000 } }))
}

#[test]
fn a_minimal_set_is_valid() {
    assert_valid(SET_SCHEMA_ID, &session_revoked_set());
    let mut array_aud = session_revoked_set();
    array_aud["aud"] = json!(["https://rx.example.com/web", "https://rx.example.com/mobile"]);
    assert_valid(SET_SCHEMA_ID, &array_aud);
}

#[test]
fn a_set_with_sub_is_rejected() {
    let mut set = session_revoked_set();
    set["sub"] = json!("user@example.com");
    assert_invalid(SET_SCHEMA_ID, &set);
}

#[test]
fn a_set_with_exp_is_rejected() {
    let mut set = session_revoked_set();
    set["exp"] = json!(1_700_000_600);
    assert_invalid(SET_SCHEMA_ID, &set);
}

#[test]
fn a_set_with_two_events_is_rejected() {
    let set = set_with(json!({
        caep("session-revoked"): {},
        caep("credential-change"): { "credential_type": "password", "change_type": "update" }
    }));
    assert_invalid(SET_SCHEMA_ID, &set);
}

#[test]
fn a_set_without_events_or_sub_id_is_rejected() {
    assert_invalid(SET_SCHEMA_ID, &set_with(json!({})));
    let mut set = session_revoked_set();
    set.as_object_mut().map(|claims| claims.remove("sub_id"));
    assert_invalid(SET_SCHEMA_ID, &set);
    let mut set = session_revoked_set();
    set["iat"] = json!("1700000000");
    assert_invalid(SET_SCHEMA_ID, &set);
}

#[test]
fn credential_change_with_an_unknown_change_type_is_rejected() {
    let uri = caep("credential-change");
    assert_valid(&uri, &json!({ "credential_type": "x509", "change_type": "revoke" }));
    assert_invalid(&uri, &json!({ "credential_type": "password", "change_type": "rotate" }));
    assert_invalid(&uri, &json!({ "change_type": "create" }));
}

#[test]
fn device_compliance_change_needs_both_statuses() {
    let uri = caep("device-compliance-change");
    assert_valid(&uri, &json!({ "previous_status": "compliant", "current_status": "not-compliant" }));
    assert_invalid(&uri, &json!({ "previous_status": "compliant" }));
    assert_invalid(&uri, &json!({ "previous_status": "compliant", "current_status": "broken" }));
}

#[test]
fn risk_levels_are_upper_case() {
    let uri = caep("risk-level-change");
    assert_valid(&uri, &json!({ "principal": "USER", "current_level": "HIGH" }));
    assert_invalid(&uri, &json!({ "principal": "USER", "current_level": "low" }));
    assert_invalid(&uri, &json!({ "principal": "USER", "current_level": "LOW", "previous_level": "medium" }));
    assert_invalid(&uri, &json!({ "current_level": "LOW" }));
}

#[test]
fn assurance_level_change_direction_is_an_enumeration() {
    let uri = caep("assurance-level-change");
    assert_valid(&uri, &json!({ "namespace": "NIST-AAL", "current_level": "nist-aal2" }));
    assert_invalid(&uri, &json!({ "namespace": "NIST-AAL", "current_level": "nist-aal2", "change_direction": "up" }));
    assert_invalid(&uri, &json!({ "current_level": "nist-aal2" }));
}

#[test]
fn common_caep_claims_are_checked_on_every_caep_event() {
    let uri = caep("session-revoked");
    assert_valid(&uri, &json!({ "initiating_entity": "system", "reason_user": { "en-US": "Bye" } }));
    assert_invalid(&uri, &json!({ "initiating_entity": "robot" }));
    assert_invalid(&uri, &json!({ "reason_admin": "Policy Violation: C076E82F" }));
    assert_invalid(&uri, &json!({ "reason_admin": {} }));
    assert_invalid(&uri, &json!({ "event_timestamp": "2024-01-01T00:00:00Z" }));
    assert_invalid(&caep("token-claims-change"), &json!({ "claims": {}, "initiating_entity": "policy" }));
}

#[test]
fn event_objects_allow_extension_members() {
    assert_valid(&caep("session-revoked"), &json!({ "https://example.com/ext": { "any": 1 } }));
    assert_valid(&format!("{RISC}account-purged"), &json!({ "x-vendor": true }));
    assert_valid(&format!("{SSF}verification"), &json!({ "state": "abc", "x-vendor": 1 }));
}

#[test]
fn hub_extension_members_are_checked() {
    let established = caep("session-established");
    assert_valid(
        &established,
        &json!({
            "amr": ["pwd", "otp"],
            "authority": "delegated",
            "parent_session": {
                "format": "complex",
                "session": { "format": "opaque", "id": "s-1" }
            }
        }),
    );
    assert_invalid(&established, &json!({ "authority": "supervised" }));
    assert_invalid(&established, &json!({ "parent_session": { "format": "iss_sub", "iss": "x" } }));
    assert_invalid(&established, &json!({ "amr": "otp" }));
    let presented = caep("session-presented");
    assert_valid(&presented, &json!({ "audience": "https://rp.example.com" }));
    assert_invalid(&presented, &json!({ "audience": 7 }));
}

#[test]
fn ssf_stream_events_are_checked() {
    let updated = format!("{SSF}stream-updated");
    assert_valid(&updated, &json!({ "status": "disabled", "reason": "maintenance" }));
    assert_invalid(&updated, &json!({ "reason": "maintenance" }));
    assert_invalid(&updated, &json!({ "status": "stopped" }));
    assert_valid(&format!("{SSF}verification"), &json!({}));
    assert_invalid(&format!("{SSF}verification"), &json!({ "state": 42 }));
}

#[test]
fn risc_events_are_checked() {
    let compromise = format!("{RISC}credential-compromise");
    assert_valid(&compromise, &json!({ "credential_type": "password", "reason_admin": "leak" }));
    assert_valid(&compromise, &json!({ "credential_type": "pin", "reason_user": { "en": "leak" } }));
    assert_invalid(&compromise, &json!({ "event_timestamp": 1 }));
    assert_invalid(&format!("{RISC}identifier-changed"), &json!({ "new-value": 5 }));
}

#[test]
fn subject_formats_need_their_members() {
    assert_valid(SUBJECT_SCHEMA_ID, &json!({ "format": "iss_sub", "iss": "https://i", "sub": "s" }));
    assert_invalid(SUBJECT_SCHEMA_ID, &json!({ "format": "iss_sub", "iss": "https://idp.example.com/" }));
    for (format, member) in [
        ("email", "email"),
        ("opaque", "id"),
        ("phone_number", "phone_number"),
        ("uri", "uri"),
        ("did", "url"),
        ("account", "uri"),
        ("aliases", "identifiers"),
        ("ip-addresses", "ip-addresses"),
    ] {
        assert_invalid(SUBJECT_SCHEMA_ID, &json!({ "format": format }));
        assert_invalid(SUBJECT_SCHEMA_ID, &json!({ "format": format, member: 5 }));
    }
    assert_invalid(SUBJECT_SCHEMA_ID, &json!({ "format": "jwt_id", "iss": "https://i" }));
    assert_invalid(SUBJECT_SCHEMA_ID, &json!({ "format": "saml_assertion_id", "issuer": "https://i" }));
    assert_valid(SUBJECT_SCHEMA_ID, &json!({ "format": "account", "uri": "acct:jane@example.com" }));
    assert_invalid(SUBJECT_SCHEMA_ID, &json!({ "format": "account", "uri": "mailto:jane@example.com" }));
}

#[test]
fn aliases_hold_non_alias_identifiers() {
    let email = json!({ "format": "email", "email": "user@example.com" });
    assert_valid(SUBJECT_SCHEMA_ID, &json!({ "format": "aliases", "identifiers": [email] }));
    assert_invalid(SUBJECT_SCHEMA_ID, &json!({ "format": "aliases", "identifiers": [] }));
    assert_invalid(
        SUBJECT_SCHEMA_ID,
        &json!({ "format": "aliases", "identifiers": [{ "format": "aliases", "identifiers": [email] }] }),
    );
    assert_invalid(SUBJECT_SCHEMA_ID, &json!({ "format": "aliases", "identifiers": [{ "format": "opaque" }] }));
}

#[test]
fn complex_subjects_need_a_valid_simple_member() {
    assert_invalid(SUBJECT_SCHEMA_ID, &json!({ "format": "complex" }));
    assert_invalid(
        SUBJECT_SCHEMA_ID,
        &json!({ "format": "complex", "user": { "format": "iss_sub", "iss": "https://i" } }),
    );
    assert_invalid(
        SUBJECT_SCHEMA_ID,
        &json!({
            "format": "complex",
            "user": { "format": "complex", "device": { "format": "opaque", "id": "d" } }
        }),
    );
    assert_invalid(SUBJECT_SCHEMA_ID, &json!({ "format": "complex", "user": "jane" }));
    assert_valid(SUBJECT_SCHEMA_ID, &json!({ "format": "complex", "workload": { "format": "opaque", "id": "w-1" } }));
}

#[test]
fn unknown_subject_formats_are_accepted_only_with_a_string_format() {
    assert_valid(SUBJECT_SCHEMA_ID, &json!({ "format": "catalog_item", "catalog_id": "c0384" }));
    assert_invalid(SUBJECT_SCHEMA_ID, &json!({ "format": 5 }));
    assert_invalid(SUBJECT_SCHEMA_ID, &json!({ "email": "user@example.com" }));
    assert_invalid(SUBJECT_SCHEMA_ID, &json!("user@example.com"));
    let mut set = session_revoked_set();
    set["sub_id"] = json!({ "format": "opaque" });
    assert_invalid(SET_SCHEMA_ID, &set);
}

#[test]
fn stream_configuration_requires_transmitter_members_and_a_known_delivery() {
    let config = json!({
        "stream_id": "f67e39a0a4d34d56b3aa1bc4cff0069f",
        "iss": "https://tr.example.com",
        "aud": "https://rx.example.com",
        "events_delivered": [caep("session-revoked")],
        "delivery": { "method": "urn:ietf:rfc:8936", "endpoint_url": "https://tr.example.com/poll/1" },
        "min_verification_interval": 30,
        "inactivity_timeout": 86_400
    });
    assert_valid(STREAM_CONFIGURATION_SCHEMA_ID, &config);
    let mut push = config.clone();
    push["delivery"] = json!({
        "method": "urn:ietf:rfc:8935",
        "endpoint_url": "https://rx.example.com/events",
        "authorization_header": "Bearer abc"
    });
    assert_valid(STREAM_CONFIGURATION_SCHEMA_ID, &push);
    for member in ["stream_id", "iss", "aud", "events_delivered", "delivery"] {
        let mut broken = config.clone();
        broken.as_object_mut().map(|c| c.remove(member));
        assert_invalid(STREAM_CONFIGURATION_SCHEMA_ID, &broken);
    }
    let mut unknown = config.clone();
    unknown["delivery"] = json!({ "method": "urn:example:carrier-pigeon", "endpoint_url": "x" });
    assert_invalid(STREAM_CONFIGURATION_SCHEMA_ID, &unknown);
    let mut no_url = config.clone();
    no_url["delivery"] = json!({ "method": "urn:ietf:rfc:8936" });
    assert_invalid(STREAM_CONFIGURATION_SCHEMA_ID, &no_url);
    let mut bad_interval = config;
    bad_interval["min_verification_interval"] = json!("30s");
    assert_invalid(STREAM_CONFIGURATION_SCHEMA_ID, &bad_interval);

    // A receiver's request: a poll delivery without endpoint_url is fine,
    // a push delivery without endpoint_url is not.
    let members = format!("{STREAM_CONFIGURATION_SCHEMA_ID}#/$defs/members");
    assert_valid(&members, &json!({ "delivery": { "method": "urn:ietf:rfc:8936" } }));
    assert_valid(&members, &json!({}));
    assert_invalid(&members, &json!({ "delivery": { "method": "urn:ietf:rfc:8935" } }));
    assert_invalid(&members, &json!({ "events_requested": "all" }));
}

#[test]
fn transmitter_metadata_requires_issuer_and_known_values() {
    assert_valid(TRANSMITTER_METADATA_SCHEMA_ID, &json!({ "issuer": "https://tr.example.com" }));
    assert_invalid(TRANSMITTER_METADATA_SCHEMA_ID, &json!({ "spec_version": "1_0" }));
    let with = |member: &str, value: Value| {
        let mut metadata = json!({ "issuer": "https://tr.example.com" });
        metadata[member] = value;
        metadata
    };
    assert_valid(TRANSMITTER_METADATA_SCHEMA_ID, &with("default_subjects", json!("ALL")));
    assert_invalid(TRANSMITTER_METADATA_SCHEMA_ID, &with("default_subjects", json!("SOME")));
    assert_invalid(TRANSMITTER_METADATA_SCHEMA_ID, &with("delivery_methods_supported", json!([])));
    assert_invalid(TRANSMITTER_METADATA_SCHEMA_ID, &with("authorization_schemes", json!([{}])));
    assert_invalid(
        TRANSMITTER_METADATA_SCHEMA_ID,
        &with("authorization_schemes", json!({ "spec_urn": "urn:ietf:rfc:6749" })),
    );
    assert_invalid(TRANSMITTER_METADATA_SCHEMA_ID, &with("critical_subject_members", json!("user")));
}
