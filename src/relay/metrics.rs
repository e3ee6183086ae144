//! Counters and gauges in Prometheus text format (`GET /metrics`).
//!
//! A handful of atomics, rendered by hand: the exposition format is a few lines
//! of text and a client library would add more code than it saves.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Buckets of the store commit latency histogram, in seconds.
const COMMIT_BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Limits whose breaches are counted, as they appear in the `limit` label.
pub const LIMITS: [&str; 14] = [
    "frame_size",
    "envelope_size",
    "connections_per_ip",
    "claims_per_ip",
    "channels_per_ip",
    "devices_per_channel",
    "idle_timeout",
    "slow_reader",
    "channel_quota",
    "pairing_messages",
    "slots_per_device",
    "slots_per_channel",
    "storage_budget",
    "origin",
];

/// The relay's metrics. One instance per relay, shared by reference.
#[derive(Default)]
pub struct Metrics {
    /// Open WebSocket sessions (authenticated).
    pub sessions: AtomicU64,
    /// Open TCP connections.
    pub connections: AtomicU64,
    /// Channels created since start.
    pub channels_created: AtomicU64,
    /// Envelopes stored (not counting retried duplicates).
    pub envelopes_in: AtomicU64,
    /// Envelope bytes stored.
    pub bytes_in: AtomicU64,
    /// Envelopes delivered to devices.
    pub envelopes_out: AtomicU64,
    /// Envelope bytes delivered.
    pub bytes_out: AtomicU64,
    /// Pairings opened.
    pub pairings_started: AtomicU64,
    /// Pairings both sides ended as completed.
    pub pairings_succeeded: AtomicU64,
    /// Pairings aborted or expired.
    pub pairings_failed: AtomicU64,
    /// Authentication failures.
    pub auth_failures: AtomicU64,
    commit_buckets: [AtomicU64; COMMIT_BUCKETS.len()],
    commit_count: AtomicU64,
    commit_sum_micros: AtomicU64,
    breaches: [AtomicU64; LIMITS.len()],
}

impl Metrics {
    /// Adds one to a counter.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    /// Subtracts one from a gauge.
    pub fn dec(gauge: &AtomicU64) {
        gauge.fetch_sub(1, Relaxed);
    }

    /// Counts a breach of `limit` (one of [`LIMITS`]).
    pub fn breach(&self, limit: &str) {
        if let Some(i) = LIMITS.iter().position(|l| *l == limit) {
            self.breaches[i].fetch_add(1, Relaxed);
        }
    }

    /// Breaches of `limit` so far.
    pub fn breaches(&self, limit: &str) -> u64 {
        LIMITS
            .iter()
            .position(|l| *l == limit)
            .map_or(0, |i| self.breaches[i].load(Relaxed))
    }

    /// Records one store commit's latency.
    pub fn observe_commit(&self, elapsed: std::time::Duration) {
        let secs = elapsed.as_secs_f64();
        for (bucket, bound) in self.commit_buckets.iter().zip(COMMIT_BUCKETS) {
            if secs <= bound {
                bucket.fetch_add(1, Relaxed);
            }
        }
        self.commit_count.fetch_add(1, Relaxed);
        self.commit_sum_micros
            .fetch_add(elapsed.as_micros() as u64, Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        metric(
            "khub_sessions",
            "gauge",
            "Open authenticated WebSocket sessions.",
            self.sessions.load(Relaxed),
        );
        metric(
            "khub_connections",
            "gauge",
            "Open TCP connections.",
            self.connections.load(Relaxed),
        );
        metric(
            "khub_channels_created_total",
            "counter",
            "Channels created.",
            self.channels_created.load(Relaxed),
        );
        metric(
            "khub_envelopes_in_total",
            "counter",
            "Envelopes stored.",
            self.envelopes_in.load(Relaxed),
        );
        metric(
            "khub_bytes_in_total",
            "counter",
            "Envelope bytes stored.",
            self.bytes_in.load(Relaxed),
        );
        metric(
            "khub_envelopes_out_total",
            "counter",
            "Envelopes delivered.",
            self.envelopes_out.load(Relaxed),
        );
        metric(
            "khub_bytes_out_total",
            "counter",
            "Envelope bytes delivered.",
            self.bytes_out.load(Relaxed),
        );
        metric(
            "khub_pairings_started_total",
            "counter",
            "Pairing slots opened.",
            self.pairings_started.load(Relaxed),
        );
        metric(
            "khub_pairings_succeeded_total",
            "counter",
            "Pairings completed.",
            self.pairings_succeeded.load(Relaxed),
        );
        metric(
            "khub_pairings_failed_total",
            "counter",
            "Pairings aborted or expired.",
            self.pairings_failed.load(Relaxed),
        );
        metric(
            "khub_auth_failures_total",
            "counter",
            "Rejected credentials.",
            self.auth_failures.load(Relaxed),
        );

        let _ = writeln!(
            out,
            "# HELP khub_limit_breaches_total Requests refused or sessions closed by a limit."
        );
        let _ = writeln!(out, "# TYPE khub_limit_breaches_total counter");
        for (limit, count) in LIMITS.iter().zip(&self.breaches) {
            let _ = writeln!(
                out,
                "khub_limit_breaches_total{{limit=\"{limit}\"}} {}",
                count.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP khub_store_commit_seconds Latency of durable envelope appends."
        );
        let _ = writeln!(out, "# TYPE khub_store_commit_seconds histogram");
        for (bound, bucket) in COMMIT_BUCKETS.iter().zip(&self.commit_buckets) {
            let _ = writeln!(
                out,
                "khub_store_commit_seconds_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Relaxed)
            );
        }
        let count = self.commit_count.load(Relaxed);
        let _ = writeln!(
            out,
            "khub_store_commit_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let sum = self.commit_sum_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(
            out,
            "khub_store_commit_seconds_sum {sum}\nkhub_store_commit_seconds_count {count}"
        );
        out
    }
}
