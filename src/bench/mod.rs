//! `khub bench`: the relay measured against a bare baseline in the same run.
//!
//! Figures on a shared 2-core machine swing from run to run, so each one is
//! reported as a ratio against a baseline measured in the same invocation, or
//! as a per-unit cost. Scenarios:
//!
//! - **fanout**: the [`fanout`] workload on the relay (in-memory store, then
//!   SQLite) and on the [`baseline`]; deliveries/s, latency percentiles, loss
//!   and duplicates; then again paced at half the relay's maximum rate for the
//!   latency comparison. Publish→ack latency is the durable-publish cost.
//! - **catchup**: a device resuming a backlog from the SQLite store.
//! - **idle**: relay RSS per idle authenticated session (a `khub serve` child).
//! - **pairing**: complete pairings per second through one relay.
//! - **crypto**: envelope seal+open throughput.
//! - **notes**: merge throughput, bytes per small edit, snapshot size against
//!   the plain text, and a new device receiving a 1,000-note vault.
//! - **postgres** (only when named, feature `postgres`): appends/s and p99,
//!   SQLite against PostgreSQL; fan-out through one node against two on one
//!   database; cross-node delivery latency.
//! - **soak** (only when named): thousands of sessions of a `khub serve` child
//!   exchanging envelopes for a while; errors, loss, peak and per-session RSS.

pub mod baseline;
mod child;
mod cpu;
pub mod fanout;
mod notes;
#[cfg(feature = "postgres")]
mod postgres;
mod scenarios;
mod soak;

use std::fmt::Write;

pub use scenarios::{Options, run};
pub use soak::Soak;

/// Serves the bare baseline until killed, after printing its address on
/// stdout: `khub bench --serve-baseline`, which the fan-out starts as a
/// process of its own to measure its CPU time apart.
pub fn serve_baseline() -> std::io::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let addr = baseline::start().await;
            println!("baseline listening on {addr}");
            std::future::pending::<()>().await;
        });
    Ok(())
}

/// p50 / p99 / p99.9 of a set of microsecond samples.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Percentiles {
    /// Median, µs.
    pub p50: u32,
    /// 99th percentile, µs.
    pub p99: u32,
    /// 99.9th percentile, µs.
    pub p999: u32,
}

impl Percentiles {
    /// Sorts `samples` and reads the percentiles.
    pub fn of(samples: &mut [u32]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Self {
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Row {
    /// Scenario.
    pub scenario: &'static str,
    /// What was measured.
    pub metric: String,
    /// The figure, formatted.
    pub value: String,
    /// The target, if the issue sets one.
    pub target: Option<String>,
    /// Whether the target is met.
    pub met: Option<bool>,
}

impl Row {
    fn info(scenario: &'static str, metric: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            scenario,
            metric: metric.into(),
            value: value.into(),
            target: None,
            met: None,
        }
    }

    fn check(
        scenario: &'static str,
        metric: impl Into<String>,
        value: impl Into<String>,
        target: &str,
        met: bool,
    ) -> Self {
        Self {
            scenario,
            metric: metric.into(),
            value: value.into(),
            target: Some(target.into()),
            met: Some(met),
        }
    }
}

/// The report as a Markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut out =
        String::from("| scenario | metric | value | target | met |\n|---|---|---|---|---|\n");
    for row in rows {
        let met = match row.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {met} |",
            row.scenario,
            row.metric,
            row.value,
            row.target.as_deref().unwrap_or("")
        );
    }
    out
}
