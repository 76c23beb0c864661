//! Membership changes → versioned `AudienceUpdate`s for the members' devices.

/// Consumer name of the device side in the change log.
pub const CONSUMER: &str = "@devices";
