//! The client SDK against an in-process relay: pairing, durable sends across
//! crashes, reconnect storms, resuming from the cursor, removal, and state on disk.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::net::{STEP, TestRelay};
use khub::client::{ClientError, Device, IncidentKind, Sent, Session, Status, join};
use khub::notes::NoteEdit;
use khub::pairing::Code;
use khub::relay::config::RelayConfig;
use khub::relay::store::sqlite::SqliteStore;

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// A channel of a first device plus `others`, each joined through the relay.
async fn devices(addr: SocketAddr, dir: &Path, names: &[&str]) -> Vec<Device> {
    let first = Device::create(&dir.join(names[0]), &url(addr), names[0])
        .await
        .unwrap();
    let mut all = vec![first];
    for name in &names[1..] {
        let device = common::sdk_join(&all[0], &dir.join(name), &url(addr), name).await;
        all.push(device);
    }
    all
}

async fn recv(session: &Session, device: &Device) -> (String, String) {
    let message = tokio::time::timeout(STEP, session.recv())
        .await
        .expect("message in time")
        .unwrap();
    device.mark_read(message.seq).unwrap();
    (message.from_name, String::from_utf8(message.body).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_pair_and_exchange_messages_once_in_order() {
    let relay = TestRelay::start(RelayConfig::default()).await;
    let dir = common::tempdir("client");
    let d = devices(relay.addr, &dir, &["laptop", "phone", "tablet"]).await;
    let (sa, sb, sc) = (d[0].connect(), d[1].connect(), d[2].connect());
    for i in 0..10 {
        assert!(matches!(
            sa.send(format!("a{i}").as_bytes(), STEP).await.unwrap(),
            Sent::Acked { .. }
        ));
    }
    assert!(matches!(
        sc.send(b"from the tablet", STEP).await.unwrap(),
        Sent::Acked { .. }
    ));
    for i in 0..10 {
        assert_eq!(recv(&sb, &d[1]).await, ("laptop".into(), format!("a{i}")));
    }
    assert_eq!(
        recv(&sb, &d[1]).await,
        ("tablet".into(), "from the tablet".into())
    );
    // The laptop learned the tablet's name from the announcement when it joined.
    assert_eq!(
        recv(&sa, &d[0]).await,
        ("tablet".into(), "from the tablet".into())
    );
    for device in &d {
        assert_eq!(
            device.members().unwrap().len(),
            3,
            "{} knows everyone",
            device.name()
        );
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_queued_before_a_crash_is_delivered_once_after_restart() {
    let (dir, db, relay) = sqlite_relay().await;
    let addr = relay.addr;
    let d = devices(addr, &dir, &["laptop", "phone"]).await;
    relay.stop().await;

    // Relay down: the send is accepted into the durable outbox, then the app "crashes".
    {
        let session = d[0].connect();
        assert_eq!(
            session
                .send(b"written offline", Duration::from_millis(500))
                .await
                .unwrap(),
            Sent::Queued
        );
        assert!(matches!(session.status(), Status::Connecting { .. }));
    }
    let laptop_home = d[0].home().to_owned();
    drop(d);

    // Restart: the relay on the same file and port, the app from its state.
    let relay = start_on(addr, &db).await;
    let laptop = Device::open(&laptop_home).unwrap();
    assert_eq!(laptop.pending().unwrap(), 1);
    let phone = Device::open(&dir.join("phone")).unwrap();
    let (sa, sb) = (laptop.connect(), phone.connect());
    assert_eq!(
        recv(&sb, &phone).await,
        ("laptop".into(), "written offline".into())
    );
    sa.caught_up(STEP).await.unwrap();
    wait_until(|| laptop.pending().unwrap() == 0).await;

    // Stored by the relay but the ack lost (a crash between the relay's commit
    // and the app's bookkeeping): the relay already has the envelope, the
    // outbox still holds it. The resend is acked as a duplicate.
    sa.close().await;
    laptop.queue(b"acked twice").unwrap();
    let state = rusqlite::Connection::open(laptop_home.join("device.sqlite3")).unwrap();
    let envelope: Vec<u8> = state
        .query_row("SELECT envelope FROM outbox", [], |r| r.get(0))
        .unwrap();
    let token: Vec<u8> = state
        .query_row("SELECT token FROM identity", [], |r| r.get(0))
        .unwrap();
    let credentials = khub::protocol::Credentials {
        channel: laptop.channel(),
        device: laptop.id(),
        token: khub::crypto::token::AccessToken::from_slice(&token).unwrap(),
    };
    let body =
        serde_json::json!({"cursor": 0, "publish": [khub::protocol::b64::encode(&envelope)]});
    let first = common::net::post_json(
        addr,
        "/sync",
        &[("authorization", &credentials.to_header())],
        &body,
    )
    .await;
    assert_eq!(first.json()["acks"][0]["duplicate"], false);
    assert_eq!(laptop.pending().unwrap(), 1);
    laptop.sync().await.unwrap();
    assert_eq!(laptop.pending().unwrap(), 0, "the duplicate was acked");
    let sa = laptop.connect();
    sa.caught_up(STEP).await.unwrap();
    assert_eq!(
        recv(&sb, &phone).await,
        ("laptop".into(), "acked twice".into())
    );
    let nothing_more = tokio::time::timeout(Duration::from_millis(500), sb.recv()).await;
    assert!(nothing_more.is_err(), "delivered exactly once");
    relay.stop().await;
}

/// A relay restored from an older backup numbers new envelopes again from
/// its older head. A device whose cursor is past that head takes them in,
/// live or over `/sync`, whether it comes back while the relay's head is
/// behind its cursor or once it is past it (it tells by the envelope at its
/// cursor), even those numbered before it came back, and even with messages
/// from before the restore still unread; an incident says the relay went
/// back, and what it had taken in before raises no false `replayed`.
/// (Before, they skipped them without a word: a device resumed after its
/// cursor, and the relay delivers only what comes after the cursor a device
/// resumes from; and an unread message kept its relay number in the inbox, so
/// a new one under the same number was dropped.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_restored_from_an_older_backup_loses_nothing_new_and_says_so() {
    let (dir, db, relay) = sqlite_relay().await;
    let addr = relay.addr;
    let d = devices(addr, &dir, &["laptop", "phone", "tablet", "desktop"]).await;
    let (laptop, phone, tablet, desktop) = (&d[0], &d[1], &d[2], &d[3]);
    relay.stop().await;
    let backup = dir.join("backup");
    copy_database(&db, &backup);

    // After the backup: two messages every device takes in (the tablet and
    // the desktop, which sync, leave them unread).
    let relay = start_on(addr, &db).await;
    let (sa, sb) = (laptop.connect(), phone.connect());
    sa.caught_up(STEP).await.unwrap();
    for text in ["after the backup 1", "after the backup 2"] {
        acked(&sa, text).await;
        assert_eq!(recv(&sb, phone).await, ("laptop".into(), text.into()));
    }
    for device in [tablet, desktop] {
        synced(device).await;
    }
    let before = phone.cursor();
    sa.close().await;
    sb.close().await;
    relay.stop().await;

    // The relay runs on the backup and numbers new messages where the two
    // were. The laptop (live) and the tablet (`/sync`) come back while its
    // head is behind their cursors, the phone (live) and the desktop
    // (`/sync`) once it is past.
    let restored = dir.join("restored.sqlite3");
    copy_database(&backup, &restored);
    let relay = start_on(addr, &restored).await;
    let sa = laptop.connect();
    sa.caught_up(STEP).await.unwrap();
    assert!(acked(&sa, "after the restore 1").await < before);
    // Read again from the start, it counts only what it had not taken in.
    assert_eq!(synced(tablet).await, 1);
    acked(&sa, "after the restore 2").await;
    assert!(acked(&sa, "after the restore 3").await > before);
    let sb = phone.connect();
    for text in [
        "after the restore 1",
        "after the restore 2",
        "after the restore 3",
    ] {
        assert_eq!(recv(&sb, phone).await, ("laptop".into(), text.into()));
    }
    for (device, new) in [(tablet, 2), (desktop, 3)] {
        assert_eq!(synced(device).await, new, "{}", device.name());
        assert_eq!(
            unread(device),
            [
                "after the backup 1",
                "after the backup 2",
                "after the restore 1",
                "after the restore 2",
                "after the restore 3"
            ],
            "{}",
            device.name()
        );
    }
    for device in [laptop, phone, tablet, desktop] {
        let incidents = device.incidents().unwrap();
        let count = |kind| incidents.iter().filter(|i| i.kind == kind).count();
        assert_eq!(
            (
                count(IncidentKind::RelayRewound),
                count(IncidentKind::Replayed)
            ),
            (1, 0),
            "{}: {incidents:?}",
            device.name()
        );
    }
    let nothing_more = tokio::time::timeout(Duration::from_millis(500), sb.recv()).await;
    assert!(nothing_more.is_err(), "delivered exactly once");
    relay.stop().await;
}

/// A note change the relay lost in a restore (stored, acked and taken back
/// in by its author, never read by the phone) comes back: the laptop, finding
/// the relay went back, publishes a snapshot of its notes once it has read the
/// channel again. The phone gets the lost change from it, and the change
/// that builds on it applies at once (no `missing_history`; the lost
/// envelope is a `gap`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_note_change_a_relay_restore_lost_comes_back() {
    let (dir, db, relay) = sqlite_relay().await;
    let addr = relay.addr;
    let d = devices(addr, &dir, &["laptop", "phone"]).await;
    let (laptop, phone) = (&d[0], &d[1]);
    let note = laptop.vault().create(NoteEdit {
        title: Some("groceries".into()),
        ..NoteEdit::default()
    });
    let id = note.unwrap().id;
    synced(laptop).await;
    synced(phone).await;
    relay.stop().await;
    let backup = dir.join("backup");
    copy_database(&db, &backup);

    let relay = start_on(addr, &db).await;
    let body = |text: &str| NoteEdit {
        body: Some(text.into()),
        ..NoteEdit::default()
    };
    laptop.vault().update(id, body("milk")).unwrap();
    synced(laptop).await;
    synced(laptop).await;
    relay.stop().await;

    let restored = dir.join("restored.sqlite3");
    copy_database(&backup, &restored);
    let relay = start_on(addr, &restored).await;
    synced(laptop).await;
    laptop.vault().update(id, body("milk, eggs")).unwrap();
    synced(laptop).await;
    synced(phone).await;
    let on_phone = phone.vault().get(id).unwrap().unwrap();
    assert_eq!(on_phone.body, "milk, eggs");
    // The lost envelope shows as a gap in the laptop's numbers, nothing more.
    let kinds: Vec<IncidentKind> = phone.incidents().unwrap().iter().map(|i| i.kind).collect();
    assert_eq!(kinds, [IncidentKind::Gap]);
    relay.stop().await;
}

/// Sends `text` and returns the relay sequence number it was acked with.
async fn acked(session: &Session, text: &str) -> u64 {
    match session.send(text.as_bytes(), STEP).await.unwrap() {
        Sent::Acked { seq } => seq,
        Sent::Queued => panic!("{text} was not acked"),
    }
}

/// A sync of `device` that succeeds in time: how many envelopes it took in.
async fn synced(device: &Device) -> usize {
    tokio::time::timeout(STEP, device.sync())
        .await
        .expect("sync in time")
        .unwrap()
}

/// The texts of a device's unread messages, marked read.
fn unread(device: &Device) -> Vec<String> {
    let mut texts = Vec::new();
    while let Some(message) = device.next_unread().unwrap() {
        device.mark_read(message.seq).unwrap();
        texts.push(String::from_utf8(message.body).unwrap());
    }
    texts
}

/// Copies a stopped relay's SQLite file, with its WAL if it has one, to `to`.
fn copy_database(from: &Path, to: &Path) {
    for suffix in ["", "-wal"] {
        let (from, to) = (
            PathBuf::from(format!("{}{suffix}", from.display())),
            PathBuf::from(format!("{}{suffix}", to.display())),
        );
        if from.exists() {
            std::fs::copy(&from, &to).unwrap();
        }
    }
}

/// Marking read past the newest message (`u64::MAX`: "all of it") marks
/// what the inbox holds, not the messages still to come: the next one is
/// delivered, not hidden, and taking it in does not fail on the number it
/// gets after `read` — also on a home where an older khub stored such a
/// `read`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marking_everything_read_does_not_hide_the_next_message() {
    let relay = TestRelay::start(RelayConfig::default()).await;
    let dir = common::tempdir("client");
    let d = devices(relay.addr, &dir, &["laptop", "phone"]).await;
    d[1].mark_read(u64::MAX).unwrap();
    d[0].queue(b"after everything was read").unwrap();
    synced(&d[0]).await;
    synced(&d[1]).await;
    assert_eq!(unread(&d[1]), ["after everything was read"]);

    // A home where an older khub stored that `read` as it was given.
    let state = rusqlite::Connection::open(d[1].home().join("device.sqlite3")).unwrap();
    state
        .execute("UPDATE identity SET read = ?1", [i64::MAX])
        .unwrap();
    drop(state);
    let phone = Device::open(d[1].home()).unwrap();
    d[0].queue(b"after the upgrade").unwrap();
    synced(&d[0]).await;
    synced(&phone).await;
    assert_eq!(unread(&phone), ["after the upgrade"]);
    relay.stop().await;
}

/// A relay on a SQLite file in a fresh directory: (directory, file, relay).
async fn sqlite_relay() -> (PathBuf, PathBuf, TestRelay) {
    let dir = common::tempdir("client");
    let db = dir.join("relay.sqlite3");
    let relay = TestRelay::start_with(
        Arc::new(SqliteStore::open(&db).unwrap()),
        RelayConfig::default(),
    )
    .await;
    (dir, db, relay)
}

async fn start_on(addr: SocketAddr, db: &Path) -> TestRelay {
    // The port was just freed; retry briefly if the OS has not released it yet.
    for _ in 0..50 {
        if let Ok(relay) = TestRelay::start_on(
            addr,
            Arc::new(SqliteStore::open(db).unwrap()),
            RelayConfig::default(),
        )
        .await
        {
            return relay;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("could not rebind {addr}");
}

async fn wait_until(condition: impl FnMut() -> bool) {
    assert!(
        eventually(Duration::from_secs(5), condition).await,
        "condition not met in time"
    );
}

/// Whether `condition` holds within `within`, looked at every 25 ms.
async fn eventually(within: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while !condition() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_loses_and_duplicates_nothing() {
    let (dir, db, relay) = sqlite_relay().await;
    let addr = relay.addr;
    let d = devices(addr, &dir, &["laptop", "phone"]).await;
    let (sa, sb) = (d[0].connect(), d[1].connect());
    let mut relay = Some(relay);
    let total = 60;
    for i in 0..total {
        // Every 10 messages the relay goes away and comes back.
        if i % 10 == 5 {
            relay.take().unwrap().stop().await;
            relay = Some(start_on(addr, &db).await);
        }
        sa.send(format!("m{i}").as_bytes(), Duration::from_millis(200))
            .await
            .unwrap();
    }
    let mut received = Vec::new();
    while received.len() < total {
        received.push(recv(&sb, &d[1]).await.1);
    }
    assert_eq!(
        received,
        (0..total).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), sb.recv())
            .await
            .is_err(),
        "no duplicates"
    );
    wait_until(|| d[0].pending().unwrap() == 0).await;
    relay.unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_resumes_from_its_cursor() {
    let relay = TestRelay::start(RelayConfig::default()).await;
    let dir = common::tempdir("client");
    let d = devices(relay.addr, &dir, &["laptop", "phone"]).await;
    let sa = d[0].connect();
    for i in 0..5 {
        sa.send(format!("before {i}").as_bytes(), STEP)
            .await
            .unwrap();
    }
    let sb = d[1].connect();
    for i in 0..5 {
        assert_eq!(recv(&sb, &d[1]).await.1, format!("before {i}"));
    }
    sb.close().await;
    let cursor = d[1].cursor();
    for i in 0..5 {
        sa.send(format!("after {i}").as_bytes(), STEP)
            .await
            .unwrap();
    }
    // The phone restarts from disk and gets only what it had not seen.
    let phone = Device::open(d[1].home()).unwrap();
    assert_eq!(phone.cursor(), cursor);
    let sb = phone.connect();
    for i in 0..5 {
        assert_eq!(recv(&sb, &phone).await.1, format!("after {i}"));
    }
    // And the one-shot HTTP catch-up agrees: nothing new.
    assert_eq!(phone.sync().await.unwrap(), 0);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_device_is_cut_off_and_cannot_read_what_follows() {
    let relay = TestRelay::start(RelayConfig::default()).await;
    let dir = common::tempdir("client");
    let d = devices(relay.addr, &dir, &["laptop", "phone", "tablet"]).await;
    let tablet_session = d[2].connect();
    tablet_session.caught_up(STEP).await.unwrap();
    d[0].remove(d[2].id()).await.unwrap();

    // Its live session ends with a fatal, non-transient error.
    let error = tokio::time::timeout(STEP, tablet_session.recv())
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(error, ClientError::Revoked), "{error:?}");
    assert!(!error.is_transient());
    assert_eq!(error.fault(), khub::client::Fault::Peer);
    assert!(matches!(
        d[2].sync().await,
        Err(ClientError::Unauthorized | ClientError::Revoked)
    ));

    // What the others say next is sealed under the new epoch.
    let sa = d[0].connect();
    sa.send(b"after the tablet left", STEP).await.unwrap();
    let sb = d[1].connect();
    assert_eq!(recv(&sb, &d[1]).await.1, "after the tablet left");
    assert_eq!(d[1].members().unwrap().len(), 2);

    // The tablet's own MLS state opens nothing of it, even handed the relay's
    // whole log in order.
    let state = rusqlite::Connection::open(d[2].home().join("device.sqlite3")).unwrap();
    let (meta, cursor): (Vec<u8>, i64) = state
        .query_row("SELECT meta, cursor FROM identity", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    let rows: Vec<(Vec<u8>, Vec<u8>)> = state
        .prepare("SELECT key, value FROM mls")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut tablet_keys = khub::channel::Channel::load(&meta, rows).unwrap();
    let log = relay
        .relay
        .hub
        .store
        .read(d[0].channel(), 0, 1000)
        .await
        .unwrap();
    for stored in log.iter().filter(|e| e.seq > cursor as u64) {
        let taken = tablet_keys.take_in(&stored.envelope, 0);
        if let Some(khub::channel::Event::App { plaintext, .. }) = taken.event {
            assert!(
                !String::from_utf8_lossy(&plaintext).contains("after the tablet left"),
                "the removed device opened a message sent after its removal"
            );
        }
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_classified_and_state_files_are_private() {
    let dir = common::tempdir("client");
    // Nothing listens on this port: transient.
    let error = Device::create(&dir.join("x"), "http://127.0.0.1:9", "x")
        .await
        .unwrap_err();
    assert!(error.is_transient(), "{error:?}");
    assert!(matches!(
        Device::open(&dir.join("nothing")),
        Err(ClientError::NotInitialized(_))
    ));
    // A device of protocol 1 (its state file has no format) is told plainly.
    let old = dir.join("protocol-1");
    std::fs::create_dir_all(&old).unwrap();
    rusqlite::Connection::open(old.join("device.sqlite3"))
        .unwrap()
        .execute_batch(
            "CREATE TABLE identity (id INTEGER PRIMARY KEY, relay TEXT, name TEXT, token BLOB,
             keyring BLOB, cursor INTEGER, read INTEGER);",
        )
        .unwrap();
    let refused = Device::open(&old).unwrap_err().to_string();
    assert!(
        refused.contains("speaks protocol 1") && refused.contains("pair the device again"),
        "{refused}"
    );
    // A URL that is not a relay is refused with an example of one.
    let bad = khub::client::RelayAddr::parse("ftp://relay.example").unwrap_err();
    assert!(bad.to_string().contains("https://relay.example"), "{bad}");
    assert!(!bad.is_transient());

    let relay = TestRelay::start(RelayConfig::default()).await;
    let d = devices(relay.addr, &dir, &["laptop", "phone"]).await;
    assert!(matches!(
        Device::create(d[0].home(), &url(relay.addr), "again").await,
        Err(ClientError::AlreadyInitialized(_))
    ));
    // A wrong code: fatal, with the words the person needs.
    let invitation = d[0].invite().await.unwrap();
    let nameplate = Code::parse(&invitation.code()).unwrap().nameplate();
    let completing = tokio::spawn(invitation.complete(Duration::from_secs(20)));
    let wrong = Code::parse(&format!("{nameplate}-AAAA-AAAA")).unwrap();
    let joiner = join(
        &dir.join("intruder"),
        &url(relay.addr),
        "intruder",
        &wrong,
        Duration::from_secs(20),
    )
    .await
    .unwrap_err();
    let inviter = completing.await.unwrap().unwrap_err();
    for error in [&joiner, &inviter] {
        assert!(!error.is_transient());
        assert!(
            error
                .to_string()
                .contains("the code was wrong, or someone interfered"),
            "{error}"
        );
    }
    assert!(
        !dir.join("intruder").join("device.sqlite3").exists(),
        "nothing stored for a failed join"
    );

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let home = d[0].home();
        assert_eq!(
            std::fs::metadata(home).unwrap().permissions().mode() & 0o777,
            0o700
        );
        for entry in std::fs::read_dir(home).unwrap() {
            let path = entry.unwrap().path();
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600,
                "{}",
                path.display()
            );
        }
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_refused_for_the_quota_go_out_in_order_once_it_frees() {
    let store = Arc::new(khub::relay::store::memory::MemoryStore::new());
    let mut config = RelayConfig::default();
    // Room for the pairing's messages (the Add commit, the joiner's word) and
    // ten small notes, and two more small ones — but not a big one. MLS sizes
    // are measured on a channel of the same shape.
    let (commit_len, small_len) = {
        let (a, b) = (common::Device::new("laptop"), common::Device::new("phone"));
        let mut channel = common::new_channel(&a);
        let (commit, _) = common::add(&mut channel, &b.info());
        let small = channel.seal(b"\x00quota 00 x").unwrap().envelope;
        (commit.len() as u64, small.len() as u64)
    };
    config.limits.channel_quota_bytes = commit_len + 13 * small_len;
    let relay = TestRelay::start_with(store.clone(), config).await;
    let dir = common::tempdir("client-quota");
    let d = devices(relay.addr, &dir, &["laptop", "phone"]).await;
    let (sa, sb) = (d[0].connect(), d[1].connect());
    // Ten small notes, a big one (2 KiB sealed) that does not fit after them,
    // then small ones that would: they must wait for the big one.
    const NOTES: usize = 16;
    let note = |n: usize| {
        format!(
            "quota {n:02} {}",
            "x".repeat(if n == 10 { 2000 } else { 1 })
        )
    };
    for n in 0..NOTES {
        sa.send(note(n).as_bytes(), Duration::ZERO).await.unwrap();
    }
    // The quota fills up: some are stored and delivered, the rest wait in the outbox.
    let mut got = Vec::new();
    tokio::time::timeout(STEP, async {
        loop {
            let pending = d[0].pending().unwrap();
            if pending > 0 && got.len() + pending == NOTES {
                tokio::time::sleep(Duration::from_millis(300)).await;
                if d[0].pending().unwrap() == pending {
                    return;
                }
            }
            got.push(recv(&sb, &d[1]).await.1);
        }
    })
    .await
    .expect("the quota fills");
    assert_eq!(
        got.len(),
        10,
        "the quota refused the big note and held back those after it"
    );
    // The session says why, while it waits.
    assert!(
        matches!(
            sa.status(),
            Status::Live {
                held_back: Some(ClientError::Relay {
                    code: khub::protocol::ErrorCode::OverQuota,
                    ..
                }),
                ..
            }
        ),
        "{:?}",
        sa.status()
    );
    // Retention frees the channel's bytes; the session sends the rest again on its own.
    khub::relay::store::Store::prune(&*store, u64::MAX)
        .await
        .unwrap();
    // The session's next retry comes after its backoff (which grew while the
    // quota stayed full), so allow more than one step for it.
    let rest = async {
        while got.len() < NOTES {
            let message = sb.recv().await.unwrap();
            d[1].mark_read(message.seq).unwrap();
            got.push(String::from_utf8(message.body).unwrap());
        }
    };
    tokio::time::timeout(Duration::from_secs(60), rest)
        .await
        .expect("the held-back notes go out once the quota frees");
    assert_eq!(
        got,
        (0..NOTES).map(note).collect::<Vec<_>>(),
        "every note once, in order"
    );
    assert!(
        d[1].incidents().unwrap().is_empty(),
        "no gap, nothing reordered"
    );
    tokio::time::timeout(STEP, async {
        while d[0].pending().unwrap() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the outbox empties");
    assert!(
        matches!(
            sa.status(),
            Status::Live {
                held_back: None,
                ..
            }
        ),
        "acked again: {:?}",
        sa.status()
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_relay_refuses_is_an_error_and_an_incident_never_queued() {
    let mut config = RelayConfig::default();
    // Room for pairing's commit and small notes, not for a 20 KB one.
    config.limits.max_envelope_bytes = 8_000;
    let relay = TestRelay::start(config).await;
    let dir = common::tempdir("client-refused");
    let d = devices(relay.addr, &dir, &["laptop", "phone"]).await;
    let session = d[0].connect();
    assert!(matches!(
        session.send(b"first", STEP).await.unwrap(),
        Sent::Acked { .. }
    ));
    let refused = session
        .send(&[b'x'; 20_000], STEP)
        .await
        .expect_err("the relay refuses the envelope");
    assert!(
        matches!(
            &refused,
            ClientError::Relay {
                code: khub::protocol::ErrorCode::TooLarge,
                ..
            }
        ),
        "{refused:?}"
    );
    assert_eq!(d[0].pending().unwrap(), 0, "not left queued");
    let incidents = d[0].incidents().unwrap();
    assert_eq!(incidents.len(), 1, "{incidents:?}");
    assert_eq!(incidents[0].kind, khub::client::IncidentKind::NotPublished);
    // The next message goes through; the phone notices the number the refused
    // envelope used as a gap.
    assert!(matches!(
        session.send(b"small", STEP).await.unwrap(),
        Sent::Acked { .. }
    ));
    let phone = d[1].connect();
    for expected in [&b"first"[..], b"small"] {
        let message = tokio::time::timeout(STEP, phone.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(message.body, expected);
        d[1].mark_read(message.seq).unwrap();
    }
    let gaps = d[1].incidents().unwrap();
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert_eq!(gaps[0].kind, khub::client::IncidentKind::Gap);
    assert!(gaps[0].detail.contains("refused to store"), "{gaps:?}");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_of_the_largest_size_arrives_and_one_byte_more_is_refused_before_queuing() {
    use khub::client::control::MAX_MESSAGE_LEN;
    let relay = TestRelay::start(RelayConfig::default()).await;
    let dir = common::tempdir("client-largest");
    let d = devices(relay.addr, &dir, &["laptop", "phone"]).await;
    let session = d[0].connect();
    let too_long = session
        .send(&vec![b'y'; MAX_MESSAGE_LEN + 1], STEP)
        .await
        .expect_err("one byte over the limit");
    assert!(matches!(&too_long, ClientError::Invalid(_)), "{too_long:?}");
    assert_eq!(
        too_long.to_string(),
        format!(
            "this message has {} bytes, and a message may have at most {MAX_MESSAGE_LEN} (1 MiB less one byte, which says it is a message): split it",
            MAX_MESSAGE_LEN + 1
        )
    );
    assert_eq!(d[0].pending().unwrap(), 0, "nothing queued");
    let largest: Vec<u8> = (0..MAX_MESSAGE_LEN).map(|i| (i % 251) as u8).collect();
    assert!(matches!(
        session.send(&largest, STEP).await.unwrap(),
        Sent::Acked { .. }
    ));
    let phone = d[1].connect();
    let message = tokio::time::timeout(STEP, phone.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(message.body == largest, "the 1 MiB message arrives intact");
    assert!(d[1].incidents().unwrap().is_empty());
    relay.stop().await;
}

/// A reverse proxy that serves the relay under `/khub`: it strips the prefix
/// from each connection's request line and passes the bytes on. A request
/// outside the prefix gets 404, as a real proxy would answer it.
async fn prefix_proxy(relay: SocketAddr) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n") {
                    if client.read_exact(&mut byte).await.is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let line = String::from_utf8_lossy(&head).into_owned();
                let mut parts = line.splitn(3, ' ');
                let (method, path, rest) = (parts.next(), parts.next(), parts.next());
                let Some(path) = path.and_then(|p| p.strip_prefix("/khub")) else {
                    let _ = client
                        .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                };
                let mut upstream = tokio::net::TcpStream::connect(relay).await.unwrap();
                let line = format!("{} {path} {}", method.unwrap_or("GET"), rest.unwrap_or(""));
                upstream.write_all(line.as_bytes()).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_under_a_reverse_proxy_path_is_used_with_its_path() {
    let relay = TestRelay::start(RelayConfig::default()).await;
    let proxy = prefix_proxy(relay.addr).await;
    let base = format!("http://{proxy}/khub/");
    let dir = common::tempdir("client-prefix");
    let laptop = Device::create(&dir.join("laptop"), &base, "laptop")
        .await
        .unwrap();
    assert_eq!(laptop.relay_url(), format!("http://{proxy}/khub"));
    let phone = common::sdk_join(&laptop, &dir.join("phone"), &base, "phone").await;
    // Live sessions go through the path too.
    let (sa, sb) = (laptop.connect(), phone.connect());
    assert!(matches!(
        sa.send(b"through the proxy", STEP).await.unwrap(),
        Sent::Acked { .. }
    ));
    assert_eq!(recv(&sb, &phone).await.1, "through the proxy");
    // Without the path, the proxy's 404 says so.
    let bare = Device::create(&dir.join("bare"), &format!("http://{proxy}"), "bare")
        .await
        .unwrap_err();
    assert!(
        matches!(&bare, ClientError::Invalid(m) if m.contains("(HTTP 404)")),
        "{bare:?}"
    );
    assert_eq!(bare.fault(), khub::client::Fault::Caller);
    relay.stop().await;
}

/// Ctrl-C on the inviter while the joiner is being admitted: whichever of the
/// cancel and the welcome wins, the outcome is whole — either the device is
/// a member everywhere and joined, or nowhere (not in the channel, not
/// admitted at the relay) and its join failed. Never a member nobody holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_racing_the_admission_leaves_no_half_paired_device() {
    let relay = TestRelay::start(RelayConfig::default()).await;
    let dir = common::tempdir("client");
    let laptop = Device::create(&dir.join("laptop"), &url(relay.addr), "laptop")
        .await
        .unwrap();
    let mut cancelled_runs = 0;
    for round in 0..4 {
        let invitation = laptop.invite().await.unwrap();
        let code = Code::parse(&invitation.code()).unwrap();
        let cancel = invitation.canceller();
        let completing = tokio::spawn(invitation.complete(STEP));
        let home = dir.join(format!("phone-{round}"));
        let joining = tokio::spawn({
            let (home, url) = (home.clone(), url(relay.addr));
            async move { join(&home, &url, "phone", &code, STEP).await }
        });
        // Cancel as soon as the relay lists a new device (admitted, the Add
        // not yet welcomed), or after a growing delay on later rounds.
        let before = laptop.relay_devices().await.unwrap().len();
        let started = std::time::Instant::now();
        while laptop.relay_devices().await.unwrap().len() == before && started.elapsed() < STEP {
            tokio::time::sleep(Duration::from_millis(2 * round)).await;
        }
        cancel.cancel().await;
        let completed = tokio::time::timeout(STEP * 3, completing)
            .await
            .expect("complete ends after a cancel")
            .unwrap();
        let joined = tokio::time::timeout(STEP * 3, joining)
            .await
            .expect("join ends")
            .unwrap();
        laptop.sync().await.unwrap();
        let members = laptop.members().unwrap();
        let admitted = laptop.relay_devices().await.unwrap();
        match completed {
            Err(ClientError::Cancelled) => {
                cancelled_runs += 1;
                assert!(joined.is_err(), "round {round}: the joiner must fail");
                assert_eq!(members.len(), 1, "round {round}: {members:?}");
                assert_eq!(admitted.len(), 1, "round {round}: {admitted:?}");
            }
            Ok(member) => {
                let (phone, _) = joined.expect("a welcomed joiner joins");
                assert_eq!(member.id, phone.id());
                assert!(members.iter().any(|m| m.id == phone.id()));
                assert!(admitted.contains(&phone.id()));
                laptop.remove(phone.id()).await.unwrap();
            }
            Err(e) => panic!("round {round}: {e:?}"),
        }
    }
    println!("cancelled before the welcome in {cancelled_runs} of 4 rounds");
    let _ = std::fs::remove_dir_all(&dir);
    relay.stop().await;
}

/// A store whose appends fail with a backend error while `down` (a database
/// failing over, a full disk), then recovers.
struct Flaky {
    inner: khub::relay::store::memory::MemoryStore,
    down: std::sync::atomic::AtomicBool,
    /// Appends still to fail, besides while `down`.
    fail_next: std::sync::atomic::AtomicUsize,
    failed: std::sync::atomic::AtomicUsize,
}

impl Flaky {
    fn new() -> Self {
        Self {
            inner: khub::relay::store::memory::MemoryStore::new(),
            down: std::sync::atomic::AtomicBool::new(false),
            fail_next: std::sync::atomic::AtomicUsize::new(0),
            failed: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

impl khub::relay::store::Store for Flaky {
    fn create_channel(
        &self,
        channel: khub::ids::ChannelId,
        device: khub::ids::DeviceId,
        token_hash: khub::crypto::token::TokenHash,
        now: u64,
    ) -> khub::relay::store::BoxFuture<'_, Result<(), khub::relay::store::StoreError>> {
        self.inner.create_channel(channel, device, token_hash, now)
    }
    fn device(
        &self,
        channel: khub::ids::ChannelId,
        device: khub::ids::DeviceId,
    ) -> khub::relay::store::BoxFuture<
        '_,
        Result<Option<khub::relay::store::DeviceRecord>, khub::relay::store::StoreError>,
    > {
        self.inner.device(channel, device)
    }
    fn devices(
        &self,
        channel: khub::ids::ChannelId,
    ) -> khub::relay::store::BoxFuture<
        '_,
        Result<Vec<khub::relay::store::DeviceRecord>, khub::relay::store::StoreError>,
    > {
        self.inner.devices(channel)
    }
    fn admit(
        &self,
        channel: khub::ids::ChannelId,
        device: khub::ids::DeviceId,
        token_hash: khub::crypto::token::TokenHash,
        max_devices: usize,
        now: u64,
    ) -> khub::relay::store::BoxFuture<'_, Result<(), khub::relay::store::StoreError>> {
        self.inner
            .admit(channel, device, token_hash, max_devices, now)
    }
    fn revoke(
        &self,
        channel: khub::ids::ChannelId,
        device: khub::ids::DeviceId,
    ) -> khub::relay::store::BoxFuture<'_, Result<(), khub::relay::store::StoreError>> {
        self.inner.revoke(channel, device)
    }
    fn append(
        &self,
        append: khub::relay::store::Append,
    ) -> khub::relay::store::BoxFuture<
        '_,
        Result<khub::relay::store::Appended, khub::relay::store::StoreError>,
    > {
        use std::sync::atomic::Ordering;
        let one_of_the_next = self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if self.down.load(Ordering::SeqCst) || one_of_the_next {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Box::pin(async {
                Err(khub::relay::store::StoreError::Backend(
                    "the database is failing over".into(),
                ))
            });
        }
        self.inner.append(append)
    }
    fn read_page(
        &self,
        channel: khub::ids::ChannelId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> khub::relay::store::BoxFuture<
        '_,
        Result<Vec<khub::relay::store::StoredEnvelope>, khub::relay::store::StoreError>,
    > {
        self.inner.read_page(channel, after, limit, max_bytes)
    }
    fn head(
        &self,
        channel: khub::ids::ChannelId,
    ) -> khub::relay::store::BoxFuture<'_, Result<u64, khub::relay::store::StoreError>> {
        self.inner.head(channel)
    }
    fn prune(
        &self,
        before: u64,
    ) -> khub::relay::store::BoxFuture<'_, Result<u64, khub::relay::store::StoreError>> {
        self.inner.prune(before)
    }
    fn health(
        &self,
    ) -> khub::relay::store::BoxFuture<'_, Result<(), khub::relay::store::StoreError>> {
        self.inner.health()
    }
    fn stored_bytes(
        &self,
    ) -> khub::relay::store::BoxFuture<'_, Result<u64, khub::relay::store::StoreError>> {
        self.inner.stored_bytes()
    }
}

/// The relay's store fails every append for a while (`internal`): the device
/// keeps those messages and sends them again, so every one arrives once, in
/// order, and no message is reported as refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passing_store_failure_loses_no_message() {
    let store = Arc::new(Flaky::new());
    let relay = TestRelay::start_with(Arc::clone(&store) as _, RelayConfig::default()).await;
    let dir = common::tempdir("client");
    let d = devices(relay.addr, &dir, &["laptop", "phone"]).await;
    let (sa, sb) = (d[0].connect(), d[1].connect());
    sa.caught_up(STEP).await.unwrap();
    store.down.store(true, std::sync::atomic::Ordering::SeqCst);
    for i in 0..10 {
        sa.send(format!("message {i}").as_bytes(), Duration::ZERO)
            .await
            .unwrap();
    }
    tokio::time::timeout(STEP, async {
        while store.failed.load(std::sync::atomic::Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("appends failed");
    store.down.store(false, std::sync::atomic::Ordering::SeqCst);
    for i in 0..10 {
        assert_eq!(recv(&sb, &d[1]).await.1, format!("message {i}"));
    }
    let deadline = tokio::time::Instant::now() + STEP;
    while d[0].pending().unwrap() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "everything acked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(d[0].incidents().unwrap(), [], "nothing was refused");

    // The same over `/sync`: what the failing store did not take stays
    // queued, nothing after it is stored ahead of it, and the next sync sends
    // it all in order.
    sa.close().await;
    store.down.store(true, std::sync::atomic::Ordering::SeqCst);
    for i in 0..3 {
        d[0].queue(format!("synced {i}").as_bytes()).unwrap();
    }
    tokio::time::timeout(STEP, d[0].sync())
        .await
        .expect("sync answers in time")
        .expect("a passing failure is not an error of the sync");
    assert_eq!(d[0].pending().unwrap(), 3, "kept");
    store.down.store(false, std::sync::atomic::Ordering::SeqCst);
    tokio::time::timeout(STEP, d[0].sync())
        .await
        .expect("sync answers in time")
        .unwrap();
    assert_eq!(d[0].pending().unwrap(), 0, "sent");
    for i in 0..3 {
        assert_eq!(recv(&sb, &d[1]).await.1, format!("synced {i}"));
    }
    assert_eq!(d[0].incidents().unwrap(), [], "nothing was refused");
    relay.stop().await;
}

/// An outbox synced over several `/sync` requests, the store failing the
/// first request's append: no later request is stored ahead of it (the sync
/// stops publishing), so the next sync sends all of them in order, and none is
/// lost as out of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_failure_in_a_paged_sync_stores_nothing_ahead_of_it() {
    const MESSAGES: usize = 4;
    let store = Arc::new(Flaky::new());
    let relay = TestRelay::start_with(Arc::clone(&store) as _, RelayConfig::default()).await;
    let dir = common::tempdir("client");
    let d = devices(relay.addr, &dir, &["laptop", "phone"]).await;
    let (laptop, phone) = (&d[0], &d[1]);
    for i in 0..MESSAGES {
        phone.queue(&large_message("phone", i)).unwrap();
    }
    store
        .fail_next
        .store(1, std::sync::atomic::Ordering::SeqCst);
    tokio::time::timeout(STEP, phone.sync())
        .await
        .expect("sync answers in time")
        .expect("a passing failure is not an error of the sync");
    assert_eq!(phone.pending().unwrap(), MESSAGES, "all kept");
    tokio::time::timeout(STEP, phone.sync())
        .await
        .expect("sync answers in time")
        .unwrap();
    assert_eq!(phone.pending().unwrap(), 0, "all sent");
    assert_eq!(phone.incidents().unwrap(), [], "nothing was refused");
    tokio::time::timeout(STEP, laptop.sync())
        .await
        .expect("sync answers in time")
        .unwrap();
    for i in 0..MESSAGES {
        let message = laptop.next_unread().unwrap().expect("every message came");
        laptop.mark_read(message.seq).unwrap();
        assert_eq!(message.body, large_message("phone", i), "in order, once");
    }
    relay.stop().await;
}

/// A laptop's home with two handles on it: a listener whose live session goes
/// through a proxy that then turns away new connections, and another handle
/// (another process) whose session therefore cannot connect.
struct SharedHome {
    relay: TestRelay,
    _proxy: khub::testing::FaultProxy,
    laptop: Device,
    phone: Device,
    _listener: Session,
    other: Option<Session>,
}

async fn shared_home(config: RelayConfig, name: &str) -> SharedHome {
    let relay = TestRelay::start(config).await;
    let proxy = khub::testing::FaultProxy::start(relay.addr).await.unwrap();
    let dir = common::tempdir(name);
    let laptop = Device::create(&dir.join("laptop"), &url(proxy.addr()), "laptop")
        .await
        .unwrap();
    let phone = common::sdk_join(&laptop, &dir.join("phone"), &url(relay.addr), "phone").await;
    let listener = laptop.connect();
    wait_until(|| matches!(listener.status(), Status::Live { .. })).await;
    proxy.refuse(true);
    let other = Device::open(&dir.join("laptop")).unwrap().connect();
    SharedHome {
        relay,
        _proxy: proxy,
        laptop,
        phone,
        _listener: listener,
        other: Some(other),
    }
}

impl SharedHome {
    /// Sends `body` through the other handle, then has the phone wake the
    /// listener, which publishes the home's outbox when it next takes
    /// something in and so takes the relay's answer: what the other handle's
    /// `send` then reports. Returns it and the phone's session.
    async fn send_through_the_other_handle(
        &mut self,
        body: &'static [u8],
    ) -> (Result<Sent, ClientError>, Session) {
        let other = self.other.take().expect("one send per home");
        let send = tokio::spawn(async move { other.send(body, Duration::from_secs(30)).await });
        wait_until(|| self.laptop.pending().unwrap() == 1).await;
        let phone_session = self.phone.connect();
        assert!(matches!(
            phone_session
                .send(b"wake the listener", STEP)
                .await
                .unwrap(),
            Sent::Acked { .. }
        ));
        let answer = tokio::time::timeout(STEP, send)
            .await
            .expect("the other handle's send answers once the listener took the relay's answer")
            .unwrap();
        assert_eq!(self.laptop.pending().unwrap(), 0, "not left queued");
        (answer, phone_session)
    }
}

/// `khub send` while `khub listen` runs on the same home: the listener's
/// session may publish the queued message and take in its ack before the
/// sending process's own session connects. The sender must still learn that
/// its message went out, not report it queued offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_acked_through_another_handle_on_the_same_home_is_reported_sent() {
    let mut home = shared_home(RelayConfig::default(), "shared-home").await;
    let (sent, phone_session) = home
        .send_through_the_other_handle(b"from another process")
        .await;
    assert!(matches!(sent, Ok(Sent::Acked { .. })), "{sent:?}");
    assert_eq!(
        recv(&phone_session, &home.phone).await,
        ("laptop".into(), "from another process".into())
    );
    home.relay.stop().await;
}

/// The same race when the relay refuses the message: the sender must get the
/// refusal that the listener took in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_refused_through_another_handle_on_the_same_home_is_reported_refused() {
    let mut config = RelayConfig::default();
    // Room for pairing's commit and small notes, not for a 20 KB one.
    config.limits.max_envelope_bytes = 8_000;
    let mut home = shared_home(config, "shared-home-refused").await;
    let (refused, _) = home.send_through_the_other_handle(&[b'x'; 20_000]).await;
    assert!(
        matches!(
            &refused,
            Err(ClientError::Relay {
                code: khub::protocol::ErrorCode::TooLarge,
                ..
            })
        ),
        "{refused:?}"
    );
    home.relay.stop().await;
}

/// Takes in `count` of `from`'s large messages through `session`, each within
/// 60 s, and checks that they come in order, once.
async fn receive_large_messages(session: &Session, device: &Device, from: &str, count: usize) {
    for i in 0..count {
        let message = tokio::time::timeout(Duration::from_secs(60), session.recv())
            .await
            .expect("the messages arrive in time")
            .unwrap();
        device.mark_read(message.seq).unwrap();
        assert_eq!(message.from_name, from);
        assert_eq!(message.body, large_message(from, i), "in order, once");
    }
}

/// A message of 512 KB that says who sent it and its number.
fn large_message(from: &str, i: usize) -> Vec<u8> {
    let mut body = format!("{from} {i} ").into_bytes();
    body.resize(512 * 1024, b'.');
    body
}

/// Over `POST /sync`, an outbox larger than the relay takes in one request
/// (16 frames, about 23 MB) goes out in pieces, and comes in once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_outbox_goes_out_over_sync_in_pieces() {
    const MESSAGES: usize = 48;
    let relay = TestRelay::start(RelayConfig::default()).await;
    let dir = common::tempdir("client");
    let d = devices(relay.addr, &dir, &["laptop", "phone"]).await;
    let (laptop, phone) = (&d[0], &d[1]);
    outbox_in_one_sync_each(laptop, phone, MESSAGES, |i| large_message("phone", i)).await;
    relay.stop().await;
}

/// The phone queues `count` messages (`body(i)`) and its next sync publishes
/// them all; the laptop's next sync takes each in, once, in order.
async fn outbox_in_one_sync_each(
    laptop: &Device,
    phone: &Device,
    count: usize,
    body: impl Fn(usize) -> Vec<u8>,
) {
    for i in 0..count {
        phone.queue(&body(i)).unwrap();
    }
    tokio::time::timeout(Duration::from_secs(60), phone.sync())
        .await
        .expect("the sync ends in time")
        .expect("the relay takes the whole outbox");
    assert_eq!(phone.pending().unwrap(), 0, "all of it in one sync");
    tokio::time::timeout(Duration::from_secs(60), laptop.sync())
        .await
        .expect("the sync ends in time")
        .unwrap();
    for i in 0..count {
        let message = laptop.next_unread().unwrap().expect("every message came");
        laptop.mark_read(message.seq).unwrap();
        assert_eq!(
            (message.from_name.as_str(), message.body),
            ("phone", body(i)),
            "in order, once"
        );
    }
    assert!(laptop.next_unread().unwrap().is_none(), "nothing twice");
}

/// A relay whose frame limit is below the default takes less in one
/// `POST /sync` (16 frames: here 768 KiB) than the SDK's page of the outbox
/// (about 1 MiB as base64). The device halves its page until the relay takes
/// it, instead of being refused on every sync, and the outbox still comes in
/// once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_goes_out_over_sync_to_a_relay_that_takes_smaller_requests() {
    const MESSAGES: usize = 40;
    let mut config = RelayConfig::default();
    config.limits.max_frame_bytes = 48 * 1024;
    let relay = TestRelay::start(config).await;
    let dir = common::tempdir("client");
    let d = devices(relay.addr, &dir, &["laptop", "phone"]).await;
    let (laptop, phone) = (&d[0], &d[1]);
    let body = |i: usize| {
        let mut body = format!("phone {i} ").into_bytes();
        body.resize(16 * 1024, b'.');
        body
    };
    outbox_in_one_sync_each(laptop, phone, MESSAGES, body).await;
    relay.stop().await;
}

/// A device back after a long time offline: its outbox and the backlog waiting
/// for it are each larger than both ends' socket buffers. It reads while it
/// publishes, so neither end blocks on a full socket: the relay never takes it
/// for a slow reader, and both directions go through on the first connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_outbox_goes_out_while_a_large_backlog_comes_in() {
    const MESSAGES: usize = 48;
    let mut config = RelayConfig::default();
    config.limits.slow_reader_timeout = Duration::from_secs(3);
    let relay = TestRelay::start(config).await;
    let dir = common::tempdir("client");
    let d = devices(relay.addr, &dir, &["laptop", "phone"]).await;
    let (laptop, phone) = (&d[0], &d[1]);

    // The phone's messages wait on the relay for the laptop.
    for i in 0..MESSAGES {
        phone.queue(&large_message("phone", i)).unwrap();
    }
    let sb = phone.connect();
    assert!(
        eventually(Duration::from_secs(60), || phone.pending().unwrap() == 0).await,
        "the phone's backlog is stored"
    );
    sb.close().await;

    // The laptop wrote as much while it was away.
    for i in 0..MESSAGES {
        laptop.queue(&large_message("laptop", i)).unwrap();
    }
    let sa = laptop.connect();
    receive_large_messages(&sa, laptop, "phone", MESSAGES).await;
    assert!(
        eventually(Duration::from_secs(60), || laptop.pending().unwrap() == 0).await,
        "the laptop's outbox went out"
    );
    assert_eq!(
        relay.relay.metrics().breaches("slow_reader"),
        0,
        "no session was closed as a slow reader"
    );
    sa.close().await;
    let sb = phone.connect();
    receive_large_messages(&sb, phone, "laptop", MESSAGES).await;
    sb.close().await;
    relay.stop().await;
}

/// The laptop pairs `count` more devices: a commit each, which moves the
/// channel's epoch on `count` times. Returns the laptop's epoch after.
async fn add_devices(laptop: &Device, dir: &Path, addr: SocketAddr, count: usize) -> u64 {
    let before = laptop.epoch().unwrap();
    for i in 0..count {
        let name = format!("extra-{i}");
        common::sdk_join(laptop, &dir.join(&name), &url(addr), &name).await;
    }
    tokio::time::timeout(STEP, laptop.sync())
        .await
        .expect("sync in time")
        .unwrap();
    let after = laptop.epoch().unwrap();
    assert!(
        after - before > khub::channel::PAST_EPOCHS as u64,
        "more commits than members keep past epochs for ({before} to {after})"
    );
    after
}

/// The laptop's unread messages, each marked read, with its incidents.
async fn laptop_reads(laptop: &Device) -> (Vec<String>, Vec<String>) {
    tokio::time::timeout(STEP, laptop.sync())
        .await
        .expect("sync in time")
        .unwrap();
    let mut bodies = Vec::new();
    while let Some(message) = laptop.next_unread().unwrap() {
        laptop.mark_read(message.seq).unwrap();
        bodies.push(String::from_utf8(message.body).unwrap());
    }
    let incidents = laptop
        .incidents()
        .unwrap()
        .iter()
        .map(|i| format!("{i:?}"))
        .collect();
    (bodies, incidents)
}

/// A laptop on the relay and a phone whose link to it goes through a fault
/// proxy, with the phone's session live.
struct Proxied {
    relay: TestRelay,
    proxy: khub::testing::FaultProxy,
    dir: PathBuf,
    laptop: Device,
    phone: Device,
    session: Session,
}

/// The phone's session stops and its link drops with whatever the proxy
/// held; once the cut has taken it, traffic flows again for new connections.
async fn drop_the_link(session: Session, proxy: &khub::testing::FaultProxy) {
    session.close().await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.stall(false);
    proxy.stall_upstream(false);
}

/// Queues messages "m{n}" for each `n` in `numbers` through `session`.
async fn queue_numbered(session: &Session, numbers: std::ops::Range<usize>) {
    for n in numbers {
        let body = format!("m{n}");
        session.send(body.as_bytes(), Duration::ZERO).await.unwrap();
    }
}

async fn laptop_and_proxied_phone() -> Proxied {
    let relay = TestRelay::start(RelayConfig::default()).await;
    let proxy = khub::testing::FaultProxy::start(relay.addr).await.unwrap();
    let dir = common::tempdir("client");
    let laptop = Device::create(&dir.join("laptop"), &url(relay.addr), "laptop")
        .await
        .unwrap();
    let phone = common::sdk_join(&laptop, &dir.join("phone"), &proxy.url(), "phone").await;
    let session = phone.connect();
    wait_until(|| matches!(session.status(), Status::Live { .. })).await;
    Proxied {
        relay,
        proxy,
        dir,
        laptop,
        phone,
        session,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_written_offline_while_the_channel_moved_on_is_read_by_the_others() {
    let relay = TestRelay::start(RelayConfig::default()).await;
    let dir = common::tempdir("client");
    let d = devices(relay.addr, &dir, &["laptop", "phone"]).await;
    let (laptop, phone) = (&d[0], &d[1]);
    // Written on a plane: sealed in the epoch the phone knows.
    phone.queue(b"written offline").unwrap();
    // Meanwhile the channel moves on by more epochs than members keep.
    add_devices(laptop, &dir, relay.addr, 4).await;
    // Back online, the phone syncs; the laptop reads what it wrote.
    tokio::time::timeout(STEP, phone.sync())
        .await
        .expect("sync in time")
        .unwrap();
    assert_eq!(phone.pending().unwrap(), 0, "the relay acked it");
    let (bodies, incidents) = laptop_reads(laptop).await;
    assert_eq!(bodies, ["written offline"]);
    assert_eq!(incidents, Vec::<String>::new());
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_lost_with_its_connection_while_the_channel_moved_on_is_read_by_the_others() {
    let Proxied {
        relay,
        proxy,
        dir,
        laptop,
        phone,
        session,
    } = laptop_and_proxied_phone().await;
    let laptop = &laptop;
    // The phone's session writes a message into a connection that never
    // passes it on, and the connection drops: the phone cannot know whether
    // the relay stored it.
    proxy.stall(true);
    let sent = session
        .send(b"sent into a dead link", Duration::from_millis(300))
        .await;
    assert_eq!(sent.unwrap(), Sent::Queued);
    drop_the_link(session, &proxy).await;
    // Meanwhile the channel moves on by more epochs than members keep.
    add_devices(laptop, &dir, relay.addr, 4).await;
    // The phone reconnects and sends it again; the laptop reads it, once.
    let session = phone.connect();
    eventually(STEP, || phone.pending().unwrap() == 0).await;
    assert_eq!(phone.pending().unwrap(), 0, "the relay acked it");
    session.close().await;
    let (bodies, incidents) = laptop_reads(laptop).await;
    assert_eq!(bodies, ["sent into a dead link"]);
    assert_eq!(incidents, Vec::<String>::new());
    relay.stop().await;
}

/// A device whose missed envelopes retention deleted publishes as soon as it
/// reconnects: the relay says there is nothing left to deliver up to its head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_whose_missed_envelopes_were_pruned_still_sends() {
    let store = Arc::new(khub::relay::store::memory::MemoryStore::new());
    let config = || {
        let mut config = RelayConfig::default();
        config.limits.retention = Duration::from_secs(2);
        config
    };
    let relay = TestRelay::start_with(store.clone(), config()).await;
    let dir = common::tempdir("client");
    let d = devices(relay.addr, &dir, &["laptop", "phone"]).await;
    let (laptop, phone) = (&d[0], &d[1]);
    laptop.queue(b"while the phone was away").unwrap();
    tokio::time::timeout(STEP, laptop.sync())
        .await
        .expect("sync in time")
        .unwrap();
    // The relay's retention deletes everything the phone has not taken in:
    // its session starts behind a head with nothing left to deliver.
    let deadline = tokio::time::Instant::now() + STEP;
    while !khub::relay::store::Store::read(&*store, phone.channel(), phone.cursor(), 1)
        .await
        .unwrap()
        .is_empty()
    {
        assert!(tokio::time::Instant::now() < deadline, "pruned in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A relay restarted on the store (its cache held them still).
    let addr = relay.addr;
    relay.stop().await;
    let relay = TestRelay::start_on(addr, store.clone(), config())
        .await
        .unwrap();
    // The relay says in `ready` that nothing is left to deliver up to its
    // head, so the phone publishes at once, well within the 10 s a relay
    // that does not say so leaves it waiting for deliveries.
    let session = phone.connect();
    let sent = session
        .send(b"back online", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(matches!(sent, Sent::Acked { .. }), "{sent:?}");
    session.close().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_stored_behind_commits_made_while_it_was_on_its_way_is_sent_again() {
    let Proxied {
        relay,
        proxy,
        dir,
        laptop,
        phone: _,
        session,
    } = laptop_and_proxied_phone().await;
    let laptop = &laptop;
    // The phone's message is on its way (held in a slow link) while the
    // laptop commits 4 times; then it reaches the relay, behind the commits.
    proxy.stall(true);
    let sent = session
        .send(b"on its way", Duration::from_millis(300))
        .await;
    assert_eq!(sent.unwrap(), Sent::Queued);
    add_devices(laptop, &dir, relay.addr, 4).await;
    proxy.stall(false);
    // Its own envelope comes back to the phone, too far behind for members to
    // read: the phone sends it again, and the laptop reads it once.
    let deadline = tokio::time::Instant::now() + STEP;
    let mut read = Vec::new();
    while read.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the laptop reads the message in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        read = laptop_reads(laptop).await.0;
    }
    assert_eq!(read, ["on its way"]);
    session.close().await;
    let (more, incidents) = laptop_reads(laptop).await;
    assert_eq!(more, Vec::<String>::new(), "once");
    // The first sealing shows up as what it is: unreadable, and missing.
    assert_eq!(incidents.len(), 2, "{incidents:?}");
    assert!(incidents[0].contains("UnknownEpoch"), "{incidents:?}");
    assert!(incidents[1].contains("Gap"), "{incidents:?}");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_written_on_both_sides_of_an_epoch_change_and_sent_again_are_read_in_order() {
    let Proxied {
        relay,
        proxy,
        dir,
        laptop,
        phone,
        session,
    } = laptop_and_proxied_phone().await;
    let laptop = &laptop;
    // The phone's link holds what it sends, and passes what it receives.
    proxy.stall_upstream(true);
    queue_numbered(&session, 0..10).await;
    // The phone takes in 4 commits while those are on their way, then writes
    // 10 more in the new epoch.
    let epoch = add_devices(laptop, &dir, relay.addr, 4).await;
    assert!(
        eventually(STEP, || phone.epoch().unwrap() == epoch).await,
        "the phone takes the commits in"
    );
    queue_numbered(&session, 10..20).await;
    // The link drops with all twenty: they go again on the next connection.
    drop_the_link(session, &proxy).await;
    let session = phone.connect();
    assert!(
        eventually(STEP, || phone.pending().unwrap() == 0).await,
        "all acked"
    );
    session.close().await;
    let (bodies, incidents) = laptop_reads(laptop).await;
    let expected: Vec<String> = (0..20).map(|n| format!("m{n}")).collect();
    assert_eq!(bodies, expected);
    assert_eq!(incidents, Vec::<String>::new());
    relay.stop().await;
}
