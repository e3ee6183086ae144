//! Pairing a new device with a short code: code parsing, the CPace-based
//! protocol as pure state machines, and the payloads the two sides exchange.
//!
//! Flow (A shows the code, B types it; the relay only forwards opaque bytes):
//!
//! ```text
//! A: Inviter::start            ── Start(Ya) ──────────────────────▶ B: Joiner::respond
//! A: AwaitingResponse::receive ◀── Response(Yb, Tb, sealed info) ──
//!    (verify Tb, open B's device info, admit B at the relay)
//! A: AwaitingAdmission::finish ── Finish(Ta, sealed welcome) ─────▶ B: AwaitingFinish::receive
//! ```
//!
//! Either side that fails sends `Abort(reason)` instead, and both report the
//! same error. See SECURITY.md for the full construction.

pub mod code;
pub mod error;
pub mod inviter;
pub mod joiner;
pub mod keys;
pub mod message;
pub mod payload;
pub mod session;

pub use code::{Code, CodeError, CodeSecret, Nameplate};
pub use error::PairingError;
pub use inviter::{AwaitingAdmission, AwaitingResponse, Inviter, Paired};
pub use joiner::{AwaitingFinish, Joined, Joiner};
pub use keys::{SID_LEN, Sas, SessionKey, SessionKeys};
pub use message::{AbortReason, Message};
pub use payload::DeviceInfo;
pub use session::{InviterSession, JoinerSession, JoinerStep};
