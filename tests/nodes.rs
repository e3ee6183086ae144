//! Two relay nodes on one PostgreSQL database, in this process: a code shown
//! through one node is claimed through the other, a message stored through
//! one wakes a session on the other, a removal through one closes the removed
//! device's session on the other, claims per address are counted across
//! both, and no other device can tell an open slot from a missing one.
//! Skipped (with a note) without PostgreSQL unless KHUB_REQUIRE_POSTGRES.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use khub::client::ClientError;
use khub::relay::Relay;
use khub::relay::config::{Limits, RelayConfig};
use khub::relay::server::Running;
use khub::relay::store::postgres::{PgOptions, PgStore};
use khub::testing::{TempDir, paired_devices};

const STEP: Duration = Duration::from_secs(20);

/// A relay node on `db`, serving on an ephemeral port.
struct Node {
    addr: SocketAddr,
    _running: Running,
}

impl Node {
    async fn start(db: &common::pg::TestDb, limits: Limits) -> Self {
        let store = PgStore::connect(&db.url(), &PgOptions::default())
            .await
            .expect("the store opens");
        let relay: Arc<Relay> = khub::relay::pg::relay(
            Arc::new(store),
            RelayConfig {
                limits,
                ..RelayConfig::default()
            },
        )
        .await
        .expect("the node starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self {
            addr: listener.local_addr().unwrap(),
            _running: Running::spawn(relay, listener),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Two nodes on `db`, and two devices paired through them: the first talks to
/// node A, the second to node B.
async fn two_nodes_two_devices(
    db: &common::pg::TestDb,
) -> ([Node; 2], TempDir, khub::testing::PairedDevices) {
    let a = Node::start(db, Limits::default()).await;
    let b = Node::start(db, Limits::default()).await;
    let home = TempDir::new("nodes");
    let paired = tokio::time::timeout(STEP * 2, paired_devices(home.path(), &[a.url(), b.url()]))
        .await
        .expect("pairing in time")
        .expect("devices pair across nodes");
    ([a, b], home, paired)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_on_two_nodes_pair_talk_and_are_removed_across_them() {
    let Some(db) = common::pg::fresh_database("nodes").await else {
        return;
    };
    let a = Node::start(&db, Limits::default()).await;
    let b = Node::start(&db, Limits::default()).await;
    let home = TempDir::new("nodes");
    // The channel's creator talks to node A; the two it invites to node B, so
    // each pairing's code is shown through A and claimed through B.
    let paired = tokio::time::timeout(
        STEP * 3,
        paired_devices(home.path(), &[a.url(), b.url(), b.url()]),
    )
    .await
    .expect("pairing in time")
    .expect("devices pair across nodes");
    let [laptop, phone, tablet] = &paired.devices[..] else {
        panic!("three devices");
    };

    // A message stored through node B wakes the laptop's live session on A.
    let on_a = laptop.connect();
    on_a.caught_up(STEP).await.expect("session on A");
    let on_b = phone.connect();
    on_b.send(b"through node B", STEP)
        .await
        .expect("sent through B");
    let got = tokio::time::timeout(STEP, on_a.recv())
        .await
        .expect("delivered across nodes in time")
        .expect("delivered");
    assert_eq!(got.body, b"through node B");
    assert_eq!(got.from, phone.id());

    // Removing the tablet through node A ends its live session on node B.
    let tablet_on_b = tablet.connect();
    tablet_on_b.caught_up(STEP).await.expect("session on B");
    laptop.remove(tablet.id()).await.expect("removed through A");
    let ended = tokio::time::timeout(STEP, async {
        loop {
            match tablet_on_b.recv().await {
                // Only what was said before the removal.
                Ok(message) => {
                    assert_eq!(message.body, b"through node B");
                    tablet.mark_read(message.seq).unwrap();
                }
                Err(error) => return error,
            }
        }
    })
    .await
    .expect("the removed device's session ends in time");
    assert!(matches!(ended, ClientError::Revoked), "{ended:?}");
    on_a.close().await;
    on_b.close().await;
}

/// `POST /pair/N/claim` for a nameplate nobody opened; the HTTP status.
async fn claim(node: &Node, nameplate: u32) -> u16 {
    common::net::http(
        node.addr,
        "POST",
        &format!("/pair/{nameplate}/claim"),
        &[],
        b"",
    )
    .await
    .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_per_address_are_counted_across_nodes() {
    let Some(db) = common::pg::fresh_database("claims").await else {
        return;
    };
    let limits = Limits {
        claims_per_minute: 3,
        ..Limits::default()
    };
    let a = Node::start(&db, limits.clone()).await;
    let b = Node::start(&db, limits).await;
    // No such slot, but each claim counts: three through A...
    for nameplate in [11, 12, 13] {
        assert_eq!(claim(&a, nameplate).await, 404);
    }
    // ...and the fourth, through B, is one too many for this address.
    assert_eq!(claim(&b, 14).await, 429);
    assert_eq!(claim(&a, 15).await, 429);
}

/// A device of another channel, asking through either node for the
/// messages of every nameplate, gets `gone` for each, the open one included:
/// it cannot find the open slots to claim them as they open. The inviter
/// still reads its own through the other node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_probing_nameplates_cannot_tell_the_open_one() {
    use common::net::{Member, create_channel, http, open_slot};
    let Some(db) = common::pg::fresh_database("probe").await else {
        return;
    };
    let a = Node::start(&db, Limits::default()).await;
    let b = Node::start(&db, Limits::default()).await;
    let new_member = || Member::new(khub::ids::ChannelId::random(&mut khub::crypto::os_rng()));
    let (inviter, prober) = (new_member(), new_member());
    assert_eq!(create_channel(a.addr, &inviter).await.status, 201);
    assert_eq!(create_channel(b.addr, &prober).await.status, 201);
    let nameplate = open_slot(a.addr, &inviter, common::sid()).await;
    let messages = |probed: u32| format!("/pair/{probed}/messages?wait=0");
    for node in [&a, &b] {
        for probed in [nameplate, nameplate + 1] {
            let answer = http(
                node.addr,
                "GET",
                &messages(probed),
                &[("authorization", &prober.auth())],
                b"",
            )
            .await;
            assert_eq!(answer.status, 410, "nameplate {probed} told apart");
        }
    }
    let own = http(
        b.addr,
        "GET",
        &messages(nameplate),
        &[("authorization", &inviter.auth())],
        b"",
    )
    .await;
    assert_eq!(own.status, 200);
}

/// A node whose notification connections drop (a PostgreSQL restart, a
/// network cut) reconnects and catches up: a message stored through the
/// other node meanwhile still reaches the live session on this one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_its_notifications_catches_up() {
    let Some(db) = common::pg::fresh_database("bus").await else {
        return;
    };
    let (_nodes, _home, paired) = two_nodes_two_devices(&db).await;
    let [on_a, on_b] = &paired.devices[..] else {
        panic!("two devices");
    };
    let receiver = on_b.connect();
    receiver.caught_up(STEP).await.expect("session on B");
    let sender = on_a.connect();
    sender.caught_up(STEP).await.expect("session on A");

    // Cut every bus connection of both nodes, then talk at once.
    let (admin, connection) = tokio_postgres::connect(&db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let cut: i64 = admin
        .query_one(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = $1",
            &[&khub::relay::pg::bus::APPLICATION_NAME],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        cut >= 2,
        "both nodes' listening connections were cut ({cut})"
    );
    for n in 0..3 {
        sender
            .send(format!("while cut {n}").as_bytes(), STEP)
            .await
            .expect("stored through A");
    }
    for n in 0..3 {
        let got = tokio::time::timeout(STEP, receiver.recv())
            .await
            .expect("delivered on B after its reconnection")
            .expect("delivered");
        assert_eq!(got.body, format!("while cut {n}").as_bytes());
        on_b.mark_read(got.seq).unwrap();
    }
    sender.close().await;
    receiver.close().await;
}

/// A revocation committed through any node's store closes the device's
/// sessions on every node: its notification goes out with the commit, even if
/// the node that made it dies before telling anyone (here: a bare store that
/// has no bus at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_revocation_reaches_every_node_by_itself() {
    let Some(db) = common::pg::fresh_database("revoke").await else {
        return;
    };
    let (_nodes, _home, paired) = two_nodes_two_devices(&db).await;
    let tablet = &paired.devices[1];
    let session = tablet.connect();
    session.caught_up(STEP).await.expect("session on B");
    let bare = PgStore::connect(&db.url(), &PgOptions::default())
        .await
        .unwrap();
    khub::relay::store::Store::revoke(&bare, tablet.channel(), tablet.id())
        .await
        .unwrap();
    let ended = tokio::time::timeout(STEP, async {
        loop {
            match session.recv().await {
                Ok(message) => tablet.mark_read(message.seq).unwrap(),
                Err(error) => return error,
            }
        }
    })
    .await
    .expect("the session on B ends in time");
    assert!(matches!(ended, ClientError::Revoked), "{ended:?}");
}
