//! What the two sides of a pairing seal to each other under the CPace keys.
//!
//! The joiner's device info (B → A, under `b2a`):
//!
//! ```text
//! version (2) | device id (16) | token hash (32) | KeyPackage length (u32) | KeyPackage
//! ```
//!
//! The token hash is SHA-256 of the joiner's relay access token: the inviter
//! registers it at the relay so the relay can later recognise the new device
//! without ever seeing its token. The KeyPackage is the joiner's MLS
//! KeyPackage (RFC 9420 §10, TLS-encoded), whose credential names the device id
//! and the device's name.
//!
//! The channel welcome (A → B, under `a2b`):
//!
//! ```text
//! version (2) | channel id (16) | cursor (u64) | Welcome length (u32) | Welcome
//! ```
//!
//! The Welcome is the TLS-encoded `MLSMessage` carrying the MLS Welcome (with
//! the ratchet tree in its GroupInfo). The cursor is the relay sequence number
//! of the commit that added the joiner: the joiner reads the channel from the
//! envelope after it, the first of the epoch it joins.

use sha2::{Digest, Sha256};

use crate::codec::{DecodeError, Reader};
use crate::ids::{ChannelId, DeviceId, ID_LEN};

/// The payload format version this build writes and reads (protocol 2).
pub const PAYLOAD_VERSION: u8 = 2;
/// Largest KeyPackage or Welcome accepted inside a payload.
pub const MAX_MLS_LEN: usize = 60 * 1024;

fn version(r: &mut Reader<'_>, what: &'static str) -> Result<(), DecodeError> {
    match r.u8(what)? {
        PAYLOAD_VERSION => Ok(()),
        1 => Err(DecodeError(
            "the other device speaks protocol 1; update khub on it and pair it again",
        )),
        _ => Err(DecodeError("unsupported payload version; update khub")),
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).expect("MLS messages are far below 4 GiB");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

fn mls_bytes<'a>(r: &mut Reader<'a>, field: &'static str) -> Result<&'a [u8], DecodeError> {
    let len = usize::try_from(r.u32(field)?).map_err(|_| DecodeError("length overflows"))?;
    if len > MAX_MLS_LEN {
        return Err(DecodeError(
            "an MLS message in a pairing payload is too large",
        ));
    }
    r.take(len, field)
}

/// What the joiner tells the inviter about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The joiner's device id (its KeyPackage's credential must name it).
    pub id: DeviceId,
    /// SHA-256 of the joiner's relay access token.
    pub token_hash: [u8; 32],
    /// The joiner's MLS KeyPackage, TLS-encoded.
    pub key_package: Vec<u8>,
}

impl DeviceInfo {
    /// Device info for device `id` with relay access token `token`; only the
    /// token's hash is kept.
    pub fn new(id: DeviceId, token: &[u8], key_package: Vec<u8>) -> Self {
        Self {
            id,
            token_hash: Sha256::digest(token).into(),
            key_package,
        }
    }

    /// The plaintext that gets sealed.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![PAYLOAD_VERSION];
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(&self.token_hash);
        put_bytes(&mut out, &self.key_package);
        out
    }

    /// Parses device info.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        version(&mut r, "device info version")?;
        let id = DeviceId::from_bytes(r.array::<ID_LEN>("device id")?);
        let token_hash = r.array("token hash")?;
        let key_package = mls_bytes(&mut r, "KeyPackage")?.to_vec();
        r.finish("trailing bytes after device info")?;
        Ok(Self {
            id,
            token_hash,
            key_package,
        })
    }
}

/// What the inviter hands the joiner: the channel and its MLS Welcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelWelcome {
    /// The channel's id (its MLS group id).
    pub channel: ChannelId,
    /// Relay sequence number of the commit that added the joiner.
    pub cursor: u64,
    /// The MLS Welcome, a TLS-encoded `MLSMessage`.
    pub welcome: Vec<u8>,
}

impl ChannelWelcome {
    /// The plaintext that gets sealed.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![PAYLOAD_VERSION];
        out.extend_from_slice(self.channel.as_bytes());
        out.extend_from_slice(&self.cursor.to_be_bytes());
        put_bytes(&mut out, &self.welcome);
        out
    }

    /// Parses a channel welcome.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        version(&mut r, "welcome version")?;
        let channel = ChannelId::from_bytes(r.array::<ID_LEN>("channel id")?);
        let cursor = r.u64("cursor")?;
        let welcome = mls_bytes(&mut r, "Welcome")?.to_vec();
        r.finish("trailing bytes after the welcome")?;
        Ok(Self {
            channel,
            cursor,
            welcome,
        })
    }
}
