//! `sitebench`: benchmark of a whole site, the release `edge-agent` streaming to the
//! release `edge-gateway` over MQTT with mutual TLS, against the site targets.
//!
//! Starts the gateway (dev PKI made on its first run) and an agent with an uplink to
//! it, both on free loopback ports in a temp dir, then measures, in order:
//!
//! 1. sustained throughput: closed loop of 100-event `/v1/batch` requests over
//!    keep-alive connections for `--duration`, while `/metrics` of the gateway is
//!    scraped every 250 ms: the steady-state rate at which the gateway commits events
//!    (`edge_gateway_events_stored_total`, after a warm-up), the agent's accept rate
//!    and its backlog at the end; then the time the agent takes to drain it;
//! 2. streaming latency at 1,000 events/s: single-event `/v1/track` requests, open
//!    loop, for `--latency-duration`; p50/p99 of agent HTTP accept → gateway inbox
//!    commit from the delta of `edge_gateway_event_latency_seconds` over the phase,
//!    interpolated within its buckets;
//! 3. a 1,000,000-event offline backlog: SIGTERM the gateway, ingest the events, check
//!    the agent's `/v1/status` says that many are queued, start the gateway, and time
//!    (50 ms polls of `/metrics`) until it has stored them all;
//! 4. bytes on the wire per event: delta of `edge_gateway_uplink_bytes_total` (uplink
//!    frame payloads as sent, LZ4) over the events each phase stored, against the
//!    Segment JSON request bodies of the same events.
//!
//! ```text
//! cargo build --release --bins && target/release/sitebench [--help]
//! ```
//!
//! What is measured is the agent → gateway path: spool, MQTT/TLS, exactly-once
//! admission and inbox commit, ack, deletion from the spool. So by default the gateway
//! has no destination: a destination is a separate reader of the inbox, not part of
//! that path, and on a small machine it competes for the same cores as both ends
//! (here the agent, the gateway and this load generator share them, where a real site
//! has the agent on the device). `--destination file` adds one NDJSON file
//! destination, as a site runs it, to see what that costs.
//!
//! Traffic goes only to 127.0.0.1. Every loop is bounded in time and in count.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use edge_tests::bench::{
    closed_loop, cpu_time, free_addr, machine_ticks, paced_loop, print_table, row, thousands,
    thread_cpu, thread_cpu_delta, Conn, Daemon, IdGen, Percentiles, Request, Row, Tally, WRITE_KEY,
};

/// The device id of the agent (its certificate's CN).
const DEVICE: &str = "bench-1";
/// Events of the offline backlog.
const BACKLOG_EVENTS: u64 = 1_000_000;
/// Gateway `/metrics` scrape period in the throughput phase.
const SCRAPE_EVERY: Duration = Duration::from_millis(250);
/// Poll period while timing the backlog drain.
const DRAIN_POLL: Duration = Duration::from_millis(50);
/// Longest wait for the agent to drain between phases.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(180);
/// Cap on the polls of any wait loop (each is bounded in time too).
const MAX_POLLS: u64 = 100_000;

/// Targets.
const TARGET_EVENTS_PER_S: f64 = 100_000.0;
const TARGET_P50_MS: f64 = 10.0;
const TARGET_P99_MS: f64 = 50.0;
const TARGET_BACKLOG_S: f64 = 10.0;
const TARGET_WIRE_RATIO: f64 = 0.20;

const USAGE: &str = "\
sitebench: benchmark agent -> gateway over MQTT/mTLS (throughput, latency, backlog, wire bytes)

USAGE: sitebench [OPTIONS]

OPTIONS:
  --bin-dir PATH          where edge-agent and edge-gateway are [default: next to this executable]
  --dir PATH              where the temp data dirs go [default: system temp dir]
  --connections N         keep-alive connections of the closed loops [8]
  --duration SECS         sustained-throughput phase [15]
  --warmup SECS           start of that phase left out of the steady-state rate [3]
  --batch N               events per /v1/batch request [100]
  --latency-rate N        events/s of the latency phase, one /v1/track each [1000]
  --latency-duration SECS latency phase [10]
  --latency-connections N connections of the latency phase [10]
  --backlog N             events of the offline backlog [1000000]
  --backlog-timeout SECS  longest wait for the gateway to store the backlog [120]
  --window N              agent uplink.window [16]
  --max-batch-events N    agent uplink.max_batch_events [2000]
  --linger MS             agent uplink linger of the default lane, ms [5]
  --destination KIND      gateway destination: none or file (one NDJSON file destination) [none]
  --compact-after SIZE    agent spool.compact_after, e.g. 1GiB [the agent's default, 64MiB]
  --client-threads N      tokio worker threads of this load generator [1]
  --keep                  keep the temp dir (configs, logs, data) and print its path
  --strict                exit 1 when a target is missed
  -h, --help              this text
";

#[derive(Debug, Clone)]
struct Args {
    bin_dir: Option<PathBuf>,
    dir: Option<PathBuf>,
    connections: usize,
    duration: Duration,
    warmup: Duration,
    batch: usize,
    latency_rate: usize,
    latency_duration: Duration,
    latency_connections: usize,
    backlog: u64,
    backlog_timeout: Duration,
    window: usize,
    max_batch_events: usize,
    linger_ms: usize,
    file_destination: bool,
    compact_after: Option<String>,
    client_threads: usize,
    keep: bool,
    strict: bool,
}

impl Args {
    fn parse() -> Result<Option<Args>> {
        let mut args = Args {
            bin_dir: None,
            dir: None,
            connections: 8,
            duration: Duration::from_secs(15),
            warmup: Duration::from_secs(3),
            batch: 100,
            latency_rate: 1000,
            latency_duration: Duration::from_secs(10),
            latency_connections: 10,
            backlog: BACKLOG_EVENTS,
            backlog_timeout: Duration::from_secs(120),
            window: 16,
            max_batch_events: 2000,
            linger_ms: 5,
            file_destination: false,
            compact_after: None,
            client_threads: 1,
            keep: false,
            strict: false,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().ok_or_else(|| anyhow!("{flag} needs a value"));
            match flag.as_str() {
                "-h" | "--help" => return Ok(None),
                "--bin-dir" => args.bin_dir = Some(PathBuf::from(value()?)),
                "--dir" => args.dir = Some(PathBuf::from(value()?)),
                "--connections" => args.connections = positive(&flag, &value()?)?,
                "--duration" => args.duration = seconds(&flag, &value()?)?,
                "--warmup" => args.warmup = seconds(&flag, &value()?)?,
                "--batch" => args.batch = positive(&flag, &value()?)?,
                "--latency-rate" => args.latency_rate = positive(&flag, &value()?)?,
                "--latency-duration" => args.latency_duration = seconds(&flag, &value()?)?,
                "--latency-connections" => {
                    args.latency_connections = positive(&flag, &value()?)?;
                }
                "--backlog" => {
                    let v = value()?;
                    args.backlog = match v.parse::<u64>() {
                        Ok(n) if (1..=10_000_000).contains(&n) => n,
                        _ => bail!("--backlog: expected an integer in 1..=10000000, got `{v}`"),
                    };
                }
                "--backlog-timeout" => args.backlog_timeout = seconds(&flag, &value()?)?,
                "--window" => args.window = positive(&flag, &value()?)?,
                "--max-batch-events" => args.max_batch_events = positive(&flag, &value()?)?,
                "--linger" => args.linger_ms = positive(&flag, &value()?)?,
                "--destination" => {
                    args.file_destination = match value()?.as_str() {
                        "file" => true,
                        "none" => false,
                        other => bail!("--destination: `file` or `none`, got `{other}`"),
                    };
                }
                "--compact-after" => args.compact_after = Some(value()?),
                "--client-threads" => args.client_threads = positive(&flag, &value()?)?,
                "--keep" => args.keep = true,
                "--strict" => args.strict = true,
                other => bail!("unknown argument `{other}`\n\n{USAGE}"),
            }
        }
        if args.batch > 1000 {
            bail!("--batch: at most 1000 events (the agent's 500 KiB batch limit)");
        }
        if args.window > 1024 {
            bail!("--window: at most 1024 (the agent's limit)");
        }
        if args.warmup >= args.duration {
            bail!("--warmup must be shorter than --duration");
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
// The site: configs, processes, readings

#[derive(Debug)]
struct Site {
    gateway_bin: PathBuf,
    dir: PathBuf,
    agent_addr: SocketAddr,
    gateway_http: SocketAddr,
    agent: Daemon,
    gateway: Option<Daemon>,
}

impl Site {
    fn gateway_paths(&self) -> (PathBuf, PathBuf, PathBuf) {
        (
            self.dir.join("gateway.toml"),
            self.dir.join("gateway-data"),
            self.dir.join("gateway.log"),
        )
    }

    /// Starts the gateway and waits for its `/health`; returns how long that took.
    async fn start_gateway(&mut self) -> Result<Duration> {
        let (config, data, log) = self.gateway_paths();
        let started = Instant::now();
        let mut gw = Daemon::start("gateway", &self.gateway_bin, &config, &data, &log)?;
        gw.wait_healthy(self.gateway_http).await?;
        self.gateway = Some(gw);
        Ok(started.elapsed())
    }

    fn gateway_pid(&self) -> Option<u32> {
        self.gateway.as_ref().map(|g| g.pid)
    }

    async fn metrics(&self) -> Result<GatewayMetrics> {
        let r = Conn::new(self.gateway_http)
            .request(&Request::get(self.gateway_http, "/metrics").bytes)
            .await?;
        if r.status != 200 {
            bail!("GET /metrics: HTTP {}", r.status);
        }
        GatewayMetrics::parse(&String::from_utf8_lossy(&r.body))
    }

    async fn status(&self) -> Result<serde_json::Value> {
        let r = Conn::new(self.agent_addr)
            .request(&Request::get(self.agent_addr, "/v1/status").bytes)
            .await?;
        if r.status != 200 {
            bail!("GET /v1/status: HTTP {}", r.status);
        }
        serde_json::from_slice(&r.body).context("GET /v1/status: not JSON")
    }

    /// Waits until the agent has nothing queued and the gateway has stored
    /// `stored_at_least` events; returns the time it took.
    async fn settle(&self, stored_at_least: u64) -> Result<Duration> {
        let start = Instant::now();
        for _ in 0..MAX_POLLS {
            let queued = queued(&self.status().await?);
            let stored = self.metrics().await?.stored;
            if queued == 0 && stored >= stored_at_least {
                return Ok(start.elapsed());
            }
            if start.elapsed() > SETTLE_TIMEOUT {
                bail!(
                    "the site did not settle within {SETTLE_TIMEOUT:?}: agent queue {queued}, gateway stored {stored} of {stored_at_least}\nagent log:\n{}",
                    self.agent.log_tail()
                );
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
        bail!("the site did not settle within {MAX_POLLS} polls")
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.agent.exited()? {
            bail!("the agent exited ({status}):\n{}", self.agent.log_tail());
        }
        if let Some(gw) = self.gateway.as_mut() {
            if let Some(status) = gw.exited()? {
                bail!("the gateway exited ({status}):\n{}", gw.log_tail());
            }
        }
        Ok(())
    }
}

fn queued(status: &serde_json::Value) -> u64 {
    status["totals"]["queued"].as_u64().unwrap_or(u64::MAX)
}

fn gateway_config(mqtt: SocketAddr, http: SocketAddr, file_destination: bool) -> String {
    let destination = if file_destination {
        "\n[[destinations]]\nname = \"events\"\nkind = \"file\"\ndir = \"out\"\nmax_file_size = \"64MiB\"\nmax_file_age = \"1m\"\n"
    } else {
        ""
    };
    format!(
        r#"# Written by sitebench.
[mqtt]
listen = "{mqtt}"
# Above what one device sends here: the benchmark measures the pipeline, not the
# per-device rate limit (default 200,000 events/s).
device_events_per_second = 10000000

[tls]
create_dev_certs = true
dev_devices = ["{DEVICE}"]

[http]
listen = "{http}"
{destination}"#
    )
}

fn agent_config(addr: SocketAddr, mqtt: SocketAddr, pki: &Path, args: &Args) -> String {
    format!(
        r#"# Written by sitebench.
[agent]
device_id = "{DEVICE}"

[http]
listen = "{addr}"
max_connections = 1024

[segment]
write_keys = ["{WRITE_KEY}"]

[consent]
unknown = "grant"

[spool]
default_lane = "default"
{compact_after}

[[spool.lanes]]
name = "default"
max_bytes = "4GiB"
when_full = "reject"

[uplink]
url = "mqtts://{mqtt}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
window = {window}
max_batch_events = {max_batch}
# Room for max_batch_events of these ~300-byte events (default 512KiB).
max_batch_bytes = "2MiB"
compression = "lz4"
# Reconnect quickly once the gateway is back (default backoff_max 30s).
backoff_min = "50ms"
backoff_max = "500ms"

[[uplink.lanes]]
name = "default"
mode = "stream"
linger = "{linger}ms"
"#,
        ca = pki.join("ca.pem").display(),
        cert = pki.join(format!("devices/{DEVICE}.pem")).display(),
        key = pki.join(format!("devices/{DEVICE}.key")).display(),
        window = args.window,
        max_batch = args.max_batch_events,
        linger = args.linger_ms,
        compact_after = args
            .compact_after
            .as_ref()
            .map_or(String::new(), |s| format!("compact_after = \"{s}\"")),
    )
}

/// What the benchmark reads from the gateway's `/metrics`.
#[derive(Debug, Clone, Default)]
struct GatewayMetrics {
    stored: u64,
    duplicates: u64,
    uplink_bytes: u64,
    batches: u64,
    inbox: u64,
    /// `edge_gateway_event_latency_seconds`: (upper bound in seconds, cumulative count).
    latency: Vec<(f64, u64)>,
}

impl GatewayMetrics {
    fn parse(text: &str) -> Result<Self> {
        let mut m = GatewayMetrics::default();
        let mut seen = 0;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let int = || -> Result<u64> {
                value
                    .parse::<u64>()
                    .with_context(|| format!("bad value in `{line}`"))
            };
            match name {
                "edge_gateway_events_stored_total" => {
                    m.stored = int()?;
                    seen += 1;
                }
                "edge_gateway_uplink_bytes_total" => {
                    m.uplink_bytes = int()?;
                    seen += 1;
                }
                "edge_gateway_events_duplicate_total" => m.duplicates = int()?,
                "edge_gateway_batches_received_total" => m.batches = int()?,
                "edge_gateway_inbox_events" => m.inbox = int()?,
                _ => {
                    if let Some(le) = name
                        .strip_prefix("edge_gateway_event_latency_seconds_bucket{le=\"")
                        .and_then(|rest| rest.strip_suffix("\"}"))
                    {
                        let bound = if le == "+Inf" {
                            f64::INFINITY
                        } else {
                            le.parse()
                                .with_context(|| format!("bad bound in `{line}`"))?
                        };
                        m.latency.push((bound, int()?));
                    }
                }
            }
        }
        if seen < 2 || m.latency.is_empty() {
            bail!("the gateway's /metrics lacks edge_gateway_events_stored_total, edge_gateway_uplink_bytes_total or edge_gateway_event_latency_seconds (an older edge-gateway binary?)");
        }
        Ok(m)
    }
}

/// A latency histogram between two scrapes: per-bucket counts (not cumulative).
#[derive(Debug)]
struct Histogram {
    /// (lower bound, upper bound, count) in milliseconds.
    buckets: Vec<(f64, f64, u64)>,
    total: u64,
}

impl Histogram {
    fn delta(before: &GatewayMetrics, after: &GatewayMetrics) -> Histogram {
        let mut buckets = Vec::new();
        let (mut lower, mut prev) = (0.0, 0u64);
        for (i, (le, cum)) in after.latency.iter().enumerate() {
            let was = before.latency.get(i).map_or(0, |b| b.1);
            let cum = cum.saturating_sub(was);
            buckets.push((lower, le * 1000.0, cum.saturating_sub(prev)));
            lower = le * 1000.0;
            prev = cum;
        }
        Histogram {
            buckets,
            total: prev,
        }
    }

    /// The `q` quantile, interpolated linearly within its bucket (as Prometheus'
    /// `histogram_quantile`), with that bucket's bounds, in ms.
    fn quantile(&self, q: f64) -> Option<(f64, f64, f64)> {
        if self.total == 0 {
            return None;
        }
        let rank = q * self.total as f64;
        let mut below = 0u64;
        for &(lower, upper, n) in &self.buckets {
            if n > 0 && (below + n) as f64 >= rank {
                if upper.is_infinite() {
                    return Some((lower, lower, upper));
                }
                let within = (rank - below as f64) / n as f64;
                return Some((lower + (upper - lower) * within, lower, upper));
            }
            below += n;
        }
        None
    }

    fn print(&self) {
        let shown: Vec<String> = self
            .buckets
            .iter()
            .filter(|b| b.2 > 0)
            .map(|(lower, upper, n)| {
                let upper = if upper.is_infinite() {
                    "+Inf".to_owned()
                } else {
                    format!("{upper}")
                };
                format!("({lower}, {upper}] ms: {n}")
            })
            .collect();
        println!("      histogram delta: {}", shown.join("; "));
    }
}

fn quantile_text(h: &Histogram, q: f64) -> (String, f64) {
    match h.quantile(q) {
        Some((v, lower, upper)) if upper.is_infinite() => (format!("> {lower:.0} ms"), v),
        Some((v, lower, upper)) => (format!("{v:.2} ms (bucket {lower}-{upper} ms)"), v),
        None => ("n/a".into(), f64::NAN),
    }
}

// ---------------------------------------------------------------------------------
// CPU of the site

/// CPU used by the agent, the gateway, this process and everything else over a phase.
#[derive(Debug)]
struct SiteCpu {
    start: Instant,
    agent: u32,
    gateway: Option<u32>,
    cpu: [Option<Duration>; 3],
    threads: [BTreeMap<String, (String, Duration)>; 2],
    machine: Option<(u64, u64, u64)>,
}

#[derive(Debug, Clone, Default)]
struct SiteCpuReport {
    line: String,
    threads: String,
    /// CPU seconds of the agent and of the gateway.
    agent_s: Option<f64>,
    gateway_s: Option<f64>,
    /// Cores' worth of CPU used by other processes (0.5 = half a core).
    other: Option<f64>,
}

impl SiteCpu {
    fn start(agent: u32, gateway: Option<u32>) -> Self {
        SiteCpu {
            start: Instant::now(),
            agent,
            gateway,
            cpu: Self::readings(agent, gateway),
            threads: [
                thread_cpu(agent),
                gateway.map(thread_cpu).unwrap_or_default(),
            ],
            machine: machine_ticks(),
        }
    }

    fn readings(agent: u32, gateway: Option<u32>) -> [Option<Duration>; 3] {
        [
            cpu_time(&agent.to_string()),
            gateway.and_then(|g| cpu_time(&g.to_string())),
            cpu_time("self"),
        ]
    }

    /// `gateway` is the gateway's pid now (it may have been started meanwhile).
    fn finish(self, gateway: Option<u32>) -> SiteCpuReport {
        let wall = self.start.elapsed().as_secs_f64().max(1e-9);
        let now = Self::readings(self.agent, gateway);
        // A gateway started during the phase used all its CPU time in it.
        let before = [
            self.cpu[0],
            if self.gateway == gateway {
                self.cpu[1]
            } else {
                Some(Duration::ZERO)
            },
            self.cpu[2],
        ];
        let used: Vec<Option<f64>> = before
            .iter()
            .zip(&now)
            .map(|(b, a)| match (b, a) {
                (Some(b), Some(a)) => Some(a.saturating_sub(*b).as_secs_f64()),
                _ => None,
            })
            .collect();
        let pct =
            |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{:.0}%", 100.0 * v / wall));
        let other = match (self.machine, machine_ticks()) {
            (Some(b), Some(a)) => {
                let busy = (a.0 - b.0) as f64 / 100.0;
                let ours: f64 = used.iter().flatten().sum();
                Some(((busy - ours) / wall).max(0.0))
            }
            _ => None,
        };
        let cores = std::thread::available_parallelism().map_or(0, usize::from);
        let line = format!(
            "cpu (% of one core): agent {}, gateway {}, sitebench {}, other processes {} ({cores} cores)",
            pct(used[0]),
            pct(used[1]),
            pct(used[2]),
            other.map_or("n/a".to_owned(), |o| format!("{:.0}%", 100.0 * o)),
        );
        let wall = self.start.elapsed();
        let gateway_threads = match gateway {
            Some(g) if self.gateway == Some(g) => {
                thread_cpu_delta(&self.threads[1], &thread_cpu(g), wall)
            }
            Some(g) => thread_cpu_delta(&BTreeMap::new(), &thread_cpu(g), wall),
            None => "n/a".into(),
        };
        let threads = format!(
            "agent threads: {}\n      gateway threads: {}",
            thread_cpu_delta(&self.threads[0], &thread_cpu(self.agent), wall),
            gateway_threads
        );
        SiteCpuReport {
            line,
            threads,
            agent_s: used[0],
            gateway_s: used[1],
            other,
        }
    }
}

impl SiteCpuReport {
    fn print(&self) {
        println!("      {}", self.line);
        println!("      {}", self.threads);
    }

    /// CPU time per event of the agent and the gateway, in microseconds.
    fn per_event(&self, events: u64) -> String {
        let us = |s: Option<f64>| {
            s.map_or("n/a".to_owned(), |s| {
                format!("{:.1} µs", s * 1e6 / events.max(1) as f64)
            })
        };
        format!("agent {}, gateway {}", us(self.agent_s), us(self.gateway_s))
    }
}

// ---------------------------------------------------------------------------------
// Phases

/// Segment JSON bytes and events of successful requests, for the wire comparison.
#[derive(Debug, Default, Clone, Copy)]
struct JsonSent {
    bytes: u64,
    events: u64,
}

#[derive(Debug, Default)]
struct Wire {
    uplink_bytes: u64,
    stored: u64,
    /// Uplink batches committed.
    batches: u64,
    json: JsonSent,
}

impl Wire {
    fn per_event(&self) -> f64 {
        self.uplink_bytes as f64 / self.stored.max(1) as f64
    }
    fn json_per_event(&self) -> f64 {
        self.json.bytes as f64 / self.json.events.max(1) as f64
    }
    fn ratio(&self) -> f64 {
        self.per_event() / self.json_per_event()
    }
    fn print(&self, label: &str) {
        println!(
            "      wire ({label}): {} uplink payload bytes for {} events stored in {} batches ({:.0} events/batch) = {:.1} B/event; Segment JSON {:.1} B/event; ratio {:.3}",
            thousands(self.uplink_bytes as f64),
            thousands(self.stored as f64),
            thousands(self.batches as f64),
            self.stored as f64 / self.batches.max(1) as f64,
            self.per_event(),
            self.json_per_event(),
            self.ratio()
        );
    }
}

/// Body bytes of a request (what follows the head).
fn body_len(req: &Request) -> u64 {
    let head = req
        .bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(0, |p| p + 4);
    (req.bytes.len() - head) as u64
}

/// One scrape of the throughput phase.
#[derive(Debug)]
struct Sample {
    /// Seconds since the phase started.
    t: f64,
    /// Gateway: events stored in the phase so far.
    stored: u64,
    /// Agent: events accepted since it started (0 when not read this time).
    accepted: u64,
    /// Agent: events queued (0 when not read this time).
    queued: u64,
    /// Gateway: events in the inbox.
    inbox: u64,
}

#[derive(Debug)]
struct Throughput {
    /// Gateway commits per second after the warm-up.
    steady_rate: f64,
    /// Over the whole phase.
    gateway_rate: f64,
    accept_rate: f64,
    backlog_end: u64,
    drain_after: Duration,
    tally_failures: u64,
    wire: Wire,
    cpu: SiteCpuReport,
}

async fn throughput(site: &mut Site, args: &Args) -> Result<Throughput> {
    let addr = site.agent_addr;
    let before = site.metrics().await?;
    let accepted_before = site.status().await?["totals"]["accepted"]
        .as_u64()
        .unwrap_or(0);
    let requests: Vec<Request> = (0..args.connections)
        .map(|_| Request::batch(addr, args.batch))
        .collect();
    let cpu = SiteCpu::start(site.agent.pid, site.gateway_pid());
    let start = Instant::now();
    let deadline = start + args.duration;
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|req| {
            let body = body_len(&req);
            (body, tokio::spawn(closed_loop(addr, req, deadline)))
        })
        .collect();
    let mut samples: Vec<Sample> = Vec::new();
    let mut next = start;
    let max_samples = (args.duration.as_secs_f64() / SCRAPE_EVERY.as_secs_f64()) as u64 + 2;
    for _ in 0..max_samples {
        next += SCRAPE_EVERY;
        if next > deadline {
            break;
        }
        tokio::time::sleep_until(next.into()).await;
        let m = site.metrics().await?;
        let t = start.elapsed().as_secs_f64();
        // The agent status is read once a second (it walks the lanes).
        let (accepted, queued) = if samples.len() % 4 == 3 {
            let s = site.status().await?;
            (s["totals"]["accepted"].as_u64().unwrap_or(0), queued(&s))
        } else {
            (0, 0)
        };
        samples.push(Sample {
            t,
            stored: m.stored - before.stored,
            accepted,
            queued,
            inbox: m.inbox,
        });
    }
    let mut tally = Tally::default();
    let mut json = JsonSent::default();
    for (body, task) in tasks {
        let t = task.await.context("load task panicked")?;
        json.bytes += t.ok_requests * body;
        json.events += t.ok_events;
        tally.merge(t);
    }
    let elapsed = start.elapsed();
    let end = site.metrics().await?;
    let status = site.status().await?;
    let cpu = cpu.finish(site.gateway_pid());
    let backlog_end = queued(&status);
    let accepted = status["totals"]["accepted"].as_u64().unwrap_or(0) - accepted_before;
    site.check_alive()?;

    let warm = args.warmup.as_secs_f64();
    let first = samples.iter().find(|s| s.t >= warm);
    let last = samples.last();
    let steady_rate = match (first, last) {
        (Some(a), Some(b)) if b.t > a.t => (b.stored - a.stored) as f64 / (b.t - a.t),
        _ => f64::NAN,
    };
    // Each second (the samples with an agent status).
    let (mut stores, mut accepts, mut queue, mut inbox) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut prev = (0.0, 0u64, accepted_before);
    for s in samples.iter().skip(3).step_by(4) {
        stores.push(thousands((s.stored - prev.1) as f64 / (s.t - prev.0)));
        accepts.push(thousands((s.accepted - prev.2) as f64 / (s.t - prev.0)));
        queue.push(thousands(s.queued as f64));
        inbox.push(thousands(s.inbox as f64));
        prev = (s.t, s.stored, s.accepted);
    }
    println!("      each second: gateway commits/s {}", stores.join(" "));
    println!("                   agent accepts/s   {}", accepts.join(" "));
    println!("                   agent queue       {}", queue.join(" "));
    if args.file_destination {
        println!(
            "                   gateway inbox     {} (events the destination has yet to write)",
            inbox.join(" ")
        );
    }
    let gateway_rate = (end.stored - before.stored) as f64 / elapsed.as_secs_f64();
    let accept_rate = tally.ok_events as f64 / elapsed.as_secs_f64();
    println!(
        "      steady state (after {warm:.0} s): {} ev/s committed by the gateway; whole phase {} ev/s",
        thousands(steady_rate),
        thousands(gateway_rate)
    );
    println!(
        "      agent: {} ev/s accepted (200s: {} requests, {} events; agent counted {}), backlog at the end {}",
        thousands(accept_rate),
        thousands(tally.ok_requests as f64),
        thousands(tally.ok_events as f64),
        thousands(accepted as f64),
        thousands(backlog_end as f64)
    );
    let closed = Percentiles::of(&mut tally.latency_us);
    println!("      HTTP ack latency under load: {closed}");
    println!("      failures: {}", tally.describe_failures());
    cpu.print();
    println!(
        "      CPU per event stored: {}",
        cpu.per_event(end.stored - before.stored)
    );

    let drain_after = site.settle(before.stored + accepted).await?;
    let after = site.metrics().await?;
    println!(
        "      backlog drained {:.2} s after the load stopped; gateway duplicates {}",
        drain_after.as_secs_f64(),
        after.duplicates - before.duplicates
    );
    let wire = Wire {
        uplink_bytes: after.uplink_bytes - before.uplink_bytes,
        stored: after.stored - before.stored,
        batches: after.batches - before.batches,
        json,
    };
    wire.print("throughput phase");
    Ok(Throughput {
        steady_rate,
        gateway_rate,
        accept_rate,
        backlog_end,
        drain_after,
        tally_failures: tally.failures(),
        wire,
        cpu,
    })
}

#[derive(Debug)]
struct Latency {
    hist: Histogram,
    achieved: f64,
    http: Percentiles,
    failures: u64,
    wire: Wire,
    cpu: SiteCpuReport,
}

async fn latency(site: &mut Site, args: &Args) -> Result<Latency> {
    let addr = site.agent_addr;
    let before = site.metrics().await?;
    let conns = args.latency_connections;
    let period = Duration::from_secs_f64(conns as f64 / args.latency_rate as f64);
    let requests: Vec<Request> = (0..conns).map(|_| Request::track(addr)).collect();
    let cpu = SiteCpu::start(site.agent.pid, site.gateway_pid());
    let start = Instant::now() + Duration::from_millis(200);
    let end = start + args.latency_duration;
    let tasks: Vec<_> = requests
        .into_iter()
        .enumerate()
        .map(|(i, req)| {
            let offset = period.mul_f64(i as f64 / conns as f64);
            let body = body_len(&req);
            (
                body,
                tokio::spawn(paced_loop(addr, req, start + offset, period, end)),
            )
        })
        .collect();
    let mut tally = Tally::default();
    let mut json = JsonSent::default();
    for (body, task) in tasks {
        let t = task.await.context("load task panicked")?;
        json.bytes += t.ok_requests * body;
        json.events += t.ok_events;
        tally.merge(t);
    }
    site.settle(before.stored + tally.ok_events).await?;
    let cpu = cpu.finish(site.gateway_pid());
    let after = site.metrics().await?;
    site.check_alive()?;
    let hist = Histogram::delta(&before, &after);
    let http = Percentiles::of(&mut tally.latency_us);
    let wire = Wire {
        uplink_bytes: after.uplink_bytes - before.uplink_bytes,
        stored: after.stored - before.stored,
        batches: after.batches - before.batches,
        json,
    };
    Ok(Latency {
        hist,
        achieved: tally.ok_events as f64 / args.latency_duration.as_secs_f64(),
        http,
        failures: tally.failures(),
        wire,
        cpu,
    })
}

#[derive(Debug)]
struct Backlog {
    ingest: Duration,
    ingest_failures: u64,
    queued: u64,
    gateway_up: Duration,
    first_commit: Option<Duration>,
    all_stored: Option<Duration>,
    agent_empty: Option<Duration>,
    stored: u64,
    wire: Wire,
    cpu: SiteCpuReport,
}

/// Closed loop on one connection taking request tickets from `budget` until none
/// are left; failed requests are retried with fresh ids (at most `max_failures`).
async fn ingest_loop(
    addr: SocketAddr,
    mut req: Request,
    budget: Arc<AtomicU64>,
    deadline: Instant,
) -> Tally {
    let mut tally = Tally::default();
    let mut ids = IdGen::new();
    let mut conn = Conn::new(addr);
    let max_failures = 1000;
    while tally.failures() < max_failures && Instant::now() < deadline {
        let ticket =
            budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if ticket.is_err() {
            break;
        }
        loop {
            req.renew_ids(&mut ids);
            let sent = Instant::now();
            let result = conn.request(&req.bytes).await;
            if tally.record(result, req.events, sent) {
                break;
            }
            if tally.failures() >= max_failures || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    tally
}

async fn backlog(site: &mut Site, args: &Args) -> Result<Backlog> {
    let addr = site.agent_addr;
    let Some(mut gw) = site.gateway.take() else {
        bail!("the gateway is not running");
    };
    let (exit, took) = gw.terminate()?;
    println!(
        "      gateway stopped (SIGTERM: {exit} after {:.0} ms)",
        took.as_secs_f64() * 1000.0
    );
    drop(gw);
    let batch = args.batch as u64;
    let requests = args.backlog.div_ceil(batch);
    let last = args.backlog - (requests - 1) * batch;
    // Full batches from every connection, then the remainder from one request.
    let budget = Arc::new(AtomicU64::new(requests - 1));
    let reqs: Vec<Request> = (0..args.connections)
        .map(|_| Request::batch(addr, args.batch))
        .collect();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(600);
    let tasks: Vec<_> = reqs
        .into_iter()
        .map(|req| {
            let body = body_len(&req);
            let budget = Arc::clone(&budget);
            (body, tokio::spawn(ingest_loop(addr, req, budget, deadline)))
        })
        .collect();
    let mut tally = Tally::default();
    let mut json = JsonSent::default();
    for (body, task) in tasks {
        let t = task.await.context("load task panicked")?;
        json.bytes += t.ok_requests * body;
        json.events += t.ok_events;
        tally.merge(t);
    }
    let tail = Request::batch(addr, last as usize);
    let tail_body = body_len(&tail);
    let t = ingest_loop(addr, tail, Arc::new(AtomicU64::new(1)), deadline).await;
    json.bytes += t.ok_requests * tail_body;
    json.events += t.ok_events;
    tally.merge(t);
    let ingest = start.elapsed();
    let status = site.status().await?;
    let queued_now = queued(&status);
    println!(
        "      ingested {} events in {:.2} s ({} ev/s); agent queue {}, uplink connected {}; failures: {}",
        thousands(tally.ok_events as f64),
        ingest.as_secs_f64(),
        thousands(tally.ok_events as f64 / ingest.as_secs_f64()),
        thousands(queued_now as f64),
        status["uplink"]["connected"],
        tally.describe_failures()
    );
    if queued_now != args.backlog {
        bail!(
            "the agent has {queued_now} events queued, expected {}",
            args.backlog
        );
    }

    // The counters start at 0 with the new gateway process.
    let cpu = SiteCpu::start(site.agent.pid, None);
    let t0 = Instant::now();
    let gateway_up = site.start_gateway().await?;
    let mut first_commit = None;
    let mut all_stored = None;
    let mut agent_empty = None;
    let mut stored = 0;
    let mut polls = 0u64;
    // Events stored in each whole second since the gateway start.
    let mut per_second: Vec<u64> = Vec::new();
    while t0.elapsed() < args.backlog_timeout && polls < MAX_POLLS {
        polls += 1;
        let m = site.metrics().await?;
        stored = m.stored;
        let second = t0.elapsed().as_secs() as usize;
        if per_second.len() <= second {
            per_second.resize(second + 1, stored);
        }
        per_second[second] = stored;
        if first_commit.is_none() && stored > 0 {
            first_commit = Some(t0.elapsed());
        }
        if all_stored.is_none() && stored >= args.backlog {
            all_stored = Some(t0.elapsed());
        }
        if all_stored.is_some() && queued(&site.status().await?) == 0 {
            agent_empty = Some(t0.elapsed());
            break;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
    let cpu = cpu.finish(site.gateway_pid());
    let after = site.metrics().await?;
    site.check_alive()?;
    let mut prev = 0;
    let rates: Vec<String> = per_second
        .iter()
        .map(|s| {
            let r = thousands((s - prev) as f64);
            prev = *s;
            r
        })
        .collect();
    println!(
        "      gateway stores per second since its start: {}",
        rates.join(" ")
    );
    let wire = Wire {
        uplink_bytes: after.uplink_bytes,
        stored: after.stored,
        batches: after.batches,
        json,
    };
    Ok(Backlog {
        ingest,
        ingest_failures: tally.failures(),
        queued: queued_now,
        gateway_up,
        first_commit,
        all_stored,
        agent_empty,
        stored,
        wire,
        cpu,
    })
}

// ---------------------------------------------------------------------------------

fn binary(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} not found: run `cargo build --release --bins`, or pass --bin-dir DIR",
            path.display()
        );
    }
    Ok(path)
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("not reached".into(), |d| {
        format!("{:.2} s", d.as_secs_f64())
    })
}

/// The summary rows and the most CPU other processes used in a phase (in cores).
async fn run(site: &mut Site, args: &Args) -> Result<(Vec<Row>, f64)> {
    let up = site.agent.wait_healthy(site.agent_addr).await?;
    println!("agent healthy after {:.0} ms", up.as_secs_f64() * 1000.0);
    // The uplink connects and says hello; a first event shows the path works.
    let mut conn = Conn::new(site.agent_addr);
    let mut ids = IdGen::new();
    let mut probe = Request::batch(site.agent_addr, 10);
    probe.renew_ids(&mut ids);
    let r = conn.request(&probe.bytes).await?;
    if r.status != 200 {
        bail!(
            "probe refused: HTTP {}: {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
    }
    let ready = site.settle(10).await?;
    println!(
        "first 10 events at the gateway after {:.0} ms",
        ready.as_secs_f64() * 1000.0
    );

    println!(
        "[1/3] sustained throughput: {} connections x /v1/batch of {} events, closed loop, {:.0} s ...",
        args.connections,
        args.batch,
        args.duration.as_secs_f64()
    );
    let tp = throughput(site, args).await?;

    tokio::time::sleep(Duration::from_secs(1)).await;
    println!(
        "[2/3] streaming latency: /v1/track (1 event) at {} req/s over {} connections, {:.0} s ...",
        args.latency_rate,
        args.latency_connections,
        args.latency_duration.as_secs_f64()
    );
    let lat = latency(site, args).await?;
    let (p50_text, p50) = quantile_text(&lat.hist, 0.50);
    let (p99_text, p99) = quantile_text(&lat.hist, 0.99);
    println!(
        "      accept -> inbox commit (gateway histogram, {} events): p50 {p50_text}, p99 {p99_text}",
        thousands(lat.hist.total as f64)
    );
    lat.hist.print();
    println!(
        "      achieved {} ev/s; HTTP ack latency {}; failures {}",
        thousands(lat.achieved),
        lat.http,
        lat.failures
    );
    lat.cpu.print();
    lat.wire.print("latency phase");

    println!(
        "[3/3] offline backlog: gateway stopped, {} events ingested, gateway started ...",
        thousands(args.backlog as f64)
    );
    let bl = backlog(site, args).await?;
    println!(
        "      gateway healthy after {:.2} s, first commit {}, all {} stored {}, agent queue empty {}",
        bl.gateway_up.as_secs_f64(),
        secs(bl.first_commit),
        thousands(bl.stored as f64),
        secs(bl.all_stored),
        secs(bl.agent_empty)
    );
    if let (Some(first), Some(all)) = (bl.first_commit, bl.all_stored) {
        println!(
            "      drain rate from the first commit: {} ev/s",
            thousands(args.backlog as f64 / (all - first).as_secs_f64().max(1e-9))
        );
    }
    bl.cpu.print();
    println!(
        "      CPU per event stored: {}",
        bl.cpu.per_event(bl.stored)
    );
    bl.wire.print("backlog");

    let busiest = [tp.cpu.other, lat.cpu.other, bl.cpu.other]
        .iter()
        .flatten()
        .fold(0.0_f64, |a, b| a.max(*b));
    let backlog_s = bl.all_stored.map_or(f64::INFINITY, |d| d.as_secs_f64());
    let wire_ok = |w: &Wire| Some(w.ratio() <= TARGET_WIRE_RATIO);
    let wire_text = |w: &Wire| {
        format!(
            "{:.1} / {:.1} B = {:.1}%",
            w.per_event(),
            w.json_per_event(),
            100.0 * w.ratio()
        )
    };
    let rows = vec![
        row(
            "sustained agent -> gateway (gateway commits)",
            format!("{} ev/s", thousands(tp.steady_rate)),
            ">= 100,000 ev/s",
            Some(tp.steady_rate >= TARGET_EVENTS_PER_S),
        ),
        row(
            "  whole phase incl. warm-up",
            format!("{} ev/s", thousands(tp.gateway_rate)),
            "",
            None,
        ),
        row(
            "  agent accept rate (HTTP 200s)",
            format!("{} ev/s", thousands(tp.accept_rate)),
            "",
            None,
        ),
        row(
            "  agent backlog at the end / drained in",
            format!(
                "{} ev / {:.2} s",
                thousands(tp.backlog_end as f64),
                tp.drain_after.as_secs_f64()
            ),
            "",
            None,
        ),
        row(
            "  failed requests",
            thousands(tp.tally_failures as f64),
            "",
            None,
        ),
        row(
            "latency p50, accept -> inbox commit @1k ev/s",
            format!("{p50:.2} ms"),
            "<= 10 ms",
            Some(p50 <= TARGET_P50_MS && lat.failures == 0),
        ),
        row(
            "latency p99, accept -> inbox commit @1k ev/s",
            format!("{p99:.2} ms"),
            "<= 50 ms",
            Some(p99 <= TARGET_P99_MS && lat.failures == 0),
        ),
        row(
            "  events timed / achieved rate",
            format!(
                "{} / {} ev/s",
                thousands(lat.hist.total as f64),
                thousands(lat.achieved)
            ),
            "",
            None,
        ),
        row(
            "1M backlog: gateway start -> all stored",
            format!("{backlog_s:.2} s"),
            "<= 10 s",
            Some(backlog_s <= TARGET_BACKLOG_S && bl.queued == args.backlog),
        ),
        row(
            "  gateway healthy / first commit",
            format!(
                "{:.2} s / {}",
                bl.gateway_up.as_secs_f64(),
                secs(bl.first_commit)
            ),
            "",
            None,
        ),
        row(
            "  agent queue empty (acks applied)",
            secs(bl.agent_empty),
            "",
            None,
        ),
        row(
            "  ingest while offline (failed requests)",
            format!(
                "{:.2} s ({})",
                bl.ingest.as_secs_f64(),
                thousands(bl.ingest_failures as f64)
            ),
            "",
            None,
        ),
        row(
            "wire bytes/event vs Segment JSON, throughput",
            wire_text(&tp.wire),
            "<= 20%",
            wire_ok(&tp.wire),
        ),
        row(
            "  same, streaming @1k ev/s (small batches)",
            wire_text(&lat.wire),
            "<= 20%",
            wire_ok(&lat.wire),
        ),
        row(
            "  same, backlog drain (full batches)",
            wire_text(&bl.wire),
            "<= 20%",
            wire_ok(&bl.wire),
        ),
        row(
            "other processes' CPU (max of phases)",
            format!("{:.0}% of a core", 100.0 * busiest),
            "~0% (quiet machine)",
            None,
        ),
    ];
    Ok((rows, busiest))
}

fn main() -> Result<()> {
    let Some(args) = Args::parse()? else {
        print!("{USAGE}");
        return Ok(());
    };
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .ok_or_else(|| anyhow!("current executable has no parent dir"))?
            .to_owned(),
    };
    let agent_bin = binary(&bin_dir, "edge-agent")?;
    let gateway_bin = binary(&bin_dir, "edge-gateway")?;
    let mut builder = tempfile::Builder::new();
    builder.prefix("sitebench-");
    let tmp = match &args.dir {
        Some(base) => builder.tempdir_in(base),
        None => builder.tempdir(),
    }
    .context("create the temp dir")?;
    // Dropping `_cleanup` removes the dir (also on errors), unless --keep.
    let (dir, _cleanup) = if args.keep {
        (tmp.keep(), None)
    } else {
        (tmp.path().to_owned(), Some(tmp))
    };
    let (mqtt, gateway_http, agent_addr) = (free_addr()?, free_addr()?, free_addr()?);
    let gw_text = gateway_config(mqtt, gateway_http, args.file_destination);
    std::fs::write(dir.join("gateway.toml"), &gw_text).context("write gateway.toml")?;
    let pki = dir.join("gateway-data").join("pki");
    let agent_text = agent_config(agent_addr, mqtt, &pki, &args);
    edge_agent::config::AgentConfig::parse(&agent_text, &dir.join("agent.toml"))
        .context("the generated agent config")?;
    std::fs::write(dir.join("agent.toml"), &agent_text).context("write agent.toml")?;

    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    println!(
        "sitebench: agent {}, gateway {}",
        agent_bin.display(),
        gateway_bin.display()
    );
    println!(
        "           agent http {agent_addr}; gateway mqtts {mqtt}, http {gateway_http}; data {}",
        dir.display()
    );
    println!(
        "           uplink: stream, linger {} ms, window {}, max_batch_events {}, lz4; gateway destination: {}; {cores} CPUs, {} sitebench threads",
        args.linger_ms,
        args.window,
        args.max_batch_events,
        if args.file_destination { "one NDJSON file destination" } else { "none" },
        args.client_threads
    );
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        println!("           load average before: {}", load.trim());
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads)
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    // The gateway makes the PKI the agent's config names: it starts first.
    let gateway = runtime.block_on(async {
        let started = Instant::now();
        let mut gw = Daemon::start(
            "gateway",
            &gateway_bin,
            &dir.join("gateway.toml"),
            &dir.join("gateway-data"),
            &dir.join("gateway.log"),
        )?;
        gw.wait_healthy(gateway_http).await?;
        println!(
            "gateway healthy after {:.0} ms",
            started.elapsed().as_secs_f64() * 1000.0
        );
        anyhow::Ok(gw)
    })?;
    let mut site = Site {
        gateway_bin,
        dir: dir.clone(),
        agent_addr,
        gateway_http,
        agent: Daemon::start(
            "agent",
            &agent_bin,
            &dir.join("agent.toml"),
            &dir.join("agent-data"),
            &dir.join("agent.log"),
        )?,
        gateway: Some(gateway),
    };
    let rows = runtime.block_on(run(&mut site, &args));
    drop(runtime);
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => {
            println!("agent log tail:\n{}", site.agent.log_tail());
            if let Some(gw) = &site.gateway {
                println!("gateway log tail:\n{}", gw.log_tail());
            }
            return Err(e);
        }
    };
    let (agent_exit, agent_took) = site.agent.terminate()?;
    let gateway_exit = match site.gateway.as_mut() {
        Some(gw) => Some(gw.terminate()?),
        None => None,
    };
    println!(
        "SIGTERM: agent {agent_exit} after {:.0} ms, gateway {}",
        agent_took.as_secs_f64() * 1000.0,
        gateway_exit.map_or("not running".into(), |(s, d)| format!(
            "{s} after {:.0} ms",
            d.as_secs_f64() * 1000.0
        ))
    );
    println!();
    println!("SUMMARY");
    print_table(&rows.0);
    if rows.1 > 0.15 {
        println!(
            "WARNING: other processes used up to {:.0}% of a core during the phases; \
             throughput, latency and drain numbers are pessimistic. Rerun on a quiet machine.",
            100.0 * rows.1
        );
    }
    if args.keep {
        println!("kept {}", dir.display());
    }
    let missed: Vec<&str> = rows
        .0
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
