//! Serde helpers: binary fields as unpadded base64url strings.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Deserializer, Serializer, de};

/// Encodes bytes as unpadded base64url.
pub fn encode(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes unpadded base64url (padding and the standard alphabet are refused).
pub fn decode(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    URL_SAFE_NO_PAD.decode(text)
}

/// `#[serde(with = "b64::bytes")]` for `Vec<u8>` fields.
pub mod bytes {
    use super::*;

    /// Serialises as base64url.
    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode(bytes))
    }

    /// Deserialises from base64url.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        decode(&text).map_err(|_| de::Error::custom("invalid base64url"))
    }
}

/// `#[serde(with = "b64::array32")]` for `[u8; 32]` fields (tokens, hashes).
pub mod array32 {
    use super::*;

    /// Serialises as base64url.
    pub fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode(bytes))
    }

    /// Deserialises 32 bytes from base64url.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let bytes = bytes::deserialize(d)?;
        bytes
            .try_into()
            .map_err(|_| de::Error::custom("expected 32 bytes"))
    }
}

/// `#[serde(with = "b64::array16")]` for `[u8; 16]` fields (pairing sids).
pub mod array16 {
    use super::*;

    /// Serialises as base64url.
    pub fn serialize<S: Serializer>(bytes: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode(bytes))
    }

    /// Deserialises 16 bytes from base64url.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 16], D::Error> {
        let bytes = bytes::deserialize(d)?;
        bytes
            .try_into()
            .map_err(|_| de::Error::custom("expected 16 bytes"))
    }
}
