//! The [`Store`] for several relay nodes: one PostgreSQL database they share.
//!
//! Every call takes a pooled connection and runs one transaction. An append is
//! one round trip to the `khub_append` function (see `postgres/0001_init.sql`),
//! which locks the channel's row, so each channel's sequence numbers are
//! gapless and become visible in order, whichever node appended them; the call
//! returns after `COMMIT`, so with `synchronous_commit = on` (and a synchronous
//! standby) an acked envelope survives the primary's loss.
//!
//! The schema is versioned: [`PgStore::connect`] applies the migrations the
//! database lacks, under an advisory lock, so nodes starting together apply
//! each one once. Envelopes are partitioned by the week they were stored in:
//! retention drops whole partitions and deletes rows only in the partition the
//! cut-off falls into.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::oneshot;
use tokio_postgres::error::SqlState;

use super::{Append, Appended, BoxFuture, DeviceRecord, Store, StoreError, StoredEnvelope};
use crate::crypto::token::TokenHash;
use crate::ids::{ChannelId, DeviceId};

/// The schema, in order; `khub_migrations` records which are applied.
const MIGRATIONS: &[(i32, &str)] = &[(1, include_str!("postgres/0001_init.sql"))];

/// Advisory lock keys (arbitrary, fixed): migrations, partition upkeep.
const MIGRATION_LOCK: i64 = 0x6b68_7562_0001;
const PARTITION_LOCK: i64 = 0x6b68_7562_0002;

/// Envelopes are partitioned by the week they were stored in.
const PARTITION_SECS: u64 = 7 * 24 * 3600;
/// Envelopes deleted row by row per retention transaction.
const PRUNE_BATCH: u64 = 10_000;

/// Longest a store call (or a pairing-mailbox operation) may take before the
/// relay gives up on it (the operation may still commit: a retried publish is
/// then a duplicate).
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// `statement_timeout` of the relay's connections, below [`CALL_TIMEOUT`].
const STATEMENT_TIMEOUT_MS: u64 = 10_000;

/// How to reach the database.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Connections the pool may open.
    pub pool_size: usize,
    /// PEM file of CA certificates to trust besides the public roots, for a
    /// server with a private certificate authority (`sslmode=require`).
    pub ca_file: Option<std::path::PathBuf>,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            pool_size: 16,
            ca_file: None,
        }
    }
}

/// A connection target: the parsed settings and the TLS connector, for the
/// pool and for the notifier's listening connection.
#[derive(Clone)]
pub struct PgTarget {
    /// Parsed connection settings.
    pub config: tokio_postgres::Config,
    /// TLS (used as `sslmode` says: `prefer` by default, `require`, `disable`).
    pub tls: tokio_postgres_rustls::MakeRustlsConnect,
}

impl PgTarget {
    /// Parses a `postgres://` URL or a `key=value` string.
    pub fn parse(url: &str, options: &PgOptions) -> Result<Self, StoreError> {
        let mut config = tokio_postgres::Config::from_str(url).map_err(|e| {
            StoreError::Backend(format!("the PostgreSQL address is not valid: {e}"))
        })?;
        if config.get_application_name().is_none() {
            // How the operator tells khub's connections apart in pg_stat_activity.
            config.application_name("khub-relay");
        }
        // No statement runs longer than this on the server (retention sets
        // its own; the URL's `options` may set another), and a connection to
        // a host that vanished is noticed in about half a minute instead of
        // TCP's two hours.
        let server_options = match config.get_options() {
            Some(theirs) => format!("-c statement_timeout={STATEMENT_TIMEOUT_MS} {theirs}"),
            None => format!("-c statement_timeout={STATEMENT_TIMEOUT_MS}"),
        };
        config
            .options(&server_options)
            .tcp_user_timeout(Duration::from_secs(20))
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3);
        Ok(Self {
            config,
            tls: tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(options)?),
        })
    }

    /// Where it points, without the password: for logs and errors.
    pub fn describe(&self) -> String {
        let hosts: Vec<String> = self
            .config
            .get_hosts()
            .iter()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        format!(
            "postgres {}@{}/{}",
            self.config.get_user().unwrap_or("?"),
            hosts.join(","),
            self.config.get_dbname().unwrap_or("(user's)")
        )
    }
}

fn tls_config(options: &PgOptions) -> Result<rustls::ClientConfig, StoreError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = &options.ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .map_err(|e| StoreError::Backend(format!("cannot read {}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(StoreError::Backend(format!(
                "{} holds no PEM certificate",
                path.display()
            )));
        }
        for cert in certs {
            roots.add(cert).map_err(backend)?;
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(backend)?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

/// PostgreSQL-backed store. Cheap to share behind an `Arc`.
pub struct PgStore {
    pool: Pool,
    target: PgTarget,
    order: Arc<SenderOrder>,
}

/// Keeps each sender's appends in the order they were handed over. A session
/// pipelines its publishes, and on separate pooled connections a later one
/// could take the channel's lock first and make the earlier one out of order;
/// so each append waits for the previous append of its sender (on this node)
/// to finish. The order is fixed when [`Store::append`] is called, not when
/// its future is first polled.
#[derive(Default)]
struct SenderOrder {
    last: std::sync::Mutex<SenderChains>,
}

#[derive(Default)]
struct SenderChains {
    next_ticket: u64,
    /// Per sender: the ticket of its newest append and what resolves when
    /// that append is done: `true` if it was settled (stored, a duplicate,
    /// or refused for good), `false` if the database failed and it may or may
    /// not be stored.
    newest: std::collections::HashMap<(ChannelId, DeviceId), (u64, oneshot::Receiver<bool>)>,
    /// Per sender: its oldest envelope the database failed, and when. Its
    /// later ones are refused until that one is tried again, for
    /// [`HOLD_FAILED`] at most (by then the device has sent it again, here or
    /// through another node).
    failed: std::collections::HashMap<(ChannelId, DeviceId), (u64, std::time::Instant)>,
}

/// How long a sender's failed envelope holds back its later ones.
const HOLD_FAILED: Duration = Duration::from_secs(10);

/// An append's place in its sender's line.
struct Turn {
    key: (ChannelId, DeviceId),
    ticket: u64,
    previous: Option<oneshot::Receiver<bool>>,
    done: oneshot::Sender<bool>,
}

impl SenderOrder {
    fn take_turn(&self, channel: ChannelId, sender: DeviceId) -> Turn {
        let (done, finished) = oneshot::channel();
        let mut chains = self.last.lock().unwrap_or_else(|e| e.into_inner());
        chains.next_ticket += 1;
        let ticket = chains.next_ticket;
        let previous = chains
            .newest
            .insert((channel, sender), (ticket, finished))
            .map(|(_, previous)| previous);
        Turn {
            key: (channel, sender),
            ticket,
            previous,
            done,
        }
    }

    /// Whether the sender's envelope `sender_seq` must wait for an earlier
    /// one the database failed (see [`SenderChains::failed`]).
    fn held_back(&self, key: (ChannelId, DeviceId), sender_seq: u64) -> bool {
        let mut chains = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match chains.failed.get(&key) {
            Some((first, at)) if at.elapsed() < HOLD_FAILED => sender_seq > *first,
            Some(_) => {
                chains.failed.remove(&key);
                false
            }
            None => false,
        }
    }

    /// Records how an append of the sender ended: a database failure holds
    /// back its later envelopes; anything else at or below the held one ends
    /// the hold.
    fn settle(&self, key: (ChannelId, DeviceId), sender_seq: u64, settled: bool) {
        let mut chains = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if settled {
            if chains
                .failed
                .get(&key)
                .is_some_and(|(first, _)| sender_seq <= *first)
            {
                chains.failed.remove(&key);
            }
            return;
        }
        let first = chains
            .failed
            .get(&key)
            .map_or(sender_seq, |(first, _)| (*first).min(sender_seq));
        if chains.failed.len() >= 100_000 {
            chains
                .failed
                .retain(|_, (_, at)| at.elapsed() < HOLD_FAILED);
        }
        chains
            .failed
            .insert(key, (first, std::time::Instant::now()));
    }

    /// Forgets a sender whose newest append just finished.
    fn finish(&self, turn: &Turn) {
        // (Its successor, if any, took the entry's place already.)
        let mut chains = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if chains
            .newest
            .get(&turn.key)
            .is_some_and(|(ticket, _)| *ticket == turn.ticket)
        {
            chains.newest.remove(&turn.key);
        }
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// A tokio-postgres error with its server-side detail (the driver's own
/// Display says only "db error").
pub(crate) fn db(e: tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        return StoreError::Backend(format!("PostgreSQL: {}", db.message()));
    }
    let mut text = format!("PostgreSQL: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    if text.contains("TLS handshake") {
        text.push_str(
            " (trust the server's CA with --store-ca-file, or add sslmode=disable to the URL for a server on this machine)",
        );
    }
    StoreError::Backend(text)
}

pub(crate) fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => db(e),
        other => StoreError::Backend(format!("PostgreSQL connection pool: {other}")),
    }
}

fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl PgStore {
    /// Connects, applies missing migrations and makes sure this week's and
    /// next week's envelope partitions exist.
    pub async fn connect(url: &str, options: &PgOptions) -> Result<Self, StoreError> {
        Self::connect_to(PgTarget::parse(url, options)?, options).await
    }

    /// Like [`connect`](Self::connect), to an already parsed target.
    pub async fn connect_to(target: PgTarget, options: &PgOptions) -> Result<Self, StoreError> {
        let manager = Manager::from_config(
            target.config.clone(),
            target.tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CALL_TIMEOUT))
            .create_timeout(Some(Duration::from_secs(10)))
            .build()
            .map_err(backend)?;
        let store = Self {
            pool,
            target,
            order: Arc::default(),
        };
        store.migrate().await?;
        store.add_partitions(super::super::hub::unix_now()).await?;
        Ok(store)
    }

    /// The connection target (the notifier listens through it).
    pub fn target(&self) -> &PgTarget {
        &self.target
    }

    /// The pool (the shared pairing slots and rate limits use it).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(db)?;
        let result = async {
            client
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS khub_migrations (
                         version INTEGER PRIMARY KEY,
                         applied TIMESTAMPTZ NOT NULL DEFAULT now())",
                )
                .await
                .map_err(db)?;
            let applied: i32 = client
                .query_one("SELECT COALESCE(MAX(version), 0) FROM khub_migrations", &[])
                .await
                .map_err(db)?
                .get(0);
            let newest = MIGRATIONS.last().map_or(0, |(v, _)| *v);
            if applied > newest {
                return Err(StoreError::Backend(format!(
                    "the database has schema version {applied}, newer than this khub's {newest}: \
                     upgrade khub before pointing it at this database"
                )));
            }
            for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > applied) {
                let tx = client.transaction().await.map_err(db)?;
                tx.batch_execute(sql).await.map_err(db)?;
                tx.execute(
                    "INSERT INTO khub_migrations (version) VALUES ($1)",
                    &[version],
                )
                .await
                .map_err(db)?;
                tx.commit().await.map_err(db)?;
                tracing::info!(version, "PostgreSQL schema migrated");
            }
            Ok(())
        }
        .await;
        let unlocked = client
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .await;
        result?;
        unlocked.map_err(db)?;
        Ok(())
    }

    /// Creates the partitions of the week holding `now` and the next one. A
    /// week whose rows already went to the default partition (a relay that
    /// was down for weeks) stays there and is pruned row by row.
    async fn add_partitions(&self, now: u64) -> Result<(), StoreError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await.map_err(db)?;
        housekeeping(&tx).await?;
        for week in [now / PARTITION_SECS, now / PARTITION_SECS + 1] {
            let (from, to) = (week * PARTITION_SECS, (week + 1) * PARTITION_SECS);
            let sql = format!(
                "CREATE TABLE IF NOT EXISTS {} PARTITION OF khub_envelopes
                 FOR VALUES FROM ({from}) TO ({to})",
                partition_name(week)
            );
            tx.batch_execute("SAVEPOINT partition").await.map_err(db)?;
            if let Err(e) = tx.batch_execute(&sql).await {
                tracing::warn!(week, error = %db(e), "envelope partition not created; its rows stay in the default partition");
                tx.batch_execute("ROLLBACK TO SAVEPOINT partition")
                    .await
                    .map_err(db)?;
            }
        }
        tx.commit().await.map_err(db)
    }

    /// Deletes what was stored before `before`: whole weekly partitions
    /// first, then row by row in batches (the week the cut-off falls in, and
    /// the default partition).
    ///
    /// Lock order: an append locks its channel's row, then writes the log. So
    /// a partition's bytes come off the channels' counts (row locks) before
    /// it is dropped (a lock on the whole log), never after, and a batch of
    /// rows is deleted before the counts change: neither can deadlock with an
    /// append. Each step waits at most 5 s for a lock (and then gives up until
    /// the next run) so appends and reads never queue behind it for longer.
    async fn prune_at(&self, before: u64) -> Result<u64, StoreError> {
        let mut removed = 0;
        for week in self.weeks_before(before).await? {
            removed += self.drop_week(week).await?;
        }
        loop {
            let deleted = self.delete_batch(before).await?;
            removed += deleted;
            if deleted < PRUNE_BATCH {
                return Ok(removed);
            }
        }
    }

    /// The weekly partitions wholly before `before`.
    async fn weeks_before(&self, before: u64) -> Result<Vec<u64>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let names = client
            .query(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                 WHERE i.inhparent = 'khub_envelopes'::regclass",
                &[],
            )
            .await
            .map_err(db)?;
        Ok(names
            .iter()
            .filter_map(|row| {
                let name: &str = row.get(0);
                let week: u64 = name.strip_prefix("khub_envelopes_w")?.parse().ok()?;
                // Only names this code makes (no "+7", no leading zeros).
                (partition_name(week) == name).then_some(week)
            })
            .filter(|week| (week + 1) * PARTITION_SECS <= before)
            .collect())
    }

    /// Drops one week's partition; returns how many envelopes it held.
    async fn drop_week(&self, week: u64) -> Result<u64, StoreError> {
        let name = partition_name(week);
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await.map_err(db)?;
        housekeeping(&tx).await?;
        // Another node may have dropped it since it was listed.
        let exists: Option<String> = tx
            .query_one("SELECT to_regclass($1)::TEXT", &[&name])
            .await
            .map_err(db)?
            .get(0);
        if exists.is_none() {
            return Ok(0);
        }
        // Nothing is added to a week this old, so the sums stay right.
        let sums = tx
            .query(
                &format!(
                    "SELECT channel, SUM(length(body))::BIGINT, COUNT(*) FROM {name} GROUP BY channel"
                ),
                &[],
            )
            .await
            .map_err(db)?;
        let removed = subtract(&tx, &sums).await?;
        tx.batch_execute(&format!("DROP TABLE {name}"))
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(removed)
    }

    /// Deletes up to [`PRUNE_BATCH`] envelopes stored before `before`.
    async fn delete_batch(&self, before: u64) -> Result<u64, StoreError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await.map_err(db)?;
        housekeeping(&tx).await?;
        let sums = tx
            .query(
                "WITH gone AS (
                     DELETE FROM khub_envelopes WHERE (channel, seq) IN (
                         SELECT channel, seq FROM khub_envelopes WHERE stored < $1 LIMIT $2)
                     RETURNING channel, length(body) AS n)
                 SELECT channel, SUM(n)::BIGINT, COUNT(*) FROM gone GROUP BY channel",
                &[&int(before), &int(PRUNE_BATCH)],
            )
            .await
            .map_err(db)?;
        let removed = subtract(&tx, &sums).await?;
        tx.commit().await.map_err(db)?;
        Ok(removed)
    }

    /// Runs `op` with a pooled connection, within [`CALL_TIMEOUT`].
    fn call<'a, T: Send + 'a>(
        &'a self,
        op: impl for<'c> FnOnce(
            &'c mut deadpool_postgres::Object,
        ) -> BoxFuture<'c, Result<T, StoreError>>
        + Send
        + 'a,
    ) -> BoxFuture<'a, Result<T, StoreError>> {
        Box::pin(bounded(async move {
            let mut client = self.pool.get().await.map_err(pool_error)?;
            op(&mut client).await
        }))
    }
}

/// One append, now (its sender's earlier ones are done): one round trip to
/// `khub_append`.
async fn append_now(pool: &Pool, a: Append) -> Result<Appended, StoreError> {
    let client = pool.get().await.map_err(pool_error)?;
    let statement = client
        .prepare_cached(
            "SELECT outcome, seq, used, highest FROM khub_append($1, $2, $3, $4, $5, $6)",
        )
        .await
        .map_err(db)?;
    let row = client
        .query_one(
            &statement,
            &[
                &a.channel.as_bytes().as_slice(),
                &a.sender.as_bytes().as_slice(),
                &int(a.sender_seq),
                &a.envelope.as_ref(),
                &int(a.now),
                &int(a.quota),
            ],
        )
        .await
        .map_err(db)?;
    let outcome: &str = row.get(0);
    let seq = || row.get::<_, Option<i64>>(1).map_or(0, |s| s as u64);
    match outcome {
        "stored" => Ok(Appended {
            seq: seq(),
            duplicate: false,
        }),
        "duplicate" => Ok(Appended {
            seq: seq(),
            duplicate: true,
        }),
        "conflict" => Err(StoreError::Conflict {
            sender_seq: a.sender_seq,
        }),
        "out_of_order" => Err(StoreError::OutOfOrder {
            sender_seq: a.sender_seq,
            highest: row.get::<_, Option<i64>>(3).map_or(0, |h| h as u64),
        }),
        "over_quota" => Err(StoreError::OverQuota {
            used: row.get::<_, Option<i64>>(2).map_or(0, |u| u as u64),
            quota: a.quota,
        }),
        "not_found" => Err(StoreError::NotFound),
        other => Err(StoreError::Backend(format!(
            "khub_append answered {other:?}"
        ))),
    }
}

/// The name of the envelope partition of `week` (weeks since the epoch).
fn partition_name(week: u64) -> String {
    format!("khub_envelopes_w{week}")
}

/// Settings of a retention transaction: one at a time across nodes, no
/// statement limit (a week can be large), a short wait for locks.
async fn housekeeping(tx: &deadpool_postgres::Transaction<'_>) -> Result<(), StoreError> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK])
        .await
        .map_err(db)?;
    tx.batch_execute("SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = '5s'")
        .await
        .map_err(db)
}

/// Takes deleted envelopes' bytes off their channels' counts; `sums` rows
/// are (channel, bytes, count). Returns the count.
async fn subtract(
    tx: &deadpool_postgres::Transaction<'_>,
    sums: &[tokio_postgres::Row],
) -> Result<u64, StoreError> {
    let mut removed = 0;
    for sum in sums {
        let (channel, bytes, count): (Vec<u8>, i64, i64) = (sum.get(0), sum.get(1), sum.get(2));
        tx.execute(
            "UPDATE khub_channels SET bytes = bytes - $2 WHERE id = $1",
            &[&channel, &bytes],
        )
        .await
        .map_err(db)?;
        removed += u64::try_from(count).unwrap_or(0);
    }
    Ok(removed)
}

/// Storing an envelope after one of its sender's that the database failed
/// could put it ahead of one that may be missing, which would then be out of
/// order for good: it is refused too, and the device sends both again.
fn held_back_error() -> StoreError {
    StoreError::Backend(
        "an earlier envelope of this device could not be stored; it is to be sent again first"
            .into(),
    )
}

/// `work` within [`CALL_TIMEOUT`] (a server-side `statement_timeout` ends
/// the statement itself; this bounds the wait for a host that vanished).
pub(crate) async fn bounded<T>(
    work: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(CALL_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| Err(timed_out()))
}

/// A call that took longer than [`CALL_TIMEOUT`].
pub(crate) fn timed_out() -> StoreError {
    StoreError::Backend(format!(
        "PostgreSQL did not answer within {} s",
        CALL_TIMEOUT.as_secs()
    ))
}

fn record(device: Vec<u8>, token_hash: Vec<u8>, revoked: bool) -> Result<DeviceRecord, StoreError> {
    Ok(DeviceRecord {
        device: DeviceId::from_slice(&device).ok_or_else(|| backend("corrupt device id"))?,
        token_hash: TokenHash(
            token_hash
                .try_into()
                .map_err(|_| backend("corrupt token hash"))?,
        ),
        revoked,
    })
}

fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

impl Store for PgStore {
    fn create_channel(
        &self,
        channel: ChannelId,
        device: DeviceId,
        token_hash: TokenHash,
        now: u64,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.call(move |client| {
            Box::pin(async move {
                let tx = client.transaction().await.map_err(db)?;
                let inserted = tx
                    .execute(
                        "INSERT INTO khub_channels (id, head, bytes, created) VALUES ($1, 0, 0, $2)
                         ON CONFLICT DO NOTHING",
                        &[&channel.as_bytes().as_slice(), &int(now)],
                    )
                    .await
                    .map_err(db)?;
                if inserted == 0 {
                    return Err(StoreError::Exists);
                }
                tx.execute(
                    "INSERT INTO khub_devices (channel, device, token_hash, joined) VALUES ($1, $2, $3, $4)",
                    &[
                        &channel.as_bytes().as_slice(),
                        &device.as_bytes().as_slice(),
                        &token_hash.0.as_slice(),
                        &int(now),
                    ],
                )
                .await
                .map_err(db)?;
                tx.commit().await.map_err(db)
            })
        })
    }

    fn device(
        &self,
        channel: ChannelId,
        device: DeviceId,
    ) -> BoxFuture<'_, Result<Option<DeviceRecord>, StoreError>> {
        self.call(move |client| {
            Box::pin(async move {
                let statement = client
                    .prepare_cached(
                        "SELECT device, token_hash, revoked FROM khub_devices WHERE channel = $1 AND device = $2",
                    )
                    .await
                    .map_err(db)?;
                let row = client
                    .query_opt(
                        &statement,
                        &[&channel.as_bytes().as_slice(), &device.as_bytes().as_slice()],
                    )
                    .await
                    .map_err(db)?;
                row.map(|r| record(r.get(0), r.get(1), r.get(2))).transpose()
            })
        })
    }

    fn devices(&self, channel: ChannelId) -> BoxFuture<'_, Result<Vec<DeviceRecord>, StoreError>> {
        self.call(move |client| {
            Box::pin(async move {
                let exists = client
                    .query_opt(
                        "SELECT 1 FROM khub_channels WHERE id = $1",
                        &[&channel.as_bytes().as_slice()],
                    )
                    .await
                    .map_err(db)?;
                if exists.is_none() {
                    return Err(StoreError::NotFound);
                }
                client
                    .query(
                        "SELECT device, token_hash, revoked FROM khub_devices WHERE channel = $1 ORDER BY ord",
                        &[&channel.as_bytes().as_slice()],
                    )
                    .await
                    .map_err(db)?
                    .into_iter()
                    .map(|r| record(r.get(0), r.get(1), r.get(2)))
                    .collect()
            })
        })
    }

    fn admit(
        &self,
        channel: ChannelId,
        device: DeviceId,
        token_hash: TokenHash,
        max_devices: usize,
        now: u64,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.call(move |client| {
            Box::pin(async move {
                let tx = client.transaction().await.map_err(db)?;
                let id = channel.as_bytes().as_slice();
                // The channel's row lock orders admissions, so two nodes
                // cannot both admit the last free place.
                tx.query_opt("SELECT 1 FROM khub_channels WHERE id = $1 FOR UPDATE", &[&id])
                    .await
                    .map_err(db)?
                    .ok_or(StoreError::NotFound)?;
                let active: i64 = tx
                    .query_one(
                        "SELECT COUNT(*) FROM khub_devices WHERE channel = $1 AND NOT revoked",
                        &[&id],
                    )
                    .await
                    .map_err(db)?
                    .get(0);
                let known = tx
                    .query_opt(
                        "SELECT 1 FROM khub_devices WHERE channel = $1 AND device = $2",
                        &[&id, &device.as_bytes().as_slice()],
                    )
                    .await
                    .map_err(db)?;
                if known.is_some() {
                    return Err(StoreError::Exists);
                }
                if usize::try_from(active).unwrap_or(usize::MAX) >= max_devices {
                    return Err(StoreError::ChannelFull(max_devices));
                }
                tx.execute(
                    "INSERT INTO khub_devices (channel, device, token_hash, joined) VALUES ($1, $2, $3, $4)",
                    &[&id, &device.as_bytes().as_slice(), &token_hash.0.as_slice(), &int(now)],
                )
                .await
                .map_err(|e| if is_unique_violation(&e) { StoreError::Exists } else { db(e) })?;
                tx.commit().await.map_err(db)
            })
        })
    }

    fn revoke(
        &self,
        channel: ChannelId,
        device: DeviceId,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.call(move |client| {
            Box::pin(async move {
                let tx = client.transaction().await.map_err(db)?;
                let changed = tx
                    .execute(
                        "UPDATE khub_devices SET revoked = true WHERE channel = $1 AND device = $2",
                        &[
                            &channel.as_bytes().as_slice(),
                            &device.as_bytes().as_slice(),
                        ],
                    )
                    .await
                    .map_err(db)?;
                if changed == 0 {
                    return Err(StoreError::NotFound);
                }
                // Every node closes the device's sessions: the notification
                // goes out with the commit, or not at all.
                let (bus, payload) = crate::relay::pg::bus::revocation_payload(channel);
                tx.execute("SELECT pg_notify($1, $2)", &[&bus, &payload])
                    .await
                    .map_err(db)?;
                tx.commit().await.map_err(db)
            })
        })
    }

    fn append(&self, a: Append) -> BoxFuture<'_, Result<Appended, StoreError>> {
        let mut turn = self.order.take_turn(a.channel, a.sender);
        let (pool, order) = (self.pool.clone(), Arc::clone(&self.order));
        // On a task of its own, so the turn is held until the database has
        // answered even if the caller gives up (or stops polling) first.
        let task = tokio::spawn(async move {
            let ahead_settled = match turn.previous.take() {
                Some(previous) => previous.await.unwrap_or(false),
                None => true,
            };
            let key = (a.channel, a.sender);
            let sender_seq = a.sender_seq;
            let appended = if !ahead_settled || order.held_back(key, sender_seq) {
                Err(held_back_error())
            } else {
                bounded(append_now(&pool, a)).await
            };
            let settled = !matches!(appended, Err(StoreError::Backend(_)));
            order.settle(key, sender_seq, settled);
            order.finish(&turn);
            let _ = turn.done.send(settled);
            appended
        });
        Box::pin(bounded(async move {
            task.await
                .map_err(|e| StoreError::Backend(format!("the append task failed: {e}")))?
        }))
    }

    fn read_page(
        &self,
        channel: ChannelId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> BoxFuture<'_, Result<Vec<StoredEnvelope>, StoreError>> {
        self.call(move |client| {
            Box::pin(async move {
                // The running total is taken over the lengths (which
                // `octet_length` reads without fetching a stored body), so
                // bodies past the budget never leave the database.
                let statement = client
                    .prepare_cached(
                        "SELECT seq, body FROM (
                             SELECT seq, body, octet_length(body) AS len,
                                    SUM(octet_length(body)) OVER (ORDER BY seq ROWS UNBOUNDED PRECEDING) AS upto
                             FROM khub_envelopes WHERE channel = $1 AND seq > $2 ORDER BY seq LIMIT $3
                         ) page WHERE upto <= $4 OR upto = len ORDER BY seq",
                    )
                    .await
                    .map_err(db)?;
                let rows = client
                    .query(
                        &statement,
                        &[
                            &channel.as_bytes().as_slice(),
                            &int(after),
                            &int(limit as u64),
                            &int(max_bytes as u64),
                        ],
                    )
                    .await
                    .map_err(db)?;
                Ok(rows
                    .into_iter()
                    .map(|r| StoredEnvelope {
                        seq: r.get::<_, i64>(0) as u64,
                        envelope: Bytes::from(r.get::<_, Vec<u8>>(1)),
                    })
                    .collect())
            })
        })
    }

    fn head(&self, channel: ChannelId) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.call(move |client| {
            Box::pin(async move {
                let statement = client
                    .prepare_cached("SELECT head FROM khub_channels WHERE id = $1")
                    .await
                    .map_err(db)?;
                client
                    .query_opt(&statement, &[&channel.as_bytes().as_slice()])
                    .await
                    .map_err(db)?
                    .map(|r| r.get::<_, i64>(0) as u64)
                    .ok_or(StoreError::NotFound)
            })
        })
    }

    fn prune(&self, before: u64) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            // Housekeeping runs this periodically: keep next week's partition ready.
            self.add_partitions(super::super::hub::unix_now()).await?;
            self.prune_at(before).await
        })
    }

    fn health(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        self.call(|client| {
            Box::pin(async move { client.simple_query("SELECT 1").await.map(drop).map_err(db) })
        })
    }

    fn stored_bytes(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.call(|client| {
            Box::pin(async move {
                let total: i64 = client
                    .query_one(
                        "SELECT COALESCE(SUM(bytes), 0)::BIGINT FROM khub_channels",
                        &[],
                    )
                    .await
                    .map_err(db)?
                    .get(0);
                Ok(u64::try_from(total).unwrap_or(0))
            })
        })
    }
}
