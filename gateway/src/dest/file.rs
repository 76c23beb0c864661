//! NDJSON file destination for batch/ETL consumers, exactly once across crashes.
//!
//! Reads resolved events ([`crate::profiles::Profiles::read_routed`]), renders each
//! through the destination's [`Route`] (filters, consent, minimization; events it
//! keeps out are counted as filtered) and appends one chunk per batch to
//! `<name>-<first inbox seq>.ndjson[.gz].open`. The chunk is fsynced, and only then is
//! the cursor (last inbox seq looked at, file, byte offset) committed. After a crash
//! the open file is truncated to the committed offset, so lines written after the
//! last commit vanish and are written again: no line is lost or doubled.
//!
//! With `gzip`, every chunk is one complete gzip member. Concatenated members are a
//! valid gzip stream (`zcat`, `MultiGzDecoder`), and a committed offset always falls
//! on a member boundary, so the truncated file is readable too.
//!
//! A file is closed (renamed without `.open`) past `max_file_size` or `max_file_age`,
//! and in `batch` mode after every scheduled run; names are deterministic, so a rename
//! interrupted by a crash is finished on restart.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use flate2::write::GzEncoder;
use flate2::Compression;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::route::Route;
use super::{DestContext, DestStats};
use crate::config::{resolve, DeliveryMode, DestinationConfig};
use crate::store::StoreError;

/// Pause after a failed write before retrying.
const RETRY_DELAY: Duration = Duration::from_millis(500);
/// Longest wait between checks of the open file's age when no events arrive.
const AGE_CHECK: Duration = Duration::from_millis(250);
/// When behind, reads of `batch_size` are gathered into one chunk (one write, one
/// fsync, one cursor commit) up to this many events...
const MAX_CHUNK_EVENTS: usize = 16_384;
/// ... or this many bytes of lines (and never much past `max_file_size`).
const MAX_CHUNK_BYTES: usize = 8 << 20;

/// Resolved events `(after, through]` rendered as lines, not yet written.
#[derive(Debug)]
struct Chunk {
    after: u64,
    through: u64,
    lines: Vec<u8>,
    /// Inbox seq of the first line (names a new file).
    first: Option<u64>,
    written: u64,
    filtered: u64,
}

/// Why the file destination could not make progress.
#[derive(Debug, thiserror::Error)]
pub enum FileDestError {
    /// Reading, writing, syncing or renaming a file failed.
    #[error("file destination I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Reading resolved events or committing the cursor failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The blocking write task died.
    #[error("file destination write task: {0}")]
    Task(String),
    /// The saved cursor does not decode (or cannot be encoded).
    #[error("corrupt cursor: {0}")]
    Cursor(String),
}

/// Durable progress. Field order is the stored encoding.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
struct Cursor {
    /// Last inbox seq written (or filtered) and committed.
    through: u64,
    /// The file being written: (first inbox seq in it, bytes committed, opened at ms).
    open: Option<(u64, u64, i64)>,
}

/// A running file destination.
#[derive(Debug)]
pub struct FileDestination {
    pub config: DestinationConfig,
    /// Output directory (already resolved against the data dir).
    pub dir: PathBuf,
    pub ctx: DestContext,
    pub stats: Arc<DestStats>,
}

/// One batch's lines as stored: as is, or as one complete gzip member.
pub fn encode_chunk(lines: &[u8], gzip: bool) -> std::io::Result<Vec<u8>> {
    if !gzip {
        return Ok(lines.to_vec());
    }
    // Level 1: the gateway writes at event rate on a small box; ETL readers care more
    // about CPU than about the last 20 % of size.
    let mut enc = GzEncoder::new(
        Vec::with_capacity(lines.len() / 4 + 64),
        Compression::fast(),
    );
    enc.write_all(lines)?;
    enc.finish()
}

/// Cuts `file` back to `committed` bytes: what was written after the last commit is
/// dropped. Returns the length it had. A file shorter than its commit lost data
/// underneath us (the file system, an operator); that is logged, not repaired.
fn truncate_to_committed(file: &File, path: &Path, committed: u64) -> std::io::Result<u64> {
    let len = file.metadata()?.len();
    if len > committed {
        info!(file = %path.display(), from = len, to = committed, "Dropping lines written after the last commit.");
        file.set_len(committed)?;
        file.sync_all()?;
    } else if len < committed {
        error!(file = %path.display(), len, committed, "Destination file is shorter than its last commit: lines were lost outside the gateway.");
    }
    Ok(len)
}

impl FileDestination {
    /// A file destination writing to `config.dir` (default: its name) under the data dir.
    pub fn new(config: DestinationConfig, ctx: DestContext, stats: Arc<DestStats>) -> Self {
        let dir = resolve(
            &ctx.data_dir,
            config.dir.as_deref().unwrap_or(Path::new(&config.name)),
        );
        FileDestination {
            config,
            dir,
            ctx,
            stats,
        }
    }

    fn name(&self) -> &str {
        &self.config.name
    }

    /// (open path, final path) of the file starting at `first`.
    fn paths(&self, first: u64, gzip: bool) -> (PathBuf, PathBuf) {
        let ext = if gzip { "ndjson.gz" } else { "ndjson" };
        let done = self.dir.join(format!("{}-{first:020}.{ext}", self.name()));
        let mut open = done.clone().into_os_string();
        open.push(".open");
        (PathBuf::from(open), done)
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FileDestError + '_ {
        move |source| FileDestError::Io {
            path: path.to_owned(),
            source,
        }
    }

    fn sync_dir(&self) -> Result<(), FileDestError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(Self::io(&self.dir))
    }

    fn load(&self) -> Result<Cursor, FileDestError> {
        match self.ctx.store.load_cursor(self.name())? {
            Some(bytes) => {
                postcard::from_bytes(&bytes).map_err(|e| FileDestError::Cursor(e.to_string()))
            }
            None => Ok(Cursor::default()),
        }
    }

    async fn save(&self, cursor: &Cursor) -> Result<(), FileDestError> {
        let bytes =
            postcard::to_stdvec(cursor).map_err(|e| FileDestError::Cursor(e.to_string()))?;
        self.ctx
            .store
            .save_cursor(self.name(), bytes, cursor.through)
            .await?;
        self.stats.cursor.store(cursor.through, Ordering::Relaxed);
        Ok(())
    }

    /// Brings the directory in line with the committed cursor after a restart.
    fn recover(&self, cursor: &mut Cursor) -> Result<Option<File>, FileDestError> {
        std::fs::create_dir_all(&self.dir).map_err(Self::io(&self.dir))?;
        let Some((first, offset, opened)) = cursor.open else {
            return Ok(None);
        };
        // The file may have been started under the other `gzip` setting before a
        // config change; it is finished under its own name.
        let gzip = [self.config.gzip, !self.config.gzip]
            .into_iter()
            .find(|g| {
                let (open, done) = self.paths(first, *g);
                open.exists() || done.exists()
            })
            .unwrap_or(self.config.gzip);
        let (open, done) = self.paths(first, gzip);
        if !open.exists() && done.exists() {
            // Renamed, but the crash came before the cursor said so.
            cursor.open = None;
            return Ok(None);
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&open)
            .map_err(Self::io(&open))?;
        let len = truncate_to_committed(&file, &open, offset).map_err(Self::io(&open))?;
        cursor.open = Some((first, offset.min(len), opened));
        if gzip != self.config.gzip {
            self.finish(cursor, file, gzip)?;
            return Ok(None);
        }
        Ok(Some(file))
    }

    /// Renames the open file to its final name (or removes it when empty: an empty
    /// `.gz` is not a gzip file); the caller commits the cursor.
    fn finish(&self, cursor: &mut Cursor, file: File, gzip: bool) -> Result<(), FileDestError> {
        let Some((first, offset, _)) = cursor.open else {
            return Ok(());
        };
        drop(file);
        let (open, done) = self.paths(first, gzip);
        if offset == 0 {
            std::fs::remove_file(&open).map_err(Self::io(&open))?;
        } else {
            std::fs::rename(&open, &done).map_err(Self::io(&open))?;
        }
        self.sync_dir()?;
        cursor.open = None;
        Ok(())
    }

    async fn close_file(&self, cursor: &mut Cursor, file: File) -> Result<(), FileDestError> {
        self.finish(cursor, file, self.config.gzip)?;
        self.save(cursor).await
    }

    /// Delivers until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), FileDestError> {
        let route = Route::new(&self.config);
        let mut cursor = self.load()?;
        let mut file = self.recover(&mut cursor)?;
        self.save(&cursor).await?;
        let mut resolved = self.ctx.profiles.resolved();
        let mut watching = true;
        let mut ahead = None;
        let batch_mode = self.config.mode == DeliveryMode::Batch;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            match self.step(&route, &mut cursor, &mut file, &mut ahead).await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    warn!(destination = %self.name(), error = %e, "File destination write failed; retrying.");
                    ahead = None;
                    self.stats.set_error(&e.to_string());
                    // Re-derive the file from the last commit before trying again.
                    drop(file.take());
                    if let Ok(c) = self.load() {
                        cursor = c;
                    }
                    file = self.recover(&mut cursor).ok().flatten();
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        () = tokio::time::sleep(RETRY_DELAY) => {}
                    }
                    continue;
                }
            }
            if batch_mode {
                // One file per scheduled run: it is complete when the run is.
                if let Some(f) = file.take() {
                    if let Err(e) = self.close_file(&mut cursor, f).await {
                        warn!(destination = %self.name(), error = %e, "Closing a scheduled file failed; retrying.");
                        file = self.recover(&mut cursor).ok().flatten();
                    }
                }
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(self.config.schedule) => {}
                }
                continue;
            }
            let age_check = tokio::time::sleep(AGE_CHECK.min(self.config.max_file_age));
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                changed = resolved.changed(), if watching => watching = changed.is_ok(),
                () = age_check => {}
            }
        }
    }

    /// Writes one chunk; `Ok(true)` when there may be more right away. While a chunk
    /// is written, synced and committed, the next one is read and rendered (`ahead`),
    /// so the CPU work and the disk wait overlap.
    async fn step(
        &self,
        route: &Route,
        cursor: &mut Cursor,
        file: &mut Option<File>,
        ahead: &mut Option<Chunk>,
    ) -> Result<bool, FileDestError> {
        if file.is_none() && cursor.open.is_some() {
            // A failed write left the open file closed: reopen it where the commit says,
            // rather than orphaning it by starting another.
            *file = self.recover(cursor)?;
        }
        let now = edge_agent::model::now_ms();
        if let (Some((_, _, opened)), Some(_)) = (cursor.open, file.as_ref()) {
            let age = u128::try_from(now.saturating_sub(opened)).unwrap_or(0);
            if age >= self.config.max_file_age.as_millis() {
                if let Some(f) = file.take() {
                    self.close_file(cursor, f).await?;
                }
            }
        }
        let room = cursor
            .open
            .map_or(self.config.max_file_size.0, |(_, offset, _)| {
                self.config.max_file_size.0.saturating_sub(offset)
            });
        let chunk = match ahead.take() {
            Some(c) if c.after == cursor.through && c.lines.len() as u64 <= room.max(1) => c,
            _ => match self.render_chunk(route, cursor.through, room)? {
                Some(c) => c,
                None => return Ok(false),
            },
        };
        // The next chunk must fit what this one leaves of the file; when this one
        // fills it, the next is rendered after the rotation instead.
        let left = room.saturating_sub(chunk.lines.len() as u64);
        let after = chunk.through;
        let (committed, next) = tokio::join!(self.commit_chunk(cursor, file, chunk, now), async {
            if left == 0 {
                return Ok(None);
            }
            // Yield first so the commit's blocking write starts before rendering.
            tokio::task::yield_now().await;
            self.render_chunk(route, after, left)
        });
        committed?;
        *ahead = next?;
        Ok(true)
    }

    /// Reads resolved events after `after` and renders them, up to a whole chunk when
    /// behind (a read shorter than asked for means caught up) and about `room` bytes;
    /// `None` when nothing new was resolved.
    fn render_chunk(
        &self,
        route: &Route,
        after: u64,
        room: u64,
    ) -> Result<Option<Chunk>, FileDestError> {
        let per_read = self.config.batch_size.max(1);
        let max_bytes = usize::try_from(room)
            .unwrap_or(usize::MAX)
            .clamp(1, MAX_CHUNK_BYTES);
        let mut chunk = Chunk {
            after,
            through: after,
            lines: Vec::new(),
            first: None,
            written: 0,
            filtered: 0,
        };
        let mut looked = 0usize;
        loop {
            let page = self
                .ctx
                .profiles
                .read_routed(&self.ctx.store, chunk.through, per_read)?;
            if page.through <= chunk.through {
                break;
            }
            chunk.through = page.through;
            self.stats.read.store(chunk.through, Ordering::Relaxed);
            looked += page.events.len();
            if chunk.lines.capacity() == 0 {
                chunk.lines.reserve(page.events.len() * 512);
            }
            for routed in &page.events {
                if route.render_into(routed, &mut chunk.lines) {
                    chunk.lines.push(b'\n');
                    chunk.first.get_or_insert(routed.seq);
                    chunk.written += 1;
                }
            }
            if page.events.len() < per_read
                || looked >= MAX_CHUNK_EVENTS
                || chunk.lines.len() >= max_bytes
            {
                break;
            }
        }
        if chunk.through <= after {
            return Ok(None);
        }
        chunk.filtered = looked as u64 - chunk.written;
        Ok(Some(chunk))
    }

    /// Appends `chunk` (when it has lines), commits the cursor past it, and rotates the
    /// file once it reached `max_file_size`.
    async fn commit_chunk(
        &self,
        cursor: &mut Cursor,
        file: &mut Option<File>,
        chunk: Chunk,
        now: i64,
    ) -> Result<(), FileDestError> {
        if let Some(first) = chunk.first {
            self.append(cursor, file, first, chunk.lines, now).await?;
        }
        cursor.through = chunk.through;
        self.save(cursor).await?;
        self.stats
            .delivered
            .fetch_add(chunk.written, Ordering::Relaxed);
        self.stats
            .filtered
            .fetch_add(chunk.filtered, Ordering::Relaxed);
        if let (Some((_, offset, _)), true) = (cursor.open, file.is_some()) {
            if offset >= self.config.max_file_size.0 {
                if let Some(f) = file.take() {
                    self.close_file(cursor, f).await?;
                }
            }
        }
        Ok(())
    }

    /// Appends one chunk to the open file (opening one at `first` if needed) and
    /// fsyncs it; updates the cursor's offset for the caller to commit. Encoding,
    /// writing and syncing run on a blocking thread, off the runtime's workers.
    async fn append(
        &self,
        cursor: &mut Cursor,
        file: &mut Option<File>,
        first: u64,
        lines: Vec<u8>,
        now: i64,
    ) -> Result<(), FileDestError> {
        let gzip = self.config.gzip;
        if file.is_none() {
            let (path, _) = self.paths(first, gzip);
            let f = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&path)
                .map_err(Self::io(&path))?;
            // The file must exist after a crash once the cursor names it.
            self.sync_dir()?;
            cursor.open = Some((first, 0, now));
            self.save(cursor).await?;
            *file = Some(f);
        }
        let (Some(mut f), Some((first, offset, opened))) = (file.take(), cursor.open) else {
            return Err(FileDestError::Cursor("no open file to append to".into()));
        };
        let (path, _) = self.paths(first, gzip);
        let written = tokio::task::spawn_blocking(move || {
            let chunk = encode_chunk(&lines, gzip)?;
            f.write_all(&chunk)?;
            f.sync_data()?;
            Ok::<_, std::io::Error>((f, chunk.len() as u64))
        })
        .await
        .map_err(|e| FileDestError::Task(e.to_string()))?;
        // On an error the file is closed here; the caller's retry reopens it at the
        // committed offset.
        let (f, len) = written.map_err(Self::io(&path))?;
        *file = Some(f);
        cursor.open = Some((first, offset + len, opened));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::Read;

    use super::*;
    use flate2::read::MultiGzDecoder;

    fn gunzip(bytes: &[u8]) -> std::io::Result<String> {
        let mut out = String::new();
        MultiGzDecoder::new(bytes).read_to_string(&mut out)?;
        Ok(out)
    }

    #[test]
    fn concatenated_gzip_chunks_read_as_one_stream() {
        let mut file = encode_chunk(b"{\"a\":1}\n", true).unwrap();
        file.extend(encode_chunk(b"{\"a\":2}\n{\"a\":3}\n", true).unwrap());
        assert_eq!(gunzip(&file).unwrap(), "{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n");
    }

    #[test]
    fn plain_chunks_are_the_lines_themselves() {
        assert_eq!(encode_chunk(b"x\n", false).unwrap(), b"x\n");
    }

    #[test]
    fn a_half_written_gzip_chunk_is_unreadable_until_truncated_to_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.ndjson.gz.open");
        let committed = encode_chunk(b"{\"n\":1}\n", true).unwrap();
        let torn = encode_chunk(b"{\"n\":2}\n", true).unwrap();
        let mut bytes = committed.clone();
        bytes.extend_from_slice(&torn[..torn.len() / 2]);
        std::fs::write(&path, &bytes).unwrap();
        assert!(gunzip(&std::fs::read(&path).unwrap()).is_err());

        let file = OpenOptions::new().append(true).open(&path).unwrap();
        let len = truncate_to_committed(&file, &path, committed.len() as u64).unwrap();
        assert_eq!(len, bytes.len() as u64);
        assert_eq!(
            gunzip(&std::fs::read(&path).unwrap()).unwrap(),
            "{\"n\":1}\n"
        );
        // Appending after recovery continues the same valid stream.
        let mut file = file;
        file.write_all(&torn).unwrap();
        assert_eq!(
            gunzip(&std::fs::read(&path).unwrap()).unwrap(),
            "{\"n\":1}\n{\"n\":2}\n"
        );
    }

    #[test]
    fn truncation_leaves_a_file_at_or_below_its_commit_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.ndjson.open");
        std::fs::write(&path, b"a\nb\n").unwrap();
        let file = OpenOptions::new().append(true).open(&path).unwrap();
        assert_eq!(truncate_to_committed(&file, &path, 4).unwrap(), 4);
        assert_eq!(truncate_to_committed(&file, &path, 9).unwrap(), 4);
        assert_eq!(std::fs::read(&path).unwrap(), b"a\nb\n");
    }
}
