#![forbid(unsafe_code)]
//! The SSF 1.0 transmitter: signing keys and their JWKS, the transmitter
//! metadata document, receivers and their tokens, stream management, the
//! durable outbox, and push (RFC 8935) and poll (RFC 8936) delivery.

pub mod admin;
pub mod control;
pub mod error;
pub mod health;
pub mod http;
pub mod keys;
pub mod limits;
pub mod metadata;
pub mod openapi;
pub mod outbox;
pub mod poll;
pub mod push;
pub mod queue;
pub mod receivers;
pub mod registry;
pub mod secrets;
pub mod service;
pub mod ssrf;
pub mod store;
pub mod streams;
pub mod upkeep;
