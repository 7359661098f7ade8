//! Tests of `service.rs`, in a file of their own to keep that one short enough to read.

use super::*;

#[test]
fn issuer_paths() {
    assert_eq!(issuer_path("http://127.0.0.1:8080").expect("valid"), "");
    assert_eq!(issuer_path("https://hub.example.com/").expect("valid"), "");
    assert_eq!(issuer_path("https://hub.example.com/t/a/").expect("valid"), "/t/a");
    for bad in ["hub.example.com", "ftp://x", "https://", "https://h/?q", "https://h/#f"] {
        assert!(issuer_path(bad).is_err(), "accepted {bad}");
    }
}

#[test]
fn signing_work_is_split_across_cores_but_small_batches_stay_whole() {
    let one = |i: usize| Outgoing {
        stream_id: format!("s{i}"),
        set: SecurityEventToken::new(
            "https://hub",
            "aud",
            SubjectId::opaque("x"),
            Event::AccountPurged(Default::default()),
        ),
    };
    assert_eq!(split_for_signing((0..10).map(one).collect()).len(), 1);
    let chunks = split_for_signing((0..1000).map(one).collect());
    assert_eq!(chunks.iter().map(Vec::len).sum::<usize>(), 1000);
    assert!(chunks.iter().all(|c| c.len() >= 64));
}

#[tokio::test]
async fn once_stopped_every_wait_for_the_stop_ends_at_once_later_ones_too() {
    let dir = tempfile::tempdir().expect("temp dir");
    let keys = Arc::new(KeyStore::open(dir.path(), caep_schemas::jose::Algorithm::Es256).expect("keys"));
    let transmitter = open_in(dir.path(), TransmitterSettings::new("http://127.0.0.1:1"), keys).expect("open");
    let before = tokio::spawn(transmitter.stopping());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!before.is_finished(), "nothing has stopped yet");
    transmitter.stop_long_polls();
    tokio::time::timeout(Duration::from_secs(1), before)
        .await
        .expect("a wait from before the stop ends")
        .expect("join");
    // A poll that arrives while the drain runs must not wait either.
    tokio::time::timeout(Duration::from_millis(100), transmitter.stopping())
        .await
        .expect("a wait begun after the stop");
}
