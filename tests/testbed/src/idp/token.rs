//! `POST /{tenant}/oauth2/v2.0/token`: client authentication and the grants.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;
use base64::Engine as _;
use serde_json::json;

use super::errors::{AadError, entra_datetime, unavailable};
use super::jwt::{self, JWT_BEARER};
use super::{
    App, ClientAuth, Directory, Issued, OUTLOOK_SCOPE, RefreshState, Shared, Subject,
    json_response, lock, random_string, unix_now,
};

/// The form parameters of a request (first occurrence of each name wins).
pub(super) struct Params(Vec<(String, String)>);

impl Params {
    pub(super) fn parse(body: &[u8]) -> Self {
        Params(
            form_urlencoded::parse(body)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    /// The value of a parameter; empty values count as absent, as in Entra.
    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    pub(super) fn require(&self, name: &str) -> Result<&str, AadError> {
        self.get(name)
            .ok_or_else(|| AadError::missing_parameter(name))
    }
}

/// How the client tried to prove its identity.
enum Credential {
    /// A client secret, from the form body or HTTP Basic authentication.
    Secret(String),
    /// An RFC 7523 client assertion.
    Assertion {
        assertion_type: Option<String>,
        assertion: String,
    },
    /// No credential at all.
    None,
}

/// Which rules of client authentication apply.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// client_credentials: a credential is always required.
    AppOnly,
    /// authorization_code and refresh_token: confidential clients authenticate, public
    /// clients must not present credentials.
    Delegated,
    /// The device code grant: public client flows need no credential.
    Device,
}

/// A token request as read from the wire.
struct TokenRequest<'a> {
    /// Lower-cased tenant from the path.
    tenant: String,
    /// The tenant as it appears in the URL.
    tenant_path: &'a str,
    /// The URL the request was sent to (the audience of client assertions).
    token_url: String,
    params: &'a Params,
    /// The client the request names, if it names one.
    client_id: Option<String>,
    credential: Credential,
}

pub(super) async fn token_endpoint(
    State(shared): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if method == Method::POST {
        shared.token_requests.fetch_add(1, Ordering::SeqCst);
    }
    if shared.down.load(Ordering::SeqCst) {
        return unavailable();
    }
    let correlation_id = headers
        .get("client-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if method != Method::POST {
        return AadError::new(900561, &[("method", method.as_str())]).into_response(correlation_id);
    }
    let delay = shared.token_delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    }
    let params = Params::parse(&body);
    if params.get("grant_type") == Some("refresh_token") {
        shared.refresh_requests.fetch_add(1, Ordering::SeqCst);
    }
    let result = read_request(&shared.authority, &tenant, &headers, &params).and_then(|request| {
        let mut dir = lock(&shared.directory);
        handle(&mut dir, &request)
    });
    match result {
        Ok(issued) => {
            let mut body = json!({
                "token_type": "Bearer",
                "expires_in": issued.expires_in,
                "ext_expires_in": issued.expires_in,
                "access_token": issued.access_token,
            });
            let fields = body.as_object_mut().expect("an object");
            if let Some(scope) = issued.scope {
                fields.insert("scope".into(), json!(scope));
            }
            if let Some(refresh_token) = issued.refresh_token {
                fields.insert("refresh_token".into(), json!(refresh_token));
            }
            if shared.expires_in_as_string.load(Ordering::SeqCst) {
                fields.insert("expires_in".into(), json!(issued.expires_in.to_string()));
            }
            json_response(StatusCode::OK, &body)
        }
        Err(error) => error.into_response(correlation_id),
    }
}

/// Reads the client's identity and credential. HTTP Basic credentials, when present,
/// take precedence over form parameters.
fn read_request<'a>(
    authority: &str,
    tenant_path: &'a str,
    headers: &HeaderMap,
    params: &'a Params,
) -> Result<TokenRequest<'a>, AadError> {
    let (client_id, credential) = match basic_credentials(headers)? {
        Some((id, secret)) => (Some(id), Credential::Secret(secret)),
        None => {
            let credential = if let Some(assertion) = params.get("client_assertion") {
                Credential::Assertion {
                    assertion_type: params.get("client_assertion_type").map(str::to_string),
                    assertion: assertion.to_string(),
                }
            } else if let Some(secret) = params.get("client_secret") {
                Credential::Secret(secret.to_string())
            } else {
                Credential::None
            };
            let client_id = params.get("client_id").map(str::to_string).or_else(|| {
                // Entra reads the client from the assertion when client_id is absent.
                match &credential {
                    Credential::Assertion { assertion, .. } => jwt::Jws::parse(assertion)
                        .and_then(|jws| jws.claim_str("iss").map(str::to_string)),
                    _ => None,
                }
            });
            (client_id, credential)
        }
    };
    Ok(TokenRequest {
        tenant: tenant_path.to_ascii_lowercase(),
        tenant_path,
        token_url: format!("{authority}/{tenant_path}/oauth2/v2.0/token"),
        params,
        client_id,
        credential,
    })
}

/// Validates a token request and dispatches on its grant type.
fn handle(dir: &mut Directory, request: &TokenRequest<'_>) -> Result<Issued, AadError> {
    if let Some(client_id) = &request.client_id
        && let Some(code) = dir.injected.get_mut(client_id).and_then(|q| q.pop_front())
    {
        return Err(injected_error(code, client_id, request));
    }
    if !dir.tenants.contains(&request.tenant) {
        return Err(AadError::tenant_not_found(request.tenant_path));
    }
    let grant_type = request.params.require("grant_type")?;
    match grant_type {
        "client_credentials" => client_credentials_grant(dir, request),
        "authorization_code" => authorization_code_grant(dir, request),
        "refresh_token" => refresh_token_grant(dir, request),
        "urn:ietf:params:oauth:grant-type:device_code" => device_code_grant(dir, request),
        other => Err(AadError::new(70003, &[("grant_type", other)])),
    }
}

/// An error injected with `fail_next_token_request`, its placeholders filled from the
/// request and plausible defaults.
fn injected_error(code: u64, client_id: &str, request: &TokenRequest<'_>) -> AadError {
    let params = request.params;
    let grant_type = params.get("grant_type").unwrap_or("client_credentials");
    let param = match grant_type {
        "authorization_code" => "code",
        "urn:ietf:params:oauth:grant-type:device_code" => "device_code",
        _ => "refresh_token",
    };
    let now = unix_now();
    let issued = entra_datetime(now - 90 * 86_400 - 3_600);
    let now_text = entra_datetime(now);
    let nbf = entra_datetime(now - 900);
    let exp = entra_datetime(now - 300);
    let thumbprint: String = random_string(40)
        .bytes()
        .map(|b| char::from(b"0123456789ABCDEF"[usize::from(b % 16)]))
        .collect();
    let redirect_uri = params.get("redirect_uri").unwrap_or("http://localhost/");
    AadError::new(
        code,
        &[
            ("client_id", client_id),
            ("tenant", request.tenant_path),
            ("scope", params.get("scope").unwrap_or(OUTLOOK_SCOPE)),
            ("param", param),
            ("grant_type", grant_type),
            ("issued", &issued),
            ("revoked", &now_text),
            ("now", &now_text),
            ("nbf", &nbf),
            ("exp", &exp),
            ("reason", "The key was not found."),
            ("thumbprint", &thumbprint),
            ("found_key", ""),
            ("redirect_uri", redirect_uri),
            ("expected", redirect_uri),
            ("user", "user"),
            ("response_type", "code"),
            ("method", "POST"),
        ],
    )
}

/// Identifies and authenticates the client of a token request for `flow`; checks consent.
fn authenticate(
    dir: &Directory,
    request: &TokenRequest<'_>,
    flow: Flow,
) -> Result<(String, ClientAuth), AadError> {
    let Some(client_id) = request.client_id.clone() else {
        return Err(AadError::missing_parameter("client_id"));
    };
    let app = dir
        .apps
        .get(&client_id)
        .filter(|app| app.tenant == request.tenant)
        .ok_or_else(|| AadError::app_not_found(&client_id, request.tenant_path))?;
    let auth = match &request.credential {
        Credential::None => match flow {
            Flow::AppOnly => {
                let grant_type = request.params.get("grant_type").unwrap_or_default();
                return Err(AadError::new(7000216, &[("grant_type", grant_type)]));
            }
            Flow::Delegated if app.is_confidential() => return Err(AadError::new(7000218, &[])),
            Flow::Device if app.delegated.is_none() => return Err(AadError::new(7000218, &[])),
            Flow::Delegated | Flow::Device => ClientAuth::Public,
        },
        Credential::Secret(_) | Credential::Assertion { .. }
            if flow != Flow::AppOnly && !app.is_confidential() =>
        {
            return Err(AadError::new(700025, &[]));
        }
        Credential::Secret(secret) => {
            if app.secret.as_deref() != Some(secret.as_str()) {
                return Err(AadError::new(7000215, &[("client_id", &client_id)]));
            }
            if app.secret_expired {
                return Err(AadError::new(7000222, &[("client_id", &client_id)]));
            }
            ClientAuth::Secret
        }
        Credential::Assertion {
            assertion_type,
            assertion,
        } => {
            check_assertion(
                app,
                &client_id,
                request,
                assertion_type.as_deref(),
                assertion,
            )?;
            ClientAuth::Certificate
        }
    };
    if dir.no_consent.contains(&client_id) {
        return Err(AadError::no_consent(&client_id));
    }
    Ok((client_id, auth))
}

fn check_assertion(
    app: &App,
    client_id: &str,
    request: &TokenRequest<'_>,
    assertion_type: Option<&str>,
    assertion: &str,
) -> Result<(), AadError> {
    match assertion_type {
        None => return Err(AadError::missing_parameter("client_assertion_type")),
        Some(JWT_BEARER) => {}
        Some(other) => {
            return Err(AadError::invalid_jwt(&format!(
                "The client_assertion_type '{other}' is not supported; use '{JWT_BEARER}'."
            )));
        }
    }
    jwt::verify_client_assertion(
        assertion,
        client_id,
        &request.token_url,
        &app.certificates,
        unix_now(),
    )
}

/// The OAuth 2.0 client credentials grant (app-only access).
fn client_credentials_grant(
    dir: &mut Directory,
    request: &TokenRequest<'_>,
) -> Result<Issued, AadError> {
    let (client_id, auth) = authenticate(dir, request, Flow::AppOnly)?;
    let scope = request.params.require("scope")?;
    if scope.trim() != OUTLOOK_SCOPE {
        return Err(AadError::new(1002012, &[("scope", scope)]));
    }
    let (access_token, expires_in) =
        dir.issue_access(&client_id, &request.tenant, Subject::App, auth);
    Ok(Issued {
        access_token,
        expires_in,
        refresh_token: None,
        scope: None,
    })
}

/// The authorization code grant (RFC 6749 4.1) with PKCE (RFC 7636).
fn authorization_code_grant(
    dir: &mut Directory,
    request: &TokenRequest<'_>,
) -> Result<Issued, AadError> {
    let (client_id, auth) = authenticate(dir, request, Flow::Delegated)?;
    let params = request.params;
    let code_value = params.require("code")?;
    let require_pkce = dir
        .apps
        .get(&client_id)
        .and_then(|app| app.delegated.as_ref())
        .is_some_and(|d| d.require_pkce);
    let Some(code) = dir.auth_codes.get_mut(code_value) else {
        return Err(AadError::invalid_value("code"));
    };
    if code.client_id != client_id || code.tenant != request.tenant {
        return Err(AadError::invalid_value("code"));
    }
    if code.redeemed {
        return Err(AadError::new(54005, &[]));
    }
    // Any attempt uses the code up.
    code.redeemed = true;
    if Instant::now() >= code.expires_at {
        return Err(AadError::new(70008, &[]));
    }
    let redirect_uri = params.require("redirect_uri")?;
    if redirect_uri != code.redirect_uri {
        return Err(AadError::new(
            500112,
            &[
                ("redirect_uri", redirect_uri),
                ("expected", &code.redirect_uri),
            ],
        ));
    }
    match &code.challenge {
        None if require_pkce => return Err(AadError::new(9002325, &[])),
        None => {}
        Some((challenge, method)) => {
            let verified = params
                .get("code_verifier")
                .is_some_and(|verifier| pkce_matches(verifier, challenge, method));
            if !verified {
                return Err(AadError::new(501481, &[]));
            }
        }
    }
    let (tenant, user, scope) = (code.tenant.clone(), code.user.clone(), code.scope.clone());
    Ok(dir.issue_delegated(&client_id, &tenant, &user, &scope, auth))
}

/// RFC 7636 4.6: `S256` compares base64url(SHA-256(verifier)), `plain` the verifier itself.
fn pkce_matches(verifier: &str, challenge: &str, method: &str) -> bool {
    match method {
        "S256" => jwt::b64url(&openssl::sha::sha256(verifier.as_bytes())) == challenge,
        "plain" => verifier == challenge,
        _ => false,
    }
}

/// The refresh token grant (RFC 6749 6); the answer carries a new refresh token and the
/// old one stops working.
fn refresh_token_grant(
    dir: &mut Directory,
    request: &TokenRequest<'_>,
) -> Result<Issued, AadError> {
    let (client_id, auth) = authenticate(dir, request, Flow::Delegated)?;
    let params = request.params;
    let token = params.require("refresh_token")?;
    let Some(grant) = dir.refresh_tokens.get_mut(token) else {
        return Err(AadError::invalid_value("refresh_token"));
    };
    if grant.client_id != client_id || grant.tenant != request.tenant {
        return Err(AadError::invalid_value("refresh_token"));
    }
    match grant.state {
        RefreshState::Live => {}
        RefreshState::Rotated => return Err(AadError::invalid_value("refresh_token")),
        RefreshState::Revoked(at) => {
            return Err(AadError::new(
                50173,
                &[
                    ("issued", &entra_datetime(grant.issued_unix)),
                    ("revoked", &entra_datetime(at)),
                ],
            ));
        }
        RefreshState::Expired => {
            return Err(AadError::new(
                700082,
                &[("issued", &entra_datetime(grant.issued_unix))],
            ));
        }
    }
    grant.state = RefreshState::Rotated;
    let scope = params
        .get("scope")
        .map(str::to_string)
        .unwrap_or_else(|| grant.scope.clone());
    let (tenant, user) = (grant.tenant.clone(), grant.user.clone());
    Ok(dir.issue_delegated(&client_id, &tenant, &user, &scope, auth))
}

/// The device authorization grant (RFC 8628 3.4).
fn device_code_grant(dir: &mut Directory, request: &TokenRequest<'_>) -> Result<Issued, AadError> {
    let (client_id, auth) = authenticate(dir, request, Flow::Device)?;
    let device_code = request.params.require("device_code")?;
    let (tenant, approved_by, polls) = match dir.device_codes.get(device_code) {
        Some(d) if d.client_id == client_id && d.tenant == request.tenant && !d.redeemed => {
            if Instant::now() >= d.expires_at {
                return Err(AadError::new(70020, &[]));
            }
            (d.tenant.clone(), d.approved_by.clone(), d.polls)
        }
        _ => return Err(AadError::invalid_value("device_code")),
    };
    // The signed-in user approves by themselves once the client has polled once.
    let auto_approver = dir
        .signed_in_user
        .clone()
        .filter(|user| dir.device_auto_approve && polls > 0 && dir.has_user(&tenant, user));
    let Some(user) = approved_by.or(auto_approver) else {
        if let Some(device) = dir.device_codes.get_mut(device_code) {
            device.polls += 1;
        }
        return Err(AadError::new(70016, &[]));
    };
    let Some(device) = dir.device_codes.get_mut(device_code) else {
        return Err(AadError::invalid_value("device_code"));
    };
    device.redeemed = true;
    device.approved_by = Some(user.clone());
    let scope = device.scope.clone();
    Ok(dir.issue_delegated(&client_id, &tenant, &user, &scope, auth))
}

/// Reads `Authorization: Basic base64(urlencode(id):urlencode(secret))` (RFC 6749 2.3.1).
fn basic_credentials(headers: &HeaderMap) -> Result<Option<(String, String)>, AadError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let malformed = || AadError::new(90014, &[("param", "client_secret")]);
    let value = value.to_str().map_err(|_| malformed())?;
    let Some(encoded) = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))
    else {
        return Ok(None);
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| malformed())?;
    let decoded = String::from_utf8(decoded).map_err(|_| malformed())?;
    let (id, secret) = decoded.split_once(':').ok_or_else(malformed)?;
    Ok(Some((url_decode(id), url_decode(secret))))
}

fn url_decode(s: &str) -> String {
    form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn basic_credentials_are_url_decoded() {
        let mut headers = HeaderMap::new();
        let encoded = base64::engine::general_purpose::STANDARD.encode("my%20app:s%3Acret");
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {encoded}")).unwrap(),
        );
        let (id, secret) = basic_credentials(&headers).unwrap().unwrap();
        assert_eq!((id.as_str(), secret.as_str()), ("my app", "s:cret"));
    }

    #[test]
    fn pkce_s256_matches_rfc7636_example() {
        // RFC 7636 appendix B.
        assert!(pkce_matches(
            "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk",
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
            "S256"
        ));
        assert!(!pkce_matches(
            "x",
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
            "S256"
        ));
        assert!(pkce_matches("abc", "abc", "plain"));
        assert!(!pkce_matches("abc", "abc", "S512"));
    }
}
