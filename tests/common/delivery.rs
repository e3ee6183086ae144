//! Many devices exchanging many messages on a flaky network, and the check
//! that every device got every other device's messages exactly once, each
//! sender's in its order, in one relay order they all agree on.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use khub::client::{Device, Session};
use khub::ids::DeviceId;
use khub::testing::FaultProxy;
use rand::RngExt;

/// A message as one device received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub seq: u64,
    pub from: DeviceId,
    pub body: Vec<u8>,
}

/// Receives until `expected` messages are in, marking each read and counting
/// each in `progress`.
pub async fn receive_all(
    device: Device,
    session: &Session,
    expected: usize,
    progress: &AtomicUsize,
) -> Vec<Received> {
    let mut got = Vec::with_capacity(expected);
    while got.len() < expected {
        let message = session.recv().await.expect("receive");
        device.mark_read(message.seq).expect("mark read");
        got.push(Received {
            seq: message.seq,
            from: message.from,
            body: message.body,
        });
        progress.fetch_add(1, Ordering::Relaxed);
    }
    got
}

/// Checks what every device received against what was sent: each message of
/// the others exactly once, each sender's in its order, and one relay order
/// that all devices agree on.
pub fn check_delivery(
    devices: &[Device],
    sent: &HashMap<DeviceId, Vec<Vec<u8>>>,
    received: &[Vec<Received>],
) {
    let mut relay_order: BTreeMap<u64, (DeviceId, Vec<u8>)> = BTreeMap::new();
    for (device, got) in devices.iter().zip(received) {
        assert!(
            got.windows(2).all(|w| w[0].seq < w[1].seq),
            "{}: relay sequence numbers only go up",
            device.name()
        );
        for other in devices.iter().filter(|d| d.id() != device.id()) {
            let from_other: Vec<&Vec<u8>> = got
                .iter()
                .filter(|m| m.from == other.id())
                .map(|m| &m.body)
                .collect();
            let expected: Vec<&Vec<u8>> = sent[&other.id()].iter().collect();
            assert_eq!(
                from_other.len(),
                expected.len(),
                "{} got {} of {}'s {} messages",
                device.name(),
                from_other.len(),
                other.name(),
                expected.len()
            );
            assert!(
                from_other == expected,
                "{} got {}'s messages out of order or altered",
                device.name(),
                other.name()
            );
        }
        assert!(
            got.iter().all(|m| m.from != device.id()),
            "a device is not sent its own messages"
        );
        for m in got {
            let entry = relay_order
                .entry(m.seq)
                .or_insert_with(|| (m.from, m.body.clone()));
            assert_eq!(
                *entry,
                (m.from, m.body.clone()),
                "devices disagree on what relay seq {} holds",
                m.seq
            );
        }
    }
}

pub fn body(marker: &str, device: usize, n: usize) -> Vec<u8> {
    format!("{marker} from device {device}, message {n:04}").into_bytes()
}

/// Every device sends `messages` bodies (queued durably at once, sent
/// whenever its session is connected) while receiving everyone else's; ends
/// when each has received all and had all its own acked. What each received,
/// by device index; `progress` counts receptions as they happen.
pub async fn exchange(
    devices: &[Device],
    messages: usize,
    marker: &str,
    progress: Arc<AtomicUsize>,
) -> Vec<Vec<Received>> {
    let count = devices.len();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, device) in devices.iter().cloned().enumerate() {
        let marker = marker.to_owned();
        let progress = Arc::clone(&progress);
        tasks.spawn(async move {
            let session = device.connect();
            let sender = async {
                for n in 0..messages {
                    session
                        .send(&body(&marker, i, n), Duration::ZERO)
                        .await
                        .expect("queue");
                }
            };
            let receiving =
                receive_all(device.clone(), &session, (count - 1) * messages, &progress);
            let ((), got) = tokio::join!(sender, receiving);
            // Everything this device sent is acked before it stops.
            while device.pending().unwrap() > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            session.close().await;
            (i, got)
        });
    }
    let mut received = vec![Vec::new(); count];
    while let Some(done) = tasks.join_next().await {
        let (i, got) = done.unwrap();
        received[i] = got;
    }
    received
}

/// What [`exchange`] sent, by sender.
pub fn sent(devices: &[Device], messages: usize, marker: &str) -> HashMap<DeviceId, Vec<Vec<u8>>> {
    devices
        .iter()
        .enumerate()
        .map(|(i, d)| (d.id(), (0..messages).map(|n| body(marker, i, n)).collect()))
        .collect()
}

/// Cuts a random proxy's connections every 20-120 ms until told to stop;
/// returns how many cuts it made.
pub fn cut_randomly(
    proxies: Arc<Vec<FaultProxy>>,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<u32>,
) {
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        let mut cuts = 0u32;
        loop {
            let pause = khub::crypto::os_rng().random_range(20..120);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(pause)) => {}
                _ = stopped.changed() => return cuts,
            }
            let victim = khub::crypto::os_rng().random_range(0..proxies.len());
            proxies[victim].cut();
            cuts += 1;
        }
    });
    (stop, task)
}

/// A scanner for everything secret in a run: the plaintext marker, the
/// devices' keys and tokens, the pairing codes.
pub fn secrets_of(paired: &khub::testing::PairedDevices, marker: &str) -> khub::testing::Scanner {
    let mut scanner = khub::testing::Scanner::new();
    scanner.add("plaintext marker", marker.as_bytes());
    for device in &paired.devices {
        scanner.add_device(device);
    }
    for code in &paired.codes {
        scanner.add_code(code);
    }
    scanner
}
