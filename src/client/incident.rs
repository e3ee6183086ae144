//! What the SDK refused or found missing while taking in envelopes, and what
//! the relay refused to store: the evidence an app shows when the relay (or a
//! member) misbehaves.
//!
//! A refused envelope is never handed to the application; it is recorded here
//! (and logged as a warning) instead. The record is kept in the device's state
//! file, newest [`KEPT`] entries, so it survives restarts.

use serde::Serialize;

use crate::channel::Refusal;
pub use crate::channel::RefusalKind as IncidentKind;
use crate::ids::DeviceId;

/// How many incidents a device keeps (the oldest are forgotten first).
pub const KEPT: usize = 1000;

/// One refused envelope, one gap, or one envelope of this device the relay
/// would not store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Incident {
    /// The relay sequence number it arrived under (0 for this device's own
    /// envelope the relay refused).
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
    /// The record of what the channel refused under relay sequence number `seq`.
    pub(crate) fn refused(seq: u64, refusal: Refusal) -> Self {
        Self {
            seq,
            kind: refusal.kind,
            sender: refusal.sender,
            detail: refusal.detail,
        }
    }

    /// Any other incident under `seq`.
    pub(crate) fn other(seq: u64, kind: IncidentKind, detail: impl Into<String>) -> Self {
        Self {
            seq,
            kind,
            sender: None,
            detail: detail.into(),
        }
    }
}
