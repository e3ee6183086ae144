//! `khub bench --scenario notes`: what notes that sync cost — merge
//! throughput, bytes per small edit, snapshot size against the plain text,
//! and a new device receiving a vault of 1,000 notes × 5 KB through a relay.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Row;
use crate::client::control::Control;
use crate::client::{Device, join};
use crate::ids::DeviceId;
use crate::notes::NoteEdit;
use crate::notes::doc::{NoteDoc, NoteId};
use crate::notes::wire::NotesMessage;
use crate::pairing::Code;
use crate::relay::store::sqlite::SqliteStore;

const WORDS: [&str; 16] = [
    "river", "meeting", "notes", "garden", "budget", "draft", "travel", "idea", "chapter",
    "recipe", "invoice", "weekend", "project", "letter", "reading", "list",
];

/// About `len` bytes of words of 2 to 9 random letters in lines, different
/// for each `seed` (it compresses worse than prose, so snapshot sizes are
/// not flattered).
fn text(seed: usize, len: usize) -> String {
    let mut out = String::with_capacity(len + 16);
    let mut n = (seed as u64).wrapping_mul(2_654_435_761).wrapping_add(1);
    let mut next = || {
        n = n
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        n >> 33
    };
    while out.len() < len {
        for _ in 0..2 + next() % 8 {
            out.push(char::from(b'a' + (next() % 26) as u8));
        }
        out.push(if next() % 9 == 0 { '\n' } else { ' ' });
    }
    out
}

fn device(n: u8) -> DeviceId {
    DeviceId::from_slice(&[n; 16]).expect("16 bytes")
}

pub(super) async fn run() -> Result<Vec<Row>, String> {
    let mut rows = merge_rows()?;
    rows.extend(edit_bytes_rows()?);
    rows.extend(vault_rows().await?);
    Ok(rows)
}

/// Changes/s a device applies: 5,000 one-word edits to one note made on
/// another device, applied in batches of 100 (as a sync page brings them).
fn merge_rows() -> Result<Vec<Row>, String> {
    const EDITS: usize = 5000;
    let mut writer = NoteDoc::create(device(1), &NoteEdit::default(), 0).map_err(|e| e.0)?;
    let base = writer.save();
    let mut body = String::new();
    let mut changes = Vec::with_capacity(EDITS);
    for i in 0..EDITS {
        let heads = writer.heads();
        body.push_str(WORDS[i % WORDS.len()]);
        body.push(' ');
        writer
            .edit(
                &NoteEdit {
                    body: Some(body.clone()),
                    ..NoteEdit::default()
                },
                i as i64,
            )
            .map_err(|e| e.0)?;
        changes.extend(writer.changes_since(&heads));
    }
    let mut reader = NoteDoc::load(&base, device(2)).map_err(|e| e.0)?;
    let started = Instant::now();
    for batch in changes.chunks(100) {
        let parsed: Vec<automerge::Change> = batch
            .iter()
            .map(|c| automerge::Change::from_bytes(c.clone()).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        reader.apply(parsed).map_err(|e| e.0)?;
        reader.save();
    }
    let elapsed = started.elapsed();
    let id = NoteId([0; 16]);
    if reader.view(id).body != body {
        return Err("the merged note differs from the written one".into());
    }
    Ok(vec![Row::info(
        "notes",
        format!("merge: {EDITS} one-word edits applied in batches of 100, saved after each"),
        format!(
            "{:.0} changes/s",
            EDITS as f64 / elapsed.as_secs_f64().max(1e-9)
        ),
    )])
}

/// What one small edit (a character typed into a 5 KB note) costs on the
/// wire: the Automerge change, the notes message, and the sealed envelope.
fn edit_bytes_rows() -> Result<Vec<Row>, String> {
    let start = text(1, 5000);
    let mut doc = NoteDoc::create(
        device(1),
        &NoteEdit {
            title: Some("A note".into()),
            body: Some(start.clone()),
            tags: None,
        },
        0,
    )
    .map_err(|e| e.0)?;
    let heads = doc.heads();
    let mut edited = start;
    edited.insert(2500, 'x');
    doc.edit(
        &NoteEdit {
            body: Some(edited),
            ..NoteEdit::default()
        },
        1,
    )
    .map_err(|e| e.0)?;
    let changes = doc.changes_since(&heads);
    let change_len: usize = changes.iter().map(Vec::len).sum();
    let message =
        Control::Notes(NotesMessage::Changes(vec![(NoteId([0; 16]), changes)]).encode()).encode();
    let mut pair = super::scenarios::mls_channel(2);
    let sealed = pair[0].seal(&message).map_err(|e| e.to_string())?;
    // The relay sends it base64url inside a JSON deliver frame.
    let on_wire = sealed.envelope.len().div_ceil(3) * 4 + 40;
    Ok(vec![Row::info(
        "notes",
        "one character typed into a 5 KB note: change / notes message / envelope / on the wire",
        format!(
            "{change_len} B / {} B / {} B / about {on_wire} B",
            message.len(),
            sealed.envelope.len()
        ),
    )])
}

/// A vault of 1,000 notes × 5 KB written on one device; a second device
/// pairs and receives it (the snapshot), through a relay on SQLite.
async fn vault_rows() -> Result<Vec<Row>, String> {
    const NOTES: usize = 1000;
    const SIZE: usize = 5000;
    let db = super::scenarios::temp_db();
    let store = SqliteStore::open(&db).map_err(|e| e.to_string())?;
    let relay = super::scenarios::start(Arc::new(store)).await?;
    let url = format!("http://{}", relay.addr);
    let dir = db
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let err = |e: crate::client::ClientError| e.to_string();
    let laptop = Device::create(&dir.join("laptop"), &url, "laptop")
        .await
        .map_err(err)?;
    let edits: Vec<(Option<NoteId>, NoteEdit)> = (0..NOTES)
        .map(|n| {
            (
                None,
                NoteEdit {
                    title: Some(format!("Note {n}")),
                    body: Some(text(n, SIZE)),
                    tags: Some(vec!["bench".into()]),
                },
            )
        })
        .collect();
    let plain: usize = edits
        .iter()
        .map(|(_, e)| {
            e.title.as_ref().map_or(0, String::len)
                + e.body.as_ref().map_or(0, String::len)
                + e.tags.iter().flatten().map(String::len).sum::<usize>()
        })
        .sum();
    let started = Instant::now();
    laptop.vault().apply_many(edits).map_err(err)?;
    let written = started.elapsed();
    laptop.sync().await.map_err(err)?;
    // On disk each note is a compressed document; a snapshot carries it
    // without compressed columns (receivers inflate nothing a member sends).
    let (mut saved, mut snapshot) = (0usize, 0usize);
    for note in laptop.vault().list().map_err(err)? {
        let doc = laptop
            .vault()
            .document(note.id)
            .map_err(err)?
            .unwrap_or_default();
        saved += doc.len();
        snapshot += NoteDoc::load(&doc, laptop.id())
            .map_err(|e| e.0)?
            .save_uncompressed()
            .len();
    }
    let started = Instant::now();
    let invitation = laptop.invite().await.map_err(err)?;
    let code = Code::parse(&invitation.code()).map_err(|e| e.to_string())?;
    let completing = tokio::spawn(invitation.complete(Duration::from_secs(120)));
    let (phone, _) = join(
        &dir.join("phone"),
        &url,
        "phone",
        &code,
        Duration::from_secs(120),
    )
    .await
    .map_err(err)?;
    completing.await.map_err(|e| e.to_string())?.map_err(err)?;
    phone.sync().await.map_err(err)?;
    let received = started.elapsed();
    let got = phone.vault().list().map_err(err)?.len();
    let _ = std::fs::remove_dir_all(&dir);
    if got != NOTES {
        return Err(format!("the new device has {got} of {NOTES} notes"));
    }
    Ok(vec![
        Row::info(
            "notes",
            format!("write {NOTES} notes × 5 KB in one batch (Automerge, seal, SQLite)"),
            format!("{:.2} s", written.as_secs_f64()),
        ),
        Row::info(
            "notes",
            format!(
                "{NOTES} notes × 5 KB: plain text / on disk (compressed) / snapshot (uncompressed)"
            ),
            format!(
                "{:.2} MB / {:.2} MB ({:.2}×) / {:.2} MB ({:.2}×)",
                plain as f64 / 1e6,
                saved as f64 / 1e6,
                saved as f64 / plain as f64,
                snapshot as f64 / 1e6,
                snapshot as f64 / plain as f64
            ),
        ),
        Row::info(
            "notes",
            format!("a new device pairs and receives the {NOTES}-note vault (snapshot)"),
            format!(
                "{:.2} s for {:.2} MB",
                received.as_secs_f64(),
                snapshot as f64 / 1e6
            ),
        ),
    ])
}
