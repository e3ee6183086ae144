//! A member of a channel as every other member knows it.

use crate::codec::{DecodeError, Reader, put_short_str};
use crate::crypto::pairwise::{DevicePublicKey, PUBLIC_KEY_LEN};
use crate::ids::{DeviceId, ID_LEN};

/// Longest device name, in UTF-8 bytes.
pub const MAX_NAME_LEN: usize = 64;

/// One device of a channel: its id, X25519 public key and human-readable name.
/// Names are private: they travel only inside sealed payloads, never to the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The device's id.
    pub id: DeviceId,
    /// Its static X25519 public key, for pairwise keys.
    pub public_key: DevicePublicKey,
    /// The name its owner gave it ("laptop", "phone").
    pub name: String,
}

/// A device name that cannot be shown safely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// Empty or only whitespace.
    #[error("a device name cannot be empty")]
    Empty,
    /// Longer than [`MAX_NAME_LEN`] bytes.
    #[error("the device name is {0} bytes long; use at most {MAX_NAME_LEN}")]
    TooLong(usize),
    /// Contains control characters (which could rewrite a terminal line).
    #[error("the device name contains control characters; use printable text")]
    ControlCharacter,
}

/// Checks a device name before it is sent or shown.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.trim().is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong(name.len()));
    }
    if name.chars().any(char::is_control) {
        return Err(NameError::ControlCharacter);
    }
    Ok(())
}

impl Member {
    /// Appends `id || public key || name length (u8) || name`.
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(&self.public_key.0);
        put_short_str(out, &self.name);
    }

    /// Reads what [`encode_into`](Self::encode_into) wrote, validating the name.
    pub(crate) fn decode_from(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let id = DeviceId::from_bytes(r.array::<ID_LEN>("member id")?);
        let public_key = DevicePublicKey(r.array::<PUBLIC_KEY_LEN>("member public key")?);
        let name = r.short_str(MAX_NAME_LEN, "member name")?;
        validate_name(name).map_err(|_| DecodeError("member name is not a valid device name"))?;
        Ok(Self {
            id,
            public_key,
            name: name.to_owned(),
        })
    }
}
