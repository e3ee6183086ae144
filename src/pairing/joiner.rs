//! Side B of pairing: the new device, into which the code is typed.
//!
//! ```text
//! Start ──▶ Joiner::respond ──Response──▶   (state: AwaitingFinish)
//! Finish ──▶ AwaitingFinish::receive        verifies Ta, opens the welcome ──▶ Joined
//! ```
//!
//! The Response carries B's device info sealed under a key only a holder of the
//! right code can derive, so sending it before A is confirmed reveals nothing to
//! a wrong guesser. Keys and the SAS are released only after Ta verifies.

use crate::crypto::aead;
use crate::crypto::cpace::{self, ELEMENT_LEN, KeyConfirmation};
use crate::crypto::kdf::{AD_INVITER, AD_JOINER, LABEL_DEVICE_INFO, LABEL_WELCOME};

use super::code::Code;
use super::error::PairingError;
use super::keys::{SID_LEN, SessionKeys, with_inputs};
use super::message::Message;
use super::payload::{ChannelWelcome, DeviceInfo};

/// Entry point for side B.
pub struct Joiner;

impl Joiner {
    /// Answers the inviter's Start for the typed `code` and the relay-supplied
    /// `sid`, sealing `me` (this device's info) into the Response.
    pub fn respond<R: rand::CryptoRng + ?Sized>(
        code: &Code,
        sid: [u8; SID_LEN],
        start: &[u8],
        me: &DeviceInfo,
        rng: &mut R,
    ) -> Result<(AwaitingFinish, Vec<u8>), PairingError> {
        let ya = match Message::decode(start)? {
            Message::Start { ya } => ya,
            Message::Abort(reason) => return Err(PairingError::from_abort(reason)),
            other => {
                return Err(PairingError::UnexpectedMessage {
                    expected: "Start",
                    got: other.name(),
                });
            }
        };
        let (isk, yb) = with_inputs(code, &sid, |inputs| {
            cpace::Responder::respond(inputs, ya, AD_INVITER, AD_JOINER, rng)
        })?;
        let confirmation = KeyConfirmation::new(&sid, &isk);
        let keys = SessionKeys::derive(&sid, &isk);
        let aad = [LABEL_DEVICE_INFO, &sid].concat();
        let sealed = aead::seal(keys.b2a.expose(), &aad, &me.encode(), rng);
        let tb = confirmation.tag(&yb, AD_JOINER);
        let message = Message::Response {
            yb: &yb,
            tb: &tb,
            sealed: &sealed,
        }
        .encode();
        let state = AwaitingFinish {
            confirmation,
            ya: *ya,
            sid,
            keys,
        };
        Ok((state, message))
    }
}

/// B sent its Response and waits for A's Finish.
pub struct AwaitingFinish {
    confirmation: KeyConfirmation,
    ya: [u8; ELEMENT_LEN],
    sid: [u8; SID_LEN],
    keys: SessionKeys,
}

impl AwaitingFinish {
    /// Handles the inviter's Finish: verifies Ta, then opens the welcome.
    pub fn receive(self, bytes: &[u8]) -> Result<Joined, PairingError> {
        let (ta, sealed) = match Message::decode(bytes)? {
            Message::Finish { ta, sealed } => (ta, sealed),
            Message::Abort(reason) => return Err(PairingError::from_abort(reason)),
            other => {
                return Err(PairingError::UnexpectedMessage {
                    expected: "Finish",
                    got: other.name(),
                });
            }
        };
        if !self.confirmation.verify(&self.ya, AD_INVITER, ta) {
            return Err(PairingError::ConfirmationFailed);
        }
        let aad = [LABEL_WELCOME, &self.sid].concat();
        let plaintext = aead::open(self.keys.a2b.expose(), &aad, sealed)
            .map_err(|_| PairingError::InvalidPayload("channel welcome (it does not decrypt)"))?;
        let welcome =
            ChannelWelcome::decode(&plaintext).map_err(|e| PairingError::InvalidPayload(e.0))?;
        Ok(Joined {
            keys: self.keys,
            welcome,
        })
    }
}

/// The joiner's result of a completed pairing.
#[derive(Debug)]
pub struct Joined {
    /// The pairing keys and SAS.
    pub keys: SessionKeys,
    /// The channel it joins: its id, where to start reading, and the MLS Welcome.
    pub welcome: ChannelWelcome,
}
