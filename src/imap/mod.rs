//! IMAP client side: connect (implicit TLS / STARTTLS), SASL XOAUTH2, SELECT with UIDVALIDITY,
//! search, `BODY.PEEK[]` fetches and the acknowledgements (`\Seen`, MOVE).
//!
//! This module knows nothing about the registry: it hands out bytes and UIDs and performs the
//! acknowledgements it is given.

mod session;
mod stream;
pub mod uid_set;

use std::time::Duration;

pub use session::{
    Candidates, Endpoint, Fetched, MailSession, Opened, PeerCertificate, Selected, connect_tcp,
    establish,
};

/// Why an IMAP operation failed. Callers branch on [`ImapError::is_transient`] (retry later) and
/// [`ImapError::AuthFailed`] (credentials are wrong: drop the cached token, tell an admin).
#[derive(Debug, thiserror::Error)]
pub enum ImapError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS with {host} failed: {detail}")]
    Tls { host: String, detail: String },
    #[error("{step} timed out after {}s", .after.as_secs())]
    Timeout { step: &'static str, after: Duration },
    #[error("the server rejected the login for {user}: {text}")]
    AuthFailed { user: String, text: String },
    #[error("the server cannot check the login for {user} right now (temporary): {text}")]
    AuthUnavailable { user: String, text: String },
    #[error("connection lost during {step}")]
    ConnectionLost { step: &'static str },
    #[error("{step}: I/O error: {source}")]
    Io {
        step: &'static str,
        source: std::io::Error,
    },
    #[error("{step}: the server said NO: {text}")]
    No { step: &'static str, text: String },
    #[error("{step}: {detail}")]
    Protocol { step: &'static str, detail: String },
    #[error("the server did not report UIDVALIDITY for folder {folder:?}")]
    NoUidValidity { folder: String },
    #[error("the server did not return UIDs {missing:?} that it listed a moment ago")]
    FetchIncomplete { missing: Vec<u32> },
    /// Without MOVE, moving needs UID EXPUNGE (UIDPLUS): a plain EXPUNGE would also remove
    /// mail other clients marked `\Deleted`.
    #[error(
        "cannot move to {folder:?}: the server supports neither MOVE nor UIDPLUS, so only a plain \
         EXPUNGE could remove the originals, and it would also remove mail other clients marked \
         deleted; nothing was copied. Use {key} = \"seen\" for this mailbox"
    )]
    CannotMove { folder: String, key: &'static str },
}

/// The largest message fetched: async-imap holds one response in a buffer of at most 512 MiB,
/// and a larger one fails the connection (less 1 MiB for the response around the literal).
pub const MAX_FETCH_BYTES: u64 = 511 * 1024 * 1024;

impl ImapError {
    /// True for failures that say nothing about the configuration: network, timeouts, server
    /// restarts, the server's auth backend being down. The next poll will try again.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ImapError::Connect { .. }
                | ImapError::Timeout { .. }
                | ImapError::AuthUnavailable { .. }
                | ImapError::ConnectionLost { .. }
                | ImapError::Io { .. }
        )
    }

    fn from_imap(step: &'static str, e: async_imap::error::Error) -> ImapError {
        use async_imap::error::Error;
        match e {
            Error::Io(source) if is_disconnect(&source) => ImapError::ConnectionLost { step },
            Error::Io(source) => ImapError::Io { step, source },
            Error::ConnectionLost => ImapError::ConnectionLost { step },
            Error::No(text) => ImapError::No { step, text },
            Error::Bad(text) => ImapError::Protocol {
                step,
                detail: format!("the server said BAD: {text}"),
            },
            other => ImapError::Protocol {
                step,
                detail: other.to_string(),
            },
        }
    }
}

fn is_disconnect(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected
    )
}
