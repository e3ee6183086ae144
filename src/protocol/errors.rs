//! Error codes and WebSocket close codes: stable names a client can match on.

use serde::{Deserialize, Serialize};

/// A refusal: an error code and a message for people. The relay's one shape
/// for "code plus message" — inside the relay, in HTTP error bodies
/// (`{"error": Refusal}`), in `/sync` acks and in WebSocket `error` frames —
/// and what the SDK reports as `ClientError::Relay`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} ({code})")]
pub struct Refusal {
    /// Stable code, for programs.
    pub code: ErrorCode,
    /// What happened and what to do, for people. Read as [`for_people`]
    /// makes it: the other side wrote it.
    #[serde(deserialize_with = "for_people")]
    pub message: String,
}

/// The most characters of a message from the other side that are kept.
pub const MAX_MESSAGE_CHARS: usize = 500;

/// A message the other side wrote, made safe to store, log and print: at
/// most [`MAX_MESSAGE_CHARS`] characters (an ellipsis marks a cut), each
/// control character (an escape sequence for a terminal, a line break
/// that would forge a log line) shown as `\u{…}`.
pub fn for_people<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let text = std::borrow::Cow::<str>::deserialize(d)?;
    let mut kept = String::with_capacity(text.len().min(MAX_MESSAGE_CHARS * 4));
    for (n, c) in text.chars().enumerate() {
        if n == MAX_MESSAGE_CHARS {
            kept.push('…');
            break;
        }
        if c.is_control() {
            kept.extend(c.escape_unicode());
        } else {
            kept.push(c);
        }
    }
    Ok(kept)
}

impl Refusal {
    /// A refusal with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Every error the relay reports, in WebSocket `error` frames and HTTP bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// Not valid JSON, or a required field is missing or mistyped.
    Malformed,
    /// A frame `type` the relay does not know.
    UnknownType,
    /// A protocol version the relay does not speak.
    UnsupportedVersion,
    /// A frame, body or envelope over its size limit.
    TooLarge,
    /// A binary field that is not unpadded base64url, or has the wrong length.
    InvalidBase64,
    /// Unknown channel or device, or a wrong token.
    Unauthorized,
    /// The device's own (correct) token, but the device was removed from the
    /// channel. Told only to the holder of the token.
    Revoked,
    /// The request (its body, say) did not arrive within the relay's deadline.
    Timeout,
    /// The operator secret is required and was missing or wrong.
    Forbidden,
    /// An envelope whose header names another sender than the session's device.
    ForbiddenSender,
    /// An envelope whose header names another channel than the session's.
    WrongChannel,
    /// Not an envelope: bad version, length or sequence number.
    InvalidEnvelope,
    /// The (sender, sender_seq) was already stored with different bytes.
    Conflict,
    /// A sender sequence number at or below the highest of the same sender
    /// already stored, and not stored itself (never, or pruned since):
    /// storing it would reorder or replay the sender's messages.
    OutOfOrder,
    /// The channel's byte quota is used up.
    OverQuota,
    /// The relay's storage budget is used up (all channels together).
    StorageFull,
    /// Too many requests from this address; retry later.
    RateLimited,
    /// The channel already has the maximum number of devices.
    ChannelFull,
    /// A channel or device with that id already exists.
    Exists,
    /// No such channel, device or pairing slot.
    NotFound,
    /// The pairing slot was already claimed by another device.
    AlreadyClaimed,
    /// The pairing slot ended (completed, aborted or expired).
    Gone,
    /// No free pairing nameplate; retry later.
    Unavailable,
    /// The request does not make sense (for example, removing an unknown device).
    BadRequest,
    /// A failure inside the relay.
    Internal,
    /// A code this build does not know (a newer relay's): read as a refusal
    /// of that one request, worth retrying later. Never sent.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The HTTP status for this error.
    pub fn status(self) -> u16 {
        match self {
            Self::Malformed
            | Self::UnknownType
            | Self::UnsupportedVersion
            | Self::InvalidBase64
            | Self::InvalidEnvelope
            | Self::BadRequest
            | Self::WrongChannel => 400,
            Self::Unauthorized => 401,
            Self::Forbidden | Self::ForbiddenSender | Self::Revoked => 403,
            Self::NotFound => 404,
            Self::Conflict
            | Self::OutOfOrder
            | Self::Exists
            | Self::AlreadyClaimed
            | Self::ChannelFull => 409,
            Self::Gone => 410,
            Self::Timeout => 408,
            Self::TooLarge => 413,
            Self::OverQuota | Self::StorageFull => 507,
            Self::RateLimited => 429,
            Self::Unavailable => 503,
            Self::Internal | Self::Unknown => 500,
        }
    }

    /// Whether a refusal of a `publish` with this code is not final: the
    /// device keeps the envelope (and its later ones) queued and sends them
    /// again later, in order. The quota, the storage budget, a relay that
    /// could not store it right now, and codes this device does not know.
    pub fn keeps_envelope(self) -> bool {
        matches!(
            self,
            Self::OverQuota
                | Self::StorageFull
                | Self::Internal
                | Self::Unavailable
                | Self::Timeout
                | Self::Unknown
        )
    }

    /// Whether this error ends a WebSocket session, and with which close code.
    pub fn close_code(self) -> Option<CloseCode> {
        match self {
            Self::Malformed
            | Self::UnknownType
            | Self::UnsupportedVersion
            | Self::InvalidBase64 => Some(CloseCode::Protocol),
            Self::Unauthorized => Some(CloseCode::Unauthorized),
            Self::Revoked => Some(CloseCode::Revoked),
            Self::TooLarge => Some(CloseCode::TooLarge),
            Self::Internal => Some(CloseCode::Internal),
            _ => None,
        }
    }

    /// The snake_case name, as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnknownType => "unknown_type",
            Self::UnsupportedVersion => "unsupported_version",
            Self::TooLarge => "too_large",
            Self::InvalidBase64 => "invalid_base64",
            Self::Unauthorized => "unauthorized",
            Self::Revoked => "revoked",
            Self::Timeout => "timeout",
            Self::Forbidden => "forbidden",
            Self::ForbiddenSender => "forbidden_sender",
            Self::WrongChannel => "wrong_channel",
            Self::InvalidEnvelope => "invalid_envelope",
            Self::Conflict => "conflict",
            Self::OutOfOrder => "out_of_order",
            Self::OverQuota => "over_quota",
            Self::StorageFull => "storage_full",
            Self::RateLimited => "rate_limited",
            Self::ChannelFull => "channel_full",
            Self::Exists => "exists",
            Self::NotFound => "not_found",
            Self::AlreadyClaimed => "already_claimed",
            Self::Gone => "gone",
            Self::Unavailable => "unavailable",
            Self::BadRequest => "bad_request",
            Self::Internal => "internal",
            Self::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// WebSocket close codes the relay sends (see the module docs of [`crate::protocol`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseCode {
    /// 1000: normal closure.
    Normal,
    /// 1001: the relay is shutting down.
    GoingAway,
    /// 1009: a frame exceeded the limit.
    TooLarge,
    /// 1011: relay failure.
    Internal,
    /// 4001: authentication failed.
    Unauthorized,
    /// 4002: protocol violation.
    Protocol,
    /// 4003: the device was removed from its channel.
    Revoked,
    /// 4004: idle timeout.
    Idle,
    /// 4008: the device did not read its deliveries in time.
    Slow,
}

impl CloseCode {
    /// Every close code khub's relay sends.
    pub const ALL: [Self; 9] = [
        Self::Normal,
        Self::GoingAway,
        Self::TooLarge,
        Self::Internal,
        Self::Unauthorized,
        Self::Protocol,
        Self::Revoked,
        Self::Idle,
        Self::Slow,
    ];

    /// The close code numbered `code`, if khub knows it.
    pub fn from_code(code: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }

    /// The numeric code.
    pub fn code(self) -> u16 {
        match self {
            Self::Normal => 1000,
            Self::GoingAway => 1001,
            Self::TooLarge => 1009,
            Self::Internal => 1011,
            Self::Unauthorized => 4001,
            Self::Protocol => 4002,
            Self::Revoked => 4003,
            Self::Idle => 4004,
            Self::Slow => 4008,
        }
    }

    /// The short reason sent with the close frame.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::GoingAway => "relay shutting down",
            Self::TooLarge => "frame too large",
            Self::Internal => "internal error",
            Self::Unauthorized => "unauthorized",
            Self::Protocol => "protocol error",
            Self::Revoked => "device removed from channel",
            Self::Idle => "idle timeout",
            Self::Slow => "reader too slow",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(message: &str) -> String {
        let json = serde_json::json!({"code": "conflict", "message": message});
        serde_json::from_value::<Refusal>(json).unwrap().message
    }

    #[test]
    fn every_close_code_is_found_by_its_number_and_no_other() {
        for code in CloseCode::ALL {
            assert_eq!(CloseCode::from_code(code.code()), Some(code));
        }
        assert_eq!(CloseCode::from_code(1002), None);
        assert_eq!(CloseCode::from_code(4999), None);
    }

    #[test]
    fn a_message_from_the_other_side_is_cut_and_its_control_characters_shown() {
        assert_eq!(read("stored before"), "stored before");
        assert_eq!(
            read("red\u{1b}[31m\nWARN forged line"),
            "red\\u{1b}[31m\\u{a}WARN forged line"
        );
        let long = read(&"é".repeat(10_000));
        assert_eq!(long.chars().count(), MAX_MESSAGE_CHARS + 1);
        assert!(long.ends_with("é…"));
    }
}
