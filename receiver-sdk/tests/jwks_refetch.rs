//! The JWKS cache against a real JWKS endpoint on loopback: fetched once,
//! refetched on an unknown kid (key rotation), rate-limited, one fetch for
//! concurrent callers, and an oversized document refused.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use caep_receiver::ReceiverError;
use caep_receiver::jwks::JwksCache;
use caep_receiver::verify::SetVerifier;
use caep_schemas::event::{Event, SessionRevoked};
use caep_schemas::jose::{Algorithm, Jwks, SigningKey};
use caep_schemas::set::SecurityEventToken;
use caep_schemas::subject::SubjectId;
use serde_json::Value;
use support::serve;

const ISS: &str = "https://hub.example.com";
const AUD: &str = "https://rp.example.com";

#[derive(Clone)]
struct Published {
    jwks: Arc<Mutex<Value>>,
    fetches: Arc<AtomicUsize>,
}

async fn jwks(State(published): State<Published>) -> String {
    published.fetches.fetch_add(1, Ordering::SeqCst);
    // Slow enough that concurrent callers overlap with the fetch.
    tokio::time::sleep(Duration::from_millis(50)).await;
    published.jwks.lock().expect("lock").to_string()
}

fn token(key: &SigningKey) -> String {
    SecurityEventToken::new(
        ISS,
        AUD,
        SubjectId::session_of(SubjectId::opaque("s"), None),
        Event::SessionRevoked(SessionRevoked::default()),
    )
    .sign(key)
    .expect("sign")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_is_picked_up_and_refetches_are_rate_limited_and_shared() {
    let [a, b, c, d] = [(); 4].map(|()| SigningKey::generate(Algorithm::Es256).expect("key"));
    let published = Published {
        jwks: Arc::new(Mutex::new(Jwks::from_keys([&a]).to_json())),
        fetches: Arc::new(AtomicUsize::new(0)),
    };
    let big = "x".repeat(300 * 1024);
    let router = Router::new()
        .route("/jwks", get(jwks))
        .route("/big", get(move || std::future::ready(big.clone())))
        .with_state(published.clone());
    let addr = serve(router).await;
    let interval = Duration::from_millis(800);
    let cache = JwksCache::new(reqwest::Client::new(), format!("http://{addr}/jwks")).with_refetch_interval(interval);
    let verifier = Arc::new(SetVerifier::new(ISS, AUD, cache));
    let fetches = || published.fetches.load(Ordering::SeqCst);

    verifier.verify(&token(&a)).await.expect("key a verifies");
    verifier.verify(&token(&a)).await.expect("key a verifies");
    assert_eq!(fetches(), 1, "fetched once, then cached");

    // The transmitter rotates to b: the unknown kid triggers one refetch.
    tokio::time::sleep(interval).await;
    *published.jwks.lock().expect("lock") = Jwks::from_keys([&b, &a]).to_json();
    verifier.verify(&token(&b)).await.expect("rotated key verifies after a refetch");
    assert_eq!(fetches(), 2);

    // c is nobody's. Inside the interval there is no second fetch, and the
    // answer is "not now": a key rotated moments ago must not be refused for good.
    let not_now = verifier.verify(&token(&c)).await.expect_err("unknown key not accepted");
    assert!(not_now.is_transient(), "{not_now}");
    assert_eq!(fetches(), 2, "refetch rate-limited");

    // After the interval, many concurrent tokens with a new kid share one fetch.
    tokio::time::sleep(interval).await;
    *published.jwks.lock().expect("lock") = Jwks::from_keys([&d, &b]).to_json();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (verifier, token) = (Arc::clone(&verifier), token(&d));
            tokio::spawn(async move { verifier.verify(&token).await.map(|verified| verified.duplicate) })
        })
        .collect();
    for task in tasks {
        assert!(!task.await.expect("join").expect("d verifies"));
    }
    assert_eq!(fetches(), 3, "concurrent callers shared one fetch");

    // Once a fresh fetch shows the key is not published, it is refused for
    // good, and concurrent copies wait for that fetch rather than fetching.
    tokio::time::sleep(interval).await;
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (verifier, token) = (Arc::clone(&verifier), token(&c));
            tokio::spawn(async move { verifier.verify(&token).await.map(|_| ()) })
        })
        .collect();
    for task in tasks {
        let refused = task.await.expect("join").expect_err("c is not published");
        assert!(!refused.is_transient(), "{refused}");
        assert_eq!(refused.rfc8935_err(), "invalid_key");
    }
    assert_eq!(fetches(), 4);

    let oversized = JwksCache::new(reqwest::Client::new(), format!("http://{addr}/big"));
    assert!(matches!(oversized.get().await, Err(ReceiverError::BodyTooLarge { limit: 262_144, .. })));
    let missing = JwksCache::new(reqwest::Client::new(), format!("http://{addr}/nothing"));
    assert_eq!(missing.get().await.expect_err("404").status(), Some(404));
}
