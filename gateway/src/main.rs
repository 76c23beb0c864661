//! `edge-gateway`: parse arguments, load config, set up logging and signals, call the
//! library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use edge_gateway::config::{resolve, GatewayConfig};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "edge-gateway", version, about = "Edge collector gateway")]
struct Cli {
    /// Config file (TOML). Absent: built-in defaults.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// State directory; overrides `gateway.data_dir`.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Log format: `text` or `json`. Level via `RUST_LOG` (default `info`).
    #[arg(long, global = true, default_value = "text")]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run,
    /// Run a whole local site in one process: this gateway plus an edge-agent
    /// connected to it over mTLS (dev certificates made on the first run).
    Quickstart {
        /// Agent config; default `conf/agent.toml`.
        #[arg(long, default_value = "conf/agent.toml")]
        agent_config: PathBuf,
    },
    /// Dev PKI: a CA, the server certificate, device certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create the CA and the server certificate (kept if they exist).
    Init {
        /// Extra DNS names / IPs for the server certificate.
        #[arg(long = "name")]
        names: Vec<String>,
    },
    /// Issue a device certificate (CN = device id).
    Device {
        id: String,
        /// Validity, e.g. "365d".
        #[arg(long, default_value = "365d")]
        valid: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    let config = match (&cli.config, &cli.command) {
        (Some(path), _) => GatewayConfig::load(path),
        // The quickstart runs the shipped site config by default.
        (None, Command::Quickstart { .. }) => {
            GatewayConfig::load(std::path::Path::new("conf/gateway.toml"))
        }
        (None, _) => Ok(GatewayConfig::default()),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edge-gateway: {e}");
            return ExitCode::from(2);
        }
    };
    let data_dir = cli
        .data_dir
        .clone()
        .unwrap_or_else(|| config.gateway.data_dir.clone());
    let pki_dir = resolve(&data_dir, &config.tls.pki_dir);
    match cli.command {
        Command::Certs {
            command: CertsCommand::Init { names },
        } => match edge_gateway::pki::init(&pki_dir, &names) {
            Ok(outcome) => {
                println!(
                    "CA {:?}, server certificate {:?} in {}",
                    outcome.ca,
                    outcome.server,
                    pki_dir.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("edge-gateway: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Certs {
            command: CertsCommand::Device { id, valid },
        } => {
            let validity = match humantime::parse_duration(&valid) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("edge-gateway: --valid `{valid}`: {e}");
                    return ExitCode::from(2);
                }
            };
            match edge_gateway::pki::issue_device(&pki_dir, &id, validity) {
                Ok(files) => {
                    println!("{}\n{}", files.cert.display(), files.key.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("edge-gateway: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Quickstart { agent_config } => {
            let agent = match edge_agent::config::AgentConfig::load(&agent_config) {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("edge-gateway: {e}");
                    return ExitCode::from(2);
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("edge-gateway: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = runtime.block_on(quickstart(config, data_dir, agent));
            runtime.shutdown_timeout(Duration::from_secs(5));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("edge-gateway: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run => {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("edge-gateway: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = runtime.block_on(async move {
                let shutdown = CancellationToken::new();
                tokio::spawn(wait_for_signal(shutdown.clone()));
                edge_gateway::run(config, &data_dir, shutdown).await
            });
            runtime.shutdown_timeout(Duration::from_secs(5));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("edge-gateway: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Gateway and agent side by side until Ctrl-C/SIGTERM.
async fn quickstart(
    config: GatewayConfig,
    data_dir: PathBuf,
    agent: edge_agent::config::AgentConfig,
) -> Result<(), String> {
    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_signal(shutdown.clone()));
    let http = config.http.listen;
    let (gw_dir, token) = (data_dir.clone(), shutdown.clone());
    let gateway = tokio::spawn(async move { edge_gateway::run(config, &gw_dir, token).await });
    // The agent needs the gateway's dev certificates: wait until the gateway is up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(http).await.is_err() {
        if gateway.is_finished() || tokio::time::Instant::now() > deadline {
            shutdown.cancel();
            return match gateway.await {
                Ok(Err(e)) => Err(e.to_string()),
                _ => Err("the gateway did not start".into()),
            };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let agent_dir = agent.agent.data_dir.clone();
    let listen = agent.http.listen;
    println!(
        "Local site up: agent API http://{listen} (try `curl -u dev-write-key: -X POST {listen}/v1/track -d '{{\"userId\":\"u1\",\"event\":\"Play\"}}'`), gateway admin http://{http}, file destination under {}.",
        data_dir.display()
    );
    let agent_result = edge_agent::run(agent, &agent_dir, shutdown.clone()).await;
    shutdown.cancel();
    let gateway_result = gateway.await;
    agent_result.map_err(|e| e.to_string())?;
    match gateway_result {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    shutdown.cancel();
}
