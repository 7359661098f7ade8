//! Tests of `cascade.rs`, in a file of their own to keep that one short enough to read.

use super::*;
use caep_transmitter::store::{Commit, Store};
use redb::ReadableTableMetadata;

fn leaf(jti: &str, stream: &str, at: u64) -> Leaf {
    Leaf {
        jti: jti.into(),
        stream_id: stream.into(),
        session_id: "s".into(),
        with_user: false,
        event: 0,
        planned_at_ms: at,
        status: LeafStatus::Planned,
        acked_at_ms: None,
        err: None,
    }
}

fn template(txn: &str) -> CascadeRecord {
    CascadeRecord {
        key: txn.into(),
        txn: txn.into(),
        root: "session:s".into(),
        issuer: "https://idp".into(),
        event_type: "x".into(),
        events: Vec::new(),
        started_at_ms: 100,
        total: 0,
        undispatched: 0,
        delivered: 0,
        failed: 0,
        completed_at_ms: None,
    }
}

fn event() -> CascadeEvent {
    CascadeEvent { event_type: "x".into(), event: Value::Null }
}

#[tokio::test]
async fn events_sharing_a_txn_keep_their_own_event_and_other_issuers_get_their_own_cascade() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("c.redb")).expect("open");
    let (first, second, other_key) = store
        .write(Commit::Durable, |txn| {
            let a = CascadeEvent { event_type: "a".into(), event: Value::Null };
            let b = CascadeEvent { event_type: "b".into(), event: Value::Null };
            let (_, first) = plan(txn, &template("t"), &a, vec![leaf("1", "s", 1)], None)?;
            let (record, second) = plan(txn, &template("t"), &b, vec![leaf("2", "s", 1)], None)?;
            assert_eq!(record.events, [a, b]);
            Ok((first, second, key("https://another-idp", "t")))
        })
        .await
        .expect("plan");
    assert_eq!((first[0].event, second[0].event), (0, 1));
    assert_ne!(other_key, key("https://idp", "t"));
}

#[tokio::test]
async fn the_stored_histogram_matches_the_leaves_and_is_not_trusted_when_it_does_not() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("c.redb")).expect("open");
    let jtis: Vec<String> = (0..40).map(|n| format!("j{n}")).collect();
    let leaves: Vec<Leaf> = jtis.iter().map(|jti| leaf(jti, "s", 100)).collect();
    let moved = jtis.clone();
    store
        .write(Commit::Durable, move |txn| {
            plan(txn, &template("h"), &event(), leaves.clone(), None)?;
            mark_pending(txn, "h", &moved).map(drop)
        })
        .await
        .expect("plan");
    // Three batches; repeats within and across them; a duplicate; a failure.
    for batch in jtis.chunks(15) {
        let outcomes: Vec<Outcome> = batch
            .iter()
            .enumerate()
            .flat_map(|(n, jti)| {
                let outcome = Outcome {
                    txn: "h".into(),
                    jti: jti.clone(),
                    delivered: jti != "j7",
                    at_ms: 100 + (n as u64 % 4) * 10,
                    err: None,
                };
                [outcome.clone(), Outcome { at_ms: outcome.at_ms + 1, ..outcome }]
            })
            .collect();
        store.write(Commit::Lazy, move |txn| apply_outcomes(txn, &outcomes).map(drop)).await.expect("apply");
    }
    let (stored, of_leaves) = store
        .read(|txn| {
            let (record, leaves) = cascade_and_leaves(txn, "h")?.expect("exists");
            Ok((LatencyCounts::stored(txn, "h", record.delivered)?, LatencyCounts::of(&leaves)))
        })
        .expect("read");
    assert_eq!(stored.as_ref(), Some(&of_leaves));
    assert_eq!(of_leaves.total(), 39, "the failed leaf has no latency; the duplicate counts once");
    // A histogram that does not account for every delivered leaf (a
    // cascade from before histograms) is read from the leaves instead.
    store
        .write(Commit::Lazy, |txn| {
            txn.open_table(LATENCIES).map_err(storage)?.remove(("h", 20)).map_err(storage)?;
            Ok(())
        })
        .await
        .expect("remove a row");
    let summary = store.read(|txn| report(txn, "h", false)).expect("read").expect("exists");
    assert_eq!(
        (summary.p50_ms, summary.p99_ms, summary.max_ms),
        (of_leaves.percentile(50), of_leaves.percentile(99), of_leaves.max())
    );
    assert!(store.read(|txn| LatencyCounts::stored(txn, "h", 39)).expect("read").is_none());
}

#[test]
fn percentiles_by_nearest_rank() {
    let values: Vec<u64> = (1..=100).collect();
    assert_eq!(percentile(&values, 50), Some(50));
    assert_eq!(percentile(&values, 99), Some(99));
    assert_eq!(percentile(&[7], 99), Some(7));
    assert_eq!(percentile(&[], 50), None);
}

#[tokio::test]
async fn outcomes_count_once_and_complete_the_cascade() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("c.redb")).expect("open");
    store
        .write(Commit::Durable, |txn| {
            plan(txn, &template("t1"), &event(), vec![leaf("a", "s1", 100), leaf("b", "s2", 100)], None)?;
            let moved = mark_pending(txn, "t1", &["a".into(), "b".into()])?;
            assert_eq!(moved.len(), 2);
            assert!(mark_pending(txn, "t1", &["a".into()])?.is_empty(), "a pending leaf is not moved twice");
            Ok(())
        })
        .await
        .expect("plan");
    assert!(store.read(all_planned).expect("read").is_empty(), "pending leaves are not replanned");

    let outcome = |jti: &str, delivered: bool, at: u64| Outcome {
        txn: "t1".into(),
        jti: jti.into(),
        delivered,
        at_ms: at,
        err: (!delivered).then(|| "invalid_key".into()),
    };
    let first = vec![outcome("a", true, 104), outcome("a", true, 150)];
    let applied = store.write(Commit::Lazy, move |txn| apply_outcomes(txn, &first)).await.expect("apply");
    assert_eq!(applied.leaf_latencies_ms, [4], "the duplicate ack changes nothing");
    assert!(applied.completed.is_empty());
    let second = vec![outcome("b", false, 120)];
    let applied = store.write(Commit::Lazy, move |txn| apply_outcomes(txn, &second)).await.expect("apply");
    assert_eq!(applied.completed, [("t1".to_owned(), 20)]);

    let report = store.read(|txn| report(txn, "t1", true)).expect("read").expect("exists");
    let summary = store.read(|txn| super::report(txn, "t1", false)).expect("read").expect("exists");
    assert!(summary.leaves.is_none());
    let figures = |r: &CascadeReport| (r.total, r.delivered, r.failed, r.p50_ms, r.p99_ms, r.max_ms, r.cascade_ms);
    assert_eq!(figures(&summary), figures(&report), "the summary's figures are the report's");
    assert_eq!((report.total, report.delivered, report.failed, report.pending), (2, 1, 1, 0));
    assert!(report.complete);
    assert_eq!((report.p50_ms, report.max_ms, report.cascade_ms), (Some(4), Some(4), Some(20)));
    assert_eq!(
        report.leaves.iter().flatten().find(|l| l.jti == "b").and_then(|l| l.err.clone()).as_deref(),
        Some("invalid_key")
    );
}

#[tokio::test]
async fn complete_cascades_are_pruned_after_retention_in_bounded_batches() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("c.redb")).expect("open");
    let settle = |key: &str, jtis: &[&str], at: u64| -> Vec<Outcome> {
        jtis.iter()
            .map(|jti| Outcome { txn: key.into(), jti: (*jti).into(), delivered: true, at_ms: at, err: None })
            .collect()
    };
    let (done, open) = (settle("done", &["a", "b", "c"], 200), settle("open", &["x"], 200));
    store
        .write(Commit::Durable, move |txn| {
            plan(
                txn,
                &template("done"),
                &event(),
                vec![leaf("a", "s", 100), leaf("b", "s", 100), leaf("c", "s", 100)],
                None,
            )?;
            plan(txn, &template("open"), &event(), vec![leaf("x", "s", 100), leaf("y", "s", 100)], None)?;
            mark_pending(txn, "done", &["a".into(), "b".into(), "c".into()])?;
            mark_pending(txn, "open", &["x".into(), "y".into()])?;
            apply_outcomes(txn, &done)?;
            apply_outcomes(txn, &open)?;
            assert_eq!(prune_completed(txn, 200, 100)?, CascadesPruned::default(), "completed at 200: kept");
            let first = prune_completed(txn, 201, 2)?;
            assert_eq!(first, CascadesPruned { cascades: 1, leaves: 2, latency_rows: 0 }, "in batches");
            assert!(cascade(txn, "done")?.is_none(), "its report is gone at once");
            let second = prune_completed(txn, 201, 2)?;
            assert_eq!(second, CascadesPruned { cascades: 0, leaves: 1, latency_rows: 1 });
            assert_eq!(prune_completed(txn, u64::MAX, 100)?, CascadesPruned::default(), "incomplete: never");
            Ok(())
        })
        .await
        .expect("prune");
    assert!(store.read(|txn| report(txn, "done", false)).expect("read").is_none());
    let latency_rows = store
        .read(|txn| {
            let table = txn.open_table(LATENCIES).map_err(storage)?;
            let rows = table.range(("done", 0)..=("done", u64::MAX)).map_err(storage)?.count();
            Ok((rows, table.len().map_err(storage)?))
        })
        .expect("read");
    assert_eq!(latency_rows, (0, 1), "the pruned cascade's latencies went with it; the open one's stay");
    assert!(store.read(|txn| report(txn, "open", false)).expect("read").is_some());
}

#[tokio::test]
async fn planned_leaves_are_listed_for_recovery() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("c.redb")).expect("open");
    store
        .write(Commit::Durable, |txn| plan(txn, &template("t2"), &event(), vec![leaf("x", "s1", 1)], None).map(drop))
        .await
        .expect("plan");
    let planned = store.read(all_planned).expect("read");
    assert_eq!(planned.len(), 1);
    assert_eq!(planned[0].1[0].jti, "x");
    // The sweep takes only leaves planned before its horizon.
    assert!(store.read(|txn| planned_before(txn, 1)).expect("read").is_empty(), "planned at 1, not before");
    assert_eq!(store.read(|txn| planned_before(txn, 2)).expect("read").len(), 1);
    // A planned leaf settled before hand-over (its stream vanished) is not
    // waiting for dispatch any more.
    let dropped = vec![Outcome { txn: "t2".into(), jti: "x".into(), delivered: false, at_ms: 5, err: None }];
    store.write(Commit::Lazy, move |txn| apply_outcomes(txn, &dropped).map(drop)).await.expect("dropped");
    let indexed =
        store.read(|txn| txn.open_table(UNDISPATCHED).map_err(storage)?.len().map_err(storage)).expect("read");
    assert_eq!(indexed, 0, "settled while planned: nothing left to dispatch");
    store
        .write(Commit::Durable, |txn| plan(txn, &template("t3"), &event(), vec![leaf("y", "s1", 1)], None).map(drop))
        .await
        .expect("plan");
    // Handed over: the cascade leaves the index, and nothing is swept.
    store.write(Commit::Lazy, |txn| mark_pending(txn, "t3", &["y".into()]).map(drop)).await.expect("pending");
    assert!(store.read(all_planned).expect("read").is_empty());
    let indexed =
        store.read(|txn| txn.open_table(UNDISPATCHED).map_err(storage)?.len().map_err(storage)).expect("read");
    assert_eq!(indexed, 0, "the index holds only cascades with work left");
}
