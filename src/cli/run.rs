//! `mailintake run [--once]`: the worker.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::credentials::Credentials;
use crate::pipeline::Pipeline;
use crate::poll::Context;
use crate::registry::Registry;
use crate::scheduler;

pub async fn context(config: Config) -> anyhow::Result<Context> {
    for warning in &config.warnings {
        tracing::warn!(%warning, "configuration");
    }
    let store = super::open_store(&config)?;
    let registry = Registry::open(&config.database_url)
        .await?
        .with_numbering(config.numbering.clone());
    let tokens = config
        .token_key
        .clone()
        .map(|key| crate::credentials::TokenStore::new(registry.clone(), key));
    let notices = crate::credentials::expiry::notices(&config, tokens.as_ref()).await;
    crate::credentials::expiry::log_due(&notices);
    let credentials = Credentials::from_config(&config, tokens)?;
    let limits = config.limits;
    let sessions = Arc::new(tokio::sync::Semaphore::new(config.imap.max_sessions));
    Ok(Context {
        sessions,
        config: Arc::new(config),
        credentials,
        pipeline: Pipeline {
            store: Arc::new(store),
            registry,
            limits,
        },
    })
}

/// Polls every mailbox once. Returns true only if every mailbox succeeded completely.
pub async fn once(config: Config) -> anyhow::Result<bool> {
    let ctx = context(config).await?;
    let cancel = CancellationToken::new();
    let signal_cancel = cancel.clone();
    let signals = tokio::spawn(async move {
        shutdown_signal().await;
        signal_cancel.cancel();
    });
    let outcomes = scheduler::run_once(&ctx, &cancel).await;
    signals.abort();
    let mut all_ok = true;
    for o in &outcomes {
        match &o.result {
            Ok(r) => {
                println!(
                    "{}: {} new, {} quarantined, {} linked, {} already registered, {} acknowledged{}{}",
                    o.mailbox_id,
                    r.registered,
                    r.quarantined,
                    r.linked,
                    r.already_registered,
                    r.acked,
                    if r.failed.is_empty() {
                        String::new()
                    } else {
                        format!(", {} FAILED", r.failed.len())
                    },
                    if r.interrupted { " (interrupted)" } else { "" }
                );
                for (uid, reason) in &r.failed {
                    eprintln!("error: mailbox {}: UID {uid}: {reason}", o.mailbox_id);
                }
                for (uid, reason) in &r.unacknowledged {
                    eprintln!(
                        "error: mailbox {}: UID {uid}: registered, but the acknowledgement was refused ({reason}); it is kept and tried again",
                        o.mailbox_id
                    );
                }
            }
            Err(e) => eprintln!("error: {e}"),
        }
        all_ok &= o.succeeded();
    }
    ctx.pipeline.registry.close().await;
    Ok(all_ok)
}

/// How often a running service logs the credentials that expire soon.
const EXPIRY_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Runs until SIGINT or SIGTERM.
pub async fn forever(config: Config) -> anyhow::Result<()> {
    let ctx = context(config).await?;
    tracing::info!(mailboxes = ctx.config.mailboxes.len(), "mailintake running");
    // Expiring secrets, certificates and refresh tokens were logged at start; a service runs
    // for months, so they are looked at again every day.
    let expiry = {
        let config = Arc::clone(&ctx.config);
        let tokens = config
            .token_key
            .clone()
            .map(|key| crate::credentials::TokenStore::new(ctx.pipeline.registry.clone(), key));
        tokio::spawn(async move {
            let mut daily = tokio::time::interval(EXPIRY_CHECK_EVERY);
            daily.tick().await; // the first tick is now: done by `context`
            loop {
                daily.tick().await;
                let notices = crate::credentials::expiry::notices(&config, tokens.as_ref()).await;
                crate::credentials::expiry::log_due(&notices);
            }
        })
    };
    scheduler::run_forever(&ctx, shutdown_signal()).await;
    expiry.abort();
    ctx.pipeline.registry.close().await;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
