//! Webhook destination: Segment-spec JSON POSTed to a URL.
//!
//! - `format = "single"`: one event per request, the body is the event object, the
//!   `Idempotency-Key` header is its event id (the driver hands it one event at a
//!   time, see [`Sink::max_batch`]).
//! - `format = "batch"`: `{"batch": [...], "sentAt": "..."}`; the `Idempotency-Key`
//!   is the first event's id, and every event's `messageId` is its own id, which is
//!   what a receiver deduplicates on.
//!
//! Answers: 2xx delivered; 408, 429, 5xx, timeouts and connection failures retried
//! (with the destination's `Retry-After`, seconds or an HTTP date); any other status
//! refused for good (dead letters), with the status and the start of the body.
//!
//! This module only turns a batch into one request and the answer into a
//! [`SendOutcome`]; timing, retries and dead letters belong to the outbox driver.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use edge_agent::model::EventId;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tracing::warn;

use super::{Delivery, Rendered, SendOutcome, Sink};
use crate::config::{DestinationConfig, WebhookFormat};

/// Response bytes read to explain a refusal; a longer body is not read.
const MAX_RESPONSE: usize = 64 << 10;
/// Characters of a response body kept in a refusal reason.
const SNIPPET: usize = 200;
/// Idle pooled connections are closed after this long.
const POOL_IDLE: Duration = Duration::from_secs(30);

/// Why a webhook destination cannot start: its config cannot make a request.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// `url` is missing or not a usable http(s) URL.
    #[error("destination `{dest}`: `url`: {message}")]
    Url { dest: String, message: String },
    /// A `headers` entry, `bearer_token` or `basic_auth` is not a valid header.
    #[error("destination `{dest}`: header `{header}`: {message}")]
    Header {
        dest: String,
        header: String,
        message: String,
    },
    /// The TLS client could not be set up.
    #[error("destination `{dest}`: TLS: {message}")]
    Tls { dest: String, message: String },
}

/// A webhook destination's HTTP client and request template.
#[derive(Debug)]
pub struct WebhookSink {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    uri: Uri,
    headers: HeaderMap,
    format: WebhookFormat,
    timeout: Duration,
}

impl WebhookSink {
    /// Builds the client for `config` (no connection is made yet).
    pub fn new(config: &DestinationConfig) -> Result<Self, WebhookError> {
        let dest = config.name.clone();
        let url = config.url.as_deref().ok_or_else(|| WebhookError::Url {
            dest: dest.clone(),
            message: "required".into(),
        })?;
        let uri: Uri = url.parse().map_err(|e| WebhookError::Url {
            dest: dest.clone(),
            message: format!("`{url}`: {e}"),
        })?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(WebhookError::Url {
                    dest,
                    message: format!("`{url}` is not an http(s) URL"),
                })
            }
        };
        if uri.host().is_none() {
            return Err(WebhookError::Url {
                dest,
                message: format!("`{url}` has no host"),
            });
        }
        let headers = request_headers(config)?;
        let tls = client_tls(&dest, https)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_max_idle_per_host(config.concurrency.max(1))
            .build(connector);
        Ok(Self {
            client,
            uri,
            headers,
            format: config.format,
            timeout: config.timeout,
        })
    }

    /// The body of one request in `batch` format from the events' JSON texts:
    /// `{"batch":[...],"sentAt":"..."}`, the texts copied in as they are.
    fn batch_body<'a>(&self, events: impl Iterator<Item = &'a [u8]> + Clone) -> Vec<u8> {
        const HEAD: &[u8] = b"{\"batch\":[";
        const SENT_AT: &[u8] = b"],\"sentAt\":\"";
        let sent_at = edge_agent::ingest::format_timestamp(edge_agent::model::now_ms());
        let size: usize = events.clone().map(|e| e.len() + 1).sum();
        let mut body = Vec::with_capacity(HEAD.len() + size + SENT_AT.len() + sent_at.len() + 2);
        body.extend_from_slice(HEAD);
        for (i, event) in events.enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(event);
        }
        body.extend_from_slice(SENT_AT);
        // RFC 3339 digits and punctuation: nothing to escape.
        body.extend_from_slice(sent_at.as_bytes());
        body.extend_from_slice(b"\"}");
        body
    }

    /// Sends one request under the timeout; `key` is its `Idempotency-Key`.
    async fn request(&self, key: Option<EventId>, body: Vec<u8>) -> SendOutcome {
        match tokio::time::timeout(self.timeout, self.exchange(key, body)).await {
            Err(_) => SendOutcome::Retry {
                after: None,
                reason: format!("no answer within {:?}", self.timeout),
            },
            Ok(Err(reason)) => SendOutcome::Retry {
                after: None,
                reason,
            },
            Ok(Ok((status, retry_after, body))) => {
                classify(status, retry_after.as_deref(), &body, SystemTime::now())
            }
        }
    }

    /// One request; the answer's status, `Retry-After` and body start.
    async fn exchange(
        &self,
        key: Option<EventId>,
        body: Vec<u8>,
    ) -> Result<(u16, Option<String>, Bytes), String> {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("cannot build the request: {e}"))?;
        *request.headers_mut() = self.headers.clone();
        if let Some(key) = key {
            if let Ok(key) = HeaderValue::from_str(&key.to_string()) {
                request.headers_mut().insert("idempotency-key", key);
            }
        }
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| describe_client_error(&e))?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        // The body matters only to explain a refusal; a huge or broken one is skipped.
        let body = Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        Ok((status, retry_after, body))
    }
}

impl Sink for WebhookSink {
    async fn send(&self, batch: &[Delivery]) -> SendOutcome {
        // A `Value` always serializes.
        let text = |d: &Delivery| serde_json::to_vec(&d.body).unwrap_or_default();
        if self.format == WebhookFormat::Batch {
            let Some(first) = batch.first() else {
                return SendOutcome::Delivered;
            };
            let texts: Vec<Vec<u8>> = batch.iter().map(text).collect();
            let body = self.batch_body(texts.iter().map(Vec::as_slice));
            return self.request(Some(first.event_id), body).await;
        }
        // The driver hands `single` one event at a time (max_batch); should a caller
        // not, each still travels alone, stopping at the first that is not taken.
        for one in batch {
            let outcome = self.request(Some(one.event_id), text(one)).await;
            if outcome != SendOutcome::Delivered {
                return outcome;
            }
        }
        SendOutcome::Delivered
    }

    async fn send_rendered(&self, batch: &[Rendered]) -> SendOutcome {
        if self.format == WebhookFormat::Batch {
            let Some(first) = batch.first() else {
                return SendOutcome::Delivered;
            };
            let body = self.batch_body(batch.iter().map(|r| r.json.as_bytes()));
            return self.request(Some(first.event_id), body).await;
        }
        for one in batch {
            let outcome = self
                .request(Some(one.event_id), one.json.as_bytes().to_vec())
                .await;
            if outcome != SendOutcome::Delivered {
                return outcome;
            }
        }
        SendOutcome::Delivered
    }

    fn max_batch(&self) -> Option<usize> {
        (self.format == WebhookFormat::Single).then_some(1)
    }
}

/// Content type, auth and the configured headers, checked once.
fn request_headers(config: &DestinationConfig) -> Result<HeaderMap, WebhookError> {
    let bad = |header: &str, message: String| WebhookError::Header {
        dest: config.name.clone(),
        header: header.to_owned(),
        message,
    };
    let mut headers = HeaderMap::new();
    for (name, value) in &config.headers {
        let n = HeaderName::from_bytes(name.as_bytes()).map_err(|e| bad(name, e.to_string()))?;
        let v = HeaderValue::from_str(value).map_err(|e| bad(name, e.to_string()))?;
        headers.insert(n, v);
    }
    if let Some(token) = &config.bearer_token {
        let mut v = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|e| bad("bearer_token", e.to_string()))?;
        v.set_sensitive(true);
        headers.insert(AUTHORIZATION, v);
    }
    if let Some(pair) = &config.basic_auth {
        let (user, pass) = pair.split_once(':').unwrap_or((pair, ""));
        let mut v = HeaderValue::from_str(&edge_agent::commands::basic_auth(user, pass))
            .map_err(|e| bad("basic_auth", e.to_string()))?;
        v.set_sensitive(true);
        headers.insert(AUTHORIZATION, v);
    }
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(headers)
}

/// rustls with ring, trusting the system's roots (read only for https URLs).
fn client_tls(dest: &str, https: bool) -> Result<rustls::ClientConfig, WebhookError> {
    let mut roots = rustls::RootCertStore::empty();
    if https {
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            // One unusable system certificate must not take the others down.
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            warn!(destination = %dest, errors = ?found.errors, "No system root certificates found; https requests will fail.");
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| WebhookError::Tls {
            dest: dest.to_owned(),
            message: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The client error with its causes (hyper's top-level message alone says little).
fn describe_client_error(e: &hyper_util::client::legacy::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// What an HTTP answer means for the batch.
pub fn classify(
    status: u16,
    retry_after: Option<&str>,
    body: &[u8],
    now: SystemTime,
) -> SendOutcome {
    let reason = || {
        let text = String::from_utf8_lossy(body);
        let snippet: String = text.trim().chars().take(SNIPPET).collect();
        let name = StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        if snippet.is_empty() {
            format!("HTTP {status} {name}")
        } else {
            format!("HTTP {status} {name}: {snippet}")
        }
    };
    match status {
        200..=299 => SendOutcome::Delivered,
        408 | 429 | 500..=599 => SendOutcome::Retry {
            after: retry_after.and_then(|v| parse_retry_after(v, now)),
            reason: reason(),
        },
        _ => SendOutcome::Reject { reason: reason() },
    }
}

/// `Retry-After` as delay-seconds or an HTTP date; a date in the past is zero.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn config(extra: &str) -> DestinationConfig {
        let text = format!(
            "[[destinations]]\nname = \"w\"\nkind = \"webhook\"\nurl = \"http://127.0.0.1:9/in\"\n{extra}\n"
        );
        crate::config::GatewayConfig::parse(&text, std::path::Path::new("t.toml"))
            .unwrap()
            .destinations
            .remove(0)
    }

    #[test]
    fn two_hundreds_are_delivered() {
        let now = SystemTime::now();
        assert_eq!(classify(200, None, b"", now), SendOutcome::Delivered);
        assert_eq!(classify(204, None, b"", now), SendOutcome::Delivered);
    }

    #[test]
    fn timeouts_throttling_and_server_errors_are_retried_with_retry_after() {
        let now = SystemTime::now();
        for status in [408, 429, 500, 502, 503, 504] {
            assert!(
                matches!(
                    classify(status, None, b"", now),
                    SendOutcome::Retry { after: None, .. }
                ),
                "{status}"
            );
        }
        assert_eq!(
            classify(429, Some("1"), b"slow down", now),
            SendOutcome::Retry {
                after: Some(Duration::from_secs(1)),
                reason: "HTTP 429 Too Many Requests: slow down".into()
            }
        );
    }

    #[test]
    fn other_client_errors_are_refused_with_status_and_body_start() {
        let now = SystemTime::now();
        let long = "x".repeat(1000);
        match classify(400, None, long.as_bytes(), now) {
            SendOutcome::Reject { reason } => {
                assert!(reason.starts_with("HTTP 400 Bad Request: xxx"), "{reason}");
                assert!(reason.len() < 260, "{}", reason.len());
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify(404, None, b"", now),
            SendOutcome::Reject { .. }
        ));
        assert!(matches!(
            classify(301, None, b"", now),
            SendOutcome::Reject { .. }
        ));
    }

    #[test]
    fn retry_after_takes_seconds_or_an_http_date() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }

    #[test]
    fn headers_carry_config_auth_and_content_type() {
        let h = request_headers(&config(
            "bearer_token = \"t0k\"\n[destinations.headers]\nX-Api-Version = \"2\"",
        ))
        .unwrap();
        assert_eq!(h["authorization"], "Bearer t0k");
        assert_eq!(h["x-api-version"], "2");
        assert_eq!(h["content-type"], "application/json");
        let h = request_headers(&config("basic_auth = \"key:\"")).unwrap();
        assert_eq!(h["authorization"], "Basic a2V5Og==");
    }

    #[test]
    fn a_header_that_cannot_be_sent_is_a_config_error() {
        let err =
            WebhookSink::new(&config("[destinations.headers]\n\"Bad Name\" = \"x\"")).unwrap_err();
        assert!(err.to_string().contains("Bad Name"), "{err}");
    }

    #[test]
    fn a_batch_body_is_the_event_texts_in_an_array_with_sent_at() {
        let sink = WebhookSink::new(&config("format = \"batch\"")).unwrap();
        let texts: [&[u8]; 2] = [br#"{"a":1}"#, br#"{"b":"x"}"#];
        let body = sink.batch_body(texts.into_iter());
        let text = String::from_utf8(body).unwrap();
        assert!(
            text.starts_with(r#"{"batch":[{"a":1},{"b":"x"}],"sentAt":""#),
            "{text}"
        );
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        // What the tree it replaced would have written, byte for byte.
        assert_eq!(serde_json::to_string(&value).unwrap(), text);
        assert!(value["sentAt"].as_str().unwrap().ends_with('Z'));
        let empty = sink.batch_body(std::iter::empty());
        assert!(String::from_utf8(empty)
            .unwrap()
            .starts_with(r#"{"batch":[],"sentAt""#));
    }

    #[tokio::test]
    async fn an_unreachable_server_is_retried() {
        // Port 9 (discard) on loopback: nothing listens in the test environment.
        let sink = WebhookSink::new(&config("timeout = \"2s\"")).unwrap();
        let d = Delivery {
            seq: 1,
            event_id: edge_agent::model::EventId(1),
            profile_id: 0,
            body: json!({}),
        };
        assert!(matches!(sink.send(&[d]).await, SendOutcome::Retry { .. }));
    }
}
