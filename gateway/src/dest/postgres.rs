//! PostgreSQL destination: the analytical store. Events go into `<prefix>events`
//! (and, with `profile_snapshots`, each event's profile into `<prefix>profiles`),
//! tables created on start when missing.
//!
//! One batch is one statement: the rows travel as a single JSON array parameter that
//! `jsonb_to_recordset` turns into rows, inserted `ON CONFLICT (event_id) DO NOTHING`,
//! so a batch re-sent after a crash adds nothing. The profile upsert rides in the same
//! statement (a data-modifying CTE), so both commit or neither does.
//!
//! This module decides only what a batch's outcome is; retries, backoff, dead letters
//! and cursors belong to the outbox driving it ([`super::outbox`]). It must never turn
//! an infrastructure failure into a rejection: only errors about the data itself
//! (SQLSTATE classes 22, 23, 54) reject a batch; everything else is retried.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls, Statement};
use tracing::{info, warn};

use super::{Delivery, SendOutcome, Sink};
use crate::config::DestinationConfig;

/// Longest accepted `table_prefix`: PostgreSQL identifiers are cut at 63 bytes and the
/// longest suffix we add (`events_pkey`, made by PostgreSQL) is 11.
const MAX_PREFIX: usize = 50;

/// A PostgreSQL destination: a small pool of connections, one per concurrent batch.
#[derive(Debug)]
pub struct PostgresSink {
    name: String,
    settings: tokio_postgres::Config,
    sql: Sql,
    timeout: Duration,
    profile_snapshots: bool,
    /// One connection per concurrent send (`concurrency`). `None`: not connected, or
    /// dropped after a failure; the next send through the slot reconnects.
    slots: Vec<Mutex<Option<Conn>>>,
    next_slot: AtomicUsize,
    /// Tables must be (re)created by the next connection: at start, and after a send
    /// found a table missing (dropped by an operator).
    needs_tables: AtomicBool,
}

#[derive(Debug)]
struct Conn {
    client: Client,
    insert: Statement,
}

/// The statements of one destination, built once from its table prefix.
#[derive(Debug, Clone)]
struct Sql {
    create: Vec<String>,
    insert: String,
}

impl Sql {
    fn new(prefix: &str, profile_snapshots: bool) -> Self {
        let events = format!("{prefix}events");
        let profiles = format!("{prefix}profiles");
        let mut create = vec![format!(
            "CREATE TABLE IF NOT EXISTS {events} (
                event_id uuid PRIMARY KEY,
                seq bigint NOT NULL,
                \"type\" text,
                event text,
                user_id text,
                anonymous_id text,
                profile_id bigint,
                \"timestamp\" timestamptz,
                received_at timestamptz,
                properties jsonb,
                traits jsonb,
                context jsonb,
                body jsonb NOT NULL
            )"
        )];
        let insert_events = format!(
            "INSERT INTO {events} (event_id, seq, \"type\", event, user_id,
                anonymous_id, profile_id, \"timestamp\", received_at, properties, traits,
                context, body)
             SELECT event_id, seq, \"type\", event, user_id, anonymous_id,
                profile_id, \"timestamp\", received_at, properties, traits, context, body
             FROM jsonb_to_recordset($1::text::jsonb) AS r(event_id uuid, seq bigint,
                \"type\" text, event text, user_id text, anonymous_id text,
                profile_id bigint, \"timestamp\" timestamptz, received_at timestamptz,
                properties jsonb, traits jsonb, context jsonb, body jsonb)
             ON CONFLICT (event_id) DO NOTHING"
        );
        let insert = if profile_snapshots {
            create.push(format!(
                "CREATE TABLE IF NOT EXISTS {profiles} (
                    profile_id bigint PRIMARY KEY,
                    traits jsonb NOT NULL,
                    identities jsonb NOT NULL,
                    updated_at timestamptz NOT NULL
                )"
            ));
            // Batches may land out of order (concurrency, replays after a crash): the
            // newer snapshot wins key by key, the older one only fills in missing keys.
            format!(
                "WITH ev AS ({insert_events})
                 INSERT INTO {profiles} AS p (profile_id, traits, identities, updated_at)
                 SELECT profile_id, traits, identities, updated_at
                 FROM jsonb_to_recordset($2::text::jsonb) AS r(profile_id bigint,
                    traits jsonb, identities jsonb, updated_at timestamptz)
                 ON CONFLICT (profile_id) DO UPDATE SET
                    traits = CASE WHEN EXCLUDED.updated_at >= p.updated_at
                        THEN p.traits || EXCLUDED.traits ELSE EXCLUDED.traits || p.traits END,
                    identities = CASE WHEN EXCLUDED.updated_at >= p.updated_at
                        THEN p.identities || EXCLUDED.identities
                        ELSE EXCLUDED.identities || p.identities END,
                    updated_at = GREATEST(p.updated_at, EXCLUDED.updated_at)"
            )
        } else {
            insert_events
        };
        Sql { create, insert }
    }
}

/// `table_prefix` must be a plain lower-case identifier: it is spliced into SQL.
fn check_prefix(prefix: &str) -> Result<(), String> {
    let ok = !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !prefix.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "table_prefix `{prefix}`: use 1 to {MAX_PREFIX} lower-case letters, digits and `_`, not starting with a digit"
        ))
    }
}

impl PostgresSink {
    /// Checks the config and connects once to create the tables. A database that is
    /// down is not an error here (the gateway still starts; sends retry and create the
    /// tables once it is back); a config the destination cannot use is.
    pub async fn connect(config: &DestinationConfig) -> Result<PostgresSink, String> {
        let name = config.name.clone();
        let conn = config
            .connection
            .as_deref()
            .ok_or_else(|| format!("destination `{name}`: `connection` is required"))?;
        let mut settings = tokio_postgres::Config::from_str(conn)
            .map_err(|e| format!("destination `{name}`: `connection`: {e}"))?;
        if settings.get_connect_timeout().is_none() {
            settings.connect_timeout(config.timeout);
        }
        if settings.get_application_name().is_none() {
            settings.application_name("edge-gateway");
        }
        check_prefix(&config.table_prefix).map_err(|e| format!("destination `{name}`: {e}"))?;
        let sink = PostgresSink {
            name,
            settings,
            sql: Sql::new(&config.table_prefix, config.profile_snapshots),
            timeout: config.timeout,
            profile_snapshots: config.profile_snapshots,
            slots: (0..config.concurrency.max(1))
                .map(|_| Mutex::new(None))
                .collect(),
            next_slot: AtomicUsize::new(0),
            needs_tables: AtomicBool::new(true),
        };
        if let Some(slot) = sink.slots.first() {
            match sink.open().await {
                Ok(conn) => {
                    info!(destination = %sink.name, "PostgreSQL destination connected; tables ready.");
                    *slot.lock().await = Some(conn);
                }
                Err(e) => {
                    warn!(destination = %sink.name, error = %e, "PostgreSQL is not reachable yet; will retry on the first send.")
                }
            }
        }
        Ok(sink)
    }

    /// A new connection, with the tables created first when needed.
    async fn open(&self) -> Result<Conn, String> {
        let connect = async {
            let (client, connection) = self
                .settings
                .connect(NoTls)
                .await
                .map_err(|e| describe(&e))?;
            let name = self.name.clone();
            // The connection task ends when the client is dropped or the server goes.
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    warn!(destination = %name, error = %e, "PostgreSQL connection closed.");
                }
            });
            if self.needs_tables.load(Ordering::Acquire) {
                for ddl in &self.sql.create {
                    client.batch_execute(ddl).await.map_err(|e| describe(&e))?;
                }
                self.needs_tables.store(false, Ordering::Release);
            }
            let insert = client
                .prepare(&self.sql.insert)
                .await
                .map_err(|e| describe(&e))?;
            Ok(Conn { client, insert })
        };
        tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| format!("connecting took longer than {:?}", self.timeout))?
    }

    async fn send_batch(&self, batch: &[Delivery]) -> SendOutcome {
        let (events, profiles) = match encode_batch(batch, self.profile_snapshots) {
            Ok(v) => v,
            Err(reason) => return SendOutcome::Reject { reason },
        };
        let i = self.next_slot.fetch_add(1, Ordering::Relaxed) % self.slots.len().max(1);
        let Some(slot) = self.slots.get(i) else {
            return retry("no connection slot".into());
        };
        let mut slot = slot.lock().await;
        if slot.as_ref().is_some_and(|c| c.client.is_closed()) {
            *slot = None;
        }
        if slot.is_none() {
            match self.open().await {
                Ok(conn) => *slot = Some(conn),
                Err(e) => return retry(format!("cannot connect: {e}")),
            }
        }
        let Some(conn) = slot.as_ref() else {
            return retry("not connected".into());
        };
        let run = async {
            if self.profile_snapshots {
                conn.client
                    .execute(&conn.insert, &[&events, &profiles])
                    .await
            } else {
                conn.client.execute(&conn.insert, &[&events]).await
            }
        };
        let result = tokio::time::timeout(self.timeout, run).await;
        match result {
            Ok(Ok(_)) => SendOutcome::Delivered,
            Err(_) => {
                // The statement may still commit; that is fine (idempotent), but the
                // connection's state is unknown, so it is not reused.
                *slot = None;
                retry(format!("no answer within {:?}", self.timeout))
            }
            Ok(Err(e)) => {
                let reason = describe(&e);
                match classify(e.code().map(|c| c.code())) {
                    ErrorClass::Data => SendOutcome::Reject { reason },
                    ErrorClass::MissingTable => {
                        self.needs_tables.store(true, Ordering::Release);
                        *slot = None;
                        retry(reason)
                    }
                    ErrorClass::Transient => {
                        if conn.client.is_closed() || e.code().is_none() {
                            *slot = None;
                        }
                        retry(reason)
                    }
                }
            }
        }
    }
}

impl Sink for PostgresSink {
    async fn send(&self, batch: &[Delivery]) -> SendOutcome {
        if batch.is_empty() {
            return SendOutcome::Delivered;
        }
        self.send_batch(batch).await
    }
}

fn retry(reason: String) -> SendOutcome {
    SendOutcome::Retry {
        after: None,
        reason,
    }
}

/// An error as an operator wants to read it: SQLSTATE and the server's message.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({}): {}", db.severity(), db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// What a failed statement means for its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorClass {
    /// The rows themselves are unacceptable; sending them again cannot work.
    Data,
    /// A table is gone: create it again, then retry.
    MissingTable,
    /// Connection lost, server shutting down, too many connections, serialization
    /// failure, deadlock, permissions, disk full...: the batch may succeed later.
    Transient,
}

/// Classifies by SQLSTATE; `None` (no server error: I/O, closed connection) is transient.
fn classify(sqlstate: Option<&str>) -> ErrorClass {
    let Some(code) = sqlstate else {
        return ErrorClass::Transient;
    };
    if code == "42P01" {
        return ErrorClass::MissingTable;
    }
    // 22 data exception, 23 integrity constraint violation, 54 program limit exceeded
    // (e.g. a value too large): about these rows, whenever they are sent.
    match code.get(..2) {
        Some("22" | "23" | "54") => ErrorClass::Data,
        _ => ErrorClass::Transient,
    }
}

/// One row of `<prefix>events`, as `jsonb_to_recordset` reads it. Absent fields
/// (minimized away) become NULL.
#[derive(Debug, Serialize)]
struct EventRow<'a> {
    event_id: String,
    seq: i64,
    #[serde(rename = "type")]
    kind: Option<&'a str>,
    event: Option<&'a str>,
    user_id: Option<&'a str>,
    anonymous_id: Option<&'a str>,
    profile_id: Option<i64>,
    timestamp: Option<&'a str>,
    received_at: Option<&'a str>,
    properties: Option<&'a Value>,
    traits: Option<&'a Value>,
    context: Option<&'a Value>,
    body: &'a Value,
}

/// One row of `<prefix>profiles`.
#[derive(Debug, Default, Serialize)]
struct ProfileRow {
    profile_id: i64,
    traits: Map<String, Value>,
    identities: Map<String, Value>,
    updated_at: String,
}

fn text<'a>(body: &'a Value, key: &str) -> Option<&'a str> {
    body.get(key).and_then(Value::as_str)
}

/// A timestamp PostgreSQL will take, or `None` for anything that is not RFC 3339
/// within years 1..=9999 (so one odd client clock cannot reject a whole batch).
fn valid_time<'a>(body: &'a Value, key: &str) -> Option<&'a str> {
    let s = text(body, key)?;
    let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    (t.year() >= 1).then_some(s)
}

/// The profile id as a `bigint`; 0 means the event resolved to no profile.
fn profile_id(d: &Delivery) -> Result<Option<i64>, String> {
    if d.profile_id == 0 {
        return Ok(None);
    }
    i64::try_from(d.profile_id)
        .map(Some)
        .map_err(|_| format!("profile id {} does not fit a bigint", d.profile_id))
}

/// The two JSON parameters of one batch: event rows, and profile rows (empty array
/// without snapshots), one per profile in ascending id order so concurrent batches
/// lock profile rows in the same order and cannot deadlock.
fn encode_batch(batch: &[Delivery], snapshots: bool) -> Result<(String, String), String> {
    let bodies: Vec<Cow<'_, Value>> = batch.iter().map(|d| without_nul(&d.body)).collect();
    let mut rows = Vec::with_capacity(batch.len());
    let mut profiles: BTreeMap<i64, ProfileRow> = BTreeMap::new();
    let now = OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .map_err(|e| format!("clock: {e}"))?;
    for (d, body) in batch.iter().zip(&bodies) {
        let body: &Value = body;
        let seq = i64::try_from(d.seq).map_err(|_| format!("seq {} too large", d.seq))?;
        let profile = profile_id(d)?;
        rows.push(EventRow {
            event_id: d.event_id.to_string(),
            seq,
            kind: text(body, "type"),
            event: text(body, "event").or_else(|| text(body, "name")),
            user_id: text(body, "userId"),
            anonymous_id: text(body, "anonymousId"),
            profile_id: profile,
            timestamp: valid_time(body, "timestamp"),
            received_at: valid_time(body, "receivedAt"),
            properties: body.get("properties"),
            traits: body.get("traits"),
            context: body.get("context"),
            body,
        });
        if let (true, Some(id)) = (snapshots, profile) {
            let p = profiles.entry(id).or_insert_with(|| ProfileRow {
                profile_id: id,
                updated_at: now.clone(),
                ..ProfileRow::default()
            });
            merge_snapshot(p, body);
        }
    }
    let events = serde_json::to_string(&rows).map_err(|e| format!("encode events: {e}"))?;
    let profiles: Vec<ProfileRow> = profiles.into_values().collect();
    let profiles = serde_json::to_string(&profiles).map_err(|e| format!("encode profiles: {e}"))?;
    Ok((events, profiles))
}

/// Folds one event into its profile's snapshot: what this destination may see of the
/// profile (its minimized traits and identities), later events winning key by key.
fn merge_snapshot(p: &mut ProfileRow, body: &Value) {
    if let Some(Value::Object(traits)) = body.get("traits") {
        for (k, v) in traits {
            p.traits.insert(k.clone(), v.clone());
        }
    }
    for (key, kind) in [("userId", "customer_id"), ("anonymousId", "anonymous_id")] {
        if let Some(v) = body.get(key).filter(|v| v.is_string()) {
            p.identities.insert(kind.to_owned(), v.clone());
        }
    }
    if let Some(Value::Object(ids)) = body.get("context").and_then(|c| c.get("externalIds")) {
        for (k, v) in ids {
            p.identities.insert(k.clone(), v.clone());
        }
    }
    if let Some(at) = valid_time(body, "receivedAt").or_else(|| valid_time(body, "timestamp")) {
        p.updated_at = at.to_owned();
    }
}

/// `body` with NUL characters replaced: `jsonb` refuses `\u0000`, and one such
/// property must not cost the whole batch. Borrowed unless a NUL is present.
fn without_nul(body: &Value) -> Cow<'_, Value> {
    fn has_nul(v: &Value) -> bool {
        match v {
            Value::String(s) => s.contains('\0'),
            Value::Array(a) => a.iter().any(has_nul),
            Value::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
            _ => false,
        }
    }
    fn scrub(v: &mut Value) {
        match v {
            Value::String(s) => *s = s.replace('\0', "\u{FFFD}"),
            Value::Array(a) => a.iter_mut().for_each(scrub),
            Value::Object(m) => {
                let old = std::mem::take(m);
                for (k, mut v) in old {
                    scrub(&mut v);
                    m.insert(k.replace('\0', "\u{FFFD}"), v);
                }
            }
            _ => {}
        }
    }
    if !has_nul(body) {
        return Cow::Borrowed(body);
    }
    let mut owned = body.clone();
    scrub(&mut owned);
    Cow::Owned(owned)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use edge_agent::model::EventId;
    use serde_json::json;

    fn delivery(seq: u64, profile_id: u64, body: Value) -> Delivery {
        Delivery {
            seq,
            event_id: EventId(u128::from(seq) << 64 | 7),
            profile_id,
            body,
        }
    }

    #[test]
    fn minimized_fields_become_nulls_not_errors() {
        let d = delivery(3, 9, json!({"type": "track", "event": "Play"}));
        let (events, _) = encode_batch(std::slice::from_ref(&d), false).unwrap();
        let rows: Value = serde_json::from_str(&events).unwrap();
        let row = &rows[0];
        assert_eq!(row["event_id"], d.event_id.to_string());
        assert_eq!(row["seq"], 3);
        assert_eq!(row["type"], "track");
        assert_eq!(row["event"], "Play");
        assert_eq!(row["profile_id"], 9);
        for absent in [
            "user_id",
            "anonymous_id",
            "timestamp",
            "properties",
            "context",
        ] {
            assert!(row[absent].is_null(), "{absent}: {row}");
        }
        assert_eq!(row["body"], d.body);
    }

    #[test]
    fn page_and_screen_names_fill_the_event_column() {
        let (events, _) = encode_batch(
            &[delivery(1, 1, json!({"type": "screen", "name": "Home"}))],
            false,
        )
        .unwrap();
        let rows: Value = serde_json::from_str(&events).unwrap();
        assert_eq!(rows[0]["event"], "Home");
    }

    #[test]
    fn unparseable_timestamps_are_dropped_from_columns_but_kept_in_the_body() {
        let body = json!({"timestamp": "yesterday", "receivedAt": "2024-05-01T10:00:00.5Z"});
        let (events, _) = encode_batch(&[delivery(1, 1, body)], false).unwrap();
        let rows: Value = serde_json::from_str(&events).unwrap();
        assert!(rows[0]["timestamp"].is_null());
        assert_eq!(rows[0]["received_at"], "2024-05-01T10:00:00.5Z");
        assert_eq!(rows[0]["body"]["timestamp"], "yesterday");
    }

    #[test]
    fn nul_characters_are_replaced_everywhere() {
        let body = json!({"properties": {"a\u{0}b": ["x\u{0}"]}, "userId": "u\u{0}"});
        let (events, _) = encode_batch(&[delivery(1, 1, body)], false).unwrap();
        assert!(!events.contains("\\u0000"), "{events}");
        let rows: Value = serde_json::from_str(&events).unwrap();
        assert_eq!(rows[0]["user_id"], "u\u{FFFD}");
        assert_eq!(rows[0]["properties"]["a\u{FFFD}b"][0], "x\u{FFFD}");
    }

    #[test]
    fn snapshots_merge_one_row_per_profile_in_id_order() {
        let batch = [
            delivery(
                1,
                5,
                json!({"userId": "c1", "traits": {"plan": "free", "ltv": 1},
                "receivedAt": "2024-05-01T10:00:00Z"}),
            ),
            delivery(2, 2, json!({"anonymousId": "a2"})),
            delivery(
                3,
                5,
                json!({"traits": {"plan": "pro"},
                "context": {"externalIds": {"email": "x@y.z"}},
                "receivedAt": "2024-05-01T11:00:00Z"}),
            ),
            delivery(4, 0, json!({"anonymousId": "nobody"})),
        ];
        let (_, profiles) = encode_batch(&batch, true).unwrap();
        let rows: Value = serde_json::from_str(&profiles).unwrap();
        let rows = rows.as_array().unwrap();
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(rows[0]["profile_id"], 2);
        assert_eq!(rows[0]["identities"], json!({"anonymous_id": "a2"}));
        assert_eq!(rows[1]["profile_id"], 5);
        assert_eq!(rows[1]["traits"], json!({"plan": "pro", "ltv": 1}));
        assert_eq!(
            rows[1]["identities"],
            json!({"customer_id": "c1", "email": "x@y.z"})
        );
        assert_eq!(rows[1]["updated_at"], "2024-05-01T11:00:00Z");
    }

    #[test]
    fn without_snapshots_no_profile_rows_are_built() {
        let (_, profiles) =
            encode_batch(&[delivery(1, 5, json!({"traits": {"a": 1}}))], false).unwrap();
        assert_eq!(profiles, "[]");
    }

    #[test]
    fn only_data_errors_reject_a_batch() {
        assert_eq!(classify(Some("22P02")), ErrorClass::Data); // invalid input syntax
        assert_eq!(classify(Some("23502")), ErrorClass::Data); // not null violation
        assert_eq!(classify(Some("54000")), ErrorClass::Data);
        assert_eq!(classify(Some("42P01")), ErrorClass::MissingTable);
        for transient in [
            "40001", "40P01", "53300", "57P01", "08006", "42501", "53100",
        ] {
            assert_eq!(
                classify(Some(transient)),
                ErrorClass::Transient,
                "{transient}"
            );
        }
        assert_eq!(classify(None), ErrorClass::Transient);
    }

    #[test]
    fn table_prefixes_that_could_inject_sql_are_refused() {
        assert!(check_prefix("edge_").is_ok());
        assert!(check_prefix("a1_").is_ok());
        for bad in ["", "Edge", "1x", "x; drop table y", "a\"b", &"x".repeat(51)] {
            assert!(check_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_upsert_rides_in_the_insert_statement_only_with_snapshots() {
        let with = Sql::new("edge_", true);
        assert_eq!(with.create.len(), 2);
        assert!(with
            .insert
            .starts_with("WITH ev AS (INSERT INTO edge_events"));
        assert!(with.insert.contains("ON CONFLICT (event_id) DO NOTHING"));
        let without = Sql::new("edge_", false);
        assert_eq!(without.create.len(), 1);
        assert!(!without.insert.contains("profiles"));
    }
}
