//! `edge-agent`: parse arguments, load config, set up logging and signals, call the
//! library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edge_agent::commands::{self, SendArgs};
use edge_agent::config::AgentConfig;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "edge-agent", version, about = "Edge collector agent")]
struct Cli {
    /// Config file (TOML). Absent: built-in defaults.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Data dir holding the spool; overrides `agent.data_dir`.
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
    /// Run the agent daemon.
    Run,
    /// Send one event, e.g. `send track "Play" --user u1 --prop title=x`.
    Send {
        /// track, identify, page, screen, group or alias.
        call: String,
        /// Event name (track) or page/screen name.
        name: Option<String>,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        anonymous_id: Option<String>,
        /// Property (or trait, for identify/group) as key=value; repeatable.
        #[arg(long = "prop")]
        props: Vec<String>,
    },
    /// Print the status JSON.
    Status,
    /// Validate the config and the spool file's integrity (agent stopped).
    Check,
    /// Inspect the spool (agent stopped).
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
    },
}

#[derive(Subcommand)]
enum SpoolCommand {
    /// Print queued events as NDJSON.
    Export,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    let config = match &cli.config {
        Some(path) => AgentConfig::load(path),
        None => Ok(AgentConfig::default()),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edge-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let data_dir = cli
        .data_dir
        .clone()
        .unwrap_or_else(|| config.agent.data_dir.clone());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edge-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run => {
                let shutdown = CancellationToken::new();
                tokio::spawn(wait_for_signal(shutdown.clone()));
                edge_agent::run(config, &data_dir, shutdown)
                    .await
                    .map(|()| None)
                    .map_err(commands::CommandError::from)
            }
            Command::Send {
                call,
                name,
                user,
                anonymous_id,
                props,
            } => {
                let args = SendArgs {
                    call,
                    name,
                    user_id: user,
                    anonymous_id,
                    props,
                };
                commands::send(&config, &data_dir, args).await.map(Some)
            }
            Command::Status => commands::status(&config, &data_dir).await.map(Some),
            Command::Check => commands::check(&config, &data_dir).await.map(|problems| {
                if problems.is_empty() {
                    Some("ok: config valid, spool intact".to_owned())
                } else {
                    Some(format!("PROBLEMS:\n{}", problems.join("\n")))
                }
            }),
            Command::Spool {
                command: SpoolCommand::Export,
            } => {
                let mut out = std::io::stdout().lock();
                commands::export(&config, &data_dir, &mut out)
                    .await
                    .map(|_| None)
            }
        }
    });
    match result {
        Ok(Some(text)) if text.starts_with("PROBLEMS:") => {
            eprintln!("{text}");
            ExitCode::FAILURE
        }
        Ok(Some(text)) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn wait_for_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            shutdown.cancel();
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    shutdown.cancel();
}
