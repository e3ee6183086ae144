//! Notes that sync, end to end against an in-process relay: offline edits to
//! the same note merge identically everywhere, edits converge through cut
//! connections, a late device gets the vault from a snapshot, notes outlive
//! the relay's retention, the relay never sees a note's text, and bad notes
//! messages from a member become incidents.

use std::collections::BTreeSet;
use std::time::Duration;

use khub::client::control::Control;
use khub::client::{Device, IncidentKind};
use khub::ids::DeviceId;
use khub::notes::doc::NoteDoc;
use khub::notes::wire::NotesMessage;
use khub::notes::{Delivery, NoteEdit, NoteId};
use khub::relay::config::Limits;
use khub::testing::{
    FaultProxy, Scanner, TempDir, TestRelay, capture_logs, pair_device, paired_devices,
};
use rand::RngExt;

/// The longest any one network step may take.
const STEP: Duration = Duration::from_secs(30);
/// The longest a whole scenario may take.
const SCENARIO: Duration = Duration::from_secs(240);

async fn sync(device: &Device) -> usize {
    tokio::time::timeout(STEP, device.sync())
        .await
        .expect("sync in time")
        .expect("sync")
}

fn body(text: &str) -> NoteEdit {
    NoteEdit {
        body: Some(text.into()),
        ..NoteEdit::default()
    }
}

fn title(text: &str) -> NoteEdit {
    NoteEdit {
        title: Some(text.into()),
        ..NoteEdit::default()
    }
}

/// Every device holds the same notes, byte for byte.
fn assert_same_vault(devices: &[&Device]) {
    let ids = |d: &Device| -> BTreeSet<NoteId> {
        d.vault().list().unwrap().iter().map(|n| n.id).collect()
    };
    let first = ids(devices[0]);
    for device in &devices[1..] {
        assert_eq!(ids(device), first, "{} holds other notes", device.name());
        for id in &first {
            assert_eq!(
                device.vault().document(*id).unwrap(),
                devices[0].vault().document(*id).unwrap(),
                "note {id} differs on {}",
                device.name()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_edits_to_the_same_note_merge_into_identical_documents() {
    let relay = TestRelay::start(Limits::default()).await.unwrap();
    let home = TempDir::new("notes-offline");
    let proxies = [
        FaultProxy::start(relay.addr()).await.unwrap(),
        FaultProxy::start(relay.addr()).await.unwrap(),
    ];
    let urls: Vec<String> = proxies.iter().map(FaultProxy::url).collect();
    let paired = tokio::time::timeout(SCENARIO, paired_devices(home.path(), &urls))
        .await
        .expect("pairing in time")
        .expect("pairs");
    let (laptop, phone) = (&paired.devices[0], &paired.devices[1]);
    let (on_laptop, on_phone) = (laptop.vault(), phone.vault());

    let trip = on_laptop
        .create(NoteEdit {
            title: Some("Trip".into()),
            body: Some("Day one: museum.\n\nDay two: beach.\n\nDay three: hike.\n".into()),
            tags: Some(vec!["travel".into()]),
        })
        .unwrap()
        .id;
    let meeting = on_laptop
        .create(body("The meeting is at noon.\n"))
        .unwrap()
        .id;
    let draft = on_laptop.create(body("Old draft\n")).unwrap().id;
    let ideas = on_laptop.create(title("Ideas")).unwrap().id;
    assert_eq!(on_laptop.delivery(trip).unwrap(), Delivery::LocalOnly);
    sync(laptop).await;
    assert_eq!(on_laptop.delivery(trip).unwrap(), Delivery::Acked);
    let mut changes = on_phone.subscribe().unwrap();
    sync(phone).await;
    assert_eq!(on_phone.get(trip).unwrap().unwrap().tags, ["travel"]);
    let changed: BTreeSet<NoteId> = tokio::time::timeout(STEP, changes.next())
        .await
        .expect("told in time")
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(changed, [trip, meeting, draft, ideas].into());

    // Both devices lose the network, and edit the same notes.
    for proxy in &proxies {
        proxy.refuse(true);
        proxy.cut();
    }
    let offline = tokio::time::timeout(STEP, laptop.sync()).await.unwrap();
    assert!(
        offline.is_err_and(|e| e.is_transient()),
        "the relay is unreachable"
    );
    // Different paragraphs.
    on_laptop
        .update(
            trip,
            body("Day one: museum, then lunch.\n\nDay two: beach.\n\nDay three: hike.\n"),
        )
        .unwrap();
    on_phone
        .update(
            trip,
            body("Day one: museum.\n\nDay two: beach.\n\nDay three: hike to the lake.\n"),
        )
        .unwrap();
    // The same sentence.
    on_laptop
        .update(meeting, body("The team meeting is at noon.\n"))
        .unwrap();
    on_phone
        .update(meeting, body("The meeting is at noon on Friday.\n"))
        .unwrap();
    // One deletes while the other edits.
    on_laptop.delete(draft).unwrap();
    on_phone
        .update(draft, body("Old draft, kept by the phone\n"))
        .unwrap();
    // Both retitle.
    on_laptop.update(ideas, title("Ideas for May")).unwrap();
    on_phone.update(ideas, title("Ideas (phone)")).unwrap();
    assert_eq!(on_laptop.delivery(trip).unwrap(), Delivery::LocalOnly);
    assert!(
        on_laptop.get(draft).unwrap().unwrap().deleted,
        "offline edits apply at once"
    );

    for proxy in &proxies {
        proxy.refuse(false);
    }
    sync(laptop).await;
    sync(phone).await;
    sync(laptop).await;
    assert_eq!(on_phone.delivery(trip).unwrap(), Delivery::Acked);
    assert_same_vault(&[laptop, phone]);

    let merged = |id| on_phone.get(id).unwrap().unwrap();
    assert_eq!(
        merged(trip).body,
        "Day one: museum, then lunch.\n\nDay two: beach.\n\nDay three: hike to the lake.\n"
    );
    assert_eq!(
        merged(meeting).body,
        "The team meeting is at noon on Friday.\n"
    );
    // Delete wins, and the concurrent edit is in the deleted note.
    assert!(merged(draft).deleted);
    assert_eq!(merged(draft).body, "Old draft, kept by the phone\n");
    // One title wins on every device; the other stays visible.
    let ideas_note = merged(ideas);
    let both: BTreeSet<&str> = ["Ideas for May", "Ideas (phone)"].into();
    assert!(both.contains(ideas_note.title.as_str()));
    assert_eq!(ideas_note.other_titles.len(), 1);
    assert!(both.contains(ideas_note.other_titles[0].as_str()));
    assert_ne!(ideas_note.title, ideas_note.other_titles[0]);
    let history = on_laptop.history(ideas).unwrap().unwrap();
    assert_eq!(history.merges, 1, "the merge is visible: {history:?}");
    assert_eq!(history.editors, [laptop.id(), phone.id()]);

    // Restoring brings the deleted note back with the phone's edit.
    on_laptop.restore(draft).unwrap();
    sync(laptop).await;
    sync(phone).await;
    assert!(!merged(draft).deleted);
    assert_eq!(merged(draft).body, "Old draft, kept by the phone\n");
    assert_same_vault(&[laptop, phone]);
    for device in [laptop, phone] {
        assert_eq!(device.incidents().unwrap(), [], "no incident");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_edits_through_cut_connections_converge_and_the_relay_sees_no_text() {
    capture_logs();
    const DEVICES: usize = 3;
    const NOTES: usize = 10;
    const EDITS: usize = 1000;
    let relay = TestRelay::start(Limits::default()).await.unwrap();
    let home = TempDir::new("notes-faults");
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
    let marker = format!(
        "khub-note-marker-{}",
        DeviceId::random(&mut khub::crypto::os_rng())
    );
    let notes: Vec<NoteId> = devices[0]
        .vault()
        .apply_many(
            (0..NOTES)
                .map(|n| {
                    let edit = NoteEdit {
                        title: Some(format!("{marker} title {n}")),
                        body: Some(String::new()),
                        tags: Some(vec![format!("{marker}-tag")]),
                    };
                    (None, edit)
                })
                .collect(),
        )
        .unwrap()
        .iter()
        .map(|s| s.id)
        .collect();
    for device in &devices {
        sync(device).await;
    }

    let stop = tokio::sync::watch::channel(false);
    let proxies = std::sync::Arc::new(proxies);
    let cutter = {
        let proxies = std::sync::Arc::clone(&proxies);
        let mut stopped = stop.1.clone();
        tokio::spawn(async move {
            let mut cuts = 0u32;
            loop {
                let pause = khub::crypto::os_rng().random_range(30..150);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(pause)) => {}
                    _ = stopped.changed() => return cuts,
                }
                let victim = khub::crypto::os_rng().random_range(0..proxies.len());
                proxies[victim].cut();
                cuts += 1;
            }
        })
    };
    let line = {
        let marker = marker.clone();
        move |device: usize, n: usize| format!("{marker} line {n} from device {device}")
    };
    let run = async {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, device) in devices.iter().cloned().enumerate() {
            let notes = notes.clone();
            let line = line.clone();
            tasks.spawn(async move {
                let session = device.connect();
                let vault = device.vault();
                for n in (i..EDITS).step_by(DEVICES) {
                    let id = notes[n % NOTES];
                    let vault = vault.clone();
                    let text = line(i, n);
                    tokio::task::spawn_blocking(move || {
                        let note = vault.get(id)?.expect("the note");
                        let mut text = note.body + &text;
                        text.push('\n');
                        vault.update_from(id, &note.version, body(&text))
                    })
                    .await
                    .unwrap()
                    .expect("edit");
                    if n % 50 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                while device.pending().unwrap() > 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                session.close().await;
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
    };
    tokio::time::timeout(SCENARIO, run)
        .await
        .expect("every edit was published in time");
    let _ = stop.0.send(true);
    let cuts = cutter.await.unwrap();
    assert!(cuts >= 5, "the proxy cut connections ({cuts} cuts)");
    for _ in 0..2 {
        for device in &devices {
            sync(device).await;
        }
    }

    let refs: Vec<&Device> = devices.iter().collect();
    assert_same_vault(&refs);
    let mut lines = Vec::new();
    for id in &notes {
        let note = devices[0].vault().get(*id).unwrap().unwrap();
        lines.extend(note.body.lines().map(str::to_owned));
    }
    let expected: BTreeSet<String> = (0..EDITS).map(|n| line(n % DEVICES, n)).collect();
    assert_eq!(lines.len(), EDITS, "no edit lost or duplicated");
    assert_eq!(lines.into_iter().collect::<BTreeSet<_>>(), expected);
    for device in &devices {
        assert_eq!(
            device.incidents().unwrap(),
            [],
            "an honest relay causes no incident"
        );
    }

    let mut scanner = Scanner::new();
    scanner.add("note marker", marker.as_bytes());
    for device in &devices {
        scanner.add_device(device);
    }
    assert_eq!(scanner.scan_dir(relay.dir()).unwrap(), []);
    assert_eq!(scanner.scan_logs(), []);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_paired_after_5000_edits_gets_every_note_from_a_snapshot() {
    const NOTES: usize = 200;
    const EDITS: usize = 5000;
    let relay = TestRelay::start(Limits::default()).await.unwrap();
    let home = TempDir::new("notes-late");
    let laptop = Device::create(&home.path().join("laptop"), &relay.url(), "laptop")
        .await
        .unwrap();
    // A device that was there from the start, syncing through a proxy that
    // counts what it downloads: the cost of replaying the changes.
    let early_proxy = FaultProxy::start(relay.addr()).await.unwrap();
    let (early, _) = pair_device(
        &laptop,
        &home.path().join("early"),
        &early_proxy.url(),
        "early",
        STEP,
    )
    .await
    .unwrap();
    sync(&laptop).await;
    sync(&early).await;

    let vault = laptop.vault();
    let created = vault
        .apply_many(
            (0..NOTES)
                .map(|n| {
                    let text: String = (0..5).map(|l| format!("note {n} line {l}\n")).collect();
                    (
                        None,
                        NoteEdit {
                            title: Some(format!("Note {n}")),
                            body: Some(text),
                            tags: None,
                        },
                    )
                })
                .collect(),
        )
        .unwrap();
    let ids: Vec<NoteId> = created.iter().map(|s| s.id).collect();
    let mut edits = NOTES;
    let mut round = 0;
    while edits < EDITS {
        let batch: Vec<(Option<NoteId>, NoteEdit)> = ids
            .iter()
            .enumerate()
            .take(EDITS - edits)
            .map(|(n, id)| {
                let text: String = (0..5)
                    .map(|l| {
                        if l == round % 5 {
                            format!("note {n} line {l} edit {round}\n")
                        } else {
                            format!("note {n} line {l}\n")
                        }
                    })
                    .collect();
                (Some(*id), body(&text))
            })
            .collect();
        edits += batch.len();
        vault.apply_many(batch).unwrap();
        round += 1;
    }
    sync(&laptop).await;
    let before = early_proxy.bytes_down();
    sync(&early).await;
    let replay_bytes = early_proxy.bytes_down() - before;
    assert_same_vault(&[&laptop, &early]);

    // The late device: its first sync brings the snapshot, not the history.
    let late_proxy = FaultProxy::start(relay.addr()).await.unwrap();
    let (late, _) = pair_device(
        &laptop,
        &home.path().join("late"),
        &late_proxy.url(),
        "late",
        STEP,
    )
    .await
    .unwrap();
    let taken = sync(&late).await;
    let late_bytes = late_proxy.bytes_down();
    assert_eq!(late.vault().list().unwrap().len(), NOTES);
    let snapshot_bytes: usize = ids
        .iter()
        .map(|id| vault.document(*id).unwrap().unwrap().len())
        .sum();
    println!(
        "replaying {EDITS} edits: {replay_bytes} bytes; late device's pairing and first sync: {late_bytes} bytes in {taken} envelopes; vault saved: {snapshot_bytes} bytes"
    );
    assert!(
        late_bytes < replay_bytes / 2,
        "the late device downloaded {late_bytes} bytes, replaying the history took {replay_bytes}"
    );
    // The snapshot travels uncompressed (receivers inflate nothing a member
    // sends), about twice the vault's compressed size on disk.
    assert!(
        (late_bytes as usize) < snapshot_bytes * 3,
        "about the snapshot: {late_bytes} bytes for a {snapshot_bytes}-byte vault"
    );
    for id in &ids {
        assert_eq!(
            late.vault().document(*id).unwrap(),
            vault.document(*id).unwrap()
        );
    }
    assert_eq!(late.incidents().unwrap(), []);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notes_outlive_the_relays_retention() {
    let limits = Limits {
        retention: Duration::from_secs(4),
        ..Limits::default()
    };
    let relay = TestRelay::start(limits).await.unwrap();
    let home = TempDir::new("notes-retention");
    let urls = vec![relay.url(); 3];
    let paired = tokio::time::timeout(SCENARIO, paired_devices(home.path(), &urls))
        .await
        .expect("pairing in time")
        .expect("pairs");
    let [writer, reader, away] = [&paired.devices[0], &paired.devices[1], &paired.devices[2]];
    let first = writer.vault().create(body("written first\n")).unwrap().id;
    for device in [writer, reader, away] {
        sync(device).await;
    }

    // For 12 s (three retention periods) the writer edits and syncs, the
    // reader syncs every second; the third device stays away.
    let mut notes = vec![first];
    let start = tokio::time::Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(12) {
        let vault = writer.vault();
        if n % 4 == 0 {
            notes.push(vault.create(body(&format!("note {n}\n"))).unwrap().id);
        } else {
            let id = notes[n % notes.len()];
            let mut text = vault.get(id).unwrap().unwrap().body;
            text.push_str(&format!("edit {n}\n"));
            vault.update(id, body(&text)).unwrap();
        }
        sync(writer).await;
        if n % 3 == 0 {
            sync(reader).await;
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(330)).await;
    }
    sync(writer).await;
    sync(reader).await;
    assert_same_vault(&[writer, reader]);

    // The device that stayed away missed changes the relay no longer has,
    // and still gets every note, from the snapshots the writer published.
    sync(away).await;
    sync(away).await;
    assert!(
        away.incidents()
            .unwrap()
            .iter()
            .any(|i| i.kind == IncidentKind::Gap),
        "the relay pruned envelopes this device never saw"
    );
    assert_eq!(away.vault().list().unwrap().len(), notes.len());
    assert_same_vault(&[writer, away]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_notes_messages_from_a_member_are_incidents_and_missing_history_waits() {
    let relay = TestRelay::start(Limits::default()).await.unwrap();
    let home = TempDir::new("notes-bad");
    let urls = vec![relay.url(); 2];
    let paired = tokio::time::timeout(SCENARIO, paired_devices(home.path(), &urls))
        .await
        .expect("pairing in time")
        .expect("pairs");
    let (mallory, victim) = (&paired.devices[0], &paired.devices[1]);
    let send = |message: Vec<u8>| {
        mallory
            .queue_raw_for_testing_only(&Control::Notes(message).encode())
            .unwrap();
    };

    // A note whose first change never arrives: only its second does.
    let id = NoteId([0x42; 16]);
    let mut doc = NoteDoc::create(mallory.id(), &body("first\n"), 1).unwrap();
    let creation = doc.changes_since(&[]);
    let heads = doc.heads();
    doc.edit(&body("first\nsecond\n"), 2).unwrap();
    let second = doc.changes_since(&heads);
    send(NotesMessage::Changes(vec![(id, second)]).encode());
    // Garbage, an undecodable change, and a change in another member's name.
    send(vec![0xff, 1, 2, 3]);
    send(NotesMessage::Changes(vec![(NoteId([1; 16]), vec![b"not a change".to_vec()])]).encode());
    let forged = NoteDoc::create(victim.id(), &body("in your name\n"), 3)
        .unwrap()
        .changes_since(&[]);
    send(NotesMessage::Changes(vec![(NoteId([2; 16]), forged)]).encode());
    // A compressed change (a decompression bomb's carrier) is refused unread.
    let big = NoteDoc::create(mallory.id(), &body(&"z".repeat(20_000)), 4)
        .unwrap()
        .changes_since(&[]);
    let compressed = automerge::Change::from_bytes(big[0].clone())
        .unwrap()
        .bytes()
        .to_vec();
    assert!(compressed.len() < big[0].len());
    send(NotesMessage::Changes(vec![(NoteId([3; 16]), vec![compressed])]).encode());
    sync(mallory).await;
    sync(victim).await;

    let kinds: Vec<IncidentKind> = victim.incidents().unwrap().iter().map(|i| i.kind).collect();
    assert_eq!(
        kinds,
        [
            IncidentKind::MissingHistory,
            IncidentKind::Malformed,
            IncidentKind::Malformed,
            IncidentKind::Forged,
            IncidentKind::Malformed
        ]
    );
    assert_eq!(
        victim.vault().list().unwrap(),
        [],
        "nothing half-applied shows"
    );

    // The missing change arrives: the set-aside one applies too.
    send(NotesMessage::Changes(vec![(id, creation)]).encode());
    sync(mallory).await;
    sync(victim).await;
    let note = victim.vault().get(id).unwrap().expect("the note");
    assert_eq!(note.body, "first\nsecond\n");
    assert_eq!(victim.incidents().unwrap().len(), 5, "no new incident");
    // The victim still syncs and edits.
    victim
        .vault()
        .update(id, body("first\nsecond\nthird\n"))
        .unwrap();
    sync(victim).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_sync_reports_its_progress_page_by_page() {
    // Pages of 5 envelopes stand in for the relay's 1,000 (or 4 MiB).
    let limits = Limits {
        max_batch: 5,
        ..Limits::default()
    };
    let relay = TestRelay::start(limits).await.unwrap();
    let home = TempDir::new("notes-progress");
    let urls = vec![relay.url(); 2];
    let paired = tokio::time::timeout(SCENARIO, paired_devices(home.path(), &urls))
        .await
        .expect("pairing in time")
        .expect("pairs");
    let (laptop, phone) = (&paired.devices[0], &paired.devices[1]);
    for n in 0..24 {
        laptop.vault().create(body(&format!("note {n}\n"))).unwrap();
    }
    sync(laptop).await;
    let mut seen = Vec::new();
    let taken = tokio::time::timeout(STEP, phone.sync_with_progress(|p| seen.push(p)))
        .await
        .expect("sync in time")
        .unwrap();
    assert!(seen.len() >= 5, "one report per page: {seen:?}");
    assert!(
        seen[0].remaining >= 19,
        "the first page says what is left: {seen:?}"
    );
    assert!(
        seen.windows(2)
            .all(|w| w[0].taken < w[1].taken || w[1].remaining == 0)
    );
    assert_eq!(seen.last().unwrap().remaining, 0);
    assert_eq!(seen.last().unwrap().taken, taken);
    assert_eq!(phone.vault().list().unwrap().len(), 24);
}
