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
        match cred {
            CredentialConfig::EntraAppSecret(app) => println!(
                "  credential {name}: Entra app-only (client secret), tenant {}, client {}",
                app.tenant_id, app.client_id
            ),
        }
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
    Ok(())
}
