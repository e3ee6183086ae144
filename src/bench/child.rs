//! A server as a child process (`khub serve`, or the baseline), so its memory
//! and CPU are measured alone.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running `khub serve` or baseline; killed on drop.
pub(super) struct ServerChild {
    child: Child,
    /// Where it listens.
    pub(super) addr: SocketAddr,
}

impl ServerChild {
    /// Starts `khub serve --listen 127.0.0.1:0` with `args` and waits for the
    /// line that gives its address.
    pub(super) fn spawn(khub: &Path, args: &[String]) -> Result<Self, String> {
        Self::start(khub, &["serve", "--listen", "127.0.0.1:0"], args)
    }

    /// Starts the bare baseline (`khub bench --serve-baseline`) on its own.
    pub(super) fn baseline(khub: &Path) -> Result<Self, String> {
        Self::start(khub, &["bench", "--serve-baseline"], &[])
    }

    fn start(khub: &Path, command: &[&str], args: &[String]) -> Result<Self, String> {
        use std::io::BufRead;
        let mut child = Command::new(khub)
            .args(command)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", khub.display()))?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().ok_or("no stdout")?)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let Some(addr) = line
            .split_whitespace()
            .find_map(|w| w.trim_end_matches(',').parse().ok())
        else {
            let _ = child.kill();
            return Err(format!("no address in {line:?}"));
        };
        Ok(Self { child, addr })
    }

    /// A field of /proc/PID/status in KiB (VmRSS: now; VmHWM: peak).
    pub(super) fn memory_kib(&self, field: &str) -> Result<u64, String> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .map_err(|e| e.to_string())?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("no {field} in /proc status"))
    }

    /// On-CPU time so far of its threads (user + system), or `None` where
    /// `/proc` does not say. Its runtime's threads live as long as it does.
    pub(super) fn cpu(&self) -> Option<Duration> {
        super::cpu::threads_cpu(&format!("/proc/{}/task", self.child.id()), |_| true)
    }

    /// Whether it is still running.
    pub(super) fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
