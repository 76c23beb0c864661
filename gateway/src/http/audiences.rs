//! Admin calls on audiences: sizes, members, why a profile is (not) in one, and a
//! sweep on demand. Authorization is checked by the router before any of these.

use hyper::StatusCode;
use tracing::info;

use super::reply::{json, ApiError, Reply};
use super::Admin;

/// Members listed per call unless `limit` says otherwise, and at most.
const DEFAULT_MEMBERS: usize = 1_000;
const MAX_MEMBERS: usize = 10_000;

impl Admin {
    /// `GET /v1/audiences`: every audience with its size, in config order.
    pub(super) fn audiences(&self) -> Result<Reply, ApiError> {
        Ok(json(StatusCode::OK, &self.audiences.sizes()?))
    }

    /// `GET /v1/audiences/{name}/members?after=&limit=`: members in profile id order;
    /// `next_after` pages on (absent on the last page).
    pub(super) fn audience_members(&self, name: &str, query: &str) -> Result<Reply, ApiError> {
        let mut after = 0u64;
        let mut limit = DEFAULT_MEMBERS;
        for (key, value) in query.split('&').filter_map(|kv| kv.split_once('=')) {
            match key {
                "after" => {
                    after = value.parse().map_err(|_| {
                        ApiError::bad_request(format!("after: `{value}` is not a profile id"))
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
        let limit = limit.clamp(1, MAX_MEMBERS);
        let members = self
            .audiences
            .members(name, after, limit)?
            .ok_or_else(|| no_audience(name))?;
        let next_after = (members.len() == limit)
            .then(|| members.last().map(|m| m.profile_id))
            .flatten();
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({
                "audience": name,
                "members": members,
                "next_after": next_after,
            }),
        ))
    }

    /// `GET /v1/audiences/{name}/why/{type}/{value}`: the condition tree with each
    /// clause's outcome for the profile holding that identifier.
    pub(super) async fn audience_why(
        &self,
        name: &str,
        id_type: &str,
        value: &str,
    ) -> Result<Reply, ApiError> {
        self.profiles
            .settle_reads(super::admin::PROFILE_READ_WAIT)
            .await;
        let profile = self.profiles.lookup(id_type, value)?.ok_or_else(|| {
            ApiError::not_found(format!("no profile has identifier {id_type} `{value}`"))
        })?;
        let why = self
            .audiences
            .explain(name, profile.id)?
            .ok_or_else(|| no_audience(name))?;
        Ok(json(StatusCode::OK, &why))
    }

    /// `POST /v1/audiences/sweep`: re-evaluates time-bound audiences now.
    pub(super) async fn audience_sweep(&self) -> Result<Reply, ApiError> {
        let report = self.audiences.sweep().await?;
        info!(
            profiles = report.profiles,
            changes = report.changes,
            elapsed_ms = report.elapsed_ms,
            "Audience sweep run on request."
        );
        Ok(json(StatusCode::OK, &report))
    }
}

fn no_audience(name: &str) -> ApiError {
    ApiError::not_found(format!("no audience `{name}`"))
}
