//! Per-receiver bounds on what one receiver can make the transmitter do, so
//! a flood from one receiver leaves every other one served: a rate limit on
//! authenticated calls (GCRA, the `governor` crate) and a cap on the long
//! polls one receiver holds open at once.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::error::SsfError;

/// The per-receiver limits.
pub struct ReceiverLimits {
    calls: DefaultKeyedRateLimiter<String>,
    max_long_polls: usize,
    long_polls: Arc<Mutex<HashMap<String, usize>>>,
    /// Calls counted, to prune idle receivers' rate state now and then.
    counted: AtomicU64,
}

/// Calls between two prunings of idle receivers' rate state.
const PRUNE_EVERY: u64 = 4096;

impl ReceiverLimits {
    /// `per_second` calls a second with bursts of twice that, and at most
    /// `max_long_polls` long polls open per receiver.
    pub fn new(per_second: u32, max_long_polls: usize) -> Self {
        let rate = NonZeroU32::new(per_second.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(per_second.max(1).saturating_mul(2)).unwrap_or(NonZeroU32::MIN);
        ReceiverLimits {
            calls: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            max_long_polls: max_long_polls.max(1),
            long_polls: Arc::new(Mutex::new(HashMap::new())),
            counted: AtomicU64::new(0),
        }
    }

    /// Counts one call of `receiver_id`: 429 with `Retry-After` past its rate.
    pub fn call(&self, receiver_id: &str) -> Result<(), SsfError> {
        if self.counted.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            self.calls.retain_recent();
        }
        match self.calls.check_key(&receiver_id.to_owned()) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(governor::clock::Clock::now(self.calls.clock()));
                Err(SsfError::TooManyRequests { retry_after_secs: wait.as_secs().max(1) })
            }
        }
    }

    /// Holds one of `receiver_id`'s long-poll slots until the guard drops;
    /// 429 when all are taken.
    pub fn long_poll(&self, receiver_id: &str) -> Result<LongPollSlot, SsfError> {
        let mut open = self.long_polls.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(receiver_id.to_owned()).or_insert(0);
        if *count >= self.max_long_polls {
            return Err(SsfError::TooManyRequests { retry_after_secs: 1 });
        }
        *count += 1;
        Ok(LongPollSlot { receiver_id: receiver_id.to_owned(), open: Arc::clone(&self.long_polls) })
    }
}

/// An open long poll; its slot is free again when this drops.
pub struct LongPollSlot {
    receiver_id: String,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for LongPollSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.receiver_id) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.receiver_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receiver_past_its_rate_waits_and_others_do_not() {
        let limits = ReceiverLimits::new(5, 2);
        let allowed = (0..50).filter(|_| limits.call("flooder").is_ok()).count();
        assert!((10..=11).contains(&allowed), "burst of twice the rate, then refused: {allowed}");
        match limits.call("flooder") {
            Err(SsfError::TooManyRequests { retry_after_secs }) => assert!(retry_after_secs >= 1),
            other => panic!("{other:?}"),
        }
        assert!(limits.call("bystander").is_ok(), "another receiver is unaffected");
    }

    #[test]
    fn long_poll_slots_are_capped_and_freed() {
        let limits = ReceiverLimits::new(100, 2);
        let first = limits.long_poll("r").expect("slot");
        let _second = limits.long_poll("r").expect("slot");
        assert!(matches!(limits.long_poll("r"), Err(SsfError::TooManyRequests { .. })));
        assert!(limits.long_poll("other").is_ok());
        drop(first);
        assert!(limits.long_poll("r").is_ok(), "a finished poll frees its slot");
    }
}
