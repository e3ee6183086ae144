//! Envelopes between members of a channel: round trips, tampering, wrong
//! context, replays and gaps.

mod common;

use common::{Device, channel_of};
use khub::channel::Keyring;
use khub::crypto::envelope::{
    self, ChannelKey, EnvelopeHeader, HEADER_LEN, MAX_ENVELOPE_LEN, MAX_PLAINTEXT_LEN, OpenError,
    SealError,
};
use khub::crypto::os_rng;
use khub::ids::{ChannelId, DeviceId};

fn pair_of_keyrings() -> (Keyring, Keyring) {
    let (a, b) = (Device::new("laptop"), Device::new("phone"));
    let mut rings = channel_of(&[&a, &b]).into_iter();
    (rings.next().unwrap(), rings.next().unwrap())
}

#[test]
fn envelopes_round_trip_with_sender_and_sequence() {
    let (mut laptop, mut phone) = pair_of_keyrings();
    let mut rng = os_rng();
    for (i, text) in ["", "a", "hello", &"x".repeat(5000)].iter().enumerate() {
        let sealed = laptop.seal(text.as_bytes(), &mut rng).unwrap();
        let opened = phone.open(&sealed).unwrap();
        assert_eq!(opened.plaintext, text.as_bytes());
        assert_eq!(opened.header.sender, laptop.me());
        assert_eq!(opened.header.seq, i as u64 + 1);
        assert_eq!(opened.header.epoch, 0);
        assert_eq!(opened.gap, None);
    }
    // The plaintext never shows in the sealed bytes.
    let marker = b"PLAINTEXT-MARKER-4f1c";
    let sealed = laptop.seal(marker, &mut rng).unwrap();
    assert!(!sealed.windows(marker.len()).any(|w| w == marker));
}

#[test]
fn every_single_bit_flip_fails_to_open_and_moves_nothing() {
    let (mut laptop, mut phone) = pair_of_keyrings();
    let mut rng = os_rng();
    let sealed = laptop.seal(b"tamper with me", &mut rng).unwrap();
    for byte in 0..sealed.len() {
        for bit in 0..8 {
            let mut flipped = sealed.clone();
            flipped[byte] ^= 1 << bit;
            let result = phone.open(&flipped);
            assert!(result.is_err(), "flip of byte {byte} bit {bit} opened");
            // Past the header, the failure says nothing about where the damage is.
            if byte >= HEADER_LEN {
                assert_eq!(result.unwrap_err(), OpenError::Decrypt, "byte {byte}");
            }
        }
    }
    // None of the forgeries moved the replay window: the original opens, once.
    assert_eq!(phone.open(&sealed).unwrap().plaintext, b"tamper with me");
    assert!(matches!(
        phone.open(&sealed),
        Err(OpenError::Replay { seq: 1, .. })
    ));
}

#[test]
fn truncated_and_oversized_envelopes_are_refused() {
    let (mut laptop, mut phone) = pair_of_keyrings();
    let sealed = laptop.seal(b"short", &mut os_rng()).unwrap();
    for len in 0..sealed.len() {
        assert!(phone.open(&sealed[..len]).is_err(), "prefix of {len}");
    }
    let oversized = [sealed.clone(), vec![0; MAX_ENVELOPE_LEN]].concat();
    assert_eq!(
        phone.open(&oversized),
        Err(OpenError::Malformed("longer than the largest envelope"))
    );
    assert_eq!(
        laptop.seal(&vec![0; MAX_PLAINTEXT_LEN + 1], &mut os_rng()),
        Err(SealError::TooLarge {
            len: MAX_PLAINTEXT_LEN + 1,
            max: MAX_PLAINTEXT_LEN
        })
    );
    let mut other_version = sealed.clone();
    other_version[0] = 2;
    assert_eq!(
        phone.open(&other_version),
        Err(OpenError::UnsupportedVersion(2))
    );
}

#[test]
fn wrong_channel_epoch_or_sender_fails() {
    let key = ChannelKey::generate(&mut os_rng());
    let channel = ChannelId::from_bytes([1; 16]);
    let (alice, bob) = (DeviceId::from_bytes([2; 16]), DeviceId::from_bytes([3; 16]));
    let header = EnvelopeHeader {
        channel,
        epoch: 4,
        sender: alice,
        seq: 9,
    };
    let sealed = envelope::seal(
        &key.sender_key(&channel, 4, &alice),
        &header,
        b"note",
        &mut os_rng(),
    )
    .unwrap();
    assert_eq!(
        envelope::open(&key.sender_key(&channel, 4, &alice), &sealed).unwrap(),
        b"note"
    );

    let wrong_keys = [
        key.sender_key(&ChannelId::from_bytes([9; 16]), 4, &alice),
        key.sender_key(&channel, 5, &alice),
        key.sender_key(&channel, 4, &bob),
        ChannelKey::generate(&mut os_rng()).sender_key(&channel, 4, &alice),
    ];
    for wrong in &wrong_keys {
        assert_eq!(envelope::open(wrong, &sealed), Err(OpenError::Decrypt));
    }

    // A header rewritten to another channel, epoch or sender fails even with
    // the key that matches the rewritten header.
    let rewrites = [
        (ChannelId::from_bytes([9; 16]), 4, alice),
        (channel, 5, alice),
        (channel, 4, bob),
    ];
    for (c, e, s) in rewrites {
        let mut forged = sealed.clone();
        forged[..HEADER_LEN].copy_from_slice(
            &EnvelopeHeader {
                channel: c,
                epoch: e,
                sender: s,
                seq: 9,
            }
            .encode(),
        );
        assert_eq!(
            envelope::open(&key.sender_key(&c, e, &s), &forged),
            Err(OpenError::Decrypt)
        );
    }
}

#[test]
fn the_keyring_refuses_foreign_channels_unknown_epochs_and_non_members() {
    let (mut laptop, mut phone) = pair_of_keyrings();
    let (mut stranger, _) = pair_of_keyrings();
    let mut rng = os_rng();
    let foreign = stranger.seal(b"not for you", &mut rng).unwrap();
    assert_eq!(phone.open(&foreign), Err(OpenError::WrongChannel));

    let sealed = laptop.seal(b"hi", &mut rng).unwrap();
    let mut future = sealed.clone();
    future[17..21].copy_from_slice(&7u32.to_be_bytes());
    assert_eq!(phone.open(&future), Err(OpenError::UnknownEpoch(7)));
    let mut outsider = sealed.clone();
    outsider[21..37].copy_from_slice(&[5; 16]);
    assert_eq!(
        phone.open(&outsider),
        Err(OpenError::UnknownSender(DeviceId::from_bytes([5; 16])))
    );
}

#[test]
fn replays_and_reorderings_are_refused_and_gaps_are_reported() {
    let (mut laptop, mut phone) = pair_of_keyrings();
    let mut rng = os_rng();
    let sealed: Vec<Vec<u8>> = (0..6)
        .map(|i| laptop.seal(format!("m{i}").as_bytes(), &mut rng).unwrap())
        .collect();

    assert_eq!(phone.open(&sealed[0]).unwrap().gap, None);
    assert!(matches!(
        phone.open(&sealed[0]),
        Err(OpenError::Replay { seq: 1, .. })
    ));
    // The relay drops seq 2 and 3: the receiver sees the hole.
    let opened = phone.open(&sealed[3]).unwrap();
    assert_eq!(opened.header.seq, 4);
    assert_eq!(opened.gap, Some(2..=3));
    // A late arrival is refused: each sender's messages reach the app in the
    // order they were sent, or not at all.
    assert!(matches!(
        phone.open(&sealed[1]),
        Err(OpenError::Reordered { seq: 2, .. })
    ));
    assert!(matches!(
        phone.open(&sealed[3]),
        Err(OpenError::Replay { seq: 4, .. })
    ));
    assert_eq!(phone.open(&sealed[4]).unwrap().gap, None);

    // Far behind the window, an envelope cannot be told from a replay.
    for _ in 0..200 {
        let next = laptop.seal(b"filler", &mut rng).unwrap();
        phone.open(&next).unwrap();
    }
    assert!(matches!(
        phone.open(&sealed[2]),
        Err(OpenError::TooOld { seq: 3, .. })
    ));
}

#[test]
fn padding_hides_exact_lengths() {
    let (mut laptop, _) = pair_of_keyrings();
    let mut rng = os_rng();
    let len = |n: usize, laptop: &mut Keyring, rng: &mut _| {
        laptop.seal(&vec![b'a'; n], rng).unwrap().len()
    };
    assert_eq!(
        len(0, &mut laptop, &mut rng),
        len(31, &mut laptop, &mut rng)
    );
    assert_eq!(
        len(33, &mut laptop, &mut rng),
        len(35, &mut laptop, &mut rng)
    );
    assert_eq!(
        len(1000, &mut laptop, &mut rng),
        len(1020, &mut laptop, &mut rng)
    );
}
