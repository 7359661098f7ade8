#![forbid(unsafe_code)]
#![deny(missing_docs)]
//! Revocation-cascade drills against a caep-hub: an agent forest built from
//! parameters, real receivers (push and poll, built on the receiver SDK), a
//! simulated IdP signing SETs, faults, and exactness accounting of every
//! leaf. The `caep-drill` binary runs them; see the crate README.

pub mod accounting;
pub mod agents;
pub mod balancer;
pub mod cluster;
pub mod counters;
pub mod cpu;
pub mod drill;
pub mod forest;
pub mod guards;
pub mod hub;
pub mod plot;
pub mod receivers;
pub mod refusals;
pub mod setup;
pub mod soak;
pub mod tansu;
