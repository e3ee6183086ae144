//! One device's WebSocket session: hello, then publishes in and deliveries out
//! until the device leaves, idles out, lags too far, is revoked, or the relay
//! shuts down.
//!
//! Publishes are pipelined: each is handed to the store as it arrives (so they
//! are stored in the order sent and the SQLite store can commit several at
//! once) and acked in order as commits complete, up to `MAX_IN_FLIGHT` at a
//! time.
//!
//! The session owns its cursor. Whenever the channel's head is past it, the
//! session fetches the next batch (cache or store) and writes it; when caught up
//! it waits on the channel's signal. A device that stops reading makes only its
//! own writes wait; after [`Limits::slow_reader_timeout`] it is closed with 4008
//! and resumes later from its cursor, losing nothing.
//!
//! [`Limits::slow_reader_timeout`]: super::config::Limits::slow_reader_timeout

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::{debug, info, warn};

use super::Relay;
use super::conn_io::{BeforeHello, HELLO_BYTES};
use super::hub::{Hub, Ready, store_error};
use super::metrics::Metrics;
use super::store::StoreError;
use crate::crypto::envelope::EnvelopeHeader;
use crate::ids::{ChannelId, DeviceId};
use crate::protocol::{
    ClientFrame, CloseCode, ErrorCode, FrameError, PROTOCOL_VERSION, ServerFrame,
};

/// Envelopes written per batch before looking at incoming frames again.
const DELIVERY_BATCH: usize = 64;
/// Publishes a session may have waiting for their commit; past this it stops
/// reading the device's frames until one is acked (backpressure).
const MAX_IN_FLIGHT: usize = 64;

/// How long `ready` waits for the session's first read, to say whether
/// anything after the device's cursor is still stored.
const READY_READ_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A publish waiting for its commit, with the sender_seq to report on refusal.
type Pending<'a> = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = (
                    Result<super::hub::Published, crate::protocol::Refusal>,
                    Option<u64>,
                ),
            > + Send
            + 'a,
    >,
>;

/// A read of the deliveries after the session's cursor.
type Fetch<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Vec<Ready>, StoreError>> + Send + 'a>,
>;

/// Why a session ended; decides the close frame.
enum End {
    /// The peer closed or vanished: nothing more to send.
    Gone,
    /// Close with this code (after an optional error frame).
    Close(CloseCode, Option<ServerFrame>),
}

impl From<FrameError> for End {
    fn from(e: FrameError) -> Self {
        let close = e.code.close_code().unwrap_or(CloseCode::Protocol);
        End::Close(close, Some(ServerFrame::error(e.code, e.message)))
    }
}

fn fatal(code: ErrorCode, message: impl Into<String>) -> End {
    End::Close(
        code.close_code().unwrap_or(CloseCode::Protocol),
        Some(ServerFrame::Error {
            code,
            message: message.into(),
            fatal: true,
            sender_seq: None,
        }),
    )
}

/// The store failed: the session ends with its refusal (`internal`, 1011)
/// and the device reconnects.
fn store_failed(e: StoreError) -> End {
    let refused = store_error(e);
    fatal(refused.code, refused.message)
}

/// After a read found nothing past `cursor`: the store's head, and whether
/// still nothing follows the cursor. The head is read first, so everything up
/// to it was committed before the second look: if that finds nothing, nothing
/// up to the head ever will (it was pruned).
async fn head_after_empty_read(
    hub: &Hub,
    channel: ChannelId,
    cursor: u64,
) -> Result<(u64, bool), StoreError> {
    let head = hub.store.head(channel).await?;
    let again = hub.fetch(channel, cursor, 1).await?;
    Ok((head, again.is_empty()))
}

fn text(frame: &ServerFrame) -> Message {
    Message::Text(frame.to_text().into())
}

/// Counts the session while it lives.
struct Counted(Arc<Metrics>);

impl Drop for Counted {
    fn drop(&mut self) {
        Metrics::dec(&self.0.sessions);
    }
}

/// Runs a session on an upgraded connection until it ends.
pub async fn run<S>(
    mut ws: WebSocketStream<BeforeHello<S>>,
    relay: Arc<Relay>,
    peer: IpAddr,
    shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let end = match hello(&mut ws, &relay).await {
        Ok((channel, device, cursor)) => {
            ws.get_mut().lift();
            Metrics::inc(&relay.hub.metrics.sessions);
            let _counted = Counted(Arc::clone(&relay.hub.metrics));
            let span = tracing::info_span!("session", %channel, %device);
            let _entered = span.enter();
            info!(%peer, cursor, "session opened");
            drop(_entered);
            let end = serve(&mut ws, &relay, channel, device, cursor, shutdown).await;
            info!(parent: &span, "session closed");
            end
        }
        Err(end) => end,
    };
    if let End::Close(code, frame) = end {
        let close = async {
            if let Some(frame) = frame {
                ws.send(text(&frame)).await?;
            }
            ws.close(Some(CloseFrame {
                code: WsCloseCode::from(code.code()),
                reason: code.reason().into(),
            }))
            .await?;
            // Keep the socket open until the peer answers the close (its
            // pending pongs would otherwise hit a reset and lose the close frame).
            while let Some(Ok(_)) = ws.next().await {}
            Ok::<(), WsError>(())
        };
        // A peer that does not read must not hold the task: give the close a moment.
        let _ = timeout(std::time::Duration::from_secs(2), close).await;
    }
}

/// Waits for and checks the `hello` frame. Returns the session's identity and cursor.
async fn hello<S>(
    ws: &mut WebSocketStream<BeforeHello<S>>,
    relay: &Relay,
) -> Result<(ChannelId, DeviceId, u64), End>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limits = &relay.config.limits;
    let first = match timeout(limits.hello_timeout, ws.next()).await {
        Err(_) => {
            return Err(fatal(
                ErrorCode::Malformed,
                "expected a hello frame first, within the handshake timeout",
            ));
        }
        Ok(None) => return Err(End::Gone),
        Ok(Some(Err(_))) if ws.get_ref().exhausted() => {
            relay.hub.metrics.breach("frame_size");
            return Err(fatal(
                ErrorCode::TooLarge,
                format!(
                    "more than {HELLO_BYTES} bytes before the hello frame: hello comes first and takes a few hundred"
                ),
            ));
        }
        Ok(Some(Err(e))) => return Err(read_error(e, relay)),
        Ok(Some(Ok(message))) => message,
    };
    let Message::Text(body) = first else {
        return Err(fatal(
            ErrorCode::Malformed,
            "frames are JSON text; the first must be hello",
        ));
    };
    let (v, channel, device, token, cursor) =
        match ClientFrame::decode(&body, limits.max_frame_bytes)? {
            ClientFrame::Hello {
                v,
                channel,
                device,
                token,
                cursor,
            } => (v, channel, device, token, cursor),
            ClientFrame::Publish { .. } => {
                return Err(fatal(ErrorCode::Malformed, "the first frame must be hello"));
            }
        };
    if v != PROTOCOL_VERSION {
        return Err(fatal(
            ErrorCode::UnsupportedVersion,
            crate::protocol::frames::unsupported_version(u64::from(v)),
        ));
    }
    let record = relay
        .hub
        .store
        .device(channel, device)
        .await
        .map_err(store_failed)?;
    match record {
        Some(r) if r.token_hash.verify(&token) && !r.revoked => Ok((channel, device, cursor)),
        Some(r) if r.token_hash.verify(&token) => Err(End::Close(
            CloseCode::Revoked,
            Some(ServerFrame::error(
                ErrorCode::Revoked,
                "this device was removed from the channel",
            )),
        )),
        _ => {
            Metrics::inc(&relay.hub.metrics.auth_failures);
            warn!(%channel, %device, "session refused: unknown device or wrong token");
            Err(fatal(
                ErrorCode::Unauthorized,
                "unknown channel or device, or wrong token",
            ))
        }
    }
}

fn read_error(e: WsError, relay: &Relay) -> End {
    match e {
        WsError::Capacity(_) => {
            relay.hub.metrics.breach("frame_size");
            fatal(
                ErrorCode::TooLarge,
                "a frame exceeded the relay's frame size limit",
            )
        }
        WsError::Protocol(_) | WsError::Utf8(_) => {
            fatal(ErrorCode::Malformed, "WebSocket protocol violation")
        }
        _ => End::Gone,
    }
}

/// The authenticated part of the session.
async fn serve<S>(
    ws: &mut WebSocketStream<S>,
    relay: &Relay,
    channel: ChannelId,
    device: DeviceId,
    mut cursor: u64,
    mut shutdown: watch::Receiver<bool>,
) -> End
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limits = &relay.config.limits;
    let hub = &relay.hub;
    let mut signals = hub.notifier.subscribe(channel);
    let mut seen = *signals.borrow_and_update();
    let head = match hub.store.head(channel).await {
        Ok(head) => head,
        Err(e) => return store_failed(e),
    };
    let mut known_head = head.max(seen.head);
    // The read of the next deliveries, kept from one turn of the loop to the
    // next until it completes: dropped, it would still run (a blocking task,
    // a query on the server) and then be asked for again, so that every
    // frame the device sent could cost the store a whole read.
    let mut fetching: Option<Fetch<'_>> = None;
    // The first one starts before `ready`, which says when it found nothing
    // though the head is past the cursor: retention deleted what followed the
    // cursor, and a device told so need not wait for deliveries. `ready`
    // waits for it [`READY_READ_WAIT`] at most (a crowd of devices catching
    // up at once queues for the store); past that it goes without, and the
    // loop takes the read over.
    let mut pruned_to = None;
    if cursor < head {
        let mut first: Fetch<'_> = Box::pin(hub.fetch(channel, cursor, DELIVERY_BATCH));
        match tokio::time::timeout(READY_READ_WAIT, &mut first).await {
            Ok(Ok(batch)) if batch.is_empty() => {
                pruned_to = Some(head);
                cursor = head;
            }
            Ok(Ok(batch)) => fetching = Some(Box::pin(std::future::ready(Ok(batch)))),
            Ok(Err(e)) => return store_failed(e),
            Err(_) => fetching = Some(first),
        }
    }
    if ws
        .send(text(&ServerFrame::Ready {
            v: PROTOCOL_VERSION,
            head,
            ping_secs: Some(relay.config.limits.ping_interval.as_secs().max(1)),
            retention_secs: Some(relay.config.limits.retention.as_secs()),
            pruned_to,
        }))
        .await
        .is_err()
    {
        return End::Gone;
    }
    let mut ping = tokio::time::interval(limits.ping_interval);
    ping.reset();
    let mut last_heard = Instant::now();

    // Publishes handed to the store and not yet committed, acked in order.
    let mut in_flight: FuturesOrdered<Pending<'_>> = FuturesOrdered::new();
    // Frames read while deliveries wait: after a batch's worth (64), reading
    // waits for the next delivery.
    let mut reads_behind = 0;
    loop {
        let behind = known_head > cursor;
        // The device's frames are read (and its silence counted) unless
        // its publishes or the deliveries waiting have to catch up first.
        let reading = in_flight.len() < MAX_IN_FLIGHT && reads_behind < DELIVERY_BATCH;
        if behind && fetching.is_none() {
            fetching = Some(Box::pin(hub.fetch(channel, cursor, DELIVERY_BATCH)));
        }
        // In this order, whatever else is ready: acks first, since a device's
        // next publish waits for them (one commit wakes every session of the
        // channel at once); then the channel's signals; then the device's
        // frames, at most 64 read per delivery while deliveries wait; a ping
        // (once an interval); deliveries last, as batches.
        tokio::select! {
            biased;
            _ = shutdown.changed() => return End::Close(CloseCode::GoingAway, None),
            Some(mut done) = in_flight.next(), if !in_flight.is_empty() => {
                // Answer every publish whose commit is done, then flush once:
                // a group commit completes a session's publishes together.
                loop {
                    let (result, sender_seq) = done;
                    if let Ok(published) = &result {
                        known_head = known_head.max(published.seq);
                    }
                    let reply = match answer(result, sender_seq) {
                        Ok(reply) => reply,
                        Err(end) => return end,
                    };
                    if let Err(end) = within(limits.slow_reader_timeout, &hub.metrics, ws.feed(text(&reply))).await {
                        return end;
                    }
                    match in_flight.next().now_or_never() {
                        Some(Some(next)) => done = next,
                        _ => break,
                    }
                }
                if let Err(end) = within(limits.slow_reader_timeout, &hub.metrics, ws.flush()).await {
                    return end;
                }
            }
            changed = signals.changed() => {
                if changed.is_err() {
                    return End::Close(CloseCode::GoingAway, None);
                }
                let signal = *signals.borrow_and_update();
                known_head = known_head.max(signal.head);
                if signal.revocations != seen.revocations {
                    match hub.store.device(channel, device).await {
                        Ok(Some(record)) if !record.revoked => {}
                        // The store did not answer: nothing says the device was
                        // removed; it reconnects and is checked again.
                        Err(e) => return store_failed(e),
                        Ok(_) => return End::Close(
                            CloseCode::Revoked,
                            Some(ServerFrame::error(ErrorCode::Revoked, "this device was removed from the channel")),
                        ),
                    }
                }
                seen = signal;
            }
            incoming = ws.next(), if reading => {
                last_heard = Instant::now();
                reads_behind += usize::from(behind);
                let message = match incoming {
                    None => return End::Gone,
                    Some(Err(e)) => return read_error(e, relay),
                    Some(Ok(message)) => message,
                };
                match message {
                    Message::Text(body) => {
                        let envelope = match ClientFrame::decode(&body, limits.max_frame_bytes) {
                            Ok(ClientFrame::Publish { envelope }) => envelope,
                            Ok(ClientFrame::Hello { .. }) => return fatal(ErrorCode::Malformed, "hello may only be sent once"),
                            Err(e) if e.code == ErrorCode::TooLarge => {
                                hub.metrics.breach("frame_size");
                                return e.into();
                            }
                            Err(e) => return e.into(),
                        };
                        let sender_seq = EnvelopeHeader::decode(&envelope).ok().map(|h| h.seq);
                        let publish = hub.publish(channel, device, Bytes::from(envelope));
                        in_flight.push_back(Box::pin(async move { (publish.await, sender_seq) }));
                    }
                    Message::Binary(_) => return fatal(ErrorCode::Malformed, "frames are JSON text, not binary"),
                    Message::Ping(payload) => {
                        if let Err(end) = within(limits.slow_reader_timeout, &hub.metrics, ws.send(Message::Pong(payload))).await {
                            return end;
                        }
                    }
                    Message::Pong(_) | Message::Frame(_) => {}
                    Message::Close(_) => return End::Gone,
                }
            }
            _ = ping.tick() => {
                if !reading {
                    last_heard = Instant::now();
                } else if last_heard.elapsed() > limits.idle_timeout {
                    hub.metrics.breach("idle_timeout");
                    return End::Close(CloseCode::Idle, None);
                }
                if let Err(end) = within(limits.slow_reader_timeout, &hub.metrics, ws.send(Message::Ping(Bytes::new()))).await {
                    return end;
                }
            }
            batch = async { fetching.as_mut().expect("polled only while a read is under way").await }, if fetching.is_some() => {
                fetching = None;
                reads_behind = 0;
                let batch = match batch {
                    Ok(batch) => batch,
                    Err(e) => return store_failed(e),
                };
                if batch.is_empty() {
                    // Nothing stored after the cursor though the head is past it:
                    // pruned, or a wake-up that announced more than there is
                    // (another node's notification is a hint).
                    match head_after_empty_read(hub, channel, cursor).await {
                        // Deliver from the next stored envelope on.
                        Ok((head, true)) => {
                            known_head = head.max(cursor);
                            cursor = known_head;
                        }
                        // Something was stored meanwhile: deliver it next time round.
                        Ok((head, false)) => known_head = known_head.max(head),
                        Err(e) => return store_failed(e),
                    }
                    continue;
                }
                if let Err(end) = deliver(ws, &batch, limits.slow_reader_timeout, &hub.metrics).await {
                    if matches!(end, End::Close(CloseCode::Slow, _)) {
                        warn!(%channel, %device, cursor, "closing a session that does not read its deliveries");
                    }
                    return end;
                }
                let delivered: usize = batch.iter().map(|r| r.len).sum();
                hub.metrics.envelopes_out.fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
                hub.metrics.bytes_out.fetch_add(delivered as u64, std::sync::atomic::Ordering::Relaxed);
                cursor = batch.last().map_or(cursor, |r| r.seq);
            }
        }
    }
}

/// The frame that answers a publish once the store is done with it: its ack
/// or its refusal. A store failure (`internal`) ends the session instead: the
/// envelope may or may not be stored, so the session closes (1011, as the
/// protocol says) and the device sends its outbox again on its next session,
/// where whatever was stored meanwhile is recognised as a duplicate.
fn answer(
    result: Result<super::hub::Published, crate::protocol::Refusal>,
    sender_seq: Option<u64>,
) -> Result<ServerFrame, End> {
    match result {
        Ok(published) => Ok(ServerFrame::Ack {
            sender_seq: published.sender_seq,
            seq: published.seq,
            duplicate: published.duplicate,
        }),
        Err(e) if e.code == ErrorCode::Internal => Err(End::Close(
            CloseCode::Internal,
            Some(ServerFrame::Error {
                code: e.code,
                message: e.message,
                fatal: true,
                sender_seq,
            }),
        )),
        Err(e) => {
            debug!(code = e.code.as_str(), "publish refused");
            Ok(ServerFrame::Error {
                code: e.code,
                message: e.message,
                fatal: false,
                sender_seq,
            })
        }
    }
}

/// Finishes one write step (sending a pong or a ping, queueing or flushing
/// acks or deliveries) within `patience`: a peer that stops reading cannot hold the
/// session's task forever; it is closed as slow.
async fn within(
    patience: std::time::Duration,
    metrics: &Metrics,
    step: impl std::future::Future<Output = Result<(), WsError>>,
) -> Result<(), End> {
    // Most steps finish at once (a frame into the write buffer): only one
    // that has to wait pays for a timer (a clock read and a runtime handle).
    let mut step = std::pin::pin!(step);
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(step.as_mut().poll(cx))).await;
    let done = match first {
        std::task::Poll::Ready(done) => Ok(done),
        std::task::Poll::Pending => timeout(patience, step).await,
    };
    match done {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(End::Gone),
        Err(_) => {
            metrics.breach("slow_reader");
            Err(End::Close(CloseCode::Slow, None))
        }
    }
}

/// Writes a batch of deliveries and flushes once. A device is slow only if one
/// step makes no progress for `patience`: a device that is reading, however
/// large the batch, is not cut off.
async fn deliver<S>(
    ws: &mut WebSocketStream<S>,
    batch: &[Ready],
    patience: std::time::Duration,
    metrics: &Metrics,
) -> Result<(), End>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    for ready in batch {
        within(
            patience,
            metrics,
            ws.feed(Message::Text(ready.frame.clone())),
        )
        .await?;
    }
    within(patience, metrics, ws.flush()).await
}
