//! Opening envelopes and everything decoded from channel state: arbitrary
//! bytes, and a valid envelope with arbitrary bytes XORed over it. Nothing may
//! panic, and a changed envelope must never open.
#![no_main]

use std::sync::OnceLock;

use khub::channel::{Keyring, Welcome};
use khub::crypto::envelope::EnvelopeHeader;
use khub::crypto::rekey::Rekey;
use khub::pairing::DeviceInfo;
use libfuzzer_sys::fuzz_target;

#[path = "fixtures.rs"]
mod fixtures;

/// A receiver's exported keyring and a valid envelope for it.
fn fixture() -> &'static (Vec<u8>, Vec<u8>) {
    static FIXTURE: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let (mut sender, mut rng) = fixtures::keyring(7);
        let envelope = sender.seal(b"a note to mutate", &mut rng).unwrap();
        // The same channel and device, fresh: its replay window has not seen
        // the envelope.
        let (receiver, _) = fixtures::keyring(7);
        (receiver.export().to_vec(), envelope)
    })
}

fuzz_target!(|data: &[u8]| {
    let (exported, valid) = fixture();
    let mut keyring = Keyring::import(exported).expect("fixture imports");
    match data.split_first() {
        Some((0, mutation)) if !mutation.is_empty() => {
            let mut envelope = valid.clone();
            let mut changed = false;
            for (byte, m) in envelope.iter_mut().zip(mutation) {
                *byte ^= m;
                changed |= *m != 0;
            }
            let opened = keyring.open(&envelope);
            if changed {
                assert!(opened.is_err(), "a changed envelope opened");
            } else {
                assert_eq!(opened.expect("the untouched envelope opens").plaintext, b"a note to mutate");
            }
        }
        _ => {
            let _ = keyring.open(data);
            let _ = EnvelopeHeader::decode(data);
            let _ = Keyring::import(data);
            let _ = Rekey::decode(data);
            let _ = Welcome::decode(data);
            let _ = DeviceInfo::decode(data);
            let _ = khub::client::control::Control::decode(data);
        }
    }
});
