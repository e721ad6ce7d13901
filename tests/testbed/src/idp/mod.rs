//! An in-process stand-in for the Microsoft identity platform (Entra ID) v2 endpoints.

mod authorize;
mod errors;
mod jwt;
mod token;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use rand::Rng as _;
use serde_json::json;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use errors::{AAD_ERRORS, AadErrorKind, aad_error_kind};

use errors::unavailable;
use jwt::AppCertificate;

/// The only scope the client-credentials grant accepts: app-only access to Exchange Online
/// (IMAP).
pub const OUTLOOK_SCOPE: &str = "https://outlook.office365.com/.default";

/// The scope a delegated (user) IMAP client asks for, usually with `offline_access`.
pub const OUTLOOK_USER_SCOPE: &str = "https://outlook.office.com/IMAP.AccessAsUser.All";

/// `aud` of app-only Exchange Online tokens.
pub const EXCHANGE_APP_AUDIENCE: &str = "https://outlook.office365.com";

/// `aud` of delegated Exchange Online tokens.
pub const EXCHANGE_USER_AUDIENCE: &str = "https://outlook.office.com";

/// The app role app-only IMAP access needs (`roles` claim).
pub const IMAP_APP_ROLE: &str = "IMAP.AccessAsApp";

/// The delegated permission IMAP access needs (`scp` claim).
pub const IMAP_USER_PERMISSION: &str = "IMAP.AccessAsUser.All";

/// Lifetime of issued access tokens unless changed with
/// [`IdentityPlatform::set_token_lifetime`]; the value Entra ID reports.
pub const DEFAULT_TOKEN_LIFETIME_SECS: u64 = 3599;

/// Lifetime of device codes unless changed with
/// [`IdentityPlatform::set_device_code_lifetime`]; Entra's value.
pub const DEFAULT_DEVICE_CODE_LIFETIME_SECS: u64 = 900;

/// Audiences Exchange Online accepts (its two resource URIs and its app id).
const EXCHANGE_AUDIENCES: &[&str] = &[
    EXCHANGE_APP_AUDIENCE,
    EXCHANGE_USER_AUDIENCE,
    "00000002-0000-0ff1-ce00-000000000000",
];

/// Lifetime of authorization codes (Entra: about ten minutes).
const AUTH_CODE_LIFETIME: Duration = Duration::from_secs(600);

/// Length of random opaque values (codes, refresh tokens).
const OPAQUE_LEN: usize = 80;

/// An in-process stand-in for Microsoft Entra ID's v2 endpoints, listening on `127.0.0.1`
/// on a free port. Everything is real HTTP in Entra's shapes; the flows are plain
/// RFC 6749 / 7636 / 8628 / 7523, so a generic OAuth 2.0 client works against it too.
///
/// # Endpoints
/// * `POST /{tenant}/oauth2/v2.0/token` — grants `client_credentials` (scope
///   [`OUTLOOK_SCOPE`]; client secret in the body or as HTTP Basic, or an RS256 client
///   assertion for a certificate registered with
///   [`add_app_certificate`](Self::add_app_certificate)), `authorization_code` (with PKCE),
///   `refresh_token` (rotating: every answer carries a new refresh token and the old one
///   stops working) and `urn:ietf:params:oauth:grant-type:device_code`. Errors carry
///   Entra's JSON shape and `AADSTS` codes from one table, [`AAD_ERRORS`].
/// * `GET /{tenant}/oauth2/v2.0/authorize` — signs the
///   [signed-in user](Self::set_signed_in_user) in at once and answers
///   `302 Location: {redirect_uri}?code=…&state=…` (see
///   [`authorize_url`](Self::authorize_url)).
/// * `POST /{tenant}/oauth2/v2.0/devicecode` — RFC 8628 device authorization (see
///   [`device_code_url`](Self::device_code_url)); `GET /devicelogin` is a placeholder page.
/// * `GET /{tenant}/v2.0/.well-known/openid-configuration` — endpoint discovery.
/// * `GET /tokeninfo?access_token=TOKEN` — token validation for Dovecot's `passdb oauth2`
///   (`tokeninfo_url`), standing in for Exchange Online's own check. A live token answers
///   `200` with `{"active":true,"email":…,"mailboxes":",a@x,b@y,",…}`; an unknown,
///   expired or revoked token, one whose `aud` is not Exchange's, an app-only token without
///   the `IMAP.AccessAsApp` role or a delegated one without `IMAP.AccessAsUser.All` answers
///   `401 {"active":false}`, which Dovecot treats as a definite authentication failure. An
///   app-only token may open the app's mailboxes ([`add_app`](Self::add_app)), a delegated
///   token exactly the mailbox of its user. See [`crate::Dovecot`] for how Dovecot binds the
///   answer to the mailbox being logged in to.
///
/// # Access tokens
/// Access tokens are JWT-shaped (`header.claims.signature`, HS256 with a per-instance
/// random key; clients only decode the claims) and also registered server-side, which is
/// what `/tokeninfo` consults. App-only tokens carry `aud` =
/// [`EXCHANGE_APP_AUDIENCE`], `iss` = `https://sts.windows.net/{tid}/`, `tid`, `appid`,
/// `appidacr` (`1` secret, `2` certificate), `oid` = `sub` =
/// [`service_principal_id`](Self::service_principal_id), `roles` (default
/// `["IMAP.AccessAsApp"]`, see [`set_app_roles`](Self::set_app_roles)), `idtyp` = `app`,
/// `iat`, `nbf`, `exp`, `uti` and `ver` = `1.0`. Delegated tokens carry `aud` =
/// [`EXCHANGE_USER_AUDIENCE`], `scp` = `IMAP.AccessAsUser.All`, `upn` = `unique_name` =
/// the user, `oid` = `sub` = [`user_id`](Self::user_id), `tid`, `appid`, `appidacr`
/// (`0` for a public client), `amr`, `idtyp` = `user` and the same time claims.
/// [`set_token_audience`](Self::set_token_audience) overrides `aud` per client;
/// [`set_token_prefix`](Self::set_token_prefix) prefixes every access and refresh token.
///
/// While [`set_down(true)`](Self::set_down) is in effect every endpoint answers
/// `503 Service Unavailable`, which Dovecot reports to IMAP clients as `NO [UNAVAILABLE]`.
///
/// Test-setup methods panic on misuse (an unknown user code, an unparsable certificate)
/// with a message saying what is wrong.
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
struct Shared {
    /// `http://127.0.0.1:PORT`.
    authority: String,
    directory: Mutex<Directory>,
    token_requests: AtomicUsize,
    refresh_requests: AtomicUsize,
    tokeninfo_requests: AtomicUsize,
    down: AtomicBool,
    /// Token answers carry `expires_in` as a JSON string (as some OAuth2 providers send it).
    expires_in_as_string: AtomicBool,
    /// Milliseconds every token request waits before it is handled (a slow identity platform).
    token_delay_ms: AtomicU64,
}

/// Tenants, app registrations, users, issued tokens and codes, and test settings.
struct Directory {
    /// HS256 key of issued access tokens.
    signing_key: [u8; 32],
    /// `kid` header of issued access tokens.
    key_id: String,
    /// Lower-cased tenant ids.
    tenants: HashSet<String>,
    /// App registrations by client id.
    apps: HashMap<String, App>,
    /// Users by (lower-cased tenant, lower-cased user), with the name as registered.
    users: HashMap<(String, String), String>,
    /// Issued access tokens.
    tokens: HashMap<String, IssuedToken>,
    /// Issued refresh tokens, rotated ones included.
    refresh_tokens: HashMap<String, RefreshGrant>,
    /// Authorization codes by code.
    auth_codes: HashMap<String, AuthCode>,
    /// Device authorizations by device code.
    device_codes: HashMap<String, DeviceAuthorization>,
    /// `roles` overrides by client id.
    roles: HashMap<String, Vec<String>>,
    /// `aud` overrides by client id.
    audiences: HashMap<String, String>,
    /// Clients whose consent was withdrawn.
    no_consent: HashSet<String>,
    /// Injected token endpoint errors by client id, next first.
    injected: HashMap<String, VecDeque<u64>>,
    /// Who signs in at /authorize and approves device codes (lower-cased).
    signed_in_user: Option<String>,
    device_auto_approve: bool,
    device_interval: u64,
    device_code_lifetime: u64,
    token_lifetime: u64,
    token_prefix: String,
}

impl Directory {
    fn new() -> Self {
        let signing_key: [u8; 32] = rand::rng().random();
        Directory {
            signing_key,
            key_id: random_string(27),
            tenants: HashSet::new(),
            apps: HashMap::new(),
            users: HashMap::new(),
            tokens: HashMap::new(),
            refresh_tokens: HashMap::new(),
            auth_codes: HashMap::new(),
            device_codes: HashMap::new(),
            roles: HashMap::new(),
            audiences: HashMap::new(),
            no_consent: HashSet::new(),
            injected: HashMap::new(),
            signed_in_user: None,
            device_auto_approve: true,
            device_interval: 1,
            device_code_lifetime: DEFAULT_DEVICE_CODE_LIFETIME_SECS,
            token_lifetime: DEFAULT_TOKEN_LIFETIME_SECS,
            token_prefix: String::new(),
        }
    }
}

struct App {
    /// Lower-cased tenant id the app is registered in.
    tenant: String,
    secret: Option<String>,
    secret_expired: bool,
    certificates: Vec<AppCertificate>,
    /// Lower-cased mailbox addresses the app may open with app-only tokens.
    mailboxes: Vec<String>,
    /// `roles` of app-only tokens unless overridden with `set_app_roles`.
    default_roles: Vec<String>,
    /// Set for apps registered with `add_public_client` (delegated flows).
    delegated: Option<DelegatedSettings>,
}

impl App {
    /// A confidential client has a credential and must present it.
    fn is_confidential(&self) -> bool {
        self.secret.is_some() || !self.certificates.is_empty()
    }
}

struct DelegatedSettings {
    redirect_uris: Vec<String>,
    require_pkce: bool,
}

/// Whose token it is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Subject {
    /// An app-only token.
    App,
    /// A delegated token for this user (lower-cased).
    User(String),
}

struct IssuedToken {
    client_id: String,
    tenant: String,
    subject: Subject,
    aud: String,
    roles: Vec<String>,
    scp: Option<String>,
    expires_at: Instant,
    expires_at_unix: u64,
    revoked: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RefreshState {
    Live,
    /// Used once; a new refresh token replaced it.
    Rotated,
    /// Revoked with `revoke_tokens` (unix time of the revocation).
    Revoked(i64),
    /// Expired with `expire_refresh_tokens`.
    Expired,
}

struct RefreshGrant {
    client_id: String,
    tenant: String,
    /// Lower-cased user.
    user: String,
    scope: String,
    issued_unix: i64,
    state: RefreshState,
}

struct AuthCode {
    client_id: String,
    tenant: String,
    user: String,
    redirect_uri: String,
    scope: String,
    /// `(code_challenge, code_challenge_method)` of the authorize request.
    challenge: Option<(String, String)>,
    expires_at: Instant,
    redeemed: bool,
}

struct DeviceAuthorization {
    client_id: String,
    tenant: String,
    user_code: String,
    scope: String,
    expires_at: Instant,
    /// Lower-cased user who approved.
    approved_by: Option<String>,
    polls: u32,
    redeemed: bool,
}

/// How the client authenticated: the `appidacr` claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientAuth {
    Public,
    Secret,
    Certificate,
}

impl ClientAuth {
    fn appidacr(self) -> &'static str {
        match self {
            ClientAuth::Public => "0",
            ClientAuth::Secret => "1",
            ClientAuth::Certificate => "2",
        }
    }
}

/// Tokens for one successful grant.
struct Issued {
    access_token: String,
    expires_in: u64,
    refresh_token: Option<String>,
    scope: Option<String>,
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
        let shared = Arc::new(Shared {
            authority: format!("http://{addr}"),
            directory: Mutex::new(Directory::new()),
            token_requests: AtomicUsize::new(0),
            refresh_requests: AtomicUsize::new(0),
            tokeninfo_requests: AtomicUsize::new(0),
            down: AtomicBool::new(false),
            expires_in_as_string: AtomicBool::new(false),
            token_delay_ms: AtomicU64::new(0),
        });
        let app = Router::new()
            .route("/{tenant}/oauth2/v2.0/token", any(token::token_endpoint))
            .route(
                "/{tenant}/oauth2/v2.0/authorize",
                get(authorize::authorize_endpoint),
            )
            .route(
                "/{tenant}/oauth2/v2.0/devicecode",
                any(authorize::device_code_endpoint),
            )
            .route(
                "/{tenant}/v2.0/.well-known/openid-configuration",
                get(authorize::openid_configuration),
            )
            .route("/devicelogin", get(authorize::device_login_page))
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

    /// The authorize endpoint URL for `tenant`.
    pub fn authorize_url(&self, tenant: &str) -> String {
        format!("{}/{tenant}/oauth2/v2.0/authorize", self.authority())
    }

    /// The device authorization endpoint URL for `tenant`.
    pub fn device_code_url(&self, tenant: &str) -> String {
        format!("{}/{tenant}/oauth2/v2.0/devicecode", self.authority())
    }

    /// The `tokeninfo_url` Dovecot uses (the token is appended to it).
    pub fn tokeninfo_url(&self) -> String {
        format!("{}/tokeninfo?access_token=", self.authority())
    }

    // -----------------------------------------------------------------------------------
    // Directory setup
    // -----------------------------------------------------------------------------------

    /// Registers a tenant (compared case-insensitively). Registering twice is harmless.
    pub fn add_tenant(&self, tenant: &str) {
        self.directory().tenants.insert(tenant.to_ascii_lowercase());
    }

    /// Registers an app (client id + secret) in a tenant for app-only access, allowed to
    /// open these mailboxes (compared lower-cased); its tokens carry the role
    /// `IMAP.AccessAsApp`. Registers the tenant too if it is unknown. Registering a client
    /// id again replaces the earlier registration (un-expiring its secret and dropping
    /// certificates).
    pub fn add_app(&self, tenant: &str, client_id: &str, secret: &str, mailboxes: &[&str]) {
        let tenant = tenant.to_ascii_lowercase();
        let mut dir = self.directory();
        dir.tenants.insert(tenant.clone());
        dir.apps.insert(
            client_id.to_string(),
            App {
                tenant,
                secret: Some(secret.to_string()),
                secret_expired: false,
                certificates: Vec::new(),
                mailboxes: lower_all(mailboxes),
                default_roles: vec![IMAP_APP_ROLE.to_string()],
                delegated: None,
            },
        );
    }

    /// Adds a certificate credential (`cert_pem`, one PEM certificate) to an app for
    /// app-only access to these mailboxes. If `client_id` is already registered in `tenant`
    /// the certificate is added to it (a secret keeps working) and the mailboxes are added
    /// to its list; otherwise a new app-only registration without a secret is made (tokens
    /// with role `IMAP.AccessAsApp`), registering the tenant if needed.
    ///
    /// The token endpoint then accepts `client_assertion_type=
    /// urn:ietf:params:oauth:client-assertion-type:jwt-bearer` with an RS256
    /// `client_assertion` whose header names the certificate by `x5t#S256` (base64url
    /// SHA-256 of its DER) and whose claims have `aud` = the token URL, `iss` = `sub` = the
    /// client id, `exp` in the future, `nbf` and `jti`. The certificate's own validity period
    /// counts too (an expired one is refused with `AADSTS700027`).
    ///
    /// # Panics
    /// If `cert_pem` is not a PEM certificate.
    pub fn add_app_certificate(
        &self,
        tenant: &str,
        client_id: &str,
        cert_pem: &str,
        mailboxes: &[&str],
    ) {
        let certificate = AppCertificate::from_pem(cert_pem).unwrap_or_else(|error| {
            panic!("add_app_certificate({client_id}): not a PEM certificate: {error}")
        });
        let tenant = tenant.to_ascii_lowercase();
        let mut dir = self.directory();
        dir.tenants.insert(tenant.clone());
        match dir.apps.get_mut(client_id) {
            Some(app) if app.tenant == tenant => {
                app.certificates.push(certificate);
                for mailbox in lower_all(mailboxes) {
                    if !app.mailboxes.contains(&mailbox) {
                        app.mailboxes.push(mailbox);
                    }
                }
            }
            _ => {
                dir.apps.insert(
                    client_id.to_string(),
                    App {
                        tenant,
                        secret: None,
                        secret_expired: false,
                        certificates: vec![certificate],
                        mailboxes: lower_all(mailboxes),
                        default_roles: vec![IMAP_APP_ROLE.to_string()],
                        delegated: None,
                    },
                );
            }
        }
    }

    /// A self-signed RSA 2048 test certificate and its key, `(cert PEM, key PEM)`; the same
    /// as [`crate::make_test_certificate`].
    pub fn make_test_certificate(cn: &str, days_valid: i64) -> (String, String) {
        crate::make_test_certificate(cn, days_valid)
    }

    /// A test certificate and its key as PKCS#12, `(cert PEM, PKCS#12 DER)`; the same as
    /// [`crate::make_test_pkcs12`].
    pub fn make_test_pkcs12(cn: &str, days_valid: i64, password: &str) -> (String, Vec<u8>) {
        crate::make_test_pkcs12(cn, days_valid, password)
    }

    /// Registers an app for delegated (user) access: the authorization code flow with these
    /// redirect URIs and the device code flow ("allow public client flows"). With a
    /// `secret` it is a confidential client that must authenticate when redeeming codes and
    /// refresh tokens; without one it is a public client that must not. With
    /// `require_pkce`, codes from authorize requests without a `code_challenge` are refused
    /// at redemption with `AADSTS9002325` (as Entra does for SPA redirect URIs).
    ///
    /// Redirect URIs compare exactly, except that for a registered loopback URI
    /// (`http://localhost…`, `http://127.0.0.1…`, `http://[::1]…`) any port is accepted, as
    /// in Entra. Any `scope` string is accepted (e.g. `https://mail.google.com/` for a
    /// generic-provider test); tokens are still Exchange tokens. App-only tokens of such an
    /// app have no roles unless [`set_app_roles`](Self::set_app_roles) gives some.
    /// Re-registering a client id replaces the registration. Registers the tenant if needed.
    pub fn add_public_client(
        &self,
        tenant: &str,
        client_id: &str,
        secret: Option<&str>,
        redirect_uris: &[&str],
        require_pkce: bool,
    ) {
        let tenant = tenant.to_ascii_lowercase();
        let mut dir = self.directory();
        dir.tenants.insert(tenant.clone());
        dir.apps.insert(
            client_id.to_string(),
            App {
                tenant,
                secret: secret.map(str::to_string),
                secret_expired: false,
                certificates: Vec::new(),
                mailboxes: Vec::new(),
                default_roles: Vec::new(),
                delegated: Some(DelegatedSettings {
                    redirect_uris: redirect_uris.iter().map(|u| u.to_string()).collect(),
                    require_pkce,
                }),
            },
        );
    }

    /// Adds a user to a tenant (registering the tenant if needed). The user's mailbox is
    /// `user`; names compare case-insensitively.
    pub fn add_user(&self, tenant: &str, user: &str) {
        let tenant = tenant.to_ascii_lowercase();
        let mut dir = self.directory();
        dir.tenants.insert(tenant.clone());
        dir.users
            .insert((tenant, user.to_lowercase()), user.to_string());
    }

    /// Sets who is "signed in" in the browser: the authorize endpoint signs this user in
    /// without asking, and device codes are approved by them automatically once the client
    /// has polled once (so the client sees one `authorization_pending` first; turn this off
    /// with [`set_device_auto_approve(false)`](Self::set_device_auto_approve)). The user
    /// must have been added to the tenant the flow runs in ([`add_user`](Self::add_user)).
    pub fn set_signed_in_user(&self, user: &str) {
        self.directory().signed_in_user = Some(user.to_lowercase());
    }

    /// Grants (default) or withdraws consent for a client: without it every grant of the
    /// client is answered `AADSTS65001` (`invalid_grant`). May be called before the client
    /// is registered.
    pub fn set_consent(&self, client_id: &str, granted: bool) {
        let mut dir = self.directory();
        if granted {
            dir.no_consent.remove(client_id);
        } else {
            dir.no_consent.insert(client_id.to_string());
        }
    }

    /// Sets the `roles` of app-only tokens issued to the client from now on (default
    /// `["IMAP.AccessAsApp"]` for [`add_app`](Self::add_app) apps, none for
    /// [`add_public_client`](Self::add_public_client) apps). Without `IMAP.AccessAsApp`,
    /// token validation refuses the tokens, as Exchange Online does.
    pub fn set_app_roles(&self, client_id: &str, roles: &[&str]) {
        self.directory().roles.insert(
            client_id.to_string(),
            roles.iter().map(|r| r.to_string()).collect(),
        );
    }

    /// Sets the `aud` of every token issued to the client from now on (to issue
    /// wrong-audience tokens, which token validation refuses).
    pub fn set_token_audience(&self, client_id: &str, aud: &str) {
        self.directory()
            .audiences
            .insert(client_id.to_string(), aud.to_string());
    }

    /// Prefixes every access token and refresh token issued from now on with `prefix` (a
    /// canary for "secrets never reach the logs" tests). The JWT header is then no longer
    /// decodable; the claims part still is.
    pub fn set_token_prefix(&self, prefix: &str) {
        self.directory().token_prefix = prefix.to_string();
    }

    /// The `oid` of the app's service principal: a stable UUID derived from the client id.
    pub fn service_principal_id(&self, client_id: &str) -> String {
        derived_guid("service-principal", client_id)
    }

    /// The `oid` of a user: a stable UUID derived from the tenant and the user name
    /// (case-insensitive).
    pub fn user_id(&self, tenant: &str, user: &str) -> String {
        user_oid(&tenant.to_ascii_lowercase(), &user.to_lowercase())
    }

    /// Marks the app's client secret as expired: later token requests with it fail with
    /// `AADSTS7000222`. Tokens already issued stay valid until they expire.
    pub fn expire_secret(&self, client_id: &str) {
        if let Some(app) = self.directory().apps.get_mut(client_id) {
            app.secret_expired = true;
        }
    }

    /// Revokes every token issued so far to the app: token validation answers inactive for
    /// its access tokens, and its refresh tokens are answered `AADSTS50173` (grant revoked,
    /// e.g. after a password reset). Tokens requested afterwards are live again.
    pub fn revoke_tokens(&self, client_id: &str) {
        let now = unix_now();
        let mut dir = self.directory();
        for token in dir.tokens.values_mut() {
            if token.client_id == client_id {
                token.revoked = true;
            }
        }
        for grant in dir.refresh_tokens.values_mut() {
            if grant.client_id == client_id && grant.state == RefreshState::Live {
                grant.state = RefreshState::Revoked(now);
            }
        }
    }

    /// Lets the app's live refresh tokens expire "due to inactivity": redeeming them is
    /// answered `AADSTS700082`.
    pub fn expire_refresh_tokens(&self, client_id: &str) {
        for grant in self.directory().refresh_tokens.values_mut() {
            if grant.client_id == client_id && grant.state == RefreshState::Live {
                grant.state = RefreshState::Expired;
            }
        }
    }

    /// Whom a refresh token was issued to (the user who signed in), rotated ones included.
    pub fn refresh_token_user(&self, token: &str) -> Option<String> {
        self.directory()
            .refresh_tokens
            .get(token)
            .map(|grant| grant.user.clone())
    }

    /// The refresh tokens of the client that can still be redeemed (sorted).
    pub fn live_refresh_tokens(&self, client_id: &str) -> Vec<String> {
        let mut live: Vec<String> = self
            .directory()
            .refresh_tokens
            .iter()
            .filter(|(_, g)| g.client_id == client_id && g.state == RefreshState::Live)
            .map(|(token, _)| token.clone())
            .collect();
        live.sort();
        live
    }

    /// Makes the next token request of `client_id` (identified by its `client_id`
    /// parameter, HTTP Basic user or client assertion issuer) fail with this `AADSTS` code,
    /// whatever the request: HTTP status, `error` and description as in [`AAD_ERRORS`],
    /// with placeholders filled from the request (`issued` ninety days ago for 700082).
    /// Calls queue up: each affects one request.
    ///
    /// # Panics
    /// If `code` is not in [`AAD_ERRORS`].
    pub fn fail_next_token_request(&self, client_id: &str, code: u64) {
        assert!(
            aad_error_kind(code).is_some(),
            "fail_next_token_request: AADSTS{code} is not in the error table; known: {:?}",
            AAD_ERRORS.iter().map(|k| k.code).collect::<Vec<_>>()
        );
        self.directory()
            .injected
            .entry(client_id.to_string())
            .or_default()
            .push_back(code);
    }

    // -----------------------------------------------------------------------------------
    // Device code flow
    // -----------------------------------------------------------------------------------

    /// The user approves the device code with this user code (as shown to them, e.g.
    /// `ABCD-EFGH`; case and the dash do not matter): the client's next poll gets tokens
    /// for `user`.
    ///
    /// # Panics
    /// If no device code with this user code was issued, or `user` was not added to the
    /// device code's tenant.
    pub fn approve_device_code(&self, user_code: &str, user: &str) {
        let wanted = normalize_user_code(user_code);
        let user = user.to_lowercase();
        let mut dir = self.directory();
        let Some(tenant) = dir
            .device_codes
            .values()
            .find(|d| normalize_user_code(&d.user_code) == wanted)
            .map(|d| d.tenant.clone())
        else {
            panic!("approve_device_code: no device code with user code '{user_code}' was issued");
        };
        assert!(
            dir.users.contains_key(&(tenant.clone(), user.clone())),
            "approve_device_code: user '{user}' was not added to tenant '{tenant}' (add_user)"
        );
        if let Some(device) = dir
            .device_codes
            .values_mut()
            .find(|d| normalize_user_code(&d.user_code) == wanted)
        {
            device.approved_by = Some(user);
        }
    }

    /// The user codes of device codes that are neither approved, redeemed nor expired.
    pub fn device_codes_pending(&self) -> Vec<String> {
        let now = Instant::now();
        let mut pending: Vec<String> = self
            .directory()
            .device_codes
            .values()
            .filter(|d| d.approved_by.is_none() && !d.redeemed && d.expires_at > now)
            .map(|d| d.user_code.clone())
            .collect();
        pending.sort();
        pending
    }

    /// Sets the polling `interval` of device codes issued from now on (default 1 s; 0 is
    /// allowed).
    pub fn set_device_interval(&self, secs: u64) {
        self.directory().device_interval = secs;
    }

    /// Sets the `expires_in` of device codes issued from now on (default 900 s; 0 issues
    /// codes that are already expired, answered `expired_token` / `AADSTS70020`).
    pub fn set_device_code_lifetime(&self, secs: u64) {
        self.directory().device_code_lifetime = secs;
    }

    /// Whether the [signed-in user](Self::set_signed_in_user) approves device codes by
    /// themselves after the first poll (default true).
    pub fn set_device_auto_approve(&self, enabled: bool) {
        self.directory().device_auto_approve = enabled;
    }

    // -----------------------------------------------------------------------------------
    // Counters and switches
    // -----------------------------------------------------------------------------------

    /// Number of requests to the token endpoint so far, whatever their outcome
    /// (including those answered `503` while down).
    pub fn token_requests(&self) -> usize {
        self.handle.shared.token_requests.load(Ordering::SeqCst)
    }

    /// Number of `grant_type=refresh_token` requests to the token endpoint so far, whatever
    /// their outcome (not counting those answered `503` while down).
    pub fn refresh_requests(&self) -> usize {
        self.handle.shared.refresh_requests.load(Ordering::SeqCst)
    }

    /// Number of token validation (`/tokeninfo`) requests so far, i.e. Dovecot's
    /// XOAUTH2/OAUTHBEARER checks.
    pub fn tokeninfo_requests(&self) -> usize {
        self.handle.shared.tokeninfo_requests.load(Ordering::SeqCst)
    }

    /// Sets the lifetime (`expires_in`) of access tokens issued from now on; default 3599.
    /// Zero issues tokens that are already expired.
    pub fn set_token_lifetime(&self, secs: u64) {
        self.directory().token_lifetime = secs;
    }

    /// While `on` is true, token answers carry `expires_in` as a string ("3599"), a shape
    /// some providers send and oauth2 does not accept: a successful answer, tokens included,
    /// that the client cannot parse.
    pub fn set_expires_in_as_string(&self, on: bool) {
        self.handle
            .shared
            .expires_in_as_string
            .store(on, Ordering::SeqCst);
    }

    /// Makes every token request from now on wait `delay` before it is handled, as a slow
    /// identity platform would: two clients that send theirs close together are both in flight.
    pub fn set_token_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.handle
            .shared
            .token_delay_ms
            .store(ms, Ordering::SeqCst);
    }

    /// While `down` is true every endpoint answers HTTP 503.
    pub fn set_down(&self, down: bool) {
        self.handle.shared.down.store(down, Ordering::SeqCst);
    }

    /// Issues an app-only token for `client_id` without going through HTTP, as if a
    /// successful client-credentials request had been made (not counted in
    /// [`token_requests`](Self::token_requests)). Handy for tests of the IMAP side only.
    pub fn issue_token(&self, client_id: &str) -> anyhow::Result<String> {
        let mut dir = self.directory();
        let tenant = dir
            .apps
            .get(client_id)
            .map(|app| app.tenant.clone())
            .with_context(|| format!("no app with client id '{client_id}' is registered"))?;
        Ok(dir
            .issue_access(client_id, &tenant, Subject::App, ClientAuth::Secret)
            .0)
    }

    /// Issues a delegated token of `client_id` for `user` without going through HTTP (no
    /// refresh token). The user must have been added to the app's tenant.
    pub fn issue_user_token(&self, client_id: &str, user: &str) -> anyhow::Result<String> {
        let mut dir = self.directory();
        let app = dir
            .apps
            .get(client_id)
            .with_context(|| format!("no app with client id '{client_id}' is registered"))?;
        let tenant = app.tenant.clone();
        let auth = if app.is_confidential() {
            ClientAuth::Secret
        } else {
            ClientAuth::Public
        };
        let user = user.to_lowercase();
        anyhow::ensure!(
            dir.users.contains_key(&(tenant.clone(), user.clone())),
            "user '{user}' was not added to tenant '{tenant}'"
        );
        Ok(dir
            .issue_access(client_id, &tenant, Subject::User(user), auth)
            .0)
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
    fn issue_access(
        &mut self,
        client_id: &str,
        tenant: &str,
        subject: Subject,
        auth: ClientAuth,
    ) -> (String, u64) {
        let lifetime = self.token_lifetime;
        let now = unix_now();
        let exp = now + i64::try_from(lifetime).unwrap_or(i64::MAX / 2);
        let iss = format!("https://sts.windows.net/{tenant}/");
        let (default_aud, roles, scp) = match &subject {
            Subject::App => (
                EXCHANGE_APP_AUDIENCE,
                self.roles
                    .get(client_id)
                    .or_else(|| self.apps.get(client_id).map(|app| &app.default_roles))
                    .cloned()
                    .unwrap_or_default(),
                None,
            ),
            Subject::User(_) => (
                EXCHANGE_USER_AUDIENCE,
                Vec::new(),
                Some(IMAP_USER_PERMISSION.to_string()),
            ),
        };
        let aud = self
            .audiences
            .get(client_id)
            .cloned()
            .unwrap_or_else(|| default_aud.to_string());
        let mut claims = json!({
            "aud": aud,
            "iss": iss,
            "idp": iss,
            "iat": now,
            "nbf": now,
            "exp": exp,
            "tid": tenant,
            "appid": client_id,
            "appidacr": auth.appidacr(),
            "uti": random_string(22),
            "ver": "1.0",
        });
        let fields = claims.as_object_mut().expect("claims are an object");
        match &subject {
            Subject::App => {
                let oid = derived_guid("service-principal", client_id);
                fields.insert("oid".into(), json!(oid));
                fields.insert("sub".into(), json!(oid));
                fields.insert("roles".into(), json!(roles));
                fields.insert("idtyp".into(), json!("app"));
            }
            Subject::User(user) => {
                let name = self
                    .users
                    .get(&(tenant.to_string(), user.clone()))
                    .cloned()
                    .unwrap_or_else(|| user.clone());
                let oid = user_oid(tenant, user);
                fields.insert("oid".into(), json!(oid));
                fields.insert("sub".into(), json!(oid));
                fields.insert("scp".into(), json!(scp));
                fields.insert("upn".into(), json!(name));
                fields.insert("unique_name".into(), json!(name));
                fields.insert("amr".into(), json!(["pwd"]));
                fields.insert("idtyp".into(), json!("user"));
            }
        }
        let token = format!(
            "{}{}",
            self.token_prefix,
            jwt::sign_hs256(&self.signing_key, &self.key_id, &claims)
        );
        self.tokens.insert(
            token.clone(),
            IssuedToken {
                client_id: client_id.to_string(),
                tenant: tenant.to_string(),
                subject,
                aud,
                roles,
                scp,
                expires_at: far_instant(lifetime),
                expires_at_unix: u64::try_from(exp).unwrap_or(0),
                revoked: false,
            },
        );
        (token, lifetime)
    }

    /// Issues an access token and a new refresh token for a delegated grant.
    fn issue_delegated(
        &mut self,
        client_id: &str,
        tenant: &str,
        user: &str,
        scope: &str,
        auth: ClientAuth,
    ) -> Issued {
        let (access_token, expires_in) =
            self.issue_access(client_id, tenant, Subject::User(user.to_string()), auth);
        let refresh_token = format!("{}1.{}", self.token_prefix, random_string(OPAQUE_LEN));
        self.refresh_tokens.insert(
            refresh_token.clone(),
            RefreshGrant {
                client_id: client_id.to_string(),
                tenant: tenant.to_string(),
                user: user.to_string(),
                scope: scope.to_string(),
                issued_unix: unix_now(),
                state: RefreshState::Live,
            },
        );
        Issued {
            access_token,
            expires_in,
            refresh_token: Some(refresh_token),
            scope: Some(response_scope(scope)),
        }
    }

    fn has_user(&self, tenant: &str, user: &str) -> bool {
        self.users
            .contains_key(&(tenant.to_string(), user.to_string()))
    }
}

/// The `scope` of a delegated token response: the requested scopes without
/// `offline_access` (as Entra reports them), or the request unchanged if that leaves none.
fn response_scope(requested: &str) -> String {
    let kept: Vec<&str> = requested
        .split_whitespace()
        .filter(|s| !s.eq_ignore_ascii_case("offline_access"))
        .collect();
    if kept.is_empty() {
        requested.trim().to_string()
    } else {
        kept.join(" ")
    }
}

fn lower_all(items: &[&str]) -> Vec<String> {
    items.iter().map(|m| m.to_lowercase()).collect()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn user_oid(tenant_lower: &str, user_lower: &str) -> String {
    derived_guid("user", &format!("{tenant_lower}/{user_lower}"))
}

/// A random string of URL-safe characters.
fn random_string(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// `ABCD-EFGH`: eight random capital letters, as a device flow user code.
fn random_user_code() -> String {
    let mut rng = rand::rng();
    let mut letter = || char::from(b'A' + rng.random_range(0..26u8));
    let first: String = (0..4).map(|_| letter()).collect();
    let second: String = (0..4).map(|_| letter()).collect();
    format!("{first}-{second}")
}

fn normalize_user_code(code: &str) -> String {
    code.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

fn guid_from_bytes(b: [u8; 16]) -> String {
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

/// A random id shaped like a GUID, as Entra uses for trace and correlation ids.
fn random_guid() -> String {
    guid_from_bytes(rand::rng().random())
}

/// A stable, name-based UUID (version 5 layout over SHA-256).
fn derived_guid(namespace: &str, name: &str) -> String {
    let digest = openssl::sha::sha256(format!("mailintake-testbed/{namespace}/{name}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    guid_from_bytes(b)
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
    // What Exchange Online checks before it looks at the mailbox.
    if !EXCHANGE_AUDIENCES.contains(&issued.aud.as_str()) {
        return inactive();
    }
    let mailboxes: Vec<String> = match &issued.subject {
        Subject::App => {
            if !issued.roles.iter().any(|r| r == IMAP_APP_ROLE) {
                return inactive();
            }
            dir.apps
                .get(&issued.client_id)
                .map(|app| app.mailboxes.clone())
                .unwrap_or_default()
        }
        Subject::User(user) => {
            if !issued
                .scp
                .as_deref()
                .is_some_and(|scp| scp.split(' ').any(|s| s == IMAP_USER_PERMISSION))
            {
                return inactive();
            }
            vec![user.clone()]
        }
    };
    let mut body = json!({
        "active": true,
        // Dovecot insists on its username_attribute being present.
        "email": mailboxes.first().cloned().unwrap_or_else(|| issued.client_id.clone()),
        // Comma-delimited on both ends so that a wildcard `*,user,*` matches members.
        "mailboxes": format!(",{},", mailboxes.join(",")),
        "client_id": issued.client_id,
        "appid": issued.client_id,
        "tid": issued.tenant,
        "aud": issued.aud,
        "exp": issued.expires_at_unix,
    });
    let fields = body.as_object_mut().expect("an object");
    match &issued.subject {
        Subject::App => {
            fields.insert("scope".into(), json!(OUTLOOK_SCOPE));
            fields.insert("roles".into(), json!(issued.roles));
        }
        Subject::User(user) => {
            fields.insert("scope".into(), json!(issued.scp));
            fields.insert("upn".into(), json!(user));
        }
    }
    json_response(StatusCode::OK, &body)
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

/// `lifetime` seconds from now, or about a century for lifetimes the clock cannot add (a test
/// may ask for `u64::MAX`).
pub(crate) fn far_instant(lifetime: u64) -> Instant {
    let now = Instant::now();
    now.checked_add(Duration::from_secs(lifetime))
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 86400)))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_strings_are_url_safe() {
        let token = random_string(OPAQUE_LEN);
        assert_eq!(token.len(), OPAQUE_LEN);
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
        let derived = derived_guid("x", "y");
        assert_eq!(derived, derived_guid("x", "y"));
        assert_ne!(derived, derived_guid("x", "z"));
        assert_eq!(&derived[14..15], "5");
    }

    #[test]
    fn user_codes() {
        let code = random_user_code();
        assert_eq!(code.len(), 9);
        assert_eq!(&code[4..5], "-");
        assert!(
            code.chars()
                .filter(|c| *c != '-')
                .all(|c| c.is_ascii_uppercase())
        );
        assert_eq!(normalize_user_code("abcd-efgh"), "ABCDEFGH");
    }

    #[test]
    fn response_scope_drops_offline_access() {
        assert_eq!(
            response_scope("https://outlook.office.com/IMAP.AccessAsUser.All offline_access"),
            "https://outlook.office.com/IMAP.AccessAsUser.All"
        );
        assert_eq!(response_scope("offline_access"), "offline_access");
        assert_eq!(
            response_scope("https://mail.google.com/"),
            "https://mail.google.com/"
        );
    }
}
