#![forbid(unsafe_code)]
//! The one exact model of Security Event Tokens that every other crate of the hub
//! builds on: SET claims (RFC 8417 with the SSF 1.0 profile), typed CAEP 1.0,
//! RISC 1.0 and SSF events, subject identifiers (RFC 9493 plus SSF), the JSON
//! Schemas that describe them, and JOSE signing and verification with the
//! algorithm pinned to the key (RFC 8725).

pub mod event;
pub mod jose;
pub mod json_schema;
pub mod set;
pub mod ssf;
pub mod subject;
