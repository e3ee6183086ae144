//! Properties over arbitrary input: every decoder refuses garbage without
//! panicking, a channel takes in nothing it should not, and every encoding
//! round-trips.

mod common;

use std::cell::RefCell;

use common::{Device, channel_of};
use khub::channel::{Channel, Event};
use khub::crypto::envelope::{self, EnvelopeHeader, HEADER_LEN};
use khub::ids::{ChannelId, DeviceId};
use khub::pairing::{ChannelWelcome, Code, DeviceInfo, Message, Nameplate};
use khub::protocol::{ClientFrame, Credentials};
use khub::vectors::ScriptedRng;
use proptest::prelude::*;

thread_local! {
    /// Two members of one channel, kept across cases (building them runs a
    /// pairing and MLS key generation).
    static PAIR: RefCell<(Channel, Channel)> = RefCell::new({
        let (a, b) = (Device::new("laptop"), Device::new("phone"));
        let mut channels = channel_of(&[&a, &b]).into_iter();
        (channels.next().unwrap(), channels.next().unwrap())
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn decoders_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = Message::decode(&bytes);
        let _ = EnvelopeHeader::decode(&bytes);
        let _ = DeviceInfo::decode(&bytes);
        let _ = ChannelWelcome::decode(&bytes);
        let _ = khub::client::control::Control::decode(&bytes);
        let _ = envelope::unpad(&bytes);
        prop_assert!(Channel::load(&bytes, []).is_err());
        PAIR.with(|pair| {
            let (_, phone) = &mut *pair.borrow_mut();
            let taken = phone.take_in(&bytes, 0);
            prop_assert!(taken.event.is_none(), "{:?}", taken);
            prop_assert_eq!(taken.refusals.len(), 1);
            prop_assert!(taken.outgoing.is_empty());
            Ok(())
        })?;
    }

    /// Garbage behind a header that routes to this channel, names a member
    /// and claims the current epoch: refused, never taken in, never a panic.
    #[test]
    fn garbage_behind_a_valid_header_is_refused(
        body in proptest::collection::vec(any::<u8>(), 64..600),
        seq in 1u64..u64::MAX,
    ) {
        PAIR.with(|pair| {
            let (laptop, phone) = &mut *pair.borrow_mut();
            let header = EnvelopeHeader {
                channel: phone.channel(),
                epoch: phone.epoch() as u32,
                sender: laptop.me(),
                seq,
            };
            let envelope = [&header.encode()[..], &body].concat();
            let taken = phone.take_in(&envelope, 0);
            prop_assert!(taken.event.is_none(), "{:?}", taken);
            prop_assert_eq!(taken.refusals.len(), 1);
            Ok(())
        })?;
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
    fn headers_and_padding_round_trip(
        plaintext in proptest::collection::vec(any::<u8>(), 0..3000),
        channel in any::<[u8; 16]>(),
        sender in any::<[u8; 16]>(),
        epoch in any::<u32>(),
        seq in 1u64..u64::MAX,
    ) {
        let header = EnvelopeHeader {
            channel: ChannelId::from_bytes(channel),
            epoch,
            sender: DeviceId::from_bytes(sender),
            seq,
        };
        let encoded = header.encode();
        prop_assert_eq!(encoded.len(), HEADER_LEN);
        prop_assert_eq!(encoded[0], 2);
        let envelope = [&encoded[..], &[0; 64]].concat();
        prop_assert_eq!(EnvelopeHeader::decode(&envelope).unwrap(), header);

        let padded = envelope::pad(&plaintext);
        prop_assert_eq!(padded.len(), envelope::padded_len(plaintext.len()));
        prop_assert!(padded.len() <= (plaintext.len() + 1).max(envelope::MIN_PADDED_LEN) * 112 / 100 + 1);
        prop_assert_eq!(envelope::unpad(&padded).unwrap(), plaintext);
    }

    #[test]
    fn sealed_messages_reach_the_other_member_intact(
        plaintext in proptest::collection::vec(any::<u8>(), 0..3000),
    ) {
        PAIR.with(|pair| {
            let (laptop, phone) = &mut *pair.borrow_mut();
            let sealed = laptop.seal(&plaintext).unwrap();
            let header = EnvelopeHeader::decode(&sealed.envelope).unwrap();
            prop_assert_eq!(header.sender, laptop.me());
            prop_assert_eq!(header.seq, sealed.seq);
            prop_assert!(sealed.envelope.len() > HEADER_LEN + envelope::padded_len(plaintext.len()));
            let taken = phone.take_in(&sealed.envelope, 0);
            prop_assert!(taken.refusals.is_empty(), "{:?}", taken.refusals);
            match taken.event {
                Some(Event::App { sender, plaintext: got }) => {
                    prop_assert_eq!(sender.id, laptop.me());
                    prop_assert_eq!(got, plaintext);
                }
                other => prop_assert!(false, "not a message: {:?}", other),
            }
            Ok(())
        })?;
    }

    #[test]
    fn pairing_payloads_round_trip(
        id in any::<[u8; 16]>(),
        token in proptest::collection::vec(any::<u8>(), 0..64),
        mls in proptest::collection::vec(any::<u8>(), 0..2000),
        cursor in any::<u64>(),
    ) {
        let info = DeviceInfo::new(DeviceId::from_bytes(id), &token, mls.clone());
        let encoded = info.encode();
        prop_assert_eq!(DeviceInfo::decode(&encoded).unwrap(), info);
        let welcome = ChannelWelcome { channel: ChannelId::from_bytes(id), cursor, welcome: mls };
        let encoded_welcome = welcome.encode();
        prop_assert_eq!(ChannelWelcome::decode(&encoded_welcome).unwrap(), welcome);
        // Protocol 1's version byte is refused, naming the protocol.
        for mut bytes in [encoded, encoded_welcome] {
            bytes[0] = 1;
            let refused = DeviceInfo::decode(&bytes).err().or(ChannelWelcome::decode(&bytes).err());
            prop_assert!(refused.unwrap().0.contains("protocol 1"));
        }
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
