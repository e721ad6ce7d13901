//! The registry database: SQLite (default) or PostgreSQL, chosen by the URL, one logical schema
//! with one migration set per dialect, embedded and run at start.
//!
//! A registration and its pending acknowledgement are written in one transaction; the IMAP side
//! performs the acknowledgement afterwards and then deletes the row. The registry knows nothing
//! of IMAP beyond the UIDs it is handed.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor, Row};

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
    #[error("unsupported database URL {0} (use sqlite:… or postgres://…)")]
    UnsupportedUrl(String),
}

impl RegistryError {
    fn db(action: &'static str) -> impl FnOnce(sqlx::Error) -> RegistryError {
        move |source| RegistryError::Db { action, source }
    }

    /// True when the database itself is unreachable or overloaded, not when a statement is wrong.
    pub fn is_transient(&self) -> bool {
        let source = match self {
            RegistryError::Connect { source, .. } | RegistryError::Db { source, .. } => source,
            _ => return false,
        };
        matches!(
            source,
            sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::Tls(_)
        )
    }
}

/// Where a message came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Imap {
        mailbox_id: String,
        folder: String,
        uidvalidity: u32,
        uid: u32,
    },
    /// Bytes handed in directly (`import`, tests, the corpus run).
    Import { label: String, source_ref: String },
}

/// Everything one registration writes.
#[derive(Debug)]
pub struct NewRecord<'a> {
    pub origin: &'a Origin,
    pub raw_sha256: Sha256Digest,
    pub raw_size: u64,
    pub submission: &'a Submission,
    /// The acknowledgement to perform on the server once committed (`seen`, `move:<folder>`).
    pub ack: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registered {
    pub id: i64,
    /// False when this origin was registered before (nothing was written).
    pub newly: bool,
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
    /// The server renumbered the folder: the high-water mark was reset.
    Changed {
        previous: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingAck {
    pub id: i64,
    pub uidvalidity: u32,
    pub uid: u32,
    pub action: String,
}

/// A registered message as listed by `registry list`.
#[derive(Debug, Clone)]
pub struct RecordSummary {
    pub id: i64,
    pub registered_at: String,
    pub mailbox_id: String,
    pub folder: String,
    pub uidvalidity: Option<u32>,
    pub uid: Option<u32>,
    pub from: Option<String>,
    pub subject: Option<String>,
    pub rfc822_message_id: String,
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

#[derive(Clone)]
pub struct Registry {
    pool: AnyPool,
    backend: Backend,
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// The URL with any password replaced, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.find(':') {
                Some(colon) => format!(
                    "{}{}:[redacted]{}",
                    &url[..scheme + 3],
                    &creds[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

fn addresses_json(list: &[Address]) -> String {
    serde_json::to_string(&list.iter().map(|a| a.to_string()).collect::<Vec<_>>())
        .unwrap_or_else(|_| "[]".to_owned())
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
            let path = url
                .trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:");
            let path = path.split('?').next().unwrap_or(path);
            if let Some(dir) = Path::new(path).parent()
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
            .max_connections(if backend == Backend::Sqlite { 4 } else { 8 })
            .acquire_timeout(Duration::from_secs(15))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // Durable commits: WAL with a full fsync at every commit.
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = FULL").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                        conn.execute("PRAGMA busy_timeout = 15000").await?;
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
        migrator
            .run(&pool)
            .await
            .map_err(|source| RegistryError::Migrate {
                url: redact_url(url),
                source,
            })?;
        Ok(Registry { pool, backend })
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

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub async fn mailbox_state(
        &self,
        mailbox_id: &str,
        folder: &str,
    ) -> Result<Option<MailboxState>, RegistryError> {
        let row = sqlx::query(
            "SELECT uidvalidity, high_water_uid FROM mailboxes WHERE mailbox_id = $1 AND folder = $2",
        )
        .bind(mailbox_id)
        .bind(folder)
        .fetch_optional(&self.pool)
        .await
        .map_err(RegistryError::db("read mailbox state"))?;
        Ok(row.map(|r| MailboxState {
            uidvalidity: r.get::<Option<i64>, _>(0).map(|v| v as u32),
            high_water_uid: r.get::<i64, _>(1) as u32,
        }))
    }

    /// Records the folder's current UIDVALIDITY. On a change the high-water mark is reset, so
    /// the folder is scanned again from its first UID.
    pub async fn check_uidvalidity(
        &self,
        mailbox_id: &str,
        folder: &str,
        address: &str,
        uidvalidity: u32,
    ) -> Result<UidValidityCheck, RegistryError> {
        let mut tx = self.begin_write().await?;
        let row =
            sqlx::query("SELECT uidvalidity FROM mailboxes WHERE mailbox_id = $1 AND folder = $2")
                .bind(mailbox_id)
                .bind(folder)
                .fetch_optional(&mut *tx)
                .await
                .map_err(RegistryError::db("read mailbox state"))?;
        let previous: Option<Option<i64>> = row.map(|r| r.get(0));
        let outcome = match previous {
            None => {
                sqlx::query(
                    "INSERT INTO mailboxes (mailbox_id, folder, address, uidvalidity, high_water_uid, last_poll_at) \
                     VALUES ($1, $2, $3, $4, 0, $5)",
                )
                .bind(mailbox_id)
                .bind(folder)
                .bind(address)
                .bind(i64::from(uidvalidity))
                .bind(now())
                .execute(&mut *tx)
                .await
                .map_err(RegistryError::db("insert mailbox state"))?;
                UidValidityCheck::First
            }
            Some(Some(old)) if old == i64::from(uidvalidity) => {
                sqlx::query(
                    "UPDATE mailboxes SET last_poll_at = $1, address = $2 WHERE mailbox_id = $3 AND folder = $4",
                )
                .bind(now())
                .bind(address)
                .bind(mailbox_id)
                .bind(folder)
                .execute(&mut *tx)
                .await
                .map_err(RegistryError::db("update mailbox state"))?;
                UidValidityCheck::Unchanged
            }
            Some(old) => {
                sqlx::query(
                    "UPDATE mailboxes SET uidvalidity = $1, high_water_uid = 0, last_poll_at = $2, address = $3 \
                     WHERE mailbox_id = $4 AND folder = $5",
                )
                .bind(i64::from(uidvalidity))
                .bind(now())
                .bind(address)
                .bind(mailbox_id)
                .bind(folder)
                .execute(&mut *tx)
                .await
                .map_err(RegistryError::db("reset mailbox state"))?;
                match old {
                    Some(previous) => UidValidityCheck::Changed {
                        previous: previous as u32,
                    },
                    None => UidValidityCheck::First,
                }
            }
        };
        tx.commit()
            .await
            .map_err(RegistryError::db("commit mailbox state"))?;
        Ok(outcome)
    }

    /// Raises the high-water mark (never lowers it), if UIDVALIDITY is still the one given.
    pub async fn advance_high_water(
        &self,
        mailbox_id: &str,
        folder: &str,
        uidvalidity: u32,
        uid: u32,
    ) -> Result<(), RegistryError> {
        sqlx::query(
            "UPDATE mailboxes SET high_water_uid = $1 \
             WHERE mailbox_id = $2 AND folder = $3 AND uidvalidity = $4 AND high_water_uid < $1",
        )
        .bind(i64::from(uid))
        .bind(mailbox_id)
        .bind(folder)
        .bind(i64::from(uidvalidity))
        .execute(&self.pool)
        .await
        .map_err(RegistryError::db("advance high-water mark"))?;
        Ok(())
    }

    /// Which of `uids` are registered already (for this folder and UIDVALIDITY).
    pub async fn registered_uids(
        &self,
        mailbox_id: &str,
        folder: &str,
        uidvalidity: u32,
        uids: &[u32],
    ) -> Result<HashSet<u32>, RegistryError> {
        let (Some(lo), Some(hi)) = (uids.iter().min(), uids.iter().max()) else {
            return Ok(HashSet::new());
        };
        let rows = sqlx::query(
            "SELECT uid FROM messages WHERE mailbox_id = $1 AND folder = $2 AND uidvalidity = $3 \
             AND uid >= $4 AND uid <= $5",
        )
        .bind(mailbox_id)
        .bind(folder)
        .bind(i64::from(uidvalidity))
        .bind(i64::from(*lo))
        .bind(i64::from(*hi))
        .fetch_all(&self.pool)
        .await
        .map_err(RegistryError::db("look up registered UIDs"))?;
        let wanted: HashSet<u32> = uids.iter().copied().collect();
        Ok(rows
            .iter()
            .map(|r| r.get::<i64, _>(0) as u32)
            .filter(|u| wanted.contains(u))
            .collect())
    }

    /// Registers one message with its attachments and its pending acknowledgement, in one
    /// transaction. Registering the same IMAP origin again writes nothing.
    pub async fn register(&self, rec: NewRecord<'_>) -> Result<Registered, RegistryError> {
        let s = rec.submission;
        let (mailbox_id, folder, uidvalidity, uid, source, source_ref) = match rec.origin {
            Origin::Imap {
                mailbox_id,
                folder,
                uidvalidity,
                uid,
            } => (
                mailbox_id.as_str(),
                folder.as_str(),
                Some(i64::from(*uidvalidity)),
                Some(i64::from(*uid)),
                "imap",
                None,
            ),
            Origin::Import { label, source_ref } => (
                label.as_str(),
                "",
                None,
                None,
                "import",
                Some(source_ref.as_str()),
            ),
        };
        let mut tx = self.begin_write().await?;
        let inserted = sqlx::query(
            "INSERT INTO messages (mailbox_id, folder, uidvalidity, uid, source, source_ref, raw_sha256, raw_size, \
             rfc822_message_id, message_id_derived, from_name, from_address, to_addresses, cc_addresses, \
             date_header, subject, text_body, html_body, registered_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19) \
             ON CONFLICT (mailbox_id, folder, uidvalidity, uid) DO NOTHING \
             RETURNING id",
        )
        .bind(mailbox_id)
        .bind(folder)
        .bind(uidvalidity)
        .bind(uid)
        .bind(source)
        .bind(source_ref)
        .bind(rec.raw_sha256.to_hex())
        .bind(rec.raw_size as i64)
        .bind(s.message_id.as_str())
        .bind(i64::from(s.message_id_derived))
        .bind(s.from.as_ref().and_then(|a| a.name.clone()))
        .bind(s.from.as_ref().map(|a| a.address.clone()))
        .bind(addresses_json(&s.to))
        .bind(addresses_json(&s.cc))
        .bind(s.date.clone())
        .bind(s.subject.clone())
        .bind(s.text_body.clone())
        .bind(s.html_body.clone())
        .bind(now())
        .fetch_optional(&mut *tx)
        .await
        .map_err(RegistryError::db("insert message"))?;
        let Some(row) = inserted else {
            // Registered before: find it, write nothing.
            let existing = sqlx::query(
                "SELECT id FROM messages WHERE mailbox_id = $1 AND folder = $2 AND uidvalidity = $3 AND uid = $4",
            )
            .bind(mailbox_id)
            .bind(folder)
            .bind(uidvalidity)
            .bind(uid)
            .fetch_one(&mut *tx)
            .await
            .map_err(RegistryError::db("find existing message"))?;
            tx.rollback()
                .await
                .map_err(RegistryError::db("end transaction"))?;
            return Ok(Registered {
                id: existing.get(0),
                newly: false,
            });
        };
        let id: i64 = row.get(0);
        for a in &s.attachments {
            sqlx::query(
                "INSERT INTO attachments (message_id, ordinal, parent_ordinal, filename, content_type, size, sha256) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(id)
            .bind(i64::from(a.ordinal))
            .bind(a.parent.map(i64::from))
            .bind(a.filename.clone())
            .bind(a.content_type.as_str())
            .bind(a.size() as i64)
            .bind(a.sha256.to_hex())
            .execute(&mut *tx)
            .await
            .map_err(RegistryError::db("insert attachment"))?;
        }
        if let (Some(action), Some(uidvalidity), Some(uid)) = (&rec.ack, uidvalidity, uid) {
            sqlx::query(
                "INSERT INTO pending_acks (mailbox_id, folder, uidvalidity, uid, action, message_id, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (mailbox_id, folder, uidvalidity, uid) DO NOTHING",
            )
            .bind(mailbox_id)
            .bind(folder)
            .bind(uidvalidity)
            .bind(uid)
            .bind(action.as_str())
            .bind(id)
            .bind(now())
            .execute(&mut *tx)
            .await
            .map_err(RegistryError::db("insert pending ack"))?;
        }
        tx.commit()
            .await
            .map_err(RegistryError::db("commit registration"))?;
        Ok(Registered { id, newly: true })
    }

    /// Acknowledgements not yet confirmed by the server, oldest first.
    pub async fn pending_acks(
        &self,
        mailbox_id: &str,
        folder: &str,
    ) -> Result<Vec<PendingAck>, RegistryError> {
        let rows = sqlx::query(
            "SELECT id, uidvalidity, uid, action FROM pending_acks \
             WHERE mailbox_id = $1 AND folder = $2 ORDER BY id",
        )
        .bind(mailbox_id)
        .bind(folder)
        .fetch_all(&self.pool)
        .await
        .map_err(RegistryError::db("read pending acks"))?;
        Ok(rows
            .iter()
            .map(|r| PendingAck {
                id: r.get(0),
                uidvalidity: r.get::<i64, _>(1) as u32,
                uid: r.get::<i64, _>(2) as u32,
                action: r.get(3),
            })
            .collect())
    }

    /// Deletes acknowledgements the server confirmed (or that can no longer apply).
    pub async fn acks_done(&self, ids: &[i64]) -> Result<(), RegistryError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        for id in ids {
            sqlx::query("DELETE FROM pending_acks WHERE id = $1")
                .bind(*id)
                .execute(&mut *tx)
                .await
                .map_err(RegistryError::db("delete pending ack"))?;
        }
        tx.commit()
            .await
            .map_err(RegistryError::db("commit acks"))?;
        Ok(())
    }

    /// Registered messages, newest first.
    pub async fn list(&self, limit: i64) -> Result<Vec<RecordSummary>, RegistryError> {
        let rows = sqlx::query(
            "SELECT m.id, m.registered_at, m.mailbox_id, m.folder, m.uidvalidity, m.uid, \
             m.from_name, m.from_address, m.subject, m.rfc822_message_id, m.raw_sha256, m.raw_size, \
             (SELECT COUNT(*) FROM attachments a WHERE a.message_id = m.id) \
             FROM messages m ORDER BY m.id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(RegistryError::db("list messages"))?;
        Ok(rows
            .iter()
            .map(|r| {
                let name: Option<String> = r.get(6);
                let addr: Option<String> = r.get(7);
                RecordSummary {
                    id: r.get(0),
                    registered_at: r.get(1),
                    mailbox_id: r.get(2),
                    folder: r.get(3),
                    uidvalidity: r.get::<Option<i64>, _>(4).map(|v| v as u32),
                    uid: r.get::<Option<i64>, _>(5).map(|v| v as u32),
                    from: match (name, addr) {
                        (Some(n), Some(a)) => Some(format!("{n} <{a}>")),
                        (None, Some(a)) => Some(a),
                        (Some(n), None) => Some(n),
                        (None, None) => None,
                    },
                    subject: r.get(8),
                    rfc822_message_id: r.get(9),
                    raw_sha256: r.get(10),
                    raw_size: r.get::<i64, _>(11) as u64,
                    attachment_count: r.get(12),
                }
            })
            .collect())
    }

    pub async fn attachments(&self, message_id: i64) -> Result<Vec<AttachmentRow>, RegistryError> {
        let rows = sqlx::query(
            "SELECT ordinal, parent_ordinal, filename, content_type, size, sha256 \
             FROM attachments WHERE message_id = $1 ORDER BY ordinal",
        )
        .bind(message_id)
        .fetch_all(&self.pool)
        .await
        .map_err(RegistryError::db("read attachments"))?;
        Ok(rows
            .iter()
            .map(|r| AttachmentRow {
                ordinal: r.get::<i64, _>(0) as u32,
                parent_ordinal: r.get::<Option<i64>, _>(1).map(|v| v as u32),
                filename: r.get(2),
                content_type: r.get(3),
                size: r.get::<i64, _>(4) as u64,
                sha256: r.get(5),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

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
    }
}
