//! The embedded device endpoint: MQTT 3.1.1 over mutual TLS, serving only the fixed
//! device topics. It is not a general broker: identity comes from the client
//! certificate, the client id must equal it, each device may publish only to its
//! uplink topics and subscribe only to its downlink topics, and a PUBLISH is
//! acknowledged only after the store's durable commit.
//!
//! Every connection runs in its own task; the TLS handshake and CONNECT each have a
//! deadline, so an idle or slow socket never delays anyone else.

mod connection;
pub mod sessions;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edge_agent::wire::Topics;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::config::MqttConfig;
use crate::store::Store;
use crate::tls::RevocationList;
pub use sessions::Sessions;

/// Counters of the endpoint, for metrics.
#[derive(Debug, Default)]
pub struct EndpointMetrics {
    pub connections_accepted: AtomicU64,
    pub connections_refused_cap: AtomicU64,
    pub handshakes_failed: AtomicU64,
    pub connects_refused: AtomicU64,
    pub frames_rejected: AtomicU64,
    pub topic_violations: AtomicU64,
    pub batches_received: AtomicU64,
    pub events_stored: AtomicU64,
    pub events_duplicate: AtomicU64,
}

impl EndpointMetrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Everything a connection task needs.
pub struct Endpoint {
    pub config: MqttConfig,
    pub topics: Topics,
    pub acceptor: TlsAcceptor,
    pub store: Arc<Store>,
    pub revoked: Arc<RevocationList>,
    pub sessions: Arc<Sessions>,
    pub metrics: Arc<EndpointMetrics>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").field("listen", &self.config.listen).finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Accepts device connections until `shutdown`; then closes them all.
    pub async fn run(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        let permits = Arc::new(Semaphore::new(self.config.max_connections));
        let tracker = TaskTracker::new();
        loop {
            let (stream, peer) = tokio::select! {
                () = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "Accept failed; retrying.");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                EndpointMetrics::inc(&self.metrics.connections_refused_cap);
                debug!(%peer, "Connection cap reached; closing.");
                drop(stream);
                continue;
            };
            EndpointMetrics::inc(&self.metrics.connections_accepted);
            let _ = stream.set_nodelay(true);
            let me = Arc::clone(&self);
            let token = shutdown.clone();
            tracker.spawn(async move {
                let _permit = permit;
                if let Err(e) = connection::serve(&me, stream, token).await {
                    debug!(%peer, error = %e, "Device connection ended.");
                }
            });
        }
        tracker.close();
        tracker.wait().await;
    }
}
