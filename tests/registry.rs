//! The registry suite, run unchanged against both backends: SQLite and a fresh PostgreSQL
//! database per test (the machine's server at 127.0.0.1:5432).

mod common;

use std::collections::BTreeSet;

use common::pg::TestDb;
use mailintake::parse::{Submission, parse};
use mailintake::raw_store::Sha256Digest;
use mailintake::registry::{
    Content, Location, NewRecord, Origin, Outcome, Registry, Status, UidValidityCheck,
};
use sqlx::Connection;

fn fixture(n: usize) -> (Vec<u8>, Submission) {
    let (_, raw) = common::bed::fixtures().swap_remove(n);
    let s = parse(&raw, &Sha256Digest::of(&raw)).unwrap();
    (raw, s)
}

fn imap(uid: u32) -> Origin {
    Origin::Imap(Location {
        mailbox_id: "podatelna".into(),
        folder: "INBOX".into(),
        uidvalidity: 7,
        uid,
    })
}

async fn register(r: &Registry, origin: &Origin, raw: &[u8], s: &Submission) -> Outcome {
    r.register(NewRecord {
        origin,
        raw_sha256: Sha256Digest::of(raw),
        raw_size: raw.len() as u64,
        content: Content::Registered(s),
        ack: Some("seen".into()),
        timeline: &[
            ("fetched", "2026-11-21T00:00:00.000001Z".into()),
            ("stored", "2026-11-21T00:00:00.000002Z".into()),
            ("parsed", "2026-11-21T00:00:00.000003Z".into()),
        ],
    })
    .await
    .unwrap()
}

/// Records these acknowledgements as confirmed by the server (rows deleted, `acked` events).
async fn acked(r: &Registry, acks: &[mailintake::registry::PendingAck]) {
    let at = mailintake::registry::now();
    r.acks_done("podatelna", "INBOX", &[("acked", &at, acks)])
        .await
        .unwrap();
}

fn number(n: i64) -> String {
    format!("REG-{}-{n:06}", chrono::Local::now().format("%Y"))
}

/// Runs each test body against SQLite and against PostgreSQL.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let db = super::TestDb::sqlite();
                super::$name(&db).await
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let db = super::TestDb::postgres();
                super::$name(&db).await
            })*
        }
    };
}

both_backends!(
    registration_writes_everything_in_one_transaction,
    a_known_location_writes_nothing_and_takes_no_number,
    the_same_bytes_elsewhere_are_linked_not_registered_again,
    quarantine_keeps_a_reason_and_takes_no_number,
    the_audit_trail_is_append_only,
    uidvalidity_change_resets_the_mark_and_is_recorded,
    attempts_are_counted_and_cleared_by_the_registration,
    eight_concurrent_writers_get_numbers_without_gaps_or_duplicates,
    nul_bytes_in_text_do_not_break_either_backend,
    many_processes_opening_a_fresh_registry_at_once_all_succeed,
    a_lost_acknowledgement_is_queued_again_at_most_three_times,
    a_credential_lock_is_held_by_one_process_at_a_time,
    ten_credentials_refreshing_at_once_do_not_starve_the_pool,
    fetch_failures_are_counted_apart_from_attempts_and_cleared_by_the_registration,
    a_database_that_says_try_again_is_a_temporary_failure,
    a_records_files_are_found_by_its_number_or_its_id,
);

/// `registry export` and `registry verify` read what the records refer to.
async fn a_records_files_are_found_by_its_number_or_its_id(db: &TestDb) {
    let r = Registry::open(&db.url()).await.unwrap();
    let (raw, s) = fixture(1);
    let Outcome::Registered { id, number } = register(&r, &imap(1), &raw, &s).await else {
        panic!("not registered");
    };
    assert!(!s.attachments.is_empty());
    let by_number = r.record_files(&number).await.unwrap().unwrap();
    assert_eq!(
        r.record_files(&id.to_string()).await.unwrap(),
        Some(by_number.clone())
    );
    assert_eq!(by_number.id, id);
    assert_eq!(by_number.raw_sha256, Sha256Digest::of(&raw).to_hex());
    assert_eq!(by_number.raw_size, raw.len() as u64);
    let registered: Vec<(u32, String, u64)> = s
        .attachments
        .iter()
        .map(|a| (a.ordinal, a.sha256.to_hex(), a.size()))
        .collect();
    let found: Vec<(u32, String, u64)> = by_number
        .attachments
        .iter()
        .map(|a| (a.ordinal, a.sha256.clone(), a.size))
        .collect();
    assert_eq!(found, registered);
    assert_eq!(r.record_files("REG-1999-000001").await.unwrap(), None);
    let refs = r.blob_references().await.unwrap();
    assert_eq!(refs.len(), 1 + s.attachments.len());
    // Paged by record: a second record, one page each.
    let (raw2, s2) = fixture(0);
    let Outcome::Registered { id: id2, .. } = register(&r, &imap(2), &raw2, &s2).await else {
        panic!("not registered");
    };
    assert_eq!(r.blob_references_after(0, 1).await.unwrap(), refs);
    let second = r.blob_references_after(id, 1).await.unwrap();
    assert_eq!(second.len(), 1 + s2.attachments.len());
    assert!(second.iter().all(|x| x.message_id == id2));
    assert_eq!(r.blob_references_after(id2, 1).await.unwrap(), vec![]);
    assert!(
        refs.iter()
            .all(|x| x.message_id == id && x.registry_number.as_deref() == Some(number.as_str()))
    );
}

/// The database's own "try again" (a lock another process holds past the wait; on PostgreSQL
/// also a restart ending the session) is temporary: the scheduler polls again at its next
/// tick instead of backing off as for a fault an administrator must fix. A refused value is not.
async fn a_database_that_says_try_again_is_a_temporary_failure(db: &TestDb) {
    use mailintake::registry::RegistryError;
    Registry::open(&db.url()).await.unwrap().close().await;
    let classify = |source: sqlx::Error| {
        let e = RegistryError::Db {
            action: "test",
            source,
        };
        (e.is_transient(), e.is_data_error())
    };
    let mut holder = sqlx::AnyConnection::connect(&db.url()).await.unwrap();
    let mut waiter = sqlx::AnyConnection::connect(&db.url()).await.unwrap();
    let (hold, wait, refused) = match db {
        TestDb::Sqlite(_) => (
            "BEGIN IMMEDIATE",
            "PRAGMA busy_timeout = 0; BEGIN IMMEDIATE",
            "INSERT INTO events (kind) VALUES (NULL)",
        ),
        TestDb::Postgres(_) => (
            "SELECT COUNT(*) FROM (SELECT pg_advisory_lock(42)) AS held",
            "SET lock_timeout = '50ms'; SELECT COUNT(*) FROM (SELECT pg_advisory_lock(42)) AS held",
            "INSERT INTO events (kind) VALUES (NULL)",
        ),
    };
    sqlx::raw_sql(sqlx::AssertSqlSafe(hold))
        .execute(&mut holder)
        .await
        .unwrap();
    let busy = sqlx::raw_sql(sqlx::AssertSqlSafe(wait))
        .execute(&mut waiter)
        .await
        .unwrap_err();
    assert_eq!(classify(busy), (true, false));
    let refused = sqlx::raw_sql(sqlx::AssertSqlSafe(refused))
        .execute(&mut holder)
        .await
        .unwrap_err();
    assert_eq!(classify(refused), (false, true));
    if let TestDb::Postgres(_) = db {
        // A restart (or an administrator) ends the session: 57P01, or the socket closing.
        let mut waiter = sqlx::PgConnection::connect(&db.url()).await.unwrap();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut waiter)
            .await
            .unwrap();
        let mut admin = sqlx::PgConnection::connect(&db.url()).await.unwrap();
        sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .execute(&mut admin)
            .await
            .unwrap();
        let ended = sqlx::query("SELECT 1")
            .execute(&mut waiter)
            .await
            .unwrap_err();
        assert_eq!(classify(ended), (true, false));
    }
}

/// Ten delegated credentials refreshing at once (a worker's first poll of ten users' mailboxes):
/// each holds its lock while it reads and stores its token through the same registry. On
/// PostgreSQL a lock holds a pool connection; if every connection held a lock, none would be
/// left to read a token, and all would wait for the pool's 15 s timeout.
async fn ten_credentials_refreshing_at_once_do_not_starve_the_pool(db: &TestDb) {
    use std::time::Duration;
    let r = Registry::open(&db.url()).await.unwrap();
    let mut refreshes = tokio::task::JoinSet::new();
    for i in 0..10 {
        let r = r.clone();
        refreshes.spawn(async move {
            let credential = format!("user-{i}");
            let lock = r.lock_credential(&credential).await?;
            r.credential_token(&credential).await?;
            tokio::time::sleep(Duration::from_millis(100)).await; // the token endpoint
            r.put_credential_token(&credential, "sealed", None).await?;
            lock.release().await
        });
    }
    let all = tokio::time::timeout(Duration::from_secs(10), refreshes.join_all())
        .await
        .expect("ten refreshes end well within the pool's timeout");
    for done in all {
        done.unwrap();
    }
}

async fn fetch_failures_are_counted_apart_from_attempts_and_cleared_by_the_registration(
    db: &TestDb,
) {
    use std::collections::HashMap;
    let r = Registry::open(&db.url()).await.unwrap();
    r.note_fetch_failure("podatelna", "INBOX", 7, &[5, 6], "connection lost")
        .await
        .unwrap();
    r.note_fetch_failure("podatelna", "INBOX", 7, &[6], "timed out")
        .await
        .unwrap();
    r.note_fetch_failure("podatelna", "INBOX", 8, &[5], "another UIDVALIDITY")
        .await
        .unwrap();
    let failures = r
        .fetch_failures("podatelna", "INBOX", 7, &[5, 6, 9])
        .await
        .unwrap();
    assert_eq!(failures, HashMap::from([(5, 1), (6, 2)]));
    // Not processing attempts: the batch is counted as one, its messages never attempted.
    assert!(
        r.begin_batch_attempts("podatelna", "INBOX", 7, &[5, 6])
            .await
            .unwrap()
    );
    let (raw, s) = fixture(0);
    register(&r, &imap(5), &raw, &s).await;
    let failures = r
        .fetch_failures("podatelna", "INBOX", 7, &[5, 6])
        .await
        .unwrap();
    assert_eq!(
        failures,
        HashMap::from([(6, 2)]),
        "cleared by the registration"
    );
    // What `registry failing` shows: what is left, with its counts and last error.
    let mut failing: Vec<_> = r
        .failing(10)
        .await
        .unwrap()
        .into_iter()
        .map(|f| {
            (
                f.uidvalidity,
                f.uid,
                f.attempts,
                f.fetch_failures,
                f.last_error.unwrap_or_default(),
            )
        })
        .collect();
    failing.sort();
    assert_eq!(
        failing,
        vec![
            (7, 6, 1, 2, "timed out".to_owned()),
            (8, 5, 0, 1, "another UIDVALIDITY".to_owned()),
        ]
    );
    // The rows of one folder, and forgetting those of messages gone: only the folder's.
    r.note_fetch_failure("podatelna", "Archive", 7, &[6], "another folder")
        .await
        .unwrap();
    assert_eq!(
        r.attempted("podatelna", "INBOX").await.unwrap(),
        vec![(7, 6), (8, 5)]
    );
    assert_eq!(
        r.forget_attempts_of_gone("podatelna", "INBOX", &[(8, 5), (7, 6), (7, 99)])
            .await
            .unwrap(),
        2
    );
    assert!(r.attempted("podatelna", "INBOX").await.unwrap().is_empty());
    assert_eq!(
        r.attempted("podatelna", "Archive").await.unwrap(),
        vec![(7, 6)]
    );
}

/// Two registries on one database (as two worker processes have): while one holds a
/// credential's lock the other waits for it, not for another credential's; released, or
/// dropped (a refresh that returned early), it passes on at once.
async fn a_credential_lock_is_held_by_one_process_at_a_time(db: &TestDb) {
    use std::time::Duration;
    let one = Registry::open(&db.url()).await.unwrap();
    let two = Registry::open(&db.url()).await.unwrap();
    let held = one.lock_credential("user").await.unwrap();
    let waiting = tokio::spawn({
        let two = two.clone();
        async move { two.lock_credential("user").await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "took a lock another process holds");
    let other = tokio::time::timeout(Duration::from_secs(5), two.lock_credential("app"))
        .await
        .expect("another credential's lock is not held")
        .unwrap();
    other.release().await.unwrap();
    held.release().await.unwrap();
    let passed = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("released, the lock passes on")
        .unwrap()
        .unwrap();
    drop(passed);
    let again = tokio::time::timeout(Duration::from_secs(5), one.lock_credential("user"))
        .await
        .expect("dropped, the lock passes on")
        .unwrap();
    again.release().await.unwrap();
}

async fn a_lost_acknowledgement_is_queued_again_at_most_three_times(db: &TestDb) {
    let r = Registry::open(&db.url()).await.unwrap();
    let (raw, s) = fixture(0);
    register(&r, &imap(5), &raw, &s).await;
    // Still pending from the registration: nothing to queue again.
    let (queued, given_up) = r
        .requeue_acks("podatelna", "INBOX", 7, &[5, 6], Some("seen"), None)
        .await
        .unwrap();
    assert_eq!((queued, given_up), (0, vec![]));
    let mut pending = r.pending_acks("podatelna", "INBOX").await.unwrap();
    assert_eq!(pending.len(), 1);
    for round in 1..=mailintake::registry::MAX_ACK_REPEATS {
        acked(&r, &pending).await;
        // The server still shows UID 5 unseen; UID 6 was never recorded here.
        let (queued, given_up) = r
            .requeue_acks("podatelna", "INBOX", 7, &[5, 6], Some("seen"), None)
            .await
            .unwrap();
        assert_eq!((queued, given_up), (1, vec![]), "round {round}");
        pending = r.pending_acks("podatelna", "INBOX").await.unwrap();
        assert_eq!(
            pending
                .iter()
                .map(|a| (a.uid, a.action.as_str()))
                .collect::<Vec<_>>(),
            vec![(5, "seen")]
        );
    }
    acked(&r, &pending).await;
    let (queued, given_up) = r
        .requeue_acks("podatelna", "INBOX", 7, &[5], Some("seen"), None)
        .await
        .unwrap();
    assert_eq!((queued, given_up), (0, vec![5]), "given up after the cap");
    assert!(
        r.pending_acks("podatelna", "INBOX")
            .await
            .unwrap()
            .is_empty()
    );
    let repeated = r
        .events(None)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "ack-repeated" && e.uid == Some(5))
        .count();
    assert_eq!(repeated, mailintake::registry::MAX_ACK_REPEATS as usize);
    // Under another UIDVALIDITY the UID names another message: nothing is queued.
    let (queued, _) = r
        .requeue_acks("podatelna", "INBOX", 8, &[5], Some("seen"), None)
        .await
        .unwrap();
    assert_eq!(queued, 0, "another UIDVALIDITY names other messages");
}

async fn registration_writes_everything_in_one_transaction(db: &TestDb) {
    let r = Registry::open(&db.url()).await.unwrap();
    let (raw, s) = fixture(3); // the forwarded submission: 2 attachments
    let out = register(&r, &imap(1), &raw, &s).await;
    let Outcome::Registered { id, number: n } = out else {
        panic!("{out:?}")
    };
    assert_eq!(n, number(1));
    let att = r.attachments(id).await.unwrap();
    assert_eq!(att.len(), s.attachments.len());
    assert_eq!(att[1].sha256, s.attachments[1].sha256.to_hex());
    assert_eq!(att[1].parent_ordinal, Some(0));
    let acks = r.pending_acks("podatelna", "INBOX").await.unwrap();
    assert_eq!(acks.len(), 1);
    assert_eq!((acks[0].uid, acks[0].action.as_str()), (1, "seen"));
    let kinds: Vec<String> = r
        .events(Some(id))
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, ["fetched", "stored", "parsed", "registered"]);
    acked(&r, &acks).await;
    assert!(
        r.pending_acks("podatelna", "INBOX")
            .await
            .unwrap()
            .is_empty()
    );
    let last = r.events(Some(id)).await.unwrap().pop().unwrap();
    assert_eq!((last.kind.as_str(), last.uid), ("acked", Some(1)));
    let rows = r.list(Some(Status::Registered), 10).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].subject, s.subject);
}

async fn a_known_location_writes_nothing_and_takes_no_number(db: &TestDb) {
    let r = Registry::open(&db.url()).await.unwrap();
    let (raw, s) = fixture(0);
    let first = register(&r, &imap(1), &raw, &s).await;
    let again = register(&r, &imap(1), &raw, &s).await;
    assert_eq!(again, Outcome::AlreadyKnown { id: first.id() });
    let (raw2, s2) = fixture(1);
    let Outcome::Registered { number: n, .. } = register(&r, &imap(2), &raw2, &s2).await else {
        panic!()
    };
    assert_eq!(n, number(2), "a retry must not consume a number");
    assert_eq!(r.list(None, 10).await.unwrap().len(), 2);
    assert_eq!(
        r.known_uids("podatelna", "INBOX", 7, &[1, 2, 3])
            .await
            .unwrap(),
        [1, 2].into()
    );
}

async fn the_same_bytes_elsewhere_are_linked_not_registered_again(db: &TestDb) {
    let r = Registry::open(&db.url()).await.unwrap();
    let (raw, s) = fixture(1);
    let first = register(&r, &imap(1), &raw, &s).await;
    // The same bytes under a new UIDVALIDITY, in another folder, and re-imported.
    let moved = Origin::Imap(Location {
        mailbox_id: "podatelna".into(),
        folder: "INBOX".into(),
        uidvalidity: 8,
        uid: 1,
    });
    let copy = Origin::Imap(Location {
        mailbox_id: "podatelna".into(),
        folder: "Archiv".into(),
        uidvalidity: 3,
        uid: 40,
    });
    for origin in [&moved, &copy] {
        let out = register(&r, origin, &raw, &s).await;
        assert_eq!(
            out,
            Outcome::Linked {
                id: first.id(),
                status: Status::Registered
            }
        );
    }
    // Another mailbox is another registry owner: registered there on its own.
    let other = Origin::Imap(Location {
        mailbox_id: "spisovna".into(),
        folder: "INBOX".into(),
        uidvalidity: 7,
        uid: 1,
    });
    assert!(matches!(
        register(&r, &other, &raw, &s).await,
        Outcome::Registered { .. }
    ));
    assert_eq!(r.list(None, 10).await.unwrap().len(), 2);
    assert_eq!(r.locations("podatelna").await.unwrap().len(), 3);
    // The linked location gets its acknowledgement too.
    let acks = r.pending_acks("podatelna", "INBOX").await.unwrap();
    assert_eq!(
        acks.iter().map(|a| a.uidvalidity).collect::<BTreeSet<_>>(),
        [7, 8].into()
    );
    let kinds: Vec<String> = r
        .events(Some(first.id()))
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds.iter().filter(|k| *k == "linked").count(), 2);
}

async fn quarantine_keeps_a_reason_and_takes_no_number(db: &TestDb) {
    let r = Registry::open(&db.url()).await.unwrap();
    let raw = b"\x00\x01 not a message".to_vec();
    let out = r
        .register(NewRecord {
            origin: &imap(5),
            raw_sha256: Sha256Digest::of(&raw),
            raw_size: raw.len() as u64,
            content: Content::Quarantined {
                reason_code: "parse:no-headers",
                detail: "no RFC 5322 header could be found",
            },
            ack: Some("move:Quarantine".into()),
            timeline: &[],
        })
        .await
        .unwrap();
    let Outcome::Quarantined { id } = out else {
        panic!("{out:?}")
    };
    let q = r.list(Some(Status::Quarantined), 10).await.unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].id, id);
    assert_eq!(q[0].registry_number, None);
    assert_eq!(q[0].reason_code.as_deref(), Some("parse:no-headers"));
    assert!(
        r.list(Some(Status::Registered), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        r.pending_acks("podatelna", "INBOX").await.unwrap()[0].action,
        "move:Quarantine"
    );
    let (raw, s) = fixture(0);
    let Outcome::Registered { number: n, .. } = register(&r, &imap(6), &raw, &s).await else {
        panic!()
    };
    assert_eq!(n, number(1));
}

async fn the_audit_trail_is_append_only(db: &TestDb) {
    let r = Registry::open(&db.url()).await.unwrap();
    let (raw, s) = fixture(0);
    register(&r, &imap(1), &raw, &s).await;
    let mut conn = sqlx::AnyConnection::connect(&db.url()).await.unwrap();
    let update = sqlx::query("UPDATE events SET kind = 'forged'")
        .execute(&mut conn)
        .await;
    let delete = sqlx::query("DELETE FROM events").execute(&mut conn).await;
    for result in [update, delete] {
        let err = result.expect_err("events must not change");
        assert!(err.to_string().contains("append-only"), "{err}");
    }
    assert_eq!(r.events(None).await.unwrap().len(), 4);
}

async fn uidvalidity_change_resets_the_mark_and_is_recorded(db: &TestDb) {
    let r = Registry::open(&db.url()).await.unwrap();
    let check = |v| r.check_uidvalidity("podatelna", "INBOX", "p@u.example", v);
    assert_eq!(check(7).await.unwrap(), UidValidityCheck::First);
    r.advance_high_water("podatelna", "INBOX", 7, 42)
        .await
        .unwrap();
    r.advance_high_water("podatelna", "INBOX", 7, 10)
        .await
        .unwrap(); // never lowered
    assert_eq!(
        r.mailbox_state("podatelna", "INBOX")
            .await
            .unwrap()
            .unwrap()
            .high_water_uid,
        42
    );
    assert_eq!(check(7).await.unwrap(), UidValidityCheck::Unchanged);
    assert_eq!(
        check(9).await.unwrap(),
        UidValidityCheck::Changed { previous: 7 }
    );
    let state = r
        .mailbox_state("podatelna", "INBOX")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((state.uidvalidity, state.high_water_uid), (Some(9), 0));
    let events = r.events(None).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, "uidvalidity-changed");
    assert!(events[0].detail.as_deref().unwrap().contains("7 -> 9"));
    // A mark for a stale UIDVALIDITY is ignored.
    r.advance_high_water("podatelna", "INBOX", 7, 99)
        .await
        .unwrap();
    assert_eq!(
        r.mailbox_state("podatelna", "INBOX")
            .await
            .unwrap()
            .unwrap()
            .high_water_uid,
        0
    );
}

async fn attempts_are_counted_and_cleared_by_the_registration(db: &TestDb) {
    let r = Registry::open(&db.url()).await.unwrap();
    let Origin::Imap(loc) = imap(3) else {
        unreachable!()
    };
    assert_eq!(r.begin_attempt(&loc).await.unwrap(), (1, None));
    r.record_failure(&loc, "database refused the text")
        .await
        .unwrap();
    assert_eq!(
        r.begin_attempt(&loc).await.unwrap(),
        (2, Some("database refused the text".into()))
    );
    r.forget_attempt(&loc).await.unwrap();
    assert_eq!(r.begin_attempt(&loc).await.unwrap().0, 2);
    let (raw, s) = fixture(0);
    register(&r, &imap(3), &raw, &s).await;
    assert_eq!(
        r.begin_attempt(&loc).await.unwrap().0,
        1,
        "registration clears the count"
    );
}

async fn eight_concurrent_writers_get_numbers_without_gaps_or_duplicates(db: &TestDb) {
    let r = Registry::open(&db.url()).await.unwrap();
    let (raw, s) = fixture(0);
    let mut tasks = Vec::new();
    for writer in 0..8u32 {
        let r = r.clone();
        let (raw, s) = (raw.clone(), s.clone());
        tasks.push(tokio::spawn(async move {
            let mut numbers = Vec::new();
            for i in 0..25u32 {
                // Distinct bytes per message; every fourth a retry of the same location.
                let mut bytes = format!("X-Writer: {writer}-{i}\n").into_bytes();
                bytes.extend_from_slice(&raw);
                let origin = Origin::Imap(Location {
                    mailbox_id: "podatelna".into(),
                    folder: "INBOX".into(),
                    uidvalidity: 1,
                    uid: writer * 1000 + i,
                });
                let out = register(&r, &origin, &bytes, &s).await;
                if i % 4 == 0 {
                    assert!(matches!(
                        register(&r, &origin, &bytes, &s).await,
                        Outcome::AlreadyKnown { .. }
                    ));
                }
                match out {
                    Outcome::Registered { number, .. } => numbers.push(number),
                    other => panic!("{other:?}"),
                }
            }
            numbers
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    let want: Vec<String> = (1..=200).map(number).collect();
    assert_eq!(all, want, "numbers must be 1..200 exactly once each");
}

async fn nul_bytes_in_text_do_not_break_either_backend(db: &TestDb) {
    let r = Registry::open(&db.url()).await.unwrap();
    let raw =
        b"From: a@b.cz\nSubject: bad\0subject\nMessage-ID: <n@u>\n\nbody with \0 NUL\n".to_vec();
    let s = parse(&raw, &Sha256Digest::of(&raw)).unwrap();
    let out = register(&r, &imap(1), &raw, &s).await;
    assert!(matches!(out, Outcome::Registered { .. }), "{out:?}");
    let rows = r.list(None, 1).await.unwrap();
    assert_eq!(rows[0].subject.as_deref(), Some("badsubject"));
}

async fn many_processes_opening_a_fresh_registry_at_once_all_succeed(db: &TestDb) {
    // The service starting while an admin runs `registry list`: migrations must not race.
    let mut children = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mailintake.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\ndatabase_url = \"{}\"\n[credentials.p]\nkind = \"password\"\n\
             password_file = \"{}\"\n[[mailbox]]\nid = \"m\"\naddress = \"m@x.example\"\nhost = \"localhost\"\ncredential = \"p\"\n",
            dir.path().display(),
            db.url(),
            config.display()
        ),
    )
    .unwrap();
    for _ in 0..8 {
        children.push(
            std::process::Command::new(env!("CARGO_BIN_EXE_mailintake"))
                .arg("--config")
                .arg(&config)
                .args(["registry", "list"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
    }
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `[registry] commit = "batch"` writes a batch with a few set-based statements: it must leave
/// exactly the rows that registering the same records one by one leaves — numbers, links,
/// quarantine, attachments, locations, pending acknowledgements and the audit trail.
async fn a_batch_writes_what_one_by_one_writes(one_by_one: TestDb, batched: TestDb) {
    let (raw0, s0) = fixture(0);
    let (raw1, s1) = fixture(1);
    let (raw2, s2) = fixture(2);
    let garbage = b"\x00\x01 not a message".to_vec();
    let timeline = [
        ("fetched", "2026-11-21T00:00:00.000001Z".to_owned()),
        ("stored", "2026-11-21T00:00:00.000002Z".to_owned()),
        ("parsed", "2026-11-21T00:00:00.000003Z".to_owned()),
    ];
    let origins: Vec<Origin> = (1..=6).map(imap).collect();
    let record = |i: usize, raw: &[u8], content: Content<'static>| (i, raw.to_vec(), content);
    let (s0, s1, s2): (
        &'static Submission,
        &'static Submission,
        &'static Submission,
    ) = (
        Box::leak(Box::new(s0)),
        Box::leak(Box::new(s1)),
        Box::leak(Box::new(s2)),
    );
    let quarantined = Content::Quarantined {
        reason_code: "parse:no-headers",
        detail: "no RFC 5322 header could be found",
    };
    // UID 1: location known (registered before the batch); UID 2: bytes recorded before →
    // linked; UID 3: new; UID 4: quarantined; UID 5: same bytes as UID 3 in the same batch →
    // linked to it; UID 6: new, with attachments.
    let batch = [
        record(0, &raw0, Content::Registered(s0)),
        record(1, &raw0, Content::Registered(s0)),
        record(2, &raw1, Content::Registered(s1)),
        record(3, &garbage, quarantined),
        record(4, &raw1, Content::Registered(s1)),
        record(5, &raw2, Content::Registered(s2)),
    ];
    let new_record = |(i, raw, content): &(usize, Vec<u8>, Content<'static>)| NewRecord {
        origin: &origins[*i],
        raw_sha256: Sha256Digest::of(raw),
        raw_size: raw.len() as u64,
        content: *content,
        ack: Some("seen".into()),
        timeline: &timeline,
    };
    let mut results = Vec::new();
    for (db, batch_it) in [(&one_by_one, false), (&batched, true)] {
        let r = Registry::open(&db.url()).await.unwrap();
        register(&r, &origins[0], &raw0, s0).await;
        let records: Vec<NewRecord<'_>> = batch.iter().map(new_record).collect();
        let outcomes = if batch_it {
            r.register_batch(&records)
                .await
                .unwrap()
                .expect("no conflict")
        } else {
            let mut out = Vec::new();
            for rec in records {
                out.push(r.register(rec).await.unwrap());
            }
            out
        };
        let rows = r.list(None, 100).await.unwrap();
        let sha_of = |id: i64| {
            rows.iter()
                .find(|m| m.id == id)
                .map(|m| m.raw_sha256.clone())
                .unwrap_or_default()
        };
        let mut messages: Vec<_> = rows
            .iter()
            .map(|m| {
                (
                    m.raw_sha256.clone(),
                    m.status,
                    m.registry_number.clone(),
                    m.reason_code.clone(),
                    m.reason_detail.clone(),
                    m.raw_size,
                    m.subject.clone(),
                    m.rfc822_message_id.clone(),
                    m.attachment_count,
                )
            })
            .collect();
        messages.sort_by(|a, b| a.0.cmp(&b.0));
        let mut attachments = Vec::new();
        for m in &rows {
            for a in r.attachments(m.id).await.unwrap() {
                attachments.push((m.raw_sha256.clone(), format!("{a:?}")));
            }
        }
        attachments.sort();
        let mut locations: Vec<_> = r
            .locations("podatelna")
            .await
            .unwrap()
            .into_iter()
            .map(|(f, v, u, id)| (f, v, u, sha_of(id)))
            .collect();
        locations.sort();
        let mut acks: Vec<_> = r
            .pending_acks("podatelna", "INBOX")
            .await
            .unwrap()
            .into_iter()
            .map(|a| (a.uid, a.action, sha_of(a.message_id)))
            .collect();
        acks.sort();
        let mut events: Vec<_> = r
            .events(None)
            .await
            .unwrap()
            .into_iter()
            .map(|e| {
                let timeline_at =
                    e.at.starts_with("2026-11-21T00:00:00.00000")
                        .then_some(e.at);
                (
                    e.uid,
                    e.kind,
                    timeline_at,
                    e.message_id.map(sha_of),
                    e.detail,
                )
            })
            .collect();
        events.sort();
        let outcomes: Vec<String> = outcomes
            .iter()
            .map(|o| match o {
                Outcome::Registered { id, number } => {
                    format!("registered {} {number}", sha_of(*id))
                }
                Outcome::Quarantined { id } => format!("quarantined {}", sha_of(*id)),
                Outcome::Linked { id, status } => format!("linked {} {status:?}", sha_of(*id)),
                Outcome::AlreadyKnown { id } => format!("known {}", sha_of(*id)),
            })
            .collect();
        results.push((outcomes, messages, attachments, locations, acks, events));
        r.close().await;
    }
    let (a, b) = (&results[0], &results[1]);
    assert_eq!(a.0, b.0, "outcomes");
    assert_eq!(a.1, b.1, "messages");
    assert_eq!(a.2, b.2, "attachments");
    assert_eq!(a.3, b.3, "locations");
    assert_eq!(a.4, b.4, "pending acks");
    assert_eq!(a.5, b.5, "events");
    // And what that is: numbers 1..3 without gaps, two links, one quarantine, one known.
    let kinds: Vec<&str> = b.0.iter().map(|o| o.split(' ').next().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "known",
            "linked",
            "registered",
            "quarantined",
            "linked",
            "registered"
        ]
    );
    let numbers: BTreeSet<String> = b.1.iter().filter_map(|m| m.2.clone()).collect();
    assert_eq!(numbers, (1..=3).map(number).collect());
    assert!(!b.2.is_empty(), "fixture 2 has attachments");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_writes_what_one_by_one_writes_sqlite() {
    a_batch_writes_what_one_by_one_writes(TestDb::sqlite(), TestDb::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_writes_what_one_by_one_writes_postgres() {
    a_batch_writes_what_one_by_one_writes(TestDb::postgres(), TestDb::postgres()).await;
}

/// On PostgreSQL the batch lookups (locations and bytes recorded before) go by their whole key
/// while a fresh registry grows. Without statistics yet, PostgreSQL planned the `IN`-list form
/// as a scan of the index by the mailbox alone with the keys as a filter, so every batch read
/// every record of the mailbox so far: 78,000 index entries here, and on the helpdesk
/// benchmark's 10,000 messages about 2.2 s of the server's time in a 4.6 s run. Read from
/// PostgreSQL's own counters of the two indexes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_batch_lookups_read_only_their_keys_while_a_fresh_registry_grows() {
    let db = TestDb::postgres();
    let (_, s) = fixture(0);
    let timeline = [("fetched", "2026-11-21T00:00:00.000001Z".to_owned())];
    const BATCHES: u32 = 40;
    const PER_BATCH: u32 = 100;
    let origins: Vec<Origin> = (1..=BATCHES * PER_BATCH).map(imap).collect();
    let r = Registry::open(&db.url()).await.unwrap();
    for batch in origins.chunks(PER_BATCH as usize) {
        let records: Vec<NewRecord<'_>> = batch
            .iter()
            .map(|origin| {
                let Origin::Imap(l) = origin else {
                    unreachable!()
                };
                NewRecord {
                    origin,
                    raw_sha256: Sha256Digest::of(format!("message {}", l.uid).as_bytes()),
                    raw_size: 1000,
                    content: Content::Registered(&s),
                    ack: Some("seen".into()),
                    timeline: &timeline,
                }
            })
            .collect();
        let outcomes = r
            .register_batch(&records)
            .await
            .unwrap()
            .expect("no conflict");
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, Outcome::Registered { .. }))
        );
    }
    r.close().await;

    // A backend reports its table counters when it ends: wait until the registry's have.
    let mut admin = sqlx::PgConnection::connect(&db.url()).await.unwrap();
    let mut waited = 0;
    while sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND pid <> pg_backend_pid()",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap()
        > 0
    {
        waited += 1;
        assert!(waited < 200, "the registry's connections did not end");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let read: Vec<(String, i64)> = sqlx::query_as(
        "SELECT indexrelname::text, idx_tup_read FROM pg_stat_user_indexes \
         WHERE indexrelname IN ('messages_mailbox_id_raw_sha256_key', \
                                'message_locations_mailbox_id_folder_uidvalidity_uid_key') \
         ORDER BY indexrelname",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    println!("index entries read over {BATCHES} batches of {PER_BATCH}: {read:?}");
    assert_eq!(read.len(), 2, "both lookup indexes exist: {read:?}");
    // Looked up by their whole key, the new records' keys match nothing: a few entries at
    // most. Scanned by the mailbox alone, batch k reads the k-1 batches before it: 78,000.
    let records = i64::from(BATCHES * PER_BATCH);
    for (index, entries) in &read {
        assert!(
            *entries < records,
            "{index}: {entries} entries read for {records} lookups of new keys"
        );
    }
}

/// On PostgreSQL, long message bodies are stored compressed with LZ4 where the server has it
/// (a fifth less of the server's CPU than pglz on the helpdesk benchmark), and read back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stores_long_bodies_compressed_with_lz4_where_the_server_has_it() {
    let db = TestDb::postgres();
    let (raw, mut s) = fixture(0);
    let body = "Dobrý den, žádám o vydání rozhodnutí ve věci stavebního povolení.\n".repeat(200);
    s.text_body = Some(body.clone());
    let r = Registry::open(&db.url()).await.unwrap();
    let Outcome::Registered { id, .. } = register(&r, &imap(1), &raw, &s).await else {
        panic!("registered")
    };
    r.close().await;

    let mut admin = sqlx::PgConnection::connect(&db.url()).await.unwrap();
    let lz4_built: bool = sqlx::query_scalar(
        "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    let (stored, method): (String, Option<String>) = sqlx::query_as(
        "SELECT text_body, pg_column_compression(text_body) FROM messages WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    println!("LZ4 built into the server: {lz4_built}; the body is stored with {method:?}");
    assert_eq!(stored, body, "read back whole");
    assert_eq!(
        method.as_deref(),
        Some(if lz4_built { "lz4" } else { "pglz" })
    );
}
