//! A relay in this process over a temporary SQLite file, and paired devices.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::client::{ClientError, Device, join};
use crate::ids::DeviceId;
use crate::pairing::Code;
use crate::relay::Relay;
use crate::relay::config::{Limits, RelayConfig};
use crate::relay::server::Running;
use crate::relay::store::sqlite::SqliteStore;

/// How long pairing steps and shutdowns may take before the harness gives up.
const PATIENCE: Duration = Duration::from_secs(30);

/// A directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh, empty directory named for `purpose`.
    pub fn new(purpose: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "khub-{purpose}-{}-{}",
            std::process::id(),
            DeviceId::random(&mut crate::crypto::os_rng())
        ));
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        Self(dir)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Keeps the directory after all (for a test that removes it itself, or
    /// wants it kept): its path, and no removal on drop.
    pub fn keep(self) -> PathBuf {
        std::mem::take(&mut std::mem::ManuallyDrop::new(self).0)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A relay running in this process on an ephemeral port, storing in
/// `relay.db` in its own temporary directory.
pub struct TestRelay {
    addr: SocketAddr,
    limits: Limits,
    // Declared before `dir`: the relay stops before its directory goes.
    running: Option<(Arc<Relay>, Running)>,
    dir: TempDir,
}

impl TestRelay {
    /// Starts a relay with `limits` (and no operator secret).
    pub async fn start(limits: Limits) -> std::io::Result<Self> {
        let mut relay = Self {
            addr: "127.0.0.1:0".parse().expect("an address"),
            limits,
            running: None,
            dir: TempDir::new("relay"),
        };
        relay.run().await?;
        Ok(relay)
    }

    async fn run(&mut self) -> std::io::Result<()> {
        let listener = TcpListener::bind(self.addr).await?;
        self.addr = listener.local_addr()?;
        let store = SqliteStore::open(&self.db_path()).map_err(std::io::Error::other)?;
        let config = RelayConfig {
            limits: self.limits.clone(),
            ..RelayConfig::default()
        };
        let relay = Relay::new(Arc::new(store), config);
        let running = Running::spawn(Arc::clone(&relay), listener);
        self.running = Some((relay, running));
        Ok(())
    }

    /// The relay's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its URL, for devices.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The SQLite file it stores in.
    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("relay.db")
    }

    /// The directory holding the SQLite file and its WAL.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The running relay (its store, metrics…), if it runs.
    pub fn relay(&self) -> Option<&Arc<Relay>> {
        self.running.as_ref().map(|(relay, _)| relay)
    }

    /// Shuts the relay down gracefully and waits for it.
    pub async fn stop(&mut self) {
        if let Some((_, running)) = self.running.take() {
            let _ = running.stop(PATIENCE).await;
        }
    }

    /// Stops the relay and starts it again on the same address and file.
    pub async fn restart(&mut self) -> std::io::Result<()> {
        self.stop().await;
        self.run().await
    }
}

/// One device per URL in `urls`, all in one new channel, each paired with
/// the first by a real pairing; device `i` talks to the relay through
/// `urls[i]` (the relay itself, or a proxy in front of it) and keeps its state
/// in `home/device-i`. Every device knows every member when this returns.
pub async fn paired_devices(home: &Path, urls: &[String]) -> Result<PairedDevices, ClientError> {
    let first_url = urls
        .first()
        .ok_or_else(|| ClientError::Invalid("no device to make".into()))?;
    let first = Device::create(&home.join("device-0"), first_url, "device-0").await?;
    let mut devices = vec![first];
    let mut codes = Vec::new();
    for (i, url) in urls.iter().enumerate().skip(1) {
        let name = format!("device-{i}");
        let (device, code) =
            pair_device(&devices[0], &home.join(&name), url, &name, PATIENCE).await?;
        devices.push(device);
        codes.push(code);
    }
    // Earlier members learn of later ones from the announcements.
    for device in &devices {
        tokio::time::timeout(PATIENCE, device.sync())
            .await
            .map_err(|_| ClientError::Timeout(PATIENCE.as_secs()))??;
    }
    Ok(PairedDevices { devices, codes })
}

/// Pairs a new device named `name` (state in `home`, talking to the relay
/// through `url`) with `inviter`, each side waiting at most `timeout`, and
/// checks both show the same SAS. Returns it with the code that paired it.
pub async fn pair_device(
    inviter: &Device,
    home: &Path,
    url: &str,
    name: &str,
    timeout: Duration,
) -> Result<(Device, Code), ClientError> {
    let invitation = inviter.invite().await?;
    let code = Code::parse(&invitation.code()).map_err(ClientError::Code)?;
    let completing = tokio::spawn(invitation.complete(timeout));
    let (device, joined) = join(home, url, name, &code, timeout).await?;
    let member = completing
        .await
        .map_err(|e| ClientError::Bug(e.to_string()))??;
    if member.sas != joined.sas {
        return Err(ClientError::Protocol(format!(
            "the two sides show different SAS: {} and {}",
            member.sas, joined.sas
        )));
    }
    Ok((device, code))
}

/// What [`paired_devices`] made.
pub struct PairedDevices {
    /// The devices, the channel's creator first.
    pub devices: Vec<Device>,
    /// The codes that paired them (secrets the relay must never have seen).
    pub codes: Vec<Code>,
}
