//! Request handling for the local API: routing, auth, body limits, and the mapping
//! of parse and spool outcomes to status codes.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming as Body;
use hyper::header::CONTENT_LENGTH;
use hyper::{Method, Request, StatusCode};
use serde::Deserialize;

use super::auth::{basic, same_secret};
use super::query;
use super::reply::{json, with_type, ApiError, Reply};
use crate::config::AgentConfig;
use crate::consent::ConsentUpdate;
use crate::ingest::{format_timestamp, mparticle, segment, Incoming};
use crate::intake::{CurrentIdentity, Intake};
use crate::model::{now_ms, Event, EventKind, Source};
use crate::status::{metrics, status, HttpCounters};

/// Limits the server applies per connection and request.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub drain_timeout: Duration,
}

/// The local API: everything a request handler needs.
#[derive(Debug)]
pub struct Api {
    intake: Arc<Intake>,
    config: AgentConfig,
    limits: Limits,
    counters: HttpCounters,
    device_id: String,
    uplink: Option<crate::uplink::SharedStatus>,
}

impl Api {
    pub fn new(
        intake: Arc<Intake>,
        config: AgentConfig,
        device_id: String,
        uplink: Option<crate::uplink::SharedStatus>,
    ) -> Self {
        let limits = Limits {
            max_connections: config.http.max_connections,
            header_timeout: config.http.header_timeout,
            body_timeout: config.http.body_timeout,
            drain_timeout: config.http.drain_timeout,
        };
        Api {
            intake,
            config,
            limits,
            counters: HttpCounters::default(),
            device_id,
            uplink,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Answers one request. `stopping`: shutdown began, refuse new work with 503.
    pub async fn handle(&self, req: Request<Body>, stopping: bool) -> Reply {
        let reply = match self.route(req, stopping).await {
            Ok(r) => r,
            Err(e) => e.into_reply(),
        };
        self.counters.record(reply.status().as_u16());
        reply
    }

    async fn route(&self, req: Request<Body>, stopping: bool) -> Result<Reply, ApiError> {
        let path = req.uri().path().trim_end_matches('/').to_owned();
        let method = req.method().clone();
        match (&method, path.as_str()) {
            (&Method::GET, "/v1/status") => Ok(json(
                StatusCode::OK,
                &crate::status::Status {
                    uplink: self.uplink.as_ref().map(|u| {
                        u.lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .clone()
                    }),
                    ..status(
                        self.intake.spool(),
                        self.device_id.clone(),
                        self.config.agent.fleet,
                    )
                },
            )),
            (&Method::GET, "/metrics") => Ok(with_type(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                Bytes::from(metrics(self.intake.spool(), &self.counters)),
            )),
            (&Method::GET, "/health") => Ok(json(StatusCode::OK, &serde_json::json!({"ok": true}))),
            (&Method::GET, "/v1/audiences") => self.audiences(&req).await,
            _ if stopping => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the agent is shutting down; retry later",
            )
            .retry_after(1)),
            (&Method::POST, "/v2/events") => self.mparticle(req, false).await,
            (&Method::POST, "/v2/bulkevents") => self.mparticle(req, true).await,
            (&Method::PUT, "/v1/consent") => self.consent(req).await,
            (&Method::POST, p) if p.starts_with("/v1/") => {
                let call = &p["/v1/".len()..];
                if call == "batch" || segment::CALLS.contains(&call) {
                    self.segment(call, req).await
                } else if matches!(p, "/v1/status" | "/v1/audiences") {
                    Err(method_not_allowed(&method, p))
                } else {
                    Err(not_found(p))
                }
            }
            (
                _,
                "/v1/status" | "/metrics" | "/health" | "/v2/events" | "/v2/bulkevents"
                | "/v1/consent" | "/v1/audiences",
            ) => Err(method_not_allowed(&method, &path)),
            (_, p) => Err(not_found(p)),
        }
    }

    async fn segment(&self, call: &str, req: Request<Body>) -> Result<Reply, ApiError> {
        let header_key = basic(req.headers()).map(|(user, _)| user);
        let body = self
            .read_body(req, self.config.segment.max_batch_size.0)
            .await?;
        let limits = segment::Limits {
            max_event: self.config.segment.max_event_size.0,
            max_batch: self.config.segment.max_batch_size.0,
        };
        // Check a header key before parsing; a body key can only be checked after.
        if let Some(key) = &header_key {
            self.check_write_key(Some(key))?;
        }
        let parsed = segment::parse(call, &body, limits, now_ms())?;
        if header_key.is_none() {
            self.check_write_key(parsed.write_key.as_deref())?;
        }
        self.intake.submit(parsed.events).await?;
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "success": true }),
        ))
    }

    async fn mparticle(&self, req: Request<Body>, bulk: bool) -> Result<Reply, ApiError> {
        let keys = &self.config.mparticle.keys;
        if !keys.is_empty() {
            let ok = basic(req.headers()).is_some_and(|(key, secret)| {
                keys.iter()
                    .any(|k| same_secret(&k.key, &key) && same_secret(&k.secret, &secret))
            });
            if !ok {
                return Err(unauthorized(
                    "mParticle API key and secret (HTTP Basic) are missing or wrong",
                ));
            }
        }
        let body = self
            .read_body(req, self.config.mparticle.max_request_size.0)
            .await?;
        let events = mparticle::parse(
            &body,
            bulk,
            self.config.mparticle.max_request_size.0,
            now_ms(),
        )?;
        self.intake.submit(events).await?;
        Ok(with_type(
            StatusCode::ACCEPTED,
            "application/json",
            Bytes::new(),
        ))
    }

    async fn consent(&self, req: Request<Body>) -> Result<Reply, ApiError> {
        let header_key = basic(req.headers()).map(|(user, _)| user);
        self.check_write_key(header_key.as_deref())?;
        let body = self
            .read_body(req, self.config.segment.max_event_size.0)
            .await?;
        let body: ConsentBody = serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("consent body: {e}"),
            )
        })?;
        if body.user_id.is_none() && body.anonymous_id.is_none() && body.device_id.is_none() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "consent body: one of userId, anonymousId, deviceId is required",
            ));
        }
        let now = now_ms();
        let mut event = Event::new(EventKind::Consent, Source::Local, now);
        event.identities.user_id = body.user_id.map(Into::into);
        event.identities.anonymous_id = body.anonymous_id.map(Into::into);
        let incoming = Incoming {
            event,
            consent: Some(ConsentUpdate {
                purposes: body.purposes.into_iter().collect(),
                ccpa_opt_out: body.ccpa_opt_out,
                at_ms: now,
            }),
            device_hint: body.device_id,
        };
        let accepted = self.intake.submit(vec![incoming]).await?;
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "success": true, "changed": accepted.consent_changes > 0 }),
        ))
    }

    /// `GET /v1/audiences[?userId=…|anonymousId=…][&deviceId=…]`: the membership
    /// the spool file holds, so it answers offline. Without an id, the device's
    /// current user (else its anonymous id); `deviceId` picks the device in fleet mode.
    ///
    /// No credentials, like the other local reads (`/v1/status`, `/metrics`): the
    /// apps of the device read it, and the API listens on loopback by default. An
    /// agent whose `http.listen` is reachable from a network exposes it there too.
    async fn audiences(&self, req: &Request<Body>) -> Result<Reply, ApiError> {
        let bad =
            |message: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message);
        let pairs =
            query::parse(req.uri().query().unwrap_or("")).map_err(|e| bad(e.to_string()))?;
        let get = |name| query::single(&pairs, name).map_err(|e| bad(e.to_string()));
        let (user, anonymous, device) = (get("userId")?, get("anonymousId")?, get("deviceId")?);
        let who = match (user, anonymous) {
            (Some(_), Some(_)) => {
                return Err(bad("give one of userId or anonymousId, not both".into()))
            }
            (Some(u), None) => CurrentIdentity::User(u.to_owned()),
            (None, Some(a)) => CurrentIdentity::Anonymous(a.to_owned()),
            (None, None) => self.intake.current_identity(device).await.ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "no_current_user",
                    "the device has no current user or anonymous id yet; pass userId or anonymousId",
                )
            })?,
        };
        let (key, id) = match &who {
            CurrentIdentity::User(id) => ("userId", id),
            CurrentIdentity::Anonymous(id) => ("anonymousId", id),
        };
        if id.is_empty() {
            return Err(bad(format!("{key} is empty")));
        }
        let record = self.intake.spool().audiences(id)?;
        let mut body = serde_json::Map::new();
        body.insert(key.into(), id.as_str().into());
        let (audiences, version, updated_at) = match record {
            Some(r) => (r.audiences, r.version, Some(format_timestamp(r.updated_ms))),
            // Unknown here: the device holds no membership for them, which is an
            // answer, not an error.
            None => (Vec::new(), 0, None),
        };
        body.insert("audiences".into(), audiences.into());
        body.insert("version".into(), version.into());
        body.insert("updatedAt".into(), updated_at.into());
        Ok(json(StatusCode::OK, &body))
    }

    fn check_write_key(&self, key: Option<&str>) -> Result<(), ApiError> {
        let keys = &self.config.segment.write_keys;
        if keys.is_empty() {
            return Ok(());
        }
        match key {
            Some(k) if keys.iter().any(|w| same_secret(w, k)) => Ok(()),
            Some(_) => Err(unauthorized("write key is not valid")),
            None => Err(unauthorized(
                "write key missing: send it as the Basic auth user or as `writeKey` in the body",
            )),
        }
    }

    /// Reads the body within the size limit and the body timeout.
    async fn read_body(&self, req: Request<Body>, limit: u64) -> Result<Bytes, ApiError> {
        let too_large = |size: String| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("request body is {size}, over the {limit}-byte limit"),
            )
        };
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(len) = declared {
            if len > limit {
                return Err(too_large(format!("{len} bytes")));
            }
        }
        let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
        let collect = Limited::new(req.into_body(), limit_usize).collect();
        match tokio::time::timeout(self.limits.body_timeout, collect).await {
            Err(_) => Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "request body not received within {:?}",
                    self.limits.body_timeout
                ),
            )),
            Ok(Err(e))
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                Err(too_large("larger".into()))
            }
            Ok(Err(e)) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("reading the body: {e}"),
            )),
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
        }
    }
}

/// `PUT /v1/consent` body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConsentBody {
    user_id: Option<String>,
    anonymous_id: Option<String>,
    /// Fleet mode: the device the user is on.
    device_id: Option<String>,
    #[serde(default)]
    purposes: std::collections::BTreeMap<String, bool>,
    ccpa_opt_out: Option<bool>,
}

fn not_found(path: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no endpoint at {path}"),
    )
}

fn method_not_allowed(method: &Method, path: &str) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {path}"),
    )
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}
