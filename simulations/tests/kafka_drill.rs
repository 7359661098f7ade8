//! The drill in Kafka mode: the real `caep-drill` starts a private Tansu
//! broker and two `caep-hub` instances on it, spreads the IdP, the receivers'
//! management calls and polls over both (round robin), SIGKILLs one instance
//! as soon as the first leaf of the cascade arrives, and must still find
//! every expected leaf delivered, and nothing else. The kill comes seconds
//! after the instances joined: before 23b849e the hub did not move a member's
//! partitions when it died that early, and this drill lost 41–106 of its 120
//! leaves.

mod support;

use std::process::Command;
use std::time::Instant;

use serde_json::Value;
use support::{DRILL, guard_bin, hub_bin};

fn count(report: &Value, key: &str) -> u64 {
    report[key].as_u64().unwrap_or_else(|| panic!("{key} missing in {report}"))
}

#[test]
fn a_kafka_drill_across_an_instance_sigkill_loses_nothing() {
    // The broker is found the way the hub's Kafka tests find it; a missing
    // one fails the test (it never skips), saying how to install it.
    let tansu = caep_simulations::tansu::binary().unwrap_or_else(|error| panic!("{error}"));
    let hub = hub_bin();
    let dir = tempfile::tempdir().expect("temp dir");
    let json_path = dir.path().join("report.json");
    let started = Instant::now();
    let output = Command::new(DRILL)
        .args(["--kafka", "tansu", "--hubs", "2", "--partitions", "4"])
        .args(["--sessions", "40", "--receivers", "4", "--poll-share", "0.5", "--depth", "2", "--scenario", "roots"])
        .args(["--kill-instance-at", "1", "--timeout-secs", "45", "--quiet"])
        .arg("--hub-bin")
        .arg(&hub)
        .arg("--guard-bin")
        .arg(guard_bin())
        .arg("--json")
        .arg(&json_path)
        .env("CAEP_TANSU", &tansu)
        .output()
        .expect("running caep-drill");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}\n(drill took {:?})", started.elapsed());
    let text = std::fs::read_to_string(&json_path)
        .unwrap_or_else(|error| panic!("no JSON report ({error}); stdout:\n{stdout}\nstderr:\n{stderr}"));
    let report: Value = serde_json::from_str(&text).expect("the report is JSON");
    let context = format!("{report}\nstderr:\n{stderr}");
    assert_eq!(report["instances"], 2, "{context}");
    let spread = report["requests_per_instance"].as_array().expect("requests per instance");
    assert!(spread.iter().all(|n| n.as_u64().is_some_and(|n| n > 0)), "both instances got requests: {context}");
    assert_eq!(report["faults"]["instance_kills"], 1, "an instance was SIGKILLed: {context}");
    let expected = count(&report, "expected_leaves");
    assert_eq!(expected, 120, "40 sessions × 3 touches: {context}");
    let killed_after = report["faults"]["instance_killed_after_leaves"].as_u64().expect("kill recorded");
    assert!(killed_after < expected, "the kill came before the last leaf: {context}");
    assert_eq!(count(&report, "lost_leaves"), 0, "{context}");
    assert_eq!(count(&report, "unexpected_leaves"), 0, "{context}");
    assert_eq!(count(&report, "wrong_txn"), 0, "{context}");
    assert_eq!(count(&report, "delivered_leaves"), expected, "{context}");
    // Each instance's CPU and the broker's, read from /proc (the killed
    // instance is not measured across its death).
    let setup = &report["cpu"]["setup"];
    assert_eq!(setup["hubs_s"].as_array().map(Vec::len), Some(2), "{context}");
    assert!(setup["hub_per_op_us"].as_f64().is_some_and(|us| us > 0.0), "{context}");
    assert!(setup["broker_s"].as_f64().is_some_and(|s| s > 0.0), "{context}");
    assert!(report["cpu"]["revocations"]["hubs_s"][1].is_null(), "the killed instance: {context}");
    // The guards reported the touches through the balancer, and enforced.
    assert_eq!(count(&report["refusal"], "stale_accepts"), 0, "{context}");
    assert_eq!(count(&report["refusal"], "false_refusals"), 0, "{context}");
    assert_eq!(count(&report["refusal"], "never_refused"), 0, "{context}");
    assert_eq!(output.status.code(), Some(0), "{context}");
}
