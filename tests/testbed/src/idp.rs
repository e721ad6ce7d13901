//! An in-process stand-in for the Microsoft identity platform (Entra ID) v2 token endpoint.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use base64::Engine as _;
use rand::Rng as _;
use serde_json::json;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The only scope the stand-in accepts: app-only access to Exchange Online (IMAP).
pub const OUTLOOK_SCOPE: &str = "https://outlook.office365.com/.default";

/// Lifetime of issued access tokens unless changed with
/// [`IdentityPlatform::set_token_lifetime`]; the value Entra ID reports.
pub const DEFAULT_TOKEN_LIFETIME_SECS: u64 = 3599;

/// Length of the opaque access tokens the stand-in issues.
const ACCESS_TOKEN_LEN: usize = 80;

/// An in-process stand-in for Microsoft Entra ID's v2 token endpoint, listening on
/// `127.0.0.1` on a free port.
///
/// It serves:
/// * `POST /{tenant}/oauth2/v2.0/token` — the v2 token endpoint. Only the
///   `client_credentials` grant with a client secret (in the form body or as HTTP Basic
///   client authentication) and the scope [`OUTLOOK_SCOPE`] is implemented; errors carry
///   Entra's JSON shape and `AADSTS` codes.
/// * `GET /tokeninfo?access_token=TOKEN` — token validation for Dovecot's `passdb oauth2`
///   (`tokeninfo_url`). A live token answers `200` with
///   `{"active":true,"email":…,"mailboxes":",a@x,b@y,",…}`; an unknown, expired or revoked
///   token answers `401 {"active":false}`, which Dovecot treats as a definite
///   authentication failure. See [`crate::Dovecot`] for how Dovecot binds the answer to
///   the mailbox being logged in to.
///
/// While [`set_down(true)`](Self::set_down) is in effect every endpoint answers
/// `503 Service Unavailable`, which Dovecot reports to IMAP clients as `NO [UNAVAILABLE]`.
///
/// The handle is cheap to clone; all clones share one server. The server stops when the
/// last clone is dropped or when [`shutdown`](Self::shutdown) is called on any clone.
#[derive(Clone)]
pub struct IdentityPlatform {
    handle: Arc<Handle>,
}

/// Owns the server task; dropping it stops the server.
struct Handle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: Mutex<Option<Server>>,
}

struct Server {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// State shared between the handle and the request handlers.
#[derive(Default)]
struct Shared {
    directory: Mutex<Directory>,
    token_requests: AtomicUsize,
    tokeninfo_requests: AtomicUsize,
    down: AtomicBool,
}

/// Tenants, app registrations and issued tokens.
struct Directory {
    /// Lower-cased tenant ids.
    tenants: HashSet<String>,
    /// App registrations by client id.
    apps: HashMap<String, App>,
    /// Issued access tokens.
    tokens: HashMap<String, IssuedToken>,
    token_lifetime: u64,
}

impl Default for Directory {
    fn default() -> Self {
        Directory {
            tenants: HashSet::new(),
            apps: HashMap::new(),
            tokens: HashMap::new(),
            token_lifetime: DEFAULT_TOKEN_LIFETIME_SECS,
        }
    }
}

struct App {
    /// Lower-cased tenant id the app is registered in.
    tenant: String,
    secret: String,
    secret_expired: bool,
    /// Lower-cased mailbox addresses the app may open.
    mailboxes: Vec<String>,
}

struct IssuedToken {
    client_id: String,
    tenant: String,
    expires_at: Instant,
    expires_at_unix: u64,
    revoked: bool,
}

impl IdentityPlatform {
    /// Starts the server on `127.0.0.1` with a free port, on the current tokio runtime.
    pub async fn start() -> anyhow::Result<IdentityPlatform> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("binding the identity platform stand-in to 127.0.0.1:0")?;
        let addr = listener
            .local_addr()
            .context("reading the identity platform's address")?;
        let shared = Arc::new(Shared::default());
        let app = Router::new()
            .route("/{tenant}/oauth2/v2.0/token", any(token_endpoint))
            .route("/tokeninfo", get(tokeninfo_endpoint))
            .fallback(fallback)
            .with_state(shared.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stopped.await;
            });
            // Errors here only mean the listener failed; there is nobody to report to.
            let _ = serve.await;
        });
        Ok(IdentityPlatform {
            handle: Arc::new(Handle {
                addr,
                shared,
                server: Mutex::new(Some(Server { stop, task })),
            }),
        })
    }

    /// The authority URL, `http://127.0.0.1:PORT`; clients append
    /// `/{tenant}/oauth2/v2.0/token`.
    pub fn authority(&self) -> String {
        format!("http://{}", self.handle.addr)
    }

    /// The full token endpoint URL for `tenant`.
    pub fn token_url(&self, tenant: &str) -> String {
        format!("{}/{tenant}/oauth2/v2.0/token", self.authority())
    }

    /// The `tokeninfo_url` Dovecot uses (the token is appended to it).
    pub fn tokeninfo_url(&self) -> String {
        format!("{}/tokeninfo?access_token=", self.authority())
    }

    /// Registers a tenant (compared case-insensitively). Registering twice is harmless.
    pub fn add_tenant(&self, tenant: &str) {
        self.directory().tenants.insert(tenant.to_ascii_lowercase());
    }

    /// Registers an app (client id + secret) in a tenant, allowed to open these mailboxes
    /// (compared lower-cased). Registers the tenant too if it is unknown. Registering a
    /// client id again replaces the earlier registration (and un-expires its secret).
    pub fn add_app(&self, tenant: &str, client_id: &str, secret: &str, mailboxes: &[&str]) {
        let tenant = tenant.to_ascii_lowercase();
        let mut dir = self.directory();
        dir.tenants.insert(tenant.clone());
        dir.apps.insert(
            client_id.to_string(),
            App {
                tenant,
                secret: secret.to_string(),
                secret_expired: false,
                mailboxes: mailboxes.iter().map(|m| m.to_lowercase()).collect(),
            },
        );
    }

    /// Marks the app's client secret as expired: later token requests with it fail with
    /// `AADSTS7000222`. Tokens already issued stay valid until they expire.
    pub fn expire_secret(&self, client_id: &str) {
        if let Some(app) = self.directory().apps.get_mut(client_id) {
            app.secret_expired = true;
        }
    }

    /// Revokes every token issued so far to the app: token validation answers inactive
    /// for them. Tokens requested afterwards are live again.
    pub fn revoke_tokens(&self, client_id: &str) {
        for token in self.directory().tokens.values_mut() {
            if token.client_id == client_id {
                token.revoked = true;
            }
        }
    }

    /// Number of requests to the token endpoint so far, whatever their outcome
    /// (including those answered `503` while down).
    pub fn token_requests(&self) -> usize {
        self.handle.shared.token_requests.load(Ordering::SeqCst)
    }

    /// Number of token validation (`/tokeninfo`) requests so far, i.e. Dovecot's
    /// XOAUTH2/OAUTHBEARER checks.
    pub fn tokeninfo_requests(&self) -> usize {
        self.handle.shared.tokeninfo_requests.load(Ordering::SeqCst)
    }

    /// Sets the lifetime (`expires_in`) of tokens issued from now on; default 3599.
    /// Zero issues tokens that are already expired.
    pub fn set_token_lifetime(&self, secs: u64) {
        self.directory().token_lifetime = secs;
    }

    /// While `down` is true every endpoint answers HTTP 503.
    pub fn set_down(&self, down: bool) {
        self.handle.shared.down.store(down, Ordering::SeqCst);
    }

    /// Issues a token for `client_id` without going through HTTP, as if a successful
    /// client-credentials request had been made (not counted in
    /// [`token_requests`](Self::token_requests)). Handy for tests of the IMAP side only.
    pub fn issue_token(&self, client_id: &str) -> anyhow::Result<String> {
        let mut dir = self.directory();
        let tenant = dir
            .apps
            .get(client_id)
            .map(|app| app.tenant.clone())
            .with_context(|| format!("no app with client id '{client_id}' is registered"))?;
        Ok(dir.issue(client_id, &tenant).0)
    }

    /// Stops the server (for all clones of this handle) and waits for it to finish.
    pub async fn shutdown(self) {
        let server = lock(&self.handle.server).take();
        if let Some(Server { stop, mut task }) = server {
            let _ = stop.send(());
            // Graceful shutdown waits for open connections (Dovecot keeps one alive);
            // give it a moment, then cut them.
            if tokio::time::timeout(Duration::from_secs(1), &mut task)
                .await
                .is_err()
            {
                task.abort();
                let _ = task.await;
            }
        }
    }

    fn directory(&self) -> MutexGuard<'_, Directory> {
        lock(&self.handle.shared.directory)
    }
}

impl std::fmt::Debug for IdentityPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityPlatform")
            .field("authority", &self.authority())
            .finish_non_exhaustive()
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if let Some(Server { stop, task }) = lock(&self.server).take() {
            let _ = stop.send(());
            task.abort();
        }
    }
}

/// Locks a mutex, ignoring poisoning (a panicking test must not break the others).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Directory {
    /// Issues a new access token; returns it with its lifetime in seconds.
    fn issue(&mut self, client_id: &str, tenant: &str) -> (String, u64) {
        let lifetime = self.token_lifetime;
        let token = random_token();
        let now_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.tokens.insert(
            token.clone(),
            IssuedToken {
                client_id: client_id.to_string(),
                tenant: tenant.to_string(),
                expires_at: Instant::now() + Duration::from_secs(lifetime),
                expires_at_unix: now_unix + lifetime,
                revoked: false,
            },
        );
        (token, lifetime)
    }
}

/// A random opaque token of URL-safe characters.
fn random_token() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::rng();
    (0..ACCESS_TOKEN_LEN)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// A random id shaped like a GUID, as Entra uses for trace and correlation ids.
fn random_guid() -> String {
    let b: [u8; 16] = rand::rng().random();
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

// ---------------------------------------------------------------------------------------
// Errors in Entra's shape
// ---------------------------------------------------------------------------------------

/// An error answer of the token endpoint, rendered in Entra's JSON shape.
#[derive(Debug)]
struct AadError {
    status: StatusCode,
    /// The OAuth `error` value.
    error: &'static str,
    /// The `AADSTS` number.
    code: u32,
    /// The message after `AADSTSnnn: `.
    message: String,
}

impl AadError {
    fn new(status: StatusCode, error: &'static str, code: u32, message: String) -> Self {
        AadError {
            status,
            error,
            code,
            message,
        }
    }

    fn tenant_not_found(tenant: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90002,
            format!(
                "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID \
                 and are signing into the correct cloud. Check with your subscription \
                 administrator, this may happen if there are no active subscriptions for the \
                 tenant."
            ),
        )
    }

    fn missing_parameter(name: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            format!("The request body must contain the following parameter: '{name}'."),
        )
    }

    fn unsupported_grant_type(grant_type: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            format!("The app requested an unsupported grant type '{grant_type}'."),
        )
    }

    fn app_not_found(client_id: &str, tenant: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            format!(
                "Application with identifier '{client_id}' was not found in the directory \
                 '{tenant}'. This can happen if the application has not been installed by the \
                 administrator of the tenant or consented to by any user in the tenant. You \
                 may have sent your authentication request to the wrong tenant."
            ),
        )
    }

    fn invalid_secret(client_id: &str) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000215,
            format!(
                "Invalid client secret provided. Ensure the secret being sent in the request \
                 is the client secret value, not the client secret ID, for a secret added to \
                 app '{client_id}'."
            ),
        )
    }

    fn expired_secret(client_id: &str) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000222,
            format!(
                "The provided client secret keys for app '{client_id}' are expired. Visit the \
                 Azure portal to create new keys for your app: https://aka.ms/NewClientSecret, \
                 or consider using certificate credentials for added security: \
                 https://aka.ms/certCreds."
            ),
        )
    }

    fn missing_credentials(grant_type: &str) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000216,
            format!(
                "'client_assertion', 'client_secret' or 'request' is required for the \
                 '{grant_type}' grant type."
            ),
        )
    }

    fn invalid_scope(scope: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            1002012,
            format!(
                "The provided value for scope {scope} is not valid. Client credential flows \
                 must have a scope value with /.default suffixed to the resource identifier \
                 (application ID URI)."
            ),
        )
    }

    fn post_only(method: &Method) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            900561,
            format!(
                "The endpoint only accepts POST, OPTIONS requests. Received a {method} request."
            ),
        )
    }

    fn malformed_basic_auth() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000216,
            "The client credentials in the Authorization header could not be read.".to_string(),
        )
    }

    /// Renders the error; `correlation_id` echoes the client's `client-request-id`.
    fn into_response(self, correlation_id: Option<String>) -> Response {
        let trace_id = random_guid();
        let correlation_id = correlation_id.unwrap_or_else(random_guid);
        let timestamp = chrono::Utc::now().format("%Y-%m-%d %H:%M:%SZ").to_string();
        let body = json!({
            "error": self.error,
            "error_description": format!(
                "AADSTS{}: {}\r\nTrace ID: {trace_id}\r\nCorrelation ID: {correlation_id}\r\nTimestamp: {timestamp}",
                self.code, self.message
            ),
            "error_codes": [self.code],
            "timestamp": timestamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": format!("https://login.microsoftonline.com/error?code={}", self.code),
        });
        json_response(self.status, &body)
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-store, no-cache"),
    );
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

fn unavailable() -> Response {
    json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        &json!({
            "error": "temporarily_unavailable",
            "error_description": "The identity platform stand-in is down (set_down(true)).",
        }),
    )
}

// ---------------------------------------------------------------------------------------
// Token endpoint
// ---------------------------------------------------------------------------------------

/// The form parameters of a token request (first occurrence of each name wins).
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(body: &[u8]) -> Self {
        Params(
            form_urlencoded::parse(body)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    /// The value of a parameter; empty values count as absent, as in Entra.
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    fn require(&self, name: &str) -> Result<&str, AadError> {
        self.get(name)
            .ok_or_else(|| AadError::missing_parameter(name))
    }
}

/// How the client proved its identity.
enum ClientCredential {
    /// A client secret, from the form body or HTTP Basic authentication.
    Secret(String),
    /// No credential at all.
    None,
    // Later: a JWT client assertion (`client_assertion_type` + `client_assertion`).
}

/// A successful token response.
struct Issued {
    access_token: String,
    expires_in: u64,
}

async fn token_endpoint(
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
        return AadError::post_only(&method).into_response(correlation_id);
    }
    let params = Params::parse(&body);
    let result = {
        let mut dir = lock(&shared.directory);
        token_request(&mut dir, &tenant, &headers, &params)
    };
    match result {
        Ok(issued) => json_response(
            StatusCode::OK,
            &json!({
                "token_type": "Bearer",
                "expires_in": issued.expires_in,
                "ext_expires_in": issued.expires_in,
                "access_token": issued.access_token,
            }),
        ),
        Err(error) => error.into_response(correlation_id),
    }
}

/// Validates a token request and dispatches on its grant type.
fn token_request(
    dir: &mut Directory,
    tenant: &str,
    headers: &HeaderMap,
    params: &Params,
) -> Result<Issued, AadError> {
    let tenant_key = tenant.to_ascii_lowercase();
    if !dir.tenants.contains(&tenant_key) {
        return Err(AadError::tenant_not_found(tenant));
    }
    let grant_type = params.require("grant_type")?;
    match grant_type {
        "client_credentials" => client_credentials_grant(dir, &tenant_key, headers, params),
        // Later: "refresh_token", "authorization_code" (with PKCE) and
        // "urn:ietf:params:oauth:grant-type:device_code".
        other => Err(AadError::unsupported_grant_type(other)),
    }
}

/// The OAuth 2.0 client credentials grant (app-only access).
fn client_credentials_grant(
    dir: &mut Directory,
    tenant: &str,
    headers: &HeaderMap,
    params: &Params,
) -> Result<Issued, AadError> {
    let client_id = authenticate_client(dir, tenant, headers, params, "client_credentials")?;
    let scope = params.require("scope")?;
    if scope.trim() != OUTLOOK_SCOPE {
        return Err(AadError::invalid_scope(scope));
    }
    let (access_token, expires_in) = dir.issue(&client_id, tenant);
    Ok(Issued {
        access_token,
        expires_in,
    })
}

/// Identifies and authenticates the client of a token request; returns its client id.
/// HTTP Basic credentials, when present, take precedence over form parameters.
fn authenticate_client(
    dir: &Directory,
    tenant: &str,
    headers: &HeaderMap,
    params: &Params,
    grant_type: &str,
) -> Result<String, AadError> {
    let (client_id, credential) = match basic_credentials(headers)? {
        Some((id, secret)) => (id, ClientCredential::Secret(secret)),
        None => {
            let id = params.require("client_id")?.to_string();
            let credential = match params.get("client_secret") {
                Some(secret) => ClientCredential::Secret(secret.to_string()),
                None => ClientCredential::None,
            };
            (id, credential)
        }
    };
    let app = dir
        .apps
        .get(&client_id)
        .filter(|app| app.tenant == tenant)
        .ok_or_else(|| AadError::app_not_found(&client_id, tenant))?;
    match credential {
        ClientCredential::None => Err(AadError::missing_credentials(grant_type)),
        ClientCredential::Secret(secret) if secret != app.secret => {
            Err(AadError::invalid_secret(&client_id))
        }
        ClientCredential::Secret(_) if app.secret_expired => {
            Err(AadError::expired_secret(&client_id))
        }
        ClientCredential::Secret(_) => Ok(client_id),
    }
}

/// Reads `Authorization: Basic base64(urlencode(id):urlencode(secret))` (RFC 6749 2.3.1).
fn basic_credentials(headers: &HeaderMap) -> Result<Option<(String, String)>, AadError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| AadError::malformed_basic_auth())?;
    let Some(encoded) = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))
    else {
        return Ok(None);
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| AadError::malformed_basic_auth())?;
    let decoded = String::from_utf8(decoded).map_err(|_| AadError::malformed_basic_auth())?;
    let (id, secret) = decoded
        .split_once(':')
        .ok_or_else(AadError::malformed_basic_auth)?;
    Ok(Some((url_decode(id), url_decode(secret))))
}

fn url_decode(s: &str) -> String {
    form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Token validation for Dovecot
// ---------------------------------------------------------------------------------------

async fn tokeninfo_endpoint(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    shared.tokeninfo_requests.fetch_add(1, Ordering::SeqCst);
    if shared.down.load(Ordering::SeqCst) {
        return unavailable();
    }
    let inactive = || json_response(StatusCode::UNAUTHORIZED, &json!({"active": false}));
    let Some(token) = query.get("access_token") else {
        return inactive();
    };
    let dir = lock(&shared.directory);
    let Some(issued) = dir.tokens.get(token) else {
        return inactive();
    };
    if issued.revoked || Instant::now() >= issued.expires_at {
        return inactive();
    }
    let mailboxes: &[String] = dir
        .apps
        .get(&issued.client_id)
        .map(|app| app.mailboxes.as_slice())
        .unwrap_or_default();
    json_response(
        StatusCode::OK,
        &json!({
            "active": true,
            // Dovecot insists on its username_attribute being present.
            "email": mailboxes.first().cloned().unwrap_or_else(|| issued.client_id.clone()),
            // Comma-delimited on both ends so that a wildcard `*,user,*` matches members.
            "mailboxes": format!(",{},", mailboxes.join(",")),
            "client_id": issued.client_id,
            "appid": issued.client_id,
            "tid": issued.tenant,
            "scope": OUTLOOK_SCOPE,
            "exp": issued.expires_at_unix,
        }),
    )
}

async fn fallback(State(shared): State<Arc<Shared>>) -> Response {
    if shared.down.load(Ordering::SeqCst) {
        return unavailable();
    }
    json_response(
        StatusCode::NOT_FOUND,
        &json!({"error": "not_found", "error_description": "No such endpoint on the identity platform stand-in."}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_url_safe_and_long_enough() {
        let token = random_token();
        assert_eq!(token.len(), ACCESS_TOKEN_LEN);
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
    }

    #[test]
    fn guid_shape() {
        let guid = random_guid();
        let parts: Vec<usize> = guid.split('-').map(str::len).collect();
        assert_eq!(parts, [8, 4, 4, 4, 12]);
    }

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
}
