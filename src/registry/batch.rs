//! Set-based registration of one fetched batch: the same rows as [`Registry::register`] writes
//! for each message, written with a handful of multi-row statements in one transaction.
//!
//! Every statement is a round trip (to PostgreSQL, or to sqlx's SQLite worker thread), and a
//! registration is about ten of them; for a batch of a hundred small messages that is a
//! thousand round trips against ten. Numbers are taken from the sequence in one step, in the
//! order of the batch (UID order), so they stay gapless and ordered.

use std::collections::HashMap;

use chrono::Datelike;
use sqlx::Row;

use super::{
    Backend, Content, NewRecord, Origin, Outcome, Registry, RegistryError, Status, addresses_json,
    clean, clean_opt, now,
};

type Tx = sqlx::Transaction<'static, sqlx::Any>;

/// One bound value of a multi-row statement.
pub(super) enum V {
    T(Option<String>),
    I(Option<i64>),
}

fn t(s: impl Into<String>) -> V {
    V::T(Some(s.into()))
}

fn i(n: i64) -> V {
    V::I(Some(n))
}

/// Bound parameters per statement, below SQLite's (32,766) and PostgreSQL's (65,535) limits.
/// Every statement is a round trip to sqlx's SQLite thread or to PostgreSQL, so a batch of a
/// hundred small messages takes about ten at this size (measured: twenty at 512 cost 10% more
/// commit time on helpdesk mail).
const MAX_PARAMS: usize = 4096;

/// The `n`-th (1-based) parameter of a statement whose parameters appear in the order they are
/// bound. PostgreSQL numbers them (`$n`). SQLite gets anonymous `?`: sqlx looks up the name of
/// every SQLite parameter when binding, and SQLite finds a name by scanning the statement's
/// list of named parameters, so `$n` made binding quadratic in the parameters of a statement
/// (measured: 8% of a helpdesk run's CPU at 512 per statement, 27% at 3,200).
pub(super) fn param(backend: Backend, n: usize) -> String {
    match backend {
        Backend::Sqlite => "?".to_owned(),
        Backend::Postgres => format!("${n}"),
    }
}

/// Appends audit events, one row each: (at, kind, mailbox_id, folder, uidvalidity, uid,
/// message_id, detail).
pub(super) async fn append_events(
    tx: &mut Tx,
    backend: Backend,
    rows: Vec<Vec<V>>,
) -> Result<(), RegistryError> {
    insert_rows(
        tx,
        backend,
        "events (at, kind, mailbox_id, folder, uidvalidity, uid, message_id, detail)",
        "",
        rows,
        "append events",
    )
    .await?;
    Ok(())
}

/// `INSERT INTO {head} VALUES (…), (…) {tail}` for `rows`, in chunks that respect the parameter
/// limit; returns the rows of `RETURNING` (empty without one).
pub(super) async fn insert_rows(
    tx: &mut Tx,
    backend: Backend,
    head: &str,
    tail: &str,
    rows: Vec<Vec<V>>,
    action: &'static str,
) -> Result<Vec<sqlx::any::AnyRow>, RegistryError> {
    let Some(width) = rows.first().map(Vec::len) else {
        return Ok(Vec::new());
    };
    let per_chunk = (MAX_PARAMS / width).max(1);
    let mut out = Vec::new();
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<Vec<V>> = rows.by_ref().take(per_chunk).collect();
        let mut sql = format!("INSERT INTO {head} VALUES ");
        let mut n = 0;
        for (r, row) in chunk.iter().enumerate() {
            if r > 0 {
                sql.push_str(", ");
            }
            sql.push('(');
            for c in 0..row.len() {
                n += 1;
                if c > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&param(backend, n));
            }
            sql.push(')');
        }
        sql.push(' ');
        sql.push_str(tail);
        // Constant table and column names and placeholders only: no value reaches the SQL.
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for value in chunk.into_iter().flatten() {
            query = match value {
                V::T(s) => query.bind(s),
                V::I(n) => query.bind(n),
            };
        }
        out.extend(
            query
                .fetch_all(&mut **tx)
                .await
                .map_err(RegistryError::db(action))?,
        );
    }
    Ok(out)
}

/// `{statement} ($1, …)` over `ids`, in chunks (e.g. `DELETE FROM t WHERE id IN`).
pub(super) async fn delete_where_in(
    tx: &mut Tx,
    backend: Backend,
    statement: &'static str,
    ids: &[i64],
) -> Result<(), RegistryError> {
    for chunk in ids.chunks(MAX_PARAMS) {
        let sql = format!("{statement} ({})", placeholders(backend, 1, chunk.len()));
        // A constant statement and placeholders only: no value reaches the SQL.
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for id in chunk {
            query = query.bind(*id);
        }
        query
            .execute(&mut **tx)
            .await
            .map_err(RegistryError::db("delete rows"))?;
    }
    Ok(())
}

/// PostgreSQL: `($first), ($first+1), …`, `n` rows for a `VALUES` list of keys.
///
/// The batch lookups on PostgreSQL probe the unique index once per key: `FROM (VALUES …) AS k,
/// LATERAL (SELECT … WHERE mailbox_id = $1 AND key = k.key OFFSET 0)`. Written
/// `mailbox_id = $1 AND key IN ($2, …)`, PostgreSQL may scan the index by the mailbox alone
/// and filter the keys: on a young registry it has no statistics yet and takes the mailbox for
/// selective, so every batch read every record of the mailbox so far (on the helpdesk
/// benchmark's 10,000 messages, about 2.2 s of the server's time in a 4.6 s run; the same
/// whether the keys are an `IN` list or row values, whose common mailbox it factors out).
/// `OFFSET 0` keeps the subquery apart, so each key is an equality on the whole unique key:
/// one probe.
pub(super) fn probes(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("(${i})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `n` parameters from the `first`-th on, comma-separated (see [`param`]).
pub(super) fn placeholders(backend: Backend, first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| param(backend, i))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One folder's UIDs (mailbox, folder, UIDVALIDITY), as the batch statements address them.
pub(super) struct FolderUids<'a> {
    pub mailbox_id: &'a str,
    pub folder: &'a str,
    pub uidvalidity: i64,
}

impl<'a> FolderUids<'a> {
    /// A row that starts with this folder's key and `uid`, then `rest`, for [`insert_rows`].
    pub(super) fn row(&self, uid: u32, rest: impl IntoIterator<Item = V>) -> Vec<V> {
        let mut row = vec![
            V::T(Some(self.mailbox_id.to_owned())),
            V::T(Some(self.folder.to_owned())),
            V::I(Some(self.uidvalidity)),
            V::I(Some(i64::from(uid))),
        ];
        row.extend(rest);
        row
    }

    /// `{head} WHERE mailbox_id = … AND folder = … AND uidvalidity = … {and} AND uid IN (…)`
    /// with one placeholder per UID of `chunk`, all bound. `head` and `and` are constant text:
    /// only placeholders are added to them, so no value reaches the SQL.
    pub(super) fn query(
        &self,
        backend: Backend,
        head: &str,
        and: &str,
        chunk: &[i64],
    ) -> sqlx::query::Query<'a, sqlx::Any, sqlx::any::AnyArguments> {
        let sql = format!(
            "{head} WHERE mailbox_id = {} AND folder = {} AND uidvalidity = {} {and} AND uid IN ({})",
            param(backend, 1),
            param(backend, 2),
            param(backend, 3),
            placeholders(backend, 4, chunk.len())
        );
        self.bound(sql, chunk)
    }

    /// `sql` with this folder's key bound as its first three parameters and the UIDs of
    /// `chunk` as the ones after. `sql` holds constant text and placeholders only.
    pub(super) fn bound(
        &self,
        sql: String,
        chunk: &[i64],
    ) -> sqlx::query::Query<'a, sqlx::Any, sqlx::any::AnyArguments> {
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(self.mailbox_id)
            .bind(self.folder)
            .bind(self.uidvalidity);
        for uid in chunk {
            query = query.bind(*uid);
        }
        query
    }
}

/// What becomes of one record of the batch.
enum Plan {
    /// This location was recorded before: nothing to write.
    Known(i64),
    /// New bytes: a new record.
    New,
    /// Bytes recorded before (in an earlier transaction or earlier in this batch).
    Link(String),
}

impl Registry {
    /// [`Registry::register_batch`] for IMAP records of one folder and UIDVALIDITY.
    pub(super) async fn register_set(
        &self,
        tx: &mut Tx,
        recs: &[NewRecord<'_>],
    ) -> Result<Option<Vec<Outcome>>, RegistryError> {
        let Some(Origin::Imap(first)) = recs.first().map(|r| r.origin) else {
            return Err(RegistryError::Numbering(
                "internal: a set registration needs IMAP records".into(),
            ));
        };
        let (owner, folder, uidvalidity) = (
            first.mailbox_id.as_str(),
            first.folder.as_str(),
            i64::from(first.uidvalidity),
        );
        let uid_of = |rec: &NewRecord<'_>| match rec.origin {
            Origin::Imap(l) => i64::from(l.uid),
            Origin::Import { .. } => 0,
        };
        let uids: Vec<i64> = recs.iter().map(uid_of).collect();
        let b = self.backend;

        // Locations recorded before (a retry after a crash between commit and ack).
        let mut known: HashMap<i64, i64> = HashMap::new();
        let here = FolderUids {
            mailbox_id: owner,
            folder,
            uidvalidity,
        };
        for chunk in uids.chunks(MAX_PARAMS / 2) {
            let query = match b {
                Backend::Sqlite => here.query(
                    b,
                    "SELECT uid, message_id FROM message_locations",
                    "",
                    chunk,
                ),
                Backend::Postgres => here.bound(
                    format!(
                        "SELECT l.uid, l.message_id FROM (VALUES {}) AS k(uid), LATERAL \
                         (SELECT uid, message_id FROM message_locations WHERE mailbox_id = $1 \
                          AND folder = $2 AND uidvalidity = $3 AND uid = k.uid OFFSET 0) AS l",
                        probes(4, chunk.len())
                    ),
                    chunk,
                ),
            };
            for row in query
                .fetch_all(&mut **tx)
                .await
                .map_err(RegistryError::db("look up locations"))?
            {
                known.insert(row.get(0), row.get(1));
            }
        }

        // Bytes recorded before, for this owner: (id, status, number).
        let hexes: Vec<String> = recs.iter().map(|r| r.raw_sha256.to_hex()).collect();
        let mut recorded: HashMap<String, (i64, Status, Option<String>)> = HashMap::new();
        for chunk in hexes.chunks(MAX_PARAMS / 2) {
            let sql = match b {
                Backend::Sqlite => format!(
                    "SELECT raw_sha256, id, status, registry_number FROM messages \
                     WHERE mailbox_id = ? AND raw_sha256 IN ({})",
                    placeholders(b, 2, chunk.len())
                ),
                Backend::Postgres => format!(
                    "SELECT m.raw_sha256, m.id, m.status, m.registry_number \
                     FROM (VALUES {}) AS k(sha256), LATERAL \
                     (SELECT raw_sha256, id, status, registry_number FROM messages \
                      WHERE mailbox_id = $1 AND raw_sha256 = k.sha256 OFFSET 0) AS m",
                    probes(2, chunk.len())
                ),
            };
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(owner);
            for hex in chunk {
                query = query.bind(hex.as_str());
            }
            for row in query
                .fetch_all(&mut **tx)
                .await
                .map_err(RegistryError::db("look up the same bytes"))?
            {
                let status = Status::parse(&row.get::<String, _>(2));
                recorded.insert(row.get(0), (row.get(1), status, row.get(3)));
            }
        }

        // The plan, in batch order; numbers for the new registrations in that order.
        let mut plans = Vec::with_capacity(recs.len());
        let mut new_in_batch: HashMap<&str, ()> = HashMap::new();
        for (rec, hex) in recs.iter().zip(&hexes) {
            let plan = if let Some(id) = known.get(&uid_of(rec)) {
                Plan::Known(*id)
            } else if recorded.contains_key(hex) || new_in_batch.contains_key(hex.as_str()) {
                Plan::Link(hex.clone())
            } else {
                new_in_batch.insert(hex, ());
                Plan::New
            };
            plans.push(plan);
        }
        let registrations = recs
            .iter()
            .zip(&plans)
            .filter(|(r, p)| matches!(p, Plan::New) && matches!(r.content, Content::Registered(_)))
            .count();
        let year = chrono::Local::now().year();
        let mut next_seq = if registrations > 0 {
            let last = super::numbers::allocate_many(
                tx,
                &self.numbering.prefix,
                year,
                registrations as i64,
            )
            .await?;
            last - registrations as i64 + 1
        } else {
            0
        };

        // New records.
        let at = now();
        let mut numbers: Vec<Option<String>> = Vec::with_capacity(recs.len());
        let mut message_rows = Vec::new();
        for (rec, plan) in recs.iter().zip(&plans) {
            if !matches!(plan, Plan::New) {
                numbers.push(None);
                continue;
            }
            let (status, reason_code, reason_detail, s) = match rec.content {
                Content::Registered(s) => (Status::Registered, None, None, Some(s)),
                Content::Quarantined {
                    reason_code,
                    detail,
                } => (Status::Quarantined, Some(reason_code), Some(detail), None),
            };
            let number = match status {
                Status::Registered => {
                    let text = self
                        .numbering
                        .render(year, next_seq)
                        .map_err(|e| RegistryError::Numbering(e.to_string()))?;
                    let n = Some((next_seq, text));
                    next_seq += 1;
                    n
                }
                Status::Quarantined => None,
            };
            numbers.push(number.as_ref().map(|n| n.1.clone()));
            message_rows.push(vec![
                t(owner),
                t(status.as_str()),
                V::T(number.as_ref().map(|n| n.1.clone())),
                V::I(number.as_ref().map(|_| i64::from(year))),
                V::I(number.as_ref().map(|n| n.0)),
                V::T(reason_code.map(str::to_owned)),
                V::T(reason_detail.map(clean)),
                t(rec.raw_sha256.to_hex()),
                i(rec.raw_size as i64),
                V::T(s.map(|s| clean(&s.message_id))),
                i(s.map_or(0, |s| i64::from(s.message_id_derived))),
                V::T(s.and_then(|s| clean_opt(s.from.as_ref().and_then(|a| a.name.as_deref())))),
                V::T(s.and_then(|s| clean_opt(s.from.as_ref().map(|a| a.address.as_str())))),
                t(s.map_or_else(|| "[]".to_owned(), |s| addresses_json(&s.to))),
                t(s.map_or_else(|| "[]".to_owned(), |s| addresses_json(&s.cc))),
                V::T(s.and_then(|s| s.date.clone())),
                V::T(s.and_then(|s| clean_opt(s.subject.as_deref()))),
                V::T(s.and_then(|s| clean_opt(s.text_body.as_deref()))),
                V::T(s.and_then(|s| clean_opt(s.html_body.as_deref()))),
                t(at.as_str()),
            ]);
        }
        let expected_new = message_rows.len();
        let inserted = insert_rows(
            tx,
            b,
            "messages (mailbox_id, status, registry_number, registry_year, registry_seq, reason_code, \
             reason_detail, raw_sha256, raw_size, rfc822_message_id, message_id_derived, from_name, \
             from_address, to_addresses, cc_addresses, date_header, subject, text_body, html_body, registered_at)",
            "ON CONFLICT (mailbox_id, raw_sha256) DO NOTHING RETURNING raw_sha256, id",
            message_rows,
            "insert messages",
        )
        .await?;
        if inserted.len() != expected_new {
            // Another writer recorded some of the same bytes meanwhile: one by one instead.
            return Ok(None);
        }
        // Their ids; status and number are filled in below, before any link can refer to them.
        for row in &inserted {
            recorded.insert(row.get(0), (row.get(1), Status::Registered, None));
        }

        // Outcomes, attachments, locations, acks and events, in batch order.
        let mut outcomes = Vec::with_capacity(recs.len());
        let mut attachment_rows = Vec::new();
        let mut location_rows = Vec::new();
        let mut ack_rows = Vec::new();
        let mut event_rows = Vec::new();
        let mut written_uids = Vec::new();
        let event = |kind: &str, when: &str, uid: i64, id: i64, detail: Option<String>| {
            vec![
                t(when),
                t(kind),
                t(owner),
                t(folder),
                i(uidvalidity),
                i(uid),
                i(id),
                V::T(detail.map(|d| clean(&d))),
            ]
        };
        for ((rec, plan), (hex, number)) in recs.iter().zip(&plans).zip(hexes.iter().zip(&numbers))
        {
            let uid = uid_of(rec);
            let (id, outcome) = match plan {
                Plan::Known(id) => {
                    outcomes.push(Outcome::AlreadyKnown { id: *id });
                    continue;
                }
                Plan::New => {
                    let id = recorded[hex].0;
                    for (kind, when) in rec.timeline {
                        event_rows.push(event(kind, when, uid, id, None));
                    }
                    let outcome = match (rec.content, number) {
                        (Content::Registered(s), Some(number)) => {
                            for a in &s.attachments {
                                attachment_rows.push(vec![
                                    i(id),
                                    i(i64::from(a.ordinal)),
                                    V::I(a.parent.map(i64::from)),
                                    V::T(clean_opt(a.filename.as_deref())),
                                    t(clean(&a.content_type)),
                                    i(a.size() as i64),
                                    t(a.sha256.to_hex()),
                                ]);
                            }
                            event_rows.push(event(
                                "registered",
                                &at,
                                uid,
                                id,
                                Some(number.clone()),
                            ));
                            recorded.insert(
                                hex.clone(),
                                (id, Status::Registered, Some(number.clone())),
                            );
                            Outcome::Registered {
                                id,
                                number: number.clone(),
                            }
                        }
                        (content, _) => {
                            let reason = match content {
                                Content::Quarantined {
                                    reason_code,
                                    detail,
                                } => format!("{reason_code}: {detail}"),
                                Content::Registered(_) => String::new(),
                            };
                            event_rows.push(event("quarantined", &at, uid, id, Some(reason)));
                            recorded.insert(hex.clone(), (id, Status::Quarantined, None));
                            Outcome::Quarantined { id }
                        }
                    };
                    (id, outcome)
                }
                Plan::Link(hex) => {
                    let (id, status, number) = recorded[hex].clone();
                    let detail = format!(
                        "same bytes as record {id}{}",
                        number.map(|n| format!(" ({n})")).unwrap_or_default()
                    );
                    event_rows.push(event("linked", &at, uid, id, Some(detail)));
                    (id, Outcome::Linked { id, status })
                }
            };
            location_rows.push(vec![
                i(id),
                t(owner),
                t(folder),
                i(uidvalidity),
                i(uid),
                t("imap"),
                V::T(None),
                t(at.as_str()),
            ]);
            if let Some(action) = &rec.ack {
                ack_rows.push(vec![
                    t(owner),
                    t(folder),
                    i(uidvalidity),
                    i(uid),
                    t(action.as_str()),
                    i(id),
                    t(at.as_str()),
                ]);
            }
            written_uids.push(uid);
            outcomes.push(outcome);
        }
        insert_rows(
            tx,
            b,
            "attachments (message_id, ordinal, parent_ordinal, filename, content_type, size, sha256)",
            "",
            attachment_rows,
            "insert attachments",
        )
        .await?;
        let expected_locations = location_rows.len();
        let locations = insert_rows(
            tx,
            b,
            "message_locations (message_id, mailbox_id, folder, uidvalidity, uid, source, source_ref, seen_at)",
            "ON CONFLICT (mailbox_id, folder, uidvalidity, uid) DO NOTHING RETURNING id",
            location_rows,
            "insert locations",
        )
        .await?;
        if locations.len() != expected_locations {
            // Another worker recorded one of these locations meanwhile: one by one instead.
            return Ok(None);
        }
        insert_rows(
            tx,
            b,
            "pending_acks (mailbox_id, folder, uidvalidity, uid, action, message_id, created_at)",
            "ON CONFLICT (mailbox_id, folder, uidvalidity, uid) DO NOTHING",
            ack_rows,
            "insert pending acks",
        )
        .await?;
        append_events(tx, b, event_rows).await?;
        for chunk in written_uids.chunks(MAX_PARAMS / 2) {
            here.query(b, "DELETE FROM processing_attempts", "", chunk)
                .execute(&mut **tx)
                .await
                .map_err(RegistryError::db("clear processing attempts"))?;
        }
        Ok(Some(outcomes))
    }
}
