//! Exactly-once under crashes and outages. The worker is killed with SIGKILL at named points
//! (`MAILINTAKE_FAILPOINT`) and at random moments, the database link is cut mid-run, and the data
//! dir runs out of space. After each, a fresh `run --once` catches up, and a reconciler checks the
//! invariant: every message on the server is registered or quarantined exactly once, the stored
//! raw equals a fresh `BODY.PEEK[]` of it, it ends `\Seen`, and registry numbers have no gaps.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use common::bed::{Bed, MailboxSpec, TENANT, text};
use common::pg::{PgDb, TestDb};
use mailintake::raw_store::Sha256Digest;
use mailintake::registry::Status;

const USER: &str = "podatelna@urad.example";
const CLIENT: &str = "client-podatelna";

async fn bed(database: &TestDb) -> Bed {
    let mut bed = Bed::start().await;
    bed.idp.add_app(TENANT, CLIENT, "secret-podatelna", &[USER]);
    bed.database = Some(database.url());
    bed
}

fn mailbox() -> MailboxSpec {
    MailboxSpec::new("podatelna", USER, CLIENT, "secret-podatelna")
}

/// `n` distinct messages built from the fixtures, each padded to about `pad` bytes.
fn messages(n: usize, pad: usize) -> Vec<Vec<u8>> {
    let fixtures = common::bed::fixtures();
    (0..n)
        .map(|i| {
            let mut raw = format!("X-Test-Sequence: {i}\n").into_bytes();
            raw.extend_from_slice(&fixtures[i % fixtures.len()].1);
            let line = format!("{i:077}\n");
            while raw.len() < pad {
                raw.extend_from_slice(line.as_bytes());
            }
            raw
        })
        .collect()
}

/// The invariant, checked against the server and the registry. Returns the number of records.
async fn reconcile(bed: &Bed) -> usize {
    let registry = bed.registry().await;
    let store = bed.store();
    let served = bed.served(USER, CLIENT).await;
    let uidvalidity = bed.dovecot.uidvalidity(USER, "INBOX").unwrap();
    let rows = registry.list(None, 100_000).await.unwrap();
    let mut by_uid: BTreeMap<u32, i64> = BTreeMap::new();
    for (folder, validity, uid, id) in registry.locations("podatelna").await.unwrap() {
        if folder == "INBOX" && validity == uidvalidity {
            assert!(by_uid.insert(uid, id).is_none(), "UID {uid} recorded twice");
        }
    }
    assert_eq!(
        by_uid.keys().copied().collect::<BTreeSet<_>>(),
        served.keys().copied().collect::<BTreeSet<_>>(),
        "every message on the server must be recorded, and nothing else"
    );
    for (uid, id) in &by_uid {
        let row = rows.iter().find(|r| r.id == *id).unwrap();
        let stored = store
            .get(&Sha256Digest::from_hex(&row.raw_sha256).unwrap())
            .unwrap();
        assert_eq!(
            &stored, &served[uid],
            "UID {uid}: stored raw differs from a fresh BODY.PEEK[]"
        );
    }
    // Distinct bytes, distinct records: nothing registered twice.
    let distinct: BTreeSet<&Vec<u8>> = served.values().collect();
    assert_eq!(rows.len(), distinct.len(), "records vs distinct messages");
    // Every message ends \Seen.
    let unseen: Vec<u32> = bed
        .seen(USER, "INBOX")
        .into_iter()
        .filter(|(_, seen)| !seen)
        .map(|(uid, _)| uid)
        .collect();
    assert!(unseen.is_empty(), "not \\Seen after recovery: {unseen:?}");
    // Registry numbers: 1..N, no gaps, no duplicates.
    let mut numbers: Vec<String> = rows
        .iter()
        .filter_map(|r| r.registry_number.clone())
        .collect();
    numbers.sort();
    let year = chrono::Local::now().format("%Y").to_string();
    let want: Vec<String> = (1..=numbers.len())
        .map(|n| format!("REG-{year}-{n:06}"))
        .collect();
    assert_eq!(numbers, want);
    assert!(
        registry
            .pending_acks("podatelna", "INBOX")
            .await
            .unwrap()
            .is_empty()
    );
    registry.close().await;
    rows.len()
}

/// Nothing is \Seen that is not recorded (the one thing a crash must never cause).
async fn assert_no_ack_without_commit(bed: &Bed) {
    let registry = bed.registry().await;
    let uidvalidity = bed.dovecot.uidvalidity(USER, "INBOX").unwrap();
    let recorded: BTreeSet<u32> = registry
        .locations("podatelna")
        .await
        .unwrap()
        .into_iter()
        .filter(|(f, v, _, _)| f == "INBOX" && *v == uidvalidity)
        .map(|(_, _, uid, _)| uid)
        .collect();
    for (uid, seen) in bed.seen(USER, "INBOX") {
        assert!(
            !seen || recorded.contains(&uid),
            "UID {uid} is \\Seen but not recorded"
        );
    }
    registry.close().await;
}

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::TestDb::sqlite()).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::TestDb::postgres()).await })*
        }
    };
}

both_backends!(
    killed_after_fetch,
    killed_after_raw_write,
    killed_after_commit_before_ack,
    killed_in_the_middle_of_a_batch,
);

/// Delivers 12 messages, runs with the failpoint armed (batches of 4), checks the kill and what
/// it left, then recovers and reconciles.
async fn crash_at(
    db: &TestDb,
    failpoint: &str,
    expect_records: usize,
    expect_pending: usize,
) -> Bed {
    let mut bed = bed(db).await;
    bed.imap_extra = "batch_max_messages = 4".into();
    bed.configure(&[mailbox()]);
    for raw in messages(12, 2_000) {
        bed.dovecot.deliver(USER, "INBOX", &raw).unwrap();
    }
    let out = bed
        .run_once_env(&[("MAILINTAKE_FAILPOINT", failpoint)])
        .await;
    assert_eq!(
        out.status.signal(),
        Some(9),
        "expected SIGKILL at {failpoint}: {}",
        text(&out)
    );
    let registry = bed.registry().await;
    assert_eq!(
        registry.list(None, 100).await.unwrap().len(),
        expect_records,
        "records at {failpoint}"
    );
    assert_eq!(
        registry
            .pending_acks("podatelna", "INBOX")
            .await
            .unwrap()
            .len(),
        expect_pending,
        "pending acks at {failpoint}"
    );
    registry.close().await;
    assert_no_ack_without_commit(&bed).await;

    let out = bed.run_once().await;
    assert!(out.status.success(), "recovery run: {}", text(&out));
    assert_eq!(reconcile(&bed).await, 12);
    bed
}

async fn killed_after_fetch(db: TestDb) {
    // Second batch fetched, nothing of it stored: the first batch is registered and acked.
    // Its acknowledgement rows are deleted in bulk, at the end of the poll, so they are still
    // pending: the recovery run performs them again (harmless) and deletes them.
    crash_at(&db, "after-fetch:2", 4, 4).await;
}

async fn killed_after_raw_write(db: TestDb) {
    // Second message's raw is durable but not committed: an orphan blob, harmless, listed by gc.
    let bed = crash_at(&db, "after-raw-write:2", 1, 1).await;
    let out = bed
        .command(&["registry", "gc", "--dry-run", "--min-age-secs", "0"], &[])
        .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    // After recovery the blob is referenced again (same bytes, registered): no orphans.
    assert!(stdout.contains("0 orphaned blob(s)"), "{stdout}");
}

async fn killed_after_commit_before_ack(db: TestDb) {
    // Two committed, neither acknowledged: the ack rows survive the kill and are replayed.
    crash_at(&db, "after-commit:2", 2, 2).await;
}

async fn killed_in_the_middle_of_a_batch(db: TestDb) {
    // Batch of 4: the kill comes after the middle (third) message's commit.
    crash_at(&db, "mid-batch", 3, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_random_sigkills_during_a_200_message_ingest_on_postgresql() {
    let db = TestDb::postgres();
    let mut bed = bed(&db).await;
    bed.imap_extra = "batch_max_messages = 10".into();
    bed.configure(&[mailbox()]);
    for raw in messages(200, 400_000) {
        bed.dovecot.deliver(USER, "INBOX", &raw).unwrap();
    }
    let seed: u64 = std::env::var("MAILINTAKE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("random kill loop: seed {seed} (set MAILINTAKE_TEST_SEED to replay)");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let registry = bed.registry().await;
    let (mut kills, mut runs) = (0, 0);
    let started = Instant::now();
    while kills < 20 {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "kill loop took too long"
        );
        runs += 1;
        // A random moment: after 0-4 more messages are recorded, plus 0-40 ms. Tied to progress
        // rather than to the clock, so that a loaded machine cannot let the ingest finish first.
        let baseline = registry.list(None, 1000).await.unwrap().len();
        let more = rand::Rng::random_range(&mut rng, 0..=4usize);
        let jitter = rand::Rng::random_range(&mut rng, 0..40u64);
        let mut child = bed.spawn_run_once();
        let wait_until = Instant::now() + Duration::from_secs(30);
        while registry.list(None, 1000).await.unwrap().len() < baseline + more
            && Instant::now() < wait_until
            && child.try_wait().unwrap().is_none()
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(jitter)).await;
        let _ = child.kill(); // SIGKILL
        let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
            .await
            .unwrap();
        if status.signal() == Some(9) {
            kills += 1;
        }
        assert_no_ack_without_commit(&bed).await;
    }
    let before = registry.list(None, 1000).await.unwrap().len();
    eprintln!("{kills} SIGKILLs over {runs} runs; {before} of 200 recorded before the final run");
    assert!(
        before < 200,
        "the kills came too late to interrupt the ingest"
    );
    let out = bed.run_once().await;
    assert!(out.status.success(), "final run: {}", text(&out));
    assert_eq!(reconcile(&bed).await, 200);
    let quarantined = registry
        .list(Some(Status::Quarantined), 1000)
        .await
        .unwrap();
    eprintln!(
        "quarantined as poison after repeated kills: {}",
        quarantined.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_unreachable_mid_run_acks_nothing_uncommitted_and_the_next_run_catches_up() {
    let pg = PgDb::create();
    let mut proxy = common::proxy::Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let mut bed = Bed::start().await;
    bed.idp.add_app(TENANT, CLIENT, "secret-podatelna", &[USER]);
    bed.database = Some(pg.url_via(proxy.port));
    bed.imap_extra = "batch_max_messages = 1".into();
    bed.configure(&[mailbox()]);
    for raw in messages(30, 1_000_000) {
        bed.dovecot.deliver(USER, "INBOX", &raw).unwrap();
    }
    // Watch progress over a direct connection, not through the proxy.
    let direct = mailintake::registry::Registry::open(&pg.url).await.unwrap();
    let child = bed.spawn_run_once();
    let deadline = Instant::now() + Duration::from_secs(60);
    while direct.list(None, 100).await.unwrap().len() < 3 {
        assert!(Instant::now() < deadline, "nothing registered in 60 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy.cut();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("error: mailbox podatelna: registry:")),
        "{}",
        text(&out)
    );
    let midway = direct.list(None, 100).await.unwrap().len();
    assert!(midway < 30, "the cut came too late ({midway})");
    // Nothing acknowledged that is not committed.
    let recorded: BTreeSet<u32> = direct
        .locations("podatelna")
        .await
        .unwrap()
        .into_iter()
        .map(|(_, _, uid, _)| uid)
        .collect();
    for (uid, seen) in bed.seen(USER, "INBOX") {
        assert!(
            !seen || recorded.contains(&uid),
            "UID {uid} \\Seen without a commit"
        );
    }
    // While the database is unreachable a run fails cleanly, touching nothing.
    let out = bed.run_once().await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot open the registry database"),
        "{}",
        text(&out)
    );
    proxy.restore().await;
    let out = bed.run_once().await;
    assert!(out.status.success(), "{}", text(&out));
    bed.database = Some(pg.url.clone());
    assert_eq!(reconcile(&bed).await, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_that_panics_is_reported_and_leaves_nothing_half_done() {
    let db = TestDb::sqlite();
    let mut bed = bed(&db).await;
    bed.imap_extra = "batch_max_messages = 4".into();
    bed.configure(&[mailbox()]);
    for raw in messages(6, 2_000) {
        bed.dovecot.deliver(USER, "INBOX", &raw).unwrap();
    }
    // A bug after the second registration's commit, before its acknowledgement.
    let out = bed
        .run_once_env(&[("MAILINTAKE_FAILPOINT", "panic@after-commit:2")])
        .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("internal error"), "{}", text(&out));
    assert_no_ack_without_commit(&bed).await;
    let out = bed.run_once().await;
    assert!(out.status.success(), "recovery run: {}", text(&out));
    assert_eq!(reconcile(&bed).await, 6);
}

/// A bed whose data dir is a 3 MB tmpfs (the SQLite registry lives elsewhere), with these
/// `[imap]` keys and commit mode; None, with a line saying why `what` is skipped, where no
/// tmpfs can be mounted.
async fn bed_on_a_3mb_disk(
    what: &str,
    imap_extra: &str,
    commit: &str,
) -> Option<(common::tmpfs::Tmpfs, TestDb, Bed)> {
    let tmpfs = match common::tmpfs::Tmpfs::mount("3m") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{what}: SKIPPED: cannot mount a tmpfs here ({e}); CI runs as root and can");
            return None;
        }
    };
    let db = TestDb::sqlite();
    let mut bed = bed(&db).await;
    bed.imap_extra = imap_extra.into();
    bed.tables = format!("[registry]\ncommit = \"{commit}\"\n");
    bed.configure(&[mailbox()]);
    let config = std::fs::read_to_string(&bed.config).unwrap();
    let data_line = config.lines().next().unwrap().to_owned();
    let config = config.replacen(
        &data_line,
        &format!("data_dir = \"{}\"", tmpfs.path().display()),
        1,
    );
    std::fs::write(&bed.config, config).unwrap();
    Some((tmpfs, db, bed))
}

/// Messages prepared beside the one that hit a full disk did not commit either: more runs on the
/// full disk than `max_attempts` must not turn them into poison.
async fn a_full_disk_holds_nothing_against_the_messages_prepared_beside(commit: &str) {
    let Some((tmpfs, _db, bed)) = bed_on_a_3mb_disk(
        "disk full, parallel",
        "parallel_messages = 4\nbatch_max_messages = 4",
        commit,
    )
    .await
    else {
        return;
    };
    let mut msgs = messages(1, 20_000);
    msgs.push(messages(2, 4_000_000).pop().unwrap()); // does not fit in 3 MB
    msgs.extend(messages(7, 20_000).into_iter().skip(2));
    for raw in &msgs {
        bed.dovecot.deliver(USER, "INBOX", raw).unwrap();
    }
    for run in 1..=4 {
        let out = bed.run_once().await;
        assert_eq!(out.status.code(), Some(1), "run {run}: {}", text(&out));
        assert_no_ack_without_commit(&bed).await;
    }
    tmpfs.resize("64m");
    let out = bed.run_once().await;
    assert!(out.status.success(), "{}", text(&out));
    let rows = bed.registry().await.list(None, 100).await.unwrap();
    assert_eq!(rows.len(), 7);
    let poison: Vec<_> = rows
        .iter()
        .filter(|r| r.status != Status::Registered)
        .map(|r| (r.id, r.reason_code.clone()))
        .collect();
    assert!(poison.is_empty(), "quarantined: {poison:?}");
    let store = mailintake::raw_store::RawStore::open(tmpfs.path()).unwrap();
    let served = bed.served(USER, CLIENT).await;
    for r in &rows {
        let raw = store
            .get(&Sha256Digest::from_hex(&r.raw_sha256).unwrap())
            .unwrap();
        assert!(
            served.values().any(|s| *s == raw),
            "record {}: raw bytes differ from the server's",
            r.id
        );
    }
    assert!(bed.seen(USER, "INBOX").values().all(|s| *s));
}

/// A message that fails on its own account (its preparation panics, as a parser bug would) in
/// the same batch as a full disk keeps its attempt and its recorded error: only the messages
/// the disk stopped get theirs back. Before, a batch that stopped took back every attempt it
/// had counted, and lost the failure seen before the disk filled, so that a message failing
/// beside an outage never came nearer to poison. Once the disk has room again (and the bug is
/// gone), all four are registered, none quarantined.
async fn a_failure_beside_a_full_disk_keeps_its_attempt(commit: &str) {
    let Some((tmpfs, _db, bed)) = bed_on_a_3mb_disk(
        "failure beside a full disk",
        "parallel_messages = 1\nbatch_max_messages = 4",
        commit,
    )
    .await
    else {
        return;
    };
    let mut msgs = messages(2, 20_000);
    msgs.push(messages(3, 4_000_000).pop().unwrap()); // does not fit in 3 MB
    msgs.push(messages(4, 20_000).pop().unwrap());
    let mut uids = Vec::new();
    for raw in &msgs {
        uids.push(bed.dovecot.deliver(USER, "INBOX", raw).unwrap());
    }
    // The second message prepared panics; the third fills the disk.
    let out = bed
        .run_once_env(&[("MAILINTAKE_FAILPOINT", "panic@prepare:2")])
        .await;
    assert_eq!(out.status.code(), Some(1), "{commit}: {}", text(&out));
    assert_no_ack_without_commit(&bed).await;
    let failing = bed.registry().await.failing(10).await.unwrap();
    assert_eq!(failing.len(), 1, "{commit}: {failing:?}\n{}", text(&out));
    assert_eq!(failing[0].uid, uids[1], "{commit}: {failing:?}");
    assert_eq!(failing[0].attempts, 1, "{commit}: {failing:?}");
    assert!(
        failing[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("failpoint prepare")),
        "{commit}: {failing:?}"
    );
    tmpfs.resize("64m");
    let out = bed.run_once().await;
    assert!(out.status.success(), "{commit}: {}", text(&out));
    let rows = bed.registry().await.list(None, 10).await.unwrap();
    assert_eq!(rows.len(), 4, "{commit}");
    assert!(
        rows.iter().all(|r| r.status == Status::Registered),
        "{commit}: {rows:?}"
    );
    assert!(bed.registry().await.failing(10).await.unwrap().is_empty());
    assert!(bed.seen(USER, "INBOX").values().all(|s| *s));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_beside_a_full_disk_keeps_its_attempt_per_message() {
    a_failure_beside_a_full_disk_keeps_its_attempt("message").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_beside_a_full_disk_keeps_its_attempt_per_batch() {
    a_failure_beside_a_full_disk_keeps_its_attempt("batch").await;
}

/// A message above the size limit is fetched in parts straight into a blob, after the batches.
/// Killed after its first part: nothing of it recorded or acknowledged, and the half-written
/// blob is a temp file that the next run removes before it fetches the message again, whole
/// this time, and quarantines it once with the bytes the server has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_the_parts_of_a_large_message() {
    let mut bed = Bed::start().await;
    bed.idp.add_app(TENANT, CLIENT, "secret-podatelna", &[USER]);
    bed.tables = "[limits]\nmax_message_bytes = 1000000\n".into();
    bed.configure(&[mailbox()]);
    let small = messages(3, 2_000);
    let mut big = b"X-Test-Sequence: big\n".to_vec();
    big.extend_from_slice(&common::bed::fixtures()[1].1);
    while big.len() < 20 * 1024 * 1024 {
        big.extend_from_slice(format!("{:077}\n", big.len()).as_bytes());
    }
    bed.dovecot.deliver(USER, "INBOX", &small[0]).unwrap();
    let big_uid = bed.dovecot.deliver(USER, "INBOX", &big).unwrap();
    for raw in &small[1..] {
        bed.dovecot.deliver(USER, "INBOX", raw).unwrap();
    }
    let temp_files = || -> Vec<String> {
        std::fs::read_dir(bed.data_dir().join("tmp"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };

    let out = bed
        .run_once_env(&[("MAILINTAKE_FAILPOINT", "between-parts")])
        .await;
    assert_eq!(out.status.signal(), Some(9), "{}", text(&out));
    // The small ones went first, in their batch; nothing of the big one is recorded or seen.
    assert_eq!(bed.registry().await.list(None, 10).await.unwrap().len(), 3);
    assert_eq!(bed.seen(USER, "INBOX").get(&big_uid), Some(&false));
    assert_no_ack_without_commit(&bed).await;
    let left = temp_files();
    assert!(
        left.len() == 1 && left[0].starts_with("pieces."),
        "the first part, in a temp file: {left:?}"
    );

    let out = bed.run_once().await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(reconcile(&bed).await, 4);
    assert!(temp_files().is_empty(), "{:?}", temp_files());
    let registry = bed.registry().await;
    let rows = registry.list(Some(Status::Quarantined), 10).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].reason_code.as_deref(), Some("too-large"));
    assert_eq!(
        rows[0].raw_sha256,
        Sha256Digest::of(&bed.served(USER, CLIENT).await[&big_uid]).to_hex()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_holds_nothing_against_messages_prepared_beside_per_message() {
    a_full_disk_holds_nothing_against_the_messages_prepared_beside("message").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_holds_nothing_against_messages_prepared_beside_per_batch() {
    a_full_disk_holds_nothing_against_the_messages_prepared_beside("batch").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_database_disk_is_not_held_against_the_message() {
    let tmpfs = match common::tmpfs::Tmpfs::mount("6m") {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "full database disk: SKIPPED: cannot mount a tmpfs here ({e}); CI runs as root and can"
            );
            return;
        }
    };
    let mut bed = Bed::start().await;
    bed.idp.add_app(TENANT, CLIENT, "secret-podatelna", &[USER]);
    // The registry on the small filesystem; the blob store elsewhere, with room.
    bed.database = Some(format!(
        "sqlite://{}/registry.sqlite3",
        tmpfs.path().display()
    ));
    bed.configure(&[mailbox()]);
    let out = bed.run_once().await;
    assert!(out.status.success(), "{}", text(&out));
    // Fill the filesystem but for 64 KiB: room for the small writes of a poll (its attempt
    // rows), none for a message whose text body is 1.5 MB.
    let filler = tmpfs.path().join("filler");
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).and_then(|()| f.sync_data()).is_ok() {}
        let len = f.metadata().unwrap().len();
        f.set_len(len.saturating_sub(64 * 1024)).unwrap();
        f.sync_all().unwrap();
    }
    let mut raw = b"From: Jana Novakova <jana@example.cz>\r\nTo: podatelna@urad.example\r\n\
Subject: Long submission\r\nMessage-ID: <long-1@example.cz>\r\n\
Date: Thu, 03 Dec 2026 10:00:00 +0100\r\n\r\n"
        .to_vec();
    while raw.len() < 1_500_000 {
        raw.extend_from_slice(
            b"Zadost o informace podle zakona c. 106/1999 Sb., odstavec dalsi.\r\n",
        );
    }
    bed.dovecot.deliver(USER, "INBOX", &raw).unwrap();
    // More polls than max_attempts (3): the database's trouble is never the message's.
    for poll in 1..=4 {
        let out = bed.run_once().await;
        assert_eq!(out.status.code(), Some(1), "poll {poll}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("full"),
            "poll {poll}: {}",
            text(&out)
        );
        assert!(bed.seen(USER, "INBOX").values().all(|s| !*s), "poll {poll}");
    }
    std::fs::remove_file(&filler).unwrap();
    let out = bed.run_once().await;
    assert!(out.status.success(), "{}", text(&out));
    let rows = bed.registry().await.list(None, 10).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].status,
        Status::Registered,
        "registered, not quarantined as poison: {:?}",
        rows[0].reason_code
    );
    assert!(bed.seen(USER, "INBOX").values().all(|s| *s));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_means_no_commit_no_ack_a_clear_error_and_recovery_once_space_is_back() {
    let tmpfs = match common::tmpfs::Tmpfs::mount("3m") {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "disk_full: SKIPPED: cannot mount a tmpfs here ({e}); CI runs as root and can"
            );
            return;
        }
    };
    let db = TestDb::sqlite(); // the database elsewhere: it is the blob store that fills up
    let bed = bed(&db).await;
    bed.configure(&[mailbox()]);
    // Point the data dir at the small filesystem.
    let config = std::fs::read_to_string(&bed.config).unwrap();
    let data_line = config.lines().next().unwrap().to_owned();
    std::fs::write(
        &bed.config,
        config.replacen(
            &data_line,
            &format!("data_dir = \"{}\"", tmpfs.path().display()),
            1,
        ),
    )
    .unwrap();
    let mut msgs = messages(2, 20_000);
    msgs.push(messages(3, 4_000_000).pop().unwrap()); // does not fit in 3 MB
    msgs.extend(messages(5, 20_000).into_iter().skip(3));
    for raw in &msgs {
        bed.dovecot.deliver(USER, "INBOX", raw).unwrap();
    }
    let out = bed.run_once().await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("raw store: cannot write"), "{}", text(&out));
    assert!(stderr.contains("No space left on device"), "{}", text(&out));
    let registry = bed.registry().await;
    assert_eq!(
        registry.list(None, 100).await.unwrap().len(),
        2,
        "only what fitted is registered"
    );
    let seen = bed.seen(USER, "INBOX");
    assert_eq!(
        seen.values().filter(|s| **s).count(),
        2,
        "only the committed ones are acked: {seen:?}"
    );
    assert_no_ack_without_commit(&bed).await;
    // No temp file is left behind on the full filesystem.
    assert_eq!(
        std::fs::read_dir(tmpfs.path().join("tmp")).unwrap().count(),
        0
    );

    tmpfs.resize("64m");
    let out = bed.run_once().await;
    assert!(out.status.success(), "{}", text(&out));
    let store = mailintake::raw_store::RawStore::open(tmpfs.path()).unwrap();
    let rows = registry.list(None, 100).await.unwrap();
    assert_eq!(rows.len(), 5);
    // The message that hit the full disk is registered, not held against it as poison.
    assert!(rows.iter().all(|r| r.status == Status::Registered));
    for r in &rows {
        assert!(
            store
                .get(&Sha256Digest::from_hex(&r.raw_sha256).unwrap())
                .is_ok()
        );
    }
    assert!(bed.seen(USER, "INBOX").values().all(|s| *s));
}

// ---------------------------------------------------------------------------------------------
// `[registry] commit = "batch"`: one transaction, one flush and one acknowledgement per fetched
// batch. The same invariant, with crash points that fall between batches.

const BATCH_COMMIT: &str = "[registry]\ncommit = \"batch\"\n";

mod batch_commit {
    use super::*;

    macro_rules! both {
        ($($name:ident),* $(,)?) => {
            mod sqlite {
                $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name(super::TestDb::sqlite()).await })*
            }
            mod postgres {
                $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name(super::TestDb::postgres()).await })*
            }
        };
    }

    both!(
        killed_after_fetch,
        killed_after_blobs_published,
        killed_after_commit_before_ack,
        killed_after_acks_before_their_rows_are_deleted,
        moves_are_deleted_at_once,
        a_crash_counts_once_against_the_batch_then_each_message_goes_alone,
        random_sigkills,
    );

    /// 12 messages in batches of 4, committed per batch; the run is killed at `failpoint`.
    async fn crash(db: &TestDb, failpoint: &str, tables: &str) -> Bed {
        let mut bed = bed(db).await;
        bed.imap_extra = "batch_max_messages = 4".into();
        bed.tables = format!("{BATCH_COMMIT}{tables}");
        bed.configure(&[mailbox()]);
        for raw in messages(12, 2_000) {
            bed.dovecot.deliver(USER, "INBOX", &raw).unwrap();
        }
        let out = bed
            .run_once_env(&[("MAILINTAKE_FAILPOINT", failpoint)])
            .await;
        assert_eq!(
            out.status.signal(),
            Some(9),
            "expected SIGKILL at {failpoint}: {}",
            text(&out)
        );
        assert_no_ack_without_commit(&bed).await;
        bed
    }

    async fn counts(bed: &Bed) -> (usize, usize) {
        let registry = bed.registry().await;
        let records = registry.list(None, 100).await.unwrap().len();
        let pending = registry
            .pending_acks("podatelna", "INBOX")
            .await
            .unwrap()
            .len();
        registry.close().await;
        (records, pending)
    }

    async fn recover(bed: &Bed) {
        let out = bed.run_once().await;
        assert!(out.status.success(), "recovery run: {}", text(&out));
        assert_eq!(reconcile(bed).await, 12);
    }

    /// Every committed message is \Seen or has its acknowledgement pending (or both, when the
    /// kill came between the server's answer and the deletion of the rows).
    async fn acked_or_pending(bed: &Bed) -> (usize, usize) {
        let (records, pending) = counts(bed).await;
        let seen = bed.seen(USER, "INBOX").values().filter(|s| **s).count();
        assert!(
            seen <= records && seen + pending >= records,
            "seen {seen}, pending {pending}, records {records}"
        );
        (records, pending)
    }

    async fn killed_after_fetch(db: TestDb) {
        // The second batch fetched, nothing of it stored. The first one's commit runs while the
        // second is prepared, so it may or may not have committed; it was not acknowledged yet.
        let bed = crash(&db, "after-fetch:2", "").await;
        let (records, pending) = acked_or_pending(&bed).await;
        assert!(records == 0 || records == 4, "{records}");
        assert_eq!(pending, records);
        recover(&bed).await;
    }

    async fn killed_after_blobs_published(db: TestDb) {
        // The second batch's blobs are durable, its transaction never ran: none of it is
        // recorded or \Seen, and after recovery no blob is orphaned.
        // The first batch committed before the second was published; its acknowledgement
        // was requested but not waited for.
        let bed = crash(&db, "after-raw-write:2", "").await;
        let (records, pending) = acked_or_pending(&bed).await;
        assert_eq!(records, 4);
        assert!(pending == 0 || pending == 4, "{pending}");
        recover(&bed).await;
        let out = bed
            .command(&["registry", "gc", "--dry-run", "--min-age-secs", "0"], &[])
            .await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}", text(&out));
        assert!(stdout.contains("0 orphaned blob(s)"), "{stdout}");
        // Staged files never linger in tmp/.
        assert_eq!(
            std::fs::read_dir(bed.data_dir().join("tmp"))
                .unwrap()
                .count(),
            0
        );
    }

    async fn killed_after_commit_before_ack(db: TestDb) {
        // The second batch committed as one, not acknowledged: its four ack rows survive the
        // kill and are replayed by the next run (the first batch's may be pending too).
        let bed = crash(&db, "after-commit:2", "").await;
        let (records, pending) = acked_or_pending(&bed).await;
        assert_eq!(records, 8);
        assert!(pending == 4 || pending == 8, "{pending}");
        recover(&bed).await;
    }

    async fn killed_after_acks_before_their_rows_are_deleted(db: TestDb) {
        // Confirmed acknowledgements are deleted in bulk, not per batch: killed after the
        // second acknowledgement round, both acknowledged batches are \Seen on the server and
        // their rows are still pending. The next run performs them again, deletes them and
        // registers nothing twice.
        let bed = crash(&db, "after-ack:2", "").await;
        let (records, pending) = acked_or_pending(&bed).await;
        let seen = bed.seen(USER, "INBOX").values().filter(|s| **s).count();
        assert!(
            seen >= 8,
            "two rounds acknowledged at least two batches: {seen}"
        );
        assert_eq!(pending, records, "no confirmed acknowledgement deleted yet");
        recover(&bed).await; // it checks that no acknowledgement is left pending
        let registry = bed.registry().await;
        // Each message has one `acked` event: the killed run recorded none, the recovery run
        // performed the pending ones again and recorded them with the rest.
        let acked: Vec<i64> = registry
            .events(None)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == "acked")
            .filter_map(|e| e.message_id)
            .collect();
        let ids: BTreeSet<i64> = acked.iter().copied().collect();
        assert_eq!(ids.len(), 12, "{acked:?}");
        assert_eq!(acked.len(), 12, "{acked:?}");
        registry.close().await;
    }

    async fn moves_are_deleted_at_once(db: TestDb) {
        // A move is not deferred like \Seen: performed again after a crash it would name UIDs
        // that are gone. Killed right after the second round of moves, the first round's rows
        // are deleted; only the round in hand is still pending.
        let mut bed = bed(&db).await;
        bed.imap_extra = "batch_max_messages = 4".into();
        bed.tables = BATCH_COMMIT.into();
        let mut mb = mailbox();
        mb.after = "move:Registered";
        bed.configure(&[mb]);
        for raw in messages(12, 2_000) {
            bed.dovecot.deliver(USER, "INBOX", &raw).unwrap();
        }
        let out = bed
            .run_once_env(&[("MAILINTAKE_FAILPOINT", "after-ack:2")])
            .await;
        assert_eq!(out.status.signal(), Some(9), "{}", text(&out));
        let (records, pending) = counts(&bed).await;
        let moved = bed.dovecot.uids(USER, "Registered").unwrap().len();
        let first_round = records - pending;
        assert!(first_round >= 4, "records {records}, pending {pending}");
        assert!(moved > first_round, "moved {moved}, deleted {first_round}");
        let out = bed.run_once().await;
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(counts(&bed).await, (12, 0));
        assert!(bed.dovecot.uids(USER, "INBOX").unwrap().is_empty());
        assert_eq!(bed.dovecot.uids(USER, "Registered").unwrap().len(), 12);
    }

    async fn a_crash_counts_once_against_the_batch_then_each_message_goes_alone(db: TestDb) {
        // Killed with the first batch in hand: one attempt is counted against each of its four
        // messages. The next run takes that batch one message at a time and dies on UID 2 (its
        // second death); the third run quarantines UID 2 as poison (max_attempts = 2) and
        // registers UIDs 3 and 4, which died with the batch only once. Were the batch counted
        // as a whole again, they would be quarantined too.
        let bed = crash(&db, "after-raw-write:1", "[limits]\nmax_attempts = 2\n").await;
        assert_eq!(counts(&bed).await, (0, 0));
        let out = bed
            .run_once_env(&[("MAILINTAKE_FAILPOINT", "after-raw-write:2")])
            .await;
        assert_eq!(out.status.signal(), Some(9), "{}", text(&out));
        assert_eq!(counts(&bed).await.0, 1, "UID 1 registered alone");
        assert_no_ack_without_commit(&bed).await;
        recover(&bed).await;
        let registry = bed.registry().await;
        let quarantined = registry.list(Some(Status::Quarantined), 100).await.unwrap();
        let uids: BTreeMap<i64, u32> = registry
            .locations("podatelna")
            .await
            .unwrap()
            .into_iter()
            .map(|(_, _, uid, id)| (id, uid))
            .collect();
        let poisoned: Vec<u32> = quarantined.iter().map(|r| uids[&r.id]).collect();
        assert_eq!(
            poisoned,
            vec![2],
            "only the message at fault is quarantined"
        );
        assert_eq!(quarantined[0].reason_code.as_deref(), Some("poison"));
        registry.close().await;
    }

    async fn random_sigkills(db: TestDb) {
        // Ten SIGKILLs at random moments during a 240-message ingest in batches of 10.
        let mut bed = bed(&db).await;
        bed.imap_extra = "batch_max_messages = 10".into();
        bed.tables = BATCH_COMMIT.into();
        bed.configure(&[mailbox()]);
        let n = 240;
        for raw in messages(n, 200_000) {
            bed.dovecot.deliver(USER, "INBOX", &raw).unwrap();
        }
        let seed: u64 = std::env::var("MAILINTAKE_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        eprintln!("batch random kill loop: seed {seed} (set MAILINTAKE_TEST_SEED to replay)");
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
        let registry = bed.registry().await;
        let started = Instant::now();
        let mut kills = 0;
        while kills < 10 {
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "kill loop took too long"
            );
            // After 0-1 more batches are recorded, plus 0-30 ms.
            let baseline = registry.list(None, 1000).await.unwrap().len();
            let more = rand::Rng::random_range(&mut rng, 0..=1usize) * 10;
            let jitter = rand::Rng::random_range(&mut rng, 0..30u64);
            let mut child = bed.spawn_run_once();
            let wait_until = Instant::now() + Duration::from_secs(30);
            while registry.list(None, 1000).await.unwrap().len() < baseline + more
                && Instant::now() < wait_until
                && child.try_wait().unwrap().is_none()
            {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            tokio::time::sleep(Duration::from_millis(jitter)).await;
            let _ = child.kill(); // SIGKILL
            let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
                .await
                .unwrap();
            if status.signal() == Some(9) {
                kills += 1;
            }
            assert_no_ack_without_commit(&bed).await;
        }
        let before = registry.list(None, 1000).await.unwrap().len();
        eprintln!("{kills} SIGKILLs; {before} of {n} recorded before the final run");
        assert!(
            before < n,
            "the kills came too late to interrupt the ingest"
        );
        let out = bed.run_once().await;
        assert!(out.status.success(), "final run: {}", text(&out));
        assert_eq!(reconcile(&bed).await, n);
        registry.close().await;
    }
}
