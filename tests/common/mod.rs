//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod bed;
pub mod pg;
pub mod proxy;
pub mod tmpfs;

use std::path::{Path, PathBuf};

/// `../shared` beside the checkout (CI always has it; a user's clone may not). Tests that need
/// it print that they read it, or print why they skip.
pub fn shared_dir(test: &str, what: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("MAILINTAKE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    let path = dir.join(what);
    if path.exists() {
        eprintln!("{test}: reading shared material {}", path.display());
        Some(path)
    } else {
        eprintln!(
            "{test}: SKIPPED: {} is absent (the shared material sits beside the checkout in CI; set MAILINTAKE_SHARED to point at it)",
            path.display()
        );
        None
    }
}

/// The inputs of the shared corpus (from `shared_dir`): every message file, named
/// `repo/path`, and every message of its mbox files, named `repo/path#i`; and how many mbox
/// files there were. An unreadable file or an mbox that cannot be split fails the test.
pub fn corpus_inputs(corpus: &Path) -> (Vec<(String, Vec<u8>)>, usize) {
    let index = std::fs::read_to_string(corpus.join("INDEX.tsv")).expect("corpus/INDEX.tsv");
    let mut inputs = Vec::new();
    let mut mbox_files = 0;
    for line in index.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        let [repo, kind, path, _bytes] = cols[..] else {
            panic!("bad INDEX.tsv line {line:?}");
        };
        let file = corpus.join(repo).join(path);
        let read =
            |file: &Path| std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        match kind {
            "message" => inputs.push((format!("{repo}/{path}"), read(&file))),
            "mbox" => {
                mbox_files += 1;
                let f = std::io::BufReader::new(
                    std::fs::File::open(&file)
                        .unwrap_or_else(|e| panic!("{}: {e}", file.display())),
                );
                for (i, m) in mail_parser::mailbox::mbox::MessageIterator::new(f).enumerate() {
                    let m = m
                        .unwrap_or_else(|e| panic!("{}: mbox split failed: {e:?}", file.display()));
                    inputs.push((format!("{repo}/{path}#{i}"), m.unwrap_contents()));
                }
            }
            _ => {}
        }
    }
    (inputs, mbox_files)
}
