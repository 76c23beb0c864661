//! Device isolation at the gateway's embedded MQTT/TLS endpoint, against a real
//! `edge-gateway` process and clients no one here wrote (rumqttc, raw rustls, Mosquitto's
//! command-line tools):
//!
//! - a device's certificate confines it to its own topics and its own session;
//! - only current, unrevoked certificates from the gateway's CA get in, and they are
//!   turned away at the TLS handshake (or, when revoked, at CONNACK);
//! - frames in another device's name and malformed frames are rejected and counted,
//!   oversized and non-MQTT packets end the connection; nothing of them is stored, and
//!   no other device notices;
//! - a thousand idle sockets do not hold up a real device's connect.
//!
//! Topics follow the default prefix `edge/{device}`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use edge_agent::model::{now_ms, DeviceId, Event, EventKind, Seq, Source, Value};
use edge_agent::spool::Drops;
use edge_agent::wire::{self, Ack, Compression, Downlink, Hello, SeqRange, UplinkBatch};
use edge_tests::http::{get, post};
use edge_tests::{basic, wait_until, Agent, Gateway};
use rand::{Rng, SeedableRng};
use rumqttc::tokio_rustls::client::TlsStream;
use rumqttc::tokio_rustls::TlsConnector;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event as MqttEvent, EventLoop, MqttOptions,
    Packet, QoS, SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// The device whose certificate the tests misuse.
const A: &str = "dev-1";
/// The device A tries to reach or impersonate.
const B: &str = "dev-2";
/// Spool lane of the hand-made batches.
const LANE: &str = "default";
/// Longest wait for anything the gateway should do promptly.
const PROMPT: Duration = Duration::from_secs(10);

const TOPIC_VIOLATIONS: &str = "edge_gateway_topic_violations_total";
const FRAMES_REJECTED: &str = "edge_gateway_frames_rejected_total";
const HANDSHAKES_FAILED: &str = "edge_gateway_handshakes_failed_total";
const CONNECTS_REFUSED: &str = "edge_gateway_connects_refused_total";
const CONNECTIONS_ACCEPTED: &str = "edge_gateway_connections_accepted_total";
const EVENTS_STORED: &str = "edge_gateway_events_stored_total";
const INBOX_EVENTS: &str = "edge_gateway_inbox_events";

fn topic(device: &str, kind: &str) -> String {
    format!("edge/{device}/{kind}")
}

// ---------------------------------------------------------------------------------
// Gateway, metrics, device records

/// Adds `lines` to the `[mqtt]` table of the config the harness wrote. `extra` lands in
/// `[tls]`, and TOML forbids opening `[mqtt]` a second time.
fn mqtt_settings(gw: &Gateway, lines: &str) {
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    assert!(
        text.starts_with("[mqtt]\n"),
        "the harness config changed shape:\n{text}"
    );
    let text = text.replacen("[mqtt]\n", &format!("[mqtt]\n{lines}\n"), 1);
    std::fs::write(&gw.config_path, text).unwrap();
}

/// The value of one unlabelled series in `/metrics`.
fn metric(gw: &Gateway, name: &str) -> u64 {
    let body = get(gw.http, "/metrics").unwrap().body;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{body}"))
}

/// `/v1/devices/{id}`, `None` when the gateway has no record of the device.
fn device_record(gw: &Gateway, id: &str) -> Option<serde_json::Value> {
    let r = get(gw.http, &format!("/v1/devices/{id}")).unwrap();
    match r.status {
        200 => Some(r.json()),
        404 => None,
        s => panic!("/v1/devices/{id}: {s} {}", r.body),
    }
}

fn frames_rejected(gw: &Gateway, id: &str) -> u64 {
    device_record(gw, id).map_or(0, |r| r["frames_rejected"].as_u64().unwrap())
}

/// Message ids delivered to the file destination that start with `<tag>-`.
fn delivered_ids(gw: &Gateway, tag: &str) -> Vec<String> {
    let prefix = format!("{tag}-");
    gw.delivered()
        .iter()
        .filter_map(|l| l["messageId"].as_str())
        .filter(|id| id.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

/// Stops the gateway and checks that nothing in it panicked (a panicking connection
/// task would not bring the process down, so its stderr is where it shows).
fn assert_no_panic(gw: &mut Gateway) {
    let log = gw.stop_kill();
    assert!(!log.contains("panicked"), "the gateway panicked:\n{log}");
}

// ---------------------------------------------------------------------------------
// Frames

/// `n` track events from `device` with seqs `first..first + n` and message ids
/// `<tag>-<i>`, as one batch.
fn batch(device: &str, tag: &str, first: u64, n: u64) -> UplinkBatch {
    let now = now_ms();
    let events = (0..n)
        .map(|i| {
            let mut e = Event::new(EventKind::Track, Source::Segment, now);
            e.set_message_id(&format!("{tag}-{i}"));
            e.seq = Seq(first + i);
            e.name = Some("Isolation Probe".into());
            e.identities.device_id = DeviceId(device.into());
            e.identities.user_id = Some(format!("user-{tag}").into());
            e.lane = LANE.into();
            e
        })
        .collect();
    UplinkBatch {
        device: DeviceId(device.into()),
        lane: LANE.into(),
        floor: Seq(first),
        sent_at_ms: now,
        drops: Drops::default(),
        events,
    }
}

fn frame(batch: &UplinkBatch) -> Vec<u8> {
    wire::encode_batch(batch, Compression::None).unwrap()
}

fn hello(device: &str) -> Vec<u8> {
    let hello = Hello {
        device: DeviceId(device.into()),
        agent_version: "0.1.0".into(),
        audiences_version: 0,
        config_version: 0,
        sent_at_ms: now_ms(),
    };
    wire::encode_hello(&hello, Compression::None).unwrap()
}

fn assert_acks(ack: &Ack, batch: &UplinkBatch) {
    assert_eq!(ack.device, batch.device, "{ack:?}");
    assert!(ack.rejected.is_empty(), "{ack:?}");
    for e in &batch.events {
        assert!(ack.covers(e.seq), "seq {} not acked: {ack:?}", e.seq.0);
    }
}

// ---------------------------------------------------------------------------------
// TLS

fn device_tls(gw: &Gateway, id: &str) -> Arc<ClientConfig> {
    let pki = gw.pki();
    edge_gateway::tls::client_config(
        &pki.join("ca.pem"),
        &pki.join(format!("devices/{id}.pem")),
        &pki.join(format!("devices/{id}.key")),
    )
    .unwrap()
}

/// A client certificate and its key, or none.
type Identity<'a> = Option<(&'a Path, &'a Path)>;

/// A client configuration that trusts `ca`, speaks only `version`, and presents
/// `identity` (certificate, key) when asked for a client certificate, if there is one.
fn tls_with(
    ca: &Path,
    identity: Identity<'_>,
    version: &'static SupportedProtocolVersion,
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_file(key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

// ---------------------------------------------------------------------------------
// A real MQTT client (rumqttc), driven step by step

fn options(gw: &Gateway, client_id: &str, tls: Arc<ClientConfig>) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", gw.mqtt.port());
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    o.set_keep_alive(Duration::from_secs(30));
    // A large outgoing limit: the gateway, not this client, must enforce its own.
    o.set_max_packet_size(1 << 20, 16 << 20);
    o
}

struct Mqtt {
    /// The client id, which for an accepted connection is also the device id.
    id: String,
    client: AsyncClient,
    events: EventLoop,
}

/// Connects: `Ok` once CONNACK accepts the client, else the error the attempt ended
/// with (a TLS failure, `ConnectionRefused(code)`, the socket closing...).
async fn connect(opts: MqttOptions) -> Result<Mqtt, ConnectionError> {
    let id = opts.client_id();
    let (client, mut events) = AsyncClient::new(opts, 16);
    loop {
        match timeout(PROMPT, events.poll())
            .await
            .expect("neither CONNACK nor an error in time")
        {
            Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => return Ok(Mqtt { id, client, events }),
            Ok(_) => {}
            Err(e) => return Err(e),
        }
    }
}

impl Mqtt {
    /// `device` with its own certificate and client id.
    async fn device(gw: &Gateway, device: &str) -> Mqtt {
        connect(options(gw, device, device_tls(gw, device)))
            .await
            .unwrap_or_else(|e| panic!("{device} could not connect: {e}"))
    }

    /// The next packet from the gateway: `Ok(None)` if none came within `within`,
    /// `Err` when the connection ended.
    async fn next_within(&mut self, within: Duration) -> Result<Option<Packet>, ConnectionError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.events.poll()).await {
                Err(_) => return Ok(None),
                Ok(Ok(MqttEvent::Incoming(p))) => return Ok(Some(p)),
                Ok(Ok(MqttEvent::Outgoing(_))) => {}
                Ok(Err(e)) => return Err(e),
            }
        }
    }

    async fn next(&mut self) -> Packet {
        self.next_within(PROMPT)
            .await
            .unwrap_or_else(|e| panic!("{}: the connection ended: {e}", self.id))
            .unwrap_or_else(|| panic!("{}: nothing from the gateway in time", self.id))
    }

    /// Subscribes to `filters` at QoS 1 in one SUBSCRIBE; returns the SUBACK's codes.
    async fn subscribe(&mut self, filters: &[&str]) -> Vec<SubscribeReasonCode> {
        let filters = filters
            .iter()
            .map(|f| SubscribeFilter::new((*f).to_owned(), QoS::AtLeastOnce));
        self.client.subscribe_many(filters).await.unwrap();
        loop {
            if let Packet::SubAck(s) = self.next().await {
                return s.return_codes;
            }
        }
    }

    /// Subscribes to the device's own `ack` and `down` topics.
    async fn subscribe_own(&mut self) {
        let (ack, down) = (topic(&self.id, "ack"), topic(&self.id, "down"));
        let granted = SubscribeReasonCode::Success(QoS::AtLeastOnce);
        assert_eq!(self.subscribe(&[&ack, &down]).await, [granted, granted]);
    }

    /// Publishes at `qos` and returns everything the gateway sent until it completed
    /// the exchange (PUBACK for QoS 1, PUBCOMP for QoS 2).
    async fn publish_qos(&mut self, topic: &str, payload: Vec<u8>, qos: QoS) -> Vec<Packet> {
        self.client
            .publish(topic, qos, false, payload)
            .await
            .unwrap();
        let mut seen = Vec::new();
        loop {
            let p = self.next().await;
            let done = match qos {
                QoS::AtLeastOnce => matches!(p, Packet::PubAck(_)),
                _ => matches!(p, Packet::PubComp(_)),
            };
            seen.push(p);
            if done {
                return seen;
            }
        }
    }

    async fn publish(&mut self, topic: &str, payload: Vec<u8>) -> Vec<Packet> {
        self.publish_qos(topic, payload, QoS::AtLeastOnce).await
    }

    /// Publishes at QoS 1 and expects the gateway to close the connection without
    /// acknowledging or answering anything; returns how the connection ended.
    async fn publish_refused(&mut self, topic: &str, payload: Vec<u8>) -> ConnectionError {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
        loop {
            match self.next_within(PROMPT).await {
                Err(e) => return e,
                Ok(Some(Packet::PubAck(_))) => panic!("{topic}: the gateway acknowledged it"),
                Ok(Some(Packet::Publish(p))) => {
                    panic!("{topic}: the gateway answered on {}", p.topic)
                }
                Ok(Some(_)) => {}
                Ok(None) => panic!("{topic}: the connection is still open after {PROMPT:?}"),
            }
        }
    }

    /// Sends `batch` on the device's own uplink and returns the gateway's ack (the
    /// client must be subscribed to its `ack` topic).
    async fn send_batch(&mut self, batch: &UplinkBatch) -> Ack {
        let seen = self.publish(&topic(&self.id, "up"), frame(batch)).await;
        let ack_topic = topic(&self.id, "ack");
        let acks: Vec<Ack> = seen
            .iter()
            .filter_map(|p| match p {
                Packet::Publish(p) if p.topic == ack_topic => {
                    Some(wire::decode_ack(&p.payload, wire::DEFAULT_MAX_FRAME).unwrap())
                }
                _ => None,
            })
            .collect();
        assert_eq!(acks.len(), 1, "one ack before the PUBACK, got {seen:?}");
        acks.into_iter().next().unwrap()
    }
}

// ---------------------------------------------------------------------------------
// Raw TLS, for bytes no MQTT client would send

async fn raw_tls(gw: &Gateway, tls: Arc<ClientConfig>) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(gw.mqtt).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    TlsConnector::from(tls).connect(name, tcp).await.unwrap()
}

/// Everything the gateway sends until it closes the connection; panics if it keeps
/// the connection open past `PROMPT`.
async fn read_to_close(s: &mut TlsStream<TcpStream>) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match timeout(PROMPT, s.read(&mut buf))
            .await
            .expect("the gateway kept the connection open")
        {
            // A close without TLS close_notify reads as an error; either way it is closed.
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A CONNECT packet with the given protocol name and level, clean session, keep-alive
/// 60 s, no will, no credentials.
fn connect_packet(name: &str, level: u8, client_id: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend((name.len() as u16).to_be_bytes());
    body.extend(name.as_bytes());
    body.extend([level, 0x02]);
    body.extend(60u16.to_be_bytes());
    if level == 5 {
        body.push(0); // MQTT 5: no properties
    }
    body.extend((client_id.len() as u16).to_be_bytes());
    body.extend(client_id.as_bytes());
    assert!(body.len() < 128, "one-byte remaining length");
    [vec![0x10, body.len() as u8], body].concat()
}

/// CONNACK, session not present, return code 0 (accepted).
const CONNACK_ACCEPTED: [u8; 4] = [0x20, 0x02, 0x00, 0x00];

// ---------------------------------------------------------------------------------
// 1. A certificate confines a device to its own topics and session

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_publish_on_another_devices_topics() {
    let mut gw = Gateway::new(&[A, B], "");
    gw.start();
    let forged_ack = wire::encode_ack(
        &Ack {
            device: DeviceId(B.into()),
            acked: vec![SeqRange::single(Seq(1))],
            rejected: Vec::new(),
            gateway_time_ms: now_ms(),
        },
        Compression::None,
    )
    .unwrap();
    let forged_down = wire::encode_downlink(
        &Downlink::HelloReply {
            gateway_time_ms: now_ms(),
            audiences_version: 0,
        },
        Compression::None,
    )
    .unwrap();
    // Well-formed frames in B's name on each of B's topics, and frames on A's own
    // gateway-to-device topics, which no device may publish to either.
    let attempts = [
        (topic(B, "up"), frame(&batch(B, "forged", 1, 3))),
        (topic(B, "hello"), hello(B)),
        (topic(B, "ack"), forged_ack.clone()),
        (topic(B, "down"), forged_down.clone()),
        (topic(A, "ack"), forged_ack),
        (topic(A, "down"), forged_down),
        (
            format!("{}/x", topic(A, "up")),
            frame(&batch(A, "forged", 1, 3)),
        ),
    ];
    for (i, (t, payload)) in attempts.into_iter().enumerate() {
        let mut a = Mqtt::device(&gw, A).await;
        let ended = a.publish_refused(&t, payload).await;
        println!("publish by {A} on {t}: connection closed ({ended})");
        assert_eq!(metric(&gw, TOPIC_VIOLATIONS), i as u64 + 1, "{t}");
    }
    assert!(device_record(&gw, B).is_none(), "B has a record");
    assert_eq!(metric(&gw, EVENTS_STORED), 0);
    assert_eq!(metric(&gw, INBOX_EVENTS), 0);

    // The same certificate on its own topics works, so the refusals were about topics.
    let mut a = Mqtt::device(&gw, A).await;
    a.subscribe_own().await;
    let own = batch(A, "own", 1, 3);
    assert_acks(&a.send_batch(&own).await, &own);
    assert!(wait_until(PROMPT, || delivered_ids(&gw, "own").len() == 3));
    // The destination reads the inbox in order: anything forged would be out by now.
    assert!(delivered_ids(&gw, "forged").is_empty());
    assert_eq!(device_record(&gw, A).unwrap()["events"], 3);
    assert!(device_record(&gw, B).is_none(), "B has a record");
    assert_eq!(metric(&gw, TOPIC_VIOLATIONS), 7);
    assert_no_panic(&mut gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_subscribe_to_another_devices_topics() {
    let mut gw = Gateway::new(&[A, B], "");
    gw.start();
    let mut a = Mqtt::device(&gw, A).await;
    let b_down = topic(B, "down");
    assert_eq!(
        a.subscribe(&[&b_down]).await,
        [SubscribeReasonCode::Failure]
    );
    // Then in one SUBSCRIBE: B's other topics, wildcards that would cover them, and
    // (last) A's own ack topic, which is granted alongside the refusals.
    let (b_ack, b_any, a_ack) = (topic(B, "ack"), format!("edge/{B}/+"), topic(A, "ack"));
    let filters = [
        b_ack.as_str(),
        "edge/+/down",
        "edge/+/ack",
        b_any.as_str(),
        "edge/#",
        "#",
        "+/+/+",
        a_ack.as_str(),
    ];
    let codes = a.subscribe(&filters).await;
    let mut expected = vec![SubscribeReasonCode::Failure; filters.len() - 1];
    expected.push(SubscribeReasonCode::Success(QoS::AtLeastOnce));
    assert_eq!(codes, expected, "{filters:?}");
    assert_eq!(metric(&gw, TOPIC_VIOLATIONS), filters.len() as u64);

    // B gets its ack and its hello reply...
    let mut b = Mqtt::device(&gw, B).await;
    b.subscribe_own().await;
    let b_batch = batch(B, "b", 1, 2);
    assert_acks(&b.send_batch(&b_batch).await, &b_batch);
    let seen = b.publish(&topic(B, "hello"), hello(B)).await;
    assert!(
        seen.iter()
            .any(|p| matches!(p, Packet::Publish(p) if p.topic == b_down)),
        "no hello reply for B: {seen:?}"
    );
    // ...and none of it reaches A. The gateway finished with B (B has its PUBACKs), so
    // anything misrouted to A would already be on the wire: a short wait lets it show.
    match a.next_within(Duration::from_millis(300)).await {
        Ok(None) => {}
        Ok(Some(p)) => panic!("A received {p:?}"),
        Err(e) => panic!("A's connection ended: {e}"),
    }
    // A's connection outlived its refused subscriptions and still works.
    let a_batch = batch(A, "a", 1, 1);
    assert_acks(&a.send_batch(&a_batch).await, &a_batch);
    assert_no_panic(&mut gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_take_over_another_devices_session() {
    let mut gw = Gateway::new(&[A, B], "");
    gw.start();
    let mut b = Mqtt::device(&gw, B).await;
    b.subscribe_own().await;
    for client_id in [B, ""] {
        match connect(options(&gw, client_id, device_tls(&gw, A))).await {
            Err(ConnectionError::ConnectionRefused(ConnectReturnCode::BadClientId)) => {}
            Err(e) => panic!("client id {client_id:?} with A's certificate: {e}"),
            Ok(_) => panic!("A's certificate connected as {client_id:?}"),
        }
    }
    assert_eq!(metric(&gw, CONNECTS_REFUSED), 2);
    // B's connection is untouched: a takeover would have closed it, and this would fail.
    let b_batch = batch(B, "b", 1, 2);
    assert_acks(&b.send_batch(&b_batch).await, &b_batch);
    let record = device_record(&gw, B).unwrap();
    assert_eq!(record["connected"], true, "{record}");
    assert_eq!(record["events"], 2, "{record}");
    assert!(
        device_record(&gw, A).is_none(),
        "A's refused attempts left a record"
    );
    assert_no_panic(&mut gw);
}

// ---------------------------------------------------------------------------------
// 2. Who gets in at all

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_valid_client_certificate_fail_the_tls_handshake() {
    let mut gw = Gateway::new(&[A], "");
    gw.start();
    let pki = gw.pki();
    let ca = pki.join("ca.pem");
    // A certificate for A from another CA.
    let other_ca = tempfile::tempdir().unwrap();
    edge_gateway::pki::init(other_ca.path(), &[]).unwrap();
    let foreign =
        edge_gateway::pki::issue_device(other_ca.path(), A, Duration::from_secs(86_400)).unwrap();
    // An expired certificate for A from the gateway's CA (a copy of it, so the
    // gateway's own PKI dir stays as it made it).
    let same_ca = tempfile::tempdir().unwrap();
    for f in ["ca.pem", "ca.key"] {
        std::fs::copy(pki.join(f), same_ca.path().join(f)).unwrap();
    }
    let day = Duration::from_secs(86_400);
    let now = SystemTime::now();
    let expired =
        edge_gateway::pki::issue_device_with(same_ca.path(), A, now - 2 * day, now - day).unwrap();
    let (server_cert, server_key) = (pki.join("server.pem"), pki.join("server.key"));
    // Each with the TLS alert the gateway answers it with.
    let cases: [(&str, Identity<'_>, &str); 4] = [
        ("no certificate", None, "CertificateRequired"),
        (
            "another CA's certificate",
            Some((&foreign.cert, &foreign.key)),
            "UnknownCA",
        ),
        (
            "an expired certificate",
            Some((&expired.cert, &expired.key)),
            "CertificateExpired",
        ),
        // Right CA, but issued for server authentication only.
        (
            "the gateway's server certificate",
            Some((&server_cert, &server_key)),
            "UnsupportedCertificate",
        ),
    ];
    let versions = [&rustls::version::TLS13, &rustls::version::TLS12];
    let mut failed = 0;
    for (what, identity, alert) in cases {
        for version in versions {
            let v = version.version;
            match connect(options(&gw, A, tls_with(&ca, identity, version))).await {
                Ok(_) => panic!("{what} over {v:?}: connected"),
                Err(ConnectionError::ConnectionRefused(code)) => {
                    panic!("{what} over {v:?}: got as far as CONNACK ({code:?})")
                }
                Err(e) => {
                    println!("{what} over {v:?}: refused: {e}");
                    assert!(e.to_string().contains(alert), "{what} over {v:?}: {e}");
                }
            }
            failed += 1;
            // Counted in the connection's own task, possibly after the client gave up.
            assert!(
                wait_until(PROMPT, || metric(&gw, HANDSHAKES_FAILED) == failed),
                "{what} over {v:?}: handshakes_failed = {}, want {failed}",
                metric(&gw, HANDSHAKES_FAILED)
            );
        }
    }
    assert_eq!(
        metric(&gw, CONNECTS_REFUSED),
        0,
        "none got as far as CONNECT"
    );
    assert!(device_record(&gw, A).is_none());
    // A's real certificate gets in over either version.
    let (cert, key) = (
        pki.join(format!("devices/{A}.pem")),
        pki.join(format!("devices/{A}.key")),
    );
    for version in versions {
        let tls = tls_with(&ca, Some((&cert, &key)), version);
        connect(options(&gw, A, tls)).await.unwrap();
    }
    assert_eq!(metric(&gw, HANDSHAKES_FAILED), failed);
    assert_no_panic(&mut gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_gets_connack_not_authorized() {
    let mut gw = Gateway::new(
        &[A, B],
        "revoked = \"revoked.txt\"\nrevocation_reload = \"100ms\"",
    );
    let list = gw.data_dir.join("revoked.txt");
    std::fs::create_dir_all(&gw.data_dir).unwrap();
    std::fs::write(&list, format!("# lost in transit\n{B}\n")).unwrap();
    gw.start();
    match connect(options(&gw, B, device_tls(&gw, B))).await {
        Err(ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)) => {}
        Err(e) => panic!("revoked B: {e}"),
        Ok(_) => panic!("revoked B connected"),
    }
    assert_eq!(metric(&gw, CONNECTS_REFUSED), 1);
    assert_eq!(
        metric(&gw, HANDSHAKES_FAILED),
        0,
        "B's certificate is valid"
    );
    assert!(device_record(&gw, B).is_none());

    // A is not revoked...
    let mut a = Mqtt::device(&gw, A).await;
    a.subscribe_own().await;
    let a_batch = batch(A, "a", 1, 1);
    assert_acks(&a.send_batch(&a_batch).await, &a_batch);
    drop(a);
    // ...until it is: its next connects are refused once the list is reloaded.
    std::fs::write(&list, format!("{B}\n{A}\n")).unwrap();
    let deadline = Instant::now() + PROMPT;
    loop {
        match connect(options(&gw, A, device_tls(&gw, A))).await {
            Err(ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)) => break,
            Err(e) => panic!("A: {e}"),
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "A still connects after {PROMPT:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert_no_panic(&mut gw);
}

// ---------------------------------------------------------------------------------
// 3. Bad frames

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_naming_another_device_is_rejected_counted_and_not_stored() {
    let mut gw = Gateway::new(&[A, B], "");
    gw.start();
    let mut a = Mqtt::device(&gw, A).await;
    a.subscribe_own().await;
    // A's own topics, B's name inside. The PUBACK comes after the gateway handled the
    // frame, so an ack or hello reply, had there been one, would come before it.
    for (kind, payload) in [
        ("up", frame(&batch(B, "forged", 1, 3))),
        ("hello", hello(B)),
    ] {
        let seen = a.publish(&topic(A, kind), payload).await;
        assert!(
            matches!(seen[..], [Packet::PubAck(_)]),
            "{kind} in B's name: {seen:?}"
        );
    }
    assert!(
        wait_until(PROMPT, || frames_rejected(&gw, A) == 2),
        "frames_rejected of A: {}",
        frames_rejected(&gw, A)
    );
    assert_eq!(metric(&gw, FRAMES_REJECTED), 2);
    assert!(device_record(&gw, B).is_none(), "B has a record");
    assert_eq!(device_record(&gw, A).unwrap()["events"], 0);
    assert_eq!(metric(&gw, EVENTS_STORED), 0);
    assert_eq!(metric(&gw, INBOX_EVENTS), 0);

    // The connection stays A's and keeps working.
    let own = batch(A, "own", 1, 2);
    assert_acks(&a.send_batch(&own).await, &own);
    assert!(wait_until(PROMPT, || delivered_ids(&gw, "own").len() == 2));
    assert!(delivered_ids(&gw, "forged").is_empty());
    assert_eq!(metric(&gw, FRAMES_REJECTED), 2);
    assert_no_panic(&mut gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_frames_are_rejected_while_another_device_is_served() {
    let mut gw = Gateway::new(&[A, B], "");
    mqtt_settings(&gw, "max_packet_size = \"64KiB\"");
    gw.start();

    // B is a real agent, fed over HTTP until the barrage below is over.
    let mut agent = Agent::new(&gw.agent_config(B, ""), "");
    agent.start();
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let (addr, stop) = (agent.addr, Arc::clone(&stop));
        std::thread::spawn(move || {
            let auth = basic("test-key", "");
            let mut sent = 0;
            for r in 0.. {
                if r >= 5 && stop.load(Ordering::Relaxed) {
                    break;
                }
                let events: Vec<_> = (0..20)
                    .map(|i| {
                        let id = format!("good-{r}-{i}");
                        serde_json::json!({"type": "track", "event": "Played", "userId": "u-b", "messageId": id})
                    })
                    .collect();
                let body = serde_json::to_vec(&serde_json::json!({ "batch": events })).unwrap();
                let resp = post(addr, "/v1/batch", &auth, &body).unwrap();
                assert_eq!(resp.status, 200, "{}", resp.body);
                sent += 20;
            }
            sent
        })
    };

    let mut a = Mqtt::device(&gw, A).await;
    a.subscribe_own().await;
    let good = frame(&batch(A, "bad", 1, 3));
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let garbage: Vec<u8> = (0..2000).map(|_| rng.random()).collect();
    let mut bomb = vec![wire::VERSION, 0x01];
    bomb.extend(u32::MAX.to_le_bytes());
    bomb.extend([0u8; 16]);
    let mut compressed_garbage = vec![wire::VERSION, 0x01];
    compressed_garbage.extend(100u32.to_le_bytes());
    compressed_garbage.extend(&garbage[..64]);
    let with = |at: usize, byte: u8| {
        let mut f = good.clone();
        f[at] = byte;
        f
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("truncated to half", good[..good.len() / 2].to_vec()),
        ("one byte short", good[..good.len() - 1].to_vec()),
        ("trailing byte", [good.as_slice(), &[0]].concat()),
        ("unknown version", with(0, 0x7f)),
        ("unknown flags", with(1, 0x80)),
        ("decompression bomb", bomb),
        ("compressed garbage", compressed_garbage),
        ("garbage", garbage.clone()),
        (
            "garbage after a valid header",
            [&[wire::VERSION, 0][..], &garbage].concat(),
        ),
    ];
    for (what, payload) in &cases {
        let seen = a.publish(&topic(A, "up"), payload.clone()).await;
        assert!(matches!(seen[..], [Packet::PubAck(_)]), "{what}: {seen:?}");
    }
    let n = cases.len() as u64;
    assert!(
        wait_until(PROMPT, || frames_rejected(&gw, A) == n),
        "frames_rejected of A: {}, want {n}",
        frames_rejected(&gw, A)
    );
    assert_eq!(metric(&gw, FRAMES_REJECTED), n);

    // A valid frame over `max_packet_size`: the packet is refused from its header and
    // the connection closed (it cannot be skipped without reading it all).
    let mut big = batch(A, "big", 1, 1);
    big.events[0]
        .properties
        .insert("blob", Value::String("x".repeat(70_000).into()));
    let big = frame(&big);
    let size = big.len();
    assert!(size > 64 * 1024);
    let ended = a.publish_refused(&topic(A, "up"), big).await;
    println!("{size}-byte frame: connection closed ({ended})");

    // Bytes that are not MQTT at all, on raw TLS connections with A's certificate.
    let tls = device_tls(&gw, A);
    let connect_a = connect_packet("MQTT", 4, A);
    let raw_cases: [(&str, Vec<u8>); 4] = [
        // 0xde: not a CONNECT's first byte, whatever the random bytes after it.
        (
            "garbage instead of CONNECT",
            [&[0xde][..], &garbage[..200]].concat(),
        ),
        (
            "reserved packet type 15",
            [connect_a.clone(), vec![0xf0, 0x00]].concat(),
        ),
        // A PUBLISH whose header promises 256 MiB: refused before any of it is read.
        (
            "PUBLISH of 256 MiB",
            [connect_a.clone(), vec![0x32, 0xff, 0xff, 0xff, 0x7f]].concat(),
        ),
        (
            "bad remaining length",
            [connect_a.clone(), vec![0x32, 0xff, 0xff, 0xff, 0xff, 0x01]].concat(),
        ),
    ];
    for (what, bytes) in raw_cases {
        let mut s = raw_tls(&gw, Arc::clone(&tls)).await;
        s.write_all(&bytes).await.unwrap();
        let got = read_to_close(&mut s).await;
        let expect: &[u8] = if bytes.starts_with(&connect_a) {
            &CONNACK_ACCEPTED
        } else {
            &[]
        };
        assert_eq!(got, expect, "{what}: the gateway sent more than a CONNACK");
    }
    // A PUBLISH cut short by the end of the stream.
    let mut s = raw_tls(&gw, Arc::clone(&tls)).await;
    s.write_all(&[&connect_a[..], &[0x32, 100, 0, 11], b"edge/dev-1/"].concat())
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(read_to_close(&mut s).await, CONNACK_ACCEPTED);

    // B was served throughout: every event it took in arrives, all of them stored.
    stop.store(true, Ordering::Relaxed);
    let sent = feeder.join().unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || delivered_ids(&gw, "good").len()
            == sent),
        "B: {} of {sent} delivered; agent status {}",
        delivered_ids(&gw, "good").len(),
        agent.status()
    );
    let record = device_record(&gw, B).unwrap();
    assert_eq!(record["frames_rejected"], 0, "{record}");
    assert_eq!(record["events"], sent, "{record}");

    // A was never stored and can still connect and send.
    assert_eq!(device_record(&gw, A).unwrap()["events"], 0);
    let mut a = Mqtt::device(&gw, A).await;
    a.subscribe_own().await;
    let after = batch(A, "after", 1, 2);
    assert_acks(&a.send_batch(&after).await, &after);
    assert!(wait_until(PROMPT, || delivered_ids(&gw, "after").len() == 2));
    assert!(delivered_ids(&gw, "bad").is_empty());
    assert!(delivered_ids(&gw, "big").is_empty());
    assert_eq!(metric(&gw, FRAMES_REJECTED), n);
    drop(agent);
    assert_no_panic(&mut gw);
}

// ---------------------------------------------------------------------------------
// Protocol edges

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_for_another_mqtt_version_gets_connack_unacceptable_protocol_version() {
    let mut gw = Gateway::new(&[A], "");
    gw.start();
    let tls = device_tls(&gw, A);
    // MQTT 3.1.1 §3.1.2.2 [MQTT-3.1.2-2]: CONNACK 0x01, then close. MQTT 5 and 3.1
    // clients take that answer to mean "try another version".
    for (name, level) in [("MQTT", 5), ("MQIsdp", 3)] {
        let mut s = raw_tls(&gw, Arc::clone(&tls)).await;
        s.write_all(&connect_packet(name, level, A)).await.unwrap();
        assert_eq!(
            read_to_close(&mut s).await,
            [0x20, 0x02, 0x00, 0x01],
            "{name} level {level}"
        );
    }
    assert_eq!(metric(&gw, CONNECTS_REFUSED), 2);
    let mut s = raw_tls(&gw, Arc::clone(&tls)).await;
    s.write_all(&connect_packet("MQTT", 4, A)).await.unwrap();
    let mut connack = [0u8; 4];
    timeout(PROMPT, s.read_exact(&mut connack))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(connack, CONNACK_ACCEPTED);
    assert_no_panic(&mut gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos2_publish_completes_with_pubrec_and_pubcomp() {
    let mut gw = Gateway::new(&[A], "");
    gw.start();
    let mut a = Mqtt::device(&gw, A).await;
    a.subscribe_own().await;
    let b = batch(A, "qos2", 1, 2);
    let seen = a
        .publish_qos(&topic(A, "up"), frame(&b), QoS::ExactlyOnce)
        .await;
    let kinds: Vec<&str> = seen
        .iter()
        .map(|p| match p {
            Packet::Publish(_) => "PUBLISH",
            Packet::PubRec(_) => "PUBREC",
            Packet::PubComp(_) => "PUBCOMP",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["PUBLISH", "PUBREC", "PUBCOMP"], "{seen:?}");
    let Packet::Publish(ack) = &seen[0] else {
        unreachable!()
    };
    assert_acks(
        &wire::decode_ack(&ack.payload, wire::DEFAULT_MAX_FRAME).unwrap(),
        &b,
    );
    assert!(wait_until(PROMPT, || delivered_ids(&gw, "qos2").len() == 2));
    assert_no_panic(&mut gw);
}

// ---------------------------------------------------------------------------------
// 4. Idle sockets

/// Raises this process's soft open-files limit to `want` (within the hard limit) and
/// returns the (soft, hard) limits now in force. Children started afterwards (the
/// gateway) inherit it.
fn raise_open_files_limit(want: u64) -> (Option<u64>, Option<u64>) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current.is_some_and(|soft| soft < want) {
        limit.current = Some(limit.maximum.map_or(want, |hard| hard.min(want)));
        setrlimit(Resource::Nofile, limit).unwrap();
    }
    let now = getrlimit(Resource::Nofile);
    (now.current, now.maximum)
}

/// How long A takes to connect: TCP, TLS handshake, CONNECT, CONNACK.
async fn connect_time(gw: &Gateway, tls: &Arc<ClientConfig>) -> Duration {
    let start = Instant::now();
    let conn = connect(options(gw, A, Arc::clone(tls))).await.unwrap();
    let took = start.elapsed();
    drop(conn);
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_connections_do_not_delay_a_device_connect() {
    const IDLE: usize = 1000;
    const SAMPLES: usize = 5;
    let before = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    // 1000 sockets here and 1000 in the gateway, next to the other tests of this binary.
    let (soft, hard) = raise_open_files_limit(4 * IDLE as u64);
    let show = |n: Option<u64>| n.map_or("unlimited".to_owned(), |n| n.to_string());
    println!(
        "open files (ulimit -n): soft {} (was {}), hard {}",
        show(soft),
        show(before.current),
        show(hard)
    );
    let mut gw = Gateway::new(&[A], "");
    // Long enough that no idle socket is dropped by the gateway while we measure.
    mqtt_settings(&gw, "handshake_timeout = \"60s\"");
    gw.start();
    let tls = device_tls(&gw, A);
    let mut baseline = Vec::new();
    for _ in 0..SAMPLES {
        baseline.push(connect_time(&gw, &tls).await);
    }

    let idle: Vec<std::net::TcpStream> = (0..IDLE)
        .map(|_| std::net::TcpStream::connect(gw.mqtt).unwrap())
        .collect();
    let accepted = SAMPLES + IDLE;
    assert!(
        wait_until(PROMPT, || metric(&gw, CONNECTIONS_ACCEPTED)
            >= accepted as u64),
        "the gateway accepted {} connections, want {accepted}",
        metric(&gw, CONNECTIONS_ACCEPTED)
    );
    let mut loaded = Vec::new();
    for _ in 0..SAMPLES {
        loaded.push(connect_time(&gw, &tls).await);
    }
    // Every idle socket was still waiting in its handshake while we measured.
    assert_eq!(metric(&gw, HANDSHAKES_FAILED), 0);
    let ms = |d: &[Duration]| {
        d.iter()
            .map(|d| format!("{:.1}", d.as_secs_f64() * 1000.0))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("device connect (TCP + TLS + CONNECT/CONNACK), ms");
    println!("  no idle sockets:            {}", ms(&baseline));
    println!("  with {IDLE} idle TCP sockets: {}", ms(&loaded));
    let worst = loaded.iter().max().unwrap();
    assert!(
        *worst < Duration::from_secs(1),
        "connect took {worst:?} next to {IDLE} idle sockets"
    );

    drop(idle);
    // The gateway notices each close and frees its slot.
    assert!(
        wait_until(PROMPT, || metric(&gw, HANDSHAKES_FAILED) >= IDLE as u64),
        "{} of {IDLE} idle sockets released",
        metric(&gw, HANDSHAKES_FAILED)
    );
    assert_no_panic(&mut gw);
}

// ---------------------------------------------------------------------------------
// 5. Mosquitto's command-line clients

/// Runs a Mosquitto client as `device` (its certificate and client id) against the
/// gateway, MQTT 3.1.1 unless `args` says otherwise; kills it if it outlives `PROMPT`.
fn mosquitto(tool: &str, gw: &Gateway, device: &str, args: &[&str]) -> Output {
    let pki = gw.pki();
    let mut cmd = Command::new(tool);
    cmd.arg("--cafile")
        .arg(pki.join("ca.pem"))
        .arg("--cert")
        .arg(pki.join(format!("devices/{device}.pem")))
        .arg("--key")
        .arg(pki.join(format!("devices/{device}.key")))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &gw.mqtt.port().to_string(),
            "-i",
            device,
        ])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if !args.contains(&"-V") {
        cmd.args(["-V", "311"]);
    }
    let mut child = cmd.spawn().unwrap_or_else(|e| {
        panic!("{tool}: {e} (apt-get install mosquitto-clients, or run tests/run-all)")
    });
    if !wait_until(PROMPT, || child.try_wait().unwrap().is_some()) {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    println!(
        "{tool} {args:?}: {}\n  stdout: {}\n  stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
#[ignore = "needs mosquitto-clients (tests/run-all installs it)"]
fn mosquitto_clients_publish_durably_and_stay_within_their_topics() {
    let mut gw = Gateway::new(&[A, B], "");
    gw.start();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let (up_a, up_b) = (topic(A, "up"), topic(B, "up"));

    // mosquitto_pub at QoS 1 and 2: it exits 0 only once the gateway acknowledged
    // (PUBACK, PUBREC/PUBCOMP), which it does after the durable commit.
    let pub1 = write("pub1.bin", &frame(&batch(A, "mosq-q1", 1, 3)));
    let out = mosquitto(
        "mosquitto_pub",
        &gw,
        A,
        &["-q", "1", "-t", &up_a, "-f", &pub1],
    );
    assert!(out.status.success(), "{}", text(&out));
    let pub2 = write("pub2.bin", &frame(&batch(A, "mosq-q2", 4, 2)));
    let out = mosquitto(
        "mosquitto_pub",
        &gw,
        A,
        &["-q", "2", "-t", &up_a, "-f", &pub2],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(wait_until(PROMPT, || {
        delivered_ids(&gw, "mosq-q1").len() == 3 && delivered_ids(&gw, "mosq-q2").len() == 2
    }));

    // Subscribing to its own ack and downlink topics is granted. (Reading an ack takes a
    // client that subscribes and publishes on one connection: the gateway acks on the
    // connection that sent the batch, and a second connection with the device's client
    // id takes over the first (MQTT 3.1.1 §3.1.4-2), so a background mosquitto_sub cannot
    // see a mosquitto_pub's ack. mosquitto_rr would, but 2.0.11 publishes an empty
    // payload for `-f`/`-s`, and a frame, with its zero flags byte, cannot go in `-m`.
    // The rumqttc tests above read acks.) -W 1 bounds the wait: no message comes.
    let (ack_a, down_a) = (topic(A, "ack"), topic(A, "down"));
    let out = mosquitto(
        "mosquitto_sub",
        &gw,
        A,
        &[
            "-d", "-q", "1", "-t", &ack_a, "-t", &down_a, "-C", "1", "-W", "1",
        ],
    );
    assert!(
        text(&out).contains("Subscribed (mid: 1): 1, 1"),
        "{}",
        text(&out)
    );
    assert_eq!(
        out.status.code(),
        Some(27),
        "timed out, as nothing was sent"
    );

    // B's topics are out of reach. A refused subscription: mosquitto_sub reports it
    // (and, in 2.0.11, still exits 0).
    let down_b = topic(B, "down");
    let out = mosquitto(
        "mosquitto_sub",
        &gw,
        A,
        &["-d", "-q", "1", "-t", &down_b, "-C", "1", "-W", "10"],
    );
    let said = text(&out);
    assert!(said.contains("Subscribed (mid: 1): 128"), "{said}");
    assert!(
        said.contains("All subscription requests were denied"),
        "{said}"
    );
    // A publish on B's topics: the gateway closes the connection, mosquitto_pub fails.
    let forged = write("forged.bin", &frame(&batch(B, "mosq-forged", 1, 2)));
    let hello_b = write("hello-b.bin", &hello(B));
    let hello_b_topic = topic(B, "hello");
    for (t, f) in [(&up_b, &forged), (&hello_b_topic, &hello_b)] {
        let out = mosquitto("mosquitto_pub", &gw, A, &["-q", "1", "-t", t, "-f", f]);
        assert!(!out.status.success(), "publish on {t}: {}", text(&out));
    }
    assert_eq!(metric(&gw, TOPIC_VIOLATIONS), 3);
    assert!(device_record(&gw, B).is_none(), "B has a record");

    // MQTT 5 and 3.1 clients are told the version is not supported.
    for version in ["5", "31"] {
        let out = mosquitto(
            "mosquitto_pub",
            &gw,
            A,
            &["-V", version, "-q", "1", "-t", &up_a, "-f", &pub1],
        );
        assert!(!out.status.success(), "MQTT {version}: {}", text(&out));
        assert!(
            text(&out).to_lowercase().contains("protocol version"),
            "MQTT {version}: {}",
            text(&out)
        );
    }

    let record = device_record(&gw, A).unwrap();
    assert_eq!(record["events"], 5, "{record}");
    assert_eq!(record["frames_rejected"], 0, "{record}");
    assert_no_panic(&mut gw);
}
