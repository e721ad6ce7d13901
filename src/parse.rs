//! MIME parsing: mail-parser's borrowed tree → our own owned [`Submission`].
//!
//! Every attachment is kept, including the forwarded message itself (a `message/rfc822` part)
//! and the attachments inside it, with its decoded bytes and their SHA-256. Attachment bytes are
//! the transfer-decoded bytes of the part as sent (a text attachment keeps its own charset).
//!
//! A large base64 binary attachment (a 25 MB PDF) is never held whole: the parser hands its
//! decoded bytes over a MiB at a time ([`AttachmentSink::piece`]), as it decodes them.

use mail_parser::decoders::base64::base64_decode;
use mail_parser::decoders::quoted_printable::quoted_printable_decode;
use mail_parser::{Encoding, Message, MessageParser, MessagePart, MimeHeaders, PartType};
use sha2::{Digest, Sha256};

use crate::raw_store::Sha256Digest;

/// Nested `message/rfc822` deeper than this is kept only as the outer attachment's bytes.
const MAX_NESTING: usize = 16;

/// A base64 binary attachment whose decoded bytes reach this size goes to the sink in pieces
/// of about this size, instead of being decoded whole first.
pub const PIECE_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub name: Option<String>,
    pub address: String,
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{name} <{}>", self.address),
            None => f.write_str(&self.address),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Attachment {
    /// Position in depth-first document order, starting at 0.
    pub ordinal: u32,
    /// The ordinal of the forwarded message (a `message/rfc822` attachment) this one sits in.
    pub parent: Option<u32>,
    pub filename: Option<String>,
    pub content_type: String,
    pub sha256: Sha256Digest,
    size: u64,
}

impl Attachment {
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// Where attachment bytes go while parsing: each attachment is handed over once, borrowed,
/// so a 25 MB PDF is not copied into the `Submission` (which keeps only its metadata).
///
/// A large base64 binary attachment comes in pieces instead, one attachment at a time: `piece`
/// after `piece`, then `end`, which returns its SHA-256 and size (the sink hashes what it
/// writes, so the bytes are read once), or `abandon` when the part turned out not to be
/// base64 after all (it is then handed over whole, as text, like any such part).
pub trait AttachmentSink {
    type Error;
    fn attachment(&mut self, bytes: &[u8], sha256: Sha256Digest) -> Result<(), Self::Error>;
    /// The next piece of the current large attachment; the first one starts it.
    fn piece(&mut self, bytes: &[u8]) -> Result<(), Self::Error>;
    /// The current large attachment is complete: its SHA-256 and size.
    fn end(&mut self) -> Result<(Sha256Digest, u64), Self::Error>;
    /// Forgets the current large attachment's pieces.
    fn abandon(&mut self);
}

/// Discards the bytes (parsing for metadata only); large attachments are only hashed.
#[derive(Default)]
pub struct Discard {
    large: Option<(Sha256, u64)>,
}

impl AttachmentSink for Discard {
    type Error = std::convert::Infallible;
    fn attachment(&mut self, _: &[u8], _: Sha256Digest) -> Result<(), Self::Error> {
        Ok(())
    }
    fn piece(&mut self, bytes: &[u8]) -> Result<(), Self::Error> {
        let (hasher, len) = self.large.get_or_insert_with(Default::default);
        hasher.update(bytes);
        *len += bytes.len() as u64;
        Ok(())
    }
    fn end(&mut self) -> Result<(Sha256Digest, u64), Self::Error> {
        let (hasher, len) = self.large.take().unwrap_or_default();
        Ok((Sha256Digest(hasher.finalize().into()), len))
    }
    fn abandon(&mut self) {
        self.large = None;
    }
}

/// What the parser sees of a sink: large parts' pieces, with the sink's first error kept (the
/// parser cannot be stopped; later pieces are dropped and the parse fails with that error).
/// A panic of the sink (the store's, not the parser's) is kept too, and resumed after the
/// parse, so that it is not taken for the parser's own.
struct LargeParts<'s, S: AttachmentSink> {
    sink: &'s mut S,
    /// Digest and size of each large attachment, by the id the parser stores in its part.
    ended: Vec<(Sha256Digest, u64)>,
    error: Option<S::Error>,
    panic: Option<Box<dyn std::any::Any + Send>>,
}

impl<S: AttachmentSink> LargeParts<'_, S> {
    /// Calls the sink unless it failed before; keeps its error or panic.
    fn call<T>(&mut self, f: impl FnOnce(&mut S) -> Result<T, S::Error>) -> Option<T> {
        if self.error.is_some() || self.panic.is_some() {
            return None;
        }
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self.sink))) {
            Ok(Ok(value)) => Some(value),
            Ok(Err(e)) => {
                self.error = Some(e);
                None
            }
            Err(panic) => {
                self.panic = Some(panic);
                None
            }
        }
    }
}

impl<S: AttachmentSink> mail_parser::LargePartSink for LargeParts<'_, S> {
    fn piece(&mut self, bytes: &[u8]) {
        self.call(|sink| sink.piece(bytes));
    }

    fn end(&mut self) -> u32 {
        let id = self.ended.len() as u32;
        let ended = self.call(|sink| sink.end());
        self.ended.push(ended.unwrap_or((Sha256Digest([0; 32]), 0)));
        id
    }

    fn abandon(&mut self) {
        self.sink.abandon();
    }
}

/// Why parsing with a sink stopped.
#[derive(Debug)]
pub enum ParseWithSinkError<E> {
    Parse(ParseError),
    Sink(E),
}

/// What we keep of a message: owned, independent of the parser's lifetimes.
#[derive(Debug, Clone)]
pub struct Submission {
    /// Message-ID without angle brackets; derived from the raw bytes when the header is missing.
    pub message_id: String,
    pub message_id_derived: bool,
    pub from: Option<Address>,
    pub to: Vec<Address>,
    pub cc: Vec<Address>,
    /// The Date header as RFC 3339, when present and valid.
    pub date: Option<String>,
    pub subject: Option<String>,
    pub text_body: Option<String>,
    /// Only when the sender actually sent an HTML part.
    pub html_body: Option<String>,
    pub attachments: Vec<Attachment>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("the message is empty")]
    Empty,
    #[error("no RFC 5322 header could be found")]
    NoHeaders,
    /// mail-parser itself panicked on this input (seen on real mail with mail-parser 0.11.9:
    /// "Invalid part ID, could not find multipart"). Contained here, never propagated.
    #[error("the MIME parser failed on this message's structure: {0}")]
    ParserPanicked(String),
}

impl ParseError {
    /// A stable reason code for the registry's quarantine records.
    pub fn reason_code(&self) -> &'static str {
        match self {
            ParseError::Empty => "empty",
            ParseError::NoHeaders => "no-headers",
            ParseError::ParserPanicked(_) => "parser-failure",
        }
    }
}

/// Parses raw RFC 5322 bytes. Never panics on any input.
pub fn parse(raw: &[u8], raw_sha256: &Sha256Digest) -> Result<Submission, ParseError> {
    parse_into(raw, raw_sha256, &mut Discard::default()).map_err(|e| match e {
        ParseWithSinkError::Parse(p) => p,
        ParseWithSinkError::Sink(never) => match never {},
    })
}

/// Parses and hands every attachment's decoded bytes to `sink` (e.g. the blob store).
pub fn parse_into<S: AttachmentSink>(
    raw: &[u8],
    raw_sha256: &Sha256Digest,
    sink: &mut S,
) -> Result<Submission, ParseWithSinkError<S::Error>> {
    parse_message(raw, raw_sha256, sink, PIECE_BYTES)
}

fn parse_message<S: AttachmentSink>(
    raw: &[u8],
    raw_sha256: &Sha256Digest,
    sink: &mut S,
    piece_bytes: usize,
) -> Result<Submission, ParseWithSinkError<S::Error>> {
    use ParseWithSinkError::Parse as P;
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Err(P(ParseError::Empty));
    }
    let mut large = LargeParts {
        sink,
        ended: Vec::new(),
        error: None,
        panic: None,
    };
    let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        MessageParser::default().parse_streaming(raw, piece_bytes, &mut large)
    }));
    if parsed.is_err() || large.error.is_some() || large.panic.is_some() {
        // A large attachment may have been cut off by the panic or left after the error.
        large.sink.abandon();
    }
    if let Some(panic) = large.panic.take() {
        std::panic::resume_unwind(panic);
    }
    if let Some(e) = large.error.take() {
        return Err(ParseWithSinkError::Sink(e));
    }
    let message = match parsed {
        Ok(Some(m)) => m,
        Ok(None) => return Err(P(ParseError::NoHeaders)),
        Err(panic) => return Err(P(ParseError::ParserPanicked(panic_text(&panic)))),
    };
    if message.headers().is_empty() {
        return Err(P(ParseError::NoHeaders));
    }
    let LargeParts { sink, ended, .. } = large;

    let (message_id, message_id_derived) = match message.message_id().map(str::trim) {
        Some(id) if !id.is_empty() => (id.to_owned(), false),
        _ => (derived_message_id(raw_sha256), true),
    };

    let mut attachments = Vec::new();
    collect_attachments(&message, None, 0, &mut attachments, sink, &ended)?;

    Ok(Submission {
        message_id,
        message_id_derived,
        from: message.from().and_then(|a| a.first()).and_then(address),
        to: message.to().map(addresses).unwrap_or_default(),
        cc: message.cc().map(addresses).unwrap_or_default(),
        date: message.date().map(|d| d.to_rfc3339()),
        subject: message.subject().map(str::to_owned),
        // A message with only HTML gets a text rendering of it as its text body.
        text_body: joined_bodies(
            message
                .text_bodies()
                .filter(|p| matches!(p.body, PartType::Text(_))),
        )
        .or_else(|| message.body_text(0).map(|t| t.into_owned())),
        html_body: joined_bodies(message.html_bodies().filter(|p| p.is_text_html())),
        attachments,
    })
}

/// The message of a caught panic.
pub fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

/// A stable Message-ID for a message without one: the same bytes always get the same id.
pub fn derived_message_id(raw_sha256: &Sha256Digest) -> String {
    format!("{}@derived.mailintake.invalid", &raw_sha256.to_hex()[..32])
}

fn address(a: &mail_parser::Addr<'_>) -> Option<Address> {
    let addr = a.address()?.trim();
    if addr.is_empty() {
        return None;
    }
    Some(Address {
        name: a
            .name()
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned),
        address: addr.to_owned(),
    })
}

fn addresses(list: &mail_parser::Address<'_>) -> Vec<Address> {
    list.iter().filter_map(address).collect()
}

fn joined_bodies<'a>(parts: impl Iterator<Item = &'a MessagePart<'a>>) -> Option<String> {
    let texts: Vec<&str> = parts
        .filter_map(|p| match &p.body {
            PartType::Text(t) | PartType::Html(t) => Some(t.as_ref()),
            _ => None,
        })
        .collect();
    if texts.is_empty() {
        None
    } else {
        Some(texts.join("\n"))
    }
}

fn content_type_of(part: &MessagePart<'_>) -> String {
    match part.content_type() {
        Some(ct) => match ct.subtype() {
            Some(sub) => format!("{}/{}", ct.ctype(), sub).to_ascii_lowercase(),
            None => ct.ctype().to_ascii_lowercase(),
        },
        None => match &part.body {
            PartType::Message(_) => "message/rfc822".to_owned(),
            PartType::Text(_) => "text/plain".to_owned(),
            PartType::Html(_) => "text/html".to_owned(),
            _ => "application/octet-stream".to_owned(),
        },
    }
}

/// The transfer-decoded bytes of a text part as sent, in its own charset (mail-parser hands
/// text parts out converted to UTF-8, which is not what the sender attached).
fn text_part_bytes<'a>(
    message: &'a Message<'_>,
    part: &MessagePart<'_>,
    decoded: &'a str,
) -> std::borrow::Cow<'a, [u8]> {
    use std::borrow::Cow;
    let raw = message.raw_message();
    let body = raw.get(part.offset_body as usize..part.offset_end as usize);
    let from_raw = body.and_then(|body| match part.encoding {
        Encoding::None => Some(Cow::Borrowed(body)),
        Encoding::QuotedPrintable => quoted_printable_decode(body).map(Cow::Owned),
        Encoding::Base64 => base64_decode(body).map(Cow::Owned),
    });
    from_raw.unwrap_or(Cow::Borrowed(decoded.as_bytes()))
}

fn collect_attachments<S: AttachmentSink>(
    message: &Message<'_>,
    parent: Option<u32>,
    depth: usize,
    out: &mut Vec<Attachment>,
    sink: &mut S,
    ended: &[(Sha256Digest, u64)],
) -> Result<(), ParseWithSinkError<S::Error>> {
    for part in message.attachments() {
        let ordinal = out.len() as u32;
        let filename = part
            .attachment_name()
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned);
        let content_type = content_type_of(part);
        let (sha256, size, nested) = if let Some(id) = part.streamed {
            // Already in the sink, piece by piece, while the parser decoded it.
            let Some(&(sha256, size)) = ended.get(id as usize) else {
                return Err(ParseWithSinkError::Parse(ParseError::ParserPanicked(
                    format!("large part {id} was not handed over"),
                )));
            };
            (sha256, size, None)
        } else {
            let (bytes, nested): (std::borrow::Cow<'_, [u8]>, _) = match &part.body {
                PartType::Binary(b) | PartType::InlineBinary(b) => {
                    (std::borrow::Cow::Borrowed(b.as_ref()), None)
                }
                PartType::Text(t) | PartType::Html(t) => (text_part_bytes(message, part, t), None),
                PartType::Message(inner) => {
                    (std::borrow::Cow::Borrowed(inner.raw_message()), Some(inner))
                }
                PartType::Multipart(_) => continue,
            };
            let sha256 = Sha256Digest::of(&bytes);
            sink.attachment(&bytes, sha256)
                .map_err(ParseWithSinkError::Sink)?;
            (sha256, bytes.len() as u64, nested)
        };
        out.push(Attachment {
            ordinal,
            parent,
            filename,
            content_type,
            sha256,
            size,
        });
        if let Some(inner) = nested
            && depth < MAX_NESTING
        {
            collect_attachments(inner, Some(ordinal), depth + 1, out, sink, ended)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::{base64_lines, payload};

    fn parse_str(s: &str) -> Result<Submission, ParseError> {
        parse(s.as_bytes(), &Sha256Digest::of(s.as_bytes()))
    }

    #[test]
    fn empty_and_headerless_input_are_errors_not_panics() {
        assert_eq!(parse_str("").unwrap_err(), ParseError::Empty);
        assert_eq!(parse_str("  \r\n").unwrap_err(), ParseError::Empty);
    }

    #[test]
    fn missing_message_id_is_derived_deterministically() {
        let m = "From: a@b.cz\r\nSubject: x\r\n\r\nbody\r\n";
        let a = parse_str(m).unwrap();
        let b = parse_str(m).unwrap();
        assert!(a.message_id_derived);
        assert_eq!(a.message_id, b.message_id);
        assert!(a.message_id.ends_with("@derived.mailintake.invalid"));
    }

    /// Records what a sink is given.
    #[derive(Default)]
    struct Recorder {
        whole: Vec<Vec<u8>>,
        pieces: Vec<usize>,
        current: Vec<u8>,
        ended: Vec<Vec<u8>>,
        abandoned: usize,
    }

    impl AttachmentSink for Recorder {
        type Error = std::convert::Infallible;
        fn attachment(&mut self, bytes: &[u8], _: Sha256Digest) -> Result<(), Self::Error> {
            self.whole.push(bytes.to_vec());
            Ok(())
        }
        fn piece(&mut self, bytes: &[u8]) -> Result<(), Self::Error> {
            self.pieces.push(bytes.len());
            self.current.extend_from_slice(bytes);
            Ok(())
        }
        fn end(&mut self) -> Result<(Sha256Digest, u64), Self::Error> {
            let bytes = std::mem::take(&mut self.current);
            let ended = (Sha256Digest::of(&bytes), bytes.len() as u64);
            self.ended.push(bytes);
            Ok(ended)
        }
        fn abandon(&mut self) {
            self.abandoned += 1;
            self.current.clear();
        }
    }

    /// A submission with a 3.3 MB PDF and a forwarded message holding a 1.5 MB one.
    fn with_large_attachments(outer: &[u8], inner: &[u8]) -> Vec<u8> {
        with_encoded(&base64_lines(outer), &base64_lines(inner))
    }

    fn with_encoded(outer: &str, inner: &str) -> Vec<u8> {
        format!(
            "From: a@example.cz\r\nMessage-ID: <large@x>\r\nSubject: podani\r\n\
MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\
Content-Type: text/plain\r\n\r\nbody\r\n--b\r\nContent-Type: application/pdf\r\n\
Content-Disposition: attachment; filename=a.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n\
{}\r\n--b\r\nContent-Type: message/rfc822\r\n\r\nFrom: c@example.cz\r\n\
Message-ID: <inner@x>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=c\r\n\r\n\
--c\r\nContent-Type: text/plain\r\n\r\nforwarded\r\n--c\r\nContent-Type: application/pdf\r\n\
Content-Disposition: attachment; filename=b.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n\
{}\r\n--c--\r\n\r\n--b--\r\n",
            outer, inner
        )
        .into_bytes()
    }

    #[test]
    fn a_large_attachment_goes_to_the_sink_in_pieces_with_the_digest_of_its_bytes() {
        let (outer, inner) = (payload(3_300_000, 1), payload(1_500_000, 2));
        let raw = with_large_attachments(&outer, &inner);
        let digest = Sha256Digest::of(&raw);
        let mut sink = Recorder::default();
        let s = parse_into(&raw, &digest, &mut sink).unwrap();

        // The two PDFs came in pieces of about a MiB, never whole.
        assert_eq!(sink.ended, vec![outer.clone(), inner.clone()]);
        assert!(sink.pieces.len() >= 5, "{:?}", sink.pieces);
        let most = PIECE_BYTES + 48 * 1024;
        assert!(
            sink.pieces.iter().all(|&n| n > 0 && n <= most),
            "{:?}",
            sink.pieces
        );
        assert_eq!(sink.abandoned, 0);
        // Only the forwarded message (whose bytes are the raw message's) came whole.
        assert_eq!(sink.whole.len(), 1);
        assert!(sink.whole[0].starts_with(b"From: c@example.cz"));

        let kinds: Vec<_> = s
            .attachments
            .iter()
            .map(|a| {
                (
                    a.ordinal,
                    a.parent,
                    a.filename.as_deref(),
                    a.content_type.as_str(),
                )
            })
            .collect();
        assert_eq!(
            kinds,
            [
                (0, None, Some("a.pdf"), "application/pdf"),
                (1, None, None, "message/rfc822"),
                (2, Some(1), Some("b.pdf"), "application/pdf"),
            ]
        );
        assert_eq!(s.attachments[0].sha256, Sha256Digest::of(&outer));
        assert_eq!(s.attachments[0].size(), outer.len() as u64);
        assert_eq!(s.attachments[2].sha256, Sha256Digest::of(&inner));
        assert_eq!(s.attachments[2].size(), inner.len() as u64);

        // The same submission as when nothing goes in pieces, and as for a discarding sink.
        let mut whole = Recorder::default();
        let w = parse_message(&raw, &digest, &mut whole, usize::MAX).unwrap();
        assert!(whole.pieces.is_empty());
        assert_eq!(whole.whole.len(), 3);
        let plain = parse(&raw, &digest).unwrap();
        for other in [&w, &plain] {
            let a: Vec<_> = other
                .attachments
                .iter()
                .map(|a| (a.sha256, a.size()))
                .collect();
            let b: Vec<_> = s.attachments.iter().map(|a| (a.sha256, a.size())).collect();
            assert_eq!(a, b);
            assert_eq!(other.text_body, s.text_body);
        }
    }

    #[test]
    fn a_large_part_that_is_not_base64_after_all_is_abandoned_and_kept_as_text() {
        let outer = payload(2_500_000, 3);
        let mut encoded = base64_lines(&outer);
        // An invalid byte after two MiB of good lines: upstream keeps the part's raw text.
        let at = encoded.len() - 1000;
        encoded.replace_range(at..at + 1, "!");
        let raw = with_encoded(&encoded, &base64_lines(b"small"));
        let digest = Sha256Digest::of(&raw);
        let mut sink = Recorder::default();
        let s = parse_into(&raw, &digest, &mut sink).unwrap();
        assert_eq!(sink.abandoned, 1);
        assert!(!sink.pieces.is_empty());
        let w = parse_message(&raw, &digest, &mut Recorder::default(), usize::MAX).unwrap();
        let a: Vec<_> = w.attachments.iter().map(|a| (a.sha256, a.size())).collect();
        let b: Vec<_> = s.attachments.iter().map(|a| (a.sha256, a.size())).collect();
        assert_eq!(a, b);
        // Kept: the part's raw text, as sent.
        assert_eq!(s.attachments[0].content_type, "application/pdf");
        assert!(s.attachments[0].size() >= encoded.len() as u64);
    }

    /// A sink that panics at its second piece, as a bug in the store would.
    struct PanicsAtSecondPiece(usize);

    impl AttachmentSink for PanicsAtSecondPiece {
        type Error = std::convert::Infallible;
        fn attachment(&mut self, _: &[u8], _: Sha256Digest) -> Result<(), Self::Error> {
            Ok(())
        }
        fn piece(&mut self, _: &[u8]) -> Result<(), Self::Error> {
            self.0 += 1;
            assert!(self.0 < 2, "the store's bug");
            Ok(())
        }
        fn end(&mut self) -> Result<(Sha256Digest, u64), Self::Error> {
            Ok((Sha256Digest([0; 32]), 0))
        }
        fn abandon(&mut self) {}
    }

    #[test]
    fn a_panic_of_the_sink_is_its_own_not_a_parser_failure() {
        let raw = with_large_attachments(&payload(3_300_000, 4), b"x");
        let digest = Sha256Digest::of(&raw);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            parse_into(&raw, &digest, &mut PanicsAtSecondPiece(0))
        }));
        let Err(panic) = caught else {
            panic!("the sink's panic must go on past the parse: {caught:?}");
        };
        assert_eq!(panic_text(&panic), "the store's bug");
    }

    #[test]
    fn plain_text_has_no_html_body() {
        let s = parse_str("From: a@b.cz\r\nMessage-ID: <x@y>\r\n\r\nhello\r\n").unwrap();
        assert_eq!(s.message_id, "x@y");
        assert_eq!(s.html_body, None);
        assert_eq!(s.text_body.as_deref().map(str::trim), Some("hello"));
    }
}
