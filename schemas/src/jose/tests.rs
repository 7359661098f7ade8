//! Tests of `jose.rs`, in a file of their own to keep that one short enough to read.

use super::*;
use serde_json::json;

const TYP: &str = "secevent+jwt";

fn claims() -> Map<String, Value> {
    let Value::Object(map) = json!({
        "iss": "https://tx.example",
        "jti": "abc",
        "iat": 1_700_000_000,
        "events": {"https://schemas.openid.net/secevent/caep/event-type/session-revoked": {}}
    }) else {
        unreachable!("literal is an object")
    };
    map
}

fn key(alg: Algorithm) -> SigningKey {
    SigningKey::generate(alg).expect("key generation")
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).expect("json"))
}

/// Builds a token with an arbitrary header, signed by `signer` over the
/// usual signing input.
fn forge(header: &Value, payload: &Map<String, Value>, signer: &dyn JwsSigner) -> String {
    let input = format!("{}.{}", b64(header), b64(&Value::Object(payload.clone())));
    let sig = signer.sign(input.as_bytes()).expect("sign");
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

#[test]
fn algorithm_names_round_trip() {
    for alg in Algorithm::ALL {
        assert_eq!(alg.as_str().parse::<Algorithm>(), Ok(alg));
        assert_eq!(serde_json::to_value(alg).expect("ser"), json!(alg.as_str()));
        assert_eq!(serde_json::from_value::<Algorithm>(json!(alg.as_str())).expect("de"), alg);
    }
    let err = "es256".parse::<Algorithm>().expect_err("case-sensitive");
    let msg = err.to_string();
    assert!(msg.contains("ES256") && msg.contains("RS256") && msg.contains("EdDSA"), "{msg}");
    assert!(serde_json::from_value::<Algorithm>(json!("HS256")).is_err());
}

#[test]
fn sign_verify_round_trip_all_algorithms() {
    for alg in Algorithm::ALL {
        let k = key(alg);
        let jwks = Jwks::from_keys([&k]);
        let token = k.sign(TYP, &claims()).expect("sign");
        let v = verify(&token, &jwks, TYP).expect("verify");
        assert_eq!(v.payload, claims());
        assert_eq!(v.kid, k.kid());
        assert_eq!(v.alg, alg);
        let header_keys: Vec<&str> = v.header.keys().map(String::as_str).collect();
        assert_eq!(header_keys, ["alg", "kid", "typ"]);
        assert_eq!(v.header["alg"], json!(alg.as_str()));
        assert_eq!(v.header["typ"], json!(TYP));
    }
}

#[test]
fn public_jwk_has_no_private_members_and_kid_is_thumbprint() {
    for alg in Algorithm::ALL {
        let k = key(alg);
        let jwk = k.public_jwk();
        for private in ["d", "p", "q", "dp", "dq", "qi", "oth", "k"] {
            assert!(jwk.get(private).is_none(), "{alg} public JWK leaks {private}");
        }
        assert_eq!(jwk["kid"], json!(k.kid()));
        assert_eq!(jwk["alg"], json!(alg.as_str()));
        assert_eq!(jwk["use"], json!("sig"));
        let map = jwk.as_object().expect("object");
        assert_eq!(thumbprint(map).expect("thumbprint"), k.kid());
        // Debug must not print key material either.
        let dbg = format!("{k:?}");
        assert!(!dbg.contains(k.private_jwk["d"].as_str().expect("d")));
    }
}

#[test]
fn thumbprint_matches_rfc7638_example() {
    // RFC 7638 §3.1.
    let jwk = json!({
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29"
    });
    let tp = thumbprint(jwk.as_object().expect("object")).expect("thumbprint");
    assert_eq!(tp, "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
}

#[test]
fn private_jwk_round_trip() {
    for alg in Algorithm::ALL {
        let k = key(alg);
        let loaded = SigningKey::from_private_jwk_json(&k.to_private_jwk_json()).expect("load");
        assert_eq!(loaded.kid(), k.kid());
        assert_eq!(loaded.algorithm(), alg);
        assert_eq!(loaded.public_jwk(), k.public_jwk());
        // A token from the reloaded key verifies with the original JWKS.
        let token = loaded.sign(TYP, &claims()).expect("sign");
        verify(&token, &Jwks::from_keys([&k]), TYP).expect("verify");
    }
}

#[test]
fn private_jwk_rejections() {
    let ec = key(Algorithm::Es256);
    let mut m: Map<String, Value> = serde_json::from_str(&ec.to_private_jwk_json()).expect("json");

    let mut wrong_alg = m.clone();
    wrong_alg.insert("alg".into(), json!("RS256"));
    let err = SigningKey::from_private_jwk_json(&Value::Object(wrong_alg).to_string()).expect_err("alg");
    assert!(matches!(err, JoseError::InvalidKey(_)));

    let mut wrong_kid = m.clone();
    wrong_kid.insert("kid".into(), json!("not-the-thumbprint"));
    assert!(SigningKey::from_private_jwk_json(&Value::Object(wrong_kid).to_string()).is_err());

    // Swapping in another key's public half must fail the consistency test.
    let other = key(Algorithm::Es256).public_jwk();
    let mut mixed = m.clone();
    mixed.insert("x".into(), other["x"].clone());
    mixed.insert("y".into(), other["y"].clone());
    mixed.remove("kid");
    assert!(SigningKey::from_private_jwk_json(&Value::Object(mixed).to_string()).is_err());

    // A public key is not a private key.
    m.remove("d");
    assert!(SigningKey::from_private_jwk_json(&Value::Object(m).to_string()).is_err());

    for garbage in ["", "null", "[]", "{", "{\"kty\":\"oct\",\"k\":\"AAAA\"}"] {
        assert!(SigningKey::from_private_jwk_json(garbage).is_err(), "{garbage}");
    }

    // 1024-bit RSA keys are refused, and the error does not echo the key.
    let small = RsaKeyPair::generate(1024).expect("rsa1024").to_jwk_key_pair();
    let small_json = small.to_string();
    let err = SigningKey::from_private_jwk_json(&small_json).expect_err("small RSA");
    assert!(matches!(err, JoseError::InvalidKey(_)));
    let d = small.parameter("d").and_then(Value::as_str).expect("d");
    assert!(!err.to_string().contains(d));
}

#[test]
fn tampered_payload_is_bad_signature() {
    for alg in Algorithm::ALL {
        let k = key(alg);
        let jwks = Jwks::from_keys([&k]);
        let token = k.sign(TYP, &claims()).expect("sign");
        let parts: Vec<&str> = token.split('.').collect();
        let mut evil = claims();
        evil.insert("iss".into(), json!("https://evil.example"));
        let tampered = format!("{}.{}.{}", parts[0], b64(&Value::Object(evil)), parts[2]);
        assert_eq!(verify(&tampered, &jwks, TYP), Err(JoseError::BadSignature), "{alg}");
        // A signature from another key of the same algorithm fails too.
        let other = key(alg);
        let parts2: Vec<String> = other.sign(TYP, &claims()).expect("sign").split('.').map(String::from).collect();
        let swapped = format!("{}.{}.{}", parts[0], parts[1], parts2[2]);
        assert_eq!(verify(&swapped, &jwks, TYP), Err(JoseError::BadSignature), "{alg}");
    }
}

#[test]
fn alg_none_is_unsupported() {
    let k = key(Algorithm::Es256);
    let jwks = Jwks::from_keys([&k]);
    for none in ["none", "None", "NONE"] {
        let header = json!({"alg": none, "kid": k.kid(), "typ": TYP});
        let token = format!("{}.{}.", b64(&header), b64(&Value::Object(claims())));
        // An empty signature part is refused early as malformed...
        assert!(matches!(verify(&token, &jwks, TYP), Err(JoseError::Malformed(_))));
        // ...and with any signature bytes the algorithm itself is refused.
        let token = format!("{token}AAAA");
        assert!(matches!(verify(&token, &jwks, TYP), Err(JoseError::UnsupportedAlgorithm { .. })), "{none}");
    }
}

/// The signer's public key as PEM, the secret a confusion attacker would use.
fn public_pem(k: &SigningKey) -> Vec<u8> {
    let jwk = Jwk::from_map(k.private_jwk.clone()).expect("jwk");
    match k.algorithm() {
        Algorithm::Es256 => EcKeyPair::from_jwk(&jwk).expect("ec").to_pem_public_key(),
        Algorithm::Rs256 => RsaKeyPair::from_jwk(&jwk).expect("rsa").to_pem_public_key(),
        Algorithm::EdDsa => EdKeyPair::from_jwk(&jwk).expect("ed").to_pem_public_key(),
    }
}

#[test]
fn hs256_with_public_key_as_secret_is_unsupported() {
    for alg in Algorithm::ALL {
        let k = key(alg);
        let jwks = Jwks::from_keys([&k]);
        let public_json = k.public_jwk().to_string();
        let secrets: Vec<Vec<u8>> = vec![public_json.into_bytes(), public_pem(&k)];
        for secret in secrets {
            for hs in ["HS256", "hs256"] {
                let signer = josekit::jws::HS256.signer_from_bytes(&secret).expect("hmac signer");
                let header = json!({"alg": hs, "kid": k.kid(), "typ": TYP});
                let token = forge(&header, &claims(), &signer);
                assert!(
                    matches!(verify(&token, &jwks, TYP), Err(JoseError::UnsupportedAlgorithm { .. })),
                    "{alg} {hs}"
                );
            }
        }
    }
}

#[test]
fn header_alg_must_match_the_keys_algorithm() {
    let ec = key(Algorithm::Es256);
    let rsa = key(Algorithm::Rs256);
    let ed = key(Algorithm::EdDsa);
    let jwks = Jwks::from_keys([&ec, &rsa, &ed]);
    // RS256 signature, header names the EC key.
    let rsa_signer = rsa.signer.clone();
    let header = json!({"alg": "RS256", "kid": ec.kid(), "typ": TYP});
    let token = forge(&header, &claims(), rsa_signer.as_ref());
    assert_eq!(
        verify(&token, &jwks, TYP),
        Err(JoseError::AlgorithmMismatch { header: Algorithm::Rs256, key: Algorithm::Es256 })
    );
    // EdDSA header naming the RSA key.
    let header = json!({"alg": "EdDSA", "kid": rsa.kid(), "typ": TYP});
    let token = forge(&header, &claims(), ed.signer.as_ref());
    assert_eq!(
        verify(&token, &jwks, TYP),
        Err(JoseError::AlgorithmMismatch { header: Algorithm::EdDsa, key: Algorithm::Rs256 })
    );
}

#[test]
fn typ_checks() {
    let k = key(Algorithm::Es256);
    let jwks = Jwks::from_keys([&k]);
    for ok in ["secevent+jwt", "SecEvent+JWT", "application/secevent+jwt", "Application/SECEVENT+jwt"] {
        let token = k.sign(ok, &claims()).expect("sign");
        verify(&token, &jwks, TYP).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    // The expected value may carry the prefix too.
    let token = k.sign(TYP, &claims()).expect("sign");
    verify(&token, &jwks, "application/secevent+jwt").expect("prefixed expectation");

    for bad in ["JWT", "at+jwt", "", "secevent+jwt ", "application/", "text/secevent+jwt"] {
        let token = k.sign(bad, &claims()).expect("sign");
        assert!(matches!(verify(&token, &jwks, TYP), Err(JoseError::WrongType { .. })), "{bad:?}");
    }
    // Missing typ.
    let header = json!({"alg": "ES256", "kid": k.kid()});
    let token = forge(&header, &claims(), k.signer.as_ref());
    assert_eq!(verify(&token, &jwks, TYP), Err(JoseError::WrongType { expected: TYP.into(), found: None }));
}

#[test]
fn missing_kid_is_rejected_even_with_a_single_key() {
    let k = key(Algorithm::Es256);
    let jwks = Jwks::from_keys([&k]);
    for header in [json!({"alg": "ES256", "typ": TYP}), json!({"alg": "ES256", "kid": "", "typ": TYP})] {
        let token = forge(&header, &claims(), k.signer.as_ref());
        assert_eq!(verify(&token, &jwks, TYP), Err(JoseError::MissingKid));
    }
}

#[test]
fn unknown_kid_and_crit() {
    let k = key(Algorithm::Es256);
    let jwks = Jwks::from_keys([&k]);
    let header = json!({"alg": "ES256", "kid": "someone-else", "typ": TYP});
    let token = forge(&header, &claims(), k.signer.as_ref());
    assert_eq!(verify(&token, &jwks, TYP), Err(JoseError::UnknownKey { kid: "someone-else".into() }));

    let header = json!({"alg": "ES256", "kid": k.kid(), "typ": TYP, "crit": ["exp"], "exp": 1});
    let token = forge(&header, &claims(), k.signer.as_ref());
    assert!(matches!(verify(&token, &jwks, TYP), Err(JoseError::Malformed(_))));
    let header = json!({"alg": "ES256", "kid": k.kid(), "typ": TYP, "crit": []});
    let token = forge(&header, &claims(), k.signer.as_ref());
    assert!(matches!(verify(&token, &jwks, TYP), Err(JoseError::Malformed(_))), "an empty crit is malformed");

    let header = json!({"alg": "ES256", "kid": k.kid(), "typ": TYP, "b64": false});
    let token = forge(&header, &claims(), k.signer.as_ref());
    assert!(matches!(verify(&token, &jwks, TYP), Err(JoseError::Malformed(_))));

    // A huge kid is truncated in the error.
    let long = "k".repeat(10_000);
    let header = json!({"alg": "ES256", "kid": long, "typ": TYP});
    let token = forge(&header, &claims(), k.signer.as_ref());
    let err = verify(&token, &jwks, TYP).expect_err("unknown");
    assert!(err.to_string().len() < 200);
}

#[test]
fn payload_must_be_a_json_object() {
    let k = key(Algorithm::Es256);
    let jwks = Jwks::from_keys([&k]);
    let header = b64(&json!({"alg": "ES256", "kid": k.kid(), "typ": TYP}));
    for payload in [
        URL_SAFE_NO_PAD.encode("[1,2]"),
        URL_SAFE_NO_PAD.encode("\"s\""),
        URL_SAFE_NO_PAD.encode([0xff, 0xfe]),
        String::new(),
    ] {
        let input = format!("{header}.{payload}");
        let sig = k.signer.sign(input.as_bytes()).expect("sign");
        let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig));
        assert!(matches!(verify(&token, &jwks, TYP), Err(JoseError::Malformed(_))), "{payload}");
    }
}

#[test]
fn garbage_and_truncated_tokens_are_malformed() {
    let k = key(Algorithm::EdDsa);
    let jwks = Jwks::from_keys([&k]);
    let token = k.sign(TYP, &claims()).expect("sign");
    let garbage = [
        "",
        ".",
        "..",
        "...",
        "a.b",
        "a.b.c.d.e",
        "not a token",
        "eyJ.eyJ.sig",
        "!!!.???.***",
        "eyJhbGciOiJFUzI1NiJ9=.e30.AAAA",
        "e30.e30.AAAA",
        "bnVsbA.e30.AAAA",
    ];
    for g in garbage {
        assert!(matches!(verify(g, &jwks, TYP), Err(JoseError::Malformed(_))), "{g:?}");
    }
    // Standard-alphabet base64 ('+', '/') in the header is refused.
    let std_header = base64::engine::general_purpose::STANDARD.encode(br#"{"alg":"ES256","kid":"??>>","typ":"x"}"#);
    assert!(std_header.contains('+') || std_header.contains('/'));
    assert!(matches!(verify(&format!("{std_header}.e30.AAAA"), &jwks, TYP), Err(JoseError::Malformed(_))));
    // Non-UTF-8 header bytes.
    let bad_utf8 = URL_SAFE_NO_PAD.encode([0xc3, 0x28, 0xff]);
    assert!(matches!(verify(&format!("{bad_utf8}.e30.AAAA"), &jwks, TYP), Err(JoseError::Malformed(_))));
    // A JWE-shaped token (five parts).
    assert!(matches!(verify(&format!("{token}.x.y"), &jwks, TYP), Err(JoseError::Malformed(_))));
    // Every truncation of a valid token fails without panicking.
    for cut in 0..token.len() {
        assert!(verify(&token[..cut], &jwks, TYP).is_err(), "cut at {cut}");
    }
    // Deeply nested JSON hits serde_json's recursion limit, not the stack.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_header = URL_SAFE_NO_PAD.encode(deep);
    assert!(matches!(verify(&format!("{deep_header}.e30.AAAA"), &jwks, TYP), Err(JoseError::Malformed(_))));
}

#[test]
fn jwks_skips_unusable_keys() {
    let ec = key(Algorithm::Es256);
    let rsa = key(Algorithm::Rs256);
    let ed = key(Algorithm::EdDsa);
    let small_rsa = RsaKeyPair::generate(1024).expect("rsa1024").to_jwk_public_key();
    let mut small_rsa: Map<String, Value> = small_rsa.into();
    small_rsa.insert("kid".into(), json!("small"));
    let mut ec_says_rs256 = ec.public_jwk();
    ec_says_rs256["alg"] = json!("RS256");
    ec_says_rs256["kid"] = json!("lying");
    let mut enc_use = ed.public_jwk();
    enc_use["use"] = json!("enc");
    enc_use["kid"] = json!("enc");
    let mut no_kid = rsa.public_jwk();
    no_kid.as_object_mut().expect("object").remove("kid");
    let mut verify_not_allowed = ec.public_jwk();
    verify_not_allowed["key_ops"] = json!(["sign"]);
    verify_not_allowed["kid"] = json!("ops");
    let mut ec_p384 = ec.public_jwk();
    ec_p384["crv"] = json!("P-384");
    ec_p384["kid"] = json!("p384");
    // A published RSA key that accidentally carries private members is
    // still usable, but they are not republished.
    let mut leaky: Map<String, Value> = serde_json::from_str(&rsa.to_private_jwk_json()).expect("json");
    leaky.insert("kid".into(), json!("leaky"));

    let doc = json!({"keys": [
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac", "alg": "HS256"},
        small_rsa,
        ec_says_rs256,
        enc_use,
        no_kid,
        verify_not_allowed,
        ec_p384,
        "not an object",
        42,
        {"kty": "RSA", "kid": "broken", "n": 5, "e": "AQAB"},
        {"kty": "EC", "kid": "bad-b64", "crv": "P-256", "x": "!!", "y": "??"},
        ec.public_jwk(),
        rsa.public_jwk(),
        ed.public_jwk(),
        leaky,
        // Duplicate kid: the first key wins.
        {"kty": "OKP", "crv": "Ed25519", "kid": ec.kid(), "x": ed.public_jwk()["x"].clone()},
    ]});
    let jwks = Jwks::from_json(&doc.to_string()).expect("jwks");
    assert_eq!(jwks.kids(), [ec.kid(), rsa.kid(), ed.kid(), "leaky"]);
    assert!(!jwks.contains("small") && !jwks.contains("hmac") && !jwks.contains("lying"));
    assert_eq!(jwks.algorithm_of(ec.kid()), Some(Algorithm::Es256));
    let out = jwks.to_json();
    for k in out["keys"].as_array().expect("keys") {
        assert!(k.get("d").is_none() && k.get("p").is_none() && k.get("k").is_none());
    }
    // Round trip through our own serialization keeps every key.
    let again = Jwks::from_value(&out).expect("jwks");
    assert_eq!(again.kids(), jwks.kids());

    for bad in ["", "[]", "{}", "{\"keys\": {}}", "null"] {
        assert!(Jwks::from_json(bad).is_err(), "{bad}");
    }
    assert!(Jwks::from_json("{\"keys\": []}").expect("empty").is_empty());
}

#[test]
fn rfc8935_error_codes() {
    assert_eq!(JoseError::Malformed("x").rfc8935_err(), "invalid_request");
    assert_eq!(JoseError::UnsupportedAlgorithm { alg: "none".into() }.rfc8935_err(), "invalid_request");
    assert_eq!(JoseError::MissingKid.rfc8935_err(), "invalid_request");
    assert_eq!(JoseError::WrongType { expected: TYP.into(), found: None }.rfc8935_err(), "invalid_request");
    assert_eq!(JoseError::UnknownKey { kid: "k".into() }.rfc8935_err(), "invalid_key");
    assert_eq!(JoseError::BadSignature.rfc8935_err(), "invalid_key");
    assert_eq!(
        JoseError::AlgorithmMismatch { header: Algorithm::Rs256, key: Algorithm::Es256 }.rfc8935_err(),
        "invalid_key"
    );
}
