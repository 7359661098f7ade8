//! The hub's OpenAPI 3.1 document, served at `GET /openapi.json`: the
//! hub's own routes (ingest, health, metrics, the operator's issuer, cascade
//! and session views) merged with the transmitter's (SSF management, poll,
//! the operator's receiver, stream and dead-letter routes), each from the
//! `#[utoipa::path]` annotation on its handler.
//!
//! The SSF bodies are described by the JSON Schemas the tests validate real
//! traffic against: they are put into `components.schemas` here, their
//! `$defs` lifted beside them and every `$ref` pointed at the component, so
//! a plain OpenAPI tool resolves them within the document. The copy checked
//! in at `hub/openapi.json` must equal what a hub serves (a test says so);
//! `caep-hub openapi > hub/openapi.json` writes it.

use caep_schemas::json_schema;
use serde::Serialize;
use serde_json::{Map, Value, json};
use utoipa::{OpenApi, ToSchema};

use crate::http;

/// The SSF bodies and the components their schemas become.
const EMBEDDED: [(&str, &str); 3] = [
    (json_schema::STREAM_CONFIGURATION_SCHEMA_ID, "StreamConfiguration"),
    (json_schema::TRANSMITTER_METADATA_SCHEMA_ID, "TransmitterMetadata"),
    (json_schema::SUBJECT_SCHEMA_ID, "SubjectIdentifier"),
];

/// `GET /healthz`.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// `ok`, or `unavailable` with a `reason` (503).
    pub status: String,
    pub reason: Option<String>,
    /// Kafka mode: the partitions this instance works.
    #[schema(value_type = Option<Object>)]
    pub kafka: Option<Value>,
}

/// A session as the operator sees it.
#[derive(Serialize, ToSchema)]
pub struct SessionSummary {
    pub session_id: String,
    pub issuer: String,
    #[schema(value_type = crate::openapi::SubjectIdentifierRef)]
    pub subject: Value,
    #[schema(value_type = Option<crate::openapi::SubjectIdentifierRef>)]
    pub user: Option<Value>,
    pub parent: Option<String>,
    /// `delegated`, `bounded` or `autonomous`.
    pub authority: Option<String>,
    pub established_at_ms: u64,
    pub last_active_ms: u64,
    pub expires_at_ms: Option<u64>,
    /// When the pruner next looks at it.
    pub kept_until_ms: Option<u64>,
    pub revoked: Option<Revoked>,
}

/// A session's revocation.
#[derive(Serialize, ToSchema)]
pub struct Revoked {
    /// The cascade that revoked it.
    pub txn: String,
    pub at_ms: u64,
}

/// A relying party a session reached.
#[derive(Serialize, ToSchema)]
pub struct TouchView {
    pub stream_id: String,
    pub touched_at_ms: u64,
    /// Reported by the IdP (session-presented) rather than the receiver.
    pub by_idp: bool,
}

/// A session of a subtree: a summary with its touches, or a child held by
/// another instance (`elsewhere`).
#[derive(Serialize, ToSchema)]
pub struct SubtreeEntry {
    pub session_id: String,
    pub elsewhere: Option<bool>,
    pub issuer: Option<String>,
    #[schema(value_type = Option<crate::openapi::SubjectIdentifierRef>)]
    pub subject: Option<Value>,
    #[schema(value_type = Option<crate::openapi::SubjectIdentifierRef>)]
    pub user: Option<Value>,
    pub parent: Option<String>,
    pub authority: Option<String>,
    pub established_at_ms: Option<u64>,
    pub last_active_ms: Option<u64>,
    pub expires_at_ms: Option<u64>,
    pub kept_until_ms: Option<u64>,
    pub revoked: Option<Revoked>,
    pub touches: Option<Vec<TouchView>>,
}

/// `GET /admin/sessions/{session_id}`.
#[derive(Serialize, ToSchema)]
pub struct SessionView {
    pub session: SessionSummary,
    pub touches: Vec<TouchView>,
    /// The session and every descendant.
    pub subtree: Vec<SubtreeEntry>,
}

/// One cascade in `GET /admin/cascades`.
#[derive(Serialize, ToSchema)]
pub struct CascadeSummary {
    pub txn: String,
    pub issuer: String,
    pub root: String,
    pub event_type: String,
    pub started_at: u64,
    pub total: u64,
    pub delivered: u64,
    pub failed: u64,
    pub complete: bool,
    pub cascade_ms: Option<u64>,
}

impl From<crate::cascade::CascadeRecord> for CascadeSummary {
    fn from(record: crate::cascade::CascadeRecord) -> Self {
        CascadeSummary {
            txn: crate::scope::local_id(&record.key).to_owned(),
            cascade_ms: record.completed_at_ms.map(|done| done.saturating_sub(record.started_at_ms)),
            complete: record.completed_at_ms.is_some(),
            issuer: record.issuer,
            root: record.root,
            event_type: record.event_type,
            started_at: record.started_at_ms,
            total: record.total,
            delivered: record.delivered,
            failed: record.failed,
        }
    }
}

/// `GET /admin/cascades`.
#[derive(Serialize, ToSchema)]
pub struct CascadeList {
    /// Newest first.
    pub in_progress: Vec<CascadeSummary>,
    pub in_progress_total: u64,
    /// Most recently completed first.
    pub completed: Vec<CascadeSummary>,
}

/// A reference to the subject identifier schema, for fields typed as JSON.
pub struct SubjectIdentifierRef;

impl utoipa::PartialSchema for SubjectIdentifierRef {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::Ref::from_schema_name("SubjectIdentifier").into()
    }
}

impl ToSchema for SubjectIdentifierRef {}

/// `GET /openapi.json`.
#[utoipa::path(get, path = "/openapi.json", tag = "hub",
    responses((status = 200, description = "This document", body = Object)))]
pub(crate) async fn serve_document(
    axum::extract::State(document): axum::extract::State<std::sync::Arc<Value>>,
) -> axum::Json<Value> {
    axum::Json(Value::clone(&document))
}

/// The hub's own routes.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "caep-hub",
        description = "Continuous access evaluation (CAEP) event hub: SSF 1.0 transmitter, \
        RFC 8935 ingest of IdP SETs, and the operator's admin API."
    ),
    paths(
        http::ingest,
        http::list_issuers,
        http::register_issuer,
        http::untrust_issuer,
        http::recent_cascades,
        http::cascade_report,
        http::session_view,
        crate::server::health,
        crate::server::render_metrics,
        serve_document,
    )
)]
struct HubApi;

/// The whole document for a hub whose issuer URL has path `issuer_path`
/// (empty for none): the SSF routes live under it, and the well-known
/// document's path ends with it (SSF 1.0 §7.2.1).
pub fn document(issuer_path: &str) -> Value {
    let mut api = HubApi::openapi();
    api.merge(caep_transmitter::openapi::TransmitterApi::openapi());
    api.info.version = env!("CARGO_PKG_VERSION").to_owned();
    api.info.license = None;
    api.info.contact = None;
    let mut document = serde_json::to_value(api).unwrap_or_else(|_| json!({}));
    let schemas = document["components"]["schemas"].as_object_mut().map(std::mem::take).unwrap_or_default();
    document["components"]["schemas"] = Value::Object(with_embedded(schemas));
    if !issuer_path.is_empty() {
        place_under(&mut document, issuer_path);
    }
    document
}

/// `schemas` with the SSF components replaced by the embedded JSON Schemas.
fn with_embedded(mut schemas: Map<String, Value>) -> Map<String, Value> {
    for (id, name) in EMBEDDED {
        let Some(embedded) = json_schema::by_id(id) else { continue };
        let Ok(mut schema) = serde_json::from_str::<Value>(embedded.text) else { continue };
        let defs = schema.as_object_mut().and_then(|object| object.remove("$defs"));
        for (def, mut body) in defs.and_then(|d| d.as_object().cloned()).unwrap_or_default() {
            point_refs(&mut body, name);
            schemas.insert(format!("{name}_{def}"), body);
        }
        if let Some(object) = schema.as_object_mut() {
            object.remove("$schema");
            object.remove("$id");
        }
        point_refs(&mut schema, name);
        schemas.insert(name.to_owned(), schema);
    }
    let request = request_members(schemas.get("StreamConfiguration_members"));
    schemas.insert("StreamConfigurationMembers".into(), request);
    schemas
}

/// A create, update or replace request's members: those of a configuration,
/// none required, where a receiver-supplied member may also be `null`
/// ("no value"; in an update, "remove it").
fn request_members(members: Option<&Value>) -> Value {
    let mut request = members.cloned().unwrap_or_else(|| json!({"type": "object"}));
    request["description"] = json!(
        "Stream configuration members of a request, none required; a receiver-supplied member may be null \
         (create and replace: no value; update: remove it)."
    );
    if let Some(properties) = request["properties"].as_object_mut() {
        for member in ["delivery", "events_requested", "description"] {
            if let Some(schema) = properties.get_mut(member) {
                *schema = json!({"anyOf": [schema.take(), {"type": "null"}]});
            }
        }
        properties.insert(
            "stream_id".into(),
            json!({"description": "The stream: a string, required in an update or replace request; ignored in \
                a create request (the transmitter supplies it)."}),
        );
        for member in caep_transmitter::streams::TRANSMITTER_SUPPLIED {
            properties.insert(
                member.to_owned(),
                json!({"description": "Transmitter-supplied: ignored in a create request; in an update or replace \
                    request it must equal the stream's value (400 otherwise)."}),
            );
        }
    }
    request
}

/// Points every `$ref` in a schema of component `name` at a component:
/// `#` at itself, `#/$defs/x` at `name_x`, another embedded schema's `$id`
/// (with or without a fragment) at that schema's component.
fn point_refs(schema: &mut Value, name: &str) {
    match schema {
        Value::Object(object) => {
            if let Some(Value::String(target)) = object.get_mut("$ref") {
                *target = component_ref(target, name);
            }
            for value in object.values_mut() {
                point_refs(value, name);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|item| point_refs(item, name)),
        _ => {}
    }
}

fn component_ref(target: &str, name: &str) -> String {
    let (resource, fragment) = target.split_once('#').unwrap_or((target, ""));
    let owner = match resource {
        "" => name,
        id => EMBEDDED.iter().find(|(embedded, _)| *embedded == id).map_or(name, |(_, other)| *other),
    };
    match fragment.strip_prefix("/$defs/") {
        Some(def) => format!("#/components/schemas/{owner}_{def}"),
        None => format!("#/components/schemas/{owner}"),
    }
}

/// Moves the SSF routes under the issuer's path.
fn place_under(document: &mut Value, issuer_path: &str) {
    let Some(paths) = document["paths"].as_object_mut() else { return };
    let moved: Map<String, Value> = std::mem::take(paths)
        .into_iter()
        .map(|(path, item)| {
            let path = if path == "/.well-known/ssf-configuration" {
                format!("{path}{issuer_path}")
            } else if path.starts_with("/ssf/") {
                format!("{issuer_path}{path}")
            } else {
                path
            };
            (path, item)
        })
        .collect();
    *paths = moved;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ref_points_at_a_component_of_the_document() {
        let document = document("");
        let schemas = document["components"]["schemas"].as_object().expect("schemas");
        let mut refs = Vec::new();
        collect_refs(&document, &mut refs);
        assert!(refs.len() > 20, "{refs:?}");
        for target in refs {
            let name = target.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("{target}"));
            assert!(schemas.contains_key(name), "{target} names no component");
        }
        assert_eq!(document["openapi"], "3.1.0");
    }

    fn collect_refs(value: &Value, refs: &mut Vec<String>) {
        match value {
            Value::Object(object) => {
                if let Some(Value::String(target)) = object.get("$ref") {
                    refs.push(target.clone());
                }
                object.values().for_each(|v| collect_refs(v, refs));
            }
            Value::Array(items) => items.iter().for_each(|v| collect_refs(v, refs)),
            _ => {}
        }
    }

    #[test]
    fn an_issuer_path_moves_the_ssf_routes_under_it() {
        let document = document("/tenant-a");
        let paths = document["paths"].as_object().expect("paths");
        assert!(paths.contains_key("/tenant-a/ssf/streams"));
        assert!(paths.contains_key("/.well-known/ssf-configuration/tenant-a"));
        assert!(paths.contains_key("/admin/streams") && !paths.contains_key("/ssf/streams"));
    }
}
