//! Broker requests the instance's librdkafka clients have sent, by request
//! type (Produce, Fetch, ListOffsets, ...), from librdkafka's statistics
//! (`statistics.interval.ms`). They say what an operation costs the broker
//! and are rendered at `/metrics` as `caep_kafka_broker_requests_total`.
//!
//! Each client reports cumulative counts under its own handle name; the
//! totals add what each report grew by since that client's last one, so a
//! client that is replaced (a consumer that rejoins) keeps what it counted.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use serde::Deserialize;

/// How often every client reports (librdkafka builds a JSON document each time).
pub const STATS_INTERVAL_MS: &str = "500";
/// Clients remembered; the longest-silent is forgotten beyond it (an instance
/// runs about six at a time, more only for a while after a rejoin).
const MAX_CLIENTS: usize = 64;

/// The part of a statistics report read here.
#[derive(Deserialize)]
struct Report {
    name: String,
    #[serde(default)]
    brokers: HashMap<String, BrokerReport>,
}

#[derive(Deserialize)]
struct BrokerReport {
    /// Requests sent, by type, since the client started.
    #[serde(default)]
    req: HashMap<String, u64>,
}

/// A client's last counts: (broker, request type) → requests since that
/// broker connection started.
type Baseline = HashMap<(String, String), u64>;

#[derive(Default)]
struct Counts {
    /// Each client's baseline and when it last reported (report number).
    clients: HashMap<String, (u64, Baseline)>,
    totals: BTreeMap<String, u64>,
    reports: u64,
}

static COUNTS: Mutex<Option<Counts>> = Mutex::new(None);

/// Takes one client's statistics report (librdkafka's JSON).
pub fn record(raw: &[u8]) {
    let Ok(report) = serde_json::from_slice::<Report>(raw) else {
        tracing::debug!("unreadable librdkafka statistics");
        return;
    };
    let mut guard = COUNTS.lock().unwrap_or_else(|p| p.into_inner());
    let counts = guard.get_or_insert_with(Counts::default);
    counts.reports += 1;
    let reports = counts.reports;
    let (at, baseline) = counts.clients.entry(report.name).or_default();
    *at = reports;
    // Per broker: a broker missing from one report keeps its baseline (no
    // growth lost or counted twice), and one whose count went down was
    // reconnected and counts from zero.
    for (broker, stats) in report.brokers {
        for (request, count) in stats.req {
            let last = baseline.entry((broker.clone(), request.clone())).or_default();
            let grew = if count >= *last { count - *last } else { count };
            *last = count;
            if grew > 0 {
                *counts.totals.entry(request).or_default() += grew;
            }
        }
    }
    if counts.clients.len() > MAX_CLIENTS
        && let Some(silent) = counts.clients.iter().min_by_key(|(_, (at, _))| *at).map(|(name, _)| name.clone())
    {
        counts.clients.remove(&silent);
    }
    for (request, total) in &counts.totals {
        metrics::counter!("caep_kafka_broker_requests_total", "request" => request.clone()).absolute(*total);
    }
}

/// Requests sent so far by every client of this process, by type.
pub fn totals() -> BTreeMap<String, u64> {
    COUNTS.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|c| c.totals.clone()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(name: &str, produce: u64, fetch: u64) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "name": name,
            "brokers": {
                "127.0.0.1:9092/0": {"req": {"Produce": produce, "Fetch": fetch}},
                "GroupCoordinator": {"req": {"Heartbeat": 1}},
            },
        }))
        .unwrap_or_default()
    }

    #[test]
    fn totals_add_what_each_client_grew_by() {
        let before = totals();
        let get = |t: &BTreeMap<String, u64>, k: &str| t.get(k).copied().unwrap_or(0);
        record(&report("stats-test-a", 10, 100));
        record(&report("stats-test-b", 1, 0));
        record(&report("stats-test-a", 15, 130));
        // A garbled report changes nothing.
        record(b"{not json");
        let after = totals();
        // Other tests of this process may run clients too: only growth is checked.
        assert!(get(&after, "Produce") >= get(&before, "Produce") + 16);
        assert!(get(&after, "Fetch") >= get(&before, "Fetch") + 130);
        assert!(get(&after, "Heartbeat") >= get(&before, "Heartbeat") + 2);
    }

    #[test]
    fn a_broker_missing_from_a_report_or_reconnected_is_counted_once() {
        let one = |broker: &str, produce: u64| {
            serde_json::to_vec(&serde_json::json!({
                "name": "stats-test-brokers",
                "brokers": {broker: {"req": {"ProduceBrokerTest": produce}}},
            }))
            .unwrap_or_default()
        };
        let get = || totals().get("ProduceBrokerTest").copied().unwrap_or(0);
        record(&one("b1", 10));
        record(&one("b2", 5));
        // b1 is back with the counts it had: nothing new.
        record(&one("b1", 10));
        assert_eq!(get(), 15);
        // b1 reconnected: its count restarted from zero.
        record(&one("b1", 3));
        assert_eq!(get(), 18);
    }
}
