//! What both ingress paths do with a device's frame once they know who sent it: the
//! embedded endpoint ([`crate::endpoint`]) knows the device from its TLS certificate,
//! the broker consumer ([`crate::broker`]) from the topic the broker's ACLs confine it
//! to. Here the frame is decoded, checked against that sender, committed, and answered
//! (an [`Ack`] for a batch, a [`Downlink::HelloReply`] for a hello).
//!
//! This module must not decide where an answer goes or when the transport's own
//! acknowledgement (PUBACK) is sent: that is the caller's, and both callers send them
//! only after the commit awaited here. It touches no socket; its only I/O is the store.
//!
//! Metrics kept here, so both paths count alike: uplink payload bytes (every frame,
//! before decoding) and, after each commit, the latency of every newly stored event:
//! gateway commit time minus the agent's accept time (`event.received_ms`) moved to the
//! gateway's clock by the batch's skew (`received_ms - sent_at_ms`, see the store). That
//! skew includes the frame's one-way transit, so the figure covers the agent (HTTP
//! accept, spool, linger, window) and the gateway (queueing, commit), not the time on
//! the wire; it is in whole milliseconds.

use std::sync::atomic::Ordering;

use edge_agent::model::{now_ms, DeviceId};
use edge_agent::wire::{self, Ack, BatchWithBytes, Compression, Downlink, EncodeError, SeqRange};
use tracing::warn;

use crate::endpoint::EndpointMetrics;
use crate::store::{Store, StoreError};

/// A frame refused before the store: it does not decode (malformed, too large,
/// trailing bytes...) or it names a device other than its sender. Already counted in
/// the metrics and in the sender's device record when returned; nothing was stored and
/// nothing is answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("frame from `{sender}` rejected: {reason}")]
pub struct FrameRejected {
    /// The device the transport says sent the frame.
    pub sender: DeviceId,
    /// Why, for logs.
    pub reason: String,
}

/// Why a frame got no answer.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    /// The frame was refused before the store (see [`FrameRejected`]).
    #[error(transparent)]
    Rejected(#[from] FrameRejected),
    /// The store did not commit the batch (disk full, I/O error, shutdown): nothing
    /// may be acknowledged; the agent sends the batch again.
    #[error("the store failed: {0}")]
    Store(#[from] StoreError),
    /// The answer could not be encoded. Our own messages always encode, so this is a
    /// bug, reported rather than panicking.
    #[error("cannot encode the answer: {0}")]
    Encode(#[from] EncodeError),
}

/// Decodes an uplink frame from `sender` and checks that it is `sender`'s. The caller
/// may hold the batch back (rate limit) before [`commit_batch`]. The events' bytes are
/// kept: the inbox stores them as sent.
pub fn verify_batch(
    store: &Store,
    metrics: &EndpointMetrics,
    sender: &DeviceId,
    payload: &[u8],
    max_frame: usize,
) -> Result<BatchWithBytes, FrameRejected> {
    metrics
        .uplink_bytes
        .fetch_add(payload.len() as u64, Ordering::Relaxed);
    let reason = match wire::decode_batch_with_bytes(payload, max_frame) {
        Ok(decoded) if decoded.batch.device == *sender => return Ok(decoded),
        Ok(decoded) => format!("the frame names device `{}`", decoded.batch.device),
        Err(e) => e.to_string(),
    };
    Err(reject(store, metrics, sender, reason))
}

/// Commits a verified batch and returns the [`Ack`] frame for the sender's ack topic.
/// Returns only once the batch is durable (or failed).
pub async fn commit_batch(
    store: &Store,
    metrics: &EndpointMetrics,
    sender: &DeviceId,
    batch: BatchWithBytes,
) -> Result<Vec<u8>, IngressError> {
    let receipt = store
        .receive_with_bytes(sender.clone(), batch, crate::clock::now_ms())
        .await?;
    let committed_ms = crate::clock::now_ms();
    metrics.event_latency.observe_ms(
        receipt
            .accepted_ms
            .iter()
            .map(|accepted| committed_ms.saturating_sub(*accepted)),
    );
    metrics.batches_received.fetch_add(1, Ordering::Relaxed);
    metrics
        .events_stored
        .fetch_add(receipt.stored as u64, Ordering::Relaxed);
    metrics
        .events_duplicate
        .fetch_add(receipt.duplicates as u64, Ordering::Relaxed);
    let ack = Ack {
        device: sender.clone(),
        acked: SeqRange::compact(receipt.acked),
        rejected: receipt.rejected,
        gateway_time_ms: now_ms(),
    };
    Ok(wire::encode_ack(&ack, Compression::None)?)
}

/// [`verify_batch`] then [`commit_batch`]: an uplink frame in, its `Ack` frame out.
pub async fn handle_batch(
    store: &Store,
    metrics: &EndpointMetrics,
    sender: &DeviceId,
    payload: &[u8],
    max_frame: usize,
) -> Result<Vec<u8>, IngressError> {
    let batch = verify_batch(store, metrics, sender, payload, max_frame)?;
    commit_batch(store, metrics, sender, batch).await
}

/// Answers a hello from `sender`: the [`Downlink::HelloReply`] frame for its down
/// topic, echoing the agent's audience version. Nothing is stored.
pub fn handle_hello(
    store: &Store,
    metrics: &EndpointMetrics,
    sender: &DeviceId,
    payload: &[u8],
) -> Result<Vec<u8>, IngressError> {
    let hello = verify_hello(store, metrics, sender, payload)?;
    hello_reply(hello.audiences_version)
}

/// Decodes a hello from `sender` and checks it names `sender`; refusals are counted.
pub fn verify_hello(
    store: &Store,
    metrics: &EndpointMetrics,
    sender: &DeviceId,
    payload: &[u8],
) -> Result<wire::Hello, IngressError> {
    match wire::decode_hello(payload, wire::DEFAULT_MAX_FRAME) {
        Ok(h) if h.device == *sender => Ok(h),
        Ok(h) => {
            let reason = format!("the hello names device `{}`", h.device);
            Err(reject(store, metrics, sender, reason).into())
        }
        Err(e) => Err(reject(store, metrics, sender, e.to_string()).into()),
    }
}

/// The hello reply: gateway time and the newest audience version for the device.
pub fn hello_reply(audiences_version: u64) -> Result<Vec<u8>, IngressError> {
    let reply = Downlink::HelloReply {
        gateway_time_ms: now_ms(),
        audiences_version,
    };
    Ok(wire::encode_downlink(&reply, Compression::None)?)
}

/// Counts and logs a refused frame.
fn reject(
    store: &Store,
    metrics: &EndpointMetrics,
    sender: &DeviceId,
    reason: String,
) -> FrameRejected {
    EndpointMetrics::inc(&metrics.frames_rejected);
    warn!(device = %sender, reason = %reason, "Frame rejected.");
    store.frame_rejected(sender.clone());
    FrameRejected {
        sender: sender.clone(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_agent::model::{Event, EventKind, Seq, Source};

    fn store(dir: &tempfile::TempDir) -> Store {
        Store::open(&dir.path().join("g.redb"), 1 << 20, &[]).unwrap()
    }

    fn dev(id: &str) -> DeviceId {
        DeviceId(id.into())
    }

    fn batch(device: &str, seqs: &[u64]) -> Vec<u8> {
        let events = seqs
            .iter()
            .map(|s| {
                let mut e = Event::new(EventKind::Track, Source::Local, 1_700_000_000_000);
                e.seq = Seq(*s);
                e.lane = "default".into();
                e.name = Some("Played".into());
                e
            })
            .collect();
        let b = edge_agent::wire::UplinkBatch {
            device: dev(device),
            lane: "default".into(),
            floor: Seq(1),
            sent_at_ms: 1_700_000_000_000,
            drops: Default::default(),
            events,
        };
        wire::encode_batch(&b, Compression::None).unwrap()
    }

    #[tokio::test]
    async fn a_batch_is_committed_then_acked_and_a_resend_is_acked_as_a_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let (store, metrics) = (store(&dir), EndpointMetrics::default());
        let (first, second) = (batch("d1", &[1, 2, 3]), batch("d1", &[1, 2, 3]));
        let frame = handle_batch(&store, &metrics, &dev("d1"), &first, 1 << 20)
            .await
            .unwrap();
        let ack = wire::decode_ack(&frame, 1 << 20).unwrap();
        assert_eq!(ack.device, dev("d1"));
        assert_eq!(
            ack.acked,
            vec![SeqRange {
                first: Seq(1),
                last: Seq(3)
            }]
        );
        assert_eq!(store.inbox_len().unwrap(), 3);

        let again = handle_batch(&store, &metrics, &dev("d1"), &second, 1 << 20)
            .await
            .unwrap();
        assert_eq!(wire::decode_ack(&again, 1 << 20).unwrap().acked, ack.acked);
        assert_eq!(store.inbox_len().unwrap(), 3);
        assert_eq!(metrics.events_stored.load(Ordering::Relaxed), 3);
        assert_eq!(metrics.events_duplicate.load(Ordering::Relaxed), 3);
        let frames = (first.len() + second.len()) as u64;
        assert_eq!(metrics.uplink_bytes.load(Ordering::Relaxed), frames);
        let mut text = String::new();
        metrics.event_latency.render(&mut text, "lat", "");
        assert!(
            text.contains("lat_count 3\n"),
            "only the new events are timed: {text}"
        );
        // Accepted at `sent_at`, so only the gateway's queueing and commit count.
        assert!(text.contains("lat_bucket{le=\"1\"} 3\n"), "{text}");
        store.close().await;
    }

    #[tokio::test]
    async fn a_batch_naming_another_device_is_rejected_and_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, metrics) = (store(&dir), EndpointMetrics::default());
        let err = handle_batch(
            &store,
            &metrics,
            &dev("intruder"),
            &batch("victim", &[1]),
            1 << 20,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, IngressError::Rejected(ref r) if r.sender == dev("intruder")),
            "{err}"
        );
        let err = handle_batch(&store, &metrics, &dev("d1"), b"\x01garbage", 1 << 20)
            .await
            .unwrap_err();
        assert!(matches!(err, IngressError::Rejected(_)), "{err}");
        assert_eq!(store.inbox_len().unwrap(), 0);
        assert_eq!(metrics.frames_rejected.load(Ordering::Relaxed), 2);
        store.close().await;
    }

    #[tokio::test]
    async fn a_hello_is_answered_with_the_gateway_time_and_a_foreign_hello_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let (store, metrics) = (store(&dir), EndpointMetrics::default());
        let hello = |device: &str| {
            let h = wire::Hello {
                device: dev(device),
                agent_version: "0.1.0".into(),
                audiences_version: 7,
                config_version: 0,
                sent_at_ms: 1,
            };
            wire::encode_hello(&h, Compression::None).unwrap()
        };
        let frame = handle_hello(&store, &metrics, &dev("d1"), &hello("d1")).unwrap();
        match wire::decode_downlink(&frame, 1 << 20).unwrap() {
            Downlink::HelloReply {
                audiences_version,
                gateway_time_ms,
            } => {
                assert_eq!(audiences_version, 7);
                assert!(gateway_time_ms > 0);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            handle_hello(&store, &metrics, &dev("d2"), &hello("d1")),
            Err(IngressError::Rejected(_))
        ));
        store.close().await;
    }
}
