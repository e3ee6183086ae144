//! The published test vectors: a full pairing transcript and the envelope
//! framing (header and padding), each computed from fixed "random" values so
//! that an implementation in another language can reproduce every byte. (The
//! MLS messages inside envelopes and pairing payloads are RFC 9420's; their
//! vectors are the MLS working group's.)
//!
//! Every random value is `SHA-512("khub/v1/vectors/" || name)` cut to the length
//! drawn, and is listed in the file under that name. The files live in
//! `tests/data/`; `cargo test` regenerates them and compares byte for byte, and
//! `khub vectors --out DIR` writes them.

use std::collections::VecDeque;
use std::convert::Infallible;

use serde_json::{Value, json};
use sha2::{Digest, Sha512};

use crate::crypto::cpace::{self, KeyConfirmation};
use crate::crypto::envelope::{self, EnvelopeHeader};
use crate::crypto::kdf::{AD_INVITER, AD_JOINER};
use crate::ids::{ChannelId, DeviceId};
use crate::pairing::keys::channel_identifier;
use crate::pairing::{ChannelWelcome, Code, DeviceInfo, Inviter, Joiner, Nameplate, SessionKeys};

/// File names of the published vectors, in `tests/data/`.
pub const FILES: [&str; 2] = ["khub-pairing-v2.json", "khub-envelope-v2.json"];

/// The fixed value named `name`: `SHA-512("khub/v1/vectors/" || name)`, first `N` bytes.
pub fn fixed<const N: usize>(name: &str) -> [u8; N] {
    let digest = Sha512::new()
        .chain_update(b"khub/v1/vectors/")
        .chain_update(name.as_bytes())
        .finalize();
    digest[..N].try_into().expect("N is at most 64")
}

/// An RNG that returns a script of byte strings, one per draw, and panics if a
/// draw asks for a different length or the script runs out. For vectors and
/// tests only: it is as predictable as it sounds.
#[derive(Debug)]
pub struct ScriptedRng {
    script: VecDeque<Vec<u8>>,
}

impl ScriptedRng {
    /// An RNG that answers the draws with `script`, in order.
    pub fn new(script: impl IntoIterator<Item = Vec<u8>>) -> Self {
        Self {
            script: script.into_iter().collect(),
        }
    }

    /// Whether every scripted value was drawn.
    pub fn is_exhausted(&self) -> bool {
        self.script.is_empty()
    }
}

impl rand::TryRng for ScriptedRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        let mut bytes = [0u8; 4];
        self.try_fill_bytes(&mut bytes)?;
        Ok(u32::from_le_bytes(bytes))
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let mut bytes = [0u8; 8];
        self.try_fill_bytes(&mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        let next = self
            .script
            .pop_front()
            .expect("ScriptedRng: the script ran out");
        assert_eq!(
            next.len(),
            dst.len(),
            "ScriptedRng: a draw of a different length than scripted"
        );
        dst.copy_from_slice(&next);
        Ok(())
    }
}

impl rand::TryCryptoRng for ScriptedRng {}

/// Generates the vector files: `(file name, pretty JSON with a final newline)`.
pub fn generate() -> Vec<(&'static str, String)> {
    [pairing(), envelopes()]
        .into_iter()
        .zip(FILES)
        .map(|(value, name)| {
            let mut text = serde_json::to_string_pretty(&value).expect("JSON values serialise");
            text.push('\n');
            (name, text)
        })
        .collect()
}

fn h(bytes: impl AsRef<[u8]>) -> String {
    hex::encode(bytes)
}

fn pairing() -> Value {
    let secret_symbols = "7QK3M9TZ";
    let code = Code::parse(&format!(
        "42-{}-{}",
        &secret_symbols[..4],
        &secret_symbols[4..]
    ))
    .expect("valid code");
    assert_eq!(code.nameplate(), Nameplate::new(42).expect("valid"));
    let sid: [u8; 16] = fixed("pairing sid");
    let ya_sampled: [u8; 32] = fixed("pairing ya");
    let yb_sampled: [u8; 32] = fixed("pairing yb");
    let nonce_info: [u8; 24] = fixed("pairing device info nonce");
    let nonce_welcome: [u8; 24] = fixed("pairing welcome nonce");
    let token: [u8; 32] = fixed("joiner relay token");

    // The MLS KeyPackage and Welcome are opaque to pairing: fixed stand-ins
    // here, so that every byte is reproducible.
    let joiner = DeviceId::from_bytes(fixed("joiner device id"));
    let key_package: [u8; 64] = fixed("joiner key package");
    let info = DeviceInfo::new(joiner, &token, key_package.to_vec());
    let channel = ChannelId::from_bytes(fixed("channel id"));
    let mls_welcome: [u8; 64] = fixed("mls welcome");
    let welcome = ChannelWelcome {
        channel,
        cursor: 7,
        welcome: mls_welcome.to_vec(),
    };

    // The protocol run, exactly as devices run it.
    let mut rng_a = ScriptedRng::new([ya_sampled.to_vec()]);
    let (awaiting, start) = Inviter::start(&code, sid, &mut rng_a);
    let mut rng_b = ScriptedRng::new([yb_sampled.to_vec(), nonce_info.to_vec()]);
    let (awaiting_finish, response) =
        Joiner::respond(&code, sid, &start, &info, &mut rng_b).expect("pairs");
    let admission = awaiting.receive(&response).expect("confirms");
    let mut rng_a2 = ScriptedRng::new([nonce_welcome.to_vec()]);
    let (finish, paired) = admission.finish(&welcome, &mut rng_a2);
    let joined = awaiting_finish.receive(&finish).expect("confirms");
    assert!(rng_a.is_exhausted() && rng_b.is_exhausted() && rng_a2.is_exhausted());
    assert_eq!(paired.keys, joined.keys);

    // The intermediate values, recomputed from the draft's definitions.
    let ci = channel_identifier(&code);
    let prs = code.secret().expose();
    let generator = cpace::calculate_generator(prs, &ci, &sid);
    let ya = cpace::scalar_from_sampled_bytes(ya_sampled);
    let yb = cpace::scalar_from_sampled_bytes(yb_sampled);
    let ya_share = cpace::scalar_mult(&ya, &generator);
    let yb_share = cpace::scalar_mult(&yb, &generator);
    let k = cpace::scalar_mult_vfy(&ya, &yb_share).expect("valid");
    let transcript = cpace::transcript_ir(&ya_share, AD_INVITER, &yb_share, AD_JOINER);
    let isk = cpace::derive_isk(&sid, &k, &transcript);
    let confirmation = KeyConfirmation::new(&sid, &isk);
    let keys = SessionKeys::derive(&sid, &isk);
    assert_eq!(keys, joined.keys);

    json!({
        "description": "khub pairing, protocol 2: CPace-ristretto255-SHA512 (draft-irtf-cfrg-cpace-21) with key confirmation, then the sealed device info (carrying an MLS KeyPackage) and channel welcome (carrying an MLS Welcome). The KeyPackage and Welcome here are fixed stand-in bytes: pairing treats them as opaque. All byte strings are hex. Random values: SHA-512(\"khub/v1/vectors/\" || name), truncated; each name is given beside its value.",
        "random_names": {
            "sid": "pairing sid",
            "ya_sampled_bytes": "pairing ya",
            "yb_sampled_bytes": "pairing yb",
            "device_info_nonce": "pairing device info nonce",
            "welcome_nonce": "pairing welcome nonce",
            "joiner_relay_token": "joiner relay token",
            "joiner_device_id": "joiner device id",
            "key_package": "joiner key package",
            "mls_welcome": "mls welcome",
            "channel_id": "channel id",
        },
        "inputs": {
            "code": code.display().as_str(),
            "nameplate": 42,
            "PRS": h(prs),
            "CI": h(&ci),
            "sid": h(sid),
            "ADa": h(AD_INVITER),
            "ADb": h(AD_JOINER),
            "ya_sampled_bytes": h(ya_sampled),
            "yb_sampled_bytes": h(yb_sampled),
            "device_info_nonce": h(nonce_info),
            "welcome_nonce": h(nonce_welcome),
            "joiner_device_id": h(joiner.as_bytes()),
            "joiner_relay_token": h(token),
            "key_package": h(key_package),
            "welcome": {
                "channel_id": h(channel.as_bytes()),
                "cursor": 7,
                "mls_welcome": h(mls_welcome),
            },
        },
        "outputs": {
            "generator_string": h(cpace::generator_string(prs, &ci, &sid).as_slice()),
            "g": h(generator.compress().to_bytes()),
            "ya": h(ya.to_bytes()),
            "yb": h(yb.to_bytes()),
            "Ya": h(ya_share),
            "Yb": h(yb_share),
            "K": h(k.as_slice()),
            "transcript_ir": h(&transcript),
            "ISK": h(isk.expose()),
            "mac_key": h(confirmation.mac_key().expose()),
            "Ta": h(confirmation.tag(&ya_share, AD_INVITER)),
            "Tb": h(confirmation.tag(&yb_share, AD_JOINER)),
            "a2b": h(keys.a2b.expose()),
            "b2a": h(keys.b2a.expose()),
            "sas": keys.sas.to_string(),
            "device_info_plaintext": h(info.encode()),
            "welcome_plaintext": h(welcome.encode()),
            "message_start": h(&start),
            "message_response": h(&response),
            "message_finish": h(&finish),
        },
    })
}

fn envelopes() -> Value {
    let channel = ChannelId::from_bytes(fixed("channel id"));
    let sender = DeviceId::from_bytes(fixed("inviter device id"));
    // Application plaintexts: the content type byte (0x00 app, 0x03 joined),
    // then the application's bytes.
    let texts: [(&str, Vec<u8>); 6] = [
        ("joined", vec![0x03]),
        ("empty app message", vec![0x00]),
        ("hello", b"\x00hello".to_vec()),
        (
            "note",
            "\u{0}A note with UTF-8: \u{00e9}t\u{00e9} \u{2603}"
                .as_bytes()
                .to_vec(),
        ),
        (
            "200 bytes",
            [&[0x00][..], &(0..199u8).collect::<Vec<_>>()].concat(),
        ),
        ("5000 bytes", [&[0x00][..], &[0x42; 4999][..]].concat()),
    ];
    let cases: Vec<Value> = texts
        .iter()
        .enumerate()
        .map(|(i, (label, plaintext))| {
            let seq = i as u64 + 1;
            let epoch = if i < 3 { 0 } else { 7 };
            let header = EnvelopeHeader {
                channel,
                epoch,
                sender,
                seq,
            };
            let padded = envelope::pad(plaintext);
            assert_eq!(envelope::unpad(&padded).as_deref(), Some(&plaintext[..]));
            json!({
                "label": label,
                "epoch": epoch,
                "seq": seq,
                "plaintext": h(plaintext),
                "padded_len": envelope::padded_len(plaintext.len()),
                "padded": h(padded.as_slice()),
                "header": h(header.encode()),
            })
        })
        .collect();
    json!({
        "description": "khub envelope framing, protocol 2: the 45-byte header (version 2, channel id, epoch u32 BE, sender id, sender seq u64 BE) that precedes the MLSMessage, and the Padme padding (plaintext || 0x80 || zeros up to padded_len) applied to an application plaintext (its first byte is the content type: 0x00 app, 0x03 joined) before MLS encrypts it. The MLS PrivateMessage's authenticated_data is the header followed by the 16-byte epoch fingerprint (the MLS exporter value for label \"khub/v2/epoch-fingerprint\", empty context).",
        "random_names": {
            "channel_id": "channel id",
            "sender": "inviter device id",
        },
        "channel_id": h(channel.as_bytes()),
        "sender": h(sender.as_bytes()),
        "cases": cases,
    })
}
