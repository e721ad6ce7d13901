//! One task per enabled mailbox, each polling on its own cron schedule until shutdown. A failing
//! mailbox only logs and waits for its next tick; it never stops the others.

use std::future::Future;

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
            let result = poll_mailbox(&ctx, &mb, &cancel).await;
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
    loop {
        let Some(next) = mb.schedule.upcoming(Utc).next() else {
            tracing::warn!(mailbox = %mb.id, "schedule has no future run; mailbox task ends");
            return;
        };
        let wait = (next - Utc::now()).to_std().unwrap_or_default();
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let result = poll_mailbox(ctx, mb, cancel).await;
        log_outcome(mb, &result);
        if cancel.is_cancelled() {
            return;
        }
    }
}

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
