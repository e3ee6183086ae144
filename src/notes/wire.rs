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
/// Most parts a snapshot may have (256 MiB, a relay's default channel quota).
pub const MAX_PARTS: u32 = 512;

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
}
