//! The inviter waiting for a Response: whatever arrives must be refused
//! without a panic unless it is a Response made with the code (which a fuzzer
//! cannot produce: that would be a forgery).
#![no_main]

use khub::pairing::{Code, Inviter, Nameplate};
use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;
use rand::rngs::StdRng;

fuzz_target!(|data: &[u8]| {
    let mut rng = StdRng::seed_from_u64(2);
    let code = Code::generate(Nameplate::new(1).unwrap(), &mut rng);
    let (inviter, _start) = Inviter::start(&code, [3; 16], &mut rng);
    assert!(
        inviter.receive(data).is_err(),
        "a forged response was accepted"
    );
});
