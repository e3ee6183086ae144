//! Why a pairing failed, in words the person at the screen can act on.

use crate::codec::DecodeError;
use crate::crypto::cpace::CpaceError;

use super::message::AbortReason;

/// A failed pairing. Every variant ends the pairing: the code is used up on both
/// sides and a new one must be made. None carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PairingError {
    /// Key confirmation failed on this side or the other: wrong code, or an
    /// active attacker (possibly the relay) used up its one guess.
    #[error("key confirmation failed: the code was wrong, or someone interfered — make a new code")]
    ConfirmationFailed,
    /// A message did not parse.
    #[error("received a malformed pairing message ({0}); make a new code")]
    Malformed(DecodeError),
    /// A valid message arrived at the wrong time (out of order or duplicated).
    #[error("received a {got} message while waiting for {expected}; make a new code")]
    UnexpectedMessage {
        /// What this side was waiting for.
        expected: &'static str,
        /// What arrived.
        got: &'static str,
    },
    /// The peer's CPace share is not a usable group element.
    #[error(
        "the other device's key share is invalid ({0}); someone may be interfering — make a new code"
    )]
    InvalidShare(CpaceError),
    /// The peer passed key confirmation but sent a payload that does not open or
    /// parse: a broken or malicious implementation.
    #[error("the other device's pairing payload was refused: {0}; make a new code")]
    InvalidPayload(&'static str),
    /// The peer sent an Abort.
    #[error("the other device stopped the pairing: {0}; make a new code")]
    PeerAborted(AbortReason),
    /// The pairing already ended (completed or failed).
    #[error("this pairing has already ended; make a new code")]
    Ended,
}

impl PairingError {
    /// The reason to put in the Abort this side sends to the other.
    pub fn abort_reason(&self) -> AbortReason {
        match self {
            Self::ConfirmationFailed => AbortReason::ConfirmationFailed,
            Self::PeerAborted(reason) => *reason,
            Self::Ended => AbortReason::Cancelled,
            Self::Malformed(_)
            | Self::UnexpectedMessage { .. }
            | Self::InvalidShare(_)
            | Self::InvalidPayload(_) => AbortReason::InvalidMessage,
        }
    }

    /// Whether the code was wrong or an attacker interfered: the one outcome a
    /// user should be told about in those words.
    pub fn is_wrong_code_or_attack(&self) -> bool {
        matches!(
            self,
            Self::ConfirmationFailed | Self::PeerAborted(AbortReason::ConfirmationFailed)
        )
    }

    pub(crate) fn from_abort(reason: AbortReason) -> Self {
        match reason {
            // Both screens give the same advice whichever side noticed.
            AbortReason::ConfirmationFailed => Self::ConfirmationFailed,
            other => Self::PeerAborted(other),
        }
    }
}

impl From<DecodeError> for PairingError {
    fn from(e: DecodeError) -> Self {
        Self::Malformed(e)
    }
}

impl From<CpaceError> for PairingError {
    fn from(e: CpaceError) -> Self {
        Self::InvalidShare(e)
    }
}
