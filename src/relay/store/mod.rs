//! Durable state of the relay behind one trait: channels, their devices (token
//! hashes only), and the envelope log of each channel.
//!
//! Implementations: [`sqlite::SqliteStore`] (the embedded default: WAL, group
//! commit), [`memory::MemoryStore`] (ephemeral, for tests and `--memory`) and,
//! with the `postgres` feature, `postgres::PgStore`, which several relay nodes
//! share. The sessions only see this trait.
//!
//! Contract, for every implementation:
//! - `append` returns only after the envelope is durable (for the store's notion
//!   of durable), so the relay acks only what survives a restart;
//! - each channel's sequence numbers start at 1 and increase by one per stored
//!   envelope, and never go back (even after pruning);
//! - (channel, sender, sender_seq) is unique: appending it again with the same
//!   bytes returns the original sequence number with `duplicate: true`, with
//!   other bytes [`StoreError::Conflict`];
//! - each sender's envelopes are stored in the order of their sender sequence
//!   numbers: one at or below the highest stored for its sender that is not
//!   in the log (never stored, or pruned since) is refused with
//!   [`StoreError::OutOfOrder`] (devices refuse reordered and replayed
//!   envelopes, so storing it would only lose it silently);
//! - an envelope refused with [`StoreError::OverQuota`] holds back its sender's
//!   later ones: they are refused with `OverQuota` too until it is stored, so a
//!   smaller later envelope cannot slip in ahead of it (and make it out of order
//!   for good).

mod file_lock;
pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod sqlite;

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

use crate::crypto::token::TokenHash;
use crate::ids::{ChannelId, DeviceId};

/// Called with the outcome of a committed append.
pub type OnCommit = Box<dyn FnOnce(Appended) + Send>;

/// A boxed future, so that [`Store`] can be used as `dyn Store`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A device as the relay knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    /// The device.
    pub device: DeviceId,
    /// SHA-256 of its access token.
    pub token_hash: TokenHash,
    /// Removed from the channel: its token no longer authenticates.
    pub revoked: bool,
}

/// An envelope to store.
#[derive(Debug, Clone)]
pub struct Append {
    /// Its channel.
    pub channel: ChannelId,
    /// The sending device (already checked against the session).
    pub sender: DeviceId,
    /// The sender's sequence number (from the envelope header).
    pub sender_seq: u64,
    /// The envelope bytes.
    pub envelope: Bytes,
    /// Unix time in seconds, for retention.
    pub now: u64,
    /// The channel's byte quota.
    pub quota: u64,
}

/// Where an appended envelope landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Its sequence number in the channel.
    pub seq: u64,
    /// It was already stored (a retried publish).
    pub duplicate: bool,
}

/// A stored envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEnvelope {
    /// Its sequence number in the channel.
    pub seq: u64,
    /// The envelope bytes.
    pub envelope: Bytes,
}

/// How much of a page a read has filled: it takes envelopes while they fit
/// in the byte budget, and the first whatever its size.
#[derive(Debug)]
pub(crate) struct PageBudget {
    left: usize,
    first: bool,
}

impl PageBudget {
    pub(crate) fn new(max_bytes: usize) -> Self {
        Self {
            left: max_bytes,
            first: true,
        }
    }

    /// Whether an envelope of `len` bytes still goes in (and if so, counts it).
    pub(crate) fn fits(&mut self, len: usize) -> bool {
        let fits = self.first || len <= self.left;
        if fits {
            self.left = self.left.saturating_sub(len);
            self.first = false;
        }
        fits
    }
}

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The channel or device already exists.
    #[error("already exists")]
    Exists,
    /// No such channel or device.
    #[error("not found")]
    NotFound,
    /// The channel has the maximum number of devices.
    #[error("the channel has the maximum of {0} devices")]
    ChannelFull(usize),
    /// Storing the envelope would exceed the channel's quota.
    #[error("the channel stores {used} bytes; this envelope would exceed its quota of {quota}")]
    OverQuota {
        /// Bytes stored now.
        used: u64,
        /// The quota.
        quota: u64,
    },
    /// (sender, sender_seq) is stored with different bytes.
    #[error(
        "sequence number {sender_seq} of this sender is already stored with different contents"
    )]
    Conflict {
        /// The conflicting sender sequence number.
        sender_seq: u64,
    },
    /// A sender sequence number at or below the highest stored for that
    /// sender, and not in the log (never stored, or pruned since).
    #[error(
        "sequence number {sender_seq} of this sender is not stored, and {highest} is stored (or was, before retention): it cannot go in now"
    )]
    OutOfOrder {
        /// The refused sender sequence number.
        sender_seq: u64,
        /// The highest stored for the sender.
        highest: u64,
    },
    /// The backend failed (disk, database); the operation did not happen.
    #[error("storage failure: {0}")]
    Backend(String),
}

/// The relay's durable state. See the module docs for the contract.
pub trait Store: Send + Sync + 'static {
    /// Creates `channel` with `device` as its first member.
    fn create_channel(
        &self,
        channel: ChannelId,
        device: DeviceId,
        token_hash: TokenHash,
        now: u64,
    ) -> BoxFuture<'_, Result<(), StoreError>>;

    /// One device of a channel, revoked or not; `None` if unknown.
    fn device(
        &self,
        channel: ChannelId,
        device: DeviceId,
    ) -> BoxFuture<'_, Result<Option<DeviceRecord>, StoreError>>;

    /// All devices of a channel in the order they joined; [`StoreError::NotFound`] if no such channel.
    fn devices(&self, channel: ChannelId) -> BoxFuture<'_, Result<Vec<DeviceRecord>, StoreError>>;

    /// Adds a device, unless the channel already has `max_devices` active ones.
    fn admit(
        &self,
        channel: ChannelId,
        device: DeviceId,
        token_hash: TokenHash,
        max_devices: usize,
        now: u64,
    ) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Revokes a device's token for good.
    fn revoke(&self, channel: ChannelId, device: DeviceId)
    -> BoxFuture<'_, Result<(), StoreError>>;

    /// Stores an envelope durably (see the contract in the module docs).
    fn append(&self, append: Append) -> BoxFuture<'_, Result<Appended, StoreError>>;

    /// Like [`append`](Self::append), and runs `on_commit` once the envelope is
    /// durable and before the future resolves. Implementations that can should
    /// run the callbacks of one channel in commit order (the relay's cache of
    /// recent envelopes relies on it to stay gap-free); the default runs it when
    /// the append resolves.
    fn append_then(
        &self,
        append: Append,
        on_commit: OnCommit,
    ) -> BoxFuture<'_, Result<Appended, StoreError>> {
        let appended = self.append(append);
        Box::pin(async move {
            let appended = appended.await?;
            on_commit(appended);
            Ok(appended)
        })
    }

    /// Up to `limit` envelopes with sequence numbers above `after`, in order,
    /// and no more of them than fit in `max_bytes` (counting envelope bytes;
    /// the first is returned whatever its size). What one read holds in
    /// memory stays bounded however large a channel's envelopes are: a reader
    /// gets what fits and asks again from the last one.
    fn read_page(
        &self,
        channel: ChannelId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> BoxFuture<'_, Result<Vec<StoredEnvelope>, StoreError>>;

    /// [`read_page`](Self::read_page) without a byte bound, for tools and
    /// tests that read what they wrote; the relay always bounds its reads.
    fn read(
        &self,
        channel: ChannelId,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<StoredEnvelope>, StoreError>> {
        self.read_page(channel, after, limit, usize::MAX)
    }

    /// The channel's newest sequence number (0 if none yet).
    fn head(&self, channel: ChannelId) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Deletes envelopes stored before `before` (Unix seconds); returns how many.
    fn prune(&self, before: u64) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Checks that the backend answers.
    fn health(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Bytes of envelopes stored, over all channels (the storage budget).
    fn stored_bytes(&self) -> BoxFuture<'_, Result<u64, StoreError>>;
}
