//! Admin calls: devices, profiles (lookup, DSR erase), destinations (status, dead
//! letters, replay). Authorization is checked by the router before any of these.

use edge_agent::model::DeviceId;
use edge_agent::wire::{Control, Downlink};
use hyper::StatusCode;
use tracing::{info, warn};

use super::reply::{json, ApiError, Reply};
use super::Admin;

/// Dead letters listed per call unless `limit` says otherwise, and at most.
const DEFAULT_DEAD_LETTERS: usize = 100;
const MAX_DEAD_LETTERS: usize = 1_000;
/// Longest a profile lookup waits for the changes of events already resolved to be
/// flushed (normally a few milliseconds; longer only while the stage is failing).
pub(super) const PROFILE_READ_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl Admin {
    /// `GET /v1/devices/{id}`
    /// `POST /v1/clock?advance=<duration>` (only with `gateway.test_clock`): moves the
    /// gateway's clock forward, so tests let time windows pass without sleeping.
    pub(super) fn advance_clock(&self, query: &str) -> Result<Reply, ApiError> {
        if !self.test_clock {
            return Err(ApiError::not_found(
                "the clock can be moved only with `gateway.test_clock = true`",
            ));
        }
        let text = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("advance="))
            .ok_or_else(|| ApiError::bad_request("needs `?advance=<duration>`, e.g. 2h"))?;
        let text = percent_decode(text).unwrap_or_default();
        let by = humantime::parse_duration(&text)
            .map_err(|e| ApiError::bad_request(format!("advance: `{text}`: {e}")))?;
        let offset = crate::clock::advance(i64::try_from(by.as_millis()).unwrap_or(i64::MAX));
        tracing::warn!(offset_ms = offset, "Test clock moved forward.");
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "offset_ms": offset, "now_ms": crate::clock::now_ms() }),
        ))
    }

    pub(super) fn device(&self, id: &str) -> Result<Reply, ApiError> {
        let rec = self
            .store
            .device(id)?
            .ok_or_else(|| ApiError::not_found(format!("no device `{id}`")))?;
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({
                "device_id": id,
                "connected": self.sessions.is_connected(&DeviceId(id.to_owned())),
                "last_seen_ms": rec.last_seen_ms,
                "events": rec.events,
                "duplicates": rec.duplicates,
                "rejected": rec.rejected,
                "frames_rejected": rec.frames_rejected,
                "clock_skew_ms": rec.clock_skew_ms,
                "lanes": rec.lanes.iter().map(|l| serde_json::json!({
                    "lane": l.lane, "high_water": l.high_water, "floor": l.floor,
                })).collect::<Vec<_>>(),
                "agent_drops": rec.drops.by_reason().into_iter().collect::<std::collections::BTreeMap<_, _>>(),
            }),
        ))
    }

    /// `GET /v1/profiles`: how many there are.
    pub(super) fn profile_count(&self) -> Result<Reply, ApiError> {
        let count = self.profiles.count()?;
        Ok(json(StatusCode::OK, &serde_json::json!({ "count": count })))
    }

    /// `GET /v1/profiles/{type}/{value}`: the profile as of every event resolved
    /// before the call.
    pub(super) async fn profile(&self, id_type: &str, value: &str) -> Result<Reply, ApiError> {
        self.profiles.settle_reads(PROFILE_READ_WAIT).await;
        match self.profiles.lookup(id_type, value)? {
            Some(view) => Ok(json(StatusCode::OK, &view)),
            None => Err(no_profile(id_type, value)),
        }
    }

    /// `DELETE /v1/profiles/{type}/{value}`: GDPR erasure (profile, identity links,
    /// queued events, dead letters, audience memberships), then a `PurgeUser` to every device that held the
    /// user, for each of the user's ids.
    pub(super) async fn erase(&self, id_type: &str, value: &str) -> Result<Reply, ApiError> {
        let erased = self
            .profiles
            .erase(&self.store, id_type, value)
            .await?
            .ok_or_else(|| no_profile(id_type, value))?;
        // The profile is gone already from here on: a failure below is reported in the
        // answer, not as an error status, which would make the caller retry an erase
        // that now finds nothing.
        // Leaving its audiences is logged as changes, so outputs and devices drop it.
        let (audiences_left, audience_error) = match self.audiences.erase(erased.profile_id).await {
            Ok(n) => (Some(n), None),
            Err(e) => {
                warn!(profile = erased.profile_id, error = %e, "Could not remove an erased profile from its audiences.");
                (None, Some(e.to_string()))
            }
        };
        let (dead_letters_removed, dead_letter_error) = match self.destinations.erase(&erased).await
        {
            Ok(n) => (Some(n), None),
            Err(e) => {
                warn!(profile = erased.profile_id, error = %e, "Could not remove an erased profile's dead letters.");
                (None, Some(e.to_string()))
            }
        };
        let mut queued = 0u64;
        let mut failed = Vec::new();
        // Server-side sources hold nothing: only agents get a purge.
        for device in erased
            .devices
            .iter()
            .filter(|d| !d.0.starts_with("source:"))
        {
            for user_id in &erased.user_ids {
                let message = Downlink::Control(Control::PurgeUser {
                    user_id: user_id.clone(),
                });
                match self.downlinks.queue(device, message).await {
                    Ok(()) => queued += 1,
                    Err(e) => {
                        warn!(device = %device.0, error = %e, "Could not queue a user purge for a device.");
                        failed
                            .push(serde_json::json!({"device": device.0, "error": e.to_string()}));
                    }
                }
            }
        }
        info!(
            profile = erased.profile_id,
            devices = erased.devices.len(),
            purges = queued,
            "Profile erased."
        );
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({
                "erased": erased.profile_id,
                "identities": erased.identities,
                "queued_removed": erased.queued_removed,
                "devices": erased.devices.iter().map(|d| d.0.as_str()).collect::<Vec<_>>(),
                "purges_queued": queued,
                "purge_errors": failed,
                "dead_letters_removed": dead_letters_removed,
                "dead_letter_error": dead_letter_error,
                "audiences_left": audiences_left,
                "audience_error": audience_error,
            }),
        ))
    }

    /// `GET /v1/destinations`
    pub(super) fn destinations(&self) -> Reply {
        json(StatusCode::OK, &self.destinations.status())
    }

    /// `GET /v1/destinations/{name}/dead-letters?after=&limit=`
    pub(super) fn dead_letters(&self, name: &str, query: &str) -> Result<Reply, ApiError> {
        let mut after = 0u64;
        let mut limit = DEFAULT_DEAD_LETTERS;
        for (key, value) in query.split('&').filter_map(|kv| kv.split_once('=')) {
            match key {
                "after" => {
                    after = value.parse().map_err(|_| {
                        ApiError::bad_request(format!("after: `{value}` is not a dead-letter id"))
                    })?;
                }
                "limit" => {
                    limit = value.parse().map_err(|_| {
                        ApiError::bad_request(format!("limit: `{value}` is not a count"))
                    })?;
                }
                _ => {}
            }
        }
        let letters = self
            .destinations
            .dead_letters(name, after, limit.min(MAX_DEAD_LETTERS))
            .ok_or_else(|| no_destination(name))??;
        Ok(json(StatusCode::OK, &letters))
    }

    /// `POST /v1/destinations/{name}/replay`
    pub(super) async fn replay(&self, name: &str) -> Result<Reply, ApiError> {
        let n = self
            .destinations
            .replay(name)
            .await
            .ok_or_else(|| no_destination(name))??;
        info!(destination = name, replayed = n, "Dead letters replayed.");
        Ok(json(StatusCode::OK, &serde_json::json!({ "replayed": n })))
    }
}

fn no_profile(id_type: &str, value: &str) -> ApiError {
    ApiError::not_found(format!("no profile has identifier {id_type} `{value}`"))
}

fn no_destination(name: &str) -> ApiError {
    ApiError::not_found(format!("no destination `{name}`"))
}

/// Decodes `%XX` escapes of one path segment (identifier values are often emails or
/// carry `/`); `None` when an escape is broken or the result is not UTF-8.
pub(super) fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_percent_decoded_and_broken_escapes_refused() {
        assert_eq!(
            percent_decode("ada%40example.com").as_deref(),
            Some("ada@example.com")
        );
        assert_eq!(percent_decode("a%2Fb").as_deref(), Some("a/b"));
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
        assert_eq!(percent_decode("bad%4"), None);
        assert_eq!(percent_decode("bad%zz"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
