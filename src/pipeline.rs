//! `ingest_one`: the one seam every message goes through, from IMAP, an import or a test:
//! raw bytes → durable raw blob → parse → attachment blobs → one registry transaction.
//!
//! A message that cannot be registered is quarantined, with its raw bytes kept: unparseable,
//! larger than the size limit, or failing (or killing the worker) `max_attempts` times.

use std::sync::Arc;

use crate::failpoint;
use crate::parse::{self, ParseError, Submission};
use crate::raw_store::{BlobWriter, RawStore, Sha256Digest, Staged, StoreError};
use crate::registry::{Content, NewRecord, Origin, Outcome, Registry, RegistryError, now};

/// Where a message comes from and what should happen to it on the server afterwards.
#[derive(Debug, Clone)]
pub struct Source {
    pub origin: Origin,
    /// The acknowledgement to queue with a registration (`seen`, `move:<folder>`), if any.
    pub ack: Option<String>,
    /// The acknowledgement to queue with a quarantine record.
    pub quarantine_ack: Option<String>,
    /// When the bytes were received from the server (RFC 3339), for the audit trail.
    pub fetched_at: Option<String>,
}

/// Limits applied to every message.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Larger messages are quarantined (`too-large`) with their raw bytes kept, not parsed.
    pub max_message_bytes: u64,
    /// A message whose processing failed this many times is quarantined (`poison`).
    pub max_attempts: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 100 * 1024 * 1024,
            max_attempts: 3,
        }
    }
}

/// The stores a message passes through.
#[derive(Clone)]
pub struct Pipeline {
    pub store: Arc<RawStore>,
    pub registry: Registry,
    pub limits: Limits,
}

#[derive(Debug, Clone)]
pub struct Ingested {
    pub outcome: Outcome,
    pub raw_sha256: Sha256Digest,
    pub attachments: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The bytes could not be stored: nothing is committed, nothing may be acknowledged.
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// This message could not be processed this time; it stays unacknowledged and is tried
    /// again (and quarantined after `max_attempts`).
    #[error("processing failed (attempt {attempt} of {max}): {detail}")]
    Failed {
        attempt: u32,
        max: u32,
        detail: String,
    },
}

impl IngestError {
    /// Errors that concern this one message only; the others stop the run.
    pub fn is_message_specific(&self) -> bool {
        matches!(self, IngestError::Failed { .. })
    }

    /// A task that panicked or was cancelled, as a failure of this `attempt`.
    pub fn internal(attempt: u32, max: u32, join: &tokio::task::JoinError) -> IngestError {
        IngestError::Failed {
            attempt,
            max,
            detail: format!("internal error: {join}"),
        }
    }
}

enum Prepared {
    Ready(Box<Submission>),
    Quarantine(&'static str, String),
}

/// Where a preparation puts its blobs: durable one by one, or staged for a batch publish.
struct BlobSink<'a> {
    store: &'a RawStore,
    staged: Option<&'a mut Staged>,
    /// The large attachment being written piece by piece, if any.
    large: Option<BlobWriter>,
}

impl<'a> BlobSink<'a> {
    fn new(store: &'a RawStore, staged: Option<&'a mut Staged>) -> Self {
        BlobSink {
            store,
            staged,
            large: None,
        }
    }

    fn put(&mut self, bytes: &[u8], sha256: Sha256Digest) -> Result<(), StoreError> {
        match self.staged.as_deref_mut() {
            Some(staged) => self.store.stage(bytes, sha256, staged),
            None => self.store.put_with_digest(bytes, sha256),
        }
    }
}

impl parse::AttachmentSink for BlobSink<'_> {
    type Error = StoreError;
    fn attachment(&mut self, bytes: &[u8], sha256: Sha256Digest) -> Result<(), StoreError> {
        self.put(bytes, sha256)
    }

    fn piece(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        let writer = match &mut self.large {
            Some(writer) => writer,
            None => self.large.insert(self.store.writer()?),
        };
        writer.write(bytes)
    }

    fn end(&mut self) -> Result<(Sha256Digest, u64), StoreError> {
        let writer = match self.large.take() {
            Some(writer) => writer,
            // No piece came (the parser never ends an empty part): an empty blob.
            None => self.store.writer()?,
        };
        match self.staged.as_deref_mut() {
            Some(staged) => writer.stage(staged),
            None => writer.finish(),
        }
    }

    fn abandon(&mut self) {
        // Dropping the writer removes its temp file.
        self.large = None;
    }
}

/// How registrations are committed: one transaction per message (the default), or one per
/// fetched batch with one filesystem flush and one acknowledgement for the whole batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CommitMode {
    #[default]
    PerMessage,
    PerBatch,
}

impl CommitMode {
    pub fn parse(s: &str) -> Option<CommitMode> {
        match s {
            "message" => Some(CommitMode::PerMessage),
            "batch" => Some(CommitMode::PerBatch),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CommitMode::PerMessage => "message",
            CommitMode::PerBatch => "batch",
        }
    }
}

fn parse_reason(e: &ParseError) -> &'static str {
    match e {
        ParseError::Empty => "parse:empty",
        ParseError::NoHeaders => "parse:no-headers",
        ParseError::ParserPanicked(_) => "parse:parser-failure",
    }
}

/// A message's raw bytes, owned by whatever received them (a `Vec`, or the IMAP response they
/// arrived in: no copy is made on the way to the store and the parser), and their SHA-256 if it
/// was taken on the way.
pub struct RawMessage {
    bytes: Box<dyn AsRef<[u8]> + Send + Sync>,
    sha256: Option<Sha256Digest>,
}

impl RawMessage {
    pub fn new(bytes: impl AsRef<[u8]> + Send + Sync + 'static) -> RawMessage {
        RawMessage {
            bytes: Box::new(bytes),
            sha256: None,
        }
    }

    /// Takes the SHA-256 now, on the caller's thread: the receiving side hashes a batch while
    /// the previous one is being prepared, so the preparation does not have to.
    pub fn hashed(bytes: impl AsRef<[u8]> + Send + Sync + 'static) -> RawMessage {
        let sha256 = Sha256Digest::of(bytes.as_ref());
        RawMessage {
            bytes: Box::new(bytes),
            sha256: Some(sha256),
        }
    }

    /// The SHA-256 of the bytes: the one taken on receipt, or computed now.
    pub fn sha256(&self) -> Sha256Digest {
        self.sha256.unwrap_or_else(|| Sha256Digest::of(self))
    }
}

impl std::ops::Deref for RawMessage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        (*self.bytes).as_ref()
    }
}

impl From<Vec<u8>> for RawMessage {
    fn from(bytes: Vec<u8>) -> RawMessage {
        RawMessage::new(bytes)
    }
}

/// Stores, parses and registers (or quarantines) one message: [`prepare`] then [`commit`].
pub async fn ingest_one(
    p: &Pipeline,
    raw: impl Into<RawMessage>,
    source: &Source,
) -> Result<Ingested, IngestError> {
    let prepared = prepare(p, raw.into(), source).await?;
    commit(p, prepared, source).await
}

/// A message whose raw bytes and attachments are durable and whose content is known, not yet
/// committed to the registry.
pub struct PreparedMessage {
    digest: Sha256Digest,
    raw_size: u64,
    attempt: u32,
    timeline: [(&'static str, String); 3],
    prepared: Prepared,
}

/// The expensive, parallelisable half: counts the attempt, stores the raw blob durably, parses
/// and stores the attachments. CPU and disk work run on the blocking pool. Nothing here is
/// visible in the registry yet.
pub async fn prepare(
    p: &Pipeline,
    raw: RawMessage,
    source: &Source,
) -> Result<PreparedMessage, IngestError> {
    // Count the attempt before doing anything that could kill the worker.
    let (attempt, poison) = count_attempt(p, source).await?;
    prepare_counted(p, raw, source, attempt, poison).await
}

/// [`prepare`] once the attempt is counted.
async fn prepare_counted(
    p: &Pipeline,
    raw: RawMessage,
    source: &Source,
    attempt: u32,
    poison: Option<String>,
) -> Result<PreparedMessage, IngestError> {
    let fetched_at = source.fetched_at.clone().unwrap_or_else(now);
    let limits = p.limits;
    let store = Arc::clone(&p.store);
    let raw_size = raw.len() as u64;
    let job = tokio::task::spawn_blocking(move || {
        let mut sink = BlobSink::new(&store, None);
        prepare_blocking(&mut sink, &raw, limits, poison)
    });
    let (digest, stored_at, prepared) = settled(p, source, attempt, job.await).await?;
    Ok(PreparedMessage {
        digest,
        raw_size,
        attempt,
        timeline: [
            ("fetched", fetched_at),
            ("stored", stored_at),
            ("parsed", now()),
        ],
        prepared,
    })
}

/// Counts an attempt at this message; past `max_attempts`, the reason to quarantine it as
/// poison. [`prepare`] does this itself; a message fetched in parts is counted before its
/// fetch, for [`prepare_stored`].
pub async fn count_attempt(
    p: &Pipeline,
    source: &Source,
) -> Result<(u32, Option<String>), IngestError> {
    let (attempt, last_error) = match source.origin.location() {
        Some(loc) => p.registry.begin_attempt(loc).await?,
        None => (1, None),
    };
    let poison = (attempt > p.limits.max_attempts).then(|| {
        format!(
            "processing failed {} times; last error: {}",
            attempt - 1,
            last_error
                .as_deref()
                .unwrap_or("the worker died while processing it")
        )
    });
    Ok((attempt, poison))
}

/// [`prepare`] for a message whose raw bytes are already a durable blob, written piece by
/// piece because it was too large to hold ([`RawStore::writer`]); its attempt was counted
/// before the fetch ([`count_attempt`]). Poison, or above the size limit, it is quarantined
/// without being read back. Within the limit (a limit set above what one fetch holds, or a
/// server's RFC822.SIZE that overstated it) it is read back, checked against its digest, and
/// prepared like any other message. A blob that no longer has its digest fails this attempt.
pub async fn prepare_stored(
    p: &Pipeline,
    digest: Sha256Digest,
    raw_size: u64,
    source: &Source,
    attempt: u32,
    poison: Option<String>,
) -> Result<PreparedMessage, IngestError> {
    let quarantine = match poison {
        Some(reason) => Some(("poison", reason)),
        None if raw_size > p.limits.max_message_bytes => Some((
            "too-large",
            format!(
                "{raw_size} bytes, above the limit of {} bytes",
                p.limits.max_message_bytes
            ),
        )),
        None => None,
    };
    if let Some((code, detail)) = quarantine {
        let fetched_at = source.fetched_at.clone().unwrap_or_else(now);
        return Ok(PreparedMessage {
            digest,
            raw_size,
            attempt,
            timeline: [
                ("fetched", fetched_at),
                ("stored", now()),
                ("parsed", now()),
            ],
            prepared: Prepared::Quarantine(code, detail),
        });
    }
    let store = Arc::clone(&p.store);
    let read = tokio::task::spawn_blocking(move || store.get_verified(&digest)).await;
    let bytes = settled(p, source, attempt, read).await?;
    let raw = RawMessage {
        bytes: Box::new(bytes),
        sha256: Some(digest),
    };
    prepare_counted(p, raw, source, attempt, None).await
}

/// [`prepare`] for the messages of a batch committed as one ([`CommitMode::PerBatch`]), in
/// order, on one blocking thread: the attempts were counted for the whole batch (see
/// `Registry::begin_batch_attempts`), and the blobs are staged, to be made durable together by
/// `RawStore::publish` before [`commit_batch`]. A message whose preparation panics fails alone
/// (its failure is recorded against it); a store error (disk full) stops the chunk there, and
/// is returned with what was prepared before it, so that a failure already seen is not lost.
pub async fn prepare_staged(
    p: &Pipeline,
    messages: Vec<(RawMessage, Source)>,
) -> Result<StagedChunk, IngestError> {
    let limits = p.limits;
    let store = Arc::clone(&p.store);
    let job = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
        let mut staged = store.staging()?;
        let mut out = Vec::with_capacity(messages.len());
        let mut stopped = None;
        for (raw, source) in messages {
            let fetched_at = source.fetched_at.clone().unwrap_or_else(now);
            let raw_size = raw.len() as u64;
            let mut sink = BlobSink::new(&store, Some(&mut staged));
            let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                prepare_blocking(&mut sink, &raw, limits, None)
            }));
            let prepared = match attempt {
                Ok(Ok((digest, stored_at, prepared))) => Ok(PreparedMessage {
                    digest,
                    raw_size,
                    attempt: 1,
                    timeline: [
                        ("fetched", fetched_at),
                        ("stored", stored_at),
                        ("parsed", now()),
                    ],
                    prepared,
                }),
                Ok(Err(store_error)) => {
                    stopped = Some(store_error);
                    break;
                }
                Err(panic) => Err(format!("internal error: {}", parse::panic_text(&panic))),
            };
            out.push((source, prepared));
        }
        Ok((out, staged, stopped))
    });
    let (prepared, staged, stopped) = match job.await {
        Ok(Ok(done)) => done,
        Ok(Err(store_error)) => return Err(store_error.into()),
        Err(join) => return Err(IngestError::internal(1, p.limits.max_attempts, &join)),
    };
    let mut out = Vec::with_capacity(prepared.len());
    for (source, result) in prepared {
        let result = match result {
            Ok(message) => Ok(message),
            Err(detail) => Err(failed(p, &source, 1, detail).await),
        };
        out.push((source, result));
    }
    Ok(StagedChunk {
        prepared: out,
        staged,
        stopped: stopped.map(IngestError::from),
    })
}

/// What [`prepare_staged`] did with a chunk of a batch: each message it reached, in order, its
/// staged blobs, and the store error that stopped it before the rest, if any.
pub struct StagedChunk {
    pub prepared: Vec<(Source, Result<PreparedMessage, IngestError>)>,
    pub staged: Staged,
    pub stopped: Option<IngestError>,
}

/// The CPU and disk work of a preparation: raw blob, then poison / size checks, then the parse
/// with attachments going to the blob sink as the parser finds them, without copies.
fn prepare_blocking(
    sink: &mut BlobSink<'_>,
    raw: &RawMessage,
    limits: Limits,
    poison: Option<String>,
) -> Result<(Sha256Digest, String, Prepared), StoreError> {
    // A message's preparation begins; `panic@prepare` makes it panic (as a parser bug would).
    failpoint::hit("prepare");
    let digest = raw.sha256();
    if raw.len() < OVERLAP_BYTES {
        sink.put(raw, digest)?;
        let stored_at = now();
        let examined = examine(sink, raw, &digest, limits, poison)?;
        return Ok((digest, stored_at, examined));
    }
    // Large: the raw blob is written on a second thread while the parse runs on this one. The
    // record still needs both (the caller commits nothing before this returns); if the write
    // fails, what the parse stored is never referred to (staged: removed; durable: `gc`).
    let store = sink.store;
    let staged = sink.staged.is_some();
    let (written, examined) = std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> Result<Option<Staged>, StoreError> {
            // Staged into a set of its own, which the batch's takes over below.
            let mut own = staged.then(|| store.staging()).transpose()?;
            BlobSink::new(store, own.as_mut()).put(raw, digest)?;
            Ok(own)
        });
        let examined = examine(sink, raw, &digest, limits, poison);
        (writer.join(), examined)
    });
    let own = match written {
        Ok(result) => result?,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    if let (Some(own), Some(batch)) = (own, sink.staged.as_deref_mut()) {
        batch.absorb(own);
    }
    let stored_at = now();
    Ok((digest, stored_at, examined?))
}

/// Messages at least this large have their raw blob written beside the parse, not before it.
const OVERLAP_BYTES: usize = 1024 * 1024;

/// Poison and size checks, then the parse, attachments going to `sink` as they are found.
fn examine(
    sink: &mut BlobSink<'_>,
    raw: &[u8],
    digest: &Sha256Digest,
    limits: Limits,
    poison: Option<String>,
) -> Result<Prepared, StoreError> {
    if let Some(reason) = poison {
        return Ok(Prepared::Quarantine("poison", reason));
    }
    let raw_size = raw.len() as u64;
    if raw_size > limits.max_message_bytes {
        let detail = format!(
            "{raw_size} bytes, above the limit of {} bytes",
            limits.max_message_bytes
        );
        return Ok(Prepared::Quarantine("too-large", detail));
    }
    match parse::parse_into(raw, digest, sink) {
        Ok(submission) => Ok(Prepared::Ready(Box::new(submission))),
        Err(parse::ParseWithSinkError::Sink(e)) => Err(e),
        Err(parse::ParseWithSinkError::Parse(e)) => {
            Ok(Prepared::Quarantine(parse_reason(&e), e.to_string()))
        }
    }
}

/// The record a prepared message becomes, with the acknowledgement it queues.
fn record_of<'a>(message: &'a PreparedMessage, source: &'a Source) -> NewRecord<'a> {
    let (content, ack) = match &message.prepared {
        Prepared::Ready(s) => (Content::Registered(s), source.ack.clone()),
        Prepared::Quarantine(code, detail) => (
            Content::Quarantined {
                reason_code: code,
                detail,
            },
            source.quarantine_ack.clone(),
        ),
    };
    NewRecord {
        origin: &source.origin,
        raw_sha256: message.digest,
        raw_size: message.raw_size,
        content,
        ack,
        timeline: &message.timeline,
    }
}

fn ingested(message: &PreparedMessage, outcome: Outcome) -> Ingested {
    Ingested {
        outcome,
        raw_sha256: message.digest,
        attachments: match &message.prepared {
            Prepared::Ready(s) => s.attachments.len(),
            Prepared::Quarantine(..) => 0,
        },
    }
}

/// The ordered half: one registry transaction for the prepared message. Callers commit in
/// the order the messages arrived (UID order), whatever order they were prepared in.
pub async fn commit(
    p: &Pipeline,
    message: PreparedMessage,
    source: &Source,
) -> Result<Ingested, IngestError> {
    // The raw bytes are durable and nothing is committed: the crash point the tests name
    // "after-raw-write", reached in commit order.
    failpoint::hit("after-raw-write");
    let result = p.registry.register(record_of(&message, source)).await;
    match result {
        Ok(outcome) => {
            failpoint::hit("after-commit");
            Ok(ingested(&message, outcome))
        }
        // The database refused this message's data: count it against the message.
        Err(e) if e.is_data_error() && source.origin.location().is_some() => {
            Err(failed(p, source, message.attempt, e.to_string()).await)
        }
        Err(e) => {
            forget_attempt(p, source).await;
            Err(e.into())
        }
    }
}

/// Commits prepared messages (in UID order, blobs already published) in one registry
/// transaction. `Ok(None)`: the batch could not commit as one (another worker recorded one of
/// its locations meanwhile, or the database refused one message's data); nothing of it is
/// committed and the caller commits the messages one by one with [`commit`].
pub async fn commit_batch(
    p: &Pipeline,
    messages: &[(PreparedMessage, Source)],
) -> Result<Option<Vec<Ingested>>, IngestError> {
    failpoint::hit("after-raw-write");
    let records: Vec<NewRecord<'_>> = messages.iter().map(|(m, s)| record_of(m, s)).collect();
    match p.registry.register_batch(&records).await {
        Ok(Some(outcomes)) => {
            failpoint::hit("after-commit");
            Ok(Some(
                messages
                    .iter()
                    .zip(outcomes)
                    .map(|((m, _), outcome)| ingested(m, outcome))
                    .collect(),
            ))
        }
        Ok(None) => Ok(None),
        Err(e) if e.is_data_error() => {
            tracing::warn!(error = %e, "batch refused by the database; committing its messages one by one");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// What a preparation's blocking job came to, for this attempt at the message. A store error
/// is not the message's fault (a full disk, say): the attempt is taken back and the next run
/// retries it. Stored bytes that no longer have their digest, and a panic, count against it.
async fn settled<T>(
    p: &Pipeline,
    source: &Source,
    attempt: u32,
    joined: Result<Result<T, StoreError>, tokio::task::JoinError>,
) -> Result<T, IngestError> {
    match joined {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(e)) if e.action == "verify" => Err(failed(p, source, attempt, e.to_string()).await),
        Ok(Err(e)) => {
            forget_attempt(p, source).await;
            Err(e.into())
        }
        Err(join) => {
            let detail = format!("internal error: {join}");
            Err(failed(p, source, attempt, detail).await)
        }
    }
}

/// Records that this attempt at the message failed on the message's own account (counted
/// towards `max_attempts`), and the error that says so.
pub(crate) async fn failed(
    p: &Pipeline,
    source: &Source,
    attempt: u32,
    detail: String,
) -> IngestError {
    if let Some(loc) = source.origin.location()
        && let Err(e) = p.registry.record_failure(loc, &detail).await
    {
        return e.into();
    }
    IngestError::Failed {
        attempt,
        max: p.limits.max_attempts,
        detail,
    }
}

/// Takes back the attempt counted for this message (it was not its fault); a failure to do so
/// is logged.
pub(crate) async fn forget_attempt(p: &Pipeline, source: &Source) {
    if let Some(loc) = source.origin.location()
        && let Err(e) = p.registry.forget_attempt(loc).await
    {
        tracing::warn!(error = %e, uid = loc.uid, "could not take back a processing attempt");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::{base64_lines, payload};

    async fn pipeline(dir: &std::path::Path, max_message_bytes: u64) -> Pipeline {
        let registry = Registry::open(&format!("sqlite://{}/registry.sqlite3", dir.display()))
            .await
            .unwrap();
        Pipeline {
            store: Arc::new(RawStore::open(dir).unwrap()),
            registry,
            limits: Limits {
                max_message_bytes,
                ..Limits::default()
            },
        }
    }

    fn import(name: &str) -> Source {
        Source {
            origin: Origin::Import {
                label: "test".into(),
                source_ref: name.into(),
            },
            ack: None,
            quarantine_ack: None,
            fetched_at: None,
        }
    }

    const MESSAGE: &[u8] =
        b"From: a@example.cz\r\nTo: podatelna@urad.example\r\nSubject: parts\r\n\
MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\
Content-Type: text/plain\r\n\r\nbody\r\n--b\r\nContent-Type: application/pdf\r\n\
Content-Disposition: attachment; filename=a.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n\
JVBERi0xLjQK\r\n--b--\r\n";

    fn written_in_parts(p: &Pipeline, bytes: &[u8]) -> (Sha256Digest, u64) {
        let mut writer = p.store.writer().unwrap();
        for part in bytes.chunks(50) {
            writer.write(part).unwrap();
        }
        writer.finish().unwrap()
    }

    #[tokio::test]
    async fn a_stored_message_within_the_limit_is_read_back_and_registered() {
        let dir = tempfile::tempdir().unwrap();
        let p = pipeline(dir.path(), 1 << 20).await;
        let (digest, len) = written_in_parts(&p, MESSAGE);
        let source = import("within");
        let prepared = prepare_stored(&p, digest, len, &source, 1, None)
            .await
            .unwrap();
        let done = commit(&p, prepared, &source).await.unwrap();
        assert!(
            matches!(done.outcome, Outcome::Registered { .. }),
            "{done:?}"
        );
        assert_eq!(done.attachments, 1);
        assert_eq!(done.raw_sha256, Sha256Digest::of(MESSAGE));
        let pdf = Sha256Digest::of(b"%PDF-1.4\n");
        assert_eq!(p.store.get(&pdf).unwrap(), b"%PDF-1.4\n");
    }

    #[tokio::test]
    async fn a_stored_message_above_the_limit_or_poison_is_quarantined_without_being_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = pipeline(dir.path(), 100).await;
        let (digest, len) = written_in_parts(&p, MESSAGE);
        // Not read back: even a blob gone since would not be noticed here (the commit and the
        // reconciling tests check the bytes).
        std::fs::remove_file(p.store.path_of(&digest)).unwrap();
        for (name, limit, poison, code) in [
            ("above", 100, None, "too-large"),
            (
                "poison",
                1 << 20,
                Some("failed 3 times".to_owned()),
                "poison",
            ),
        ] {
            let p = Pipeline {
                limits: Limits {
                    max_message_bytes: limit,
                    ..p.limits
                },
                ..p.clone()
            };
            let source = import(name);
            let prepared = prepare_stored(&p, digest, len, &source, 4, poison)
                .await
                .unwrap();
            assert!(
                matches!(&prepared.prepared, Prepared::Quarantine(c, _) if *c == code),
                "{name}"
            );
            if name == "above" {
                let done = commit(&p, prepared, &source).await.unwrap();
                assert!(
                    matches!(done.outcome, Outcome::Quarantined { .. }),
                    "{done:?}"
                );
            }
        }
        let rows = p.registry.list(None, 10).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].reason_code.as_deref(), Some("too-large"));
        assert_eq!(rows[0].raw_size, len);
    }

    /// A message with a 3 MB base64 PDF, which the parse hands over a MiB at a time.
    fn with_large_pdf() -> (Vec<u8>, Vec<u8>) {
        let pdf = payload(3_000_000, 7);
        let raw = format!(
            "From: a@example.cz\r\nMessage-ID: <large@x>\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n\
body\r\n--b\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n\
{}\r\n--b--\r\n",
            base64_lines(&pdf)
        );
        (raw.into_bytes(), pdf)
    }

    fn temp_files(dir: &std::path::Path) -> Vec<String> {
        std::fs::read_dir(dir.join("tmp"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".lock"))
            .collect()
    }

    #[tokio::test]
    async fn a_large_attachment_written_in_pieces_is_stored_durably_or_staged_and_published() {
        let (raw, pdf) = with_large_pdf();
        let pdf_digest = Sha256Digest::of(&pdf);

        // One by one: durable before the commit.
        let dir = tempfile::tempdir().unwrap();
        let p = pipeline(dir.path(), 1 << 30).await;
        let done = ingest_one(&p, raw.clone(), &import("one")).await.unwrap();
        assert!(
            matches!(done.outcome, Outcome::Registered { .. }),
            "{done:?}"
        );
        assert_eq!(done.attachments, 1);
        assert_eq!(p.store.get(&pdf_digest).unwrap(), pdf);
        assert_eq!(temp_files(dir.path()), Vec::<String>::new());

        // In a batch: staged, and under its name only once published.
        let dir = tempfile::tempdir().unwrap();
        let p = pipeline(dir.path(), 1 << 30).await;
        let chunk = prepare_staged(&p, vec![(RawMessage::hashed(raw), import("batch"))])
            .await
            .unwrap();
        assert!(chunk.stopped.is_none());
        // The raw message and the PDF.
        assert_eq!(chunk.staged.len(), 2);
        assert!(!p.store.path_of(&pdf_digest).exists());
        p.store.publish(chunk.staged).unwrap();
        assert_eq!(p.store.get(&pdf_digest).unwrap(), pdf);
        assert_eq!(temp_files(dir.path()), Vec::<String>::new());
        let (source, prepared) = chunk.prepared.into_iter().next().unwrap();
        let prepared = prepared.unwrap();
        let done = commit_batch(&p, &[(prepared, source)])
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(done[0].outcome, Outcome::Registered { .. }));
        let row = &p.registry.list(None, 10).await.unwrap()[0];
        let attachments = p.registry.attachments(row.id).await.unwrap();
        assert_eq!(attachments[0].sha256, pdf_digest.to_hex());
        assert_eq!(attachments[0].size, pdf.len() as u64);
    }

    #[tokio::test]
    async fn a_stored_message_that_changed_on_disk_is_not_registered() {
        let dir = tempfile::tempdir().unwrap();
        let p = pipeline(dir.path(), 1 << 20).await;
        let (digest, len) = written_in_parts(&p, MESSAGE);
        let mut damaged = MESSAGE.to_vec();
        damaged[10] ^= 1;
        std::fs::write(p.store.path_of(&digest), &damaged).unwrap();
        let err = prepare_stored(&p, digest, len, &import("damaged"), 1, None)
            .await
            .err()
            .unwrap();
        // This message's failure (counted towards poison), not one that stops the run.
        assert!(err.is_message_specific(), "{err}");
        assert!(err.to_string().contains("now have SHA-256"), "{err}");
        assert!(p.registry.list(None, 10).await.unwrap().is_empty());
    }
}
