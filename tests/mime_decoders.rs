//! The patched mail-parser (vendor/mail-parser/PATCHED.md) decodes base64 body parts in bulk
//! and copies runs of literal quoted-printable text at once. With its differential check on,
//! every `decode_base64_mime` and `decode_quoted_printable_mime` call also runs upstream's byte
//! loop and panics unless both give the same bytes, the same part end and the same stream
//! state. These tests parse real-world, generated and deliberately damaged messages that way,
//! and check the decoded parts against the bytes that were encoded.
//!
//! Each is also parsed with `parse_streaming`, which hands large base64 binary parts over in
//! pieces (here from 1000 decoded bytes on, so that nearly every such part goes that way): the
//! pieces put together must be the same bytes, part for part, as `parse` gives.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use mail_parser::decoders::base64::set_differential_check;
use mail_parser::{LargePartSink, MessageParser, MimeHeaders};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

mod common;

/// The start of the patch's panic message when the bulk and byte loops disagree (base64 and
/// quoted-printable alike).
const MISMATCH: &str = "mail-parser patch: bulk";

/// Parses `raw` with the differential check on. `Err` carries the panic message of a panic
/// that is not a mismatch (upstream mail-parser panics on a few real-world inputs); a mismatch
/// fails the test at once.
fn parse_checked(name: &str, raw: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    set_differential_check(true);
    let parsed = catch_unwind(AssertUnwindSafe(|| {
        MessageParser::default().parse(raw).map(|m| {
            m.attachments()
                .map(|a| a.contents().to_vec())
                .collect::<Vec<_>>()
        })
    }));
    if let Ok(whole) = &parsed {
        let mut pieces = Pieces::default();
        let streamed = catch_unwind(AssertUnwindSafe(|| {
            MessageParser::default()
                .parse_streaming(raw, 1000, &mut pieces)
                .map(|m| {
                    m.attachments()
                        .map(|a| match a.streamed {
                            Some(id) => pieces.ended[id as usize].clone(),
                            None => a.contents().to_vec(),
                        })
                        .collect::<Vec<_>>()
                })
        }));
        match streamed {
            Ok(streamed) => assert!(
                streamed == *whole,
                "{name}: parse_streaming's attachments differ from parse's"
            ),
            Err(panic) => panic!(
                "{name}: parse_streaming panicked where parse did not: {}",
                mailintake::parse::panic_text(&panic)
            ),
        }
    }
    match parsed {
        Ok(attachments) => Ok(attachments.unwrap_or_default()),
        Err(panic) => {
            let text = mailintake::parse::panic_text(&panic);
            assert!(!text.contains(MISMATCH), "{name}: {text}");
            Err(text)
        }
    }
}

/// Parts handed over in pieces so far, by every test of this binary.
static STREAMED_PARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Collects what `parse_streaming` hands over: each large part's pieces, put together.
#[derive(Default)]
struct Pieces {
    current: Vec<u8>,
    ended: Vec<Vec<u8>>,
}

impl LargePartSink for Pieces {
    fn piece(&mut self, bytes: &[u8]) {
        assert!(!bytes.is_empty(), "an empty piece");
        self.current.extend_from_slice(bytes);
    }
    fn end(&mut self) -> u32 {
        STREAMED_PARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.ended.push(std::mem::take(&mut self.current));
        self.ended.len() as u32 - 1
    }
    fn abandon(&mut self) {
        self.current.clear();
    }
}

fn multipart(parts: &[(&str, &[u8])], eol: &str) -> Vec<u8> {
    multipart_encoded(parts, eol, "base64")
}

fn multipart_encoded(parts: &[(&str, &[u8])], eol: &str, encoding: &str) -> Vec<u8> {
    let mut m = format!(
        "From: a@example.org{eol}To: b@example.org{eol}Subject: test{eol}Message-ID: <t@example.org>{eol}\
         MIME-Version: 1.0{eol}Content-Type: multipart/mixed; boundary=\"b0und\"{eol}{eol}preamble{eol}"
    )
    .into_bytes();
    for (name, body) in parts {
        m.extend_from_slice(
            format!(
                "--b0und{eol}Content-Type: application/pdf; name=\"{name}\"{eol}\
                 Content-Disposition: attachment; filename=\"{name}\"{eol}\
                 Content-Transfer-Encoding: {encoding}{eol}{eol}"
            )
            .as_bytes(),
        );
        m.extend_from_slice(body);
        m.extend_from_slice(eol.as_bytes());
    }
    m.extend_from_slice(format!("--b0und--{eol}").as_bytes());
    m
}

/// A message whose one body part is base64 at the top level: no boundary to look for.
fn single_part(body: &[u8]) -> Vec<u8> {
    [
        b"Subject: s\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            .as_slice(),
        body,
    ]
    .concat()
}

fn wrapped(encoded: &str, width: usize, eol: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for line in encoded.as_bytes().chunks(width.max(1)) {
        out.extend_from_slice(line);
        out.extend_from_slice(eol.as_bytes());
    }
    out
}

#[test]
fn clean_base64_decodes_to_the_encoded_bytes_at_any_line_width() {
    let mut rng = StdRng::seed_from_u64(7);
    for len in [0usize, 1, 2, 3, 4, 56, 57, 58, 1000, 70_000, 300_001] {
        let payload: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        let encoded = STANDARD.encode(&payload);
        for width in [1usize, 3, 4, 5, 60, 64, 72, 76, 77, 1_000_000] {
            for (eol, blank_line) in [("\r\n", true), ("\r\n", false), ("\n", true), ("\n", false)]
            {
                let mut body = wrapped(&encoded, width, eol);
                if !blank_line {
                    // The last line of base64 right before the boundary line, as most mailers
                    // write it (the part then ends before that line's line break).
                    body.truncate(body.len().saturating_sub(eol.len()));
                }
                let raw = multipart(&[("a.pdf", &body), ("b.pdf", &body)], eol);
                let name = format!("len {len} width {width} eol {eol:?} blank line {blank_line}");
                let attachments = parse_checked(&name, &raw).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(attachments.len(), 2, "{name}");
                for a in &attachments {
                    assert!(
                        a == &payload,
                        "{name}: decoded bytes differ from the payload"
                    );
                }
            }
        }
    }
}

/// Two short lines whose second line break falls where a line of the usual width would have
/// ended: the bulk step, which looks for the next line break there first, must not take them
/// for one line.
#[test]
fn short_lines_ending_where_a_usual_line_would_still_decode_right() {
    let mut rng = StdRng::seed_from_u64(5);
    let payload: Vec<u8> = (0..150_000).map(|_| rng.random()).collect();
    let encoded = STANDARD.encode(&payload);
    for eol in ["\r\n", "\n"] {
        // a + eol + b + eol spans as many bytes as 76 characters and their line break.
        let (a, b) = (36, 76 - eol.len() - 36);
        for at in [10usize, 700, 1500] {
            let mut widths: Vec<usize> = vec![76; at];
            widths.extend([a, b]);
            let mut body = Vec::new();
            let mut rest = encoded.as_bytes();
            let mut widths = widths.into_iter();
            while !rest.is_empty() {
                let width = widths.next().unwrap_or(76).min(rest.len());
                body.extend_from_slice(&rest[..width]);
                body.extend_from_slice(eol.as_bytes());
                rest = &rest[width..];
            }
            let raw = multipart(&[("a.pdf", &body)], eol);
            let name = format!("eol {eol:?}, short lines after {at} lines");
            let attachments = parse_checked(&name, &raw).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                attachments == [payload.clone()],
                "{name}: decoded bytes differ"
            );
        }
    }
}

/// Inserts 1-5 pieces of `noise` at random places of an encoded body, and cuts it short at a
/// random place one time in five.
fn damage(rng: &mut StdRng, body: &mut Vec<u8>, noise: &[&[u8]]) {
    for _ in 0..rng.random_range(1..6) {
        let at = rng.random_range(0..=body.len());
        let piece = noise[rng.random_range(0..noise.len())];
        body.splice(at..at, piece.iter().copied());
    }
    if rng.random_bool(0.2) {
        let cut = rng.random_range(0..=body.len());
        body.truncate(cut);
    }
}

/// One time in seven or so, removes a multipart message's closing boundary: its last part then
/// runs to the end of the message.
fn perhaps_drop_closing_boundary(rng: &mut StdRng, raw: &mut Vec<u8>, eol: &str) {
    if rng.random_bool(0.15) {
        let cut = raw.len() - "--b0und--".len() - eol.len();
        raw.truncate(cut);
    }
}

#[test]
fn damaged_base64_gives_the_same_result_as_upstream() {
    let mut rng = StdRng::seed_from_u64(11);
    let noise: &[&[u8]] = &[
        b"=",
        b"==",
        b" ",
        b"\t",
        b"\r",
        b"\n",
        b"\r\n",
        b"-",
        b"--",
        b"--b0und",
        b"--b0und--",
        b"--b0un",
        b"\r\n--b0und\r\n",
        b"!",
        b"\xff",
        b"\0",
        b"A",
        b"AB",
        b"ABC",
        b"_",
        b".",
    ];
    let (mut intact, mut damaged) = (0, 0);
    for round in 0..400 {
        let len = [10usize, 100, 3_000, 100_000][round % 4];
        let payload: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        let width = [76usize, 64, 4, 7, 1][rng.random_range(0..5)];
        let eol = if rng.random_bool(0.8) { "\r\n" } else { "\n" };
        let mut body = wrapped(&STANDARD.encode(&payload), width, eol);
        damage(&mut rng, &mut body, noise);
        let mut raw = multipart(&[("x.pdf", &body)], eol);
        perhaps_drop_closing_boundary(&mut rng, &mut raw, eol);
        match parse_checked(&format!("round {round}"), &raw) {
            Ok(attachments) if attachments.first() == Some(&payload) => intact += 1,
            _ => damaged += 1,
        }
        let _ = parse_checked(&format!("round {round}, single part"), &single_part(&body));
    }
    // The damage must reach both outcomes: payloads that still decode whole (noise the decoder
    // skips) and payloads that do not (cut short, invalid bytes, broken boundaries).
    eprintln!("mime_decoders: damaged base64 rounds: {intact} decoded whole, {damaged} not");
    assert!(
        intact >= 20 && damaged >= 100,
        "{intact} whole, {damaged} not"
    );
}

/// The bulk step must not scan the same bytes again and again where it cannot take a line:
/// each of these 4 MB parts would take hours if it did, and takes well under a second.
#[test]
fn long_damaged_lines_do_not_make_decoding_quadratic() {
    let mut rng = StdRng::seed_from_u64(13);
    let payload: Vec<u8> = (0..3_000_000).map(|_| rng.random()).collect();
    let one_line = STANDARD.encode(&payload);
    let with_spaces: String = one_line
        .as_bytes()
        .chunks(100)
        .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
        .collect::<Vec<_>>()
        .join(" ");
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        // One line, no line break before the end of the message.
        ("one line", one_line.clone().into_bytes()),
        // One line with a space every 100 characters (skipped by the decoder).
        ("spaces", with_spaces.into_bytes()),
        // Lines of 75 characters: never a whole number of groups.
        ("width 75", wrapped(&one_line, 75, "\r\n")),
    ];
    for (name, body) in bodies {
        let single = single_part(&body);
        let started = std::time::Instant::now();
        parse_checked(name, &single).unwrap_or_else(|e| panic!("{name}: {e}"));
        let elapsed = started.elapsed();
        assert!(
            elapsed < std::time::Duration::from_secs(60),
            "{name}: {elapsed:?} (a hang guard, not a benchmark)"
        );
        let parsed = MessageParser::default()
            .parse(single.as_slice())
            .expect("parses");
        assert!(
            parsed.parts[0].contents() == payload,
            "{name}: the part does not decode to the payload"
        );
    }
}

#[test]
fn shared_corpus_parses_the_same_as_upstream() {
    let Some(corpus) = common::shared_dir("mime_decoders", "corpus") else {
        return;
    };
    let (inputs, _) = common::corpus_inputs(&corpus);
    let (mut parsed, mut upstream_panics) = (0, Vec::new());
    for (name, raw) in &inputs {
        match parse_checked(name, raw) {
            Ok(_) => parsed += 1,
            Err(e) => upstream_panics.push(format!("{name}: {e}")),
        }
    }
    eprintln!(
        "mime_decoders: {parsed} corpus messages parsed identically; upstream panics on {}: {upstream_panics:#?}",
        upstream_panics.len()
    );
    assert!(parsed >= 440, "only {parsed} corpus messages parsed");
    // mail-parser 0.11.9 itself panics on 4 corpus messages (benches/parse.rs leaves them out).
    assert!(upstream_panics.len() <= 4, "{upstream_panics:#?}");
}

/// Generates a small corpus with `bench/gen_corpus.py` (python3) and parses every message.
fn generated(profile: &str, n: usize) -> usize {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("corpus");
    let status = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/gen_corpus.py"))
        .args(["--profile", profile, "--n", &n.to_string(), "--seed", "5"])
        .arg("--out")
        .arg(&out)
        .status()
        .expect("python3 runs bench/gen_corpus.py");
    assert!(status.success(), "gen_corpus.py failed: {status}");
    let mut count = 0;
    let mut paths: Vec<_> = std::fs::read_dir(out.join("new"))
        .expect("corpus/new")
        .flatten()
        .map(|e| e.path())
        .collect();
    paths.sort();
    for path in paths {
        let lf = std::fs::read(&path).expect("generated message");
        // As IMAP delivers them: CRLF line endings. The LF original goes through as well.
        let mut crlf = Vec::with_capacity(lf.len() + lf.len() / 40);
        for &b in &lf {
            if b == b'\n' {
                crlf.push(b'\r');
            }
            crlf.push(b);
        }
        for raw in [&crlf, &lf] {
            let name = path.display().to_string();
            let attachments = parse_checked(&name, raw).unwrap_or_else(|e| panic!("{name}: {e}"));
            let parsed = MessageParser::default()
                .parse(raw.as_slice())
                .expect("parses");
            // Every PDF the generator wrote decodes to a PDF, whole.
            for a in parsed.attachments() {
                if a.content_type().and_then(|c| c.subtype()) == Some("pdf") {
                    let pdf = a.contents();
                    assert!(pdf.starts_with(b"%PDF-"), "{name}: attachment is not a PDF");
                    assert!(
                        pdf.trim_ascii_end().ends_with(b"%%EOF"),
                        "{name}: PDF is cut short"
                    );
                }
            }
            count += attachments.len();
        }
    }
    count
}

#[test]
fn generated_efiling_and_helpdesk_mail_parses_the_same_as_upstream() {
    let efiling = generated("efiling", 40);
    // The e-filing PDFs are base64 binary parts well above 1000 bytes.
    let streamed = STREAMED_PARTS.load(std::sync::atomic::Ordering::Relaxed);
    assert!(streamed >= efiling, "only {streamed} parts went in pieces");
    let helpdesk = generated("helpdesk", 300);
    assert!(efiling > 40, "only {efiling} e-filing attachments");
    assert!(helpdesk > 20, "only {helpdesk} helpdesk attachments");
}

/// Quoted-printable encoding of `lines` (RFC 2045 section 6.7): `=`, bytes outside printable
/// ASCII, and a space or tab at the end of a line are escaped; encoded lines longer than 76
/// characters get soft line breaks. Hard line breaks are `eol`.
fn quoted_printable(lines: &[Vec<u8>], eol: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        if n > 0 {
            out.extend_from_slice(eol.as_bytes());
        }
        let mut width = 0;
        for (i, &b) in line.iter().enumerate() {
            let last = i + 1 == line.len();
            let literal =
                (b == b' ' || b == b'\t') && !last || (b'!'..=b'~').contains(&b) && b != b'=';
            let piece = if literal {
                vec![b]
            } else {
                format!("={b:02X}").into_bytes()
            };
            if width + piece.len() > 75 {
                out.push(b'=');
                out.extend_from_slice(eol.as_bytes());
                width = 0;
            }
            width += piece.len();
            out.extend_from_slice(&piece);
        }
    }
    out
}

/// Lines of text as helpdesk and e-filing mail has them: words (Czech, with UTF-8), runs of
/// spaces and tabs, dashes, `=` signs, the odd control byte, empty lines.
fn random_lines(rng: &mut StdRng, n: usize) -> Vec<Vec<u8>> {
    let words: &[&[u8]] = &[
        "Dobrý".as_bytes(),
        "den,".as_bytes(),
        "žádost".as_bytes(),
        "o".as_bytes(),
        "vyjádření".as_bytes(),
        "č.j.".as_bytes(),
        b"MUCH-2026/0815",
        b"-",
        b"--",
        b"a=b",
        b"=",
        b"\t",
        b"   ",
        b"\x01",
        b"\xff",
        b"https://example.org/?q=1&r=2",
        b"---------- Forwarded message ----------",
    ];
    (0..n)
        .map(|_| {
            let mut line = Vec::new();
            for w in 0..rng.random_range(0..30) {
                if w > 0 {
                    line.push(b' ');
                }
                line.extend_from_slice(words[rng.random_range(0..words.len())]);
            }
            line
        })
        .collect()
}

#[test]
fn clean_quoted_printable_decodes_to_the_encoded_text() {
    let mut rng = StdRng::seed_from_u64(17);
    for round in 0..200 {
        let lines = random_lines(&mut rng, [1usize, 2, 10, 300][round % 4]);
        let eol = if round % 3 == 0 { "\n" } else { "\r\n" };
        let body = quoted_printable(&lines, eol);
        let expected = lines.join(eol.as_bytes());
        let name = format!("round {round}");
        let raw = multipart_encoded(
            &[("a.txt", &body), ("b.txt", &body)],
            eol,
            "quoted-printable",
        );
        let parts = parse_checked(&name, &raw).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(parts.len(), 2, "{name}");
        for part in &parts {
            assert!(
                part == &expected,
                "{name}: decoded text differs from the encoded one"
            );
        }
    }
}

#[test]
fn damaged_quoted_printable_gives_the_same_result_as_upstream() {
    let mut rng = StdRng::seed_from_u64(19);
    let noise: &[&[u8]] = &[
        b"=",
        b"==",
        b"=4",
        b"=G1",
        b"=3D",
        b"= ",
        b"=\r\n",
        b"=\n",
        b" \r\n",
        b"\t\n",
        b"\r",
        b" \r \t",
        b"\n",
        b"-",
        b"--",
        b"--b0und",
        b"\r\n--b0und\r\n",
        b"--b0und--",
        b"\xff",
        b"\0",
    ];
    let (mut intact, mut damaged, mut upstream_panics) = (0, 0, 0);
    for round in 0..400 {
        let lines = random_lines(&mut rng, [1usize, 5, 50, 400][round % 4]);
        let eol = if rng.random_bool(0.8) { "\r\n" } else { "\n" };
        let expected = lines.join(eol.as_bytes());
        let mut body = quoted_printable(&lines, eol);
        damage(&mut rng, &mut body, noise);
        let mut raw = multipart_encoded(&[("x.txt", &body)], eol, "quoted-printable");
        perhaps_drop_closing_boundary(&mut rng, &mut raw, eol);
        match parse_checked(&format!("round {round}"), &raw) {
            Ok(parts) if parts.first() == Some(&expected) => intact += 1,
            Ok(_) => damaged += 1,
            Err(_) => upstream_panics += 1,
        }
        let single = [
            b"Subject: s\r\nContent-Type: text/plain; charset=utf-8\r\n\
              Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                .as_slice(),
            &body,
        ]
        .concat();
        let _ = parse_checked(&format!("round {round}, single part"), &single);
    }
    // Nearly every piece of noise changes the decoded text (only a soft line break does not), so
    // what matters is that the rounds were compared: upstream's own debug-build panics (an
    // underflow on a boundary right after a line break) stay rare.
    eprintln!(
        "mime_decoders: damaged quoted-printable rounds: {intact} decoded whole, {damaged} not, \
         {upstream_panics} upstream panics"
    );
    assert!(
        intact + damaged >= 350 && damaged >= 100,
        "{intact} whole, {damaged} not, {upstream_panics} upstream panics"
    );
}

/// Short bodies strung together from the pieces that move the quoted-printable decoder's state
/// (escapes, soft and hard line breaks, bare CR, trailing whitespace, dashes, the boundary), so
/// that every transition of the byte loop meets a run of literal text on either side.
#[test]
fn quoted_printable_token_soup_gives_the_same_result_as_upstream() {
    let mut rng = StdRng::seed_from_u64(23);
    let tokens: &[&[u8]] = &[
        b"a",
        b"text",
        "č".as_bytes(),
        b" ",
        b"  ",
        b"\t",
        b"\r",
        b"\n",
        b"\r\n",
        b"=",
        b"=4",
        b"=41",
        b"=20",
        b"=\r\n",
        b"=\n",
        b"= \n",
        b"-",
        b"--",
        b"--b0und",
        b"--b0und--",
        b"\xff",
    ];
    let mut compared = 0;
    for round in 0..5_000 {
        let body: Vec<u8> = (0..rng.random_range(0..40))
            .flat_map(|_| tokens[rng.random_range(0..tokens.len())].iter().copied())
            .collect();
        let eol = if round % 2 == 0 { "\r\n" } else { "\n" };
        let raw = multipart_encoded(&[("x.txt", &body)], eol, "quoted-printable");
        if parse_checked(&format!("soup {round}"), &raw).is_ok() {
            compared += 1;
        }
        let single = [
            b"Subject: s\r\nContent-Type: application/octet-stream\r\n\
              Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                .as_slice(),
            &body,
        ]
        .concat();
        if parse_checked(&format!("soup {round}, single part"), &single).is_ok() {
            compared += 1;
        }
    }
    eprintln!("mime_decoders: {compared} of 10000 token-soup parts compared with upstream");
    assert!(compared >= 9_000, "only {compared} compared");
}
