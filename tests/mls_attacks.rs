//! Attacks on the channel through raw OpenMLS, with the state a lost (and then
//! removed) member holds: commits that MLS itself accepts but khub must not —
//! a leaf no one can see, a second leaf speaking as another member, a member
//! renaming its own leaf. Each must be refused, change nothing, and leave the
//! attacker nothing to read after its removal.

mod common;

use common::{Three, alice_bob_dave};
use khub::channel::provider::MlsProvider;
use khub::channel::{CIPHERSUITE, Channel, Event, Intent, RefusalKind};
use khub::crypto::envelope::{EnvelopeHeader, HEADER_LEN, pad, unpad};
use khub::ids::DeviceId;
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;

/// The raw OpenMLS group, signer and next sequence number a member's state file holds.
struct Raw {
    provider: MlsProvider,
    group: MlsGroup,
    signer: SignatureKeyPair,
    me: DeviceId,
    next_seq: u64,
}

fn raw(channel: &mut Channel) -> Raw {
    let (meta, _) = channel.save();
    let meta: serde_json::Value = serde_json::from_slice(&meta).unwrap();
    let key: Vec<u8> = serde_json::from_value(meta["signature_key"].clone()).unwrap();
    let next_seq = meta["next_seq"].as_u64().unwrap();
    let provider = MlsProvider::load(channel.rows_for_testing_only());
    let group = MlsGroup::load(
        provider.storage(),
        &GroupId::from_slice(channel.channel().as_bytes()),
    )
    .unwrap()
    .unwrap();
    let signer =
        SignatureKeyPair::read(provider.storage(), &key, CIPHERSUITE.signature_algorithm())
            .unwrap();
    Raw {
        provider,
        group,
        signer,
        me: channel.me(),
        next_seq,
    }
}

fn fingerprint(provider: &MlsProvider, group: &MlsGroup) -> Vec<u8> {
    group
        .export_secret(provider.crypto(), "khub/v2/epoch-fingerprint", &[], 16)
        .unwrap()
}

fn header_and_aad(
    provider: &MlsProvider,
    group: &MlsGroup,
    sender: DeviceId,
    seq: u64,
) -> (EnvelopeHeader, Vec<u8>) {
    let header = EnvelopeHeader {
        channel: khub::ids::ChannelId::from_bytes(group.group_id().as_slice().try_into().unwrap()),
        epoch: group.epoch().as_u64() as u32,
        sender,
        seq,
    };
    let aad = [&header.encode()[..], &fingerprint(provider, group)].concat();
    (header, aad)
}

fn envelope(header: &EnvelopeHeader, message: &MlsMessageOut) -> Vec<u8> {
    [
        &header.encode()[..],
        &message.tls_serialize_detached().unwrap(),
    ]
    .concat()
}

/// A device outside khub's rules: a signature key and a KeyPackage whose
/// credential identity is whatever the attacker wants.
struct Ghost {
    provider: MlsProvider,
    signer: SignatureKeyPair,
    key_package: KeyPackage,
}

fn ghost(identity: Vec<u8>) -> Ghost {
    let provider = MlsProvider::load([]);
    let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).unwrap();
    signer.store(provider.storage()).unwrap();
    let with_key = CredentialWithKey {
        credential: BasicCredential::new(identity).into(),
        signature_key: signer.public().into(),
    };
    let bundle = KeyPackage::builder()
        .build(CIPHERSUITE, &provider, &signer, with_key)
        .unwrap();
    Ghost {
        provider,
        signer,
        key_package: bundle.key_package().clone(),
    }
}

/// The lost member `dave` commits the Add of `ghost` with raw OpenMLS; returns
/// the envelope and the ghost's group (joined from the Welcome).
fn add_ghost(dave: &mut Raw, g: &Ghost) -> (Vec<u8>, MlsGroup) {
    let (header, aad) = header_and_aad(&dave.provider, &dave.group, dave.me, dave.next_seq);
    dave.next_seq += 1;
    dave.group.set_aad(aad);
    let (commit, welcome, _) = dave
        .group
        .add_members(
            &dave.provider,
            &dave.signer,
            std::slice::from_ref(&g.key_package),
        )
        .unwrap();
    let welcome =
        MlsMessageIn::tls_deserialize_exact(welcome.tls_serialize_detached().unwrap()).unwrap();
    let MlsMessageBodyIn::Welcome(welcome) = welcome.extract() else {
        panic!("a Welcome")
    };
    let config = MlsGroupJoinConfig::builder()
        .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(true)
        .build();
    let group = StagedWelcome::new_from_welcome(&g.provider, &config, welcome, None)
        .unwrap()
        .into_group(&g.provider)
        .unwrap();
    (envelope(&header, &commit), group)
}

/// The ghost processes one envelope from the relay's store.
fn ghost_take(g: &Ghost, group: &mut MlsGroup, envelope: &[u8]) -> Option<Vec<u8>> {
    let message = MlsMessageIn::tls_deserialize_exact(&envelope[HEADER_LEN..]).unwrap();
    let MlsMessageBodyIn::PrivateMessage(private) = message.extract() else {
        panic!("private")
    };
    let processed = group
        .process_message(&g.provider, ProtocolMessage::from(private))
        .ok()?;
    match processed.into_content() {
        ProcessedMessageContent::ApplicationMessage(app) => unpad(&app.into_bytes()),
        ProcessedMessageContent::StagedCommitMessage(staged) => {
            group.merge_staged_commit(&g.provider, *staged).unwrap();
            None
        }
        _ => None,
    }
}

fn ids(channel: &Channel) -> Vec<DeviceId> {
    let mut ids: Vec<DeviceId> = channel.members().iter().map(|m| m.id).collect();
    ids.sort();
    ids
}

/// Takes `commit` in on every member, which must refuse it as forged and stay
/// as it was.
fn refused_everywhere(members: &mut [&mut Channel], commit: &[u8], why: &str) {
    for m in members.iter_mut() {
        let (epoch, before) = (m.epoch(), ids(m));
        let taken = m.take_in(commit, 0);
        assert!(taken.event.is_none(), "{taken:?}");
        assert_eq!(taken.refusals.len(), 1, "{taken:?}");
        assert_eq!(taken.refusals[0].kind, RefusalKind::Forged);
        assert!(taken.refusals[0].detail.contains(why), "{taken:?}");
        assert_eq!((m.epoch(), ids(m)), (epoch, before));
    }
}

/// Alice removes Dave; Alice and Bob take the removal in.
fn remove_dave(alice: &mut Channel, bob: &mut Channel, dave: DeviceId) -> Vec<u8> {
    let removal = alice.commit_remove(&[dave]).unwrap();
    assert!(matches!(
        alice.take_in(&removal.envelope, 0).event,
        Some(Event::OwnCommit(Intent::Remove(_)))
    ));
    assert!(matches!(
        bob.take_in(&removal.envelope, 0).event,
        Some(Event::Commit { .. })
    ));
    assert!(!ids(alice).contains(&dave));
    removal.envelope
}

#[test]
fn a_lost_member_cannot_plant_a_leaf_no_one_sees() {
    let Three {
        a: _,
        b: _,
        d,
        mut alice,
        mut bob,
        mut dave,
    } = alice_bob_dave();

    // Dave, still a member, adds a leaf whose identity names no device.
    let mut raw_dave = raw(&mut dave);
    let g = ghost(b"ghost".to_vec());
    let (add, mut ghost_group) = add_ghost(&mut raw_dave, &g);
    refused_everywhere(&mut [&mut alice, &mut bob], &add, "not a khub credential");

    // Removed, Dave's ghost reads nothing sealed afterwards.
    let removal = remove_dave(&mut alice, &mut bob, d.id);
    ghost_take(&g, &mut ghost_group, &removal);
    let secret = bob.seal(b"sealed after dave was removed").unwrap();
    assert_eq!(ghost_take(&g, &mut ghost_group, &secret.envelope), None);
}

#[test]
fn a_lost_member_cannot_add_a_second_leaf_that_speaks_as_another_member() {
    let Three {
        a: _,
        b,
        d,
        mut alice,
        mut bob,
        mut dave,
    } = alice_bob_dave();

    let mut raw_dave = raw(&mut dave);
    let g = ghost([b.id.as_bytes().as_slice(), b"bob"].concat());
    let (add, mut shadow) = add_ghost(&mut raw_dave, &g);
    refused_everywhere(&mut [&mut alice, &mut bob], &add, "second leaf");
    remove_dave(&mut alice, &mut bob, d.id);

    // The shadow seals as Bob at a high sequence number: not taken.
    let (header, aad) = header_and_aad(&g.provider, &shadow, b.id, 1_000_000);
    shadow.set_aad(aad);
    let forged = shadow
        .create_message(&g.provider, &g.signer, &pad(b"\x00forged by dave"))
        .unwrap();
    let taken = alice.take_in(&envelope(&header, &forged), 0);
    assert!(
        taken.event.is_none() && !taken.refusals.is_empty(),
        "{taken:?}"
    );
    // Bob is not locked out.
    let genuine = bob.seal(b"\x00really bob").unwrap();
    match alice.take_in(&genuine.envelope, 0).event {
        Some(Event::App { sender, plaintext }) => {
            assert_eq!(
                (sender.id, plaintext.as_slice()),
                (b.id, &b"\x00really bob"[..])
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_member_cannot_rename_its_own_leaf_to_escape_removal() {
    let Three {
        a: _,
        b,
        d,
        mut alice,
        mut bob,
        mut dave,
    } = alice_bob_dave();

    let mut r = raw(&mut dave);
    let (header, aad) = header_and_aad(&r.provider, &r.group, r.me, r.next_seq);
    r.group.set_aad(aad);
    let with_key = CredentialWithKey {
        credential: BasicCredential::new([b.id.as_bytes().as_slice(), b"bob"].concat()).into(),
        signature_key: r.signer.public().into(),
    };
    let bundle = r
        .group
        .self_update(
            &r.provider,
            &r.signer,
            LeafNodeParameters::builder()
                .with_credential_with_key(with_key)
                .build(),
        )
        .unwrap();
    let update = envelope(&header, bundle.commit());
    refused_everywhere(
        &mut [&mut alice, &mut bob],
        &update,
        "changes its author's credential",
    );
    // Dave is still Dave, and can be removed.
    remove_dave(&mut alice, &mut bob, d.id);
}
