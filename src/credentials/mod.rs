//! Token sources for mailbox logins, one per configured credential, each with its own cache.
//!
//! A token is fetched single-flight: callers sharing a credential wait on one request and reuse
//! its answer until shortly before it expires. Delegated credentials refresh with the stored
//! (encrypted) refresh token and store every rotated one in the same step.

mod delegated;
pub mod diagnose;
mod entra;
pub mod expiry;
pub mod store;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

pub use delegated::LoginPrompt;
pub use entra::EntraErrorResponse;
pub use store::{StoredToken, TokenStore};

use crate::config::{Config, CredentialConfig, OAuthSasl, PasswordConfig, PasswordMechanism};
use crate::secret::Secret;

/// What a mailbox session needs to log in.
#[derive(Debug, Clone)]
pub enum SaslLogin {
    /// SASL XOAUTH2 with a bearer token.
    XOAuth2 { user: String, token: Secret },
    /// SASL OAUTHBEARER (RFC 7628).
    OAuthBearer { user: String, token: Secret },
    /// SASL PLAIN.
    Plain { user: String, password: Secret },
    /// IMAP LOGIN.
    Login { user: String, password: Secret },
}

impl SaslLogin {
    pub fn mechanism(&self) -> &'static str {
        match self {
            SaslLogin::XOAuth2 { .. } => "XOAUTH2",
            SaslLogin::OAuthBearer { .. } => "OAUTHBEARER",
            SaslLogin::Plain { .. } => "PLAIN",
            SaslLogin::Login { .. } => "LOGIN",
        }
    }

    /// The bearer token, for diagnosing a refused login.
    pub fn bearer(&self) -> Option<&Secret> {
        match self {
            SaslLogin::XOAuth2 { token, .. } | SaslLogin::OAuthBearer { token, .. } => Some(token),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("credential `{credential}` is not configured")]
    Unknown { credential: String },
    /// The identity platform answered with an OAuth2 error (AADSTS… for Microsoft).
    #[error("the identity platform refused credential `{credential}`: {}{}{}", render_code(*.code, error), description, render_hint(*.code, error))]
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
    #[error(
        "credential `{credential}` has no stored refresh token: run `mailintake auth login <mailbox>` first"
    )]
    NotLoggedIn { credential: String },
    #[error("credential `{credential}`: cannot sign the client assertion: {detail}")]
    Assertion { credential: String, detail: String },
    #[error("credential `{credential}`: token store: {detail}")]
    Store {
        credential: String,
        detail: String,
        /// The registry that keeps the tokens could not be reached (a database restart, a
        /// network outage): it may come back by itself, unlike a wrong key or a damaged token.
        transient: bool,
    },
    #[error("credential `{credential}`: {detail}")]
    Login { credential: String, detail: String },
}

fn render_code(code: Option<u64>, error: &str) -> String {
    match code {
        Some(code) => format!("AADSTS{code} ({error}): "),
        None => format!("{error}: "),
    }
}

fn render_hint(code: Option<u64>, error: &str) -> String {
    match diagnose_refusal(code, error) {
        Some(d) => format!(" — {}; fix: {}", d.meaning, d.fix),
        None => String::new(),
    }
}

/// What a refusal means: Microsoft's AADSTS code when given, else the standard OAuth2 error.
fn diagnose_refusal(code: Option<u64>, error: &str) -> Option<diagnose::Diagnosis> {
    code.and_then(diagnose::aadsts)
        .or_else(|| diagnose::oauth_error(error))
}

impl CredentialError {
    /// A failure that may go away by itself (network, IdP outage), as opposed to one that needs
    /// an administrator (wrong secret, missing consent).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            CredentialError::Unavailable { .. }
                | CredentialError::Store {
                    transient: true,
                    ..
                }
        )
    }

    /// What the identity platform's refusal means and what to do, when known.
    pub fn diagnosis(&self) -> Option<diagnose::Diagnosis> {
        match self {
            CredentialError::Refused { code, error, .. } => diagnose_refusal(*code, error),
            _ => None,
        }
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
    refresh_token: Option<Secret>,
    refresh_after: Instant,
}

enum Source {
    EntraApp(entra::EntraApp),
    Delegated(delegated::Delegated),
    Password(PasswordConfig),
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

/// The HTTP client for identity platforms: no redirects (an SSRF risk, the oauth2 crate's
/// advice), bounded waits, the system trust store.
pub fn http_client() -> Result<oauth2::reqwest::Client, CredentialError> {
    oauth2::reqwest::Client::builder()
        .redirect(oauth2::reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| CredentialError::Unavailable {
            credential: "*".into(),
            url: String::new(),
            detail: format!("cannot build the HTTP client: {e}"),
        })
}

impl Credentials {
    /// `store` keeps delegated credentials' refresh tokens; without it they cannot log in.
    pub fn from_config(
        config: &Config,
        store: Option<TokenStore>,
    ) -> Result<Credentials, CredentialError> {
        let http = http_client()?;
        let mut slots = HashMap::new();
        for (name, cfg) in &config.credentials {
            let source = match cfg {
                CredentialConfig::EntraAppSecret(app) => {
                    Source::EntraApp(entra::EntraApp::with_secret(name, app, http.clone())?)
                }
                CredentialConfig::EntraAppCertificate(app) => {
                    Source::EntraApp(entra::EntraApp::with_certificate(name, app, http.clone())?)
                }
                CredentialConfig::Delegated(d) => Source::Delegated(delegated::Delegated::new(
                    name,
                    d,
                    http.clone(),
                    store.clone(),
                )?),
                CredentialConfig::Password(p) => Source::Password(p.clone()),
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

    fn slot(&self, credential: &str) -> Result<&Slot, CredentialError> {
        self.slots
            .get(credential)
            .ok_or_else(|| CredentialError::Unknown {
                credential: credential.to_owned(),
            })
    }

    /// The login for `user` (the mailbox address) with credential `credential`.
    pub async fn login(&self, credential: &str, user: &str) -> Result<SaslLogin, CredentialError> {
        let slot = self.slot(credential)?;
        let sasl = match &slot.source {
            Source::Password(p) => {
                let user = p.username.clone().unwrap_or_else(|| user.to_owned());
                let password = p.password.clone();
                return Ok(match p.mechanism {
                    PasswordMechanism::Plain => SaslLogin::Plain { user, password },
                    PasswordMechanism::Login => SaslLogin::Login { user, password },
                });
            }
            Source::Delegated(d) => d.sasl(),
            Source::EntraApp(_) => OAuthSasl::XOAuth2,
        };
        let mut cache = slot.cache.lock().await;
        let token = match cache.as_ref() {
            Some(cached) if Instant::now() < cached.refresh_after => cached.token.clone(),
            _ => {
                let fresh = match &slot.source {
                    Source::EntraApp(app) => app.request_token().await?,
                    Source::Delegated(d) => d.refresh().await?,
                    Source::Password(_) => unreachable!("handled above"),
                };
                let token = fresh.token.clone();
                *cache = Some(fresh);
                token
            }
        };
        let user = user.to_owned();
        Ok(match sasl {
            OAuthSasl::XOAuth2 => SaslLogin::XOAuth2 { user, token },
            OAuthSasl::OAuthBearer => SaslLogin::OAuthBearer { user, token },
        })
    }

    /// Drops the cached token, e.g. after the server rejected it, so the next login asks anew.
    pub async fn invalidate(&self, credential: &str) {
        if let Some(slot) = self.slots.get(credential) {
            *slot.cache.lock().await = None;
        }
    }

    /// Interactive login of a delegated credential (`mailintake auth login`): authorization code
    /// with PKCE through the loopback redirect, or the device code flow. Stores the refresh token
    /// and returns the account that signed in.
    pub async fn interactive_login(
        &self,
        credential: &str,
        mailbox: &str,
        device_code: bool,
        prompt: &mut dyn LoginPrompt,
    ) -> Result<String, CredentialError> {
        let slot = self.slot(credential)?;
        let Source::Delegated(d) = &slot.source else {
            return Err(CredentialError::Login {
                credential: credential.to_owned(),
                detail: "only delegated credentials (entra-delegated, oauth2) log in interactively; app-only and password credentials need no login".into(),
            });
        };
        let account = if device_code {
            d.login_device_code(mailbox, prompt).await?
        } else {
            d.login_authorization_code(mailbox, prompt).await?
        };
        *slot.cache.lock().await = None;
        Ok(account)
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
    fn refused_error_names_the_aadsts_code_and_the_fix() {
        let e = CredentialError::Refused {
            credential: "app".into(),
            error: "invalid_client".into(),
            code: Some(7000215),
            description: "AADSTS7000215: Invalid client secret provided.".into(),
        };
        let text = e.to_string();
        assert!(text.contains("AADSTS7000215 (invalid_client)"), "{text}");
        assert!(text.contains("Secret ID"), "{text}");
        assert!(!e.is_transient());
        assert_eq!(e.aadsts(), Some(7000215));
    }

    #[test]
    fn a_refusal_without_an_aadsts_code_is_explained_by_its_oauth2_error() {
        let e = CredentialError::Refused {
            credential: "user".into(),
            error: "invalid_grant".into(),
            code: None,
            description: "Token is not active".into(),
        };
        let text = e.to_string();
        assert!(
            text.contains("invalid_grant: Token is not active — "),
            "{text}"
        );
        assert!(
            text.contains("fix: run `mailintake auth login <mailbox>` again"),
            "{text}"
        );
        assert!(e.diagnosis().is_some());
        // An AADSTS code says more than the generic error and wins.
        let e = CredentialError::Refused {
            credential: "user".into(),
            error: "invalid_grant".into(),
            code: Some(700082),
            description: "AADSTS700082: expired".into(),
        };
        assert!(e.to_string().contains("90 days"), "{e}");
        // An error the standard does not list gets no guess.
        let e = CredentialError::Refused {
            credential: "user".into(),
            error: "temporarily_unavailable_custom".into(),
            code: None,
            description: "try later".into(),
        };
        assert!(e.diagnosis().is_none());
        assert!(!e.to_string().contains("fix:"), "{e}");
    }
}
