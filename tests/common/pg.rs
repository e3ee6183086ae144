//! A fresh PostgreSQL database per test, dropped afterwards.
//!
//! The server is `KHUB_TEST_POSTGRES` (a URL without a database name; default
//! `postgres://postgres@127.0.0.1:5432`). If it cannot be reached the tests
//! that need it say so and pass, unless `KHUB_REQUIRE_POSTGRES=1` (which CI
//! sets): then they fail.

use std::time::Duration;

/// A database made for one test; dropped (with its connections) on drop.
pub struct TestDb {
    server: String,
    name: String,
}

impl TestDb {
    /// `postgres://…/NAME` of the new database (without TLS: the server is
    /// on this machine, and Debian's has a self-signed certificate).
    pub fn url(&self) -> String {
        format!("{}/{}?sslmode=disable", self.server, self.name)
    }
}

fn server() -> String {
    std::env::var("KHUB_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
        .trim_end_matches('/')
        .to_owned()
}

async fn admin(server: &str) -> Result<tokio_postgres::Client, String> {
    let url = format!("{server}/postgres");
    let (client, connection) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_postgres::connect(&url, tokio_postgres::NoTls),
    )
    .await
    .map_err(|_| format!("{server} did not answer"))?
    .map_err(|e| format!("cannot connect to {server}: {e}"))?;
    tokio::spawn(connection);
    Ok(client)
}

/// A new, empty database, or `None` (with a note on stderr) if there is no
/// PostgreSQL to make it on and none is required.
pub async fn fresh_database(purpose: &str) -> Option<TestDb> {
    let server = server();
    let name = format!(
        "khub_test_{purpose}_{}",
        khub::ids::DeviceId::random(&mut khub::crypto::os_rng())
            .as_bytes()
            .iter()
            .take(6)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let made = async {
        let client = admin(&server).await?;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .map_err(|e| format!("cannot create a database: {e}"))
    }
    .await;
    match made {
        Ok(()) => Some(TestDb { server, name }),
        Err(reason) if std::env::var_os("KHUB_REQUIRE_POSTGRES").is_some() => {
            panic!("KHUB_REQUIRE_POSTGRES is set but PostgreSQL is not usable: {reason}")
        }
        Err(reason) => {
            eprintln!("skipped the PostgreSQL part: {reason} (set KHUB_TEST_POSTGRES)");
            None
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        // Drop runs inside a runtime; a thread of its own may block on another.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async {
                let client = admin(&server).await?;
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .map_err(|e| e.to_string())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop the test database {}", self.name);
        }
    }
}
