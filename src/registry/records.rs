//! Records: registration (with number, attachments, location, pending ack and audit events in
//! one transaction), quarantine, linking of known bytes, and reading them back.

use std::collections::HashSet;

use chrono::Datelike;
use sqlx::Row;

use super::{
    AttachmentRow, Content, Event, NewRecord, Origin, Outcome, RecordSummary, Registry,
    RegistryError, Status, addresses_json, clean, clean_opt, now, numbers,
};

type Tx = sqlx::Transaction<'static, sqlx::Any>;

/// What became of one registration inside a transaction.
enum Step {
    /// Written (or nothing to write): the transaction may commit.
    Keep(Outcome),
    /// Another writer got there first: the transaction must be rolled back.
    Undo(Outcome),
}

pub(super) struct Loc<'a> {
    pub(super) owner: &'a str,
    pub(super) folder: &'a str,
    pub(super) uidvalidity: Option<i64>,
    pub(super) uid: Option<i64>,
    pub(super) source: &'static str,
    pub(super) source_ref: Option<&'a str>,
}

fn loc_of(origin: &Origin) -> Loc<'_> {
    match origin {
        Origin::Imap(l) => Loc {
            owner: &l.mailbox_id,
            folder: &l.folder,
            uidvalidity: Some(i64::from(l.uidvalidity)),
            uid: Some(i64::from(l.uid)),
            source: "imap",
            source_ref: None,
        },
        Origin::Import { label, source_ref } => Loc {
            owner: label,
            folder: "",
            uidvalidity: None,
            uid: None,
            source: "import",
            source_ref: Some(source_ref),
        },
    }
}

/// Appends several events (kind, time, detail) of one location in a single statement.
pub(super) async fn insert_events(
    tx: &mut Tx,
    events: &[(&str, &str, Option<&str>)],
    loc: &Loc<'_>,
    message_id: Option<i64>,
) -> Result<(), RegistryError> {
    if events.is_empty() {
        return Ok(());
    }
    let mut sql = String::from(
        "INSERT INTO events (at, kind, mailbox_id, folder, uidvalidity, uid, message_id, detail) VALUES ",
    );
    for i in 0..events.len() {
        let b = i * 8;
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!(
            "(${}, ${}, ${}, ${}, ${}, ${}, ${}, ${})",
            b + 1,
            b + 2,
            b + 3,
            b + 4,
            b + 5,
            b + 6,
            b + 7,
            b + 8
        ));
    }
    // Only placeholders were added to the constant text above: no value reaches the SQL.
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for (kind, at, detail) in events {
        query = query
            .bind(*at)
            .bind(*kind)
            .bind(loc.owner)
            .bind(loc.folder)
            .bind(loc.uidvalidity)
            .bind(loc.uid)
            .bind(message_id)
            .bind(detail.map(clean));
    }
    query
        .execute(&mut **tx)
        .await
        .map_err(RegistryError::db("append events"))?;
    Ok(())
}

pub(super) async fn insert_event(
    tx: &mut Tx,
    kind: &str,
    at: &str,
    loc: &Loc<'_>,
    message_id: Option<i64>,
    detail: Option<&str>,
) -> Result<(), RegistryError> {
    insert_events(tx, &[(kind, at, detail)], loc, message_id).await
}

impl Registry {
    /// Registers or quarantines one message, or links it to the record of the same bytes, in one
    /// transaction with its attachments, location, pending acknowledgement and audit events.
    /// A location recorded before writes nothing.
    pub async fn register(&self, rec: NewRecord<'_>) -> Result<Outcome, RegistryError> {
        let mut tx = self.begin_write().await?;
        match self.register_in(&mut tx, &rec).await? {
            Step::Keep(outcome) => {
                tx.commit()
                    .await
                    .map_err(RegistryError::db("commit registration"))?;
                Ok(outcome)
            }
            Step::Undo(outcome) => {
                tx.rollback()
                    .await
                    .map_err(RegistryError::db("end transaction"))?;
                Ok(outcome)
            }
        }
    }

    /// Registers several messages (in the order given) in one transaction, as [`Registry::register`]
    /// does each. `Ok(None)`: one of their locations was recorded by another writer meanwhile;
    /// nothing is committed and the caller registers them one by one.
    pub async fn register_batch(
        &self,
        recs: &[NewRecord<'_>],
    ) -> Result<Option<Vec<Outcome>>, RegistryError> {
        let mut tx = self.begin_write().await?;
        // One folder of one mailbox (what a fetched batch is): a few multi-row statements.
        let one_folder = match recs.first().map(|r| r.origin) {
            Some(Origin::Imap(first)) => recs.iter().all(|r| {
                matches!(r.origin, Origin::Imap(l) if l.mailbox_id == first.mailbox_id
                    && l.folder == first.folder
                    && l.uidvalidity == first.uidvalidity)
            }),
            _ => false,
        };
        if one_folder {
            let Some(outcomes) = self.register_set(&mut tx, recs).await? else {
                tx.rollback()
                    .await
                    .map_err(RegistryError::db("end transaction"))?;
                return Ok(None);
            };
            tx.commit()
                .await
                .map_err(RegistryError::db("commit registrations"))?;
            return Ok(Some(outcomes));
        }
        let mut outcomes = Vec::with_capacity(recs.len());
        for rec in recs {
            match self.register_in(&mut tx, rec).await? {
                Step::Keep(outcome) => outcomes.push(outcome),
                Step::Undo(_) => {
                    tx.rollback()
                        .await
                        .map_err(RegistryError::db("end transaction"))?;
                    return Ok(None);
                }
            }
        }
        tx.commit()
            .await
            .map_err(RegistryError::db("commit registrations"))?;
        Ok(Some(outcomes))
    }

    /// The statements of one registration inside `tx`.
    async fn register_in(&self, tx: &mut Tx, rec: &NewRecord<'_>) -> Result<Step, RegistryError> {
        let loc = loc_of(rec.origin);
        // This location, recorded before (a retry after a crash between commit and ack)?
        if loc.uid.is_some() {
            let known = sqlx::query(
                "SELECT message_id FROM message_locations \
                 WHERE mailbox_id = $1 AND folder = $2 AND uidvalidity = $3 AND uid = $4",
            )
            .bind(loc.owner)
            .bind(loc.folder)
            .bind(loc.uidvalidity)
            .bind(loc.uid)
            .fetch_optional(&mut **tx)
            .await
            .map_err(RegistryError::db("look up location"))?;
            if let Some(row) = known {
                // Nothing written for it: the transaction may go on.
                return Ok(Step::Keep(Outcome::AlreadyKnown { id: row.get(0) }));
            }
        }

        let at = now();
        let inserted = self.insert_message(tx, rec, &loc, &at).await?;
        let (id, outcome) = match inserted {
            Some((id, number)) => {
                if let Content::Registered(s) = rec.content {
                    for a in &s.attachments {
                        sqlx::query(
                            "INSERT INTO attachments (message_id, ordinal, parent_ordinal, filename, content_type, size, sha256) \
                             VALUES ($1, $2, $3, $4, $5, $6, $7)",
                        )
                        .bind(id)
                        .bind(i64::from(a.ordinal))
                        .bind(a.parent.map(i64::from))
                        .bind(clean_opt(a.filename.as_deref()))
                        .bind(clean(&a.content_type))
                        .bind(a.size() as i64)
                        .bind(a.sha256.to_hex())
                        .execute(&mut **tx)
                        .await
                        .map_err(RegistryError::db("insert attachment"))?;
                    }
                }
                let (outcome, last_kind, last_detail) = match number {
                    Some(number) => (
                        Outcome::Registered {
                            id,
                            number: number.clone(),
                        },
                        "registered",
                        number,
                    ),
                    None => {
                        let reason = match rec.content {
                            Content::Quarantined {
                                reason_code,
                                detail,
                            } => format!("{reason_code}: {detail}"),
                            Content::Registered(_) => String::new(),
                        };
                        (Outcome::Quarantined { id }, "quarantined", reason)
                    }
                };
                // The whole timeline in one statement.
                let mut events: Vec<(&str, &str, Option<&str>)> = rec
                    .timeline
                    .iter()
                    .map(|(kind, when)| (*kind, when.as_str(), None))
                    .collect();
                events.push((last_kind, &at, Some(&last_detail)));
                insert_events(tx, &events, &loc, Some(id)).await?;
                (id, outcome)
            }
            None => {
                // The same bytes are already recorded for this owner: link this location.
                let row = sqlx::query(
                    "SELECT id, status, registry_number FROM messages WHERE mailbox_id = $1 AND raw_sha256 = $2",
                )
                .bind(loc.owner)
                .bind(rec.raw_sha256.to_hex())
                .fetch_one(&mut **tx)
                .await
                .map_err(RegistryError::db("find record of the same bytes"))?;
                let id: i64 = row.get(0);
                let existing = Status::parse(&row.get::<String, _>(1));
                let number: Option<String> = row.get(2);
                let detail = format!(
                    "same bytes as record {id}{}",
                    number.map(|n| format!(" ({n})")).unwrap_or_default()
                );
                insert_event(tx, "linked", &at, &loc, Some(id), Some(&detail)).await?;
                (
                    id,
                    Outcome::Linked {
                        id,
                        status: existing,
                    },
                )
            }
        };

        let location = sqlx::query(
            "INSERT INTO message_locations (message_id, mailbox_id, folder, uidvalidity, uid, source, source_ref, seen_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (mailbox_id, folder, uidvalidity, uid) DO NOTHING RETURNING id",
        )
        .bind(id)
        .bind(loc.owner)
        .bind(loc.folder)
        .bind(loc.uidvalidity)
        .bind(loc.uid)
        .bind(loc.source)
        .bind(loc.source_ref.map(clean))
        .bind(&at)
        .fetch_optional(&mut **tx)
        .await
        .map_err(RegistryError::db("insert location"))?;
        if location.is_none() {
            // Another worker recorded this location meanwhile: undo everything (numbers too).
            return Ok(Step::Undo(Outcome::AlreadyKnown { id }));
        }
        if let (Some(action), Some(uidvalidity), Some(uid)) = (&rec.ack, loc.uidvalidity, loc.uid) {
            sqlx::query(
                "INSERT INTO pending_acks (mailbox_id, folder, uidvalidity, uid, action, message_id, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (mailbox_id, folder, uidvalidity, uid) DO NOTHING",
            )
            .bind(loc.owner)
            .bind(loc.folder)
            .bind(uidvalidity)
            .bind(uid)
            .bind(action.as_str())
            .bind(id)
            .bind(&at)
            .execute(&mut **tx)
            .await
            .map_err(RegistryError::db("insert pending ack"))?;
        }
        if let (Some(uidvalidity), Some(uid)) = (loc.uidvalidity, loc.uid) {
            sqlx::query(
                "DELETE FROM processing_attempts WHERE mailbox_id = $1 AND folder = $2 AND uidvalidity = $3 AND uid = $4",
            )
            .bind(loc.owner)
            .bind(loc.folder)
            .bind(uidvalidity)
            .bind(uid)
            .execute(&mut **tx)
            .await
            .map_err(RegistryError::db("clear processing attempts"))?;
        }
        Ok(Step::Keep(outcome))
    }

    /// Inserts the message row unless the same bytes are recorded for this owner already.
    /// Returns the new id and, for a registration, its number.
    async fn insert_message(
        &self,
        tx: &mut Tx,
        rec: &NewRecord<'_>,
        loc: &Loc<'_>,
        at: &str,
    ) -> Result<Option<(i64, Option<String>)>, RegistryError> {
        let (status, reason_code, reason_detail, s) = match rec.content {
            Content::Registered(s) => (Status::Registered, None, None, Some(s)),
            Content::Quarantined {
                reason_code,
                detail,
            } => (Status::Quarantined, Some(reason_code), Some(detail), None),
        };
        let known =
            sqlx::query("SELECT id FROM messages WHERE mailbox_id = $1 AND raw_sha256 = $2")
                .bind(loc.owner)
                .bind(rec.raw_sha256.to_hex())
                .fetch_optional(&mut **tx)
                .await
                .map_err(RegistryError::db("look up the same bytes"))?;
        if known.is_some() {
            return Ok(None);
        }
        // A registration takes its number inside the transaction: a rollback gives it back, so
        // the sequence has no gaps.
        let number = match status {
            Status::Registered => {
                let year = chrono::Local::now().year();
                let seq = numbers::allocate(tx, &self.numbering.prefix, year).await?;
                let text = self
                    .numbering
                    .render(year, seq)
                    .map_err(|e| RegistryError::Numbering(e.to_string()))?;
                Some((year, seq, text))
            }
            Status::Quarantined => None,
        };
        let inserted = sqlx::query(
            "INSERT INTO messages (mailbox_id, status, registry_number, registry_year, registry_seq, reason_code, \
             reason_detail, raw_sha256, raw_size, rfc822_message_id, message_id_derived, from_name, from_address, \
             to_addresses, cc_addresses, date_header, subject, text_body, html_body, registered_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20) \
             ON CONFLICT (mailbox_id, raw_sha256) DO NOTHING RETURNING id",
        )
        .bind(loc.owner)
        .bind(status.as_str())
        .bind(number.as_ref().map(|n| n.2.clone()))
        .bind(number.as_ref().map(|n| i64::from(n.0)))
        .bind(number.as_ref().map(|n| n.1))
        .bind(reason_code)
        .bind(reason_detail.map(clean))
        .bind(rec.raw_sha256.to_hex())
        .bind(rec.raw_size as i64)
        .bind(s.map(|s| clean(&s.message_id)))
        .bind(s.map_or(0, |s| i64::from(s.message_id_derived)))
        .bind(s.and_then(|s| clean_opt(s.from.as_ref().and_then(|a| a.name.as_deref()))))
        .bind(s.and_then(|s| clean_opt(s.from.as_ref().map(|a| a.address.as_str()))))
        .bind(s.map_or_else(|| "[]".to_owned(), |s| addresses_json(&s.to)))
        .bind(s.map_or_else(|| "[]".to_owned(), |s| addresses_json(&s.cc)))
        .bind(s.and_then(|s| s.date.clone()))
        .bind(s.and_then(|s| clean_opt(s.subject.as_deref())))
        .bind(s.and_then(|s| clean_opt(s.text_body.as_deref())))
        .bind(s.and_then(|s| clean_opt(s.html_body.as_deref())))
        .bind(at)
        .fetch_optional(&mut **tx)
        .await
        .map_err(RegistryError::db("insert message"))?;
        match inserted {
            Some(row) => Ok(Some((row.get(0), number.map(|n| n.2)))),
            None => {
                if number.is_some() {
                    // Another writer recorded the same bytes meanwhile (PostgreSQL waited for
                    // its commit): give the number back; we still hold the sequence row.
                    sqlx::query(
                        "UPDATE registry_sequences SET last_value = last_value - 1 WHERE registry = $1 AND year = $2",
                    )
                    .bind(&self.numbering.prefix)
                    .bind(number.as_ref().map(|n| i64::from(n.0)))
                    .execute(&mut **tx)
                    .await
                    .map_err(RegistryError::db("return registry number"))?;
                }
                Ok(None)
            }
        }
    }

    /// Records, newest first; `status` filters.
    pub async fn list(
        &self,
        status: Option<Status>,
        limit: i64,
    ) -> Result<Vec<RecordSummary>, RegistryError> {
        let rows = sqlx::query(
            "SELECT m.id, m.status, m.registry_number, m.reason_code, m.reason_detail, m.registered_at, \
             m.mailbox_id, m.from_name, m.from_address, m.subject, m.rfc822_message_id, m.raw_sha256, m.raw_size, \
             (SELECT COUNT(*) FROM attachments a WHERE a.message_id = m.id) \
             FROM messages m WHERE ($1 = '' OR m.status = $1) ORDER BY m.id DESC LIMIT $2",
        )
        .bind(status.map_or("", Status::as_str))
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(RegistryError::db("list messages"))?;
        Ok(rows
            .iter()
            .map(|r| {
                let name: Option<String> = r.get(7);
                let addr: Option<String> = r.get(8);
                RecordSummary {
                    id: r.get(0),
                    status: Status::parse(&r.get::<String, _>(1)),
                    registry_number: r.get(2),
                    reason_code: r.get(3),
                    reason_detail: r.get(4),
                    registered_at: r.get(5),
                    mailbox_id: r.get(6),
                    from: match (name, addr) {
                        (Some(n), Some(a)) => Some(format!("{n} <{a}>")),
                        (None, Some(a)) => Some(a),
                        (Some(n), None) => Some(n),
                        (None, None) => None,
                    },
                    subject: r.get(9),
                    rfc822_message_id: r.get(10),
                    raw_sha256: r.get(11),
                    raw_size: r.get::<i64, _>(12) as u64,
                    attachment_count: r.get(13),
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

    /// Every (folder, UIDVALIDITY, UID) recorded for a mailbox, with its record id.
    pub async fn locations(
        &self,
        mailbox_id: &str,
    ) -> Result<Vec<(String, u32, u32, i64)>, RegistryError> {
        let rows = sqlx::query(
            "SELECT folder, uidvalidity, uid, message_id FROM message_locations \
             WHERE mailbox_id = $1 AND uid IS NOT NULL ORDER BY id",
        )
        .bind(mailbox_id)
        .fetch_all(&self.pool)
        .await
        .map_err(RegistryError::db("read locations"))?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    r.get::<i64, _>(1) as u32,
                    r.get::<i64, _>(2) as u32,
                    r.get(3),
                )
            })
            .collect())
    }

    /// The audit trail, oldest first; `message_id` filters.
    pub async fn events(&self, message_id: Option<i64>) -> Result<Vec<Event>, RegistryError> {
        let rows = sqlx::query(
            "SELECT id, at, kind, mailbox_id, folder, uidvalidity, uid, message_id, detail FROM events \
             WHERE ($1 < 0 OR message_id = $1) ORDER BY id",
        )
        .bind(message_id.unwrap_or(-1))
        .fetch_all(&self.pool)
        .await
        .map_err(RegistryError::db("read events"))?;
        Ok(rows
            .iter()
            .map(|r| Event {
                id: r.get(0),
                at: r.get(1),
                kind: r.get(2),
                mailbox_id: r.get(3),
                folder: r.get(4),
                uidvalidity: r.get::<Option<i64>, _>(5).map(|v| v as u32),
                uid: r.get::<Option<i64>, _>(6).map(|v| v as u32),
                message_id: r.get(7),
                detail: r.get(8),
            })
            .collect())
    }

    /// Every blob digest a record refers to (raw messages and attachments), for `registry gc`.
    /// Every blob the records refer to, with the size it must have, by record.
    pub async fn blob_references(&self) -> Result<Vec<BlobReference>, RegistryError> {
        self.blob_references_after(0, i64::MAX).await
    }

    /// The blobs of the (at most `limit`) records after record id `after`, in id order: a
    /// page of [`Registry::blob_references`], so that `registry verify` holds one page at a
    /// time however large the registry.
    pub async fn blob_references_after(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<Vec<BlobReference>, RegistryError> {
        let rows = sqlx::query(
            "WITH page AS (SELECT id, registry_number, raw_sha256, raw_size FROM messages \
                           WHERE id > $1 ORDER BY id LIMIT $2) \
             SELECT id, registry_number, -1 AS ordinal, raw_sha256, raw_size FROM page \
             UNION ALL \
             SELECT p.id, p.registry_number, a.ordinal, a.sha256, a.size \
               FROM attachments a JOIN page p ON p.id = a.message_id \
             ORDER BY 1, 3",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(RegistryError::db("read the blobs records refer to"))?;
        Ok(rows
            .iter()
            .map(|r| BlobReference {
                message_id: r.get(0),
                registry_number: r.get(1),
                attachment: u32::try_from(r.get::<i64, _>(2)).ok(),
                sha256: r.get(3),
                size: u64::try_from(r.get::<i64, _>(4)).unwrap_or_default(),
            })
            .collect())
    }

    /// A record's blobs by its registry number or its id: for `registry export`.
    pub async fn record_files(&self, record: &str) -> Result<Option<RecordFiles>, RegistryError> {
        // Each by its own index (an OR of the two would scan the table): the registry number
        // first, then, for a number, the id.
        const COLUMNS: &str = "SELECT id, registry_number, raw_sha256, raw_size FROM messages";
        let mut row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{COLUMNS} WHERE registry_number = $1"
        )))
        .bind(record)
        .fetch_optional(&self.pool)
        .await
        .map_err(RegistryError::db("find the record"))?;
        if let (None, Ok(id)) = (&row, record.parse::<i64>()) {
            row = sqlx::query(sqlx::AssertSqlSafe(format!("{COLUMNS} WHERE id = $1")))
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(RegistryError::db("find the record"))?;
        }
        let Some(row) = row else {
            return Ok(None);
        };
        let id: i64 = row.get(0);
        let attachments = sqlx::query(
            "SELECT ordinal, filename, content_type, sha256, size FROM attachments \
             WHERE message_id = $1 ORDER BY ordinal",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(RegistryError::db("read the record's attachments"))?
        .iter()
        .map(|a| AttachmentFile {
            ordinal: u32::try_from(a.get::<i64, _>(0)).unwrap_or_default(),
            filename: a.get(1),
            content_type: a.get(2),
            sha256: a.get(3),
            size: u64::try_from(a.get::<i64, _>(4)).unwrap_or_default(),
        })
        .collect();
        Ok(Some(RecordFiles {
            id,
            registry_number: row.get(1),
            raw_sha256: row.get(2),
            raw_size: u64::try_from(row.get::<i64, _>(3)).unwrap_or_default(),
            attachments,
        }))
    }

    pub async fn referenced_blobs(&self) -> Result<HashSet<String>, RegistryError> {
        let rows =
            sqlx::query("SELECT raw_sha256 FROM messages UNION SELECT sha256 FROM attachments")
                .fetch_all(&self.pool)
                .await
                .map_err(RegistryError::db("read referenced blobs"))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

/// A blob a record refers to (see [`Registry::blob_references`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobReference {
    pub message_id: i64,
    /// `None` for a quarantine record.
    pub registry_number: Option<String>,
    /// The attachment's ordinal; `None` for the raw message.
    pub attachment: Option<u32>,
    pub sha256: String,
    pub size: u64,
}

/// A record's blobs (see [`Registry::record_files`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordFiles {
    pub id: i64,
    /// `None` for a quarantine record.
    pub registry_number: Option<String>,
    pub raw_sha256: String,
    pub raw_size: u64,
    pub attachments: Vec<AttachmentFile>,
}

/// One attachment of a record, as registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentFile {
    pub ordinal: u32,
    /// As the sender named it; not safe as a path.
    pub filename: Option<String>,
    pub content_type: String,
    pub sha256: String,
    pub size: u64,
}
