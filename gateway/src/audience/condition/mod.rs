//! `[[audiences]] when` trees: compile, check, evaluate, explain.
//!
//! [`compile`] turns an audience's config into an [`Audience`]: a tree of clauses with
//! every constant parsed (ops, numbers, durations) so evaluation formats nothing and
//! allocates nothing. Errors name the audience and the clause path
//! (``audience `lapsed`: when.all[1].did.within: ...``).
//!
//! Evaluation reads a profile through [`ProfileFacts`]: attributes (computed ones
//! included), consent, and per `did` clause a [`DidState`] the caller keeps with the
//! profile (keyed by [`DidClause::id`]) and feeds with [`DidClause::matches`] and
//! [`DidState::record`]. Pure: no I/O, the caller passes `now` (ms since the epoch).

mod compile;
mod did;
mod predicate;
#[cfg(test)]
mod tests;

use std::borrow::Cow;

use edge_agent::model::Value;
use serde_json::json;

pub use compile::compile;
pub use did::{DidClause, DidId, DidState, MAX_OCCURRENCES};
use predicate::Test;

/// Deepest nesting of `all`/`any`/`not` accepted.
pub const MAX_DEPTH: usize = 16;

/// An audience definition that does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audience `{audience}`: {path}: {message}")]
pub struct ConditionError {
    /// The audience's name.
    pub audience: String,
    /// Where in the tree, e.g. `when.all[1].did.within`.
    pub path: String,
    /// What is wrong there.
    pub message: String,
}

/// What a condition may read of one profile.
pub trait ProfileFacts {
    /// The value of a profile attribute or a computed attribute (as of the `now` the
    /// audience is evaluated at); `None`: the profile has none.
    fn attribute(&self, name: &str) -> Option<Cow<'_, Value>>;
    /// Whether consent purpose `purpose` is granted.
    fn consent_granted(&self, purpose: &str) -> bool;
    /// Whether the user opted out of sale (CCPA).
    fn ccpa_opt_out(&self) -> bool;
    /// The profile's state for `clause` (look it up by [`DidClause::id`]); `None`:
    /// no occurrence recorded.
    fn did_state(&self, clause: &DidClause) -> Option<&DidState>;
}

/// A compiled audience.
#[derive(Debug, Clone, PartialEq)]
pub struct Audience {
    name: String,
    description: Option<String>,
    root: Node,
    /// The `did` clauses in tree order; `Node::Did` holds an index into it.
    did: Vec<DidClause>,
    /// Every attribute name the tree reads, each once, in tree order.
    attributes: Vec<String>,
}

/// One clause of the tree.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    All(Vec<Node>),
    Any(Vec<Node>),
    Not(Box<Node>),
    Attribute { name: Box<str>, test: Test },
    Consent(Box<str>),
    CcpaOptOut(bool),
    Did(usize),
}

impl Audience {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// The `did` clauses, in tree order ([`DidClause::index`] is the position here).
    /// Several may share an id (the same clause written twice).
    pub fn did_clauses(&self) -> &[DidClause] {
        &self.did
    }

    /// Every attribute name the condition reads (profile or computed), each once.
    pub fn attribute_names(&self) -> &[String] {
        &self.attributes
    }

    /// Whether membership can change with time alone through a `did` window (a
    /// `within` or a `before`): such audiences need the scheduled sweep. Windowed
    /// computed attributes also move with time; this module does not know which
    /// attributes are computed: see [`Audience::attribute_names`].
    pub fn depends_on_time(&self) -> bool {
        self.did.iter().any(DidClause::depends_on_time)
    }

    /// Whether the profile is in the audience at `now_ms`.
    pub fn evaluate<F: ProfileFacts + ?Sized>(&self, facts: &F, now_ms: i64) -> bool {
        self.eval(&self.root, facts, now_ms)
    }

    fn eval<F: ProfileFacts + ?Sized>(&self, node: &Node, facts: &F, now: i64) -> bool {
        match node {
            Node::All(nodes) => nodes.iter().all(|n| self.eval(n, facts, now)),
            Node::Any(nodes) => nodes.iter().any(|n| self.eval(n, facts, now)),
            Node::Not(n) => !self.eval(n, facts, now),
            Node::Attribute { name, test } => test.holds(facts.attribute(name).as_deref()),
            Node::Consent(purpose) => facts.consent_granted(purpose),
            Node::CcpaOptOut(wanted) => facts.ccpa_opt_out() == *wanted,
            Node::Did(i) => self
                .did
                .get(*i)
                .is_some_and(|c| c.holds(facts.did_state(c), now)),
        }
    }

    /// The first instant after `now_ms` at which time alone may change the outcome
    /// (an occurrence entering or leaving a `did` window); `None`: never. A sweep can
    /// skip the profile until then.
    pub fn next_change_after<F: ProfileFacts + ?Sized>(
        &self,
        facts: &F,
        now_ms: i64,
    ) -> Option<i64> {
        self.did
            .iter()
            .filter(|c| c.depends_on_time())
            .filter_map(|c| c.next_change_after(facts.did_state(c), now_ms))
            .min()
    }

    /// The tree with each clause's outcome and, for leaves, what was observed: the
    /// answer to "why is this profile (not) in the audience". Not for hot paths.
    pub fn explain<F: ProfileFacts + ?Sized>(&self, facts: &F, now_ms: i64) -> serde_json::Value {
        let (result, tree) = self.explain_node(&self.root, facts, now_ms);
        json!({
            "audience": self.name,
            "result": result,
            "at_ms": now_ms,
            "when": tree,
        })
    }

    fn explain_node<F: ProfileFacts + ?Sized>(
        &self,
        node: &Node,
        facts: &F,
        now: i64,
    ) -> (bool, serde_json::Value) {
        match node {
            Node::All(nodes) | Node::Any(nodes) => {
                let (results, clauses): (Vec<bool>, Vec<serde_json::Value>) = nodes
                    .iter()
                    .map(|n| self.explain_node(n, facts, now))
                    .unzip();
                let (kind, result) = match node {
                    Node::All(_) => ("all", results.iter().all(|r| *r)),
                    _ => ("any", results.iter().any(|r| *r)),
                };
                (
                    result,
                    json!({ kind: result, "result": result, "clauses": clauses }),
                )
            }
            Node::Not(inner) => {
                let (inner_result, clause) = self.explain_node(inner, facts, now);
                let result = !inner_result;
                (
                    result,
                    json!({ "not": result, "result": result, "clause": clause }),
                )
            }
            Node::Attribute { name, test } => {
                let observed = facts.attribute(name);
                let result = test.holds(observed.as_deref());
                let observed = observed
                    .and_then(|v| serde_json::to_value(&*v).ok())
                    .unwrap_or(serde_json::Value::Null);
                (
                    result,
                    json!({
                        "attribute": &**name,
                        "op": test.op(),
                        "value": test.value_json(),
                        "observed": observed,
                        "result": result,
                    }),
                )
            }
            Node::Consent(purpose) => {
                let result = facts.consent_granted(purpose);
                (
                    result,
                    json!({ "consent": &**purpose, "granted": result, "result": result }),
                )
            }
            Node::CcpaOptOut(wanted) => {
                let observed = facts.ccpa_opt_out();
                let result = observed == *wanted;
                (
                    result,
                    json!({ "ccpa_opt_out": wanted, "observed": observed, "result": result }),
                )
            }
            Node::Did(i) => {
                let Some(clause) = self.did.get(*i) else {
                    return (false, serde_json::Value::Null);
                };
                let state = facts.did_state(clause);
                let count = clause.count_in_window(state, now);
                let result = count >= clause.at_least;
                let from = clause.within_ms.map(|w| now.saturating_sub(w));
                (
                    result,
                    json!({
                        "did": &*clause.event,
                        "type": clause.kind.as_deref(),
                        "count_in_window": count,
                        "needed": clause.at_least,
                        "window_after_ms": from,
                        "window_until_ms": now.saturating_sub(clause.before_ms),
                        "recorded": state.map_or(0, |s| s.times().len()),
                        "result": result,
                    }),
                )
            }
        }
    }
}
