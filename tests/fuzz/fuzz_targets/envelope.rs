//! Taking envelopes in, and everything decoded from channel state: arbitrary
//! bytes, and a valid envelope with arbitrary bytes XORed over it. Nothing may
//! panic, and a changed envelope must never be taken in.
#![no_main]

use std::sync::OnceLock;

use khub::channel::{Channel, Event};
use khub::crypto::envelope::EnvelopeHeader;
use khub::pairing::{ChannelWelcome, DeviceInfo};
use libfuzzer_sys::fuzz_target;

#[path = "fixtures.rs"]
mod fixtures;

/// A receiver's saved state and a valid envelope for it.
fn fixture() -> &'static (fixtures::TwoMembers, Vec<u8>) {
    static FIXTURE: OnceLock<(fixtures::TwoMembers, Vec<u8>)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let mut members = fixtures::TwoMembers::new(7);
        let envelope = members
            .laptop
            .seal(b"a note to mutate")
            .expect("seals")
            .envelope;
        (members, envelope)
    })
}

fuzz_target!(|data: &[u8]| {
    let (members, valid) = fixture();
    // Loaded fresh for every run: it has not seen the envelope yet.
    let mut phone = members.phone();
    match data.split_first() {
        Some((0, mutation)) if !mutation.is_empty() => {
            let mut envelope = valid.clone();
            let mut changed = false;
            for (byte, m) in envelope.iter_mut().zip(mutation) {
                *byte ^= m;
                changed |= *m != 0;
            }
            let taken = phone.take_in(&envelope, 0);
            if changed {
                assert!(
                    taken.event.is_none(),
                    "a changed envelope was taken in: {taken:?}"
                );
                assert!(
                    !taken.refusals.is_empty(),
                    "a changed envelope was not refused"
                );
            } else {
                match taken.event {
                    Some(Event::App { plaintext, .. }) => {
                        assert_eq!(plaintext, b"a note to mutate")
                    }
                    other => panic!("the untouched envelope did not open: {other:?}"),
                }
            }
        }
        _ => {
            let taken = phone.take_in(data, 0);
            assert!(
                !matches!(taken.event, Some(Event::App { .. })),
                "arbitrary bytes were taken in as a message"
            );
            let _ = EnvelopeHeader::decode(data);
            let _ = Channel::load(data, []);
            let _ = DeviceInfo::decode(data);
            let _ = ChannelWelcome::decode(data);
            let _ = khub::client::control::Control::decode(data);
        }
    }
});
