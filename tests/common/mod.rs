//! Helpers shared by the integration tests: devices, codes and complete pairings.
#![allow(dead_code)]

use khub::channel::{Keyring, Member};
use khub::crypto::os_rng;
use khub::crypto::pairwise::DeviceSecret;
use khub::ids::{ChannelId, DeviceId};
use khub::pairing::{Code, DeviceInfo, Inviter, Joined, Joiner, Nameplate, Paired, SID_LEN};

/// A device's identity and secret, as its state on disk would hold them.
pub struct Device {
    pub member: Member,
    pub secret: DeviceSecret,
    pub token: [u8; 32],
}

impl Device {
    pub fn new(name: &str) -> Self {
        let mut rng = os_rng();
        let secret = DeviceSecret::generate(&mut rng);
        let mut token = [0u8; 32];
        rand::Rng::fill_bytes(&mut rng, &mut token);
        Self {
            member: Member {
                id: DeviceId::random(&mut rng),
                public_key: secret.public_key(),
                name: name.to_owned(),
            },
            secret,
            token,
        }
    }

    pub fn info(&self) -> DeviceInfo {
        DeviceInfo::new(self.member.clone(), &self.token)
    }

    pub fn id(&self) -> DeviceId {
        self.member.id
    }

    /// A copy of the device's secret (devices keep theirs; tests hand one to a keyring).
    pub fn secret_copy(&self) -> DeviceSecret {
        DeviceSecret::from_bytes(*self.secret.expose())
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
pub fn new_channel(device: &Device) -> Keyring {
    Keyring::create(
        ChannelId::random(&mut os_rng()),
        device.member.clone(),
        device.secret_copy(),
        &mut os_rng(),
    )
}

/// Runs a whole pairing between `inviter` (holding `keyring`) and `joiner`,
/// with the codes each side has. Returns both sides' outcomes.
pub fn pair(
    keyring: &mut Keyring,
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
            keyring
                .add_member(admission.joiner().member.clone())
                .unwrap();
            let (finish, paired) = admission.finish(&keyring.welcome(), &mut rng);
            (Ok(paired), awaiting_finish.receive(&finish))
        }
        Err(e) => {
            // A burns the pairing and tells B why.
            let abort = khub::pairing::Message::Abort(e.abort_reason()).encode();
            (Err(e), awaiting_finish.receive(&abort))
        }
    }
}

/// A channel whose members are `devices`, all holding keyrings, built by real
/// pairings from the first device.
pub fn channel_of(devices: &[&Device]) -> Vec<Keyring> {
    let mut first = new_channel(devices[0]);
    let mut joined = Vec::new();
    for (i, device) in devices[1..].iter().enumerate() {
        let code = new_code(i as u32 + 1);
        let (a, b) = pair(&mut first, &code, device, &code);
        a.expect("inviter pairs");
        let b = b.expect("joiner pairs");
        joined.push(
            Keyring::from_welcome(b.welcome, device.id(), device.secret_copy()).expect("member"),
        );
    }
    // Earlier joiners learn of later members the way the SDK will tell them.
    let members: Vec<Member> = first.members().cloned().collect();
    for keyring in &mut joined {
        for m in &members {
            keyring.add_member(m.clone()).unwrap();
        }
    }
    let mut all = vec![first];
    all.extend(joined);
    all
}

pub mod net;

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
