//! One device connection: handshake, CONNECT checks, then the packet loop.
//!
//! Downlinks: once the device has subscribed to its down topic and said hello, the
//! connection sends what the store queues for it ([`crate::downlink`]): at each hello
//! everything still queued, before the hello reply (so an agent that waits for the
//! reply has carried them out before it sends its spool), and later whatever
//! [`Downlinks::queue`](crate::downlink::Downlinks::queue) wakes it for. Each is
//! removed from the store when the device's PUBACK for its packet id arrives.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use edge_agent::model::DeviceId;
use futures_util::{SinkExt, StreamExt};
use rumqttc::mqttbytes::v4::{
    Codec, ConnAck, ConnectReturnCode, Packet, PubAck, PubComp, PubRec, Publish, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{Error as MqttError, QoS};
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder, Framed};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Endpoint, EndpointMetrics};
use crate::downlink::Window;
use crate::ingress::{self, IngressError};
use crate::tls::peer_device_id;

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("TLS handshake timed out")]
    HandshakeTimeout,
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("no usable identity: {0}")]
    Identity(String),
    #[error("no CONNECT in time")]
    ConnectTimeout,
    #[error("first packet was not CONNECT")]
    NotConnect,
    /// The CONNECT is for another protocol version (MQTT 5, MQTT 3.1); refused with
    /// CONNACK 0x01.
    #[error("CONNECT is not MQTT 3.1.1")]
    UnsupportedProtocol,
    #[error("client id `{client_id}` is not the certificate's device `{device}`")]
    ClientIdMismatch { client_id: String, device: String },
    #[error("device `{0}` is revoked")]
    Revoked(String),
    #[error("MQTT protocol error: {0}")]
    Protocol(String),
    #[error("device `{device}` used topic `{topic}` it may not")]
    Topic { device: String, topic: String },
    #[error("keep-alive expired")]
    KeepAlive,
    #[error("the store failed: {0}")]
    Store(String),
}

type Conn = Framed<tokio_rustls::server::TlsStream<TcpStream>, DeviceCodec>;

pub(super) async fn serve(
    ep: &Endpoint,
    stream: TcpStream,
    shutdown: CancellationToken,
) -> Result<(), ConnError> {
    let tls =
        match tokio::time::timeout(ep.config.handshake_timeout, ep.acceptor.accept(stream)).await {
            Err(_) => {
                EndpointMetrics::inc(&ep.metrics.handshakes_failed);
                return Err(ConnError::HandshakeTimeout);
            }
            Ok(Err(e)) => {
                EndpointMetrics::inc(&ep.metrics.handshakes_failed);
                return Err(ConnError::Handshake(e));
            }
            Ok(Ok(s)) => s,
        };
    let device = peer_device_id(tls.get_ref().1).map_err(|e| ConnError::Identity(e.to_string()))?;
    let max = usize::try_from(ep.config.max_packet_size.0).unwrap_or(usize::MAX);
    let mut conn: Conn = Framed::new(
        tls,
        DeviceCodec(Codec {
            max_incoming_size: max,
            max_outgoing_size: max,
        }),
    );

    let refuse = |code| {
        Packet::ConnAck(ConnAck {
            session_present: false,
            code,
        })
    };
    let first = tokio::time::timeout(ep.config.connect_timeout, conn.next()).await;
    let connect = match first {
        Err(_) => return Err(ConnError::ConnectTimeout),
        Ok(Some(Ok(Packet::Connect(c)))) => c,
        Ok(Some(Ok(_))) => return Err(ConnError::NotConnect),
        // MQTT 3.1.1 §3.1.2.2 [MQTT-3.1.2-2]; MQTT 5 and 3.1 clients read it too.
        Ok(Some(Err(MqttError::InvalidProtocol | MqttError::InvalidProtocolLevel(_)))) => {
            EndpointMetrics::inc(&ep.metrics.connects_refused);
            let _ = conn
                .send(refuse(ConnectReturnCode::RefusedProtocolVersion))
                .await;
            return Err(ConnError::UnsupportedProtocol);
        }
        Ok(Some(Err(e))) => return Err(ConnError::Protocol(e.to_string())),
        Ok(None) => return Err(ConnError::NotConnect),
    };
    if connect.client_id != device.0 {
        EndpointMetrics::inc(&ep.metrics.connects_refused);
        let _ = conn.send(refuse(ConnectReturnCode::BadClientId)).await;
        return Err(ConnError::ClientIdMismatch {
            client_id: connect.client_id,
            device: device.0,
        });
    }
    if ep.revoked.is_revoked(&device) {
        EndpointMetrics::inc(&ep.metrics.connects_refused);
        let _ = conn.send(refuse(ConnectReturnCode::NotAuthorized)).await;
        return Err(ConnError::Revoked(device.0));
    }
    let topics = ep
        .topics
        .for_device(&device)
        .map_err(|e| ConnError::Identity(e.to_string()))?;
    let mut reg = ep.sessions.register(&device);
    // We keep no MQTT session state between connections: the agent's spool and the
    // hello exchange carry everything, so `session_present` is always false and the
    // client subscribes again (MQTT 3.1.1 §3.2.2.2).
    conn.send(Packet::ConnAck(ConnAck {
        session_present: false,
        code: ConnectReturnCode::Success,
    }))
    .await
    .map_err(|e| ConnError::Protocol(e.to_string()))?;
    info!(device = %device, "Device connected.");

    let keep_alive = match connect.keep_alive {
        0 => Duration::from_secs(24 * 3600),
        s => Duration::from_millis(u64::from(s) * 1500),
    };
    let mut session = Session {
        ep,
        device: device.clone(),
        pkid: 0,
        subscribed_ack: false,
        subscribed_down: false,
        greeted: false,
        window: Window::default(),
        bucket: Bucket::new(ep.config.device_events_per_second),
    };
    let result = loop {
        tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            () = reg.kicked.cancelled() => {
                info!(device = %device, "Connection taken over by a newer one.");
                break Ok(());
            }
            Some(frame) = reg.downlink.recv() => {
                if session.subscribed_down {
                    if let Err(e) = session.publish(&mut conn, topics.down(), frame).await {
                        break Err(e);
                    }
                }
            }
            () = reg.wake.notified() => {
                if let Err(e) = session.send_queued(&mut conn, &topics).await {
                    break Err(e);
                }
            }
            packet = tokio::time::timeout(keep_alive, conn.next()) => {
                let packet = match packet {
                    Err(_) => break Err(ConnError::KeepAlive),
                    Ok(None) => break Ok(()),
                    Ok(Some(Err(e))) => break Err(ConnError::Protocol(e.to_string())),
                    Ok(Some(Ok(p))) => p,
                };
                match session.handle(&mut conn, &topics, packet).await {
                    Ok(true) => {}
                    Ok(false) => break Ok(()),
                    Err(e) => break Err(e),
                }
            }
        }
    };
    ep.sessions.unregister(&device, reg.conn);
    if let Err(e) = &result {
        warn!(device = %device, error = %e, "Device connection closed.");
    }
    result
}

struct Session<'a> {
    ep: &'a Endpoint,
    device: DeviceId,
    pkid: u16,
    subscribed_ack: bool,
    subscribed_down: bool,
    /// The device said hello on this connection: queued downlinks may go.
    greeted: bool,
    /// Queued downlinks sent on this connection and not yet acknowledged.
    window: Window,
    bucket: Bucket,
}

impl Session<'_> {
    /// Sends a QoS 1 PUBLISH; returns its packet id.
    async fn publish(
        &mut self,
        conn: &mut Conn,
        topic: &str,
        payload: Vec<u8>,
    ) -> Result<u16, ConnError> {
        // Skip ids still held by unacknowledged downlinks: a PUBACK must settle the
        // message it answers, not an ack frame that reused the id after a wrap.
        loop {
            self.pkid = self.pkid.checked_add(1).unwrap_or(1).max(1);
            if !self.window.holds(self.pkid) {
                break;
            }
        }
        let mut p = Publish::new(topic, QoS::AtLeastOnce, payload);
        p.pkid = self.pkid;
        conn.send(Packet::Publish(p))
            .await
            .map_err(|e| ConnError::Protocol(e.to_string()))?;
        Ok(self.pkid)
    }

    /// Sends queued downlinks not yet sent on this connection, as many as the window
    /// has room for. A failed store read is logged; the next hello or PUBACK retries.
    async fn send_queued(
        &mut self,
        conn: &mut Conn,
        topics: &edge_agent::wire::DeviceTopics,
    ) -> Result<(), ConnError> {
        if !(self.subscribed_down && self.greeted) || self.window.room() == 0 {
            return Ok(());
        }
        let queued = match self.ep.downlinks.read_after(
            &self.device,
            self.window.sent_through(),
            self.window.room(),
        ) {
            Ok(q) => q,
            Err(e) => {
                warn!(device = %self.device, error = %e, "Queued downlinks not read; they go after the next hello.");
                return Ok(());
            }
        };
        for (id, frame) in queued {
            let pkid = self.publish(conn, topics.down(), frame).await?;
            self.window.on_sent(pkid, id);
        }
        Ok(())
    }

    /// A PUBACK from the device: if it settles a queued downlink, that one leaves the
    /// store and the window has room for the next.
    async fn downlink_acked(
        &mut self,
        conn: &mut Conn,
        topics: &edge_agent::wire::DeviceTopics,
        pkid: u16,
    ) -> Result<(), ConnError> {
        let Some(id) = self.window.on_puback(pkid) else {
            return Ok(());
        };
        if let Err(e) = self.ep.downlinks.remove(&self.device, vec![id]).await {
            // It stays queued and goes again after the next hello; the device carries
            // out a message twice harmlessly.
            warn!(device = %self.device, error = %e, "Acknowledged downlink not removed.");
        }
        self.send_queued(conn, topics).await
    }

    /// Handles one packet; `Ok(false)` ends the connection cleanly.
    async fn handle(
        &mut self,
        conn: &mut Conn,
        topics: &edge_agent::wire::DeviceTopics,
        packet: Packet,
    ) -> Result<bool, ConnError> {
        match packet {
            Packet::Publish(p) => {
                let pkid = p.pkid;
                let qos = p.qos;
                if p.topic == topics.up() {
                    self.uplink(conn, topics, p.payload).await?;
                } else if p.topic == topics.hello() {
                    self.hello(conn, topics, &p.payload).await?;
                } else {
                    EndpointMetrics::inc(&self.ep.metrics.topic_violations);
                    return Err(ConnError::Topic {
                        device: self.device.0.clone(),
                        topic: p.topic,
                    });
                }
                let reply = match qos {
                    QoS::AtMostOnce => None,
                    QoS::AtLeastOnce => Some(Packet::PubAck(PubAck::new(pkid))),
                    // The frame is committed already and a resent one is a duplicate
                    // the store ignores, so QoS 2 needs no state here: PUBREC now,
                    // PUBCOMP on PUBREL (MQTT 3.1.1 §4.3.3).
                    QoS::ExactlyOnce => Some(Packet::PubRec(PubRec::new(pkid))),
                };
                if let Some(reply) = reply {
                    conn.send(reply)
                        .await
                        .map_err(|e| ConnError::Protocol(e.to_string()))?;
                }
                Ok(true)
            }
            Packet::Subscribe(s) => {
                let mut codes = Vec::with_capacity(s.filters.len());
                for f in &s.filters {
                    let granted = if f.path == topics.ack() {
                        self.subscribed_ack = true;
                        true
                    } else if f.path == topics.down() {
                        self.subscribed_down = true;
                        true
                    } else {
                        false
                    };
                    codes.push(if granted {
                        SubscribeReasonCode::Success(if f.qos == QoS::AtMostOnce {
                            QoS::AtMostOnce
                        } else {
                            QoS::AtLeastOnce
                        })
                    } else {
                        EndpointMetrics::inc(&self.ep.metrics.topic_violations);
                        warn!(device = %self.device, filter = %f.path, "Subscription refused.");
                        SubscribeReasonCode::Failure
                    });
                }
                conn.send(Packet::SubAck(SubAck::new(s.pkid, codes)))
                    .await
                    .map_err(|e| ConnError::Protocol(e.to_string()))?;
                Ok(true)
            }
            Packet::Unsubscribe(u) => {
                for t in &u.topics {
                    if t == topics.ack() {
                        self.subscribed_ack = false;
                    } else if t == topics.down() {
                        self.subscribed_down = false;
                    }
                }
                conn.send(Packet::UnsubAck(UnsubAck::new(u.pkid)))
                    .await
                    .map_err(|e| ConnError::Protocol(e.to_string()))?;
                Ok(true)
            }
            Packet::PingReq => {
                conn.send(Packet::PingResp)
                    .await
                    .map_err(|e| ConnError::Protocol(e.to_string()))?;
                Ok(true)
            }
            // Acks of our QoS1 publishes. Those of ack frames need nothing (the agent
            // resends a batch on ack timeout); those of queued downlinks settle them.
            Packet::PubAck(a) => {
                self.downlink_acked(conn, topics, a.pkid).await?;
                Ok(true)
            }
            Packet::PubRel(r) => {
                conn.send(Packet::PubComp(PubComp::new(r.pkid)))
                    .await
                    .map_err(|e| ConnError::Protocol(e.to_string()))?;
                Ok(true)
            }
            Packet::Disconnect => Ok(false),
            Packet::Connect(_) => Err(ConnError::Protocol("second CONNECT".into())),
            other => Err(ConnError::Protocol(format!("unexpected packet {other:?}"))),
        }
    }

    async fn uplink(
        &mut self,
        conn: &mut Conn,
        topics: &edge_agent::wire::DeviceTopics,
        payload: Bytes,
    ) -> Result<(), ConnError> {
        let (store, metrics) = (&self.ep.store, &self.ep.metrics);
        let max = usize::try_from(self.ep.config.max_packet_size.0).unwrap_or(usize::MAX);
        // A refused frame is counted and logged by `ingress`; the connection goes on.
        let Ok(batch) = ingress::verify_batch(store, metrics, &self.device, &payload, max) else {
            return Ok(());
        };
        if let Some(wait) = self.bucket.take(batch.batch.events.len() as u64) {
            tokio::time::sleep(wait).await;
        }
        self.ep.pacer.pace().await;
        let frame = ingress::commit_batch(store, metrics, &self.device, batch)
            .await
            .map_err(ConnError::from)?;
        if self.subscribed_ack {
            self.publish(conn, topics.ack(), frame).await?;
        }
        Ok(())
    }

    async fn hello(
        &mut self,
        conn: &mut Conn,
        topics: &edge_agent::wire::DeviceTopics,
        payload: &[u8],
    ) -> Result<(), ConnError> {
        let hello =
            match ingress::verify_hello(&self.ep.store, &self.ep.metrics, &self.device, payload) {
                Ok(hello) => hello,
                Err(IngressError::Rejected(_)) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
        // An agent behind on audiences gets its users' sets queued again first.
        let version = self
            .ep
            .downlinks
            .on_hello(&self.device, hello.audiences_version)
            .await;
        let frame = ingress::hello_reply(version)?;
        // A hello starts the device afresh: everything still queued goes again, then
        // the reply, which tells the agent it has had them.
        self.greeted = true;
        self.window.restart();
        self.send_queued(conn, topics).await?;
        if self.subscribed_down {
            self.publish(conn, topics.down(), frame).await?;
        }
        Ok(())
    }
}

impl From<IngressError> for ConnError {
    fn from(e: IngressError) -> Self {
        match e {
            IngressError::Store(e) => ConnError::Store(e.to_string()),
            IngressError::Rejected(_) | IngressError::Encode(_) => {
                ConnError::Protocol(e.to_string())
            }
        }
    }
}

/// rumqttc's MQTT 3.1.1 codec plus the check its CONNECT parser lacks: it takes a
/// CONNECT of protocol level 5 for a 3.1.1 one and misreads the rest (an MQTT 5 client
/// got "bad client id"). A CONNECT whose protocol name and level are not `MQTT` and 4
/// fails here with `InvalidProtocol`/`InvalidProtocolLevel`, before it is parsed.
#[derive(Debug)]
pub(super) struct DeviceCodec(Codec);

impl Decoder for DeviceCodec {
    type Item = Packet;
    type Error = MqttError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Packet>, MqttError> {
        if let Some((name, level)) = connect_protocol(src) {
            if name != b"MQTT" {
                return Err(MqttError::InvalidProtocol);
            }
            if level != 4 {
                return Err(MqttError::InvalidProtocolLevel(level));
            }
        }
        self.0.decode(src)
    }
}

impl Encoder<Packet> for DeviceCodec {
    type Error = MqttError;

    fn encode(&mut self, item: Packet, dst: &mut BytesMut) -> Result<(), MqttError> {
        self.0.encode(item, dst)
    }
}

/// The protocol name and level of a CONNECT at the head of `buf`, once that much of it
/// has arrived; `None` for any other packet, or when the codec will find it malformed.
///
/// ```text
/// 0x10 | remaining length, 1-4 bytes | name length u16 BE | name | level | ...
/// ```
fn connect_protocol(buf: &[u8]) -> Option<(&[u8], u8)> {
    if *buf.first()? != 0x10 {
        return None;
    }
    let mut at = 1;
    while buf.get(at)? & 0x80 != 0 {
        at += 1;
        if at > 4 {
            return None;
        }
    }
    at += 1;
    let len = usize::from(u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?]));
    let name = buf.get(at + 2..at + 2 + len)?;
    Some((name, *buf.get(at + 2 + len)?))
}

/// Token bucket: a device may send `rate` events per second, bursting one second's
/// worth. Over the rate, the reader waits (backpressure), nothing is dropped.
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32) -> Self {
        Bucket {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            at: Instant::now(),
        }
    }

    /// Takes `n` tokens; returns how long to wait when the bucket runs dry.
    fn take(&mut self, n: u64) -> Option<Duration> {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.rate);
        self.at = now;
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            None
        } else {
            Some(Duration::from_secs_f64(-self.tokens / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec() -> DeviceCodec {
        DeviceCodec(Codec {
            max_incoming_size: 1024,
            max_outgoing_size: 1024,
        })
    }

    /// CONNECT with protocol `name`/`level`, clean session, keep-alive 60, client id `dev-1`
    /// (and the empty property list MQTT 5 puts before it).
    fn connect(name: &str, level: u8) -> BytesMut {
        let mut body = vec![0, name.len() as u8];
        body.extend(name.as_bytes());
        body.extend([level, 0x02, 0, 60]);
        if level == 5 {
            body.push(0);
        }
        body.extend([0, 5]);
        body.extend(b"dev-1");
        let mut packet = BytesMut::from(&[0x10, body.len() as u8][..]);
        packet.extend_from_slice(&body);
        packet
    }

    #[test]
    fn an_mqtt_3_1_1_connect_is_decoded() {
        let Ok(Some(Packet::Connect(c))) = codec().decode(&mut connect("MQTT", 4)) else {
            panic!("not decoded");
        };
        assert_eq!(c.client_id, "dev-1");
    }

    #[test]
    fn an_mqtt_5_connect_is_refused_by_its_level_not_misread() {
        assert!(matches!(
            codec().decode(&mut connect("MQTT", 5)),
            Err(MqttError::InvalidProtocolLevel(5))
        ));
    }

    #[test]
    fn an_mqtt_3_1_connect_is_refused_by_its_name() {
        assert!(matches!(
            codec().decode(&mut connect("MQIsdp", 3)),
            Err(MqttError::InvalidProtocol)
        ));
    }

    #[test]
    fn a_connect_cut_before_its_level_waits_for_more_bytes() {
        let full = connect("MQTT", 5);
        for cut in 0..9 {
            let mut part = BytesMut::from(&full[..cut]);
            assert!(
                matches!(codec().decode(&mut part), Ok(None)),
                "cut at {cut}"
            );
        }
    }
}
