//! Entra's error answers: one table of `AADSTS` codes, rendered as JSON (token and device
//! code endpoints), as an HTML page (the authorize endpoint before the redirect URI is
//! trusted) or as redirect parameters (the authorize endpoint afterwards).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{json_response, random_guid};

/// One entry of the stand-in's error table: how Entra ID answers a given `AADSTS` code.
///
/// `description` is the text after `AADSTSnnn: ` with `{placeholders}` filled in per
/// request (`{client_id}`, `{tenant}`, `{scope}`, `{param}`, `{grant_type}`, `{issued}`,
/// `{revoked}`, `{now}`, `{nbf}`, `{exp}`, `{reason}`, `{thumbprint}`, `{found_key}`,
/// `{redirect_uri}`, `{expected}`, `{user}`, `{response_type}`, `{method}`). The same
/// template serves errors that occur naturally and errors injected with
/// [`IdentityPlatform::fail_next_token_request`](crate::IdentityPlatform::fail_next_token_request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AadErrorKind {
    /// The `AADSTS` number, also the only element of `error_codes`.
    pub code: u64,
    /// The HTTP status of the answer.
    pub status: u16,
    /// The OAuth `error` value.
    pub error: &'static str,
    /// The description template.
    pub description: &'static str,
}

const fn kind(
    code: u64,
    status: u16,
    error: &'static str,
    description: &'static str,
) -> AadErrorKind {
    AadErrorKind {
        code,
        status,
        error,
        description,
    }
}

/// Every `AADSTS` code the stand-in answers with, naturally or injected.
pub const AAD_ERRORS: &[AadErrorKind] = &[
    // --- Requests the endpoint cannot read -------------------------------------------------
    kind(
        90002,
        400,
        "invalid_request",
        "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are \
         signing into the correct cloud. Check with your subscription administrator, this may \
         happen if there are no active subscriptions for the tenant.",
    ),
    kind(
        900144,
        400,
        "invalid_request",
        "The request body must contain the following parameter: '{param}'.",
    ),
    kind(
        90014,
        400,
        "invalid_request",
        "The required field '{param}' is missing from the credential. Ensure that you have all \
         the necessary parameters for the login request.",
    ),
    kind(
        70003,
        400,
        "unsupported_grant_type",
        "The app requested an unsupported grant type '{grant_type}'.",
    ),
    kind(
        900561,
        405,
        "invalid_request",
        "The endpoint only accepts POST, OPTIONS requests. Received a {method} request.",
    ),
    kind(
        1002012,
        400,
        "invalid_scope",
        "The provided value for scope {scope} is not valid. Client credential flows must have a \
         scope value with /.default suffixed to the resource identifier (application ID URI).",
    ),
    // --- The app registration and its credentials --------------------------------------------
    kind(
        700016,
        400,
        "unauthorized_client",
        "Application with identifier '{client_id}' was not found in the directory '{tenant}'. \
         This can happen if the application has not been installed by the administrator of the \
         tenant or consented to by any user in the tenant. You may have sent your \
         authentication request to the wrong tenant.",
    ),
    kind(
        7000215,
        401,
        "invalid_client",
        "Invalid client secret provided. Ensure the secret being sent in the request is the \
         client secret value, not the client secret ID, for a secret added to app \
         '{client_id}'.",
    ),
    kind(
        7000222,
        401,
        "invalid_client",
        "The provided client secret keys for app '{client_id}' are expired. Visit the Azure \
         portal to create new keys for your app: https://aka.ms/NewClientSecret, or consider \
         using certificate credentials for added security: https://aka.ms/certCreds.",
    ),
    kind(
        7000216,
        401,
        "invalid_client",
        "'client_assertion', 'client_secret' or 'request' is required for the '{grant_type}' \
         grant type.",
    ),
    kind(
        7000218,
        401,
        "invalid_client",
        "The request body must contain the following parameter: 'client_assertion' or \
         'client_secret'.",
    ),
    kind(
        700025,
        401,
        "invalid_client",
        "Client is public so neither 'client_assertion' nor 'client_secret' should be presented.",
    ),
    // --- Certificate credentials (RFC 7523 client assertions) --------------------------------
    kind(
        700024,
        401,
        "invalid_client",
        "Client assertion is not within its valid time range. Current time: {now}, assertion \
         valid from {nbf}, expiry time of assertion {exp}. Review the documentation at \
         https://learn.microsoft.com/entra/identity-platform/certificate-credentials .",
    ),
    kind(
        700027,
        401,
        "invalid_client",
        "Client assertion contains an invalid signature. [Reason - {reason}, Thumbprint of key \
         used by client: '{thumbprint}'{found_key}, Please visit the Azure Portal, Graph \
         Explorer or directly use MS Graph to see configured keys for app Id '{client_id}'. \
         Review the documentation at https://docs.microsoft.com/en-us/graph/deployments to \
         determine the corresponding service endpoint and \
         https://docs.microsoft.com/en-us/graph/api/application-get?view=graph-rest-1.0&tabs=http \
         to build a query request URL, such as \
         'https://graph.microsoft.com/beta/applications/{client_id}']",
    ),
    kind(
        700021,
        401,
        "invalid_client",
        "Client assertion application identifier doesn't match 'client_id' parameter. Review \
         the documentation at \
         https://learn.microsoft.com/entra/identity-platform/certificate-credentials .",
    ),
    kind(
        50012,
        401,
        "invalid_client",
        "Client assertion audience claim does not match Realm issuer.",
    ),
    kind(50027, 400, "invalid_request", "Invalid JWT token. {reason}"),
    // --- Grants ------------------------------------------------------------------------------
    kind(
        65001,
        400,
        "invalid_grant",
        "The user or administrator has not consented to use the application with ID \
         '{client_id}' named '{client_id}'. Send an interactive authorization request for this \
         user and resource.",
    ),
    kind(
        700082,
        400,
        "invalid_grant",
        "The refresh token has expired due to inactivity. The token was issued on {issued} and \
         was inactive for 90.00:00:00.",
    ),
    kind(
        50173,
        400,
        "invalid_grant",
        "The provided grant has expired due to it being revoked, a fresh auth token is needed. \
         The user might have changed or reset their password. The grant was issued on \
         '{issued}' and the TokensValidFrom date (before which tokens are not valid) for this \
         user is '{revoked}'.",
    ),
    kind(
        70000,
        400,
        "invalid_grant",
        "The provided value for the '{param}' is not valid.",
    ),
    kind(
        54005,
        400,
        "invalid_grant",
        "OAuth2 Authorization code was already redeemed, please retry with a new valid code or \
         use an existing refresh token.",
    ),
    kind(
        70008,
        400,
        "invalid_grant",
        "The provided authorization code or refresh token has expired due to inactivity. Send a \
         new interactive authorization request for this user and resource.",
    ),
    kind(
        500112,
        400,
        "invalid_grant",
        "The reply address '{redirect_uri}' does not match the reply address '{expected}' \
         provided when requesting Authorization code.",
    ),
    kind(
        501481,
        400,
        "invalid_grant",
        "The Code_Verifier does not match the code_challenge supplied in the authorization \
         request.",
    ),
    kind(
        9002325,
        400,
        "invalid_request",
        "Proof Key for Code Exchange is required for cross-origin authorization code \
         redemption.",
    ),
    kind(
        70016,
        400,
        "authorization_pending",
        "OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
    ),
    kind(
        70020,
        400,
        "expired_token",
        "The provided value for the input parameter 'device_code' is not valid. This device \
         code has expired.",
    ),
    // --- The authorize endpoint --------------------------------------------------------------
    kind(
        50011,
        400,
        "invalid_request",
        "The redirect URI '{redirect_uri}' specified in the request does not match the redirect \
         URIs configured for the application '{client_id}'. Make sure the redirect URI sent in \
         the request matches one added to your application in the Azure portal. Navigate to \
         https://aka.ms/redirectUriMismatchError to learn more about how to fix this.",
    ),
    kind(
        500113,
        400,
        "invalid_request",
        "No reply address is registered for the application.",
    ),
    kind(
        50058,
        400,
        "login_required",
        "A silent sign-in request was sent but no user is signed in. The cookies used to \
         represent the user's session were not sent in the request to Azure AD. This can \
         happen if the user is using Internet Explorer or Edge, and the web app sending the \
         silent sign-in request is in different IE security zone than the Azure AD endpoint \
         (login.microsoftonline.com).",
    ),
    kind(
        50034,
        400,
        "invalid_request",
        "The user account {user} does not exist in the {tenant} directory. To sign into this \
         application, the account must be added to the directory.",
    ),
    kind(
        700054,
        400,
        "unsupported_response_type",
        "response_type '{response_type}' is not enabled for the application.",
    ),
];

/// The table entry for `code`.
pub fn aad_error_kind(code: u64) -> Option<&'static AadErrorKind> {
    AAD_ERRORS.iter().find(|k| k.code == code)
}

/// An error answer, ready to render.
#[derive(Debug)]
pub(super) struct AadError {
    kind: &'static AadErrorKind,
    /// The filled-in description template (without the `AADSTSnnn: ` prefix and trailer).
    message: String,
}

impl AadError {
    /// The error for `code` with the template's placeholders taken from `vars`
    /// (placeholders without a value are left as they are).
    ///
    /// # Panics
    /// If `code` is not in [`AAD_ERRORS`] (a bug in the stand-in).
    pub(super) fn new(code: u64, vars: &[(&str, &str)]) -> Self {
        let kind = aad_error_kind(code)
            .unwrap_or_else(|| panic!("AADSTS{code} is missing from the error table"));
        AadError {
            kind,
            message: fill(kind.description, vars),
        }
    }

    #[cfg(test)]
    pub(super) fn code(&self) -> u64 {
        self.kind.code
    }

    #[cfg(test)]
    pub(super) fn message(&self) -> &str {
        &self.message
    }

    fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.kind.status).unwrap_or(StatusCode::BAD_REQUEST)
    }

    pub(super) fn tenant_not_found(tenant: &str) -> Self {
        Self::new(90002, &[("tenant", tenant)])
    }

    pub(super) fn missing_parameter(name: &str) -> Self {
        Self::new(900144, &[("param", name)])
    }

    pub(super) fn invalid_value(name: &str) -> Self {
        Self::new(70000, &[("param", name)])
    }

    pub(super) fn app_not_found(client_id: &str, tenant: &str) -> Self {
        Self::new(700016, &[("client_id", client_id), ("tenant", tenant)])
    }

    pub(super) fn no_consent(client_id: &str) -> Self {
        Self::new(65001, &[("client_id", client_id)])
    }

    pub(super) fn invalid_jwt(reason: &str) -> Self {
        Self::new(50027, &[("reason", reason)])
    }

    /// `error_description` as Entra writes it: code, message, trace and correlation ids and
    /// a timestamp, separated by CR LF.
    fn full_description(&self, trace_id: &str, correlation_id: &str, timestamp: &str) -> String {
        format!(
            "AADSTS{}: {}\r\nTrace ID: {trace_id}\r\nCorrelation ID: {correlation_id}\r\nTimestamp: {timestamp}",
            self.kind.code, self.message
        )
    }

    fn error_uri(&self) -> String {
        format!(
            "https://login.microsoftonline.com/error?code={}",
            self.kind.code
        )
    }

    /// Renders the error as Entra's JSON; `correlation_id` echoes the client's
    /// `client-request-id`.
    pub(super) fn into_response(self, correlation_id: Option<String>) -> Response {
        let trace_id = random_guid();
        let correlation_id = correlation_id.unwrap_or_else(random_guid);
        let timestamp = entra_timestamp();
        let body = json!({
            "error": self.kind.error,
            "error_description": self.full_description(&trace_id, &correlation_id, &timestamp),
            "error_codes": [self.kind.code],
            "timestamp": timestamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": self.error_uri(),
        });
        json_response(self.status(), &body)
    }

    /// Renders the error as the sign-in page Entra shows when it cannot redirect back.
    pub(super) fn into_html(self) -> Response {
        let trace_id = random_guid();
        let correlation_id = random_guid();
        let timestamp = entra_timestamp();
        let body = format!(
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Sign in to your \
             account</title></head>\n<body><h1>Sign in</h1>\n<p>Sorry, but we\u{2019}re having \
             trouble signing you in.</p>\n<p id=\"error\">AADSTS{code}: {message}</p>\n\
             <p>Request Id: {trace_id}<br>Correlation Id: {correlation_id}<br>Timestamp: \
             {timestamp}<br>Message: AADSTS{code}</p>\n</body></html>\n",
            code = self.kind.code,
            message = html_escape(&self.message),
        );
        let mut response = (self.status(), body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        response
    }

    /// The query parameters of an error redirect back to the client
    /// (`error`, `error_description`, `error_uri`).
    pub(super) fn redirect_params(&self) -> Vec<(&'static str, String)> {
        let trace_id = random_guid();
        let correlation_id = random_guid();
        let timestamp = entra_timestamp();
        vec![
            ("error", self.kind.error.to_string()),
            (
                "error_description",
                self.full_description(&trace_id, &correlation_id, &timestamp),
            ),
            ("error_uri", self.error_uri()),
        ]
    }
}

/// Fills `{name}` placeholders in one pass (values are never re-scanned).
fn fill(template: &str, vars: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let name_len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let name = &after[..name_len];
        let value = vars.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        match (value, after[name_len..].starts_with('}')) {
            (Some(value), true) if !name.is_empty() => {
                out.push_str(value);
                rest = &after[name_len + 1..];
            }
            _ => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The placeholders used anywhere in the table.
#[cfg(test)]
fn placeholders(template: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let after = &rest[start + 1..];
        match after.find('}') {
            Some(end) => {
                found.push(&after[..end]);
                rest = &after[end + 1..];
            }
            None => break,
        }
    }
    found
}

/// `2024-10-02 22:05:03Z`, the format of Entra's `timestamp` fields.
pub(super) fn entra_timestamp() -> String {
    chrono::Utc::now().format("%Y-%m-%d %H:%M:%SZ").to_string()
}

/// `2019-10-07T17:43:52.6550000Z`, the format of dates inside Entra's descriptions.
pub(super) fn entra_datetime(unix: i64) -> String {
    let dt = chrono::DateTime::from_timestamp(unix, 0).unwrap_or_default();
    format!("{}.0000000Z", dt.format("%Y-%m-%dT%H:%M:%S"))
}

pub(super) fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// An answer in Entra's JSON error shape for a code without an `AADSTS` number
/// (`temporarily_unavailable` while the stand-in is "down").
pub(super) fn unavailable() -> Response {
    json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        &json!({
            "error": "temporarily_unavailable",
            "error_description": "The identity platform stand-in is down (set_down(true)).",
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The placeholder values an injected error is filled with (see `token.rs`).
    const INJECTED: &[&str] = &[
        "client_id",
        "tenant",
        "scope",
        "param",
        "grant_type",
        "issued",
        "revoked",
        "now",
        "nbf",
        "exp",
        "reason",
        "thumbprint",
        "found_key",
        "redirect_uri",
        "expected",
        "user",
        "response_type",
        "method",
    ];

    #[test]
    fn codes_are_unique_and_placeholders_known() {
        for (i, kind) in AAD_ERRORS.iter().enumerate() {
            assert!(
                AAD_ERRORS[..i].iter().all(|k| k.code != kind.code),
                "AADSTS{} twice",
                kind.code
            );
            for name in placeholders(kind.description) {
                assert!(
                    INJECTED.contains(&name),
                    "AADSTS{}: unknown placeholder {name}",
                    kind.code
                );
            }
            assert!(StatusCode::from_u16(kind.status).is_ok());
        }
    }

    #[test]
    fn fill_is_single_pass() {
        assert_eq!(
            fill("a {x} b {y} {z", &[("x", "{y}"), ("y", "Y")]),
            "a {y} b Y {z"
        );
        assert_eq!(fill("{}{unknown}", &[]), "{}{unknown}");
    }

    #[test]
    fn refresh_token_message_is_the_documented_one() {
        let error = AadError::invalid_value("refresh_token");
        assert_eq!(
            error.message(),
            "The provided value for the 'refresh_token' is not valid."
        );
        assert_eq!(error.code(), 70000);
    }

    #[test]
    fn datetime_format() {
        assert_eq!(entra_datetime(0), "1970-01-01T00:00:00.0000000Z");
    }
}
