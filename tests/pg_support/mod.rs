//! A throwaway PostgreSQL database per test, on the real server the machine runs.
//!
//! ```text
//!   STOWIX_TEST_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres)
//!      │  CREATE DATABASE stowix_test_<nonce>
//!      ▼
//!   TestDatabase ── url() ──► the code under test (`--database`, PostgresMetadata::open)
//!      │            sql()  ──► statements run as the admin user inside that database
//!      └─ drop ──► DROP DATABASE … WITH (FORCE)
//! ```
//!
//! A server that does not answer is a failing test with instructions, never a skip.

#![allow(dead_code)]

use std::time::Duration;

const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The URL test databases are created through.
pub fn admin_url() -> String {
    std::env::var("STOWIX_TEST_DATABASE_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| DEFAULT_ADMIN_URL.to_string())
}

/// Runs `sql` (one or more statements) against `url` on a thread of its own, so callers may be
/// inside a tokio runtime or not. Returns the first column of every row, as text.
pub fn query(url: &str, sql: &str) -> Result<Vec<Option<String>>, String> {
    let url = url.to_string();
    let sql = sql.to_string();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|err| err.to_string())?;
        runtime.block_on(async move {
            let mut config: tokio_postgres::Config = url.parse().map_err(|err| format!("{err}"))?;
            config.connect_timeout(Duration::from_secs(5));
            let (client, connection) = config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|err| format!("{err}"))?;
            let driver = tokio::spawn(connection);
            let messages =
                client
                    .simple_query(&sql)
                    .await
                    .map_err(|err| match err.as_db_error() {
                        Some(db) => format!("{} ({})", db.message(), db.code().code()),
                        None => err.to_string(),
                    })?;
            drop(client);
            let _ = driver.await;
            Ok(messages
                .into_iter()
                .filter_map(|message| match message {
                    tokio_postgres::SimpleQueryMessage::Row(row) => {
                        Some(row.get(0).map(str::to_string))
                    }
                    _ => None,
                })
                .collect())
        })
    })
    .join()
    .map_err(|_| "the PostgreSQL helper thread panicked".to_string())?
}

/// Panics with how to start PostgreSQL when the admin URL does not answer.
pub fn require_postgres() {
    if let Err(err) = query(&admin_url(), "SELECT 1") {
        panic!(
            "PostgreSQL is not reachable on 127.0.0.1:5432: run scripts/install-prerequisites.sh \
             (or `pg_ctlcluster 15 main start`); set STOWIX_TEST_DATABASE_URL to use another \
             server ({}: {err})",
            redact(&admin_url())
        );
    }
}

fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "the test database URL".to_string(),
    }
}

/// A database of its own for one test, dropped (connections and all) with this value.
pub struct TestDatabase {
    name: String,
    url: String,
}

impl TestDatabase {
    pub fn create() -> TestDatabase {
        require_postgres();
        let name = format!(
            "stowix_test_{:016x}",
            rand::random::<u64>() & 0x7fff_ffff_ffff_ffff
        );
        query(&admin_url(), &format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|err| panic!("cannot create test database {name}: {err}"));
        let mut url = url::Url::parse(&admin_url()).expect("STOWIX_TEST_DATABASE_URL is a URL");
        url.set_path(&format!("/{name}"));
        TestDatabase {
            name,
            url: url.to_string(),
        }
    }

    /// `postgres://…/stowix_test_…`, for the code under test.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `sql` inside this database as the admin user; panics on failure.
    pub fn sql(&self, sql: &str) -> Vec<Option<String>> {
        query(&self.url, sql).unwrap_or_else(|err| panic!("{sql}: {err}"))
    }

    /// Closes every other session on this database, as a database restart would.
    pub fn terminate_connections(&self) -> usize {
        self.sql(&format!(
            "SELECT pg_terminate_backend(pid)::text FROM pg_stat_activity
             WHERE datname = '{}' AND pid <> pg_backend_pid()",
            self.name
        ))
        .len()
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Err(err) = query(
            &admin_url(),
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        ) {
            eprintln!("could not drop test database {}: {err}", self.name);
        }
    }
}
