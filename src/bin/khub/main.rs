//! The `khub` command: argument parsing, logging setup and output only; the work
//! is in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use khub::relay::Relay;
use khub::relay::config::{Limits, RelayConfig};
use khub::relay::store::memory::MemoryStore;
use khub::relay::store::sqlite::{Durability, SqliteStore};

mod note;
mod peer;

/// khub: end-to-end encrypted sync relay and reference device.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay.
    Serve(Box<ServeArgs>),
    /// Create a channel on a relay with this device as its first member.
    Init {
        #[command(flatten)]
        home: HomeArg,
        /// The relay, like http://127.0.0.1:3000.
        #[arg(long, env = "KHUB_RELAY")]
        relay: String,
        /// A name for this device ("laptop"), shown to the other devices.
        #[arg(long)]
        name: String,
    },
    /// Show a one-time code and wait for another device to join with it.
    Invite {
        #[command(flatten)]
        home: HomeArg,
        /// Seconds to wait for the other device.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Join a channel with the code shown on another device (typed at the
    /// prompt, or read from stdin; never from the command line).
    Join {
        #[command(flatten)]
        home: HomeArg,
        /// The relay, like http://127.0.0.1:3000.
        #[arg(long, env = "KHUB_RELAY")]
        relay: String,
        /// A name for this device ("phone"), shown to the other devices.
        #[arg(long)]
        name: String,
        /// Seconds to wait for the other device.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Forget a device already kept in this home first (what `khub leave
        /// --yes` does), once the code is typed: for a device that was
        /// removed, or whose channel or relay is gone.
        #[arg(long)]
        force: bool,
    },
    /// Send a message (TEXT, or stdin) to the other devices.
    Send {
        #[command(flatten)]
        home: HomeArg,
        /// The message; read from stdin if absent.
        text: Option<String>,
        /// Seconds to wait for the relay before leaving it queued.
        #[arg(long, default_value_t = 10)]
        wait: u64,
    },
    /// Print messages as they arrive.
    Listen {
        #[command(flatten)]
        home: HomeArg,
        /// One JSON object per line: from, from_name, seq, and text or body_b64.
        #[arg(long)]
        json: bool,
        /// Print everything pending, then exit.
        #[arg(long)]
        drain: bool,
    },
    /// List the channel's devices.
    Devices {
        #[command(flatten)]
        home: HomeArg,
    },
    /// Show what this device refused — tampered, forged, replayed, from a
    /// removed device, from a fork of the channel's history — and gaps.
    Incidents {
        #[command(flatten)]
        home: HomeArg,
        /// One JSON object per line: seq, kind, sender, detail.
        #[arg(long)]
        json: bool,
    },
    /// Forget the device kept in this home (its keys, messages and state),
    /// so that the home can pair again. Remove it from another device first
    /// if it is still a member.
    Leave {
        #[command(flatten)]
        home: HomeArg,
        /// Do not ask for confirmation (required when stdin is not a terminal).
        #[arg(long)]
        yes: bool,
    },
    /// Remove a device: revoke it at the relay and commit its removal (MLS).
    Remove {
        #[command(flatten)]
        home: HomeArg,
        /// The device's name or id (see `khub devices`).
        device: String,
    },
    /// Notes that sync between the channel's devices, merged when edited
    /// offline: new, edit, show, list, rm, restore.
    Note {
        #[command(subcommand)]
        command: note::NoteCommand,
    },
    /// Be a scriptable reference device for testing another SDK: pair, then
    /// send stdin's lines, and report everything as JSON lines on stdout.
    Peer(Box<peer::PeerArgs>),
    /// Measure the relay against a bare baseline in the same run; prints a
    /// Markdown table (run it with --release).
    Bench(Box<BenchArgs>),
    /// Write the published test vectors (pairing, envelope framing) for checking
    /// another implementation against this one.
    Vectors {
        /// Directory to write the JSON files into (created if missing).
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

#[derive(Args)]
struct BenchArgs {
    /// Scenarios: all, fanout, catchup, idle, pairing, crypto, notes, and soak
    /// and postgres (not in all; see tests/soak/run) — repeat or comma-separate.
    #[arg(long = "scenario", value_delimiter = ',', default_value = "all")]
    scenarios: Vec<String>,
    /// PostgreSQL server for the postgres scenario; it makes a database of its
    /// own there for the run and drops it after.
    #[arg(
        long,
        env = "KHUB_BENCH_POSTGRES",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
    )]
    postgres: String,
    /// Appends per store in the postgres scenario.
    #[arg(long, default_value_t = 20_000)]
    appends: usize,
    /// Channels in the fan-out.
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// Devices per channel.
    #[arg(long, default_value_t = 5)]
    devices: usize,
    /// Senders per channel.
    #[arg(long, default_value_t = 5)]
    senders: usize,
    /// Plaintext bytes per message.
    #[arg(long, default_value_t = 200)]
    payload: usize,
    /// Unacked messages per sender.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Messages per sender.
    #[arg(long, default_value_t = 4000)]
    messages: usize,
    /// Envelopes in the catch-up backlog.
    #[arg(long, default_value_t = 100_000)]
    backlog: usize,
    /// Session counts for the idle-memory scenario.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    idle: Vec<usize>,
    /// Pairings to complete.
    #[arg(long, default_value_t = 600)]
    pairings: usize,
    /// Pairings in flight at once.
    #[arg(long, default_value_t = 8)]
    pairing_concurrency: usize,
    /// Run the fan-out against this relay (host:port) instead of in-process ones.
    #[arg(long)]
    relay: Option<SocketAddr>,
    /// Soak: device sessions held at once.
    #[arg(long, default_value_t = 5000)]
    soak_sessions: usize,
    /// Soak: seconds of traffic.
    #[arg(long, default_value_t = 60)]
    soak_seconds: u64,
    /// Soak: seconds between two publishes of one device.
    #[arg(long, default_value_t = 5.0)]
    soak_interval: f64,
    /// Serve only the bare baseline until killed (the fan-out's CPU rows start
    /// it as a process of its own).
    #[arg(long, hide = true)]
    serve_baseline: bool,
}

/// `--retention-days`: 0 would delete every envelope as soon as it is stored.
fn retention_days(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(0) => Err("0 would delete every envelope at the next retention pass (hourly), so a device offline for a moment would miss it: give 1 or more".into()),
        Ok(days) => Ok(days),
        Err(_) => Err(format!("{text:?} is not a number of days")),
    }
}

/// `--listen` and `--metrics-listen`: an address and a port, said so when
/// only one of them is given.
fn listen_address(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let usage = "give HOST:PORT, like 127.0.0.1:3000 (this machine only), 0.0.0.0:3000 (every interface) or [::1]:3000";
    if !text.contains(':') {
        return Err(format!("{text:?} is not an address and a port: {usage}"));
    }
    // A name (`localhost:3000`): its first IPv4 address, as devices told
    // `http://127.0.0.1:…` expect, else its first.
    use std::net::ToSocketAddrs;
    match text.to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            addrs
                .iter()
                .find(|a| a.is_ipv4())
                .or(addrs.first())
                .copied()
                .ok_or_else(|| format!("{text:?} names no address: {usage}"))
        }
        Err(e) => Err(format!(
            "{text:?} is not an address and a port ({e}): {usage}"
        )),
    }
}

/// Where a device keeps its state.
#[derive(Args, Default)]
struct HomeArg {
    /// The device's state directory [default: $XDG_DATA_HOME/khub or ~/.local/share/khub].
    #[arg(long, env = "KHUB_HOME")]
    home: Option<PathBuf>,
}

impl HomeArg {
    fn path(&self) -> anyhow::Result<PathBuf> {
        if let Some(home) = &self.home {
            return Ok(home.clone());
        }
        if let Some(data) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
            return Ok(PathBuf::from(data).join("khub"));
        }
        let home = std::env::var_os("HOME")
            .context("set --home or KHUB_HOME: no home directory is known")?;
        Ok(PathBuf::from(home).join(".local/share/khub"))
    }
}

/// `--forwarded-header`.
#[derive(Clone, Copy, ValueEnum)]
enum ForwardedHeaderArg {
    /// `X-Forwarded-For`.
    XForwardedFor,
    /// `Forwarded` (RFC 7239).
    Forwarded,
}

#[derive(Clone, Copy, ValueEnum)]
enum DurabilityArg {
    Full,
    Normal,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Relay settings. Every flag also reads a `KHUB_*` environment variable. The
/// operator secret is read only from the environment or a file, never from argv.
#[derive(Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "KHUB_LISTEN", default_value = "127.0.0.1:3000", value_parser = listen_address)]
    listen: SocketAddr,
    /// Address to serve `/metrics` (and `/healthz`) on for the operator. Without
    /// it, `/metrics` is served on --listen only if that is a loopback address.
    #[arg(long, env = "KHUB_METRICS_LISTEN", value_parser = listen_address)]
    metrics_listen: Option<SocketAddr>,
    /// Where the relay keeps its state: `sqlite:PATH` (the default is
    /// `sqlite:khub.sqlite3`), `memory` (lost on exit), or `postgres://…` for
    /// several relay nodes on one database (a khub built with `--features
    /// postgres`). A URL with a password belongs in KHUB_STORE, not on the
    /// command line, where every local user can read it.
    #[arg(long, env = "KHUB_STORE", hide_env_values = true)]
    store: Option<String>,
    /// PostgreSQL connections this node may open (`--store postgres://…`).
    #[arg(long, env = "KHUB_STORE_POOL", default_value_t = 16)]
    store_pool: usize,
    /// PEM file of CA certificates to trust for PostgreSQL's TLS besides the
    /// public roots (with `sslmode=require` in the URL).
    #[arg(long, env = "KHUB_STORE_CA_FILE")]
    store_ca_file: Option<PathBuf>,
    /// SQLite database file (created if missing); same as `--store
    /// sqlite:PATH` [default: khub.sqlite3].
    #[arg(long, env = "KHUB_DB")]
    db: Option<PathBuf>,
    /// When an envelope counts as stored (and is acked): `full` fsyncs every
    /// commit (survives power loss); `normal` survives a relay crash or kill but
    /// not an OS crash or power cut, and is several times faster on slow disks.
    #[arg(long, env = "KHUB_DURABILITY", value_enum, default_value = "full")]
    durability: DurabilityArg,
    /// Keep everything in memory instead (lost on exit). KHUB_MEMORY takes
    /// true/false, 1/0, yes/no or on/off.
    #[arg(long, env = "KHUB_MEMORY", value_parser = clap::builder::BoolishValueParser::new())]
    memory: bool,
    /// Delete envelopes older than this many days (at least 1).
    #[arg(long, env = "KHUB_RETENTION_DAYS", default_value_t = 90, value_parser = retention_days)]
    retention_days: u64,
    /// Bytes of envelopes each channel may store, in MiB.
    #[arg(long, env = "KHUB_CHANNEL_QUOTA_MIB", default_value_t = 256)]
    channel_quota_mib: u64,
    /// Largest envelope, in bytes (at most the default, the largest a device opens).
    #[arg(long, env = "KHUB_MAX_ENVELOPE_BYTES", default_value_t = Limits::default().max_envelope_bytes)]
    max_envelope_bytes: usize,
    /// Largest WebSocket frame, in bytes; a `POST /sync` body may be 16 times this.
    #[arg(long, env = "KHUB_MAX_FRAME_BYTES", default_value_t = Limits::default().max_frame_bytes)]
    max_frame_bytes: usize,
    /// Open connections per client address; one more is closed at accept.
    #[arg(long, env = "KHUB_MAX_CONNECTIONS_PER_IP", default_value_t = Limits::default().max_connections_per_ip)]
    max_connections_per_ip: usize,
    /// Open connections in all; at this many the relay stops accepting until one closes.
    #[arg(long, env = "KHUB_MAX_CONNECTIONS", default_value_t = Limits::default().max_connections)]
    max_connections: usize,
    /// Seconds a connection has to send a request's headers (new, or idle
    /// between requests); 0 counts as 1.
    #[arg(long, env = "KHUB_HEADER_TIMEOUT_SECS", default_value_t = Limits::default().header_timeout.as_secs())]
    header_timeout_secs: u64,
    /// Pairing slots one device may hold open at once (0 counts as 1).
    #[arg(long, env = "KHUB_MAX_SLOTS_PER_DEVICE", default_value_t = Limits::default().max_slots_per_device)]
    max_slots_per_device: usize,
    /// Pairing slots one channel's devices may hold open at once (0 counts as 1).
    #[arg(long, env = "KHUB_MAX_SLOTS_PER_CHANNEL", default_value_t = Limits::default().max_slots_per_channel)]
    max_slots_per_channel: usize,
    /// Messages one side may post into a pairing slot (below 3, what a
    /// pairing needs, counts as 3).
    #[arg(long, env = "KHUB_MAX_PAIRING_MESSAGES", default_value_t = Limits::default().max_pairing_messages)]
    max_pairing_messages: usize,
    /// Seconds a request has from its headers to the answer, body included
    /// (0 counts as 1).
    #[arg(long, env = "KHUB_REQUEST_TIMEOUT_SECS", default_value_t = Limits::default().request_timeout.as_secs())]
    request_timeout_secs: u64,
    /// Pairing claims per client address per minute.
    #[arg(long, env = "KHUB_CLAIMS_PER_MINUTE", default_value_t = Limits::default().claims_per_minute)]
    claims_per_minute: u32,
    /// Channels created per client address per hour.
    #[arg(long, env = "KHUB_CHANNELS_PER_HOUR", default_value_t = Limits::default().channels_per_hour)]
    channels_per_hour: u32,
    /// Active devices per channel.
    #[arg(long, env = "KHUB_MAX_DEVICES_PER_CHANNEL", default_value_t = Limits::default().max_devices_per_channel)]
    max_devices_per_channel: usize,
    /// Seconds without any frame (or pong) before a session is closed.
    #[arg(long, env = "KHUB_IDLE_TIMEOUT_SECS", default_value_t = Limits::default().idle_timeout.as_secs())]
    idle_timeout_secs: u64,
    /// Seconds a device may take to read a batch of deliveries.
    #[arg(long, env = "KHUB_SLOW_READER_TIMEOUT_SECS", default_value_t = Limits::default().slow_reader_timeout.as_secs())]
    slow_reader_timeout_secs: u64,
    /// Seconds a pairing code stays valid.
    #[arg(long, env = "KHUB_PAIRING_TTL_SECS", default_value_t = Limits::default().pairing_ttl.as_secs())]
    pairing_ttl_secs: u64,
    /// Proxy (CIDR, or one address) whose Forwarded / X-Forwarded-For header
    /// names the client for the per-address limits (repeat, or comma-separate
    /// in KHUB_TRUSTED_PROXIES). Without one, those headers are ignored.
    #[arg(
        long = "trusted-proxy",
        env = "KHUB_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    trusted_proxies: Vec<String>,
    /// The header trusted proxies write the client's address into; the other
    /// one is ignored (a proxy passes it through as the client wrote it).
    #[arg(
        long,
        env = "KHUB_FORWARDED_HEADER",
        value_enum,
        default_value = "x-forwarded-for"
    )]
    forwarded_header: ForwardedHeaderArg,
    /// MiB of envelopes the store may hold in all (0: no limit; the file
    /// takes more, for its indexes); past it publishes and new channels are
    /// refused with `storage_full` until retention frees room.
    #[arg(long, env = "KHUB_MAX_DB_MIB", default_value_t = 10240)]
    max_db_mib: u64,
    /// Browser origin allowed to use the relay, /ws and the HTTP routes with
    /// CORS, like https://app.example.org (repeat, or comma-separate in
    /// KHUB_ALLOWED_ORIGINS).
    #[arg(
        long = "allowed-origin",
        env = "KHUB_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    allowed_origins: Vec<String>,
    /// File holding the operator secret needed to create channels (or set
    /// KHUB_OPERATOR_SECRET). Without one, anyone may create channels (rate-limited).
    #[arg(long, env = "KHUB_OPERATOR_SECRET_FILE")]
    operator_secret_file: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "KHUB_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            std::process::ExitCode::FAILURE
        }
    }
}

/// Prints an error as people read it: `Error: …`, each cause that adds
/// something on its own line, and what to do next — never a backtrace.
fn report(error: &anyhow::Error) {
    let mut said = distinct_causes(error.chain()).into_iter();
    eprintln!("Error: {}", said.next().unwrap_or_default());
    for cause in said {
        eprintln!("  because: {cause}");
    }
    if let Some(hint) = hint(error) {
        eprintln!("  next: {hint}");
    }
}

/// An error's text, then each cause's that adds something to what was said.
fn distinct_causes<'a>(
    chain: impl Iterator<Item = &'a (dyn std::error::Error + 'static)>,
) -> Vec<String> {
    let (mut said, mut all) = (String::new(), Vec::new());
    for cause in chain {
        let text = cause.to_string();
        if all.is_empty() || !said.contains(&text) {
            said.push_str(&text);
            all.push(text);
        }
    }
    all
}

/// What a person can do about `error`, when there is something to say.
fn hint(error: &anyhow::Error) -> Option<String> {
    use khub::client::{ClientError, Reach};
    if let Some(listen) = error.chain().find_map(|e| e.downcast_ref::<ListenError>()) {
        let flag = listen.flag;
        return match listen.source.kind() {
            std::io::ErrorKind::AddrInUse => Some(format!(
                "another program (another `khub serve`?) listens there: stop it, or give another address with {flag} HOST:PORT"
            )),
            std::io::ErrorKind::AddrNotAvailable => Some(format!(
                "that address is not one of this machine's: {flag} 127.0.0.1:PORT serves this machine only, 0.0.0.0:PORT every interface"
            )),
            _ => None,
        };
    }
    let client = error
        .chain()
        .find_map(|e| e.downcast_ref::<ClientError>())?;
    Some(match client {
        ClientError::Unreachable {
            relay,
            reason: Reach::Refused,
            ..
        } => format!(
            "nothing answers at {relay}: is the relay running (`khub serve`), and is the address right?"
        ),
        ClientError::Unreachable {
            relay,
            reason: Reach::NotTls,
            ..
        } => {
            format!("{relay} does not speak TLS: use http:// for a relay without TLS, or put it behind a TLS proxy")
        }
        ClientError::Unreachable {
            reason: Reach::Certificate,
            ..
        } => "the relay's TLS certificate is not trusted for this address: check the host name, or set KHUB_CA_FILE to the PEM file of the CA that signed it".into(),
        ClientError::Unreachable { .. } | ClientError::Timeout(_) => {
            "check the network and the relay's address, then try again".into()
        }
        ClientError::Revoked => {
            "this home holds a removed device: `khub leave` forgets it, then `khub join` pairs it again".into()
        }
        ClientError::Unauthorized => {
            "the relay does not know this device: check --relay, or `khub leave` and pair again".into()
        }
        ClientError::AlreadyInitialized(_) => {
            "use another --home, or `khub leave` to forget the device kept there (`khub join --force` pairs this home again in one step)".into()
        }
        // A new code would be refused the same way (a full channel, say).
        ClientError::Pairing(khub::pairing::PairingError::PeerAborted(
            khub::pairing::AbortReason::Refused,
        )) => return None,
        ClientError::Pairing(_)
        | ClientError::PairingTimeout(_)
        | ClientError::NoAnswer(_)
        | ClientError::CodeEnded
        | ClientError::NotConfirmed => {
            "`khub invite` on a device already in the channel shows a new code; type it on the new device with `khub join`".into()
        }
        ClientError::Relay {
            code: khub::protocol::ErrorCode::Forbidden,
            ..
        } => "set KHUB_OPERATOR_SECRET to this relay's operator secret (its operator has it; it is never an argument)".into(),
        _ => return None,
    })
}

fn run() -> anyhow::Result<()> {
    let command = Cli::parse().command;
    if let Command::Serve(args) = command {
        return serve(*args);
    }
    if let Command::Bench(args) = command {
        return bench(*args);
    }
    if let Command::Vectors { out } = &command {
        return write_vectors(out);
    }
    // Device commands say what happened themselves (errors, incidents); their
    // logs show only with KHUB_LOG (e.g. `warn`, `debug`).
    let filter = tracing_subscriber::EnvFilter::try_from_env("KHUB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(device::run(command))
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if args.serve_baseline {
        return Ok(khub::bench::serve_baseline()?);
    }
    let options = khub::bench::Options {
        scenarios: args.scenarios,
        workload: khub::bench::fanout::Workload {
            channels: args.channels,
            devices: args.devices,
            senders: args.senders.min(args.devices),
            window: args.window.max(1),
            payload: args.payload,
            messages: args.messages.max(1),
            rate: None,
        },
        backlog: args.backlog,
        idle: args.idle,
        pairings: args.pairings,
        pairing_concurrency: args.pairing_concurrency.max(1),
        khub: std::env::current_exe()?,
        relay: args.relay,
        soak: khub::bench::Soak {
            sessions: args.soak_sessions,
            seconds: args.soak_seconds,
            interval: args.soak_interval,
        },
        postgres: args.postgres,
        appends: args.appends.max(64),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let rows = runtime
        .block_on(khub::bench::run(&options))
        .map_err(anyhow::Error::msg)?;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("khub bench on {cores} cores, {}\n", std::env::consts::ARCH);
    print!("{}", khub::bench::table(&rows));
    Ok(())
}

fn write_vectors(out: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for (name, text) in khub::vectors::generate() {
        let path = out.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The device commands: thin wrappers over `khub::client`.
mod device {
    use std::io::{BufRead, IsTerminal, Read, Write};
    use std::time::Duration;

    use anyhow::bail;
    use khub::client::{ClientError, Device, Message, Sent, join};
    use khub::pairing::Code;

    use super::Command;

    pub async fn run(command: Command) -> anyhow::Result<()> {
        // A private CA for a self-hosted https:// relay.
        if let Some(path) = std::env::var_os("KHUB_CA_FILE").filter(|p| !p.is_empty()) {
            khub::client::trust_pem_file(std::path::Path::new(&path))?;
        }
        match command {
            Command::Init { home, relay, name } => {
                let home = home.path()?;
                let device = Device::create(&home, &relay, &name).await?;
                println!(
                    "created channel {} on {}",
                    device.channel(),
                    device.relay_url()
                );
                println!("this device: {} ({})", device.id(), device.name());
                println!(
                    "next: run `khub invite{}` here and `khub join` on the other device",
                    home_flag(&home)
                );
            }
            Command::Invite { home, timeout } => {
                let device = Device::open(&home.path()?)?;
                // Listening before the code is shown: a Ctrl-C at any moment after
                // that ends the slot instead of killing the process.
                let mut interrupted = Interrupt::listen()?;
                let invitation = device.invite().await?;
                println!("code: {}", invitation.code().as_str());
                std::io::stdout().flush()?;
                let valid = invitation.expires_in().as_secs().min(timeout);
                eprintln!("type this code on the other device with `khub join` (valid {valid} s)");
                let cancel = invitation.canceller();
                let completing = invitation.complete(Duration::from_secs(timeout));
                tokio::pin!(completing);
                let member = tokio::select! {
                    member = &mut completing => member?,
                    _ = interrupted.recv() => {
                        // The pairing undoes what it did (an admission, an
                        // Add) before it ends; past the welcome it finishes.
                        cancel.cancel().await;
                        tokio::select! {
                            member = &mut completing => member?,
                            _ = interrupted.recv() => bail!(
                                "stopped before the pairing was undone: check `khub devices`, and `khub remove` a device that should not be there"
                            ),
                        }
                    }
                };
                println!("paired with {} ({})", member.name, member.id);
                println!(
                    "authentication string: {} (check the other screen shows the same)",
                    member.sas
                );
            }
            Command::Join {
                home,
                relay,
                name,
                timeout,
                force,
            } => {
                let code = read_code()?;
                let home = home.path()?;
                if force && home.join(khub::client::STATE_FILE).exists() {
                    khub::client::forget(&home)?;
                    eprintln!(
                        "forgot the device kept in {} (if it is still a member, remove it from another device)",
                        home.display()
                    );
                }
                let joining = join(&home, &relay, &name, &code, Duration::from_secs(timeout));
                tokio::pin!(joining);
                // A pairing takes a second or two; past that, the wait is said.
                let (device, joined) = tokio::select! {
                    joined = &mut joining => joined?,
                    () = tokio::time::sleep(JOIN_QUIET) => {
                        eprintln!(
                            "waiting for the device that showed the code to answer (up to {timeout} s in all)"
                        );
                        joining.await?
                    }
                };
                println!(
                    "joined channel {} as {} ({})",
                    device.channel(),
                    device.name(),
                    device.id()
                );
                println!(
                    "paired with {} ({})",
                    joined.inviter.name, joined.inviter.id
                );
                println!(
                    "authentication string: {} (check the other screen shows the same)",
                    joined.sas
                );
            }
            Command::Send { home, text, wait } => {
                let device = Device::open(&home.path()?)?;
                let body = match text {
                    Some(text) => text.into_bytes(),
                    None => {
                        if std::io::stdin().is_terminal() {
                            eprintln!("Type the message; end it with Ctrl-D on a line of its own:");
                        }
                        let mut body = Vec::new();
                        std::io::stdin().read_to_end(&mut body)?;
                        // `echo note | khub send` adds one newline; the note does not have it.
                        if body.ends_with(b"\n") {
                            body.pop();
                        }
                        body
                    }
                };
                if body.is_empty() {
                    bail!("nothing to send: give the message as an argument, or on stdin");
                }
                // Refused before a connection starts, which could say first
                // that the relay does not answer.
                khub::client::control::check_message(&body)?;
                let session = device.connect();
                let mut status = session.status_watch();
                // Said once each, rather than waiting in silence for the
                // whole --wait: that the relay does not answer, and that it
                // answered but holds the message back.
                let (mut watching, mut unreachable_said, mut held) = (true, false, false);
                let sent = {
                    let sending = session.send(&body, Duration::from_secs(wait));
                    tokio::pin!(sending);
                    loop {
                        tokio::select! {
                            biased;
                            sent = &mut sending => break sent?,
                            changed = status.changed(), if watching && !held => {
                                watching = changed.is_ok();
                                let now = status.borrow_and_update().clone();
                                let why = match now {
                                    khub::client::Status::Connecting { error: Some(e), .. } if !unreachable_said => {
                                        unreachable_said = true;
                                        describe(&e)
                                    }
                                    khub::client::Status::Live { held_back: Some(e), .. } => {
                                        held = true;
                                        format!("the relay does not store it for now: {}", describe(&e))
                                    }
                                    _ => continue,
                                };
                                eprintln!(
                                    "{why}; the message is kept on this device, waiting up to {wait} s for the relay"
                                );
                            }
                        }
                    }
                };
                match sent {
                    Sent::Acked { seq } => println!("sent (relay seq {seq})"),
                    Sent::Queued if held => println!(
                        "queued: the relay has not stored it yet; it goes out with the next `khub send` or `khub listen`"
                    ),
                    Sent::Queued => println!(
                        "queued offline: it goes out with the next `khub send` or `khub listen`"
                    ),
                }
                session.close().await;
            }
            Command::Listen { home, json, drain } => {
                let device = Device::open(&home.path()?)?;
                let mut reported = device.incidents()?.len();
                if drain {
                    let synced = device.sync().await;
                    report_incidents(&device, &mut reported)?;
                    synced?;
                    let mut printed = 0;
                    while let Some(message) = device.next_unread()? {
                        print_message(&message, json)?;
                        device.mark_read(message.seq)?;
                        printed += 1;
                    }
                    if printed == 0 {
                        eprintln!("nothing new");
                    }
                } else {
                    let session = device.connect();
                    let mut status = session.status_watch();
                    // Until the session's task ends (`recv` then says why).
                    let mut watching = true;
                    let mut tick = tokio::time::interval(Duration::from_secs(1));
                    let mut told = None;
                    loop {
                        tokio::select! {
                            message = session.recv() => {
                                let message = message?;
                                print_message(&message, json)?;
                                device.mark_read(message.seq)?;
                            }
                            changed = status.changed(), if watching => watching = changed.is_ok(),
                            _ = tick.tick() => {}
                        }
                        report_incidents(&device, &mut reported)?;
                        let now = status.borrow_and_update().clone();
                        report_status(&now, &mut told);
                    }
                }
            }
            Command::Incidents { home, json } => {
                let device = Device::open(&home.path()?)?;
                match device.sync().await {
                    Ok(_) => {}
                    Err(e @ (ClientError::Revoked | ClientError::Unauthorized)) => {
                        return Err(e.into());
                    }
                    Err(e) => eprintln!(
                        "could not catch up with the relay ({e}); these are the incidents recorded so far"
                    ),
                }
                let incidents = device.incidents()?;
                if incidents.is_empty() && !json {
                    println!("no incidents recorded");
                }
                for incident in incidents {
                    if json {
                        println!("{}", serde_json::to_string(&incident)?);
                    } else {
                        let sender = incident
                            .sender
                            .map(|s| format!(" from {s}"))
                            .unwrap_or_default();
                        println!(
                            "relay seq {}  {}{sender}: {}",
                            incident.seq,
                            incident.kind.as_str(),
                            incident.detail
                        );
                    }
                }
            }
            Command::Devices { home } => {
                let device = Device::open(&home.path()?)?;
                let admitted = match device.relay_devices().await {
                    Ok(admitted) => Some(admitted),
                    // A removed or unknown device says so, like every command.
                    Err(e @ (ClientError::Revoked | ClientError::Unauthorized)) => {
                        return Err(e.into());
                    }
                    Err(e) => {
                        eprintln!(
                            "could not ask the relay which devices it lets in ({e}); this is this device's own view"
                        );
                        None
                    }
                };
                for member in device.members()? {
                    let mut notes = Vec::new();
                    if member.id == device.id() {
                        notes.push("this device");
                    }
                    if admitted
                        .as_ref()
                        .is_some_and(|ids| !ids.contains(&member.id))
                    {
                        notes.push("no longer let in by the relay");
                    }
                    let notes = if notes.is_empty() {
                        String::new()
                    } else {
                        format!("  ({})", notes.join(", "))
                    };
                    println!("{}  {}{notes}", member.id, member.name);
                }
            }
            Command::Leave { home, yes } => {
                let home = home.path()?;
                let device = Device::open(&home)?;
                let (name, id) = (device.name().to_owned(), device.id());
                if !yes {
                    if !std::io::stdin().is_terminal() {
                        bail!("`khub leave` forgets this device for good: confirm with --yes");
                    }
                    eprint!(
                        "Forget the device {name} ({id}) kept in {}? Type its name to confirm: ",
                        home.display()
                    );
                    std::io::stderr().flush()?;
                    let mut line = String::new();
                    std::io::stdin().lock().read_line(&mut line)?;
                    if line.trim() != name {
                        bail!("not confirmed: nothing was forgotten");
                    }
                }
                let removed = device.is_removed();
                drop(device);
                khub::client::forget(&home)?;
                println!(
                    "forgot {name} ({id}); {} can pair again with `khub join`",
                    home.display()
                );
                if !removed {
                    eprintln!(
                        "if {name} is still a member, remove it from another device: `khub remove {name}`"
                    );
                }
            }
            Command::Remove { home, device: id } => {
                let device = Device::open(&home.path()?)?;
                let members = device.members()?;
                let id = match id.parse::<khub::ids::DeviceId>() {
                    Ok(id) => id,
                    Err(_) => {
                        let named: Vec<_> = members.iter().filter(|m| m.name == id).collect();
                        match named.as_slice() {
                            [one] => one.id,
                            [] => bail!("no device is named {id:?}: see `khub devices`"),
                            _ => bail!(
                                "{} devices are named {id:?}; remove one by its id (see `khub devices`)",
                                named.len()
                            ),
                        }
                    }
                };
                let name = members
                    .iter()
                    .find(|m| m.id == id)
                    .map_or_else(String::new, |m| format!("{} ", m.name));
                device.remove(id).await?;
                println!(
                    "removed {name}({id}); the channel moved to a new MLS epoch it cannot read"
                );
            }
            Command::Peer(args) => super::peer::run(*args).await?,
            Command::Note { command } => super::note::run(command).await?,
            Command::Serve(_) | Command::Bench(_) | Command::Vectors { .. } => {
                unreachable!("handled before the runtime starts")
            }
        }
        Ok(())
    }

    /// ` --home DIR` when the home is not the one a command finds without
    /// it, so that a printed command can be run as it stands.
    fn home_flag(home: &std::path::Path) -> String {
        let found = match std::env::var_os("KHUB_HOME").filter(|v| !v.is_empty()) {
            Some(set) => Some(std::path::PathBuf::from(set)),
            None => super::HomeArg::default().path().ok(),
        };
        if found.as_deref() == Some(home) {
            return String::new();
        }
        let shown = home.display().to_string();
        if shown
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+".contains(c))
        {
            format!(" --home {shown}")
        } else {
            format!(" --home '{}'", shown.replace('\'', "'\\''"))
        }
    }

    /// How long `join` waits before it says that it waits.
    const JOIN_QUIET: Duration = Duration::from_secs(5);

    /// The code, from a prompt on a terminal or a line on stdin — never argv.
    fn read_code() -> anyhow::Result<Code> {
        let stdin = std::io::stdin();
        if stdin.is_terminal() {
            eprint!("Enter the code shown on the other device: ");
            std::io::stderr().flush()?;
        }
        let mut line = zeroize::Zeroizing::new(String::new());
        stdin.lock().read_line(&mut line)?;
        if line.trim().is_empty() {
            bail!("no code given: type the code shown on the other device (like 42-7QK3-M9TZ)");
        }
        Ok(Code::parse(&line)?)
    }

    /// Ctrl-C, listened for from the moment it is made.
    struct Interrupt(#[cfg(unix)] tokio::signal::unix::Signal);

    impl Interrupt {
        fn listen() -> anyhow::Result<Self> {
            #[cfg(unix)]
            return Ok(Self(tokio::signal::unix::signal(
                tokio::signal::unix::SignalKind::interrupt(),
            )?));
            #[cfg(not(unix))]
            return Ok(Self());
        }

        async fn recv(&mut self) {
            #[cfg(unix)]
            self.0.recv().await;
            #[cfg(not(unix))]
            let _ = tokio::signal::ctrl_c().await;
        }
    }

    /// Tells stderr when the session's connection changes: live, or
    /// reconnecting and why — again only when the reason changes, not at
    /// every attempt.
    fn report_status(status: &khub::client::Status, told: &mut Option<String>) {
        use khub::client::Status;
        let (now, line) = match status {
            Status::Live {
                held_back: Some(e), ..
            } => {
                let why = describe(e);
                // Said again only for another reason, not for new numbers.
                let code = match e {
                    ClientError::Relay { code, .. } => code.as_str().to_owned(),
                    other => other.to_string(),
                };
                (
                    format!("held back: {code}"),
                    format!(
                        "the relay stores none of this device's messages for now ({why}); they wait on this device and go again"
                    ),
                )
            }
            Status::Live { .. } => ("live".to_owned(), "live: waiting for messages".to_owned()),
            Status::Connecting { attempt, error, .. } => {
                let why = error.as_ref().map(describe).unwrap_or_default();
                let line = if why.is_empty() {
                    format!("reconnecting to the relay (attempt {})", attempt + 1)
                } else {
                    format!("reconnecting to the relay (attempt {}): {why}", attempt + 1)
                };
                (why, line)
            }
            Status::Failed(_) | Status::Closed => return,
        };
        if told.as_ref() == Some(&now) {
            return;
        }
        // The first attempt goes unsaid.
        if told.is_some() || !matches!(status, Status::Connecting { attempt: 0, .. }) {
            eprintln!("{line}");
        }
        *told = Some(now);
    }

    /// An error and each cause that adds something, on one line.
    fn describe(error: &ClientError) -> String {
        let first: &(dyn std::error::Error + 'static) = error;
        let chain = std::iter::successors(Some(first), |e| e.source());
        super::distinct_causes(chain).join(": ")
    }

    /// Tells stderr about incidents recorded since the first `reported`.
    fn report_incidents(device: &Device, reported: &mut usize) -> anyhow::Result<()> {
        let incidents = device.incidents()?;
        for incident in incidents.iter().skip(*reported) {
            eprintln!(
                "incident (relay seq {}): {}: {}",
                incident.seq,
                incident.kind.as_str(),
                incident.detail
            );
        }
        *reported = incidents.len();
        Ok(())
    }

    fn print_message(message: &Message, json: bool) -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        let text = std::str::from_utf8(&message.body).ok();
        if json {
            let mut object = serde_json::json!({
                "from": message.from.to_string(),
                "from_name": message.from_name,
                "seq": message.seq,
            });
            match text {
                Some(text) => object["text"] = text.into(),
                None => object["body_b64"] = khub::protocol::b64::encode(&message.body).into(),
            }
            writeln!(out, "{object}")?;
        } else {
            match text {
                Some(text) => writeln!(out, "{}: {text}", message.from_name)?,
                None => writeln!(out, "{}: <{} bytes>", message.from_name, message.body.len())?,
            }
        }
        out.flush()?;
        Ok(())
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KHUB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn operator_secret(
    file: Option<&PathBuf>,
) -> anyhow::Result<Option<khub::crypto::secret::SecretBytes<32>>> {
    let (text, from) = match (file, std::env::var("KHUB_OPERATOR_SECRET")) {
        (Some(path), _) => (
            zeroize::Zeroizing::new(std::fs::read_to_string(path).with_context(|| {
                format!("cannot read the operator secret file {}", path.display())
            })?),
            format!("the file {}", path.display()),
        ),
        (None, Ok(value)) => (
            zeroize::Zeroizing::new(value),
            "KHUB_OPERATOR_SECRET".to_owned(),
        ),
        (None, Err(_)) => return Ok(None),
    };
    let secret = text.trim();
    if secret.len() < 16 {
        bail!(
            "the operator secret in {from} has {} bytes (spaces around it do not count); it must have at least 16",
            secret.len()
        );
    }
    Ok(Some(RelayConfig::operator_secret_from(secret)))
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let largest = khub::crypto::envelope::MAX_ENVELOPE_LEN;
    if args.max_envelope_bytes > largest {
        bail!(
            "--max-envelope-bytes {} is above {largest}, the largest envelope a device opens: a relay storing more would deliver what no device can read",
            args.max_envelope_bytes
        );
    }
    let limits = Limits {
        max_frame_bytes: args.max_frame_bytes,
        max_envelope_bytes: args.max_envelope_bytes,
        max_connections_per_ip: args.max_connections_per_ip,
        max_connections: args.max_connections,
        header_timeout: Duration::from_secs(args.header_timeout_secs.max(1)),
        request_timeout: Duration::from_secs(args.request_timeout_secs.max(1)),
        max_slots_per_device: args.max_slots_per_device.max(1),
        max_slots_per_channel: args.max_slots_per_channel.max(1),
        max_pairing_messages: args.max_pairing_messages.max(3),
        claims_per_minute: args.claims_per_minute,
        channels_per_hour: args.channels_per_hour,
        max_devices_per_channel: args.max_devices_per_channel,
        idle_timeout: Duration::from_secs(args.idle_timeout_secs),
        slow_reader_timeout: Duration::from_secs(args.slow_reader_timeout_secs),
        pairing_ttl: Duration::from_secs(args.pairing_ttl_secs),
        channel_quota_bytes: args.channel_quota_mib.saturating_mul(1024 * 1024),
        retention: Duration::from_secs(args.retention_days.saturating_mul(24 * 3600)),
        ..Limits::default()
    };
    let allowed_origins = args
        .allowed_origins
        .iter()
        .map(|o| khub::relay::edge::normalize_origin(o).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let trusted_proxies = args
        .trusted_proxies
        .iter()
        .map(|text| {
            text.parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    anyhow::anyhow!(
                        "--trusted-proxy {text:?} is not an address or a network like 10.0.0.0/8"
                    )
                })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let config = RelayConfig {
        limits,
        allowed_origins,
        trusted_proxies,
        forwarded_header: match args.forwarded_header {
            ForwardedHeaderArg::XForwardedFor => khub::relay::edge::ForwardedHeader::XForwardedFor,
            ForwardedHeaderArg::Forwarded => khub::relay::edge::ForwardedHeader::Forwarded,
        },
        max_store_bytes: args.max_db_mib.saturating_mul(1024 * 1024),
        operator_secret: operator_secret(args.operator_secret_file.as_ref())?,
        public_metrics: args.metrics_listen.is_none() && args.listen.ip().is_loopback(),
    };
    let kind = StoreKind::parse(&args)?;
    let durability = match args.durability {
        DurabilityArg::Full => Durability::Full,
        DurabilityArg::Normal => Durability::Normal,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        // The addresses first: a relay that cannot listen leaves no
        // database file behind.
        let listener = bind(args.listen, "--listen").await?;
        let metrics_listener = match args.metrics_listen {
            Some(at) => Some(bind(at, "--metrics-listen").await?),
            None => None,
        };
        let (relay, where_) = match kind {
            StoreKind::Memory => (
                Relay::new(Arc::new(MemoryStore::new()), config),
                "memory (nothing is kept)".to_owned(),
            ),
            StoreKind::Sqlite(path) => {
                let dir = match path.parent() {
                    Some(dir) if !dir.as_os_str().is_empty() => dir,
                    _ => std::path::Path::new("."),
                };
                if !dir.is_dir() {
                    bail!(
                        "cannot open the database {}: the directory {} does not exist (create it, or give another path)",
                        path.display(),
                        dir.display()
                    );
                }
                let store = SqliteStore::open_with(&path, durability)
                    .with_context(|| format!("cannot open the database {}", path.display()))?;
                (
                    Relay::new(Arc::new(store), config),
                    path.display().to_string(),
                )
            }
            StoreKind::Postgres(url) => {
                postgres_relay(&url, args.store_pool, args.store_ca_file, config).await?
            }
        };
        let addr = listener.local_addr()?;
        println!("khub relay listening on {addr}, storing in {where_}");
        let metrics = match metrics_listener {
            Some(listener) => {
                println!("metrics on {}", listener.local_addr()?);
                Some(tokio::spawn(khub::relay::server::serve_metrics(
                    Arc::clone(&relay),
                    listener,
                )))
            }
            None => None,
        };
        khub::relay::server::serve(relay, listener, shutdown_signal()).await;
        if let Some(metrics) = metrics {
            metrics.abort();
        }
        anyhow::Ok(())
    })
}

/// An address `khub serve` could not listen on, and the flag that named it.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({flag})")]
struct ListenError {
    addr: SocketAddr,
    flag: &'static str,
    #[source]
    source: std::io::Error,
}

async fn bind(
    addr: SocketAddr,
    flag: &'static str,
) -> Result<tokio::net::TcpListener, ListenError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ListenError { addr, flag, source })
}

/// Where `khub serve` keeps its state.
enum StoreKind {
    Memory,
    Sqlite(PathBuf),
    Postgres(String),
}

impl StoreKind {
    /// One store from --store, --db and --memory (or their KHUB_… variables;
    /// KHUB_MEMORY=0 names none).
    fn parse(args: &ServeArgs) -> anyhow::Result<Self> {
        let named = [
            args.store.as_ref().map(|_| "--store (KHUB_STORE)"),
            args.db.as_ref().map(|_| "--db (KHUB_DB)"),
            args.memory.then_some("--memory (KHUB_MEMORY)"),
        ];
        let named: Vec<&str> = named.into_iter().flatten().collect();
        if named.len() > 1 {
            bail!(
                "{} each name a store: give one of them",
                named.join(" and ")
            );
        }
        let Some(store) = &args.store else {
            return Ok(match (&args.db, args.memory) {
                (_, true) => Self::Memory,
                (Some(db), false) => Self::Sqlite(db.clone()),
                (None, false) => Self::Sqlite(PathBuf::from("khub.sqlite3")),
            });
        };
        if store == "memory" {
            Ok(Self::Memory)
        } else if let Some(path) = store.strip_prefix("sqlite:") {
            Ok(Self::Sqlite(PathBuf::from(path)))
        } else if store.starts_with("postgres://") || store.starts_with("postgresql://") {
            Ok(Self::Postgres(store.clone()))
        } else {
            bail!(
                "--store takes sqlite:PATH, memory or postgres://USER@HOST/DB (got something else)"
            )
        }
    }
}

/// A relay node on PostgreSQL; the second value says where, without the password.
#[cfg(feature = "postgres")]
async fn postgres_relay(
    url: &str,
    pool_size: usize,
    ca_file: Option<PathBuf>,
    config: RelayConfig,
) -> anyhow::Result<(Arc<Relay>, String)> {
    use khub::relay::store::postgres::{PgOptions, PgStore};
    let options = PgOptions { pool_size, ca_file };
    let store = PgStore::connect(url, &options)
        .await
        .map_err(|e| anyhow::anyhow!("cannot use the PostgreSQL store: {e}"))?;
    let where_ = store.target().describe();
    let relay = khub::relay::pg::relay(Arc::new(store), config)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for other relay nodes: {e}"))?;
    Ok((relay, where_))
}

#[cfg(not(feature = "postgres"))]
async fn postgres_relay(
    _url: &str,
    _pool_size: usize,
    _ca_file: Option<PathBuf>,
    _config: RelayConfig,
) -> anyhow::Result<(Arc<Relay>, String)> {
    bail!(
        "this khub was built without PostgreSQL support: build it with `cargo build --release --features postgres`"
    )
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
