//! Destinations: each reads the inbox from its own durable cursor and delivers.
//! Same shape for every kind: a `*Config` (in [`crate::config`]), a task with
//! `run(self, shutdown)`, and its tests.

pub mod file;
pub mod segment_json;
