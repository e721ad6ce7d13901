//! `mailintake registry list | failing | export | verify | gc`: what has been registered or
//! quarantined, what keeps failing, a record's files, whether every stored blob is intact, and
//! orphaned blobs.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;

use crate::config::Config;
use crate::raw_store::{BlobCheck, RawStore, Removal, Sha256Digest};
use crate::registry::{Registry, Status};

pub async fn list(config: &Config, status: Option<Status>, limit: i64) -> anyhow::Result<()> {
    let registry = Registry::open(&config.database_url).await?;
    let rows = registry.list(status, limit).await?;
    registry.close().await;
    if status == Some(Status::Quarantined) {
        let headers = [
            "id",
            "quarantined at",
            "mailbox",
            "reason",
            "detail",
            "raw sha256",
            "bytes",
        ];
        let table: Vec<[String; 7]> = rows
            .iter()
            .map(|r| {
                [
                    r.id.to_string(),
                    short_time(&r.registered_at),
                    r.mailbox_id.clone(),
                    r.reason_code.clone().unwrap_or_default(),
                    r.reason_detail.clone().unwrap_or_default(),
                    r.raw_sha256.get(..16).unwrap_or(&r.raw_sha256).to_owned(),
                    r.raw_size.to_string(),
                ]
            })
            .collect();
        print!("{}", render_table(&headers, &table));
        println!("{} quarantined message(s)", rows.len());
        return Ok(());
    }
    let headers = [
        "number",
        "registered at",
        "mailbox",
        "from",
        "subject",
        "attachments",
    ];
    let table: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.registry_number.clone().unwrap_or_else(|| {
                    format!(
                        "(quarantined: {})",
                        r.reason_code.clone().unwrap_or_default()
                    )
                }),
                short_time(&r.registered_at),
                r.mailbox_id.clone(),
                r.from.clone().unwrap_or_default(),
                r.subject.clone().unwrap_or_default(),
                r.attachment_count.to_string(),
            ]
        })
        .collect();
    print!("{}", render_table(&headers, &table));
    println!("{} message(s)", rows.len());
    Ok(())
}

/// Messages still on a server that failed and are not registered: attempts, failed fetches
/// and the last error.
pub async fn failing(config: &Config, limit: i64) -> anyhow::Result<()> {
    let registry = Registry::open(&config.database_url).await?;
    let rows = registry.failing(limit).await?;
    registry.close().await;
    let headers = [
        "mailbox",
        "folder",
        "uid",
        "attempts",
        "failed fetches",
        "last error",
        "updated",
    ];
    let table: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.mailbox_id.clone(),
                r.folder.clone(),
                format!("{} (uidvalidity {})", r.uid, r.uidvalidity),
                r.attempts.to_string(),
                r.fetch_failures.to_string(),
                r.last_error.clone().unwrap_or_else(|| {
                    "(none recorded: a worker stopped with it in hand, or it is being processed)"
                        .to_owned()
                }),
                short_time(&r.updated_at),
            ]
        })
        .collect();
    print!("{}", render_table(&headers, &table));
    println!("{} failing message(s)", rows.len());
    Ok(())
}

fn short_time(rfc3339: &str) -> String {
    rfc3339.get(..19).unwrap_or(rfc3339).replace('T', " ")
}

/// Lists (and with `delete`, removes) blobs no record refers to: left by a crash between the
/// durable write and the commit. Harmless, but they take space. Blobs younger than `min_age`
/// are never touched: a worker may be about to commit them.
pub async fn gc(config: &Config, delete: bool, min_age: Duration) -> anyhow::Result<()> {
    let store = super::open_store(config)?;
    let registry = Registry::open(&config.database_url).await?;
    // Blobs first, references second: a blob listed here whose record commits meanwhile is in
    // the references read after it. A worker that reuses a stored blob makes it young first
    // (`RawStore` sets its time), and its age is read again once it is moved aside, just before
    // it is deleted (`RawStore::remove_if_old`).
    // One gc deletes at a time; a worker starting meanwhile holds the lock for a moment only.
    let lock = if delete {
        let mut tries = 0;
        loop {
            match store.lock_for_gc() {
                Ok(lock) => break Some(lock),
                Err(e) if tries < 50 && e.source.kind() == std::io::ErrorKind::WouldBlock => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    } else {
        None
    };
    let blobs = store.list()?;
    let referenced = registry.referenced_blobs().await?;
    registry.close().await;
    let (mut count, mut bytes, mut young) = (0usize, 0u64, 0usize);
    for blob in blobs {
        if referenced.contains(&blob.digest.to_hex()) {
            continue;
        }
        let age_now = std::fs::metadata(&blob.path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| m.elapsed().ok());
        let Some(age_now) = age_now else {
            continue; // gone meanwhile
        };
        if blob.age < min_age || age_now < min_age {
            young += 1;
            continue;
        }
        let Some(lock) = &lock else {
            count += 1;
            bytes += blob.size;
            println!("orphan   {}  {} bytes", blob.path.display(), blob.size);
            continue;
        };
        // Removed only if still old once moved aside: a worker may reuse it at any moment.
        match store.remove_if_old(lock, &blob.digest, min_age)? {
            Removal::Removed(size) => {
                count += 1;
                bytes += size;
                println!("deleted  {}  {size} bytes", blob.path.display());
            }
            Removal::Young => young += 1,
            Removal::Gone => {}
        }
    }
    println!(
        "{count} orphaned blob(s), {bytes} bytes{}{}",
        if delete {
            " deleted"
        } else {
            " (dry run: nothing deleted)"
        },
        if young > 0 {
            format!("; {young} younger than {}s left alone", min_age.as_secs())
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Writes a record's raw message (`<number>.eml`) and its attachments (`<number>/<ordinal>-<name>`)
/// into `to`, each checked against its digest as it is copied (a file that does not match is
/// removed) and flushed. Never overwrites a file; memory stays at one buffer per file.
pub async fn export(config: &Config, record: &str, to: &Path) -> anyhow::Result<bool> {
    let store = super::open_store(config)?;
    let registry = Registry::open(&config.database_url).await?;
    let files = registry.record_files(record).await?;
    registry.close().await;
    let Some(files) = files else {
        eprintln!(
            "no record {record:?} (give a registry number or a record id, see `registry list`)"
        );
        return Ok(false);
    };
    let label = files
        .registry_number
        .clone()
        .unwrap_or_else(|| format!("record-{}", files.id));
    let write = |path: &Path, sha256: &str| -> anyhow::Result<()> {
        let digest = Sha256Digest::from_hex(sha256)
            .with_context(|| format!("the record holds an invalid digest {sha256:?}"))?;
        let mut file = std::fs::File::create_new(path)
            .with_context(|| format!("cannot create {} (it is not overwritten)", path.display()))?;
        // Copied a MiB at a time and checked against its digest on the way; a copy that fails
        // or does not match is removed, so a file that stays is the registered bytes.
        let copied = store
            .copy_verified(&digest, &mut file)
            .with_context(|| format!("cannot export {}", path.display()))
            .and_then(|len| {
                file.sync_all()
                    .with_context(|| format!("cannot write {}", path.display()))?;
                Ok(len)
            });
        let len = match copied {
            Ok(len) => len,
            Err(e) => {
                drop(file);
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
        };
        println!("{}  {len} bytes", path.display());
        Ok(())
    };
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    write(&to.join(format!("{label}.eml")), &files.raw_sha256)?;
    if !files.attachments.is_empty() {
        let dir = to.join(&label);
        std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for a in &files.attachments {
            let name = a
                .filename
                .as_deref()
                .and_then(safe_file_name)
                .unwrap_or_else(|| match a.content_type.as_str() {
                    "message/rfc822" => "attachment.eml".to_owned(),
                    _ => "attachment".to_owned(),
                });
            write(&dir.join(format!("{:02}-{name}", a.ordinal)), &a.sha256)?;
        }
    }
    Ok(true)
}

/// The last component of a sender's file name, without control characters, characters
/// Windows refuses, or leading dots, at most 120 characters; `None` if nothing is left.
fn safe_file_name(name: &str) -> Option<String> {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    let cleaned: String = base
        .chars()
        .map(|c| match c {
            c if c.is_control() => '_',
            ':' | '*' | '?' | '"' | '<' | '>' | '|' => '_',
            c => c,
        })
        .collect();
    let cleaned = cleaned.trim().trim_start_matches('.').trim();
    (!cleaned.is_empty()).then(|| cleaned.chars().take(120).collect())
}

/// Reads every blob a record refers to (raw messages and attachments) and checks that it is
/// there, with its recorded size and its digest, a page of records at a time (a blob several
/// records of one page share is read once). Prints one line per problem, naming the record;
/// `Ok(false)` if there was any.
pub async fn verify(config: &Config) -> anyhow::Result<bool> {
    /// Records per page: their references are held in memory while their blobs are read.
    const PAGE: i64 = 2_000;
    let store = std::sync::Arc::new(super::open_store(config)?);
    let registry = Registry::open(&config.database_url).await?;
    let started = std::time::Instant::now();
    let (mut records, mut blobs, mut bytes, mut problems) = (0usize, 0usize, 0u64, 0usize);
    let mut after = 0;
    loop {
        let page = registry.blob_references_after(after, PAGE).await?;
        let Some(last) = page.last().map(|r| r.message_id) else {
            break;
        };
        after = last;
        let store = std::sync::Arc::clone(&store);
        let checked = tokio::task::spawn_blocking(move || check_page(&store, page))
            .await
            .context("the verification stopped")??;
        records += checked.records;
        blobs += checked.blobs;
        bytes += checked.bytes;
        problems += checked.problems;
    }
    registry.close().await;
    println!(
        "{blobs} blob(s) of {records} record(s) checked, {bytes} bytes read in {:.1} s: {problems} problem(s)",
        started.elapsed().as_secs_f64()
    );
    Ok(problems == 0)
}

/// What one page of `verify` found.
struct Checked {
    records: usize,
    blobs: usize,
    bytes: u64,
    problems: usize,
}

fn check_page(
    store: &RawStore,
    page: Vec<crate::registry::BlobReference>,
) -> anyhow::Result<Checked> {
    let records: std::collections::HashSet<i64> = page.iter().map(|r| r.message_id).collect();
    // None: the digest in the database is not one (a damaged row), so no blob can be looked up.
    let mut checked: std::collections::HashMap<&str, Option<BlobCheck>> = Default::default();
    let (mut bytes, mut problems) = (0u64, 0usize);
    for r in &page {
        let found = match checked.get(r.sha256.as_str()) {
            Some(found) => *found,
            None => {
                let found = match Sha256Digest::from_hex(&r.sha256) {
                    Some(digest) => Some(store.check(&digest, r.size)?),
                    None => None,
                };
                if found == Some(BlobCheck::Intact) {
                    bytes += r.size;
                }
                checked.insert(&r.sha256, found);
                found
            }
        };
        let problem = match found {
            Some(BlobCheck::Intact) => continue,
            None => "the registry's digest is not a SHA-256 digest (64 hex digits)".to_owned(),
            Some(BlobCheck::Missing) => "missing".to_owned(),
            Some(BlobCheck::WrongSize(len)) => {
                format!("{len} bytes, the record says {}", r.size)
            }
            Some(BlobCheck::Altered(digest)) => {
                format!("altered: its bytes now have sha256:{}", digest.to_hex())
            }
        };
        problems += 1;
        let record = match &r.registry_number {
            Some(number) => number.clone(),
            None => format!("record {} (quarantined)", r.message_id),
        };
        let what = match r.attachment {
            Some(ordinal) => format!("attachment {ordinal}"),
            None => "raw message".to_owned(),
        };
        println!("{record}  {what}  sha256:{}  {problem}", r.sha256);
    }
    Ok(Checked {
        records: records.len(),
        blobs: checked.len(),
        bytes,
        problems,
    })
}

const MAX_CELL: usize = 60;

fn clip(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.chars().count() > MAX_CELL {
        let mut t: String = s.chars().take(MAX_CELL - 1).collect();
        t.push('…');
        t
    } else {
        s
    }
}

/// A plain-text table with columns padded to their widest cell (counted in characters).
pub fn render_table<const N: usize>(headers: &[&str; N], rows: &[[String; N]]) -> String {
    let rows: Vec<[String; N]> = rows.iter().map(|r| r.clone().map(|c| clip(&c))).collect();
    let mut widths = headers.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(cell);
            if i + 1 < N {
                s.push_str(&" ".repeat(w.saturating_sub(cell.chars().count())));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.to_vec());
    out.push_str(&line(
        widths
            .map(|w| "-".repeat(w))
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    ));
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{render_table, safe_file_name};

    #[test]
    fn columns_align_with_diacritics() {
        let t = render_table(
            &["a", "subject"],
            &[["1".into(), "Žádost".into()], ["22".into(), "x".into()]],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "a   subject");
        assert_eq!(lines[2], "1   Žádost");
        assert_eq!(lines[3], "22  x");
    }

    #[test]
    fn a_senders_file_name_cannot_leave_the_export_directory() {
        let cases = [
            ("podani.pdf", Some("podani.pdf")),
            ("../../etc/passwd", Some("passwd")),
            ("..\\..\\boot.ini", Some("boot.ini")),
            (
                "C:\\Users\\x\\Žádost o dotaci.docx",
                Some("Žádost o dotaci.docx"),
            ),
            ("a\u{0}b\nc.txt", Some("a_b_c.txt")),
            (".bashrc", Some("bashrc")),
            ("..", None),
            ("dir/", None),
            ("  ", None),
        ];
        for (name, safe) in cases {
            assert_eq!(safe_file_name(name).as_deref(), safe, "{name:?}");
        }
        assert_eq!(safe_file_name(&"x".repeat(300)).unwrap().len(), 120);
    }
}
