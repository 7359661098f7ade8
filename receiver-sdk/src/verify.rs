//! Verifying SETs as strictly as the standards ask: signature with the
//! algorithm pinned to the key (ES256, RS256, EdDSA only; never `none` or
//! HMAC), `typ: secevent+jwt`, the SSF profile of the claims, `iss`, `aud`,
//! `iat` not in the future, and `jti` de-duplication.
//!
//! [`SetVerifier`] does not depend on [`Receiver`](crate::Receiver): a server
//! that accepts SETs from several issuers builds one verifier per issuer.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use caep_schemas::jose::{self, Algorithm, JoseError};
use caep_schemas::set::{Expectations, SET_TYP, SecurityEventToken, SetError, now_secs};

use crate::error::{ReceiverError, truncate};
use crate::jwks::JwksCache;
use crate::replay::{Claim, ClaimGuard, ReplayCache, ReplayOutcome};

/// Default tolerance for an `iat` ahead of our clock.
pub const DEFAULT_MAX_FUTURE_SKEW: Duration = Duration::from_secs(60);

/// Why a SET was not accepted.
///
/// [`rfc8935_err`](VerifyError::rfc8935_err) is the code to answer (RFC 8935
/// §2.4 for push, RFC 8936 `setErrs` for poll), unless
/// [`is_transient`](VerifyError::is_transient): then the SET may verify
/// later, so nothing should be answered that makes the transmitter give up
/// on it (push answers 503, poll neither acknowledges nor reports it).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The token failed a JOSE, profile or claim check.
    #[error(transparent)]
    Set(#[from] SetError),
    /// A SET with this `jti` was refused before; the same answer is repeated.
    #[error("a SET with this jti was refused before: {description}")]
    Repeated {
        /// The `jti`.
        jti: String,
        /// The code answered the first time.
        err: &'static str,
        /// The description answered the first time.
        description: String,
    },
    /// A SET with this `jti` is being handled right now (a concurrent retry).
    #[error("a SET with this jti is being processed")]
    InProgress {
        /// The `jti`.
        jti: String,
    },
    /// The verification keys could not be fetched, or the token names a key
    /// the cache lacks and the JWKS may not be refetched yet (it may have
    /// been rotated moments ago, so this is "not now", not "never").
    #[error("verification keys unavailable: {0}")]
    KeysUnavailable(#[source] ReceiverError),
}

impl VerifyError {
    /// The RFC 8935 §2.4 error code: `invalid_request`, `invalid_key`,
    /// `invalid_issuer` or `invalid_audience`.
    ///
    /// ```
    /// use caep_receiver::verify::VerifyError;
    /// use caep_schemas::set::SetError;
    /// assert_eq!(VerifyError::from(SetError::WrongAudience).rfc8935_err(), "invalid_audience");
    /// assert_eq!(VerifyError::from(SetError::IssuedInFuture(3600)).rfc8935_err(), "invalid_request");
    /// ```
    pub fn rfc8935_err(&self) -> &'static str {
        match self {
            VerifyError::Set(error) => error.rfc8935_err(),
            VerifyError::Repeated { err, .. } => err,
            // Only used if a caller answers a transient failure anyway.
            VerifyError::InProgress { .. } => "invalid_request",
            VerifyError::KeysUnavailable(_) => "invalid_key",
        }
    }

    /// Whether the same SET may verify later (keys unreachable, a concurrent
    /// copy in progress): such a SET must not be refused for good.
    pub fn is_transient(&self) -> bool {
        matches!(self, VerifyError::InProgress { .. } | VerifyError::KeysUnavailable(_))
    }

    /// The description to answer the transmitter: the error's message, cut
    /// to a loggable length. It never contains key material.
    pub fn description(&self) -> String {
        match self {
            VerifyError::Repeated { description, .. } => description.clone(),
            other => truncate(&other.to_string()),
        }
    }
}

/// A SET that passed every check.
///
/// When [`duplicate`](Verified::duplicate) is false, this SET is the first
/// with its `jti` and holds a claim on it: call [`accept`](Verified::accept)
/// once the application has handled it, so copies are answered as
/// duplicates. Dropping it without accepting forgets the `jti`, so the next
/// copy is handled again (the behaviour wanted when the handler failed).
pub struct Verified {
    /// The SET's claims.
    pub set: SecurityEventToken,
    /// The `kid` of the key that verified it.
    pub kid: String,
    /// The algorithm of that key.
    pub alg: Algorithm,
    /// A SET with this `jti` was already accepted: answer success without
    /// handling it again.
    pub duplicate: bool,
    claim: Option<ClaimGuard>,
}

impl fmt::Debug for Verified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verified")
            .field("jti", &self.set.jti)
            .field("event", &self.set.event.type_uri())
            .field("kid", &self.kid)
            .field("duplicate", &self.duplicate)
            .finish_non_exhaustive()
    }
}

impl Verified {
    /// Records the `jti` as accepted: later copies verify as duplicates.
    pub fn accept(mut self) {
        if let Some(claim) = self.claim.take() {
            claim.accept();
        }
    }
}

/// Verifies SETs from one issuer for one audience.
///
/// ```
/// use std::sync::Arc;
/// use caep_receiver::jwks::JwksCache;
/// use caep_receiver::verify::SetVerifier;
/// use caep_schemas::event::{Event, SessionRevoked};
/// use caep_schemas::jose::{Algorithm, Jwks, SigningKey};
/// use caep_schemas::set::SecurityEventToken;
/// use caep_schemas::subject::SubjectId;
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let key = SigningKey::generate(Algorithm::Es256)?;
/// let verifier = SetVerifier::new(
///     "https://hub.example.com",
///     "https://rp.example.com",
///     JwksCache::from_jwks(Jwks::from_keys([&key])),
/// );
/// let set = SecurityEventToken::new(
///     "https://hub.example.com",
///     "https://rp.example.com",
///     SubjectId::session_of(SubjectId::opaque("s1"), None),
///     Event::SessionRevoked(SessionRevoked::default()),
/// );
/// let token = set.sign(&key)?;
///
/// let verified = verifier.verify(&token).await?;
/// assert!(!verified.duplicate);
/// verified.accept();
/// assert!(verifier.verify(&token).await?.duplicate);
///
/// let other = SetVerifier::new(
///     "https://hub.example.com",
///     "https://other-rp.example.com",
///     JwksCache::from_jwks(Jwks::from_keys([&key])),
/// );
/// assert_eq!(other.verify(&token).await.unwrap_err().rfc8935_err(), "invalid_audience");
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct SetVerifier {
    issuer: String,
    audience: String,
    jwks: JwksCache,
    replay: Arc<ReplayCache>,
    max_future_skew: Duration,
    max_age: Option<Duration>,
    algorithms: Vec<Algorithm>,
}

impl SetVerifier {
    /// A verifier expecting `iss == issuer` and `audience` in `aud`, with keys
    /// from `jwks`, the default replay cache (100 000 `jti`s, 24 h) and 60 s
    /// of tolerated clock skew.
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>, jwks: JwksCache) -> Self {
        SetVerifier {
            issuer: issuer.into(),
            audience: audience.into(),
            jwks,
            replay: Arc::new(ReplayCache::default()),
            max_future_skew: DEFAULT_MAX_FUTURE_SKEW,
            max_age: None,
            algorithms: Algorithm::ALL.to_vec(),
        }
    }

    /// Narrows the accepted algorithms (default: ES256, RS256 and EdDSA, the
    /// only ones [`caep_schemas::jose`] knows; `none` and HMAC never pass).
    /// The CAEP interoperability profile, for example, asks for RS256 only.
    ///
    /// ```
    /// # use caep_receiver::{jwks::JwksCache, verify::SetVerifier};
    /// use caep_schemas::jose::Algorithm;
    /// let verifier = SetVerifier::new("https://hub.example.com", "https://rp.example.com",
    ///     JwksCache::from_jwks(Default::default()))
    ///     .with_algorithms(&[Algorithm::Rs256]);
    /// ```
    pub fn with_algorithms(mut self, algorithms: &[Algorithm]) -> Self {
        self.algorithms = algorithms.to_vec();
        self
    }

    /// Uses `replay` for `jti` de-duplication.
    ///
    /// ```
    /// # use caep_receiver::{jwks::JwksCache, replay::ReplayCache, verify::SetVerifier};
    /// # use std::time::Duration;
    /// let verifier = SetVerifier::new("https://hub.example.com", "https://rp.example.com",
    ///     JwksCache::from_jwks(Default::default()))
    ///     .with_replay_cache(ReplayCache::new(10_000, Duration::from_secs(3600)));
    /// ```
    pub fn with_replay_cache(mut self, replay: ReplayCache) -> Self {
        self.replay = Arc::new(replay);
        self
    }

    /// Sets how far in the future `iat` may be (default 60 s).
    pub fn with_max_future_skew(mut self, skew: Duration) -> Self {
        self.max_future_skew = skew;
        self
    }

    /// Refuses SETs whose `iat` is older than `max_age` (default: any age,
    /// since a push retried for a day is old but genuine).
    pub fn with_max_age(mut self, max_age: Option<Duration>) -> Self {
        self.max_age = max_age;
        self
    }

    /// The expected issuer.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The expected audience.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// The key cache.
    pub fn jwks(&self) -> &JwksCache {
        &self.jwks
    }

    /// The `jti` cache.
    pub fn replay_cache(&self) -> &ReplayCache {
        &self.replay
    }

    /// Verifies one compact SET.
    ///
    /// The order matters: the signature is checked before anything in the
    /// payload is believed, and the `jti` is looked up only then, so a forged
    /// token can neither be answered "duplicate" nor poison the cache. A
    /// token naming a key the cache lacks triggers one (rate-limited) JWKS
    /// refetch and a second attempt. Claim failures of a genuinely signed
    /// SET are remembered under its `jti` and repeated for its copies.
    ///
    /// # Errors
    ///
    /// [`VerifyError`]; see [`VerifyError::rfc8935_err`] and
    /// [`VerifyError::is_transient`].
    pub async fn verify(&self, token: &str) -> Result<Verified, VerifyError> {
        // Another issuer's SET is refused for good before any key fetch: no
        // JWKS request on a stranger's behalf, and no "retry later" answer
        // that would make a misconfigured transmitter retry for a day.
        if let Ok(iss) = caep_schemas::set::unverified_issuer(token)
            && iss != self.issuer
        {
            return Err(SetError::WrongIssuer { found: truncate(&iss) }.into());
        }
        let jwks = self.jwks.get().await.map_err(VerifyError::KeysUnavailable)?;
        let jose_verified = match jose::verify(token, &jwks, SET_TYP) {
            Err(JoseError::UnknownKey { kid }) => {
                let jwks = self.jwks.refresh_for_unknown_kid(&kid).await.map_err(VerifyError::KeysUnavailable)?;
                jose::verify(token, &jwks, SET_TYP).map_err(SetError::from)?
            }
            other => other.map_err(SetError::from)?,
        };
        if !self.algorithms.contains(&jose_verified.alg) {
            return Err(SetError::from(JoseError::UnsupportedAlgorithm { alg: jose_verified.alg.to_string() }).into());
        }
        let set = SecurityEventToken::from_claims(jose_verified.payload)?;
        let claim = match ReplayCache::claim(&self.replay, &set.jti) {
            Claim::Fresh(claim) => claim,
            Claim::Seen(ReplayOutcome::Accepted) => {
                tracing::debug!(jti = %set.jti, "duplicate SET; already accepted");
                return Ok(Verified {
                    set,
                    kid: jose_verified.kid,
                    alg: jose_verified.alg,
                    duplicate: true,
                    claim: None,
                });
            }
            Claim::Seen(ReplayOutcome::Pending) => return Err(VerifyError::InProgress { jti: set.jti }),
            Claim::Seen(ReplayOutcome::Rejected { err, description }) => {
                return Err(VerifyError::Repeated { jti: set.jti, err, description });
            }
        };
        let expect = Expectations {
            issuer: &self.issuer,
            audience: &self.audience,
            max_future_skew_secs: i64::try_from(self.max_future_skew.as_secs()).unwrap_or(i64::MAX),
            max_age_secs: self.max_age.map(|age| i64::try_from(age.as_secs()).unwrap_or(i64::MAX)),
        };
        if let Err(error) = set.check(&expect, now_secs()) {
            claim.reject(error.rfc8935_err(), truncate(&error.to_string()));
            return Err(error.into());
        }
        Ok(Verified { set, kid: jose_verified.kid, alg: jose_verified.alg, duplicate: false, claim: Some(claim) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use caep_schemas::event::{Event, SessionRevoked};
    use caep_schemas::jose::{Jwks, SigningKey};
    use caep_schemas::subject::SubjectId;

    const ISS: &str = "https://hub.example.com";
    const AUD: &str = "https://rp.example.com";

    fn signed(key: &SigningKey, aud: &str) -> String {
        let event = Event::SessionRevoked(SessionRevoked::default());
        SecurityEventToken::new(ISS, aud, SubjectId::session_of(SubjectId::opaque("s"), None), event)
            .sign(key)
            .expect("sign")
    }

    #[tokio::test]
    async fn the_algorithm_allowlist_can_be_narrowed() {
        let key = SigningKey::generate(Algorithm::Es256).expect("key");
        let verifier = SetVerifier::new(ISS, AUD, JwksCache::from_jwks(Jwks::from_keys([&key])))
            .with_algorithms(&[Algorithm::Rs256]);
        let error = verifier.verify(&signed(&key, AUD)).await.expect_err("ES256 refused");
        assert_eq!(error.rfc8935_err(), "invalid_request");
        assert!(verifier.replay_cache().is_empty(), "nothing recorded for a refused algorithm");
    }

    #[tokio::test]
    async fn a_refused_set_is_refused_again_and_an_unaccepted_one_is_handled_again() {
        let key = SigningKey::generate(Algorithm::EdDsa).expect("key");
        let verifier = SetVerifier::new(ISS, AUD, JwksCache::from_jwks(Jwks::from_keys([&key])));
        let wrong_aud = signed(&key, "https://other.example.com");
        assert!(matches!(verifier.verify(&wrong_aud).await, Err(VerifyError::Set(SetError::WrongAudience))));
        let again = verifier.verify(&wrong_aud).await.expect_err("still refused");
        assert!(matches!(again, VerifyError::Repeated { err: "invalid_audience", .. }), "{again}");

        let token = signed(&key, AUD);
        let first = verifier.verify(&token).await.expect("verifies");
        let concurrent = verifier.verify(&token).await.expect_err("a copy while the first is handled");
        assert!(concurrent.is_transient());
        drop(first);
        let retried = verifier.verify(&token).await.expect("handled again after a failure");
        assert!(!retried.duplicate);
        retried.accept();
        assert!(verifier.verify(&token).await.expect("duplicate").duplicate);
    }

    #[tokio::test]
    async fn another_issuers_set_is_refused_for_good_without_fetching_keys() {
        // Keys that cannot be fetched: any key fetch would make this transient.
        let unreachable = JwksCache::new(reqwest::Client::new(), "http://127.0.0.1:9/jwks.json".into());
        let verifier = SetVerifier::new(ISS, AUD, unreachable);
        let key = SigningKey::generate(Algorithm::Es256).expect("key");
        let event = Event::SessionRevoked(SessionRevoked::default());
        let stranger = SecurityEventToken::new("https://another-hub.example", AUD, SubjectId::opaque("s"), event)
            .sign(&key)
            .expect("sign");
        let error = verifier.verify(&stranger).await.expect_err("refused");
        assert_eq!(error.rfc8935_err(), "invalid_issuer");
        assert!(!error.is_transient(), "{error}");
        let ours = verifier.verify(&signed(&key, AUD)).await.expect_err("keys unreachable");
        assert!(ours.is_transient(), "the expected issuer's SET still waits for keys: {ours}");
    }
}
