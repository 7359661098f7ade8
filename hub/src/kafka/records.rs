//! What the hub writes to Kafka, topic by topic, as JSON records.
//!
//! - `shared` (one partition): the control plane, the session → root
//!   directory, delivery-partition owners and cascade reports. Every
//!   instance replays all of it into its main store, in order.
//! - `graph` (N partitions, keyed by delegation root): verified IdP events
//!   and touches. One instance at a time owns each partition.
//! - `deliveries` (N partitions, keyed by stream): signed SETs for the
//!   instance that delivers that stream (push) or serves its polls.

use caep_transmitter::control::ControlChange;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::cascade::{CascadeEvent, CascadeRecord, Leaf, Outcome};
use crate::graph::Touch;
use crate::issuers::IssuerChange;

/// Topic names under the configured prefix, with their partition counts.
pub const SHARED: &str = "shared";
pub const GRAPH: &str = "graph";
pub const DELIVERIES: &str = "deliveries";

/// A record of the `shared` topic.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SharedRecord {
    Control {
        change: ControlChange,
    },
    Issuer {
        change: IssuerChange,
    },
    /// A session's delegation root, which picks its `graph` partition, and
    /// the IdP that named it first (only that IdP may act on it). The first
    /// record for a session wins on every instance alike.
    Root {
        session_id: String,
        root: String,
        issuer: String,
    },
    /// The instance that delivers a `deliveries` partition and serves the
    /// polls of its streams.
    Owner {
        partition: i32,
        instance_id: String,
        url: String,
    },
    /// Sessions a graph partition no longer holds anything of (expired,
    /// or revoked past retention): the directory forgets their routes, so
    /// it stays as bounded as the graphs. Only an entry that routes to that
    /// partition is forgotten.
    Forget {
        partition: i32,
        sessions: Vec<String>,
    },
    /// Leaves a graph partition planned and handed to delivery.
    Planned {
        cascade: CascadeRecord,
        leaves: Vec<Leaf>,
    },
    /// What became of delivered (or dead-lettered) leaves, as reported by
    /// the instance that delivered them (which alone counts them in its
    /// latency metrics).
    Settled {
        outcomes: Vec<Outcome>,
        #[serde(default)]
        instance_id: String,
    },
}

/// A record of the `graph` topic.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum GraphRecord {
    /// A verified IdP SET (its claims), with the hub's receipt time.
    Event { claims: Map<String, Value>, received_at_ms: u64 },
    /// A session (graph key) reached a stream.
    Touch { session_id: String, stream_id: String, touch: Touch },
    /// `child`, whose tree lives in another partition (under `child_root`),
    /// was established under `parent`, whose tree lives here: a revocation
    /// of `parent` must reach `child`'s tree.
    Adopt { parent: String, child: String, child_root: String, issuer: String, at_ms: u64 },
    /// Revoke the tree under `session` (this partition's) as part of a
    /// cascade planned in another partition.
    RevokeForeign { session: String, cascade: Box<CascadeRecord>, event: CascadeEvent, at_ms: u64 },
}

/// A record of the `deliveries` topic: one signed SET for one stream.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeliveryRecord {
    pub stream_id: String,
    pub jti: String,
    pub token: String,
    /// The cascade key the outcome is reported under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txn: Option<String>,
}

/// JSON bytes of a record (these types always serialize).
pub fn to_bytes<T: Serialize>(record: &T) -> Vec<u8> {
    serde_json::to_vec(record).unwrap_or_default()
}
