//! The channel's MLS group under attack and under concurrency, driven by hand
//! in relay order (no network): forks, concurrent commits, lockout attempts,
//! impersonation, concurrent removals, adds racing removals, and a device
//! that was offline across many commits.

mod common;

use common::{Device, Three, alice_bob_dave, channel_of};
use khub::channel::{Channel, Event, Intent, RefusalKind, TakenIn};
use khub::ids::DeviceId;

/// Takes `envelope` in on every channel of `members`, in order.
fn deliver(members: &mut [&mut Channel], envelope: &[u8]) -> Vec<TakenIn> {
    members.iter_mut().map(|m| m.take_in(envelope, 0)).collect()
}

fn kinds(taken: &TakenIn) -> Vec<RefusalKind> {
    taken.refusals.iter().map(|r| r.kind).collect()
}

fn app(taken: &TakenIn) -> Option<(DeviceId, Vec<u8>)> {
    match &taken.event {
        Some(Event::App { sender, plaintext }) => Some((sender.id, plaintext.clone())),
        _ => None,
    }
}

fn ids(channel: &Channel) -> Vec<DeviceId> {
    let mut ids: Vec<DeviceId> = channel.members().iter().map(|m| m.id).collect();
    ids.sort();
    ids
}

/// Every channel is in the same epoch with the same members, and a message
/// from the first opens on all the others.
fn assert_converged(members: &mut [Channel]) {
    let (epoch, who) = (members[0].epoch(), ids(&members[0]));
    for m in members.iter() {
        assert_eq!((m.epoch(), ids(m)), (epoch, who.clone()), "{m:?}");
    }
    let note = members[0].seal(b"converged").unwrap();
    for m in &mut members[1..] {
        let taken = m.take_in(&note.envelope, 0);
        assert_eq!(
            app(&taken).map(|(_, p)| p),
            Some(b"converged".to_vec()),
            "{taken:?}"
        );
    }
}

/// Saves `channel` and loads it back from all its rows: the state survives a
/// restart (and the copy is a second device holding the same state).
fn reload(channel: &mut Channel) -> Channel {
    let (meta, _) = channel.save();
    Channel::load(&meta, channel.rows_for_testing_only()).expect("state loads")
}

#[test]
fn a_relay_that_forks_the_channel_is_detected_when_the_histories_meet() {
    let Three {
        a: _,
        b: _,
        d,
        mut alice,
        mut bob,
        mut dave,
    } = alice_bob_dave();
    let epoch = alice.epoch();

    // Alice removes Dave; Dave, at the same epoch, commits an update of his own.
    let removal = alice.commit_remove(&[d.id]).unwrap();
    let daves = dave.commit_update().unwrap();
    // The relay orders Alice's first for Alice, and shows Bob Dave's instead.
    assert!(matches!(
        alice.take_in(&removal.envelope, 0).event,
        Some(Event::OwnCommit(Intent::Remove(_)))
    ));
    assert!(matches!(
        bob.take_in(&daves.envelope, 0).event,
        Some(Event::Commit { .. })
    ));
    assert!(matches!(
        dave.take_in(&daves.envelope, 0).event,
        Some(Event::OwnCommit(Intent::Update))
    ));
    // What each side now holds: Alice a channel without Dave; Bob and Dave a
    // fork of epoch + 1 that still has Dave — the same epoch number.
    assert_eq!(
        (alice.epoch(), bob.epoch(), dave.epoch()),
        (epoch + 1, epoch + 1, epoch + 1)
    );
    assert!(!ids(&alice).contains(&d.id));
    assert!(ids(&bob).contains(&d.id));

    // On the fork, Dave reads what Bob sends (the relay's withholding works)…
    let bobs = bob.seal(b"bob on the fork").unwrap();
    assert_eq!(
        app(&dave.take_in(&bobs.envelope, 0)).map(|(_, p)| p),
        Some(b"bob on the fork".to_vec())
    );
    // …but never what Alice sends after removing him.
    let alices = alice.seal(b"alice after the removal").unwrap();
    let at_dave = dave.take_in(&alices.envelope, 0);
    assert_eq!(app(&at_dave), None);
    assert_eq!(kinds(&at_dave), [RefusalKind::Fork]);

    // When the histories meet, each side records a fork and accepts nothing.
    let at_bob = bob.take_in(&alices.envelope, 0);
    assert_eq!(
        (app(&at_bob), kinds(&at_bob)),
        (None, vec![RefusalKind::Fork])
    );
    let at_alice = alice.take_in(&bobs.envelope, 0);
    assert_eq!(
        (app(&at_alice), kinds(&at_alice)),
        (None, vec![RefusalKind::Fork])
    );
    // The commit Bob never saw looks to him like a race Alice lost (it is
    // genuine, for the epoch before); Dave's, to Alice, is from a device she
    // removed. The forks above are what tells the two histories apart.
    let late = bob.take_in(&removal.envelope, 0);
    assert!(matches!(late.event, Some(Event::Nothing)), "{late:?}");
    assert!(late.refusals.is_empty(), "{late:?}");
    assert_eq!(
        kinds(&alice.take_in(&daves.envelope, 0)),
        [RefusalKind::RemovedSender]
    );
}

#[test]
fn three_hundred_commits_for_one_epoch_converge_and_the_state_stays_loadable() {
    let devices: Vec<Device> = ["a", "b", "c"].map(Device::new).into();
    let mut members = channel_of(&devices.iter().collect::<Vec<_>>());
    // 300 commits for the same epoch: B's real one first, then 299 made from
    // copies of C's state, each with its own sequence number (as if C ran
    // on 299 machines at once).
    let first = members[1].commit_update().unwrap();
    let mut commits = vec![first.envelope.clone()];
    for i in 0..299 {
        let mut copy = reload(&mut members[2]);
        copy.set_next_seq_for_testing_only(1_000 + i);
        commits.push(copy.commit_update().unwrap().envelope);
    }
    let epoch = members[0].epoch();
    for commit in &commits {
        let taken = deliver(&mut members.iter_mut().collect::<Vec<_>>(), commit);
        // The first applies everywhere (B's own); the other 299 are stale for
        // A and B, and C's own for C.
        for t in &taken {
            assert!(
                t.refusals
                    .iter()
                    .all(|r| r.kind == RefusalKind::StaleCommit),
                "{t:?}"
            );
        }
    }
    for m in &members {
        assert_eq!(m.epoch(), epoch + 1);
    }
    // Delivered again, a lost commit is a replay.
    let again = members[0].take_in(&commits[1], 0);
    assert_eq!(kinds(&again), [RefusalKind::Replayed]);
    // Saved and loaded again, every member still opens everyone's messages.
    let mut loaded: Vec<Channel> = members.iter_mut().map(reload).collect();
    assert_converged(&mut loaded);
    loaded.rotate_left(1);
    assert_converged(&mut loaded);
}

#[test]
fn no_forged_or_old_epoch_envelope_locks_a_sender_out() {
    let Three {
        a: _,
        b,
        d,
        mut alice,
        mut bob,
        mut dave,
    } = alice_bob_dave();
    let first = bob.seal(b"bob 1").unwrap();
    assert!(app(&alice.take_in(&first.envelope, 0)).is_some());

    // Dave keeps his state; Alice removes him.
    let mut old_dave = reload(&mut dave);
    let removal = alice.commit_remove(&[d.id]).unwrap();
    deliver(&mut [&mut alice, &mut bob, &mut dave], &removal.envelope);
    let top = u64::MAX - 1;

    // 1. A real message of Dave's old epoch, claiming Bob at the top sequence number.
    let claimed = old_dave
        .seal_as_for_testing_only(b.id, top, b"as bob")
        .unwrap();
    assert_eq!(
        kinds(&alice.take_in(&claimed.envelope, 0)),
        [RefusalKind::Forged]
    );
    // 2. An old-epoch commit of Dave's claiming Bob, same number.
    let mut committer = reload(&mut old_dave);
    let commit = committer.commit_update().unwrap();
    let mut forged_commit = commit.envelope.clone();
    let header = khub::crypto::envelope::EnvelopeHeader {
        sender: b.id,
        seq: top,
        ..khub::crypto::envelope::EnvelopeHeader::decode(&commit.envelope).unwrap()
    };
    forged_commit[..45].copy_from_slice(&header.encode());
    let refused = alice.take_in(&forged_commit, 0);
    assert!(
        app(&refused).is_none() && refused.event.is_none(),
        "{refused:?}"
    );
    // 3. Bob's real envelope with the header's number raised.
    let second = bob.seal(b"bob 2").unwrap();
    let mut raised = second.envelope.clone();
    raised[37..45].copy_from_slice(&top.to_be_bytes());
    assert_eq!(kinds(&alice.take_in(&raised, 0)), [RefusalKind::Tampered]);

    // None of them moved Bob's place: his real next message is taken in.
    let taken = alice.take_in(&second.envelope, 0);
    assert_eq!(app(&taken), Some((b.id, b"bob 2".to_vec())));
    assert!(taken.refusals.is_empty(), "{taken:?}");
}

#[test]
fn a_member_cannot_send_as_another_member() {
    let (a, b, c) = (
        Device::new("alice"),
        Device::new("bob"),
        Device::new("carol"),
    );
    let mut ch = channel_of(&[&a, &b, &c]);
    let mut carol = ch.pop().unwrap();
    let mut bob = ch.pop().unwrap();
    let mut alice = ch.pop().unwrap();
    let as_carol = bob
        .seal_as_for_testing_only(c.id, 1_000, b"carol says: remove alice")
        .unwrap();
    let taken = alice.take_in(&as_carol.envelope, 0);
    assert_eq!(
        (app(&taken), kinds(&taken)),
        (None, vec![RefusalKind::Forged])
    );
    // Carol's own messages still go through, and Bob's under his own name.
    let real = carol.seal(b"carol").unwrap();
    assert_eq!(
        app(&alice.take_in(&real.envelope, 0)),
        Some((c.id, b"carol".to_vec()))
    );
    let bobs = bob.seal(b"bob").unwrap();
    assert_eq!(
        app(&alice.take_in(&bobs.envelope, 0)),
        Some((b.id, b"bob".to_vec()))
    );
}

#[test]
fn concurrent_removals_by_two_members_remove_both_everywhere() {
    let devices: Vec<Device> = ["a", "b", "c", "d"].map(Device::new).into();
    let mut ch = channel_of(&devices.iter().collect::<Vec<_>>());
    let (c, d) = (devices[2].id, devices[3].id);
    let by_a = ch[0].commit_remove(&[c]).unwrap();
    let by_b = ch[1].commit_remove(&[d]).unwrap();
    // Relay order: A's, then B's (stale by then).
    let taken = deliver(&mut ch.iter_mut().collect::<Vec<_>>(), &by_a.envelope);
    assert!(matches!(taken[0].event, Some(Event::OwnCommit(_))));
    assert!(matches!(
        taken[1].event,
        Some(Event::OwnCommitLost(Intent::Remove(_)))
    ));
    assert!(matches!(taken[2].event, Some(Event::RemovedMe { .. })));
    let reissued = taken[1].outgoing.clone();
    assert_eq!(
        reissued.len(),
        1,
        "B re-issues its removal in the next epoch"
    );
    deliver(&mut ch.iter_mut().collect::<Vec<_>>(), &by_b.envelope);
    let taken = deliver(
        &mut ch.iter_mut().collect::<Vec<_>>(),
        &reissued[0].envelope,
    );
    assert!(matches!(taken[1].event, Some(Event::OwnCommit(_))));
    assert!(matches!(taken[3].event, Some(Event::RemovedMe { .. })));
    let mut remaining: Vec<Channel> = ch.drain(..2).collect();
    assert_eq!(ids(&remaining[0]), {
        let mut v = vec![devices[0].id, devices[1].id];
        v.sort();
        v
    });
    assert_converged(&mut remaining);
    assert!(ch.iter().all(Channel::is_removed));
}

#[test]
fn an_add_racing_a_removal_is_committed_again_and_both_hold() {
    let devices: Vec<Device> = ["a", "b", "c"].map(Device::new).into();
    let mut ch = channel_of(&devices.iter().collect::<Vec<_>>());
    let eve = Device::new("eve");
    let info = eve.info();
    let (add, _lost_welcome) = ch[0].commit_add(eve.id, &info.key_package).unwrap();
    let removal = ch[1].commit_remove(&[devices[2].id]).unwrap();
    // The removal wins; A's add lost and carries no Welcome that holds.
    let taken = deliver(&mut ch.iter_mut().collect::<Vec<_>>(), &removal.envelope);
    assert!(matches!(
        taken[0].event,
        Some(Event::OwnCommitLost(Intent::Add(_)))
    ));
    assert!(matches!(taken[2].event, Some(Event::RemovedMe { .. })));
    deliver(&mut ch.iter_mut().collect::<Vec<_>>(), &add.envelope);
    // A adds Eve again in the new epoch (what the SDK's invite does).
    ch.pop();
    let (again, welcome) = ch[0].commit_add(eve.id, &info.key_package).unwrap();
    let taken = deliver(&mut ch.iter_mut().collect::<Vec<_>>(), &again.envelope);
    assert!(matches!(
        taken[0].event,
        Some(Event::OwnCommit(Intent::Add(_)))
    ));
    ch.push(eve.join_welcome(&khub::pairing::ChannelWelcome {
        channel: ch[0].channel(),
        cursor: 0,
        welcome,
    }));
    assert!(!ids(&ch[0]).contains(&devices[2].id));
    assert!(ids(&ch[0]).contains(&eve.id));
    assert_converged(&mut ch);
}

#[test]
fn a_device_offline_across_twenty_commits_catches_up() {
    let devices: Vec<Device> = ["a", "b", "c"].map(Device::new).into();
    let mut ch = channel_of(&devices.iter().collect::<Vec<_>>());
    let mut offline = ch.pop().unwrap();
    let mut log = Vec::new();
    for i in 0..20 {
        let committer = i % 2;
        let commit = ch[committer].commit_update().unwrap();
        deliver(&mut ch.iter_mut().collect::<Vec<_>>(), &commit.envelope);
        log.push(commit.envelope);
        let note = ch[1 - committer]
            .seal(format!("note {i}").as_bytes())
            .unwrap();
        deliver(
            &mut ch[committer..=committer].iter_mut().collect::<Vec<_>>(),
            &note.envelope,
        );
        log.push(note.envelope);
    }
    let mut notes = Vec::new();
    for envelope in &log {
        let taken = offline.take_in(envelope, 0);
        assert!(taken.refusals.is_empty(), "{taken:?}");
        notes.extend(app(&taken).map(|(_, p)| String::from_utf8(p).unwrap()));
    }
    assert_eq!(
        notes,
        (0..20).map(|i| format!("note {i}")).collect::<Vec<_>>()
    );
    ch.push(offline);
    assert_converged(&mut ch);
}

#[test]
fn each_device_updates_its_leaf_after_many_messages_or_a_week() {
    let (a, b) = (Device::new("alice"), Device::new("bob"));
    let mut ch = channel_of(&[&a, &b]);
    let week = khub::channel::group::UPDATE_AFTER_SECS;
    assert!(!ch[0].needs_update(0));
    assert!(ch[0].needs_update(week), "a week after its last update");
    for _ in 0..khub::channel::group::UPDATE_AFTER_MESSAGES {
        ch[0].seal(b"x").unwrap();
    }
    assert!(ch[0].needs_update(0), "after many messages");
    let epoch = ch[0].epoch();
    let update = ch[0].commit_update().unwrap();
    assert!(!ch[0].needs_update(week), "one change at a time");
    let taken = deliver(&mut ch.iter_mut().collect::<Vec<_>>(), &update.envelope);
    assert!(matches!(
        taken[0].event,
        Some(Event::OwnCommit(Intent::Update))
    ));
    assert_eq!(ch[0].epoch(), epoch + 1);
    assert!(!ch[0].needs_update(week - 1));
    assert!(ch[0].needs_update(2 * week));
}

#[test]
fn past_epochs_kept_for_late_messages_are_bounded_and_configurable() {
    let devices: Vec<Device> = ["a", "b"].map(Device::new).into();
    let mut ch = channel_of(&devices.iter().collect::<Vec<_>>());
    let late = |ch: &mut Vec<Channel>, commits: usize| {
        // B seals now; A then commits `commits` times before B's message arrives.
        let note = ch[1].seal(b"late").unwrap();
        for _ in 0..commits {
            let update = ch[0].commit_update().unwrap();
            deliver(&mut ch.iter_mut().collect::<Vec<_>>(), &update.envelope);
        }
        ch[0].take_in(&note.envelope, 0)
    };
    let default = khub::channel::PAST_EPOCHS;
    assert!(
        app(&late(&mut ch, default)).is_some(),
        "within the kept epochs"
    );
    let too_late = late(&mut ch, default + 1);
    assert_eq!(
        kinds(&too_late),
        [RefusalKind::UnknownEpoch],
        "secrets deleted"
    );
    ch[0].set_past_epochs(0).unwrap();
    assert_eq!(kinds(&late(&mut ch, 1)), [RefusalKind::UnknownEpoch]);
    assert!(
        ch[0]
            .set_past_epochs(khub::channel::group::MAX_PAST_EPOCHS + 1)
            .is_err()
    );
}

#[test]
fn a_new_device_skips_what_was_sealed_before_it_joined_without_an_incident() {
    let (a, b, c) = (
        Device::new("alice"),
        Device::new("bob"),
        Device::new("carol"),
    );
    let mut ch = channel_of(&[&a, &b]);
    // Bob writes; the relay orders it after the commit that adds Carol.
    let before = ch[1].seal(b"before carol").unwrap();
    let (commit, welcome) = common::add(&mut ch[0], &c.info());
    ch[1].take_in(&commit, 0);
    let mut carol = c.join_welcome(&welcome);
    assert_eq!(
        app(&ch[0].take_in(&before.envelope, 0)),
        Some((b.id, b"before carol".to_vec()))
    );
    // Carol never had that epoch's secrets: nothing to read, nothing to report.
    let taken = carol.take_in(&before.envelope, 0);
    assert!(matches!(taken.event, Some(Event::Nothing)), "{taken:?}");
    assert!(taken.refusals.is_empty(), "{taken:?}");
    // What Bob writes next, she reads.
    let after = ch[1].seal(b"after").unwrap();
    assert_eq!(
        app(&carol.take_in(&after.envelope, 0)),
        Some((b.id, b"after".to_vec()))
    );
}
