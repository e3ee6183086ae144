//! What both sides derive from CPace: the inputs they must agree on, and the keys
//! and short authentication string that come out.
//!
//! ```text
//! PRS = the 8 normalised code symbols (ASCII)
//! CI  = lv_cat("khub/v1/pair/ci", nameplate as decimal ASCII)
//! ADa = "khub/v1/pair/inviter",  ADb = "khub/v1/pair/joiner"
//! sid = 16 random bytes drawn by the inviter, passed to the joiner by the relay
//! PRK = HKDF-Extract(salt = sid, IKM = ISK)                       (HKDF-SHA256)
//! a2b = HKDF-Expand(PRK, "khub/v1/pair/a2b", 32)
//! b2a = HKDF-Expand(PRK, "khub/v1/pair/b2a", 32)
//! SAS = HKDF-Expand(PRK, "khub/v1/pair/sas", 8) as u64 BE, mod 10^6, as "ddd ddd"
//! ```

use std::fmt;

use crate::crypto::cpace::{Inputs, Isk, lv_cat};
use crate::crypto::kdf::{
    LABEL_PAIR_A2B, LABEL_PAIR_B2A, LABEL_PAIR_CI, LABEL_PAIR_SAS, hkdf_sha256,
};
use crate::crypto::secret::secret_type;

use super::code::Code;

/// Length of the pairing session id.
pub const SID_LEN: usize = 16;

secret_type!(
    /// A one-direction pairing key (a2b or b2a), used to seal one payload.
    SessionKey,
    32
);

/// The channel identifier CPace binds the run to: label and nameplate.
pub fn channel_identifier(code: &Code) -> Vec<u8> {
    lv_cat(&[LABEL_PAIR_CI, code.nameplate().to_string().as_bytes()])
}

/// Runs `f` with the CPace inputs for `code` and `sid`.
pub(crate) fn with_inputs<T>(
    code: &Code,
    sid: &[u8; SID_LEN],
    f: impl FnOnce(Inputs<'_>) -> T,
) -> T {
    let ci = channel_identifier(code);
    f(Inputs {
        prs: code.secret().expose(),
        ci: &ci,
        sid,
    })
}

/// A short authentication string: six digits both screens can show, so that two
/// people can check they paired with each other.
#[derive(Clone, PartialEq, Eq)]
pub struct Sas(u32);

impl Sas {
    /// The six digits as a number.
    pub fn value(&self) -> u32 {
        self.0
    }
}

impl fmt::Display for Sas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:03} {:03}", self.0 / 1000, self.0 % 1000)
    }
}

impl fmt::Debug for Sas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sas({self})")
    }
}

/// The keys a successful pairing yields on both sides.
#[derive(Debug, PartialEq, Eq)]
pub struct SessionKeys {
    /// Seals the inviter's payload (the welcome).
    pub a2b: SessionKey,
    /// Seals the joiner's payload (its device info).
    pub b2a: SessionKey,
    /// The short authentication string.
    pub sas: Sas,
}

impl SessionKeys {
    /// Derives the keys from ISK, salted with the session id.
    pub fn derive(sid: &[u8; SID_LEN], isk: &Isk) -> Self {
        let sas_bytes: [u8; 8] = hkdf_sha256(sid, isk.expose(), &[LABEL_PAIR_SAS]);
        Self {
            a2b: SessionKey::from_bytes(hkdf_sha256(sid, isk.expose(), &[LABEL_PAIR_A2B])),
            b2a: SessionKey::from_bytes(hkdf_sha256(sid, isk.expose(), &[LABEL_PAIR_B2A])),
            sas: Sas((u64::from_be_bytes(sas_bytes) % 1_000_000) as u32),
        }
    }
}
