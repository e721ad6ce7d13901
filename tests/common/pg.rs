//! A fresh PostgreSQL database per test on the machine's server (127.0.0.1:5432, trust auth).
//! `MAILINTAKE_TEST_PG` overrides the server URL (without a database name).

use std::process::Command;

pub fn server_url() -> String {
    std::env::var("MAILINTAKE_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// A database created for one test and dropped when the value goes away.
pub struct PgDb {
    pub name: String,
    pub url: String,
}

fn psql(sql: &str) -> Result<(), String> {
    let out = Command::new("psql")
        .arg(format!("{}/postgres", server_url()))
        .args(["-v", "ON_ERROR_STOP=1", "-qAtc", sql])
        .output()
        .map_err(|e| format!("cannot run psql: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

impl PgDb {
    pub fn create() -> PgDb {
        let name = format!("mailintake_test_{:016x}", rand::random::<u64>());
        if let Err(e) = psql(&format!("CREATE DATABASE {name}")) {
            panic!(
                "PostgreSQL at {} is needed for this test and is not usable: {e}\n\
                 (scripts/test starts it; or: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start)",
                server_url()
            );
        }
        PgDb {
            url: format!("{}/{name}", server_url()),
            name,
        }
    }

    /// The same database reached through another host:port (a proxy).
    pub fn url_via(&self, port: u16) -> String {
        format!("postgres://postgres@127.0.0.1:{port}/{}", self.name)
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let _ = psql(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}

/// Where a test's registry lives: a SQLite file or a fresh PostgreSQL database.
pub enum TestDb {
    Sqlite(tempfile::TempDir),
    Postgres(PgDb),
}

impl TestDb {
    pub fn sqlite() -> TestDb {
        TestDb::Sqlite(tempfile::tempdir().unwrap())
    }

    pub fn postgres() -> TestDb {
        TestDb::Postgres(PgDb::create())
    }

    pub fn url(&self) -> String {
        match self {
            TestDb::Sqlite(dir) => format!("sqlite://{}/registry.sqlite3", dir.path().display()),
            TestDb::Postgres(db) => db.url.clone(),
        }
    }
}
