//! Agent configuration: the TOML file's schema, its defaults, and validation.
//!
//! Every field's doc comment is the user's documentation; `conf/agent.toml` mirrors
//! it. A config is only usable after [`AgentConfig::validate`], which names the key
//! at fault. What the pipeline does lives here; how the process runs (paths, log
//! format) are CLI flags.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::model::Map;

/// Raised when the config file cannot be read, parsed or validated.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema.
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value is out of range or inconsistent with another.
    #[error("invalid config value `{key}` in {path}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// A size in bytes, written as an integer or a string such as `"32KiB"` / `"16MiB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("`{text}` is not a size like \"16MiB\""))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" => 1_000,
            "KiB" => 1 << 10,
            "MB" => 1_000_000,
            "MiB" => 1 << 20,
            "GB" => 1_000_000_000,
            "GiB" => 1 << 30,
            other => {
                return Err(format!(
                    "unknown size unit `{other}` (use B, KiB, MiB, GiB)"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("`{text}` is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(t) => ByteSize::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// Deserializes a humane duration string such as `"250ms"` or `"7d"`.
pub(crate) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text)
        .map_err(|e| serde::de::Error::custom(format!("`{text}` is not a duration: {e}")))
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// The whole agent config file. `Default` is what an empty file gives.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Identity and mode of this agent.
    #[serde(default)]
    pub agent: IdentityConfig,
    /// The local HTTP API.
    #[serde(default)]
    pub http: HttpConfig,
    /// Segment HTTP Tracking API (`/v1/*`).
    #[serde(default)]
    pub segment: SegmentConfig,
    /// mParticle Events API (`/v2/*`).
    #[serde(default)]
    pub mparticle: MparticleConfig,
    /// Consent purposes and the rules that require them.
    #[serde(default)]
    pub consent: ConsentConfig,
    /// What the agent adds to every event.
    #[serde(default)]
    pub enrich: EnrichConfig,
    /// The durable spool.
    #[serde(default)]
    pub spool: SpoolConfig,
    /// Delivery to the gateway over MQTT/TLS. Absent: events stay in the spool.
    #[serde(default)]
    pub uplink: Option<UplinkConfig>,
}

/// `[uplink]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// Gateway or broker address, `mqtts://host:port`.
    pub url: String,
    /// CA certificate (PEM) that signed the gateway's certificate.
    pub ca: PathBuf,
    /// This device's certificate (PEM); its CN must be `agent.device_id`.
    pub cert: PathBuf,
    /// This device's private key (PEM).
    pub key: PathBuf,
    /// Topic prefix template, as configured on the gateway.
    #[serde(default = "default_topic_prefix")]
    pub topic_prefix: String,
    /// MQTT keep-alive (at least 5s).
    #[serde(default = "default_keep_alive", deserialize_with = "duration")]
    pub keep_alive: Duration,
    /// Batches in flight per lane before waiting for acks.
    #[serde(default = "default_window")]
    pub window: usize,
    /// A batch not acknowledged within this is sent again.
    #[serde(default = "default_ack_timeout", deserialize_with = "duration")]
    pub ack_timeout: Duration,
    /// Reconnect backoff: first delay, doubled (with jitter) up to `backoff_max`.
    #[serde(default = "default_backoff_min", deserialize_with = "duration")]
    pub backoff_min: Duration,
    #[serde(default = "default_backoff_max", deserialize_with = "duration")]
    pub backoff_max: Duration,
    /// Most events per batch.
    #[serde(default = "default_batch_events")]
    pub max_batch_events: usize,
    /// Most bytes of events per batch (before compression).
    #[serde(default = "default_batch_bytes")]
    pub max_batch_bytes: ByteSize,
    /// Compress batches with LZ4 (`"lz4"`) or not (`"none"`).
    #[serde(default = "default_compression")]
    pub compression: String,
    /// Cap on uplink bytes per second for metered links; 0 = no cap.
    #[serde(default)]
    pub bandwidth_limit: ByteSize,
    /// Per-lane sending mode; lanes not listed stream with the default linger.
    #[serde(default)]
    pub lanes: Vec<UplinkLaneConfig>,
}

/// How one lane is sent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkLaneConfig {
    /// Lane name (must be a spool lane).
    pub name: String,
    /// `stream`: send as soon as events arrive, waiting `linger` to fill a batch.
    /// `batch`: send every `interval`, or sooner once a batch is full.
    #[serde(default)]
    pub mode: UplinkMode,
    #[serde(default = "default_linger", deserialize_with = "duration")]
    pub linger: Duration,
    #[serde(default = "default_interval", deserialize_with = "duration")]
    pub interval: Duration,
}

/// Sending mode of a lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UplinkMode {
    #[default]
    Stream,
    Batch,
}

fn default_topic_prefix() -> String {
    "edge/{device}".to_owned()
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}
fn default_window() -> usize {
    8
}
fn default_ack_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_backoff_min() -> Duration {
    Duration::from_millis(100)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(30)
}
fn default_batch_events() -> usize {
    1000
}
fn default_batch_bytes() -> ByteSize {
    ByteSize(512 * 1024)
}
fn default_compression() -> String {
    "lz4".to_owned()
}
pub(crate) fn default_linger() -> Duration {
    Duration::from_millis(5)
}
fn default_interval() -> Duration {
    Duration::from_secs(30)
}

/// `[agent]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// This device's id. Empty: generated once and kept in the data dir.
    #[serde(default)]
    pub device_id: String,
    /// Where the spool lives; `--data-dir` overrides it. Relative to the working dir.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Fleet mode: this agent serves many local devices, and each event keeps the
    /// device id it arrived with (Segment `context.device.id`, mParticle `mp_deviceid`
    /// / `device_info`) instead of this agent's own.
    #[serde(default)]
    pub fleet: bool,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("data/agent")
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            device_id: String::new(),
            data_dir: default_data_dir(),
            fleet: false,
        }
    }
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the local API. Keep it on loopback unless the network is trusted.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Open connections served at once; more wait in the kernel's accept queue.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Time a client has to send its request headers.
    #[serde(default = "default_header_timeout", deserialize_with = "duration")]
    pub header_timeout: Duration,
    /// Time a client has to send its request body once the headers are in.
    #[serde(default = "default_body_timeout", deserialize_with = "duration")]
    pub body_timeout: Duration,
    /// How long shutdown waits for in-flight requests before giving up on them.
    #[serde(default = "default_drain_timeout", deserialize_with = "duration")]
    pub drain_timeout: Duration,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8088))
}
fn default_max_connections() -> usize {
    256
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_body_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(10)
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            max_connections: default_max_connections(),
            header_timeout: default_header_timeout(),
            body_timeout: default_body_timeout(),
            drain_timeout: default_drain_timeout(),
        }
    }
}

/// `[segment]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentConfig {
    /// Accepted write keys (Basic auth user, or `writeKey` in the body). Empty: any.
    #[serde(default)]
    pub write_keys: Vec<String>,
    /// Largest single event (Segment's documented limit is 32 KB).
    #[serde(default = "default_segment_event")]
    pub max_event_size: ByteSize,
    /// Largest request body, e.g. a `/v1/batch` (Segment's limit is 500 KB).
    #[serde(default = "default_segment_batch")]
    pub max_batch_size: ByteSize,
}

fn default_segment_event() -> ByteSize {
    ByteSize(32 * 1024)
}
fn default_segment_batch() -> ByteSize {
    ByteSize(500 * 1024)
}

impl Default for SegmentConfig {
    fn default() -> Self {
        Self {
            write_keys: Vec::new(),
            max_event_size: default_segment_event(),
            max_batch_size: default_segment_batch(),
        }
    }
}

/// `[mparticle]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MparticleConfig {
    /// Accepted key/secret pairs (Basic auth). Empty: any.
    #[serde(default)]
    pub keys: Vec<MparticleKey>,
    /// Largest request body (mParticle's limit is 256 KB).
    #[serde(default = "default_mparticle_request")]
    pub max_request_size: ByteSize,
}

fn default_mparticle_request() -> ByteSize {
    ByteSize(256 * 1024)
}

impl Default for MparticleConfig {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            max_request_size: default_mparticle_request(),
        }
    }
}

/// One mParticle server-to-server key pair.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MparticleKey {
    pub key: String,
    pub secret: String,
}

/// `[consent]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentConfig {
    /// What to assume for a purpose the user has not answered yet: `"grant"` (opt-out
    /// regimes such as CCPA) or `"deny"` (opt-in regimes such as GDPR).
    #[serde(default)]
    pub unknown: UnknownConsent,
    /// The purposes that exist.
    #[serde(default)]
    pub purposes: Vec<PurposeConfig>,
    /// Which events need which purposes. An event needs the union of all matching rules.
    #[serde(default)]
    pub rules: Vec<ConsentRuleConfig>,
}

impl Default for ConsentConfig {
    fn default() -> Self {
        Self {
            unknown: UnknownConsent::Grant,
            purposes: Vec::new(),
            rules: Vec::new(),
        }
    }
}

/// The answer assumed before the user gave one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UnknownConsent {
    #[default]
    Grant,
    Deny,
}

/// One consent purpose.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurposeConfig {
    /// Purpose name, matched case-insensitively against Segment
    /// `categoryPreferences` keys and mParticle GDPR purpose names.
    pub name: String,
    /// Other names the same purpose arrives under (e.g. a CMP's category ids).
    #[serde(default)]
    pub aliases: Vec<String>,
    /// The purpose counts as sale/sharing: a CCPA opt-out denies it.
    #[serde(default)]
    pub sale: bool,
}

/// One consent rule: events matching `types` and `names` need `purposes`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentRuleConfig {
    /// Event types (`track`, `page`, `screen`, `identify`, ...). Empty: all types.
    #[serde(default)]
    pub types: Vec<String>,
    /// Event names. Empty: all names.
    #[serde(default)]
    pub names: Vec<String>,
    /// Purposes the events need.
    pub purposes: Vec<String>,
}

/// `[enrich]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichConfig {
    /// A session ends after this long without events from the device.
    #[serde(default = "default_session_timeout", deserialize_with = "duration")]
    pub session_timeout: Duration,
    /// Identity/trait keys whose values are replaced by their SHA-256 (hex) on the
    /// device, e.g. `["email", "phone"]`.
    #[serde(default)]
    pub hash_pii: Vec<String>,
    /// Context added to every event where the request lacks it (app, os, device...).
    #[serde(default, deserialize_with = "toml_map")]
    pub context: Map,
}

fn default_session_timeout() -> Duration {
    Duration::from_secs(30 * 60)
}

fn toml_map<'de, D: Deserializer<'de>>(d: D) -> Result<Map, D::Error> {
    let table = toml::Table::deserialize(d)?;
    Ok(table
        .iter()
        .map(|(k, v)| (k.clone(), crate::model::Value::from_toml(v)))
        .collect())
}

impl Default for EnrichConfig {
    fn default() -> Self {
        Self {
            session_timeout: default_session_timeout(),
            hash_pii: Vec::new(),
            context: Map::new(),
        }
    }
}

/// `[spool]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Memory redb may use for its page cache.
    #[serde(default = "default_cache_size")]
    pub cache_size: ByteSize,
    /// How often expired events are swept out.
    #[serde(default = "default_sweep_interval", deserialize_with = "duration")]
    pub sweep_interval: Duration,
    /// After this many bytes were removed since the last compaction, compact the file
    /// to give the space back to the filesystem.
    #[serde(default = "default_compact_after")]
    pub compact_after: ByteSize,
    /// Lane for events no route matches.
    #[serde(default = "default_lane_name")]
    pub default_lane: String,
    /// The lanes. Each has its own byte budget, TTL and policy when full.
    #[serde(default = "default_lanes")]
    pub lanes: Vec<LaneConfig>,
    /// Routes from event types/names to lanes; the first match wins.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

fn default_cache_size() -> ByteSize {
    ByteSize(4 << 20)
}
fn default_sweep_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_compact_after() -> ByteSize {
    ByteSize(64 << 20)
}
fn default_lane_name() -> String {
    "default".to_owned()
}
fn default_lanes() -> Vec<LaneConfig> {
    vec![LaneConfig {
        name: default_lane_name(),
        max_bytes: ByteSize(256 << 20),
        ttl: None,
        when_full: WhenFull::Reject,
    }]
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            cache_size: default_cache_size(),
            sweep_interval: default_sweep_interval(),
            compact_after: default_compact_after(),
            default_lane: default_lane_name(),
            lanes: default_lanes(),
            routes: Vec::new(),
        }
    }
}

/// One spool lane.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaneConfig {
    /// Lane name (letters, digits, `-`, `_`).
    pub name: String,
    /// Byte budget of queued events in this lane.
    pub max_bytes: ByteSize,
    /// Events older than this are dropped (counted as `ttl_expired`). Absent: kept.
    #[serde(default, deserialize_with = "opt_duration")]
    pub ttl: Option<Duration>,
    /// What a full lane does: `reject` (429 to the app) or `drop_oldest` (counted).
    #[serde(default)]
    pub when_full: WhenFull,
}

/// Policy of a full lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    #[default]
    Reject,
    DropOldest,
}

/// A route: events matching `types` and `names` go to `lane`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Event types. Empty: all types.
    #[serde(default)]
    pub types: Vec<String>,
    /// Event names. Empty: all names.
    #[serde(default)]
    pub names: Vec<String>,
    /// Destination lane.
    pub lane: String,
}

impl AgentConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: AgentConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        if !self.agent.device_id.is_empty() && !valid_device_id(&self.agent.device_id) {
            return Err(bad(
                "agent.device_id",
                "use 1-128 characters of letters, digits, `-`, `_`, `.`, `:`".into(),
            ));
        }
        if self.http.max_connections == 0 {
            return Err(bad("http.max_connections", "must be at least 1".into()));
        }
        for (key, d) in [
            ("http.header_timeout", self.http.header_timeout),
            ("http.body_timeout", self.http.body_timeout),
        ] {
            if d < Duration::from_millis(10) {
                return Err(bad(key, "must be at least 10ms".into()));
            }
        }
        if self.segment.max_event_size > self.segment.max_batch_size {
            return Err(bad(
                "segment.max_event_size",
                "must not exceed segment.max_batch_size".into(),
            ));
        }
        if self.spool.cache_size.0 < 64 * 1024 {
            return Err(bad("spool.cache_size", "must be at least 64KiB".into()));
        }
        if self.spool.sweep_interval < Duration::from_millis(100) {
            return Err(bad("spool.sweep_interval", "must be at least 100ms".into()));
        }
        let mut lanes = HashSet::new();
        if self.spool.lanes.is_empty() {
            return Err(bad("spool.lanes", "at least one lane is needed".into()));
        }
        if self.spool.lanes.len() > 16 {
            return Err(bad("spool.lanes", "at most 16 lanes".into()));
        }
        for lane in &self.spool.lanes {
            if lane.name.is_empty()
                || lane.name.len() > 32
                || !lane
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(bad(
                    "spool.lanes.name",
                    format!("`{}`: use 1-32 letters, digits, `-`, `_`", lane.name),
                ));
            }
            if !lanes.insert(lane.name.as_str()) {
                return Err(bad(
                    "spool.lanes.name",
                    format!("`{}` is repeated", lane.name),
                ));
            }
            if lane.max_bytes.0 < 4096 {
                return Err(bad(
                    "spool.lanes.max_bytes",
                    format!("lane `{}`: must be at least 4KiB", lane.name),
                ));
            }
        }
        if !lanes.contains(self.spool.default_lane.as_str()) {
            return Err(bad(
                "spool.default_lane",
                format!("`{}` is not a lane", self.spool.default_lane),
            ));
        }
        for route in &self.spool.routes {
            if !lanes.contains(route.lane.as_str()) {
                return Err(bad(
                    "spool.routes.lane",
                    format!("`{}` is not a lane", route.lane),
                ));
            }
        }
        if let Some(up) = &self.uplink {
            if !(up.url.starts_with("mqtts://")) {
                return Err(bad(
                    "uplink.url",
                    format!("`{}`: use mqtts://host:port", up.url),
                ));
            }
            if up.keep_alive < Duration::from_secs(5) {
                return Err(bad("uplink.keep_alive", "must be at least 5s".into()));
            }
            if up.window == 0 || up.window > 1024 {
                return Err(bad("uplink.window", "must be 1-1024".into()));
            }
            if up.max_batch_events == 0 || up.max_batch_events > 100_000 {
                return Err(bad("uplink.max_batch_events", "must be 1-100000".into()));
            }
            if up.compression != "lz4" && up.compression != "none" {
                return Err(bad("uplink.compression", "use \"lz4\" or \"none\"".into()));
            }
            if up.backoff_min.is_zero() || up.backoff_min > up.backoff_max {
                return Err(bad(
                    "uplink.backoff_min",
                    "must be above 0 and at most backoff_max".into(),
                ));
            }
            if self.agent.device_id.is_empty() {
                return Err(bad(
                    "agent.device_id",
                    "the uplink needs the device id its certificate names".into(),
                ));
            }
            crate::wire::Topics::new(&up.topic_prefix)
                .map_err(|e| bad("uplink.topic_prefix", e.to_string()))?;
            for l in &up.lanes {
                if !lanes.contains(l.name.as_str()) {
                    return Err(bad(
                        "uplink.lanes.name",
                        format!("`{}` is not a spool lane", l.name),
                    ));
                }
            }
        }
        let mut purposes = HashSet::new();
        for p in &self.consent.purposes {
            if p.name.is_empty() {
                return Err(bad("consent.purposes.name", "must not be empty".into()));
            }
            for name in std::iter::once(&p.name).chain(&p.aliases) {
                if !purposes.insert(name.to_lowercase()) {
                    return Err(bad(
                        "consent.purposes",
                        format!("`{name}` names two purposes"),
                    ));
                }
            }
        }
        for rule in &self.consent.rules {
            for p in &rule.purposes {
                if !self.consent.purposes.iter().any(|d| &d.name == p) {
                    return Err(bad(
                        "consent.rules.purposes",
                        format!("`{p}` is not a declared purpose"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Device ids go into topic names later: no MQTT wildcards or separators.
pub fn valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn empty_file_gives_working_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.http.listen.port(), 8088);
        assert_eq!(c.segment.max_event_size, ByteSize(32 * 1024));
        assert_eq!(c.spool.lanes.len(), 1);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let err = parse("[http]\nlisten_addr = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_addr"), "{err}");
    }

    #[test]
    fn sizes_and_durations_are_humane() {
        let c = parse(
            "[http]\nheader_timeout = \"250ms\"\n[[spool.lanes]]\nname = \"default\"\nmax_bytes = \"16MiB\"\nttl = \"7d\"\nwhen_full = \"drop_oldest\"",
        )
        .unwrap();
        assert_eq!(c.http.header_timeout, Duration::from_millis(250));
        assert_eq!(c.spool.lanes[0].max_bytes, ByteSize(16 << 20));
        assert_eq!(c.spool.lanes[0].ttl, Some(Duration::from_secs(7 * 86400)));
        assert_eq!(c.spool.lanes[0].when_full, WhenFull::DropOldest);
    }

    #[test]
    fn route_to_missing_lane_names_the_key() {
        let err = parse("[[spool.routes]]\nlane = \"nope\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("spool.routes.lane") && err.contains("nope"),
            "{err}"
        );
    }

    #[test]
    fn rule_with_undeclared_purpose_is_refused() {
        let err = parse("[[consent.rules]]\npurposes = [\"ads\"]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("consent.rules.purposes"), "{err}");
    }

    #[test]
    fn device_id_with_topic_wildcards_is_refused() {
        assert!(parse("[agent]\ndevice_id = \"a/+\"").is_err());
    }
}
