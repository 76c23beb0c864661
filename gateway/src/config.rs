//! Gateway configuration: the TOML schema, defaults, and validation.
//!
//! Every field's doc comment is the user's documentation; `conf/gateway.toml` mirrors
//! it. Relative paths are resolved against the data dir.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edge_agent::config::ByteSize;
use serde::{Deserialize, Deserializer};

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

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text)
        .map_err(|e| serde::de::Error::custom(format!("`{text}` is not a duration: {e}")))
}

/// The whole gateway config file. `Default` is what an empty file gives.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Where state lives.
    #[serde(default)]
    pub gateway: GatewaySection,
    /// The device endpoint (MQTT over mutual TLS).
    #[serde(default)]
    pub mqtt: MqttConfig,
    /// Certificates of the device endpoint.
    #[serde(default)]
    pub tls: TlsConfig,
    /// The admin/metrics HTTP API.
    #[serde(default)]
    pub http: HttpConfig,
    /// Destinations events are delivered to.
    #[serde(default)]
    pub destinations: Vec<DestinationConfig>,
    /// Identity resolution.
    #[serde(default)]
    pub identity: IdentityConfig,
    /// Computed profile attributes.
    #[serde(default)]
    pub computed: Vec<ComputedConfig>,
    /// Server-side sources allowed to post events to the HTTP API.
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    /// Audience definitions.
    #[serde(default)]
    pub audiences: Vec<AudienceConfig>,
    /// Feeds: tools posting engagement events back (`POST /v1/feeds/{name}`).
    #[serde(default)]
    pub feeds: Vec<FeedConfig>,
}

/// `[gateway]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    /// State directory (redb file, certificates, file destinations); `--data-dir`
    /// overrides it. Relative to the working dir.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Memory redb may use for its page cache.
    #[serde(default = "default_cache")]
    pub cache_size: ByteSize,
    /// Testing only: lets `POST /v1/clock` move the gateway's clock forward, so tests
    /// can let time windows pass without sleeping. Never in production.
    #[serde(default)]
    pub test_clock: bool,
    /// How often audiences whose conditions change with time alone are re-evaluated
    /// over every profile.
    #[serde(default = "default_sweep", deserialize_with = "duration")]
    pub audience_sweep: Duration,
    /// Ingest pacing (see `pacing`): a device frame waits before its commit while the
    /// profile stage or a streaming destination is more than this many events behind
    /// the inbox; 0 = never.
    #[serde(default = "default_pace_lag")]
    pub pace_lag: u64,
    /// Longest a frame waits for that.
    #[serde(default = "default_pace_max_wait", deserialize_with = "duration")]
    pub pace_max_wait: Duration,
}

fn default_pace_lag() -> u64 {
    crate::profiles::TAIL_EVENTS as u64
}

fn default_pace_max_wait() -> Duration {
    Duration::from_millis(50)
}

fn default_sweep() -> Duration {
    Duration::from_secs(60)
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("data/gateway")
}
fn default_cache() -> ByteSize {
    ByteSize(64 << 20)
}

impl Default for GatewaySection {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            cache_size: default_cache(),
            test_clock: false,
            audience_sweep: default_sweep(),
            pace_lag: default_pace_lag(),
            pace_max_wait: default_pace_max_wait(),
        }
    }
}

/// `[mqtt]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// Where devices connect: `embedded` (default), the gateway's own MQTT/TLS endpoint
    /// on `listen`; or `broker`, an external MQTT broker at `broker_url` that devices
    /// connect to and the gateway consumes through the shared subscription
    /// `shared_group`.
    #[serde(default)]
    pub mode: MqttMode,
    /// Address of the MQTT/TLS device endpoint (embedded mode).
    #[serde(default = "default_mqtt_listen")]
    pub listen: SocketAddr,
    /// Topic prefix template; `{device}` is the device id from its certificate. In
    /// broker mode it must match the broker's ACLs (`conf/mosquitto.acl`).
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    /// Most device connections at once; more are closed right after accept (embedded
    /// mode).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Time a client has to finish the TLS handshake (embedded mode).
    #[serde(default = "default_handshake_timeout", deserialize_with = "duration")]
    pub handshake_timeout: Duration,
    /// Time a client has to send CONNECT after the handshake (embedded mode).
    #[serde(default = "default_handshake_timeout", deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// Largest MQTT packet accepted (and so largest uplink frame), in both modes.
    #[serde(default = "default_max_packet")]
    pub max_packet_size: ByteSize,
    /// Most events per second one device may send; faster senders are slowed down
    /// (their socket is read later), never dropped. Embedded mode; in broker mode the
    /// broker's own limits apply.
    #[serde(default = "default_rate")]
    pub device_events_per_second: u32,
    /// Broker mode: the broker, `mqtts://host:port` (TLS only; the host must be named
    /// in the broker's certificate).
    #[serde(default)]
    pub broker_url: Option<String>,
    /// Broker mode: the shared subscription group (`$share/<group>/...`). Gateways in
    /// one group split the uplink between them; each message goes to one of them.
    #[serde(default = "default_shared_group")]
    pub shared_group: String,
    /// Broker mode: the gateway's MQTT client id, also the key of its persistent
    /// session at the broker. Give every gateway instance its own. With
    /// `conf/mosquitto.conf` (`use_username_as_clientid`) the broker uses the
    /// certificate's CN instead, so make it the CN.
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// Broker mode: CA certificate the broker's certificate must chain to. Default:
    /// `<tls.pki_dir>/ca.pem`.
    #[serde(default)]
    pub broker_ca: Option<PathBuf>,
    /// Broker mode: the gateway's client certificate (its CN is its broker user name).
    /// Default: `<tls.pki_dir>/devices/<client_id>.pem`, which `tls.create_dev_certs`
    /// creates when missing.
    #[serde(default)]
    pub broker_cert: Option<PathBuf>,
    /// Broker mode: the key of `broker_cert`. Default:
    /// `<tls.pki_dir>/devices/<client_id>.key`.
    #[serde(default)]
    pub broker_key: Option<PathBuf>,
    /// Broker mode: how long the broker keeps the gateway's session (subscriptions and
    /// queued uplink) while the gateway is away. At least `1s`.
    #[serde(default = "default_session_expiry", deserialize_with = "duration")]
    pub broker_session_expiry: Duration,
    /// Broker mode: MQTT keep-alive with the broker, `5s` to `18h`.
    #[serde(default = "default_broker_keep_alive", deserialize_with = "duration")]
    pub broker_keep_alive: Duration,
    /// Broker mode: most uplink messages the broker may have sent the gateway that it
    /// has not acknowledged yet (MQTT 5 receive maximum), 1 to 65535. A message is
    /// acknowledged only after its batch is committed.
    #[serde(default = "default_broker_in_flight")]
    pub broker_max_in_flight: u16,
    /// Broker mode: first delay before reconnecting to the broker; doubles (with
    /// jitter) up to `broker_backoff_max`.
    #[serde(default = "default_backoff_min", deserialize_with = "duration")]
    pub broker_backoff_min: Duration,
    /// Broker mode: longest delay between reconnect attempts.
    #[serde(default = "default_backoff_max", deserialize_with = "duration")]
    pub broker_backoff_max: Duration,
}

/// Where devices connect (`mqtt.mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MqttMode {
    /// The gateway's own MQTT/TLS device endpoint.
    #[default]
    Embedded,
    /// An external broker; the gateway is one of its clients.
    Broker,
}

impl MqttConfig {
    /// The broker's host and port from `broker_url`.
    pub fn broker_address(&self) -> Result<(String, u16), String> {
        let url = self
            .broker_url
            .as_deref()
            .ok_or("required when mode = \"broker\"")?;
        parse_broker_url(url)
    }
}

/// `mqtts://host:port` → (host, port); IPv6 hosts in brackets.
pub fn parse_broker_url(url: &str) -> Result<(String, u16), String> {
    let bad = || format!("`{url}`: expected mqtts://host:port");
    let rest = url.strip_prefix("mqtts://").ok_or_else(bad)?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || port == 0 || host.contains(['/', '@', '?', '#', ' ']) {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

fn default_mqtt_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8883))
}
fn default_prefix() -> String {
    "edge/{device}".to_owned()
}
fn default_max_connections() -> usize {
    10_000
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_max_packet() -> ByteSize {
    ByteSize(4 << 20)
}
fn default_rate() -> u32 {
    200_000
}
fn default_shared_group() -> String {
    "edge-gateways".to_owned()
}
fn default_client_id() -> String {
    crate::pki::SERVER_COMMON_NAME.to_owned()
}
fn default_session_expiry() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_broker_keep_alive() -> Duration {
    Duration::from_secs(30)
}
fn default_broker_in_flight() -> u16 {
    64
}
fn default_backoff_min() -> Duration {
    Duration::from_millis(100)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(30)
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            listen: default_mqtt_listen(),
            topic_prefix: default_prefix(),
            max_connections: default_max_connections(),
            handshake_timeout: default_handshake_timeout(),
            connect_timeout: default_handshake_timeout(),
            max_packet_size: default_max_packet(),
            device_events_per_second: default_rate(),
            mode: MqttMode::default(),
            broker_url: None,
            shared_group: default_shared_group(),
            client_id: default_client_id(),
            broker_ca: None,
            broker_cert: None,
            broker_key: None,
            broker_session_expiry: default_session_expiry(),
            broker_keep_alive: default_broker_keep_alive(),
            broker_max_in_flight: default_broker_in_flight(),
            broker_backoff_min: default_backoff_min(),
            broker_backoff_max: default_backoff_max(),
        }
    }
}

/// `[tls]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Directory of the PKI (`ca.pem`, `server.pem`, `server.key`, `devices/`),
    /// relative to the data dir.
    #[serde(default = "default_pki_dir")]
    pub pki_dir: PathBuf,
    /// Create a dev CA, server certificate and the `dev_devices` certificates on start
    /// when they are missing (for a first run without openssl). Off in production.
    #[serde(default)]
    pub create_dev_certs: bool,
    /// Device ids to issue dev certificates for when `create_dev_certs` is on.
    #[serde(default)]
    pub dev_devices: Vec<String>,
    /// Revoked device ids, one per line (`#` comments); re-read every `revocation_reload`.
    #[serde(default)]
    pub revoked: Option<PathBuf>,
    /// How often the revocation file is re-read.
    #[serde(default = "default_reload", deserialize_with = "duration")]
    pub revocation_reload: Duration,
}

fn default_pki_dir() -> PathBuf {
    PathBuf::from("pki")
}
fn default_reload() -> Duration {
    Duration::from_secs(10)
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            pki_dir: default_pki_dir(),
            create_dev_certs: false,
            dev_devices: Vec::new(),
            revoked: None,
            revocation_reload: default_reload(),
        }
    }
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the HTTP API: server-side ingest, admin, metrics.
    #[serde(default = "default_http_listen")]
    pub listen: SocketAddr,
    /// Bearer token required by the admin API (`/v1/profiles`, `/v1/destinations`,
    /// `/v1/devices`). Absent: admin calls are allowed from loopback only.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// Largest request body accepted by the ingest endpoints.
    #[serde(default = "default_max_body")]
    pub max_body: ByteSize,
}

fn default_max_body() -> ByteSize {
    ByteSize(512 << 10)
}

fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: default_http_listen(),
            admin_token: None,
            max_body: default_max_body(),
        }
    }
}

/// One `[[destinations]]` entry. Kind-specific keys are ignored by other kinds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    /// Unique name (letters, digits, `-`, `_`); names its cursor, dead letters and files.
    pub name: String,
    /// `file` (NDJSON for batch/ETL), `webhook` (Segment-spec JSON over HTTP) or
    /// `postgres` (rows in tables created on start).
    pub kind: DestinationKind,

    // ---- what is sent ----
    /// Event types sent (`track`, `identify`, `page`, `screen`, `group`, `alias`);
    /// empty = all.
    #[serde(default)]
    pub event_types: Vec<String>,
    /// Event names sent (track/screen/page names); empty = all.
    #[serde(default)]
    pub event_names: Vec<String>,
    /// Event names never sent.
    #[serde(default)]
    pub exclude_event_names: Vec<String>,
    /// Consent purposes the user must have granted for an event to be sent here.
    #[serde(default)]
    pub require_purposes: Vec<String>,
    /// This destination sells or shares data (CCPA): users who opted out get nothing.
    #[serde(default)]
    pub sale: bool,
    /// Data minimization. Identity types that may leave (`customer_id`,
    /// `anonymous_id`, `email`, `device_id`, any other type); taken from the event or
    /// attached from the profile. Absent: the event's own identities, nothing attached.
    #[serde(default)]
    pub identities: Option<Vec<String>>,
    /// Profile attributes and computed attributes to attach under `traits`; the
    /// event's own traits are cut to this list too. Absent: the event's own traits,
    /// nothing attached.
    #[serde(default)]
    pub attributes: Option<Vec<String>>,
    /// Event properties that may leave. Absent: all.
    #[serde(default)]
    pub properties: Option<Vec<String>>,
    /// Send the event's `context` (device, app, library...).
    #[serde(default = "yes")]
    pub context: bool,

    // ---- when it is sent ----
    /// `stream`: as events arrive (batches of up to `batch_size`, waiting at most
    /// `linger`); `batch`: everything accumulated, every `schedule`.
    #[serde(default)]
    pub mode: DeliveryMode,
    /// Most events in one request / transaction / write.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Stream mode: how long a partial batch waits for more events.
    #[serde(default = "default_linger", deserialize_with = "duration")]
    pub linger: Duration,
    /// Batch mode: interval between deliveries.
    #[serde(default = "default_schedule", deserialize_with = "duration")]
    pub schedule: Duration,
    /// Most requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Most requests per second; 0 = unlimited.
    #[serde(default)]
    pub rate_limit: u32,
    /// Deadline of one request.
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// First retry delay after a 408/429/5xx/timeout; doubles (with jitter) up to
    /// `retry_max`. A `Retry-After` header wins.
    #[serde(default = "default_retry_initial", deserialize_with = "duration")]
    pub retry_initial: Duration,
    #[serde(default = "default_retry_max", deserialize_with = "duration")]
    pub retry_max: Duration,

    // ---- webhook ----
    /// `webhook`: the URL events are POSTed to (http or https).
    #[serde(default)]
    pub url: Option<String>,
    /// `webhook`: extra request headers.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// `webhook`: `Authorization: Bearer <token>`.
    #[serde(default)]
    pub bearer_token: Option<String>,
    /// `webhook`: HTTP basic auth as `user:password` (Segment style: write key as user).
    #[serde(default)]
    pub basic_auth: Option<String>,
    /// `webhook`: `single` (one event per request, the Segment track/identify shape)
    /// or `batch` (`{"batch": [...]}`).
    #[serde(default)]
    pub format: WebhookFormat,

    // ---- file ----
    /// `file`: output directory, relative to the data dir.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// `file`: a file is closed and a new one started past this size...
    #[serde(default = "default_file_size")]
    pub max_file_size: ByteSize,
    /// ...or once it is this old.
    #[serde(default = "default_file_age", deserialize_with = "duration")]
    pub max_file_age: Duration,
    /// `file`: gzip each file (`.ndjson.gz`); readable with `zcat` even after a crash.
    #[serde(default)]
    pub gzip: bool,

    // ---- postgres ----
    /// `postgres`: connection string, e.g. `host=127.0.0.1 port=5432 user=edge dbname=edge`.
    #[serde(default)]
    pub connection: Option<String>,
    /// `postgres`: table name prefix (`<prefix>events`, `<prefix>profiles`).
    #[serde(default = "default_table_prefix")]
    pub table_prefix: String,
    /// `postgres`: also upsert a snapshot of each event's profile.
    #[serde(default)]
    pub profile_snapshots: bool,

    // ---- audience outputs ----
    /// `audience_*` kinds: the audiences sent; empty = all.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// `audience_file`: `csv` or `ndjson` snapshots, one file per audience every
    /// `schedule`.
    #[serde(default)]
    pub snapshot_format: SnapshotFormat,

    /// Not a key: senders whose events never go here (`feed:<name>` of every feed that
    /// lists this destination as its tool), filled in by [`GatewayConfig::parse`].
    #[serde(skip)]
    pub exclude_senders: Vec<String>,
}

/// Format of audience snapshot files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotFormat {
    #[default]
    Csv,
    Ndjson,
}

/// One `[[audiences]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AudienceConfig {
    /// Unique name (letters, digits, `-`, `_`): what destinations and devices see.
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// The condition, a tree of inline tables (compiled and checked at start by
    /// `crate::audience`; errors name the audience and the clause):
    /// `{ all = [..] }`, `{ any = [..] }`, `{ not = {..} }`,
    /// `{ attribute = "plan", op = "eq", value = "pro" }` (ops: eq, ne, gt, gte, lt,
    /// lte, exists, contains, in; attributes and computed attributes),
    /// `{ consent = "advertising" }`,
    /// `{ did = "Push Sent", at_least = 1, within = "7d", before = "1h",
    ///    where = [{ property = "campaign", op = "eq", value = "spring" }] }`
    /// (`before`: the occurrence is at least that old).
    pub when: toml::Value,
}

/// One `[[feeds]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedConfig {
    /// Name in the URL (`/v1/feeds/<name>`) and the events' sender (`feed:<name>`).
    pub name: String,
    /// `Authorization: Bearer <token>` the tool must send.
    pub token: String,
    /// Destinations that are this tool: the feed's events never go back to them.
    #[serde(default)]
    pub destinations: Vec<String>,
}

fn yes() -> bool {
    true
}
fn default_batch_size() -> usize {
    100
}
fn default_linger() -> Duration {
    Duration::from_millis(100)
}
fn default_schedule() -> Duration {
    Duration::from_secs(3600)
}
fn default_concurrency() -> usize {
    4
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_retry_initial() -> Duration {
    Duration::from_secs(1)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(300)
}
fn default_file_size() -> ByteSize {
    ByteSize(64 << 20)
}
fn default_file_age() -> Duration {
    Duration::from_secs(60)
}
fn default_table_prefix() -> String {
    "edge_".into()
}

/// Kinds of destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DestinationKind {
    File,
    Webhook,
    Postgres,
    /// Audience membership as batched add/remove calls to an HTTP API.
    AudienceWebhook,
    /// Full audience snapshots (CSV/NDJSON), one file per audience every `schedule`.
    AudienceFile,
    /// Audience membership as a PostgreSQL table kept equal to the live membership.
    AudiencePostgres,
}

/// When a destination sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryMode {
    #[default]
    Stream,
    Batch,
}

/// Body shape of webhook requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFormat {
    #[default]
    Single,
    Batch,
}

/// `[identity]`: how identifiers become profiles.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Identity types a profile holds at most one value of: two profiles holding
    /// different values are never merged (a shared TV keeps its users apart).
    #[serde(default = "default_unique")]
    pub unique: Vec<String>,
    /// Identity types used to link events to profiles. Segment `userId` and
    /// mParticle `customer_id` are `customer_id`; `anonymousId` is `anonymous_id`;
    /// `traits.email` and mParticle `email` are `email`; other mParticle identities
    /// keep their names. `device_id` is off by default: devices are shared.
    #[serde(default = "default_link_types")]
    pub link: Vec<String>,
    /// Values that never identify anyone (compared case-insensitively, trimmed).
    #[serde(default = "default_blocklist")]
    pub blocklist: Vec<String>,
    /// Most identifiers one profile keeps; more are not linked (a runaway device).
    #[serde(default = "default_max_identities")]
    pub max_identities: usize,
}

fn default_unique() -> Vec<String> {
    vec!["customer_id".into(), "email".into()]
}
fn default_link_types() -> Vec<String> {
    [
        "customer_id",
        "anonymous_id",
        "email",
        "other",
        "mobile_number",
    ]
    .map(String::from)
    .to_vec()
}
fn default_blocklist() -> Vec<String> {
    [
        "",
        "0",
        "-1",
        "null",
        "nil",
        "none",
        "undefined",
        "unknown",
        "n/a",
        "anonymous",
        "test@example.com",
        "00000000-0000-0000-0000-000000000000",
    ]
    .map(String::from)
    .to_vec()
}
fn default_max_identities() -> usize {
    100
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            unique: default_unique(),
            link: default_link_types(),
            blocklist: default_blocklist(),
            max_identities: default_max_identities(),
        }
    }
}

/// One `[[computed]]` attribute: an aggregate over a profile's events.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputedConfig {
    /// Attribute name (as seen in lookups, audiences and destination allowlists).
    pub name: String,
    /// `count`, `sum`, `first`, `last` or `unique` (distinct values, at most `max_values`).
    pub kind: ComputedKind,
    /// Only events with this name (track/screen/page name).
    #[serde(default)]
    pub event: Option<String>,
    /// Only events of this type.
    #[serde(default)]
    pub event_type: Option<String>,
    /// The property aggregated (`sum`, `first`, `last`, `unique`), e.g. `revenue`;
    /// looked up in the event's properties, then its traits (identify calls).
    #[serde(default)]
    pub property: Option<String>,
    /// Only events within this window before now count (e.g. `7d`); absent = all time.
    #[serde(default, deserialize_with = "opt_duration")]
    pub window: Option<Duration>,
    /// `unique`: most distinct values kept.
    #[serde(default = "default_max_values")]
    pub max_values: usize,
}

fn default_max_values() -> usize {
    50
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// Aggregates a computed attribute can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComputedKind {
    Count,
    Sum,
    First,
    Last,
    Unique,
}

/// One `[[sources]]` entry: a server-side sender posting to the gateway's HTTP
/// `/v1/*` (Segment) or `/v2/*` (mParticle) endpoints.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Name; events carry it as their sender (`source:<name>`).
    pub name: String,
    /// Segment write key (Basic auth user or `writeKey` in the body); for mParticle,
    /// the API key of the `key:secret` pair.
    pub write_key: String,
    /// mParticle: the API secret. Absent: mParticle requests are refused.
    #[serde(default)]
    pub secret: Option<String>,
}

impl GatewayConfig {
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
        let config: GatewayConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let mut config = config;
        config.validate(path)?;
        // A feed's events never go back to the tool they came from.
        for feed in &config.feeds {
            for d in config
                .destinations
                .iter_mut()
                .filter(|d| feed.destinations.contains(&d.name))
            {
                d.exclude_senders.push(format!("feed:{}", feed.name));
            }
        }
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        edge_agent::wire::Topics::new(&self.mqtt.topic_prefix)
            .map_err(|e| bad("mqtt.topic_prefix", e.to_string()))?;
        if self.mqtt.max_connections == 0 {
            return Err(bad("mqtt.max_connections", "must be at least 1".into()));
        }
        if self.mqtt.max_packet_size.0 < 1024 || self.mqtt.max_packet_size.0 > 256 << 20 {
            return Err(bad(
                "mqtt.max_packet_size",
                "must be between 1KiB and 256MiB".into(),
            ));
        }
        if self.mqtt.device_events_per_second == 0 {
            return Err(bad(
                "mqtt.device_events_per_second",
                "must be at least 1".into(),
            ));
        }
        if self.mqtt.mode == MqttMode::Broker {
            self.validate_broker(path)?;
        }
        for id in &self.tls.dev_devices {
            if !edge_agent::config::valid_device_id(id) {
                return Err(bad(
                    "tls.dev_devices",
                    format!("`{id}` is not a valid device id"),
                ));
            }
        }
        let mut names = std::collections::HashSet::new();
        for d in &self.destinations {
            let ok = !d.name.is_empty()
                && d.name.len() <= 64
                && d.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !ok {
                return Err(bad(
                    "destinations.name",
                    format!("`{}`: use letters, digits, `-`, `_`", d.name),
                ));
            }
            if !names.insert(d.name.as_str()) {
                return Err(bad(
                    "destinations.name",
                    format!("`{}` is repeated", d.name),
                ));
            }
            let need = |key: &str, present: bool| {
                if present {
                    Ok(())
                } else {
                    Err(bad(
                        &format!("destinations.{key}"),
                        format!("destination `{}` ({:?}) needs `{key}`", d.name, d.kind),
                    ))
                }
            };
            match d.kind {
                DestinationKind::File => need("dir", d.dir.is_some())?,
                DestinationKind::Webhook => need("url", d.url.is_some())?,
                DestinationKind::Postgres | DestinationKind::AudiencePostgres => {
                    need("connection", d.connection.is_some())?
                }
                DestinationKind::AudienceWebhook => need("url", d.url.is_some())?,
                DestinationKind::AudienceFile => need("dir", d.dir.is_some())?,
            }
            if let Some(url) = &d.url {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(bad(
                        "destinations.url",
                        format!("destination `{}`: `{url}` is not an http(s) URL", d.name),
                    ));
                }
            }
            for (key, zero) in [
                ("batch_size", d.batch_size == 0),
                ("concurrency", d.concurrency == 0),
                ("timeout", d.timeout.is_zero()),
                ("schedule", d.schedule.is_zero()),
                ("retry_initial", d.retry_initial.is_zero()),
            ] {
                if zero {
                    return Err(bad(
                        &format!("destinations.{key}"),
                        format!("destination `{}`: must be above zero", d.name),
                    ));
                }
            }
            if d.retry_max < d.retry_initial {
                return Err(bad(
                    "destinations.retry_max",
                    format!("destination `{}`: below retry_initial", d.name),
                ));
            }
            if !d
                .table_prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                return Err(bad(
                    "destinations.table_prefix",
                    format!("destination `{}`: use a-z, 0-9, `_`", d.name),
                ));
            }
        }
        let mut computed = std::collections::HashSet::new();
        for c in &self.computed {
            if c.name.is_empty() || !computed.insert(c.name.as_str()) {
                return Err(bad(
                    "computed.name",
                    format!("`{}` is empty or repeated", c.name),
                ));
            }
            let needs_property = !matches!(c.kind, ComputedKind::Count);
            if needs_property && c.property.is_none() {
                return Err(bad(
                    "computed.property",
                    format!("computed `{}` ({:?}) needs a property", c.name, c.kind),
                ));
            }
            if c.window.is_some_and(|w| w.is_zero()) {
                return Err(bad(
                    "computed.window",
                    format!("computed `{}`: must be above zero", c.name),
                ));
            }
        }
        let mut feeds = std::collections::HashSet::new();
        for f in &self.feeds {
            let ok = !f.name.is_empty()
                && f.name.len() <= 64
                && f.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !ok || !feeds.insert(f.name.as_str()) {
                return Err(bad(
                    "feeds.name",
                    format!("`{}`: use letters, digits, `-`, `_`, once", f.name),
                ));
            }
            if f.token.len() < 8 {
                return Err(bad(
                    "feeds.token",
                    format!("feed `{}`: use a token of at least 8 characters", f.name),
                ));
            }
            if let Some(missing) = f.destinations.iter().find(|d| !names.contains(d.as_str())) {
                return Err(bad(
                    "feeds.destinations",
                    format!("feed `{}`: no destination named `{missing}`", f.name),
                ));
            }
        }
        self.validate_audiences(path)?;
        for d in &self.destinations {
            if let Some(missing) = d
                .audiences
                .iter()
                .find(|a| !self.audiences.iter().any(|x| &x.name == *a))
            {
                return Err(bad(
                    "destinations.audiences",
                    format!("destination `{}`: no audience named `{missing}`", d.name),
                ));
            }
        }
        let mut keys = std::collections::HashSet::new();
        for s in &self.sources {
            if s.write_key.is_empty() || !keys.insert(s.write_key.as_str()) {
                return Err(bad(
                    "sources.write_key",
                    format!("source `{}`: empty or shared with another source", s.name),
                ));
            }
        }
        Ok(())
    }

    /// `[[audiences]]`: names unique and safe in file names, URLs and topics; every
    /// `when` tree compiles (the error names the audience and the clause).
    fn validate_audiences(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        let mut names = std::collections::HashSet::new();
        for a in &self.audiences {
            let ok = !a.name.is_empty()
                && a.name.len() <= 64
                && a.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !ok {
                return Err(bad(
                    "audiences.name",
                    format!("`{}`: use 1-64 letters, digits, `-`, `_`", a.name),
                ));
            }
            if !names.insert(a.name.as_str()) {
                return Err(bad("audiences.name", format!("`{}` is repeated", a.name)));
            }
            crate::audience::condition::compile(a)
                .map_err(|e| bad("audiences.when", e.to_string()))?;
        }
        Ok(())
    }

    /// The `[mqtt]` keys of broker mode; checked only in that mode.
    fn validate_broker(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        let m = &self.mqtt;
        m.broker_address().map_err(|e| bad("mqtt.broker_url", e))?;
        // MQTT 5 §4.8.2: a ShareName is at least one character and holds no `/`, `+`, `#`.
        let group_ok = !m.shared_group.is_empty()
            && m.shared_group.len() <= 128
            && !m.shared_group.contains(['/', '+', '#', '\0']);
        if !group_ok {
            return Err(bad(
                "mqtt.shared_group",
                "use 1-128 characters other than `/`, `+`, `#`".into(),
            ));
        }
        // The device id rule: it may be a certificate CN, a file name and a topic level.
        if !edge_agent::config::valid_device_id(&m.client_id) {
            return Err(bad(
                "mqtt.client_id",
                "use 1-128 characters of A-Z a-z 0-9 . _ : -".into(),
            ));
        }
        let expiry = m.broker_session_expiry;
        if expiry < Duration::from_secs(1) || expiry.as_secs() > u64::from(u32::MAX) {
            return Err(bad(
                "mqtt.broker_session_expiry",
                "must be between 1s and 136 years".into(),
            ));
        }
        // rumqttc panics on a keep-alive under 5 s; MQTT carries it as u16 seconds.
        let keep_alive = m.broker_keep_alive;
        if keep_alive < Duration::from_secs(5) || keep_alive.as_secs() > u64::from(u16::MAX) {
            return Err(bad(
                "mqtt.broker_keep_alive",
                "must be between 5s and 18h".into(),
            ));
        }
        if m.broker_max_in_flight == 0 {
            return Err(bad(
                "mqtt.broker_max_in_flight",
                "must be at least 1".into(),
            ));
        }
        if m.broker_backoff_min.is_zero() || m.broker_backoff_min > m.broker_backoff_max {
            return Err(bad(
                "mqtt.broker_backoff_min",
                "must be above zero and at most mqtt.broker_backoff_max".into(),
            ));
        }
        Ok(())
    }
}

/// `path` if absolute, else `data_dir/path`.
pub fn resolve(data_dir: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_owned()
    } else {
        data_dir.join(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<GatewayConfig, ConfigError> {
        GatewayConfig::parse(text, Path::new("gateway.toml"))
    }

    fn invalid_key(text: &str) -> String {
        match parse(text) {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid value, got {other:?}"),
        }
    }

    #[test]
    fn an_empty_file_is_embedded_mode() {
        let config = parse("").unwrap();
        assert_eq!(config.mqtt.mode, MqttMode::Embedded);
        assert_eq!(config.mqtt.client_id, "edge-gateway");
        assert_eq!(config.mqtt.shared_group, "edge-gateways");
    }

    #[test]
    fn broker_mode_needs_an_mqtts_url_with_a_port() {
        assert_eq!(
            invalid_key("[mqtt]\nmode = \"broker\"\n"),
            "mqtt.broker_url"
        );
        for url in [
            "mqtt://h:1883",
            "mqtts://h",
            "mqtts://:8883",
            "mqtts://h:0",
            "mqtts://h:x",
            "h:8883",
        ] {
            assert_eq!(
                invalid_key(&format!(
                    "[mqtt]\nmode = \"broker\"\nbroker_url = \"{url}\"\n"
                )),
                "mqtt.broker_url",
                "{url}"
            );
        }
        let config =
            parse("[mqtt]\nmode = \"broker\"\nbroker_url = \"mqtts://[::1]:8883/\"\n").unwrap();
        assert_eq!(
            config.mqtt.broker_address().unwrap(),
            ("::1".to_owned(), 8883)
        );
    }

    #[test]
    fn broker_keys_are_checked_only_in_broker_mode() {
        assert!(parse("[mqtt]\nshared_group = \"a/b\"\n").is_ok());
        let broker = "[mqtt]\nmode = \"broker\"\nbroker_url = \"mqtts://127.0.0.1:8883\"\n";
        for (line, key) in [
            ("shared_group = \"a/b\"", "mqtt.shared_group"),
            ("shared_group = \"\"", "mqtt.shared_group"),
            ("shared_group = \"g+\"", "mqtt.shared_group"),
            ("client_id = \"gw/1\"", "mqtt.client_id"),
            (
                "broker_session_expiry = \"0s\"",
                "mqtt.broker_session_expiry",
            ),
            ("broker_keep_alive = \"1s\"", "mqtt.broker_keep_alive"),
            ("broker_keep_alive = \"19h\"", "mqtt.broker_keep_alive"),
            ("broker_max_in_flight = 0", "mqtt.broker_max_in_flight"),
            (
                "broker_backoff_min = \"1m\"\nbroker_backoff_max = \"1s\"",
                "mqtt.broker_backoff_min",
            ),
        ] {
            assert_eq!(invalid_key(&format!("{broker}{line}\n")), key, "{line}");
        }
        assert!(parse(&format!("{broker}broker_max_in_flight = 70000\n")).is_err());
    }

    #[test]
    fn an_unknown_mode_is_a_parse_error() {
        assert!(matches!(
            parse("[mqtt]\nmode = \"cluster\"\n"),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn each_destination_kind_needs_its_own_keys() {
        for (text, key) in [
            ("[[destinations]]\nname = \"w\"\nkind = \"webhook\"\n", "destinations.url"),
            ("[[destinations]]\nname = \"p\"\nkind = \"postgres\"\n", "destinations.connection"),
            ("[[destinations]]\nname = \"f\"\nkind = \"file\"\n", "destinations.dir"),
            (
                "[[destinations]]\nname = \"w\"\nkind = \"webhook\"\nurl = \"ftp://x\"\n",
                "destinations.url",
            ),
            (
                "[[destinations]]\nname = \"w\"\nkind = \"webhook\"\nurl = \"http://x\"\nbatch_size = 0\n",
                "destinations.batch_size",
            ),
            (
                "[[destinations]]\nname = \"w\"\nkind = \"webhook\"\nurl = \"http://x\"\nretry_initial = \"10s\"\nretry_max = \"1s\"\n",
                "destinations.retry_max",
            ),
        ] {
            assert_eq!(invalid_key(text), key, "{text}");
        }
    }

    #[test]
    fn computed_attributes_and_sources_are_checked() {
        assert_eq!(
            invalid_key("[[computed]]\nname = \"ltv\"\nkind = \"sum\"\n"),
            "computed.property"
        );
        assert_eq!(
            invalid_key("[[computed]]\nname = \"n\"\nkind = \"count\"\nwindow = \"0s\"\n"),
            "computed.window"
        );
        assert_eq!(
            invalid_key(
                "[[sources]]\nname = \"a\"\nwrite_key = \"k\"\n[[sources]]\nname = \"b\"\nwrite_key = \"k\"\n"
            ),
            "sources.write_key"
        );
        let ok = parse("[[computed]]\nname = \"n\"\nkind = \"count\"\nwindow = \"7d\"\n").unwrap();
        assert_eq!(ok.computed[0].window, Some(Duration::from_secs(7 * 86400)));
        assert_eq!(ok.identity.unique, ["customer_id", "email"]);
    }

    #[test]
    fn audience_names_must_be_unique_and_plain() {
        let one = |name: &str| {
            format!("[[audiences]]\nname = \"{name}\"\nwhen = {{ consent = \"ads\" }}\n")
        };
        assert!(parse(&one("lapsed_users-2")).is_ok());
        let long = "x".repeat(65);
        for name in ["", "with space", "a/b", "caf\u{e9}", long.as_str()] {
            assert_eq!(invalid_key(&one(name)), "audiences.name", "{name:?}");
        }
        assert_eq!(
            invalid_key(&format!("{}{}", one("a"), one("a"))),
            "audiences.name"
        );
    }

    #[test]
    fn a_bad_audience_condition_fails_the_start_naming_audience_and_clause() {
        let text = "[[audiences]]\nname = \"ok\"\nwhen = { consent = \"ads\" }\n\
                    [[audiences]]\nname = \"lapsed\"\n\
                    when = { all = [ { consent = \"ads\" }, { did = \"Push Sent\", within = \"7x\" } ] }\n";
        match parse(text) {
            Err(ConfigError::Invalid { key, message, .. }) => {
                assert_eq!(key, "audiences.when");
                assert!(
                    message.starts_with(
                        "audience `lapsed`: when.all[1].did.within: `7x` is not a duration"
                    ),
                    "{message}"
                );
            }
            other => panic!("expected an invalid value, got {other:?}"),
        }
        assert!(matches!(
            parse("[[audiences]]\nname = \"a\"\nwhen = { did = \"X\", typo = 1 }\n"),
            Err(ConfigError::Invalid { key, .. }) if key == "audiences.when"
        ));
    }

    #[test]
    fn feeds_and_audience_outputs_name_what_exists() {
        let hook = "[[destinations]]\nname = \"push\"\nkind = \"webhook\"\nurl = \"http://x\"\n";
        assert_eq!(
            invalid_key("[[feeds]]\nname = \"push\"\ntoken = \"t\"\n"),
            "feeds.token"
        );
        assert_eq!(
            invalid_key(&format!(
                "{hook}[[feeds]]\nname = \"push\"\ntoken = \"long-token\"\ndestinations = [\"nope\"]\n"
            )),
            "feeds.destinations"
        );
        let ok = parse(&format!(
            "{hook}[[feeds]]\nname = \"push\"\ntoken = \"long-token\"\ndestinations = [\"push\"]\n"
        ))
        .unwrap();
        assert_eq!(ok.destinations[0].exclude_senders, ["feed:push"]);
        assert_eq!(
            invalid_key(
                "[[destinations]]\nname = \"a\"\nkind = \"audience_file\"\ndir = \"a\"\naudiences = [\"ghost\"]\n"
            ),
            "destinations.audiences"
        );
    }
}
