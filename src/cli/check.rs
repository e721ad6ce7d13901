//! `mailintake check [mailbox] [--json]`: each step of a login, timed, and on failure the raw
//! answer and what to do. Steps: connect → tls → token → authenticate → select.

use std::time::Instant;

use serde::Serialize;

use crate::config::{Config, CredentialConfig, MailboxConfig};
use crate::credentials::{CredentialError, Credentials, TokenStore, diagnose, expiry};
use crate::imap::{Endpoint, ImapError, MailSession, connect_tcp, establish};
use crate::registry::Registry;

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub name: &'static str,
    pub ok: bool,
    pub ms: u64,
    pub detail: String,
    /// The server's or identity platform's own answer, when a step failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meaning: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// A failure that says nothing about the configuration (outage, timeout).
    pub temporary: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct MailboxCheck {
    pub mailbox: String,
    pub address: String,
    pub credential: String,
    pub ok: bool,
    pub steps: Vec<Step>,
    pub warnings: Vec<String>,
}

struct Steps {
    steps: Vec<Step>,
    at: Instant,
}

impl Steps {
    fn ok(&mut self, name: &'static str, detail: String) {
        self.push(name, true, detail, None, None, None, false);
    }

    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        name: &'static str,
        ok: bool,
        detail: String,
        answer: Option<String>,
        meaning: Option<String>,
        fix: Option<String>,
        temporary: bool,
    ) {
        let ms = self.at.elapsed().as_millis() as u64;
        self.steps.push(Step {
            name,
            ok,
            ms,
            detail,
            answer,
            meaning,
            fix,
            temporary,
        });
        self.at = Instant::now();
    }

    fn failed_imap(&mut self, name: &'static str, e: &ImapError) {
        let temporary = e.is_transient();
        let meaning = if temporary {
            Some("temporary: the server is unreachable, slow or its login service is down — not a credential problem".to_owned())
        } else {
            None
        };
        self.push(
            name,
            false,
            "failed".into(),
            Some(e.to_string()),
            meaning,
            None,
            temporary,
        );
    }
}

fn days_left(at: chrono::DateTime<chrono::Utc>) -> i64 {
    (at - chrono::Utc::now()).num_days()
}

async fn check_mailbox(
    config: &Config,
    credentials: &Credentials,
    mb: &MailboxConfig,
) -> MailboxCheck {
    let mut s = Steps {
        steps: Vec::new(),
        at: Instant::now(),
    };
    let ep = Endpoint {
        host: &mb.host,
        port: mb.port,
        tls: mb.tls,
        ca_file: mb.ca_file.as_deref(),
        connect_timeout: config.imap.connect_timeout,
        io_timeout: config.imap.io_timeout,
    };
    let result = async {
        // connect: DNS + TCP
        let addrs: Vec<String> = match tokio::net::lookup_host((mb.host.as_str(), mb.port)).await {
            Ok(a) => a.map(|a| a.ip().to_string()).collect(),
            Err(e) => {
                s.push("connect", false, format!("cannot resolve {}", mb.host), Some(e.to_string()), None, Some("check host (for Exchange Online: outlook.office365.com) and DNS".into()), true);
                return None;
            }
        };
        let tcp = match connect_tcp(&ep).await {
            Ok(t) => t,
            Err(e) => {
                s.failed_imap("connect", &e);
                return None;
            }
        };
        s.ok("connect", format!("{}:{} ({})", mb.host, mb.port, addrs.join(", ")));
        // tls
        let opened = match establish(&ep, tcp).await {
            Ok(o) => o,
            Err(e) => {
                s.failed_imap("tls", &e);
                if let ImapError::Tls { .. } = e
                    && let Some(last) = s.steps.last_mut()
                {
                    last.fix = Some("the server's certificate must chain to a trusted root and name the host; for a private CA set ca_file (verification is never switched off)".into());
                }
                return None;
            }
        };
        let tls_detail = match &opened.certificate {
            Some(c) => format!(
                "{} TLS; certificate {}, issued by {}{}",
                mb.tls,
                c.subject,
                c.issuer,
                c.not_after
                    .map(|t| format!(", expires {} ({} days)", t.format("%Y-%m-%d"), days_left(t)))
                    .unwrap_or_default()
            ),
            None => "plain (loopback)".to_owned(),
        };
        s.ok("tls", tls_detail);
        // token
        let login = match credentials.login(&mb.credential, &mb.address).await {
            Ok(l) => l,
            Err(e) => {
                let d = e.diagnosis();
                let (meaning, fix) = match (&e, d) {
                    (_, Some(d)) => (Some(d.meaning), Some(d.fix)),
                    (CredentialError::NotLoggedIn { .. }, None) => (None, Some(format!("run `mailintake auth login {}`", mb.id))),
                    (CredentialError::Unavailable { .. }, None) => (Some("temporary: the identity platform is unreachable — not a credential problem".into()), None),
                    (CredentialError::Store { transient: true, .. }, None) => (Some("temporary: the registry database that keeps the refresh tokens is unreachable — not a credential problem".into()), None),
                    _ => (None, None),
                };
                let temporary = e.is_transient();
                s.push("token", false, "failed".into(), Some(e.to_string()), meaning, fix, temporary);
                return None;
            }
        };
        let token_detail = match login.bearer() {
            Some(token) => {
                let claims = diagnose::jwt_claims(token.expose());
                let exp = claims.as_ref().and_then(|c| c.get("exp")).and_then(|v| v.as_i64());
                format!(
                    "{} token for credential {}{}",
                    login.mechanism(),
                    mb.credential,
                    exp.map(|e| format!(", valid for {} min", e.saturating_sub(chrono::Utc::now().timestamp()) / 60)).unwrap_or_default()
                )
            }
            None => format!("{} with a stored password", login.mechanism()),
        };
        s.ok("token", token_detail);
        // authenticate
        let mut session = match MailSession::login(opened, &login, config.imap.io_timeout).await {
            Ok(session) => session,
            Err(e) => {
                if let ImapError::AuthFailed { text, .. } = &e {
                    credentials.invalidate(&mb.credential).await;
                    let claims = login.bearer().and_then(|t| diagnose::jwt_claims(t.expose()));
                    let d = match config.credentials.get(&mb.credential) {
                        Some(CredentialConfig::EntraAppSecret(app)) => Some(diagnose::app_only_login_refused(claims.as_ref(), &app.tenant_id, &app.client_id, &mb.address)),
                        Some(CredentialConfig::EntraAppCertificate(app)) => Some(diagnose::app_only_login_refused(claims.as_ref(), &app.tenant_id, &app.client_id, &mb.address)),
                        Some(CredentialConfig::Delegated(_)) => Some(diagnose::delegated_login_refused(claims.as_ref(), &mb.address)),
                        _ => None,
                    };
                    let (meaning, fix) = match d {
                        Some(d) => (Some(d.meaning), Some(d.fix)),
                        None => (Some("the server refused the user name or password".into()), Some("check username and the password source".into())),
                    };
                    s.push("authenticate", false, format!("{} refused", login.mechanism()), Some(text.clone()), meaning, fix, false);
                } else {
                    s.failed_imap("authenticate", &e);
                }
                return None;
            }
        };
        s.ok("authenticate", format!("{} as {}", login.mechanism(), mb.address));
        // select
        let selected = match session.select(&mb.folder).await {
            Ok(sel) => sel,
            Err(e) => {
                s.failed_imap("select", &e);
                if matches!(e, ImapError::No { .. })
                    && let Some(last) = s.steps.last_mut()
                {
                    last.fix = Some(format!("check folder ({:?}); folder names are case-sensitive except INBOX", mb.folder));
                }
                session.logout().await;
                return None;
            }
        };
        let unseen = session.uid_search("UNSEEN").await.map(|u| u.len());
        s.ok(
            "select",
            format!(
                "{}: UIDVALIDITY {}, {} messages, {} unseen",
                mb.folder,
                selected.uidvalidity,
                selected.exists,
                unseen.map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
            ),
        );
        session.logout().await;
        Some(())
    }
    .await;
    let ok = result.is_some() && s.steps.iter().all(|st| st.ok);
    MailboxCheck {
        mailbox: mb.id.clone(),
        address: mb.address.clone(),
        credential: mb.credential.clone(),
        ok,
        steps: s.steps,
        warnings: Vec::new(),
    }
}

/// Runs the checks; prints text or JSON; true only if every step of every mailbox passed.
pub async fn run(config: &Config, mailbox: Option<&str>, json: bool) -> anyhow::Result<bool> {
    let selected: Vec<&MailboxConfig> = match mailbox {
        Some(id) => vec![config.mailbox(id).ok_or_else(|| {
            anyhow::anyhow!("no mailbox with id {id:?} in {}", config.path.display())
        })?],
        None => config.mailboxes.iter().collect(),
    };
    let needs_store = config
        .credentials
        .values()
        .any(|c| matches!(c, CredentialConfig::Delegated(_)));
    let store = match (&config.token_key, needs_store) {
        (Some(key), true) => Some(TokenStore::new(
            Registry::open(&config.database_url).await?,
            key.clone(),
        )),
        _ => None,
    };
    let notices = expiry::notices(config, store.as_ref()).await;
    let credentials = Credentials::from_config(config, store)?;
    let mut results = Vec::new();
    for mb in selected {
        let mut r = check_mailbox(config, &credentials, mb).await;
        for n in notices
            .iter()
            .filter(|n| n.credential == mb.credential && n.level().is_some())
        {
            r.warnings.push(n.render());
        }
        results.push(r);
    }
    let all_ok = results.iter().all(|r| r.ok);
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        for r in &results {
            print!("{}", render(r));
        }
    }
    Ok(all_ok)
}

const STEPS: [&str; 5] = ["connect", "tls", "token", "authenticate", "select"];

pub fn render(r: &MailboxCheck) -> String {
    let mut out = format!(
        "mailbox {} ({}, credential {})\n",
        r.mailbox, r.address, r.credential
    );
    for name in STEPS {
        match r.steps.iter().find(|s| s.name == name) {
            Some(s) => {
                let mark = if s.ok {
                    "ok  "
                } else if s.temporary {
                    "TEMP"
                } else {
                    "FAIL"
                };
                out.push_str(&format!(
                    "  [{mark}] {:<13}{:>6} ms  {}\n",
                    s.name, s.ms, s.detail
                ));
                if let Some(a) = &s.answer {
                    out.push_str(&format!("         answer:  {a}\n"));
                }
                if let Some(m) = &s.meaning {
                    out.push_str(&format!("         meaning: {m}\n"));
                }
                if let Some(f) = &s.fix {
                    out.push_str(&format!(
                        "         fix:     {}\n",
                        f.replace('\n', "\n                  ")
                    ));
                }
            }
            None => out.push_str(&format!("  [ -- ] {name:<13}   skipped\n")),
        }
    }
    for w in &r.warnings {
        out.push_str(&format!("  warning: {w}\n"));
    }
    out.push_str(if r.ok {
        "  result: OK\n\n"
    } else {
        "  result: FAILED\n\n"
    });
    out
}
