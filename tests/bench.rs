//! `khub bench` end to end on a tiny workload, so the tool that produces
//! README's performance figures keeps working: every scenario runs, reports,
//! and sees no lost or duplicated delivery.

mod common;

use khub::bench::{Options, fanout::Workload, run, table};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_and_loses_nothing() {
    let options = Options {
        scenarios: vec!["all".into(), "soak".into()],
        workload: Workload {
            channels: 2,
            devices: 3,
            senders: 2,
            window: 4,
            payload: 200,
            messages: 60,
            rate: None,
        },
        backlog: 500,
        idle: vec![60],
        pairings: 6,
        pairing_concurrency: 2,
        khub: env!("CARGO_BIN_EXE_khub").into(),
        relay: None,
        soak: khub::bench::Soak {
            sessions: 25,
            seconds: 2,
            interval: 0.2,
        },
        postgres: String::new(),
        appends: 0,
    };
    let rows = tokio::time::timeout(std::time::Duration::from_secs(420), run(&options))
        .await
        .expect("bench finishes")
        .unwrap();
    let report = table(&rows);
    for scenario in [
        "crypto",
        "fanout",
        "durable publish",
        "latency at half rate",
        "catchup",
        "pairing",
        "idle",
        "soak",
    ] {
        assert!(
            rows.iter().any(|r| r.scenario == scenario),
            "no {scenario} rows in\n{report}"
        );
    }
    let integrity: Vec<_> = rows
        .iter()
        .filter(|r| r.metric.contains("lost + duplicated"))
        .collect();
    assert_eq!(integrity.len(), 6, "{report}");
    // The rows that hold on a noisy machine: the servers' CPU time per
    // delivery (measured apart from the load generator) and the disk's fsync.
    for metric in [
        "baseline: server CPU (user + sys) per delivery",
        "relay, memory store: server CPU (user + sys) per delivery",
        "memory store / baseline CPU per delivery",
        "relay, memory store, a process of its own: CPU (user + sys) per delivery",
        "memory store / baseline CPU per delivery, processes of their own",
        "this disk: 4 KiB write + fdatasync",
        "memory store, window 1: publish->ack",
        "SQLite (full), window 1: publish->ack p50 / fsync p50",
    ] {
        assert!(
            rows.iter().any(|r| r.metric.starts_with(metric)),
            "no {metric:?} row in\n{report}"
        );
    }
    let soak: Vec<_> = rows
        .iter()
        .filter(|r| r.scenario == "soak" && r.met.is_some())
        .collect();
    assert!(
        soak.iter()
            .filter(|r| r.metric != "relay RSS per session, held idle")
            .all(|r| r.met == Some(true)),
        "{report}"
    );
    assert!(
        integrity
            .iter()
            .all(|r| r.met == Some(true) && r.value == "0"),
        "{report}"
    );
}

/// The postgres scenario on a tiny workload, against the test server (see
/// `common::pg`): every row is there, and nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_scenario_runs() {
    // Only to learn whether there is a server (and fail if one is required).
    let Some(_probe) = common::pg::fresh_database("bench_probe").await else {
        return;
    };
    let options = Options {
        scenarios: vec!["postgres".into()],
        workload: Workload {
            channels: 1,
            devices: 4,
            senders: 2,
            window: 4,
            payload: 200,
            messages: 100,
            rate: None,
        },
        backlog: 0,
        idle: vec![],
        pairings: 0,
        pairing_concurrency: 1,
        khub: env!("CARGO_BIN_EXE_khub").into(),
        relay: None,
        soak: khub::bench::Soak {
            sessions: 0,
            seconds: 0,
            interval: 1.0,
        },
        postgres: std::env::var("KHUB_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
            + "/postgres?sslmode=disable",
        appends: 640,
    };
    khub::testing::capture_logs();
    let rows = tokio::time::timeout(std::time::Duration::from_secs(120), run(&options))
        .await
        .expect("bench finishes")
        .unwrap_or_else(|e| panic!("{e}\n{}", khub::testing::captured_logs()));
    let report = table(&rows);
    for metric in [
        "appends/s, SQLite / PostgreSQL",
        "append p99",
        "fan-out deliveries/s, one node / two nodes",
        "cross-node delivery",
        "same-node delivery",
    ] {
        assert!(
            rows.iter()
                .any(|r| r.scenario == "postgres" && r.metric.starts_with(metric)),
            "no {metric:?} row in\n{report}"
        );
    }
}
