//! The load half of `tests/failover/run` (run by hand, not by `cargo test`):
//! publishers append to the PostgreSQL store named by KHUB_FAILOVER_STORE for
//! KHUB_FAILOVER_SECS seconds, retrying each envelope until it is acked,
//! while the script kills the primary and promotes the standby. Then every
//! acked envelope is read back and checked.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use khub::crypto::os_rng;
use khub::crypto::token::AccessToken;
use khub::ids::{ChannelId, DeviceId};
use khub::relay::store::postgres::{PgOptions, PgStore};
use khub::relay::store::{Append, Store};

const PUBLISHERS: usize = 32;
const CHANNELS: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by tests/failover/run against a primary and a standby it sets up"]
async fn every_acked_envelope_survives_a_failover() {
    let url = std::env::var("KHUB_FAILOVER_STORE").expect("KHUB_FAILOVER_STORE");
    let secs: u64 = std::env::var("KHUB_FAILOVER_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let store = Arc::new(
        PgStore::connect(
            &url,
            &PgOptions {
                pool_size: PUBLISHERS,
                ca_file: None,
            },
        )
        .await
        .expect("the store opens"),
    );
    let mut rng = os_rng();
    let channels: Vec<ChannelId> = (0..CHANNELS).map(|_| ChannelId::random(&mut rng)).collect();
    for channel in &channels {
        store
            .create_channel(
                *channel,
                DeviceId::random(&mut rng),
                AccessToken::generate(&mut rng).hash(),
                0,
            )
            .await
            .unwrap();
    }
    let started = Instant::now();
    let stop_at = started + Duration::from_secs(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..PUBLISHERS {
        let store = Arc::clone(&store);
        let channel = channels[p % CHANNELS];
        let sender = DeviceId::random(&mut rng);
        tasks.spawn(async move {
            // (seq in the channel, body) of every acked append, and the
            // longest time between two acks.
            let mut acked: Vec<(u64, Vec<u8>)> = Vec::new();
            let mut errors = 0u64;
            let mut longest_gap = Duration::ZERO;
            let mut last_ack = Instant::now();
            let mut sender_seq = 1u64;
            while Instant::now() < stop_at {
                let body = format!("{sender} #{sender_seq}").into_bytes();
                let append = Append {
                    channel,
                    sender,
                    sender_seq,
                    envelope: Bytes::from(body.clone()),
                    now: khub::relay::hub::unix_now(),
                    quota: u64::MAX / 2,
                };
                match tokio::time::timeout(Duration::from_secs(20), store.append(append)).await {
                    Ok(Ok(appended)) => {
                        longest_gap = longest_gap.max(last_ack.elapsed());
                        last_ack = Instant::now();
                        acked.push((appended.seq, body));
                        sender_seq += 1;
                    }
                    // Not acked: the same envelope again (a retry is a
                    // duplicate if it was stored after all).
                    _ => {
                        errors += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            (channel, acked, errors, longest_gap)
        });
    }
    let mut acked_by_channel: HashMap<ChannelId, Vec<(u64, Vec<u8>)>> = HashMap::new();
    let (mut errors, mut longest_gap) = (0, Duration::ZERO);
    while let Some(done) = tasks.join_next().await {
        let (channel, acked, e, gap) = done.unwrap();
        acked_by_channel.entry(channel).or_default().extend(acked);
        errors += e;
        longest_gap = longest_gap.max(gap);
    }

    let mut total = 0usize;
    let mut lost = 0usize;
    for (channel, acked) in &acked_by_channel {
        let mut stored: HashMap<u64, Bytes> = HashMap::new();
        let mut after = 0;
        loop {
            let page = store.read(*channel, after, 1000).await.expect("read back");
            let Some(last) = page.last() else { break };
            after = last.seq;
            stored.extend(page.into_iter().map(|e| (e.seq, e.envelope)));
        }
        for (seq, body) in acked {
            total += 1;
            if stored.get(seq).map(|b| b.as_ref()) != Some(body.as_slice()) {
                lost += 1;
            }
        }
        let head = store.head(*channel).await.unwrap();
        assert_eq!(
            stored.len() as u64,
            head,
            "{channel}: gapless, nothing twice"
        );
    }
    println!(
        "failover: {total} acked appends in {secs} s, {lost} lost, {errors} refused or timed out and retried, longest time without an ack {:.1} s",
        longest_gap.as_secs_f64()
    );
    assert_eq!(lost, 0, "acked envelopes lost");
    assert!(total > 0);
}
