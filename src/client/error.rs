//! Errors of the client SDK: one type, [`ClientError`], whose every variant
//! says whose fault it is ([`ClientError::fault`]) and whether trying again
//! later can help ([`ClientError::is_transient`]), and keeps the underlying
//! error as its [`source`](std::error::Error::source).

use std::error::Error as StdError;
use std::sync::Arc;

use crate::pairing::{CodeError, PairingError};
use crate::protocol::{ErrorCode, Refusal};

/// The underlying error of a [`ClientError`], shared so errors stay cheap to
/// clone (a live session hands the same error to every waiting caller).
pub type Source = Arc<dyn StdError + Send + Sync + 'static>;

/// Whose fault an error is: who can do something about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Fault {
    /// The app or the person using it asked for something that cannot be
    /// done as asked (bad input, a step out of order): change the request.
    Caller,
    /// The configuration is wrong (the relay's address, TLS trust anchors):
    /// whoever set the device up fixes it.
    Operator,
    /// The relay or the network to it: unreachable, slow, refusing, or
    /// answering something khub does not understand.
    Relay,
    /// The other device or another member: the code it showed did not
    /// match, it gave up, it did not confirm, or it removed this device.
    Peer,
    /// This device's disk: the state file cannot be read or written, or holds
    /// something this build cannot read.
    Disk,
    /// A bug in khub itself (a task that panicked): worth a report.
    Khub,
}

/// Why the relay could not be reached, as far as the SDK can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reach {
    /// Nothing accepts connections at the address (the relay is not running,
    /// or the port is wrong).
    Refused,
    /// An `https://` or `wss://` address answered without TLS (a relay
    /// served over plain HTTP).
    NotTls,
    /// The relay's TLS certificate is not trusted for its address (a
    /// self-signed certificate whose CA was not added, or another name).
    Certificate,
    /// The name did not resolve, the connection broke, or the relay closed
    /// it: the source says which.
    Failed,
}

/// Anything that can go wrong on a device.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The relay could not be reached, or the connection broke. The relay's
    /// (or the network's) fault, transient.
    #[error("cannot reach the relay at {relay}")]
    Unreachable {
        /// The relay's address.
        relay: String,
        /// What the SDK could tell about why.
        reason: Reach,
        /// The network error.
        #[source]
        source: Source,
    },
    /// The relay did not answer in time. The relay's fault, transient.
    #[error("the relay did not answer within {0} seconds")]
    Timeout(u64),
    /// The relay refused a request, with one of the protocol's error codes.
    /// Usually the relay's fault (transient when the code says so); the
    /// caller's for `too_large`, the operator's for `forbidden`.
    #[error("the relay refused: {message} ({code})")]
    Relay {
        /// The protocol error code.
        code: ErrorCode,
        /// The relay's message.
        message: String,
        /// HTTP status (0 over WebSocket).
        status: u16,
    },
    /// This device was removed from its channel by another member. Final.
    #[error("this device was removed from the channel; pair it again to rejoin")]
    Revoked,
    /// The relay does not recognise this device's credentials (its channel is
    /// gone, or this is another relay). The relay's fault, final.
    #[error(
        "the relay does not recognise this device: its channel may be gone, or it was never admitted"
    )]
    Unauthorized,
    /// The code typed cannot be a code. The caller's fault.
    #[error(transparent)]
    Code(#[from] CodeError),
    /// Pairing failed: the other device's code did not match, it gave up, or
    /// someone interfered. Counted as the peer's fault.
    #[error(transparent)]
    Pairing(#[from] PairingError),
    /// The new device never confirmed, in its channel, that it joined. The
    /// peer's fault (or the relay's interference).
    #[error(
        "the new device did not confirm that it joined (it failed, or the relay interfered), so it was removed again; make a new code and pair again"
    )]
    NotConfirmed,
    /// A removal did not take effect: the relay refused its commit for good
    /// (the device was revoked at the relay, but MLS still counts it a
    /// member). The relay's fault.
    #[error(
        "the removal of device {device} did not take effect ({why}): it is still a member of the channel's group and could read what is sent if the relay let it; run the removal again"
    )]
    NotRemoved {
        /// The device that is still a member.
        device: crate::ids::DeviceId,
        /// What the relay said.
        why: String,
    },
    /// The pairing was cancelled on this device (through a
    /// `CancelInvitation`); whatever it had done is undone. The caller's doing.
    #[error("cancelled: the code no longer works, and the other device was told")]
    Cancelled,
    /// Nobody paired within the time allowed (the inviting side). The
    /// peer's fault.
    #[error("nobody entered the code within {0} seconds; make a new code")]
    PairingTimeout(u64),
    /// The joining side: the device that showed the code did not answer
    /// within the time allowed (it stopped, or lost its connection). The
    /// peer's fault.
    #[error(
        "the device that showed the code did not answer within {0} seconds (it may have stopped, or lost its connection); make a new code on it"
    )]
    NoAnswer(u64),
    /// The joining side: the code's pairing had ended when it was typed, or
    /// ended at the relay while this device waited (the device that showed
    /// it stopped waiting, or the code was used). The peer's doing, or an
    /// old code.
    #[error(
        "this code no longer works: the device that showed it stopped waiting (cancelled, or out of time), or the code was already used; make a new code on it"
    )]
    CodeEnded,
    /// No device state in the home directory. The caller's fault.
    #[error("no device in {0}: run `khub init` or `khub join` first")]
    NotInitialized(String),
    /// The home directory already holds a device. The caller's fault.
    #[error("{0} already holds a device")]
    AlreadyInitialized(String),
    /// The device's state on disk could not be read or written, or holds
    /// something this build cannot read. The disk's fault.
    #[error("this device's state on disk: {what}")]
    Disk {
        /// What was being read or written, or what is wrong with it.
        what: String,
        /// The storage error, when there is one.
        #[source]
        source: Option<Source>,
    },
    /// The configuration cannot be used (a CA file that holds no
    /// certificate, say). The operator's fault.
    #[error("{what}")]
    Config {
        /// What is wrong and where.
        what: String,
        /// The underlying error, when there is one.
        #[source]
        source: Option<Source>,
    },
    /// The other device sent something invalid while pairing (its MLS
    /// KeyPackage or Welcome, say). The peer's fault.
    #[error("{0}")]
    Peer(String),
    /// The relay answered something this client does not understand. The
    /// relay's fault.
    #[error("unexpected answer from the relay: {0}")]
    Protocol(String),
    /// The caller asked for something that cannot be done as asked (a relay
    /// URL that is not one, a device name that cannot be shown, a device that
    /// is not a member): the message says what to change.
    #[error("{0}")]
    Invalid(String),
    /// A bug in khub: a state task panicked.
    #[error("khub failed inside ({0}); please report it")]
    Bug(String),
}

impl ClientError {
    /// Whose fault this is, and so who can do something about it.
    pub fn fault(&self) -> Fault {
        match self {
            Self::Unreachable { .. }
            | Self::Timeout(_)
            | Self::Unauthorized
            | Self::Protocol(_)
            | Self::NotRemoved { .. } => Fault::Relay,
            Self::Relay { code, .. } => match code {
                ErrorCode::TooLarge => Fault::Caller,
                ErrorCode::Forbidden => Fault::Operator,
                _ => Fault::Relay,
            },
            Self::Revoked
            | Self::Pairing(_)
            | Self::NotConfirmed
            | Self::PairingTimeout(_)
            | Self::NoAnswer(_)
            | Self::CodeEnded
            | Self::Peer(_) => Fault::Peer,
            Self::Code(_)
            | Self::NotInitialized(_)
            | Self::AlreadyInitialized(_)
            | Self::Cancelled
            | Self::Invalid(_) => Fault::Caller,
            Self::Disk { .. } => Fault::Disk,
            Self::Config { .. } => Fault::Operator,
            Self::Bug(_) => Fault::Khub,
        }
    }

    /// Worth retrying later (network trouble, relay busy); the opposite of
    /// errors that need a person (wrong code, device removed, bad state).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::Timeout(_) => true,
            Self::Relay { code, status, .. } => {
                matches!(
                    code,
                    ErrorCode::RateLimited
                        | ErrorCode::Internal
                        | ErrorCode::Unavailable
                        | ErrorCode::Timeout
                        | ErrorCode::StorageFull
                        | ErrorCode::OverQuota
                        | ErrorCode::Unknown
                ) || *status >= 500
            }
            _ => false,
        }
    }

    /// A refusal from the relay, over HTTP (`status`) or WebSocket (0). The
    /// two refusals that end this device's use of the relay have their own
    /// variants.
    pub(crate) fn refused(refusal: Refusal, status: u16) -> Self {
        match refusal.code {
            ErrorCode::Unauthorized => Self::Unauthorized,
            ErrorCode::Revoked => Self::Revoked,
            code => Self::Relay {
                code,
                message: refusal.message,
                status,
            },
        }
    }

    /// The relay at `relay` could not be reached because of `source`.
    pub(crate) fn unreachable(
        relay: impl Into<String>,
        source: impl Into<Box<dyn StdError + Send + Sync>>,
    ) -> Self {
        let source: Source = Arc::from(source.into());
        Self::Unreachable {
            relay: relay.into(),
            reason: reach_of(source.as_ref()),
            source,
        }
    }

    /// A blocking state task that panicked (or was cancelled at shutdown).
    pub(crate) fn task_failed(e: tokio::task::JoinError) -> Self {
        Self::Bug(format!("a state task failed: {e}"))
    }

    /// Reading or writing the state file failed.
    pub(crate) fn disk(
        what: impl Into<String>,
        source: impl StdError + Send + Sync + 'static,
    ) -> Self {
        Self::Disk {
            what: what.into(),
            source: Some(Arc::new(source)),
        }
    }

    /// The state file holds something this build cannot read.
    pub(crate) fn corrupt(what: impl Into<String>) -> Self {
        Self::Disk {
            what: what.into(),
            source: None,
        }
    }

    /// A configuration that cannot be used.
    pub(crate) fn config(what: impl Into<String>, source: Option<Source>) -> Self {
        Self::Config {
            what: what.into(),
            source,
        }
    }
}

/// Reads a network error chain for the two causes a person can act on.
fn reach_of(error: &(dyn StdError + 'static)) -> Reach {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return Reach::Refused;
            }
            // An I/O error's `source()` skips the error it wraps; look inside.
            if let Some(inner) = io.get_ref() {
                let reach = reach_of(inner);
                if reach != Reach::Failed {
                    return reach;
                }
            }
        }
        match e.downcast_ref::<rustls::Error>() {
            Some(rustls::Error::InvalidMessage(_)) => return Reach::NotTls,
            Some(rustls::Error::InvalidCertificate(_)) => return Reach::Certificate,
            _ => {}
        }
        next = e.source();
    }
    Reach::Failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_connections_and_plain_http_are_told_apart() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(
            ClientError::unreachable("http://x", refused).fault(),
            Fault::Relay
        );
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(matches!(
            ClientError::unreachable("http://x", refused),
            ClientError::Unreachable {
                reason: Reach::Refused,
                ..
            }
        ));
        let not_tls = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
        );
        assert!(matches!(
            ClientError::unreachable("https://x", not_tls),
            ClientError::Unreachable {
                reason: Reach::NotTls,
                ..
            }
        ));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let error = ClientError::unreachable("http://x", reset);
        assert!(matches!(
            error,
            ClientError::Unreachable {
                reason: Reach::Failed,
                ..
            }
        ));
        assert!(error.source().is_some() && error.is_transient());
    }

    #[test]
    fn transient_is_read_from_the_code() {
        let refusal = |code| ClientError::refused(Refusal::new(code, "m"), 0);
        assert!(refusal(ErrorCode::RateLimited).is_transient());
        assert!(refusal(ErrorCode::Unknown).is_transient());
        assert!(!refusal(ErrorCode::TooLarge).is_transient());
        assert_eq!(refusal(ErrorCode::TooLarge).fault(), Fault::Caller);
        assert!(matches!(refusal(ErrorCode::Revoked), ClientError::Revoked));
        assert_eq!(refusal(ErrorCode::Revoked).fault(), Fault::Peer);
    }
}
