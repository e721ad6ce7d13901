//! Every message of the shared real-world corpus goes through `pipeline::ingest_one` without a
//! panic or a hang; the raw bytes are stored unchanged. Messages that cannot be parsed are
//! counted (the quarantine of a later issue); everything else is registered.

mod common;

use std::sync::Arc;
use std::time::Duration;

use mailintake::pipeline::{Limits, Pipeline, Source, ingest_one};
use mailintake::raw_store::{RawStore, Sha256Digest};
use mailintake::registry::{Origin, Outcome, Registry, Status};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_corpus_message_goes_through_ingest_one() {
    let Some(corpus) = common::shared_dir("corpus", "corpus") else {
        return;
    };
    let index = std::fs::read_to_string(corpus.join("INDEX.tsv")).expect("corpus/INDEX.tsv");
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::open(&format!(
        "sqlite://{}/registry.sqlite3",
        dir.path().display()
    ))
    .await
    .unwrap();
    let store = Arc::new(RawStore::open(dir.path()).unwrap());
    let pipeline = Pipeline {
        store: Arc::clone(&store),
        registry: registry.clone(),
        limits: Limits::default(),
    };

    let (inputs, mbox_files) = common::corpus_inputs(&corpus);
    let messages = index
        .lines()
        .filter(|l| l.split('\t').nth(1) == Some("message"))
        .count();
    assert_eq!(messages, 444, "the corpus README promises 444 messages");

    let (mut registered, mut linked, mut quarantined) = (0usize, 0usize, Vec::new());
    for (name, raw) in &inputs {
        let source = Source {
            origin: Origin::Import {
                label: "corpus".into(),
                source_ref: name.clone(),
            },
            ack: None,
            quarantine_ack: None,
            fetched_at: None,
        };
        let outcome = tokio::time::timeout(
            Duration::from_secs(30),
            ingest_one(&pipeline, raw.clone(), &source),
        )
        .await
        .unwrap_or_else(|_| panic!("{name}: ingest hung for 30 s"));
        let done = outcome.unwrap_or_else(|e| panic!("{name}: {e}"));
        match done.outcome {
            Outcome::Registered { .. } => registered += 1,
            Outcome::Quarantined { id } => quarantined.push((name.clone(), id)),
            Outcome::Linked { .. } => linked += 1,
            Outcome::AlreadyKnown { .. } => panic!("{name}: an import has no location to know"),
        }
        let digest = done.raw_sha256;
        // The raw bytes are kept unchanged, whatever happened to the parse.
        assert_eq!(digest, Sha256Digest::of(raw), "{name}");
        assert_eq!(
            store.get(&digest).unwrap(),
            *raw,
            "{name}: stored raw differs"
        );
    }
    let rows = registry.list(None, 100_000).await.unwrap();
    assert_eq!(rows.len(), registered + quarantined.len());
    eprintln!(
        "corpus: {} inputs ({} messages + {} from {} mbox files): {} registered, {} quarantined, {} linked (same bytes twice)",
        inputs.len(),
        messages,
        inputs.len() - messages,
        mbox_files,
        registered,
        quarantined.len(),
        linked
    );
    // Every quarantined message has a reason, and its raw bytes are in the store.
    for (name, id) in &quarantined {
        let row = rows.iter().find(|r| r.id == *id).unwrap();
        assert_eq!(row.status, Status::Quarantined);
        let reason = row.reason_code.as_deref().unwrap_or_default();
        assert!(!reason.is_empty(), "{name}: quarantined without a reason");
        eprintln!(
            "  quarantined: {name}: {reason}: {}",
            row.reason_detail.as_deref().unwrap_or_default()
        );
    }
    assert_eq!(registered + quarantined.len() + linked, inputs.len());
}
