//! Secret hygiene: redacted Debug (pinned), wiping, constant-time equality.

use khub::channel::Welcome;
use khub::crypto::cpace::{Isk, MacKey};
use khub::crypto::envelope::{ChannelKey, SenderKey};
use khub::crypto::os_rng;
use khub::crypto::pairwise::{DeviceSecret, PairwiseKey};
use khub::crypto::secret::SecretBytes;
use khub::ids::{ChannelId, DeviceId};
use khub::pairing::{Code, CodeSecret, SessionKey};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

const KEY: [u8; 32] = [0xA7; 32];

#[test]
fn debug_output_of_every_secret_type_is_pinned_and_redacted() {
    assert_eq!(
        format!("{:?}", ChannelKey::from_bytes(KEY)),
        "ChannelKey(<redacted>)"
    );
    assert_eq!(
        format!("{:?}", SenderKey::from_bytes(KEY)),
        "SenderKey(<redacted>)"
    );
    assert_eq!(
        format!("{:?}", PairwiseKey::from_bytes(KEY)),
        "PairwiseKey(<redacted>)"
    );
    assert_eq!(
        format!("{:?}", SessionKey::from_bytes(KEY)),
        "SessionKey(<redacted>)"
    );
    assert_eq!(
        format!("{:?}", Isk::from_bytes([0xA7; 64])),
        "Isk(<redacted>)"
    );
    assert_eq!(
        format!("{:?}", MacKey::from_bytes([0xA7; 64])),
        "MacKey(<redacted>)"
    );
    assert_eq!(
        format!("{:?}", CodeSecret::from_bytes(*b"7QK3M9TZ")),
        "CodeSecret(<redacted>)"
    );
    assert_eq!(
        format!("{:?}", SecretBytes::new(KEY)),
        "SecretBytes<32>(<redacted>)"
    );
    assert_eq!(
        format!("{:?}", DeviceSecret::from_bytes(KEY)),
        "DeviceSecret(<redacted>)"
    );
    assert_eq!(
        format!("{:?}", Code::parse("42-7QK3-M9TZ").unwrap()),
        "Code(42-<redacted>)"
    );
}

#[test]
fn structures_holding_keys_do_not_print_them() {
    // Fixed ids and keys, so that nothing else in the output can look like a key byte.
    let member = khub::channel::Member {
        id: DeviceId::from_bytes([1; 16]),
        public_key: DeviceSecret::from_bytes([2; 32]).public_key(),
        name: "laptop".into(),
    };
    let welcome = Welcome {
        channel: ChannelId::from_bytes([3; 16]),
        epoch: 3,
        key: ChannelKey::from_bytes(KEY),
        inviter: member.id,
        members: vec![member],
    };
    let debug = format!("{welcome:?} {:#?}", welcome);
    assert!(debug.contains("ChannelKey(<redacted>)"), "{debug}");
    assert!(
        !debug.contains("167"),
        "a key byte (0xA7 = 167) was printed: {debug}"
    );
    assert!(!debug.to_lowercase().contains("a7a7"), "{debug}");
}

fn wiped_on_drop<T: ZeroizeOnDrop>() {}

#[test]
fn secret_types_wipe_themselves() {
    wiped_on_drop::<SecretBytes<32>>();
    wiped_on_drop::<ChannelKey>();
    wiped_on_drop::<SenderKey>();
    wiped_on_drop::<PairwiseKey>();
    wiped_on_drop::<SessionKey>();
    wiped_on_drop::<Isk>();
    wiped_on_drop::<MacKey>();
    wiped_on_drop::<CodeSecret>();
    wiped_on_drop::<x25519_dalek::StaticSecret>(); // inside DeviceSecret

    // The wipe that runs on drop, run by hand so its effect can be seen.
    let mut secret = SecretBytes::new(KEY);
    secret.zeroize();
    assert_eq!(secret.expose(), &[0u8; 32]);
}

#[test]
fn equality_is_constant_time_and_correct() {
    let a = ChannelKey::from_bytes(KEY);
    let mut other = KEY;
    other[31] ^= 1;
    assert!(bool::from(a.ct_eq(&ChannelKey::from_bytes(KEY))));
    assert!(!bool::from(a.ct_eq(&ChannelKey::from_bytes(other))));
    assert_eq!(a, ChannelKey::from_bytes(KEY));
    assert_ne!(a, ChannelKey::from_bytes(other));
    assert_eq!(ChannelKey::from_slice(&KEY[..31]), None);
    // Ids are public: ordinary comparison is fine for them.
    assert_ne!(
        DeviceId::random(&mut os_rng()),
        DeviceId::random(&mut os_rng())
    );
}
