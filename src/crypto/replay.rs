//! Per-sender replay window and gap detection.
//!
//! The relay orders envelopes and stores each sender's in the order it sealed them
//! (it refuses a sequence number below one it already holds), so a receiver
//! sees each sender's numbers 1, 2, 3… without holes. A relay that drops,
//! replays or reorders is caught here: a number that skips ahead is accepted but
//! reported as a gap; anything below the highest number seen is refused — as a
//! replay if it was seen, as reordered if it was not. Refusing late arrivals
//! keeps the guarantee the application relies on: each sender's messages reach
//! it once and in the order they were sent, and the relay's order is the only
//! order. The last [`WINDOW`] numbers below the highest are remembered (as in
//! IPsec and WireGuard) to tell a replay from a reordering; older numbers are
//! refused as too old.
//!
//! Checking and recording are separate steps so that only envelopes that passed
//! authentication move the window: a forged high number must not lock a sender out.

use std::ops::RangeInclusive;

/// How many sequence numbers below the highest one are remembered.
pub const WINDOW: u64 = 128;

/// What accepting a sequence number means for the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// The next number: nothing missing.
    InOrder,
    /// Newer than expected: the numbers in `missing` were skipped and will be
    /// refused if they arrive later.
    Gap {
        /// The sequence numbers skipped over.
        missing: RangeInclusive<u64>,
    },
}

/// Why a sequence number was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Already received.
    Replay,
    /// Never received, but older than a number that was: delivered out of order.
    Reordered,
    /// Below the window; replay cannot be told from reordering.
    TooOld,
}

/// The replay state of one sender, as seen by one receiver.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    /// Highest sequence number accepted so far (0: none yet).
    highest: u64,
    /// Bit `i` set: `highest - i` was accepted. Bit 0 is `highest` itself.
    seen: u128,
}

impl ReplayWindow {
    /// Restores a window from persisted state (see [`ReplayWindow::to_parts`]).
    pub fn from_parts(highest: u64, seen: u128) -> Self {
        Self { highest, seen }
    }

    /// The persisted form: highest number and bitmap.
    pub fn to_parts(&self) -> (u64, u128) {
        (self.highest, self.seen)
    }

    /// The highest sequence number accepted so far.
    pub fn highest(&self) -> u64 {
        self.highest
    }

    /// Would `seq` be accepted, and what would it mean? Changes nothing.
    pub fn check(&self, seq: u64) -> Result<Admission, Refusal> {
        if seq > self.highest {
            return Ok(if seq == self.highest + 1 {
                Admission::InOrder
            } else {
                Admission::Gap {
                    missing: self.highest + 1..=seq - 1,
                }
            });
        }
        let back = self.highest - seq;
        if seq == 0 || back >= WINDOW {
            return Err(Refusal::TooOld);
        }
        if self.seen & (1u128 << back) != 0 {
            Err(Refusal::Replay)
        } else {
            Err(Refusal::Reordered)
        }
    }

    /// Records `seq` as received. Call only after [`check`](Self::check) accepted
    /// it and the envelope authenticated.
    pub fn record(&mut self, seq: u64) {
        if seq > self.highest {
            let shift = seq - self.highest;
            self.seen = if shift >= WINDOW {
                0
            } else {
                self.seen << shift
            };
            self.seen |= 1;
            self.highest = seq;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(window: &mut ReplayWindow, seq: u64) -> Admission {
        let admission = window.check(seq).expect("accepted");
        window.record(seq);
        admission
    }

    #[test]
    fn in_order_numbers_are_accepted_once() {
        let mut w = ReplayWindow::default();
        for seq in 1..=300 {
            assert_eq!(accept(&mut w, seq), Admission::InOrder);
            assert_eq!(w.check(seq), Err(Refusal::Replay));
        }
        assert_eq!(w.check(300 - WINDOW), Err(Refusal::TooOld));
        assert_eq!(w.check(0), Err(Refusal::TooOld));
    }

    #[test]
    fn gaps_are_reported_and_late_arrivals_refused() {
        let mut w = ReplayWindow::default();
        accept(&mut w, 1);
        assert_eq!(accept(&mut w, 5), Admission::Gap { missing: 2..=4 });
        assert_eq!(w.check(3), Err(Refusal::Reordered));
        assert_eq!(w.check(1), Err(Refusal::Replay));
        assert_eq!(w.check(5), Err(Refusal::Replay));
        assert_eq!(accept(&mut w, 6), Admission::InOrder);
        // A jump larger than the window forgets everything below it.
        assert_eq!(
            accept(&mut w, 6 + WINDOW + 10),
            Admission::Gap {
                missing: 7..=6 + WINDOW + 9
            }
        );
        assert_eq!(w.check(6 + 10), Err(Refusal::TooOld));
        assert_eq!(w.check(6 + 11), Err(Refusal::Reordered));
    }

    #[test]
    fn checking_alone_does_not_move_the_window() {
        let mut w = ReplayWindow::default();
        accept(&mut w, 1);
        assert!(w.check(1_000_000).is_ok());
        assert_eq!(w.check(2), Ok(Admission::InOrder));
        assert_eq!(w.highest(), 1);
        let (highest, seen) = w.to_parts();
        assert_eq!(ReplayWindow::from_parts(highest, seen), w);
    }
}
