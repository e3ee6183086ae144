//! One relay per SQLite file: an exclusive advisory lock on `<database>-lock`,
//! held for as long as the store's writer thread runs.
//!
//! The writer keeps channel heads in memory (see `sqlite.rs`), so a second
//! process writing the same file would make both fail batches. The lock
//! refuses the second one at start instead, with a message that names the
//! holder. It is a separate file, not the database itself: closing any
//! descriptor of the database would drop SQLite's own POSIX locks on it.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::StoreError;

/// How long opening waits for the lock: long enough for a store on the same
/// file in this process to finish its last batch and let go, short enough
/// that a second `khub serve` hears at once why it cannot start.
const WAIT: Duration = Duration::from_secs(2);
const RETRY: Duration = Duration::from_millis(10);

/// The lock file beside `database`.
pub(super) fn path_for(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push("-lock");
    PathBuf::from(name)
}

/// Takes the lock for `database`, waiting up to [`WAIT`]; the lock lasts as
/// long as the returned file is open. Writes this process's id into it, for
/// the message another process gets.
pub(super) fn acquire(database: &Path) -> Result<File, StoreError> {
    let path = path_for(database);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| {
            StoreError::Backend(format!("cannot open the lock file {}: {e}", path.display()))
        })?;
    let started = Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(TryLockError::WouldBlock) if started.elapsed() < WAIT => {
                std::thread::sleep(RETRY);
            }
            Err(TryLockError::WouldBlock) => {
                return Err(StoreError::Backend(held_by_another(database, &mut file)));
            }
            Err(TryLockError::Error(e)) => {
                return Err(StoreError::Backend(format!(
                    "cannot lock {}: {e}",
                    path.display()
                )));
            }
        }
    }
    // The id is a courtesy for the operator; the lock is what counts.
    let _ = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()));
    Ok(file)
}

/// The operator's message when another process holds the lock.
fn held_by_another(database: &Path, file: &mut File) -> String {
    let mut holder = String::new();
    let _ = file.read_to_string(&mut holder);
    let holder = match holder.trim().parse::<u32>() {
        Ok(pid) => format!(" (process {pid})"),
        Err(_) => String::new(),
    };
    format!(
        "another khub serve{holder} is using {}: stop it, or give this relay its own --db \
         (several relays share one database on PostgreSQL, not SQLite)",
        database.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "khub-lock-{}-{}",
            std::process::id(),
            crate::ids::DeviceId::random(&mut crate::crypto::os_rng())
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("relay.sqlite3")
    }

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_id_until_it_lets_go() {
        let database = scratch();
        let first = acquire(&database).unwrap();
        let started = Instant::now();
        let Err(StoreError::Backend(message)) = acquire(&database) else {
            panic!("a second lock on the same file was granted");
        };
        assert!(started.elapsed() >= WAIT, "gave up before waiting");
        assert!(message.contains("another khub serve"), "{message}");
        assert!(
            message.contains(&format!("process {}", std::process::id())),
            "{message}"
        );
        assert!(message.contains("relay.sqlite3"), "{message}");
        drop(first);
        let second = acquire(&database).unwrap();
        drop(second);
        let _ = std::fs::remove_dir_all(database.parent().unwrap());
    }

    #[test]
    fn a_lock_let_go_while_waiting_is_taken() {
        let database = scratch();
        let first = acquire(&database).unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(first);
        });
        assert!(acquire(&database).is_ok());
        release.join().unwrap();
        let _ = std::fs::remove_dir_all(database.parent().unwrap());
    }
}
