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

use base64::Engine as _;

use super::{CachedToken, CredentialError, refresh_margin};
use crate::config::{AppCertificate, EntraAppCertificate, EntraAppSecret};
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

pub(super) type EntraClient = oauth2::Client<
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

/// How the app proves who it is.
enum ClientAuth {
    Secret,
    Certificate(AppCertificate),
}

pub(super) struct EntraApp {
    credential: String,
    client_id: String,
    token_url: String,
    scope: String,
    auth: ClientAuth,
    client: EntraClient,
    http: oauth2::reqwest::Client,
}

impl EntraApp {
    pub(super) fn with_secret(
        credential: &str,
        app: &EntraAppSecret,
        http: oauth2::reqwest::Client,
    ) -> Result<EntraApp, CredentialError> {
        let client = Self::client(credential, &app.client_id, &app.token_url())?
            .set_client_secret(ClientSecret::new(app.client_secret.expose().to_owned()));
        Ok(EntraApp {
            credential: credential.to_owned(),
            client_id: app.client_id.clone(),
            token_url: app.token_url(),
            scope: app.scope.clone(),
            auth: ClientAuth::Secret,
            client,
            http,
        })
    }

    pub(super) fn with_certificate(
        credential: &str,
        app: &EntraAppCertificate,
        http: oauth2::reqwest::Client,
    ) -> Result<EntraApp, CredentialError> {
        Ok(EntraApp {
            credential: credential.to_owned(),
            client_id: app.client_id.clone(),
            token_url: app.token_url(),
            scope: app.scope.clone(),
            auth: ClientAuth::Certificate(app.certificate.clone()),
            client: Self::client(credential, &app.client_id, &app.token_url())?,
            http,
        })
    }

    fn client(
        credential: &str,
        client_id: &str,
        token_url: &str,
    ) -> Result<EntraClient, CredentialError> {
        let url =
            // A configuration fault (an odd tenant ID, say), not an outage: the authority is
            // checked when the configuration is loaded.
            TokenUrl::new(token_url.to_owned()).map_err(|e| CredentialError::Login {
                credential: credential.to_owned(),
                detail: format!("invalid token URL {token_url}: {e}"),
            })?;
        Ok(oauth2::Client::new(ClientId::new(client_id.to_owned()))
            // Microsoft expects client_id (and a secret) in the form body.
            .set_auth_type(AuthType::RequestBody)
            .set_token_uri(url))
    }

    pub(super) async fn request_token(&self) -> Result<CachedToken, CredentialError> {
        let started = Instant::now();
        let mut request = self
            .client
            .exchange_client_credentials()
            .add_scope(Scope::new(self.scope.clone()));
        if let ClientAuth::Certificate(cert) = &self.auth {
            let assertion =
                client_assertion(cert, &self.client_id, &self.token_url).map_err(|detail| {
                    CredentialError::Assertion {
                        credential: self.credential.clone(),
                        detail,
                    }
                })?;
            request = request
                .add_extra_param(
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                )
                .add_extra_param("client_assertion", assertion);
        }
        let result = request.request_async(&self.http).await;
        token_result(&self.credential, &self.token_url, started, result)
    }
}

/// Turns an oauth2 token response into our cache entry or a typed error.
pub(super) fn token_result(
    credential: &str,
    token_url: &str,
    started: Instant,
    result: Result<
        BasicTokenResponse,
        RequestTokenError<oauth2::HttpClientError<oauth2::reqwest::Error>, EntraErrorResponse>,
    >,
) -> Result<CachedToken, CredentialError> {
    let unavailable = |detail: String| CredentialError::Unavailable {
        credential: credential.to_owned(),
        url: token_url.to_owned(),
        detail,
    };
    match result {
        Ok(response) => {
            // `expires_in` comes from the endpoint: a day at most, so that no absurd value can
            // overflow the clock arithmetic below (or keep a token past its revocation).
            let lifetime = response
                .expires_in()
                .unwrap_or(Duration::from_secs(3599))
                .min(MAX_TOKEN_LIFETIME);
            tracing::info!(
                credential = %credential,
                expires_in_s = lifetime.as_secs(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "access token issued"
            );
            Ok(CachedToken {
                token: Secret::new(response.access_token().secret().clone()),
                refresh_token: response
                    .refresh_token()
                    .map(|r| Secret::new(r.secret().clone())),
                refresh_after: started + lifetime - refresh_margin(lifetime),
            })
        }
        // RFC 6749 §5.2/§4.1.2.1: the server is overloaded or failing, which says nothing
        // about the credential.
        Err(RequestTokenError::ServerResponse(e))
            if matches!(e.error.as_str(), "temporarily_unavailable" | "server_error") =>
        {
            Err(unavailable(format!(
                "the identity platform answered {}{}",
                e.error,
                e.error_description
                    .as_deref()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            )))
        }
        Err(RequestTokenError::ServerResponse(e)) => Err(refused(credential, e)),
        Err(RequestTokenError::Request(e)) => {
            Err(unavailable(format!("request failed: {}", error_chain(&e))))
        }
        Err(RequestTokenError::Parse(e, body)) => Err(unavailable(format!(
            "answer is not an OAuth2 token response ({}); {}",
            without_token_values(&e.to_string(), &body),
            describe_unparsed_body(&body)
        ))),
        Err(RequestTokenError::Other(detail)) => Err(unavailable(detail)),
    }
}

/// The longest access-token lifetime believed from a token response.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Keys of a token endpoint's JSON whose values are secrets.
fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    (key.contains("token") && key != "token_type") || key.contains("secret") || key == "password"
}

/// What can be said of a token endpoint's answer that oauth2 could not parse, without its
/// secrets. A successful answer in an unexpected shape (say `expires_in` as a string) still
/// holds the access and refresh tokens, and this text reaches logs and `check`: a JSON object is
/// described by its keys (with the values of `error` and `error_description`), anything else
/// that mentions a token only by its length, and the rest (a proxy's HTML page) by its start.
fn describe_unparsed_body(body: &[u8]) -> String {
    if let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice(body) {
        let keys: Vec<&str> = fields.keys().map(String::as_str).collect();
        let mut text = format!("the answer is a JSON object with the keys {keys:?}");
        for key in ["error", "error_description"] {
            if let Some(serde_json::Value::String(value)) = fields.get(key) {
                text.push_str(&format!("; {key}: {value:?}"));
            }
        }
        return text;
    }
    let text = String::from_utf8_lossy(body);
    if text.to_ascii_lowercase().contains("token") {
        return format!(
            "the answer ({} bytes) is not shown: it mentions a token",
            body.len()
        );
    }
    let snippet: String = text.chars().take(200).collect();
    format!("the answer starts: {snippet:?}")
}

/// `message` with every secret value of the JSON `body` cut out (a parse error may quote the
/// value it choked on).
fn without_token_values(message: &str, body: &[u8]) -> String {
    let mut message = message.to_owned();
    if let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice(body) {
        for (key, value) in &fields {
            let secret = match value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            if is_secret_key(key) && !secret.is_empty() {
                message = message.replace(&secret, "[redacted]");
            }
        }
    }
    message
}

pub(super) fn refused(credential: &str, e: EntraErrorResponse) -> CredentialError {
    CredentialError::Refused {
        credential: credential.to_owned(),
        code: e
            .error_codes
            .first()
            .copied()
            .or_else(|| parse_aadsts(e.error_description.as_deref().unwrap_or_default())),
        description: e
            .error_description
            .as_deref()
            .unwrap_or("(no description)")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
        error: e.error,
    }
}

/// An RS256 client assertion (RFC 7523) with the `x5t#S256` header Entra looks the certificate
/// up by; valid for ten minutes.
fn client_assertion(
    cert: &AppCertificate,
    client_id: &str,
    token_url: &str,
) -> Result<String, String> {
    use openssl::hash::MessageDigest;
    use openssl::pkey::PKey;
    use openssl::sign::Signer;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let now = chrono::Utc::now().timestamp();
    let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5t#S256": cert.x5t_s256});
    let jti: [u8; 16] = rand::random();
    let claims = serde_json::json!({
        "aud": token_url, "iss": client_id, "sub": client_id, "jti": hex::encode(jti),
        "nbf": now, "iat": now, "exp": now + 600,
    });
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let key = PKey::private_key_from_pem(cert.private_key_pem.expose().as_bytes())
        .map_err(|e| format!("private key of {}: {e}", cert.path.display()))?;
    let mut signer = Signer::new(MessageDigest::sha256(), &key).map_err(|e| e.to_string())?;
    signer.update(input.as_bytes()).map_err(|e| e.to_string())?;
    let signature = signer.sign_to_vec().map_err(|e| e.to_string())?;
    Ok(format!("{input}.{}", b64(&signature)))
}

/// `AADSTS7000215: …` → 7000215, for responses that omit `error_codes`.
fn parse_aadsts(description: &str) -> Option<u64> {
    let rest = description.trim_start().strip_prefix("AADSTS")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
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

    #[test]
    fn an_unparsable_token_answer_is_described_without_its_tokens() {
        // `expires_in` as a string: oauth2 rejects the answer, which still holds both tokens.
        let body = br#"{"token_type":"Bearer","expires_in":"3600","access_token":"AT-s3cret-1","refresh_token":"RT-s3cret-2"}"#;
        let error = serde_json::from_slice::<oauth2::basic::BasicTokenResponse>(body)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("3600"), "{error}");
        let text = format!(
            "{}; {}",
            without_token_values(&error, body),
            describe_unparsed_body(body)
        );
        assert!(!text.contains("s3cret"), "{text}");
        assert!(
            text.contains(r#""expires_in""#) && text.contains(r#""refresh_token""#),
            "{text}"
        );

        // A token of the wrong type is quoted by serde's message: cut out as well.
        let body = br#"{"token_type":"Bearer","access_token":987654321}"#;
        let error = serde_json::from_slice::<oauth2::basic::BasicTokenResponse>(body)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("987654321"), "{error}");
        assert!(!without_token_values(&error, body).contains("987654321"));

        // Not JSON: a form-encoded answer mentioning a token is not shown, a proxy's page is.
        let form = b"access_token=AT-s3cret-3&token_type=bearer";
        assert!(!describe_unparsed_body(form).contains("s3cret"));
        let page = b"<html><body>502 Bad Gateway</body></html>";
        assert!(describe_unparsed_body(page).contains("502 Bad Gateway"));
        let error = br#"{"error":"invalid_request","error_description":"bad things","x":1}"#;
        let described = describe_unparsed_body(error);
        assert!(
            described.contains("invalid_request") && described.contains("bad things"),
            "{described}"
        );
    }
}
