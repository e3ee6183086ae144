//! HTTP request and response bodies, and the credentials header.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::b64;
use super::errors::{ErrorCode, Refusal};
use crate::crypto::token::{AccessToken, TokenHash};
use crate::ids::{ChannelId, DeviceId};

/// Header carrying the joiner's claim token in the pairing mailbox.
pub const CLAIM_HEADER: &str = "x-khub-claim";
/// Header carrying the operator secret for creating channels.
pub const OPERATOR_HEADER: &str = "x-khub-operator";

/// The most envelope bytes a `/sync` answer carries (4 MiB), besides its
/// count limit: the relay stops adding envelopes before the next would pass
/// it, except the first, which goes in whatever its size.
pub const SYNC_PAGE_BYTES: usize = 4 * 1024 * 1024;

/// The longest answer a device reads from a relay (16 MiB). The longest a
/// conforming relay sends is a `/sync` answer: [`SYNC_PAGE_BYTES`] of
/// envelopes as base64url with the JSON around each, and the acks of one
/// request's publishes (khub's SDK publishes at most 768 KiB of envelopes per
/// request): under 9 MiB. A khub device stops reading a longer
/// answer and fails the request, so that neither a relay nor whatever else
/// answers at its address can make it hold more.
pub const MAX_ANSWER_LEN: usize = 16 * 1024 * 1024;

/// The most envelopes one `/sync` request publishes, and so the most acks
/// its answer holds. khub's SDK publishes at most 768 KiB of envelopes per
/// request, under 7,300 of the smallest.
pub const MAX_PUBLISH_PER_SYNC: usize = 10_000;

/// The most messages one `GET /pair/{nameplate}/messages` answer holds (a
/// side posts at most 4).
pub const MAX_PAIR_MESSAGES: usize = 16;

fn publishes<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    super::bounded::at_most(d, MAX_PUBLISH_PER_SYNC)
}

fn pair_messages<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<B64>, D::Error> {
    super::bounded::at_most(d, MAX_PAIR_MESSAGES)
}

/// Bytes that travel as one base64url string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct B64(#[serde(with = "b64::bytes")] pub Vec<u8>);

/// A device's credentials: channel, device and relay access token.
#[derive(Debug, PartialEq, Eq)]
pub struct Credentials {
    /// The device's channel.
    pub channel: ChannelId,
    /// The device.
    pub device: DeviceId,
    /// Its relay access token.
    pub token: AccessToken,
}

impl Credentials {
    /// The `Authorization` header value: `Bearer <channel>.<device>.<token>`.
    pub fn to_header(&self) -> Zeroizing<String> {
        Zeroizing::new(format!(
            "Bearer {}.{}.{}",
            self.channel,
            self.device,
            b64::encode(self.token.expose())
        ))
    }

    /// Parses an `Authorization` header value.
    pub fn from_header(value: &str) -> Result<Self, ErrorCode> {
        let rest = value
            .strip_prefix("Bearer ")
            .ok_or(ErrorCode::Unauthorized)?;
        let mut parts = rest.trim().split('.');
        let (Some(channel), Some(device), Some(token), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(ErrorCode::Unauthorized);
        };
        let token = Zeroizing::new(b64::decode(token).map_err(|_| ErrorCode::Unauthorized)?);
        Ok(Self {
            channel: channel.parse().map_err(|_| ErrorCode::Unauthorized)?,
            device: device.parse().map_err(|_| ErrorCode::Unauthorized)?,
            token: AccessToken::from_slice(&token).ok_or(ErrorCode::Unauthorized)?,
        })
    }
}

/// `{"error":{"code":…,"message":…}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// The error.
    pub error: Refusal,
}

/// `POST /channels`: create a channel with its first device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateChannel {
    /// The new channel's id (random, drawn by the device).
    pub channel: ChannelId,
    /// The first device.
    pub device: DeviceId,
    /// SHA-256 of that device's access token.
    pub token_hash: TokenHash,
}

/// Answer to [`CreateChannel`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelCreated {
    /// The channel.
    pub channel: ChannelId,
}

/// `POST /channels/{channel}/devices`: a member admits a newly paired device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmitDevice {
    /// The new device.
    pub device: DeviceId,
    /// SHA-256 of its access token (from its sealed device info).
    pub token_hash: TokenHash,
}

/// The channel's active devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceList {
    /// Active (not removed) devices, in the order they joined.
    pub devices: Vec<DeviceId>,
}

/// `POST /sync`: publish pending envelopes, fetch everything after a cursor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncRequest {
    /// Last relay sequence number the device has.
    pub cursor: u64,
    /// Envelopes to publish first, in order: at most
    /// [`MAX_PUBLISH_PER_SYNC`].
    #[serde(default, deserialize_with = "publishes")]
    pub publish: Vec<B64>,
    /// Most envelopes to return (the relay caps it).
    #[serde(default)]
    pub limit: Option<u32>,
}

/// Answer to [`SyncRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncResponse {
    /// One per published envelope, in order.
    #[serde(deserialize_with = "publishes")]
    pub acks: Vec<SyncAck>,
    /// Envelopes after the cursor, in order.
    pub envelopes: Vec<Delivered>,
    /// The channel's newest sequence number.
    pub head: u64,
    /// More envelopes remain after the last one returned.
    pub more: bool,
    /// How long the relay keeps an envelope, in seconds: devices publish a
    /// snapshot of their notes before changes no snapshot covers expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_secs: Option<u64>,
}

/// The outcome of one published envelope in a sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncAck {
    /// Stored: its relay sequence number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Stored before (a retry).
    #[serde(default)]
    pub duplicate: bool,
    /// Refused: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Refusal>,
}

/// A stored envelope with its relay sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivered {
    /// Relay sequence number.
    pub seq: u64,
    /// The envelope.
    #[serde(with = "b64::bytes")]
    pub envelope: Vec<u8>,
}

/// `POST /pair`: the inviter opens a pairing slot. Its first pairing message
/// (Start) depends on the nameplate, so it follows as an ordinary message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenSlot {
    /// The pairing session id the inviter drew.
    #[serde(with = "b64::array")]
    pub sid: [u8; 16],
}

/// Answer to [`OpenSlot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotOpened {
    /// The nameplate to show in the code.
    pub nameplate: u32,
    /// Seconds until the slot expires.
    pub expires_in: u64,
}

/// `POST /pair/{nameplate}/claim` answer: what the joiner needs.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotClaimed {
    /// The pairing session id.
    #[serde(with = "b64::array")]
    pub sid: [u8; 16],
    /// The joiner's token for the rest of this pairing (`X-Khub-Claim` header).
    pub claim: AccessToken,
    /// Seconds until the slot expires.
    pub expires_in: u64,
}

/// `POST /pair/{nameplate}/messages`: one pairing message for the other side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairMessage {
    /// The opaque pairing message.
    pub message: B64,
}

/// `GET /pair/{nameplate}/messages?after=N` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairMessages {
    /// Messages from the other side with index ≥ `after`, in order: at
    /// most [`MAX_PAIR_MESSAGES`].
    #[serde(deserialize_with = "pair_messages")]
    pub messages: Vec<B64>,
    /// The index to ask `after` next time.
    pub next: usize,
    /// The other side ended the slot: no more messages will come.
    pub closed: bool,
}
