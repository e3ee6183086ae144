//! One pairing per side as a single value, for I/O layers that receive bytes
//! and must route them to whatever state the pairing is in.
//!
//! The typed states in [`inviter`](super::inviter) and [`joiner`](super::joiner)
//! make misuse impossible at compile time; these wrappers add the run-time rule
//! for bytes from the network: any message that arrives out of order or twice,
//! and any error, ends the pairing for good (the code is burned).

use super::code::Code;
use super::error::PairingError;
use super::inviter::{AwaitingAdmission, AwaitingResponse, Inviter, Paired};
use super::joiner::{AwaitingFinish, Joined, Joiner};
use super::keys::SID_LEN;
use super::message::Message;
use super::payload::DeviceInfo;

/// Side A's pairing, whatever state it is in.
pub enum InviterSession {
    /// Waiting for the joiner's Response.
    AwaitingResponse(AwaitingResponse),
    /// Joiner confirmed; waiting for the caller to admit it and call `finish`.
    AwaitingAdmission(AwaitingAdmission),
    /// Completed or failed; accepts nothing more.
    Ended,
}

impl InviterSession {
    /// Starts a pairing; see [`Inviter::start`].
    pub fn start<R: rand::CryptoRng + ?Sized>(
        code: &Code,
        sid: [u8; SID_LEN],
        rng: &mut R,
    ) -> (Self, Vec<u8>) {
        let (state, message) = Inviter::start(code, sid, rng);
        (Self::AwaitingResponse(state), message)
    }

    /// Feeds a message from the joiner. Returns the joiner's device info once
    /// confirmed; any other message or failure ends the session.
    pub fn receive(&mut self, bytes: &[u8]) -> Result<&DeviceInfo, PairingError> {
        match std::mem::replace(self, Self::Ended) {
            Self::AwaitingResponse(state) => {
                *self = Self::AwaitingAdmission(state.receive(bytes)?);
                match self {
                    Self::AwaitingAdmission(state) => Ok(state.joiner()),
                    _ => unreachable!("just set"),
                }
            }
            Self::AwaitingAdmission(_) => Err(unexpected(bytes, "nothing (admission pending)")),
            Self::Ended => Err(PairingError::Ended),
        }
    }

    /// Sends the welcome; see [`AwaitingAdmission::finish`].
    pub fn finish<R: rand::CryptoRng + ?Sized>(
        &mut self,
        welcome: &super::payload::ChannelWelcome,
        rng: &mut R,
    ) -> Result<(Vec<u8>, Paired), PairingError> {
        match std::mem::replace(self, Self::Ended) {
            Self::AwaitingAdmission(state) => Ok(state.finish(welcome, rng)),
            _ => Err(PairingError::Ended),
        }
    }
}

/// Side B's pairing, whatever state it is in.
pub enum JoinerSession {
    /// Waiting for the inviter's Start (the code and sid are known).
    AwaitingStart {
        /// The typed code.
        code: Code,
        /// The relay-supplied session id.
        sid: [u8; SID_LEN],
        /// This device's info, sealed into the Response.
        me: Box<DeviceInfo>,
    },
    /// Sent the Response; waiting for Finish.
    AwaitingFinish(AwaitingFinish),
    /// Completed or failed; accepts nothing more.
    Ended,
}

/// What feeding a message to a [`JoinerSession`] produced.
#[derive(Debug)]
pub enum JoinerStep {
    /// Send this Response to the inviter.
    Respond(Vec<u8>),
    /// Pairing complete.
    Joined(Box<Joined>),
}

impl JoinerSession {
    /// A joiner that will answer the Start of the pairing at `code`'s nameplate.
    pub fn new(code: Code, sid: [u8; SID_LEN], me: DeviceInfo) -> Self {
        Self::AwaitingStart {
            code,
            sid,
            me: Box::new(me),
        }
    }

    /// Feeds a message from the inviter; any out-of-order message or failure
    /// ends the session.
    pub fn receive<R: rand::CryptoRng + ?Sized>(
        &mut self,
        bytes: &[u8],
        rng: &mut R,
    ) -> Result<JoinerStep, PairingError> {
        match std::mem::replace(self, Self::Ended) {
            Self::AwaitingStart { code, sid, me } => {
                let (state, response) = Joiner::respond(&code, sid, bytes, &me, rng)?;
                *self = Self::AwaitingFinish(state);
                Ok(JoinerStep::Respond(response))
            }
            Self::AwaitingFinish(state) => Ok(JoinerStep::Joined(Box::new(state.receive(bytes)?))),
            Self::Ended => Err(PairingError::Ended),
        }
    }
}

/// The error for a message that arrived when none was expected.
fn unexpected(bytes: &[u8], expected: &'static str) -> PairingError {
    match Message::decode(bytes) {
        Ok(message) => PairingError::UnexpectedMessage {
            expected,
            got: message.name(),
        },
        Err(e) => PairingError::Malformed(e),
    }
}
