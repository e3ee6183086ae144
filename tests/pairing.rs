//! The pairing protocol end to end, as pure state machines: success, wrong
//! codes, hostile input, and a malicious relay in the middle.

mod common;

use common::{Device, add, new_channel, new_code, pair, sid, stand_in_welcome};
use khub::channel::{ChannelError, Event};
use khub::crypto::cpace::{self, CpaceError, KeyConfirmation};
use khub::crypto::kdf::{AD_INVITER, AD_JOINER};
use khub::crypto::os_rng;
use khub::pairing::DeviceInfo;
use khub::pairing::keys::channel_identifier;
use khub::pairing::message::MAX_MESSAGE_LEN;
use khub::pairing::{
    AbortReason, Code, Inviter, InviterSession, Joiner, JoinerSession, JoinerStep, Message,
    PairingError,
};
use sha2::{Digest, Sha256};

#[test]
fn pairing_gives_both_sides_the_same_keys_sas_and_each_others_info() {
    let (laptop, phone) = (Device::new("laptop"), Device::new("phone"));
    let mut channel = new_channel(&laptop);
    let code = new_code(42);
    let (paired, joined) = pair(&mut channel, &code, &phone, &code);
    let (paired, joined) = (paired.unwrap(), joined.unwrap());

    assert_eq!(paired.keys, joined.keys, "a2b, b2a and SAS agree");
    assert_ne!(
        paired.keys.a2b, paired.keys.b2a,
        "the two directions use different keys"
    );
    let sas = paired.keys.sas.to_string();
    assert!(
        sas.len() == 7 && sas.as_bytes()[3] == b' ' && sas.replace(' ', "").parse::<u32>().is_ok(),
        "{sas}"
    );

    // The inviter learns the joiner's id, KeyPackage and token hash (not the token).
    assert_eq!(paired.joiner, phone.info());
    assert_eq!(
        paired.joiner.token_hash,
        <[u8; 32]>::from(Sha256::digest(phone.token))
    );
    assert!(
        !paired
            .joiner
            .key_package
            .windows(phone.token.len())
            .any(|w| w == phone.token),
        "the token itself never travels"
    );
    // The inviter's channel now has both devices.
    let mut names: Vec<String> = channel.members().into_iter().map(|m| m.name).collect();
    names.sort();
    assert_eq!(names, ["laptop", "phone"]);

    // The joiner learns the channel and joins it from the MLS Welcome.
    assert_eq!(joined.welcome.channel, channel.channel());
    let mut phone_channel = phone.join(&joined);
    assert_eq!(phone_channel.channel(), channel.channel());
    assert_eq!(phone_channel.me(), phone.id);
    assert_eq!(phone_channel.epoch(), channel.epoch());
    let laptop_member = phone_channel
        .member(laptop.id)
        .expect("the laptop is a member");
    assert_eq!(laptop_member.name, "laptop");
    assert_eq!(phone_channel.members().len(), 2);

    // And the two can now talk, both ways.
    let sealed = phone_channel.seal(b"first note from the phone").unwrap();
    match channel.take_in(&sealed.envelope, 0).event {
        Some(Event::App { sender, plaintext }) => {
            assert_eq!((sender.id, sender.name.as_str()), (phone.id, "phone"));
            assert_eq!(plaintext, b"first note from the phone");
        }
        other => panic!("not a message: {other:?}"),
    }
    let sealed = channel.seal(b"welcome, phone").unwrap();
    assert!(matches!(
        phone_channel.take_in(&sealed.envelope, 0).event,
        Some(Event::App { plaintext, .. }) if plaintext == b"welcome, phone"
    ));
}

#[test]
fn the_inviter_adds_only_the_device_the_key_package_names() {
    let (laptop, phone, other) = (
        Device::new("laptop"),
        Device::new("phone"),
        Device::new("other"),
    );
    let mut channel = new_channel(&laptop);
    // Device info claiming one id while carrying another device's KeyPackage.
    let mismatched = DeviceInfo::new(other.id, &phone.token, phone.info().key_package);
    assert!(matches!(
        channel.commit_add(mismatched.id, &mismatched.key_package),
        Err(ChannelError::Peer {
            what: "KeyPackage",
            ..
        })
    ));
    // A KeyPackage that is not one at all.
    assert!(matches!(
        channel.commit_add(phone.id, &[0x5a; 64]),
        Err(ChannelError::Peer { .. })
    ));
    assert_eq!(channel.members().len(), 1);
    assert_eq!(channel.epoch(), 0, "nothing was committed");

    // The genuine one is added once; adding it again is refused.
    add(&mut channel, &phone.info());
    assert_eq!(channel.members().len(), 2);
    assert!(matches!(
        channel.commit_add(phone.id, &phone.info().key_package),
        Err(ChannelError::Invalid(_))
    ));
}

#[test]
fn a_wrong_secret_fails_on_both_sides_and_releases_nothing() {
    let (laptop, phone) = (Device::new("laptop"), Device::new("phone"));
    let mut channel = new_channel(&laptop);
    let code = Code::parse("42-7QK3-M9TZ").unwrap();
    // One mistyped symbol that normalisation cannot fix.
    let typo = Code::parse("42-7QK3-M9TX").unwrap();
    let (paired, joined) = pair(&mut channel, &code, &phone, &typo);
    assert_eq!(paired.unwrap_err(), PairingError::ConfirmationFailed);
    let joined_err = joined.unwrap_err();
    assert_eq!(joined_err, PairingError::ConfirmationFailed);
    assert!(joined_err.is_wrong_code_or_attack());
    assert!(
        joined_err
            .to_string()
            .contains("the code was wrong, or someone interfered")
    );
    assert_eq!(channel.members().len(), 1, "nobody was admitted");
    assert_eq!(channel.epoch(), 0, "nothing was committed");
}

#[test]
fn a_wrong_nameplate_or_session_id_also_fails_confirmation() {
    let phone = Device::new("phone");
    let code = Code::parse("42-7QK3-M9TZ").unwrap();
    let other_nameplate = Code::parse("43-7QK3-M9TZ").unwrap();
    let mut rng = os_rng();

    let s = sid();
    let (a, start) = Inviter::start(&code, s, &mut rng);
    let (_, response) =
        Joiner::respond(&other_nameplate, s, &start, &phone.info(), &mut rng).unwrap();
    assert_eq!(
        a.receive(&response).err(),
        Some(PairingError::ConfirmationFailed)
    );

    let (a, start) = Inviter::start(&code, sid(), &mut rng);
    let (_, response) = Joiner::respond(&code, sid(), &start, &phone.info(), &mut rng).unwrap();
    assert_eq!(
        a.receive(&response).err(),
        Some(PairingError::ConfirmationFailed)
    );
}

#[test]
fn the_joiner_rejects_a_finish_whose_tag_is_wrong() {
    let phone = Device::new("phone");
    let laptop = Device::new("laptop");
    let channel = new_channel(&laptop);
    let code = new_code(5);
    let mut rng = os_rng();
    let s = sid();
    let (a, start) = Inviter::start(&code, s, &mut rng);
    let (b, response) = Joiner::respond(&code, s, &start, &phone.info(), &mut rng).unwrap();
    let (finish, _) = a
        .receive(&response)
        .unwrap()
        .finish(&stand_in_welcome(&channel), &mut rng);
    let mut forged = finish.clone();
    forged[1] ^= 1; // first byte of Ta
    assert_eq!(
        b.receive(&forged).err(),
        Some(PairingError::ConfirmationFailed)
    );
}

/// Every prefix, a too-long message, random garbage and wrong types: each is an
/// error, none panics, and the inviter never gets past awaiting the response.
#[test]
fn the_inviter_rejects_truncated_oversized_out_of_order_and_garbage_messages() {
    let phone = Device::new("phone");
    let code = new_code(9);
    let mut rng = os_rng();
    let s = sid();
    let (_, start) = Inviter::start(&code, s, &mut rng);
    let (_, response) = Joiner::respond(&code, s, &start, &phone.info(), &mut rng).unwrap();

    let fresh = |rng: &mut _| Inviter::start(&code, s, rng).0;
    for len in 0..response.len() {
        assert!(
            fresh(&mut rng).receive(&response[..len]).is_err(),
            "prefix of {len} bytes"
        );
    }
    let mut oversized = response.clone();
    oversized.resize(MAX_MESSAGE_LEN + 1, 0);
    assert!(matches!(
        fresh(&mut rng).receive(&oversized),
        Err(PairingError::Malformed(_))
    ));

    for wrong in [
        start.clone(),
        Message::Finish {
            ta: &[0; 64],
            sealed: &[0; 64],
        }
        .encode(),
    ] {
        assert!(matches!(
            fresh(&mut rng).receive(&wrong),
            Err(PairingError::UnexpectedMessage {
                expected: "Response",
                ..
            })
        ));
    }
    for seed in 0..300u32 {
        let len = (seed as usize * 7) % 400;
        let garbage: Vec<u8> = (0..len)
            .map(|i| (i as u32).wrapping_mul(seed).wrapping_add(seed) as u8)
            .collect();
        assert!(fresh(&mut rng).receive(&garbage).is_err(), "garbage {seed}");
    }
    // An Abort from the joiner ends the pairing with its reason.
    let abort = Message::Abort(AbortReason::Cancelled).encode();
    assert_eq!(
        fresh(&mut rng).receive(&abort).err(),
        Some(PairingError::PeerAborted(AbortReason::Cancelled))
    );
}

#[test]
fn invalid_points_are_rejected_by_both_sides() {
    let phone = Device::new("phone");
    let code = new_code(11);
    let mut rng = os_rng();
    let s = sid();
    let undecodable =
        hex::decode("2b3c6b8c4f3800e7aef6864025b4ed79bd599117e427c41bd47d93d654b4a51c").unwrap();
    for (point, error) in [
        (undecodable, CpaceError::InvalidPoint),
        (vec![0u8; 32], CpaceError::IdentityPoint),
    ] {
        let point: [u8; 32] = point.try_into().unwrap();
        // At the joiner, as Ya.
        let start = Message::Start { ya: &point }.encode();
        assert_eq!(
            Joiner::respond(&code, s, &start, &phone.info(), &mut rng).err(),
            Some(PairingError::InvalidShare(error))
        );
        // At the inviter, as Yb.
        let (a, _) = Inviter::start(&code, s, &mut rng);
        let response = Message::Response {
            yb: &point,
            tb: &[0; 64],
            sealed: &[0; 64],
        }
        .encode();
        assert_eq!(
            a.receive(&response).err(),
            Some(PairingError::InvalidShare(error))
        );
    }
    // The inviter's own share reflected back is refused too.
    let (a, start) = Inviter::start(&code, s, &mut rng);
    let Ok(Message::Start { ya }) = Message::decode(&start) else {
        panic!("start")
    };
    let reflected = Message::Response {
        yb: ya,
        tb: &[0; 64],
        sealed: &[0; 64],
    }
    .encode();
    assert!(matches!(
        a.receive(&reflected),
        Err(PairingError::InvalidShare(_))
    ));
}

#[test]
fn the_joiner_rejects_truncated_oversized_and_out_of_order_starts() {
    let phone = Device::new("phone");
    let code = new_code(12);
    let mut rng = os_rng();
    let s = sid();
    let (_, start) = Inviter::start(&code, s, &mut rng);
    for len in 0..start.len() {
        assert!(Joiner::respond(&code, s, &start[..len], &phone.info(), &mut rng).is_err());
    }
    let mut long = start.clone();
    long.push(0);
    assert!(matches!(
        Joiner::respond(&code, s, &long, &phone.info(), &mut rng),
        Err(PairingError::Malformed(_))
    ));
    let oversized = vec![1u8; MAX_MESSAGE_LEN + 1];
    assert!(Joiner::respond(&code, s, &oversized, &phone.info(), &mut rng).is_err());
    let finish = Message::Finish {
        ta: &[0; 64],
        sealed: &[0; 64],
    }
    .encode();
    assert!(matches!(
        Joiner::respond(&code, s, &finish, &phone.info(), &mut rng),
        Err(PairingError::UnexpectedMessage {
            expected: "Start",
            got: "Finish"
        })
    ));
}

#[test]
fn sessions_refuse_duplicated_messages_and_stay_ended() {
    let (laptop, phone) = (Device::new("laptop"), Device::new("phone"));
    let mut channel = new_channel(&laptop);
    let code = new_code(3);
    let mut rng = os_rng();
    let s = sid();

    let (mut inviter, start) = InviterSession::start(&code, s, &mut rng);
    let mut joiner = JoinerSession::new(Code::parse(&code.display()).unwrap(), s, phone.info());
    let JoinerStep::Respond(response) = joiner.receive(&start, &mut rng).unwrap() else {
        panic!("respond")
    };
    // A duplicated Start reaching the joiner ends its session.
    let mut joiner_dup = JoinerSession::new(Code::parse(&code.display()).unwrap(), s, phone.info());
    joiner_dup.receive(&start, &mut rng).unwrap();
    assert!(matches!(
        joiner_dup.receive(&start, &mut rng),
        Err(PairingError::UnexpectedMessage {
            expected: "Finish",
            got: "Start"
        })
    ));
    assert_eq!(
        joiner_dup.receive(&start, &mut rng).err(),
        Some(PairingError::Ended)
    );

    let info = inviter.receive(&response).unwrap().clone();
    assert_eq!(info, phone.info());
    // The same Response again: refused, and the inviter's pairing is over.
    assert!(matches!(
        inviter.receive(&response),
        Err(PairingError::UnexpectedMessage { .. })
    ));
    assert_eq!(
        inviter.finish(&stand_in_welcome(&channel), &mut rng).err(),
        Some(PairingError::Ended)
    );

    // A fresh run completes, and a duplicated Finish after it is refused.
    let (mut inviter, start) = InviterSession::start(&code, s, &mut rng);
    let mut joiner = JoinerSession::new(Code::parse(&code.display()).unwrap(), s, phone.info());
    let JoinerStep::Respond(response) = joiner.receive(&start, &mut rng).unwrap() else {
        panic!("respond")
    };
    let info = inviter.receive(&response).unwrap().clone();
    let (_, welcome) = add(&mut channel, &info);
    let (finish, _) = inviter.finish(&welcome, &mut rng).unwrap();
    match joiner.receive(&finish, &mut rng) {
        Ok(JoinerStep::Joined(joined)) => {
            let phone_channel = phone.join(&joined);
            assert_eq!(phone_channel.epoch(), channel.epoch());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        joiner.receive(&finish, &mut rng).err(),
        Some(PairingError::Ended)
    );
    assert!(matches!(
        inviter.receive(&response),
        Err(PairingError::Ended)
    ));
}

/// The view a malicious relay keeps of its run against the joiner.
struct AttackerView {
    sid: [u8; 16],
    guess: Code,
    ya_scalar: curve25519_dalek::Scalar,
    ya: [u8; 32],
    yb: [u8; 32],
    tb: [u8; 64],
}

/// The offline test an attacker holding `view` can run for a candidate secret.
/// Checking a candidate means recomputing `Tb`, which needs `K = yb * Ya`. The
/// attacker knows its own scalar, not the joiner's, so the only value of that
/// shape within reach is `ya * Yb` — the same for every candidate. Making the
/// candidate matter would need `ya` relative to the candidate's generator, a
/// discrete logarithm.
fn attacker_checks(view: &AttackerView, candidate: &Code) -> bool {
    let _ = candidate;
    let Ok(k) = cpace::scalar_mult_vfy(&view.ya_scalar, &view.yb) else {
        return false;
    };
    let transcript = cpace::transcript_ir(&view.ya, AD_INVITER, &view.yb, AD_JOINER);
    let isk = cpace::derive_isk(&view.sid, &k, &transcript);
    KeyConfirmation::new(&view.sid, &isk).verify(&view.yb, AD_JOINER, &view.tb)
}

#[test]
fn a_malicious_relay_gets_one_online_guess_per_side_of_a_pairing_and_nothing_offline() {
    let (laptop, phone) = (Device::new("laptop"), Device::new("phone"));
    let channel = new_channel(&laptop);
    let code = Code::parse("42-7QK3-M9TZ").unwrap();
    let mut rng = os_rng();
    let s = sid();

    // A dictionary of guesses; the true secret is somewhere in it.
    let guesses: Vec<Code> = (0..40)
        .map(|i| {
            if i == 17 {
                Code::parse("42-7QK3-M9TZ").unwrap()
            } else {
                new_code(42)
            }
        })
        .collect();

    for (i, guess) in guesses.iter().enumerate() {
        let right = guess.secret() == code.secret();
        // The relay runs CPace as the joiner against the real inviter…
        let (inviter, start) = Inviter::start(&code, s, &mut rng);
        let fake_phone = Device::new("not the phone");
        let (_, forged_response) =
            Joiner::respond(guess, s, &start, &fake_phone.info(), &mut rng).unwrap();
        let inviter_result = inviter.receive(&forged_response);
        // …and as the inviter against the real joiner.
        let (relay_as_inviter, relay_start) = Inviter::start(guess, s, &mut rng);
        let (joiner, response) =
            Joiner::respond(&code, s, &relay_start, &phone.info(), &mut rng).unwrap();
        let relay_confirmed = relay_as_inviter.receive(&response);

        assert_eq!(
            inviter_result.is_ok(),
            right,
            "guess {i}: inviter accepts only the right code"
        );
        assert_eq!(
            relay_confirmed.is_ok(),
            right,
            "guess {i}: relay confirms only with the right code"
        );
        if right {
            // The one lucky guess wins both sides — the 2^-40 chance the design accepts.
            let (finish, _) = relay_confirmed
                .unwrap()
                .finish(&stand_in_welcome(&channel), &mut rng);
            assert!(joiner.receive(&finish).is_ok());
        } else {
            assert_eq!(inviter_result.err(), Some(PairingError::ConfirmationFailed));
            assert_eq!(
                relay_confirmed.err(),
                Some(PairingError::ConfirmationFailed)
            );
            // The relay cannot make a Finish the joiner accepts; the joiner fails visibly.
            let fake_finish = Message::Finish {
                ta: &[7; 64],
                sealed: &[7; 64],
            }
            .encode();
            assert_eq!(
                joiner.receive(&fake_finish).err(),
                Some(PairingError::ConfirmationFailed)
            );
        }
    }
}

#[test]
fn a_failed_run_gives_the_relay_no_offline_test_of_further_guesses() {
    let phone = Device::new("phone");
    let code = Code::parse("42-7QK3-M9TZ").unwrap();
    let mut rng = os_rng();
    let s = sid();

    // The relay plays the inviter with a wrong guess, using its own scalar.
    let guess = Code::parse("42-AAAA-AAAA").unwrap();
    let ya_scalar = cpace::sample_scalar(&mut rng);
    let generator =
        cpace::calculate_generator(guess.secret().expose(), &channel_identifier(&guess), &s);
    let ya = cpace::scalar_mult(&ya_scalar, &generator);
    let start = Message::Start { ya: &ya }.encode();
    let (joiner, response) = Joiner::respond(&code, s, &start, &phone.info(), &mut rng).unwrap();
    let Ok(Message::Response { yb, tb, sealed }) = Message::decode(&response) else {
        panic!("response")
    };
    let view = AttackerView {
        sid: s,
        guess,
        ya_scalar,
        ya,
        yb: *yb,
        tb: *tb,
    };

    // Offline, the relay tries a dictionary that contains the true secret: no
    // candidate checks out, the true one included, because what it can compute
    // is the same for every candidate.
    let mut dictionary: Vec<Code> = (0..200).map(|_| new_code(42)).collect();
    dictionary.push(Code::parse("42-7QK3-M9TZ").unwrap());
    dictionary.push(Code::parse(&view.guess.display()).unwrap());
    for candidate in &dictionary {
        assert!(
            !attacker_checks(&view, candidate),
            "an offline check succeeded"
        );
    }
    // Nor does the sealed device info open under any key the relay can derive.
    let k = cpace::scalar_mult_vfy(&ya_scalar, yb).unwrap();
    let isk = cpace::derive_isk(
        &s,
        &k,
        &cpace::transcript_ir(&ya, AD_INVITER, yb, AD_JOINER),
    );
    let keys = khub::pairing::SessionKeys::derive(&s, &isk);
    let aad = [khub::crypto::kdf::LABEL_DEVICE_INFO, &s].concat();
    assert!(khub::crypto::aead::open(keys.b2a.expose(), &aad, sealed).is_err());

    // The joiner is burned: trying another guess needs a new pairing, which the
    // person sees (a new code, a new sid, a new Start).
    let finish = Message::Finish {
        ta: &[0; 64],
        sealed: &[0; 64],
    }
    .encode();
    assert_eq!(
        joiner.receive(&finish).err(),
        Some(PairingError::ConfirmationFailed)
    );
}
