//! The scenarios of `khub bench` and the targets each is checked against.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;
use warp::http::Method;

use super::child::ServerChild;
use super::fanout::{self, Server, Workload};
use super::{Percentiles, Row, baseline, cpu};
use crate::channel::{Channel, Event, Joining};
use crate::client::RelayAddr;
use crate::crypto::envelope::{EnvelopeHeader, padded_len};
use crate::crypto::os_rng;
use crate::crypto::token::AccessToken;
use crate::ids::{ChannelId, DeviceId};
use crate::pairing::{Code, DeviceInfo, Inviter, Joiner, Nameplate};
use crate::protocol::{
    AdmitDevice, B64, CLAIM_HEADER, ChannelCreated, ClientFrame, CreateChannel, Credentials,
    DeviceList, OpenSlot, PairMessage, PairMessages, SlotClaimed, SlotOpened,
};
use crate::relay::Relay;
use crate::relay::config::{Limits, RelayConfig};
use crate::relay::store::Store;
use crate::relay::store::memory::MemoryStore;
use crate::relay::store::sqlite::{Durability, SqliteStore};

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Scenarios to run: fanout, catchup, idle, pairing, crypto.
    pub scenarios: Vec<String>,
    /// The fan-out workload.
    pub workload: Workload,
    /// Envelopes in the catch-up backlog.
    pub backlog: usize,
    /// Session counts for the idle-memory scenario.
    pub idle: Vec<usize>,
    /// Pairings to complete.
    pub pairings: usize,
    /// Pairings in flight at once.
    pub pairing_concurrency: usize,
    /// The `khub` binary, for the idle scenario's relay process.
    pub khub: PathBuf,
    /// A relay to run the fan-out against instead of in-process ones.
    pub relay: Option<SocketAddr>,
    /// The soak: sessions held, for how long, and how often each publishes.
    pub soak: super::soak::Soak,
    /// The PostgreSQL server for the `postgres` scenario (a URL whose user
    /// may create the run's database).
    pub postgres: String,
    /// Appends per store in the `postgres` scenario.
    pub appends: usize,
}

fn wants(options: &Options, scenario: &str) -> bool {
    options
        .scenarios
        .iter()
        .any(|s| s == scenario || (s == "all" && !["soak", "postgres"].contains(&scenario)))
}

/// Runs the chosen scenarios; returns the report's rows.
pub async fn run(options: &Options) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    if wants(options, "crypto") {
        rows.extend(crypto());
    }
    if wants(options, "fanout") {
        rows.extend(fanout_rows(options).await?);
    }
    if wants(options, "catchup") {
        rows.extend(catchup(options.backlog).await?);
    }
    if wants(options, "pairing") {
        rows.extend(pairing(options.pairings, options.pairing_concurrency).await?);
    }
    if wants(options, "idle") {
        rows.extend(idle(&options.khub, &options.idle).await?);
    }
    if wants(options, "notes") {
        rows.extend(super::notes::run().await?);
    }
    if wants(options, "postgres") {
        rows.extend(postgres(options).await?);
    }
    if wants(options, "soak") {
        rows.extend(super::soak::run(&options.khub, &options.soak).await?);
    }
    Ok(rows)
}

#[cfg(feature = "postgres")]
async fn postgres(options: &Options) -> Result<Vec<Row>, String> {
    super::postgres::run(&options.postgres, options.appends, options.workload).await
}

#[cfg(not(feature = "postgres"))]
async fn postgres(_: &Options) -> Result<Vec<Row>, String> {
    Err(
        "this khub was built without PostgreSQL support: build it with `--features postgres`"
            .into(),
    )
}

/// Limits out of the way of the load generator (everything from one address).
fn bench_config() -> RelayConfig {
    RelayConfig {
        limits: Limits {
            max_connections_per_ip: 1_000_000,
            claims_per_minute: u32::MAX,
            channels_per_hour: u32::MAX,
            max_devices_per_channel: 1_000_000,
            channel_quota_bytes: u64::MAX / 2,
            ..Limits::default()
        },
        ..RelayConfig::default()
    }
}

/// A relay in this process; stops when dropped.
pub(super) struct InProcess {
    pub(super) addr: SocketAddr,
    relay: Arc<Relay>,
    _running: crate::relay::server::Running,
}

pub(super) async fn start(store: Arc<dyn Store>) -> Result<InProcess, String> {
    start_relay(|config| async move { Ok(Relay::new(store, config)) }).await
}

/// A relay made by `make` from the bench's configuration, in this process.
pub(super) async fn start_relay<F, Made>(make: F) -> Result<InProcess, String>
where
    F: FnOnce(RelayConfig) -> Made,
    Made: std::future::Future<Output = Result<Arc<Relay>, String>>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let relay = make(bench_config()).await?;
    Ok(InProcess {
        addr,
        _running: crate::relay::server::Running::spawn(Arc::clone(&relay), listener),
        relay,
    })
}

pub(super) fn temp_db() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "khub-bench-{}-{}",
        std::process::id(),
        DeviceId::random(&mut os_rng())
    ));
    let _ = std::fs::create_dir_all(&dir);
    dir.join("bench.sqlite3")
}

fn ms(micros: u32) -> String {
    format!("{:.2} ms", f64::from(micros) / 1000.0)
}

pub(super) fn latency_row(scenario: &'static str, name: &str, p: Percentiles) -> Row {
    Row::info(
        scenario,
        format!("{name} p50 / p99 / p99.9"),
        format!("{} / {} / {}", ms(p.p50), ms(p.p99), ms(p.p999)),
    )
}

async fn fanout_rows(options: &Options) -> Result<Vec<Row>, String> {
    let w = options.workload;
    let shape = format!(
        "{} ch x {} dev, {} senders, {} B, W={}, {} msgs/sender",
        w.channels, w.devices, w.senders, w.payload, w.window, w.messages
    );
    let mut rows = vec![Row::info("fanout", "workload", shape)];
    if let Some(relay) = options.relay {
        let outcome = fanout::run(Server::Relay(relay), w).await?;
        rows.push(Row::info(
            "fanout",
            "external relay deliveries/s",
            format!("{:.0}", outcome.rate()),
        ));
        rows.push(latency_row(
            "fanout",
            "external relay delivery latency",
            outcome.latency,
        ));
        rows.push(Row::check(
            "fanout",
            "lost + duplicated",
            (outcome.lost + outcome.duplicated).to_string(),
            "0",
            outcome.lost + outcome.duplicated == 0,
        ));
        return Ok(rows);
    }
    let base_addr = baseline::start().await;
    let memory = start(Arc::new(MemoryStore::new())).await?;
    let db = temp_db();
    let sqlite = start(Arc::new(SqliteStore::open(&db).map_err(|e| e.to_string())?)).await?;
    let normal = start(Arc::new(
        SqliteStore::open_with(&temp_db(), Durability::Normal).map_err(|e| e.to_string())?,
    ))
    .await?;

    // Every server runs ROUNDS times, taking turns, and its median round
    // counts: a burst from another tenant of the machine then moves one round
    // of one server, not the ratio.
    let servers = [
        Server::Baseline(base_addr),
        Server::Relay(memory.addr),
        Server::Relay(sqlite.addr),
        Server::Relay(normal.addr),
    ];
    let mut rounds: [Vec<fanout::Outcome>; 4] = Default::default();
    for _ in 0..ROUNDS {
        for (server, outcomes) in servers.iter().zip(&mut rounds) {
            outcomes.push(fanout::run(*server, w).await?);
        }
    }
    let [base, mem, sql, sql_normal] = rounds.map(median_round);
    for (name, (outcome, spread)) in [
        ("baseline", &base),
        ("relay, memory store", &mem),
        ("relay, SQLite (durability full)", &sql),
        ("relay, SQLite (durability normal)", &sql_normal),
    ] {
        rows.push(Row::info(
            "fanout",
            format!("{name}: deliveries/s, median of {ROUNDS} rounds (slowest - fastest)"),
            format!("{:.0} ({spread})", outcome.rate()),
        ));
        rows.push(latency_row(
            "fanout",
            &format!("{name}: delivery latency"),
            outcome.latency,
        ));
        let bad = outcome.lost + outcome.duplicated;
        rows.push(Row::check(
            "fanout",
            format!("{name}: lost + duplicated deliveries"),
            bad.to_string(),
            "0",
            bad == 0,
        ));
    }
    let (base, mem, sql, sql_normal) = (base.0, mem.0, sql.0, sql_normal.0);
    for (name, outcome, target) in [
        ("memory store", &mem, 0.9),
        ("SQLite (full)", &sql, 0.6),
        ("SQLite (normal)", &sql_normal, 0.6),
    ] {
        let ratio = outcome.rate() / base.rate();
        rows.push(Row::check(
            "fanout",
            format!("{name} / baseline deliveries/s"),
            format!("{:.0}%", ratio * 100.0),
            &format!(">= {:.0}%", target * 100.0),
            ratio >= target,
        ));
    }
    rows.extend(cpu_rows(w).await?);
    rows.extend(process_cpu_rows(&options.khub, w).await?);
    for (name, outcome) in [
        ("memory", &mem),
        ("SQLite (full)", &sql),
        ("SQLite (normal)", &sql_normal),
    ] {
        rows.push(latency_row(
            "durable publish",
            &format!("{name} store: publish->ack"),
            outcome.ack_latency,
        ));
        rows.push(Row::info(
            "durable publish",
            format!("{name} store: acked envelopes/s"),
            format!("{:.0}", outcome.publishes_per_sec(&w)),
        ));
    }

    // Latency at half the relay's maximum rate, the same offered load for both.
    let senders = (w.channels * w.senders) as f64;
    let per_sender = 0.5 * mem.publishes_per_sec(&w) / senders;
    let messages = ((per_sender * 3.0) as usize).clamp(50, w.messages);
    let paced = Workload {
        rate: Some(per_sender),
        messages,
        ..w
    };
    let base_paced = fanout::run(Server::Baseline(base_addr), paced).await?;
    let mem_paced = fanout::run(Server::Relay(memory.addr), paced).await?;
    rows.push(Row::info(
        "latency at half rate",
        "offered load",
        format!("{:.0} publishes/s per sender", per_sender),
    ));
    rows.push(latency_row(
        "latency at half rate",
        "baseline",
        base_paced.latency,
    ));
    rows.push(latency_row(
        "latency at half rate",
        "relay, memory store",
        mem_paced.latency,
    ));
    let ratio = f64::from(mem_paced.latency.p99) / f64::from(base_paced.latency.p99.max(1));
    rows.push(Row::check(
        "latency at half rate",
        "relay p99 / baseline p99",
        format!("{ratio:.2}x"),
        "<= 2x",
        ratio <= 2.0,
    ));
    let bad = base_paced.lost + base_paced.duplicated + mem_paced.lost + mem_paced.duplicated;
    rows.push(Row::check(
        "latency at half rate",
        "lost + duplicated deliveries",
        bad.to_string(),
        "0",
        bad == 0,
    ));
    // Window 1 on SQLite waits for each commit: against the disk's own
    // fsync latency, measured in the same run on the same file system, a
    // share before each round so that it samples the disk over the same
    // minutes as the rounds.
    let dir = db.parent().unwrap_or(std::path::Path::new("."));
    let mut fsyncs = Vec::with_capacity(FSYNC_SAMPLES);
    let one = Workload {
        window: 1,
        rate: None,
        messages: w.messages.clamp(50, 500),
        ..w
    };
    // The same round trip with nothing to commit: what the relay and the
    // network add on top of the commit. One round's median moves by a third
    // from run to run here, so each server takes turns for ROUNDS rounds and
    // reports its median one.
    let (mut bares, mut singles) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        cpu::fsync_latency(dir, FSYNC_SAMPLES / ROUNDS, &mut fsyncs)?;
        bares.push(fanout::run(Server::Relay(memory.addr), one).await?);
        singles.push(fanout::run(Server::Relay(sqlite.addr), one).await?);
    }
    let fsync = Percentiles::of(&mut fsyncs);
    rows.push(latency_row(
        "durable publish",
        &format!("this disk: 4 KiB write + fdatasync ({FSYNC_SAMPLES} samples, a share before each round)"),
        fsync,
    ));
    let ack_p50 = |o: &fanout::Outcome| f64::from(o.ack_latency.p50);
    let (bare, _) = median_by(bares, ack_p50);
    rows.push(latency_row(
        "durable publish",
        &format!("memory store, window 1: publish->ack (median round of {ROUNDS})"),
        bare.ack_latency,
    ));
    let (single, (lowest, highest)) = median_by(singles, ack_p50);
    rows.push(latency_row(
        "durable publish",
        &format!("SQLite (full), window 1: publish->ack (median round of {ROUNDS})"),
        single.ack_latency,
    ));
    let bad = single.lost + single.duplicated + bare.lost + bare.duplicated;
    rows.push(Row::check(
        "durable publish",
        "window 1: lost + duplicated deliveries",
        bad.to_string(),
        "0",
        bad == 0,
    ));
    let fsync_p50 = f64::from(fsync.p50.max(1));
    let ratio = f64::from(single.ack_latency.p50) / fsync_p50;
    rows.push(Row::check(
        "durable publish",
        "SQLite (full), window 1: publish->ack p50 / fsync p50 (rounds: lowest - highest)",
        format!(
            "{ratio:.2}x ({:.2}x - {:.2}x)",
            lowest / fsync_p50,
            highest / fsync_p50
        ),
        "<= 2x",
        ratio <= 2.0,
    ));
    drop((memory, sqlite, normal));
    Ok(rows)
}

/// Fan-out rounds per server in the throughput and window-1 rows.
const ROUNDS: usize = 3;

/// fsync probe samples in a run, split between the window-1 rounds.
const FSYNC_SAMPLES: usize = 300;

/// The round with the median rate, counting every round's lost and
/// duplicated deliveries, and the slowest and fastest rates.
fn median_round(outcomes: Vec<fanout::Outcome>) -> (fanout::Outcome, String) {
    let (median, (slowest, fastest)) = median_by(outcomes, fanout::Outcome::rate);
    (median, format!("{slowest:.0} - {fastest:.0}"))
}

/// The round whose `key` is the median, carrying every round's losses and
/// duplicates, and the lowest and highest `key`.
fn median_by(
    mut outcomes: Vec<fanout::Outcome>,
    key: impl Fn(&fanout::Outcome) -> f64,
) -> (fanout::Outcome, (f64, f64)) {
    outcomes.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let spread = (
        outcomes.first().map_or(0.0, &key),
        outcomes.last().map_or(0.0, &key),
    );
    let lost = outcomes.iter().map(|o| o.lost).sum();
    let duplicated = outcomes.iter().map(|o| o.duplicated).sum();
    let mut median = outcomes.swap_remove(outcomes.len() / 2);
    median.lost = lost;
    median.duplicated = duplicated;
    (median, spread)
}

/// The servers' CPU time per delivery: the same fan-out again, with the
/// baseline and the relays on a runtime of their own so their threads'
/// time is read apart from the load generator's. (The throughput rows above
/// keep everything on one runtime, as before, so their ratios compare with
/// earlier runs; here both sides pay for crossing between two runtimes.)
async fn cpu_rows(w: Workload) -> Result<Vec<Row>, String> {
    let servers = cpu::server_runtime()?;
    let joined = |e: tokio::task::JoinError| e.to_string();
    let base_addr = servers.spawn(baseline::start()).await.map_err(joined)?;
    let memory = servers
        .spawn(start(Arc::new(MemoryStore::new())))
        .await
        .map_err(joined)??;
    let store = SqliteStore::open(&temp_db()).map_err(|e| e.to_string())?;
    let sqlite = servers
        .spawn(start(Arc::new(store)))
        .await
        .map_err(joined)??;
    let in_process: &CpuSoFar<'_> = &cpu::server_cpu;
    let servers_measured = [
        ("baseline", Server::Baseline(base_addr), in_process),
        (
            "relay, memory store",
            Server::Relay(memory.addr),
            in_process,
        ),
        (
            "relay, SQLite (durability full)",
            Server::Relay(sqlite.addr),
            in_process,
        ),
    ];
    let Some(medians) = cpu_rounds(&servers_measured, w).await? else {
        return Ok(Vec::new()); // no /proc: no CPU rows
    };
    let mut rows = Vec::new();
    let mut per_delivery = Vec::new();
    for ((name, ..), (micros, _)) in servers_measured.iter().zip(medians) {
        rows.push(Row::info(
            "fanout",
            format!("{name}: server CPU (user + sys) per delivery, median of {ROUNDS} rounds"),
            format!("{micros:.2} us"),
        ));
        per_delivery.push(micros);
    }
    let ratio = |i: usize| per_delivery[i] / per_delivery[0].max(1e-9);
    rows.push(Row::check(
        "fanout",
        "memory store / baseline CPU per delivery",
        format!("{:.2}x", ratio(1)),
        "<= 1.2x",
        ratio(1) <= 1.2,
    ));
    rows.push(Row::info(
        "fanout",
        "SQLite (full) / baseline CPU per delivery",
        format!("{:.2}x", ratio(2)),
    ));
    drop((memory, sqlite));
    servers.shutdown_background();
    Ok(rows)
}

/// The CPU time per delivery again with the baseline and the relay (memory
/// store) each in a process of its own, as `perf stat -p` of a separate
/// server sees it: nothing crosses runtimes inside the servers, and the load
/// generator stays in this process.
async fn process_cpu_rows(khub: &std::path::Path, w: Workload) -> Result<Vec<Row>, String> {
    let baseline = ServerChild::baseline(khub)?;
    let relay = ServerChild::spawn(khub, &["--memory".into()])?;
    let (baseline_cpu, relay_cpu) = (|| baseline.cpu(), || relay.cpu());
    let servers_measured: [Measured<'_>; 2] = [
        (
            "baseline, a process of its own",
            Server::Baseline(baseline.addr),
            &baseline_cpu,
        ),
        (
            "relay, memory store, a process of its own",
            Server::Relay(relay.addr),
            &relay_cpu,
        ),
    ];
    let Some(medians) = cpu_rounds(&servers_measured, w).await? else {
        return Ok(Vec::new()); // no /proc: no CPU rows
    };
    let mut rows = Vec::new();
    let mut per_delivery = Vec::new();
    for ((name, ..), (micros, used)) in servers_measured.iter().zip(medians) {
        rows.push(Row::info(
            "fanout",
            format!("{name}: CPU (user + sys) per delivery, median of {ROUNDS} rounds"),
            format!("{micros:.2} us ({} ms in that round)", used.as_millis()),
        ));
        per_delivery.push(micros);
    }
    let ratio = per_delivery[1] / per_delivery[0].max(1e-9);
    rows.push(Row::check(
        "fanout",
        "memory store / baseline CPU per delivery, processes of their own",
        format!("{ratio:.2}x"),
        "<= 1.2x",
        ratio <= 1.2,
    ));
    Ok(rows)
}

/// A server's CPU time so far.
type CpuSoFar<'a> = dyn Fn() -> Option<Duration> + Sync + 'a;
/// A server to measure: its name, address and CPU time so far.
type Measured<'a> = (&'a str, Server, &'a CpuSoFar<'a>);

/// Each server's CPU time per delivery over [`ROUNDS`] fan-out runs, the
/// servers taking turns as in the throughput rows, and each one's median
/// round: a burst from another tenant then moves one round of one server
/// rather than the ratio. `None` where `/proc` does not say.
async fn cpu_rounds(
    servers: &[Measured<'_>],
    w: Workload,
) -> Result<Option<Vec<(f64, Duration)>>, String> {
    let mut rounds = vec![Vec::with_capacity(ROUNDS); servers.len()];
    for _ in 0..ROUNDS {
        for ((name, server, cpu), taken) in servers.iter().zip(&mut rounds) {
            let Some(one) = cpu_per_delivery(name, *server, w, cpu).await? else {
                return Ok(None);
            };
            taken.push(one);
        }
    }
    Ok(Some(
        rounds
            .into_iter()
            .map(|mut taken| {
                taken.sort_by(|a, b| a.0.total_cmp(&b.0));
                taken[taken.len() / 2]
            })
            .collect(),
    ))
}

/// A fan-out run against the server `name` and the CPU time per delivery
/// (in microseconds, and in all) that `cpu`, its CPU time so far, shows for
/// it; `None` where `/proc` does not say. A lost or duplicated delivery is an
/// error.
async fn cpu_per_delivery(
    name: &str,
    server: Server,
    w: Workload,
    cpu: impl Fn() -> Option<Duration>,
) -> Result<Option<(f64, Duration)>, String> {
    let before = cpu();
    let outcome = fanout::run(server, w).await?;
    let bad = outcome.lost + outcome.duplicated;
    if bad != 0 {
        return Err(format!("{name}: {bad} lost or duplicated in the CPU run"));
    }
    Ok(before.zip(cpu()).map(|(before, after)| {
        let used = after.saturating_sub(before);
        let micros = used.as_secs_f64() * 1e6 / outcome.deliveries.max(1) as f64;
        (micros, used)
    }))
}

/// Registers a channel with `n` devices on a relay.
pub(super) async fn channel_with(
    addr: SocketAddr,
    n: usize,
) -> Result<(ChannelId, Vec<(DeviceId, AccessToken)>), String> {
    let mut rng = os_rng();
    let channel = ChannelId::random(&mut rng);
    let members: Vec<(DeviceId, AccessToken)> = (0..n)
        .map(|_| (DeviceId::random(&mut rng), AccessToken::generate(&mut rng)))
        .collect();
    let http = RelayAddr::parse(&format!("http://{addr}")).map_err(|e| e.to_string())?;
    let t = Duration::from_secs(20);
    let create = CreateChannel {
        channel,
        device: members[0].0,
        token_hash: members[0].1.hash(),
    };
    let _: ChannelCreated = http
        .json(Method::POST, "/channels", &[], Some(&create), t)
        .await
        .map_err(|e| e.to_string())?;
    let auth = Credentials {
        channel,
        device: members[0].0,
        token: members[0].1.duplicate(),
    }
    .to_header();
    for (id, token) in &members[1..] {
        let admit = AdmitDevice {
            device: *id,
            token_hash: token.hash(),
        };
        let _: DeviceList = http
            .json(
                Method::POST,
                &format!("/channels/{channel}/devices"),
                &[("authorization", &auth)],
                Some(&admit),
                t,
            )
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok((channel, members))
}

async fn catchup(backlog: usize) -> Result<Vec<Row>, String> {
    let relay = start(Arc::new(
        SqliteStore::open(&temp_db()).map_err(|e| e.to_string())?,
    ))
    .await?;
    let (channel, members) = channel_with(relay.addr, 2).await?;
    // Fill the backlog through the store, many appends in flight so they
    // group-commit: one writer per task, as the store keeps each sender's
    // envelopes in its own order.
    let body_len = padded_len(200) + 24 + 16;
    let mut tasks = tokio::task::JoinSet::new();
    let chunk = backlog.div_ceil(64);
    for part in 0..64 {
        let store = Arc::clone(&relay.relay.hub.store);
        let writer = DeviceId::random(&mut crate::crypto::os_rng());
        tasks.spawn(async move {
            for seq in (part * chunk + 1)..=((part + 1) * chunk).min(backlog) {
                let mut envelope = EnvelopeHeader {
                    channel,
                    epoch: 0,
                    sender: writer,
                    seq: seq as u64,
                }
                .encode()
                .to_vec();
                envelope.resize(envelope.len() + body_len, 0x5a);
                let append = crate::relay::store::Append {
                    channel,
                    sender: writer,
                    sender_seq: seq as u64,
                    envelope: Bytes::from(envelope),
                    now: crate::relay::hub::unix_now(),
                    quota: u64::MAX / 2,
                };
                store.append(append).await.map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| e.to_string())??;
    }
    let (reader, token) = &members[1];
    let started = Instant::now();
    let hello = ClientFrame::Hello {
        v: crate::protocol::PROTOCOL_VERSION,
        channel,
        device: *reader,
        token: token.duplicate(),
        cursor: 0,
    };
    let mut ws = fanout::connect(
        &format!("ws://{}/ws", relay.addr),
        16 * 1024 * 1024,
        Some(&hello.to_text()),
    )
    .await?;
    let mut received = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while received < backlog {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) if text.starts_with("{\"type\":\"deliver\"") => {
                received += 1
            }
            Ok(Some(Ok(_))) => {}
            _ => return Err(format!("catch-up stalled after {received} envelopes")),
        }
    }
    let rate = backlog as f64 / started.elapsed().as_secs_f64();
    Ok(vec![Row::check(
        "catchup",
        format!("resume a backlog of {backlog} (SQLite): envelopes/s"),
        format!("{rate:.0}"),
        ">= 100000",
        rate >= 100_000.0,
    )])
}

async fn pairing(total: usize, concurrency: usize) -> Result<Vec<Row>, String> {
    let relay = start(Arc::new(MemoryStore::new())).await?;
    let (channel, members) = channel_with(relay.addr, 1).await?;
    let (inviter, token) = &members[0];
    let auth = Credentials {
        channel,
        device: *inviter,
        token: token.duplicate(),
    }
    .to_header()
    .to_string();
    let http =
        Arc::new(RelayAddr::parse(&format!("http://{}", relay.addr)).map_err(|e| e.to_string())?);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let per_task = total.div_ceil(concurrency);
    for _ in 0..concurrency {
        let (http, auth) = (Arc::clone(&http), auth.clone());
        tasks.spawn(async move {
            let mut times = Vec::new();
            for _ in 0..per_task {
                let one = Instant::now();
                pair_once(&http, &auth, channel).await?;
                times.push(one.elapsed().as_micros() as u32);
            }
            Ok::<_, String>(times)
        });
    }
    let mut times = Vec::new();
    while let Some(done) = tasks.join_next().await {
        times.extend(done.map_err(|e| e.to_string())??);
    }
    let rate = times.len() as f64 / started.elapsed().as_secs_f64();
    let p = Percentiles::of(&mut times);
    Ok(vec![
        Row::check(
            "pairing",
            format!("complete pairings/s ({concurrency} at once)"),
            format!("{rate:.0}"),
            ">= 300",
            rate >= 300.0,
        ),
        Row::info(
            "pairing",
            "pairing time p50 / p99",
            format!("{} / {}", ms(p.p50), ms(p.p99)),
        ),
    ])
}

/// One full pairing through the mailbox, both sides, with admission: CPace,
/// the joiner's real KeyPackage, and a Welcome-sized stand-in (the MLS commit
/// is measured by the crypto scenario).
async fn pair_once(http: &RelayAddr, auth: &str, channel: ChannelId) -> Result<(), String> {
    let t = Duration::from_secs(30);
    let e = |e: crate::client::ClientError| e.to_string();
    let mut rng = os_rng();
    let mut sid = [0u8; 16];
    rand::Rng::fill_bytes(&mut rng, &mut sid);
    let opened: SlotOpened = http
        .json(
            Method::POST,
            "/pair",
            &[("authorization", auth)],
            Some(&OpenSlot { sid }),
            t,
        )
        .await
        .map_err(e)?;
    let n = opened.nameplate;
    let code = Code::generate(Nameplate::new(n).map_err(|e| e.to_string())?, &mut rng);
    let (inviter, start) = Inviter::start(&code, sid, &mut rng);
    let msgs = format!("/pair/{n}/messages");
    let post = |header: (&'static str, String), message: Vec<u8>| {
        let path = msgs.clone();
        async move {
            let body = PairMessage {
                message: B64(message),
            };
            http.send(
                Method::POST,
                &path,
                &[(header.0, header.1.as_str())],
                Some(serde_json::to_vec(&body).expect("json")),
                t,
            )
            .await
            .map(drop)
        }
    };
    let get = |header: (&'static str, String), after: usize| {
        let path = format!("{msgs}?after={after}&wait=25");
        async move {
            let got: PairMessages = http
                .json(
                    Method::GET,
                    &path,
                    &[(header.0, header.1.as_str())],
                    None::<&()>,
                    t,
                )
                .await?;
            got.messages
                .into_iter()
                .next()
                .map(|B64(m)| m)
                .ok_or(crate::client::ClientError::Timeout(25))
        }
    };
    let a = ("authorization", auth.to_owned());
    post(a.clone(), start).await.map_err(e)?;
    let claimed: SlotClaimed = http
        .json(
            Method::POST,
            &format!("/pair/{n}/claim"),
            &[],
            None::<&()>,
            t,
        )
        .await
        .map_err(e)?;
    let b = (
        CLAIM_HEADER,
        crate::protocol::b64::encode(claimed.claim.expose()),
    );
    let start = get(b.clone(), 0).await.map_err(e)?;
    let me = DeviceId::random(&mut rng);
    let (_joining, key_package) = Joining::start(me, "bench joiner").map_err(|e| e.to_string())?;
    let token = AccessToken::generate(&mut rng);
    let (joiner, response) = Joiner::respond(
        &code,
        claimed.sid,
        &start,
        &DeviceInfo::new(me, token.expose(), key_package),
        &mut rng,
    )
    .map_err(|e| e.to_string())?;
    post(b.clone(), response).await.map_err(e)?;
    let response = get(a.clone(), 0).await.map_err(e)?;
    let admission = inviter.receive(&response).map_err(|e| e.to_string())?;
    let admit = AdmitDevice {
        device: me,
        token_hash: token.hash(),
    };
    let _: DeviceList = http
        .json(
            Method::POST,
            &format!("/channels/{channel}/devices"),
            &[("authorization", auth)],
            Some(&admit),
            t,
        )
        .await
        .map_err(e)?;
    let welcome = crate::pairing::ChannelWelcome {
        channel,
        cursor: 1,
        welcome: vec![0x5a; 2048],
    };
    let (finish, _) = admission.finish(&welcome, &mut rng);
    post(a.clone(), finish).await.map_err(e)?;
    http.send(
        Method::DELETE,
        &format!("/pair/{n}"),
        &[(a.0, a.1.as_str())],
        None,
        t,
    )
    .await
    .map_err(e)?;
    let finish = get(b, 1).await.map_err(e)?;
    joiner.receive(&finish).map_err(|e| e.to_string())?;
    Ok(())
}

async fn idle(khub: &std::path::Path, counts: &[usize]) -> Result<Vec<Row>, String> {
    let max = counts.iter().copied().max().unwrap_or(0);
    let relay = ServerChild::spawn(
        khub,
        &[
            "--memory".into(),
            "--max-connections-per-ip".into(),
            (max + 1000).to_string(),
        ],
    )?;
    let addr = relay.addr;
    let rss = || relay.memory_kib("VmRSS");
    let result = async {
        let (channel, members) = channel_with(addr, 1).await?;
        let (device, token) = &members[0];
        let hello = ClientFrame::Hello {
            v: crate::protocol::PROTOCOL_VERSION,
            channel,
            device: *device,
            token: token.duplicate(),
            cursor: 0,
        }
        .to_text();
        let mut sessions = Vec::new();
        let warm = 200.min(max);
        sessions.extend(open_sessions(addr, &hello, warm).await?);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = rss()?;
        let mut rows = Vec::new();
        for &count in counts {
            let more = count.saturating_sub(sessions.len());
            sessions.extend(open_sessions(addr, &hello, more).await?);
            tokio::time::sleep(Duration::from_millis(300)).await;
            let per = (rss()?.saturating_sub(before)) as f64 / (count - warm).max(1) as f64;
            rows.push(Row::check(
                "idle",
                format!("relay RSS per idle session at {count}"),
                format!("{per:.1} KiB"),
                "<= 16 KiB",
                per <= 16.0,
            ));
        }
        drop(sessions);
        Ok::<_, String>(rows)
    }
    .await;
    drop(relay);
    result
}

/// Opens `count` authenticated sessions (small client buffers: only the relay is measured).
pub(super) async fn open_sessions(
    addr: SocketAddr,
    hello: &str,
    count: usize,
) -> Result<Vec<fanout::Ws>, String> {
    let mut opened = Vec::with_capacity(count);
    for _ in 0..count {
        opened.push(fanout::connect(&format!("ws://{addr}/ws"), 64 * 1024, Some(hello)).await?);
    }
    Ok(opened)
}

/// A channel of `size` devices, every member's view of it, in memory.
pub(super) fn mls_channel(size: usize) -> Vec<Channel> {
    let mut rng = os_rng();
    let mut members = vec![
        Channel::create(
            ChannelId::random(&mut rng),
            DeviceId::random(&mut rng),
            "bench 0",
            0,
        )
        .expect("create"),
    ];
    for i in 1..size {
        let id = DeviceId::random(&mut rng);
        let (joining, key_package) = Joining::start(id, &format!("bench {i}")).expect("kp");
        let (commit, welcome) = members[0].commit_add(id, &key_package).expect("add");
        for member in &mut members {
            member.take_in(&commit.envelope, 0);
        }
        let channel = members[0].channel();
        members.push(joining.join(channel, &welcome, 0).expect("join").channel);
    }
    members
}

fn crypto() -> Vec<Row> {
    let mut pair = mls_channel(2);
    let mut receiver = pair.pop().expect("two");
    let mut sender = pair.pop().expect("two");
    let mut rows = Vec::new();
    for size in [200usize, 4096, 65536] {
        let body = vec![7u8; size];
        let started = Instant::now();
        let mut bytes = 0u64;
        let mut envelope_len = 0;
        while started.elapsed() < Duration::from_millis(700) {
            let sealed = sender.seal(&body).expect("seal");
            envelope_len = sealed.envelope.len();
            let taken = receiver.take_in(&sealed.envelope, 0);
            assert!(matches!(taken.event, Some(Event::App { .. })), "opens");
            bytes += size as u64;
        }
        let mb = bytes as f64 / started.elapsed().as_secs_f64() / 1e6;
        rows.push(Row::info(
            "crypto",
            format!("MLS seal + open, {size} B"),
            format!("{mb:.1} MB/s"),
        ));
        rows.push(Row::info(
            "crypto",
            format!("envelope bytes for {size} B"),
            envelope_len.to_string(),
        ));
    }
    let mut channel = mls_channel(32);
    let started = Instant::now();
    let victim = channel[31].me();
    let commit = channel[0].commit_remove(&[victim]).expect("remove");
    channel[0].take_in(&commit.envelope, 0);
    let committed = started.elapsed();
    let started = Instant::now();
    let taken = channel[1].take_in(&commit.envelope, 0);
    assert!(matches!(taken.event, Some(Event::Commit { .. })), "applies");
    let applied = started.elapsed();
    rows.push(Row::info(
        "crypto",
        "remove 1 of 32 devices: commit / apply on another member",
        format!(
            "{:.2} ms / {:.2} ms ({} B commit)",
            committed.as_secs_f64() * 1e3,
            applied.as_secs_f64() * 1e3,
            commit.envelope.len()
        ),
    ));
    rows
}
