//! [`Vault`]: the notes of a device's channel, as an app uses them.

use std::time::Duration;

use super::doc::{History, Note, NoteDoc, NoteEdit, NoteId};
use super::store::{self, Op};
use super::wire::{self, NotesMessage};
use crate::client::control::Control;
use crate::client::state::Change;
use crate::client::{ClientError, Device};

/// Longest title, in characters.
pub const MAX_TITLE_CHARS: usize = 200;
/// Longest tag, in characters.
pub const MAX_TAG_CHARS: usize = 64;
/// Largest body, in bytes (an edit must fit in one channel message).
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// Whether a note's latest changes reached the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Saved on this device only; it goes out with the next sync or live
    /// session.
    LocalOnly,
    /// The relay stored every change of it this device made: other devices
    /// get it when they next sync, even if this one is lost.
    Acked,
}

/// What an edit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Saved {
    /// The note.
    pub id: NoteId,
    /// Whether the edit changed anything (an edit to the same text does not).
    pub changed: bool,
    /// Where its changes are: [`Delivery::LocalOnly`] until a sync or session
    /// publishes them (see [`Vault::delivery`]).
    pub delivery: Delivery,
}

/// The notes of a channel on this device. Cheap to clone; every call reads
/// or changes the device's state file, so several processes on one home
/// see each other's edits.
///
/// Edits apply at once, offline too, and are sealed into the outbox in the
/// same transaction; [`Device::sync`] or a live
/// [`Session`](crate::client::Session) publishes them and takes in other
/// devices' edits, which merge whatever order they arrive in.
#[derive(Clone, Debug)]
pub struct Vault {
    device: Device,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Checks what an edit sets; the message says what to change.
fn validate(edit: &NoteEdit) -> Result<(), ClientError> {
    if let Some(title) = &edit.title {
        if title.chars().count() > MAX_TITLE_CHARS {
            return Err(ClientError::Invalid(format!(
                "a title may have at most {MAX_TITLE_CHARS} characters"
            )));
        }
        if title.chars().any(char::is_control) {
            return Err(ClientError::Invalid(
                "a title is one line, without control characters".into(),
            ));
        }
    }
    if let Some(body) = &edit.body
        && body.len() > MAX_BODY_BYTES
    {
        return Err(ClientError::Invalid(format!(
            "a note's body may have at most {} KiB; this one has {} KiB (split it into several notes)",
            MAX_BODY_BYTES / 1024,
            body.len() / 1024
        )));
    }
    for tag in edit.tags.iter().flatten() {
        if tag.is_empty()
            || tag.chars().count() > MAX_TAG_CHARS
            || tag.chars().any(|c| c.is_control() || c == ',')
            || tag.trim() != tag
        {
            return Err(ClientError::Invalid(format!(
                "tag {tag:?} cannot be used: tags are 1 to {MAX_TAG_CHARS} characters, without commas, control characters or spaces at either end"
            )));
        }
    }
    Ok(())
}

/// Seals notes messages into the outbox of `change`, recording which notes
/// each envelope carries.
pub(crate) fn seal_all(
    change: &mut Change<'_>,
    messages: Vec<NotesMessage>,
) -> Result<(), ClientError> {
    for message in messages {
        let notes: Vec<NoteId> = match &message {
            NotesMessage::Changes(notes) => notes.iter().map(|(id, _)| *id).collect(),
            NotesMessage::SnapshotPart { .. } => Vec::new(),
        };
        let seq = crate::client::device::seal_into(change, &Control::Notes(message.encode()))?;
        store::carried(change.conn(), seq, &notes)?;
    }
    Ok(())
}

/// Queues a snapshot of the whole vault (nothing if it holds no note).
pub(crate) fn queue_snapshot(change: &mut Change<'_>) -> Result<usize, ClientError> {
    let me = change.channel.me();
    let parts = store::snapshot(change.conn(), me)?;
    let count = parts.len();
    seal_all(change, parts)?;
    Ok(count)
}

impl Device {
    /// The notes of this device's channel.
    pub fn vault(&self) -> Vault {
        Vault {
            device: self.clone(),
        }
    }
}

impl Vault {
    /// The device it belongs to.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Creates a note; a `None` title is empty.
    pub fn create(&self, edit: NoteEdit) -> Result<Saved, ClientError> {
        Ok(self.apply_many(vec![(None, edit)])?[0])
    }

    /// Edits note `id`: each `Some` field of `edit` is set; a new body is
    /// applied as a diff against the current one, so edits other devices
    /// made to other parts of the text meanwhile are kept.
    pub fn update(&self, id: NoteId, edit: NoteEdit) -> Result<Saved, ClientError> {
        Ok(self.apply_many(vec![(Some(id), edit)])?[0])
    }

    /// Edits note `id` as it was at `base` (the [`Note::version`] the app
    /// read and showed): a new body is diffed against the text of that
    /// version, and what changed since — on this device or others — is kept.
    /// Use this when time passes between reading a note and saving it.
    pub fn update_from(
        &self,
        id: NoteId,
        base: &super::doc::NoteVersion,
        edit: NoteEdit,
    ) -> Result<Saved, ClientError> {
        validate(&edit)?;
        self.op(id, Op::Edit(edit, Some(base.clone())))
    }

    /// Marks note `id` deleted. A deleted note is still in the vault (its
    /// history too): [`restore`](Self::restore) brings it back, with any
    /// edit another device made meanwhile.
    pub fn delete(&self, id: NoteId) -> Result<Saved, ClientError> {
        self.op(id, Op::Delete(true))
    }

    /// Brings a deleted note back.
    pub fn restore(&self, id: NoteId) -> Result<Saved, ClientError> {
        self.op(id, Op::Delete(false))
    }

    fn op(&self, id: NoteId, op: Op) -> Result<Saved, ClientError> {
        let me = self.device.id();
        self.device
            .change(|change| {
                let changes = store::edit(change.conn(), me, id, false, &op, now_ms())?;
                self.seal_changes(change, vec![(id, changes)])
            })
            .map(|mut saved| saved.remove(0))
    }

    /// Creates (`None`) or edits many notes in one transaction: an import,
    /// or a batch of edits an app made while offline. Returns one result per
    /// edit, in order.
    pub fn apply_many(
        &self,
        edits: Vec<(Option<NoteId>, NoteEdit)>,
    ) -> Result<Vec<Saved>, ClientError> {
        for (_, edit) in &edits {
            validate(edit)?;
        }
        let me = self.device.id();
        self.device.change(|change| {
            let now = now_ms();
            let mut all = Vec::with_capacity(edits.len());
            for (id, edit) in &edits {
                let (note, create) = match id {
                    Some(id) => (*id, false),
                    None => (NoteId::random(), true),
                };
                let changes = store::edit(
                    change.conn(),
                    me,
                    note,
                    create,
                    &Op::Edit(edit.clone(), None),
                    now,
                )?;
                all.push((note, changes));
            }
            self.seal_changes(change, all)
        })
    }

    fn seal_changes(
        &self,
        change: &mut Change<'_>,
        notes: Vec<(NoteId, Vec<Vec<u8>>)>,
    ) -> Result<Vec<Saved>, ClientError> {
        let mut saved = Vec::with_capacity(notes.len());
        for (id, changes) in &notes {
            let unsent = !changes.is_empty() || store::unsent(change.conn(), *id)?;
            saved.push(Saved {
                id: *id,
                changed: !changes.is_empty(),
                delivery: if unsent {
                    Delivery::LocalOnly
                } else {
                    Delivery::Acked
                },
            });
        }
        let count: usize = notes.iter().map(|(_, c)| c.len()).sum();
        let notes: Vec<_> = notes.into_iter().filter(|(_, c)| !c.is_empty()).collect();
        if notes.is_empty() {
            return Ok(saved);
        }
        let messages = wire::pack_changes(notes).map_err(|len| {
            ClientError::Invalid(format!(
                "this edit is a change of {} KiB; a channel message holds {} KiB: make it in smaller steps",
                len / 1024,
                wire::MAX_MESSAGE / 1024
            ))
        })?;
        seal_all(change, messages)?;
        let now = crate::client::device::now_secs();
        store::uncovered(change.conn(), count, now)?;
        if store::snapshot_due(change.conn(), self.device.id(), now)? {
            queue_snapshot(change)?;
        }
        Ok(saved)
    }

    /// Note `id`, deleted or not; `None` if this device has never had it.
    pub fn get(&self, id: NoteId) -> Result<Option<Note>, ClientError> {
        Ok(self.doc(id)?.map(|mut doc| doc.view(id)))
    }

    /// Who edited note `id` and how many concurrent edits were merged into it.
    pub fn history(&self, id: NoteId) -> Result<Option<History>, ClientError> {
        Ok(self.doc(id)?.map(|mut doc| doc.history()))
    }

    /// Note `id` as a saved Automerge document: what another Automerge
    /// implementation (the JavaScript one in a browser) loads.
    pub fn document(&self, id: NoteId) -> Result<Option<Vec<u8>>, ClientError> {
        self.device.db().read(|conn| store::saved(conn, id))
    }

    fn doc(&self, id: NoteId) -> Result<Option<NoteDoc>, ClientError> {
        let me = self.device.id();
        match self.document(id)? {
            Some(bytes) => store::open(&bytes, me, id).map(|mut doc| doc.exists().then_some(doc)),
            None => Ok(None),
        }
    }

    /// Every note, deleted ones included (see [`Note::deleted`]), most
    /// recently changed on this device first.
    pub fn list(&self) -> Result<Vec<Note>, ClientError> {
        let me = self.device.id();
        let rows = self.device.db().read(store::all)?;
        let mut notes = Vec::with_capacity(rows.len());
        for (id, bytes, _) in rows {
            let mut doc = store::open(&bytes, me, id)?;
            if doc.exists() {
                notes.push(doc.view(id));
            }
        }
        Ok(notes)
    }

    /// The note whose id starts with `prefix` (hex, at least 4 digits).
    pub fn resolve(&self, prefix: &str) -> Result<NoteId, ClientError> {
        let prefix = prefix.trim().to_ascii_lowercase();
        if prefix.len() < 4 || !prefix.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(ClientError::Invalid(format!(
                "{prefix:?} is not a note id: give at least 4 of its hex digits (see `khub note list`)"
            )));
        }
        let matches: Vec<NoteId> = self
            .device
            .db()
            .read(store::all)?
            .into_iter()
            .map(|(id, _, _)| id)
            .filter(|id| id.to_hex().starts_with(&prefix))
            .collect();
        match matches.as_slice() {
            [id] => Ok(*id),
            [] => Err(ClientError::Invalid(format!(
                "no note on this device has an id starting with {prefix} (see `khub note list`)"
            ))),
            _ => Err(ClientError::Invalid(format!(
                "{} notes have ids starting with {prefix}; give more digits",
                matches.len()
            ))),
        }
    }

    /// Whether this device's changes to note `id` reached the relay.
    pub fn delivery(&self, id: NoteId) -> Result<Delivery, ClientError> {
        let unsent = self.device.db().read(|conn| store::unsent(conn, id))?;
        Ok(if unsent {
            Delivery::LocalOnly
        } else {
            Delivery::Acked
        })
    }

    /// Queues a snapshot of the whole vault for the channel (the SDK does
    /// this by itself: for a device it adds, after many changes, and before
    /// the relay's retention could drop changes no snapshot covers). Returns
    /// how many messages it takes.
    pub fn publish_snapshot(&self) -> Result<usize, ClientError> {
        self.device.change(queue_snapshot)
    }

    /// Notes changed from now on, by this process, another process on the
    /// same home, or other devices (through a sync or session).
    pub fn subscribe(&self) -> Result<Subscription, ClientError> {
        let version = self.device.db().read(store::version)?;
        Ok(Subscription {
            device: self.device.clone(),
            version,
        })
    }
}

/// Changes to a vault, from [`Vault::subscribe`].
#[derive(Debug)]
pub struct Subscription {
    device: Device,
    version: i64,
}

/// How often a subscription looks at the state file for changes another
/// process made.
const POLL: Duration = Duration::from_millis(500);

impl Subscription {
    /// Waits for notes to change; returns their ids (each once).
    pub async fn next(&mut self) -> Result<Vec<NoteId>, ClientError> {
        loop {
            let notified = self.device.inner.changed.notified();
            let after = self.version;
            let (ids, version) = self
                .device
                .blocking(move |device| device.db().read(|conn| store::changed_since(conn, after)))
                .await?;
            if !ids.is_empty() {
                self.version = version;
                return Ok(ids);
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep(POLL) => {}
            }
        }
    }
}
