//! Relay configuration: plain structs with documented defaults. The binary maps
//! flags and `KHUB_*` variables onto these; tests build them directly.

use std::time::Duration;

use crate::crypto::envelope::MAX_ENVELOPE_LEN;
use crate::crypto::secret::SecretBytes;
use crate::protocol::MAX_FRAME_LEN;

/// Every limit the relay enforces. Each breach gets a documented error or close
/// code and increments `khub_limit_breaches_total{limit="…"}`.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest WebSocket frame or HTTP body (`too_large`, close 1009).
    pub max_frame_bytes: usize,
    /// Largest envelope (`too_large`); never more than the largest a device
    /// opens (`MAX_ENVELOPE_LEN`, the default), whatever this says.
    pub max_envelope_bytes: usize,
    /// Open connections per client address; one more is closed at accept.
    pub max_connections_per_ip: usize,
    /// Open connections in all; the relay stops accepting at this many.
    pub max_connections: usize,
    /// Time a connection has to send a request's headers, whether it is new
    /// or idle between requests; then it is closed.
    pub header_timeout: Duration,
    /// Time a request has from its headers to the relay's answer, body
    /// included (`timeout`, HTTP 408); long-polls wait at most 25 s within it.
    pub request_timeout: Duration,
    /// Pairing claims per client address per minute (`rate_limited`).
    pub claims_per_minute: u32,
    /// Channels created per client address per hour (`rate_limited`).
    pub channels_per_hour: u32,
    /// Active devices per channel (`channel_full`).
    pub max_devices_per_channel: usize,
    /// Close a session that sends nothing, not even a pong, for this long (4004).
    pub idle_timeout: Duration,
    /// How often the relay pings an idle session.
    pub ping_interval: Duration,
    /// Time allowed for the `hello` frame (close 4002).
    pub hello_timeout: Duration,
    /// A delivery the device does not read within this is a slow reader (4008).
    pub slow_reader_timeout: Duration,
    /// Lifetime of a pairing slot.
    pub pairing_ttl: Duration,
    /// Open pairing slots across the relay (`unavailable`).
    pub max_pairing_slots: usize,
    /// Open pairing slots per device (`rate_limited`).
    pub max_slots_per_device: usize,
    /// Open pairing slots per channel (`rate_limited`).
    pub max_slots_per_channel: usize,
    /// Messages one side may post into a pairing slot (`too_large`).
    pub max_pairing_messages: usize,
    /// Bytes of envelopes stored per channel (`over_quota`).
    pub channel_quota_bytes: u64,
    /// Envelopes older than this are deleted.
    pub retention: Duration,
    /// Most envelopes returned by one `/sync` or delivered per batch.
    pub max_batch: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // An envelope as base64url plus the JSON around it.
            max_frame_bytes: MAX_FRAME_LEN,
            max_envelope_bytes: MAX_ENVELOPE_LEN,
            max_connections_per_ip: 64,
            max_connections: 20_000,
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            claims_per_minute: 10,
            channels_per_hour: 30,
            max_devices_per_channel: 32,
            idle_timeout: Duration::from_secs(75),
            ping_interval: Duration::from_secs(30),
            hello_timeout: Duration::from_secs(10),
            slow_reader_timeout: Duration::from_secs(30),
            pairing_ttl: Duration::from_secs(300),
            max_pairing_slots: 10_000,
            max_slots_per_device: crate::relay::pairing::MAX_SLOTS_PER_DEVICE,
            max_slots_per_channel: crate::relay::pairing::MAX_SLOTS_PER_CHANNEL,
            max_pairing_messages: crate::relay::pairing::MAX_MESSAGES_PER_SIDE,
            channel_quota_bytes: 256 * 1024 * 1024,
            retention: Duration::from_secs(90 * 24 * 3600),
            max_batch: 1000,
        }
    }
}

impl Limits {
    /// The pairing mailbox's bounds.
    pub fn slot_bounds(&self) -> crate::relay::pairing::SlotBounds {
        crate::relay::pairing::SlotBounds {
            total: self.max_pairing_slots,
            per_device: self.max_slots_per_device,
            per_channel: self.max_slots_per_channel,
            messages_per_side: self.max_pairing_messages,
        }
    }
}

/// The relay's configuration besides its listener and store.
#[derive(Debug, Default)]
pub struct RelayConfig {
    /// Limits and timeouts.
    pub limits: Limits,
    /// Browser origins allowed to use the relay (`/ws` and the HTTP routes,
    /// with CORS), normalised by [`edge::normalize_origin`](super::edge::normalize_origin).
    /// Requests without an `Origin` header (native clients) are always
    /// allowed; a page of any other origin is refused with 403.
    pub allowed_origins: Vec<String>,
    /// Proxies whose `Forwarded` / `X-Forwarded-For` headers name the client
    /// the per-address limits count against (see
    /// [`edge::client_ip`](super::edge::client_ip)); their own connections
    /// are not limited per address.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The header trusted proxies write the client's address into.
    pub forwarded_header: super::edge::ForwardedHeader,
    /// Bytes the store may hold in all (0: no limit): past it, publishes and
    /// new channels are refused with `storage_full` until retention frees room.
    pub max_store_bytes: u64,
    /// If set, `POST /channels` needs this secret in `X-Khub-Operator`.
    pub operator_secret: Option<SecretBytes<32>>,
    /// Whether `GET /metrics` is served on the public listener too. `khub
    /// serve` turns it on only for a loopback listener without a separate
    /// metrics listener: counts of sessions, pairings and refusals are for
    /// the operator, not for anyone who can reach the relay.
    pub public_metrics: bool,
}

impl RelayConfig {
    /// Hashes an operator secret of any length into the form the relay keeps.
    pub fn operator_secret_from(text: &str) -> SecretBytes<32> {
        use sha2::{Digest, Sha256};
        SecretBytes::new(Sha256::digest(text.as_bytes()).into())
    }
}
