//! What the servers under test cost in CPU, apart from the load generator in
//! the same process, and what one fsync costs on this machine.
//!
//! The relays and the baseline run on a runtime of their own whose threads
//! are named [`SERVER_THREAD`]; the SQLite writer names its thread
//! `khub-sqlite-writer`. Their on-CPU time is read from Linux's
//! `/proc/self/task/*/schedstat` (nanoseconds), so a shared, noisy machine
//! changes wall-clock rates but hardly the CPU time per delivery.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// Name of the server runtime's threads (Linux keeps 15 bytes of a name).
pub(super) const SERVER_THREAD: &str = "kb-server";

/// Threads whose CPU counts as the servers': the server runtime's and the
/// SQLite store's writer.
const SERVER_PREFIXES: [&str; 2] = [SERVER_THREAD, "khub-sqlite"];

/// A runtime for the servers under test, apart from the load generator's.
pub(super) fn server_runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(SERVER_THREAD)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the servers' runtime: {e}"))
}

/// On-CPU time of the server threads so far (user + system), or `None` where
/// `/proc` does not say (not Linux).
pub(super) fn server_cpu() -> Option<Duration> {
    threads_cpu("/proc/self/task", |comm| {
        SERVER_PREFIXES.iter().any(|p| comm.starts_with(p))
    })
}

/// On-CPU time so far (user + system) of the threads under `tasks`, a
/// `/proc/PID/task` directory, whose name `counts`.
pub(super) fn threads_cpu(tasks: &str, counts: impl Fn(&str) -> bool) -> Option<Duration> {
    let mut total = Duration::ZERO;
    for task in std::fs::read_dir(tasks).ok()?.flatten() {
        let path = task.path();
        let Ok(comm) = std::fs::read_to_string(path.join("comm")) else {
            continue;
        };
        if !counts(&comm) {
            continue;
        }
        let Ok(schedstat) = std::fs::read_to_string(path.join("schedstat")) else {
            continue;
        };
        let ns: u64 = schedstat.split_whitespace().next()?.parse().ok()?;
        total += Duration::from_nanos(ns);
    }
    Some(total)
}

/// Latency of writing 4 KiB and `fdatasync` in `dir`, `samples` times,
/// added to `micros`: the floor under a durable commit on this disk.
pub(super) fn fsync_latency(
    dir: &Path,
    samples: usize,
    micros: &mut Vec<u32>,
) -> Result<(), String> {
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path).map_err(|e| e.to_string())?;
    let block = [0x5a_u8; 4096];
    for _ in 0..samples {
        let started = Instant::now();
        file.write_all(&block).map_err(|e| e.to_string())?;
        file.sync_data().map_err(|e| e.to_string())?;
        micros.push(u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX));
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_threads_are_counted_and_others_are_not() {
        let Some(before) = server_cpu() else {
            return; // not Linux
        };
        // Work on this (unnamed) thread does not count.
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(50) {}
        let idle = server_cpu().unwrap() - before;
        assert!(idle < Duration::from_millis(20), "{idle:?}");
        // Work on a server runtime thread does: 100 ms of its own CPU time
        // (not of wall time, which a loaded machine stretches).
        let runtime = server_runtime().unwrap();
        runtime.block_on(async {
            tokio::spawn(async {
                let own = || {
                    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
                    Duration::from_nanos(stat.split_whitespace().next().unwrap().parse().unwrap())
                };
                let start = own();
                while own() - start < Duration::from_millis(100) {}
            })
            .await
            .unwrap();
        });
        let busy = server_cpu().unwrap() - before;
        assert!(busy >= Duration::from_millis(60), "{busy:?}");
    }
}
