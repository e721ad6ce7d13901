//! One task per enabled mailbox, each polling on its own cron schedule until shutdown. A failing
//! mailbox only logs and waits for its next tick; it never stops the others. A poll that panics
//! is logged and the next tick polls again; failures that need an administrator (a refused
//! credential) back the mailbox off, up to 30 minutes between attempts.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt as _;

use chrono::Utc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::MailboxConfig;
use crate::poll::{Context, PollError, PollReport, poll_mailbox};

/// The outcome of one mailbox in `run --once`.
#[derive(Debug)]
pub struct MailboxOutcome {
    pub mailbox_id: String,
    pub result: Result<PollReport, PollError>,
}

impl MailboxOutcome {
    pub fn succeeded(&self) -> bool {
        matches!(&self.result, Ok(r) if r.is_complete_success())
    }
}

fn enabled(ctx: &Context) -> Vec<MailboxConfig> {
    ctx.config
        .mailboxes
        .iter()
        .filter(|m| m.enabled)
        .cloned()
        .collect()
}

/// Polls every enabled mailbox once, concurrently, and reports each outcome.
pub async fn run_once(ctx: &Context, cancel: &CancellationToken) -> Vec<MailboxOutcome> {
    let mut tasks = JoinSet::new();
    for mb in enabled(ctx) {
        let ctx = ctx.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move {
            let result = poll_guarded(&ctx, &mb, &cancel).await;
            log_outcome(&mb, &result);
            MailboxOutcome {
                mailbox_id: mb.id,
                result,
            }
        });
    }
    let mut out = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(outcome) => out.push(outcome),
            Err(e) => tracing::error!(error = %e, "mailbox task failed unexpectedly"),
        }
    }
    out.sort_by(|a, b| a.mailbox_id.cmp(&b.mailbox_id));
    out
}

/// Runs until `shutdown` completes; a poll in progress finishes the message in hand.
pub async fn run_forever(ctx: &Context, shutdown: impl Future<Output = ()>) {
    let cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();
    for mb in enabled(ctx) {
        let ctx = ctx.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move { mailbox_loop(&ctx, &mb, &cancel).await });
    }
    if tasks.is_empty() {
        tracing::warn!("no enabled mailbox: nothing to do");
    }
    shutdown.await;
    tracing::info!("shutting down: finishing the messages in hand");
    cancel.cancel();
    while tasks.join_next().await.is_some() {}
}

async fn mailbox_loop(ctx: &Context, mb: &MailboxConfig, cancel: &CancellationToken) {
    let mut failures = 0u32;
    let mut not_before: Option<chrono::DateTime<Utc>> = None;
    loop {
        let Some(next) = mb
            .schedule
            .upcoming(Utc)
            .find(|t| not_before.is_none_or(|nb| *t >= nb))
        else {
            tracing::warn!(mailbox = %mb.id, "schedule has no future run; mailbox task ends");
            return;
        };
        let wait = (next - Utc::now()).to_std().unwrap_or_default();
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let result = poll_guarded(ctx, mb, cancel).await;
        log_outcome(mb, &result);
        if cancel.is_cancelled() {
            return;
        }
        match &result {
            // A bug is not the administrator's to fix: the next tick polls again.
            Err(PollError::Panicked { .. }) => failures = 0,
            Err(e) if !e.is_transient() => failures = failures.saturating_add(1),
            _ => failures = 0,
        }
        let pause = backoff(failures);
        not_before = (!pause.is_zero()).then(|| {
            let at = Utc::now() + chrono::Duration::from_std(pause).unwrap_or_default();
            tracing::warn!(
                mailbox = %mb.id,
                consecutive_failures = failures,
                next_attempt_not_before = %at.to_rfc3339(),
                "the same kind of failure needs an administrator: polling less often until it succeeds"
            );
            at
        });
    }
}

/// [`poll_mailbox`], with a panic (a bug) turned into [`PollError::Panicked`]: it fails this
/// poll, not the mailbox's task, so the service keeps polling the mailbox and `run --once`
/// reports it and exits non-zero.
async fn poll_guarded(
    ctx: &Context,
    mb: &MailboxConfig,
    cancel: &CancellationToken,
) -> Result<PollReport, PollError> {
    AssertUnwindSafe(poll_mailbox(ctx, mb, cancel))
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            Err(PollError::Panicked {
                mailbox: mb.id.clone(),
                detail: crate::parse::panic_text(&panic),
            })
        })
}

/// How long to leave a mailbox alone after `failures` consecutive polls failed in a way that does
/// not go away by itself (a refused password or secret, missing consent, a full disk): ticks
/// inside it are skipped. Retrying a refused credential every minute can lock an account and
/// gets an app throttled by the identity platform. Doubles from 2 minutes after the second
/// failure to 30 minutes; the first failure and temporary ones (network, outage) keep the
/// schedule.
pub fn backoff(failures: u32) -> Duration {
    match failures {
        0 | 1 => Duration::ZERO,
        n => Duration::from_secs(60 << (n - 1).min(5)).min(MAX_BACKOFF),
    }
}

const MAX_BACKOFF: Duration = Duration::from_secs(30 * 60);

fn log_outcome(mb: &MailboxConfig, result: &Result<PollReport, PollError>) {
    match result {
        Ok(r) if r.is_complete_success() => {}
        Ok(r) => tracing::error!(
            mailbox = %mb.id,
            failed = r.failed.len(),
            unacknowledged = r.unacknowledged.len(),
            "poll finished with messages that could not be registered or acknowledged"
        ),
        Err(e) if e.is_transient() => {
            tracing::warn!(mailbox = %mb.id, error = %e, "poll failed (temporary); next tick retries")
        }
        Err(e) => tracing::error!(mailbox = %mb.id, error = %e, "poll failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::{Duration, backoff};

    #[test]
    fn refused_polls_back_off_doubling_up_to_half_an_hour() {
        let minutes: Vec<u64> = (0..9).map(|n| backoff(n).as_secs() / 60).collect();
        assert_eq!(minutes, [0, 0, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(backoff(u32::MAX), Duration::from_secs(30 * 60));
    }
}
