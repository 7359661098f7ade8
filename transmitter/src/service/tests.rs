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
