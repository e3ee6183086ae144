//! WebSocket frames: what a device sends ([`ClientFrame`]) and what the relay
//! sends ([`ServerFrame`]), as JSON text.

use serde::{Deserialize, Serialize};

use super::b64;
use super::errors::ErrorCode;
use crate::crypto::envelope::MAX_ENVELOPE_LEN;
use crate::crypto::token::AccessToken;
use crate::ids::{ChannelId, DeviceId};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 2;

/// The longest frame a conforming peer sends: a `deliver` or `publish` of the
/// largest envelope ([`MAX_ENVELOPE_LEN`]) as base64url, with room for the
/// JSON around it (1,489,640 bytes). It is the relay's default frame limit,
/// and a device refuses a longer frame from the relay: reading one would let
/// a relay make it hold any amount of memory.
pub const MAX_FRAME_LEN: usize = MAX_ENVELOPE_LEN.div_ceil(3) * 4 + 4096;

/// The highest relay sequence number (2^53 - 1, exact as a JSON number in
/// every language): a device refuses a delivery, ack or `head` past it as
/// the relay's fault. A relay numbering one envelope at a time would have to
/// store 2^53 envelopes in a channel to get there; one that jumps there is
/// lying, and taking it in would leave a device's inbox numbers nowhere to
/// go.
pub const MAX_SEQ: u64 = (1 << 53) - 1;

/// What the relay says to a client of another protocol version.
pub fn unsupported_version(v: u64) -> String {
    if v == 1 {
        "this device speaks protocol 1; update khub and pair it again (protocol 2 uses MLS)"
            .to_owned()
    } else {
        format!(
            "protocol version {v} is not supported; this relay speaks version {PROTOCOL_VERSION}"
        )
    }
}

/// A frame from a device.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// Authenticate and resume; must be the first frame.
    Hello {
        /// Protocol version; must be [`PROTOCOL_VERSION`].
        v: u32,
        /// The device's channel.
        channel: ChannelId,
        /// The device.
        device: DeviceId,
        /// The device's relay access token.
        token: AccessToken,
        /// The last relay sequence number the device has (0: none).
        cursor: u64,
    },
    /// Store and fan out an envelope the device sealed.
    Publish {
        /// The sealed envelope.
        #[serde(with = "b64::bytes")]
        envelope: Vec<u8>,
    },
}

/// A frame from the relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// Hello accepted; deliveries follow.
    Ready {
        /// Protocol version.
        v: u32,
        /// The channel's newest sequence number.
        head: u64,
        /// Seconds between the relay's pings to a quiet session: a device
        /// that hears nothing for several of them treats the connection as
        /// dead and reconnects.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ping_secs: Option<u64>,
        /// How long the relay keeps an envelope, in seconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retention_secs: Option<u64>,
        /// Present when retention deleted what followed the device's
        /// cursor: nothing after the cursor up to this number will be
        /// delivered. khub's relay sends it as the `head`, when nothing
        /// after the cursor up to the head is stored any more, so that the
        /// device need not wait for deliveries that will not come.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pruned_to: Option<u64>,
    },
    /// An envelope, in channel order.
    Deliver {
        /// Its relay sequence number in the channel.
        seq: u64,
        /// The envelope.
        #[serde(with = "b64::bytes")]
        envelope: Vec<u8>,
    },
    /// A publish is durably stored.
    Ack {
        /// The envelope's sender sequence number (from its header).
        sender_seq: u64,
        /// Its relay sequence number.
        seq: u64,
        /// It had been stored before (a retried publish).
        duplicate: bool,
    },
    /// A request was refused.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// For people (read as [`super::errors::for_people`] makes it).
        #[serde(deserialize_with = "super::errors::for_people")]
        message: String,
        /// Whether the session ends (a close frame follows).
        fatal: bool,
        /// For a refused publish: the envelope's sender sequence number, when
        /// its header could be read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sender_seq: Option<u64>,
    },
}

impl ServerFrame {
    /// The JSON text of the frame.
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("server frames always serialise")
    }

    /// Decodes a frame from the relay. `Ok(None)` is a frame whose `type`
    /// this build does not know: a device ignores it (a relay of this
    /// protocol version may add kinds of frames that need no answer; what a
    /// device must understand comes with a new version). A frame of a known
    /// type that does not decode is an error.
    pub fn decode(text: &str) -> Result<Option<Self>, serde_json::Error> {
        /// Just the `type` of a frame.
        #[derive(Deserialize)]
        struct Kind<'a> {
            #[serde(rename = "type", borrow)]
            kind: std::borrow::Cow<'a, str>,
        }
        match serde_json::from_str(text) {
            Ok(frame) => Ok(Some(frame)),
            Err(error) => match serde_json::from_str::<Kind>(text) {
                Ok(Kind { kind }) if !Self::TYPES.contains(&kind.as_ref()) => Ok(None),
                _ => Err(error),
            },
        }
    }

    /// The `type`s of the frames a relay of this version sends.
    pub const TYPES: [&'static str; 4] = ["ready", "deliver", "ack", "error"];

    /// An error frame for `code`; fatal if the code ends sessions.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Error {
            code,
            message: message.into(),
            fatal: code.close_code().is_some(),
            sender_seq: None,
        }
    }
}

/// A frame that could not be decoded: the refusal to report (its message
/// never echoes frame contents).
pub type FrameError = super::errors::Refusal;

impl ClientFrame {
    /// Decodes a text frame of at most `max_len` bytes, classifying failures.
    pub fn decode(text: &str, max_len: usize) -> Result<Self, FrameError> {
        if text.len() > max_len {
            return Err(FrameError::new(
                ErrorCode::TooLarge,
                format!(
                    "frame of {} bytes exceeds the {max_len}-byte limit",
                    text.len()
                ),
            ));
        }
        serde_json::from_str(text).map_err(|e| classify(text, &e))
    }

    /// The JSON text of the frame.
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("client frames always serialise")
    }
}

/// Works out why a frame failed to decode. Runs only on the error path.
fn classify(text: &str, error: &serde_json::Error) -> FrameError {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
        return FrameError::new(ErrorCode::Malformed, "the frame is not valid JSON");
    };
    let Some(kind) = value.get("type").and_then(|t| t.as_str()) else {
        return FrameError::new(
            ErrorCode::Malformed,
            "the frame has no string \"type\" field",
        );
    };
    if !matches!(kind, "hello" | "publish") {
        return FrameError::new(
            ErrorCode::UnknownType,
            "unknown frame type (expected hello or publish)",
        );
    }
    if kind == "hello"
        && let Some(v) = value.get("v").and_then(|v| v.as_u64())
        && v != u64::from(PROTOCOL_VERSION)
    {
        return FrameError::new(ErrorCode::UnsupportedVersion, unsupported_version(v));
    }
    let detail = error.to_string();
    if detail.contains("base64") || detail.contains("expected 32 bytes") || detail.contains("id ") {
        return FrameError::new(
            ErrorCode::InvalidBase64,
            format!("a binary field is invalid in {kind}"),
        );
    }
    // serde's messages can quote the offending value (which may be a token put
    // in the wrong field): keep only "missing field `x`" / "unknown field `x`".
    let field = ["missing field `", "unknown field `"]
        .iter()
        .find_map(|prefix| {
            let rest = detail.strip_prefix(prefix)?;
            Some(format!("{prefix}{}`", rest.split('`').next().unwrap_or("")))
        });
    let detail = field.unwrap_or_else(|| "a field has the wrong type or value".to_owned());
    FrameError::new(
        ErrorCode::Malformed,
        format!("invalid {kind} frame: {detail}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_passes_over_unknown_types_only() {
        let ack = r#"{"type":"ack","sender_seq":5,"seq":19,"duplicate":false}"#;
        assert!(matches!(
            ServerFrame::decode(ack),
            Ok(Some(ServerFrame::Ack { seq: 19, .. }))
        ));
        // A known frame with a field a later relay added.
        let more = r#"{"type":"ack","sender_seq":5,"seq":19,"duplicate":false,"at":1}"#;
        assert!(matches!(ServerFrame::decode(more), Ok(Some(_))));
        assert!(matches!(
            ServerFrame::decode(r#"{"type":"notice"}"#),
            Ok(None)
        ));
        for broken in [
            r#"{"type":"ack","seq":"19"}"#,
            r#"{"type":"deliv\u0065r"}"#,
            r#"{"type":7}"#,
            r#"{"seq":1}"#,
            "not json",
        ] {
            assert!(ServerFrame::decode(broken).is_err(), "{broken}");
        }
    }
}
