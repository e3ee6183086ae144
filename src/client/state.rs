//! A device's state on disk: one SQLite file in the device's home directory,
//! created with mode 0600 (its directory 0700), holding the identity, the MLS
//! group (OpenMLS's storage rows) and khub's channel state, the cursor, the
//! outbox of sealed envelopes not yet acked, and the inbox of opened messages
//! not yet read by the app.
//!
//! Several processes may use one home at once (an app and the CLI, `listen`
//! and `send`): every change runs in one `BEGIN IMMEDIATE` transaction that
//! loads the channel as it is on disk, changes it, and writes back what
//! changed (`StateDb::change`). A second writer waits for the first (up to
//! the busy timeout), then sees its result: no sequence number is reused, no
//! commit or message taken in by one process is missed by the other.
//! `synchronous = FULL`, so a message `send` accepted survives a crash of the
//! app or the machine.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use zeroize::Zeroizing;

use super::error::ClientError;
use super::incident::Incident;
use crate::channel::{Channel, Outgoing, RefusalKind};
use crate::crypto::envelope::EnvelopeHeader;
use crate::crypto::token::AccessToken;
use crate::ids::{ChannelId, DeviceId};
use crate::protocol::Refusal;

/// File name of the state database inside the home directory.
pub const STATE_FILE: &str = "device.sqlite3";
/// The state format: 2 since protocol 2 (MLS). A file of format 1 holds a
/// device of protocol 1, which cannot be upgraded in place.
const FORMAT: i64 = 2;

/// Acks, and refusals, remembered after their envelopes left the outbox.
const ANSWERS_KEPT: i64 = 1000;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS identity (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    format   INTEGER NOT NULL,  -- FORMAT
    relay    TEXT NOT NULL,
    name     TEXT NOT NULL,
    token    BLOB NOT NULL,     -- the relay access token (secret)
    device   BLOB NOT NULL,     -- this device's id
    channel  BLOB NOT NULL,     -- the channel's id
    meta     BLOB NOT NULL,     -- khub's channel state (JSON; sequence numbers, pending commit)
    cursor   INTEGER NOT NULL,  -- last relay sequence number ingested
    read     INTEGER NOT NULL   -- last inbox message the app has read
);
CREATE TABLE IF NOT EXISTS mls (
    key      BLOB PRIMARY KEY,  -- OpenMLS storage key
    value    BLOB NOT NULL      -- OpenMLS storage value (group state, secrets)
);
CREATE TABLE IF NOT EXISTS outbox (
    sender_seq INTEGER PRIMARY KEY,
    envelope   BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS unsealed (  -- what queued messages say, until they come back
    sender_seq INTEGER PRIMARY KEY,     -- from the relay: to seal them again in a later
    plaintext  BLOB NOT NULL,           -- epoch, or send them again if stored too late (secret)
    sealings   BLOB NOT NULL,           -- SHA-256 of each sealing, 32 bytes each, oldest first
    seq        INTEGER                  -- the relay sequence number it was acked with
);
CREATE TABLE IF NOT EXISTS inbox (
    seq       INTEGER PRIMARY KEY,
    sender    BLOB NOT NULL,
    name      TEXT NOT NULL,
    body      BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS incidents (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    seq       INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    sender    BLOB,
    detail    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS joined (
    device    BLOB PRIMARY KEY  -- devices whose 'joined' message was taken in
);
CREATE TABLE IF NOT EXISTS commits (
    sender_seq INTEGER PRIMARY KEY,  -- this device's commit that won its epoch
    seq        INTEGER NOT NULL      -- its relay sequence number
);
CREATE TABLE IF NOT EXISTS acked (  -- the newest envelopes that left the outbox acked
    sender_seq INTEGER PRIMARY KEY,  -- so that a `send` in another process on
    seq        INTEGER NOT NULL      -- this home learns its message went out
);
CREATE TABLE IF NOT EXISTS refused (  -- the newest envelopes the relay refused for good
    sender_seq INTEGER PRIMARY KEY,    -- so that a `send` in another process on
    refusal    TEXT NOT NULL           -- this home learns why (the refusal as JSON)
);
CREATE TABLE IF NOT EXISTS at_cursor (  -- the envelope taken in at the cursor: resuming,
    id   INTEGER PRIMARY KEY CHECK (id = 1),  -- a device checks that the relay still holds
    seq  INTEGER NOT NULL,              -- it there (one restored from an older backup
    hash BLOB NOT NULL                  -- numbers other envelopes so); its SHA-256
);
CREATE TABLE IF NOT EXISTS reread (  -- the relay went back behind the cursor: the
    id    INTEGER PRIMARY KEY CHECK (id = 1),  -- channel is read again from its start,
    until INTEGER NOT NULL           -- and replays up to here are what was taken in before
);
CREATE TABLE IF NOT EXISTS rewind_snapshot (  -- the notes snapshot queued when the relay
    id   INTEGER PRIMARY KEY CHECK (id = 1),  -- last went back: while its last part is
    last INTEGER NOT NULL                     -- queued, another going back queues none
);
";

/// What the identity row holds that never changes.
pub(crate) struct Identity {
    /// The relay's URL.
    pub relay: String,
    /// This device's name.
    pub name: String,
    /// The relay access token.
    pub token: AccessToken,
    /// This device's id.
    pub device: DeviceId,
    /// The channel's id.
    pub channel: ChannelId,
}

/// A message in the inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxMessage {
    /// Its number in the inbox, for [`Device::mark_read`](super::Device::mark_read):
    /// the relay sequence number it arrived under — unless the relay went
    /// back behind this device's cursor (a `relay_rewound` incident), after
    /// which messages are numbered on after the last one this device had.
    pub seq: u64,
    /// Sending device.
    pub from: DeviceId,
    /// Its name.
    pub from_name: String,
    /// The application's bytes.
    pub body: Vec<u8>,
}

/// The open state database.
pub(crate) struct StateDb {
    conn: Connection,
}

fn err(e: rusqlite::Error) -> ClientError {
    ClientError::disk("the state file could not be read or written", e)
}

/// Takes envelope `sender_seq` out of the outbox, the relay having answered
/// it; false if it was not there (the answer was taken in already, or names a
/// number this device never queued), and then nothing about it is recorded.
fn take_from_outbox(conn: &Connection, sender_seq: u64) -> Result<bool, ClientError> {
    conn.execute(
        "DELETE FROM outbox WHERE sender_seq = ?1",
        params![i64_of(sender_seq)],
    )
    .map_err(err)
    .map(|removed| removed > 0)
}

/// Takes envelope `sender_seq` out of the outbox as acked, stored as relay
/// sequence number `seq`; false (and nothing recorded) if it was not there.
fn ack_in_outbox(conn: &Connection, sender_seq: u64, seq: u64) -> Result<bool, ClientError> {
    if !take_from_outbox(conn, sender_seq)? {
        return Ok(false);
    }
    conn.execute(
        "INSERT OR REPLACE INTO acked (sender_seq, seq) VALUES (?1, ?2)",
        params![i64_of(sender_seq), i64_of(seq)],
    )
    .map_err(err)?;
    conn.execute(
        "UPDATE unsealed SET seq = ?2 WHERE sender_seq = ?1",
        params![i64_of(sender_seq), i64_of(seq)],
    )
    .map_err(err)?;
    Ok(true)
}

/// The cursor in `conn`'s state, and the SHA-256 of the envelope taken in
/// there when it is known.
fn cursor_and_hash(conn: &Connection) -> Result<(u64, Option<[u8; 32]>), ClientError> {
    conn.query_row(
        "SELECT i.cursor, a.hash FROM identity i LEFT JOIN at_cursor a ON a.seq = i.cursor
         WHERE i.id = 1",
        [],
        |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Option<Vec<u8>>>(1)?)),
    )
    .map_err(err)
    .map(|(cursor, hash)| {
        let hash = hash.and_then(|hash| <[u8; 32]>::try_from(hash).ok());
        (u64_of(cursor), hash)
    })
}

/// The SHA-256 of an envelope: one sealing of a message, as
/// `unsealed.sealings` lists them, or the one taken in at the cursor.
pub(crate) fn envelope_hash(envelope: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(envelope).into()
}

/// Forgets all but the newest [`ANSWERS_KEPT`] answers in `table` (`acked`
/// or `refused`).
fn keep_newest_answers(conn: &Connection, table: &'static str) -> Result<(), ClientError> {
    conn.execute(
        &format!(
            "DELETE FROM {table} WHERE sender_seq <= (SELECT MAX(sender_seq) FROM {table}) - ?1"
        ),
        params![ANSWERS_KEPT],
    )
    .map_err(err)
    .map(drop)
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// One change of the device's state, inside one transaction: the channel as
/// it is on disk, and the cursor. Dropped without [`StateDb::change`]
/// finishing, nothing of it is stored.
pub(crate) struct Change<'a> {
    tx: rusqlite::Transaction<'a>,
    /// The channel, loaded in this transaction.
    pub channel: Channel,
    /// The cursor, loaded in this transaction.
    pub cursor: u64,
}

impl Change<'_> {
    /// The transaction, for the vault's tables.
    pub fn conn(&self) -> &Connection {
        &self.tx
    }

    /// Adds an envelope to the outbox.
    pub fn queue(&self, outgoing: &Outgoing) -> Result<(), ClientError> {
        self.tx
            .execute(
                "INSERT INTO outbox (sender_seq, envelope) VALUES (?1, ?2)",
                params![i64_of(outgoing.seq), outgoing.envelope],
            )
            .map_err(err)
            .map(drop)
    }

    /// Adds a sealed message to the outbox with what it says, so that it
    /// can be sealed again ([`reseal_stale`](Self::reseal_stale)).
    pub fn queue_message(&self, outgoing: &Outgoing, plaintext: &[u8]) -> Result<(), ClientError> {
        self.queue(outgoing)?;
        self.tx
            .execute(
                "INSERT INTO unsealed (sender_seq, plaintext, sealings) VALUES (?1, ?2, ?3)",
                params![
                    i64_of(outgoing.seq),
                    plaintext,
                    &envelope_hash(&outgoing.envelope)[..]
                ],
            )
            .map_err(err)
            .map(drop)
    }

    /// Seals again, in the current epoch, every outbox message sealed in an
    /// earlier epoch, oldest first; returns how many. Called when taking in
    /// moved the epoch on, and before a new connection publishes, so that what
    /// the relay stores from now on is at most as far behind as the commits it
    /// stores while it is on its way.
    ///
    /// All of them, those the live connection wrote already too: the relay
    /// stores a sender's envelopes in the order of their sender numbers, and
    /// members accept an epoch's key generations only in about that order
    /// (OpenMLS tolerates 5 out of order), so the outbox's sealings in the
    /// current epoch must follow its sender numbers. Sealing only what was
    /// not yet written left written ones to be sealed after later ones when
    /// they had to go again: members refused them as tampered.
    pub fn reseal_stale(&mut self) -> Result<usize, ClientError> {
        if self.channel.is_removed() {
            return Ok(0);
        }
        let epoch = self.channel.epoch();
        let stale: Vec<(u64, Zeroizing<Vec<u8>>, Vec<u8>)> = {
            let mut stmt = self
                .tx
                .prepare_cached(
                    "SELECT o.sender_seq, o.envelope, u.plaintext, u.sealings
                     FROM outbox o JOIN unsealed u ON u.sender_seq = o.sender_seq
                     ORDER BY o.sender_seq",
                )
                .map_err(err)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        u64_of(r.get(0)?),
                        r.get::<_, Vec<u8>>(1)?,
                        Zeroizing::new(r.get::<_, Vec<u8>>(2)?),
                        r.get::<_, Vec<u8>>(3)?,
                    ))
                })
                .map_err(err)?;
            let mut stale = Vec::new();
            for row in rows {
                let (sender_seq, envelope, plaintext, sealings) = row.map_err(err)?;
                let sealed_in = EnvelopeHeader::decode(&envelope)
                    .ok()
                    .map(|h| u64::from(h.epoch));
                if sealed_in.is_none_or(|e| e < epoch) {
                    stale.push((sender_seq, plaintext, sealings));
                }
            }
            stale
        };
        let mut resealed = 0;
        for (sender_seq, plaintext, sealings) in &stale {
            // One that cannot be sealed again goes as it is, rather than
            // stopping everything this device takes in.
            let outgoing = match self.channel.reseal(*sender_seq, plaintext) {
                Ok(outgoing) => outgoing,
                Err(e) => {
                    tracing::warn!(sender_seq, error = %e, "a queued message could not be sealed in the new epoch; it goes as it is");
                    continue;
                }
            };
            resealed += 1;
            self.tx
                .execute(
                    "UPDATE outbox SET envelope = ?2 WHERE sender_seq = ?1",
                    params![i64_of(*sender_seq), outgoing.envelope],
                )
                .map_err(err)?;
            let sealings = [&sealings[..], &envelope_hash(&outgoing.envelope)[..]].concat();
            self.tx
                .execute(
                    "UPDATE unsealed SET sealings = ?2 WHERE sender_seq = ?1",
                    params![i64_of(*sender_seq), sealings],
                )
                .map_err(err)?;
        }
        Ok(resealed)
    }

    /// Whether `envelope` is one of the sealings this device made of its
    /// message `sender_seq` (while it keeps the message's plaintext): bytes
    /// the relay cannot forge, so their header can be trusted.
    pub fn own_sealing(&self, sender_seq: u64, envelope: &[u8]) -> Result<bool, ClientError> {
        let sealings: Option<Vec<u8>> = self
            .tx
            .query_row(
                "SELECT sealings FROM unsealed WHERE sender_seq = ?1",
                params![i64_of(sender_seq)],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?;
        let hash = envelope_hash(envelope);
        Ok(sealings.is_some_and(|s| s.chunks(32).any(|h| h == hash)))
    }

    /// This device's own envelope `sender_seq` came back from the relay as
    /// `seq`: if it is the outbox entry as queued, or one of its sealings,
    /// it was stored (an ack lost with its connection): acked.
    pub fn settle_own(
        &self,
        sender_seq: u64,
        seq: u64,
        envelope: &[u8],
    ) -> Result<(), ClientError> {
        let queued: Option<Vec<u8>> = self
            .tx
            .query_row(
                "SELECT envelope FROM outbox WHERE sender_seq = ?1",
                params![i64_of(sender_seq)],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?;
        match queued {
            Some(queued) if queued == envelope || self.own_sealing(sender_seq, envelope)? => {
                ack_in_outbox(&self.tx, sender_seq, seq)?;
                keep_newest_answers(&self.tx, "acked")
            }
            _ => Ok(()),
        }
    }

    /// Whether outbox message `sender_seq` was sealed again since it was
    /// queued: the relay may then hold the first sealing, and answer the
    /// second with a conflict.
    pub fn resealed(&self, sender_seq: u64) -> Result<bool, ClientError> {
        self.tx
            .query_row(
                "SELECT length(sealings) FROM unsealed WHERE sender_seq = ?1",
                params![i64_of(sender_seq)],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map_err(err)
            .map(|len| len.is_some_and(|len| len > 32))
    }

    /// Adds a message to the inbox, numbered after every message it has
    /// had: `m.seq` (its relay sequence number), unless the relay went back
    /// behind that number (`Device::relay_went_back`), where numbering goes on
    /// after the last one so that no message takes an unread one's number.
    pub fn deliver(&self, m: &InboxMessage) -> Result<(), ClientError> {
        self.tx
            .execute(
                "INSERT INTO inbox (seq, sender, name, body)
                 SELECT MAX(?1, read + 1, COALESCE((SELECT MAX(seq) FROM inbox), 0) + 1), ?2, ?3, ?4
                 FROM identity WHERE id = 1",
                params![i64_of(m.seq), m.from.as_bytes(), m.from_name, m.body],
            )
            .map_err(err)
            .map(drop)
    }

    /// Records an incident (the newest [`KEPT`](super::incident::KEPT) are kept).
    pub fn record(&self, incident: &Incident) -> Result<(), ClientError> {
        self.tx
            .execute(
                "INSERT INTO incidents (seq, kind, sender, detail) VALUES (?1, ?2, ?3, ?4)",
                params![
                    i64_of(incident.seq),
                    incident.kind.as_str(),
                    incident.sender.as_ref().map(|d| d.as_bytes().to_vec()),
                    incident.detail
                ],
            )
            .map_err(err)?;
        self.tx
            .execute(
                "DELETE FROM incidents WHERE id <= (SELECT MAX(id) FROM incidents) - ?1",
                params![i64_of(super::incident::KEPT as u64)],
            )
            .map_err(err)
            .map(drop)
    }

    /// Records that `device` said it joined.
    pub fn joined(&self, device: DeviceId) -> Result<(), ClientError> {
        self.tx
            .execute(
                "INSERT OR IGNORE INTO joined (device) VALUES (?1)",
                params![device.as_bytes()],
            )
            .map_err(err)
            .map(drop)
    }

    /// The envelope taken in last, at relay sequence number `seq` (the
    /// cursor once this change is written).
    pub fn took_in(&self, seq: u64, envelope: &[u8]) -> Result<(), ClientError> {
        self.tx
            .execute(
                "INSERT INTO at_cursor (id, seq, hash) VALUES (1, ?1, ?2)
                 ON CONFLICT (id) DO UPDATE SET seq = ?1, hash = ?2",
                params![i64_of(seq), envelope_hash(envelope).as_slice()],
            )
            .map_err(err)
            .map(drop)
    }

    /// The cursor (as on disk when this change began, not as this change
    /// moved it) and the SHA-256 of the envelope taken in there, if known.
    pub fn cursor_and_hash(&self) -> Result<(u64, Option<[u8; 32]>), ClientError> {
        cursor_and_hash(&self.tx)
    }

    /// The relay went back behind cursor `cursor`: the channel is read again
    /// from its start, and replays up to `cursor` are what this device took
    /// in before (see [`reread_until`](Self::reread_until)).
    pub fn reread(&mut self, cursor: u64) -> Result<(), ClientError> {
        self.tx
            .execute(
                "INSERT INTO reread (id, until) VALUES (1, ?1)
                 ON CONFLICT (id) DO UPDATE SET until = MAX(until, ?1)",
                params![i64_of(cursor)],
            )
            .map_err(err)?;
        self.cursor = 0;
        Ok(())
    }

    /// Whether the notes snapshot queued when the relay last went back is
    /// still in the outbox (its last part is).
    pub fn rewind_snapshot_unsent(&self) -> Result<bool, ClientError> {
        self.tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM outbox
                 WHERE sender_seq = (SELECT last FROM rewind_snapshot WHERE id = 1))",
                [],
                |r| r.get(0),
            )
            .map_err(err)
    }

    /// Records that the newest outbox entry is the last part of the notes
    /// snapshot queued because the relay went back.
    pub fn rewind_snapshot_queued(&self) -> Result<(), ClientError> {
        self.tx
            .execute(
                "INSERT OR REPLACE INTO rewind_snapshot (id, last)
                 SELECT 1, MAX(sender_seq) FROM outbox HAVING COUNT(*) > 0",
                [],
            )
            .map_err(err)
            .map(drop)
    }

    /// Up to which relay sequence number the channel is being read again
    /// after the relay went back (0 if it never did): a replay numbered at or
    /// below it is most likely an envelope this device took in before, and
    /// is refused without an incident.
    pub fn reread_until(&self) -> Result<u64, ClientError> {
        self.tx
            .query_row("SELECT until FROM reread WHERE id = 1", [], |r| {
                r.get::<_, i64>(0)
            })
            .optional()
            .map_err(err)
            .map(|until| until.map_or(0, u64_of))
    }

    /// Records that this device's commit `sender_seq` won its epoch as relay
    /// sequence number `seq` (whichever process took it in).
    pub fn committed(&self, sender_seq: u64, seq: u64) -> Result<(), ClientError> {
        self.tx
            .execute(
                "INSERT OR REPLACE INTO commits (sender_seq, seq) VALUES (?1, ?2)",
                params![i64_of(sender_seq), i64_of(seq)],
            )
            .map_err(err)
            .map(drop)
    }

    /// The relay refused envelope `sender_seq` for good: remembered (the
    /// newest [`ANSWERS_KEPT`] refusals) for a `send` waiting on it in any
    /// process on this home.
    pub fn refused(&self, sender_seq: u64, refusal: &Refusal) -> Result<(), ClientError> {
        let text = serde_json::to_string(refusal)
            .map_err(|e| ClientError::disk("a refusal could not be recorded", e))?;
        self.tx
            .execute(
                "INSERT OR REPLACE INTO refused (sender_seq, refusal) VALUES (?1, ?2)",
                params![i64_of(sender_seq), text],
            )
            .map_err(err)?;
        keep_newest_answers(&self.tx, "refused")
    }

    /// The relay finally refused an envelope: it leaves the outbox. False if
    /// it was not there (another process on this home took the answer in
    /// first, or the relay named a number this device never queued).
    pub fn unqueue(&self, sender_seq: u64) -> Result<bool, ClientError> {
        self.forget_plaintext(sender_seq)?;
        take_from_outbox(&self.tx, sender_seq)
    }

    /// Message `sender_seq` needs its plaintext no more (it came back from
    /// the relay in time, or was refused for good).
    pub fn forget_plaintext(&self, sender_seq: u64) -> Result<(), ClientError> {
        self.tx
            .execute(
                "DELETE FROM unsealed WHERE sender_seq = ?1",
                params![i64_of(sender_seq)],
            )
            .map_err(err)
            .map(drop)
    }

    /// Whether envelope `sender_seq` is in the outbox.
    pub fn queued(&self, sender_seq: u64) -> Result<bool, ClientError> {
        self.tx
            .query_row(
                "SELECT 1 FROM outbox WHERE sender_seq = ?1",
                params![i64_of(sender_seq)],
                |_| Ok(()),
            )
            .optional()
            .map_err(err)
            .map(|r| r.is_some())
    }

    /// The plaintext of message `sender_seq`, if it is still kept.
    pub fn plaintext(&self, sender_seq: u64) -> Result<Option<Zeroizing<Vec<u8>>>, ClientError> {
        self.tx
            .query_row(
                "SELECT plaintext FROM unsealed WHERE sender_seq = ?1",
                params![i64_of(sender_seq)],
                |r| r.get::<_, Vec<u8>>(0),
            )
            .optional()
            .map_err(err)
            .map(|p| p.map(Zeroizing::new))
    }

    /// Forgets the plaintexts no longer needed: of messages no longer queued
    /// and acked at or before the cursor (their return was pruned, or another
    /// process took it in).
    pub fn forget_settled_plaintexts(&self) -> Result<(), ClientError> {
        self.tx
            .execute(
                "DELETE FROM unsealed
                 WHERE sender_seq NOT IN (SELECT sender_seq FROM outbox)
                   AND (seq IS NULL OR seq <= ?1)",
                params![i64_of(self.cursor)],
            )
            .map_err(err)
            .map(drop)
    }

    fn commit(mut self) -> Result<(), ClientError> {
        let (meta, changes) = self.channel.save();
        self.tx
            .execute(
                "UPDATE identity SET meta = ?1, cursor = ?2 WHERE id = 1",
                params![meta, i64_of(self.cursor)],
            )
            .map_err(err)?;
        for (key, value) in &changes.upserts {
            self.tx
                .execute(
                    "INSERT INTO mls (key, value) VALUES (?1, ?2)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    params![key, value],
                )
                .map_err(err)?;
        }
        for key in &changes.deletes {
            self.tx
                .execute("DELETE FROM mls WHERE key = ?1", params![key])
                .map_err(err)?;
        }
        self.tx.commit().map_err(err)
    }
}

fn load_channel(conn: &Connection) -> Result<(Channel, u64), ClientError> {
    let (meta, cursor): (Zeroizing<Vec<u8>>, i64) = conn
        .query_row("SELECT meta, cursor FROM identity WHERE id = 1", [], |r| {
            Ok((Zeroizing::new(r.get(0)?), r.get(1)?))
        })
        .map_err(err)?;
    let mut statement = conn
        .prepare_cached("SELECT key, value FROM mls")
        .map_err(err)?;
    let rows = statement
        .query_map([], |r| {
            Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?))
        })
        .map_err(err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(err)?;
    let channel = Channel::load(&meta, rows).map_err(|e| {
        ClientError::disk(
            "the channel's MLS state in the state file cannot be loaded",
            e,
        )
    })?;
    Ok((channel, u64_of(cursor)))
}

impl StateDb {
    /// Creates the state of a new device in `home`; fails if one exists.
    pub fn create(
        home: &Path,
        identity: &Identity,
        channel: &mut Channel,
        cursor: u64,
    ) -> Result<Self, ClientError> {
        let path = home.join(STATE_FILE);
        if path.exists() {
            return Err(ClientError::AlreadyInitialized(home.display().to_string()));
        }
        create_private_dir(home)?;
        create_private_file(&path)?;
        let mut db = Self::connect(&path)?;
        db.conn.execute_batch(SCHEMA).map_err(err)?;
        db.conn
            .execute_batch(crate::notes::store::SCHEMA)
            .map_err(err)?;
        let tx = db.conn.transaction().map_err(err)?;
        let (meta, changes) = channel.save();
        tx.execute(
            "INSERT INTO identity (id, format, relay, name, token, device, channel, meta, cursor, read)
             VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)",
            params![
                FORMAT,
                identity.relay,
                identity.name,
                identity.token.expose().as_slice(),
                identity.device.as_bytes(),
                identity.channel.as_bytes(),
                meta,
                i64_of(cursor)
            ],
        )
        .map_err(err)?;
        for (key, value) in &changes.upserts {
            tx.execute(
                "INSERT INTO mls (key, value) VALUES (?1, ?2)",
                params![key, value],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(db)
    }

    /// Opens the state of the device in `home`.
    pub fn open(home: &Path) -> Result<(Self, Identity), ClientError> {
        let path = home.join(STATE_FILE);
        if !path.exists() {
            return Err(ClientError::NotInitialized(home.display().to_string()));
        }
        let db = Self::connect(&path)?;
        let columns = |condition: &str| -> Result<i64, ClientError> {
            db.conn
                .query_row(
                    &format!("SELECT COUNT(*) FROM pragma_table_info('identity') {condition}"),
                    [],
                    |r| r.get(0),
                )
                .map_err(err)
        };
        if columns("")? == 0 {
            return Err(ClientError::NotInitialized(home.display().to_string()));
        }
        let has_format = columns("WHERE name = 'format'")? > 0;
        if !has_format {
            return Err(ClientError::corrupt(format!(
                "the device in {} speaks protocol 1; remove that directory and pair the device again",
                home.display()
            )));
        }
        db.conn.execute_batch(SCHEMA).map_err(err)?;
        db.conn
            .execute_batch(crate::notes::store::SCHEMA)
            .map_err(err)?;
        // A `read` past every number the inbox gives (an older khub let
        // `mark_read` set it anywhere, `u64::MAX` for "all") would leave the
        // next message no number after it.
        db.conn
            .execute(
                "UPDATE identity SET read = MIN(read, MAX(cursor,
                     COALESCE((SELECT until FROM reread WHERE id = 1), 0),
                     COALESCE((SELECT MAX(seq) FROM inbox), 0)))
                 WHERE id = 1",
                [],
            )
            .map_err(err)?;
        let row = db
            .conn
            .query_row(
                "SELECT relay, name, token, device, channel FROM identity WHERE id = 1",
                [],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        Zeroizing::new(r.get::<_, Vec<u8>>(2)?),
                        r.get::<_, Vec<u8>>(3)?,
                        r.get::<_, Vec<u8>>(4)?,
                    ))
                },
            )
            .optional()
            .map_err(err)?
            .ok_or_else(|| ClientError::NotInitialized(home.display().to_string()))?;
        let (relay, name, token, device, channel) = row;
        let corrupt =
            |what: &str| ClientError::corrupt(format!("corrupt {what} in the state file"));
        let identity = Identity {
            relay,
            name,
            token: AccessToken::from_slice(&token).ok_or_else(|| corrupt("token"))?,
            device: DeviceId::from_slice(&device).ok_or_else(|| corrupt("device id"))?,
            channel: ChannelId::from_slice(&channel).ok_or_else(|| corrupt("channel id"))?,
        };
        Ok((db, identity))
    }

    fn connect(path: &Path) -> Result<Self, ClientError> {
        let conn = Connection::open(path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        // Deleted secrets (old epochs, consumed keys) are overwritten in the
        // file, not left in free pages.
        conn.pragma_update(None, "secure_delete", "ON")
            .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(err)?;
        Ok(Self { conn })
    }

    /// Runs `f` on the state as it is on disk, in one `BEGIN IMMEDIATE`
    /// transaction, and stores what it changed — or nothing, if `f` fails.
    pub fn change<T>(
        &mut self,
        f: impl FnOnce(&mut Change<'_>) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let (channel, cursor) = load_channel(&tx)?;
        let mut change = Change {
            tx,
            channel,
            cursor,
        };
        let out = f(&mut change)?;
        change.commit()?;
        Ok(out)
    }

    /// Reads the state as it is on disk.
    pub fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        f(&self.conn)
    }

    /// The channel and cursor as they are on disk, to read.
    pub fn channel(&self) -> Result<(Channel, u64), ClientError> {
        load_channel(&self.conn)
    }

    /// The cursor on disk, and the SHA-256 of the envelope taken in there
    /// when it is known (read at once: another process may move them).
    pub fn cursor_and_hash(&self) -> Result<(u64, Option<[u8; 32]>), ClientError> {
        cursor_and_hash(&self.conn)
    }

    /// How many envelopes wait for an ack.
    pub fn outbox_len(&self) -> Result<usize, ClientError> {
        self.conn
            .query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get::<_, i64>(0))
            .map_err(err)
            .map(|n| usize::try_from(n).unwrap_or(0))
    }

    /// Envelopes waiting for an ack after sender sequence number `after`,
    /// oldest first: up to `budget` bytes of them, and always the first.
    pub fn outbox_after(
        &self,
        after: u64,
        budget: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, ClientError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT sender_seq, envelope FROM outbox WHERE sender_seq > ?1 ORDER BY sender_seq",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map(params![i64_of(after)], |r| {
                Ok((u64_of(r.get(0)?), r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(err)?;
        let (mut page, mut bytes) = (Vec::new(), 0usize);
        for row in rows {
            let (sender_seq, envelope) = row.map_err(err)?;
            bytes = bytes.saturating_add(envelope.len());
            if !page.is_empty() && bytes > budget {
                break;
            }
            page.push((sender_seq, envelope));
        }
        Ok(page)
    }

    /// The relay acked these envelopes (sender sequence number, relay
    /// sequence number): they leave the outbox and are remembered as acked
    /// (the newest [`ANSWERS_KEPT`] of them), in one transaction. An ack for
    /// an envelope no longer queued is not recorded again: whoever took it
    /// out recorded it, and a number this device never queued (from a
    /// confused relay) must not push the real ones out.
    pub fn acked(&mut self, acks: &[(u64, u64)]) -> Result<(), ClientError> {
        let tx = self.conn.transaction().map_err(err)?;
        for &(sender_seq, seq) in acks {
            ack_in_outbox(&tx, sender_seq, seq)?;
        }
        keep_newest_answers(&tx, "acked")?;
        tx.commit().map_err(err)
    }

    /// The relay sequence number of this device's envelope `sender_seq`, if an
    /// ack for it was taken in (by any process on this home) and is still
    /// among the newest remembered.
    pub fn ack_of(&self, sender_seq: u64) -> Result<Option<u64>, ClientError> {
        self.conn
            .prepare_cached("SELECT seq FROM acked WHERE sender_seq = ?1")
            .map_err(err)?
            .query_row(params![i64_of(sender_seq)], |r| r.get::<_, i64>(0))
            .optional()
            .map(|seq| seq.map(u64_of))
            .map_err(err)
    }

    /// The relay's refusal of this device's envelope `sender_seq`, if one was
    /// taken in (by any process on this home) and is still among the newest
    /// remembered.
    pub fn refusal_of(&self, sender_seq: u64) -> Result<Option<Refusal>, ClientError> {
        let text = self
            .conn
            .prepare_cached("SELECT refusal FROM refused WHERE sender_seq = ?1")
            .map_err(err)?
            .query_row(params![i64_of(sender_seq)], |r| r.get::<_, String>(0))
            .optional()
            .map_err(err)?;
        text.map(|text| {
            serde_json::from_str(&text)
                .map_err(|e| ClientError::disk("a recorded refusal could not be read", e))
        })
        .transpose()
    }

    /// The relay sequence number of this device's commit `sender_seq`, once
    /// it has won its epoch.
    pub fn commit_seq(&self, sender_seq: u64) -> Result<Option<u64>, ClientError> {
        self.conn
            .query_row(
                "SELECT seq FROM commits WHERE sender_seq = ?1",
                params![i64_of(sender_seq)],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map(|seq| seq.map(u64_of))
            .map_err(err)
    }

    /// Whether `device`'s "joined" message was taken in.
    pub fn has_joined(&self, device: DeviceId) -> Result<bool, ClientError> {
        self.conn
            .query_row(
                "SELECT 1 FROM joined WHERE device = ?1",
                params![device.as_bytes()],
                |_| Ok(()),
            )
            .optional()
            .map(|r| r.is_some())
            .map_err(err)
    }

    /// The incidents recorded so far, oldest first.
    pub fn incidents(&self) -> Result<Vec<Incident>, ClientError> {
        let mut statement = self
            .conn
            .prepare("SELECT seq, kind, sender, detail FROM incidents ORDER BY id")
            .map_err(err)?;
        let rows = statement
            .query_map([], |r| {
                let sender: Option<Vec<u8>> = r.get(2)?;
                Ok(Incident {
                    seq: u64_of(r.get(0)?),
                    kind: RefusalKind::parse(&r.get::<_, String>(1)?),
                    sender: sender.and_then(|b| DeviceId::from_slice(&b)),
                    detail: r.get(3)?,
                })
            })
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }

    /// The oldest message the app has not read yet.
    pub fn next_unread(&self) -> Result<Option<InboxMessage>, ClientError> {
        self.conn
            .query_row(
                "SELECT seq, sender, name, body FROM inbox WHERE seq > (SELECT read FROM identity WHERE id = 1)
                 ORDER BY seq LIMIT 1",
                [],
                |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?, r.get::<_, String>(2)?, r.get::<_, Vec<u8>>(3)?))
                },
            )
            .optional()
            .map_err(err)?
            .map(|(seq, sender, from_name, body)| {
                Ok(InboxMessage {
                    seq: u64_of(seq),
                    from: DeviceId::from_slice(&sender).ok_or_else(|| ClientError::corrupt("corrupt sender id in the state file"))?,
                    from_name,
                    body,
                })
            })
            .transpose()
    }

    /// The app has read everything up to `seq`: read messages are deleted.
    pub fn mark_read(&mut self, seq: u64) -> Result<(), ClientError> {
        let tx = self.conn.transaction().map_err(err)?;
        // Never past the newest message the inbox holds: the next one is
        // numbered after `read`, so a `read` at the end of the numbers would
        // leave it none (and a later message would be hidden).
        tx.execute(
            "UPDATE identity SET read = MAX(read, MIN(?1, COALESCE((SELECT MAX(seq) FROM inbox), read)))
             WHERE id = 1",
            params![i64_of(seq)],
        )
        .map_err(err)?;
        tx.execute("DELETE FROM inbox WHERE seq <= ?1", params![i64_of(seq)])
            .map_err(err)?;
        tx.commit().map_err(err)
    }
}

/// Deletes the device state kept in `home` (the database and its WAL files);
/// the directory stays. Nothing else may have the state open.
pub fn forget(home: &Path) -> Result<(), ClientError> {
    if !home.join(STATE_FILE).exists() {
        return Err(ClientError::NotInitialized(home.display().to_string()));
    }
    for suffix in ["", "-wal", "-shm"] {
        let path = home.join(format!("{STATE_FILE}{suffix}"));
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(ClientError::disk(
                    format!("cannot remove {}", path.display()),
                    e,
                ));
            }
        }
    }
    Ok(())
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> Result<(), ClientError> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| ClientError::disk(format!("cannot create {}", dir.display()), e))?;
    }
    Ok(())
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> Result<(), ClientError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| ClientError::disk(format!("cannot create {}", dir.display()), e))
}

#[cfg(unix)]
fn create_private_file(path: &Path) -> Result<(), ClientError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(drop)
        .map_err(|e| ClientError::disk(format!("cannot create {}", path.display()), e))
}

#[cfg(not(unix))]
fn create_private_file(path: &Path) -> Result<(), ClientError> {
    std::fs::File::create(path)
        .map(drop)
        .map_err(|e| ClientError::disk(format!("cannot create {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::os_rng;

    /// A new device's state in a scratch home, with envelopes 1 and 2 queued.
    fn with_two_queued() -> StateDb {
        let (channel, device) = (
            ChannelId::random(&mut os_rng()),
            DeviceId::random(&mut os_rng()),
        );
        let home =
            std::env::temp_dir().join(format!("khub-state-unit-{}-{device}", std::process::id()));
        let identity = Identity {
            relay: "http://127.0.0.1:1".into(),
            name: "laptop".into(),
            token: AccessToken::generate(&mut os_rng()),
            device,
            channel,
        };
        let mut group = Channel::create(channel, device, "laptop", 0).unwrap();
        let db = StateDb::create(&home, &identity, &mut group, 0).unwrap();
        db.conn
            .execute_batch(
                "INSERT INTO outbox (sender_seq, envelope) VALUES (1, x'00'), (2, x'00')",
            )
            .unwrap();
        db
    }

    #[test]
    fn only_answers_for_envelopes_still_queued_are_remembered() {
        let mut db = with_two_queued();
        // An ack for 1, and one for a number this device never queued (a
        // confused relay's, which must not push real acks out of the kept ones).
        db.acked(&[(1, 10), (u64::MAX >> 1, 11)]).unwrap();
        assert_eq!(db.ack_of(1).unwrap(), Some(10));
        assert_eq!(db.ack_of(u64::MAX >> 1).unwrap(), None);
        // The same ack taken in again (another process's session) changes nothing.
        db.acked(&[(1, 12)]).unwrap();
        assert_eq!(db.ack_of(1).unwrap(), Some(10));

        let refusal = Refusal::new(crate::protocol::ErrorCode::TooLarge, "too large");
        let recorded = db
            .change(|change| {
                let mut recorded = Vec::new();
                for seq in [2, 2, 7] {
                    if change.unqueue(seq)? {
                        change.refused(seq, &refusal)?;
                        recorded.push(seq);
                    }
                }
                Ok(recorded)
            })
            .unwrap();
        assert_eq!(
            recorded,
            [2],
            "each queued envelope leaves once, an unknown one never"
        );
        assert_eq!(db.refusal_of(2).unwrap(), Some(refusal));
        assert_eq!(db.refusal_of(7).unwrap(), None);
        assert_eq!(db.outbox_len().unwrap(), 0);
    }
}
