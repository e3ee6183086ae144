//! Several relay nodes on one PostgreSQL database (feature `postgres`).
//!
//! - [`PgStore`](crate::relay::store::postgres::PgStore): the durable state.
//! - [`bus`]: wake-ups between nodes (`LISTEN`/`NOTIFY`): a session on node B
//!   hears of an envelope stored through node A, and a revocation closes the
//!   removed device's sessions on every node.
//! - [`mailbox`]: pairing slots every node sees, so a code shown through one
//!   node is claimed through another.
//! - [`limits`]: per-address rate limits (pairing claims, channel creations)
//!   counted across nodes. Connection limits stay per node: they protect
//!   that node's sockets.
//!
//! What a node keeps only in memory: its sessions, the cache of recent
//! envelopes it stored itself (readers fall back to the database for any
//! gap), the held-back senders of a full storage budget, and its metrics.

pub mod bus;
pub mod limits;
pub mod mailbox;

use std::sync::Arc;
use std::time::Duration;

use self::bus::PgBus;
use self::limits::PgLimiter;
use self::mailbox::PgMailbox;
use super::Shared;
use super::config::RelayConfig;
use super::metrics::Metrics;
use super::store::StoreError;
use super::store::postgres::PgStore;

/// Wake-ups, mailbox and rate limits shared through `store`'s database.
pub async fn shared(
    store: &Arc<PgStore>,
    config: &RelayConfig,
    metrics: &Arc<Metrics>,
) -> Result<Shared, StoreError> {
    let limits = &config.limits;
    let pool = store.pool().clone();
    let bus = PgBus::start(store.target().clone(), Arc::clone(store) as _).await?;
    Ok(Shared {
        notifier: Arc::clone(&bus) as _,
        slots: Arc::new(PgMailbox::new(
            pool.clone(),
            bus,
            limits.pairing_ttl,
            limits.slot_bounds(),
            Arc::clone(metrics),
        )),
        claims: Arc::new(PgLimiter::new(
            pool.clone(),
            "claims",
            limits.claims_per_minute,
            Duration::from_secs(60),
        )),
        creations: Arc::new(PgLimiter::new(
            pool,
            "channels",
            limits.channels_per_hour,
            Duration::from_secs(3600),
        )),
    })
}

/// A relay node on `store`'s database.
pub async fn relay(
    store: Arc<PgStore>,
    config: RelayConfig,
) -> Result<Arc<super::Relay>, StoreError> {
    let metrics = Arc::new(Metrics::default());
    let shared = shared(&store, &config, &metrics).await?;
    Ok(super::Relay::from_parts(store, shared, metrics, config))
}
