//! End-to-end drills: the real `caep-drill` binary against the real
//! `caep-hub` binary, with real push and poll receivers on loopback.

mod support;

use std::process::Command;
use std::sync::Mutex;

use serde_json::Value;
use support::{DRILL, guard_bin, hub_bin};

/// Serializes the drills: they share two cores and one hub build.
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs the drill with `args`; returns its exit code and its JSON report.
fn drill(args: &[&str]) -> (i32, Value) {
    let _serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let (hub, guard) = (hub_bin(), guard_bin());
    let dir = tempfile::tempdir().expect("temp dir");
    let json_path = dir.path().join("report.json");
    let plot_path = dir.path().join("latency.svg");
    let output = Command::new(DRILL)
        .args(args)
        .arg("--quiet")
        .arg("--hub-bin")
        .arg(&hub)
        .arg("--guard-bin")
        .arg(&guard)
        .arg("--json")
        .arg(&json_path)
        .arg("--plot")
        .arg(&plot_path)
        .output()
        .expect("running caep-drill");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let text = std::fs::read_to_string(&json_path)
        .unwrap_or_else(|error| panic!("no JSON report ({error}); stdout:\n{stdout}\nstderr:\n{stderr}"));
    let report: Value = serde_json::from_str(&text).expect("the report is JSON");
    let svg = std::fs::read_to_string(&plot_path).expect("the plot is written");
    assert!(svg.starts_with("<svg") && svg.contains("p99"), "an SVG CDF with the percentiles");
    println!("{stdout}");
    (output.status.code().unwrap_or(-1), report)
}

fn count(report: &Value, key: &str) -> u64 {
    report[key].as_u64().unwrap_or_else(|| panic!("{key} missing in {report}"))
}

/// Every revoked agent was refused by the RPs it touched, none too late
/// and none that was not revoked; refusal latency is reported per cascade.
fn assert_enforced(report: &Value) {
    let refusal = &report["refusal"];
    assert_eq!(count(refusal, "stale_accepts"), 0, "{report}");
    assert_eq!(count(refusal, "false_refusals"), 0, "{report}");
    assert_eq!(count(refusal, "never_refused"), 0, "{report}");
    assert_eq!(count(refusal, "failed"), 0, "no agent call failed: {report}");
    assert!(count(refusal, "refused") >= count(report, "expected_leaves"), "each revoked agent refused: {report}");
    assert!(count(&report["guards"], "layer") > 0 && count(&report["guards"], "sidecar") > 0, "a mix: {report}");
    for phase in report["phases"].as_array().into_iter().flatten() {
        assert!(phase["refusal_ms"]["p99"].as_f64().is_some_and(|p99| p99 > 0.0), "{report}");
        assert!(phase["delivery_ms"]["p99"].as_f64().is_some_and(|p99| p99 > 0.0), "{report}");
    }
}

#[test]
fn small_drill_is_exact_across_every_scenario() {
    let (code, report) =
        drill(&["--sessions", "60", "--receivers", "4", "--poll-share", "0.5", "--depth", "2", "--scenario", "all"]);
    assert_eq!(count(&report, "expected_leaves"), 180, "60 sessions × 3 touches: {report}");
    assert_eq!(count(&report, "delivered_leaves"), 180, "{report}");
    assert_eq!(count(&report, "lost_leaves"), 0, "{report}");
    assert_eq!(count(&report, "unexpected_leaves"), 0, "{report}");
    assert_eq!(count(&report, "wrong_txn"), 0, "{report}");
    assert_eq!(report["phases"].as_array().map(Vec::len), Some(3), "mid, user, roots: {report}");
    for phase in report["phases"].as_array().into_iter().flatten() {
        assert!(count(phase, "expected_leaves") > 0, "every phase revokes something: {report}");
    }
    assert!(report["latency_ms"]["p99"].as_f64().is_some_and(|p99| p99 > 0.0));
    assert!(report["cascade_ms"].as_f64().is_some(), "the hub's cascade report was read");
    for stretch in ["setup", "revocations"] {
        let per_op = report["cpu"][stretch]["hub_per_op_us"].as_f64();
        assert!(per_op.is_some_and(|us| us > 0.0), "the hub's CPU per operation, read from /proc: {report}");
    }
    assert_enforced(&report);
    assert_eq!(code, 0);
}

#[test]
fn faults_and_a_hub_sigkill_lose_nothing() {
    let (code, report) = drill(&[
        "--sessions",
        "80",
        "--receivers",
        "5",
        "--poll-share",
        "0.4",
        "--scenario",
        "roots",
        "--faults",
        "--down-ms",
        "800",
    ]);
    assert_eq!(report["faults"]["hub_kills"], 1, "the hub was killed and restarted: {report}");
    assert!(report["cpu"]["revocations"]["hub_total_s"].is_null(), "no CPU across a restart: {report}");
    assert_eq!(report["faults"]["flaky_receivers"], 1, "{report}");
    assert_eq!(report["faults"]["down_receivers"], 1, "{report}");
    assert_eq!(count(&report, "lost_leaves"), 0, "{report}");
    assert_eq!(count(&report, "unexpected_leaves"), 0, "{report}");
    assert_eq!(count(&report, "delivered_leaves"), count(&report, "expected_leaves"));
    assert!(count(&report, "duplicate_deliveries") >= count(&report, "retried_jtis"), "{report}");
    assert_enforced(&report);
    assert_eq!(code, 0);
}

#[test]
fn a_dropped_leaf_is_lost_and_an_extra_one_unexpected_and_the_exit_status_says_so() {
    let (code, report) = drill(&[
        "--sessions",
        "20",
        "--receivers",
        "2",
        "--poll-share",
        "0",
        "--scenario",
        "roots",
        "--timeout-secs",
        "3",
        "--self-test-drop",
        "1",
        "--self-test-forget",
        "1",
    ]);
    assert_eq!(count(&report, "lost_leaves"), 1, "{report}");
    assert_eq!(count(&report, "unexpected_leaves"), 1, "{report}");
    assert_eq!(code, 1, "loss or unexpected leaves fail the drill");
}

#[test]
fn an_rp_that_is_not_fed_its_sets_shows_stale_accepts_and_the_exit_status_says_so() {
    let (code, report) = drill(&[
        "--sessions",
        "20",
        "--receivers",
        "2",
        "--poll-share",
        "0",
        "--scenario",
        "roots",
        "--timeout-secs",
        "3",
        "--self-test-blind",
    ]);
    assert_eq!(count(&report, "lost_leaves"), 0, "the leaves still arrive: {report}");
    let refusal = &report["refusal"];
    assert!(count(refusal, "stale_accepts") > 0, "{report}");
    assert!(count(refusal, "never_refused") > 0, "{report}");
    assert!(refusal["stale_sample"].as_array().is_some_and(|s| s.iter().all(|i| i["receiver"] == 0)), "{report}");
    assert_eq!(code, 1, "a stale accept fails the drill");
}

#[test]
fn a_refused_unaffected_agent_is_a_false_refusal_and_the_exit_status_says_so() {
    let (code, report) = drill(&[
        "--sessions",
        "30",
        "--receivers",
        "3",
        "--depth",
        "2",
        "--scenario",
        "mid",
        "--self-test-false-refusal",
    ]);
    assert!(count(&report["refusal"], "false_refusals") > 0, "{report}");
    assert_eq!(count(&report["refusal"], "stale_accepts"), 0, "{report}");
    assert_eq!(code, 1, "a false refusal fails the drill");
}

#[test]
fn a_short_soak_samples_a_hub_that_prunes_what_expires() {
    let _serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let hub = hub_bin();
    let dir = tempfile::tempdir().expect("temp dir");
    let json_path = dir.path().join("soak.json");
    let plot_path = dir.path().join("soak.svg");
    let args =
        ["--soak", "0.4", "--rate", "20", "--soak-interval-secs", "3", "--soak-ttl-secs", "3", "--receivers", "3"];
    let output = Command::new(DRILL)
        .args(args)
        .arg("--hub-bin")
        .arg(&hub)
        .arg("--json")
        .arg(&json_path)
        .arg("--plot")
        .arg(&plot_path)
        .output()
        .expect("running caep-drill --soak");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "caep-drill --soak failed:\n{stderr}");
    let lines: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("each sample is a JSON line"))
        .collect();
    assert!(lines.len() >= 6, "a sample every 3 s for 24 s: {lines:?}");
    let last = lines.last().expect("samples");
    assert!(count(last, "established_total") > 100, "{last}");
    assert!(count(last, "db_bytes") > 0 && count(last, "rss_bytes") > 0, "{last}");
    assert!(count(&last["pruned"], "sessions") > 0, "sessions of 3 s lifetimes were pruned: {last}");
    assert!(
        count(last, "live_sessions") < count(last, "established_total"),
        "the hub keeps fewer sessions than were established: {last}"
    );
    assert!(lines.iter().any(|sample| count(sample, "leaves") > 0), "revocations reached the receivers: {lines:?}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).expect("--json")).expect("JSON");
    assert_eq!(report["summary"]["thirds"].as_array().map(Vec::len), Some(3), "{report}");
    assert!(stderr.contains("| part of the run |"), "the summary table:\n{stderr}");
    let svg = std::fs::read_to_string(&plot_path).expect("--plot");
    assert!(svg.starts_with("<svg") && svg.contains("redb file"), "bytes and RSS over time");
}

#[test]
fn hub_env_reaches_every_hub_but_not_over_the_drills_own_settings() {
    // Only the hub's own settings can be passed.
    let refused = Command::new(DRILL).args(["--hub-env", "PATH=/nowhere"]).output().expect("running caep-drill");
    assert_eq!(refused.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is not a CAEP_HUB_* setting"));

    // A setting the hub cannot use reaches it: it does not start.
    let unusable = {
        let _serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        Command::new(DRILL)
            .args(["--sessions", "2", "--receivers", "1", "--quiet", "--hub-env", "CAEP_HUB_SIGNING_ALG=none"])
            .arg("--hub-bin")
            .arg(hub_bin())
            .arg("--guard-bin")
            .arg(guard_bin())
            .output()
            .expect("running caep-drill")
    };
    assert!(!unusable.status.success());
    assert!(String::from_utf8_lossy(&unusable.stderr).contains("caep-hub exited"), "{unusable:?}");

    // The address the drill gives its hub wins over one passed in: the drill still runs, exactly.
    let (code, report) = drill(&["--sessions", "10", "--receivers", "2", "--hub-env", "CAEP_HUB_LISTEN=127.0.0.1:1"]);
    assert_eq!(count(&report, "lost_leaves"), 0, "{report}");
    assert_eq!(count(&report, "unexpected_leaves"), 0, "{report}");
    assert_eq!(code, 0, "{report}");
}
