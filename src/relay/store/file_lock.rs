//! One relay process per SQLite file: an exclusive advisory lock on
//! `<database>-lock`, held for as long as a store's writer thread runs.
//!
//! The writer keeps channel heads in memory (see `sqlite.rs`), so a second
//! process writing the same file would make both fail batches. The lock
//! refuses the second one at start instead, with a message that names the
//! holder. It is a separate file, not the database itself: closing any
//! descriptor of the database would drop SQLite's own POSIX locks on it.
//!
//! Within one process the lock is shared: a store being dropped while its
//! replacement opens (a restart in a test, say) must not make the new one wait
//! for tasks that still hold the old one.

use std::collections::HashMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::StoreError;

/// How long opening waits for another process to let go: a relay restarted
/// by its supervisor may start while the old one still shuts down.
const WAIT: Duration = Duration::from_secs(2);
const RETRY: Duration = Duration::from_millis(10);

/// The lock, shared by every store of this process on the same file.
pub(super) struct FileLock {
    _file: Arc<File>,
}

/// Locks this process holds, by lock file path.
static HELD: Mutex<Option<HashMap<PathBuf, Weak<File>>>> = Mutex::new(None);

/// The lock file for `database`: beside the file the path resolves to, so a
/// symlink and its target share one lock.
pub(super) fn path_for(database: &Path) -> PathBuf {
    let resolved = std::fs::canonicalize(database).unwrap_or_else(|_| {
        // Not created yet: resolve the directory, keep the name.
        let parent = database
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let parent = std::fs::canonicalize(parent).unwrap_or_else(|_| parent.to_owned());
        match database.file_name() {
            Some(name) => parent.join(name),
            None => database.to_owned(),
        }
    });
    let mut name = resolved.into_os_string();
    name.push("-lock");
    PathBuf::from(name)
}

/// Takes the lock for `database` (or shares this process's), waiting up to
/// [`WAIT`] for another process; it lasts until every returned [`FileLock`]
/// is dropped. Writes this process's id into the file, for the message
/// another process gets.
pub(super) fn acquire(database: &Path) -> Result<FileLock, StoreError> {
    let path = path_for(database);
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    let held = held.get_or_insert_with(HashMap::new);
    if let Some(file) = held.get(&path).and_then(Weak::upgrade) {
        return Ok(FileLock { _file: file });
    }
    let file = Arc::new(lock(&path, database)?);
    held.retain(|_, file| file.strong_count() > 0);
    held.insert(path, Arc::downgrade(&file));
    Ok(FileLock { _file: file })
}

/// Opens and locks `path`, or says who holds it.
fn lock(path: &Path, database: &Path) -> Result<File, StoreError> {
    let mut file = open(path).map_err(|e| {
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

/// The lock file, created readable by its owner only (whoever can open it can
/// hold the lock) and never through a symlink.
fn open(path: &Path) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600).custom_flags(libc::O_NOFOLLOW);
    }
    options.open(path)
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

    /// What another process does: its own open file description, locked.
    fn other_process_holds(database: &Path, pid: u32) -> File {
        let mut file = open(&path_for(database)).unwrap();
        file.try_lock().unwrap();
        file.set_len(0).unwrap();
        writeln!(file, "{pid}").unwrap();
        file
    }

    #[test]
    fn another_holder_is_refused_with_its_id_until_it_lets_go() {
        let database = scratch();
        let other = other_process_holds(&database, 4242);
        let started = Instant::now();
        let Err(StoreError::Backend(message)) = acquire(&database) else {
            panic!("a second lock on the same file was granted");
        };
        assert!(started.elapsed() >= WAIT, "gave up before waiting");
        assert!(message.contains("another khub serve"), "{message}");
        assert!(message.contains("(process 4242)"), "{message}");
        assert!(message.contains("relay.sqlite3"), "{message}");
        drop(other);
        let mine = acquire(&database).unwrap();
        let written = std::fs::read_to_string(path_for(&database)).unwrap();
        assert_eq!(written.trim(), std::process::id().to_string());
        drop(mine);
        let _ = std::fs::remove_dir_all(database.parent().unwrap());
    }

    #[test]
    fn a_lock_let_go_while_waiting_is_taken() {
        let database = scratch();
        let other = other_process_holds(&database, 4242);
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(other);
        });
        assert!(acquire(&database).is_ok());
        release.join().unwrap();
        let _ = std::fs::remove_dir_all(database.parent().unwrap());
    }

    #[test]
    fn this_process_shares_its_lock_and_lets_go_with_the_last_holder() {
        let database = scratch();
        let first = acquire(&database).unwrap();
        let second = acquire(&database).unwrap();
        drop(first);
        // Still held for the second store: another process is refused.
        let probe = open(&path_for(&database)).unwrap();
        assert!(matches!(probe.try_lock(), Err(TryLockError::WouldBlock)));
        drop(second);
        assert!(probe.try_lock().is_ok());
        let _ = probe.unlock();
        let _ = std::fs::remove_dir_all(database.parent().unwrap());
    }

    #[cfg(unix)]
    #[test]
    fn a_symlink_and_its_target_share_one_lock_and_the_lock_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let database = scratch();
        std::fs::write(&database, b"").unwrap();
        let link = database.with_file_name("link.sqlite3");
        std::os::unix::fs::symlink(&database, &link).unwrap();
        assert_eq!(path_for(&link), path_for(&database));
        let lock = acquire(&database).unwrap();
        let mode = std::fs::metadata(path_for(&database))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(lock);
        // A lock file that is itself a symlink is not followed.
        let target = database.with_file_name("elsewhere");
        std::fs::write(&target, b"keep").unwrap();
        std::fs::remove_file(path_for(&database)).unwrap();
        std::os::unix::fs::symlink(&target, path_for(&database)).unwrap();
        assert!(acquire(&database).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        let _ = std::fs::remove_dir_all(database.parent().unwrap());
    }
}
