//! Fixed-seed devices and channels shared by the fuzz targets.
#![allow(dead_code)]

use std::sync::OnceLock;

use khub::channel::provider::Row;
use khub::channel::{Channel, Event, Joining};
use khub::ids::{ChannelId, DeviceId};
use khub::pairing::DeviceInfo;
use rand::SeedableRng;
use rand::rngs::StdRng;

/// What a joiner sends about itself: its id, token hash and a real MLS
/// KeyPackage (made once: key generation would dominate every run).
pub fn joiner_info() -> &'static DeviceInfo {
    static INFO: OnceLock<DeviceInfo> = OnceLock::new();
    INFO.get_or_init(|| {
        let mut rng = StdRng::seed_from_u64(5);
        let id = DeviceId::random(&mut rng);
        let (_, key_package) = Joining::start(id, "joiner").expect("a valid name");
        DeviceInfo::new(id, b"joiner's relay token", key_package)
    })
}

/// A two-member channel: the laptop's view, and the phone's saved state (its
/// JSON and MLS rows) from which a fresh copy can be loaded for every run.
pub struct TwoMembers {
    pub laptop: Channel,
    pub phone_meta: Vec<u8>,
    pub phone_rows: Vec<Row>,
}

impl TwoMembers {
    /// The laptop creates the channel and adds the phone, as pairing would.
    pub fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let channel = ChannelId::random(&mut rng);
        let mut laptop = Channel::create(channel, DeviceId::random(&mut rng), "laptop", 0)
            .expect("a new channel");
        let phone_id = DeviceId::random(&mut rng);
        let (joining, key_package) = Joining::start(phone_id, "phone").expect("a valid name");
        let (commit, welcome) = laptop
            .commit_add(phone_id, &key_package)
            .expect("adds the phone");
        let taken = laptop.take_in(&commit.envelope, 0);
        assert!(
            matches!(taken.event, Some(Event::OwnCommit(_))),
            "{taken:?}"
        );
        let mut phone = joining
            .join(channel, &welcome, 0)
            .expect("the Welcome admits the phone")
            .channel;
        // The first save after joining holds every row.
        let (phone_meta, changes) = phone.save();
        Self {
            laptop,
            phone_meta,
            phone_rows: changes.upserts,
        }
    }

    /// The phone as it was saved, fresh: it has taken nothing in.
    pub fn phone(&self) -> Channel {
        Channel::load(&self.phone_meta, self.phone_rows.clone()).expect("the saved state loads")
    }
}
