//! Replays the fuzz targets' seed corpora (`tests/fuzz/seeds/<target>/`)
//! through the targets' own bodies, so CI catches a regression on any input
//! a fuzzer once found interesting without running libFuzzer.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

#[path = "../fuzz/src/lib.rs"]
mod bodies;

/// Runs every seed of `target` through `body`; fails naming each seed that
/// panicked, and on an empty or missing directory.
fn replay(target: &str, body: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds").join(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut seeds = 0;
    let mut panicked = Vec::new();
    for entry in entries {
        let path = entry.expect("directory entry").path();
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        seeds += 1;
        if catch_unwind(AssertUnwindSafe(|| body(&data))).is_err() {
            panicked.push(path.display().to_string());
        }
    }
    assert!(seeds > 0, "no seeds in {}", dir.display());
    assert!(panicked.is_empty(), "{target} panicked on {panicked:?}");
}

#[test]
fn jose_verify_seeds() {
    replay("jose_verify", bodies::jose_verify);
}

#[test]
fn ingest_seeds() {
    replay("ingest", bodies::ingest);
}

#[test]
fn stream_config_seeds() {
    replay("stream_config", bodies::stream_config);
}

#[test]
fn poll_request_seeds() {
    replay("poll_request", bodies::poll_request);
}

/// The signed seeds still verify against `tests/fuzz/jwks.json`: otherwise
/// the corpus would stop reaching the code after the signature check.
#[test]
fn signed_seeds_verify() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/jose_verify");
    let token = std::fs::read_to_string(dir.join("revoked-EdDSA.jwt")).expect("seed");
    let expect = caep_schemas::set::Expectations::new(bodies::ISSUER, bodies::AUDIENCE);
    caep_schemas::set::SecurityEventToken::verify(&token, &bodies::JWKS, &expect).expect("seed verifies");
}
