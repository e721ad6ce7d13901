//! Token sources for mailbox logins, one per configured credential, each with its own cache.
//!
//! A token is fetched single-flight: callers sharing a credential wait on one request and reuse
//! its answer until shortly before it expires.

mod entra;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

pub use entra::EntraErrorResponse;

use crate::config::{Config, CredentialConfig};
use crate::secret::Secret;

/// What a mailbox session needs to log in.
#[derive(Debug, Clone)]
pub enum SaslLogin {
    /// SASL XOAUTH2 with a bearer token.
    XOAuth2 { user: String, token: Secret },
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("credential `{credential}` is not configured")]
    Unknown { credential: String },
    /// The identity platform answered with an OAuth2 error (AADSTS… for Microsoft).
    #[error("the identity platform refused credential `{credential}`: {}{}", render_code(*.code, error), description)]
    Refused {
        credential: String,
        /// The OAuth2 `error` field, e.g. `invalid_client`.
        error: String,
        /// Microsoft's AADSTS code from `error_codes`, when given.
        code: Option<u64>,
        description: String,
    },
    /// The token endpoint could not be reached or answered with something that is not OAuth2.
    #[error("token endpoint {url} for credential `{credential}` is unavailable: {detail}")]
    Unavailable {
        credential: String,
        url: String,
        detail: String,
    },
}

fn render_code(code: Option<u64>, error: &str) -> String {
    match code {
        Some(code) => format!("AADSTS{code} ({error}): "),
        None => format!("{error}: "),
    }
}

impl CredentialError {
    /// A failure that may go away by itself (network, IdP outage), as opposed to one that needs
    /// an administrator (wrong secret, missing consent).
    pub fn is_transient(&self) -> bool {
        matches!(self, CredentialError::Unavailable { .. })
    }

    /// The AADSTS code when the identity platform gave one.
    pub fn aadsts(&self) -> Option<u64> {
        match self {
            CredentialError::Refused { code, .. } => *code,
            _ => None,
        }
    }
}

#[derive(Clone)]
struct CachedToken {
    token: Secret,
    refresh_after: Instant,
}

enum Source {
    EntraApp(entra::EntraApp),
}

struct Slot {
    source: Source,
    /// Held across the token request: that is what makes fetching single-flight.
    cache: Mutex<Option<CachedToken>>,
}

/// Every configured credential with its token cache.
#[derive(Clone)]
pub struct Credentials {
    slots: Arc<HashMap<String, Slot>>,
}

impl Credentials {
    pub fn from_config(config: &Config) -> Result<Credentials, CredentialError> {
        let http = oauth2::reqwest::Client::builder()
            // Following redirects from a token endpoint is an SSRF risk (the oauth2 crate's advice).
            .redirect(oauth2::reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| CredentialError::Unavailable {
                credential: "*".into(),
                url: String::new(),
                detail: format!("cannot build the HTTP client: {e}"),
            })?;
        let mut slots = HashMap::new();
        for (name, cfg) in &config.credentials {
            let source = match cfg {
                CredentialConfig::EntraAppSecret(app) => {
                    Source::EntraApp(entra::EntraApp::new(name, app, http.clone())?)
                }
            };
            slots.insert(
                name.clone(),
                Slot {
                    source,
                    cache: Mutex::new(None),
                },
            );
        }
        Ok(Credentials {
            slots: Arc::new(slots),
        })
    }

    /// The login for `user` (the mailbox address) with credential `credential`.
    pub async fn login(&self, credential: &str, user: &str) -> Result<SaslLogin, CredentialError> {
        let slot = self
            .slots
            .get(credential)
            .ok_or_else(|| CredentialError::Unknown {
                credential: credential.to_owned(),
            })?;
        let mut cache = slot.cache.lock().await;
        if let Some(cached) = cache.as_ref()
            && Instant::now() < cached.refresh_after
        {
            return Ok(SaslLogin::XOAuth2 {
                user: user.to_owned(),
                token: cached.token.clone(),
            });
        }
        let fresh = match &slot.source {
            Source::EntraApp(app) => app.request_token().await?,
        };
        let token = fresh.token.clone();
        *cache = Some(fresh);
        Ok(SaslLogin::XOAuth2 {
            user: user.to_owned(),
            token,
        })
    }

    /// Drops the cached token, e.g. after the server rejected it, so the next login asks anew.
    pub async fn invalidate(&self, credential: &str) {
        if let Some(slot) = self.slots.get(credential) {
            *slot.cache.lock().await = None;
        }
    }
}

/// When to stop using a token that expires in `lifetime`: five minutes early, or halfway
/// through for short-lived tokens.
fn refresh_margin(lifetime: Duration) -> Duration {
    std::cmp::min(Duration::from_secs(300), lifetime / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_margin_is_five_minutes_or_half_the_lifetime() {
        assert_eq!(
            refresh_margin(Duration::from_secs(3599)),
            Duration::from_secs(300)
        );
        assert_eq!(
            refresh_margin(Duration::from_secs(60)),
            Duration::from_secs(30)
        );
        assert_eq!(refresh_margin(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn refused_error_names_the_aadsts_code() {
        let e = CredentialError::Refused {
            credential: "app".into(),
            error: "invalid_client".into(),
            code: Some(7000215),
            description: "AADSTS7000215: Invalid client secret provided.".into(),
        };
        let text = e.to_string();
        assert!(text.contains("AADSTS7000215 (invalid_client)"), "{text}");
        assert!(!e.is_transient());
        assert_eq!(e.aadsts(), Some(7000215));
    }
}
