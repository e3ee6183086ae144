//! Relay access tokens: how a device proves to the relay that it is a member.
//!
//! Each device draws a random 32-byte token. The relay stores only its SHA-256
//! ([`TokenHash`]) and checks a presented token by hashing it and comparing in
//! constant time, so a leaked relay database grants no access.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::crypto::secret::{random_array, secret_type};

secret_type!(
    /// A device's relay access token. Sent only to authenticate a session.
    AccessToken,
    32
);

impl AccessToken {
    /// A fresh token from `rng`.
    pub fn generate<R: rand::CryptoRng + ?Sized>(rng: &mut R) -> Self {
        Self::from_bytes(random_array(rng))
    }

    /// The hash the relay stores.
    pub fn hash(&self) -> TokenHash {
        TokenHash(Sha256::digest(self.expose()).into())
    }
}

// Tokens must cross the wire (in `hello` frames and Authorization headers), so
// unlike the key types they have serde support: unpadded base64url.
impl Serialize for AccessToken {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::protocol::b64::encode(self.expose()))
    }
}

impl<'de> Deserialize<'de> for AccessToken {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = zeroize::Zeroizing::new(String::deserialize(d)?);
        let bytes = zeroize::Zeroizing::new(
            crate::protocol::b64::decode(&text)
                .map_err(|_| de::Error::custom("invalid base64url"))?,
        );
        Self::from_slice(&bytes).ok_or_else(|| de::Error::custom("expected 32 bytes"))
    }
}

/// SHA-256 of an access token: what the relay keeps.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    /// Whether `token` hashes to this value, compared in constant time.
    pub fn verify(&self, token: &AccessToken) -> bool {
        token.hash().0.ct_eq(&self.0).into()
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only a prefix: enough to tell two apart in a debugger, nothing to brute-force.
        write!(f, "TokenHash({}…)", hex::encode(&self.0[..4]))
    }
}

impl Serialize for TokenHash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::protocol::b64::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for TokenHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::protocol::b64::array::deserialize(d).map(Self)
    }
}
