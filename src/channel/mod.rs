//! A channel as one device sees it: an MLS (RFC 9420) group from OpenMLS,
//! ciphersuite 0x0003, with khub's envelope header, ordering, fork detection
//! and update schedule around it. No I/O: see [`group`] for the rules, and
//! [`provider`] for how the group's state is stored.

pub mod group;
pub mod member;
pub mod provider;

pub use group::{
    CIPHERSUITE, Channel, ChannelError, Event, Intent, JoinedGroup, Joining, Member, Outgoing,
    PAST_EPOCHS, Refusal, RefusalKind, TakenIn,
};
pub use member::{MAX_NAME_LEN, NameError, validate_name};
