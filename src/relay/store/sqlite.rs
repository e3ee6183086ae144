//! The embedded default [`Store`]: one SQLite file in WAL mode.
//!
//! All writes go through one writer thread that **group-commits**: it takes
//! every write waiting in its queue (up to [`MAX_BATCH`]), applies them in one
//! transaction, commits once with `synchronous = FULL`, and only then answers
//! each caller. The relay acks a publish after that answer, so an acked
//! envelope survives a crash or a power cut, and a burst of publishes costs one
//! fsync rather than one each. Reads use a second connection on Tokio's
//! blocking pool; WAL lets them run beside the writer.
//!
//! The hot path is one `INSERT` per envelope: the writer remembers each
//! channel's head and stored bytes and each sender's highest number (`Memo`),
//! and writes a channel's row once per batch, just before the commit. No
//! statement on that path needs SQLite's per-statement undo journal (the
//! envelope insert and the row write-back are `OR FAIL`; a failure rolls the
//! whole batch back instead, see `writer_loop`): its allocations and frees,
//! per append, were a sixth of the relay's CPU.
//!
//! What a retry is checked against — each envelope's (sender, sender
//! number) — is indexed in bulk, not per append: `sent` holds it for a
//! channel's envelopes up to `channels.indexed`. A retry indexes the newer
//! ones first; a sender's first append since the writer loaded it walks them
//! (at most [`INDEX_AFTER`] plus a batch). A per-append index dirtied one
//! page per sender in every commit, half of what a commit wrote to the WAL
//! and fsynced.

use std::collections::HashMap;
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
    created INTEGER NOT NULL,
    indexed INTEGER NOT NULL DEFAULT 0  -- envelopes up to this number are in `sent`
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
    PRIMARY KEY (channel, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sent (  -- who sent each envelope, for retries: see `index_op`
    channel    BLOB NOT NULL,
    sender     BLOB NOT NULL,
    sender_seq INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    PRIMARY KEY (channel, sender, sender_seq)
) WITHOUT ROWID;
-- Retention walks each channel from its oldest envelope instead (prune_op):
-- one B-tree fewer to update on every append. Files from before drop it.
DROP INDEX IF EXISTS envelopes_stored;
CREATE TABLE IF NOT EXISTS quota_blocked (  -- a sender's oldest envelope refused for quota
    channel    BLOB NOT NULL,
    sender     BLOB NOT NULL,
    sender_seq INTEGER NOT NULL,
    PRIMARY KEY (channel, sender)
) WITHOUT ROWID;
";

/// Runs inside the writer's transaction (or is told it will not be applied,
/// `None`); returns what to tell the caller once the commit outcome is known,
/// and whether the write itself succeeded.
type WriteJob = Box<dyn FnOnce(Option<&mut Writer>) -> (Reply, bool) + Send>;
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
///
/// Dropping it waits for the writer thread to finish its batch and close its
/// connection; the last connection to close folds the WAL back into the file
/// and deletes it, so a relay that stopped leaves one self-contained file.
pub struct SqliteStore {
    writer: Mutex<mpsc::Sender<WriteJob>>,
    thread: Option<std::thread::JoinHandle<()>>,
    reader: Arc<Mutex<Connection>>,
}

/// The writer thread's connection and what it remembers, as every write sees them.
struct Writer {
    conn: Connection,
    memo: Memo,
}

/// The writer thread's state, and the file lock that makes it the only writer:
/// let go when the thread ends, after its connection closed.
struct Owner {
    writer: Writer,
    _lock: super::file_lock::FileLock,
}

/// What appends check and update besides the envelope itself, kept by the
/// writer thread (the only writer) so that an append needs no other statement:
/// each channel's head and stored bytes, and each sender's highest number and
/// oldest quota refusal. Loaded from the database on first use; channel
/// tallies a batch changed are written back just before its commit; all of it
/// is forgotten when a batch rolls back.
#[derive(Default)]
struct Memo {
    channels: HashMap<ChannelId, Tally>,
    senders: HashMap<(ChannelId, DeviceId), SenderState>,
    /// The channels this batch looked at, for the write-back: a commit costs
    /// what its batch touched, not every channel remembered.
    touched: Vec<ChannelId>,
}

/// A channel's row as the current batch leaves it.
#[derive(Debug, Clone, Copy)]
struct Tally {
    head: u64,
    bytes: u64,
    /// Envelopes up to this number are in `sent`.
    indexed: u64,
    /// The head, bytes and indexed mark the row holds (as loaded or last written).
    row: (u64, u64, u64),
    /// Listed in `Memo::touched`.
    touched: bool,
}

#[derive(Debug, Clone, Copy)]
struct SenderState {
    highest: u64,
    quota_blocked: Option<u64>,
}

/// Channels and senders remembered at most; past it, between batches, the
/// memo starts over (and reloads what it needs).
const MAX_REMEMBERED: usize = 100_000;

impl Memo {
    /// Writes the changed channel rows into the current transaction, and
    /// indexes a channel's envelopes in `sent` once [`INDEX_AFTER`] of them
    /// are not. The row must still hold what the memo loaded: another process
    /// writing to the same file is caught here (its batch fails and the memo
    /// reloads) instead of numbering two envelopes alike.
    fn write_back(&mut self, conn: &Connection) -> Result<(), StoreError> {
        let changed = |t: &Tally| t.head != t.row.0 || t.indexed != t.row.2;
        // Left listed if a write fails: the rollback's `forget` clears it.
        for &channel in &self.touched {
            let Some(tally) = self.channels.get_mut(&channel) else {
                continue;
            };
            tally.touched = false;
            if !changed(tally) {
                continue;
            }
            if tally.head - tally.indexed >= INDEX_AFTER {
                tally.index_rest(conn, channel)?;
            }
            let changed = conn
                .prepare_cached(
                    "UPDATE OR FAIL channels SET head = ?2, bytes = bytes + ?3, indexed = ?5
                     WHERE id = ?1 AND head = ?4",
                )
                .map_err(backend)?
                .execute(params![
                    channel.as_bytes(),
                    tally.head as i64,
                    (tally.bytes - tally.row.1) as i64,
                    tally.row.0 as i64,
                    tally.indexed as i64
                ])
                .map_err(backend)?;
            if changed != 1 {
                return Err(backend(
                    "a channel's row changed under this relay: is another khub serve using this database file?",
                ));
            }
            tally.row = (tally.head, tally.bytes, tally.indexed);
        }
        self.touched.clear();
        Ok(())
    }

    /// After a commit: keeps the memo bounded.
    fn trim(&mut self) {
        if self.channels.len() > MAX_REMEMBERED {
            self.channels.clear();
        }
        if self.senders.len() > MAX_REMEMBERED {
            self.senders.clear();
        }
    }

    /// After a rollback: what the batch changed is gone from the database too.
    fn forget(&mut self) {
        self.channels.clear();
        self.senders.clear();
        self.touched.clear();
    }
}

impl Tally {
    /// Indexes `channel`'s envelopes past the mark and moves the mark to the
    /// head (in the row with the batch's write-back).
    fn index_rest(&mut self, conn: &Connection, channel: ChannelId) -> Result<(), StoreError> {
        index_op(conn, channel, self.indexed)?;
        self.indexed = self.head;
        Ok(())
    }
}

/// `channel`'s tally, loaded if needed and listed in `touched` for the
/// write-back; `NotFound` if there is no such channel.
fn tally<'m>(
    channels: &'m mut HashMap<ChannelId, Tally>,
    touched: &mut Vec<ChannelId>,
    conn: &Connection,
    channel: ChannelId,
) -> Result<&'m mut Tally, StoreError> {
    if let std::collections::hash_map::Entry::Vacant(slot) = channels.entry(channel) {
        let row: Option<(i64, i64, i64)> = conn
            .prepare_cached("SELECT head, bytes, indexed FROM channels WHERE id = ?1")
            .map_err(backend)?
            .query_row(params![channel.as_bytes()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()
            .map_err(backend)?;
        let (head, bytes, indexed) = row.ok_or(StoreError::NotFound)?;
        let row = (head as u64, bytes.max(0) as u64, indexed.max(0) as u64);
        slot.insert(Tally {
            head: row.0,
            bytes: row.1,
            indexed: row.2.min(row.0),
            row,
            touched: false,
        });
    }
    let tally = channels.get_mut(&channel).expect("just inserted");
    if !tally.touched {
        tally.touched = true;
        touched.push(channel);
    }
    Ok(tally)
}

/// `sender`'s state in `channel` (whose envelopes up to `indexed` are in
/// `sent`), loaded if needed.
fn sender_state<'m>(
    senders: &'m mut HashMap<(ChannelId, DeviceId), SenderState>,
    conn: &Connection,
    channel: ChannelId,
    sender: DeviceId,
    indexed: u64,
) -> Result<&'m mut SenderState, StoreError> {
    if let std::collections::hash_map::Entry::Vacant(slot) = senders.entry((channel, sender)) {
        let key = params![channel.as_bytes(), sender.as_bytes()];
        let highest: Option<i64> = conn
            .prepare_cached(
                "SELECT MAX(m) FROM (
                     SELECT MAX(sender_seq) AS m FROM sent WHERE channel = ?1 AND sender = ?2
                     UNION ALL
                     SELECT MAX(sender_seq) FROM envelopes
                     WHERE channel = ?1 AND seq > ?3 AND sender = ?2)",
            )
            .map_err(backend)?
            .query_row(
                params![channel.as_bytes(), sender.as_bytes(), indexed as i64],
                |r| r.get(0),
            )
            .map_err(backend)?;
        let quota_blocked: Option<i64> = conn
            .prepare_cached(
                "SELECT sender_seq FROM quota_blocked WHERE channel = ?1 AND sender = ?2",
            )
            .map_err(backend)?
            .query_row(key, |r| r.get(0))
            .optional()
            .map_err(backend)?;
        slot.insert(SenderState {
            highest: highest.unwrap_or(0) as u64,
            quota_blocked: quota_blocked.map(|b| b as u64),
        });
    }
    Ok(senders.get_mut(&(channel, sender)).expect("just inserted"))
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// What `PRAGMA user_version` says of a file this khub has prepared.
const SCHEMA_VERSION: i64 = 1;

/// Creates the tables, or brings a file from an older khub up to
/// [`SCHEMA_VERSION`] in one transaction. Version 1 moved the per-append
/// index `UNIQUE (channel, sender, sender_seq)` off `envelopes` (the table
/// is rebuilt without it: a copy of every envelope, once) into `sent`.
fn prepare(conn: &mut Connection) -> Result<(), StoreError> {
    let version = schema_version(conn)?;
    conn.execute_batch(SCHEMA).map_err(backend)?;
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(backend)?;
    let has = |sql: &str| -> Result<bool, StoreError> {
        tx.query_row(sql, [], |r| r.get::<_, i64>(0))
            .map(|n| n > 0)
            .map_err(backend)
    };
    if !has("SELECT COUNT(*) FROM pragma_table_info('channels') WHERE name = 'indexed'")? {
        tx.execute_batch("ALTER TABLE channels ADD COLUMN indexed INTEGER NOT NULL DEFAULT 0")
            .map_err(backend)?;
    }
    if has("SELECT COUNT(*) FROM sqlite_master WHERE name = 'envelopes'
             AND sql LIKE '%UNIQUE (channel, sender, sender_seq)%'")?
    {
        tracing::info!(
            "upgrading the database file: copying its envelopes into a table without the per-append sender index (once)"
        );
        tx.execute_batch("ALTER TABLE envelopes RENAME TO envelopes_before")
            .map_err(backend)?;
        tx.execute_batch(SCHEMA).map_err(backend)?;
        tx.execute_batch(
            "INSERT INTO envelopes (channel, seq, sender, sender_seq, body, stored)
                 SELECT channel, seq, sender, sender_seq, body, stored FROM envelopes_before;
             DROP TABLE envelopes_before;",
        )
        .map_err(backend)?;
    }
    tx.execute_batch(&format!(
        "INSERT OR REPLACE INTO sent (channel, sender, sender_seq, seq)
             SELECT channel, sender, sender_seq, seq FROM envelopes;
         UPDATE channels SET indexed = head;
         PRAGMA user_version = {SCHEMA_VERSION};"
    ))
    .map_err(backend)?;
    tx.commit().map_err(backend)
}

/// The file's `PRAGMA user_version`, refusing a file from a newer khub,
/// which this one would read and write as a layout it does not know.
fn schema_version(conn: &Connection) -> Result<i64, StoreError> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(backend)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Backend(format!(
            "the database file has schema version {version}, newer than this khub's \
             {SCHEMA_VERSION}: run the khub that wrote it, or a newer one"
        )));
    }
    Ok(version)
}

/// A connection to the file, refused before anything is written to it if a
/// newer khub has upgraded it.
fn connect(path: &Path, durability: Durability) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(backend)?;
    schema_version(&conn)?;
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
    ///
    /// Refuses, after waiting up to 2 s, while another process has the file
    /// open: see `file_lock`.
    pub fn open_with(path: &Path, durability: Durability) -> Result<Self, StoreError> {
        let lock = super::file_lock::acquire(path)?;
        let mut writer_conn = connect(path, durability)?;
        prepare(&mut writer_conn)?;
        let reader = connect(path, durability)?;
        let (tx, rx) = mpsc::channel::<WriteJob>();
        let owner = Owner {
            writer: Writer {
                conn: writer_conn,
                memo: Memo::default(),
            },
            _lock: lock,
        };
        let thread = std::thread::Builder::new()
            .name("khub-sqlite-writer".into())
            .spawn(move || {
                let mut owner = owner;
                writer_loop(&mut owner.writer, &rx);
            })
            .map_err(backend)?;
        Ok(Self {
            writer: Mutex::new(tx),
            thread: Some(thread),
            reader: Arc::new(Mutex::new(reader)),
        })
    }

    fn write<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> BoxFuture<'_, Result<T, StoreError>> {
        self.write_hooked(move |w| op(&w.conn), None)
    }

    /// A write whose `hook` runs on the writer thread right after the commit,
    /// in commit order, before the caller is answered. Wake-ups the hook
    /// announces go out after the whole batch's hooks (`relay::wakeups`).
    fn write_hooked<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut Writer) -> Result<T, StoreError> + Send + 'static,
        hook: Option<Hook<T>>,
    ) -> BoxFuture<'_, Result<T, StoreError>> {
        let (job, rx) = job(op, hook);
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

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Closing the queue ends the writer's loop once its batch is answered.
        *self.writer.lock().unwrap_or_else(|e| e.into_inner()) = mpsc::channel().0;
        if let Some(thread) = self.thread.take() {
            // A commit hook holding the last reference drops the store on the
            // writer thread itself, which then ends on its own.
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

/// `op` as a job for the writer thread, and where its answer will come.
fn job<T: Send + 'static>(
    op: impl FnOnce(&mut Writer) -> Result<T, StoreError> + Send + 'static,
    hook: Option<Hook<T>>,
) -> (
    WriteJob,
    tokio::sync::oneshot::Receiver<Result<T, StoreError>>,
) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: WriteJob = Box::new(move |writer| {
        let result = match writer {
            Some(writer) => op(writer),
            None => Err(StoreError::Backend("not applied: its batch failed".into())),
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
    (job, rx)
}

/// Group commit: block for one write, take whatever else is queued, apply them
/// in one transaction, write back the channel tallies, commit once, then
/// answer everyone. Operations refuse (exists, over quota, conflict…) before
/// writing anything, so a refusal needs no undo. A backend failure — the only
/// way a write can be left half done, since statements are `OR FAIL` — stops
/// the batch: the rest of it is not applied, the transaction rolls back and
/// every caller in it gets the error (none of them was acked).
fn writer_loop(writer: &mut Writer, rx: &mpsc::Receiver<WriteJob>) {
    // Kept from batch to batch: no allocation on the writer per batch.
    let (mut batch, mut replies) = (Vec::with_capacity(MAX_BATCH), Vec::with_capacity(MAX_BATCH));
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut failure = cached(&writer.conn, "BEGIN IMMEDIATE")
            .err()
            .map(|e| format!("could not begin a transaction: {e}"));
        for job in batch.drain(..) {
            let (reply, sound) = job(failure.is_none().then_some(&mut *writer));
            if !sound && failure.is_none() {
                failure = Some("a write failed; the batch was rolled back".to_owned());
            }
            replies.push(reply);
        }
        let outcome = match failure {
            Some(failure) => Err(failure),
            None => writer
                .memo
                .write_back(&writer.conn)
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    cached(&writer.conn, "COMMIT")
                        .map(drop)
                        .map_err(|e| e.to_string())
                }),
        };
        match outcome {
            Ok(()) => writer.memo.trim(),
            Err(_) => {
                let _ = writer.conn.execute_batch("ROLLBACK");
                writer.memo.forget();
            }
        }
        // The hooks' wake-ups go out once per channel, after the last.
        crate::relay::wakeups::together(|| {
            for reply in replies.drain(..) {
                reply(outcome.clone());
            }
        });
    }
}

/// One append inside the writer's transaction. A sequence number above the
/// sender's highest is new: it is numbered and counted in the memo and costs
/// one insert. Only a number at or below it (a retry) is looked up.
fn append_op(writer: &mut Writer, a: Append) -> Result<Appended, StoreError> {
    let Writer { conn, memo } = writer;
    let channel = tally(&mut memo.channels, &mut memo.touched, conn, a.channel)?;
    let used = channel.bytes;
    let state = sender_state(
        &mut memo.senders,
        conn,
        a.channel,
        a.sender,
        channel.indexed,
    )?;
    if a.sender_seq <= state.highest {
        // A retry first indexes what is not yet (written back with the
        // batch), so that it is one lookup, and a run of retries costs no
        // more walking than the appends before them did.
        if channel.indexed < channel.head {
            channel.index_rest(conn, a.channel)?;
        }
        let existing = conn
            .prepare_cached(
                "SELECT seq, body FROM envelopes WHERE channel = ?1 AND seq =
                     (SELECT seq FROM sent WHERE channel = ?1 AND sender = ?2 AND sender_seq = ?3)",
            )
            .map_err(backend)?
            .query_row(
                params![
                    a.channel.as_bytes(),
                    a.sender.as_bytes(),
                    a.sender_seq as i64
                ],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)),
            )
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
    let over_quota = StoreError::OverQuota {
        used,
        quota: a.quota,
    };
    if state.quota_blocked.is_some_and(|b| a.sender_seq > b) {
        return Err(over_quota);
    }
    let size = a.envelope.len() as u64;
    if used.saturating_add(size) > a.quota {
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
        return Err(over_quota);
    }
    if state.quota_blocked.take().is_some() {
        conn.prepare_cached("DELETE FROM quota_blocked WHERE channel = ?1 AND sender = ?2")
            .map_err(backend)?
            .execute(params![a.channel.as_bytes(), a.sender.as_bytes()])
            .map_err(backend)?;
    }
    let seq = channel.head + 1;
    conn.prepare_cached(
        "INSERT OR FAIL INTO envelopes (channel, seq, sender, sender_seq, body, stored) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .map_err(backend)?
    .execute(params![
        a.channel.as_bytes(),
        seq as i64,
        a.sender.as_bytes(),
        a.sender_seq as i64,
        a.envelope.as_ref(),
        a.now as i64
    ])
    .map_err(backend)?;
    channel.head = seq;
    channel.bytes += size;
    state.highest = a.sender_seq;
    Ok(Appended {
        seq,
        duplicate: false,
    })
}

/// Envelopes a channel holds past `channels.indexed` before the writer
/// indexes them in `sent` (`Memo::write_back`; a retry indexes them at
/// once): what a sender's first append since the writer loaded it walks at
/// most, plus one batch.
const INDEX_AFTER: u64 = 1024;

/// Puts who sent each of `channel`'s envelopes after `from` into `sent`.
///
/// A row already there for the same (sender, sender number) can only be one
/// whose envelope is gone: an older khub, run on the file after this one,
/// prunes without dropping rows of `sent`. The new envelope replaces it
/// rather than fail every later batch of the channel.
fn index_op(conn: &Connection, channel: ChannelId, from: u64) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO sent (channel, sender, sender_seq, seq)
         SELECT channel, sender, sender_seq, seq FROM envelopes WHERE channel = ?1 AND seq > ?2",
    )
    .map_err(backend)?
    .execute(params![channel.as_bytes(), from as i64])
    .map_err(backend)?;
    Ok(())
}

/// Channels one retention step looks at, and envelopes it drops at most
/// (unless told otherwise):
/// retention is a series of steps, each one write in a batch, so appends
/// never wait behind all of it.
const PRUNE_CHANNELS: usize = 500;
const PRUNE_ROWS: i64 = 20_000;

/// A stamp further ahead of the relay's clock than this does not hold
/// retention back (a clock that was wrong when the envelope was stored).
const FUTURE_SLACK_SECS: u64 = 24 * 3600;

/// One retention step inside the writer's transaction: for the channels
/// after `after` (by id; empty for the first step), drops each one's
/// envelopes older than its oldest one stored at or after `before`, and counts
/// them off its bytes. Returns how many were dropped and, unless this was the
/// last step, where the next one starts.
///
/// Envelopes are stamped when stored, so a channel's stamps grow with its
/// sequence numbers and each channel is cut at one point, found by walking
/// its primary key from the oldest: the cost is what is dropped, with no index
/// on the stamp. Should the clock step back (by up to a day), envelopes
/// stamped after the step are kept until those before it expire: longer than
/// the retention, never shorter, and a reader never sees a hole. A stamp more
/// than a day ahead of `now` does not stop the cut (it goes with the expired
/// ones before it).
fn prune_op(
    writer: &mut Writer,
    before: u64,
    now: u64,
    after: Vec<u8>,
    rows: i64,
) -> Result<(u64, Option<Vec<u8>>), StoreError> {
    // The rows must hold this batch's tallies before they are counted down,
    // and the memo must not keep the old ones.
    writer.memo.write_back(&writer.conn)?;
    writer.memo.channels.clear();
    let conn = &writer.conn;
    let channels: Vec<Vec<u8>> = conn
        .prepare_cached("SELECT id FROM channels WHERE id > ?1 ORDER BY id LIMIT ?2")
        .map_err(backend)?
        .query_map(params![after, PRUNE_CHANNELS as i64], |r| r.get(0))
        .map_err(backend)?
        .collect::<Result<_, _>>()
        .map_err(backend)?;
    let full = channels.len() == PRUNE_CHANNELS;
    let clamp = |t: u64| t.min(i64::MAX as u64) as i64;
    let (before, latest) = (clamp(before), clamp(now.saturating_add(FUTURE_SLACK_SECS)));
    let mut removed = 0;
    let mut done = after;
    for channel in channels {
        let kept: Option<i64> = conn
            .prepare_cached(
                "SELECT seq FROM envelopes WHERE channel = ?1 AND stored >= ?2 AND stored <= ?3
                 ORDER BY seq LIMIT 1",
            )
            .map_err(backend)?
            .query_row(params![channel, before, latest], |r| r.get(0))
            .optional()
            .map_err(backend)?;
        let mut cut = kept.unwrap_or(i64::MAX);
        // Past the step's budget, the cut moves down and the step ends here.
        let budget = rows - removed as i64;
        let over: Option<i64> = conn
            .prepare_cached(
                "SELECT seq FROM envelopes WHERE channel = ?1 AND seq < ?2 ORDER BY seq LIMIT 1 OFFSET ?3",
            )
            .map_err(backend)?
            .query_row(params![channel, cut, budget], |r| r.get(0))
            .optional()
            .map_err(backend)?;
        if let Some(over) = over {
            cut = over;
        }
        // Per sender: how many go, their bytes, and the highest sender number
        // among them. An append is stored only above its sender's highest
        // number, so a sender's numbers grow with the channel's and its rows
        // in `sent` up to that number are exactly those of what goes.
        let senders: Vec<(Vec<u8>, i64, i64, i64)> = conn
            .prepare_cached(
                "SELECT sender, COUNT(*), SUM(length(body)), MAX(sender_seq) FROM envelopes
                 WHERE channel = ?1 AND seq < ?2 GROUP BY sender",
            )
            .map_err(backend)?
            .query_map(params![channel, cut], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .map_err(backend)?
            .collect::<Result<_, _>>()
            .map_err(backend)?;
        let count: i64 = senders.iter().map(|s| s.1).sum();
        let bytes: i64 = senders.iter().map(|s| s.2).sum();
        if count > 0 {
            conn.prepare_cached("DELETE FROM envelopes WHERE channel = ?1 AND seq < ?2")
                .map_err(backend)?
                .execute(params![channel, cut])
                .map_err(backend)?;
            for (sender, _, _, highest) in &senders {
                conn.prepare_cached(
                    "DELETE FROM sent WHERE channel = ?1 AND sender = ?2 AND sender_seq <= ?3",
                )
                .map_err(backend)?
                .execute(params![channel, sender, highest])
                .map_err(backend)?;
            }
            conn.prepare_cached("UPDATE channels SET bytes = MAX(bytes - ?2, 0) WHERE id = ?1")
                .map_err(backend)?
                .execute(params![channel, bytes])
                .map_err(backend)?;
            removed += count as u64;
        }
        if over.is_some() {
            // This channel has more to drop: the next step starts with it.
            return Ok((removed, Some(done)));
        }
        done = channel;
    }
    Ok((removed, full.then_some(done)))
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
        self.write_hooked(move |w| append_op(w, a), None)
    }

    fn append_then(
        &self,
        a: Append,
        on_commit: super::OnCommit,
    ) -> BoxFuture<'_, Result<Appended, StoreError>> {
        let hook: Box<dyn FnOnce(&Appended) + Send> =
            Box::new(move |appended| on_commit(*appended));
        self.write_hooked(move |w| append_op(w, a), Some(hook))
    }

    fn read_page(
        &self,
        channel: ChannelId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> BoxFuture<'_, Result<Vec<StoredEnvelope>, StoreError>> {
        self.read_with(move |conn| {
            let mut stmt = conn
                .prepare_cached("SELECT seq, body FROM envelopes WHERE channel = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3")
                .map_err(backend)?;
            let mut rows = stmt
                .query(params![channel.as_bytes(), after.min(i64::MAX as u64) as i64, limit as i64])
                .map_err(backend)?;
            // Stepping to a row reads its body (at most one past the budget).
            let (mut page, mut budget) = (Vec::new(), super::PageBudget::new(max_bytes));
            while let Some(row) = rows.next().map_err(backend)? {
                let body = row.get_ref(1).map_err(backend)?.as_blob().map_err(backend)?;
                if !budget.fits(body.len()) {
                    break;
                }
                page.push(StoredEnvelope {
                    seq: row.get::<_, i64>(0).map_err(backend)? as u64,
                    envelope: Bytes::copy_from_slice(body),
                });
            }
            Ok(page)
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
        Box::pin(async move {
            let now = super::super::hub::unix_now();
            let (mut removed, mut after) = (0, Vec::new());
            loop {
                let (step, next) = self
                    .write_hooked(move |w| prune_op(w, before, now, after, PRUNE_ROWS), None)
                    .await?;
                removed += step;
                match next {
                    Some(next) => after = next,
                    None => return Ok(removed),
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::os_rng;

    type Answer<T> = tokio::sync::oneshot::Receiver<Result<T, StoreError>>;

    /// A database with one channel, and a writer on it with no thread: the
    /// tests run its batches themselves.
    fn setup(path: &Path) -> (Writer, ChannelId, DeviceId) {
        let mut rng = os_rng();
        let (channel, device) = (ChannelId::random(&mut rng), DeviceId::random(&mut rng));
        let mut writer = writer_on(path);
        one_batch(&mut writer, vec![new_channel(channel)]);
        assert_eq!(row(&writer.conn, channel), (0, 0));
        (writer, channel, device)
    }

    /// A database path in a fresh directory of its own.
    fn scratch() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "khub-sqlite-unit-{}-{}",
            std::process::id(),
            DeviceId::random(&mut os_rng())
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("db.sqlite3")
    }

    fn writer_on(path: &Path) -> Writer {
        let mut conn = connect(path, Durability::Full).unwrap();
        prepare(&mut conn).unwrap();
        Writer {
            conn,
            memo: Memo::default(),
        }
    }

    fn append(
        channel: ChannelId,
        sender: DeviceId,
        sender_seq: u64,
        len: usize,
        now: u64,
    ) -> (WriteJob, Answer<Appended>) {
        let a = Append {
            channel,
            sender,
            sender_seq,
            envelope: Bytes::from(vec![7u8; len]),
            now,
            quota: 10_000,
        };
        job(move |w| append_op(w, a), None)
    }

    /// Runs `jobs` as one batch, as the writer thread does.
    fn one_batch(writer: &mut Writer, jobs: Vec<WriteJob>) {
        let (tx, rx) = mpsc::channel();
        for job in jobs {
            tx.send(job).unwrap();
        }
        drop(tx);
        writer_loop(writer, &rx);
    }

    fn answer<T>(mut rx: Answer<T>) -> Result<T, StoreError> {
        rx.try_recv().expect("answered once the batch is done")
    }

    fn row(conn: &Connection, channel: ChannelId) -> (i64, i64) {
        conn.query_row(
            "SELECT head, bytes FROM channels WHERE id = ?1",
            params![channel.as_bytes()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    }

    #[test]
    fn a_failed_write_rolls_back_its_whole_batch_and_the_memo_with_it() {
        let path = scratch();
        let (mut writer, channel, sender) = setup(&path);
        let (first, first_rx) = append(channel, sender, 1, 100, 0);
        let (broken, broken_rx) = job(
            |_| -> Result<(), StoreError> { Err(StoreError::Backend("disk on fire".into())) },
            None,
        );
        let (after, after_rx) = append(channel, sender, 2, 100, 0);
        one_batch(&mut writer, vec![first, broken, after]);
        assert!(matches!(answer(first_rx), Err(StoreError::Backend(_))));
        assert!(matches!(answer(broken_rx), Err(StoreError::Backend(_))));
        assert!(matches!(answer(after_rx), Err(StoreError::Backend(_))));
        assert_eq!(
            row(&writer.conn, channel),
            (0, 0),
            "nothing of the batch stays"
        );
        let stored: i64 = writer
            .conn
            .query_row("SELECT COUNT(*) FROM envelopes", [], |r| r.get(0))
            .unwrap();
        assert_eq!(stored, 0);

        // The next batch numbers from 1 again: the memo forgot the rolled-back head.
        let (again, again_rx) = append(channel, sender, 1, 100, 0);
        one_batch(&mut writer, vec![again]);
        assert_eq!(answer(again_rx).map(|a| a.seq), Ok(1));
        assert_eq!(row(&writer.conn, channel), (1, 100));
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn a_prune_inside_a_batch_of_appends_keeps_the_channels_bytes_exact() {
        let path = scratch();
        let (mut writer, channel, sender) = setup(&path);
        // Two stored at time 10, one at 20; the prune (before 15) drops the two.
        let (a1, a1_rx) = append(channel, sender, 1, 100, 10);
        let (a2, a2_rx) = append(channel, sender, 2, 200, 10);
        let (prune, pruned) = job(move |w| prune_op(w, 15, 15, Vec::new(), PRUNE_ROWS), None);
        let (a3, a3_rx) = append(channel, sender, 3, 400, 20);
        one_batch(&mut writer, vec![a1, a2, prune, a3]);
        let seqs: Vec<_> = [a1_rx, a2_rx, a3_rx]
            .into_iter()
            .map(|rx| answer(rx).map(|a| a.seq))
            .collect();
        assert_eq!(seqs, [Ok(1), Ok(2), Ok(3)]);
        assert_eq!(answer(pruned), Ok((2, None)));

        assert_eq!(row(&writer.conn, channel), (3, 400));

        // Reopened, the store carries on from the row.
        drop(writer);
        let mut writer = writer_on(&path);
        let (next, next_rx) = append(channel, sender, 4, 50, 30);
        one_batch(&mut writer, vec![next]);
        assert_eq!(answer(next_rx).map(|a| a.seq), Ok(4));
        assert_eq!(row(&writer.conn, channel), (4, 450));
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    /// Retention steps until done, with a budget of `rows` per step; what
    /// each step dropped.
    fn prune_steps(writer: &mut Writer, before: u64, now: u64, rows: i64) -> Vec<u64> {
        let mut steps = Vec::new();
        let mut after = Vec::new();
        loop {
            let (step, answer_rx) = job(move |w| prune_op(w, before, now, after, rows), None);
            one_batch(writer, vec![step]);
            let (removed, next) = answer(answer_rx).unwrap();
            steps.push(removed);
            match next {
                Some(next) => after = next,
                None => return steps,
            }
        }
    }

    fn new_channel(channel: ChannelId) -> WriteJob {
        job(
            move |w| {
                w.conn
                    .execute(
                        "INSERT INTO channels (id, head, bytes, created) VALUES (?1, 0, 0, 0)",
                        params![channel.as_bytes()],
                    )
                    .map_err(backend)?;
                Ok(())
            },
            None,
        )
        .0
    }

    #[test]
    fn retention_covers_every_channel_in_steps_and_cuts_each_at_its_oldest_kept() {
        let path = scratch();
        let mut writer = writer_on(&path);
        let mut rng = os_rng();
        let sender = DeviceId::random(&mut rng);
        // More channels than one step looks at, each with an envelope stored
        // at 10 (expired) and one at 30 (kept); the first also has one at 20
        // after the one at 30, as after a clock step back.
        let channels: Vec<ChannelId> = (0..PRUNE_CHANNELS + 1)
            .map(|_| ChannelId::random(&mut rng))
            .collect();
        let mut jobs = Vec::new();
        for channel in &channels {
            jobs.push(new_channel(*channel));
            jobs.push(append(*channel, sender, 1, 100, 10).0);
            jobs.push(append(*channel, sender, 2, 50, 30).0);
        }
        jobs.push(append(channels[0], sender, 3, 25, 20).0);
        one_batch(&mut writer, jobs);

        let steps = prune_steps(&mut writer, 25, 40, PRUNE_ROWS);
        assert_eq!(steps.len(), 2, "two steps: {steps:?}");
        assert_eq!(steps.iter().sum::<u64>(), channels.len() as u64);
        for channel in &channels[1..] {
            assert_eq!(row(&writer.conn, *channel), (2, 50));
        }
        // The one stamped 20 stays behind the one stamped 30.
        assert_eq!(row(&writer.conn, channels[0]), (3, 75));
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn retention_steps_stay_within_their_budget_and_a_stamp_from_the_future_does_not_stop_them() {
        let path = scratch();
        let mut writer = writer_on(&path);
        let mut rng = os_rng();
        let (channel, sender) = (ChannelId::random(&mut rng), DeviceId::random(&mut rng));
        let far = 40 + 10 * 24 * 3600;
        let mut jobs = vec![new_channel(channel)];
        for (seq, stamp) in [(1, 10), (2, 10), (3, 10), (4, far), (5, 30)] {
            jobs.push(append(channel, sender, seq, 100, stamp).0);
        }
        one_batch(&mut writer, jobs);
        assert_eq!(prune_steps(&mut writer, 25, 40, 2), [2, 2]);
        assert_eq!(row(&writer.conn, channel), (5, 100));
        let left: Vec<i64> = writer
            .conn
            .prepare("SELECT seq FROM envelopes ORDER BY seq")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(left, [5]);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn another_writer_on_the_file_fails_the_batch_instead_of_reusing_a_number() {
        let path = scratch();
        let (mut writer, channel, sender) = setup(&path);
        let (first, first_rx) = append(channel, sender, 1, 100, 0);
        one_batch(&mut writer, vec![first]);
        assert_eq!(answer(first_rx).map(|a| a.seq), Ok(1));
        // Another process numbers envelopes 2 to 5 in the same file.
        let other = Connection::open(&path).unwrap();
        other
            .execute(
                "UPDATE channels SET head = 5, bytes = bytes + 400 WHERE id = ?1",
                params![channel.as_bytes()],
            )
            .unwrap();
        let (second, second_rx) = append(channel, sender, 2, 100, 0);
        one_batch(&mut writer, vec![second]);
        assert!(
            matches!(answer(second_rx), Err(StoreError::Backend(m)) if m.contains("another khub serve"))
        );
        // Reloaded, the next number follows the other writer's.
        let (again, again_rx) = append(channel, sender, 2, 100, 0);
        one_batch(&mut writer, vec![again]);
        assert_eq!(answer(again_rx).map(|a| a.seq), Ok(6));
        assert_eq!(row(&writer.conn, channel), (6, 600));
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn the_file_stays_locked_against_other_processes_while_any_store_of_this_one_writes() {
        let path = scratch();
        let lock = super::super::file_lock::path_for(&path);
        let other_process = || {
            std::fs::File::open(&lock)
                .unwrap()
                .try_lock()
                .map_err(|e| matches!(e, std::fs::TryLockError::WouldBlock))
        };
        let first = SqliteStore::open(&path).unwrap();
        assert_eq!(other_process(), Err(true));
        // A store reopened here while the old one is still dropped shares the lock.
        let second = SqliteStore::open(&path).unwrap();
        drop(first);
        assert_eq!(other_process(), Err(true));
        // The last writer thread lets go as it ends.
        drop(second);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while other_process().is_err() {
            assert!(std::time::Instant::now() < deadline, "the lock was kept");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    /// Appends `sender`'s numbers `from..=to` (5 bytes each, stamped `now`)
    /// in as many batches as the writer takes.
    fn append_many(
        writer: &mut Writer,
        channel: ChannelId,
        sender: DeviceId,
        from: u64,
        to: u64,
        now: u64,
    ) {
        let (jobs, answers): (Vec<_>, Vec<_>) = (from..=to)
            .map(|n| append(channel, sender, n, 5, now))
            .unzip();
        one_batch(writer, jobs);
        for (n, rx) in (from..=to).zip(answers) {
            assert!(answer(rx).is_ok_and(|a| !a.duplicate), "append {n}");
        }
    }

    /// What the store answers a sender who sends `sender_seq` again with
    /// `len` bytes (the first time it had 5).
    fn retry(
        writer: &mut Writer,
        channel: ChannelId,
        sender: DeviceId,
        sender_seq: u64,
        len: usize,
    ) -> Result<Appended, StoreError> {
        let (job, rx) = append(channel, sender, sender_seq, len, 0);
        one_batch(writer, vec![job]);
        answer(rx)
    }

    fn count(conn: &Connection, sql: &str) -> i64 {
        conn.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn a_retry_is_recognised_whether_or_not_its_envelope_was_indexed_and_after_a_reopen() {
        let path = scratch();
        let (mut writer, channel, sender) = setup(&path);
        let total = INDEX_AFTER + 10;
        append_many(&mut writer, channel, sender, 1, total, 0);
        // The first INDEX_AFTER went into `sent` in bulk; the last ten are not yet.
        let indexed = |w: &Writer| count(&w.conn, "SELECT indexed FROM channels") as u64;
        assert_eq!(indexed(&writer), INDEX_AFTER);
        assert_eq!(
            count(&writer.conn, "SELECT COUNT(*) FROM sent"),
            INDEX_AFTER as i64
        );

        // A new writer knows nothing: the sender's highest comes from `sent`
        // and the envelopes past the mark. Had it read `sent` alone, the
        // retry of the last one would be stored again as new.
        drop(writer);
        let mut writer = writer_on(&path);
        let seq = |r: Result<Appended, StoreError>| r.map(|a| (a.seq, a.duplicate));
        assert_eq!(
            seq(retry(&mut writer, channel, sender, total, 5)),
            Ok((total, true))
        );
        // The retry indexed the rest first, and the mark went with its batch.
        assert_eq!(indexed(&writer), total);
        assert_eq!(
            count(&writer.conn, "SELECT COUNT(*) FROM sent"),
            total as i64
        );

        assert_eq!(
            seq(retry(&mut writer, channel, sender, 1, 5)),
            Ok((1, true))
        );
        assert_eq!(
            retry(&mut writer, channel, sender, 5, 6),
            Err(StoreError::Conflict { sender_seq: 5 })
        );
        assert_eq!(
            retry(&mut writer, channel, sender, total - 1, 6),
            Err(StoreError::Conflict {
                sender_seq: total - 1
            })
        );
        let mut writer = writer_on(&path);
        assert_eq!(
            seq(retry(&mut writer, channel, sender, total + 1, 5)),
            Ok((total + 1, false))
        );
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn a_retrys_indexing_is_undone_with_its_failed_batch() {
        let path = scratch();
        let (mut writer, channel, sender) = setup(&path);
        append_many(&mut writer, channel, sender, 1, 10, 0);
        let (again, again_rx) = append(channel, sender, 4, 5, 0);
        let (broken, _) = job(
            |_| -> Result<(), StoreError> { Err(StoreError::Backend("disk on fire".into())) },
            None,
        );
        one_batch(&mut writer, vec![again, broken]);
        assert!(matches!(answer(again_rx), Err(StoreError::Backend(_))));
        assert_eq!(count(&writer.conn, "SELECT indexed FROM channels"), 0);
        assert_eq!(count(&writer.conn, "SELECT COUNT(*) FROM sent"), 0);
        // The writer forgot its mark with the rest: the next retry indexes again.
        assert_eq!(
            retry(&mut writer, channel, sender, 4, 5).map(|a| (a.seq, a.duplicate)),
            Ok((4, true))
        );
        assert_eq!(count(&writer.conn, "SELECT COUNT(*) FROM sent"), 10);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn retention_drops_the_index_rows_of_what_it_drops_and_only_those() {
        let path = scratch();
        let (mut writer, channel, sender) = setup(&path);
        let other = DeviceId::random(&mut os_rng());
        append_many(&mut writer, channel, sender, 1, 600, 10);
        append_many(&mut writer, channel, other, 1, 30, 10);
        append_many(&mut writer, channel, sender, 601, INDEX_AFTER + 100, 20);
        append_many(&mut writer, channel, other, 31, 40, 20);
        let indexed = count(&writer.conn, "SELECT indexed FROM channels");
        assert!(indexed > 630, "indexed up to {indexed}");

        assert_eq!(prune_steps(&mut writer, 15, 30, PRUNE_ROWS), [630]);
        // Left in `sent`: every indexed envelope after the cut, of both senders.
        assert_eq!(
            count(&writer.conn, "SELECT COUNT(*) FROM sent"),
            indexed - 630
        );
        assert_eq!(
            count(&writer.conn, "SELECT COUNT(*) FROM sent WHERE seq <= 630"),
            0
        );
        let mut writer = writer_on(&path);
        assert_eq!(
            retry(&mut writer, channel, sender, 3, 5),
            Err(StoreError::OutOfOrder {
                sender_seq: 3,
                highest: INDEX_AFTER + 100
            })
        );
        assert_eq!(
            retry(&mut writer, channel, sender, 700, 5).map(|a| a.seq),
            Ok(730)
        );
        // The other sender's 35th came after the first 630 and the sender's later ones.
        assert_eq!(
            retry(&mut writer, channel, other, 35, 5).map(|a| a.seq),
            Ok(630 + (INDEX_AFTER + 100 - 600) + 5)
        );
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn a_file_from_before_moves_its_sender_index_into_sent_and_keeps_every_envelope() {
        let path = scratch();
        let (channel, sender) = (
            ChannelId::random(&mut os_rng()),
            DeviceId::random(&mut os_rng()),
        );
        let old = Connection::open(&path).unwrap();
        old.execute_batch(
            "CREATE TABLE channels (id BLOB PRIMARY KEY, head INTEGER NOT NULL,
                 bytes INTEGER NOT NULL, created INTEGER NOT NULL);
             CREATE TABLE envelopes (channel BLOB NOT NULL, seq INTEGER NOT NULL,
                 sender BLOB NOT NULL, sender_seq INTEGER NOT NULL, body BLOB NOT NULL,
                 stored INTEGER NOT NULL, PRIMARY KEY (channel, seq),
                 UNIQUE (channel, sender, sender_seq)) WITHOUT ROWID;",
        )
        .unwrap();
        old.execute(
            "INSERT INTO channels VALUES (?1, 2, 10, 0)",
            params![channel.as_bytes()],
        )
        .unwrap();
        for n in 1..=2_i64 {
            old.execute(
                "INSERT INTO envelopes VALUES (?1, ?2, ?3, ?2, ?4, 0)",
                params![channel.as_bytes(), n, sender.as_bytes(), vec![7u8; 5]],
            )
            .unwrap();
        }
        drop(old);

        let mut writer = writer_on(&path);
        assert_eq!(count(&writer.conn, "PRAGMA user_version"), SCHEMA_VERSION);
        assert_eq!(
            count(
                &writer.conn,
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'envelopes' AND sql LIKE '%UNIQUE%'"
            ),
            0
        );
        assert_eq!(count(&writer.conn, "SELECT COUNT(*) FROM envelopes"), 2);
        assert_eq!(count(&writer.conn, "SELECT COUNT(*) FROM sent"), 2);
        assert_eq!(count(&writer.conn, "SELECT indexed FROM channels"), 2);
        assert_eq!(
            retry(&mut writer, channel, sender, 1, 5).map(|a| (a.seq, a.duplicate)),
            Ok((1, true))
        );
        assert_eq!(
            retry(&mut writer, channel, sender, 3, 5).map(|a| (a.seq, a.duplicate)),
            Ok((3, false))
        );
        // Opening it again does not migrate again: a row taken out of
        // `sent` stays out.
        writer
            .conn
            .execute_batch("DELETE FROM sent WHERE sender_seq = 1")
            .unwrap();
        drop(writer);
        let writer = writer_on(&path);
        assert_eq!(count(&writer.conn, "SELECT COUNT(*) FROM sent"), 1);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn a_file_from_a_newer_khub_is_refused_and_left_as_it_was() {
        let path = scratch();
        let newer = Connection::open(&path).unwrap();
        newer
            .execute_batch(&format!(
                "CREATE TABLE layout_of_tomorrow (x BLOB);
                 PRAGMA user_version = {};",
                SCHEMA_VERSION + 1
            ))
            .unwrap();
        drop(newer);
        let Err(StoreError::Backend(message)) = SqliteStore::open(&path) else {
            panic!("a newer file was opened");
        };
        assert!(
            message.contains(&format!(
                "schema version {}, newer than this khub's {SCHEMA_VERSION}",
                SCHEMA_VERSION + 1
            )),
            "{message}"
        );
        let file = Connection::open(&path).unwrap();
        assert_eq!(count(&file, "PRAGMA user_version"), SCHEMA_VERSION + 1);
        let journal: String = file
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(journal, "delete", "not switched to WAL");
        assert_eq!(
            count(&file, "SELECT COUNT(*) FROM sqlite_master"),
            1,
            "no table of ours was created in it"
        );
        drop(file);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn a_file_from_before_loses_the_stamp_index_on_open() {
        let path = scratch();
        let old = Connection::open(&path).unwrap();
        old.execute_batch(
            "CREATE TABLE envelopes (channel BLOB NOT NULL, seq INTEGER NOT NULL,
                 sender BLOB NOT NULL, sender_seq INTEGER NOT NULL, body BLOB NOT NULL,
                 stored INTEGER NOT NULL, PRIMARY KEY (channel, seq),
                 UNIQUE (channel, sender, sender_seq)) WITHOUT ROWID;
             CREATE INDEX envelopes_stored ON envelopes (stored);",
        )
        .unwrap();
        drop(old);
        let store = SqliteStore::open(&path).unwrap();
        drop(store);
        let indexes: i64 = Connection::open(&path)
            .unwrap()
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = 'envelopes_stored'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(indexes, 0);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
