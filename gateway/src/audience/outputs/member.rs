//! What of a member leaves the gateway: its profile id (a gateway-internal number that
//! names nobody, so a receiver can match a remove to its add even when no identity is
//! allowed) and only the identity types of the destination's `identities` allowlist
//! (data minimization). Pure.

use serde_json::{Map, Value};

/// Identity types sent when a destination has no `identities` allowlist.
pub const DEFAULT_IDENTITIES: [&str; 2] = ["customer_id", "email"];

/// The identity types a destination may send, in allowlist order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowlist(Vec<String>);

impl Allowlist {
    /// From the destination's `identities` key (`None`: [`DEFAULT_IDENTITIES`]).
    pub fn new(identities: Option<&[String]>) -> Self {
        Allowlist(match identities {
            Some(list) => list.to_vec(),
            None => DEFAULT_IDENTITIES.iter().map(|s| (*s).to_owned()).collect(),
        })
    }

    pub fn types(&self) -> &[String] {
        &self.0
    }

    pub fn allows(&self, identity_type: &str) -> bool {
        self.0.iter().any(|t| t == identity_type)
    }

    /// The values of `identity_type` the profile holds, if the type may leave.
    pub fn values<'a>(
        &self,
        identities: &'a [(String, String)],
        identity_type: &str,
    ) -> Vec<&'a str> {
        if !self.allows(identity_type) {
            return Vec::new();
        }
        identities
            .iter()
            .filter(|(t, _)| t == identity_type)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The member as an audience API expects it: `profileId`, then each allowed type
    /// under its Segment name (`userId`, `anonymousId`, `email`; other types keep
    /// theirs); one value as a string, several (a non-unique type) as an array.
    pub fn api_member(&self, profile_id: u64, identities: &[(String, String)]) -> Value {
        let mut out = Map::new();
        out.insert("profileId".into(), Value::from(profile_id));
        for t in &self.0 {
            let values = self.values(identities, t);
            let key = match t.as_str() {
                "customer_id" => "userId",
                "anonymous_id" => "anonymousId",
                other => other,
            };
            if let Some(v) = one_or_many(&values) {
                out.insert(key.to_owned(), v);
            }
        }
        Value::Object(out)
    }

    /// The member as a snapshot row: `profile_id`, each allowed type under its own
    /// name (`null` when the profile has none), `entered_at`.
    pub fn row_member(
        &self,
        profile_id: u64,
        identities: &[(String, String)],
        entered_ms: i64,
    ) -> Value {
        let mut out = Map::new();
        out.insert("profile_id".into(), Value::from(profile_id));
        for t in &self.0 {
            let values = self.values(identities, t);
            out.insert(t.clone(), one_or_many(&values).unwrap_or(Value::Null));
        }
        out.insert(
            "entered_at".into(),
            Value::from(edge_agent::ingest::format_timestamp(entered_ms)),
        );
        Value::Object(out)
    }
}

fn one_or_many(values: &[&str]) -> Option<Value> {
    match values {
        [] => None,
        [one] => Some(Value::from(*one)),
        many => Some(Value::from(
            many.iter().map(|v| Value::from(*v)).collect::<Vec<_>>(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn ids() -> Vec<(String, String)> {
        [
            ("customer_id", "ada"),
            ("email", "ada@example.org"),
            ("anonymous_id", "a1"),
            ("anonymous_id", "a2"),
            ("device_id", "tv-1"),
        ]
        .iter()
        .map(|(t, v)| ((*t).to_owned(), (*v).to_owned()))
        .collect()
    }

    #[test]
    fn without_an_allowlist_only_customer_id_and_email_leave() {
        let allow = Allowlist::new(None);
        assert_eq!(
            allow.api_member(7, &ids()),
            json!({"profileId": 7, "userId": "ada", "email": "ada@example.org"})
        );
    }

    #[test]
    fn an_allowlist_picks_types_and_several_values_become_an_array() {
        let list = vec!["anonymous_id".to_owned(), "phone".to_owned()];
        let allow = Allowlist::new(Some(&list));
        assert_eq!(
            allow.api_member(7, &ids()),
            json!({"profileId": 7, "anonymousId": ["a1", "a2"]})
        );
        assert_eq!(
            allow.row_member(7, &ids(), 0),
            json!({"profile_id": 7, "anonymous_id": ["a1", "a2"], "phone": null,
                   "entered_at": "1970-01-01T00:00:00Z"})
        );
    }

    #[test]
    fn an_empty_allowlist_sends_the_profile_id_alone() {
        let allow = Allowlist::new(Some(&[]));
        assert_eq!(allow.api_member(9, &ids()), json!({"profileId": 9}));
    }
}
