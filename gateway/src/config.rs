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
    Read { path: PathBuf, source: std::io::Error },
    /// The file is not valid TOML or does not match the schema.
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value is out of range or inconsistent with another.
    #[error("invalid config value `{key}` in {path}: {message}")]
    Invalid { path: PathBuf, key: String, message: String },
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
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("data/gateway")
}
fn default_cache() -> ByteSize {
    ByteSize(64 << 20)
}

impl Default for GatewaySection {
    fn default() -> Self {
        Self { data_dir: default_data_dir(), cache_size: default_cache() }
    }
}

/// `[mqtt]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// Address of the MQTT/TLS device endpoint.
    #[serde(default = "default_mqtt_listen")]
    pub listen: SocketAddr,
    /// Topic prefix template; `{device}` is the device id from its certificate.
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    /// Most device connections at once; more are closed right after accept.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Time a client has to finish the TLS handshake.
    #[serde(default = "default_handshake_timeout", deserialize_with = "duration")]
    pub handshake_timeout: Duration,
    /// Time a client has to send CONNECT after the handshake.
    #[serde(default = "default_handshake_timeout", deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// Largest MQTT packet accepted (and so largest uplink frame).
    #[serde(default = "default_max_packet")]
    pub max_packet_size: ByteSize,
    /// Most events per second one device may send; faster senders are slowed down
    /// (their socket is read later), never dropped.
    #[serde(default = "default_rate")]
    pub device_events_per_second: u32,
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
    /// Address of the admin/metrics API.
    #[serde(default = "default_http_listen")]
    pub listen: SocketAddr,
}

fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self { listen: default_http_listen() }
    }
}

/// One `[[destinations]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    /// Unique name (letters, digits, `-`, `_`); names its cursor and files.
    pub name: String,
    /// `file`: NDJSON files for batch/ETL consumers.
    pub kind: DestinationKind,
    /// `file`: output directory, relative to the data dir.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// `file`: a file is closed and a new one started past this size...
    #[serde(default = "default_file_size")]
    pub max_file_size: ByteSize,
    /// ...or once it is this old.
    #[serde(default = "default_file_age", deserialize_with = "duration")]
    pub max_file_age: Duration,
}

fn default_file_size() -> ByteSize {
    ByteSize(64 << 20)
}
fn default_file_age() -> Duration {
    Duration::from_secs(60)
}

/// Kinds of destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DestinationKind {
    File,
}

impl GatewayConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: GatewayConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })?;
        config.validate(path)?;
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
            return Err(bad("mqtt.max_packet_size", "must be between 1KiB and 256MiB".into()));
        }
        if self.mqtt.device_events_per_second == 0 {
            return Err(bad("mqtt.device_events_per_second", "must be at least 1".into()));
        }
        for id in &self.tls.dev_devices {
            if !edge_agent::config::valid_device_id(id) {
                return Err(bad("tls.dev_devices", format!("`{id}` is not a valid device id")));
            }
        }
        let mut names = std::collections::HashSet::new();
        for d in &self.destinations {
            let ok = !d.name.is_empty()
                && d.name.len() <= 64
                && d.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !ok {
                return Err(bad("destinations.name", format!("`{}`: use letters, digits, `-`, `_`", d.name)));
            }
            if !names.insert(d.name.as_str()) {
                return Err(bad("destinations.name", format!("`{}` is repeated", d.name)));
            }
            if d.kind == DestinationKind::File && d.dir.is_none() {
                return Err(bad("destinations.dir", format!("destination `{}` needs a dir", d.name)));
            }
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
