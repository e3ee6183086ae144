//! Secret hygiene: redacted Debug (pinned), wiping, constant-time equality.

use khub::channel::{Channel, Joining};
use khub::crypto::cpace::{Isk, MacKey};
use khub::crypto::os_rng;
use khub::crypto::secret::SecretBytes;
use khub::ids::{ChannelId, DeviceId};
use khub::pairing::{ChannelWelcome, Code, CodeSecret, DeviceInfo, SessionKey, SessionKeys};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

const KEY: [u8; 32] = [0xA7; 32];

#[test]
fn debug_output_of_every_secret_type_is_pinned_and_redacted() {
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
        format!("{:?}", Code::parse("42-7QK3-M9TZ").unwrap()),
        "Code(42-<redacted>)"
    );
}

#[test]
fn structures_holding_keys_do_not_print_them() {
    // Pairing keys derived from a fixed ISK: none of their bytes may show.
    let keys = SessionKeys::derive(&[1; 16], &Isk::from_bytes([0xA7; 64]));
    let secrets: Vec<Vec<u8>> = vec![keys.a2b.expose().to_vec(), keys.b2a.expose().to_vec()];
    let debug = format!("{keys:?} {keys:#?}");
    assert!(debug.contains("SessionKey(<redacted>)"), "{debug}");
    for secret in &secrets {
        assert!(!debug.contains(&hex::encode(secret)), "{debug}");
        assert!(!debug.contains(&format!("{secret:?}")), "{debug}");
        // Any run of four key bytes, as decimal list entries.
        for w in secret.windows(4) {
            let run = format!("{}, {}, {}, {}", w[0], w[1], w[2], w[3]);
            assert!(!debug.contains(&run), "{debug}");
        }
    }

    // The joiner's device info carries the hash of its relay token, never the token.
    let token = [0xA7; 32];
    let info = DeviceInfo::new(DeviceId::from_bytes([1; 16]), &token, vec![0x11; 8]);
    let debug = format!("{info:?} {info:#?}");
    assert!(
        !debug.contains("167"),
        "a token byte (0xA7 = 167) was printed: {debug}"
    );
    assert!(!debug.to_lowercase().contains("a7a7"), "{debug}");
    assert!(!info.encode().windows(token.len()).any(|w| w == token));

    // A channel and a joining device print ids and the epoch, nothing of their
    // MLS state (signature keys, epoch secrets, ratchets).
    let me = DeviceId::from_bytes([2; 16]);
    let channel = Channel::create(ChannelId::from_bytes([3; 16]), me, "laptop", 0).unwrap();
    let debug = format!("{channel:?} {channel:#?}");
    assert!(debug.starts_with("Channel {"), "{debug}");
    assert!(debug.len() < 400, "{debug}");
    let (joining, _) = Joining::start(DeviceId::from_bytes([4; 16]), "phone").unwrap();
    let debug = format!("{joining:?} {joining:#?}");
    assert!(debug.starts_with("Joining {"), "{debug}");
    assert!(debug.len() < 200, "{debug}");

    // A channel welcome holds only public ids and the MLS Welcome (which MLS
    // encrypts to the joiner).
    let welcome = ChannelWelcome {
        channel: ChannelId::from_bytes([3; 16]),
        cursor: 1,
        welcome: vec![0x22; 8],
    };
    assert!(format!("{welcome:?}").contains("cursor: 1"));
}

fn wiped_on_drop<T: ZeroizeOnDrop>() {}

#[test]
fn secret_types_wipe_themselves() {
    wiped_on_drop::<SecretBytes<32>>();
    wiped_on_drop::<SessionKey>();
    wiped_on_drop::<Isk>();
    wiped_on_drop::<MacKey>();
    wiped_on_drop::<CodeSecret>();

    // The wipe that runs on drop, run by hand so its effect can be seen.
    let mut secret = SecretBytes::new(KEY);
    secret.zeroize();
    assert_eq!(secret.expose(), &[0u8; 32]);
}

#[test]
fn equality_is_constant_time_and_correct() {
    let a = SessionKey::from_bytes(KEY);
    let mut other = KEY;
    other[31] ^= 1;
    assert!(bool::from(a.ct_eq(&SessionKey::from_bytes(KEY))));
    assert!(!bool::from(a.ct_eq(&SessionKey::from_bytes(other))));
    assert_eq!(a, SessionKey::from_bytes(KEY));
    assert_ne!(a, SessionKey::from_bytes(other));
    assert_eq!(a, a.duplicate());
    assert_eq!(SessionKey::from_slice(&KEY[..31]), None);
    // Ids are public: ordinary comparison is fine for them.
    assert_ne!(
        DeviceId::random(&mut os_rng()),
        DeviceId::random(&mut os_rng())
    );
}
