//! Microsoft Entra ID (identity platform v2): client-credentials grant for app-only IMAP access.

use std::time::{Duration, Instant};

use oauth2::basic::{
    BasicRevocationErrorResponse, BasicTokenIntrospectionResponse, BasicTokenResponse,
};
use oauth2::{
    AuthType, ClientId, ClientSecret, EndpointNotSet, EndpointSet, RequestTokenError, Scope,
    StandardRevocableToken, TokenResponse, TokenUrl,
};
use serde::{Deserialize, Serialize};

use super::{CachedToken, CredentialError, refresh_margin};
use crate::config::EntraAppSecret;
use crate::secret::Secret;

/// Entra's error body: the RFC 6749 fields plus `error_codes` (the AADSTS numbers) and the
/// trace/correlation ids that Microsoft support asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntraErrorResponse {
    pub error: String,
    #[serde(default)]
    pub error_description: Option<String>,
    #[serde(default)]
    pub error_codes: Vec<u64>,
    #[serde(default)]
    pub trace_id: Option<String>,
    #[serde(default)]
    pub correlation_id: Option<String>,
}

impl std::fmt::Display for EntraErrorResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.error)?;
        if let Some(d) = &self.error_description {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

impl oauth2::ErrorResponse for EntraErrorResponse {}

type EntraClient = oauth2::Client<
    EntraErrorResponse,
    BasicTokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

pub(super) struct EntraApp {
    credential: String,
    token_url: String,
    scope: String,
    client: EntraClient,
    http: oauth2::reqwest::Client,
}

impl EntraApp {
    pub(super) fn new(
        credential: &str,
        app: &EntraAppSecret,
        http: oauth2::reqwest::Client,
    ) -> Result<EntraApp, CredentialError> {
        let token_url = app.token_url();
        let url = TokenUrl::new(token_url.clone()).map_err(|e| CredentialError::Unavailable {
            credential: credential.to_owned(),
            url: token_url.clone(),
            detail: format!("invalid token URL: {e}"),
        })?;
        let client = oauth2::Client::new(ClientId::new(app.client_id.clone()))
            .set_client_secret(ClientSecret::new(app.client_secret.expose().to_owned()))
            // Microsoft expects client_id/client_secret in the form body.
            .set_auth_type(AuthType::RequestBody)
            .set_token_uri(url);
        Ok(EntraApp {
            credential: credential.to_owned(),
            token_url,
            scope: app.scope.clone(),
            client,
            http,
        })
    }

    pub(super) async fn request_token(&self) -> Result<CachedToken, CredentialError> {
        let started = Instant::now();
        let result = self
            .client
            .exchange_client_credentials()
            .add_scope(Scope::new(self.scope.clone()))
            .request_async(&self.http)
            .await;
        match result {
            Ok(response) => {
                let lifetime = response.expires_in().unwrap_or(Duration::from_secs(3599));
                tracing::info!(
                    credential = %self.credential,
                    expires_in_s = lifetime.as_secs(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "access token issued"
                );
                Ok(CachedToken {
                    token: Secret::new(response.access_token().secret().clone()),
                    refresh_after: started + lifetime - refresh_margin(lifetime),
                })
            }
            Err(RequestTokenError::ServerResponse(e)) => {
                Err(CredentialError::Refused {
                    credential: self.credential.clone(),
                    code: e.error_codes.first().copied().or_else(|| {
                        parse_aadsts(e.error_description.as_deref().unwrap_or_default())
                    }),
                    description: e
                        .error_description
                        .as_deref()
                        .unwrap_or("(no description)")
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" "),
                    error: e.error,
                })
            }
            Err(RequestTokenError::Request(e)) => {
                Err(self.unavailable(format!("request failed: {}", error_chain(&e))))
            }
            Err(RequestTokenError::Parse(e, body)) => {
                let snippet: String = String::from_utf8_lossy(&body).chars().take(200).collect();
                Err(self.unavailable(format!(
                    "answer is not an OAuth2 token response ({e}); body starts: {snippet:?}"
                )))
            }
            Err(RequestTokenError::Other(detail)) => Err(self.unavailable(detail)),
        }
    }

    fn unavailable(&self, detail: String) -> CredentialError {
        CredentialError::Unavailable {
            credential: self.credential.clone(),
            url: self.token_url.clone(),
            detail,
        }
    }
}

/// `AADSTS7000215: …` → 7000215, for responses that omit `error_codes`.
fn parse_aadsts(description: &str) -> Option<u64> {
    let rest = description.trim_start().strip_prefix("AADSTS")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aadsts_code_is_read_from_the_description() {
        assert_eq!(
            parse_aadsts("AADSTS7000215: Invalid client secret"),
            Some(7000215)
        );
        assert_eq!(parse_aadsts("something else"), None);
    }
}
