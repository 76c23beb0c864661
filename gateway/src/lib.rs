//! `edge-gateway` library: everything the binary does, callable from tests.
//!
//! - [`endpoint`]: the embedded MQTT/TLS device endpoint (`mqtt.mode = "embedded"`).
//! - [`broker`]: the consumer of an external broker (`mqtt.mode = "broker"`).
//! - [`ingress`]: what both do with a device's frame: verify, commit, answer.
//! - [`store`]: durable inbox, exactly-once admission, device records (redb).
//! - [`dest`]: destinations reading the inbox (NDJSON files so far).
//! - [`http`]: admin API and metrics.
//! - [`pki`]: the dev PKI behind `edge-gateway certs` (CA, server and device certificates).
//! - [`tls`]: TLS of the device endpoint: mutual-TLS configuration, device identity from
//!   the client certificate, revoked device ids.

pub mod audience;
pub mod broker;
pub mod clock;
pub mod config;
pub mod dest;
pub mod downlink;
pub mod endpoint;
pub mod http;
pub mod ingress;
pub mod pacing;
pub mod pki;
pub mod profiles;
pub mod store;
pub mod tls;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use config::{resolve, GatewayConfig, MqttMode};
use endpoint::{Endpoint, EndpointMetrics, Sessions};
use profiles::Profiles;
use store::Store;

/// File name of the gateway's redb store inside the data dir.
pub const STORE_FILE: &str = "gateway.redb";

/// Validity of dev device certificates made on first run.
const DEV_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot create data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("dev certificates: {0}")]
    Pki(#[from] pki::PkiError),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("revocation list: {0}")]
    Revocation(#[from] tls::RevocationError),
    #[error("store {path}: {source}")]
    Store {
        path: PathBuf,
        source: store::StoreError,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("topic prefix: {0}")]
    Topics(String),
    #[error("broker: {0}")]
    Broker(#[from] broker::BrokerError),
}

/// How devices reach this gateway (`mqtt.mode`), with its TLS loaded.
enum DeviceSide {
    /// The embedded endpoint's server TLS configuration.
    Embedded(Arc<rustls::ServerConfig>),
    /// The broker consumer's settings (client TLS included).
    Broker(broker::BrokerSettings),
}

/// Creates the dev PKI and the configured dev device certificates if missing.
pub fn ensure_dev_certs(pki_dir: &Path, devices: &[String]) -> Result<(), pki::PkiError> {
    pki::init(pki_dir, &[])?;
    let layout = pki::PkiDir::new(pki_dir);
    for id in devices {
        let device = edge_agent::model::DeviceId(id.clone());
        if !layout.device_cert(&device).exists() {
            pki::issue_device(pki_dir, id, DEV_CERT_VALIDITY)?;
            info!(device = %id, dir = %pki_dir.display(), "Issued a dev device certificate.");
        }
    }
    Ok(())
}

/// Runs the gateway until `shutdown`.
pub async fn run(
    config: GatewayConfig,
    data_dir: &Path,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    std::fs::create_dir_all(data_dir).map_err(|source| GatewayError::DataDir {
        path: data_dir.to_owned(),
        source,
    })?;
    let pki_dir = resolve(data_dir, &config.tls.pki_dir);
    let broker_mode = config.mqtt.mode == MqttMode::Broker;
    if config.tls.create_dev_certs {
        let mut devices = config.tls.dev_devices.clone();
        // The gateway's own broker client certificate, where the default path expects it.
        if broker_mode
            && config.mqtt.broker_cert.is_none()
            && !devices.contains(&config.mqtt.client_id)
        {
            devices.push(config.mqtt.client_id.clone());
        }
        ensure_dev_certs(&pki_dir, &devices)?;
    }
    // TLS files are loaded before anything starts, so a bad path fails the start cleanly.
    let device_side = if broker_mode {
        DeviceSide::Broker(broker::BrokerSettings::from_config(
            &config.mqtt,
            data_dir,
            &pki_dir,
        )?)
    } else {
        let layout = pki::PkiDir::new(&pki_dir);
        DeviceSide::Embedded(tls::server_config(
            &layout.ca_cert(),
            &layout.server_cert(),
            &layout.server_key(),
        )?)
    };
    let revoked = Arc::new(match &config.tls.revoked {
        Some(p) => tls::RevocationList::load(resolve(data_dir, p))?,
        None => tls::RevocationList::empty(),
    });

    let store_path = data_dir.join(STORE_FILE);
    // Every consumer of the inbox: the profile stage, the audience engine and each
    // destination.
    let names: Vec<String> = [profiles::STAGE_NAME, audience::engine::STAGE_NAME]
        .into_iter()
        .map(str::to_owned)
        .chain(config.destinations.iter().map(|d| d.name.clone()))
        .collect();
    // A quarter of the page cache budget: the inbox is mostly appended to, and its
    // newest records are read from memory (`store::tail`); profile writes need it more.
    let cache = usize::try_from(config.gateway.cache_size.0 / 4).unwrap_or(usize::MAX);
    let store = Arc::new(Store::open(&store_path, cache, &names).map_err(|source| {
        GatewayError::Store {
            path: store_path,
            source,
        }
    })?);
    let topics = edge_agent::wire::Topics::new(&config.mqtt.topic_prefix)
        .map_err(|e| GatewayError::Topics(e.to_string()))?;
    let metrics = Arc::new(EndpointMetrics::default());
    let sessions = Arc::new(Sessions::default());
    let tasks = TaskTracker::new();

    let profiles_path = data_dir.join(profiles::PROFILES_FILE);
    let profiles = Arc::new(Profiles::open(&profiles_path, &config).map_err(|source| {
        GatewayError::Store {
            path: profiles_path,
            source,
        }
    })?);
    tasks.spawn(Arc::clone(&profiles).run(Arc::clone(&store), shutdown.clone()));
    let audiences_path = data_dir.join(audience::engine::AUDIENCES_FILE);
    let audiences = Arc::new(
        audience::engine::Audiences::open(&audiences_path, &config).map_err(|source| {
            GatewayError::Store {
                path: audiences_path,
                source,
            }
        })?,
    );
    tasks.spawn(Arc::clone(&audiences).run(
        Arc::clone(&store),
        Arc::clone(&profiles),
        shutdown.clone(),
    ));
    let destinations = dest::spawn_all(
        &config.destinations,
        &dest::DestContext {
            store: Arc::clone(&store),
            profiles: Arc::clone(&profiles),
            data_dir: data_dir.to_owned(),
            audiences: Arc::clone(&audiences),
        },
        &tasks,
        &shutdown,
    );
    let downlinks = Arc::new(downlink::Downlinks {
        store: Arc::clone(&store),
        audiences: std::sync::OnceLock::new(),
        sessions: Arc::clone(&sessions),
    });
    // Membership changes down to the members' devices; hellos re-sync devices behind.
    let device_audiences = Arc::new(audience::devices::DeviceAudiences {
        store: Arc::clone(&store),
        audiences: Arc::clone(&audiences),
        downlinks: Arc::clone(&downlinks),
    });
    let _ = downlinks.audiences.set(Arc::clone(&device_audiences));
    tasks.spawn(device_audiences.run(shutdown.clone()));

    if config.tls.revoked.is_some() {
        let (list, every, token) = (
            Arc::clone(&revoked),
            config.tls.revocation_reload,
            shutdown.clone(),
        );
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    () = token.cancelled() => return,
                    () = tokio::time::sleep(every) => {
                        if let Err(e) = list.reload() {
                            warn!(error = %e, "Revocation list reload failed; keeping the previous one.");
                        }
                    }
                }
            }
        });
    }

    let http = TcpListener::bind(config.http.listen)
        .await
        .map_err(|source| GatewayError::Listen {
            addr: config.http.listen,
            source,
        })?;
    match device_side {
        DeviceSide::Broker(settings) => {
            info!(broker = ?config.mqtt.broker_url, http = %config.http.listen, "Gateway listening (broker mode).");
            let consumer = broker::BrokerConsumer {
                settings,
                topics,
                store: Arc::clone(&store),
                revoked,
                metrics: Arc::clone(&metrics),
                downlinks: Arc::clone(&downlinks),
            };
            tasks.spawn(consumer.run(shutdown.clone()));
        }
        DeviceSide::Embedded(server_tls) => {
            let mqtt = bind_with_backlog(config.mqtt.listen, LISTEN_BACKLOG).map_err(|source| {
                GatewayError::Listen {
                    addr: config.mqtt.listen,
                    source,
                }
            })?;
            info!(mqtt = %config.mqtt.listen, http = %config.http.listen, "Gateway listening.");
            let endpoint = Arc::new(Endpoint {
                config: config.mqtt.clone(),
                topics,
                acceptor: TlsAcceptor::from(server_tls),
                store: Arc::clone(&store),
                revoked,
                sessions: Arc::clone(&sessions),
                metrics: Arc::clone(&metrics),
                downlinks: Arc::clone(&downlinks),
                pacer: Arc::new(pacer(&config.gateway, &store, &profiles, &destinations)),
            });
            tasks.spawn(endpoint.run(mqtt, shutdown.clone()));
        }
    }
    let admin = Arc::new(http::Admin {
        store: Arc::clone(&store),
        metrics,
        sessions,
        profiles,
        audiences,
        destinations,
        downlinks,
        config: config.http.clone(),
        sources: config.sources.clone(),
        counters: http::HttpCounters::default(),
        feeds: config.feeds.clone(),
        test_clock: config.gateway.test_clock,
    });
    tasks.spawn(admin.serve(http, shutdown.clone()));

    shutdown.cancelled().await;
    tasks.close();
    tasks.wait().await;
    store.close().await;
    info!("Gateway stopped.");
    Ok(())
}

/// Ingest paced on the profile stage and the streaming destinations (see [`pacing`]).
fn pacer(
    settings: &config::GatewaySection,
    store: &Store,
    profiles: &Profiles,
    destinations: &dest::Registry,
) -> pacing::Pacer {
    let resolved = profiles.resolved();
    let mut readers: Vec<pacing::Position> = vec![Box::new(move || *resolved.borrow())];
    readers.extend(destinations.pace_positions());
    pacing::Pacer::new(
        settings.pace_lag,
        settings.pace_max_wait,
        store.head(),
        readers,
    )
}

/// Pending connections the kernel may queue for the device endpoint. tokio's default
/// (128) drops SYNs during reconnect storms, when a whole fleet comes back at once.
const LISTEN_BACKLOG: u32 = 4096;

fn bind_with_backlog(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}
