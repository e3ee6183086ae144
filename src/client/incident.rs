//! What the SDK refused or found missing while taking in envelopes: the
//! evidence an app shows when the relay (or a member) misbehaves.
//!
//! A refused envelope is never handed to the application; it is recorded here
//! (and logged as a warning) instead. The record is kept in the device's state
//! file, newest [`KEPT`] entries, so it survives restarts.

use std::ops::RangeInclusive;

use serde::Serialize;

use crate::crypto::envelope::OpenError;
use crate::ids::DeviceId;

/// How many incidents a device keeps (the oldest are forgotten first).
pub const KEPT: usize = 1000;

/// What was wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IncidentKind {
    /// Failed authentication: changed after sealing, or sealed under a key the
    /// channel never used.
    Tampered,
    /// A sender sequence number that was already received.
    Replayed,
    /// Older than an envelope of the same sender already received.
    Reordered,
    /// Sealed for another channel.
    Foreign,
    /// Claims a sender that is not a member in its epoch.
    UnknownSender,
    /// Not shaped like an envelope, an unsupported version, or undecodable inside.
    Malformed,
    /// A member's rekey that does not apply (stale or inconsistent).
    RekeyRefused,
    /// Sequence numbers of a sender were skipped: those envelopes were dropped.
    Gap,
}

/// One refused envelope, or one gap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Incident {
    /// The relay sequence number it arrived under.
    pub seq: u64,
    /// What was wrong.
    pub kind: IncidentKind,
    /// The sender the envelope claimed, when its header could be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sender: Option<DeviceId>,
    /// For people.
    pub detail: String,
}

impl Incident {
    /// The record of an envelope that did not open, or `None` when not opening
    /// it is expected (an epoch from before this device joined).
    pub(crate) fn refused(seq: u64, error: &OpenError) -> Option<Self> {
        let (kind, sender) = match error {
            OpenError::UnknownEpoch(_) => return None,
            OpenError::Decrypt => (IncidentKind::Tampered, None),
            OpenError::Replay { sender, .. } | OpenError::TooOld { sender, .. } => {
                (IncidentKind::Replayed, Some(*sender))
            }
            OpenError::Reordered { sender, .. } => (IncidentKind::Reordered, Some(*sender)),
            OpenError::WrongChannel => (IncidentKind::Foreign, None),
            OpenError::UnknownSender(sender) => (IncidentKind::UnknownSender, Some(*sender)),
            _ => (IncidentKind::Malformed, None),
        };
        Some(Self {
            seq,
            kind,
            sender,
            detail: error.to_string(),
        })
    }

    /// The record of envelopes of `sender` that were skipped.
    pub(crate) fn gap(seq: u64, sender: DeviceId, missing: &RangeInclusive<u64>) -> Self {
        Self {
            seq,
            kind: IncidentKind::Gap,
            sender: Some(sender),
            detail: format!(
                "messages {}..={} of this sender never arrived: the relay dropped them",
                missing.start(),
                missing.end()
            ),
        }
    }

    /// Any other refusal of what arrived under `seq`.
    pub(crate) fn other(seq: u64, kind: IncidentKind, detail: impl Into<String>) -> Self {
        Self {
            seq,
            kind,
            sender: None,
            detail: detail.into(),
        }
    }
}

impl IncidentKind {
    /// The name used in JSON and in the state file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tampered => "tampered",
            Self::Replayed => "replayed",
            Self::Reordered => "reordered",
            Self::Foreign => "foreign",
            Self::UnknownSender => "unknown_sender",
            Self::Malformed => "malformed",
            Self::RekeyRefused => "rekey_refused",
            Self::Gap => "gap",
        }
    }

    /// Parses [`as_str`](Self::as_str)'s names.
    pub(crate) fn parse(name: &str) -> Self {
        match name {
            "tampered" => Self::Tampered,
            "replayed" => Self::Replayed,
            "reordered" => Self::Reordered,
            "foreign" => Self::Foreign,
            "unknown_sender" => Self::UnknownSender,
            "rekey_refused" => Self::RekeyRefused,
            "gap" => Self::Gap,
            _ => Self::Malformed,
        }
    }
}
