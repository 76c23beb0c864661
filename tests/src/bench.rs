//! Shared parts of the load generators (`loadgen`, `sitebench`): realistic Segment
//! payloads with fresh message ids, a minimal keep-alive HTTP/1.1 client, closed- and
//! open-loop request loops, tallies and percentiles, CPU/RSS readings from `/proc`,
//! the daemon processes, and the summary table.
//!
//! Traffic goes only to the address given (the benchmarks use 127.0.0.1). Every loop
//! is bounded in time and in count.

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

/// Segment write key the generated agent configs accept and requests carry.
pub const WRITE_KEY: &str = "bench-key";
/// Longest wait for one response; a slower one counts as an error.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for `/health` after starting a daemon.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for a daemon to exit after SIGTERM (the agent's drain timeout is 10 s).
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);
/// Cap on requests per connection in a closed loop.
pub const MAX_REQUESTS_PER_CONN: u64 = 1_000_000;
/// Placeholder overwritten with a fresh UUID before every send.
pub const ID_PLACEHOLDER: &str = "00000000-0000-4000-8000-000000000000";

// ---------------------------------------------------------------------------------
// Payloads

/// Fresh UUIDv4-shaped message ids: a random 60-bit prefix per generator plus a
/// counter, so ids are unique without a random draw per event.
#[derive(Debug)]
pub struct IdGen {
    hi: u64,
    next: u64,
}

impl Default for IdGen {
    fn default() -> Self {
        Self::new()
    }
}

impl IdGen {
    pub fn new() -> Self {
        IdGen {
            hi: rand::random::<u64>(),
            next: 0,
        }
    }

    pub fn write(&mut self, out: &mut [u8]) {
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
pub fn event_json(rng: &mut impl Rng, timestamp: &str) -> (String, usize) {
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
pub fn batch_body(n: usize) -> (String, Vec<usize>) {
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

pub fn now_timestamp() -> String {
    edge_agent::ingest::format_timestamp(edge_agent::model::now_ms())
}

/// A complete HTTP request (head and body) with the offsets of its message ids,
/// renewed before every send.
#[derive(Debug, Clone)]
pub struct Request {
    pub bytes: Vec<u8>,
    pub ids: Vec<usize>,
    pub events: u64,
}

impl Request {
    pub fn new(addr: SocketAddr, path: &str, body: &str, body_ids: &[usize], events: u64) -> Self {
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
    pub fn batch(addr: SocketAddr, n: usize) -> Self {
        let (body, ids) = batch_body(n);
        Request::new(addr, "/v1/batch", &body, &ids, n as u64)
    }

    /// `POST /v1/track` with one event.
    pub fn track(addr: SocketAddr) -> Self {
        let (event, at) = event_json(&mut rand::rng(), &now_timestamp());
        Request::new(addr, "/v1/track", &event, &[at], 1)
    }

    pub fn get(addr: SocketAddr, path: &str) -> Self {
        let head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        Request {
            bytes: head.into_bytes(),
            ids: Vec::new(),
            events: 0,
        }
    }

    pub fn renew_ids(&mut self, gen: &mut IdGen) {
        for &at in &self.ids {
            gen.write(&mut self.bytes[at..at + ID_PLACEHOLDER.len()]);
        }
    }
}

// ---------------------------------------------------------------------------------
// A minimal keep-alive HTTP/1.1 client (one request in flight per connection).

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

#[derive(Debug)]
pub struct Conn {
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
    pub fn new(addr: SocketAddr) -> Self {
        Conn {
            addr,
            stream: None,
            buf: Vec::with_capacity(4096),
        }
    }

    pub async fn connect(&mut self) -> Result<()> {
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
    pub async fn request(&mut self, raw: &[u8]) -> Result<Response> {
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

    pub async fn exchange(&mut self, raw: &[u8]) -> Result<Response> {
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
pub struct Tally {
    pub ok_requests: u64,
    pub ok_events: u64,
    pub statuses: BTreeMap<u16, u64>,
    pub errors: u64,
    pub first_problem: Option<String>,
    /// Send → response, µs, 200s only.
    pub latency_us: Vec<u32>,
    /// Scheduled send time → response, µs (paced phases; includes falling behind).
    pub scheduled_us: Vec<u32>,
    /// Requests sent more than 1 ms after their scheduled time.
    pub late_sends: u64,
}

impl Tally {
    pub fn merge(&mut self, other: Tally) {
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
    pub fn record(&mut self, result: Result<Response>, events: u64, sent: Instant) -> bool {
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

    pub fn failures(&self) -> u64 {
        self.errors + self.statuses.values().sum::<u64>()
    }

    pub fn describe_failures(&self) -> String {
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

pub fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Percentiles {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(samples: &mut [u32]) -> Self {
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

pub fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no {field} in /proc/{pid}/status"))
}

/// User + system CPU time of a process (USER_HZ = 100 on Linux).
pub fn cpu_time(pid: &str) -> Option<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// CPU time per thread of `pid`, by thread id, with the thread's name.
pub fn thread_cpu(pid: u32) -> BTreeMap<String, (String, Duration)> {
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
pub fn thread_cpu_delta(
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
pub fn machine_ticks() -> Option<(u64, u64, u64)> {
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
pub fn machine_delta(
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
#[derive(Debug)]
pub struct CpuWindow {
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
pub struct CpuReport {
    pub agent: String,
    pub loadgen: String,
    pub threads: String,
    pub machine: String,
    /// Cores' worth of CPU used by other processes meanwhile (0.5 = half a core).
    pub other: Option<f64>,
}

impl CpuWindow {
    pub fn start(pid: u32) -> Self {
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

    pub fn finish(self) -> CpuReport {
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
    pub fn print(&self) {
        println!("      cpu: agent {}, loadgen {}", self.agent, self.loadgen);
        println!("      agent threads: {}", self.threads);
        println!("      machine: {}", self.machine);
    }
}

pub fn cpu_delta(before: Option<Duration>, after: Option<Duration>, wall: Duration) -> String {
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

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Samples VmRSS of `pid` every 50 ms until stopped; yields the largest value (KiB).
#[derive(Debug)]
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    pub fn start(pid: u32) -> Self {
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

    pub async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.peak.load(Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------------------------
// Daemon processes (edge-agent, edge-gateway)

/// A running `edge-agent` or `edge-gateway` (`run --config .. --data-dir ..`), its
/// stdout and stderr in `log`. Killed when dropped.
#[derive(Debug)]
pub struct Daemon {
    /// For messages: "agent", "gateway".
    pub name: &'static str,
    pub child: Child,
    pub pid: u32,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `binary run`; its log goes to `log`, appended (a restart keeps the
    /// earlier run's lines).
    pub fn start(
        name: &'static str,
        binary: &Path,
        config: &Path,
        data_dir: &Path,
        log: &Path,
    ) -> Result<Self> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open {}", log.display()))?;
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
        Ok(Daemon {
            name,
            child,
            pid,
            log: log.to_owned(),
        })
    }

    /// The last 20 lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Polls `GET /health` on `addr` every 20 ms until it answers 200.
    pub async fn wait_healthy(&mut self, addr: SocketAddr) -> Result<Duration> {
        let start = Instant::now();
        let get = Request::get(addr, "/health");
        while start.elapsed() < STARTUP_TIMEOUT {
            if let Some(status) = self.exited()? {
                bail!(
                    "the {} exited during startup ({status}):\n{}",
                    self.name,
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
    pub fn terminate(&mut self) -> Result<(ExitStatus, Duration)> {
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
        bail!(
            "the {} did not exit within {SHUTDOWN_TIMEOUT:?} of SIGTERM",
            self.name
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A free port on 127.0.0.1 (bound, then released).
pub fn free_addr() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

// ---------------------------------------------------------------------------------
// Load phases

/// Closed loop on one connection: send, wait, repeat until `deadline`.
pub async fn closed_loop(addr: SocketAddr, mut req: Request, deadline: Instant) -> Tally {
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

/// Open loop on one connection: one request per `period` from `first`, until `end`.
/// A connection that falls behind sends the missed requests at once (burst), and the
/// delay shows in the scheduled-time latency.
pub async fn paced_loop(
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

// ---------------------------------------------------------------------------------
// Report

pub fn thousands(v: f64) -> String {
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

#[derive(Debug)]
pub struct Row {
    pub metric: String,
    pub measured: String,
    pub target: String,
    pub verdict: &'static str,
}

pub fn row(metric: &str, measured: String, target: &str, met: Option<bool>) -> Row {
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

pub fn print_table(rows: &[Row]) {
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
