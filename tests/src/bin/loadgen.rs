//! `loadgen`: benchmark of the release `edge-agent` binary against its targets.
//!
//! Starts the agent on a free loopback port with a temp config and data dir, then
//! measures, in order:
//!
//! 1. idle RSS (VmRSS after ~1 s idle);
//! 2. durable ingest throughput: closed loop over keep-alive HTTP/1.1 connections,
//!    each sending 100-event `/v1/batch` requests for a fixed time (only 200s count),
//!    with the agent's peak RSS sampled meanwhile;
//! 3. ack latency at 10k events/s, open loop paced by tokio intervals: 100-event
//!    batches at 100 req/s, then single-event `/v1/track` at 10,000 req/s;
//! 4. clean shutdown: SIGTERM, exit code 0;
//! 5. a raw redb baseline: the same events, postcard-encoded, 100 per write
//!    transaction with default (Immediate) durability, for the same time;
//! 6. the stripped binary size.
//!
//! ```text
//! cargo build --release -p edge-agent -p edge-tests && target/release/loadgen [--help]
//! ```
//!
//! Traffic goes only to 127.0.0.1. Every loop is bounded in time and in count.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::MissedTickBehavior;

const WRITE_KEY: &str = "bench-key";
/// Longest wait for one response; a slower one counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for `/health` after starting the agent.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for the agent to exit after SIGTERM (its drain timeout is 10 s).
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);
/// Cap on requests per connection in the closed-loop phase.
const MAX_REQUESTS_PER_CONN: u64 = 1_000_000;
/// Cap on events written by the redb baseline.
const MAX_BASELINE_EVENTS: u64 = 50_000_000;
/// Events per redb write transaction in the baseline.
const BASELINE_TXN_EVENTS: u64 = 100;
/// Distinct pre-encoded events the baseline cycles through.
const BASELINE_POOL: usize = 1000;
/// Placeholder overwritten with a fresh UUID before every send.
const ID_PLACEHOLDER: &str = "00000000-0000-4000-8000-000000000000";

/// Targets.
const TARGET_EVENTS_PER_S: f64 = 200_000.0;
const TARGET_RATIO: f64 = 0.5;
const TARGET_P99_MS: f64 = 5.0;
const TARGET_IDLE_RSS_MIB: f64 = 8.0;
const TARGET_BINARY_MIB: f64 = 6.0;

const USAGE: &str = "\
loadgen: benchmark the edge-agent binary (durable ingest, ack latency, RSS, size)

USAGE: loadgen [OPTIONS]

OPTIONS:
  --agent PATH            edge-agent binary [default: next to this executable]
  --dir PATH              where the temp data dirs go [default: system temp dir]
  --connections N         keep-alive connections in the throughput phase [16]
  --duration SECS         throughput phase and redb baseline length [10]
  --batch N               events per /v1/batch request [100]
  --latency-duration SECS length of each paced latency phase [10]
  --track-connections N   connections for the 10k req/s /v1/track phase [100]
  --client-threads N      tokio worker threads of this load generator [2]
  --strict                exit 1 when a target is missed
  -h, --help              this text
";

#[derive(Debug, Clone)]
struct Args {
    agent: Option<PathBuf>,
    dir: Option<PathBuf>,
    connections: usize,
    duration: Duration,
    batch: usize,
    latency_duration: Duration,
    track_connections: usize,
    client_threads: usize,
    strict: bool,
}

impl Args {
    fn parse() -> Result<Option<Args>> {
        let mut args = Args {
            agent: None,
            dir: None,
            connections: 16,
            duration: Duration::from_secs(10),
            batch: 100,
            latency_duration: Duration::from_secs(10),
            track_connections: 100,
            client_threads: 2,
            strict: false,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().ok_or_else(|| anyhow!("{flag} needs a value"));
            match flag.as_str() {
                "-h" | "--help" => return Ok(None),
                "--agent" => args.agent = Some(PathBuf::from(value()?)),
                "--dir" => args.dir = Some(PathBuf::from(value()?)),
                "--connections" => args.connections = positive(&flag, &value()?)?,
                "--duration" => args.duration = seconds(&flag, &value()?)?,
                "--batch" => args.batch = positive(&flag, &value()?)?,
                "--latency-duration" => args.latency_duration = seconds(&flag, &value()?)?,
                "--track-connections" => args.track_connections = positive(&flag, &value()?)?,
                "--client-threads" => args.client_threads = positive(&flag, &value()?)?,
                "--strict" => args.strict = true,
                other => bail!("unknown argument `{other}`\n\n{USAGE}"),
            }
        }
        if args.batch > 1000 {
            bail!("--batch: at most 1000 events (the agent's 500 KiB batch limit)");
        }
        Ok(Some(args))
    }
}

fn positive(flag: &str, v: &str) -> Result<usize> {
    match v.parse::<usize>() {
        Ok(n) if (1..=100_000).contains(&n) => Ok(n),
        _ => bail!("{flag}: expected an integer in 1..=100000, got `{v}`"),
    }
}

fn seconds(flag: &str, v: &str) -> Result<Duration> {
    match v.parse::<f64>() {
        Ok(s) if s > 0.0 && s <= 3600.0 => Ok(Duration::from_secs_f64(s)),
        _ => bail!("{flag}: expected seconds in (0, 3600], got `{v}`"),
    }
}

// ---------------------------------------------------------------------------------
// Payloads

/// Fresh UUIDv4-shaped message ids: a random 60-bit prefix per generator plus a
/// counter, so ids are unique without a random draw per event.
#[derive(Debug)]
struct IdGen {
    hi: u64,
    next: u64,
}

impl IdGen {
    fn new() -> Self {
        IdGen {
            hi: rand::random::<u64>(),
            next: 0,
        }
    }

    fn write(&mut self, out: &mut [u8]) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut v = (u128::from(self.hi) << 64) | u128::from(self.next);
        self.next += 1;
        v = (v & !(0xF_u128 << 76)) | (0x4_u128 << 76); // version 4
        v = (v & !(0x3_u128 << 62)) | (0x2_u128 << 62); // RFC 4122 variant
        let mut nibble = 0;
        for (i, slot) in out.iter_mut().take(36).enumerate() {
            if matches!(i, 8 | 13 | 18 | 23) {
                *slot = b'-';
            } else {
                let shift = 124 - 4 * nibble;
                *slot = HEX[((v >> shift) & 0xF) as usize];
                nibble += 1;
            }
        }
    }
}

/// One realistic Segment track event as JSON, with [`ID_PLACEHOLDER`] as its
/// messageId. Returns the text and the byte offset of the placeholder.
fn event_json(rng: &mut impl Rng, timestamp: &str) -> (String, usize) {
    let user: u32 = rng.random_range(0..5000);
    let anon: u32 = rng.random();
    let (name, properties) = match rng.random_range(0..4u8) {
        0 => (
            "Video Content Playing",
            format!(
                r#"{{"asset_id":"ep-{}","title":"The Long Road","position":{},"total_length":2640,"quality":"hd"}}"#,
                rng.random_range(1000..9999),
                rng.random_range(0..2640)
            ),
        ),
        1 => (
            "Product Viewed",
            format!(
                r#"{{"product_id":"p-{}","sku":"SKU-{}","name":"Wireless Remote","price":{}.99,"currency":"EUR","category":"Accessories"}}"#,
                rng.random_range(10_000..99_999),
                rng.random_range(100_000..999_999),
                rng.random_range(5..200)
            ),
        ),
        2 => (
            "Button Clicked",
            format!(
                r#"{{"button_id":"btn-{}","screen":"Home","label":"Continue Watching","row":{},"column":{}}}"#,
                rng.random_range(1..500),
                rng.random_range(0..12),
                rng.random_range(0..8)
            ),
        ),
        _ => (
            "Search Performed",
            format!(
                r#"{{"query":"nature documentaries {}","results":{},"filters":{{"genre":"documentary","year":2025}}}}"#,
                rng.random_range(1..100),
                rng.random_range(0..400)
            ),
        ),
    };
    let mut s = String::with_capacity(420);
    s.push_str(r#"{"type":"track","messageId":""#);
    let at = s.len();
    s.push_str(ID_PLACEHOLDER);
    let _ = write!(
        s,
        r#"","userId":"user-{user:05}","anonymousId":"anon-{anon:08x}","event":"{name}","timestamp":"{timestamp}","properties":{properties},"context":{{"app":{{"name":"StreamBox","version":"4.2.0"}},"device":{{"id":"roku-4a7f9c2e"}},"locale":"en-GB"}}}}"#
    );
    (s, at)
}

/// A `/v1/batch` body of `n` events and the offsets of their message ids.
fn batch_body(n: usize) -> (String, Vec<usize>) {
    let mut rng = rand::rng();
    let ts = now_timestamp();
    let mut body = String::with_capacity(n * 420 + 200);
    let mut ids = Vec::with_capacity(n);
    body.push_str(r#"{"batch":["#);
    for i in 0..n {
        if i > 0 {
            body.push(',');
        }
        let (event, at) = event_json(&mut rng, &ts);
        ids.push(body.len() + at);
        body.push_str(&event);
    }
    let _ = write!(
        body,
        r#"],"sentAt":"{ts}","context":{{"library":{{"name":"analytics-kotlin","version":"1.16.0"}}}}}}"#
    );
    (body, ids)
}

fn now_timestamp() -> String {
    edge_agent::ingest::format_timestamp(edge_agent::model::now_ms())
}

/// A complete HTTP request (head and body) with the offsets of its message ids,
/// renewed before every send.
#[derive(Debug, Clone)]
struct Request {
    bytes: Vec<u8>,
    ids: Vec<usize>,
    events: u64,
}

impl Request {
    fn new(addr: SocketAddr, path: &str, body: &str, body_ids: &[usize], events: u64) -> Self {
        let auth = edge_agent::commands::basic_auth(WRITE_KEY, "");
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let mut bytes = head.into_bytes();
        let base = bytes.len();
        bytes.extend_from_slice(body.as_bytes());
        Request {
            bytes,
            ids: body_ids.iter().map(|at| base + at).collect(),
            events,
        }
    }

    /// `POST /v1/batch` with `n` events.
    fn batch(addr: SocketAddr, n: usize) -> Self {
        let (body, ids) = batch_body(n);
        Request::new(addr, "/v1/batch", &body, &ids, n as u64)
    }

    /// `POST /v1/track` with one event.
    fn track(addr: SocketAddr) -> Self {
        let (event, at) = event_json(&mut rand::rng(), &now_timestamp());
        Request::new(addr, "/v1/track", &event, &[at], 1)
    }

    fn get(addr: SocketAddr, path: &str) -> Self {
        let head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        Request {
            bytes: head.into_bytes(),
            ids: Vec::new(),
            events: 0,
        }
    }

    fn renew_ids(&mut self, gen: &mut IdGen) {
        for &at in &self.ids {
            gen.write(&mut self.bytes[at..at + ID_PLACEHOLDER.len()]);
        }
    }
}

// ---------------------------------------------------------------------------------
// A minimal keep-alive HTTP/1.1 client (one request in flight per connection).

#[derive(Debug)]
struct Response {
    status: u16,
    body: Vec<u8>,
}

#[derive(Debug)]
struct Conn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

struct Head {
    len: usize,
    status: u16,
    content_length: usize,
    close: bool,
}

impl Conn {
    fn new(addr: SocketAddr) -> Self {
        Conn {
            addr,
            stream: None,
            buf: Vec::with_capacity(4096),
        }
    }

    async fn connect(&mut self) -> Result<()> {
        if self.stream.is_none() {
            let stream = tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(self.addr))
                .await
                .map_err(|_| anyhow!("connect to {} timed out", self.addr))?
                .with_context(|| format!("connect to {}", self.addr))?;
            stream.set_nodelay(true)?;
            self.stream = Some(stream);
            self.buf.clear();
        }
        Ok(())
    }

    /// Sends `raw` and reads one response. On any error the connection is dropped
    /// and the next request reconnects.
    async fn request(&mut self, raw: &[u8]) -> Result<Response> {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(raw)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                self.stream = None;
                Err(e)
            }
            Err(_) => {
                self.stream = None;
                bail!("no response within {REQUEST_TIMEOUT:?}")
            }
        }
    }

    async fn exchange(&mut self, raw: &[u8]) -> Result<Response> {
        self.connect().await?;
        let Conn { stream, buf, .. } = self;
        let stream = stream.as_mut().ok_or_else(|| anyhow!("not connected"))?;
        stream.write_all(raw).await.context("send")?;
        loop {
            if let Some(head) = parse_head(buf)? {
                let total = head.len + head.content_length;
                while buf.len() < total {
                    read_more(stream, buf).await?;
                }
                let body = buf[head.len..total].to_vec();
                buf.drain(..total);
                if head.close {
                    self.stream = None;
                }
                return Ok(Response {
                    status: head.status,
                    body,
                });
            }
            if buf.len() > 64 * 1024 {
                bail!("response head over 64 KiB");
            }
            read_more(stream, buf).await?;
        }
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<()> {
    buf.reserve(8192);
    let n = stream.read_buf(buf).await.context("receive")?;
    if n == 0 {
        bail!("connection closed by the agent");
    }
    Ok(())
}

fn parse_head(buf: &[u8]) -> Result<Option<Head>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..end]).context("response head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| anyhow!("bad status line `{status_line}`"))?;
    let mut content_length = 0;
    let mut close = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = value
                .parse()
                .with_context(|| format!("bad content-length `{value}`"))?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            bail!("unsupported transfer-encoding `{value}` in a response");
        } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            close = true;
        }
    }
    Ok(Some(Head {
        len: end + 4,
        status,
        content_length,
        close,
    }))
}

// ---------------------------------------------------------------------------------
// Tallies and statistics

#[derive(Debug, Default)]
struct Tally {
    ok_requests: u64,
    ok_events: u64,
    statuses: BTreeMap<u16, u64>,
    errors: u64,
    first_problem: Option<String>,
    /// Send → response, µs, 200s only.
    latency_us: Vec<u32>,
    /// Scheduled send time → response, µs (paced phases; includes falling behind).
    scheduled_us: Vec<u32>,
    /// Requests sent more than 1 ms after their scheduled time.
    late_sends: u64,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.ok_requests += other.ok_requests;
        self.ok_events += other.ok_events;
        for (k, v) in other.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        self.errors += other.errors;
        if self.first_problem.is_none() {
            self.first_problem = other.first_problem;
        }
        self.latency_us.extend(other.latency_us);
        self.scheduled_us.extend(other.scheduled_us);
        self.late_sends += other.late_sends;
    }

    /// Records one outcome; returns whether it was a 200.
    fn record(&mut self, result: Result<Response>, events: u64, sent: Instant) -> bool {
        match result {
            Ok(r) if r.status == 200 => {
                self.ok_requests += 1;
                self.ok_events += events;
                self.latency_us.push(micros(sent.elapsed()));
                true
            }
            Ok(r) => {
                *self.statuses.entry(r.status).or_default() += 1;
                if self.first_problem.is_none() {
                    self.first_problem = Some(format!(
                        "HTTP {}: {}",
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    ));
                }
                false
            }
            Err(e) => {
                self.errors += 1;
                if self.first_problem.is_none() {
                    self.first_problem = Some(format!("{e:#}"));
                }
                false
            }
        }
    }

    fn failures(&self) -> u64 {
        self.errors + self.statuses.values().sum::<u64>()
    }

    fn describe_failures(&self) -> String {
        if self.failures() == 0 {
            return "none".into();
        }
        let mut s = String::new();
        for (code, n) in &self.statuses {
            let _ = write!(s, "{n}x HTTP {code}, ");
        }
        let _ = write!(s, "{} transport errors", self.errors);
        if let Some(p) = &self.first_problem {
            let _ = write!(s, "; first: {p}");
        }
        s
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

#[derive(Debug, Clone, Copy, Default)]
struct Percentiles {
    count: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Percentiles {
    fn of(samples: &mut [u32]) -> Self {
        samples.sort_unstable();
        let at = |p: f64| -> f64 {
            if samples.is_empty() {
                return f64::NAN;
            }
            let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
            f64::from(samples[rank.clamp(1, samples.len()) - 1]) / 1000.0
        };
        Percentiles {
            count: samples.len(),
            p50_ms: at(50.0),
            p99_ms: at(99.0),
            max_ms: at(100.0),
        }
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (n={})",
            self.p50_ms, self.p99_ms, self.max_ms, self.count
        )
    }
}

// ---------------------------------------------------------------------------------
// /proc readings

fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no {field} in /proc/{pid}/status"))
}

/// User + system CPU time of a process (USER_HZ = 100 on Linux).
fn cpu_time(pid: &str) -> Option<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// CPU time per thread of `pid`, by thread id, with the thread's name.
fn thread_cpu(pid: u32) -> BTreeMap<String, (String, Duration)> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let tid = task.file_name().to_string_lossy().into_owned();
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if let Some(cpu) = cpu_time(&format!("{pid}/task/{tid}")) {
            out.insert(tid, (name.trim().to_owned(), cpu));
        }
    }
    out
}

/// Per-thread CPU used between two [`thread_cpu`] readings, busiest first.
fn thread_cpu_delta(
    before: &BTreeMap<String, (String, Duration)>,
    after: &BTreeMap<String, (String, Duration)>,
    wall: Duration,
) -> String {
    let mut used: Vec<(String, Duration)> = after
        .iter()
        .map(|(tid, (name, cpu))| {
            let earlier = before.get(tid).map_or(Duration::ZERO, |(_, c)| *c);
            (format!("{name}[{tid}]"), cpu.saturating_sub(earlier))
        })
        .filter(|(_, d)| !d.is_zero())
        .collect();
    used.sort_by_key(|u| std::cmp::Reverse(u.1));
    let parts: Vec<String> = used
        .iter()
        .map(|(name, d)| {
            format!(
                "{name} {:.0}%",
                100.0 * d.as_secs_f64() / wall.as_secs_f64().max(1e-9)
            )
        })
        .collect();
    if parts.is_empty() {
        "n/a".into()
    } else {
        parts.join(", ")
    }
}

/// Machine-wide CPU ticks from /proc/stat: (busy, iowait, idle), USER_HZ units.
fn machine_ticks() -> Option<(u64, u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)? + v.get(7)?;
    Some((busy, *v.get(4)?, *v.get(3)?))
}

/// Machine-wide CPU use between two [`machine_ticks`] readings, and the share of
/// one core used by anything but `ours` (the agent and this process): other
/// processes, and kernel work not charged to a process.
fn machine_delta(
    before: Option<(u64, u64, u64)>,
    after: Option<(u64, u64, u64)>,
    ours: Option<Duration>,
) -> (String, Option<f64>) {
    let (Some(b), Some(a)) = (before, after) else {
        return ("n/a".into(), None);
    };
    let (busy, iowait, idle) = (a.0 - b.0, a.1 - b.1, a.2 - b.2);
    let total = (busy + iowait + idle).max(1) as f64;
    let mut text = format!(
        "busy {:.0}%, iowait {:.0}%, idle {:.0}% of all CPUs",
        100.0 * busy as f64 / total,
        100.0 * iowait as f64 / total,
        100.0 * idle as f64 / total
    );
    let other = ours.map(|ours| {
        let wall_ticks =
            total / std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
        ((busy as f64 - ours.as_secs_f64() * 100.0) / wall_ticks.max(1.0)).max(0.0)
    });
    if let Some(other) = other {
        let _ = write!(text, "; other processes: {:.0}% of one core", 100.0 * other);
    }
    (text, other)
}

/// CPU accounting over one phase: the agent (total and per thread), this
/// process, and the whole machine.
struct CpuWindow {
    pid: u32,
    /// Measuring this process itself: `me` is not counted twice.
    own: bool,
    start: Instant,
    agent: Option<Duration>,
    me: Option<Duration>,
    threads: BTreeMap<String, (String, Duration)>,
    machine: Option<(u64, u64, u64)>,
}

#[derive(Debug, Clone, Default)]
struct CpuReport {
    agent: String,
    loadgen: String,
    threads: String,
    machine: String,
    /// Cores' worth of CPU used by other processes meanwhile (0.5 = half a core).
    other: Option<f64>,
}

impl CpuWindow {
    fn start(pid: u32) -> Self {
        CpuWindow {
            pid,
            own: pid == std::process::id(),
            start: Instant::now(),
            agent: cpu_time(&pid.to_string()),
            me: cpu_time("self"),
            threads: thread_cpu(pid),
            machine: machine_ticks(),
        }
    }

    fn finish(self) -> CpuReport {
        let wall = self.start.elapsed();
        let agent = cpu_time(&self.pid.to_string());
        let me = cpu_time("self");
        let threads = thread_cpu_delta(&self.threads, &thread_cpu(self.pid), wall);
        let ours = match (self.agent, agent, self.me, me) {
            (Some(a0), Some(a1), _, _) if self.own => Some(a1.saturating_sub(a0)),
            (Some(a0), Some(a1), Some(m0), Some(m1)) => {
                Some(a1.saturating_sub(a0) + m1.saturating_sub(m0))
            }
            _ => None,
        };
        let (machine, other) = machine_delta(self.machine, machine_ticks(), ours);
        CpuReport {
            agent: cpu_delta(self.agent, agent, wall),
            loadgen: cpu_delta(self.me, me, wall),
            threads,
            machine,
            other,
        }
    }
}

impl CpuReport {
    fn print(&self) {
        println!("      cpu: agent {}, loadgen {}", self.agent, self.loadgen);
        println!("      agent threads: {}", self.threads);
        println!("      machine: {}", self.machine);
    }
}

fn cpu_delta(before: Option<Duration>, after: Option<Duration>, wall: Duration) -> String {
    match (before, after) {
        (Some(b), Some(a)) => {
            let used = a.saturating_sub(b);
            format!(
                "{:.1} s CPU ({:.0}% of one core)",
                used.as_secs_f64(),
                100.0 * used.as_secs_f64() / wall.as_secs_f64().max(1e-9)
            )
        }
        _ => "n/a".into(),
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Samples VmRSS of `pid` every 50 ms until stopped; yields the largest value (KiB).
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (s, p) = (Arc::clone(&stop), Arc::clone(&peak));
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            // Bounded: at most one hour of samples.
            for _ in 0..72_000 {
                tick.tick().await;
                if s.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(kib) = proc_status_kib(pid, "VmRSS") {
                    p.fetch_max(kib, Ordering::Relaxed);
                }
            }
        });
        RssSampler { stop, peak, task }
    }

    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.peak.load(Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------------------------
// The agent process

#[derive(Debug)]
struct AgentProcess {
    child: Child,
    pid: u32,
    log: PathBuf,
}

impl AgentProcess {
    fn start(binary: &Path, config: &Path, data_dir: &Path, log: &Path) -> Result<Self> {
        let log_file =
            std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let child = Command::new(binary)
            .arg("run")
            .arg("--config")
            .arg(config)
            .arg("--data-dir")
            .arg(data_dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let pid = child.id();
        Ok(AgentProcess {
            child,
            pid,
            log: log.to_owned(),
        })
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn exited(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    async fn wait_healthy(&mut self, addr: SocketAddr) -> Result<Duration> {
        let start = Instant::now();
        let get = Request::get(addr, "/health");
        while start.elapsed() < STARTUP_TIMEOUT {
            if let Some(status) = self.exited()? {
                bail!(
                    "the agent exited during startup ({status}):\n{}",
                    self.log_tail()
                );
            }
            let mut conn = Conn::new(addr);
            if let Ok(r) = conn.request(&get.bytes).await {
                if r.status == 200 {
                    return Ok(start.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!(
            "GET /health did not answer 200 within {STARTUP_TIMEOUT:?}:\n{}",
            self.log_tail()
        )
    }

    /// SIGTERM (via kill(1)), then waits for the exit.
    fn terminate(&mut self) -> Result<(ExitStatus, Duration)> {
        let start = Instant::now();
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()
            .context("run kill -TERM")?;
        if !sent.success() {
            bail!("kill -TERM {} failed: {sent}", self.pid);
        }
        while start.elapsed() < SHUTDOWN_TIMEOUT {
            if let Some(status) = self.exited()? {
                return Ok((status, start.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("the agent did not exit within {SHUTDOWN_TIMEOUT:?} of SIGTERM")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn agent_config(addr: SocketAddr, data_dir: &Path) -> String {
    format!(
        r#"# Written by loadgen.
[agent]
data_dir = "{data}"

[http]
listen = "{addr}"
max_connections = 1024

[segment]
write_keys = ["{WRITE_KEY}"]

[consent]
unknown = "grant"

[spool]
default_lane = "default"

[[spool.lanes]]
name = "default"
max_bytes = "4GiB"
when_full = "reject"
"#,
        data = data_dir.display()
    )
}

fn free_addr() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

fn agent_binary(args: &Args) -> Result<PathBuf> {
    let path = match &args.agent {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .ok_or_else(|| anyhow!("current executable has no parent dir"))?
            .join("edge-agent"),
    };
    if !path.is_file() {
        bail!(
            "{} not found: run `cargo build --release -p edge-agent -p edge-tests`, or pass --agent PATH",
            path.display()
        );
    }
    Ok(path)
}

// ---------------------------------------------------------------------------------
// Load phases

/// Closed loop on one connection: send, wait, repeat until `deadline`.
async fn closed_loop(addr: SocketAddr, mut req: Request, deadline: Instant) -> Tally {
    let mut tally = Tally::default();
    let mut ids = IdGen::new();
    let mut conn = Conn::new(addr);
    for _ in 0..MAX_REQUESTS_PER_CONN {
        if Instant::now() >= deadline {
            break;
        }
        req.renew_ids(&mut ids);
        let sent = Instant::now();
        let result = conn.request(&req.bytes).await;
        if !tally.record(result, req.events, sent) {
            // Back off a little on refusals/errors so a failing agent is not spun on.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    tally
}

#[derive(Debug)]
struct Throughput {
    tally: Tally,
    elapsed: Duration,
    peak_rss_kib: u64,
    cpu: CpuReport,
}

impl Throughput {
    fn events_per_s(&self) -> f64 {
        self.tally.ok_events as f64 / self.elapsed.as_secs_f64()
    }
    fn requests_per_s(&self) -> f64 {
        self.tally.ok_requests as f64 / self.elapsed.as_secs_f64()
    }
}

async fn throughput(addr: SocketAddr, pid: u32, args: &Args) -> Result<Throughput> {
    let requests: Vec<Request> = (0..args.connections)
        .map(|_| Request::batch(addr, args.batch))
        .collect();
    let sampler = RssSampler::start(pid);
    let cpu = CpuWindow::start(pid);
    let start = Instant::now();
    let deadline = start + args.duration;
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|req| tokio::spawn(closed_loop(addr, req, deadline)))
        .collect();
    let mut tally = Tally::default();
    for task in tasks {
        tally.merge(task.await.context("load task panicked")?);
    }
    let elapsed = start.elapsed();
    let cpu = cpu.finish();
    let peak_rss_kib = sampler.finish().await;
    Ok(Throughput {
        tally,
        elapsed,
        peak_rss_kib,
        cpu,
    })
}

/// Open loop on one connection: one request per `period` from `first`, until `end`.
/// A connection that falls behind sends the missed requests at once (burst), and the
/// delay shows in the scheduled-time latency.
async fn paced_loop(
    addr: SocketAddr,
    mut req: Request,
    first: Instant,
    period: Duration,
    end: Instant,
) -> Tally {
    let mut tally = Tally::default();
    let mut ids = IdGen::new();
    let mut conn = Conn::new(addr);
    if let Err(e) = conn.connect().await {
        tally.errors += 1;
        tally.first_problem = Some(format!("{e:#}"));
        return tally;
    }
    let mut tick = tokio::time::interval_at(first.into(), period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let max_sends = (end.saturating_duration_since(first).as_secs_f64() / period.as_secs_f64())
        .ceil() as u64
        + 1;
    for _ in 0..max_sends {
        let scheduled = tick.tick().await.into_std();
        if scheduled >= end {
            break;
        }
        req.renew_ids(&mut ids);
        let sent = Instant::now();
        if sent.saturating_duration_since(scheduled) > Duration::from_millis(1) {
            tally.late_sends += 1;
        }
        let result = conn.request(&req.bytes).await;
        if tally.record(result, req.events, sent) {
            tally.scheduled_us.push(micros(scheduled.elapsed()));
        }
    }
    tally
}

#[derive(Debug)]
struct Paced {
    label: String,
    tally: Tally,
    elapsed: Duration,
    latency: Percentiles,
    scheduled: Percentiles,
    cpu: CpuReport,
}

impl Paced {
    fn events_per_s(&self) -> f64 {
        self.tally.ok_events as f64 / self.elapsed.as_secs_f64()
    }
}

/// `rate` requests/s in total, spread evenly over `conns` connections.
async fn paced(
    label: &str,
    addr: SocketAddr,
    pid: u32,
    make: impl Fn() -> Request,
    conns: usize,
    rate: f64,
    duration: Duration,
) -> Result<Paced> {
    let period = Duration::from_secs_f64(conns as f64 / rate);
    let cpu = CpuWindow::start(pid);
    let start = Instant::now() + Duration::from_millis(200);
    let end = start + duration;
    let tasks: Vec<_> = (0..conns)
        .map(|i| {
            let offset = period.mul_f64(i as f64 / conns as f64);
            tokio::spawn(paced_loop(addr, make(), start + offset, period, end))
        })
        .collect();
    let mut tally = Tally::default();
    for task in tasks {
        tally.merge(task.await.context("load task panicked")?);
    }
    let cpu = cpu.finish();
    // Rates are over the scheduled window.
    let elapsed = duration;
    let latency = Percentiles::of(&mut tally.latency_us);
    let scheduled = Percentiles::of(&mut tally.scheduled_us);
    Ok(Paced {
        label: label.to_owned(),
        tally,
        elapsed,
        latency,
        scheduled,
        cpu,
    })
}

async fn sanity_check(addr: SocketAddr, batch: usize) -> Result<u64> {
    let mut conn = Conn::new(addr);
    let mut ids = IdGen::new();
    let mut stored = 0;
    for mut req in [Request::batch(addr, batch), Request::track(addr)] {
        req.renew_ids(&mut ids);
        let r = conn.request(&req.bytes).await?;
        let body = String::from_utf8_lossy(&r.body);
        let ok = serde_json::from_slice::<serde_json::Value>(&r.body)
            .ok()
            .and_then(|v| v.get("success").and_then(serde_json::Value::as_bool))
            == Some(true);
        if r.status != 200 || !ok {
            bail!("sanity request refused: HTTP {}: {body}", r.status);
        }
        stored += req.events;
    }
    Ok(stored)
}

async fn agent_status(addr: SocketAddr) -> Result<serde_json::Value> {
    let r = Conn::new(addr)
        .request(&Request::get(addr, "/v1/status").bytes)
        .await?;
    if r.status != 200 {
        bail!("GET /v1/status: HTTP {}", r.status);
    }
    serde_json::from_slice(&r.body).context("GET /v1/status: not JSON")
}

#[derive(Debug)]
struct AgentResults {
    startup: Duration,
    idle_rss_kib: u64,
    throughput: Throughput,
    batch: Paced,
    track: Paced,
    client_events: u64,
    agent_accepted: u64,
    stored_avg_bytes: f64,
    rss_after_kib: u64,
    hwm_kib: u64,
}

async fn agent_phases(
    agent: &mut AgentProcess,
    addr: SocketAddr,
    args: &Args,
) -> Result<AgentResults> {
    let startup = agent.wait_healthy(addr).await?;
    println!(
        "agent healthy after {:.0} ms (pid {})",
        startup.as_secs_f64() * 1000.0,
        agent.pid
    );

    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss_kib = proc_status_kib(agent.pid, "VmRSS")?;
    println!("[1/4] idle RSS: {:.2} MiB", mib(idle_rss_kib));

    let mut client_events = sanity_check(addr, args.batch).await?;

    println!(
        "[2/4] durable ingest: {} connections x /v1/batch of {} events, closed loop, {:.0} s ...",
        args.connections,
        args.batch,
        args.duration.as_secs_f64()
    );
    let mut tp = throughput(addr, agent.pid, args).await?;
    client_events += tp.tally.ok_events;
    let closed = Percentiles::of(&mut tp.tally.latency_us);
    println!(
        "      {} events/s, {} requests/s, peak RSS {:.2} MiB; latency {closed}",
        thousands(tp.events_per_s()),
        thousands(tp.requests_per_s()),
        mib(tp.peak_rss_kib)
    );
    tp.cpu.print();
    println!("      failures: {}", tp.tally.describe_failures());
    if let Some(status) = agent.exited()? {
        bail!(
            "the agent exited during the throughput phase ({status}):\n{}",
            agent.log_tail()
        );
    }

    tokio::time::sleep(Duration::from_secs(1)).await;
    let batch_rate = 10_000.0 / args.batch as f64;
    println!(
        "[3/4] ack latency: /v1/batch of {} events at {batch_rate:.0} req/s over 4 connections, {:.0} s ...",
        args.batch,
        args.latency_duration.as_secs_f64()
    );
    let batch = paced(
        "/v1/batch",
        addr,
        agent.pid,
        || Request::batch(addr, args.batch),
        4,
        batch_rate,
        args.latency_duration,
    )
    .await?;
    client_events += batch.tally.ok_events;
    print_paced(&batch);

    tokio::time::sleep(Duration::from_secs(1)).await;
    println!(
        "[4/4] ack latency: /v1/track (1 event) at 10000 req/s over {} connections, {:.0} s ...",
        args.track_connections,
        args.latency_duration.as_secs_f64()
    );
    let track = paced(
        "/v1/track",
        addr,
        agent.pid,
        || Request::track(addr),
        args.track_connections,
        10_000.0,
        args.latency_duration,
    )
    .await?;
    client_events += track.tally.ok_events;
    print_paced(&track);

    if let Some(status) = agent.exited()? {
        bail!(
            "the agent exited during the latency phases ({status}):\n{}",
            agent.log_tail()
        );
    }
    let status = agent_status(addr).await?;
    let agent_accepted = status["totals"]["accepted"].as_u64().unwrap_or(0);
    let (mut lane_events, mut lane_bytes) = (0u64, 0u64);
    if let Some(lanes) = status["lanes"].as_array() {
        for lane in lanes {
            lane_events += lane["events"].as_u64().unwrap_or(0);
            lane_bytes += lane["bytes"].as_u64().unwrap_or(0);
        }
    }
    Ok(AgentResults {
        startup,
        idle_rss_kib,
        throughput: tp,
        batch,
        track,
        client_events,
        agent_accepted,
        stored_avg_bytes: lane_bytes as f64 / lane_events.max(1) as f64,
        rss_after_kib: proc_status_kib(agent.pid, "VmRSS")?,
        hwm_kib: proc_status_kib(agent.pid, "VmHWM")?,
    })
}

fn print_paced(p: &Paced) {
    print!("      {}: ", p.label);
    println!(
        "{} events/s acked; send->ack {}",
        thousands(p.events_per_s()),
        p.latency
    );
    println!(
        "      scheduled->ack {}; {} sends >1 ms after schedule (tokio timers tick in 1 ms steps)",
        p.scheduled, p.tally.late_sends
    );
    p.cpu.print();
    println!("      failures: {}", p.tally.describe_failures());
}

// ---------------------------------------------------------------------------------
// Baseline and binary size

/// The events the agent would store, postcard-encoded: the same generator, parsed
/// by the agent's Segment parser, enriched and stamped as the intake does.
fn baseline_pool(config_text: &str) -> Result<Vec<Vec<u8>>> {
    use edge_agent::ingest::segment;
    let config = edge_agent::config::AgentConfig::parse(config_text, Path::new("loadgen.toml"))?;
    let policy = edge_agent::consent::ConsentPolicy::new(config.consent.clone());
    let device = edge_agent::model::DeviceId("3f6c2a9e-1b7d-4c8a-9e5f-0a1b2c3d4e5f".into());
    let mut enricher =
        edge_agent::enrich::Enricher::new(device, false, &config.enrich, Default::default());
    let limits = segment::Limits {
        max_event: config.segment.max_event_size.0,
        max_batch: config.segment.max_batch_size.0,
    };
    let mut ids = IdGen::new();
    let mut pool = Vec::with_capacity(BASELINE_POOL);
    let mut seq = 1_000_000;
    while pool.len() < BASELINE_POOL {
        let (body, offsets) = batch_body(100);
        let mut body = body.into_bytes();
        for at in offsets {
            ids.write(&mut body[at..at + ID_PLACEHOLDER.len()]);
        }
        let now = edge_agent::model::now_ms();
        let parsed = segment::parse("batch", &body, limits, now)?;
        for mut incoming in parsed.events {
            enricher.enrich(&mut incoming, now);
            let mut event = incoming.event;
            event.consent = policy.snapshot(None);
            event.lane = config.spool.default_lane.clone();
            event.seq = edge_agent::model::Seq(seq);
            seq += 1;
            pool.push(postcard::to_stdvec(&event)?);
        }
    }
    Ok(pool)
}

#[derive(Debug)]
struct Baseline {
    events: u64,
    elapsed: Duration,
    avg_value: f64,
}

impl Baseline {
    fn events_per_s(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
}

fn redb_baseline(dir: &Path, pool: &[Vec<u8>], duration: Duration) -> Result<Baseline> {
    const LANE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("lane:default");
    if pool.is_empty() {
        bail!("empty baseline pool");
    }
    let db = redb::Database::create(dir.join("baseline.redb")).context("create baseline.redb")?;
    let start = Instant::now();
    let mut seq: u64 = 1;
    while start.elapsed() < duration && seq <= MAX_BASELINE_EVENTS {
        let txn = db.begin_write()?;
        {
            let mut table = txn.open_table(LANE)?;
            for _ in 0..BASELINE_TXN_EVENTS {
                let value = &pool[(seq as usize) % pool.len()];
                table.insert(seq, value.as_slice())?;
                seq += 1;
            }
        }
        txn.commit()?;
    }
    let elapsed = start.elapsed();
    let avg_value = pool.iter().map(Vec::len).sum::<usize>() as f64 / pool.len() as f64;
    Ok(Baseline {
        events: seq - 1,
        elapsed,
        avg_value,
    })
}

#[derive(Debug)]
struct BinarySize {
    release: u64,
    stripped: u64,
    strip_ran: bool,
}

fn binary_size(binary: &Path, dir: &Path) -> Result<BinarySize> {
    let copy = dir.join("edge-agent.stripped");
    std::fs::copy(binary, &copy).with_context(|| format!("copy {}", binary.display()))?;
    let strip_ran = Command::new("strip")
        .arg(&copy)
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    Ok(BinarySize {
        release: std::fs::metadata(binary)?.len(),
        stripped: std::fs::metadata(&copy)?.len(),
        strip_ran,
    })
}

// ---------------------------------------------------------------------------------
// Report

fn thousands(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 {
        out.insert(0, '-');
    }
    out
}

struct Row {
    metric: String,
    measured: String,
    target: String,
    verdict: &'static str,
}

fn row(metric: &str, measured: String, target: &str, met: Option<bool>) -> Row {
    Row {
        metric: metric.to_owned(),
        measured,
        target: target.to_owned(),
        verdict: match met {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "",
        },
    }
}

fn print_table(rows: &[Row]) {
    let w0 = rows
        .iter()
        .map(|r| r.metric.len())
        .max()
        .unwrap_or(0)
        .max(6);
    let w1 = rows
        .iter()
        .map(|r| r.measured.len())
        .max()
        .unwrap_or(0)
        .max(8);
    let w2 = rows
        .iter()
        .map(|r| r.target.len())
        .max()
        .unwrap_or(0)
        .max(6);
    let line = format!(
        "+-{}-+-{}-+-{}-+------+",
        "-".repeat(w0),
        "-".repeat(w1),
        "-".repeat(w2)
    );
    println!("{line}");
    println!(
        "| {:<w0$} | {:>w1$} | {:<w2$} |      |",
        "metric", "measured", "target"
    );
    println!("{line}");
    for r in rows {
        println!(
            "| {:<w0$} | {:>w1$} | {:<w2$} | {:<4} |",
            r.metric, r.measured, r.target, r.verdict
        );
    }
    println!("{line}");
}

// ---------------------------------------------------------------------------------

fn main() -> Result<()> {
    let Some(args) = Args::parse()? else {
        print!("{USAGE}");
        return Ok(());
    };
    let binary = agent_binary(&args)?;
    let mut builder = tempfile::Builder::new();
    builder.prefix("loadgen-");
    let dir = match &args.dir {
        Some(base) => builder.tempdir_in(base),
        None => builder.tempdir(),
    }
    .context("create the temp dir")?;
    let data_dir = dir.path().join("agent-data");
    let config_path = dir.path().join("agent.toml");
    let addr = free_addr()?;
    let config_text = agent_config(addr, &data_dir);
    edge_agent::config::AgentConfig::parse(&config_text, &config_path)
        .context("the generated agent config")?;
    std::fs::write(&config_path, &config_text)
        .with_context(|| format!("write {}", config_path.display()))?;

    let (sample, _) = batch_body(args.batch);
    let sample_events = edge_agent::ingest::segment::parse(
        "batch",
        sample.as_bytes(),
        edge_agent::ingest::segment::Limits {
            max_event: 32 * 1024,
            max_batch: 500 * 1024,
        },
        0,
    )?
    .events
    .len();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    println!("loadgen: agent {}", binary.display());
    println!(
        "         listen {addr}, data {}, {cores} CPUs, {} loadgen threads",
        data_dir.display(),
        args.client_threads
    );
    println!(
        "         /v1/batch body {} bytes for {sample_events} events ({:.0} bytes/event JSON)",
        sample.len(),
        sample.len() as f64 / sample_events.max(1) as f64
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads)
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let mut agent = AgentProcess::start(
        &binary,
        &config_path,
        &data_dir,
        &dir.path().join("agent.log"),
    )?;
    let results = runtime.block_on(agent_phases(&mut agent, addr, &args))?;
    drop(runtime);

    let (exit, exit_after) = agent.terminate()?;
    println!(
        "SIGTERM: agent exited with {exit} after {:.0} ms",
        exit_after.as_secs_f64() * 1000.0
    );
    if !exit.success() {
        println!("agent log tail:\n{}", agent.log_tail());
    }
    drop(agent);

    println!(
        "redb baseline: 100 events per Immediate write transaction, {:.0} s ...",
        args.duration.as_secs_f64()
    );
    let pool = baseline_pool(&config_text)?;
    let cpu = CpuWindow::start(std::process::id());
    let baseline = redb_baseline(dir.path(), &pool, args.duration)?;
    let baseline_cpu = cpu.finish();
    println!(
        "      {} events/s ({} events in {:.2} s, {:.0} bytes/event)",
        thousands(baseline.events_per_s()),
        thousands(baseline.events as f64),
        baseline.elapsed.as_secs_f64(),
        baseline.avg_value
    );
    println!("      cpu: loadgen {}", baseline_cpu.agent);
    println!("      machine: {}", baseline_cpu.machine);
    let size = binary_size(&binary, dir.path())?;

    let r = &results;
    let rate = r.throughput.events_per_s();
    let ratio = rate / baseline.events_per_s();
    let stripped_mib = size.stripped as f64 / (1024.0 * 1024.0);
    let lat = |p: &Paced| format!("{:.2} ms", p.latency.p99_ms);
    let p50max = |p: &Paced| format!("{:.2} / {:.2} ms", p.latency.p50_ms, p.latency.max_ms);
    let clean = |p: &Paced| p.tally.failures() == 0;
    let rows = vec![
        row(
            "durable ingest (/v1/batch, 200s only)",
            format!("{} ev/s", thousands(rate)),
            ">= 200,000 ev/s",
            Some(rate >= TARGET_EVENTS_PER_S),
        ),
        row(
            "  requests/s",
            thousands(r.throughput.requests_per_s()),
            "",
            None,
        ),
        row(
            "  failed requests",
            thousands(r.throughput.tally.failures() as f64),
            "",
            None,
        ),
        row(
            "  peak RSS during load",
            format!("{:.2} MiB", mib(r.throughput.peak_rss_kib)),
            "",
            None,
        ),
        row(
            "redb baseline (100 ev/txn, Immediate)",
            format!("{} ev/s", thousands(baseline.events_per_s())),
            "",
            None,
        ),
        row(
            "agent / redb ratio",
            format!("{ratio:.3}"),
            ">= 0.5",
            Some(ratio >= TARGET_RATIO),
        ),
        row(
            "ack p99, /v1/batch 100x100 ev @100 req/s",
            lat(&r.batch),
            "<= 5 ms",
            Some(r.batch.latency.p99_ms <= TARGET_P99_MS && clean(&r.batch)),
        ),
        row("  p50 / max", p50max(&r.batch), "", None),
        row(
            "  achieved",
            format!("{} ev/s", thousands(r.batch.events_per_s())),
            "",
            None,
        ),
        row(
            "ack p99, /v1/track 1 ev @10k req/s",
            lat(&r.track),
            "<= 5 ms",
            Some(r.track.latency.p99_ms <= TARGET_P99_MS && clean(&r.track)),
        ),
        row("  p50 / max", p50max(&r.track), "", None),
        row(
            "  achieved",
            format!("{} ev/s", thousands(r.track.events_per_s())),
            "",
            None,
        ),
        row(
            "idle RSS",
            format!("{:.2} MiB", mib(r.idle_rss_kib)),
            "<= 8 MiB",
            Some(mib(r.idle_rss_kib) <= TARGET_IDLE_RSS_MIB),
        ),
        row(
            "  RSS after load / VmHWM",
            format!("{:.2} / {:.2} MiB", mib(r.rss_after_kib), mib(r.hwm_kib)),
            "",
            None,
        ),
        row(
            if size.strip_ran {
                "binary size (stripped)"
            } else {
                "binary size (strip FAILED: unstripped)"
            },
            format!("{stripped_mib:.2} MiB"),
            "<= 6 MiB",
            Some(stripped_mib <= TARGET_BINARY_MIB),
        ),
        row(
            "  release binary as built",
            format!("{:.2} MiB", size.release as f64 / (1024.0 * 1024.0)),
            "",
            None,
        ),
        row(
            "SIGTERM exit",
            format!("{exit} in {:.0} ms", exit_after.as_secs_f64() * 1000.0),
            "exit 0",
            Some(exit.success()),
        ),
        row(
            "acked events vs agent accepted",
            format!(
                "{} / {}",
                thousands(r.client_events as f64),
                thousands(r.agent_accepted as f64)
            ),
            "acked <= accepted",
            Some(r.client_events <= r.agent_accepted),
        ),
        row(
            "  stored bytes/event (agent / baseline)",
            format!("{:.0} / {:.0}", r.stored_avg_bytes, baseline.avg_value),
            "",
            None,
        ),
        row(
            "other processes' CPU: ingest/batch/track/redb",
            [
                r.throughput.cpu.other,
                r.batch.cpu.other,
                r.track.cpu.other,
                baseline_cpu.other,
            ]
            .iter()
            .map(|o| o.map_or("n/a".to_owned(), |o| format!("{:.0}%", 100.0 * o)))
            .collect::<Vec<_>>()
            .join(" / "),
            "~0% (quiet machine)",
            None,
        ),
        row(
            "  agent startup to /health",
            format!("{:.0} ms", r.startup.as_secs_f64() * 1000.0),
            "",
            None,
        ),
    ];
    println!();
    println!("SUMMARY");
    print_table(&rows);
    let busiest = [
        r.throughput.cpu.other,
        r.batch.cpu.other,
        r.track.cpu.other,
        baseline_cpu.other,
    ]
    .iter()
    .flatten()
    .fold(0.0_f64, |a, b| a.max(*b));
    if busiest > 0.15 {
        println!(
            "WARNING: other processes used up to {:.0}% of a core during the phases; \
             throughput and latency numbers are pessimistic. Rerun on a quiet machine.",
            100.0 * busiest
        );
    }
    let missed: Vec<&str> = rows
        .iter()
        .filter(|r| r.verdict == "MISS")
        .map(|r| r.metric.trim())
        .collect();
    if missed.is_empty() {
        println!("all targets met");
    } else {
        println!("targets missed: {}", missed.join("; "));
        if args.strict {
            std::process::exit(1);
        }
    }
    Ok(())
}
