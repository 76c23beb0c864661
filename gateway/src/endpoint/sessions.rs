//! Which device is connected where: one live connection per device id. A new
//! connection for the same id takes over (MQTT 3.1.1 §3.1.4-2) and the old one is
//! told to close. Downlink messages for a device go to its live connection: a frame
//! through its bounded queue ([`Sessions::send`]), or a wake-up telling it to send
//! what is queued for it in the store ([`Sessions::wake`], see [`crate::downlink`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use edge_agent::model::DeviceId;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

/// Downlink frames queued per connection before senders wait.
pub const DOWNLINK_QUEUE: usize = 64;

struct Live {
    conn: u64,
    kick: CancellationToken,
    downlink: mpsc::Sender<Vec<u8>>,
    wake: Arc<Notify>,
}

/// The registry of live device connections.
#[derive(Default)]
pub struct Sessions {
    next_conn: AtomicU64,
    live: Mutex<HashMap<DeviceId, Live>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("connected", &self.connected())
            .finish()
    }
}

/// A connection's registration: its id, the token that closes it when another
/// connection takes over, its downlink queue, and the wake-up for stored downlinks
/// (one stored permit at most: wake-ups while it is busy fold into one).
#[derive(Debug)]
pub struct Registration {
    pub conn: u64,
    pub kicked: CancellationToken,
    pub downlink: mpsc::Receiver<Vec<u8>>,
    pub wake: Arc<Notify>,
}

impl Sessions {
    /// Registers a connection for `device`, closing any earlier one.
    pub fn register(&self, device: &DeviceId) -> Registration {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let kicked = CancellationToken::new();
        let (tx, rx) = mpsc::channel(DOWNLINK_QUEUE);
        let wake = Arc::new(Notify::new());
        let old = self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                device.clone(),
                Live {
                    conn,
                    kick: kicked.clone(),
                    downlink: tx,
                    wake: Arc::clone(&wake),
                },
            );
        if let Some(old) = old {
            old.kick.cancel();
        }
        Registration {
            conn,
            kicked,
            downlink: rx,
            wake,
        }
    }

    /// Forgets `conn` if it is still the live one for `device`.
    pub fn unregister(&self, device: &DeviceId, conn: u64) {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        if live.get(device).is_some_and(|l| l.conn == conn) {
            live.remove(device);
        }
    }

    /// Queues a downlink frame for `device`; false when it is not connected or its
    /// queue is full (the hello exchange re-syncs it on its next connect).
    pub fn send(&self, device: &DeviceId, frame: Vec<u8>) -> bool {
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        live.get(device)
            .is_some_and(|l| l.downlink.try_send(frame).is_ok())
    }

    /// Tells `device`'s connection that the store holds downlinks for it; false when
    /// it is not connected (it gets them after its next hello).
    pub fn wake(&self, device: &DeviceId) -> bool {
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        live.get(device).map(|l| l.wake.notify_one()).is_some()
    }

    pub fn connected(&self) -> usize {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_connected(&self, device: &DeviceId) -> bool {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(device)
    }
}
