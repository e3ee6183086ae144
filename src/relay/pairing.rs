//! Pairing slots: the mailbox through which the two sides' pairing messages pass.
//!
//! The inviter opens a slot and gets a **nameplate** drawn at random among the
//! free ones of a short range (which grows only when many slots are open, so
//! codes stay short and a racing claimer cannot predict the next one); the joiner
//! claims it (once — a second claimant is refused) and gets the session id and a
//! claim token for the rest of the exchange. Each side posts messages for the
//! other and long-polls for the other's. The relay reads only the first byte of
//! each message (its public type) to tell a completed pairing from a failed one
//! in its metrics.
//!
//! A slot dies when either side ends it, when a side sends an Abort, or when its
//! TTL passes. Its nameplate then rests for one TTL before reuse, so a late claim
//! with an old code gets "this pairing has ended" instead of reaching, and
//! burning, somebody else's new pairing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::metrics::Metrics;
use super::store::BoxFuture;
use crate::crypto::token::{AccessToken, TokenHash};
use crate::ids::{ChannelId, DeviceId};
use crate::pairing::code::MAX_NAMEPLATE;
use crate::pairing::message::MAX_MESSAGE_LEN;
use crate::protocol::{ErrorCode, Refusal};

/// Default most messages one side may post into a slot: the protocol needs
/// two (Start and Finish, or Response) and an Abort; anything beyond is abuse.
pub const MAX_MESSAGES_PER_SIDE: usize = 4;
/// Default most slots one device may hold open at once.
pub const MAX_SLOTS_PER_DEVICE: usize = 4;
/// Default most slots one channel's devices may hold open at once.
pub const MAX_SLOTS_PER_CHANNEL: usize = 16;

/// How much of the mailbox one pairing, device and channel may hold.
#[derive(Debug, Clone, Copy)]
pub struct SlotBounds {
    /// Slots open across the relay.
    pub total: usize,
    /// Slots one device may hold open.
    pub per_device: usize,
    /// Slots one channel's devices may hold open.
    pub per_channel: usize,
    /// Messages one side may post into a slot.
    pub messages_per_side: usize,
}
impl SlotBounds {
    /// Whether one more slot may open, given the slots open in all, by the
    /// inviting device and by its channel.
    pub(crate) fn check_open(
        &self,
        metrics: &Metrics,
        total: usize,
        by_device: usize,
        by_channel: usize,
    ) -> Result<(), Refusal> {
        if total >= self.total {
            return Err(Refusal::new(
                ErrorCode::Unavailable,
                "the relay has too many pairings in progress: try again in a minute",
            ));
        }
        for (held, bound, limit, message) in [
            (
                by_device,
                self.per_device,
                "slots_per_device",
                "this device already has its most pairings open: finish or cancel one first",
            ),
            (
                by_channel,
                self.per_channel,
                "slots_per_channel",
                "this channel already has its most pairings open: finish or cancel some first",
            ),
        ] {
            if held >= bound {
                metrics.breach(limit);
                return Err(Refusal::new(ErrorCode::RateLimited, message));
            }
        }
        Ok(())
    }

    /// Whether a side that has posted `posted` messages may post another.
    pub(crate) fn check_post(&self, metrics: &Metrics, posted: usize) -> Result<(), Refusal> {
        if posted >= self.messages_per_side {
            metrics.breach("pairing_messages");
            return Err(Refusal::new(
                ErrorCode::TooLarge,
                "this side has posted all the messages a pairing needs: make a new code",
            ));
        }
        Ok(())
    }
}

/// Refusal: another device claimed the slot first.
pub(crate) fn already_claimed() -> Refusal {
    Refusal::new(
        ErrorCode::AlreadyClaimed,
        "another device already entered this code: make a new code",
    )
}

/// Refusal: the credentials belong to neither side of the slot.
pub(crate) fn not_a_side() -> Refusal {
    Refusal::new(
        ErrorCode::Unauthorized,
        "these credentials do not belong to this pairing",
    )
}

/// Nameplates are drawn from 1..=max(this, 10 × open slots).
const NAMEPLATE_RANGE: u32 = 100;

/// Type byte of a pairing Finish (the inviter's last message).
pub(crate) const TYPE_FINISH: u8 = 0x03;
/// Type byte of a pairing Abort.
pub(crate) const TYPE_ABORT: u8 = 0x04;

/// The pairing mailbox as the routes see it: [`Slots`] in one process, or
/// `pg::PgMailbox` (feature `postgres`) shared by every node of a relay, so a
/// code shown through one node is claimed through another. Both keep the
/// rules documented on [`Slots`].
pub trait Mailbox: Send + Sync + 'static {
    /// Opens a slot for `inviter` of `channel`; returns its nameplate.
    fn open(
        &self,
        channel: ChannelId,
        inviter: DeviceId,
        sid: [u8; 16],
    ) -> BoxFuture<'_, Result<u32, Refusal>>;
    /// Claims a slot for the joiner. Only the first claim succeeds.
    fn claim(&self, nameplate: u32) -> BoxFuture<'_, Result<Claimed, Refusal>>;
    /// Which side `auth` speaks for, if any.
    fn side<'a>(
        &'a self,
        nameplate: u32,
        auth: &'a SlotAuth,
    ) -> BoxFuture<'a, Result<Side, Refusal>>;
    /// Posts a message from `side` for the other side.
    fn send(
        &self,
        nameplate: u32,
        side: Side,
        message: Vec<u8>,
    ) -> BoxFuture<'_, Result<(), Refusal>>;
    /// Messages for `side` from index `after`, waiting up to `wait` for one.
    fn receive(
        &self,
        nameplate: u32,
        side: Side,
        after: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Received, Refusal>>;
    /// Ends the slot from `side`.
    fn end(&self, nameplate: u32, side: Side) -> BoxFuture<'_, Result<(), Refusal>>;
    /// Buries expired slots; the relay calls this every few seconds.
    fn tick(&self) -> BoxFuture<'_, ()>;
}

impl Mailbox for Slots {
    fn open(
        &self,
        channel: ChannelId,
        inviter: DeviceId,
        sid: [u8; 16],
    ) -> BoxFuture<'_, Result<u32, Refusal>> {
        let opened = Slots::open(self, channel, inviter, sid, &mut crate::crypto::os_rng());
        Box::pin(async move { opened })
    }
    fn claim(&self, nameplate: u32) -> BoxFuture<'_, Result<Claimed, Refusal>> {
        let claimed = Slots::claim(self, nameplate, &mut crate::crypto::os_rng());
        Box::pin(async move { claimed })
    }
    fn side<'a>(
        &'a self,
        nameplate: u32,
        auth: &'a SlotAuth,
    ) -> BoxFuture<'a, Result<Side, Refusal>> {
        let side = Slots::side(self, nameplate, auth);
        Box::pin(async move { side })
    }
    fn send(
        &self,
        nameplate: u32,
        side: Side,
        message: Vec<u8>,
    ) -> BoxFuture<'_, Result<(), Refusal>> {
        let sent = Slots::send(self, nameplate, side, message);
        Box::pin(async move { sent })
    }
    fn receive(
        &self,
        nameplate: u32,
        side: Side,
        after: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Received, Refusal>> {
        Box::pin(Slots::receive(self, nameplate, side, after, wait))
    }
    fn end(&self, nameplate: u32, side: Side) -> BoxFuture<'_, Result<(), Refusal>> {
        let ended = Slots::end(self, nameplate, side);
        Box::pin(async move { ended })
    }
    fn tick(&self) -> BoxFuture<'_, ()> {
        Slots::tick(self);
        Box::pin(async {})
    }
}

/// Which side of a pairing a request comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The member showing the code.
    Inviter,
    /// The device the code is typed into.
    Joiner,
}

/// Refusal: no slot under this nameplate.
pub(crate) fn not_found() -> Refusal {
    Refusal::new(
        ErrorCode::NotFound,
        "no pairing is waiting under this number: check the code, or make a new one",
    )
}

/// Refusal: the slot under this nameplate has ended.
pub(crate) fn gone() -> Refusal {
    Refusal::new(ErrorCode::Gone, "this pairing has ended: make a new code")
}

struct Slot {
    channel: ChannelId,
    inviter: DeviceId,
    sid: [u8; 16],
    claim: Option<TokenHash>,
    to_joiner: Vec<Vec<u8>>,
    to_inviter: Vec<Vec<u8>>,
    /// Set when a side ended the slot; the other may still drain its messages.
    ended_by: Option<Side>,
    finished: bool,
    aborted: bool,
    expires: Instant,
    wake: Arc<Notify>,
}

#[derive(Default)]
struct Inner {
    slots: BTreeMap<u32, Slot>,
    /// Nameplates of dead slots, resting until the instant given.
    resting: BTreeMap<u32, Instant>,
}

/// Every open pairing slot of the relay.
pub struct Slots {
    inner: Mutex<Inner>,
    ttl: Duration,
    bounds: SlotBounds,
    metrics: Arc<Metrics>,
}

/// What a joiner receives when it claims a slot.
pub struct Claimed {
    /// The pairing session id.
    pub sid: [u8; 16],
    /// The joiner's claim token.
    pub claim: AccessToken,
    /// Time left.
    pub expires_in: Duration,
}

/// Messages for one side, from index `after` on.
pub struct Received {
    /// The messages.
    pub messages: Vec<Vec<u8>>,
    /// Index to ask from next.
    pub next: usize,
    /// The other side ended the slot.
    pub closed: bool,
}

impl Slots {
    /// Slots living `ttl`, within `bounds`.
    pub fn new(ttl: Duration, bounds: SlotBounds, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            ttl,
            bounds,
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        self.sweep(&mut inner);
        inner
    }

    /// Removes expired slots (counted as failed pairings) and rested nameplates.
    fn sweep(&self, inner: &mut Inner) {
        let now = Instant::now();
        let expired: Vec<u32> = inner
            .slots
            .iter()
            .filter(|(_, s)| s.expires <= now)
            .map(|(n, _)| *n)
            .collect();
        for nameplate in expired {
            self.bury(inner, nameplate, now);
        }
        inner.resting.retain(|_, until| *until > now);
    }

    /// Removes a slot, records its outcome and rests its nameplate.
    fn bury(&self, inner: &mut Inner, nameplate: u32, now: Instant) {
        if let Some(slot) = inner.slots.remove(&nameplate) {
            if slot.finished && !slot.aborted {
                Metrics::inc(&self.metrics.pairings_succeeded);
            } else {
                Metrics::inc(&self.metrics.pairings_failed);
            }
            slot.wake.notify_waiters();
            inner.resting.insert(nameplate, now + self.ttl);
        }
    }

    /// Sweeps now; the relay calls this periodically so metrics stay current.
    pub fn tick(&self) {
        drop(self.lock());
    }

    /// Opens a slot for `inviter` of `channel`; returns its nameplate, drawn
    /// with `rng`.
    pub fn open<R: rand::Rng + ?Sized>(
        &self,
        channel: ChannelId,
        inviter: DeviceId,
        sid: [u8; 16],
        rng: &mut R,
    ) -> Result<u32, Refusal> {
        let mut inner = self.lock();
        let open = |of: &dyn Fn(&Slot) -> bool| inner.slots.values().filter(|s| of(s)).count();
        self.bounds.check_open(
            &self.metrics,
            inner.slots.len(),
            open(&|s| s.inviter == inviter),
            open(&|s| s.channel == channel),
        )?;
        let busy = inner.slots.len() + inner.resting.len();
        let nameplate = free_nameplate(
            busy,
            |n| inner.slots.contains_key(&n) || inner.resting.contains_key(&n),
            rng,
        )
        .ok_or_else(no_free_nameplate)?;
        inner.slots.insert(
            nameplate,
            Slot {
                channel,
                inviter,
                sid,
                claim: None,
                to_joiner: Vec::new(),
                to_inviter: Vec::new(),
                ended_by: None,
                finished: false,
                aborted: false,
                expires: Instant::now() + self.ttl,
                wake: Arc::new(Notify::new()),
            },
        );
        Metrics::inc(&self.metrics.pairings_started);
        Ok(nameplate)
    }

    /// Claims a slot for the joiner. Only the first claim succeeds.
    pub fn claim<R: rand::CryptoRng + ?Sized>(
        &self,
        nameplate: u32,
        rng: &mut R,
    ) -> Result<Claimed, Refusal> {
        let mut inner = self.lock();
        let resting = inner.resting.contains_key(&nameplate);
        let Some(slot) = inner.slots.get_mut(&nameplate) else {
            return Err(if resting { gone() } else { not_found() });
        };
        if slot.ended_by.is_some() {
            return Err(gone());
        }
        if slot.claim.is_some() {
            return Err(already_claimed());
        }
        let claim = AccessToken::generate(rng);
        slot.claim = Some(claim.hash());
        Ok(Claimed {
            sid: slot.sid,
            claim,
            expires_in: slot.expires.saturating_duration_since(Instant::now()),
        })
    }

    /// Which side `auth` speaks for, if any: the inviter by device, the joiner
    /// by claim token. A device other than the inviter hears `gone`, as for a
    /// slot that does not exist: no device can tell which nameplates are open.
    pub fn side(&self, nameplate: u32, auth: &SlotAuth) -> Result<Side, Refusal> {
        let inner = self.lock();
        let slot = inner.slots.get(&nameplate).ok_or_else(gone)?;
        match auth {
            SlotAuth::Device { channel, device }
                if *channel == slot.channel && *device == slot.inviter =>
            {
                Ok(Side::Inviter)
            }
            SlotAuth::Device { .. } => Err(gone()),
            SlotAuth::Claim(token) if slot.claim.is_some_and(|h| h.verify(token)) => {
                Ok(Side::Joiner)
            }
            SlotAuth::Claim(_) => Err(not_a_side()),
        }
    }

    /// Posts a message from `side` for the other side.
    pub fn send(&self, nameplate: u32, side: Side, message: Vec<u8>) -> Result<(), Refusal> {
        check_message(&message)?;
        let mut inner = self.lock();
        let slot = inner.slots.get_mut(&nameplate).ok_or_else(gone)?;
        if slot.ended_by.is_some() {
            return Err(gone());
        }
        let posted = match side {
            Side::Inviter => slot.to_joiner.len(),
            Side::Joiner => slot.to_inviter.len(),
        };
        self.bounds.check_post(&self.metrics, posted)?;
        match message.first() {
            Some(&TYPE_FINISH) if side == Side::Inviter => slot.finished = true,
            // An abort ends the slot: the other side can still read it, then sees
            // `closed`; nothing more can be sent.
            Some(&TYPE_ABORT) => {
                slot.aborted = true;
                slot.ended_by = Some(side);
            }
            _ => {}
        }
        match side {
            Side::Inviter => slot.to_joiner.push(message),
            Side::Joiner => slot.to_inviter.push(message),
        }
        slot.wake.notify_waiters();
        Ok(())
    }

    /// Messages for `side` from index `after`, waiting up to `wait` for one.
    pub async fn receive(
        &self,
        nameplate: u32,
        side: Side,
        after: usize,
        wait: Duration,
    ) -> Result<Received, Refusal> {
        let deadline = Instant::now() + wait;
        loop {
            let wake = Arc::clone(&self.lock().slots.get(&nameplate).ok_or_else(gone)?.wake);
            // Register before checking, so a message posted in between still wakes us.
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(received) = self.try_receive(nameplate, side, after)? {
                return Ok(received);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Received {
                    messages: Vec::new(),
                    next: after,
                    closed: false,
                });
            }
        }
    }

    fn try_receive(
        &self,
        nameplate: u32,
        side: Side,
        after: usize,
    ) -> Result<Option<Received>, Refusal> {
        let mut inner = self.lock();
        let slot = inner.slots.get(&nameplate).ok_or_else(gone)?;
        let queue = match side {
            Side::Inviter => &slot.to_inviter,
            Side::Joiner => &slot.to_joiner,
        };
        let closed = slot.ended_by.is_some_and(|s| s != side);
        if queue.len() <= after && !closed {
            return Ok(None);
        }
        let received = Received {
            messages: queue.get(after..).map(<[_]>::to_vec).unwrap_or_default(),
            next: queue.len(),
            closed,
        };
        if closed {
            // The other side ended it and this one has now read everything.
            self.bury(&mut inner, nameplate, Instant::now());
        }
        Ok(Some(received))
    }

    /// Ends the slot from `side`. The other side can still read what is queued
    /// for it, then sees `closed`.
    pub fn end(&self, nameplate: u32, side: Side) -> Result<(), Refusal> {
        let mut inner = self.lock();
        let slot = inner.slots.get_mut(&nameplate).ok_or_else(gone)?;
        match slot.ended_by {
            Some(first) if first != side => self.bury(&mut inner, nameplate, Instant::now()),
            _ => {
                slot.ended_by = Some(side);
                slot.wake.notify_waiters();
                // Nobody else can still be waiting for an unclaimed slot.
                if slot.claim.is_none() {
                    self.bury(&mut inner, nameplate, Instant::now());
                }
            }
        }
        Ok(())
    }

    /// Open slots (for tests and metrics).
    pub fn open_count(&self) -> usize {
        self.lock().slots.len()
    }
}

/// How a mailbox request authenticated.
pub enum SlotAuth {
    /// Device credentials (already verified against the store).
    Device {
        /// Its channel.
        channel: ChannelId,
        /// The device.
        device: DeviceId,
    },
    /// The joiner's claim token.
    Claim(AccessToken),
}

/// Refusal: every nameplate is open or resting.
pub(crate) fn no_free_nameplate() -> Refusal {
    Refusal::new(
        ErrorCode::Unavailable,
        "no free pairing number: try again in a minute",
    )
}

/// A free nameplate (neither open nor resting; `busy` of them are, and
/// `is_busy` tells which), drawn at random from a range of at least
/// [`NAMEPLATE_RANGE`] numbers and ten per busy one, so that random draws
/// mostly hit; a full scan of the range decides when they miss.
pub(crate) fn free_nameplate<R: rand::Rng + ?Sized>(
    busy: usize,
    is_busy: impl Fn(u32) -> bool,
    rng: &mut R,
) -> Option<u32> {
    use rand::RngExt;
    let wanted = u32::try_from(busy.saturating_mul(10)).unwrap_or(MAX_NAMEPLATE);
    let range = wanted.clamp(NAMEPLATE_RANGE, MAX_NAMEPLATE);
    let free = |n: &u32| !is_busy(*n);
    for _ in 0..32 {
        let n = rng.random_range(1..=range);
        if free(&n) {
            return Some(n);
        }
    }
    let start = rng.random_range(1..=range);
    (start..=range)
        .chain(1..start)
        .chain(range + 1..=MAX_NAMEPLATE)
        .find(free)
}

/// Checks a pairing message's size.
pub(crate) fn check_message(message: &[u8]) -> Result<(), Refusal> {
    if message.is_empty() || message.len() > MAX_MESSAGE_LEN {
        return Err(Refusal::new(
            ErrorCode::TooLarge,
            "a pairing message must be between 1 byte and 64 KiB",
        ));
    }
    Ok(())
}
