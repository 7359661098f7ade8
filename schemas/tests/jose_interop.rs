//! Cross-checks `caep_schemas::jose` against an independent JOSE implementation
//! (the `jsonwebtoken` crate, RustCrypto backend), in both directions, so a bug
//! shared by our signer and our verifier cannot hide behind a passing round trip.

use caep_schemas::jose::{Algorithm, JoseError, Jwks, SigningKey, verify};
use josekit::jwk::alg::ec::EcKeyPair;
use josekit::jwk::alg::ed::EdKeyPair;
use josekit::jwk::alg::rsa::RsaKeyPair;
use josekit::jwk::{Jwk, KeyPair as _};
use jsonwebtoken as jwt;
use serde_json::{Map, Value, json};

const TYP: &str = "secevent+jwt";

fn claims() -> Map<String, Value> {
    let value = json!({
        "iss": "https://tx.example",
        "aud": "https://rx.example",
        "jti": "4d3559ec67504aaba65d40b0363faad8",
        "iat": 1_700_000_000,
        "sub_id": {"format": "email", "email": "user@example.com"},
        "events": {
            "https://schemas.openid.net/secevent/caep/event-type/session-revoked": {
                "event_timestamp": 1_700_000_000
            }
        }
    });
    match value {
        Value::Object(map) => map,
        _ => unreachable!("literal is an object"),
    }
}

fn jwt_alg(alg: Algorithm) -> jwt::Algorithm {
    match alg {
        Algorithm::Es256 => jwt::Algorithm::ES256,
        Algorithm::Rs256 => jwt::Algorithm::RS256,
        Algorithm::EdDsa => jwt::Algorithm::EdDSA,
    }
}

/// Validation that checks only the signature and algorithm: SET claim checks
/// belong to `set.rs`, and SETs carry no `exp`.
fn signature_only(alg: Algorithm) -> jwt::Validation {
    let mut validation = jwt::Validation::new(jwt_alg(alg));
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    validation
}

/// The private key as PKCS#8 PEM, which is what jsonwebtoken's signers take.
fn private_pem(key: &SigningKey) -> Vec<u8> {
    let jwk = Jwk::from_bytes(key.to_private_jwk_json()).expect("private JWK parses");
    match key.algorithm() {
        Algorithm::Es256 => EcKeyPair::from_jwk(&jwk).expect("EC key").to_pem_private_key(),
        Algorithm::Rs256 => RsaKeyPair::from_jwk(&jwk).expect("RSA key").to_pem_private_key(),
        Algorithm::EdDsa => EdKeyPair::from_jwk(&jwk).expect("Ed key").to_pem_private_key(),
    }
}

fn encoding_key(key: &SigningKey) -> jwt::EncodingKey {
    let pem = private_pem(key);
    match key.algorithm() {
        Algorithm::Es256 => jwt::EncodingKey::from_ec_pem(&pem),
        Algorithm::Rs256 => jwt::EncodingKey::from_rsa_pem(&pem),
        Algorithm::EdDsa => jwt::EncodingKey::from_ed_pem(&pem),
    }
    .expect("jsonwebtoken accepts the PEM")
}

fn jwt_header(key: &SigningKey) -> jwt::Header {
    let mut header = jwt::Header::new(jwt_alg(key.algorithm()));
    header.kid = Some(key.kid().to_owned());
    header.typ = Some(TYP.to_owned());
    header
}

#[test]
fn our_tokens_verify_in_jsonwebtoken_with_our_published_jwk() {
    for alg in Algorithm::ALL {
        let key = SigningKey::generate(alg).expect("generate");
        let token = key.sign(TYP, &claims()).expect("sign");

        // Take the JWK from the published JWKS, as a real receiver would.
        let published = Jwks::from_keys([&key]).to_json();
        let jwk: jwt::jwk::Jwk =
            serde_json::from_value(published["keys"][0].clone()).expect("jsonwebtoken parses our JWK");
        let decoding = jwt::DecodingKey::from_jwk(&jwk).expect("decoding key from JWK");

        let header = jwt::decode_header(&token).expect("header");
        assert_eq!(header.alg, jwt_alg(alg));
        assert_eq!(header.kid.as_deref(), Some(key.kid()));
        assert_eq!(header.typ.as_deref(), Some(TYP));

        let data = jwt::decode::<Map<String, Value>>(&token, &decoding, &signature_only(alg))
            .unwrap_or_else(|e| panic!("{alg}: jsonwebtoken rejects our token: {e}"));
        assert_eq!(data.claims, claims());

        // The kid is the RFC 7638 thumbprint, computed independently.
        let tp = jwk.thumbprint(jwt::jwk::ThumbprintHash::SHA256).expect("thumbprint");
        assert_eq!(tp, key.kid(), "{alg} thumbprint");

        // And jsonwebtoken rejects our token once tampered with.
        let mut parts: Vec<&str> = token.split('.').collect();
        let other = key.sign(TYP, &Map::new()).expect("sign");
        let other_payload = other.split('.').nth(1).expect("payload");
        parts[1] = other_payload;
        assert!(jwt::decode::<Map<String, Value>>(parts.join("."), &decoding, &signature_only(alg)).is_err());
    }
}

#[test]
fn jsonwebtoken_tokens_verify_with_ours() {
    for alg in Algorithm::ALL {
        let key = SigningKey::generate(alg).expect("generate");
        let token = jwt::encode(&jwt_header(&key), &claims(), &encoding_key(&key))
            .unwrap_or_else(|e| panic!("{alg}: jsonwebtoken cannot sign: {e}"));

        let jwks = Jwks::from_keys([&key]);
        let verified =
            verify(&token, &jwks, TYP).unwrap_or_else(|e| panic!("{alg}: we reject jsonwebtoken's token: {e}"));
        assert_eq!(verified.payload, claims());
        assert_eq!(verified.kid, key.kid());
        assert_eq!(verified.alg, alg);

        // The same JWKS, after a trip through JSON, still verifies it.
        let reparsed = Jwks::from_value(&jwks.to_json()).expect("jwks");
        verify(&token, &reparsed, TYP).expect("verify with reparsed JWKS");
    }
}

#[test]
fn jsonwebtoken_token_from_an_impostor_key_is_rejected() {
    for alg in Algorithm::ALL {
        let published = SigningKey::generate(alg).expect("generate");
        let impostor = SigningKey::generate(alg).expect("generate");
        // The impostor claims the published key's kid.
        let token = jwt::encode(&jwt_header(&published), &claims(), &encoding_key(&impostor)).expect("sign");
        let jwks = Jwks::from_keys([&published]);
        assert_eq!(verify(&token, &jwks, TYP), Err(JoseError::BadSignature), "{alg}");
    }
}

#[test]
fn jsonwebtoken_hs256_with_our_public_key_as_secret_is_refused() {
    for alg in Algorithm::ALL {
        let key = SigningKey::generate(alg).expect("generate");
        let secret = key.public_jwk().to_string();
        let mut header = jwt::Header::new(jwt::Algorithm::HS256);
        header.kid = Some(key.kid().to_owned());
        header.typ = Some(TYP.to_owned());
        let token = jwt::encode(&header, &claims(), &jwt::EncodingKey::from_secret(secret.as_bytes())).expect("sign");
        let jwks = Jwks::from_keys([&key]);
        assert!(matches!(verify(&token, &jwks, TYP), Err(JoseError::UnsupportedAlgorithm { .. })), "{alg}");
    }
}
