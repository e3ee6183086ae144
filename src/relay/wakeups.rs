//! The wake-ups of a group commit, sent once per channel after all of its
//! hooks ran rather than once per envelope.
//!
//! A store that commits several appends at once (the SQLite writer) runs
//! their hooks inside [`together`]. Each hook's [`announce`] is then held
//! until the last hook ran, and goes out once per channel with the newest
//! head: the sessions it wakes find the whole commit in the cache and write it
//! with one flush, instead of waking, and flushing, once per envelope while
//! the writer is still running the rest of the hooks. Outside `together`
//! (the memory store, PostgreSQL) an announcement goes out at once.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use super::hub::Notifier;
use crate::ids::ChannelId;

thread_local! {
    /// The announcements held by the innermost `together` on this thread.
    static HELD: RefCell<Option<Vec<Held>>> = const { RefCell::new(None) };
}

/// One announcement waiting for the end of its batch.
struct Held {
    notifier: Arc<dyn Notifier>,
    channel: ChannelId,
    head: u64,
}

/// Tells `notifier`'s watchers of `channel` that it is stored up to `head`:
/// at once, or at the end of the enclosing [`together`].
pub fn announce(notifier: &Arc<dyn Notifier>, channel: ChannelId, head: u64) {
    let held = HELD.with(|held| match &mut *held.borrow_mut() {
        Some(batch) => {
            batch.push(Held {
                notifier: Arc::clone(notifier),
                channel,
                head,
            });
            true
        }
        None => false,
    });
    if !held {
        notifier.stored(channel, head);
    }
}

/// Runs `hooks`, holding their announcements, then sends each channel's
/// newest head once — also if a hook panics, so that no watcher misses a
/// commit that happened.
pub fn together<T>(hooks: impl FnOnce() -> T) -> T {
    let outer = HELD.with(|held| held.borrow_mut().replace(Vec::new()));
    let _flush = Flush(outer);
    hooks()
}

/// Sends the held announcements when dropped, and restores the outer batch.
struct Flush(Option<Vec<Held>>);

impl Drop for Flush {
    fn drop(&mut self) {
        let held = HELD.with(|held| std::mem::replace(&mut *held.borrow_mut(), self.0.take()));
        let mut newest: HashMap<(*const (), ChannelId), Held> = HashMap::new();
        for one in held.into_iter().flatten() {
            let key = (Arc::as_ptr(&one.notifier).cast::<()>(), one.channel);
            match newest.get_mut(&key) {
                Some(kept) => kept.head = kept.head.max(one.head),
                None => {
                    newest.insert(key, one);
                }
            }
        }
        for one in newest.into_values() {
            one.notifier.stored(one.channel, one.head);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::sync::watch;

    use super::*;
    use crate::relay::hub::ChannelSignal;

    /// Records what it is told.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(ChannelId, u64)>>);

    impl Notifier for Recorder {
        fn stored(&self, channel: ChannelId, head: u64) {
            self.0.lock().unwrap().push((channel, head));
        }
        fn revoked(&self, _: ChannelId) {}
        fn subscribe(&self, _: ChannelId) -> watch::Receiver<ChannelSignal> {
            watch::channel(ChannelSignal::default()).1
        }
    }

    fn told(recorder: &Recorder) -> Vec<(ChannelId, u64)> {
        let mut told = recorder.0.lock().unwrap().clone();
        told.sort();
        told
    }

    #[test]
    fn a_batch_announces_each_channel_once_with_its_newest_head_and_nothing_before_its_end() {
        let recorder = Arc::new(Recorder::default());
        let notifier: Arc<dyn Notifier> = recorder.clone();
        let (a, b) = (
            ChannelId::from_bytes([1; 16]),
            ChannelId::from_bytes([2; 16]),
        );
        together(|| {
            for (channel, head) in [(a, 1), (b, 7), (a, 3), (a, 2)] {
                announce(&notifier, channel, head);
            }
            assert!(
                told(&recorder).is_empty(),
                "announced before the batch ended"
            );
        });
        assert_eq!(told(&recorder), vec![(a, 3), (b, 7)]);

        announce(&notifier, b, 8);
        assert_eq!(
            told(&recorder),
            vec![(a, 3), (b, 7), (b, 8)],
            "outside a batch: at once"
        );
    }

    #[test]
    fn a_hook_that_panics_does_not_swallow_the_batchs_announcements() {
        let recorder = Arc::new(Recorder::default());
        let notifier: Arc<dyn Notifier> = recorder.clone();
        let channel = ChannelId::from_bytes([3; 16]);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            together(|| {
                announce(&notifier, channel, 5);
                panic!("a hook failed");
            })
        }));
        assert!(outcome.is_err());
        assert_eq!(told(&recorder), vec![(channel, 5)]);
        announce(&notifier, channel, 6);
        assert_eq!(told(&recorder), vec![(channel, 5), (channel, 6)]);
    }
}
