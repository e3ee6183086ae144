//! The relay's HTTP routes as warp filters. Each handler parses, checks
//! credentials, calls the hub, store or slots, and answers JSON; errors use the
//! protocol's codes (see [`crate::protocol`]).

// Helpers return the finished error `Response` as their `Err`, so handlers can
// `?`-style early-return it; it is built once per failed request, so its size
// does not matter.
#![allow(clippy::result_large_err)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hyper::upgrade::OnUpgrade;
use serde::Serialize;
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use warp::Filter;
use warp::http::{HeaderMap, StatusCode};
use warp::reply::{Reply, Response};

use super::Relay;
use super::conn_io::BeforeHello;
use super::hub::store_error;
use super::limits::ConnectionGuard;
use super::pairing::SlotAuth;
use super::session;
use super::store::StoreError;
use crate::crypto::token::AccessToken;
use crate::protocol::{
    AdmitDevice, B64, CLAIM_HEADER, ChannelCreated, CreateChannel, Credentials, Delivered,
    DeviceList, ErrorCode, ErrorResponse, OPERATOR_HEADER, OpenSlot, PairMessage, PairMessages,
    Refusal, SYNC_PAGE_BYTES, SlotClaimed, SlotOpened, SyncAck, SyncRequest, SyncResponse,
};

/// Longest a pairing long-poll waits.
pub const MAX_POLL: Duration = Duration::from_secs(25);
/// Largest pairing mailbox request body: the largest pairing message in
/// base64 inside its JSON object.
const MAX_PAIR_BODY: u64 = (crate::pairing::message::MAX_MESSAGE_LEN as u64).div_ceil(3) * 4 + 1024;
// Devices read answers of up to MAX_ANSWER_LEN: a page as base64url, with
// the JSON of each envelope and the acks, stays well within it.
const _: () = assert!(SYNC_PAGE_BYTES.div_ceil(3) * 4 * 2 <= crate::protocol::MAX_ANSWER_LEN);
/// Largest body of the small JSON requests.
const MAX_SMALL_BODY: u64 = 4 * 1024;

/// Per-connection facts the accept loop puts in each request's extensions.
#[derive(Clone)]
pub struct ConnInfo {
    /// The TCP peer's address.
    pub peer: SocketAddr,
    /// The client's address: the peer's, or the one a trusted proxy named.
    pub client: std::net::IpAddr,
    /// The connection's slot under the per-address limit (none through a
    /// trusted proxy); kept alive by the WebSocket session after an upgrade.
    pub guard: Option<Arc<ConnectionGuard>>,
    /// The connection's upgrade handle, taken by the `/ws` route.
    pub upgrade: Arc<Mutex<Option<OnUpgrade>>>,
    /// Relay shutdown, for sessions.
    pub shutdown: watch::Receiver<bool>,
}

/// A JSON error response.
pub fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    let body = ErrorResponse {
        error: Refusal::new(code, message),
    };
    let status = StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    warp::reply::with_status(warp::reply::json(&body), status).into_response()
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    warp::reply::with_status(warp::reply::json(body), status).into_response()
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|e| {
        if e.to_string().starts_with(crate::protocol::bounded::TOO_LONG) {
            return error(
                ErrorCode::TooLarge,
                format!(
                    "a list in the body is longer than the protocol allows (publish: at most {} envelopes per request; send the rest in another)",
                    crate::protocol::MAX_PUBLISH_PER_SYNC
                ),
            );
        }
        // serde can quote values; say only where the problem is.
        let what = if e.is_syntax() || e.is_eof() {
            "the body is not valid JSON"
        } else {
            "a field is missing or invalid"
        };
        error(ErrorCode::Malformed, what)
    })
}

fn refused(refusal: Refusal) -> Response {
    error(refusal.code, refusal.message)
}

fn store_failure(e: StoreError) -> Response {
    refused(store_error(e))
}

/// Resolves to the credentials in `Authorization`, checked against the store.
async fn authenticate(relay: &Relay, header: Option<String>) -> Result<Credentials, Response> {
    check_credentials(relay, header).await.map_err(refused)
}

async fn check_credentials(relay: &Relay, header: Option<String>) -> Result<Credentials, Refusal> {
    let header = header.ok_or_else(|| {
        Refusal::new(
            ErrorCode::Unauthorized,
            "missing Authorization: Bearer <channel>.<device>.<token>",
        )
    })?;
    let credentials = Credentials::from_header(&header).map_err(|code| {
        crate::relay::metrics::Metrics::inc(&relay.metrics().auth_failures);
        Refusal::new(
            code,
            "malformed credentials: expected Bearer <channel>.<device>.<token>",
        )
    })?;
    relay.authenticate(&credentials).await?;
    Ok(credentials)
}

/// A request refused before its body was read.
#[derive(Debug)]
struct Refused(Refusal);

impl warp::reject::Reject for Refused {}

/// The device's credentials, checked before anything reads the body: a
/// client that cannot authenticate cannot make the relay buffer one.
fn authenticated(
    relay: Arc<Relay>,
) -> impl Filter<Extract = (Credentials,), Error = warp::Rejection> + Clone {
    auth_header()
        .and(with_relay(relay))
        .and_then(|header, relay: Arc<Relay>| async move {
            check_credentials(&relay, header)
                .await
                .map_err(|refusal| warp::reject::custom(Refused(refusal)))
        })
}

fn with_relay(
    relay: Arc<Relay>,
) -> impl Filter<Extract = (Arc<Relay>,), Error = Infallible> + Clone {
    warp::any().map(move || Arc::clone(&relay))
}

fn body(limit: u64) -> impl Filter<Extract = (Bytes,), Error = warp::Rejection> + Clone {
    warp::body::content_length_limit(limit).and(warp::body::bytes())
}

fn auth_header() -> impl Filter<Extract = (Option<String>,), Error = Infallible> + Clone {
    warp::header::optional::<String>("authorization")
        .or(warp::any().map(|| None))
        .unify()
}

/// `GET /metrics`: the Prometheus text.
fn metrics_route(
    relay: Arc<Relay>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path!("metrics")
        .and(warp::get())
        .and(with_relay(relay))
        .map(|relay: Arc<Relay>| {
            warp::reply::with_header(
                relay.metrics().render(),
                "content-type",
                "text/plain; version=0.0.4",
            )
            .into_response()
        })
}

/// What the operator's metrics listener serves: `/metrics` and `/healthz`.
pub fn metrics_routes(
    relay: Arc<Relay>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let health = warp::path!("healthz")
        .and(warp::get())
        .and(with_relay(Arc::clone(&relay)))
        .then(healthz);
    metrics_route(Arc::clone(&relay))
        .or(health)
        .unify()
        .recover(move |rejection| recover(Arc::clone(&relay), rejection))
        .unify()
}

/// All routes, with errors mapped to JSON.
pub fn routes(relay: Arc<Relay>) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let conn = warp::ext::get::<ConnInfo>();
    let sync_limit = (relay.config.limits.max_frame_bytes as u64).saturating_mul(16);

    let health = warp::path!("healthz")
        .and(warp::get())
        .and(with_relay(Arc::clone(&relay)))
        .then(healthz);
    let public_metrics = relay.config.public_metrics;
    let metrics = metrics_route(Arc::clone(&relay)).and_then(move |response| async move {
        if public_metrics {
            Ok(response)
        } else {
            Err(warp::reject::not_found())
        }
    });
    let ws = warp::path!("ws")
        .and(warp::get())
        .and(warp::header::headers_cloned())
        .and(conn)
        .and(with_relay(Arc::clone(&relay)))
        .map(upgrade);
    let create = warp::path!("channels")
        .and(warp::post())
        .and(warp::header::optional::<String>(OPERATOR_HEADER))
        .and(conn)
        .and(body(MAX_SMALL_BODY))
        .and(with_relay(Arc::clone(&relay)))
        .then(create_channel);
    let list = warp::path!("channels" / String / "devices")
        .and(warp::get())
        .and(auth_header())
        .and(with_relay(Arc::clone(&relay)))
        .then(list_devices);
    let admit = warp::path!("channels" / String / "devices")
        .and(warp::post())
        .and(auth_header())
        .and(body(MAX_SMALL_BODY))
        .and(with_relay(Arc::clone(&relay)))
        .then(admit_device);
    let remove = warp::path!("channels" / String / "devices" / String)
        .and(warp::delete())
        .and(auth_header())
        .and(with_relay(Arc::clone(&relay)))
        .then(remove_device);
    let sync = warp::path!("sync")
        .and(warp::post())
        .and(authenticated(Arc::clone(&relay)))
        .and(body(sync_limit))
        .and(with_relay(Arc::clone(&relay)))
        .then(sync);
    let open = warp::path!("pair")
        .and(warp::post())
        .and(auth_header())
        .and(body(MAX_PAIR_BODY))
        .and(with_relay(Arc::clone(&relay)))
        .then(open_slot);
    let claim = warp::path!("pair" / u32 / "claim")
        .and(warp::post())
        .and(conn)
        .and(with_relay(Arc::clone(&relay)))
        .then(claim_slot);
    let post = warp::path!("pair" / u32 / "messages")
        .and(warp::post())
        .and(conn)
        .and(auth_header())
        .and(warp::header::optional::<String>(CLAIM_HEADER))
        .and(body(MAX_PAIR_BODY))
        .and(with_relay(Arc::clone(&relay)))
        .then(post_message);
    let poll = warp::path!("pair" / u32 / "messages")
        .and(warp::get())
        .and(conn)
        .and(auth_header())
        .and(warp::header::optional::<String>(CLAIM_HEADER))
        .and(warp::query::<PollQuery>())
        .and(with_relay(Arc::clone(&relay)))
        .then(poll_messages);
    let end = warp::path!("pair" / u32)
        .and(warp::delete())
        .and(conn)
        .and(auth_header())
        .and(warp::header::optional::<String>(CLAIM_HEADER))
        .and(with_relay(Arc::clone(&relay)))
        .then(end_slot);

    health
        .or(metrics)
        .unify()
        .or(ws)
        .unify()
        .or(create)
        .unify()
        .or(list)
        .unify()
        .or(admit)
        .unify()
        .or(remove)
        .unify()
        .or(sync)
        .unify()
        .or(open)
        .unify()
        .or(claim)
        .unify()
        .or(post)
        .unify()
        .or(poll)
        .unify()
        .or(end)
        .unify()
        .recover(move |rejection| recover(Arc::clone(&relay), rejection))
        .unify()
}

async fn recover(relay: Arc<Relay>, rejection: warp::Rejection) -> Result<Response, Infallible> {
    Ok(
        if let Some(Refused(refusal)) = rejection.find::<Refused>() {
            refused(refusal.clone())
        } else if rejection.is_not_found() {
            error(ErrorCode::NotFound, "no such route")
        } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
            relay.metrics().breach("frame_size");
            error(
                ErrorCode::TooLarge,
                "the request body exceeds the relay's limit",
            )
        } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
            error(ErrorCode::NotFound, "no such route for this method")
        } else if rejection.find::<warp::reject::InvalidQuery>().is_some() {
            error(ErrorCode::Malformed, "invalid query string")
        } else {
            error(ErrorCode::Malformed, "the request is malformed")
        },
    )
}

async fn healthz(relay: Arc<Relay>) -> Response {
    match relay.hub.store.health().await {
        Ok(()) => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        Err(_) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"status": "store unavailable"}),
        ),
    }
}

/// The WebSocket configuration: a 4 KiB read buffer instead of tungstenite's
/// 128 KiB, so an idle session costs a few KiB, and frames bounded by the limit.
pub fn ws_config(max_frame_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(32 * 1024)
        .max_write_buffer_size(max_frame_bytes.saturating_mul(2))
        .max_message_size(Some(max_frame_bytes))
        .max_frame_size(Some(max_frame_bytes))
}

fn upgrade(headers: HeaderMap, conn: ConnInfo, relay: Arc<Relay>) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    // Browser origins were checked before routing (`edge::check_origin`).
    let is_upgrade = header("connection")
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        && header("upgrade").eq_ignore_ascii_case("websocket")
        && header("sec-websocket-version") == "13";
    let key = header("sec-websocket-key");
    if !is_upgrade || key.is_empty() {
        return error(
            ErrorCode::BadRequest,
            "expected a WebSocket upgrade (version 13)",
        );
    }
    let Some(on_upgrade) = conn
        .upgrade
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    else {
        return error(ErrorCode::BadRequest, "this connection cannot be upgraded");
    };
    let accept = derive_accept_key(key.as_bytes());
    let max_frame = relay.config.limits.max_frame_bytes;
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let io = BeforeHello::new(hyper_util::rt::TokioIo::new(upgraded));
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            io,
            Role::Server,
            Some(ws_config(max_frame)),
        )
        .await;
        session::run(ws, Arc::clone(&relay), conn.client, conn.shutdown.clone()).await;
        drop(conn);
    });
    let mut response = warp::reply().into_response();
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(
        "connection",
        warp::http::HeaderValue::from_static("upgrade"),
    );
    h.insert("upgrade", warp::http::HeaderValue::from_static("websocket"));
    if let Ok(value) = warp::http::HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", value);
    }
    response
}

async fn create_channel(
    operator: Option<String>,
    conn: ConnInfo,
    body: Bytes,
    relay: Arc<Relay>,
) -> Response {
    if let Some(secret) = &relay.config.operator_secret {
        // Whether a secret came at all is the caller's to know; which bytes
        // would have been right is not (compared in constant time).
        let Some(operator) = operator.filter(|o| !o.is_empty()) else {
            return error(
                ErrorCode::Forbidden,
                "creating channels on this relay needs its operator secret in X-Khub-Operator, and none was given",
            );
        };
        let given = super::config::RelayConfig::operator_secret_from(&operator);
        if !bool::from(given.expose().ct_eq(secret.expose())) {
            return error(
                ErrorCode::Forbidden,
                "the operator secret given in X-Khub-Operator is not this relay's",
            );
        }
    }
    if relay.hub.storage_full() {
        relay.metrics().breach("storage_budget");
        return error(
            ErrorCode::StorageFull,
            "the relay's storage is full; it takes no new channels until retention frees room",
        );
    }
    if let Err(response) = within_rate(
        &*relay.creations,
        &relay,
        conn.client,
        "channels_per_ip",
        "too many channels created from this address; try again later",
    )
    .await
    {
        return response;
    }
    let request: CreateChannel = match parse(&body) {
        Ok(r) => r,
        Err(response) => return response,
    };
    let now = super::hub::unix_now();
    match relay
        .hub
        .store
        .create_channel(request.channel, request.device, request.token_hash, now)
        .await
    {
        Ok(()) => {
            crate::relay::metrics::Metrics::inc(&relay.metrics().channels_created);
            tracing::info!(channel = %request.channel, device = %request.device, "channel created");
            json(
                StatusCode::CREATED,
                &ChannelCreated {
                    channel: request.channel,
                },
            )
        }
        Err(e) => store_failure(e),
    }
}

/// Authenticates and checks that the credentials belong to the channel in the path.
async fn member_of(
    relay: &Relay,
    channel: &str,
    header: Option<String>,
) -> Result<Credentials, Response> {
    let credentials = authenticate(relay, header).await?;
    if channel != credentials.channel.to_string() {
        return Err(error(
            ErrorCode::Unauthorized,
            "these credentials belong to another channel",
        ));
    }
    Ok(credentials)
}

async fn active_devices(relay: &Relay, credentials: &Credentials) -> Result<DeviceList, Response> {
    let devices = relay
        .hub
        .store
        .devices(credentials.channel)
        .await
        .map_err(store_failure)?;
    Ok(DeviceList {
        devices: devices
            .into_iter()
            .filter(|d| !d.revoked)
            .map(|d| d.device)
            .collect(),
    })
}

async fn list_devices(channel: String, auth: Option<String>, relay: Arc<Relay>) -> Response {
    let credentials = match member_of(&relay, &channel, auth).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    match active_devices(&relay, &credentials).await {
        Ok(list) => json(StatusCode::OK, &list),
        Err(response) => response,
    }
}

async fn admit_device(
    channel: String,
    auth: Option<String>,
    body: Bytes,
    relay: Arc<Relay>,
) -> Response {
    let credentials = match member_of(&relay, &channel, auth).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    let request: AdmitDevice = match parse(&body) {
        Ok(r) => r,
        Err(response) => return response,
    };
    let max = relay.config.limits.max_devices_per_channel;
    let now = super::hub::unix_now();
    if let Err(e) = relay
        .hub
        .store
        .admit(
            credentials.channel,
            request.device,
            request.token_hash,
            max,
            now,
        )
        .await
    {
        if matches!(e, StoreError::ChannelFull(_)) {
            relay.metrics().breach("devices_per_channel");
        }
        return store_failure(e);
    }
    tracing::info!(channel = %credentials.channel, by = %credentials.device, device = %request.device, "device admitted");
    match active_devices(&relay, &credentials).await {
        Ok(list) => json(StatusCode::CREATED, &list),
        Err(response) => response,
    }
}

async fn remove_device(
    channel: String,
    device: String,
    auth: Option<String>,
    relay: Arc<Relay>,
) -> Response {
    let credentials = match member_of(&relay, &channel, auth).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    let Ok(device) = device.parse() else {
        return error(
            ErrorCode::InvalidBase64,
            "the device id in the path is not a valid id",
        );
    };
    if let Err(e) = relay.hub.store.revoke(credentials.channel, device).await {
        return store_failure(e);
    }
    relay.hub.notifier.revoked(credentials.channel);
    tracing::info!(channel = %credentials.channel, by = %credentials.device, %device, "device removed");
    match active_devices(&relay, &credentials).await {
        Ok(list) => json(StatusCode::OK, &list),
        Err(response) => response,
    }
}

async fn sync(credentials: Credentials, body: Bytes, relay: Arc<Relay>) -> Response {
    let request: SyncRequest = match parse(&body) {
        Ok(r) => r,
        Err(response) => return response,
    };
    let mut acks = Vec::with_capacity(request.publish.len());
    // After one the store could not take, the rest of the request is not
    // stored either: storing a later one would put it ahead of the failed
    // one, which the device sends again (and which would then be out of order
    // for good). The device keeps them all and sends them again, in order.
    let mut failed: Option<Refusal> = None;
    for B64(envelope) in request.publish {
        if let Some(refusal) = &failed {
            acks.push(SyncAck {
                seq: None,
                duplicate: false,
                error: Some(refusal.clone()),
            });
            continue;
        }
        let ack = match relay
            .hub
            .publish(
                credentials.channel,
                credentials.device,
                Bytes::from(envelope),
            )
            .await
        {
            Ok(p) => SyncAck {
                seq: Some(p.seq),
                duplicate: p.duplicate,
                error: None,
            },
            Err(e) => {
                if e.code == ErrorCode::Internal {
                    failed = Some(e.clone());
                }
                SyncAck {
                    seq: None,
                    duplicate: false,
                    error: Some(e),
                }
            }
        };
        acks.push(ack);
    }
    let limit = request
        .limit
        .map_or(usize::MAX, |l| l as usize)
        .min(relay.config.limits.max_batch);
    // A page holds at most SYNC_PAGE_BYTES of envelopes (at least
    // one), whatever the count: large backlogs come in bounded pieces, and
    // the store reads no more than that.
    let stored = match relay
        .hub
        .store
        .read_page(credentials.channel, request.cursor, limit, SYNC_PAGE_BYTES)
        .await
    {
        Ok(stored) => stored,
        Err(e) => return store_failure(e),
    };
    let head = match relay.hub.store.head(credentials.channel).await {
        Ok(head) => head,
        Err(e) => return store_failure(e),
    };
    let more = stored.last().is_some_and(|last| last.seq < head);
    let envelopes: Vec<Delivered> = stored
        .into_iter()
        .map(|s| Delivered {
            seq: s.seq,
            envelope: s.envelope.to_vec(),
        })
        .collect();
    relay
        .metrics()
        .envelopes_out
        .fetch_add(envelopes.len() as u64, std::sync::atomic::Ordering::Relaxed);
    json(
        StatusCode::OK,
        &SyncResponse {
            acks,
            envelopes,
            head,
            more,
            retention_secs: Some(relay.config.limits.retention.as_secs()),
        },
    )
}

async fn open_slot(auth: Option<String>, body: Bytes, relay: Arc<Relay>) -> Response {
    let credentials = match authenticate(&relay, auth).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    let request: OpenSlot = match parse(&body) {
        Ok(r) => r,
        Err(response) => return response,
    };
    match relay
        .slots
        .open(credentials.channel, credentials.device, request.sid)
        .await
    {
        Ok(nameplate) => {
            tracing::info!(channel = %credentials.channel, device = %credentials.device, nameplate, "pairing opened");
            let expires_in = relay.config.limits.pairing_ttl.as_secs();
            json(
                StatusCode::CREATED,
                &SlotOpened {
                    nameplate,
                    expires_in,
                },
            )
        }
        Err(e) => refused(e),
    }
}

/// Counts an event against `limiter`; the refusal to answer if it is over.
async fn within_rate(
    limiter: &dyn super::limits::Limiter,
    relay: &Relay,
    client: std::net::IpAddr,
    limit: &str,
    message: &str,
) -> Result<(), Response> {
    match limiter.allow(client).await {
        Ok(true) => Ok(()),
        Ok(false) => {
            relay.metrics().breach(limit);
            Err(error(ErrorCode::RateLimited, message))
        }
        Err(e) => Err(refused(store_error(e))),
    }
}

async fn claim_slot(nameplate: u32, conn: ConnInfo, relay: Arc<Relay>) -> Response {
    if let Err(response) = within_rate(
        &*relay.claims,
        &relay,
        conn.client,
        "claims_per_ip",
        "too many pairing attempts from this address; wait a minute",
    )
    .await
    {
        return response;
    }
    match relay.slots.claim(nameplate).await {
        Ok(claimed) => json(
            StatusCode::OK,
            &SlotClaimed {
                sid: claimed.sid,
                claim: claimed.claim,
                expires_in: claimed.expires_in.as_secs(),
            },
        ),
        Err(e) => {
            tracing::info!(nameplate, code = e.code.as_str(), "pairing claim refused");
            refused(e)
        }
    }
}

/// Who is speaking in a mailbox request: the inviter (device credentials) or the
/// joiner (claim token).
async fn slot_auth(
    relay: &Relay,
    auth: Option<String>,
    claim: Option<String>,
) -> Result<SlotAuth, Response> {
    if let Some(claim) = claim {
        let bytes = crate::protocol::b64::decode(claim.trim())
            .map_err(|_| error(ErrorCode::Unauthorized, "malformed claim token"))?;
        let token = AccessToken::from_slice(&bytes)
            .ok_or_else(|| error(ErrorCode::Unauthorized, "malformed claim token"))?;
        return Ok(SlotAuth::Claim(token));
    }
    let credentials = authenticate(relay, auth).await?;
    Ok(SlotAuth::Device {
        channel: credentials.channel,
        device: credentials.device,
    })
}

/// The side `who` speaks for in slot `nameplate`. A claim token the slot does
/// not know, or a slot that is gone, counts against the address's claims:
/// probing nameplates with made-up claim tokens (to find the open ones, and
/// claim each as it opens) costs what claiming them does. A device learns
/// nothing to probe with (`Slots::side` answers `gone` to all but the
/// inviter), and an inviter's last request after its joiner ended the slot
/// costs nothing.
async fn side_of(
    relay: &Relay,
    client: std::net::IpAddr,
    nameplate: u32,
    who: &SlotAuth,
) -> Result<super::pairing::Side, Response> {
    match relay.slots.side(nameplate, who).await {
        Ok(side) => Ok(side),
        Err(refusal) => {
            if matches!(who, SlotAuth::Claim(_)) {
                within_rate(
                    &*relay.claims,
                    relay,
                    client,
                    "claims_per_ip",
                    "too many pairing attempts from this address; wait a minute",
                )
                .await?;
            }
            Err(refused(refusal))
        }
    }
}

async fn post_message(
    nameplate: u32,
    conn: ConnInfo,
    auth: Option<String>,
    claim: Option<String>,
    body: Bytes,
    relay: Arc<Relay>,
) -> Response {
    let who = match slot_auth(&relay, auth, claim).await {
        Ok(who) => who,
        Err(response) => return response,
    };
    let request: PairMessage = match parse(&body) {
        Ok(r) => r,
        Err(response) => return response,
    };
    let side = match side_of(&relay, conn.client, nameplate, &who).await {
        Ok(side) => side,
        Err(response) => return response,
    };
    match relay.slots.send(nameplate, side, request.message.0).await {
        Ok(()) => warp::reply::with_status(warp::reply(), StatusCode::ACCEPTED).into_response(),
        Err(e) => refused(e),
    }
}

/// Query of `GET /pair/{nameplate}/messages`.
#[derive(Debug, serde::Deserialize)]
pub struct PollQuery {
    /// First message index wanted.
    #[serde(default)]
    pub after: usize,
    /// Seconds to wait for a message (at most 25).
    #[serde(default)]
    pub wait: Option<u64>,
}

async fn poll_messages(
    nameplate: u32,
    conn: ConnInfo,
    auth: Option<String>,
    claim: Option<String>,
    query: PollQuery,
    relay: Arc<Relay>,
) -> Response {
    let who = match slot_auth(&relay, auth, claim).await {
        Ok(who) => who,
        Err(response) => return response,
    };
    let side = match side_of(&relay, conn.client, nameplate, &who).await {
        Ok(side) => side,
        Err(response) => return response,
    };
    let wait = query
        .wait
        .map_or(MAX_POLL, Duration::from_secs)
        .min(MAX_POLL);
    match relay
        .slots
        .receive(nameplate, side, query.after, wait)
        .await
    {
        Ok(received) => json(
            StatusCode::OK,
            &PairMessages {
                messages: received.messages.into_iter().map(B64).collect(),
                next: received.next,
                closed: received.closed,
            },
        ),
        Err(e) => refused(e),
    }
}

async fn end_slot(
    nameplate: u32,
    conn: ConnInfo,
    auth: Option<String>,
    claim: Option<String>,
    relay: Arc<Relay>,
) -> Response {
    let who = match slot_auth(&relay, auth, claim).await {
        Ok(who) => who,
        Err(response) => return response,
    };
    let side = match side_of(&relay, conn.client, nameplate, &who).await {
        Ok(side) => side,
        Err(response) => return response,
    };
    match relay.slots.end(nameplate, side).await {
        Ok(()) => warp::reply::with_status(warp::reply(), StatusCode::NO_CONTENT).into_response(),
        Err(e) => refused(e),
    }
}
