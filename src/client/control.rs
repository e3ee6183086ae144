//! What travels inside a channel's MLS application messages: the
//! application's messages and the SDK's own words, told apart by a first byte.
//!
//! ```text
//! 0x00 || application bytes
//! 0x03                         the sender (a new device) took in the Welcome
//! 0x04 || notes message        notes that sync (see `khub::notes::wire`)
//! ```
//!
//! Membership changes are MLS commits, not application messages; protocol 1's
//! `0x01` (member added) and `0x02` (rekey) are gone and refused as unknown.
//! `0x03` is a joined device's first word in its channel: only a device that
//! took in the Welcome can send it, so it proves to the inviter that the
//! pairing completed on the other side too (a relay that spoiled the last
//! pairing message cannot forge it).

use crate::codec::DecodeError;

const APP: u8 = 0x00;
const JOINED: u8 = 0x03;
const NOTES: u8 = 0x04;

/// The longest application message a device sends: the most a device seals
/// ([`MAX_PLAINTEXT_LEN`](crate::crypto::envelope::MAX_PLAINTEXT_LEN), 1 MiB)
/// less the byte that says it is one.
pub const MAX_MESSAGE_LEN: usize = crate::crypto::envelope::MAX_PLAINTEXT_LEN - 1;

/// Whether an application message of `body` can be sent: refused (`Invalid`)
/// when it is longer than [`MAX_MESSAGE_LEN`]. [`Device::queue`] checks it
/// too; an app can ask before it sets anything else in motion.
///
/// [`Device::queue`]: super::Device::queue
pub fn check_message(body: &[u8]) -> Result<(), super::ClientError> {
    if body.len() > MAX_MESSAGE_LEN {
        return Err(super::ClientError::Invalid(format!(
            "this message has {} bytes, and a message may have at most {MAX_MESSAGE_LEN} (1 MiB less one byte, which says it is a message): split it",
            body.len()
        )));
    }
    Ok(())
}

/// The plaintext of an application message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// An application message.
    App(Vec<u8>),
    /// The sender, just paired, took in the Welcome.
    Joined,
    /// Notes: changes or a snapshot part.
    Notes(Vec<u8>),
}

impl Control {
    /// The plaintext to seal.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::App(body) => [&[APP][..], body].concat(),
            Self::Joined => vec![JOINED],
            Self::Notes(message) => [&[NOTES][..], message].concat(),
        }
    }

    /// Parses an opened plaintext.
    pub fn decode(plaintext: &[u8]) -> Result<Self, DecodeError> {
        let (&kind, rest) = plaintext
            .split_first()
            .ok_or(DecodeError("empty message"))?;
        match kind {
            APP => Ok(Self::App(rest.to_vec())),
            JOINED if rest.is_empty() => Ok(Self::Joined),
            JOINED => Err(DecodeError("trailing bytes after joined")),
            NOTES => Ok(Self::Notes(rest.to_vec())),
            _ => Err(DecodeError("unknown message kind: update khub")),
        }
    }
}
