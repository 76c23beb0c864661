//! NDJSON file destination for batch/ETL consumers, exactly once across crashes.
//!
//! Lines are appended to `<name>-<first inbox seq>.ndjson.open`, fsynced, and only
//! then is the cursor (last inbox seq, file, byte offset) committed. After a crash
//! the open file is truncated to the committed offset, so lines written after the
//! last commit vanish and are written again: no line is lost or doubled. A file is
//! closed (renamed without `.open`) past `max_file_size` or `max_file_age`; names are
//! deterministic, so a rename interrupted by a crash is finished on restart.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::segment_json::to_segment;
use crate::store::{Store, StoreError};

/// Records read from the inbox per write.
const READ_BATCH: usize = 2048;
/// Pause after a failed write before retrying.
const RETRY_DELAY: Duration = Duration::from_millis(500);

/// Why the file destination could not make progress.
#[derive(Debug, thiserror::Error)]
pub enum FileDestError {
    #[error("file destination I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("corrupt cursor: {0}")]
    Cursor(String),
}

/// Durable progress. Field order is the stored encoding.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
struct Cursor {
    /// Last inbox seq written and committed.
    through: u64,
    /// The file being written: (first inbox seq in it, bytes committed, opened at ms).
    open: Option<(u64, u64, i64)>,
}

/// A running file destination.
#[derive(Debug)]
pub struct FileDestination {
    pub name: String,
    pub dir: PathBuf,
    pub max_file_size: u64,
    pub max_file_age: Duration,
    pub store: Arc<Store>,
}

impl FileDestination {
    fn open_path(&self, first: u64) -> PathBuf {
        self.dir
            .join(format!("{}-{first:020}.ndjson.open", self.name))
    }

    fn final_path(&self, first: u64) -> PathBuf {
        self.dir.join(format!("{}-{first:020}.ndjson", self.name))
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FileDestError + '_ {
        move |source| FileDestError::Io {
            path: path.to_owned(),
            source,
        }
    }

    async fn save(&self, cursor: &Cursor) -> Result<(), FileDestError> {
        let bytes =
            postcard::to_stdvec(cursor).map_err(|e| FileDestError::Cursor(e.to_string()))?;
        self.store
            .save_cursor(&self.name, bytes, cursor.through)
            .await?;
        Ok(())
    }

    /// Brings the directory in line with the committed cursor after a restart.
    fn recover(&self, cursor: &mut Cursor) -> Result<Option<File>, FileDestError> {
        std::fs::create_dir_all(&self.dir).map_err(Self::io(&self.dir))?;
        let Some((first, offset, _)) = cursor.open else {
            return Ok(None);
        };
        let open = self.open_path(first);
        if !open.exists() && self.final_path(first).exists() {
            // Renamed, but the crash came before the cursor said so.
            cursor.open = None;
            return Ok(None);
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&open)
            .map_err(Self::io(&open))?;
        let len = file.metadata().map_err(Self::io(&open))?.len();
        if len != offset {
            info!(file = %open.display(), from = len, to = offset, "Dropping lines written after the last commit.");
            file.set_len(offset).map_err(Self::io(&open))?;
            file.sync_all().map_err(Self::io(&open))?;
        }
        Ok(Some(file))
    }

    async fn close_file(&self, cursor: &mut Cursor, file: File) -> Result<(), FileDestError> {
        let Some((first, _, _)) = cursor.open else {
            return Ok(());
        };
        drop(file);
        let (open, done) = (self.open_path(first), self.final_path(first));
        std::fs::rename(&open, &done).map_err(Self::io(&open))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(Self::io(&self.dir))?;
        cursor.open = None;
        self.save(cursor).await
    }

    /// Delivers until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), FileDestError> {
        let mut cursor: Cursor = match self.store.load_cursor(&self.name)? {
            Some(bytes) => {
                postcard::from_bytes(&bytes).map_err(|e| FileDestError::Cursor(e.to_string()))?
            }
            None => Cursor::default(),
        };
        let mut file = self.recover(&mut cursor)?;
        self.save(&cursor).await?;
        let mut head = self.store.head();
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            match self.step(&mut cursor, &mut file).await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    warn!(destination = %self.name, error = %e, "File destination write failed; retrying.");
                    // Re-derive the file from the last commit before trying again.
                    file = None;
                    if let Ok(Some(bytes)) = self.store.load_cursor(&self.name) {
                        if let Ok(c) = postcard::from_bytes(&bytes) {
                            cursor = c;
                        }
                    }
                    file = self.recover(&mut cursor).ok().flatten().or(file);
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        () = tokio::time::sleep(RETRY_DELAY) => {}
                    }
                    continue;
                }
            }
            let age_check = tokio::time::sleep(Duration::from_millis(250).min(self.max_file_age));
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                _ = head.changed() => {}
                () = age_check => {}
            }
        }
    }

    /// Writes one batch; `Ok(true)` when there may be more right away.
    async fn step(
        &self,
        cursor: &mut Cursor,
        file: &mut Option<File>,
    ) -> Result<bool, FileDestError> {
        let now = edge_agent::model::now_ms();
        if let (Some((_, _, opened)), Some(_)) = (cursor.open, file.as_ref()) {
            let age = u128::try_from(now.saturating_sub(opened)).unwrap_or(0);
            if age >= self.max_file_age.as_millis() {
                if let Some(f) = file.take() {
                    self.close_file(cursor, f).await?;
                }
            }
        }
        let records = self.store.read_inbox(cursor.through, READ_BATCH)?;
        let Some((last, _)) = records.last() else {
            return Ok(false);
        };
        let last = *last;
        let mut buf = Vec::with_capacity(records.len() * 512);
        for (_, rec) in &records {
            serde_json::to_writer(&mut buf, &to_segment(rec))
                .map_err(|e| FileDestError::Cursor(e.to_string()))?;
            buf.push(b'\n');
        }
        if file.is_none() {
            let first = records[0].0;
            let path = self.open_path(first);
            let f = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&path)
                .map_err(Self::io(&path))?;
            cursor.open = Some((first, 0, now));
            self.save(cursor).await?;
            *file = Some(f);
        }
        let (Some(f), Some((first, offset, opened))) = (file.as_mut(), cursor.open) else {
            return Ok(false);
        };
        let path = self.open_path(first);
        f.write_all(&buf).map_err(Self::io(&path))?;
        f.sync_data().map_err(Self::io(&path))?;
        let offset = offset + buf.len() as u64;
        cursor.through = last;
        cursor.open = Some((first, offset, opened));
        self.save(cursor).await?;
        if offset >= self.max_file_size {
            if let Some(f) = file.take() {
                self.close_file(cursor, f).await?;
            }
        }
        Ok(records.len() == READ_BATCH)
    }
}
