//! The intake: validate → consent → enrich → route → spool, for every entry point
//! (HTTP APIs, the embedding Rust API, `edge-agent send`).
//!
//! Decisions are taken under one lock and enqueued to the spool in the same order,
//! so a revocation's purge can never be overtaken by an event admitted under the
//! old consent. The lock is released before waiting for the commit.

use std::sync::Arc;

use tokio::sync::Mutex;
use tracing::debug;

use crate::config::{AgentConfig, RouteConfig};
use crate::consent::{change_properties, ConsentBook, ConsentChange, ConsentPolicy};
use crate::enrich::Enricher;
use crate::ingest::Incoming;
use crate::model::{now_ms, Event, EventKind, Source};
use crate::spool::{AppendRequest, Recovered, Spool, SpoolError};

/// Result of one accepted submission.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    /// Events durably queued (including generated consent events).
    pub stored: usize,
    /// Events refused for lack of consent.
    pub denied: u64,
    /// Consent changes recorded.
    pub consent_changes: usize,
}

#[derive(Debug)]
struct State {
    enricher: Enricher,
    consent: ConsentBook,
}

/// Entry point for events into the agent.
#[derive(Debug)]
pub struct Intake {
    state: Mutex<State>,
    spool: Arc<Spool>,
    routes: Vec<RouteConfig>,
    default_lane: String,
}

impl Intake {
    pub fn new(config: &AgentConfig, spool: Arc<Spool>, recovered: Recovered) -> Self {
        let policy = ConsentPolicy::new(config.consent.clone());
        Intake {
            state: Mutex::new(State {
                enricher: Enricher::new(
                    recovered.device_id,
                    config.agent.fleet,
                    &config.enrich,
                    recovered.devices,
                ),
                consent: ConsentBook::new(policy, recovered.consent),
            }),
            spool,
            routes: config.spool.routes.clone(),
            default_lane: config.spool.default_lane.clone(),
        }
    }

    pub fn spool(&self) -> &Arc<Spool> {
        &self.spool
    }

    /// This agent's own device id.
    pub async fn device_id(&self) -> String {
        self.state.lock().await.enricher.own_device().0.clone()
    }

    /// Takes parsed events through consent and enrichment into the spool; returns
    /// after the durable commit. An incoming `consent` event (from `PUT /v1/consent`)
    /// only carries its update: it is stored if it changed something.
    pub async fn submit(&self, incoming: Vec<Incoming>) -> Result<Accepted, SpoolError> {
        let now = now_ms();
        let (receiver, accepted) = {
            let mut st = self.state.lock().await;
            let mut req = AppendRequest::default();
            for mut inc in incoming {
                st.enricher.enrich(&mut inc, now);
                let subject = inc.event.consent_subject().to_owned();
                if let Some(update) = &inc.consent {
                    if let Some(change) = st.consent.apply(&subject, update) {
                        let mut event = self.consent_event(&change, &inc.event, now);
                        event.consent = st.consent.policy().snapshot(Some(&change.state));
                        req.events.push(event);
                        req.consent.push(change);
                    }
                }
                if inc.event.kind == EventKind::Consent {
                    continue;
                }
                let state = st.consent.get(&subject);
                match st.consent.policy().check(state, &inc.event) {
                    Ok(()) => {
                        inc.event.consent = st.consent.policy().snapshot(state);
                        inc.event.lane = self.route(&inc.event).to_owned();
                        req.events.push(inc.event);
                    }
                    Err(denied) => {
                        debug!(purpose = %denied.purpose, kind = inc.event.kind.as_str(), "Event dropped: consent not granted.");
                        req.denied += 1;
                    }
                }
            }
            req.devices = st.enricher.take_dirty();
            let accepted = Accepted {
                stored: req.events.len(),
                denied: req.denied,
                consent_changes: req.consent.len(),
            };
            (self.spool.enqueue_append(req).await?, accepted)
        };
        receiver.await.map_err(|_| SpoolError::Closed)??;
        Ok(accepted)
    }

    fn consent_event(&self, change: &ConsentChange, cause: &Event, now: i64) -> Event {
        let mut e = Event::new(EventKind::Consent, Source::Agent, now);
        e.timestamp_ms = cause.timestamp_ms;
        e.identities = cause.identities.clone();
        e.properties = change_properties(change);
        e.lane = self.route(&e).to_owned();
        e
    }

    /// The lane of the first matching route, else the default lane.
    fn route(&self, e: &Event) -> &str {
        self.routes
            .iter()
            .find(|r| {
                (r.types.is_empty() || r.types.iter().any(|t| t == e.kind.as_str()))
                    && (r.names.is_empty()
                        || e.name
                            .as_deref()
                            .is_some_and(|n| r.names.iter().any(|x| x == n)))
            })
            .map_or(self.default_lane.as_str(), |r| r.lane.as_str())
    }
}
