//! The client SDK: what an app embeds to be a device of a channel.
//!
//! - [`Device`]: identity, keys and state on disk (one SQLite file, mode 0600);
//!   [`Device::create`] makes a channel, [`join`] pairs into one,
//!   [`Device::invite`] shows a code for another device.
//! - [`Session`]: a live connection that reconnects with backoff and jitter,
//!   resumes from the cursor and resends the outbox; [`Session::send`] and
//!   [`Session::recv`].
//! - [`Device::sync`]: a one-shot catch-up over HTTP for apps that wake briefly.
//! - [`ClientError::is_transient`] tells retryable trouble from errors that
//!   need a person.
//! - [`Device::incidents`]: envelopes refused as tampered, replayed,
//!   reordered or foreign, and gaps (dropped envelopes) — never shown as messages.
//!
//! Every message is sealed before it leaves [`Device::queue`]; the relay only
//! ever sees envelopes. A message accepted by `queue`/`send` is in the durable
//! outbox and is delivered after a crash and restart; the relay stores it once
//! however often it is resent. Received messages wait in the inbox until the
//! app calls [`Device::mark_read`].
//!
//! ```no_run
//! use std::time::Duration;
//! use khub::client::{Device, Sent};
//!
//! # async fn demo() -> Result<(), khub::client::ClientError> {
//! // On the laptop: a new channel, and a code for the phone.
//! let laptop = Device::create("/tmp/laptop".as_ref(), "http://127.0.0.1:3000", "laptop").await?;
//! let invitation = laptop.invite().await?;
//! println!("type this on the phone: {}", invitation.code().as_str());
//! let phone = invitation.complete(Duration::from_secs(300)).await?;
//! println!("paired with {} — check both screens show {}", phone.name, phone.sas);
//!
//! // Send and receive.
//! let session = laptop.connect();
//! if let Sent::Queued = session.send(b"hello from the laptop", Duration::from_secs(10)).await? {
//!     println!("not stored yet (offline, or held back): it stays in the outbox");
//! }
//! let message = session.recv().await?;
//! println!("{}: {}", message.from_name, String::from_utf8_lossy(&message.body));
//! laptop.mark_read(message.seq)?;
//! # Ok(()) }
//! ```

/// The plaintext inside app envelopes (app messages, "joined", notes):
/// public so other SDKs' tests and fuzzers can build and read it.
pub mod control;
pub(crate) mod device;
mod error;
mod http;
pub(crate) mod incident;
mod invite;
mod session;
pub(crate) mod state;
mod tls;

pub use crate::channel::Member;
pub use device::{Device, Message, SyncProgress};
pub use error::{ClientError, Fault, Reach, Source};
pub use http::RelayAddr;
pub use incident::{Incident, IncidentKind};
pub use invite::{CancelInvitation, Invitation, JoinedChannel, NewMember, join};
pub use session::{Sent, Session, Status};
pub use state::{STATE_FILE, forget};
pub use tls::trust_pem_file;
