//! Test helpers shared by the integration tests of `caep-schemas`: JSON
//! Schema validators over the embedded schemas, with every embedded schema
//! registered as a resource so that cross-file `$ref`s resolve offline.
//!
//! Use from another test file with `mod support;`.
#![allow(dead_code)]

use std::sync::LazyLock;

use caep_schemas::json_schema::{self, EmbeddedSchema};
use jsonschema::{Draft, Registry, Validator};
use serde_json::{Value, json};

/// Every embedded schema, registered under its `$id`.
static REGISTRY: LazyLock<Registry<'static>> = LazyLock::new(|| {
    let mut builder = Registry::new().draft(Draft::Draft202012);
    for schema in json_schema::all() {
        builder = builder
            .add(schema.id, schema_value(schema))
            .unwrap_or_else(|e| panic!("cannot register {}: {e}", schema.id));
    }
    builder.prepare().unwrap_or_else(|e| panic!("cannot prepare the schema registry: {e}"))
});

/// The parsed document of an embedded schema.
pub fn schema_value(schema: &EmbeddedSchema) -> Value {
    serde_json::from_str(schema.text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", schema.path))
}

/// Compiles `schema` as draft 2020-12 against the registry of embedded
/// schemas, with network and file retrieval off.
pub fn compile(schema: &Value) -> Result<Validator, jsonschema::ValidationError<'static>> {
    jsonschema::options().with_draft(Draft::Draft202012).with_registry(&REGISTRY).offline().build(schema)
}

/// A validator for the schema `id`: the `$id` of an embedded schema (an
/// event-type URI or one of the `json_schema::*_SCHEMA_ID` constants), or
/// such an `$id` followed by a JSON Pointer fragment naming a subschema, e.g.
/// `https://caep-hub.dev/schemas/stream-configuration.json#/$defs/members`.
///
/// Panics if the schema is unknown or does not compile.
pub fn validator_for(id: &str) -> Validator {
    let schema = match json_schema::by_id(id) {
        Some(embedded) => schema_value(embedded),
        None => {
            let base = id.split('#').next().unwrap_or_default();
            assert!(json_schema::by_id(base).is_some(), "no embedded schema {base}");
            json!({ "$ref": id })
        }
    };
    compile(&schema).unwrap_or_else(|e| panic!("schema {id} does not compile: {e}"))
}

/// The validation errors of `instance` against `validator`, one line each
/// (`<instance path>: <message>`); empty when it is valid.
pub fn errors(validator: &Validator, instance: &Value) -> Vec<String> {
    validator.iter_errors(instance).map(|e| format!("{}: {e}", e.instance_path())).collect()
}

/// Panics with the validation errors unless `instance` is valid against `id`.
pub fn assert_valid(id: &str, instance: &Value) {
    let found = errors(&validator_for(id), instance);
    assert!(found.is_empty(), "expected valid against {id}, got {found:#?}\ninstance: {instance:#}");
}

/// Panics unless `instance` is invalid against `id`.
pub fn assert_invalid(id: &str, instance: &Value) {
    assert!(
        !validator_for(id).is_valid(instance),
        "expected invalid against {id}, but it validated\ninstance: {instance:#}"
    );
}
