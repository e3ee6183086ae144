//! The pairing mailbox in PostgreSQL, shared by every node: the inviter's
//! node opens the slot, the joiner's claims it, and each side's polls are
//! woken through the [`PgBus`] whichever node the other side posts through.
//! The rules are [`Slots`](crate::relay::pairing::Slots)'s; each operation is
//! one transaction holding the slot's row lock.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Pool, Transaction};
use tokio::time::Instant;

use super::bus::PgBus;
use crate::crypto::token::AccessToken;
use crate::ids::{ChannelId, DeviceId};
use crate::protocol::Refusal;
use crate::relay::hub::store_error;
use crate::relay::metrics::Metrics;
use crate::relay::pairing::{
    self, Claimed, Mailbox, Received, Side, SlotAuth, SlotBounds, TYPE_ABORT, TYPE_FINISH,
};
use crate::relay::store::{BoxFuture, StoreError, postgres};

/// Advisory lock key serialising slot opens (nameplate choice) across nodes.
const OPEN_LOCK: i64 = 0x6b68_7562_0003;
/// A poll re-checks the database this often even without a wake-up, in case
/// a notification was lost.
const RECHECK: Duration = Duration::from_secs(1);

/// Pairing slots in PostgreSQL.
pub struct PgMailbox {
    pool: Pool,
    bus: Arc<PgBus>,
    ttl: Duration,
    bounds: SlotBounds,
    metrics: Arc<Metrics>,
}

fn db(e: tokio_postgres::Error) -> Refusal {
    store_error(postgres::db(e))
}

fn pool(e: deadpool_postgres::PoolError) -> Refusal {
    store_error(postgres::pool_error(e))
}

fn side_code(side: Side) -> i16 {
    match side {
        Side::Inviter => 0,
        Side::Joiner => 1,
    }
}

fn other(side: Side) -> Side {
    match side {
        Side::Inviter => Side::Joiner,
        Side::Joiner => Side::Inviter,
    }
}

/// A slot's state, read under its row lock.
struct Row {
    sid: Vec<u8>,
    claim_hash: Option<Vec<u8>>,
    ended_by: Option<i16>,
    expires_in: f64,
}

impl PgMailbox {
    /// A mailbox on `pool`, woken through `bus`.
    pub fn new(
        pool: Pool,
        bus: Arc<PgBus>,
        ttl: Duration,
        bounds: SlotBounds,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            pool,
            bus,
            ttl,
            bounds,
            metrics,
        }
    }

    fn ttl_secs(&self) -> f64 {
        self.ttl.as_secs_f64()
    }

    /// Runs `op` in one transaction (handing it the mailbox back, for the
    /// borrow checker); commits if it succeeds.
    async fn transaction<T>(
        &self,
        op: impl for<'t> FnOnce(&'t Transaction<'t>, &'t Self) -> BoxFuture<'t, Result<T, Refusal>>,
    ) -> Result<T, Refusal> {
        let work = async {
            let mut client = self.pool.get().await.map_err(pool)?;
            let tx = client.transaction().await.map_err(db)?;
            let value = op(&tx, self).await?;
            tx.commit().await.map_err(db)?;
            Ok(value)
        };
        tokio::time::timeout(postgres::CALL_TIMEOUT, work)
            .await
            .unwrap_or_else(|_| Err(store_error(postgres::timed_out())))
    }

    /// The live (unexpired) slot under `nameplate`, locked.
    async fn live(tx: &Transaction<'_>, nameplate: u32) -> Result<Option<Row>, Refusal> {
        let row = tx
            .query_opt(
                "SELECT sid, claim_hash, ended_by,
                        EXTRACT(EPOCH FROM expires - now())::FLOAT8
                 FROM khub_pairing_slots WHERE nameplate = $1 AND expires > now() FOR UPDATE",
                &[&(nameplate as i32)],
            )
            .await
            .map_err(db)?;
        Ok(row.map(|r| Row {
            sid: r.get(0),
            claim_hash: r.get(1),
            ended_by: r.get(2),
            expires_in: r.get(3),
        }))
    }

    /// Removes a slot (its messages go with it), counts its outcome and rests
    /// its nameplate.
    async fn bury(&self, tx: &Transaction<'_>, nameplate: u32) -> Result<(), Refusal> {
        let gone = tx
            .query_opt(
                "DELETE FROM khub_pairing_slots WHERE nameplate = $1 RETURNING finished, aborted",
                &[&(nameplate as i32)],
            )
            .await
            .map_err(db)?;
        if let Some(row) = gone {
            self.count_outcome(row.get(0), row.get(1));
            self.rest(tx, nameplate).await?;
        }
        Ok(())
    }

    async fn rest(&self, tx: &Transaction<'_>, nameplate: u32) -> Result<(), Refusal> {
        tx.execute(
            "INSERT INTO khub_pairing_resting (nameplate, until)
             VALUES ($1, now() + make_interval(secs => $2))
             ON CONFLICT (nameplate) DO UPDATE SET until = excluded.until",
            &[&(nameplate as i32), &self.ttl_secs()],
        )
        .await
        .map_err(db)?;
        Ok(())
    }

    fn count_outcome(&self, finished: bool, aborted: bool) {
        if finished && !aborted {
            Metrics::inc(&self.metrics.pairings_succeeded);
        } else {
            Metrics::inc(&self.metrics.pairings_failed);
        }
    }

    /// Buries expired slots and frees rested nameplates.
    async fn sweep(&self, tx: &Transaction<'_>) -> Result<(), Refusal> {
        let expired = tx
            .query(
                "DELETE FROM khub_pairing_slots WHERE expires <= now() RETURNING nameplate, finished, aborted",
                &[],
            )
            .await
            .map_err(db)?;
        for row in &expired {
            let nameplate: i32 = row.get(0);
            self.count_outcome(row.get(1), row.get(2));
            self.rest(tx, nameplate as u32).await?;
        }
        tx.execute("DELETE FROM khub_pairing_resting WHERE until <= now()", &[])
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn open_slot(
        &self,
        channel: ChannelId,
        inviter: DeviceId,
        sid: [u8; 16],
    ) -> Result<u32, Refusal> {
        let nameplate = self
            .transaction(|tx, this| {
                Box::pin(async move {
                    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&OPEN_LOCK])
                        .await
                        .map_err(db)?;
                    this.sweep(tx).await?;
                    let counts = tx
                        .query_one(
                            "SELECT COUNT(*), COUNT(*) FILTER (WHERE inviter = $1),
                                    COUNT(*) FILTER (WHERE channel = $2)
                             FROM khub_pairing_slots",
                            &[
                                &inviter.as_bytes().as_slice(),
                                &channel.as_bytes().as_slice(),
                            ],
                        )
                        .await
                        .map_err(db)?;
                    let count = |i: usize| usize::try_from(counts.get::<_, i64>(i)).unwrap_or(0);
                    this.bounds
                        .check_open(&this.metrics, count(0), count(1), count(2))?;
                    let busy: HashSet<u32> = tx
                        .query(
                            "SELECT nameplate FROM khub_pairing_slots
                             UNION SELECT nameplate FROM khub_pairing_resting",
                            &[],
                        )
                        .await
                        .map_err(db)?
                        .iter()
                        .map(|r| r.get::<_, i32>(0) as u32)
                        .collect();
                    let nameplate = pairing::free_nameplate(
                        busy.len(),
                        |n| busy.contains(&n),
                        &mut crate::crypto::os_rng(),
                    )
                    .ok_or_else(pairing::no_free_nameplate)?;
                    tx.execute(
                        "INSERT INTO khub_pairing_slots (nameplate, channel, inviter, sid, expires)
                         VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))",
                        &[
                            &(nameplate as i32),
                            &channel.as_bytes().as_slice(),
                            &inviter.as_bytes().as_slice(),
                            &sid.as_slice(),
                            &this.ttl_secs(),
                        ],
                    )
                    .await
                    .map_err(db)?;
                    Ok(nameplate)
                })
            })
            .await?;
        Metrics::inc(&self.metrics.pairings_started);
        Ok(nameplate)
    }

    async fn claim_slot(&self, nameplate: u32) -> Result<Claimed, Refusal> {
        self.transaction(|tx, _| {
            Box::pin(async move {
                let Some(row) = Self::live(tx, nameplate).await? else {
                    let resting = tx
                        .query_opt(
                            "SELECT 1 FROM khub_pairing_resting WHERE nameplate = $1
                             UNION SELECT 1 FROM khub_pairing_slots WHERE nameplate = $1",
                            &[&(nameplate as i32)],
                        )
                        .await
                        .map_err(db)?;
                    return Err(if resting.is_some() {
                        pairing::gone()
                    } else {
                        pairing::not_found()
                    });
                };
                if row.ended_by.is_some() {
                    return Err(pairing::gone());
                }
                if row.claim_hash.is_some() {
                    return Err(pairing::already_claimed());
                }
                let claim = AccessToken::generate(&mut crate::crypto::os_rng());
                tx.execute(
                    "UPDATE khub_pairing_slots SET claim_hash = $2 WHERE nameplate = $1",
                    &[&(nameplate as i32), &claim.hash().0.as_slice()],
                )
                .await
                .map_err(db)?;
                let sid: [u8; 16] =
                    row.sid.as_slice().try_into().map_err(|_| {
                        store_error(StoreError::Backend("corrupt pairing sid".into()))
                    })?;
                Ok(Claimed {
                    sid,
                    claim,
                    expires_in: Duration::from_secs_f64(row.expires_in.max(0.0)),
                })
            })
        })
        .await
    }

    async fn side_of(&self, nameplate: u32, auth: &SlotAuth) -> Result<Side, Refusal> {
        let row = postgres::bounded(async {
            let client = self.pool.get().await.map_err(postgres::pool_error)?;
            client
                .query_opt(
                    "SELECT channel, inviter, claim_hash FROM khub_pairing_slots
                     WHERE nameplate = $1 AND expires > now()",
                    &[&(nameplate as i32)],
                )
                .await
                .map_err(postgres::db)
        })
        .await
        .map_err(store_error)?
        .ok_or_else(pairing::gone)?;
        let (channel, inviter, claim_hash): (Vec<u8>, Vec<u8>, Option<Vec<u8>>) =
            (row.get(0), row.get(1), row.get(2));
        match auth {
            SlotAuth::Device { channel: c, device }
                if c.as_bytes().as_slice() == channel
                    && device.as_bytes().as_slice() == inviter =>
            {
                Ok(Side::Inviter)
            }
            // As in `Slots::side`: no device can tell which nameplates are open.
            SlotAuth::Device { .. } => Err(pairing::gone()),
            SlotAuth::Claim(token)
                if claim_hash
                    .and_then(|h| <[u8; 32]>::try_from(h).ok())
                    .is_some_and(|h| crate::crypto::token::TokenHash(h).verify(token)) =>
            {
                Ok(Side::Joiner)
            }
            SlotAuth::Claim(_) => Err(pairing::not_a_side()),
        }
    }

    async fn post(&self, nameplate: u32, side: Side, message: Vec<u8>) -> Result<(), Refusal> {
        pairing::check_message(&message)?;
        self.transaction(|tx, this| {
            Box::pin(async move {
                let row = Self::live(tx, nameplate)
                    .await?
                    .ok_or_else(pairing::gone)?;
                if row.ended_by.is_some() {
                    return Err(pairing::gone());
                }
                let to = side_code(other(side));
                let posted: i64 = tx
                    .query_one(
                        "SELECT COUNT(*) FROM khub_pairing_messages WHERE nameplate = $1 AND to_side = $2",
                        &[&(nameplate as i32), &to],
                    )
                    .await
                    .map_err(db)?
                    .get(0);
                this.bounds
                    .check_post(&this.metrics, usize::try_from(posted).unwrap_or(usize::MAX))?;
                match message.first() {
                    Some(&TYPE_FINISH) if side == Side::Inviter => {
                        tx.execute(
                            "UPDATE khub_pairing_slots SET finished = true WHERE nameplate = $1",
                            &[&(nameplate as i32)],
                        )
                        .await
                        .map_err(db)?;
                    }
                    // An abort ends the slot: the other side can still read it.
                    Some(&TYPE_ABORT) => {
                        tx.execute(
                            "UPDATE khub_pairing_slots SET aborted = true, ended_by = $2 WHERE nameplate = $1",
                            &[&(nameplate as i32), &side_code(side)],
                        )
                        .await
                        .map_err(db)?;
                    }
                    _ => {}
                }
                tx.execute(
                    "INSERT INTO khub_pairing_messages (nameplate, to_side, idx, body) VALUES ($1, $2, $3, $4)",
                    &[&(nameplate as i32), &to, &(posted as i32), &message],
                )
                .await
                .map_err(db)?;
                Ok(())
            })
        })
        .await?;
        self.bus.pairing_changed(nameplate);
        Ok(())
    }

    async fn poll(
        &self,
        nameplate: u32,
        side: Side,
        after: usize,
        wait: Duration,
    ) -> Result<Received, Refusal> {
        let deadline = Instant::now() + wait;
        let wake = self.bus.pairing_wake(nameplate);
        loop {
            // Register before checking, so a message posted in between still wakes us.
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(received) = self.try_receive(nameplate, side, after).await? {
                return Ok(received);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Received {
                    messages: Vec::new(),
                    next: after,
                    closed: false,
                });
            }
            let _ = tokio::time::timeout((deadline - now).min(RECHECK), notified).await;
        }
    }

    async fn try_receive(
        &self,
        nameplate: u32,
        side: Side,
        after: usize,
    ) -> Result<Option<Received>, Refusal> {
        let (received, buried) = self
            .transaction(|tx, this| {
                Box::pin(async move {
                    let row = Self::live(tx, nameplate).await?.ok_or_else(pairing::gone)?;
                    let queue: Vec<Vec<u8>> = tx
                        .query(
                            "SELECT body FROM khub_pairing_messages
                             WHERE nameplate = $1 AND to_side = $2 ORDER BY idx",
                            &[&(nameplate as i32), &side_code(side)],
                        )
                        .await
                        .map_err(db)?
                        .iter()
                        .map(|r| r.get(0))
                        .collect();
                    let closed = row.ended_by.is_some_and(|s| s != side_code(side));
                    if queue.len() <= after && !closed {
                        return Ok((None, false));
                    }
                    if closed {
                        // The other side ended it and this one has now read everything.
                        this.bury(tx, nameplate).await?;
                    }
                    let next = queue.len();
                    Ok((
                        Some(Received {
                            messages: queue.into_iter().skip(after).collect(),
                            next,
                            closed,
                        }),
                        closed,
                    ))
                })
            })
            .await?;
        if buried {
            self.bus.pairing_changed(nameplate);
        }
        Ok(received)
    }

    async fn end_slot(&self, nameplate: u32, side: Side) -> Result<(), Refusal> {
        self.transaction(|tx, this| {
            Box::pin(async move {
                let row = Self::live(tx, nameplate).await?.ok_or_else(pairing::gone)?;
                match row.ended_by {
                    Some(first) if first != side_code(side) => this.bury(tx, nameplate).await,
                    _ => {
                        tx.execute(
                            "UPDATE khub_pairing_slots SET ended_by = $2 WHERE nameplate = $1",
                            &[&(nameplate as i32), &side_code(side)],
                        )
                        .await
                        .map_err(db)?;
                        // Nobody else can still be waiting for an unclaimed slot.
                        if row.claim_hash.is_none() {
                            this.bury(tx, nameplate).await?;
                        }
                        Ok(())
                    }
                }
            })
        })
        .await?;
        self.bus.pairing_changed(nameplate);
        Ok(())
    }
}

impl Mailbox for PgMailbox {
    fn open(
        &self,
        channel: ChannelId,
        inviter: DeviceId,
        sid: [u8; 16],
    ) -> BoxFuture<'_, Result<u32, Refusal>> {
        Box::pin(self.open_slot(channel, inviter, sid))
    }

    fn claim(&self, nameplate: u32) -> BoxFuture<'_, Result<Claimed, Refusal>> {
        Box::pin(self.claim_slot(nameplate))
    }

    fn side<'a>(
        &'a self,
        nameplate: u32,
        auth: &'a SlotAuth,
    ) -> BoxFuture<'a, Result<Side, Refusal>> {
        Box::pin(self.side_of(nameplate, auth))
    }

    fn send(
        &self,
        nameplate: u32,
        side: Side,
        message: Vec<u8>,
    ) -> BoxFuture<'_, Result<(), Refusal>> {
        Box::pin(self.post(nameplate, side, message))
    }

    fn receive(
        &self,
        nameplate: u32,
        side: Side,
        after: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Received, Refusal>> {
        Box::pin(self.poll(nameplate, side, after, wait))
    }

    fn end(&self, nameplate: u32, side: Side) -> BoxFuture<'_, Result<(), Refusal>> {
        Box::pin(self.end_slot(nameplate, side))
    }

    fn tick(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Err(e) = self.transaction(|tx, this| Box::pin(this.sweep(tx))).await {
                tracing::warn!(error = %e.message, "could not sweep expired pairing slots");
            }
        })
    }
}
