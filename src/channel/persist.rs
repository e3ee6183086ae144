//! The keyring's at-rest form, for device state on disk.
//!
//! ```text
//! version (1) | channel id (16) | device id (16) | X25519 secret (32) | next seq (u64)
//! | epoch count (u16) | per epoch: epoch (u32) | key (32) | earlier key count (u8) | keys (32 each)
//!                      | member count (u16) | members (id | public key | name length | name)
//!                      | proposal count (u8) | proposals (author id (16) | hash (32) | key (32))
//! | window count (u16) | per sender: device id (16) | highest (u64) | bitmap (u128)
//! ```
//!
//! The bytes hold every key the device has: they are wiped on drop, and the SDK
//! writes them only to its own state file (mode 0600).

use std::collections::{BTreeMap, HashMap};

use zeroize::Zeroizing;

use super::keyring::{EpochState, Keyring, Proposal};
use super::member::Member;
use crate::codec::{DecodeError, Reader};
use crate::crypto::envelope::ChannelKey;
use crate::crypto::pairwise::DeviceSecret;
use crate::crypto::replay::ReplayWindow;
use crate::ids::{ChannelId, DeviceId};

const VERSION: u8 = 1;

impl Keyring {
    /// The keyring's full state, for storing on the device.
    pub fn export(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(256));
        out.push(VERSION);
        out.extend_from_slice(self.channel.as_bytes());
        out.extend_from_slice(self.me.as_bytes());
        out.extend_from_slice(self.secret.expose());
        out.extend_from_slice(&self.next_seq.to_be_bytes());
        out.extend_from_slice(&(self.epochs.len() as u16).to_be_bytes());
        for (epoch, state) in &self.epochs {
            out.extend_from_slice(&epoch.to_be_bytes());
            out.extend_from_slice(state.key.expose());
            out.push(state.earlier_keys.len() as u8);
            for key in &state.earlier_keys {
                out.extend_from_slice(key.expose());
            }
            out.extend_from_slice(&(state.members.len() as u16).to_be_bytes());
            for member in state.members.values() {
                member.encode_into(&mut out);
            }
            out.push(state.proposals.len() as u8);
            for proposal in &state.proposals {
                out.extend_from_slice(proposal.precedence.0.as_bytes());
                out.extend_from_slice(&proposal.precedence.1);
                out.extend_from_slice(proposal.key.expose());
            }
        }
        out.extend_from_slice(&(self.windows.len() as u16).to_be_bytes());
        for (device, window) in &self.windows {
            let (highest, seen) = window.to_parts();
            out.extend_from_slice(device.as_bytes());
            out.extend_from_slice(&highest.to_be_bytes());
            out.extend_from_slice(&seen.to_be_bytes());
        }
        out
    }

    /// Restores a keyring from [`export`](Self::export)'s bytes.
    pub fn import(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        if r.u8("keyring version")? != VERSION {
            return Err(DecodeError("unsupported keyring version"));
        }
        let channel = ChannelId::from_bytes(r.array("channel id")?);
        let me = DeviceId::from_bytes(r.array("device id")?);
        let secret = DeviceSecret::from_bytes(*Zeroizing::new(r.array::<32>("device secret")?));
        let next_seq = r.u64("next seq")?;
        let mut epochs = BTreeMap::new();
        for _ in 0..r.u16("epoch count")? {
            let epoch = r.u32("epoch")?;
            let key = ChannelKey::from_bytes(r.array("epoch key")?);
            let earlier_keys = (0..r.u8("earlier key count")?)
                .map(|_| r.array("earlier key").map(ChannelKey::from_bytes))
                .collect::<Result<_, _>>()?;
            let mut members = BTreeMap::new();
            for _ in 0..r.u16("member count")? {
                let member = Member::decode_from(&mut r)?;
                members.insert(member.id, member);
            }
            let proposals = (0..r.u8("proposal count")?)
                .map(|_| {
                    Ok(Proposal {
                        precedence: (
                            DeviceId::from_bytes(r.array("author")?),
                            r.array("proposal hash")?,
                        ),
                        key: ChannelKey::from_bytes(r.array("proposal key")?),
                    })
                })
                .collect::<Result<_, DecodeError>>()?;
            epochs.insert(
                epoch,
                EpochState {
                    key,
                    earlier_keys,
                    members,
                    proposals,
                },
            );
        }
        if epochs.is_empty() {
            return Err(DecodeError("a keyring holds at least one epoch"));
        }
        let mut windows = HashMap::new();
        for _ in 0..r.u16("window count")? {
            let device = DeviceId::from_bytes(r.array("window device")?);
            let highest = r.u64("window highest")?;
            let seen = r.u128("window bitmap")?;
            windows.insert(device, ReplayWindow::from_parts(highest, seen));
        }
        r.finish("trailing bytes after the keyring")?;
        Ok(Self {
            channel,
            me,
            secret,
            epochs,
            windows,
            next_seq,
        })
    }
}
