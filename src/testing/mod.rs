//! A harness for testing khub — and client SDKs in other languages — under the
//! conditions users meet: flaky networks, crashes, a relay that misbehaves.
//! Behind the `testing` cargo feature; nothing here is in a normal build.
//!
//! - [`TestRelay`]: a relay in this process on an ephemeral port, over a SQLite
//!   file in its own temporary directory; it can be stopped and restarted on the
//!   same address and file.
//! - [`paired_devices`]: N SDK devices paired into one channel by real CPace
//!   pairings through a relay; [`pair_device`] adds one.
//! - [`FaultProxy`]: a TCP proxy between devices and the relay that cuts
//!   connections, stalls, delays and splits what passes through it.
//! - [`HostileRelay`]: a front for the relay (HTTP and WebSocket) that rewrites
//!   what devices receive — drops, reorders, duplicates, replays, tampers with or injects
//!   envelopes, and substitutes pairing messages.
//! - [`Scanner`] and [`capture_logs`]: search the relay's files and the captured
//!   logs for plaintext markers, keys, tokens and codes.
//!
//! Every wait in here is bounded; a test that uses the harness fails instead of
//! hanging.

mod hostile;
mod proxy;
mod relay;
mod scan;

pub use hostile::{Delivery, HostileRelay, flip_byte};
pub use proxy::FaultProxy;
pub use relay::{PairedDevices, TempDir, TestRelay, pair_device, paired_devices};
pub use scan::{Finding, Scanner, capture_logs, captured_logs};
