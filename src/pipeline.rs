//! `ingest_one`: the one seam every message goes through, from IMAP, an import or a test:
//! raw bytes → durable raw blob → parse → attachment blobs → registry transaction.

use std::sync::Arc;

use crate::parse::{self, ParseError, Submission};
use crate::raw_store::{RawStore, Sha256Digest, StoreError};
use crate::registry::{NewRecord, Origin, Registered, Registry, RegistryError};

/// Where a message comes from and what should happen to it on the server afterwards.
#[derive(Debug, Clone)]
pub struct Source {
    pub origin: Origin,
    /// The acknowledgement to queue with the registration (`seen`, `move:<folder>`), if any.
    pub ack: Option<String>,
}

/// The stores a message passes through.
#[derive(Clone)]
pub struct Pipeline {
    pub store: Arc<RawStore>,
    pub registry: Registry,
}

#[derive(Debug, Clone)]
pub struct Ingested {
    pub record: Registered,
    pub raw_sha256: Sha256Digest,
    pub attachments: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The bytes could not be stored: nothing is committed, nothing may be acknowledged.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The raw bytes are stored (under `raw_sha256`) but are not a message we can register.
    #[error("cannot parse message (raw kept as sha256 {raw_sha256}): {error}")]
    Parse {
        error: ParseError,
        raw_sha256: Sha256Digest,
    },
    /// The blocking task died (a bug in our own code). Nothing was committed.
    #[error("internal error while processing the message: {0}")]
    Internal(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl IngestError {
    /// Errors that concern this one message only; the others stop the run.
    pub fn is_message_specific(&self) -> bool {
        matches!(self, IngestError::Parse { .. } | IngestError::Internal(_))
    }
}

enum Prepared {
    Ready(Sha256Digest, Box<Submission>),
    Unparseable(Sha256Digest, ParseError),
}

/// Stores, parses and registers one message. CPU and disk work run on the blocking pool, so
/// the async workers keep serving the network.
pub async fn ingest_one(
    p: &Pipeline,
    raw: Vec<u8>,
    source: &Source,
) -> Result<Ingested, IngestError> {
    let store = Arc::clone(&p.store);
    let raw_size = raw.len() as u64;
    let job = tokio::task::spawn_blocking(move || -> Result<Prepared, StoreError> {
        let digest = store.put(&raw)?;
        match parse::parse(&raw, &digest) {
            Ok(submission) => {
                for a in &submission.attachments {
                    store.put_with_digest(&a.bytes, a.sha256)?;
                }
                Ok(Prepared::Ready(digest, Box::new(submission)))
            }
            Err(e) => Ok(Prepared::Unparseable(digest, e)),
        }
    });
    let prepared = match job.await {
        Ok(result) => result?,
        Err(join) => {
            tracing::error!(error = %join, "message processing task failed");
            return Err(IngestError::Internal(join.to_string()));
        }
    };
    let (digest, submission) = match prepared {
        Prepared::Ready(d, s) => (d, s),
        Prepared::Unparseable(raw_sha256, error) => {
            return Err(IngestError::Parse { error, raw_sha256 });
        }
    };
    let record = p
        .registry
        .register(NewRecord {
            origin: &source.origin,
            raw_sha256: digest,
            raw_size,
            submission: &submission,
            ack: source.ack.clone(),
        })
        .await?;
    Ok(Ingested {
        record,
        raw_sha256: digest,
        attachments: submission.attachments.len(),
    })
}
