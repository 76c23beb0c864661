//! The audience engine: a consumer of the resolved event log with its own redb file
//! (`audiences.redb`) and cursor, like a destination.
//!
//! For every resolved event it updates the profile's audience state (occurrences for
//! `did` clauses, a snapshot of the attributes and consent the conditions read),
//! evaluates the audiences, and appends every membership change to a change log in the
//! same commit as its cursor. A sweep every `gateway.audience_sweep` re-evaluates the
//! audiences that change with time alone. Outputs (destinations, devices) read the
//! change log from their own cursors.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{AudienceSize, Member, MembershipChange};
use crate::config::GatewayConfig;
use crate::profiles::Profiles;
use crate::store::{Store, StoreError};

/// File name of the audience store inside the data dir.
pub const AUDIENCES_FILE: &str = "audiences.redb";

/// Name under which the engine holds inbox entries ([`Store::set_done`]).
pub const STAGE_NAME: &str = "@audiences";

/// What one sweep did.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct SweepReport {
    pub profiles: u64,
    pub changes: u64,
    pub elapsed_ms: u64,
}

/// Handle to the audience engine.
#[derive(Debug)]
pub struct Audiences {
    _private: (),
}

impl Audiences {
    /// Opens (creating or recovering) `audiences.redb`; the audiences are compiled
    /// from `config` (already validated).
    pub fn open(_path: &Path, _config: &GatewayConfig) -> Result<Self, StoreError> {
        todo!("audiences: open")
    }

    /// Consumes the resolved log and sweeps on schedule until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        _store: Arc<Store>,
        _profiles: Arc<Profiles>,
        _shutdown: CancellationToken,
    ) {
        todo!("audiences: run")
    }

    /// Watches the newest committed position of the membership change log.
    pub fn changes_head(&self) -> watch::Receiver<u64> {
        todo!("audiences: changes_head")
    }

    /// Up to `max` membership changes after log position `after`, in order.
    pub fn read_changes(
        &self,
        _after: u64,
        _max: usize,
    ) -> Result<Vec<MembershipChange>, StoreError> {
        todo!("audiences: read_changes")
    }

    /// Records that consumer `name` (an audience destination, or
    /// [`super::devices::CONSUMER`]) no longer needs changes at or below `through`;
    /// the log is pruned below every registered consumer's mark.
    pub fn set_changes_done(&self, _name: &str, _through: u64) {
        todo!("audiences: set_changes_done")
    }

    /// Members of `audience` with profile id above `after_profile`, at most `max`, in
    /// profile id order. `None`: no such audience.
    pub fn members(
        &self,
        _audience: &str,
        _after_profile: u64,
        _max: usize,
    ) -> Result<Option<Vec<Member>>, StoreError> {
        todo!("audiences: members")
    }

    /// Every configured audience with its current size, in config order.
    pub fn sizes(&self) -> Result<Vec<AudienceSize>, StoreError> {
        todo!("audiences: sizes")
    }

    /// The audiences profile `profile_id` is in now.
    pub fn audiences_of(&self, _profile_id: u64) -> Result<Vec<String>, StoreError> {
        todo!("audiences: audiences_of")
    }

    /// Why profile `profile_id` is or is not in `audience`: the condition tree with
    /// each clause's outcome. `Ok(None)`: no such audience.
    pub fn explain(
        &self,
        _audience: &str,
        _profile_id: u64,
    ) -> Result<Option<serde_json::Value>, StoreError> {
        todo!("audiences: explain")
    }

    /// Re-evaluates every profile against the audiences that change with time alone.
    pub async fn sweep(&self) -> Result<SweepReport, StoreError> {
        todo!("audiences: sweep")
    }

    /// Erasure: the profile leaves every audience (changes logged, so outputs remove
    /// it) and its audience state is deleted.
    pub async fn erase(&self, _profile_id: u64) -> Result<u64, StoreError> {
        todo!("audiences: erase")
    }
}
