//! Every stream configuration the transmitter produces validates against the
//! published JSON Schema `stream-configuration.json`, and the request bodies
//! it accepts validate against its `#/$defs/members`.
//!
//! The validator is built offline over a registry of every embedded schema,
//! the same approach as `schemas/tests/support/mod.rs` (copied, not
//! imported: a test module of another crate is not a dependency).

use std::sync::LazyLock;

use caep_schemas::json_schema::{self, STREAM_CONFIGURATION_SCHEMA_ID};
use caep_schemas::set::Audience;
use caep_transmitter::metadata::{POLL_METHOD, PUSH_METHOD};
use caep_transmitter::streams::{self, RequestKind, StreamConfig};
use jsonschema::{Draft, Registry, Validator};
use serde_json::{Value, json};

/// Every embedded schema, registered under its `$id`.
static REGISTRY: LazyLock<Registry<'static>> = LazyLock::new(|| {
    let mut builder = Registry::new().draft(Draft::Draft202012);
    for schema in json_schema::all() {
        let value: Value =
            serde_json::from_str(schema.text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", schema.path));
        builder = builder.add(schema.id, value).unwrap_or_else(|e| panic!("cannot register {}: {e}", schema.id));
    }
    builder.prepare().unwrap_or_else(|e| panic!("cannot prepare the schema registry: {e}"))
});

/// A validator for `id` (an embedded schema's `$id`, optionally with a JSON
/// Pointer fragment), network and file retrieval off.
fn validator_for(id: &str) -> Validator {
    jsonschema::options()
        .with_draft(Draft::Draft202012)
        .with_registry(&REGISTRY)
        .offline()
        .build(&json!({ "$ref": id }))
        .unwrap_or_else(|e| panic!("schema {id} does not compile: {e}"))
}

fn assert_valid(id: &str, instance: &Value) {
    let validator = validator_for(id);
    let errors: Vec<String> = validator.iter_errors(instance).map(|e| format!("{}: {e}", e.instance_path())).collect();
    assert!(errors.is_empty(), "expected valid against {id}, got {errors:#?}\ninstance: {instance:#}");
}

const SUPPORTED: [&str; 3] = [
    "https://schemas.openid.net/secevent/caep/event-type/session-revoked",
    "https://schemas.openid.net/secevent/caep/event-type/credential-change",
    "https://schemas.openid.net/secevent/risc/event-type/account-disabled",
];

fn poll_url(stream_id: &str) -> String {
    format!("https://hub.example.com/ssf/poll/{stream_id}")
}

/// Request bodies covering each delivery shape and each optional member.
fn create_bodies() -> Vec<Value> {
    vec![
        json!({}),
        json!({"delivery": {"method": POLL_METHOD}}),
        json!({"delivery": {"method": POLL_METHOD, "endpoint_url": "https://ignored.example/"}}),
        json!({"delivery": {"method": PUSH_METHOD, "endpoint_url": "https://rp.example/events"}}),
        json!({
            "delivery": {
                "method": PUSH_METHOD,
                "endpoint_url": "https://rp.example/events",
                "authorization_header": "Bearer token"
            },
            "events_requested": [SUPPORTED[0], "urn:example:unknown"],
            "description": "push stream"
        }),
        json!({"events_requested": []}),
    ]
}

fn created(body: &Value, aud: Audience) -> StreamConfig {
    let request = streams::parse_request(body.to_string().as_bytes(), RequestKind::Create).expect("valid create");
    streams::new_stream(streams::new_stream_id(), "https://hub.example.com", aud, request, &SUPPORTED, poll_url, 60)
}

#[test]
fn created_configurations_validate() {
    for body in create_bodies() {
        assert_valid(&format!("{STREAM_CONFIGURATION_SCHEMA_ID}#/$defs/members"), &body);
        for aud in [Audience::One("rp-1".into()), Audience::Many(vec!["rp-web".into(), "rp-mobile".into()])] {
            let config = created(&body, aud);
            let value = serde_json::to_value(&config).expect("serializes");
            assert_valid(STREAM_CONFIGURATION_SCHEMA_ID, &value);
            // The list form of GET is an array of the same objects.
            let back: StreamConfig = serde_json::from_value(value).expect("parses back");
            assert_eq!(back, config);
        }
    }
}

#[test]
fn updated_and_replaced_configurations_validate() {
    let existing = created(&create_bodies()[4], Audience::One("rp-1".into()));
    let id = existing.stream_id.clone();
    let bodies = [
        json!({"stream_id": id, "description": null}),
        json!({"stream_id": id, "delivery": {"method": POLL_METHOD}}),
        json!({"stream_id": id, "events_requested": SUPPORTED, "aud": "rp-1", "iss": "https://hub.example.com"}),
        json!({"stream_id": id}),
    ];
    for body in bodies {
        // `null` (PATCH: remove the member) is accepted beyond what the
        // schema's members admit; only null-free bodies are checked here.
        if body.as_object().is_some_and(|members| members.values().all(|v| !v.is_null())) {
            assert_valid(&format!("{STREAM_CONFIGURATION_SCHEMA_ID}#/$defs/members"), &body);
        }
        let update = streams::parse_request(body.to_string().as_bytes(), RequestKind::Update).expect("valid");
        let updated = streams::apply_update(&existing, update, &SUPPORTED, poll_url).expect("applies");
        assert_valid(STREAM_CONFIGURATION_SCHEMA_ID, &serde_json::to_value(&updated).expect("serializes"));
        let replace = streams::parse_request(body.to_string().as_bytes(), RequestKind::Replace).expect("valid");
        let replaced = streams::apply_replace(&existing, replace, &SUPPORTED, poll_url).expect("applies");
        assert_valid(STREAM_CONFIGURATION_SCHEMA_ID, &serde_json::to_value(&replaced).expect("serializes"));
    }
}

#[test]
fn spec_examples_validate_after_a_round_trip() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/examples");
    for file in
        ["ssf-17-create-stream-response.json", "ssf-18-read-stream-response.json", "ssf-23-update-stream-response.json"]
    {
        let text = std::fs::read_to_string(dir.join(file)).expect("example file");
        let config: StreamConfig = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_valid(STREAM_CONFIGURATION_SCHEMA_ID, &serde_json::to_value(&config).expect("serializes"));
    }
}
