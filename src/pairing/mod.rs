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
//!
//! A whole pairing, both sides in one process (in real use each side runs on
//! its own device and the relay carries the messages):
//!
//! ```
//! use khub::channel::{Channel, Event, Joining};
//! use khub::crypto::os_rng;
//! use khub::ids::{ChannelId, DeviceId};
//! use khub::pairing::{ChannelWelcome, Code, DeviceInfo, Inviter, Joiner, Nameplate};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut rng = os_rng();
//! // A is the only member of a new channel; B is a new phone.
//! let channel_id = ChannelId::random(&mut rng);
//! let mut laptop = Channel::create(channel_id, DeviceId::random(&mut rng), "laptop", 0)?;
//! let phone_id = DeviceId::random(&mut rng);
//! let (phone, key_package) = Joining::start(phone_id, "phone")?;
//!
//! // The relay allocates nameplate 42 and stores A's sid; A shows the code.
//! let code = Code::generate(Nameplate::new(42).expect("in range"), &mut rng);
//! let sid = [7u8; 16];
//! let (inviter, start) = Inviter::start(&code, sid, &mut rng);
//!
//! // The person types the code on B; B answers with its sealed KeyPackage.
//! let typed = Code::parse(&code.display()).expect("valid code");
//! let me = DeviceInfo::new(phone_id, b"B's relay access token", key_package);
//! let (joiner, response) = Joiner::respond(&typed, sid, &start, &me, &mut rng)?;
//!
//! // A checks B's tag, admits B at the relay, and commits the Add; once the
//! // relay has ordered that commit (here: A takes it back in), the Welcome holds.
//! let admission = inviter.receive(&response)?;
//! let (commit, welcome) = laptop.commit_add(phone_id, &admission.joiner().key_package)?;
//! assert!(matches!(laptop.take_in(&commit.envelope, 0).event, Some(Event::OwnCommit(_))));
//! let welcome = ChannelWelcome { channel: channel_id, cursor: 1, welcome };
//! let (finish, paired) = admission.finish(&welcome, &mut rng);
//!
//! // B checks A's tag and joins the channel from the Welcome.
//! let joined = joiner.receive(&finish)?;
//! assert_eq!(paired.keys.sas, joined.keys.sas); // both screens show the same digits
//! let mut phone = phone.join(joined.welcome.channel, &joined.welcome.welcome, 0)?.channel;
//!
//! let note = phone.seal(b"hello from the phone")?;
//! match laptop.take_in(&note.envelope, 0).event {
//!     Some(Event::App { sender, plaintext }) => {
//!         assert_eq!((sender.name.as_str(), plaintext.as_slice()), ("phone", &b"hello from the phone"[..]));
//!     }
//!     other => panic!("not a message: {other:?}"),
//! }
//! # Ok(())
//! # }
//! ```

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
pub use payload::{ChannelWelcome, DeviceInfo};
pub use session::{InviterSession, JoinerSession, JoinerStep};
