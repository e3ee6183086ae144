//! A device: its identity and keys on disk, and the operations an app calls.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use tracing::warn;
use warp::http::Method;

use super::control::Control;
use super::error::ClientError;
use super::http::{REQUEST_TIMEOUT, RelayAddr};
use super::incident::{Incident, IncidentKind};
use super::state::{Identity, InboxMessage, StateDb};
use crate::channel::{Keyring, KeyringError, Member, validate_name};
use crate::crypto::os_rng;
use crate::crypto::pairwise::DeviceSecret;
use crate::crypto::rekey::RekeyError;
use crate::crypto::token::AccessToken;
use crate::ids::{ChannelId, DeviceId};
use crate::protocol::{
    B64, ChannelCreated, CreateChannel, Credentials, DeviceList, SyncRequest, SyncResponse,
};

/// A message for the application: who sent it and what it says.
pub type Message = InboxMessage;

/// Mutable state, behind one lock: the database and the keyring move together.
pub(crate) struct DeviceState {
    pub(crate) db: StateDb,
    pub(crate) keyring: Keyring,
    pub(crate) cursor: u64,
    /// A rekey showed this device was removed.
    pub(crate) removed: bool,
    /// Devices whose "joined" message this device has taken in (since it
    /// was opened): an inviter waits for its new member's.
    pub(crate) confirmed: std::collections::HashSet<DeviceId>,
}

pub(crate) struct Inner {
    pub(crate) home: PathBuf,
    pub(crate) relay: RelayAddr,
    pub(crate) channel: ChannelId,
    pub(crate) me: DeviceId,
    pub(crate) name: String,
    pub(crate) token: AccessToken,
    pub(crate) state: Mutex<DeviceState>,
    /// Woken whenever the inbox or outbox changes.
    pub(crate) changed: Notify,
    /// Relay sequence numbers of acked envelopes, by sender sequence number.
    pub(crate) acks: Mutex<std::collections::HashMap<u64, u64>>,
}

/// A fresh device identity, before it belongs to any channel.
pub(crate) struct NewIdentity {
    pub(crate) relay: RelayAddr,
    pub(crate) secret: DeviceSecret,
    pub(crate) member: Member,
    pub(crate) token: AccessToken,
}

impl NewIdentity {
    /// Checks the name and that `home` is free, parses the relay URL, and draws
    /// the device's id, X25519 key pair and relay token.
    pub(crate) fn draw(home: &Path, relay_url: &str, name: &str) -> Result<Self, ClientError> {
        validate_name(name).map_err(|e| ClientError::State(e.to_string()))?;
        if home.join(super::state::STATE_FILE).exists() {
            return Err(ClientError::AlreadyInitialized(home.display().to_string()));
        }
        let relay = RelayAddr::parse(relay_url)?;
        let mut rng = os_rng();
        let secret = DeviceSecret::generate(&mut rng);
        let member = Member {
            id: DeviceId::random(&mut rng),
            public_key: secret.public_key(),
            name: name.to_owned(),
        };
        Ok(Self {
            relay,
            secret,
            member,
            token: AccessToken::generate(&mut rng),
        })
    }
}

/// A paired device. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Device {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("channel", &self.inner.channel)
            .field("device", &self.inner.me)
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

impl Device {
    /// Creates a new channel on the relay at `relay_url` with this device (named
    /// `name`) as its first member, and stores the device in `home`.
    pub async fn create(home: &Path, relay_url: &str, name: &str) -> Result<Self, ClientError> {
        let NewIdentity {
            relay,
            secret,
            member: me,
            token,
        } = NewIdentity::draw(home, relay_url, name)?;
        let mut rng = os_rng();
        let channel = ChannelId::random(&mut rng);
        let request = CreateChannel {
            channel,
            device: me.id,
            token_hash: token.hash(),
        };
        let operator = std::env::var("KHUB_OPERATOR_SECRET").ok();
        let headers: Vec<(&str, &str)> = operator
            .iter()
            .map(|s| (crate::protocol::OPERATOR_HEADER, s.as_str()))
            .collect();
        let _: ChannelCreated = relay
            .json(
                Method::POST,
                "/channels",
                &headers,
                Some(&request),
                REQUEST_TIMEOUT,
            )
            .await?;
        let keyring = Keyring::create(channel, me, secret, &mut rng);
        Self::store_new(home, relay, name, token, keyring)
    }

    /// Stores a freshly made identity (used by [`create`](Self::create) and by joining).
    pub(crate) fn store_new(
        home: &Path,
        relay: RelayAddr,
        name: &str,
        token: AccessToken,
        keyring: Keyring,
    ) -> Result<Self, ClientError> {
        let identity = Identity {
            relay: relay.url.clone(),
            name: name.to_owned(),
            token,
            keyring,
            cursor: 0,
        };
        let db = StateDb::create(home, &identity)?;
        Ok(Self::from_parts(home, db, identity, relay))
    }

    /// Opens the device stored in `home`.
    pub fn open(home: &Path) -> Result<Self, ClientError> {
        let (db, identity) = StateDb::open(home)?;
        let relay = RelayAddr::parse(&identity.relay)?;
        Ok(Self::from_parts(home, db, identity, relay))
    }

    fn from_parts(home: &Path, db: StateDb, identity: Identity, relay: RelayAddr) -> Self {
        let Identity {
            name,
            token,
            keyring,
            cursor,
            ..
        } = identity;
        Self {
            inner: Arc::new(Inner {
                home: home.to_owned(),
                relay,
                channel: keyring.channel(),
                me: keyring.me(),
                name,
                token,
                state: Mutex::new(DeviceState {
                    db,
                    keyring,
                    cursor,
                    removed: false,
                    confirmed: Default::default(),
                }),
                changed: Notify::new(),
                acks: Mutex::new(std::collections::HashMap::new()),
            }),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, DeviceState> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This device's id.
    pub fn id(&self) -> DeviceId {
        self.inner.me
    }

    /// This device's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The channel's id.
    pub fn channel(&self) -> ChannelId {
        self.inner.channel
    }

    /// Where the device keeps its state.
    pub fn home(&self) -> &Path {
        &self.inner.home
    }

    /// The relay's URL.
    pub fn relay_url(&self) -> &str {
        &self.inner.relay.url
    }

    /// The last relay sequence number this device has taken in.
    pub fn cursor(&self) -> u64 {
        self.lock().cursor
    }

    pub(crate) fn credentials(&self) -> Credentials {
        Credentials {
            channel: self.inner.channel,
            device: self.inner.me,
            token: self.inner.token.duplicate(),
        }
    }

    pub(crate) fn auth_header(&self) -> zeroize::Zeroizing<String> {
        self.credentials().to_header()
    }

    /// One JSON request to the relay with this device's credentials.
    pub(crate) async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl serde::Serialize>,
    ) -> Result<T, ClientError> {
        let auth = self.auth_header();
        self.inner
            .relay
            .json(
                method,
                path,
                &[("authorization", &auth)],
                body,
                REQUEST_TIMEOUT,
            )
            .await
    }

    /// Members of the channel as this device knows them (current epoch).
    pub fn members(&self) -> Vec<Member> {
        self.lock().keyring.members().cloned().collect()
    }

    /// The devices the relay lets in for this channel.
    pub async fn relay_devices(&self) -> Result<Vec<DeviceId>, ClientError> {
        let path = format!("/channels/{}/devices", self.inner.channel);
        let list: DeviceList = self.call(Method::GET, &path, None::<&()>).await?;
        Ok(list.devices)
    }

    /// Seals `body` as the next message and stores it in the outbox, durably.
    /// It is sent by the next [`sync`](Self::sync) or live session; returns its
    /// sender sequence number.
    pub fn queue(&self, body: &[u8]) -> Result<u64, ClientError> {
        self.queue_control(&Control::App(body.to_vec()), None)
    }

    /// Seals a control or app message (in `epoch`, or the current one) into the outbox.
    pub(crate) fn queue_control(
        &self,
        control: &Control,
        epoch: Option<crate::ids::Epoch>,
    ) -> Result<u64, ClientError> {
        let mut guard = self.lock();
        let state = &mut *guard;
        if state.removed {
            return Err(ClientError::Revoked);
        }
        let sender_seq = state.keyring.next_seq();
        let epoch = epoch.unwrap_or_else(|| state.keyring.epoch());
        let envelope = state
            .keyring
            .seal_in(epoch, &control.encode(), &mut os_rng())
            .map_err(|e| ClientError::TooLarge(e.to_string()))?;
        state.db.queue(&state.keyring, sender_seq, &envelope)?;
        drop(guard);
        self.inner.changed.notify_waiters();
        Ok(sender_seq)
    }

    /// Envelopes sealed but not yet acked by the relay.
    pub fn pending(&self) -> Result<usize, ClientError> {
        Ok(self.lock().db.outbox()?.len())
    }

    pub(crate) fn outbox(&self) -> Result<Vec<(u64, Vec<u8>)>, ClientError> {
        self.lock().db.outbox()
    }

    /// The relay stored envelope `sender_seq` as `seq`.
    pub(crate) fn acked(&self, sender_seq: u64, seq: u64) -> Result<(), ClientError> {
        self.lock().db.acked(sender_seq)?;
        self.inner
            .acks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sender_seq, seq);
        self.inner.changed.notify_waiters();
        Ok(())
    }

    /// Takes in envelopes from the relay, in relay order: opens each, applies
    /// control messages, queues app messages for the inbox, records what was
    /// refused, and moves the cursor — all in one transaction (one disk sync
    /// for a whole batch). Envelopes at or below the cursor are skipped, so a
    /// redelivery is never seen twice.
    pub(crate) fn ingest(&self, batch: &[(u64, &[u8])]) -> Result<(), ClientError> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let mut messages = Vec::new();
        let mut incidents = Vec::new();
        for &(seq, envelope) in batch {
            if seq <= state.cursor {
                continue;
            }
            if let Some(message) = self.take_in(state, seq, envelope, &mut incidents) {
                messages.push(message);
            }
            state.cursor = seq;
        }
        for incident in &incidents {
            warn!(seq = incident.seq, kind = incident.kind.as_str(), detail = %incident.detail, "envelope refused or missing");
        }
        state
            .db
            .ingest(state.cursor, &state.keyring, &messages, &incidents)?;
        drop(guard);
        self.inner.changed.notify_waiters();
        Ok(())
    }

    /// Opens one envelope and applies it to `state`: the app message it
    /// carries, if any; what was wrong goes to `incidents`.
    fn take_in(
        &self,
        state: &mut DeviceState,
        seq: u64,
        envelope: &[u8],
        incidents: &mut Vec<Incident>,
    ) -> Option<InboxMessage> {
        let mut message = None;
        match state.keyring.open(envelope) {
            Ok(opened) => {
                if let Some(gap) = &opened.gap {
                    incidents.push(Incident::gap(seq, opened.header.sender, gap));
                }
                match Control::decode(&opened.plaintext) {
                    Ok(Control::App(body)) if opened.header.sender != self.inner.me => {
                        let from_name = state
                            .keyring
                            .member(&opened.header.sender)
                            .map_or_else(|| "unknown device".to_owned(), |m| m.name.clone());
                        message = Some(InboxMessage {
                            seq,
                            from: opened.header.sender,
                            from_name,
                            body,
                        });
                    }
                    Ok(Control::App(_)) => {}
                    Ok(Control::Joined) => {
                        state.confirmed.insert(opened.header.sender);
                    }
                    Ok(Control::MemberAdded(member)) => {
                        if state.keyring.member(&member.id).is_none()
                            && state.keyring.add_member(member).is_err()
                        {
                            incidents.push(Incident::other(
                                seq,
                                IncidentKind::RekeyRefused,
                                "a member announcement exceeds the channel's size; ignored",
                            ));
                        }
                    }
                    Ok(Control::Rekey(rekey)) => match state.keyring.apply_rekey(&rekey) {
                        Ok(outcome) => tracing::debug!(seq, ?outcome, "rekey applied"),
                        Err(KeyringError::Rekey(RekeyError::Removed(_))) => state.removed = true,
                        Err(e) => incidents.push(Incident::other(
                            seq,
                            IncidentKind::RekeyRefused,
                            format!("rekey refused: {e}"),
                        )),
                    },
                    Err(e) => incidents.push(Incident::other(
                        seq,
                        IncidentKind::Malformed,
                        format!("undecodable message skipped: {e}"),
                    )),
                }
            }
            // An epoch from before this device joined is expected and not
            // reported; everything else refused is.
            Err(e) => match Incident::refused(seq, &e) {
                Some(incident) => incidents.push(incident),
                None => {
                    tracing::debug!(seq, error = %e, "envelope from an epoch this device never held")
                }
            },
        }
        message
    }

    /// Catches up over `POST /sync`: publishes the outbox, then fetches and
    /// takes in everything after the cursor. For apps that wake briefly.
    /// Returns how many envelopes were taken in.
    pub async fn sync(&self) -> Result<usize, ClientError> {
        let outbox = self.outbox()?;
        let mut publish: Vec<B64> = outbox.iter().map(|(_, e)| B64(e.clone())).collect();
        let mut taken = 0;
        loop {
            let request = SyncRequest {
                cursor: self.cursor(),
                publish: std::mem::take(&mut publish),
                limit: None,
            };
            let response: SyncResponse = self.call(Method::POST, "/sync", Some(&request)).await?;
            for ((sender_seq, _), ack) in outbox.iter().zip(&response.acks) {
                match (&ack.seq, &ack.error) {
                    (Some(seq), _) => self.acked(*sender_seq, *seq)?,
                    (None, Some(e)) if e.code == crate::protocol::ErrorCode::OverQuota => {}
                    (None, Some(e)) => {
                        warn!(
                            sender_seq,
                            code = e.code.as_str(),
                            "the relay refused a queued message; dropping it"
                        );
                        self.lock().db.acked(*sender_seq)?;
                    }
                    (None, None) => {}
                }
            }
            let batch: Vec<(u64, &[u8])> = response
                .envelopes
                .iter()
                .map(|d| (d.seq, d.envelope.as_slice()))
                .collect();
            self.ingest(&batch)?;
            taken += batch.len();
            if !response.more || response.envelopes.is_empty() {
                break;
            }
        }
        if self.lock().removed {
            return Err(ClientError::Revoked);
        }
        Ok(taken)
    }

    /// The oldest message the app has not marked read.
    pub fn next_unread(&self) -> Result<Option<Message>, ClientError> {
        self.lock().db.next_unread()
    }

    /// Envelopes this device refused (tampered, replayed, reordered, foreign…)
    /// and gaps it noticed, oldest first; the newest
    /// [`KEPT`](super::incident::KEPT) are kept. None of the refused envelopes
    /// reached the inbox.
    pub fn incidents(&self) -> Result<Vec<Incident>, ClientError> {
        self.lock().db.incidents()
    }

    /// Marks every message up to `seq` read (they leave the inbox).
    pub fn mark_read(&self, seq: u64) -> Result<(), ClientError> {
        self.lock().db.mark_read(seq)
    }

    /// Every secret this device holds — relay token, private key, channel
    /// keys — for the harness's secret scanner.
    #[cfg(feature = "testing")]
    pub fn secrets_for_scan(&self) -> Vec<(String, Vec<u8>)> {
        let mut secrets = self.lock().keyring.secrets_for_scan();
        secrets.push(("relay token".to_owned(), self.inner.token.expose().to_vec()));
        secrets
    }

    /// Whether a rekey showed this device was removed.
    pub fn is_removed(&self) -> bool {
        self.lock().removed
    }

    /// Removes `device` from the channel: the relay revokes its token and
    /// closes its sessions, and the next epoch's key goes to every remaining
    /// member (sealed to each under its pairwise key). Publishes the rekey.
    pub async fn remove(&self, device: DeviceId) -> Result<(), ClientError> {
        if device == self.inner.me {
            return Err(ClientError::State(
                "a device cannot remove itself; remove it from another device".into(),
            ));
        }
        let path = format!("/channels/{}/devices/{}", self.inner.channel, device);
        let _: DeviceList = self.call(Method::DELETE, &path, None::<&()>).await?;
        let (rekey, old_epoch) = {
            let mut guard = self.lock();
            let state = &mut *guard;
            let old_epoch = state.keyring.epoch();
            let rekey = state
                .keyring
                .rekey_removing(&[device], &mut os_rng())
                .map_err(|e| ClientError::State(e.to_string()))?;
            state.db.save_keyring(&state.keyring)?;
            (rekey, old_epoch)
        };
        // Under the old epoch's key: the one the remaining members hold.
        self.queue_control(&Control::Rekey(rekey), Some(old_epoch))?;
        self.sync().await.map(drop)
    }
}
