//! Device removal: pairwise keys, rekey messages, what a removed device can no
//! longer do, and concurrent rekeys converging.

mod common;

use common::{Device, channel_of};
use khub::channel::{Keyring, KeyringError, RekeyOutcome, Welcome};
use khub::crypto::envelope::OpenError;
use khub::crypto::os_rng;
use khub::crypto::pairwise::{DevicePublicKey, PairwiseError};
use khub::crypto::rekey::{Rekey, RekeyError};
use khub::ids::ChannelId;

#[test]
fn pairwise_keys_agree_between_the_two_and_differ_for_anyone_else() {
    let (a, b, c) = (Device::new("a"), Device::new("b"), Device::new("c"));
    let channel = ChannelId::random(&mut os_rng());
    let ab = a
        .secret
        .pairwise_key(&channel, &a.id(), &b.id(), &b.member.public_key)
        .unwrap();
    let ba = b
        .secret
        .pairwise_key(&channel, &b.id(), &a.id(), &a.member.public_key)
        .unwrap();
    assert_eq!(ab, ba);
    let ac = a
        .secret
        .pairwise_key(&channel, &a.id(), &c.id(), &c.member.public_key)
        .unwrap();
    let cb = c
        .secret
        .pairwise_key(&channel, &c.id(), &b.id(), &b.member.public_key)
        .unwrap();
    assert_ne!(ab, ac);
    assert_ne!(ab, cb);
    // Bound to the channel too.
    let other = ChannelId::random(&mut os_rng());
    assert_ne!(
        ab,
        a.secret
            .pairwise_key(&other, &a.id(), &b.id(), &b.member.public_key)
            .unwrap()
    );
    // Low-order keys and self-pairing are refused.
    assert_eq!(
        a.secret
            .pairwise_key(&channel, &a.id(), &b.id(), &DevicePublicKey([0; 32]))
            .unwrap_err(),
        PairwiseError::WeakPublicKey(b.id())
    );
    assert_eq!(
        a.secret
            .pairwise_key(&channel, &a.id(), &a.id(), &a.member.public_key)
            .unwrap_err(),
        PairwiseError::SameDevice
    );
}

fn three() -> (Device, Device, Device, Vec<Keyring>) {
    let (a, b, c) = (
        Device::new("laptop"),
        Device::new("phone"),
        Device::new("tablet"),
    );
    let rings = channel_of(&[&a, &b, &c]);
    (a, b, c, rings)
}

#[test]
fn a_removed_device_cannot_open_anything_of_the_new_epoch() {
    let (_a, b, c, mut rings) = three();
    let mut rng = os_rng();
    let rekey = rings[0].rekey_removing(&[c.id()], &mut rng).unwrap();
    let wire = rekey.encode();
    let rekey = Rekey::decode(&wire).unwrap();
    assert_eq!(rekey.members.len(), 2);

    assert_eq!(
        rings[1].apply_rekey(&rekey),
        Ok(RekeyOutcome::Adopted { epoch: 1 })
    );
    assert_eq!(rings[0].current_key(), rings[1].current_key());
    assert_ne!(rings[2].current_key(), rings[1].current_key());
    assert_eq!(
        rings[2].apply_rekey(&rekey),
        Err(KeyringError::Rekey(RekeyError::Removed(1)))
    );
    assert_eq!(rings[2].epoch(), 0, "a refused rekey changes nothing");

    // Messages of the new epoch: the remaining members read them, the removed device does not.
    let note = rings[0].seal(b"after removal", &mut rng).unwrap();
    assert_eq!(rings[1].open(&note).unwrap().plaintext, b"after removal");
    assert_eq!(rings[2].open(&note), Err(OpenError::UnknownEpoch(1)));

    // Nor can it pry the key out of the rekey with any key it holds: the entry
    // for b is sealed under the a–b pairwise key.
    let a_public = rings[0]
        .members()
        .find(|m| m.id == rings[0].me())
        .unwrap()
        .public_key;
    assert_eq!(
        rekey.open(&b.id(), &c.secret, &a_public).err(),
        Some(RekeyError::Unauthentic)
    );

    // Epoch 0 stays readable, so its history syncs; that the removed device can
    // still seal epoch-0 envelopes is the documented limit of group
    // authentication (SECURITY.md) — the relay refuses its revoked token.
    let old = rings[2].seal(b"from the removed device", &mut rng).unwrap();
    assert!(
        rings[1].open(&old).is_ok(),
        "epoch 0 history remains readable"
    );
}

/// Fresh keyrings for `devices`, all at epoch 0 of the same channel (built from
/// one encoded welcome), so a test can apply one message to many clean states.
fn fresh_rings(welcome: &[u8], devices: &[&Device]) -> Vec<Keyring> {
    devices
        .iter()
        .map(|d| {
            Keyring::from_welcome(Welcome::decode(welcome).unwrap(), d.id(), d.secret_copy())
                .unwrap()
        })
        .collect()
}

#[test]
fn tampered_or_foreign_rekeys_are_refused() {
    let (a, b, c, rings) = three();
    let welcome = rings[0].welcome().encode();
    let mut rng = os_rng();

    let outsider = Device::new("outsider");
    let foreign = common::new_channel(&outsider)
        .rekey_removing(&[], &mut rng)
        .unwrap();
    let mut fresh = fresh_rings(&welcome, &[&b]);
    assert_eq!(
        fresh[0].apply_rekey(&foreign),
        Err(KeyringError::WrongChannel)
    );

    let rekey = fresh_rings(&welcome, &[&a])[0]
        .rekey_removing(&[], &mut rng)
        .unwrap();
    let wire = rekey.encode();
    let head_len = 1 + 16 + 4 + 16 + 2 + 3 * 16 + 2;
    for i in 0..wire.len() {
        let mut bad = wire.clone();
        bad[i] ^= 0x40;
        let Ok(parsed) = Rekey::decode(&bad) else {
            continue;
        };
        let mut rings = fresh_rings(&welcome, &[&b, &c]);
        let accepted: Vec<bool> = rings
            .iter_mut()
            .map(|r| r.apply_rekey(&parsed).is_ok())
            .collect();
        if i < head_len {
            assert_eq!(accepted, [false, false], "head byte {i} was accepted");
        } else {
            // Each member can check only its own entry; nobody accepts a damaged one.
            assert!(
                accepted.contains(&false),
                "entry byte {i} was accepted by every member"
            );
        }
    }
    let mut rings = fresh_rings(&welcome, &[&b, &c]);
    for ring in &mut rings {
        assert_eq!(
            ring.apply_rekey(&rekey),
            Ok(RekeyOutcome::Adopted { epoch: 1 })
        );
        assert_eq!(ring.apply_rekey(&rekey), Ok(RekeyOutcome::Duplicate));
    }
    assert_eq!(rings[0].current_key(), rings[1].current_key());

    // Garbage never parses as a rekey, and never panics.
    for len in 0..wire.len() {
        assert!(Rekey::decode(&wire[..len]).is_err());
    }
}

#[test]
fn rekeys_must_come_in_epoch_order() {
    let (a, b, _c, rings) = three();
    let welcome = rings[0].welcome().encode();
    let mut rng = os_rng();
    let mut ra = fresh_rings(&welcome, &[&a]).remove(0);
    let first = ra.rekey_removing(&[], &mut rng).unwrap();
    let second = ra.rekey_removing(&[], &mut rng).unwrap();
    let mut rb = fresh_rings(&welcome, &[&b]).remove(0);
    assert_eq!(
        rb.apply_rekey(&second),
        Err(KeyringError::EpochGap { current: 0, got: 2 })
    );
    assert_eq!(
        rb.apply_rekey(&first),
        Ok(RekeyOutcome::Adopted { epoch: 1 })
    );
    assert_eq!(
        rb.apply_rekey(&second),
        Ok(RekeyOutcome::Adopted { epoch: 2 })
    );
    assert_eq!(
        rb.apply_rekey(&first),
        Err(KeyringError::Stale { current: 2, got: 1 })
    );
    assert_eq!(rb.current_key(), ra.current_key());
    assert_eq!(
        rb.rekey_removing(&[b.id()], &mut rng).unwrap_err(),
        KeyringError::RemovingSelf
    );
}

#[test]
fn two_members_rekeying_at_once_converge_on_one_key_in_any_order() {
    let devices: Vec<Device> = ["a", "b", "c", "d", "e"]
        .iter()
        .map(|n| Device::new(n))
        .collect();
    let [a, b, c, d, e] = [
        &devices[0],
        &devices[1],
        &devices[2],
        &devices[3],
        &devices[4],
    ];
    let rings = channel_of(&[a, b, c, d, e]);
    let welcome = rings[0].welcome().encode();
    let mut rng = os_rng();

    // a removes c while b removes d.
    let mut r = fresh_rings(&welcome, &[a, b, c, d, e, e]);
    let from_a = r[0].rekey_removing(&[c.id()], &mut rng).unwrap();
    let from_b = r[1].rekey_removing(&[d.id()], &mut rng).unwrap();

    assert_eq!(
        r[0].apply_rekey(&from_b),
        Ok(RekeyOutcome::Combined {
            epoch: 1,
            proposals: 2
        })
    );
    assert_eq!(
        r[1].apply_rekey(&from_a),
        Ok(RekeyOutcome::Combined {
            epoch: 1,
            proposals: 2
        })
    );
    // e sees them in one order, its twin in the other.
    assert_eq!(
        r[4].apply_rekey(&from_a),
        Ok(RekeyOutcome::Adopted { epoch: 1 })
    );
    assert_eq!(
        r[4].apply_rekey(&from_b),
        Ok(RekeyOutcome::Combined {
            epoch: 1,
            proposals: 2
        })
    );
    assert_eq!(
        r[5].apply_rekey(&from_b),
        Ok(RekeyOutcome::Adopted { epoch: 1 })
    );
    assert_eq!(
        r[5].apply_rekey(&from_a),
        Ok(RekeyOutcome::Combined {
            epoch: 1,
            proposals: 2
        })
    );
    assert_eq!(r[5].apply_rekey(&from_a), Ok(RekeyOutcome::Duplicate));

    for i in [1, 4, 5] {
        assert_eq!(
            r[0].current_key(),
            r[i].current_key(),
            "member {i} converged"
        );
        let ids: Vec<_> = r[i].members().map(|m| m.id).collect();
        assert!(ids.contains(&a.id()) && ids.contains(&b.id()) && ids.contains(&e.id()));
        assert!(
            !ids.contains(&c.id()) && !ids.contains(&d.id()),
            "both removals hold"
        );
    }
    // Each removed device gets at most one of the two keys, never the combination.
    assert!(matches!(
        r[2].apply_rekey(&from_a),
        Err(KeyringError::Rekey(RekeyError::Removed(1)))
    ));
    assert_eq!(
        r[2].apply_rekey(&from_b),
        Ok(RekeyOutcome::Adopted { epoch: 1 })
    );
    assert_eq!(
        r[3].apply_rekey(&from_a),
        Ok(RekeyOutcome::Adopted { epoch: 1 })
    );
    assert!(matches!(
        r[3].apply_rekey(&from_b),
        Err(KeyringError::Rekey(RekeyError::Removed(1)))
    ));

    let note = r[4].seal(b"after both removals", &mut rng).unwrap();
    for i in [0, 1, 5] {
        assert_eq!(r[i].open(&note).unwrap().plaintext, b"after both removals");
    }
    assert_eq!(r[2].open(&note), Err(OpenError::Decrypt));
    assert_eq!(r[3].open(&note), Err(OpenError::Decrypt));
}

#[test]
fn a_removed_device_cannot_undo_its_removal_with_a_rekey_of_its_own() {
    let (a, b, c, rings) = three();
    let welcome = rings[0].welcome().encode();
    let mut rng = os_rng();
    let mut r = fresh_rings(&welcome, &[&a, &b, &c]);
    let removal = r[0].rekey_removing(&[c.id()], &mut rng).unwrap();
    // c answers with a proposal for the same epoch that keeps everyone.
    let counter = r[2].rekey_removing(&[], &mut rng).unwrap();
    assert_eq!(
        r[1].apply_rekey(&counter),
        Ok(RekeyOutcome::Adopted { epoch: 1 })
    );
    assert_eq!(
        r[1].apply_rekey(&removal),
        Ok(RekeyOutcome::Combined {
            epoch: 1,
            proposals: 2
        })
    );
    assert_eq!(
        r[0].apply_rekey(&counter),
        Ok(RekeyOutcome::Combined {
            epoch: 1,
            proposals: 2
        })
    );
    assert_eq!(r[0].current_key(), r[1].current_key());
    assert!(r[1].members().all(|m| m.id != c.id()));

    let note = r[0].seal(b"c must not read this", &mut rng).unwrap();
    assert_eq!(r[1].open(&note).unwrap().plaintext, b"c must not read this");
    assert_eq!(r[2].open(&note), Err(OpenError::Decrypt));
}

#[test]
fn a_keyring_survives_export_and_import_with_its_replay_state() {
    let (_a, b, c, mut rings) = three();
    let mut rng = os_rng();
    let rekey = rings[0].rekey_removing(&[c.id()], &mut rng).unwrap();
    rings[1].apply_rekey(&rekey).unwrap();
    let note = rings[0].seal(b"before the restart", &mut rng).unwrap();
    assert!(rings[1].open(&note).is_ok());

    let exported = rings[1].export();
    let mut restored = Keyring::import(&exported).unwrap();
    assert_eq!(restored.current_key(), rings[1].current_key());
    assert_eq!(restored.epoch(), 1);
    assert_eq!(restored.me(), b.id());
    assert_eq!(restored.members().count(), 2);
    assert_eq!(restored.next_seq(), rings[1].next_seq());
    assert!(
        matches!(restored.open(&note), Err(OpenError::Replay { .. })),
        "replay state kept"
    );
    let next = rings[0].seal(b"after the restart", &mut rng).unwrap();
    assert_eq!(
        restored.open(&next).unwrap().plaintext,
        b"after the restart"
    );
    // Damaged state is refused, never half-loaded.
    for len in [0, 1, 40, exported.len() - 1] {
        assert!(Keyring::import(&exported[..len]).is_err());
    }
}
