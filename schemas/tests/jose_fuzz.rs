//! Property tests: `verify` must return an error (never panic, never accept) for
//! anything but an untouched, correctly signed token.

use std::sync::LazyLock;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use caep_schemas::jose::{Algorithm, Jwks, SigningKey, verify};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

const TYP: &str = "secevent+jwt";

/// One key per algorithm, generated once: RSA generation is too slow to repeat
/// per case.
static KEYS: LazyLock<Vec<SigningKey>> =
    LazyLock::new(|| Algorithm::ALL.into_iter().map(|alg| SigningKey::generate(alg).expect("generate")).collect());

static JWKS: LazyLock<Jwks> = LazyLock::new(|| Jwks::from_keys(KEYS.iter()));

/// A valid token per algorithm.
static TOKENS: LazyLock<Vec<String>> = LazyLock::new(|| {
    let claims = match json!({"iss": "https://tx.example", "jti": "j", "iat": 1}) {
        Value::Object(map) => map,
        _ => unreachable!("literal is an object"),
    };
    KEYS.iter().map(|k| k.sign(TYP, &claims).expect("sign")).collect()
});

/// One of `fixed`, or a random string matching `pattern`.
fn fixed_or(fixed: &'static [&'static str], pattern: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![proptest::sample::select(fixed).prop_map(str::to_owned), pattern,]
}

fn b64url_segment() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{0,120}"
}

/// A byte-level edit of a token.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, mask: u8 },
    Truncate { at: usize },
    Insert { at: usize, bytes: Vec<u8> },
    Remove { at: usize, len: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1..8usize).prop_map(|(at, len)| Mutation::Remove { at, len }),
    ]
}

fn apply(token: &str, m: &Mutation) -> String {
    let mut bytes = token.as_bytes().to_vec();
    let len = bytes.len();
    match m {
        Mutation::Flip { at, mask } => bytes[at % len] ^= mask,
        Mutation::Truncate { at } => bytes.truncate(at % len),
        Mutation::Insert { at, bytes: new } => {
            let at = at % (len + 1);
            bytes.splice(at..at, new.iter().copied());
        }
        Mutation::Remove { at, len: n } => {
            let at = at % len;
            let end = (at + n).min(len);
            bytes.drain(at..end);
        }
    }
    // verify takes &str; a mutation that breaks UTF-8 becomes U+FFFD, which is
    // still a different (and invalid) token.
    String::from_utf8_lossy(&bytes).into_owned()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_strings_are_rejected(s in any::<String>()) {
        prop_assert!(verify(&s, &JWKS, TYP).is_err());
    }

    #[test]
    fn arbitrary_dotted_strings_are_rejected(s in "[A-Za-z0-9_.=+/-]{0,300}") {
        prop_assert!(verify(&s, &JWKS, TYP).is_err());
    }

    #[test]
    fn arbitrary_three_part_base64url_is_rejected(
        h in b64url_segment(), p in b64url_segment(), s in b64url_segment()
    ) {
        let token = format!("{h}.{p}.{s}");
        prop_assert!(verify(&token, &JWKS, TYP).is_err());
    }

    #[test]
    fn arbitrary_bytes_in_each_segment_are_rejected(
        h in proptest::collection::vec(any::<u8>(), 0..200),
        p in proptest::collection::vec(any::<u8>(), 0..200),
        s in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        let token = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(h), URL_SAFE_NO_PAD.encode(p), URL_SAFE_NO_PAD.encode(s)
        );
        prop_assert!(verify(&token, &JWKS, TYP).is_err());
    }

    /// A well-formed header naming a real key, with arbitrary payload and
    /// signature bytes: the signature check must be what stops it.
    #[test]
    fn valid_header_with_random_signature_is_rejected(
        which in 0..3usize,
        payload in proptest::collection::vec(any::<u8>(), 0..200),
        sig in proptest::collection::vec(any::<u8>(), 0..600),
        header_alg in fixed_or(&["ES256", "RS256", "EdDSA", "none", "HS256"], "[A-Za-z0-9]{0,8}"),
    ) {
        let key = &KEYS[which];
        let header = json!({"alg": header_alg, "kid": key.kid(), "typ": TYP});
        let mut token = URL_SAFE_NO_PAD.encode(header.to_string());
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(payload));
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(sig));
        prop_assert!(verify(&token, &JWKS, TYP).is_err());
    }

    #[test]
    fn mutated_tokens_are_rejected(which in 0..3usize, mutations in proptest::collection::vec(mutation(), 1..4)) {
        let original = &TOKENS[which];
        let mut token = original.clone();
        for m in &mutations {
            if token.is_empty() {
                break;
            }
            token = apply(&token, m);
        }
        let result = verify(&token, &JWKS, TYP);
        if token == *original {
            prop_assert!(result.is_ok());
        } else {
            prop_assert!(result.is_err(), "accepted a mutated token: {token}");
        }
    }

    /// Arbitrary JWKS documents never panic the parser, and whatever keys
    /// survive are only the ones we understand.
    #[test]
    fn arbitrary_jwks_never_panics(
        kty in fixed_or(&["EC", "RSA", "OKP", "oct"], "[A-Za-z]{0,4}"),
        crv in fixed_or(&["P-256", "Ed25519", "P-384"], "[A-Za-z0-9-]{0,8}"),
        x in b64url_segment(), y in b64url_segment(), n in b64url_segment(), e in b64url_segment(),
        alg in fixed_or(&["ES256", "RS256", "EdDSA", "HS256"], "[A-Za-z0-9]{0,6}"),
    ) {
        let mut key = Map::new();
        for (name, value) in [("kty", kty), ("crv", crv), ("alg", alg), ("x", x), ("y", y), ("n", n), ("e", e)] {
            key.insert(name.into(), Value::String(value));
        }
        key.insert("kid".into(), json!("k"));
        let doc = json!({"keys": [Value::Object(key)]});
        let jwks = Jwks::from_value(&doc).expect("document shape is valid");
        prop_assert!(jwks.len() <= 1);
        // Nothing signed by our real keys verifies against a random key.
        for token in TOKENS.iter() {
            prop_assert!(verify(token, &jwks, TYP).is_err());
        }
    }
}
