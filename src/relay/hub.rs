//! What sessions share: the store, the cross-session wake-up, a cache of recent
//! envelopes per channel, and the publish path.
//!
//! Delivery never pushes into per-session queues. A session keeps its own cursor
//! and pulls what follows it — from the cache while it is current, from the store
//! when it lags — and waits on the [`Notifier`] when caught up. A slow or stalled
//! reader therefore costs nothing but its own cursor: nothing is dropped, and no
//! other session waits for it.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::metrics::Metrics;
use super::store::{Append, Appended, OnCommit, PageBudget, Store, StoreError};
use crate::crypto::envelope::{EnvelopeHeader, MAX_ENVELOPE_LEN};
use crate::ids::{ChannelId, DeviceId};
use crate::protocol::{ErrorCode, Refusal};

/// The highest sender sequence number the relay stores: the databases keep
/// them as signed 64-bit integers, and a device counts from 1.
pub const MAX_SENDER_SEQ: u64 = i64::MAX as u64;

/// Recent envelopes kept in memory per channel: enough that sessions keeping
/// up with a busy channel never fall back to the store.
pub const CACHE_ENTRIES: usize = 4096;
/// Bytes of pre-encoded frames the cache may hold across all channels.
pub const CACHE_BYTES: usize = 64 * 1024 * 1024;
/// Bytes the cache may hold for one channel, so a channel of large notes
/// cannot take the whole budget.
pub const CACHE_CHANNEL_BYTES: usize = 8 * 1024 * 1024;
/// Envelope bytes one fetch for a session returns at most (the first
/// envelope whatever its size): a session blocked on a device that does not
/// read holds this much, not a batch of the largest envelopes.
pub const DELIVERY_BYTES: usize = 4 * 1024 * 1024;

/// Recent envelopes per channel, bounded in entries and total bytes.
#[derive(Default)]
struct Cache {
    channels: HashMap<ChannelId, ChannelCache>,
    bytes: usize,
}

/// One channel's recent envelopes, in sequence order, and their frame bytes.
#[derive(Default)]
struct ChannelCache {
    entries: VecDeque<Ready>,
    bytes: usize,
}

/// What a channel's watchers are told.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelSignal {
    /// The newest stored sequence number.
    pub head: u64,
    /// Bumped whenever a device of the channel is revoked.
    pub revocations: u64,
}

/// Cross-session wake-up. The local implementation uses Tokio watch channels; a
/// multi-node relay implements it over its shared bus.
pub trait Notifier: Send + Sync + 'static {
    /// A new envelope is stored in `channel` up to `head`.
    fn stored(&self, channel: ChannelId, head: u64);
    /// A device of `channel` was revoked: its sessions must re-check.
    fn revoked(&self, channel: ChannelId);
    /// Watches `channel`.
    fn subscribe(&self, channel: ChannelId) -> watch::Receiver<ChannelSignal>;
}

/// In-process [`Notifier`].
#[derive(Default)]
pub struct LocalNotifier {
    channels: Mutex<HashMap<ChannelId, watch::Sender<ChannelSignal>>>,
}

impl LocalNotifier {
    fn update(&self, channel: ChannelId, change: impl FnOnce(&mut ChannelSignal) -> bool) {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sender) = channels.get(&channel) {
            sender.send_if_modified(change);
            if sender.receiver_count() == 0 {
                channels.remove(&channel);
            }
        }
    }

    /// The channels some session watches now.
    pub fn watched(&self) -> Vec<ChannelId> {
        let channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        channels
            .iter()
            .filter(|(_, sender)| sender.receiver_count() > 0)
            .map(|(channel, _)| *channel)
            .collect()
    }
}

impl Notifier for LocalNotifier {
    fn stored(&self, channel: ChannelId, head: u64) {
        self.update(channel, |signal| {
            let newer = head > signal.head;
            signal.head = signal.head.max(head);
            newer
        });
    }

    fn revoked(&self, channel: ChannelId) {
        self.update(channel, |signal| {
            signal.revocations += 1;
            true
        });
    }

    fn subscribe(&self, channel: ChannelId) -> watch::Receiver<ChannelSignal> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        channels
            .entry(channel)
            .or_insert_with(|| watch::channel(ChannelSignal::default()).0)
            .subscribe()
    }
}

/// An envelope ready to deliver: its number, bytes and pre-encoded frame, shared
/// by every session that delivers it.
#[derive(Debug, Clone)]
pub struct Ready {
    /// Relay sequence number.
    pub seq: u64,
    /// Envelope length, for metrics.
    pub len: usize,
    /// The `deliver` frame's JSON text (cheap to clone: reference-counted).
    pub frame: Utf8Bytes,
}

impl Ready {
    /// From the envelope's bytes (a read from the store), encoded straight
    /// into the frame.
    fn new(seq: u64, envelope: &[u8]) -> Self {
        Self::build(
            seq,
            envelope.len(),
            envelope.len().div_ceil(3) * 4,
            |frame| {
                base64::Engine::encode_string(&BASE64, envelope, frame);
            },
        )
    }

    /// Around an envelope already in base64: on the commit path (the SQLite
    /// writer thread, or under the memory store's lock) only a copy is left.
    fn encoded(seq: u64, len: usize, base64: &str) -> Self {
        Self::build(seq, len, base64.len(), |frame| frame.push_str(base64))
    }

    /// The same text `ServerFrame::Deliver` serialises to (a test pins it),
    /// built directly around the envelope's base64, which `body` writes.
    fn build(seq: u64, len: usize, body_len: usize, body: impl FnOnce(&mut String)) -> Self {
        let mut frame = String::with_capacity(body_len + 48);
        frame.push_str("{\"type\":\"deliver\",\"seq\":");
        let _ = write!(frame, "{seq}");
        frame.push_str(",\"envelope\":\"");
        body(&mut frame);
        frame.push_str("\"}");
        Self {
            seq,
            len,
            frame: frame.into(),
        }
    }
}

/// How a `deliver` frame encodes its envelope.
const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// An envelope's text in a `deliver` frame.
fn encode(envelope: &[u8]) -> String {
    base64::Engine::encode(&BASE64, envelope)
}

/// A stored publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Relay sequence number.
    pub seq: u64,
    /// The envelope's sender sequence number.
    pub sender_seq: u64,
    /// Stored before (a retry).
    pub duplicate: bool,
}

/// Maps a store failure onto the protocol's error codes.
pub fn store_error(e: StoreError) -> Refusal {
    let code = match e {
        StoreError::Exists => ErrorCode::Exists,
        StoreError::NotFound => ErrorCode::NotFound,
        StoreError::ChannelFull(_) => ErrorCode::ChannelFull,
        StoreError::OverQuota { .. } => ErrorCode::OverQuota,
        StoreError::Conflict { .. } => ErrorCode::Conflict,
        StoreError::OutOfOrder { .. } => ErrorCode::OutOfOrder,
        StoreError::Backend(_) => ErrorCode::Internal,
    };
    let message = match e {
        // Backend details (paths, SQL) stay in the relay's log.
        StoreError::Backend(detail) => {
            tracing::error!(%detail, "store failure");
            "the relay could not store or read data; retry later".to_owned()
        }
        other => other.to_string(),
    };
    Refusal::new(code, message)
}

/// State shared by every session and route.
pub struct Hub {
    /// Durable state.
    pub store: Arc<dyn Store>,
    /// Cross-session wake-up.
    pub notifier: Arc<dyn Notifier>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    cache: Arc<Mutex<Cache>>,
    max_envelope_bytes: usize,
    quota: u64,
    /// The store holds its whole budget: publishes are refused until
    /// retention frees room (set by the relay's housekeeping).
    storage_full: std::sync::atomic::AtomicBool,
    /// Per sender, its oldest envelope refused because the storage was full:
    /// its later ones are refused too until that one is stored, so that the
    /// sender's envelopes are stored in order (as for the channel quota).
    held_back: Mutex<HashMap<(ChannelId, DeviceId), u64>>,
}

/// Unix time in seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Hub {
    /// A hub over `store` and `notifier`. It stores no envelope longer than
    /// `max_envelope_bytes`, nor than the largest a device opens, whatever
    /// `max_envelope_bytes` says: devices refuse frames that would carry one.
    pub fn new(
        store: Arc<dyn Store>,
        notifier: Arc<dyn Notifier>,
        metrics: Arc<Metrics>,
        max_envelope_bytes: usize,
        quota: u64,
    ) -> Self {
        Self {
            store,
            notifier,
            metrics,
            cache: Arc::new(Mutex::new(Cache::default())),
            max_envelope_bytes: max_envelope_bytes.min(MAX_ENVELOPE_LEN),
            quota,
            storage_full: std::sync::atomic::AtomicBool::new(false),
            held_back: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the store holds its whole budget.
    pub fn storage_full(&self) -> bool {
        self.storage_full.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records whether the store holds its whole budget; returns whether
    /// that changed.
    pub fn set_storage_full(&self, full: bool) -> bool {
        self.storage_full
            .swap(full, std::sync::atomic::Ordering::Relaxed)
            != full
    }

    /// Validates an envelope from `sender` in `channel` and hands it to the
    /// store at once (so a session's publishes are stored in the order it made
    /// them), returning a future that resolves once it is committed. The
    /// channel's sessions are woken on commit too: at once, or for the SQLite
    /// store once per channel after the whole batch (see `relay::wakeups`).
    /// Sessions keep several in flight, which the SQLite store then commits
    /// together.
    pub fn publish(
        &self,
        channel: ChannelId,
        sender: DeviceId,
        envelope: Bytes,
    ) -> impl std::future::Future<Output = Result<Published, Refusal>> + Send + '_ {
        let pending = self.check(channel, sender, &envelope).map(|header| {
            // Cache and wake-up run on commit, in commit order, so the cache
            // never has a hole that would send readers to the store.
            let (cache, notifier, metrics) = (
                Arc::clone(&self.cache),
                Arc::clone(&self.notifier),
                Arc::clone(&self.metrics),
            );
            // Encoded here, on the publisher's task, so that the commit path
            // only copies it into the frame.
            let (len, encoded) = (envelope.len(), encode(&envelope));
            let on_commit: OnCommit = Box::new(move |appended: Appended| {
                if !appended.duplicate {
                    Metrics::inc(&metrics.envelopes_in);
                    metrics
                        .bytes_in
                        .fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
                    remember(&cache, channel, Ready::encoded(appended.seq, len, &encoded));
                }
                // A duplicate too: its first try may have been stored after its
                // caller gave up, without a wake-up (the head only grows).
                super::wakeups::announce(&notifier, channel, appended.seq);
            });
            let append = self.store.append_then(
                Append {
                    channel,
                    sender,
                    sender_seq: header.seq,
                    envelope,
                    now: unix_now(),
                    quota: self.quota,
                },
                on_commit,
            );
            (header, append, std::time::Instant::now())
        });
        async move {
            let (header, append, started) = pending?;
            let appended = append.await.map_err(|e| {
                if matches!(e, StoreError::OverQuota { .. }) {
                    self.metrics.breach("channel_quota");
                }
                store_error(e)
            })?;
            self.metrics.observe_commit(started.elapsed());
            Ok(Published {
                seq: appended.seq,
                sender_seq: header.seq,
                duplicate: appended.duplicate,
            })
        }
    }

    /// Refuses while the storage is full, and holds back a sender's later
    /// envelopes behind its oldest refused one until that one gets through.
    fn check_budget(&self, channel: ChannelId, sender: DeviceId, seq: u64) -> Result<(), Refusal> {
        let mut held = self.held_back.lock().unwrap_or_else(|e| e.into_inner());
        let key = (channel, sender);
        let full = self.storage_full();
        match held.get(&key).copied() {
            Some(first) if seq <= first && !full => {
                held.remove(&key);
                return Ok(());
            }
            Some(first) if seq > first => {
                self.metrics.breach("storage_budget");
                return Err(Refusal::new(
                    ErrorCode::StorageFull,
                    format!(
                        "held back behind envelope #{first} of this device, which the full storage refused; send that one again first"
                    ),
                ));
            }
            _ => {}
        }
        if full {
            let first = held.get(&key).map_or(seq, |first| (*first).min(seq));
            held.insert(key, first);
            if held.len() > 100_000 {
                // Bounded: past 100,000 held senders all are forgotten
                // (those senders then risk an `out_of_order` refusal).
                held.clear();
            }
            self.metrics.breach("storage_budget");
            return Err(Refusal::new(
                ErrorCode::StorageFull,
                "the relay's storage is full (--max-db-mib); keep the message and send it again later",
            ));
        }
        Ok(())
    }

    /// The checks before storing: size, shape, channel, sender.
    fn check(
        &self,
        channel: ChannelId,
        sender: DeviceId,
        envelope: &[u8],
    ) -> Result<EnvelopeHeader, Refusal> {
        if envelope.len() > self.max_envelope_bytes {
            self.metrics.breach("envelope_size");
            return Err(Refusal::new(
                ErrorCode::TooLarge,
                format!(
                    "envelope of {} bytes exceeds the {}-byte limit",
                    envelope.len(),
                    self.max_envelope_bytes
                ),
            ));
        }
        // More than the channel may ever hold: final, where `over_quota`
        // would keep the device sending it again, and holding back its
        // later envelopes behind it, for good.
        if envelope.len() as u64 > self.quota {
            self.metrics.breach("channel_quota");
            return Err(Refusal::new(
                ErrorCode::TooLarge,
                format!(
                    "envelope of {} bytes is more than a channel may store in all ({} bytes, the relay's --channel-quota-mib)",
                    envelope.len(),
                    self.quota
                ),
            ));
        }
        let header = EnvelopeHeader::decode(envelope).map_err(|e| {
            Refusal::new(
                ErrorCode::InvalidEnvelope,
                format!("not a valid envelope: {e}"),
            )
        })?;
        if header.channel != channel {
            return Err(Refusal::new(
                ErrorCode::WrongChannel,
                "the envelope belongs to another channel",
            ));
        }
        if header.sender != sender {
            return Err(Refusal::new(
                ErrorCode::ForbiddenSender,
                "a device can only publish envelopes it sent itself",
            ));
        }
        if header.seq > MAX_SENDER_SEQ {
            return Err(Refusal::new(
                ErrorCode::InvalidEnvelope,
                format!("sender sequence numbers above {MAX_SENDER_SEQ} are not stored"),
            ));
        }
        self.check_budget(channel, sender, header.seq)?;
        Ok(header)
    }

    /// Up to `limit` envelopes after `cursor`, in order, and no more than
    /// [`DELIVERY_BYTES`] of them (the first whatever its size): from the
    /// cache if it holds the next one, otherwise from the store.
    pub async fn fetch(
        &self,
        channel: ChannelId,
        cursor: u64,
        limit: usize,
    ) -> Result<Vec<Ready>, StoreError> {
        {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(ChannelCache { entries, .. }) = cache.channels.get(&channel) {
                // Cached numbers are mostly contiguous: try the slot the
                // cursor would have, then search.
                let guess = entries
                    .front()
                    .and_then(|first| usize::try_from((cursor + 1).checked_sub(first.seq)?).ok());
                let start = match guess {
                    Some(at) if entries.get(at).is_some_and(|e| e.seq == cursor + 1) => at,
                    _ => entries.partition_point(|e| e.seq <= cursor),
                };
                if entries.get(start).is_some_and(|e| e.seq == cursor + 1) {
                    let mut expected = cursor + 1;
                    let mut page = PageBudget::new(DELIVERY_BYTES);
                    let run: Vec<Ready> = entries
                        .range(start..)
                        .take(limit)
                        .take_while(|e| {
                            let contiguous = e.seq == expected;
                            expected += 1;
                            contiguous && page.fits(e.len)
                        })
                        .cloned()
                        .collect();
                    return Ok(run);
                }
            }
        }
        let stored = self
            .store
            .read_page(channel, cursor, limit, DELIVERY_BYTES)
            .await?;
        Ok(stored
            .iter()
            .map(|s| Ready::new(s.seq, &s.envelope))
            .collect())
    }
}

/// Adds a just-stored envelope to the channel's cache, in sequence order.
/// Past the byte budget, other channels' caches go first: they fall back to
/// the store, which is always correct, only slower.
fn remember(cache: &Mutex<Cache>, channel: ChannelId, ready: Ready) {
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    let size = ready.frame.len();
    if size > CACHE_BYTES / 64 {
        return;
    }
    if cache.bytes + size > CACHE_BYTES {
        cache.channels.retain(|c, _| *c == channel);
        cache.bytes = cache.channels.values().map(|c| c.bytes).sum();
    }
    let Cache { channels, bytes } = &mut *cache;
    let ChannelCache {
        entries,
        bytes: channel_bytes,
    } = channels.entry(channel).or_default();
    // Commits come in order: the newest goes last, without a search.
    if entries.back().is_none_or(|e| e.seq < ready.seq) {
        entries.push_back(ready);
    } else {
        let at = entries.partition_point(|e| e.seq < ready.seq);
        if entries.get(at).is_some_and(|e| e.seq == ready.seq) {
            return;
        }
        entries.insert(at, ready);
    }
    *bytes += size;
    *channel_bytes += size;
    while entries.len() > CACHE_ENTRIES
        || (*channel_bytes > CACHE_CHANNEL_BYTES || *bytes > CACHE_BYTES) && !entries.is_empty()
    {
        if let Some(old) = entries.pop_front() {
            *bytes -= old.frame.len();
            *channel_bytes -= old.frame.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ServerFrame;

    #[test]
    fn the_hand_built_deliver_frame_is_the_serialised_one() {
        for envelope in [vec![], vec![0u8; 1], (0..=255u8).collect::<Vec<_>>()] {
            let expected = ServerFrame::Deliver {
                seq: 42,
                envelope: envelope.clone(),
            }
            .to_text();
            assert_eq!(Ready::new(42, &envelope).frame.as_str(), expected);
            let published = Ready::encoded(42, envelope.len(), &encode(&envelope));
            assert_eq!(published.frame.as_str(), expected);
        }
    }

    #[tokio::test]
    async fn a_fetch_from_the_cache_stops_at_its_byte_budget() {
        // The store knows no such channel: only the cache can answer.
        let hub = Hub::new(
            Arc::new(crate::relay::store::memory::MemoryStore::new()),
            Arc::new(LocalNotifier::default()),
            Arc::new(Metrics::default()),
            usize::MAX,
            u64::MAX,
        );
        let channel = ChannelId::random(&mut crate::crypto::os_rng());
        // As large as the cache keeps (a frame of at most 1 MiB).
        let envelope = vec![7u8; 700 * 1024];
        for seq in 1..=7 {
            remember(&hub.cache, channel, Ready::new(seq, &envelope));
        }
        let seqs = |batch: Vec<Ready>| batch.iter().map(|r| r.seq).collect::<Vec<_>>();
        // Five of 700 KiB fit in 4 MiB, a sixth does not.
        assert_eq!(
            seqs(hub.fetch(channel, 0, 64).await.unwrap()),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(seqs(hub.fetch(channel, 5, 64).await.unwrap()), [6, 7]);
        assert_eq!(seqs(hub.fetch(channel, 0, 2).await.unwrap()), [1, 2]);
    }
}
