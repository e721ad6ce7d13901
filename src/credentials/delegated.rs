//! Delegated access (Entra `IMAP.AccessAsUser.All` + `offline_access`, or any OAuth2 provider):
//! one interactive login (authorization code + PKCE through a loopback redirect, or the device
//! code flow), then refresh tokens, each rotated one stored encrypted in the same step.

use std::time::{Duration, Instant};

use oauth2::basic::{
    BasicRevocationErrorResponse, BasicTokenIntrospectionResponse, BasicTokenResponse,
};
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken,
    DeviceAuthorizationUrl, EndpointMaybeSet, EndpointNotSet, EndpointSet, PkceCodeChallenge,
    RedirectUrl, RefreshToken, RequestTokenError, Scope, StandardDeviceAuthorizationResponse,
    StandardRevocableToken, TokenUrl,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::entra::{EntraErrorResponse, error_chain, token_result};
use super::{CachedToken, CredentialError, TokenStore, diagnose};
use crate::config::{DelegatedConfig, OAuthSasl};
use crate::secret::Secret;

type DelegatedClient = oauth2::Client<
    EntraErrorResponse,
    BasicTokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointSet,
    EndpointMaybeSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// How an interactive login talks to the person at the terminal.
pub trait LoginPrompt: Send {
    /// Open this URL in a browser (authorization code flow).
    fn open_url(&mut self, url: &str);
    /// Go to `verification_uri` and enter `user_code` (device code flow).
    fn enter_code(&mut self, verification_uri: &str, user_code: &str);
}

/// How long an interactive login may wait for the person.
const LOGIN_WAIT: Duration = Duration::from_secs(600);

pub(super) struct Delegated {
    credential: String,
    cfg: DelegatedConfig,
    client: DelegatedClient,
    http: oauth2::reqwest::Client,
    store: Option<TokenStore>,
    /// A rotated refresh token the store refused (database locked, disk full): the newest one,
    /// used for the next refresh instead of the stored one (which a rotating provider has
    /// revoked) and stored as soon as the store takes it; with the `stored_at` of the row it
    /// replaces. A row stored since (a new `auth login`) wins over it.
    unsaved: std::sync::Mutex<Option<(Secret, Option<String>)>>,
}

impl Delegated {
    pub(super) fn new(
        credential: &str,
        cfg: &DelegatedConfig,
        http: oauth2::reqwest::Client,
        store: Option<TokenStore>,
    ) -> Result<Delegated, CredentialError> {
        let bad = |what: &str, e: String| CredentialError::Login {
            credential: credential.to_owned(),
            detail: format!("invalid {what}: {e}"),
        };
        let mut client = oauth2::Client::new(ClientId::new(cfg.client_id.clone()))
            .set_auth_type(AuthType::RequestBody)
            .set_auth_uri(
                AuthUrl::new(cfg.authorization_url.clone())
                    .map_err(|e| bad("authorization URL", e.to_string()))?,
            )
            .set_token_uri(
                TokenUrl::new(cfg.token_url.clone())
                    .map_err(|e| bad("token URL", e.to_string()))?,
            )
            .set_device_authorization_url_option(
                cfg.device_authorization_url
                    .clone()
                    .map(DeviceAuthorizationUrl::new)
                    .transpose()
                    .map_err(|e| bad("device authorization URL", e.to_string()))?,
            )
            .set_redirect_uri(
                RedirectUrl::new(cfg.redirect_uri.clone())
                    .map_err(|e| bad("redirect URI", e.to_string()))?,
            );
        if let Some(secret) = &cfg.client_secret {
            client = client.set_client_secret(ClientSecret::new(secret.expose().to_owned()));
        }
        Ok(Delegated {
            credential: credential.to_owned(),
            cfg: cfg.clone(),
            client,
            http,
            store,
            unsaved: std::sync::Mutex::new(None),
        })
    }

    pub(super) fn sasl(&self) -> OAuthSasl {
        self.cfg.sasl
    }

    fn store(&self) -> Result<&TokenStore, CredentialError> {
        self.store.as_ref().ok_or_else(|| CredentialError::Store {
            credential: self.credential.clone(),
            detail: "no token store (configure [secrets] token_key_*)".into(),
            transient: false,
        })
    }

    fn scopes(&self) -> impl Iterator<Item = Scope> + '_ {
        self.cfg.scopes.iter().cloned().map(Scope::new)
    }

    fn keep_unsaved(&self, kept: Option<(Secret, Option<String>)>) {
        if let Ok(mut slot) = self.unsaved.lock() {
            *slot = kept;
        }
    }

    /// A fresh access token from the stored refresh token; a rotated refresh token replaces the
    /// stored one before the access token is handed out.
    pub(super) async fn refresh(&self) -> Result<CachedToken, CredentialError> {
        let store = self.store()?;
        let kept = self.unsaved.lock().ok().and_then(|slot| slot.clone());
        // Another worker on the same registry may be refreshing this credential right now:
        // take turns, so that no refresh token is ever exchanged twice (a rotating provider
        // refuses the second use, and some revoke every token of the sign-in for it).
        let lock = match (store.lock(&self.credential).await, &kept) {
            (Ok(lock), _) => Some(lock),
            // The store is failing: go on with the token kept in memory, as below.
            (Err(e), Some(_)) => {
                tracing::warn!(credential = %self.credential, error = %e, "refreshing without the credential lock");
                None
            }
            (Err(e), None) => return Err(e),
        };
        let result = self.refresh_holding_lock(store, kept).await;
        if let Some(lock) = lock
            && let Err(e) = lock.release().await
        {
            tracing::warn!(credential = %self.credential, error = %e, "could not release the credential lock");
        }
        result
    }

    /// [`Self::refresh`] once this process holds the credential's lock (or could not get it
    /// and has a token of its own in memory).
    async fn refresh_holding_lock(
        &self,
        store: &TokenStore,
        kept: Option<(Secret, Option<String>)>,
    ) -> Result<CachedToken, CredentialError> {
        let stored = match (store.load(&self.credential).await, &kept) {
            (Ok(stored), _) => stored,
            // The store cannot be read either: go on with the token kept in memory.
            (Err(_), Some(_)) => None,
            (Err(e), None) => return Err(e),
        };
        let stored_at = stored.as_ref().map(|s| s.stored_at.clone());
        let unsaved = match kept {
            // Unchanged since the rotation that could not be stored: the kept one is newer.
            Some((token, replaces)) if stored.is_none() || replaces == stored_at => Some(token),
            _ => None,
        };
        let current = match (&unsaved, stored) {
            (Some(token), _) => token.clone(),
            (None, Some(stored)) => stored.refresh_token,
            (None, None) => {
                return Err(CredentialError::NotLoggedIn {
                    credential: self.credential.clone(),
                });
            }
        };
        let started = Instant::now();
        let result = self
            .client
            .exchange_refresh_token(&RefreshToken::new(current.expose().to_owned()))
            .add_scopes(self.scopes())
            .request_async(&self.http)
            .await;
        let fresh = match token_result(&self.credential, &self.cfg.token_url, started, result) {
            Ok(fresh) => fresh,
            Err(e) => {
                // Refused: the kept token is no better than the stored one any more.
                if !e.is_transient() {
                    self.keep_unsaved(None);
                }
                return Err(e);
            }
        };
        // The newest refresh token: rotated now, or rotated earlier and not stored yet.
        match fresh.refresh_token.as_ref().or(unsaved.as_ref()) {
            Some(newest) => match store.save(&self.credential, newest.expose(), None).await {
                Ok(()) => {
                    self.keep_unsaved(None);
                    tracing::info!(credential = %self.credential, "refresh token rotated and stored");
                }
                // The access token is good, and the newest refresh token must not be lost with
                // this error: kept in memory, used and stored again at the next refresh.
                Err(e) => {
                    self.keep_unsaved(Some((newest.clone(), stored_at)));
                    tracing::error!(
                        credential = %self.credential,
                        error = %e,
                        "the rotated refresh token could not be stored; it is kept in memory and \
                         stored at the next refresh (a restart before then may need `mailintake auth login`)"
                    );
                }
            },
            // Only a "last used" time: a failure to write it must not cost the token.
            None => {
                if let Err(e) = store.touch(&self.credential).await {
                    tracing::warn!(credential = %self.credential, error = %e, "could not note the refresh token's use");
                }
            }
        }
        Ok(fresh)
    }

    async fn keep(&self, fresh: CachedToken, mailbox: &str) -> Result<String, CredentialError> {
        let refresh = fresh.refresh_token.ok_or_else(|| CredentialError::Login {
            credential: self.credential.clone(),
            detail: "the provider issued no refresh token: include \"offline_access\" (or the provider's equivalent) in scopes".into(),
        })?;
        let account = diagnose::jwt_claims(fresh.token.expose())
            .and_then(|c| {
                ["upn", "unique_name", "preferred_username", "email"]
                    .iter()
                    .find_map(|k| c.get(*k).and_then(|v| v.as_str()).map(str::to_owned))
            })
            .unwrap_or_else(|| mailbox.to_owned());
        // A worker may be refreshing the old sign-in right now: wait until it has stored its
        // rotated token, then store this sign-in over it. Stored without the lock, the worker's
        // rotation of the old sign-in could land after it and replace it.
        let store = self.store()?;
        let lock = store.lock(&self.credential).await?;
        let saved = store
            .save(&self.credential, refresh.expose(), Some(&account))
            .await;
        if let Err(e) = lock.release().await {
            tracing::warn!(credential = %self.credential, error = %e, "could not release the credential lock");
        }
        saved?;
        Ok(account)
    }

    /// Authorization code + PKCE: prints the URL to open, waits on the loopback redirect URI for
    /// the code, exchanges it and stores the refresh token.
    pub(super) async fn login_authorization_code(
        &self,
        mailbox: &str,
        prompt: &mut dyn LoginPrompt,
    ) -> Result<String, CredentialError> {
        self.store()?;
        let fail = |detail: String| CredentialError::Login {
            credential: self.credential.clone(),
            detail,
        };
        let redirect = oauth2::url::Url::parse(&self.cfg.redirect_uri)
            .map_err(|e| fail(format!("redirect_uri: {e}")))?;
        // A loopback redirect URI without a port means "any free port" (RFC 8252 section 7.3;
        // Entra ignores the port of loopback redirect URIs): listen on one the system picks and
        // send the URI with that port, in the authorization request and in the code exchange.
        let fixed = redirect.port();
        let listener = TcpListener::bind(("127.0.0.1", fixed.unwrap_or(0)))
            .await
            .map_err(|e| {
                fail(format!(
                    "cannot listen on 127.0.0.1:{} for the redirect ({e}); is another login running, or is redirect_uri's port taken? (a redirect_uri without a port takes any free one)",
                    fixed.unwrap_or(0)
                ))
            })?;
        let mut redirect_uri = redirect;
        if fixed.is_none() {
            let port = listener
                .local_addr()
                .map_err(|e| fail(format!("the redirect listener has no address: {e}")))?
                .port();
            redirect_uri
                .set_port(Some(port))
                .map_err(|()| fail(format!("redirect_uri {redirect_uri} cannot take a port")))?;
        }
        let redirect_uri = RedirectUrl::from_url(redirect_uri);
        let mut request = self
            .client
            .authorize_url(CsrfToken::new_random)
            .set_redirect_uri(std::borrow::Cow::Borrowed(&redirect_uri))
            .add_scopes(self.scopes())
            .add_extra_param("login_hint", mailbox);
        let verifier = if self.cfg.pkce {
            let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
            request = request.set_pkce_challenge(challenge);
            Some(verifier)
        } else {
            None
        };
        let (url, state) = request.url();
        prompt.open_url(url.as_str());
        let code = tokio::time::timeout(LOGIN_WAIT, wait_for_code(&listener, state.secret()))
            .await
            .map_err(|_| {
                fail(format!(
                    "no sign-in arrived at {} within {} minutes",
                    redirect_uri.as_str(),
                    LOGIN_WAIT.as_secs() / 60
                ))
            })?
            .map_err(|e| match e {
                CredentialError::Login { detail, .. } => fail(detail),
                other => other,
            })?;
        let mut exchange = self
            .client
            .exchange_code(AuthorizationCode::new(code))
            .set_redirect_uri(std::borrow::Cow::Borrowed(&redirect_uri));
        if let Some(verifier) = verifier {
            exchange = exchange.set_pkce_verifier(verifier);
        }
        let started = Instant::now();
        let result = exchange.request_async(&self.http).await;
        let fresh = token_result(&self.credential, &self.cfg.token_url, started, result)?;
        self.keep(fresh, mailbox).await
    }

    /// Device code flow for servers without a browser: prints where to go and the code to enter,
    /// polls until the person has signed in, stores the refresh token.
    pub(super) async fn login_device_code(
        &self,
        mailbox: &str,
        prompt: &mut dyn LoginPrompt,
    ) -> Result<String, CredentialError> {
        self.store()?;
        let fail = |detail: String| CredentialError::Login {
            credential: self.credential.clone(),
            detail,
        };
        let request = self.client.exchange_device_code().map_err(|_| {
            fail("this credential has no device_authorization_url; use the browser login (without --device-code)".into())
        })?;
        let details: StandardDeviceAuthorizationResponse = request
            .add_scopes(self.scopes())
            .request_async(&self.http)
            .await
            .map_err(|e| match e {
                RequestTokenError::ServerResponse(e) => super::entra::refused(&self.credential, e),
                other => fail(format!(
                    "device code request failed: {}",
                    error_chain(&other)
                )),
            })?;
        prompt.enter_code(
            details.verification_uri().as_str(),
            details.user_code().secret(),
        );
        let started = Instant::now();
        let token = self
            .client
            .exchange_device_access_token(&details)
            .request_async(&self.http, tokio::time::sleep, Some(LOGIN_WAIT))
            .await
            .map_err(|e| match e {
                RequestTokenError::ServerResponse(e) => fail(format!(
                    "the sign-in did not complete: {}{}",
                    e.error(),
                    e.error_description()
                        .map(|d| format!(": {d}"))
                        .unwrap_or_default()
                )),
                other => fail(format!(
                    "device code polling failed: {}",
                    error_chain(&other)
                )),
            })?;
        let fresh = token_result(&self.credential, &self.cfg.token_url, started, Ok(token))?;
        self.keep(fresh, mailbox).await
    }
}

/// Serves the loopback redirect until a request carries `code` (and the right `state`).
async fn wait_for_code(listener: &TcpListener, state: &str) -> Result<String, CredentialError> {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let mut buf = vec![0u8; 8192];
        let mut len = 0;
        while len < buf.len() {
            match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf[len..])).await
            {
                Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                Ok(Ok(n)) => {
                    len += n;
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
        let head = String::from_utf8_lossy(&buf[..len]);
        let target = head
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("/");
        let params: Vec<(String, String)> =
            oauth2::url::Url::parse(&format!("http://localhost{target}"))
                .map(|u| u.query_pairs().into_owned().collect())
                .unwrap_or_default();
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        // A code or an error ends the login only with this login's `state` (RFC 6749 4.1.2.1):
        // any local process can reach the loopback listener.
        let ours = get("state").as_deref() == Some(state);
        let (status, body, outcome) = match (get("code"), get("error")) {
            (Some(_), _) | (None, Some(_)) if !ours => (
                "400 Bad Request",
                "The sign-in answer does not belong to this login (state mismatch).",
                None,
            ),
            (Some(code), _) => (
                "200 OK",
                "Signed in. mailintake has what it needs; you can close this window.",
                Some(Ok(code)),
            ),
            (None, Some(error)) => {
                let description = get("error_description").unwrap_or_default();
                (
                    "400 Bad Request",
                    "The sign-in failed; see the terminal for details.",
                    Some(Err(format!("{error}: {description}"))),
                )
            }
            (None, None) => ("404 Not Found", "Not the sign-in redirect.", None),
        };
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
        match outcome {
            Some(Ok(code)) => return Ok(code),
            Some(Err(detail)) => {
                return Err(CredentialError::Login {
                    credential: String::new(),
                    detail: format!("the identity platform answered the sign-in with {detail}"),
                });
            }
            None => {}
        }
    }
}
