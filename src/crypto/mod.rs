//! Cryptography, all pure: no sockets, no clocks, randomness injected.
//!
//! - [`cpace`]: CPace-ristretto255-SHA512 per draft-irtf-cfrg-cpace-21.
//! - [`kdf`]: every HKDF and associated-data label.
//! - [`aead`]: XChaCha20-Poly1305 sealed boxes with random nonces (pairing payloads).
//! - [`envelope`]: the envelope header the relay routes by, and padding.
//! - [`secret`]: the secret-bytes type all keys are built on.
//! - [`token`]: relay access tokens and the hashes the relay stores.

pub mod aead;
pub mod cpace;
pub mod envelope;
pub mod kdf;
pub mod secret;
pub mod token;

/// The OS CSPRNG (getrandom) as an infallible [`rand::CryptoRng`]: every key,
/// code secret, nonce and id outside tests comes from here. If the OS cannot
/// supply randomness this panics — there is no safe way to go on without it.
pub fn os_rng() -> rand::rand_core::UnwrapErr<rand::rngs::SysRng> {
    rand::rand_core::UnwrapErr(rand::rngs::SysRng)
}
