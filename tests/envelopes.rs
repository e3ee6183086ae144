//! Envelopes between members of a channel (MLS private messages behind khub's
//! routing header): round trips, tampering, wrong context, forged senders,
//! replays, gaps, forks, old protocol and padding.

mod common;

use common::{Device, channel_of};
use khub::channel::{Channel, ChannelError, Event, Member, RefusalKind, TakenIn};
use khub::crypto::envelope::{
    self, EnvelopeHeader, HEADER_LEN, MAX_ENVELOPE_LEN, MAX_PLAINTEXT_LEN, MIN_PADDED_LEN,
};
use khub::ids::{ChannelId, DeviceId};

fn two() -> (Channel, Channel) {
    let (a, b) = (Device::new("laptop"), Device::new("phone"));
    let mut channels = channel_of(&[&a, &b]).into_iter();
    (channels.next().unwrap(), channels.next().unwrap())
}

fn three() -> (Channel, Channel, Channel) {
    let (a, b, c) = (
        Device::new("laptop"),
        Device::new("phone"),
        Device::new("tablet"),
    );
    let mut channels = channel_of(&[&a, &b, &c]).into_iter();
    (
        channels.next().unwrap(),
        channels.next().unwrap(),
        channels.next().unwrap(),
    )
}

/// The application message `taken` delivered, with no refusal beside it.
fn app(taken: TakenIn) -> (Member, Vec<u8>) {
    assert!(taken.refusals.is_empty(), "{taken:?}");
    match taken.event {
        Some(Event::App { sender, plaintext }) => (sender, plaintext),
        other => panic!("not an application message: {other:?}"),
    }
}

/// The one refusal `taken` holds; nothing was taken in.
fn refused(taken: &TakenIn) -> RefusalKind {
    assert!(taken.event.is_none(), "taken in: {taken:?}");
    assert_eq!(taken.refusals.len(), 1, "{taken:?}");
    assert!(taken.outgoing.is_empty(), "{taken:?}");
    taken.refusals[0].kind
}

/// Takes `commit` in at every channel in `members` as a commit of another member.
fn deliver_commit(commit: &[u8], members: &mut [&mut Channel]) {
    for member in members {
        let taken = member.take_in(commit, 0);
        assert!(taken.refusals.is_empty(), "{taken:?}");
        assert!(
            matches!(taken.event, Some(Event::Commit { .. })),
            "{taken:?}"
        );
    }
}

/// Commits `channel`'s own leaf update and takes it back in (relay order).
fn own_update(channel: &mut Channel) -> Vec<u8> {
    let commit = channel.commit_update().unwrap();
    let taken = channel.take_in(&commit.envelope, 0);
    assert!(
        matches!(taken.event, Some(Event::OwnCommit(_))),
        "{taken:?}"
    );
    commit.envelope
}

#[test]
fn envelopes_round_trip_with_sender_and_sequence_both_ways() {
    let (mut laptop, mut phone) = two();
    assert_eq!(laptop.epoch(), 1, "the Add of the phone made epoch 1");
    assert_eq!(phone.epoch(), 1);
    let mut last_seq = 0;
    for text in ["", "a", "hello", &"x".repeat(5000)] {
        let sealed = laptop.seal(text.as_bytes()).unwrap();
        let header = EnvelopeHeader::decode(&sealed.envelope).unwrap();
        assert_eq!(header.channel, laptop.channel());
        assert_eq!(header.sender, laptop.me());
        assert_eq!(u64::from(header.epoch), laptop.epoch());
        assert_eq!(header.seq, sealed.seq);
        assert!(last_seq == 0 || sealed.seq == last_seq + 1, "seq");
        last_seq = sealed.seq;

        let (sender, plaintext) = app(phone.take_in(&sealed.envelope, 0));
        assert_eq!(plaintext, text.as_bytes());
        assert_eq!(
            sender,
            Member {
                id: laptop.me(),
                name: "laptop".into()
            }
        );
    }
    let sealed = phone.seal(b"and back").unwrap();
    let (sender, plaintext) = app(laptop.take_in(&sealed.envelope, 0));
    assert_eq!((sender.id, sender.name.as_str()), (phone.me(), "phone"));
    assert_eq!(plaintext, b"and back");

    // A device's own message coming back from the relay means nothing to it.
    let mine = laptop.seal(b"mine").unwrap();
    let taken = laptop.take_in(&mine.envelope, 0);
    assert!(
        matches!(taken.event, Some(Event::Nothing)) && taken.refusals.is_empty(),
        "{taken:?}"
    );

    // The plaintext never shows in the sealed bytes.
    let marker = b"PLAINTEXT-MARKER-4f1c";
    let sealed = laptop.seal(marker).unwrap();
    assert!(!sealed.envelope.windows(marker.len()).any(|w| w == marker));
}

#[test]
fn every_single_bit_flip_is_refused_and_moves_nothing() {
    let (mut laptop, mut phone) = two();
    let sealed = laptop.seal(b"tamper with me").unwrap().envelope;
    // The MLS message carries the header again, then the epoch fingerprint, as
    // its authenticated data (in the clear, authenticated by MLS).
    let aad = HEADER_LEN
        + sealed[HEADER_LEN..]
            .windows(HEADER_LEN)
            .position(|w| w == &sealed[..HEADER_LEN])
            .expect("the header is the authenticated data");
    let fingerprint = aad + HEADER_LEN..aad + HEADER_LEN + 16;
    for byte in 0..sealed.len() {
        for bit in 0..8 {
            let mut flipped = sealed.clone();
            flipped[byte] ^= 1 << bit;
            let taken = phone.take_in(&flipped, 0);
            let kind = refused(&taken);
            let expected: &[RefusalKind] = match byte {
                // The version byte: no protocol at all.
                0 => &[RefusalKind::Malformed],
                // The channel id: the envelope is for another channel now.
                1..17 => &[RefusalKind::Foreign],
                // Epoch, sender or seq no longer match the signed message
                // (or seq became 0, which no envelope has).
                17..HEADER_LEN => &[RefusalKind::Tampered, RefusalKind::Malformed],
                // The copy of the header inside: no longer matches the header.
                b if (aad..aad + HEADER_LEN).contains(&b) => &[RefusalKind::Tampered],
                // The epoch fingerprint is compared before MLS authenticates
                // the message, so a changed one reads as another history.
                b if fingerprint.contains(&b) => &[RefusalKind::Fork, RefusalKind::Tampered],
                // Anywhere else: broken framing, or failed authentication.
                _ => &[RefusalKind::Malformed, RefusalKind::Tampered],
            };
            assert!(
                expected.contains(&kind),
                "flip of byte {byte} bit {bit}: {kind:?}"
            );
        }
    }
    // None of the forgeries moved the sender's sequence or MLS's ratchet: the
    // original opens, once.
    let (_, plaintext) = app(phone.take_in(&sealed, 0));
    assert_eq!(plaintext, b"tamper with me");
    assert_eq!(refused(&phone.take_in(&sealed, 0)), RefusalKind::Replayed);
}

#[test]
fn truncated_oversized_and_old_protocol_envelopes_are_refused() {
    let (mut laptop, mut phone) = two();
    let sealed = laptop.seal(b"short").unwrap().envelope;
    for len in 0..sealed.len() {
        assert_eq!(
            refused(&phone.take_in(&sealed[..len], 0)),
            RefusalKind::Malformed,
            "prefix of {len}"
        );
    }
    let oversized = [sealed.clone(), vec![0; MAX_ENVELOPE_LEN]].concat();
    let taken = phone.take_in(&oversized, 0);
    assert_eq!(refused(&taken), RefusalKind::Malformed);
    assert!(
        taken.refusals[0]
            .detail
            .contains("longer than the largest envelope")
    );
    assert!(matches!(
        laptop.seal(&vec![0; MAX_PLAINTEXT_LEN + 1]),
        Err(ChannelError::Invalid(_))
    ));

    // Protocol 1 is named as such, so the person knows to pair again.
    let mut old = sealed.clone();
    old[0] = 1;
    let taken = phone.take_in(&old, 0);
    assert_eq!(refused(&taken), RefusalKind::OldProtocol);
    assert!(taken.refusals[0].detail.contains("protocol 1"), "{taken:?}");
    let mut future = sealed.clone();
    future[0] = 3;
    assert_eq!(refused(&phone.take_in(&future, 0)), RefusalKind::Malformed);

    // None of that moved anything: the real envelope still opens.
    assert_eq!(app(phone.take_in(&sealed, 0)).1, b"short");
}

#[test]
fn headers_rewritten_to_another_channel_epoch_sender_or_seq_are_refused() {
    let (mut laptop, mut phone, mut tablet) = three();
    let sealed = laptop.seal(b"note").unwrap().envelope;
    let header = EnvelopeHeader::decode(&sealed).unwrap();
    let rewrites = [
        (
            EnvelopeHeader {
                channel: ChannelId::from_bytes([9; 16]),
                ..header
            },
            RefusalKind::Foreign,
        ),
        (
            EnvelopeHeader {
                epoch: header.epoch + 1,
                ..header
            },
            RefusalKind::Tampered,
        ),
        // Another member's id: the relay cannot move a message to another sender.
        (
            EnvelopeHeader {
                sender: tablet.me(),
                ..header
            },
            RefusalKind::Tampered,
        ),
        (
            EnvelopeHeader {
                sender: DeviceId::from_bytes([5; 16]),
                ..header
            },
            RefusalKind::Tampered,
        ),
        (
            EnvelopeHeader {
                seq: header.seq + 10,
                ..header
            },
            RefusalKind::Tampered,
        ),
    ];
    for (rewritten, kind) in rewrites {
        let mut forged = sealed.clone();
        forged[..HEADER_LEN].copy_from_slice(&rewritten.encode());
        assert_eq!(refused(&phone.take_in(&forged, 0)), kind, "{rewritten:?}");
        assert_eq!(refused(&tablet.take_in(&forged, 0)), kind, "{rewritten:?}");
    }
    // Rewritten to the receiver's own id, it is not mistaken for its own message.
    let mut forged = sealed.clone();
    forged[..HEADER_LEN].copy_from_slice(
        &EnvelopeHeader {
            sender: phone.me(),
            ..header
        }
        .encode(),
    );
    assert_eq!(refused(&phone.take_in(&forged, 0)), RefusalKind::Tampered);

    // The genuine envelope still reaches both.
    assert_eq!(app(phone.take_in(&sealed, 0)).1, b"note");
    assert_eq!(app(tablet.take_in(&sealed, 0)).1, b"note");
}

#[test]
fn envelopes_of_another_channel_are_refused_as_foreign() {
    let (_, mut phone) = two();
    let (mut stranger, _) = two();
    let foreign = stranger.seal(b"not for you").unwrap();
    let taken = phone.take_in(&foreign.envelope, 0);
    assert_eq!(refused(&taken), RefusalKind::Foreign);
    assert_eq!(taken.refusals[0].sender, Some(stranger.me()));
}

#[test]
fn a_member_cannot_sign_a_message_under_another_members_name() {
    use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
    use openmls::prelude::*;
    use openmls_basic_credential::SignatureKeyPair;
    use openmls_rust_crypto::OpenMlsRustCrypto;

    let (mut laptop, mut phone) = two();

    // Mallory is a real member, but runs its own MLS client rather than khub's.
    let mallory = DeviceId::from_bytes([0x4d; 16]);
    let provider = OpenMlsRustCrypto::default();
    let ciphersuite = khub::channel::CIPHERSUITE;
    let signer = SignatureKeyPair::new(ciphersuite.signature_algorithm()).unwrap();
    signer.store(provider.storage()).unwrap();
    let credential = CredentialWithKey {
        credential: BasicCredential::new([&mallory.as_bytes()[..], b"mallory"].concat()).into(),
        signature_key: signer.public().into(),
    };
    let key_package = KeyPackage::builder()
        .build(ciphersuite, &provider, &signer, credential)
        .unwrap()
        .key_package()
        .tls_serialize_detached()
        .unwrap();
    let (commit, welcome) = laptop.commit_add(mallory, &key_package).unwrap();
    assert!(matches!(
        laptop.take_in(&commit.envelope, 0).event,
        Some(Event::OwnCommit(_))
    ));
    deliver_commit(&commit.envelope, &mut [&mut phone]);
    let MlsMessageBodyIn::Welcome(welcome) = MlsMessageIn::tls_deserialize_exact(&welcome)
        .unwrap()
        .extract()
    else {
        panic!("a Welcome")
    };
    let config = MlsGroupJoinConfig::builder()
        .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(true)
        .build();
    let mut group = StagedWelcome::new_from_welcome(&provider, &config, welcome, None)
        .unwrap()
        .into_group(&provider)
        .unwrap();
    assert_eq!(group.epoch().as_u64(), phone.epoch());

    // An envelope exactly as khub builds it, with the header naming `sender`.
    let channel = phone.channel();
    let mut seal_as = |sender: DeviceId, seq: u64, text: &[u8]| {
        let header = EnvelopeHeader {
            channel,
            epoch: group.epoch().as_u64() as u32,
            sender,
            seq,
        };
        let fingerprint = group
            .export_secret(provider.crypto(), "khub/v2/epoch-fingerprint", &[], 16)
            .unwrap();
        group.set_aad([&header.encode()[..], &fingerprint].concat());
        let message = group
            .create_message(&provider, &signer, &envelope::pad(text))
            .unwrap();
        [
            &header.encode()[..],
            &message.tls_serialize_detached().unwrap(),
        ]
        .concat()
    };

    // Under its own name, Mallory's message is an ordinary one…
    let honest = seal_as(mallory, 1, b"hi, I'm mallory");
    let (sender, plaintext) = app(phone.take_in(&honest, 0));
    assert_eq!((sender.id, sender.name.as_str()), (mallory, "mallory"));
    assert_eq!(plaintext, b"hi, I'm mallory");

    // …but one whose header (and authenticated data) names the laptop is a
    // forgery: the signature is Mallory's.
    let forged = seal_as(laptop.me(), 1000, b"transfer everything to mallory");
    let taken = phone.take_in(&forged, 0);
    assert_eq!(refused(&taken), RefusalKind::Forged, "{taken:?}");
    assert_eq!(taken.refusals[0].sender, Some(laptop.me()));

    // The laptop's real messages still go through, and its sequence was not
    // advanced by the forgery.
    let real = laptop.seal(b"the real laptop").unwrap();
    assert!(real.seq < 1000);
    assert_eq!(app(phone.take_in(&real.envelope, 0)).1, b"the real laptop");
}

#[test]
fn replays_and_late_arrivals_are_refused_and_gaps_are_reported() {
    let (mut laptop, mut phone) = two();
    let sealed: Vec<_> = (0..6)
        .map(|i| laptop.seal(format!("m{i}").as_bytes()).unwrap())
        .collect();

    assert_eq!(app(phone.take_in(&sealed[0].envelope, 0)).1, b"m0");
    let taken = phone.take_in(&sealed[0].envelope, 0);
    assert_eq!(refused(&taken), RefusalKind::Replayed);
    assert_eq!(taken.refusals[0].sender, Some(laptop.me()));

    // The relay drops the next two: the receiver sees the hole, and still gets
    // the message after it.
    let taken = phone.take_in(&sealed[3].envelope, 0);
    assert!(
        matches!(&taken.event, Some(Event::App { plaintext, .. }) if plaintext == b"m3"),
        "{taken:?}"
    );
    assert_eq!(taken.refusals.len(), 1, "{taken:?}");
    assert_eq!(taken.refusals[0].kind, RefusalKind::Gap);
    assert_eq!(taken.refusals[0].sender, Some(laptop.me()));
    let gap = format!("{}..={}", sealed[1].seq, sealed[2].seq);
    assert!(taken.refusals[0].detail.contains(&gap), "{taken:?}");

    // A late arrival is refused: each sender's messages reach the app in the
    // order they were sent, or not at all.
    assert_eq!(
        refused(&phone.take_in(&sealed[1].envelope, 0)),
        RefusalKind::Replayed
    );
    assert_eq!(
        refused(&phone.take_in(&sealed[3].envelope, 0)),
        RefusalKind::Replayed
    );
    assert_eq!(app(phone.take_in(&sealed[4].envelope, 0)).1, b"m4");
    assert_eq!(app(phone.take_in(&sealed[5].envelope, 0)).1, b"m5");

    // Long after, an old envelope is still a replay.
    for _ in 0..50 {
        let next = laptop.seal(b"filler").unwrap();
        app(phone.take_in(&next.envelope, 0));
    }
    assert_eq!(
        refused(&phone.take_in(&sealed[2].envelope, 0)),
        RefusalKind::Replayed
    );
    assert_eq!(
        refused(&phone.take_in(&sealed[5].envelope, 0)),
        RefusalKind::Replayed
    );
}

#[test]
fn replay_protection_and_keys_survive_a_restart() {
    let (mut laptop, phone) = two();
    let first = laptop.seal(b"before the restart").unwrap();
    let second = laptop.seal(b"after the restart").unwrap();

    // The phone takes in the first, saves, and is loaded again from what it saved.
    let mut phone = phone;
    assert_eq!(
        app(phone.take_in(&first.envelope, 0)).1,
        b"before the restart"
    );
    // (The first save after joining holds every row: the state started empty.)
    let (meta, changes) = phone.save();
    assert!(changes.deletes.is_empty());
    let rows = changes.upserts;
    let mut phone = Channel::load(&meta, rows.clone()).unwrap();

    assert_eq!(
        refused(&phone.take_in(&first.envelope, 0)),
        RefusalKind::Replayed
    );
    assert_eq!(
        app(phone.take_in(&second.envelope, 0)).1,
        b"after the restart"
    );
    let reply = phone.seal(b"still me").unwrap();
    let (sender, plaintext) = app(laptop.take_in(&reply.envelope, 0));
    assert_eq!(
        (sender.id, plaintext.as_slice()),
        (phone.me(), &b"still me"[..])
    );

    // A damaged state file is an error, not a panic.
    assert!(matches!(
        Channel::load(b"not json", rows),
        Err(ChannelError::Corrupt(_))
    ));
}

#[test]
fn messages_from_an_epoch_not_reached_are_refused_until_its_commit_arrives() {
    let (mut laptop, mut phone) = two();
    let update = own_update(&mut laptop);
    let ahead = laptop.seal(b"from epoch 2").unwrap();
    let taken = phone.take_in(&ahead.envelope, 0);
    assert_eq!(refused(&taken), RefusalKind::UnknownEpoch);

    // Once the commit arrives (in relay order), the next message opens.
    deliver_commit(&update, &mut [&mut phone]);
    assert_eq!(phone.epoch(), laptop.epoch());
    let next = laptop.seal(b"also from epoch 2").unwrap();
    let taken = phone.take_in(&next.envelope, 0);
    // The refused envelope counts as missing.
    assert!(
        matches!(&taken.event, Some(Event::App { plaintext, .. }) if plaintext == b"also from epoch 2"),
        "{taken:?}"
    );
    assert_eq!(
        taken.refusals.iter().map(|r| r.kind).collect::<Vec<_>>(),
        [RefusalKind::Gap]
    );
}

#[test]
fn late_messages_of_a_previous_epoch_open_but_not_from_a_removed_device() {
    let (mut laptop, mut phone, mut tablet) = three();
    // Sealed in the epoch before the removal, delivered after it.
    let from_phone = phone.seal(b"sent before the removal").unwrap();
    let from_tablet = tablet.seal(b"also sent before").unwrap();

    let removal = laptop.commit_remove(&[tablet.me()]).unwrap();
    let taken = laptop.take_in(&removal.envelope, 0);
    assert!(
        matches!(taken.event, Some(Event::OwnCommit(_))),
        "{taken:?}"
    );
    let taken = phone.take_in(&removal.envelope, 0);
    match taken.event {
        Some(Event::Commit { by, added, removed }) => {
            assert_eq!(by, laptop.me());
            assert!(added.is_empty());
            assert_eq!(removed, [tablet.me()]);
        }
        other => panic!("{other:?}"),
    }
    for member in [&laptop, &phone] {
        let ids: Vec<DeviceId> = member.members().iter().map(|m| m.id).collect();
        assert_eq!(ids.len(), 2);
        assert!(!ids.contains(&tablet.me()));
    }
    let taken = tablet.take_in(&removal.envelope, 0);
    assert!(
        matches!(taken.event, Some(Event::RemovedMe { by }) if by == laptop.me()),
        "{taken:?}"
    );
    assert!(tablet.is_removed());
    assert!(matches!(
        tablet.seal(b"still here?"),
        Err(ChannelError::Removed)
    ));

    // The relay ordered the older messages after the commit: a remaining
    // member's opens, the removed device's does not.
    let (sender, plaintext) = app(laptop.take_in(&from_phone.envelope, 0));
    assert_eq!(sender.id, phone.me());
    assert_eq!(plaintext, b"sent before the removal");
    for member in [&mut laptop, &mut phone] {
        let taken = member.take_in(&from_tablet.envelope, 0);
        assert_eq!(refused(&taken), RefusalKind::RemovedSender);
        assert_eq!(taken.refusals[0].sender, Some(tablet.me()));
    }

    // And nothing sealed after the removal reaches the tablet.
    let after = laptop.seal(b"after the removal").unwrap();
    let taken = tablet.take_in(&after.envelope, 0);
    assert!(!matches!(taken.event, Some(Event::App { .. })), "{taken:?}");
    assert_eq!(
        app(phone.take_in(&after.envelope, 0)).1,
        b"after the removal"
    );
}

#[test]
fn a_relay_that_shows_members_different_commits_is_caught_as_a_fork() {
    let (mut laptop, phone, mut tablet) = three();
    // Both commit for the same epoch; a dishonest relay orders each one's own
    // commit first for it, and hides the other's.
    let _ = own_update(&mut laptop);
    let _ = own_update(&mut tablet);
    assert_eq!(laptop.epoch(), tablet.epoch());

    let note = laptop.seal(b"in my history").unwrap();
    let taken = tablet.take_in(&note.envelope, 0);
    assert_eq!(refused(&taken), RefusalKind::Fork);
    let note = tablet.seal(b"in mine").unwrap();
    assert_eq!(
        refused(&laptop.take_in(&note.envelope, 0)),
        RefusalKind::Fork
    );
    let _ = phone;
}

#[test]
fn of_two_commits_for_one_epoch_the_first_in_relay_order_wins() {
    let (mut laptop, mut phone, mut tablet) = three();
    let first = laptop.commit_update().unwrap();
    let second = tablet.commit_update().unwrap();
    // The relay orders the laptop's first, for everyone.
    assert!(matches!(
        laptop.take_in(&first.envelope, 0).event,
        Some(Event::OwnCommit(_))
    ));
    deliver_commit(&first.envelope, &mut [&mut phone]);
    let taken = tablet.take_in(&first.envelope, 0);
    assert!(
        matches!(taken.event, Some(Event::OwnCommitLost(_))),
        "{taken:?}"
    );
    // A lost update is not re-issued at once: the schedule still calls for one.
    assert!(taken.outgoing.is_empty(), "{taken:?}");
    let week = khub::channel::group::UPDATE_AFTER_SECS;
    assert!(tablet.needs_update(week));
    for member in [&mut laptop, &mut phone] {
        // The losing commit is checked against the previous epoch's state:
        // a genuine lost race, ignored without an incident.
        let taken = member.take_in(&second.envelope, 0);
        assert!(taken.refusals.is_empty(), "{taken:?}");
        assert!(matches!(taken.event, Some(Event::Nothing)), "{taken:?}");
    }
    // A forged one for that epoch (the tablet's bytes under the phone's name)
    // is refused.
    let mut forged = second.envelope.clone();
    forged[21..37].copy_from_slice(phone.me().as_bytes());
    assert_eq!(
        refused(&laptop.take_in(&forged, 0)),
        RefusalKind::Tampered,
        "the header no longer matches the message"
    );
    let reissued = &tablet.commit_update().unwrap().envelope;
    assert!(matches!(
        tablet.take_in(reissued, 0).event,
        Some(Event::OwnCommit(_))
    ));
    deliver_commit(reissued, &mut [&mut laptop, &mut phone]);
    assert!(laptop.epoch() == phone.epoch() && phone.epoch() == tablet.epoch());

    // Everyone is in the same history: messages flow every way.
    let note = tablet.seal(b"converged").unwrap();
    assert_eq!(app(laptop.take_in(&note.envelope, 0)).1, b"converged");
    assert_eq!(app(phone.take_in(&note.envelope, 0)).1, b"converged");
}

#[test]
fn padding_round_trips_and_hides_exact_lengths() {
    for len in [0, 1, 31, 32, 33, 100, 1000, 5000, 70_000] {
        let plaintext: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let padded = envelope::pad(&plaintext);
        assert_eq!(padded.len(), envelope::padded_len(len));
        assert!(padded.len() >= MIN_PADDED_LEN && padded.len() > len);
        assert_eq!(envelope::unpad(&padded).unwrap(), plaintext, "{len}");
    }
    // Trailing zeros of the plaintext itself survive.
    assert_eq!(envelope::unpad(&envelope::pad(&[0, 0])).unwrap(), [0, 0]);
    // Padding that is not of the documented form is refused.
    assert_eq!(envelope::unpad(&[0; 32]), None);
    assert_eq!(envelope::unpad(&[1, 2, 3, 0, 0]), None);

    // Envelope lengths reveal only a size class.
    let (mut laptop, _) = two();
    let mut len = |n: usize| laptop.seal(&vec![b'a'; n]).unwrap().envelope.len();
    assert_eq!(len(0), len(31));
    assert_eq!(len(33), len(35));
    assert_eq!(len(1000), len(1020));
    assert!(len(5000) > len(1000));
}
