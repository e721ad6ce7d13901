//! Golden fixtures: each `fixtures/submissions/*.eml` parsed into a `Submission` must match the
//! `*.expected.json` beside it (computed independently with Python's email package). On a
//! mismatch the actual result is written as `*.actual.json` next to it for review.

use std::path::Path;

use mailintake::parse::{Submission, parse};
use mailintake::raw_store::Sha256Digest;
use serde_json::{Value, json};

fn actual_json(s: &Submission) -> Value {
    let leaf: Vec<Value> = s
        .attachments
        .iter()
        .filter(|a| a.content_type != "message/rfc822")
        .map(|a| {
            json!({
                "filename": a.filename,
                "content_type": a.content_type,
                "size": a.size(),
                "sha256": a.sha256.to_hex(),
                "nested": a.parent.is_some(),
            })
        })
        .collect();
    json!({
        "message_id": if s.message_id_derived { None } else { Some(&s.message_id) },
        "from": s.from.as_ref().map(|a| a.address.to_lowercase()),
        "from_name": s.from.as_ref().and_then(|a| a.name.clone()),
        "to": s.to.iter().map(|a| a.address.clone()).collect::<Vec<_>>(),
        "cc": s.cc.iter().map(|a| a.address.clone()).collect::<Vec<_>>(),
        "subject": s.subject,
        "has_html": s.html_body.is_some(),
        "attachments": leaf,
        "forwarded_messages": s.attachments.iter().filter(|a| a.content_type == "message/rfc822").count(),
    })
}

#[test]
fn every_fixture_matches_its_expected_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/submissions");
    let mut checked = 0;
    let mut failures = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "eml"))
        .collect();
    entries.sort();
    for eml in entries {
        let raw = std::fs::read(&eml).unwrap();
        let expected_path = eml.with_extension("expected.json");
        let mut expected: Value =
            serde_json::from_slice(&std::fs::read(&expected_path).unwrap()).unwrap();
        let s = parse(&raw, &Sha256Digest::of(&raw)).unwrap();
        // Text snippets are checked as "contains", then removed from the structural comparison.
        let snippets = expected
            .as_object_mut()
            .unwrap()
            .remove("text_contains")
            .unwrap_or(json!([]));
        let text = s.text_body.clone().unwrap_or_default();
        for snippet in snippets.as_array().unwrap() {
            let snippet = snippet.as_str().unwrap();
            if !text.contains(snippet) {
                failures.push(format!("{}: text body lacks {snippet:?}", eml.display()));
            }
        }
        if s.message_id_derived {
            assert!(s.message_id.ends_with("@derived.mailintake.invalid"));
        }
        let actual = actual_json(&s);
        let actual_path = eml.with_extension("actual.json");
        if actual != expected {
            std::fs::write(&actual_path, serde_json::to_string_pretty(&actual).unwrap()).unwrap();
            failures.push(format!(
                "{} differs from {} (see {})",
                eml.display(),
                expected_path.display(),
                actual_path.display()
            ));
        } else {
            let _ = std::fs::remove_file(&actual_path);
        }
        checked += 1;
    }
    assert!(
        checked >= 6,
        "only {checked} fixtures found in {}",
        dir.display()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
