//! `mailintake auth login | status | new-key`: delegated sign-in, the state of every credential,
//! and the key that encrypts stored refresh tokens.

use std::io::Write as _;

use anyhow::{Context as _, bail};

use crate::config::{Config, CredentialConfig};
use crate::credentials::expiry::{self, REFRESH_INACTIVITY_DAYS};
use crate::credentials::{Credentials, LoginPrompt, TokenStore};
use crate::registry::Registry;

/// Prints what the person has to do, on stdout (scripts and tests read it from there).
struct TerminalPrompt {
    mailbox: String,
    redirect: Option<String>,
}

impl LoginPrompt for TerminalPrompt {
    fn open_url(&mut self, url: &str) {
        println!(
            "Open this URL in a browser and sign in as {}:",
            self.mailbox
        );
        println!();
        println!("  {url}");
        println!();
        if let Some(r) = &self.redirect {
            println!("Waiting for the sign-in to come back to {r} …");
        }
        let _ = std::io::stdout().flush();
    }

    fn enter_code(&mut self, verification_uri: &str, user_code: &str) {
        println!(
            "On any device, open {verification_uri} and enter the code {user_code} (sign in as {}).",
            self.mailbox
        );
        println!("Waiting for the sign-in …");
        let _ = std::io::stdout().flush();
    }
}

async fn token_store(config: &Config) -> anyhow::Result<(Registry, TokenStore)> {
    let key = config.token_key.clone().context(
        "no token key is configured: add [secrets] token_key_file (created with `mailintake auth new-key`)",
    )?;
    let registry = Registry::open(&config.database_url).await?;
    Ok((registry.clone(), TokenStore::new(registry, key)))
}

/// Interactive sign-in for the mailbox's delegated credential.
pub async fn login(config: &Config, mailbox_id: &str, device_code: bool) -> anyhow::Result<()> {
    let mailbox = config.mailbox(mailbox_id).with_context(|| {
        format!(
            "no mailbox with id {mailbox_id:?} in {}",
            config.path.display()
        )
    })?;
    let Some(CredentialConfig::Delegated(delegated)) = config.credentials.get(&mailbox.credential)
    else {
        bail!(
            "mailbox {mailbox_id} uses credential `{}`, which is not delegated (entra-delegated or oauth2): it needs no sign-in",
            mailbox.credential
        );
    };
    let (registry, store) = token_store(config).await?;
    let credentials = Credentials::from_config(config, Some(store))?;
    let mut prompt = TerminalPrompt {
        mailbox: mailbox.address.clone(),
        redirect: Some(delegated.redirect_uri.clone()),
    };
    let account = credentials
        .interactive_login(
            &mailbox.credential,
            &mailbox.address,
            device_code,
            &mut prompt,
        )
        .await?;
    registry.close().await;
    println!(
        "Signed in as {account}; the refresh token of credential `{}` is stored encrypted in the registry database.",
        mailbox.credential
    );
    if !account.eq_ignore_ascii_case(&mailbox.address) {
        println!(
            "note: {account} is not the mailbox address {}; the server will only accept this if that user may open the mailbox.",
            mailbox.address
        );
    }
    Ok(())
}

/// Every credential's state, and the expiries that are due.
pub async fn status(config: &Config) -> anyhow::Result<bool> {
    let store = match &config.token_key {
        Some(key) => Some(TokenStore::new(
            Registry::open(&config.database_url).await?,
            key.clone(),
        )),
        None => None,
    };
    let mut healthy = true;
    for (name, cred) in &config.credentials {
        let state = match cred {
            CredentialConfig::EntraAppSecret(app) => format!(
                "app-only, client secret{}",
                app.secret_expires
                    .map(|d| format!(" (expires {d})"))
                    .unwrap_or_else(
                        || " (expiry date not configured: set client_secret_expires)".into()
                    )
            ),
            CredentialConfig::EntraAppCertificate(app) => format!(
                "app-only, certificate {} (expires {})",
                app.certificate.subject,
                app.certificate.not_after.format("%Y-%m-%d")
            ),
            CredentialConfig::Password(_) => "password".to_owned(),
            CredentialConfig::Delegated(_) => match &store {
                None => {
                    healthy = false;
                    "delegated: no token key configured".to_owned()
                }
                Some(store) => match store.load(name).await {
                    Ok(Some(t)) => format!(
                        "delegated, signed in as {}; token stored {}, last used {} (expires after {REFRESH_INACTIVITY_DAYS} days without use)",
                        t.account.as_deref().unwrap_or("?"),
                        t.stored_at.get(..19).unwrap_or(&t.stored_at),
                        t.last_used_at.get(..19).unwrap_or(&t.last_used_at)
                    ),
                    Ok(None) => {
                        healthy = false;
                        "delegated: NOT SIGNED IN — run `mailintake auth login <mailbox>`"
                            .to_owned()
                    }
                    Err(e) => {
                        healthy = false;
                        format!("delegated: {e}")
                    }
                },
            },
        };
        println!("{name} ({}): {state}", cred.kind());
    }
    for notice in expiry::notices(config, store.as_ref()).await {
        if notice.level().is_some() {
            healthy = false;
            println!("warning: {}", notice.render());
        }
    }
    Ok(healthy)
}

/// 32 random bytes as 64 hex digits, for `[secrets] token_key_file`.
pub fn new_key() -> String {
    let key: [u8; 32] = rand::random();
    hex::encode(key)
}
