//! The vectors published for other SDKs: regenerated from fixed randomness and
//! compared byte for byte, then re-checked from their own fields with the bare
//! primitives (HKDF, HMAC, SHA-512, XChaCha20-Poly1305), as an implementer in
//! another language would. Protocol 2: the MLS messages inside are RFC 9420's
//! (their vectors are the MLS working group's); these pin khub's own framing.
//!
//! After a deliberate protocol change: `KHUB_UPDATE_VECTORS=1 cargo test --test published_vectors`.

use std::path::PathBuf;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use khub::crypto::envelope::{self, EnvelopeHeader};
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
    let generated = khub::vectors::generate();
    let names: Vec<&str> = generated.iter().map(|(name, _)| *name).collect();
    assert_eq!(names, ["khub-pairing-v2.json", "khub-envelope-v2.json"]);
    // Protocol 1's files are gone: nobody should implement against them.
    for old in [
        "khub-pairing-v1.json",
        "khub-envelope-v1.json",
        "khub-rekey-v1.json",
    ] {
        assert!(!data_dir().join(old).exists(), "{old} is still published");
    }
    for (name, text) in generated {
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
    let v = load("khub-pairing-v2.json");
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
    let info = open(
        &hx(&o["b2a"]),
        b"khub/v1/pair/device-info",
        &sid,
        &response[97..],
    );
    assert_eq!(info, hx(&o["device_info_plaintext"]));

    // Device info, protocol 2: 02 || device id || SHA-256(token) || u32 len || KeyPackage.
    let key_package = hx(&i["key_package"]);
    let expected_info = [
        &[2u8][..],
        &hx(&i["joiner_device_id"]),
        &Sha256::digest(hx(&i["joiner_relay_token"])),
        &(key_package.len() as u32).to_be_bytes(),
        &key_package,
    ]
    .concat();
    assert_eq!(info, expected_info);

    // Finish = 03 || Ta || nonce || sealed welcome, under a2b.
    let finish = hx(&o["message_finish"]);
    assert_eq!(finish[0], 3);
    assert_eq!(&finish[1..65], &hx(&o["Ta"])[..]);
    assert_eq!(&finish[65..89], &hx(&i["welcome_nonce"])[..]);
    let welcome = open(&hx(&o["a2b"]), b"khub/v1/pair/welcome", &sid, &finish[65..]);
    assert_eq!(welcome, hx(&o["welcome_plaintext"]));

    // Channel welcome, protocol 2: 02 || channel id || cursor u64 || u32 len || MLS Welcome.
    let w = &i["welcome"];
    let mls_welcome = hx(&w["mls_welcome"]);
    let expected_welcome = [
        &[2u8][..],
        &hx(&w["channel_id"]),
        &w["cursor"].as_u64().unwrap().to_be_bytes(),
        &(mls_welcome.len() as u32).to_be_bytes(),
        &mls_welcome,
    ]
    .concat();
    assert_eq!(welcome, expected_welcome);

    // Both payloads decode in this build, and protocol 1's version byte is
    // refused with a message a person can act on.
    let decoded = khub::pairing::DeviceInfo::decode(&info).unwrap();
    assert_eq!(decoded.key_package, key_package);
    let decoded = khub::pairing::ChannelWelcome::decode(&welcome).unwrap();
    assert_eq!(decoded.welcome, mls_welcome);
    let mut v1 = info.clone();
    v1[0] = 1;
    let refused = khub::pairing::DeviceInfo::decode(&v1).unwrap_err();
    assert!(refused.0.contains("protocol 1"), "{}", refused.0);
    let mut v1 = welcome.clone();
    v1[0] = 1;
    let refused = khub::pairing::ChannelWelcome::decode(&v1).unwrap_err();
    assert!(refused.0.contains("protocol 1"), "{}", refused.0);
}

/// Opens an XChaCha20-Poly1305 box (`nonce || ciphertext || tag`) bound to `label || sid`.
fn open(key: &[u8], label: &[u8], sid: &[u8], sealed: &[u8]) -> Vec<u8> {
    XChaCha20Poly1305::new(key.try_into().unwrap())
        .decrypt(
            &XNonce::try_from(&sealed[..24]).unwrap(),
            Payload {
                msg: &sealed[24..],
                aad: &[label, sid].concat(),
            },
        )
        .expect("the sealed payload opens")
}

#[test]
fn the_envelope_vectors_follow_the_documented_framing() {
    let v = load("khub-envelope-v2.json");
    let (channel, sender) = (hx(&v["channel_id"]), hx(&v["sender"]));
    let cases = v["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let label = case["label"].as_str().unwrap();
        let epoch = case["epoch"].as_u64().unwrap() as u32;
        let seq = case["seq"].as_u64().unwrap();

        // Header: 02 || channel id || epoch u32 BE || sender id || seq u64 BE.
        let header = [
            &[2u8][..],
            &channel,
            &epoch.to_be_bytes(),
            &sender,
            &seq.to_be_bytes(),
        ]
        .concat();
        assert_eq!(header.len(), 45);
        assert_eq!(hx(&case["header"]), header, "{label}");

        // Padding: plaintext || 0x80 || zeros, to the Padme length (at least 32).
        let plaintext = hx(&case["plaintext"]);
        let padded = hx(&case["padded"]);
        let padded_len = case["padded_len"].as_u64().unwrap() as usize;
        assert_eq!(padded.len(), padded_len, "{label}");
        assert_eq!(padded_len, padme(plaintext.len()), "{label}");
        assert_eq!(&padded[..plaintext.len()], &plaintext[..], "{label}");
        assert_eq!(padded[plaintext.len()], 0x80, "{label}");
        assert!(padded[plaintext.len() + 1..].iter().all(|&b| b == 0));

        // This build reads the same header and strips the same padding.
        let decoded = EnvelopeHeader::decode(&[&header[..], &[0; 64]].concat()).unwrap();
        assert_eq!(decoded.encode().to_vec(), header);
        assert_eq!(envelope::unpad(&padded).unwrap(), plaintext, "{label}");
    }
}

/// Padme (Nikitin et al. 2019) over `len + 1` (the marker), at least 32 bytes,
/// written out from the paper rather than taken from the crate.
fn padme(len: usize) -> usize {
    let l = (len + 1) as u64;
    if l <= 32 {
        return 32;
    }
    let e = 63 - l.leading_zeros() as u64; // floor(log2 l)
    let s = 64 - e.leading_zeros() as u64; // floor(log2 e) + 1
    let mask = (1u64 << (e - s)) - 1;
    ((l + mask) & !mask) as usize
}
