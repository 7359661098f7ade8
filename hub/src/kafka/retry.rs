//! Retrying work that must not be skipped: in Kafka mode an offset may only
//! move past a record once its effect is done, so a failing step (the
//! broker or the disk being away) is retried until it succeeds, with
//! exponential backoff from the `backoff` crate, each failure logged.

use std::future::Future;
use std::time::Duration;

use backoff::ExponentialBackoffBuilder;
use backoff::backoff::Backoff;

/// Runs `attempt` until it succeeds; `what` names the work in the logs.
pub async fn until_ok<T, E, F, Fut>(what: &str, mut attempt: F) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = ExponentialBackoffBuilder::new()
        .with_initial_interval(Duration::from_millis(50))
        .with_max_interval(Duration::from_secs(5))
        .with_max_elapsed_time(None)
        .build();
    loop {
        match attempt().await {
            Ok(done) => return done,
            Err(error) => {
                tracing::warn!(%error, "{what} failed; retrying");
                let wait = backoff.next_backoff().unwrap_or(Duration::from_secs(5));
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn retries_until_the_attempt_succeeds() {
        let calls = AtomicU32::new(0);
        let value = until_ok("test step", || {
            let call = calls.fetch_add(1, Ordering::SeqCst);
            async move { if call < 3 { Err("not yet") } else { Ok(call) } }
        })
        .await;
        assert_eq!(value, 3);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }
}
