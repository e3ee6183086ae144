//! Pairing through the relay's mailbox: [`Device::invite`] on the device that
//! shows the code, [`join`] on the device the code is typed into. Both drive the
//! pure state machines of [`crate::pairing`]; this file only moves their bytes.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use tokio::sync::watch;
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::control::Control;
use super::device::{Device, NewIdentity, now_secs};
use super::error::ClientError;
use super::http::{REQUEST_TIMEOUT, RelayAddr};
use crate::channel::{Joining, Member};
use crate::crypto::os_rng;
use crate::ids::DeviceId;
use crate::pairing::{
    AbortReason, AwaitingResponse, ChannelWelcome, Code, DeviceInfo, Inviter, Joiner, Message,
    Nameplate, PairingError, Sas,
};
use crate::protocol::{
    AdmitDevice, B64, CLAIM_HEADER, DeviceList, ErrorCode, OpenSlot, PairMessage, PairMessages,
    SlotClaimed, SlotOpened, b64,
};

/// Longest single long-poll.
const POLL: Duration = Duration::from_secs(25);
/// The shortest time between two polls that brought nothing.
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How long the inviter waits, after its last pairing message, for the new
/// device's first word in the channel.
const CONFIRM_WAIT: Duration = Duration::from_secs(30);
/// How long the inviter waits for the relay to order its Add commit.
const COMMIT_WAIT: Duration = Duration::from_secs(30);
/// How often the inviter commits the Add again when another member's commit
/// keeps winning the epoch.
const COMMIT_TRIES: usize = 5;

/// Who spoke to the mailbox: the inviter's credentials or the joiner's claim.
struct Mailbox<'a> {
    relay: &'a RelayAddr,
    nameplate: u32,
    header: (&'static str, Zeroizing<String>),
}

impl Mailbox<'_> {
    async fn post(&self, message: &[u8]) -> Result<(), ClientError> {
        let body = serde_json::to_vec(&PairMessage {
            message: B64(message.to_vec()),
        })
        .expect("serialises");
        let path = format!("/pair/{}/messages", self.nameplate);
        self.relay
            .send(
                Method::POST,
                &path,
                &[(self.header.0, self.header.1.as_str())],
                Some(body),
                REQUEST_TIMEOUT,
            )
            .await
            .map(drop)
    }

    /// The message at index `index` from the other side, waiting until
    /// `deadline`; past it, the error `late` makes.
    async fn receive(
        &self,
        index: usize,
        deadline: Instant,
        late: impl Fn() -> ClientError,
    ) -> Result<Vec<u8>, ClientError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(late());
            }
            let asked = Instant::now();
            let got = self.poll(index, left.min(POLL)).await?;
            if let Some(B64(message)) = got.messages.into_iter().next() {
                return Ok(message);
            }
            if got.closed {
                return Err(ClientError::Pairing(PairingError::PeerAborted(
                    AbortReason::Cancelled,
                )));
            }
            // A relay answers an empty poll after waiting; one that answers
            // at once is not asked again at once.
            tokio::time::sleep_until(asked + MIN_POLL_INTERVAL).await;
        }
    }

    /// One long-poll of at most `wait` for messages from index `index` on.
    async fn poll(&self, index: usize, wait: Duration) -> Result<PairMessages, ClientError> {
        let wait = wait.as_secs().max(1);
        let path = format!(
            "/pair/{}/messages?after={index}&wait={wait}",
            self.nameplate
        );
        self.relay
            .json(
                Method::GET,
                &path,
                &[(self.header.0, self.header.1.as_str())],
                None::<&()>,
                Duration::from_secs(wait + 10),
            )
            .await
    }

    /// Tells the other side why, and ends the slot. Best effort: the pairing
    /// has already failed.
    async fn abort(&self, reason: AbortReason) {
        let _ = self.post(&Message::Abort(reason).encode()).await;
        self.end().await;
    }

    async fn end(&self) {
        let path = format!("/pair/{}", self.nameplate);
        let _ = self
            .relay
            .send(
                Method::DELETE,
                &path,
                &[(self.header.0, self.header.1.as_str())],
                None,
                REQUEST_TIMEOUT,
            )
            .await;
    }
}

fn inviter_mailbox<'a>(device: &'a Device, code: &Code) -> Mailbox<'a> {
    Mailbox {
        relay: &device.inner.relay,
        nameplate: code.nameplate().get(),
        header: ("authorization", device.auth_header()),
    }
}

/// A code being shown, waiting for the other device.
pub struct Invitation {
    device: Device,
    code: Code,
    state: AwaitingResponse,
    /// How long the relay keeps the slot.
    expires_in: Duration,
    /// Waiting, cancelled (by a [`CancelInvitation`]) or past the welcome.
    stage: Arc<watch::Sender<Stage>>,
}

/// Where an invitation stands, for a cancel racing the welcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Not yet past the welcome: a cancel applies.
    Waiting,
    /// Cancelled before the welcome.
    Cancelled,
    /// The welcome is going out: the pairing finishes.
    Welcomed,
}

/// Moves `stage` from waiting to `to`; false if it had left waiting already
/// (the cancel and the welcome each win this once, never both).
fn leave_waiting(stage: &watch::Sender<Stage>, to: Stage) -> bool {
    stage.send_if_modified(|s| {
        let waiting = *s == Stage::Waiting;
        if waiting {
            *s = to;
        }
        waiting
    })
}

/// Ends a pairing from outside [`Invitation::complete`] (on Ctrl-C, say): the
/// slot closes at once and the other device hears that this one stopped.
/// A `complete` still running sees it at its next step and undoes what it
/// did (the admission at the relay, the Add in the channel), then returns
/// [`ClientError::Cancelled`] — await it. Once the welcome has gone to the
/// other device the pairing is past cancelling: `complete` finishes it.
#[derive(Clone)]
pub struct CancelInvitation {
    device: Device,
    nameplate: u32,
    stage: Arc<watch::Sender<Stage>>,
}

impl CancelInvitation {
    /// Asks `complete` to stop, tells the other side and ends the slot (best
    /// effort).
    pub async fn cancel(&self) {
        if !leave_waiting(&self.stage, Stage::Cancelled) {
            return; // past the welcome: the pairing finishes
        }
        let mailbox = Mailbox {
            relay: &self.device.inner.relay,
            nameplate: self.nameplate,
            header: ("authorization", self.device.auth_header()),
        };
        mailbox.abort(AbortReason::Cancelled).await;
    }
}

/// The device that joined.
#[derive(Debug, Clone)]
pub struct NewMember {
    /// Its id.
    pub id: DeviceId,
    /// Its name.
    pub name: String,
    /// The short authentication string both screens show.
    pub sas: Sas,
}

impl Device {
    /// Opens a pairing slot and makes the code to show. Complete it with
    /// [`Invitation::complete`].
    pub async fn invite(&self) -> Result<Invitation, ClientError> {
        if self.blocking(|device| Ok(device.is_removed())).await? {
            return Err(ClientError::Revoked);
        }
        let mut rng = os_rng();
        let mut sid = [0u8; 16];
        rand::Rng::fill_bytes(&mut rng, &mut sid);
        let opened: SlotOpened = self
            .call(Method::POST, "/pair", Some(&OpenSlot { sid }))
            .await?;
        let nameplate =
            Nameplate::new(opened.nameplate).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let code = Code::generate(nameplate, &mut rng);
        let (state, start) = Inviter::start(&code, sid, &mut rng);
        let mailbox = inviter_mailbox(self, &code);
        if let Err(e) = mailbox.post(&start).await {
            mailbox.end().await;
            return Err(e);
        }
        Ok(Invitation {
            device: self.clone(),
            code,
            state,
            expires_in: Duration::from_secs(opened.expires_in),
            stage: Arc::new(watch::channel(Stage::Waiting).0),
        })
    }
}

impl Invitation {
    /// The code to show, like `42-7QK3-M9TZ`. Show it; never log it.
    pub fn code(&self) -> Zeroizing<String> {
        self.code.display()
    }

    /// How long the relay keeps the code's slot open.
    pub fn expires_in(&self) -> Duration {
        self.expires_in
    }

    /// A handle that ends this pairing from outside [`complete`](Self::complete).
    pub fn canceller(&self) -> CancelInvitation {
        CancelInvitation {
            device: self.device.clone(),
            nameplate: self.code.nameplate().get(),
            stage: Arc::clone(&self.stage),
        }
    }

    /// Waits up to `timeout` for the other device, confirms the code, admits the
    /// device at the relay, tells the other members, and sends the welcome.
    pub async fn complete(self, timeout: Duration) -> Result<NewMember, ClientError> {
        let Invitation {
            device,
            code,
            state,
            stage,
            ..
        } = self;
        let device = &device;
        let cancelled = || *stage.borrow() == Stage::Cancelled;
        let mut changes = stage.subscribe();
        let mailbox = inviter_mailbox(device, &code);
        let deadline = Instant::now() + timeout;
        // A cancel ends the slot, so the long-poll may end too: the cancel
        // is what this side reports.
        let received = tokio::select! {
            biased;
            _ = changes.wait_for(|s| *s == Stage::Cancelled) => Err(ClientError::Cancelled),
            received = mailbox.receive(0, deadline, || ClientError::PairingTimeout(timeout.as_secs())) => received,
        };
        let response = match received {
            Ok(_) | Err(_) if cancelled() => return Err(ClientError::Cancelled),
            Ok(response) => response,
            Err(e) => {
                mailbox.abort(AbortReason::Cancelled).await;
                return Err(e);
            }
        };
        let admission = match state.receive(&response) {
            Ok(admission) => admission,
            Err(e) => {
                mailbox.abort(e.abort_reason()).await;
                return Err(e.into());
            }
        };
        let joiner = admission.joiner().clone();
        let admit = AdmitDevice {
            device: joiner.id,
            token_hash: crate::crypto::token::TokenHash(joiner.token_hash),
        };
        let path = format!("/channels/{}/devices", device.channel());
        if cancelled() {
            return Err(ClientError::Cancelled);
        }
        let admitted: Result<DeviceList, _> = device.call(Method::POST, &path, Some(&admit)).await;
        // From here a cancel (whose Abort already ended the slot) undoes
        // what was done: the admission, landed or not, and an ordered Add.
        if cancelled() {
            undo_admission(device, joiner.id).await?;
            return Err(ClientError::Cancelled);
        }
        if let Err(e) = admitted {
            mailbox.abort(AbortReason::Refused).await;
            return Err(e);
        }
        let added = commit_add(device, joiner.id, &joiner.key_package).await;
        if cancelled() {
            undo_admission(device, joiner.id).await?;
            return Err(ClientError::Cancelled);
        }
        let (cursor, welcome) = match added {
            Ok(done) => done,
            Err(e) => {
                mailbox.abort(AbortReason::Refused).await;
                undo_after_failure(device, joiner.id).await;
                return Err(e);
            }
        };
        // The new device can read nothing sealed before the Add: a snapshot
        // of the notes, ordered after the commit, gives it every note.
        publish_snapshot_for_joiner(device).await;
        // The point of no return, decided once against a racing cancel: a
        // welcome that goes out is a pairing that finishes.
        if !leave_waiting(&stage, Stage::Welcomed) {
            undo_admission(device, joiner.id).await?;
            return Err(ClientError::Cancelled);
        }
        let welcome = ChannelWelcome {
            channel: device.channel(),
            cursor,
            welcome,
        };
        let (finish, paired) = admission.finish(&welcome, &mut os_rng());
        let confirmed = match mailbox.post(&finish).await {
            Ok(()) => await_joined(device, &mailbox, joiner.id).await,
            Err(e) => Err(e),
        };
        mailbox.end().await;
        if let Err(e) = confirmed {
            // The joiner may never have received the welcome: take the
            // admission back rather than keep a member nobody holds.
            undo_after_failure(device, joiner.id).await;
            return Err(e);
        }
        let name = device
            .blocking(|device| device.members())
            .await?
            .into_iter()
            .find(|m| m.id == joiner.id)
            .map_or_else(|| "new device".to_owned(), |m| m.name);
        Ok(NewMember {
            id: joiner.id,
            name,
            sas: paired.keys.sas,
        })
    }
}

/// Queues a snapshot of the vault and publishes it (best effort: if the
/// relay cannot take it now, it goes out with the next sync, still before
/// anything the joiner writes).
async fn publish_snapshot_for_joiner(device: &Device) {
    let queued = device
        .blocking(|device| device.change(crate::notes::vault::queue_snapshot))
        .await;
    match queued {
        Ok(0) => {}
        Ok(parts) => {
            if let Err(e) = device.sync().await {
                tracing::warn!(error = %e, parts, "the notes snapshot for the new device is queued but not yet published");
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not make a notes snapshot for the new device"),
    }
}

/// Takes back the admission of a device whose pairing did not complete:
/// revokes its token at the relay (whether or not the admission landed)
/// and, once this device's own commits are settled, removes it from the
/// channel if its Add was ordered.
async fn undo_admission(device: &Device, joiner: DeviceId) -> Result<(), ClientError> {
    device.revoke_at_relay(joiner).await?;
    device.settle(COMMIT_WAIT).await?;
    let member = device
        .blocking(move |device| Ok(device.members()?.iter().any(|m| m.id == joiner)))
        .await?;
    if member {
        device.commit_removal(joiner).await?;
    }
    Ok(())
}

/// [`undo_admission`] after a failure, which is what the caller hears; an
/// undo that fails too is logged as an error (the CLI shows those).
async fn undo_after_failure(device: &Device, joiner: DeviceId) {
    if let Err(undo) = undo_admission(device, joiner).await {
        tracing::error!(error = %undo, %joiner, "could not take back the admission of a device whose pairing failed: remove it with `khub remove`");
    }
}

/// Commits the Add of `joiner` and waits until the relay has ordered it first
/// in its epoch; commits again in the next epoch when another member's commit
/// won. Returns the relay sequence number of the commit that holds and the
/// Welcome that goes with it.
async fn commit_add(
    device: &Device,
    joiner: DeviceId,
    key_package: &[u8],
) -> Result<(u64, Vec<u8>), ClientError> {
    device.settle(COMMIT_WAIT).await?;
    for _ in 0..COMMIT_TRIES {
        let key_package = key_package.to_vec();
        let (sender_seq, welcome) = device
            .blocking(move |device| {
                device.queue_commit(|channel| channel.commit_add(joiner, &key_package))
            })
            .await?;
        device.settle(COMMIT_WAIT).await?;
        let won = device
            .blocking(move |device| device.commit_seq(sender_seq))
            .await?;
        match won {
            Some(seq) => return Ok((seq, welcome)),
            None => tracing::info!(
                ?joiner,
                "another member's commit won the epoch; adding again"
            ),
        }
    }
    Err(ClientError::Protocol(format!(
        "other members' changes won {COMMIT_TRIES} epochs in a row; try again"
    )))
}

/// Waits for `joiner`'s "joined" message in the channel — sealed under the
/// MLS group, so only a joiner that took in the Welcome can send it. Fails
/// at once if the joiner aborts instead, and after [`CONFIRM_WAIT`] if
/// nothing comes.
async fn await_joined(
    device: &Device,
    mailbox: &Mailbox<'_>,
    joiner: DeviceId,
) -> Result<(), ClientError> {
    let deadline = Instant::now() + CONFIRM_WAIT;
    let mut slot_open = true;
    loop {
        match device.sync().await {
            Ok(_) => {}
            Err(e) if e.is_transient() => {}
            Err(e) => return Err(e),
        }
        if device
            .blocking(move |device| device.db().has_joined(joiner))
            .await?
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(ClientError::NotConfirmed);
        }
        // Meanwhile, listen for an abort (until the joiner ends the slot,
        // which says nothing either way) with the shortest long-poll, one
        // second, which ends early when a message comes or the slot closes;
        // once it is closed, check the channel every 100 ms.
        let wait = Duration::from_millis(100);
        let got = if slot_open {
            mailbox.poll(1, Duration::from_secs(1)).await.ok()
        } else {
            None
        };
        match got {
            Some(got) => {
                if let Some(B64(message)) = got.messages.into_iter().next() {
                    return Err(match Message::decode(&message) {
                        Ok(Message::Abort(reason)) => PairingError::PeerAborted(reason).into(),
                        _ => ClientError::NotConfirmed,
                    });
                }
                slot_open = !got.closed;
            }
            None => tokio::time::sleep(wait).await,
        }
    }
}

/// What a joining device learns.
#[derive(Debug, Clone)]
pub struct JoinedChannel {
    /// The member that showed the code.
    pub inviter: Member,
    /// The short authentication string both screens show.
    pub sas: Sas,
}

/// The relay's `gone` for the joiner's pairing slot: the code's pairing has
/// ended, said as such rather than as a refusal.
fn code_ended_if_gone(e: ClientError) -> ClientError {
    match e {
        ClientError::Relay {
            code: ErrorCode::Gone,
            ..
        } => ClientError::CodeEnded,
        e => e,
    }
}

/// Pairs a new device named `name` using `code` (typed by a person), through the
/// relay at `relay_url`, and stores it in `home`.
pub async fn join(
    home: &Path,
    relay_url: &str,
    name: &str,
    code: &Code,
    timeout: Duration,
) -> Result<(Device, JoinedChannel), ClientError> {
    let NewIdentity { relay, id, token } = NewIdentity::draw(home, relay_url, name)?;
    let (joining, key_package) = Joining::start(id, name)?;
    let deadline = Instant::now() + timeout;
    let mut rng = os_rng();

    let path = format!("/pair/{}/claim", code.nameplate());
    let claimed: SlotClaimed = relay
        .json(Method::POST, &path, &[], None::<&()>, REQUEST_TIMEOUT)
        .await
        // The slot ended before this device came: its inviter stopped
        // waiting (Ctrl-C, its timeout) or the pairing already ran.
        .map_err(code_ended_if_gone)?;
    let mailbox = Mailbox {
        relay: &relay,
        nameplate: code.nameplate().get(),
        header: (
            CLAIM_HEADER,
            Zeroizing::new(b64::encode(claimed.claim.expose())),
        ),
    };
    let info = DeviceInfo::new(id, token.expose(), key_package);
    // No longer than the slot lives at the relay: past that, the inviter is
    // not coming.
    let slot_ends = Instant::now() + Duration::from_secs(claimed.expires_in);
    let (deadline, waits) = if slot_ends < deadline {
        (slot_ends, claimed.expires_in)
    } else {
        (deadline, timeout.as_secs())
    };
    let late = || ClientError::NoAnswer(waits);
    // The slot ended under this device (the inviter stopped, or its time
    // ran out at the relay): said as such, not as a relay's refusal.
    let cancelled = |e: ClientError| (AbortReason::Cancelled, code_ended_if_gone(e));
    let exchange = async {
        let start = mailbox
            .receive(0, deadline, late)
            .await
            .map_err(cancelled)?;
        let (awaiting, response) = Joiner::respond(code, claimed.sid, &start, &info, &mut rng)
            .map_err(|e| (e.abort_reason(), e.into()))?;
        mailbox.post(&response).await.map_err(cancelled)?;
        let finish = mailbox
            .receive(1, deadline, late)
            .await
            .map_err(cancelled)?;
        awaiting
            .receive(&finish)
            .map_err(|e| (e.abort_reason(), e.into()))
    };
    let joined = match exchange.await {
        Ok(joined) => joined,
        Err((reason, e)) => {
            // Whatever went wrong here, the slot ends now, not at its TTL, and
            // the other side hears why (unless it is the one that stopped).
            match &e {
                ClientError::Pairing(PairingError::PeerAborted(_)) => mailbox.end().await,
                _ => mailbox.abort(reason).await,
            }
            return Err(e);
        }
    };
    mailbox.end().await;
    let sas = joined.keys.sas.clone();
    let welcome = joined.welcome;
    let joined_group = joining
        .join(welcome.channel, &welcome.welcome, now_secs())
        .map_err(|e| {
            ClientError::Peer(format!("the other device's MLS Welcome does not open: {e}"))
        })?;
    let inviter = joined_group.inviter;
    let group = joined_group.channel;
    let device =
        Device::store_new_blocking(home, relay, name, token, group, welcome.cursor).await?;
    // The first word in the channel tells the inviter the pairing completed
    // here too. Without it the inviter removes this device again, so a
    // device that cannot say it is not kept.
    let said = match device
        .blocking(|device| device.queue_control(&Control::Joined))
        .await
    {
        Ok(_) => device.sync().await.map(drop),
        Err(e) => Err(e),
    };
    if let Err(e) = said {
        drop(device);
        let _ = super::state::forget(home);
        return Err(e);
    }
    Ok((device, JoinedChannel { inviter, sas }))
}
