//! The joiner's device info, sealed to the inviter during pairing.
//!
//! ```text
//! version (1) | device id (16) | X25519 public key (32) | name length (u8) | name | token hash (32)
//! ```
//!
//! The token hash is SHA-256 of the joiner's relay access token: the inviter
//! registers it at the relay so the relay can later recognise the new device
//! without ever seeing its token.

use sha2::{Digest, Sha256};

use crate::channel::member::Member;
use crate::codec::{DecodeError, Reader};

/// The device-info format version.
pub const DEVICE_INFO_VERSION: u8 = 1;

/// What the joiner tells the inviter about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Id, public key and name.
    pub member: Member,
    /// SHA-256 of the joiner's relay access token.
    pub token_hash: [u8; 32],
}

impl DeviceInfo {
    /// Device info for `member` with relay access token `token`; only the token's
    /// hash is kept.
    pub fn new(member: Member, token: &[u8]) -> Self {
        Self {
            member,
            token_hash: Sha256::digest(token).into(),
        }
    }

    /// The plaintext that gets sealed.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![DEVICE_INFO_VERSION];
        self.member.encode_into(&mut out);
        out.extend_from_slice(&self.token_hash);
        out
    }

    /// Parses and validates device info.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        if r.u8("device info version")? != DEVICE_INFO_VERSION {
            return Err(DecodeError("unsupported device info version; update khub"));
        }
        let member = Member::decode_from(&mut r)?;
        let token_hash = r.array("token hash")?;
        r.finish("trailing bytes after device info")?;
        Ok(Self { member, token_hash })
    }
}
