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
//! use khub::channel::{Keyring, Member};
//! use khub::crypto::os_rng;
//! use khub::crypto::pairwise::DeviceSecret;
//! use khub::ids::{ChannelId, DeviceId};
//! use khub::pairing::{Code, DeviceInfo, Inviter, Joiner, Nameplate};
//!
//! # fn main() -> Result<(), khub::pairing::PairingError> {
//! let mut rng = os_rng();
//! let device = |name: &str, rng: &mut _| {
//!     let secret = DeviceSecret::generate(rng);
//!     let member = Member { id: DeviceId::random(rng), public_key: secret.public_key(), name: name.into() };
//!     (member, secret)
//! };
//! // A is the only member of a new channel; B is a new phone.
//! let (laptop, laptop_secret) = device("laptop", &mut rng);
//! let (phone, phone_secret) = device("phone", &mut rng);
//! let mut keyring = Keyring::create(ChannelId::random(&mut rng), laptop, laptop_secret, &mut rng);
//!
//! // The relay allocates nameplate 42 and stores A's sid; A shows the code.
//! let code = Code::generate(Nameplate::new(42).expect("in range"), &mut rng);
//! let sid = [7u8; 16];
//! let (inviter, start) = Inviter::start(&code, sid, &mut rng);
//!
//! // The person types the code on B; B answers with its sealed device info.
//! let typed = Code::parse(&code.display()).expect("valid code");
//! let me = DeviceInfo::new(phone.clone(), b"B's relay access token");
//! let (joiner, response) = Joiner::respond(&typed, sid, &start, &me, &mut rng)?;
//!
//! // A checks B's tag, admits B, and sends the welcome.
//! let admission = inviter.receive(&response)?;
//! keyring.add_member(admission.joiner().member.clone()).expect("room in the channel");
//! let (finish, paired) = admission.finish(&keyring.welcome(), &mut rng);
//!
//! // B checks A's tag and joins the channel.
//! let joined = joiner.receive(&finish)?;
//! assert_eq!(paired.keys.sas, joined.keys.sas); // both screens show the same digits
//! let mut phone_keyring = Keyring::from_welcome(joined.welcome, phone.id, phone_secret).expect("listed");
//!
//! let note = phone_keyring.seal(b"hello from the phone", &mut rng).expect("small enough");
//! assert_eq!(keyring.open(&note).expect("opens").plaintext, b"hello from the phone");
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
pub use payload::DeviceInfo;
pub use session::{InviterSession, JoinerSession, JoinerStep};
