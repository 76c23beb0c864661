//! The uplink: streams or batches spooled events to the gateway over MQTT/TLS and
//! deletes them only when the gateway's ack says they are durable there.
//!
//! rumqttc's own pending queue is never trusted: on every (re)connect each lane
//! forgets what was in flight and reads again from the spool; the gateway's
//! exactly-once admission makes resends harmless. Sending decisions live in
//! [`lanes`]; this module owns the MQTT client, timers and the spool calls.
//!
//! Downlink: incoming PUBLISHes are acknowledged by hand, only once handled: an ack
//! frame once its events left the spool, a control message or an audience update
//! once carried out and committed (the gateway keeps a control message queued until that PUBACK, so one
//! that failed here comes again after the next connect). After each connect the
//! lanes wait for the gateway's hello reply before sending: the gateway sends what
//! it queued for this device (e.g. a user's erasure) before that reply, so a purge
//! takes effect before the spool it concerns goes out. Without a reply within the ack
//! timeout the lanes send anyway. The hello carries the newest audience version the
//! spool file holds, so the gateway resends only the membership changes made since.

mod lanes;
pub mod tls;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::audiences::{Applied, AudienceApplyError};
use crate::consent::ConsentUpdate;
use crate::intake::Intake;

use crate::config::{UplinkConfig, UplinkMode};
use crate::model::{now_ms, DeviceId, Seq};
use crate::spool::Spool;
use crate::wire::{
    self, AudienceUpdate, Compression, Control, DeviceTopics, Downlink, Hello, Topics, UplinkBatch,
};
use lanes::LaneState;

/// MQTT requests queued in the client before `publish` waits.
const REQUEST_QUEUE: usize = 64;
/// Network events queued from the event loop task to the driver.
const NET_QUEUE: usize = 256;
/// Largest MQTT packet either way.
const MAX_PACKET: usize = 8 << 20;
/// Wake-up when nothing is pending, to check ack timeouts.
const IDLE_TICK: Duration = Duration::from_millis(200);

/// Why the uplink could not start.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("uplink.url `{0}`: expected mqtts://host:port")]
    Url(String),
    #[error(transparent)]
    Tls(#[from] tls::TlsConfigError),
    #[error("topics: {0}")]
    Topics(String),
}

/// What `GET /v1/status` shows of the uplink.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UplinkStatus {
    pub connected: bool,
    pub in_flight_batches: usize,
    pub last_ack_ms: Option<i64>,
    /// Gateway clock minus ours, from the last ack or hello reply.
    pub clock_skew_ms: Option<i64>,
    pub batches_sent: u64,
    pub events_acked: u64,
    pub events_rejected: u64,
    pub connects: u64,
    pub last_error: Option<String>,
    /// The gateway answered this connection's hello (lanes send only after it, or
    /// after the ack timeout).
    pub greeted: bool,
    /// Control messages from the gateway carried out (purges, consent).
    pub controls_applied: u64,
    /// Audience updates committed (stale resends not counted).
    pub audience_updates_applied: u64,
    /// Audience updates refused for breaking a cap (acknowledged, never applied).
    pub audience_updates_refused: u64,
}

/// Shared, readable status.
pub type SharedStatus = Arc<Mutex<UplinkStatus>>;

enum Net {
    Connected,
    Disconnected(String),
    Message(rumqttc::Publish),
}

/// The uplink task.
#[derive(Debug)]
pub struct Uplink {
    config: UplinkConfig,
    device: DeviceId,
    spool: Arc<Spool>,
    /// Carries out control messages (purge, consent); without it they are logged
    /// and acknowledged unapplied.
    intake: Option<Arc<Intake>>,
    status: SharedStatus,
}

fn parse_url(url: &str) -> Result<(String, u16), UplinkError> {
    let rest = url
        .strip_prefix("mqtts://")
        .ok_or_else(|| UplinkError::Url(url.to_owned()))?;
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| UplinkError::Url(url.to_owned()))?;
    let port = port
        .trim_end_matches('/')
        .parse()
        .map_err(|_| UplinkError::Url(url.to_owned()))?;
    Ok((
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port,
    ))
}

/// Exponential backoff with full jitter between `min` and the current cap.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    cap: Duration,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let cap = self.cap;
        self.cap = (self.cap * 2).min(self.max);
        let span = cap.saturating_sub(self.min).as_millis().max(1);
        let jitter = (uuid::Uuid::new_v4().as_u128() % span) as u64;
        self.min + Duration::from_millis(jitter)
    }

    fn reset(&mut self) {
        self.cap = self.min;
    }
}

impl Uplink {
    pub fn new(config: UplinkConfig, device: DeviceId, spool: Arc<Spool>) -> Self {
        Uplink {
            config,
            device,
            spool,
            intake: None,
            status: SharedStatus::default(),
        }
    }

    /// Carries out the gateway's control messages through `intake`.
    pub fn with_intake(mut self, intake: Arc<Intake>) -> Self {
        self.intake = Some(intake);
        self
    }

    pub fn status(&self) -> SharedStatus {
        Arc::clone(&self.status)
    }

    fn set_status(&self, f: impl FnOnce(&mut UplinkStatus)) {
        f(&mut self.status.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Runs until `shutdown`.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), UplinkError> {
        let (host, port) = parse_url(&self.config.url)?;
        let tls = tls::client_config(&self.config.ca, &self.config.cert, &self.config.key)?;
        let topics = Topics::new(&self.config.topic_prefix)
            .and_then(|t| t.for_device(&self.device))
            .map_err(|e| UplinkError::Topics(e.to_string()))?;
        let mut opts = MqttOptions::new(self.device.0.clone(), host, port);
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        opts.set_keep_alive(self.config.keep_alive);
        // No broker session: our spool is the session (see module doc).
        opts.set_clean_session(true);
        // PUBACK only once a message is handled (see the module doc).
        opts.set_manual_acks(true);
        opts.set_max_packet_size(MAX_PACKET, MAX_PACKET);
        let lane_names = self.spool.lane_names();
        let inflight = (self.config.window * lane_names.len() + 8).min(u16::MAX as usize) as u16;
        opts.set_inflight(inflight);
        let (client, mut eventloop) = AsyncClient::new(opts, REQUEST_QUEUE);

        let (net_tx, mut net_rx) = mpsc::channel(NET_QUEUE);
        let loop_token = shutdown.child_token();
        let mut backoff = Backoff {
            min: self.config.backoff_min,
            max: self.config.backoff_max,
            cap: self.config.backoff_min,
        };
        let poller = tokio::spawn({
            let token = loop_token.clone();
            async move {
                loop {
                    let polled = tokio::select! {
                        () = token.cancelled() => return,
                        r = eventloop.poll() => r,
                    };
                    let net = match polled {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            backoff.reset();
                            Net::Connected
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => Net::Message(p),
                        Ok(_) => continue,
                        Err(e) => {
                            let _ = net_tx.send(Net::Disconnected(e.to_string())).await;
                            let wait = backoff.next();
                            tokio::select! {
                                () = token.cancelled() => return,
                                () = tokio::time::sleep(wait) => {}
                            }
                            continue;
                        }
                    };
                    if net_tx.send(net).await.is_err() {
                        return;
                    }
                }
            }
        });

        let mut lanes: Vec<LaneState> = lane_names
            .iter()
            .map(|name| {
                let c = self.config.lanes.iter().find(|l| &l.name == name);
                LaneState::new(
                    name.clone(),
                    c.map_or(UplinkMode::Stream, |c| c.mode),
                    c.map_or(crate::config::default_linger(), |c| c.linger),
                    c.map_or(Duration::from_secs(30), |c| c.interval),
                    self.config.window,
                )
            })
            .collect();
        let mut committed = self.spool.committed();
        let mut connected = false;
        let mut bandwidth = ByteBucket::new(self.config.bandwidth_limit.0);
        let compression = if self.config.compression == "lz4" {
            Compression::Lz4
        } else {
            Compression::None
        };
        let mut wake = IDLE_TICK;
        // Until the hello reply (or this deadline), the lanes hold back.
        let mut hello_deadline: Option<Instant> = None;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                net = net_rx.recv() => match net {
                    None => break,
                    Some(Net::Connected) => {
                        connected = true;
                        for l in &mut lanes { l.reset(); }
                        hello_deadline = Some(Instant::now() + self.config.ack_timeout);
                        self.set_status(|s| { s.connected = true; s.connects += 1; s.last_error = None; s.greeted = false; });
                        info!(device = %self.device, "Uplink connected.");
                        self.on_connect(&client, &topics).await;
                    }
                    Some(Net::Disconnected(e)) => {
                        if connected {
                            warn!(error = %e, "Uplink disconnected; will reconnect.");
                        } else {
                            debug!(error = %e, "Uplink connect failed; backing off.");
                        }
                        connected = false;
                        for l in &mut lanes { l.reset(); }
                        hello_deadline = None;
                        self.set_status(|s| { s.connected = false; s.in_flight_batches = 0; s.last_error = Some(e); s.greeted = false; });
                    }
                    Some(Net::Message(publish)) => {
                        if self.on_message(&topics, &publish.topic, &publish.payload, &mut lanes).await {
                            // Never waits: a PUBACK the full request queue refuses only
                            // means the gateway sends that message again later.
                            if let Err(e) = client.try_ack(&publish) {
                                debug!(error = %e, "PUBACK not queued.");
                            }
                        }
                    }
                },
                _ = committed.changed() => {}
                () = tokio::time::sleep(wake) => {}
            }
            let greeted = self
                .status
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .greeted;
            let now = Instant::now();
            let held_until = hello_deadline.filter(|d| connected && !greeted && now < *d);
            if let Some(until) = held_until {
                wake = until.duration_since(now).min(IDLE_TICK);
            } else if connected {
                if !greeted && hello_deadline.take().is_some() {
                    warn!("No hello reply from the gateway in time; sending the spool anyway.");
                }
                wake = self
                    .pump(&client, &topics, &mut lanes, &mut bandwidth, compression)
                    .await;
            } else {
                wake = IDLE_TICK;
            }
        }
        loop_token.cancel();
        let _ = client.try_disconnect();
        let _ = poller.await;
        Ok(())
    }

    async fn on_connect(&self, client: &AsyncClient, topics: &DeviceTopics) {
        for t in [topics.ack(), topics.down()] {
            if let Err(e) = client.subscribe(t, QoS::AtLeastOnce).await {
                warn!(error = %e, "Subscribe failed.");
            }
        }
        let hello = Hello {
            device: self.device.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            // Read when sent: updates applied while disconnected do not exist, but a
            // reconnect after updates must not ask for them again.
            audiences_version: self.spool.audience_summary().version,
            config_version: 0,
            sent_at_ms: now_ms(),
        };
        match wire::encode_hello(&hello, Compression::None) {
            Ok(frame) => {
                if let Err(e) = client
                    .publish(topics.hello(), QoS::AtLeastOnce, false, frame)
                    .await
                {
                    warn!(error = %e, "Hello not sent.");
                }
            }
            Err(e) => warn!(error = %e, "Hello not encoded."),
        }
    }

    /// Handles one incoming message; returns whether it may be acknowledged (false
    /// only for a control message that failed for now and must come again).
    async fn on_message(
        &self,
        topics: &DeviceTopics,
        topic: &str,
        payload: &[u8],
        lanes: &mut [LaneState],
    ) -> bool {
        if topic == topics.ack() {
            let ack = match wire::decode_ack(payload, wire::DEFAULT_MAX_FRAME) {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "Undecodable ack ignored.");
                    return true;
                }
            };
            let now = now_ms();
            let (mut acked, mut rejected) = (0u64, 0u64);
            for lane in lanes.iter_mut() {
                let settled = lane.on_ack(&ack);
                if !settled.acked.is_empty() {
                    acked += settled.acked.len() as u64;
                    if let Err(e) = self.spool.remove(&lane.name, settled.acked).await {
                        warn!(lane = %lane.name, error = %e, "Acked events not removed; they will be resent and deduplicated.");
                    }
                }
                if !settled.rejected.is_empty() {
                    rejected += settled.rejected.len() as u64;
                    warn!(lane = %lane.name, count = settled.rejected.len(), "Gateway rejected events; dropping them (counted as invalid).");
                    if let Err(e) = self
                        .spool
                        .remove_rejected(&lane.name, settled.rejected)
                        .await
                    {
                        warn!(error = %e, "Rejected events not removed.");
                    }
                }
            }
            let in_flight = lanes.iter().map(LaneState::in_flight).sum();
            self.set_status(|s| {
                s.last_ack_ms = Some(now);
                s.clock_skew_ms = Some(ack.gateway_time_ms.saturating_sub(now));
                s.events_acked += acked;
                s.events_rejected += rejected;
                s.in_flight_batches = in_flight;
            });
        } else if topic == topics.down() {
            match wire::decode_downlink(payload, wire::DEFAULT_MAX_FRAME) {
                Ok(Downlink::HelloReply {
                    gateway_time_ms, ..
                }) => {
                    let skew = gateway_time_ms.saturating_sub(now_ms());
                    self.set_status(|s| {
                        s.clock_skew_ms = Some(skew);
                        s.greeted = true;
                    });
                }
                Ok(Downlink::Control(control)) => return self.apply_control(control).await,
                Ok(Downlink::Audiences(update)) => return self.apply_audiences(update).await,
                // It can never be carried out; sent again it would fail again.
                Err(e) => warn!(error = %e, "Undecodable downlink ignored."),
            }
        }
        true
    }

    /// Carries out a control message; false when it failed for now (spool error) and
    /// should come again.
    async fn apply_control(&self, control: Control) -> bool {
        let Some(intake) = &self.intake else {
            warn!("A control message arrived but this agent has no intake to apply it; ignored.");
            return true;
        };
        let done = match control {
            Control::PurgeUser { user_id } => match intake.purge_user(&user_id).await {
                Ok(p) => {
                    info!(
                        events = p.events,
                        consent = p.consent,
                        audiences = p.audiences,
                        devices = p.devices,
                        "A user's data was erased at the gateway's request."
                    );
                    true
                }
                Err(e) => {
                    warn!(error = %e, "User purge failed; the gateway sends it again after the next connect.");
                    false
                }
            },
            Control::SetConsent {
                subject,
                purposes,
                ccpa_opt_out,
                at_ms,
            } => {
                let update = ConsentUpdate {
                    purposes,
                    ccpa_opt_out,
                    at_ms,
                };
                match intake.set_consent(&subject, update).await {
                    Ok(changed) => {
                        debug!(changed, "Consent from the gateway applied.");
                        true
                    }
                    Err(e) => {
                        warn!(error = %e, "Consent from the gateway not applied; it comes again after the next connect.");
                        false
                    }
                }
            }
        };
        if done {
            self.set_status(|s| s.controls_applied += 1);
        }
        done
    }

    /// Stores an audience update; false when the commit failed for now and the update
    /// should come again (the gateway resends what the next hello shows missing).
    async fn apply_audiences(&self, update: AudienceUpdate) -> bool {
        let version = update.version;
        match self.spool.apply_audiences(update, now_ms()).await {
            Ok(Applied::Replaced { evicted }) => {
                if evicted > 0 {
                    info!(
                        evicted,
                        "Audience membership of least recently updated users forgotten (user cap)."
                    );
                }
                debug!(version, "Audience update applied.");
                self.set_status(|s| s.audience_updates_applied += 1);
                true
            }
            Ok(Applied::Stale { held }) => {
                debug!(
                    version,
                    held, "Audience update older than what the device holds; ignored."
                );
                true
            }
            // Sent again it would be refused again.
            Err(AudienceApplyError::Refused(e)) => {
                warn!(version, error = %e, "Audience update refused.");
                self.set_status(|s| s.audience_updates_refused += 1);
                true
            }
            Err(AudienceApplyError::Storage(e)) => {
                warn!(error = %e, "Audience update not stored; the gateway sends it again after the next connect.");
                false
            }
        }
    }

    /// Sends what the lanes allow; returns how long until the next check is due.
    async fn pump(
        &self,
        client: &AsyncClient,
        topics: &DeviceTopics,
        lanes: &mut [LaneState],
        bandwidth: &mut ByteBucket,
        compression: Compression,
    ) -> Duration {
        let mut wake = IDLE_TICK;
        let now = Instant::now();
        for lane in lanes.iter_mut() {
            if lane.timed_out(now, self.config.ack_timeout) {
                warn!(lane = %lane.name, "Ack timeout; resending the lane's unacked events.");
                lane.reset();
            }
            while lane.has_room() {
                let events = match self.spool.read(
                    &lane.name,
                    lane.next_after(),
                    self.config.max_batch_events,
                ) {
                    Ok(e) => e,
                    Err(e) => {
                        warn!(lane = %lane.name, error = %e, "Spool read failed.");
                        break;
                    }
                };
                let mut bytes = 0u64;
                let mut take = 0;
                for e in &events {
                    bytes += approx_size(e);
                    take += 1;
                    if bytes >= self.config.max_batch_bytes.0 {
                        break;
                    }
                }
                let full =
                    take == self.config.max_batch_events || bytes >= self.config.max_batch_bytes.0;
                let oldest = events.first().map_or(now, |e| {
                    let age = now_ms().saturating_sub(e.received_ms).max(0);
                    now.checked_sub(Duration::from_millis(age as u64))
                        .unwrap_or(now)
                });
                if !lane.should_send(take, full, oldest, now) {
                    if take > 0 {
                        wake = wake.min(lane.wait_hint());
                    }
                    break;
                }
                let mut events = events;
                events.truncate(take);
                let floor = match self.spool.first_seq(&lane.name) {
                    Ok(Some(f)) => f,
                    _ => events.first().map_or(Seq(0), |e| e.seq),
                };
                let seqs: Vec<Seq> = events.iter().map(|e| e.seq).collect();
                let batch = UplinkBatch {
                    device: self.device.clone(),
                    lane: lane.name.clone(),
                    floor,
                    sent_at_ms: now_ms(),
                    drops: self.spool.stats().drops,
                    events,
                };
                let frame = match wire::encode_batch(&batch, compression) {
                    Ok(f) => f,
                    Err(e) => {
                        warn!(lane = %lane.name, error = %e, "Batch not encoded.");
                        break;
                    }
                };
                if let Some(wait) = bandwidth.take(frame.len() as u64) {
                    tokio::time::sleep(wait).await;
                }
                if let Err(e) = client
                    .publish(topics.up(), QoS::AtLeastOnce, false, frame)
                    .await
                {
                    warn!(error = %e, "Publish failed.");
                    break;
                }
                lane.on_sent(seqs, Instant::now());
                self.set_status(|s| s.batches_sent += 1);
            }
            if lane.in_flight() > 0 {
                wake = wake.min(self.config.ack_timeout);
            }
        }
        let in_flight = lanes.iter().map(LaneState::in_flight).sum();
        self.set_status(|s| s.in_flight_batches = in_flight);
        wake
    }
}

/// Rough encoded size of an event, to cap batch bytes without encoding twice.
fn approx_size(e: &crate::model::Event) -> u64 {
    postcard::experimental::serialized_size(e).map_or(512, |n| n as u64)
}

/// Token bucket on bytes per second; `rate` 0 = unlimited.
#[derive(Debug)]
struct ByteBucket {
    rate: u64,
    tokens: f64,
    at: Instant,
}

impl ByteBucket {
    fn new(rate: u64) -> Self {
        ByteBucket {
            rate,
            tokens: rate as f64,
            at: Instant::now(),
        }
    }

    fn take(&mut self, n: u64) -> Option<Duration> {
        if self.rate == 0 {
            return None;
        }
        let now = Instant::now();
        let rate = self.rate as f64;
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * rate).min(rate);
        self.at = now;
        self.tokens -= n as f64;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_need_the_mqtts_scheme_and_a_port() {
        assert_eq!(
            parse_url("mqtts://127.0.0.1:8883").unwrap(),
            ("127.0.0.1".to_owned(), 8883)
        );
        assert!(parse_url("mqtt://h:1").is_err());
        assert!(parse_url("mqtts://h").is_err());
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut b = Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_secs(1),
            cap: Duration::from_millis(100),
        };
        for _ in 0..20 {
            let d = b.next();
            assert!(
                d >= Duration::from_millis(100) && d <= Duration::from_secs(1),
                "{d:?}"
            );
        }
        b.reset();
        assert!(b.next() <= Duration::from_millis(101));
    }

    #[test]
    fn the_byte_bucket_makes_senders_wait_past_the_rate() {
        let mut b = ByteBucket::new(1000);
        assert!(b.take(1000).is_none());
        assert!(b.take(500).is_some());
        assert!(ByteBucket::new(0).take(u64::MAX).is_none());
    }
}
