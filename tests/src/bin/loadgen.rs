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

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use edge_tests::bench::{
    batch_body, closed_loop, free_addr, mib, paced_loop, print_table, proc_status_kib, row,
    thousands, Conn, CpuReport, CpuWindow, Daemon, IdGen, Percentiles, Request, RssSampler, Tally,
    ID_PLACEHOLDER, WRITE_KEY,
};

/// Cap on events written by the redb baseline.
const MAX_BASELINE_EVENTS: u64 = 50_000_000;
/// Events per redb write transaction in the baseline.
const BASELINE_TXN_EVENTS: u64 = 100;
/// Distinct pre-encoded events the baseline cycles through.
const BASELINE_POOL: usize = 1000;

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

async fn agent_phases(agent: &mut Daemon, addr: SocketAddr, args: &Args) -> Result<AgentResults> {
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
            event.lane = config.spool.default_lane.as_str().into();
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
    let mut agent = Daemon::start(
        "agent",
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
