//! `/metrics`: Prometheus text of the device endpoint, the inbox, server-side ingest,
//! profiles and destinations.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::Admin;

/// Counters of the HTTP API itself.
#[derive(Debug, Default)]
pub struct HttpCounters {
    /// Responses by status code (a handful of distinct codes: bounded).
    responses: Mutex<BTreeMap<u16, u64>>,
    /// Server-side events stored / received again and ignored.
    ingested: AtomicU64,
    ingest_duplicates: AtomicU64,
}

impl HttpCounters {
    pub fn record_status(&self, status: u16) {
        let mut map = self
            .responses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *map.entry(status).or_default() += 1;
    }

    pub fn record_ingest(&self, stored: usize, duplicates: usize) {
        self.ingested.fetch_add(stored as u64, Ordering::Relaxed);
        self.ingest_duplicates
            .fetch_add(duplicates as u64, Ordering::Relaxed);
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Escapes a label value (names come from config; be safe anyway).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Admin {
    pub(super) fn metrics_text(&self) -> String {
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
            (
                "edge_gateway_source_events_stored_total",
                "Server-side (HTTP ingest) events committed to the inbox.",
                &self.counters.ingested,
            ),
            (
                "edge_gateway_source_events_duplicate_total",
                "Server-side events received again (same message id) and ignored.",
                &self.counters.ingest_duplicates,
            ),
        ] {
            family(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        }
        m.event_latency.render(
            &mut out,
            "edge_gateway_event_latency_seconds",
            "Agent HTTP accept to gateway inbox commit of new events (agent time moved to the gateway clock by the batch's skew).",
        );
        family(
            &mut out,
            "edge_gateway_devices_connected",
            "gauge",
            "Devices connected now.",
        );
        let _ = writeln!(
            out,
            "edge_gateway_devices_connected {}",
            self.sessions.connected()
        );
        if let Ok(n) = self.store.inbox_len() {
            family(
                &mut out,
                "edge_gateway_inbox_events",
                "gauge",
                "Events in the inbox.",
            );
            let _ = writeln!(out, "edge_gateway_inbox_events {n}");
        }
        if let Ok(n) = self.profiles.count() {
            family(
                &mut out,
                "edge_gateway_profiles",
                "gauge",
                "Profiles stored.",
            );
            let _ = writeln!(out, "edge_gateway_profiles {n}");
        }
        self.destination_metrics(&mut out);
        family(
            &mut out,
            "edge_gateway_http_responses_total",
            "counter",
            "HTTP API responses by status code.",
        );
        for (status, n) in self
            .counters
            .responses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            let _ = writeln!(
                out,
                "edge_gateway_http_responses_total{{code=\"{status}\"}} {n}"
            );
        }
        family(
            &mut out,
            "edge_gateway_agent_dropped_total",
            "counter",
            "Events agents report they dropped, by device and reason.",
        );
        for (id, rec) in self.store.devices(1000).unwrap_or_default() {
            for (reason, n) in rec.drops.by_reason() {
                let _ = writeln!(
                    out,
                    "edge_gateway_agent_dropped_total{{device=\"{}\",reason=\"{reason}\"}} {n}",
                    label(&id)
                );
            }
        }
        out
    }

    fn destination_metrics(&self, out: &mut String) {
        let status = self.destinations.status();
        type Field = fn(&crate::dest::DestinationStatus) -> f64;
        let families: [(&str, &str, &str, Field); 6] = [
            (
                "edge_gateway_destination_backlog",
                "gauge",
                "Resolved events not yet delivered by the destination.",
                |s| s.backlog as f64,
            ),
            (
                "edge_gateway_destination_oldest_age_seconds",
                "gauge",
                "Age of the oldest event the destination has not delivered.",
                |s| s.oldest_age_ms as f64 / 1000.0,
            ),
            (
                "edge_gateway_destination_delivered_total",
                "counter",
                "Events delivered by the destination since start.",
                |s| s.delivered as f64,
            ),
            (
                "edge_gateway_destination_filtered_total",
                "counter",
                "Events the destination's filters or consent rules skipped since start.",
                |s| s.filtered as f64,
            ),
            (
                "edge_gateway_destination_retries_total",
                "counter",
                "Sends retried by the destination since start.",
                |s| s.retries as f64,
            ),
            (
                "edge_gateway_destination_dead_letters",
                "gauge",
                "Events in the destination's dead-letter table.",
                |s| s.dead_letters as f64,
            ),
        ];
        for (name, kind, help, field) in families {
            family(out, name, kind, help);
            for s in &status {
                let _ = writeln!(
                    out,
                    "{name}{{destination=\"{}\",kind=\"{}\"}} {}",
                    label(&s.name),
                    label(&s.kind),
                    field(s)
                );
            }
        }
    }
}
