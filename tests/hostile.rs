//! A relay that misbehaves: it rewrites what devices receive (envelopes and
//! pairing messages) as an operator could, knowing no code or key. Devices
//! refuse and report every altered, replayed, reordered or foreign envelope and
//! notice dropped ones; a pairing it interferes with fails on both sides; and
//! the scanner finds no secret in what it kept.

use std::time::Duration;

use khub::channel::Channel;
use khub::client::{ClientError, Device, IncidentKind, Status, join};
use khub::crypto::os_rng;
use khub::ids::{ChannelId, DeviceId};
use khub::pairing::{Code, DeviceInfo, Inviter, Joiner, Nameplate};
use khub::protocol::{
    Delivered, ErrorCode, MAX_ANSWER_LEN, MAX_FRAME_LEN, MAX_PUBLISH_PER_SYNC, Refusal,
    ServerFrame, SyncAck, SyncResponse,
};
use khub::relay::config::Limits;
use khub::relay::pairing::Side;
use khub::testing::{
    Delivery, HostileRelay, Scanner, TempDir, TestRelay, capture_logs, captured_logs, flip_byte,
    paired_devices,
};

/// Any single step of a scenario.
const STEP: Duration = Duration::from_secs(30);

async fn step<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, future)
        .await
        .expect("step in time")
}

/// `error` is the device refusing what the relay sent as the relay's fault
/// (a protocol error), for the reason `what` names.
fn assert_protocol_error(error: &ClientError, what: &str) {
    assert!(
        matches!(error, ClientError::Protocol(m) if m.contains(what)),
        "{error}"
    );
}

/// An MLS group of one device that is not in the channel, with `channel`'s id.
/// It is one commit in, like a channel whose second device just joined.
fn outsider(channel: ChannelId) -> Channel {
    let mut group =
        Channel::create(channel, DeviceId::random(&mut os_rng()), "outsider", 0).unwrap();
    let update = group.commit_update().unwrap();
    group.take_in(&update.envelope, 0);
    group
}

fn scanner_for(devices: &[Device], codes: &[Code], marker: &str) -> Scanner {
    let mut scanner = Scanner::new();
    scanner.add("plaintext marker", marker.as_bytes());
    for device in devices {
        scanner.add_device(device);
    }
    for code in codes {
        scanner.add_code(code);
    }
    scanner
}

/// What the hostile relay delivers in place of the ten real envelopes `m(1..=10)`.
fn mischief(m: impl Fn(usize) -> Vec<u8>, foreign: &[u8], forged: &[u8]) -> Vec<Vec<u8>> {
    vec![
        m(1),
        flip_byte(&m(2), 80), // ciphertext changed
        m(2),
        m(2),                 // duplicated
        m(4),                 // 3 skipped: a gap
        m(3),                 // 3 late: below the highest taken in
        m(1),                 // replayed from earlier
        foreign.to_vec(),     // another channel's
        forged.to_vec(),      // a non-member's (another group, same id and epoch)
        flip_byte(&m(5), 44), // header (sender sequence number) changed
        m(5),
        m(6),
        m(8),           // 7 dropped
        vec![0x01; 20], // not an envelope
        m(9),
        m(10),
    ]
}

/// The messages of [`mischief`] that must reach the app, in order.
const AUTHENTIC: [usize; 8] = [1, 2, 4, 5, 6, 8, 9, 10];

/// The incidents [`mischief`] must cause, in order.
const INCIDENTS: [IncidentKind; 10] = {
    use IncidentKind::*;
    [
        Tampered, Replayed, Gap, Replayed, Replayed, Foreign, Fork, Tampered, Gap, Malformed,
    ]
};

/// A sender talking to the relay and a receiver behind a hostile front, the
/// sender's ten messages stored, and the two envelopes the front injects.
struct Setup {
    relay: TestRelay,
    hostile: HostileRelay,
    _home: TempDir,
    paired: khub::testing::PairedDevices,
    marker: String,
    foreign: Vec<u8>,
    forged: Vec<u8>,
}

impl Setup {
    async fn new() -> Self {
        capture_logs();
        let relay = TestRelay::start(Limits::default()).await.unwrap();
        let hostile = HostileRelay::start(relay.addr()).await.unwrap();
        let home = TempDir::new("hostile");
        let paired = step(paired_devices(home.path(), &[relay.url(), hostile.url()]))
            .await
            .unwrap();
        let marker = format!("khub-plaintext-marker-{}", DeviceId::random(&mut os_rng()));
        let foreign = outsider(ChannelId::random(&mut os_rng()))
            .seal(b"from another channel")
            .unwrap()
            .envelope;
        let forged = outsider(paired.devices[1].channel())
            .seal(b"from a device that is no member")
            .unwrap()
            .envelope;
        Self {
            relay,
            hostile,
            _home: home,
            paired,
            marker,
            foreign,
            forged,
        }
    }

    fn body(&self, n: usize) -> Vec<u8> {
        format!("{} message {n}", self.marker).into_bytes()
    }

    async fn send_ten(&self) {
        let sender = &self.paired.devices[0];
        for n in 1..=10 {
            sender.queue(&self.body(n)).unwrap();
        }
        step(sender.sync()).await.unwrap();
    }

    /// The receiver's live session, caught up, then the ten messages sent
    /// and read on it, in order.
    async fn ten_live(&self) -> khub::client::Session {
        let receiver = &self.paired.devices[1];
        let session = receiver.connect();
        step(session.caught_up(STEP)).await.unwrap();
        self.send_ten().await;
        for n in 1..=10 {
            let message = step(session.recv()).await.unwrap();
            assert_eq!(message.body, self.body(n));
            receiver.mark_read(message.seq).unwrap();
        }
        session
    }

    /// The app saw exactly the authentic messages, and every refusal and gap
    /// is an incident; nothing leaked into what the relay keeps.
    fn check(&self, inbox: Vec<Vec<u8>>) {
        let receiver = &self.paired.devices[1];
        assert_eq!(inbox, AUTHENTIC.map(|n| self.body(n)));
        assert_eq!(receiver.next_unread().unwrap(), None);
        let incidents = receiver.incidents().unwrap();
        let kinds: Vec<IncidentKind> = incidents.iter().map(|i| i.kind).collect();
        assert_eq!(kinds, INCIDENTS);
        let gap = incidents
            .iter()
            .find(|i| i.kind == IncidentKind::Gap)
            .unwrap();
        assert!(gap.detail.contains("never arrived"), "{gap:?}");
        // The refusals were reported in the log too (as warnings).
        assert!(captured_logs().contains("already taken in"));
        let scanner = scanner_for(&self.paired.devices, &self.paired.codes, &self.marker);
        assert_eq!(scanner.scan_dir(self.relay.dir()).unwrap(), []);
        assert_eq!(scanner.scan_logs(), []);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_replayed_reordered_and_foreign_envelopes_are_refused_and_reported() {
    let setup = Setup::new().await;
    setup.send_ten().await;
    let (foreign, forged) = (setup.foreign.clone(), setup.forged.clone());
    setup.hostile.on_sync(move |real: Vec<Delivery>| {
        assert_eq!(real.len(), 10, "the relay holds the ten messages");
        mischief(|n| real[n - 1].envelope.clone(), &foreign, &forged)
    });
    let receiver = &setup.paired.devices[1];
    step(receiver.sync()).await.unwrap();
    let mut inbox = Vec::new();
    while let Some(message) = receiver.next_unread().unwrap() {
        receiver.mark_read(message.seq).unwrap();
        inbox.push(message.body);
    }
    setup.check(inbox);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_session_refuses_and_reports_the_same_from_a_hostile_relay() {
    let setup = Setup::new().await;
    let (foreign, forged) = (setup.foreign.clone(), setup.forged.clone());
    // The front holds the real deliveries back and, once it has all ten,
    // delivers its version over the WebSocket.
    let mut held = Vec::new();
    setup.hostile.on_deliver(move |delivery: Delivery| {
        held.push(delivery.envelope);
        if held.len() < 10 {
            return Vec::new();
        }
        mischief(|n| held[n - 1].clone(), &foreign, &forged)
    });
    let receiver = &setup.paired.devices[1];
    let session = receiver.connect();
    setup.send_ten().await;
    let mut inbox = Vec::new();
    while inbox.len() < AUTHENTIC.len() {
        let message = step(session.recv()).await.unwrap();
        receiver.mark_read(message.seq).unwrap();
        inbox.push(message.body);
    }
    session.close().await;
    setup.check(inbox);
}

/// What a pairing under a hostile front ended with.
struct Outcome {
    inviter: Result<(), ClientError>,
    joiner: Result<(), ClientError>,
    /// Devices the relay lists for the inviter's channel afterwards.
    relay_devices: usize,
    /// Members the inviter's keyring lists afterwards.
    inviter_members: usize,
    joiner_has_state: bool,
}

/// Pairs a second device with `inviter` through `hostile` (the joiner types the
/// right code) and reports how both sides ended.
async fn pair_through(inviter: &Device, hostile: &HostileRelay, home: &TempDir) -> Outcome {
    let invitation = step(inviter.invite()).await.unwrap();
    let code = Code::parse(&invitation.code()).unwrap();
    let completing = tokio::spawn(invitation.complete(Duration::from_secs(20)));
    let joiner_home = home.path().join("joiner");
    let joined = step(join(
        &joiner_home,
        &hostile.url(),
        "joiner",
        &code,
        Duration::from_secs(20),
    ))
    .await;
    let completed = step(completing).await.unwrap();
    Outcome {
        inviter: completed.map(drop),
        joiner: joined.map(drop),
        relay_devices: step(inviter.relay_devices()).await.unwrap().len(),
        inviter_members: inviter.members().unwrap().len(),
        joiner_has_state: joiner_home.join(khub::client::STATE_FILE).exists(),
    }
}

fn assert_nothing_paired(outcome: &Outcome) {
    assert!(outcome.inviter.is_err(), "the inviter fails visibly");
    assert!(outcome.joiner.is_err(), "the joiner fails visibly");
    assert_eq!(outcome.relay_devices, 1, "the relay admitted no device");
    assert_eq!(
        outcome.inviter_members, 1,
        "the inviter's channel has no new member"
    );
    assert!(!outcome.joiner_has_state, "the joiner stored no channel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_substitutes_pairing_messages_pairs_nothing_and_both_sides_say_so() {
    capture_logs();
    let relay = TestRelay::start(Limits::default()).await.unwrap();
    let hostile = HostileRelay::start(relay.addr()).await.unwrap();
    let home = TempDir::new("hostile-pairing");
    // The inviter talks to the relay through the front too.
    let inviter = step(Device::create(
        &home.path().join("inviter"),
        &hostile.url(),
        "inviter",
    ))
    .await
    .unwrap();

    // 1. A bit of the joiner's answer changed on its way to the inviter.
    hostile.on_pairing(|to, _sid, message| match to {
        Side::Inviter => flip_byte(&message, message.len() / 2),
        Side::Joiner => message,
    });
    let outcome = pair_through(&inviter, &hostile, &home).await;
    assert_nothing_paired(&outcome);
    assert!(
        matches!(&outcome.joiner, Err(ClientError::Pairing(_))),
        "the joiner is told the pairing failed: {:?}",
        outcome.joiner
    );

    // 2. The relay answers the inviter itself, as a joiner that guessed the
    //    code (its one online guess), and keeps the real joiner waiting.
    let relays_device = DeviceId::random(&mut os_rng());
    let (_, key_package) = khub::channel::Joining::start(relays_device, "relay's device").unwrap();
    let me = DeviceInfo::new(
        relays_device,
        b"a token of the relay's choosing",
        key_package,
    );
    let seen_start = std::sync::Arc::new(std::sync::Mutex::new(None::<Vec<u8>>));
    let seen = std::sync::Arc::clone(&seen_start);
    hostile.on_pairing(move |to, sid, message| match to {
        Side::Joiner => {
            seen.lock().unwrap().get_or_insert_with(|| message.clone());
            message
        }
        Side::Inviter => {
            let start = seen
                .lock()
                .unwrap()
                .clone()
                .expect("the joiner fetched the start first");
            let guess = Code::generate(Nameplate::new(1).unwrap(), &mut os_rng());
            Joiner::respond(&guess, sid, &start, &me, &mut os_rng())
                .map(|(_, response)| response)
                .unwrap_or(message)
        }
    });
    let outcome = pair_through(&inviter, &hostile, &home).await;
    assert_nothing_paired(&outcome);

    // 3. The relay shows the joiner a start of its own, under a guessed code.
    hostile.on_pairing(|to, sid, message| match to {
        Side::Joiner if message.first() == Some(&0x01) => {
            let guess = Code::generate(Nameplate::new(1).unwrap(), &mut os_rng());
            Inviter::start(&guess, sid, &mut os_rng()).1
        }
        _ => message,
    });
    let outcome = pair_through(&inviter, &hostile, &home).await;
    assert_nothing_paired(&outcome);

    // 4. The relay spoils the inviter's last message (the welcome). The
    //    inviter has admitted the joiner by then; it hears no "joined" from
    //    it, takes the admission back, and says so.
    hostile.on_pairing(|to, _sid, message| match to {
        Side::Joiner if message.first() == Some(&0x03) => flip_byte(&message, message.len() - 1),
        _ => message,
    });
    let outcome = pair_through(&inviter, &hostile, &home).await;
    assert_nothing_paired(&outcome);

    // An honest relay then pairs the same two devices at the first try.
    hostile.honest();
    let outcome = pair_through(&inviter, &hostile, &home).await;
    assert!(outcome.inviter.is_ok() && outcome.joiner.is_ok());
    assert_eq!(outcome.relay_devices, 2);

    let scanner = scanner_for(&[inviter], &[], "no plaintext in pairing");
    assert_eq!(scanner.scan_dir(relay.dir()).unwrap(), []);
    assert_eq!(scanner.scan_logs(), []);
}

#[test]
fn the_scanner_finds_a_secret_however_it_is_written() {
    let secret = b"0123456789abcdefghij-secret";
    let mut scanner = Scanner::new();
    scanner.add("the secret", secret);
    assert_eq!(
        scanner.scan_bytes("clean", b"nothing to see here, at all"),
        []
    );
    for prefix in 0..3 {
        let mut blob = vec![0x42u8; prefix];
        blob.extend_from_slice(secret);
        blob.extend_from_slice(b"tail");
        use base64::Engine;
        for written in [
            blob.clone(),
            hex::encode(&blob).into_bytes(),
            base64::engine::general_purpose::STANDARD
                .encode(&blob)
                .into_bytes(),
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(&blob)
                .into_bytes(),
        ] {
            let found = scanner.scan_bytes("blob", &written);
            assert_eq!(
                found.len(),
                1,
                "prefix {prefix}: {}",
                String::from_utf8_lossy(&written)
            );
        }
    }
}

/// What the removed device injects into a remaining member's stream, each
/// with the refusal it must cause.
struct Injection {
    what: &'static str,
    envelope: Vec<u8>,
    refused_as: IncidentKind,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_device_with_the_relay_reads_nothing_new_and_changes_nothing() {
    capture_logs();
    let relay = TestRelay::start(Limits::default()).await.unwrap();
    let hostile = HostileRelay::start(relay.addr()).await.unwrap();
    let home = TempDir::new("removed-attack");
    // Alice and Dave talk to the relay; Bob's traffic goes through the hostile front.
    let paired = step(paired_devices(
        home.path(),
        &[relay.url(), hostile.url(), relay.url()],
    ))
    .await
    .unwrap();
    let [alice, bob, dave] = &paired.devices[..] else {
        panic!("three devices")
    };
    let channel = alice.channel();

    // Dave keeps everything his device holds; then Alice removes him.
    let mut dave_keys = dave.channel_for_testing_only().unwrap();
    let forger = || dave.channel_for_testing_only().unwrap();
    step(alice.remove(dave.id())).await.unwrap();
    let secret = "TOP SECRET sent after dave-tablet was removed";
    alice.queue(secret.as_bytes()).unwrap();
    step(alice.sync()).await.unwrap();
    step(bob.sync()).await.unwrap();
    let got = bob
        .next_unread()
        .unwrap()
        .expect("bob gets alice's message");
    assert_eq!(got.body, secret.as_bytes());
    bob.mark_read(got.seq).unwrap();

    // Dave holds every envelope the relay ever stored: none opens for him.
    let store = &relay.relay().unwrap().hub.store;
    let log = store.read(channel, 0, 10_000).await.unwrap();
    for stored in &log {
        let taken = dave_keys.take_in(&stored.envelope, 0);
        if let Some(khub::channel::Event::App { plaintext, .. }) = taken.event {
            assert!(!String::from_utf8_lossy(&plaintext).contains("TOP SECRET"));
        }
    }
    assert!(dave_keys.is_removed(), "dave saw his own removal");

    // With the old epoch's keys, Dave makes every kind of envelope he can,
    // and the relay slips them into Bob's stream.
    let plant = DeviceId::random(&mut os_rng());
    let (_, plant_key_package) = khub::channel::Joining::start(plant, "dave-plant").unwrap();
    let replayed = log.last().unwrap().envelope.to_vec();
    let injections = [
        Injection {
            what: "an old-epoch message of his own",
            envelope: forger()
                .seal(b"\x00member added: dave-plant")
                .unwrap()
                .envelope,
            refused_as: IncidentKind::RemovedSender,
        },
        Injection {
            what: "an old-epoch commit adding a device whose keys he holds",
            envelope: forger()
                .commit_add(plant, &plant_key_package)
                .unwrap()
                .0
                .envelope,
            refused_as: IncidentKind::RemovedSender,
        },
        Injection {
            what: "an old-epoch commit removing Alice",
            envelope: forger().commit_remove(&[alice.id()]).unwrap().envelope,
            refused_as: IncidentKind::RemovedSender,
        },
        Injection {
            what: "an old-epoch update to keys he chose",
            envelope: forger().commit_update().unwrap().envelope,
            refused_as: IncidentKind::RemovedSender,
        },
        Injection {
            what: "an old-epoch message signed by him, claiming Alice",
            envelope: forger()
                .seal_as_for_testing_only(alice.id(), 1_000_000, b"\x00rekey to my key")
                .unwrap()
                .envelope,
            refused_as: IncidentKind::Forged,
        },
        Injection {
            what: "Alice's message after his removal, replayed",
            envelope: replayed,
            refused_as: IncidentKind::Replayed,
        },
    ];
    let envelopes: Vec<Vec<u8>> = injections.iter().map(|i| i.envelope.clone()).collect();
    let mut once = Some(envelopes);
    hostile.on_sync(move |real: Vec<Delivery>| {
        let mut out: Vec<Vec<u8>> = real.into_iter().map(|d| d.envelope).collect();
        out.extend(once.take().unwrap_or_default());
        out
    });
    let members_before = bob.members().unwrap();
    step(bob.sync()).await.unwrap();

    // Each attempt is an incident; none reached the inbox or the membership.
    let incidents = bob.incidents().unwrap();
    let kinds: Vec<IncidentKind> = incidents.iter().map(|i| i.kind).collect();
    assert_eq!(
        kinds,
        injections.iter().map(|i| i.refused_as).collect::<Vec<_>>(),
        "{:?}",
        injections.iter().map(|i| i.what).collect::<Vec<_>>()
    );
    assert_eq!(bob.next_unread().unwrap(), None);
    assert_eq!(bob.members().unwrap(), members_before);
    assert!(
        !bob.members()
            .unwrap()
            .iter()
            .any(|m| m.id == dave.id() || m.id == plant)
    );

    // Bob and Alice go on; Dave reads none of it.
    bob.queue(b"after the injections").unwrap();
    step(bob.sync()).await.unwrap();
    step(alice.sync()).await.unwrap();
    let got = alice
        .next_unread()
        .unwrap()
        .expect("alice gets bob's message");
    assert_eq!(got.body, b"after the injections");
    for stored in store.read(channel, 0, 10_000).await.unwrap() {
        let taken = dave_keys.take_in(&stored.envelope, 0);
        assert!(!matches!(
            taken.event,
            Some(khub::channel::Event::App { .. })
        ));
    }
    let scanner = scanner_for(&paired.devices, &paired.codes, secret);
    assert_eq!(scanner.scan_dir(relay.dir()).unwrap(), []);
    assert_eq!(scanner.scan_logs(), []);
}

/// A relay that shows a device its own message under a forged older epoch
/// cannot make it send the message again, which members would read twice:
/// only a sealing the device made itself (by its hash) says where its
/// message stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_old_epoch_on_a_devices_own_message_does_not_make_it_send_it_twice() {
    let setup = Setup::new().await;
    let [alice, bob] = [&setup.paired.devices[0], &setup.paired.devices[1]];
    // The channel moves on by more epochs than members keep.
    for i in 0..4 {
        let name = format!("extra-{i}");
        let home = setup._home.path().join(&name);
        khub::testing::pair_device(alice, &home, &setup.relay.url(), &name, STEP)
            .await
            .unwrap();
    }
    step(bob.sync()).await.unwrap();
    let bob_id = bob.id();
    setup.hostile.on_sync(move |real: Vec<Delivery>| {
        real.into_iter()
            .map(|d| {
                let mut envelope = d.envelope;
                if envelope[21..37] == bob_id.as_bytes()[..] {
                    let epoch = u32::from_be_bytes(envelope[17..21].try_into().unwrap());
                    envelope[17..21].copy_from_slice(&epoch.saturating_sub(4).to_be_bytes());
                }
                envelope
            })
            .collect()
    });
    bob.queue(b"said once").unwrap();
    step(bob.sync()).await.unwrap();
    setup.hostile.honest();
    step(bob.sync()).await.unwrap();
    assert_eq!(bob.pending().unwrap(), 0);
    step(alice.sync()).await.unwrap();
    let mut read = Vec::new();
    while let Some(message) = alice.next_unread().unwrap() {
        alice.mark_read(message.seq).unwrap();
        read.push(String::from_utf8(message.body).unwrap());
    }
    assert!(
        read.iter().filter(|m| *m == "said once").count() == 1,
        "read once: {read:?}"
    );
}

/// A relay that sends a frame longer than any relay sends cannot make a
/// device hold it: the session stops without reading it, saying why, and the
/// device takes in nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_longer_than_any_relay_sends_stops_the_session_unread() {
    let setup = Setup::new().await;
    // Each delivery becomes an envelope as long as the longest frame, whose
    // frame is a third longer again.
    setup
        .hostile
        .on_deliver(|_| vec![vec![0x02; MAX_FRAME_LEN]]);
    let receiver = &setup.paired.devices[1];
    let cursor = receiver.cursor();
    let session = receiver.connect();
    setup.send_ten().await;
    let error = step(async {
        loop {
            if let Status::Failed(error) = session.status() {
                break error;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let expected = format!("the relay sent a frame longer than {MAX_FRAME_LEN} bytes");
    assert_protocol_error(&error, &expected);
    session.close().await;
    assert_eq!(receiver.cursor(), cursor);
    let incidents = receiver.incidents().unwrap();
    assert!(incidents.is_empty(), "{incidents:?}");
}

/// The same for an HTTP answer: a `/sync` answer longer than any relay sends
/// fails the sync without being read to its end, and nothing is taken in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_longer_than_any_relay_sends_fails_the_sync_unread() {
    let setup = Setup::new().await;
    setup.send_ten().await;
    // Envelopes of 1 MiB, a third longer as base64: past the limit.
    let count = (MAX_ANSWER_LEN >> 20) * 3 / 4 + 1;
    setup
        .hostile
        .on_sync(move |_| vec![vec![0x02; 1 << 20]; count]);
    let receiver = &setup.paired.devices[1];
    let cursor = receiver.cursor();
    let error = step(receiver.sync()).await.unwrap_err();
    let expected = format!("sent more than {MAX_ANSWER_LEN} bytes");
    assert_protocol_error(&error, &expected);
    assert_eq!(receiver.cursor(), cursor);
    let incidents = receiver.incidents().unwrap();
    assert!(incidents.is_empty(), "{incidents:?}");
    // An honest answer is read again.
    setup.hostile.honest();
    step(receiver.sync()).await.unwrap();
    assert!(receiver.cursor() > cursor);
}

/// A relay that refuses the commit of a removal for good cannot pass the
/// removal off as done: the device stays a member of the MLS group, and
/// `remove` says so instead of returning as if it were out. Asked again
/// through an honest relay, the removal goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_refuses_a_removal_commit_cannot_pass_the_removal_off_as_done() {
    let setup = Setup::new().await;
    let [laptop, phone] = [&setup.paired.devices[0], &setup.paired.devices[1]];
    setup.hostile.on_publish(|_| {
        Some(Refusal::new(
            ErrorCode::Conflict,
            "stored before with other bytes",
        ))
    });
    let error = step(phone.remove(laptop.id())).await.unwrap_err();
    assert!(
        matches!(&error, ClientError::NotRemoved { device, why }
            if *device == laptop.id() && why.contains("stored before with other bytes")),
        "{error}"
    );
    let members = phone.members().unwrap();
    assert!(members.iter().any(|m| m.id == laptop.id()));

    setup.hostile.honest();
    step(phone.remove(laptop.id())).await.unwrap();
    let members = phone.members().unwrap();
    assert!(!members.iter().any(|m| m.id == laptop.id()));
}

/// A `ready` that asks for pings further apart than any deadline can count
/// does not stop the session: the device takes a bounded interval, and
/// messages still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_interval_past_any_deadline_leaves_the_session_working() {
    let setup = Setup::new().await;
    setup.hostile.on_ready(|mut frame| {
        if let ServerFrame::Ready {
            ping_secs,
            retention_secs,
            ..
        } = &mut frame
        {
            *ping_secs = Some(u64::MAX);
            *retention_secs = retention_secs.map(|_| u64::MAX);
        }
        frame
    });
    setup.ten_live().await.close().await;
}

/// `/sync` answers that would keep a device asking forever or make it hold
/// far more than their bytes are refused as the relay's fault: one that
/// says more follows but sends nothing after the cursor, and one with more
/// acks than a request can have published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_answers_that_would_never_end_or_swell_in_memory_are_refused() {
    let setup = Setup::new().await;
    setup.send_ten().await;
    let receiver = &setup.paired.devices[1];
    step(receiver.sync()).await.unwrap();
    let cursor = receiver.cursor();
    setup
        .hostile
        .on_sync_answer(move |mut answer: SyncResponse| {
            answer.envelopes = vec![Delivered {
                seq: cursor,
                envelope: vec![0x02; 200],
            }];
            answer.more = true;
            answer
        });
    let error = step(receiver.sync()).await.unwrap_err();
    assert_protocol_error(&error, "sent none after the cursor");

    setup.hostile.on_sync_answer(|mut answer: SyncResponse| {
        answer.acks = vec![
            SyncAck {
                seq: None,
                duplicate: false,
                error: None,
            };
            MAX_PUBLISH_PER_SYNC + 1
        ];
        answer
    });
    let error = step(receiver.sync()).await.unwrap_err();
    assert_protocol_error(&error, "list longer than 10000 items");
    assert_eq!(receiver.cursor(), cursor);
    setup.hostile.honest();
    step(receiver.sync()).await.unwrap();
}

/// A relay that pretends to have gone back (its `ready` says its head is 0,
/// once) makes the device read the channel again, and gains nothing by it:
/// nothing reaches the app twice, nothing it took in before is reported as a
/// replay, the pretence is an incident, and what comes next arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_pretends_to_have_gone_back_delivers_nothing_twice() {
    let setup = Setup::new().await;
    setup.send_ten().await;
    let receiver = &setup.paired.devices[1];
    step(receiver.sync()).await.unwrap();
    let mut read = 0;
    while let Some(message) = receiver.next_unread().unwrap() {
        receiver.mark_read(message.seq).unwrap();
        read += 1;
    }
    assert_eq!(read, 10);
    let mut pretended = false;
    setup.hostile.on_ready(move |mut frame| {
        if let ServerFrame::Ready { head, .. } = &mut frame
            && !pretended
        {
            pretended = true;
            *head = 0;
        }
        frame
    });
    let session = receiver.connect();
    step(session.caught_up(STEP)).await.unwrap();
    let sender = &setup.paired.devices[0];
    sender.queue(b"after the pretence").unwrap();
    step(sender.sync()).await.unwrap();
    let message = step(session.recv()).await.unwrap();
    assert_eq!(message.body, b"after the pretence");
    receiver.mark_read(message.seq).unwrap();
    let nothing_more = tokio::time::timeout(Duration::from_millis(500), session.recv()).await;
    assert!(nothing_more.is_err(), "nothing twice");
    assert_eq!(receiver.next_unread().unwrap(), None);
    let kinds: Vec<IncidentKind> = receiver
        .incidents()
        .unwrap()
        .iter()
        .map(|i| i.kind)
        .collect();
    assert_eq!(kinds, [IncidentKind::RelayRewound]);
    session.close().await;
}

/// Frames of a type this khub does not know (a later relay's), before and
/// after `ready`, are passed over with a warning: the live session goes on
/// and messages arrive. A
/// frame of a known type that does not decode still ends the session as the
/// relay's fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_of_unknown_types_are_passed_over_and_broken_known_ones_are_not() {
    let setup = Setup::new().await;
    setup.hostile.before_ready(vec![
        r#"{"type":"welcome","motd":"hello"}"#.to_owned(),
        r#"{"type":"notice"}"#.to_owned(),
    ]);
    setup.hostile.after_ready(vec![
        r#"{"type":"notice","text":"maintenance at 03:00"}"#.to_owned(),
        r#"{"type":"deliv\u0065r_many","frames":[{"seq":1}]}"#.to_owned(),
    ]);
    let session = setup.ten_live().await;
    assert!(matches!(session.status(), Status::Live { .. }));
    session.close().await;
    let warned = captured_logs()
        .matches("a frame of a type this khub does not know")
        .count();
    assert_eq!(warned, 1, "one warning for the connection");
    let before = captured_logs()
        .matches("frames of a type this khub does not know before ready")
        .count();
    assert_eq!(before, 1);

    setup.hostile.before_ready(Vec::new());
    setup
        .hostile
        .after_ready(vec![r#"{"type":"deliver","seq":"eleven"}"#.to_owned()]);
    let session = setup.paired.devices[1].connect();
    let error = step(session.recv()).await.unwrap_err();
    assert_protocol_error(&error, "unexpected frame");
    session.close().await;
}

/// A device resuming with messages queued publishes none of them before it
/// has checked the envelope at its cursor, asked for again (had the relay
/// gone back, what it numbered since would be taken in first), while that
/// envelope is held back (up to the 10 s after which a session publishes
/// anyway, for a tail the relay pruned); once it is checked, they go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resuming_device_publishes_nothing_before_the_envelope_at_its_cursor_is_checked() {
    let setup = Setup::new().await;
    setup.send_ten().await;
    let [sender, receiver] = [&setup.paired.devices[0], &setup.paired.devices[1]];
    step(receiver.sync()).await.unwrap();
    receiver.queue(b"written offline").unwrap();
    setup.hostile.hold_again(Duration::from_millis(1500));
    let session = receiver.connect();
    step(async {
        while receiver.pending().unwrap() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(setup.hostile.published_while_held(), 0);
    session.close().await;
    step(sender.sync()).await.unwrap();
    let mut last = None;
    while let Some(message) = sender.next_unread().unwrap() {
        sender.mark_read(message.seq).unwrap();
        last = Some(message.body);
    }
    assert_eq!(last.as_deref(), Some(&b"written offline"[..]));
}

/// A relay that numbers an envelope past the highest sequence number a relay
/// reaches (here a new message at i64::MAX, where a device's inbox numbers
/// would have nowhere to go: taking in the next one failed for good) is
/// refused as the relay's fault, and nothing of that answer is taken in:
/// once the relay is honest again, every message arrives, once and in
/// order. Over a live session, a `ready` whose head is past it ends the
/// session the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_numbers_past_the_highest_sequence_number_is_refused() {
    let setup = Setup::new().await;
    let [sender, receiver] = [&setup.paired.devices[0], &setup.paired.devices[1]];
    step(receiver.sync()).await.unwrap();
    let cursor = receiver.cursor();
    sender.queue(b"one").unwrap();
    step(sender.sync()).await.unwrap();
    setup.hostile.on_sync_answer(|mut answer: SyncResponse| {
        if let Some(envelope) = answer.envelopes.last_mut() {
            envelope.seq = i64::MAX as u64;
        }
        answer
    });
    let error = step(receiver.sync()).await.unwrap_err();
    assert_protocol_error(&error, "past the highest relay sequence number");
    assert_eq!(receiver.cursor(), cursor);
    assert_eq!(receiver.next_unread().unwrap(), None);

    setup.hostile.honest();
    sender.queue(b"two").unwrap();
    step(sender.sync()).await.unwrap();
    step(receiver.sync()).await.unwrap();
    let mut bodies = Vec::new();
    while let Some(message) = receiver.next_unread().unwrap() {
        receiver.mark_read(message.seq).unwrap();
        bodies.push(message.body);
    }
    assert_eq!(bodies, [b"one".to_vec(), b"two".to_vec()]);
    assert!(receiver.incidents().unwrap().is_empty());

    setup.hostile.on_ready(|mut frame| {
        if let ServerFrame::Ready { head, .. } = &mut frame {
            *head = khub::protocol::MAX_SEQ + 1;
        }
        frame
    });
    let session = receiver.connect();
    let error = step(session.recv()).await.unwrap_err();
    assert_protocol_error(&error, "past the highest relay sequence number");
    session.close().await;
    assert!(receiver.incidents().unwrap().is_empty());
}

/// Has the hostile relay's `ready` say `pruned_to` = `claim(head)`, and checks
/// that the receiver's next session ends as a protocol error about `what`.
async fn refused_with_pruned_to(
    setup: &Setup,
    claim: impl Fn(u64) -> u64 + Send + 'static,
    what: &str,
) {
    setup.hostile.on_ready(move |mut frame| {
        if let ServerFrame::Ready {
            head, pruned_to, ..
        } = &mut frame
        {
            *pruned_to = Some(claim(*head));
        }
        frame
    });
    let session = setup.paired.devices[1].connect();
    let error = step(session.recv()).await.unwrap_err();
    assert_protocol_error(&error, what);
    session.close().await;
}

/// A relay whose `ready` says that nothing is stored up to a number past its
/// head, or up to one not after the device's cursor, ends the session as a
/// protocol error before the device publishes anything; once the relay is
/// honest, the queued message goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_that_says_nothing_is_stored_where_it_cannot_be_is_refused() {
    let setup = Setup::new().await;
    let receiver = &setup.paired.devices[1];
    step(receiver.sync()).await.unwrap();
    receiver.queue(b"written offline").unwrap();
    for past_head in [true, false] {
        let claim = move |head| if past_head { head + 1 } else { 0 };
        refused_with_pruned_to(&setup, claim, "not after this device's cursor").await;
        assert_eq!(receiver.pending().unwrap(), 1);
    }
    setup.hostile.honest();
    let session = receiver.connect();
    step(async {
        while receiver.pending().unwrap() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    session.close().await;
    assert!(receiver.incidents().unwrap().is_empty());
}

/// A relay whose `ready` says nothing after the device's cursor is stored up
/// to its head, and then delivers what it said was gone, ends the session as
/// a protocol error before the device takes any of it in; from an honest
/// relay, every message arrives, once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_delivers_what_its_ready_said_was_pruned_is_refused() {
    let setup = Setup::new().await;
    setup.send_ten().await;
    let receiver = &setup.paired.devices[1];
    let cursor = receiver.cursor();
    refused_with_pruned_to(&setup, |head| head, "after its ready said nothing up to").await;
    assert_eq!(receiver.cursor(), cursor);
    assert_eq!(receiver.next_unread().unwrap(), None);
    setup.hostile.honest();
    step(receiver.sync()).await.unwrap();
    let mut bodies = Vec::new();
    while let Some(message) = receiver.next_unread().unwrap() {
        receiver.mark_read(message.seq).unwrap();
        bodies.push(message.body);
    }
    assert_eq!(bodies, (1..=10).map(|n| setup.body(n)).collect::<Vec<_>>());
    assert!(receiver.incidents().unwrap().is_empty());
}

/// A relay that pretends to have gone back on every sync, and refuses for
/// quota whatever the device publishes (so its outbox never empties), makes
/// the device read the channel again each time, but queue one snapshot of
/// its notes for all the pretences, not one each: its outbox stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_going_back_again_and_again_does_not_pile_up_snapshots() {
    let setup = Setup::new().await;
    let receiver = &setup.paired.devices[1];
    receiver
        .vault()
        .create(khub::notes::NoteEdit {
            title: Some("groceries".into()),
            ..Default::default()
        })
        .unwrap();
    step(receiver.sync()).await.unwrap();
    assert_eq!(receiver.pending().unwrap(), 0);
    setup
        .hostile
        .on_publish(|_| Some(Refusal::new(ErrorCode::OverQuota, "the channel is full")));
    // Each sync's first answer (the re-read from 1 and the answers to
    // publishes say the truth, or the sync would stop at the second).
    setup.hostile.on_sync_answer(|mut answer: SyncResponse| {
        if answer.acks.is_empty() && answer.envelopes.first().is_none_or(|e| e.seq > 1) {
            answer.head = 0;
        }
        answer
    });
    step(receiver.sync()).await.unwrap();
    let pending = receiver.pending().unwrap();
    assert!(pending > 0, "the snapshot waits in the outbox");
    for _ in 0..3 {
        step(receiver.sync()).await.unwrap();
    }
    assert_eq!(receiver.pending().unwrap(), pending);
    let rewound = receiver
        .incidents()
        .unwrap()
        .iter()
        .filter(|i| i.kind == IncidentKind::RelayRewound)
        .count();
    assert_eq!(rewound, 4, "each pretence is noticed");
}
