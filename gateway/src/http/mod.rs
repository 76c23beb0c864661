//! The gateway's HTTP API: server-side ingest, the admin API, health and metrics.
//!
//! - [`ingest`]: Segment `/v1/*` and mParticle `/v2/*` for sources without an agent.
//! - [`admin`]: `/v1/devices`, `/v1/profiles` (lookup, erase), `/v1/destinations`
//!   (status, dead letters, replay); Bearer `http.admin_token`, or loopback only.
//! - [`audiences`]: `/v1/audiences` (sizes, members, why, sweep); admin like the above.
//! - [`metrics`]: what `/metrics` shows.
//! - [`client`]: the admin CLI's side of the API.
//!
//! This module owns the socket, the routing and the body limits; it answers nothing
//! before what it stored is committed.

mod admin;
mod audiences;
mod auth;
pub mod client;
mod ingest;
mod metrics;
mod reply;

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming as Body;
use hyper::header::CONTENT_LENGTH;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::endpoint::{EndpointMetrics, Sessions};
use crate::store::Store;

pub use ingest::{sender as source_sender, LANE as SOURCE_LANE};
pub use metrics::HttpCounters;
use reply::{json, with_type, ApiError, Reply};

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 256;
/// Time to send the request head, and then the body.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed `accept` (e.g. out of file descriptors) before retrying.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Largest body of an admin call (they carry none today).
const MAX_ADMIN_BODY: u64 = 64 * 1024;

/// What the HTTP API reads and writes.
#[derive(Debug)]
pub struct Admin {
    pub store: Arc<Store>,
    pub metrics: Arc<EndpointMetrics>,
    pub sessions: Arc<Sessions>,
    pub profiles: Arc<crate::profiles::Profiles>,
    pub audiences: Arc<crate::audience::engine::Audiences>,
    pub destinations: Arc<crate::dest::Registry>,
    pub downlinks: Arc<crate::downlink::Downlinks>,
    pub config: crate::config::HttpConfig,
    pub sources: Vec<crate::config::SourceConfig>,
    pub counters: HttpCounters,
    /// Tools posting engagement back (`POST /v1/feeds/{name}`).
    pub feeds: Vec<crate::config::FeedConfig>,
    /// `gateway.test_clock`: `POST /v1/clock` may move the clock forward.
    pub test_clock: bool,
}

/// A routed request, before its body is read.
enum Route<'a> {
    Health,
    Metrics,
    Segment(&'a str),
    Mparticle { bulk: bool },
    Device(String),
    ProfileCount,
    Profile(String, String),
    EraseProfile(String, String),
    Destinations,
    DeadLetters(String),
    Replay(String),
    Feed(String),
    Clock,
    Audiences,
    AudienceMembers(String),
    AudienceWhy(String, String, String),
    AudienceSweep,
}

impl Route<'_> {
    fn is_admin(&self) -> bool {
        !matches!(
            self,
            Route::Health
                | Route::Metrics
                | Route::Segment(_)
                | Route::Mparticle { .. }
                | Route::Feed(_)
        )
    }
}

/// Picks the handler for `method` on `path` (trailing `/` ignored).
fn route<'p>(method: &Method, path: &'p str) -> Result<Route<'p>, ApiError> {
    let segment = |s: &str| {
        admin::percent_decode(s)
            .ok_or_else(|| ApiError::bad_request(format!("path segment `{s}` is badly escaped")))
    };
    let not_allowed = || {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not allowed on {path}"),
        )
    };
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let get = method == Method::GET;
    let post = method == Method::POST;
    let found = match parts.as_slice() {
        ["health"] if get => Route::Health,
        ["metrics"] if get => Route::Metrics,
        ["health" | "metrics"] => return Err(not_allowed()),
        ["v1", call] if *call == "batch" || edge_agent::ingest::segment::CALLS.contains(call) => {
            if !post {
                return Err(not_allowed());
            }
            Route::Segment(call)
        }
        ["v2", "events"] if post => Route::Mparticle { bulk: false },
        ["v2", "bulkevents"] if post => Route::Mparticle { bulk: true },
        ["v2", "events" | "bulkevents"] => return Err(not_allowed()),
        ["v1", "devices", id] if get => Route::Device(segment(id)?),
        ["v1", "devices", _] => return Err(not_allowed()),
        ["v1", "profiles"] if get => Route::ProfileCount,
        ["v1", "profiles"] => return Err(not_allowed()),
        ["v1", "profiles", t, v] if get => Route::Profile(segment(t)?, segment(v)?),
        ["v1", "profiles", t, v] if method == Method::DELETE => {
            Route::EraseProfile(segment(t)?, segment(v)?)
        }
        ["v1", "profiles", _, _] => return Err(not_allowed()),
        ["v1", "destinations"] if get => Route::Destinations,
        ["v1", "destinations"] => return Err(not_allowed()),
        ["v1", "destinations", name, "dead-letters"] if get => Route::DeadLetters(segment(name)?),
        ["v1", "destinations", name, "replay"] if post => Route::Replay(segment(name)?),
        ["v1", "destinations", _, "dead-letters" | "replay"] => return Err(not_allowed()),
        ["v1", "feeds", name] if post => Route::Feed(segment(name)?),
        ["v1", "feeds", _] => return Err(not_allowed()),
        ["v1", "audiences"] if get => Route::Audiences,
        ["v1", "audiences"] => return Err(not_allowed()),
        ["v1", "audiences", "sweep"] if post => Route::AudienceSweep,
        ["v1", "audiences", "sweep"] => return Err(not_allowed()),
        ["v1", "audiences", name, "members"] if get => Route::AudienceMembers(segment(name)?),
        ["v1", "audiences", name, "why", t, v] if get => {
            Route::AudienceWhy(segment(name)?, segment(t)?, segment(v)?)
        }
        ["v1", "audiences", _, "members"] | ["v1", "audiences", _, "why", _, _] => {
            return Err(not_allowed())
        }
        ["v1", "clock"] if post => Route::Clock,
        ["v1", "clock"] => return Err(not_allowed()),
        _ => return Err(ApiError::not_found(format!("no endpoint at {path}"))),
    };
    Ok(found)
}

impl Admin {
    /// Answers one request from `peer`. `stopping`: shutdown began, refuse ingest
    /// with 503 (the sender retries elsewhere or later).
    async fn handle(&self, req: Request<Body>, peer: IpAddr, stopping: bool) -> Reply {
        let reply = match self.dispatch(req, peer, stopping).await {
            Ok(r) => r,
            Err(e) => e.into_reply(),
        };
        self.counters.record_status(reply.status().as_u16());
        reply
    }

    async fn dispatch(
        &self,
        req: Request<Body>,
        peer: IpAddr,
        stopping: bool,
    ) -> Result<Reply, ApiError> {
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        let method = req.method().clone();
        let route = route(&method, &path)?;
        if route.is_admin() {
            auth::admin(self.config.admin_token.as_deref(), req.headers(), peer)?;
        }
        let ingest = matches!(
            route,
            Route::Segment(_) | Route::Mparticle { .. } | Route::Feed(_)
        );
        if stopping && ingest {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the gateway is shutting down; retry later",
            )
            .retry_after(1));
        }
        let (parts, body) = req.into_parts();
        let limit = if ingest {
            self.config.max_body.0
        } else {
            MAX_ADMIN_BODY
        };
        let body = read_body(&parts.headers, body, limit).await?;
        match route {
            Route::Health => Ok(json(StatusCode::OK, &serde_json::json!({"ok": true}))),
            Route::Metrics => Ok(with_type(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                Bytes::from(self.metrics_text()),
            )),
            Route::Segment(call) => self.segment(call, &parts.headers, body).await,
            Route::Mparticle { bulk } => self.mparticle(bulk, &parts.headers, body).await,
            Route::Device(id) => self.device(&id),
            Route::ProfileCount => self.profile_count(),
            Route::Profile(t, v) => self.profile(&t, &v).await,
            Route::EraseProfile(t, v) => self.erase(&t, &v).await,
            Route::Destinations => Ok(self.destinations()),
            Route::DeadLetters(name) => self.dead_letters(&name, &query),
            Route::Replay(name) => self.replay(&name).await,
            Route::Feed(name) => self.feed(&name, &parts.headers, body).await,
            Route::Clock => self.advance_clock(&query),
            Route::Audiences => self.audiences(),
            Route::AudienceMembers(name) => self.audience_members(&name, &query),
            Route::AudienceWhy(name, t, v) => self.audience_why(&name, &t, &v).await,
            Route::AudienceSweep => self.audience_sweep().await,
        }
    }

    /// Serves until `shutdown`, then lets in-flight requests finish.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let tracker = TaskTracker::new();
        loop {
            let permit = tokio::select! {
                () = shutdown.cancelled() => break,
                p = Arc::clone(&permits).acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let (stream, peer) = tokio::select! {
                () = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(conn) => conn,
                    Err(e) => {
                        warn!(error = %e, "HTTP accept failed; retrying.");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let admin = Arc::clone(&self);
            let token = shutdown.clone();
            tracker.spawn(async move {
                let _permit = permit;
                let stopping = token.clone();
                let svc = service_fn(move |req| {
                    let admin = Arc::clone(&admin);
                    let stopping = stopping.is_cancelled();
                    async move { Ok::<_, Infallible>(admin.handle(req, peer.ip(), stopping).await) }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::pin!(conn);
                let result = tokio::select! {
                    r = conn.as_mut() => r,
                    () = token.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                if let Err(e) = result {
                    debug!(%peer, error = %e, "HTTP connection closed with an error.");
                }
            });
        }
        tracker.close();
        tracker.wait().await;
    }
}

/// Reads a body within `limit` bytes and [`BODY_TIMEOUT`].
async fn read_body(headers: &hyper::HeaderMap, body: Body, limit: u64) -> Result<Bytes, ApiError> {
    let too_large = |size: String| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request body is {size}, over the {limit}-byte limit (http.max_body)"),
        )
    };
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared {
        if len > limit {
            return Err(too_large(format!("{len} bytes")));
        }
    }
    let collect = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX)).collect();
    match tokio::time::timeout(BODY_TIMEOUT, collect).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!("request body not received within {BODY_TIMEOUT:?}"),
        )),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large("larger".into()))
        }
        Ok(Err(e)) => Err(ApiError::bad_request(format!("reading the body: {e}"))),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(method: Method, path: &str) -> bool {
        route(&method, path).is_ok()
    }

    fn status(method: Method, path: &str) -> u16 {
        route(&method, path)
            .err()
            .map_or(200, |e| e.status.as_u16())
    }

    #[test]
    fn ingest_and_admin_paths_route_and_wrong_methods_are_405() {
        assert!(ok(Method::POST, "/v1/track"));
        assert!(ok(Method::POST, "/v1/feeds/push"));
        assert!(route(&Method::POST, "/v1/feeds/push").is_ok_and(|r| !r.is_admin()));
        assert!(route(&Method::POST, "/v1/clock").is_ok_and(|r| r.is_admin()));
        assert_eq!(status(Method::GET, "/v1/feeds/push"), 405);
        assert!(ok(Method::POST, "/v1/batch/"));
        assert!(ok(Method::POST, "/v2/bulkevents"));
        assert_eq!(status(Method::GET, "/v1/track"), 405);
        assert_eq!(status(Method::POST, "/v1/nope"), 404);
        assert_eq!(status(Method::POST, "/v1/profiles/email/a"), 405);
        assert!(matches!(
            route(&Method::DELETE, "/v1/profiles/email/ada%40example.com"),
            Ok(Route::EraseProfile(t, v)) if t == "email" && v == "ada@example.com"
        ));
        assert!(
            route(&Method::GET, "/v1/profiles/email/ada@example.com").is_ok_and(|r| r.is_admin())
        );
        assert!(route(&Method::POST, "/v1/identify").is_ok_and(|r| !r.is_admin()));
        assert!(matches!(
            route(&Method::GET, "/v1/destinations/web/dead-letters"),
            Ok(Route::DeadLetters(n)) if n == "web"
        ));
        assert_eq!(status(Method::GET, "/v1/destinations/web/replay"), 405);
        assert_eq!(status(Method::GET, "/v1/profiles/email/%zz"), 400);
        assert!(matches!(
            route(&Method::GET, "/v1/audiences/lapsed/why/email/a%40b.c"),
            Ok(Route::AudienceWhy(n, t, v)) if n == "lapsed" && t == "email" && v == "a@b.c"
        ));
        assert!(route(&Method::GET, "/v1/audiences").is_ok_and(|r| r.is_admin()));
        assert!(route(&Method::POST, "/v1/audiences/sweep").is_ok_and(|r| r.is_admin()));
        assert!(matches!(
            route(&Method::GET, "/v1/audiences/lapsed/members"),
            Ok(Route::AudienceMembers(n)) if n == "lapsed"
        ));
        assert_eq!(status(Method::GET, "/v1/audiences/sweep"), 405);
        assert_eq!(status(Method::POST, "/v1/audiences/lapsed/members"), 405);
    }
}
