//! Broker mode end to end, all real processes over mutual TLS: agent → Mosquitto (the
//! shipped conf/mosquitto.conf and ACLs, on a free port) → gateway consuming through a
//! shared subscription → file destination. Every event an app got a 2xx for arrives
//! exactly once, across broker restarts and gateway crashes; and the broker's ACLs keep
//! each device to its own topics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use edge_agent::model::{DeviceId, Event, EventKind, Seq, Source};
use edge_agent::wire::{self, Compression, Downlink, Hello, UplinkBatch};
use edge_tests::http::{get, post};
use edge_tests::mosquitto::Mosquitto;
use edge_tests::{basic, wait_until, Agent, Gateway};
use rand::Rng;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event as MqttEvent, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};

const DEVICE: &str = "dev-1";
const INTRUDER: &str = "dev-2";
/// A device of its own that only checks the gateway's subscriptions (`wait_subscribed`).
const PROBE: &str = "probe";

/// A gateway in broker mode and its Mosquitto, both running, with certificates for
/// `DEVICE` and `INTRUDER`, and the gateway's shared subscriptions in place (see
/// `wait_subscribed`). `gateway_mqtt` adds `[mqtt]` keys.
fn broker_site(gateway_mqtt: &str) -> (Gateway, Mosquitto) {
    let mut gw = Gateway::new(&[DEVICE, INTRUDER, PROBE], "");
    let mut broker = Mosquitto::new(&gw);
    broker.configure_gateway(&gw, gateway_mqtt);
    broker.start();
    gw.start();
    wait_subscribed(&gw, &broker);
    (gw, broker)
}

/// Waits until the broker routes device uplink to the gateway. The gateway answers
/// `/health` before its first SUBSCRIBE reaches the broker, and until then Mosquitto
/// drops every uplink message: there is no subscription, so no session to keep it in,
/// and the publisher still gets its PUBACK. Only the agent's resend after its ack
/// timeout recovers those (see `gateway/src/broker.rs`), so a test that rules resends
/// out must not let the agent publish earlier. A hello answered proves both filters:
/// the gateway subscribes `/up` before `/hello` on one connection, and the broker
/// handles them in order. From then on the gateway's persistent session holds them.
fn wait_subscribed(gw: &Gateway, broker: &Mosquitto) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let probe = Mqtt::connect(&rt, broker, &gw.pki(), PROBE, PROBE);
    let down = format!("edge/{PROBE}/down");
    probe.subscribe(&[&down]);
    let reply = probe.request(&format!("edge/{PROBE}/hello"), hello(PROBE), &down);
    assert!(matches!(
        wire::decode_downlink(&reply, 1 << 20).unwrap(),
        Downlink::HelloReply { .. }
    ));
    probe.client.try_disconnect().unwrap();
}

/// `broker_site` plus an agent for `DEVICE`; `uplink` replaces keys of its `[uplink]`.
fn site(uplink: &[(&str, &str)]) -> (Gateway, Mosquitto, Agent) {
    let (gw, broker) = broker_site("");
    let mut config = broker.agent_config(&gw, DEVICE, "");
    for (key, value) in uplink {
        let line = config
            .lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap()
            .to_owned();
        config = config.replacen(&line, &format!("{key} = {value}"), 1);
    }
    let mut agent = Agent::new(&config, "");
    agent.start();
    (gw, broker, agent)
}

fn batch_body(prefix: &str, n: usize) -> (Vec<String>, Vec<u8>) {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let batch: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            serde_json::json!({"type":"track","event":"Video Played","userId":format!("u{}", i % 50),"messageId":id,
                "properties":{"id":id,"position":i,"title":"The Long Road","hd":true}})
        })
        .collect();
    (
        ids,
        serde_json::to_vec(&serde_json::json!({ "batch": batch })).unwrap(),
    )
}

/// Asserts every id in `acked` was delivered exactly once and nothing twice.
fn assert_exactly_once(gw: &Gateway, acked: &[String]) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for line in &gw.delivered() {
        *seen
            .entry(line["messageId"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let dupes: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(dupes.is_empty(), "duplicates delivered: {dupes:?}");
    let missing: Vec<_> = acked.iter().filter(|id| !seen.contains_key(*id)).collect();
    assert!(
        missing.is_empty(),
        "acked but not delivered ({} of {}): {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
}

fn wait_drained(
    agent: &Agent,
    gw: &Gateway,
    broker: &Mosquitto,
    expected: usize,
    within: Duration,
) {
    let addr = agent.addr;
    let queued = wait_until(within, || {
        get(addr, "/v1/status")
            .map(|r| r.json()["totals"]["queued"] == 0)
            .unwrap_or(false)
    });
    let delivered =
        queued && wait_until(Duration::from_secs(30), || gw.delivered_count() >= expected);
    assert!(
        delivered,
        "{} of {expected} delivered; agent status: {}\nmosquitto log:\n{}",
        gw.delivered_count(),
        agent.status(),
        broker.log_text()
    );
}

/// Posts batches of 50 until `stop`; returns the ids the agent answered 200 for.
fn load(
    agent: &Agent,
    prefix: &'static str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<String>> {
    let addr = agent.addr;
    std::thread::spawn(move || {
        let auth = basic("test-key", "");
        let mut acked = Vec::new();
        let mut r = 0;
        while !stop.load(Ordering::Relaxed) {
            let (ids, body) = batch_body(&format!("{prefix}-{r}"), 50);
            r += 1;
            let resp = post(addr, "/v1/batch", &auth, &body).unwrap();
            assert_eq!(resp.status, 200, "{}", resp.body);
            acked.extend(ids);
            std::thread::sleep(Duration::from_millis(5));
        }
        acked
    })
}

#[test]
#[ignore = "needs mosquitto (tests/run-all installs it)"]
fn events_pass_through_mosquitto_to_the_gateway_exactly_once() {
    let (mut gw, broker, agent) = site(&[]);
    let auth = basic("test-key", "");
    let mut acked = Vec::new();
    for r in 0..200 {
        let (ids, body) = batch_body(&format!("mq-{r}"), 100);
        let resp = post(agent.addr, "/v1/batch", &auth, &body).unwrap();
        assert_eq!(resp.status, 200, "{}", resp.body);
        acked.extend(ids);
    }
    wait_drained(&agent, &gw, &broker, acked.len(), Duration::from_secs(120));
    assert_exactly_once(&gw, &acked);
    let delivered = gw.delivered();
    let one = delivered
        .iter()
        .find(|l| l["messageId"] == "mq-7-42")
        .unwrap();
    assert_eq!(one["event"], "Video Played");
    assert_eq!(one["userId"], "u42");
    assert_eq!(one["properties"]["position"], 42);
    assert_eq!(one["context"]["device"]["id"], DEVICE);
    let status = agent.status();
    assert_eq!(status["uplink"]["connected"], true, "{status}");
    assert!(
        status["uplink"]["clock_skew_ms"].is_number(),
        "no hello reply or ack: {status}"
    );
    let device = get(gw.http, &format!("/v1/devices/{DEVICE}"))
        .unwrap()
        .json();
    assert_eq!(device["events"], 20_000, "{device}");
    assert_eq!(device["frames_rejected"], 0, "{device}");
    let stopping = Instant::now();
    let (clean, log) = gw.stop_term();
    assert!(clean, "the gateway did not stop cleanly: {log}");
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "{:?}",
        stopping.elapsed()
    );
}

#[test]
#[ignore = "needs mosquitto (tests/run-all installs it)"]
fn mosquitto_restarted_under_load_loses_and_duplicates_nothing() {
    let (gw, mut broker, agent) = site(&[]);
    let stop = Arc::new(AtomicBool::new(false));
    let loader = load(&agent, "restart", Arc::clone(&stop));
    let mut rng = rand::rng();
    for round in 0..6 {
        std::thread::sleep(Duration::from_millis(rng.random_range(300..900)));
        // Alternate a crash (nothing saved) with a clean stop (sessions saved).
        broker.restart(round % 2 == 0);
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let acked = loader.join().unwrap();
    assert!(!acked.is_empty());
    wait_drained(&agent, &gw, &broker, acked.len(), Duration::from_secs(90));
    assert_exactly_once(&gw, &acked);
    let connects = agent.status()["uplink"]["connects"].as_u64().unwrap();
    assert!(
        connects >= 7,
        "the agent connected {connects} times across 6 restarts"
    );
}

/// The agent's ack timeout is far beyond the test's deadline, so the agent never resends:
/// whatever the killed gateway had received but not committed must come back from its
/// persistent session at the broker (the PUBACK waits for the commit), and what was
/// published while it was down must wait there. That is what the broker guarantees
/// once the session has its subscriptions, which `broker_site` waits for; uplink
/// published before that is dropped by the broker and only a resend recovers it.
#[test]
#[ignore = "needs mosquitto (tests/run-all installs it)"]
fn a_killed_gateway_gets_its_uncommitted_uplink_again_from_its_broker_session() {
    let (mut gw, broker, agent) = site(&[("ack_timeout", "\"10m\"")]);
    let stop = Arc::new(AtomicBool::new(false));
    let loader = load(&agent, "gwkill", Arc::clone(&stop));
    let mut rng = rand::rng();
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(rng.random_range(300..900)));
        gw.stop_kill();
        std::thread::sleep(Duration::from_millis(rng.random_range(100..400)));
        gw.start();
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let acked = loader.join().unwrap();
    let started = Instant::now();
    wait_drained(&agent, &gw, &broker, acked.len(), Duration::from_secs(60));
    assert_exactly_once(&gw, &acked);
    let status = agent.status();
    assert_eq!(
        status["uplink"]["connects"], 1,
        "the agent reconnected: {status}"
    );
    eprintln!(
        "drained {} events {:?} after the load stopped",
        acked.len(),
        started.elapsed()
    );
}

#[test]
#[ignore = "needs mosquitto (tests/run-all installs it)"]
fn mosquitto_acls_confine_each_device_to_its_own_topics() {
    let (gw, broker) = broker_site("");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pki = gw.pki();
    let device = Mqtt::connect(&rt, &broker, &pki, DEVICE, DEVICE);
    device.subscribe(&[
        &format!("edge/{DEVICE}/ack"),
        &format!("edge/{DEVICE}/down"),
    ]);
    // The intruder asks for the device's client id too: Mosquitto gives it its own
    // (`use_username_as_clientid`), so the device is not kicked off.
    let intruder = Mqtt::connect(&rt, &broker, &pki, INTRUDER, DEVICE);
    // Mosquitto 2.0 grants every SUBSCRIBE and checks `read` on delivery instead.
    intruder.subscribe(&[
        &format!("edge/{DEVICE}/ack"),
        &format!("edge/{DEVICE}/down"),
        &format!("edge/{INTRUDER}/ack"),
        &format!("edge/{INTRUDER}/down"),
    ]);

    // Forgeries on the device's uplink topics are refused by the broker.
    let forged = batch(DEVICE, &[100], "forged");
    assert_eq!(
        intruder.publish(&format!("edge/{DEVICE}/up"), forged),
        PubAckReason::NotAuthorized
    );
    assert_eq!(
        intruder.publish(&format!("edge/{DEVICE}/hello"), hello(DEVICE)),
        PubAckReason::NotAuthorized
    );
    assert_eq!(
        intruder.publish(&format!("edge/{DEVICE}/ack"), b"\x01x".to_vec()),
        PubAckReason::NotAuthorized
    );
    assert_eq!(
        intruder.publish(&format!("edge/{DEVICE}/down"), b"\x01x".to_vec()),
        PubAckReason::NotAuthorized
    );

    // The device's own traffic works: a hello reply on its down topic, an ack for its
    // batch on its ack topic. (Sent until answered: the gateway may not have
    // subscribed yet.)
    let reply = device.request(
        &format!("edge/{DEVICE}/hello"),
        hello(DEVICE),
        &format!("edge/{DEVICE}/down"),
    );
    assert!(matches!(
        wire::decode_downlink(&reply, 1 << 20).unwrap(),
        Downlink::HelloReply { .. }
    ));
    let ack = device.request(
        &format!("edge/{DEVICE}/up"),
        batch(DEVICE, &[1, 2, 3], "own"),
        &format!("edge/{DEVICE}/ack"),
    );
    let ack = wire::decode_ack(&ack, 1 << 20).unwrap();
    assert_eq!(ack.device, DeviceId(DEVICE.into()));
    assert_eq!((ack.acked[0].first, ack.acked[0].last), (Seq(1), Seq(3)));

    // A frame on the device's own topic naming another device is the gateway's to
    // refuse, counted on the sender.
    assert_eq!(
        device.publish(
            &format!("edge/{DEVICE}/up"),
            batch(INTRUDER, &[7], "claims")
        ),
        PubAckReason::Success
    );
    let addr = gw.http;
    assert!(
        wait_until(Duration::from_secs(10), || {
            get(addr, &format!("/v1/devices/{DEVICE}"))
                .map(|r| r.json()["frames_rejected"] == 1)
                .unwrap_or(false)
        }),
        "{}",
        get(addr, &format!("/v1/devices/{DEVICE}")).unwrap().body
    );

    // The intruder gets answers on its own topics only. Mosquitto delivers to a client
    // in order, and the device's ack and hello reply left the gateway before the
    // intruder's own requests were even sent, so they would have arrived first.
    intruder.request(
        &format!("edge/{INTRUDER}/hello"),
        hello(INTRUDER),
        &format!("edge/{INTRUDER}/down"),
    );
    intruder.request(
        &format!("edge/{INTRUDER}/up"),
        batch(INTRUDER, &[1], "intruder"),
        &format!("edge/{INTRUDER}/ack"),
    );
    let foreign: Vec<String> = intruder
        .received()
        .into_iter()
        .filter(|t| !t.starts_with(&format!("edge/{INTRUDER}/")))
        .collect();
    assert!(foreign.is_empty(), "the intruder read {foreign:?}");
    assert!(device
        .received()
        .iter()
        .all(|t| t.starts_with(&format!("edge/{DEVICE}/"))));
    device.assert_still_connected();

    // Nothing forged reached the store.
    let record = get(addr, &format!("/v1/devices/{DEVICE}")).unwrap().json();
    assert_eq!(record["events"], 3, "{record}");
    let intruder_record = get(addr, &format!("/v1/devices/{INTRUDER}"))
        .unwrap()
        .json();
    assert_eq!(intruder_record["events"], 1, "{intruder_record}");
    assert!(wait_until(Duration::from_secs(10), || gw.delivered_count() >= 4));
    let ids: Vec<String> = gw
        .delivered()
        .iter()
        .map(|l| l["messageId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 4, "{ids:?}");
    assert!(
        ids.iter()
            .all(|id| id.starts_with("own-") || id.starts_with("intruder-")),
        "{ids:?}"
    );
}

/// An uplink frame naming `claimed`, with events `seqs` (ids `<prefix>-<seq>`).
fn batch(claimed: &str, seqs: &[u64], prefix: &str) -> Vec<u8> {
    let events = seqs
        .iter()
        .map(|s| {
            let mut e = Event::new(EventKind::Track, Source::Local, edge_agent::model::now_ms());
            e.seq = Seq(*s);
            e.lane = "default".into();
            e.name = Some("Played".into());
            e.set_message_id(&format!("{prefix}-{s}"));
            e
        })
        .collect();
    let b = UplinkBatch {
        device: DeviceId(claimed.into()),
        lane: "default".into(),
        floor: Seq(1),
        sent_at_ms: edge_agent::model::now_ms(),
        drops: Default::default(),
        events,
    };
    wire::encode_batch(&b, Compression::None).unwrap()
}

fn hello(device: &str) -> Vec<u8> {
    let h = Hello {
        device: DeviceId(device.into()),
        agent_version: "test".into(),
        audiences_version: 0,
        config_version: 0,
        sent_at_ms: edge_agent::model::now_ms(),
    };
    wire::encode_hello(&h, Compression::None).unwrap()
}

/// A raw MQTT 5 client with a device certificate, driven from the test thread.
struct Mqtt {
    client: AsyncClient,
    packets: mpsc::Receiver<Result<Packet, String>>,
    /// Topics of every PUBLISH received so far.
    topics: Mutex<Vec<String>>,
    /// Payloads received and not yet claimed by `request`, by topic.
    payloads: Mutex<Vec<(String, Vec<u8>)>>,
    name: String,
}

const EXPECT_WITHIN: Duration = Duration::from_secs(15);

impl Mqtt {
    fn connect(
        rt: &tokio::runtime::Runtime,
        broker: &Mosquitto,
        pki: &Path,
        cert: &str,
        client_id: &str,
    ) -> Mqtt {
        let tls = edge_gateway::tls::client_config(
            &pki.join("ca.pem"),
            &pki.join(format!("devices/{cert}.pem")),
            &pki.join(format!("devices/{cert}.key")),
        )
        .unwrap();
        let mut opts =
            MqttOptions::new(client_id, broker.addr.ip().to_string(), broker.addr.port());
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let (tx, packets) = mpsc::channel();
        rt.spawn(async move {
            loop {
                let next = match eventloop.poll().await {
                    Ok(MqttEvent::Incoming(p)) => Ok(p),
                    Ok(MqttEvent::Outgoing(_)) => continue,
                    // No reconnect: a dropped connection is a finding.
                    Err(e) => Err(e.to_string()),
                };
                let end = next.is_err();
                if tx.send(next).is_err() || end {
                    return;
                }
            }
        });
        let mqtt = Mqtt {
            client,
            packets,
            topics: Mutex::default(),
            payloads: Mutex::default(),
            name: cert.into(),
        };
        mqtt.expect("CONNACK", |p| matches!(p, Packet::ConnAck(_)));
        mqtt
    }

    /// Waits for a packet matching `want`, recording every PUBLISH on the way.
    fn expect(&self, what: &str, want: impl Fn(&Packet) -> bool) -> Packet {
        self.wait(what, EXPECT_WITHIN, want)
            .unwrap_or_else(|| panic!("{}: no {what} within {EXPECT_WITHIN:?}", self.name))
    }

    fn wait(&self, what: &str, within: Duration, want: impl Fn(&Packet) -> bool) -> Option<Packet> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let packet = match self.packets.recv_timeout(left) {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => panic!("{}: connection lost waiting for {what}: {e}", self.name),
                Err(_) => return None,
            };
            if let Packet::Publish(p) = &packet {
                let topic = String::from_utf8_lossy(&p.topic).into_owned();
                self.topics.lock().unwrap().push(topic.clone());
                self.payloads
                    .lock()
                    .unwrap()
                    .push((topic, p.payload.to_vec()));
            }
            if want(&packet) {
                return Some(packet);
            }
        }
    }

    fn subscribe(&self, filters: &[&str]) {
        for f in filters {
            self.client.try_subscribe(*f, QoS::AtLeastOnce).unwrap();
            self.expect("SUBACK", |p| matches!(p, Packet::SubAck(_)));
        }
    }

    /// Publishes at QoS 1 and returns the broker's PUBACK reason.
    fn publish(&self, topic: &str, payload: Vec<u8>) -> PubAckReason {
        self.client
            .try_publish(topic, QoS::AtLeastOnce, false, payload)
            .unwrap();
        match self.expect("PUBACK", |p| matches!(p, Packet::PubAck(_))) {
            Packet::PubAck(ack) => ack.reason,
            _ => unreachable!(),
        }
    }

    /// Publishes `payload` on `topic` every second until a message arrives on `reply`;
    /// returns its payload.
    fn request(&self, topic: &str, payload: Vec<u8>, reply: &str) -> Vec<u8> {
        let deadline = Instant::now() + EXPECT_WITHIN;
        while Instant::now() < deadline {
            self.client
                .try_publish(topic, QoS::AtLeastOnce, false, payload.clone())
                .unwrap();
            let _ = self.wait(
                reply,
                Duration::from_secs(1),
                |p| matches!(p, Packet::Publish(m) if m.topic == reply.as_bytes()),
            );
            let mut seen = self.payloads.lock().unwrap();
            if let Some(i) = seen.iter().position(|(t, _)| t == reply) {
                return seen.remove(i).1;
            }
        }
        panic!("{}: no answer on {reply} to {topic}", self.name);
    }

    /// Topics of all messages received so far (after draining what is queued).
    fn received(&self) -> Vec<String> {
        while let Some(p) = self.wait("anything", Duration::from_millis(1), |_| true) {
            drop(p);
        }
        self.topics.lock().unwrap().clone()
    }

    fn assert_still_connected(&self) {
        self.received();
        assert_eq!(
            self.publish(&format!("edge/{}/hello", self.name), hello(&self.name)),
            PubAckReason::Success
        );
    }
}
