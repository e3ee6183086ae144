//! The embedded default [`Store`]: one SQLite file in WAL mode.
//!
//! All writes go through one writer thread that **group-commits**: it takes
//! every write waiting in its queue (up to [`MAX_BATCH`]), applies each inside
//! its own savepoint (so one failing write does not undo the others), commits
//! once with `synchronous = FULL`, and only then answers each caller. The relay
//! acks a publish after that answer, so an acked envelope survives a crash or a
//! power cut, and a burst of publishes costs one fsync rather than one each.
//! Reads use a second connection on Tokio's blocking pool; WAL lets them run
//! beside the writer.

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, params};

use super::{Append, Appended, BoxFuture, DeviceRecord, Store, StoreError, StoredEnvelope};
use crate::crypto::token::TokenHash;
use crate::ids::{ChannelId, DeviceId};

/// Most writes committed in one transaction.
pub const MAX_BATCH: usize = 512;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS channels (
    id      BLOB PRIMARY KEY,
    head    INTEGER NOT NULL,   -- newest sequence number; never decreases
    bytes   INTEGER NOT NULL,   -- bytes of envelopes currently stored (quota)
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    channel    BLOB NOT NULL,
    device     BLOB NOT NULL,
    token_hash BLOB NOT NULL,   -- SHA-256 of the access token; never the token
    revoked    INTEGER NOT NULL DEFAULT 0,
    joined     INTEGER NOT NULL,
    UNIQUE (channel, device)
);
CREATE TABLE IF NOT EXISTS envelopes (
    channel    BLOB NOT NULL,
    seq        INTEGER NOT NULL,
    sender     BLOB NOT NULL,
    sender_seq INTEGER NOT NULL,
    body       BLOB NOT NULL,   -- the sealed envelope, opaque to the relay
    stored     INTEGER NOT NULL,
    PRIMARY KEY (channel, seq),
    UNIQUE (channel, sender, sender_seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS envelopes_stored ON envelopes (stored);
CREATE TABLE IF NOT EXISTS quota_blocked (  -- a sender's oldest envelope refused for quota
    channel    BLOB NOT NULL,
    sender     BLOB NOT NULL,
    sender_seq INTEGER NOT NULL,
    PRIMARY KEY (channel, sender)
) WITHOUT ROWID;
";

/// Runs inside the writer's transaction (or is told there is none, `None`);
/// returns what to tell the caller once the commit outcome is known, and whether
/// the write itself succeeded.
type WriteJob = Box<dyn FnOnce(Option<&Connection>) -> (Reply, bool) + Send>;
/// Runs on the writer thread after a successful commit, in commit order.
type Hook<T> = Box<dyn FnOnce(&T) + Send>;
/// Told the commit outcome; answers the caller.
type Reply = Box<dyn FnOnce(Result<(), String>) + Send>;

/// When a commit counts as durable, and so when the relay acks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `synchronous = FULL`: every commit is fsynced. An acked envelope survives
    /// a crash of the relay, the OS or the machine. The default.
    #[default]
    Full,
    /// `synchronous = NORMAL` (WAL): commits reach the OS at once and the disk at
    /// checkpoints. An acked envelope survives a crash or kill of the relay, not
    /// a power cut or OS crash. Several times the throughput on slow disks.
    Normal,
}

impl Durability {
    fn pragma(self) -> &'static str {
        match self {
            Self::Full => "FULL",
            Self::Normal => "NORMAL",
        }
    }
}

/// SQLite-backed store. Cheap to share behind an `Arc`.
pub struct SqliteStore {
    writer: Mutex<mpsc::Sender<WriteJob>>,
    reader: Arc<Mutex<Connection>>,
    senders: Arc<Mutex<Senders>>,
}

/// What appends check about a sender besides its exact sequence number: the
/// highest it has stored and its oldest quota refusal. Kept by the writer
/// thread (the only writer) so appends need no query for them; loaded from the
/// database on first use, and forgotten whenever a batch rolls back.
#[derive(Default)]
struct Senders(std::collections::HashMap<(ChannelId, DeviceId), SenderState>);

#[derive(Debug, Clone, Copy)]
struct SenderState {
    highest: u64,
    quota_blocked: Option<u64>,
}

/// Senders remembered at most; past it the map starts over (and reloads).
const MAX_SENDERS: usize = 100_000;

impl Senders {
    fn get(
        &mut self,
        conn: &Connection,
        channel: ChannelId,
        sender: DeviceId,
    ) -> Result<&mut SenderState, StoreError> {
        if !self.0.contains_key(&(channel, sender)) {
            if self.0.len() >= MAX_SENDERS {
                self.0.clear();
            }
            let key = params![channel.as_bytes(), sender.as_bytes()];
            let highest: Option<i64> = conn
                .prepare_cached(
                    "SELECT MAX(sender_seq) FROM envelopes WHERE channel = ?1 AND sender = ?2",
                )
                .map_err(backend)?
                .query_row(key, |r| r.get(0))
                .map_err(backend)?;
            let quota_blocked: Option<i64> = conn
                .prepare_cached(
                    "SELECT sender_seq FROM quota_blocked WHERE channel = ?1 AND sender = ?2",
                )
                .map_err(backend)?
                .query_row(key, |r| r.get(0))
                .optional()
                .map_err(backend)?;
            self.0.insert(
                (channel, sender),
                SenderState {
                    highest: highest.unwrap_or(0) as u64,
                    quota_blocked: quota_blocked.map(|b| b as u64),
                },
            );
        }
        Ok(self.0.get_mut(&(channel, sender)).expect("just inserted"))
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn connect(path: &Path, durability: Durability) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(backend)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(backend)?;
    conn.pragma_update(None, "synchronous", durability.pragma())
        .map_err(backend)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(backend)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(backend)?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and starts the writer thread.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, Durability::Full)
    }

    /// Opens with a chosen [`Durability`].
    pub fn open_with(path: &Path, durability: Durability) -> Result<Self, StoreError> {
        let writer_conn = connect(path, durability)?;
        writer_conn.execute_batch(SCHEMA).map_err(backend)?;
        let reader = connect(path, durability)?;
        let (tx, rx) = mpsc::channel::<WriteJob>();
        let senders = Arc::new(Mutex::new(Senders::default()));
        let forget = Arc::clone(&senders);
        std::thread::Builder::new()
            .name("khub-sqlite-writer".into())
            .spawn(move || writer_loop(writer_conn, rx, forget))
            .map_err(backend)?;
        Ok(Self {
            writer: Mutex::new(tx),
            reader: Arc::new(Mutex::new(reader)),
            senders,
        })
    }

    fn write<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> BoxFuture<'_, Result<T, StoreError>> {
        self.write_hooked(op, None)
    }

    /// A write whose `hook` runs on the writer thread right after the commit,
    /// in commit order, before the caller is answered.
    fn write_hooked<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        hook: Option<Hook<T>>,
    ) -> BoxFuture<'_, Result<T, StoreError>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: WriteJob = Box::new(move |conn| {
            let result = match conn {
                Some(conn) => op(conn),
                None => Err(StoreError::Backend("could not begin a transaction".into())),
            };
            // Every operation checks before it writes, so only a backend failure
            // can leave a write half done: that aborts the whole group commit.
            let backend_failed = matches!(result, Err(StoreError::Backend(_)));
            let reply: Reply = Box::new(move |commit| {
                let result = commit.map_err(StoreError::Backend).and(result);
                if let (Ok(value), Some(hook)) = (&result, hook) {
                    hook(value);
                }
                let _ = tx.send(result);
            });
            (reply, !backend_failed)
        });
        let sent = self
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job)
            .is_ok();
        Box::pin(async move {
            if !sent {
                return Err(StoreError::Backend("the SQLite writer has stopped".into()));
            }
            rx.await.unwrap_or_else(|_| {
                Err(StoreError::Backend("the SQLite writer has stopped".into()))
            })
        })
    }

    fn read_with<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> BoxFuture<'_, Result<T, StoreError>> {
        let reader = Arc::clone(&self.reader);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                op(&reader.lock().unwrap_or_else(|e| e.into_inner()))
            })
            .await
            .map_err(backend)?
        })
    }
}

/// Group commit: block for one write, take whatever else is queued, apply them
/// in one transaction, commit once, then answer everyone. Operations refuse
/// (exists, over quota, conflict…) before writing anything, so no per-operation
/// savepoint is needed; a backend failure rolls the whole batch back and every
/// caller in it gets the error (none of them was acked).
fn writer_loop(conn: Connection, rx: mpsc::Receiver<WriteJob>, senders: Arc<Mutex<Senders>>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let began = cached(&conn, "BEGIN IMMEDIATE")
            .map(drop)
            .map_err(|e| e.to_string());
        let mut replies = Vec::with_capacity(batch.len());
        let mut aborted = false;
        for job in batch {
            if began.is_err() {
                let (reply, _) = job(None);
                replies.push(reply);
                continue;
            }
            let (reply, sound) = job(Some(&conn));
            if !sound {
                aborted = true;
            }
            replies.push(reply);
        }
        let outcome = if aborted {
            Err("a write failed; the batch was rolled back".to_owned())
        } else {
            began.and_then(|()| cached(&conn, "COMMIT").map(drop).map_err(|e| e.to_string()))
        };
        if outcome.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
            // What the batch's appends remembered was rolled back with them.
            senders.lock().unwrap_or_else(|e| e.into_inner()).0.clear();
        }
        for reply in replies {
            reply(outcome.clone());
        }
    }
}

/// One append inside the writer's transaction. A sequence number above the
/// sender's highest is new, so it costs one statement for numbering and quota
/// and one insert; only a number at or below it (a retry) is looked up.
fn append_op(
    conn: &Connection,
    senders: &Mutex<Senders>,
    a: Append,
) -> Result<Appended, StoreError> {
    let mut senders = senders.lock().unwrap_or_else(|e| e.into_inner());
    let state = senders.get(conn, a.channel, a.sender)?;
    if a.sender_seq <= state.highest {
        let existing = conn
            .prepare_cached("SELECT seq, body FROM envelopes WHERE channel = ?1 AND sender = ?2 AND sender_seq = ?3")
            .map_err(backend)?
            .query_row(params![a.channel.as_bytes(), a.sender.as_bytes(), a.sender_seq as i64], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .optional()
            .map_err(backend)?;
        return match existing {
            Some((seq, body)) if body == a.envelope.as_ref() => Ok(Appended {
                seq: seq as u64,
                duplicate: true,
            }),
            Some(_) => Err(StoreError::Conflict {
                sender_seq: a.sender_seq,
            }),
            None => Err(StoreError::OutOfOrder {
                sender_seq: a.sender_seq,
                highest: state.highest,
            }),
        };
    }
    if state.quota_blocked.is_some_and(|b| a.sender_seq > b) {
        return Err(over_quota(conn, &a)?);
    }
    // Take the next number and count the bytes in one statement; no row
    // means no such channel or over quota (told apart below, off the hot path).
    let size = a.envelope.len() as i64;
    let quota = a.quota.min(i64::MAX as u64) as i64;
    let seq: Option<i64> = conn
        .prepare_cached(
            "UPDATE channels SET head = head + 1, bytes = bytes + ?2
                     WHERE id = ?1 AND bytes + ?2 <= ?3 RETURNING head",
        )
        .map_err(backend)?
        .query_row(params![a.channel.as_bytes(), size, quota], |r| r.get(0))
        .optional()
        .map_err(backend)?;
    let Some(seq) = seq else {
        let refusal = over_quota(conn, &a)?;
        if matches!(refusal, StoreError::OverQuota { .. }) {
            // Later envelopes of this sender wait for this one.
            let blocked = state
                .quota_blocked
                .map_or(a.sender_seq, |b| b.min(a.sender_seq));
            conn.prepare_cached(
                "INSERT INTO quota_blocked (channel, sender, sender_seq) VALUES (?1, ?2, ?3)
                 ON CONFLICT (channel, sender) DO UPDATE SET sender_seq = excluded.sender_seq",
            )
            .map_err(backend)?
            .execute(params![
                a.channel.as_bytes(),
                a.sender.as_bytes(),
                blocked as i64
            ])
            .map_err(backend)?;
            state.quota_blocked = Some(blocked);
        }
        return Err(refusal);
    };
    if state.quota_blocked.take().is_some() {
        conn.prepare_cached("DELETE FROM quota_blocked WHERE channel = ?1 AND sender = ?2")
            .map_err(backend)?
            .execute(params![a.channel.as_bytes(), a.sender.as_bytes()])
            .map_err(backend)?;
    }
    conn.prepare_cached(
                "INSERT INTO envelopes (channel, seq, sender, sender_seq, body, stored) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .map_err(backend)?
            .execute(params![
                a.channel.as_bytes(),
                seq,
                a.sender.as_bytes(),
                a.sender_seq as i64,
                a.envelope.as_ref(),
                a.now as i64
            ])
            .map_err(backend)?;
    state.highest = a.sender_seq;
    Ok(Appended {
        seq: seq as u64,
        duplicate: false,
    })
}

/// The refusal for an append that does not fit: over quota, or no such channel.
fn over_quota(conn: &Connection, a: &Append) -> Result<StoreError, StoreError> {
    let used: Option<i64> = conn
        .prepare_cached("SELECT bytes FROM channels WHERE id = ?1")
        .map_err(backend)?
        .query_row(params![a.channel.as_bytes()], |r| r.get(0))
        .optional()
        .map_err(backend)?;
    Ok(match used {
        Some(used) => StoreError::OverQuota {
            used: used as u64,
            quota: a.quota,
        },
        None => StoreError::NotFound,
    })
}

/// Adds a device row (channel creation and admission both do).
fn insert_device(
    conn: &Connection,
    channel: ChannelId,
    device: DeviceId,
    token_hash: TokenHash,
    now: u64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO devices (channel, device, token_hash, joined) VALUES (?1, ?2, ?3, ?4)",
    )
    .map_err(backend)?
    .execute(params![
        channel.as_bytes(),
        device.as_bytes(),
        token_hash.0,
        now as i64
    ])
    .map_err(backend)?;
    Ok(())
}

/// Runs a parameterless statement from the statement cache.
fn cached(conn: &Connection, sql: &str) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute([])
}

fn record(device: Vec<u8>, token_hash: Vec<u8>, revoked: bool) -> Result<DeviceRecord, StoreError> {
    Ok(DeviceRecord {
        device: DeviceId::from_slice(&device).ok_or_else(|| backend("corrupt device id"))?,
        token_hash: TokenHash(
            token_hash
                .try_into()
                .map_err(|_| backend("corrupt token hash"))?,
        ),
        revoked,
    })
}

impl Store for SqliteStore {
    fn create_channel(
        &self,
        channel: ChannelId,
        device: DeviceId,
        token_hash: TokenHash,
        now: u64,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.write(move |conn| {
            let inserted = conn
                .execute(
                    "INSERT OR IGNORE INTO channels (id, head, bytes, created) VALUES (?1, 0, 0, ?2)",
                    params![channel.as_bytes(), now as i64],
                )
                .map_err(backend)?;
            if inserted == 0 {
                return Err(StoreError::Exists);
            }
            insert_device(conn, channel, device, token_hash, now)
        })
    }

    fn device(
        &self,
        channel: ChannelId,
        device: DeviceId,
    ) -> BoxFuture<'_, Result<Option<DeviceRecord>, StoreError>> {
        self.read_with(move |conn| {
            let row = conn
                .prepare_cached("SELECT device, token_hash, revoked FROM devices WHERE channel = ?1 AND device = ?2")
                .map_err(backend)?
                .query_row(params![channel.as_bytes(), device.as_bytes()], |r| {
                    Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?, r.get::<_, bool>(2)?))
                })
                .optional()
                .map_err(backend)?;
            row.map(|(d, h, revoked)| record(d, h, revoked)).transpose()
        })
    }

    fn devices(&self, channel: ChannelId) -> BoxFuture<'_, Result<Vec<DeviceRecord>, StoreError>> {
        self.read_with(move |conn| {
            let exists = conn
                .prepare_cached("SELECT 1 FROM channels WHERE id = ?1")
                .map_err(backend)?
                .exists(params![channel.as_bytes()])
                .map_err(backend)?;
            if !exists {
                return Err(StoreError::NotFound);
            }
            let mut stmt = conn
                .prepare_cached("SELECT device, token_hash, revoked FROM devices WHERE channel = ?1 ORDER BY rowid")
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![channel.as_bytes()], |r| {
                    Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?, r.get::<_, bool>(2)?))
                })
                .map_err(backend)?;
            rows.map(|row| {
                let (d, h, revoked) = row.map_err(backend)?;
                record(d, h, revoked)
            })
            .collect()
        })
    }

    fn admit(
        &self,
        channel: ChannelId,
        device: DeviceId,
        token_hash: TokenHash,
        max_devices: usize,
        now: u64,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.write(move |conn| {
            let active: Option<i64> = conn
                .query_row(
                    "SELECT (SELECT COUNT(*) FROM devices WHERE channel = ?1 AND revoked = 0)
                     FROM channels WHERE id = ?1",
                    params![channel.as_bytes()],
                    |r| r.get(0),
                )
                .optional()
                .map_err(backend)?;
            let active = active.ok_or(StoreError::NotFound)?;
            let known = conn
                .prepare_cached("SELECT 1 FROM devices WHERE channel = ?1 AND device = ?2")
                .map_err(backend)?
                .exists(params![channel.as_bytes(), device.as_bytes()])
                .map_err(backend)?;
            if known {
                return Err(StoreError::Exists);
            }
            if active as usize >= max_devices {
                return Err(StoreError::ChannelFull(max_devices));
            }
            insert_device(conn, channel, device, token_hash, now)?;
            Ok(())
        })
    }

    fn revoke(
        &self,
        channel: ChannelId,
        device: DeviceId,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.write(move |conn| {
            let changed = conn
                .execute(
                    "UPDATE devices SET revoked = 1 WHERE channel = ?1 AND device = ?2",
                    params![channel.as_bytes(), device.as_bytes()],
                )
                .map_err(backend)?;
            if changed == 0 {
                Err(StoreError::NotFound)
            } else {
                Ok(())
            }
        })
    }

    fn append(&self, a: Append) -> BoxFuture<'_, Result<Appended, StoreError>> {
        let senders = Arc::clone(&self.senders);
        self.write(move |conn| append_op(conn, &senders, a))
    }

    fn append_then(
        &self,
        a: Append,
        on_commit: super::OnCommit,
    ) -> BoxFuture<'_, Result<Appended, StoreError>> {
        let hook: Box<dyn FnOnce(&Appended) + Send> =
            Box::new(move |appended| on_commit(*appended));
        let senders = Arc::clone(&self.senders);
        self.write_hooked(move |conn| append_op(conn, &senders, a), Some(hook))
    }

    fn read(
        &self,
        channel: ChannelId,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<StoredEnvelope>, StoreError>> {
        self.read_with(move |conn| {
            let mut stmt = conn
                .prepare_cached("SELECT seq, body FROM envelopes WHERE channel = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3")
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![channel.as_bytes(), after.min(i64::MAX as u64) as i64, limit as i64], |r| {
                    Ok(StoredEnvelope {
                        seq: r.get::<_, i64>(0)? as u64,
                        envelope: Bytes::from(r.get::<_, Vec<u8>>(1)?),
                    })
                })
                .map_err(backend)?;
            rows.collect::<Result<_, _>>().map_err(backend)
        })
    }

    fn head(&self, channel: ChannelId) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.read_with(move |conn| {
            conn.prepare_cached("SELECT head FROM channels WHERE id = ?1")
                .map_err(backend)?
                .query_row(params![channel.as_bytes()], |r| r.get::<_, i64>(0))
                .optional()
                .map_err(backend)?
                .map(|h| h as u64)
                .ok_or(StoreError::NotFound)
        })
    }

    fn prune(&self, before: u64) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.write(move |conn| {
            conn.execute(
                "UPDATE channels SET bytes = bytes - (
                     SELECT COALESCE(SUM(length(body)), 0) FROM envelopes
                     WHERE envelopes.channel = channels.id AND stored < ?1)",
                params![before as i64],
            )
            .map_err(backend)?;
            let removed = conn
                .execute(
                    "DELETE FROM envelopes WHERE stored < ?1",
                    params![before as i64],
                )
                .map_err(backend)?;
            Ok(removed as u64)
        })
    }

    fn health(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        self.read_with(|conn| conn.query_row("SELECT 1", [], |_| Ok(())).map_err(backend))
    }

    fn stored_bytes(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.read_with(|conn| {
            conn.query_row("SELECT COALESCE(SUM(bytes), 0) FROM channels", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| u64::try_from(n).unwrap_or(0))
            .map_err(backend)
        })
    }
}
