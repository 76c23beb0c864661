//! Messages to devices (`…/down`): queued durably, sent while the device is
//! connected, re-sent after it reconnects until it acknowledges them.
//!
//! | table           | key                  | value                                  |
//! |-----------------|----------------------|----------------------------------------|
//! | `downlinks`     | `(device, id u64)`   | the encoded [`Downlink`] frame         |
//! | `downlink_meta` | `"next_id"`          | `u64`, the next id to assign           |
//!
//! Ids increase over the whole gateway and are never reused, so a device's messages
//! go out in the order they were queued and a connection can tell what it has sent.
//!
//! Delivery (the embedded endpoint, [`crate::endpoint`]): a connection sends a
//! device's queue after the device's hello, before the hello reply, as QoS 1
//! PUBLISHes, at most [`MAX_IN_FLIGHT`] unacknowledged at once ([`Window`]); an entry
//! is removed only when the device's PUBACK for it arrives. The agent sends that
//! PUBACK only once it has carried the message out (its commit), so a message is
//! removed only when it took effect. In broker mode the gateway sees no device
//! PUBACKs; see [`crate::broker`] for what stands in for them.
//!
//! What must stay true:
//! 1. [`Downlinks::queue`] returns only once the message is durable.
//! 2. A device holds at most [`MAX_QUEUED_PER_DEVICE`] messages; past that `queue`
//!    fails, so nothing queued is ever dropped to make room.
//! 3. Queueing a message identical to one still queued for the device adds nothing
//!    (an erase retried by an operator does not grow the queue).

use std::collections::HashMap;
use std::sync::Arc;

use edge_agent::model::DeviceId;
use edge_agent::wire::{self, Compression, Downlink};
use redb::{ReadableTable, TableDefinition, WriteTransaction};
use tracing::debug;

use crate::endpoint::Sessions;
use crate::store::{Store, StoreError, R};

const DOWNLINKS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("downlinks");
const DOWNLINK_META: TableDefinition<&str, u64> = TableDefinition::new("downlink_meta");
const NEXT_ID: &str = "next_id";

/// Most messages queued for one device (invariant 2).
pub const MAX_QUEUED_PER_DEVICE: usize = 1000;
/// Most downlink PUBLISHes a connection leaves unacknowledged.
pub const MAX_IN_FLIGHT: usize = 64;

/// The downlink queue of every device.
#[derive(Debug)]
pub struct Downlinks {
    pub store: Arc<Store>,
    pub sessions: Arc<Sessions>,
    /// The audience side, set once it runs: re-syncs devices behind on audiences.
    pub audiences: std::sync::OnceLock<Arc<crate::audience::devices::DeviceAudiences>>,
}

/// What one queue write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueueWrite {
    Added,
    AlreadyThere,
    Full,
}

impl Downlinks {
    /// Queues `message` for `device` (durable before return) and sends it now if the
    /// device is connected. Fails with a storage error naming the device when its
    /// queue holds [`MAX_QUEUED_PER_DEVICE`] messages already.
    pub async fn queue(&self, device: &DeviceId, message: Downlink) -> Result<(), StoreError> {
        let frame = wire::encode_downlink(&message, Compression::None).map_err(|e| {
            StoreError::Storage(format!("cannot encode a downlink for `{device}`: {e}"))
        })?;
        // A newer membership of a user replaces one still waiting: the device needs only
        // the latest full set, and a flapping member must not fill the queue.
        let supersedes = match &message {
            Downlink::Audiences(update) => Some(update.user_id.clone()),
            _ => None,
        };
        let id = device.0.clone();
        // A full queue is an answer, not a failed write: an error here would fail every
        // other write sharing the group commit.
        let outcome = self
            .store
            .apply(move |txn| queue_in(txn, &id, &frame, supersedes.as_deref()))
            .await?;
        match outcome {
            QueueWrite::Full => Err(StoreError::Storage(format!(
                "the downlink queue of device `{device}` is full ({MAX_QUEUED_PER_DEVICE} messages waiting for it to connect)"
            ))),
            QueueWrite::Added | QueueWrite::AlreadyThere => {
                if self.sessions.wake(device) {
                    debug!(device = %device, "Downlink queued; sending to the connected device.");
                }
                Ok(())
            }
        }
    }

    /// A hello from `device` stating the audience version it has: queues what it
    /// misses (see [`crate::audience::devices`]) and returns the version for the hello
    /// reply. Failures are logged: the hello is still answered.
    pub async fn on_hello(&self, device: &DeviceId, agent_version: u64) -> u64 {
        let Some(audiences) = self.audiences.get() else {
            return agent_version;
        };
        match audiences.on_hello(device, agent_version).await {
            Ok(version) => version,
            Err(e) => {
                tracing::warn!(device = %device, error = %e, "Audience re-sync at hello failed.");
                agent_version
            }
        }
    }

    /// Every message still queued for `device`, oldest first.
    pub fn pending(&self, device: &DeviceId) -> Result<Vec<Downlink>, StoreError> {
        self.read_after(device, 0, MAX_QUEUED_PER_DEVICE)?
            .into_iter()
            .map(|(id, frame)| {
                wire::decode_downlink(&frame, wire::DEFAULT_MAX_FRAME)
                    .map_err(|e| StoreError::Corrupt(format!("downlink {id} of `{device}`: {e}")))
            })
            .collect()
    }

    /// Up to `max` queued `(id, frame)` of `device` with an id above `after`, in order.
    pub fn read_after(
        &self,
        device: &DeviceId,
        after: u64,
        max: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let d = device.0.as_str();
        self.store.read(|r| {
            let t = match r.open_table(DOWNLINKS) {
                Ok(t) => t,
                // Nothing was ever queued on this store.
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(e).st(),
            };
            let mut out = Vec::new();
            let start = after.saturating_add(1);
            for row in t.range((d, start)..=(d, u64::MAX)).st()?.take(max) {
                let (k, v) = row.st()?;
                out.push((k.value().1, v.value().to_vec()));
            }
            Ok(out)
        })
    }

    /// Removes delivered messages of `device` (durable before return). Ids no longer
    /// queued are ignored, so a late second acknowledgement is harmless.
    pub async fn remove(&self, device: &DeviceId, ids: Vec<u64>) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let d = device.0.clone();
        self.store
            .apply(move |txn| {
                let mut t = txn.open_table(DOWNLINKS).st()?;
                for id in ids {
                    t.remove((d.as_str(), id)).st()?;
                }
                Ok(())
            })
            .await
    }
}

fn queue_in(
    txn: &WriteTransaction,
    device: &str,
    frame: &[u8],
    supersedes: Option<&str>,
) -> Result<QueueWrite, StoreError> {
    let mut t = txn.open_table(DOWNLINKS).st()?;
    let mut count = 0;
    let mut superseded = Vec::new();
    for row in t.range((device, 0)..=(device, u64::MAX)).st()? {
        let (k, v) = row.st()?;
        if v.value() == frame {
            return Ok(QueueWrite::AlreadyThere);
        }
        let replaced = supersedes.is_some_and(|user| {
            matches!(
                wire::decode_downlink(v.value(), wire::DEFAULT_MAX_FRAME),
                Ok(Downlink::Audiences(old)) if old.user_id == user
            )
        });
        if replaced {
            superseded.push(k.value().1);
        } else {
            count += 1;
        }
    }
    for id in superseded {
        t.remove((device, id)).st()?;
    }
    if count >= MAX_QUEUED_PER_DEVICE {
        return Ok(QueueWrite::Full);
    }
    let mut meta = txn.open_table(DOWNLINK_META).st()?;
    let id = meta.get(NEXT_ID).st()?.map_or(1, |v| v.value());
    t.insert((device, id), frame).st()?;
    meta.insert(NEXT_ID, id + 1).st()?;
    Ok(QueueWrite::Added)
}

/// What one device connection has sent of the queue and not yet seen acknowledged.
/// Pure bookkeeping; the connection does the I/O.
#[derive(Debug, Default)]
pub struct Window {
    /// Highest id sent on this connection; the next read starts after it.
    sent_through: u64,
    /// PUBLISH packet id → queue id, for every unacknowledged downlink.
    in_flight: HashMap<u16, u64>,
}

impl Window {
    /// How many more may be sent now.
    pub fn room(&self) -> usize {
        MAX_IN_FLIGHT.saturating_sub(self.in_flight.len())
    }

    /// Id after which to read the queue for the next sends.
    pub fn sent_through(&self) -> u64 {
        self.sent_through
    }

    /// Whether `pkid` belongs to an unacknowledged downlink (so it must not be reused).
    pub fn holds(&self, pkid: u16) -> bool {
        self.in_flight.contains_key(&pkid)
    }

    pub fn on_sent(&mut self, pkid: u16, id: u64) {
        self.sent_through = self.sent_through.max(id);
        self.in_flight.insert(pkid, id);
    }

    /// The queue id a PUBACK settles, if it answers one of ours.
    pub fn on_puback(&mut self, pkid: u16) -> Option<u64> {
        self.in_flight.remove(&pkid)
    }

    /// Starts over: the device said hello, so it holds nothing from before and every
    /// message still queued goes again. PUBACKs of earlier sends are no longer waited
    /// for; their messages are sent again and carried out again, which is harmless.
    pub fn restart(&mut self) {
        self.sent_through = 0;
        self.in_flight.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_agent::wire::Control;

    fn purge(user: &str) -> Downlink {
        Downlink::Control(Control::PurgeUser {
            user_id: user.into(),
        })
    }

    fn open(dir: &tempfile::TempDir) -> Downlinks {
        Downlinks {
            store: Arc::new(Store::open(&dir.path().join("g.redb"), 1 << 20, &[]).unwrap()),
            audiences: std::sync::OnceLock::new(),
            sessions: Arc::new(Sessions::default()),
        }
    }

    fn dev(id: &str) -> DeviceId {
        DeviceId(id.into())
    }

    #[tokio::test]
    async fn a_queued_message_survives_a_restart_and_goes_only_when_removed() {
        let dir = tempfile::tempdir().unwrap();
        let d = open(&dir);
        d.queue(&dev("d1"), purge("u1")).await.unwrap();
        d.queue(&dev("d1"), purge("u2")).await.unwrap();
        d.queue(&dev("d2"), purge("u1")).await.unwrap();
        d.store.close().await;
        drop(d);

        let d = open(&dir);
        assert_eq!(
            d.pending(&dev("d1")).unwrap(),
            [purge("u1"), purge("u2")],
            "in queue order"
        );
        let queued = d.read_after(&dev("d1"), 0, 10).unwrap();
        let first = queued[0].0;
        d.remove(&dev("d1"), vec![first]).await.unwrap();
        assert_eq!(d.pending(&dev("d1")).unwrap(), [purge("u2")]);
        assert_eq!(d.pending(&dev("d2")).unwrap(), [purge("u1")], "untouched");
        d.remove(&dev("d1"), vec![first]).await.unwrap();
        assert_eq!(d.pending(&dev("d1")).unwrap(), [purge("u2")]);
        d.store.close().await;
    }

    #[tokio::test]
    async fn the_same_message_twice_is_queued_once_and_a_full_queue_refuses_more() {
        let dir = tempfile::tempdir().unwrap();
        let d = open(&dir);
        d.queue(&dev("d1"), purge("u1")).await.unwrap();
        d.queue(&dev("d1"), purge("u1")).await.unwrap();
        assert_eq!(d.pending(&dev("d1")).unwrap().len(), 1);
        for i in 1..MAX_QUEUED_PER_DEVICE {
            d.queue(&dev("d1"), purge(&format!("x{i}"))).await.unwrap();
        }
        let err = d.queue(&dev("d1"), purge("one-more")).await.unwrap_err();
        assert!(err.to_string().contains("`d1` is full"), "{err}");
        let pending = d.pending(&dev("d1")).unwrap();
        assert_eq!(pending.len(), MAX_QUEUED_PER_DEVICE);
        assert_eq!(pending[0], purge("u1"), "the oldest is kept");
        d.queue(&dev("d2"), purge("one-more")).await.unwrap();
        d.store.close().await;
    }

    #[tokio::test]
    async fn reading_after_an_id_pages_through_one_device_only() {
        let dir = tempfile::tempdir().unwrap();
        let d = open(&dir);
        for i in 0..5 {
            d.queue(&dev("a"), purge(&format!("a{i}"))).await.unwrap();
            d.queue(&dev("ab"), purge(&format!("ab{i}"))).await.unwrap();
        }
        let page = d.read_after(&dev("a"), 0, 2).unwrap();
        assert_eq!(page.len(), 2);
        let rest = d.read_after(&dev("a"), page[1].0, 10).unwrap();
        assert_eq!(rest.len(), 3);
        assert!(rest.iter().all(|(id, _)| *id > page[1].0));
        assert!(d.read_after(&dev("nobody"), 0, 10).unwrap().is_empty());
        d.store.close().await;
    }

    #[test]
    fn the_window_maps_pubacks_to_ids_and_bounds_what_is_in_flight() {
        let mut w = Window::default();
        assert_eq!(w.room(), MAX_IN_FLIGHT);
        w.on_sent(7, 100);
        w.on_sent(8, 101);
        assert_eq!(w.sent_through(), 101);
        assert_eq!(w.room(), MAX_IN_FLIGHT - 2);
        assert!(w.holds(7));
        assert_eq!(w.on_puback(9), None, "an ack publish, not a downlink");
        assert_eq!(w.on_puback(7), Some(100));
        assert_eq!(w.on_puback(7), None, "settled once");
        w.restart();
        assert_eq!(w.sent_through(), 0);
        assert_eq!(w.on_puback(8), None, "forgotten after a hello");
        assert_eq!(w.room(), MAX_IN_FLIGHT);
    }
}
