//! A hostile relay: an HTTP front for a real relay that rewrites what devices
//! receive. It sees exactly what a relay operator sees (envelopes, pairing
//! messages, session ids) and can do anything an operator could — drop,
//! reorder, duplicate, replay, tamper with or inject envelopes, and substitute
//! pairing messages — without knowing any code or key.
//!
//! Devices reach it as they would the relay: `Device::sync` and the pairing
//! mailbox over HTTP, live sessions over WebSocket (`/ws`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::ids::DeviceId;
use crate::protocol::{
    B64, Credentials, Delivered, OpenSlot, PairMessages, Refusal, ServerFrame, SyncAck,
    SyncRequest, SyncResponse,
};
use crate::relay::pairing::Side;

/// An envelope as the real relay returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The real relay sequence number.
    pub seq: u64,
    /// The envelope.
    pub envelope: Vec<u8>,
}

type SyncHook = Box<dyn FnMut(Vec<Delivery>) -> Vec<Vec<u8>> + Send>;
type DeliverHook = Box<dyn FnMut(Delivery) -> Vec<Vec<u8>> + Send>;
type PairingHook = Box<dyn FnMut(Side, [u8; 16], Vec<u8>) -> Vec<u8> + Send>;
type PublishHook = Box<dyn FnMut(&[u8]) -> Option<Refusal> + Send>;
type AnswerHook = Box<dyn FnMut(SyncResponse) -> SyncResponse + Send>;
type ReadyHook = Box<dyn FnMut(ServerFrame) -> ServerFrame + Send>;

#[derive(Default)]
struct Hooks {
    sync: Option<SyncHook>,
    deliver: Option<DeliverHook>,
    pairing: Option<PairingHook>,
    publish: Option<PublishHook>,
    answer: Option<AnswerHook>,
    ready: Option<ReadyHook>,
    /// Text frames sent to the device right before each `ready`, as they are.
    before_ready: Vec<String>,
    /// Text frames sent to the device after each `ready`, as they are.
    after_ready: Vec<String>,
    /// How long the envelope a resuming device asked for again waits after
    /// `ready`, and how many publishes devices sent while one waited.
    hold_again: Duration,
    published_while_held: usize,
    /// The session id of the last slot opened through this front.
    sid: [u8; 16],
    /// The last envelope this front gave each device, with the number it
    /// gave it under: a device that resumes asks again for the one at its
    /// cursor (to tell whether the relay went back), and gets it from here,
    /// as this front numbered it, while the relay is asked from the cursor.
    /// The hooks see only what follows, as they did before devices asked.
    given: HashMap<DeviceId, (u64, Vec<u8>)>,
}

impl Hooks {
    /// The envelope this front gave `device` right after `cursor`, if any:
    /// what a device resuming from `cursor` asks for again.
    fn given_after(&self, device: DeviceId, cursor: u64) -> Option<(u64, Vec<u8>)> {
        self.given
            .get(&device)
            .filter(|(seq, _)| *seq == cursor + 1)
            .cloned()
    }
}

/// An HTTP front for the relay at `upstream`; honest until given hooks.
pub struct HostileRelay {
    addr: SocketAddr,
    hooks: Arc<Mutex<Hooks>>,
    task: JoinHandle<()>,
}

impl HostileRelay {
    /// Starts the front on an ephemeral port.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let hooks = Arc::new(Mutex::new(Hooks::default()));
        let shared = Arc::clone(&hooks);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let hooks = Arc::clone(&shared);
                tokio::spawn(async move {
                    let mut start = [0u8; 7];
                    if matches!(stream.peek(&mut start).await, Ok(7)) && &start == b"GET /ws" {
                        let _ = websocket(stream, upstream, hooks).await;
                        return;
                    }
                    let service = hyper::service::service_fn(move |request| {
                        forward(upstream, Arc::clone(&hooks), request)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self { addr, hooks, task })
    }

    /// `http://` URL of the front, for devices.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Rewrites the envelopes of every `/sync` answer: `hook` gets what the
    /// relay returned and gives what the device receives, which the front
    /// numbers on from the device's cursor (as a relay would its own log).
    pub fn on_sync(&self, hook: impl FnMut(Vec<Delivery>) -> Vec<Vec<u8>> + Send + 'static) {
        self.lock().sync = Some(Box::new(hook));
    }

    /// Rewrites every envelope a live session receives: `hook` gets each one
    /// the relay delivers and gives what the device receives instead (none to
    /// drop it, two to duplicate it, others to hold back, reorder, tamper or
    /// inject), which the front numbers on from the session's cursor.
    pub fn on_deliver(&self, hook: impl FnMut(Delivery) -> Vec<Vec<u8>> + Send + 'static) {
        self.lock().deliver = Some(Box::new(hook));
    }

    /// Rewrites every pairing message a side receives: `hook` gets the side
    /// it is for, the pairing's session id (which a relay knows) and the
    /// message, and gives what that side receives instead.
    pub fn on_pairing(
        &self,
        hook: impl FnMut(Side, [u8; 16], Vec<u8>) -> Vec<u8> + Send + 'static,
    ) {
        self.lock().pairing = Some(Box::new(hook));
    }

    /// Refuses envelopes a device publishes over `/sync`: `hook` gets each
    /// one, and for a refusal it returns, the envelope is not passed on and
    /// its ack is that refusal.
    pub fn on_publish(&self, hook: impl FnMut(&[u8]) -> Option<Refusal> + Send + 'static) {
        self.lock().publish = Some(Box::new(hook));
    }

    /// Rewrites each whole `/sync` answer, last, as it is: its head, its
    /// `more`, its numbering, anything a relay could send.
    pub fn on_sync_answer(&self, hook: impl FnMut(SyncResponse) -> SyncResponse + Send + 'static) {
        self.lock().answer = Some(Box::new(hook));
    }

    /// Rewrites the `ready` frame that opens each live session.
    pub fn on_ready(&self, hook: impl FnMut(ServerFrame) -> ServerFrame + Send + 'static) {
        self.lock().ready = Some(Box::new(hook));
    }

    /// Sends each live session these text frames, as they are, right after
    /// its `ready`: frames a relay could send that no device asked for.
    pub fn after_ready(&self, frames: Vec<String>) {
        self.lock().after_ready = frames;
    }

    /// The same, right before its `ready`.
    pub fn before_ready(&self, frames: Vec<String>) {
        self.lock().before_ready = frames;
    }

    /// Holds back, for `hold` after `ready`, the envelope a resuming device
    /// asked for again (the one at its cursor, which it checks before it
    /// publishes; deliveries the relay sends meanwhile pass it), and counts
    /// what the device publishes meanwhile:
    /// [`published_while_held`](Self::published_while_held).
    pub fn hold_again(&self, hold: Duration) {
        self.lock().hold_again = hold;
    }

    /// Publishes devices sent while the envelope they asked for again was held back.
    pub fn published_while_held(&self) -> usize {
        self.lock().published_while_held
    }

    /// Back to forwarding faithfully.
    pub fn honest(&self) {
        let mut hooks = self.lock();
        let sid = hooks.sid;
        let given = std::mem::take(&mut hooks.given);
        *hooks = Hooks {
            sid,
            given,
            ..Hooks::default()
        };
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Hooks> {
        self.hooks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for HostileRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `envelope` with byte `index` flipped (counted from the end if it is past it).
pub fn flip_byte(envelope: &[u8], index: usize) -> Vec<u8> {
    let mut changed = envelope.to_vec();
    let at = index.min(changed.len().saturating_sub(1));
    if let Some(byte) = changed.get_mut(at) {
        *byte ^= 0x01;
    }
    changed
}

/// A live session through the front: frames pass both ways; deliveries go
/// through the `on_deliver` hook when there is one.
async fn websocket(
    stream: TcpStream,
    upstream: SocketAddr,
    hooks: Arc<Mutex<Hooks>>,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    use crate::protocol::ClientFrame;

    let mut device = tokio_tungstenite::accept_async(stream).await?;
    let (mut relay, _) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(format!("ws://{upstream}/ws")),
    )
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    // The sequence number the device has last been given.
    let mut numbered = 0u64;
    // The device, once it said hello, and what it asked for again.
    let mut who: Option<DeviceId> = None;
    let mut again: Option<(u64, Vec<u8>)> = None;
    // That envelope, held back until then (`HostileRelay::hold_again`).
    let mut held: Option<(tokio::time::Instant, Message)> = None;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(held.as_ref().map_or_else(tokio::time::Instant::now, |h| h.0)), if held.is_some() => {
                if let Some((_, frame)) = held.take() {
                    device.send(frame).await?;
                }
            }
            from_device = device.next() => {
                let Some(mut message) = from_device.transpose()? else { return Ok(()) };
                if held.is_some()
                    && let Message::Text(text) = &message
                    && let Ok(ClientFrame::Publish { .. }) = ClientFrame::decode(text, usize::MAX)
                {
                    hooks.lock().unwrap_or_else(|e| e.into_inner()).published_while_held += 1;
                }
                if let Message::Text(text) = &message
                    && let Ok(ClientFrame::Hello { v, channel, device: id, token, cursor }) =
                        ClientFrame::decode(text, usize::MAX)
                {
                    who = Some(id);
                    numbered = cursor;
                    let given = hooks.lock().unwrap_or_else(|e| e.into_inner()).given_after(id, cursor);
                    if let Some((seq, envelope)) = given {
                        let hello = ClientFrame::Hello { v, channel, device: id, token, cursor: seq };
                        message = Message::Text(hello.to_text().into());
                        numbered = seq;
                        again = Some((seq, envelope));
                    }
                }
                relay.send(message).await?;
            }
            from_relay = relay.next() => {
                let Some(message) = from_relay.transpose()? else { return Ok(()) };
                let frame = match &message {
                    Message::Text(text) => serde_json::from_str::<ServerFrame>(text).ok(),
                    _ => None,
                };
                let delivery = match frame {
                    Some(ServerFrame::Deliver { seq, envelope }) => Delivery { seq, envelope },
                    Some(ready @ ServerFrame::Ready { .. }) => {
                        let (rewritten, before, extra, hold) = {
                            let mut hooks = hooks.lock().unwrap_or_else(|e| e.into_inner());
                            let rewritten = hooks
                                .ready
                                .as_mut()
                                .map(|hook| Message::Text(hook(ready).to_text().into()));
                            (rewritten, hooks.before_ready.clone(), hooks.after_ready.clone(), hooks.hold_again)
                        };
                        for text in before {
                            device.send(Message::Text(text.into())).await?;
                        }
                        device.send(rewritten.unwrap_or(message)).await?;
                        for text in extra {
                            device.send(Message::Text(text.into())).await?;
                        }
                        if let Some((seq, envelope)) = again.take() {
                            let frame = Message::Text(ServerFrame::Deliver { seq, envelope }.to_text().into());
                            if hold.is_zero() {
                                device.send(frame).await?;
                            } else {
                                held = Some((tokio::time::Instant::now() + hold, frame));
                            }
                        }
                        continue;
                    }
                    _ => {
                        device.send(message).await?;
                        continue;
                    }
                };
                let rewritten = hooks
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .deliver
                    .as_mut()
                    .map(|hook| hook(delivery.clone()));
                let mut last = None;
                match rewritten {
                    None => {
                        numbered = delivery.seq;
                        device.send(message).await?;
                        last = Some(delivery.envelope);
                    }
                    Some(envelopes) => {
                        for envelope in envelopes {
                            numbered += 1;
                            let frame = ServerFrame::Deliver { seq: numbered, envelope: envelope.clone() };
                            device.send(Message::Text(frame.to_text().into())).await?;
                            last = Some(envelope);
                        }
                    }
                }
                if let (Some(id), Some(envelope)) = (who, last) {
                    hooks.lock().unwrap_or_else(|e| e.into_inner()).given.insert(id, (numbered, envelope));
                }
            }
        }
    }
}

type Answer = Response<Full<Bytes>>;

async fn forward(
    upstream: SocketAddr,
    hooks: Arc<Mutex<Hooks>>,
    request: Request<Incoming>,
) -> Result<Answer, std::io::Error> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let path = parts.uri.path().to_owned();
    let lock = || hooks.lock().unwrap_or_else(|e| e.into_inner());
    if parts.method == "POST"
        && path == "/pair"
        && let Ok(open) = serde_json::from_slice::<OpenSlot>(&body)
    {
        lock().sid = open.sid;
    }
    let mut sync = (path == "/sync")
        .then(|| serde_json::from_slice::<SyncRequest>(&body).ok())
        .flatten();
    let who = parts
        .headers
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| Credentials::from_header(value).ok())
        .map(|credentials| credentials.device);
    // The envelope at the device's cursor, asked for again: from this front.
    let mut again = None;
    let mut body = body;
    if let (Some(request), Some(who)) = (sync.as_mut(), who) {
        let given = lock().given_after(who, request.cursor);
        if let Some((seq, envelope)) = given {
            request.cursor = seq;
            body = Bytes::from(serde_json::to_vec(&*request).expect("serialises"));
            again = Some((seq, envelope));
        }
    }
    let cursor = sync.as_ref().map(|r| r.cursor);
    // The refusals the publish hook makes, by place in the request; the rest
    // goes on to the relay.
    let mut refusals: Vec<Option<Refusal>> = Vec::new();
    if let (Some(mut request), Some(hook)) = (sync, lock().publish.as_mut()) {
        refusals = request.publish.iter().map(|B64(e)| hook(e)).collect();
        let mut place = refusals.iter();
        request
            .publish
            .retain(|_| place.next().is_some_and(Option::is_none));
        body = Bytes::from(serde_json::to_vec(&request).expect("serialises"));
    }
    let receiver =
        if path.starts_with("/pair/") && path.ends_with("/messages") && parts.method == "GET" {
            Some(if parts.headers.contains_key("authorization") {
                Side::Inviter
            } else {
                Side::Joiner
            })
        } else {
            None
        };

    let mut builder = Request::builder().method(parts.method).uri(parts.uri);
    for (name, value) in &parts.headers {
        // The body may have changed; hyper writes its length.
        if name != "content-length" {
            builder = builder.header(name, value);
        }
    }
    let outgoing = builder
        .body(Full::new(body))
        .map_err(std::io::Error::other)?;
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(upstream))
        .await
        .map_err(std::io::Error::other)??;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(connection);
    let response = sender
        .send_request(outgoing)
        .await
        .map_err(std::io::Error::other)?;
    let (parts, body) = response.into_parts();
    let mut body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();

    if parts.status.is_success() {
        let mut hooks = lock();
        let sid = hooks.sid;
        // A `/sync` answer is read once, rewritten by each hook set, in
        // order (refusals, envelopes, the whole answer), and written once.
        if let Some(cursor) = cursor
            && let Ok(mut answer) = serde_json::from_slice::<SyncResponse>(&body)
        {
            if refusals.iter().any(Option::is_some) {
                let mut passed_on = answer.acks.into_iter();
                answer.acks = refusals
                    .into_iter()
                    .map(|refusal| match refusal {
                        Some(error) => SyncAck {
                            seq: None,
                            duplicate: false,
                            error: Some(error),
                        },
                        None => passed_on
                            .next()
                            .expect("an ack for each envelope passed on"),
                    })
                    .collect();
            }
            if let Some(hook) = hooks.sync.as_mut() {
                let real = answer
                    .envelopes
                    .drain(..)
                    .map(|d| Delivery {
                        seq: d.seq,
                        envelope: d.envelope,
                    })
                    .collect();
                answer.envelopes = hook(real)
                    .into_iter()
                    .zip(cursor + 1..)
                    .map(|(envelope, seq)| Delivered { seq, envelope })
                    .collect();
                answer.head = cursor + answer.envelopes.len() as u64;
                answer.more = false;
            }
            if let Some((seq, envelope)) = again {
                answer.envelopes.insert(0, Delivered { seq, envelope });
            }
            if let Some(hook) = hooks.answer.as_mut() {
                answer = hook(answer);
            }
            if let (Some(who), Some(last)) = (who, answer.envelopes.last()) {
                hooks.given.insert(who, (last.seq, last.envelope.clone()));
            }
            body = Bytes::from(serde_json::to_vec(&answer).expect("serialises"));
        }
        if let (Some(side), Some(hook)) = (receiver, hooks.pairing.as_mut())
            && let Ok(mut answer) = serde_json::from_slice::<PairMessages>(&body)
        {
            answer.messages = answer
                .messages
                .into_iter()
                .map(|B64(message)| B64(hook(side, sid, message)))
                .collect();
            body = Bytes::from(serde_json::to_vec(&answer).expect("serialises"));
        }
    }
    let mut answer = Response::builder().status(parts.status);
    for (name, value) in &parts.headers {
        if name != "content-length" && name != "transfer-encoding" {
            answer = answer.header(name, value);
        }
    }
    answer.body(Full::new(body)).map_err(std::io::Error::other)
}
