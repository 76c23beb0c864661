//! `audbench`: benchmark of audiences (issue 5) against its targets on this machine:
//! the time from the event that makes a user a member to the device's local answer,
//! p50 and p99 at most 100 ms (online); a scheduled sweep over 1,000,000 profiles and
//! 10 audiences in at most 10 s.
//!
//! ```text
//! cargo build --release -p edge-gateway -p edge-agent -p edge-tests --bins \
//!   && target/release/audbench [--users 200] [--profiles 1000000] [--quick] [--help]
//! ```
//!
//! Two phases, each with a fresh release `edge-gateway` (dev PKI made on its first
//! run, free ports, a temp data dir) started from the binaries next to this one:
//!
//! 1. **Device latency.** One real `edge-agent` (device `bench-phone`, default uplink:
//!    stream, 5 ms linger, LZ4) connected over MQTT/mTLS; the gateway defines
//!    `level_up = { did = "Level Up", within = "7d" }`. Every user is first identified
//!    through the agent (so the gateway knows the device holds them) and the site
//!    settles (a sentinel user's `Level Up`, sent after them, is a member at the
//!    gateway: the engine evaluates in log order). Then, one user at a time (at most one
//!    every 50 ms): `POST /v1/track` `Level Up` to the agent, and from just before that
//!    POST, `GET /v1/audiences?userId=` on the agent every 2 ms until it lists
//!    `level_up`. That is the whole path: agent spool, uplink, gateway inbox, identity
//!    and profile, audience evaluation and commit, the device output, the durable
//!    downlink queue, MQTT down, the agent's store, its HTTP answer. Alongside (unless
//!    `--no-split`), the gateway's own view is polled every 2 ms too
//!    (`GET /v1/audiences/level_up/why/customer_id/<user>` until `member` is true), which
//!    splits the time into "event → gateway member" and "gateway → device".
//! 2. **Sweep.** A gateway with `gateway.test_clock`, one `[[sources]]` write key, a
//!    computed attribute and 10 audiences (7 of them depend on time: `within` /
//!    `before` did clauses, `not`, attributes, consent; listed in [`SWEEP_CONFIG`]).
//!    `--profiles` users each send one track (with traits, properties and, for half of
//!    them, consent) to the gateway's server-side `POST /v1/batch` (batches of 100 over
//!    4 keep-alive connections), timed until accepted and until the pipeline caught up
//!    (a sentinel event sent after all of them has entered `pro` at the gateway: every
//!    profile holds its audience state; the sentinel is one more profile). Then three sweeps (`POST /v1/audiences/sweep`, the
//!    same work the schedule does; the schedule itself is set to 24 h so it never runs
//!    in between), each timed by the client and reported by the gateway
//!    (`SweepReport {profiles, changes, elapsed_ms}`):
//!    - after `POST /v1/clock?advance=2h`: the `before = "1h"` clauses come due and the
//!      `within = "1h"` ones expire (three quarters of the profiles are due);
//!    - after a further `advance=8d`: every `within = "7d"` window expires: every
//!      profile is due (the headline number: a sweep over all profiles);
//!    - at once again: nothing is due (the scan alone).
//!
//!    Gateway peak RSS (`VmHWM`) over the phase is read at its end.
//!
//! `--quick` (200 → 30 users, 1,000,000 → 20,000 profiles) is for iterating; its
//! numbers are not the targets'. Other processes' CPU is printed (load average and
//! the machine's busy share per phase): on a busy machine the numbers are pessimistic.
//!
//! Traffic goes only to 127.0.0.1. Every loop is bounded in time and in count.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use edge_tests::bench::{
    cpu_time, free_addr, machine_delta, machine_ticks, mib, print_table, proc_status_kib, row,
    thousands, Conn, Daemon, Request, Response, Row, WRITE_KEY,
};

/// Targets.
const TARGET_DEVICE_P50_MS: f64 = 100.0;
const TARGET_DEVICE_P99_MS: f64 = 100.0;
const TARGET_SWEEP_S: f64 = 10.0;

/// Device id of the agent (phase 1).
const DEVICE: &str = "bench-phone";
/// The audience of phase 1 and the event that enters it.
const AUDIENCE: &str = "level_up";
const TRIGGER: &str = "Level Up";
/// The user whose event, sent last, shows the gateway has evaluated everything before.
const SENTINEL: &str = "sentinel";
/// Poll period of the agent's and the gateway's answers.
const POLL_EVERY: Duration = Duration::from_millis(2);
/// Longest wait for one user to show on the device; a slower one is a failure.
const USER_TIMEOUT: Duration = Duration::from_secs(10);
/// At most one trigger per this period (sequential users, paced).
const PACE: Duration = Duration::from_millis(50);
/// Identifies per agent `/v1/batch` before phase 1.
const IDENTIFY_BATCH: usize = 100;
/// Longest wait for a site to settle (profiles stored, inbox empty).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait for 1M events to be accepted, and then for the pipeline to catch up.
const INGEST_TIMEOUT: Duration = Duration::from_secs(1800);
/// Longest wait for one sweep's answer.
const SWEEP_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest wait for the uplink to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Reading period while waiting on the pipeline.
const WATCH_EVERY: Duration = Duration::from_millis(500);
/// Cap on the readings of any waiting loop (each is bounded in time too).
const MAX_READINGS: u64 = 1_000_000;
/// Events per server-side `/v1/batch` and keep-alive connections (phase 2).
const SWEEP_BATCH: u64 = 100;
const SWEEP_CONNECTIONS: u64 = 4;
/// Source name and the event names phase 2 cycles through (user i sends `EVENTS[i % 4]`).
const SOURCE: &str = "backend";
const EVENTS: [&str; 4] = ["Signed Up", "App Opened", "Order Completed", "Level Up"];
const PLANS: [&str; 3] = ["free", "pro", "team"];
const COUNTRIES: [&str; 5] = ["DE", "FR", "GB", "US", "ES"];

/// The 10 audiences of phase 2 (and a computed attribute one of them reads).
const SWEEP_CONFIG: &str = r#"
[[computed]]
name = "spend"
kind = "sum"
event = "Order Completed"
property = "revenue"

# Time-bound (did within/before, not):
[[audiences]]
name = "new_signups"
when = { did = "Signed Up", within = "7d" }

[[audiences]]
name = "signed_up_an_hour_ago"
when = { did = "Signed Up", within = "7d", before = "1h" }

[[audiences]]
name = "opened_last_hour"
when = { did = "App Opened", within = "1h" }

[[audiences]]
name = "bought_no_open"
when = { all = [
  { did = "Order Completed", within = "30d", before = "1h" },
  { not = { did = "App Opened", within = "30d" } },
] }

[[audiences]]
name = "high_level_week"
when = { did = "Level Up", within = "7d", where = [{ property = "level", op = "gte", value = 10 }] }

[[audiences]]
name = "quiet_non_pro"
when = { all = [
  { not = { did = "App Opened", within = "1h" } },
  { attribute = "plan", op = "ne", value = "pro" },
] }

[[audiences]]
name = "active_week"
when = { any = [
  { did = "Signed Up", within = "7d" },
  { did = "App Opened", within = "7d" },
  { did = "Order Completed", within = "7d" },
  { did = "Level Up", within = "7d" },
] }

# Attributes, computed attributes and consent only:
[[audiences]]
name = "pro"
when = { attribute = "plan", op = "eq", value = "pro" }

[[audiences]]
name = "eu_paying"
when = { all = [
  { attribute = "country", op = "in", value = ["DE", "FR", "GB", "ES"] },
  { attribute = "plan", op = "in", value = ["pro", "team"] },
] }

[[audiences]]
name = "big_spenders_ads"
when = { all = [
  { attribute = "spend", op = "gte", value = 100 },
  { consent = "advertising" },
] }
"#;

const USAGE: &str = "\
audbench: benchmark audiences: event -> device answer latency, and a sweep over many profiles

USAGE: audbench [OPTIONS]

OPTIONS:
  --bin-dir PATH     where edge-gateway and edge-agent are [default: next to this executable]
  --dir PATH         where the temp data dirs go [default: system temp dir]
  --users N          users measured one by one on the device [200]
  --profiles N       profiles (one event each) swept [1000000]
  --quick            30 users, 20,000 profiles (for iterating; not the targets' sizes)
  --only PHASE       run only `latency` or `sweep`
  --no-split         do not poll the gateway's view during the latency phase
  --keep             keep the temp dir (configs, logs, data) and print its path
  --strict           exit 1 when a target is missed
  -h, --help         this text
";

#[derive(Debug, Clone)]
struct Args {
    bin_dir: Option<PathBuf>,
    dir: Option<PathBuf>,
    users: u64,
    profiles: u64,
    latency: bool,
    sweep: bool,
    split: bool,
    keep: bool,
    strict: bool,
}

impl Args {
    fn parse() -> Result<Option<Args>> {
        let mut args = Args {
            bin_dir: None,
            dir: None,
            users: 200,
            profiles: 1_000_000,
            latency: true,
            sweep: true,
            split: true,
            keep: false,
            strict: false,
        };
        let (mut users, mut profiles, mut quick) = (None, None, false);
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().ok_or_else(|| anyhow!("{flag} needs a value"));
            match flag.as_str() {
                "-h" | "--help" => return Ok(None),
                "--bin-dir" => args.bin_dir = Some(PathBuf::from(value()?)),
                "--dir" => args.dir = Some(PathBuf::from(value()?)),
                "--users" => users = Some(count(&flag, &value()?, 1, 100_000)?),
                "--profiles" => profiles = Some(count(&flag, &value()?, 1, 100_000_000)?),
                "--quick" => quick = true,
                "--only" => match value()?.as_str() {
                    "latency" => args.sweep = false,
                    "sweep" => args.latency = false,
                    other => bail!("--only: latency or sweep, got `{other}`"),
                },
                "--no-split" => args.split = false,
                "--keep" => args.keep = true,
                "--strict" => args.strict = true,
                other => bail!("unknown argument `{other}`\n\n{USAGE}"),
            }
        }
        let (default_users, default_profiles) = if quick {
            (30, 20_000)
        } else {
            (200, 1_000_000)
        };
        args.users = users.unwrap_or(default_users);
        args.profiles = profiles.unwrap_or(default_profiles);
        Ok(Some(args))
    }
}

fn count(flag: &str, v: &str, min: u64, max: u64) -> Result<u64> {
    match v.replace(['_', ','], "").parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => bail!("{flag}: expected an integer in {min}..={max}, got `{v}`"),
    }
}

// ---------------------------------------------------------------------------------
// HTTP helpers over the bench client

/// `method path` with an optional JSON body; the write key as Basic auth when
/// `authorized` (the agent's and the source's key).
fn raw_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    authorized: bool,
) -> Vec<u8> {
    if authorized {
        return Request::new(addr, path, body, &[], 0).bytes;
    }
    let mut bytes = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(body.as_bytes());
    bytes
}

/// One request on `conn` that must answer 200.
async fn ok(conn: &mut Conn, raw: &[u8], what: &str) -> Result<Response> {
    let r = conn.request(raw).await.with_context(|| what.to_owned())?;
    if r.status != 200 {
        bail!(
            "{what}: HTTP {}: {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
    }
    Ok(r)
}

async fn get_json(addr: SocketAddr, path: &str) -> Result<serde_json::Value> {
    let r = ok(
        &mut Conn::new(addr),
        &Request::get(addr, path).bytes,
        &format!("GET {path}"),
    )
    .await?;
    serde_json::from_slice(&r.body).with_context(|| format!("GET {path}: not JSON"))
}

/// The gauges of the gateway's `/metrics` this benchmark waits on.
#[derive(Debug, Default, Clone, Copy)]
struct Gauges {
    profiles: u64,
    inbox: u64,
    devices: u64,
}

async fn gauges(gateway: SocketAddr) -> Result<Gauges> {
    let r = ok(
        &mut Conn::new(gateway),
        &Request::get(gateway, "/metrics").bytes,
        "GET /metrics",
    )
    .await?;
    let text = String::from_utf8_lossy(&r.body);
    let mut g = Gauges::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.split_once(' ') else {
            continue;
        };
        let value = value.trim().parse::<f64>().unwrap_or(0.0) as u64;
        match name {
            "edge_gateway_profiles" => g.profiles = value,
            "edge_gateway_inbox_events" => g.inbox = value,
            "edge_gateway_devices_connected" => g.devices = value,
            _ => {}
        }
    }
    Ok(g)
}

/// Whether the gateway says `user` (customer id) is a member of `audience`.
async fn is_member(conn: &mut Conn, gateway: SocketAddr, audience: &str, user: &str) -> bool {
    let get = Request::get(
        gateway,
        &format!("/v1/audiences/{audience}/why/customer_id/{user}"),
    );
    match conn.request(&get.bytes).await {
        Ok(r) => {
            r.status == 200
                && serde_json::from_slice::<serde_json::Value>(&r.body)
                    .is_ok_and(|v| v["member"].as_bool() == Some(true))
        }
        Err(_) => false,
    }
}

/// Waits until the gateway's audience engine has evaluated everything sent before
/// the sentinel event of `user`, which makes them a member of `audience`: the engine
/// consumes the resolved log in order. (The inbox gauge is no signal: entries every
/// stage is done with are pruned by the next commit, not at once.)
async fn settle(
    gateway: SocketAddr,
    audience: &str,
    user: &str,
    timeout: Duration,
) -> Result<Duration> {
    let start = Instant::now();
    let mut conn = Conn::new(gateway);
    for _ in 0..MAX_READINGS {
        if is_member(&mut conn, gateway, audience, user).await {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let g = gauges(gateway).await?;
    bail!(
        "the gateway did not settle within {timeout:?}: sentinel `{user}` not in `{audience}`; {} profiles, {} events in the inbox",
        g.profiles,
        g.inbox
    )
}

/// Audience sizes, `name=size` in config order.
async fn sizes(gateway: SocketAddr) -> Result<String> {
    let v = get_json(gateway, "/v1/audiences").await?;
    let list = v
        .as_array()
        .cloned()
        .or_else(|| v["audiences"].as_array().cloned())
        .unwrap_or_default();
    Ok(list
        .iter()
        .map(|a| {
            format!(
                "{}={}",
                a["name"].as_str().unwrap_or("?"),
                thousands(a["members"].as_u64().unwrap_or(0) as f64)
            )
        })
        .collect::<Vec<_>>()
        .join(" "))
}

// ---------------------------------------------------------------------------------
// Configs and processes

fn gateway_config(mqtt: SocketAddr, http: SocketAddr, extra: &str) -> String {
    format!(
        r#"# Written by audbench.
[gateway]
test_clock = true
# Sweeps run when the benchmark asks (and once at start): never in between.
audience_sweep = "24h"

[mqtt]
listen = "{mqtt}"

[tls]
create_dev_certs = true
dev_devices = ["{DEVICE}"]

[http]
listen = "{http}"

[[sources]]
name = "{SOURCE}"
write_key = "{WRITE_KEY}"
{extra}"#
    )
}

fn agent_config(addr: SocketAddr, mqtt: SocketAddr, pki: &Path) -> String {
    format!(
        r#"# Written by audbench. The uplink is the default one (stream, 5 ms linger).
[agent]
device_id = "{DEVICE}"

[http]
listen = "{addr}"

[segment]
write_keys = ["{WRITE_KEY}"]

[consent]
unknown = "grant"

[uplink]
url = "mqtts://{mqtt}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
backoff_min = "50ms"
backoff_max = "500ms"
"#,
        ca = pki.join("ca.pem").display(),
        cert = pki.join(format!("devices/{DEVICE}.pem")).display(),
        key = pki.join(format!("devices/{DEVICE}.key")).display(),
    )
}

/// Where the binaries are, the temp dir, the options.
#[derive(Debug)]
struct Bench {
    gateway_bin: PathBuf,
    agent_bin: PathBuf,
    dir: PathBuf,
    args: Args,
}

impl Bench {
    /// Writes `<sub>/gateway.toml` and starts the gateway; waits for `/health`.
    async fn gateway(&self, sub: &str, extra: &str) -> Result<(Daemon, SocketAddr, SocketAddr)> {
        let dir = self.dir.join(sub);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let (mqtt, http) = (free_addr()?, free_addr()?);
        let config = dir.join("gateway.toml");
        std::fs::write(&config, gateway_config(mqtt, http, extra)).context("write gateway.toml")?;
        let started = Instant::now();
        let mut gw = Daemon::start(
            "gateway",
            &self.gateway_bin,
            &config,
            &dir.join("gateway-data"),
            &dir.join("gateway.log"),
        )?;
        gw.wait_healthy(http).await?;
        println!(
            "      gateway healthy after {:.0} ms (http {http}, mqtts {mqtt}, data {})",
            started.elapsed().as_secs_f64() * 1000.0,
            dir.display()
        );
        Ok((gw, mqtt, http))
    }
}

fn binary(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} not found: run `cargo build --release -p edge-gateway -p edge-agent -p edge-tests --bins`, or pass --bin-dir DIR",
            path.display()
        );
    }
    Ok(path)
}

/// The machine's CPU over a phase: its busy share, what our processes (the gateway,
/// the agent, this one) used, what everything else used, and the load average.
struct Machine {
    ticks: Option<(u64, u64, u64)>,
    pids: Vec<u32>,
    ours: Option<Duration>,
    start: Instant,
}

fn cpu_of(pids: &[u32]) -> Option<Duration> {
    let mut sum = cpu_time("self")?;
    for pid in pids {
        sum += cpu_time(&pid.to_string())?;
    }
    Some(sum)
}

impl Machine {
    fn start(pids: &[u32]) -> Self {
        Machine {
            ticks: machine_ticks(),
            pids: pids.to_vec(),
            ours: cpu_of(pids),
            start: Instant::now(),
        }
    }

    fn finish(self) -> String {
        let ours = match (self.ours, cpu_of(&self.pids)) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        let (text, _) = machine_delta(self.ticks, machine_ticks(), ours);
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let load: Vec<&str> = load.split_whitespace().take(3).collect();
        let ours = ours.map_or("n/a".into(), |d| {
            format!(
                "{:.0}% of one core",
                100.0 * d.as_secs_f64() / self.start.elapsed().as_secs_f64().max(1e-9)
            )
        });
        format!(
            "{text}; gateway+agent+audbench: {ours}; load average {}",
            load.join(" ")
        )
    }
}

// ---------------------------------------------------------------------------------
// Phase 1: event -> device answer

#[derive(Debug, Default)]
struct Latency {
    /// Trigger POST → the agent lists the audience, ms, per user seen.
    device_ms: Vec<f64>,
    /// Trigger POST → the gateway says member, ms.
    gateway_ms: Vec<f64>,
    /// Device time minus gateway time per user, ms.
    downlink_ms: Vec<f64>,
    /// The agent's answer to the trigger POST, ms.
    ack_ms: Vec<f64>,
    missed: u64,
    gateway_rss_kib: u64,
    agent_rss_kib: u64,
    machine: String,
}

fn user_id(i: u64) -> String {
    format!("player-{i:06}")
}

/// Polls the gateway's view of `user` until it says member (or `stop`/deadline).
async fn watch_gateway(
    gateway: SocketAddr,
    user: String,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> Option<Duration> {
    let mut conn = Conn::new(gateway);
    let bound = USER_TIMEOUT.as_millis() as u64 / POLL_EVERY.as_millis() as u64 + 1;
    for _ in 0..bound {
        if is_member(&mut conn, gateway, AUDIENCE, &user).await {
            return Some(t0.elapsed());
        }
        if stop.load(Ordering::Relaxed) || t0.elapsed() > USER_TIMEOUT {
            return None;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    None
}

/// Whether the agent's `/v1/audiences` answer lists [`AUDIENCE`].
fn lists_audience(r: &Response) -> bool {
    r.status == 200
        && serde_json::from_slice::<serde_json::Value>(&r.body).is_ok_and(|v| {
            v["audiences"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == AUDIENCE))
        })
}

async fn latency_phase(bench: &Bench) -> Result<Latency> {
    let n = bench.args.users;
    let extra = format!(
        "\n[[audiences]]\nname = \"{AUDIENCE}\"\nwhen = {{ did = \"{TRIGGER}\", within = \"7d\" }}\n"
    );
    let (mut gw, mqtt, gw_http) = bench.gateway("latency", &extra).await?;
    let dir = bench.dir.join("latency");
    let agent_addr = free_addr()?;
    let agent_text = agent_config(agent_addr, mqtt, &dir.join("gateway-data").join("pki"));
    edge_agent::config::AgentConfig::parse(&agent_text, &dir.join("agent.toml"))
        .context("the generated agent config")?;
    std::fs::write(dir.join("agent.toml"), &agent_text).context("write agent.toml")?;
    let mut agent = Daemon::start(
        "agent",
        &bench.agent_bin,
        &dir.join("agent.toml"),
        &dir.join("agent-data"),
        &dir.join("agent.log"),
    )?;
    let result = latency_run(bench, n, &mut agent, agent_addr, &mut gw, gw_http).await;
    if result.is_err() {
        println!("agent log tail:\n{}", agent.log_tail());
        println!("gateway log tail:\n{}", gw.log_tail());
    }
    let mut lat = result?;
    lat.gateway_rss_kib = proc_status_kib(gw.pid, "VmHWM").unwrap_or(0);
    lat.agent_rss_kib = proc_status_kib(agent.pid, "VmHWM").unwrap_or(0);
    agent.terminate()?;
    gw.terminate()?;
    Ok(lat)
}

async fn latency_run(
    bench: &Bench,
    n: u64,
    agent: &mut Daemon,
    agent_addr: SocketAddr,
    gw: &mut Daemon,
    gw_http: SocketAddr,
) -> Result<Latency> {
    agent.wait_healthy(agent_addr).await?;
    let start = Instant::now();
    for _ in 0..MAX_READINGS {
        if gauges(gw_http).await?.devices >= 1 {
            break;
        }
        if start.elapsed() > CONNECT_TIMEOUT {
            bail!("the agent did not connect to the gateway within {CONNECT_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "      agent connected after {:.0} ms",
        start.elapsed().as_secs_f64() * 1000.0
    );

    // Every user is seen on the device first: the gateway learns which device holds
    // them, and their profiles exist before the measured event.
    let mut conn = Conn::new(agent_addr);
    let users: Vec<u64> = (0..n).collect();
    for chunk in users.chunks(IDENTIFY_BATCH) {
        let events: Vec<String> = chunk
            .iter()
            .map(|&i| {
                let u = user_id(i);
                format!(
                    r#"{{"type":"identify","userId":"{u}","messageId":"id-{u}","traits":{{"email":"{u}@example.org","plan":"{}"}}}}"#,
                    PLANS[(i % 3) as usize]
                )
            })
            .collect();
        let body = format!(r#"{{"batch":[{}]}}"#, events.join(","));
        ok(
            &mut conn,
            &raw_request(agent_addr, "POST", "/v1/batch", &body, true),
            "identify through the agent",
        )
        .await?;
    }
    // A sentinel after them: once it is a member, the engine is past every identify
    // (and the whole path has run once).
    let sentinel = format!(
        r#"{{"type":"track","event":"{TRIGGER}","userId":"{SENTINEL}","messageId":"lvl-{SENTINEL}"}}"#
    );
    ok(
        &mut conn,
        &raw_request(agent_addr, "POST", "/v1/track", &sentinel, true),
        "the sentinel track",
    )
    .await?;
    let took = settle(gw_http, AUDIENCE, SENTINEL, SETTLE_TIMEOUT).await?;
    println!(
        "      {n} users identified through the agent; gateway settled after {:.0} ms ({} profiles)",
        took.as_secs_f64() * 1000.0,
        gauges(gw_http).await?.profiles
    );

    let mut lat = Latency::default();
    let machine = Machine::start(&[agent.pid, gw.pid]);
    let mut poll = Conn::new(agent_addr);
    for i in 0..n {
        let u = user_id(i);
        let track = format!(
            r#"{{"type":"track","event":"{TRIGGER}","userId":"{u}","messageId":"lvl-{u}","properties":{{"level":{}}}}}"#,
            i % 20
        );
        let post = raw_request(agent_addr, "POST", "/v1/track", &track, true);
        let query = Request::get(agent_addr, &format!("/v1/audiences?userId={u}"));
        let stop = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        ok(&mut conn, &post, "the trigger POST /v1/track").await?;
        lat.ack_ms.push(ms(t0.elapsed()));
        let watcher = bench
            .args
            .split
            .then(|| tokio::spawn(watch_gateway(gw_http, u.clone(), t0, Arc::clone(&stop))));
        let mut seen = None;
        let bound = USER_TIMEOUT.as_millis() as u64 / POLL_EVERY.as_millis() as u64 + 1;
        for _ in 0..bound {
            let r = poll.request(&query.bytes).await?;
            if lists_audience(&r) {
                seen = Some(t0.elapsed());
                break;
            }
            if t0.elapsed() > USER_TIMEOUT {
                break;
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
        stop.store(true, Ordering::Relaxed);
        let at_gateway = match watcher {
            Some(w) => w.await.ok().flatten(),
            None => None,
        };
        match seen {
            Some(d) => {
                lat.device_ms.push(ms(d));
                if let Some(g) = at_gateway {
                    lat.gateway_ms.push(ms(g));
                    lat.downlink_ms.push(ms(d) - ms(g));
                }
            }
            None => {
                lat.missed += 1;
                println!("      {u}: not on the device within {USER_TIMEOUT:?}");
            }
        }
        if let Some(status) = agent.exited()? {
            bail!("the agent exited ({status})");
        }
        if let Some(status) = gw.exited()? {
            bail!("the gateway exited ({status})");
        }
        let next = t0 + PACE;
        if Instant::now() < next {
            tokio::time::sleep_until(next.into()).await;
        }
    }
    lat.machine = machine.finish();
    Ok(lat)
}

// ---------------------------------------------------------------------------------
// Phase 2: sweep over many profiles

#[derive(Debug)]
struct Sweep {
    /// What the moment was (e.g. "+2h").
    label: &'static str,
    profiles: u64,
    changes: u64,
    gateway_ms: u64,
    client: Duration,
}

#[derive(Debug, Default)]
struct SweepPhase {
    accepted: Duration,
    caught_up: Duration,
    failures: u64,
    first_failure: Option<String>,
    sweeps: Vec<Sweep>,
    gateway_rss_kib: u64,
    data_mib: f64,
    machine_ingest: String,
    machine_sweeps: String,
}

/// User `i`'s one event of phase 2.
fn profile_event(out: &mut String, i: u64) {
    use std::fmt::Write as _;
    let consent = if i.is_multiple_of(2) {
        r#","context":{"consent":{"categoryPreferences":{"advertising":true,"analytics":true}}}"#
    } else {
        ""
    };
    let _ = write!(
        out,
        r#"{{"type":"track","messageId":"sw-{i}","userId":"u{i:07}","event":"{}","traits":{{"plan":"{}","country":"{}","age":{}}},"properties":{{"level":{},"revenue":{}.5}}{consent}}}"#,
        EVENTS[(i % 4) as usize],
        PLANS[((i / 4) % 3) as usize],
        COUNTRIES[((i / 7) % 5) as usize],
        18 + i % 50,
        i % 20,
        (i * 37) % 250,
    );
}

/// One connection's share of the users (`i % SWEEP_CONNECTIONS == lane`), in batches.
async fn ingest_lane(gateway: SocketAddr, lane: u64, profiles: u64) -> (u64, Option<String>) {
    let mut conn = Conn::new(gateway);
    let mut failures = 0;
    let mut first = None;
    let mut i = lane;
    let mut body = String::with_capacity(64 * 1024);
    let max_requests = profiles / SWEEP_CONNECTIONS / SWEEP_BATCH + 2;
    for _ in 0..max_requests {
        if i >= profiles {
            break;
        }
        body.clear();
        body.push_str(r#"{"batch":["#);
        for k in 0..SWEEP_BATCH {
            if i >= profiles {
                break;
            }
            if k > 0 {
                body.push(',');
            }
            profile_event(&mut body, i);
            i += SWEEP_CONNECTIONS;
        }
        body.push_str("]}");
        let raw = raw_request(gateway, "POST", "/v1/batch", &body, true);
        // A refused batch is retried once (a transient overload is not a lost user).
        for attempt in 0..2 {
            match conn.request(&raw).await {
                Ok(r) if r.status == 200 => break,
                Ok(r) => {
                    first.get_or_insert_with(|| {
                        format!("HTTP {}: {}", r.status, String::from_utf8_lossy(&r.body))
                    });
                }
                Err(e) => {
                    first.get_or_insert_with(|| format!("{e:#}"));
                }
            }
            if attempt == 1 {
                failures += 1;
            } else {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    (failures, first)
}

async fn sweep_once(gateway: SocketAddr, label: &'static str) -> Result<Sweep> {
    let mut conn = Conn::new(gateway);
    let raw = raw_request(gateway, "POST", "/v1/audiences/sweep", "", false);
    let t0 = Instant::now();
    // Longer than the client's usual request timeout: a slow sweep is a measurement.
    let r = tokio::time::timeout(SWEEP_TIMEOUT, conn.exchange(&raw))
        .await
        .map_err(|_| anyhow!("the sweep did not answer within {SWEEP_TIMEOUT:?}"))??;
    let client = t0.elapsed();
    if r.status != 200 {
        bail!(
            "POST /v1/audiences/sweep: HTTP {}: {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&r.body).context("the sweep's answer is not JSON")?;
    let field = |k: &str| v[k].as_u64().or_else(|| v["report"][k].as_u64());
    Ok(Sweep {
        label,
        profiles: field("profiles").unwrap_or(0),
        changes: field("changes").unwrap_or(0),
        gateway_ms: field("elapsed_ms").unwrap_or(0),
        client,
    })
}

async fn advance(gateway: SocketAddr, by: &str) -> Result<()> {
    let raw = raw_request(
        gateway,
        "POST",
        &format!("/v1/clock?advance={by}"),
        "",
        false,
    );
    ok(&mut Conn::new(gateway), &raw, "POST /v1/clock").await?;
    Ok(())
}

fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

async fn sweep_phase(bench: &Bench) -> Result<SweepPhase> {
    let (mut gw, _mqtt, http) = bench.gateway("sweep", SWEEP_CONFIG).await?;
    let result = sweep_run(bench, http, gw.pid).await;
    if result.is_err() {
        println!("gateway log tail:\n{}", gw.log_tail());
    }
    let mut phase = result?;
    phase.gateway_rss_kib = proc_status_kib(gw.pid, "VmHWM").unwrap_or(0);
    phase.data_mib = dir_size(&bench.dir.join("sweep").join("gateway-data")) as f64 / 1048576.0;
    gw.terminate()?;
    Ok(phase)
}

async fn sweep_run(bench: &Bench, gateway: SocketAddr, gateway_pid: u32) -> Result<SweepPhase> {
    let p = bench.args.profiles;
    let mut phase = SweepPhase::default();
    let machine = Machine::start(&[gateway_pid]);
    let t0 = Instant::now();
    let lanes: Vec<_> = (0..SWEEP_CONNECTIONS)
        .map(|lane| tokio::spawn(ingest_lane(gateway, lane, p)))
        .collect();
    // Progress while the lanes run.
    let mut last = 0;
    for _ in 0..MAX_READINGS {
        if lanes.iter().all(|l| l.is_finished()) || t0.elapsed() > INGEST_TIMEOUT {
            break;
        }
        tokio::time::sleep(WATCH_EVERY).await;
        let secs = t0.elapsed().as_secs();
        if secs >= last + 10 {
            last = secs;
            if let Ok(g) = gauges(gateway).await {
                println!(
                    "      {secs:>4} s: {} profiles, {} events in the inbox",
                    thousands(g.profiles as f64),
                    thousands(g.inbox as f64)
                );
            }
        }
    }
    for lane in lanes {
        let (failures, first) = lane.await.context("an ingest lane")?;
        phase.failures += failures;
        if phase.first_failure.is_none() {
            phase.first_failure = first;
        }
    }
    phase.accepted = t0.elapsed();
    println!(
        "      {} events accepted in {:.1} s ({} ev/s); failed batches {}{}",
        thousands(p as f64),
        phase.accepted.as_secs_f64(),
        thousands(p as f64 / phase.accepted.as_secs_f64()),
        phase.failures,
        phase
            .first_failure
            .as_deref()
            .map_or(String::new(), |f| format!(" (first: {f})"))
    );
    // The sentinel, sent after every lane's events were accepted: a `pro` member once
    // the engine has evaluated all of them.
    let sentinel = format!(
        r#"{{"batch":[{{"type":"track","messageId":"sw-{SENTINEL}","userId":"{SENTINEL}","event":"Level Up","traits":{{"plan":"pro"}}}}]}}"#
    );
    ok(
        &mut Conn::new(gateway),
        &raw_request(gateway, "POST", "/v1/batch", &sentinel, true),
        "the sentinel batch",
    )
    .await?;
    settle(
        gateway,
        "pro",
        SENTINEL,
        INGEST_TIMEOUT.saturating_sub(t0.elapsed()),
    )
    .await?;
    phase.caught_up = t0.elapsed();
    phase.machine_ingest = machine.finish();
    println!(
        "      pipeline caught up after {:.1} s ({} profiles/s); {}",
        phase.caught_up.as_secs_f64(),
        thousands(p as f64 / phase.caught_up.as_secs_f64()),
        phase.machine_ingest
    );
    println!("      sizes: {}", sizes(gateway).await?);

    let machine = Machine::start(&[gateway_pid]);
    for (by, label) in [
        (Some("2h"), "+2h (before 1h due, within 1h expires)"),
        (Some("8d"), "+8d more (every 7d window expires)"),
        (None, "again at once (nothing due)"),
    ] {
        if let Some(by) = by {
            advance(gateway, by).await?;
        }
        let s = sweep_once(gateway, label).await?;
        println!(
            "      sweep {label}: {} profiles, {} changes, gateway {} ms, client {:.0} ms",
            thousands(s.profiles as f64),
            thousands(s.changes as f64),
            s.gateway_ms,
            s.client.as_secs_f64() * 1000.0
        );
        println!("      sizes: {}", sizes(gateway).await?);
        phase.sweeps.push(s);
    }
    phase.machine_sweeps = machine.finish();
    println!("      machine during the sweeps: {}", phase.machine_sweeps);
    Ok(phase)
}

// ---------------------------------------------------------------------------------
// Report

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The `p`th percentile (nearest rank) of `samples`, which it sorts.
fn quantile(samples: &mut [f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

fn spread(samples: &mut [f64]) -> String {
    if samples.is_empty() {
        return "n/a".into();
    }
    format!(
        "p50 {:.1} / p95 {:.1} / p99 {:.1} / max {:.1} ms",
        quantile(samples, 50.0),
        quantile(samples, 95.0),
        quantile(samples, 99.0),
        quantile(samples, 100.0)
    )
}

fn latency_rows(lat: &mut Latency, users: u64) -> Vec<Row> {
    let p50 = quantile(&mut lat.device_ms, 50.0);
    let p99 = quantile(&mut lat.device_ms, 99.0);
    let all = lat.missed == 0;
    vec![
        row(
            "device membership p50 (event -> agent answer)",
            format!("{p50:.1} ms"),
            "<= 100 ms",
            Some(p50 <= TARGET_DEVICE_P50_MS && all),
        ),
        row(
            "device membership p99 (event -> agent answer)",
            format!("{p99:.1} ms"),
            "<= 100 ms",
            Some(p99 <= TARGET_DEVICE_P99_MS && all),
        ),
        row("  device: spread", spread(&mut lat.device_ms), "", None),
        row(
            "  users measured / not shown in 10 s",
            format!("{} / {}", lat.device_ms.len(), lat.missed),
            &format!("{users} / 0"),
            None,
        ),
        row(
            "  event -> gateway member (admin API)",
            spread(&mut lat.gateway_ms),
            "",
            None,
        ),
        row(
            "  gateway member -> device answer",
            spread(&mut lat.downlink_ms),
            "",
            None,
        ),
        row(
            "  agent's answer to the trigger POST",
            spread(&mut lat.ack_ms),
            "",
            None,
        ),
        row(
            "  peak RSS gateway / agent",
            format!(
                "{:.0} / {:.0} MiB",
                mib(lat.gateway_rss_kib),
                mib(lat.agent_rss_kib)
            ),
            "",
            None,
        ),
    ]
}

fn sweep_rows(phase: &SweepPhase, profiles: u64) -> Vec<Row> {
    let mut rows = Vec::new();
    // The headline: the sweep that evaluated the most profiles.
    let worst = phase.sweeps.iter().max_by_key(|s| s.profiles);
    if let Some(s) = worst {
        let secs = s.client.as_secs_f64();
        rows.push(row(
            &format!(
                "sweep over {} profiles, 10 audiences",
                thousands(s.profiles as f64)
            ),
            format!("{secs:.2} s"),
            "<= 10 s",
            Some(secs <= TARGET_SWEEP_S && s.profiles >= profiles),
        ));
    }
    for s in &phase.sweeps {
        rows.push(row(
            &format!("  sweep {}", s.label),
            format!(
                "{:.2} s: {} profiles, {} changes (gateway {} ms)",
                s.client.as_secs_f64(),
                thousands(s.profiles as f64),
                thousands(s.changes as f64),
                s.gateway_ms
            ),
            "",
            None,
        ));
    }
    rows.push(row(
        "  ingest: events accepted / pipeline caught up",
        format!(
            "{:.1} s / {:.1} s ({} ev/s)",
            phase.accepted.as_secs_f64(),
            phase.caught_up.as_secs_f64(),
            thousands(profiles as f64 / phase.caught_up.as_secs_f64().max(1e-9))
        ),
        "",
        None,
    ));
    rows.push(row(
        "  ingest: failed batches",
        thousands(phase.failures as f64),
        "0",
        None,
    ));
    rows.push(row(
        "  gateway peak RSS (VmHWM) / data dir",
        format!(
            "{:.0} MiB / {:.0} MiB",
            mib(phase.gateway_rss_kib),
            phase.data_mib
        ),
        "",
        None,
    ));
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
    let mut builder = tempfile::Builder::new();
    builder.prefix("audbench-");
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
    let bench = Bench {
        gateway_bin: binary(&bin_dir, "edge-gateway")?,
        agent_bin: binary(&bin_dir, "edge-agent")?,
        dir: dir.clone(),
        args: args.clone(),
    };
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    println!(
        "audbench: gateway {}, agent {}; {cores} CPUs; data {}",
        bench.gateway_bin.display(),
        bench.agent_bin.display(),
        dir.display()
    );
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        println!("          load average before: {}", load.trim());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let mut rows = Vec::new();
    let mut machine = Vec::new();
    if args.latency {
        println!(
            "[1/2] device latency: {} users one by one, `{TRIGGER}` to the agent, its /v1/audiences polled every {} ms ...",
            args.users,
            POLL_EVERY.as_millis()
        );
        let mut lat = runtime.block_on(latency_phase(&bench))?;
        machine.push(format!("latency phase: {}", lat.machine));
        rows.extend(latency_rows(&mut lat, args.users));
    }
    if args.sweep {
        println!(
            "[2/2] sweep: {} profiles (one event each, server-side /v1/batch of {SWEEP_BATCH} over {SWEEP_CONNECTIONS} connections), 10 audiences ...",
            thousands(args.profiles as f64)
        );
        let phase = runtime.block_on(sweep_phase(&bench))?;
        machine.push(format!("ingest: {}", phase.machine_ingest));
        machine.push(format!("sweeps: {}", phase.machine_sweeps));
        rows.extend(sweep_rows(&phase, args.profiles));
    }
    drop(runtime);
    println!();
    println!("SUMMARY");
    print_table(&rows);
    for m in &machine {
        println!("machine, {m}");
    }
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
