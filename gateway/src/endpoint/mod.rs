//! The embedded device endpoint: MQTT 3.1.1 over mutual TLS, serving only the fixed
//! device topics. It is not a general broker: identity comes from the client
//! certificate, the client id must equal it, each device may publish only to its
//! uplink topics and subscribe only to its downlink topics, and a PUBLISH is
//! acknowledged only after the store's durable commit. After a device's hello its
//! connection sends what [`Downlinks`] holds for it and removes each message on the
//! device's PUBACK.
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
use crate::downlink::Downlinks;
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
    /// Payload bytes of uplink frames received (as sent: compressed, before decoding).
    pub uplink_bytes: AtomicU64,
    /// Agent accept → gateway commit of every newly stored event (see [`crate::ingress`]).
    pub event_latency: LatencyHistogram,
}

impl EndpointMetrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Upper bounds, in microseconds, of [`LatencyHistogram`]'s buckets (0.5 ms to 10 s);
/// `+Inf` follows.
pub const LATENCY_BUCKETS_US: [u64; 19] = [
    500, 1_000, 2_000, 3_000, 5_000, 7_500, 10_000, 15_000, 20_000, 30_000, 50_000, 75_000,
    100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// A Prometheus histogram of latencies, lock-free: one atomic counter per bucket
/// (not cumulative; the last is `+Inf`) and the sum. Readers may see a batch's
/// observations half applied; each counter is exact.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl LatencyHistogram {
    /// Records latencies given in milliseconds (negative ones, from clock steps, as 0).
    pub fn observe_ms(&self, values: impl IntoIterator<Item = i64>) {
        let mut counts = [0u64; LATENCY_BUCKETS_US.len() + 1];
        let mut sum_us = 0u64;
        for ms in values {
            let us = u64::try_from(ms).unwrap_or(0).saturating_mul(1000);
            let at = LATENCY_BUCKETS_US.partition_point(|bound| *bound < us);
            counts[at] += 1;
            sum_us = sum_us.saturating_add(us);
        }
        for (bucket, n) in self.buckets.iter().zip(counts) {
            if n > 0 {
                bucket.fetch_add(n, Ordering::Relaxed);
            }
        }
        self.sum_us.fetch_add(sum_us, Ordering::Relaxed);
    }

    /// Appends the histogram in the Prometheus text format (seconds).
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        use std::fmt::Write as _;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0u64;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            match LATENCY_BUCKETS_US.get(i) {
                Some(us) => {
                    let le = *us as f64 / 1e6;
                    let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
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
    /// The durable downlink queues this endpoint delivers.
    pub downlinks: Arc<Downlinks>,
    /// Holds frames back while the pipeline catches up.
    pub pacer: Arc<crate::pacing::Pacer>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("listen", &self.config.listen)
            .finish_non_exhaustive()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latency_histogram_renders_cumulative_prometheus_buckets() {
        let h = LatencyHistogram::default();
        h.observe_ms([0, 1, 4, 10, 11, 60_000, -3]);
        let mut out = String::new();
        h.render(&mut out, "lat", "help");
        let line = |le: &str| {
            out.lines()
                .find(|l| l.starts_with(&format!("lat_bucket{{le=\"{le}\"}} ")))
                .unwrap_or_else(|| panic!("no bucket {le} in {out}"))
                .rsplit(' ')
                .next()
                .unwrap_or_default()
                .to_owned()
        };
        assert_eq!(line("0.0005"), "2", "0 ms and the clamped -3 ms");
        assert_eq!(line("0.001"), "3");
        assert_eq!(line("0.005"), "4");
        assert_eq!(line("0.01"), "5", "le is inclusive");
        assert_eq!(line("0.015"), "6");
        assert_eq!(line("10"), "6");
        assert_eq!(line("+Inf"), "7");
        let bounds: Vec<&str> = out
            .lines()
            .filter_map(|l| l.strip_prefix("lat_bucket{le=\"")?.split('"').next())
            .collect();
        assert_eq!(
            bounds.join(" "),
            "0.0005 0.001 0.002 0.003 0.005 0.0075 0.01 0.015 0.02 0.03 0.05 0.075 0.1 0.25 0.5 1 2.5 5 10 +Inf"
        );
        assert!(out.contains("# TYPE lat histogram"), "{out}");
        assert!(out.contains("lat_sum 60.026\n"), "{out}");
        assert!(out.contains("lat_count 7\n"), "{out}");
    }
}
