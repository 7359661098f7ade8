//! Revocation cascades end to end: a simulated IdP (its own ES256 key,
//! registered at `POST /admin/issuers`) pushes signed SETs to the hub's
//! `/ingest`; real relying parties receive the hub's SETs by push (scripted
//! recorders on loopback) or poll (RFC 8936 with acknowledgement), and every
//! SET is verified against the hub's JWKS with the RP's own audience.

#[macro_use]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use caep_schemas::event::event_type;
use caep_schemas::jose::{Algorithm, SigningKey};
use caep_schemas::set::{SET_TYP, SecurityEventToken, now_secs};
use reqwest::Method;
use serde_json::{Map, Value, json};
use support::{Body, CREDENTIAL_CHANGE, Hub, Reply, SESSION_REVOKED};

use support::actors::*;

#[path = "cascade/forged_sets.rs"]
mod forged_sets;
use forged_sets::*;

// ---------------------------------------------------------------- 1. exact leaf set

async fn revoking_a_session_reaches_exactly_its_subtree_touches_and_all_streams(hub: Hub) {
    let idp = Idp::register(&hub, IDP).await;
    let alice = email("alice@example.com");
    let bob = email("bob@example.com");

    // R → {A, B}, A → {A1, A2}, A1 → {A1a}, B → {B1}; X → {X1} (bob).
    for (id, parent) in
        [("R", None), ("A", Some("R")), ("B", Some("R")), ("A1", Some("A")), ("A2", Some("A")), ("A1a", Some("A1"))]
    {
        idp.establish(&hub, id, &alice, parent).await;
    }
    idp.establish(&hub, "B1", &alice, Some("B")).await;
    idp.establish(&hub, "X", &bob, None).await;
    idp.establish(&hub, "X1", &bob, Some("X")).await;

    let pusher = Relying::new(&hub, "pusher", true, &[SESSION_REVOKED], false).await;
    let poller = Relying::new(&hub, "poller", false, &[SESSION_REVOKED, CREDENTIAL_CHANGE], false).await;
    let everything = Relying::new(&hub, "everything", true, &[SESSION_REVOKED], true).await;
    let uninterested = Relying::new(&hub, "uninterested", false, &[CREDENTIAL_CHANGE], false).await;

    pusher.add_subject(&hub, "A1").await;
    pusher.add_subject(&hub, "B1").await;
    idp.presented(&hub, "R", &alice, &pusher.rp.audience).await;
    idp.presented(&hub, "A", &alice, &poller.rp.audience).await;
    poller.add_subject(&hub, "A1a").await;
    poller.add_subject(&hub, "A2").await;
    idp.presented(&hub, "X1", &bob, &poller.rp.audience).await;
    everything.add_subject(&hub, "X").await;
    uninterested.add_subject(&hub, "A").await;
    idp.presented(&hub, "A1", &alice, &uninterested.rp.audience).await;
    idp.presented(&hub, "A1a", &alice, &uninterested.rp.audience).await;

    // Nothing is sent before a revocation.
    for rp in [&pusher, &poller, &everything, &uninterested] {
        assert!(rp.received(&hub).await.is_empty(), "{} got a SET before any revocation", rp.name);
    }

    let event_timestamp = now_secs() - 30;
    let reason = "Agent exceeded its delegated scope";
    let payload = json!({
        "event_timestamp": event_timestamp,
        "initiating_entity": "policy",
        "reason_admin": {"en": reason},
    });
    let revoke = idp.set(session_of("A", &alice), SESSION_REVOKED, payload).with_txn("txn-A");
    idp.send(&hub, &revoke).await;

    let pusher_sets = pusher.settle(&hub, 1).await;
    let poller_sets = poller.settle(&hub, 3).await;
    let everything_sets = everything.settle(&hub, 4).await;
    let uninterested_sets = uninterested.settle(&hub, 0).await;
    assert!(uninterested_sets.is_empty());

    let expected = pairs_of(&[
        (&pusher, "A1"),
        (&poller, "A"),
        (&poller, "A2"),
        (&poller, "A1a"),
        (&everything, "A"),
        (&everything, "A1"),
        (&everything, "A2"),
        (&everything, "A1a"),
    ]);
    let got = received_pairs(&[
        (&pusher, &pusher_sets),
        (&poller, &poller_sets),
        (&everything, &everything_sets),
        (&uninterested, &uninterested_sets),
    ]);
    assert_eq!(got.keys().cloned().collect::<BTreeSet<_>>(), expected);

    let all_sets = pusher_sets.iter().map(|set| (&pusher, set));
    let all_sets = all_sets.chain(poller_sets.iter().map(|set| (&poller, set)));
    for (rp, set) in all_sets.chain(everything_sets.iter().map(|set| (&everything, set))) {
        let id = session_id(set);
        // The user goes to the operator's ALL stream and where the IdP presented the session.
        let knows_user = rp.name == "everything" || (rp.name == "poller" && id == "A");
        assert_revoked_set(set, &id, knows_user.then_some(&alice), "txn-A");
        let payload = set.event.payload();
        assert_eq!(payload["event_timestamp"], event_timestamp, "{payload}");
        assert_eq!(payload["initiating_entity"], "policy", "{payload}");
        assert_eq!(payload["reason_admin"], json!({"en": reason}), "{payload}");
    }

    // The cascade report: the same leaves, all delivered, with latencies.
    let report = complete_cascade(&hub, "txn-A", 8).await;
    let leaves = check_report(&report, "txn-A", 8);
    assert_eq!(leaves, got, "the report's leaves are not what the RPs received");
    // The summary: the same figures without the leaves; a bad flag is refused.
    let summary = hub.admin(Method::GET, "/admin/cascades/txn-A?leaves=false", Body::None).await.expect(200).json();
    assert!(summary.get("leaves").is_none(), "{summary:#}");
    for field in ["txn", "total", "delivered", "failed", "complete", "p50_ms", "p99_ms", "cascade_ms"] {
        assert_eq!(summary[field], report[field], "{field}: {summary:#}");
    }
    hub.admin(Method::GET, "/admin/cascades/txn-A?leaves=maybe", Body::None).await.expect(400);

    // The graph: the subtree revoked by txn-A, the rest untouched.
    for id in ["A", "A1", "A2", "A1a"] {
        assert_revoked_by(&hub, id, "txn-A").await;
    }
    for id in ["R", "B", "B1", "X", "X1"] {
        assert_not_revoked(&hub, id).await;
    }
    let view = session_view(&hub, "A1a").await;
    assert_eq!(view["session"]["session_id"], "A1a", "{view:#}");
    assert_eq!(view["session"]["parent"], "A1", "{view:#}");
    let touched: BTreeSet<&str> =
        view["touches"].as_array().expect("touches").iter().map(|t| t["stream_id"].as_str().expect("id")).collect();
    assert_eq!(touched, [poller.stream_id.as_str(), uninterested.stream_id.as_str()].into_iter().collect());
    let view = session_view(&hub, "A").await;
    let subtree: BTreeSet<&str> =
        view["subtree"].as_array().expect("subtree").iter().map(|s| s["session_id"].as_str().expect("id")).collect();
    assert_eq!(subtree, ["A", "A1", "A2", "A1a"].into_iter().collect(), "{view:#}");
    hub.admin(Method::GET, "/admin/sessions/nope", Body::None).await.expect(404);
    hub.admin(Method::GET, "/admin/cascades/no-such-txn", Body::None).await.expect(404);
}

// ---------------------------------------------------------------- 2. user-level revocation

async fn revoking_a_user_revokes_all_and_only_that_users_sessions(hub: Hub) {
    let idp = Idp::register(&hub, IDP).await;
    let alice = email("alice@example.com");
    let bob = email("bob@example.com");
    let carol = iss_sub("carol");
    let dave = iss_sub("dave");

    idp.establish(&hub, "U1", &alice, None).await;
    idp.establish(&hub, "U1a", &alice, Some("U1")).await;
    idp.establish(&hub, "U2", &alice, None).await;
    idp.establish(&hub, "V1", &bob, None).await;
    idp.establish(&hub, "W1", &carol, None).await;
    idp.establish(&hub, "W1a", &carol, Some("W1")).await;
    idp.establish(&hub, "W2", &carol, None).await;
    idp.establish(&hub, "Z1", &dave, None).await;

    let everything = Relying::new(&hub, "everything", true, &[SESSION_REVOKED], true).await;
    let poller = Relying::new(&hub, "poller", false, &[SESSION_REVOKED], false).await;
    for id in ["U1a", "V1", "W2", "Z1"] {
        poller.add_subject(&hub, id).await;
    }

    // session-revoked about a user only: every session of alice, two roots.
    let payload = json!({"initiating_entity": "admin", "reason_admin": {"en": "offboarded"}});
    let user_only = json!({"format": "complex", "user": alice});
    idp.send(&hub, &idp.set(user_only, SESSION_REVOKED, payload).with_txn("txn-alice")).await;

    let everything_sets = everything.settle(&hub, 3).await;
    let poller_sets = poller.settle(&hub, 1).await;
    assert_eq!(by_session(&everything_sets).keys().cloned().collect::<BTreeSet<_>>(), ids(&["U1", "U1a", "U2"]));
    assert_eq!(by_session(&poller_sets).keys().cloned().collect::<BTreeSet<_>>(), ids(&["U1a"]));
    for set in everything_sets.iter().chain(&poller_sets) {
        let knows_user = everything_sets.iter().any(|s| s.jti == set.jti);
        assert_revoked_set(set, &session_id(set), knows_user.then_some(&alice), "txn-alice");
        assert_eq!(set.event.payload()["initiating_entity"], "admin");
        assert_eq!(set.event.payload()["reason_admin"], json!({"en": "offboarded"}));
    }
    for id in ["U1", "U1a", "U2"] {
        assert_revoked_by(&hub, id, "txn-alice").await;
    }
    for id in ["V1", "W1", "W1a", "W2", "Z1"] {
        assert_not_revoked(&hub, id).await;
    }
    check_report(&complete_cascade(&hub, "txn-alice", 4).await, "txn-alice", 4);

    // RISC account-disabled about an iss_sub user: the same, with its txn.
    let disabled =
        idp.set(carol.clone(), event_type::ACCOUNT_DISABLED, json!({"reason": "hijacking"})).with_txn("txn-carol");
    idp.send(&hub, &disabled).await;

    let everything_sets = everything.settle(&hub, 6).await;
    let poller_sets = poller.settle(&hub, 2).await;
    let carol_sets: Vec<&SecurityEventToken> =
        everything_sets.iter().chain(&poller_sets).filter(|s| s.txn.as_deref() == Some("txn-carol")).collect();
    assert_eq!(carol_sets.len(), 4, "{carol_sets:#?}");
    let mut carol_pairs = BTreeSet::new();
    for set in &carol_sets {
        let from_everything = everything_sets.iter().any(|s| s.jti == set.jti);
        assert_revoked_set(set, &session_id(set), from_everything.then_some(&carol), "txn-carol");
        carol_pairs.insert((from_everything, session_id(set)));
    }
    let expected: BTreeSet<(bool, String)> =
        [(true, "W1"), (true, "W1a"), (true, "W2"), (false, "W2")].map(|(e, id)| (e, id.to_owned())).into();
    assert_eq!(carol_pairs, expected);
    for id in ["W1", "W1a", "W2"] {
        assert_revoked_by(&hub, id, "txn-carol").await;
    }
    for id in ["V1", "Z1"] {
        assert_not_revoked(&hub, id).await;
    }
    check_report(&complete_cascade(&hub, "txn-carol", 4).await, "txn-carol", 4);

    // RISC credential-compromise about an email user.
    let compromise = idp.set(bob.clone(), event_type::CREDENTIAL_COMPROMISE, json!({"credential_type": "password"}));
    idp.send(&hub, &compromise.with_txn("txn-bob")).await;
    let everything_sets = everything.settle(&hub, 7).await;
    let poller_sets = poller.settle(&hub, 3).await;
    let bob_sets: Vec<&SecurityEventToken> =
        everything_sets.iter().chain(&poller_sets).filter(|s| s.txn.as_deref() == Some("txn-bob")).collect();
    assert_eq!(bob_sets.len(), 2, "{bob_sets:#?}");
    for set in bob_sets {
        assert_revoked_set(set, "V1", everything_sets.iter().any(|s| s.jti == set.jti).then_some(&bob), "txn-bob");
    }
    assert_revoked_by(&hub, "V1", "txn-bob").await;

    // RISC account-purged without a txn: one new txn for the whole cascade.
    idp.send(&hub, &idp.set(dave.clone(), event_type::ACCOUNT_PURGED, json!({}))).await;
    let everything_sets = everything.settle(&hub, 8).await;
    let poller_sets = poller.settle(&hub, 4).await;
    let dave_sets: Vec<&SecurityEventToken> =
        everything_sets.iter().chain(&poller_sets).filter(|s| session_id(s) == "Z1").collect();
    assert_eq!(dave_sets.len(), 2, "{dave_sets:#?}");
    let txn = dave_sets[0].txn.clone().expect("a txn");
    assert!(!txn.is_empty() && !["txn-alice", "txn-carol", "txn-bob"].contains(&txn.as_str()), "txn {txn}");
    for set in dave_sets {
        assert_revoked_set(set, "Z1", everything_sets.iter().any(|s| s.jti == set.jti).then_some(&dave), &txn);
    }
    assert_revoked_by(&hub, "Z1", &txn).await;
    check_report(&complete_cascade(&hub, &txn, 2).await, &txn, 2);
}

// ---------------------------------------------------------------- 3. late spawn, late touch

async fn sessions_born_or_touched_after_a_revocation_are_revoked_at_once(hub: Hub) {
    let idp = Idp::register(&hub, IDP).await;
    let alice = email("alice@example.com");
    for (id, parent) in [("R", None), ("A", Some("R")), ("A1", Some("A")), ("A2", Some("A"))] {
        idp.establish(&hub, id, &alice, parent).await;
    }
    let pusher = Relying::new(&hub, "pusher", true, &[SESSION_REVOKED], false).await;
    let late = Relying::new(&hub, "late", false, &[SESSION_REVOKED], false).await;
    let everything = Relying::new(&hub, "everything", true, &[SESSION_REVOKED], true).await;
    pusher.add_subject(&hub, "A1").await;

    let revoke = idp.set(session_of("A", &alice), SESSION_REVOKED, json!({"initiating_entity": "policy"}));
    idp.send(&hub, &revoke.with_txn("txn-A")).await;
    pusher.settle(&hub, 1).await;
    everything.settle(&hub, 3).await;
    late.settle(&hub, 0).await;
    check_report(&complete_cascade(&hub, "txn-A", 4).await, "txn-A", 4);

    // A3 spawned under the revoked A: revoked at birth, by txn-A; the
    // ALL stream learns of it at once.
    idp.establish(&hub, "A3", &alice, Some("A")).await;
    assert_revoked_by(&hub, "A3", "txn-A").await;
    // A grandchild under the born-revoked A3 too.
    idp.establish(&hub, "A3x", &alice, Some("A3")).await;
    assert_revoked_by(&hub, "A3x", "txn-A").await;
    assert_not_revoked(&hub, "R").await;
    let everything_sets = everything.settle(&hub, 5).await;
    let born: BTreeSet<String> = everything_sets.iter().map(session_id).collect();
    assert_eq!(born, ids(&["A", "A1", "A2", "A3", "A3x"]));
    for set in &everything_sets {
        assert_revoked_set(set, &session_id(set), Some(&alice), "txn-A");
    }
    check_report(&complete_cascade(&hub, "txn-A", 6).await, "txn-A", 6);

    // An RP touching A3 learns at once that it is revoked, in txn-A.
    late.add_subject(&hub, "A3").await;
    let late_sets = late.settle(&hub, 1).await;
    // It named the session alone, so it learns nothing of the user behind it.
    assert_revoked_set(&late_sets[0], "A3", None, "txn-A");
    assert_eq!(late_sets[0].event.payload()["initiating_entity"], "policy");
    check_report(&complete_cascade(&hub, "txn-A", 7).await, "txn-A", 7);

    // Its first touch of the already-revoked A2 (reported by the IdP) too.
    idp.presented(&hub, "A2", &alice, &late.rp.audience).await;
    let late_sets = late.settle(&hub, 2).await;
    let a2 = late_sets.iter().find(|s| session_id(s) == "A2").expect("revocation of A2");
    assert_revoked_set(a2, "A2", Some(&alice), "txn-A");

    // A second touch of the same pair sends nothing more.
    late.add_subject(&hub, "A3").await;
    late.add_subject(&hub, "A2").await;
    idp.presented(&hub, "A3", &alice, &late.rp.audience).await;
    late.settle(&hub, 2).await;
    pusher.settle(&hub, 1).await;
    everything.settle(&hub, 5).await;
    let report = complete_cascade(&hub, "txn-A", 8).await;
    let leaves = check_report(&report, "txn-A", 8);
    let expected = pairs_of(&[
        (&pusher, "A1"),
        (&everything, "A"),
        (&everything, "A1"),
        (&everything, "A2"),
        (&everything, "A3"),
        (&everything, "A3x"),
        (&late, "A3"),
        (&late, "A2"),
    ]);
    assert_eq!(leaves.keys().cloned().collect::<BTreeSet<_>>(), expected);
}

// ---------------------------------------------------------------- 4. replay

async fn a_replayed_idp_set_has_no_second_effect(hub: Hub) {
    let idp = Idp::register(&hub, IDP).await;
    let alice = email("alice@example.com");
    idp.establish(&hub, "R", &alice, None).await;
    idp.establish(&hub, "A", &alice, Some("R")).await;
    let pusher = Relying::new(&hub, "pusher", true, &[SESSION_REVOKED], false).await;
    let poller = Relying::new(&hub, "poller", false, &[SESSION_REVOKED], true).await;
    pusher.add_subject(&hub, "A").await;

    let token = idp.sign(&idp.set(session_of("A", &alice), SESSION_REVOKED, json!({})).with_txn("txn-replay"));
    ingest(&hub, &token).await.expect(202);
    pusher.settle(&hub, 1).await;
    poller.settle(&hub, 1).await;
    check_report(&complete_cascade(&hub, "txn-replay", 2).await, "txn-replay", 2);

    // The very same SET again: the same answer, nothing more.
    let again = ingest(&hub, &token).await.expect(202);
    assert!(again.text.is_empty(), "{}", again.text);
    pusher.settle(&hub, 1).await;
    poller.settle(&hub, 1).await;
    check_report(&complete_cascade(&hub, "txn-replay", 2).await, "txn-replay", 2);

    // A replayed establish of A (an IdP retry) does not un-revoke it.
    let establish =
        idp.set(session_of("A", &alice), event_type::SESSION_ESTABLISHED, json!({"parent_session": session("R")}));
    let establish = idp.sign(&establish);
    ingest(&hub, &establish).await.expect(202);
    ingest(&hub, &establish).await.expect(202);
    assert_revoked_by(&hub, "A", "txn-replay").await;

    // A new SET revoking the already revoked A: no second round of leaves.
    idp.send(&hub, &idp.set(session_of("A", &alice), SESSION_REVOKED, json!({})).with_txn("txn-again")).await;
    pusher.settle(&hub, 1).await;
    poller.settle(&hub, 1).await;
    assert_revoked_by(&hub, "A", "txn-replay").await;
    check_report(&complete_cascade(&hub, "txn-replay", 2).await, "txn-replay", 2);
}

// ---------------------------------------------------------------- 6. race

async fn no_leaf_escapes_a_revocation_racing_spawns_and_touches(hub: Hub) {
    const CHILDREN: usize = 50;
    let hub = Arc::new(hub);
    let idp = Arc::new(Idp::register(&hub, IDP).await);
    let alice = email("alice@example.com");
    for (id, parent) in [("R", None), ("R-a", Some("R")), ("R-b", Some("R")), ("R-a-1", Some("R-a"))] {
        idp.establish(&hub, id, &alice, parent).await;
    }
    let parents = ["R", "R-a", "R-b", "R-a-1"];
    let pusher = Arc::new(Relying::new(&hub, "pusher", true, &[SESSION_REVOKED], false).await);
    let poller = Arc::new(Relying::new(&hub, "poller", false, &[SESSION_REVOKED], false).await);
    let child = |i: usize| format!("C{i:02}");

    // Child i is spawned under a node of R's tree and touched by one RP,
    // half by add-subject, half by the IdP's session-presented.
    let mut tasks = Vec::new();
    let mut touched_by: BTreeMap<String, Arc<Relying>> = BTreeMap::new();
    for i in 0..CHILDREN {
        let (hub_s, idp_s, id, user, parent) =
            (Arc::clone(&hub), Arc::clone(&idp), child(i), alice.clone(), parents[i % parents.len()]);
        tasks.push(tokio::spawn(async move { idp_s.establish(&hub_s, &id, &user, Some(parent)).await }));
        let rp = if i % 2 == 0 { Arc::clone(&pusher) } else { Arc::clone(&poller) };
        touched_by.insert(child(i), Arc::clone(&rp));
        let (hub_t, idp_t, id, user) = (Arc::clone(&hub), Arc::clone(&idp), child(i), alice.clone());
        tasks.push(tokio::spawn(async move {
            if i % 4 < 2 {
                rp.add_subject(&hub_t, &id).await;
            } else {
                idp_t.presented(&hub_t, &id, &user, &rp.rp.audience).await;
            }
        }));
        if i == CHILDREN / 2 {
            let (hub_r, idp_r, user) = (Arc::clone(&hub), Arc::clone(&idp), alice.clone());
            tasks.push(tokio::spawn(async move {
                let revoke = idp_r.set(session_of("R", &user), SESSION_REVOKED, json!({})).with_txn("txn-race");
                idp_r.send(&hub_r, &revoke).await;
            }));
        }
    }
    let all = async {
        for task in tasks {
            task.await.expect("task");
        }
    };
    tokio::time::timeout(Duration::from_secs(15), all).await.expect("spawns, touches and the revocation finish");

    // Every session under R is revoked, by the one cascade.
    for id in parents.iter().map(|p| (*p).to_owned()).chain((0..CHILDREN).map(child)) {
        assert_revoked_by(&hub, &id, "txn-race").await;
    }
    let view = session_view(&hub, "R").await;
    assert_eq!(view["subtree"].as_array().map(Vec::len), Some(parents.len() + CHILDREN), "{view:#}");

    // Every (touching stream, child) pair got exactly one revocation.
    let pusher_sets = pusher.settle(&hub, CHILDREN / 2).await;
    let poller_sets = poller.settle(&hub, CHILDREN / 2).await;
    for (rp, sets) in [(&pusher, &pusher_sets), (&poller, &poller_sets)] {
        let got = by_session(sets);
        let expected: BTreeSet<String> =
            touched_by.iter().filter(|(_, by)| by.stream_id == rp.stream_id).map(|(id, _)| id.clone()).collect();
        assert_eq!(got.keys().cloned().collect::<BTreeSet<_>>(), expected, "{}", rp.name);
        for (id, jtis) in &got {
            assert_eq!(jtis.len(), 1, "{} got {} revocations of {id}", rp.name, jtis.len());
        }
        for set in sets.iter() {
            let id = session_id(set);
            let i: usize = id.trim_start_matches('C').parse().expect("child index");
            // Touched by add-subject (session only) or presented by the IdP.
            assert_revoked_set(set, &id, (i % 4 >= 2).then_some(&alice), "txn-race");
        }
    }
    let got = received_pairs(&[(&pusher, &pusher_sets), (&poller, &poller_sets)]);
    let leaves = check_report(&complete_cascade(&hub, "txn-race", CHILDREN as u64).await, "txn-race", CHILDREN as u64);
    assert_eq!(leaves, got);
}

// ---------------------------------------------------------------- 7. forwarding

async fn other_caep_events_reach_the_streams_that_touched_the_session_or_its_descendants(hub: Hub) {
    let idp = Idp::register(&hub, IDP).await;
    let alice = email("alice@example.com");
    for (id, parent) in [("F", None), ("F1", Some("F")), ("F1a", Some("F1")), ("F2", Some("F"))] {
        idp.establish(&hub, id, &alice, parent).await;
    }
    let both = [SESSION_REVOKED, CREDENTIAL_CHANGE];
    let on_f1 = Relying::new(&hub, "on-f1", true, &both, false).await;
    let on_f1a = Relying::new(&hub, "on-f1a", false, &[CREDENTIAL_CHANGE], false).await;
    let on_parent = Relying::new(&hub, "on-parent", true, &[CREDENTIAL_CHANGE], false).await;
    let revocations_only = Relying::new(&hub, "revocations-only", true, &[SESSION_REVOKED], false).await;
    let on_sibling = Relying::new(&hub, "on-sibling", false, &[CREDENTIAL_CHANGE], false).await;
    let everything = Relying::new(&hub, "everything", true, &both, true).await;
    on_f1.add_subject(&hub, "F1").await;
    idp.presented(&hub, "F1a", &alice, &on_f1a.rp.audience).await;
    on_parent.add_subject(&hub, "F").await;
    revocations_only.add_subject(&hub, "F1").await;
    on_sibling.add_subject(&hub, "F2").await;

    let event_timestamp = now_secs() - 5;
    let payload = json!({
        "credential_type": "fido2-roaming",
        "change_type": "revoke",
        "friendly_name": "Alice's key",
        "initiating_entity": "user",
        "event_timestamp": event_timestamp,
    });
    let change = idp.set(session_of("F1", &alice), CREDENTIAL_CHANGE, payload.clone()).with_txn("txn-cc");
    idp.send(&hub, &change).await;

    let on_f1_sets = on_f1.settle(&hub, 1).await;
    let on_f1a_sets = on_f1a.settle(&hub, 1).await;
    let everything_sets = everything.settle(&hub, 2).await;
    let nothing =
        [on_parent.settle(&hub, 0).await, revocations_only.settle(&hub, 0).await, on_sibling.settle(&hub, 0).await];
    assert!(nothing.iter().all(Vec::is_empty));

    let got = received_pairs(&[(&on_f1, &on_f1_sets), (&on_f1a, &on_f1a_sets), (&everything, &everything_sets)]);
    let expected = pairs_of(&[(&on_f1, "F1"), (&on_f1a, "F1a"), (&everything, "F1"), (&everything, "F1a")]);
    assert_eq!(got.keys().cloned().collect::<BTreeSet<_>>(), expected);
    for set in on_f1_sets.iter().chain(&on_f1a_sets).chain(&everything_sets) {
        assert_eq!(set.event.type_uri(), CREDENTIAL_CHANGE);
        // on-f1 named the session alone: it is not told whose it is.
        let expected = if on_f1_sets.iter().any(|s| s.jti == set.jti) {
            json!({"format": "complex", "session": session(&session_id(set))})
        } else {
            session_of(&session_id(set), &alice)
        };
        assert_eq!(set.sub_id.to_value(), expected);
        assert_eq!(set.txn.as_deref(), Some("txn-cc"));
        assert_eq!(set.event.payload(), payload, "the IdP's event is carried as is");
    }
    let leaves = check_report(&complete_cascade(&hub, "txn-cc", 4).await, "txn-cc", 4);
    assert_eq!(leaves, got);
    for id in ["F", "F1", "F1a", "F2"] {
        assert_not_revoked(&hub, id).await;
    }
}

// ---------------------------------------------------------------- 8. one SET per (stream, session)

// Guards: one session-revoked per (stream, session), ever. A stream granted
// every subject was told by the cascade without a touch being recorded; its
// later touch of the revoked session must not send a second SET.
async fn an_all_subjects_stream_touching_a_revoked_session_is_not_told_twice(hub: Hub) {
    let idp = Idp::register(&hub, IDP).await;
    let alice = email("alice@example.com");
    for (id, parent) in [("R", None), ("A", Some("R")), ("A1", Some("A"))] {
        idp.establish(&hub, id, &alice, parent).await;
    }
    let everything = Relying::new(&hub, "everything", true, &[SESSION_REVOKED], true).await;
    let poller = Relying::new(&hub, "poller", false, &[SESSION_REVOKED], false).await;
    poller.add_subject(&hub, "A1").await;

    idp.send(&hub, &idp.set(session_of("A", &alice), SESSION_REVOKED, json!({})).with_txn("txn-A")).await;
    everything.settle(&hub, 2).await;
    poller.settle(&hub, 1).await;
    check_report(&complete_cascade(&hub, "txn-A", 3).await, "txn-A", 3);

    // The ALL stream's RP now reports that A1 and A reached it: it knows already.
    everything.add_subject(&hub, "A1").await;
    idp.presented(&hub, "A", &alice, &everything.rp.audience).await;
    let sets = everything.settle(&hub, 2).await;
    let got = by_session(&sets);
    assert_eq!(got.keys().cloned().collect::<BTreeSet<_>>(), ids(&["A", "A1"]));
    assert!(got.values().all(|jtis| jtis.len() == 1), "one session-revoked per (stream, session): {got:?}");
    check_report(&complete_cascade(&hub, "txn-A", 3).await, "txn-A", 3);
}

// ---------------------------------------------------------------- 9. out-of-order establishes

// Guards: push delivery is unordered (RFC 8935), so a sub-agent session may
// be established before its parent. When the parent is then established
// under a revoked ancestor, the whole subtree established earlier is revoked
// with it and its RPs are told.
async fn a_session_established_before_its_parent_inherits_the_parents_revocation(hub: Hub) {
    let idp = Idp::register(&hub, IDP).await;
    let alice = email("alice@example.com");
    idp.establish(&hub, "R", &alice, None).await;
    let everything = Relying::new(&hub, "everything", true, &[SESSION_REVOKED], true).await;
    let poller = Relying::new(&hub, "poller", false, &[SESSION_REVOKED], false).await;

    // P's children arrive before P itself: C1 before the revocation, C2 after.
    idp.establish(&hub, "C1", &alice, Some("P")).await;
    poller.add_subject(&hub, "C1").await;
    idp.send(&hub, &idp.set(session_of("R", &alice), SESSION_REVOKED, json!({})).with_txn("txn-R")).await;
    everything.settle(&hub, 1).await;
    idp.establish(&hub, "C2", &alice, Some("P")).await;
    poller.add_subject(&hub, "C2").await;
    // P, under the revoked R, is revoked at birth, and so is all of its subtree.
    idp.establish(&hub, "P", &alice, Some("R")).await;
    assert_revoked_by(&hub, "P", "txn-R").await;
    let view = session_view(&hub, "P").await;
    let subtree: BTreeSet<&str> =
        view["subtree"].as_array().expect("subtree").iter().map(|s| s["session_id"].as_str().expect("id")).collect();
    assert_eq!(subtree, ["P", "C1", "C2"].into_iter().collect(), "{view:#}");
    for id in ["C1", "C2"] {
        let revocation = revoked(&hub, id).await;
        assert!(
            revocation.as_ref().is_some_and(|r| r["txn"] == "txn-R"),
            "{id}, a child of the revoked P, escaped the revocation: {:#}",
            session_view(&hub, id).await
        );
    }
    let everything_sets = everything.settle(&hub, 4).await;
    assert_eq!(by_session(&everything_sets).keys().cloned().collect::<BTreeSet<_>>(), ids(&["R", "P", "C1", "C2"]));
    let poller_sets = poller.settle(&hub, 2).await;
    assert_eq!(by_session(&poller_sets).keys().cloned().collect::<BTreeSet<_>>(), ids(&["C1", "C2"]));
    for set in &everything_sets {
        assert_revoked_set(set, &session_id(set), Some(&alice), "txn-R");
    }
    for set in &poller_sets {
        assert_revoked_set(set, &session_id(set), None, "txn-R");
    }
}

// ---------------------------------------------------------------- 10. one txn, several events

// Guards: SETs with one cause share a `txn` (SSF), so one cascade may carry
// several events: each leaf goes out as the event that caused it (a
// credential-change as itself, a session-revoked as itself), in either order.
async fn events_sharing_one_idp_txn_keep_their_own_type(hub: Hub) {
    let idp = Idp::register(&hub, IDP).await;
    let alice = email("alice@example.com");
    idp.establish(&hub, "A", &alice, None).await;
    idp.establish(&hub, "B", &alice, None).await;
    let rp = Relying::new(&hub, "rp", true, &[SESSION_REVOKED, CREDENTIAL_CHANGE], false).await;
    rp.add_subject(&hub, "A").await;
    rp.add_subject(&hub, "B").await;
    let change = json!({"credential_type": "password", "change_type": "revoke", "initiating_entity": "system"});

    // One incident about A: its credential is revoked, then its session.
    idp.send(&hub, &idp.set(session_of("A", &alice), CREDENTIAL_CHANGE, change.clone()).with_txn("incident-A")).await;
    rp.settle(&hub, 1).await;
    let revoke = json!({"initiating_entity": "policy", "reason_admin": {"en": "credential revoked"}});
    idp.send(&hub, &idp.set(session_of("A", &alice), SESSION_REVOKED, revoke.clone()).with_txn("incident-A")).await;
    // The other order about B.
    idp.send(&hub, &idp.set(session_of("B", &alice), SESSION_REVOKED, revoke.clone()).with_txn("incident-B")).await;
    rp.settle(&hub, 3).await;
    idp.send(&hub, &idp.set(session_of("B", &alice), CREDENTIAL_CHANGE, change.clone()).with_txn("incident-B")).await;

    let sets = rp.settle(&hub, 4).await;
    let mut kinds: Vec<(String, String, String)> = sets
        .iter()
        .map(|s| (session_id(s), s.event.type_uri().to_owned(), s.txn.clone().unwrap_or_default()))
        .collect();
    kinds.sort();
    let mut expected: Vec<(String, String, String)> = [
        ("A", CREDENTIAL_CHANGE, "incident-A"),
        ("A", SESSION_REVOKED, "incident-A"),
        ("B", SESSION_REVOKED, "incident-B"),
        ("B", CREDENTIAL_CHANGE, "incident-B"),
    ]
    .map(|(id, kind, txn)| (id.to_owned(), kind.to_owned(), txn.to_owned()))
    .into();
    expected.sort();
    assert_eq!(kinds, expected, "each event reaches the RP as itself");
    for set in &sets {
        let want = if set.event.type_uri() == SESSION_REVOKED { &revoke } else { &change };
        assert_eq!(set.event.payload()["initiating_entity"], want["initiating_entity"], "{set:?}");
    }
}

// ---------------------------------------------------------------- batch touches

/// The add-many extension touches every session it names, as one add-subject
/// each would; another receiver's stream is 404 and a bad batch adds nothing.
async fn a_batch_of_touches_counts_as_each_touch(hub: Hub) {
    let idp = Idp::register(&hub, IDP).await;
    let alice = email("alice@example.com");
    for (id, parent) in [("B", None), ("B1", Some("B")), ("B2", Some("B")), ("C", None)] {
        idp.establish(&hub, id, &alice, parent).await;
    }
    let rp = Relying::new(&hub, "batcher", true, &[SESSION_REVOKED], false).await;
    let other = Relying::new(&hub, "other", false, &[SESSION_REVOKED], false).await;
    let many = hub.metadata["add_subjects_endpoint"].as_str().expect("the extension is advertised").to_owned();
    let subjects = |ids: &[&str]| -> Vec<Value> {
        ids.iter().map(|id| json!({"format": "complex", "session": {"format": "opaque", "id": id}})).collect()
    };
    let body = json!({"stream_id": rp.stream_id, "subjects": subjects(&["B1", "B2", "C"])});
    hub.post(&many, &rp.rp.token, body).await.expect(200);
    let stolen = json!({"stream_id": rp.stream_id, "subjects": subjects(&["B"])});
    assert_eq!(hub.post(&many, &other.rp.token, stolen).await.status, 404, "another receiver's stream");
    let bad = json!({"stream_id": rp.stream_id, "subjects": [subjects(&["B"])[0].clone(), {"format": "x-bogus"}]});
    assert_eq!(hub.post(&many, &rp.rp.token, bad).await.status, 400);
    for id in ["B1", "B2", "C"] {
        let touched = session_view(&hub, id).await["touches"].as_array().map(Vec::len);
        assert_eq!(touched, Some(1), "{id} touched once");
    }
    assert_eq!(
        session_view(&hub, "B").await["touches"].as_array().map(Vec::len),
        Some(0),
        "the refused batch added nothing"
    );

    let revoke = idp.set(session_of("B", &alice), SESSION_REVOKED, json!({}));
    idp.send(&hub, &revoke.with_txn("txn-B")).await;
    let sets = rp.settle(&hub, 2).await;
    let revoked: BTreeSet<String> = sets.iter().map(session_id).collect();
    assert_eq!(revoked, ids(&["B1", "B2"]), "the batch's touches under B, and not C");
    other.settle(&hub, 0).await;
}

// ---------------------------------------------------------------- both backends

on_every_backend!(
    a_batch_of_touches_counts_as_each_touch,
    revoking_a_session_reaches_exactly_its_subtree_touches_and_all_streams,
    revoking_a_user_revokes_all_and_only_that_users_sessions,
    sessions_born_or_touched_after_a_revocation_are_revoked_at_once,
    a_replayed_idp_set_has_no_second_effect,
    forged_and_malformed_idp_sets_are_refused_and_change_nothing,
    no_leaf_escapes_a_revocation_racing_spawns_and_touches,
    other_caep_events_reach_the_streams_that_touched_the_session_or_its_descendants,
    an_all_subjects_stream_touching_a_revoked_session_is_not_told_twice,
    a_session_established_before_its_parent_inherits_the_parents_revocation,
    events_sharing_one_idp_txn_keep_their_own_type,
);
