//! `jti` de-duplication: a bounded, time-windowed memory of the SETs already
//! seen and what they were answered.
//!
//! Transmitters retry: a push whose 202 was lost and a poll whose `ack` never
//! arrived both bring the same SET (same `jti`) again. The receiver must act
//! on it once and answer the duplicate exactly as it answered the first
//! delivery (RFC 8935 §2.3, RFC 8936 §2.4), so the cache keeps the first
//! outcome per `jti`.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Default number of `jti`s remembered.
pub const DEFAULT_CAPACITY: usize = 100_000;
/// Default time a `jti` is remembered.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// What happened to the first SET seen with a `jti`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplayOutcome {
    /// It verified and is being handled right now.
    Pending,
    /// It verified and the application handled it.
    Accepted,
    /// Its signature verified but a claim check refused it with this RFC
    /// 8935 `err` code and description.
    Rejected {
        /// The RFC 8935 error code.
        err: &'static str,
        /// The description answered.
        description: String,
    },
}

struct Entry {
    outcome: ReplayOutcome,
    /// Distinguishes this entry from an earlier one for the same `jti` that
    /// was released, so a stale expiry record does not evict it.
    generation: u64,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    /// Insertion order, oldest first: (inserted at, jti, generation).
    order: VecDeque<(Instant, String, u64)>,
    next_generation: u64,
}

/// A bounded, time-windowed map from `jti` to the first outcome seen for it.
///
/// Entries older than the window, and the oldest entries beyond the capacity,
/// are forgotten. Only SETs whose signature verified are ever recorded, so a
/// forger cannot poison the cache with a `jti` it does not own.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use caep_receiver::replay::{Claim, ReplayCache, ReplayOutcome};
///
/// let cache = Arc::new(ReplayCache::new(1000, Duration::from_secs(3600)));
/// let Claim::Fresh(first) = ReplayCache::claim(&cache, "jti-1") else { panic!() };
/// assert!(matches!(ReplayCache::claim(&cache, "jti-1"), Claim::Seen(ReplayOutcome::Pending)));
/// first.accept();
/// assert!(matches!(ReplayCache::claim(&cache, "jti-1"), Claim::Seen(ReplayOutcome::Accepted)));
/// ```
pub struct ReplayCache {
    inner: Mutex<Inner>,
    capacity: usize,
    window: Duration,
}

impl fmt::Debug for ReplayCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayCache")
            .field("len", &self.len())
            .field("capacity", &self.capacity)
            .field("window", &self.window)
            .finish()
    }
}

impl Default for ReplayCache {
    /// 100 000 `jti`s for 24 hours.
    fn default() -> Self {
        ReplayCache::new(DEFAULT_CAPACITY, DEFAULT_WINDOW)
    }
}

/// The result of [`ReplayCache::claim`].
#[derive(Debug)]
pub enum Claim {
    /// First sighting: the `jti` is now [`ReplayOutcome::Pending`]; settle it
    /// with the [`ClaimGuard`] (dropping the guard releases it).
    Fresh(ClaimGuard),
    /// Seen before, with this outcome.
    Seen(ReplayOutcome),
}

impl ReplayCache {
    /// A cache remembering at most `capacity` `jti`s for `window` each.
    ///
    /// ```
    /// # use caep_receiver::replay::ReplayCache;
    /// let cache = ReplayCache::new(10, std::time::Duration::from_secs(60));
    /// assert!(cache.is_empty());
    /// ```
    pub fn new(capacity: usize, window: Duration) -> Self {
        ReplayCache { inner: Mutex::new(Inner::default()), capacity: capacity.max(1), window }
    }

    /// Number of `jti`s remembered.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no `jti` is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The outcome recorded for `jti`, if any.
    pub fn outcome(&self, jti: &str) -> Option<ReplayOutcome> {
        let mut inner = self.lock();
        self.expire(&mut inner, Instant::now());
        inner.entries.get(jti).map(|entry| entry.outcome.clone())
    }

    /// Looks `jti` up and, on its first sighting, records it as pending.
    /// An associated function because the guard keeps the cache alive.
    pub fn claim(this: &Arc<Self>, jti: &str) -> Claim {
        let mut inner = this.lock();
        let now = Instant::now();
        this.expire(&mut inner, now);
        if let Some(entry) = inner.entries.get(jti) {
            return Claim::Seen(entry.outcome.clone());
        }
        let generation = this.insert(&mut inner, jti, ReplayOutcome::Pending, now);
        Claim::Fresh(ClaimGuard { cache: Arc::clone(this), jti: jti.to_owned(), generation, settled: false })
    }

    fn insert(&self, inner: &mut Inner, jti: &str, outcome: ReplayOutcome, now: Instant) -> u64 {
        let generation = inner.next_generation;
        inner.next_generation += 1;
        inner.entries.insert(jti.to_owned(), Entry { outcome, generation });
        inner.order.push_back((now, jti.to_owned(), generation));
        while inner.entries.len() > self.capacity {
            let Some((_, oldest, generation)) = inner.order.pop_front() else { break };
            remove_if_current(inner, &oldest, generation);
        }
        // Released entries leave their order records behind; compact when
        // they pile up so the queue stays proportional to the capacity.
        if inner.order.len() > 2 * self.capacity {
            let Inner { entries, order, .. } = inner;
            order.retain(|(_, jti, generation)| entries.get(jti).is_some_and(|entry| entry.generation == *generation));
        }
        generation
    }

    fn expire(&self, inner: &mut Inner, now: Instant) {
        while let Some((at, _, _)) = inner.order.front() {
            if now.duration_since(*at) < self.window {
                break;
            }
            let Some((_, jti, generation)) = inner.order.pop_front() else { break };
            remove_if_current(inner, &jti, generation);
        }
    }

    fn settle(&self, jti: &str, generation: u64, outcome: Option<ReplayOutcome>) {
        let mut inner = self.lock();
        match outcome {
            Some(outcome) => {
                if let Some(entry) = inner.entries.get_mut(jti).filter(|entry| entry.generation == generation) {
                    entry.outcome = outcome;
                }
            }
            None => remove_if_current(&mut inner, jti, generation),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The map holds no invariant a panicking holder could break halfway.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn remove_if_current(inner: &mut Inner, jti: &str, generation: u64) {
    if inner.entries.get(jti).is_some_and(|entry| entry.generation == generation) {
        inner.entries.remove(jti);
    }
}

/// A pending `jti`, settled by [`accept`](ClaimGuard::accept),
/// [`reject`](ClaimGuard::reject) or [`release`](ClaimGuard::release).
/// Dropping it unsettled releases it, so a handler that panicked or was
/// cancelled leaves the SET to be delivered again.
#[must_use = "an unsettled claim is released when dropped"]
pub struct ClaimGuard {
    cache: Arc<ReplayCache>,
    jti: String,
    generation: u64,
    settled: bool,
}

impl fmt::Debug for ClaimGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClaimGuard").field("jti", &self.jti).field("settled", &self.settled).finish()
    }
}

impl ClaimGuard {
    /// The claimed `jti`.
    pub fn jti(&self) -> &str {
        &self.jti
    }

    /// Records that the SET was handled: every later copy is a duplicate.
    pub fn accept(mut self) {
        self.finish(Some(ReplayOutcome::Accepted));
    }

    /// Records that the SET was refused with `err`: every later copy gets
    /// the same answer.
    pub fn reject(mut self, err: &'static str, description: String) {
        self.finish(Some(ReplayOutcome::Rejected { err, description }));
    }

    /// Forgets the `jti`: the next copy is handled as if it were the first.
    pub fn release(mut self) {
        self.finish(None);
    }

    fn finish(&mut self, outcome: Option<ReplayOutcome>) {
        if !self.settled {
            self.settled = true;
            self.cache.settle(&self.jti, self.generation, outcome);
        }
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        self.finish(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh(cache: &Arc<ReplayCache>, jti: &str) -> ClaimGuard {
        match ReplayCache::claim(cache, jti) {
            Claim::Fresh(guard) => guard,
            Claim::Seen(outcome) => panic!("{jti} already seen: {outcome:?}"),
        }
    }

    #[test]
    fn first_outcome_is_kept_and_released_claims_are_forgotten() {
        let cache = Arc::new(ReplayCache::default());
        fresh(&cache, "a").accept();
        assert_eq!(cache.outcome("a"), Some(ReplayOutcome::Accepted));
        fresh(&cache, "b").reject("invalid_audience", "not for us".into());
        assert!(matches!(
            ReplayCache::claim(&cache, "b"),
            Claim::Seen(ReplayOutcome::Rejected { err: "invalid_audience", .. })
        ));
        let pending = fresh(&cache, "c");
        drop(pending);
        assert_eq!(cache.outcome("c"), None, "dropping a claim releases it");
        fresh(&cache, "c").release();
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn capacity_evicts_the_oldest() {
        let cache = Arc::new(ReplayCache::new(2, DEFAULT_WINDOW));
        for jti in ["a", "b", "c"] {
            fresh(&cache, jti).accept();
        }
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.outcome("a"), None);
        assert_eq!(cache.outcome("c"), Some(ReplayOutcome::Accepted));
    }

    #[test]
    fn entries_expire_after_the_window() {
        let cache = Arc::new(ReplayCache::new(10, Duration::from_millis(20)));
        fresh(&cache, "a").accept();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(cache.outcome("a"), None);
        assert!(cache.is_empty());
    }

    #[test]
    fn churn_of_released_claims_stays_bounded() {
        let cache = Arc::new(ReplayCache::new(4, DEFAULT_WINDOW));
        for _ in 0..100 {
            fresh(&cache, "x").release();
        }
        assert!(cache.lock().order.len() <= 9);
    }
}
