//! Parse micro-benchmark: MB/s of our `Submission` extraction against mail-parser's bare parse,
//! over the shared real-world corpus and over the generated e-filing and helpdesk corpora.
//!
//! ```sh
//! cargo bench --bench parse
//! ```
//!
//! Three measurements per corpus, each over every message of it:
//! - `mail-parser`: `MessageParser::default().parse(raw)` and nothing else (the floor);
//! - `submission`: `parse::parse` — the bare parse plus headers, bodies and every attachment
//!   (nested message/rfc822 included) hashed with SHA-256;
//! - `submission+raw-sha256`: the same plus the raw message's SHA-256, i.e. all the CPU work of a
//!   preparation except the writes.
//!
//! Inputs on which mail-parser 0.11 panics (4 in the shared corpus) are left out of all three, so
//! that the three see the same bytes.
//!
//! The shared corpus is read from `../shared/corpus` (or `$MAILINTAKE_SHARED/corpus`); where it
//! is absent that group is skipped with a message. The generated corpora come from
//! `bench/gen_corpus.py` (seed 42) into `target/bench-corpus/`, generated on first use; set
//! `MAILINTAKE_BENCH_N_EFILING` / `MAILINTAKE_BENCH_N_HELPDESK` to change their sizes (default
//! 100 and 1,000 messages).

use std::path::{Path, PathBuf};
use std::process::Command;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mail_parser::MessageParser;
use mailintake::parse;
use mailintake::raw_store::Sha256Digest;

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The messages of the shared corpus (single files and the messages of its mbox files).
fn shared_corpus() -> Option<Vec<Vec<u8>>> {
    let shared = std::env::var_os("MAILINTAKE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("../shared"));
    let corpus = shared.join("corpus");
    let index = match std::fs::read_to_string(corpus.join("INDEX.tsv")) {
        Ok(index) => index,
        Err(e) => {
            eprintln!(
                "parse bench: SKIPPED the shared corpus: {}: {e} (set MAILINTAKE_SHARED to point at the shared material)",
                corpus.join("INDEX.tsv").display()
            );
            return None;
        }
    };
    eprintln!("parse bench: reading shared material {}", corpus.display());
    let mut out = Vec::new();
    for line in index.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        let [repo, kind, path, ..] = cols[..] else {
            continue;
        };
        let file = corpus.join(repo).join(path);
        match kind {
            "message" => match std::fs::read(&file) {
                Ok(bytes) => out.push(bytes),
                Err(e) => eprintln!("parse bench: {}: {e}", file.display()),
            },
            "mbox" => {
                let Ok(f) = std::fs::File::open(&file) else {
                    continue;
                };
                let reader = std::io::BufReader::new(f);
                for m in mail_parser::mailbox::mbox::MessageIterator::new(reader).flatten() {
                    out.push(m.unwrap_contents());
                }
            }
            _ => {}
        }
    }
    Some(out)
}

/// A generated corpus (`bench/gen_corpus.py`), made on first use under `target/bench-corpus/`.
fn generated_corpus(profile: &str, default_n: usize) -> Option<Vec<Vec<u8>>> {
    let var = format!("MAILINTAKE_BENCH_N_{}", profile.to_ascii_uppercase());
    let n = std::env::var(&var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_n);
    let dir = manifest_dir()
        .join("target/bench-corpus")
        .join(format!("{profile}-n{n}-s42"));
    if !dir.join("stats.json").exists() {
        let _ = std::fs::remove_dir_all(&dir);
        eprintln!(
            "parse bench: generating the {profile} corpus (N={n}) in {}",
            dir.display()
        );
        let status = Command::new("python3")
            .arg(manifest_dir().join("bench/gen_corpus.py"))
            .args(["--profile", profile, "--n", &n.to_string(), "--seed", "42"])
            .arg("--out")
            .arg(&dir)
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!(
                "parse bench: SKIPPED the {profile} corpus: bench/gen_corpus.py failed ({status:?})"
            );
            return None;
        }
    }
    Some(read_maildir(&dir.join("new")))
}

/// The generator writes LF line endings (Dovecot serves CRLF): convert, as IMAP delivers them.
fn read_maildir(dir: &Path) -> Vec<Vec<u8>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    paths.sort();
    paths
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .map(|lf| {
            let mut crlf = Vec::with_capacity(lf.len() + lf.len() / 40);
            for &b in &lf {
                if b == b'\n' && crlf.last() != Some(&b'\r') {
                    crlf.push(b'\r');
                }
                crlf.push(b);
            }
            crlf
        })
        .collect()
}

/// Drops the inputs mail-parser panics on (the pipeline quarantines those).
fn without_parser_panics(messages: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let kept: Vec<Vec<u8>> = messages
        .into_iter()
        .filter(|m| std::panic::catch_unwind(|| MessageParser::default().parse(m)).is_ok())
        .collect();
    std::panic::set_hook(hook);
    kept
}

fn bench_corpus(c: &mut Criterion, name: &str, messages: Vec<Vec<u8>>) {
    let messages = without_parser_panics(messages);
    let bytes: u64 = messages.iter().map(|m| m.len() as u64).sum();
    let digests: Vec<Sha256Digest> = messages.iter().map(|m| Sha256Digest::of(m)).collect();
    eprintln!(
        "parse bench: {name}: {} messages, {:.1} MB",
        messages.len(),
        bytes as f64 / 1e6
    );
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Bytes(bytes));
    group.sample_size(10);
    group.bench_function("mail-parser", |b| {
        b.iter(|| {
            for m in &messages {
                std::hint::black_box(MessageParser::default().parse(m.as_slice()));
            }
        })
    });
    group.bench_function("submission", |b| {
        b.iter(|| {
            for (m, d) in messages.iter().zip(&digests) {
                let _ = std::hint::black_box(parse::parse(m, d));
            }
        })
    });
    group.bench_function("submission+raw-sha256", |b| {
        b.iter(|| {
            for m in &messages {
                let d = Sha256Digest::of(m);
                let _ = std::hint::black_box(parse::parse(m, &d));
            }
        })
    });
    group.finish();
}

fn parse_benches(c: &mut Criterion) {
    if let Some(messages) = shared_corpus() {
        bench_corpus(c, "shared-corpus", messages);
    }
    if let Some(messages) = generated_corpus("efiling", 100) {
        bench_corpus(c, "efiling", messages);
    }
    if let Some(messages) = generated_corpus("helpdesk", 1000) {
        bench_corpus(c, "helpdesk", messages);
    }
}

criterion_group!(benches, parse_benches);
criterion_main!(benches);
