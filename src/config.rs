//! Configuration: TOML read with serde, validated completely at load so that a bad file is
//! rejected at start with the file, the line, the key and what to do about it.
//!
//! Secrets are never written inline: a credential names an environment variable, a file, or a
//! systemd credential (`LoadCredential=`) holding its secret.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::secret::Secret;

/// Microsoft's public-cloud identity platform; sovereign clouds set `authority` per credential.
pub const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";
/// The resource scope for app-only IMAP access to Exchange Online.
pub const DEFAULT_APP_SCOPE: &str = "https://outlook.office365.com/.default";
/// Every minute, at second 0 (cron with the seconds field first).
pub const DEFAULT_SCHEDULE: &str = "0 * * * * *";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/mailintake";

/// A fully validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub data_dir: PathBuf,
    pub database_url: String,
    pub imap: ImapTuning,
    pub numbering: crate::registry::numbers::Numbering,
    /// One registry transaction per message (default) or per fetched batch.
    pub commit: crate::pipeline::CommitMode,
    pub limits: crate::pipeline::Limits,
    pub credentials: BTreeMap<String, CredentialConfig>,
    pub mailboxes: Vec<MailboxConfig>,
    /// The AES-256 key that encrypts stored refresh tokens (required with delegated credentials).
    pub token_key: Option<TokenKey>,
    /// What is valid but unsafe, such as a secret file that other users may read: printed by
    /// `check-config` and logged when the service starts.
    pub warnings: Vec<String>,
}

/// 32 bytes, never printed.
#[derive(Clone)]
pub struct TokenKey(pub [u8; 32]);

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenKey([redacted])")
    }
}

impl TokenKey {
    /// 64 hex digits or standard base64 of 32 bytes.
    pub fn parse(text: &str) -> Option<TokenKey> {
        use base64::Engine as _;
        let text = text.trim();
        let mut key = [0u8; 32];
        if hex::decode_to_slice(text, &mut key).is_ok() {
            return Some(TokenKey(key));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .ok()?;
        key.copy_from_slice(bytes.get(..32).filter(|_| bytes.len() == 32)?);
        Some(TokenKey(key))
    }
}

/// Network and batching limits for IMAP sessions.
#[derive(Debug, Clone)]
pub struct ImapTuning {
    pub connect_timeout: Duration,
    /// Upper bound for any single network wait (a response line, one fetched message).
    pub io_timeout: Duration,
    pub batch_max_messages: usize,
    pub batch_max_bytes: u64,
    /// Bytes of fetched messages a session holds at once (fetched, waiting or being prepared);
    /// a batch that does not fit beside the others waits. Default: four times
    /// `batch_max_bytes` (64 MiB): large attachments are decoded into the blob store in
    /// pieces, so the peak beside the budget is small (bench/README.md).
    pub in_flight_max_bytes: u64,
    /// IMAP sessions open at once across all mailboxes (servers and tenants throttle).
    pub max_sessions: usize,
    /// Messages of a batch prepared (hashed, stored, parsed) at once; commits stay in order.
    /// Default 1.
    pub parallel_messages: usize,
}

impl Default for ImapTuning {
    fn default() -> Self {
        ImapTuning {
            connect_timeout: Duration::from_secs(20),
            io_timeout: Duration::from_secs(120),
            batch_max_messages: 100,
            batch_max_bytes: 16 * 1024 * 1024,
            in_flight_max_bytes: 64 * 1024 * 1024,
            max_sessions: 16,
            // Opt-in: on 2 vCPUs shared with the server it did not pay (bench/README.md), and
            // with one preparation at a time a full disk fails exactly the message that did
            // not fit, not also its neighbour.
            parallel_messages: 1,
        }
    }
}

#[derive(Debug, Clone)]
pub enum CredentialConfig {
    /// Microsoft Entra ID app-only access (client credentials grant, `IMAP.AccessAsApp`)
    /// authenticated with a client secret.
    EntraAppSecret(EntraAppSecret),
    /// The same, authenticated with a certificate (a signed client assertion).
    EntraAppCertificate(EntraAppCertificate),
    /// A user's delegated access: Entra (`IMAP.AccessAsUser.All` + `offline_access`) or any
    /// OAuth2 provider, logged in once with `mailintake auth login`, then refresh tokens.
    Delegated(DelegatedConfig),
    /// Plain IMAP LOGIN / AUTHENTICATE PLAIN, for on-premises servers.
    Password(PasswordConfig),
}

impl CredentialConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            CredentialConfig::EntraAppSecret(_) => "entra-app-secret",
            CredentialConfig::EntraAppCertificate(_) => "entra-app-certificate",
            CredentialConfig::Delegated(d) if d.entra.is_some() => "entra-delegated",
            CredentialConfig::Delegated(_) => "oauth2",
            CredentialConfig::Password(_) => "password",
        }
    }
}

#[derive(Debug, Clone)]
pub struct EntraAppSecret {
    pub authority: String,
    pub tenant_id: String,
    pub client_id: String,
    pub client_secret: Secret,
    /// The expiry date the portal showed when the secret was created, if configured.
    pub secret_expires: Option<chrono::NaiveDate>,
    pub scope: String,
}

impl EntraAppSecret {
    /// `{authority}/{tenant}/oauth2/v2.0/token`
    pub fn token_url(&self) -> String {
        entra_url(&self.authority, &self.tenant_id, "token")
    }
}

/// `{authority}/{tenant}/oauth2/v2.0/{endpoint}`
pub fn entra_url(authority: &str, tenant: &str, endpoint: &str) -> String {
    format!(
        "{}/{}/oauth2/v2.0/{endpoint}",
        authority.trim_end_matches('/'),
        tenant
    )
}

#[derive(Debug, Clone)]
pub struct EntraAppCertificate {
    pub authority: String,
    pub tenant_id: String,
    pub client_id: String,
    pub scope: String,
    pub certificate: AppCertificate,
}

impl EntraAppCertificate {
    pub fn token_url(&self) -> String {
        entra_url(&self.authority, &self.tenant_id, "token")
    }
}

/// A certificate and its private key, loaded and checked at configuration time.
#[derive(Clone)]
pub struct AppCertificate {
    pub path: PathBuf,
    /// base64url(SHA-256(DER)): the `x5t#S256` JWT header Entra matches the upload against.
    pub x5t_s256: String,
    pub subject: String,
    pub not_after: chrono::DateTime<chrono::Utc>,
    /// PKCS#8 PEM of the private key.
    pub private_key_pem: Secret,
}

impl fmt::Debug for AppCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppCertificate")
            .field("path", &self.path)
            .field("x5t_s256", &self.x5t_s256)
            .field("subject", &self.subject)
            .field("not_after", &self.not_after)
            .field("private_key_pem", &self.private_key_pem)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OAuthSasl {
    XOAuth2,
    OAuthBearer,
}

#[derive(Debug, Clone)]
pub struct EntraTenant {
    pub authority: String,
    pub tenant_id: String,
}

#[derive(Debug, Clone)]
pub struct DelegatedConfig {
    /// Set for `entra-delegated` (Entra's URLs and error codes); None for a generic provider.
    pub entra: Option<EntraTenant>,
    pub authorization_url: String,
    pub token_url: String,
    pub device_authorization_url: Option<String>,
    pub client_id: String,
    /// Only for confidential (web) app registrations.
    pub client_secret: Option<Secret>,
    pub scopes: Vec<String>,
    pub pkce: bool,
    pub redirect_uri: String,
    pub sasl: OAuthSasl,
}

pub const DEFAULT_REDIRECT_URI: &str = "http://localhost:3017/";
pub const DEFAULT_DELEGATED_SCOPES: [&str; 2] = [
    "https://outlook.office.com/IMAP.AccessAsUser.All",
    "offline_access",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordMechanism {
    Plain,
    Login,
}

#[derive(Debug, Clone)]
pub struct PasswordConfig {
    /// The login name; the mailbox address when not set.
    pub username: Option<String>,
    pub password: Secret,
    pub mechanism: PasswordMechanism,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// TLS from the first byte (IMAPS, port 993).
    Implicit,
    /// Plain connection upgraded with STARTTLS before anything else is sent.
    StartTls,
    /// No TLS at all: accepted only for loopback hosts.
    Plain,
}

/// What happens on the server once a message is safely registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterAction {
    Seen,
    Move(String),
    None,
}

impl AfterAction {
    pub fn as_config_str(&self) -> String {
        match self {
            AfterAction::Seen => "seen".to_owned(),
            AfterAction::Move(folder) => format!("move:{folder}"),
            AfterAction::None => "none".to_owned(),
        }
    }

    pub fn parse(s: &str) -> Option<AfterAction> {
        match s {
            "seen" => Some(AfterAction::Seen),
            "none" => Some(AfterAction::None),
            _ => s
                .strip_prefix("move:")
                .map(str::trim)
                .filter(|f| !f.is_empty())
                .map(|f| AfterAction::Move(f.to_owned())),
        }
    }
}

#[derive(Debug, Clone)]
pub struct MailboxConfig {
    pub id: String,
    pub address: String,
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub ca_file: Option<PathBuf>,
    pub folder: String,
    pub schedule: cron::Schedule,
    pub after: AfterAction,
    /// What happens on the server to a quarantined message (its raw bytes are safe).
    pub after_quarantine: AfterAction,
    pub credential: String,
    pub enabled: bool,
}

// ---------------------------------------------------------------------------------------------
// Errors

/// One thing wrong with a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: Option<usize>,
    /// Dotted path of the key, e.g. `mailbox[podatelna].schedule`.
    pub key: String,
    pub problem: String,
    pub fix: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration file {path} is not valid: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{}", render_problems(path, problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn render_problems(path: &Path, problems: &[Problem]) -> String {
    let mut out = format!(
        "configuration file {} has {} problem(s):",
        path.display(),
        problems.len()
    );
    for p in problems {
        let at = match p.line {
            Some(line) => format!("{}:{line}", path.display()),
            None => path.display().to_string(),
        };
        out.push_str(&format!(
            "\n  - {at}: `{}`: {}\n    fix: {}",
            p.key, p.problem, p.fix
        ));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// File format

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    data_dir: Option<Spanned<String>>,
    database_url: Option<Spanned<String>>,
    #[serde(default)]
    imap: RawImap,
    #[serde(default)]
    registry: RawRegistry,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    secrets: RawSecrets,
    #[serde(default)]
    credentials: BTreeMap<String, Spanned<RawCredential>>,
    #[serde(default)]
    mailbox: Vec<Spanned<RawMailbox>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawImap {
    connect_timeout_secs: Option<u64>,
    io_timeout_secs: Option<u64>,
    batch_max_messages: Option<usize>,
    batch_max_bytes: Option<u64>,
    in_flight_max_bytes: Option<u64>,
    max_sessions: Option<usize>,
    parallel_messages: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    number_prefix: Option<Spanned<String>>,
    number_format: Option<Spanned<String>>,
    commit: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_message_bytes: Option<u64>,
    max_attempts: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSecrets {
    token_key_env: Option<Spanned<String>>,
    token_key_file: Option<Spanned<String>>,
    token_key_credential: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    kind: Spanned<String>,
    authority: Option<Spanned<String>>,
    tenant_id: Option<Spanned<String>>,
    client_id: Option<Spanned<String>>,
    client_secret_env: Option<Spanned<String>>,
    client_secret_file: Option<Spanned<String>>,
    client_secret_credential: Option<Spanned<String>>,
    client_secret_expires: Option<Spanned<String>>,
    scope: Option<Spanned<String>>,
    certificate_file: Option<Spanned<String>>,
    certificate_password_env: Option<Spanned<String>>,
    certificate_password_file: Option<Spanned<String>>,
    redirect_uri: Option<Spanned<String>>,
    scopes: Option<Spanned<Vec<String>>>,
    authorization_url: Option<Spanned<String>>,
    token_url: Option<Spanned<String>>,
    device_authorization_url: Option<Spanned<String>>,
    pkce: Option<Spanned<bool>>,
    sasl: Option<Spanned<String>>,
    username: Option<Spanned<String>>,
    password_env: Option<Spanned<String>>,
    password_file: Option<Spanned<String>>,
    password_credential: Option<Spanned<String>>,
    mechanism: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMailbox {
    id: Spanned<String>,
    address: Spanned<String>,
    host: Spanned<String>,
    port: Option<u16>,
    tls: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
    folder: Option<Spanned<String>>,
    schedule: Option<Spanned<String>>,
    after: Option<Spanned<String>>,
    after_quarantine: Option<Spanned<String>>,
    credential: Spanned<String>,
    #[serde(default = "yes")]
    enabled: bool,
}

fn yes() -> bool {
    true
}

/// Where secrets come from: the process environment and systemd's credentials directory.
/// Abstracted so tests can load configurations without touching the real environment.
pub trait SecretEnv {
    fn var(&self, name: &str) -> Option<String>;
    fn credentials_directory(&self) -> Option<PathBuf>;
}

/// The real process environment.
pub struct ProcessEnv;

impl SecretEnv for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
    fn credentials_directory(&self) -> Option<PathBuf> {
        std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from)
    }
}

impl Config {
    /// Reads and validates the configuration file, resolving secrets from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with(path, &ProcessEnv)
    }

    pub fn load_with(path: &Path, env: &dyn SecretEnv) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(path, &text, env)
    }

    /// Validates configuration text; `path` is used for messages and to resolve relative paths.
    pub fn parse(path: &Path, text: &str, env: &dyn SecretEnv) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: syntax_message(text, &e),
        })?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let mut v = Validator {
            text,
            base: &base,
            problems: Vec::new(),
            warnings: Vec::new(),
        };
        let config = v.config(path, raw, env);
        if v.problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems: v.problems,
            })
        }
    }

    pub fn mailbox(&self, id: &str) -> Option<&MailboxConfig> {
        self.mailboxes.iter().find(|m| m.id == id)
    }
}

struct Validator<'a> {
    text: &'a str,
    base: &'a Path,
    problems: Vec<Problem>,
    warnings: Vec<String>,
}

/// The most IMAP sessions at once that `imap.max_sessions` can ask for.
const MAX_SESSIONS_CAP: usize = 4096;

/// A TOML error as "line L, column C: what". toml's own rendering quotes the offending source
/// line, and that line may hold a secret (`client_secret = "…"` put where only
/// `client_secret_file` is allowed fails as an unknown key), so it is never shown.
fn syntax_message(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end();
    let Some(start) = e.span().map(|span| span.start) else {
        return message.to_owned();
    };
    let before = text.get(..start).unwrap_or(text);
    let line = before.bytes().filter(|b| *b == b'\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}: {message}")
}

impl Validator<'_> {
    fn line_of<T>(&self, s: &Spanned<T>) -> Option<usize> {
        let start = s.span().start;
        self.text
            .get(..start)
            .map(|before| before.bytes().filter(|b| *b == b'\n').count() + 1)
    }

    /// The line of an optional key, if it is present.
    fn at<T>(&self, value: &Option<Spanned<T>>) -> Option<usize> {
        value.as_ref().and_then(|v| self.line_of(v))
    }

    fn problem<T>(&mut self, at: Option<&Spanned<T>>, key: String, problem: String, fix: &str) {
        let line = at.and_then(|s| self.line_of(s));
        self.problems.push(Problem {
            line,
            key,
            problem,
            fix: fix.to_owned(),
        });
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            self.base.join(p)
        }
    }

    fn config(&mut self, path: &Path, raw: RawConfig, env: &dyn SecretEnv) -> Config {
        let data_dir = raw
            .data_dir
            .as_ref()
            .map(|d| self.path(d.get_ref()))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let database_url = match &raw.database_url {
            Some(url) => {
                let u = url.get_ref();
                if !(u.starts_with("sqlite:")
                    || u.starts_with("postgres://")
                    || u.starts_with("postgresql://"))
                {
                    self.problem(
                        Some(url),
                        "database_url".into(),
                        format!(
                            "{:?} is neither a SQLite nor a PostgreSQL URL",
                            crate::registry::redact_url(u)
                        ),
                        "use sqlite:///path/to/registry.sqlite3 or postgres://user@host/dbname, or leave it out for a SQLite file under data_dir",
                    );
                }
                u.clone()
            }
            None => format!("sqlite://{}", data_dir.join("registry.sqlite3").display()),
        };
        let defaults = ImapTuning::default();
        for (key, value) in [
            ("imap.connect_timeout_secs", raw.imap.connect_timeout_secs),
            ("imap.io_timeout_secs", raw.imap.io_timeout_secs),
        ] {
            if value == Some(0) {
                self.problems.push(Problem {
                    line: None,
                    key: key.into(),
                    problem: "is 0: every step would time out at once".into(),
                    fix: "leave it out for the default or give seconds, e.g. 30".into(),
                });
            }
        }
        let imap = ImapTuning {
            connect_timeout: raw
                .imap
                .connect_timeout_secs
                .map_or(defaults.connect_timeout, Duration::from_secs),
            io_timeout: raw
                .imap
                .io_timeout_secs
                .map_or(defaults.io_timeout, Duration::from_secs),
            batch_max_messages: raw
                .imap
                .batch_max_messages
                .unwrap_or(defaults.batch_max_messages)
                .max(1),
            batch_max_bytes: raw
                .imap
                .batch_max_bytes
                .unwrap_or(defaults.batch_max_bytes)
                .max(1),
            // Default: four full batches (one prepared, the next three fetched meanwhile).
            in_flight_max_bytes: raw
                .imap
                .in_flight_max_bytes
                .unwrap_or_else(|| {
                    raw.imap
                        .batch_max_bytes
                        .map_or(defaults.in_flight_max_bytes, |b| b.max(1).saturating_mul(4))
                })
                .max(1),
            max_sessions: raw
                .imap
                .max_sessions
                .unwrap_or(defaults.max_sessions)
                .clamp(1, MAX_SESSIONS_CAP),
            parallel_messages: raw
                .imap
                .parallel_messages
                .unwrap_or(defaults.parallel_messages)
                .clamp(1, 16),
        };

        let numbering = crate::registry::numbers::Numbering {
            prefix: raw
                .registry
                .number_prefix
                .as_ref()
                .map(|p| p.get_ref().clone())
                .unwrap_or_else(|| crate::registry::numbers::DEFAULT_PREFIX.to_owned()),
            format: raw
                .registry
                .number_format
                .as_ref()
                .map(|f| f.get_ref().clone())
                .unwrap_or_else(|| crate::registry::numbers::DEFAULT_FORMAT.to_owned()),
        };
        if let Err(e) = numbering.validate() {
            let at = raw
                .registry
                .number_format
                .as_ref()
                .map(|f| self.line_of(f))
                .unwrap_or(None);
            self.problems.push(Problem {
                line: at,
                key: "registry.number_format".into(),
                problem: e.problem,
                fix:
                    "use {prefix}, {year} and {seq} or {seq:06}, e.g. \"{prefix}-{year}-{seq:06}\""
                        .into(),
            });
        }
        if numbering.prefix.trim().is_empty() {
            self.problems.push(Problem {
                line: raw
                    .registry
                    .number_prefix
                    .as_ref()
                    .and_then(|p| self.line_of(p)),
                key: "registry.number_prefix".into(),
                problem: "is empty".into(),
                fix: "set the registry's prefix, e.g. \"EP\"; it names the number sequence".into(),
            });
        }
        let commit = match &raw.registry.commit {
            None => crate::pipeline::CommitMode::default(),
            Some(mode) => match crate::pipeline::CommitMode::parse(mode.get_ref()) {
                Some(m) => m,
                None => {
                    self.problem(
                        Some(mode),
                        "registry.commit".into(),
                        format!("{:?} is not a commit mode", mode.get_ref()),
                        "use \"message\" (one transaction per message, the default) or \"batch\" (one per fetched batch: one flush and one acknowledgement per batch)",
                    );
                    crate::pipeline::CommitMode::default()
                }
            },
        };
        let limit_defaults = crate::pipeline::Limits::default();
        let limits = crate::pipeline::Limits {
            max_message_bytes: raw
                .limits
                .max_message_bytes
                .unwrap_or(limit_defaults.max_message_bytes)
                .max(1),
            max_attempts: raw
                .limits
                .max_attempts
                .unwrap_or(limit_defaults.max_attempts)
                .max(1),
        };

        if commit == crate::pipeline::CommitMode::PerBatch && limits.max_attempts < 2 {
            // A worker that dies with a batch in hand counts one attempt against each of its
            // messages; with a single attempt allowed, the innocent ones would be quarantined.
            self.problem(
                raw.registry.commit.as_ref(),
                "registry.commit".into(),
                "\"batch\" needs limits.max_attempts of at least 2".into(),
                "raise [limits] max_attempts (default 3) or use commit = \"message\"",
            );
        }
        let mut credentials = BTreeMap::new();
        for (name, cred) in &raw.credentials {
            if let Some(c) = self.credential(name, cred, env) {
                credentials.insert(name.clone(), c);
            }
        }
        let secrets_table = &raw.secrets;
        let token_key = match self.secret_source(
            "secrets.token_key",
            [
                &secrets_table.token_key_env,
                &secrets_table.token_key_file,
                &secrets_table.token_key_credential,
            ],
            &Spanned::new(0..0, ()),
            env,
            false,
            "the 32-byte token key (64 hex digits; `mailintake auth new-key`)",
        ) {
            Some(Some(text)) => match TokenKey::parse(text.expose()) {
                Some(k) => Some(k),
                None => {
                    self.problems.push(Problem {
                        line: None,
                        key: "secrets.token_key_*".into(),
                        problem: "is not 32 bytes as 64 hex digits or base64".into(),
                        fix: "create one with `mailintake auth new-key > /etc/mailintake/token.key` (mode 0600)".into(),
                    });
                    None
                }
            },
            _ => None,
        };
        let delegated: Vec<&String> = credentials
            .iter()
            .filter(|(_, c)| matches!(c, CredentialConfig::Delegated(_)))
            .map(|(n, _)| n)
            .collect();
        if token_key.is_none() && !delegated.is_empty() {
            self.problems.push(Problem {
                line: None,
                key: "secrets.token_key_*".into(),
                problem: format!("credentials {delegated:?} keep refresh tokens, which are stored encrypted, but no token key is configured"),
                fix: "add [secrets] with token_key_file = \"/etc/mailintake/token.key\" (created by `mailintake auth new-key`), token_key_env or token_key_credential".into(),
            });
        }

        let mut mailboxes = Vec::new();
        let mut ids = BTreeSet::new();
        for mb in &raw.mailbox {
            let id = mb.get_ref().id.get_ref().clone();
            if !ids.insert(id.clone()) {
                self.problem(
                    Some(&mb.get_ref().id),
                    format!("mailbox[{id}].id"),
                    format!("mailbox id {id:?} is used twice"),
                    "give every [[mailbox]] its own id; the registry keys its records on it",
                );
            }
            if let Some(m) = self.mailbox(mb.get_ref(), &raw.credentials) {
                mailboxes.push(m);
            }
        }
        if raw.mailbox.is_empty() {
            self.problems.push(Problem {
                line: None,
                key: "mailbox".into(),
                problem: "no mailbox is configured".into(),
                fix: "add at least one [[mailbox]] table (see config/mailintake.example.toml)"
                    .into(),
            });
        }
        Config {
            path: path.to_owned(),
            data_dir,
            database_url,
            imap,
            numbering,
            commit,
            limits,
            credentials,
            mailboxes,
            token_key,
            warnings: std::mem::take(&mut self.warnings),
        }
    }

    /// Warns when a file holding a secret (or a private key) may be read or written by users
    /// other than its owner, as ssh does for private keys: anyone on the machine who can read it
    /// can open the mailboxes.
    fn check_private(&mut self, path: &Path, at: &Spanned<String>, key: &str) {
        use std::os::unix::fs::PermissionsExt as _;
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            let line = self
                .line_of(at)
                .map(|l| format!(", line {l}"))
                .unwrap_or_default();
            self.warnings.push(format!(
                "{key}{line}: {} has mode {mode:04o}, so other users may read the secret in it; \
                 chmod 600 it (owned by the service user)",
                path.display()
            ));
        }
    }

    fn credential(
        &mut self,
        name: &str,
        cred: &Spanned<RawCredential>,
        env: &dyn SecretEnv,
    ) -> Option<CredentialConfig> {
        let c = cred.get_ref();
        let key = |k: &str| format!("credentials.{name}.{k}");
        let kind = c.kind.get_ref().as_str();
        // Keys that mean nothing for this kind are mistakes, not silently ignored settings.
        let allowed: &[&str] = match kind {
            "entra-app-secret" => &[
                "authority",
                "tenant_id",
                "client_id",
                "client_secret_*",
                "client_secret_expires",
                "scope",
            ],
            "entra-app-certificate" => &[
                "authority",
                "tenant_id",
                "client_id",
                "certificate_file",
                "certificate_password_*",
                "scope",
            ],
            "entra-delegated" => &[
                "authority",
                "tenant_id",
                "client_id",
                "client_secret_*",
                "redirect_uri",
                "scopes",
            ],
            "oauth2" => &[
                "authorization_url",
                "token_url",
                "device_authorization_url",
                "client_id",
                "client_secret_*",
                "scopes",
                "pkce",
                "redirect_uri",
                "sasl",
            ],
            "password" => &["username", "password_*", "mechanism"],
            other => {
                self.problem(
                    Some(&c.kind),
                    key("kind"),
                    format!("unknown credential kind {other:?}"),
                    "use \"entra-app-secret\", \"entra-app-certificate\", \"entra-delegated\", \"oauth2\" or \"password\"",
                );
                return None;
            }
        };
        let present: [(&str, Option<usize>); 23] = [
            ("authority", self.at(&c.authority)),
            ("tenant_id", self.at(&c.tenant_id)),
            ("client_id", self.at(&c.client_id)),
            ("client_secret_*", self.at(&c.client_secret_env)),
            ("client_secret_*", self.at(&c.client_secret_file)),
            ("client_secret_*", self.at(&c.client_secret_credential)),
            ("client_secret_expires", self.at(&c.client_secret_expires)),
            ("scope", self.at(&c.scope)),
            ("certificate_file", self.at(&c.certificate_file)),
            (
                "certificate_password_*",
                self.at(&c.certificate_password_env),
            ),
            (
                "certificate_password_*",
                self.at(&c.certificate_password_file),
            ),
            ("redirect_uri", self.at(&c.redirect_uri)),
            ("scopes", self.at(&c.scopes)),
            ("authorization_url", self.at(&c.authorization_url)),
            ("token_url", self.at(&c.token_url)),
            (
                "device_authorization_url",
                self.at(&c.device_authorization_url),
            ),
            ("pkce", self.at(&c.pkce)),
            ("sasl", self.at(&c.sasl)),
            ("username", self.at(&c.username)),
            ("password_*", self.at(&c.password_env)),
            ("password_*", self.at(&c.password_file)),
            ("password_*", self.at(&c.password_credential)),
            ("mechanism", self.at(&c.mechanism)),
        ];
        let mut misplaced = false;
        for (field, line) in present {
            if let Some(line) = line
                && !allowed.contains(&field)
            {
                self.problems.push(Problem {
                    line: Some(line),
                    key: key(field),
                    problem: format!("does not apply to kind = {kind:?}"),
                    fix: format!("remove it; kind {kind:?} takes: {}", allowed.join(", ")),
                });
                misplaced = true;
            }
        }
        let authority = || {
            c.authority
                .as_ref()
                .map(|a| a.get_ref().trim_end_matches('/').to_owned())
                .unwrap_or_else(|| DEFAULT_AUTHORITY.to_owned())
        };
        let tenant_what = "the Directory (tenant) ID from the app registration's Overview page in the Entra admin center";
        let client_what = "the Application (client) ID from the app registration's Overview page";
        let result = match kind {
            "entra-app-secret" => {
                let tenant_id = self.required(&c.tenant_id, cred, key("tenant_id"), tenant_what);
                let client_id = self.required(&c.client_id, cred, key("client_id"), client_what);
                let client_secret = self.secret_source(
                    &format!("credentials.{name}.client_secret"),
                    [
                        &c.client_secret_env,
                        &c.client_secret_file,
                        &c.client_secret_credential,
                    ],
                    cred,
                    env,
                    true,
                    "the client secret's Value (not its Secret ID)",
                );
                let secret_expires =
                    self.date(&c.client_secret_expires, key("client_secret_expires"));
                let authority = self.authority(authority(), c, &key("authority"));
                CredentialConfig::EntraAppSecret(EntraAppSecret {
                    authority,
                    tenant_id: tenant_id?,
                    client_id: client_id?,
                    client_secret: client_secret??,
                    secret_expires,
                    scope: c
                        .scope
                        .as_ref()
                        .map(|s| s.get_ref().clone())
                        .unwrap_or_else(|| DEFAULT_APP_SCOPE.to_owned()),
                })
            }
            "entra-app-certificate" => {
                let tenant_id = self.required(&c.tenant_id, cred, key("tenant_id"), tenant_what);
                let client_id = self.required(&c.client_id, cred, key("client_id"), client_what);
                let password = self.secret_source(
                    &format!("credentials.{name}.certificate_password"),
                    [
                        &c.certificate_password_env,
                        &c.certificate_password_file,
                        &None,
                    ],
                    cred,
                    env,
                    false,
                    "the PKCS#12 file's password",
                );
                let certificate = match &c.certificate_file {
                    None => {
                        self.problems.push(Problem {
                            line: self.line_of(cred),
                            key: key("certificate_file"),
                            problem: "is missing".into(),
                            fix: "point it at a PEM file holding the certificate and its private key, or at a .pfx/.p12 file".into(),
                        });
                        None
                    }
                    Some(file) => {
                        let path = self.path(file.get_ref());
                        match load_certificate(&path, password.flatten().as_ref()) {
                            Ok(cert) => {
                                self.check_private(&path, file, &key("certificate_file"));
                                Some(cert)
                            }
                            Err(problem) => {
                                self.problem(
                                    Some(file),
                                    key("certificate_file"),
                                    problem,
                                    "use the PEM (certificate + unencrypted private key) or PKCS#12 whose public part was uploaded under Certificates & secrets",
                                );
                                None
                            }
                        }
                    }
                };
                let authority = self.authority(authority(), c, &key("authority"));
                CredentialConfig::EntraAppCertificate(EntraAppCertificate {
                    authority,
                    tenant_id: tenant_id?,
                    client_id: client_id?,
                    scope: c
                        .scope
                        .as_ref()
                        .map(|s| s.get_ref().clone())
                        .unwrap_or_else(|| DEFAULT_APP_SCOPE.to_owned()),
                    certificate: certificate?,
                })
            }
            "entra-delegated" | "oauth2" => {
                let client_id = self.required(&c.client_id, cred, key("client_id"), client_what);
                let client_secret = self.secret_source(
                    &format!("credentials.{name}.client_secret"),
                    [
                        &c.client_secret_env,
                        &c.client_secret_file,
                        &c.client_secret_credential,
                    ],
                    cred,
                    env,
                    false,
                    "the client secret (only for a confidential app registration)",
                );
                let redirect_uri = c
                    .redirect_uri
                    .as_ref()
                    .map(|r| r.get_ref().clone())
                    .unwrap_or_else(|| DEFAULT_REDIRECT_URI.to_owned());
                let loopback = ["http://localhost", "http://127.0.0.1"].iter().any(|host| {
                    redirect_uri
                        .strip_prefix(host)
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with([':', '/']))
                });
                if !loopback {
                    self.problem(
                        c.redirect_uri.as_ref(),
                        key("redirect_uri"),
                        format!("{redirect_uri:?} is not a loopback http:// URL"),
                        "use e.g. http://localhost:3017/ (a fixed port) or http://localhost/ (any free port at login; Entra and RFC 8252 loopback redirects ignore the port) and register it as a redirect URI of the app",
                    );
                }
                let scopes = c.scopes.as_ref().map(|s| s.get_ref().clone());
                let (entra, authorization_url, token_url, device_url, scopes, pkce, sasl) = if kind
                    == "entra-delegated"
                {
                    let tenant_id = self.required(
                        &c.tenant_id,
                        cred,
                        key("tenant_id"),
                        "the Directory (tenant) ID, or \"organizations\"",
                    );
                    let authority = self.authority(authority(), c, &key("authority"));
                    let tenant = tenant_id?;
                    (
                        Some(EntraTenant {
                            authority: authority.clone(),
                            tenant_id: tenant.clone(),
                        }),
                        entra_url(&authority, &tenant, "authorize"),
                        entra_url(&authority, &tenant, "token"),
                        Some(entra_url(&authority, &tenant, "devicecode")),
                        scopes.unwrap_or_else(|| {
                            DEFAULT_DELEGATED_SCOPES
                                .iter()
                                .map(|s| s.to_string())
                                .collect()
                        }),
                        true,
                        OAuthSasl::XOAuth2,
                    )
                } else {
                    let auth = self.required(
                        &c.authorization_url,
                        cred,
                        key("authorization_url"),
                        "the provider's authorization endpoint URL",
                    );
                    let token = self.required(
                        &c.token_url,
                        cred,
                        key("token_url"),
                        "the provider's token endpoint URL",
                    );
                    self.endpoint(c.authorization_url.as_ref(), key("authorization_url"));
                    self.endpoint(c.token_url.as_ref(), key("token_url"));
                    self.endpoint(
                        c.device_authorization_url.as_ref(),
                        key("device_authorization_url"),
                    );
                    let sasl = match c.sasl.as_ref().map(|s| s.get_ref().as_str()) {
                        None | Some("xoauth2") => OAuthSasl::XOAuth2,
                        Some("oauthbearer") => OAuthSasl::OAuthBearer,
                        Some(other) => {
                            self.problem(
                                c.sasl.as_ref(),
                                key("sasl"),
                                format!("unknown SASL mechanism {other:?}"),
                                "use \"xoauth2\" or \"oauthbearer\"",
                            );
                            OAuthSasl::XOAuth2
                        }
                    };
                    if scopes.as_ref().is_none_or(|s| s.is_empty()) {
                        self.problems.push(Problem {
                            line: self.line_of(cred),
                            key: key("scopes"),
                            problem: "is missing or empty".into(),
                            fix: "list the scopes the provider needs for IMAP, e.g. [\"https://mail.google.com/\"]".into(),
                        });
                    }
                    (
                        None,
                        auth?,
                        token?,
                        c.device_authorization_url
                            .as_ref()
                            .map(|d| d.get_ref().clone()),
                        scopes.unwrap_or_default(),
                        c.pkce.as_ref().is_none_or(|p| *p.get_ref()),
                        sasl,
                    )
                };
                CredentialConfig::Delegated(DelegatedConfig {
                    entra,
                    authorization_url,
                    token_url,
                    device_authorization_url: device_url,
                    client_id: client_id?,
                    client_secret: client_secret?,
                    scopes,
                    pkce,
                    redirect_uri,
                    sasl,
                })
            }
            _ => {
                let password = self.secret_source(
                    &format!("credentials.{name}.password"),
                    [&c.password_env, &c.password_file, &c.password_credential],
                    cred,
                    env,
                    true,
                    "the mailbox password",
                );
                let mechanism = match c.mechanism.as_ref().map(|m| m.get_ref().as_str()) {
                    None | Some("plain") => PasswordMechanism::Plain,
                    Some("login") => PasswordMechanism::Login,
                    Some(other) => {
                        self.problem(
                            c.mechanism.as_ref(),
                            key("mechanism"),
                            format!("unknown mechanism {other:?}"),
                            "use \"plain\" (AUTHENTICATE PLAIN) or \"login\" (IMAP LOGIN)",
                        );
                        PasswordMechanism::Plain
                    }
                };
                CredentialConfig::Password(PasswordConfig {
                    username: c.username.as_ref().map(|u| u.get_ref().clone()),
                    password: password??,
                    mechanism,
                })
            }
        };
        (!misplaced).then_some(result)
    }

    fn authority(&mut self, authority: String, c: &RawCredential, key: &str) -> String {
        if let Some(problem) = endpoint_problem(&authority) {
            self.problem(
                c.authority.as_ref(),
                key.to_owned(),
                format!("authority {problem}"),
                "use https://login.microsoftonline.com (public cloud) or your sovereign cloud's login URL",
            );
        }
        authority
    }

    /// A provider's endpoint: an absolute https:// URL (http:// only to a loopback address, as
    /// for a local test provider), since client secrets and tokens travel to it.
    fn endpoint(&mut self, value: Option<&Spanned<String>>, key: String) {
        // A blank one is reported as missing.
        let Some(v) = value.filter(|v| !v.get_ref().trim().is_empty()) else {
            return;
        };
        let Some(problem) = endpoint_problem(v.get_ref()) else {
            return;
        };
        self.problem(
            Some(v),
            key,
            problem,
            "copy the endpoint from the provider's documentation or its /.well-known/openid-configuration, e.g. https://oauth2.googleapis.com/token",
        );
    }

    fn date(&mut self, value: &Option<Spanned<String>>, key: String) -> Option<chrono::NaiveDate> {
        let v = value.as_ref()?;
        match chrono::NaiveDate::parse_from_str(v.get_ref().trim(), "%Y-%m-%d") {
            Ok(d) => Some(d),
            Err(e) => {
                self.problem(
                    Some(v),
                    key,
                    format!("{:?} is not a date: {e}", v.get_ref()),
                    "write it as YYYY-MM-DD, e.g. \"2027-03-31\"",
                );
                None
            }
        }
    }

    fn required(
        &mut self,
        value: &Option<Spanned<String>>,
        table: &Spanned<RawCredential>,
        key: String,
        what: &str,
    ) -> Option<String> {
        match value {
            Some(v) if !v.get_ref().trim().is_empty() => Some(v.get_ref().trim().to_owned()),
            _ => {
                let line = match value {
                    Some(v) => self.line_of(v),
                    None => self.line_of(table),
                };
                self.problems.push(Problem {
                    line,
                    key: key.clone(),
                    problem: "is missing or empty".into(),
                    fix: format!("set {key} to {what}"),
                });
                None
            }
        }
    }

    /// Resolves a secret given as `<prefix>_env`, `<prefix>_file` or `<prefix>_credential`.
    /// Outer None: a problem was reported. Inner None: not configured (and not required).
    fn secret_source<T>(
        &mut self,
        prefix: &str,
        [env_var, file, credential]: [&Option<Spanned<String>>; 3],
        table: &Spanned<T>,
        env: &dyn SecretEnv,
        required: bool,
        what: &str,
    ) -> Option<Option<Secret>> {
        let sources = [env_var, file, credential]
            .iter()
            .filter(|s| s.is_some())
            .count();
        if sources == 0 && !required {
            return Some(None);
        }
        if sources != 1 {
            self.problems.push(Problem {
                line: self.line_of(table),
                key: format!("{prefix}_*"),
                problem: format!("needs exactly one source, found {sources}"),
                fix: format!("set one of {prefix}_env = \"VAR\", {prefix}_file = \"/path\" or {prefix}_credential = \"name\" (systemd LoadCredential=) holding {what}; secrets are never written into this file"),
            });
            return None;
        }
        if let Some(var) = env_var {
            return match env.var(var.get_ref()).filter(|v| !v.trim().is_empty()) {
                Some(v) => Some(Some(Secret::new(v.trim().to_owned()))),
                None => {
                    self.problem(
                        Some(var),
                        format!("{prefix}_env"),
                        format!("environment variable {} is not set or empty", var.get_ref()),
                        &format!("export {what} in that variable for the service, e.g. with EnvironmentFile= in the systemd unit"),
                    );
                    None
                }
            };
        }
        let (spanned, path, key) = if let Some(file) = file {
            (file, self.path(file.get_ref()), format!("{prefix}_file"))
        } else if let Some(cred) = credential {
            let Some(dir) = env.credentials_directory() else {
                self.problem(
                    Some(cred),
                    format!("{prefix}_credential"),
                    "CREDENTIALS_DIRECTORY is not set: the service was not started with systemd credentials".into(),
                    &format!("add LoadCredential=NAME:/path/to/secret to the unit, or use {prefix}_file"),
                );
                return None;
            };
            (
                cred,
                dir.join(cred.get_ref()),
                format!("{prefix}_credential"),
            )
        } else {
            return None;
        };
        match std::fs::read_to_string(&path) {
            Ok(s) if !s.trim().is_empty() => {
                self.check_private(&path, spanned, &key);
                Some(Some(Secret::new(s.trim().to_owned())))
            }
            Ok(_) => {
                self.problem(
                    Some(spanned),
                    key,
                    format!("secret file {} is empty", path.display()),
                    &format!("write {what} into that file (mode 0600, owned by the service user)"),
                );
                None
            }
            Err(e) => {
                self.problem(
                    Some(spanned),
                    key,
                    format!("cannot read secret file {}: {e}", path.display()),
                    "check the path and that the service user may read it (mode 0600)",
                );
                None
            }
        }
    }

    fn mailbox(
        &mut self,
        m: &RawMailbox,
        credentials: &BTreeMap<String, Spanned<RawCredential>>,
    ) -> Option<MailboxConfig> {
        let id = m.id.get_ref().clone();
        let key = |k: &str| format!("mailbox[{id}].{k}");
        let mut ok = true;
        if id.is_empty()
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            self.problem(
                Some(&m.id),
                key("id"),
                format!(
                    "mailbox id {id:?} must be non-empty ASCII letters, digits, '-', '_' or '.'"
                ),
                "choose a short stable id such as \"podatelna\"; it is stored with every record",
            );
            ok = false;
        }
        let address = m.address.get_ref().trim().to_owned();
        if !address.contains('@') {
            self.problem(
                Some(&m.address),
                key("address"),
                format!("{address:?} is not a mail address"),
                "set the mailbox's SMTP address (for Exchange Online: the primary SMTP address, which is the IMAP login name)",
            );
            ok = false;
        }
        let host = m.host.get_ref().trim().to_owned();
        if host.is_empty() {
            self.problem(
                Some(&m.host),
                key("host"),
                "is empty".into(),
                "set the IMAP server's host name, e.g. outlook.office365.com",
            );
            ok = false;
        }
        let tls = match m.tls.as_ref().map(|t| t.get_ref().as_str()) {
            None | Some("implicit") => TlsMode::Implicit,
            Some("starttls") => TlsMode::StartTls,
            Some("plain") => {
                if !is_loopback(&host) {
                    self.problem(
                        m.tls.as_ref(),
                        key("tls"),
                        format!("plain (unencrypted) IMAP is only allowed to a loopback host, not {host:?}"),
                        "use tls = \"implicit\" (port 993) or \"starttls\" (port 143)",
                    );
                    ok = false;
                }
                TlsMode::Plain
            }
            Some(other) => {
                self.problem(
                    m.tls.as_ref(),
                    key("tls"),
                    format!("unknown TLS mode {other:?}"),
                    "use \"implicit\" (default, port 993), \"starttls\" (port 143) or \"plain\" (loopback only)",
                );
                ok = false;
                TlsMode::Implicit
            }
        };
        let port = m.port.unwrap_or(match tls {
            TlsMode::Implicit => 993,
            TlsMode::StartTls | TlsMode::Plain => 143,
        });
        let ca_file = m.ca_file.as_ref().map(|c| self.path(c.get_ref()));
        if let (Some(path), Some(spanned)) = (&ca_file, &m.ca_file)
            && !path.is_file()
        {
            self.problem(
                Some(spanned),
                key("ca_file"),
                format!("CA file {} does not exist", path.display()),
                "point ca_file at a PEM file with the extra root certificate to trust, or remove the key to use the system trust store only",
            );
            ok = false;
        }
        let folder = m
            .folder
            .as_ref()
            .map(|f| f.get_ref().clone())
            .unwrap_or_else(|| "INBOX".to_owned());
        let schedule_text = m
            .schedule
            .as_ref()
            .map(|s| s.get_ref().clone())
            .unwrap_or_else(|| DEFAULT_SCHEDULE.to_owned());
        let schedule = match cron::Schedule::from_str(&schedule_text) {
            Ok(s) => Some(s),
            Err(e) => {
                self.problem(
                    m.schedule.as_ref(),
                    key("schedule"),
                    format!("{schedule_text:?} is not a valid cron expression: {e}"),
                    "use six fields with seconds first, e.g. \"0 * * * * *\" (every minute) or \"0 */5 * * * *\" (every five minutes)",
                );
                None
            }
        };
        let after_text = m
            .after
            .as_ref()
            .map(|a| a.get_ref().clone())
            .unwrap_or_else(|| "seen".to_owned());
        let after = AfterAction::parse(&after_text);
        if after.is_none() {
            self.problem(
                m.after.as_ref(),
                key("after"),
                format!("unknown after-registration action {after_text:?}"),
                "use \"seen\" (mark \\Seen), \"move:<folder>\" (e.g. \"move:Registered\") or \"none\"",
            );
        }
        if matches!(&after, Some(AfterAction::Move(f)) if *f == folder) {
            self.problem(
                m.after.as_ref(),
                key("after"),
                format!(
                    "moving registered mail into {folder:?}, the folder being polled, would loop"
                ),
                "move into a different folder, e.g. \"move:Registered\"",
            );
            ok = false;
        }
        let after_quarantine = match &m.after_quarantine {
            None => after.clone(),
            Some(text) => {
                let parsed = AfterAction::parse(text.get_ref());
                if parsed.is_none() {
                    self.problem(
                        Some(text),
                        key("after_quarantine"),
                        format!("unknown action {:?}", text.get_ref()),
                        "use \"seen\", \"move:<folder>\" (e.g. \"move:Quarantine\") or \"none\"; default: the same as `after`",
                    );
                }
                parsed
            }
        };
        let credential = m.credential.get_ref().clone();
        if !credentials.contains_key(&credential) {
            let known: Vec<&str> = credentials.keys().map(String::as_str).collect();
            self.problem(
                Some(&m.credential),
                key("credential"),
                format!("unknown credential {credential:?} (defined: {known:?})"),
                "define it as a [credentials.NAME] table, or fix the name",
            );
            ok = false;
        }
        if !ok {
            return None;
        }
        Some(MailboxConfig {
            id,
            address,
            host,
            port,
            tls,
            ca_file,
            folder,
            schedule: schedule?,
            after: after?,
            after_quarantine: after_quarantine?,
            credential,
            enabled: m.enabled,
        })
    }
}

/// Loads a certificate and its private key from PEM (both in one file) or PKCS#12.
fn load_certificate(path: &Path, password: Option<&Secret>) -> Result<AppCertificate, String> {
    use base64::Engine as _;
    use openssl::pkcs12::Pkcs12;
    use openssl::pkey::PKey;
    use openssl::x509::X509;
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let (cert, key) = if bytes.starts_with(b"-----") || bytes.windows(5).any(|w| w == b"-----") {
        let cert = X509::from_pem(&bytes)
            .map_err(|e| format!("no PEM certificate in {}: {e}", path.display()))?;
        let key = PKey::private_key_from_pem(&bytes).map_err(|e| {
            format!(
                "no (unencrypted) PEM private key in {}: {e}",
                path.display()
            )
        })?;
        (cert, key)
    } else {
        let p12 = Pkcs12::from_der(&bytes)
            .map_err(|e| format!("{} is neither PEM nor PKCS#12: {e}", path.display()))?;
        let parsed = p12
            .parse2(password.map(Secret::expose).unwrap_or(""))
            .map_err(|e| {
                format!(
                    "cannot open PKCS#12 {} (wrong certificate_password?): {e}",
                    path.display()
                )
            })?;
        match (parsed.cert, parsed.pkey) {
            (Some(c), Some(k)) => (c, k),
            _ => {
                return Err(format!(
                    "PKCS#12 {} lacks the certificate or its private key",
                    path.display()
                ));
            }
        }
    };
    let public_matches = cert
        .public_key()
        .map(|p| p.public_eq(&key))
        .unwrap_or(false);
    if !public_matches {
        return Err("the private key does not belong to the certificate".into());
    }
    if key.rsa().is_err() {
        return Err("the key is not RSA (Entra client assertions are signed with RS256)".into());
    }
    let der = cert.to_der().map_err(|e| e.to_string())?;
    let digest = openssl::sha::sha256(&der);
    let x5t_s256 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest);
    let subject = crate::x509::name(cert.subject_name());
    let not_after =
        crate::x509::to_chrono(cert.not_after()).ok_or("cannot read the certificate's expiry")?;
    let pem = key.private_key_to_pem_pkcs8().map_err(|e| e.to_string())?;
    Ok(AppCertificate {
        path: path.to_owned(),
        x5t_s256,
        subject,
        not_after,
        private_key_pem: Secret::new(String::from_utf8_lossy(&pem).into_owned()),
    })
}

/// What is wrong with a URL that secrets and tokens are sent to, if anything: it must be an
/// absolute https:// URL, or http:// to this machine (a local test provider).
fn endpoint_problem(url: &str) -> Option<String> {
    match oauth2::url::Url::parse(url) {
        Err(e) => Some(format!("{url:?} is not a URL: {e}")),
        Ok(u) if u.scheme() == "https" && u.host().is_some() => None,
        Ok(u) if u.scheme() == "http" && u.host_str().is_some_and(is_loopback) => None,
        Ok(_) => Some(format!("{url:?} is not an https:// URL")),
    }
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || IpAddr::from_str(host.trim_start_matches('[').trim_end_matches(']'))
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsMode::Implicit => "implicit",
            TlsMode::StartTls => "starttls",
            TlsMode::Plain => "plain",
        })
    }
}
