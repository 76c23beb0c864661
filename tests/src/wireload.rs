//! A load generator that speaks the agent → gateway uplink itself: MQTT over mutual
//! TLS with a device certificate, [`UplinkBatch`] frames (LZ4) on `edge/<device>/up` at
//! QoS 1 with a window of unacknowledged batches, settled by the gateway's [`Ack`]
//! frames on `edge/<device>/ack`. It has no spool and never resends: it stands in for
//! a fleet of agents so that a benchmark's CPU goes to the gateway rather than to
//! agents sharing its machine. It is not a test double of the agent; it keeps the
//! sender's promises of `edge_agent::wire::uplink` so the gateway treats it as one:
//!
//! - one lane (`default`) per device, seqs increasing without gaps, from 1 on a
//!   device's first run and on from where the previous run ended after that;
//! - `floor` is the lowest seq not yet acknowledged: it never decreases and no event
//!   of a batch is below it;
//! - `drops` are zero (nothing is ever dropped here).
//!
//! Events are Segment-like, shaped as the agent's Segment parser makes them: track
//! events of four kinds (name, five or six properties, a context with app, device,
//! library, OS and locale) and identify events (traits with email, plan, name,
//! country), each for one user: `userId` = the customer id, a stable anonymous id per
//! user, and a consent snapshot granting [`PURPOSE`].
//!
//! Bounded: a device runs until its plan is done or [`Control::stop`] is set, every
//! wait (CONNACK, SUBACK, an ack, the pipeline gate) has a deadline, and the channels
//! between the MQTT event loop and the driver are bounded.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use edge_agent::model::{
    now_ms, ConsentSnapshot, DeviceId, Event, EventId, EventKind, Map, Seq, Source, Str, Value,
};
use edge_agent::spool::Drops;
use edge_agent::wire::{self, Ack, Compression, Topics, UplinkBatch};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rumqttc::{
    AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS, SubscribeReasonCode,
    TlsConfiguration, Transport,
};
use tokio::sync::mpsc;

/// The lane every generated event is in.
pub const LANE: &str = "default";
/// The consent purpose every generated event's snapshot grants.
pub const PURPOSE: &str = "analytics";
/// Longest wait for CONNACK and for SUBACK.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for the ack of the oldest batch in flight; a gateway that takes longer
/// is reported as failing rather than waited on.
const ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest the pipeline gate ([`Control::limit`]) may hold a device back. Past it the
/// destinations are considered stuck and the run fails.
const GATE_TIMEOUT: Duration = Duration::from_secs(600);
/// How often a gated device looks at the gate again.
const GATE_POLL: Duration = Duration::from_millis(5);
/// Network events queued from the MQTT event loop task to the driver.
const NET_QUEUE: usize = 256;
/// Largest MQTT packet either way (the gateway's default limit is 4 MiB).
const MAX_PACKET: usize = 8 << 20;

/// One simulated agent.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// Device id: the CN of its certificate and its MQTT client id.
    pub device: String,
    /// The gateway's MQTT/TLS endpoint.
    pub mqtt: SocketAddr,
    /// The gateway's PKI dir: `ca.pem` and `devices/<device>.pem|.key`.
    pub pki: PathBuf,
    /// Most batches sent and not yet acknowledged.
    pub window: usize,
    /// Events per uplink frame.
    pub batch_events: usize,
    /// The seq of the first event: 1 on a device's first run, else the previous
    /// run's [`DeviceReport::next_seq`]. The gateway remembers each lane's floor, so
    /// seqs starting over would be taken for resends and acked without being stored.
    pub first_seq: u64,
}

/// What a device sends.
#[derive(Debug, Clone, Copy)]
pub enum Plan {
    /// One identify event for each user in `first..end`, then done.
    Seed { first: u64, end: u64 },
    /// Events until [`Control::stop`], each for user `r * stride` with `r` drawn
    /// uniformly from `0..users`: `users` distinct users, every `stride`-th one
    /// (stride 1: users `0..users`; 0 is taken as 1). One event in `identify_every`
    /// is an identify, the rest are tracks. A user is the same person as in
    /// [`Plan::Seed`] (same customer id, anonymous id and email), so a mix whose
    /// `(users - 1) * stride` is below a seed's `end` only has users that seed made.
    Mix {
        users: u64,
        stride: u64,
        identify_every: usize,
    },
}

/// Counters of all devices of a run, read by the benchmark while it runs.
#[derive(Debug, Default)]
pub struct Counters {
    pub sent_events: AtomicU64,
    pub sent_batches: AtomicU64,
    pub acked_events: AtomicU64,
    pub rejected_events: AtomicU64,
    /// Uplink frame bytes published (MQTT payloads).
    pub wire_bytes: AtomicU64,
}

/// Shared by the devices of a run: the pipeline gate and the stop signal.
#[derive(Debug)]
pub struct Control {
    /// Devices send a batch only while `Counters::sent_events` plus its events stays
    /// within this. The benchmark sets it to what the destinations have delivered plus
    /// a window, so the offered load follows the whole pipeline (a closed loop) and
    /// the gateway's inbox backlog stays bounded. `u64::MAX`: no gate.
    pub limit: AtomicU64,
    /// Stop sending; wait for the acks of what is in flight, then disconnect.
    pub stop: AtomicBool,
}

impl Default for Control {
    fn default() -> Self {
        Control {
            limit: AtomicU64::new(u64::MAX),
            stop: AtomicBool::new(false),
        }
    }
}

/// How one device's run ended.
#[derive(Debug, Clone, Default)]
pub struct DeviceReport {
    pub device: String,
    pub sent_events: u64,
    pub acked_events: u64,
    pub rejected_events: u64,
    /// Time from CONNACK to the last ack.
    pub elapsed: Duration,
    /// The seq the device's next run starts at.
    pub next_seq: u64,
}

/// What the MQTT event loop task hands the driver.
#[derive(Debug)]
enum Net {
    Connected,
    Subscribed(Vec<SubscribeReasonCode>),
    Message(Vec<u8>),
    Failed(String),
}

/// A batch sent and not yet settled: seqs `first..=last` (contiguous: one lane).
#[derive(Debug)]
struct InFlight {
    first: u64,
    last: u64,
    sent: Instant,
}

/// Connects as `cfg.device`, sends `plan` and waits for every ack. Fails on a lost
/// connection, a refused subscription or an ack that does not come within a minute:
/// without a spool there is nothing to resend, and a benchmark must not hide those.
pub async fn run_device(
    cfg: DeviceConfig,
    plan: Plan,
    counters: Arc<Counters>,
    control: Arc<Control>,
) -> Result<DeviceReport> {
    let device = DeviceId(cfg.device.clone());
    let topics = Topics::new(Topics::DEFAULT_TEMPLATE)
        .and_then(|t| t.for_device(&device))
        .map_err(|e| anyhow!("topics for `{}`: {e}", cfg.device))?;
    let tls = edge_agent::uplink::tls::client_config(
        &cfg.pki.join("ca.pem"),
        &cfg.pki.join(format!("devices/{}.pem", cfg.device)),
        &cfg.pki.join(format!("devices/{}.key", cfg.device)),
    )
    .with_context(|| format!("TLS client config of `{}`", cfg.device))?;
    let mut opts = MqttOptions::new(
        cfg.device.clone(),
        cfg.mqtt.ip().to_string(),
        cfg.mqtt.port(),
    );
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(true);
    opts.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    opts.set_inflight(u16::try_from(cfg.window + 8).unwrap_or(u16::MAX));
    let (client, mut eventloop) = AsyncClient::new(opts, cfg.window + 8);
    let (tx, mut rx) = mpsc::channel::<Net>(NET_QUEUE);
    let poller = tokio::spawn(async move {
        loop {
            let net = match eventloop.poll().await {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => Net::Connected,
                Ok(MqttEvent::Incoming(Packet::SubAck(s))) => Net::Subscribed(s.return_codes),
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => Net::Message(p.payload.to_vec()),
                Ok(_) => continue,
                Err(e) => {
                    let _ = tx.send(Net::Failed(e.to_string())).await;
                    return;
                }
            };
            if tx.send(net).await.is_err() {
                return;
            }
        }
    });
    let result = drive(&cfg, &topics, &client, &mut rx, plan, &counters, &control).await;
    // A clean DISCONNECT: the event loop sends it and then ends. Nothing is in flight
    // any more, so nothing is lost by no longer reading what it hands over.
    let _ = client.try_disconnect();
    drop(rx);
    let mut poller = poller;
    if tokio::time::timeout(Duration::from_secs(1), &mut poller)
        .await
        .is_err()
    {
        poller.abort();
    }
    result.with_context(|| format!("device `{}`", cfg.device))
}

async fn next_net(rx: &mut mpsc::Receiver<Net>, what: &str) -> Result<Net> {
    match tokio::time::timeout(CONNECT_TIMEOUT, rx.recv()).await {
        Ok(Some(Net::Failed(e))) => bail!("{what}: {e}"),
        Ok(Some(net)) => Ok(net),
        Ok(None) => bail!("{what}: the MQTT event loop ended"),
        Err(_) => bail!("{what}: nothing within {CONNECT_TIMEOUT:?}"),
    }
}

async fn drive(
    cfg: &DeviceConfig,
    topics: &wire::DeviceTopics,
    client: &AsyncClient,
    rx: &mut mpsc::Receiver<Net>,
    plan: Plan,
    counters: &Counters,
    control: &Control,
) -> Result<DeviceReport> {
    loop {
        if let Net::Connected = next_net(rx, "waiting for CONNACK").await? {
            break;
        }
    }
    client
        .subscribe(topics.ack(), QoS::AtLeastOnce)
        .await
        .context("subscribe to the ack topic")?;
    loop {
        if let Net::Subscribed(codes) = next_net(rx, "waiting for SUBACK").await? {
            if codes
                .iter()
                .any(|c| matches!(c, SubscribeReasonCode::Failure))
            {
                bail!("the gateway refused the subscription to {}", topics.ack());
            }
            break;
        }
    }
    let started = Instant::now();
    let mut gen = EventGen::new(&cfg.device, plan, cfg.batch_events);
    let mut report = DeviceReport {
        device: cfg.device.clone(),
        ..DeviceReport::default()
    };
    let mut next_seq = cfg.first_seq.max(1);
    let mut in_flight: VecDeque<InFlight> = VecDeque::with_capacity(cfg.window);
    let mut gated_since: Option<Instant> = None;
    loop {
        let stopping = control.stop.load(Ordering::Relaxed);
        let mut gated = false;
        while !stopping && in_flight.len() < cfg.window {
            let n = gen.next_len();
            if n == 0 {
                break;
            }
            let sent = counters.sent_events.load(Ordering::Relaxed);
            if sent.saturating_add(n as u64) > control.limit.load(Ordering::Relaxed) {
                gated = true;
                break;
            }
            let floor = in_flight.front().map_or(next_seq, |b| b.first);
            let frame = gen.frame(floor, next_seq, n)?;
            let bytes = frame.len() as u64;
            client
                .publish(topics.up(), QoS::AtLeastOnce, false, frame)
                .await
                .context("publish a batch")?;
            let last = next_seq + n as u64 - 1;
            in_flight.push_back(InFlight {
                first: next_seq,
                last,
                sent: Instant::now(),
            });
            next_seq = last + 1;
            report.sent_events += n as u64;
            counters.sent_events.fetch_add(n as u64, Ordering::Relaxed);
            counters.sent_batches.fetch_add(1, Ordering::Relaxed);
            counters.wire_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        if gated {
            let since = *gated_since.get_or_insert_with(Instant::now);
            if since.elapsed() > GATE_TIMEOUT {
                bail!("held back by the pipeline gate for {GATE_TIMEOUT:?}: the destinations deliver nothing");
            }
        } else {
            gated_since = None;
        }
        let finished = stopping || gen.next_len() == 0;
        if finished && in_flight.is_empty() {
            break;
        }
        if let Some(oldest) = in_flight.front() {
            if oldest.sent.elapsed() > ACK_TIMEOUT {
                bail!(
                    "no ack for seqs {}..={} within {ACK_TIMEOUT:?}",
                    oldest.first,
                    oldest.last
                );
            }
        }
        // Wait for an ack; a gated device also wakes up soon to look at the gate.
        let wait = if gated && in_flight.len() < cfg.window {
            GATE_POLL
        } else {
            Duration::from_secs(1)
        };
        let net = match tokio::time::timeout(wait, rx.recv()).await {
            Ok(Some(net)) => net,
            Ok(None) => bail!("the MQTT event loop ended"),
            Err(_) => continue,
        };
        match net {
            Net::Message(payload) => {
                let ack = wire::decode_ack(&payload, wire::DEFAULT_MAX_FRAME)
                    .context("an undecodable ack")?;
                let (acked, rejected) = settle(&ack, &mut in_flight);
                report.acked_events += acked;
                report.rejected_events += rejected;
                counters.acked_events.fetch_add(acked, Ordering::Relaxed);
                counters
                    .rejected_events
                    .fetch_add(rejected, Ordering::Relaxed);
            }
            Net::Failed(e) => bail!("connection lost: {e}"),
            Net::Connected | Net::Subscribed(_) => {}
        }
    }
    report.elapsed = started.elapsed();
    report.next_seq = next_seq;
    Ok(report)
}

/// Removes the batches `ack` settles entirely (every seq acked or rejected); returns
/// the events acked and rejected in them.
fn settle(ack: &Ack, in_flight: &mut VecDeque<InFlight>) -> (u64, u64) {
    let (mut acked, mut rejected) = (0u64, 0u64);
    in_flight.retain(|b| {
        let whole = ack
            .acked
            .iter()
            .any(|r| r.first.0 <= b.first && b.last <= r.last.0);
        if whole {
            acked += b.last - b.first + 1;
            return false;
        }
        let (mut a, mut r) = (0u64, 0u64);
        for s in b.first..=b.last {
            if ack.covers(Seq(s)) {
                a += 1;
            } else if ack.rejection(Seq(s)).is_some() {
                r += 1;
            } else {
                return true;
            }
        }
        acked += a;
        rejected += r;
        false
    });
    (acked, rejected)
}

// ---------------------------------------------------------------------------------
// Events

/// Makes the frames of one device. Events live in reusable slots: each batch
/// rewrites their ids, seqs, times, users and a few property values in place rather
/// than building events anew, so the generator stays cheap next to the gateway.
#[derive(Debug)]
struct EventGen {
    device: DeviceId,
    plan: Plan,
    rng: StdRng,
    id_hi: u64,
    id_next: u64,
    /// Plan::Seed: the next user to identify.
    seed_next: u64,
    /// One batch of events; for a mix, slot `i` is an identify iff
    /// `i % identify_every == 0`.
    slots: Vec<Event>,
}

impl EventGen {
    fn new(device: &str, plan: Plan, batch_events: usize) -> Self {
        let mut rng = StdRng::from_rng(&mut rand::rng());
        let device = DeviceId(device.to_owned());
        let slots = (0..batch_events.max(1))
            .map(|i| {
                let identify = match plan {
                    Plan::Seed { .. } => true,
                    Plan::Mix { identify_every, .. } => i % identify_every.max(1) == 0,
                };
                if identify {
                    identify_template(&device, &mut rng)
                } else {
                    track_template(&device, &mut rng)
                }
            })
            .collect();
        let seed_next = match plan {
            Plan::Seed { first, .. } => first,
            Plan::Mix { .. } => 0,
        };
        EventGen {
            device,
            plan,
            id_hi: rng.random(),
            rng,
            id_next: 0,
            seed_next,
            slots,
        }
    }

    /// Events in the next batch; 0 when the plan is done.
    fn next_len(&self) -> usize {
        match self.plan {
            Plan::Seed { end, .. } => usize::try_from(end.saturating_sub(self.seed_next))
                .map_or(self.slots.len(), |left| left.min(self.slots.len())),
            Plan::Mix { .. } => self.slots.len(),
        }
    }

    /// The uplink frame of the next `n` events, seqs from `first_seq`.
    fn frame(&mut self, floor: u64, first_seq: u64, n: usize) -> Result<Vec<u8>> {
        let now = now_ms();
        let mut events = std::mem::take(&mut self.slots);
        let tail = events.split_off(n.min(events.len()));
        for (i, e) in events.iter_mut().enumerate() {
            let user = match self.plan {
                Plan::Seed { .. } => {
                    self.seed_next += 1;
                    self.seed_next - 1
                }
                Plan::Mix { users, stride, .. } => self
                    .rng
                    .random_range(0..users.max(1))
                    .saturating_mul(stride.max(1)),
            };
            e.id = self.next_id();
            e.seq = Seq(first_seq + i as u64);
            e.received_ms = now;
            e.timestamp_ms = now - self.rng.random_range(0..2_000);
            set_user(e, user);
            vary(e, &mut self.rng);
        }
        let batch = UplinkBatch {
            device: self.device.clone(),
            lane: LANE.to_owned(),
            floor: Seq(floor),
            sent_at_ms: now,
            drops: Drops::default(),
            events,
        };
        let frame = wire::encode_batch(&batch, Compression::Lz4);
        let mut events = batch.events;
        events.extend(tail);
        self.slots = events;
        Ok(frame?)
    }

    /// A fresh UUIDv4-shaped id: a random prefix per generator and a counter.
    fn next_id(&mut self) -> EventId {
        let mut v = (u128::from(self.id_hi) << 64) | u128::from(self.id_next);
        self.id_next += 1;
        v = (v & !(0xF_u128 << 76)) | (0x4_u128 << 76);
        v = (v & !(0x3_u128 << 62)) | (0x2_u128 << 62);
        EventId(v)
    }
}

/// The customer id of user `u` (Segment `userId`).
pub fn customer_id(u: u64) -> String {
    format!("cust-{u:07}")
}

/// The email of user `u` (identify `traits.email`).
pub fn email(u: u64) -> String {
    format!("user-{u:07}@example.org")
}

/// A stable anonymous id per user, shaped like the hex ids SDKs make.
fn write_anonymous_id(out: &mut impl std::fmt::Write, u: u64) {
    // splitmix64: distinct users get unrelated-looking ids.
    let mut z = u.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let _ = write!(out, "{z:016x}-{u:x}");
}

fn rewrite(slot: &mut Option<Str>, f: impl FnOnce(&mut Str)) {
    let s = slot.get_or_insert_with(Str::default);
    s.clear();
    f(s);
}

fn set_user(e: &mut Event, u: u64) {
    rewrite(&mut e.identities.user_id, |s| {
        let _ = write!(s, "cust-{u:07}");
    });
    rewrite(&mut e.identities.anonymous_id, |s| write_anonymous_id(s, u));
    if let Some(Value::String(s)) = e.traits.get_mut("email") {
        s.clear();
        let _ = write!(s, "user-{u:07}@example.org");
    }
    if let Some(Value::String(s)) = e.traits.get_mut("plan") {
        s.clear();
        s.push_str(["basic", "premium", "family"][(u % 3) as usize]);
    }
}

/// Changes the values a real stream changes from event to event.
fn vary(e: &mut Event, rng: &mut StdRng) {
    for (key, max) in [("position", 2640), ("results", 400), ("row", 12)] {
        if let Some(Value::Int(v)) = e.properties.get_mut(key) {
            *v = rng.random_range(0..max);
        }
    }
}

fn obj(pairs: Vec<(&str, Value)>) -> Value {
    Value::Object(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

fn s(v: impl Into<edge_agent::model::Str>) -> Value {
    Value::String(v.into())
}

fn context(device: &DeviceId, rng: &mut StdRng) -> Map {
    let Value::Object(m) = obj(vec![
        (
            "app",
            obj(vec![
                ("name", s("StreamBox")),
                ("version", s("4.2.0")),
                ("build", s("4200")),
            ]),
        ),
        (
            "device",
            obj(vec![
                ("id", s(format!("{device}-tv-{:04x}", rng.random::<u16>()))),
                ("manufacturer", s("Roku")),
                ("model", s("Ultra 4850")),
                ("type", s("tv")),
            ]),
        ),
        (
            "library",
            obj(vec![
                ("name", s("analytics-kotlin")),
                ("version", s("1.16.0")),
            ]),
        ),
        ("locale", s("en-GB")),
        (
            "os",
            obj(vec![("name", s("RokuOS")), ("version", s("12.5.0"))]),
        ),
    ]) else {
        return Map::new();
    };
    m
}

fn base_event(kind: EventKind, device: &DeviceId, rng: &mut StdRng) -> Event {
    let mut e = Event::new(kind, Source::Segment, now_ms());
    e.lane = LANE.into();
    e.identities.device_id = device.clone();
    e.context = context(device, rng);
    e.consent = ConsentSnapshot {
        granted: vec![PURPOSE.into()],
        ccpa_opt_out: false,
    };
    e
}

fn track_template(device: &DeviceId, rng: &mut StdRng) -> Event {
    let mut e = base_event(EventKind::Track, device, rng);
    let (name, properties) = match rng.random_range(0..4u8) {
        0 => (
            "Video Content Playing",
            obj(vec![
                (
                    "asset_id",
                    s(format!("ep-{}", rng.random_range(1000..9999))),
                ),
                ("title", s("The Long Road")),
                ("position", Value::Int(0)),
                ("total_length", Value::Int(2640)),
                ("quality", s("hd")),
            ]),
        ),
        1 => (
            "Product Viewed",
            obj(vec![
                (
                    "product_id",
                    s(format!("p-{}", rng.random_range(10_000..99_999))),
                ),
                (
                    "sku",
                    s(format!("SKU-{}", rng.random_range(100_000..999_999))),
                ),
                ("name", s("Wireless Remote")),
                (
                    "price",
                    Value::Float(f64::from(rng.random_range(5..200)) + 0.99),
                ),
                ("currency", s("EUR")),
                ("category", s("Accessories")),
            ]),
        ),
        2 => (
            "Button Clicked",
            obj(vec![
                ("button_id", s(format!("btn-{}", rng.random_range(1..500)))),
                ("screen", s("Home")),
                ("label", s("Continue Watching")),
                ("row", Value::Int(0)),
                ("column", Value::Int(rng.random_range(0..8))),
            ]),
        ),
        _ => (
            "Search Performed",
            obj(vec![
                (
                    "query",
                    s(format!("nature documentaries {}", rng.random_range(1..100))),
                ),
                ("results", Value::Int(0)),
                (
                    "filters",
                    obj(vec![
                        ("genre", s("documentary")),
                        ("year", Value::Int(2025)),
                    ]),
                ),
                ("sort", s("relevance")),
                ("page", Value::Int(1)),
            ]),
        ),
    };
    e.name = Some(name.into());
    if let Value::Object(p) = properties {
        e.properties = p;
    }
    e
}

fn identify_template(device: &DeviceId, rng: &mut StdRng) -> Event {
    let mut e = base_event(EventKind::Identify, device, rng);
    if let Value::Object(t) = obj(vec![
        ("email", s("")),
        ("plan", s("")),
        ("name", s("Sam Taylor")),
        ("country", s("GB")),
        ("marketing_opt_in", Value::Bool(rng.random())),
    ]) {
        e.traits = t;
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_agent::wire::{RejectReason, Rejected, SeqRange};

    fn range(first: u64, last: u64) -> SeqRange {
        SeqRange {
            first: Seq(first),
            last: Seq(last),
        }
    }

    fn flights(spans: &[(u64, u64)]) -> VecDeque<InFlight> {
        spans
            .iter()
            .map(|&(first, last)| InFlight {
                first,
                last,
                sent: Instant::now(),
            })
            .collect()
    }

    fn ack(acked: Vec<SeqRange>, rejected: Vec<Rejected>) -> Ack {
        Ack {
            device: DeviceId("d".into()),
            acked,
            rejected,
            gateway_time_ms: 0,
        }
    }

    #[test]
    fn an_ack_settles_only_the_batches_it_covers_entirely() {
        let mut f = flights(&[(1, 10), (11, 20), (21, 30)]);
        let (a, r) = settle(&ack(vec![range(1, 10), range(21, 25)], vec![]), &mut f);
        assert_eq!((a, r), (10, 0));
        let left: Vec<u64> = f.iter().map(|b| b.first).collect();
        assert_eq!(left, vec![11, 21]);
    }

    #[test]
    fn rejected_seqs_settle_a_batch_and_are_counted_apart() {
        let mut f = flights(&[(1, 4)]);
        let rej = Rejected {
            seq: Seq(3),
            reason: RejectReason::Invalid,
        };
        let (a, r) = settle(&ack(vec![range(1, 2), range(4, 4)], vec![rej]), &mut f);
        assert_eq!((a, r), (3, 1));
        assert!(f.is_empty());
    }

    #[test]
    fn seed_frames_identify_each_user_once_with_increasing_seqs() {
        let mut g = EventGen::new("load-1", Plan::Seed { first: 5, end: 12 }, 4);
        let mut seqs = Vec::new();
        let mut users = Vec::new();
        let mut next = 1;
        while g.next_len() > 0 {
            let n = g.next_len();
            let frame = g.frame(next, next, n).unwrap();
            let b = wire::decode_batch(&frame, wire::DEFAULT_MAX_FRAME).unwrap();
            assert_eq!(b.floor, Seq(next));
            assert_eq!(b.device, DeviceId("load-1".into()));
            for e in &b.events {
                assert_eq!(e.kind, EventKind::Identify);
                assert_eq!(e.lane, LANE);
                assert_eq!(e.consent.granted, vec![PURPOSE.to_owned()]);
                seqs.push(e.seq.0);
                users.push(e.identities.user_id.clone().unwrap());
                let email = e.traits.get_str("email").unwrap().to_owned();
                assert_eq!(email, super::email(users.len() as u64 + 4));
            }
            next += n as u64;
        }
        assert_eq!(seqs, (1..=7).collect::<Vec<_>>());
        let expected: Vec<String> = (5..12).map(customer_id).collect();
        assert_eq!(users, expected);
    }

    #[test]
    fn mix_frames_carry_fresh_ids_and_a_stable_anonymous_id_per_user() {
        let mut g = EventGen::new(
            "load-1",
            Plan::Mix {
                users: 3,
                stride: 1,
                identify_every: 4,
            },
            8,
        );
        let mut ids = std::collections::HashSet::new();
        let mut anon = std::collections::HashMap::new();
        let mut kinds = (0, 0);
        for round in 0..20u64 {
            let frame = g.frame(1, 1 + round * 8, 8).unwrap();
            let b = wire::decode_batch(&frame, wire::DEFAULT_MAX_FRAME).unwrap();
            for e in b.events {
                assert!(ids.insert(e.id), "ids are fresh");
                let user = e.identities.user_id.clone().unwrap();
                let a = e.identities.anonymous_id.clone().unwrap();
                assert_eq!(anon.entry(user).or_insert_with(|| a.clone()), &a);
                match e.kind {
                    EventKind::Identify => kinds.0 += 1,
                    EventKind::Track => {
                        kinds.1 += 1;
                        assert!(e.name.is_some() && e.properties.len() >= 5);
                    }
                    ref k => panic!("unexpected kind {k:?}"),
                }
            }
        }
        assert_eq!(anon.len(), 3, "users drawn from 0..3");
        let expected: std::collections::HashSet<String> = (0..3).map(customer_id).collect();
        assert_eq!(
            anon.keys()
                .map(ToString::to_string)
                .collect::<std::collections::HashSet<_>>(),
            expected
        );
        assert_eq!(kinds, (40, 120));
    }

    /// The customer id, anonymous id and email (identifies only) of each event of
    /// `frame`.
    fn identities(frame: &[u8]) -> Vec<(String, String, Option<String>)> {
        let b = wire::decode_batch(frame, wire::DEFAULT_MAX_FRAME).unwrap();
        b.events
            .iter()
            .map(|e| {
                (
                    e.identities.user_id.as_deref().unwrap().to_owned(),
                    e.identities.anonymous_id.as_deref().unwrap().to_owned(),
                    e.traits.get_str("email").map(str::to_owned),
                )
            })
            .collect()
    }

    #[test]
    fn mix_with_a_stride_draws_every_stride_th_user_as_the_seed_made_them() {
        let mut seed = EventGen::new("load-1", Plan::Seed { first: 0, end: 30 }, 30);
        let seeded: std::collections::HashMap<String, (String, Option<String>)> =
            identities(&seed.frame(1, 1, 30).unwrap())
                .into_iter()
                .map(|(user, anon, email)| (user, (anon, email)))
                .collect();
        let mut g = EventGen::new(
            "load-1",
            Plan::Mix {
                users: 3,
                stride: 10,
                identify_every: 4,
            },
            8,
        );
        let mut drawn = std::collections::HashSet::new();
        for round in 0..20u64 {
            for (user, anon, email) in identities(&g.frame(1, 1 + round * 8, 8).unwrap()) {
                let Some((seed_anon, seed_email)) = seeded.get(&user) else {
                    panic!("{user} is not one of the seed's users");
                };
                assert_eq!(&anon, seed_anon, "the seed's anonymous id of {user}");
                if email.is_some() {
                    assert_eq!(&email, seed_email, "the seed's email of {user}");
                }
                drawn.insert(user);
            }
        }
        let expected: std::collections::HashSet<String> =
            [0, 10, 20].into_iter().map(customer_id).collect();
        assert_eq!(drawn, expected, "users drawn from {{0, 10, 20}}");
    }
}
