//! `khub peer`: the reference device that another SDK's tests talk to. It
//! pairs (showing a code, or reading one from stdin), then sends every line it
//! reads on stdin as a message, and reports everything that happens as one JSON
//! object per line on stdout: `created`, `code`, `paired`, `joined`, `ready`,
//! `sent`, `message`, `echoed`, `incident`, `done`, `error`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use khub::client::{Device, Sent, Session, join};
use khub::pairing::Code;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// How the peer enters a channel when its home holds no device yet.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// Create a channel and show a code (printed as a `code` event).
    Invite,
    /// Read a code from the first line of stdin and join with it.
    Join,
}

#[derive(Args)]
pub struct PeerArgs {
    /// The device's state directory; reused if it already holds a device.
    #[arg(long)]
    home: PathBuf,
    /// The relay, like http://127.0.0.1:3000 (needed to pair).
    #[arg(long)]
    relay: Option<String>,
    /// This device's name.
    #[arg(long, default_value = "khub-peer")]
    name: String,
    /// How to pair if the home holds no device.
    #[arg(long, value_enum, default_value = "invite")]
    role: Role,
    /// Send every message received back, as "echo: " followed by its bytes.
    #[arg(long)]
    echo: bool,
    /// Exit after receiving this many messages.
    #[arg(long)]
    count: Option<usize>,
    /// Give up (exit status 1) after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

/// Prints one event line and flushes it, so a test reading the pipe sees it at once.
fn emit(event: &str, mut fields: Value) {
    fields["event"] = event.into();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{fields}");
    let _ = out.flush();
}

fn body_fields(body: &[u8]) -> Value {
    match std::str::from_utf8(body) {
        Ok(text) => json!({ "text": text }),
        Err(_) => json!({ "body_b64": khub::protocol::b64::encode(body) }),
    }
}

pub async fn run(args: PeerArgs) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(args.timeout);
    match tokio::time::timeout(timeout, peer(args)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            emit("error", json!({ "message": format!("{e:#}") }));
            Err(e)
        }
        Err(_) => {
            emit("error", json!({ "message": "timed out" }));
            bail!("timed out after {} s", timeout.as_secs())
        }
    }
}

/// Stdin's lines, read on a thread of their own: a read of stdin cannot be
/// cancelled, and on Tokio's blocking pool it would keep the process alive
/// after the peer is done while whoever drives it keeps stdin open.
struct StdinLines(mpsc::Receiver<std::io::Result<String>>);

impl StdinLines {
    fn spawn() -> Self {
        let (tx, rx) = mpsc::channel(16);
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::stdin().lock()) {
                if tx.blocking_send(line).is_err() {
                    return;
                }
            }
        });
        Self(rx)
    }

    /// The next line, or `None` once stdin is closed.
    async fn next_line(&mut self) -> std::io::Result<Option<String>> {
        self.0.recv().await.transpose()
    }
}

async fn peer(args: PeerArgs) -> anyhow::Result<()> {
    let mut stdin = StdinLines::spawn();
    let pairing_wait = Duration::from_secs(args.timeout);
    let state = args.home.join(khub::client::STATE_FILE);
    let device = if state.exists() {
        Device::open(&args.home)?
    } else {
        let relay = args.relay.as_deref().context("--relay is needed to pair")?;
        match args.role {
            Role::Invite => {
                let device = Device::create(&args.home, relay, &args.name).await?;
                emit(
                    "created",
                    json!({ "channel": device.channel().to_string(), "device": device.id().to_string() }),
                );
                let invitation = device.invite().await?;
                emit("code", json!({ "code": invitation.code().as_str() }));
                let member = invitation.complete(pairing_wait).await?;
                emit(
                    "paired",
                    json!({ "id": member.id.to_string(), "name": member.name, "sas": member.sas.to_string() }),
                );
                device
            }
            Role::Join => {
                let line = zeroize::Zeroizing::new(
                    stdin
                        .next_line()
                        .await?
                        .context("stdin closed before a code was given")?,
                );
                let code = Code::parse(&line)?;
                let (device, joined) =
                    join(&args.home, relay, &args.name, &code, pairing_wait).await?;
                emit(
                    "joined",
                    json!({
                        "channel": device.channel().to_string(),
                        "device": device.id().to_string(),
                        "inviter": joined.inviter.id.to_string(),
                        "sas": joined.sas.to_string(),
                    }),
                );
                device
            }
        }
    };
    let session = device.connect();
    emit(
        "ready",
        json!({ "channel": device.channel().to_string(), "device": device.id().to_string(), "name": device.name() }),
    );
    let outcome = exchange(&device, &session, &mut stdin, args.echo, args.count).await;
    session.close().await;
    outcome
}

/// Sends stdin's lines, reports what arrives (echoing it if asked) and any
/// incident, until `count` messages have arrived (or forever).
async fn exchange(
    device: &Device,
    session: &Session,
    stdin: &mut StdinLines,
    echo: bool,
    count: Option<usize>,
) -> anyhow::Result<()> {
    let mut received = 0usize;
    let mut reported = device.incidents()?.len();
    let mut stdin_open = true;
    let mut ticks = tokio::time::interval(Duration::from_millis(200));
    while count.is_none_or(|count| received < count) {
        tokio::select! {
            line = stdin.next_line(), if stdin_open => match line? {
                Some(line) => {
                    let sent = session.send(line.as_bytes(), Duration::from_secs(10)).await?;
                    emit("sent", sent_fields(&sent, body_fields(line.as_bytes())));
                }
                None => stdin_open = false,
            },
            message = session.recv() => {
                let message = message?;
                let mut fields = body_fields(&message.body);
                fields["seq"] = message.seq.into();
                fields["from"] = message.from.to_string().into();
                fields["from_name"] = message.from_name.clone().into();
                emit("message", fields);
                device.mark_read(message.seq)?;
                received += 1;
                if echo {
                    let reply = [&b"echo: "[..], &message.body].concat();
                    let sent = session.send(&reply, Duration::from_secs(10)).await?;
                    emit("echoed", sent_fields(&sent, body_fields(&reply)));
                }
            }
            _ = ticks.tick() => {}
        }
        let incidents = device.incidents()?;
        for incident in incidents.iter().skip(reported) {
            emit("incident", serde_json::to_value(incident)?);
        }
        reported = incidents.len();
    }
    emit("done", json!({ "received": received }));
    Ok(())
}

fn sent_fields(sent: &Sent, mut fields: Value) -> Value {
    match sent {
        Sent::Acked { seq } => fields["seq"] = (*seq).into(),
        Sent::Queued => fields["queued"] = true.into(),
    }
    fields
}
