//! Identity resolution and profiles: the stage after the inbox.
//!
//! Its own redb file (`profiles.redb`) with its own writer, so resolving never waits
//! on the receive path's commits. The stage reads the inbox in order after its cursor,
//! resolves each event's identifiers to a profile (merging when an event links two,
//! never across different values of a unique type), updates attributes, computed
//! attributes and consent, and writes per inbox seq the [`Enrichment`] destinations
//! attach — all with its cursor in one commit.
//!
//! Destinations read [`Profiles::read_routed`]: inbox records up to the resolved head,
//! each with its enrichment. Erased profiles' events are gone from both.

use std::path::Path;
use std::sync::Arc;

use edge_agent::model::{DeviceId, Value};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::GatewayConfig;
use crate::store::{InboxRecord, Store, StoreError};

/// File name of the profile store inside the data dir.
pub const PROFILES_FILE: &str = "profiles.redb";

/// Name under which the profile stage holds inbox entries ([`Store::set_done`]).
pub const STAGE_NAME: &str = "@profiles";

/// A profile's consent as last stated by its user.
#[derive(Debug, Clone, PartialEq, Default, Serialize, serde::Deserialize)]
pub struct ProfileConsent {
    /// Purposes granted (declared names).
    pub granted: Vec<String>,
    /// Purposes explicitly denied.
    pub denied: Vec<String>,
    pub ccpa_opt_out: bool,
    /// When this state was stated (event time), ms since the epoch; 0 = never.
    pub updated_ms: i64,
}

/// What the profile stage decided for one event, as of the moment it was resolved.
#[derive(Debug, Clone, PartialEq, Default, Serialize, serde::Deserialize)]
pub struct Enrichment {
    pub profile_id: u64,
    /// The profile's identifiers `(type, value)` (all types; destinations cut them to
    /// their allowlist).
    pub identities: Vec<(String, String)>,
    /// Profile attributes and computed attributes named by some destination's
    /// `attributes` allowlist (only those: nothing else is kept per event).
    pub attributes: Vec<(String, Value)>,
    pub consent: ProfileConsent,
}

/// An inbox record ready for destinations.
#[derive(Debug, Clone, PartialEq)]
pub struct Routed {
    /// Inbox seq.
    pub seq: u64,
    pub record: InboxRecord,
    pub enrichment: Enrichment,
}

/// A page of [`Routed`] records.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RoutedPage {
    /// Every inbox seq up to here was looked at (events erased meanwhile are skipped):
    /// the cursor to save once `events` are delivered.
    pub through: u64,
    pub events: Vec<Routed>,
}

/// A profile as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct ProfileView {
    pub id: u64,
    pub identities: Vec<(String, String)>,
    pub attributes: Vec<(String, Value)>,
    pub computed: Vec<(String, Value)>,
    pub consent: ProfileConsent,
    /// Devices (agent ids) the profile's events came from.
    pub devices: Vec<String>,
    /// Profiles merged into this one.
    pub merged_from: Vec<u64>,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub events: u64,
}

/// What an erase removed, for the caller to propagate.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Erased {
    pub profile_id: u64,
    pub identities: Vec<(String, String)>,
    /// Devices that held the user: each gets a `PurgeUser` per entry of `user_ids`.
    pub devices: Vec<DeviceId>,
    /// The user's customer ids and anonymous ids, as agents know them.
    pub user_ids: Vec<String>,
    /// Queued events (inbox, not yet delivered) removed.
    pub queued_removed: u64,
}

/// Handle to the profile store and its stage.
#[derive(Debug)]
pub struct Profiles {
    _private: (),
}

impl Profiles {
    /// Opens (creating or recovering) `profiles.redb` at `path`.
    pub fn open(_path: &Path, _config: &GatewayConfig) -> Result<Self, StoreError> {
        todo!("profiles: open")
    }

    /// Resolves inbox records until `shutdown`.
    pub async fn run(self: Arc<Self>, _store: Arc<Store>, _shutdown: CancellationToken) {
        todo!("profiles: run")
    }

    /// Watches the highest inbox seq resolved (and committed).
    pub fn resolved(&self) -> watch::Receiver<u64> {
        todo!("profiles: resolved")
    }

    /// Up to `max` resolved records after inbox seq `after`, with their enrichment.
    pub fn read_routed(
        &self,
        _store: &Store,
        _after: u64,
        _max: usize,
    ) -> Result<RoutedPage, StoreError> {
        todo!("profiles: read_routed")
    }

    /// The profile holding identifier `(id_type, value)`, if any.
    pub fn lookup(&self, _id_type: &str, _value: &str) -> Result<Option<ProfileView>, StoreError> {
        todo!("profiles: lookup")
    }

    /// A profile by id (following merges to the survivor).
    pub fn get(&self, _profile_id: u64) -> Result<Option<ProfileView>, StoreError> {
        todo!("profiles: get")
    }

    /// Profiles stored.
    pub fn count(&self) -> Result<u64, StoreError> {
        todo!("profiles: count")
    }

    /// GDPR erasure of the profile holding `(id_type, value)`: the profile, its
    /// identity links, and its queued inbox events are deleted. Serialized with the
    /// stage, so no event of the user is being resolved meanwhile.
    pub async fn erase(
        &self,
        _store: &Store,
        _id_type: &str,
        _value: &str,
    ) -> Result<Option<Erased>, StoreError> {
        todo!("profiles: erase")
    }
}
