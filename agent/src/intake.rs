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
use crate::consent::{change_properties, ConsentBook, ConsentChange, ConsentPolicy, ConsentUpdate};
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

/// What erasing a user did on this agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Purged {
    /// Queued events removed.
    pub events: u64,
    /// Whether a consent record was forgotten.
    pub consent: bool,
    /// Whether audience membership was forgotten.
    pub audiences: bool,
    /// Devices that remembered the user and start over with a new anonymous id.
    pub devices: usize,
}

/// The identity a device currently acts under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CurrentIdentity {
    User(String),
    Anonymous(String),
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
                        inc.event.lane = self.route(&inc.event).into();
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

    /// Erases what this agent holds of `user_id` (a data subject request carried out
    /// upstream): its queued events (by user id or anonymous id), its consent record,
    /// and the device memory of it, all in one commit. Under the intake lock, so no
    /// event of that user admitted before the purge can be committed after it.
    /// Idempotent: a second purge finds nothing more.
    pub async fn purge_user(&self, user_id: &str) -> Result<Purged, SpoolError> {
        let (receiver, consent, devices) = {
            let mut st = self.state.lock().await;
            let consent = st.consent.forget(user_id);
            let devices = st.enricher.forget_user(user_id);
            let dirty = st.enricher.take_dirty();
            (
                self.spool.enqueue_purge_user(user_id, dirty).await?,
                consent,
                devices,
            )
        };
        let purge = receiver.await.map_err(|_| SpoolError::Closed)??;
        Ok(Purged {
            events: purge.events,
            consent,
            audiences: purge.audiences,
            devices,
        })
    }

    /// Who uses `device` now (this agent's own device when `None` or outside fleet
    /// mode): the user id it remembers, else its anonymous id; `None` when the device
    /// has not sent an event yet (or its user was erased and nothing came since).
    pub async fn current_identity(&self, device: Option<&str>) -> Option<CurrentIdentity> {
        let st = self.state.lock().await;
        let state = st.enricher.state_of(device)?;
        match (&state.user_id, &state.anonymous_id) {
            (Some(user), _) => Some(CurrentIdentity::User(user.clone())),
            (None, Some(anonymous)) => Some(CurrentIdentity::Anonymous(anonymous.clone())),
            (None, None) => None,
        }
    }

    /// Applies consent decided upstream for `subject` through the same book and commit
    /// as `PUT /v1/consent`: an older decision than the one held is ignored, and
    /// queued events needing a purpose it revokes are purged in the same commit.
    /// Returns whether anything changed. No consent event goes back upstream: the
    /// decision came from there.
    pub async fn set_consent(
        &self,
        subject: &str,
        update: ConsentUpdate,
    ) -> Result<bool, SpoolError> {
        let receiver = {
            let mut st = self.state.lock().await;
            let Some(change) = st.consent.apply(subject, &update) else {
                return Ok(false);
            };
            let req = AppendRequest {
                consent: vec![change],
                ..AppendRequest::default()
            };
            self.spool.enqueue_append(req).await?
        };
        receiver.await.map_err(|_| SpoolError::Closed)??;
        Ok(true)
    }

    fn consent_event(&self, change: &ConsentChange, cause: &Event, now: i64) -> Event {
        let mut e = Event::new(EventKind::Consent, Source::Agent, now);
        e.timestamp_ms = cause.timestamp_ms;
        e.identities = cause.identities.clone();
        e.properties = change_properties(change);
        e.lane = self.route(&e).into();
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::model::{EventKind, Map, Source};
    use crate::Agent;

    const CONFIG: &str = r#"
        [agent]
        device_id = "tv-1"
        [consent]
        unknown = "grant"
        purposes = [{ name = "analytics" }]
        [[consent.rules]]
        types = ["track"]
        purposes = ["analytics"]
    "#;

    fn open(dir: &Path) -> Agent {
        let config = AgentConfig::parse(CONFIG, Path::new("agent.toml")).unwrap();
        Agent::open(config, dir).unwrap()
    }

    fn track(user: Option<&str>, anonymous: Option<&str>, name: &str) -> Incoming {
        let mut event = Event::new(EventKind::Track, Source::Local, now_ms());
        event.name = Some(name.into());
        event.identities.user_id = user.map(Into::into);
        event.identities.anonymous_id = anonymous.map(Into::into);
        Incoming {
            event,
            consent: None,
            device_hint: None,
        }
    }

    fn consent(user: &str, granted: bool, at_ms: i64) -> Incoming {
        let mut event = Event::new(EventKind::Consent, Source::Local, now_ms());
        event.identities.user_id = Some(user.into());
        Incoming {
            event,
            consent: Some(ConsentUpdate {
                purposes: vec![("analytics".into(), granted)],
                ccpa_opt_out: None,
                at_ms,
            }),
            device_hint: None,
        }
    }

    /// `(user id, anonymous id, name)` of every queued event.
    fn queued(agent: &Agent) -> Vec<(Option<String>, Option<String>, Option<String>)> {
        let mut out = Vec::new();
        agent
            .spool()
            .for_each_event(|e| {
                let ids = &e.identities;
                out.push((
                    ids.user_id.as_deref().map(str::to_owned),
                    ids.anonymous_id.as_deref().map(str::to_owned),
                    e.name.as_deref().map(str::to_owned),
                ));
                Ok(())
            })
            .unwrap();
        out
    }

    #[tokio::test]
    async fn purging_a_user_removes_its_events_consent_and_memory_once_and_durably() {
        let dir = tempfile::tempdir().unwrap();
        let agent = open(dir.path());
        agent
            .submit(vec![
                track(Some("u-keep"), None, "keep-1"),
                consent("u-erase", true, 1),
                track(Some("u-erase"), None, "erase-1"),
                track(Some("u-erase"), None, "erase-2"),
                track(Some("u-keep"), None, "keep-2"),
                track(Some("u-erase"), None, "erase-3"),
                // Last: the device remembers this anonymous id for later events.
                track(None, Some("u-erase"), "erase-anonymous"),
            ])
            .await
            .unwrap();
        assert_eq!(queued(&agent).len(), 7, "six tracks and the consent event");

        let purged = agent.intake.purge_user("u-erase").await.unwrap();
        assert_eq!(purged.events, 5, "four tracks and the consent event");
        assert!(purged.consent);
        assert_eq!(purged.devices, 1, "tv-1 remembered u-erase last");
        let left = queued(&agent);
        assert_eq!(
            left.iter()
                .map(|l| l.2.as_deref().unwrap())
                .collect::<Vec<_>>(),
            ["keep-1", "keep-2"]
        );
        assert!(left.iter().all(|l| l.1.as_deref() != Some("u-erase")));
        assert_eq!(agent.spool().check().unwrap(), Vec::<String>::new());
        assert_eq!(agent.spool().stats().drops.total(), 0, "not a drop");

        let again = agent.intake.purge_user("u-erase").await.unwrap();
        assert_eq!((again.events, again.consent, again.devices), (0, false, 0));
        let erasures = agent.spool().erasures();
        assert_eq!((erasures.purges, erasures.events), (2, 5));

        // The device no longer carries the erased user into later events.
        agent.track("later", None, Map::new()).await.unwrap();
        let later = queued(&agent).pop().unwrap();
        assert_eq!(later.0, None);
        agent.spool().close().await;
        drop(agent);

        let agent = open(dir.path());
        let erasures = agent.spool().erasures();
        assert_eq!((erasures.purges, erasures.events), (2, 5), "persisted");
        let st = agent.intake.state.lock().await;
        assert!(st.consent.get("u-erase").is_none(), "consent record gone");
        drop(st);
        agent
            .track("after-restart", None, Map::new())
            .await
            .unwrap();
        assert_eq!(queued(&agent).pop().unwrap().0, None);
        agent.spool().close().await;
    }

    fn audiences(version: u64, user: &str, names: &[&str]) -> crate::wire::AudienceUpdate {
        crate::wire::AudienceUpdate {
            version,
            user_id: user.into(),
            audiences: names.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    #[tokio::test]
    async fn audience_updates_are_durable_idempotent_and_erased_with_the_user() {
        use crate::audiences::{Applied, AudienceApplyError, AudienceError};
        let dir = tempfile::tempdir().unwrap();
        let agent = open(dir.path());
        let spool = agent.spool();
        assert_eq!(
            spool
                .apply_audiences(audiences(3, "u-erase", &["b", "a"]), 10)
                .await,
            Ok(Applied::Replaced { evicted: 0 })
        );
        assert_eq!(
            spool
                .apply_audiences(audiences(3, "u-erase", &["x"]), 11)
                .await,
            Ok(Applied::Stale { held: 3 }),
            "a resend of the same version"
        );
        spool
            .apply_audiences(audiences(5, "u-keep", &["c"]), 12)
            .await
            .unwrap();
        let too_many: Vec<String> = (0..=crate::audiences::MAX_AUDIENCES_PER_USER)
            .map(|i| format!("a{i}"))
            .collect();
        let refused = crate::wire::AudienceUpdate {
            version: 9,
            user_id: "u-keep".into(),
            audiences: too_many,
        };
        assert!(matches!(
            spool.apply_audiences(refused, 13).await,
            Err(AudienceApplyError::Refused(AudienceError::TooMany { .. }))
        ));
        let held = spool.audiences("u-erase").unwrap().unwrap();
        assert_eq!(
            (held.version, held.audiences.clone()),
            (3, vec!["a".to_owned(), "b".to_owned()])
        );
        assert_eq!(held.updated_ms, 10);
        let summary = spool.audience_summary();
        assert_eq!(
            (summary.users, summary.version),
            (2, 5),
            "the refused v9 changed nothing"
        );

        let purged = agent.intake.purge_user("u-erase").await.unwrap();
        assert!(purged.audiences);
        assert_eq!(spool.audiences("u-erase").unwrap(), None);
        assert!(!agent.intake.purge_user("u-erase").await.unwrap().audiences);
        spool.close().await;
        drop(agent);

        // A crash-free reopen reads it all back from the file.
        let agent = open(dir.path());
        let summary = agent.spool().audience_summary();
        assert_eq!(
            (summary.users, summary.version),
            (1, 5),
            "erasure keeps the version"
        );
        assert_eq!(agent.spool().audiences("u-erase").unwrap(), None);
        assert_eq!(
            agent
                .spool()
                .audiences("u-keep")
                .unwrap()
                .unwrap()
                .audiences,
            ["c"]
        );
        agent.spool().close().await;
    }

    #[tokio::test]
    async fn an_applied_update_survives_a_drop_without_close() {
        let dir = tempfile::tempdir().unwrap();
        let agent = open(dir.path());
        agent
            .spool()
            .apply_audiences(audiences(1, "u1", &["a"]), 1)
            .await
            .unwrap();
        // No close: as far as the file knows, the process died after the commit.
        drop(agent);
        let agent = open(dir.path());
        assert_eq!(
            agent.spool().audiences("u1").unwrap().unwrap().audiences,
            ["a"]
        );
        assert_eq!(agent.spool().audience_summary().version, 1);
    }

    #[tokio::test]
    async fn the_current_identity_is_the_remembered_user_else_the_anonymous_id() {
        let dir = tempfile::tempdir().unwrap();
        let agent = open(dir.path());
        assert_eq!(agent.intake.current_identity(None).await, None);
        agent
            .submit(vec![track(None, Some("anon-1"), "a")])
            .await
            .unwrap();
        assert_eq!(
            agent.intake.current_identity(None).await,
            Some(CurrentIdentity::Anonymous("anon-1".into()))
        );
        agent
            .submit(vec![track(Some("u1"), None, "b")])
            .await
            .unwrap();
        assert_eq!(
            agent
                .intake
                .current_identity(Some("ignored-outside-fleet-mode"))
                .await,
            Some(CurrentIdentity::User("u1".into()))
        );
        agent.spool().close().await;
    }

    #[tokio::test]
    async fn consent_from_upstream_purges_what_it_revokes_and_older_decisions_lose() {
        let dir = tempfile::tempdir().unwrap();
        let agent = open(dir.path());
        agent
            .submit(vec![
                track(Some("u1"), None, "a"),
                track(Some("u1"), None, "b"),
                track(Some("u2"), None, "c"),
            ])
            .await
            .unwrap();
        let revoke = ConsentUpdate {
            purposes: vec![("analytics".into(), false)],
            ccpa_opt_out: None,
            at_ms: 10,
        };
        assert!(agent
            .intake
            .set_consent("u1", revoke.clone())
            .await
            .unwrap());
        assert!(
            !agent.intake.set_consent("u1", revoke).await.unwrap(),
            "the same decision again changes nothing"
        );
        let older = ConsentUpdate {
            purposes: vec![("analytics".into(), true)],
            ccpa_opt_out: None,
            at_ms: 5,
        };
        assert!(!agent.intake.set_consent("u1", older).await.unwrap());
        assert_eq!(agent.spool().stats().drops.consent_purged, 2);
        assert_eq!(
            queued(&agent)
                .iter()
                .map(|l| l.2.as_deref().unwrap())
                .collect::<Vec<_>>(),
            ["c"],
            "no consent event goes back upstream"
        );
        let accepted = agent
            .submit(vec![track(Some("u1"), None, "d")])
            .await
            .unwrap();
        assert_eq!(accepted.denied, 1, "u1 revoked analytics");
        agent.spool().close().await;
    }
}
