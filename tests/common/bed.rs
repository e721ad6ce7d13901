//! A real test bed for end-to-end runs: the in-test identity platform, a private Dovecot, a
//! configuration file for the `mailintake` binary, and helpers to look at the outcome.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use async_imap::Authenticator;
use futures::StreamExt;
use mailintake::raw_store::RawStore;
use mailintake::registry::Registry;
use mailintake_testbed::{Dovecot, IdentityPlatform};

pub const TENANT: &str = "11111111-2222-3333-4444-555555555555";

/// One mailbox as the test wants it configured.
#[derive(Clone)]
pub struct MailboxSpec {
    pub id: &'static str,
    pub address: &'static str,
    pub client_id: &'static str,
    /// The secret written into the credential's secret file (may differ from the IdP's).
    pub secret: &'static str,
    pub tls: &'static str,
    pub after: &'static str,
    /// Trust the test CA (`ca_file`); without it the server's certificate must be refused.
    pub trust_test_ca: bool,
    pub schedule: Option<&'static str>,
    pub folder: &'static str,
    pub after_quarantine: Option<&'static str>,
    /// Use this credential (defined in `Bed::credentials_toml`) instead of a generated
    /// `entra-app-secret` one.
    pub credential_name: Option<String>,
}

impl MailboxSpec {
    pub fn new(
        id: &'static str,
        address: &'static str,
        client_id: &'static str,
        secret: &'static str,
    ) -> Self {
        MailboxSpec {
            id,
            address,
            client_id,
            secret,
            tls: "implicit",
            after: "seen",
            trust_test_ca: true,
            schedule: None,
            folder: "INBOX",
            after_quarantine: None,
            credential_name: None,
        }
    }
}

pub struct Bed {
    pub idp: IdentityPlatform,
    pub dovecot: Dovecot,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// Top-level configuration lines (e.g. `database_url = …`, `[limits]` tables go last).
    pub extra_config: String,
    /// Lines inside the `[imap]` table.
    pub imap_extra: String,
    /// Tables appended at the end (`[limits]`, `[registry]`).
    pub tables: String,
    /// Registry URL; default a SQLite file in the data dir.
    pub database: Option<String>,
    /// Extra `[credentials.*]` / `[secrets]` tables, written as they are.
    pub credentials_toml: String,
}

impl Bed {
    pub async fn start() -> Bed {
        let idp = IdentityPlatform::start().await.expect("identity platform");
        idp.add_tenant(TENANT);
        let dovecot = Dovecot::start(&idp).await.expect("dovecot");
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("mailintake.toml");
        Bed {
            idp,
            dovecot,
            dir,
            config,
            extra_config: String::new(),
            imap_extra: String::new(),
            tables: String::new(),
            database: None,
            credentials_toml: String::new(),
        }
    }

    /// Like [`Bed::start`], with Dovecot also accepting these plain-password users.
    pub async fn start_with_passwords(passwords: &[(&str, &str)]) -> Bed {
        let mut bed = Bed::start().await;
        let options = mailintake_testbed::DovecotOptions {
            token_validation_base: bed.idp.authority(),
            passwords: passwords
                .iter()
                .map(|(u, p)| (u.to_string(), p.to_string()))
                .collect(),
        };
        bed.dovecot = Dovecot::start_with(options)
            .await
            .expect("dovecot with passwords");
        bed
    }

    /// Writes a file in the bed's directory (mode 0600) and returns its path.
    pub fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn database_url(&self) -> String {
        self.database
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}/registry.sqlite3", self.data_dir().display()))
    }

    /// Writes the configuration for these mailboxes (one credential per mailbox).
    pub fn configure(&self, mailboxes: &[MailboxSpec]) {
        let mut text = format!(
            "data_dir = \"{}\"\ndatabase_url = \"{}\"\n{}\n[imap]\nconnect_timeout_secs = 5\nio_timeout_secs = 20\n{}\n{}\n",
            self.data_dir().display(),
            self.database_url(),
            self.extra_config,
            self.imap_extra,
            self.tables,
        );
        text.push_str(&self.credentials_toml);
        text.push('\n');
        for mb in mailboxes.iter().filter(|m| m.credential_name.is_none()) {
            let secret_file = self.dir.path().join(format!("{}.secret", mb.id));
            std::fs::write(&secret_file, format!("{}\n", mb.secret)).unwrap();
            text.push_str(&format!(
                "\n[credentials.{id}-app]\nkind = \"entra-app-secret\"\nauthority = \"{authority}\"\n\
                 tenant_id = \"{TENANT}\"\nclient_id = \"{client}\"\nclient_secret_file = \"{secret}\"\n",
                id = mb.id,
                authority = self.idp.authority(),
                client = mb.client_id,
                secret = secret_file.display(),
            ));
        }
        for mb in mailboxes {
            let port = if mb.tls == "implicit" {
                self.dovecot.imaps_port()
            } else {
                self.dovecot.imap_port()
            };
            text.push_str(&format!(
                "\n[[mailbox]]\nid = \"{id}\"\naddress = \"{address}\"\nhost = \"{host}\"\nport = {port}\n\
                 tls = \"{tls}\"\nafter = \"{after}\"\ncredential = \"{credential}\"\n",
                credential = mb.credential_name.clone().unwrap_or_else(|| format!("{}-app", mb.id)),
                id = mb.id,
                address = mb.address,
                host = self.dovecot.host(),
                tls = mb.tls,
                after = mb.after,
            ));
            if mb.trust_test_ca {
                text.push_str(&format!(
                    "ca_file = \"{}\"\n",
                    self.dovecot.ca_file().display()
                ));
            }
            text.push_str(&format!("folder = \"{}\"\n", mb.folder));
            if let Some(action) = mb.after_quarantine {
                text.push_str(&format!("after_quarantine = \"{action}\"\n"));
            }
            if let Some(schedule) = mb.schedule {
                text.push_str(&format!("schedule = \"{schedule}\"\n"));
            }
        }
        std::fs::write(&self.config, text).unwrap();
    }

    /// `mailintake run --once`, run as a separate process like an operator would.
    pub async fn run_once(&self) -> Output {
        self.run_once_env(&[]).await
    }

    /// `mailintake run --once` with extra environment (e.g. `MAILINTAKE_FAILPOINT`).
    pub async fn run_once_env(&self, env: &[(&str, &str)]) -> Output {
        self.command(&["run", "--once"], env).await
    }

    /// Any `mailintake` command with this bed's configuration.
    pub async fn command(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let config = self.config.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_mailintake"))
                .arg("--config")
                .arg(&config)
                .args(&args)
                .env("MAILINTAKE_LOG", "debug")
                .envs(env)
                .output()
                .expect("run mailintake")
        })
        .await
        .unwrap()
    }

    pub fn spawn_run_once(&self) -> std::process::Child {
        std::process::Command::new(env!("CARGO_BIN_EXE_mailintake"))
            .arg("--config")
            .arg(&self.config)
            .args(["run", "--once"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn mailintake")
    }

    pub async fn registry(&self) -> Registry {
        Registry::open(&self.database_url())
            .await
            .expect("registry")
    }

    pub fn store(&self) -> RawStore {
        RawStore::open(&self.data_dir()).unwrap()
    }

    /// Messages as the server serves them now, by UID, fetched with a fresh `BODY.PEEK[]`
    /// over a connection of the test's own (not mailintake's IMAP code).
    pub async fn served(&self, user: &str, client_id: &str) -> BTreeMap<u32, Vec<u8>> {
        self.served_in(user, "INBOX", client_id).await
    }

    /// Like [`Bed::served`] for any folder.
    pub async fn served_in(
        &self,
        user: &str,
        folder: &str,
        client_id: &str,
    ) -> BTreeMap<u32, Vec<u8>> {
        let token = self.idp.issue_token(client_id).unwrap();
        let pem = std::fs::read(self.dovecot.ca_file()).unwrap();
        let tls = async_native_tls::TlsConnector::new()
            .add_root_certificate(async_native_tls::Certificate::from_pem(&pem).unwrap());
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.dovecot.imaps_port()))
            .await
            .unwrap();
        let stream = tls.connect(self.dovecot.host(), tcp).await.unwrap();
        let mut client = async_imap::Client::new(stream);
        client.read_response().await.unwrap().unwrap();
        struct X(String);
        impl Authenticator for X {
            type Response = Vec<u8>;
            fn process(&mut self, _: &[u8]) -> Vec<u8> {
                std::mem::take(&mut self.0).into_bytes()
            }
        }
        let mut session = client
            .authenticate(
                "XOAUTH2",
                X(format!("user={user}\x01auth=Bearer {token}\x01\x01")),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("test login");
        session.examine(folder).await.unwrap();
        let mut out = BTreeMap::new();
        {
            let mut fetches = session.uid_fetch("1:*", "(UID BODY.PEEK[])").await.unwrap();
            while let Some(f) = fetches.next().await {
                let f = f.unwrap();
                if let (Some(uid), Some(body)) = (f.uid, f.body()) {
                    out.insert(uid, body.to_vec());
                }
            }
        }
        session.logout().await.ok();
        out
    }

    /// UID → is `\Seen` on the server.
    pub fn seen(&self, user: &str, folder: &str) -> BTreeMap<u32, bool> {
        self.dovecot
            .flags(user, folder)
            .unwrap()
            .into_iter()
            .map(|(uid, flags)| (uid, flags.iter().any(|f| f == "\\Seen")))
            .collect()
    }
}

pub fn fixtures() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/submissions");
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "eml"))
        .map(|p| {
            (
                p.file_stem().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

pub fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
