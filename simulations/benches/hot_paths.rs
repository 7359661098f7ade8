//! Hot paths of a revocation cascade, with criterion: ES256 signing of one
//! SET, the subtree walk over a 1,000-session agent tree in redb, and the
//! durable outbox commit of 256 signed SETs.
//! Run: `cargo bench -p caep-simulations --bench hot_paths`.

use std::hint::black_box;
use std::sync::Arc;

use caep_hub::graph::{self, SessionRecord};
use caep_schemas::event::{Event, SessionRevoked};
use caep_schemas::jose::{Algorithm, SigningKey};
use caep_schemas::set::{SecurityEventToken, new_id};
use caep_schemas::subject::SubjectId;
use caep_transmitter::outbox::{NewSet, NoSink, Outbox};
use caep_transmitter::store::{Commit, Store};
use criterion::{Criterion, criterion_group, criterion_main};

fn revocation(session: &str) -> SecurityEventToken {
    SecurityEventToken::new(
        "https://hub.bench.example",
        "https://rp.bench.example",
        SubjectId::session_of(SubjectId::opaque(session), Some(SubjectId::email("owner@bench.example"))),
        Event::SessionRevoked(SessionRevoked::default()),
    )
    .with_txn("bench-txn")
}

fn signing(c: &mut Criterion) {
    let key = SigningKey::generate(Algorithm::Es256).expect("key");
    let set = revocation("agent-session-42");
    c.bench_function("sign one session-revoked SET (ES256)", |b| b.iter(|| black_box(set.sign(&key).expect("sign"))));
}

/// A 1,000-session tree: root, 9 children, 110 grandchildren each.
fn tree_sessions() -> Vec<SessionRecord> {
    let record = |id: String, parent: Option<String>| SessionRecord {
        subject: SubjectId::opaque(id.clone()),
        session_id: id,
        issuer: "https://idp.bench.example".into(),
        user: Some(SubjectId::email("owner@bench.example")),
        parent,
        authority: None,
        established_at_ms: 0,
        revoked: None,
        last_active_ms: 0,
        expires_at_ms: None,
        prune_at_ms: None,
    };
    let mut sessions = vec![record("root".into(), None)];
    for c in 0..9 {
        let child = format!("c{c}");
        sessions.push(record(child.clone(), Some("root".into())));
        for g in 0..110 {
            sessions.push(record(format!("{child}-g{g}"), Some(child.clone())));
        }
    }
    sessions
}

fn graph_walk(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("graph.redb")).expect("store");
    let sessions = tree_sessions();
    assert_eq!(sessions.len(), 1000);
    runtime
        .block_on(store.write(Commit::Durable, move |txn| {
            for session in &sessions {
                graph::insert_session(txn, &mut session.clone(), 0, &graph::Lifetimes::DEFAULT)?;
            }
            Ok(())
        }))
        .expect("tree written");
    let roots = vec!["root".to_owned()];
    c.bench_function("subtree walk, 1,000-session tree (redb read)", |b| {
        b.iter(|| {
            let walked = store.read(|txn| graph::subtree_in(txn, &roots)).expect("walk");
            assert_eq!(walked.len(), 1000);
            black_box(walked)
        })
    });
}

fn outbox_commit(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("outbox.redb")).expect("store");
    let outbox = Outbox::new(store, Arc::new(NoSink));
    let key = SigningKey::generate(Algorithm::Es256).expect("key");
    let token = revocation("agent-session-42").sign(&key).expect("sign");
    let mut group = c.benchmark_group("outbox");
    group.sample_size(20);
    group.bench_function("durable commit of 256 signed SETs", |b| {
        b.iter(|| {
            let sets: Vec<NewSet> = (0..256)
                .map(|i| NewSet {
                    stream_id: format!("stream-{}", i % 10),
                    jti: new_id(),
                    token: token.clone(),
                    txn: Some("bench-txn".into()),
                })
                .collect();
            runtime.block_on(outbox.enqueue(sets)).expect("enqueue");
        })
    });
    group.finish();
}

criterion_group!(benches, signing, graph_walk, outbox_commit);
criterion_main!(benches);
