//! An in-memory [`Store`]: ephemeral, for tests and `khub serve --memory`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use super::{Append, Appended, BoxFuture, DeviceRecord, Store, StoreError, StoredEnvelope};
use crate::crypto::token::TokenHash;
use crate::ids::{ChannelId, DeviceId};

#[derive(Default)]
struct Channel {
    devices: Vec<DeviceRecord>,
    head: u64,
    bytes: u64,
    /// seq → (sender, sender_seq, envelope, stored at)
    log: BTreeMap<u64, (DeviceId, u64, bytes::Bytes, u64)>,
    /// (sender, sender_seq) → seq
    by_sender: HashMap<(DeviceId, u64), u64>,
    /// sender → highest sender_seq stored
    highest: HashMap<DeviceId, u64>,
    /// sender → its oldest sender_seq refused for quota
    quota_blocked: HashMap<DeviceId, u64>,
}

/// All state in one mutex-guarded map; every operation is O(log n) or a copy.
#[derive(Default)]
pub struct MemoryStore {
    channels: Mutex<HashMap<ChannelId, Channel>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<ChannelId, Channel>) -> T) -> T {
        // A panic while holding the lock cannot leave a half-applied change
        // behind (every operation checks before it mutates), so poisoning is ignored.
        let mut guard = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }
}

impl MemoryStore {
    /// One append under the lock. `on_commit` runs under it too, so the
    /// callbacks of concurrent appends run in sequence order.
    fn append_locked(
        &self,
        a: Append,
        on_commit: Option<super::OnCommit>,
    ) -> Result<Appended, StoreError> {
        self.with(|channels| {
            let appended = (|| {
                let c = channels.get_mut(&a.channel).ok_or(StoreError::NotFound)?;
                if let Some(&seq) = c.by_sender.get(&(a.sender, a.sender_seq)) {
                    let same = c
                        .log
                        .get(&seq)
                        .is_some_and(|(_, _, body, _)| *body == a.envelope);
                    return if same {
                        Ok(Appended {
                            seq,
                            duplicate: true,
                        })
                    } else {
                        Err(StoreError::Conflict {
                            sender_seq: a.sender_seq,
                        })
                    };
                }
                // At or below the sender's highest and not in the log: pruned,
                // or never stored. Either way it is not stored now: a pruned
                // copy stored again would reach devices as a replay.
                let highest = c.highest.get(&a.sender).copied().unwrap_or(0);
                if a.sender_seq <= highest {
                    return Err(StoreError::OutOfOrder {
                        sender_seq: a.sender_seq,
                        highest,
                    });
                }
                let size = a.envelope.len() as u64;
                let blocked = c.quota_blocked.get(&a.sender).copied();
                if blocked.is_some_and(|b| a.sender_seq > b) || c.bytes + size > a.quota {
                    // Later envelopes of this sender wait for this one.
                    let b = c.quota_blocked.entry(a.sender).or_insert(a.sender_seq);
                    *b = (*b).min(a.sender_seq);
                    return Err(StoreError::OverQuota {
                        used: c.bytes,
                        quota: a.quota,
                    });
                }
                c.quota_blocked.remove(&a.sender);
                c.head += 1;
                c.bytes += size;
                c.by_sender.insert((a.sender, a.sender_seq), c.head);
                c.highest.insert(a.sender, a.sender_seq);
                c.log
                    .insert(c.head, (a.sender, a.sender_seq, a.envelope, a.now));
                Ok(Appended {
                    seq: c.head,
                    duplicate: false,
                })
            })()?;
            if let Some(on_commit) = on_commit {
                on_commit(appended);
            }
            Ok(appended)
        })
    }
}

fn ready<'a, T: Send + 'a>(value: T) -> BoxFuture<'a, T> {
    Box::pin(std::future::ready(value))
}

impl Store for MemoryStore {
    fn create_channel(
        &self,
        channel: ChannelId,
        device: DeviceId,
        token_hash: TokenHash,
        _now: u64,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        ready(self.with(|channels| {
            if channels.contains_key(&channel) {
                return Err(StoreError::Exists);
            }
            let record = DeviceRecord {
                device,
                token_hash,
                revoked: false,
            };
            channels.insert(
                channel,
                Channel {
                    devices: vec![record],
                    ..Channel::default()
                },
            );
            Ok(())
        }))
    }

    fn device(
        &self,
        channel: ChannelId,
        device: DeviceId,
    ) -> BoxFuture<'_, Result<Option<DeviceRecord>, StoreError>> {
        ready(Ok(self.with(|channels| {
            channels
                .get(&channel)
                .and_then(|c| c.devices.iter().find(|d| d.device == device).cloned())
        })))
    }

    fn devices(&self, channel: ChannelId) -> BoxFuture<'_, Result<Vec<DeviceRecord>, StoreError>> {
        ready(self.with(|channels| {
            channels
                .get(&channel)
                .map(|c| c.devices.clone())
                .ok_or(StoreError::NotFound)
        }))
    }

    fn admit(
        &self,
        channel: ChannelId,
        device: DeviceId,
        token_hash: TokenHash,
        max_devices: usize,
        _now: u64,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        ready(self.with(|channels| {
            let c = channels.get_mut(&channel).ok_or(StoreError::NotFound)?;
            if c.devices.iter().any(|d| d.device == device) {
                return Err(StoreError::Exists);
            }
            if c.devices.iter().filter(|d| !d.revoked).count() >= max_devices {
                return Err(StoreError::ChannelFull(max_devices));
            }
            c.devices.push(DeviceRecord {
                device,
                token_hash,
                revoked: false,
            });
            Ok(())
        }))
    }

    fn revoke(
        &self,
        channel: ChannelId,
        device: DeviceId,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        ready(self.with(|channels| {
            let c = channels.get_mut(&channel).ok_or(StoreError::NotFound)?;
            let d = c
                .devices
                .iter_mut()
                .find(|d| d.device == device)
                .ok_or(StoreError::NotFound)?;
            d.revoked = true;
            Ok(())
        }))
    }

    fn append(&self, a: Append) -> BoxFuture<'_, Result<Appended, StoreError>> {
        ready(self.append_locked(a, None))
    }

    fn append_then(
        &self,
        a: Append,
        on_commit: super::OnCommit,
    ) -> BoxFuture<'_, Result<Appended, StoreError>> {
        ready(self.append_locked(a, Some(on_commit)))
    }

    fn read_page(
        &self,
        channel: ChannelId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> BoxFuture<'_, Result<Vec<StoredEnvelope>, StoreError>> {
        ready(self.with(|channels| {
            let c = channels.get(&channel).ok_or(StoreError::NotFound)?;
            let mut page = super::PageBudget::new(max_bytes);
            Ok(c.log
                .range(after.saturating_add(1)..)
                .take(limit)
                .take_while(|(_, (_, _, envelope, _))| page.fits(envelope.len()))
                .map(|(&seq, (_, _, envelope, _))| StoredEnvelope {
                    seq,
                    envelope: envelope.clone(),
                })
                .collect())
        }))
    }

    fn head(&self, channel: ChannelId) -> BoxFuture<'_, Result<u64, StoreError>> {
        ready(self.with(|channels| {
            channels
                .get(&channel)
                .map(|c| c.head)
                .ok_or(StoreError::NotFound)
        }))
    }

    fn prune(&self, before: u64) -> BoxFuture<'_, Result<u64, StoreError>> {
        ready(Ok(self.with(|channels| {
            let mut removed = 0;
            for c in channels.values_mut() {
                let old: Vec<u64> = c
                    .log
                    .iter()
                    .filter(|(_, v)| v.3 < before)
                    .map(|(&seq, _)| seq)
                    .collect();
                for seq in old {
                    if let Some((sender, sender_seq, body, _)) = c.log.remove(&seq) {
                        c.by_sender.remove(&(sender, sender_seq));
                        c.bytes -= body.len() as u64;
                        removed += 1;
                    }
                }
            }
            removed
        })))
    }

    fn health(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        ready(Ok(()))
    }

    fn stored_bytes(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        ready(Ok(
            self.with(|channels| channels.values().map(|c| c.bytes).sum())
        ))
    }
}
