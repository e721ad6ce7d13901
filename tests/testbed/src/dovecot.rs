//! A private, real Dovecot instance per test.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

use crate::IdentityPlatform;
use crate::sysuser::{self, Account};
use crate::tls;

/// How long [`Dovecot::start_with`] and [`Dovecot::start_again`] wait for the greeting.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long stopping waits for the master process before killing it.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts at finding two free ports that are still free when Dovecot binds them.
const PORT_ATTEMPTS: usize = 3;
/// Lines of the log quoted in error messages.
const LOG_TAIL_LINES: usize = 60;

/// Options for [`Dovecot::start_with`].
#[derive(Debug, Clone, Default)]
pub struct DovecotOptions {
    /// Base URL of the token validation service, normally [`IdentityPlatform::authority`]
    /// (`http://127.0.0.1:PORT`); Dovecot asks `{base}/tokeninfo?access_token=TOKEN`.
    pub token_validation_base: String,
    /// Optional users that may also log in with a plain password (`LOGIN`,
    /// `AUTHENTICATE PLAIN`/`LOGIN`). XOAUTH2/OAUTHBEARER never consult these.
    pub passwords: Vec<(String, String)>,
}

impl DovecotOptions {
    /// Options validating tokens against `idp`, without password users.
    pub fn new(idp: &IdentityPlatform) -> Self {
        DovecotOptions {
            token_validation_base: idp.authority(),
            passwords: Vec::new(),
        }
    }
}

/// A private, real Dovecot IMAP server (from the `dovecot-imapd` package) in a fresh
/// temporary directory, listening on two free loopback ports: implicit TLS
/// ([`imaps_port`](Self::imaps_port)) and plain IMAP offering STARTTLS
/// ([`imap_port`](Self::imap_port)). The certificate is issued for `localhost` and
/// `127.0.0.1` by a throw-away CA ([`ca_file`](Self::ca_file)) that nothing else trusts.
///
/// # Authentication
/// XOAUTH2 and OAUTHBEARER are checked by Dovecot's `passdb oauth2` against the
/// [`IdentityPlatform`]'s `/tokeninfo` endpoint:
/// * a token the identity platform does not know, or knows as expired or revoked, is
///   answered `401` and the login fails with `NO [AUTHENTICATIONFAILED]`; so are tokens
///   Exchange Online would refuse (another `aud`, an app-only token without the
///   `IMAP.AccessAsApp` role);
/// * a live app-only token logs in only to a mailbox its app was registered for
///   ([`IdentityPlatform::add_app`]), a delegated token only to the mailbox of its user;
///   otherwise `NO [AUTHENTICATIONFAILED]`;
/// * while the identity platform is down ([`IdentityPlatform::set_down`]) logins fail with
///   `NO [UNAVAILABLE]` (a temporary failure).
///
/// Dovecot 2.3.19 cannot tell the validation endpoint which mailbox is being logged in to
/// (`tokeninfo_url` is not %-expanded; a `%u` in it even crashes the auth process), so the
/// endpoint answers with the token's whole mailbox list (`"mailboxes":",a@x,b@y,"`) and
/// Dovecot checks membership itself: `pass_attrs` sets `allow_nets` to an address no client
/// has unless the wildcard `*,<user>,*` matches the list. `username_attribute = email` is
/// kept (Dovecot requires it) with a constant `username_format`, so the `email` value is
/// not what decides. Mailbox addresses containing `,`, `;`, `*`, `?` or `%` are not
/// supported by this scheme.
///
/// A first `passdb static` with `noauthenticate nodelay=yes` authenticates nobody; it only
/// marks requests `nodelay`, because Dovecot 2.3.19 otherwise holds every failed login
/// (even with `auth_failure_delay = 0`) in a queue flushed every 0.5 s; the anvil
/// auth-penalty listener is disabled too. Password users go
/// to a `passwd-file` passdb restricted to `plain login`; the oauth2 passdb is restricted
/// to `xoauth2 oauthbearer`.
///
/// # Mail
/// Maildir (`LAYOUT=fs`, so folder names may contain `.`), `/` as hierarchy separator, and
/// the special-use folders of an Exchange Online mailbox (`Drafts`, `Sent Items`,
/// `Deleted Items`, `Junk Email`, `Archive`) created on first use. Up to 50 connections
/// per user and IP are allowed.
///
/// # Environment
/// `MAILINTAKE_TESTBED_DEBUG=1` turns on `auth_debug` and `mail_debug` in the log;
/// `MAILINTAKE_TESTBED_DOVECOT`, `MAILINTAKE_TESTBED_DOVEADM` and
/// `MAILINTAKE_TESTBED_OPENSSL` override the binaries (otherwise found on `PATH` or in
/// `/usr/sbin`, `/usr/bin`). As root, Dovecot runs its services as `dovecot`/`dovenull` and
/// the mail as `nobody`; as an ordinary user, everything runs as that user.
///
/// # Lifetime
/// Dropping the value stops the server (TERM to its process group) and removes the
/// directory. [`stop`](Self::stop) / [`start_again`](Self::start_again) restart it with the
/// same configuration, ports and mail.
#[derive(Debug)]
pub struct Dovecot {
    dir: tempfile::TempDir,
    conf: PathBuf,
    host: String,
    imaps_port: u16,
    imap_port: u16,
    ca_file: PathBuf,
    dovecot_bin: PathBuf,
    doveadm_bin: PathBuf,
    master: Option<Child>,
    tls: tokio_native_tls::TlsConnector,
}

impl Dovecot {
    /// Starts an instance validating tokens against `idp`, without password users.
    pub async fn start(idp: &IdentityPlatform) -> anyhow::Result<Dovecot> {
        Self::start_with(DovecotOptions::new(idp)).await
    }

    /// Starts an instance. Returns once the server has sent its `* OK` greeting (which
    /// lists the auth mechanisms, so the auth service is up) over TLS on the imaps port
    /// and on the plain port.
    pub async fn start_with(opts: DovecotOptions) -> anyhow::Result<Dovecot> {
        let dovecot_bin = find_binary("dovecot", "MAILINTAKE_TESTBED_DOVECOT")?;
        let doveadm_bin = find_binary("doveadm", "MAILINTAKE_TESTBED_DOVEADM")?;
        let identity = Identity::detect()?;
        let dir = tempfile::Builder::new()
            .prefix("mailintake-dovecot-")
            .tempdir()
            .context("creating the Dovecot temp dir")?;
        let root = dir.path().to_path_buf();
        if root
            .to_str()
            .is_none_or(|s| s.chars().any(|c| c.is_whitespace() || "\"'#<".contains(c)))
        {
            bail!(
                "the temp dir path {} cannot be written into dovecot.conf; set TMPDIR to a \
                 simple path",
                root.display()
            );
        }
        set_mode(&root, 0o755)?;
        for sub in ["run", "state", "mail"] {
            let path = root.join(sub);
            std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        }
        let mail_root = root.join("mail");
        set_mode(&mail_root, 0o750)?;
        if sysuser::is_root() {
            std::os::unix::fs::chown(&mail_root, Some(identity.mail.uid), Some(identity.mail.gid))
                .with_context(|| format!("chown {} to the mail user", mail_root.display()))?;
        }
        let certs = tls::generate(&root.join("tls"))?;
        let tls = tls_connector(&certs.ca_cert)?;

        let passwd_file = if opts.passwords.is_empty() {
            None
        } else {
            let path = root.join("passwd");
            write_file(&path, &render_passwd(&opts.passwords)?, 0o644)?;
            Some(path)
        };
        let oauth2_file = root.join("oauth2.conf.ext");
        write_file(
            &oauth2_file,
            &render_oauth2_conf(&opts.token_validation_base),
            0o644,
        )?;

        let debug = std::env::var_os("MAILINTAKE_TESTBED_DEBUG").is_some();
        let mut dovecot = Dovecot {
            conf: root.join("dovecot.conf"),
            dir,
            host: "localhost".to_string(),
            imaps_port: 0,
            imap_port: 0,
            ca_file: certs.ca_cert.clone(),
            dovecot_bin,
            doveadm_bin,
            master: None,
            tls,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            if attempt > 1 {
                // Only this attempt's log should decide whether to retry.
                let _ = std::fs::remove_file(root.join("dovecot.log"));
            }
            (dovecot.imap_port, dovecot.imaps_port) = free_ports()?;
            let config = ConfigParams {
                root: &root,
                imap_port: dovecot.imap_port,
                imaps_port: dovecot.imaps_port,
                certs: &certs,
                oauth2_file: &oauth2_file,
                passwd_file: passwd_file.as_deref(),
                identity: &identity,
                debug,
            };
            write_file(&dovecot.conf, &render_config(&config), 0o644)?;
            match dovecot.start_again().await {
                Ok(()) => return Ok(dovecot),
                // Another process took a port between our probe and Dovecot's bind.
                Err(_)
                    if attempt < PORT_ATTEMPTS
                        && dovecot.log().contains("Address already in use") => {}
                Err(error) => return Err(error),
            }
        }
    }

    /// The host name to connect to: `localhost` (the certificate also names `127.0.0.1`).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Port of the implicit-TLS IMAP listener.
    pub fn imaps_port(&self) -> u16 {
        self.imaps_port
    }

    /// Port of the plain IMAP listener, where STARTTLS is offered.
    pub fn imap_port(&self) -> u16 {
        self.imap_port
    }

    /// PEM file of the throw-away CA that signed the server certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.ca_file.clone()
    }

    /// The instance's temp dir (configuration in `dovecot.conf`, log in `dovecot.log`,
    /// maildirs under `mail/<user>/Maildir`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Path of the generated `dovecot.conf`.
    pub fn conf_path(&self) -> &Path {
        &self.conf
    }

    /// True while the server is running (between start and [`stop`](Self::stop)).
    pub fn is_running(&mut self) -> bool {
        self.master
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Stores a message in `user`'s `folder` with `doveadm save` (creating and subscribing
    /// the folder if needed) and returns its UID. Folder names use `/` as the hierarchy
    /// separator. The server must be running.
    pub fn deliver(&self, user: &str, folder: &str, raw: &[u8]) -> anyhow::Result<u32> {
        self.deliver_inner(user, folder, raw)
            .with_context(|| format!("delivering a message to {user} {folder}"))
    }

    fn deliver_inner(&self, user: &str, folder: &str, raw: &[u8]) -> anyhow::Result<u32> {
        let uidnext = match self.status_number(user, folder, "uidnext") {
            Ok(n) => n,
            Err(error) if format!("{error:#}").contains("doesn't exist") => {
                self.doveadm(&["mailbox", "create", "-s", "-u", user, folder], None)?;
                self.status_number(user, folder, "uidnext")?
            }
            Err(error) => return Err(error),
        };
        self.doveadm(&["save", "-u", user, "-m", folder], Some(raw))?;
        let query = format!("{uidnext}:*");
        let fresh: Vec<u32> = self
            .fetch(user, folder, "uid", &["uid", &query])?
            .iter()
            .filter_map(|m| field_u32(m, "uid"))
            .filter(|&uid| uid >= uidnext)
            .collect();
        match fresh.as_slice() {
            [uid] => Ok(*uid),
            [] => bail!("doveadm save succeeded but no new message appeared"),
            _ => {
                // Someone else (the product under test) added mail concurrently: find ours
                // by content. Dovecot stores LF line endings.
                let wanted = normalize_newlines(raw);
                let candidates = self.fetch(user, folder, "uid text", &["uid", &query])?;
                candidates
                    .iter()
                    .filter(|m| {
                        m.get("text")
                            .and_then(|t| t.as_str())
                            .is_some_and(|t| normalize_newlines(t.as_bytes()) == wanted)
                    })
                    .filter_map(|m| field_u32(m, "uid"))
                    .filter(|&uid| uid >= uidnext)
                    .max()
                    .context("could not tell the new message among concurrent arrivals")
            }
        }
    }

    /// Adds flags (space-separated, e.g. `\Seen $Forwarded`) to one message with
    /// `doveadm flags add`. Fails if the UID does not exist.
    pub fn add_flags(&self, user: &str, folder: &str, uid: u32, flags: &str) -> anyhow::Result<()> {
        let uid_text = uid.to_string();
        let found = self
            .fetch(user, folder, "uid", &["uid", &uid_text])
            .with_context(|| format!("adding flags to {user} {folder} UID {uid}"))?;
        if !found.iter().any(|m| field_u32(m, "uid") == Some(uid)) {
            bail!("adding flags to {user} {folder} UID {uid}: no such message");
        }
        self.doveadm(
            &[
                "flags", "add", "-u", user, flags, "mailbox", folder, "uid", &uid_text,
            ],
            None,
        )
        .with_context(|| format!("adding flags to {user} {folder} UID {uid}"))?;
        Ok(())
    }

    /// The flags of every message in the folder, by UID (`doveadm fetch 'uid flags'`).
    /// The session flag `\Recent` is left out. Fails if the folder does not exist.
    pub fn flags(&self, user: &str, folder: &str) -> anyhow::Result<BTreeMap<u32, Vec<String>>> {
        let messages = self
            .fetch(user, folder, "uid flags", &["all"])
            .with_context(|| format!("reading flags of {user} {folder}"))?;
        let mut out = BTreeMap::new();
        for m in &messages {
            let uid = field_u32(m, "uid").context("doveadm fetch returned no uid")?;
            let flags = m
                .get("flags")
                .and_then(|f| f.as_str())
                .unwrap_or_default()
                .split_whitespace()
                .filter(|f| !f.eq_ignore_ascii_case("\\Recent"))
                .map(str::to_string)
                .collect();
            out.insert(uid, flags);
        }
        Ok(out)
    }

    /// The UIDs of the messages in the folder, ascending. Fails if the folder does not
    /// exist.
    pub fn uids(&self, user: &str, folder: &str) -> anyhow::Result<Vec<u32>> {
        let messages = self
            .fetch(user, folder, "uid", &["all"])
            .with_context(|| format!("listing UIDs of {user} {folder}"))?;
        let mut uids: Vec<u32> = messages
            .iter()
            .filter_map(|m| field_u32(m, "uid"))
            .collect();
        uids.sort_unstable();
        Ok(uids)
    }

    /// The folder's UIDVALIDITY.
    pub fn uidvalidity(&self, user: &str, folder: &str) -> anyhow::Result<u32> {
        self.status_number(user, folder, "uidvalidity")
            .with_context(|| format!("reading UIDVALIDITY of {user} {folder}"))
    }

    /// Runs `doveadm -c CONF ARGS…` (feeding `stdin` if given) and returns its stdout.
    /// Fails on a non-zero exit status or when doveadm reports an error on stderr.
    pub fn doveadm(&self, args: &[&str], stdin: Option<&[u8]>) -> anyhow::Result<String> {
        let mut command = Command::new(&self.doveadm_bin);
        command
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .with_context(|| format!("running {}", self.doveadm_bin.display()))?;
        let output = std::thread::scope(|scope| {
            if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
                scope.spawn(move || {
                    // A failed write shows up as doveadm's error below.
                    let _ = pipe.write_all(data);
                });
            }
            child.wait_with_output()
        })
        .context("waiting for doveadm")?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() || stderr.contains("Error:") || stderr.contains("Fatal:") {
            bail!(
                "doveadm {} failed ({}): {}",
                args.join(" "),
                output.status,
                stderr.trim()
            );
        }
        String::from_utf8(output.stdout).context("doveadm printed non-UTF-8 output")
    }

    /// Stops the server (TERM to the master process) and waits until it has exited and
    /// its ports are free. Configuration, ports and mail are kept for
    /// [`start_again`](Self::start_again). Stopping a stopped server does nothing.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.master.take() else {
            return Ok(());
        };
        terminate(&mut child, STOP_TIMEOUT).context("stopping Dovecot")?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        while !(port_is_free(self.imap_port) && port_is_free(self.imaps_port)) {
            if Instant::now() > deadline {
                bail!(
                    "Dovecot stopped but its ports {} and {} are still busy",
                    self.imap_port,
                    self.imaps_port
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Starts the stopped server again with the same configuration, ports and mail.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            bail!("Dovecot is still running");
        }
        self.master = None;
        // A fresh base_dir, as on first start (stale sockets can stall auth).
        let run = self.dir.path().join("run");
        std::fs::remove_dir_all(&run).with_context(|| format!("removing {}", run.display()))?;
        std::fs::create_dir(&run).with_context(|| format!("creating {}", run.display()))?;
        if let Err(error) = self.launch().await {
            self.kill_master();
            return Err(error);
        }
        Ok(())
    }

    /// The server's log (`dovecot.log`, plus anything the master printed), for failure
    /// messages.
    pub fn log(&self) -> String {
        let mut log = read_lossy(&self.dir.path().join("dovecot.log"));
        let stderr = read_lossy(&self.dir.path().join("dovecot.stderr"));
        if !stderr.trim().is_empty() {
            let _ = write!(log, "\n--- dovecot stdout/stderr ---\n{stderr}");
        }
        log
    }

    /// The last lines of [`log`](Self::log).
    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    /// Spawns the master process in the foreground and waits for the greetings.
    async fn launch(&mut self) -> anyhow::Result<()> {
        let stderr_path = self.dir.path().join("dovecot.stderr");
        let out = std::fs::File::create(&stderr_path)
            .with_context(|| format!("creating {}", stderr_path.display()))?;
        let err = out.try_clone().context("duplicating a file handle")?;
        let child = Command::new(&self.dovecot_bin)
            .arg("-F")
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Own process group: a Ctrl-C meant for the test or demo does not reach Dovecot
            // behind our back; we stop it ourselves.
            .process_group(0)
            .spawn()
            .with_context(|| format!("running {}", self.dovecot_bin.display()))?;
        self.master = Some(child);
        self.wait_ready()
            .await
            .with_context(|| format!("Dovecot did not start; its log:\n{}", self.log_tail()))
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last_error = anyhow!("not probed yet");
        loop {
            if let Some(child) = self.master.as_mut()
                && let Some(status) = child.try_wait().context("checking the master process")?
            {
                bail!("the dovecot master process exited during start-up ({status})");
            }
            match tokio::time::timeout(Duration::from_secs(2), self.probe()).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(error)) => last_error = error,
                Err(_) => last_error = anyhow!("no greeting within 2 s"),
            }
            if Instant::now() > deadline {
                return Err(last_error.context(format!(
                    "no IMAP greeting within {} s",
                    START_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Reads the greeting on both listeners; it must advertise XOAUTH2, which imap-login
    /// can only do after its handshake with the auth service.
    async fn probe(&self) -> anyhow::Result<()> {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.imaps_port))
            .await
            .context("connecting to the imaps port")?;
        let tls = self
            .tls
            .connect(&self.host, tcp)
            .await
            .context("TLS handshake on the imaps port")?;
        check_greeting(tls).await.context("imaps port")?;
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.imap_port))
            .await
            .context("connecting to the imap port")?;
        check_greeting(tcp).await.context("imap port")?;
        Ok(())
    }

    /// Kills the master process (best effort, for error paths and Drop).
    fn kill_master(&mut self) {
        if let Some(mut child) = self.master.take() {
            let _ = terminate(&mut child, STOP_TIMEOUT);
        }
    }

    /// `doveadm -f json fetch -u USER FIELDS mailbox FOLDER QUERY…`; fails if the folder
    /// does not exist.
    fn fetch(
        &self,
        user: &str,
        folder: &str,
        fields: &str,
        query: &[&str],
    ) -> anyhow::Result<Vec<serde_json::Value>> {
        let mut args = vec!["-f", "json", "fetch", "-u", user, fields, "mailbox", folder];
        args.extend_from_slice(query);
        let out = self.doveadm(&args, None)?;
        let messages = parse_json_array(&out)?;
        if messages.is_empty() {
            // doveadm fetch quietly matches nothing in a folder that does not exist.
            self.status_number(user, folder, "messages")?;
        }
        Ok(messages)
    }

    /// One numeric field of `doveadm mailbox status` (fails if the folder is missing).
    fn status_number(&self, user: &str, folder: &str, field: &str) -> anyhow::Result<u32> {
        let out = self.doveadm(
            &["-f", "json", "mailbox", "status", "-u", user, field, folder],
            None,
        )?;
        let rows = parse_json_array(&out)?;
        rows.first()
            .and_then(|row| field_u32(row, field))
            .with_context(|| format!("doveadm mailbox status printed no {field}: {out}"))
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.kill_master();
    }
}

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

/// Which accounts Dovecot runs as.
#[derive(Debug, Clone)]
struct Identity {
    /// Running as root: Dovecot's own `dovecot`/`dovenull` users, mail owned by `nobody`.
    root: bool,
    /// `default_internal_user`.
    internal: Account,
    /// `default_internal_group` (only written when not root).
    internal_group: String,
    /// `default_login_user`.
    login: Account,
    /// Owner of the mail (userdb uid/gid).
    mail: Account,
}

impl Identity {
    fn detect() -> anyhow::Result<Identity> {
        if sysuser::is_root() {
            let internal = sysuser::by_name("dovecot")
                .context("running as root needs the 'dovecot' user of the dovecot-core package")?;
            let login = sysuser::by_name("dovenull")
                .context("running as root needs the 'dovenull' user of the dovecot-core package")?;
            let mail = sysuser::by_name("nobody").context("running as root needs 'nobody'")?;
            Ok(Identity {
                root: true,
                internal_group: sysuser::group_name(internal.gid),
                internal,
                login,
                mail,
            })
        } else {
            let me = sysuser::current()?;
            Ok(Identity {
                root: false,
                internal_group: sysuser::group_name(me.gid),
                internal: me.clone(),
                login: me.clone(),
                mail: me,
            })
        }
    }
}

struct ConfigParams<'a> {
    root: &'a Path,
    imap_port: u16,
    imaps_port: u16,
    certs: &'a tls::Certificates,
    oauth2_file: &'a Path,
    passwd_file: Option<&'a Path>,
    identity: &'a Identity,
    debug: bool,
}

/// One namespace with `/` as separator and the special-use folders of Exchange Online.
const NAMESPACE: &str = r#"namespace inbox {
  inbox = yes
  separator = /
  # The special-use folders every Exchange Online mailbox has.
  mailbox Drafts {
    auto = subscribe
    special_use = \Drafts
  }
  mailbox "Sent Items" {
    auto = subscribe
    special_use = \Sent
  }
  mailbox "Deleted Items" {
    auto = subscribe
    special_use = \Trash
  }
  mailbox "Junk Email" {
    auto = subscribe
    special_use = \Junk
  }
  mailbox Archive {
    auto = subscribe
    special_use = \Archive
  }
}
"#;

fn render_config(p: &ConfigParams<'_>) -> String {
    let root = p.root.display();
    let id = p.identity;
    let mut c = String::new();
    let _ = write!(
        c,
        "# Generated by mailintake-testbed for one test run; do not edit.
instance_name = mailintake-testbed-{imaps}
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
shutdown_clients = yes

ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
",
        imaps = p.imaps_port,
        cert = p.certs.server_cert.display(),
        key = p.certs.server_key.display(),
    );
    if Path::new("/usr/share/dovecot/dh.pem").exists() {
        c.push_str("ssl_dh = </usr/share/dovecot/dh.pem\n");
    }
    let _ = write!(
        c,
        "
auth_mechanisms = xoauth2 oauthbearer plain login
auth_failure_delay = 0
auth_verbose = yes
auth_debug = {debug}
mail_debug = {debug}

default_internal_user = {internal}
default_login_user = {login}
",
        debug = if p.debug { "yes" } else { "no" },
        internal = id.internal.name,
        login = id.login.name,
    );
    if !id.root {
        let _ = writeln!(c, "default_internal_group = {}", id.internal_group);
    }
    let _ = write!(
        c,
        "first_valid_uid = {uid}
last_valid_uid = {uid}
first_valid_gid = {gid}
last_valid_gid = {gid}

# LAYOUT=fs: folder names may contain '.', as on Exchange.
mail_location = maildir:~/Maildir:LAYOUT=fs:INBOX=~/Maildir/INBOX
mail_fsync = never
{namespace}
# Adds only `nodelay` (kept when a later passdb fails): Dovecot 2.3.19 queues failed
# logins for up to 0.5 s even with auth_failure_delay = 0. It authenticates nobody.
passdb {{
  driver = static
  args = noauthenticate nodelay=yes
}}
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {oauth2}
}}
",
        uid = id.mail.uid,
        gid = id.mail.gid,
        oauth2 = p.oauth2_file.display(),
        namespace = NAMESPACE,
    );
    if let Some(passwd) = p.passwd_file {
        let _ = write!(
            c,
            "passdb {{
  driver = passwd-file
  mechanisms = plain login
  args = scheme=PLAIN username_format=%Lu {}
}}
",
            passwd.display()
        );
    }
    let _ = write!(
        c,
        "userdb {{
  driver = static
  args = allow_all_users=yes uid={uid} gid={gid} home={root}/mail/%Lu
}}

service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {imaps}
    ssl = yes
  }}
{chroot}}}
service anvil {{
  # mode 0 disables the auth-penalty listener: no delays after failed logins.
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
{chroot}}}
protocol imap {{
  mail_max_userip_connections = 50
}}
",
        uid = id.mail.uid,
        gid = id.mail.gid,
        imap = p.imap_port,
        imaps = p.imaps_port,
        chroot = if id.root { "" } else { "  chroot =\n" },
    );
    c
}

/// The `passdb oauth2` settings file. See [`Dovecot`] for why the mailbox check lives in
/// `pass_attrs`.
fn render_oauth2_conf(token_validation_base: &str) -> String {
    format!(
        "# Generated by mailintake-testbed; see the docs of mailintake_testbed::Dovecot.
tokeninfo_url = {base}/tokeninfo?access_token=
username_attribute = email
username_format = any-mailbox
active_attribute = active
active_value = true
pass_attrs = allow_nets=%{{if;%{{oauth2:mailboxes}};*;*,%Lu,*;0.0.0.0/0,::/0;255.255.255.255/32}}
timeout_msecs = 5000
",
        base = token_validation_base.trim_end_matches('/'),
    )
}

fn render_passwd(passwords: &[(String, String)]) -> anyhow::Result<String> {
    let mut out = String::new();
    for (user, password) in passwords {
        let bad = |s: &str| s.is_empty() || s.chars().any(|c| c == ':' || c.is_control());
        if bad(user) || bad(password) {
            bail!(
                "password user '{user}': user and password must be non-empty without ':' or control characters"
            );
        }
        let _ = writeln!(out, "{}:{{PLAIN}}{password}::::::", user.to_lowercase());
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn find_binary(name: &str, env: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Ok(PathBuf::from(path));
    }
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let fallback = ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"]
        .iter()
        .map(PathBuf::from);
    path_dirs
        .into_iter()
        .chain(fallback)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .with_context(|| {
            format!("'{name}' not found (apt-get install dovecot-imapd, or set {env})")
        })
}

fn tls_connector(ca_file: &Path) -> anyhow::Result<tokio_native_tls::TlsConnector> {
    let pem = std::fs::read(ca_file).with_context(|| format!("reading {}", ca_file.display()))?;
    let ca = native_tls::Certificate::from_pem(&pem).context("parsing the CA certificate")?;
    let connector = native_tls::TlsConnector::builder()
        .add_root_certificate(ca)
        .disable_built_in_roots(true)
        .build()
        .context("building a TLS connector")?;
    Ok(connector.into())
}

async fn check_greeting<S>(stream: S) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    stream
        .read_line(&mut line)
        .await
        .context("reading the greeting")?;
    if !line.starts_with("* OK") || !line.contains("AUTH=XOAUTH2") {
        bail!("unexpected greeting {line:?}");
    }
    stream.get_mut().write_all(b"z LOGOUT\r\n").await?;
    stream.get_mut().flush().await?;
    Ok(())
}

/// Picks two distinct free loopback ports (plain, TLS).
fn free_ports() -> anyhow::Result<(u16, u16)> {
    let a = std::net::TcpListener::bind(("127.0.0.1", 0)).context("finding a free port")?;
    let b = std::net::TcpListener::bind(("127.0.0.1", 0)).context("finding a free port")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// TERM, wait up to `timeout`, then KILL; always reaps the child.
fn terminate(child: &mut Child, timeout: Duration) -> anyhow::Result<()> {
    if child.try_wait()?.is_some() {
        return Ok(());
    }
    let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
    // The master leads its own process group (see `launch`). Signalling the whole group
    // lets every Dovecot process exit at once; TERM to the master alone makes it wait
    // about a second for its children.
    // SAFETY: plain kill(2) on the process group of our own, not yet reaped child.
    unsafe {
        libc::kill(-pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().context("killing the dovecot master")?;
    child.wait().context("reaping the dovecot master")?;
    bail!(
        "Dovecot did not stop within {} s and was killed",
        timeout.as_secs()
    )
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

fn write_file(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    set_mode(path, mode)
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

fn parse_json_array(out: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let out = out.trim();
    if out.is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(out).with_context(|| format!("parsing doveadm JSON output {out:?}"))
}

/// A numeric field that doveadm's JSON formatter prints as a string.
fn field_u32(value: &serde_json::Value, name: &str) -> Option<u32> {
    match value.get(name)? {
        serde_json::Value::String(s) => s.trim().parse().ok(),
        serde_json::Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        _ => None,
    }
}

fn normalize_newlines(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'\r' && raw.get(i + 1) == Some(&b'\n') {
            i += 1;
            continue;
        }
        out.push(raw[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newlines_are_normalized() {
        assert_eq!(normalize_newlines(b"a\r\nb\nc\r"), b"a\nb\nc\r");
    }

    #[test]
    fn passwd_rejects_colons() {
        assert!(render_passwd(&[("a@x".into(), "p:w".into())]).is_err());
        assert_eq!(
            render_passwd(&[("A@x".into(), "pw".into())]).unwrap(),
            "a@x:{PLAIN}pw::::::\n"
        );
    }

    #[test]
    fn oauth2_conf_points_at_tokeninfo() {
        let conf = render_oauth2_conf("http://127.0.0.1:1234/");
        assert!(conf.contains("tokeninfo_url = http://127.0.0.1:1234/tokeninfo?access_token=\n"));
        assert!(conf.contains("pass_attrs = allow_nets=%{if;%{oauth2:mailboxes};*;*,%Lu,*;"));
    }
}
