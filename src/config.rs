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
    pub limits: crate::pipeline::Limits,
    pub credentials: BTreeMap<String, CredentialConfig>,
    pub mailboxes: Vec<MailboxConfig>,
}

/// Network and batching limits for IMAP sessions.
#[derive(Debug, Clone)]
pub struct ImapTuning {
    pub connect_timeout: Duration,
    /// Upper bound for any single network wait (a response line, one fetched message).
    pub io_timeout: Duration,
    pub batch_max_messages: usize,
    pub batch_max_bytes: u64,
}

impl Default for ImapTuning {
    fn default() -> Self {
        ImapTuning {
            connect_timeout: Duration::from_secs(20),
            io_timeout: Duration::from_secs(120),
            batch_max_messages: 100,
            batch_max_bytes: 32 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone)]
pub enum CredentialConfig {
    /// Microsoft Entra ID app-only access (client credentials grant, `IMAP.AccessAsApp`)
    /// authenticated with a client secret.
    EntraAppSecret(EntraAppSecret),
}

#[derive(Debug, Clone)]
pub struct EntraAppSecret {
    pub authority: String,
    pub tenant_id: String,
    pub client_id: String,
    pub client_secret: Secret,
    pub scope: String,
}

impl EntraAppSecret {
    /// `{authority}/{tenant}/oauth2/v2.0/token`
    pub fn token_url(&self) -> String {
        format!(
            "{}/{}/oauth2/v2.0/token",
            self.authority.trim_end_matches('/'),
            self.tenant_id
        )
    }
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
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    number_prefix: Option<Spanned<String>>,
    number_format: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_message_bytes: Option<u64>,
    max_attempts: Option<u32>,
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
    scope: Option<Spanned<String>>,
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
            message: e.to_string(),
        })?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let mut v = Validator {
            text,
            base: &base,
            problems: Vec::new(),
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
}

impl Validator<'_> {
    fn line_of<T>(&self, s: &Spanned<T>) -> Option<usize> {
        let start = s.span().start;
        self.text
            .get(..start)
            .map(|before| before.bytes().filter(|b| *b == b'\n').count() + 1)
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
                        format!("{u:?} is neither a SQLite nor a PostgreSQL URL"),
                        "use sqlite:///path/to/registry.sqlite3 or postgres://user@host/dbname, or leave it out for a SQLite file under data_dir",
                    );
                }
                u.clone()
            }
            None => format!("sqlite://{}", data_dir.join("registry.sqlite3").display()),
        };
        let defaults = ImapTuning::default();
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

        let mut credentials = BTreeMap::new();
        for (name, cred) in &raw.credentials {
            if let Some(c) = self.credential(name, cred, env) {
                credentials.insert(name.clone(), c);
            }
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
            limits,
            credentials,
            mailboxes,
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
        match c.kind.get_ref().as_str() {
            "entra-app-secret" => {
                let tenant_id = self.required(&c.tenant_id, cred, key("tenant_id"), "the Directory (tenant) ID from the app registration's Overview page in the Entra admin center");
                let client_id = self.required(
                    &c.client_id,
                    cred,
                    key("client_id"),
                    "the Application (client) ID from the app registration's Overview page",
                );
                let client_secret = self.secret(name, c, cred, env);
                let authority = c
                    .authority
                    .as_ref()
                    .map(|a| a.get_ref().trim_end_matches('/').to_owned())
                    .unwrap_or_else(|| DEFAULT_AUTHORITY.to_owned());
                if !(authority.starts_with("https://")
                    || authority.starts_with("http://127.")
                    || authority.starts_with("http://localhost"))
                {
                    self.problem(
                        c.authority.as_ref(),
                        key("authority"),
                        format!("authority {authority:?} is not an https:// URL"),
                        "use https://login.microsoftonline.com (public cloud) or your sovereign cloud's login URL",
                    );
                }
                let scope = c
                    .scope
                    .as_ref()
                    .map(|s| s.get_ref().clone())
                    .unwrap_or_else(|| DEFAULT_APP_SCOPE.to_owned());
                Some(CredentialConfig::EntraAppSecret(EntraAppSecret {
                    authority,
                    tenant_id: tenant_id?,
                    client_id: client_id?,
                    client_secret: client_secret?,
                    scope,
                }))
            }
            other => {
                self.problem(
                    Some(&c.kind),
                    key("kind"),
                    format!("unknown credential kind {other:?}"),
                    "use kind = \"entra-app-secret\" (Microsoft Entra ID app-only access with a client secret)",
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

    fn secret(
        &mut self,
        name: &str,
        c: &RawCredential,
        table: &Spanned<RawCredential>,
        env: &dyn SecretEnv,
    ) -> Option<Secret> {
        let sources = [
            c.client_secret_env.is_some(),
            c.client_secret_file.is_some(),
            c.client_secret_credential.is_some(),
        ]
        .iter()
        .filter(|s| **s)
        .count();
        let key = format!("credentials.{name}.client_secret_*");
        if sources != 1 {
            self.problem(
                Some(table),
                key,
                format!("needs exactly one secret source, found {sources}"),
                "set one of client_secret_env = \"VAR\", client_secret_file = \"/path\" or client_secret_credential = \"name\" (systemd LoadCredential=); secrets are never written into this file",
            );
            return None;
        }
        if let Some(var) = &c.client_secret_env {
            return match env.var(var.get_ref()).filter(|v| !v.trim().is_empty()) {
                Some(v) => Some(Secret::new(v.trim().to_owned())),
                None => {
                    self.problem(
                        Some(var),
                        format!("credentials.{name}.client_secret_env"),
                        format!("environment variable {} is not set or empty", var.get_ref()),
                        "export the client secret's Value (not its Secret ID) in that variable for the service, e.g. with EnvironmentFile= in the systemd unit",
                    );
                    None
                }
            };
        }
        let (spanned, path, key) = if let Some(file) = &c.client_secret_file {
            (
                file,
                self.path(file.get_ref()),
                format!("credentials.{name}.client_secret_file"),
            )
        } else if let Some(cred) = &c.client_secret_credential {
            let Some(dir) = env.credentials_directory() else {
                self.problem(
                    Some(cred),
                    format!("credentials.{name}.client_secret_credential"),
                    "CREDENTIALS_DIRECTORY is not set: the service was not started with systemd credentials".into(),
                    "add LoadCredential=NAME:/path/to/secret to the unit, or use client_secret_file",
                );
                return None;
            };
            (
                cred,
                dir.join(cred.get_ref()),
                format!("credentials.{name}.client_secret_credential"),
            )
        } else {
            return None;
        };
        match std::fs::read_to_string(&path) {
            Ok(s) if !s.trim().is_empty() => Some(Secret::new(s.trim().to_owned())),
            Ok(_) => {
                self.problem(
                    Some(spanned),
                    key,
                    format!("secret file {} is empty", path.display()),
                    "write the client secret's Value into that file (mode 0600, owned by the service user)",
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
