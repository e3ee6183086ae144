//! The accept loop: warp's filters served on our own listener, so that every
//! accepted socket gets TCP_NODELAY (warp 0.4 sets none, and small frames then
//! wait ~40 ms for delayed ACKs), counts against its address's connection
//! limit (one over it is closed at accept) and the relay's (taken before
//! accept), has a deadline for its request headers, and can be upgraded to a
//! WebSocket with small buffers.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info};

use super::Relay;
use super::conn_io::StallLimit;
use super::metrics::Metrics;
use super::routes::{ConnInfo, routes};

/// How long shutdown waits for sessions and requests to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How often retention runs at most: every hour, or a tenth of the
/// retention if that is shorter (at least every second).
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// A relay served by a background task (tests, the bench, the harness).
/// Dropping it starts the graceful shutdown without waiting for it.
pub struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Serves `relay` on `listener` in a new task.
    pub fn spawn(relay: Arc<Relay>, listener: TcpListener) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(relay, listener, async {
            let _ = stopped.await;
        }));
        Self {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Shuts down gracefully and waits, at most `within`, for it to finish.
    pub async fn stop(mut self, within: Duration) -> Result<(), String> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => tokio::time::timeout(within, task)
                .await
                .map_err(|_| format!("the relay did not stop within {within:?}"))?
                .map_err(|e| format!("the relay task failed: {e}")),
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Serves `relay` on `listener` until `shutdown` resolves, then stops accepting,
/// closes sessions with 1001, lets in-flight requests and commits finish, and
/// returns.
pub async fn serve(relay: Arc<Relay>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let (stop, stopped) = watch::channel(false);
    let filter = routes(Arc::clone(&relay));
    let background = tokio::spawn(housekeeping(Arc::clone(&relay), stopped.clone()));
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "relay listening");
    }
    tokio::pin!(shutdown);
    // Taken before accept (as mini-redis does): at the cap, the relay stops
    // accepting until a connection closes, instead of holding ever more sockets.
    let capacity = Arc::new(tokio::sync::Semaphore::new(
        relay.config.limits.max_connections.max(1),
    ));
    let header_timeout = relay.config.limits.header_timeout;
    let request_timeout = relay.config.limits.request_timeout;
    // Past a WebSocket session's own slow-reader limit, so that a session
    // gets to close with 4008 first; an HTTP answer has no other.
    let stall = relay
        .config
        .limits
        .slow_reader_timeout
        .max(Duration::from_secs(1))
        + Duration::from_secs(5);
    let mut backoff = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&capacity).acquire_owned() => permit.expect("never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        backoff = Duration::from_millis(5);
        // Over its address's limit, a connection is closed at once: it holds
        // nothing of the relay's, not even a socket.
        // A trusted proxy carries many clients: it is not limited per address.
        let proxied = relay
            .config
            .trusted_proxies
            .iter()
            .any(|net| net.contains(&peer.ip().to_canonical()));
        let guard = if proxied {
            None
        } else {
            let Some(guard) = relay.connections.try_acquire(peer.ip()).map(Arc::new) else {
                relay.metrics().breach("connections_per_ip");
                drop(stream);
                continue;
            };
            Some(guard)
        };
        let _ = stream.set_nodelay(true);
        let relay = Arc::clone(&relay);
        let filter = filter.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let _permit = permit;
            Metrics::inc(&relay.metrics().connections);
            let for_requests = stopped.clone();
            let for_service = Arc::clone(&relay);
            let service = service_fn(move |req| {
                handle(
                    req,
                    peer,
                    guard.clone(),
                    Arc::clone(&for_service),
                    for_requests.clone(),
                    filter.clone(),
                    request_timeout,
                )
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(
                    TokioIo::new(StallLimit::new(
                        stream,
                        stall,
                        Arc::clone(&relay.hub.metrics),
                    )),
                    service,
                )
                .with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = stopped.changed() => {
                    // Finish the request in flight, then close.
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            Metrics::dec(&relay.metrics().connections);
        });
    }
    drop(listener);
    info!("shutting down: no new connections; closing sessions");
    let _ = stop.send(true);
    // HTTP connections finish their request in flight; sessions (on their own
    // tasks after the upgrade) close with 1001. Wait for both, within the grace.
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    let busy = |m: &Metrics| {
        m.sessions.load(std::sync::atomic::Ordering::Relaxed)
            + m.connections.load(std::sync::atomic::Ordering::Relaxed)
    };
    while busy(relay.metrics()) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    background.abort();
    info!("relay stopped");
}

/// Serves the operator's metrics (`/metrics`, `/healthz`) on its own
/// listener, until the task is dropped or aborted.
pub async fn serve_metrics(relay: Arc<Relay>, listener: TcpListener) {
    let filter = super::routes::metrics_routes(Arc::clone(&relay));
    let header_timeout = relay.config.limits.header_timeout;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let service = TowerToHyperService::new(warp::service(filter.clone()));
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One HTTP request, handed to warp with the connection's facts in its extensions.
async fn handle<F>(
    mut req: hyper::Request<Incoming>,
    peer: SocketAddr,
    guard: Option<Arc<super::limits::ConnectionGuard>>,
    relay: Arc<Relay>,
    shutdown: watch::Receiver<bool>,
    filter: F,
    deadline: Duration,
) -> Result<warp::reply::Response, std::convert::Infallible>
where
    F: warp::Filter<Extract = (warp::reply::Response,), Error = std::convert::Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
{
    use super::edge::{self, OriginCheck};
    let client = edge::client_ip(
        peer.ip(),
        req.headers(),
        &relay.config.trusted_proxies,
        relay.config.forwarded_header,
    );
    let origins_checked = !relay.config.allowed_origins.is_empty();
    let origin = match edge::check_origin(req.headers(), &relay.config.allowed_origins) {
        OriginCheck::Native => None,
        OriginCheck::Allowed(origin) if edge::is_preflight(req.method(), req.headers()) => {
            return Ok(edge::preflight(origin));
        }
        OriginCheck::Allowed(origin) => Some(origin),
        OriginCheck::Refused(origin) => {
            info!(%origin, %client, path = req.uri().path(), "refused a browser origin that is not allowed (--allowed-origin)");
            relay.metrics().breach("origin");
            let mut refused = super::routes::error(
                crate::protocol::ErrorCode::Forbidden,
                "this browser origin is not allowed by the relay (its operator lists allowed ones with --allowed-origin)",
            );
            edge::vary(&mut refused);
            return Ok(refused);
        }
    };
    let upgrade = if req.uri().path() == "/ws" {
        Some(hyper::upgrade::on(&mut req))
    } else {
        None
    };
    // Through a trusted proxy the connection took no per-address slot: a
    // session takes one for the client the proxy named, for its lifetime.
    let guard = match guard {
        Some(guard) => Some(guard),
        None if upgrade.is_some() => match relay.connections.try_acquire(client) {
            Some(slot) => Some(Arc::new(slot)),
            None => {
                relay.metrics().breach("connections_per_ip");
                return Ok(super::routes::error(
                    crate::protocol::ErrorCode::RateLimited,
                    "too many connections from this address",
                ));
            }
        },
        None => None,
    };
    req.extensions_mut().insert(ConnInfo {
        peer,
        client,
        guard,
        upgrade: Arc::new(Mutex::new(upgrade)),
        shutdown,
    });
    let service = TowerToHyperService::new(warp::service(filter));
    let mut answer =
        match tokio::time::timeout(deadline, hyper::service::Service::call(&service, req)).await {
            Ok(answer) => answer?,
            Err(_) => super::routes::error(
                crate::protocol::ErrorCode::Timeout,
                "the request did not arrive in time",
            ),
        };
    if let Some(origin) = origin {
        edge::allow(&mut answer, origin);
    } else if origins_checked {
        edge::vary(&mut answer);
    }
    Ok(answer)
}

/// Compares what the store holds with `--max-db-mib`, and refuses or
/// accepts publishes accordingly.
async fn check_budget(relay: &Relay) {
    let budget = relay.config.max_store_bytes;
    if budget == 0 {
        return;
    }
    match relay.hub.store.stored_bytes().await {
        Ok(bytes) => {
            let full = bytes >= budget;
            if relay.hub.set_storage_full(full) {
                if full {
                    tracing::warn!(
                        bytes,
                        budget,
                        "the store holds its whole budget (--max-db-mib): publishes and new channels are refused until retention frees room"
                    );
                } else {
                    info!(
                        bytes,
                        budget, "the store is under its budget again: publishes are accepted"
                    );
                }
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot measure the store"),
    }
}

/// Retention and pairing-slot expiry, until shutdown.
async fn housekeeping(relay: Arc<Relay>, mut stopped: watch::Receiver<bool>) {
    let every = (relay.config.limits.retention / 10).clamp(Duration::from_secs(1), PRUNE_EVERY);
    let mut prune = tokio::time::interval(every);
    let mut sweep = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = stopped.changed() => return,
            _ = prune.tick() => {
                let before = super::hub::unix_now().saturating_sub(relay.config.limits.retention.as_secs());
                match relay.hub.store.prune(before).await {
                    Ok(0) => {}
                    Ok(removed) => info!(removed, "retention: deleted expired envelopes"),
                    Err(e) => tracing::error!(error = %e, "retention failed"),
                }
                relay.claims.tick().await;
                relay.creations.tick().await;
            }
            _ = sweep.tick() => {
                relay.slots.tick().await;
                check_budget(&relay).await;
            }
        }
    }
}
