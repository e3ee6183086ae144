//! The relay under abuse, as a real `khub serve` child from one address: each
//! scenario is bounded in count and time, asserts that the attack is refused
//! at its bound (and counted), and that a legitimate device still pairs
//! during it.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use common::net::*;
use khub::ids::ChannelId;
use khub::relay::pairing::{MAX_MESSAGES_PER_SIDE, MAX_SLOTS_PER_DEVICE};

/// `khub serve --memory` on an ephemeral port, killed when dropped.
struct Serve {
    child: Child,
    addr: SocketAddr,
    /// The operator's metrics listener, if one was asked for.
    metrics_addr: Option<SocketAddr>,
}

impl Serve {
    fn start() -> Self {
        Self::start_with(&[])
    }

    fn start_with(flags: &[&str]) -> Self {
        Self::launch(&["--memory"], flags)
    }

    /// On a SQLite file of its own in `dir`.
    fn start_on_sqlite(dir: &std::path::Path) -> Self {
        let store = format!("sqlite:{}", dir.join("relay.sqlite3").display());
        Self::launch(&["--store", &store], &[])
    }

    fn launch(store: &[&str], flags: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_khub"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(store)
            .args(flags)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("khub serve starts");
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
        let address = |line: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|word| word.trim_end_matches(',').parse().ok())
                .unwrap_or_else(|| panic!("no address in {line:?}"))
        };
        let addr = address(&line);
        let metrics_addr = flags.contains(&"--metrics-listen").then(|| {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
            address(&line)
        });
        Self {
            child,
            addr,
            metrics_addr,
        }
    }

    fn rss_kib(&self) -> u64 {
        common::rss_kib(self.child.id())
    }

    async fn breaches(&self, limit: &str) -> u64 {
        let metrics = http(self.addr, "GET", "/metrics", &[], b"").await;
        let text = String::from_utf8(metrics.body).unwrap();
        let prefix = format!("khub_limit_breaches_total{{limit=\"{limit}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {limit} in the metrics"))
    }

    /// Whether `limit` is breached at least once within `within`.
    async fn breached_within(&self, limit: &str, within: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        while self.breaches(limit).await == 0 {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        true
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A channel with one device, created on `relay`.
async fn channel(relay: SocketAddr) -> Member {
    let member = Member::new(ChannelId::random(&mut khub::crypto::os_rng()));
    assert_eq!(create_channel(relay, &member).await.status, 201);
    member
}

/// A legitimate inviter still opens a slot, posts its Start, and a joiner
/// still claims it.
async fn a_pairing_still_opens(relay: SocketAddr) {
    let inviter = channel(relay).await;
    let nameplate = open_slot(relay, &inviter, common::sid()).await;
    let posted = send_msg(
        relay,
        nameplate,
        ("authorization", &inviter.auth()),
        &[0x01; 33],
    )
    .await;
    assert_eq!(posted.status, 202);
    assert_eq!(claim(relay, nameplate).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_mailbox_posts_into_one_slot_stop_at_its_cap() {
    let relay = Serve::start();
    let inviter = channel(relay.addr).await;
    let nameplate = open_slot(relay.addr, &inviter, common::sid()).await;
    let auth = inviter.auth();
    let before = relay.rss_kib();
    let big = vec![0x01; khub::pairing::message::MAX_MESSAGE_LEN];
    let mut stored = 0;
    for _ in 0..2_000 {
        let posted = send_msg(relay.addr, nameplate, ("authorization", &auth), &big).await;
        match posted.status {
            202 => stored += 1,
            413 => assert_eq!(posted.code(), "too_large"),
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(
        stored, MAX_MESSAGES_PER_SIDE,
        "posts past the cap are refused"
    );
    assert_eq!(
        relay.breaches("pairing_messages").await,
        2_000 - stored as u64
    );
    let grown = relay.rss_kib().saturating_sub(before);
    assert!(grown < 20 * 1024, "relay RSS grew {grown} KiB");
    println!("abuse: 2,000 posts into one pairing slot: relay RSS grew {grown} KiB");
    a_pairing_still_opens(relay.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_device_opening_1500_slots_gets_a_few_and_others_still_pair() {
    let relay = Serve::start();
    let greedy = channel(relay.addr).await;
    let mut opened = 0;
    for _ in 0..1_500 {
        let response = post_json(
            relay.addr,
            "/pair",
            &[("authorization", &greedy.auth())],
            &serde_json::json!({"sid": khub::protocol::b64::encode(common::sid())}),
        )
        .await;
        match response.status {
            201 => opened += 1,
            429 => assert_eq!(response.code(), "rate_limited"),
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(opened, MAX_SLOTS_PER_DEVICE);
    assert_eq!(
        relay.breaches("slots_per_device").await,
        1_500 - opened as u64
    );
    a_pairing_still_opens(relay.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nameplates_are_short_and_not_handed_out_in_order() {
    let relay = Serve::start();
    let mut nameplates = Vec::new();
    for _ in 0..5 {
        let inviter = channel(relay.addr).await;
        for _ in 0..MAX_SLOTS_PER_DEVICE {
            nameplates.push(open_slot(relay.addr, &inviter, common::sid()).await);
        }
    }
    // Drawn from 1..=max(100, 10 × open slots): short codes, room to spare.
    for (open, n) in nameplates.iter().enumerate() {
        assert!(*n >= 1 && *n <= 100.max(10 * open as u32), "{nameplates:?}");
    }
    let in_order: Vec<u32> = (1..=nameplates.len() as u32).collect();
    assert_ne!(nameplates, in_order, "a racing claimer could predict them");
    let mut distinct = nameplates.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), nameplates.len());
}

/// Whether the relay has closed `stream` (end of stream or reset), waiting at most `within`.
async fn closed_within(stream: &mut tokio::net::TcpStream, within: std::time::Duration) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(within, tokio::io::AsyncReadExt::read(stream, &mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_idle_connections_are_closed_and_healthz_answers_throughout() {
    let relay = Serve::start_with(&[
        "--header-timeout-secs",
        "2",
        "--max-connections-per-ip",
        "100",
    ]);
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(tokio::net::TcpStream::connect(relay.addr).await.unwrap());
    }
    // Those over the per-address limit are closed at accept, and the others
    // hold nothing for long: another client is served meanwhile.
    assert_eq!(healthz_from("127.0.0.2", relay.addr).await, 200);
    // …and every idle one is closed within the header timeout (plus slack).
    let started = std::time::Instant::now();
    for stream in &mut idle {
        assert!(closed_within(stream, std::time::Duration::from_secs(5)).await);
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    println!(
        "abuse: 300 idle connections: all closed {:?} after the first check",
        started.elapsed()
    );
    let breaches = relay.breaches("connections_per_ip").await;
    assert!(
        breaches >= 50,
        "{breaches} breaches (on a loaded machine the relay may accept slowly enough that early connections time out first)"
    );
    assert_eq!(
        http(relay.addr, "GET", "/healthz", &[], b"").await.status,
        200
    );
}

/// The status of `GET /healthz` from a socket bound to `source`.
async fn healthz_from(source: &str, relay: SocketAddr) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut stream = tokio::time::timeout(STEP, socket.connect(relay))
        .await
        .unwrap()
        .unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: relay\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(STEP, stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&answer);
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_near_limit_sync_bodies_are_refused_before_they_are_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let relay = Serve::start();
    let before = relay.rss_kib();
    let stranger = Member::new(ChannelId::random(&mut khub::crypto::os_rng()));
    let mut held = Vec::new();
    for _ in 0..10 {
        let mut stream = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
        let head = format!(
            "POST /sync HTTP/1.1\r\nhost: relay\r\nauthorization: {}\r\ncontent-type: application/json\r\ncontent-length: 20000000\r\n\r\n",
            stranger.auth()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        // A first megabyte of the body; the relay should not wait for the rest.
        let _ = stream.write_all(&vec![b' '; 1 << 20]).await;
        let mut answer = [0u8; 12];
        let read = tokio::time::timeout(STEP, stream.read_exact(&mut answer)).await;
        assert!(
            matches!(read, Ok(Ok(_))),
            "an answer before the body: {read:?}"
        );
        assert_eq!(&answer, b"HTTP/1.1 401");
        held.push(stream);
    }
    let grown = relay.rss_kib().saturating_sub(before);
    assert!(grown < 20 * 1024, "relay RSS grew {grown} KiB");
    println!("abuse: 10 unauthenticated near-limit /sync bodies: relay RSS grew {grown} KiB");
    a_pairing_still_opens(relay.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_answer_pages_a_large_backlog_by_bytes() {
    let relay = Serve::start();
    let device = channel(relay.addr).await;
    let envelopes: Vec<String> = (1..=12u64)
        .map(|seq| device.stand_in_envelope(seq, 1 << 20))
        .collect();
    let published = post_json(
        relay.addr,
        "/sync",
        &[("authorization", &device.auth())],
        &serde_json::json!({"cursor": 0, "publish": envelopes}),
    )
    .await;
    assert_eq!(
        published.status,
        200,
        "{}",
        String::from_utf8_lossy(&published.body)
    );
    let page = post_json(
        relay.addr,
        "/sync",
        &[("authorization", &device.auth())],
        &serde_json::json!({"cursor": 0}),
    )
    .await
    .json();
    let got = page["envelopes"].as_array().unwrap().len();
    assert!((1..12).contains(&got), "{got} envelopes in one page");
    assert!(got * (1 << 20) <= khub::protocol::SYNC_PAGE_BYTES);
    assert_eq!(page["more"], true);
}

/// A `/sync` body of millions of empty envelopes, well under the body
/// limit, would be eight times its bytes once read as a list: the relay
/// stops reading the list past its bound and refuses the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_publishing_more_envelopes_than_a_request_holds_is_refused_as_too_large() {
    let relay = Serve::start();
    let device = channel(relay.addr).await;
    let empty = vec![""; 5_000_000];
    let answer = post_json(
        relay.addr,
        "/sync",
        &[("authorization", &device.auth())],
        &serde_json::json!({"cursor": 0, "publish": empty}),
    )
    .await;
    let body = String::from_utf8_lossy(&answer.body);
    assert_eq!(answer.status, 413, "{body}");
    assert!(body.contains("\"too_large\""), "{body}");
    assert!(
        body.contains("at most 10000 envelopes per request"),
        "{body}"
    );
    // A request within the bound goes through.
    let within = post_json(
        relay.addr,
        "/sync",
        &[("authorization", &device.auth())],
        &serde_json::json!({"cursor": 0, "publish": [device.stand_in_envelope(1, 200)]}),
    )
    .await;
    assert_eq!(within.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_on_the_operators_listener_not_the_public_one() {
    let relay = Serve::start_with(&["--metrics-listen", "127.0.0.1:0"]);
    let public = http(relay.addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(public.status, 404);
    let metrics = relay.metrics_addr.expect("a metrics listener");
    let served = http(metrics, "GET", "/metrics", &[], b"").await;
    assert_eq!(served.status, 200);
    assert!(
        String::from_utf8(served.body)
            .unwrap()
            .contains("khub_sessions")
    );
    assert_eq!(http(metrics, "GET", "/healthz", &[], b"").await.status, 200);
    assert_eq!(http(metrics, "GET", "/sync", &[], b"").await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_arrives_times_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let relay = Serve::start_with(&["--request-timeout-secs", "1"]);
    let device = channel(relay.addr).await;
    let mut stream = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let head = format!(
        "POST /sync HTTP/1.1\r\nhost: relay\r\nauthorization: {}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"cursor\":",
        device.auth()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let mut answer = [0u8; 12];
    tokio::time::timeout(STEP, stream.read_exact(&mut answer))
        .await
        .expect("an answer")
        .unwrap();
    assert_eq!(&answer, b"HTTP/1.1 408");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mailbox_bounds_are_the_operators_to_set() {
    let relay = Serve::start_with(&["--max-slots-per-device", "2", "--max-pairing-messages", "3"]);
    let device = channel(relay.addr).await;
    let auth = device.auth();
    let mut opened = Vec::new();
    for _ in 0..3 {
        let response = post_json(
            relay.addr,
            "/pair",
            &[("authorization", &auth)],
            &serde_json::json!({"sid": khub::protocol::b64::encode(common::sid())}),
        )
        .await;
        opened.push((response.status, response.json()["nameplate"].as_u64()));
    }
    assert_eq!(
        opened.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        [201, 201, 429]
    );
    let nameplate = opened[0].1.unwrap() as u32;
    let mut posted = Vec::new();
    for _ in 0..4 {
        posted.push(
            send_msg(
                relay.addr,
                nameplate,
                ("authorization", &device.auth()),
                &[0x01; 33],
            )
            .await
            .status,
        );
    }
    assert_eq!(posted, [202, 202, 202, 413]);
}

/// `POST /pair/N/claim` from this process with `headers`; its status.
async fn claim_with(relay: SocketAddr, headers: &[(&str, &str)]) -> u16 {
    http(relay, "POST", "/pair/999999/claim", headers, b"")
        .await
        .status
}

/// The attack: find the open nameplates for free by asking each for its
/// messages, with a made-up claim token or as a device of a channel of one's
/// own (a gone slot and someone else's were told apart, and neither was
/// counted), then claim each as it opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probing_nameplates_costs_claims_with_a_made_up_claim_token_or_a_device() {
    let relay = Serve::start_with(&["--claims-per-minute", "5"]);
    // One open slot among the nameplates probed.
    let inviter = channel(relay.addr).await;
    let nameplate = open_slot(relay.addr, &inviter, common::sid()).await;
    let made_up = khub::protocol::b64::encode([7u8; 32]);
    let prober = channel(relay.addr).await.auth();
    let probe = async |probed: u32, header: (&str, &str)| {
        let path = format!("/pair/{probed}/messages?wait=0");
        http(relay.addr, "GET", &path, &[header], b"").await.status
    };
    // As a device of another channel: every nameplate looks gone.
    for probed in (1..=12u32).chain([nameplate]) {
        let status = probe(probed, ("authorization", &prober)).await;
        assert_eq!(status, 410, "nameplate {probed} told apart");
    }
    // With a made-up claim token: each probe costs a claim.
    let mut answers = Vec::new();
    for probed in (1..=12u32).chain([nameplate]) {
        answers.push((probed, probe(probed, ("x-khub-claim", &made_up)).await));
    }
    let answered = answers.iter().filter(|(_, status)| *status != 429).count();
    assert_eq!(
        answered, 5,
        "a probe past the address's claims is refused as rate limited: {answers:?}"
    );
    assert_eq!(
        answers.last().map(|(_, status)| *status),
        Some(429),
        "the open slot is not told apart once the claims are spent: {answers:?}"
    );
    assert!(relay.breaches("claims_per_ip").await >= 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_through_a_trusted_proxy_are_limited_per_real_client() {
    let behind_proxy =
        Serve::start_with(&["--trusted-proxy", "127.0.0.0/8", "--claims-per-minute", "3"]);
    let alice = [("x-forwarded-for", "203.0.113.1")];
    let bob = [("forwarded", "for=\"[2001:db8::7]:4711\";proto=https")];
    for _ in 0..3 {
        // No such slot, but the claim counts.
        assert_eq!(claim_with(behind_proxy.addr, &alice).await, 404);
    }
    assert_eq!(
        claim_with(behind_proxy.addr, &alice).await,
        429,
        "alice is over her limit"
    );
    assert_eq!(
        claim_with(behind_proxy.addr, &bob).await,
        404,
        "bob, behind the same proxy, is not"
    );
    assert_eq!(behind_proxy.breaches("claims_per_ip").await, 1);

    // From a peer that is not a trusted proxy the header is ignored: every
    // claim counts against the peer itself, whatever it claims to forward.
    let direct = Serve::start_with(&["--claims-per-minute", "3"]);
    for n in 0..3 {
        let forged = format!("198.51.100.{n}");
        assert_eq!(
            claim_with(direct.addr, &[("x-forwarded-for", &forged)]).await,
            404
        );
    }
    assert_eq!(
        claim_with(direct.addr, &[("x-forwarded-for", "198.51.100.99")]).await,
        429
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_storage_budget_refuses_publishes_and_channels_with_storage_full() {
    let relay = Serve::start_with(&["--max-db-mib", "1"]);
    let device = channel(relay.addr).await;
    let auth = device.auth();
    let publish = |seq: u64| {
        // The cursor past what is there: the answers carry no envelopes.
        serde_json::json!({"cursor": 1000, "publish": [device.stand_in_envelope(seq, 1_100_000)]})
    };
    let ack = |answer: serde_json::Value| answer["acks"][0].clone();
    let sync = |body: serde_json::Value| {
        let auth = auth.clone();
        async move {
            post_json(relay.addr, "/sync", &[("authorization", &auth)], &body)
                .await
                .json()
        }
    };
    assert!(
        ack(sync(publish(1)).await)["seq"].is_u64(),
        "stored under the budget"
    );
    let started = std::time::Instant::now();
    // The relay measures its store every 5 s; until then it stores (or acks
    // again, as a duplicate).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let refusal = loop {
        let answer = ack(sync(publish(2)).await);
        if answer["error"]["code"] == "storage_full" {
            break answer;
        }
        assert!(answer["seq"].is_u64(), "{answer}");
        assert!(
            std::time::Instant::now() < deadline,
            "never refused: {answer}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    println!(
        "abuse: a full storage budget: storage_full after {:?}",
        started.elapsed()
    );
    let message = refusal["error"]["message"].as_str().unwrap();
    assert!(message.contains("storage is full"), "{message}");
    let other = Member::new(ChannelId::random(&mut khub::crypto::os_rng()));
    let created = create_channel(relay.addr, &other).await;
    assert_eq!(created.status, 507);
    assert_eq!(created.json()["error"]["code"], "storage_full");
    assert!(relay.breaches("storage_budget").await >= 2);
    // Reading still works.
    let read = sync(serde_json::json!({"cursor": 1})).await;
    assert!(read["head"].as_u64().unwrap() >= 1, "reading still works");
}

/// A connection to `relay` with a tiny receive window: what the relay writes
/// to it stalls once a few KiB are in flight and unread.
async fn tiny_window(relay: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    tokio::time::timeout(STEP, socket.connect(relay))
        .await
        .unwrap()
        .unwrap()
}

/// The WebSocket handshake with `relay` over `stream`.
async fn ws_over(
    relay: SocketAddr,
    stream: tokio::net::TcpStream,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let (ws, _) = tokio::time::timeout(
        STEP,
        tokio_tungstenite::client_async(format!("ws://{relay}/ws"), stream),
    )
    .await
    .unwrap()
    .unwrap();
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_stops_reading_its_pongs_is_closed_within_its_deadline() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let relay = Serve::start_with(&["--slow-reader-timeout-secs", "2"]);
    let device = channel(relay.addr).await;
    // A client with a tiny receive window that says hello, then only writes:
    // pings, whose pongs it never reads.
    let mut ws = ws_over(relay.addr, tiny_window(relay.addr).await).await;
    ws.send(Message::Text(device.hello(0).into()))
        .await
        .unwrap();
    let ready = tokio::time::timeout(STEP, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(ready.to_text().unwrap().contains("ready"));
    let started = std::time::Instant::now();
    let mut pings = 0u64;
    // Writes stop going through once the relay, blocked on its pongs, stops
    // reading; the relay must then close the session on its own.
    while pings < 200_000 {
        match tokio::time::timeout(
            std::time::Duration::from_secs(1),
            ws.send(Message::Ping(vec![0u8; 125].into())),
        )
        .await
        {
            Ok(Ok(())) => pings += 1,
            Ok(Err(_)) | Err(_) => break,
        }
    }
    let within = std::time::Duration::from_secs(30).saturating_sub(started.elapsed());
    assert!(
        relay.breached_within("slow_reader", within).await,
        "the relay never closed the session that stopped reading ({pings} pings sent)"
    );
    let closed_after = started.elapsed();
    println!(
        "abuse: a session that stops reading its pongs: closed {closed_after:?} after its flood began ({pings} pings went through)"
    );
    assert!(
        closed_after < std::time::Duration::from_secs(20),
        "closed {closed_after:?} after the flood began"
    );
    // Others are still served.
    a_pairing_still_opens(relay.addr).await;
}

/// The attack: a `/sync` answer of megabytes asked for by a client that
/// never reads it. Nothing but a stall limit on the connection's writes frees
/// it (before, it was held for as long as the client kept its window shut).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_answer_its_client_never_reads_is_dropped_with_the_connection() {
    let relay = Serve::start_with(&["--slow-reader-timeout-secs", "1"]);
    let device = channel(relay.addr).await;
    // Four that fill a page of 4 MiB between them.
    let batch: Vec<String> = (1..=4u64)
        .map(|seq| device.stand_in_envelope(seq, (1 << 20) - 256))
        .collect();
    let published = post_json(
        relay.addr,
        "/sync",
        &[("authorization", &device.auth())],
        &serde_json::json!({"cursor": 1000, "publish": batch}),
    )
    .await;
    assert_eq!(published.status, 200);
    // A page of 4 MiB, 5.6 MB as base64 and JSON: more than the relay's
    // socket buffer (4 MiB at most) and this client's tiny window hold.
    let mut stream = tiny_window(relay.addr).await;
    let body = serde_json::json!({"cursor": 0}).to_string();
    let request = format!(
        "POST /sync HTTP/1.1\r\nhost: relay\r\nauthorization: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        device.auth(),
        body.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    assert!(
        relay
            .breached_within("slow_reader", std::time::Duration::from_secs(30))
            .await,
        "the relay still holds the answer nobody reads"
    );
    let dropped_after = started.elapsed();
    println!("abuse: a sync answer nobody reads: dropped after {dropped_after:?}");
    // The slow-reader limit (1 s) and the 5 s a session gets to close first.
    assert!(
        dropped_after >= std::time::Duration::from_secs(5),
        "dropped after {dropped_after:?}, before its limit"
    );
    // What the kernel had taken, then the end: the relay let go of it.
    assert!(closed_within(&mut stream, STEP).await);
    a_pairing_still_opens(relay.addr).await;
}

/// The attack: a WebSocket client that never says who it is announces a
/// frame of a megabyte and sends most of it. Before, the relay buffered up to
/// the frame limit (1.4 MB) on each such connection until the hello timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_client_cannot_send_more_than_a_hello_before_its_hello() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let relay = Serve::start();
    let stream = tokio::time::timeout(STEP, tokio::net::TcpStream::connect(relay.addr))
        .await
        .unwrap()
        .unwrap();
    let mut ws = ws_over(relay.addr, stream).await;
    // A masked text frame announcing 1,000,000 bytes, then 64 KiB of it.
    let mut frame = vec![0x81, 0x80 | 127];
    frame.extend_from_slice(&1_000_000u64.to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    frame.extend_from_slice(&[b'a' ^ 1; 64 * 1024]);
    let started = std::time::Instant::now();
    tokio::io::AsyncWriteExt::write_all(ws.get_mut(), &frame)
        .await
        .unwrap();
    // The relay stops reading at 16 KiB and says why, well before its 10 s
    // hello timeout.
    let refusal = tokio::time::timeout(STEP, ws.next())
        .await
        .expect("the relay answers")
        .expect("a frame")
        .expect("a readable frame");
    let Message::Text(refusal) = refusal else {
        panic!("expected the error frame, got {refusal:?}")
    };
    assert!(refusal.contains("too_large"), "{refusal}");
    assert!(refusal.contains("before the hello frame"), "{refusal}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "refused after {:?}",
        started.elapsed()
    );
    assert_eq!(relay.breaches("frame_size").await, 1);
    a_pairing_still_opens(relay.addr).await;
}

/// A channel on `relay` holding 65 envelopes of 1 MiB, published four per
/// request; its one device.
async fn large_backlog(relay: SocketAddr) -> Member {
    let device = channel(relay).await;
    for first in (1..=65u64).step_by(4) {
        let batch: Vec<String> = (first..(first + 4).min(66))
            .map(|seq| device.stand_in_envelope(seq, 1 << 20))
            .collect();
        let published = post_json(
            relay,
            "/sync",
            &[("authorization", &device.auth())],
            &serde_json::json!({"cursor": 1000, "publish": batch}),
        )
        .await;
        assert_eq!(published.status, 200);
    }
    device
}

/// A relay's peak resident memory above where it stood at `start`, sampled
/// every 20 ms until `stop`.
struct PeakRss {
    before: u64,
    sampling: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sampler: tokio::task::JoinHandle<u64>,
}

impl PeakRss {
    fn start(relay: &Serve) -> Self {
        let (before, pid) = (relay.rss_kib(), relay.child.id());
        let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let sampler = tokio::spawn({
            let sampling = std::sync::Arc::clone(&sampling);
            async move {
                let mut peak = 0;
                while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                    peak = peak.max(common::rss_kib(pid));
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                peak
            }
        });
        Self {
            before,
            sampling,
            sampler,
        }
    }

    /// KiB the peak stood above the start.
    async fn stop(self) -> u64 {
        self.sampling
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.sampler.await.unwrap().saturating_sub(self.before)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_concurrent_syncs_of_a_65_mb_backlog_cost_bounded_memory() {
    let relay = Serve::start();
    let device = large_backlog(relay.addr).await;
    let started = std::time::Instant::now();
    // The peak, sampled while the readers run.
    let peak = PeakRss::start(&relay);
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let auth = device.auth();
        let addr = relay.addr;
        readers.spawn(async move {
            // Each reader pages through the whole backlog.
            let (mut cursor, mut pages) = (0u64, 0);
            loop {
                let page = post_json(
                    addr,
                    "/sync",
                    &[("authorization", &auth)],
                    &serde_json::json!({"cursor": cursor}),
                )
                .await
                .json();
                let envelopes = page["envelopes"].as_array().unwrap();
                assert!(envelopes.len() <= 4, "a page holds at most 4 MiB");
                pages += 1;
                cursor = envelopes
                    .last()
                    .map_or(cursor, |e| e["seq"].as_u64().unwrap());
                if page["more"] != true {
                    break;
                }
            }
            (cursor, pages)
        });
    }
    while let Some(done) = readers.join_next().await {
        let (cursor, pages) = done.unwrap();
        assert_eq!(cursor, 65, "every reader got the whole backlog");
        assert!(pages >= 17, "in pages of at most 4 MiB ({pages} pages)");
    }
    let grown = peak.stop().await;
    println!(
        "abuse: 6 concurrent syncs of a 65 MB backlog: relay peak RSS {grown} KiB above its start, {:?}",
        started.elapsed()
    );
    // Six pages of 4 MiB in flight, each as envelopes, base64 and JSON
    // (before the byte cap, six such reads took 740 MB).
    assert!(grown < 100 * 1024, "relay RSS peaked {grown} KiB higher");
}

/// The attack: a channel of 1 MiB envelopes, read from the start by sessions
/// that never read their deliveries and by syncs at once, on SQLite (whose
/// reads copy every body they return). Each session used to read 64
/// envelopes and each sync up to 1,000 before trimming its answer to 4 MiB:
/// about 150 MB held per blocked session. A read now stops at its byte budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_syncs_reading_a_backlog_of_large_envelopes_cost_bounded_memory() {
    let dir = common::tempdir("abuse-large");
    let relay = Serve::start_on_sqlite(&dir);
    let device = large_backlog(relay.addr).await;
    let peak = PeakRss::start(&relay);
    // Six sessions from the start, never reading past `ready`.
    let mut stalled = Vec::new();
    for _ in 0..6 {
        stalled.push(session(relay.addr, &device, 0).await.0);
    }
    // Six syncs from the start at once, each one page.
    let mut syncs = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let (auth, addr) = (device.auth(), relay.addr);
        syncs.spawn(async move {
            post_json(
                addr,
                "/sync",
                &[("authorization", &auth)],
                &serde_json::json!({"cursor": 0}),
            )
            .await
            .json()["envelopes"]
                .as_array()
                .unwrap()
                .len()
        });
    }
    while let Some(page) = syncs.join_next().await {
        assert_eq!(page.unwrap(), 3, "a page: as many as fit in 4 MiB");
    }
    // The sessions' deliveries fill the sockets and block.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let grown = peak.stop().await;
    println!(
        "abuse: 6 stalled sessions and 6 syncs over 65 MiB of 1 MiB envelopes on SQLite: relay peak RSS {grown} KiB above its start"
    );
    assert_eq!(
        http(relay.addr, "GET", "/healthz", &[], b"").await.status,
        200
    );
    drop(stalled);
    // A page of 4 MiB per session and per sync, as envelopes and frames.
    assert!(grown < 200 * 1024, "relay RSS peaked {grown} KiB higher");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_through_a_trusted_proxy_count_against_the_client_it_names() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let relay = Serve::start_with(&[
        "--trusted-proxy",
        "127.0.0.1",
        "--max-connections-per-ip",
        "2",
    ]);
    let open = |client: &'static str| {
        let mut request = format!("ws://{}/ws", relay.addr)
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("x-forwarded-for", client.parse().unwrap());
        async move {
            tokio::time::timeout(STEP, tokio_tungstenite::connect_async(request))
                .await
                .unwrap()
        }
    };
    let first = open("203.0.113.9").await.expect("first session");
    let second = open("203.0.113.9").await.expect("second session");
    let third = open("203.0.113.9").await;
    assert!(
        matches!(&third, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 429),
        "a third session of the same client is refused: {third:?}"
    );
    // Another client behind the same proxy is not affected.
    let other = open("203.0.113.10")
        .await
        .expect("another client's session");
    drop((first, second, other));
}
