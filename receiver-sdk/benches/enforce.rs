//! The enforcement layer's cost: one check against a store holding 100,000
//! revoked sessions (for a token seen before, as agents reuse their access
//! tokens, and for one not seen lately), and a hello-world axum service with
//! and without the layer (in process, so the ratio is the layer's share of
//! the work).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Request, header};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use caep_receiver::Revocations;
use caep_receiver::guard::EnforceLayer;
use criterion::{Criterion, criterion_group, criterion_main};
use tower::Service;

fn bearer(session: &str) -> HeaderValue {
    let part = |text: String| URL_SAFE_NO_PAD.encode(text);
    let claims =
        format!(r#"{{"iss":"https://idp.example","sub":"ada","sid":"{session}","act":{{"sid":"parent-{session}"}}}}"#);
    let token = format!("{}.{}.signature", part(r#"{"alg":"ES256"}"#.into()), part(claims));
    HeaderValue::from_str(&format!("Bearer {token}")).expect("header")
}

fn revoked_store(runtime: &tokio::runtime::Runtime) -> Arc<Revocations> {
    let store = Revocations::in_memory(Duration::from_secs(3600));
    runtime.block_on(async {
        for n in 0..100_000 {
            store.revoke_session(&format!("revoked-{n}")).await.expect("revoke");
        }
    });
    store
}

fn check(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let layer = EnforceLayer::new(revoked_store(&runtime));
    let mut allowed = HeaderMap::new();
    allowed.insert(header::AUTHORIZATION, bearer("live-agent"));
    let mut refused = HeaderMap::new();
    refused.insert(header::AUTHORIZATION, bearer("revoked-77777"));
    c.bench_function("layer check, 100k revoked, agent allowed", |b| {
        b.iter(|| assert!(layer.check(black_box(&allowed)).is_none()))
    });
    c.bench_function("layer check, 100k revoked, agent refused", |b| {
        b.iter(|| assert!(layer.check(black_box(&refused)).is_some()))
    });
    // Every check a token the layer has not seen lately (twice its memory
    // of tokens, in turn): the cost of an agent's first request.
    let fresh: Vec<HeaderMap> = (0..8_192)
        .map(|n| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, bearer(&format!("agent-{n}")));
            headers
        })
        .collect();
    let mut next = fresh.iter().cycle();
    c.bench_function("layer check, 100k revoked, a token not seen lately", |b| {
        b.iter(|| assert!(layer.check(black_box(next.next().expect("cycle"))).is_none()))
    });
}

fn service(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let store = revoked_store(&runtime);
    let hello = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
    let guarded = hello.clone().layer(EnforceLayer::new(store));
    let agent = bearer("live-agent");
    for (name, router) in [("hello-world axum service", hello), ("hello-world axum service + EnforceLayer", guarded)] {
        c.bench_function(name, |b| {
            b.iter(|| {
                let mut router = router.clone();
                let request = Request::get("/")
                    .header(header::AUTHORIZATION, agent.clone())
                    .body(Body::empty())
                    .expect("request");
                let response = runtime.block_on(async move {
                    std::future::poll_fn(|cx| Service::<Request<Body>>::poll_ready(&mut router, cx))
                        .await
                        .expect("ready");
                    router.call(request).await.expect("response")
                });
                assert_eq!(response.status(), 200);
            })
        });
    }
}

criterion_group!(benches, check, service);
criterion_main!(benches);
