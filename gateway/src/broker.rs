//! External broker mode: the gateway is an MQTT 5 client (rumqttc) of a broker that the
//! devices connect to (Mosquitto for a site, a cluster for a fleet). It takes every
//! device's uplink through shared subscriptions (`$share/<group>/<prefix>/up` and
//! `/hello`, `{device}` as `+`), so the gateways of one group split the load, and
//! answers each device on its own topics (`/ack`, `/down`). Frames go through the same
//! [`ingress`](crate::ingress) code as on the embedded endpoint.
//!
//! The broker authenticates devices by certificate and its ACLs confine each to its own
//! topics (`conf/mosquitto.acl`), so a message's device is the one its topic names; a
//! frame naming another device is refused and counted, as on the embedded endpoint.
//!
//! What must stay true:
//! 1. A PUBLISH is acknowledged to the broker (manual PUBACK) only after its batch is
//!    committed. A gateway that dies before its commit gets the message again from its
//!    persistent session (clean start off, `broker_session_expiry`) when it comes back.
//! 2. PUBACKs leave in the order the PUBLISHes arrived (MQTT 5 §4.6), though batches are
//!    committed concurrently, at most [`BrokerSettings::max_in_flight`] per connection:
//!    the receive maximum the broker must respect.
//! 3. A PUBACK goes only to the connection that delivered its PUBLISH. After a
//!    reconnect the broker sends unacknowledged messages again under their packet ids,
//!    and a late PUBACK could acknowledge a newer message that reuses the id. (The
//!    connection counter moves just after rumqttc drops a connection and its queued
//!    PUBACKs; one queued in between still goes out, which at worst lets the broker
//!    forget a message the agent still holds and will resend.)
//! 4. No wait closes a cycle. The event loop task waits only for room in the driver's
//!    queue, which the driver reads whenever it holds fewer than `2 × max_in_flight`
//!    messages (else it waits for handlers, which wait only for the store). Handlers
//!    and the driver queue at most two client requests per message (answer, PUBACK),
//!    and the broker sends no more than `max_in_flight` messages without a PUBACK, so
//!    the client's request queue (`4 × max_in_flight` and some) never makes them wait
//!    for the event loop.
//!
//! What the broker does for us (Mosquitto 2.0, checked against 2.0.11's source and
//! `tests/tests/broker.rs`):
//! - While the gateway is away its session (clean start off, until
//!   `broker_session_expiry`) keeps its subscriptions, the messages it was sent and
//!   has not acknowledged, and those that arrive meanwhile. On reconnect the broker
//!   sends the unacknowledged ones again (DUP, same packet ids), then the rest: what
//!   invariant 1 relies on.
//! - A shared subscription hands each message to one member's session, connected or
//!   not. A message stays with that member: it is neither given to another member of
//!   the group while this one is away nor when its session expires (then it is gone).
//!
//! What it does not do: keep a message that matches no subscription when it arrives.
//! Uplink published before the gateway's session has subscribed is dropped, though
//! the device got its PUBACK (an MQTT 5 device: "no matching subscribers"): on the
//! first start against a broker (`/health` answers before the SUBSCRIBE is through),
//! after the session expired, after the broker lost its state (a crash since its last
//! autosave). So is a message past the session's `max_queued_messages`.
//!
//! So a broker's PUBACK is not the device's guarantee: the agent forgets events only
//! on the gateway's `Ack` (DESIGN §3.2) and resends what is not acked within its ack
//! timeout, which recovers all of the above. For the same reason a message whose
//! commit failed is acknowledged to the broker all the same (holding it would only
//! block a receive slot until the next reconnect) and the agent sends it again.
//!
//! Downlinks ([`crate::downlink`]): the gateway sees no device PUBACKs through the
//! broker, so a queued message cannot be removed on one. Instead, on each hello the
//! device's queued messages (up to [`MAX_IN_FLIGHT`]) are published on its down
//! topic before the hello reply, and they stay queued until this gateway commits an
//! uplink batch from that device sent (device clock) no earlier than that hello: the
//! agent sends no batch on a connection before it has the reply, and it gets the
//! queued messages before the reply (same topic, in order) and carries each out
//! before reading the next. A gateway restart or another group member taking the
//! batch leaves them queued; they go again at the next hello (carried out again,
//! harmlessly). An agent that gave up waiting for the reply (its ack timeout) may
//! send a batch without having had them: then they are removed unapplied, so
//! broker-mode delivery is best effort in that one case. A message queued while the
//! device is connected waits for its next hello. Downlinks are published with
//! `try_publish`, never waiting for the client (invariant 4); what does not fit goes
//! at the next hello.
//!
//! This module must not take identity from a payload, and must not answer a device
//! before the commit.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use edge_agent::model::DeviceId;
use edge_agent::wire::{TopicKind, Topics};
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{Outgoing, TlsConfiguration, Transport};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{resolve, MqttConfig};
use crate::downlink::{Downlinks, MAX_IN_FLIGHT};
use crate::endpoint::EndpointMetrics;
use crate::ingress::{self, IngressError};
use crate::pki::PkiDir;
use crate::store::Store;
use crate::tls::{self, RevocationList, TlsError};

/// Connection events queued from the event loop task beyond the in-flight messages.
const NET_QUEUE_SLACK: usize = 16;
/// Client requests beyond two per message being handled (subscribes, disconnect).
const REQUEST_QUEUE_SLACK: usize = 16;
/// How long shutdown waits for in-flight commits and for the DISCONNECT to go out.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Most devices whose downlinks await confirmation by a batch; beyond it, what is sent
/// at a hello simply stays queued for the next one.
const MAX_AWAITING_DEVICES: usize = 10_000;

/// Why the broker consumer could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// `mqtt.broker_url` is missing or not `mqtts://host:port`.
    #[error("mqtt.broker_url {0}")]
    Url(String),
    /// The gateway's client certificate, its key or the CA could not be loaded.
    #[error("broker TLS: {0}")]
    Tls(#[from] TlsError),
}

/// The checked settings of broker mode, from `[mqtt]`.
#[derive(Clone)]
pub struct BrokerSettings {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub shared_group: String,
    pub tls: Arc<rustls::ClientConfig>,
    pub keep_alive: Duration,
    pub session_expiry: Duration,
    /// Receive maximum: uplink messages handled at once per connection.
    pub max_in_flight: u16,
    /// Largest MQTT packet either way, and so largest uplink frame.
    pub max_packet_size: u32,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl std::fmt::Debug for BrokerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerSettings")
            .field("broker", &format_args!("{}:{}", self.host, self.port))
            .field("client_id", &self.client_id)
            .field("shared_group", &self.shared_group)
            .finish_non_exhaustive()
    }
}

/// Where the gateway's broker client certificate, key and CA are: the configured paths
/// (relative to `data_dir`), else `<pki_dir>/ca.pem` and
/// `<pki_dir>/devices/<client_id>.{pem,key}`.
pub fn tls_paths(
    mqtt: &MqttConfig,
    data_dir: &Path,
    pki_dir: &Path,
) -> (PathBuf, PathBuf, PathBuf) {
    let layout = PkiDir::new(pki_dir);
    let id = DeviceId(mqtt.client_id.clone());
    let pick = |configured: &Option<PathBuf>, default: PathBuf| match configured {
        Some(p) => resolve(data_dir, p),
        None => default,
    };
    (
        pick(&mqtt.broker_ca, layout.ca_cert()),
        pick(&mqtt.broker_cert, layout.device_cert(&id)),
        pick(&mqtt.broker_key, layout.device_key(&id)),
    )
}

impl BrokerSettings {
    /// Builds the settings from a validated `[mqtt]`, loading the TLS files.
    pub fn from_config(
        mqtt: &MqttConfig,
        data_dir: &Path,
        pki_dir: &Path,
    ) -> Result<Self, BrokerError> {
        let (host, port) = mqtt.broker_address().map_err(BrokerError::Url)?;
        let (ca, cert, key) = tls_paths(mqtt, data_dir, pki_dir);
        Ok(BrokerSettings {
            host,
            port,
            client_id: mqtt.client_id.clone(),
            shared_group: mqtt.shared_group.clone(),
            tls: tls::client_config(&ca, &cert, &key)?,
            keep_alive: mqtt.broker_keep_alive,
            session_expiry: mqtt.broker_session_expiry,
            max_in_flight: mqtt.broker_max_in_flight.max(1),
            max_packet_size: u32::try_from(mqtt.max_packet_size.0).unwrap_or(u32::MAX),
            backoff_min: mqtt.broker_backoff_min,
            backoff_max: mqtt.broker_backoff_max,
        })
    }

    fn options(&self) -> MqttOptions {
        let mut opts = MqttOptions::new(self.client_id.clone(), self.host.clone(), self.port);
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::clone(&self.tls),
        )));
        // Validation keeps it in 5 s..=u16::MAX s; rumqttc panics below 5 s.
        opts.set_keep_alive(self.keep_alive.max(Duration::from_secs(5)));
        opts.set_clean_start(false);
        let expiry = u32::try_from(self.session_expiry.as_secs()).unwrap_or(u32::MAX);
        opts.set_session_expiry_interval(Some(expiry.max(1)));
        opts.set_receive_maximum(Some(self.max_in_flight));
        opts.set_max_packet_size(Some(self.max_packet_size));
        opts.set_manual_acks(true);
        opts
    }

    /// The shared subscription filter of `kind` for every device.
    fn filter(&self, topics: &Topics, kind: TopicKind) -> String {
        format!("$share/{}/{}", self.shared_group, topics.filter(kind))
    }

    /// Messages handled at once, across connections (invariant 4).
    fn handling_cap(&self) -> usize {
        2 * usize::from(self.max_in_flight)
    }
}

/// The broker consumer: one MQTT connection, an event loop task, and a driver that
/// hands each uplink message to a handler task and acknowledges them in order.
#[derive(Debug)]
pub struct BrokerConsumer {
    pub settings: BrokerSettings,
    pub topics: Topics,
    pub store: Arc<Store>,
    pub revoked: Arc<RevocationList>,
    pub metrics: Arc<EndpointMetrics>,
    /// The durable downlink queues, published at each device's hello.
    pub downlinks: Arc<Downlinks>,
}

/// Downlinks published at a device's hello, removed once a batch the device sent
/// after that hello is committed (see the module docs).
#[derive(Debug, Default)]
struct Awaiting {
    by_device: Mutex<HashMap<DeviceId, Published>>,
}

#[derive(Debug)]
struct Published {
    /// The hello's `sent_at_ms` (device clock, as a batch's `sent_at_ms`).
    hello_sent_at_ms: i64,
    ids: Vec<u64>,
}

impl Awaiting {
    fn published(&self, device: &DeviceId, hello_sent_at_ms: i64, ids: Vec<u64>) {
        let mut map = self
            .by_device
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if ids.is_empty() {
            map.remove(device);
        } else if map.len() < MAX_AWAITING_DEVICES || map.contains_key(device) {
            map.insert(
                device.clone(),
                Published {
                    hello_sent_at_ms,
                    ids,
                },
            );
        }
    }

    /// Ids a batch sent at `batch_sent_at_ms` confirms, taken out of the map.
    fn confirmed(&self, device: &DeviceId, batch_sent_at_ms: i64) -> Vec<u64> {
        let mut map = self
            .by_device
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match map.get(device) {
            Some(p) if p.hello_sent_at_ms <= batch_sent_at_ms => {
                map.remove(device).map(|p| p.ids).unwrap_or_default()
            }
            _ => Vec::new(),
        }
    }
}

/// What the event loop task reports to the driver.
#[derive(Debug)]
enum Net {
    Connected {
        session_present: bool,
    },
    /// One SUBACK; subscribes go out one filter each and are answered in order.
    SubAck {
        reasons: Vec<SubscribeReasonCode>,
    },
    Lost(String),
    Message {
        publish: Publish,
        connection: u64,
    },
}

/// A message being handled; its PUBACK waits for its handler and for those before it.
#[derive(Debug)]
struct InFlight {
    publish: Publish,
    /// The connection it came on (invariant 3).
    connection: u64,
    handler: JoinHandle<()>,
}

impl BrokerConsumer {
    /// Consumes the uplink until `shutdown`; then finishes the messages in hand,
    /// acknowledges them and disconnects, leaving the session to the broker.
    pub async fn run(self, shutdown: CancellationToken) {
        let me = Arc::new(self);
        let s = &me.settings;
        let cap = s.handling_cap();
        let (client, eventloop) = AsyncClient::new(s.options(), 2 * cap + REQUEST_QUEUE_SLACK);
        let (net_tx, mut net_rx) = mpsc::channel(usize::from(s.max_in_flight) + NET_QUEUE_SLACK);
        // Bumped whenever the connection is lost; a message carries the value it came with.
        let connection = Arc::new(AtomicU64::new(0));
        let (closing, stop_loop) = (CancellationToken::new(), CancellationToken::new());
        let mut event_loop = tokio::spawn(drive_event_loop(
            eventloop,
            net_tx,
            Arc::clone(&connection),
            Backoff::new(s.backoff_min, s.backoff_max),
            closing.clone(),
            stop_loop.clone(),
        ));
        info!(broker = %format_args!("{}:{}", s.host, s.port), client_id = %s.client_id, group = %s.shared_group, "Consuming the uplink from the broker.");

        let awaiting = Arc::new(Awaiting::default());
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let mut connected = false;
        let mut failures: u64 = 0;
        // Filters subscribed on this connection and not answered yet, in order.
        let mut subscribing: VecDeque<String> = VecDeque::new();
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                () = front_done(&mut in_flight) => {
                    if let Some(done) = in_flight.pop_front() {
                        settle(&client, &done, &connection).await;
                    }
                }
                net = net_rx.recv(), if in_flight.len() < cap => match net {
                    None => {
                        error!("The MQTT event loop stopped; no more uplink from the broker.");
                        break;
                    }
                    Some(Net::Connected { session_present }) => {
                        connected = true;
                        info!(session_present, "Connected to the broker.");
                        // Subscribing again is harmless when the session kept them, and
                        // required when the broker lost it.
                        subscribing.clear();
                        for kind in [TopicKind::Up, TopicKind::Hello] {
                            let filter = s.filter(&me.topics, kind);
                            match client.subscribe(filter.clone(), QoS::AtLeastOnce).await {
                                Ok(()) => subscribing.push_back(filter),
                                Err(e) => warn!(filter = %filter, error = %e, "Subscribe not queued."),
                            }
                        }
                    }
                    Some(Net::SubAck { reasons }) => {
                        let filter = subscribing.pop_front().unwrap_or_default();
                        for reason in reasons {
                            match reason {
                                SubscribeReasonCode::Success(_) => info!(filter = %filter, "Subscribed."),
                                refused => error!(filter = %filter, reason = ?refused, "The broker refused the gateway's subscription; check its ACL for the gateway's user."),
                            }
                        }
                    }
                    Some(Net::Lost(e)) => {
                        if connected {
                            warn!(error = %e, "Broker connection lost; reconnecting.");
                            failures = 0;
                        } else {
                            // Logged at 1, 2, 4, 8... failures in a row: visible, not a flood.
                            failures += 1;
                            if failures.is_power_of_two() {
                                warn!(error = %e, failures, "Cannot connect to the broker; retrying with backoff.");
                            } else {
                                debug!(error = %e, failures, "Broker connect failed; backing off.");
                            }
                        }
                        connected = false;
                    }
                    Some(Net::Message { publish, connection }) => {
                        let handler = tokio::spawn(Arc::clone(&me).handle(client.clone(), Arc::clone(&awaiting), publish.topic.clone(), publish.payload.clone()));
                        in_flight.push_back(InFlight { publish, connection, handler });
                    }
                },
            }
        }

        // Shutdown: take no new messages (the broker keeps them in this gateway's
        // session), finish and acknowledge those in hand.
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while !in_flight.is_empty() {
            tokio::select! {
                () = front_done(&mut in_flight) => {
                    if let Some(done) = in_flight.pop_front() {
                        settle(&client, &done, &connection).await;
                    }
                }
                // Keep the event loop task unblocked; what it reports no longer matters.
                Some(_) = net_rx.recv() => {}
                () = tokio::time::sleep_until(deadline) => {
                    warn!(in_flight = in_flight.len(), "Shutdown deadline passed with uplink in hand; the broker delivers it again.");
                    break;
                }
            }
        }
        closing.cancel();
        if let Err(e) = client.try_disconnect() {
            debug!(error = %e, "DISCONNECT not queued.");
        }
        loop {
            tokio::select! {
                _ = &mut event_loop => break,
                Some(_) = net_rx.recv() => {}
                () = tokio::time::sleep_until(deadline) => {
                    stop_loop.cancel();
                    let _ = (&mut event_loop).await;
                    break;
                }
            }
        }
        for rest in in_flight {
            rest.handler.abort();
        }
        info!("Broker consumer stopped.");
    }

    /// Handles one uplink message: commit and answer. Never fails: what went wrong is
    /// counted and logged, and the message is acknowledged to the broker all the same
    /// (see the module docs for why that loses nothing).
    async fn handle(
        self: Arc<Self>,
        client: AsyncClient,
        awaiting: Arc<Awaiting>,
        topic: Bytes,
        payload: Bytes,
    ) {
        let Some((device, kind)) = std::str::from_utf8(&topic)
            .ok()
            .and_then(|t| self.topics.parse(t))
        else {
            EndpointMetrics::inc(&self.metrics.topic_violations);
            warn!(topic = %String::from_utf8_lossy(&topic), "Message on a topic that is not a device's; ignored.");
            return;
        };
        if self.revoked.is_revoked(&device) {
            EndpointMetrics::inc(&self.metrics.frames_rejected);
            warn!(device = %device, "Message from a revoked device; ignored.");
            return;
        }
        let max = usize::try_from(self.settings.max_packet_size).unwrap_or(usize::MAX);
        let answer = match kind {
            TopicKind::Up => self
                .uplink(&awaiting, &device, &payload, max)
                .await
                .map(|frame| (TopicKind::Ack, frame)),
            TopicKind::Hello => {
                match ingress::verify_hello(&self.store, &self.metrics, &device, &payload) {
                    Ok(hello) => {
                        let version = self
                            .downlinks
                            .on_hello(&device, hello.audiences_version)
                            .await;
                        self.send_queued(&client, &awaiting, &device, &payload);
                        ingress::hello_reply(version).map(|frame| (TopicKind::Down, frame))
                    }
                    Err(e) => Err(e),
                }
            }
            TopicKind::Ack | TopicKind::Down => {
                EndpointMetrics::inc(&self.metrics.topic_violations);
                warn!(device = %device, kind = ?kind, "Message on a gateway-to-device topic; ignored.");
                return;
            }
        };
        let (kind, frame) = match answer {
            Ok(a) => a,
            Err(IngressError::Rejected(_)) => return,
            Err(IngressError::Store(e)) => {
                warn!(device = %device, error = %e, "Batch not committed; the agent will send it again.");
                return;
            }
            Err(e @ IngressError::Encode(_)) => {
                error!(device = %device, error = %e, "Answer not sent.");
                return;
            }
        };
        let reply_topic = match self.topics.topic(&device, kind) {
            Ok(t) => t,
            Err(e) => return warn!(device = %device, error = %e, "No reply topic."),
        };
        // QoS 1, as the embedded endpoint answers. An answer lost on the way (the device
        // went offline) only makes the agent resend a batch the store already holds.
        if let Err(e) = client
            .publish(reply_topic, QoS::AtLeastOnce, false, frame)
            .await
        {
            debug!(device = %device, error = %e, "Answer not queued; the client is closing.");
        }
    }
}

impl BrokerConsumer {
    /// Verifies and commits a batch; once committed, the downlinks it confirms (see the
    /// module docs) leave the queue.
    async fn uplink(
        &self,
        awaiting: &Awaiting,
        device: &DeviceId,
        payload: &[u8],
        max: usize,
    ) -> Result<Vec<u8>, IngressError> {
        let batch = ingress::verify_batch(&self.store, &self.metrics, device, payload, max)?;
        let sent_at_ms = batch.batch.sent_at_ms;
        let frame = ingress::commit_batch(&self.store, &self.metrics, device, batch).await?;
        let confirmed = awaiting.confirmed(device, sent_at_ms);
        if let Err(e) = self.downlinks.remove(device, confirmed).await {
            warn!(device = %device, error = %e, "Delivered downlinks not removed; they go again at the next hello.");
        }
        Ok(frame)
    }

    /// Publishes what is queued for `device` on its down topic, without waiting for
    /// the client (invariant 4), and notes what was sent for confirmation.
    fn send_queued(
        &self,
        client: &AsyncClient,
        awaiting: &Awaiting,
        device: &DeviceId,
        hello: &[u8],
    ) {
        let Ok(hello) = edge_agent::wire::decode_hello(hello, edge_agent::wire::DEFAULT_MAX_FRAME)
        else {
            return;
        };
        let queued = match self.downlinks.read_after(device, 0, MAX_IN_FLIGHT) {
            Ok(q) => q,
            Err(e) => {
                return warn!(device = %device, error = %e, "Queued downlinks not read; they go at the next hello.")
            }
        };
        let topic = match self.topics.topic(device, TopicKind::Down) {
            Ok(t) => t,
            Err(e) => return warn!(device = %device, error = %e, "No down topic."),
        };
        let mut sent = Vec::with_capacity(queued.len());
        for (id, frame) in queued {
            if let Err(e) = client.try_publish(topic.clone(), QoS::AtLeastOnce, false, frame) {
                debug!(device = %device, error = %e, "Downlink not queued in the client; it goes at the next hello.");
                break;
            }
            sent.push(id);
        }
        awaiting.published(device, hello.sent_at_ms, sent);
    }
}

/// Resolves when the oldest message's handler has finished; never when there is none.
async fn front_done(in_flight: &mut VecDeque<InFlight>) {
    match in_flight.front_mut() {
        Some(front) => {
            if let Err(e) = (&mut front.handler).await {
                error!(error = %e, "Uplink handler failed.");
            }
        }
        None => std::future::pending().await,
    }
}

/// Sends the PUBACK of a handled message if its connection is still the current one.
async fn settle(client: &AsyncClient, done: &InFlight, connection: &AtomicU64) {
    if done.connection != connection.load(Ordering::Acquire) {
        debug!(
            pkid = done.publish.pkid,
            "Connection changed; the broker delivers this message again."
        );
        return;
    }
    if let Err(e) = client.ack(&done.publish).await {
        debug!(error = %e, "PUBACK not queued; the client is closing.");
    }
}

/// Polls rumqttc's event loop (which reconnects on the next poll after an error) and
/// reports to the driver. Ends once `closing` and our DISCONNECT is sent, when the
/// driver is gone, or on `stop`.
async fn drive_event_loop(
    mut eventloop: EventLoop,
    net: mpsc::Sender<Net>,
    connection: Arc<AtomicU64>,
    mut backoff: Backoff,
    closing: CancellationToken,
    stop: CancellationToken,
) {
    loop {
        let polled = tokio::select! {
            () = stop.cancelled() => return,
            r = eventloop.poll() => r,
        };
        let report = match polled {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff.reset();
                Net::Connected {
                    session_present: ack.session_present,
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => Net::Message {
                publish,
                connection: connection.load(Ordering::Acquire),
            },
            Ok(Event::Incoming(Packet::SubAck(ack))) => Net::SubAck {
                reasons: ack.return_codes,
            },
            // rumqttc also sends DISCONNECT on a protocol error; the broker then closes
            // the connection and the next poll reconnects.
            Ok(Event::Outgoing(Outgoing::Disconnect)) if closing.is_cancelled() => return,
            Ok(_) => continue,
            Err(e) => {
                connection.fetch_add(1, Ordering::AcqRel);
                if net.send(Net::Lost(e.to_string())).await.is_err() {
                    return;
                }
                let wait = backoff.next();
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                continue;
            }
        };
        if net.send(report).await.is_err() {
            return;
        }
    }
}

/// Reconnect delays: exponential from `min` to `max`, each drawn uniformly between
/// `min` and the current cap (full jitter) so that gateways do not reconnect in step.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    cap: Duration,
    random: RandomState,
    draws: u64,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            cap: min,
            random: RandomState::new(),
            draws: 0,
        }
    }

    fn next(&mut self) -> Duration {
        let cap = self.cap;
        self.cap = (self.cap * 2).min(self.max);
        self.draws = self.draws.wrapping_add(1);
        let span = u64::try_from(cap.saturating_sub(self.min).as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.min + Duration::from_millis(self.random.hash_one(self.draws) % span)
    }

    fn reset(&mut self) {
        self.cap = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_batch_sent_after_the_hello_confirms_its_downlinks() {
        let a = Awaiting::default();
        let d = DeviceId("d1".into());
        a.published(&d, 1_000, vec![4, 5]);
        assert!(a.confirmed(&d, 999).is_empty(), "sent before the hello");
        assert!(a.confirmed(&DeviceId("d2".into()), 2_000).is_empty());
        assert_eq!(a.confirmed(&d, 1_000), [4, 5]);
        assert!(a.confirmed(&d, 3_000).is_empty(), "confirmed once");
        a.published(&d, 1_000, vec![6]);
        a.published(&d, 2_000, vec![]);
        assert!(
            a.confirmed(&d, 5_000).is_empty(),
            "nothing queued at the last hello"
        );
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_and_resets() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(1));
        let mut b = Backoff::new(min, max);
        assert_eq!(b.next(), min, "the first wait is the minimum");
        let waits: Vec<Duration> = (0..20).map(|_| b.next()).collect();
        assert!(waits.iter().all(|d| *d >= min && *d <= max), "{waits:?}");
        assert!(waits.iter().any(|d| *d != waits[0]), "no jitter: {waits:?}");
        b.reset();
        assert_eq!(b.next(), min);
    }

    #[test]
    fn shared_filters_put_the_group_before_the_device_wildcard() {
        let settings = settings("edge-gateways");
        let topics = Topics::new("edge/{device}").unwrap();
        assert_eq!(
            settings.filter(&topics, TopicKind::Up),
            "$share/edge-gateways/edge/+/up"
        );
        assert_eq!(
            settings.filter(&topics, TopicKind::Hello),
            "$share/edge-gateways/edge/+/hello"
        );
        let nested = Topics::new("tenant-a/{device}/v1").unwrap();
        assert_eq!(
            settings.filter(&nested, TopicKind::Up),
            "$share/edge-gateways/tenant-a/+/v1/up"
        );
    }

    #[test]
    fn tls_paths_default_to_the_pki_dir_and_the_client_id() {
        let mut mqtt = MqttConfig {
            client_id: "gw-2".into(),
            ..MqttConfig::default()
        };
        let (ca, cert, key) = tls_paths(&mqtt, Path::new("/data"), Path::new("/data/pki"));
        assert_eq!(ca, Path::new("/data/pki/ca.pem"));
        assert_eq!(cert, Path::new("/data/pki/devices/gw-2.pem"));
        assert_eq!(key, Path::new("/data/pki/devices/gw-2.key"));
        mqtt.broker_cert = Some("certs/gw.pem".into());
        assert_eq!(
            tls_paths(&mqtt, Path::new("/data"), Path::new("/data/pki")).1,
            Path::new("/data/certs/gw.pem")
        );
    }

    fn settings(group: &str) -> BrokerSettings {
        let dir = tempfile::tempdir().unwrap();
        crate::pki::init(dir.path(), &[]).unwrap();
        let files = crate::pki::issue_device(dir.path(), "edge-gateway", Duration::from_secs(3600))
            .unwrap();
        BrokerSettings {
            host: "127.0.0.1".into(),
            port: 8883,
            client_id: "edge-gateway".into(),
            shared_group: group.into(),
            tls: tls::client_config(&dir.path().join("ca.pem"), &files.cert, &files.key).unwrap(),
            keep_alive: Duration::from_secs(30),
            session_expiry: Duration::from_secs(3600),
            max_in_flight: 8,
            max_packet_size: 1 << 20,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
        }
    }
}
