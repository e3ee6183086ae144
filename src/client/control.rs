//! What travels inside a channel's envelopes: the application's messages, and
//! the SDK's own control messages, told apart by a first byte.
//!
//! ```text
//! 0x00 || application bytes
//! 0x01 || member (id | X25519 public key | name length | name)   a device joined
//! 0x02 || rekey message (crate::crypto::rekey)                     devices were removed
//! 0x03                                                             the sender (a new device) holds the channel key
//! ```
//!
//! `0x03` is a joined device's first word in its channel: sealed under the
//! channel key the welcome carried, it proves to the inviter that the pairing
//! completed on the other side too (a relay that spoiled the last pairing
//! message cannot forge it).

use crate::channel::member::Member;
use crate::codec::{DecodeError, Reader};
use crate::crypto::rekey::Rekey;

const APP: u8 = 0x00;
const MEMBER_ADDED: u8 = 0x01;
const REKEY: u8 = 0x02;
const JOINED: u8 = 0x03;

/// The plaintext of an envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// An application message.
    App(Vec<u8>),
    /// The sender admitted a new device; all members add it.
    MemberAdded(Member),
    /// The sender removed devices; the next epoch's key for each member.
    Rekey(Rekey),
    /// The sender, just paired, holds the channel key.
    Joined,
}

impl Control {
    /// The plaintext to seal.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::App(body) => [&[APP][..], body].concat(),
            Self::MemberAdded(member) => {
                let mut out = vec![MEMBER_ADDED];
                member.encode_into(&mut out);
                out
            }
            Self::Rekey(rekey) => [vec![REKEY], rekey.encode()].concat(),
            Self::Joined => vec![JOINED],
        }
    }

    /// Parses an opened plaintext.
    pub fn decode(plaintext: &[u8]) -> Result<Self, DecodeError> {
        let (&kind, rest) = plaintext
            .split_first()
            .ok_or(DecodeError("empty message"))?;
        match kind {
            APP => Ok(Self::App(rest.to_vec())),
            MEMBER_ADDED => {
                let mut r = Reader::new(rest);
                let member = Member::decode_from(&mut r)?;
                r.finish("trailing bytes after the member")?;
                Ok(Self::MemberAdded(member))
            }
            REKEY => Rekey::decode(rest)
                .map(Self::Rekey)
                .map_err(|_| DecodeError("invalid rekey message")),
            JOINED if rest.is_empty() => Ok(Self::Joined),
            JOINED => Err(DecodeError("trailing bytes after joined")),
            _ => Err(DecodeError("unknown message kind: update khub")),
        }
    }
}
