//! Two `khub serve` processes on one PostgreSQL database behind a real load
//! balancer (HAProxy, round robin, health checks), with a fault proxy between
//! every device and the balancer. Five devices pair across the nodes and
//! exchange 1,000 messages each while their connections are cut; halfway
//! through one node is killed with SIGKILL. Sessions move to the other node;
//! no acked envelope is lost and nothing arrives twice.
//!
//! Needs PostgreSQL (see `common::pg`) and `haproxy` on PATH; without them it
//! says so and passes, unless KHUB_REQUIRE_POSTGRES / KHUB_REQUIRE_HAPROXY
//! (CI sets both).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::delivery::{check_delivery, cut_randomly, exchange, secrets_of, sent};
use khub::ids::DeviceId;
use khub::testing::{FaultProxy, TempDir, paired_devices};

const DEVICES: usize = 5;
const MESSAGES: usize = 1000;
/// The whole scenario must finish in this time.
const SCENARIO: Duration = Duration::from_secs(180);

/// A child process killed (SIGKILL) when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `khub serve` on `db`, its log in `log`; its address.
fn node(db: &common::pg::TestDb, log: &Path) -> (Process, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_khub"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        // The database URL goes in the environment, as README advises.
        .env("KHUB_STORE", db.url())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("khub serve starts");
    let stdout = child.stdout.take().unwrap();
    let process = Process(child);
    let line = common::first_line(stdout);
    let addr = line
        .split_whitespace()
        .find_map(|word| word.trim_end_matches(',').parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?} (see {})", log.display()));
    (process, addr)
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// HAProxy in front of `nodes`; its address once it routes to a healthy node.
async fn balancer(dir: &Path, nodes: &[SocketAddr]) -> Option<(Process, SocketAddr)> {
    let found = Command::new("haproxy").arg("-v").output();
    if !matches!(&found, Ok(out) if out.status.success()) {
        if std::env::var_os("KHUB_REQUIRE_HAPROXY").is_some() {
            panic!("KHUB_REQUIRE_HAPROXY is set but haproxy cannot be run: {found:?}");
        }
        eprintln!("skipped: haproxy is not installed (apt-get install haproxy)");
        return None;
    }
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let servers: String = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| format!("    server node{i} {node} check\n"))
        .collect();
    let config = format!(
        "global
    maxconn 2000
defaults
    mode http
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    timeout tunnel 120s
    retries 3
    option redispatch
frontend khub
    bind {addr}
    default_backend nodes
backend nodes
    balance roundrobin
    option httpchk GET /healthz
    default-server inter 300ms fall 2 rise 2
{servers}"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config).unwrap();
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("haproxy.log")).unwrap())
        .spawn()
        .expect("haproxy starts");
    let process = Process(child);
    for _ in 0..100 {
        let up = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
            .await
            .is_ok_and(|c| c.is_ok());
        if up
            && common::net::http(addr, "GET", "/healthz", &[], b"")
                .await
                .status
                == 200
        {
            return Some((process, addr));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "haproxy did not route to a node (see {})",
        dir.join("haproxy.log").display()
    );
}

/// The last lines of the nodes' and the balancer's logs, for a failure message.
fn log_tails(dir: &Path) -> String {
    ["node0.log", "node1.log", "haproxy.log"]
        .iter()
        .map(|name| {
            let text = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n");
            let trouble: Vec<&str> = lines
                .iter()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .take(10)
                .copied()
                .collect();
            format!(
                "--- {name} (first warnings)\n{}\n--- {name} (last lines)\n{tail}",
                trouble.join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Where each device stands, for a failure message: its cursor, what it has
/// not had acked, and what went wrong on its side.
fn device_states(devices: &[khub::client::Device]) -> String {
    devices
        .iter()
        .map(|d| {
            format!(
                "--- {}: cursor {}, {:?} not acked, incidents {:?}",
                d.name(),
                d.cursor(),
                d.pending(),
                d.incidents()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_devices_across_two_nodes_lose_nothing_when_one_is_killed() {
    let Some(db) = common::pg::fresh_database("cluster").await else {
        return;
    };
    let dir = TempDir::new("cluster");
    let (mut doomed, first) = node(&db, &dir.path().join("node0.log"));
    let (_survivor, second) = node(&db, &dir.path().join("node1.log"));
    let Some((_haproxy, lb)) = balancer(dir.path(), &[first, second]).await else {
        return;
    };

    let mut proxies = Vec::new();
    for _ in 0..DEVICES {
        proxies.push(FaultProxy::start(lb).await.unwrap());
    }
    let urls: Vec<String> = proxies.iter().map(FaultProxy::url).collect();
    let home = TempDir::new("cluster-devices");
    // Round robin spreads the pairing requests over both nodes: codes are
    // shown through one and claimed through the other.
    let paired = tokio::time::timeout(SCENARIO, paired_devices(home.path(), &urls))
        .await
        .expect("pairing in time")
        .expect("devices pair through the balancer");
    let devices = paired.devices.clone();
    let marker = format!(
        "khub-plaintext-marker-{}",
        DeviceId::random(&mut khub::crypto::os_rng())
    );

    let proxies = Arc::new(proxies);
    let (stop, cutter) = cut_randomly(Arc::clone(&proxies));
    let total = DEVICES * (DEVICES - 1) * MESSAGES;
    let progress = Arc::new(AtomicUsize::new(0));
    // Halfway through, node 0 dies without a goodbye.
    let killer = {
        let progress = Arc::clone(&progress);
        tokio::spawn(async move {
            while progress.load(Ordering::Relaxed) < total / 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            doomed.0.kill().expect("SIGKILL");
            let _ = doomed.0.wait();
            progress.load(Ordering::Relaxed)
        })
    };
    let received = tokio::time::timeout(
        SCENARIO,
        exchange(&devices, MESSAGES, &marker, Arc::clone(&progress)),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "every device received everything in time: {} of {total} received\n{}\n{}",
            progress.load(Ordering::Relaxed),
            device_states(&devices),
            log_tails(dir.path())
        )
    });
    let _ = stop.send(true);
    let at_kill = killer.await.unwrap();
    assert!(
        at_kill < total,
        "the node was killed mid-run ({at_kill} of {total} received)"
    );
    assert!(cutter.await.unwrap() >= 10, "the proxies cut connections");

    check_delivery(&devices, &sent(&devices, MESSAGES, &marker), &received);
    for device in &devices {
        assert_eq!(device.next_unread().unwrap(), None, "nothing more arrived");
        let incidents = device.incidents().unwrap();
        assert!(
            incidents.is_empty(),
            "honest relays cause no incident: {incidents:?}"
        );
    }

    // The database and the nodes' logs hold no plaintext and no code.
    let scanner = secrets_of(&paired, &marker);
    let (client, connection) = tokio_postgres::connect(&db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut stored = Vec::new();
    for row in client
        .query("SELECT body FROM khub_envelopes", &[])
        .await
        .unwrap()
    {
        stored.extend_from_slice(row.get::<_, &[u8]>(0));
    }
    assert!(
        stored.len() > total / (DEVICES - 1) * 100,
        "the envelopes are in PostgreSQL"
    );
    assert_eq!(scanner.scan_bytes("khub_envelopes", &stored), []);
    assert_eq!(scanner.scan_dir(dir.path()).unwrap(), []);
}
