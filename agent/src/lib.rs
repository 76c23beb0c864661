//! edge-agent: takes customer events from local apps (Segment `/v1/*`, mParticle
//! `/v2/*`, or this crate's API), applies consent, enriches them, and keeps them in
//! a durable redb spool until they are delivered upstream.
//!
//! Embedding: [`Agent::open`] then [`Agent::submit`] / [`Agent::track`], or
//! [`Agent::serve`] for the HTTP API; [`run`] does both for the binary.

pub mod audiences;
pub mod commands;
pub mod config;
pub mod consent;
pub mod enrich;
pub mod http;
pub mod ingest;
pub mod intake;
pub mod model;
pub mod spool;
pub mod status;
pub mod uplink;
pub mod wire;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use config::AgentConfig;
use ingest::Incoming;
use intake::{Accepted, Intake};
use model::{now_ms, Event, EventKind, Map, Source};
use spool::{Spool, SpoolError};

/// File name of the spool inside the data dir.
pub const SPOOL_FILE: &str = "spool.redb";

/// Why the agent could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The data dir could not be created.
    #[error("cannot create data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The spool file could not be opened or recovered.
    #[error("cannot open spool {path}: {source}")]
    Spool { path: PathBuf, source: SpoolError },
    /// The HTTP address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// A running agent: spool, intake, and their configuration.
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    intake: Arc<Intake>,
    spool: Arc<Spool>,
    device_id: String,
}

impl Agent {
    /// Opens the spool in `data_dir` (created if missing) and readies the intake.
    pub fn open(config: AgentConfig, data_dir: &Path) -> Result<Agent, AgentError> {
        std::fs::create_dir_all(data_dir).map_err(|source| AgentError::DataDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let path = data_dir.join(SPOOL_FILE);
        let policy = consent::ConsentPolicy::new(config.consent.clone());
        let (spool, recovered) = Spool::open(&path, &config.spool, policy, &config.agent.device_id)
            .map_err(|source| AgentError::Spool { path, source })?;
        let spool = Arc::new(spool);
        let device_id = recovered.device_id.0.clone();
        let intake = Arc::new(Intake::new(&config, Arc::clone(&spool), recovered));
        Ok(Agent {
            config,
            intake,
            spool,
            device_id,
        })
    }

    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    pub fn spool(&self) -> &Arc<Spool> {
        &self.spool
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// Submits parsed events; returns after the durable commit.
    pub async fn submit(&self, events: Vec<Incoming>) -> Result<Accepted, SpoolError> {
        self.intake.submit(events).await
    }

    /// Records a `track` event for `user_id` (or the device's anonymous id).
    pub async fn track(
        &self,
        name: &str,
        user_id: Option<&str>,
        properties: Map,
    ) -> Result<Accepted, SpoolError> {
        let mut event = Event::new(EventKind::Track, Source::Local, now_ms());
        event.name = Some(name.into());
        event.identities.user_id = user_id.map(Into::into);
        event.properties = properties;
        self.submit(vec![Incoming {
            event,
            consent: None,
            device_hint: None,
        }])
        .await
    }

    /// Binds the configured HTTP address.
    pub async fn bind(&self) -> Result<TcpListener, AgentError> {
        let addr = self.config.http.listen;
        TcpListener::bind(addr)
            .await
            .map_err(|source| AgentError::Listen { addr, source })
    }

    /// Serves the HTTP API on `listener` and sweeps expired events until `shutdown`;
    /// then drains requests and closes the spool.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), AgentError> {
        let uplink = self.config.uplink.clone().map(|cfg| {
            uplink::Uplink::new(
                cfg,
                model::DeviceId(self.device_id.clone()),
                Arc::clone(&self.spool),
            )
            .with_intake(Arc::clone(&self.intake))
        });
        let api = Arc::new(http::Api::new(
            Arc::clone(&self.intake),
            self.config.clone(),
            self.device_id.clone(),
            uplink.as_ref().map(uplink::Uplink::status),
        ));
        let sweeper = tokio::spawn(sweep_loop(
            Arc::clone(&self.spool),
            self.config.spool.sweep_interval,
            shutdown.clone(),
        ));
        // The uplink stops with the HTTP intake; its unacked events stay spooled.
        let uplink_token = CancellationToken::new();
        let uplink_task = uplink.map(|u| {
            let token = uplink_token.clone();
            tokio::spawn(async move {
                // A missing certificate may appear later (the gateway makes dev
                // certificates on its first run): keep trying, events stay spooled.
                while let Err(e) = u.run(token.clone()).await {
                    tracing::error!(error = %e, "Uplink cannot start; retrying in 5s. Events stay in the spool.");
                    tokio::select! {
                        () = token.cancelled() => break,
                        () = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                    }
                }
            })
        });
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, device_id = %self.device_id, "Local API listening.");
        }
        http::serve(listener, api, shutdown).await;
        let _ = sweeper.await;
        uplink_token.cancel();
        if let Some(t) = uplink_task {
            let _ = t.await;
        }
        self.spool.close().await;
        info!("Spool closed; agent stopped.");
        Ok(())
    }
}

async fn sweep_loop(spool: Arc<Spool>, every: std::time::Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {
                match spool.sweep(now_ms()).await {
                    Ok(0) => {}
                    Ok(n) => warn!(expired = n, "Dropped events past their lane TTL."),
                    Err(e) => warn!(error = %e, "TTL sweep failed; will retry."),
                }
            }
        }
    }
}

/// Runs the agent daemon until `shutdown`.
pub async fn run(
    config: AgentConfig,
    data_dir: &Path,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let agent = Agent::open(config, data_dir)?;
    let listener = agent.bind().await?;
    agent.serve(listener, shutdown).await
}
