//! The vectors published for other SDKs: regenerated from fixed randomness and
//! compared byte for byte, then re-checked from their own fields with the bare
//! primitives (HKDF, HMAC, SHA-512, XChaCha20-Poly1305), as an implementer in
//! another language would.
//!
//! After a deliberate protocol change: `KHUB_UPDATE_VECTORS=1 cargo test --test published_vectors`.

use std::path::PathBuf;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::{Digest, Sha256, Sha512};

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn load(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(data_dir().join(name)).expect("vector file"))
        .expect("JSON")
}

fn hx(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().expect("hex string")).expect("hex")
}

fn hkdf(salt: &[u8], ikm: &[u8], info: &[u8], len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    hkdf::Hkdf::<Sha256>::new(Some(salt), ikm)
        .expand(info, &mut out)
        .unwrap();
    out
}

fn lv(parts: &[&[u8]]) -> Vec<u8> {
    parts
        .iter()
        .flat_map(|p| [&[p.len() as u8][..], p].concat())
        .collect()
}

#[test]
fn published_vectors_are_reproduced_byte_for_byte() {
    for (name, text) in khub::vectors::generate() {
        let path = data_dir().join(name);
        if std::env::var_os("KHUB_UPDATE_VECTORS").is_some() {
            std::fs::write(&path, &text).unwrap();
        }
        let published = std::fs::read_to_string(&path).unwrap_or_else(|_| {
            panic!(
                "{} is missing; run with KHUB_UPDATE_VECTORS=1",
                path.display()
            )
        });
        assert!(
            published == text,
            "{name} differs from what this build generates"
        );
    }
}

#[test]
fn the_pairing_vector_follows_the_documented_construction() {
    let v = load("khub-pairing-v1.json");
    let (i, o) = (&v["inputs"], &v["outputs"]);
    let sid = hx(&i["sid"]);
    assert_eq!(hx(&i["PRS"]), b"7QK3M9TZ");
    assert_eq!(hx(&i["CI"]), lv(&[b"khub/v1/pair/ci", b"42"]));

    // ISK = SHA-512(lv_cat("CPaceRistretto255_ISK", sid, K) || lv_cat(Ya, ADa) || lv_cat(Yb, ADb)).
    let transcript = [
        lv(&[&hx(&o["Ya"]), &hx(&i["ADa"])]),
        lv(&[&hx(&o["Yb"]), &hx(&i["ADb"])]),
    ]
    .concat();
    assert_eq!(hx(&o["transcript_ir"]), transcript);
    let isk = Sha512::new()
        .chain_update(lv(&[b"CPaceRistretto255_ISK", &sid, &hx(&o["K"])]))
        .chain_update(&transcript)
        .finalize()
        .to_vec();
    assert_eq!(hx(&o["ISK"]), isk);

    // Key confirmation.
    let mac_key = Sha512::new()
        .chain_update(b"CPaceMac")
        .chain_update(&sid)
        .chain_update(&isk)
        .finalize();
    assert_eq!(hx(&o["mac_key"]), mac_key.to_vec());
    let tag = |y: &Value, ad: &Value| {
        let mut mac = <Hmac<Sha512>>::new_from_slice(&mac_key).unwrap();
        mac.update(&lv(&[&hx(y), &hx(ad)]));
        mac.finalize().into_bytes().to_vec()
    };
    assert_eq!(hx(&o["Ta"]), tag(&o["Ya"], &i["ADa"]));
    assert_eq!(hx(&o["Tb"]), tag(&o["Yb"], &i["ADb"]));

    // Session keys and SAS.
    assert_eq!(hx(&o["a2b"]), hkdf(&sid, &isk, b"khub/v1/pair/a2b", 32));
    assert_eq!(hx(&o["b2a"]), hkdf(&sid, &isk, b"khub/v1/pair/b2a", 32));
    let sas = u64::from_be_bytes(hkdf(&sid, &isk, b"khub/v1/pair/sas", 8).try_into().unwrap())
        % 1_000_000;
    assert_eq!(
        o["sas"].as_str().unwrap(),
        format!("{:03} {:03}", sas / 1000, sas % 1000)
    );

    // Messages: Start = 01 || Ya; Response = 02 || Yb || Tb || nonce || sealed info.
    assert_eq!(
        hx(&o["message_start"]),
        [&[1u8][..], &hx(&o["Ya"])].concat()
    );
    let response = hx(&o["message_response"]);
    assert_eq!(response[0], 2);
    assert_eq!(&response[1..33], &hx(&o["Yb"])[..]);
    assert_eq!(&response[33..97], &hx(&o["Tb"])[..]);
    assert_eq!(&response[97..121], &hx(&i["device_info_nonce"])[..]);
    let cipher = XChaCha20Poly1305::new(hx(&o["b2a"]).as_slice().try_into().unwrap());
    let aad = [&b"khub/v1/pair/device-info"[..], &sid].concat();
    let info = cipher
        .decrypt(
            &XNonce::try_from(&response[97..121]).unwrap(),
            Payload {
                msg: &response[121..],
                aad: &aad,
            },
        )
        .expect("device info opens");
    assert_eq!(info, hx(&o["device_info_plaintext"]));
    let token_hash = Sha256::digest(hx(&i["joiner_relay_token"]));
    assert_eq!(&info[info.len() - 32..], &token_hash[..]);
}

#[test]
fn the_envelope_vectors_open_with_the_bare_primitives() {
    let v = load("khub-envelope-v1.json");
    let (channel, key, sender) = (
        hx(&v["channel_id"]),
        hx(&v["channel_key"]),
        hx(&v["sender"]),
    );
    for case in v["cases"].as_array().unwrap() {
        let epoch = case["epoch"].as_u64().unwrap() as u32;
        let info = [
            &b"khub/v1/envelope/sender-key"[..],
            &epoch.to_be_bytes(),
            &sender,
        ]
        .concat();
        let sender_key = hkdf(&channel, &key, &info, 32);
        assert_eq!(hx(&case["sender_key"]), sender_key);

        let envelope = hx(&case["envelope"]);
        let header = [
            &[1u8][..],
            &channel,
            &epoch.to_be_bytes(),
            &sender,
            &case["seq"].as_u64().unwrap().to_be_bytes(),
        ]
        .concat();
        assert_eq!(&envelope[..45], &header[..]);
        assert_eq!(&envelope[45..69], &hx(&case["nonce"])[..]);
        let padded = XChaCha20Poly1305::new(sender_key.as_slice().try_into().unwrap())
            .decrypt(
                &XNonce::try_from(&envelope[45..69]).unwrap(),
                Payload {
                    msg: &envelope[69..],
                    aad: &header,
                },
            )
            .expect("opens");
        let plaintext = hx(&case["plaintext"]);
        assert_eq!(padded.len(), case["padded_len"].as_u64().unwrap() as usize);
        assert_eq!(&padded[..plaintext.len()], &plaintext[..]);
        assert_eq!(padded[plaintext.len()], 0x80);
        assert!(padded[plaintext.len() + 1..].iter().all(|&b| b == 0));
    }
}

#[test]
fn the_rekey_vector_opens_with_the_bare_primitives() {
    let v = load("khub-rekey-v1.json");
    let channel = hx(&v["channel_id"]);
    let (a, b) = (&v["members"]["a"], &v["members"]["b"]);
    let b_secret: [u8; 32] = hx(&v["b_x25519_secret"]).try_into().unwrap();
    let a_public: [u8; 32] = hx(&a["public_key"]).try_into().unwrap();
    let shared = x25519_dalek::x25519(b_secret, a_public);
    let (ida, idb) = (hx(&a["device_id"]), hx(&b["device_id"]));
    let (pka, pkb) = (hx(&a["public_key"]), hx(&b["public_key"]));
    let info = if ida < idb {
        [&b"khub/v1/pairwise"[..], &ida, &idb, &pka, &pkb].concat()
    } else {
        [&b"khub/v1/pairwise"[..], &idb, &ida, &pkb, &pka].concat()
    };
    let pairwise = hkdf(&channel, &shared, &info, 32);
    assert_eq!(hx(&v["pairwise_key_a_b"]), pairwise);

    // Find b's entry: head, then count, then (recipient, nonce, sealed key) per entry.
    let message = hx(&v["rekey_message"]);
    let members = u16::from_be_bytes([message[37], message[38]]) as usize;
    let head_len = 39 + 16 * members;
    let entries = &message[head_len + 2..];
    let entry = entries
        .chunks(16 + 24 + 48)
        .find(|e| e[..16] == idb[..])
        .expect("b has an entry");
    let aad = [&b"khub/v1/rekey"[..], &message[..head_len], &idb].concat();
    let key = XChaCha20Poly1305::new(pairwise.as_slice().try_into().unwrap())
        .decrypt(
            &XNonce::try_from(&entry[16..40]).unwrap(),
            Payload {
                msg: &entry[40..],
                aad: &aad,
            },
        )
        .expect("b's entry opens");
    assert_eq!(key, hx(&v["new_channel_key"]));
}
