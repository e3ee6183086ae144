//! The relay: routes and stores opaque envelopes between the devices of each
//! channel, and carries pairing messages between an inviter and a joiner. It
//! never sees plaintext, MLS secrets, code secrets or device names.
//!
//! - [`config`]: limits and settings with their defaults.
//! - [`store`]: the durable state behind the [`store::Store`] trait (SQLite, memory).
//! - [`hub`]: publish path, recent-envelope cache, cross-session wake-up ([`hub::Notifier`]).
//! - [`session`]: one device's WebSocket session.
//! - [`pairing`]: pairing slots and their mailbox.
//! - [`routes`]: the HTTP routes, as warp filters.
//! - [`server`]: the accept loop (TCP_NODELAY, per-address limits, WebSocket
//!   upgrades with small buffers, graceful shutdown).
//! - [`limits`], [`metrics`]: per-address limits; Prometheus metrics.
//! - [`wakeups`]: a group commit's wake-ups, once per channel per commit.
//!
//! The wire protocol is documented in [`crate::protocol`].

pub mod config;
pub mod conn_io;
pub mod edge;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod pairing;
#[cfg(feature = "postgres")]
pub mod pg;
pub mod routes;
pub mod server;
pub mod session;
pub mod store;
pub mod wakeups;

use std::sync::Arc;
use std::time::Duration;

use self::config::RelayConfig;
use self::hub::{Hub, LocalNotifier, Notifier, store_error};
use self::limits::{ConnectionLimiter, Limiter, RateLimiter};
use self::metrics::Metrics;
use self::pairing::{Mailbox, Slots};
use self::store::Store;
use crate::protocol::{Credentials, ErrorCode, Refusal};

/// Everything a running relay shares across connections.
pub struct Relay {
    /// Store, notifier, cache, metrics.
    pub hub: Hub,
    /// Settings and limits.
    pub config: RelayConfig,
    /// Open pairing slots.
    pub slots: Arc<dyn Mailbox>,
    /// Open connections per address (this node's own sockets).
    pub connections: Arc<ConnectionLimiter>,
    /// Pairing claims per address.
    pub claims: Arc<dyn Limiter>,
    /// Channel creations per address.
    pub creations: Arc<dyn Limiter>,
}

/// What the nodes of a relay share besides the store: wake-ups, the pairing
/// mailbox and per-address rate limits. [`Relay::with_notifier`] makes
/// in-process ones; `pg::shared` (feature `postgres`) makes ones that every
/// node sees.
pub struct Shared {
    /// Cross-session wake-up.
    pub notifier: Arc<dyn Notifier>,
    /// The pairing mailbox.
    pub slots: Arc<dyn Mailbox>,
    /// Pairing claims per address.
    pub claims: Arc<dyn Limiter>,
    /// Channel creations per address.
    pub creations: Arc<dyn Limiter>,
}

impl Shared {
    /// `notifier`, with an in-process mailbox and limits, for one node.
    pub fn local(
        notifier: Arc<dyn Notifier>,
        config: &RelayConfig,
        metrics: &Arc<Metrics>,
    ) -> Self {
        let limits = &config.limits;
        Self {
            notifier,
            slots: Arc::new(Slots::new(
                limits.pairing_ttl,
                limits.slot_bounds(),
                Arc::clone(metrics),
            )),
            claims: Arc::new(RateLimiter::new(
                limits.claims_per_minute,
                Duration::from_secs(60),
            )),
            creations: Arc::new(RateLimiter::new(
                limits.channels_per_hour,
                Duration::from_secs(3600),
            )),
        }
    }
}

impl Relay {
    /// A relay over `store`, with in-process wake-ups.
    pub fn new(store: Arc<dyn Store>, config: RelayConfig) -> Arc<Self> {
        Self::with_notifier(store, Arc::new(LocalNotifier::default()), config)
    }

    /// A relay over `store` and `notifier`, with an in-process mailbox and limits.
    pub fn with_notifier(
        store: Arc<dyn Store>,
        notifier: Arc<dyn Notifier>,
        config: RelayConfig,
    ) -> Arc<Self> {
        let metrics = Arc::new(Metrics::default());
        let shared = Shared::local(notifier, &config, &metrics);
        Self::from_parts(store, shared, metrics, config)
    }

    /// A relay over `store` and what it shares with other nodes; `metrics`
    /// is the one the shared parts count into.
    pub fn from_parts(
        store: Arc<dyn Store>,
        shared: Shared,
        metrics: Arc<Metrics>,
        config: RelayConfig,
    ) -> Arc<Self> {
        let limits = &config.limits;
        Arc::new(Self {
            hub: Hub::new(
                store,
                shared.notifier,
                metrics,
                limits.max_envelope_bytes,
                limits.channel_quota_bytes,
            ),
            slots: shared.slots,
            connections: ConnectionLimiter::new(limits.max_connections_per_ip),
            claims: shared.claims,
            creations: shared.creations,
            config,
        })
    }

    /// The relay's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.hub.metrics
    }

    /// Checks device credentials against the store: known device, not revoked,
    /// token hash equal in constant time.
    pub async fn authenticate(&self, credentials: &Credentials) -> Result<(), Refusal> {
        let record = self
            .hub
            .store
            .device(credentials.channel, credentials.device)
            .await
            .map_err(store_error)?;
        match record {
            Some(r) if !r.revoked && r.token_hash.verify(&credentials.token) => Ok(()),
            // Only the holder of the device's token learns that it was removed.
            Some(r) if r.token_hash.verify(&credentials.token) => Err(Refusal::new(
                ErrorCode::Revoked,
                "this device was removed from the channel",
            )),
            _ => {
                Metrics::inc(&self.metrics().auth_failures);
                tracing::warn!(channel = %credentials.channel, device = %credentials.device, "request refused: unknown device, revoked, or wrong token");
                Err(Refusal::new(
                    ErrorCode::Unauthorized,
                    "unknown channel or device, revoked device, or wrong token",
                ))
            }
        }
    }
}
