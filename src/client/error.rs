//! Errors of the client SDK, classified so a caller can decide between retrying
//! and telling the person.

use crate::pairing::{CodeError, PairingError};
use crate::protocol::ErrorCode;

/// Anything that can go wrong on a device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The relay could not be reached, or the connection broke.
    #[error("cannot reach the relay at {relay}: {detail}")]
    Unreachable {
        /// The relay's address.
        relay: String,
        /// What failed.
        detail: String,
    },
    /// The relay did not answer in time.
    #[error("the relay did not answer within {0} seconds")]
    Timeout(u64),
    /// The relay refused a request.
    #[error("the relay refused: {message} ({code})")]
    Relay {
        /// The protocol error code.
        code: String,
        /// The relay's message.
        message: String,
        /// HTTP status (0 over WebSocket).
        status: u16,
    },
    /// This device was removed from its channel.
    #[error("this device was removed from the channel; pair it again to rejoin")]
    Revoked,
    /// The relay does not recognise this device's credentials.
    #[error(
        "the relay does not recognise this device: its channel may be gone, or it was never admitted"
    )]
    Unauthorized,
    /// The code cannot be used.
    #[error(transparent)]
    Code(#[from] CodeError),
    /// Pairing failed (wrong code, interference, cancelled).
    #[error(transparent)]
    Pairing(#[from] PairingError),
    /// The new device never confirmed, in its channel, that it joined.
    #[error(
        "the new device did not confirm that it joined (it failed, or the relay interfered), so it was removed again; make a new code and pair again"
    )]
    NotConfirmed,
    /// Nobody paired within the time allowed.
    #[error("nobody entered the code within {0} seconds; make a new code")]
    PairingTimeout(u64),
    /// No device state in the home directory.
    #[error("no device in {0}: run `khub init` or `khub join` first")]
    NotInitialized(String),
    /// The home directory already holds a device.
    #[error("{0} already holds a device; use another --home")]
    AlreadyInitialized(String),
    /// The device's state on disk could not be read or written.
    #[error("device state error: {0}")]
    State(String),
    /// The relay answered something this client does not understand.
    #[error("unexpected answer from the relay: {0}")]
    Protocol(String),
    /// The caller asked for something that cannot be done as asked (a relay
    /// URL that is not one, a device name that cannot be shown, a device that
    /// is not a member): the message says what to change.
    #[error("{0}")]
    Invalid(String),
}

impl ClientError {
    /// Worth retrying later (network trouble, relay busy); the opposite of
    /// errors that need a person (wrong code, device removed, bad state).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::Timeout(_) => true,
            Self::Relay { status, code, .. } => {
                *status >= 500
                    || *status == 429
                    || code == ErrorCode::RateLimited.as_str()
                    || code == ErrorCode::Internal.as_str()
            }
            _ => false,
        }
    }

    pub(crate) fn state(e: impl std::fmt::Display) -> Self {
        Self::State(e.to_string())
    }
}
