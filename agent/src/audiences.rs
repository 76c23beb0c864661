//! Audience membership held on the device: what the gateway sends down
//! ([`AudienceUpdate`]), checked here before anything is stored.
//!
//! Pure checks and types, no I/O: the spool stores the records (table `audiences`,
//! see `spool::audiences`), the uplink applies updates, the HTTP API reads them.
//! Everything that reaches the spool went through [`check`], so the stored data is
//! bounded whatever the gateway (or an attacker holding its topic) sends.

use serde::{Deserialize, Serialize};

use crate::wire::AudienceUpdate;

/// Most users whose membership a device keeps; past it the least recently updated
/// user is forgotten (the gateway sends it again when it changes).
pub const MAX_USERS: usize = 10_000;
/// Most audiences one user may be in; a larger update is refused as a whole (keeping
/// part of a set would answer wrongly for the rest).
pub const MAX_AUDIENCES_PER_USER: usize = 1_000;
/// Longest audience name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Longest user id, in bytes (ids are redb keys and HTTP query values).
pub const MAX_USER_ID_BYTES: usize = 512;

/// Bounds on what the device stores; [`AudienceLimits::default`] is the product's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudienceLimits {
    pub max_users: usize,
    pub max_per_user: usize,
    pub max_name_bytes: usize,
}

impl Default for AudienceLimits {
    fn default() -> Self {
        AudienceLimits {
            max_users: MAX_USERS,
            max_per_user: MAX_AUDIENCES_PER_USER,
            max_name_bytes: MAX_NAME_BYTES,
        }
    }
}

/// Why an update from the gateway was refused. Sending it again cannot help, so the
/// uplink acknowledges it anyway (and logs this). Messages leave the user id out:
/// they end up in logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AudienceError {
    /// Version 0 means "nothing applied" in the hello; no update may carry it.
    #[error("audience update with version 0")]
    ZeroVersion,
    /// The user id is empty or longer than [`MAX_USER_ID_BYTES`].
    #[error("audience update: user id of {len} bytes (must be 1..={MAX_USER_ID_BYTES})")]
    UserId { len: usize },
    /// More audiences than the per-user cap.
    #[error("audience update with {count} audiences, over the cap of {max}")]
    TooMany { count: usize, max: usize },
    /// An audience name is empty or over the name cap.
    #[error("audience update with an audience name of {len} bytes (must be 1..={max})")]
    Name { len: usize, max: usize },
}

/// Why [`Spool::apply_audiences`](crate::spool::Spool::apply_audiences) did not apply
/// an update.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AudienceApplyError {
    /// The update breaks a cap or carries no identity; it can never be applied, so
    /// it is acknowledged (not retried) and the device keeps what it had.
    #[error(transparent)]
    Refused(#[from] AudienceError),
    /// The commit failed; nothing changed, and the update should come again.
    #[error(transparent)]
    Storage(crate::spool::SpoolError),
}

/// An update that passed [`check`]: its audiences sorted and without duplicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedUpdate {
    pub version: u64,
    pub user_id: String,
    pub audiences: Vec<String>,
}

/// One user's membership as stored (postcard; field order is the stored encoding).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AudienceRecord {
    /// Version of the update this came from.
    pub version: u64,
    /// Sorted, without duplicates.
    pub audiences: Vec<String>,
    /// Agent wall clock when it was applied, ms since the epoch.
    pub updated_ms: i64,
    /// Position in the order of applied updates (device-wide counter); the lowest is
    /// the least recently updated user, evicted first. A counter rather than the
    /// wall clock, which may jump on devices without a real-time clock.
    pub order: u64,
}

/// Device-wide state of the table, kept in `meta` in the same commit as the records.
/// Field order is the stored encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AudienceSummary {
    /// Users with a record.
    pub users: u64,
    /// Newest version ever applied (what the hello reports); 0 for none. Never goes
    /// down, not even when that user is purged or evicted: the gateway must not
    /// resend what the device saw.
    pub version: u64,
    /// Next value of [`AudienceRecord::order`].
    pub next_order: u64,
}

/// What applying a checked update did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The user's membership is now the update's; `evicted` other users were
    /// forgotten to stay under the user cap.
    Replaced { evicted: u64 },
    /// The device holds this version or a newer one for the user; nothing changed.
    Stale { held: u64 },
}

/// Checks an update against `limits`; sorts and deduplicates its audiences.
pub fn check(
    update: AudienceUpdate,
    limits: &AudienceLimits,
) -> Result<CheckedUpdate, AudienceError> {
    let AudienceUpdate {
        version,
        user_id,
        mut audiences,
    } = update;
    if user_id.is_empty() || user_id.len() > MAX_USER_ID_BYTES {
        return Err(AudienceError::UserId { len: user_id.len() });
    }
    if version == 0 {
        return Err(AudienceError::ZeroVersion);
    }
    if audiences.len() > limits.max_per_user {
        return Err(AudienceError::TooMany {
            count: audiences.len(),
            max: limits.max_per_user,
        });
    }
    if let Some(bad) = audiences
        .iter()
        .find(|a| a.is_empty() || a.len() > limits.max_name_bytes)
    {
        return Err(AudienceError::Name {
            len: bad.len(),
            max: limits.max_name_bytes,
        });
    }
    audiences.sort_unstable();
    audiences.dedup();
    Ok(CheckedUpdate {
        version,
        user_id,
        audiences,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(version: u64, user: &str, audiences: &[&str]) -> AudienceUpdate {
        AudienceUpdate {
            version,
            user_id: user.into(),
            audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    #[test]
    fn a_checked_update_is_sorted_and_deduplicated() {
        let c = check(
            update(3, "u1", &["b", "a", "b"]),
            &AudienceLimits::default(),
        )
        .unwrap();
        assert_eq!(c.audiences, ["a", "b"]);
        assert_eq!((c.version, c.user_id.as_str()), (3, "u1"));
    }

    #[test]
    fn an_empty_set_is_a_valid_update() {
        let c = check(update(1, "u1", &[]), &AudienceLimits::default()).unwrap();
        assert!(c.audiences.is_empty());
    }

    #[test]
    fn updates_past_the_caps_or_without_identity_are_refused() {
        let limits = AudienceLimits {
            max_users: 10,
            max_per_user: 2,
            max_name_bytes: 4,
        };
        assert!(matches!(
            check(update(1, "u", &["a", "b", "c"]), &limits),
            Err(AudienceError::TooMany { count: 3, max: 2 })
        ));
        assert!(matches!(
            check(update(1, "u", &["abcde"]), &limits),
            Err(AudienceError::Name { len: 5, .. })
        ));
        assert!(matches!(
            check(update(1, "u", &[""]), &limits),
            Err(AudienceError::Name { len: 0, .. })
        ));
        assert!(matches!(
            check(update(1, "", &[]), &limits),
            Err(AudienceError::UserId { len: 0 })
        ));
        let long = "x".repeat(MAX_USER_ID_BYTES + 1);
        assert!(matches!(
            check(update(1, &long, &[]), &limits),
            Err(AudienceError::UserId { .. })
        ));
        assert!(matches!(
            check(update(0, "u", &[]), &limits),
            Err(AudienceError::ZeroVersion)
        ));
    }
}
