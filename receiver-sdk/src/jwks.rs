//! A transmitter's (or identity provider's) JWKS, fetched once and cached,
//! refetched on an unknown `kid` at most once per interval.
//!
//! The cache is independent of [`Receiver`](crate::Receiver): the caller
//! supplies the HTTP client, so a server that must not be tricked into
//! fetching internal URLs can hand in a client with its own SSRF guard.

use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use caep_schemas::jose::Jwks;
use reqwest::header::ACCEPT;

use crate::error::ReceiverError;
use crate::http;

/// Default minimum time between two fetches triggered by unknown `kid`s.
pub const DEFAULT_REFETCH_INTERVAL: Duration = Duration::from_secs(30);
/// Default age after which a cached JWKS is refreshed on the next use, so a
/// key the transmitter retired stops verifying even when no new `kid` shows up.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(3600);
/// Default timeout of one JWKS fetch.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Default cap on a JWKS document's size. Real ones are a few KiB; the cap
/// keeps a hostile or broken endpoint from filling memory.
pub const DEFAULT_MAX_BODY: usize = 256 * 1024;

/// How soon a fetch is retried when none has succeeded yet.
const FAILED_FETCH_RETRY: Duration = Duration::from_secs(1);

/// Where a fetched JWKS comes from.
struct Source {
    client: reqwest::Client,
    uri: String,
}

#[derive(Clone)]
struct Cached {
    jwks: Arc<Jwks>,
    fetched_at: Instant,
}

/// Book-keeping of the one fetch allowed at a time.
#[derive(Default)]
struct FetchState {
    /// When the last fetch started, successful or not: the rate limit counts
    /// failures too, so a dead endpoint is not hammered by every token.
    last_attempt: Option<Instant>,
}

/// A cached JWKS.
///
/// Built either from a `jwks_uri` ([`JwksCache::new`]), fetched on first use
/// and refetched when a token names a key it does not hold
/// ([`refresh_for_unknown_kid`](JwksCache::refresh_for_unknown_kid)), or from
/// a fixed key set ([`JwksCache::from_jwks`]) that never changes.
///
/// Concurrent callers share one fetch: the second waits for the first and
/// uses its result.
///
/// ```
/// use caep_receiver::jwks::JwksCache;
/// use caep_schemas::jose::{Algorithm, Jwks, SigningKey};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let key = SigningKey::generate(Algorithm::Es256)?;
/// let cache = JwksCache::from_jwks(Jwks::from_keys([&key]));
/// assert!(cache.get().await?.contains(key.kid()));
/// // A fixed key set is never refetched: an unknown kid stays unknown.
/// assert!(!cache.refresh_for_unknown_kid("other").await?.contains("other"));
/// # Ok(())
/// # }
/// ```
pub struct JwksCache {
    source: Option<Source>,
    current: RwLock<Option<Cached>>,
    fetch: tokio::sync::Mutex<FetchState>,
    refetch_interval: Duration,
    max_age: Option<Duration>,
    timeout: Duration,
    max_body: usize,
}

impl fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwksCache")
            .field("uri", &self.source.as_ref().map(|source| source.uri.as_str()))
            .field("keys", &self.cached().map(|cached| cached.jwks))
            .finish_non_exhaustive()
    }
}

impl JwksCache {
    /// A cache of the JWKS at `jwks_uri`, fetched with `client` on first use.
    ///
    /// ```no_run
    /// use caep_receiver::jwks::JwksCache;
    /// # async fn run() -> Result<(), caep_receiver::ReceiverError> {
    /// let cache = JwksCache::new(reqwest::Client::new(), "https://hub.example.com/ssf/jwks.json".into());
    /// let jwks = cache.get().await?;
    /// println!("{} keys", jwks.len());
    /// # Ok(()) }
    /// ```
    pub fn new(client: reqwest::Client, jwks_uri: String) -> Self {
        JwksCache {
            source: Some(Source { client, uri: jwks_uri }),
            current: RwLock::new(None),
            fetch: tokio::sync::Mutex::new(FetchState::default()),
            refetch_interval: DEFAULT_REFETCH_INTERVAL,
            max_age: Some(DEFAULT_MAX_AGE),
            timeout: DEFAULT_FETCH_TIMEOUT,
            max_body: DEFAULT_MAX_BODY,
        }
    }

    /// A fixed key set: never fetched, never refreshed.
    ///
    /// ```
    /// use caep_receiver::jwks::JwksCache;
    /// use caep_schemas::jose::Jwks;
    /// let cache = JwksCache::from_jwks(Jwks::default());
    /// assert_eq!(cache.uri(), None);
    /// ```
    pub fn from_jwks(jwks: Jwks) -> Self {
        JwksCache {
            source: None,
            current: RwLock::new(Some(Cached { jwks: Arc::new(jwks), fetched_at: Instant::now() })),
            fetch: tokio::sync::Mutex::new(FetchState::default()),
            refetch_interval: DEFAULT_REFETCH_INTERVAL,
            max_age: None,
            timeout: DEFAULT_FETCH_TIMEOUT,
            max_body: DEFAULT_MAX_BODY,
        }
    }

    /// Sets the minimum time between two refetches (default 30 s).
    ///
    /// ```
    /// # use caep_receiver::jwks::JwksCache;
    /// # use std::time::Duration;
    /// let cache = JwksCache::new(reqwest::Client::new(), "https://hub.example.com/ssf/jwks.json".into())
    ///     .with_refetch_interval(Duration::from_secs(5));
    /// ```
    pub fn with_refetch_interval(mut self, interval: Duration) -> Self {
        self.refetch_interval = interval;
        self
    }

    /// Sets the age after which [`get`](Self::get) refreshes the JWKS
    /// (default one hour; `None`: only unknown `kid`s trigger a refetch).
    /// A failed refresh keeps the old keys.
    pub fn with_max_age(mut self, max_age: Option<Duration>) -> Self {
        self.max_age = max_age;
        self
    }

    /// Sets the timeout of one fetch (default 10 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the largest JWKS document accepted, in bytes (default 256 KiB).
    pub fn with_max_body(mut self, max_body: usize) -> Self {
        self.max_body = max_body;
        self
    }

    /// The `jwks_uri`, or `None` for a fixed key set.
    pub fn uri(&self) -> Option<&str> {
        self.source.as_ref().map(|source| source.uri.as_str())
    }

    /// The current keys, fetching them if none are cached yet (or if they
    /// are older than the maximum age; a failed refresh keeps the old ones).
    ///
    /// # Errors
    ///
    /// When nothing is cached and the fetch fails (transport, status, a body
    /// that is too large or not a JWKS), or failed less than a second ago
    /// ([`ReceiverError::JwksUnavailable`]).
    pub async fn get(&self) -> Result<Arc<Jwks>, ReceiverError> {
        let cached = self.cached();
        let Some(source) = &self.source else {
            return Ok(cached.map(|cached| cached.jwks).unwrap_or_default());
        };
        if let Some(cached) = &cached
            && !self.is_stale(cached)
        {
            return Ok(Arc::clone(&cached.jwks));
        }
        let mut state = self.fetch.lock().await;
        // Another caller may have fetched while this one waited for the lock.
        let cached = self.cached();
        match cached {
            Some(cached) if !self.is_stale(&cached) => Ok(cached.jwks),
            Some(cached) if self.rate_limited(&state) => Ok(cached.jwks),
            Some(cached) => match self.fetch_now(source, &mut state).await {
                Ok(jwks) => Ok(jwks),
                Err(error) => {
                    tracing::warn!(jwks_uri = %source.uri, %error, "JWKS refresh failed; keeping the cached keys");
                    Ok(cached.jwks)
                }
            },
            // Nothing to verify with: retry soon, but not for every token
            // that arrives while the endpoint is down.
            None if state.last_attempt.is_some_and(|last| last.elapsed() < FAILED_FETCH_RETRY) => {
                Err(ReceiverError::JwksUnavailable { url: source.uri.clone() })
            }
            None => self.fetch_now(source, &mut state).await,
        }
    }

    /// Called when a token names `kid` and the cached keys lack it: refetches
    /// the JWKS unless the last fetch was less than the refetch interval ago,
    /// and returns the keys. The caller retries the verification once with
    /// them; if the key is still missing, the transmitter does not publish it.
    ///
    /// Concurrent callers share one fetch: a caller that waited for another's
    /// fetch uses its result. A fixed key set is returned unchanged.
    ///
    /// # Errors
    ///
    /// [`ReceiverError::RefetchRateLimited`] when the key is missing and the
    /// rate limit forbids asking again yet: the key may have been published
    /// since (a rotation), so the caller should treat the token as "not now"
    /// rather than refuse it for good. Fetch errors as in [`get`](Self::get).
    pub async fn refresh_for_unknown_kid(&self, kid: &str) -> Result<Arc<Jwks>, ReceiverError> {
        let Some(source) = &self.source else {
            return Ok(self.cached().map(|cached| cached.jwks).unwrap_or_default());
        };
        let asked_at = Instant::now();
        let mut state = self.fetch.lock().await;
        let cached = self.cached();
        if let Some(cached) = &cached {
            // A concurrent caller's fetch may already have brought the key, or,
            // having completed while we waited, shown that it is not published.
            if cached.jwks.contains(kid) || cached.fetched_at >= asked_at {
                return Ok(Arc::clone(&cached.jwks));
            }
        }
        if let Some(last) = state.last_attempt.filter(|last| last.elapsed() < self.refetch_interval) {
            tracing::debug!(jwks_uri = %source.uri, kid, "unknown kid; JWKS refetch rate-limited");
            return Err(ReceiverError::RefetchRateLimited {
                url: source.uri.clone(),
                retry_in: self.refetch_interval.saturating_sub(last.elapsed()),
            });
        }
        tracing::info!(jwks_uri = %source.uri, kid, "unknown kid; refetching the JWKS");
        self.fetch_now(source, &mut state).await
    }

    fn cached(&self) -> Option<Cached> {
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn is_stale(&self, cached: &Cached) -> bool {
        self.source.is_some() && self.max_age.is_some_and(|max_age| cached.fetched_at.elapsed() >= max_age)
    }

    fn rate_limited(&self, state: &FetchState) -> bool {
        state.last_attempt.is_some_and(|last| last.elapsed() < self.refetch_interval)
    }

    async fn fetch_now(&self, source: &Source, state: &mut FetchState) -> Result<Arc<Jwks>, ReceiverError> {
        state.last_attempt = Some(Instant::now());
        let url = source.uri.as_str();
        let request =
            source.client.get(url).header(ACCEPT, "application/jwk-set+json, application/json").timeout(self.timeout);
        let response = http::send(url, request).await?;
        let body = http::read_limited(url, response, self.max_body).await?;
        let text = std::str::from_utf8(&body).map_err(|_| ReceiverError::invalid_response(url, "not UTF-8"))?;
        let jwks = Jwks::from_json(text).map_err(|error| ReceiverError::invalid_response(url, error.to_string()))?;
        let jwks = Arc::new(jwks);
        tracing::debug!(jwks_uri = url, keys = jwks.len(), "JWKS fetched");
        *self.current.write().unwrap_or_else(PoisonError::into_inner) =
            Some(Cached { jwks: Arc::clone(&jwks), fetched_at: Instant::now() });
        Ok(jwks)
    }
}
