//! Notes inside the channel's encrypted messages: the bytes after the
//! `0x04` kind byte (see [`Control`](crate::client::control::Control)).
//!
//! ```text
//! changes:  0x01 || u32 notes || notes × ( note id (16) || u32 count || count × ( u32 len || change ) )
//! snapshot: 0x02 || snapshot id (16) || u32 part || u32 parts || data
//! ```
//!
//! Integers are big-endian. A `change` is one Automerge change in its binary
//! form; every change in one message must be the sender's own (its actor is
//! the sender's device id). A snapshot is split into `parts` messages
//! (`part` counts from 0) whose `data`, joined in order, is
//!
//! ```text
//! records × ( note id (16) || u32 len || saved Automerge document )
//! ```

use super::doc::{NOTE_ID_LEN, NoteId};
use crate::codec::{DecodeError, Reader};

const CHANGES: u8 = 0x01;
const SNAPSHOT: u8 = 0x02;

/// Largest message the SDK writes (the channel takes up to 1 MiB).
pub const MAX_MESSAGE: usize = 768 * 1024;
/// Largest snapshot part's data.
pub const MAX_PART: usize = 512 * 1024;
/// Most parts a snapshot may have (64 MiB).
pub const MAX_PARTS: u32 = 128;

/// One notes message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotesMessage {
    /// Changes the sender made, by note.
    Changes(Vec<(NoteId, Vec<Vec<u8>>)>),
    /// One part of a snapshot of the sender's whole vault.
    SnapshotPart {
        /// Names the snapshot (random).
        snapshot: [u8; 16],
        /// Which part, from 0.
        part: u32,
        /// How many parts.
        parts: u32,
        /// This part's share of the records.
        data: Vec<u8>,
    },
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
}

impl NotesMessage {
    /// Its bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Self::Changes(notes) => {
                out.push(CHANGES);
                put_u32(&mut out, notes.len());
                for (id, changes) in notes {
                    out.extend_from_slice(&id.0);
                    put_u32(&mut out, changes.len());
                    for change in changes {
                        put_u32(&mut out, change.len());
                        out.extend_from_slice(change);
                    }
                }
            }
            Self::SnapshotPart {
                snapshot,
                part,
                parts,
                data,
            } => {
                out.push(SNAPSHOT);
                out.extend_from_slice(snapshot);
                out.extend_from_slice(&part.to_be_bytes());
                out.extend_from_slice(&parts.to_be_bytes());
                out.extend_from_slice(data);
            }
        }
        out
    }

    /// Parses a message; every length is checked against what is left.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        match r.u8("notes message kind")? {
            CHANGES => {
                let count = r.u32("note count")?;
                let mut notes = Vec::new();
                for _ in 0..count {
                    let id = NoteId(r.array::<NOTE_ID_LEN>("note id")?);
                    let n = r.u32("change count")?;
                    let mut changes = Vec::new();
                    for _ in 0..n {
                        let len = r.u32("change length")? as usize;
                        changes.push(r.take(len, "change")?.to_vec());
                    }
                    notes.push((id, changes));
                }
                r.finish("trailing bytes after the changes")?;
                Ok(Self::Changes(notes))
            }
            SNAPSHOT => {
                let snapshot = r.array::<16>("snapshot id")?;
                let part = r.u32("snapshot part")?;
                let parts = r.u32("snapshot parts")?;
                if parts == 0 || parts > MAX_PARTS || part >= parts {
                    return Err(DecodeError("snapshot part out of range"));
                }
                let data = r.take(r.remaining(), "snapshot data")?.to_vec();
                Ok(Self::SnapshotPart {
                    snapshot,
                    part,
                    parts,
                    data,
                })
            }
            _ => Err(DecodeError("unknown notes message kind: update khub")),
        }
    }
}

/// Packs changes into as few messages of at most [`MAX_MESSAGE`] bytes as
/// it can; `Err` names a single change too large for any message.
pub fn pack_changes(notes: Vec<(NoteId, Vec<Vec<u8>>)>) -> Result<Vec<NotesMessage>, usize> {
    let mut messages = Vec::new();
    let mut current: Vec<(NoteId, Vec<Vec<u8>>)> = Vec::new();
    let mut size = 5;
    for (id, changes) in notes {
        for change in changes {
            let cost = change.len() + 4 + NOTE_ID_LEN + 4;
            if cost + 5 > MAX_MESSAGE {
                return Err(change.len());
            }
            if size + cost > MAX_MESSAGE {
                messages.push(NotesMessage::Changes(std::mem::take(&mut current)));
                size = 5;
            }
            size += cost;
            match current.last_mut() {
                Some((last, list)) if *last == id => list.push(change),
                _ => current.push((id, vec![change])),
            }
        }
    }
    if !current.is_empty() {
        messages.push(NotesMessage::Changes(current));
    }
    Ok(messages)
}

/// Splits a snapshot of `records` (note id, saved document) into parts.
pub fn split_snapshot(snapshot: [u8; 16], records: &[(NoteId, Vec<u8>)]) -> Vec<NotesMessage> {
    let mut data = Vec::new();
    for (id, saved) in records {
        data.extend_from_slice(&id.0);
        put_u32(&mut data, saved.len());
        data.extend_from_slice(saved);
    }
    let chunks: Vec<&[u8]> = data.chunks(MAX_PART).collect();
    let parts = u32::try_from(chunks.len()).unwrap_or(u32::MAX);
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| NotesMessage::SnapshotPart {
            snapshot,
            part: u32::try_from(i).unwrap_or(u32::MAX),
            parts,
            data: chunk.to_vec(),
        })
        .collect()
}

/// Reads the records of a whole snapshot (its parts' data joined in order).
pub fn snapshot_records(data: &[u8]) -> Result<Vec<(NoteId, &[u8])>, DecodeError> {
    let mut r = Reader::new(data);
    let mut records = Vec::new();
    while r.remaining() > 0 {
        let id = NoteId(r.array::<NOTE_ID_LEN>("snapshot note id")?);
        let len = r.u32("snapshot document length")? as usize;
        records.push((id, r.take(len, "snapshot document")?));
    }
    Ok(records)
}

const CHUNK_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const DOCUMENT_CHUNK: u8 = 0;
const CHANGE_CHUNK: u8 = 1;
/// The column specification bit that marks a DEFLATE-compressed column.
const DEFLATE_BIT: u64 = 0b1000;

fn uleb(r: &mut Reader<'_>, field: &'static str) -> Result<u64, DecodeError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = r.u8(field)?;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(DecodeError("LEB128 number too long"))
}

/// The chunk type and body of one Automerge chunk that is all of `bytes`.
fn chunk(bytes: &[u8]) -> Result<(u8, &[u8]), DecodeError> {
    let mut r = Reader::new(bytes);
    if r.array::<4>("chunk magic")? != CHUNK_MAGIC {
        return Err(DecodeError("not an Automerge chunk"));
    }
    r.take(4, "chunk checksum")?;
    let kind = r.u8("chunk type")?;
    let len = usize::try_from(uleb(&mut r, "chunk length")?)
        .map_err(|_| DecodeError("chunk too long"))?;
    let body = r.take(len, "chunk body")?;
    r.finish("bytes after the chunk")?;
    Ok((kind, body))
}

/// Checks that `bytes` is one uncompressed Automerge change chunk.
pub fn check_change(bytes: &[u8]) -> Result<(), DecodeError> {
    match chunk(bytes)?.0 {
        CHANGE_CHUNK => Ok(()),
        _ => Err(DecodeError("not an uncompressed change chunk")),
    }
}

/// Checks that `bytes` is one Automerge document chunk none of whose columns
/// is DEFLATE-compressed.
pub fn check_document(bytes: &[u8]) -> Result<(), DecodeError> {
    let (kind, body) = chunk(bytes)?;
    if kind != DOCUMENT_CHUNK {
        return Err(DecodeError("not a document chunk"));
    }
    let mut r = Reader::new(body);
    for _ in 0..uleb(&mut r, "actor count")? {
        let len = uleb(&mut r, "actor length")?;
        r.take(
            usize::try_from(len).map_err(|_| DecodeError("actor too long"))?,
            "actor",
        )?;
    }
    let heads = uleb(&mut r, "head count")?;
    r.take(
        usize::try_from(heads.saturating_mul(32)).map_err(|_| DecodeError("too many heads"))?,
        "heads",
    )?;
    for section in ["change columns", "operation columns"] {
        for _ in 0..uleb(&mut r, section)? {
            if uleb(&mut r, "column specification")? & DEFLATE_BIT != 0 {
                return Err(DecodeError(
                    "a compressed column (save snapshots without compression)",
                ));
            }
            uleb(&mut r, "column length")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_truncation_is_an_error() {
        let changes = NotesMessage::Changes(vec![
            (NoteId([1; 16]), vec![b"abc".to_vec(), vec![]]),
            (NoteId([2; 16]), vec![vec![9; 300]]),
        ]);
        let part = NotesMessage::SnapshotPart {
            snapshot: [3; 16],
            part: 1,
            parts: 2,
            data: b"xyz".to_vec(),
        };
        for message in [changes, part] {
            let bytes = message.encode();
            assert_eq!(NotesMessage::decode(&bytes).unwrap(), message);
            for cut in 0..bytes.len() {
                if let Ok(NotesMessage::SnapshotPart { .. }) = NotesMessage::decode(&bytes[..cut]) {
                    continue; // a shorter part is still a part
                }
                assert!(NotesMessage::decode(&bytes[..cut]).is_err(), "cut at {cut}");
            }
        }
    }

    #[test]
    fn big_batches_are_split_and_snapshots_rejoin() {
        let big: Vec<(NoteId, Vec<Vec<u8>>)> = (0..40u8)
            .map(|i| (NoteId([i; 16]), vec![vec![i; 50_000]]))
            .collect();
        let messages = pack_changes(big.clone()).unwrap();
        assert!(messages.len() > 1);
        let mut back = Vec::new();
        for m in &messages {
            assert!(m.encode().len() <= MAX_MESSAGE);
            if let NotesMessage::Changes(notes) = m {
                back.extend(notes.clone());
            }
        }
        assert_eq!(back, big);
        assert_eq!(
            pack_changes(vec![(NoteId([0; 16]), vec![vec![0; MAX_MESSAGE]])]),
            Err(MAX_MESSAGE)
        );

        let records: Vec<(NoteId, Vec<u8>)> = (0..30u8)
            .map(|i| (NoteId([i; 16]), vec![i; 40_000]))
            .collect();
        let parts = split_snapshot([5; 16], &records);
        assert!(parts.len() > 1);
        let mut data = Vec::new();
        for p in &parts {
            if let NotesMessage::SnapshotPart { data: d, .. } = p {
                data.extend_from_slice(d);
            }
        }
        let back: Vec<(NoteId, Vec<u8>)> = snapshot_records(&data)
            .unwrap()
            .into_iter()
            .map(|(id, d)| (id, d.to_vec()))
            .collect();
        assert_eq!(back, records);
    }

    #[test]
    fn only_uncompressed_chunks_pass() {
        use crate::ids::DeviceId;
        use crate::notes::doc::{NoteDoc, NoteEdit};
        let me = DeviceId::from_slice(&[1; 16]).unwrap();
        let edit = NoteEdit {
            body: Some("x".repeat(5000)),
            ..NoteEdit::default()
        };
        let mut doc = NoteDoc::create(me, &edit, 1).unwrap();
        assert!(check_document(&doc.save_uncompressed()).is_ok());
        assert!(
            check_document(&doc.save()).is_err(),
            "a compressed save is refused"
        );
        let changes = doc.changes_since(&[]);
        assert!(check_change(&changes[0]).is_ok());
        assert!(check_document(&changes[0]).is_err());
        assert!(check_change(&doc.save_uncompressed()).is_err());
        let mut compressed = automerge::Change::from_bytes(changes[0].clone()).unwrap();
        let packed = compressed.bytes().to_vec();
        assert_ne!(packed, changes[0], "a 5 KB change compresses");
        assert!(
            check_change(&packed).is_err(),
            "a compressed change is refused"
        );
        assert!(check_change(b"garbage").is_err());
    }
}
