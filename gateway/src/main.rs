//! `edge-gateway`: parse arguments, load config, set up logging and signals, call the
//! library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use edge_gateway::config::{resolve, GatewayConfig};
use edge_gateway::http::client::{encode_segment, AdminClient, ClientError};
use tokio_util::sync::CancellationToken;

/// Fast allocator for the binary (see `Cargo.toml`): events are decoded, routed and
/// rendered as many small allocations freed on other threads.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Look up or erase a profile on a running gateway.
    Profile {
        #[command(subcommand)]
        command: ProfileCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Status of every destination on a running gateway (backlog, retries, dead letters).
    Destinations {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List a destination's dead letters.
    DeadLetters {
        /// Destination name.
        name: String,
        /// Most dead letters listed.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Only dead letters with a larger id (paging).
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Send a destination's dead letters again (after fixing its config).
    Replay {
        /// Destination name.
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Every audience with its size on a running gateway.
    Audiences {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Members of an audience.
    Members {
        /// Audience name.
        name: String,
        /// Most members listed.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// Only members with a larger profile id (paging).
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Why a profile is or is not in an audience: each clause with its outcome.
    Why {
        /// Audience name.
        name: String,
        /// Identifier type of the profile: customer_id, email, anonymous_id, ...
        id_type: String,
        value: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// How the admin subcommands reach the gateway.
#[derive(clap::Args)]
struct ApiArgs {
    /// The gateway's HTTP API; default `http://<http.listen>` from the config.
    #[arg(long)]
    url: Option<String>,
    /// Admin token; default `EDGE_ADMIN_TOKEN`, else `http.admin_token` from the config.
    #[arg(long)]
    token: Option<String>,
}

#[derive(Subcommand)]
enum ProfileCommand {
    /// Show the profile holding an identifier, e.g. `profile show email ada@example.com`.
    Show {
        /// Identifier type: customer_id, email, anonymous_id, ...
        id_type: String,
        value: String,
    },
    /// Erase (GDPR) the profile holding an identifier; its devices are told to purge.
    Erase { id_type: String, value: String },
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
        Command::Profile { command, api } => {
            let (id_type, value, method) = match &command {
                ProfileCommand::Show { id_type, value } => (id_type, value, "GET"),
                ProfileCommand::Erase { id_type, value } => (id_type, value, "DELETE"),
            };
            let path = format!(
                "/v1/profiles/{}/{}",
                encode_segment(id_type),
                encode_segment(value)
            );
            admin_call(&config, &api, |c| c.call(method, &path).map(pretty))
        }
        Command::Destinations { api } => admin_call(&config, &api, |c| {
            c.get("/v1/destinations").map(|v| destinations_table(&v))
        }),
        Command::DeadLetters {
            name,
            limit,
            after,
            api,
        } => admin_call(&config, &api, |c| {
            let path = format!(
                "/v1/destinations/{}/dead-letters?after={after}&limit={limit}",
                encode_segment(&name)
            );
            c.get(&path).map(pretty)
        }),
        Command::Replay { name, api } => admin_call(&config, &api, |c| {
            let path = format!("/v1/destinations/{}/replay", encode_segment(&name));
            c.call("POST", &path).map(|v| {
                format!(
                    "replayed {} dead letters of `{name}`",
                    v.get("replayed").and_then(|n| n.as_u64()).unwrap_or(0)
                )
            })
        }),
        Command::Audiences { api } => admin_call(&config, &api, |c| {
            c.get("/v1/audiences").map(|v| audiences_table(&v))
        }),
        Command::Members {
            name,
            limit,
            after,
            api,
        } => admin_call(&config, &api, |c| {
            let path = format!(
                "/v1/audiences/{}/members?after={after}&limit={limit}",
                encode_segment(&name)
            );
            c.get(&path).map(pretty)
        }),
        Command::Why {
            name,
            id_type,
            value,
            api,
        } => admin_call(&config, &api, |c| {
            let path = format!(
                "/v1/audiences/{}/why/{}/{}",
                encode_segment(&name),
                encode_segment(&id_type),
                encode_segment(&value)
            );
            c.get(&path).map(pretty)
        }),
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

/// Runs one admin call against the running gateway and prints its answer.
fn admin_call(
    config: &GatewayConfig,
    api: &ApiArgs,
    call: impl FnOnce(&AdminClient) -> Result<String, ClientError>,
) -> ExitCode {
    let url = api.url.clone().unwrap_or_else(|| {
        // A wildcard listen address is reached on loopback.
        let mut addr = config.http.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(if addr.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        format!("http://{addr}")
    });
    let token = api
        .token
        .clone()
        .or_else(|| std::env::var("EDGE_ADMIN_TOKEN").ok())
        .or_else(|| config.http.admin_token.clone());
    let result = AdminClient::new(&url, token).and_then(|c| call(&c));
    match result {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e @ ClientError::Unreachable { .. }) => {
            eprintln!("edge-gateway: {e} (is it running? set --url)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("edge-gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

fn pretty(v: serde_json::Value) -> String {
    serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
}

/// `GET /v1/destinations` as a table.
fn destinations_table(v: &serde_json::Value) -> String {
    let rows = v.as_array().cloned().unwrap_or_default();
    let mut out = format!(
        "{:<20} {:<8} {:>9} {:>10} {:>10} {:>8} {:>6}  LAST ERROR\n",
        "NAME", "KIND", "BACKLOG", "OLDEST", "DELIVERED", "RETRIES", "DEAD"
    );
    for d in rows {
        let s = |k: &str| d.get(k).and_then(|x| x.as_str()).unwrap_or("").to_owned();
        let n = |k: &str| d.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
        let oldest = humantime::format_duration(Duration::from_secs(n("oldest_age_ms") / 1000));
        out.push_str(&format!(
            "{:<20} {:<8} {:>9} {:>10} {:>10} {:>8} {:>6}  {}\n",
            s("name"),
            s("kind"),
            n("backlog"),
            oldest.to_string(),
            n("delivered"),
            n("retries"),
            n("dead_letters"),
            s("last_error"),
        ));
    }
    out.trim_end().to_owned()
}

/// `GET /v1/audiences` as a table.
fn audiences_table(v: &serde_json::Value) -> String {
    let rows = v.as_array().cloned().unwrap_or_default();
    let mut out = format!("{:<32} {:>10}  DESCRIPTION\n", "AUDIENCE", "MEMBERS");
    for a in rows {
        out.push_str(&format!(
            "{:<32} {:>10}  {}\n",
            a.get("name").and_then(|x| x.as_str()).unwrap_or(""),
            a.get("members")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0),
            a.get("description").and_then(|x| x.as_str()).unwrap_or(""),
        ));
    }
    out.trim_end().to_owned()
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
