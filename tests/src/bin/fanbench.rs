//! `fanbench`: benchmark of the release `edge-gateway` fanning device events out to two
//! destinations, with identity resolution and enrichment on the way, against the
//! gateway targets: at least 100,000 events/s delivered; with 1,000,000 existing
//! profiles at least 70 % of that; gateway RSS at most 512 MiB.
//!
//! ```text
//! cargo build --release --bins && target/release/fanbench [--help]
//! ```
//!
//! The site: the gateway (dev PKI made on its first run) with identity resolution
//! (default `[identity]`: customer id and email unique; customer id, anonymous id and
//! email linked), two computed attributes, and two destinations, both requiring the
//! `analytics` purpose and each attaching identities and profile attributes from its
//! allowlist:
//!
//! - `files`: NDJSON files in the gateway's data dir;
//! - `hook`: a webhook, format `batch` (`{"batch":[...]}`, 500 events a request,
//!   4 requests in flight) to an HTTP/1.1 server inside this process that parses each
//!   body (serde, every event skipped over as JSON) to count its events, and answers
//!   200.
//!
//! The gateway is fed by [`edge_tests::wireload`], a load generator speaking the wire
//! protocol itself (MQTT over mutual TLS with dev device certificates, LZ4 uplink
//! frames of 1,000 events, a window of 8 unacknowledged frames per connection, 2
//! connections), not by agents: on a small machine agents would take the CPU the
//! gateway is being measured with. Events are Segment-like tracks (four shapes, five
//! or six properties, a full context) and one identify in 20, each for a user drawn
//! uniformly from the measurement's users, granting `analytics`.
//!
//! Each profile count given (`--profiles`, default `0,1000000`) is one phase with a
//! fresh gateway and data dir. A measurement is `--warmup` then `--duration` seconds
//! of events, while `GET /v1/destinations`, the webhook server's count and `/metrics`
//! are read every 250 ms; the steady-state rate of each destination is its delivered
//! count's increase from the first reading after the warm-up to the last, over that
//! time, and the measurement's rate is the slower destination's.
//!
//! - P = 0: one measurement, events over `--users` users (default 10,000), whose
//!   profiles are made as their first events arrive. Its rate is the baseline.
//! - P > 0:
//!   1. the seed: one identify event for each of users 0..P (customer id, anonymous
//!      id, email), timed until both destinations have delivered all P;
//!      `edge_gateway_profiles` is read afterwards;
//!   2. measurement A, the one held to the targets: events over N = min(`--active`, P)
//!      users (default 10,000, the 0-profile phase's traffic): users 0, s, 2s, ...,
//!      (N - 1)s with s = P / N rounded down, so each is an existing profile and they
//!      are spread over the store (all of it when N divides P) rather than being the
//!      first ones seeded. With `--active` = `--users` the store is the only
//!      difference from the 0-profile phase;
//!   3. unless N = P, once the destinations have delivered A's backlog, measurement B
//!      on the same gateway, not seeded again: events over all P users, each event for
//!      a random, mostly cold profile. The worst case, reported with its ratio to the
//!      baseline and held to no target.
//!
//! The offered load is a closed loop over the whole pipeline: the generator may be at
//! most `--pipeline-window` events ahead of what the slower destination has delivered,
//! so the gateway always has work queued (the inbox backlog is bounded, not growing
//! without end as it would under an open loop, which measures only the receive path
//! and lets it take the CPU from delivery). Alongside: the rate of inbox commits and of
//! acks, the gateway's CPU over the measured seconds (per thread too), its peak RSS
//! (`VmHWM`, since the gateway started: the seed and A included in B's; the RSS
//! target is checked on the phase's last), and the CPU of this process (generator and
//! webhook server) and of everything else on the machine. `--strict` fails only on
//! targets: B's rows are information.
//!
//! Reading the output for the bottleneck: a destination's `backlog` counts resolved
//! events it has not delivered, while `edge_gateway_inbox_events` counts events not
//! yet done by every consumer, the profile stage included. A backlog near the pipeline
//! window points at that destination; an inbox near the window with empty destination
//! backlogs points at identity resolution.
//!
//! Traffic goes only to 127.0.0.1. Every loop is bounded in time and in count.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use edge_tests::bench::{
    cpu_time, free_addr, machine_ticks, mib, print_table, proc_status_kib, row, thousands,
    thread_cpu, thread_cpu_delta, Conn, Daemon, Request, Row,
};
use edge_tests::wireload::{self, Control, Counters, DeviceConfig, Plan};
use serde::de::IgnoredAny;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Targets.
const TARGET_EVENTS_PER_S: f64 = 100_000.0;
const TARGET_PROFILES_RATIO: f64 = 0.70;
const TARGET_RSS_MIB: f64 = 512.0;

/// Destination names in the generated config.
const FILE_DEST: &str = "files";
const HOOK_DEST: &str = "hook";
/// Reading period during seeding and measuring.
const SCRAPE_EVERY: Duration = Duration::from_millis(250);
/// `/metrics` is read every this many readings (the profile count is not free).
const METRICS_EVERY: u64 = 4;
/// Longest wait for the devices to finish after they are told to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(90);
/// Cap on readings of any loop (each is bounded in time too).
const MAX_READINGS: u64 = 1_000_000;
/// Most connections the webhook server serves at once.
const SINK_MAX_CONNECTIONS: usize = 64;
/// Largest request head and body the webhook server reads.
const SINK_MAX_HEAD: usize = 64 << 10;
const SINK_MAX_BODY: usize = 64 << 20;

const USAGE: &str = "\
fanbench: benchmark the gateway's fan-out (identity, enrichment, file + webhook destinations)

USAGE: fanbench [OPTIONS]

OPTIONS:
  --bin-dir PATH            where edge-gateway is [default: next to this executable]
  --dir PATH                where the temp data dirs go [default: system temp dir]
  --profiles LIST           phases: existing profiles, comma-separated [0,1000000]
  --users N                 users of a 0-profile phase's events, whose profiles are made
                            as their first events arrive [10000]
  --active N                a phase with P profiles seeds users 0..P, then measures (A,
                            held to the targets) events over min(N, P) of them, every
                            (P / min(N, P))-th; then, unless N >= P, on the same gateway
                            (B, worst case, no target) events over all P (cold profiles)
                            [10000]
  --duration SECS           measured seconds of each measurement, after the warm-up [20]
  --warmup SECS             seconds of load before each measurement [5]
  --destinations KIND       both, file, webhook, or none (inbox commits only) [both]
  --connections N           device connections of the load generator [2]
  --window N                uplink frames in flight per connection [8]
  --batch N                 events per uplink frame [1000]
  --identify-every N        one event in N is an identify, the rest tracks [20]
  --pipeline-window N       most events sent ahead of the slower destination, 0 = no limit [200000]
  --webhook-batch N         webhook batch_size [500]
  --webhook-concurrency N   webhook requests in flight [4]
  --seed-timeout SECS       longest wait for a seed to be delivered [900]
  --client-threads N        tokio worker threads of this process [1]
  --keep                    keep the temp dir (configs, logs, data) and print its path
  --strict                  exit 1 when a target is missed
  -h, --help                this text
";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dests {
    Both,
    File,
    Webhook,
    None,
}

impl Dests {
    fn file(self) -> bool {
        matches!(self, Dests::Both | Dests::File)
    }
    fn hook(self) -> bool {
        matches!(self, Dests::Both | Dests::Webhook)
    }
    fn describe(self) -> &'static str {
        match self {
            Dests::Both => "NDJSON files + webhook (batch)",
            Dests::File => "NDJSON files only",
            Dests::Webhook => "webhook (batch) only",
            Dests::None => "none: inbox commits measured",
        }
    }
}

#[derive(Debug, Clone)]
struct Args {
    bin_dir: Option<PathBuf>,
    dir: Option<PathBuf>,
    profiles: Vec<u64>,
    users: u64,
    active: u64,
    duration: Duration,
    warmup: Duration,
    dests: Dests,
    connections: usize,
    window: usize,
    batch: usize,
    identify_every: usize,
    pipeline_window: u64,
    webhook_batch: usize,
    webhook_concurrency: usize,
    seed_timeout: Duration,
    client_threads: usize,
    keep: bool,
    strict: bool,
}

impl Args {
    fn parse() -> Result<Option<Args>> {
        let mut args = Args {
            bin_dir: None,
            dir: None,
            profiles: vec![0, 1_000_000],
            users: 10_000,
            active: 10_000,
            duration: Duration::from_secs(20),
            warmup: Duration::from_secs(5),
            dests: Dests::Both,
            connections: 2,
            window: 8,
            batch: 1000,
            identify_every: 20,
            pipeline_window: 200_000,
            webhook_batch: 500,
            webhook_concurrency: 4,
            seed_timeout: Duration::from_secs(900),
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
                "--profiles" => {
                    let v = value()?;
                    args.profiles = v
                        .split(',')
                        .map(|p| count(&flag, p.trim(), 0, 100_000_000))
                        .collect::<Result<_>>()?;
                }
                "--users" => args.users = count(&flag, &value()?, 1, 100_000_000)?,
                "--active" => args.active = count(&flag, &value()?, 1, 100_000_000)?,
                "--duration" => args.duration = seconds(&flag, &value()?)?,
                "--warmup" => args.warmup = seconds(&flag, &value()?)?,
                "--destinations" => {
                    args.dests = match value()?.as_str() {
                        "both" => Dests::Both,
                        "file" => Dests::File,
                        "webhook" => Dests::Webhook,
                        "none" => Dests::None,
                        other => {
                            bail!("--destinations: both, file, webhook or none, got `{other}`")
                        }
                    };
                }
                "--connections" => args.connections = small(&flag, &value()?, 64)?,
                "--window" => args.window = small(&flag, &value()?, 1024)?,
                "--batch" => args.batch = small(&flag, &value()?, 10_000)?,
                "--identify-every" => args.identify_every = small(&flag, &value()?, 100_000)?,
                "--pipeline-window" => {
                    args.pipeline_window = count(&flag, &value()?, 0, 100_000_000)?;
                }
                "--webhook-batch" => args.webhook_batch = small(&flag, &value()?, 10_000)?,
                "--webhook-concurrency" => {
                    args.webhook_concurrency = small(&flag, &value()?, 64)?;
                }
                "--seed-timeout" => args.seed_timeout = seconds(&flag, &value()?)?,
                "--client-threads" => args.client_threads = small(&flag, &value()?, 64)?,
                "--keep" => args.keep = true,
                "--strict" => args.strict = true,
                other => bail!("unknown argument `{other}`\n\n{USAGE}"),
            }
        }
        if args.profiles.is_empty() {
            bail!("--profiles: give at least one count");
        }
        if args.pipeline_window > 0 && args.pipeline_window < (args.batch * args.connections) as u64
        {
            bail!("--pipeline-window must hold at least one frame per connection (--batch x --connections)");
        }
        Ok(Some(args))
    }

    /// The measurements of a phase with `profiles` seeded profiles, in order.
    fn traffic(&self, profiles: u64) -> Vec<Traffic> {
        if profiles == 0 {
            return vec![Traffic::New { users: self.users }];
        }
        let active = self.active.min(profiles);
        // The seed made users 0..profiles; with this stride the largest user drawn is
        // (active - 1) * stride < profiles.
        let mut runs = vec![Traffic::Active {
            users: active,
            stride: profiles / active,
        }];
        if active < profiles {
            runs.push(Traffic::Cold { users: profiles });
        }
        runs
    }
}

/// Which users the events of one measurement are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Traffic {
    /// Nothing seeded: `users` users, made as their first events arrive (P = 0).
    New { users: u64 },
    /// `users` seeded users, every `stride`-th: held to the targets (A).
    Active { users: u64, stride: u64 },
    /// Every seeded user, each event for a random one: the worst case, no target (B).
    Cold { users: u64 },
}

impl Traffic {
    /// Distinct users of the events.
    fn users(self) -> u64 {
        match self {
            Traffic::New { users } | Traffic::Active { users, .. } | Traffic::Cold { users } => {
                users
            }
        }
    }

    fn plan(self, identify_every: usize) -> Plan {
        // Seeded users are `wireload` users 0..P, identified by `Plan::Seed` with the
        // same customer id, anonymous id and email as a mix gives them: every user of
        // `Active` and `Cold` is an existing profile.
        let stride = match self {
            Traffic::Active { stride, .. } => stride,
            Traffic::New { .. } | Traffic::Cold { .. } => 1,
        };
        Plan::Mix {
            users: self.users(),
            stride,
            identify_every,
        }
    }

    /// Whether the targets apply.
    fn targeted(self) -> bool {
        !matches!(self, Traffic::Cold { .. })
    }

    /// The summary's name of the measurement, after what is measured.
    fn label(self, profiles: u64) -> String {
        let profiles = thousands(profiles as f64);
        match self {
            Traffic::New { users } => {
                format!("{profiles} profiles, {} users", thousands(users as f64))
            }
            Traffic::Active { users, .. } => {
                format!(
                    "{profiles} profiles, {} active users",
                    thousands(users as f64)
                )
            }
            Traffic::Cold { users } => format!(
                "{profiles} profiles, events over all {} users (cold profiles)",
                thousands(users as f64)
            ),
        }
    }

    /// Who the users are, for the output.
    fn describe(self) -> String {
        match self {
            Traffic::New { users } => format!(
                "{} users (profiles made by their first events)",
                thousands(users as f64)
            ),
            Traffic::Active { users, stride: 1 } => {
                format!("{} seeded users, consecutive", thousands(users as f64))
            }
            Traffic::Active { users, stride } => format!(
                "{} seeded users, one in {}",
                thousands(users as f64),
                thousands(stride as f64)
            ),
            Traffic::Cold { users } => format!(
                "all {} seeded users (cold profiles)",
                thousands(users as f64)
            ),
        }
    }
}

fn count(flag: &str, v: &str, min: u64, max: u64) -> Result<u64> {
    match v.replace('_', "").parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => bail!("{flag}: expected an integer in {min}..={max}, got `{v}`"),
    }
}

fn small(flag: &str, v: &str, max: u64) -> Result<usize> {
    Ok(count(flag, v, 1, max)? as usize)
}

fn seconds(flag: &str, v: &str) -> Result<Duration> {
    match v.parse::<f64>() {
        Ok(s) if s > 0.0 && s <= 3600.0 => Ok(Duration::from_secs_f64(s)),
        _ => bail!("{flag}: expected seconds in (0, 3600], got `{v}`"),
    }
}

// ---------------------------------------------------------------------------------
// The webhook's receiving end

/// What the webhook server has received.
#[derive(Debug, Default)]
struct SinkStats {
    requests: AtomicU64,
    events: AtomicU64,
    body_bytes: AtomicU64,
    /// Requests answered 400 (unparseable) and the first reason.
    refused: AtomicU64,
    first_problem: Mutex<Option<String>>,
    /// The first event received, for the report (to show what enrichment attached).
    sample: Mutex<Option<String>>,
}

impl SinkStats {
    fn problem(&self, p: String) {
        let mut slot = self
            .first_problem
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        slot.get_or_insert(p);
    }
}

/// The webhook body: only the batch's length matters; each event is still read as
/// JSON (and skipped), so a malformed body is refused.
#[derive(serde::Deserialize)]
struct BatchBody {
    batch: Vec<IgnoredAny>,
}

#[derive(serde::Deserialize)]
struct FirstEvent<'a> {
    #[serde(borrow)]
    batch: Vec<&'a serde_json::value::RawValue>,
}

/// Serves HTTP/1.1 on `listener` until the runtime ends.
async fn serve_sink(listener: TcpListener, stats: Arc<SinkStats>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(SINK_MAX_CONNECTIONS));
    for _ in 0..MAX_READINGS {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            stats.problem("more webhook connections than the server serves".into());
            continue;
        };
        let stats = Arc::clone(&stats);
        tokio::spawn(async move {
            if let Err(e) = sink_conn(stream, &stats).await {
                stats.problem(format!("webhook connection: {e:#}"));
            }
            drop(permit);
        });
    }
}

#[derive(Debug)]
struct RequestHead {
    len: usize,
    content_length: Option<usize>,
    chunked: bool,
    expect_continue: bool,
    close: bool,
}

fn parse_request_head(buf: &[u8]) -> Result<Option<RequestHead>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..end]).context("request head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or_default();
    if !first.starts_with("POST ") {
        bail!("unexpected request line `{first}`");
    }
    let mut head = RequestHead {
        len: end + 4,
        content_length: None,
        chunked: false,
        expect_continue: false,
        close: false,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            head.content_length = Some(
                value
                    .parse()
                    .with_context(|| format!("content-length `{value}`"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = value.eq_ignore_ascii_case("chunked");
        } else if name.eq_ignore_ascii_case("expect") {
            head.expect_continue = value.eq_ignore_ascii_case("100-continue");
        } else if name.eq_ignore_ascii_case("connection") {
            head.close = value.eq_ignore_ascii_case("close");
        }
    }
    Ok(Some(head))
}

/// Reads into `buf` until it holds `want` bytes; `false` on a clean close.
async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, want: usize) -> Result<bool> {
    while buf.len() < want {
        buf.reserve(want - buf.len());
        if stream.read_buf(buf).await? == 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Reads more into `buf`; `false` on a clean close.
async fn more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<bool> {
    buf.reserve(64 << 10);
    Ok(stream.read_buf(buf).await? > 0)
}

/// Decodes a chunked body starting at `buf[at..]`; returns the body and the bytes
/// consumed from `at`.
async fn read_chunked(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    at: usize,
) -> Result<(Vec<u8>, usize)> {
    let mut body = Vec::new();
    let mut pos = at;
    loop {
        let line_end = loop {
            if let Some(p) = buf[pos..].windows(2).position(|w| w == b"\r\n") {
                break pos + p;
            }
            if buf.len() - pos > 1024 || !more(stream, buf).await? {
                bail!("bad chunk size line");
            }
        };
        let line = std::str::from_utf8(&buf[pos..line_end]).context("chunk size")?;
        let hex = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(hex, 16).with_context(|| format!("chunk size `{hex}`"))?;
        pos = line_end + 2;
        if size == 0 {
            // Trailers (if any) end with an empty line.
            loop {
                if buf.len() >= pos + 2 && &buf[pos..pos + 2] == b"\r\n" {
                    return Ok((body, pos + 2 - at));
                }
                if let Some(p) = buf[pos..].windows(4).position(|w| w == b"\r\n\r\n") {
                    return Ok((body, pos + p + 4 - at));
                }
                if buf.len() - pos > SINK_MAX_HEAD || !more(stream, buf).await? {
                    bail!("unterminated chunked body");
                }
            }
        }
        if body.len() + size > SINK_MAX_BODY {
            bail!("body over {SINK_MAX_BODY} bytes");
        }
        if !fill(stream, buf, pos + size + 2).await? {
            bail!("closed inside a chunk");
        }
        body.extend_from_slice(&buf[pos..pos + size]);
        pos += size + 2;
    }
}

async fn sink_conn(mut stream: TcpStream, stats: &SinkStats) -> Result<()> {
    stream.set_nodelay(true)?;
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    for _ in 0..MAX_READINGS {
        let head = loop {
            if let Some(h) = parse_request_head(&buf)? {
                break h;
            }
            if buf.len() > SINK_MAX_HEAD {
                bail!("request head over {SINK_MAX_HEAD} bytes");
            }
            if !more(&mut stream, &mut buf).await? {
                return Ok(());
            }
        };
        if head.expect_continue {
            stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        }
        let (body_owned, consumed);
        let body: &[u8] = if head.chunked {
            let (b, used) = read_chunked(&mut stream, &mut buf, head.len).await?;
            body_owned = b;
            consumed = head.len + used;
            &body_owned
        } else {
            let n = head.content_length.unwrap_or(0);
            if n > SINK_MAX_BODY {
                bail!("body over {SINK_MAX_BODY} bytes");
            }
            if !fill(&mut stream, &mut buf, head.len + n).await? {
                bail!("closed inside a body");
            }
            consumed = head.len + n;
            &buf[head.len..consumed]
        };
        stats.requests.fetch_add(1, Ordering::Relaxed);
        stats
            .body_bytes
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        let reply: &[u8] = match serde_json::from_slice::<BatchBody>(body) {
            Ok(b) => {
                stats
                    .events
                    .fetch_add(b.batch.len() as u64, Ordering::Relaxed);
                let mut sample = stats.sample.lock().unwrap_or_else(PoisonError::into_inner);
                if sample.is_none() {
                    if let Ok(first) = serde_json::from_slice::<FirstEvent<'_>>(body) {
                        *sample = first.batch.first().map(|e| e.get().to_owned());
                    }
                }
                b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
            }
            Err(e) => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                stats.problem(format!(
                    "unparseable webhook body ({e}): {}",
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                ));
                b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"
            }
        };
        stream.write_all(reply).await?;
        buf.drain(..consumed);
        if head.close {
            return Ok(());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// The gateway: config and readings

fn gateway_config(mqtt: SocketAddr, http: SocketAddr, sink: SocketAddr, args: &Args) -> String {
    let devices: Vec<String> = (1..=args.connections)
        .map(|i| format!("\"load-{i}\""))
        .collect();
    let mut text = format!(
        r#"# Written by fanbench.
[mqtt]
listen = "{mqtt}"
# Above what one device sends here: the benchmark measures the pipeline, not the
# per-device rate limit.
device_events_per_second = 10000000

[tls]
create_dev_certs = true
dev_devices = [{devices}]

[http]
listen = "{http}"
"#,
        devices = devices.join(", ")
    );
    if args.dests == Dests::None {
        return text;
    }
    // Identity resolution runs with the defaults of [identity].
    text.push_str(
        r#"
[[computed]]
name = "events_total"
kind = "count"

[[computed]]
name = "last_product"
kind = "last"
event = "Product Viewed"
property = "product_id"
"#,
    );
    if args.dests.file() {
        text.push_str(&format!(
            r#"
[[destinations]]
name = "{FILE_DEST}"
kind = "file"
dir = "out"
max_file_size = "256MiB"
max_file_age = "1m"
batch_size = 1000
require_purposes = ["analytics"]
identities = ["customer_id", "anonymous_id", "email"]
attributes = ["email", "plan", "country", "events_total", "last_product"]
"#
        ));
    }
    if args.dests.hook() {
        text.push_str(&format!(
            r#"
[[destinations]]
name = "{HOOK_DEST}"
kind = "webhook"
url = "http://{sink}/v1/batch"
format = "batch"
batch_size = {batch}
concurrency = {concurrency}
linger = "50ms"
timeout = "30s"
retry_initial = "100ms"
retry_max = "2s"
require_purposes = ["analytics"]
identities = ["customer_id", "email"]
attributes = ["plan", "events_total"]
"#,
            batch = args.webhook_batch,
            concurrency = args.webhook_concurrency,
        ));
    }
    text
}

/// One reading of the site.
#[derive(Debug, Clone, Copy)]
struct Reading {
    at: Instant,
    /// Events delivered by the file destination (`GET /v1/destinations`).
    file: u64,
    /// Events the webhook server received.
    hook: u64,
    /// Inbox commits (`edge_gateway_events_stored_total`), at the last `/metrics` read.
    stored: u64,
    /// Events the generator had had acknowledged.
    acked: u64,
}

#[derive(Debug)]
struct Site {
    http: SocketAddr,
    sink: Arc<SinkStats>,
    dests: Dests,
    /// Webhook events received before this phase's gateway started.
    hook_base: u64,
    counters: Arc<Counters>,
    readings: u64,
    stored: u64,
    profiles: Option<u64>,
    /// `edge_gateway_inbox_events`: committed and not yet done by every consumer.
    inbox: Option<u64>,
    /// Filtered, retried, dead-lettered events and the last error, per destination.
    trouble: BTreeMap<String, String>,
}

impl Site {
    async fn get(&self, path: &str) -> Result<Vec<u8>> {
        let r = Conn::new(self.http)
            .request(&Request::get(self.http, path).bytes)
            .await?;
        if r.status != 200 {
            bail!(
                "GET {path}: HTTP {}: {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
        }
        Ok(r.body)
    }

    async fn read(&mut self) -> Result<Reading> {
        let mut file = 0;
        if self.dests != Dests::None {
            let body = self.get("/v1/destinations").await?;
            let list: serde_json::Value =
                serde_json::from_slice(&body).context("GET /v1/destinations: not JSON")?;
            let list = list
                .as_array()
                .ok_or_else(|| anyhow!("GET /v1/destinations: not a list"))?;
            for d in list {
                let name = d["name"].as_str().unwrap_or_default().to_owned();
                let n = |k: &str| d[k].as_u64().unwrap_or(0);
                if name == FILE_DEST {
                    file = n("delivered");
                }
                let trouble = format!(
                    "backlog {}, filtered {}, retries {}, dead letters {}{}",
                    thousands(n("backlog") as f64),
                    thousands(n("filtered") as f64),
                    thousands(n("retries") as f64),
                    thousands(n("dead_letters") as f64),
                    d["last_error"]
                        .as_str()
                        .map_or(String::new(), |e| format!(", last error: {e}"))
                );
                self.trouble.insert(name, trouble);
            }
        }
        // Without destinations the inbox commits are what is measured: read them every time.
        if self.dests == Dests::None || self.readings.is_multiple_of(METRICS_EVERY) {
            let text = String::from_utf8_lossy(&self.get("/metrics").await?).into_owned();
            let value = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .map(|v| v as u64)
            };
            self.stored = value("edge_gateway_events_stored_total")
                .ok_or_else(|| anyhow!("/metrics lacks edge_gateway_events_stored_total"))?;
            self.profiles = value("edge_gateway_profiles");
            self.inbox = value("edge_gateway_inbox_events");
        }
        self.readings += 1;
        Ok(Reading {
            at: Instant::now(),
            file,
            hook: self.sink.events.load(Ordering::Relaxed) - self.hook_base,
            stored: self.stored,
            acked: self.counters.acked_events.load(Ordering::Relaxed),
        })
    }

    /// Events delivered by the slower destination (inbox commits without any).
    fn delivered(&self, r: &Reading) -> u64 {
        match self.dests {
            Dests::Both => r.file.min(r.hook),
            Dests::File => r.file,
            Dests::Webhook => r.hook,
            Dests::None => r.stored,
        }
    }
}

// ---------------------------------------------------------------------------------
// CPU

#[derive(Debug)]
struct CpuStart {
    at: Instant,
    gateway: Option<Duration>,
    me: Option<Duration>,
    threads: BTreeMap<String, (String, Duration)>,
    machine: Option<(u64, u64, u64)>,
}

#[derive(Debug, Default, Clone)]
struct CpuUse {
    /// Cores' worth used over the window (1.0 = one core).
    gateway: f64,
    me: f64,
    other: f64,
    threads: String,
}

impl CpuStart {
    fn now(pid: u32) -> Self {
        CpuStart {
            at: Instant::now(),
            gateway: cpu_time(&pid.to_string()),
            me: cpu_time("self"),
            threads: thread_cpu(pid),
            machine: machine_ticks(),
        }
    }

    fn finish(&self, pid: u32) -> CpuUse {
        let wall = self.at.elapsed();
        let secs = wall.as_secs_f64().max(1e-9);
        let used = |before: Option<Duration>, after: Option<Duration>| match (before, after) {
            (Some(b), Some(a)) => a.saturating_sub(b).as_secs_f64(),
            _ => f64::NAN,
        };
        let gateway = used(self.gateway, cpu_time(&pid.to_string()));
        let me = used(self.me, cpu_time("self"));
        let other = match (self.machine, machine_ticks()) {
            (Some(b), Some(a)) => ((a.0 - b.0) as f64 / 100.0 - gateway - me).max(0.0) / secs,
            _ => f64::NAN,
        };
        CpuUse {
            gateway: gateway / secs,
            me: me / secs,
            other,
            threads: thread_cpu_delta(&self.threads, &thread_cpu(pid), wall),
        }
    }
}

// ---------------------------------------------------------------------------------
// Phases

#[derive(Debug, Default)]
struct Seeded {
    /// Start → every identify acknowledged by the gateway.
    acked: Duration,
    /// Start → both destinations delivered them all.
    delivered: Duration,
    profiles: Option<u64>,
    /// The gateway's peak RSS once the seed was delivered, KiB.
    hwm_kib: u64,
    /// Seed events the gateway rejected.
    rejected: u64,
}

#[derive(Debug)]
struct Phase {
    profiles: u64,
    seed: Option<Seeded>,
    /// The measurements, in the order of [`Args::traffic`].
    runs: Vec<Measured>,
}

/// One measurement: warm-up and measured seconds of one [`Traffic`].
#[derive(Debug)]
struct Measured {
    traffic: Traffic,
    /// Length of the steady-state window.
    steady: Duration,
    /// Steady-state rates, events/s.
    file: f64,
    hook: f64,
    stored: f64,
    acked: f64,
    rate: f64,
    per_second: Vec<u64>,
    cpu: CpuUse,
    hwm_kib: u64,
    rss_kib: u64,
    profiles_after: Option<u64>,
    inbox_after: Option<u64>,
    rejected: u64,
}

impl Measured {
    fn new(traffic: Traffic) -> Self {
        Measured {
            traffic,
            steady: Duration::ZERO,
            file: 0.0,
            hook: 0.0,
            stored: 0.0,
            acked: 0.0,
            rate: 0.0,
            per_second: Vec::new(),
            cpu: CpuUse::default(),
            hwm_kib: 0,
            rss_kib: 0,
            profiles_after: None,
            inbox_after: None,
            rejected: 0,
        }
    }
}

struct Ctx<'a> {
    args: &'a Args,
    gateway_bin: &'a Path,
    dir: &'a Path,
    sink_addr: SocketAddr,
    sink: &'a Arc<SinkStats>,
}

type DeviceTask = tokio::task::JoinHandle<Result<wireload::DeviceReport>>;

/// The device tasks of one run of the load generator.
#[derive(Debug)]
struct Devices {
    tasks: Vec<Option<DeviceTask>>,
    /// Reports of the finished tasks, by connection.
    reports: Vec<Option<wireload::DeviceReport>>,
}

impl Devices {
    /// Starts one device task per connection, each with its share of `plan`.
    fn start(
        ctx: &Ctx<'_>,
        mqtt: SocketAddr,
        pki: &Path,
        first_seqs: &[u64],
        plan: Plan,
        counters: &Arc<Counters>,
        control: &Arc<Control>,
    ) -> Self {
        let n = ctx.args.connections as u64;
        let tasks = (0..n)
            .map(|i| {
                let plan = match plan {
                    Plan::Seed { first, end } => {
                        let share = (end - first).div_ceil(n);
                        let a = (first + i * share).min(end);
                        Plan::Seed {
                            first: a,
                            end: (a + share).min(end),
                        }
                    }
                    mix => mix,
                };
                let cfg = DeviceConfig {
                    device: format!("load-{}", i + 1),
                    mqtt,
                    pki: pki.to_owned(),
                    window: ctx.args.window,
                    batch_events: ctx.args.batch,
                    first_seq: first_seqs.get(i as usize).copied().unwrap_or(1),
                };
                Some(tokio::spawn(wireload::run_device(
                    cfg,
                    plan,
                    Arc::clone(counters),
                    Arc::clone(control),
                )))
            })
            .collect();
        let reports = (0..n).map(|_| None).collect();
        Devices { tasks, reports }
    }

    /// Collects the tasks that have finished; a failed one ends the phase at once.
    async fn check(&mut self) -> Result<()> {
        for (slot, report) in self.tasks.iter_mut().zip(&mut self.reports) {
            if slot.as_ref().is_some_and(|t| t.is_finished()) {
                if let Some(t) = slot.take() {
                    *report = Some(t.await.context("device task")??);
                }
            }
        }
        Ok(())
    }

    /// Waits for every task (they have been told to stop); returns the events the
    /// gateway rejected and the seq each device's next run starts at.
    async fn join(mut self) -> Result<(u64, Vec<u64>)> {
        for (slot, report) in self.tasks.iter_mut().zip(&mut self.reports) {
            if let Some(t) = slot.take() {
                let r = tokio::time::timeout(STOP_TIMEOUT, t)
                    .await
                    .map_err(|_| anyhow!("a device did not finish within {STOP_TIMEOUT:?}"))?
                    .context("device task")??;
                *report = Some(r);
            }
        }
        let reports: Vec<wireload::DeviceReport> = self.reports.into_iter().flatten().collect();
        Ok((
            reports.iter().map(|r| r.rejected_events).sum(),
            reports.iter().map(|r| r.next_seq).collect(),
        ))
    }
}

async fn run_phase(ctx: &Ctx<'_>, profiles: u64) -> Result<Phase> {
    let args = ctx.args;
    let dir = ctx.dir.join(format!("profiles-{profiles}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let (mqtt, http) = (free_addr()?, free_addr()?);
    std::fs::write(
        dir.join("gateway.toml"),
        gateway_config(mqtt, http, ctx.sink_addr, args),
    )
    .context("write gateway.toml")?;
    let started = Instant::now();
    let mut gateway = Daemon::start(
        "gateway",
        ctx.gateway_bin,
        &dir.join("gateway.toml"),
        &dir.join("data"),
        &dir.join("gateway.log"),
    )?;
    gateway.wait_healthy(http).await?;
    println!(
        "  gateway pid {} healthy after {:.0} ms (mqtts {mqtt}, http {http}, data {})",
        gateway.pid,
        started.elapsed().as_secs_f64() * 1000.0,
        dir.join("data").display()
    );
    let result = phase_load(
        ctx,
        &mut gateway,
        mqtt,
        http,
        &dir.join("data").join("pki"),
        profiles,
    )
    .await;
    if let Err(e) = &result {
        println!("  gateway log tail:\n{}", gateway.log_tail());
        return Err(anyhow!("{e:#}"));
    }
    match gateway.terminate() {
        Ok((status, took)) => println!(
            "  gateway stopped: {status} after {:.0} ms",
            took.as_secs_f64() * 1000.0
        ),
        Err(e) => println!("  gateway did not stop cleanly ({e:#}); killed"),
    }
    result
}

/// A running phase: its gateway and what reads it.
struct Run<'a> {
    ctx: &'a Ctx<'a>,
    gateway: &'a mut Daemon,
    site: Site,
    mqtt: SocketAddr,
    pki: PathBuf,
    /// Per connection, the seq its next run starts at.
    next_seqs: Vec<u64>,
}

impl Run<'_> {
    /// Lets the devices run `pipeline_window` events ahead of `delivered`.
    fn gate(&self, control: &Control, delivered: u64) {
        if self.ctx.args.pipeline_window > 0 {
            control
                .limit
                .store(delivered + self.ctx.args.pipeline_window, Ordering::Relaxed);
        }
    }

    fn devices(&self, plan: Plan, control: &Arc<Control>) -> Devices {
        Devices::start(
            self.ctx,
            self.mqtt,
            &self.pki,
            &self.next_seqs,
            plan,
            &self.site.counters,
            control,
        )
    }

    /// One reading, after checking that the devices and the gateway still run.
    async fn step(&mut self, devices: &mut Devices, what: &str) -> Result<Reading> {
        tokio::time::sleep(SCRAPE_EVERY).await;
        devices.check().await?;
        if let Some(status) = self.gateway.exited()? {
            bail!("the gateway exited {what} ({status})");
        }
        self.site.read().await
    }

    /// One identify for each of `profiles` users, until both destinations delivered
    /// them all (the gateway is fresh: every delivery is the seed's).
    async fn seed(&mut self, profiles: u64) -> Result<Seeded> {
        let args = self.ctx.args;
        println!(
            "  seed: one identify for each of {} users, until both destinations delivered them ...",
            thousands(profiles as f64)
        );
        let control = Arc::new(Control::default());
        self.gate(&control, 0);
        let t0 = Instant::now();
        let plan = Plan::Seed {
            first: 0,
            end: profiles,
        };
        let mut devices = self.devices(plan, &control);
        let (mut acked_at, mut done) = (None, false);
        let mut last_print = Instant::now();
        for _ in 0..MAX_READINGS {
            let r = self.step(&mut devices, "during the seed").await?;
            let delivered = self.site.delivered(&r);
            self.gate(&control, delivered);
            if acked_at.is_none() && r.acked >= profiles {
                acked_at = Some(t0.elapsed());
            }
            if last_print.elapsed() >= Duration::from_secs(5) {
                last_print = Instant::now();
                println!(
                    "    {:>4.0} s: acked {}, stored {}, files {}, webhook {}",
                    t0.elapsed().as_secs_f64(),
                    thousands(r.acked as f64),
                    thousands(r.stored as f64),
                    thousands(r.file as f64),
                    thousands(r.hook as f64)
                );
            }
            done = delivered >= profiles && acked_at.is_some();
            if done || t0.elapsed() > args.seed_timeout {
                break;
            }
        }
        let delivered_in = t0.elapsed();
        control.stop.store(true, Ordering::Relaxed);
        let (rejected, next_seqs) = devices.join().await?;
        self.next_seqs = next_seqs;
        if !done {
            bail!(
                "the seed was not delivered within {:?}: {:?}",
                args.seed_timeout,
                self.site.trouble
            );
        }
        self.site.readings = 0;
        self.site.read().await?;
        let seeded = Seeded {
            acked: acked_at.unwrap_or(delivered_in),
            delivered: delivered_in,
            profiles: self.site.profiles,
            hwm_kib: proc_status_kib(self.gateway.pid, "VmHWM")?,
            rejected,
        };
        println!(
            "    seeded: acked after {:.1} s, delivered by both after {:.1} s ({} ev/s); profiles in the gateway: {}; gateway peak RSS so far {:.0} MiB; events rejected by the gateway: {}",
            seeded.acked.as_secs_f64(),
            seeded.delivered.as_secs_f64(),
            thousands(profiles as f64 / seeded.delivered.as_secs_f64()),
            seeded.profiles.map_or("n/a".into(), |p| thousands(p as f64)),
            mib(seeded.hwm_kib),
            seeded.rejected
        );
        Ok(seeded)
    }

    /// Waits until the slower destination has delivered every event committed to the
    /// inbox, so that the next measurement does not start with this one's backlog.
    /// Bounded by [`STOP_TIMEOUT`]; past it the next one starts anyway, with a note.
    async fn drain(&mut self) -> Result<()> {
        let t0 = Instant::now();
        for _ in 0..MAX_READINGS {
            tokio::time::sleep(SCRAPE_EVERY).await;
            if let Some(status) = self.gateway.exited()? {
                bail!("the gateway exited while the destinations drained ({status})");
            }
            // Read `/metrics` every time: the inbox commits are what is waited for.
            self.site.readings = 0;
            let r = self.site.read().await?;
            if self.site.delivered(&r) >= r.stored {
                println!(
                    "  drained: the destinations delivered the backlog in {:.1} s",
                    t0.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            if t0.elapsed() > STOP_TIMEOUT {
                println!(
                    "  not drained within {STOP_TIMEOUT:?} (delivered {}, inbox commits {}); the next measurement starts with the backlog",
                    thousands(self.site.delivered(&r) as f64),
                    thousands(r.stored as f64)
                );
                break;
            }
        }
        Ok(())
    }

    /// The warm-up and the measured seconds of events of `traffic`.
    async fn measure(&mut self, traffic: Traffic) -> Result<Measured> {
        let args = self.ctx.args;
        let mut m = Measured::new(traffic);
        println!(
            "  load: {} connections, events over {}, {:.0} s warm-up + {:.0} s measured ...",
            args.connections,
            traffic.describe(),
            args.warmup.as_secs_f64(),
            args.duration.as_secs_f64()
        );
        self.site.counters = Arc::new(Counters::default());
        let control = Arc::new(Control::default());
        self.site.readings = 0;
        let base = self.site.read().await?;
        let base_delivered = self.site.delivered(&base);
        self.gate(&control, 0);
        let mut devices = self.devices(traffic.plan(args.identify_every), &control);
        let t0 = Instant::now();
        let end = t0 + args.warmup + args.duration;
        let mut readings: Vec<Reading> = vec![base];
        let mut cpu: Option<CpuStart> = None;
        let mut steady_from = 0;
        for _ in 0..MAX_READINGS {
            let r = self.step(&mut devices, "under load").await?;
            let delivered = self.site.delivered(&r).saturating_sub(base_delivered);
            self.gate(&control, delivered);
            readings.push(r);
            if cpu.is_none() && t0.elapsed() >= args.warmup {
                cpu = Some(CpuStart::now(self.gateway.pid));
                steady_from = readings.len() - 1;
            }
            if Instant::now() >= end {
                break;
            }
        }
        m.cpu = cpu.map(|c| c.finish(self.gateway.pid)).unwrap_or_default();
        control.stop.store(true, Ordering::Relaxed);
        let (rejected, next_seqs) = devices.join().await?;
        m.rejected = rejected;
        self.next_seqs = next_seqs;
        m.hwm_kib = proc_status_kib(self.gateway.pid, "VmHWM")?;
        m.rss_kib = proc_status_kib(self.gateway.pid, "VmRSS")?;
        self.site.readings = 0;
        self.site.read().await?;
        m.profiles_after = self.site.profiles;
        m.inbox_after = self.site.inbox;

        let from = readings[steady_from];
        let to = *readings.last().unwrap_or(&from);
        let secs = (to.at - from.at).as_secs_f64().max(1e-9);
        let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
        m.steady = Duration::from_secs_f64(secs);
        m.file = rate(from.file, to.file);
        m.hook = rate(from.hook, to.hook);
        m.stored = rate(from.stored, to.stored);
        m.acked = rate(from.acked, to.acked);
        m.rate = match args.dests {
            Dests::Both => m.file.min(m.hook),
            Dests::File => m.file,
            Dests::Webhook => m.hook,
            Dests::None => m.stored,
        };
        // Delivered (slower destination) in each whole second since the load started.
        let mut prev = base_delivered;
        let mut second = 1;
        for r in &readings {
            if r.at >= t0 + Duration::from_secs(second) {
                let d = self.site.delivered(r);
                m.per_second.push(d.saturating_sub(prev));
                prev = d;
                second += 1;
            }
        }
        Ok(m)
    }
}

async fn phase_load(
    ctx: &Ctx<'_>,
    gateway: &mut Daemon,
    mqtt: SocketAddr,
    http: SocketAddr,
    pki: &Path,
    profiles: u64,
) -> Result<Phase> {
    let mut phase = Phase {
        profiles,
        seed: None,
        runs: Vec::new(),
    };
    let site = Site {
        http,
        sink: Arc::clone(ctx.sink),
        dests: ctx.args.dests,
        hook_base: ctx.sink.events.load(Ordering::Relaxed),
        counters: Arc::new(Counters::default()),
        readings: 0,
        stored: 0,
        profiles: None,
        inbox: None,
        trouble: BTreeMap::new(),
    };
    let mut run = Run {
        ctx,
        gateway,
        site,
        mqtt,
        pki: pki.to_owned(),
        next_seqs: Vec::new(),
    };
    if profiles > 0 {
        phase.seed = Some(run.seed(profiles).await?);
    }
    for (i, traffic) in ctx.args.traffic(profiles).into_iter().enumerate() {
        if i > 0 {
            run.drain().await?;
        }
        let measured = run.measure(traffic).await?;
        measured.print(&run.site.trouble);
        phase.runs.push(measured);
    }
    Ok(phase)
}

impl Measured {
    fn print(&self, trouble: &BTreeMap<String, String>) {
        let per_second: Vec<String> = self
            .per_second
            .iter()
            .map(|n| thousands(*n as f64))
            .collect();
        println!(
            "    delivered per second (slower destination): {}",
            per_second.join(" ")
        );
        println!(
            "    steady state over {:.1} s: files {} ev/s, webhook {} ev/s, inbox commits {} ev/s (/metrics, read every 1 s), acks {} ev/s",
            self.steady.as_secs_f64(),
            thousands(self.file),
            thousands(self.hook),
            thousands(self.stored),
            thousands(self.acked)
        );
        for (name, t) in trouble {
            println!("    destination {name}: {t}");
        }
        println!(
            "    cpu (% of one core): gateway {:.0}%, fanbench {:.0}%, other processes {:.0}%",
            100.0 * self.cpu.gateway,
            100.0 * self.cpu.me,
            100.0 * self.cpu.other
        );
        println!("    gateway threads: {}", self.cpu.threads);
        println!(
            "    gateway RSS: peak {:.0} MiB, now {:.0} MiB; profiles: {}; inbox: {} events; events rejected by the gateway: {}",
            mib(self.hwm_kib),
            mib(self.rss_kib),
            self.profiles_after.map_or("n/a".into(), |p| thousands(p as f64)),
            self.inbox_after.map_or("n/a".into(), |p| thousands(p as f64)),
            self.rejected
        );
    }
}

// ---------------------------------------------------------------------------------

/// The summary row of a measurement held to no target.
fn info(metric: &str, measured: String) -> Row {
    Row {
        verdict: "info",
        ..row(metric, measured, "worst case, no target", None)
    }
}

fn summary(phases: &[Phase], args: &Args) -> Vec<Row> {
    let mut rows = Vec::new();
    let baseline = phases
        .iter()
        .find(|p| p.profiles == 0)
        .and_then(|p| p.runs.first())
        .map(|m| m.rate);
    let what = match args.dests {
        Dests::Both => "delivered by both destinations",
        Dests::File => "delivered by the file destination",
        Dests::Webhook => "delivered by the webhook",
        Dests::None => "inbox commits (no destination)",
    };
    for p in phases {
        for (i, m) in p.runs.iter().enumerate() {
            let label = format!("{what}, {}", m.traffic.label(p.profiles));
            let rate = format!("{} ev/s", thousands(m.rate));
            let targeted = m.traffic.targeted();
            rows.push(if targeted {
                row(
                    &label,
                    rate,
                    ">= 100,000 ev/s",
                    Some(m.rate >= TARGET_EVENTS_PER_S),
                )
            } else {
                info(&label, rate)
            });
            if p.profiles > 0 {
                if let Some(base) = baseline.filter(|b| *b > 0.0) {
                    let metric = "  vs the 0-profile run";
                    let ratio = format!("{:.0}%", 100.0 * m.rate / base);
                    rows.push(if targeted {
                        row(
                            metric,
                            ratio,
                            ">= 70%",
                            Some(m.rate >= TARGET_PROFILES_RATIO * base),
                        )
                    } else {
                        info(metric, ratio)
                    });
                }
            }
            if args.dests == Dests::Both {
                rows.push(row(
                    "  files / webhook",
                    format!("{} / {} ev/s", thousands(m.file), thousands(m.hook)),
                    "",
                    None,
                ));
            }
            rows.push(row("  users of the events", m.traffic.describe(), "", None));
            if let Some(s) = p.seed.as_ref().filter(|_| i == 0) {
                rows.push(row(
                    "  seed: identifies delivered by both",
                    format!(
                        "{:.1} s ({} ev/s)",
                        s.delivered.as_secs_f64(),
                        thousands(p.profiles as f64 / s.delivered.as_secs_f64().max(1e-9))
                    ),
                    "",
                    None,
                ));
                rows.push(row(
                    "  gateway peak RSS once seeded",
                    format!("{:.0} MiB", mib(s.hwm_kib)),
                    "",
                    None,
                ));
            }
            rows.push(row(
                "  profiles at the end",
                m.profiles_after
                    .map_or("n/a".into(), |n| thousands(n as f64)),
                "",
                None,
            ));
            // VmHWM only grows: the phase's last measurement has the phase's peak, and
            // the target is checked there once.
            let peak = format!("{:.0} MiB", mib(m.hwm_kib));
            rows.push(match (p.runs.len() > 1, i + 1 == p.runs.len()) {
                (false, _) => row(
                    "  gateway peak RSS (VmHWM)",
                    peak,
                    "<= 512 MiB",
                    Some(mib(m.hwm_kib) <= TARGET_RSS_MIB),
                ),
                (true, false) => row("  gateway peak RSS (VmHWM) so far", peak, "", None),
                (true, true) => row(
                    "  gateway peak RSS (VmHWM), whole phase",
                    peak,
                    "<= 512 MiB",
                    Some(mib(m.hwm_kib) <= TARGET_RSS_MIB),
                ),
            });
            rows.push(row(
                "  gateway CPU",
                format!("{:.0}% of a core", 100.0 * m.cpu.gateway),
                "",
                None,
            ));
            rows.push(row(
                "  fanbench CPU (generator + webhook server)",
                format!("{:.0}% of a core", 100.0 * m.cpu.me),
                "",
                None,
            ));
            rows.push(row(
                "  other processes' CPU",
                format!("{:.0}% of a core", 100.0 * m.cpu.other),
                "~0% (quiet machine)",
                None,
            ));
        }
    }
    rows
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
    let gateway_bin = bin_dir.join("edge-gateway");
    if !gateway_bin.is_file() {
        bail!(
            "{} not found: run `cargo build --release --bins`, or pass --bin-dir DIR",
            gateway_bin.display()
        );
    }
    let mut builder = tempfile::Builder::new();
    builder.prefix("fanbench-");
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
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    println!("fanbench: gateway {}", gateway_bin.display());
    println!(
        "          destinations: {}; {} connections x window {} x {} events/frame (lz4), pipeline window {}; webhook batch {} x {} in flight",
        args.dests.describe(),
        args.connections,
        args.window,
        args.batch,
        if args.pipeline_window == 0 { "unbounded".to_owned() } else { thousands(args.pipeline_window as f64) },
        args.webhook_batch,
        args.webhook_concurrency
    );
    println!(
        "          traffic: 0 profiles over {} users; P profiles over min({}, P) seeded users, then over all P (cold, no target)",
        thousands(args.users as f64),
        thousands(args.active as f64)
    );
    if args.active != args.users
        && args.profiles.contains(&0)
        && args.profiles.iter().any(|&p| p > 0)
    {
        println!(
            "          note: --active differs from --users: the ratio to the 0-profile run compares different traffic"
        );
    }
    println!(
        "          {cores} CPUs, {} fanbench threads; data {}",
        args.client_threads,
        dir.display()
    );
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        println!("          load average before: {}", load.trim());
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads)
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let phases = runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the webhook server")?;
        let sink_addr = listener.local_addr()?;
        let sink = Arc::new(SinkStats::default());
        tokio::spawn(serve_sink(listener, Arc::clone(&sink)));
        let ctx = Ctx {
            args: &args,
            gateway_bin: &gateway_bin,
            dir: &dir,
            sink_addr,
            sink: &sink,
        };
        let mut phases = Vec::new();
        for (i, &p) in args.profiles.iter().enumerate() {
            println!(
                "[{}/{}] {} existing profiles",
                i + 1,
                args.profiles.len(),
                thousands(p as f64)
            );
            phases.push(run_phase(&ctx, p).await?);
        }
        println!(
            "webhook server: {} requests, {} events, {:.0} MiB of bodies ({:.0} B/event), {} refused{}",
            thousands(sink.requests.load(Ordering::Relaxed) as f64),
            thousands(sink.events.load(Ordering::Relaxed) as f64),
            mib(sink.body_bytes.load(Ordering::Relaxed) / 1024),
            sink.body_bytes.load(Ordering::Relaxed) as f64
                / sink.events.load(Ordering::Relaxed).max(1) as f64,
            sink.refused.load(Ordering::Relaxed),
            sink.first_problem
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .map_or(String::new(), |p| format!("; first problem: {p}"))
        );
        if let Some(s) = sink.sample.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            println!("webhook event sample: {s}");
        }
        anyhow::Ok(phases)
    })?;
    drop(runtime);

    println!();
    println!("SUMMARY");
    let rows = summary(&phases, &args);
    print_table(&rows);
    if args.keep {
        println!("kept {}", dir.display());
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
