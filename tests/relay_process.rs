//! The relay as its own process (`khub serve`, the binary a person runs): what
//! its database and logs contain after real traffic, its memory per idle
//! session, and a clean exit on SIGTERM.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::Device;
use common::net::*;
use khub::crypto::os_rng;
use khub::pairing::{Code, Inviter, Joiner, Nameplate};
use khub::protocol::ServerFrame;

struct RelayProcess {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl RelayProcess {
    fn start(extra: &[&str]) -> Self {
        let dir = common::tempdir("proc");
        let log = std::fs::File::create(dir.join("relay.log")).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_khub"));
        command.args(["serve", "--listen", "127.0.0.1:0"]);
        if !extra.contains(&"--memory") {
            command.arg("--db").arg(dir.join("relay.sqlite3"));
        }
        let mut child = command
            .args(extra)
            .env("KHUB_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("khub serve starts");
        let line = common::first_line(child.stdout.take().unwrap());
        let addr = line
            .split_whitespace()
            .find_map(|word| word.trim_end_matches(',').parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Self { child, addr, dir }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn rss_kib(&self) -> u64 {
        common::rss_kib(self.pid())
    }

    /// SIGTERM, then the exit status.
    fn terminate(mut self) -> (std::process::ExitStatus, PathBuf) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let status = exit_within(&mut self.child, Duration::from_secs(20))
            .expect("relay did not exit after SIGTERM");
        (status, self.dir.clone())
    }
}

/// `child`'s exit status, if it exits within `limit`.
fn exit_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Everything the relay wrote to disk: database, WAL, and its log.
fn relay_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_database_and_logs_hold_no_plaintext_token_name_or_code() {
    let relay = RelayProcess::start(&[]);
    let addr = relay.addr;
    let mut rng = os_rng();
    let marker = b"PLAINTEXT-MARKER-7c1e9b";
    let (laptop, phone) = (
        Device::new("laptop-NAME-MARKER"),
        Device::new("phone-NAME-MARKER"),
    );
    let mut keyring = common::new_channel(&laptop);
    let inviter = Member::with_device(keyring.channel(), keyring.me());
    assert_eq!(create_channel(addr, &inviter).await.status, 201);
    let auth = inviter.auth();

    // Pair the phone through the relay.
    let sid = common::sid();
    let nameplate = open_slot(addr, &inviter, sid).await;
    let code = Code::generate(Nameplate::new(nameplate).unwrap(), &mut rng);
    let (awaiting, start) = Inviter::start(&code, sid, &mut rng);
    let a = ("authorization", auth.as_str());
    send_msg(addr, nameplate, a, &start).await;
    let claim_token = claim(addr, nameplate).await.json()["claim"]
        .as_str()
        .unwrap()
        .to_owned();
    let b = ("x-khub-claim", claim_token.as_str());
    let (start_in, _) = recv_msg(addr, nameplate, b, 0).await;
    let phone_member = Member::with_device(keyring.channel(), phone.id());
    let info = khub::pairing::DeviceInfo::new(
        phone.id(),
        phone_member.token.expose(),
        phone.info().key_package,
    );
    let (joiner, response) = Joiner::respond(&code, sid, &start_in[0], &info, &mut rng).unwrap();
    send_msg(addr, nameplate, b, &response).await;
    let (response_in, _) = recv_msg(addr, nameplate, a, 0).await;
    let admission = awaiting.receive(&response_in[0]).unwrap();
    assert_eq!(admit(addr, &inviter, &phone_member).await.status, 201);
    let (_, welcome) = common::add(&mut keyring, admission.joiner());
    let (finish, _) = admission.finish(&welcome, &mut rng);
    send_msg(addr, nameplate, a, &finish).await;
    let (finish_in, _) = recv_msg(addr, nameplate, b, 1).await;
    let joined = joiner.receive(&finish_in[0]).unwrap();
    let mut phone_ring = phone.join(&joined);

    // Exchange notes carrying the marker, both ways.
    let (mut wa, _) = session(addr, &inviter, 0).await;
    let (mut wb, _) = session(addr, &phone_member, 0).await;
    for i in 0..10 {
        let note = [&marker[..], format!(" #{i}").as_bytes()].concat();
        send_text(&mut wa, publish(&keyring.seal(&note).unwrap().envelope)).await;
        send_text(&mut wb, publish(&phone_ring.seal(&note).unwrap().envelope)).await;
    }
    // The phone gets all 20 back in relay order and opens the laptop's 10.
    let (mut delivered, mut opened) = (0, 0);
    while delivered < 20 {
        if let ServerFrame::Deliver { envelope, .. } = next_frame(&mut wb).await {
            delivered += 1;
            let taken = phone_ring.take_in(&envelope, 0);
            assert!(taken.refusals.is_empty(), "{taken:?}");
            if let Some(khub::channel::Event::App { plaintext, .. }) = taken.event {
                assert!(contains(&plaintext, marker));
                opened += 1;
            }
        }
    }
    assert_eq!(opened, 10, "every note of the laptop opened on the phone");
    drop((wa, wb));

    let (status, dir) = relay.terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    let files = relay_files(&dir);
    let log = files
        .iter()
        .find(|(name, _)| name.ends_with("relay.log"))
        .unwrap();
    assert!(
        contains(&log.1, b"session opened"),
        "the log captured the traffic"
    );
    let database: usize = files
        .iter()
        .filter(|(n, _)| n.contains("sqlite3"))
        .map(|(_, b)| b.len())
        .sum();
    assert!(database > 0, "the database was written");

    let mut scanner = khub::testing::Scanner::new();
    scanner
        .add("plaintext marker", marker)
        .add("device name", b"NAME-MARKER")
        .add("inviter token", inviter.token.expose())
        .add("joiner token", phone_member.token.expose())
        .add("claim token", claim_token.as_bytes())
        .add_code(&code);
    for (name, secret) in keyring
        .secrets_for_scan()
        .into_iter()
        .chain(phone_ring.secrets_for_scan())
    {
        scanner.add(&name, &secret);
    }
    assert_eq!(scanner.scan_dir(&dir).unwrap(), []);
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_authenticated_session_costs_at_most_16_kib() {
    let relay = RelayProcess::start(&["--memory", "--max-connections-per-ip", "5000"]);
    let addr = relay.addr;
    let member = Member::new(khub::ids::ChannelId::random(&mut os_rng()));
    assert_eq!(create_channel(addr, &member).await.status, 201);

    let mut sessions = Vec::new();
    // Warm up allocator arenas and the runtime before the baseline.
    for _ in 0..200 {
        sessions.push(session(addr, &member, 0).await.0);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = relay.rss_kib();
    let added = 1000;
    for _ in 0..added {
        sessions.push(session(addr, &member, 0).await.0);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = relay.rss_kib();
    let per_session = (after.saturating_sub(before)) as f64 / added as f64;
    eprintln!("relay RSS {before} KiB -> {after} KiB: {per_session:.1} KiB per idle session");
    assert!(per_session <= 16.0, "{per_session:.1} KiB per idle session");
    drop(sessions);
    let (status, dir) = relay.terminate();
    assert!(status.success());
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_costs_bounded_memory_and_then_gets_everything_once() {
    // The SQLite store: envelopes live on disk, so memory growth would be the
    // relay buffering for the stalled reader.
    let relay = RelayProcess::start(&["--slow-reader-timeout-secs", "120"]);
    let addr = relay.addr;
    let (a, c) = (Device::new("writer"), Device::new("stalled"));
    let mut rings = common::channel_of(&[&a, &c]).into_iter();
    let (mut ra, mut rc) = (rings.next().unwrap(), rings.next().unwrap());
    let ma = Member::with_device(ra.channel(), ra.me());
    let mc = Member::with_device(rc.channel(), rc.me());
    create_channel(addr, &ma).await;
    admit(addr, &ma, &mc).await;
    let (mut wa, _) = session(addr, &ma, 0).await;
    let (mut wc, _) = session(addr, &mc, 0).await; // does not read until the end

    let body = vec![b'q'; 30_000];
    let mut sent = 0u64;
    // Eight publishes in flight at a time: the relay group-commits them, and A
    // reads its acks and own deliveries often enough never to be slow itself.
    let mut publish_some = async |count: u64, wa: &mut Ws| {
        for _ in 0..count / 8 {
            for _ in 0..8 {
                send_text(wa, publish(&ra.seal(&body).unwrap().envelope)).await;
                sent += 1;
            }
            let (mut acks, mut delivered) = (0, 0);
            while acks < 8 || delivered < 8 {
                match next_frame(wa).await {
                    ServerFrame::Ack { .. } => acks += 1,
                    ServerFrame::Deliver { .. } => delivered += 1,
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    };
    publish_some(300, &mut wa).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = relay.rss_kib();
    publish_some(400, &mut wa).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = relay.rss_kib();
    let growth_mib = after.saturating_sub(before) as f64 / 1024.0;
    eprintln!("relay RSS {before} KiB -> {after} KiB while 400 x 30 kB passed a stalled reader");
    // 16 MB of frames went by; the recent-envelope cache was already full.
    assert!(
        growth_mib < 8.0,
        "relay memory grew {growth_mib:.1} MiB with a stalled reader"
    );

    // The stalled reader now reads: everything, in order, exactly once.
    for expected in 1..=sent {
        let ServerFrame::Deliver { seq, envelope } = next_frame(&mut wc).await else {
            panic!("deliver")
        };
        assert_eq!(seq, expected);
        assert_eq!(common::open(&mut rc, &envelope).len(), body.len());
    }
    let extra = tokio::time::timeout(
        Duration::from_millis(300),
        futures_util::StreamExt::next(&mut wc),
    )
    .await;
    assert!(
        !matches!(
            extra,
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(_))))
        ),
        "nothing delivered twice"
    );
    let (status, dir) = relay.terminate();
    assert!(status.success());
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_stopped_leaves_its_whole_database_in_one_file() {
    let relay = RelayProcess::start(&[]);
    let member = Member::new(khub::ids::ChannelId::random(&mut os_rng()));
    assert_eq!(create_channel(relay.addr, &member).await.status, 201);
    let (mut ws, _) = session(relay.addr, &member, 0).await;
    for seq in 1..=3 {
        send_text(&mut ws, publish(&member.stand_in(seq, 100))).await;
        loop {
            match next_frame(&mut ws).await {
                ServerFrame::Ack { .. } => break,
                ServerFrame::Deliver { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    drop(ws);
    // Stopped within a second of starting: before, its connections were
    // still open when the process ended, and the WAL stayed beside the file.
    let (status, dir) = relay.terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    for leftover in ["relay.sqlite3-wal", "relay.sqlite3-shm"] {
        assert!(
            !dir.join(leftover).exists(),
            "{leftover} is left after a clean stop: copying relay.sqlite3 alone would lose what it holds"
        );
    }
    // The file alone, copied as an operator would, holds the three envelopes.
    let copy = dir.join("copy").join("relay.sqlite3");
    std::fs::create_dir(copy.parent().unwrap()).unwrap();
    std::fs::copy(dir.join("relay.sqlite3"), &copy).unwrap();
    let stored: i64 = rusqlite::Connection::open(&copy)
        .unwrap()
        .query_row("SELECT COUNT(*) FROM envelopes", [], |r| r.get(0))
        .unwrap();
    assert_eq!(stored, 3);
    std::fs::remove_dir_all(dir).ok();
}

/// `khub serve` with `args`, which must fail within 30 s: its stderr.
fn serve_fails(args: &[&str]) -> String {
    let mut serve = Command::new(env!("CARGO_BIN_EXE_khub"))
        .arg("serve")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("khub serve starts");
    let Some(status) = exit_within(&mut serve, Duration::from_secs(30)) else {
        let _ = serve.kill();
        panic!("khub serve {args:?} neither failed nor exited");
    };
    let output = serve.wait_with_output().unwrap();
    assert!(!status.success());
    assert!(
        !String::from_utf8_lossy(&output.stdout).contains("listening"),
        "it listened"
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn serve_says_what_to_change_when_it_cannot_listen_or_open_its_file_and_leaves_nothing_behind() {
    let dir = common::tempdir("serve-refusals");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let db = dir.join("relay.sqlite3");
    let stderr = serve_fails(&["--listen", &addr, "--db", db.to_str().unwrap()]);
    assert!(
        stderr.starts_with(&format!("Error: cannot listen on {addr} (--listen)")),
        "{stderr}"
    );
    assert!(
        stderr.ends_with("  next: another program (another `khub serve`?) listens there: stop it, or give another address with --listen HOST:PORT\n"),
        "{stderr}"
    );
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(left.is_empty(), "no database files left: {left:?}");
    // The same for the metrics' address, named by its own flag.
    let stderr = serve_fails(&[
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        &addr,
        "--db",
        db.to_str().unwrap(),
    ]);
    assert!(
        stderr.starts_with(&format!(
            "Error: cannot listen on {addr} (--metrics-listen)"
        )),
        "{stderr}"
    );
    assert!(
        stderr.ends_with("give another address with --metrics-listen HOST:PORT\n"),
        "{stderr}"
    );
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(left.is_empty(), "no database files left: {left:?}");

    let missing = dir.join("no-such-dir").join("relay.sqlite3");
    let stderr = serve_fails(&["--listen", "127.0.0.1:0", "--db", missing.to_str().unwrap()]);
    assert_eq!(
        stderr,
        format!(
            "Error: cannot open the database {}: the directory {} does not exist (create it, or give another path)\n",
            missing.display(),
            dir.join("no-such-dir").display()
        )
    );

    let stderr = serve_fails(&["--listen", "127.0.0.1:0", "--retention-days", "0"]);
    assert!(
        stderr.contains("0 would delete every envelope at the next retention pass"),
        "{stderr}"
    );
    let short = dir.join("short-secret");
    std::fs::write(&short, "  fifteen bytes!!  \n").unwrap();
    let stderr = serve_fails(&[
        "--listen",
        "127.0.0.1:0",
        "--memory",
        "--operator-secret-file",
        short.to_str().unwrap(),
    ]);
    assert_eq!(
        stderr,
        format!(
            "Error: the operator secret in the file {} has 15 bytes (spaces around it do not count); it must have at least 16\n",
            short.display()
        )
    );
    std::fs::remove_file(&short).unwrap();
    // Two stores named at once are refused by name; KHUB_MEMORY=off names none.
    let stderr = serve_fails(&[
        "--listen",
        "127.0.0.1:0",
        "--memory",
        "--db",
        db.to_str().unwrap(),
    ]);
    assert_eq!(
        stderr,
        "Error: --db (KHUB_DB) and --memory (KHUB_MEMORY) each name a store: give one of them\n"
    );
    let mut off = Command::new(env!("CARGO_BIN_EXE_khub"))
        .args(["serve", "--listen", "localhost:0", "--db"])
        .arg(&db)
        .env("KHUB_MEMORY", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("khub serve starts");
    let line = common::first_line(off.stdout.take().unwrap());
    assert!(
        line.starts_with("khub relay listening on 127.0.0.1:")
            && line
                .trim_end()
                .ends_with(&format!("storing in {}", db.display())),
        "{line}"
    );
    let _ = off.kill();
    let _ = off.wait();
    for file in std::fs::read_dir(&dir).unwrap().flatten() {
        std::fs::remove_file(file.path()).unwrap();
    }
    let stderr = serve_fails(&["--listen", "3000"]);
    assert!(
        stderr
            .contains("\"3000\" is not an address and a port: give HOST:PORT, like 127.0.0.1:3000"),
        "{stderr}"
    );
    drop(taken);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_second_relay_on_the_same_database_file_refuses_to_start_and_names_the_first() {
    let first = RelayProcess::start(&[]);
    let db = first.dir.join("relay.sqlite3");
    let stderr = serve_fails(&["--listen", "127.0.0.1:0", "--db", db.to_str().unwrap()]);
    assert!(stderr.contains("another khub serve"), "{stderr}");
    assert!(
        stderr.contains(&format!("process {}", first.pid())),
        "{stderr}"
    );
    // The first one still serves, and exits cleanly.
    let probe = std::net::TcpStream::connect(first.addr);
    assert!(probe.is_ok(), "the first relay stopped listening");
    let (status, dir) = first.terminate();
    assert!(status.success());
    std::fs::remove_dir_all(dir).ok();
}

/// A relay child on a fixed port and database, so it can be killed and restarted
/// where the devices expect it.
fn spawn_relay_at(addr: SocketAddr, db: &Path) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_khub"))
        .args(["serve", "--listen", &addr.to_string(), "--db"])
        .arg(db)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("khub serve starts");
    let line = common::first_line(child.stdout.take().unwrap());
    assert!(line.contains(&addr.to_string()), "{line}");
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_stream_loses_no_acked_envelope_and_stores_retries_once() {
    let dir = common::tempdir("kill");
    let db = dir.join("relay.sqlite3");
    let addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let mut relay = spawn_relay_at(addr, &db);
    let url = format!("http://{addr}");
    let laptop = khub::client::Device::create(&dir.join("laptop"), &url, "laptop")
        .await
        .unwrap();
    let phone = common::sdk_join(&laptop, &dir.join("phone"), &url, "phone").await;

    let sender = laptop.connect();
    let total = 120;
    let mut acked_before_kill = 0;
    for i in 0..total {
        if i == 40 {
            // SIGKILL: no shutdown, no flush — only what was committed survives.
            relay.kill().unwrap();
            relay.wait().unwrap();
        }
        if i == 80 {
            relay = spawn_relay_at(addr, &db);
        }
        // While the relay is down, do not wait long for acks that cannot come.
        let wait = if (40..80).contains(&i) {
            Duration::from_millis(20)
        } else {
            Duration::from_millis(300)
        };
        let sent = sender
            .send(format!("note {i}").as_bytes(), wait)
            .await
            .unwrap();
        if i < 40 && matches!(sent, khub::client::Sent::Acked { .. }) {
            acked_before_kill += 1;
        }
    }
    assert!(
        acked_before_kill > 0,
        "some envelopes were acked before the kill"
    );
    for _ in 0..400 {
        if laptop.pending().unwrap() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        laptop.pending().unwrap(),
        0,
        "every queued envelope was retried and acked"
    );

    let receiver = phone.connect();
    for i in 0..total {
        let message = tokio::time::timeout(STEP, receiver.recv())
            .await
            .expect("in time")
            .unwrap();
        assert_eq!(
            String::from_utf8(message.body).unwrap(),
            format!("note {i}")
        );
        phone.mark_read(message.seq).unwrap();
    }
    let extra = tokio::time::timeout(Duration::from_millis(500), receiver.recv()).await;
    assert!(extra.is_err(), "a retried envelope was stored twice");
    let _ = relay.kill();
    let _ = relay.wait();
    std::fs::remove_dir_all(&dir).ok();
}
