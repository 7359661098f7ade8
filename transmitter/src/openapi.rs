//! The transmitter's part of the hub's OpenAPI 3.1 document: every SSF
//! management, poll and operator route, from the `#[utoipa::path]`
//! annotation on its handler.
//!
//! Bodies the SSF specifications define (stream configurations, transmitter
//! metadata, subject identifiers) are described by the JSON Schemas the
//! tests validate real traffic against (`caep_schemas::json_schema`): the
//! types here only name them, and the hub puts the schemas themselves into
//! the document (see `caep_hub::openapi`). Bodies this hub defines are
//! described by the types below, shaped exactly as the handlers build them;
//! a test validates real responses against the document.

use serde::Serialize;
use utoipa::openapi::schema::{ArrayBuilder, OneOfBuilder, Schema};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::{admin, http};

/// Names a component whose schema is one of the embedded JSON Schemas; the
/// placeholder here is replaced by the schema when the document is built.
macro_rules! json_schema_component {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        pub struct $name;

        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new().into()
            }
        }

        impl utoipa::ToSchema for $name {
            fn name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }
        }
    };
}

json_schema_component!(
    /// A stream configuration as returned (SSF 1.0 §8.1.1).
    StreamConfiguration
);
json_schema_component!(
    /// Stream configuration members of a create, update or replace request.
    StreamConfigurationMembers
);
json_schema_component!(
    /// The transmitter configuration metadata (SSF 1.0 §7.1).
    TransmitterMetadata
);
json_schema_component!(
    /// A subject identifier (RFC 9493, with the SSF complex format).
    SubjectIdentifier
);

/// A receiver token's scope.
#[derive(Serialize, ToSchema)]
pub enum ScopeName {
    #[serde(rename = "ssf.manage")]
    Manage,
    #[serde(rename = "ssf.read")]
    Read,
}

/// A string with something besides white space.
#[derive(ToSchema)]
#[schema(pattern = "\\S")]
pub struct NonBlank(pub String);

/// The body of every error response (RFC 8935 §2.3 style).
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// A short code, e.g. `invalid_request`, `authentication_failed`, `not_found`.
    pub err: String,
    pub description: String,
}

/// A JSON Web Key Set (RFC 7517).
#[derive(Serialize, ToSchema)]
pub struct JwkSet {
    #[schema(value_type = Vec<Object>)]
    pub keys: Vec<serde_json::Value>,
}

/// `GET /ssf/streams`: one stream (with `stream_id`) or all of the receiver's.
pub struct StreamsRead;

impl utoipa::PartialSchema for StreamsRead {
    fn schema() -> RefOr<Schema> {
        let one = Ref::from_schema_name("StreamConfiguration");
        OneOfBuilder::new().item(one.clone()).item(ArrayBuilder::new().items(one)).into()
    }
}

impl ToSchema for StreamsRead {
    fn name() -> std::borrow::Cow<'static, str> {
        "StreamsRead".into()
    }
}

/// A stream's status (SSF 1.0 §8.1.2), as it is written in JSON.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StreamStatusName {
    Enabled,
    Paused,
    Disabled,
}

/// Add or remove one subject (SSF 1.0 §8.1.3).
#[derive(ToSchema)]
pub struct SubjectChange {
    pub stream_id: String,
    pub subject: SubjectIdentifier,
    pub verified: Option<bool>,
}

/// Add many subjects at once (this hub's extension, `add_subjects_endpoint`).
#[derive(ToSchema)]
pub struct SubjectsAdd {
    pub stream_id: String,
    /// 1 to 100 subject identifiers.
    pub subjects: Vec<SubjectIdentifier>,
}

/// A verification request (SSF 1.0 §8.1.4).
#[derive(Serialize, ToSchema)]
pub struct VerificationRequest {
    pub stream_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

/// A receiver just created, with its bearer token (shown once).
#[derive(Serialize, ToSchema)]
pub struct CreatedReceiver {
    pub receiver_id: String,
    pub token: String,
    pub audience: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub issuers: Option<Vec<String>>,
    pub all_subjects: bool,
}

/// A receiver as the operator sees it.
#[derive(Serialize, ToSchema)]
pub struct ReceiverView {
    pub receiver_id: String,
    pub name: String,
    pub audience: String,
    pub scopes: Vec<String>,
    pub issuers: Option<Vec<String>>,
    pub all_subjects: bool,
    pub created_at_ms: u64,
    pub streams: Vec<String>,
}

/// A stream as the operator sees it.
#[derive(Serialize, ToSchema)]
pub struct StreamView {
    pub stream_id: String,
    pub receiver_id: String,
    /// A string, or an array of strings.
    #[schema(schema_with = audience_schema)]
    pub aud: serde_json::Value,
    pub method: String,
    pub endpoint_url: String,
    pub status: StreamStatusName,
    pub reason: Option<String>,
    pub events_delivered: Vec<String>,
    pub all_subjects: bool,
    pub issuers: Option<Vec<String>>,
    pub subjects: u64,
    pub queued: u64,
}

/// An `aud`: one string, or several.
fn audience_schema() -> Schema {
    let one = || utoipa::openapi::ObjectBuilder::new().schema_type(utoipa::openapi::schema::Type::String);
    OneOfBuilder::new().item(one()).item(ArrayBuilder::new().items(one())).into()
}

/// A page of dead letters.
#[derive(Serialize, ToSchema)]
pub struct DeadLetterPage {
    pub dead_letters: Vec<DeadLetterView>,
    /// Pass as `cursor` for the next page; `null` on the last.
    pub next_cursor: Option<String>,
}

/// A SET delivery gave up on.
#[derive(Serialize, ToSchema)]
pub struct DeadLetterView {
    pub stream_id: String,
    pub jti: String,
    pub txn: Option<String>,
    pub err: String,
    pub description: String,
    pub enqueued_at_ms: u64,
    pub failed_at_ms: u64,
}

/// How many dead letters were put back.
#[derive(Serialize, ToSchema)]
pub struct Replayed {
    pub replayed: u64,
}

/// The bearer schemes: a receiver's token, and the operator's admin token.
struct BearerSchemes;

impl Modify for BearerSchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for name in ["receiver_token", "admin_token"] {
            components.add_security_scheme(name, SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
        }
    }
}

/// The transmitter's routes.
#[derive(OpenApi)]
#[openapi(
    paths(
        http::metadata,
        http::jwks,
        http::create_stream,
        http::read_streams,
        http::update_stream,
        http::replace_stream,
        http::delete_stream,
        http::read_status,
        http::update_status,
        http::add_subject,
        http::add_subjects,
        http::remove_subject,
        http::verify,
        http::poll_stream,
        admin::list_receivers,
        admin::create_receiver,
        admin::delete_receiver,
        admin::list_streams,
        admin::change_status,
        admin::list_dead_letters,
        admin::replay_dead_letters,
    ),
    components(schemas(StreamConfiguration, StreamConfigurationMembers, TransmitterMetadata, SubjectIdentifier)),
    modifiers(&BearerSchemes)
)]
pub struct TransmitterApi;
