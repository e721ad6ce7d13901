//! The interactive side: the authorize endpoint (auth code + PKCE), device authorization,
//! and discovery.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::errors::{AadError, html_escape, unavailable};
use super::far_instant;
use super::token::Params;
use super::{
    AUTH_CODE_LIFETIME, AuthCode, DeviceAuthorization, Directory, OPAQUE_LEN, Shared,
    json_response, lock, random_guid, random_string, random_user_code,
};

/// `GET /{tenant}/oauth2/v2.0/authorize`: signs the user in at once and redirects back
/// with a code; errors before the redirect URI is trusted are HTML pages, later ones are
/// error redirects.
pub(super) async fn authorize_endpoint(
    State(shared): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    if shared.down.load(Ordering::SeqCst) {
        return unavailable();
    }
    let params = Params::parse(query.unwrap_or_default().as_bytes());
    let outcome = {
        let mut dir = lock(&shared.directory);
        authorize(&mut dir, &tenant, &params)
    };
    match outcome {
        Ok(location) => redirect(&location),
        Err(error) => error.into_html(),
    }
}

/// Returns the `Location` to redirect to, or the error to show as a page.
fn authorize(dir: &mut Directory, tenant_path: &str, params: &Params) -> Result<String, AadError> {
    let tenant = tenant_path.to_ascii_lowercase();
    if !dir.tenants.contains(&tenant) {
        return Err(AadError::tenant_not_found(tenant_path));
    }
    let client_id = params.require("client_id")?.to_string();
    let app = dir
        .apps
        .get(&client_id)
        .filter(|app| app.tenant == tenant)
        .ok_or_else(|| AadError::app_not_found(&client_id, tenant_path))?;
    let registered: &[String] = app
        .delegated
        .as_ref()
        .map(|d| d.redirect_uris.as_slice())
        .unwrap_or_default();
    let redirect_uri = match params.get("redirect_uri") {
        Some(uri) if registered.iter().any(|r| redirect_uri_matches(r, uri)) => uri.to_string(),
        Some(uri) => {
            return Err(AadError::new(
                50011,
                &[("redirect_uri", uri), ("client_id", &client_id)],
            ));
        }
        None => registered
            .first()
            .cloned()
            .ok_or_else(|| AadError::new(500113, &[]))?,
    };

    // From here on errors go back to the client.
    let state = params.get("state");
    let fragment = params.get("response_mode") == Some("fragment");
    let back = |mut pairs: Vec<(&'static str, String)>| {
        if let Some(state) = state {
            pairs.push(("state", state.to_string()));
        }
        append_params(&redirect_uri, &pairs, fragment)
    };
    let error_back = |error: AadError| Ok(back(error.redirect_params()));

    match params.get("response_type") {
        Some("code") => {}
        Some(other) => return error_back(AadError::new(700054, &[("response_type", other)])),
        None => return error_back(AadError::missing_parameter("response_type")),
    }
    let Some(scope) = params.get("scope") else {
        return error_back(AadError::missing_parameter("scope"));
    };
    let login_hint = params
        .get("login_hint")
        .map(str::to_lowercase)
        .filter(|hint| dir.has_user(&tenant, hint));
    let Some(user) = dir.signed_in_user.clone().or(login_hint) else {
        // Nobody to sign in without a browser: what Entra answers to prompt=none.
        return error_back(AadError::new(50058, &[]));
    };
    if !dir.has_user(&tenant, &user) {
        return Err(AadError::new(
            50034,
            &[("user", &user), ("tenant", tenant_path)],
        ));
    }
    let challenge = params.get("code_challenge").map(|challenge| {
        let method = params.get("code_challenge_method").unwrap_or("plain");
        (challenge.to_string(), method.to_string())
    });
    let code = format!("1.{}", random_string(OPAQUE_LEN));
    dir.auth_codes.insert(
        code.clone(),
        AuthCode {
            client_id,
            tenant,
            user,
            redirect_uri: redirect_uri.clone(),
            scope: scope.to_string(),
            challenge,
            expires_at: Instant::now() + AUTH_CODE_LIFETIME,
            redeemed: false,
        },
    );
    Ok(back(vec![("code", code), ("session_state", random_guid())]))
}

/// Whether a requested redirect URI matches a registered one: exactly, or for loopback
/// `http` URIs with any port (as Entra allows for native clients).
fn redirect_uri_matches(registered: &str, requested: &str) -> bool {
    if registered == requested {
        return true;
    }
    match (split_loopback(registered), split_loopback(requested)) {
        (Some((host_a, rest_a)), Some((host_b, rest_b))) => {
            host_a == host_b && rest_a.trim_start_matches('/') == rest_b.trim_start_matches('/')
        }
        _ => false,
    }
}

/// `http://HOST[:PORT]REST` with a loopback HOST → (HOST, REST).
fn split_loopback(uri: &str) -> Option<(&str, &str)> {
    let rest = uri.strip_prefix("http://")?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let host = if authority.starts_with('[') {
        &authority[..=authority.find(']')?]
    } else {
        authority.split(':').next()?
    };
    matches!(host, "localhost" | "127.0.0.1" | "[::1]").then_some((host, path))
}

/// Appends parameters to the query (or the fragment) of `uri`.
fn append_params(uri: &str, pairs: &[(&str, String)], fragment: bool) -> String {
    let mut encoded = form_urlencoded::Serializer::new(String::new());
    for (name, value) in pairs {
        encoded.append_pair(name, value);
    }
    let encoded = encoded.finish();
    let separator = if fragment {
        if uri.contains('#') { '&' } else { '#' }
    } else if uri.contains('?') {
        '&'
    } else {
        '?'
    };
    if !fragment && let Some((base, frag)) = uri.split_once('#') {
        // The query goes before an existing fragment.
        let separator = if base.contains('?') { '&' } else { '?' };
        return format!("{base}{separator}{encoded}#{frag}");
    }
    format!("{uri}{separator}{encoded}")
}

fn redirect(location: &str) -> Response {
    let mut response = StatusCode::FOUND.into_response();
    let headers = response.headers_mut();
    match HeaderValue::from_str(location) {
        Ok(value) => {
            headers.insert(header::LOCATION, value);
        }
        Err(_) => {
            return (
                StatusCode::BAD_REQUEST,
                "redirect URI is not a valid header value",
            )
                .into_response();
        }
    }
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-store, no-cache"),
    );
    response
}

/// `POST /{tenant}/oauth2/v2.0/devicecode` (RFC 8628 3.1–3.2).
pub(super) async fn device_code_endpoint(
    State(shared): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    method: Method,
    body: Bytes,
) -> Response {
    if shared.down.load(Ordering::SeqCst) {
        return unavailable();
    }
    if method != Method::POST {
        return AadError::new(900561, &[("method", method.as_str())]).into_response(None);
    }
    let params = Params::parse(&body);
    let result = {
        let mut dir = lock(&shared.directory);
        device_authorization(&mut dir, &shared.authority, &tenant, &params)
    };
    match result {
        Ok(body) => json_response(StatusCode::OK, &body),
        Err(error) => error.into_response(None),
    }
}

fn device_authorization(
    dir: &mut Directory,
    authority: &str,
    tenant_path: &str,
    params: &Params,
) -> Result<serde_json::Value, AadError> {
    let tenant = tenant_path.to_ascii_lowercase();
    if !dir.tenants.contains(&tenant) {
        return Err(AadError::tenant_not_found(tenant_path));
    }
    let client_id = params.require("client_id")?.to_string();
    if dir
        .apps
        .get(&client_id)
        .is_none_or(|app| app.tenant != tenant)
    {
        return Err(AadError::app_not_found(&client_id, tenant_path));
    }
    let scope = params.require("scope")?.to_string();
    let device_code = random_string(OPAQUE_LEN);
    let user_code = random_user_code();
    let lifetime = dir.device_code_lifetime;
    let interval = dir.device_interval;
    dir.device_codes.insert(
        device_code.clone(),
        DeviceAuthorization {
            client_id,
            tenant,
            user_code: user_code.clone(),
            scope,
            expires_at: far_instant(lifetime),
            approved_by: None,
            polls: 0,
            redeemed: false,
        },
    );
    let verification_uri = format!("{authority}/devicelogin");
    Ok(json!({
        "user_code": user_code,
        "device_code": device_code,
        "verification_uri": verification_uri,
        "expires_in": lifetime,
        "interval": interval,
        "message": format!(
            "To sign in, use a web browser to open the page {verification_uri} and enter the \
             code {user_code} to authenticate."
        ),
    }))
}

/// `GET /devicelogin`: where users would enter their code; approvals happen through
/// `IdentityPlatform::approve_device_code` or the signed-in user.
pub(super) async fn device_login_page(State(shared): State<Arc<Shared>>) -> Response {
    if shared.down.load(Ordering::SeqCst) {
        return unavailable();
    }
    let body = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Enter code</title></head>\n\
         <body><h1>Enter code</h1>\n<p>Enter the code displayed on your app or device.</p>\n\
         <p>(Identity platform stand-in at {}: codes are approved by the test, with \
         approve_device_code or the signed-in user.)</p>\n</body></html>\n",
        html_escape(&shared.authority)
    );
    let mut response = (StatusCode::OK, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

/// `GET /{tenant}/v2.0/.well-known/openid-configuration`.
pub(super) async fn openid_configuration(
    State(shared): State<Arc<Shared>>,
    Path(tenant): Path<String>,
) -> Response {
    if shared.down.load(Ordering::SeqCst) {
        return unavailable();
    }
    let known = lock(&shared.directory)
        .tenants
        .contains(&tenant.to_ascii_lowercase());
    if !known {
        return AadError::tenant_not_found(&tenant).into_response(None);
    }
    let base = format!("{}/{tenant}", shared.authority);
    json_response(
        StatusCode::OK,
        &json!({
            "issuer": format!("{base}/v2.0"),
            "authorization_endpoint": format!("{base}/oauth2/v2.0/authorize"),
            "token_endpoint": format!("{base}/oauth2/v2.0/token"),
            "device_authorization_endpoint": format!("{base}/oauth2/v2.0/devicecode"),
            "response_types_supported": ["code"],
            "response_modes_supported": ["query", "fragment"],
            "grant_types_supported": [
                "authorization_code",
                "refresh_token",
                "client_credentials",
                "urn:ietf:params:oauth:grant-type:device_code"
            ],
            "code_challenge_methods_supported": ["S256", "plain"],
            "token_endpoint_auth_methods_supported": [
                "client_secret_post",
                "client_secret_basic",
                "private_key_jwt"
            ],
            "tenant_region_scope": "EU",
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_redirects_ignore_the_port() {
        assert!(redirect_uri_matches(
            "http://localhost/cb",
            "http://localhost:4711/cb"
        ));
        assert!(redirect_uri_matches(
            "http://127.0.0.1",
            "http://127.0.0.1:80/"
        ));
        assert!(redirect_uri_matches("http://[::1]:1/x", "http://[::1]:2/x"));
        assert!(!redirect_uri_matches(
            "http://localhost/cb",
            "http://localhost:4711/other"
        ));
        assert!(!redirect_uri_matches(
            "http://localhost/cb",
            "http://127.0.0.1/cb"
        ));
        assert!(!redirect_uri_matches(
            "https://app.example/cb",
            "https://app.example:8443/cb"
        ));
        assert!(redirect_uri_matches(
            "https://app.example/cb",
            "https://app.example/cb"
        ));
    }

    #[test]
    fn params_are_appended() {
        let pairs = [("code", "a b".to_string()), ("state", "s&t".to_string())];
        assert_eq!(
            append_params("http://x/cb", &pairs, false),
            "http://x/cb?code=a+b&state=s%26t"
        );
        assert_eq!(
            append_params("http://x/cb?k=v#f", &pairs, false),
            "http://x/cb?k=v&code=a+b&state=s%26t#f"
        );
        assert_eq!(
            append_params("http://x/cb", &pairs, true),
            "http://x/cb#code=a+b&state=s%26t"
        );
    }
}
