//! End to end on real servers: a private Dovecot checking XOAUTH2 for real against the in-test
//! Microsoft identity platform, the `mailintake` binary run as an operator would, and the
//! outcome read back from the registry, the data dir and the server's flags.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::bed::{Bed, MailboxSpec, fixtures, text};
use mailintake::raw_store::Sha256Digest;
use serde_json::Value;

const PODATELNA: &str = "podatelna@urad.example";
const SPISOVNA: &str = "spisovna@urad.example";

fn podatelna() -> MailboxSpec {
    MailboxSpec::new(
        "podatelna",
        PODATELNA,
        "client-podatelna",
        "secret-podatelna",
    )
}

fn spisovna() -> MailboxSpec {
    MailboxSpec::new("spisovna", SPISOVNA, "client-spisovna", "secret-spisovna")
}

async fn bed_with_apps() -> Bed {
    let bed = Bed::start().await;
    bed.idp.add_app(
        common::bed::TENANT,
        "client-podatelna",
        "secret-podatelna",
        &[PODATELNA],
    );
    bed.idp.add_app(
        common::bed::TENANT,
        "client-spisovna",
        "secret-spisovna",
        &[SPISOVNA],
    );
    bed
}

fn expected(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/submissions")
        .join(format!("{name}.expected.json"));
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Every UID recorded for `mailbox` must be recorded once, and its record's stored raw must be
/// what the server serves for that UID, byte for byte; every attachment blob must hash to its
/// recorded sha256. Returns UID → record id.
async fn assert_registry_matches_server(
    bed: &Bed,
    mailbox: &str,
    user: &str,
    client: &str,
) -> BTreeMap<u32, i64> {
    let registry = bed.registry().await;
    let store = bed.store();
    let served = bed.served(user, client).await;
    let rows = registry.list(None, 100_000).await.unwrap();
    let mut by_uid = BTreeMap::new();
    let current_validity = bed.dovecot.uidvalidity(user, "INBOX").unwrap();
    for (folder, uidvalidity, uid, id) in registry.locations(mailbox).await.unwrap() {
        if folder != "INBOX" || uidvalidity != current_validity {
            continue;
        }
        assert!(by_uid.insert(uid, id).is_none(), "UID {uid} recorded twice");
        let row = rows
            .iter()
            .find(|r| r.id == id)
            .expect("location points at a record");
        let raw = store
            .get(&Sha256Digest::from_hex(&row.raw_sha256).unwrap())
            .unwrap();
        let on_server = served
            .get(&uid)
            .unwrap_or_else(|| panic!("UID {uid} not on the server"));
        assert_eq!(
            &raw, on_server,
            "stored raw of UID {uid} differs from what the server serves"
        );
        assert_eq!(row.raw_sha256, Sha256Digest::of(on_server).to_hex());
        assert_eq!(row.raw_size, raw.len() as u64);
        for a in registry.attachments(row.id).await.unwrap() {
            let blob = store
                .get(&Sha256Digest::from_hex(&a.sha256).unwrap())
                .unwrap();
            assert_eq!(Sha256Digest::of(&blob).to_hex(), a.sha256);
            assert_eq!(blob.len() as u64, a.size);
        }
    }
    registry.close().await;
    by_uid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_every_fixture_once_then_marks_it_seen_and_catches_up() {
    let bed = bed_with_apps().await;
    let mut starttls = spisovna();
    starttls.tls = "starttls";
    bed.configure(&[podatelna(), starttls]);
    let fixtures = fixtures();
    let mut uid_of = BTreeMap::new();
    for (name, raw) in &fixtures {
        uid_of.insert(
            name.clone(),
            bed.dovecot.deliver(PODATELNA, "INBOX", raw).unwrap(),
        );
    }
    bed.dovecot
        .deliver(SPISOVNA, "INBOX", &fixtures[0].1)
        .unwrap();

    // 1. Every fixture registered exactly once, bytes as served, attachments as the MIME parts.
    let out = bed.run_once().await;
    assert!(out.status.success(), "{}", text(&out));
    let registered =
        assert_registry_matches_server(&bed, "podatelna", PODATELNA, "client-podatelna").await;
    assert_eq!(registered.len(), fixtures.len(), "{}", text(&out));
    let registry = bed.registry().await;
    let rows = registry.list(None, 100).await.unwrap();
    // Each registration got the next number of this year's sequence: no gaps, no duplicates.
    let mut numbers: Vec<String> = rows
        .iter()
        .map(|r| r.registry_number.clone().unwrap())
        .collect();
    numbers.sort();
    let year = chrono::Local::now().format("%Y").to_string();
    let want: Vec<String> = (1..=rows.len())
        .map(|n| format!("REG-{year}-{n:06}"))
        .collect();
    assert_eq!(numbers, want);
    for (name, uid) in &uid_of {
        let want = expected(name);
        let id = registered[uid];
        let row = rows.iter().find(|r| r.id == id).unwrap();
        assert_eq!(row.subject.as_deref(), want["subject"].as_str(), "{name}");
        let leaf: Vec<_> = registry
            .attachments(id)
            .await
            .unwrap()
            .into_iter()
            .filter(|a| a.content_type != "message/rfc822")
            .collect();
        let want_att = want["attachments"].as_array().unwrap();
        assert_eq!(leaf.len(), want_att.len(), "{name}");
        for (got, want) in leaf.iter().zip(want_att) {
            // The sha256 computed independently (Python's email package) from the MIME part.
            assert_eq!(got.sha256, want["sha256"].as_str().unwrap(), "{name}");
            assert_eq!(got.filename.as_deref(), want["filename"].as_str(), "{name}");
            assert_eq!(got.size, want["size"].as_u64().unwrap(), "{name}");
        }
    }
    // The STARTTLS mailbox is registered too.
    assert_eq!(
        rows.iter().filter(|r| r.mailbox_id == "spisovna").count(),
        1
    );
    // Only after the commit: every message is \Seen on the server.
    assert!(
        bed.seen(PODATELNA, "INBOX").values().all(|s| *s),
        "{:?}",
        bed.seen(PODATELNA, "INBOX")
    );
    assert!(bed.seen(SPISOVNA, "INBOX").values().all(|s| *s));

    // 2. A second run registers nothing new; a message delivered in between is registered.
    let out = bed.run_once().await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        registry.list(None, 100).await.unwrap().len(),
        rows.len(),
        "{}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("podatelna: 0 new"),
        "{}",
        text(&out)
    );
    let mut fresh = b"X-Delivered-In-Between: yes\n".to_vec();
    fresh.extend_from_slice(&fixtures[1].1);
    let new_uid = bed.dovecot.deliver(PODATELNA, "INBOX", &fresh).unwrap();
    let out = bed.run_once().await;
    assert!(out.status.success(), "{}", text(&out));
    let registered =
        assert_registry_matches_server(&bed, "podatelna", PODATELNA, "client-podatelna").await;
    assert_eq!(registered.len(), fixtures.len() + 1);
    assert!(registered.contains_key(&new_uid));
    assert_eq!(bed.seen(PODATELNA, "INBOX").get(&new_uid), Some(&true));

    // `registry list` shows a readable table.
    let list = std::process::Command::new(env!("CARGO_BIN_EXE_mailintake"))
        .arg("--config")
        .arg(&bed.config)
        .args(["registry", "list"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&list.stdout);
    assert!(list.status.success(), "{}", text(&list));
    assert!(table.starts_with("number"), "{table}");
    assert!(table.contains("REG-"), "{table}");
    assert!(table.contains("Žádost o vydání rozhodnutí"), "{table}");
    assert!(
        table.contains(&format!("{} message(s)", fixtures.len() + 2)),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_read_elsewhere_before_the_run_is_not_lost() {
    let bed = bed_with_apps().await;
    bed.configure(&[podatelna()]);
    let fixtures = fixtures();
    // Someone read the first submission in Outlook before the first run.
    let read_early = bed
        .dovecot
        .deliver(PODATELNA, "INBOX", &fixtures[0].1)
        .unwrap();
    bed.dovecot
        .add_flags(PODATELNA, "INBOX", read_early, "\\Seen")
        .unwrap();
    let unread = bed
        .dovecot
        .deliver(PODATELNA, "INBOX", &fixtures[1].1)
        .unwrap();
    let out = bed.run_once().await;
    assert!(out.status.success(), "{}", text(&out));
    let registered =
        assert_registry_matches_server(&bed, "podatelna", PODATELNA, "client-podatelna").await;
    assert!(
        registered.contains_key(&read_early),
        "a message read before the first run was lost"
    );
    assert!(registered.contains_key(&unread));

    // After the high-water mark exists: a new message read before the next run (UID above the
    // mark) is still taken; an old registered one marked unread again is not registered twice.
    let read_between = bed
        .dovecot
        .deliver(PODATELNA, "INBOX", &fixtures[2].1)
        .unwrap();
    bed.dovecot
        .add_flags(PODATELNA, "INBOX", read_between, "\\Seen")
        .unwrap();
    bed.dovecot
        .doveadm(
            &[
                "flags",
                "remove",
                "-u",
                PODATELNA,
                "\\Seen",
                "mailbox",
                "INBOX",
                "uid",
                &unread.to_string(),
            ],
            None,
        )
        .unwrap();
    let out = bed.run_once().await;
    assert!(out.status.success(), "{}", text(&out));
    let registered =
        assert_registry_matches_server(&bed, "podatelna", PODATELNA, "client-podatelna").await;
    assert_eq!(registered.len(), 3, "{registered:?}");
    assert!(
        registered.contains_key(&read_between),
        "a message read between runs was lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_one_mailbox_cannot_open_another_and_a_wrong_secret_names_aadsts7000215() {
    let bed = bed_with_apps().await;
    // spisovna is configured with podatelna's app: the token is valid, but not for this mailbox.
    let mut wrong_app = spisovna();
    wrong_app.client_id = "client-podatelna";
    wrong_app.secret = "secret-podatelna";
    // And a third mailbox whose configured secret is wrong.
    let bad_secret = MailboxSpec::new(
        "archiv",
        "archiv@urad.example",
        "client-archiv",
        "not-the-secret",
    );
    bed.idp.add_app(
        common::bed::TENANT,
        "client-archiv",
        "right-secret",
        &["archiv@urad.example"],
    );
    bed.configure(&[podatelna(), wrong_app, bad_secret]);
    let fixtures = fixtures();
    for user in [PODATELNA, SPISOVNA, "archiv@urad.example"] {
        bed.dovecot.deliver(user, "INBOX", &fixtures[0].1).unwrap();
    }
    let out = bed.run_once().await;
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The wrong secret: the AADSTS code and the mailbox are named.
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error: mailbox archiv"))
        .unwrap_or_else(|| panic!("no error line for mailbox archiv\n{all}"));
    assert!(line.contains("AADSTS7000215"), "{line}");
    assert!(line.contains("invalid_client"), "{line}");
    // The token for podatelna does not open spisovna: the server refuses the login.
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error: mailbox spisovna"))
        .unwrap_or_else(|| panic!("no error line for mailbox spisovna\n{all}"));
    assert!(
        line.contains("rejected the login for spisovna@urad.example"),
        "{line}"
    );
    // Nothing of the failing mailboxes registered or marked seen; the healthy one went on.
    let rows = bed.registry().await.list(None, 100).await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].mailbox_id, "podatelna");
    assert!(bed.seen(SPISOVNA, "INBOX").values().all(|s| !*s));
    assert!(
        bed.seen("archiv@urad.example", "INBOX")
            .values()
            .all(|s| !*s)
    );
    assert!(bed.seen(PODATELNA, "INBOX").values().all(|s| *s));
    // No secret or token reaches the output, even at debug level.
    assert!(
        !all.contains("secret-podatelna") && !all.contains("not-the-secret"),
        "{all}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dovecot_unreachable_then_stopped_mid_run_loses_nothing_and_the_next_run_catches_up() {
    let mut bed = bed_with_apps().await;
    bed.extra_config = String::new();
    bed.configure(&[podatelna()]);
    let mut raws = Vec::new();
    // Enough mail, one message per fetch batch, that the server can be stopped mid-run.
    for i in 0..40 {
        let (_, raw) = &fixtures()[i % 6];
        let mut raw = raw.clone();
        raw.splice(0..0, format!("X-Test-Sequence: {i}\n").into_bytes());
        // A distinct 3 MB body so that each message takes a moment to fetch and store.
        let line = format!("{:076}\n", i);
        for _ in 0..40_000 {
            raw.extend_from_slice(line.as_bytes());
        }
        raws.push(raw);
    }
    for raw in &raws {
        bed.dovecot.deliver(PODATELNA, "INBOX", raw).unwrap();
    }

    // Unreachable: clear error, non-zero exit, nothing registered, nothing seen.
    bed.dovecot.stop().unwrap();
    let out = bed.run_once().await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("error: mailbox podatelna: cannot connect to localhost:")),
        "{}",
        text(&out)
    );
    bed.dovecot.start_again().await.unwrap();
    assert!(bed.seen(PODATELNA, "INBOX").values().all(|s| !*s));
    assert!(
        bed.registry()
            .await
            .list(None, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // Stopped in the middle of a run.
    std::fs::write(
        &bed.config,
        std::fs::read_to_string(&bed.config)
            .unwrap()
            .replace("[imap]\n", "[imap]\nbatch_max_messages = 1\n"),
    )
    .unwrap();
    let child = bed.spawn_run_once();
    let registry = bed.registry().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n = registry.list(None, 1000).await.unwrap().len();
        if n >= 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the run registered nothing in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t0 = std::time::Instant::now();
    let rows_at_stop = registry.list(None, 1000).await.unwrap().len();
    bed.dovecot.stop().unwrap();
    eprintln!(
        "TIMING stop took {:?}, rows at stop {rows_at_stop}, rows after {}",
        t0.elapsed(),
        registry.list(None, 1000).await.unwrap().len()
    );
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let midway = registry.list(None, 1000).await.unwrap().len();
    assert_eq!(
        out.status.code(),
        Some(1),
        "the interrupted run must fail: {}",
        text(&out)
    );
    assert!(
        midway < raws.len(),
        "the server was stopped too late to test anything ({midway})"
    );
    bed.dovecot.start_again().await.unwrap();
    // Nothing is \Seen that is not registered.
    let registered =
        assert_registry_matches_server(&bed, "podatelna", PODATELNA, "client-podatelna").await;
    for (uid, seen) in bed.seen(PODATELNA, "INBOX") {
        assert!(
            !seen || registered.contains_key(&uid),
            "UID {uid} is \\Seen but not registered"
        );
    }

    // The next run catches up: everything registered exactly once and seen.
    let out = bed.run_once().await;
    assert!(out.status.success(), "{}", text(&out));
    let registered =
        assert_registry_matches_server(&bed, "podatelna", PODATELNA, "client-podatelna").await;
    assert_eq!(registered.len(), raws.len());
    assert!(bed.seen(PODATELNA, "INBOX").values().all(|s| *s));
}

/// A tagged OK to `UID STORE` is no proof that `\Seen` stays set: once the INBOX's `cur/` is not
/// writable for it, Dovecot answers OK and later shows the old flags. Here that happens in the
/// middle of a run. The next run finds registered messages still unseen, queues their
/// acknowledgement again (audited as `ack-repeated`) and performs it: none stays registered
/// and unseen for good, and none is registered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_mail_the_server_still_shows_unseen_is_acknowledged_again() {
    use std::os::unix::fs::PermissionsExt;

    let mut bed = bed_with_apps().await;
    bed.imap_extra = "batch_max_messages = 1".into();
    bed.configure(&[podatelna()]);
    let fixtures = fixtures();
    let n = 40;
    for i in 0..n {
        let mut raw = format!("X-Test-Sequence: {i}\n").into_bytes();
        raw.extend_from_slice(&fixtures[i % fixtures.len()].1);
        bed.dovecot.deliver(PODATELNA, "INBOX", &raw).unwrap();
    }
    let home = bed
        .dovecot
        .doveadm(&["user", "-f", "home", PODATELNA], None)
        .unwrap();
    let cur = std::path::Path::new(home.trim()).join("Maildir/INBOX/cur");
    assert!(cur.is_dir(), "{} is not the INBOX's cur/", cur.display());

    // The run has selected the folder and registered its first message: make cur/ read-only.
    let child = bed.spawn_run_once();
    let registry = bed.registry().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while registry.list(None, 1000).await.unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing registered in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    std::fs::set_permissions(&cur, std::fs::Permissions::from_mode(0o555)).unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    std::fs::set_permissions(&cur, std::fs::Permissions::from_mode(0o700)).unwrap();
    let unseen = bed
        .seen(PODATELNA, "INBOX")
        .values()
        .filter(|s| !**s)
        .count();
    assert!(
        unseen > 0,
        "the run acknowledged everything before cur/ became read-only: nothing was tested"
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(registry.list(None, 1000).await.unwrap().len(), n);

    let out = bed.run_once().await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("acknowledging them again"),
        "{}",
        text(&out)
    );
    assert!(bed.seen(PODATELNA, "INBOX").values().all(|s| *s));
    let registered =
        assert_registry_matches_server(&bed, "podatelna", PODATELNA, "client-podatelna").await;
    assert_eq!(registered.len(), n, "each registered once");
    let repeated = registry
        .events(None)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "ack-repeated")
        .count();
    assert_eq!(
        repeated, unseen,
        "one ack-repeated event per message left unseen"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_move_the_registered_mail_is_in_the_target_folder() {
    let bed = bed_with_apps().await;
    let mut mb = podatelna();
    mb.after = "move:Registered";
    bed.configure(&[mb]);
    let fixtures = fixtures();
    for (_, raw) in &fixtures {
        bed.dovecot.deliver(PODATELNA, "INBOX", raw).unwrap();
    }
    let out = bed.run_once().await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        bed.registry().await.list(None, 100).await.unwrap().len(),
        fixtures.len()
    );
    assert!(
        bed.dovecot.uids(PODATELNA, "INBOX").unwrap().is_empty(),
        "INBOX still holds mail"
    );
    assert_eq!(
        bed.dovecot.uids(PODATELNA, "Registered").unwrap().len(),
        fixtures.len()
    );
    // Nothing left to do, nothing registered twice.
    let out = bed.run_once().await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        bed.registry().await.list(None, 100).await.unwrap().len(),
        fixtures.len()
    );
}

/// A bed whose `[limits]` set `max_message_bytes`, holding `big` between two fixtures (the first
/// and the third); `big`'s UID.
async fn bed_with_a_large_message(max_message_bytes: u64, big: &[u8]) -> (Bed, u32) {
    let mut bed = bed_with_apps().await;
    bed.tables = format!("[limits]\nmax_message_bytes = {max_message_bytes}\n");
    bed.configure(&[podatelna()]);
    let fixtures = fixtures();
    bed.dovecot
        .deliver(PODATELNA, "INBOX", &fixtures[0].1)
        .unwrap();
    let big_uid = bed.dovecot.deliver(PODATELNA, "INBOX", big).unwrap();
    bed.dovecot
        .deliver(PODATELNA, "INBOX", &fixtures[2].1)
        .unwrap();
    (bed, big_uid)
}

/// The file of the message in podatelna's INBOX that `this` picks, to damage it behind
/// Dovecot's back.
fn maildir_file(bed: &Bed, this: impl Fn(&std::path::Path) -> bool) -> std::path::PathBuf {
    let maildir = bed
        .dovecot
        .dir()
        .join("mail")
        .join(PODATELNA)
        .join("Maildir/INBOX");
    ["new", "cur"]
        .iter()
        .flat_map(|d| std::fs::read_dir(maildir.join(d)).into_iter().flatten())
        .map(|e| e.unwrap().path())
        .find(|p| this(p))
        .expect("the message's maildir file")
}

/// A message larger than one fetch can hold (async-imap's 512 MiB response buffer) is fetched in
/// parts into its blob. Here the size limit is above it, so it is then read back, parsed and
/// registered like any other; the messages around it are registered too, and all end `\Seen`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_too_large_for_one_fetch_is_fetched_in_parts_and_registered() {
    let mut huge =
        b"From: a@example.cz\r\nTo: podatelna@urad.example\r\nSubject: huge\r\n\r\n".to_vec();
    let line = [b'A'; 998];
    while huge.len() < 513 * 1024 * 1024 {
        huge.extend_from_slice(&line);
        huge.extend_from_slice(b"\r\n");
    }
    let (huge_sha256, huge_len) = (Sha256Digest::of(&huge), huge.len() as u64);
    let (bed, huge_uid) = bed_with_a_large_message(1 << 30, &huge).await;
    drop(huge);
    let out = bed.run_once().await;
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("large message fetched in parts")
            && stderr.contains(&format!("uid={huge_uid}")),
        "{}",
        text(&out)
    );
    let rows = bed.registry().await.list(None, 10).await.unwrap();
    assert_eq!(rows.len(), 3);
    assert!(
        rows.iter()
            .all(|r| r.status == mailintake::registry::Status::Registered)
    );
    let huge_row = rows
        .iter()
        .find(|r| r.raw_sha256 == huge_sha256.to_hex())
        .expect("the huge message's record, under the digest of the bytes delivered");
    let blob = bed.store().path_of(&huge_sha256);
    assert_eq!(
        std::fs::metadata(&blob).unwrap().len(),
        huge_len,
        "{huge_row:?}"
    );
    let seen = bed.seen(PODATELNA, "INBOX");
    assert_eq!(seen.len(), 3);
    assert!(seen.values().all(|s| *s), "{seen:?}");
}

/// A large message the server cannot serve fails alone. Here its maildir file is cut short
/// behind Dovecot's back, and Dovecot drops the connection when it finds fewer bytes than its
/// index promised. The mail around it is registered and `\Seen`; it is reported (exit 1), left
/// unseen, and nothing is recorded for it, at every poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_message_the_server_cannot_serve_fails_alone() {
    let mut big = fixtures()[1].1.clone();
    while big.len() < 3 * 1024 * 1024 {
        big.extend_from_slice(format!("{:077}\n", big.len()).as_bytes());
    }
    let (bed, big_uid) = bed_with_a_large_message(1_000_000, &big).await;
    let file = maildir_file(&bed, |p| std::fs::metadata(p).unwrap().len() > 1024 * 1024);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(2 * 1024 * 1024)
        .unwrap();

    for poll in 1..=4 {
        let out = bed.run_once().await;
        assert_eq!(out.status.code(), Some(1), "poll {poll}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("UID FETCH BODY.PEEK[]<partial>"),
            "poll {poll}: {}",
            text(&out)
        );
        let rows = bed.registry().await.list(None, 10).await.unwrap();
        assert_eq!(
            rows.len(),
            2,
            "poll {poll}: the two others, nothing for the big one"
        );
        assert!(rows.iter().all(|r| r.raw_size < 1024 * 1024), "poll {poll}");
        let seen = bed.seen(PODATELNA, "INBOX");
        assert_eq!(seen.get(&big_uid), Some(&false), "poll {poll}: {seen:?}");
        assert_eq!(
            seen.values().filter(|s| **s).count(),
            2,
            "poll {poll}: {seen:?}"
        );
    }
}

/// Makes the test Dovecot advertise only `caps` after login (it still understands every
/// command; mailintake goes by what is advertised).
fn advertise_only(bed: &Bed, caps: &str) {
    let conf = bed.dovecot.conf_path();
    let mut text = std::fs::read_to_string(conf).unwrap();
    text.push_str(&format!("\nimap_capability = {caps}\n"));
    std::fs::write(conf, text).unwrap();
    bed.dovecot.doveadm(&["reload"], None).unwrap();
    // The reload is asynchronous: wait until a new login sees the new list.
    std::thread::sleep(std::time::Duration::from_millis(500));
}

/// A capability list with neither MOVE nor UIDPLUS.
const WITHOUT_MOVE: &str =
    "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ NAMESPACE UNSELECT";

/// A move recorded while the server could move (here: pending after a crash), then the server
/// can no longer move and the administrator switched to `after = "seen"`: the move is kept and
/// reported, and intake goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_move_the_server_can_no_longer_do_is_reported_and_intake_goes_on() {
    use std::os::unix::process::ExitStatusExt as _;
    let bed = bed_with_apps().await;
    let mut mb = podatelna();
    mb.after = "move:Registered";
    bed.configure(&[mb]);
    let fixtures = fixtures();
    let first = bed
        .dovecot
        .deliver(PODATELNA, "INBOX", &fixtures[0].1)
        .unwrap();
    let out = bed
        .run_once_env(&[("MAILINTAKE_FAILPOINT", "after-commit")])
        .await;
    assert_eq!(out.status.signal(), Some(9), "{}", text(&out));
    advertise_only(&bed, WITHOUT_MOVE);
    bed.configure(&[podatelna()]); // after = "seen"
    let second = bed
        .dovecot
        .deliver(PODATELNA, "INBOX", &fixtures[1].1)
        .unwrap();
    for run in 1..=2 {
        let out = bed.run_once().await;
        assert_eq!(out.status.code(), Some(1), "run {run}: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!(
                "UID {first}: registered, but the acknowledgement was refused"
            )) && stderr.contains("neither MOVE nor UIDPLUS"),
            "run {run}: {}",
            text(&out)
        );
        assert_eq!(bed.registry().await.list(None, 10).await.unwrap().len(), 2);
        let seen = bed.seen(PODATELNA, "INBOX");
        assert_eq!(seen.get(&second), Some(&true), "{seen:?}");
        assert_eq!(seen.get(&first), Some(&false), "{seen:?}");
    }
}

/// Without MOVE, a move is a copy, `\Deleted` and `UID EXPUNGE` of exactly those UIDs (UIDPLUS).
/// With neither, `move:` fails the poll before anything is registered, with the reason and the
/// fix, and nothing is copied: a plain EXPUNGE would remove other clients' deleted mail too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_move_the_fallback_needs_uidplus_and_says_so() {
    let bed = bed_with_apps().await;
    let mut mb = podatelna();
    mb.after = "move:Registered";
    bed.configure(&[mb]);
    let fixtures = fixtures();
    let base = WITHOUT_MOVE;
    advertise_only(&bed, base);
    for (_, raw) in &fixtures {
        bed.dovecot.deliver(PODATELNA, "INBOX", raw).unwrap();
    }
    for run in 1..=2 {
        let out = bed.run_once().await;
        assert_eq!(out.status.code(), Some(1), "run {run}: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("neither MOVE nor UIDPLUS"),
            "{}",
            text(&out)
        );
        assert!(stderr.contains("after = \"seen\""), "{}", text(&out));
        assert!(
            bed.registry()
                .await
                .list(None, 100)
                .await
                .unwrap()
                .is_empty(),
            "nothing registered before the poll can acknowledge"
        );
        assert!(
            bed.dovecot
                .uids(PODATELNA, "Registered")
                .map(|u| u.is_empty())
                .unwrap_or(true),
            "nothing copied"
        );
    }

    // With UIDPLUS: copied, `\Deleted`, then exactly these UIDs expunged.
    advertise_only(&bed, &format!("{base} UIDPLUS"));
    let out = bed.run_once().await;
    assert!(out.status.success(), "{}", text(&out));
    let n = fixtures.len();
    assert_eq!(bed.registry().await.list(None, 100).await.unwrap().len(), n);
    assert_eq!(bed.dovecot.uids(PODATELNA, "Registered").unwrap().len(), n);
    assert!(bed.dovecot.uids(PODATELNA, "INBOX").unwrap().is_empty());
    let out = bed.run_once().await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(bed.dovecot.uids(PODATELNA, "Registered").unwrap().len(), n);
}

/// An acknowledgement the server refuses (a tagged NO: here a MOVE into a folder it cannot
/// create) is an error, kept pending, and does not stop intake: the next poll still registers
/// new mail. The old stream-draining STORE/MOVE path could not tell a NO from success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_acknowledgement_is_reported_kept_and_intake_goes_on() {
    let bed = bed_with_apps().await;
    let mut mb = podatelna();
    // A folder name longer than a file name may be: CREATE and MOVE are answered NO.
    let target: &'static str = format!("move:{}", "x".repeat(300)).leak();
    mb.after = target;
    bed.configure(&[mb]);
    let fixtures = fixtures();
    let first = bed
        .dovecot
        .deliver(PODATELNA, "INBOX", &fixtures[0].1)
        .unwrap();
    let out = bed.run_once().await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "UID {first}: registered, but the acknowledgement was refused"
        )),
        "{}",
        text(&out)
    );
    let registry = bed.registry().await;
    assert_eq!(registry.list(None, 10).await.unwrap().len(), 1);
    assert_eq!(
        registry
            .pending_acks("podatelna", "INBOX")
            .await
            .unwrap()
            .iter()
            .map(|a| a.uid)
            .collect::<Vec<_>>(),
        vec![first],
        "the refused acknowledgement stays pending"
    );
    assert_eq!(bed.dovecot.uids(PODATELNA, "INBOX").unwrap(), vec![first]);

    // New mail is still registered while the old acknowledgement keeps being refused.
    let second = bed
        .dovecot
        .deliver(PODATELNA, "INBOX", &fixtures[1].1)
        .unwrap();
    let out = bed.run_once().await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("podatelna: 1 new"),
        "{}",
        text(&out)
    );
    assert_eq!(registry.list(None, 10).await.unwrap().len(), 2);
    let mut pending: Vec<u32> = registry
        .pending_acks("podatelna", "INBOX")
        .await
        .unwrap()
        .iter()
        .map(|a| a.uid)
        .collect();
    pending.sort_unstable();
    assert_eq!(pending, vec![first, second]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_certificate_is_verified() {
    let bed = bed_with_apps().await;
    // No ca_file: the per-run CA is trusted by nobody, so the connection must be refused.
    let mut mb = podatelna();
    mb.trust_test_ca = false;
    bed.configure(&[mb]);
    bed.dovecot
        .deliver(PODATELNA, "INBOX", &fixtures()[0].1)
        .unwrap();
    let out = bed.run_once().await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("TLS with localhost failed"),
        "{}",
        text(&out)
    );
    assert!(
        stderr.contains("certificate verify failed"),
        "{}",
        text(&out)
    );
    assert!(
        bed.registry()
            .await
            .list(None, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_polls_on_its_schedule_reuses_the_token_and_stops_on_sigterm() {
    let bed = bed_with_apps().await;
    let mut mb = podatelna();
    mb.schedule = Some("* * * * * *"); // every second
    bed.configure(&[mb]);
    let fixtures = fixtures();
    bed.dovecot
        .deliver(PODATELNA, "INBOX", &fixtures[0].1)
        .unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_mailintake"))
        .arg("--config")
        .arg(&bed.config)
        .arg("run")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let registry = bed.registry().await;
    let mut child = Some(child);
    let mut wait_for = async |n: usize| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while registry.list(None, 100).await.unwrap().len() < n {
            if std::time::Instant::now() > deadline {
                let mut c = child.take().unwrap();
                let _ = c.kill();
                let out = c.wait_with_output().unwrap();
                panic!(
                    "not registered within 60 s; the worker said:\n{}",
                    text(&out)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    wait_for(1).await;
    // Mail arriving while the worker runs is picked up on a later tick.
    bed.dovecot
        .deliver(PODATELNA, "INBOX", &fixtures[1].1)
        .unwrap();
    wait_for(2).await;
    let child = child.take().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "SIGTERM must end the worker cleanly: {}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("shutting down"),
        "{}",
        text(&out)
    );
    // Several polls, one token: cached until shortly before expires_in.
    assert_eq!(bed.idp.token_requests(), 1, "{}", text(&out));
    assert!(bed.seen(PODATELNA, "INBOX").values().all(|s| *s));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_folder_with_a_new_uidvalidity_gives_exactly_one_new_registration() {
    let bed = bed_with_apps().await;
    let mut mb = podatelna();
    mb.folder = "Podani";
    bed.configure(&[mb]);
    let fixtures = fixtures();
    for (_, raw) in &fixtures[..3] {
        bed.dovecot.deliver(PODATELNA, "Podani", raw).unwrap();
    }
    let out = bed.run_once().await;
    assert!(out.status.success(), "{}", text(&out));
    let before = bed.dovecot.uidvalidity(PODATELNA, "Podani").unwrap();

    // The folder is deleted and recreated (a mailbox migration): same messages plus one new.
    bed.dovecot
        .doveadm(&["mailbox", "delete", "-u", PODATELNA, "Podani"], None)
        .unwrap();
    std::thread::sleep(Duration::from_millis(1100)); // a new UIDVALIDITY is time-based
    for (_, raw) in &fixtures[..4] {
        bed.dovecot.deliver(PODATELNA, "Podani", raw).unwrap();
    }
    let after = bed.dovecot.uidvalidity(PODATELNA, "Podani").unwrap();
    assert_ne!(before, after, "Dovecot kept the UIDVALIDITY");
    // A message of the old folder had failed a fetch: under the new UIDVALIDITY its UID means
    // nothing, and the run forgets it.
    bed.registry()
        .await
        .note_fetch_failure("podatelna", "Podani", before, &[2], "the server failed")
        .await
        .unwrap();
    let out = bed.run_once().await;
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("podatelna: 1 new"), "{}", text(&out));
    assert!(stdout.contains("3 linked"), "{}", text(&out));
    let registry = bed.registry().await;
    assert_eq!(registry.list(None, 100).await.unwrap().len(), 4);
    let kinds: Vec<String> = registry
        .events(None)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| *k == "uidvalidity-changed").count(),
        1
    );
    assert_eq!(kinds.iter().filter(|k| *k == "linked").count(), 3);
    // The recreated folder's messages all end \Seen.
    assert!(bed.seen(PODATELNA, "Podani").values().all(|s| *s));
    assert!(registry.failing(10).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparseable_and_oversized_mail_is_quarantined_raw_and_moved_aside() {
    let mut bed = bed_with_apps().await;
    bed.tables = "[limits]\nmax_message_bytes = 200000\n".into();
    let mut mb = podatelna();
    mb.after_quarantine = Some("move:Quarantine");
    bed.configure(&[mb]);
    let fixtures = fixtures();
    bed.dovecot
        .deliver(PODATELNA, "INBOX", &fixtures[0].1)
        .unwrap();
    let headerless = b"\n\nthis submission lost its header somewhere on the way\n".to_vec();
    bed.dovecot
        .deliver(PODATELNA, "INBOX", &headerless)
        .unwrap();
    let mut big = fixtures[1].1.clone();
    big.extend(std::iter::repeat_n(b'x', 300_000));
    big.push(b'\n');
    bed.dovecot.deliver(PODATELNA, "INBOX", &big).unwrap();
    let served = bed.served(PODATELNA, "client-podatelna").await;

    let out = bed.run_once().await;
    assert!(
        out.status.success(),
        "quarantine is a handled outcome: {}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("2 quarantined"),
        "{}",
        text(&out)
    );
    let registry = bed.registry().await;
    let q = registry
        .list(Some(mailintake::registry::Status::Quarantined), 10)
        .await
        .unwrap();
    let reasons: std::collections::BTreeSet<_> =
        q.iter().map(|r| r.reason_code.clone().unwrap()).collect();
    assert_eq!(
        reasons,
        ["parse:no-headers".to_owned(), "too-large".to_owned()].into()
    );
    // The raw bytes are kept exactly as served.
    let store = bed.store();
    for r in &q {
        let raw = store
            .get(&Sha256Digest::from_hex(&r.raw_sha256).unwrap())
            .unwrap();
        assert!(served.values().any(|s| *s == raw));
    }
    // Registered one stays in INBOX (seen); the quarantined ones were moved aside.
    assert_eq!(bed.dovecot.uids(PODATELNA, "INBOX").unwrap().len(), 1);
    assert_eq!(bed.dovecot.uids(PODATELNA, "Quarantine").unwrap().len(), 2);
    let list = bed
        .command(&["registry", "list", "--status", "quarantined"], &[])
        .await;
    let table = String::from_utf8_lossy(&list.stdout);
    assert!(
        table.contains("too-large") && table.contains("parse:no-headers"),
        "{table}"
    );
    assert!(table.contains("2 quarantined message(s)"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_keeps_killing_the_worker_is_quarantined_as_poison() {
    let bed = bed_with_apps().await;
    bed.configure(&[podatelna()]);
    let fixtures = fixtures();
    bed.dovecot
        .deliver(PODATELNA, "INBOX", &fixtures[2].1)
        .unwrap();
    // Three runs die on this message (default limits.max_attempts = 3).
    for _ in 0..3 {
        let out = bed
            .run_once_env(&[("MAILINTAKE_FAILPOINT", "after-raw-write")])
            .await;
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&out.status),
            Some(9)
        );
    }
    let out = bed.run_once().await;
    assert!(out.status.success(), "{}", text(&out));
    let q = bed
        .registry()
        .await
        .list(Some(mailintake::registry::Status::Quarantined), 10)
        .await
        .unwrap();
    assert_eq!(q.len(), 1, "{}", text(&out));
    assert_eq!(q[0].reason_code.as_deref(), Some("poison"));
    assert!(
        q[0].reason_detail
            .as_deref()
            .unwrap()
            .contains("failed 3 times"),
        "{q:?}"
    );
    assert!(bed.seen(PODATELNA, "INBOX").values().all(|s| *s));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_lists_orphaned_blobs_and_deletes_only_when_asked() {
    let bed = bed_with_apps().await;
    bed.configure(&[podatelna()]);
    bed.dovecot
        .deliver(PODATELNA, "INBOX", &fixtures()[1].1)
        .unwrap();
    let out = bed.run_once().await;
    assert!(out.status.success(), "{}", text(&out));
    // A blob nothing refers to, as a crash between the durable write and the commit leaves.
    let orphan = bed.store().put(b"orphaned bytes").unwrap();
    let dry = bed
        .command(&["registry", "gc", "--dry-run", "--min-age-secs", "0"], &[])
        .await;
    let stdout = String::from_utf8_lossy(&dry.stdout);
    assert!(dry.status.success(), "{}", text(&dry));
    assert!(stdout.contains(&orphan.to_hex()), "{stdout}");
    assert!(stdout.contains("1 orphaned blob(s)"), "{stdout}");
    assert!(
        bed.store().get(&orphan).is_ok(),
        "a dry run deletes nothing"
    );
    // gc killed after moving the orphan aside, before reading its age (it might have been a
    // blob a worker was reusing): the next command that opens the store puts it back.
    let blob_path = bed
        .data_dir()
        .join("blobs/sha256")
        .join(&orphan.to_hex()[..2])
        .join(orphan.to_hex());
    let killed = bed
        .command(
            &["registry", "gc", "--delete", "--min-age-secs", "0"],
            &[("MAILINTAKE_FAILPOINT", "gc-aside")],
        )
        .await;
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&killed.status),
        Some(9),
        "{}",
        text(&killed)
    );
    assert!(!blob_path.exists(), "gc had moved it aside");
    let dry = bed
        .command(&["registry", "gc", "--dry-run", "--min-age-secs", "0"], &[])
        .await;
    assert!(String::from_utf8_lossy(&dry.stdout).contains("1 orphaned blob(s)"));
    assert!(blob_path.exists(), "put back");
    // Young orphans are left alone by default (a commit may be in progress).
    let young = bed.command(&["registry", "gc", "--delete"], &[]).await;
    assert!(String::from_utf8_lossy(&young.stdout).contains("0 orphaned blob(s)"));
    assert!(bed.store().get(&orphan).is_ok());
    let delete = bed
        .command(&["registry", "gc", "--delete", "--min-age-secs", "0"], &[])
        .await;
    assert!(delete.status.success(), "{}", text(&delete));
    assert!(bed.store().get(&orphan).is_err());
    // Referenced blobs (the raw message and its PDF) are untouched.
    let out = bed
        .command(&["registry", "gc", "--dry-run", "--min-age-secs", "0"], &[])
        .await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 orphaned blob(s)"));
    assert_no_lost_blobs(&bed).await;
}

/// A bed whose mailbox held every fixture, after one successful run.
async fn every_fixture_registered() -> Bed {
    let bed = bed_with_apps().await;
    bed.configure(&[podatelna()]);
    for (_, raw) in fixtures() {
        bed.dovecot.deliver(PODATELNA, "INBOX", &raw).unwrap();
    }
    let out = bed.run_once().await;
    assert!(out.status.success(), "{}", text(&out));
    bed
}

/// `registry verify` reads every blob the records refer to: all intact after a run; then a
/// raw message deleted, an attachment truncated and another raw message altered (a failing
/// disk, a careless hand) are each reported with their record, and it exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_every_missing_truncated_or_altered_blob_with_its_record() {
    let bed = every_fixture_registered().await;
    let intact = bed.command(&["registry", "verify"], &[]).await;
    let stdout = String::from_utf8_lossy(&intact.stdout).into_owned();
    assert!(intact.status.success(), "{}", text(&intact));
    assert!(stdout.contains(": 0 problem(s)"), "{stdout}");

    let registry = bed.registry().await;
    let refs = registry.blob_references().await.unwrap();
    let shared = |sha: &str| refs.iter().filter(|r| r.sha256 == sha).count() > 1;
    let mut raws = refs
        .iter()
        .filter(|r| r.attachment.is_none() && !shared(&r.sha256));
    let (deleted, altered) = (raws.next().unwrap(), raws.next().unwrap());
    let truncated = refs
        .iter()
        .find(|r| r.attachment.is_some() && !shared(&r.sha256) && r.size > 10)
        .expect("a fixture with an attachment");
    let path = |r: &mailintake::registry::BlobReference| {
        bed.store()
            .path_of(&Sha256Digest::from_hex(&r.sha256).unwrap())
    };
    std::fs::remove_file(path(deleted)).unwrap();
    let bytes = std::fs::read(path(truncated)).unwrap();
    std::fs::write(path(truncated), &bytes[..bytes.len() - 10]).unwrap();
    let mut bytes = std::fs::read(path(altered)).unwrap();
    bytes[0] ^= 0x20;
    std::fs::write(path(altered), &bytes).unwrap();
    // A damaged row: an attachment's digest that is not one.
    let garbled = refs
        .iter()
        .find(|r| r.attachment.is_some() && !shared(&r.sha256) && r.sha256 != truncated.sha256)
        .expect("a second fixture attachment");
    use sqlx::Connection as _;
    let mut db = sqlx::AnyConnection::connect(&bed.database_url())
        .await
        .unwrap();
    sqlx::query("UPDATE attachments SET sha256 = 'not-a-digest' WHERE sha256 = $1")
        .bind(&garbled.sha256)
        .execute(&mut db)
        .await
        .unwrap();

    let damaged = bed.command(&["registry", "verify"], &[]).await;
    let stdout = String::from_utf8_lossy(&damaged.stdout).into_owned();
    assert_eq!(damaged.status.code(), Some(1), "{}", text(&damaged));
    assert!(stdout.contains(": 4 problem(s)"), "{stdout}");
    let garbled_line = stdout
        .lines()
        .find(|l| l.contains("sha256:not-a-digest"))
        .unwrap_or_else(|| panic!("the damaged digest is not reported: {stdout}"));
    assert!(
        garbled_line.ends_with("the registry's digest is not a SHA-256 digest (64 hex digits)"),
        "{garbled_line}"
    );
    let line = |r: &mailintake::registry::BlobReference| {
        stdout
            .lines()
            .find(|l| l.contains(&r.sha256))
            .unwrap_or_else(|| panic!("{} not reported: {stdout}", r.sha256))
            .to_owned()
    };
    for (r, says) in [
        (deleted, "raw message".to_owned()),
        (altered, "raw message".to_owned()),
        (
            truncated,
            format!("attachment {}", truncated.attachment.unwrap()),
        ),
    ] {
        let l = line(r);
        assert!(l.starts_with(r.registry_number.as_deref().unwrap()), "{l}");
        assert!(l.contains(&says), "{l}");
    }
    assert!(line(deleted).ends_with("missing"));
    assert!(line(truncated).contains(&format!(
        "{} bytes, the record says {}",
        truncated.size - 10,
        truncated.size
    )));
    assert!(line(altered).contains("altered: its bytes now have sha256:"));
}

/// `registry export` writes a record's raw message and its attachments, byte for byte what
/// was registered, under the sender's file names kept inside the directory; it never
/// overwrites, and an unknown record is an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_writes_a_records_message_and_attachments_and_never_overwrites() {
    let bed = every_fixture_registered().await;
    let registry = bed.registry().await;
    let refs = registry.blob_references().await.unwrap();
    let with_attachments: std::collections::BTreeSet<i64> = refs
        .iter()
        .filter(|r| r.attachment.is_some())
        .map(|r| r.message_id)
        .collect();
    assert!(with_attachments.len() >= 2, "{refs:?}");
    let to = bed.data_dir().join("export");
    let sha = |path: &std::path::Path| Sha256Digest::of(&std::fs::read(path).unwrap()).to_hex();
    for id in with_attachments {
        let files = registry
            .record_files(&id.to_string())
            .await
            .unwrap()
            .unwrap();
        let number = files.registry_number.clone().unwrap();
        let out = bed
            .command(
                &["registry", "export", &number, "--to", &to.to_string_lossy()],
                &[],
            )
            .await;
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(sha(&to.join(format!("{number}.eml"))), files.raw_sha256);
        let written: Vec<std::path::PathBuf> = std::fs::read_dir(to.join(&number))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(written.len(), files.attachments.len(), "{written:?}");
        for a in &files.attachments {
            let prefix = format!("{:02}-", a.ordinal);
            let path = written
                .iter()
                .find(|p| {
                    p.file_name()
                        .unwrap()
                        .to_string_lossy()
                        .starts_with(&prefix)
                })
                .unwrap_or_else(|| panic!("attachment {} not written: {written:?}", a.ordinal));
            assert_eq!(sha(path), a.sha256, "{}", path.display());
            if let Some(name) = &a.filename {
                let name = name.rsplit(['/', '\\']).next().unwrap();
                assert!(
                    path.ends_with(format!("{prefix}{name}")),
                    "{}",
                    path.display()
                );
            }
        }
        // Again: nothing is overwritten.
        let again = bed
            .command(
                &["registry", "export", &number, "--to", &to.to_string_lossy()],
                &[],
            )
            .await;
        assert_eq!(again.status.code(), Some(1), "{}", text(&again));
        assert!(text(&again).contains("not overwritten"), "{}", text(&again));
        assert_eq!(sha(&to.join(format!("{number}.eml"))), files.raw_sha256);
    }
    let unknown = bed
        .command(
            &[
                "registry",
                "export",
                "REG-1999-999999",
                "--to",
                &to.to_string_lossy(),
            ],
            &[],
        )
        .await;
    assert_eq!(unknown.status.code(), Some(1), "{}", text(&unknown));
    assert!(text(&unknown).contains("no record"), "{}", text(&unknown));

    // A raw message altered on disk is refused, and no file of it is left in the directory.
    let first = refs
        .iter()
        .find(|r| r.attachment.is_none() && r.registry_number.is_some())
        .expect("a registered raw message");
    let number = first.registry_number.clone().unwrap();
    let blob = bed
        .store()
        .path_of(&Sha256Digest::from_hex(&first.sha256).unwrap());
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[0] ^= 0x20;
    std::fs::write(&blob, &bytes).unwrap();
    let elsewhere = bed.data_dir().join("export-altered");
    let refused = bed
        .command(
            &[
                "registry",
                "export",
                &number,
                "--to",
                &elsewhere.to_string_lossy(),
            ],
            &[],
        )
        .await;
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        text(&refused).contains("now have SHA-256"),
        "{}",
        text(&refused)
    );
    assert!(
        !elsewhere.join(format!("{number}.eml")).exists(),
        "an altered message was left exported"
    );
}

async fn assert_no_lost_blobs(bed: &Bed) {
    let registry = bed.registry().await;
    for r in registry.list(None, 100).await.unwrap() {
        assert!(
            bed.store()
                .get(&Sha256Digest::from_hex(&r.raw_sha256).unwrap())
                .is_ok()
        );
        for a in registry.attachments(r.id).await.unwrap() {
            assert!(
                bed.store()
                    .get(&Sha256Digest::from_hex(&a.sha256).unwrap())
                    .is_ok()
            );
        }
    }
}

/// Submission `i` with `payload` as its PDF attachment, base64 in 76-char lines.
fn with_attachment(i: usize, payload: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(payload);
    let mut body = String::with_capacity(encoded.len() * 78 / 76 + 1024);
    for line in encoded.as_bytes().chunks(76) {
        body.push_str(std::str::from_utf8(line).unwrap());
        body.push_str("\r\n");
    }
    format!(
        "From: Obcan {i} <obcan{i}@example.org>\r\nTo: {PODATELNA}\r\nSubject: Podani {i}\r\n\
         Message-ID: <large-{i}@example.org>\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"hranice\"\r\n\r\n\
         --hranice\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nV priloze zasilam sken.\r\n\
         --hranice\r\nContent-Type: application/pdf; name=\"sken-{i}.pdf\"\r\n\
         Content-Disposition: attachment; filename=\"sken-{i}.pdf\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{body}--hranice--\r\n"
    )
    .into_bytes()
}

/// Deterministic bytes that do not compress (xorshift).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_mail_is_stored_byte_exact_in_both_commit_modes() {
    // Messages above 1 MiB have their raw blob written beside the parse: the raw bytes and the
    // decoded attachment must still be exactly what was sent, in either commit mode. With a
    // fetch budget smaller than the messages, each batch waits until it is alone: the run must
    // still get through (every batch gives its share back) with the same result.
    for (batch, tight) in [(false, false), (true, false), (false, true), (true, true)] {
        let mut bed = bed_with_apps().await;
        if batch {
            bed.tables = "[registry]\ncommit = \"batch\"\n".into();
        }
        if tight {
            bed.imap_extra = "batch_max_bytes = 1000000\nin_flight_max_bytes = 700000".into();
        }
        let batch = format!("batch={batch} tight_budget={tight}");
        bed.configure(&[podatelna()]);
        let payloads: Vec<Vec<u8>> = [3_000_000, 1_200_000, 800_000]
            .iter()
            .enumerate()
            .map(|(i, len)| noise(*len, i as u64 + 7))
            .collect();
        for (i, payload) in payloads.iter().enumerate() {
            bed.dovecot
                .deliver(PODATELNA, "INBOX", &with_attachment(i, payload))
                .unwrap();
        }
        bed.dovecot
            .deliver(PODATELNA, "INBOX", &fixtures()[1].1)
            .unwrap();
        // A run that hangs (a batch's share never given back) is killed and fails the test.
        let mut child = bed.spawn_run_once();
        let deadline = std::time::Instant::now() + Duration::from_secs(180);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{batch}: the run did not finish in 180 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{batch}: {}", text(&out));
        let registered =
            assert_registry_matches_server(&bed, "podatelna", PODATELNA, "client-podatelna").await;
        assert_eq!(registered.len(), 4, "{batch}: {}", text(&out));
        let registry = bed.registry().await;
        let mut attachments = Vec::new();
        for row in registry.list(None, 10).await.unwrap() {
            attachments.extend(registry.attachments(row.id).await.unwrap());
        }
        for payload in &payloads {
            let digest = Sha256Digest::of(payload);
            assert!(
                attachments.iter().any(|a| a.sha256 == digest.to_hex()),
                "{batch}: the attachment of {} bytes is not recorded",
                payload.len()
            );
            assert_eq!(&bed.store().get(&digest).unwrap(), payload);
        }
        assert!(bed.seen(PODATELNA, "INBOX").values().all(|s| *s));
        let leftovers: Vec<_> = std::fs::read_dir(bed.data_dir().join("tmp"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(leftovers.is_empty(), "{batch}: {leftovers:?}");
    }
}

/// How a message file is damaged behind Dovecot's back.
#[derive(Clone, Copy, Debug)]
enum Damage {
    /// Cut short: Dovecot drops the connection when it finds fewer bytes than its index
    /// promised (an error for async-imap).
    CutShort,
    /// Unreadable (mode 000): Dovecot has announced the literal, cannot open the file and drops
    /// the connection; async-imap ends the FETCH quietly, without the messages after it.
    Unreadable,
}

/// A small message the server cannot serve, the second of six in batches of three. Its batch's
/// fetch fails the first poll (exit 1) and nothing is registered; from then on the messages
/// that fetch did not bring are fetched one by one after the other mail, fewest failures first.
/// Every other message is registered once and ends `\Seen` by the fourth poll; the damaged
/// one stays unseen with nothing recorded, reported at every poll, and holds up nothing else.
async fn a_message_the_server_cannot_serve_holds_up_no_other(damage: Damage) {
    use std::os::unix::fs::PermissionsExt as _;
    let mut bed = bed_with_apps().await;
    bed.imap_extra = "batch_max_messages = 3".into();
    bed.configure(&[podatelna()]);
    let mut broken_uid = 0;
    for (i, (_, raw)) in fixtures().into_iter().enumerate().take(6) {
        let mut raw = raw;
        if i == 1 {
            raw.extend_from_slice(format!("{:0>20000}\n", "damaged").as_bytes());
        }
        let uid = bed.dovecot.deliver(PODATELNA, "INBOX", &raw).unwrap();
        if i == 1 {
            broken_uid = uid;
        }
    }
    let file = maildir_file(&bed, |p| {
        std::fs::read(p)
            .unwrap()
            .windows(8)
            .any(|w| w == b"damaged\n")
    });
    match damage {
        Damage::CutShort => {
            let len = std::fs::metadata(&file).unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&file)
                .unwrap()
                .set_len(len - 10_000)
                .unwrap();
        }
        Damage::Unreadable => {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o000)).unwrap()
        }
    }

    // Registered after each poll: the batch with the damaged message fails the first (the
    // message before it is registered where async-imap hands it over); the second takes the
    // other messages in batches, then those the failed fetch did not bring, alone, until the
    // damaged one fails again; the third takes the rest (the damaged one, failed twice, comes
    // last); the fourth acknowledges what the third could not (its session was gone).
    let first = match damage {
        Damage::CutShort => 0,
        Damage::Unreadable => 1,
    };
    for (poll, registered) in [(1, first), (2, 4), (3, 5), (4, 5)] {
        let out = bed.run_once().await;
        let context = format!("{damage:?}, poll {poll}: {}", text(&out));
        assert_eq!(out.status.code(), Some(1), "{context}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("the server failed during a fetch"),
            "{context}"
        );
        let rows = bed.registry().await.list(None, 20).await.unwrap();
        assert_eq!(rows.len(), registered, "{context}");
        let seen = bed.seen(PODATELNA, "INBOX");
        assert_eq!(seen.get(&broken_uid), Some(&false), "{context}");
        if poll == 4 {
            assert!(
                seen.iter().all(|(uid, s)| *s == (*uid != broken_uid)),
                "{context}\n{seen:?}"
            );
        }
    }
    let mut shas: Vec<_> = bed
        .registry()
        .await
        .list(None, 20)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.raw_sha256)
        .collect();
    shas.sort();
    shas.dedup();
    assert_eq!(shas.len(), 5, "five different messages, each once");
    // What an operator sees: the damaged message alone, with its failed fetches.
    let out = bed.command(&["registry", "failing"], &[]).await;
    assert!(out.status.success(), "{}", text(&out));
    let listing = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = listing
        .lines()
        .filter(|l| l.contains("podatelna"))
        .collect();
    assert_eq!(lines.len(), 1, "{listing}");
    assert!(
        lines[0].contains(&format!("{broken_uid} (uidvalidity")),
        "{listing}"
    );
    assert!(listing.contains("1 failing message(s)"), "{listing}");
    let failing = bed.registry().await.failing(10).await.unwrap();
    assert_eq!(failing.len(), 1);
    assert_eq!(failing[0].uid, broken_uid);
    assert!(failing[0].fetch_failures >= 3, "{failing:?}");

    // Someone deletes the damaged message: the next poll succeeds and forgets its failures,
    // which `registry failing` would otherwise list for ever.
    bed.dovecot
        .doveadm(
            &[
                "expunge",
                "-u",
                PODATELNA,
                "mailbox",
                "INBOX",
                "uid",
                &broken_uid.to_string(),
            ],
            None,
        )
        .unwrap();
    assert!(
        !bed.dovecot
            .uids(PODATELNA, "INBOX")
            .unwrap()
            .contains(&broken_uid)
    );
    let out = bed.run_once().await;
    assert!(
        out.status.success(),
        "{damage:?}, after the expunge: {}",
        text(&out)
    );
    let registry = bed.registry().await;
    assert!(registry.failing(10).await.unwrap().is_empty());
    assert_eq!(registry.list(None, 20).await.unwrap().len(), 5);
    let out = bed.command(&["registry", "failing"], &[]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("0 failing message(s)"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_cut_short_holds_up_no_other() {
    a_message_the_server_cannot_serve_holds_up_no_other(Damage::CutShort).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_message_holds_up_no_other() {
    a_message_the_server_cannot_serve_holds_up_no_other(Damage::Unreadable).await;
}
