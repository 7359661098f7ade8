#![forbid(unsafe_code)]
//! The CAEP event hub: ingests signed SETs from identity providers, records
//! the agent-session graph, and cascades revocations to every relying party.
//! The binary `caep-hub` is a thin command line over this library.

pub mod admin_cli;
pub mod admin_token;
pub mod cascade;
pub mod config;
mod console;
pub mod dispatch;
pub mod effects;
pub mod error;
pub mod graph;
pub mod http;
pub mod hub;
pub mod issuers;
pub mod kafka;
pub mod lifecycle;
pub mod log;
pub mod metrics;
pub mod openapi;
pub mod replay;
pub mod scope;
pub mod server;
