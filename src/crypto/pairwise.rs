//! Device static keys and the pairwise keys derived from them.
//!
//! Each device holds one X25519 static key pair; its public half travels in the
//! sealed device info during pairing and in every welcome's member list. Two
//! members share a pairwise key, used only to hand each other the next epoch's
//! channel key on a rekey:
//!
//! ```text
//! pairwise = HKDF-SHA256(salt = channel id,
//!                        IKM  = X25519(own secret, peer public),
//!                        info = LABEL_PAIRWISE || low id || high id || low pk || high pk)
//! ```
//!
//! where "low" is the member whose device id sorts first. Both ends compute the
//! same key; no one else can, including a device removed from the channel.

use std::fmt;

use x25519_dalek::{PublicKey, StaticSecret};

use crate::crypto::kdf::{LABEL_PAIRWISE, hkdf_sha256};
use crate::crypto::secret::{random_array, secret_type};
use crate::ids::{ChannelId, DeviceId};

/// Length of an X25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;

secret_type!(
    /// Key shared by exactly two members of a channel, for sealing rekeys.
    PairwiseKey,
    32
);

/// A device's X25519 static secret. Wiped on drop by `x25519-dalek`.
pub struct DeviceSecret(StaticSecret);

impl DeviceSecret {
    /// A fresh key pair from `rng`.
    pub fn generate<R: rand::CryptoRng + ?Sized>(rng: &mut R) -> Self {
        Self(StaticSecret::from(random_array::<32, R>(rng)))
    }

    /// Restores a secret from its 32 bytes (as kept in device state on disk).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(StaticSecret::from(bytes))
    }

    /// The secret's bytes, for persisting device state only.
    pub fn expose(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }

    /// The public half, shared with the other members.
    pub fn public_key(&self) -> DevicePublicKey {
        DevicePublicKey(PublicKey::from(&self.0).to_bytes())
    }

    /// The pairwise key between this device (`me`) and `peer` in `channel`.
    pub fn pairwise_key(
        &self,
        channel: &ChannelId,
        me: &DeviceId,
        peer: &DeviceId,
        peer_public: &DevicePublicKey,
    ) -> Result<PairwiseKey, PairwiseError> {
        if me == peer {
            return Err(PairwiseError::SameDevice);
        }
        let shared = self.0.diffie_hellman(&PublicKey::from(peer_public.0));
        // A low-order peer key gives an all-zero secret that anyone can compute.
        if !shared.was_contributory() {
            return Err(PairwiseError::WeakPublicKey(*peer));
        }
        let mine = self.public_key();
        let (low, high) = if me < peer {
            ((me, &mine), (peer, peer_public))
        } else {
            ((peer, peer_public), (me, &mine))
        };
        Ok(PairwiseKey::from_bytes(hkdf_sha256(
            channel.as_bytes(),
            shared.as_bytes(),
            &[
                LABEL_PAIRWISE,
                low.0.as_bytes(),
                high.0.as_bytes(),
                &low.1.0,
                &high.1.0,
            ],
        )))
    }
}

impl fmt::Debug for DeviceSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceSecret(<redacted>)")
    }
}

/// A device's X25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct DevicePublicKey(pub [u8; PUBLIC_KEY_LEN]);

impl fmt::Debug for DevicePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DevicePublicKey({})", hex::encode(self.0))
    }
}

/// Why no pairwise key could be derived.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PairwiseError {
    /// A device has no pairwise key with itself.
    #[error("a device has no pairwise key with itself")]
    SameDevice,
    /// The peer's public key is a low-order point.
    #[error("device {0} has an invalid (low-order) public key")]
    WeakPublicKey(DeviceId),
}
