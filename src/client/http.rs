//! A small HTTP/1.1 client for the relay's JSON routes, on hyper's client
//! connection API: one connection per request (TLS for `https://` relays), each
//! with a deadline.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;

use super::error::ClientError;
use crate::protocol::{ErrorCode, ErrorResponse, MAX_ANSWER_LEN, Refusal};

/// How long one request may take, unless the caller says otherwise.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The relay's address: `http://host:port` or `https://host:port`, with an
/// optional path under which a reverse proxy serves it (`https://host/khub`).
#[derive(Debug, Clone)]
pub struct RelayAddr {
    /// `host:port`.
    authority: String,
    /// The path prefix, empty or like `/khub` (no trailing slash).
    base: String,
    /// The host, for TLS server-name checks.
    host: String,
    /// Whether to speak TLS.
    tls: bool,
    /// Normalised, for messages and storage.
    pub url: String,
}

/// A connection, plain or TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

impl RelayAddr {
    /// Parses `http://host[:port][/path]` or `https://host[:port][/path]`
    /// (`ws://`, `wss://` too).
    pub fn parse(url: &str) -> Result<Self, ClientError> {
        let invalid = || {
            ClientError::Invalid(format!(
                "{url:?} is not a relay URL like https://relay.example or http://127.0.0.1:3000"
            ))
        };
        let uri: Uri = url.trim().parse().map_err(|_| invalid())?;
        let tls = match uri.scheme_str() {
            Some("http" | "ws") => false,
            Some("https" | "wss") => true,
            _ => return Err(invalid()),
        };
        let host = uri
            .host()
            .ok_or_else(invalid)?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let bracketed = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        if uri.query().is_some() {
            return Err(ClientError::Invalid(format!(
                "{url:?} has a query (?…); a relay URL is only scheme, host, port and path"
            )));
        }
        let base = uri.path().trim_end_matches('/').to_owned();
        let scheme = if tls { "https" } else { "http" };
        Ok(Self {
            authority: format!("{bracketed}:{port}"),
            url: format!("{scheme}://{bracketed}:{port}{base}"),
            base,
            host,
            tls,
        })
    }

    /// The WebSocket session URL.
    pub(crate) fn ws_url(&self) -> String {
        format!(
            "{}://{}{}/ws",
            if self.tls { "wss" } else { "ws" },
            self.authority,
            self.base
        )
    }

    /// Whether this relay is reached over TLS.
    pub(crate) fn is_tls(&self) -> bool {
        self.tls
    }

    /// A connection to the relay, wrapped in TLS for an `https://` relay.
    async fn connect(&self) -> Result<Box<dyn Io>, ClientError> {
        let stream = TcpStream::connect(&self.authority)
            .await
            .map_err(|e| self.unreachable(e))?;
        let _ = stream.set_nodelay(true);
        if !self.tls {
            return Ok(Box::new(stream));
        }
        let name = rustls::pki_types::ServerName::try_from(self.host.clone()).map_err(|_| {
            ClientError::Invalid(format!("{:?} is not a valid TLS server name", self.host))
        })?;
        let tls = tokio_rustls::TlsConnector::from(super::tls::config()?)
            .connect(name, stream)
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok(Box::new(tls))
    }

    /// A 404 where a relay route must be: nothing there speaks khub.
    pub(crate) fn not_a_relay(&self) -> ClientError {
        ClientError::Invalid(format!(
            "nothing at {} answers as a khub relay (HTTP 404): check the relay's address, with its path if it is served under one",
            self.url
        ))
    }

    /// An answer longer than any a relay sends, left unread.
    fn answer_too_long(&self) -> ClientError {
        ClientError::Protocol(format!(
            "{} sent more than {MAX_ANSWER_LEN} bytes, longer than any answer a khub relay sends; the device stopped reading (not a khub relay, or one that misbehaves)",
            self.url
        ))
    }

    fn unreachable(
        &self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> ClientError {
        ClientError::unreachable(self.url.clone(), source)
    }

    /// Sends one request; non-2xx answers become [`ClientError::Relay`].
    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(u16, Bytes), ClientError> {
        let request = async {
            let stream = self.connect().await?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| self.unreachable(e))?;
            tokio::spawn(connection);
            let mut builder = Request::builder()
                .method(method)
                .uri(format!("{}{path}", self.base))
                .header("host", &self.authority);
            for (name, value) in headers {
                builder = builder.header(*name, *value);
            }
            let body = body.unwrap_or_default();
            if !body.is_empty() {
                builder = builder.header("content-type", "application/json");
            }
            let request = builder
                .header("content-length", body.len())
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| self.unreachable(e))?;
            let status = response.status().as_u16();
            // Into one buffer as it comes (kept as received, a body in
            // one-byte chunks would cost far more than its bytes), and no
            // more than a conforming relay's longest answer.
            let mut body = response.into_body();
            let mut bytes = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| self.unreachable(e))?;
                if let Ok(data) = frame.into_data() {
                    if bytes.len() + data.len() > MAX_ANSWER_LEN {
                        return Err(self.answer_too_long());
                    }
                    bytes.extend_from_slice(&data);
                }
            }
            let bytes = Bytes::from(bytes);
            Ok::<_, ClientError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(timeout, request)
            .await
            .map_err(|_| ClientError::Timeout(timeout.as_secs()))??;
        if (200..300).contains(&status) {
            return Ok((status, bytes));
        }
        // An answer without a khub error body: a 404 means nothing at this
        // address speaks khub (a wrong path, another server); anything else
        // (a proxy's 502 page) keeps its status, under the code it means.
        let khub = serde_json::from_slice::<ErrorResponse>(&bytes);
        if status == 404 && khub.is_err() {
            return Err(self.not_a_relay());
        }
        let refusal = khub.map(|e| e.error).unwrap_or_else(|_| {
            let code = match status {
                404 => ErrorCode::NotFound,
                408 => ErrorCode::Timeout,
                413 => ErrorCode::TooLarge,
                429 => ErrorCode::RateLimited,
                502..=504 => ErrorCode::Unavailable,
                _ => ErrorCode::Unknown,
            };
            Refusal::new(code, format!("HTTP status {status} without a khub error"))
        });
        Err(ClientError::refused(refusal, status))
    }

    /// A JSON request and answer.
    pub(crate) async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&impl Serialize>,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let body = body.map(|b| serde_json::to_vec(b).expect("request bodies serialise"));
        let (_, bytes) = self.send(method, path, headers, body, timeout).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Protocol(format!("invalid JSON answer: {e}")))
    }
}
