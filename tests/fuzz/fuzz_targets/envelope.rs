//! Opening envelopes and everything decoded from channel state: arbitrary
//! bytes, and a valid envelope with arbitrary bytes XORed over it. Nothing may
//! panic, and a changed envelope must never open.
#![no_main]

use std::sync::OnceLock;

use khub::channel::{Keyring, Member, Welcome};
use khub::crypto::envelope::EnvelopeHeader;
use khub::crypto::pairwise::DeviceSecret;
use khub::crypto::rekey::Rekey;
use khub::ids::{ChannelId, DeviceId};
use khub::pairing::DeviceInfo;
use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;
use rand::rngs::StdRng;

/// A receiver's exported keyring and a valid envelope for it.
fn fixture() -> &'static (Vec<u8>, Vec<u8>) {
    static FIXTURE: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let mut rng = StdRng::seed_from_u64(7);
        let secret = DeviceSecret::generate(&mut rng);
        let me = Member {
            id: DeviceId::random(&mut rng),
            public_key: secret.public_key(),
            name: "fuzz".into(),
        };
        let mut keyring = Keyring::create(ChannelId::random(&mut rng), me, secret, &mut rng);
        let envelope = keyring.seal(b"a note to mutate", &mut rng).unwrap();
        // A fresh export: its replay window has not seen the envelope.
        let fresh = {
            let mut rng = StdRng::seed_from_u64(7);
            let secret = DeviceSecret::generate(&mut rng);
            let me = Member {
                id: DeviceId::random(&mut rng),
                public_key: secret.public_key(),
                name: "fuzz".into(),
            };
            Keyring::create(ChannelId::random(&mut rng), me, secret, &mut rng).export()
        };
        (fresh.to_vec(), envelope)
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
