//! Per-address limits: open connections and request rates.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::store::{BoxFuture, StoreError};

/// A per-address rate limit as the routes see it: [`RateLimiter`] in one
/// process, or `pg::PgLimiter` (feature `postgres`) counted across every node.
pub trait Limiter: Send + Sync + 'static {
    /// Records an event for `ip`; `Ok(false)` if it is over the limit.
    fn allow(&self, ip: IpAddr) -> BoxFuture<'_, Result<bool, StoreError>>;

    /// Forgets windows long over; the relay calls this with retention.
    fn tick(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// Counts open connections per client address.
pub struct ConnectionLimiter {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// Holds one connection slot for an address; frees it on drop.
pub struct ConnectionGuard {
    limiter: Arc<ConnectionLimiter>,
    ip: IpAddr,
}

impl ConnectionLimiter {
    /// A limiter allowing `max` connections per address.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for `ip`, or `None` if it has `max` open already.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<ConnectionGuard> {
        let ip = client_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(ip).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(ConnectionGuard {
            limiter: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut open = self.limiter.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// At most `per_window` events per address per window (fixed windows). Memory
/// stays bounded: expired windows are dropped whenever the map grows large.
pub struct RateLimiter {
    per_window: u32,
    window: Duration,
    seen: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl RateLimiter {
    /// A limiter allowing `per_window` events per `window`.
    pub fn new(per_window: u32, window: Duration) -> Self {
        Self {
            per_window,
            window,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Records an event for `ip`; false if it is over the limit.
    pub fn allow(&self, ip: IpAddr) -> bool {
        let ip = client_key(ip);
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() > 10_000 {
            let window = self.window;
            seen.retain(|_, (start, _)| now.duration_since(*start) < window);
        }
        let entry = seen.entry(ip).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        if entry.1 >= self.per_window {
            return false;
        }
        entry.1 += 1;
        true
    }
}

impl Limiter for RateLimiter {
    fn allow(&self, ip: IpAddr) -> BoxFuture<'_, Result<bool, StoreError>> {
        let allowed = RateLimiter::allow(self, ip);
        Box::pin(async move { Ok(allowed) })
    }
}

/// The address a limit counts against: an IPv4 address as it is, an IPv6
/// address by its /64 prefix (one subscriber's network usually gets a whole
/// /64, so counting /128s would hand each client billions of budgets).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(std::net::Ipv6Addr::from(prefix))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_count_by_their_64_prefix() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(other));
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(client_key(v4), v4);
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(client_key(mapped), v4);
        // One /64 shares one connection budget.
        let limits = ConnectionLimiter::new(1);
        let _held = limits.try_acquire(a).expect("the first");
        assert!(limits.try_acquire(b).is_none(), "same /64");
        assert!(limits.try_acquire(other).is_some(), "another /64");
    }
}
