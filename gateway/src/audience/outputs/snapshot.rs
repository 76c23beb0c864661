//! `audience_file`: every `schedule` (and once at start), a full snapshot of each
//! selected audience's live membership, one file per audience:
//! `<dir>/<audience>-<UTC time>.csv` (header `profile_id,<allowed identity
//! types>,entered_at`, default `profile_id,customer_id,email,entered_at`) or `.ndjson`
//! (one object per member with the same keys).
//!
//! Only complete files appear under their name: a snapshot is written to a hidden
//! temp file, fsynced, renamed, and the directory fsynced; temp files left by a crash
//! are deleted at start. Every snapshot is kept (the directory is the history;
//! pruning old ones is the consumer's or the operator's business). A snapshot is read
//! page by page while membership may change, so a member entering or leaving during
//! the write may or may not be in it; the next snapshot has it right.
//!
//! `dir` is relative to the data dir. The snapshot clock starts at each start (a
//! restart writes a fresh snapshot at once).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::member::Allowlist;
use super::{pause, selected, MEMBERS_PAGE};
use crate::audience::Member;
use crate::config::{resolve, DestinationConfig, SnapshotFormat};
use crate::dest::{DestContext, DestStats};

/// Prefix of temp files (hidden, so a consumer listing `*.csv` never sees them).
const TEMP_PREFIX: &str = ".tmp-";

/// Why a snapshot could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Creating, writing, syncing or renaming the file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The audience engine could not list members.
    #[error("members of `{audience}`: {source}")]
    Members {
        audience: String,
        source: crate::store::StoreError,
    },
}

/// A running `audience_file` destination.
#[derive(Debug)]
pub struct SnapshotOutput {
    name: String,
    config: DestinationConfig,
    ctx: DestContext,
    stats: Arc<DestStats>,
    dir: PathBuf,
    allow: Allowlist,
}

impl SnapshotOutput {
    pub fn new(config: DestinationConfig, ctx: DestContext, stats: Arc<DestStats>) -> Self {
        let dir = resolve(
            &ctx.data_dir,
            config.dir.as_deref().unwrap_or(Path::new(".")),
        );
        SnapshotOutput {
            name: config.name.clone(),
            allow: Allowlist::new(config.identities.as_deref()),
            dir,
            config,
            ctx,
            stats,
        }
    }

    /// Writes snapshots every `schedule` until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        // Snapshots read live membership, not the change log: hold none of it.
        self.ctx.audiences.set_changes_done(&self.name, u64::MAX);
        if let Err(e) = std::fs::create_dir_all(&self.dir) {
            error!(destination = %self.name, dir = %self.dir.display(), error = %e, "Cannot create the snapshot directory.");
            self.stats
                .set_error(&format!("{}: {e}", self.dir.display()));
        }
        remove_temp_files(&self.dir);
        info!(destination = %self.name, dir = %self.dir.display(), "Audience snapshots started.");
        loop {
            let out = self.clone_parts();
            let written = tokio::task::spawn_blocking(move || out.write_all()).await;
            match written {
                Ok(Ok(members)) => {
                    self.stats
                        .delivered
                        .fetch_add(members, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(Err(e)) => {
                    error!(destination = %self.name, error = %e, "Audience snapshot failed; next one at the next schedule.");
                    self.stats.set_error(&e.to_string());
                }
                Err(e) => {
                    error!(destination = %self.name, error = %e, "Audience snapshot task failed.");
                    self.stats.set_error(&e.to_string());
                }
            }
            if !pause(self.config.schedule, &shutdown).await {
                return;
            }
        }
    }

    fn clone_parts(&self) -> Writer {
        Writer {
            ctx: self.ctx.clone(),
            dir: self.dir.clone(),
            allow: self.allow.clone(),
            audiences: self.config.audiences.clone(),
            format: self.config.snapshot_format,
        }
    }
}

/// What one snapshot round needs, owned, for a blocking thread.
struct Writer {
    ctx: DestContext,
    dir: PathBuf,
    allow: Allowlist,
    audiences: Vec<String>,
    format: SnapshotFormat,
}

impl Writer {
    /// One snapshot file per selected audience; returns how many members were written.
    fn write_all(&self) -> Result<u64, SnapshotError> {
        let sizes = self
            .ctx
            .audiences
            .sizes()
            .map_err(|source| SnapshotError::Members {
                audience: "*".into(),
                source,
            })?;
        let now = crate::clock::now_ms();
        let mut written = 0;
        for a in sizes.iter().filter(|a| selected(&self.audiences, &a.name)) {
            let path = self.dir.join(file_name(&a.name, now, self.format));
            written += self.write_one(&a.name, &path)?;
        }
        Ok(written)
    }

    /// Writes `audience`'s members to `path` through a temp file.
    fn write_one(&self, audience: &str, path: &Path) -> Result<u64, SnapshotError> {
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = self.dir.join(format!("{TEMP_PREFIX}{file_name}"));
        let io = |p: &Path| {
            let p = p.to_owned();
            move |source| SnapshotError::Io { path: p, source }
        };
        let file = File::create(&temp).map_err(io(&temp))?;
        let mut out = BufWriter::new(file);
        if self.format == SnapshotFormat::Csv {
            out.write_all(csv_header(&self.allow).as_bytes())
                .map_err(io(&temp))?;
        }
        let mut after = 0;
        let mut count = 0u64;
        loop {
            let page = self
                .ctx
                .audiences
                .members(audience, after, MEMBERS_PAGE)
                .map_err(|source| SnapshotError::Members {
                    audience: audience.to_owned(),
                    source,
                })?
                .unwrap_or_default();
            let Some(last) = page.last() else { break };
            after = last.profile_id;
            for m in &page {
                let line = match self.format {
                    SnapshotFormat::Csv => csv_row(&self.allow, m),
                    SnapshotFormat::Ndjson => ndjson_row(&self.allow, m),
                };
                out.write_all(line.as_bytes()).map_err(io(&temp))?;
                count += 1;
            }
            if page.len() < MEMBERS_PAGE {
                break;
            }
        }
        let file = out.into_inner().map_err(|e| SnapshotError::Io {
            path: temp.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io(&temp))?;
        drop(file);
        std::fs::rename(&temp, path).map_err(io(path))?;
        // The rename itself is durable only once the directory is.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        Ok(count)
    }
}

/// `<audience>-<YYYYMMDDTHHMMSS.mmmZ>.<ext>`: sorts by time, no `:` for file systems
/// that refuse it.
pub fn file_name(audience: &str, at_ms: i64, format: SnapshotFormat) -> String {
    let ext = match format {
        SnapshotFormat::Csv => "csv",
        SnapshotFormat::Ndjson => "ndjson",
    };
    let stamp = OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
        .map(|t| {
            format!(
                "{:04}{:02}{:02}T{:02}{:02}{:02}.{:03}Z",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second(),
                t.millisecond()
            )
        })
        .unwrap_or_else(|_| at_ms.to_string());
    format!("{audience}-{stamp}.{ext}")
}

/// `profile_id,<allowed types>,entered_at` and a line end.
pub fn csv_header(allow: &Allowlist) -> String {
    let mut cells = vec!["profile_id".to_owned()];
    cells.extend(allow.types().iter().map(|t| csv_cell(t)));
    cells.push("entered_at".into());
    cells.join(",") + "\n"
}

/// One member as a CSV line; several values of one type are joined with `;`.
pub fn csv_row(allow: &Allowlist, m: &Member) -> String {
    let mut cells = vec![m.profile_id.to_string()];
    for t in allow.types() {
        cells.push(csv_cell(&allow.values(&m.identities, t).join(";")));
    }
    cells.push(edge_agent::ingest::format_timestamp(m.entered_ms));
    cells.join(",") + "\n"
}

/// One member as an NDJSON line.
pub fn ndjson_row(allow: &Allowlist, m: &Member) -> String {
    allow
        .row_member(m.profile_id, &m.identities, m.entered_ms)
        .to_string()
        + "\n"
}

/// RFC 4180 quoting: a cell with a comma, quote or line break is quoted, quotes
/// doubled. Values are otherwise kept exactly (no spreadsheet formula defusing: the
/// files are for loading elsewhere, and a changed identity would not match).
pub fn csv_cell(value: &str) -> String {
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_owned()
    }
}

/// Deletes temp files a crash left behind (never complete snapshots).
fn remove_temp_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_carry_the_audience_and_the_utc_time() {
        // 2024-05-01T10:00:00.123Z
        let at = 1_714_557_600_123;
        assert_eq!(
            file_name("churn-risk", at, SnapshotFormat::Csv),
            "churn-risk-20240501T100000.123Z.csv"
        );
        assert_eq!(
            file_name("a", at, SnapshotFormat::Ndjson),
            "a-20240501T100000.123Z.ndjson"
        );
        assert!(
            file_name("a", at, SnapshotFormat::Csv) < file_name("a", at + 1, SnapshotFormat::Csv)
        );
    }

    #[test]
    fn csv_cells_are_quoted_only_when_needed() {
        assert_eq!(csv_cell("ada@example.org"), "ada@example.org");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_cell("two\nlines"), "\"two\nlines\"");
        assert_eq!(csv_cell("=1+2"), "=1+2");
        assert_eq!(csv_cell(""), "");
    }

    #[test]
    fn a_csv_row_follows_the_header() {
        let allow = Allowlist::new(None);
        assert_eq!(
            csv_header(&allow),
            "profile_id,customer_id,email,entered_at\n"
        );
        let m = Member {
            profile_id: 7,
            entered_ms: 0,
            identities: vec![
                ("email".into(), "a,b@example.org".into()),
                ("anonymous_id".into(), "x".into()),
            ],
        };
        assert_eq!(
            csv_row(&allow, &m),
            "7,,\"a,b@example.org\",1970-01-01T00:00:00Z\n"
        );
        let row: serde_json::Value = serde_json::from_str(&ndjson_row(&allow, &m)).unwrap();
        assert_eq!(
            row,
            serde_json::json!({"profile_id": 7, "customer_id": null,
                "email": "a,b@example.org", "entered_at": "1970-01-01T00:00:00Z"})
        );
    }

    #[test]
    fn temp_files_are_removed_and_snapshots_kept() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".tmp-a-1.csv"), "x").unwrap();
        std::fs::write(dir.path().join("a-1.csv"), "x").unwrap();
        remove_temp_files(dir.path());
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a-1.csv"]);
    }
}
