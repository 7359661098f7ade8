//! What the hub writes to Kafka, topic by topic, as JSON records.
//!
//! - `shared` (one partition): the control plane, the session → root
//!   directory, delivery-partition owners and cascade reports. Every
//!   instance replays all of it into its main store, in order.
//! - `graph` (N partitions, keyed by delegation root): verified IdP events
//!   and touches. One instance at a time owns each partition.
//! - `deliveries` (N partitions, placed by stream): batches of signed SETs
//!   for the instance that delivers their streams (push) or serves their
//!   polls.

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

/// The most SETs one `deliveries` record carries.
pub const MAX_SETS_PER_RECORD: usize = 256;
/// The most token bytes one `deliveries` record carries (well under the
/// 1 MiB default `message.max.bytes` of brokers).
pub const MAX_TOKEN_BYTES_PER_RECORD: usize = 256 * 1024;

/// A record of the `deliveries` topic: signed SETs for the streams of its
/// partition, in the order they were handed over. Many SETs share one
/// record because a broker's cost is per record (Tansu writes each as a
/// SQLite row), while a cascade hands over hundreds at once.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeliveryBatch {
    pub sets: Vec<DeliveryRecord>,
}

impl DeliveryBatch {
    /// The SETs of a `deliveries` record: a batch, or the one SET that hubs
    /// before batching wrote per record (so a rolling upgrade loses none).
    pub fn decode(payload: &[u8]) -> Result<Vec<DeliveryRecord>, serde_json::Error> {
        match serde_json::from_slice::<DeliveryBatch>(payload) {
            Ok(batch) => Ok(batch.sets),
            Err(error) => serde_json::from_slice::<DeliveryRecord>(payload).map(|one| vec![one]).map_err(|_| error),
        }
    }

    /// Splits `sets` (all for one partition, in order) into batches within
    /// [`MAX_SETS_PER_RECORD`] and [`MAX_TOKEN_BYTES_PER_RECORD`], keeping
    /// their order. A SET larger than the byte bound gets a batch alone.
    pub fn split(sets: Vec<DeliveryRecord>) -> Vec<DeliveryBatch> {
        let mut batches = Vec::new();
        let mut current = Vec::new();
        let mut bytes = 0;
        for set in sets {
            let size = set.token.len();
            if !current.is_empty()
                && (current.len() == MAX_SETS_PER_RECORD || bytes + size > MAX_TOKEN_BYTES_PER_RECORD)
            {
                batches.push(DeliveryBatch { sets: std::mem::take(&mut current) });
                bytes = 0;
            }
            bytes += size;
            current.push(set);
        }
        if !current.is_empty() {
            batches.push(DeliveryBatch { sets: current });
        }
        batches
    }
}

/// One signed SET for one stream, inside a [`DeliveryBatch`].
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

#[cfg(test)]
mod tests {
    use super::*;

    fn set(i: usize, token_len: usize) -> DeliveryRecord {
        DeliveryRecord {
            stream_id: format!("s{}", i % 3),
            jti: format!("j{i}"),
            token: "t".repeat(token_len),
            txn: None,
        }
    }

    fn jtis(batches: &[DeliveryBatch]) -> Vec<Vec<String>> {
        batches.iter().map(|b| b.sets.iter().map(|s| s.jti.clone()).collect()).collect()
    }

    #[test]
    fn batches_keep_order_and_stay_within_their_bounds() {
        assert!(DeliveryBatch::split(Vec::new()).is_empty());
        let batches = DeliveryBatch::split((0..600).map(|i| set(i, 10)).collect());
        assert_eq!(batches.iter().map(|b| b.sets.len()).collect::<Vec<_>>(), [256, 256, 88]);
        let flat: Vec<String> = jtis(&batches).concat();
        assert_eq!(flat, (0..600).map(|i| format!("j{i}")).collect::<Vec<_>>());

        // By bytes: 100 KiB tokens, two to a record; an oversized one alone.
        let big = 100 * 1024;
        let sets = vec![set(0, big), set(1, big), set(2, big), set(3, 300 * 1024), set(4, 1)];
        let batches = DeliveryBatch::split(sets);
        assert_eq!(jtis(&batches), [vec!["j0", "j1"], vec!["j2"], vec!["j3"], vec!["j4"]]);
        for batch in &batches {
            let bytes: usize = batch.sets.iter().map(|s| s.token.len()).sum();
            assert!(batch.sets.len() == 1 || bytes <= MAX_TOKEN_BYTES_PER_RECORD, "{bytes}");
        }
    }

    #[test]
    fn a_record_decodes_as_a_batch_or_as_the_single_set_older_hubs_wrote() {
        let batch = DeliveryBatch { sets: vec![set(1, 5), set(2, 5)] };
        let decoded = DeliveryBatch::decode(&to_bytes(&batch)).expect("batch");
        assert_eq!(decoded.iter().map(|s| s.jti.as_str()).collect::<Vec<_>>(), ["j1", "j2"]);
        let single = DeliveryBatch::decode(br#"{"stream_id":"s","jti":"j","token":"t.t.t"}"#).expect("single");
        assert_eq!((single.len(), single[0].jti.as_str(), single[0].txn.as_deref()), (1, "j", None));
        assert!(DeliveryBatch::decode(b"{\"sets\":7}").is_err());
        assert!(DeliveryBatch::decode(b"not json").is_err());
    }
}
