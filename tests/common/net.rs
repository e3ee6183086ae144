//! A relay on an ephemeral port, and raw HTTP and WebSocket clients for it.
//! Every network await here has a timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use khub::crypto::os_rng;
use khub::crypto::token::AccessToken;
use khub::ids::{ChannelId, DeviceId};
use khub::protocol::{ClientFrame, Credentials, ServerFrame};
use khub::relay::Relay;
use khub::relay::config::RelayConfig;
use khub::relay::server::Running;
use khub::relay::store::Store;
use khub::relay::store::memory::MemoryStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Timeout for any single network step in a test.
pub const STEP: Duration = Duration::from_secs(10);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A relay running in this process.
pub struct TestRelay {
    pub addr: SocketAddr,
    pub relay: Arc<Relay>,
    running: Running,
}

impl TestRelay {
    pub async fn start(config: RelayConfig) -> Self {
        Self::start_with(Arc::new(MemoryStore::new()), config).await
    }

    pub async fn start_with(store: Arc<dyn Store>, config: RelayConfig) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), store, config)
            .await
            .unwrap()
    }

    /// On a given address (to restart a relay where its devices expect it).
    pub async fn start_on(
        addr: SocketAddr,
        store: Arc<dyn Store>,
        config: RelayConfig,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr().unwrap();
        let relay = Relay::new(store, config);
        Ok(Self {
            addr,
            running: Running::spawn(Arc::clone(&relay), listener),
            relay,
        })
    }

    /// Graceful shutdown, waited for.
    pub async fn stop(self) {
        self.running
            .stop(Duration::from_secs(20))
            .await
            .expect("relay stops");
    }
}

/// An HTTP response: status and body.
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }
}

/// One HTTP/1.1 request on a fresh connection.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    tokio::time::timeout(STEP, async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut request = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n", body.len());
        if !body.is_empty() {
            request.push_str("content-type: application/json\r\n");
        }
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        stream.write_all(body).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("complete response head");
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut body = raw[split + 4..].to_vec();
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            body = dechunk(&body);
        }
        Response { status, body }
    })
    .await
    .expect("HTTP request timed out")
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..line_end]).unwrap().trim(), 16)
                .unwrap();
        data = &data[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

pub async fn post_json(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &serde_json::Value,
) -> Response {
    http(addr, "POST", path, headers, body.to_string().as_bytes()).await
}

/// A device as the relay sees it: ids and token.
pub struct Member {
    pub channel: ChannelId,
    pub device: DeviceId,
    pub token: AccessToken,
}

impl Member {
    pub fn new(channel: ChannelId) -> Self {
        let mut rng = os_rng();
        Self {
            channel,
            device: DeviceId::random(&mut rng),
            token: AccessToken::generate(&mut rng),
        }
    }

    pub fn with_device(channel: ChannelId, device: DeviceId) -> Self {
        Self {
            channel,
            device,
            token: AccessToken::generate(&mut os_rng()),
        }
    }

    pub fn auth(&self) -> String {
        Credentials {
            channel: self.channel,
            device: self.device,
            token: self.token.duplicate(),
        }
        .to_header()
        .to_string()
    }

    /// A stand-in envelope of this member: a valid header, then `len` filler
    /// bytes (the relay reads only the header).
    pub fn stand_in(&self, seq: u64, len: usize) -> Vec<u8> {
        let header = khub::crypto::envelope::EnvelopeHeader {
            channel: self.channel,
            epoch: 0,
            sender: self.device,
            seq,
        };
        [&header.encode()[..], &vec![0x5a; len]].concat()
    }

    /// [`Member::stand_in`], base64url for a `/sync` publish.
    pub fn stand_in_envelope(&self, seq: u64, len: usize) -> String {
        khub::protocol::b64::encode(self.stand_in(seq, len))
    }

    pub fn hello(&self, cursor: u64) -> String {
        ClientFrame::Hello {
            v: khub::protocol::PROTOCOL_VERSION,
            channel: self.channel,
            device: self.device,
            token: self.token.duplicate(),
            cursor,
        }
        .to_text()
    }
}

/// Creates a channel whose first device is `member`.
pub async fn create_channel(addr: SocketAddr, member: &Member) -> Response {
    let body = serde_json::json!({
        "channel": member.channel.to_string(),
        "device": member.device.to_string(),
        "token_hash": khub::protocol::b64::encode(member.token.hash().0),
    });
    post_json(addr, "/channels", &[], &body).await
}

/// `by` admits `new` to their channel.
pub async fn admit(addr: SocketAddr, by: &Member, new: &Member) -> Response {
    let body = serde_json::json!({
        "device": new.device.to_string(),
        "token_hash": khub::protocol::b64::encode(new.token.hash().0),
    });
    post_json(
        addr,
        &format!("/channels/{}/devices", by.channel),
        &[("authorization", &by.auth())],
        &body,
    )
    .await
}

pub async fn connect(addr: SocketAddr) -> Ws {
    let (ws, _) = tokio::time::timeout(
        STEP,
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws")),
    )
    .await
    .expect("connect timed out")
    .expect("WebSocket handshake");
    if let MaybeTlsStream::Plain(stream) = ws.get_ref() {
        stream.set_nodelay(true).unwrap();
    }
    ws
}

pub async fn send_text(ws: &mut Ws, text: String) {
    tokio::time::timeout(STEP, ws.send(Message::Text(text.into())))
        .await
        .expect("send timed out")
        .expect("send");
}

/// The next frame that is not a ping or pong.
pub async fn next_message(ws: &mut Ws) -> Option<Message> {
    tokio::time::timeout(STEP, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(message)) => return Some(message),
                Some(Err(e)) => {
                    eprintln!("WebSocket read error: {e}");
                    return None;
                }
                None => return None,
            }
        }
    })
    .await
    .expect("receive timed out")
}

/// The next JSON frame from the relay.
pub async fn next_frame(ws: &mut Ws) -> ServerFrame {
    match next_message(ws).await {
        Some(Message::Text(text)) => {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("bad frame {text}"))
        }
        other => panic!("expected a text frame, got {other:?}"),
    }
}

/// Expects the relay to close the connection with `code` (after any frames).
pub async fn expect_close(ws: &mut Ws, code: u16) -> Vec<ServerFrame> {
    let mut frames = Vec::new();
    loop {
        match next_message(ws).await {
            Some(Message::Text(text)) => frames.push(serde_json::from_str(&text).unwrap()),
            Some(Message::Close(Some(frame))) => {
                assert_eq!(
                    u16::from(frame.code),
                    code,
                    "close code (frames before: {frames:?})"
                );
                return frames;
            }
            other => panic!("expected close {code}, got {other:?} after {frames:?}"),
        }
    }
}

/// Opens an authenticated session and reads its `ready`: the head.
pub async fn session(addr: SocketAddr, member: &Member, cursor: u64) -> (Ws, u64) {
    let (ws, head, _) = session_pruned(addr, member, cursor).await;
    (ws, head)
}

/// The same, with the `pruned_to` that `ready` carried.
pub async fn session_pruned(
    addr: SocketAddr,
    member: &Member,
    cursor: u64,
) -> (Ws, u64, Option<u64>) {
    let mut ws = connect(addr).await;
    send_text(&mut ws, member.hello(cursor)).await;
    match next_frame(&mut ws).await {
        ServerFrame::Ready {
            head, pruned_to, ..
        } => (ws, head, pruned_to),
        other => panic!("expected ready, got {other:?}"),
    }
}

pub fn publish(envelope: &[u8]) -> String {
    ClientFrame::Publish {
        envelope: envelope.to_vec(),
    }
    .to_text()
}

// The pairing mailbox, as the two sides use it.

pub async fn open_slot(addr: SocketAddr, inviter: &Member, sid: [u8; 16]) -> u32 {
    let opened = post_json(
        addr,
        "/pair",
        &[("authorization", &inviter.auth())],
        &serde_json::json!({"sid": khub::protocol::b64::encode(sid)}),
    )
    .await;
    assert_eq!(
        opened.status,
        201,
        "{}",
        String::from_utf8_lossy(&opened.body)
    );
    opened.json()["nameplate"].as_u64().unwrap() as u32
}

pub async fn claim(addr: SocketAddr, nameplate: u32) -> Response {
    http(addr, "POST", &format!("/pair/{nameplate}/claim"), &[], b"").await
}

pub async fn send_msg(
    addr: SocketAddr,
    nameplate: u32,
    auth: (&str, &str),
    message: &[u8],
) -> Response {
    post_json(
        addr,
        &format!("/pair/{nameplate}/messages"),
        &[auth],
        &serde_json::json!({"message": khub::protocol::b64::encode(message)}),
    )
    .await
}

/// Long-polls until a message at index `after` arrives (or the slot closes).
pub async fn recv_msg(
    addr: SocketAddr,
    nameplate: u32,
    auth: (&str, &str),
    after: usize,
) -> (Vec<Vec<u8>>, bool) {
    let got = http(
        addr,
        "GET",
        &format!("/pair/{nameplate}/messages?after={after}&wait=5"),
        &[auth],
        b"",
    )
    .await;
    assert_eq!(got.status, 200, "{}", String::from_utf8_lossy(&got.body));
    let body: serde_json::Value = got.json();
    let messages = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| khub::protocol::b64::decode(m.as_str().unwrap()).unwrap())
        .collect();
    (messages, body["closed"].as_bool().unwrap())
}
