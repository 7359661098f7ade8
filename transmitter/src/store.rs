//! The redb database and its one writer.
//!
//! All writes go through a single writer thread that groups whatever is
//! queued into one write transaction and one commit: one fsync (about 4 ms
//! here) then covers hundreds of SETs, so throughput is not bound by one
//! fsync per SET. A write's future resolves only after its transaction has
//! committed (durably, unless the write asked for a non-durable commit).
//!
//! Invariant for write operations: an operation that returns an error has
//! written nothing, because it shares its transaction with others that will
//! commit. Validate first, then write.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, Durability, ReadTransaction, ReadableDatabase, WriteTransaction};
use tokio::sync::{mpsc, oneshot};

/// How many queued writes one transaction takes at most.
const MAX_GROUP: usize = 4096;
/// Writes waiting for the writer; beyond this, writers wait (backpressure).
const QUEUE_DEPTH: usize = 16 * 1024;

/// Why a storage operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// redb failed (I/O, corruption, commit).
    #[error("storage: {0}")]
    Storage(String),
    /// The writer thread is gone (the hub is shutting down).
    #[error("storage writer stopped")]
    WriterStopped,
    /// A stored record could not be decoded.
    #[error("stored record is damaged: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Wraps any redb error.
    pub fn storage(error: impl std::fmt::Display) -> Self {
        StoreError::Storage(error.to_string())
    }
}

/// Whether a write must be on disk before it counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Commit {
    /// fsync before the write's future resolves.
    Durable,
    /// Visible at once, on disk with the next durable commit. For state whose
    /// loss only causes a redelivery (at-least-once), such as "delivered".
    Lazy,
}

type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
/// Runs against the group's transaction, or is told why there is none.
type Job = Box<dyn FnOnce(Result<&WriteTransaction, StoreError>) -> Completion + Send>;

struct Request {
    job: Job,
    commit: Commit,
}

/// The database, shared by the transmitter and the hub.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    writer: mpsc::Sender<Request>,
}

impl Store {
    /// Opens (or creates) the database file and starts its writer thread.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Arc::new(Database::create(path).map_err(StoreError::storage)?);
        let (writer, queue) = mpsc::channel(QUEUE_DEPTH);
        let writer_db = Arc::clone(&db);
        std::thread::Builder::new()
            .name("redb-writer".into())
            .spawn(move || run_writer(&writer_db, queue))
            .map_err(StoreError::storage)?;
        Ok(Store { db, writer })
    }

    /// Runs `op` inside the next grouped write transaction and resolves after
    /// that transaction commits. `op` must write nothing when it fails.
    pub async fn write<R, F>(&self, commit: Commit, op: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<R, StoreError> + Send + 'static,
    {
        let (reply, outcome) = oneshot::channel();
        let job: Job = Box::new(move |txn| {
            let result = txn.and_then(op);
            Box::new(move |committed: Result<(), StoreError>| {
                let _ = reply.send(committed.and(result));
            })
        });
        self.writer.send(Request { job, commit }).await.map_err(|_| StoreError::WriterStopped)?;
        outcome.await.map_err(|_| StoreError::WriterStopped)?
    }

    /// Runs `op` on a read snapshot. Reads never wait for the writer.
    pub fn read<R>(&self, op: impl FnOnce(&ReadTransaction) -> Result<R, StoreError>) -> Result<R, StoreError> {
        let txn = self.db.begin_read().map_err(StoreError::storage)?;
        op(&txn)
    }
}

fn run_writer(db: &Database, mut queue: mpsc::Receiver<Request>) {
    while let Some(first) = queue.blocking_recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(request) => group.push(request),
                Err(_) => break,
            }
        }
        commit_group(db, group);
    }
    tracing::debug!("redb writer stopped");
}

fn commit_group(db: &Database, group: Vec<Request>) {
    let durable = group.iter().any(|request| request.commit == Commit::Durable);
    let mut txn = match db.begin_write() {
        Ok(txn) => txn,
        Err(error) => return fail_all(group, StoreError::storage(error)),
    };
    if !durable && let Err(error) = txn.set_durability(Durability::None) {
        tracing::warn!(%error, "non-durable commit refused; committing durably");
    }
    let size = group.len();
    let completions: Vec<Completion> = group.into_iter().map(|request| (request.job)(Ok(&txn))).collect();
    let outcome = txn.commit().map_err(StoreError::storage);
    if let Err(error) = &outcome {
        tracing::error!(%error, writes = size, "commit failed");
    }
    for complete in completions {
        complete(outcome.clone());
    }
}

fn fail_all(group: Vec<Request>, error: StoreError) {
    tracing::error!(%error, writes = group.len(), "cannot begin a write transaction");
    for request in group {
        (request.job)(Err(error.clone()))(Err(error.clone()));
    }
}

/// Encodes a record for a table value.
pub fn encode<T: serde::Serialize>(record: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(record).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Decodes a table value.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{ReadableTable, TableDefinition};

    const COUNTER: TableDefinition<&str, u64> = TableDefinition::new("test_counter");

    fn bump(txn: &WriteTransaction) -> Result<u64, StoreError> {
        let mut table = txn.open_table(COUNTER).map_err(StoreError::storage)?;
        let next = table.get("n").map_err(StoreError::storage)?.map(|v| v.value()).unwrap_or(0) + 1;
        table.insert("n", next).map_err(StoreError::storage)?;
        Ok(next)
    }

    fn read_counter(store: &Store) -> u64 {
        store
            .read(|txn| {
                let table = txn.open_table(COUNTER).map_err(StoreError::storage)?;
                Ok(table.get("n").map_err(StoreError::storage)?.map(|v| v.value()).unwrap_or(0))
            })
            .expect("read")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_are_grouped_and_all_commit() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("db.redb")).expect("open");
        let mut tasks = Vec::new();
        for _ in 0..500 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move { store.write(Commit::Durable, bump).await }));
        }
        let mut seen = Vec::new();
        for task in tasks {
            seen.push(task.await.expect("join").expect("write"));
        }
        seen.sort_unstable();
        assert_eq!(seen, (1..=500).collect::<Vec<_>>(), "each write ran exactly once, in some order");
        assert_eq!(read_counter(&store), 500);
    }

    #[tokio::test]
    async fn a_failed_operation_does_not_fail_its_group() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("db.redb")).expect("open");
        let failing = store.write(Commit::Durable, |_| Err::<(), _>(StoreError::Corrupt("refused".into())));
        let ok = store.write(Commit::Durable, bump);
        let (failing, ok) = tokio::join!(failing, ok);
        assert!(matches!(failing, Err(StoreError::Corrupt(_))));
        assert_eq!(ok.expect("write"), 1);
    }

    #[tokio::test]
    async fn durable_writes_survive_reopening() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("db.redb");
        {
            let store = Store::open(&path).expect("open");
            store.write(Commit::Lazy, bump).await.expect("lazy write");
            store.write(Commit::Durable, bump).await.expect("durable write");
            assert_eq!(read_counter(&store), 2);
        }
        // The writer thread holds the database until its queue closes.
        let reopened = loop {
            match Store::open(&path) {
                Ok(store) => break store,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        };
        assert_eq!(read_counter(&reopened), 2);
    }
}
