//! Tests of `graph.rs`, in a file of their own to keep that one short enough to read.

use super::*;
use caep_transmitter::store::{Commit, Store};

const IDP: &str = "https://idp";

fn key(id: &str) -> String {
    scoped(IDP, id)
}

fn record(id: &str, parent: Option<&str>, user: &str) -> SessionRecord {
    SessionRecord {
        session_id: key(id),
        subject: SubjectId::opaque(id),
        issuer: IDP.into(),
        user: Some(SubjectId::email(user)),
        parent: parent.map(key),
        authority: None,
        established_at_ms: 1,
        revoked: None,
        last_active_ms: 1,
        expires_at_ms: None,
        prune_at_ms: None,
    }
}

const LIFETIMES: Lifetimes = Lifetimes { idle_ms: 1000, revoked_retention_ms: 5000 };

fn at(at_ms: u64) -> Touch {
    Touch { at_ms, ..Touch::default() }
}

#[tokio::test]
async fn subtrees_touches_and_users() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("g.redb")).expect("open");
    let (tree, touched, users) = store
        .write(Commit::Durable, |txn| {
            for (id, parent) in [("r", None), ("a", Some("r")), ("b", Some("r")), ("a1", Some("a")), ("x", None)] {
                let user = if id == "x" { "other@x" } else { "u@x" };
                insert_session(txn, &mut record(id, parent, user), 1, &LIFETIMES)?;
            }
            assert!(touch(txn, &key("a1"), "stream-1", &at(5))?);
            assert!(!touch(txn, &key("a1"), "stream-1", &at(6))?, "a second touch is not new");
            touch(txn, &key("a1"), "stream-2", &at(7))?;
            touch(txn, &key("a10"), "stream-3", &at(7))?;
            // A key past the old "\u{10FFFF}" upper bound is still found.
            touch(txn, &key("a1"), "\u{10FFFF}\u{10FFFF}", &at(8))?;
            let tree = subtree(txn, &[key("a")])?;
            let touched: Vec<String> = touches(txn, &key("a1"))?.into_iter().map(|(s, _)| s).collect();
            Ok((tree, touched, sessions_of_user(txn, IDP, &SubjectId::email("U@X"))?))
        })
        .await
        .expect("write");
    assert_eq!(tree, [key("a"), key("a1")]);
    assert_eq!(touched, ["stream-1", "stream-2", "\u{10FFFF}\u{10FFFF}"], "no prefix bleed from a10");
    assert_eq!(users, [key("a"), key("a1"), key("b"), key("r")], "email users match case-insensitively");
    let whole = store.read(|txn| subtree_in(txn, &[key("r")])).expect("read");
    assert_eq!(whole, [key("r"), key("a"), key("b"), key("a1")]);
}

#[tokio::test]
async fn pending_touches_become_touches_are_capped_and_expire() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("g.redb")).expect("open");
    let scenario = |txn: &WriteTransaction| -> Result<(), PendingError> {
        touch_pending(txn, &key("late"), "s1", &at(10))?;
        touch_pending(txn, &key("stale"), "s1", &at(10))?;
        let now = 20 + PENDING_TOUCH_TTL_MS;
        insert_session(txn, &mut record("late", None, "u@x"), 20, &LIFETIMES)?;
        assert_eq!(touches(txn, &key("late"))?.len(), 1, "the waiting touch became a touch");
        assert_eq!(prune_pending_touches(txn, now, 100, false)?, 1, "the other expired");
        insert_session(txn, &mut record("stale", None, "u@x"), now, &LIFETIMES)?;
        assert!(touches(txn, &key("stale"))?.is_empty());
        for n in 0..MAX_PENDING_TOUCHES_PER_STREAM {
            touch_pending(txn, &key(&format!("p{n}")), "s2", &at(now))?;
        }
        touch_pending(txn, &key("p0"), "s2", &at(now))?;
        assert!(pending_full(txn, "s2")? && !pending_full(txn, "s3")?);
        assert!(matches!(touch_pending(txn, &key("one-too-many"), "s2", &at(now)), Err(PendingError::Full)));
        touch_pending(txn, &key("one-too-many"), "s3", &at(now))?;
        Ok(())
    };
    store.write(Commit::Durable, move |txn| Ok(scenario(txn))).await.expect("write").expect("scenario");
}

#[tokio::test]
async fn sessions_expire_bottom_up_with_everything_that_hangs_off_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("g.redb")).expect("open");
    let scenario = |txn: &WriteTransaction| -> Result<(), StoreError> {
        let never = |_: &SessionRecord| Ok(false);
        // idle 1000 ms: established at 1, due at 1001.
        for (id, parent) in [("root", None), ("child", Some("root")), ("lone", None)] {
            insert_session(txn, &mut record(id, parent, "u@x"), 1, &LIFETIMES)?;
        }
        touch(txn, &key("child"), "s1", &at(1))?;
        claim_revocation(txn, &key("lone"), "s1")?;
        assert_eq!(prune_sessions(txn, 1000, &LIFETIMES, 100, false, never)?, SessionsPruned::default(), "none due");
        // The child stays active: a touch at 900 moves it to 1900.
        let mut child = session(txn, &key("child"))?.expect("child");
        keep_alive(txn, &mut child, 900, &LIFETIMES)?;
        let pass = prune_sessions(txn, 1001, &LIFETIMES, 100, false, never)?;
        assert_eq!(pass, SessionsPruned { removed: 1, postponed: 1 }, "lone goes, root waits for its child");
        assert!(session(txn, &key("lone"))?.is_none());
        assert!(claim_revocation(txn, &key("lone"), "s1")?, "its revocation claims went with it");
        assert!(subtree(txn, &[key("root")])?.contains(&key("child")), "a revocation of root still reaches it");
        // The child expires, then its parent (looked at again when the child was due).
        assert_eq!(prune_sessions(txn, 1900, &LIFETIMES, 100, false, never)?.removed, 2);
        assert!(touches(txn, &key("child"))?.is_empty(), "its touches went with it");
        assert!(subtree(txn, &[key("root")])?.len() == 1, "and its edge");
        assert!(sessions_of_user(txn, IDP, &SubjectId::email("u@x"))?.is_empty(), "user index emptied");
        // A revoked session stays for its retention, and while in use.
        let mut revoked = record("revoked", None, "u@x");
        revoked.revoked = Some(Revocation { txn: "t".into(), at_ms: 2000 });
        insert_session(txn, &mut revoked, 2000, &LIFETIMES)?;
        assert_eq!(prune_sessions(txn, 6999, &LIFETIMES, 100, false, never)?, SessionsPruned::default());
        let in_use = prune_sessions(txn, 7000, &LIFETIMES, 100, false, |_| Ok(true))?;
        assert_eq!(in_use.postponed, 1, "kept while its cascade is dispatched");
        assert_eq!(prune_sessions(txn, 7000 + RECHECK_MS, &LIFETIMES, 100, false, never)?.removed, 1);
        // An absolute end comes before the idle one.
        let mut ending = record("ending", None, "u@x");
        ending.expires_at_ms = Some(100_050);
        insert_session(txn, &mut ending, 100_000, &LIFETIMES)?;
        assert!(session(txn, &key("ending"))?.is_some_and(|r| r.ended(100_050)));
        assert_eq!(prune_sessions(txn, 100_050, &LIFETIMES, 100, false, never)?.removed, 1);
        Ok(())
    };
    store.write(Commit::Durable, move |txn| scenario(txn)).await.expect("scenario");
}

#[test]
fn users_are_disclosed_only_to_who_showed_they_knew() {
    let alice = SubjectId::email("alice@x");
    let by_idp = Touch { by_idp: true, ..at(1) };
    let named = Touch { named_user: Some(SubjectId::email("ALICE@x")), ..at(1) };
    let other = Touch { named_user: Some(SubjectId::email("bob@x")), ..at(1) };
    assert!(by_idp.discloses(Some(&alice)));
    assert!(named.discloses(Some(&alice)));
    assert!(!other.discloses(Some(&alice)));
    assert!(!at(1).discloses(Some(&alice)));
    assert!(!by_idp.discloses(None));
}

#[test]
fn session_keys_do_not_collide_across_formats_or_issuers() {
    assert_eq!(local_session_id(&SubjectId::opaque("S1")), "S1");
    let jwt = SubjectId::JwtId { iss: "i".into(), jti: "S1".into() };
    assert_ne!(session_key(IDP, &jwt), session_key(IDP, &SubjectId::opaque("S1")));
    assert_ne!(session_key("https://a", &SubjectId::opaque("S1")), session_key("https://b", &SubjectId::opaque("S1")));
    assert_ne!(user_key("https://a", &SubjectId::email("u@x")), user_key("https://b", &SubjectId::email("u@x")));
}
