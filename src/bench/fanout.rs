//! The fan-out workload: C channels × M devices, S senders per channel, each
//! sender closed-loop with at most W unacked messages (or paced at a fixed
//! rate), payload P. Run against the relay or the bare baseline with the same
//! client code; every delivery is checked for loss and duplication.
//!
//! Clients pre-build their frames (envelopes with real headers and padded sizes,
//! filler instead of ciphertext: the relay never decrypts), so the timed part
//! measures the server, not the load generator's crypto.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use warp::http::Method;

use super::Percentiles;
use crate::client::RelayAddr;
use crate::crypto::envelope::{ENVELOPE_VERSION, EnvelopeHeader, HEADER_LEN, padded_len};
use crate::crypto::os_rng;
use crate::crypto::token::AccessToken;
use crate::ids::{ChannelId, DeviceId, ID_LEN};
use crate::protocol::{
    AdmitDevice, ChannelCreated, ClientFrame, CreateChannel, DeviceList, ServerFrame,
};

/// Shape of one fan-out run.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// Channels.
    pub channels: usize,
    /// Devices per channel.
    pub devices: usize,
    /// Senders per channel (the first devices).
    pub senders: usize,
    /// Unacked messages each sender may have in flight.
    pub window: usize,
    /// Plaintext size of each message.
    pub payload: usize,
    /// Messages per sender.
    pub messages: usize,
    /// If set, each sender publishes at this rate (messages/s) instead of as
    /// fast as its window allows.
    pub rate: Option<f64>,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Deliveries to devices other than the sender.
    pub deliveries: u64,
    /// Wall time from the first send to the last delivery.
    pub elapsed: Duration,
    /// Publish-to-delivery latency.
    pub latency: Percentiles,
    /// Publish-to-ack latency.
    pub ack_latency: Percentiles,
    /// Expected deliveries that never came.
    pub lost: u64,
    /// Deliveries that came twice.
    pub duplicated: u64,
}

impl Outcome {
    /// Deliveries per second.
    pub fn rate(&self) -> f64 {
        self.deliveries as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Acked publishes per second.
    pub fn publishes_per_sec(&self, workload: &Workload) -> f64 {
        (workload.channels * workload.senders * workload.messages) as f64
            / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Which server the workload runs against.
#[derive(Debug, Clone, Copy)]
pub enum Server {
    /// A khub relay at this address.
    Relay(SocketAddr),
    /// The bare baseline at this address.
    Baseline(SocketAddr),
    /// Two khub relay nodes sharing one database: each channel's devices
    /// alternate between them (even ones on the first), so with two devices
    /// per channel and one sender every delivery crosses nodes.
    Nodes(SocketAddr, SocketAddr),
}

pub(super) type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Frame limit of the load generator's connections.
const FRAME: usize = 16 * 1024 * 1024;

struct Device {
    ws: Ws,
    /// Global index of this device's sender slot, if it sends.
    sender: Option<usize>,
    /// Global index of its channel's first sender slot.
    channel_senders: usize,
    /// This device's id (relay) for recognising its own deliveries.
    id: DeviceId,
}

/// Runs `workload` against `server`.
pub async fn run(server: Server, workload: Workload) -> Result<Outcome, String> {
    let devices = setup(server, &workload).await?;
    let total_senders = workload.channels * workload.senders;
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new(
        (0..total_senders * workload.messages)
            .map(|_| AtomicU64::new(0))
            .collect(),
    );
    let frames = Arc::new(build_frames(server, &workload, &devices));
    let senders: Arc<HashMap<DeviceId, usize>> = Arc::new(
        devices
            .iter()
            .filter_map(|(d, _)| d.sender.map(|s| (d.id, s)))
            .collect(),
    );
    let start = Instant::now();
    let mut tasks = Vec::new();
    for device in devices {
        let shared = Shared {
            frames: Arc::clone(&frames),
            sent_at: Arc::clone(&sent_at),
            senders: Arc::clone(&senders),
        };
        tasks.push(tokio::spawn(drive(device, server, workload, shared, start)));
    }
    let mut outcome = Outcome {
        deliveries: 0,
        elapsed: Duration::ZERO,
        latency: Percentiles::default(),
        ack_latency: Percentiles::default(),
        lost: 0,
        duplicated: 0,
    };
    let (mut latencies, mut ack_latencies) = (Vec::new(), Vec::new());
    for task in tasks {
        let result = task.await.map_err(|e| e.to_string())??;
        outcome.deliveries += result.deliveries;
        outcome.lost += result.lost;
        outcome.duplicated += result.duplicated;
        outcome.elapsed = outcome.elapsed.max(result.finished);
        latencies.extend(result.latencies);
        ack_latencies.extend(result.ack_latencies);
    }
    outcome.latency = Percentiles::of(&mut latencies);
    outcome.ack_latency = Percentiles::of(&mut ack_latencies);
    Ok(outcome)
}

/// Connects to `url` with buffers sized for frames of `max_frame` bytes and, for
/// the relay, sends `hello` and waits for `ready`.
pub(super) async fn connect(
    url: &str,
    max_frame: usize,
    hello: Option<&str>,
) -> Result<Ws, String> {
    let config = crate::relay::routes::ws_config(max_frame);
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(20),
        tokio_tungstenite::connect_async_with_config(url, Some(config), true),
    )
    .await
    .map_err(|_| "connect timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    if let Some(hello) = hello {
        ws.send(Message::Text(hello.to_owned().into()))
            .await
            .map_err(|e| e.to_string())?;
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.contains("\"ready\"") => {}
            other => return Err(format!("no ready: {other:?}")),
        }
    }
    Ok(ws)
}

/// Creates channels and devices (relay) or rooms (baseline) and connects everyone.
async fn setup(server: Server, w: &Workload) -> Result<Vec<(Device, ChannelId)>, String> {
    let mut rng = os_rng();
    let mut devices = Vec::new();
    for c in 0..w.channels {
        let channel = ChannelId::random(&mut rng);
        let members: Vec<(DeviceId, AccessToken)> = (0..w.devices)
            .map(|_| (DeviceId::random(&mut rng), AccessToken::generate(&mut rng)))
            .collect();
        if let Server::Relay(addr) | Server::Nodes(addr, _) = server {
            register(addr, channel, &members).await?;
        }
        for (i, (id, token)) in members.iter().enumerate() {
            let ws = match server {
                Server::Relay(addr) | Server::Nodes(addr, _) => {
                    let addr = match server {
                        Server::Nodes(_, second) if i % 2 == 1 => second,
                        _ => addr,
                    };
                    let hello = ClientFrame::Hello {
                        v: crate::protocol::PROTOCOL_VERSION,
                        channel,
                        device: *id,
                        token: token.duplicate(),
                        cursor: 0,
                    };
                    connect(&format!("ws://{addr}/ws"), FRAME, Some(&hello.to_text())).await?
                }
                Server::Baseline(addr) => {
                    connect(&format!("ws://{addr}/room/{channel}"), FRAME, None).await?
                }
            };
            let sender = (i < w.senders).then_some(c * w.senders + i);
            devices.push((
                Device {
                    ws,
                    sender,
                    channel_senders: c * w.senders,
                    id: *id,
                },
                channel,
            ));
        }
    }
    Ok(devices)
}

async fn register(
    addr: SocketAddr,
    channel: ChannelId,
    members: &[(DeviceId, AccessToken)],
) -> Result<(), String> {
    let relay = RelayAddr::parse(&format!("http://{addr}")).map_err(|e| e.to_string())?;
    let timeout = Duration::from_secs(20);
    let (first, token) = &members[0];
    let create = CreateChannel {
        channel,
        device: *first,
        token_hash: token.hash(),
    };
    let _: ChannelCreated = relay
        .json(Method::POST, "/channels", &[], Some(&create), timeout)
        .await
        .map_err(|e| e.to_string())?;
    let auth = crate::protocol::Credentials {
        channel,
        device: *first,
        token: token.duplicate(),
    }
    .to_header();
    for (id, token) in &members[1..] {
        let admit = AdmitDevice {
            device: *id,
            token_hash: token.hash(),
        };
        let path = format!("/channels/{channel}/devices");
        let _: DeviceList = relay
            .json(
                Method::POST,
                &path,
                &[("authorization", &auth)],
                Some(&admit),
                timeout,
            )
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Every sender's frames, pre-encoded: `frames[sender][seq - 1]`.
fn build_frames(
    server: Server,
    w: &Workload,
    devices: &[(Device, ChannelId)],
) -> Vec<Vec<Message>> {
    let body_len = padded_len(w.payload) + 24 + 16;
    let mut frames = vec![Vec::new(); w.channels * w.senders];
    for (device, channel) in devices {
        let Some(sender) = device.sender else {
            continue;
        };
        frames[sender] = (1..=w.messages as u64)
            .map(|seq| {
                let header = EnvelopeHeader {
                    channel: *channel,
                    epoch: 0,
                    sender: device.id,
                    seq,
                };
                let mut envelope = header.encode().to_vec();
                envelope.resize(envelope.len() + body_len, 0x5a);
                let relay_frame = ClientFrame::Publish { envelope }.to_text();
                match server {
                    Server::Relay(_) | Server::Nodes(..) => Message::Text(relay_frame.into()),
                    // Same size on the wire, a trivially parsed prefix.
                    Server::Baseline(_) => {
                        let mut text = format!("{sender}:{seq}:");
                        text.extend(std::iter::repeat_n(
                            'x',
                            relay_frame.len().saturating_sub(text.len()),
                        ));
                        Message::Text(text.into())
                    }
                }
            })
            .collect();
    }
    frames
}

/// What the load generator needs of a relay frame.
enum Seen {
    /// An ack, with the sender's sequence number.
    Ack(u64),
    /// A delivery: the envelope's sender and sequence number.
    Deliver(DeviceId, u64),
}

/// The fields of a relay frame the load generator reads, borrowed.
#[derive(serde::Deserialize)]
struct Fields<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    seq: Option<u64>,
    sender_seq: Option<u64>,
    #[serde(borrow)]
    envelope: Option<&'a str>,
}

/// Reads an ack or a delivery as cheaply as the baseline's `sender:seq:`
/// prefix is read: the JSON borrowed, and of the envelope only the base64 of
/// its header decoded (the rest is filler). Decoding every delivery in full
/// cost the load generator — on the cores it shares with the server — about
/// twice per delivery what reading the baseline's frames does, and that
/// showed as the relay's slowness.
fn read_relay_frame(text: &str) -> Result<Seen, String> {
    use base64::Engine;
    const HEADER_B64: usize = HEADER_LEN.div_ceil(3) * 4;
    let fields: Fields<'_> = serde_json::from_str(text).map_err(|e| e.to_string())?;
    match (fields.kind, fields.sender_seq, fields.envelope) {
        ("ack", Some(sender_seq), _) => Ok(Seen::Ack(sender_seq)),
        ("deliver", _, Some(envelope)) if fields.seq.is_some() => {
            let mut header = [0u8; HEADER_B64 / 4 * 3];
            let prefix = envelope.get(..HEADER_B64).ok_or("envelope too short")?;
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode_slice(prefix, &mut header)
                .map_err(|e| e.to_string())?;
            if header[0] != ENVELOPE_VERSION {
                return Err(format!("a delivery of envelope version {}", header[0]));
            }
            let sender: [u8; ID_LEN] = header[21..37].try_into().expect("16 bytes");
            let seq = u64::from_be_bytes(header[37..45].try_into().expect("8 bytes"));
            if seq == 0 {
                return Err("a delivery numbered 0 by its sender".into());
            }
            Ok(Seen::Deliver(DeviceId::from_bytes(sender), seq))
        }
        _ => Err(format!(
            "unexpected frame {:?}",
            serde_json::from_str::<ServerFrame>(text)
        )),
    }
}

struct DeviceResult {
    deliveries: u64,
    lost: u64,
    duplicated: u64,
    finished: Duration,
    latencies: Vec<u32>,
    ack_latencies: Vec<u32>,
}

fn micros_since(start: Instant) -> u64 {
    start.elapsed().as_micros() as u64
}

/// What every device task shares.
struct Shared {
    frames: Arc<Vec<Vec<Message>>>,
    /// Send time of every message, in µs since the start: `[sender * messages + seq - 1]`.
    sent_at: Arc<Vec<AtomicU64>>,
    /// Sending device → its global sender index.
    senders: Arc<HashMap<DeviceId, usize>>,
}

/// One device: sends its frames (if a sender) and reads until it has every
/// delivery it expects and every ack it is owed.
async fn drive(
    (device, _channel): (Device, ChannelId),
    server: Server,
    w: Workload,
    shared: Shared,
    start: Instant,
) -> Result<DeviceResult, String> {
    let Shared {
        frames,
        sent_at,
        senders,
    } = shared;
    let (mut sink, mut stream) = device.ws.split();
    let window = Arc::new(Semaphore::new(w.window));
    let writer = device.sender.map(|sender| {
        let (window, frames, sent_at) = (
            Arc::clone(&window),
            Arc::clone(&frames),
            Arc::clone(&sent_at),
        );
        tokio::spawn(async move {
            let interval = w.rate.map(|r| Duration::from_secs_f64(1.0 / r));
            for (i, frame) in frames[sender].iter().enumerate() {
                if let Some(interval) = interval {
                    tokio::time::sleep_until((start + interval.mul_f64(i as f64)).into()).await;
                }
                window.acquire().await.map_err(|e| e.to_string())?.forget();
                sent_at[sender * w.messages + i].store(micros_since(start).max(1), Relaxed);
                sink.send(frame.clone()).await.map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(sink)
        })
    });

    let other_senders = w.senders - usize::from(device.sender.is_some());
    let expected = other_senders * w.messages;
    let mut seen = vec![false; w.senders * w.messages];
    let mut result = DeviceResult {
        deliveries: 0,
        lost: 0,
        duplicated: 0,
        finished: Duration::ZERO,
        latencies: Vec::with_capacity(expected),
        ack_latencies: Vec::new(),
    };
    let mut acks = 0;
    let owed = if device.sender.is_some() {
        w.messages
    } else {
        0
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while (result.deliveries as usize) < expected || acks < owed {
        let message = match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => text,
            Ok(Some(Ok(_))) => continue,
            _ => break,
        };
        let now = micros_since(start);
        let (sender, seq, is_ack) = match server {
            Server::Baseline(_) if message.as_str() == "a" => (0, 0, true),
            Server::Baseline(_) => {
                let mut parts = message.splitn(3, ':');
                let sender: usize = parts
                    .next()
                    .and_then(|p| p.parse().ok())
                    .ok_or("bad frame")?;
                let seq: usize = parts
                    .next()
                    .and_then(|p| p.parse().ok())
                    .ok_or("bad frame")?;
                (sender, seq, false)
            }
            Server::Relay(_) | Server::Nodes(..) => match read_relay_frame(&message)? {
                Seen::Ack(sender_seq) => (0, sender_seq as usize, true),
                Seen::Deliver(sender, seq) => {
                    if sender == device.id {
                        continue;
                    }
                    let index = senders
                        .get(&sender)
                        .copied()
                        .ok_or("delivery from an unknown sender")?;
                    (index, seq as usize, false)
                }
            },
        };
        if is_ack {
            if let Some(me) = device.sender {
                let sent = sent_at[me * w.messages + seq.max(1) - 1].load(Relaxed);
                result.ack_latencies.push(now.saturating_sub(sent) as u32);
            }
            acks += 1;
            window.add_permits(1);
            continue;
        }
        let slot = (sender - device.channel_senders) * w.messages + seq - 1;
        if std::mem::replace(&mut seen[slot], true) {
            result.duplicated += 1;
            continue;
        }
        result.deliveries += 1;
        let sent = sent_at[sender * w.messages + seq - 1].load(Relaxed);
        result.latencies.push(now.saturating_sub(sent) as u32);
        result.finished = start.elapsed();
    }
    result.lost = (expected as u64).saturating_sub(result.deliveries);
    if let Some(writer) = writer {
        let _ = writer.await;
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_light_reader_finds_what_a_full_decode_finds_and_refuses_the_rest() {
        let header = EnvelopeHeader {
            channel: ChannelId::random(&mut os_rng()),
            epoch: 3,
            sender: DeviceId::random(&mut os_rng()),
            seq: 41,
        };
        let mut envelope = header.encode().to_vec();
        envelope.resize(HEADER_LEN + padded_len(200) + 40, 0x5a);
        let deliver = ServerFrame::Deliver { seq: 7, envelope }.to_text();
        match read_relay_frame(&deliver) {
            Ok(Seen::Deliver(sender, seq)) => assert_eq!((sender, seq), (header.sender, 41)),
            _ => panic!("a delivery was not read"),
        }
        let ack = ServerFrame::Ack {
            sender_seq: 9,
            seq: 12,
            duplicate: false,
        };
        assert!(matches!(read_relay_frame(&ack.to_text()), Ok(Seen::Ack(9))));
        let refused =
            ServerFrame::error(crate::protocol::ErrorCode::Internal, "a \"quoted\" failure");
        let error = read_relay_frame(&refused.to_text())
            .err()
            .expect("an error frame is refused");
        assert!(error.contains("quoted"), "{error}");
        let short = r#"{"type":"deliver","seq":1,"envelope":"AAAA"}"#;
        assert!(read_relay_frame(short).is_err());
        let unnumbered = deliver.replace("\"seq\":7,", "");
        assert!(read_relay_frame(&unnumbered).is_err(), "{unnumbered}");
        let mut other_version = header.encode().to_vec();
        other_version[0] = ENVELOPE_VERSION + 1;
        other_version.resize(HEADER_LEN + 64, 0);
        let other_version = ServerFrame::Deliver {
            seq: 8,
            envelope: other_version,
        };
        assert!(read_relay_frame(&other_version.to_text()).is_err());
    }
}
