//! The `Store` contract, run against every implementation (SQLite and memory);
//! a new backend (Redis) adds one line to `stores()`.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use khub::crypto::os_rng;
use khub::crypto::token::AccessToken;
use khub::ids::{ChannelId, DeviceId};
use khub::relay::store::memory::MemoryStore;
use khub::relay::store::sqlite::SqliteStore;
use khub::relay::store::{Append, Appended, Store, StoreError};

fn stores() -> Vec<(&'static str, Arc<dyn Store>)> {
    let dir = common::tempdir("store");
    vec![
        ("memory", Arc::new(MemoryStore::new())),
        (
            "sqlite",
            Arc::new(SqliteStore::open(&dir.join("store.sqlite3")).unwrap()),
        ),
    ]
}

fn append(channel: ChannelId, sender: DeviceId, sender_seq: u64, body: &[u8], now: u64) -> Append {
    Append {
        channel,
        sender,
        sender_seq,
        envelope: Bytes::copy_from_slice(body),
        now,
        quota: 1_000,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_store_keeps_the_contract() {
    for (name, store) in stores() {
        let mut rng = os_rng();
        let (channel, a, b) = (
            ChannelId::random(&mut rng),
            DeviceId::random(&mut rng),
            DeviceId::random(&mut rng),
        );
        let hash = AccessToken::generate(&mut rng).hash();

        store.create_channel(channel, a, hash, 100).await.unwrap();
        assert_eq!(
            store.create_channel(channel, a, hash, 100).await,
            Err(StoreError::Exists),
            "{name}"
        );
        assert_eq!(store.head(channel).await, Ok(0), "{name}");
        assert_eq!(
            store.head(ChannelId::random(&mut rng)).await,
            Err(StoreError::NotFound),
            "{name}"
        );

        // Devices: admit up to the limit, revoke, list in join order.
        store.admit(channel, b, hash, 2, 101).await.unwrap();
        assert_eq!(
            store.admit(channel, b, hash, 3, 101).await,
            Err(StoreError::Exists),
            "{name}"
        );
        let c = DeviceId::random(&mut rng);
        assert_eq!(
            store.admit(channel, c, hash, 2, 101).await,
            Err(StoreError::ChannelFull(2)),
            "{name}"
        );
        store.revoke(channel, b).await.unwrap();
        assert!(
            store.device(channel, b).await.unwrap().unwrap().revoked,
            "{name}"
        );
        store.admit(channel, c, hash, 2, 101).await.unwrap();
        let ids: Vec<DeviceId> = store
            .devices(channel)
            .await
            .unwrap()
            .iter()
            .map(|d| d.device)
            .collect();
        assert_eq!(ids, [a, b, c], "{name}");
        assert_eq!(
            store.revoke(channel, DeviceId::random(&mut rng)).await,
            Err(StoreError::NotFound),
            "{name}"
        );

        // Appends: numbered from 1, idempotent per (sender, sender_seq).
        assert_eq!(
            store.append(append(channel, a, 1, b"one", 100)).await,
            Ok(Appended {
                seq: 1,
                duplicate: false
            })
        );
        assert_eq!(
            store.append(append(channel, c, 1, b"two", 200)).await,
            Ok(Appended {
                seq: 2,
                duplicate: false
            })
        );
        assert_eq!(
            store.append(append(channel, a, 1, b"one", 300)).await,
            Ok(Appended {
                seq: 1,
                duplicate: true
            })
        );
        assert_eq!(
            store.append(append(channel, a, 1, b"other", 300)).await,
            Err(StoreError::Conflict { sender_seq: 1 }),
            "{name}"
        );
        assert_eq!(
            store
                .append(append(channel, a, 3, b"three", 300))
                .await
                .unwrap()
                .seq,
            3
        );
        // A sender's envelopes stay in its order: a gap is allowed, going
        // back is not (devices would refuse it as reordered).
        assert_eq!(
            store.append(append(channel, a, 2, b"late", 300)).await,
            Err(StoreError::OutOfOrder {
                sender_seq: 2,
                highest: 3
            }),
            "{name}"
        );
        let read = store.read(channel, 1, 10).await.unwrap();
        assert_eq!(
            read.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [2, 3],
            "{name}"
        );
        assert_eq!(read[0].envelope.as_ref(), b"two");
        assert_eq!(store.read(channel, 0, 1).await.unwrap().len(), 1, "{name}");

        // Quota: 1,000 bytes; refused explicitly, nothing stored.
        let big = vec![0u8; 990];
        assert!(
            matches!(
                store.append(append(channel, a, 4, &big, 300)).await,
                Err(StoreError::OverQuota { .. })
            ),
            "{name}"
        );
        assert_eq!(store.head(channel).await, Ok(3), "{name}");
        // The sender's later, smaller envelope waits for the refused one, so it
        // cannot get ahead of it; other senders are not held back.
        assert!(
            matches!(
                store.append(append(channel, a, 5, b"four", 300)).await,
                Err(StoreError::OverQuota { .. })
            ),
            "{name}"
        );
        assert_eq!(store.head(channel).await, Ok(3), "{name}");

        // Retention: prune what was stored before 250; numbering never goes back.
        assert_eq!(store.prune(250).await, Ok(2), "{name}");
        let left = store.read(channel, 0, 10).await.unwrap();
        assert_eq!(
            left.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [3],
            "{name}"
        );
        // Pruning freed quota: the retried envelopes go in, in their order.
        for (sender_seq, body, seq) in [(4, &big[..600], 4), (5, &b"four"[..], 5)] {
            assert_eq!(
                store
                    .append(append(channel, a, sender_seq, body, 400))
                    .await
                    .map(|s| s.seq),
                Ok(seq),
                "{name}"
            );
        }
        assert!(
            store
                .append(append(channel, c, 2, &vec![0u8; 300], 400))
                .await
                .is_ok(),
            "{name}"
        );
        assert!(store.health().await.is_ok());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_are_group_committed_without_gaps_or_duplicates() {
    for (name, store) in stores() {
        let mut rng = os_rng();
        let channel = ChannelId::random(&mut rng);
        let senders: Vec<DeviceId> = (0..4).map(|_| DeviceId::random(&mut rng)).collect();
        store
            .create_channel(
                channel,
                senders[0],
                AccessToken::generate(&mut rng).hash(),
                0,
            )
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for sender in senders.clone() {
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                for seq in 1..=100u64 {
                    let mut a = append(channel, sender, seq, &seq.to_be_bytes(), 0);
                    a.quota = u64::MAX;
                    store.append(a).await.unwrap();
                }
            }));
        }
        for task in tasks {
            tokio::time::timeout(std::time::Duration::from_secs(60), task)
                .await
                .unwrap()
                .unwrap();
        }
        let all = store.read(channel, 0, 1000).await.unwrap();
        assert_eq!(
            all.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (1..=400).collect::<Vec<_>>(),
            "{name}"
        );
    }
}
