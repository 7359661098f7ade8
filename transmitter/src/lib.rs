#![forbid(unsafe_code)]
//! The SSF 1.0 transmitter: signing keys and their JWKS, the transmitter
//! metadata document, and (with the transmitter issue) streams, the durable
//! outbox and push/poll delivery.

pub mod http;
pub mod keys;
pub mod metadata;
