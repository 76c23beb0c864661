//! The CLI's subcommands other than `run`: `send`, `status`, `check`, `spool export`.
//!
//! `send` and `status` talk to the running agent over its local API and fall back
//! to opening the spool directly when no agent is listening (IoT devices may run the
//! agent only on demand). `check` and `spool export` need the agent stopped: redb
//! allows one process per file.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;

use crate::config::AgentConfig;
use crate::ingest::segment;
use crate::model::{now_ms, Map, Value};
use crate::{Agent, AgentError};

/// Why a subcommand failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The local API answered with an error status.
    #[error("the agent answered {status}: {body}")]
    Refused { status: u16, body: String },
    /// Arguments do not make an event.
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Spool(#[from] crate::spool::SpoolError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// One event to send from the command line.
#[derive(Debug, Clone)]
pub struct SendArgs {
    /// track, identify, page, screen, group or alias.
    pub call: String,
    /// Event name (track) or page/screen name.
    pub name: Option<String>,
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
    /// `key=value` pairs; values that parse as JSON keep their type.
    pub props: Vec<String>,
}

/// Sends one event; prints where it went.
pub async fn send(
    config: &AgentConfig,
    data_dir: &Path,
    args: SendArgs,
) -> Result<String, CommandError> {
    if !segment::CALLS.contains(&args.call.as_str()) {
        return Err(CommandError::Usage(format!(
            "unknown call `{}`: use one of {}",
            args.call,
            segment::CALLS.join(", ")
        )));
    }
    let mut props = Map::new();
    for p in &args.props {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| CommandError::Usage(format!("--prop `{p}`: expected key=value")))?;
        let value = serde_json::from_str::<Value>(v).unwrap_or_else(|_| Value::from(v));
        props.insert(k, value);
    }
    let mut body = serde_json::json!({ "messageId": uuid::Uuid::new_v4().to_string() });
    let props_key = if args.call == "identify" || args.call == "group" {
        "traits"
    } else {
        "properties"
    };
    body[props_key] = serde_json::to_value(&props).unwrap_or_default();
    if let Some(name) = &args.name {
        body[if args.call == "track" {
            "event"
        } else {
            "name"
        }] = name.clone().into();
    }
    if let Some(u) = &args.user_id {
        body["userId"] = u.clone().into();
    }
    if let Some(a) = &args.anonymous_id {
        body["anonymousId"] = a.clone().into();
    }
    if let Some(key) = config.segment.write_keys.first() {
        body["writeKey"] = key.clone().into();
    }
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let path = format!("/v1/{}", args.call);
    match request(
        config.http.listen,
        "POST",
        &path,
        Some(Bytes::from(bytes.clone())),
    )
    .await
    {
        Ok((200, _)) => Ok(format!("sent to the agent at {}", config.http.listen)),
        Ok((status, body)) => Err(CommandError::Refused { status, body }),
        Err(_) => {
            // No agent listening: queue it ourselves, through the same parser.
            let limits = segment::Limits {
                max_event: config.segment.max_event_size.0,
                max_batch: config.segment.max_batch_size.0,
            };
            let parsed = segment::parse(&args.call, &bytes, limits, now_ms())
                .map_err(|e| CommandError::Usage(e.to_string()))?;
            let agent = Agent::open(config.clone(), data_dir)?;
            let accepted = agent.submit(parsed.events).await?;
            agent.spool().close().await;
            Ok(if accepted.denied > 0 {
                "dropped: consent for this event is not granted".to_owned()
            } else {
                format!("queued in {}", data_dir.display())
            })
        }
    }
}

/// The status JSON, from the running agent or else from the spool file.
pub async fn status(config: &AgentConfig, data_dir: &Path) -> Result<String, CommandError> {
    match request(config.http.listen, "GET", "/v1/status", None).await {
        Ok((200, body)) => Ok(body),
        Ok((status, body)) => Err(CommandError::Refused { status, body }),
        Err(_) => {
            let agent = Agent::open(config.clone(), data_dir)?;
            let report = crate::status::status(
                agent.spool(),
                agent.device_id().to_owned(),
                config.agent.fleet,
            );
            agent.spool().close().await;
            Ok(serde_json::to_string_pretty(&report).unwrap_or_default())
        }
    }
}

/// Checks the spool file; returns the problems found (empty: all good).
pub async fn check(config: &AgentConfig, data_dir: &Path) -> Result<Vec<String>, CommandError> {
    let agent = Agent::open(config.clone(), data_dir)?;
    let problems = agent.spool().check()?;
    agent.spool().close().await;
    Ok(problems)
}

/// Writes every queued event as one JSON line; returns how many.
pub async fn export(
    config: &AgentConfig,
    data_dir: &Path,
    out: &mut impl Write,
) -> Result<u64, CommandError> {
    let agent = Agent::open(config.clone(), data_dir)?;
    let mut io_error = None;
    let n = agent.spool().for_each_event(|e| {
        let line = serde_json::to_string(e).unwrap_or_default();
        if let Err(err) = writeln!(out, "{line}") {
            io_error.get_or_insert(err);
        }
        Ok(())
    })?;
    agent.spool().close().await;
    if let Some(e) = io_error {
        return Err(e.into());
    }
    Ok(n)
}

/// A minimal HTTP/1.1 request to the local API: `(status, body)`.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Bytes>,
) -> Result<(u16, String), std::io::Error> {
    let other = |e: hyper::Error| std::io::Error::other(e.to_string());
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(other)?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(body.unwrap_or_default()))
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let resp = sender.send_request(req).await.map_err(other)?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.map_err(other)?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// `Authorization` header value for a Segment write key.
pub fn basic_auth(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}
