//! The published MLS transcript, `tests/data/khub-mls-v2.json`: a joiner's
//! KeyPackage with its private keys, the Welcome handed over through pairing
//! (inside its channel-welcome payload), and the envelopes both devices then
//! exchange, in relay order — an application message each way, the joiner's
//! `joined`, an update commit, and a message of the new epoch.
//!
//! OpenMLS draws its own randomness, so unlike the pairing vectors this file
//! is recorded once and then checked: this build must still read every byte
//! of it. An implementation in another language checks itself the same way,
//! with its own RFC 9420 library and the private keys in the file.
//!
//! After a deliberate protocol change: `KHUB_UPDATE_VECTORS=1 cargo test --test mls_vectors`.

use std::path::PathBuf;

use khub::channel::{Channel, Event, Joining};
use khub::crypto::envelope::{EnvelopeHeader, HEADER_LEN};
use khub::ids::{ChannelId, DeviceId};
use khub::pairing::ChannelWelcome;
use khub::vectors::fixed;
use serde_json::{Value, json};

const FILE: &str = "khub-mls-v2.json";

fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(FILE)
}

fn hx(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().expect("hex string")).expect("hex")
}

/// The bytes of a serde-encoded OpenMLS secret (an array of numbers, possibly
/// wrapped in objects).
fn bytes_in(value: &Value) -> Option<Vec<u8>> {
    match value {
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_u64().and_then(|b| u8::try_from(b).ok()))
            .collect(),
        Value::Object(fields) => fields.values().find_map(bytes_in),
        _ => None,
    }
}

/// The named private key among the joiner's OpenMLS storage rows.
fn private_key(rows: &[(Vec<u8>, Vec<u8>)], field: &str) -> Vec<u8> {
    rows.iter()
        .filter_map(|(_, value)| serde_json::from_slice::<Value>(value).ok())
        .find_map(|v| v.get(field).and_then(bytes_in))
        .unwrap_or_else(|| panic!("no {field} in the joiner's state"))
}

fn record() -> Value {
    let channel = ChannelId::from_bytes(fixed("channel id"));
    let inviter = DeviceId::from_bytes(fixed("inviter device id"));
    let joiner = DeviceId::from_bytes(fixed("joiner device id"));
    let mut laptop = Channel::create(channel, inviter, "laptop", 0).unwrap();
    let (joining, key_package) = Joining::start(joiner, "phone").unwrap();
    let (signature_public, rows) = joining.state_for_testing_only();
    let (commit, welcome) = laptop.commit_add(joiner, &key_package).unwrap();
    assert!(matches!(
        laptop.take_in(&commit.envelope, 0).event,
        Some(Event::OwnCommit(_))
    ));
    // The relay stored the Add commit as its sequence number 1.
    let payload = ChannelWelcome {
        channel,
        cursor: 1,
        welcome: welcome.clone(),
    };
    let mut phone = joining.join(channel, &welcome, 0).unwrap().channel;

    let mut log = Vec::new();
    let mut push = |from: &str, kind: &str, plaintext: Option<&[u8]>, envelope: Vec<u8>| {
        let header = EnvelopeHeader::decode(&envelope).unwrap();
        log.push(json!({
            "relay_seq": log.len() as u64 + 2,
            "from": from,
            "kind": kind,
            "epoch": header.epoch,
            "sender_seq": header.seq,
            "plaintext": plaintext.map(hex::encode),
            "envelope": hex::encode(&envelope),
        }));
    };
    let joined = phone.seal(&[0x03]).unwrap();
    push("phone", "application", Some(&[0x03]), joined.envelope);
    let hello = b"\x00hello phone";
    let sealed = laptop.seal(hello).unwrap();
    push("laptop", "application", Some(hello), sealed.envelope);
    let back = b"\x00hello laptop";
    let sealed = phone.seal(back).unwrap();
    push("phone", "application", Some(back), sealed.envelope);
    let update = laptop.commit_update().unwrap();
    assert!(matches!(
        laptop.take_in(&update.envelope, 0).event,
        Some(Event::OwnCommit(_))
    ));
    push("laptop", "commit", None, update.envelope);
    let after = b"\x00after the update";
    let sealed = laptop.seal(after).unwrap();
    push("laptop", "application", Some(after), sealed.envelope);

    json!({
        "description": "khub protocol 2, MLS part: ciphersuite 0x0003 (MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519). A laptop creates the channel (MLS group id = channel id) and adds a phone from its KeyPackage; the Welcome reaches the phone inside the channel-welcome payload of pairing (sealed under a2b there; here in the clear). Then the envelopes that follow the Add commit in relay order, each `45-byte header || MLSMessage` (PrivateMessage, authenticated_data = header || epoch fingerprint). Application plaintexts are given after unpadding, content type byte first (0x00 app, 0x03 joined). Credential identities are device id || UTF-8 name. The phone's private keys let another implementation process the Welcome and open every envelope. Recorded once (OpenMLS draws its own randomness); ids are SHA-512(\"khub/v1/vectors/\" || name) truncated, with names \"channel id\", \"inviter device id\", \"joiner device id\".",
        "ciphersuite": 3,
        "channel_id": hex::encode(channel.as_bytes()),
        "inviter": {"device_id": hex::encode(inviter.as_bytes()), "name": "laptop"},
        "joiner": {
            "device_id": hex::encode(joiner.as_bytes()),
            "name": "phone",
            "signature_public_key": hex::encode(&signature_public),
            "signature_private_key": hex::encode(private_key(&rows, "private")),
            "init_private_key": hex::encode(private_key(&rows, "private_init_key")),
            "leaf_encryption_private_key": hex::encode(private_key(&rows, "private_encryption_key")),
        },
        "key_package": hex::encode(&key_package),
        "channel_welcome_plaintext": hex::encode(payload.encode()),
        "mls_welcome": hex::encode(&welcome),
        "envelopes": log,
        "openmls_0_9_joiner_storage": rows
            .iter()
            .map(|(k, v)| json!([hex::encode(k), hex::encode(v)]))
            .collect::<Vec<_>>(),
    })
}

#[test]
fn the_published_mls_transcript_is_read_by_this_build() {
    if std::env::var_os("KHUB_UPDATE_VECTORS").is_some() {
        let mut text = serde_json::to_string_pretty(&record()).unwrap();
        text.push('\n');
        std::fs::write(path(), text).unwrap();
    }
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(path()).expect("vector file")).unwrap();
    let channel = ChannelId::from_slice(&hx(&file["channel_id"])).unwrap();
    let joiner = DeviceId::from_slice(&hx(&file["joiner"]["device_id"])).unwrap();
    let inviter = DeviceId::from_slice(&hx(&file["inviter"]["device_id"])).unwrap();

    // The payload carries the Welcome and the cursor after the Add commit.
    let payload = ChannelWelcome::decode(&hx(&file["channel_welcome_plaintext"])).unwrap();
    assert_eq!(payload.channel, channel);
    assert_eq!(payload.cursor, 1);
    assert_eq!(payload.welcome, hx(&file["mls_welcome"]));

    // The published init private key is the KeyPackage's: X25519(init_priv, 9)
    // is the init public key, which the KeyPackage carries after its version
    // (2 bytes), ciphersuite (2) and the key's length (1).
    let key_package = hx(&file["key_package"]);
    let init_private: [u8; 32] = hx(&file["joiner"]["init_private_key"]).try_into().unwrap();
    let init_public =
        x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(init_private));
    assert_eq!(&key_package[..5], [0x00, 0x01, 0x00, 0x03, 0x20]);
    assert_eq!(&key_package[5..37], init_public.as_bytes());

    // The joiner, restored from its recorded state, takes in the Welcome and
    // every envelope after the cursor, in relay order.
    let rows: Vec<(Vec<u8>, Vec<u8>)> = file["openmls_0_9_joiner_storage"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| (hx(&row[0]), hx(&row[1])))
        .collect();
    let joining = Joining::from_state_for_testing_only(
        joiner,
        &hx(&file["joiner"]["signature_public_key"]),
        rows,
    )
    .expect("the joiner's state loads");
    let joined = joining.join(channel, &payload.welcome, 0).unwrap();
    assert_eq!(
        (joined.inviter.id, joined.inviter.name.as_str()),
        (inviter, "laptop")
    );
    let mut phone = joined.channel;
    for entry in file["envelopes"].as_array().unwrap() {
        let envelope = hx(&entry["envelope"]);
        let header = EnvelopeHeader::decode(&envelope).unwrap();
        assert_eq!(u64::from(header.epoch), entry["epoch"].as_u64().unwrap());
        assert_eq!(header.seq, entry["sender_seq"].as_u64().unwrap());
        assert!(envelope.len() > HEADER_LEN);
        let taken = phone.take_in(&envelope, 0);
        assert!(taken.refusals.is_empty(), "{entry}: {taken:?}");
        match (
            entry["from"].as_str().unwrap(),
            entry["kind"].as_str().unwrap(),
        ) {
            // Its own envelopes come back to a device and mean nothing new.
            ("phone", _) => assert!(matches!(taken.event, Some(Event::Nothing))),
            ("laptop", "application") => match taken.event {
                Some(Event::App { sender, plaintext }) => {
                    assert_eq!(sender.id, inviter);
                    assert_eq!(plaintext, hx(&entry["plaintext"]));
                }
                other => panic!("{entry}: {other:?}"),
            },
            ("laptop", "commit") => assert!(
                matches!(taken.event, Some(Event::Commit { by, .. }) if by == inviter),
                "{taken:?}"
            ),
            other => panic!("unexpected entry {other:?}"),
        }
    }
}
