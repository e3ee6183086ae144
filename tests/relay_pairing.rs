//! Pairing through the relay's mailbox with the real pairing state machines:
//! the whole flow, a wrong code, and every way a claim can be refused.

mod common;

use std::time::Duration;

use common::Device;
use common::net::*;
use khub::channel::Event;
use khub::crypto::os_rng;
use khub::pairing::{Code, DeviceInfo, Inviter, Joiner, Message, Nameplate, PairingError};
use khub::protocol::{ServerFrame, b64};
use khub::relay::config::{Limits, RelayConfig};
use serde_json::json;

fn config(limits: Limits) -> RelayConfig {
    RelayConfig {
        limits,
        ..RelayConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_pair_through_the_relay_and_then_sync() {
    let relay = TestRelay::start(RelayConfig::default()).await;
    let addr = relay.addr;
    let mut rng = os_rng();
    let (laptop, phone) = (Device::new("laptop"), Device::new("phone"));
    let mut keyring = common::new_channel(&laptop);
    let inviter = Member::with_device(keyring.channel(), keyring.me());
    assert_eq!(create_channel(addr, &inviter).await.status, 201);
    let inviter_auth = inviter.auth();
    let a = ("authorization", inviter_auth.as_str());

    // A opens a slot, makes the code for its nameplate, posts Start.
    let sid = common::sid();
    let nameplate = open_slot(addr, &inviter, sid).await;
    assert!(
        (1..=100).contains(&nameplate),
        "a short nameplate: {nameplate}"
    );
    let code = Code::generate(Nameplate::new(nameplate).unwrap(), &mut rng);
    let (awaiting, start) = Inviter::start(&code, sid, &mut rng);
    assert_eq!(send_msg(addr, nameplate, a, &start).await.status, 202);

    // B: the person types the code; B claims and answers.
    let typed = Code::parse(&code.display()).unwrap();
    let claimed = claim(addr, typed.nameplate().get()).await;
    assert_eq!(claimed.status, 200);
    let claimed = claimed.json();
    let claim_token = claimed["claim"].as_str().unwrap().to_owned();
    let relay_sid: [u8; 16] = b64::decode(claimed["sid"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    assert_eq!(relay_sid, sid);
    let b = ("x-khub-claim", claim_token.as_str());
    let phone_member = Member::with_device(keyring.channel(), phone.id());
    let info = DeviceInfo::new(
        phone.id(),
        phone_member.token.expose(),
        phone.info().key_package,
    );
    let (messages, _) = recv_msg(addr, nameplate, b, 0).await;
    let (joiner, response) =
        Joiner::respond(&typed, relay_sid, &messages[0], &info, &mut rng).unwrap();
    assert_eq!(send_msg(addr, nameplate, b, &response).await.status, 202);

    // A confirms B, admits it at the relay, sends the welcome, ends the slot.
    let (messages, _) = recv_msg(addr, nameplate, a, 0).await;
    let admission = awaiting.receive(&messages[0]).unwrap();
    let joiner_info = admission.joiner().clone();
    let admitted = post_json(
        addr,
        &format!("/channels/{}/devices", keyring.channel()),
        &[a],
        &json!({"device": joiner_info.id.to_string(), "token_hash": b64::encode(joiner_info.token_hash)}),
    )
    .await;
    assert_eq!(admitted.status, 201);
    let (_, welcome) = common::add(&mut keyring, &joiner_info);
    let (finish, paired) = admission.finish(&welcome, &mut rng);
    assert_eq!(send_msg(addr, nameplate, a, &finish).await.status, 202);
    assert_eq!(
        http(addr, "DELETE", &format!("/pair/{nameplate}"), &[a], b"")
            .await
            .status,
        204
    );

    // B reads the welcome; the slot is gone once it has.
    let (messages, closed) = recv_msg(addr, nameplate, b, 1).await;
    assert!(closed);
    let joined = joiner.receive(&messages[0]).unwrap();
    assert_eq!(joined.keys.sas, paired.keys.sas);
    assert_eq!(claim(addr, nameplate).await.code(), "gone");
    assert_eq!(
        relay
            .relay
            .metrics()
            .pairings_succeeded
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // B's relay token works, and the two devices sync.
    let mut phone_ring = phone.join(&joined);
    let (mut ws_b, _) = session(addr, &phone_member, 0).await;
    let (mut ws_a, _) = session(addr, &inviter, 0).await;
    send_text(
        &mut ws_a,
        publish(&keyring.seal(b"welcome aboard").unwrap().envelope),
    )
    .await;
    let ServerFrame::Deliver { envelope, .. } = next_frame(&mut ws_b).await else {
        panic!("deliver")
    };
    match phone_ring.take_in(&envelope, 0).event {
        Some(Event::App { sender, plaintext }) => {
            assert_eq!(sender.id, laptop.id());
            assert_eq!(plaintext, b"welcome aboard");
        }
        other => panic!("not opened: {other:?}"),
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_code_fails_on_both_sides_through_the_relay() {
    let relay = TestRelay::start(RelayConfig::default()).await;
    let addr = relay.addr;
    let mut rng = os_rng();
    let (laptop, phone) = (Device::new("laptop"), Device::new("phone"));
    let keyring = common::new_channel(&laptop);
    let inviter = Member::with_device(keyring.channel(), keyring.me());
    create_channel(addr, &inviter).await;
    let inviter_auth = inviter.auth();
    let a = ("authorization", inviter_auth.as_str());
    let sid = common::sid();
    let nameplate = open_slot(addr, &inviter, sid).await;
    let code = Code::generate(Nameplate::new(nameplate).unwrap(), &mut rng);
    let (awaiting, start) = Inviter::start(&code, sid, &mut rng);
    send_msg(addr, nameplate, a, &start).await;

    let mistyped = Code::parse(&format!("{nameplate}-AAAA-AAAA")).unwrap();
    let claimed = claim(addr, nameplate).await.json();
    let claim_token = claimed["claim"].as_str().unwrap().to_owned();
    let b = ("x-khub-claim", claim_token.as_str());
    let (messages, _) = recv_msg(addr, nameplate, b, 0).await;
    let (joiner, response) =
        Joiner::respond(&mistyped, sid, &messages[0], &phone.info(), &mut rng).unwrap();
    send_msg(addr, nameplate, b, &response).await;

    let (messages, _) = recv_msg(addr, nameplate, a, 0).await;
    let error = awaiting.receive(&messages[0]).err().unwrap();
    assert_eq!(error, PairingError::ConfirmationFailed);
    send_msg(
        addr,
        nameplate,
        a,
        &Message::Abort(error.abort_reason()).encode(),
    )
    .await;
    http(addr, "DELETE", &format!("/pair/{nameplate}"), &[a], b"").await;

    let (messages, closed) = recv_msg(addr, nameplate, b, 1).await;
    assert!(closed);
    assert_eq!(
        joiner.receive(&messages[0]).err(),
        Some(PairingError::ConfirmationFailed)
    );
    assert_eq!(
        relay
            .relay
            .metrics()
            .pairings_failed
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_of_unknown_used_expired_or_taken_slots_are_refused() {
    let limits = Limits {
        pairing_ttl: Duration::from_millis(700),
        claims_per_minute: 100,
        ..Limits::default()
    };
    let relay = TestRelay::start(config(limits)).await;
    let addr = relay.addr;
    let laptop = Device::new("laptop");
    let keyring = common::new_channel(&laptop);
    let inviter = Member::with_device(keyring.channel(), keyring.me());
    create_channel(addr, &inviter).await;
    let inviter_auth = inviter.auth();
    let a = ("authorization", inviter_auth.as_str());

    let unknown = claim(addr, 4242).await;
    assert_eq!((unknown.status, unknown.code()), (404, "not_found".into()));
    assert!(
        unknown.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("check the code")
    );

    let first = open_slot(addr, &inviter, common::sid()).await;
    assert_eq!(claim(addr, first).await.status, 200);
    let second = claim(addr, first).await;
    assert_eq!(
        (second.status, second.code()),
        (409, "already_claimed".into())
    );
    // A stranger's claim token cannot read the slot.
    let forged = b64::encode([9u8; 32]);
    let snoop = http(
        addr,
        "GET",
        &format!("/pair/{first}/messages?wait=0"),
        &[("x-khub-claim", &forged)],
        b"",
    )
    .await;
    assert_eq!(snoop.status, 401);

    // A new slot while the first is open gets another nameplate.
    let other = open_slot(addr, &inviter, common::sid()).await;
    assert_ne!(other, first);
    // Ended: the inviter cancels before anyone claims.
    assert_eq!(
        http(addr, "DELETE", &format!("/pair/{other}"), &[a], b"")
            .await
            .status,
        204
    );
    assert_eq!(claim(addr, other).await.code(), "gone");

    // Expired: after the TTL, the old code says "ended", and the nameplate is not
    // handed to a new pairing while an old code could still be typed.
    let expiring = open_slot(addr, &inviter, common::sid()).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    let late = claim(addr, expiring).await;
    assert_eq!((late.status, late.code()), (410, "gone".into()));
    let fresh = open_slot(addr, &inviter, common::sid()).await;
    assert_ne!(fresh, expiring);
    assert!(
        relay
            .relay
            .metrics()
            .pairings_failed
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_claims_from_one_address_is_rate_limited() {
    let limits = Limits {
        claims_per_minute: 5,
        ..Limits::default()
    };
    let relay = TestRelay::start(config(limits)).await;
    let mut statuses = Vec::new();
    for nameplate in 1..=12 {
        statuses.push(claim(relay.addr, nameplate).await.status);
    }
    assert_eq!(&statuses[..5], &[404; 5]);
    assert!(statuses[5..].iter().all(|s| *s == 429), "{statuses:?}");
    assert_eq!(relay.relay.metrics().breaches("claims_per_ip"), 7);
    // Other routes still answer.
    assert_eq!(
        http(relay.addr, "GET", "/healthz", &[], b"").await.status,
        200
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_pairing_messages_are_refused() {
    let relay = TestRelay::start(RelayConfig::default()).await;
    let laptop = Device::new("laptop");
    let keyring = common::new_channel(&laptop);
    let inviter = Member::with_device(keyring.channel(), keyring.me());
    create_channel(relay.addr, &inviter).await;
    let auth = inviter.auth();
    let nameplate = open_slot(relay.addr, &inviter, common::sid()).await;
    // The largest message passes (a full channel's Welcome fits), one byte more does not.
    let largest = vec![1u8; khub::pairing::message::MAX_MESSAGE_LEN];
    let stored = send_msg(relay.addr, nameplate, ("authorization", &auth), &largest).await;
    assert_eq!(stored.status, 202);
    let big = vec![1u8; khub::pairing::message::MAX_MESSAGE_LEN + 1];
    let refused = send_msg(relay.addr, nameplate, ("authorization", &auth), &big).await;
    assert_eq!((refused.status, refused.code()), (413, "too_large".into()));
    relay.stop().await;
}
