//! Per-destination decisions, pure: does this event go there, and exactly which bytes.

use crate::config::DestinationConfig;
use crate::profiles::Routed;

/// A destination's filters, consent requirements and minimization, compiled once.
#[derive(Debug, Clone)]
pub struct Route {
    _private: (),
}

impl Route {
    pub fn new(_config: &DestinationConfig) -> Self {
        todo!("route: new")
    }

    /// The Segment-spec JSON this destination receives for `routed`, or `None` when
    /// filters or consent keep it out.
    pub fn render(&self, _routed: &Routed) -> Option<serde_json::Value> {
        todo!("route: render")
    }
}
