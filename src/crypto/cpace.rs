//! CPace over ristretto255 with SHA-512, exactly as draft-irtf-cfrg-cpace-21.
//!
//! This file is the draft turned into code, one function per definition, with the
//! section it implements named on each. The group arithmetic (RFC 9496 encode,
//! decode and element derivation) comes from `curve25519-dalek`; SHA-512 from
//! `sha2`; HMAC from `hmac`. Nothing here touches the network or a clock: the
//! random scalar is drawn from an injected RNG, so the CFRG test vectors and our
//! own published vectors reproduce byte for byte.
//!
//! The pieces used by the pairing protocol are [`Initiator`] (sends `Ya`, then
//! derives ISK from `Yb`) and [`Responder`] (derives ISK from `Ya`, sends `Yb`),
//! plus the key-confirmation tags of draft §10.4 ([`KeyConfirmation`]).

use curve25519_dalek::ristretto::{CompressedRistretto, RistrettoPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::IsIdentity;
use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use crate::crypto::secret::{random_array, secret_type};

/// `G_Ristretto255.DSI` (draft §8.3).
pub const DSI: &[u8] = b"CPaceRistretto255";
/// Suffix of the ISK domain separator: ISK hashes `DSI || "_ISK"` (draft §7.2).
pub const DSI_ISK_SUFFIX: &[u8] = b"_ISK";
/// Prefix of the key-confirmation MAC key derivation (draft §10.4).
pub const MAC_KEY_PREFIX: &[u8] = b"CPaceMac";
/// Prefix of the optional session-id output (draft §10.6).
pub const SID_OUTPUT_PREFIX: &[u8] = b"CPaceSidOutput";
/// SHA-512's input block size, `H.s_in_bytes` (draft §6.2).
pub const SHA512_BLOCK_BYTES: usize = 128;
/// Length of an encoded ristretto255 element.
pub const ELEMENT_LEN: usize = 32;
/// Length of ISK: SHA-512's output, `H.b_in_bytes`.
pub const ISK_LEN: usize = 64;
/// Length of a key-confirmation tag (HMAC-SHA512).
pub const TAG_LEN: usize = 64;

secret_type!(
    /// The intermediate session key CPace outputs (draft §7.2). Never used
    /// directly: khub derives purpose-bound keys from it with HKDF.
    Isk,
    ISK_LEN
);

secret_type!(
    /// `mac_key = SHA-512("CPaceMac" || sid || ISK)` for key confirmation (§10.4).
    MacKey,
    64
);

/// Why a received CPace share was refused. Both cases abort the run: the draft
/// calls for it (§7.2, `K = G.I`), and it is the only safe answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CpaceError {
    /// The 32 bytes are not a canonical ristretto255 encoding.
    #[error("the peer's CPace share is not a valid ristretto255 element")]
    InvalidPoint,
    /// The share decodes, but the shared point is the identity (for example the
    /// all-zero encoding), which would make the key independent of the code.
    #[error("the peer's CPace share gives the identity element")]
    IdentityPoint,
}

/// `prepend_len(data)`: the LEB128 length of `data`, then `data` (draft §6.3, A.1).
pub fn prepend_len(out: &mut Vec<u8>, data: &[u8]) {
    let mut len = data.len();
    loop {
        // Seven bits at a time, least significant first; bit 7 set while more follow.
        let low = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.push(low);
            break;
        }
        out.push(low | 0x80);
    }
    out.extend_from_slice(data);
}

/// `lv_cat(a0, a1, ...)`: each part with its length prepended (draft A.1.3).
pub fn lv_cat(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 2).sum());
    for part in parts {
        prepend_len(&mut out, part);
    }
    out
}

/// Length of `prepend_len(data)` for data of `len` bytes.
fn prepended_len(len: usize) -> usize {
    let mut header = 1;
    let mut rest = len >> 7;
    while rest > 0 {
        header += 1;
        rest >>= 7;
    }
    header + len
}

/// `generator_string(DSI, PRS, CI, sid, s_in_bytes)` (draft §8.1, A.2): the zero
/// padding makes the first SHA-512 block hold DSI, PRS and zeros only. The result
/// contains the code secret, so it is wiped when dropped.
pub fn generator_string(prs: &[u8], ci: &[u8], sid: &[u8]) -> Zeroizing<Vec<u8>> {
    let len_zpad = SHA512_BLOCK_BYTES
        .saturating_sub(prepended_len(prs.len()))
        .saturating_sub(prepended_len(DSI.len()))
        .saturating_sub(1);
    let zpad = vec![0u8; len_zpad];
    Zeroizing::new(lv_cat(&[DSI, prs, &zpad, ci, sid]))
}

/// `G.calculate_generator(H, PRS, CI, sid)` for ristretto255 (draft §8.3): hash the
/// generator string to 64 bytes and apply the RFC 9496 element derivation.
pub fn calculate_generator(prs: &[u8], ci: &[u8], sid: &[u8]) -> RistrettoPoint {
    let gen_str = generator_string(prs, ci, sid);
    let mut hash: [u8; 64] = Sha512::digest(gen_str.as_slice()).into();
    let generator = RistrettoPoint::from_uniform_bytes(&hash);
    hash.zeroize();
    generator
}

/// `G.sample_scalar()` (draft §8.3): 32 random bytes with the bits above
/// `group_size_bits` = 252 cleared, read little-endian. The draft's alternative
/// (uniform in `1..order`) is not used, so the CFRG vectors apply as they are.
pub fn sample_scalar<R: rand::CryptoRng + ?Sized>(rng: &mut R) -> Scalar {
    scalar_from_sampled_bytes(random_array(rng))
}

/// The deterministic half of [`sample_scalar`]: masks 32 sampled bytes to a scalar.
/// The masked value is below the group order, so no reduction takes place.
pub fn scalar_from_sampled_bytes(mut bytes: [u8; 32]) -> Scalar {
    bytes[31] &= 0x0f;
    let scalar = Scalar::from_bytes_mod_order(bytes);
    bytes.zeroize();
    scalar
}

/// `G.scalar_mult(y, g)`: `encode(y * g)`.
pub fn scalar_mult(y: &Scalar, generator: &RistrettoPoint) -> [u8; ELEMENT_LEN] {
    (y * generator).compress().to_bytes()
}

/// `G.scalar_mult_vfy(y, X)` (draft §8.3) with the abort of §7.2 folded in: an
/// undecodable `X` or an identity result is an error instead of `G.I`.
pub fn scalar_mult_vfy(y: &Scalar, x: &[u8]) -> Result<Zeroizing<[u8; ELEMENT_LEN]>, CpaceError> {
    let encoded: [u8; ELEMENT_LEN] = x.try_into().map_err(|_| CpaceError::InvalidPoint)?;
    let point = CompressedRistretto(encoded)
        .decompress()
        .ok_or(CpaceError::InvalidPoint)?;
    let shared = y * point;
    if shared.is_identity() {
        return Err(CpaceError::IdentityPoint);
    }
    Ok(Zeroizing::new(shared.compress().to_bytes()))
}

/// `transcript_ir(Ya, ADa, Yb, ADb)` = `lv_cat(Ya, ADa) || lv_cat(Yb, ADb)` (§6.3).
pub fn transcript_ir(ya: &[u8], ada: &[u8], yb: &[u8], adb: &[u8]) -> Vec<u8> {
    let mut out = lv_cat(&[ya, ada]);
    out.extend_from_slice(&lv_cat(&[yb, adb]));
    out
}

/// `o_cat(a, b)`: `"oc"`, then the lexicographically larger string, then the other (A.3.2).
pub fn o_cat(a: &[u8], b: &[u8]) -> Vec<u8> {
    // Slice ordering in Rust is the draft's `lexiographically_larger`: bytewise,
    // and a proper prefix sorts first.
    let (first, second) = if a > b { (a, b) } else { (b, a) };
    let mut out = Vec::with_capacity(2 + a.len() + b.len());
    out.extend_from_slice(b"oc");
    out.extend_from_slice(first);
    out.extend_from_slice(second);
    out
}

/// `transcript_oc(Ya, ADa, Yb, ADb)` for the symmetric setting (§6.3). khub uses the
/// initiator–responder transcript; this one is here to check the draft's vectors.
pub fn transcript_oc(ya: &[u8], ada: &[u8], yb: &[u8], adb: &[u8]) -> Vec<u8> {
    o_cat(&lv_cat(&[ya, ada]), &lv_cat(&[yb, adb]))
}

/// `ISK = H.hash(lv_cat(DSI || "_ISK", sid, K) || transcript)` (draft §7.2).
pub fn derive_isk(sid: &[u8], k: &[u8; ELEMENT_LEN], transcript: &[u8]) -> Isk {
    let dsi_isk = [DSI, DSI_ISK_SUFFIX].concat();
    let prefix = Zeroizing::new(lv_cat(&[&dsi_isk, sid, k]));
    let mut hasher = Sha512::new();
    hasher.update(prefix.as_slice());
    hasher.update(transcript);
    Isk::from_bytes(hasher.finalize().into())
}

/// `sid_output = H.hash("CPaceSidOutput" || transcript)` (draft §10.6).
pub fn sid_output(transcript: &[u8]) -> [u8; 64] {
    let mut hasher = Sha512::new();
    hasher.update(SID_OUTPUT_PREFIX);
    hasher.update(transcript);
    hasher.finalize().into()
}

/// The draft's explicit key confirmation (§10.4): `mac_key = H("CPaceMac" || sid ||
/// ISK)`, `Ta = MAC(mac_key, lv_cat(Ya, ADa))`, `Tb = MAC(mac_key, lv_cat(Yb, ADb))`,
/// with MAC = HMAC-SHA512.
pub struct KeyConfirmation {
    mac_key: MacKey,
}

impl KeyConfirmation {
    /// Derives `mac_key` from the session id and ISK.
    pub fn new(sid: &[u8], isk: &Isk) -> Self {
        let mut hasher = Sha512::new();
        hasher.update(MAC_KEY_PREFIX);
        hasher.update(sid);
        hasher.update(isk.expose());
        Self {
            mac_key: MacKey::from_bytes(hasher.finalize().into()),
        }
    }

    /// The MAC key itself, for the published vectors.
    pub fn mac_key(&self) -> &MacKey {
        &self.mac_key
    }

    /// The tag a party sends over the share `y` and associated data `ad` it sent.
    pub fn tag(&self, y: &[u8], ad: &[u8]) -> [u8; TAG_LEN] {
        let mut mac = <hmac::Hmac<Sha512> as KeyInit>::new_from_slice(self.mac_key.expose())
            .expect("HMAC accepts keys of any length");
        mac.update(&lv_cat(&[y, ad]));
        mac.finalize().into_bytes().into()
    }

    /// Checks a received tag in constant time.
    pub fn verify(&self, y: &[u8], ad: &[u8], tag: &[u8]) -> bool {
        let expected = self.tag(y, ad);
        tag.len() == TAG_LEN && bool::from(expected.ct_eq(tag))
    }
}

/// The inputs both parties must agree on. `prs` is the password-related string
/// (the normalised code secret); it is only borrowed and never stored.
#[derive(Clone, Copy)]
pub struct Inputs<'a> {
    /// Password-related string.
    pub prs: &'a [u8],
    /// Channel identifier: binds the run to its context (not sent on the wire).
    pub ci: &'a [u8],
    /// Session id, public and unique per run.
    pub sid: &'a [u8],
}

/// Party A of the initiator–responder setting: sends `Ya` first.
pub struct Initiator {
    ya: Zeroizing<Scalar>,
    share: [u8; ELEMENT_LEN],
    sid: Vec<u8>,
}

impl Initiator {
    /// Computes the generator and `Ya = ya * g`. Returns the state and `Ya`.
    pub fn start<R: rand::CryptoRng + ?Sized>(
        inputs: Inputs<'_>,
        rng: &mut R,
    ) -> (Self, [u8; ELEMENT_LEN]) {
        let ya = Zeroizing::new(sample_scalar(rng));
        let generator = calculate_generator(inputs.prs, inputs.ci, inputs.sid);
        let share = scalar_mult(&ya, &generator);
        let state = Self {
            ya,
            share,
            sid: inputs.sid.to_vec(),
        };
        (state, share)
    }

    /// This party's share `Ya`.
    pub fn share(&self) -> &[u8; ELEMENT_LEN] {
        &self.share
    }

    /// On B's share: `K = scalar_mult_vfy(ya, Yb)`, abort on `G.I`, then ISK over
    /// the initiator–responder transcript. Consumes the scalar either way.
    pub fn finish(self, ada: &[u8], yb: &[u8], adb: &[u8]) -> Result<Isk, CpaceError> {
        let k = scalar_mult_vfy(&self.ya, yb)?;
        let transcript = transcript_ir(&self.share, ada, yb, adb);
        Ok(derive_isk(&self.sid, &k, &transcript))
    }
}

/// Party B: derives ISK from A's share and answers with `Yb`.
pub struct Responder;

impl Responder {
    /// Computes `Yb = yb * g`, `K = scalar_mult_vfy(yb, Ya)` (aborting on `G.I`)
    /// and ISK. Returns ISK and `Yb`; the scalar is wiped before returning.
    pub fn respond<R: rand::CryptoRng + ?Sized>(
        inputs: Inputs<'_>,
        ya: &[u8],
        ada: &[u8],
        adb: &[u8],
        rng: &mut R,
    ) -> Result<(Isk, [u8; ELEMENT_LEN]), CpaceError> {
        let yb = Zeroizing::new(sample_scalar(rng));
        let generator = calculate_generator(inputs.prs, inputs.ci, inputs.sid);
        let share = scalar_mult(&yb, &generator);
        let k = scalar_mult_vfy(&yb, ya)?;
        let transcript = transcript_ir(ya, ada, &share, adb);
        Ok((derive_isk(inputs.sid, &k, &transcript), share))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Draft A.1.2 and A.1.4.
    #[test]
    fn prepend_len_and_lv_cat_match_the_draft() {
        let mut out = Vec::new();
        prepend_len(&mut out, b"");
        assert_eq!(out, [0x00]);
        let long: Vec<u8> = (0..128u8).collect();
        let mut out = Vec::new();
        prepend_len(&mut out, &long);
        assert_eq!(&out[..3], &[0x80, 0x01, 0x00]);
        assert_eq!(out.len(), 130);
        assert_eq!(prepended_len(127), 128);
        assert_eq!(prepended_len(128), 130);
        assert_eq!(
            hex::encode(lv_cat(&[b"1234", b"5", b"", b"678"])),
            "043132333401350003363738"
        );
    }

    // Draft A.3.3, A.3.5 and A.3.7.
    #[test]
    fn ordered_concatenation_and_transcripts_match_the_draft() {
        assert_eq!(hex::encode(o_cat(b"ABCD", b"BCD")), "6f6342434441424344");
        assert_eq!(hex::encode(o_cat(b"BCD", b"ABCDE")), "6f634243444142434445");
        assert_eq!(o_cat(b"\0", b"\0\0"), b"oc\0\0\0");
        assert_eq!(
            hex::encode(transcript_ir(b"123", b"PartyA", b"234", b"PartyB")),
            "03313233065061727479410332333406506172747942"
        );
        assert_eq!(
            hex::encode(transcript_oc(b"123", b"PartyA", b"234", b"PartyB")),
            "6f6303323334065061727479420331323306506172747941"
        );
        assert_eq!(
            hex::encode(transcript_oc(b"3456", b"PartyA", b"2345", b"PartyB")),
            "6f63043334353606506172747941043233343506506172747942"
        );
    }

    #[test]
    fn generator_string_fills_the_first_block() {
        // DSI (17) and PRS (8), each with a one-byte length, plus the padding's own
        // one-byte length, fill exactly 128 bytes.
        let s = generator_string(b"Password", b"", b"");
        assert_eq!(s[..128].len(), 128);
        assert_eq!(s[18 + 9], 128 - 18 - 9 - 1);
        assert!(s[18 + 9 + 1..128].iter().all(|&b| b == 0));
    }
}
