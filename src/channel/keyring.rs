//! A device's view of its channel: keys per epoch, members per epoch, its own
//! sequence counter and a replay window per sender. Pure state: the SDK persists
//! it and feeds it envelopes and rekeys; nothing here does I/O.
//!
//! ## Concurrent rekeys
//!
//! Two members may remove devices at the same moment, each proposing a key for
//! the same next epoch. Every member that receives more than one proposal for an
//! epoch uses the **combination** of all of them:
//!
//! ```text
//! members = intersection of the proposals' member lists
//! key     = HKDF-SHA256(salt = channel id,
//!                       IKM  = key_1 || key_2 || ... (proposals sorted by precedence),
//!                       info = "khub/v1/rekey/combine" || epoch u32 BE)
//! ```
//!
//! where precedence is (author id, SHA-256 of the proposal). The result does not
//! depend on arrival order, and removals are sticky: a device removed by any
//! proposal lacks that proposal's key and so cannot compute the combination —
//! not even by answering its own removal with a proposal that keeps itself.

use std::collections::{BTreeMap, HashMap};
use std::ops::RangeInclusive;

use zeroize::Zeroizing;

use crate::crypto::envelope::{self, ChannelKey, EnvelopeHeader, OpenError, SealError};
use crate::crypto::kdf::{LABEL_REKEY_COMBINE, hkdf_sha256};
use crate::crypto::pairwise::DeviceSecret;
use crate::crypto::rekey::{MAX_MEMBERS, Rekey, RekeyError};
use crate::crypto::replay::{Admission, Refusal, ReplayWindow};
use crate::ids::{ChannelId, DeviceId, Epoch};

use super::member::Member;
use super::welcome::Welcome;

/// The key and members of one epoch.
pub(super) struct EpochState {
    /// The key this device seals with, and the first tried when opening.
    pub(super) key: ChannelKey,
    /// Keys this epoch had before a concurrent proposal changed it: envelopes a
    /// member sealed before it saw every proposal still open.
    pub(super) earlier_keys: Vec<ChannelKey>,
    pub(super) members: BTreeMap<DeviceId, Member>,
    /// The rekey proposals that started this epoch, sorted by precedence. Empty
    /// for an epoch created or welcomed into locally.
    pub(super) proposals: Vec<Proposal>,
}

/// One member's proposal for an epoch's key.
pub(super) struct Proposal {
    pub(super) precedence: (DeviceId, [u8; 32]),
    pub(super) key: ChannelKey,
}

/// An envelope that opened: its routing fields, plaintext and what its sequence
/// number says about missing envelopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The authenticated header.
    pub header: EnvelopeHeader,
    /// The application's bytes.
    pub plaintext: Vec<u8>,
    /// Sequence numbers of this sender that were skipped (and will be refused
    /// if they arrive later).
    pub gap: Option<RangeInclusive<u64>>,
}

/// What applying a rekey did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RekeyOutcome {
    /// The next epoch's key was adopted; it is now current.
    Adopted {
        /// The new epoch.
        epoch: Epoch,
    },
    /// A concurrent proposal for the current epoch arrived: the key is now the
    /// combination of all proposals, and the members their intersection.
    Combined {
        /// The epoch whose key changed.
        epoch: Epoch,
        /// How many proposals the key now combines.
        proposals: usize,
    },
    /// This rekey was applied before. Nothing changed.
    Duplicate,
}

/// Why a rekey was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyringError {
    /// The rekey itself was refused.
    #[error(transparent)]
    Rekey(#[from] RekeyError),
    /// For another channel.
    #[error("the rekey is for another channel")]
    WrongChannel,
    /// For an epoch this device cannot apply yet: an earlier rekey is missing.
    #[error("rekey for epoch {got} arrived while at epoch {current}: fetch the rekeys in between")]
    EpochGap {
        /// This device's current epoch.
        current: Epoch,
        /// The rekey's epoch.
        got: Epoch,
    },
    /// For an epoch already superseded; ignore it.
    #[error("rekey for epoch {got} is older than the current epoch {current}")]
    Stale {
        /// This device's current epoch.
        current: Epoch,
        /// The rekey's epoch.
        got: Epoch,
    },
    /// From a device that was not a member of the epoch it replaces.
    #[error("rekey from {0}, which is not a member of the channel")]
    NotAMember(DeviceId),
    /// Lists a member that was not in the epoch it replaces: rekeys only remove.
    #[error("rekey lists {0}, which was not a member; devices join through pairing")]
    AddsMember(DeviceId),
    /// Removing this device itself: another member must remove it.
    #[error("a device cannot remove itself; remove it from another member")]
    RemovingSelf,
    /// The epoch counter is exhausted.
    #[error("the channel has used every epoch number; create a new channel")]
    EpochsExhausted,
    /// The channel already has [`MAX_MEMBERS`] members.
    #[error("the channel already has the maximum of {MAX_MEMBERS} members")]
    ChannelFull,
}

/// One device's keys and view of its channel.
pub struct Keyring {
    pub(super) channel: ChannelId,
    pub(super) me: DeviceId,
    pub(super) secret: DeviceSecret,
    pub(super) epochs: BTreeMap<Epoch, EpochState>,
    /// Per-sender replay windows; a sender's numbers run across epochs.
    pub(super) windows: HashMap<DeviceId, ReplayWindow>,
    /// Sequence number of this device's next envelope.
    pub(super) next_seq: u64,
}

impl Keyring {
    /// A new channel at epoch 0 with this device as its only member.
    pub fn create<R: rand::CryptoRng + ?Sized>(
        channel: ChannelId,
        me: Member,
        secret: DeviceSecret,
        rng: &mut R,
    ) -> Self {
        let id = me.id;
        let state = EpochState {
            key: ChannelKey::generate(rng),
            earlier_keys: Vec::new(),
            members: BTreeMap::from([(id, me)]),
            proposals: Vec::new(),
        };
        Self {
            channel,
            me: id,
            secret,
            epochs: BTreeMap::from([(0, state)]),
            windows: HashMap::new(),
            next_seq: 1,
        }
    }

    /// The keyring of a device that just paired, from the welcome it received.
    pub fn from_welcome(welcome: Welcome, me: DeviceId, secret: DeviceSecret) -> Option<Self> {
        let members: BTreeMap<DeviceId, Member> =
            welcome.members.into_iter().map(|m| (m.id, m)).collect();
        if members.get(&me)?.public_key != secret.public_key() {
            return None;
        }
        let state = EpochState {
            key: welcome.key,
            earlier_keys: Vec::new(),
            members,
            proposals: Vec::new(),
        };
        Some(Self {
            channel: welcome.channel,
            me,
            secret,
            epochs: BTreeMap::from([(welcome.epoch, state)]),
            windows: HashMap::new(),
            next_seq: 1,
        })
    }

    /// The channel's id.
    pub fn channel(&self) -> ChannelId {
        self.channel
    }

    /// This device's id.
    pub fn me(&self) -> DeviceId {
        self.me
    }

    /// This device's static secret (for persisting device state).
    pub fn device_secret(&self) -> &DeviceSecret {
        &self.secret
    }

    /// The current (newest) epoch.
    pub fn epoch(&self) -> Epoch {
        *self
            .epochs
            .keys()
            .next_back()
            .expect("a keyring always has an epoch")
    }

    fn current(&self) -> &EpochState {
        self.epochs
            .values()
            .next_back()
            .expect("a keyring always has an epoch")
    }

    /// The current epoch's channel key (for tests and the published vectors).
    pub fn current_key(&self) -> &ChannelKey {
        &self.current().key
    }

    /// Every secret this keyring holds — the device's private key and each
    /// epoch's channel key — for the harness's secret scanner.
    #[cfg(feature = "testing")]
    pub fn secrets_for_scan(&self) -> Vec<(String, Vec<u8>)> {
        let mut secrets = vec![("device secret".to_owned(), self.secret.expose().to_vec())];
        for (epoch, state) in &self.epochs {
            secrets.push((
                format!("channel key of epoch {epoch}"),
                state.key.expose().to_vec(),
            ));
        }
        secrets
    }

    /// Members of the current epoch, ordered by id.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.current().members.values()
    }

    /// A member of any epoch this device holds, newest epoch first.
    pub fn member(&self, id: &DeviceId) -> Option<&Member> {
        self.epochs.values().rev().find_map(|e| e.members.get(id))
    }

    /// The welcome a newly paired device receives. Call after [`add_member`](Self::add_member).
    pub fn welcome(&self) -> Welcome {
        let current = self.current();
        Welcome {
            channel: self.channel,
            epoch: self.epoch(),
            key: current.key.duplicate(),
            inviter: self.me,
            members: current.members.values().cloned().collect(),
        }
    }

    /// Adds a newly paired device to the current epoch. It receives the current
    /// key (and with it, this epoch's history on the relay).
    pub fn add_member(&mut self, member: Member) -> Result<(), KeyringError> {
        let current = self
            .epochs
            .values_mut()
            .next_back()
            .expect("a keyring always has an epoch");
        if current.members.len() >= MAX_MEMBERS && !current.members.contains_key(&member.id) {
            return Err(KeyringError::ChannelFull);
        }
        current.members.insert(member.id, member);
        Ok(())
    }

    /// Sequence number the next [`seal`](Self::seal) will use.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Restores the sequence counter from persisted state.
    pub fn set_next_seq(&mut self, seq: u64) {
        self.next_seq = seq.max(1);
    }

    /// Seals `plaintext` as this device's next envelope in the current epoch.
    pub fn seal<R: rand::CryptoRng + ?Sized>(
        &mut self,
        plaintext: &[u8],
        rng: &mut R,
    ) -> Result<Vec<u8>, SealError> {
        self.seal_in(self.epoch(), plaintext, rng)
    }

    /// Seals `plaintext` in an epoch this device holds (the current one, or an
    /// earlier one: a rekey travels under the key the other members still use).
    pub fn seal_in<R: rand::CryptoRng + ?Sized>(
        &mut self,
        epoch: Epoch,
        plaintext: &[u8],
        rng: &mut R,
    ) -> Result<Vec<u8>, SealError> {
        let state = self
            .epochs
            .get(&epoch)
            .ok_or(SealError::UnknownEpoch(epoch))?;
        let header = EnvelopeHeader {
            channel: self.channel,
            epoch,
            sender: self.me,
            seq: self.next_seq,
        };
        let key = state.key.sender_key(&self.channel, epoch, &self.me);
        let sealed = envelope::seal(&key, &header, plaintext, rng)?;
        self.next_seq += 1;
        Ok(sealed)
    }

    /// Opens an envelope: right channel, a known epoch, a sender that is a member
    /// of that epoch, a sequence number not seen before, and a valid tag. Only an
    /// envelope that passes all of these moves the sender's replay window.
    pub fn open(&mut self, bytes: &[u8]) -> Result<Opened, OpenError> {
        let header = EnvelopeHeader::decode(bytes)?;
        if header.channel != self.channel {
            return Err(OpenError::WrongChannel);
        }
        let state = self
            .epochs
            .get(&header.epoch)
            .ok_or(OpenError::UnknownEpoch(header.epoch))?;
        if !state.members.contains_key(&header.sender) {
            return Err(OpenError::UnknownSender(header.sender));
        }
        let window = self
            .windows
            .get(&header.sender)
            .cloned()
            .unwrap_or_default();
        let admission = window.check(header.seq).map_err(|refusal| match refusal {
            Refusal::Replay => OpenError::Replay {
                sender: header.sender,
                seq: header.seq,
            },
            Refusal::Reordered => OpenError::Reordered {
                sender: header.sender,
                seq: header.seq,
            },
            Refusal::TooOld => OpenError::TooOld {
                sender: header.sender,
                seq: header.seq,
            },
        })?;
        let key = state
            .key
            .sender_key(&self.channel, header.epoch, &header.sender);
        let plaintext = envelope::open(&key, bytes)?;
        self.windows
            .entry(header.sender)
            .or_default()
            .record(header.seq);
        let gap = match admission {
            Admission::Gap { missing } => Some(missing),
            Admission::InOrder => None,
        };
        Ok(Opened {
            header,
            plaintext,
            gap,
        })
    }

    /// Removes `removed` from the channel: draws the next epoch's key, adopts it,
    /// and returns the rekey message to publish (sealed to each remaining member).
    pub fn rekey_removing<R: rand::CryptoRng + ?Sized>(
        &mut self,
        removed: &[DeviceId],
        rng: &mut R,
    ) -> Result<Rekey, KeyringError> {
        if removed.contains(&self.me) {
            return Err(KeyringError::RemovingSelf);
        }
        let epoch = self
            .epoch()
            .checked_add(1)
            .ok_or(KeyringError::EpochsExhausted)?;
        let members: BTreeMap<DeviceId, Member> = self
            .current()
            .members
            .iter()
            .filter(|(id, _)| !removed.contains(id))
            .map(|(id, m)| (*id, m.clone()))
            .collect();
        let key = ChannelKey::generate(rng);
        let publics: Vec<_> = members.values().map(|m| (m.id, m.public_key)).collect();
        let rekey = Rekey::seal(
            self.channel,
            epoch,
            self.me,
            &self.secret,
            &publics,
            &key,
            rng,
        )?;
        let proposal = Proposal {
            precedence: rekey.precedence(),
            key: key.duplicate(),
        };
        self.epochs.insert(
            epoch,
            EpochState {
                key,
                earlier_keys: Vec::new(),
                members,
                proposals: vec![proposal],
            },
        );
        Ok(rekey)
    }

    /// Applies a rekey received from another member: adopts the next epoch, or
    /// combines a concurrent proposal for the current one (see the module docs).
    /// A rekey that removes this device is refused with [`RekeyError::Removed`]
    /// and changes nothing.
    pub fn apply_rekey(&mut self, rekey: &Rekey) -> Result<RekeyOutcome, KeyringError> {
        if rekey.channel != self.channel {
            return Err(KeyringError::WrongChannel);
        }
        let current = self.epoch();
        let concurrent = rekey.epoch == current && !self.current().proposals.is_empty();
        if !concurrent && Some(rekey.epoch) != current.checked_add(1) {
            return Err(if rekey.epoch > current {
                KeyringError::EpochGap {
                    current,
                    got: rekey.epoch,
                }
            } else {
                KeyringError::Stale {
                    current,
                    got: rekey.epoch,
                }
            });
        }
        let precedence = rekey.precedence();
        if concurrent
            && self
                .current()
                .proposals
                .iter()
                .any(|p| p.precedence == precedence)
        {
            return Ok(RekeyOutcome::Duplicate);
        }
        let base = rekey
            .epoch
            .checked_sub(1)
            .and_then(|e| self.epochs.get(&e))
            .ok_or(KeyringError::Stale {
                current,
                got: rekey.epoch,
            })?;
        let sender = base
            .members
            .get(&rekey.from)
            .ok_or(KeyringError::NotAMember(rekey.from))?;
        if let Some(added) = rekey
            .members
            .iter()
            .find(|id| !base.members.contains_key(id))
        {
            return Err(KeyringError::AddsMember(*added));
        }
        let key = rekey.open(&self.me, &self.secret, &sender.public_key)?;
        let proposal = Proposal { precedence, key };
        if !concurrent {
            let members = base
                .members
                .iter()
                .filter(|(id, _)| rekey.members.contains(id))
                .map(|(id, m)| (*id, m.clone()))
                .collect();
            self.epochs.insert(
                rekey.epoch,
                EpochState {
                    key: proposal.key.duplicate(),
                    earlier_keys: Vec::new(),
                    members,
                    proposals: vec![proposal],
                },
            );
            return Ok(RekeyOutcome::Adopted { epoch: rekey.epoch });
        }
        let channel = self.channel;
        let state = self
            .epochs
            .get_mut(&rekey.epoch)
            .expect("concurrent implies the epoch exists");
        state.proposals.push(proposal);
        state.proposals.sort_by_key(|p| p.precedence);
        let combined = combine(&channel, rekey.epoch, &state.proposals);
        state
            .earlier_keys
            .push(std::mem::replace(&mut state.key, combined));
        state.members.retain(|id, _| rekey.members.contains(id));
        Ok(RekeyOutcome::Combined {
            epoch: rekey.epoch,
            proposals: state.proposals.len(),
        })
    }
}

/// The key of an epoch with several proposals (sorted by precedence).
fn combine(channel: &ChannelId, epoch: Epoch, proposals: &[Proposal]) -> ChannelKey {
    let ikm = Zeroizing::new(
        proposals
            .iter()
            .flat_map(|p| *p.key.expose())
            .collect::<Vec<u8>>(),
    );
    ChannelKey::from_bytes(hkdf_sha256(
        channel.as_bytes(),
        &ikm,
        &[LABEL_REKEY_COMBINE, &epoch.to_be_bytes()],
    ))
}
