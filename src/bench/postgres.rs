//! `khub bench --scenario postgres`: the relay on PostgreSQL, in a database
//! made for the run on the server `--postgres` names (dropped afterwards).
//!
//! - Appends/s and p99 through the store alone, SQLite against PostgreSQL:
//!   64 publishers, 100 channels, 200-byte envelopes, the full append (dedupe,
//!   order and quota checks).
//! - Fan-out deliveries/s through one node against two nodes on one database
//!   (devices alternate between the nodes).
//! - Cross-node delivery latency: each channel's sender on one node, its
//!   reader on the other, paced well below saturation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::fanout::{self, Server, Workload};
use super::scenarios::{InProcess, latency_row, start_relay, temp_db};
use super::{Percentiles, Row};
use crate::crypto::envelope::EnvelopeHeader;
use crate::crypto::os_rng;
use crate::crypto::token::AccessToken;
use crate::ids::{ChannelId, DeviceId};
use crate::relay::store::postgres::{self, PgOptions, PgStore, PgTarget};
use crate::relay::store::sqlite::SqliteStore;
use crate::relay::store::{Append, Store};

const PUBLISHERS: usize = 64;
const CHANNELS: usize = 100;
const ENVELOPE: usize = 200;

/// A database made for this run; dropped by [`BenchDb::drop_now`].
struct BenchDb {
    admin: tokio_postgres::Client,
    name: String,
    target: PgTarget,
}

impl BenchDb {
    async fn create(server: &str) -> Result<Self, String> {
        let options = PgOptions::default();
        let target = PgTarget::parse(server, &options).map_err(|e| e.to_string())?;
        let (admin, connection) = target
            .config
            .connect(target.tls.clone())
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", target.describe()))?;
        tokio::spawn(connection);
        let name = format!("khub_bench_{}", std::process::id());
        // Two statements: CREATE DATABASE cannot share a transaction.
        for sql in [
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            format!("CREATE DATABASE {name}"),
        ] {
            admin
                .batch_execute(&sql)
                .await
                .map_err(|e| format!("cannot create the bench database: {}", postgres::db(e)))?;
        }
        let mut target = target;
        target.config.dbname(&name);
        Ok(Self {
            admin,
            name,
            target,
        })
    }

    /// A store with `pool_size` connections (the server allows 100 in all
    /// by default).
    async fn store(&self, pool_size: usize) -> Result<Arc<PgStore>, String> {
        PgStore::connect_to(
            self.target.clone(),
            &PgOptions {
                pool_size,
                ca_file: None,
            },
        )
        .await
        .map(Arc::new)
        .map_err(|e| e.to_string())
    }

    async fn drop_now(self) {
        let _ = self
            .admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await;
    }
}

/// Runs the scenario against the PostgreSQL server at `server` (a URL whose
/// user may create databases).
pub async fn run(server: &str, appends: usize, w: Workload) -> Result<Vec<Row>, String> {
    let db = BenchDb::create(server).await?;
    let rows = measure(&db, appends, w).await;
    db.drop_now().await;
    rows
}

async fn measure(db: &BenchDb, appends: usize, w: Workload) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    let shape = format!("{PUBLISHERS} publishers, {CHANNELS} ch, {ENVELOPE} B");
    let sqlite: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&temp_db()).map_err(|e| e.to_string())?);
    let (sqlite_rate, sqlite_p) = append_load(&sqlite, appends).await?;
    let (pg_rate, pg_p, per_envelope) = {
        let postgres = db.store(PUBLISHERS).await?;
        let (rate, p) = append_load(&(Arc::clone(&postgres) as Arc<dyn Store>), appends).await?;
        (rate, p, disk_per_envelope(&postgres).await?)
    };
    rows.push(Row::info(
        "postgres",
        format!("appends/s, SQLite / PostgreSQL ({shape})"),
        format!(
            "{sqlite_rate:.0} / {pg_rate:.0} ({:.2}x)",
            pg_rate / sqlite_rate
        ),
    ));
    rows.push(Row::info(
        "postgres",
        "append p99, SQLite / PostgreSQL",
        format!(
            "{:.2} ms / {:.2} ms",
            f64::from(sqlite_p.p99) / 1000.0,
            f64::from(pg_p.p99) / 1000.0
        ),
    ));

    rows.push(Row::info(
        "postgres",
        format!("PostgreSQL disk per {ENVELOPE}-byte envelope (table + indexes)"),
        format!("{per_envelope:.0} B"),
    ));

    // Fan-out: one node, then two on the same database.
    let one = node(db).await?;
    let single = fanout::run(Server::Relay(one.addr), w).await?;
    let other = node(db).await?;
    let pair = fanout::run(Server::Nodes(one.addr, other.addr), w).await?;
    whole("one node", &single)?;
    whole("two nodes", &pair)?;
    rows.push(Row::info(
        "postgres",
        format!(
            "fan-out deliveries/s, one node / two nodes ({} ch x {} dev, {} senders, W={})",
            w.channels, w.devices, w.senders, w.window
        ),
        format!(
            "{:.0} / {:.0} ({:.2}x)",
            single.rate(),
            pair.rate(),
            pair.rate() / single.rate()
        ),
    ));

    // Cross-node latency: sender on one node, reader on the other, paced.
    let across = Workload {
        channels: 20,
        devices: 2,
        senders: 1,
        window: 16,
        payload: 200,
        messages: w.messages.min(200),
        rate: Some(50.0),
    };
    let crossed = fanout::run(Server::Nodes(one.addr, other.addr), across).await?;
    let local = fanout::run(Server::Relay(one.addr), across).await?;
    whole("cross-node", &crossed)?;
    whole("same-node", &local)?;
    rows.push(latency_row(
        "postgres",
        "cross-node delivery (20 ch, 1,000 msg/s)",
        crossed.latency,
    ));
    rows.push(latency_row(
        "postgres",
        "same-node delivery, same load",
        local.latency,
    ));
    Ok(rows)
}

/// Bytes the envelope log takes on disk (partitions with their indexes) per
/// stored envelope.
async fn disk_per_envelope(store: &PgStore) -> Result<f64, String> {
    let client = store.pool().get().await.map_err(|e| e.to_string())?;
    let row = client
        .query_one(
            "SELECT (SELECT COALESCE(SUM(pg_total_relation_size(inhrelid)), 0)::FLOAT8
                     FROM pg_inherits WHERE inhparent = 'khub_envelopes'::regclass),
                    (SELECT COUNT(*)::FLOAT8 FROM khub_envelopes)",
            &[],
        )
        .await
        .map_err(|e| postgres::db(e).to_string())?;
    let (bytes, count): (f64, f64) = (row.get(0), row.get(1));
    Ok(bytes / count.max(1.0))
}

/// Refuses a run that lost or doubled a delivery: its figures mean nothing.
fn whole(name: &str, outcome: &fanout::Outcome) -> Result<(), String> {
    if outcome.lost + outcome.duplicated > 0 {
        return Err(format!(
            "{name}: {} lost, {} duplicated",
            outcome.lost, outcome.duplicated
        ));
    }
    Ok(())
}

async fn node(db: &BenchDb) -> Result<InProcess, String> {
    let store = db.store(PgOptions::default().pool_size).await?;
    start_relay(|config| async move {
        crate::relay::pg::relay(store, config)
            .await
            .map_err(|e| e.to_string())
    })
    .await
}

/// `total` appends from [`PUBLISHERS`] concurrent publishers over
/// [`CHANNELS`] channels; appends/s and the latency of each.
async fn append_load(store: &Arc<dyn Store>, total: usize) -> Result<(f64, Percentiles), String> {
    let mut rng = os_rng();
    let channels: Vec<ChannelId> = (0..CHANNELS).map(|_| ChannelId::random(&mut rng)).collect();
    for channel in &channels {
        store
            .create_channel(
                *channel,
                DeviceId::random(&mut rng),
                AccessToken::generate(&mut rng).hash(),
                0,
            )
            .await
            .map_err(|e| e.to_string())?;
    }
    let per_publisher = total.div_ceil(PUBLISHERS);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..PUBLISHERS {
        let store = Arc::clone(store);
        let channel = channels[p % CHANNELS];
        let sender = DeviceId::random(&mut rng);
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(per_publisher);
            for seq in 1..=per_publisher as u64 {
                let mut envelope = EnvelopeHeader {
                    channel,
                    sender,
                    seq,
                    epoch: 1,
                }
                .encode()
                .to_vec();
                envelope.resize(ENVELOPE, 0x5a);
                let began = Instant::now();
                tokio::time::timeout(
                    Duration::from_secs(30),
                    store.append(Append {
                        channel,
                        sender,
                        sender_seq: seq,
                        envelope: Bytes::from(envelope),
                        now: crate::relay::hub::unix_now(),
                        quota: u64::MAX / 2,
                    }),
                )
                .await
                .map_err(|_| "an append took over 30 s".to_owned())?
                .map_err(|e| e.to_string())?;
                latencies.push(u32::try_from(began.elapsed().as_micros()).unwrap_or(u32::MAX));
            }
            Ok::<_, String>(latencies)
        });
    }
    let mut latencies = Vec::with_capacity(total);
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done.map_err(|e| e.to_string())??);
    }
    let rate = latencies.len() as f64 / started.elapsed().as_secs_f64().max(1e-9);
    Ok((rate, Percentiles::of(&mut latencies)))
}
