//! The registry database: SQLite (default) or PostgreSQL, chosen by the URL, one logical schema
//! with one migration set per dialect, embedded and run at start.
//!
//! A registration and its pending acknowledgement are written in one transaction; the IMAP side
//! performs the acknowledgement afterwards and then deletes the row. The registry knows nothing
//! of IMAP beyond the UIDs it is handed.

use std::path::Path;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor};

mod acks;
pub use acks::MAX_ACK_REPEATS;
mod batch;
pub mod numbers;
mod records;
mod sync;
mod tokens;

pub use records::{AttachmentFile, BlobReference, RecordFiles};
pub use tokens::{CredentialLock, TokenRow};

use crate::parse::{Address, Submission};
use crate::raw_store::Sha256Digest;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot open the registry database {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error("cannot migrate the registry database {url}: {source}")]
    Migrate {
        url: String,
        source: sqlx::migrate::MigrateError,
    },
    #[error("registry: cannot {action}: {source}")]
    Db {
        action: &'static str,
        source: sqlx::Error,
    },
    #[error("registry number: {0}")]
    Numbering(String),
    #[error("unsupported database URL {0} (use sqlite:… or postgres://…)")]
    UnsupportedUrl(String),
}

impl RegistryError {
    fn db(action: &'static str) -> impl FnOnce(sqlx::Error) -> RegistryError {
        move |source| RegistryError::Db { action, source }
    }

    /// True when the database refused this statement's data (a constraint, an encoding, a value
    /// too big): a problem of the message at hand rather than of the database. Errors the
    /// database reports about itself (disk full, locked, read-only, deadlock, timeout, I/O) are
    /// not: counting them against the message would, after `max_attempts` polls, quarantine
    /// good mail as poison.
    pub fn is_data_error(&self) -> bool {
        match self {
            RegistryError::Db {
                source: sqlx::Error::Database(e),
                ..
            } => refuses_the_data(e.code().as_deref()),
            _ => false,
        }
    }

    /// True when the database itself is unreachable, overloaded or says "try again" (see
    /// [`says_try_again`]), not when a statement is wrong.
    pub fn is_transient(&self) -> bool {
        let source = match self {
            RegistryError::Connect { source, .. } | RegistryError::Db { source, .. } => source,
            _ => return false,
        };
        match source {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Tls(_) => true,
            sqlx::Error::Database(e) => says_try_again(e.code().as_deref()),
            _ => false,
        }
    }
}

/// Where a message came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Imap(Location),
    /// Bytes handed in directly (`import`, tests, the corpus run); `label` plays the mailbox.
    Import {
        label: String,
        source_ref: String,
    },
}

/// One message's place on an IMAP server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Location {
    pub mailbox_id: String,
    pub folder: String,
    pub uidvalidity: u32,
    pub uid: u32,
}

impl Origin {
    /// The mailbox (or import label) the record belongs to.
    pub fn owner(&self) -> &str {
        match self {
            Origin::Imap(loc) => &loc.mailbox_id,
            Origin::Import { label, .. } => label,
        }
    }

    pub fn location(&self) -> Option<&Location> {
        match self {
            Origin::Imap(loc) => Some(loc),
            Origin::Import { .. } => None,
        }
    }
}

/// What is written for a message.
#[derive(Debug, Clone, Copy)]
pub enum Content<'a> {
    Registered(&'a Submission),
    /// Kept raw only, with a stable reason code (`parse:no-headers`, `too-large`, `poison` …).
    Quarantined {
        reason_code: &'a str,
        detail: &'a str,
    },
}

/// Everything one registration writes, in one transaction.
#[derive(Debug)]
pub struct NewRecord<'a> {
    pub origin: &'a Origin,
    pub raw_sha256: Sha256Digest,
    pub raw_size: u64,
    pub content: Content<'a>,
    /// The acknowledgement to perform on the server once committed (`seen`, `move:<folder>`).
    pub ack: Option<String>,
    /// Steps that happened before the commit, for the audit trail: (event kind, RFC 3339 time).
    pub timeline: &'a [(&'static str, String)],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Registered,
    Quarantined,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Registered => "registered",
            Status::Quarantined => "quarantined",
        }
    }

    fn parse(s: &str) -> Status {
        if s == "quarantined" {
            Status::Quarantined
        } else {
            Status::Registered
        }
    }
}

/// What a registration did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new record with its registry number.
    Registered { id: i64, number: String },
    /// A new quarantine record.
    Quarantined { id: i64 },
    /// The same bytes were already recorded for this mailbox (from another UID, folder,
    /// UIDVALIDITY or import): this location is linked to that record, nothing else written.
    Linked { id: i64, status: Status },
    /// This very location was recorded before: nothing written.
    AlreadyKnown { id: i64 },
}

impl Outcome {
    pub fn id(&self) -> i64 {
        match self {
            Outcome::Registered { id, .. }
            | Outcome::Quarantined { id }
            | Outcome::Linked { id, .. }
            | Outcome::AlreadyKnown { id } => *id,
        }
    }
}

/// A message on a server that is not registered and has failed: its processing was attempted
/// (and failed, or a worker stopped with it in hand), or a fetch that included it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailingMessage {
    pub mailbox_id: String,
    pub folder: String,
    pub uidvalidity: u32,
    pub uid: u32,
    pub attempts: u32,
    pub fetch_failures: u32,
    pub last_error: Option<String>,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxState {
    pub uidvalidity: Option<u32>,
    pub high_water_uid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UidValidityCheck {
    /// First time this folder is seen.
    First,
    Unchanged,
    /// The server renumbered the folder: the high-water mark was reset and an event recorded.
    Changed {
        previous: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingAck {
    pub id: i64,
    pub message_id: i64,
    pub uidvalidity: u32,
    pub uid: u32,
    pub action: String,
}

/// A record as listed by `registry list`.
#[derive(Debug, Clone)]
pub struct RecordSummary {
    pub id: i64,
    pub status: Status,
    pub registry_number: Option<String>,
    pub reason_code: Option<String>,
    pub reason_detail: Option<String>,
    pub registered_at: String,
    pub mailbox_id: String,
    pub from: Option<String>,
    pub subject: Option<String>,
    pub rfc822_message_id: Option<String>,
    pub raw_sha256: String,
    pub raw_size: u64,
    pub attachment_count: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentRow {
    pub ordinal: u32,
    pub parent_ordinal: Option<u32>,
    pub filename: Option<String>,
    pub content_type: String,
    pub size: u64,
    pub sha256: String,
}

/// One audit event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: i64,
    pub at: String,
    pub kind: String,
    pub mailbox_id: Option<String>,
    pub folder: Option<String>,
    pub uidvalidity: Option<u32>,
    pub uid: Option<u32>,
    pub message_id: Option<i64>,
    pub detail: Option<String>,
}

/// Connections of a PostgreSQL registry's pool.
const POSTGRES_POOL: u32 = 8;

#[derive(Clone)]
pub struct Registry {
    pool: AnyPool,
    backend: Backend,
    /// The SQLite database file (None for PostgreSQL and in-memory databases): lock files
    /// live beside it.
    sqlite_file: Option<std::sync::Arc<Path>>,
    /// PostgreSQL: how many credential locks this process may hold at once. Each holds a pool
    /// connection while the refresh it guards needs another one to read and store the token.
    credential_locks: std::sync::Arc<tokio::sync::Semaphore>,
    numbering: std::sync::Arc<numbers::Numbering>,
}

/// Now as the registry stores times: RFC 3339 UTC with microseconds (sorts as text).
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// The database file of a SQLite URL (None for in-memory databases).
fn sqlite_path(url: &str) -> Option<std::path::PathBuf> {
    let path = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let path = path.split('?').next().unwrap_or(path);
    (!path.is_empty() && !path.contains(":memory:")).then(|| std::path::PathBuf::from(path))
}

/// Takes an exclusive lock on `<database>.migrate.lock`, held until the file is dropped.
async fn lock_file(db: &Path, url: &str) -> Result<std::fs::File, RegistryError> {
    let mut name = db.as_os_str().to_owned();
    name.push(".migrate.lock");
    let path = std::path::PathBuf::from(name);
    let fail = |e: std::io::Error| RegistryError::Connect {
        url: redact_url(url),
        source: sqlx::Error::Io(e),
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(fail)?;
    tokio::task::spawn_blocking(move || file.lock().map(|()| file))
        .await
        .map_err(|e| fail(std::io::Error::other(e)))?
        .map_err(fail)
}

/// A database error code in its dialect. A SQLSTATE (PostgreSQL) always has five characters;
/// SQLite's result codes, extended ones included, have at most four digits, and sqlx gives the
/// extended one, whose low byte is the primary code.
enum DbCode<'a> {
    SqlState(&'a str),
    Sqlite(u32),
}

impl DbCode<'_> {
    fn of(code: Option<&str>) -> Option<DbCode<'_>> {
        let code = code?;
        if code.len() == 5 {
            return Some(DbCode::SqlState(code));
        }
        code.parse::<u32>()
            .ok()
            .map(|extended| DbCode::Sqlite(extended & 0xff))
    }
}

/// Whether a database error code says the statement's data was refused. PostgreSQL: SQLSTATE
/// classes 22 (data exception: invalid encoding, value out of range) and 23 (integrity
/// constraint). SQLite: TOOBIG (18), CONSTRAINT (19) and MISMATCH (20); FULL, BUSY, READONLY,
/// IOERR and the rest are the database's own trouble.
fn refuses_the_data(code: Option<&str>) -> bool {
    match DbCode::of(code) {
        Some(DbCode::SqlState(s)) => s.starts_with("22") || s.starts_with("23"),
        Some(DbCode::Sqlite(primary)) => matches!(primary, 18..=20),
        None => false,
    }
}

/// Database errors that pass by themselves: on PostgreSQL a lost connection (class 08), a
/// server shutting down or starting up (57P01 to 57P03: a restart), too many connections
/// (53300), a serialization failure or deadlock (40001, 40P01), a lock not available in time
/// (55P03); on SQLite a database busy or locked (5 and 6, with their extended codes).
fn says_try_again(code: Option<&str>) -> bool {
    match DbCode::of(code) {
        Some(DbCode::SqlState(s)) => {
            s.starts_with("08")
                || matches!(
                    s,
                    "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01" | "55P03"
                )
        }
        Some(DbCode::Sqlite(primary)) => matches!(primary, 5 | 6),
        None => false,
    }
}

/// The URL with any password replaced, for messages: every query parameter whose name holds
/// "password" (sqlx's and libpq's `password=`, `sslpassword=`), then the one in the user part
/// (`user:password@`).
pub fn redact_url(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    let mut rest = url;
    // Parameters first: a value may hold an `@`, which would mislead the user-part search.
    while let Some(sep) = rest.find(['?', '&']) {
        out.push_str(&rest[..=sep]);
        rest = &rest[sep + 1..];
        let end = rest.find(['&', '?']).unwrap_or(rest.len());
        match rest[..end].split_once('=') {
            Some((name, _)) if name.to_ascii_lowercase().contains("password") => {
                out.push_str(name);
                out.push_str("=[redacted]");
                rest = &rest[end..];
            }
            _ => {}
        }
    }
    out.push_str(rest);
    match (out.find("://"), out.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => match out[scheme + 3..at].find(':') {
            Some(colon) => {
                out.replace_range(scheme + 3 + colon + 1..at, "[redacted]");
                out
            }
            None => out,
        },
        _ => out,
    }
}

fn addresses_json(list: &[Address]) -> String {
    serde_json::to_string(
        &list
            .iter()
            .map(|a| clean(&a.to_string()))
            .collect::<Vec<_>>(),
    )
    .unwrap_or_else(|_| "[]".to_owned())
}

/// Text as the databases accept it: PostgreSQL rejects NUL in TEXT, so NUL is dropped (for
/// both backends, so they store the same thing). The raw bytes keep everything.
fn clean(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "")
    } else {
        s.to_owned()
    }
}

fn clean_opt(s: Option<&str>) -> Option<String> {
    s.map(clean)
}

impl Registry {
    /// Connects (creating a SQLite file and its directory if needed) and runs the migrations.
    pub async fn open(url: &str) -> Result<Registry, RegistryError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(RegistryError::UnsupportedUrl(redact_url(url)));
        };
        let mut connect_url = url.to_owned();
        if backend == Backend::Sqlite {
            let path = sqlite_path(url).unwrap_or_default();
            if let Some(dir) = path.parent()
                && !dir.as_os_str().is_empty()
            {
                std::fs::create_dir_all(dir).map_err(|e| RegistryError::Connect {
                    url: redact_url(url),
                    source: sqlx::Error::Io(e),
                })?;
            }
            if !url.contains("mode=") {
                connect_url.push_str(if url.contains('?') {
                    "&mode=rwc"
                } else {
                    "?mode=rwc"
                });
            }
        }
        let options: AnyConnectOptions =
            connect_url
                .parse()
                .map_err(|source| RegistryError::Connect {
                    url: redact_url(url),
                    source,
                })?;
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite {
                4
            } else {
                POSTGRES_POOL
            })
            .acquire_timeout(Duration::from_secs(15))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // Durable commits: WAL with a full fsync at every commit.
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = FULL").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                        conn.execute("PRAGMA busy_timeout = 15000").await?;
                        // Statement journals (a multi-row INSERT inside a transaction keeps
                        // one) in memory, not in a temp file per statement: measured on a
                        // helpdesk run, 92 temp files and 39 MB of writes less.
                        conn.execute("PRAGMA temp_store = MEMORY").await?;
                    } else if let Err(e) = conn
                        .execute("SET default_toast_compression = 'lz4'")
                        .await
                    {
                        // Message bodies above 2 KB are compressed as they are stored: LZ4 takes
                        // about a fifth less of the server's CPU than the default pglz on the
                        // helpdesk benchmark (1.29 against 1.65 s). A server built without LZ4
                        // keeps pglz.
                        tracing::debug!(error = %e, "PostgreSQL without LZ4: bodies compressed with pglz");
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(|source| RegistryError::Connect {
                url: redact_url(url),
                source,
            })?;
        let migrator = match backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        };
        // sqlx takes an advisory lock for PostgreSQL migrations but none for SQLite: two
        // processes starting at once (the service and an admin's `registry list`) would both
        // apply a migration. An exclusive lock file beside the database serialises them.
        let _migration_lock = match (backend, sqlite_path(url)) {
            (Backend::Sqlite, Some(path)) => Some(lock_file(&path, url).await?),
            _ => None,
        };
        migrator
            .run(&pool)
            .await
            .map_err(|source| RegistryError::Migrate {
                url: redact_url(url),
                source,
            })?;
        Ok(Registry {
            pool,
            backend,
            sqlite_file: match backend {
                Backend::Sqlite => sqlite_path(url).map(|p| std::sync::Arc::from(p.as_path())),
                Backend::Postgres => None,
            },
            credential_locks: std::sync::Arc::new(tokio::sync::Semaphore::new(
                tokens::CREDENTIAL_LOCKS_AT_ONCE,
            )),
            numbering: std::sync::Arc::new(numbers::Numbering::default()),
        })
    }

    /// A transaction that will write. On SQLite it takes the write lock up front
    /// (`BEGIN IMMEDIATE`): a deferred transaction that reads first cannot upgrade its lock
    /// while another writer is active and fails with "database is locked" at once.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, RegistryError> {
        let begin = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.pool.begin().await,
        };
        begin.map_err(RegistryError::db("begin transaction"))
    }

    /// Sets how registry numbers are made (prefix and format).
    pub fn with_numbering(mut self, numbering: numbers::Numbering) -> Registry {
        self.numbering = std::sync::Arc::new(numbering);
        self
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::{Registry, redact_url};
    use sqlx::Row;

    #[tokio::test]
    async fn sqlite_connections_are_durable_and_keep_temp_data_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("r.sqlite3").display());
        let registry = Registry::open(&url).await.unwrap();
        // Every pooled connection, not only the first: hold them all at once.
        let mut held = Vec::new();
        for _ in 0..4 {
            let mut conn = registry.pool.acquire().await.unwrap();
            let mut values = Vec::new();
            for pragma in ["journal_mode", "synchronous", "temp_store", "foreign_keys"] {
                let sql = format!("PRAGMA {pragma}");
                let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .fetch_one(&mut *conn)
                    .await
                    .unwrap();
                let value = row
                    .try_get::<String, _>(0)
                    .or_else(|_| row.try_get::<i64, _>(0).map(|v| v.to_string()))
                    .unwrap();
                values.push(value);
            }
            // WAL, FULL (2): fsync at every commit; MEMORY (2); foreign keys on.
            assert_eq!(values, ["wal", "2", "2", "1"]);
            held.push(conn);
        }
        drop(held);
        registry.close().await;
    }

    #[test]
    fn only_refusals_of_the_data_count_against_a_message() {
        use super::refuses_the_data;
        // SQLite extended codes: CONSTRAINT_NOTNULL, CONSTRAINT_UNIQUE, TOOBIG, MISMATCH.
        for code in ["1299", "2067", "18", "20"] {
            assert!(refuses_the_data(Some(code)), "{code}");
        }
        // SQLite: FULL, BUSY, LOCKED, READONLY, IOERR_WRITE, CORRUPT.
        for code in ["13", "5", "6", "8", "778", "11"] {
            assert!(!refuses_the_data(Some(code)), "{code}");
        }
        // PostgreSQL: invalid encoding, not null, unique, check.
        for code in ["22021", "23502", "23505", "23514", "22001"] {
            assert!(refuses_the_data(Some(code)), "{code}");
        }
        // PostgreSQL: disk full, deadlock, serialization, timeout, read-only, admin shutdown.
        for code in ["53100", "40P01", "40001", "57014", "25006", "57P01"] {
            assert!(!refuses_the_data(Some(code)), "{code}");
        }
        assert!(!refuses_the_data(None));
    }

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(
            redact_url("postgres://intake:s3cret@db.example/registry"),
            "postgres://intake:[redacted]@db.example/registry"
        );
        assert_eq!(
            redact_url("postgres://intake@db/registry"),
            "postgres://intake@db/registry"
        );
        assert_eq!(
            redact_url("sqlite:///var/lib/x.db"),
            "sqlite:///var/lib/x.db"
        );
        assert_eq!(
            redact_url("postgres://intake@db/registry?sslmode=require&password=s3cret"),
            "postgres://intake@db/registry?sslmode=require&password=[redacted]"
        );
        assert_eq!(
            redact_url("postgresql://db/registry?Password=a@b&sslpassword=k3y&user=intake"),
            "postgresql://db/registry?Password=[redacted]&sslpassword=[redacted]&user=intake"
        );
        // A password with unencoded `?` and `@` in the user part.
        assert_eq!(
            redact_url("postgres://intake:p?w@d@db/registry"),
            "postgres://intake:[redacted]@db/registry"
        );
    }
}
