//! One poll of one mailbox: token → login → SELECT/UIDVALIDITY → pending acks → candidates →
//! messages too large to hold, fetched in parts → batched `BODY.PEEK[]` fetches → prepare and
//! commit each → acks for what was committed.
//!
//! Invariant: a message is acknowledged on the server (`\Seen` or moved) only after its
//! registration committed, and it is registered at most once per (mailbox, folder, UIDVALIDITY,
//! UID). A crash anywhere leaves it registered (its ack row will be replayed) or untouched.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::{AfterAction, Config, MailboxConfig};
use crate::credentials::{CredentialError, Credentials};
use crate::failpoint;
use crate::imap::{Candidates, Endpoint, ImapError, MailSession};
use crate::pipeline::{
    CommitMode, IngestError, Ingested, Pipeline, RawMessage, Source, commit, commit_batch, prepare,
    prepare_staged,
};
use crate::registry::{Location, Origin, Outcome, RegistryError, UidValidityCheck};

/// Everything a poll needs, shared by all mailbox tasks.
#[derive(Clone)]
pub struct Context {
    pub config: Arc<Config>,
    pub credentials: Credentials,
    pub pipeline: Pipeline,
    /// Bounds the IMAP sessions open at once (`[imap] max_sessions`).
    pub sessions: Arc<tokio::sync::Semaphore>,
}

/// What one poll did.
#[derive(Debug, Default, Clone)]
pub struct PollReport {
    pub uidvalidity: u32,
    pub candidates: usize,
    pub registered: usize,
    /// Kept raw with a reason (unparseable, too large, poison), acknowledged like the others.
    pub quarantined: usize,
    /// Bytes already recorded under another UID/folder/UIDVALIDITY: linked, not registered again.
    pub linked: usize,
    pub already_registered: usize,
    pub acked: usize,
    /// UIDs the server listed but did not return when fetched (expunged meanwhile).
    pub vanished: Vec<u32>,
    /// Messages that could not be registered, with the reason. They stay unacknowledged.
    pub failed: Vec<(u32, String)>,
    /// Registered messages whose acknowledgement the server refused (NO), with its answer. The
    /// acknowledgement stays pending and is tried again by the next poll.
    pub unacknowledged: Vec<(u32, String)>,
    /// True when shutdown was requested and the poll stopped early.
    pub interrupted: bool,
}

impl PollReport {
    pub fn is_complete_success(&self) -> bool {
        self.failed.is_empty() && self.unacknowledged.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("mailbox {mailbox}: cannot get a token: {source}")]
    Credential {
        mailbox: String,
        source: CredentialError,
    },
    #[error("mailbox {mailbox}: {source}")]
    Imap { mailbox: String, source: ImapError },
    #[error("mailbox {mailbox}: {source}")]
    Registry {
        mailbox: String,
        source: RegistryError,
    },
    #[error("mailbox {mailbox}: {source}")]
    Ingest {
        mailbox: String,
        source: IngestError,
    },
    /// The poll panicked (a bug). What it committed stays committed; what it did not is still
    /// unseen on the server, and the next poll takes it up again.
    #[error("mailbox {mailbox}: the poll failed with an internal error (a bug): {detail}")]
    Panicked { mailbox: String, detail: String },
}

impl PollError {
    pub fn is_transient(&self) -> bool {
        match self {
            PollError::Credential { source, .. } => source.is_transient(),
            PollError::Imap { source, .. } => source.is_transient(),
            PollError::Registry { source, .. } => source.is_transient(),
            // A database that went away mid-run is as temporary as at the start.
            PollError::Ingest {
                source: IngestError::Registry(e),
                ..
            } => e.is_transient(),
            PollError::Ingest { .. } | PollError::Panicked { .. } => false,
        }
    }
}

struct Poller<'a> {
    ctx: &'a Context,
    mb: &'a MailboxConfig,
    /// See [`PollReport::unacknowledged`]; filled by whichever task performs acknowledgements.
    refused_acks: std::sync::Mutex<Vec<(u32, String)>>,
    /// Acknowledgements the server confirmed whose rows are not deleted yet.
    done_acks: std::sync::Mutex<DoneAcks>,
}

/// Acknowledgements performed on the server, deleted from the registry (each with its audit
/// event) in one transaction per [`DoneAcks::FLUSH_AT`] of them and at the end of the poll,
/// instead of one transaction per batch (moves: at once, see [`drain_acks`]). Until then they
/// are skipped when the pending ones are read. A crash before the deletion leaves their rows
/// pending: the next poll performs them again, which changes nothing on the server (`\Seen` is
/// set again), and then deletes them, as after a crash between an acknowledgement and its
/// deletion without this deferral.
/// Groups of (`acked` or `ack-dropped`, when, what). Only the fetcher performs and records
/// acknowledgements, one after the other, so a group is here until its rows are deleted.
#[derive(Default)]
struct DoneAcks(Vec<(&'static str, String, Vec<crate::registry::PendingAck>)>);

impl DoneAcks {
    const FLUSH_AT: usize = 1000;

    fn acks(&self) -> impl Iterator<Item = &crate::registry::PendingAck> {
        self.0.iter().flat_map(|(_, _, acks)| acks)
    }
}

impl Poller<'_> {
    fn imap(&self) -> impl FnOnce(ImapError) -> PollError + '_ {
        |source| PollError::Imap {
            mailbox: self.mb.id.clone(),
            source,
        }
    }

    fn ingest(&self) -> impl FnOnce(IngestError) -> PollError + '_ {
        |source| PollError::Ingest {
            mailbox: self.mb.id.clone(),
            source,
        }
    }

    /// A blocking task of this poll that panicked (a bug), as an ingest error.
    fn internal(&self) -> impl FnOnce(tokio::task::JoinError) -> PollError + '_ {
        |join| {
            let max = self.ctx.pipeline.limits.max_attempts;
            self.ingest()(IngestError::internal(0, max, &join))
        }
    }

    fn reg(&self) -> impl FnOnce(RegistryError) -> PollError + '_ {
        |source| PollError::Registry {
            mailbox: self.mb.id.clone(),
            source,
        }
    }
}

/// Polls one mailbox once. Returns early (between messages) when `cancel` fires.
pub async fn poll_mailbox(
    ctx: &Context,
    mb: &MailboxConfig,
    cancel: &CancellationToken,
) -> Result<PollReport, PollError> {
    let p = Poller {
        ctx,
        mb,
        refused_acks: std::sync::Mutex::new(Vec::new()),
        done_acks: std::sync::Mutex::new(DoneAcks::default()),
    };
    // Closed only on shutdown, which the caller handles; a closed semaphore means "go on".
    let _permit = ctx.sessions.acquire().await.ok();
    let login = ctx
        .credentials
        .login(&mb.credential, &mb.address)
        .await
        .map_err(|source| PollError::Credential {
            mailbox: mb.id.clone(),
            source,
        })?;
    let endpoint = Endpoint {
        host: &mb.host,
        port: mb.port,
        tls: mb.tls,
        ca_file: mb.ca_file.as_deref(),
        connect_timeout: ctx.config.imap.connect_timeout,
        io_timeout: ctx.config.imap.io_timeout,
    };
    let connecting = std::time::Instant::now();
    let mut session = match MailSession::connect(&endpoint, &login).await {
        Ok(s) => {
            tracing::debug!(mailbox = %mb.id, ms = connecting.elapsed().as_secs_f64() * 1e3, "logged in");
            s
        }
        Err(e) => {
            if matches!(e, ImapError::AuthFailed { .. }) {
                // The token may be stale or revoked: ask for a new one next time.
                ctx.credentials.invalidate(&mb.credential).await;
            }
            return Err(p.imap()(e));
        }
    };
    let mut result = poll_session(&p, &mut session, cancel).await;
    session.logout().await;
    if let Err(e) = record_done_acks(&p).await {
        // Their rows stay pending; the next poll performs them again and deletes them.
        if result.is_ok() {
            tracing::warn!(mailbox = %mb.id, error = %e, "confirmed acknowledgements not deleted; the next poll repeats them");
        } else {
            tracing::debug!(mailbox = %mb.id, error = %e, "confirmed acknowledgements not deleted");
        }
    }
    if let (Ok(report), Ok(mut refused)) = (&mut result, p.refused_acks.lock()) {
        report.unacknowledged = std::mem::take(&mut *refused);
    }
    result
}

async fn poll_session(
    p: &Poller<'_>,
    session: &mut MailSession,
    cancel: &CancellationToken,
) -> Result<PollReport, PollError> {
    let mb = p.mb;
    let registry = &p.ctx.pipeline.registry;
    // An `after = "move:…"` the server cannot perform safely fails the poll before anything is
    // registered: registered first, every message would wait on an acknowledgement that cannot
    // happen. (A quarantine move is rare: its acknowledgement is kept and reported instead,
    // without stopping intake.)
    if let AfterAction::Move(folder) = &mb.after
        && !session.can_move()
    {
        return Err(PollError::Imap {
            mailbox: mb.id.clone(),
            source: crate::imap::ImapError::CannotMove {
                folder: folder.clone(),
                key: "after",
            },
        });
    }
    let selecting = std::time::Instant::now();
    let selected = session.select(&mb.folder).await.map_err(p.imap())?;
    tracing::debug!(mailbox = %mb.id, ms = selecting.elapsed().as_secs_f64() * 1e3, "folder selected");
    let mut report = PollReport {
        uidvalidity: selected.uidvalidity,
        ..PollReport::default()
    };
    match registry
        .check_uidvalidity(&mb.id, &mb.folder, &mb.address, selected.uidvalidity)
        .await
        .map_err(p.reg())?
    {
        UidValidityCheck::Changed { previous } => tracing::warn!(
            mailbox = %mb.id,
            folder = %mb.folder,
            previous,
            current = selected.uidvalidity,
            "UIDVALIDITY changed: the folder is scanned again from its first message"
        ),
        UidValidityCheck::First => tracing::info!(
            mailbox = %mb.id,
            folder = %mb.folder,
            uidvalidity = selected.uidvalidity,
            "first poll of this folder: every message in it will be registered"
        ),
        UidValidityCheck::Unchanged => {}
    }

    // Acknowledgements left over from an interrupted run come first.
    report.acked += drain_acks(p, session, selected.uidvalidity).await?;

    let high_water = registry
        .mailbox_state(&mb.id, &mb.folder)
        .await
        .map_err(p.reg())?
        .map(|s| s.high_water_uid)
        .unwrap_or(0);
    let listing = std::time::Instant::now();
    let Candidates {
        uids: candidates,
        unseen,
    } = session.candidates(high_water).await.map_err(p.imap())?;
    tracing::debug!(mailbox = %mb.id, candidates = candidates.len(), ms = listing.elapsed().as_secs_f64() * 1e3, "candidates listed");
    report.candidates = candidates.len();
    let done = registry
        .known_uids(&mb.id, &mb.folder, selected.uidvalidity, &candidates)
        .await
        .map_err(p.reg())?;
    report.already_registered = done.len();
    let lost: Vec<u32> = unseen.into_iter().filter(|u| done.contains(u)).collect();
    report.acked += repeat_lost_acks(p, session, selected.uidvalidity, &lost).await?;
    let todo: Vec<u32> = candidates
        .iter()
        .copied()
        .filter(|u| !done.contains(u))
        .collect();

    let mut registered: HashSet<u32> = done;
    if !todo.is_empty() {
        let sizes = session.sizes(&todo).await.map_err(p.imap())?;
        // A message above the size limit, or larger than one response can hold, is fetched in
        // parts straight into a blob after the batches (see `take_in_parts`): one such message
        // in trouble holds up no other mail. Every UID is registered on its own, so the order
        // changes nothing else.
        let in_parts_above = p
            .ctx
            .pipeline
            .limits
            .max_message_bytes
            .min(crate::imap::MAX_FETCH_BYTES);
        // So is a message that was in a fetch the server failed before (it dropped the
        // connection or stopped answering, as Dovecot does when a message's file is damaged):
        // the failed batch's messages are taken one by one after the others, fewest failures
        // first, so that the one the server cannot serve holds up nothing but itself.
        let failures = registry
            .fetch_failures(&mb.id, &mb.folder, selected.uidvalidity, &todo)
            .await
            .map_err(p.reg())?;
        let (sizes, mut large): (Vec<_>, Vec<_>) = sizes.into_iter().partition(|(uid, size)| {
            u64::from(*size) <= in_parts_above && !failures.contains_key(uid)
        });
        large.sort_by_key(|(uid, _)| (failures.get(uid).copied().unwrap_or(0), *uid));
        let tuning = &p.ctx.config.imap;
        let plan = batches(&sizes, tuning.batch_max_messages, tuning.batch_max_bytes);
        // The next batches are fetched while this one is processed. Memory is bounded by bytes:
        // a batch is fetched only once its size fits in the budget beside the batches fetched
        // and not yet prepared (this one included), and by count: at most two wait in between.
        // Acknowledgements go through the fetcher (it owns the session) and are served while it
        // waits.
        let budget = FetchBudget::new(tuning.in_flight_max_bytes);
        let (batch_tx, batch_rx) = mpsc::channel(2);
        let (ack_tx, ack_rx) = mpsc::channel(1);
        let uidvalidity = selected.uidvalidity;
        let fetcher = fetch_batches(
            p,
            session,
            plan,
            &budget,
            batch_tx,
            ack_rx,
            uidvalidity,
            cancel,
        );
        let processor = async {
            match p.ctx.config.commit {
                CommitMode::PerMessage => {
                    process_batches(
                        p,
                        batch_rx,
                        ack_tx,
                        uidvalidity,
                        &mut report,
                        &mut registered,
                        cancel,
                    )
                    .await
                }
                CommitMode::PerBatch => {
                    process_batches_pipelined(
                        p,
                        batch_rx,
                        ack_tx,
                        uidvalidity,
                        &mut report,
                        &mut registered,
                        cancel,
                    )
                    .await
                }
            }
        };
        let (fetched, processed) = tokio::join!(fetcher, processor);
        processed?;
        fetched?;
        if !report.interrupted {
            take_in_parts(
                p,
                session,
                selected.uidvalidity,
                &large,
                &mut report,
                &mut registered,
                cancel,
            )
            .await?;
        }
    }

    // The high-water mark only moves over an unbroken run of registered UIDs, so a message
    // that failed (or that FETCH did not return) stays above it and is looked at again even if
    // someone reads it meanwhile. A UID really expunged is no candidate next time.
    let mut new_high = high_water;
    for uid in &candidates {
        if registered.contains(uid) {
            new_high = new_high.max(*uid);
        } else {
            break;
        }
    }
    if new_high > high_water {
        registry
            .advance_high_water(&mb.id, &mb.folder, selected.uidvalidity, new_high)
            .await
            .map_err(p.reg())?;
    }
    if !report.interrupted {
        forget_messages_gone(p, session, selected.uidvalidity, &candidates).await;
    }
    tracing::info!(
        mailbox = %mb.id,
        candidates = report.candidates,
        registered = report.registered,
        quarantined = report.quarantined,
        linked = report.linked,
        already_registered = report.already_registered,
        acked = report.acked,
        failed = report.failed.len(),
        high_water = new_high,
        "poll finished"
    );
    Ok(report)
}

/// Forgets the processing attempts and failed fetches of messages that are no longer in the
/// folder: rows of an earlier UIDVALIDITY, and rows of UIDs that this poll did not list and the
/// server says are gone (expunged or moved away after they failed). A failed message stays
/// above the high-water mark, so while it exists it is always a candidate; one that is not was
/// registered or is gone, and [`MailSession::present`] (a checked NOOP first) tells which, so
/// a dead session never passes for an empty folder. Housekeeping only: a failure here is
/// logged and does not fail the poll.
async fn forget_messages_gone(
    p: &Poller<'_>,
    session: &mut MailSession,
    uidvalidity: u32,
    candidates: &[u32],
) {
    let mb = p.mb;
    let registry = &p.ctx.pipeline.registry;
    let outcome = async {
        let rows = registry
            .attempted(&mb.id, &mb.folder)
            .await
            .map_err(|e| e.to_string())?;
        let (mut gone, current): (Vec<_>, Vec<_>) =
            rows.into_iter().partition(|(v, _)| *v != uidvalidity);
        let unlisted: Vec<u32> = current
            .into_iter()
            .map(|(_, uid)| uid)
            .filter(|uid| candidates.binary_search(uid).is_err())
            .collect();
        let present = session
            .present(&unlisted)
            .await
            .map_err(|e| e.to_string())?;
        gone.extend(
            unlisted
                .into_iter()
                .filter(|uid| !present.contains(uid))
                .map(|uid| (uidvalidity, uid)),
        );
        let forgotten = registry
            .forget_attempts_of_gone(&mb.id, &mb.folder, &gone)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((gone, forgotten))
    };
    match outcome.await {
        Ok((_, 0)) => {}
        Ok((gone, forgotten)) => tracing::info!(
            mailbox = %mb.id,
            folder = %mb.folder,
            forgotten,
            messages = ?gone,
            "forgot the failures of messages no longer in the folder (uidvalidity, uid)"
        ),
        Err(error) => tracing::warn!(
            mailbox = %mb.id,
            folder = %mb.folder,
            %error,
            "could not look for failed messages that are no longer in the folder"
        ),
    }
}

/// Where message `uid` of this mailbox's folder comes from, and what to do with it afterwards.
fn source_of(mb: &MailboxConfig, uidvalidity: u32, uid: u32, fetched_at: String) -> Source {
    Source {
        origin: Origin::Imap(Location {
            mailbox_id: mb.id.clone(),
            folder: mb.folder.clone(),
            uidvalidity,
            uid,
        }),
        ack: ack_action(&mb.after),
        quarantine_ack: ack_action(&mb.after_quarantine),
        fetched_at: Some(fetched_at),
    }
}

/// The part size for messages fetched in parts: one response of this size is held at a time.
const PART_BYTES: u32 = 8 * 1024 * 1024;

/// Takes the messages too large to hold, and those in a fetch the server failed before (UID,
/// RFC822.SIZE), one at a time, in the order given (fewest failed fetches first). Each attempt is
/// counted before its fetch; the message is fetched in parts into a blob ([`fetch_into_blob`]),
/// committed like any other (`too-large` above the limit, see
/// [`crate::pipeline::prepare_stored`]), and acknowledged after its commit. A message the server
/// will not hand over whole (an error answer to its fetch, fewer or more bytes than its size)
/// fails alone: it is reported, left unseen, and tried again at the next poll; after
/// `max_attempts` the bytes fetched are quarantined as poison. After an error answer the
/// remaining large messages wait for the next poll (the session may be unusable). A connection
/// or disk failure stops the poll, and then the attempt is taken back.
async fn take_in_parts(
    p: &Poller<'_>,
    session: &mut MailSession,
    uidvalidity: u32,
    large: &[(u32, u32)],
    report: &mut PollReport,
    registered: &mut HashSet<u32>,
    cancel: &CancellationToken,
) -> Result<(), PollError> {
    let mb = p.mb;
    let pipeline = &p.ctx.pipeline;
    let mut outcomes = Outcomes {
        mb,
        report: &mut *report,
        registered: &mut *registered,
    };
    let mut committed = false;
    let mut stop = None;
    for &(uid, size) in large {
        if cancel.is_cancelled() {
            outcomes.report.interrupted = true;
            break;
        }
        let source = source_of(mb, uidvalidity, uid, crate::registry::now());
        let (attempt, poison) = match crate::pipeline::count_attempt(pipeline, &source).await {
            Ok(counted) => counted,
            Err(e) => {
                stop = Some(p.ingest()(e));
                break;
            }
        };
        let started = std::time::Instant::now();
        let mut session_spent = false;
        let parts = fetch_into_blob(p, session, uid, size, cancel).await;
        let result = match parts {
            Ok(Parts::Stored(digest, len)) if poison.is_some() || whole(len, size) => {
                tracing::info!(mailbox = %mb.id, uid, size = len, ms = started.elapsed().as_secs_f64() * 1e3, "large message fetched in parts");
                match crate::pipeline::prepare_stored(
                    pipeline, digest, len, &source, attempt, poison,
                )
                .await
                {
                    Ok(message) => commit(pipeline, message, &source).await,
                    Err(e) => Err(e),
                }
            }
            Ok(Parts::Stored(_, len)) => {
                let detail = format!(
                    "fetched {len} bytes in parts, but the server gives its size as {size} \
                     (a cut-short answer, or a size the server only estimates)"
                );
                Err(crate::pipeline::failed(pipeline, &source, attempt, detail).await)
            }
            Ok(Parts::Refused(detail)) => {
                Err(crate::pipeline::failed(pipeline, &source, attempt, detail).await)
            }
            Ok(Parts::Failed(detail)) => {
                // Counted against this message; the session may be in no state for another.
                session_spent = true;
                note_fetch_failure(p, uidvalidity, &[uid], &detail).await;
                Err(crate::pipeline::failed(pipeline, &source, attempt, detail).await)
            }
            Ok(Parts::Vanished) => {
                crate::pipeline::forget_attempt(pipeline, &source).await;
                tracing::warn!(mailbox = %mb.id, uid, "listed message was not returned by FETCH (expunged meanwhile?)");
                outcomes.report.vanished.push(uid);
                continue;
            }
            Ok(Parts::Cancelled) => {
                crate::pipeline::forget_attempt(pipeline, &source).await;
                outcomes.report.interrupted = true;
                break;
            }
            Err(e) => {
                crate::pipeline::forget_attempt(pipeline, &source).await;
                // The connection failed while the server was sending this message: next time
                // it comes after the others (it may be the server's trouble with this one).
                if let PollError::Imap { source: imap, .. } = &e {
                    note_fetch_failure(p, uidvalidity, &[uid], &imap.to_string()).await;
                }
                stop = Some(e);
                break;
            }
        };
        committed |= result.is_ok();
        if let Err(e) = outcomes.note(uid, result) {
            stop = Some(p.ingest()(e));
            break;
        }
        if session_spent {
            break;
        }
    }
    if committed {
        match drain_acks(p, session, uidvalidity).await {
            Ok(acked) => report.acked += acked,
            // The poll fails anyway: what committed is acknowledged by the next run.
            Err(ack_error) if stop.is_some() => {
                tracing::warn!(mailbox = %mb.id, error = %ack_error, "acknowledgements left for the next run");
            }
            Err(ack_error) => return Err(ack_error),
        }
    }
    stop.map_or(Ok(()), Err)
}

/// Whether `len` bytes fetched in parts are the whole of a message the server sizes at `size`.
/// A message that fits in one part came in one answer, shorter than asked, which is its end
/// (RFC 3501 partial fetch): as in a batch, whatever its RFC822.SIZE says, which some servers
/// only estimate (Exchange). A message sized over one part must come to exactly its size: its
/// end is where the size says, and a shorter answer is one cut short.
fn whole(len: u64, size: u32) -> bool {
    len == u64::from(size) || (size <= PART_BYTES && len < u64::from(PART_BYTES))
}

/// What fetching a message in parts came to.
enum Parts {
    /// Every part is in a durable blob: its digest and length.
    Stored(crate::raw_store::Sha256Digest, u64),
    /// The message is no longer on the server.
    Vanished,
    /// The server would not hand it over whole: why.
    Refused(String),
    /// The server answered its fetch with an error (NO, BAD, a response the client could not
    /// read): why. The session may be unusable for the rest of the poll.
    Failed(String),
    /// Shutdown between parts.
    Cancelled,
}

/// The blob being written in parts: free, or writing the previous part on a blocking thread.
enum WriteSlot {
    Idle(crate::raw_store::BlobWriter),
    Busy(
        tokio::task::JoinHandle<Result<crate::raw_store::BlobWriter, crate::raw_store::StoreError>>,
    ),
}

impl WriteSlot {
    /// The writer, once the write in progress (if any) is done.
    async fn settle(
        self,
    ) -> Result<
        Result<crate::raw_store::BlobWriter, crate::raw_store::StoreError>,
        tokio::task::JoinError,
    > {
        match self {
            WriteSlot::Idle(writer) => Ok(Ok(writer)),
            WriteSlot::Busy(writing) => writing.await,
        }
    }
}

/// Fetches message `uid` in parts of [`PART_BYTES`] into a new blob and makes it durable; the
/// part shorter than [`PART_BYTES`] is the last. `advertised` is the server's RFC822.SIZE: a part
/// past the end answered with no bytes at all, instead of an empty string, is the end only
/// where the size matches, and a server that keeps sending beyond twice that size is stopped.
/// A part that brings nothing else is looked up: a message still on the server was refused
/// (async-imap ends a FETCH quietly on the server's NO). Connection and disk failures are
/// errors; what concerns this message alone is a [`Parts`] outcome. Whatever does not end in
/// [`Parts::Stored`] leaves no file behind.
async fn fetch_into_blob(
    p: &Poller<'_>,
    session: &mut MailSession,
    uid: u32,
    advertised: u32,
    cancel: &CancellationToken,
) -> Result<Parts, PollError> {
    let store = Arc::clone(&p.ctx.pipeline.store);
    let stored = |source| p.ingest()(IngestError::Store(source));
    let at_most = u64::from(advertised) * 2 + u64::from(PART_BYTES);
    let writer = tokio::task::spawn_blocking(move || store.writer())
        .await
        .map_err(p.internal())?
        .map_err(stored)?;
    // Each part is written on a blocking thread while the next one is fetched.
    let mut slot = WriteSlot::Idle(writer);
    let mut offset = 0u64;
    loop {
        if cancel.is_cancelled() {
            return Ok(Parts::Cancelled);
        }
        if offset > at_most {
            return Ok(Parts::Refused(format!(
                "the server sent {offset} bytes and more of a message whose size it gives as {advertised}"
            )));
        }
        let part = match session.fetch_part(uid, offset, PART_BYTES).await {
            Ok(part) => part,
            Err(e) if e.is_transient() => return Err(p.imap()(e)),
            Err(e) => return Ok(Parts::Failed(e.to_string())),
        };
        let Some(part) = part else {
            if offset > 0 && offset == u64::from(advertised) {
                break;
            }
            return match session.present(&[uid]).await {
                Ok(found) if found.is_empty() => Ok(Parts::Vanished),
                Ok(_) => Ok(Parts::Refused(format!(
                    "the server returned no bytes of it from offset {offset} (it refused the partial fetch?)"
                ))),
                Err(e) if e.is_transient() => Err(p.imap()(e)),
                Err(e) => Ok(Parts::Failed(e.to_string())),
            };
        };
        let len = part.raw().len();
        if len > PART_BYTES as usize {
            return Ok(Parts::Refused(format!(
                "asked for {PART_BYTES} bytes from offset {offset}, the server sent {len}: it ignores partial fetches"
            )));
        }
        offset += len as u64;
        let mut writer = slot.settle().await.map_err(p.internal())?.map_err(stored)?;
        if !writer.is_empty() {
            failpoint::hit("between-parts");
        }
        slot = WriteSlot::Busy(tokio::task::spawn_blocking(move || {
            writer.write(part.raw()).map(|()| writer)
        }));
        if len < PART_BYTES as usize {
            break;
        }
    }
    let writer = slot.settle().await.map_err(p.internal())?.map_err(stored)?;
    let (digest, len) = tokio::task::spawn_blocking(move || writer.finish())
        .await
        .map_err(p.internal())?
        .map_err(stored)?;
    Ok(Parts::Stored(digest, len))
}

/// A fetched batch on its way from the fetcher to the processor. Its messages are being hashed
/// on a blocking thread meanwhile: off the fetcher's path, which is the longer one once the
/// fetch itself is most of it, and beside the processor's attempt transaction.
struct FetchedBatch {
    asked: Vec<u32>,
    /// The UIDs the server returned, in order.
    uids: Vec<u32>,
    /// Asked for, not returned, and still in the mailbox (see [`withheld`]).
    withheld: Vec<u32>,
    hashing: tokio::task::JoinHandle<Vec<Received>>,
    fetched_at: String,
    /// Its share of the in-flight byte budget, given back once its raw bytes are dropped.
    budget: tokio::sync::OwnedSemaphorePermit,
}

impl FetchedBatch {
    /// What both processing loops do first with a batch handed over: pass the `after-fetch`
    /// crash point, report the messages it lacks, and make the batch's work.
    fn arrived<'a, 'b>(
        &self,
        p: &'a Poller<'b>,
        uidvalidity: u32,
        report: &mut PollReport,
    ) -> Batch<'a, 'b> {
        failpoint::hit("after-fetch");
        self.note_missing(p.mb, report);
        Batch {
            p,
            uidvalidity,
            fetched_at: self.fetched_at.clone(),
            middle: self.uids.len() / 2,
            size: self.asked.len(),
        }
    }

    /// Reports the messages asked for and not returned: withheld by the server (a failure of
    /// this message, fetched alone next time) or expunged meanwhile.
    fn note_missing(&self, mb: &MailboxConfig, report: &mut PollReport) {
        let got: HashSet<u32> = self.uids.iter().copied().collect();
        for &uid in self.asked.iter().filter(|u| !got.contains(u)) {
            if self.withheld.contains(&uid) {
                let detail = "the server did not send this message, though it is still in the \
                              mailbox; it is fetched alone after the other mail from now on";
                tracing::error!(mailbox = %mb.id, uid, "{detail}");
                report.failed.push((uid, detail.to_owned()));
            } else {
                tracing::warn!(mailbox = %mb.id, uid, "listed message was not returned by FETCH and is no longer in the mailbox (expunged meanwhile)");
                report.vanished.push(uid);
            }
        }
    }

    /// The batch's messages, once hashed.
    async fn hashed(
        hashing: tokio::task::JoinHandle<Vec<Received>>,
        p: &Poller<'_>,
    ) -> Result<Vec<Received>, PollError> {
        hashing.await.map_err(p.internal())
    }
}

/// Bytes of fetched messages held at once: fetched or being fetched, waiting, or being
/// prepared. A batch reserves its planned size (the server's RFC822.SIZE) before it is fetched
/// and gives it back once prepared; a batch bigger than the whole budget waits until it is
/// alone. Counted in KiB, so that any budget fits the semaphore.
struct FetchBudget {
    kib: Arc<tokio::sync::Semaphore>,
    total_kib: u32,
}

impl FetchBudget {
    fn new(max_bytes: u64) -> Self {
        let total_kib = u32::try_from(max_bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
        FetchBudget {
            kib: Arc::new(tokio::sync::Semaphore::new(total_kib as usize)),
            total_kib,
        }
    }

    /// What a batch of `bytes` takes of the budget: at least 1 KiB, at most all of it.
    fn share(&self, bytes: u64) -> u32 {
        u32::try_from(bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .clamp(1, self.total_kib)
    }

    /// Waits until `bytes` fit beside what is held.
    async fn reserve(&self, bytes: u64) -> tokio::sync::OwnedSemaphorePermit {
        Arc::clone(&self.kib)
            .acquire_many_owned(self.share(bytes))
            .await
            // Never closed: the semaphore lives as long as the budget.
            .unwrap_or_else(|_| unreachable!("the fetch budget is never closed"))
    }
}

/// One fetched message: its UID and its raw bytes, hashed.
struct Received {
    uid: u32,
    raw: RawMessage,
}

/// "Perform the pending acknowledgements now and tell me how it went."
type AckRequest = oneshot::Sender<Result<usize, PollError>>;

#[allow(clippy::too_many_arguments)]
async fn fetch_batches(
    p: &Poller<'_>,
    session: &mut MailSession,
    plan: Vec<(Vec<u32>, u64)>,
    budget: &FetchBudget,
    batches: mpsc::Sender<FetchedBatch>,
    mut acks: mpsc::Receiver<AckRequest>,
    uidvalidity: u32,
    cancel: &CancellationToken,
) -> Result<(), PollError> {
    for (asked, planned_bytes) in plan {
        if cancel.is_cancelled() {
            break;
        }
        // Take the batch's share of the byte budget and a hand-over slot before fetching;
        // serve acknowledgement requests meanwhile.
        let waited = std::time::Instant::now();
        let share = budget.reserve(planned_bytes);
        let Some(share) = serving_acks(p, session, uidvalidity, &mut acks, async {
            Some(share.await)
        })
        .await
        else {
            return Ok(());
        };
        let slot = async { batches.reserve().await.ok() };
        let budgeted = std::time::Instant::now();
        let Some(permit) = serving_acks(p, session, uidvalidity, &mut acks, slot).await else {
            return Ok(()); // the processor stopped; it reports why
        };
        let started = std::time::Instant::now();
        let fetched = match session.fetch_raw(&asked).await {
            Ok(fetched) => fetched,
            Err(e) => {
                note_fetch_failure(p, uidvalidity, &asked, &e.to_string()).await;
                return Err(p.imap()(e));
            }
        };
        let bytes = fetched.iter().map(|f| f.raw().len()).sum::<usize>();
        let received = std::time::Instant::now();
        tracing::debug!(
            mailbox = %p.mb.id,
            messages = fetched.len(),
            bytes,
            budget_ms = (budgeted - waited).as_secs_f64() * 1e3,
            slot_ms = (started - budgeted).as_secs_f64() * 1e3,
            fetch_ms = (received - started).as_secs_f64() * 1e3,
            "batch fetched"
        );
        let uids: Vec<u32> = fetched.iter().map(|f| f.uid).collect();
        // A dead session ends the fetching once what did arrive is handed on.
        let (withheld, dead) = match withheld(p, session, uidvalidity, &asked, &uids).await {
            Ok(withheld) => (withheld, None),
            Err((missing, e)) => (missing, Some(e)),
        };
        let hashing = tokio::task::spawn_blocking(move || {
            let hashed = fetched
                .into_iter()
                .map(|f| Received {
                    uid: f.uid,
                    raw: RawMessage::hashed(f),
                })
                .collect::<Vec<_>>();
            tracing::debug!(
                messages = hashed.len(),
                hash_ms = received.elapsed().as_secs_f64() * 1e3,
                "batch hashed"
            );
            hashed
        });
        let batch = FetchedBatch {
            asked,
            uids,
            withheld,
            hashing,
            fetched_at: crate::registry::now(),
            budget: share,
        };
        permit.send(batch);
        if let Some(e) = dead {
            return Err(p.imap()(e));
        }
    }
    drop(batches);
    while let Some(request) = acks.recv().await {
        if !serve_ack(p, session, uidvalidity, request).await {
            break;
        }
    }
    Ok(())
}

/// Which of the messages a batch fetch asked for and did not get are still in the mailbox: the
/// server would not, or could not, send them. They are counted as failed fetches, so that the
/// next polls take them alone after the other mail. async-imap ends a FETCH quietly both on the
/// server's NO and when the server drops the connection in the middle of it (Dovecot does both
/// with a message file it cannot read), so the lookup is also what finds a dead session: then
/// every missing message is counted (and returned as withheld) with the lookup's error.
async fn withheld(
    p: &Poller<'_>,
    session: &mut MailSession,
    uidvalidity: u32,
    asked: &[u32],
    got: &[u32],
) -> Result<Vec<u32>, (Vec<u32>, crate::imap::ImapError)> {
    let got: HashSet<u32> = got.iter().copied().collect();
    let missing: Vec<u32> = asked.iter().copied().filter(|u| !got.contains(u)).collect();
    if missing.is_empty() {
        return Ok(missing);
    }
    match session.present(&missing).await {
        Ok(withheld) => {
            if !withheld.is_empty() {
                note_fetch_failure(p, uidvalidity, &withheld, "the server did not send it").await;
            }
            Ok(withheld)
        }
        Err(e) => {
            note_fetch_failure(p, uidvalidity, &missing, &e.to_string()).await;
            Err((missing, e))
        }
    }
}

/// Counts a failed fetch against the messages it asked for, so that the next polls take them
/// one by one after the other mail (see `poll_session`). Logged if the registry cannot take it:
/// the poll fails with the fetch's error anyway.
async fn note_fetch_failure(p: &Poller<'_>, uidvalidity: u32, uids: &[u32], error: &str) {
    let mb = p.mb;
    tracing::warn!(
        mailbox = %mb.id,
        messages = uids.len(),
        first_uid = uids.first().copied(),
        error,
        "the server failed during a fetch; its messages are fetched one by one after the other mail from now on"
    );
    if let Err(e) = p
        .ctx
        .pipeline
        .registry
        .note_fetch_failure(&mb.id, &mb.folder, uidvalidity, uids, error)
        .await
    {
        tracing::warn!(mailbox = %mb.id, error = %e, "could not record the failed fetch");
    }
}

/// Waits for `ready` while serving the processor's acknowledgement requests. None when `ready`
/// gave none, when the processor is gone, or when an acknowledgement failed (the processor
/// receives that error): the fetcher stops.
async fn serving_acks<T>(
    p: &Poller<'_>,
    session: &mut MailSession,
    uidvalidity: u32,
    acks: &mut mpsc::Receiver<AckRequest>,
    ready: impl std::future::Future<Output = Option<T>>,
) -> Option<T> {
    tokio::pin!(ready);
    loop {
        tokio::select! {
            got = &mut ready => return got,
            request = acks.recv() => {
                let request = request?;
                if !serve_ack(p, session, uidvalidity, request).await {
                    return None;
                }
            }
        }
    }
}

/// Drains the pending acknowledgements for a request; false if that failed (the processor
/// receives the error).
async fn serve_ack(
    p: &Poller<'_>,
    session: &mut MailSession,
    uidvalidity: u32,
    request: AckRequest,
) -> bool {
    let started = std::time::Instant::now();
    let result = drain_acks(p, session, uidvalidity).await;
    tracing::debug!(mailbox = %p.mb.id, ms = started.elapsed().as_secs_f64() * 1e3, "acknowledgements served");
    let ok = result.is_ok();
    let _ = request.send(result);
    ok
}

/// Asks the fetcher to acknowledge what has been committed, and waits for it.
async fn request_acks(acks: &mpsc::Sender<AckRequest>) -> Result<usize, PollError> {
    let (done, wait) = oneshot::channel();
    if acks.send(done).await.is_err() {
        return Ok(0); // the fetcher failed; its error is reported
    }
    wait.await.unwrap_or(Ok(0))
}

/// The message-commit loop ([`CommitMode::PerMessage`]): each message of a batch commits on its
/// own; the batch's acknowledgement is requested once its messages committed, without waiting
/// for it before the next batch (see [`request_acks_later`]).
async fn process_batches(
    p: &Poller<'_>,
    mut batches: mpsc::Receiver<FetchedBatch>,
    acks: mpsc::Sender<AckRequest>,
    uidvalidity: u32,
    report: &mut PollReport,
    registered: &mut HashSet<u32>,
    cancel: &CancellationToken,
) -> Result<(), PollError> {
    let mb = p.mb;
    let mut ack_reply = None;
    let result = async {
        while let Some(batch) = batches.recv().await {
            let work = batch.arrived(p, uidvalidity, report);
            let fetched = FetchedBatch::hashed(batch.hashing, p).await?;
            let mut outcomes = Outcomes {
                mb,
                report: &mut *report,
                registered: &mut *registered,
            };
            let result = work.commit_each(fetched, &mut outcomes, cancel).await;
            drop(batch.budget); // its raw bytes are gone
            // An error stops the run (disk full, database gone); what did commit is still
            // acknowledged below.
            result.map_err(p.ingest())?;
            // Acknowledge what this batch committed, while the next batch is processed.
            request_acks_later(&acks, &mut ack_reply, report)?;
            if report.interrupted {
                break;
            }
        }
        Ok(())
    }
    .await;
    acknowledge_committed(p, &acks, &mut ack_reply, report, result).await
}

/// One fetched batch being prepared and committed.
struct Batch<'a, 'b> {
    p: &'a Poller<'b>,
    uidvalidity: u32,
    fetched_at: String,
    middle: usize,
    size: usize,
}

/// Tallies what became of each message in the poll report.
struct Outcomes<'a> {
    mb: &'a MailboxConfig,
    report: &'a mut PollReport,
    registered: &'a mut HashSet<u32>,
}

impl Outcomes<'_> {
    /// Records one message's outcome; an error that must stop the run is handed back.
    fn note(&mut self, uid: u32, result: Result<Ingested, IngestError>) -> Result<(), IngestError> {
        let mb = self.mb;
        let report = &mut *self.report;
        match result {
            Ok(done) => {
                self.registered.insert(uid);
                match &done.outcome {
                    Outcome::Registered { id, number } => {
                        report.registered += 1;
                        tracing::info!(
                            mailbox = %mb.id,
                            uid,
                            record = id,
                            number = %number,
                            raw_sha256 = %done.raw_sha256,
                            attachments = done.attachments,
                            "registered"
                        );
                    }
                    Outcome::Quarantined { id } => {
                        report.quarantined += 1;
                        tracing::warn!(mailbox = %mb.id, uid, record = id, raw_sha256 = %done.raw_sha256, "quarantined");
                    }
                    Outcome::Linked { id, status } => {
                        report.linked += 1;
                        tracing::info!(mailbox = %mb.id, uid, record = id, status = status.as_str(), "same bytes recorded before: linked");
                    }
                    Outcome::AlreadyKnown { .. } => report.already_registered += 1,
                }
                Ok(())
            }
            Err(e) if e.is_message_specific() => {
                tracing::error!(mailbox = %mb.id, uid, error = %e, "message not registered; left unacknowledged on the server");
                report.failed.push((uid, e.to_string()));
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

impl Batch<'_, '_> {
    fn source(&self, uid: u32) -> Source {
        source_of(self.p.mb, self.uidvalidity, uid, self.fetched_at.clone())
    }

    /// Starts preparations for the messages, at most `parallel_messages` at a time, and
    /// yields them in UID order. Spawned, not merely buffered: a preparation must make
    /// progress (and give its database connection back) while the caller is busy committing,
    /// or a few of them starve the pool.
    fn prepared_in_order<T: Send + 'static, F>(
        &self,
        fetched: Vec<Received>,
        start: F,
    ) -> InOrder<T, impl FnMut(Received) -> Spawned<T>>
    where
        F: Fn(Pipeline, RawMessage, Source) -> tokio::task::JoinHandle<Result<T, IngestError>>,
    {
        let pipeline = self.p.ctx.pipeline.clone();
        let sources: std::collections::HashMap<u32, Source> = fetched
            .iter()
            .map(|f| (f.uid, self.source(f.uid)))
            .collect();
        let spawn = move |msg: Received| {
            let uid = msg.uid;
            let source = sources[&uid].clone();
            let handle = start(pipeline.clone(), msg.raw, source.clone());
            (uid, source, handle)
        };
        InOrder::new(fetched, self.p.ctx.config.imap.parallel_messages, spawn)
    }

    /// One registry transaction per message, in UID order (the default).
    async fn commit_each(
        &self,
        fetched: Vec<Received>,
        outcomes: &mut Outcomes<'_>,
        cancel: &CancellationToken,
    ) -> Result<(), IngestError> {
        let pipeline = &self.p.ctx.pipeline;
        let mut queue = self.prepared_in_order(fetched, |pipeline, raw, source| {
            tokio::spawn(async move { prepare(&pipeline, raw, &source).await })
        });
        let mut index = 0;
        // Prepared (their attempt counted) and not committed when the loop stopped early.
        let mut uncommitted = Vec::new();
        let mut stopped = Ok(());
        while let Some((uid, source, result)) = queue.next(pipeline).await {
            if cancel.is_cancelled() {
                outcomes.report.interrupted = true;
                if result.is_ok() {
                    uncommitted.push(source);
                }
                break;
            }
            let result = match result {
                Ok(message) => commit(pipeline, message, &source).await,
                Err(e) => Err(e),
            };
            let ok = result.is_ok();
            if let Err(e) = outcomes.note(uid, result) {
                stopped = Err(e);
                break;
            }
            if ok && index == self.middle && self.size >= 3 {
                failpoint::hit("mid-batch");
            }
            index += 1;
        }
        // Stopped early (shutdown, disk full, database gone): the preparations still running
        // end, and the attempts of every message prepared and not committed are taken back.
        // That was not their fault; counted, three such stops would quarantine good mail as
        // poison. (A preparation that failed took its own attempt back or kept it rightly.)
        for (_, source, result) in queue.finish().await {
            if result.is_ok() {
                uncommitted.push(source);
            }
        }
        for source in &uncommitted {
            crate::pipeline::forget_attempt(pipeline, source).await;
        }
        stopped
    }

    /// Prepares a batch that will be committed as one: every blob staged (not yet durable),
    /// `parallel_messages` contiguous chunks on blocking tasks, results in UID order. A message
    /// that fails alone is noted and left out; a store error (disk full) is returned.
    async fn stage(
        &self,
        fetched: Vec<Received>,
        outcomes: &mut Outcomes<'_>,
    ) -> Result<StagedBatch, IngestError> {
        let pipeline = &self.p.ctx.pipeline;
        let mut staged = pipeline.store.staging()?;
        let parallel = self.p.ctx.config.imap.parallel_messages.max(1);
        let per_chunk = fetched.len().div_ceil(parallel).max(1);
        let mut chunks = Vec::new();
        let mut fetched = fetched.into_iter().peekable();
        while fetched.peek().is_some() {
            let chunk: Vec<(RawMessage, Source)> = fetched
                .by_ref()
                .take(per_chunk)
                .map(|f| {
                    let source = self.source(f.uid);
                    (f.raw, source)
                })
                .collect();
            let pipeline = pipeline.clone();
            chunks.push(AbortOnDrop(tokio::spawn(async move {
                prepare_staged(&pipeline, chunk).await
            })));
        }
        let mut ready = Vec::with_capacity(per_chunk * parallel);
        for mut chunk in chunks {
            let done = match (&mut chunk.0).await {
                Ok(result) => result?,
                Err(join) => {
                    return Err(IngestError::internal(
                        1,
                        pipeline.limits.max_attempts,
                        &join,
                    ));
                }
            };
            staged.absorb(done.staged);
            for (source, result) in done.prepared {
                match result {
                    Ok(message) => ready.push((message, source)),
                    // A failure of this message alone: it stays out of the batch, unacknowledged.
                    Err(e) => outcomes.note(uid_of(&source), Err(e))?,
                }
            }
            // Noted first: a message that failed before the disk filled keeps its attempt.
            if let Some(stopped) = done.stopped {
                return Err(stopped);
            }
        }
        Ok(StagedBatch { staged, ready })
    }
}

/// A batch prepared for one commit: staged blobs and its messages in UID order.
struct StagedBatch {
    staged: crate::raw_store::Staged,
    ready: Vec<(crate::pipeline::PreparedMessage, Source)>,
}

/// What the commit of a staged batch did: each message's result in UID order, and the error
/// that stopped it, if any (the messages without a result did not commit).
struct Committed {
    uids: Vec<u32>,
    results: Vec<(u32, Result<Ingested, IngestError>)>,
    stopped: Option<IngestError>,
}

/// A staged batch whose blobs are being made durable (one flush, the renames, a second flush)
/// on a blocking thread, and its messages, which may commit once that finished.
struct PublishingBatch {
    publishing: tokio::task::JoinHandle<Result<(), crate::raw_store::StoreError>>,
    ready: Vec<(crate::pipeline::PreparedMessage, Source)>,
}

/// Starts publishing a staged batch's blobs at once. This need not wait for the previous batch
/// to commit: a durable blob no record refers to yet is harmless (content-addressed, and
/// `registry gc` collects it if nothing ever refers to it), and this batch's records still
/// commit only after its blobs are durable. So the flush of batch k+1 overlaps the registry
/// commit of batch k.
fn spawn_publish(pipeline: &Pipeline, batch: StagedBatch) -> PublishingBatch {
    let StagedBatch { staged, ready } = batch;
    let store = std::sync::Arc::clone(&pipeline.store);
    PublishingBatch {
        publishing: tokio::task::spawn_blocking(move || store.publish(staged)),
        ready,
    }
}

/// Waits for a batch's blobs to be durable, then commits it in one transaction — or, when it
/// cannot commit as one, message by message. Runs while the next batch is prepared.
fn spawn_commit(pipeline: Pipeline, batch: PublishingBatch) -> AbortOnDrop<Committed> {
    AbortOnDrop(tokio::spawn(async move {
        let PublishingBatch { publishing, ready } = batch;
        let uids: Vec<u32> = ready.iter().map(|(_, s)| uid_of(s)).collect();
        let mut done = Committed {
            uids,
            results: Vec::new(),
            stopped: None,
        };
        let started = std::time::Instant::now();
        let published = match publishing.await {
            Ok(result) => result.map_err(IngestError::from),
            Err(join) => Err(IngestError::internal(
                1,
                pipeline.limits.max_attempts,
                &join,
            )),
        };
        if let Err(e) = published {
            done.stopped = Some(e);
            return done;
        }
        let flushed = std::time::Instant::now();
        let committed = commit_batch(&pipeline, &ready).await;
        tracing::debug!(
            messages = ready.len(),
            publish_wait_ms = (flushed - started).as_secs_f64() * 1e3,
            commit_ms = flushed.elapsed().as_secs_f64() * 1e3,
            "batch committed"
        );
        match committed {
            Ok(Some(results)) => {
                done.results = ready
                    .iter()
                    .map(|(_, s)| uid_of(s))
                    .zip(results.into_iter().map(Ok))
                    .collect();
            }
            Ok(None) => {
                // Could not commit as one: the same messages, one transaction each.
                for (message, source) in ready {
                    let result = commit(&pipeline, message, &source).await;
                    let stop = matches!(&result, Err(e) if !e.is_message_specific());
                    if stop {
                        done.stopped = result.err();
                        break;
                    }
                    done.results.push((uid_of(&source), result));
                }
            }
            Err(e) => done.stopped = Some(e),
        }
        done
    }))
}

/// The batch-commit loop ([`CommitMode::PerBatch`]): while batch k commits on its own task,
/// batch k+1 is prepared and its blobs are flushed; commits stay in UID order (k+1 commits only
/// after k committed, and only once its own blobs are durable), and each batch's
/// acknowledgement is requested as soon as it committed, without waiting for it before going
/// on (see [`request_acks_later`]).
async fn process_batches_pipelined(
    p: &Poller<'_>,
    mut batches: mpsc::Receiver<FetchedBatch>,
    acks: mpsc::Sender<AckRequest>,
    uidvalidity: u32,
    report: &mut PollReport,
    registered: &mut HashSet<u32>,
    cancel: &CancellationToken,
) -> Result<(), PollError> {
    let mb = p.mb;
    let mut committing: Option<AbortOnDrop<Committed>> = None;
    let mut ack_reply = None;
    let result = async {
        while let Some(batch) = batches.recv().await {
            let work = batch.arrived(p, uidvalidity, report);
            let uids = batch.uids;
            let budget = batch.budget;
            let started = std::time::Instant::now();
            // One transaction for the batch, unless one of its messages was attempted before:
            // then each goes alone, so that only a message at fault is held against itself.
            let grouped = !uids.is_empty()
                && p.ctx
                    .pipeline
                    .registry
                    .begin_batch_attempts(&mb.id, &mb.folder, uidvalidity, &uids)
                    .await
                    .map_err(p.reg())?;
            // The attempt transaction ran while the batch was being hashed.
            let attempted = std::time::Instant::now();
            let fetched = match FetchedBatch::hashed(batch.hashing, p).await {
                Ok(fetched) => fetched,
                Err(e) => {
                    // Not the messages' fault: take back what was counted against them.
                    if grouped {
                        forget_attempts(p, uidvalidity, &uids, registered, report).await;
                    }
                    return Err(e);
                }
            };
            if !grouped {
                finish(p, uidvalidity, committing.take(), report, registered).await?;
                let mut outcomes = Outcomes {
                    mb,
                    report: &mut *report,
                    registered: &mut *registered,
                };
                work.commit_each(fetched, &mut outcomes, cancel)
                    .await
                    .map_err(p.ingest())?;
                request_acks_later(&acks, &mut ack_reply, report)?;
                if report.interrupted {
                    break;
                }
                continue;
            }
            let mut outcomes = Outcomes {
                mb,
                report: &mut *report,
                registered: &mut *registered,
            };
            let counted = std::time::Instant::now();
            let staged = work
                .stage(fetched, &mut outcomes)
                .await
                .map(|staged| spawn_publish(&p.ctx.pipeline, staged));
            drop(budget); // its raw bytes are gone: staged on disk, parsed into rows
            let prepared = std::time::Instant::now();
            // The previous batch must have committed before this one is published.
            let previous = finish(p, uidvalidity, committing.take(), report, registered).await;
            tracing::debug!(
                mailbox = %mb.id,
                messages = uids.len(),
                attempts_ms = (attempted - started).as_secs_f64() * 1e3,
                hash_wait_ms = (counted - attempted).as_secs_f64() * 1e3,
                stage_ms = (prepared - counted).as_secs_f64() * 1e3,
                previous_commit_wait_ms = prepared.elapsed().as_secs_f64() * 1e3,
                "batch prepared"
            );
            // An error here must not skip the taking back of this batch's attempts below.
            let previous = match previous {
                Ok(()) => request_acks_later(&acks, &mut ack_reply, report),
                Err(e) => Err(e),
            };
            let stop = match (previous, staged) {
                (Err(e), _) => Some(e),
                (Ok(()), Err(source)) => Some(p.ingest()(source)),
                // Its blobs may get published all the same: harmless, nothing refers to them.
                (Ok(()), Ok(_)) if cancel.is_cancelled() => {
                    report.interrupted = true;
                    None
                }
                (Ok(()), Ok(publishing)) => {
                    committing = Some(spawn_commit(p.ctx.pipeline.clone(), publishing));
                    continue;
                }
            };
            // Not the messages' fault (disk full, database gone, shutdown): take back the
            // attempts of this batch, which did not commit.
            forget_attempts(p, uidvalidity, &uids, registered, report).await;
            match stop {
                Some(e) => return Err(e),
                None => break,
            }
        }
        finish(p, uidvalidity, committing.take(), report, registered).await
    }
    .await;
    // An error returned from the loop may have left the previous batch's commit running: it
    // ends (its outcomes noted, its uncommitted attempts taken back) instead of being dropped
    // mid-transaction with its attempts counted.
    if committing.is_some()
        && let Err(e) = finish(p, uidvalidity, committing.take(), report, registered).await
    {
        tracing::warn!(mailbox = %mb.id, error = %e, "the batch committing when the poll stopped did not commit");
    }
    acknowledge_committed(p, &acks, &mut ack_reply, report, result).await
}

/// Waits for a batch's commit (if one is running) and notes its outcomes; an error that
/// stopped it stops the run, after its uncommitted attempts are taken back.
async fn finish(
    p: &Poller<'_>,
    uidvalidity: u32,
    committing: Option<AbortOnDrop<Committed>>,
    report: &mut PollReport,
    registered: &mut HashSet<u32>,
) -> Result<(), PollError> {
    let Some(mut task) = committing else {
        return Ok(());
    };
    let done = match (&mut task.0).await {
        Ok(done) => done,
        Err(join) => Committed {
            uids: Vec::new(),
            results: Vec::new(),
            stopped: Some(IngestError::internal(
                1,
                p.ctx.pipeline.limits.max_attempts,
                &join,
            )),
        },
    };
    let mut outcomes = Outcomes {
        mb: p.mb,
        report: &mut *report,
        registered: &mut *registered,
    };
    let mut stop = done.stopped;
    for (uid, result) in done.results {
        if let Err(e) = outcomes.note(uid, result) {
            stop.get_or_insert(e);
        }
    }
    match stop {
        None => Ok(()),
        Some(source) => {
            forget_attempts(p, uidvalidity, &done.uids, registered, report).await;
            Err(p.ingest()(source))
        }
    }
}

/// Takes back the batch attempts of the messages among `uids` that did not commit, except
/// those that failed on their own account in this poll (their attempt counts).
async fn forget_attempts(
    p: &Poller<'_>,
    uidvalidity: u32,
    uids: &[u32],
    registered: &HashSet<u32>,
    report: &PollReport,
) {
    let failed: HashSet<u32> = report.failed.iter().map(|(uid, _)| *uid).collect();
    let pending: Vec<u32> = uids
        .iter()
        .copied()
        .filter(|u| !registered.contains(u) && !failed.contains(u))
        .collect();
    if pending.is_empty() {
        return;
    }
    let mb = p.mb;
    if let Err(e) = p
        .ctx
        .pipeline
        .registry
        .forget_batch_attempts(&mb.id, &mb.folder, uidvalidity, &pending)
        .await
    {
        tracing::warn!(mailbox = %mb.id, error = %e, "could not take back processing attempts");
    }
}

/// Asks for the pending acknowledgements without waiting for anything: the fetcher performs
/// them between fetches while the next batches are processed. At most one request is
/// outstanding. While it is unanswered nothing new is asked: served later, it drains every
/// acknowledgement pending then, this batch's included; if the fetcher had already taken it
/// when this batch committed, the next call (or [`flush_acks`]) asks again. Waiting here for
/// the previous answer stalled the processor behind whatever fetch was running.
fn request_acks_later(
    acks: &mpsc::Sender<AckRequest>,
    outstanding: &mut Option<oneshot::Receiver<Result<usize, PollError>>>,
    report: &mut PollReport,
) -> Result<(), PollError> {
    if let Some(reply) = outstanding.as_mut() {
        match reply.try_recv() {
            Err(oneshot::error::TryRecvError::Empty) => return Ok(()),
            // The fetcher stopped without answering: it reports why.
            Err(oneshot::error::TryRecvError::Closed) => *outstanding = None,
            Ok(answer) => {
                *outstanding = None;
                report.acked += answer?;
            }
        }
    }
    let (done, reply) = oneshot::channel();
    // Full cannot happen (one outstanding request, a channel of one); closed: the fetcher
    // stopped, and reports why.
    if acks.try_send(done).is_ok() {
        *outstanding = Some(reply);
    }
    Ok(())
}

/// Acknowledges everything committed so far and waits until it is done: the outstanding
/// request's answer first, then one more request, which covers whatever committed after the
/// fetcher took the outstanding one.
async fn flush_acks(
    acks: &mpsc::Sender<AckRequest>,
    outstanding: &mut Option<oneshot::Receiver<Result<usize, PollError>>>,
    report: &mut PollReport,
) -> Result<(), PollError> {
    if let Some(reply) = outstanding.take() {
        report.acked += reply.await.unwrap_or(Ok(0))?;
    }
    report.acked += request_acks(acks).await?;
    Ok(())
}

/// The end of a processing loop, whatever stopped it: what committed is acknowledged if the
/// server and the database let us, else by the next run. A failed acknowledgement is the poll's
/// error unless the loop's own error (`result`) came first; then it is only logged.
async fn acknowledge_committed(
    p: &Poller<'_>,
    acks: &mpsc::Sender<AckRequest>,
    outstanding: &mut Option<oneshot::Receiver<Result<usize, PollError>>>,
    report: &mut PollReport,
    result: Result<(), PollError>,
) -> Result<(), PollError> {
    match flush_acks(acks, outstanding, report).await {
        Ok(()) => result,
        Err(e) if result.is_ok() => Err(e),
        Err(e) => {
            tracing::warn!(mailbox = %p.mb.id, error = %e, "acknowledgements left for the next run");
            result
        }
    }
}

/// A spawned task that is aborted when its handle is dropped (an early return).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn uid_of(source: &Source) -> u32 {
    source.origin.location().map_or(0, |l| l.uid)
}

type Spawned<T> = (u32, Source, tokio::task::JoinHandle<Result<T, IngestError>>);

/// Preparations in flight, handed out in the order the messages were fetched. At most
/// `parallel` are in flight, counting the one being handed out: with `parallel = 1` the next
/// message's preparation (and its attempt count) starts only after the caller committed the
/// previous one, so a worker killed while committing message k is not held against message
/// k+1 as well.
struct InOrder<T, S> {
    waiting: std::vec::IntoIter<Received>,
    in_flight: std::collections::VecDeque<Spawned<T>>,
    parallel: usize,
    spawn: S,
}

impl<T, S: FnMut(Received) -> Spawned<T>> InOrder<T, S> {
    fn new(fetched: Vec<Received>, parallel: usize, spawn: S) -> Self {
        InOrder {
            waiting: fetched.into_iter(),
            in_flight: std::collections::VecDeque::new(),
            parallel: parallel.max(1),
            spawn,
        }
    }

    async fn next(&mut self, pipeline: &Pipeline) -> Option<(u32, Source, Result<T, IngestError>)> {
        while self.in_flight.len() < self.parallel {
            let Some(next) = self.waiting.next() else {
                break;
            };
            self.in_flight.push_back((self.spawn)(next));
        }
        let (uid, source, handle) = self.in_flight.pop_front()?;
        let result = match handle.await {
            Ok(result) => result,
            Err(join) => Err(IngestError::internal(
                0,
                pipeline.limits.max_attempts,
                &join,
            )),
        };
        Some((uid, source, result))
    }

    /// Lets the preparations already started end, and returns them; those not started yet are
    /// dropped (nothing of them was counted or stored).
    async fn finish(mut self) -> Vec<(u32, Source, Result<T, IngestError>)> {
        let mut out = Vec::new();
        while let Some((uid, source, handle)) = self.in_flight.pop_front() {
            if let Ok(result) = handle.await {
                out.push((uid, source, result));
            }
        }
        out
    }
}

impl<T, S> Drop for InOrder<T, S> {
    fn drop(&mut self) {
        // Dropped without `finish` (the poll itself was dropped): preparations still running
        // only leave harmless blobs.
        for (_, _, handle) in &self.in_flight {
            handle.abort();
        }
    }
}

fn ack_action(after: &AfterAction) -> Option<String> {
    match after {
        AfterAction::None => None,
        other => Some(other.as_config_str()),
    }
}

/// `unseen`: messages already recorded that the server still shows unseen (sorted, from this
/// poll's candidates). Their `\Seen` was lost on the
/// server's side (a server that answered OK and kept the old flags, or lost them in a restart).
/// The acknowledgement is queued again and performed now, at most `MAX_ACK_REPEATS` times per
/// message. Only `seen` is repeated: a `move:` that half happened (copied, not expunged) would
/// copy again.
async fn repeat_lost_acks(
    p: &Poller<'_>,
    session: &mut MailSession,
    uidvalidity: u32,
    unseen: &[u32],
) -> Result<usize, PollError> {
    let mb = p.mb;
    let seen_only = |after: &AfterAction| (*after == AfterAction::Seen).then_some("seen");
    let (ack, quarantine_ack) = (seen_only(&mb.after), seen_only(&mb.after_quarantine));
    if unseen.is_empty() || (ack.is_none() && quarantine_ack.is_none()) {
        return Ok(0);
    }
    let (queued, given_up) = p
        .ctx
        .pipeline
        .registry
        .requeue_acks(&mb.id, &mb.folder, uidvalidity, unseen, ack, quarantine_ack)
        .await
        .map_err(p.reg())?;
    if !given_up.is_empty() {
        tracing::error!(
            mailbox = %mb.id,
            uids = %crate::imap::uid_set::format(&given_up),
            repeats = crate::registry::MAX_ACK_REPEATS,
            "registered messages stay unseen on the server although \\Seen was set repeatedly; not repeated again (can the server write its mail store? may this account set \\Seen?)"
        );
    }
    if queued == 0 {
        return Ok(0);
    }
    tracing::warn!(
        mailbox = %mb.id,
        queued,
        uids = %crate::imap::uid_set::format(unseen),
        "recorded messages are still unseen on the server: acknowledging them again"
    );
    drain_acks(p, session, uidvalidity).await
}

/// Performs the pending acknowledgements of this folder and deletes their rows.
async fn drain_acks(
    p: &Poller<'_>,
    session: &mut MailSession,
    uidvalidity: u32,
) -> Result<usize, PollError> {
    let registry = &p.ctx.pipeline.registry;
    let mut pending = registry
        .pending_acks(&p.mb.id, &p.mb.folder)
        .await
        .map_err(p.reg())?;
    if let Ok(done) = p.done_acks.lock() {
        let noted: HashSet<i64> = done.acks().map(|a| a.id).collect();
        pending.retain(|a| !noted.contains(&a.id));
    }
    if pending.is_empty() {
        return Ok(0);
    }
    let mut stale = Vec::new();
    let mut by_action: BTreeMap<String, Vec<crate::registry::PendingAck>> = BTreeMap::new();
    for ack in pending {
        if ack.uidvalidity == uidvalidity {
            by_action.entry(ack.action.clone()).or_default().push(ack);
        } else {
            // The UIDs were renumbered: this UID now names another message (or none).
            tracing::warn!(mailbox = %p.mb.id, uid = ack.uid, "pending acknowledgement dropped: UIDVALIDITY changed since registration");
            stale.push(ack);
        }
    }
    note_done_acks(p, "ack-dropped", stale);
    let mut done = 0;
    let mut moved = false;
    for (action, acks) in by_action {
        let uids: Vec<u32> = acks.iter().map(|a| a.uid).collect();
        let after = AfterAction::parse(&action);
        moved |= matches!(after, Some(AfterAction::Move(_)));
        let performed = match after {
            Some(AfterAction::Seen) => session.mark_seen(&uids).await,
            // A move recorded before the server could not move (or before the configuration
            // changed): refused below like a NO, so that intake goes on.
            Some(AfterAction::Move(target)) if !session.can_move() => {
                let key = match &p.mb.after_quarantine {
                    AfterAction::Move(q) if *q == target => "after_quarantine",
                    _ => "after",
                };
                Err(crate::imap::ImapError::CannotMove {
                    folder: target,
                    key,
                })
            }
            Some(AfterAction::Move(target)) => match session.ensure_folder(&target).await {
                Ok(()) => session.move_to(&uids, &target).await,
                Err(e) => Err(e),
            },
            Some(AfterAction::None) | None => {
                tracing::warn!(mailbox = %p.mb.id, action = %action, "unknown pending acknowledgement dropped");
                Ok(())
            }
        };
        match performed {
            Ok(()) => {}
            // Refused by the server (e.g. a read-only mailbox), or a move it cannot perform:
            // kept pending and reported, and the poll goes on registering what arrives.
            Err(
                e @ (crate::imap::ImapError::No { .. } | crate::imap::ImapError::CannotMove { .. }),
            ) => {
                tracing::error!(
                    mailbox = %p.mb.id,
                    action = %action,
                    uids = %crate::imap::uid_set::format(&uids),
                    error = %e,
                    "the acknowledgement was refused or cannot be performed; it is kept for the next poll"
                );
                if let Ok(mut refused) = p.refused_acks.lock() {
                    let why = e.to_string();
                    refused.extend(uids.iter().map(|u| (*u, why.clone())));
                }
                continue;
            }
            Err(e) => return Err(p.imap()(e)),
        }
        failpoint::hit("after-ack");
        done += uids.len();
        note_done_acks(p, "acked", acks);
    }
    // A move is deleted at once, as before: performed again after a crash it would ask the
    // server to move UIDs that are gone, which a server may answer with NO.
    if moved
        || p.done_acks
            .lock()
            .is_ok_and(|d| d.acks().count() >= DoneAcks::FLUSH_AT)
    {
        record_done_acks(p).await.map_err(p.reg())?;
    }
    Ok(done)
}

/// Notes acknowledgements the server confirmed (or that no longer apply), to be deleted by
/// [`record_done_acks`].
fn note_done_acks(p: &Poller<'_>, kind: &'static str, acks: Vec<crate::registry::PendingAck>) {
    if acks.is_empty() {
        return;
    }
    if let Ok(mut done) = p.done_acks.lock() {
        done.0.push((kind, crate::registry::now(), acks));
    }
}

/// Deletes the noted acknowledgements' rows with their audit events, in one transaction. On
/// failure they stay noted (and skipped) for the next try.
async fn record_done_acks(p: &Poller<'_>) -> Result<(), RegistryError> {
    let noted = match p.done_acks.lock() {
        Ok(mut done) => std::mem::take(&mut done.0),
        Err(_) => return Ok(()),
    };
    if noted.is_empty() {
        return Ok(());
    }
    let groups: Vec<(&str, &str, &[crate::registry::PendingAck])> = noted
        .iter()
        .map(|(kind, at, acks)| (*kind, at.as_str(), acks.as_slice()))
        .collect();
    let result = p
        .ctx
        .pipeline
        .registry
        .acks_done(&p.mb.id, &p.mb.folder, &groups)
        .await;
    if result.is_err()
        && let Ok(mut done) = p.done_acks.lock()
    {
        done.0.splice(0..0, noted);
    }
    result
}

/// Splits `(uid, size)` pairs into fetch batches bounded by count and by bytes (a message
/// larger than the byte bound gets a batch of its own), each with its total size.
pub fn batches(sizes: &[(u32, u32)], max_messages: usize, max_bytes: u64) -> Vec<(Vec<u32>, u64)> {
    let mut out = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0u64;
    for (uid, size) in sizes {
        let size = u64::from(*size);
        if !current.is_empty() && (current.len() >= max_messages || bytes + size > max_bytes) {
            out.push((std::mem::take(&mut current), bytes));
            bytes = 0;
        }
        current.push(*uid);
        bytes += size;
    }
    if !current.is_empty() {
        out.push((current, bytes));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{FetchBudget, PART_BYTES, batches, whole};
    use futures::FutureExt;

    const MIB: u64 = 1024 * 1024;

    #[tokio::test]
    async fn fetch_budget_holds_fetched_batches_to_its_bytes() {
        let budget = FetchBudget::new(48 * MIB);
        let first = budget.reserve(16 * MIB).await;
        let second = budget.reserve(16 * MIB).await;
        let third = budget.reserve(15 * MIB).await;
        // 47 MiB held: a batch of 2 MiB does not fit, one of 1 MiB does.
        assert!(budget.reserve(2 * MIB).now_or_never().is_none());
        let small = budget.reserve(MIB).now_or_never();
        assert!(small.is_some());
        drop(small);
        drop(first);
        let fourth = budget.reserve(16 * MIB).now_or_never();
        assert!(fourth.is_some());
        // A message bigger than the whole budget waits until it is alone, then goes.
        let mut huge = Box::pin(budget.reserve(100 * MIB));
        assert!((&mut huge).now_or_never().is_none());
        drop((second, third));
        assert!((&mut huge).now_or_never().is_none());
        drop(fourth);
        let alone = huge.now_or_never();
        assert!(alone.is_some());
        assert!(budget.reserve(1).now_or_never().is_none());
        drop(alone);
        assert!(budget.reserve(48 * MIB).now_or_never().is_some());
    }

    #[test]
    fn a_message_of_one_part_is_whole_whatever_its_estimated_size() {
        // One part, shorter than asked: the end, even where the server's size was off.
        assert!(whole(20_000, 20_000));
        assert!(whole(20_000, 21_000));
        assert!(whole(21_000, 20_000));
        // Sized over one part: exactly its size, or cut short.
        assert!(whole(u64::from(PART_BYTES) * 3, PART_BYTES * 3));
        assert!(!whole(1_000_000, PART_BYTES * 3));
        assert!(!whole(u64::from(PART_BYTES) * 2, PART_BYTES * 3));
        // Sized within one part but a full part came: more to come than the size said.
        assert!(!whole(u64::from(PART_BYTES) + 5, PART_BYTES - 10));
    }

    #[test]
    fn batches_respect_count_and_bytes() {
        let sizes = [(1, 10), (2, 10), (3, 100), (4, 5), (5, 5), (6, 5)];
        assert_eq!(
            batches(&sizes, 10, 25),
            vec![(vec![1, 2], 20), (vec![3], 100), (vec![4, 5, 6], 15)]
        );
        assert_eq!(
            batches(&sizes, 2, 1000),
            vec![(vec![1, 2], 20), (vec![3, 4], 105), (vec![5, 6], 10)]
        );
        assert!(batches(&[], 2, 10).is_empty());
    }
}
