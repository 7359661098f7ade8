//! The redb database and its one writer.
//!
//! All writes go through a single writer thread that groups whatever is
//! queued into one write transaction and one commit: one fsync (about 4 ms
//! here) then covers hundreds of SETs, so throughput is not bound by one
//! fsync per SET. A write's future resolves only after its transaction has
//! committed (durably, unless the write asked for a non-durable commit).
//!
//! A write that fails leaves nothing behind and fails alone: when an
//! operation returns an error or panics, the group's transaction is rolled
//! back and the others run again in a new one (so an operation must be
//! re-runnable: `FnMut`, deterministic given the state it reads), and the
//! writer thread keeps running. Refusals an operation expects (a duplicate,
//! a conflict) are still best returned as `Ok(Err(..))`: they cost no rerun.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

/// One queued write: run inside the group's transaction (again, if another
/// write of the group failed), then told how its transaction ended.
trait Job: Send {
    /// Runs the operation; false when it failed (error or panic).
    fn run(&mut self, txn: &WriteTransaction) -> bool;
    /// Reports the operation's result, given how its transaction ended.
    fn finish(self: Box<Self>, committed: Result<(), StoreError>);
}

struct Op<F, R> {
    op: F,
    result: Option<Result<R, StoreError>>,
    reply: oneshot::Sender<Result<R, StoreError>>,
}

impl<F, R> Job for Op<F, R>
where
    F: FnMut(&WriteTransaction) -> Result<R, StoreError> + Send,
    R: Send,
{
    fn run(&mut self, txn: &WriteTransaction) -> bool {
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| (self.op)(txn))).unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(panic = %what, "a write operation panicked; it fails alone");
            Err(StoreError::Storage(format!("the write operation panicked: {what}")))
        });
        let ok = outcome.is_ok();
        self.result = Some(outcome);
        ok
    }

    fn finish(self: Box<Self>, committed: Result<(), StoreError>) {
        let result = self.result.unwrap_or_else(|| Err(StoreError::Storage("the write never ran".into())));
        let _ = self.reply.send(committed.and(result));
    }
}

struct Request {
    job: Box<dyn Job>,
    commit: Commit,
    /// The last write: the writer commits its group durably and stops.
    close: bool,
}

/// The database, shared by the transmitter and the hub.
#[derive(Clone)]
pub struct Store {
    /// `None` once [`close`](Store::close)d: every clone sees it go.
    db: Arc<RwLock<Option<Arc<Database>>>>,
    writer: mpsc::Sender<Request>,
    /// Set when the writer thread ends: `/healthz` reports it.
    stopped: Arc<AtomicBool>,
    /// The writer thread, until `close` joins it.
    writer_thread: Arc<Mutex<Option<JoinHandle<()>>>>,
    /// The file, for logs.
    path: Arc<Path>,
}

impl Store {
    /// Opens (or creates) the database file and starts its writer thread.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Arc::new(Database::create(path).map_err(StoreError::storage)?);
        let (writer, queue) = mpsc::channel(QUEUE_DEPTH);
        let writer_db = Arc::clone(&db);
        let stopped = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stopped);
        let thread = std::thread::Builder::new()
            .name("redb-writer".into())
            .spawn(move || {
                // Set however the thread ends, a panic included.
                let _stopped = SetOnDrop(flag);
                run_writer(&writer_db, queue);
            })
            .map_err(StoreError::storage)?;
        Ok(Store {
            db: Arc::new(RwLock::new(Some(db))),
            writer,
            stopped,
            writer_thread: Arc::new(Mutex::new(Some(thread))),
            path: Arc::from(path),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes the database for every clone of this store, as the process
    /// stops: the writes queued before commit durably, the writer thread
    /// ends, and the file is closed cleanly (a file left open by an exit
    /// costs the next start a repair that grows with the file). Later
    /// writes and reads fail with [`StoreError::WriterStopped`]. Blocking,
    /// and as slow as the disk: call it outside the async runtime, after the
    /// requests are drained, on a thread the caller can stop waiting for.
    /// Waits at most `within` for the writer thread to end once its last
    /// commit is done. Closing again changes nothing.
    pub fn close(&self, within: Duration) -> Result<(), StoreError> {
        let (reply, committed) = oneshot::channel();
        let job = Box::new(Op { op: |_: &WriteTransaction| Ok(()), result: None, reply });
        let queued = self.writer.blocking_send(Request { job, commit: Commit::Durable, close: true }).is_ok();
        let flushed = if queued { committed.blocking_recv().unwrap_or(Err(StoreError::WriterStopped)) } else { Ok(()) };
        let thread = self.writer_thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            let deadline = Instant::now() + within;
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                tracing::warn!(within_ms = within.as_millis() as u64, "the redb writer did not stop in time");
            }
        }
        let db = self.db.write().unwrap_or_else(|p| p.into_inner()).take();
        // The last handle, unless a read is still running: then the file
        // closes when that read ends (as a dropped database, errors unseen).
        let closed = match db.map(Arc::try_unwrap) {
            Some(Ok(db)) => db.close().map_err(StoreError::storage),
            Some(Err(_)) | None => Ok(()),
        };
        flushed.and(closed)
    }

    /// Whether the writer thread still runs (writes can commit).
    pub fn writer_running(&self) -> bool {
        !self.stopped.load(Ordering::SeqCst) && !self.writer.is_closed()
    }

    /// Runs `op` inside the next grouped write transaction and resolves after
    /// that transaction commits. `op` may run more than once (when another
    /// write of its group fails, the group runs again without it); only its
    /// last run counts. When `op` fails or panics, nothing it wrote is kept.
    pub async fn write<R, F>(&self, commit: Commit, op: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnMut(&WriteTransaction) -> Result<R, StoreError> + Send + 'static,
    {
        let (reply, outcome) = oneshot::channel();
        let job = Box::new(Op { op, result: None, reply });
        self.writer.send(Request { job, commit, close: false }).await.map_err(|_| StoreError::WriterStopped)?;
        outcome.await.map_err(|_| StoreError::WriterStopped)?
    }

    /// Runs `op` on a read snapshot. Reads never wait for the writer.
    pub fn read<R>(&self, op: impl FnOnce(&ReadTransaction) -> Result<R, StoreError>) -> Result<R, StoreError> {
        let db = self.db.read().unwrap_or_else(|p| p.into_inner()).clone().ok_or(StoreError::WriterStopped)?;
        let txn = db.begin_read().map_err(StoreError::storage)?;
        op(&txn)
    }
}

/// Raises its flag when dropped.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
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
        let closing = group.iter().any(|request| request.close);
        commit_group(db, group);
        if closing {
            break;
        }
    }
    tracing::debug!("redb writer stopped");
}

/// Runs a group in one transaction and commits it. A write that fails is
/// answered with its error and the transaction rolled back; the rest run
/// again in a new transaction, until a run has no failure.
fn commit_group(db: &Database, mut group: Vec<Request>) {
    while !group.is_empty() {
        let durable = group.iter().any(|request| request.commit == Commit::Durable);
        let mut txn = match db.begin_write() {
            Ok(txn) => txn,
            Err(error) => return fail_all(group, StoreError::storage(error)),
        };
        if !durable && let Err(error) = txn.set_durability(Durability::None) {
            tracing::warn!(%error, "non-durable commit refused; committing durably");
        }
        let failed: Vec<usize> =
            group.iter_mut().enumerate().filter_map(|(at, request)| (!request.job.run(&txn)).then_some(at)).collect();
        if failed.is_empty() {
            let size = group.len();
            let outcome = txn.commit().map_err(StoreError::storage);
            if let Err(error) = &outcome {
                tracing::error!(%error, writes = size, "commit failed");
            }
            for request in group {
                request.job.finish(outcome.clone());
            }
            return;
        }
        if let Err(error) = txn.abort() {
            return fail_all(group, StoreError::storage(error));
        }
        // The failed writes get their own errors; nothing of theirs was kept.
        for at in failed.into_iter().rev() {
            group.remove(at).job.finish(Ok(()));
        }
    }
}

fn fail_all(group: Vec<Request>, error: StoreError) {
    tracing::error!(%error, writes = group.len(), "cannot write");
    for request in group {
        request.job.finish(Err(error.clone()));
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
    async fn a_failed_operation_does_not_fail_its_group_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("db.redb")).expect("open");
        // Writes, then fails: none of its writes may stay.
        let failing = store.write(Commit::Durable, |txn| {
            bump(txn)?;
            bump(txn)?;
            Err::<(), _>(StoreError::Corrupt("refused".into()))
        });
        let ok = store.write(Commit::Durable, bump);
        let (failing, ok) = tokio::join!(failing, ok);
        assert!(matches!(failing, Err(StoreError::Corrupt(_))));
        assert_eq!(ok.expect("write"), 1, "the other write ran once its group was rid of the failure");
        assert_eq!(read_counter(&store), 1, "the failed write's bumps were rolled back");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_operation_fails_alone_and_the_writer_keeps_running() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("db.redb")).expect("open");
        let mut writes = Vec::new();
        for n in 0..20 {
            let store = store.clone();
            writes.push(tokio::spawn(async move {
                store
                    .write(Commit::Durable, move |txn| {
                        let value = bump(txn)?;
                        if n == 7 {
                            panic!("a bug in one operation");
                        }
                        Ok(value)
                    })
                    .await
            }));
        }
        let mut failed = 0;
        for write in writes {
            if write.await.expect("join").is_err() {
                failed += 1;
            }
        }
        assert_eq!(failed, 1, "only the panicking write fails");
        assert_eq!(read_counter(&store), 19, "its bump was rolled back, the others committed");
        assert!(store.writer_running());
        assert_eq!(store.write(Commit::Durable, bump).await.expect("a later write"), 20);
    }

    /// Opens `path` as the next start would; true when redb had to repair it.
    fn needs_repair(path: &Path) -> bool {
        let repaired = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&repaired);
        let db = redb::Builder::new()
            .set_repair_callback(move |_| flag.store(true, Ordering::SeqCst))
            .open(path)
            .expect("reopen");
        drop(db);
        repaired.load(Ordering::SeqCst)
    }

    #[test]
    fn close_makes_lazy_writes_durable_and_leaves_a_clean_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("db.redb");
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let store = Store::open(&path).expect("open");
        let reader = store.clone();
        runtime.block_on(store.write(Commit::Lazy, bump)).expect("lazy write");
        store.close(Duration::from_secs(5)).expect("close");
        assert!(!store.writer_running());
        assert!(matches!(runtime.block_on(store.write(Commit::Durable, bump)), Err(StoreError::WriterStopped)));
        assert!(matches!(reader.read(|_| Ok(())), Err(StoreError::WriterStopped)), "closed for every clone");
        store.close(Duration::from_secs(5)).expect("closing again changes nothing");
        assert!(!needs_repair(&path), "closed cleanly");
        let reopened = Store::open(&path).expect("reopen");
        assert_eq!(read_counter(&reopened), 1, "the lazy write reached the disk");
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
