//! JWS signing and verification over JSON payloads, with the algorithm pinned
//! to the key (RFC 8725 §3.1).
//!
//! This module is deliberately generic: it signs and verifies a JSON object and
//! knows nothing about Security Event Tokens, so `set.rs` (and anything else)
//! layers claim validation on top of the [`Verified`] it returns.
//!
//! # Security model
//!
//! * Only three algorithms exist here: ES256 (P-256), RS256 (RSA ≥ 2048 bits) and
//!   EdDSA (Ed25519). `none`, every HMAC algorithm and everything else is refused
//!   before any key is looked at, so the classic "HS256 with the public key as the
//!   secret" confusion cannot happen: there is no HMAC code path at all.
//! * Every verification key carries its own algorithm, derived from its key type
//!   and curve when the JWKS is parsed. The token header only *names* a key (by
//!   `kid`); the header `alg` must then equal the key's algorithm or the token is
//!   rejected ([`JoseError::AlgorithmMismatch`]).
//! * Header members that could point at other keys (`jwk`, `jku`, `x5u`, `x5c`)
//!   are ignored: keys come only from the caller's [`Jwks`].
//! * Nothing here panics on input, and error messages never contain key material;
//!   attacker-supplied strings that are echoed (an `alg`, a `kid`, a `typ`) are
//!   truncated and shown escaped.
//!
//! # Missing `kid`
//!
//! A token without a `kid` is rejected with [`JoseError::MissingKid`], even when
//! the JWKS holds a single key of the header's algorithm. Guessing the key would
//! make verification depend on how many keys the transmitter happens to publish:
//! tokens would start failing the moment a rotation adds a second key. Every
//! transmitter this crate talks to (including ours) sets `kid`, so the strict rule
//! costs nothing and keeps key selection unambiguous.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use josekit::jwk::Jwk;
use josekit::jwk::KeyPair as _;
use josekit::jwk::alg::ec::{EcCurve, EcKeyPair};
use josekit::jwk::alg::ed::{EdCurve, EdKeyPair};
use josekit::jwk::alg::rsa::RsaKeyPair;
use josekit::jws::{JwsSigner, JwsVerifier};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

/// Size of every RSA key we generate, and the smallest we accept anywhere
/// (CAEP interoperability profile, RFC 7518 §3.3).
pub const MIN_RSA_BITS: usize = 2048;

/// Size of the RSA keys [`SigningKey::generate`] makes.
const GENERATED_RSA_BITS: u32 = 2048;

/// The JWS algorithms this crate signs and verifies with.
///
/// Serialized as its JOSE name (`"ES256"`, `"RS256"`, `"EdDSA"`); parsing is
/// case-sensitive, as JOSE algorithm names are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Algorithm {
    /// ECDSA with P-256 and SHA-256 (RFC 7518 §3.4).
    #[serde(rename = "ES256")]
    Es256,
    /// RSASSA-PKCS1-v1_5 with SHA-256 (RFC 7518 §3.3), keys of at least 2048 bits.
    #[serde(rename = "RS256")]
    Rs256,
    /// EdDSA with Ed25519 (RFC 8037).
    #[serde(rename = "EdDSA")]
    EdDsa,
}

impl Algorithm {
    /// Every supported algorithm, in the order error messages list them.
    pub const ALL: [Algorithm; 3] = [Algorithm::Es256, Algorithm::Rs256, Algorithm::EdDsa];

    /// The JOSE name of the algorithm, as it appears in a JWS header or a JWK `alg`.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Es256 => "ES256",
            Algorithm::Rs256 => "RS256",
            Algorithm::EdDsa => "EdDSA",
        }
    }

    fn verifier_from_jwk(self, jwk: &Jwk) -> Result<Arc<dyn JwsVerifier>, josekit::JoseError> {
        Ok(match self {
            Algorithm::Es256 => Arc::new(josekit::jws::ES256.verifier_from_jwk(jwk)?),
            Algorithm::Rs256 => Arc::new(josekit::jws::RS256.verifier_from_jwk(jwk)?),
            Algorithm::EdDsa => Arc::new(josekit::jws::EdDSA.verifier_from_jwk(jwk)?),
        })
    }

    fn signer_from_jwk(self, jwk: &Jwk) -> Result<Arc<dyn JwsSigner>, josekit::JoseError> {
        Ok(match self {
            Algorithm::Es256 => Arc::new(josekit::jws::ES256.signer_from_jwk(jwk)?),
            Algorithm::Rs256 => Arc::new(josekit::jws::RS256.signer_from_jwk(jwk)?),
            Algorithm::EdDsa => Arc::new(josekit::jws::EdDSA.signer_from_jwk(jwk)?),
        })
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Algorithm {
    type Err = JoseError;

    /// Parses a JOSE algorithm name. Case-sensitive on purpose: `"es256"` is not
    /// a registered algorithm name, and lenient matching is how confusion starts.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Algorithm::ALL
            .into_iter()
            .find(|alg| alg.as_str() == s)
            .ok_or_else(|| JoseError::UnsupportedAlgorithm { alg: excerpt(s) })
    }
}

/// Everything that can go wrong when generating, loading, signing or verifying.
///
/// Messages never contain key material. Strings copied from a token (`alg`,
/// `kid`, `typ`) are truncated to a few dozen characters and printed escaped,
/// so they are safe to log and to return to a peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoseError {
    /// The token is not a well-formed compact JWS with a JSON object header and
    /// payload, or uses a header feature we do not support (`crit`, `b64`).
    #[error("malformed JWS: {0}")]
    Malformed(&'static str),
    /// The header `alg` (or an algorithm name being parsed) is not one of
    /// ES256, RS256, EdDSA.
    #[error("unsupported JWS algorithm {alg:?} (allowed: ES256, RS256, EdDSA)")]
    UnsupportedAlgorithm {
        /// The offending name, truncated.
        alg: String,
    },
    /// The header has no `kid`, so no key can be selected (see the module docs).
    #[error("JWS header has no kid")]
    MissingKid,
    /// No key in the JWKS has this `kid`; the caller may refetch the JWKS once.
    #[error("no verification key with kid {kid:?}")]
    UnknownKey {
        /// The `kid` from the header, truncated.
        kid: String,
    },
    /// The key named by `kid` is bound to a different algorithm than the header claims.
    #[error("JWS header alg {header} does not match the {key} key named by kid")]
    AlgorithmMismatch {
        /// The algorithm in the token header.
        header: Algorithm,
        /// The algorithm the key is pinned to.
        key: Algorithm,
    },
    /// The header `typ` is missing or differs from the expected one.
    #[error("JWS typ {found:?} is not the expected {expected:?}")]
    WrongType {
        /// The expected `typ`.
        expected: String,
        /// The `typ` in the header (truncated), if any.
        found: Option<String>,
    },
    /// The signature does not verify with the key named by `kid`.
    #[error("JWS signature does not verify")]
    BadSignature,
    /// Generating a new key pair failed (a crypto library failure, not bad input).
    #[error("key generation failed: {0}")]
    KeyGeneration(String),
    /// A key could not be loaded or is not acceptable (wrong type, too small, ...).
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// Producing a signature or serializing the header or payload failed.
    #[error("signing failed: {0}")]
    Signing(String),
}

impl JoseError {
    /// The RFC 8935 §2.3 / RFC 8936 error code a receiver reports for this error.
    ///
    /// Errors about the token's form map to `invalid_request`; errors about which
    /// key signed it, or whether that key really did, map to `invalid_key`.
    /// [`KeyGeneration`](Self::KeyGeneration) and [`Signing`](Self::Signing) only
    /// happen on the signing side and map to `invalid_request` for completeness.
    pub fn rfc8935_err(&self) -> &'static str {
        match self {
            JoseError::Malformed(_)
            | JoseError::UnsupportedAlgorithm { .. }
            | JoseError::MissingKid
            | JoseError::WrongType { .. }
            | JoseError::KeyGeneration(_)
            | JoseError::Signing(_) => "invalid_request",
            JoseError::UnknownKey { .. }
            | JoseError::BadSignature
            | JoseError::AlgorithmMismatch { .. }
            | JoseError::InvalidKey(_) => "invalid_key",
        }
    }
}

/// Longest excerpt of an attacker-supplied string that goes into an error.
const EXCERPT_CHARS: usize = 64;

/// Truncates an untrusted string before it is stored in an error, so a huge
/// `kid` cannot blow up logs or error responses.
fn excerpt(s: &str) -> String {
    s.chars().take(EXCERPT_CHARS).collect()
}

/// Public JWK members per key type, in RFC 7638 (lexicographic) order.
fn public_members(kty: &str) -> &'static [&'static str] {
    match kty {
        "EC" => &["crv", "kty", "x", "y"],
        "RSA" => &["e", "kty", "n"],
        "OKP" => &["crv", "kty", "x"],
        _ => &[],
    }
}

/// RFC 7638 JWK thumbprint (SHA-256, base64url) of a public JWK.
fn thumbprint(jwk: &Map<String, Value>) -> Result<String, JoseError> {
    let kty = jwk.get("kty").and_then(Value::as_str).unwrap_or_default();
    let members = public_members(kty);
    if members.is_empty() {
        return Err(JoseError::InvalidKey("unsupported key type".into()));
    }
    // A BTreeMap serializes its keys in byte order with no whitespace, which is
    // exactly the canonical form RFC 7638 §3 hashes.
    let mut canonical = std::collections::BTreeMap::new();
    for name in members {
        let value = jwk
            .get(*name)
            .and_then(Value::as_str)
            .ok_or_else(|| JoseError::InvalidKey(format!("JWK member {name} missing")))?;
        canonical.insert(*name, value);
    }
    let json = serde_json::to_vec(&canonical).map_err(|_| JoseError::InvalidKey("cannot serialize JWK".into()))?;
    Ok(URL_SAFE_NO_PAD.encode(Sha256::digest(&json)))
}

/// Decodes a base64url member of a JWK (strict: no padding, canonical bits).
fn b64_member(jwk: &Map<String, Value>, name: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(jwk.get(name)?.as_str()?).ok()
}

/// Bit length of a big-endian unsigned integer.
fn bit_len(be: &[u8]) -> usize {
    match be.iter().position(|b| *b != 0) {
        Some(first) => (be.len() - first - 1) * 8 + (8 - be[first].leading_zeros() as usize),
        None => 0,
    }
}

/// Works out which algorithm a JWK can be used with, from its key type and
/// curve alone, and checks the public key's shape (sizes, RSA strength).
///
/// This is where the algorithm gets pinned to the key: the answer never depends
/// on a token. An `alg` member that names a different algorithm, a `use` other
/// than `sig`, or `key_ops` without the needed operation makes the key unusable.
fn classify_jwk(jwk: &Map<String, Value>, op: &str) -> Result<Algorithm, &'static str> {
    let kty = jwk.get("kty").and_then(Value::as_str).ok_or("kty missing")?;
    let crv = jwk.get("crv").and_then(Value::as_str);
    let alg = match (kty, crv) {
        ("EC", Some("P-256")) => {
            let x = b64_member(jwk, "x").ok_or("EC key without valid x")?;
            let y = b64_member(jwk, "y").ok_or("EC key without valid y")?;
            if x.len() != 32 || y.len() != 32 {
                return Err("P-256 coordinates must be 32 bytes");
            }
            Algorithm::Es256
        }
        ("RSA", _) => {
            let n = b64_member(jwk, "n").ok_or("RSA key without valid n")?;
            let e = b64_member(jwk, "e").ok_or("RSA key without valid e")?;
            if bit_len(&n) < MIN_RSA_BITS {
                return Err("RSA key shorter than 2048 bits");
            }
            // e = 1 (or any even e) makes RSA "signatures" trivial or broken; no
            // real key has one, so treat it as hostile.
            if bit_len(&e) < 2 || bit_len(&e) > 64 || e.last().is_none_or(|b| b & 1 == 0) {
                return Err("RSA public exponent is not acceptable");
            }
            Algorithm::Rs256
        }
        ("OKP", Some("Ed25519")) => {
            let x = b64_member(jwk, "x").ok_or("OKP key without valid x")?;
            if x.len() != 32 {
                return Err("Ed25519 public key must be 32 bytes");
            }
            Algorithm::EdDsa
        }
        ("oct", _) => return Err("symmetric keys are never used"),
        _ => return Err("unsupported key type or curve"),
    };
    match jwk.get("alg") {
        None => {}
        Some(Value::String(a)) if a == alg.as_str() => {}
        Some(_) => return Err("alg member contradicts the key type"),
    }
    match jwk.get("use") {
        None => {}
        Some(Value::String(u)) if u == "sig" => {}
        Some(_) => return Err("use member is not sig"),
    }
    match jwk.get("key_ops") {
        None => {}
        Some(Value::Array(ops)) if ops.iter().any(|o| o.as_str() == Some(op)) => {}
        Some(_) => return Err("key_ops does not allow this operation"),
    }
    Ok(alg)
}

/// Builds the normalized public JWK we publish and verify with: only the public
/// members of the key type, plus `kid`, `alg` and `use`. Anything else in the
/// source (private members a careless publisher left in, `x5c`, ...) is dropped.
fn normalized_public_jwk(src: &Map<String, Value>, kid: &str, alg: Algorithm) -> Map<String, Value> {
    let kty = src.get("kty").and_then(Value::as_str).unwrap_or_default();
    let mut out = Map::new();
    out.insert("kty".into(), Value::String(kty.to_owned()));
    for name in public_members(kty) {
        if *name != "kty"
            && let Some(v) = src.get(*name)
        {
            out.insert((*name).into(), v.clone());
        }
    }
    out.insert("kid".into(), Value::String(kid.to_owned()));
    out.insert("alg".into(), Value::String(alg.as_str().to_owned()));
    out.insert("use".into(), Value::String("sig".into()));
    out
}

/// A private signing key: its algorithm, its `kid` (the RFC 7638 thumbprint of
/// its public JWK) and the signer built from it.
///
/// `Debug` shows only the `kid` and algorithm, never key material.
#[derive(Clone)]
pub struct SigningKey {
    kid: String,
    alg: Algorithm,
    signer: Arc<dyn JwsSigner>,
    /// Full private JWK (with kid/alg/use), kept only for persistence.
    private_jwk: Map<String, Value>,
    public_jwk: Map<String, Value>,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey").field("kid", &self.kid).field("alg", &self.alg).finish_non_exhaustive()
    }
}

/// Fixed message signed and verified whenever a key is loaded, so a private JWK
/// whose public half was tampered with is caught at load time instead of
/// producing signatures nobody can verify.
const SELF_TEST_MESSAGE: &[u8] = b"caep-schemas signing key self-test";

impl SigningKey {
    /// Generates a fresh key: P-256 for ES256, 2048-bit RSA for RS256, Ed25519
    /// for EdDSA.
    pub fn generate(alg: Algorithm) -> Result<Self, JoseError> {
        let gen_err = |e: josekit::JoseError| JoseError::KeyGeneration(format!("{alg}: {e}"));
        let jwk = match alg {
            Algorithm::Es256 => EcKeyPair::generate(EcCurve::P256).map_err(gen_err)?.to_jwk_key_pair(),
            Algorithm::Rs256 => RsaKeyPair::generate(GENERATED_RSA_BITS).map_err(gen_err)?.to_jwk_key_pair(),
            Algorithm::EdDsa => EdKeyPair::generate(EdCurve::Ed25519).map_err(gen_err)?.to_jwk_key_pair(),
        };
        Self::from_private_map(jwk.into(), Some(alg))
    }

    /// Loads a key saved with [`to_private_jwk_json`](Self::to_private_jwk_json).
    ///
    /// Refuses keys of other types or curves, RSA keys under 2048 bits, an `alg`
    /// member that does not match the key type, a `kid` that is not the key's
    /// thumbprint, and keys whose public half does not match the private half.
    pub fn from_private_jwk_json(json: &str) -> Result<Self, JoseError> {
        let map: Map<String, Value> =
            serde_json::from_str(json).map_err(|_| JoseError::InvalidKey("private JWK is not a JSON object".into()))?;
        Self::from_private_map(map, None)
    }

    fn from_private_map(map: Map<String, Value>, want: Option<Algorithm>) -> Result<Self, JoseError> {
        // The private key JSON is secret: every message below is fixed text.
        let alg = classify_jwk(&map, "sign").map_err(|why| JoseError::InvalidKey(why.into()))?;
        if want.is_some_and(|w| w != alg) {
            return Err(JoseError::InvalidKey("key type does not match the requested algorithm".into()));
        }
        if !map.get("d").is_some_and(Value::is_string) {
            return Err(JoseError::InvalidKey("JWK has no private member d".into()));
        }
        let src =
            Jwk::from_map(map.clone()).map_err(|_| JoseError::InvalidKey("private JWK is not a valid JWK".into()))?;
        let parse_err = |_| JoseError::InvalidKey(format!("private JWK is not a valid {alg} key"));
        // Re-derive every member from the parsed key rather than trusting the
        // stored public members.
        let derived: Map<String, Value> = match alg {
            Algorithm::Es256 => EcKeyPair::from_jwk(&src).map_err(parse_err)?.to_jwk_key_pair(),
            Algorithm::Rs256 => RsaKeyPair::from_jwk(&src).map_err(parse_err)?.to_jwk_key_pair(),
            Algorithm::EdDsa => EdKeyPair::from_jwk(&src).map_err(parse_err)?.to_jwk_key_pair(),
        }
        .into();
        // classify_jwk checked the stored n; check the parsed key again in case
        // the stored public members lied about its size.
        classify_jwk(&derived, "sign").map_err(|why| JoseError::InvalidKey(why.into()))?;

        let kid = thumbprint(&derived)?;
        if let Some(stored) = map.get("kid")
            && stored.as_str() != Some(kid.as_str())
        {
            return Err(JoseError::InvalidKey("kid is not the RFC 7638 thumbprint of the key".into()));
        }
        let public_jwk = normalized_public_jwk(&derived, &kid, alg);
        let mut private_jwk = derived;
        private_jwk.insert("kid".into(), Value::String(kid.clone()));
        private_jwk.insert("alg".into(), Value::String(alg.as_str().into()));
        private_jwk.insert("use".into(), Value::String("sig".into()));

        let private = Jwk::from_map(private_jwk.clone())
            .map_err(|_| JoseError::InvalidKey("private JWK is not a valid JWK".into()))?;
        let signer = alg
            .signer_from_jwk(&private)
            .map_err(|_| JoseError::InvalidKey(format!("cannot build a {alg} signer from the key")))?;

        // Pairwise consistency test.
        let public = Jwk::from_map(public_jwk.clone())
            .map_err(|_| JoseError::InvalidKey("public JWK is not a valid JWK".into()))?;
        let verifier = alg
            .verifier_from_jwk(&public)
            .map_err(|_| JoseError::InvalidKey(format!("cannot build a {alg} verifier from the key")))?;
        let sig =
            signer.sign(SELF_TEST_MESSAGE).map_err(|_| JoseError::InvalidKey("self-test signature failed".into()))?;
        verifier
            .verify(SELF_TEST_MESSAGE, &sig)
            .map_err(|_| JoseError::InvalidKey("private and public halves of the key do not match".into()))?;

        Ok(SigningKey { kid, alg, signer, private_jwk, public_jwk })
    }

    /// The private JWK as JSON, for persistence. **Contains the private key**:
    /// store it with restrictive permissions and never log it.
    pub fn to_private_jwk_json(&self) -> String {
        Value::Object(self.private_jwk.clone()).to_string()
    }

    /// The key id: the RFC 7638 SHA-256 thumbprint of the public JWK, base64url.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The one algorithm this key signs with.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// The public JWK to publish: public members plus `kid`, `alg`, `use: "sig"`.
    pub fn public_jwk(&self) -> Value {
        Value::Object(self.public_jwk.clone())
    }

    /// Signs `payload` as a compact JWS whose protected header is exactly
    /// `{"alg", "kid", "typ"}`.
    pub fn sign(&self, typ: &str, payload: &Map<String, Value>) -> Result<String, JoseError> {
        let mut header = Map::new();
        header.insert("alg".into(), Value::String(self.alg.as_str().into()));
        header.insert("kid".into(), Value::String(self.kid.clone()));
        header.insert("typ".into(), Value::String(typ.into()));
        let header = serde_json::to_vec(&header).map_err(|e| JoseError::Signing(e.to_string()))?;
        let payload = serde_json::to_vec(payload).map_err(|e| JoseError::Signing(e.to_string()))?;
        let mut token = URL_SAFE_NO_PAD.encode(header);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(payload, &mut token);
        let sig = self
            .signer
            .sign(token.as_bytes())
            .map_err(|_| JoseError::Signing(format!("{} signature failed", self.alg)))?;
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(sig, &mut token);
        Ok(token)
    }
}

/// One usable verification key.
#[derive(Clone)]
struct JwksKey {
    kid: String,
    alg: Algorithm,
    jwk: Map<String, Value>,
    verifier: Arc<dyn JwsVerifier>,
}

/// A set of public verification keys, each pinned to one algorithm.
///
/// Parsing never fails because of one bad key: keys that are unusable
/// (symmetric, unsupported curve, RSA under 2048 bits, `alg` contradicting the
/// key type, `use` other than `sig`, no `kid`) are skipped. When two keys share
/// a `kid`, the first one wins, so a later entry cannot shadow it.
#[derive(Clone, Default)]
pub struct Jwks {
    keys: Vec<JwksKey>,
}

impl fmt::Debug for Jwks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.keys.iter().map(|k| (k.kid.as_str(), k.alg))).finish()
    }
}

impl Jwks {
    /// Parses a JWKS document (`{"keys": [...]}`).
    ///
    /// Fails only when the document itself is not a JSON object with a `keys`
    /// array; individual unusable keys are skipped.
    pub fn from_json(json: &str) -> Result<Self, JoseError> {
        let value: Value =
            serde_json::from_str(json).map_err(|_| JoseError::InvalidKey("JWKS is not valid JSON".into()))?;
        Self::from_value(&value)
    }

    /// Like [`from_json`](Self::from_json), for an already parsed document.
    pub fn from_value(value: &Value) -> Result<Self, JoseError> {
        let keys = value
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| JoseError::InvalidKey("JWKS has no keys array".into()))?;
        let mut jwks = Jwks::default();
        for key in keys {
            if let Some(key) = Value::as_object(key).and_then(parse_public_jwk) {
                jwks.push(key);
            }
        }
        Ok(jwks)
    }

    /// The JWKS publishing the public halves of `keys`, in order.
    pub fn from_keys<'a>(keys: impl IntoIterator<Item = &'a SigningKey>) -> Self {
        let mut jwks = Jwks::default();
        for key in keys {
            // Our own keys always parse; skipping keeps this infallible.
            if let Some(parsed) = parse_public_jwk(&key.public_jwk) {
                jwks.push(parsed);
            }
        }
        jwks
    }

    fn push(&mut self, key: JwksKey) {
        if !self.contains(&key.kid) {
            self.keys.push(key);
        }
    }

    /// The JWKS document: `{"keys": [...]}` with normalized public JWKs only.
    pub fn to_json(&self) -> Value {
        let keys = self.keys.iter().map(|k| Value::Object(k.jwk.clone())).collect();
        let mut doc = Map::new();
        doc.insert("keys".into(), Value::Array(keys));
        Value::Object(doc)
    }

    /// The `kid`s of the usable keys, in document order.
    pub fn kids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.kid.as_str()).collect()
    }

    /// Whether a usable key with this `kid` is present.
    pub fn contains(&self, kid: &str) -> bool {
        self.get(kid).is_some()
    }

    /// The algorithm the key with this `kid` is pinned to.
    pub fn algorithm_of(&self, kid: &str) -> Option<Algorithm> {
        self.get(kid).map(|k| k.alg)
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no usable key is present.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn get(&self, kid: &str) -> Option<&JwksKey> {
        self.keys.iter().find(|k| k.kid == kid)
    }
}

/// Turns one JWKS entry into a verification key, or `None` if it is unusable.
fn parse_public_jwk(src: &Map<String, Value>) -> Option<JwksKey> {
    let alg = classify_jwk(src, "verify").ok()?;
    // Without a kid a key can never be selected (tokens must name their key).
    let kid = src.get("kid")?.as_str().filter(|k| !k.is_empty())?.to_owned();
    let jwk = normalized_public_jwk(src, &kid, alg);
    let verifier = alg.verifier_from_jwk(&Jwk::from_map(jwk.clone()).ok()?).ok()?;
    Some(JwksKey { kid, alg, jwk, verifier })
}

/// A token whose signature verified, with its decoded header and payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// The protected header, as sent.
    pub header: Map<String, Value>,
    /// The payload (claims). Only signature and header checks were made; claim
    /// validation is the caller's job.
    pub payload: Map<String, Value>,
    /// The `kid` of the key that verified the signature.
    pub kid: String,
    /// The algorithm of that key (equal to the header `alg`).
    pub alg: Algorithm,
}

/// Normalizes a media type for `typ` comparison (RFC 7515 §4.1.9): ASCII
/// case-insensitive, with an optional `application/` prefix.
fn normalize_typ(typ: &str) -> String {
    let lower = typ.to_ascii_lowercase();
    match lower.strip_prefix("application/") {
        Some(rest) => rest.to_owned(),
        None => lower,
    }
}

/// Verifies a compact JWS against `jwks` and checks its `typ`.
///
/// Header checks that need no key (`alg` supported, `kid` present, `typ`,
/// no `crit`) run before the key lookup, so a token that would be refused
/// anyway never yields [`JoseError::UnknownKey`] and never makes the caller
/// refetch a JWKS. The payload is parsed only after the signature verified.
pub fn verify(token: &str, jwks: &Jwks, expected_typ: &str) -> Result<Verified, JoseError> {
    let mut parts = token.split('.');
    let (Some(h64), Some(p64), Some(s64), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(JoseError::Malformed("a compact JWS has exactly three dot-separated parts"));
    };
    if h64.is_empty() || s64.is_empty() {
        return Err(JoseError::Malformed("empty header or signature"));
    }
    let header_bytes = URL_SAFE_NO_PAD.decode(h64).map_err(|_| JoseError::Malformed("header is not base64url"))?;
    let header: Map<String, Value> =
        serde_json::from_slice(&header_bytes).map_err(|_| JoseError::Malformed("header is not a JSON object"))?;

    let alg = match header.get("alg") {
        Some(Value::String(name)) => name.parse::<Algorithm>()?,
        Some(_) => return Err(JoseError::Malformed("alg is not a string")),
        None => return Err(JoseError::Malformed("alg is missing")),
    };
    let kid = match header.get("kid") {
        Some(Value::String(kid)) if !kid.is_empty() => kid.as_str(),
        Some(Value::String(_)) | None => return Err(JoseError::MissingKid),
        Some(_) => return Err(JoseError::Malformed("kid is not a string")),
    };
    match header.get("typ") {
        Some(Value::String(typ)) if normalize_typ(typ) == normalize_typ(expected_typ) => {}
        found => {
            return Err(JoseError::WrongType {
                expected: expected_typ.to_owned(),
                found: found.map(|v| excerpt(v.as_str().unwrap_or("<not a string>"))),
            });
        }
    }
    // We understand no extension, so any critical one must make us refuse;
    // an empty list is malformed (RFC 7515 §4.1.11: it MUST NOT be empty).
    if header.contains_key("crit") {
        return Err(JoseError::Malformed("crit header extensions are not supported"));
    }
    // RFC 7797 unencoded payloads would change what the signature covers.
    match header.get("b64") {
        None | Some(Value::Bool(true)) => {}
        Some(_) => {
            return Err(JoseError::Malformed("unencoded payloads (b64) are not supported"));
        }
    }

    let key = jwks.get(kid).ok_or_else(|| JoseError::UnknownKey { kid: excerpt(kid) })?;
    if key.alg != alg {
        return Err(JoseError::AlgorithmMismatch { header: alg, key: key.alg });
    }
    let signature = URL_SAFE_NO_PAD.decode(s64).map_err(|_| JoseError::Malformed("signature is not base64url"))?;
    // The signing input is the ASCII text "header.payload" exactly as received.
    let signing_input = &token.as_bytes()[..h64.len() + 1 + p64.len()];
    key.verifier.verify(signing_input, &signature).map_err(|_| JoseError::BadSignature)?;

    let payload_bytes = URL_SAFE_NO_PAD.decode(p64).map_err(|_| JoseError::Malformed("payload is not base64url"))?;
    let payload: Map<String, Value> =
        serde_json::from_slice(&payload_bytes).map_err(|_| JoseError::Malformed("payload is not a JSON object"))?;

    Ok(Verified { header, payload, kid: key.kid.clone(), alg })
}

#[cfg(test)]
mod tests;
