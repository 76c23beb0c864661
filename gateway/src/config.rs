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
        Self {
            data_dir: default_data_dir(),
            cache_size: default_cache(),
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
    /// Address of the admin/metrics API.
    #[serde(default = "default_http_listen")]
    pub listen: SocketAddr,
}

fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: default_http_listen(),
        }
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
            if d.kind == DestinationKind::File && d.dir.is_none() {
                return Err(bad(
                    "destinations.dir",
                    format!("destination `{}` needs a dir", d.name),
                ));
            }
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
}
