//! A small HTTP/1.1 client for the relay's JSON routes, on hyper's client
//! connection API: one connection per request, each with a deadline.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use warp::http::{Method, Request, Uri};

use super::error::ClientError;
use crate::protocol::ErrorResponse;

/// How long one request may take, unless the caller says otherwise.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The relay's address, as `http://host:port`.
#[derive(Debug, Clone)]
pub struct RelayAddr {
    /// `host:port`.
    authority: String,
    /// As given, for messages.
    pub url: String,
}

impl RelayAddr {
    /// Parses `http://host[:port]` (`ws://` is accepted too).
    pub fn parse(url: &str) -> Result<Self, ClientError> {
        let uri: Uri = url.trim().parse().map_err(|_| {
            ClientError::Protocol(format!(
                "{url:?} is not a relay URL like http://127.0.0.1:3000"
            ))
        })?;
        match uri.scheme_str() {
            Some("http" | "ws") => {}
            Some("https" | "wss") => {
                return Err(ClientError::Protocol(
                    "TLS relay URLs are not supported by this client yet: reach the relay over http:// (for example through an SSH tunnel or on localhost)".into(),
                ));
            }
            _ => {
                return Err(ClientError::Protocol(format!(
                    "{url:?} is not a relay URL like http://127.0.0.1:3000"
                )));
            }
        }
        let host = uri
            .host()
            .ok_or_else(|| ClientError::Protocol(format!("{url:?} has no host")))?;
        let port = uri.port_u16().unwrap_or(80);
        Ok(Self {
            authority: format!("{host}:{port}"),
            url: format!("http://{host}:{port}"),
        })
    }

    /// The WebSocket session URL.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.authority)
    }

    fn unreachable(&self, detail: impl std::fmt::Display) -> ClientError {
        ClientError::Unreachable {
            relay: self.url.clone(),
            detail: detail.to_string(),
        }
    }

    /// Sends one request; non-2xx answers become [`ClientError::Relay`].
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(u16, Bytes), ClientError> {
        let request = async {
            let stream = TcpStream::connect(&self.authority)
                .await
                .map_err(|e| self.unreachable(e))?;
            let _ = stream.set_nodelay(true);
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| self.unreachable(e))?;
            tokio::spawn(connection);
            let mut builder = Request::builder()
                .method(method)
                .uri(path)
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
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| self.unreachable(e))?
                .to_bytes();
            Ok::<_, ClientError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(timeout, request)
            .await
            .map_err(|_| ClientError::Timeout(timeout.as_secs()))??;
        if (200..300).contains(&status) {
            return Ok((status, bytes));
        }
        let (code, message) = match serde_json::from_slice::<ErrorResponse>(&bytes) {
            Ok(e) => (e.error.code.as_str().to_owned(), e.error.message),
            Err(_) => ("http".into(), format!("HTTP status {status}")),
        };
        Err(match code.as_str() {
            "unauthorized" => ClientError::Unauthorized,
            _ => ClientError::Relay {
                code,
                message,
                status,
            },
        })
    }

    /// A JSON request and answer.
    pub async fn json<T: DeserializeOwned>(
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
