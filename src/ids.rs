//! Public routing identifiers: channels, devices and key epochs.
//!
//! Ids are random 16-byte strings drawn by the device that creates them. They are
//! public (the relay routes by them) and carry no meaning; their text form is
//! unpadded base64url, like every binary field on khub's wire.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::crypto::secret::random_array;

/// Length in bytes of a channel or device id.
pub const ID_LEN: usize = 16;

/// An MLS epoch of a channel, as the envelope header carries it. Epoch 0 is
/// the channel's creation; each commit adds one.
pub type Epoch = u32;

/// A text id that is not 22 characters of unpadded base64url encoding 16 bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} id {input:?} is not valid: expected 22 base64url characters (16 bytes)")]
pub struct IdParseError {
    kind: &'static str,
    input: String,
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name([u8; ID_LEN]);

        impl $name {
            /// Wraps raw bytes.
            pub const fn from_bytes(bytes: [u8; ID_LEN]) -> Self {
                Self(bytes)
            }

            /// Copies 16 bytes from a slice; `None` on a length mismatch.
            pub fn from_slice(bytes: &[u8]) -> Option<Self> {
                bytes.try_into().ok().map(Self)
            }

            /// A fresh random id.
            pub fn random<R: rand::CryptoRng + ?Sized>(rng: &mut R) -> Self {
                Self(random_array(rng))
            }

            /// The raw bytes.
            pub const fn as_bytes(&self) -> &[u8; ID_LEN] {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&URL_SAFE_NO_PAD.encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                URL_SAFE_NO_PAD
                    .decode(s.trim())
                    .ok()
                    .and_then(|bytes| Self::from_slice(&bytes))
                    .ok_or_else(|| IdParseError {
                        kind: $kind,
                        input: s.chars().take(64).collect(),
                    })
            }
        }
    };
}

id_type!(
    /// Identifies a channel: the set of paired devices of one MLS group (its group id).
    ChannelId,
    "channel"
);
id_type!(
    /// Identifies one device within a channel.
    DeviceId,
    "device"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_text_and_reject_garbage() {
        let id = DeviceId::from_bytes([7; ID_LEN]);
        let text = id.to_string();
        assert_eq!(text.len(), 22);
        assert_eq!(text.parse::<DeviceId>().unwrap(), id);
        assert!("not-an-id".parse::<DeviceId>().is_err());
        assert!("AAAAAAAAAAAAAAAAAAAAAAAA".parse::<ChannelId>().is_err());
        assert_eq!(format!("{id:?}"), format!("DeviceId({text})"));
    }
}
