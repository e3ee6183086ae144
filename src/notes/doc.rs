//! One note as an Automerge document: the schema, edits, and reading it back.
//! Pure: no I/O, no clock (callers pass the time).
//!
//! The document's root map, readable by any Automerge implementation
//! (`@automerge/automerge` in a browser included):
//!
//! | key       | type                           | merge rule                                  |
//! |-----------|--------------------------------|---------------------------------------------|
//! | `title`   | string                         | concurrent titles: one wins on every device (Automerge's rule: the greater operation id), the others stay readable as conflicts until the next retitle |
//! | `body`    | text                           | character by character; a whole new body is applied as a diff |
//! | `tags`    | map of tag → `true`            | per tag: adds and removes of different tags both hold |
//! | `created` | timestamp (ms)                 | set once                                    |
//! | `updated` | timestamp (ms)                 | the winner of concurrent edits, like `title` |
//! | `deleted` | boolean                        | delete wins over a concurrent edit: the note stays deleted, and the edit is merged into it, so nothing is lost (`restore` brings it back with the edit) |
//!
//! Each device writes as Automerge actor = its device id, so every change
//! names the member who made it, and the SDK refuses a change whose actor is
//! not the MLS-authenticated sender of the envelope that carried it.

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{
    ActorId, AutoCommit, Change, ChangeHash, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value,
};

use crate::ids::DeviceId;

/// Length of a note id.
pub const NOTE_ID_LEN: usize = 16;

/// A note's id: 16 random bytes, shown as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NoteId(pub [u8; NOTE_ID_LEN]);

impl NoteId {
    /// A fresh random id.
    pub fn random() -> Self {
        Self(crate::crypto::secret::random_array(
            &mut crate::crypto::os_rng(),
        ))
    }

    /// From 16 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    /// Its 32 hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl std::fmt::Display for NoteId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl std::fmt::Debug for NoteId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NoteId({})", self.to_hex())
    }
}

/// What an edit changes; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoteEdit {
    /// The new title (one line).
    pub title: Option<String>,
    /// The new body: applied as a diff against the current text.
    pub body: Option<String>,
    /// The new set of tags.
    pub tags: Option<Vec<String>>,
}

/// A note as the app shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Note {
    /// Its id.
    #[serde(serialize_with = "hex_id")]
    pub id: NoteId,
    /// The title every device shows.
    pub title: String,
    /// Titles set concurrently that lost to `title` (empty unless two devices
    /// retitled the note at once and nobody retitled it since).
    pub other_titles: Vec<String>,
    /// The text.
    pub body: String,
    /// Tags, sorted.
    pub tags: Vec<String>,
    /// When it was created (ms since the Unix epoch, the creator's clock).
    pub created_ms: i64,
    /// When it was last edited (ms, the editor's clock).
    pub updated_ms: i64,
    /// Whether it was deleted (it can be restored).
    pub deleted: bool,
    /// The version read: pass it to
    /// [`Vault::update_from`](super::Vault::update_from) so that an edit
    /// made on this copy keeps what changed meanwhile.
    #[serde(skip)]
    pub version: NoteVersion,
}

/// A version of a note (the Automerge heads it was read at).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoteVersion(pub(crate) Vec<ChangeHash>);

fn hex_id<S: serde::Serializer>(id: &NoteId, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&id.to_hex())
}

/// Who edited a note, and whether concurrent edits were merged into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    /// Changes in the note's history.
    pub changes: usize,
    /// The devices (Automerge actors) that made them, in order of first change.
    pub editors: Vec<DeviceId>,
    /// How many times edits made at once on different devices were merged:
    /// changes built on more than one earlier change, plus branches not yet
    /// joined by a later edit.
    pub merges: usize,
}

/// A document that is not a note (it failed to load, or a change did not
/// apply).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NoteError(pub String);

impl From<automerge::AutomergeError> for NoteError {
    fn from(e: automerge::AutomergeError) -> Self {
        Self(e.to_string())
    }
}

/// One note's Automerge document, written as one device.
pub struct NoteDoc {
    doc: AutoCommit,
}

impl NoteDoc {
    /// A new note written by `author` at `now_ms`.
    pub fn create(author: DeviceId, edit: &NoteEdit, now_ms: i64) -> Result<Self, NoteError> {
        let mut doc = AutoCommit::new().with_actor(ActorId::from(author.as_bytes().as_slice()));
        doc.put(ROOT, "title", edit.title.clone().unwrap_or_default())?;
        doc.put_object(ROOT, "body", ObjType::Text)?;
        doc.put_object(ROOT, "tags", ObjType::Map)?;
        doc.put(ROOT, "created", ScalarValue::Timestamp(now_ms))?;
        doc.put(ROOT, "deleted", false)?;
        let mut note = Self { doc };
        note.apply_edit(
            &NoteEdit {
                title: None,
                ..edit.clone()
            },
            now_ms,
        )?;
        note.doc
            .commit_with(CommitOptions::default().with_time(now_ms / 1000));
        Ok(note)
    }

    /// An empty document, for a note this device knows only from changes.
    pub fn empty(author: DeviceId) -> Self {
        Self {
            doc: AutoCommit::new().with_actor(ActorId::from(author.as_bytes().as_slice())),
        }
    }

    /// A saved document, to be written as `author`.
    pub fn load(bytes: &[u8], author: DeviceId) -> Result<Self, NoteError> {
        let doc = AutoCommit::load(bytes)?.with_actor(ActorId::from(author.as_bytes().as_slice()));
        Ok(Self { doc })
    }

    /// Applies `edit` as one change; returns whether anything changed.
    pub fn edit(&mut self, edit: &NoteEdit, now_ms: i64) -> Result<bool, NoteError> {
        self.apply_edit(edit, now_ms)?;
        Ok(self.commit(now_ms))
    }

    /// Applies `edit` as if made on `base` (an earlier version of this
    /// document): a new body is diffed against the text of `base`, then the
    /// change merges with everything made since, so an edit that took a while
    /// (in an editor) does not undo changes that arrived meanwhile.
    pub fn edit_from(
        &mut self,
        base: &NoteVersion,
        edit: &NoteEdit,
        now_ms: i64,
    ) -> Result<bool, NoteError> {
        if base.0.is_empty() {
            return Err(NoteError(
                "an edit needs the version it started from (the version of a note read from the vault)".into(),
            ));
        }
        if let Some(unknown) = base
            .0
            .iter()
            .find(|h| self.doc.get_change_by_hash(h).is_none())
        {
            return Err(NoteError(format!(
                "the version the edit started from ({unknown}) is not in this note"
            )));
        }
        self.doc.isolate(&base.0);
        let applied = self.apply_edit(edit, now_ms);
        let changed = applied.is_ok() && self.commit(now_ms);
        if applied.is_err() {
            self.doc.rollback();
        }
        self.doc.integrate();
        applied.map(|()| changed)
    }

    /// Marks the note deleted or restores it; returns whether that changed
    /// anything.
    pub fn set_deleted(&mut self, deleted: bool, now_ms: i64) -> Result<bool, NoteError> {
        if self.view_deleted() == deleted {
            return Ok(false);
        }
        self.doc.put(ROOT, "deleted", deleted)?;
        self.doc
            .put(ROOT, "updated", ScalarValue::Timestamp(now_ms))?;
        Ok(self.commit(now_ms))
    }

    fn commit(&mut self, now_ms: i64) -> bool {
        if self.doc.pending_ops() == 0 {
            // Nothing to record: no empty change.
            self.doc.rollback();
            return false;
        }
        self.doc
            .commit_with(CommitOptions::default().with_time(now_ms / 1000))
            .is_some()
    }

    fn apply_edit(&mut self, edit: &NoteEdit, now_ms: i64) -> Result<(), NoteError> {
        if let Some(title) = &edit.title
            && self.scalar_str("title").as_deref() != Some(title.as_str())
        {
            self.doc.put(ROOT, "title", title.as_str())?;
        }
        if let Some(body) = &edit.body {
            let text = self.object("body", ObjType::Text)?;
            if self.doc.text(&text)? != *body {
                self.doc.update_text(&text, body)?;
            }
        }
        if let Some(tags) = &edit.tags {
            let map = self.object("tags", ObjType::Map)?;
            let current: Vec<String> = self.doc.keys(&map).collect();
            for old in &current {
                if !tags.contains(old) {
                    self.doc.delete(&map, old.as_str())?;
                }
            }
            for tag in tags {
                if !current.contains(tag) {
                    self.doc.put(&map, tag.as_str(), true)?;
                }
            }
        }
        if self.doc.pending_ops() > 0 {
            self.doc
                .put(ROOT, "updated", ScalarValue::Timestamp(now_ms))?;
        }
        Ok(())
    }

    /// The object under `key`, made if missing or of another type (a
    /// hostile document cannot make an edit fail).
    fn object(&mut self, key: &str, kind: ObjType) -> Result<ObjId, NoteError> {
        match self.doc.get(ROOT, key)? {
            Some((Value::Object(found), id)) if found == kind => Ok(id),
            _ => Ok(self.doc.put_object(ROOT, key, kind)?),
        }
    }

    fn scalar_str(&self, key: &str) -> Option<String> {
        match self.doc.get(ROOT, key).ok()?? {
            (Value::Scalar(v), _) => match v.as_ref() {
                ScalarValue::Str(s) => Some(s.to_string()),
                _ => None,
            },
            _ => None,
        }
    }

    fn scalar_time(&self, key: &str) -> i64 {
        match self.doc.get(ROOT, key) {
            Ok(Some((Value::Scalar(v), _))) => match v.as_ref() {
                ScalarValue::Timestamp(t) | ScalarValue::Int(t) => *t,
                _ => 0,
            },
            _ => 0,
        }
    }

    fn view_deleted(&self) -> bool {
        matches!(
            self.doc.get(ROOT, "deleted"),
            Ok(Some((Value::Scalar(v), _))) if matches!(v.as_ref(), ScalarValue::Boolean(true))
        )
    }

    /// Whether the document holds a note: at least one change applied (a
    /// document known only from changes whose history is missing holds none).
    pub fn exists(&mut self) -> bool {
        !self.doc.get_heads().is_empty()
    }

    /// The note as an app shows it. Fields of an unexpected type (a member's
    /// bug or malice) read as empty.
    pub fn view(&mut self, id: NoteId) -> Note {
        let title = self.scalar_str("title").unwrap_or_default();
        let other_titles = self
            .doc
            .get_all(ROOT, "title")
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(v, _)| match v {
                Value::Scalar(s) => match s.as_ref() {
                    ScalarValue::Str(s) if s.as_str() != title => Some(s.to_string()),
                    _ => None,
                },
                Value::Object(_) => None,
            })
            .collect();
        let body = match self.doc.get(ROOT, "body") {
            Ok(Some((Value::Object(ObjType::Text), text))) => {
                self.doc.text(&text).unwrap_or_default()
            }
            _ => String::new(),
        };
        let mut tags: Vec<String> = match self.doc.get(ROOT, "tags") {
            Ok(Some((Value::Object(ObjType::Map), map))) => self.doc.keys(&map).collect(),
            _ => Vec::new(),
        };
        tags.sort();
        Note {
            version: NoteVersion(self.doc.get_heads()),
            id,
            title,
            other_titles,
            body,
            tags,
            created_ms: self.scalar_time("created"),
            updated_ms: self.scalar_time("updated"),
            deleted: self.view_deleted(),
        }
    }

    /// Who wrote the note's history, and how many merges it holds.
    pub fn history(&mut self) -> History {
        let heads = self.doc.get_heads().len();
        let changes = self.doc.get_changes(&[]);
        let mut editors: Vec<DeviceId> = Vec::new();
        let mut merges = heads.saturating_sub(1);
        for change in &changes {
            if change.deps().len() > 1 {
                merges += 1;
            }
            if let Some(id) = DeviceId::from_slice(change.actor_id().to_bytes())
                && !editors.contains(&id)
            {
                editors.push(id);
            }
        }
        History {
            changes: changes.len(),
            editors,
            merges,
        }
    }

    /// The document's heads (the changes nothing else builds on yet).
    pub fn heads(&mut self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    /// The changes made since `heads`, each as its own bytes.
    pub fn changes_since(&mut self, heads: &[ChangeHash]) -> Vec<Vec<u8>> {
        self.doc
            .get_changes(heads)
            .iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect()
    }

    /// Applies changes another device made (in any order; duplicates are
    /// ignored; a change whose predecessors are missing waits inside the
    /// document until they come, see [`missing`](Self::missing)).
    pub fn apply(&mut self, changes: Vec<Change>) -> Result<(), NoteError> {
        Ok(self.doc.apply_changes(changes)?)
    }

    /// Merges a saved document (a snapshot) into this one.
    pub fn merge_saved(&mut self, saved: &[u8]) -> Result<(), NoteError> {
        self.doc.load_incremental(saved)?;
        Ok(())
    }

    /// The whole document without compressed columns: what a snapshot
    /// carries (receivers refuse to inflate anything a member sends).
    pub fn save_uncompressed(&mut self) -> Vec<u8> {
        self.doc.save_nocompress()
    }

    /// Whether a change is in this document.
    pub fn has(&mut self, hash: &ChangeHash) -> bool {
        self.doc.get_change_by_hash(hash).is_some()
    }

    /// Changes this document was given whose predecessors it has not seen.
    pub fn missing(&mut self) -> Vec<ChangeHash> {
        self.doc.get_missing_deps(&[])
    }

    /// The whole document, compacted (Automerge's binary format), with its
    /// changes in one canonical order: every device that holds the same
    /// changes, however they arrived, holds the same bytes.
    pub fn save(&mut self) -> Vec<u8> {
        let changes = self.doc.get_changes(&[]);
        let order = canonical_order(&changes);
        if order.iter().enumerate().all(|(i, &j)| i == j) {
            return self.doc.save();
        }
        let mut slots: Vec<Option<Change>> = changes.into_iter().map(Some).collect();
        let ordered: Vec<Change> = order.into_iter().filter_map(|i| slots[i].take()).collect();
        let mut fresh = AutoCommit::new();
        match fresh.apply_changes(ordered) {
            Ok(()) => fresh.save(),
            // Cannot happen for changes one document holds; never lose the note.
            Err(_) => self.doc.save(),
        }
    }
}

/// Indexes of `changes` (a whole history, dependencies first) in canonical
/// order: a topological order that, among changes whose dependencies are all
/// placed, places the smallest hash first.
fn canonical_order(changes: &[Change]) -> Vec<usize> {
    use std::collections::{BTreeMap, HashMap};
    let index: HashMap<ChangeHash, usize> = changes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.hash(), i))
        .collect();
    let mut waiting: Vec<usize> = vec![0; changes.len()];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); changes.len()];
    for (i, change) in changes.iter().enumerate() {
        for dep in change.deps() {
            if let Some(&d) = index.get(dep) {
                waiting[i] += 1;
                dependents[d].push(i);
            }
        }
    }
    let mut ready: BTreeMap<ChangeHash, usize> = changes
        .iter()
        .enumerate()
        .filter(|(i, _)| waiting[*i] == 0)
        .map(|(i, c)| (c.hash(), i))
        .collect();
    let mut order = Vec::with_capacity(changes.len());
    while let Some((_, i)) = ready.pop_first() {
        order.push(i);
        for &next in &dependents[i] {
            waiting[next] -= 1;
            if waiting[next] == 0 {
                ready.insert(changes[next].hash(), next);
            }
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(n: u8) -> DeviceId {
        DeviceId::from_slice(&[n; 16]).unwrap()
    }

    fn body(text: &str) -> NoteEdit {
        NoteEdit {
            body: Some(text.into()),
            ..NoteEdit::default()
        }
    }

    /// Two copies of one note edited apart, then each given the other's changes.
    fn fork_and_merge(
        base: &NoteEdit,
        left: impl FnOnce(&mut NoteDoc),
        right: impl FnOnce(&mut NoteDoc),
    ) -> (NoteDoc, NoteDoc) {
        let id = NoteId([7; 16]);
        let mut a = NoteDoc::create(device(1), base, 1_000).unwrap();
        let saved = a.save();
        let mut b = NoteDoc::load(&saved, device(2)).unwrap();
        let start = a.heads();
        left(&mut a);
        right(&mut b);
        let from_a: Vec<Change> = a.doc.get_changes(&start);
        let from_b: Vec<Change> = b.doc.get_changes(&start);
        a.apply(from_b).unwrap();
        b.apply(from_a).unwrap();
        assert_eq!(a.view(id), b.view(id));
        assert_eq!(a.save(), b.save(), "both hold the same bytes");
        (a, b)
    }

    #[test]
    fn edits_to_different_lines_both_hold() {
        let (mut a, _) = fork_and_merge(
            &body("one\ntwo\nthree\n"),
            |a| {
                a.edit(&body("ONE\ntwo\nthree\n"), 2).unwrap();
            },
            |b| {
                b.edit(&body("one\ntwo\nTHREE\n"), 3).unwrap();
            },
        );
        assert_eq!(a.view(NoteId([0; 16])).body, "ONE\ntwo\nTHREE\n");
    }

    #[test]
    fn delete_wins_and_keeps_the_concurrent_edit() {
        let (mut a, _) = fork_and_merge(
            &body("draft"),
            |a| {
                a.set_deleted(true, 2).unwrap();
            },
            |b| {
                b.edit(&body("draft, edited"), 3).unwrap();
            },
        );
        let note = a.view(NoteId([0; 16]));
        assert!(note.deleted);
        assert_eq!(note.body, "draft, edited");
    }

    #[test]
    fn concurrent_titles_pick_one_and_keep_the_other_visible() {
        let title = |t: &str| NoteEdit {
            title: Some(t.into()),
            ..NoteEdit::default()
        };
        let (mut a, _) = fork_and_merge(
            &title("plan"),
            |a| {
                a.edit(&title("Plan A"), 2).unwrap();
            },
            |b| {
                b.edit(&title("Plan B"), 3).unwrap();
            },
        );
        let note = a.view(NoteId([0; 16]));
        // The greater actor id wins ties of the same counter: device 2.
        assert_eq!(note.title, "Plan B");
        assert_eq!(note.other_titles, vec!["Plan A".to_owned()]);
        assert_eq!(a.history().merges, 1);
        a.edit(&title("Plan C"), 4).unwrap();
        assert!(a.view(NoteId([0; 16])).other_titles.is_empty());
    }

    #[test]
    fn an_edit_from_an_older_version_keeps_what_changed_since() {
        let id = NoteId([0; 16]);
        let mut a = NoteDoc::create(device(1), &body("one\n"), 1).unwrap();
        let seen = a.view(id);
        // Meanwhile another edit lands.
        a.edit(&body("one\ntwo\n"), 2).unwrap();
        // The editor saves what it showed plus its own line.
        a.edit_from(&seen.version, &body("zero\none\n"), 3).unwrap();
        assert_eq!(a.view(id).body, "zero\none\ntwo\n");
        let unknown = NoteVersion(vec![ChangeHash([9; 32])]);
        assert!(a.edit_from(&unknown, &body("x"), 4).is_err());
        assert!(a.edit_from(&NoteVersion::default(), &body("x"), 4).is_err());
        assert_eq!(a.view(id).body, "zero\none\ntwo\n");
    }

    #[test]
    fn an_unchanged_edit_makes_no_change() {
        let mut a = NoteDoc::create(device(1), &body("same"), 1).unwrap();
        let before = a.heads();
        assert!(!a.edit(&body("same"), 2).unwrap());
        assert_eq!(a.heads(), before);
    }
}
