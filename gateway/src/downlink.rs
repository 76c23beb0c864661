//! Messages to devices (`…/down`): queued durably, sent while the device is
//! connected, re-sent after it reconnects until it acknowledges them.

use std::sync::Arc;

use edge_agent::model::DeviceId;
use edge_agent::wire::Downlink;

use crate::endpoint::Sessions;
use crate::store::{Store, StoreError};

/// The downlink queue of every device.
#[derive(Debug)]
pub struct Downlinks {
    pub store: Arc<Store>,
    pub sessions: Arc<Sessions>,
}

impl Downlinks {
    /// Queues `message` for `device` (durable before return) and sends it now if the
    /// device is connected.
    pub async fn queue(&self, _device: &DeviceId, _message: Downlink) -> Result<(), StoreError> {
        todo!("downlink: queue")
    }
}
