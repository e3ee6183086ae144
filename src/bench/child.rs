//! A relay as a child process (`khub serve`), so its memory is measured alone.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A running `khub serve`; killed on drop.
pub(super) struct RelayChild {
    child: Child,
    /// Where it listens.
    pub(super) addr: SocketAddr,
}

impl RelayChild {
    /// Starts `khub serve --listen 127.0.0.1:0` with `args` and waits for the
    /// line that gives its address.
    pub(super) fn spawn(khub: &Path, args: &[String]) -> Result<Self, String> {
        use std::io::BufRead;
        let mut child = Command::new(khub)
            .args(["serve", "--listen", "127.0.0.1:0"])
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

    /// Whether it is still running.
    pub(super) fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for RelayChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
