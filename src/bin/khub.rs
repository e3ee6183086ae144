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
use khub::relay::store::Store;
use khub::relay::store::memory::MemoryStore;
use khub::relay::store::sqlite::SqliteStore;

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
    /// Write the published test vectors (pairing, envelopes, rekey) for checking
    /// another implementation against this one.
    Vectors {
        /// Directory to write the JSON files into (created if missing).
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
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
    #[arg(long, env = "KHUB_LISTEN", default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// SQLite database file (created if missing).
    #[arg(long, env = "KHUB_DB", default_value = "khub.sqlite3")]
    db: PathBuf,
    /// Keep everything in memory instead (lost on exit).
    #[arg(long, env = "KHUB_MEMORY", conflicts_with = "db")]
    memory: bool,
    /// Delete envelopes older than this many days.
    #[arg(long, env = "KHUB_RETENTION_DAYS", default_value_t = 90)]
    retention_days: u64,
    /// Bytes of envelopes each channel may store, in MiB.
    #[arg(long, env = "KHUB_CHANNEL_QUOTA_MIB", default_value_t = 256)]
    channel_quota_mib: u64,
    /// Largest envelope, in bytes.
    #[arg(long, env = "KHUB_MAX_ENVELOPE_BYTES", default_value_t = Limits::default().max_envelope_bytes)]
    max_envelope_bytes: usize,
    /// Largest WebSocket frame or request body, in bytes.
    #[arg(long, env = "KHUB_MAX_FRAME_BYTES", default_value_t = Limits::default().max_frame_bytes)]
    max_frame_bytes: usize,
    /// Open connections per client address.
    #[arg(long, env = "KHUB_MAX_CONNECTIONS_PER_IP", default_value_t = Limits::default().max_connections_per_ip)]
    max_connections_per_ip: usize,
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
    /// Browser origin allowed to open /ws (repeat, or comma-separate in KHUB_ALLOWED_ORIGINS).
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

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve(args) => serve(*args),
        Command::Vectors { out } => {
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            for (name, text) in khub::vectors::generate() {
                let path = out.join(name);
                std::fs::write(&path, text)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                println!("wrote {}", path.display());
            }
            Ok(())
        }
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
    let text = match (file, std::env::var("KHUB_OPERATOR_SECRET")) {
        (Some(path), _) => {
            zeroize::Zeroizing::new(std::fs::read_to_string(path).with_context(|| {
                format!("cannot read the operator secret file {}", path.display())
            })?)
        }
        (None, Ok(value)) => zeroize::Zeroizing::new(value),
        (None, Err(_)) => return Ok(None),
    };
    let secret = text.trim();
    if secret.len() < 16 {
        bail!("the operator secret must be at least 16 characters");
    }
    Ok(Some(RelayConfig::operator_secret_from(secret)))
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let limits = Limits {
        max_frame_bytes: args.max_frame_bytes,
        max_envelope_bytes: args.max_envelope_bytes,
        max_connections_per_ip: args.max_connections_per_ip,
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
    let config = RelayConfig {
        limits,
        allowed_origins: args.allowed_origins.clone(),
        operator_secret: operator_secret(args.operator_secret_file.as_ref())?,
    };
    let store: Arc<dyn Store> = if args.memory {
        Arc::new(MemoryStore::new())
    } else {
        Arc::new(
            SqliteStore::open(&args.db)
                .with_context(|| format!("cannot open the database {}", args.db.display()))?,
        )
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        let where_ = if args.memory {
            "memory (nothing is kept)".to_owned()
        } else {
            args.db.display().to_string()
        };
        println!("khub relay listening on {addr}, storing in {where_}");
        let relay = Relay::new(store, config);
        khub::relay::server::serve(relay, listener, shutdown_signal()).await;
        anyhow::Ok(())
    })
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
