//! Audience destinations: HTTP add/remove calls, snapshot files, PostgreSQL table.

use std::sync::Arc;

use crate::config::DestinationConfig;
use crate::dest::{DestContext, DestStats};

/// Starts the audience destination `config` on `tasks`.
pub fn spawn(
    config: DestinationConfig,
    _ctx: DestContext,
    stats: Arc<DestStats>,
    _tasks: &tokio_util::task::TaskTracker,
    _shutdown: tokio_util::sync::CancellationToken,
) {
    stats.set_error(&format!(
        "audience destination `{}`: not implemented yet",
        config.name
    ));
}
