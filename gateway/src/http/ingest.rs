//! Server-side ingest: the Segment (`/v1/track|identify|page|screen|group|alias|batch`)
//! and mParticle (`/v2/events`, `/v2/bulkevents`) endpoints for sources without an
//! agent, with the agent's parsers, status codes and error bodies.
//!
//! Events are in the inbox (committed) before the answer. This module only checks
//! credentials, parses and stamps; it keeps no state of its own (no consent book, no
//! sessions: a server-side sender states what it knows on each request).

use crate::clock::now_ms;
use bytes::Bytes;
use edge_agent::ingest::{mparticle, segment, Incoming};
use edge_agent::model::{ConsentSnapshot, DeviceId, Event, Str};
use hyper::header::HeaderMap;
use hyper::StatusCode;

use super::auth::{basic, mparticle_source, segment_source};
use super::reply::{json, with_type, ApiError, Reply};
use super::Admin;
use crate::config::SourceConfig;

/// Lane stamped on server-side events (they have no agent lane).
pub const LANE: &str = "http";

/// Segment's own per-event limit; the request as a whole is bounded by `http.max_body`.
const SEGMENT_MAX_EVENT: u64 = 32 * 1024;

/// The `sender` of a source's events in the inbox.
pub fn sender(source: &SourceConfig) -> DeviceId {
    DeviceId(format!("source:{}", source.name))
}

impl Admin {
    /// `POST /v1/{call}`; the body is already read within `http.max_body`.
    pub(super) async fn segment(
        &self,
        call: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Reply, ApiError> {
        // An empty Basic user is no key: the body's `writeKey` may still carry one.
        let header_key = basic(headers)
            .map(|(user, _)| user)
            .filter(|user| !user.is_empty());
        // A header key is checked before parsing; a body key only can be after.
        if let Some(key) = &header_key {
            segment_source(&self.sources, Some(key))?;
        }
        let max_body = self.config.max_body.0;
        let limits = segment::Limits {
            max_event: SEGMENT_MAX_EVENT.min(max_body),
            max_batch: max_body,
        };
        let now = now_ms();
        let parsed = segment::parse(call, &body, limits, now)?;
        let source = segment_source(
            &self.sources,
            header_key.as_deref().or(parsed.write_key.as_deref()),
        )?;
        self.store_events(source, parsed.events, now).await?;
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "success": true }),
        ))
    }

    /// `POST /v2/events` (`bulk = false`) or `/v2/bulkevents`.
    pub(super) async fn mparticle(
        &self,
        bulk: bool,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Reply, ApiError> {
        let source = mparticle_source(&self.sources, headers)?;
        let now = now_ms();
        let events = mparticle::parse(&body, bulk, self.config.max_body.0, now)?;
        self.store_events(source, events, now).await?;
        Ok(with_type(
            StatusCode::ACCEPTED,
            "application/json",
            Bytes::new(),
        ))
    }

    /// `POST /v1/feeds/{name}`: Segment-format events from a tool (one call, or
    /// `{"batch": [...]}`), `Authorization: Bearer <feed token>`. They take the same
    /// path as any event (identity, profile, audiences) and go to every destination
    /// except the tool's own (`feeds.destinations`).
    pub(super) async fn feed(
        &self,
        name: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Reply, ApiError> {
        let Some(feed) = self.feeds.iter().find(|f| f.name == name) else {
            return Err(ApiError::not_found(format!("no feed named `{name}`")));
        };
        let token = headers
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !token.is_some_and(|t| super::auth::same_secret(t, &feed.token)) {
            return Err(ApiError::unauthorized(format!(
                "feed `{name}` needs `Authorization: Bearer <its token>`"
            )));
        }
        let call = feed_call(&body)?;
        let max_body = self.config.max_body.0;
        let limits = segment::Limits {
            max_event: SEGMENT_MAX_EVENT.min(max_body),
            max_batch: max_body,
        };
        let now = now_ms();
        let parsed = segment::parse(&call, &body, limits, now)?;
        let sender = DeviceId(format!("feed:{}", feed.name));
        self.store_from(sender, parsed.events, now).await?;
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "success": true }),
        ))
    }

    async fn store_events(
        &self,
        source: &SourceConfig,
        incoming: Vec<Incoming>,
        now: i64,
    ) -> Result<(), ApiError> {
        self.store_from(sender(source), incoming, now).await
    }

    async fn store_from(
        &self,
        sender: DeviceId,
        incoming: Vec<Incoming>,
        now: i64,
    ) -> Result<(), ApiError> {
        let events: Vec<Event> = incoming.into_iter().map(|i| stamp(i, &sender)).collect();
        let receipt = self.store.ingest(sender, events, now).await?;
        self.counters
            .record_ingest(receipt.stored, receipt.duplicates);
        Ok(())
    }
}

/// The Segment call a feed body is: `batch` when it has a `batch` array, else its
/// `type`.
fn feed_call(body: &[u8]) -> Result<String, ApiError> {
    #[derive(serde::Deserialize)]
    struct Peek {
        #[serde(rename = "type")]
        kind: Option<String>,
        batch: Option<serde::de::IgnoredAny>,
    }
    let peek: Peek = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("body is not a JSON object: {e}")))?;
    match (peek.batch, peek.kind) {
        (Some(_), _) => Ok("batch".into()),
        (None, Some(kind)) if segment::CALLS.contains(&kind.as_str()) => Ok(kind),
        (None, Some(kind)) => Err(ApiError::bad_request(format!(
            "type: `{kind}` is not one of {}",
            segment::CALLS.join(", ")
        ))),
        (None, None) => Err(ApiError::bad_request(
            "body needs a `type` or a `batch` array".to_owned(),
        )),
    }
}

/// Makes a parsed event an inbox event of `sender`: its lane, its device (the source:
/// no agent holds its data, so nothing is ever purged on a device for it), and the
/// consent the request stated.
fn stamp(incoming: Incoming, sender: &DeviceId) -> Event {
    let mut event = incoming.event;
    event.lane = LANE.into();
    event.identities.device_id = sender.clone();
    event.consent = snapshot(incoming.consent.as_ref());
    event
}

/// The consent recorded on the event: the purposes the request granted. The agent
/// maps names onto its declared purposes; the gateway has no purpose list, so names
/// are kept as sent, lowercased (purpose names match case-insensitively on agents).
fn snapshot(update: Option<&edge_agent::consent::ConsentUpdate>) -> ConsentSnapshot {
    let Some(update) = update else {
        return ConsentSnapshot::default();
    };
    let mut granted: Vec<Str> = update
        .purposes
        .iter()
        .filter(|(_, g)| *g)
        .map(|(p, _)| p.to_lowercase().into())
        .collect();
    granted.sort();
    granted.dedup();
    ConsentSnapshot {
        granted,
        ccpa_opt_out: update.ccpa_opt_out.unwrap_or(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_agent::consent::ConsentUpdate;
    use edge_agent::model::{EventKind, Source};

    #[test]
    fn stamped_events_carry_lane_source_device_and_granted_purposes() {
        let event = Event::new(EventKind::Track, Source::Segment, 5);
        let incoming = Incoming {
            event,
            consent: Some(ConsentUpdate {
                purposes: vec![
                    ("Analytics".into(), true),
                    ("advertising".into(), false),
                    ("analytics".into(), true),
                ],
                ccpa_opt_out: Some(true),
                at_ms: 5,
            }),
            device_hint: Some("roku-1".into()),
        };
        let e = stamp(incoming, &DeviceId("source:web".into()));
        assert_eq!(e.lane, "http");
        assert_eq!(e.identities.device_id.0, "source:web");
        assert_eq!(e.consent.granted, ["analytics"]);
        assert!(e.consent.ccpa_opt_out);
    }

    #[test]
    fn no_consent_stated_grants_nothing() {
        assert_eq!(snapshot(None), ConsentSnapshot::default());
    }
}
