//! Sync state per polled folder (UIDVALIDITY, high-water mark), which UIDs are known, and the
//! processing attempts that detect poison messages.

use std::collections::{HashMap, HashSet};

use sqlx::Row;

use super::batch::{FolderUids, V, insert_rows};
use super::records::insert_event;
use super::{
    FailingMessage, Location, MailboxState, Registry, RegistryError, UidValidityCheck, clean, now,
};

impl Registry {
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

    /// Records the folder's current UIDVALIDITY. On a change the high-water mark is reset (the
    /// folder is scanned again; bytes already recorded are linked, not registered again), and a
    /// `uidvalidity-changed` event is written.
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
        let at = now();
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
                .bind(&at)
                .execute(&mut *tx)
                .await
                .map_err(RegistryError::db("insert mailbox state"))?;
                UidValidityCheck::First
            }
            Some(Some(old)) if old == i64::from(uidvalidity) => {
                sqlx::query(
                    "UPDATE mailboxes SET last_poll_at = $1, address = $2 WHERE mailbox_id = $3 AND folder = $4",
                )
                .bind(&at)
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
                .bind(&at)
                .bind(address)
                .bind(mailbox_id)
                .bind(folder)
                .execute(&mut *tx)
                .await
                .map_err(RegistryError::db("reset mailbox state"))?;
                match old {
                    Some(previous) => {
                        let loc = super::records::Loc {
                            owner: mailbox_id,
                            folder,
                            uidvalidity: Some(i64::from(uidvalidity)),
                            uid: None,
                            source: "imap",
                            source_ref: None,
                        };
                        let detail = format!(
                            "UIDVALIDITY {previous} -> {uidvalidity}: folder scanned again"
                        );
                        insert_event(
                            &mut tx,
                            "uidvalidity-changed",
                            &at,
                            &loc,
                            None,
                            Some(&detail),
                        )
                        .await?;
                        UidValidityCheck::Changed {
                            previous: previous as u32,
                        }
                    }
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

    /// Which of `uids` are recorded already (registered, quarantined or linked).
    pub async fn known_uids(
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
            "SELECT uid FROM message_locations WHERE mailbox_id = $1 AND folder = $2 AND uidvalidity = $3 \
             AND uid >= $4 AND uid <= $5",
        )
        .bind(mailbox_id)
        .bind(folder)
        .bind(i64::from(uidvalidity))
        .bind(i64::from(*lo))
        .bind(i64::from(*hi))
        .fetch_all(&self.pool)
        .await
        .map_err(RegistryError::db("look up known UIDs"))?;
        let wanted: HashSet<u32> = uids.iter().copied().collect();
        Ok(rows
            .iter()
            .map(|r| r.get::<i64, _>(0) as u32)
            .filter(|u| wanted.contains(u))
            .collect())
    }

    /// Counts one more processing attempt of a message, before it is processed, and returns
    /// the count with the last recorded error. Cleared by its registration; a count that keeps
    /// growing means the message keeps failing or keeps killing the worker (poison).
    pub async fn begin_attempt(
        &self,
        loc: &Location,
    ) -> Result<(u32, Option<String>), RegistryError> {
        let row = sqlx::query(
            "INSERT INTO processing_attempts (mailbox_id, folder, uidvalidity, uid, attempts, updated_at) \
             VALUES ($1, $2, $3, $4, 1, $5) \
             ON CONFLICT (mailbox_id, folder, uidvalidity, uid) \
             DO UPDATE SET attempts = processing_attempts.attempts + 1, updated_at = $5 \
             RETURNING attempts, last_error",
        )
        .bind(&loc.mailbox_id)
        .bind(&loc.folder)
        .bind(i64::from(loc.uidvalidity))
        .bind(i64::from(loc.uid))
        .bind(now())
        .fetch_one(&self.pool)
        .await
        .map_err(RegistryError::db("count processing attempt"))?;
        Ok((row.get::<i64, _>(0) as u32, row.get(1)))
    }

    /// For a batch committed as one: counts one processing attempt for each of `uids` in one
    /// transaction, unless one of them was attempted before (it failed, or a worker died with it
    /// in hand) — then nothing is counted, `false` is returned, and the caller processes the batch
    /// one message at a time, so that only the message at fault accumulates attempts.
    pub async fn begin_batch_attempts(
        &self,
        mailbox_id: &str,
        folder: &str,
        uidvalidity: u32,
        uids: &[u32],
    ) -> Result<bool, RegistryError> {
        let b = self.backend;
        let here = FolderUids {
            mailbox_id,
            folder,
            uidvalidity: i64::from(uidvalidity),
        };
        let keys: Vec<i64> = uids.iter().map(|u| i64::from(*u)).collect();
        let mut tx = self.begin_write().await?;
        for chunk in keys.chunks(ATTEMPT_CHUNK) {
            let tried: i64 = here
                .query(
                    b,
                    "SELECT COUNT(*) FROM processing_attempts",
                    "AND attempts > 0",
                    chunk,
                )
                .fetch_one(&mut *tx)
                .await
                .map_err(RegistryError::db("look up processing attempts"))?
                .get(0);
            if tried > 0 {
                tx.rollback()
                    .await
                    .map_err(RegistryError::db("end transaction"))?;
                return Ok(false);
            }
        }
        let at = now();
        let rows = uids
            .iter()
            .map(|uid| here.row(*uid, [V::I(Some(1)), V::T(Some(at.clone()))]))
            .collect();
        insert_rows(
            &mut tx,
            b,
            "processing_attempts (mailbox_id, folder, uidvalidity, uid, attempts, updated_at)",
            "ON CONFLICT (mailbox_id, folder, uidvalidity, uid) DO UPDATE \
             SET attempts = processing_attempts.attempts + 1, updated_at = excluded.updated_at",
            rows,
            "count processing attempts",
        )
        .await?;
        tx.commit()
            .await
            .map_err(RegistryError::db("commit processing attempts"))?;
        Ok(true)
    }

    /// Takes back the attempts counted by [`Registry::begin_batch_attempts`] for the messages
    /// of a batch that did not commit for a reason not theirs (disk full, database gone,
    /// shutdown).
    pub async fn forget_batch_attempts(
        &self,
        mailbox_id: &str,
        folder: &str,
        uidvalidity: u32,
        uids: &[u32],
    ) -> Result<(), RegistryError> {
        let here = FolderUids {
            mailbox_id,
            folder,
            uidvalidity: i64::from(uidvalidity),
        };
        let uids: Vec<i64> = uids.iter().map(|u| i64::from(*u)).collect();
        for chunk in uids.chunks(ATTEMPT_CHUNK) {
            here.query(
                self.backend,
                "UPDATE processing_attempts SET attempts = attempts - 1",
                "AND attempts > 0",
                chunk,
            )
            .execute(&self.pool)
            .await
            .map_err(RegistryError::db("take back processing attempts"))?;
        }
        Ok(())
    }

    /// Counts a failed fetch (the server dropped the connection or stopped answering while
    /// sending a fetch that included these messages) against each of `uids`, with the error.
    /// Not a processing attempt: see [`Registry::fetch_failures`].
    pub async fn note_fetch_failure(
        &self,
        mailbox_id: &str,
        folder: &str,
        uidvalidity: u32,
        uids: &[u32],
        error: &str,
    ) -> Result<(), RegistryError> {
        let b = self.backend;
        let at = now();
        let error = clean(error);
        let here = FolderUids {
            mailbox_id,
            folder,
            uidvalidity: i64::from(uidvalidity),
        };
        let rows = uids
            .iter()
            .map(|uid| {
                here.row(
                    *uid,
                    [
                        V::I(Some(0)),
                        V::I(Some(1)),
                        V::T(Some(error.clone())),
                        V::T(Some(at.clone())),
                    ],
                )
            })
            .collect();
        let mut tx = self.begin_write().await?;
        insert_rows(
            &mut tx,
            b,
            "processing_attempts (mailbox_id, folder, uidvalidity, uid, attempts, fetch_failures, last_error, updated_at)",
            "ON CONFLICT (mailbox_id, folder, uidvalidity, uid) DO UPDATE \
             SET fetch_failures = processing_attempts.fetch_failures + 1, \
             last_error = excluded.last_error, updated_at = excluded.updated_at",
            rows,
            "count fetch failures",
        )
        .await?;
        tx.commit()
            .await
            .map_err(RegistryError::db("commit fetch failures"))
    }

    /// The messages among `uids` that were in a fetch the server failed, with how often: they
    /// are fetched alone, after the other mail, fewest failures first.
    pub async fn fetch_failures(
        &self,
        mailbox_id: &str,
        folder: &str,
        uidvalidity: u32,
        uids: &[u32],
    ) -> Result<HashMap<u32, u32>, RegistryError> {
        let here = FolderUids {
            mailbox_id,
            folder,
            uidvalidity: i64::from(uidvalidity),
        };
        let uids: Vec<i64> = uids.iter().map(|u| i64::from(*u)).collect();
        let mut out = HashMap::new();
        for chunk in uids.chunks(ATTEMPT_CHUNK) {
            let rows = here
                .query(
                    self.backend,
                    "SELECT uid, fetch_failures FROM processing_attempts",
                    "AND fetch_failures > 0",
                    chunk,
                )
                .fetch_all(&self.pool)
                .await
                .map_err(RegistryError::db("look up fetch failures"))?;
            for row in rows {
                let uid = row.get::<i64, _>(0) as u32;
                let failures = small(row.get(1));
                out.insert(uid, failures);
            }
        }
        Ok(out)
    }

    /// Messages not registered whose processing was attempted or whose fetch failed, most
    /// recently touched first: what an operator looks at when a mailbox keeps reporting
    /// failures. A message being processed right now has an attempt too, until it commits.
    pub async fn failing(&self, limit: i64) -> Result<Vec<FailingMessage>, RegistryError> {
        let rows = sqlx::query(
            "SELECT mailbox_id, folder, uidvalidity, uid, attempts, fetch_failures, last_error, updated_at \
             FROM processing_attempts WHERE attempts > 0 OR fetch_failures > 0 \
             ORDER BY updated_at DESC, mailbox_id, folder, uid LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(RegistryError::db("list failing messages"))?;
        Ok(rows
            .iter()
            .map(|r| FailingMessage {
                mailbox_id: r.get(0),
                folder: r.get(1),
                uidvalidity: small(r.get(2)),
                uid: small(r.get(3)),
                attempts: small(r.get(4)),
                fetch_failures: small(r.get(5)),
                last_error: r.get(6),
                updated_at: r.get(7),
            })
            .collect())
    }

    /// The messages of one folder that have a processing-attempts row, as (UIDVALIDITY, UID):
    /// failed, attempted or being processed, not (yet) registered.
    pub async fn attempted(
        &self,
        mailbox_id: &str,
        folder: &str,
    ) -> Result<Vec<(u32, u32)>, RegistryError> {
        let rows = sqlx::query(
            "SELECT uidvalidity, uid FROM processing_attempts \
             WHERE mailbox_id = $1 AND folder = $2 ORDER BY uidvalidity, uid",
        )
        .bind(mailbox_id)
        .bind(folder)
        .fetch_all(&self.pool)
        .await
        .map_err(RegistryError::db("list processing attempts of a folder"))?;
        Ok(rows
            .iter()
            .map(|r| (small(r.get(0)), small(r.get(1))))
            .collect())
    }

    /// Deletes the processing-attempts rows of messages that are no longer in the folder
    /// (expunged or moved away by someone else after they failed, or left behind by a UIDVALIDITY
    /// change), given as (UIDVALIDITY, UID). Their counts and errors can never matter again;
    /// kept, they would be listed by `registry failing` for ever. Returns how many were deleted.
    pub async fn forget_attempts_of_gone(
        &self,
        mailbox_id: &str,
        folder: &str,
        gone: &[(u32, u32)],
    ) -> Result<u64, RegistryError> {
        if gone.is_empty() {
            return Ok(0);
        }
        let mut by_validity: HashMap<u32, Vec<i64>> = HashMap::new();
        for (uidvalidity, uid) in gone {
            by_validity
                .entry(*uidvalidity)
                .or_default()
                .push(i64::from(*uid));
        }
        let mut tx = self.begin_write().await?;
        let mut deleted = 0;
        for (uidvalidity, uids) in &by_validity {
            let here = FolderUids {
                mailbox_id,
                folder,
                uidvalidity: i64::from(*uidvalidity),
            };
            for chunk in uids.chunks(ATTEMPT_CHUNK) {
                deleted += here
                    .query(self.backend, "DELETE FROM processing_attempts", "", chunk)
                    .execute(&mut *tx)
                    .await
                    .map_err(RegistryError::db("forget the attempts of messages gone"))?
                    .rows_affected();
            }
        }
        tx.commit()
            .await
            .map_err(RegistryError::db("commit forgetting attempts"))?;
        Ok(deleted)
    }

    /// Takes back the attempt counted by [`Registry::begin_attempt`] when the failure was the
    /// environment's (disk full, database unreachable), not the message's.
    pub async fn forget_attempt(&self, loc: &Location) -> Result<(), RegistryError> {
        sqlx::query(
            "UPDATE processing_attempts SET attempts = attempts - 1 \
             WHERE mailbox_id = $1 AND folder = $2 AND uidvalidity = $3 AND uid = $4 AND attempts > 0",
        )
        .bind(&loc.mailbox_id)
        .bind(&loc.folder)
        .bind(i64::from(loc.uidvalidity))
        .bind(i64::from(loc.uid))
        .execute(&self.pool)
        .await
        .map_err(RegistryError::db("take back processing attempt"))?;
        Ok(())
    }

    /// Remembers why processing failed (shown in the quarantine reason if it keeps failing).
    pub async fn record_failure(&self, loc: &Location, error: &str) -> Result<(), RegistryError> {
        sqlx::query(
            "UPDATE processing_attempts SET last_error = $1, updated_at = $2 \
             WHERE mailbox_id = $3 AND folder = $4 AND uidvalidity = $5 AND uid = $6",
        )
        .bind(clean(error))
        .bind(now())
        .bind(&loc.mailbox_id)
        .bind(&loc.folder)
        .bind(i64::from(loc.uidvalidity))
        .bind(i64::from(loc.uid))
        .execute(&self.pool)
        .await
        .map_err(RegistryError::db("record processing failure"))?;
        Ok(())
    }
}

/// UIDs per statement in the batch attempt queries (well under SQLite's parameter limit).
const ATTEMPT_CHUNK: usize = 400;

/// A count or UID read back from the registry (stored as BIGINT), saturated to `u32`.
fn small(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}
