//! The `(iss, jti)` of every IdP SET ingested, so a replay gets the first
//! answer and has no second effect; kept as long as a replay could still
//! pass the `iat` check, then pruned oldest first through an age index.

use caep_transmitter::store::StoreError;
use redb::{ReadableTable, TableDefinition, WriteTransaction};

/// `(iss, jti)` → when it was ingested.
const INGESTED: TableDefinition<(&str, &str), u64> = TableDefinition::new("ingested_jtis");
/// `(when, iss, jti)`: the same records by age, for pruning.
const INGESTED_BY_AGE: TableDefinition<(u64, &str, &str), ()> = TableDefinition::new("ingested_jtis_by_age");

/// How old an IdP SET may be (its `iat`) by default; a replay older than
/// the accepted age is refused by its `iat` alone, so its `(iss, jti)`
/// record is no longer needed (`CAEP_HUB_MAX_SET_AGE_SECS`).
pub const MAX_SET_AGE_SECS: u64 = 24 * 3600;

/// How long a replay record is kept for SETs accepted up to `max_age_secs`
/// old: a SET is accepted with an `iat` up to 60 s ahead of the hub's
/// clock, so a replay may pass the age check until 60 s past that age
/// after the record; five minutes of margin cover it.
pub fn kept_ms(max_age_secs: u64) -> u64 {
    max_age_secs.saturating_add(300).saturating_mul(1000)
}

fn storage<E: std::fmt::Display>(error: E) -> StoreError {
    StoreError::storage(error)
}

/// Whether `(iss, jti)` was ingested already.
pub fn seen(txn: &WriteTransaction, iss: &str, jti: &str) -> Result<bool, StoreError> {
    let ingested = txn.open_table(INGESTED).map_err(storage)?;
    Ok(ingested.get((iss, jti)).map_err(storage)?.is_some())
}

/// Records that `(iss, jti)` was ingested at `now_ms`.
pub fn record(txn: &WriteTransaction, iss: &str, jti: &str, now_ms: u64) -> Result<(), StoreError> {
    txn.open_table(INGESTED).map_err(storage)?.insert((iss, jti), now_ms).map_err(storage)?;
    txn.open_table(INGESTED_BY_AGE).map_err(storage)?.insert((now_ms, iss, jti), ()).map_err(storage)?;
    Ok(())
}

/// Forgets up to `limit` records older than `kept_ms`, oldest first.
/// Returns how many went.
pub fn prune(txn: &WriteTransaction, now_ms: u64, kept_ms: u64, limit: usize) -> Result<usize, StoreError> {
    let horizon = now_ms.saturating_sub(kept_ms);
    let old: Vec<(u64, String, String)> = {
        let by_age = txn.open_table(INGESTED_BY_AGE).map_err(storage)?;
        let mut old = Vec::new();
        for row in by_age.range((0, "", "")..(horizon, "", "")).map_err(storage)?.take(limit) {
            let (key, _) = row.map_err(storage)?;
            let (at, iss, jti) = key.value();
            old.push((at, iss.to_owned(), jti.to_owned()));
        }
        old
    };
    let mut ingested = txn.open_table(INGESTED).map_err(storage)?;
    let mut by_age = txn.open_table(INGESTED_BY_AGE).map_err(storage)?;
    for (at, iss, jti) in &old {
        ingested.remove((iss.as_str(), jti.as_str())).map_err(storage)?;
        by_age.remove((*at, iss.as_str(), jti.as_str())).map_err(storage)?;
    }
    Ok(old.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use caep_transmitter::store::{Commit, Store};

    #[tokio::test]
    async fn records_older_than_the_accepted_age_are_pruned_oldest_first() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("p.redb")).expect("open");
        let day_ms = 24 * 3600 * 1000;
        let now = 10 * day_ms;
        let (removed, old_seen, recent_seen) = store
            .write(Commit::Durable, move |txn| {
                record(txn, "https://idp", "old", now - 2 * day_ms)?;
                record(txn, "https://idp", "older", now - 3 * day_ms)?;
                record(txn, "https://idp", "recent", now - day_ms)?;
                let kept = kept_ms(MAX_SET_AGE_SECS);
                let first = prune(txn, now, kept, 1)?;
                assert!(seen(txn, "https://idp", "old")?, "the batch took the oldest first");
                let removed = first + prune(txn, now, kept, 100)?;
                Ok((removed, seen(txn, "https://idp", "old")?, seen(txn, "https://idp", "recent")?))
            })
            .await
            .expect("prune");
        assert_eq!(removed, 2, "only the records beyond the accepted age go");
        assert!(!old_seen);
        assert!(recent_seen, "a record young enough to stop a replay is kept");
    }
}
