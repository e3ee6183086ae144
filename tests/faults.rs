//! Devices on a flaky network: a fault-injecting proxy between every device
//! and the relay cuts, stalls, delays and splits their connections. Whatever
//! happens on the wire, every device ends with every message exactly once, in
//! the relay's order — and the relay's files and logs hold no secret.

mod common;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use common::delivery::{check_delivery, cut_randomly, exchange, receive_all, secrets_of, sent};
use khub::client::Session;
use khub::ids::DeviceId;
use khub::relay::config::Limits;
use khub::testing::{FaultProxy, TempDir, TestRelay, capture_logs, paired_devices};

/// The whole scenario must finish in this time.
const SCENARIO: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_devices_with_randomly_cut_connections_get_every_message_once_in_relay_order() {
    capture_logs();
    const DEVICES: usize = 5;
    const MESSAGES: usize = 1000;
    let relay = TestRelay::start(Limits::default()).await.unwrap();
    let home = TempDir::new("faults");
    let mut proxies = Vec::new();
    for _ in 0..DEVICES {
        proxies.push(FaultProxy::start(relay.addr()).await.unwrap());
    }
    let urls: Vec<String> = proxies.iter().map(FaultProxy::url).collect();
    let paired = tokio::time::timeout(SCENARIO, paired_devices(home.path(), &urls))
        .await
        .expect("pairing in time")
        .expect("pairs");
    let devices = paired.devices.clone();
    let connections =
        |proxies: &[FaultProxy]| -> u64 { proxies.iter().map(FaultProxy::connections).sum() };
    let before = connections(&proxies);
    let marker = format!(
        "khub-plaintext-marker-{}",
        DeviceId::random(&mut khub::crypto::os_rng())
    );

    // Cut a random device's connection every 20-120 ms.
    let proxies = Arc::new(proxies);
    let (stop, cutter) = cut_randomly(Arc::clone(&proxies));
    let received = tokio::time::timeout(
        SCENARIO,
        exchange(&devices, MESSAGES, &marker, Arc::default()),
    )
    .await
    .expect("every device received everything in time");
    let _ = stop.send(true);
    let cuts = cutter.await.unwrap();
    assert!(cuts >= 10, "the proxy cut connections ({cuts} cuts)");
    let reconnects = connections(&proxies) - before;
    assert!(
        reconnects > DEVICES as u64 * 2,
        "devices reconnected ({reconnects} connections for {DEVICES} sessions)"
    );
    check_delivery(&devices, &sent(&devices, MESSAGES, &marker), &received);
    for device in &devices {
        assert_eq!(device.next_unread().unwrap(), None, "nothing more arrived");
    }
    for device in &devices {
        let incidents = device.incidents().unwrap();
        assert!(
            incidents.is_empty(),
            "an honest relay causes no incident: {incidents:?}"
        );
    }

    let scanner = secrets_of(&paired, &marker);
    assert_eq!(scanner.scan_dir(relay.dir()).unwrap(), []);
    assert_eq!(scanner.scan_logs(), []);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_delayed_and_stalled_traffic_still_arrives_once_in_order() {
    capture_logs();
    let relay = TestRelay::start(Limits::default()).await.unwrap();
    let home = TempDir::new("faults-split");
    let proxy = FaultProxy::start(relay.addr()).await.unwrap();
    let paired = tokio::time::timeout(
        SCENARIO,
        paired_devices(home.path(), &[relay.url(), proxy.url()]),
    )
    .await
    .expect("pairing in time")
    .expect("pairs");
    let (sender, receiver) = (&paired.devices[0], &paired.devices[1]);

    // Every frame the receiver exchanges arrives in pieces of 1-3 bytes, late.
    proxy.split(3);
    proxy.delay(Duration::from_millis(2));
    let session = receiver.connect();
    let outgoing = sender.connect();
    let run = async {
        for n in 0..100 {
            outgoing
                .send(format!("split {n}").as_bytes(), Duration::ZERO)
                .await
                .unwrap();
        }
        let progress = AtomicUsize::new(0);
        let first = receive_all(receiver.clone(), &session, 50, &progress).await;
        // The network holds everything for a while, then lets go.
        proxy.stall(true);
        tokio::time::sleep(Duration::from_millis(500)).await;
        proxy.stall(false);
        let rest = receive_all(receiver.clone(), &session, 50, &progress).await;
        [first, rest].concat()
    };
    let got = tokio::time::timeout(SCENARIO, run)
        .await
        .expect("everything arrives in time");
    let bodies: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8(m.body.clone()).unwrap())
        .collect();
    assert_eq!(
        bodies,
        (0..100).map(|n| format!("split {n}")).collect::<Vec<_>>()
    );
    assert!(receiver.incidents().unwrap().is_empty());
    outgoing.close().await;
    session.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_behind_a_proxy_that_blackholes_notices_and_reconnects() {
    // The relay pings every second, so a device hearing nothing for three
    // seconds treats the connection as dead.
    let limits = Limits {
        ping_interval: Duration::from_secs(1),
        ..Limits::default()
    };
    let relay = TestRelay::start(limits).await.unwrap();
    let proxy = FaultProxy::start(relay.addr()).await.unwrap();
    let home = TempDir::new("blackhole");
    let paired = tokio::time::timeout(
        Duration::from_secs(30),
        paired_devices(home.path(), &[relay.url(), proxy.url()]),
    )
    .await
    .unwrap()
    .unwrap();
    let (sender, behind) = (&paired.devices[0], &paired.devices[1]);
    let session = behind.connect();
    let live = |session: &Session| matches!(session.status(), khub::client::Status::Live { .. });
    tokio::time::timeout(Duration::from_secs(10), async {
        while !live(&session) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("live");
    let before = proxy.connections();
    // The proxy keeps the connection open but passes nothing: half-open.
    proxy.stall(true);
    tokio::time::timeout(Duration::from_secs(10), async {
        while live(&session) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the session noticed the dead connection");
    proxy.stall(false);
    // It reconnects, and what was sent meanwhile arrives.
    sender.queue(b"while the link was dead").unwrap();
    tokio::time::timeout(Duration::from_secs(10), sender.sync())
        .await
        .unwrap()
        .unwrap();
    let message = tokio::time::timeout(Duration::from_secs(20), session.recv())
        .await
        .expect("delivered after the reconnect")
        .unwrap();
    assert_eq!(message.body, b"while the link was dead");
    assert!(proxy.connections() > before, "a new connection was made");
}
