//! The joiner's first state: answering whatever arrives as the inviter's
//! Start. Nothing may panic; anything but a well-formed Start is refused.
#![no_main]

use khub::pairing::{Code, Joiner, Nameplate};
use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;
use rand::rngs::StdRng;

#[path = "fixtures.rs"]
mod fixtures;

fuzz_target!(|data: &[u8]| {
    let mut rng = StdRng::seed_from_u64(1);
    let code = Code::generate(Nameplate::new(1).unwrap(), &mut rng);
    let me = fixtures::joiner_info();
    let _ = Joiner::respond(&code, [3; 16], data, me, &mut rng);
    let _ = khub::pairing::Message::decode(data);
});
