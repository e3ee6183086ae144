//! The channel welcome: everything a new member needs, sent sealed by the
//! inviter at the end of pairing.
//!
//! ```text
//! version (1) | channel id (16) | epoch (u32 BE) | channel key (32) | inviter id (16)
//! | member count (u8, 1..=255) | members: id (16) | public key (32) | name length (u8) | name
//! ```

use zeroize::Zeroizing;

use crate::codec::{DecodeError, Reader};
use crate::crypto::envelope::ChannelKey;
use crate::crypto::rekey::MAX_MEMBERS;
use crate::ids::{ChannelId, DeviceId, Epoch};

use super::member::Member;

/// The welcome format version.
pub const WELCOME_VERSION: u8 = 1;

/// A channel's current state as handed to a new member.
#[derive(Debug, PartialEq, Eq)]
pub struct Welcome {
    /// The channel joined.
    pub channel: ChannelId,
    /// The current key epoch.
    pub epoch: Epoch,
    /// That epoch's channel key.
    pub key: ChannelKey,
    /// The member that ran the pairing (shows the code).
    pub inviter: DeviceId,
    /// All members of the epoch, the new one included.
    pub members: Vec<Member>,
}

impl Welcome {
    /// The plaintext that gets sealed. Holds the channel key, so it is wiped on drop.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(69 + self.members.len() * 113));
        out.push(WELCOME_VERSION);
        out.extend_from_slice(self.channel.as_bytes());
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(self.key.expose());
        out.extend_from_slice(self.inviter.as_bytes());
        out.push(u8::try_from(self.members.len()).expect("member count is limited to 255"));
        for member in &self.members {
            member.encode_into(&mut out);
        }
        out
    }

    /// Parses and validates a welcome: unique members, the inviter among them.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        if r.u8("welcome version")? != WELCOME_VERSION {
            return Err(DecodeError("unsupported welcome version; update khub"));
        }
        let channel = ChannelId::from_bytes(r.array("channel id")?);
        let epoch = r.u32("epoch")?;
        let key = ChannelKey::from_bytes(r.array("channel key")?);
        let inviter = DeviceId::from_bytes(r.array("inviter id")?);
        let count = usize::from(r.u8("member count")?);
        if count == 0 || count > MAX_MEMBERS {
            return Err(DecodeError("member count out of range"));
        }
        let mut members: Vec<Member> = Vec::with_capacity(count);
        for _ in 0..count {
            let member = Member::decode_from(&mut r)?;
            if members.iter().any(|m| m.id == member.id) {
                return Err(DecodeError("a member is listed twice"));
            }
            members.push(member);
        }
        r.finish("trailing bytes after the member list")?;
        if !members.iter().any(|m| m.id == inviter) {
            return Err(DecodeError("the inviter is not in the member list"));
        }
        Ok(Self {
            channel,
            epoch,
            key,
            inviter,
            members,
        })
    }
}
