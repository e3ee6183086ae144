//! A channel as one device sees it: members, keys per epoch, the welcome handed
//! to new members, and the keyring that seals, opens and rekeys.

pub mod keyring;
pub mod member;
mod persist;
pub mod welcome;

pub use keyring::{Keyring, KeyringError, Opened, RekeyOutcome};
pub use member::{MAX_NAME_LEN, Member, NameError, validate_name};
pub use welcome::Welcome;
