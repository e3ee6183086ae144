//! A device: its identity and keys on disk, and the operations an app calls.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hyper::Method;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, warn};
use zeroize::Zeroizing;

use super::control::Control;
use super::error::ClientError;
use super::http::{REQUEST_TIMEOUT, RelayAddr};
use super::incident::{Incident, IncidentKind};
use super::state::{Change, Identity, InboxMessage, StateDb};
use crate::channel::{Channel, ChannelError, Event, Member, Outgoing, PAST_EPOCHS, validate_name};
use crate::crypto::envelope::EnvelopeHeader;
use crate::crypto::os_rng;
use crate::crypto::token::AccessToken;
use crate::ids::{ChannelId, DeviceId};
use crate::protocol::{
    B64, ChannelCreated, CreateChannel, Credentials, DeviceList, ErrorCode, MAX_SEQ, Refusal,
    SyncRequest, SyncResponse,
};

/// A message for the application: who sent it and what it says.
pub type Message = InboxMessage;

/// What [`Device::ingest`] did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ingested {
    /// Taken in.
    Taken {
        /// The outbox was sealed again: what waits to be written must be
        /// read again.
        resealed: bool,
        /// Envelopes of the batch past the cursor; of those read again after
        /// the relay went back, only the ones that were news.
        fresh: usize,
    },
    /// Nothing: the cursor on disk went back behind where the batch follows
    /// on. Resume from [`Device::cursor`], now the one on disk.
    Behind,
}

/// Where a connection or a sync resumes, and how it tells that the relay
/// went back: a relay's sequence numbers never go back, so a head behind the
/// cursor, or another envelope than the one taken in at the cursor, means it
/// lost envelopes it had numbered (restored from an older backup) and numbers
/// new ones again where they were.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Resume {
    /// The cursor resumed from.
    pub cursor: u64,
    /// SHA-256 of the envelope taken in at the cursor, when it is known.
    check: Option<[u8; 32]>,
}

impl Resume {
    /// Resuming from `cursor` without checking the envelope there.
    pub fn at(cursor: u64) -> Self {
        Self {
            cursor,
            check: None,
        }
    }

    /// Whether the envelope at the cursor is to be checked (it comes first).
    pub fn checks(&self) -> bool {
        self.check.is_some()
    }

    /// What to ask the relay for envelopes after: one before the cursor when
    /// the envelope at the cursor can be checked, so that it comes again.
    pub fn from(&self) -> u64 {
        self.cursor - u64::from(self.check.is_some())
    }

    /// Why the relay went back, if `head` (its newest sequence number) says so.
    pub fn behind(&self, head: u64) -> Option<String> {
        (head < self.cursor).then(|| {
            format!(
                "the relay's newest envelope is #{head}, behind #{} which this device had taken in",
                self.cursor
            )
        })
    }

    /// Why the relay went back, if `first`, the first envelope it returned
    /// after [`from`](Self::from), says so: it is at the cursor and is not the
    /// one taken in there. (One after the cursor says nothing: the one at the
    /// cursor was pruned.)
    pub fn replaced(&self, first: (u64, &[u8])) -> Option<String> {
        let check = self.check?;
        let (seq, envelope) = first;
        (seq == self.cursor && crate::client::state::envelope_hash(envelope) != check).then(|| {
            format!(
                "the relay's envelope #{seq} is not the one this device took in under that number"
            )
        })
    }
}

/// How long [`Device::remove`] waits for its commit to be ordered by the relay.
const SETTLE_WAIT: Duration = Duration::from_secs(30);
/// Envelope bytes one `POST /sync` publishes at most (one envelope at
/// least), about 1 MiB as base64: a larger outbox goes out over several
/// requests, each well within the relay's request limit (16 frames, about
/// 23 MB by default).
const PUBLISH_PAGE_BYTES: usize = 768 * 1024;
const _: () = assert!(
    PUBLISH_PAGE_BYTES / crate::crypto::envelope::MIN_ENVELOPE_LEN
        < crate::protocol::MAX_PUBLISH_PER_SYNC
);

/// The longest retention a device takes from the relay.
const MAX_RETENTION_SECS: u64 = 100 * 365 * 24 * 3600;

pub(crate) struct Inner {
    pub(crate) home: PathBuf,
    pub(crate) relay: RelayAddr,
    pub(crate) channel: ChannelId,
    pub(crate) me: DeviceId,
    pub(crate) name: String,
    pub(crate) token: AccessToken,
    /// The state file. Every change reloads the channel inside its own
    /// transaction, so other processes on the same home are seen.
    pub(crate) db: Mutex<StateDb>,
    /// Woken whenever the inbox or outbox changes.
    pub(crate) changed: Notify,
    /// Woken (one permit) whenever a change may have queued an envelope: the
    /// live session publishes it.
    pub(crate) queued: Notify,
    /// The relay's retention in seconds, as it last said (0: not heard yet).
    pub(crate) retention_secs: std::sync::atomic::AtomicU64,
    /// The cursor as of the last change this process committed (or the
    /// open): read on async paths without touching the state file. Another
    /// process on the same home may be ahead; a lower cursor only refetches.
    pub(crate) cursor: std::sync::atomic::AtomicU64,
    /// Whether a change saw this device removed from its channel.
    pub(crate) removed: std::sync::atomic::AtomicBool,
    /// Envelope bytes a `POST /sync` publishes at most: [`PUBLISH_PAGE_BYTES`],
    /// halved each time the relay refuses a page as too large (its frame
    /// limit, and so its request limit, is below the default). It only
    /// shrinks, for the life of this process: syncs that overlap cannot undo
    /// each other's halving, and a relay refusing every page costs one sync
    /// at most about 14 requests.
    pub(crate) publish_page: std::sync::atomic::AtomicUsize,
}

/// Seconds since the Unix epoch (the channel's update schedule).
pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fresh device identity, before it belongs to any channel.
pub(crate) struct NewIdentity {
    pub(crate) relay: RelayAddr,
    pub(crate) id: DeviceId,
    pub(crate) token: AccessToken,
}

impl NewIdentity {
    /// Checks the name and that `home` is free, parses the relay URL, and draws
    /// the device's id and relay token.
    pub(crate) fn draw(home: &Path, relay_url: &str, name: &str) -> Result<Self, ClientError> {
        validate_name(name).map_err(|e| ClientError::Invalid(e.to_string()))?;
        if home.join(super::state::STATE_FILE).exists() {
            return Err(ClientError::AlreadyInitialized(home.display().to_string()));
        }
        let relay = RelayAddr::parse(relay_url)?;
        let mut rng = os_rng();
        Ok(Self {
            relay,
            id: DeviceId::random(&mut rng),
            token: AccessToken::generate(&mut rng),
        })
    }
}

impl From<ChannelError> for ClientError {
    fn from(e: ChannelError) -> Self {
        match e {
            ChannelError::Removed => Self::Revoked,
            ChannelError::Invalid(message) => Self::Invalid(message),
            e @ ChannelError::Corrupt(_) => Self::disk("the channel's MLS state cannot be used", e),
            e @ ChannelError::Peer { .. } => Self::Peer(e.to_string()),
            e => Self::Bug(e.to_string()),
        }
    }
}

/// Seals a control or app message into the outbox of `change`. When the
/// channel's schedule calls for it, an update of this device's leaf goes
/// first. Returns the message's sender sequence number.
pub(crate) fn seal_into(change: &mut Change<'_>, control: &Control) -> Result<u64, ClientError> {
    if change.channel.needs_update(now_secs()) {
        let update = change.channel.commit_update()?;
        change.queue(&update)?;
    }
    let plaintext = Zeroizing::new(control.encode());
    let outgoing = change.channel.seal(&plaintext)?;
    change.queue_message(&outgoing, &plaintext)?;
    Ok(outgoing.seq)
}

/// How far a [`Device::sync_with_progress`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncProgress {
    /// Envelopes taken in so far.
    pub taken: usize,
    /// Envelopes the relay holds after this device's cursor.
    pub remaining: u64,
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
        let NewIdentity { relay, id, token } = NewIdentity::draw(home, relay_url, name)?;
        let channel = ChannelId::random(&mut os_rng());
        let group = Channel::create(channel, id, name, now_secs())?;
        let request = CreateChannel {
            channel,
            device: id,
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
            .await
            .map_err(|e| match e {
                // `POST /channels` is always there on a relay: a 404 means
                // this address (its path, say) is not one.
                ClientError::Relay {
                    code: ErrorCode::NotFound,
                    ..
                } => relay.not_a_relay(),
                e => e,
            })?;
        Self::store_new_blocking(home, relay, name, token, group, 0).await
    }

    /// [`store_new`](Self::store_new) on a blocking thread: it creates the
    /// state file and syncs it to disk.
    pub(crate) async fn store_new_blocking(
        home: &Path,
        relay: RelayAddr,
        name: &str,
        token: AccessToken,
        mut group: Channel,
        cursor: u64,
    ) -> Result<Self, ClientError> {
        let (home, name) = (home.to_owned(), name.to_owned());
        tokio::task::spawn_blocking(move || {
            Self::store_new(&home, relay, &name, token, &mut group, cursor)
        })
        .await
        .map_err(ClientError::task_failed)?
    }

    /// Stores a freshly made identity (used by [`create`](Self::create) and by
    /// joining, whose `cursor` is the commit that added it).
    pub(crate) fn store_new(
        home: &Path,
        relay: RelayAddr,
        name: &str,
        token: AccessToken,
        group: &mut Channel,
        cursor: u64,
    ) -> Result<Self, ClientError> {
        let identity = Identity {
            relay: relay.url.clone(),
            name: name.to_owned(),
            token,
            device: group.me(),
            channel: group.channel(),
        };
        let db = StateDb::create(home, &identity, group, cursor)?;
        Ok(Self::from_parts(home, db, identity, relay))
    }

    /// Opens the device stored in `home`.
    pub fn open(home: &Path) -> Result<Self, ClientError> {
        let (db, identity) = StateDb::open(home)?;
        let relay = RelayAddr::parse(&identity.relay)?;
        Ok(Self::from_parts(home, db, identity, relay))
    }

    fn from_parts(home: &Path, db: StateDb, identity: Identity, relay: RelayAddr) -> Self {
        let (cursor, removed) = db.channel().map_or((0, false), |(channel, cursor)| {
            (cursor, channel.is_removed())
        });
        Self {
            inner: Arc::new(Inner {
                home: home.to_owned(),
                relay,
                channel: identity.channel,
                me: identity.device,
                name: identity.name,
                token: identity.token,
                db: Mutex::new(db),
                changed: Notify::new(),
                queued: Notify::new(),
                retention_secs: std::sync::atomic::AtomicU64::new(0),
                publish_page: std::sync::atomic::AtomicUsize::new(PUBLISH_PAGE_BYTES),
                cursor: std::sync::atomic::AtomicU64::new(cursor),
                removed: std::sync::atomic::AtomicBool::new(removed),
            }),
        }
    }

    pub(crate) fn db(&self) -> MutexGuard<'_, StateDb> {
        self.inner.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs one change of the state (see [`StateDb::change`]) and wakes waiters.
    pub(crate) fn change<T>(
        &self,
        f: impl FnOnce(&mut Change<'_>) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        use std::sync::atomic::Ordering;
        let mut seen = (0, false);
        let out = self.db().change(|change| {
            let out = f(change)?;
            seen = (change.cursor, change.channel.is_removed());
            Ok(out)
        })?;
        self.inner.cursor.fetch_max(seen.0, Ordering::Relaxed);
        if seen.1 {
            self.inner.removed.store(true, Ordering::Relaxed);
        }
        self.inner.changed.notify_waiters();
        self.inner.queued.notify_one();
        Ok(out)
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

    /// The last relay sequence number this device has taken in (as of this
    /// process's last change: no disk read).
    pub fn cursor(&self) -> u64 {
        self.inner.cursor.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The channel's current MLS epoch.
    pub fn epoch(&self) -> Result<u64, ClientError> {
        Ok(self.db().channel()?.0.epoch())
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
    pub fn members(&self) -> Result<Vec<Member>, ClientError> {
        Ok(self.db().channel()?.0.members())
    }

    /// The devices the relay lets in for this channel.
    pub async fn relay_devices(&self) -> Result<Vec<DeviceId>, ClientError> {
        let path = format!("/channels/{}/devices", self.inner.channel);
        let list: DeviceList = self.call(Method::GET, &path, None::<&()>).await?;
        Ok(list.devices)
    }

    /// Seals `body` as the next message and stores it in the outbox, durably.
    /// It is sent by the next [`sync`](Self::sync) or live session; returns its
    /// sender sequence number. A body longer than
    /// [`MAX_MESSAGE_LEN`](super::control::MAX_MESSAGE_LEN) is refused
    /// (`Invalid`) and nothing is queued.
    pub fn queue(&self, body: &[u8]) -> Result<u64, ClientError> {
        super::control::check_message(body)?;
        self.queue_control(&Control::App(body.to_vec()))
    }

    /// Seals a control or app message into the outbox. When the channel's
    /// schedule calls for it, an update of this device's leaf goes first.
    pub(crate) fn queue_control(&self, control: &Control) -> Result<u64, ClientError> {
        self.change(|change| seal_into(change, control))
    }

    /// Commits a change of membership (built by `commit` on the channel) into
    /// the outbox.
    pub(crate) fn queue_commit<T>(
        &self,
        commit: impl FnOnce(&mut Channel) -> Result<(Outgoing, T), ChannelError>,
    ) -> Result<(u64, T), ClientError> {
        self.change(|change| {
            let (outgoing, extra) = commit(&mut change.channel)?;
            change.queue(&outgoing)?;
            Ok((outgoing.seq, extra))
        })
    }

    /// Seals again, in the current epoch, every queued message sealed in an
    /// earlier one: before a new connection publishes, what the last one
    /// wrote and the relay did not store.
    pub(crate) fn reseal_stale(&self) -> Result<usize, ClientError> {
        if self.pending()? == 0 {
            return Ok(0);
        }
        self.change(|change| change.reseal_stale())
    }

    /// Envelopes sealed but not yet acked by the relay.
    pub fn pending(&self) -> Result<usize, ClientError> {
        self.db().outbox_len()
    }

    /// Where a connection or a sync resumes, with what tells whether the
    /// relay went back (see [`Resume`]).
    ///
    /// The cursor is the one on disk: if another process on this home went
    /// back (see [`relay_went_back`](Self::relay_went_back)), this one's is
    /// ahead of it, and resuming from there would skip what that one reads
    /// again.
    pub(crate) fn resume(&self) -> Result<Resume, ClientError> {
        let (cursor, check) = self.db().cursor_and_hash()?;
        self.inner
            .cursor
            .store(cursor, std::sync::atomic::Ordering::Relaxed);
        Ok(Resume {
            cursor,
            check: check.filter(|_| cursor > 0),
        })
    }

    /// The relay went back (`why`, from `resumed`): it lost envelopes it had
    /// numbered, up to the cursor `asked` this process resumed from, and
    /// numbers new ones again from where it went back to — where exactly is
    /// unknown. So the cursor goes back to 0 and the channel is read again
    /// (an incident says so): what this device took in before comes back as
    /// replays, refused without incidents up to `asked`, and the rest is new.
    /// A snapshot of the notes is queued, to go out once the channel is read
    /// again: note changes the relay lost reach the members that missed them.
    /// Unless the cursor on disk is no longer where this process resumed
    /// from (the same number, and the same envelope there when that was
    /// known): another process on this home moved it (it went back already,
    /// or is ahead of this one), and this process resumes from where that one
    /// is instead. Either way the caller asks the relay again from
    /// [`cursor`](Self::cursor).
    pub(crate) fn relay_went_back(&self, resumed: Resume, why: &str) -> Result<(), ClientError> {
        use std::sync::atomic::Ordering;
        let asked = resumed.cursor;
        let mut rewound = false;
        let mut snapshot = 0;
        let mut cursor = asked;
        self.db().change(|change| {
            let (on_disk, hash) = change.cursor_and_hash()?;
            if on_disk == asked && (resumed.check.is_none() || hash == resumed.check) {
                change.reread(asked)?;
                change.record(&Incident::other(
                    asked,
                    IncidentKind::RelayRewound,
                    format!(
                        "{why}: the relay went back (restored from an older backup?); this device reads the channel again from its start so that nothing it numbered again is missed, and what it lost shows as gaps"
                    ),
                ))?;
                // Note changes the relay lost, this device's and others' it
                // had, reach the members that missed them: a snapshot of the
                // vault, published once the channel is read again. One at a
                // time: a relay going back again and again before the outbox
                // goes out does not pile them up.
                if !change.channel.is_removed() && !change.rewind_snapshot_unsent()? {
                    snapshot = crate::notes::vault::queue_snapshot(change)?;
                    if snapshot > 0 {
                        change.rewind_snapshot_queued()?;
                    }
                }
                rewound = true;
            }
            cursor = change.cursor;
            Ok(())
        })?;
        // Not `change`'s fetch_max: the cursor goes down.
        self.inner.cursor.store(cursor, Ordering::Relaxed);
        self.inner.changed.notify_waiters();
        if rewound {
            warn!(
                cursor = asked,
                why,
                snapshot_parts = snapshot,
                "the relay went back behind this device's cursor; reading the channel again from its start (and publishing the notes snapshot queued, if any parts)"
            );
        }
        Ok(())
    }

    /// The relay stored each envelope `sender_seq` as `seq`: they leave the
    /// outbox and are recorded as acked, in one transaction.
    pub(crate) fn acked_all(&self, acks: &[(u64, u64)]) -> Result<(), ClientError> {
        for &(_, seq) in acks {
            relay_seq(seq, "an ack")?;
        }
        self.db().acked(acks)?;
        self.inner.changed.notify_waiters();
        Ok(())
    }

    /// The relay sequence number of this device's commit `sender_seq`, once
    /// it has won its epoch (taken in by this process or another on the home).
    pub(crate) fn commit_seq(&self, sender_seq: u64) -> Result<Option<u64>, ClientError> {
        self.db().commit_seq(sender_seq)
    }

    /// Keeps the message secrets of the last `past_epochs` epochs (0 to
    /// [`MAX_PAST_EPOCHS`](crate::channel::group::MAX_PAST_EPOCHS); 3 unless
    /// set) for messages that arrive late; older ones are deleted. Fewer is
    /// more forward secrecy.
    pub fn set_past_epochs(&self, past_epochs: usize) -> Result<(), ClientError> {
        self.change(|change| Ok(change.channel.set_past_epochs(past_epochs)?))
    }

    /// The relay refused envelope `sender_seq` for good (not for quota, which
    /// passes): it leaves the outbox, becomes an incident, and a `send`
    /// waiting for it gets the error.
    pub(crate) fn refused(
        &self,
        sender_seq: u64,
        code: ErrorCode,
        message: &str,
    ) -> Result<(), ClientError> {
        warn!(sender_seq, code = code.as_str(), %message, "the relay refused one of this device's envelopes");
        let detail = format!(
            "the relay would not store this device's message #{sender_seq}: {message} ({})",
            code.as_str()
        );
        let refusal = Refusal::new(code, message);
        self.change(|change| {
            if code == ErrorCode::Conflict && change.resealed(sender_seq)? {
                // The relay holds the first sealing of this message, stored
                // after its connection was lost: it is settled as acked when
                // it comes back in the channel.
                debug!(
                    sender_seq,
                    "the relay holds the first sealing of a resealed message"
                );
                return Ok(());
            }
            if !change.unqueue(sender_seq)? {
                // Taken in already by another process on this home, or a
                // number this device never queued: nothing to record.
                warn!(sender_seq, "the refused envelope is no longer queued here");
                return Ok(());
            }
            change.refused(sender_seq, &refusal)?;
            if let Some(intent) = change.channel.abandon(sender_seq)? {
                warn!(
                    ?intent,
                    "the refused envelope was this device's change of membership; it was dropped"
                );
            }
            change.record(&Incident::other(
                0,
                IncidentKind::NotPublished,
                detail.clone(),
            ))
        })?;
        self.inner.changed.notify_waiters();
        Ok(())
    }

    /// The error the relay gave for envelope `sender_seq`, if it refused it
    /// (whichever process on this home took the refusal in).
    pub(crate) fn refusal_of(&self, sender_seq: u64) -> Result<Option<ClientError>, ClientError> {
        Ok(self
            .db()
            .refusal_of(sender_seq)?
            .map(|refusal| ClientError::refused(refusal, 0)))
    }

    /// Runs `f` on this device on tokio's blocking pool: state changes sync
    /// the disk and run MLS, which must not stall the async workers.
    pub(crate) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Device) -> Result<T, ClientError> + Send + 'static,
    ) -> Result<T, ClientError> {
        let device = self.clone();
        tokio::task::spawn_blocking(move || f(&device))
            .await
            .map_err(ClientError::task_failed)?
    }

    /// [`ingest`](Self::ingest) off the async threads, for a batch as it was
    /// read from the relay.
    pub(crate) async fn take_in(
        &self,
        after: u64,
        batch: Vec<(u64, Vec<u8>)>,
    ) -> Result<Ingested, ClientError> {
        self.blocking(move |device| {
            let batch: Vec<(u64, &[u8])> =
                batch.iter().map(|(seq, e)| (*seq, e.as_slice())).collect();
            device.ingest(after, &batch)
        })
        .await
    }

    /// Takes in envelopes from the relay, in relay order: each goes through the
    /// channel (commits applied, messages opened, refusals recorded), app
    /// messages go to the inbox, and the cursor moves — all in one transaction
    /// (one disk sync for a whole batch). Envelopes at or below the cursor on
    /// disk are skipped, so a redelivery, or one another process on the same
    /// home took in already, is never seen twice.
    ///
    /// Own envelopes coming back settle their outbox entries (the relay stored
    /// them though the ack was lost), and a batch that moves the epoch on
    /// seals the outbox's messages again in the new one, all of them, in
    /// order (what the live connection wrote already goes on as written, and
    /// its new sealing is used if it has to go again). Returns whether it did:
    /// envelopes waiting to be written must then be read again.
    ///
    /// `batch` follows on from relay sequence number `after` (where the
    /// connection or request resumed, or the last batch it took in). A
    /// cursor on disk behind it went back since: another process on this
    /// home found the relay went back and reads the channel again. Then
    /// nothing is taken in (it would move the cursor past what that process
    /// has still to read), the cursor is set to the one on disk, and the
    /// caller resumes from it.
    pub(crate) fn ingest(
        &self,
        after: u64,
        batch: &[(u64, &[u8])],
    ) -> Result<Ingested, ClientError> {
        for &(seq, _) in batch {
            relay_seq(seq, "an envelope")?;
        }
        let now = now_secs();
        let me = self.inner.me;
        let retention = self
            .inner
            .retention_secs
            .load(std::sync::atomic::Ordering::Relaxed);
        let mut behind = None;
        let mut fresh = 0;
        let (incidents, resealed) = self.change(|change| {
            let mut incidents = Vec::new();
            if change.cursor < after {
                behind = Some(change.cursor);
                return Ok((incidents, 0));
            }
            let epoch = change.channel.epoch();
            let reread_until = change.reread_until()?;
            let mut last = None;
            // Own messages the relay stored too late for members to read.
            let mut too_late = Vec::new();
            for &(seq, envelope) in batch {
                if seq <= change.cursor {
                    continue;
                }
                if let Ok(header) = EnvelopeHeader::decode(envelope)
                    && header.sender == me
                {
                    change.settle_own(header.seq, seq, envelope)?;
                    // Only a sealing this device made tells, by its header,
                    // where the message stands (a relay can forge headers).
                    if change.own_sealing(header.seq, envelope)? {
                        let behind = change
                            .channel
                            .epoch()
                            .saturating_sub(u64::from(header.epoch));
                        if behind > PAST_EPOCHS as u64 && !change.queued(header.seq)? {
                            too_late.push((header.seq, seq));
                        } else {
                            change.forget_plaintext(header.seq)?;
                        }
                    }
                }
                let taken = change.channel.take_in(envelope, now);
                // Read again after the relay went back, an envelope counts
                // if it was news (taken in before, it is refused as a
                // replay, or passed over as a commit of an epoch gone by).
                if seq > reread_until || taken.event.as_ref().is_some_and(|e| *e != Event::Nothing) {
                    fresh += 1;
                }
                for refusal in taken.refusals {
                    // Read again after the relay went back: taken in before.
                    if refusal.kind == IncidentKind::Replayed && seq <= reread_until {
                        continue;
                    }
                    incidents.push(Incident::refused(seq, refusal));
                }
                for outgoing in &taken.outgoing {
                    change.queue(outgoing)?;
                }
                match taken.event {
                    Some(Event::App { sender, plaintext }) => match Control::decode(&plaintext) {
                        Ok(Control::App(body)) => change.deliver(&InboxMessage {
                            seq,
                            from: sender.id,
                            from_name: sender.name,
                            body,
                        })?,
                        Ok(Control::Joined) => change.joined(sender.id)?,
                        Ok(Control::Notes(message)) => {
                            incidents.extend(crate::notes::store::take_in(
                                change.conn(),
                                me,
                                seq,
                                sender.id,
                                &message,
                                now,
                            )?);
                        }
                        Err(e) => incidents.push(Incident::other(
                            seq,
                            IncidentKind::Malformed,
                            format!("undecodable message skipped: {e}"),
                        )),
                    },
                    Some(Event::OwnCommit(intent)) => {
                        if let Ok(header) = EnvelopeHeader::decode(envelope) {
                            change.committed(header.seq, seq)?;
                        }
                        tracing::debug!(seq, ?intent, "this device's commit holds");
                    }
                    Some(event) => tracing::debug!(seq, ?event, "channel event"),
                    None => {}
                }
                change.cursor = seq;
                last = Some((seq, envelope));
            }
            if let Some((seq, envelope)) = last {
                change.took_in(seq, envelope)?;
            }
            // Before anything new is sealed in the new epoch: the outbox keeps
            // its order in the epoch's key generations too.
            let resealed = if change.channel.epoch() != epoch {
                change.reseal_stale()?
            } else {
                0
            };
            // Stored behind more commits than members keep epochs for (it was
            // on its way while they reached the relay): members cannot read
            // it, so it goes again as a new message, after the outbox.
            for (sender_seq, seq) in too_late {
                if let Some(plaintext) = change.plaintext(sender_seq)?
                    && !change.channel.is_removed()
                {
                    match change.channel.seal(&plaintext) {
                        Ok(outgoing) => {
                            change.queue_message(&outgoing, &plaintext)?;
                            warn!(
                                sender_seq,
                                again = outgoing.seq,
                                "the relay stored a message of this device too late for members to read; sent again"
                            );
                        }
                        Err(e) => incidents.push(Incident::other(
                            seq,
                            IncidentKind::NotPublished,
                            format!(
                                "the relay stored this device's message #{sender_seq} too late for members to read, and it could not be sent again: {e}"
                            ),
                        )),
                    }
                }
                change.forget_plaintext(sender_seq)?;
            }
            change.forget_settled_plaintexts()?;
            if retention > 0 {
                crate::notes::store::set_retention(change.conn(), retention)?;
            }
            if !change.channel.is_removed()
                && crate::notes::store::snapshot_due(change.conn(), me, now)?
            {
                crate::notes::vault::queue_snapshot(change)?;
            }
            for incident in &incidents {
                change.record(incident)?;
            }
            Ok((incidents, resealed))
        })?;
        if resealed > 0 {
            debug!(resealed, "messages sealed again in the new epoch");
        }
        for incident in &incidents {
            warn!(seq = incident.seq, kind = incident.kind.as_str(), detail = %incident.detail, "envelope refused or missing");
        }
        if let Some(cursor) = behind {
            self.inner
                .cursor
                .store(cursor, std::sync::atomic::Ordering::Relaxed);
            warn!(
                cursor,
                after,
                "another process on this home went back behind this one's cursor; resuming from its"
            );
            return Ok(Ingested::Behind);
        }
        Ok(Ingested::Taken {
            resealed: resealed > 0,
            fresh,
        })
    }

    /// Keeps the relay's retention, as `ready` or a `/sync` answer said it,
    /// at most a century: the snapshot schedule computes with it.
    pub(crate) fn heard_retention(&self, secs: u64) {
        let secs = secs.min(MAX_RETENTION_SECS);
        self.inner
            .retention_secs
            .store(secs, std::sync::atomic::Ordering::Relaxed);
    }

    /// Catches up over `POST /sync`: fetches and takes in everything after the
    /// cursor, then publishes the outbox (sealed again in the current epoch
    /// where taking in moved it on) and what taking in queued (a re-issued
    /// commit). For apps that wake briefly. Returns how many envelopes were
    /// taken in.
    pub async fn sync(&self) -> Result<usize, ClientError> {
        self.sync_with_progress(|_| {}).await
    }

    /// [`sync`](Self::sync), calling `progress` after each page it takes in
    /// (a long first sync can tell the person how far it is).
    pub async fn sync_with_progress(
        &self,
        mut progress: impl FnMut(SyncProgress),
    ) -> Result<usize, ClientError> {
        let mut taken = 0;
        let mut published_up_to = 0;
        // The outbox goes out a page per request.
        let page = &self.inner.publish_page;
        let unsent = |after: u64| {
            let budget = page.load(std::sync::atomic::Ordering::Relaxed);
            self.blocking(move |device| device.db().outbox_after(after, budget))
        };
        // Nothing goes out before the channel is taken in: a message sealed
        // before commits this device has not seen would be stored behind
        // them, where members may no longer hold its epoch's secrets.
        let mut outbox: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut caught_up = false;
        let mut kept_back = false;
        let mut went_back = false;
        // The first request also checks that the relay still holds, at the
        // cursor, the envelope this device took in there.
        let mut first = Some(self.blocking(|device| device.resume()).await?);
        loop {
            let resume = first.take().unwrap_or_else(|| Resume::at(self.cursor()));
            let request = SyncRequest {
                cursor: resume.from(),
                publish: outbox.iter().map(|(_, e)| B64(e.clone())).collect(),
                limit: None,
            };
            let response: SyncResponse =
                match self.call(Method::POST, "/sync", Some(&request)).await {
                    Err(ClientError::Relay {
                        code: ErrorCode::TooLarge,
                        ..
                    }) if outbox.len() > 1 => {
                        // The relay takes less in one request than this page (a
                        // frame limit below the default, or a proxy's): it stored
                        // none of it. The same envelopes go out in halves, and
                        // later syncs start from the smaller page.
                        let sent: usize = outbox.iter().map(|(_, e)| e.len()).sum();
                        page.fetch_min(sent / 2, std::sync::atomic::Ordering::Relaxed);
                        outbox = unsent(published_up_to).await?;
                        continue;
                    }
                    answer => answer?,
                };
            relay_seq(response.head, "its newest envelope")?;
            for envelope in &response.envelopes {
                relay_seq(envelope.seq, "an envelope")?;
            }
            for seq in response.acks.iter().filter_map(|ack| ack.seq) {
                relay_seq(seq, "an ack")?;
            }
            if let Some(secs) = response.retention_secs {
                self.heard_retention(secs);
            }
            let mut acked = Vec::new();
            for ((sender_seq, _), ack) in outbox.iter().zip(&response.acks) {
                match (&ack.seq, &ack.error) {
                    (Some(seq), _) => acked.push((*sender_seq, *seq)),
                    // Kept, and sent again later (the channel's room, the
                    // relay's storage, a passing failure).
                    (None, Some(e)) if e.code.keeps_envelope() => kept_back = true,
                    (None, Some(e)) => {
                        let (sender_seq, code, message) = (*sender_seq, e.code, e.message.clone());
                        self.blocking(move |device| device.refused(sender_seq, code, &message))
                            .await?;
                    }
                    (None, None) => {}
                }
            }
            if !acked.is_empty() {
                self.blocking(move |device| device.acked_all(&acked))
                    .await?;
            }
            published_up_to = outbox.last().map_or(published_up_to, |(s, _)| *s);
            let back = resume.behind(response.head).or_else(|| {
                let first = response.envelopes.first()?;
                resume.replaced((first.seq, &first.envelope))
            });
            if let Some(why) = back {
                // The relay went back (an older backup): read the channel
                // again before publishing more.
                if went_back {
                    return Err(ClientError::Protocol(format!(
                        "the relay went back twice in one sync ({why}); the sync stopped instead of following it"
                    )));
                }
                went_back = true;
                self.blocking(move |device| device.relay_went_back(resume, &why))
                    .await?;
                caught_up = false;
                outbox = Vec::new();
                continue;
            }
            let more = response.more;
            let head = response.head;
            let batch: Vec<(u64, Vec<u8>)> = response
                .envelopes
                .into_iter()
                .map(|d| (d.seq, d.envelope))
                .collect();
            let count = batch.len();
            // Asked again, a relay that returns nothing after the cursor
            // while it says more follows would be asked forever.
            if more && count > 0 && batch.iter().all(|(seq, _)| *seq <= request.cursor) {
                return Err(ClientError::Protocol(format!(
                    "the relay said more envelopes follow but sent none after the cursor ({}); the sync stopped instead of asking again",
                    request.cursor
                )));
            }
            let Ingested::Taken { fresh, .. } = self.take_in(request.cursor, batch).await? else {
                // Another process on this home went back: from its cursor.
                caught_up = false;
                outbox = Vec::new();
                continue;
            };
            taken += fresh;
            progress(SyncProgress {
                taken,
                remaining: head.saturating_sub(self.cursor()),
            });
            // The rest of the outbox, and what was queued meanwhile, goes
            // out with the next page — unless the relay kept one back: a
            // later page stored ahead of it would leave it out of order for
            // good (and over quota the rest would only be refused too). The
            // next sync sends them all again, oldest first.
            let now_caught_up = !caught_up && (!more || count == 0);
            caught_up |= now_caught_up;
            if now_caught_up {
                // What a dropped connection wrote and the relay did not store.
                self.blocking(|device| device.reseal_stale()).await?;
            }
            outbox = if kept_back || !caught_up {
                Vec::new()
            } else {
                unsent(published_up_to).await?
            };
            if (!more || count == 0) && outbox.is_empty() {
                break;
            }
        }
        if self.removed_seen() {
            return Err(ClientError::Revoked);
        }
        Ok(taken)
    }

    /// The oldest message the app has not marked read.
    pub fn next_unread(&self) -> Result<Option<Message>, ClientError> {
        self.db().next_unread()
    }

    /// Envelopes this device refused (tampered, forged, replayed, from a
    /// removed device, from a fork…), gaps it noticed, and its own envelopes
    /// the relay would not store, oldest first; the newest
    /// [`KEPT`](super::incident::KEPT) are kept. None of the refused envelopes
    /// reached the inbox.
    pub fn incidents(&self) -> Result<Vec<Incident>, ClientError> {
        self.db().incidents()
    }

    /// Marks every message up to `seq` read (they leave the inbox).
    pub fn mark_read(&self, seq: u64) -> Result<(), ClientError> {
        self.db().mark_read(seq)
    }

    /// Secrets this device holds — relay token, MLS signature key, an epoch
    /// secret — for the harness's secret scanner.
    #[cfg(feature = "testing")]
    pub fn secrets_for_scan(&self) -> Vec<(String, Vec<u8>)> {
        let mut secrets = vec![("relay token".to_owned(), self.inner.token.expose().to_vec())];
        if let Ok((channel, _)) = self.db().channel() {
            secrets.extend(channel.secrets_for_scan());
        }
        secrets
    }

    /// Seals `plaintext` as it is (no content type added) into the outbox:
    /// what a member with a modified SDK can send. For attack tests only.
    #[cfg(feature = "testing")]
    pub fn queue_raw_for_testing_only(&self, plaintext: &[u8]) -> Result<u64, ClientError> {
        self.change(|change| {
            let outgoing = change.channel.seal(plaintext)?;
            change.queue(&outgoing)?;
            Ok(outgoing.seq)
        })
    }

    /// The device's channel as it is on disk, to drive by hand: what a
    /// device's owner (or a thief) holds. For attack tests only.
    #[cfg(feature = "testing")]
    pub fn channel_for_testing_only(&self) -> Result<Channel, ClientError> {
        Ok(self.db().channel()?.0)
    }

    /// Whether a commit removed this device (read from the state file, so a
    /// removal another process took in is seen too).
    pub fn is_removed(&self) -> bool {
        self.removed_seen()
            || self
                .db()
                .channel()
                .map(|(c, _)| c.is_removed())
                .unwrap_or(false)
    }

    /// Whether a change in this process saw this device removed: no disk read.
    pub(crate) fn removed_seen(&self) -> bool {
        self.inner
            .removed
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Syncs until this device's own commit has been ordered by the relay
    /// (won its epoch, or lost and was re-issued until one won), for at most
    /// `wait`.
    pub(crate) async fn settle(&self, wait: Duration) -> Result<(), ClientError> {
        let deadline = Instant::now() + wait;
        loop {
            match self.sync().await {
                Ok(_) => {}
                Err(e) if e.is_transient() && Instant::now() < deadline => {}
                Err(e) => return Err(e),
            }
            let settled = self
                .blocking(|device| Ok(device.db().channel()?.0.pending().is_none()))
                .await?;
            if settled {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Timeout(wait.as_secs()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Removes `device` from the channel: the relay revokes its token and
    /// closes its sessions, and an MLS commit removes it from the group, so
    /// no later epoch's secrets reach it. Returns once the relay has ordered
    /// the commit (if another member's commit won the epoch, this device's is
    /// re-issued in the next one).
    pub async fn remove(&self, device: DeviceId) -> Result<(), ClientError> {
        if device == self.inner.me {
            return Err(ClientError::Invalid(
                "a device cannot remove itself; remove it from another device".into(),
            ));
        }
        // Settle anything pending first: one change of membership at a time.
        self.settle(SETTLE_WAIT).await?;
        let members = self.blocking(|device| device.members()).await?;
        if !members.iter().any(|m| m.id == device) {
            return Err(ClientError::Invalid(format!(
                "device {device} is not a member of this channel (see `khub devices`)"
            )));
        }
        self.revoke_at_relay(device).await?;
        self.commit_removal(device).await
    }

    /// Revokes `device`'s token at the relay, which closes its sessions. A
    /// device the relay never admitted leaves nothing to revoke.
    pub(crate) async fn revoke_at_relay(&self, device: DeviceId) -> Result<(), ClientError> {
        let path = format!("/channels/{}/devices/{}", self.inner.channel, device);
        match self
            .call::<DeviceList>(Method::DELETE, &path, None::<&()>)
            .await
        {
            Ok(_)
            | Err(ClientError::Relay {
                code: ErrorCode::NotFound,
                ..
            }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Commits the removal of member `device`, waits until the relay has
    /// ordered it, and checks that it took effect: a commit the relay
    /// refused for good is dropped, and the device would still be a member.
    pub(crate) async fn commit_removal(&self, device: DeviceId) -> Result<(), ClientError> {
        let (seq, ()) = self
            .blocking(move |me| {
                me.queue_commit(|channel| channel.commit_remove(&[device]).map(|o| (o, ())))
            })
            .await?;
        self.settle(SETTLE_WAIT).await?;
        let (members, refusal) = self
            .blocking(move |me| Ok((me.members()?, me.refusal_of(seq)?)))
            .await?;
        if !members.iter().any(|m| m.id == device) {
            return Ok(());
        }
        let why = match refusal {
            Some(e) => format!("the relay refused its commit: {e}"),
            None => "its commit was not applied".to_owned(),
        };
        Err(ClientError::NotRemoved { device, why })
    }
}

/// Refuses a relay sequence number `seq` (of `what`) past [`MAX_SEQ`] as
/// the relay's fault: nothing of that answer is taken in (a device that
/// took it in would have no inbox numbers left after it).
pub(crate) fn relay_seq(seq: u64, what: &str) -> Result<(), ClientError> {
    if seq > MAX_SEQ {
        return Err(ClientError::Protocol(format!(
            "the relay numbered {what} #{seq}, past the highest relay sequence number ({MAX_SEQ}); it was not taken in"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Resume;
    use crate::client::state::envelope_hash;

    #[test]
    fn a_resume_checks_the_head_and_the_envelope_at_its_cursor_only() {
        let taken = b"taken in at 7";
        let resume = Resume {
            cursor: 7,
            check: Some(envelope_hash(taken)),
        };
        assert_eq!(resume.from(), 6, "the envelope at the cursor comes again");
        assert!(resume.behind(7).is_none() && resume.behind(9).is_none());
        assert!(resume.behind(6).is_some());
        assert!(resume.replaced((7, taken)).is_none());
        assert!(resume.replaced((7, b"another")).is_some());
        // The one at the cursor was pruned: nothing to tell by.
        assert!(resume.replaced((8, b"another")).is_none());

        let unknown = Resume::at(7);
        assert_eq!(unknown.from(), 7);
        assert!(unknown.replaced((7, b"another")).is_none());
        assert!(unknown.behind(6).is_some());
    }
}

#[cfg(all(test, feature = "testing"))]
mod home_tests {
    use std::time::Duration;

    use super::{Device, IncidentKind, Ingested};
    use crate::relay::config::Limits;
    use crate::testing::{TempDir, TestRelay, paired_devices};

    async fn in_time<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(30), future)
            .await
            .expect("in time")
    }

    /// Another process on the same home (a second handle, with its cursor in
    /// memory) that goes on while the first reads the channel again after the
    /// relay went back follows the cursor on disk: it does not resume from
    /// its own, nor take in a batch that follows on from it (either would
    /// move the cursor past what the first has still to read, for good).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_process_follows_a_cursor_that_went_back() {
        let relay = TestRelay::start(Limits::default()).await.unwrap();
        let home = TempDir::new("went-back");
        let paired = in_time(paired_devices(home.path(), &[relay.url(), relay.url()]))
            .await
            .unwrap();
        let (sender, first) = (&paired.devices[0], &paired.devices[1]);
        for n in 0..3 {
            sender.queue(format!("message {n}").as_bytes()).unwrap();
        }
        in_time(sender.sync()).await.unwrap();
        in_time(first.sync()).await.unwrap();
        let second = Device::open(first.home()).unwrap();
        let cursor = first.cursor();
        assert_eq!(second.cursor(), cursor);

        first
            .relay_went_back(first.resume().unwrap(), "as if")
            .unwrap();
        assert_eq!(first.cursor(), 0);
        assert_eq!(second.resume().unwrap().cursor, 0);
        assert_eq!(second.cursor(), 0);
        // A session of the second's that resumed before the first went back.
        let batch: Vec<(u64, &[u8])> = vec![(cursor + 1, b"a delivery after the old cursor")];
        assert_eq!(second.ingest(cursor, &batch).unwrap(), Ingested::Behind);
        assert_eq!(second.cursor(), 0);

        // Read again from the start: everything taken in before is a
        // replay, reported nowhere; nothing reaches the inbox twice.
        in_time(second.sync()).await.unwrap();
        assert_eq!(second.cursor(), cursor);
        let kinds: Vec<IncidentKind> = second.incidents().unwrap().iter().map(|i| i.kind).collect();
        assert_eq!(kinds, [IncidentKind::RelayRewound]);
        let mut unread = 0;
        while let Some(message) = second.next_unread().unwrap() {
            second.mark_read(message.seq).unwrap();
            unread += 1;
        }
        assert_eq!(unread, 3);
    }
}
