//! One device connection: handshake, CONNECT checks, then the packet loop.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use edge_agent::model::{now_ms, DeviceId};
use edge_agent::wire::{self, Ack, Compression, Downlink, SeqRange};
use futures_util::{SinkExt, StreamExt};
use rumqttc::mqttbytes::v4::{
    Codec, ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::QoS;
use tokio::net::TcpStream;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Endpoint, EndpointMetrics};
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

type Conn = Framed<tokio_rustls::server::TlsStream<TcpStream>, Codec>;

pub(super) async fn serve(ep: &Endpoint, stream: TcpStream, shutdown: CancellationToken) -> Result<(), ConnError> {
    let tls = match tokio::time::timeout(ep.config.handshake_timeout, ep.acceptor.accept(stream)).await {
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
    let mut conn: Conn = Framed::new(tls, Codec { max_incoming_size: max, max_outgoing_size: max });

    let first = tokio::time::timeout(ep.config.connect_timeout, conn.next()).await;
    let connect = match first {
        Err(_) => return Err(ConnError::ConnectTimeout),
        Ok(Some(Ok(Packet::Connect(c)))) => c,
        Ok(Some(Ok(_))) => return Err(ConnError::NotConnect),
        Ok(Some(Err(e))) => return Err(ConnError::Protocol(e.to_string())),
        Ok(None) => return Err(ConnError::NotConnect),
    };
    let refuse = |code| Packet::ConnAck(ConnAck { session_present: false, code });
    if connect.client_id != device.0 {
        EndpointMetrics::inc(&ep.metrics.connects_refused);
        let _ = conn.send(refuse(ConnectReturnCode::BadClientId)).await;
        return Err(ConnError::ClientIdMismatch { client_id: connect.client_id, device: device.0 });
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
    conn.send(Packet::ConnAck(ConnAck { session_present: false, code: ConnectReturnCode::Success }))
        .await
        .map_err(|e| ConnError::Protocol(e.to_string()))?;
    info!(device = %device, "Device connected.");

    let keep_alive = match connect.keep_alive {
        0 => Duration::from_secs(24 * 3600),
        s => Duration::from_millis(u64::from(s) * 1500),
    };
    let mut session = Session { ep, device: device.clone(), pkid: 0, subscribed_ack: false, subscribed_down: false, bucket: Bucket::new(ep.config.device_events_per_second) };
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
    bucket: Bucket,
}

impl Session<'_> {
    async fn publish(&mut self, conn: &mut Conn, topic: &str, payload: Vec<u8>) -> Result<(), ConnError> {
        self.pkid = self.pkid.checked_add(1).unwrap_or(1).max(1);
        let mut p = Publish::new(topic, QoS::AtLeastOnce, payload);
        p.pkid = self.pkid;
        conn.send(Packet::Publish(p)).await.map_err(|e| ConnError::Protocol(e.to_string()))
    }

    /// Handles one packet; `Ok(false)` ends the connection cleanly.
    async fn handle(&mut self, conn: &mut Conn, topics: &edge_agent::wire::DeviceTopics, packet: Packet) -> Result<bool, ConnError> {
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
                    return Err(ConnError::Topic { device: self.device.0.clone(), topic: p.topic });
                }
                if qos != QoS::AtMostOnce {
                    conn.send(Packet::PubAck(PubAck::new(pkid)))
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
                        SubscribeReasonCode::Success(if f.qos == QoS::AtMostOnce { QoS::AtMostOnce } else { QoS::AtLeastOnce })
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
                conn.send(Packet::PingResp).await.map_err(|e| ConnError::Protocol(e.to_string()))?;
                Ok(true)
            }
            // Acks of our QoS1 downlink: redelivery is the agent's business (resend
            // on ack timeout, hello on reconnect), so nothing to track here.
            Packet::PubAck(_) => Ok(true),
            Packet::Disconnect => Ok(false),
            Packet::Connect(_) => Err(ConnError::Protocol("second CONNECT".into())),
            other => Err(ConnError::Protocol(format!("unexpected packet {other:?}"))),
        }
    }

    async fn uplink(&mut self, conn: &mut Conn, topics: &edge_agent::wire::DeviceTopics, payload: Bytes) -> Result<(), ConnError> {
        let max = usize::try_from(self.ep.config.max_packet_size.0).unwrap_or(usize::MAX);
        let batch = match wire::decode_batch(&payload, max) {
            Ok(b) => b,
            Err(e) => {
                EndpointMetrics::inc(&self.ep.metrics.frames_rejected);
                warn!(device = %self.device, error = %e, "Uplink frame rejected.");
                self.ep.store.frame_rejected(self.device.clone());
                return Ok(());
            }
        };
        if batch.device != self.device {
            EndpointMetrics::inc(&self.ep.metrics.frames_rejected);
            warn!(device = %self.device, claimed = %batch.device, "Frame names another device; rejected.");
            self.ep.store.frame_rejected(self.device.clone());
            return Ok(());
        }
        if let Some(wait) = self.bucket.take(batch.events.len() as u64) {
            tokio::time::sleep(wait).await;
        }
        let received = now_ms();
        let receipt = self
            .ep
            .store
            .receive(self.device.clone(), batch, received)
            .await
            .map_err(|e| ConnError::Store(e.to_string()))?;
        let m = &self.ep.metrics;
        m.batches_received.fetch_add(1, Ordering::Relaxed);
        m.events_stored.fetch_add(receipt.stored as u64, Ordering::Relaxed);
        m.events_duplicate.fetch_add(receipt.duplicates as u64, Ordering::Relaxed);
        let ack = Ack {
            device: self.device.clone(),
            acked: SeqRange::compact(receipt.acked),
            rejected: receipt.rejected,
            gateway_time_ms: now_ms(),
        };
        let frame = wire::encode_ack(&ack, Compression::None).map_err(|e| ConnError::Protocol(e.to_string()))?;
        if self.subscribed_ack {
            self.publish(conn, topics.ack(), frame).await?;
        }
        Ok(())
    }

    async fn hello(&mut self, conn: &mut Conn, topics: &edge_agent::wire::DeviceTopics, payload: &[u8]) -> Result<(), ConnError> {
        let hello = match wire::decode_hello(payload, wire::DEFAULT_MAX_FRAME) {
            Ok(h) if h.device == self.device => h,
            Ok(_) | Err(_) => {
                EndpointMetrics::inc(&self.ep.metrics.frames_rejected);
                self.ep.store.frame_rejected(self.device.clone());
                return Ok(());
            }
        };
        let reply = Downlink::HelloReply { gateway_time_ms: now_ms(), audiences_version: hello.audiences_version };
        let frame = wire::encode_downlink(&reply, Compression::None).map_err(|e| ConnError::Protocol(e.to_string()))?;
        if self.subscribed_down {
            self.publish(conn, topics.down(), frame).await?;
        }
        Ok(())
    }
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
        Bucket { rate: f64::from(rate), tokens: f64::from(rate), at: Instant::now() }
    }

    /// Takes `n` tokens; returns how long to wait when the bucket runs dry.
    fn take(&mut self, n: u64) -> Option<Duration> {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.rate);
        self.at = now;
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            None
        } else {
            Some(Duration::from_secs_f64(-self.tokens / self.rate))
        }
    }
}
