//! Every JSON example of the spec texts (schemas/examples/index.json) goes
//! through the Rust types and comes back unchanged, and validates against its
//! JSON Schema.

mod support;

use std::path::PathBuf;

use caep_schemas::event::{CaepCommon, Event};
use caep_schemas::json_schema;
use caep_schemas::set::SecurityEventToken;
use caep_schemas::subject::SubjectId;
use serde_json::Value;

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// (file, kind) of every indexed example.
fn index() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(examples_dir().join("index.json")).expect("examples/index.json");
    let entries: Vec<Value> = serde_json::from_str(&text).expect("index is a JSON array");
    entries
        .into_iter()
        .map(|entry| {
            let file = entry["file"].as_str().expect("file").to_owned();
            let kind = entry["kind"].as_str().expect("kind").to_owned();
            (file, kind)
        })
        .collect()
}

fn load(file: &str) -> Value {
    let text = std::fs::read_to_string(examples_dir().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn assert_valid(schema_id: &str, value: &Value, file: &str) {
    let validator = support::validator_for(schema_id);
    let errors: Vec<String> = validator.iter_errors(value).map(|e| format!("{} at {}", e, e.instance_path())).collect();
    assert!(errors.is_empty(), "{file} against {schema_id}: {errors:?}");
}

#[test]
fn every_set_example_round_trips_through_the_types_and_validates() {
    let mut checked = 0;
    for (file, _) in index().into_iter().filter(|(_, kind)| kind == "set") {
        let original = load(&file);
        let Value::Object(claims) = original.clone() else { panic!("{file} is not an object") };
        let set = SecurityEventToken::from_claims(claims).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(Value::Object(set.to_claims()), original, "{file} changed in a round trip");
        assert_valid(json_schema::SET_SCHEMA_ID, &original, &file);
        if json_schema::by_id(set.event.type_uri()).is_some() {
            assert!(!matches!(set.event, Event::Unknown { .. }), "{file}: known type parsed as unknown");
            assert_valid(set.event.type_uri(), &set.event.payload(), &file);
        }
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} SET examples found");
}

#[test]
fn legacy_set_examples_parse_and_only_their_numeric_txn_is_normalized() {
    let mut checked = 0;
    for (file, _) in index().into_iter().filter(|(_, kind)| kind == "set-legacy") {
        let original = load(&file);
        let Value::Object(claims) = original.clone() else { panic!("{file} is not an object") };
        let set = SecurityEventToken::from_claims(claims).unwrap_or_else(|e| panic!("{file}: {e}"));
        let mut expected = original.clone();
        if let Some(txn) = original.get("txn").and_then(Value::as_i64) {
            expected["txn"] = Value::String(txn.to_string());
        }
        let round_tripped = Value::Object(set.to_claims());
        assert_eq!(round_tripped, expected, "{file}: more than txn changed");
        assert_valid(json_schema::SET_SCHEMA_ID, &round_tripped, &file);
        checked += 1;
    }
    assert!(checked > 0, "no legacy SET examples found");
}

#[test]
fn caep_common_claim_examples_parse_into_the_common_members() {
    let mut checked = 0;
    for (file, _) in index().into_iter().filter(|(_, kind)| kind == "caep-event-claims") {
        let original = load(&file);
        let common: CaepCommon = serde_json::from_value(original.clone()).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(common.reason_admin.is_some() || common.reason_user.is_some(), "{file}: no reason parsed");
        assert_eq!(serde_json::to_value(&common).expect("serialize"), original, "{file} changed in a round trip");
        checked += 1;
    }
    assert!(checked > 0, "no CAEP common-claim examples found");
}

#[test]
fn every_subject_example_round_trips_and_validates() {
    let mut checked = 0;
    for (file, _) in index().into_iter().filter(|(_, kind)| kind == "subject") {
        let original = load(&file);
        let subject = SubjectId::from_value(original.clone()).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(subject.to_value(), original, "{file} changed in a round trip");
        assert_valid(json_schema::SUBJECT_SCHEMA_ID, &original, &file);
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} subject examples found");
}
