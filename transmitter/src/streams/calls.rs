//! Bodies of the calls on an existing stream: status (SSF 1.0 §8.1.2),
//! add and remove subject (§8.1.3), verification (§8.1.4), and the hub's
//! batch form of add-subject.

use caep_schemas::event::StreamStatus;
use caep_schemas::subject::{MAX_SUBJECT_BYTES, SubjectId};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{optional_string, parse_object, quoted, required_stream_id};
use crate::error::SsfError;

/// A stream's status as the status endpoint returns it (GET) and takes it
/// (POST) (SSF 1.0 §8.1.2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StatusBody {
    /// The stream.
    pub stream_id: String,
    /// `enabled`, `paused` or `disabled`.
    #[schema(value_type = crate::openapi::StreamStatusName)]
    pub status: StreamStatus,
    /// Why the stream has this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Parses a status update (POST) body: `stream_id` and `status` required,
/// `status` one of `enabled`, `paused`, `disabled`, `reason` an optional
/// string.
pub fn parse_status_update(body: &[u8]) -> Result<StatusBody, SsfError> {
    let mut object = parse_object(body)?;
    let stream_id = required_stream_id(&object)?;
    let bad_status = || SsfError::BadRequest("`status` must be one of `enabled`, `paused`, `disabled`".into());
    let status = match object.remove("status") {
        None | Some(Value::Null) => return Err(SsfError::BadRequest("`status` is required".into())),
        Some(value @ Value::String(_)) => serde_json::from_value(value).map_err(|_| bad_status())?,
        Some(_) => return Err(bad_status()),
    };
    let reason = optional_string(&mut object, "reason")?;
    Ok(StatusBody { stream_id, status, reason })
}

/// An add-subject or remove-subject body (SSF 1.0 §8.1.3.2, §8.1.3.3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SubjectRequest {
    /// The stream.
    pub stream_id: String,
    /// The subject, in a format the hub knows.
    pub subject: SubjectId,
    /// Add only: whether the receiver verified the subject.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
}

impl SubjectRequest {
    /// `verified`, defaulting to true: "If omitted, Event Transmitters
    /// SHOULD assume that the subject has been verified" (§8.1.3.2).
    pub fn is_verified(&self) -> bool {
        self.verified.unwrap_or(true)
    }
}

/// Parses an add-subject or remove-subject body. `stream_id` and `subject`
/// are required; a subject without a `format`, of a format the hub does not
/// know (at any depth of a complex or aliases subject) or with malformed
/// members is a 400. `verified`, when present, must be a boolean; a remove
/// handler ignores it.
pub fn parse_subject_request(body: &[u8]) -> Result<SubjectRequest, SsfError> {
    let mut object = parse_object(body)?;
    let stream_id = required_stream_id(&object)?;
    let subject = match object.remove("subject") {
        None | Some(Value::Null) => return Err(SsfError::BadRequest("`subject` is required".into())),
        Some(value) => subject_of(value, "subject")?,
    };
    let verified = match object.remove("verified") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(verified)) => Some(verified),
        Some(_) => return Err(SsfError::BadRequest("`verified` must be a boolean".into())),
    };
    Ok(SubjectRequest { stream_id, subject, verified })
}

/// Subjects one add-many call may carry, at most.
pub const MAX_SUBJECTS_PER_CALL: usize = 100;

/// A request of the add-many extension (see
/// [`crate::metadata::ADD_SUBJECTS_MEMBER`]).
#[derive(Clone, Debug, PartialEq)]
pub struct SubjectsRequest {
    /// The stream.
    pub stream_id: String,
    /// The subjects, each in a format the hub knows.
    pub subjects: Vec<SubjectId>,
}

/// Parses an add-many body: `stream_id` and 1 to
/// [`MAX_SUBJECTS_PER_CALL`] `subjects`, each as add-subject takes one.
pub fn parse_subjects_request(body: &[u8]) -> Result<SubjectsRequest, SsfError> {
    let mut object = parse_object(body)?;
    let stream_id = required_stream_id(&object)?;
    let values = match object.remove("subjects") {
        Some(Value::Array(values)) if !values.is_empty() => values,
        _ => return Err(SsfError::BadRequest("`subjects` must be a non-empty array of subject identifiers".into())),
    };
    if values.len() > MAX_SUBJECTS_PER_CALL {
        return Err(SsfError::BadRequest(format!("at most {MAX_SUBJECTS_PER_CALL} `subjects` per call")));
    }
    let subjects = values.into_iter().map(|value| subject_of(value, "subjects[]")).collect::<Result<_, _>>()?;
    Ok(SubjectsRequest { stream_id, subjects })
}

/// One subject identifier of a request body, in a format the hub knows.
fn subject_of(value: Value, member: &str) -> Result<SubjectId, SsfError> {
    let size = serde_json::to_string(&value).map_or(usize::MAX, |json| json.len());
    if size > MAX_SUBJECT_BYTES {
        return Err(SsfError::BadRequest(format!(
            "`{member}` is {size} bytes of JSON; a subject identifier may have at most {MAX_SUBJECT_BYTES}"
        )));
    }
    let subject = match value {
        value @ Value::Object(_) => SubjectId::from_value(value)
            .map_err(|error| SsfError::BadRequest(format!("invalid `{member}`: {error}")))?,
        _ => return Err(SsfError::BadRequest(format!("`{member}` must be a subject identifier object"))),
    };
    if let Some(format) = unknown_format(&subject) {
        return Err(SsfError::BadRequest(format!("unsupported subject format {}", quoted(format))));
    }
    Ok(subject)
}

/// The first format the hub does not model, searching nested subjects: such
/// a subject could never match an event the hub emits.
fn unknown_format(subject: &SubjectId) -> Option<&str> {
    match subject {
        SubjectId::Other { format, .. } => Some(format),
        SubjectId::Aliases { identifiers } => identifiers.iter().find_map(unknown_format),
        SubjectId::Complex(complex) => {
            complex.members().into_iter().find_map(|(_, member)| member.and_then(unknown_format))
        }
        _ => None,
    }
}

/// A verification request body (SSF 1.0 §8.1.4.2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerificationRequest {
    /// The stream.
    pub stream_id: String,
    /// Echoed in the verification event's `state`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

/// Parses a verification request body: `stream_id` required, `state` an
/// optional string.
pub fn parse_verification_request(body: &[u8]) -> Result<VerificationRequest, SsfError> {
    let mut object = parse_object(body)?;
    let stream_id = required_stream_id(&object)?;
    let state = optional_string(&mut object, "state")?;
    Ok(VerificationRequest { stream_id, state })
}
