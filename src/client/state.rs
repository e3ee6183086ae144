//! A device's state on disk: one SQLite file in the device's home directory,
//! created with mode 0600 (its directory 0700), holding the identity, the
//! keyring, the cursor, the outbox of sealed envelopes not yet acked, and the
//! inbox of opened messages not yet read by the app.
//!
//! Every change that must not be half-done is one transaction: sealing (the
//! keyring's next sequence number and the outbox row), ingesting (the cursor,
//! the keyring's replay windows and the inbox row). `synchronous = FULL`, so a
//! message `send` accepted survives a crash of the app or the machine.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use zeroize::Zeroizing;

use super::error::ClientError;
use super::incident::{Incident, IncidentKind};
use crate::channel::Keyring;
use crate::crypto::token::AccessToken;
use crate::ids::DeviceId;

/// File name of the state database inside the home directory.
pub const STATE_FILE: &str = "device.sqlite3";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS identity (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    relay    TEXT NOT NULL,
    name     TEXT NOT NULL,
    token    BLOB NOT NULL,     -- the relay access token (secret)
    keyring  BLOB NOT NULL,     -- Keyring::export (secret)
    cursor   INTEGER NOT NULL,  -- last relay sequence number ingested
    read     INTEGER NOT NULL   -- last inbox message the app has read
);
CREATE TABLE IF NOT EXISTS outbox (
    sender_seq INTEGER PRIMARY KEY,
    envelope   BLOB NOT NULL
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
";

/// What the identity row holds besides the keyring.
pub struct Identity {
    /// The relay's URL.
    pub relay: String,
    /// This device's name.
    pub name: String,
    /// The relay access token.
    pub token: AccessToken,
    /// The keyring.
    pub keyring: Keyring,
    /// Last relay sequence number ingested.
    pub cursor: u64,
}

/// A message in the inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxMessage {
    /// Relay sequence number.
    pub seq: u64,
    /// Sending device.
    pub from: DeviceId,
    /// Its name.
    pub from_name: String,
    /// The application's bytes.
    pub body: Vec<u8>,
}

/// The open state database.
pub struct StateDb {
    conn: Connection,
    path: PathBuf,
}

fn err(e: rusqlite::Error) -> ClientError {
    ClientError::state(e)
}

impl StateDb {
    /// Creates the state of a new device in `home`; fails if one exists.
    pub fn create(home: &Path, identity: &Identity) -> Result<Self, ClientError> {
        let path = home.join(STATE_FILE);
        if path.exists() {
            return Err(ClientError::AlreadyInitialized(home.display().to_string()));
        }
        create_private_dir(home)?;
        create_private_file(&path)?;
        let db = Self::connect(&path)?;
        db.conn
            .execute(
                "INSERT INTO identity (id, relay, name, token, keyring, cursor, read) VALUES (1, ?1, ?2, ?3, ?4, ?5, 0)",
                params![
                    identity.relay,
                    identity.name,
                    identity.token.expose().as_slice(),
                    identity.keyring.export().as_slice(),
                    identity.cursor as i64
                ],
            )
            .map_err(err)?;
        Ok(db)
    }

    /// Opens the state of the device in `home`.
    pub fn open(home: &Path) -> Result<(Self, Identity), ClientError> {
        let path = home.join(STATE_FILE);
        if !path.exists() {
            return Err(ClientError::NotInitialized(home.display().to_string()));
        }
        let db = Self::connect(&path)?;
        let row = db
            .conn
            .query_row(
                "SELECT relay, name, token, keyring, cursor FROM identity WHERE id = 1",
                [],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        Zeroizing::new(r.get::<_, Vec<u8>>(2)?),
                        Zeroizing::new(r.get::<_, Vec<u8>>(3)?),
                        r.get::<_, i64>(4)?,
                    ))
                },
            )
            .optional()
            .map_err(err)?
            .ok_or_else(|| ClientError::NotInitialized(home.display().to_string()))?;
        let (relay, name, token, keyring, cursor) = row;
        let identity = Identity {
            relay,
            name,
            token: AccessToken::from_slice(&token)
                .ok_or_else(|| ClientError::state("corrupt token"))?,
            keyring: Keyring::import(&keyring)
                .map_err(|e| ClientError::state(format!("corrupt keyring: {e}")))?,
            cursor: cursor as u64,
        };
        Ok((db, identity))
    }

    fn connect(path: &Path) -> Result<Self, ClientError> {
        let conn = Connection::open(path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        Ok(Self {
            conn,
            path: path.to_owned(),
        })
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stores the keyring alone (after a change that carries no message).
    pub fn save_keyring(&mut self, keyring: &Keyring) -> Result<(), ClientError> {
        self.conn
            .execute(
                "UPDATE identity SET keyring = ?1 WHERE id = 1",
                params![keyring.export().as_slice()],
            )
            .map_err(err)?;
        Ok(())
    }

    /// Atomically: the keyring (its sequence counter moved) and a new outbox row.
    pub fn queue(
        &mut self,
        keyring: &Keyring,
        sender_seq: u64,
        envelope: &[u8],
    ) -> Result<(), ClientError> {
        let tx = self.conn.transaction().map_err(err)?;
        tx.execute(
            "UPDATE identity SET keyring = ?1 WHERE id = 1",
            params![keyring.export().as_slice()],
        )
        .map_err(err)?;
        tx.execute(
            "INSERT INTO outbox (sender_seq, envelope) VALUES (?1, ?2)",
            params![sender_seq as i64, envelope],
        )
        .map_err(err)?;
        tx.commit().map_err(err)
    }

    /// Envelopes waiting for an ack, oldest first.
    pub fn outbox(&self) -> Result<Vec<(u64, Vec<u8>)>, ClientError> {
        let mut stmt = self
            .conn
            .prepare("SELECT sender_seq, envelope FROM outbox ORDER BY sender_seq")
            .map_err(err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }

    /// The relay acked an envelope: it leaves the outbox.
    pub fn acked(&mut self, sender_seq: u64) -> Result<(), ClientError> {
        self.conn
            .execute(
                "DELETE FROM outbox WHERE sender_seq = ?1",
                params![sender_seq as i64],
            )
            .map_err(err)?;
        Ok(())
    }

    /// Atomically: the new cursor, the keyring (replay windows, members, keys),
    /// the opened messages for the app, and the incidents.
    pub fn ingest(
        &mut self,
        cursor: u64,
        keyring: &Keyring,
        messages: &[InboxMessage],
        incidents: &[Incident],
    ) -> Result<(), ClientError> {
        let tx = self.conn.transaction().map_err(err)?;
        tx.execute(
            "UPDATE identity SET cursor = ?1, keyring = ?2 WHERE id = 1",
            params![cursor as i64, keyring.export().as_slice()],
        )
        .map_err(err)?;
        for m in messages {
            tx.execute(
                "INSERT OR IGNORE INTO inbox (seq, sender, name, body) VALUES (?1, ?2, ?3, ?4)",
                params![m.seq as i64, m.from.as_bytes(), m.from_name, m.body],
            )
            .map_err(err)?;
        }
        for incident in incidents {
            tx.execute(
                "INSERT INTO incidents (seq, kind, sender, detail) VALUES (?1, ?2, ?3, ?4)",
                params![
                    incident.seq as i64,
                    incident.kind.as_str(),
                    incident.sender.as_ref().map(|d| d.as_bytes().to_vec()),
                    incident.detail
                ],
            )
            .map_err(err)?;
        }
        if !incidents.is_empty() {
            tx.execute(
                "DELETE FROM incidents WHERE id <= (SELECT MAX(id) FROM incidents) - ?1",
                params![super::incident::KEPT as i64],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)
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
                    seq: r.get::<_, i64>(0)? as u64,
                    kind: IncidentKind::parse(&r.get::<_, String>(1)?),
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
                    seq: seq as u64,
                    from: DeviceId::from_slice(&sender).ok_or_else(|| ClientError::state("corrupt sender id"))?,
                    from_name,
                    body,
                })
            })
            .transpose()
    }

    /// The app has read everything up to `seq`: read messages are deleted.
    pub fn mark_read(&mut self, seq: u64) -> Result<(), ClientError> {
        let tx = self.conn.transaction().map_err(err)?;
        tx.execute(
            "UPDATE identity SET read = MAX(read, ?1) WHERE id = 1",
            params![seq as i64],
        )
        .map_err(err)?;
        tx.execute("DELETE FROM inbox WHERE seq <= ?1", params![seq as i64])
            .map_err(err)?;
        tx.commit().map_err(err)
    }
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> Result<(), ClientError> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(ClientError::state)?;
    }
    Ok(())
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> Result<(), ClientError> {
    std::fs::create_dir_all(dir).map_err(ClientError::state)
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
        .map_err(ClientError::state)
}

#[cfg(not(unix))]
fn create_private_file(path: &Path) -> Result<(), ClientError> {
    std::fs::File::create(path)
        .map(drop)
        .map_err(ClientError::state)
}
