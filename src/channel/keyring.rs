//! A device's view of its channel: keys per epoch, members per epoch, its own
//! sequence counter and a replay window per sender. Pure state: the SDK persists
//! it and feeds it envelopes and rekeys; nothing here does I/O.

use std::collections::{BTreeMap, HashMap};
use std::ops::RangeInclusive;

use crate::crypto::envelope::{self, ChannelKey, EnvelopeHeader, OpenError, SealError};
use crate::crypto::pairwise::DeviceSecret;
use crate::crypto::rekey::{MAX_MEMBERS, Rekey, RekeyError};
use crate::crypto::replay::{Admission, Refusal, ReplayWindow};
use crate::ids::{ChannelId, DeviceId, Epoch};

use super::member::Member;
use super::welcome::Welcome;

/// The key and members of one epoch.
struct EpochState {
    key: ChannelKey,
    members: BTreeMap<DeviceId, Member>,
    /// The rekey that started this epoch, for resolving concurrent rekeys.
    /// `None` for an epoch created or welcomed into locally.
    origin: Option<Origin>,
}

/// Who started an epoch and what their proposal removed.
struct Origin {
    precedence: (DeviceId, [u8; 32]),
    removed: Vec<DeviceId>,
}

/// An envelope that opened: its routing fields, plaintext and what its sequence
/// number says about missing envelopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The authenticated header.
    pub header: EnvelopeHeader,
    /// The application's bytes.
    pub plaintext: Vec<u8>,
    /// Sequence numbers of this sender that were skipped and have not arrived.
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
    /// A competing rekey of the current epoch took precedence over the one this
    /// device had adopted; the current key changed.
    Replaced {
        /// The epoch whose key changed.
        epoch: Epoch,
        /// Author of the proposal that lost.
        loser: DeviceId,
        /// Devices the losing proposal removed that the winner kept: the loser
        /// should remove them again with a rekey of the next epoch.
        still_to_remove: Vec<DeviceId>,
    },
    /// This rekey lost to the one already adopted for its epoch. Nothing changed.
    Superseded {
        /// The contested epoch.
        epoch: Epoch,
        /// Author of this (losing) proposal.
        loser: DeviceId,
        /// As in [`RekeyOutcome::Replaced`].
        still_to_remove: Vec<DeviceId>,
    },
    /// The same rekey was applied before. Nothing changed.
    Duplicate,
}

impl RekeyOutcome {
    /// If this device authored the losing proposal, the devices it must remove
    /// again (with [`Keyring::rekey_removing`]) for its removal to take effect.
    pub fn retry_removal_for(&self, me: &DeviceId) -> Option<&[DeviceId]> {
        match self {
            Self::Replaced {
                loser,
                still_to_remove,
                ..
            }
            | Self::Superseded {
                loser,
                still_to_remove,
                ..
            } if loser == me && !still_to_remove.is_empty() => Some(still_to_remove),
            _ => None,
        }
    }
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
    channel: ChannelId,
    me: DeviceId,
    secret: DeviceSecret,
    epochs: BTreeMap<Epoch, EpochState>,
    /// Per-sender replay windows; a sender's numbers run across epochs.
    windows: HashMap<DeviceId, ReplayWindow>,
    /// Sequence number of this device's next envelope.
    next_seq: u64,
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
            members: BTreeMap::from([(id, me)]),
            origin: None,
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
            members,
            origin: None,
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

    /// Members of the current epoch, ordered by id.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.current().members.values()
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
        let epoch = self.epoch();
        let header = EnvelopeHeader {
            channel: self.channel,
            epoch,
            sender: self.me,
            seq: self.next_seq,
        };
        let key = self
            .current()
            .key
            .sender_key(&self.channel, epoch, &self.me);
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
            Admission::InOrder | Admission::Late => None,
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
        let current = self.current();
        let members: BTreeMap<DeviceId, Member> = current
            .members
            .iter()
            .filter(|(id, _)| !removed.contains(id))
            .map(|(id, m)| (*id, m.clone()))
            .collect();
        let removed: Vec<DeviceId> = current
            .members
            .keys()
            .filter(|id| !members.contains_key(id))
            .copied()
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
        let origin = Origin {
            precedence: rekey.precedence(),
            removed,
        };
        self.epochs.insert(
            epoch,
            EpochState {
                key,
                members,
                origin: Some(origin),
            },
        );
        Ok(rekey)
    }

    /// Applies a rekey received from another member. A rekey of the next epoch is
    /// adopted; a competing rekey of the current epoch replaces the adopted one
    /// only if it takes precedence, so every member ends on the same key.
    pub fn apply_rekey(&mut self, rekey: &Rekey) -> Result<RekeyOutcome, KeyringError> {
        if rekey.channel != self.channel {
            return Err(KeyringError::WrongChannel);
        }
        let current = self.epoch();
        let contested = rekey.epoch == current && self.current().origin.is_some();
        if !contested && rekey.epoch != current.wrapping_add(1) {
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
        let base_epoch = rekey
            .epoch
            .checked_sub(1)
            .ok_or(KeyringError::Stale { current, got: 0 })?;
        let base = self.epochs.get(&base_epoch).ok_or(KeyringError::Stale {
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
        let precedence = rekey.precedence();
        let removed: Vec<DeviceId> = base
            .members
            .keys()
            .filter(|id| !rekey.members.contains(id))
            .copied()
            .collect();

        if contested {
            let adopted = self
                .current()
                .origin
                .as_ref()
                .expect("contested implies an origin");
            if adopted.precedence == precedence {
                return Ok(RekeyOutcome::Duplicate);
            }
            if adopted.precedence < precedence {
                let still_to_remove = still_present(&removed, &self.current().members);
                return Ok(RekeyOutcome::Superseded {
                    epoch: rekey.epoch,
                    loser: rekey.from,
                    still_to_remove,
                });
            }
        }

        let key = rekey.open(&self.me, &self.secret, &sender.public_key)?;
        let members: BTreeMap<DeviceId, Member> = base
            .members
            .iter()
            .filter(|(id, _)| rekey.members.contains(id))
            .map(|(id, m)| (*id, m.clone()))
            .collect();
        let previous = self.epochs.insert(
            rekey.epoch,
            EpochState {
                key,
                members,
                origin: Some(Origin {
                    precedence,
                    removed,
                }),
            },
        );
        Ok(match previous.and_then(|p| p.origin) {
            Some(lost) => RekeyOutcome::Replaced {
                epoch: rekey.epoch,
                loser: lost.precedence.0,
                still_to_remove: still_present(&lost.removed, &self.current().members),
            },
            None => RekeyOutcome::Adopted { epoch: rekey.epoch },
        })
    }
}

/// The devices in `removed` that are still members.
fn still_present(removed: &[DeviceId], members: &BTreeMap<DeviceId, Member>) -> Vec<DeviceId> {
    removed
        .iter()
        .filter(|id| members.contains_key(id))
        .copied()
        .collect()
}
