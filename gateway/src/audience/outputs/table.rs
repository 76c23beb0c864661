//! `audience_postgres`: the live membership of the selected audiences as the table
//! `<prefix>audience_members (audience, profile_id, customer_id, email, entered_at)`,
//! created on start.
//!
//! The table is kept equal to the membership by applying the change log in order, a
//! page per transaction (adds upserted, removes deleted, each profile in its last
//! state within the page), with the cursor saved after the commit: a page applied again
//! after a crash sets the same rows. When the table is empty at start, or the log was
//! pruned past the cursor, the table is rebuilt from the live membership in one
//! transaction (its cursor is the log head read before the members, so changes made
//! meanwhile are applied again on top: harmless).
//!
//! `customer_id` and `email` are filled only when the `identities` allowlist lets them
//! leave (default: both). Failures (database down, timeouts) drop the connection and
//! retry with backoff; nothing moves the cursor but a commit.

use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::member::Allowlist;
use super::{
    log_lost, pause, selected, wait_for_changes, Cursor, MEMBERS_PAGE, READ_PAGE, STORE_RETRY,
};
use crate::audience::MembershipChange;
use crate::config::DestinationConfig;
use crate::dest::outbox::retry::{random_unit, Backoff};
use crate::dest::{DestContext, DestStats};

/// Longest `table_prefix`: identifiers are cut at 63 bytes; the longest name we make
/// is `<prefix>audience_members_pkey` (21 more).
const MAX_PREFIX: usize = 42;

/// The statements, built once from the table prefix.
#[derive(Debug, Clone, PartialEq)]
pub struct Sql {
    pub create: String,
    pub is_empty: String,
    pub clear: String,
    pub upsert: String,
    pub delete: String,
}

impl Sql {
    pub fn new(prefix: &str) -> Self {
        let t = format!("{prefix}audience_members");
        Sql {
            create: format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    audience text NOT NULL,
                    profile_id bigint NOT NULL,
                    customer_id text,
                    email text,
                    entered_at timestamptz,
                    PRIMARY KEY (audience, profile_id)
                )"
            ),
            is_empty: format!("SELECT NOT EXISTS (SELECT 1 FROM {t})"),
            clear: format!("DELETE FROM {t}"),
            upsert: format!(
                "INSERT INTO {t} (audience, profile_id, customer_id, email, entered_at)
                 SELECT audience, profile_id, customer_id, email,
                    to_timestamp(entered_ms / 1000.0)
                 FROM jsonb_to_recordset($1::text::jsonb) AS r(audience text,
                    profile_id bigint, customer_id text, email text, entered_ms bigint)
                 ON CONFLICT (audience, profile_id) DO UPDATE SET
                    customer_id = EXCLUDED.customer_id, email = EXCLUDED.email,
                    entered_at = EXCLUDED.entered_at"
            ),
            delete: format!(
                "DELETE FROM {t} AS m
                 USING jsonb_to_recordset($1::text::jsonb) AS r(audience text, profile_id bigint)
                 WHERE m.audience = r.audience AND m.profile_id = r.profile_id"
            ),
        }
    }
}

/// A row to upsert, as the `jsonb_to_recordset` element of [`Sql::upsert`]. NUL
/// characters are dropped: PostgreSQL text cannot hold them.
pub fn row(
    allow: &Allowlist,
    audience: &str,
    profile_id: u64,
    identities: &[(String, String)],
    entered_ms: i64,
) -> Value {
    let first = |t: &str| {
        allow
            .values(identities, t)
            .first()
            .map(|v| v.replace('\0', ""))
    };
    json!({
        "audience": audience,
        "profile_id": profile_id,
        "customer_id": first("customer_id"),
        "email": first("email"),
        "entered_ms": entered_ms,
    })
}

/// A page of changes as the rows to upsert and the keys to delete: each (audience,
/// profile) once, in its last state.
pub fn split_page(
    changes: &[MembershipChange],
    keep: impl Fn(&str) -> bool,
    allow: &Allowlist,
) -> (Vec<Value>, Vec<Value>) {
    let mut last: std::collections::HashMap<(&str, u64), &MembershipChange> =
        std::collections::HashMap::new();
    for c in changes.iter().filter(|c| keep(&c.audience)) {
        last.insert((c.audience.as_str(), c.profile_id), c);
    }
    let mut latest: Vec<&MembershipChange> = last.into_values().collect();
    latest.sort_by_key(|c| c.seq);
    let (mut upserts, mut deletes) = (Vec::new(), Vec::new());
    for c in latest {
        if c.entered {
            upserts.push(row(
                allow,
                &c.audience,
                c.profile_id,
                &c.identities,
                c.at_ms,
            ));
        } else {
            deletes.push(json!({"audience": c.audience, "profile_id": c.profile_id}));
        }
    }
    (upserts, deletes)
}

/// A running `audience_postgres` destination.
#[derive(Debug)]
pub struct TableOutput {
    name: String,
    config: DestinationConfig,
    ctx: DestContext,
    stats: Arc<DestStats>,
    settings: tokio_postgres::Config,
    sql: Sql,
    allow: Allowlist,
}

/// Why the table could not be brought up to date this time (retried).
#[derive(Debug)]
enum Failure {
    /// PostgreSQL refused or is unreachable; reconnect and retry.
    Database(String),
    /// The audience engine failed.
    Store(String),
    /// Shutdown came first.
    Shutdown,
}

fn db(e: &tokio_postgres::Error) -> Failure {
    Failure::Database(match e.as_db_error() {
        Some(d) => format!("{} ({}): {}", d.severity(), d.code().code(), d.message()),
        None => e.to_string(),
    })
}

impl TableOutput {
    /// Checks the config; on one it cannot use, the name, the stats and why.
    pub fn new(
        config: DestinationConfig,
        ctx: DestContext,
        stats: Arc<DestStats>,
    ) -> Result<Self, (String, Arc<DestStats>, String)> {
        let name = config.name.clone();
        let fail = |m: String| {
            (
                name.clone(),
                Arc::clone(&stats),
                format!("destination `{name}`: {m}"),
            )
        };
        let Some(conn) = config.connection.as_deref() else {
            return Err(fail("`connection` is required".into()));
        };
        let mut settings = tokio_postgres::Config::from_str(conn)
            .map_err(|e| fail(format!("`connection`: {e}")))?;
        if settings.get_connect_timeout().is_none() {
            settings.connect_timeout(config.timeout);
        }
        if settings.get_application_name().is_none() {
            settings.application_name("edge-gateway");
        }
        let prefix = &config.table_prefix;
        let ok = prefix.len() <= MAX_PREFIX
            && prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !prefix.starts_with(|c: char| c.is_ascii_digit());
        if !ok {
            return Err(fail(format!(
                "table_prefix `{prefix}`: use up to {MAX_PREFIX} lower-case letters, digits and `_`, not starting with a digit"
            )));
        }
        Ok(TableOutput {
            sql: Sql::new(prefix),
            allow: Allowlist::new(config.identities.as_deref()),
            name,
            config,
            ctx,
            stats,
            settings,
        })
    }

    /// Keeps the table current until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut cursor = loop {
            match Cursor::load(&self.ctx, &self.name) {
                Ok(c) => break c,
                Err(e) => {
                    error!(destination = %self.name, error = %e, "Cannot read the audience cursor; retrying.");
                    self.stats.set_error(&e.to_string());
                    if !pause(STORE_RETRY, &shutdown).await {
                        return;
                    }
                }
            }
        };
        self.stats.cursor.store(cursor.through, Ordering::Relaxed);
        self.ctx
            .audiences
            .set_changes_done(&self.name, cursor.through);
        let backoff = Backoff {
            initial: self.config.retry_initial,
            max: self.config.retry_max,
        };
        let mut failures = 0u32;
        loop {
            let failure = match self.connect().await {
                Ok(mut client) => {
                    if failures > 0 {
                        info!(destination = %self.name, "Audience table reachable again.");
                    }
                    failures = 0;
                    self.serve(&mut client, &mut cursor, &shutdown).await
                }
                Err(f) => f,
            };
            let reason = match failure {
                Failure::Shutdown => return,
                Failure::Database(r) | Failure::Store(r) => r,
            };
            failures = failures.saturating_add(1);
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            self.stats.set_error(&reason);
            let delay = backoff.delay(failures, random_unit(), None);
            warn!(destination = %self.name, failures, delay = ?delay, reason = %reason, "Audience table update failed; retrying.");
            if !pause(delay, &shutdown).await {
                return;
            }
        }
    }

    /// A connection with the table created.
    async fn connect(&self) -> Result<Client, Failure> {
        let connect = async {
            let (client, connection) = self.settings.connect(NoTls).await.map_err(|e| db(&e))?;
            let name = self.name.clone();
            // Ends when the client is dropped or the server goes.
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    warn!(destination = %name, error = %e, "PostgreSQL connection closed.");
                }
            });
            client
                .batch_execute(&self.sql.create)
                .await
                .map_err(|e| db(&e))?;
            Ok(client)
        };
        tokio::time::timeout(self.config.timeout, connect)
            .await
            .map_err(|_| {
                Failure::Database(format!(
                    "connecting took longer than {:?}",
                    self.config.timeout
                ))
            })?
    }

    /// Resyncs when needed, then applies the change log until a failure or shutdown.
    async fn serve(
        &self,
        client: &mut Client,
        cursor: &mut Cursor,
        shutdown: &CancellationToken,
    ) -> Failure {
        let mut head = self.ctx.audiences.changes_head();
        if let Err(f) = self.resync_if_needed(client, cursor).await {
            return f;
        }
        loop {
            // The head first: a change committed after it is not taken for a gap.
            let published = *head.borrow();
            let changes = match self.ctx.audiences.read_changes(cursor.through, READ_PAGE) {
                Ok(c) => c,
                Err(e) => return Failure::Store(e.to_string()),
            };
            if log_lost(&changes, published, cursor.through) {
                // Pruned past our cursor (we were away): rebuild, then go on.
                warn!(destination = %self.name, cursor = cursor.through, "Membership changes were pruned past the cursor; rebuilding the table.");
                if let Err(f) = self.resync(client, cursor).await {
                    return f;
                }
                continue;
            }
            let Some(last) = changes.last().map(|c| c.seq) else {
                if !wait_for_changes(&mut head, cursor.through, shutdown).await {
                    return Failure::Shutdown;
                }
                continue;
            };
            let keep = |a: &str| selected(&self.config.audiences, a);
            let (upserts, deletes) = split_page(&changes, keep, &self.allow);
            let applied = (upserts.len() + deletes.len()) as u64;
            let write = async {
                let txn = client.transaction().await.map_err(|e| db(&e))?;
                if !upserts.is_empty() {
                    txn.execute(&self.sql.upsert, &[&Value::from(upserts).to_string()])
                        .await
                        .map_err(|e| db(&e))?;
                }
                if !deletes.is_empty() {
                    txn.execute(&self.sql.delete, &[&Value::from(deletes).to_string()])
                        .await
                        .map_err(|e| db(&e))?;
                }
                txn.commit().await.map_err(|e| db(&e))
            };
            match tokio::time::timeout(self.config.timeout, write).await {
                Ok(Ok(())) => {}
                Ok(Err(f)) => return f,
                Err(_) => {
                    return Failure::Database(format!("no answer within {:?}", self.config.timeout))
                }
            }
            cursor.through = last;
            if let Err(e) = cursor.save(&self.ctx, &self.name).await {
                return Failure::Store(e.to_string());
            }
            self.stats.cursor.store(last, Ordering::Relaxed);
            self.stats.delivered.fetch_add(applied, Ordering::Relaxed);
        }
    }

    /// Rebuilds the table when it is empty or the log no longer reaches the cursor.
    async fn resync_if_needed(
        &self,
        client: &mut Client,
        cursor: &mut Cursor,
    ) -> Result<(), Failure> {
        let empty: bool = client
            .query_one(&self.sql.is_empty, &[])
            .await
            .map_err(|e| db(&e))?
            .try_get(0)
            .map_err(|e| db(&e))?;
        let published = *self.ctx.audiences.changes_head().borrow();
        let next = self
            .ctx
            .audiences
            .read_changes(cursor.through, 1)
            .map_err(|e| Failure::Store(e.to_string()))?;
        let pruned = log_lost(&next, published, cursor.through);
        if empty || pruned {
            self.resync(client, cursor).await?;
        }
        Ok(())
    }

    /// Replaces the table's rows with the live membership in one transaction, then
    /// moves the cursor to the log head read before the members.
    async fn resync(&self, client: &mut Client, cursor: &mut Cursor) -> Result<(), Failure> {
        let head = *self.ctx.audiences.changes_head().borrow();
        let audiences = self
            .ctx
            .audiences
            .sizes()
            .map_err(|e| Failure::Store(e.to_string()))?;
        let txn = client.transaction().await.map_err(|e| db(&e))?;
        txn.execute(&self.sql.clear, &[])
            .await
            .map_err(|e| db(&e))?;
        let mut rows = 0u64;
        for a in audiences
            .iter()
            .filter(|a| selected(&self.config.audiences, &a.name))
        {
            let mut after = 0;
            loop {
                let page = self
                    .ctx
                    .audiences
                    .members(&a.name, after, MEMBERS_PAGE)
                    .map_err(|e| Failure::Store(e.to_string()))?
                    .unwrap_or_default();
                let Some(last) = page.last() else { break };
                after = last.profile_id;
                let values: Vec<Value> = page
                    .iter()
                    .map(|m| {
                        row(
                            &self.allow,
                            &a.name,
                            m.profile_id,
                            &m.identities,
                            m.entered_ms,
                        )
                    })
                    .collect();
                rows += values.len() as u64;
                let param = Value::from(values).to_string();
                tokio::time::timeout(
                    self.config.timeout,
                    txn.execute(&self.sql.upsert, &[&param]),
                )
                .await
                .map_err(|_| {
                    Failure::Database(format!("no answer within {:?}", self.config.timeout))
                })?
                .map_err(|e| db(&e))?;
                if page.len() < MEMBERS_PAGE {
                    break;
                }
            }
        }
        txn.commit().await.map_err(|e| db(&e))?;
        cursor.through = head;
        cursor
            .save(&self.ctx, &self.name)
            .await
            .map_err(|e| Failure::Store(e.to_string()))?;
        self.stats.cursor.store(head, Ordering::Relaxed);
        info!(destination = %self.name, rows, cursor = head, "Audience table rebuilt from the live membership.");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(seq: u64, audience: &str, profile: u64, entered: bool) -> MembershipChange {
        MembershipChange {
            seq,
            audience: audience.into(),
            profile_id: profile,
            entered,
            at_ms: 1_000 * seq as i64,
            identities: vec![
                ("customer_id".into(), format!("u{profile}")),
                ("email".into(), format!("u{profile}@example.org\0")),
            ],
            devices: Vec::new(),
            audiences_now: Vec::new(),
        }
    }

    #[test]
    fn a_page_keeps_each_members_last_state() {
        let changes = [
            change(1, "a", 1, true),
            change(2, "a", 1, false),
            change(3, "b", 1, true),
            change(4, "a", 2, false),
            change(5, "a", 2, true),
            change(6, "c", 3, true),
        ];
        let (upserts, deletes) = split_page(&changes, |a| a != "c", &Allowlist::new(None));
        assert_eq!(
            upserts,
            [
                json!({"audience": "b", "profile_id": 1, "customer_id": "u1",
                       "email": "u1@example.org", "entered_ms": 3000}),
                json!({"audience": "a", "profile_id": 2, "customer_id": "u2",
                       "email": "u2@example.org", "entered_ms": 5000}),
            ]
        );
        assert_eq!(deletes, [json!({"audience": "a", "profile_id": 1})]);
    }

    #[test]
    fn identities_outside_the_allowlist_stay_null() {
        let allow = Allowlist::new(Some(&["email".to_owned()]));
        let r = row(&allow, "a", 1, &[("customer_id".into(), "u1".into())], 0);
        assert_eq!(r["customer_id"], Value::Null);
        assert_eq!(r["email"], Value::Null);
    }

    #[test]
    fn statements_use_the_prefix() {
        let sql = Sql::new("edge_");
        assert!(sql.create.contains("edge_audience_members"));
        assert!(sql.upsert.contains("ON CONFLICT (audience, profile_id)"));
    }
}
