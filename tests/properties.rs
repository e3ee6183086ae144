//! Properties over arbitrary input: every decoder refuses garbage without
//! panicking, and every encoding round-trips.

use khub::channel::{Keyring, Welcome};
use khub::crypto::envelope::{self, ChannelKey, EnvelopeHeader};
use khub::crypto::rekey::Rekey;
use khub::ids::{ChannelId, DeviceId};
use khub::pairing::{Code, DeviceInfo, Message, Nameplate};
use khub::protocol::{ClientFrame, Credentials};
use khub::vectors::ScriptedRng;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn decoders_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = Message::decode(&bytes);
        let _ = EnvelopeHeader::decode(&bytes);
        let _ = Rekey::decode(&bytes);
        let _ = Welcome::decode(&bytes);
        let _ = DeviceInfo::decode(&bytes);
        let _ = Keyring::import(&bytes);
        let _ = khub::client::control::Control::decode(&bytes);
        let key = ChannelKey::from_bytes([3; 32]).sender_key(&ChannelId::from_bytes([1; 16]), 0, &DeviceId::from_bytes([2; 16]));
        prop_assert!(envelope::open(&key, &bytes).is_err());
    }

    #[test]
    fn text_parsers_never_panic(text in "\\PC{0,300}") {
        let _ = Code::parse(&text);
        let _ = ClientFrame::decode(&text, 1 << 20);
        let _ = Credentials::from_header(&text);
        let _ = text.parse::<DeviceId>();
    }

    #[test]
    fn frames_near_valid_ones_never_panic(cursor in any::<u64>(), v in any::<u32>(), junk in "[a-zA-Z0-9_\\-]{0,60}") {
        let frames = [
            format!(r#"{{"type":"hello","v":{v},"channel":"{junk}","device":"{junk}","token":"{junk}","cursor":{cursor}}}"#),
            format!(r#"{{"type":"publish","envelope":"{junk}"}}"#),
            format!(r#"{{"type":"{junk}"}}"#),
        ];
        for frame in frames {
            let _ = ClientFrame::decode(&frame, 1 << 20);
        }
    }

    #[test]
    fn codes_round_trip_through_display(nameplate in 1u32..=999_999, seed in any::<[u8; 5]>()) {
        let code = Code::generate(Nameplate::new(nameplate).unwrap(), &mut ScriptedRng::new([seed.to_vec()]));
        let shown = code.display();
        prop_assert_eq!(Code::parse(&shown).unwrap(), Code::parse(&shown.to_lowercase()).unwrap());
        prop_assert!(Code::parse(&shown).unwrap() == code);
    }

    #[test]
    fn envelopes_round_trip_and_headers_match(
        plaintext in proptest::collection::vec(any::<u8>(), 0..3000),
        epoch in any::<u32>(),
        seq in 1u64..u64::MAX,
        nonce in any::<[u8; 24]>(),
    ) {
        let (channel, sender) = (ChannelId::from_bytes([4; 16]), DeviceId::from_bytes([5; 16]));
        let key = ChannelKey::from_bytes([6; 32]).sender_key(&channel, epoch, &sender);
        let header = EnvelopeHeader { channel, epoch, sender, seq };
        let sealed = envelope::seal(&key, &header, &plaintext, &mut ScriptedRng::new([nonce.to_vec()])).unwrap();
        prop_assert_eq!(EnvelopeHeader::decode(&sealed).unwrap(), header);
        prop_assert_eq!(envelope::open(&key, &sealed).unwrap(), plaintext.clone());
        prop_assert_eq!(sealed.len(), envelope::HEADER_LEN + 24 + envelope::padded_len(plaintext.len()) + 16);
    }

    #[test]
    fn pairing_messages_round_trip(ya in any::<[u8; 32]>(), tag in proptest::collection::vec(any::<u8>(), 64), sealed in proptest::collection::vec(any::<u8>(), 41..200)) {
        let tag: [u8; 64] = tag.try_into().unwrap();
        for message in [
            Message::Start { ya: &ya },
            Message::Response { yb: &ya, tb: &tag, sealed: &sealed },
            Message::Finish { ta: &tag, sealed: &sealed },
        ] {
            let encoded = message.encode();
            prop_assert_eq!(Message::decode(&encoded).unwrap(), message);
        }
    }
}
