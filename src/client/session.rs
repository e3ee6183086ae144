//! A live connection to the relay that survives network trouble: it reconnects
//! with exponential backoff and jitter, resumes from the device's cursor, and
//! resends every envelope still in the outbox (the relay stores each once).

use std::collections::VecDeque;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::{FutureExt, Sink, SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tracing::{debug, info, warn};

use super::device::{Device, Ingested, Message, Resume};
use super::error::ClientError;
use crate::crypto::os_rng;
use crate::protocol::{
    ClientFrame, CloseCode, ErrorCode, MAX_FRAME_LEN, PROTOCOL_VERSION, Refusal, ServerFrame,
};

/// First retry delay; doubles per failed attempt.
pub const BACKOFF_BASE: Duration = Duration::from_millis(200);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Time allowed to connect and get `ready`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames of unknown types a connection passes over before `ready` (a relay
/// that sends more is not one this khub can talk to).
const MAX_UNKNOWN_BEFORE_READY: usize = 16;
/// The relay's ping interval when its `ready` does not say.
const DEFAULT_PING_SECS: u64 = 30;
/// The longest ping interval a device takes from `ready`.
const MAX_PING_SECS: u64 = 600;
/// Pings missed before a session counts its connection as dead.
const LIVENESS_PINGS: u64 = 3;
/// Most frames taken off the connection before they are acted on together.
const MAX_BATCH: usize = 256;
/// Bytes of frames after which no more are taken into the batch: with frames
/// of at most `MAX_FRAME_LEN`, a batch holds under 6 MB.
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// How often a waiting `send` looks on disk for an ack another process on
/// the same home took in.
const ACK_POLL: Duration = Duration::from_millis(100);
/// Publishes written on one connection and not yet answered (acked or
/// refused), at most. What is written goes on as written when the epoch moves
/// on, so this bounds how far a sender's stored key generations can jump
/// (members accept 1,000 ahead) and how much can land behind commits made
/// while it is on its way.
const PUBLISH_WINDOW: usize = 256;

/// Bytes of the outbox a connection holds in memory at once (and always one
/// envelope): a larger outbox is read a page at a time, the next once the
/// socket has taken the last.
const OUTBOUND_PAGE_BYTES: usize = 4 * 1024 * 1024;

/// A session publishes once it has taken in the channel up to the relay's
/// head at `ready`, or at once if `ready` said nothing after the cursor up to
/// that head is stored any more (`pruned_to`), or once the relay has
/// delivered nothing for this long after the last delivery was taken in (the
/// envelopes up to that head were pruned, and the relay, an older one, did
/// not say so); pings do not count.
const CATCH_UP_QUIET: Duration = Duration::from_secs(10);

/// Where a session stands.
#[derive(Debug, Clone)]
pub enum Status {
    /// Connecting, or waiting to retry (attempt 0 is the first).
    #[non_exhaustive]
    Connecting {
        /// Failed attempts so far.
        attempt: u32,
        /// Why the last connection failed or ended (`None` before the
        /// first, or after one that ended without an error).
        error: Option<ClientError>,
    },
    /// Connected; the relay's head when the session started.
    #[non_exhaustive]
    Live {
        /// The channel's newest sequence number at `ready`.
        head: u64,
        /// Why the relay stores none of this device's messages for now
        /// (the channel's quota, its storage full, a passing failure): the
        /// outbox keeps them and goes again, backing off. The first such
        /// refusal of a run (a later one of another code replaces it);
        /// `None` on a new connection until the relay refuses again, once it
        /// acks again, refuses one for good, or the outbox is found empty.
        held_back: Option<ClientError>,
    },
    /// Stopped for good: the error needs a person (removed, unauthorized).
    Failed(ClientError),
    /// Closed by the app.
    Closed,
}

/// What happened to a sent message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// The relay stored it under this sequence number.
    Acked {
        /// Relay sequence number.
        seq: u64,
    },
    /// Not acked in time (offline, or held back: see `Status::Live`'s
    /// `held_back`); it stays in the outbox and goes out with the next
    /// connection, or the next try of this one.
    Queued,
}

/// A live connection; messages arrive through [`recv`](Self::recv).
pub struct Session {
    device: Device,
    wake: mpsc::UnboundedSender<()>,
    status: watch::Receiver<Status>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Device {
    /// Starts a live session in the background.
    pub fn connect(&self) -> Session {
        let (wake, wake_rx) = mpsc::unbounded_channel();
        let (status_tx, status) = watch::channel(Status::Connecting {
            attempt: 0,
            error: None,
        });
        let (stop, stop_rx) = oneshot::channel();
        let task = tokio::spawn(run(self.clone(), wake_rx, status_tx, stop_rx));
        Session {
            device: self.clone(),
            wake,
            status,
            stop: Some(stop),
            task: Some(task),
        }
    }
}

impl Session {
    /// The session's state now.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// The session's state as it changes: `changed().await` on the receiver
    /// wakes on each change (a quick run of them shows as the last).
    pub fn status_watch(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Seals and queues `body` durably, then waits up to `wait` for the relay's ack.
    ///
    /// The ack, or the relay's refusal, is looked for on disk, where
    /// whichever process on this home took it in recorded it (a `khub
    /// listen` whose session published the outbox first, too): on every
    /// change this process makes, and every [`ACK_POLL`] for the others'.
    pub async fn send(&self, body: &[u8], wait: Duration) -> Result<Sent, ClientError> {
        let body = body.to_vec();
        let sender_seq = self
            .device
            .blocking(move |device| device.queue(&body))
            .await?;
        let _ = self.wake.send(());
        let deadline = tokio::time::Instant::now() + wait;
        let mut status = self.status.clone();
        loop {
            let notified = self.device.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (acked, refused) = self
                .device
                .blocking(move |device| {
                    let acked = device.db().ack_of(sender_seq)?;
                    Ok((acked, device.refusal_of(sender_seq)?))
                })
                .await?;
            if let Some(seq) = acked {
                return Ok(Sent::Acked { seq });
            }
            if let Some(e) = refused {
                return Err(e);
            }
            if let Status::Failed(e) = &*status.borrow() {
                return Err(e.clone());
            }
            tokio::select! {
                _ = notified => {}
                changed = status.changed() => changed.map_err(|_| task_ended())?,
                _ = tokio::time::sleep(ACK_POLL) => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(Sent::Queued),
            }
        }
    }

    /// The oldest message the app has not marked read, waiting for one. It stays
    /// the answer until [`Device::mark_read`] is called for it, so a message is
    /// never lost between arriving and being handled, even across a restart.
    pub async fn recv(&self) -> Result<Message, ClientError> {
        let mut status = self.status.clone();
        loop {
            let notified = self.device.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(message) = self.device.blocking(|device| device.next_unread()).await? {
                return Ok(message);
            }
            if let Status::Failed(e) = &*status.borrow() {
                return Err(e.clone());
            }
            tokio::select! {
                _ = notified => {}
                changed = status.changed() => changed.map_err(|_| task_ended())?,
            }
        }
    }

    /// Waits until the session has taken in everything the relay had when it
    /// connected.
    pub async fn caught_up(&self, timeout: Duration) -> Result<(), ClientError> {
        let wait = async {
            let mut status = self.status.clone();
            loop {
                let notified = self.device.inner.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                match &*status.borrow() {
                    Status::Live { head, .. } if self.device.cursor() >= *head => return Ok(()),
                    Status::Failed(e) => return Err(e.clone()),
                    _ => {}
                }
                tokio::select! {
                    _ = notified => {}
                    changed = status.changed() => changed.map_err(|_| task_ended())?,
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| ClientError::Timeout(timeout.as_secs()))?
    }

    /// Stops the session.
    pub async fn close(mut self) {
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The delay before retry `attempt` (1-based): exponential, capped, with jitter
/// between half and all of it, so a relay restart is not met by every device at
/// the same instant.
pub fn backoff(attempt: u32) -> Duration {
    let exponential = BACKOFF_BASE.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let capped = exponential.min(BACKOFF_MAX);
    let fraction = 0.5 + 0.5 * (rand::Rng::next_u32(&mut os_rng()) as f64 / u32::MAX as f64);
    capped.mul_f64(fraction)
}

async fn run(
    device: Device,
    mut wake: mpsc::UnboundedReceiver<()>,
    status: watch::Sender<Status>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut attempt = 0u32;
    loop {
        let before = attempt;
        let result: Result<(), ClientError> = tokio::select! {
            result = connection(&device, &mut wake, &status, &mut attempt) => result,
            _ = &mut stop => {
                status.send_replace(Status::Closed);
                return;
            }
        };
        match &result {
            Err(e) if !e.is_transient() => {
                warn!(error = %e, "session stopped");
                status.send_replace(Status::Failed(e.clone()));
                return;
            }
            Err(e) => {
                // A relay that accepts the session but cannot store (a full
                // disk, a database failing over) is not hammered: its failures
                // keep backing off even though each session got as far as `ready`.
                if matches!(
                    e,
                    ClientError::Relay {
                        code: ErrorCode::Internal,
                        ..
                    }
                ) {
                    attempt = attempt.max(before);
                }
                debug!(error = %e, attempt, "connection lost; retrying");
            }
            Ok(()) => {}
        }
        attempt = attempt.saturating_add(1);
        status.send_replace(Status::Connecting {
            attempt,
            error: result.err(),
        });
        tokio::select! {
            _ = tokio::time::sleep(backoff(attempt)) => {}
            _ = &mut stop => {
                status.send_replace(Status::Closed);
                return;
            }
        }
    }
}

/// The relay went back (an older backup; `why`, from `resume`): it delivers
/// only after the cursor a session resumes from, so this session would skip
/// what it numbers again. The device goes back and the session reconnects
/// from where it now stands; the error says why.
async fn went_back(device: &Device, resume: Resume, why: String) -> ClientError {
    let recorded = {
        let why = why.clone();
        device
            .blocking(move |device| device.relay_went_back(resume, &why))
            .await
    };
    match recorded {
        Ok(()) => unreachable(device, format!("{why}; resuming from #{}", device.cursor())),
        Err(e) => e,
    }
}

/// Why reading the connection failed: a frame longer than any relay sends
/// is the relay's fault, and ends the session; anything else is a broken
/// connection.
fn read_failed(device: &Device, error: tungstenite::Error) -> ClientError {
    match error {
        tungstenite::Error::Capacity(e) => ClientError::Protocol(format!(
            "the relay sent a frame longer than {MAX_FRAME_LEN} bytes, the most a khub relay sends ({e}); the session stopped without reading it"
        )),
        e => unreachable(device, e),
    }
}

/// The bytes of a frame as it was read.
fn frame_len(incoming: &Option<Result<WsMessage, tungstenite::Error>>) -> usize {
    match incoming {
        Some(Ok(message)) => message.len(),
        _ => 0,
    }
}

/// A session whose task ended without saying why: it panicked.
fn task_ended() -> ClientError {
    ClientError::Bug("the session's task ended unexpectedly; connect again".into())
}

fn unreachable(
    device: &Device,
    source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> ClientError {
    ClientError::unreachable(device.relay_url(), source)
}

/// One connection: hello, resend the outbox, then deliveries and acks until
/// it breaks. Returns the reason it ended.
async fn connection(
    device: &Device,
    wake: &mut mpsc::UnboundedReceiver<()>,
    status: &watch::Sender<Status>,
    attempt: &mut u32,
) -> Result<(), ClientError> {
    let relay = &device.inner.relay;
    let url = relay.ws_url();
    let connector = if relay.is_tls() {
        tokio_tungstenite::Connector::Rustls(super::tls::config()?)
    } else {
        tokio_tungstenite::Connector::Plain
    };
    // No relay sends a frame longer than MAX_FRAME_LEN: refuse one rather
    // than hold whatever a relay sends.
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME_LEN))
        .max_frame_size(Some(MAX_FRAME_LEN));
    let connect = tokio_tungstenite::connect_async_tls_with_config(
        url.as_str(),
        Some(config),
        true,
        Some(connector),
    );
    let (mut ws, _) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| ClientError::Timeout(CONNECT_TIMEOUT.as_secs()))?
        .map_err(|e| unreachable(device, e))?;
    let resume = device.blocking(|device| device.resume()).await?;
    let hello = ClientFrame::Hello {
        v: PROTOCOL_VERSION,
        channel: device.channel(),
        device: device.id(),
        token: device.inner.token.duplicate(),
        cursor: resume.from(),
    };
    ws.send(WsMessage::Text(hello.to_text().into()))
        .await
        .map_err(|e| unreachable(device, e))?;
    // Frames of types this khub does not know are passed over here too, a
    // few of them, within the same deadline.
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    let mut passed_over = 0;
    let (head, ping_secs, pruned_to) = loop {
        let first = tokio::time::timeout_at(deadline, ws.next())
            .await
            .map_err(|_| ClientError::Timeout(CONNECT_TIMEOUT.as_secs()))?;
        break match first {
            Some(Ok(WsMessage::Text(text))) => match ServerFrame::decode(&text) {
                Ok(Some(ServerFrame::Ready {
                    head,
                    ping_secs,
                    retention_secs,
                    pruned_to,
                    ..
                })) => {
                    if let Some(secs) = retention_secs {
                        device.heard_retention(secs);
                    }
                    // Any number is taken, within bounds that keep the
                    // liveness deadline meaningful (and from overflowing).
                    let ping_secs = ping_secs
                        .unwrap_or(DEFAULT_PING_SECS)
                        .clamp(1, MAX_PING_SECS);
                    (head, ping_secs, pruned_to)
                }
                Ok(Some(ServerFrame::Error { code, message, .. })) => {
                    return Err(refusal(code, message, closing_code(&mut ws).await));
                }
                Ok(None) if passed_over < MAX_UNKNOWN_BEFORE_READY => {
                    passed_over += 1;
                    continue;
                }
                _ => return Err(ClientError::Protocol("expected ready".into())),
            },
            Some(Ok(WsMessage::Close(frame))) => {
                return Err(closed(device, frame.map(|f| u16::from(f.code))));
            }
            Some(Err(e)) => return Err(read_failed(device, e)),
            _ => return Err(unreachable(device, "connection closed during hello")),
        };
    };
    if passed_over > 0 {
        warn!(
            passed_over,
            "the relay sent frames of a type this khub does not know before ready; ignored"
        );
    }
    super::device::relay_seq(head, "its newest envelope")?;
    if let Some(why) = resume.behind(head) {
        return Err(went_back(device, resume, why).await);
    }
    // Whether nothing after the cursor up to the head is stored any more, as
    // `ready` says; the relay is held to it: a delivery up to the head after
    // that is its lie.
    let mut pruned_up_to = pruned_to_head(pruned_to, resume.from(), head)?.then_some(head);
    // Where the next deliveries follow on.
    let mut after = resume.from();
    // Checked against the first delivery, which is the envelope at the cursor
    // (or a later one, if that one was pruned).
    let mut resume = resume.checks().then_some(resume);
    *attempt = 0;
    status.send_replace(Status::Live {
        head,
        held_back: None,
    });
    info!(head, cursor = device.cursor(), "session live");

    let (mut sink, mut ws) = ws.split();
    // The outbox waits until the channel is taken in: sealed before commits
    // this device has not seen yet, a message would be stored behind them,
    // where members may no longer hold its epoch's secrets. Taking them in
    // seals it again in the new epoch.
    // Nor before the envelope at the cursor is checked: if the relay went
    // back, what it numbered up to there is not taken in yet. Unless the
    // relay said there is nothing left to take in up to its head (retention
    // deleted it), nor so the envelope at the cursor.
    let mut outbound = Outbound::default();
    if (device.cursor() >= head && resume.is_none()) || pruned_up_to.is_some() {
        outbound.open(device).await?;
    }
    // Messages refused for the channel's quota are sent again later, on this
    // connection, backing off while the quota stays full.
    let mut quota_retry: Option<tokio::time::Instant> = None;
    let mut quota_refusals = 0u32;
    // Whether the relay sent a frame of an unknown type yet (said once a
    // connection).
    let mut unknown_seen = false;
    // The relay pings every `ping_secs`: hearing nothing for several of them
    // means a half-open connection (a proxy that blackholes, a dead link), so
    // the session reconnects instead of waiting forever.
    let liveness = Duration::from_secs(ping_secs.saturating_mul(LIVENESS_PINGS));
    let mut last_heard = tokio::time::Instant::now();
    let mut last_taken_in = last_heard;
    loop {
        tokio::select! {
            // Frames go out as the socket takes them, between reads: see `Outbound`.
            written = std::future::poll_fn(|cx| outbound.poll_write(&mut sink, cx)), if outbound.busy() => {
                written.map_err(|e| unreachable(device, e))?;
                if outbound.page_gone() {
                    outbound.publish_outbox(device).await?;
                }
            }
            _ = tokio::time::sleep_until(last_taken_in + CATCH_UP_QUIET), if !outbound.is_open() => {
                outbound.open(device).await?;
            }
            _ = tokio::time::sleep_until(last_heard + liveness) => {
                return Err(unreachable(
                    device,
                    format!("no word from the relay for {} s; reconnecting", liveness.as_secs()),
                ));
            }
            incoming = ws.next() => {
                last_heard = tokio::time::Instant::now();
                // Take every frame already here too, so a burst of deliveries
                // is taken in with one transaction (one disk sync).
                let mut held = frame_len(&incoming);
                let mut frames = vec![incoming];
                while frames.len() < MAX_BATCH && held < MAX_BATCH_BYTES {
                    match ws.next().now_or_never() {
                        Some(incoming) => {
                            held += frame_len(&incoming);
                            frames.push(incoming);
                        }
                        None => break,
                    }
                }
                let mut deliveries: Vec<(u64, Vec<u8>)> = Vec::new();
                let mut acks: Vec<(u64, u64)> = Vec::new();
                let mut frames = frames.into_iter();
                while let Some(incoming) = frames.next() {
                    let text = match incoming {
                        Some(Ok(WsMessage::Text(text))) => text,
                        Some(Ok(WsMessage::Close(frame))) => return Err(closed(device, frame.map(|f| u16::from(f.code)))),
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return Err(read_failed(device, e)),
                        None => return Err(unreachable(device, "connection closed")),
                    };
                    match ServerFrame::decode(&text) {
                        Ok(Some(ServerFrame::Deliver { seq, envelope })) => deliveries.push((seq, envelope)),
                        Ok(Some(ServerFrame::Ack { sender_seq, seq, .. })) => {
                            acks.push((sender_seq, seq));
                            outbound.answered();
                            quota_refusals = 0;
                            clear_held_back(status);
                        }
                        // Not final: the quota, the storage budget, a relay that could
                        // not store it right now, or a code this device does not know.
                        Ok(Some(ServerFrame::Error { code, message, fatal: false, .. })) if code.keeps_envelope() => {
                            outbound.answered();
                            if quota_retry.is_none() {
                                quota_refusals = quota_refusals.saturating_add(1);
                                let wait = backoff(quota_refusals);
                                warn!(%message, retry_in_ms = wait.as_millis() as u64, "the relay did not store an envelope for now (quota, storage or a passing failure); will send again");
                                quota_retry = Some(tokio::time::Instant::now() + wait);
                            }
                            // The first refusal says it (a later one, about the
                            // envelopes behind it, says "held back behind #N").
                            status.send_if_modified(|status| {
                                let Status::Live { held_back, .. } = status else {
                                    return false;
                                };
                                let same = matches!(held_back, Some(ClientError::Relay { code: held, .. }) if *held == code);
                                if !same {
                                    *held_back = Some(ClientError::refused(Refusal::new(code, message.clone()), 0));
                                }
                                !same
                            });
                        }
                        Ok(Some(ServerFrame::Error { code, message, fatal: false, sender_seq })) => {
                            outbound.answered();
                            clear_held_back(status);
                            // Anything but the quota will never be accepted: an
                            // incident, and an error for a `send` waiting on it.
                            match sender_seq {
                                Some(sender_seq) => {
                                    device
                                        .blocking(move |device| device.refused(sender_seq, code, &message))
                                        .await?
                                }
                                None => warn!(code = code.as_str(), %message, "the relay refused a frame"),
                            }
                        }
                        Ok(Some(ServerFrame::Error { code, message, fatal: true, .. })) => {
                            // The close that tells why may already be in this batch.
                            let close = match frames.next() {
                                Some(Some(Ok(WsMessage::Close(frame)))) => frame.map(|f| u16::from(f.code)),
                                Some(_) => None,
                                None => closing_code(&mut ws).await,
                            };
                            return Err(refusal(code, message, close));
                        }
                        Ok(None) => {
                            // A later relay's frame that needs no answer.
                            if !unknown_seen {
                                unknown_seen = true;
                                warn!("the relay sent a frame of a type this khub does not know; ignoring frames of unknown types on this connection");
                            }
                        }
                        Ok(Some(ServerFrame::Ready { .. })) | Err(_) => return Err(ClientError::Protocol("unexpected frame".into())),
                    }
                }
                if !acks.is_empty() {
                    device.blocking(move |device| device.acked_all(&acks)).await?;
                }
                if let (Some(to), Some((seq, _))) = (pruned_up_to, deliveries.first()) {
                    if *seq <= to {
                        return Err(ClientError::Protocol(format!(
                            "the relay delivered #{seq} after its ready said nothing up to #{to} is stored; it was not taken in"
                        )));
                    }
                    pruned_up_to = None;
                }
                if let (Some(check), Some((seq, envelope))) = (resume, deliveries.first()) {
                    resume = None;
                    if let Some(why) = check.replaced((*seq, envelope)) {
                        return Err(went_back(device, check, why).await);
                    }
                }
                if let Some((last, _)) = deliveries.last() {
                    let from = after;
                    after = *last;
                    let Ingested::Taken { resealed, .. } = device.take_in(from, deliveries).await? else {
                        return Err(unreachable(
                            device,
                            format!("another process on this home went back to #{}; resuming from there", device.cursor()),
                        ));
                    };
                    last_taken_in = tokio::time::Instant::now();
                    if device.removed_seen() {
                        return Err(ClientError::Revoked);
                    }
                    if !outbound.is_open() && device.cursor() >= head {
                        outbound.open(device).await?;
                    } else if resealed {
                        outbound.reread(device).await?;
                    } else {
                        // Taking in may have queued a re-issued commit.
                        outbound.publish_outbox(device).await?;
                    }
                }
            }
            Some(()) = wake.recv() => outbound.publish_outbox(device).await?,
            // Something was queued outside `send` (a notes edit, another
            // process on the same home).
            () = device.inner.queued.notified() => outbound.publish_outbox(device).await?,
            _ = tokio::time::sleep_until(quota_retry.unwrap_or_else(tokio::time::Instant::now)), if quota_retry.is_some() => {
                quota_retry = None;
                // The whole outbox again, oldest first (the relay stores each once).
                outbound.restart();
                outbound.publish_outbox(device).await?;
                if !outbound.busy() {
                    // Nothing left to hold back (another process sent it).
                    clear_held_back(status);
                }
            }
        }
    }
}

/// The relay holds nothing back any more: a live status says so.
fn clear_held_back(status: &watch::Sender<Status>) {
    status.send_if_modified(|status| match status {
        Status::Live { held_back, .. } => held_back.take().is_some(),
        _ => false,
    });
}

/// Whether `ready`'s `pruned_to` says that nothing after the cursor the
/// device sent in `hello` (`from`) up to the `head` is stored any more. One
/// not above `from`, or above the head, is the relay's error; one between
/// says only that less was deleted, which changes nothing here.
fn pruned_to_head(pruned_to: Option<u64>, from: u64, head: u64) -> Result<bool, ClientError> {
    match pruned_to {
        Some(to) if to <= from || to > head => Err(ClientError::Protocol(format!(
            "the relay's ready said nothing is stored up to #{to}, which is not after this device's cursor #{from} and at most its head #{head}"
        ))),
        Some(to) => Ok(to == head),
        None => Ok(false),
    }
}

/// The publishes of one connection that wait for the socket.
///
/// The session's loop writes them one at a time as the socket takes them,
/// reading between writes. Writing a whole outbox before reading again would
/// stall: past what the two ends' socket buffers hold, the relay blocks on the
/// deliveries it owes this device (its own envelopes come back among them),
/// stops reading, and both ends wait on full sockets until the relay closes the
/// session as a slow reader — on every reconnect, so a large outbox never went
/// out.
#[derive(Default)]
struct Outbound {
    /// The outbox goes out (the channel is taken in).
    open: bool,
    /// Envelopes to publish (sender number, bytes), oldest first; each is
    /// framed as it is written.
    envelopes: VecDeque<(u64, Vec<u8>)>,
    /// The highest sender number queued on this connection.
    queued_up_to: u64,
    /// The highest sender number written on this connection.
    written_up_to: u64,
    /// Written on this connection and not yet answered.
    in_flight: usize,
    /// Written to the socket since its last flush.
    unflushed: bool,
    /// The last read of the outbox found something: more may follow it,
    /// read when what it found has gone.
    more: bool,
}

impl Outbound {
    /// Whether the outbox goes out.
    fn is_open(&self) -> bool {
        self.open
    }

    /// From now on the outbox goes out, starting with what it holds, sealed
    /// again where its epoch has ended.
    async fn open(&mut self, device: &Device) -> Result<(), ClientError> {
        device.blocking(|device| device.reseal_stale()).await?;
        self.open = true;
        self.publish_outbox(device).await
    }

    /// Queues the outbox entries not yet queued on this connection, oldest
    /// first (none before [`open`](Self::open)), a page at a time: while one
    /// waits, the next is not read.
    async fn publish_outbox(&mut self, device: &Device) -> Result<(), ClientError> {
        if !self.open || (self.more && !self.envelopes.is_empty()) {
            return Ok(());
        }
        let from = self.queued_up_to;
        let outbox = device
            .blocking(move |device| device.db().outbox_after(from, OUTBOUND_PAGE_BYTES))
            .await?;
        self.more = !outbox.is_empty();
        for (sender_seq, envelope) in outbox {
            self.envelopes.push_back((sender_seq, envelope));
            self.queued_up_to = sender_seq;
        }
        Ok(())
    }

    /// The page read last has gone to the socket, and more may follow.
    fn page_gone(&self) -> bool {
        self.open && self.more && self.envelopes.is_empty()
    }

    /// The outbox was sealed again: what waits is read anew. What was written
    /// already goes on as written (the relay stores one sealing of each).
    async fn reread(&mut self, device: &Device) -> Result<(), ClientError> {
        self.envelopes.clear();
        self.queued_up_to = self.written_up_to;
        self.more = false;
        self.publish_outbox(device).await
    }

    /// The whole outbox is to be queued again: what waits now would go twice.
    fn restart(&mut self) {
        self.envelopes.clear();
        self.queued_up_to = 0;
        self.written_up_to = 0;
        self.more = false;
    }

    /// The relay answered one publish.
    fn answered(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// As many publishes as [`PUBLISH_WINDOW`] wait for the relay's answers.
    fn window_full(&self) -> bool {
        self.in_flight >= PUBLISH_WINDOW
    }

    /// An envelope waits for the socket and the window has room, or a flush
    /// is owed.
    fn busy(&self) -> bool {
        (!self.envelopes.is_empty() && !self.window_full()) || self.unflushed
    }

    /// One step: the oldest envelope framed and handed to the sink once it
    /// takes one, or, with none left, the flush. A step that cannot go on
    /// waits for the socket without losing its place, so the loop may read
    /// meanwhile.
    fn poll_write<S>(&mut self, sink: &mut S, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>>
    where
        S: Sink<WsMessage> + Unpin,
    {
        if self.envelopes.is_empty() || self.window_full() {
            ready!(sink.poll_flush_unpin(cx))?;
            self.unflushed = false;
            return Poll::Ready(Ok(()));
        }
        ready!(sink.poll_ready_unpin(cx))?;
        let (sender_seq, envelope) = self.envelopes.pop_front().expect("an envelope waits");
        self.written_up_to = sender_seq;
        self.in_flight += 1;
        let frame = ClientFrame::Publish { envelope }.to_text();
        sink.start_send_unpin(WsMessage::Text(frame.into()))?;
        self.unflushed = true;
        Poll::Ready(Ok(()))
    }
}

/// The code of the close that follows a fatal error frame, if it comes soon.
async fn closing_code<S>(ws: &mut S) -> Option<u16>
where
    S: futures_util::Stream<Item = Result<WsMessage, tokio_tungstenite::tungstenite::Error>>
        + Unpin,
{
    match tokio::time::timeout(Duration::from_secs(2), ws.next()).await {
        Ok(Some(Ok(WsMessage::Close(Some(frame))))) => Some(u16::from(frame.code)),
        _ => None,
    }
}

/// A fatal error frame, made precise by the close code that followed it.
fn refusal(code: ErrorCode, message: String, close: Option<u16>) -> ClientError {
    if close == Some(4003) {
        return ClientError::Revoked;
    }
    ClientError::refused(Refusal::new(code, message), 0)
}

/// Maps a close code onto an error: removal and bad credentials are fatal,
/// everything else (shutdown, slow, idle) is worth a reconnect.
fn closed(device: &Device, code: Option<u16>) -> ClientError {
    match code {
        Some(4003) => ClientError::Revoked,
        Some(4001) => ClientError::Unauthorized,
        Some(code) => unreachable(
            device,
            match CloseCode::from_code(code) {
                Some(c) => format!("the relay closed the session: {} ({code})", c.reason()),
                None => format!("the relay closed the session ({code})"),
            },
        ),
        None => unreachable(device, "the relay closed the session (no code)"),
    }
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use std::time::Duration;

    use super::{OUTBOUND_PAGE_BYTES, Outbound, pruned_to_head};
    use crate::client::ClientError;
    use crate::relay::config::Limits;
    use crate::testing::{TempDir, TestRelay, paired_devices};

    /// `pruned_to` counts only above the cursor sent (`from`: 7 here, with a
    /// resume check 6) and up to the head, and opens the outbox only at the
    /// head.
    #[test]
    fn pruned_to_is_taken_only_between_the_cursor_and_the_head() {
        let refused = |r: Result<bool, ClientError>| matches!(r, Err(ClientError::Protocol(_)));
        assert!(!pruned_to_head(None, 7, 12).unwrap());
        assert!(refused(pruned_to_head(Some(7), 7, 12)));
        assert!(refused(pruned_to_head(Some(0), 7, 12)));
        assert!(!pruned_to_head(Some(8), 7, 12).unwrap());
        assert!(pruned_to_head(Some(12), 7, 12).unwrap());
        assert!(refused(pruned_to_head(Some(13), 7, 12)));
        // Asking again for the envelope at cursor 7 (from 6): 7 is above.
        assert!(pruned_to_head(Some(7), 6, 7).unwrap());
        assert!(refused(pruned_to_head(Some(6), 6, 7)));
        // At the head, any value is refused.
        assert!(refused(pruned_to_head(Some(12), 12, 12)));
    }

    /// A connection holds about a page of a large outbox in memory, not all
    /// of it, and still queues every envelope once, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_outbox_is_read_a_page_at_a_time() {
        let relay = TestRelay::start(Limits::default()).await.unwrap();
        let home = TempDir::new("outbound");
        let paired = tokio::time::timeout(
            Duration::from_secs(30),
            paired_devices(home.path(), &[relay.url(), relay.url()]),
        )
        .await
        .expect("in time")
        .unwrap();
        let device = &paired.devices[0];
        let body = vec![7u8; 512 * 1024];
        let mut queued = Vec::new();
        for _ in 0..24 {
            queued.push(device.queue(&body).unwrap());
        }
        let largest = 600 * 1024;

        let mut outbound = Outbound::default();
        outbound.open(device).await.unwrap();
        let mut written = Vec::new();
        let mut pages = 0;
        while !outbound.envelopes.is_empty() {
            pages += 1;
            let held: usize = outbound.envelopes.iter().map(|(_, e)| e.len()).sum();
            assert!(held <= OUTBOUND_PAGE_BYTES + largest, "{held} bytes held");
            // The socket takes the page.
            while let Some((sender_seq, _)) = outbound.envelopes.pop_front() {
                written.push(sender_seq);
            }
            assert!(outbound.page_gone());
            outbound.publish_outbox(device).await.unwrap();
        }
        assert_eq!(written, queued);
        assert!(pages > 2, "{pages} pages");
        assert!(!outbound.page_gone());
    }
}
