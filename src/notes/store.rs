//! The vault on disk: tables in the device's state file, and what taking in
//! a notes message, making an edit and publishing a snapshot do to them.
//! Every function runs inside the caller's transaction
//! ([`StateDb::change`](crate::client::state::StateDb)), so a note, the
//! envelope that carries its change and the cursor move together.

use automerge::{Change, ChangeHash};
use rusqlite::{Connection, OptionalExtension, params};

use super::doc::{NoteDoc, NoteId};
use super::wire::{self, NotesMessage};
use crate::client::ClientError;
use crate::client::incident::{Incident, IncidentKind};
use crate::ids::DeviceId;

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS notes (
    id       BLOB PRIMARY KEY,   -- the note's id
    doc      BLOB NOT NULL,      -- its Automerge document, saved (compacted)
    version  INTEGER NOT NULL    -- the vault version of its last change
);
CREATE TABLE IF NOT EXISTS note_pending (
    hash     BLOB PRIMARY KEY,   -- an Automerge change whose predecessors are missing
    note     BLOB NOT NULL,
    change   BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS note_outbox (
    sender_seq INTEGER NOT NULL, -- an envelope in the outbox carrying changes of
    note       BLOB NOT NULL,    -- this note
    PRIMARY KEY (sender_seq, note)
);
CREATE TABLE IF NOT EXISTS snapshot_parts (
    snapshot BLOB NOT NULL,
    part     INTEGER NOT NULL,
    parts    INTEGER NOT NULL,
    sender   BLOB NOT NULL,
    data     BLOB NOT NULL,
    PRIMARY KEY (snapshot, part)
);
CREATE TABLE IF NOT EXISTS vault (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    version   INTEGER NOT NULL,  -- bumped by every change to a note
    uncovered INTEGER NOT NULL,  -- changes in the channel since the last snapshot
    since     INTEGER NOT NULL,  -- when the oldest of them was seen (Unix seconds)
    retention INTEGER NOT NULL   -- the relay's retention in seconds (0: unknown)
);
INSERT OR IGNORE INTO vault (id, version, uncovered, since, retention) VALUES (1, 0, 0, 0, 0);
";

/// A snapshot is published once this many changes are not covered by one.
pub const SNAPSHOT_AFTER_CHANGES: u64 = 2000;
/// Most changes kept aside for missing history, over all notes.
const MAX_PENDING: i64 = 10_000;
/// Most bytes of incomplete snapshots kept per sender (the largest a
/// snapshot may be: [`wire::MAX_PARTS`] × [`wire::MAX_PART`]).
const MAX_PARTS_BYTES: i64 = wire::MAX_PARTS as i64 * wire::MAX_PART as i64;

fn err(e: rusqlite::Error) -> ClientError {
    ClientError::disk(
        "the notes in the state file could not be read or written",
        e,
    )
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A local edit.
pub(crate) enum Op {
    /// Create a note or edit one (from a version read earlier, or the
    /// current one).
    Edit(super::doc::NoteEdit, Option<super::doc::NoteVersion>),
    /// Mark deleted (`true`) or restore (`false`).
    Delete(bool),
}

/// The saved document of `id`, if the vault holds it.
pub(crate) fn saved(conn: &Connection, id: NoteId) -> Result<Option<Vec<u8>>, ClientError> {
    conn.query_row("SELECT doc FROM notes WHERE id = ?1", params![id.0], |r| {
        r.get(0)
    })
    .optional()
    .map_err(err)
}

/// Note `id` as stored (`bytes`), opened for device `me`.
pub(crate) fn open(bytes: &[u8], me: DeviceId, id: NoteId) -> Result<NoteDoc, ClientError> {
    NoteDoc::load(bytes, me)
        .map_err(|e| ClientError::disk(format!("note {id} in the state file cannot be read"), e))
}

fn load(conn: &Connection, me: DeviceId, id: NoteId) -> Result<Option<NoteDoc>, ClientError> {
    match saved(conn, id)? {
        Some(bytes) => open(&bytes, me, id).map(Some),
        None => Ok(None),
    }
}

fn bump(conn: &Connection) -> Result<i64, ClientError> {
    conn.query_row(
        "UPDATE vault SET version = version + 1 WHERE id = 1 RETURNING version",
        [],
        |r| r.get(0),
    )
    .map_err(err)
}

fn store(conn: &Connection, id: NoteId, doc: &mut NoteDoc) -> Result<(), ClientError> {
    let version = bump(conn)?;
    conn.execute(
        "INSERT INTO notes (id, doc, version) VALUES (?1, ?2, ?3)
         ON CONFLICT (id) DO UPDATE SET doc = excluded.doc, version = excluded.version",
        params![id.0, doc.save(), version],
    )
    .map_err(err)
    .map(drop)
}

/// Makes a local edit; returns the changes it made (empty if it changed
/// nothing). `id` of a note that does not exist is the caller's mistake.
pub(crate) fn edit(
    conn: &Connection,
    me: DeviceId,
    id: NoteId,
    create: bool,
    op: &Op,
    now_ms: i64,
) -> Result<Vec<Vec<u8>>, ClientError> {
    let invalid = |e: super::doc::NoteError| ClientError::Invalid(e.to_string());
    let (mut doc, before) = if create {
        let Op::Edit(edit, _) = op else {
            return Err(ClientError::Invalid("a new note cannot be deleted".into()));
        };
        (
            NoteDoc::create(me, edit, now_ms).map_err(invalid)?,
            Vec::new(),
        )
    } else {
        let mut doc = load(conn, me, id)?
            .and_then(|mut doc| doc.exists().then_some(doc))
            .ok_or_else(|| ClientError::Invalid(format!("no note {id} on this device")))?;
        let heads = doc.heads();
        let changed = match op {
            Op::Edit(edit, None) => doc.edit(edit, now_ms).map_err(invalid)?,
            Op::Edit(edit, Some(base)) => doc.edit_from(base, edit, now_ms).map_err(invalid)?,
            Op::Delete(deleted) => doc.set_deleted(*deleted, now_ms).map_err(invalid)?,
        };
        if !changed {
            return Ok(Vec::new());
        }
        (doc, heads)
    };
    let changes = doc.changes_since(&before);
    store(conn, id, &mut doc)?;
    Ok(changes)
}

/// Records that the outbox envelope `sender_seq` carries changes of `notes`.
pub(crate) fn carried(
    conn: &Connection,
    sender_seq: u64,
    notes: &[NoteId],
) -> Result<(), ClientError> {
    for id in notes {
        conn.execute(
            "INSERT OR IGNORE INTO note_outbox (sender_seq, note) VALUES (?1, ?2)",
            params![i64_of(sender_seq), id.0],
        )
        .map_err(err)?;
    }
    conn.execute(
        "DELETE FROM note_outbox WHERE sender_seq NOT IN (SELECT sender_seq FROM outbox)",
        [],
    )
    .map_err(err)
    .map(drop)
}

/// Whether changes of `id` wait in the outbox (not yet acked by the relay).
pub(crate) fn unsent(conn: &Connection, id: NoteId) -> Result<bool, ClientError> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM note_outbox JOIN outbox USING (sender_seq) WHERE note = ?1)",
        params![id.0],
        |r| r.get(0),
    )
    .map_err(err)
}

/// Counts changes not covered by a snapshot (`count` more, seen at `now`).
pub(crate) fn uncovered(conn: &Connection, count: usize, now: u64) -> Result<(), ClientError> {
    if count == 0 {
        return Ok(());
    }
    conn.execute(
        "UPDATE vault SET uncovered = uncovered + ?1,
                          since = CASE WHEN since = 0 THEN ?2 ELSE since END WHERE id = 1",
        params![i64_of(count as u64), i64_of(now)],
    )
    .map_err(err)
    .map(drop)
}

fn covered(conn: &Connection) -> Result<(), ClientError> {
    conn.execute("UPDATE vault SET uncovered = 0, since = 0 WHERE id = 1", [])
        .map_err(err)
        .map(drop)
}

/// Remembers the relay's retention, as it last said.
pub(crate) fn set_retention(conn: &Connection, secs: u64) -> Result<(), ClientError> {
    conn.execute(
        "UPDATE vault SET retention = ?1 WHERE id = 1 AND retention != ?1",
        params![i64_of(secs)],
    )
    .map_err(err)
    .map(drop)
}

/// Whether this device should publish a snapshot now: enough changes since
/// the last one (2,000, plus up to as many again), or the oldest uncovered
/// change is half way to the relay's retention (plus up to a quarter) — the
/// extra drawn from the device id, so members do not all publish at once.
pub(crate) fn snapshot_due(conn: &Connection, me: DeviceId, now: u64) -> Result<bool, ClientError> {
    let (uncovered, since, retention): (i64, i64, i64) = conn
        .query_row(
            "SELECT uncovered, since, retention FROM vault WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .map_err(err)?;
    if uncovered <= 0 {
        return Ok(false);
    }
    // Up to twice the threshold, drawn from the device id, so that one
    // burst of changes does not make every member publish at once.
    let jitter = u64::from(me.as_bytes()[1]);
    if uncovered as u64 >= SNAPSHOT_AFTER_CHANGES + SNAPSHOT_AFTER_CHANGES * jitter / 256 {
        return Ok(true);
    }
    let retention = retention.max(0) as u64;
    if retention == 0 {
        return Ok(false);
    }
    let wait = retention / 2 + retention * u64::from(me.as_bytes()[0]) / 1024;
    Ok(now.saturating_sub(since.max(0) as u64) >= wait)
}

/// The snapshot of the whole vault, in parts; resets the uncovered count.
/// Empty if the vault holds no note.
pub(crate) fn snapshot(conn: &Connection, me: DeviceId) -> Result<Vec<NotesMessage>, ClientError> {
    let mut records = Vec::new();
    for (id, bytes, _) in all(conn)? {
        let mut doc = open(&bytes, me, id)?;
        records.push((id, doc.save_uncompressed()));
    }
    covered(conn)?;
    if records.is_empty() {
        return Ok(Vec::new());
    }
    records.sort_by_key(|(id, _)| *id);
    let id = crate::crypto::secret::random_array(&mut crate::crypto::os_rng());
    Ok(wire::split_snapshot(id, &records))
}

/// One change from a member: an uncompressed change chunk only (nothing a
/// sender sends is ever inflated), parsed with Automerge's panics contained.
fn parse_change(bytes: &[u8]) -> Result<Change, String> {
    wire::check_change(bytes).map_err(|e| e.to_string())?;
    let owned = bytes.to_vec();
    std::panic::catch_unwind(move || Change::from_bytes(owned))
        .map_err(|_| "Automerge could not parse it".to_owned())?
        .map_err(|e| e.to_string())
}

/// Takes in one notes message that `sender` sent under relay sequence
/// number `seq`; returns what it refused. Nothing a member sends can fail
/// this: bad input becomes incidents, and only the disk can fail.
pub(crate) fn take_in(
    conn: &Connection,
    me: DeviceId,
    seq: u64,
    sender: DeviceId,
    payload: &[u8],
    now: u64,
) -> Result<Vec<Incident>, ClientError> {
    let refuse = |kind, detail: String| Incident {
        seq,
        kind,
        sender: Some(sender),
        detail,
    };
    match NotesMessage::decode(payload) {
        Err(e) => Ok(vec![refuse(
            IncidentKind::Malformed,
            format!("an undecodable notes message was skipped: {e}"),
        )]),
        Ok(NotesMessage::Changes(notes)) => {
            let mut incidents = Vec::new();
            let mut count = 0;
            for (id, raw) in notes {
                let mut changes = Vec::with_capacity(raw.len());
                let mut refusal = None;
                for bytes in &raw {
                    match parse_change(bytes) {
                        Ok(change) if change.actor_id().to_bytes() == sender.as_bytes() => {
                            changes.push(change);
                        }
                        Ok(change) => {
                            refusal = Some(refuse(
                                IncidentKind::Forged,
                                format!(
                                    "a change to note {id} claims to be by {} but was sent by {sender}; the message's changes to it were skipped",
                                    hex::encode(change.actor_id().to_bytes())
                                ),
                            ));
                            break;
                        }
                        Err(e) => {
                            refusal = Some(refuse(
                                IncidentKind::Malformed,
                                format!("an undecodable change to note {id} was skipped: {e}"),
                            ));
                            break;
                        }
                    }
                }
                if let Some(incident) = refusal {
                    incidents.push(incident);
                    continue;
                }
                count += changes.len();
                if let Some(incident) = apply(conn, me, id, changes, None)? {
                    incidents.push(refuse(incident.0, incident.1));
                }
            }
            uncovered(conn, count, now)?;
            Ok(incidents)
        }
        Ok(NotesMessage::SnapshotPart {
            snapshot,
            part,
            parts,
            data,
        }) => snapshot_part(conn, me, sender, snapshot, part, parts, &data).map(|found| {
            found
                .map(|(kind, detail)| refuse(kind, detail))
                .into_iter()
                .collect()
        }),
    }
}

/// Applies changes to note `id`, with the changes set aside for it earlier.
/// A batch Automerge refuses is applied change by change, skipping those
/// that do not apply (a reused actor and sequence number with other
/// content, say), so one bad change cannot keep the others out. Returns an
/// incident if history is still missing or a change was skipped.
fn apply(
    conn: &Connection,
    me: DeviceId,
    id: NoteId,
    changes: Vec<Change>,
    saved_doc: Option<&[u8]>,
) -> Result<Option<(IncidentKind, String)>, ClientError> {
    let existing = load(conn, me, id)?;
    let known = existing.is_some();
    let mut doc = existing.unwrap_or_else(|| NoteDoc::empty(me));
    if let Some(saved_doc) = saved_doc {
        let merged = wire::check_document(saved_doc)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    doc.merge_saved(saved_doc)
                }))
                .map_err(|_| "Automerge could not load it".to_owned())?
                .map_err(|e| e.0)
            });
        if let Err(e) = merged {
            return Ok(Some((
                IncidentKind::Malformed,
                format!("note {id} in a snapshot was skipped: {e}"),
            )));
        }
    }
    let mut set_aside = pending(conn, id)?;
    let incoming: Vec<(ChangeHash, Vec<u8>)> = changes
        .iter()
        .map(|c| (c.hash(), c.raw_bytes().to_vec()))
        .collect();
    let mut all = changes;
    all.extend(set_aside.iter().filter_map(|(_, b)| parse_change(b).ok()));
    let mut skipped = 0;
    if !apply_contained(&mut doc, all.clone()) {
        // Start again from what is stored plus the snapshot, one change at a time.
        doc = load(conn, me, id)?.unwrap_or_else(|| NoteDoc::empty(me));
        if let Some(saved_doc) = saved_doc {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                doc.merge_saved(saved_doc)
            }));
        }
        for change in all {
            if !apply_contained(&mut doc, vec![change]) {
                skipped += 1;
            }
        }
    }
    set_aside.extend(incoming);
    let mut waiting = 0;
    for (hash, bytes) in &set_aside {
        if doc.has(hash) {
            conn.execute("DELETE FROM note_pending WHERE hash = ?1", params![hash.0])
                .map_err(err)?;
        } else if !doc.missing().is_empty() {
            waiting += 1;
            conn.execute(
                "INSERT OR IGNORE INTO note_pending (hash, note, change) VALUES (?1, ?2, ?3)",
                params![hash.0, id.0, bytes],
            )
            .map_err(err)?;
        } else {
            // Neither applied nor waiting: Automerge refused it.
            conn.execute("DELETE FROM note_pending WHERE hash = ?1", params![hash.0])
                .map_err(err)?;
        }
    }
    let mut incident = None;
    if skipped > 0 {
        incident = Some((
            IncidentKind::Malformed,
            format!("{skipped} change(s) to note {id} would not apply and were skipped"),
        ));
    }
    if waiting > 0 {
        let total: i64 = conn
            .query_row("SELECT COUNT(*) FROM note_pending", [], |r| r.get(0))
            .map_err(err)?;
        let mut detail = format!(
            "{waiting} change(s) to note {id} build on history this device has not seen (written before it joined, or lost); they wait for that history or a snapshot"
        );
        if total > MAX_PENDING {
            // The oldest set-aside changes go first, whoever sent them.
            conn.execute(
                "DELETE FROM note_pending WHERE rowid IN
                 (SELECT rowid FROM note_pending ORDER BY rowid LIMIT ?1)",
                params![total - MAX_PENDING],
            )
            .map_err(err)?;
            detail.push_str("; too many changes wait, so the oldest were dropped");
        }
        incident = incident.or(Some((IncidentKind::MissingHistory, detail)));
    }
    if doc.exists() || known {
        store(conn, id, &mut doc)?;
    }
    Ok(incident)
}

/// Applies changes, containing a panic of Automerge's; false if they did
/// not apply (the document may then be half-changed: reload it).
fn apply_contained(doc: &mut NoteDoc, changes: Vec<Change>) -> bool {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| doc.apply(changes).is_ok()))
        .unwrap_or(false)
}

fn pending(conn: &Connection, id: NoteId) -> Result<Vec<(ChangeHash, Vec<u8>)>, ClientError> {
    let mut stmt = conn
        .prepare_cached("SELECT hash, change FROM note_pending WHERE note = ?1")
        .map_err(err)?;
    let rows = stmt
        .query_map(params![id.0], |r| {
            Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?))
        })
        .map_err(err)?;
    let mut out = Vec::new();
    for row in rows {
        let (hash, bytes) = row.map_err(err)?;
        if let Ok(hash) = <[u8; 32]>::try_from(hash.as_slice()) {
            out.push((ChangeHash(hash), bytes));
        }
    }
    Ok(out)
}

/// Stores one snapshot part; when all parts are in, merges every note of
/// the snapshot into the vault.
#[allow(clippy::too_many_arguments)]
fn snapshot_part(
    conn: &Connection,
    me: DeviceId,
    sender: DeviceId,
    snapshot: [u8; 16],
    part: u32,
    parts: u32,
    data: &[u8],
) -> Result<Option<(IncidentKind, String)>, ClientError> {
    let mismatched: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM snapshot_parts WHERE snapshot = ?1 AND (sender != ?2 OR parts != ?3))",
            params![snapshot, sender.as_bytes(), parts],
            |r| r.get(0),
        )
        .map_err(err)?;
    if mismatched {
        return Ok(Some((
            IncidentKind::Malformed,
            "a snapshot part disagrees with the snapshot's other parts (sender or count); skipped"
                .into(),
        )));
    }
    conn.execute(
        "INSERT OR IGNORE INTO snapshot_parts (snapshot, part, parts, sender, data) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![snapshot, part, parts, sender.as_bytes(), data],
    )
    .map_err(err)?;
    let have: u32 = conn
        .query_row(
            "SELECT COUNT(*) FROM snapshot_parts WHERE snapshot = ?1",
            params![snapshot],
            |r| r.get(0),
        )
        .map_err(err)?;
    if have < parts {
        return trim_parts(conn, sender, snapshot);
    }
    let mut whole = Vec::new();
    {
        let mut stmt = conn
            .prepare("SELECT data FROM snapshot_parts WHERE snapshot = ?1 ORDER BY part")
            .map_err(err)?;
        let rows = stmt
            .query_map(params![snapshot], |r| r.get::<_, Vec<u8>>(0))
            .map_err(err)?;
        for row in rows {
            whole.extend_from_slice(&row.map_err(err)?);
        }
    }
    conn.execute(
        "DELETE FROM snapshot_parts WHERE snapshot = ?1",
        params![snapshot],
    )
    .map_err(err)?;
    let records = match wire::snapshot_records(&whole) {
        Ok(records) => records,
        Err(e) => {
            return Ok(Some((
                IncidentKind::Malformed,
                format!("a snapshot would not decode and was skipped: {e}"),
            )));
        }
    };
    let mut first = None;
    let covers = !records.is_empty();
    for (id, saved_doc) in records {
        let found = apply(conn, me, id, Vec::new(), Some(saved_doc))?;
        first = first.or(found);
    }
    if covers {
        // Everything before this snapshot in the channel's order is covered.
        covered(conn)?;
    }
    Ok(first)
}

/// Keeps each sender's incomplete snapshots under [`MAX_PARTS_BYTES`]
/// (the largest a snapshot may be), dropping that sender's oldest other than
/// `current`: one member cannot push out another's snapshot.
fn trim_parts(
    conn: &Connection,
    sender: DeviceId,
    current: [u8; 16],
) -> Result<Option<(IncidentKind, String)>, ClientError> {
    let bytes: i64 = conn
        .query_row(
            "SELECT COALESCE(SUM(LENGTH(data)), 0) FROM snapshot_parts WHERE sender = ?1",
            params![sender.as_bytes()],
            |r| r.get(0),
        )
        .map_err(err)?;
    if bytes <= MAX_PARTS_BYTES {
        return Ok(None);
    }
    let oldest: Option<Vec<u8>> = conn
        .query_row(
            "SELECT snapshot FROM snapshot_parts WHERE sender = ?1 AND snapshot != ?2 ORDER BY rowid LIMIT 1",
            params![sender.as_bytes(), current],
            |r| r.get(0),
        )
        .optional()
        .map_err(err)?;
    let drop_id = oldest.unwrap_or_else(|| current.to_vec());
    conn.execute(
        "DELETE FROM snapshot_parts WHERE snapshot = ?1",
        params![drop_id],
    )
    .map_err(err)?;
    Ok(Some((
        IncidentKind::Malformed,
        "a member's incomplete snapshots grew past 64 MiB; its oldest was dropped".into(),
    )))
}

/// Every note's id and saved document with its vault version, newest first.
pub(crate) fn all(conn: &Connection) -> Result<Vec<(NoteId, Vec<u8>, i64)>, ClientError> {
    let mut stmt = conn
        .prepare("SELECT id, doc, version FROM notes ORDER BY version DESC")
        .map_err(err)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .map_err(err)?;
    let mut out = Vec::new();
    for row in rows {
        let (id, doc, version) = row.map_err(err)?;
        if let Some(id) = NoteId::from_slice(&id) {
            out.push((id, doc, version));
        }
    }
    Ok(out)
}

/// Ids of notes changed after vault version `after`, and the newest
/// version among them (`after` if none).
pub(crate) fn changed_since(
    conn: &Connection,
    after: i64,
) -> Result<(Vec<NoteId>, i64), ClientError> {
    let mut stmt = conn
        .prepare_cached("SELECT id, version FROM notes WHERE version > ?1 ORDER BY version")
        .map_err(err)?;
    let rows = stmt
        .query_map(params![after], |r| {
            Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?))
        })
        .map_err(err)?;
    let mut ids = Vec::new();
    let mut newest = after;
    for row in rows {
        let (id, version) = row.map_err(err)?;
        newest = newest.max(version);
        if let Some(id) = NoteId::from_slice(&id) {
            ids.push(id);
        }
    }
    Ok((ids, newest))
}

/// The vault's newest version.
pub(crate) fn version(conn: &Connection) -> Result<i64, ClientError> {
    conn.query_row("SELECT version FROM vault WHERE id = 1", [], |r| r.get(0))
        .map_err(err)
}
