//! The joiner waiting for Finish after a genuine Start: whatever arrives must
//! be refused without a panic (a valid Finish needs the inviter's keys).
#![no_main]

use std::sync::OnceLock;

use khub::pairing::{Code, Inviter, Joiner, Nameplate};
use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;
use rand::rngs::StdRng;

#[path = "fixtures.rs"]
mod fixtures;

fn start() -> &'static (Code, Vec<u8>) {
    static START: OnceLock<(Code, Vec<u8>)> = OnceLock::new();
    START.get_or_init(|| {
        let mut rng = StdRng::seed_from_u64(3);
        let code = Code::generate(Nameplate::new(1).unwrap(), &mut rng);
        let (_, start) = Inviter::start(&code, [3; 16], &mut rng);
        (code, start)
    })
}

fuzz_target!(|data: &[u8]| {
    let (code, start) = start();
    let mut rng = StdRng::seed_from_u64(4);
    let me = fixtures::joiner_info();
    let (joiner, _response) =
        Joiner::respond(code, [3; 16], start, me, &mut rng).expect("a genuine start");
    assert!(
        joiner.receive(data).is_err(),
        "a forged finish was accepted"
    );
});
