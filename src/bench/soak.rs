//! The soak: a `khub serve` child holding thousands of device sessions that
//! all publish and receive for a while. Every session checks that its channel's
//! envelopes arrive gap-free, once, in order, and that everything it published
//! was acked; the relay's memory is sampled throughout.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use super::Row;
use super::child::ServerChild;
use super::scenarios::{channel_with, open_sessions};
use crate::crypto::envelope::{EnvelopeHeader, padded_len};
use crate::crypto::token::AccessToken;
use crate::ids::{ChannelId, DeviceId};
use crate::protocol::{ClientFrame, ServerFrame};

/// Devices per channel in the soak.
const DEVICES: usize = 5;
/// How long sessions may take to receive what was published before the end.
const DRAIN: Duration = Duration::from_secs(30);

/// The soak's shape.
#[derive(Debug, Clone)]
pub struct Soak {
    /// Device sessions held at once.
    pub sessions: usize,
    /// Seconds of traffic.
    pub seconds: u64,
    /// Seconds between two publishes of one device.
    pub interval: f64,
}

impl Default for Soak {
    fn default() -> Self {
        Self {
            sessions: 5000,
            seconds: 60,
            interval: 5.0,
        }
    }
}

/// What all sessions saw.
#[derive(Default)]
struct Tally {
    published: AtomicU64,
    acked: AtomicU64,
    delivered: AtomicU64,
    /// Refused publishes, broken or closed connections, unexpected frames.
    errors: AtomicU64,
    /// Deliveries out of order, repeated, or missing at the end.
    misdelivered: AtomicU64,
    /// Sessions done publishing (every publish acked) or gone.
    settled: AtomicU64,
}

/// What every session of one soak shares.
struct Run {
    /// Between two publishes of one device.
    interval: Duration,
    /// When publishing stops.
    stop: Instant,
    /// Sessions in the run.
    sessions: u64,
    tally: Tally,
}

/// One device's session: publishes every `run.interval` until `run.stop`,
/// checks each delivery, then — once every session's publishes are acked —
/// waits for its channel's last envelope (`head`). Returns the last relay
/// sequence number it received.
async fn device(
    mut ws: super::fanout::Ws,
    channel: ChannelId,
    me: DeviceId,
    head: Arc<AtomicU64>,
    run: Arc<Run>,
) -> (ChannelId, u64) {
    let (interval, stop, sessions, tally) = (run.interval, run.stop, run.sessions, &run.tally);
    let mut settled = false;
    let settle = |tally: &Tally, settled: &mut bool| {
        if !std::mem::replace(settled, true) {
            tally.settled.fetch_add(1, Ordering::Relaxed);
        }
    };
    let error = |tally: &Tally, settled: &mut bool| {
        tally.errors.fetch_add(1, Ordering::Relaxed);
        settle(tally, settled);
    };
    // Spread the first publishes over one interval.
    let offset = interval
        .mul_f64(rand::Rng::next_u32(&mut crate::crypto::os_rng()) as f64 / u32::MAX as f64);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + offset, interval);
    let body = vec![0x5a; padded_len(200) + 24 + 16];
    let (mut sent, mut acked, mut last) = (0u64, 0u64, 0u64);
    let drained_by = stop + DRAIN;
    loop {
        let publishing = Instant::now() < stop;
        if !publishing && acked == sent {
            settle(tally, &mut settled);
            // Every head is final once every session has settled.
            if tally.settled.load(Ordering::Relaxed) == sessions
                && last >= head.load(Ordering::Relaxed)
            {
                return (channel, last);
            }
        }
        if Instant::now() > drained_by {
            settle(tally, &mut settled);
            return (channel, last);
        }
        tokio::select! {
            _ = ticks.tick(), if publishing => {
                sent += 1;
                let mut envelope = EnvelopeHeader { channel, epoch: 0, sender: me, seq: sent }.encode().to_vec();
                envelope.extend_from_slice(&body);
                let frame = ClientFrame::Publish { envelope }.to_text();
                if ws.send(Message::Text(frame.into())).await.is_err() {
                    error(tally, &mut settled);
                    return (channel, last);
                }
                tally.published.fetch_add(1, Ordering::Relaxed);
            }
            incoming = ws.next() => {
                let text = match incoming {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    _ => { error(tally, &mut settled); return (channel, last); }
                };
                match serde_json::from_str::<ServerFrame>(&text) {
                    Ok(ServerFrame::Deliver { seq, .. }) => {
                        if seq != last + 1 {
                            tally.misdelivered.fetch_add(1, Ordering::Relaxed);
                        }
                        last = seq;
                        tally.delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(ServerFrame::Ack { seq, .. }) => {
                        acked += 1;
                        head.fetch_max(seq, Ordering::Relaxed);
                        tally.acked.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => { error(tally, &mut settled); return (channel, last); }
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(100)), if !publishing => {}
        }
    }
}

/// Runs the soak against a fresh `khub serve` (SQLite store) child.
pub(super) async fn run(khub: &Path, soak: &Soak) -> Result<Vec<Row>, String> {
    let dir = std::env::temp_dir().join(format!("khub-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let result = soak_in(khub, soak, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn soak_in(khub: &Path, soak: &Soak, dir: &Path) -> Result<Vec<Row>, String> {
    let mut relay = ServerChild::spawn(
        khub,
        &[
            "--db".into(),
            dir.join("soak.sqlite3").display().to_string(),
            "--max-connections-per-ip".into(),
            (soak.sessions + 100).to_string(),
            "--channels-per-hour".into(),
            u32::MAX.to_string(),
            "--idle-timeout-secs".into(),
            "600".into(),
        ],
    )?;
    let addr = relay.addr;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = relay.memory_kib("VmRSS")?;

    // Channels of five devices, registered a few at a time.
    let channels = soak.sessions.div_ceil(DEVICES);
    let registered: Vec<(ChannelId, Vec<(DeviceId, AccessToken)>)> =
        futures_util::stream::iter((0..channels).map(|_| channel_with(addr, DEVICES)))
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
    let mut sessions = Vec::with_capacity(soak.sessions);
    'open: for (channel, members) in &registered {
        for (device, token) in members {
            if sessions.len() == soak.sessions {
                break 'open;
            }
            let hello = ClientFrame::Hello {
                v: crate::protocol::PROTOCOL_VERSION,
                channel: *channel,
                device: *device,
                token: token.duplicate(),
                cursor: 0,
            }
            .to_text();
            let ws = open_sessions(addr, &hello, 1)
                .await?
                .pop()
                .ok_or("no session")?;
            sessions.push((*channel, *device, ws));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = relay.memory_kib("VmRSS")?;

    // Traffic.
    let started = Instant::now();
    let run = Arc::new(Run {
        interval: Duration::from_secs_f64(soak.interval),
        stop: started + Duration::from_secs(soak.seconds),
        sessions: sessions.len() as u64,
        tally: Tally::default(),
    });
    let heads: std::collections::HashMap<ChannelId, Arc<AtomicU64>> = registered
        .iter()
        .map(|(c, _)| (*c, Arc::new(AtomicU64::new(0))))
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    let count = sessions.len();
    for (channel, me, ws) in sessions {
        tasks.spawn(device(
            ws,
            channel,
            me,
            Arc::clone(&heads[&channel]),
            Arc::clone(&run),
        ));
    }
    let mut peak = held;
    let mut sampler = tokio::time::interval(Duration::from_millis(250));
    let mut lasts = Vec::with_capacity(count);
    loop {
        tokio::select! {
            done = tasks.join_next() => match done {
                Some(Ok(last)) => lasts.push(last),
                Some(Err(e)) => return Err(format!("a session task failed: {e}")),
                None => break,
            },
            _ = sampler.tick() => {
                if let Ok(rss) = relay.memory_kib("VmRSS") {
                    peak = peak.max(rss);
                }
            }
        }
    }
    let elapsed = started.elapsed();
    let tally = &run.tally;
    let alive = relay.alive();
    let peak = peak.max(relay.memory_kib("VmHWM").unwrap_or(0));
    let per_session = (held.saturating_sub(before)) as f64 / count.max(1) as f64;
    let per_session_peak = (peak.saturating_sub(before)) as f64 / count.max(1) as f64;
    let t = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let (published, acked, delivered) = (t(&tally.published), t(&tally.acked), t(&tally.delivered));
    let errors = t(&tally.errors) + u64::from(acked != published) + u64::from(!alive);
    // Each session must end holding its channel's last envelope: nothing missing.
    let missing = lasts
        .iter()
        .filter(|(channel, last)| *last != t(&heads[channel]))
        .count() as u64;
    let misdelivered = t(&tally.misdelivered) + missing;
    let expected: u64 = lasts.iter().map(|(channel, _)| t(&heads[channel])).sum();
    Ok(vec![
        Row::check(
            "soak",
            "sessions held",
            count.to_string(),
            &format!(">= {}", soak.sessions),
            count >= soak.sessions,
        ),
        Row::info(
            "soak",
            format!(
                "traffic ({} s, one publish per device every {} s)",
                soak.seconds, soak.interval
            ),
            format!(
                "{published} published, {acked} acked, {delivered} of {expected} deliveries ({:.0}/s)",
                delivered as f64 / elapsed.as_secs_f64()
            ),
        ),
        Row::check(
            "soak",
            "errors (refused, broken, unacked, relay died)",
            errors.to_string(),
            "0",
            errors == 0,
        ),
        Row::check(
            "soak",
            "deliveries out of order, repeated or missing",
            misdelivered.to_string(),
            "0",
            misdelivered == 0,
        ),
        Row::info(
            "soak",
            "relay RSS before sessions",
            format!("{:.1} MiB", before as f64 / 1024.0),
        ),
        Row::info(
            "soak",
            "relay peak RSS",
            format!("{:.1} MiB", peak as f64 / 1024.0),
        ),
        Row::check(
            "soak",
            "relay RSS per session, held idle",
            format!("{per_session:.1} KiB"),
            "<= 16 KiB",
            per_session <= 16.0,
        ),
        Row::info(
            "soak",
            "relay RSS per session, at peak",
            format!("{per_session_peak:.1} KiB"),
        ),
    ])
}
