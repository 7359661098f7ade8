//! Makes `jwks.json` (fresh keys, one per algorithm; the private halves are
//! discarded) and the signed seeds of `seeds/jose_verify/` and
//! `seeds/ingest/`. Run from `tests/fuzz/`: `cargo run --example make_seeds`.
//! Every signed seed must be remade with the keys, or it stops verifying.

use std::fs;

use caep_fuzz::{AUDIENCE, ISSUER};
use caep_schemas::jose::{Algorithm, Jwks, SigningKey};
use caep_schemas::set::SET_TYP;
use serde_json::{Map, Value, json};

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => unreachable!("an object literal"),
    }
}

/// A SET's claims from this IdP to the hub.
fn set(jti: &str, sub_id: Value, event: &str, payload: Value) -> Map<String, Value> {
    let uri = if event.contains('/') { event.to_owned() } else { format!("{}{event}", caep_type_prefix(event)) };
    object(json!({
        "iss": ISSUER, "aud": AUDIENCE, "jti": jti, "iat": 1_700_000_000, "txn": format!("txn-{jti}"),
        "sub_id": sub_id, "events": {uri: payload},
    }))
}

fn caep_type_prefix(event: &str) -> &'static str {
    match event {
        "account-disabled" | "account-purged" | "credential-compromise" => {
            "https://schemas.openid.net/secevent/risc/event-type/"
        }
        _ => "https://schemas.openid.net/secevent/caep/event-type/",
    }
}

fn session(id: &str) -> Value {
    json!({"format": "complex", "session": {"format": "opaque", "id": id},
           "user": {"format": "email", "email": "agent.owner@example.com"}})
}

fn main() {
    let keys: Vec<SigningKey> =
        Algorithm::ALL.into_iter().map(|alg| SigningKey::generate(alg).expect("generate")).collect();
    let jwks = Jwks::from_keys(keys.iter()).to_json();
    fs::write("jwks.json", serde_json::to_string_pretty(&jwks).expect("json") + "\n").expect("write jwks.json");

    // name, jti, sub_id, event (a CAEP/RISC name or a full URI), payload.
    let table = json!([
        ["established", "e1", session("S2"), "session-established",
            {"parent_session": {"format": "opaque", "id": "S1"}, "authority": "delegated", "amr": ["pop"]}],
        ["established-root", "e2", session("S1"), "session-established", {"authority": "autonomous"}],
        ["presented", "p1", session("S2"), "session-presented", {"audience": "https://rp.example"}],
        ["revoked", "r1", session("S1"), "session-revoked",
            {"initiating_entity": "policy", "reason_admin": {"en": "agent compromised"}, "event_timestamp": 1_700_000_000}],
        ["revoked-user", "r2", {"format": "email", "email": "Agent.Owner@example.com"}, "session-revoked", {}],
        ["credential-change", "c1", {"format": "iss_sub", "iss": ISSUER, "sub": "u1"}, "credential-change",
            {"credential_type": "fido2-roaming", "change_type": "revoke"}],
        ["account-disabled", "a1", {"format": "phone_number", "phone_number": "+12065550100"}, "account-disabled",
            {"reason": "hijacking"}],
        ["unknown-event", "u1", {"format": "opaque", "id": "x"}, "urn:example:event:custom", {"k": [1, 2.5, null]}],
    ]);
    let sets: Vec<(String, Map<String, Value>)> = table
        .as_array()
        .into_iter()
        .flatten()
        .map(|row| {
            let text = |i: usize| row[i].as_str().expect("a string").to_owned();
            (text(0), set(&text(1), row[2].clone(), &text(3), row[4].clone()))
        })
        .collect();

    let jose_dir = "seeds/jose_verify";
    let ingest_dir = "seeds/ingest";
    for dir in [jose_dir, ingest_dir] {
        fs::create_dir_all(dir).expect("mkdir");
    }
    // jose_verify: the same SET under each algorithm, then other claims under one.
    for key in &keys {
        let token = key.sign(SET_TYP, &sets[3].1).expect("sign");
        fs::write(format!("{jose_dir}/revoked-{}.jwt", key.algorithm()), token).expect("write");
    }
    let odd = [
        ("not-a-set", object(json!({"iss": ISSUER, "hello": "world"}))),
        (
            "wrong-audience",
            object(json!({"iss": ISSUER, "aud": ["https://other.example"], "jti": "w", "iat": 1,
            "sub_id": {"format": "opaque", "id": "x"}, "events": {"urn:example:e": {}}})),
        ),
        ("established", sets[0].1.clone()),
    ];
    for (name, claims) in &odd {
        fs::write(format!("{jose_dir}/{name}.jwt"), keys[0].sign(SET_TYP, claims).expect("sign")).expect("write");
    }
    // ingest: each SET as a token (the /ingest body) and as its claims.
    for (i, (name, claims)) in sets.iter().enumerate() {
        let key = &keys[i % keys.len()];
        fs::write(format!("{ingest_dir}/{name}.jwt"), key.sign(SET_TYP, claims).expect("sign")).expect("write");
        let json = serde_json::to_string(&Value::Object(claims.clone())).expect("json");
        fs::write(format!("{ingest_dir}/{name}.json"), json).expect("write");
    }
}
