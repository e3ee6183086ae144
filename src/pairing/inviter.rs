//! Side A of pairing: the channel member that shows the code.
//!
//! ```text
//! Inviter::start ──Start──▶            (state: AwaitingResponse)
//!        ◀──Response── AwaitingResponse::receive   verifies Tb, opens device info
//!                                      (state: AwaitingAdmission; the caller admits
//!                                       the joiner at the relay)
//! AwaitingAdmission::finish ──Finish──▶ Paired
//! ```
//!
//! Nothing is released before Tb verifies: on failure the state is dropped (and
//! its secrets wiped) and the caller sends `Abort` with the error's reason.

use crate::crypto::aead;
use crate::crypto::cpace::{self, KeyConfirmation, TAG_LEN};
use crate::crypto::kdf::{AD_INVITER, AD_JOINER, LABEL_DEVICE_INFO, LABEL_WELCOME};

use super::code::Code;
use super::error::PairingError;
use super::keys::{SID_LEN, SessionKeys, with_inputs};
use super::message::Message;
use super::payload::{ChannelWelcome, DeviceInfo};

/// Entry point for side A.
pub struct Inviter;

impl Inviter {
    /// Starts a pairing for `code` with session id `sid` (16 random bytes the
    /// relay will hand to the joiner). Returns the state and the Start message.
    pub fn start<R: rand::CryptoRng + ?Sized>(
        code: &Code,
        sid: [u8; SID_LEN],
        rng: &mut R,
    ) -> (AwaitingResponse, Vec<u8>) {
        let (cpace, ya) = with_inputs(code, &sid, |inputs| cpace::Initiator::start(inputs, rng));
        let message = Message::Start { ya: &ya }.encode();
        (AwaitingResponse { cpace, sid }, message)
    }
}

/// A sent Start and waits for the joiner's Response.
pub struct AwaitingResponse {
    cpace: cpace::Initiator,
    sid: [u8; SID_LEN],
}

impl AwaitingResponse {
    /// Handles the joiner's Response: derives ISK, verifies Tb, opens the
    /// joiner's device info. An Abort from the joiner ends the pairing too.
    pub fn receive(self, bytes: &[u8]) -> Result<AwaitingAdmission, PairingError> {
        let (yb, tb, sealed) = match Message::decode(bytes)? {
            Message::Response { yb, tb, sealed } => (yb, tb, sealed),
            Message::Abort(reason) => return Err(PairingError::from_abort(reason)),
            other => {
                return Err(PairingError::UnexpectedMessage {
                    expected: "Response",
                    got: other.name(),
                });
            }
        };
        let ya = *self.cpace.share();
        if yb == &ya {
            // Our own share reflected back: never a real joiner.
            return Err(PairingError::InvalidShare(cpace::CpaceError::InvalidPoint));
        }
        let isk = self.cpace.finish(AD_INVITER, yb, AD_JOINER)?;
        let confirmation = KeyConfirmation::new(&self.sid, &isk);
        if !confirmation.verify(yb, AD_JOINER, tb) {
            return Err(PairingError::ConfirmationFailed);
        }
        let keys = SessionKeys::derive(&self.sid, &isk);
        let aad = [LABEL_DEVICE_INFO, &self.sid].concat();
        let info = aead::open(keys.b2a.expose(), &aad, sealed)
            .map_err(|_| PairingError::InvalidPayload("device info (it does not decrypt)"))?;
        let joiner = DeviceInfo::decode(&info).map_err(|e| PairingError::InvalidPayload(e.0))?;
        Ok(AwaitingAdmission {
            ta: confirmation.tag(&ya, AD_INVITER),
            sid: self.sid,
            keys,
            joiner,
        })
    }
}

/// A confirmed the joiner and knows who it is; the caller admits it at the
/// relay, adds it to the channel, then calls [`finish`](Self::finish).
pub struct AwaitingAdmission {
    ta: [u8; TAG_LEN],
    sid: [u8; SID_LEN],
    keys: SessionKeys,
    joiner: DeviceInfo,
}

impl AwaitingAdmission {
    /// The joiner's device info (id, token hash, KeyPackage).
    pub fn joiner(&self) -> &DeviceInfo {
        &self.joiner
    }

    /// The short authentication string; both screens show the same one.
    pub fn sas(&self) -> &super::keys::Sas {
        &self.keys.sas
    }

    /// Seals `welcome` to the joiner and returns the Finish message.
    pub fn finish<R: rand::CryptoRng + ?Sized>(
        self,
        welcome: &ChannelWelcome,
        rng: &mut R,
    ) -> (Vec<u8>, Paired) {
        let aad = [LABEL_WELCOME, &self.sid].concat();
        let sealed = aead::seal(self.keys.a2b.expose(), &aad, &welcome.encode(), rng);
        let message = Message::Finish {
            ta: &self.ta,
            sealed: &sealed,
        }
        .encode();
        let paired = Paired {
            keys: self.keys,
            joiner: self.joiner,
        };
        (message, paired)
    }
}

/// The inviter's result of a completed pairing.
#[derive(Debug)]
pub struct Paired {
    /// The pairing keys and SAS.
    pub keys: SessionKeys,
    /// Who joined.
    pub joiner: DeviceInfo,
}
