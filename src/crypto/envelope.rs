//! Sealed envelopes: the only thing devices publish through the relay.
//!
//! ```text
//! offset  len  field
//!      0    1  version (1)
//!      1   16  channel id
//!     17    4  epoch, u32 big-endian
//!     21   16  sender device id
//!     37    8  sender sequence number, u64 big-endian (starts at 1)
//!     45   24  XChaCha20-Poly1305 nonce, random
//!     69    *  ciphertext of the padded plaintext, then the 16-byte tag
//! ```
//!
//! The first 45 bytes (the header) are the AEAD's associated data, so the relay
//! can route by them but changing any of them makes the envelope fail to open.
//! The key is per sender and per epoch: `HKDF-SHA256(salt = channel id, IKM =
//! channel key of the epoch, info = LABEL_SENDER_KEY || epoch || sender id)`.
//!
//! Plaintext is padded before sealing: a 0x80 byte, then zeros, up to the Padmé
//! length (Nikitin et al., "Reducing Metadata Leakage from Encrypted Files and
//! Communication with PURBs", 2019), at least 32 bytes. Ciphertext lengths then
//! reveal only a size class of a note, at most 12% larger than the note itself.

use crate::crypto::aead;
use crate::crypto::kdf::{LABEL_SENDER_KEY, hkdf_sha256};
use crate::crypto::secret::{random_array, secret_type};
use crate::ids::{ChannelId, DeviceId, Epoch, ID_LEN};

/// The envelope format version this build writes and reads.
pub const ENVELOPE_VERSION: u8 = 1;
/// Length of the header (the associated data).
pub const HEADER_LEN: usize = 1 + ID_LEN + 4 + ID_LEN + 8;
/// Largest plaintext a device may seal. The relay may enforce a smaller limit.
pub const MAX_PLAINTEXT_LEN: usize = 1 << 20;
/// Smallest padded plaintext: short notes all look alike.
pub const MIN_PADDED_LEN: usize = 32;
/// Largest envelope that can be valid; anything longer is refused unread.
pub const MAX_ENVELOPE_LEN: usize = HEADER_LEN + aead::OVERHEAD + padded_len(MAX_PLAINTEXT_LEN);
/// Smallest envelope that can be valid.
pub const MIN_ENVELOPE_LEN: usize = HEADER_LEN + aead::OVERHEAD + MIN_PADDED_LEN;

/// Byte that ends the plaintext inside the padding.
const PAD_MARKER: u8 = 0x80;

secret_type!(
    /// A channel key: 32 random bytes shared by the members of one epoch.
    ChannelKey,
    32
);

secret_type!(
    /// The key one sender seals with in one epoch, derived from the channel key.
    SenderKey,
    32
);

impl ChannelKey {
    /// A fresh channel key from `rng` (the OS CSPRNG outside tests).
    pub fn generate<R: rand::CryptoRng + ?Sized>(rng: &mut R) -> Self {
        Self::from_bytes(random_array(rng))
    }

    /// The key `sender` seals with in `epoch` of `channel`.
    pub fn sender_key(&self, channel: &ChannelId, epoch: Epoch, sender: &DeviceId) -> SenderKey {
        SenderKey::from_bytes(hkdf_sha256(
            channel.as_bytes(),
            self.expose(),
            &[LABEL_SENDER_KEY, &epoch.to_be_bytes(), sender.as_bytes()],
        ))
    }
}

/// The routing fields of an envelope, all authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvelopeHeader {
    /// Channel the envelope belongs to.
    pub channel: ChannelId,
    /// Key epoch it was sealed under.
    pub epoch: Epoch,
    /// Device that sealed it.
    pub sender: DeviceId,
    /// The sender's sequence number: 1, 2, 3… for the life of the device in the
    /// channel, across epochs. Receivers use it to reject replays and see gaps.
    pub seq: u64,
}

impl EnvelopeHeader {
    /// The 45-byte header, which is also the AEAD associated data.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0] = ENVELOPE_VERSION;
        out[1..17].copy_from_slice(self.channel.as_bytes());
        out[17..21].copy_from_slice(&self.epoch.to_be_bytes());
        out[21..37].copy_from_slice(self.sender.as_bytes());
        out[37..45].copy_from_slice(&self.seq.to_be_bytes());
        out
    }

    /// Reads the header of an envelope, checking its version and overall length.
    /// The relay uses this to route; it proves nothing until [`open`] succeeds.
    pub fn decode(envelope: &[u8]) -> Result<Self, OpenError> {
        let version = *envelope
            .first()
            .ok_or(OpenError::Malformed("empty envelope"))?;
        if version != ENVELOPE_VERSION {
            return Err(OpenError::UnsupportedVersion(version));
        }
        if envelope.len() < MIN_ENVELOPE_LEN {
            return Err(OpenError::Malformed("shorter than the smallest envelope"));
        }
        if envelope.len() > MAX_ENVELOPE_LEN {
            return Err(OpenError::Malformed("longer than the largest envelope"));
        }
        let id = |at: usize| {
            let bytes: [u8; ID_LEN] = envelope[at..at + ID_LEN]
                .try_into()
                .expect("length checked");
            bytes
        };
        let seq = u64::from_be_bytes(envelope[37..45].try_into().expect("length checked"));
        if seq == 0 {
            return Err(OpenError::Malformed("sequence numbers start at 1"));
        }
        Ok(Self {
            channel: ChannelId::from_bytes(id(1)),
            epoch: Epoch::from_be_bytes(envelope[17..21].try_into().expect("length checked")),
            sender: DeviceId::from_bytes(id(21)),
            seq,
        })
    }
}

/// Why an envelope was refused. Authentication failures carry no detail on
/// purpose: which byte was wrong is of use only to an attacker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Not shaped like an envelope.
    #[error("malformed envelope: {0}")]
    Malformed(&'static str),
    /// Written by a newer or older protocol version.
    #[error("envelope version {0} is not supported (this build reads version 1); update khub")]
    UnsupportedVersion(u8),
    /// Sealed for a different channel.
    #[error("envelope belongs to another channel")]
    WrongChannel,
    /// This device holds no key for the epoch (not yet received, or removed).
    #[error("no channel key for epoch {0}: this device was not given that key")]
    UnknownEpoch(Epoch),
    /// The sender is not a member of the channel in that epoch.
    #[error("sender {0} is not a member of the channel in this epoch")]
    UnknownSender(DeviceId),
    /// The same (sender, seq) was already opened.
    #[error("replayed envelope: sender {sender} seq {seq} was already received")]
    Replay {
        /// Claimed sender.
        sender: DeviceId,
        /// Claimed sequence number.
        seq: u64,
    },
    /// Never received, but older than an envelope of its sender that was:
    /// delivered out of the order it was sent in.
    #[error("reordered envelope: sender {sender} seq {seq} arrived after a later one")]
    Reordered {
        /// Claimed sender.
        sender: DeviceId,
        /// Claimed sequence number.
        seq: u64,
    },
    /// So far behind the newest envelope of its sender that replay cannot be ruled out.
    #[error("envelope from {sender} seq {seq} is older than the replay window")]
    TooOld {
        /// Claimed sender.
        sender: DeviceId,
        /// Claimed sequence number.
        seq: u64,
    },
    /// Authentication failed: tampered, truncated, or sealed under another key.
    #[error("envelope failed authentication")]
    Decrypt,
}

/// Why a plaintext could not be sealed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// Larger than [`MAX_PLAINTEXT_LEN`].
    #[error("message of {len} bytes is larger than the {max}-byte limit; split it")]
    TooLarge {
        /// Offered length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Sequence number 0 is reserved (numbers start at 1).
    #[error("sequence numbers start at 1")]
    ZeroSeq,
    /// The device holds no key for that epoch.
    #[error("this device holds no key for epoch {0}")]
    UnknownEpoch(crate::ids::Epoch),
}

/// Padmé length for a plaintext of `len` bytes plus the marker byte: at most 12%
/// overhead, and only O(log log n) bits of the length remain visible.
pub const fn padded_len(len: usize) -> usize {
    let with_marker = len + 1;
    if with_marker <= MIN_PADDED_LEN {
        return MIN_PADDED_LEN;
    }
    let e = (usize::BITS - 1 - with_marker.leading_zeros()) as usize;
    let s = (usize::BITS - 1 - e.leading_zeros()) as usize + 1;
    let mask = (1usize << (e - s)) - 1;
    (with_marker + mask) & !mask
}

/// Seals `plaintext` under `key` with a fresh random nonce from `rng`.
pub fn seal<R: rand::CryptoRng + ?Sized>(
    key: &SenderKey,
    header: &EnvelopeHeader,
    plaintext: &[u8],
    rng: &mut R,
) -> Result<Vec<u8>, SealError> {
    if plaintext.len() > MAX_PLAINTEXT_LEN {
        return Err(SealError::TooLarge {
            len: plaintext.len(),
            max: MAX_PLAINTEXT_LEN,
        });
    }
    if header.seq == 0 {
        return Err(SealError::ZeroSeq);
    }
    let header = header.encode();
    let mut padded = zeroize::Zeroizing::new(Vec::with_capacity(padded_len(plaintext.len())));
    padded.extend_from_slice(plaintext);
    padded.push(PAD_MARKER);
    padded.resize(padded_len(plaintext.len()), 0);

    let mut envelope = Vec::with_capacity(HEADER_LEN + aead::OVERHEAD + padded.len());
    envelope.extend_from_slice(&header);
    envelope.extend_from_slice(&aead::seal(key.expose(), &header, &padded, rng));
    Ok(envelope)
}

/// Opens an envelope whose key was chosen from its header (read with
/// [`EnvelopeHeader::decode`]). Checks the tag over header, nonce and ciphertext,
/// then strips the padding.
pub fn open(key: &SenderKey, envelope: &[u8]) -> Result<Vec<u8>, OpenError> {
    EnvelopeHeader::decode(envelope)?;
    let (header, sealed) = envelope.split_at(HEADER_LEN);
    let mut padded = aead::open(key.expose(), header, sealed).map_err(|_| OpenError::Decrypt)?;
    // Authenticated, so the padding was written by a key holder; a bad one still
    // gets the same opaque error.
    let end = padded
        .iter()
        .rposition(|&b| b != 0)
        .ok_or(OpenError::Decrypt)?;
    if padded[end] != PAD_MARKER {
        return Err(OpenError::Decrypt);
    }
    padded.truncate(end);
    Ok(std::mem::take(&mut *padded))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padme_lengths_are_bounded_and_monotonic() {
        assert_eq!(padded_len(0), MIN_PADDED_LEN);
        assert_eq!(padded_len(31), MIN_PADDED_LEN);
        assert_eq!(padded_len(32), 36);
        let mut previous = 0;
        for len in (0..70_000).step_by(7) {
            let padded = padded_len(len);
            assert!(padded > len, "room for the marker at {len}");
            assert!(padded >= previous, "monotonic at {len}");
            assert!(
                padded <= (len + 1).max(MIN_PADDED_LEN) * 112 / 100 + 1,
                "overhead at {len}"
            );
            previous = padded;
        }
    }
}
