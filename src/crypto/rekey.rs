//! Rekey messages: how the next epoch's channel key reaches the remaining members.
//!
//! When a device is removed, a remaining member draws a fresh channel key and
//! seals it once per remaining member under their pairwise key — never under the
//! old channel key, which the removed device holds. The message:
//!
//! ```text
//! head:    version (1) | channel id (16) | new epoch (u32 BE) | from (16)
//!          | member count (u16 BE) | member ids (16 each, ascending, includes from)
//! entries: entry count (u16 BE) | per member other than `from`, ascending:
//!          recipient id (16) | nonce (24) | sealed channel key (32 + 16 tag)
//! ```
//!
//! Each entry's associated data is `LABEL_REKEY || head || recipient id`, so an
//! entry cannot be moved to another message, member list or recipient.
//!
//! Two members may rekey the same epoch at once; the keyring then combines the
//! proposals (see [`crate::channel::keyring`]), ordered by [`Rekey::precedence`].

use sha2::{Digest, Sha256};

use crate::codec::{DecodeError, Reader};
use crate::crypto::aead;
use crate::crypto::envelope::ChannelKey;
use crate::crypto::kdf::LABEL_REKEY;
use crate::crypto::pairwise::{DevicePublicKey, DeviceSecret, PairwiseError};
use crate::ids::{ChannelId, DeviceId, Epoch, ID_LEN};

/// The rekey format version.
pub const REKEY_VERSION: u8 = 1;
/// Most members a channel can have.
pub const MAX_MEMBERS: usize = 255;
/// Length of one sealed entry.
const ENTRY_LEN: usize = ID_LEN + aead::OVERHEAD + ChannelKey::LEN;
/// Largest valid rekey message.
pub const MAX_REKEY_LEN: usize =
    1 + ID_LEN + 4 + ID_LEN + 2 + MAX_MEMBERS * ID_LEN + 2 + (MAX_MEMBERS - 1) * ENTRY_LEN;

/// A parsed rekey message. Holds only public data and sealed keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rekey {
    /// Channel being rekeyed.
    pub channel: ChannelId,
    /// The epoch this key starts.
    pub epoch: Epoch,
    /// The member that drew the key and sealed the entries.
    pub from: DeviceId,
    /// Members of the new epoch, ascending; includes `from`.
    pub members: Vec<DeviceId>,
    /// One sealed key per member other than `from`, ascending by recipient.
    entries: Vec<(DeviceId, Vec<u8>)>,
}

/// Why a rekey could not be built or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RekeyError {
    /// Not shaped like a rekey message.
    #[error("malformed rekey message: {0}")]
    Malformed(#[from] DecodeError),
    /// Written by another protocol version.
    #[error("rekey version {0} is not supported (this build reads version 1); update khub")]
    UnsupportedVersion(u8),
    /// This device is not among the new epoch's members: it was removed.
    #[error("this device was removed from the channel in epoch {0}")]
    Removed(Epoch),
    /// The entry for this device did not authenticate: forged or damaged.
    #[error("the rekey entry for this device failed authentication")]
    Unauthentic,
    /// No pairwise key could be derived with the sender.
    #[error(transparent)]
    Pairwise(#[from] PairwiseError),
}

impl Rekey {
    /// Seals `key` (drawn by the caller) for each member in `members` (id and
    /// public key; must include `from`), with a fresh nonce from `rng` per entry.
    pub fn seal<R: rand::CryptoRng + ?Sized>(
        channel: ChannelId,
        epoch: Epoch,
        from: DeviceId,
        secret: &DeviceSecret,
        members: &[(DeviceId, DevicePublicKey)],
        key: &ChannelKey,
        rng: &mut R,
    ) -> Result<Self, RekeyError> {
        let mut ids: Vec<DeviceId> = members.iter().map(|(id, _)| *id).collect();
        ids.sort();
        ids.dedup();
        if ids.len() != members.len() || !ids.contains(&from) || ids.len() > MAX_MEMBERS {
            return Err(DecodeError(
                "member list must be unique, include the sender, and fit the limit",
            )
            .into());
        }
        let mut rekey = Self {
            channel,
            epoch,
            from,
            members: ids,
            entries: Vec::new(),
        };
        let head = rekey.encode_head();
        let mut recipients: Vec<&(DeviceId, DevicePublicKey)> =
            members.iter().filter(|(id, _)| *id != from).collect();
        recipients.sort_by_key(|(id, _)| *id);
        for (recipient, public) in recipients {
            let pairwise = secret.pairwise_key(&channel, &from, recipient, public)?;
            let aad = entry_aad(&head, recipient);
            let sealed = aead::seal(pairwise.expose(), &aad, key.expose(), rng);
            rekey.entries.push((*recipient, sealed));
        }
        Ok(rekey)
    }

    /// Opens the entry for `me`, which the sender (`from`, with `from_public`)
    /// sealed under our pairwise key.
    pub fn open(
        &self,
        me: &DeviceId,
        secret: &DeviceSecret,
        from_public: &DevicePublicKey,
    ) -> Result<ChannelKey, RekeyError> {
        if !self.members.contains(me) {
            return Err(RekeyError::Removed(self.epoch));
        }
        let (_, sealed) = self
            .entries
            .iter()
            .find(|(recipient, _)| recipient == me)
            .ok_or(RekeyError::Unauthentic)?;
        let pairwise = secret.pairwise_key(&self.channel, me, &self.from, from_public)?;
        let aad = entry_aad(&self.encode_head(), me);
        let key =
            aead::open(pairwise.expose(), &aad, sealed).map_err(|_| RekeyError::Unauthentic)?;
        ChannelKey::from_slice(&key).ok_or(RekeyError::Unauthentic)
    }

    /// Orders concurrent proposals for one epoch: (author id, SHA-256 of the message).
    pub fn precedence(&self) -> (DeviceId, [u8; 32]) {
        (self.from, Sha256::digest(self.encode()).into())
    }

    /// The wire form.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.encode_head();
        out.extend_from_slice(&(self.entries.len() as u16).to_be_bytes());
        for (recipient, sealed) in &self.entries {
            out.extend_from_slice(recipient.as_bytes());
            out.extend_from_slice(sealed);
        }
        out
    }

    /// Parses the wire form, checking every structural rule (sorted unique members
    /// including the sender, one entry per other member) before any crypto.
    pub fn decode(bytes: &[u8]) -> Result<Self, RekeyError> {
        if bytes.len() > MAX_REKEY_LEN {
            return Err(DecodeError("rekey message is larger than the largest valid one").into());
        }
        let mut r = Reader::new(bytes);
        let version = r.u8("version")?;
        if version != REKEY_VERSION {
            return Err(RekeyError::UnsupportedVersion(version));
        }
        let channel = ChannelId::from_bytes(r.array("channel id")?);
        let epoch = r.u32("epoch")?;
        let from = DeviceId::from_bytes(r.array("sender id")?);
        let count = usize::from(r.u16("member count")?);
        if count == 0 || count > MAX_MEMBERS {
            return Err(DecodeError("member count out of range").into());
        }
        let mut members = Vec::with_capacity(count);
        for _ in 0..count {
            members.push(DeviceId::from_bytes(r.array("member id")?));
        }
        if !members.windows(2).all(|w| w[0] < w[1]) || !members.contains(&from) {
            return Err(
                DecodeError("members must be ascending, unique and include the sender").into(),
            );
        }
        let entry_count = usize::from(r.u16("entry count")?);
        if entry_count != count - 1 {
            return Err(DecodeError("one entry per member other than the sender").into());
        }
        let mut entries = Vec::with_capacity(entry_count);
        let expected = members.iter().filter(|id| **id != from);
        for expected_recipient in expected {
            let recipient = DeviceId::from_bytes(r.array("entry recipient")?);
            if recipient != *expected_recipient {
                return Err(DecodeError("entries must follow the member order").into());
            }
            let sealed = r.take(ENTRY_LEN - ID_LEN, "sealed key")?.to_vec();
            entries.push((recipient, sealed));
        }
        r.finish("trailing bytes after the last entry")?;
        Ok(Self {
            channel,
            epoch,
            from,
            members,
            entries,
        })
    }

    fn encode_head(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + ID_LEN + 4 + ID_LEN + 2 + self.members.len() * ID_LEN);
        out.push(REKEY_VERSION);
        out.extend_from_slice(self.channel.as_bytes());
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(self.from.as_bytes());
        out.extend_from_slice(&(self.members.len() as u16).to_be_bytes());
        for member in &self.members {
            out.extend_from_slice(member.as_bytes());
        }
        out
    }
}

fn entry_aad(head: &[u8], recipient: &DeviceId) -> Vec<u8> {
    [LABEL_REKEY, head, recipient.as_bytes()].concat()
}
