//! Every key-derivation and associated-data label khub uses, and the HKDF helper.
//!
//! All derivations are HKDF-SHA256 (RFC 5869). Labels are ASCII, carry the
//! protocol version, and are followed in `info` only by fixed-length fields, so no
//! two derivations can produce the same `info`. SECURITY.md lists the same table;
//! a change here is a protocol version bump.

use hkdf::Hkdf;
use sha2::Sha256;

/// CPace channel identifier prefix: `CI = lv_cat(LABEL_PAIR_CI, nameplate)`.
pub const LABEL_PAIR_CI: &[u8] = b"khub/v1/pair/ci";
/// CPace associated data of the inviter (party A, shows the code).
pub const AD_INVITER: &[u8] = b"khub/v1/pair/inviter";
/// CPace associated data of the joiner (party B, types the code).
pub const AD_JOINER: &[u8] = b"khub/v1/pair/joiner";
/// Key sealing the inviter's payload (the channel welcome) to the joiner.
pub const LABEL_PAIR_A2B: &[u8] = b"khub/v1/pair/a2b";
/// Key sealing the joiner's payload (its device info) to the inviter.
pub const LABEL_PAIR_B2A: &[u8] = b"khub/v1/pair/b2a";
/// Short authentication string both screens can show.
pub const LABEL_PAIR_SAS: &[u8] = b"khub/v1/pair/sas";
/// Associated data of the joiner's sealed device info (not a KDF label).
pub const LABEL_DEVICE_INFO: &[u8] = b"khub/v1/pair/device-info";
/// Associated data of the inviter's sealed channel welcome (not a KDF label).
pub const LABEL_WELCOME: &[u8] = b"khub/v1/pair/welcome";

/// HKDF-SHA256 extract-then-expand into `N` bytes. `info` is the concatenation of
/// `info_parts`. Callers wrap the output in a secret type at once.
pub fn hkdf_sha256<const N: usize>(salt: &[u8], ikm: &[u8], info_parts: &[&[u8]]) -> [u8; N] {
    let hk = Hkdf::<Sha256>::new(Some(salt), ikm);
    let mut okm = [0u8; N];
    // `expand_multi_info` concatenates the parts without an intermediate copy.
    hk.expand_multi_info(info_parts, &mut okm)
        .expect("N is far below HKDF-SHA256's 8160-byte limit");
    okm
}
