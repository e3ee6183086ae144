//! The pairing messages that travel through the relay's mailbox.
//!
//! The relay forwards them unread; they are binary, and base64url inside the
//! relay's JSON frames. Every message starts with a type byte:
//!
//! ```text
//! 0x01 Start     A -> B   Ya (32)
//! 0x02 Response  B -> A   Yb (32) | Tb (64) | sealed device info (24-byte nonce, ciphertext, 16-byte tag)
//! 0x03 Finish    A -> B   Ta (64) | sealed channel welcome (same layout)
//! 0x04 Abort     either   reason (1)
//! ```

use crate::codec::{DecodeError, Reader};
use crate::crypto::aead;
use crate::crypto::cpace::{ELEMENT_LEN, TAG_LEN};

/// Largest pairing message: a Finish carrying the MLS Welcome of a full
/// channel, or a Response carrying a KeyPackage, with room to spare.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;

const TYPE_START: u8 = 0x01;
const TYPE_RESPONSE: u8 = 0x02;
const TYPE_FINISH: u8 = 0x03;
const TYPE_ABORT: u8 = 0x04;

/// Why a side stopped a pairing; sent in an Abort so both screens say the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AbortReason {
    /// Key confirmation failed: wrong code or interference.
    #[error("the code was wrong, or someone interfered")]
    ConfirmationFailed,
    /// A message could not be parsed or did not fit the protocol.
    #[error("it received an invalid pairing message")]
    InvalidMessage,
    /// The inviter could not admit the new device (for example, the channel is full).
    #[error("the new device could not be admitted to the channel")]
    Refused,
    /// The person cancelled, or the pairing timed out.
    #[error("it stopped waiting (cancelled, or out of time)")]
    Cancelled,
    /// A reason this build does not know.
    #[error("an unknown reason ({0})")]
    Unknown(u8),
}

impl AbortReason {
    fn to_byte(self) -> u8 {
        match self {
            Self::ConfirmationFailed => 1,
            Self::InvalidMessage => 2,
            Self::Refused => 3,
            Self::Cancelled => 4,
            Self::Unknown(other) => other,
        }
    }

    fn from_byte(byte: u8) -> Self {
        match byte {
            1 => Self::ConfirmationFailed,
            2 => Self::InvalidMessage,
            3 => Self::Refused,
            4 => Self::Cancelled,
            other => Self::Unknown(other),
        }
    }
}

/// A decoded pairing message. Fields borrow from the received bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// A's CPace share.
    Start {
        /// `Ya`.
        ya: &'a [u8; ELEMENT_LEN],
    },
    /// B's share, confirmation tag and sealed device info.
    Response {
        /// `Yb`.
        yb: &'a [u8; ELEMENT_LEN],
        /// `Tb`.
        tb: &'a [u8; TAG_LEN],
        /// B's device info sealed under the b2a key.
        sealed: &'a [u8],
    },
    /// A's confirmation tag and the sealed channel welcome.
    Finish {
        /// `Ta`.
        ta: &'a [u8; TAG_LEN],
        /// The welcome sealed under the a2b key.
        sealed: &'a [u8],
    },
    /// The sender stopped the pairing.
    Abort(AbortReason),
}

impl<'a> Message<'a> {
    /// The message's name, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Start { .. } => "Start",
            Self::Response { .. } => "Response",
            Self::Finish { .. } => "Finish",
            Self::Abort(_) => "Abort",
        }
    }

    /// The wire form.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Self::Start { ya } => {
                out.push(TYPE_START);
                out.extend_from_slice(&ya[..]);
            }
            Self::Response { yb, tb, sealed } => {
                out.push(TYPE_RESPONSE);
                out.extend_from_slice(&yb[..]);
                out.extend_from_slice(&tb[..]);
                out.extend_from_slice(sealed);
            }
            Self::Finish { ta, sealed } => {
                out.push(TYPE_FINISH);
                out.extend_from_slice(&ta[..]);
                out.extend_from_slice(sealed);
            }
            Self::Abort(reason) => {
                out.push(TYPE_ABORT);
                out.push(reason.to_byte());
            }
        }
        out
    }

    /// Parses a message, checking its size before anything else.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_MESSAGE_LEN {
            return Err(DecodeError(
                "pairing message is larger than the largest valid one",
            ));
        }
        let mut r = Reader::new(bytes);
        let message = match r.u8("message type")? {
            TYPE_START => {
                let ya = take_array(&mut r, "Ya")?;
                r.finish("trailing bytes after Start")?;
                Self::Start { ya }
            }
            TYPE_RESPONSE => Self::Response {
                yb: take_array(&mut r, "Yb")?,
                tb: take_array(&mut r, "Tb")?,
                sealed: sealed_rest(r)?,
            },
            TYPE_FINISH => Self::Finish {
                ta: take_array(&mut r, "Ta")?,
                sealed: sealed_rest(r)?,
            },
            TYPE_ABORT => {
                let reason = AbortReason::from_byte(r.u8("abort reason")?);
                r.finish("trailing bytes after Abort")?;
                Self::Abort(reason)
            }
            _ => return Err(DecodeError("unknown pairing message type")),
        };
        Ok(message)
    }
}

fn take_array<'a, const N: usize>(
    r: &mut Reader<'a>,
    field: &'static str,
) -> Result<&'a [u8; N], DecodeError> {
    Ok(r.take(N, field)?.try_into().expect("take returned N bytes"))
}

fn sealed_rest(mut r: Reader<'_>) -> Result<&[u8], DecodeError> {
    let rest = r.take(r.remaining(), "sealed payload")?;
    if rest.len() <= aead::OVERHEAD {
        return Err(DecodeError("sealed payload is too short"));
    }
    Ok(rest)
}
