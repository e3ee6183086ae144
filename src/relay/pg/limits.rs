//! Per-address rate limits counted across every node, in PostgreSQL: fixed
//! windows per (kind, client address), one upsert per event.

use std::net::IpAddr;
use std::time::Duration;

use deadpool_postgres::Pool;

use crate::relay::limits::{Limiter, client_key};
use crate::relay::store::{BoxFuture, StoreError, postgres};

/// A rate limit shared by the nodes on one database.
pub struct PgLimiter {
    pool: Pool,
    kind: &'static str,
    per_window: u32,
    window: Duration,
}

impl PgLimiter {
    /// At most `per_window` events of `kind` per address per `window`.
    pub fn new(pool: Pool, kind: &'static str, per_window: u32, window: Duration) -> Self {
        Self {
            pool,
            kind,
            per_window,
            window,
        }
    }
}

impl Limiter for PgLimiter {
    fn allow(&self, ip: IpAddr) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(postgres::bounded(async move {
            let client = self.pool.get().await.map_err(postgres::pool_error)?;
            let count: i32 = client
                .query_one(
                    "INSERT INTO khub_rate_windows AS w (kind, client, started, count)
                     VALUES ($1, $2, now(), 1)
                     ON CONFLICT (kind, client) DO UPDATE SET
                         started = CASE WHEN w.started <= now() - make_interval(secs => $3)
                                        THEN now() ELSE w.started END,
                         count = CASE WHEN w.started <= now() - make_interval(secs => $3)
                                      THEN 1 ELSE LEAST(w.count + 1, 1000000) END
                     RETURNING count",
                    &[
                        &self.kind,
                        &client_key(ip).to_string(),
                        &self.window.as_secs_f64(),
                    ],
                )
                .await
                .map_err(postgres::db)?
                .get(0);
            Ok(u32::try_from(count).unwrap_or(u32::MAX) <= self.per_window)
        }))
    }

    fn tick(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Err(e) = forget_old_windows(&self.pool, self.kind).await {
                tracing::warn!(error = %e, "could not forget old rate-limit windows");
            }
        })
    }
}

/// Deletes the windows of `kind` that started more than a day ago.
async fn forget_old_windows(pool: &Pool, kind: &str) -> Result<u64, StoreError> {
    let client = pool.get().await.map_err(postgres::pool_error)?;
    client
        .execute(
            "DELETE FROM khub_rate_windows WHERE kind = $1 AND started < now() - interval '1 day'",
            &[&kind],
        )
        .await
        .map_err(postgres::db)
}
