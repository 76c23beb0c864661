//! Membership changes → versioned `AudienceUpdate`s for the members' devices.
