//! Membership changes → versioned `AudienceUpdate`s for the members' devices.
//!
//! A consumer of the audience change log, like an audience destination: for every
//! change it queues, for each device the profile was seen on and each id the device
//! knows the user by (customer ids, else anonymous ids), the user's full audience set
//! on the durable downlink queue ([`Downlinks`]: sent while connected, again after a
//! reconnect, removed on the device's PUBACK; a newer set replaces one still waiting).
//!
//! The version of an update is the change's log position, so it only grows for every
//! user of every device. Per device the gateway keeps the newest version it queued and
//! which users it sent; a hello whose `audiences_version` is older (an agent that lost
//! its store, or a queue that overflowed) gets every user's current set again.
//!
//! | table (gateway store)     | key                 | value                     |
//! |---------------------------|---------------------|---------------------------|
//! | `device_audience_users`   | `(device, user id)` | profile id                |
//! | `device_audience_version` | device              | newest version queued     |

use std::sync::Arc;
use std::time::Duration;

use edge_agent::model::DeviceId;
use edge_agent::wire::{AudienceUpdate, Downlink};
use redb::{ReadableTable, TableDefinition};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::engine::Audiences;
use super::MembershipChange;
use crate::downlink::Downlinks;
use crate::store::{Store, StoreError, R};

/// Consumer name of the device side in the change log.
pub const CONSUMER: &str = "@devices";

const USERS: TableDefinition<(&str, &str), u64> = TableDefinition::new("device_audience_users");
const VERSIONS: TableDefinition<&str, u64> = TableDefinition::new("device_audience_version");

/// Changes read per step.
const READ_BATCH: usize = 500;
/// Pause after a failed step.
const RETRY: Duration = Duration::from_millis(500);
/// Most users re-sent to one device by a hello.
const MAX_RESYNC_USERS: usize = 1000;

/// The device side of audiences.
#[derive(Debug)]
pub struct DeviceAudiences {
    pub store: Arc<Store>,
    pub audiences: Arc<Audiences>,
    pub downlinks: Arc<Downlinks>,
}

/// The user ids a device knows a profile by: its customer ids, else its anonymous ids.
fn user_ids(identities: &[(String, String)]) -> Vec<&str> {
    let of = |kind: &str| -> Vec<&str> {
        identities
            .iter()
            .filter(|(t, _)| t == kind)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let customers = of("customer_id");
    if customers.is_empty() {
        of("anonymous_id")
    } else {
        customers
    }
}

/// Senders that are not devices (server-side sources, feeds) hold no memberships.
fn is_device(id: &str) -> bool {
    !(id.starts_with("source:") || id.starts_with("feed:"))
}

impl DeviceAudiences {
    /// Follows the change log until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut cursor = match self.store.load_cursor(CONSUMER) {
            Ok(Some(bytes)) => postcard::from_bytes::<u64>(&bytes).unwrap_or(0),
            Ok(None) => 0,
            Err(e) => {
                warn!(error = %e, "Cannot read the device audience cursor; starting over.");
                0
            }
        };
        // This consumer never reads the inbox: it must not hold it back.
        self.store.set_done(CONSUMER, u64::MAX);
        self.audiences.set_changes_done(CONSUMER, cursor);
        let mut head = self.audiences.changes_head();
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            match self.step(cursor).await {
                Ok(Some(through)) => {
                    cursor = through;
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(error = %e, "Audience updates for devices failed; retrying.");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(RETRY) => {}
                    }
                    continue;
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = head.changed() => if changed.is_err() { shutdown.cancelled().await; return; },
            }
        }
    }

    /// Queues the updates of the next changes after `cursor`; the new cursor, or
    /// `None` when there were none.
    async fn step(&self, cursor: u64) -> Result<Option<u64>, StoreError> {
        let changes = self.audiences.read_changes(cursor, READ_BATCH)?;
        let Some(last) = changes.last().map(|c| c.seq) else {
            return Ok(None);
        };
        for change in &changes {
            self.deliver(change).await?;
        }
        let state = postcard::to_stdvec(&last).map_err(|e| StoreError::Storage(e.to_string()))?;
        self.store.save_cursor(CONSUMER, state, u64::MAX).await?;
        self.audiences.set_changes_done(CONSUMER, last);
        Ok(Some(last))
    }

    /// Queues `change`'s full set for every (device, user id) it concerns and records
    /// them for hello re-syncs.
    async fn deliver(&self, change: &MembershipChange) -> Result<(), StoreError> {
        let users: Vec<String> = user_ids(&change.identities)
            .into_iter()
            .map(str::to_owned)
            .collect();
        let devices: Vec<String> = change
            .devices
            .iter()
            .filter(|d| is_device(d))
            .cloned()
            .collect();
        if users.is_empty() || devices.is_empty() {
            return Ok(());
        }
        for device in &devices {
            for user in &users {
                let update = Downlink::Audiences(AudienceUpdate {
                    version: change.seq,
                    user_id: user.clone(),
                    audiences: change.audiences_now.clone(),
                });
                if let Err(e) = self
                    .downlinks
                    .queue(&DeviceId(device.clone()), update)
                    .await
                {
                    // The next hello finds the device behind and re-sends everything.
                    warn!(device = %device, error = %e, "Audience update not queued; the device re-syncs at its next hello.");
                }
            }
        }
        let (profile, version) = (change.profile_id, change.seq);
        self.store
            .apply(move |txn| {
                let mut t = txn.open_table(USERS).st()?;
                let mut v = txn.open_table(VERSIONS).st()?;
                for device in &devices {
                    for user in &users {
                        t.insert((device.as_str(), user.as_str()), profile).st()?;
                    }
                    let newest = v.get(device.as_str()).st()?.map_or(0, |x| x.value());
                    v.insert(device.as_str(), newest.max(version)).st()?;
                }
                Ok(())
            })
            .await?;
        debug!(seq = change.seq, audience = %change.audience, "Audience change queued for devices.");
        Ok(())
    }

    /// The newest audience version queued for `device` (0: none).
    pub fn latest_version(&self, device: &DeviceId) -> Result<u64, StoreError> {
        self.store.read(|r| match r.open_table(VERSIONS) {
            Ok(t) => Ok(t.get(device.0.as_str()).st()?.map_or(0, |v| v.value())),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(e).st(),
        })
    }

    /// A hello from `device` stating `agent_version`: when it is behind what was
    /// queued, queues every known user's current set again (the newest version, so
    /// the agent takes each). Returns the version for the hello reply.
    pub async fn on_hello(&self, device: &DeviceId, agent_version: u64) -> Result<u64, StoreError> {
        let latest = self.latest_version(device)?;
        if agent_version >= latest {
            return Ok(latest);
        }
        let d = device.0.clone();
        let users: Vec<(String, u64)> = self.store.read(|r| match r.open_table(USERS) {
            Ok(t) => {
                let mut out = Vec::new();
                for row in t.range((d.as_str(), "")..).st()?.take(MAX_RESYNC_USERS) {
                    let (k, v) = row.st()?;
                    let (dev, user) = k.value();
                    if dev != d {
                        break;
                    }
                    out.push((user.to_owned(), v.value()));
                }
                Ok(out)
            }
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(Vec::new()),
            Err(e) => Err(e).st(),
        })?;
        info!(device = %device, agent_version, latest, users = users.len(), "Device behind on audiences; re-sending its users' sets.");
        for (user, profile) in users {
            let audiences = self.audiences.audiences_of(profile)?;
            let update = Downlink::Audiences(AudienceUpdate {
                version: latest,
                user_id: user,
                audiences,
            });
            self.downlinks.queue(device, update).await?;
        }
        Ok(latest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(t, v)| ((*t).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_device_knows_a_user_by_customer_id_else_by_anonymous_id() {
        let both = ids(&[
            ("anonymous_id", "a1"),
            ("customer_id", "c1"),
            ("email", "e"),
        ]);
        assert_eq!(user_ids(&both), ["c1"]);
        let anonymous = ids(&[("anonymous_id", "a1"), ("anonymous_id", "a2")]);
        assert_eq!(user_ids(&anonymous), ["a1", "a2"]);
        assert!(user_ids(&ids(&[("email", "e")])).is_empty());
    }

    #[test]
    fn sources_and_feeds_are_not_devices() {
        assert!(is_device("phone-1"));
        assert!(!is_device("source:web"));
        assert!(!is_device("feed:push"));
    }
}
