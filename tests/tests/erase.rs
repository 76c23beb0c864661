//! Erasure (GDPR) reaches the device: `DELETE /v1/profiles/{type}/{value}` on the
//! gateway removes the profile and queues a `PurgeUser` for every device that held the
//! user; the device's agent deletes that user's spooled events, whether it is online at
//! the time or connects later (across a gateway restart), and they never reach a
//! destination. The queued purge leaves the gateway only when the device acknowledged
//! it. Real `edge-gateway` and `edge-agent` processes over MQTT/mTLS; a real rumqttc
//! client plays a device that withholds its PUBACK.
//!
//! The agent's only lane sends in batch mode with a one-hour interval: its first batch
//! goes at once, later events wait in the spool while it stays connected, which holds
//! them there without cutting the link. A restarted agent sends its first batch at
//! once again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use edge_agent::model::{now_ms, DeviceId, Event, EventKind, Seq, Source};
use edge_agent::spool::Drops;
use edge_agent::wire::{self, Compression, Control, Downlink, Hello, UplinkBatch};
use edge_tests::http::{get, post, request, Response};
use edge_tests::{basic, wait_until, Agent, Gateway};
use rumqttc::{AsyncClient, Event as MqttEvent, EventLoop, MqttOptions, Packet, Publish, QoS};
use rumqttc::{TlsConfiguration, Transport};
use tokio::time::timeout;

const DEVICE: &str = "dev-1";
const ERASED: &str = "u-erase";
const KEPT: &str = "u-keep";
/// Longest wait for anything that should happen promptly.
const PROMPT: Duration = Duration::from_secs(30);

/// First batch at once, then nothing for an hour (see the module doc).
const HOLD_LANE: &str =
    "[[uplink.lanes]]\nname = \"default\"\nmode = \"batch\"\ninterval = \"1h\"\n";

fn site() -> (Gateway, Agent) {
    let mut gw = Gateway::new(&[DEVICE], "");
    gw.start();
    let agent = Agent::new(&gw.agent_config(DEVICE, HOLD_LANE), "");
    (gw, agent)
}

/// Tracks with message ids `<tag>-<i>` for `user`, whose anonymous id is `anon-<user>`.
fn tracks(user: &str, tag: &str, n: usize) -> Vec<serde_json::Value> {
    (0..n)
        .map(|i| {
            serde_json::json!({"type": "track", "event": "Video Played", "userId": user,
                "anonymousId": format!("anon-{user}"), "messageId": format!("{tag}-{i}"),
                "properties": {"position": i, "tag": format!("{tag}-{i}")}})
        })
        .collect()
}

fn send(agent: &Agent, events: Vec<serde_json::Value>) {
    let body = serde_json::to_vec(&serde_json::json!({ "batch": events })).unwrap();
    let r = post(agent.addr, "/v1/batch", &basic("test-key", ""), &body).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

/// The `tag` property of every delivered event.
fn delivered_ids(gw: &Gateway) -> BTreeSet<String> {
    gw.delivered()
        .iter()
        .filter_map(|l| l["properties"]["tag"].as_str().map(str::to_owned))
        .collect()
}

fn ids(tag: &str, n: usize) -> BTreeSet<String> {
    (0..n).map(|i| format!("{tag}-{i}")).collect()
}

fn profile(gw: &Gateway, user: &str) -> Response {
    get(gw.http, &format!("/v1/profiles/customer_id/{user}")).unwrap()
}

fn erase(gw: &Gateway, user: &str) -> serde_json::Value {
    let r = request(
        gw.http,
        "DELETE",
        &format!("/v1/profiles/customer_id/{user}"),
        &[],
        &[],
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let body = r.json();
    assert!(
        body["devices"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d == DEVICE)),
        "the erase names the device: {body}"
    );
    assert!(body["purges_queued"].as_u64() >= Some(1), "{body}");
    body
}

/// Starts the agent and waits until the gateway answered its hello (so its first
/// batch is the next thing it sends).
fn start_greeted(agent: &mut Agent) {
    agent.start();
    assert!(
        wait_until(PROMPT, || agent.status()["uplink"]["greeted"] == true),
        "no hello reply: {}",
        agent.status()
    );
}

/// Both users send a first round that reaches the destination and makes their
/// profiles, then a second round that stays in the agent's spool.
fn deliver_then_hold(gw: &Gateway, agent: &mut Agent) {
    start_greeted(agent);
    let mut first = tracks(ERASED, "e1", 3);
    first.extend(tracks(KEPT, "k1", 2));
    send(agent, first);
    let expected: BTreeSet<String> = ids("e1", 3).into_iter().chain(ids("k1", 2)).collect();
    assert!(
        wait_until(PROMPT, || delivered_ids(gw).is_superset(&expected)),
        "first round not delivered: {:?}; agent: {}",
        delivered_ids(gw),
        agent.status()
    );
    assert!(
        wait_until(PROMPT, || profile(gw, ERASED).status == 200
            && profile(gw, KEPT).status == 200),
        "profiles not made: {}",
        profile(gw, ERASED).body
    );
    assert!(wait_until(PROMPT, || agent.status()["totals"]["queued"] == 0));

    let mut second = tracks(ERASED, "e2", 4);
    second.extend(tracks(KEPT, "k2", 3));
    send(agent, second);
    assert_eq!(agent.status()["totals"]["queued"], 7, "held in the spool");
}

/// What the agent's spool holds: `(tag, user id)` (agent stopped).
fn spooled(agent: &Agent) -> Vec<(String, Option<String>)> {
    agent
        .export()
        .iter()
        .map(|e| {
            let id = e["properties"]["tag"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let user = e["identities"]["user_id"].as_str().map(str::to_owned);
            (id, user)
        })
        .collect()
}

fn assert_second_round_of_kept_only(gw: &Gateway) {
    let kept = ids("k2", 3);
    assert!(
        wait_until(PROMPT, || delivered_ids(gw).is_superset(&kept)),
        "the kept user's held events were not delivered: {:?}",
        delivered_ids(gw)
    );
    let delivered = delivered_ids(gw);
    let leaked: Vec<_> = delivered
        .iter()
        .filter(|id| id.starts_with("e2-"))
        .collect();
    assert!(
        leaked.is_empty(),
        "erased user's events delivered: {leaked:?}"
    );
    assert_eq!(
        profile(gw, ERASED).status,
        404,
        "{}",
        profile(gw, ERASED).body
    );
    assert_eq!(profile(gw, KEPT).status, 200);
}

#[test]
fn an_online_agent_purges_the_erased_users_spooled_events_and_they_are_never_delivered() {
    let (gw, mut agent) = site();
    deliver_then_hold(&gw, &mut agent);

    erase(&gw, ERASED);
    assert!(
        wait_until(PROMPT, || {
            let s = agent.status();
            s["erasure"]["events_erased"] == 4 && s["totals"]["queued"] == 3
        }),
        "the agent did not purge: {}",
        agent.status()
    );
    let status = agent.status();
    assert!(
        status["erasure"]["purged_users"].as_u64() >= Some(1),
        "{status}"
    );
    assert_eq!(
        status["totals"]["dropped"]["consent_purged"], 0,
        "an erasure is not counted as a drop: {status}"
    );
    assert_eq!(profile(&gw, ERASED).status, 404);

    let (ok, log) = agent.stop_term();
    assert!(ok, "{log}");
    let held = spooled(&agent);
    let held_ids: BTreeSet<String> = held.iter().map(|h| h.0.clone()).collect();
    assert_eq!(held_ids, ids("k2", 3), "{held:?}");
    assert!(
        held.iter().all(|h| h.1.as_deref() == Some(KEPT)),
        "{held:?}"
    );

    // The restarted agent sends its first batch at once: only the kept user's events.
    start_greeted(&mut agent);
    assert_second_round_of_kept_only(&gw);
}

#[test]
fn an_agent_offline_during_the_erase_purges_on_connect_even_after_a_gateway_restart() {
    let (mut gw, mut agent) = site();
    deliver_then_hold(&gw, &mut agent);
    let (ok, log) = agent.stop_term();
    assert!(ok, "{log}");

    erase(&gw, ERASED);
    // The queued purge is durable: a crash of the gateway does not lose it.
    gw.stop_kill();
    gw.start();

    // The agent holds its spool until the hello reply, and the purge comes before it.
    start_greeted(&mut agent);
    assert_second_round_of_kept_only(&gw);
    let status = agent.status();
    assert_eq!(status["erasure"]["events_erased"], 4, "{status}");
    assert!(
        status["erasure"]["purged_users"].as_u64() >= Some(1),
        "{status}"
    );
    assert!(wait_until(PROMPT, || agent.status()["totals"]["queued"] == 0));
    let (ok, log) = agent.stop_term();
    assert!(ok, "{log}");
    assert!(spooled(&agent).is_empty());
}

// ---------------------------------------------------------------------------------
// A device that withholds its PUBACK (rumqttc with manual acks)

struct Device {
    client: AsyncClient,
    events: EventLoop,
}

impl Device {
    async fn connect(gw: &Gateway) -> Device {
        let pki = gw.pki();
        let tls = edge_gateway::tls::client_config(
            &pki.join("ca.pem"),
            &pki.join(format!("devices/{DEVICE}.pem")),
            &pki.join(format!("devices/{DEVICE}.key")),
        )
        .unwrap();
        let mut o = MqttOptions::new(DEVICE, "127.0.0.1", gw.mqtt.port());
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        o.set_keep_alive(Duration::from_secs(30));
        o.set_manual_acks(true);
        let (client, events) = AsyncClient::new(o, 16);
        let mut d = Device { client, events };
        loop {
            if let Packet::ConnAck(_) = d.next().await {
                break;
            }
        }
        d.client
            .subscribe(format!("edge/{DEVICE}/ack"), QoS::AtLeastOnce)
            .await
            .unwrap();
        d.client
            .subscribe(format!("edge/{DEVICE}/down"), QoS::AtLeastOnce)
            .await
            .unwrap();
        let mut subacks = 0;
        while subacks < 2 {
            if let Packet::SubAck(_) = d.next().await {
                subacks += 1;
            }
        }
        d
    }

    async fn next(&mut self) -> Packet {
        loop {
            match timeout(PROMPT, self.events.poll())
                .await
                .expect("nothing from the gateway in time")
            {
                Ok(MqttEvent::Incoming(p)) => return p,
                Ok(MqttEvent::Outgoing(_)) => {}
                Err(e) => panic!("the connection ended: {e}"),
            }
        }
    }

    /// Says hello; returns the downlinks that came before the hello reply (the reply
    /// ends what the gateway had queued), unacknowledged.
    async fn hello(&mut self) -> Vec<(Publish, Downlink)> {
        let hello = Hello {
            device: DeviceId(DEVICE.into()),
            agent_version: "test".into(),
            audiences_version: 0,
            config_version: 0,
            sent_at_ms: now_ms(),
        };
        let frame = wire::encode_hello(&hello, Compression::None).unwrap();
        self.client
            .publish(
                format!("edge/{DEVICE}/hello"),
                QoS::AtLeastOnce,
                false,
                frame,
            )
            .await
            .unwrap();
        let mut before = Vec::new();
        loop {
            let Packet::Publish(p) = self.next().await else {
                continue;
            };
            if p.topic != format!("edge/{DEVICE}/down") {
                continue;
            }
            let msg = wire::decode_downlink(&p.payload, wire::DEFAULT_MAX_FRAME).unwrap();
            if let Downlink::HelloReply { .. } = msg {
                self.client.ack(&p).await.unwrap();
                return before;
            }
            before.push((p, msg));
        }
    }

    /// Sends one batch of `n` tracks for `user` and waits for the gateway's ack.
    async fn send_batch(&mut self, user: &str, n: u64) {
        let events = (0..n)
            .map(|i| {
                let mut e = Event::new(EventKind::Track, Source::Segment, now_ms());
                e.set_message_id(&format!("raw-{user}-{i}"));
                e.seq = Seq(1 + i);
                e.name = Some("Probe".into());
                e.identities.device_id = DeviceId(DEVICE.into());
                e.identities.user_id = Some(user.into());
                e.identities.anonymous_id = Some(format!("anon-{user}").into());
                e.lane = "default".into();
                e
            })
            .collect();
        let batch = UplinkBatch {
            device: DeviceId(DEVICE.into()),
            lane: "default".into(),
            floor: Seq(1),
            sent_at_ms: now_ms(),
            drops: Drops::default(),
            events,
        };
        let frame = wire::encode_batch(&batch, Compression::None).unwrap();
        self.client
            .publish(format!("edge/{DEVICE}/up"), QoS::AtLeastOnce, false, frame)
            .await
            .unwrap();
        loop {
            if let Packet::Publish(p) = self.next().await {
                if p.topic == format!("edge/{DEVICE}/ack") {
                    self.client.ack(&p).await.unwrap();
                    return;
                }
            }
        }
    }

    async fn close(mut self) {
        let _ = self.client.disconnect().await;
        let _ = timeout(Duration::from_secs(2), async {
            while self.events.poll().await.is_ok() {}
        })
        .await;
    }
}

fn purged_users(downlinks: &[(Publish, Downlink)]) -> BTreeSet<String> {
    downlinks
        .iter()
        .map(|(_, d)| match d {
            Downlink::Control(Control::PurgeUser { user_id }) => user_id.clone(),
            other => panic!("unexpected downlink before the hello reply: {other:?}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_purge_survives_a_gateway_restart_and_leaves_only_on_the_devices_puback() {
    let mut gw = Gateway::new(&[DEVICE], "");
    gw.start();
    let mut device = Device::connect(&gw).await;
    assert!(device.hello().await.is_empty(), "nothing queued yet");
    device.send_batch("u-raw", 2).await;
    let gw_http = gw.http;
    let made = tokio::task::spawn_blocking(move || {
        wait_until(PROMPT, || {
            get(gw_http, "/v1/profiles/customer_id/u-raw").is_ok_and(|r| r.status == 200)
        })
    });
    assert!(made.await.unwrap(), "profile not made");

    // Erased while the device is connected: it gets the purges (customer id and
    // anonymous id) at once; no PUBACK.
    let erased = request(
        gw.http,
        "DELETE",
        "/v1/profiles/customer_id/u-raw",
        &[],
        &[],
    )
    .unwrap();
    assert_eq!(erased.status, 200, "{}", erased.body);
    let live = loop {
        if let Packet::Publish(p) = device.next().await {
            break p;
        }
    };
    assert_eq!(live.topic, format!("edge/{DEVICE}/down"));
    let Downlink::Control(Control::PurgeUser { user_id }) =
        wire::decode_downlink(&live.payload, wire::DEFAULT_MAX_FRAME).unwrap()
    else {
        panic!("expected a purge");
    };
    assert!(
        ["u-raw", "anon-u-raw"].contains(&user_id.as_str()),
        "{user_id}"
    );
    device.close().await;

    // Not acknowledged, so still queued, across a gateway crash.
    gw.stop_kill();
    gw.start();
    let mut device = Device::connect(&gw).await;
    let again = device.hello().await;
    let users = purged_users(&again);
    assert!(users.contains("u-raw"), "{users:?}");
    // Acknowledge them now; a second hello on the same connection gets the reply with
    // nothing before it once the gateway has removed them.
    for (p, _) in &again {
        device.client.ack(p).await.unwrap();
    }
    assert!(device.hello().await.is_empty(), "removed on PUBACK");
    device.close().await;

    gw.stop_kill();
    gw.start();
    let mut device = Device::connect(&gw).await;
    assert!(device.hello().await.is_empty(), "removed durably");
    device.close().await;
}
