//! MIME parsing: mail-parser's borrowed tree → our own owned [`Submission`].
//!
//! Every attachment is kept, including the forwarded message itself (a `message/rfc822` part)
//! and the attachments inside it, with its decoded bytes and their SHA-256. Attachment bytes are
//! the transfer-decoded bytes of the part as sent (a text attachment keeps its own charset).

use mail_parser::decoders::base64::base64_decode;
use mail_parser::decoders::quoted_printable::quoted_printable_decode;
use mail_parser::{Encoding, Message, MessageParser, MessagePart, MimeHeaders, PartType};

use crate::raw_store::Sha256Digest;

/// Nested `message/rfc822` deeper than this is kept only as the outer attachment's bytes.
const MAX_NESTING: usize = 16;

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
pub trait AttachmentSink {
    type Error;
    fn attachment(&mut self, bytes: &[u8], sha256: Sha256Digest) -> Result<(), Self::Error>;
}

/// Discards the bytes (parsing for metadata only).
pub struct Discard;

impl AttachmentSink for Discard {
    type Error = std::convert::Infallible;
    fn attachment(&mut self, _: &[u8], _: Sha256Digest) -> Result<(), Self::Error> {
        Ok(())
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
    parse_into(raw, raw_sha256, &mut Discard).map_err(|e| match e {
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
    parse_message(raw, raw_sha256, sink)
}

fn parse_message<S: AttachmentSink>(
    raw: &[u8],
    raw_sha256: &Sha256Digest,
    sink: &mut S,
) -> Result<Submission, ParseWithSinkError<S::Error>> {
    use ParseWithSinkError::Parse as P;
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Err(P(ParseError::Empty));
    }
    let parsed = std::panic::catch_unwind(|| MessageParser::default().parse(raw));
    let message = match parsed {
        Ok(Some(m)) => m,
        Ok(None) => return Err(P(ParseError::NoHeaders)),
        Err(panic) => return Err(P(ParseError::ParserPanicked(panic_text(&panic)))),
    };
    if message.headers().is_empty() {
        return Err(P(ParseError::NoHeaders));
    }

    let (message_id, message_id_derived) = match message.message_id().map(str::trim) {
        Some(id) if !id.is_empty() => (id.to_owned(), false),
        _ => (derived_message_id(raw_sha256), true),
    };

    let mut attachments = Vec::new();
    collect_attachments(&message, None, 0, &mut attachments, sink)
        .map_err(ParseWithSinkError::Sink)?;

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
) -> Result<(), S::Error> {
    for part in message.attachments() {
        let ordinal = out.len() as u32;
        let filename = part
            .attachment_name()
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned);
        let content_type = content_type_of(part);
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
        sink.attachment(&bytes, sha256)?;
        out.push(Attachment {
            ordinal,
            parent,
            filename,
            content_type,
            sha256,
            size: bytes.len() as u64,
        });
        if let Some(inner) = nested
            && depth < MAX_NESTING
        {
            collect_attachments(inner, Some(ordinal), depth + 1, out, sink)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn plain_text_has_no_html_body() {
        let s = parse_str("From: a@b.cz\r\nMessage-ID: <x@y>\r\n\r\nhello\r\n").unwrap();
        assert_eq!(s.message_id, "x@y");
        assert_eq!(s.html_body, None);
        assert_eq!(s.text_body.as_deref().map(str::trim), Some("hello"));
    }
}
