//! khub: an end-to-end encrypted blind sync relay, the client SDK that devices
//! embed, and the `khub` command-line program.
//!
//! The relay routes and stores only opaque envelopes; every key lives on the
//! devices. This crate is layered so that dependencies point one way:
//!
//! | module | job | I/O |
//! |---|---|---|
//! | [`crypto`] | CPace, KDF labels, AEAD, the envelope header and padding, secret types | none |
//! | [`pairing`] | pairing codes and the pairing state machines | none |
//! | [`channel`] | one device's channel: an MLS (RFC 9420) group with khub's ordering, fork and update rules | none |
//! | [`ids`] | public channel and device ids | none |
//! | [`protocol`] | the relay's wire protocol: frames, HTTP bodies, error and close codes | none |
//! | [`relay`] | the relay server: routes, sessions, store, pairing mailbox, limits, metrics | network, disk |
//! | [`bench`](mod@bench) | `khub bench`: the relay against a bare baseline in the same run | network |
//! | [`client`] | the SDK devices embed: device state, pairing over the relay, live sessions, sync | network, disk |
//! | [`vectors`] | the published test vectors, generated from fixed randomness | none |
//! | `testing` | (feature `testing`) a harness: in-process relay, fault proxy, hostile relay, secret scanner | network, disk |
//!
//! `relay` needs the `server` feature, `client` the `client` feature, `bench`
//! the `bench` feature; the pure modules are always built. SECURITY.md states
//! the threat model and the full construction.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "bench")]
pub mod bench;
pub mod channel;
#[cfg(feature = "client")]
pub mod client;
mod codec;
pub mod crypto;
pub mod ids;
#[cfg(feature = "client")]
pub mod notes;
pub mod pairing;
pub mod protocol;
#[cfg(feature = "server")]
pub mod relay;
#[cfg(feature = "testing")]
pub mod testing;
pub mod vectors;

pub use codec::DecodeError;
