//! Helpers shared by the integration tests: devices, codes and complete pairings.
#![allow(dead_code)]

use std::cell::RefCell;

use khub::channel::{Channel, Event, Joining};
use khub::crypto::os_rng;
use khub::ids::{ChannelId, DeviceId};
use khub::pairing::{
    ChannelWelcome, Code, DeviceInfo, Inviter, Joined, Joiner, Nameplate, Paired, SID_LEN,
};

/// A new device: its id, name, relay token, and the MLS state that waits for
/// a Welcome.
pub struct Device {
    pub id: DeviceId,
    pub name: String,
    pub token: [u8; 32],
    joining: RefCell<Option<Joining>>,
    key_package: Vec<u8>,
}

impl Device {
    pub fn new(name: &str) -> Self {
        let mut rng = os_rng();
        let mut token = [0u8; 32];
        rand::Rng::fill_bytes(&mut rng, &mut token);
        let id = DeviceId::random(&mut rng);
        let (joining, key_package) = Joining::start(id, name).unwrap();
        Self {
            id,
            name: name.to_owned(),
            token,
            joining: RefCell::new(Some(joining)),
            key_package,
        }
    }

    pub fn info(&self) -> DeviceInfo {
        DeviceInfo::new(self.id, &self.token, self.key_package.clone())
    }

    pub fn id(&self) -> DeviceId {
        self.id
    }

    /// Joins the channel a completed pairing welcomed this device to (once).
    pub fn join(&self, joined: &Joined) -> Channel {
        self.join_welcome(&joined.welcome)
    }

    /// Joins the channel of `welcome` (once).
    pub fn join_welcome(&self, welcome: &ChannelWelcome) -> Channel {
        let joining = self.joining.borrow_mut().take().expect("joins once");
        joining
            .join(welcome.channel, &welcome.welcome, 0)
            .expect("the Welcome admits this device")
            .channel
    }
}

pub fn new_code(nameplate: u32) -> Code {
    Code::generate(Nameplate::new(nameplate).unwrap(), &mut os_rng())
}

pub fn sid() -> [u8; SID_LEN] {
    let mut sid = [0u8; SID_LEN];
    rand::Rng::fill_bytes(&mut os_rng(), &mut sid);
    sid
}

/// A one-member channel for `device`.
pub fn new_channel(device: &Device) -> Channel {
    Channel::create(ChannelId::random(&mut os_rng()), device.id, &device.name, 0).unwrap()
}

/// A stand-in channel welcome, for pairing tests that never join.
pub fn stand_in_welcome(channel: &Channel) -> ChannelWelcome {
    ChannelWelcome {
        channel: channel.channel(),
        cursor: 1,
        welcome: vec![0x5a; 64],
    }
}

/// Commits the Add of `info`'s device in `channel` and takes the commit back
/// in as the relay would order it. Returns the commit envelope and the welcome.
pub fn add(channel: &mut Channel, info: &DeviceInfo) -> (Vec<u8>, ChannelWelcome) {
    let (commit, welcome) = channel.commit_add(info.id, &info.key_package).unwrap();
    let taken = channel.take_in(&commit.envelope, 0);
    assert!(
        matches!(taken.event, Some(Event::OwnCommit(_))),
        "{taken:?}"
    );
    let welcome = ChannelWelcome {
        channel: channel.channel(),
        cursor: 1,
        welcome,
    };
    (commit.envelope, welcome)
}

/// Runs a whole pairing between `inviter` (holding `channel`) and `joiner`,
/// with the codes each side has. Returns both sides' outcomes.
pub fn pair(
    channel: &mut Channel,
    inviter_code: &Code,
    joiner: &Device,
    joiner_code: &Code,
) -> (
    Result<Paired, khub::pairing::PairingError>,
    Result<Joined, khub::pairing::PairingError>,
) {
    let mut rng = os_rng();
    let sid = sid();
    let (awaiting, start) = Inviter::start(inviter_code, sid, &mut rng);
    let (awaiting_finish, response) =
        match Joiner::respond(joiner_code, sid, &start, &joiner.info(), &mut rng) {
            Ok(ok) => ok,
            Err(e) => return (Err(e.clone()), Err(e)),
        };
    match awaiting.receive(&response) {
        Ok(admission) => {
            let (_, welcome) = add(channel, admission.joiner());
            let (finish, paired) = admission.finish(&welcome, &mut rng);
            (Ok(paired), awaiting_finish.receive(&finish))
        }
        Err(e) => {
            // A burns the pairing and tells B why.
            let abort = khub::pairing::Message::Abort(e.abort_reason()).encode();
            (Err(e), awaiting_finish.receive(&abort))
        }
    }
}

/// A channel whose members are `devices`, every member's view of it, built
/// by real pairings from the first device; earlier members take in each
/// later Add as the relay would deliver it.
pub fn channel_of(devices: &[&Device]) -> Vec<Channel> {
    let mut all = vec![new_channel(devices[0])];
    for (i, device) in devices[1..].iter().enumerate() {
        let code = new_code(i as u32 + 1);
        let mut rng = os_rng();
        let sid = sid();
        let (awaiting, start) = Inviter::start(&code, sid, &mut rng);
        let (awaiting_finish, response) =
            Joiner::respond(&code, sid, &start, &device.info(), &mut rng).unwrap();
        let admission = awaiting.receive(&response).unwrap();
        let (commit, welcome) = add(&mut all[0], admission.joiner());
        for member in &mut all[1..] {
            let taken = member.take_in(&commit, 0);
            assert!(
                matches!(taken.event, Some(Event::Commit { .. })),
                "{taken:?}"
            );
        }
        let (finish, _) = admission.finish(&welcome, &mut rng);
        let joined = awaiting_finish.receive(&finish).unwrap();
        all.push(device.join(&joined));
    }
    all
}

/// Alice, Bob and Dave in one channel: their devices, and each one's view of it.
pub struct Three {
    pub a: Device,
    pub b: Device,
    pub d: Device,
    pub alice: Channel,
    pub bob: Channel,
    pub dave: Channel,
}

pub fn alice_bob_dave() -> Three {
    let (a, b, d) = (
        Device::new("alice"),
        Device::new("bob"),
        Device::new("dave"),
    );
    let mut ch = channel_of(&[&a, &b, &d]);
    let (dave, bob, alice) = (ch.pop().unwrap(), ch.pop().unwrap(), ch.pop().unwrap());
    Three {
        a,
        b,
        d,
        alice,
        bob,
        dave,
    }
}

/// Resident memory of process `pid`, in KiB (Linux `/proc`).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

pub mod delivery;
pub mod net;
pub mod pg;

/// A fresh, empty directory under the system temp dir, named for `purpose`.
pub fn tempdir(purpose: &str) -> std::path::PathBuf {
    khub::testing::TempDir::new(purpose).keep()
}

/// The first line a child process prints, waiting at most a minute for it.
pub fn first_line(stdout: std::process::ChildStdout) -> String {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .expect("a first line in time")
}

/// Pairs a new SDK device named `name` (state in `home`) with `inviter`
/// through the relay at `url`; both sides must show the same SAS.
pub async fn sdk_join(
    inviter: &khub::client::Device,
    home: &std::path::Path,
    url: &str,
    name: &str,
) -> khub::client::Device {
    khub::testing::pair_device(inviter, home, url, name, std::time::Duration::from_secs(20))
        .await
        .unwrap()
        .0
}

/// Takes `envelope` in on `channel` and returns the application payload it
/// carried; panics on anything else (a refusal, a commit, an own message).
pub fn open(channel: &mut Channel, envelope: &[u8]) -> Vec<u8> {
    let taken = channel.take_in(envelope, 0);
    assert!(taken.refusals.is_empty(), "refused: {taken:?}");
    match taken.event {
        Some(Event::App { plaintext, .. }) => plaintext,
        other => panic!("not an application message: {other:?}"),
    }
}
