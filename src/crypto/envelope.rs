//! Channel envelopes: the relay-visible routing header in front of an MLS
//! message, and the padding applied to application payloads before MLS
//! encrypts them.
//!
//! ```text
//! offset  len  field
//!      0    1  version (2)
//!      1   16  channel id
//!     17    4  epoch, u32 big-endian (the MLS epoch of the message)
//!     21   16  sender device id
//!     37    8  sender sequence number, u64 big-endian (starts at 1)
//!     45    *  MLSMessage (RFC 9420 §6), a PrivateMessage whose
//!              authenticated_data is these 45 bytes || the epoch fingerprint (16)
//! ```
//!
//! The relay orders, deduplicates and routes by the header; devices check it
//! against the MLS message it carries (see [`crate::channel`]).
//!
//! Application payloads are padded before MLS encrypts them: a 0x80 byte, then
//! zeros, up to the Padmé length (Nikitin et al., "Reducing Metadata Leakage
//! from Encrypted Files and Communication with PURBs", 2019), at least 32
//! bytes. Ciphertext lengths then reveal only a size class of a note, at most
//! 12% larger than the note itself.

use crate::ids::{ChannelId, DeviceId, Epoch, ID_LEN};

/// The envelope format version this build writes and reads (protocol 2, MLS).
pub const ENVELOPE_VERSION: u8 = 2;
/// Length of the header.
pub const HEADER_LEN: usize = 1 + ID_LEN + 4 + ID_LEN + 8;
/// Largest plaintext a device may seal. The relay may enforce a smaller limit.
pub const MAX_PLAINTEXT_LEN: usize = 1 << 20;
/// Smallest padded plaintext: short notes all look alike.
pub const MIN_PADDED_LEN: usize = 32;
/// Room for MLS's framing around a padded payload: group id, epoch, sender
/// data, authenticated data, signature, tag and length prefixes (about 260
/// bytes), or a commit's update path for a channel of up to 255 devices.
pub const MLS_OVERHEAD: usize = 32 * 1024;
/// Largest envelope that can be valid; anything longer is refused unread.
pub const MAX_ENVELOPE_LEN: usize = HEADER_LEN + MLS_OVERHEAD + padded_len(MAX_PLAINTEXT_LEN);
/// Smallest envelope that can be valid (the header and a minimal MLS message).
pub const MIN_ENVELOPE_LEN: usize = HEADER_LEN + 64;

/// Byte that ends the plaintext inside the padding.
const PAD_MARKER: u8 = 0x80;

/// The routing fields of an envelope, all authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvelopeHeader {
    /// Channel the envelope belongs to.
    pub channel: ChannelId,
    /// MLS epoch it was sealed in.
    pub epoch: Epoch,
    /// Device that sealed it.
    pub sender: DeviceId,
    /// The sender's sequence number: 1, 2, 3… for the life of the device in the
    /// channel, across epochs. The relay keeps each sender's envelopes in this
    /// order; receivers refuse replays and report gaps by it.
    pub seq: u64,
}

impl EnvelopeHeader {
    /// The 45-byte header.
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
    /// The relay uses this to route; it proves nothing until a device has
    /// checked it against the MLS message behind it.
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

/// Why an envelope header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Not shaped like an envelope.
    #[error("malformed envelope: {0}")]
    Malformed(&'static str),
    /// Written by another protocol version.
    #[error(
        "envelope version {0} is not supported (this build speaks protocol 2); the sender must update khub and pair again"
    )]
    UnsupportedVersion(u8),
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

/// `plaintext || 0x80 || 0x00…` up to [`padded_len`].
pub fn pad(plaintext: &[u8]) -> zeroize::Zeroizing<Vec<u8>> {
    let mut padded = zeroize::Zeroizing::new(Vec::with_capacity(padded_len(plaintext.len())));
    padded.extend_from_slice(plaintext);
    padded.push(PAD_MARKER);
    padded.resize(padded_len(plaintext.len()), 0);
    padded
}

/// Strips what [`pad`] added; `None` if the padding is not of that form.
pub fn unpad(padded: &[u8]) -> Option<Vec<u8>> {
    let end = padded.iter().rposition(|&b| b != 0)?;
    (padded[end] == PAD_MARKER).then(|| padded[..end].to_vec())
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
