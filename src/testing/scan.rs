//! Searches what the relay keeps — its database files and its logs — for
//! anything it must never hold: plaintext, keys, tokens, codes.
//!
//! Each secret is looked for as raw bytes, as UTF-8 text where it is text, and
//! as hex and base64 (standard and URL alphabets) at every alignment, so a
//! secret embedded inside a longer encoded blob is still found.

use std::path::Path;
use std::sync::Mutex;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};

/// Shortest secret worth looking for: shorter ones match by chance.
const MIN_LEN: usize = 8;

/// A secret found where it must not be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The secret's name, as given to [`Scanner::add`].
    pub secret: String,
    /// Where: a file name, or "logs".
    pub place: String,
    /// How it was written there: "raw", "hex", "base64"…
    pub form: &'static str,
}

/// The encodings of one secret, each named.
type Forms = Vec<(&'static str, Vec<u8>)>;

/// The secrets to look for.
#[derive(Default)]
pub struct Scanner {
    secrets: Vec<(String, Forms)>,
}

impl Scanner {
    /// An empty scanner.
    pub fn new() -> Self {
        Self::default()
    }

    /// Looks for `bytes` (at least 8 of them), named `name` in findings.
    pub fn add(&mut self, name: impl Into<String>, bytes: &[u8]) -> &mut Self {
        assert!(
            bytes.len() >= MIN_LEN,
            "secrets shorter than {MIN_LEN} bytes would match by chance"
        );
        self.secrets.push((name.into(), forms(bytes)));
        self
    }

    /// Looks for every secret `device` holds: its relay token, private key
    /// and MLS secrets.
    pub fn add_device(&mut self, device: &crate::client::Device) -> &mut Self {
        for (name, bytes) in device.secrets_for_scan() {
            self.add(format!("{} of {}", name, device.name()), &bytes);
        }
        self
    }

    /// Looks for a pairing code, as typed and as its bare secret.
    pub fn add_code(&mut self, code: &crate::pairing::Code) -> &mut Self {
        self.add("pairing code", code.display().as_bytes());
        self.add("pairing code secret", code.secret().expose())
    }

    /// How many secrets are looked for.
    pub fn len(&self) -> usize {
        self.secrets.len()
    }

    /// Whether no secret was added.
    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// Searches `haystack`, naming it `place` in findings.
    pub fn scan_bytes(&self, place: &str, haystack: &[u8]) -> Vec<Finding> {
        let mut findings = Vec::new();
        for (name, forms) in &self.secrets {
            if let Some((form, _)) = forms.iter().find(|(_, needle)| contains(haystack, needle)) {
                findings.push(Finding {
                    secret: name.clone(),
                    place: place.to_owned(),
                    form,
                });
            }
        }
        findings
    }

    /// Searches every file directly in `dir` (a relay's database, WAL and
    /// shared-memory files).
    pub fn scan_dir(&self, dir: &Path) -> std::io::Result<Vec<Finding>> {
        let mut findings = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_file() {
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                findings.extend(self.scan_bytes(&name.unwrap_or_default(), &std::fs::read(&path)?));
            }
        }
        Ok(findings)
    }

    /// Searches the logs captured since [`capture_logs`].
    pub fn scan_logs(&self) -> Vec<Finding> {
        self.scan_bytes("logs", captured_logs().as_bytes())
    }
}

/// The encodings `bytes` could appear in.
fn forms(bytes: &[u8]) -> Forms {
    let mut forms = vec![
        ("raw", bytes.to_vec()),
        ("hex", hex::encode(bytes).into_bytes()),
        ("HEX", hex::encode_upper(bytes).into_bytes()),
    ];
    // In base64, a secret that starts `k` bytes into a longer blob is written
    // differently for each k mod 3; keep only the characters that depend on
    // the secret's bytes alone.
    for k in 0..3 {
        let mut padded = vec![0u8; k];
        padded.extend_from_slice(bytes);
        let first = (8 * k).div_ceil(6);
        let end = 8 * (k + bytes.len()) / 6;
        for (name, engine) in [
            ("base64", &STANDARD_NO_PAD),
            ("base64url", &URL_SAFE_NO_PAD),
        ] {
            let encoded = engine.encode(&padded).into_bytes();
            forms.push((name, encoded[first..end.min(encoded.len())].to_vec()));
        }
    }
    forms
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && memchr::memmem::find(haystack, needle).is_some()
}

/// Most log bytes kept; later lines are dropped (and the scan says so).
const LOG_LIMIT: usize = 64 << 20;

static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut logs = LOGS.lock().unwrap_or_else(|e| e.into_inner());
        if logs.len() + buf.len() <= LOG_LIMIT {
            logs.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures this process's logs (khub's at debug level, everything else's
/// warnings) in memory for [`Scanner::scan_logs`]. Safe to call more than
/// once; the first call in a process installs the subscriber.
pub fn capture_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn,khub=debug"))
        .with_ansi(false)
        .with_writer(|| LogWriter)
        .try_init();
}

/// Everything captured so far.
pub fn captured_logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}
