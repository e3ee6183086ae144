//! The relay over real sockets: each route's happy path, every class of bad
//! input, durability across a restart, slow readers, revocation and limits.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::net::*;
use common::{Device, channel_of};
use khub::channel::Channel;
use khub::crypto::envelope::MAX_ENVELOPE_LEN;
use khub::crypto::os_rng;
use khub::crypto::token::TokenHash;
use khub::ids::ChannelId;
use khub::ids::DeviceId;
use khub::protocol::{ErrorCode, MAX_FRAME_LEN, ServerFrame};
use khub::relay::config::{Limits, RelayConfig};
use khub::relay::store::sqlite::SqliteStore;
use khub::relay::store::{
    Append, Appended, BoxFuture, DeviceRecord, Store, StoreError, StoredEnvelope,
};
use tokio_tungstenite::tungstenite::Message;

/// Two paired devices' keyrings and their relay identities, channel created
/// and second device admitted.
async fn two_devices(addr: std::net::SocketAddr) -> (Channel, Member, Channel, Member) {
    let (a, b) = (Device::new("laptop"), Device::new("phone"));
    let mut rings = channel_of(&[&a, &b]).into_iter();
    let (ra, rb) = (rings.next().unwrap(), rings.next().unwrap());
    let ma = Member::with_device(ra.channel(), ra.me());
    let mb = Member::with_device(rb.channel(), rb.me());
    assert_eq!(create_channel(addr, &ma).await.status, 201);
    assert_eq!(admit(addr, &ma, &mb).await.status, 201);
    (ra, ma, rb, mb)
}

fn config(limits: Limits) -> RelayConfig {
    RelayConfig {
        limits,
        ..RelayConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_and_unknown_routes() {
    // Without public metrics (the default for a relay not on loopback), the
    // public listener does not serve them.
    let private = TestRelay::start(RelayConfig::default()).await;
    let hidden = http(private.addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(hidden.status, 404);
    private.stop().await;
    let relay = TestRelay::start(RelayConfig {
        public_metrics: true,
        ..RelayConfig::default()
    })
    .await;
    let health = http(relay.addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(
        (health.status, health.json()["status"].as_str()),
        (200, Some("ok"))
    );
    let metrics = http(relay.addr, "GET", "/metrics", &[], b"").await;
    let text = String::from_utf8(metrics.body).unwrap();
    assert!(
        text.contains("# TYPE khub_sessions gauge")
            && text.contains("khub_limit_breaches_total{limit=\"slow_reader\"}")
    );
    let missing = http(relay.addr, "GET", "/nope", &[], b"").await;
    assert_eq!((missing.status, missing.code()), (404, "not_found".into()));
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_flow_between_devices_in_order_and_once() {
    let relay = TestRelay::start(RelayConfig::default()).await;
    let (mut ra, ma, mut rb, mb) = two_devices(relay.addr).await;
    let (mut wa, head) = session(relay.addr, &ma, 0).await;
    assert_eq!(head, 0);
    let (mut wb, _) = session(relay.addr, &mb, 0).await;

    for i in 1..=20u64 {
        let sealed = ra.seal(format!("note {i}").as_bytes()).unwrap();
        send_text(&mut wa, publish(&sealed.envelope)).await;
        // A sees its own envelope and its ack (in either order).
        let mut acked = false;
        let mut echoed = false;
        while !(acked && echoed) {
            match next_frame(&mut wa).await {
                ServerFrame::Ack {
                    sender_seq,
                    seq,
                    duplicate,
                } => {
                    assert_eq!((sender_seq, seq, duplicate), (sealed.seq, i, false));
                    acked = true;
                }
                ServerFrame::Deliver { seq, .. } => {
                    assert_eq!(seq, i);
                    echoed = true;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    for i in 1..=20u64 {
        let ServerFrame::Deliver { seq, envelope } = next_frame(&mut wb).await else {
            panic!("deliver")
        };
        assert_eq!(seq, i);
        assert_eq!(
            common::open(&mut rb, &envelope),
            format!("note {i}").as_bytes()
        );
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_publish_is_stored_once_and_acked_again() {
    let relay = TestRelay::start(RelayConfig::default()).await;
    let (mut ra, ma, _rb, _mb) = two_devices(relay.addr).await;
    let (mut ws, _) = session(relay.addr, &ma, 0).await;
    let envelope = ra.seal(b"once").unwrap().envelope;
    let mut acks = Vec::new();
    for _ in 0..3 {
        send_text(&mut ws, publish(&envelope)).await;
        loop {
            if let ServerFrame::Ack { seq, duplicate, .. } = next_frame(&mut ws).await {
                acks.push((seq, duplicate));
                break;
            }
        }
    }
    assert_eq!(acks, [(1, false), (1, true), (1, true)]);
    // Same sender sequence number, different bytes: refused, session goes on.
    let mut other = envelope.clone();
    *other.last_mut().unwrap() ^= 1;
    send_text(&mut ws, publish(&other)).await;
    let ServerFrame::Error { code, fatal, .. } = next_frame(&mut ws).await else {
        panic!("error")
    };
    assert_eq!((code, fatal), (ErrorCode::Conflict, false));
    let sync = post_json(
        relay.addr,
        "/sync",
        &[("authorization", &ma.auth())],
        &serde_json::json!({"cursor": 0}),
    )
    .await;
    assert_eq!(sync.json()["envelopes"].as_array().unwrap().len(), 1);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_clear_errors_and_close_codes_while_other_channels_keep_working() {
    let limits = Limits {
        max_frame_bytes: 64 * 1024,
        ..Limits::default()
    };
    let relay = TestRelay::start(config(limits)).await;
    let (mut ra, ma, mut rb, mb) = two_devices(relay.addr).await;
    let (mut bystander, _) = session(relay.addr, &mb, 0).await;

    let cases: Vec<(String, ErrorCode, u16)> = vec![
        ("{not json".into(), ErrorCode::Malformed, 4002),
        (
            r#"{"type":"subscribe"}"#.into(),
            ErrorCode::UnknownType,
            4002,
        ),
        (
            ma.hello(0).replace("\"v\":2", "\"v\":1"),
            ErrorCode::UnsupportedVersion,
            4002,
        ),
        (
            ma.hello(0).replace("\"token\":\"", "\"token\":\"!!"),
            ErrorCode::InvalidBase64,
            4002,
        ),
        (
            Member::new(ma.channel).hello(0),
            ErrorCode::Unauthorized,
            4001,
        ),
        (
            Member::with_device(ma.channel, ma.device).hello(0),
            ErrorCode::Unauthorized,
            4001,
        ),
        (publish(b"no hello first"), ErrorCode::Malformed, 4002),
    ];
    for (frame, code, close) in cases {
        let mut ws = connect(relay.addr).await;
        send_text(&mut ws, frame.clone()).await;
        let frames = expect_close(&mut ws, close).await;
        assert!(
            matches!(frames.as_slice(), [ServerFrame::Error { code: c, fatal: true, .. }] if *c == code),
            "{frame}: {frames:?}"
        );
    }
    // An oversized frame: closed with 1009.
    let (mut ws, _) = session(relay.addr, &ma, 0).await;
    send_text(&mut ws, "x".repeat(70 * 1024)).await;
    let mut closed_1009 = false;
    while let Some(message) = next_message(&mut ws).await {
        if let Message::Close(Some(frame)) = message {
            closed_1009 = u16::from(frame.code) == 1009;
            break;
        }
    }
    assert!(closed_1009, "oversized frame closes with 1009");
    assert!(relay.relay.metrics().breaches("frame_size") >= 1);

    // Non-fatal: publishing as another device, bad envelopes — the session goes on.
    let (mut ws, _) = session(relay.addr, &ma, 0).await;
    let forged = rb.seal(b"pretending to be the phone").unwrap().envelope;
    let stranger = common::new_channel(&Device::new("other"))
        .seal(b"wrong channel")
        .unwrap()
        .envelope;
    for (envelope, code) in [
        (forged, ErrorCode::ForbiddenSender),
        (stranger, ErrorCode::WrongChannel),
        (vec![1, 2, 3], ErrorCode::InvalidEnvelope),
    ] {
        send_text(&mut ws, publish(&envelope)).await;
        let ServerFrame::Error {
            code: got, fatal, ..
        } = next_frame(&mut ws).await
        else {
            panic!("error")
        };
        assert_eq!((got, fatal), (code, false));
    }
    let good = ra.seal(b"still works").unwrap().envelope;
    send_text(&mut ws, publish(&good)).await;
    assert!(matches!(
        next_frame(&mut ws).await,
        ServerFrame::Ack { seq: 1, .. } | ServerFrame::Deliver { seq: 1, .. }
    ));
    // The bystander session saw none of the noise, only the good envelope.
    let ServerFrame::Deliver { seq, envelope } = next_frame(&mut bystander).await else {
        panic!("deliver")
    };
    assert_eq!(
        (seq, common::open(&mut rb, &envelope)),
        (1, b"still works".to_vec())
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_routes_refuse_bad_input_with_codes() {
    let operator = "correct horse battery staple";
    let config = RelayConfig {
        operator_secret: Some(RelayConfig::operator_secret_from(operator)),
        ..RelayConfig::default()
    };
    let relay = TestRelay::start(config).await;
    let addr = relay.addr;
    let ma = Member::new(ChannelId::random(&mut os_rng()));
    let body = serde_json::json!({
        "channel": ma.channel.to_string(), "device": ma.device.to_string(),
        "token_hash": khub::protocol::b64::encode(ma.token.hash().0),
    });
    // Refused either way, and told which: none given, or not this relay's.
    let no_secret = post_json(addr, "/channels", &[], &body).await;
    assert_eq!(
        (no_secret.status, no_secret.code()),
        (403, "forbidden".into())
    );
    assert_eq!(
        no_secret.json()["error"]["message"],
        "creating channels on this relay needs its operator secret in X-Khub-Operator, and none was given"
    );
    let wrong = post_json(addr, "/channels", &[("x-khub-operator", "guess")], &body).await;
    assert_eq!((wrong.status, wrong.code()), (403, "forbidden".into()));
    assert_eq!(
        wrong.json()["error"]["message"],
        "the operator secret given in X-Khub-Operator is not this relay's"
    );
    let ok = post_json(addr, "/channels", &[("x-khub-operator", operator)], &body).await;
    assert_eq!(ok.status, 201);
    let again = post_json(addr, "/channels", &[("x-khub-operator", operator)], &body).await;
    assert_eq!((again.status, again.code()), (409, "exists".into()));
    let junk = http(
        addr,
        "POST",
        "/channels",
        &[("x-khub-operator", operator)],
        b"{\"channel\":",
    )
    .await;
    assert_eq!((junk.status, junk.code()), (400, "malformed".into()));

    // Device routes need the right credentials.
    let list_path = format!("/channels/{}/devices", ma.channel);
    let listed = http(
        addr,
        "GET",
        &list_path,
        &[("authorization", &ma.auth())],
        b"",
    )
    .await;
    assert_eq!(
        listed.json()["devices"][0].as_str(),
        Some(ma.device.to_string().as_str())
    );
    let impostor = Member::with_device(ma.channel, ma.device);
    for auth in [
        impostor.auth(),
        "Bearer nonsense".into(),
        "Basic abc".into(),
    ] {
        let refused = http(addr, "GET", &list_path, &[("authorization", &auth)], b"").await;
        assert_eq!(
            (refused.status, refused.code()),
            (401, "unauthorized".into()),
            "{auth}"
        );
    }
    assert_eq!(http(addr, "GET", &list_path, &[], b"").await.status, 401);
    let other_channel = format!("/channels/{}/devices", ChannelId::random(&mut os_rng()));
    assert_eq!(
        http(
            addr,
            "GET",
            &other_channel,
            &[("authorization", &ma.auth())],
            b""
        )
        .await
        .status,
        401
    );
    let bad_sync = post_json(
        addr,
        "/sync",
        &[("authorization", &ma.auth())],
        &serde_json::json!({"cursor": "x"}),
    )
    .await;
    assert_eq!(
        (bad_sync.status, bad_sync.code()),
        (400, "malformed".into())
    );
    let bad_b64 = post_json(
        addr,
        "/sync",
        &[("authorization", &ma.auth())],
        &serde_json::json!({"cursor": 0, "publish": ["@@"]}),
    )
    .await;
    assert_eq!(bad_b64.status, 400);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acked_envelope_survives_a_restart_on_the_same_file() {
    let dir = common::tempdir("relay");
    let path = dir.join("relay.sqlite3");
    let relay = TestRelay::start_with(
        Arc::new(SqliteStore::open(&path).unwrap()),
        RelayConfig::default(),
    )
    .await;
    let (mut ra, ma, mut rb, mb) = two_devices(relay.addr).await;
    let (mut ws, _) = session(relay.addr, &ma, 0).await;
    let mut acked = Vec::new();
    for i in 0..50 {
        send_text(
            &mut ws,
            publish(&ra.seal(format!("durable {i}").as_bytes()).unwrap().envelope),
        )
        .await;
    }
    while acked.len() < 50 {
        if let ServerFrame::Ack { seq, .. } = next_frame(&mut ws).await {
            acked.push(seq);
        }
    }
    relay.stop().await;

    let relay = TestRelay::start_with(
        Arc::new(SqliteStore::open(&path).unwrap()),
        RelayConfig::default(),
    )
    .await;
    let (mut wb, head) = session(relay.addr, &mb, 0).await;
    assert_eq!(head, 50);
    for i in 1..=50u64 {
        let ServerFrame::Deliver { seq, envelope } = next_frame(&mut wb).await else {
            panic!("deliver")
        };
        assert_eq!(seq, i);
        assert_eq!(
            common::open(&mut rb, &envelope),
            format!("durable {}", i - 1).as_bytes()
        );
    }
    relay.stop().await;
    std::fs::remove_dir_all(dir).ok();
}

/// A device whose cursor is behind a head with nothing stored after it
/// (retention deleted it) is told so in `ready`, and only then: not when it
/// is at the head, nor when something after its cursor is still stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_says_when_nothing_after_the_cursor_is_stored_any_more() {
    let dir = common::tempdir("relay");
    let store = Arc::new(SqliteStore::open(&dir.join("relay.sqlite3")).unwrap());
    let relay = TestRelay::start_with(store.clone(), RelayConfig::default()).await;
    let (_, ma, _, mb) = two_devices(relay.addr).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // Stored behind the relay's back (so that its cache holds none), the
    // first four a minute and more ago, the fifth now; pruned here, up to
    // a minute ago (the relay's own retention keeps them all).
    let (old, cut) = (now - 100, now - 60);
    for (sender_seq, stamp) in [(1, old), (2, old), (3, old), (4, old), (5, now)] {
        let appended = store
            .append(Append {
                channel: ma.channel,
                sender: ma.device,
                sender_seq,
                envelope: ma.stand_in(sender_seq, 64).into(),
                now: stamp,
                quota: u64::MAX,
            })
            .await
            .unwrap();
        assert_eq!(appended.seq, sender_seq);
        if sender_seq == 3 {
            // Retention takes the first three while they are all there is.
            assert_eq!(store.prune(cut).await.unwrap(), 3);
            let (_, head, pruned_to) = session_pruned(relay.addr, &mb, 0).await;
            assert_eq!((head, pruned_to), (3, Some(3)));
            let (_, head, pruned_to) = session_pruned(relay.addr, &mb, 3).await;
            assert_eq!((head, pruned_to), (3, None), "at the head");
        }
    }
    assert_eq!(store.prune(cut).await.unwrap(), 1);
    // #4 is gone, #5 is not: the relay delivers it and says nothing.
    let (mut ws, head, pruned_to) = session_pruned(relay.addr, &mb, 3).await;
    assert_eq!((head, pruned_to), (5, None));
    let ServerFrame::Deliver { seq, .. } = next_frame(&mut ws).await else {
        panic!("deliver")
    };
    assert_eq!(seq, 5);
    relay.stop().await;
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_over_http_publishes_and_pages_from_a_cursor() {
    let limits = Limits {
        max_batch: 10,
        ..Limits::default()
    };
    let relay = TestRelay::start(config(limits)).await;
    let (mut ra, ma, mut rb, mb) = two_devices(relay.addr).await;
    let publish: Vec<String> = (0..25)
        .map(|i| khub::protocol::b64::encode(ra.seal(format!("s{i}").as_bytes()).unwrap().envelope))
        .collect();
    let response = post_json(
        relay.addr,
        "/sync",
        &[("authorization", &ma.auth())],
        &serde_json::json!({"cursor": 0, "publish": publish}),
    )
    .await;
    assert_eq!(response.status, 200);
    let body = response.json();
    assert_eq!(body["acks"].as_array().unwrap().len(), 25);
    assert_eq!(body["acks"][24]["seq"], 25);

    let mut cursor = 0;
    let mut seen = Vec::new();
    loop {
        let page = post_json(
            relay.addr,
            "/sync",
            &[("authorization", &mb.auth())],
            &serde_json::json!({"cursor": cursor}),
        )
        .await
        .json();
        for item in page["envelopes"].as_array().unwrap() {
            let envelope = khub::protocol::b64::decode(item["envelope"].as_str().unwrap()).unwrap();
            seen.push(String::from_utf8(common::open(&mut rb, &envelope)).unwrap());
            cursor = item["seq"].as_u64().unwrap();
        }
        if !page["more"].as_bool().unwrap() {
            break;
        }
    }
    assert_eq!(seen, (0..25).map(|i| format!("s{i}")).collect::<Vec<_>>());
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_device_is_disconnected_and_refused() {
    let relay = TestRelay::start(RelayConfig::default()).await;
    let (_ra, ma, _rb, mb) = two_devices(relay.addr).await;
    let (mut wb, _) = session(relay.addr, &mb, 0).await;
    let path = format!("/channels/{}/devices/{}", ma.channel, mb.device);
    let removed = http(
        relay.addr,
        "DELETE",
        &path,
        &[("authorization", &ma.auth())],
        b"",
    )
    .await;
    assert_eq!(removed.status, 200);
    assert_eq!(removed.json()["devices"].as_array().unwrap().len(), 1);
    expect_close(&mut wb, 4003).await;
    // Reconnecting is refused with the same code; HTTP with 403 `revoked` (its
    // own token: only it learns it was removed), and a wrong token still 401.
    let mut again = connect(relay.addr).await;
    send_text(&mut again, mb.hello(0)).await;
    expect_close(&mut again, 4003).await;
    let list = http(
        relay.addr,
        "GET",
        &format!("/channels/{}/devices", ma.channel),
        &[("authorization", &mb.auth())],
        b"",
    )
    .await;
    assert_eq!((list.status, list.code()), (403, "revoked".into()));
    let wrong = http(
        relay.addr,
        "GET",
        &format!("/channels/{}/devices", ma.channel),
        &[(
            "authorization",
            &Member::with_device(mb.channel, mb.device).auth(),
        )],
        b"",
    )
    .await;
    assert_eq!((wrong.status, wrong.code()), (401, "unauthorized".into()));
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_and_device_limits_are_explicit_errors() {
    let limits = Limits {
        channel_quota_bytes: 1000,
        max_devices_per_channel: 2,
        ..Limits::default()
    };
    let relay = TestRelay::start(config(limits)).await;
    let (mut ra, ma, _rb, _mb) = two_devices(relay.addr).await;
    let third = Member::new(ma.channel);
    let full = admit(relay.addr, &ma, &third).await;
    assert_eq!((full.status, full.code()), (409, "channel_full".into()));

    let (mut ws, _) = session(relay.addr, &ma, 0).await;
    // An envelope larger than the channel may ever hold is refused for good
    // (`too_large`), not kept as `over_quota` for the device to send forever,
    // and it holds nothing back behind it.
    send_text(&mut ws, publish(&ra.seal(&[9; 1200]).unwrap().envelope)).await;
    loop {
        match next_frame(&mut ws).await {
            ServerFrame::Error { code, fatal, .. } => {
                assert_eq!((code, fatal), (ErrorCode::TooLarge, false));
                break;
            }
            ServerFrame::Ack { .. } => panic!("stored beyond the quota"),
            _ => {}
        }
    }
    let mut over_quota = false;
    let mut acked = 0;
    for _ in 0..20 {
        send_text(&mut ws, publish(&ra.seal(&[7; 100]).unwrap().envelope)).await;
        loop {
            match next_frame(&mut ws).await {
                ServerFrame::Ack { .. } => {
                    acked += 1;
                    break;
                }
                ServerFrame::Error {
                    code: ErrorCode::OverQuota,
                    fatal: false,
                    ..
                } => {
                    over_quota = true;
                    break;
                }
                _ => {}
            }
        }
        if over_quota {
            break;
        }
    }
    assert!(over_quota, "the quota was enforced");
    assert!(acked > 0, "what fits after the refused one was stored");
    assert!(relay.relay.metrics().breaches("channel_quota") >= 1);
    assert!(relay.relay.metrics().breaches("devices_per_channel") >= 1);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_address_are_limited() {
    let limits = Limits {
        max_connections_per_ip: 2,
        ..Limits::default()
    };
    let relay = TestRelay::start(config(limits)).await;
    let _first = connect(relay.addr).await;
    let _second = connect(relay.addr).await;
    // The third is closed at accept: it gets no answer, just the end of the stream.
    let mut third = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let _ = tokio::io::AsyncWriteExt::write_all(&mut third, b"GET /healthz HTTP/1.1\r\n\r\n").await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(STEP, tokio::io::AsyncReadExt::read(&mut third, &mut buf))
        .await
        .expect("closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(relay.relay.metrics().breaches("connections_per_ip") >= 1);
    drop(_first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        http(relay.addr, "GET", "/healthz", &[], b"").await.status,
        200
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_is_closed_with_4004() {
    let limits = Limits {
        idle_timeout: Duration::from_millis(600),
        ping_interval: Duration::from_millis(200),
        ..Limits::default()
    };
    let relay = TestRelay::start(config(limits)).await;
    let (_ra, ma, _rb, _mb) = two_devices(relay.addr).await;
    let (mut ws, _) = session(relay.addr, &ma, 0).await;
    // Not reading means not answering pings.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    expect_close(&mut ws, 4004).await;
    assert!(relay.relay.metrics().breaches("idle_timeout") >= 1);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_neither_slows_others_nor_loses_anything() {
    let limits = Limits {
        slow_reader_timeout: Duration::from_millis(800),
        ..Limits::default()
    };
    let relay = TestRelay::start(config(limits)).await;
    let (a, b, c) = (Device::new("a"), Device::new("b"), Device::new("c"));
    let rings = channel_of(&[&a, &b, &c]);
    let mut rings = rings.into_iter();
    let (mut ra, rb, mut rc) = (
        rings.next().unwrap(),
        rings.next().unwrap(),
        rings.next().unwrap(),
    );
    let (ma, mb, mc) = (
        Member::with_device(ra.channel(), ra.me()),
        Member::with_device(rb.channel(), rb.me()),
        Member::with_device(rc.channel(), rc.me()),
    );
    create_channel(relay.addr, &ma).await;
    admit(relay.addr, &ma, &mb).await;
    admit(relay.addr, &ma, &mc).await;

    let (mut wa, _) = session(relay.addr, &ma, 0).await;
    let (mut wb, _) = session(relay.addr, &mb, 0).await;
    let (wc, _) = session(relay.addr, &mc, 0).await; // never read below
    let big = vec![b'z'; 60_000];
    let total = 120u64;
    let mut worst = Duration::ZERO;
    for i in 1..=total {
        let started = std::time::Instant::now();
        send_text(&mut wa, publish(&ra.seal(&big).unwrap().envelope)).await;
        loop {
            if let ServerFrame::Deliver { seq, .. } = next_frame(&mut wb).await {
                assert_eq!(seq, i);
                break;
            }
        }
        worst = worst.max(started.elapsed());
        // Drain A's own acks and deliveries so A is not a slow reader itself.
        while let Ok(Some(_)) = tokio::time::timeout(
            Duration::from_millis(1),
            futures_util::StreamExt::next(&mut wa),
        )
        .await
        {}
    }
    assert!(
        worst < Duration::from_secs(2),
        "a stalled reader delayed others: worst {worst:?}"
    );
    // C's session was closed as slow; it resumes and gets everything once.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        relay.relay.metrics().breaches("slow_reader") >= 1,
        "the stalled session was closed"
    );
    drop(wc);
    let (mut wc, _) = session(relay.addr, &mc, 0).await;
    for i in 1..=total {
        let ServerFrame::Deliver { seq, envelope } = next_frame(&mut wc).await else {
            panic!("deliver")
        };
        assert_eq!(seq, i);
        let opened = common::open(&mut rc, &envelope);
        assert_eq!(opened.len(), big.len());
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_sessions_with_1001() {
    let relay = TestRelay::start(RelayConfig::default()).await;
    let (_ra, ma, _rb, _mb) = two_devices(relay.addr).await;
    let (mut ws, _) = session(relay.addr, &ma, 0).await;
    let stopping = tokio::spawn(relay.stop());
    expect_close(&mut ws, 1001).await;
    tokio::time::timeout(Duration::from_secs(15), stopping)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_frames_do_not_wait_for_delayed_acks() {
    // Each publish makes the relay write two small frames back to back (the
    // ack, then the device's own delivery). Without TCP_NODELAY the second waits
    // ~40 ms for the client's delayed ACK.
    let relay = TestRelay::start(RelayConfig::default()).await;
    let (mut ra, ma, _rb, _mb) = two_devices(relay.addr).await;
    let (mut ws, _) = session(relay.addr, &ma, 0).await;
    let mut rounds = Vec::new();
    for _ in 0..40 {
        let envelope = ra.seal(b"tiny").unwrap().envelope;
        let started = std::time::Instant::now();
        send_text(&mut ws, publish(&envelope)).await;
        let (mut acked, mut delivered) = (false, false);
        while !(acked && delivered) {
            match next_frame(&mut ws).await {
                ServerFrame::Ack { .. } => acked = true,
                ServerFrame::Deliver { .. } => delivered = true,
                other => panic!("unexpected {other:?}"),
            }
        }
        rounds.push(started.elapsed());
    }
    rounds.sort();
    let median = rounds[rounds.len() / 2];
    assert!(
        median < Duration::from_millis(20),
        "median publish round trip {median:?}"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_publishes_without_pause_still_gets_deliveries_as_it_goes() {
    // A session acks before it delivers and reads the device's frames before
    // it delivers. Each publish here commits at once (memory store) and is
    // delivered back to its sender, so a device whose publishes keep coming
    // always has a frame to read and a delivery waiting: without a bound on
    // reading ahead, nothing would be delivered until it stopped publishing.
    let relay = TestRelay::start(RelayConfig::default()).await;
    let (_ra, ma, _rb, _mb) = two_devices(relay.addr).await;
    let (ws, _) = session(relay.addr, &ma, 0).await;
    use futures_util::StreamExt;
    let (mut sink, mut stream) = ws.split();
    const BURST: u64 = 2000;
    let writer = tokio::spawn(async move {
        use futures_util::SinkExt;
        for seq in 1..=BURST {
            sink.feed(Message::Text(publish(&ma.stand_in(seq, 64)).into()))
                .await
                .expect("send");
        }
        sink.flush().await.expect("flush");
        sink
    });
    let (mut acks, mut first_delivery_after) = (0u64, None);
    while acks < BURST {
        let frame = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("the relay answers the burst")
            .expect("open")
            .expect("frame");
        let Message::Text(text) = frame else { continue };
        match serde_json::from_str(&text).expect("a server frame") {
            ServerFrame::Ack { seq, .. } => {
                acks += 1;
                assert_eq!(seq, acks, "acked in order");
            }
            ServerFrame::Deliver { .. } => {
                first_delivery_after.get_or_insert(acks);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let first = first_delivery_after.expect("deliveries during the burst");
    assert!(
        first <= 200,
        "the first delivery waited for {first} of {BURST} acks"
    );
    let sink = tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("the burst was written")
        .expect("writer");
    drop(sink);
    relay.stop().await;
}

/// A memory store whose reads take a while and are counted, as reads from a
/// disk or over the network would.
struct SlowReads {
    inner: khub::relay::store::memory::MemoryStore,
    delay: Duration,
    reads: std::sync::atomic::AtomicUsize,
}

impl SlowReads {
    fn new(delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            inner: khub::relay::store::memory::MemoryStore::new(),
            delay,
            reads: Default::default(),
        })
    }

    /// Stores `count` stand-in envelopes of `member` behind the relay's back,
    /// so that none of them is in its cache (stamped now: retention would
    /// take older ones).
    async fn backlog(&self, member: &Member, count: u64) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        for seq in 1..=count {
            self.inner
                .append(Append {
                    channel: member.channel,
                    sender: member.device,
                    sender_seq: seq,
                    envelope: member.stand_in(seq, 64).into(),
                    now,
                    quota: u64::MAX,
                })
                .await
                .unwrap();
        }
    }
}

impl Store for SlowReads {
    fn create_channel(
        &self,
        channel: ChannelId,
        device: DeviceId,
        token_hash: TokenHash,
        now: u64,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.inner.create_channel(channel, device, token_hash, now)
    }
    fn device(
        &self,
        channel: ChannelId,
        device: DeviceId,
    ) -> BoxFuture<'_, Result<Option<DeviceRecord>, StoreError>> {
        self.inner.device(channel, device)
    }
    fn devices(&self, channel: ChannelId) -> BoxFuture<'_, Result<Vec<DeviceRecord>, StoreError>> {
        self.inner.devices(channel)
    }
    fn admit(
        &self,
        channel: ChannelId,
        device: DeviceId,
        token_hash: TokenHash,
        max_devices: usize,
        now: u64,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.inner
            .admit(channel, device, token_hash, max_devices, now)
    }
    fn revoke(
        &self,
        channel: ChannelId,
        device: DeviceId,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.inner.revoke(channel, device)
    }
    fn append(&self, append: Append) -> BoxFuture<'_, Result<Appended, StoreError>> {
        self.inner.append(append)
    }
    fn read_page(
        &self,
        channel: ChannelId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> BoxFuture<'_, Result<Vec<StoredEnvelope>, StoreError>> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            self.inner.read_page(channel, after, limit, max_bytes).await
        })
    }
    fn head(&self, channel: ChannelId) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.inner.head(channel)
    }
    fn prune(&self, before: u64) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.inner.prune(before)
    }
    fn health(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        self.inner.health()
    }
    fn stored_bytes(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.inner.stored_bytes()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_sent_while_a_backlog_is_read_do_not_make_the_store_read_it_again() {
    // A device catching up from the store keeps sending frames (pings here;
    // publishes or anything else the relay reads would do). Each turn of the
    // session's loop used to drop the store read under way and ask again, so
    // the device could make the store read its backlog once per frame.
    let store = SlowReads::new(Duration::from_millis(100));
    let relay = TestRelay::start_with(store.clone(), RelayConfig::default()).await;
    let member = Member::new(ChannelId::random(&mut os_rng()));
    assert_eq!(create_channel(relay.addr, &member).await.status, 201);
    const BACKLOG: u64 = 128;
    store.backlog(&member, BACKLOG).await;
    let (ws, head) = session(relay.addr, &member, 0).await;
    assert_eq!(head, BACKLOG);
    use futures_util::{SinkExt, StreamExt};
    let (mut sink, mut stream) = ws.split();
    let pings = tokio::spawn(async move {
        for _ in 0..40 {
            sink.send(Message::Ping(vec![1].into()))
                .await
                .expect("ping");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sink
    });
    let mut delivered = Vec::new();
    while delivered.len() < BACKLOG as usize {
        let frame = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("the backlog is delivered")
            .expect("open")
            .expect("frame");
        if let Message::Text(text) = frame {
            match serde_json::from_str(&text).expect("a server frame") {
                ServerFrame::Deliver { seq, .. } => delivered.push(seq),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert_eq!(delivered, (1..=BACKLOG).collect::<Vec<_>>());
    let reads = store.reads.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        reads <= (BACKLOG as usize).div_ceil(64) + 1,
        "{reads} store reads for a backlog of two batches"
    );
    let sink = tokio::time::timeout(Duration::from_secs(10), pings)
        .await
        .expect("the pings were sent")
        .expect("pinger");
    drop(sink);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_whose_frames_wait_for_a_slow_read_is_not_taken_for_idle() {
    // The session reads at most 64 of a device's frames while a read of its
    // deliveries is under way, then waits for the read. A device that has
    // sent more is not silent, however long the read takes: the idle check
    // must not close it (4004). (The first read starts before `ready`, which
    // waits a second for it at most: 1.5 s of it are left for the session.)
    let limits = Limits {
        idle_timeout: Duration::from_millis(600),
        ping_interval: Duration::from_millis(100),
        ..Limits::default()
    };
    let store = SlowReads::new(Duration::from_millis(2500));
    let relay = TestRelay::start_with(store.clone(), config(limits)).await;
    let member = Member::new(ChannelId::random(&mut os_rng()));
    assert_eq!(create_channel(relay.addr, &member).await.status, 201);
    store.backlog(&member, 64).await;
    let (mut ws, _) = session(relay.addr, &member, 0).await;
    for _ in 0..80 {
        futures_util::SinkExt::feed(&mut ws, Message::Ping(vec![1].into()))
            .await
            .expect("ping");
    }
    futures_util::SinkExt::flush(&mut ws).await.expect("flush");
    for seq in 1..=64 {
        match next_frame(&mut ws).await {
            ServerFrame::Deliver { seq: got, .. } => assert_eq!(got, seq),
            other => panic!("unexpected {other:?}"),
        }
    }
    // Still open: a second hello is answered with its error, not a close.
    send_text(&mut ws, member.hello(0)).await;
    let ServerFrame::Error { code, .. } = next_frame(&mut ws).await else {
        panic!("an error for a second hello")
    };
    assert_eq!(code, ErrorCode::Malformed);
    assert_eq!(relay.relay.metrics().breaches("idle_timeout"), 0);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_envelopes_and_channel_floods_are_refused_with_metrics() {
    let limits = Limits {
        max_envelope_bytes: 2000,
        channels_per_hour: 3,
        ..Limits::default()
    };
    let relay = TestRelay::start(config(limits)).await;
    let (mut ra, ma, _rb, _mb) = two_devices(relay.addr).await;
    let (mut ws, _) = session(relay.addr, &ma, 0).await;
    let big = ra.seal(&[1u8; 4000]).unwrap().envelope;
    send_text(&mut ws, publish(&big)).await;
    let ServerFrame::Error { code, fatal, .. } = next_frame(&mut ws).await else {
        panic!("error")
    };
    assert_eq!((code, fatal), (ErrorCode::TooLarge, false));
    assert_eq!(relay.relay.metrics().breaches("envelope_size"), 1);

    // Channel creations per address: two_devices made one; two more fit.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            create_channel(relay.addr, &Member::new(ChannelId::random(&mut os_rng())))
                .await
                .status,
        );
    }
    assert_eq!(statuses, [201, 201, 429, 429]);
    assert_eq!(relay.relay.metrics().breaches("channels_per_ip"), 2);
    relay.stop().await;
}

/// A relay set to take envelopes longer than any device opens refuses them
/// as too large, and counts the breach, as it does under its own limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_limit_lets_the_relay_take_an_envelope_no_device_opens() {
    let limits = Limits {
        max_envelope_bytes: usize::MAX,
        max_frame_bytes: 2 * MAX_FRAME_LEN,
        ..Limits::default()
    };
    let relay = TestRelay::start(config(limits)).await;
    let (mut ra, ma, _rb, _mb) = two_devices(relay.addr).await;
    let (mut ws, _) = session(relay.addr, &ma, 0).await;
    // A header of the session's own, then more than any MLS message holds.
    let mut long = ra.seal(b"x").unwrap().envelope[..45].to_vec();
    long.resize(MAX_ENVELOPE_LEN + 1, 0);
    send_text(&mut ws, publish(&long)).await;
    let ServerFrame::Error { code, message, .. } = next_frame(&mut ws).await else {
        panic!("an error")
    };
    assert_eq!(code, ErrorCode::TooLarge, "{message}");
    assert_eq!(relay.relay.metrics().breaches("envelope_size"), 1);
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_one_channel_leaves_another_channel_working() {
    let relay = TestRelay::start(RelayConfig::default()).await;
    let (_ra, ma, _rb, _mb) = two_devices(relay.addr).await;
    let (mut rc, mc, mut rd, md) = two_devices(relay.addr).await;
    let (mut wc, _) = session(relay.addr, &mc, 0).await;
    let (mut wd, _) = session(relay.addr, &md, 0).await;
    let noise = [
        "{".to_owned(),
        r#"{"type":"hello"}"#.to_owned(),
        ma.hello(0).replace("\"cursor\":0", "\"cursor\":-1"),
        "\u{0}".repeat(100),
    ];
    for frame in noise {
        let mut ws = connect(relay.addr).await;
        send_text(&mut ws, frame).await;
        expect_close(&mut ws, 4002).await;
    }
    let (mut wa, _) = session(relay.addr, &ma, 0).await;
    send_text(&mut wa, "not json at all".into()).await;
    expect_close(&mut wa, 4002).await;

    send_text(&mut wc, publish(&rc.seal(b"unaffected").unwrap().envelope)).await;
    let ServerFrame::Deliver { envelope, .. } = next_frame(&mut wd).await else {
        panic!("deliver")
    };
    assert_eq!(common::open(&mut rd, &envelope), b"unaffected");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_origins_must_be_allowed_and_hello_must_come_in_time() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let config = RelayConfig {
        allowed_origins: vec!["https://notes.example".into()],
        limits: Limits {
            hello_timeout: Duration::from_millis(300),
            ..Limits::default()
        },
        ..RelayConfig::default()
    };
    let relay = TestRelay::start(config).await;
    let with_origin = |origin: &'static str| {
        let mut request = format!("ws://{}/ws", relay.addr)
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
        request
    };
    let refused = tokio::time::timeout(
        STEP,
        tokio_tungstenite::connect_async(with_origin("https://evil.example")),
    )
    .await
    .unwrap();
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => panic!("expected 403, got {other:?}"),
    }
    let (mut allowed, _) = tokio::time::timeout(
        STEP,
        tokio_tungstenite::connect_async(with_origin("https://notes.example")),
    )
    .await
    .unwrap()
    .expect("allowed origin upgrades");
    // Silent after connecting: closed for want of a hello.
    let frames = expect_close(&mut allowed, 4002).await;
    assert!(matches!(
        frames.as_slice(),
        [ServerFrame::Error {
            code: ErrorCode::Malformed,
            ..
        }]
    ));
    relay.stop().await;
}

/// Publishes `member`'s stand-in envelopes numbered `seqs` over `/sync`; what
/// the relay answered for each: its sequence number, or the error code.
async fn sync_publish(addr: std::net::SocketAddr, member: &Member, seqs: Vec<u64>) -> Vec<String> {
    let body = serde_json::json!({
        "cursor": 1000,
        "publish": seqs.iter().map(|s| member.stand_in_envelope(*s, 100)).collect::<Vec<_>>(),
    });
    let answer = post_json(addr, "/sync", &[("authorization", &member.auth())], &body)
        .await
        .json();
    answer["acks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            a["seq"].as_u64().map_or_else(
                || a["error"]["code"].as_str().unwrap().to_owned(),
                |s| s.to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_storage_holds_back_a_senders_later_envelopes_so_none_is_stored_out_of_order() {
    let relay = TestRelay::start(RelayConfig::default()).await;
    let member = Member::new(ChannelId::random(&mut os_rng()));
    assert_eq!(create_channel(relay.addr, &member).await.status, 201);
    let publish = |seqs: &[u64]| sync_publish(relay.addr, &member, seqs.to_vec());
    relay.relay.hub.set_storage_full(true);
    assert_eq!(publish(&[1]).await, ["storage_full"]);
    // Room again: envelope 2 alone would jump ahead of 1, and is held back.
    relay.relay.hub.set_storage_full(false);
    assert_eq!(publish(&[2]).await, ["storage_full"]);
    // The device sends its outbox again, in order: both are stored, in order.
    assert_eq!(publish(&[1, 2]).await, ["1", "2"]);
}

/// The databases keep sender sequence numbers as signed 64-bit integers: one
/// above that would be stored as a negative number, the sender's highest
/// would be misread after a restart, and its retry would fail whole batches
/// of other devices' publishes. The relay refuses such numbers up front.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_sequence_numbers_past_the_signed_range_are_refused() {
    let relay = TestRelay::start(RelayConfig::default()).await;
    let member = Member::new(ChannelId::random(&mut os_rng()));
    assert_eq!(create_channel(relay.addr, &member).await.status, 201);
    let publish = |seqs: Vec<u64>| sync_publish(relay.addr, &member, seqs);
    let top = i64::MAX as u64;
    assert_eq!(
        publish(vec![1, top + 1, u64::MAX]).await,
        ["1", "invalid_envelope", "invalid_envelope"]
    );
    assert_eq!(publish(vec![top]).await, ["2"]);
}
