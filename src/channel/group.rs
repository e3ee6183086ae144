//! One device's MLS group for its channel: create or join, seal, take in, and
//! commit adds, removals and updates — with no I/O. The caller loads a
//! [`Channel`] from the rows of its state file, drives it, and writes back what
//! [`Channel::save`] returns in the same transaction.
//!
//! What khub adds to MLS (RFC 9420), all in the channel's terms:
//!
//! - **Envelopes.** Every MLS message travels as `header || MLSMessage`, where
//!   the header is the relay-visible routing header
//!   ([`EnvelopeHeader`]) and the MLS message is a `PrivateMessage` whose
//!   authenticated data is `header || epoch fingerprint(16)`. The header is
//!   checked against the message: same epoch, same sender (the MLS sender's
//!   credential names the device id), same bytes.
//! - **Order.** The relay's per-channel order is the delivery service's order:
//!   the first commit of an epoch in relay order wins, and a device whose own
//!   commit lost re-issues its intent in the next epoch by itself.
//! - **Late messages.** Application messages of the last
//!   [`PAST_EPOCHS`] epochs still open (MLS keeps those epochs' message
//!   secrets), but only from senders that are still members now: a removed
//!   device's old-epoch messages are refused.
//! - **Forks.** Each epoch has a fingerprint (an MLS exporter value) that
//!   every message carries in its authenticated data. A message that claims an
//!   epoch this device holds with another fingerprint comes from a history this
//!   device did not follow: a [`RefusalKind::Fork`].

use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use serde::{Deserialize, Serialize};

use super::member::{MAX_NAME_LEN, validate_name};
use super::provider::{MlsProvider, Row, StorageChanges};
use crate::crypto::envelope::{self, EnvelopeHeader, HEADER_LEN, MAX_PLAINTEXT_LEN, OpenError};
use crate::ids::{ChannelId, DeviceId, Epoch, ID_LEN};

/// The one ciphersuite khub speaks: X25519, ChaCha20-Poly1305, SHA-256, Ed25519.
pub const CIPHERSUITE: Ciphersuite =
    Ciphersuite::MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519;
/// How many past epochs' message secrets a device keeps for late application
/// messages, unless [`Channel::set_past_epochs`] says otherwise. Older ones
/// are deleted: forward secrecy for everything before.
pub const PAST_EPOCHS: usize = 3;
/// The most past epochs a device may be set to keep.
pub const MAX_PAST_EPOCHS: usize = 16;
/// A device commits an update of its own leaf after this many messages…
pub const UPDATE_AFTER_MESSAGES: u64 = 1000;
/// …or once this many seconds have passed since its last one (a week).
pub const UPDATE_AFTER_SECS: u64 = 7 * 24 * 3600;
/// Length of the epoch fingerprint in each message's authenticated data.
pub const FINGERPRINT_LEN: usize = 16;
/// MLS exporter label of the epoch fingerprint.
pub const LABEL_FINGERPRINT: &str = "khub/v2/epoch-fingerprint";
/// A removal that loses this many races in a row is reported as blocked.
const BLOCKED_AFTER: u32 = 3;
/// Fingerprints of at most this many epochs are kept (for fork detection).
const FINGERPRINTS_KEPT: usize = 64;
/// Storage key prefix of the snapshots of past epochs' group state (khub's own
/// rows, followed by the epoch as u64 BE; OpenMLS's keys are JSON and never
/// start with this).
const SNAPSHOT_PREFIX: &[u8] = b"khub/epoch-snapshot/";
/// Snapshots of at most this many past epochs are kept, to check commits
/// that lost a race but reached the relay after later commits.
const SNAPSHOTS_KEPT: usize = 3;

fn snapshot_key(epoch: u64) -> Vec<u8> {
    [SNAPSHOT_PREFIX, &epoch.to_be_bytes()].concat()
}

/// Why the channel could not do what was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// The caller asked for something impossible (too large, unknown device…).
    #[error("{0}")]
    Invalid(String),
    /// This device was removed from the channel.
    #[error("this device was removed from the channel; pair it again")]
    Removed,
    /// The stored state does not load: the state file is damaged.
    #[error("the channel state does not load ({0}); the state file is damaged")]
    Corrupt(String),
    /// Something the peer sent during pairing is not valid MLS.
    #[error("the other device sent an invalid {what}: {detail}")]
    Peer {
        /// What it was.
        what: &'static str,
        /// Why it was refused.
        detail: String,
    },
    /// OpenMLS failed where it should not have (a bug here or there).
    #[error("MLS error: {0}")]
    Mls(String),
}

fn mls(e: impl std::fmt::Display) -> ChannelError {
    ChannelError::Mls(e.to_string())
}

/// Why an envelope was refused. Every refusal becomes an incident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RefusalKind {
    /// Not an envelope, not an MLS private message, or undecodable inside.
    Malformed,
    /// An envelope of protocol 1 (before MLS).
    OldProtocol,
    /// Sealed for another channel.
    Foreign,
    /// Failed authentication: bad signature or tag, or a header that does not
    /// match the message it carries.
    Tampered,
    /// Claims a sender other than the one that signed it.
    Forged,
    /// A sender sequence number at or below one already taken in.
    Replayed,
    /// From an epoch this device never reached or no longer keeps.
    UnknownEpoch,
    /// From a device that is not a member of the channel now.
    RemovedSender,
    /// From a history of the channel this device did not follow.
    Fork,
    /// A valid message of a kind khub does not use (a standalone proposal).
    Unexpected,
    /// Sequence numbers of a sender were skipped: those envelopes were dropped.
    Gap,
    /// The relay would not store one of this device's own envelopes.
    NotPublished,
    /// A commit for an epoch already settled by another commit: a lost race,
    /// or an injection; either way ignored.
    StaleCommit,
    /// This device's removal of a member keeps losing to other commits.
    Blocked,
    /// Note changes that build on history this device has not seen (a note
    /// it never had, with no snapshot covering it): kept aside until a
    /// snapshot or the missing changes arrive.
    MissingHistory,
    /// The relay's newest sequence number is behind this device's cursor (it
    /// was restored from an older backup, or numbered envelopes it did not
    /// keep): the cursor went back to it, so that what the relay numbers
    /// again is taken in rather than skipped.
    RelayRewound,
}

impl RefusalKind {
    /// The name used in JSON and in the state file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::OldProtocol => "old_protocol",
            Self::Foreign => "foreign",
            Self::Tampered => "tampered",
            Self::Forged => "forged",
            Self::Replayed => "replayed",
            Self::UnknownEpoch => "unknown_epoch",
            Self::RemovedSender => "removed_sender",
            Self::Fork => "fork",
            Self::Unexpected => "unexpected",
            Self::Gap => "gap",
            Self::NotPublished => "not_published",
            Self::StaleCommit => "stale_commit",
            Self::Blocked => "blocked",
            Self::MissingHistory => "missing_history",
            Self::RelayRewound => "relay_rewound",
        }
    }

    /// Parses [`as_str`](Self::as_str)'s names (unknown names read as malformed).
    pub fn parse(name: &str) -> Self {
        [
            Self::OldProtocol,
            Self::Foreign,
            Self::Tampered,
            Self::Forged,
            Self::Replayed,
            Self::UnknownEpoch,
            Self::RemovedSender,
            Self::Fork,
            Self::Unexpected,
            Self::Gap,
            Self::NotPublished,
            Self::StaleCommit,
            Self::Blocked,
            Self::MissingHistory,
            Self::RelayRewound,
        ]
        .into_iter()
        .find(|k| k.as_str() == name)
        .unwrap_or(Self::Malformed)
    }
}

/// A refused envelope (or a gap before one that was taken in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// What was wrong.
    pub kind: RefusalKind,
    /// The sender the header claimed, when it could be read.
    pub sender: Option<DeviceId>,
    /// For people.
    pub detail: String,
}

impl Refusal {
    fn new(kind: RefusalKind, sender: Option<DeviceId>, detail: impl Into<String>) -> Self {
        Self {
            kind,
            sender,
            detail: detail.into(),
        }
    }
}

/// A member as this device knows it: its id and the name in its credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The device's id.
    pub id: DeviceId,
    /// The name its owner gave it ("laptop", "phone").
    pub name: String,
}

/// A change of membership this device committed and is waiting to see in
/// relay order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Intent {
    /// Add the device with this id (its KeyPackage came through pairing).
    Add(DeviceId),
    /// Remove these devices.
    Remove(Vec<DeviceId>),
    /// Update this device's own leaf (post-compromise security).
    Update,
}

/// An envelope to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Its sender sequence number.
    pub seq: u64,
    /// The envelope.
    pub envelope: Vec<u8>,
}

/// What an envelope that was taken in meant.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// An application payload from another member.
    App {
        /// Its sender.
        sender: Member,
        /// The payload.
        plaintext: Vec<u8>,
    },
    /// A commit from another member, applied.
    Commit {
        /// Who committed.
        by: DeviceId,
        /// Devices added.
        added: Vec<DeviceId>,
        /// Devices removed.
        removed: Vec<DeviceId>,
    },
    /// This device's own commit came back first in relay order and now holds.
    OwnCommit(Intent),
    /// This device's own commit lost to another's for the same epoch; the intent
    /// was re-issued (if still wanted) in the `outgoing` of the result.
    OwnCommitLost(Intent),
    /// A commit removed this device.
    RemovedMe {
        /// Who removed it.
        by: DeviceId,
    },
    /// Nothing for this device: its own message coming back, a commit that lost
    /// its epoch's race (checked), or an envelope sealed before this device
    /// joined (which it cannot read, and which can change nothing).
    Nothing,
}

/// The result of taking in one envelope.
#[derive(Debug, Default)]
pub struct TakenIn {
    /// What it meant, if it was taken in.
    pub event: Option<Event>,
    /// Refusals and gaps to record.
    pub refusals: Vec<Refusal>,
    /// Envelopes to publish as a consequence (a re-issued commit).
    pub outgoing: Vec<Outgoing>,
}

/// This device's own commit, published, not yet seen in relay order.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    epoch: u64,
    seq: u64,
    envelope: Vec<u8>,
    intent: Intent,
    /// How many times in a row this intent lost its epoch's race.
    #[serde(default)]
    losses: u32,
}

/// khub's own state beside the MLS group, stored as JSON next to the MLS rows.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    channel: ChannelId,
    me: DeviceId,
    /// The public half of the signature key, to find the key pair in storage.
    signature_key: Vec<u8>,
    /// The next sender sequence number this device will use.
    next_seq: u64,
    /// The highest sender sequence number taken in, per sender.
    last_seq: Vec<(DeviceId, u64)>,
    /// Fingerprints of the epochs this device held, newest last.
    fingerprints: Vec<(u64, [u8; FINGERPRINT_LEN])>,
    pending: Option<Pending>,
    /// The epoch this device created or joined the channel in: it never had
    /// the secrets of earlier ones.
    #[serde(default)]
    joined_epoch: u64,
    /// How many past epochs' message secrets are kept.
    #[serde(default = "default_past_epochs")]
    past_epochs: usize,
    /// Messages sealed since this device last updated its leaf.
    sealed_since_update: u64,
    /// When it last did (seconds since the Unix epoch).
    updated_at: u64,
    removed: bool,
}

fn default_past_epochs() -> usize {
    PAST_EPOCHS
}

/// The device's channel: its MLS group, signature key and khub's state.
pub struct Channel {
    provider: MlsProvider,
    group: MlsGroup,
    signer: SignatureKeyPair,
    meta: Meta,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("channel", &self.meta.channel)
            .field("me", &self.meta.me)
            .field("epoch", &self.group.epoch().as_u64())
            .finish_non_exhaustive()
    }
}

/// The credential of a device: its 16-byte id, then its name (UTF-8).
fn credential(me: DeviceId, name: &str) -> Credential {
    BasicCredential::new([me.as_bytes(), name.as_bytes()].concat()).into()
}

/// Reads a credential [`credential`] wrote.
fn member_of(credential: &Credential) -> Option<Member> {
    let basic = BasicCredential::try_from(credential.clone()).ok()?;
    let identity = basic.identity();
    if identity.len() < ID_LEN || identity.len() > ID_LEN + MAX_NAME_LEN {
        return None;
    }
    let id = DeviceId::from_slice(&identity[..ID_LEN])?;
    let name = std::str::from_utf8(&identity[ID_LEN..]).ok()?;
    validate_name(name).ok()?;
    Some(Member {
        id,
        name: name.to_owned(),
    })
}

fn join_config(past_epochs: usize) -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
        .max_past_epochs(past_epochs)
        .use_ratchet_tree_extension(true)
        .build()
}

fn new_signer(provider: &MlsProvider) -> Result<SignatureKeyPair, ChannelError> {
    let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).map_err(mls)?;
    signer.store(provider.storage()).map_err(mls)?;
    Ok(signer)
}

impl Channel {
    /// A new channel with this device as its only member.
    pub fn create(
        channel: ChannelId,
        me: DeviceId,
        name: &str,
        now: u64,
    ) -> Result<Self, ChannelError> {
        validate_name(name).map_err(|e| ChannelError::Invalid(e.to_string()))?;
        let provider = MlsProvider::load([]);
        let signer = new_signer(&provider)?;
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
            .max_past_epochs(PAST_EPOCHS)
            .use_ratchet_tree_extension(true)
            .build();
        let with_key = CredentialWithKey {
            credential: credential(me, name),
            signature_key: signer.public().into(),
        };
        let group = MlsGroup::new_with_group_id(
            &provider,
            &signer,
            &config,
            GroupId::from_slice(channel.as_bytes()),
            with_key,
        )
        .map_err(mls)?;
        Self::assemble(provider, group, signer, channel, me, now)
    }

    fn assemble(
        provider: MlsProvider,
        group: MlsGroup,
        signer: SignatureKeyPair,
        channel: ChannelId,
        me: DeviceId,
        now: u64,
    ) -> Result<Self, ChannelError> {
        let mut channel = Self {
            meta: Meta {
                channel,
                me,
                signature_key: signer.public().to_vec(),
                next_seq: 1,
                last_seq: Vec::new(),
                fingerprints: Vec::new(),
                pending: None,
                joined_epoch: group.epoch().as_u64(),
                past_epochs: PAST_EPOCHS,
                sealed_since_update: 0,
                updated_at: now,
                removed: false,
            },
            provider,
            group,
            signer,
        };
        channel.remember_fingerprint()?;
        Ok(channel)
    }

    /// Loads a channel from its stored JSON and MLS rows.
    pub fn load(meta: &[u8], rows: impl IntoIterator<Item = Row>) -> Result<Self, ChannelError> {
        let meta: Meta =
            serde_json::from_slice(meta).map_err(|e| ChannelError::Corrupt(e.to_string()))?;
        let provider = MlsProvider::load(rows);
        let corrupt = |what: &str| ChannelError::Corrupt(what.to_owned());
        let group = MlsGroup::load(
            provider.storage(),
            &GroupId::from_slice(meta.channel.as_bytes()),
        )
        .map_err(|e| ChannelError::Corrupt(e.to_string()))?
        .ok_or_else(|| corrupt("no MLS group"))?;
        let signer = SignatureKeyPair::read(
            provider.storage(),
            &meta.signature_key,
            CIPHERSUITE.signature_algorithm(),
        )
        .ok_or_else(|| corrupt("no signature key"))?;
        Ok(Self {
            provider,
            group,
            signer,
            meta,
        })
    }

    /// What to store: khub's JSON, and the MLS rows that changed since the
    /// load or the last save.
    pub fn save(&mut self) -> (Vec<u8>, StorageChanges) {
        let meta = serde_json::to_vec(&self.meta).expect("plain data serialises");
        (meta, self.provider.changes())
    }

    /// Secrets this device holds that must never reach the relay, for the
    /// harness's secret scanner: the signature private key, and this epoch's
    /// value of an MLS exporter (standing for the epoch's secrets, which
    /// OpenMLS does not hand out).
    #[cfg(feature = "testing")]
    pub fn secrets_for_scan(&self) -> Vec<(String, Vec<u8>)> {
        let mut secrets = vec![(
            "MLS signature private key".to_owned(),
            self.signer.private().to_vec(),
        )];
        if let Ok(exported) =
            self.group
                .export_secret(self.provider.crypto(), "khub/testing/scan", &[], 32)
        {
            secrets.push(("MLS exporter secret".to_owned(), exported));
        }
        secrets
    }

    /// The channel's id.
    pub fn channel(&self) -> ChannelId {
        self.meta.channel
    }

    /// This device's id.
    pub fn me(&self) -> DeviceId {
        self.meta.me
    }

    /// Keeps the message secrets of the last `past_epochs` epochs (0 to
    /// [`MAX_PAST_EPOCHS`]) for late messages, deleting older ones now: fewer
    /// is more forward secrecy, more tolerates later messages.
    pub fn set_past_epochs(&mut self, past_epochs: usize) -> Result<(), ChannelError> {
        if past_epochs > MAX_PAST_EPOCHS {
            return Err(ChannelError::Invalid(format!(
                "keep at most {MAX_PAST_EPOCHS} past epochs, not {past_epochs}"
            )));
        }
        self.group
            .set_configuration(self.provider.storage(), &join_config(past_epochs))
            .map_err(mls)?;
        self.meta.past_epochs = past_epochs;
        Ok(())
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.group.epoch().as_u64()
    }

    /// Whether a commit removed this device.
    pub fn is_removed(&self) -> bool {
        self.meta.removed
    }

    /// The commit this device published and has not yet seen in relay order.
    pub fn pending(&self) -> Option<&Intent> {
        self.meta.pending.as_ref().map(|p| &p.intent)
    }

    /// The members of the current epoch.
    pub fn members(&self) -> Vec<Member> {
        self.group
            .members()
            .filter_map(|m| member_of(&m.credential))
            .collect()
    }

    /// The member `id` of the current epoch, if it is one.
    pub fn member(&self, id: DeviceId) -> Option<Member> {
        self.members().into_iter().find(|m| m.id == id)
    }

    fn leaf_of(&self, id: DeviceId) -> Option<LeafNodeIndex> {
        self.group
            .members()
            .find(|m| member_of(&m.credential).is_some_and(|m| m.id == id))
            .map(|m| m.index)
    }

    fn fingerprint(&self) -> Result<[u8; FINGERPRINT_LEN], ChannelError> {
        let bytes = self
            .group
            .export_secret(
                self.provider.crypto(),
                LABEL_FINGERPRINT,
                &[],
                FINGERPRINT_LEN,
            )
            .map_err(mls)?;
        bytes
            .try_into()
            .map_err(|_| ChannelError::Mls("short exporter output".into()))
    }

    fn remember_fingerprint(&mut self) -> Result<(), ChannelError> {
        let fingerprint = self.fingerprint()?;
        let epoch = self.epoch();
        self.meta.fingerprints.retain(|(e, _)| *e != epoch);
        self.meta.fingerprints.push((epoch, fingerprint));
        let excess = self
            .meta
            .fingerprints
            .len()
            .saturating_sub(FINGERPRINTS_KEPT);
        self.meta.fingerprints.drain(..excess);
        Ok(())
    }

    fn known_fingerprint(&self, epoch: u64) -> Option<[u8; FINGERPRINT_LEN]> {
        self.meta
            .fingerprints
            .iter()
            .find(|(e, _)| *e == epoch)
            .map(|(_, f)| *f)
    }

    /// The header and authenticated data for this device's next envelope.
    fn next_header(&mut self) -> Result<(EnvelopeHeader, Vec<u8>), ChannelError> {
        if self.meta.removed {
            return Err(ChannelError::Removed);
        }
        let epoch = Epoch::try_from(self.epoch())
            .map_err(|_| ChannelError::Invalid("the channel ran out of epochs".into()))?;
        let header = EnvelopeHeader {
            channel: self.meta.channel,
            epoch,
            sender: self.meta.me,
            seq: self.meta.next_seq,
        };
        let aad = [&header.encode()[..], &self.fingerprint()?].concat();
        self.meta.next_seq += 1;
        Ok((header, aad))
    }

    fn envelope(
        header: &EnvelopeHeader,
        message: &MlsMessageOut,
    ) -> Result<Outgoing, ChannelError> {
        let mut envelope = header.encode().to_vec();
        message
            .tls_serialize(&mut envelope)
            .map_err(|e| ChannelError::Mls(e.to_string()))?;
        Ok(Outgoing {
            seq: header.seq,
            envelope,
        })
    }

    /// Seals an application payload (padded, signed, encrypted) as this
    /// device's next envelope.
    pub fn seal(&mut self, plaintext: &[u8]) -> Result<Outgoing, ChannelError> {
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(ChannelError::Invalid(format!(
                "message of {} bytes is larger than the {MAX_PLAINTEXT_LEN}-byte limit; split it",
                plaintext.len()
            )));
        }
        let (header, aad) = self.next_header()?;
        let padded = envelope::pad(plaintext);
        self.group.set_aad(aad);
        let message = self
            .group
            .create_message(&self.provider, &self.signer, &padded)
            .map_err(|e| match e {
                CreateMessageError::GroupStateError(MlsGroupStateError::UseAfterEviction) => {
                    ChannelError::Removed
                }
                e => mls(e),
            })?;
        self.meta.sealed_since_update += 1;
        Self::envelope(&header, &message)
    }

    /// Seals `plaintext` again as this device's envelope `seq`, in the
    /// current epoch: a message sealed in an epoch that ended before the relay
    /// stored it. Members keep only the last few epochs' secrets, so stored
    /// behind too many commits it could no longer be read. The sender number
    /// stays, so members see no gap, and the relay, which stores each sender
    /// number once, never stores both.
    pub fn reseal(&mut self, seq: u64, plaintext: &[u8]) -> Result<Outgoing, ChannelError> {
        if seq == 0 || seq >= self.meta.next_seq {
            return Err(ChannelError::Invalid(format!(
                "envelope {seq} was never sealed by this device"
            )));
        }
        let (next, since_update) = (self.meta.next_seq, self.meta.sealed_since_update);
        self.meta.next_seq = seq;
        let sealed = self.seal(plaintext);
        (self.meta.next_seq, self.meta.sealed_since_update) = (next, since_update);
        sealed
    }

    /// Seals like [`seal`](Self::seal) but names `sender` and sequence number
    /// `seq` in the header: what a member trying to speak as another, or to
    /// lock a sender out, would send. For attack tests only.
    #[cfg(feature = "testing")]
    pub fn seal_as_for_testing_only(
        &mut self,
        sender: DeviceId,
        seq: u64,
        plaintext: &[u8],
    ) -> Result<Outgoing, ChannelError> {
        let (me, next) = (self.meta.me, self.meta.next_seq);
        (self.meta.me, self.meta.next_seq) = (sender, seq);
        let sealed = self.seal(plaintext);
        (self.meta.me, self.meta.next_seq) = (me, next);
        sealed
    }

    /// Makes `seq` this device's next sender sequence number: a copy of a
    /// device's state that goes on sending. For tests only.
    #[cfg(feature = "testing")]
    pub fn set_next_seq_for_testing_only(&mut self, seq: u64) {
        self.meta.next_seq = seq;
    }

    /// Every MLS storage row of this channel, to load a copy of it. For tests only.
    #[cfg(feature = "testing")]
    pub fn rows_for_testing_only(&self) -> Vec<Row> {
        self.provider.rows()
    }

    /// The relay refused this device's envelope `seq` for good: if it was the
    /// pending commit, that change is dropped (and returned) so the device can
    /// commit again.
    pub fn abandon(&mut self, seq: u64) -> Result<Option<Intent>, ChannelError> {
        if self.meta.pending.as_ref().is_none_or(|p| p.seq != seq) {
            return Ok(None);
        }
        self.group
            .clear_pending_commit(self.provider.storage())
            .map_err(mls)?;
        Ok(self.meta.pending.take().map(|p| p.intent))
    }

    /// Whether this device should commit an update of its own leaf now.
    pub fn needs_update(&self, now: u64) -> bool {
        !self.meta.removed
            && self.meta.pending.is_none()
            && (self.meta.sealed_since_update >= UPDATE_AFTER_MESSAGES
                || now.saturating_sub(self.meta.updated_at) >= UPDATE_AFTER_SECS)
    }

    fn ready_to_commit(&self) -> Result<(), ChannelError> {
        if self.meta.removed {
            return Err(ChannelError::Removed);
        }
        if let Some(pending) = &self.meta.pending {
            return Err(ChannelError::Invalid(format!(
                "this device's last change ({:?}) is not settled yet; take in the channel first",
                pending.intent
            )));
        }
        Ok(())
    }

    fn pend(
        &mut self,
        header: &EnvelopeHeader,
        commit: &MlsMessageOut,
        intent: Intent,
    ) -> Result<Outgoing, ChannelError> {
        let outgoing = Self::envelope(header, commit)?;
        self.meta.pending = Some(Pending {
            epoch: self.epoch(),
            seq: outgoing.seq,
            envelope: outgoing.envelope.clone(),
            intent,
            losses: 0,
        });
        Ok(outgoing)
    }

    /// Commits the addition of the device whose KeyPackage (TLS-encoded) came
    /// through pairing, claiming id `joiner`. Returns the commit to publish and
    /// the Welcome (TLS-encoded `MLSMessage`) for the joiner — valid only once
    /// the commit is seen first in relay order ([`Event::OwnCommit`]).
    pub fn commit_add(
        &mut self,
        joiner: DeviceId,
        key_package: &[u8],
    ) -> Result<(Outgoing, Vec<u8>), ChannelError> {
        self.ready_to_commit()?;
        let peer = |detail: String| ChannelError::Peer {
            what: "KeyPackage",
            detail,
        };
        let key_package = KeyPackageIn::tls_deserialize_exact(key_package)
            .map_err(|e| peer(e.to_string()))?
            .validate(self.provider.crypto(), ProtocolVersion::Mls10)
            .map_err(|e| peer(e.to_string()))?;
        if key_package.ciphersuite() != CIPHERSUITE {
            return Err(peer("not ciphersuite 0x0003".into()));
        }
        let named = member_of(key_package.leaf_node().credential())
            .ok_or_else(|| peer("its credential names no khub device".into()))?;
        if named.id != joiner {
            return Err(peer("its credential names another device".into()));
        }
        if self.leaf_of(joiner).is_some() {
            return Err(ChannelError::Invalid(format!(
                "device {joiner} is already a member"
            )));
        }
        let (header, aad) = self.next_header()?;
        self.group.set_aad(aad);
        let (commit, welcome, _) = self
            .group
            .add_members(&self.provider, &self.signer, &[key_package])
            .map_err(mls)?;
        let welcome = welcome.tls_serialize_detached().map_err(mls)?;
        let outgoing = self.pend(&header, &commit, Intent::Add(joiner))?;
        Ok((outgoing, welcome))
    }

    /// Commits the removal of `devices` (members of the current epoch).
    pub fn commit_remove(&mut self, devices: &[DeviceId]) -> Result<Outgoing, ChannelError> {
        self.ready_to_commit()?;
        if devices.contains(&self.meta.me) {
            return Err(ChannelError::Invalid(
                "a device cannot remove itself; remove it from another device".into(),
            ));
        }
        let leaves = devices
            .iter()
            .map(|d| {
                self.leaf_of(*d).ok_or_else(|| {
                    ChannelError::Invalid(format!("device {d} is not a member of the channel"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (header, aad) = self.next_header()?;
        self.group.set_aad(aad);
        let (commit, _, _) = self
            .group
            .remove_members(&self.provider, &self.signer, &leaves)
            .map_err(mls)?;
        self.pend(&header, &commit, Intent::Remove(devices.to_vec()))
    }

    /// Commits an update of this device's own leaf: fresh HPKE keys, so a
    /// past compromise of this device stops mattering from the next epoch on.
    pub fn commit_update(&mut self) -> Result<Outgoing, ChannelError> {
        self.ready_to_commit()?;
        let (header, aad) = self.next_header()?;
        self.group.set_aad(aad);
        let bundle = self
            .group
            .self_update(&self.provider, &self.signer, LeafNodeParameters::default())
            .map_err(mls)?;
        self.pend(&header, bundle.commit(), Intent::Update)
    }

    /// Takes in one envelope in relay order. `now` is the time in seconds
    /// since the Unix epoch (for the update schedule).
    pub fn take_in(&mut self, bytes: &[u8], now: u64) -> TakenIn {
        let mut taken = TakenIn::default();
        match self.take_in_inner(bytes, now, &mut taken) {
            Ok(event) => taken.event = Some(event),
            Err(refusal) => taken.refusals.push(refusal),
        }
        taken
    }

    fn take_in_inner(
        &mut self,
        bytes: &[u8],
        now: u64,
        taken: &mut TakenIn,
    ) -> Result<Event, Refusal> {
        let header = EnvelopeHeader::decode(bytes).map_err(|e| match e {
            // Protocol 1's envelopes were at least 117 bytes long.
            OpenError::UnsupportedVersion(1) if bytes.len() >= HEADER_LEN + 72 => Refusal::new(
                RefusalKind::OldProtocol,
                None,
                "an envelope of protocol 1: the device that sent it speaks protocol 1; pair it again",
            ),
            e => Refusal::new(RefusalKind::Malformed, None, e.to_string()),
        })?;
        let sender = Some(header.sender);
        let refuse = |kind, detail: &str| Refusal::new(kind, sender, detail);
        if header.channel != self.meta.channel {
            return Err(refuse(RefusalKind::Foreign, "sealed for another channel"));
        }
        if self.meta.removed {
            return Ok(Event::Nothing);
        }
        let message = MlsMessageIn::tls_deserialize_exact(&bytes[HEADER_LEN..])
            .map_err(|_| refuse(RefusalKind::Malformed, "the body is not an MLS message"))?;
        let MlsMessageBodyIn::PrivateMessage(private) = message.extract() else {
            return Err(refuse(
                RefusalKind::Malformed,
                "the body is not an MLS private message",
            ));
        };
        let epoch = private.epoch().as_u64();
        let aad = private.aad().to_vec();
        if epoch != u64::from(header.epoch)
            || aad.len() != HEADER_LEN + FINGERPRINT_LEN
            || aad[..HEADER_LEN] != header.encode()
        {
            return Err(refuse(
                RefusalKind::Tampered,
                "the header does not match the message it carries",
            ));
        }
        let is_commit = private.content_type() == ContentType::Commit;
        if header.sender == self.meta.me {
            return self.own_came_back(&header, bytes, now, taken);
        }
        let last = self.last_seq(header.sender);
        if header.seq <= last {
            return Err(refuse(
                RefusalKind::Replayed,
                "a sequence number of this sender that was already taken in",
            ));
        }
        let current = self.epoch();
        if epoch > current {
            return Err(refuse(
                RefusalKind::UnknownEpoch,
                "from an epoch this device has not reached: a commit was withheld, or the relay showed members different histories",
            ));
        }
        match self.known_fingerprint(epoch) {
            Some(known) if known[..] != aad[HEADER_LEN..] => {
                return Err(refuse(
                    RefusalKind::Fork,
                    "from a history of the channel this device did not follow: the relay showed members different commits for one epoch",
                ));
            }
            Some(_) if epoch < current && self.leaf_of(header.sender).is_none() => {
                return Err(refuse(
                    RefusalKind::RemovedSender,
                    "an old epoch's message claiming a device that is no longer a member",
                ));
            }
            Some(_) if epoch < current && is_commit => {
                self.stale_commit(&header, &aad, private)?;
                self.set_last_seq(header.sender, header.seq, taken);
                return Ok(Event::Nothing);
            }
            Some(_) if current - epoch > self.meta.past_epochs as u64 => {
                return Err(refuse(
                    RefusalKind::UnknownEpoch,
                    "from an epoch whose secrets this device has deleted (forward secrecy): too late to read",
                ));
            }
            Some(_) => {}
            None if epoch < self.meta.joined_epoch => {
                // Sealed before this device joined (a late message, or a commit
                // that lost the race with the one that added it): MLS never
                // gave it those secrets, and nothing of it can be accepted.
                tracing::debug!(epoch, "an envelope from before this device joined");
                return Ok(Event::Nothing);
            }
            None if epoch < current => {
                return Err(refuse(
                    RefusalKind::UnknownEpoch,
                    "from an epoch older than this device keeps: it cannot be read",
                ));
            }
            None => {
                return Err(refuse(
                    RefusalKind::UnknownEpoch,
                    "no fingerprint of the current epoch",
                ));
            }
        }
        let processed = self
            .group
            .process_message(&self.provider, ProtocolMessage::from(private))
            .map_err(|e| {
                refuse(
                    RefusalKind::Tampered,
                    &format!("does not authenticate as a member's message ({e})"),
                )
            })?;
        let signer = member_of(processed.credential()).ok_or_else(|| {
            refuse(
                RefusalKind::Forged,
                "signed with a credential that names no device",
            )
        })?;
        if signer.id != header.sender || processed.aad() != &aad[..] {
            return Err(refuse(
                RefusalKind::Forged,
                "signed by one member while its header names another",
            ));
        }
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => {
                if epoch < current && self.leaf_of(signer.id).is_none() {
                    return Err(refuse(
                        RefusalKind::RemovedSender,
                        "an old epoch's message from a device that is no longer a member",
                    ));
                }
                let plaintext = envelope::unpad(&app.into_bytes())
                    .ok_or_else(|| refuse(RefusalKind::Malformed, "bad padding"))?;
                self.set_last_seq(header.sender, header.seq, taken);
                Ok(Event::App {
                    sender: signer,
                    plaintext,
                })
            }
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                self.check_commit(signer.id, &staged)?;
                self.set_last_seq(header.sender, header.seq, taken);
                self.apply_commit(signer.id, *staged, taken)
            }
            _ => Err(refuse(
                RefusalKind::Unexpected,
                "a standalone proposal: khub members only commit",
            )),
        }
    }

    /// Keeps the group's state as it is now, before a commit moves it on, so
    /// that a commit that loses this epoch's race can still be checked; drops
    /// all but the newest [`SNAPSHOTS_KEPT`] such snapshots.
    fn keep_previous_epoch(&mut self) {
        let epoch = self.epoch();
        let snapshot = self.provider.snapshot(SNAPSHOT_PREFIX);
        self.provider
            .set_extra(&snapshot_key(epoch), Some(snapshot));
        let mut kept = self.provider.extra_keys(SNAPSHOT_PREFIX);
        kept.sort();
        let excess = kept.len().saturating_sub(SNAPSHOTS_KEPT);
        for key in &kept[..excess] {
            self.provider.set_extra(key, None);
        }
    }

    /// A commit for an epoch already settled, from a current member: checked
    /// against that epoch's state (kept for this), it is a lost race and
    /// changes nothing; one that does not authenticate, or is for an epoch
    /// older than the snapshots kept, is refused.
    fn stale_commit(
        &mut self,
        header: &EnvelopeHeader,
        aad: &[u8],
        private: PrivateMessageIn,
    ) -> Result<(), Refusal> {
        let refuse = |kind, detail: &str| Refusal::new(kind, Some(header.sender), detail);
        let previous = self
            .provider
            .get_extra(&snapshot_key(u64::from(header.epoch)))
            .and_then(|rows| MlsProvider::from_snapshot(&rows));
        let Some(provider) = previous else {
            return Err(refuse(
                RefusalKind::StaleCommit,
                "a commit for an epoch settled long ago, which can no longer be checked: a very late lost race, or an injection; ignored",
            ));
        };
        let mut group = MlsGroup::load(
            provider.storage(),
            &GroupId::from_slice(self.meta.channel.as_bytes()),
        )
        .ok()
        .flatten()
        .ok_or_else(|| {
            refuse(
                RefusalKind::StaleCommit,
                "that epoch's kept state is damaged",
            )
        })?;
        let processed = group
            .process_message(&provider, ProtocolMessage::from(private))
            .map_err(|e| {
                refuse(
                    RefusalKind::Tampered,
                    &format!("a commit for a settled epoch that does not authenticate ({e})"),
                )
            })?;
        let signer = member_of(processed.credential());
        if signer.map(|m| m.id) != Some(header.sender) || processed.aad() != aad {
            return Err(refuse(
                RefusalKind::Forged,
                "a commit for a settled epoch signed by one member while its header names another",
            ));
        }
        tracing::debug!(sender = %header.sender, epoch = header.epoch, "a commit that lost its epoch's race");
        Ok(())
    }

    fn last_seq(&self, sender: DeviceId) -> u64 {
        self.meta
            .last_seq
            .iter()
            .find(|(d, _)| *d == sender)
            .map_or(0, |(_, s)| *s)
    }

    /// Records that `seq` of `sender` was taken in, and a gap if numbers were
    /// skipped (not for the first one seen: a joiner starts mid-stream).
    fn set_last_seq(&mut self, sender: DeviceId, seq: u64, taken: &mut TakenIn) {
        let last = self.last_seq(sender);
        let missing = if last == 0 { 0 } else { seq - last - 1 };
        if missing > 0 {
            taken.refusals.push(Refusal::new(
                RefusalKind::Gap,
                Some(sender),
                format!(
                    "{missing} of this sender's messages {}..={} never arrived: the relay dropped them (or refused to store them)",
                    last + 1,
                    seq - 1
                ),
            ));
        }
        match self.meta.last_seq.iter_mut().find(|(d, _)| *d == sender) {
            Some(entry) => entry.1 = seq,
            None => self.meta.last_seq.push((sender, seq)),
        }
    }

    /// This device's own envelope, back in relay order: the moment its pending
    /// commit wins.
    fn own_came_back(
        &mut self,
        header: &EnvelopeHeader,
        bytes: &[u8],
        now: u64,
        taken: &mut TakenIn,
    ) -> Result<Event, Refusal> {
        let Some(pending) = self.meta.pending.clone() else {
            return Ok(Event::Nothing);
        };
        if pending.seq != header.seq {
            return Ok(Event::Nothing);
        }
        if pending.envelope != bytes {
            return Err(Refusal::new(
                RefusalKind::Forged,
                Some(header.sender),
                "claims to be this device's own commit, but is not what it sent",
            ));
        }
        self.keep_previous_epoch();
        self.group
            .merge_pending_commit(&self.provider)
            .map_err(|e| Refusal::new(RefusalKind::Malformed, None, e.to_string()))?;
        self.meta.pending = None;
        if pending.intent == Intent::Update {
            self.meta.sealed_since_update = 0;
            self.meta.updated_at = now;
        }
        let _ = taken;
        self.remember_fingerprint()
            .map_err(|e| Refusal::new(RefusalKind::Malformed, None, e.to_string()))?;
        Ok(Event::OwnCommit(pending.intent))
    }

    /// What MLS leaves to the application: a commit may only add and remove
    /// devices (with its author's own update path), every credential in it
    /// must be a khub credential, its author's leaf must keep its credential,
    /// and no device id may be held by two leaves afterwards. Without this, a
    /// member could plant a leaf that no one sees or that speaks as another
    /// member, and keep it after its own removal.
    fn check_commit(&self, by: DeviceId, staged: &StagedCommit) -> Result<(), Refusal> {
        let forged = |detail: String| Refusal::new(RefusalKind::Forged, Some(by), detail);
        for queued in staged.queued_proposals() {
            if !matches!(queued.proposal(), Proposal::Add(_) | Proposal::Remove(_)) {
                return Err(Refusal::new(
                    RefusalKind::Unexpected,
                    Some(by),
                    "a commit with proposals other than Add and Remove: khub members only add and remove devices",
                ));
            }
        }
        if let Some(leaf) = staged.update_path_leaf_node() {
            let author = self
                .group
                .members()
                .find(|m| member_of(&m.credential).is_some_and(|m| m.id == by))
                .map(|m| m.credential);
            if author.as_ref() != Some(leaf.credential()) {
                return Err(forged(
                    "a commit that changes its author's credential (its id or name)".into(),
                ));
            }
        }
        let removed: Vec<LeafNodeIndex> = staged
            .remove_proposals()
            .map(|p| p.remove_proposal().removed())
            .collect();
        let mut ids: Vec<DeviceId> = self
            .group
            .members()
            .filter(|m| !removed.contains(&m.index))
            .filter_map(|m| member_of(&m.credential).map(|m| m.id))
            .collect();
        for add in staged.add_proposals() {
            let credential = add.add_proposal().key_package().leaf_node().credential();
            let Some(added) = member_of(credential) else {
                return Err(forged(
                    "a commit that adds a device whose credential is not a khub credential".into(),
                ));
            };
            if ids.contains(&added.id) {
                return Err(forged(format!(
                    "a commit that adds a second leaf for device {}",
                    added.id
                )));
            }
            ids.push(added.id);
        }
        Ok(())
    }

    fn apply_commit(
        &mut self,
        by: DeviceId,
        staged: StagedCommit,
        taken: &mut TakenIn,
    ) -> Result<Event, Refusal> {
        let lost = self.meta.pending.take();
        if lost.is_some() {
            self.group
                .clear_pending_commit(self.provider.storage())
                .map_err(|e| Refusal::new(RefusalKind::Malformed, None, e.to_string()))?;
        }
        let added: Vec<DeviceId> = staged
            .add_proposals()
            .filter_map(|p| member_of(p.add_proposal().key_package().leaf_node().credential()))
            .map(|m| m.id)
            .collect();
        let removed: Vec<DeviceId> = staged
            .remove_proposals()
            .filter_map(|p| self.group.member_at(p.remove_proposal().removed()))
            .filter_map(|m| member_of(&m.credential))
            .map(|m| m.id)
            .collect();
        let removes_me = staged.self_removed();
        self.keep_previous_epoch();
        self.group
            .merge_staged_commit(&self.provider, staged)
            .map_err(|e| Refusal::new(RefusalKind::Malformed, Some(by), e.to_string()))?;
        if removes_me || !self.group.is_active() {
            self.meta.removed = true;
            return Ok(Event::RemovedMe { by });
        }
        self.remember_fingerprint()
            .map_err(|e| Refusal::new(RefusalKind::Malformed, None, e.to_string()))?;
        let Some(lost) = lost else {
            return Ok(Event::Commit { by, added, removed });
        };
        // Re-issue what still applies; an add is re-issued by the pairing that
        // wanted it (it needs a fresh Welcome for the joiner), an update by
        // the schedule.
        let again = match &lost.intent {
            Intent::Remove(devices) => {
                let left: Vec<DeviceId> = devices
                    .iter()
                    .copied()
                    .filter(|d| self.leaf_of(*d).is_some())
                    .collect();
                (!left.is_empty()).then(|| self.commit_remove(&left))
            }
            // An update waits for this device's next message: the schedule
            // still calls for one (its count was not reset).
            Intent::Update | Intent::Add(_) => None,
        };
        let losses = lost.losses + 1;
        if let Some(pending) = self.meta.pending.as_mut() {
            pending.losses = losses;
        }
        if losses >= BLOCKED_AFTER && matches!(lost.intent, Intent::Remove(_)) {
            taken.refusals.push(Refusal::new(
                RefusalKind::Blocked,
                Some(by),
                format!(
                    "this device's removal ({:?}) lost its epoch's race {losses} times in a row: a device being removed may be working with the relay to block it; it is tried again",
                    lost.intent
                ),
            ));
        }
        match again {
            Some(Ok(outgoing)) => taken.outgoing.push(outgoing),
            Some(Err(e)) => taken.refusals.push(Refusal::new(
                RefusalKind::Unexpected,
                None,
                format!("could not re-issue this device's change: {e}"),
            )),
            None => {}
        }
        Ok(Event::OwnCommitLost(lost.intent))
    }
}

/// A new device between sending its KeyPackage and receiving the Welcome.
pub struct Joining {
    provider: MlsProvider,
    signer: SignatureKeyPair,
    me: DeviceId,
}

impl std::fmt::Debug for Joining {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Joining")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

/// What a joining device learns from the Welcome.
#[derive(Debug)]
pub struct JoinedGroup {
    /// The channel, ready to use.
    pub channel: Channel,
    /// The member that added this device.
    pub inviter: Member,
}

impl Joining {
    /// A fresh signature key and a KeyPackage (TLS-encoded) naming `me` and `name`.
    pub fn start(me: DeviceId, name: &str) -> Result<(Self, Vec<u8>), ChannelError> {
        validate_name(name).map_err(|e| ChannelError::Invalid(e.to_string()))?;
        let provider = MlsProvider::load([]);
        let signer = new_signer(&provider)?;
        let with_key = CredentialWithKey {
            credential: credential(me, name),
            signature_key: signer.public().into(),
        };
        let bundle = KeyPackage::builder()
            .build(CIPHERSUITE, &provider, &signer, with_key)
            .map_err(mls)?;
        let key_package = bundle.key_package().tls_serialize_detached().map_err(mls)?;
        Ok((
            Self {
                provider,
                signer,
                me,
            },
            key_package,
        ))
    }

    /// This joiner's state: its signature public key and every storage row
    /// (the KeyPackage's private keys among them). For tests and vectors only.
    #[cfg(feature = "testing")]
    pub fn state_for_testing_only(&self) -> (Vec<u8>, Vec<Row>) {
        (self.signer.public().to_vec(), self.provider.rows())
    }

    /// A joiner from what [`state_for_testing_only`](Self::state_for_testing_only)
    /// returned. For tests and vectors only.
    #[cfg(feature = "testing")]
    pub fn from_state_for_testing_only(
        me: DeviceId,
        signature_key: &[u8],
        rows: Vec<Row>,
    ) -> Option<Self> {
        let provider = MlsProvider::load(rows);
        let signer = SignatureKeyPair::read(
            provider.storage(),
            signature_key,
            CIPHERSUITE.signature_algorithm(),
        )?;
        Some(Self {
            provider,
            signer,
            me,
        })
    }

    /// Joins `channel` from the Welcome (TLS-encoded `MLSMessage`) the inviter
    /// sent through pairing.
    pub fn join(
        self,
        channel: ChannelId,
        welcome: &[u8],
        now: u64,
    ) -> Result<JoinedGroup, ChannelError> {
        let peer = |detail: String| ChannelError::Peer {
            what: "Welcome",
            detail,
        };
        let message =
            MlsMessageIn::tls_deserialize_exact(welcome).map_err(|e| peer(e.to_string()))?;
        let MlsMessageBodyIn::Welcome(welcome) = message.extract() else {
            return Err(peer("not a Welcome".into()));
        };
        let staged = StagedWelcome::new_from_welcome(
            &self.provider,
            &join_config(PAST_EPOCHS),
            welcome,
            None,
        )
        .map_err(|e| peer(e.to_string()))?;
        let inviter = staged
            .welcome_sender()
            .ok()
            .and_then(|leaf| member_of(leaf.credential()))
            .ok_or_else(|| peer("its sender names no khub device".into()))?;
        let group = staged
            .into_group(&self.provider)
            .map_err(|e| peer(e.to_string()))?;
        if group.group_id().as_slice() != channel.as_bytes() {
            return Err(peer("it is for another channel".into()));
        }
        let mut ids = Vec::new();
        for leaf in group.members() {
            let member = member_of(&leaf.credential)
                .ok_or_else(|| peer("a member's credential is not a khub credential".into()))?;
            if ids.contains(&member.id) {
                return Err(peer(format!("device {} holds two leaves", member.id)));
            }
            ids.push(member.id);
        }
        let channel = Channel::assemble(self.provider, group, self.signer, channel, self.me, now)?;
        if channel.leaf_of(channel.meta.me).is_none() {
            return Err(peer("it does not list this device".into()));
        }
        Ok(JoinedGroup { channel, inviter })
    }
}
