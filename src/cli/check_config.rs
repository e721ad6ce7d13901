//! `mailintake check-config`: validate the configuration (and secrets' presence) and nothing else.

use std::path::Path;

use crate::config::{Config, CredentialConfig};

/// Prints a summary on success; the error lists every problem with file, line, key and fix.
pub fn run(path: &Path) -> Result<(), crate::config::ConfigError> {
    let config = Config::load(path)?;
    println!("{}: OK", path.display());
    println!("  data dir:  {}", config.data_dir.display());
    println!(
        "  registry:  {}",
        crate::registry::redact_url(&config.database_url)
    );
    for (name, cred) in &config.credentials {
        let what = match cred {
            CredentialConfig::EntraAppSecret(app) => format!(
                "Entra app-only (client secret), tenant {}, client {}{}",
                app.tenant_id,
                app.client_id,
                app.secret_expires
                    .map(|d| format!(", secret expires {d}"))
                    .unwrap_or_default()
            ),
            CredentialConfig::EntraAppCertificate(app) => format!(
                "Entra app-only (certificate {}, x5t#S256 {}, expires {}), tenant {}, client {}",
                app.certificate.subject,
                app.certificate.x5t_s256,
                app.certificate.not_after.format("%Y-%m-%d"),
                app.tenant_id,
                app.client_id
            ),
            CredentialConfig::Delegated(d) => format!(
                "{} delegated, client {}, scopes {:?}, redirect {}",
                if d.entra.is_some() { "Entra" } else { "OAuth2" },
                d.client_id,
                d.scopes,
                d.redirect_uri
            ),
            CredentialConfig::Password(p) => format!(
                "password ({:?}){}",
                p.mechanism,
                p.username
                    .as_ref()
                    .map(|u| format!(", user {u}"))
                    .unwrap_or_default()
            ),
        };
        println!("  credential {name}: {what}");
    }
    for mb in &config.mailboxes {
        println!(
            "  mailbox {}: {} at {}:{} ({} TLS), folder {}, after {}, credential {}{}",
            mb.id,
            mb.address,
            mb.host,
            mb.port,
            mb.tls,
            mb.folder,
            mb.after.as_config_str(),
            mb.credential,
            if mb.enabled { "" } else { " (disabled)" }
        );
    }
    for warning in &config.warnings {
        println!("  warning: {warning}");
    }
    Ok(())
}
