//! The `Store` contract, run against every implementation (memory, SQLite and
//! PostgreSQL); a new backend adds one line to `stores()`. PostgreSQL runs in a
//! fresh database per test when one can be made (see `common::pg`), and two
//! stores on one database stand for two relay nodes.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use khub::crypto::os_rng;
use khub::crypto::token::AccessToken;
use khub::ids::{ChannelId, DeviceId};
use khub::relay::store::memory::MemoryStore;
use khub::relay::store::postgres::{PgOptions, PgStore};
use khub::relay::store::sqlite::SqliteStore;
use khub::relay::store::{Append, Appended, Store, StoreError};

/// Every store, and the PostgreSQL database to drop once they are done.
async fn stores(
    purpose: &str,
) -> (
    Vec<(&'static str, Arc<dyn Store>)>,
    Option<common::pg::TestDb>,
) {
    let dir = common::tempdir("store");
    let mut stores: Vec<(&'static str, Arc<dyn Store>)> = vec![
        ("memory", Arc::new(MemoryStore::new())),
        (
            "sqlite",
            Arc::new(SqliteStore::open(&dir.join("store.sqlite3")).unwrap()),
        ),
    ];
    let db = common::pg::fresh_database(purpose).await;
    if let Some(db) = &db {
        stores.push(("postgres", Arc::new(pg_store(db).await)));
    }
    (stores, db)
}

async fn pg_store(db: &common::pg::TestDb) -> PgStore {
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        PgStore::connect(&db.url(), &PgOptions::default()),
    )
    .await
    .expect("PostgreSQL answers")
    .expect("the store opens")
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
    let (stores, _db) = stores("contract").await;
    for (name, store) in stores {
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
        // A retry of a pruned envelope is not stored again, even of the
        // sender's highest number: devices would take the copy as a replay.
        assert_eq!(
            store.append(append(channel, c, 1, b"two", 400)).await,
            Err(StoreError::OutOfOrder {
                sender_seq: 1,
                highest: 1
            }),
            "{name}"
        );
        assert_eq!(store.head(channel).await, Ok(3), "{name}");
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

/// A read returns no more envelope bytes than its budget (the first envelope
/// whatever its size), and its count still bounds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_stops_at_its_byte_budget() {
    let (stores, _db) = stores("read_page").await;
    for (name, store) in stores {
        let mut rng = os_rng();
        let (channel, a) = (ChannelId::random(&mut rng), DeviceId::random(&mut rng));
        let hash = AccessToken::generate(&mut rng).hash();
        store.create_channel(channel, a, hash, 100).await.unwrap();
        // Envelopes 1 to 4, of 100, 200, 300 and 400 bytes.
        for (seq, len) in [(1u8, 100), (2, 200), (3, 300), (4, 400)] {
            let mut envelope = append(channel, a, u64::from(seq), &vec![seq; len], 100);
            envelope.quota = 10_000;
            store.append(envelope).await.unwrap();
        }
        let page = |after: u64, limit: usize, max_bytes: usize| {
            let store = Arc::clone(&store);
            async move {
                let page = store
                    .read_page(channel, after, limit, max_bytes)
                    .await
                    .unwrap();
                for e in &page {
                    assert_eq!(e.envelope[0] as u64, e.seq, "each its own body");
                }
                page.iter().map(|e| e.seq).collect::<Vec<_>>()
            }
        };
        assert_eq!(
            page(0, 10, 300).await,
            [1, 2],
            "{name}: 100 + 200 fit in 300"
        );
        assert_eq!(page(0, 10, 299).await, [1], "{name}");
        assert_eq!(
            page(1, 10, 10).await,
            [2],
            "{name}: the first, whatever its size"
        );
        assert_eq!(
            page(1, 2, 10_000).await,
            [2, 3],
            "{name}: the count still bounds"
        );
        assert_eq!(page(0, 10, 1_000).await, [1, 2, 3, 4], "{name}");
        assert_eq!(page(4, 10, 1_000).await, Vec::<u64>::new(), "{name}");
        assert_eq!(store.read(channel, 0, 10).await.unwrap().len(), 4, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_are_group_committed_without_gaps_or_duplicates() {
    let (stores, _db) = stores("concurrent").await;
    for (name, store) in stores {
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

/// Two stores on one database are two relay nodes: appends through both to
/// one channel, and retried publishes through the other node, still give one
/// gapless sequence with every envelope once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_database_share_one_gapless_sequence() {
    let Some(db) = common::pg::fresh_database("nodes").await else {
        return;
    };
    let nodes: Vec<Arc<dyn Store>> =
        vec![Arc::new(pg_store(&db).await), Arc::new(pg_store(&db).await)];
    let mut rng = os_rng();
    let channel = ChannelId::random(&mut rng);
    let senders: Vec<DeviceId> = (0..4).map(|_| DeviceId::random(&mut rng)).collect();
    nodes[0]
        .create_channel(
            channel,
            senders[0],
            AccessToken::generate(&mut rng).hash(),
            0,
        )
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for (i, sender) in senders.iter().copied().enumerate() {
        let nodes = nodes.clone();
        tasks.push(tokio::spawn(async move {
            for seq in 1..=100u64 {
                let mut a = append(channel, sender, seq, &seq.to_be_bytes(), 0);
                a.quota = u64::MAX;
                // Alternate nodes, and retry every tenth through the other one
                // (a device that reconnected elsewhere before its ack).
                let node = &nodes[(i + seq as usize) % 2];
                let first = node.append(a.clone()).await.unwrap();
                assert!(!first.duplicate);
                if seq % 10 == 0 {
                    let other = &nodes[(i + seq as usize + 1) % 2];
                    assert_eq!(
                        other.append(a).await.unwrap(),
                        Appended {
                            seq: first.seq,
                            duplicate: true
                        }
                    );
                }
            }
        }));
    }
    for task in tasks {
        tokio::time::timeout(std::time::Duration::from_secs(60), task)
            .await
            .unwrap()
            .unwrap();
    }
    let all = nodes[1].read(channel, 0, 1000).await.unwrap();
    assert_eq!(
        all.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=400).collect::<Vec<_>>()
    );
    assert_eq!(nodes[0].head(channel).await, Ok(400));
}

/// Retention drops whole weekly partitions (and deletes row by row only in
/// the week the cut-off falls in), keeps the quota's byte count right and
/// never takes sequence numbers back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_retention_drops_whole_weeks() {
    let Some(db) = common::pg::fresh_database("retention").await else {
        return;
    };
    let store = pg_store(&db).await;
    let mut rng = os_rng();
    let (channel, a) = (ChannelId::random(&mut rng), DeviceId::random(&mut rng));
    store
        .create_channel(channel, a, AccessToken::generate(&mut rng).hash(), 0)
        .await
        .unwrap();
    let now = khub::relay::hub::unix_now();
    let week = 7 * 24 * 3600;
    for (seq, at) in [(1, now), (2, now), (3, now + week)] {
        let mut e = append(channel, a, seq, &[7u8; 100], at);
        e.quota = 1_000;
        store.append(e).await.unwrap();
    }
    assert_eq!(store.stored_bytes().await, Ok(300));
    let (client, connection) = tokio_postgres::connect(&db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    assert_eq!(week_partitions(&client).await, 2, "this week and the next");
    // A cut-off after this week: its partition goes whole, next week's stays.
    let this_week_ends = (now / week + 1) * week;
    assert_eq!(store.prune(this_week_ends).await, Ok(2));
    assert_eq!(week_partitions(&client).await, 1);
    assert_eq!(store.stored_bytes().await, Ok(100));
    let left = store.read(channel, 0, 10).await.unwrap();
    assert_eq!(left.iter().map(|e| e.seq).collect::<Vec<_>>(), [3]);
    // Numbering goes on; the pruned sender still cannot go back.
    assert_eq!(
        store
            .append(append(channel, a, 4, b"four", now))
            .await
            .map(|s| s.seq),
        Ok(4)
    );
    assert!(matches!(
        store.append(append(channel, a, 2, &[7u8; 100], now)).await,
        Err(StoreError::OutOfOrder { .. })
    ));
}

/// The envelope log's weekly partitions.
async fn week_partitions(client: &tokio_postgres::Client) -> usize {
    client
        .query(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             JOIN pg_class p ON p.oid = i.inhparent
             WHERE p.relname = 'khub_envelopes' AND c.relname LIKE 'khub_envelopes_w%'",
            &[],
        )
        .await
        .unwrap()
        .len()
}

/// Nodes starting together apply each migration once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_together_migrate_once() {
    let Some(db) = common::pg::fresh_database("migrate").await else {
        return;
    };
    let url = db.url();
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PgStore::connect(&url, &PgOptions::default()).await })
        })
        .collect();
    for start in starts {
        tokio::time::timeout(std::time::Duration::from_secs(30), start)
            .await
            .unwrap()
            .unwrap()
            .expect("every node starts");
    }
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let applied: i64 = client
        .query_one("SELECT COUNT(*) FROM khub_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(applied, 1);
}

/// A session pipelines its publishes: appends handed over one after another
/// without waiting are stored in that order, none refused as out of order
/// (PostgreSQL runs them on separate connections, which could otherwise take
/// the channel's lock in any order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_senders_pipelined_appends_are_stored_in_the_order_handed_over() {
    let (stores, _db) = stores("pipelined").await;
    for (name, store) in stores {
        let mut rng = os_rng();
        let (channel, sender) = (ChannelId::random(&mut rng), DeviceId::random(&mut rng));
        store
            .create_channel(channel, sender, AccessToken::generate(&mut rng).hash(), 0)
            .await
            .unwrap();
        let pending: Vec<_> = (1..=200u64)
            .map(|seq| {
                let mut a = append(channel, sender, seq, &seq.to_be_bytes(), 0);
                a.quota = u64::MAX;
                store.append(a)
            })
            .collect();
        let results = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            futures_util::future::join_all(pending),
        )
        .await
        .expect("stored in time");
        let seqs: Vec<u64> = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("{name}: {e}")).seq)
            .collect();
        assert_eq!(seqs, (1..=200).collect::<Vec<_>>(), "{name}");
    }
}

/// A server whose certificate nobody trusts is refused (rustls verifies it),
/// and the error says what to do. Debian's PostgreSQL serves a self-signed
/// certificate; skipped where the server has no TLS at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_postgres_certificate_is_refused_with_a_hint() {
    let Some(db) = common::pg::fresh_database("tls").await else {
        return;
    };
    let (client, connection) = tokio_postgres::connect(&db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let ssl: String = client.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    if ssl != "on" {
        eprintln!("skipped: this PostgreSQL serves no TLS");
        return;
    }
    let url = db.url().replace("sslmode=disable", "sslmode=require");
    let refused = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        PgStore::connect(&url, &PgOptions::default()),
    )
    .await
    .expect("an answer in time");
    let Err(StoreError::Backend(message)) = refused else {
        panic!("a self-signed certificate was accepted");
    };
    assert!(message.contains("TLS handshake"), "{message}");
    assert!(message.contains("--store-ca-file"), "{message}");
}

/// An append the database fails (here: it waited longer than the
/// statement timeout for the channel's lock) takes the sender's later,
/// already queued appends down with it: storing them would put them ahead of
/// the failed one, which the device then sends again and which would be out
/// of order for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_append_holds_back_the_senders_queued_ones() {
    let Some(db) = common::pg::fresh_database("holdback").await else {
        return;
    };
    // A one-second statement timeout, so the held lock fails the append soon.
    let url = format!("{}&options=-c%20statement_timeout%3D1000", db.url());
    // 'static, so the appends can be handed over in order here and awaited
    // on tasks of their own.
    let store: &'static PgStore = Box::leak(Box::new(
        PgStore::connect(&url, &PgOptions::default()).await.unwrap(),
    ));
    let mut rng = os_rng();
    let (channel, sender) = (ChannelId::random(&mut rng), DeviceId::random(&mut rng));
    store
        .create_channel(channel, sender, AccessToken::generate(&mut rng).hash(), 0)
        .await
        .unwrap();
    let (mut admin, connection) = tokio_postgres::connect(&db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    // Hold the channel's row so the first append waits on it, and times out.
    let holder = admin.transaction().await.unwrap();
    holder
        .execute(
            "SELECT 1 FROM khub_channels WHERE id = $1 FOR UPDATE",
            &[&channel.as_bytes().as_slice()],
        )
        .await
        .unwrap();
    let first = tokio::spawn(store.append(append(channel, sender, 1, b"one", 0)));
    let second = tokio::spawn(store.append(append(channel, sender, 2, b"two", 0)));
    let first = first.await.unwrap();
    assert!(
        matches!(&first, Err(StoreError::Backend(m)) if m.contains("timeout")),
        "{first:?}"
    );
    // The lock is free again before the second could have run.
    holder.rollback().await.unwrap();
    let second = second.await.unwrap();
    assert!(matches!(second, Err(StoreError::Backend(_))), "{second:?}");
    // A later one handed over after both failed (a pipelined publish the
    // session had not yet answered) waits for the failed one too.
    let third = store.append(append(channel, sender, 3, b"three", 0)).await;
    assert!(matches!(third, Err(StoreError::Backend(_))), "{third:?}");
    assert_eq!(store.head(channel).await, Ok(0), "nothing got ahead");
    // Sent again, in order: all stored.
    for (sender_seq, body, seq) in [
        (1, &b"one"[..], 1),
        (2, &b"two"[..], 2),
        (3, &b"three"[..], 3),
    ] {
        assert_eq!(
            store
                .append(append(channel, sender, sender_seq, body, 0))
                .await
                .map(|a| a.seq),
            Ok(seq)
        );
    }
}
