//! The local HTTP API server: accept loop, connection cap, timeouts, graceful stop.
//!
//! Request handling lives in [`routes`]; this module only owns sockets and tasks.

mod auth;
mod query;
mod reply;
mod routes;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

pub use routes::Api;

/// Pause after a failed `accept` (e.g. out of file descriptors) before retrying.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `api` on `listener` until `shutdown`, then lets in-flight requests finish
/// (up to the configured drain timeout). New requests on open connections get 503
/// once shutdown has begun.
pub async fn serve(listener: TcpListener, api: Arc<Api>, shutdown: CancellationToken) {
    let permits = Arc::new(Semaphore::new(api.limits().max_connections));
    let tracker = TaskTracker::new();
    let stopping = Arc::new(AtomicBool::new(false));
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    warn!(error = %e, "Accept failed; retrying.");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let api = Arc::clone(&api);
        let token = shutdown.clone();
        let stopping = Arc::clone(&stopping);
        tracker.spawn(async move {
            let _permit = permit;
            let header_timeout = api.limits().header_timeout;
            let service = service_fn(move |req| {
                let api = Arc::clone(&api);
                let stopping = stopping.load(Ordering::Relaxed);
                async move { Ok::<_, Infallible>(api.handle(req, stopping).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = token.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "Connection closed with an error.");
            }
        });
    }
    stopping.store(true, Ordering::Relaxed);
    tracker.close();
    let deadline = tokio::time::sleep(api.limits().drain_timeout);
    tokio::select! {
        () = tracker.wait() => {}
        () = deadline => warn!(open = tracker.len(), "Shutdown deadline passed with requests still open."),
    }
}
