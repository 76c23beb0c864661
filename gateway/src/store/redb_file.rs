//! A redb file that reopens itself after an I/O failure.
//!
//! After a failed write (disk full, an I/O error) redb refuses every later
//! transaction with "Previous I/O error occurred" until the database is closed and
//! opened again; reopening recovers the file to its last durable commit. Without it a
//! full disk would stop the gateway for good, even once space is back. Here the next
//! write transaction does the reopen: every file has a single writer, which retries
//! after a failure, so it is the one to notice — and no write transaction of its own
//! is alive then. Readers meanwhile get an error and retry.
//!
//! [`RedbFile::generation`] counts reopens: a writer that keeps state in memory
//! beside the file (the profile stage's pending changes, which are not durable) must
//! drop that state when the file it was built on is gone.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use redb::{Database, ReadTransaction, StorageError, TransactionError, WriteTransaction};
use tracing::{debug, warn};

use super::{StoreError, R};

/// Least time between two reopens: opening a file that failed repairs it (reads it
/// all), and while the disk stays full every write fails again.
const REOPEN_EVERY: Duration = Duration::from_secs(1);

/// Opens the file again (creating its tables as on the first open).
type Opener = Box<dyn Fn(&Path) -> Result<Database, StoreError> + Send + Sync>;

/// An open redb database, swapped for a fresh one after an I/O failure.
pub struct RedbFile {
    path: PathBuf,
    reopen: Opener,
    /// `None` between a close and a successful open (the open failed: retried by the
    /// next write transaction).
    db: RwLock<Option<Database>>,
    generation: AtomicU64,
    /// When the last reopen was tried.
    last_try: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for RedbFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbFile")
            .field("path", &self.path)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl RedbFile {
    /// Wraps `db`, opened from `path`; `reopen` opens it again after a failure.
    pub fn new(
        path: &Path,
        db: Database,
        reopen: impl Fn(&Path) -> Result<Database, StoreError> + Send + Sync + 'static,
    ) -> Self {
        RedbFile {
            path: path.to_owned(),
            reopen: Box::new(reopen),
            db: RwLock::new(Some(db)),
            generation: AtomicU64::new(0),
            last_try: Mutex::new(None),
        }
    }

    /// How many times the file was reopened.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// A read transaction (a consistent snapshot).
    pub fn begin_read(&self) -> Result<ReadTransaction, StoreError> {
        use redb::ReadableDatabase;
        let guard = self.db.read().unwrap_or_else(PoisonError::into_inner);
        match guard.as_ref() {
            Some(db) => db.begin_read().st(),
            None => Err(self.closed()),
        }
    }

    /// A write transaction; reopens the file first when an earlier write failed.
    pub fn begin_write(&self) -> Result<WriteTransaction, StoreError> {
        let seen = self.generation();
        {
            let guard = self.db.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(db) = guard.as_ref() {
                match db.begin_write() {
                    Err(TransactionError::Storage(
                        StorageError::PreviousIo | StorageError::DatabaseClosed,
                    )) => {}
                    other => return other.st(),
                }
            }
        }
        self.reopen_after(seen)?;
        let guard = self.db.read().unwrap_or_else(PoisonError::into_inner);
        match guard.as_ref() {
            Some(db) => db.begin_write().st(),
            None => Err(self.closed()),
        }
    }

    /// Closes and opens the file, unless another caller did since generation `seen`.
    fn reopen_after(&self, seen: u64) -> Result<(), StoreError> {
        let mut guard = self.db.write().unwrap_or_else(PoisonError::into_inner);
        if guard.is_some() && self.generation() != seen {
            return Ok(());
        }
        {
            let mut last = self.last_try.lock().unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|t| t.elapsed() < REOPEN_EVERY) {
                return Err(self.closed());
            }
            *last = Some(Instant::now());
        }
        if let Some(old) = guard.take() {
            // Closing a file that failed may itself fail; the open below recovers it.
            if let Err(e) = old.close() {
                debug!(path = %self.path.display(), error = %e, "Closing after an I/O failure reported an error.");
            }
        }
        let db = (self.reopen)(&self.path).inspect_err(|e| {
            warn!(path = %self.path.display(), error = %e, "Cannot reopen after an I/O failure; retrying with the next write.");
        })?;
        *guard = Some(db);
        self.generation.fetch_add(1, Ordering::AcqRel);
        warn!(path = %self.path.display(), "Reopened after an I/O failure.");
        Ok(())
    }

    fn closed(&self) -> StoreError {
        StoreError::Unavailable(format!(
            "{} is being reopened after an I/O failure (disk full?)",
            self.path.display()
        ))
    }
}

/// A disk for tests that fills on demand: redb's storage in memory, kept across
/// reopens, with a switch that fails writes as a full disk does.
#[cfg(test)]
pub(crate) mod test_disk {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use redb::StorageBackend;

    #[derive(Debug, Default)]
    pub struct Disk {
        bytes: Mutex<Vec<u8>>,
        pub full: AtomicBool,
    }

    /// One open of a [`Disk`] (`Builder::create_with_backend`).
    #[derive(Debug)]
    pub struct Backend(pub Arc<Disk>);

    fn full() -> std::io::Error {
        std::io::Error::from(std::io::ErrorKind::StorageFull)
    }

    fn bytes(disk: &Disk) -> std::sync::MutexGuard<'_, Vec<u8>> {
        disk.bytes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn index(n: u64) -> Result<usize, std::io::Error> {
        usize::try_from(n).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    }

    impl StorageBackend for Backend {
        fn len(&self) -> Result<u64, std::io::Error> {
            Ok(bytes(&self.0).len() as u64)
        }

        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            let bytes = bytes(&self.0);
            let start = index(offset)?;
            let src = bytes
                .get(start..start + out.len())
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
            out.copy_from_slice(src);
            Ok(())
        }

        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            let mut bytes = bytes(&self.0);
            let len = index(len)?;
            if len > bytes.len() && self.0.full.load(Ordering::SeqCst) {
                return Err(full());
            }
            bytes.resize(len, 0);
            Ok(())
        }

        fn sync_data(&self) -> Result<(), std::io::Error> {
            if self.0.full.load(Ordering::SeqCst) {
                return Err(full());
            }
            Ok(())
        }

        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            if self.0.full.load(Ordering::SeqCst) {
                return Err(full());
            }
            let mut bytes = bytes(&self.0);
            let start = index(offset)?;
            if bytes.len() < start + data.len() {
                bytes.resize(start + data.len(), 0);
            }
            bytes[start..start + data.len()].copy_from_slice(data);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use redb::{ReadableTable, TableDefinition};

    use super::test_disk::{Backend, Disk};
    use super::*;

    const T: TableDefinition<u64, u64> = TableDefinition::new("t");

    fn open(disk: &Arc<Disk>) -> Result<Database, StoreError> {
        Database::builder()
            .create_with_backend(Backend(Arc::clone(disk)))
            .st()
    }

    fn put(file: &RedbFile, k: u64) -> Result<(), StoreError> {
        let txn = file.begin_write()?;
        txn.open_table(T).st()?.insert(k, k).st()?;
        txn.commit().st()
    }

    fn keys(file: &RedbFile) -> Vec<u64> {
        let r = file.begin_read().unwrap();
        let t = r.open_table(T).unwrap();
        t.iter().unwrap().map(|e| e.unwrap().0.value()).collect()
    }

    #[test]
    fn a_full_disk_fails_writes_until_space_is_back_then_the_file_is_reopened() {
        let disk = Arc::new(Disk::default());
        let first = open(&disk).unwrap();
        let reopen_disk = Arc::clone(&disk);
        let file = RedbFile::new(Path::new("test.redb"), first, move |_| open(&reopen_disk));
        put(&file, 1).unwrap();

        disk.full.store(true, Ordering::SeqCst);
        let err = put(&file, 2).unwrap_err();
        assert!(matches!(err, StoreError::DiskFull(_)), "{err}");
        // redb now refuses the file; while the disk stays full the reopen fails too.
        for _ in 0..3 {
            assert!(put(&file, 3).is_err());
        }
        assert_eq!(file.generation(), 0, "nothing reopened while full");

        disk.full.store(false, Ordering::SeqCst);
        // Reopens are at most one per REOPEN_EVERY: refused meanwhile, then done.
        let err = put(&file, 4).unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        std::thread::sleep(REOPEN_EVERY);
        put(&file, 4).unwrap();
        assert_eq!(file.generation(), 1);
        assert_eq!(keys(&file), vec![1, 4], "the failed writes left nothing");
        put(&file, 5).unwrap();
        assert_eq!(file.generation(), 1, "a healthy file is not reopened");
    }
}
