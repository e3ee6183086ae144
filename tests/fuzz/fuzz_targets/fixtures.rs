//! Fixed-seed devices and channels shared by the fuzz targets.
#![allow(dead_code)]

use khub::channel::{Keyring, Member};
use khub::crypto::pairwise::DeviceSecret;
use khub::ids::{ChannelId, DeviceId};
use khub::pairing::DeviceInfo;
use rand::SeedableRng;
use rand::rngs::StdRng;

/// A new device's member record and secret, drawn from `rng`.
pub fn member(rng: &mut StdRng, name: &str) -> (Member, DeviceSecret) {
    let secret = DeviceSecret::generate(rng);
    let member = Member {
        id: DeviceId::random(rng),
        public_key: secret.public_key(),
        name: name.into(),
    };
    (member, secret)
}

/// What a joiner sends about itself.
pub fn joiner_info(rng: &mut StdRng) -> DeviceInfo {
    DeviceInfo::new(member(rng, "joiner").0, b"joiner's relay token")
}

/// A one-member channel, the same for the same seed.
pub fn keyring(seed: u64) -> (Keyring, StdRng) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (me, secret) = member(&mut rng, "fuzz");
    let keyring = Keyring::create(ChannelId::random(&mut rng), me, secret, &mut rng);
    (keyring, rng)
}
