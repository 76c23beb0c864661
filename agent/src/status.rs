//! `GET /v1/status` (JSON) and `GET /metrics` (Prometheus text), built from the
//! spool's committed counters and the HTTP layer's request counters.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::model::now_ms;
use crate::spool::Spool;

/// Most devices listed in the fleet section of the status.
pub const MAX_STATUS_DEVICES: usize = 1000;

/// HTTP status codes the API answers with, counted for metrics.
pub const COUNTED_CODES: [u16; 13] = [
    200, 202, 400, 401, 404, 405, 408, 413, 429, 500, 503, 507, 0,
];

/// Request counters kept by the HTTP layer.
#[derive(Debug, Default)]
pub struct HttpCounters {
    by_code: [AtomicU64; COUNTED_CODES.len()],
}

impl HttpCounters {
    pub fn record(&self, code: u16) {
        let at = COUNTED_CODES
            .iter()
            .position(|c| *c == code)
            .unwrap_or(COUNTED_CODES.len() - 1);
        self.by_code[at].fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        COUNTED_CODES
            .iter()
            .zip(&self.by_code)
            .map(|(c, n)| (*c, n.load(Ordering::Relaxed)))
    }
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub device_id: String,
    pub fleet: bool,
    pub healthy: bool,
    pub lanes: Vec<LaneReport>,
    pub totals: Totals,
    /// What the gateway's erasure requests removed here.
    pub erasure: ErasureReport,
    /// Audience membership held for offline answers.
    pub audiences: AudienceReport,
    /// Fleet mode: events accepted per device.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceReport>,
    /// Connection state, in-flight batches, last ack, clock skew; absent without uplink.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uplink: Option<crate::uplink::UplinkStatus>,
}

#[derive(Debug, Serialize)]
pub struct LaneReport {
    pub name: String,
    pub events: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    /// Age of the oldest queued event, in seconds; null when the lane is empty.
    pub oldest_age_seconds: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Totals {
    pub accepted: u64,
    pub queued: u64,
    pub dropped: std::collections::BTreeMap<&'static str, u64>,
}

#[derive(Debug, Serialize)]
pub struct ErasureReport {
    /// Purge requests for a user carried out (one sent again counts again).
    pub purged_users: u64,
    /// Queued events they removed (not in `totals.dropped`: the gateway asked).
    pub events_erased: u64,
}

#[derive(Debug, Serialize)]
pub struct AudienceReport {
    /// Users with membership stored.
    pub users: u64,
    /// Newest audience version applied (sent in the hello); 0 for none.
    pub version: u64,
}

#[derive(Debug, Serialize)]
pub struct DeviceReport {
    pub device_id: String,
    pub accepted: u64,
}

/// Builds the status report.
pub fn status(spool: &Spool, device_id: String, fleet: bool) -> Status {
    let stats = spool.stats();
    let now = now_ms();
    let lanes: Vec<LaneReport> = spool
        .lanes()
        .into_iter()
        .map(|l| LaneReport {
            name: l.name,
            events: l.level.events,
            bytes: l.level.bytes,
            max_bytes: l.max_bytes,
            oldest_age_seconds: l
                .oldest_received_ms
                .map(|t| (now.saturating_sub(t)).max(0) as f64 / 1000.0),
        })
        .collect();
    let devices = if fleet {
        spool
            .device_counts(MAX_STATUS_DEVICES)
            .unwrap_or_default()
            .into_iter()
            .map(|(device_id, accepted)| DeviceReport {
                device_id,
                accepted,
            })
            .collect()
    } else {
        Vec::new()
    };
    Status {
        version: env!("CARGO_PKG_VERSION"),
        device_id,
        fleet,
        healthy: spool.is_healthy(),
        totals: Totals {
            accepted: stats.accepted,
            queued: lanes.iter().map(|l| l.events).sum(),
            dropped: stats.drops.by_reason().into_iter().collect(),
        },
        erasure: {
            let e = spool.erasures();
            ErasureReport {
                purged_users: e.purges,
                events_erased: e.events,
            }
        },
        audiences: {
            let a = spool.audience_summary();
            AudienceReport {
                users: a.users,
                version: a.version,
            }
        },
        lanes,
        devices,
        uplink: None,
    }
}

/// Renders Prometheus text exposition format.
pub fn metrics(spool: &Spool, http: &HttpCounters) -> String {
    let stats = spool.stats();
    let mut out = String::with_capacity(2048);
    let _ = writeln!(
        out,
        "# HELP edge_agent_events_accepted_total Events durably queued."
    );
    let _ = writeln!(out, "# TYPE edge_agent_events_accepted_total counter");
    let _ = writeln!(out, "edge_agent_events_accepted_total {}", stats.accepted);
    let _ = writeln!(
        out,
        "# HELP edge_agent_events_dropped_total Events dropped on purpose, by reason."
    );
    let _ = writeln!(out, "# TYPE edge_agent_events_dropped_total counter");
    for (reason, n) in stats.drops.by_reason() {
        let _ = writeln!(
            out,
            "edge_agent_events_dropped_total{{reason=\"{reason}\"}} {n}"
        );
    }
    let erasures = spool.erasures();
    let _ = writeln!(
        out,
        "# HELP edge_agent_user_purges_total Erasure requests for a user carried out.\n# TYPE edge_agent_user_purges_total counter\nedge_agent_user_purges_total {}",
        erasures.purges
    );
    let _ = writeln!(
        out,
        "# HELP edge_agent_events_erased_total Queued events removed by erasure requests.\n# TYPE edge_agent_events_erased_total counter\nedge_agent_events_erased_total {}",
        erasures.events
    );
    let audiences = spool.audience_summary();
    let _ = writeln!(
        out,
        "# HELP edge_agent_audience_users Users whose audience membership is stored.\n# TYPE edge_agent_audience_users gauge\nedge_agent_audience_users {}",
        audiences.users
    );
    let _ = writeln!(
        out,
        "# HELP edge_agent_audiences_version Newest audience version applied.\n# TYPE edge_agent_audiences_version gauge\nedge_agent_audiences_version {}",
        audiences.version
    );
    let _ = writeln!(
        out,
        "# HELP edge_agent_spool_events Events queued per lane."
    );
    let _ = writeln!(out, "# TYPE edge_agent_spool_events gauge");
    let lanes = spool.lanes();
    for l in &lanes {
        let _ = writeln!(
            out,
            "edge_agent_spool_events{{lane=\"{}\"}} {}",
            l.name, l.level.events
        );
    }
    let _ = writeln!(out, "# HELP edge_agent_spool_bytes Bytes queued per lane.");
    let _ = writeln!(out, "# TYPE edge_agent_spool_bytes gauge");
    for l in &lanes {
        let _ = writeln!(
            out,
            "edge_agent_spool_bytes{{lane=\"{}\"}} {}",
            l.name, l.level.bytes
        );
    }
    let _ = writeln!(
        out,
        "# HELP edge_agent_http_responses_total Local API responses by status code (0 = other)."
    );
    let _ = writeln!(out, "# TYPE edge_agent_http_responses_total counter");
    for (code, n) in http.snapshot() {
        let _ = writeln!(
            out,
            "edge_agent_http_responses_total{{code=\"{code}\"}} {n}"
        );
    }
    out
}
