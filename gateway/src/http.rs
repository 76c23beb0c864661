//! The gateway's admin HTTP API: `/health`, `/metrics`, `/v1/devices/{id}`.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::endpoint::{EndpointMetrics, Sessions};
use crate::store::Store;

/// What the admin API reads.
#[derive(Debug)]
pub struct Admin {
    pub store: Arc<Store>,
    pub metrics: Arc<EndpointMetrics>,
    pub sessions: Arc<Sessions>,
    pub profiles: Arc<crate::profiles::Profiles>,
    pub destinations: Arc<crate::dest::Registry>,
    pub downlinks: Arc<crate::downlink::Downlinks>,
    pub config: crate::config::HttpConfig,
    pub sources: Vec<crate::config::SourceConfig>,
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    reply(status, "application/json", v.to_string())
}

impl Admin {
    fn handle<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        if req.method() != Method::GET {
            return json(
                StatusCode::METHOD_NOT_ALLOWED,
                &serde_json::json!({"error": "method_not_allowed", "message": "only GET"}),
            );
        }
        if path == "/health" {
            return json(StatusCode::OK, &serde_json::json!({"ok": true}));
        }
        if path == "/metrics" {
            return reply(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.metrics_text(),
            );
        }
        if let Some(id) = path.strip_prefix("/v1/devices/") {
            return match self.store.device(id) {
                Ok(Some(rec)) => json(
                    StatusCode::OK,
                    &serde_json::json!({
                        "device_id": id,
                        "connected": self.sessions.is_connected(&edge_agent::model::DeviceId(id.to_owned())),
                        "last_seen_ms": rec.last_seen_ms,
                        "events": rec.events,
                        "duplicates": rec.duplicates,
                        "rejected": rec.rejected,
                        "frames_rejected": rec.frames_rejected,
                        "clock_skew_ms": rec.clock_skew_ms,
                        "lanes": rec.lanes.iter().map(|l| serde_json::json!({
                            "lane": l.lane, "high_water": l.high_water, "floor": l.floor,
                        })).collect::<Vec<_>>(),
                        "agent_drops": rec.drops.by_reason().into_iter().collect::<std::collections::BTreeMap<_, _>>(),
                    }),
                ),
                Ok(None) => json(
                    StatusCode::NOT_FOUND,
                    &serde_json::json!({"error": "not_found", "message": format!("no device `{id}`")}),
                ),
                Err(e) => json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &serde_json::json!({"error": "storage_error", "message": e.to_string()}),
                ),
            };
        }
        json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "not_found", "message": format!("no endpoint at {path}")}),
        )
    }

    fn metrics_text(&self) -> String {
        let m = &self.metrics;
        let mut out = String::new();
        for (name, help, v) in [
            (
                "edge_gateway_connections_accepted_total",
                "Device TCP connections accepted.",
                &m.connections_accepted,
            ),
            (
                "edge_gateway_connections_refused_total",
                "Connections closed at the connection cap.",
                &m.connections_refused_cap,
            ),
            (
                "edge_gateway_handshakes_failed_total",
                "TLS handshakes that failed or timed out.",
                &m.handshakes_failed,
            ),
            (
                "edge_gateway_connects_refused_total",
                "CONNECTs refused (client id, revoked).",
                &m.connects_refused,
            ),
            (
                "edge_gateway_frames_rejected_total",
                "Uplink frames rejected (malformed or wrong device).",
                &m.frames_rejected,
            ),
            (
                "edge_gateway_topic_violations_total",
                "Publishes or subscriptions outside a device's topics.",
                &m.topic_violations,
            ),
            (
                "edge_gateway_batches_received_total",
                "Uplink batches committed.",
                &m.batches_received,
            ),
            (
                "edge_gateway_events_stored_total",
                "New events committed to the inbox.",
                &m.events_stored,
            ),
            (
                "edge_gateway_events_duplicate_total",
                "Events received again and ignored.",
                &m.events_duplicate,
            ),
            (
                "edge_gateway_uplink_bytes_total",
                "Uplink frame payload bytes received (compressed, before decoding).",
                &m.uplink_bytes,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        m.event_latency.render(
            &mut out,
            "edge_gateway_event_latency_seconds",
            "Agent HTTP accept to gateway inbox commit of new events (agent time moved to the gateway clock by the batch's skew).",
        );
        let _ = writeln!(out, "# HELP edge_gateway_devices_connected Devices connected now.\n# TYPE edge_gateway_devices_connected gauge\nedge_gateway_devices_connected {}", self.sessions.connected());
        if let Ok(n) = self.store.inbox_len() {
            let _ = writeln!(out, "# HELP edge_gateway_inbox_events Events in the inbox.\n# TYPE edge_gateway_inbox_events gauge\nedge_gateway_inbox_events {n}");
        }
        let _ = writeln!(out, "# HELP edge_gateway_agent_dropped_total Events agents report they dropped, by device and reason.\n# TYPE edge_gateway_agent_dropped_total counter");
        for (id, rec) in self.store.devices(1000).unwrap_or_default() {
            for (reason, n) in rec.drops.by_reason() {
                let _ = writeln!(
                    out,
                    "edge_gateway_agent_dropped_total{{device=\"{id}\",reason=\"{reason}\"}} {n}"
                );
            }
        }
        out
    }

    /// Serves until `shutdown`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        loop {
            let stream = tokio::select! {
                () = shutdown.cancelled() => break,
                r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
            };
            let admin = Arc::clone(&self);
            let token = shutdown.clone();
            tracker.spawn(async move {
                let svc = service_fn(move |req| {
                    let admin = Arc::clone(&admin);
                    async move { Ok::<_, Infallible>(admin.handle(&req)) }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(5))
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    () = token.cancelled() => { conn.as_mut().graceful_shutdown(); let _ = conn.await; }
                }
            });
        }
        tracker.close();
        tracker.wait().await;
    }
}
