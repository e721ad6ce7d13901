//! Encrypted refresh tokens of delegated credentials (the ciphertext only; keys and
//! encryption live in `credentials::store`).

use std::time::{Duration, Instant};

use sqlx::Row;

use super::{Backend, Registry, RegistryError, now};
use crate::raw_store::Sha256Digest;

/// How long a refresh waits for another process's refresh of the same credential. Theirs is
/// bounded by the token endpoint's timeout (30 s), so this is only reached if that process
/// hangs with the lock held.
const CREDENTIAL_LOCK_WAIT: Duration = Duration::from_secs(60);

/// PostgreSQL credential locks one process holds at once (see `Registry::credential_locks`):
/// a quarter of the pool, so that ten credentials refreshing together cannot take every
/// connection and then wait for one to read their tokens.
pub(super) const CREDENTIAL_LOCKS_AT_ONCE: usize = (super::POSTGRES_POOL / 4) as usize;

/// Held by the one process that refreshes a credential's token: from reading the stored
/// refresh token to storing the one that replaces it. A provider that rotates refresh tokens
/// and refuses a used one (or revokes the whole family when one is used twice) must never see
/// two processes exchange the same token. PostgreSQL: a transaction-level advisory lock on a
/// connection of its own; SQLite: an exclusive lock on a file beside the database, per
/// credential. Released by [`CredentialLock::release`], or when dropped.
pub struct CredentialLock(Held);

enum Held {
    Postgres(
        sqlx::Transaction<'static, sqlx::Any>,
        tokio::sync::OwnedSemaphorePermit,
    ),
    File(std::fs::File),
    /// An in-memory SQLite database: no other process can open it.
    Nothing,
}

impl CredentialLock {
    pub async fn release(self) -> Result<(), RegistryError> {
        match self.0 {
            Held::Postgres(tx, _permit) => tx
                .commit()
                .await
                .map_err(RegistryError::db("release the credential lock")),
            Held::File(file) => {
                drop(file);
                Ok(())
            }
            Held::Nothing => Ok(()),
        }
    }
}

/// A stable name for a credential in lock keys and lock file names (its own name may hold
/// any character).
fn lock_key(credential: &str) -> [u8; 32] {
    Sha256Digest::of(format!("mailintake credential lock\0{credential}").as_bytes()).0
}

/// One stored token row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub ciphertext: String,
    pub account: Option<String>,
    pub stored_at: String,
    pub last_used_at: String,
}

impl Registry {
    /// Waits (at most a minute) until no other process holds this credential's lock, then
    /// holds it: see [`CredentialLock`].
    pub async fn lock_credential(&self, credential: &str) -> Result<CredentialLock, RegistryError> {
        let key = lock_key(credential);
        match self.backend {
            Backend::Postgres => {
                let permit = std::sync::Arc::clone(&self.credential_locks)
                    .acquire_owned()
                    .await
                    // Never closed; if it were, the registry is going away.
                    .map_err(|_| RegistryError::Db {
                        action: "wait for a credential lock",
                        source: sqlx::Error::PoolClosed,
                    })?;
                let mut tx = self
                    .pool
                    .begin()
                    .await
                    .map_err(RegistryError::db("begin the credential lock"))?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SET LOCAL lock_timeout = '{}s'",
                    CREDENTIAL_LOCK_WAIT.as_secs()
                )))
                .execute(&mut *tx)
                .await
                .map_err(RegistryError::db("set the credential lock's timeout"))?;
                let mut id = [0u8; 8];
                id.copy_from_slice(&key[..8]);
                // Counted, not selected: the Any driver cannot decode `void`.
                sqlx::query("SELECT COUNT(*) FROM (SELECT pg_advisory_xact_lock($1)) AS held")
                    .bind(i64::from_be_bytes(id))
                    .execute(&mut *tx)
                    .await
                    .map_err(RegistryError::db("take the credential lock"))?;
                Ok(CredentialLock(Held::Postgres(tx, permit)))
            }
            Backend::Sqlite => match &self.sqlite_file {
                Some(db) => {
                    let mut name = db.as_os_str().to_owned();
                    name.push(format!(".credential-{}.lock", hex::encode(&key[..8])));
                    lock_file_within(std::path::PathBuf::from(name), CREDENTIAL_LOCK_WAIT)
                        .await
                        .map(|file| CredentialLock(Held::File(file)))
                        .map_err(RegistryError::db("take the credential lock"))
                }
                None => Ok(CredentialLock(Held::Nothing)),
            },
        }
    }

    /// Stores (or replaces) the credential's token: the old one is gone in the same statement.
    pub async fn put_credential_token(
        &self,
        credential: &str,
        ciphertext: &str,
        account: Option<&str>,
    ) -> Result<(), RegistryError> {
        let at = now();
        sqlx::query(
            "INSERT INTO credential_tokens (credential, ciphertext, account, stored_at, last_used_at) \
             VALUES ($1, $2, $3, $4, $4) \
             ON CONFLICT (credential) DO UPDATE SET ciphertext = $2, \
             account = COALESCE($3, credential_tokens.account), stored_at = $4, last_used_at = $4",
        )
        .bind(credential)
        .bind(ciphertext)
        .bind(account)
        .bind(&at)
        .execute(&self.pool)
        .await
        .map_err(RegistryError::db("store credential token"))?;
        Ok(())
    }

    pub async fn credential_token(
        &self,
        credential: &str,
    ) -> Result<Option<TokenRow>, RegistryError> {
        let row = sqlx::query(
            "SELECT ciphertext, account, stored_at, last_used_at FROM credential_tokens WHERE credential = $1",
        )
        .bind(credential)
        .fetch_optional(&self.pool)
        .await
        .map_err(RegistryError::db("read credential token"))?;
        Ok(row.map(|r| TokenRow {
            ciphertext: r.get(0),
            account: r.get(1),
            stored_at: r.get(2),
            last_used_at: r.get(3),
        }))
    }

    /// Records a successful use (a refresh that returned no new refresh token).
    pub async fn touch_credential_token(&self, credential: &str) -> Result<(), RegistryError> {
        sqlx::query("UPDATE credential_tokens SET last_used_at = $1 WHERE credential = $2")
            .bind(now())
            .bind(credential)
            .execute(&self.pool)
            .await
            .map_err(RegistryError::db("record credential token use"))?;
        Ok(())
    }
}

/// An exclusive lock on the file at `path` (created if missing), waited for at most `wait`.
/// Polled rather than blocking a thread on it, so that a hung holder costs no thread.
async fn lock_file_within(
    path: std::path::PathBuf,
    wait: Duration,
) -> Result<std::fs::File, sqlx::Error> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    let deadline = Instant::now() + wait;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "{} is still locked by another process after {} s",
                        path.display(),
                        wait.as_secs()
                    ),
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(sqlx::Error::Io(e)),
        }
    }
}
