//! The fuzz targets' bodies, one function per target in `fuzz_targets/`.
//!
//! Each takes arbitrary bytes and must never panic. The workspace test
//! `tests/tests/fuzz_seeds.rs` compiles this same file (`#[path]` module) and
//! runs every file under `seeds/<target>/` through it, so CI replays the
//! seed corpora without libFuzzer.

use std::sync::LazyLock;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use caep_schemas::event::event_type;
use caep_schemas::jose::{self, Jwks};
use caep_schemas::set::{self, Expectations, SET_TYP, SecurityEventToken};
use caep_transmitter::streams::{self, RequestKind};
use serde_json::{Map, Value};

/// The issuer and audience the `jose_verify` seeds carry (`examples/make_seeds.rs`).
pub const ISSUER: &str = "https://idp.example";
/// See [`ISSUER`].
pub const AUDIENCE: &str = "https://hub.example";

/// One public key per algorithm, fixed so the seeds' signatures verify. The
/// private halves were discarded; `examples/make_seeds.rs` makes new ones
/// (and new seeds) when needed.
pub static JWKS: LazyLock<Jwks> =
    LazyLock::new(|| Jwks::from_json(include_str!("../jwks.json")).expect("tests/fuzz/jwks.json is a JWKS"));

/// A compact JWS as a JOSE token and as a SET.
pub fn jose_verify(data: &[u8]) {
    let token = String::from_utf8_lossy(data);
    let _ = jose::verify(&token, &JWKS, SET_TYP);
    let _ = SecurityEventToken::verify(&token, &JWKS, &Expectations::new(ISSUER, AUDIENCE));
}

/// An `/ingest` body: the issuer read before verification, then the claims
/// as they reach the event log once verified. A body starting with `{` is
/// taken as the claims themselves, so the fuzzer mutates JSON, not base64.
pub fn ingest(data: &[u8]) {
    let body = String::from_utf8_lossy(data);
    let token = body.trim();
    let _ = set::unverified_issuer(token);
    let payload = if token.starts_with('{') {
        token.as_bytes().to_vec()
    } else {
        token.split('.').nth(1).and_then(|p64| URL_SAFE_NO_PAD.decode(p64).ok()).unwrap_or_default()
    };
    let Ok(claims) = serde_json::from_slice::<Map<String, Value>>(&payload) else { return };
    let Ok(set) = SecurityEventToken::from_claims(claims) else { return };
    let _ = caep_hub::effects::route(&set);
    // The Kafka log hands an accepted SET on as `to_claims`: it must parse back.
    let again = SecurityEventToken::from_claims(set.to_claims());
    assert_eq!(again.ok().as_ref(), Some(&set), "to_claims/from_claims round trip");
}

/// A stream-management request body, as every kind of request; a body valid
/// as a create, a PUT and a PATCH is then applied to the stream it created.
pub fn stream_config(data: &[u8]) {
    let (create, replace, update) = (
        streams::parse_request(data, RequestKind::Create),
        streams::parse_request(data, RequestKind::Replace),
        streams::parse_request(data, RequestKind::Update),
    );
    let _ = streams::parse_subject_request(data);
    let _ = streams::parse_status_update(data);
    let (Ok(create), Ok(replace), Ok(update)) = (create, replace, update) else { return };
    let poll_url = |id: &str| format!("{AUDIENCE}/poll/{id}");
    let id = replace.stream_id.clone().unwrap_or_default();
    let stream = streams::new_stream(id, ISSUER, AUDIENCE.into(), create, event_type::ALL, poll_url, 30);
    let _ = streams::apply_replace(&stream, replace, event_type::ALL, poll_url);
    let _ = streams::apply_update(&stream, update, event_type::ALL, poll_url);
}

/// An RFC 8936 poll request body.
pub fn poll_request(data: &[u8]) {
    let _ = caep_transmitter::poll::parse_request(data);
}
