//! The published test vectors: a full pairing transcript, envelopes, and a
//! rekey, each computed from fixed "random" values so that an implementation in
//! another language can reproduce every byte.
//!
//! Every random value is `SHA-512("khub/v1/vectors/" || name)` cut to the length
//! drawn, and is listed in the file under that name. The files live in
//! `tests/data/`; `cargo test` regenerates them and compares byte for byte, and
//! `khub vectors --out DIR` writes them.

use std::collections::VecDeque;
use std::convert::Infallible;

use serde_json::{Value, json};
use sha2::{Digest, Sha512};

use crate::channel::{Keyring, Member};
use crate::crypto::cpace::{self, KeyConfirmation};
use crate::crypto::envelope::{self, ChannelKey, EnvelopeHeader};
use crate::crypto::kdf::{AD_INVITER, AD_JOINER};
use crate::crypto::pairwise::DeviceSecret;
use crate::crypto::rekey::Rekey;
use crate::ids::{ChannelId, DeviceId};
use crate::pairing::keys::channel_identifier;
use crate::pairing::{Code, DeviceInfo, Inviter, Joiner, Nameplate, SessionKeys};

/// File names of the published vectors, in `tests/data/`.
pub const FILES: [&str; 3] = [
    "khub-pairing-v1.json",
    "khub-envelope-v1.json",
    "khub-rekey-v1.json",
];

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

/// Generates the three vector files: `(file name, pretty JSON with a final newline)`.
pub fn generate() -> Vec<(&'static str, String)> {
    [pairing(), envelopes(), rekey()]
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

fn member(name: &str, label: &str) -> (Member, DeviceSecret) {
    let secret = DeviceSecret::from_bytes(fixed(&format!("{label} x25519 secret")));
    let member = Member {
        id: DeviceId::from_bytes(fixed(&format!("{label} device id"))),
        public_key: secret.public_key(),
        name: name.to_owned(),
    };
    (member, secret)
}

fn member_json(m: &Member) -> Value {
    json!({ "device_id": h(m.id.as_bytes()), "public_key": h(m.public_key.0), "name": m.name })
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

    let (inviter, _) = member("laptop", "inviter");
    let (joiner, _) = member("phone", "joiner");
    let info = DeviceInfo::new(joiner.clone(), &token);
    let channel = ChannelId::from_bytes(fixed("channel id"));
    let welcome = crate::channel::Welcome {
        channel,
        epoch: 0,
        key: ChannelKey::from_bytes(fixed("channel key epoch 0")),
        inviter: inviter.id,
        members: vec![inviter.clone(), joiner.clone()],
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
        "description": "khub pairing v1: CPace-ristretto255-SHA512 (draft-irtf-cfrg-cpace-21) with key confirmation, then sealed device info and channel welcome. All byte strings are hex. Random values: SHA-512(\"khub/v1/vectors/\" || name), truncated.",
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
            "joiner": member_json(&joiner),
            "joiner_relay_token": h(token),
            "welcome": {
                "channel_id": h(channel.as_bytes()),
                "epoch": 0,
                "channel_key": h(welcome.key.expose()),
                "inviter": h(inviter.id.as_bytes()),
                "members": [member_json(&inviter), member_json(&joiner)],
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
            "welcome_plaintext": h(welcome.encode().as_slice()),
            "message_start": h(&start),
            "message_response": h(&response),
            "message_finish": h(&finish),
        },
    })
}

fn envelopes() -> Value {
    let channel = ChannelId::from_bytes(fixed("channel id"));
    let key = ChannelKey::from_bytes(fixed("channel key epoch 0"));
    let sender = DeviceId::from_bytes(fixed("inviter device id"));
    let texts: [(&str, Vec<u8>); 5] = [
        ("empty", Vec::new()),
        ("hello", b"hello".to_vec()),
        ("31 bytes", vec![b'a'; 31]),
        (
            "note",
            "A note with UTF-8: \u{00e9}t\u{00e9} \u{2603}"
                .as_bytes()
                .to_vec(),
        ),
        ("200 bytes", (0..200u8).collect()),
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
            let nonce: [u8; 24] = fixed(&format!("envelope nonce {seq}"));
            let sender_key = key.sender_key(&channel, epoch, &sender);
            let sealed = envelope::seal(
                &sender_key,
                &header,
                plaintext,
                &mut ScriptedRng::new([nonce.to_vec()]),
            )
            .expect("small plaintext");
            assert_eq!(
                envelope::open(&sender_key, &sealed).as_deref(),
                Ok(&plaintext[..])
            );
            json!({
                "label": label,
                "epoch": epoch,
                "seq": seq,
                "plaintext": h(plaintext),
                "padded_len": envelope::padded_len(plaintext.len()),
                "sender_key": h(sender_key.expose()),
                "nonce": h(nonce),
                "header": h(header.encode()),
                "envelope": h(&sealed),
            })
        })
        .collect();
    json!({
        "description": "khub envelope v1: XChaCha20-Poly1305 under HKDF-SHA256(salt = channel id, IKM = channel key, info = \"khub/v1/envelope/sender-key\" || epoch u32 BE || sender id); AAD = the 45-byte header; plaintext || 0x80 || zeros up to padded_len. The same channel key is used for every epoch here only to keep the file short.",
        "channel_id": h(channel.as_bytes()),
        "channel_key": h(key.expose()),
        "sender": h(sender.as_bytes()),
        "cases": cases,
    })
}

fn rekey() -> Value {
    let channel = ChannelId::from_bytes(fixed("channel id"));
    let (a, a_secret) = member("laptop", "inviter");
    let (b, b_secret) = member("phone", "joiner");
    let (c, _) = member("tablet", "third");
    let old_key: [u8; 32] = fixed("channel key epoch 0");
    let welcome = crate::channel::Welcome {
        channel,
        epoch: 0,
        key: ChannelKey::from_bytes(old_key),
        inviter: a.id,
        members: vec![a.clone(), b.clone(), c.clone()],
    };
    let mut keyring = Keyring::from_welcome(welcome, a.id, a_secret).expect("a is a member");
    let new_key: [u8; 32] = fixed("channel key epoch 1");
    let nonce: [u8; 24] = fixed("rekey nonce for joiner");
    let message = keyring
        .rekey_removing(
            &[c.id],
            &mut ScriptedRng::new([new_key.to_vec(), nonce.to_vec()]),
        )
        .expect("rekeys");
    let opened = message
        .open(&b.id, &b_secret, &a.public_key)
        .expect("b can open");
    assert_eq!(opened.expose(), &new_key);
    let pairwise = b_secret
        .pairwise_key(&channel, &b.id, &a.id, &a.public_key)
        .expect("valid keys");
    assert_eq!(Rekey::decode(&message.encode()).as_ref(), Ok(&message));
    json!({
        "description": "khub rekey v1: A removes C; the epoch-1 channel key is sealed to B under the pairwise key HKDF-SHA256(salt = channel id, IKM = X25519(a, B), info = \"khub/v1/pairwise\" || low id || high id || low public key || high public key).",
        "channel_id": h(channel.as_bytes()),
        "members": {
            "a": member_json(&a),
            "b": member_json(&b),
            "c": member_json(&c),
        },
        "a_x25519_secret": h(keyring.device_secret().expose()),
        "b_x25519_secret": h(b_secret.expose()),
        "pairwise_key_a_b": h(pairwise.expose()),
        "new_epoch": 1,
        "new_channel_key": h(new_key),
        "entry_nonce_b": h(nonce),
        "rekey_message": h(message.encode()),
    })
}
