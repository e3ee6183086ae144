//! A TCP proxy that injects network faults between devices and the relay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The faults in force; changed at any time, read per chunk.
#[derive(Default)]
struct Faults {
    /// Bumped to cut every open connection.
    cuts: watch::Sender<u64>,
    /// Hold every byte (connections stay open) while set.
    stalled: watch::Sender<bool>,
    /// Hold every byte from devices to the relay while set.
    stalled_up: watch::Sender<bool>,
    /// Delay before each chunk is passed on, in milliseconds.
    delay_ms: AtomicU64,
    /// Pass chunks on in pieces of at most this many bytes (0: whole).
    split: AtomicUsize,
    /// Refuse new connections while set.
    refusing: AtomicBool,
    /// Connections accepted so far.
    accepted: AtomicU64,
    /// Bytes passed from the relay to devices so far.
    downstream: AtomicU64,
}

/// A TCP proxy on an ephemeral port in front of `upstream`. Point a device
/// at [`url`](Self::url) instead of the relay; then cut, stall, delay or
/// split what passes.
pub struct FaultProxy {
    addr: SocketAddr,
    faults: Arc<Faults>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let faults = Arc::new(Faults::default());
        let task = tokio::spawn(accept(listener, upstream, Arc::clone(&faults)));
        Ok(Self { addr, faults, task })
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://` URL of the proxy, for devices.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every connection open now (both directions, at once, without a
    /// WebSocket close: as when a network drops).
    pub fn cut(&self) {
        self.faults.cuts.send_modify(|n| *n += 1);
    }

    /// Holds (`true`) or releases (`false`) all traffic; connections stay open.
    pub fn stall(&self, stalled: bool) {
        self.faults.stalled.send_replace(stalled);
    }

    /// Holds (`true`) or releases (`false`) what devices send; what the relay
    /// sends still passes.
    pub fn stall_upstream(&self, stalled: bool) {
        self.faults.stalled_up.send_replace(stalled);
    }

    /// Delays every chunk by `delay` before passing it on.
    pub fn delay(&self, delay: Duration) {
        self.faults
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// Passes data on in pieces of at most `bytes` (0: as read), each written
    /// separately, so frames arrive split at arbitrary points.
    pub fn split(&self, bytes: usize) {
        self.faults.split.store(bytes, Ordering::Relaxed);
    }

    /// Refuses (`true`) new connections, as a relay that is down would.
    pub fn refuse(&self, refusing: bool) {
        self.faults.refusing.store(refusing, Ordering::Relaxed);
    }

    /// Connections accepted so far (refused ones included).
    pub fn connections(&self) -> u64 {
        self.faults.accepted.load(Ordering::Relaxed)
    }

    /// Bytes passed from the relay towards the device so far (HTTP and
    /// WebSocket framing included).
    pub fn bytes_down(&self) -> u64 {
        self.faults.downstream.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

async fn accept(listener: TcpListener, upstream: SocketAddr, faults: Arc<Faults>) {
    while let Ok((client, _)) = listener.accept().await {
        faults.accepted.fetch_add(1, Ordering::Relaxed);
        if faults.refusing.load(Ordering::Relaxed) {
            continue;
        }
        let faults = Arc::clone(&faults);
        tokio::spawn(async move {
            let mut cuts = faults.cuts.subscribe();
            cuts.borrow_and_update();
            let Ok(Ok(server)) =
                tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(upstream)).await
            else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::select! {
                _ = pump(client_read, server_write, &faults, Some(&faults.stalled_up), None) => {}
                _ = pump(server_read, client_write, &faults, None, Some(&faults.downstream)) => {}
                _ = cuts.changed() => {}
            }
        });
    }
}

/// Copies one direction until either side closes, applying the faults.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    faults: &Faults,
    also_stalled: Option<&watch::Sender<bool>>,
    counted: Option<&AtomicU64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut stalls = vec![faults.stalled.subscribe()];
    stalls.extend(also_stalled.map(watch::Sender::subscribe));
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        for stalled in &mut stalls {
            while *stalled.borrow_and_update() {
                if stalled.changed().await.is_err() {
                    return;
                }
            }
        }
        let delay = faults.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let piece = match faults.split.load(Ordering::Relaxed) {
            0 => n,
            limit => limit,
        };
        for chunk in buf[..n].chunks(piece) {
            if to.write_all(chunk).await.is_err() || to.flush().await.is_err() {
                return;
            }
            if let Some(counted) = counted {
                counted.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        }
    }
}
