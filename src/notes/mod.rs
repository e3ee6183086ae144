//! Notes that sync: a vault of notes per channel, each an Automerge document,
//! edited offline on any device and merged on every device.
//!
//! - [`Vault`] ([`Device::vault`](crate::client::Device::vault)): create,
//!   edit, delete and restore notes, list them, get one, subscribe to
//!   changes, and see whether a change reached the relay ([`Delivery`]).
//! - Edits apply at once to the device's own store and are sealed into the
//!   channel as Automerge changes ([`wire`]); received changes merge in any
//!   order, each once. The relay sees only envelopes.
//! - Snapshots: a device that adds another publishes the whole vault for it
//!   (MLS gives a new device no earlier epoch, so history sealed before it
//!   joined is unreadable to it); any device publishes one after
//!   [`SNAPSHOT_AFTER_CHANGES`] changes, or
//!   when the oldest change no snapshot covers is half way to the relay's
//!   retention, so a device that falls behind the relay's retention still
//!   gets every note.
//! - The merge rules are in [`doc`].
//!
//! ```no_run
//! use khub::client::Device;
//! use khub::notes::NoteEdit;
//!
//! # async fn demo() -> Result<(), khub::client::ClientError> {
//! let phone = Device::open("/tmp/phone".as_ref())?;
//! let vault = phone.vault();
//! let saved = vault.create(NoteEdit {
//!     title: Some("Groceries".into()),
//!     body: Some("milk\neggs\n".into()),
//!     tags: Some(vec!["home".into()]),
//! })?;
//! phone.sync().await?; // publishes the change; takes in other devices' edits
//! println!("{:?}", vault.delivery(saved.id)?);
//! for note in vault.list()? {
//!     println!("{} {}", note.id, note.title);
//! }
//! # Ok(()) }
//! ```

pub mod doc;
pub(crate) mod store;
pub(crate) mod vault;
pub mod wire;

pub use doc::{History, Note, NoteEdit, NoteId, NoteVersion};
pub use store::SNAPSHOT_AFTER_CHANGES;
pub use vault::{
    Delivery, MAX_BODY_BYTES, MAX_TAG_CHARS, MAX_TITLE_CHARS, Saved, Subscription, Vault,
};
