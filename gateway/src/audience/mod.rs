//! Audiences: who belongs, kept current as events arrive and time passes, and sent
//! to audience destinations and down to the members' devices.
//!
//! - [`engine`]: the consumer of the resolved log that keeps membership and its change log.
//! - [`condition`]: the `when` tree of `[[audiences]]` compiled and checked at start
//!   (errors name the audience and the clause), evaluated against a profile at a time,
//!   and explained (which clause failed). Pure.
//! - Evaluation runs in the engine, a consumer of the resolved log after the profile
//!   stage (real time, when a profile's event arrives), and in a
//!   scheduled sweep over every profile (conditions that change with time alone).
//!   Membership lives in `audiences.redb` with entered times; every change is
//!   appended to a change log ([`MembershipChange`]) that outputs read from their own
//!   cursors.
//! - [`outputs`]: audience destinations (HTTP add/remove, snapshot files, PostgreSQL
//!   membership table).
//! - Devices: [`devices`] turns changes into versioned `AudienceUpdate`s on the
//!   durable downlink queue.

pub mod condition;
pub mod devices;
pub mod engine;
pub mod outputs;

use serde::Serialize;

/// One change of membership, as appended to the change log.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct MembershipChange {
    /// Position in the change log (increasing, gap-free per commit).
    pub seq: u64,
    pub audience: String,
    pub profile_id: u64,
    /// `true`: entered; `false`: left.
    pub entered: bool,
    /// Gateway time of the change, ms since the epoch.
    pub at_ms: i64,
    /// The profile's identifiers at the change `(type, value)`.
    pub identities: Vec<(String, String)>,
    /// Devices (agent ids) the profile was seen on.
    pub devices: Vec<String>,
    /// Every audience the profile is in after this change (full set).
    pub audiences_now: Vec<String>,
}

/// One member of an audience.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Member {
    pub profile_id: u64,
    pub entered_ms: i64,
    pub identities: Vec<(String, String)>,
}

/// Size of one audience.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AudienceSize {
    pub name: String,
    pub description: Option<String>,
    pub members: u64,
}
