//! Every credential mode against the real Dovecot and the in-test identity platform, the
//! `check` diagnoses, refresh-token rotation, single-flight tokens and the secret canary.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::bed::{Bed, MailboxSpec, TENANT, fixtures, text};
use mailintake::config::TokenKey;
use mailintake::credentials::TokenStore;
use mailintake_testbed::IdentityPlatform;

const USER: &str = "podatelna@urad.example";
const KEY_HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

fn mailbox_with(credential: &str) -> MailboxSpec {
    let mut mb = MailboxSpec::new("podatelna", USER, "unused", "unused");
    mb.credential_name = Some(credential.to_owned());
    mb
}

/// A free port below Linux's ephemeral range (32768-60999), for a fixed redirect URI: a port
/// the kernel hands out could be taken by any connection or test server before `auth login`
/// binds it.
fn fixed_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 400) as u16 * 25;
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = 20_000 + (base - 20_000 + n) % 10_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn spawn(bed: &Bed, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_mailintake"))
        .arg("--config")
        .arg(&bed.config)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A child whose stdout is read line by line in the background, so the test can wait for a
/// line and still see everything the child printed in the end.
struct Interactive {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Interactive {
    fn spawn(bed: &Bed, args: &[&str]) -> Interactive {
        let mut child = spawn(bed, args);
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Interactive {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (up to 30 s) for a stdout line that `pick` accepts.
    fn until(&mut self, pick: impl Fn(&str) -> Option<String>) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(line) = self.lines.recv_timeout(left) else {
                break;
            };
            let picked = pick(&line);
            self.seen.push(line);
            if let Some(v) = picked {
                return v;
            }
        }
        // Say why: the child's status and what it wrote to stderr.
        let _ = self.child.kill();
        let status = self.child.wait();
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        panic!(
            "the expected line never came; the child ended {status:?}; stdout so far:\n{}\nstderr:\n{stderr}",
            self.seen.join("\n")
        );
    }

    /// Waits for the exit; returns the status, all of stdout, and stderr.
    async fn finish(mut self) -> (std::process::ExitStatus, String, String) {
        let mut child = self.child;
        let (status, stderr) = tokio::task::spawn_blocking(move || {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            (child.wait().unwrap(), err)
        })
        .await
        .unwrap();
        self.seen.extend(self.lines.try_iter());
        (status, self.seen.join("\n"), stderr)
    }
}

async fn registers_one(bed: &Bed) {
    bed.dovecot
        .deliver(USER, "INBOX", &fixtures()[1].1)
        .unwrap();
    let out = bed.run_once().await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        bed.registry().await.list(None, 10).await.unwrap().len(),
        1,
        "{}",
        text(&out)
    );
    assert!(bed.seen(USER, "INBOX").values().all(|s| *s));
}

fn delegated_toml(bed: &Bed, idp: &IdentityPlatform, kind: &str, redirect_uri: &str) -> String {
    let key = bed.file("token.key", KEY_HEX.as_bytes());
    let specific = if kind == "entra-delegated" {
        format!(
            "authority = \"{}\"\ntenant_id = \"{TENANT}\"\n",
            idp.authority()
        )
    } else {
        format!(
            "authorization_url = \"{}\"\ntoken_url = \"{}\"\ndevice_authorization_url = \"{}\"\n\
             scopes = [\"https://outlook.office.com/IMAP.AccessAsUser.All\", \"offline_access\"]\nsasl = \"oauthbearer\"\npkce = true\n",
            idp.authorize_url(TENANT),
            idp.token_url(TENANT),
            idp.device_code_url(TENANT)
        )
    };
    format!(
        "[secrets]\ntoken_key_file = \"{}\"\n\n[credentials.user]\nkind = \"{kind}\"\nclient_id = \"client-desktop\"\n\
         redirect_uri = \"{redirect_uri}\"\n{specific}",
        key.display()
    )
}

/// A bed with a delegated credential whose app has `redirect_uri` registered (a fixed port, or
/// none: any free port at login).
async fn delegated_bed(kind: &str, redirect_uri: &str) -> Bed {
    let mut bed = Bed::start().await;
    bed.idp.add_user(TENANT, USER);
    bed.idp.set_signed_in_user(USER);
    bed.idp
        .add_public_client(TENANT, "client-desktop", None, &[redirect_uri], true);
    bed.credentials_toml = delegated_toml(&bed, &bed.idp, kind, redirect_uri);
    bed.configure(&[mailbox_with("user")]);
    bed
}

/// Drives `auth login` like a person with a browser: opens the printed URL, follows the
/// identity platform's redirect to the loopback listener.
/// Returns the login's exit status, stdout and stderr, and the redirect URI it sent.
async fn browser_login(bed: &Bed) -> (std::process::ExitStatus, String, String, String) {
    let mut login = Interactive::spawn(bed, &["auth", "login", "podatelna"]);
    let url = login.until(|l| l.trim().starts_with("http").then(|| l.trim().to_owned()));
    assert!(
        url.contains("code_challenge="),
        "PKCE challenge missing: {url}"
    );
    let redirect_uri = oauth2::url::Url::parse(&url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "redirect_uri")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let http = oauth2::reqwest::Client::builder()
        .redirect(oauth2::reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let answer = http.get(&url).send().await.unwrap();
    assert_eq!(answer.status().as_u16(), 302, "{:?}", answer.text().await);
    let location = answer.headers()["location"].to_str().unwrap().to_owned();
    let back = http.get(&location).send().await.unwrap();
    assert_eq!(back.status().as_u16(), 200);
    let (status, stdout, stderr) = login.finish().await;
    (status, stdout, stderr, redirect_uri)
}

async fn stored_refresh_token(bed: &Bed) -> Option<String> {
    let store = TokenStore::new(bed.registry().await, TokenKey::parse(KEY_HEX).unwrap());
    store
        .load("user")
        .await
        .unwrap()
        .map(|t| t.refresh_token.expose().to_owned())
}

// ---- 1. every mode logs in to Dovecot and registers a message --------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_only_with_a_certificate_in_pem_and_in_pkcs12() {
    for pkcs12 in [false, true] {
        let mut bed = Bed::start().await;
        let (cert_pem, file) = if pkcs12 {
            let (cert, der) =
                IdentityPlatform::make_test_pkcs12("mailintake-test", 365, "p12-pass");
            (cert, bed.file("app.p12", &der))
        } else {
            let (cert, key) = IdentityPlatform::make_test_certificate("mailintake-test", 365);
            (
                cert.clone(),
                bed.file("app.pem", format!("{cert}{key}").as_bytes()),
            )
        };
        bed.idp
            .add_app_certificate(TENANT, "client-cert", &cert_pem, &[USER]);
        let password = if pkcs12 {
            let p = bed.file("p12.pass", b"p12-pass");
            format!("certificate_password_file = \"{}\"\n", p.display())
        } else {
            String::new()
        };
        bed.credentials_toml = format!(
            "[credentials.cert]\nkind = \"entra-app-certificate\"\nauthority = \"{}\"\ntenant_id = \"{TENANT}\"\n\
             client_id = \"client-cert\"\ncertificate_file = \"{}\"\n{password}",
            bed.idp.authority(),
            file.display()
        );
        bed.configure(&[mailbox_with("cert")]);
        registers_one(&bed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegated_authorization_code_with_pkce_then_refresh_rotation_survives_a_restart() {
    // No port in the redirect URI: the login listens on any free one and sends that.
    let bed = delegated_bed("entra-delegated", "http://localhost/").await;
    // Not signed in yet: a clear instruction, nothing registered.
    bed.dovecot
        .deliver(USER, "INBOX", &fixtures()[1].1)
        .unwrap();
    let out = bed.run_once().await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("mailintake auth login"),
        "{}",
        text(&out)
    );

    let (status, stdout, stderr, redirect_uri) = browser_login(&bed).await;
    assert!(status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("Signed in as {USER}")),
        "{stdout}\n{stderr}"
    );
    let port = oauth2::url::Url::parse(&redirect_uri)
        .ok()
        .and_then(|u| u.port());
    assert!(
        port.is_some_and(|p| p != 0),
        "the redirect URI sent names no port: {redirect_uri:?}"
    );
    let first = stored_refresh_token(&bed)
        .await
        .expect("a refresh token is stored");
    assert_eq!(
        bed.idp.live_refresh_tokens("client-desktop"),
        vec![first.clone()]
    );

    // The worker refreshes: the rotated token replaces the stored one; the old one is gone.
    let out = bed.run_once().await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(bed.registry().await.list(None, 10).await.unwrap().len(), 1);
    let second = stored_refresh_token(&bed).await.unwrap();
    assert_ne!(second, first, "the rotated refresh token was not stored");
    assert_eq!(
        bed.idp.live_refresh_tokens("client-desktop"),
        vec![second.clone()]
    );
    // The token at rest is not the token in clear.
    let row = bed
        .registry()
        .await
        .credential_token("user")
        .await
        .unwrap()
        .unwrap();
    assert!(!row.ciphertext.contains(&second));

    // A new process (a restart) uses the new one, and rotates again.
    bed.dovecot
        .deliver(USER, "INBOX", &fixtures()[2].1)
        .unwrap();
    let refreshes = bed.idp.refresh_requests();
    let out = bed.run_once().await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(bed.idp.refresh_requests(), refreshes + 1);
    let third = stored_refresh_token(&bed).await.unwrap();
    assert_ne!(third, second);
    assert_eq!(bed.registry().await.list(None, 10).await.unwrap().len(), 2);

    // auth status shows the signed-in account.
    let status = bed.command(&["auth", "status"], &[]).await;
    assert!(
        String::from_utf8_lossy(&status.stdout).contains(&format!("signed in as {USER}")),
        "{}",
        text(&status)
    );
}

/// Any local process can reach the login's loopback listener: an error answer without this
/// login's `state` is turned away and the login goes on; the real answer then signs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_error_answer_does_not_end_the_login() {
    let bed = delegated_bed("entra-delegated", "http://localhost/").await;
    let mut login = Interactive::spawn(&bed, &["auth", "login", "podatelna"]);
    let url = login.until(|l| l.trim().starts_with("http").then(|| l.trim().to_owned()));
    let redirect_uri = oauth2::url::Url::parse(&url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "redirect_uri")
        .map(|(_, v)| v.into_owned())
        .unwrap();
    let http = oauth2::reqwest::Client::builder()
        .redirect(oauth2::reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for forged in ["error=access_denied&state=forged", "error=access_denied"] {
        let answer = http
            .get(format!("{redirect_uri}?{forged}&error_description=no"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status().as_u16(), 400, "{forged}");
        assert!(answer.text().await.unwrap().contains("does not belong"));
    }
    let answer = http.get(&url).send().await.unwrap();
    assert_eq!(answer.status().as_u16(), 302);
    let location = answer.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(
        http.get(&location).send().await.unwrap().status().as_u16(),
        200
    );
    let (status, stdout, stderr) = login.finish().await;
    assert!(status.success(), "{stdout}\n{stderr}");
    registers_one(&bed).await;
}

/// A delegated bed signed in by `auth login`, a connection to its registry database, and the
/// credentials as a running service holds them (a token kept in memory lives there).
async fn signed_in_service() -> (
    Bed,
    sqlx::SqliteConnection,
    mailintake::credentials::Credentials,
) {
    use sqlx::Connection as _;
    let bed = delegated_bed("entra-delegated", "http://localhost/").await;
    let (status, stdout, stderr, _) = browser_login(&bed).await;
    assert!(status.success(), "{stdout}\n{stderr}");
    let db = sqlx::SqliteConnection::connect(&bed.database_url())
        .await
        .unwrap();
    let config = mailintake::config::Config::load(&bed.config).unwrap();
    let store = TokenStore::new(bed.registry().await, TokenKey::parse(KEY_HEX).unwrap());
    let credentials =
        mailintake::credentials::Credentials::from_config(&config, Some(store)).unwrap();
    (bed, db, credentials)
}

/// Makes the token store refuse every write (as a locked database or a full disk would), or
/// take them again.
async fn refuse_token_writes(db: &mut sqlx::SqliteConnection, refuse: bool) {
    for event in ["INSERT", "UPDATE"] {
        let sql = if refuse {
            format!(
                "CREATE TRIGGER refuse_token_{event} BEFORE {event} ON credential_tokens \
                 BEGIN SELECT RAISE(ABORT, 'refused for the test'); END"
            )
        } else {
            format!("DROP TRIGGER refuse_token_{event}")
        };
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut *db)
            .await
            .unwrap();
    }
}

/// A rotating provider revokes the old refresh token when it issues a new one. If the store
/// cannot take the new one (database locked, disk full), the access token is still used and the
/// new refresh token is kept in memory: the next refresh uses it, and it is stored once the
/// store takes writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_refresh_token_the_store_refuses_is_kept_and_stored_later() {
    let (bed, mut db, credentials) = signed_in_service().await;
    let first = stored_refresh_token(&bed).await.unwrap();
    refuse_token_writes(&mut db, true).await;
    // Two refreshes while the store refuses: each rotates, the second with the token the first
    // got (the stored one is revoked by then).
    for round in 1..=2 {
        credentials.invalidate("user").await;
        let login = credentials.login("user", USER).await;
        assert!(login.is_ok(), "round {round}: {:?}", login.err());
    }
    assert_eq!(
        stored_refresh_token(&bed).await.as_deref(),
        Some(first.as_str())
    );
    assert!(
        !bed.idp
            .live_refresh_tokens("client-desktop")
            .contains(&first),
        "the stored one is revoked"
    );
    refuse_token_writes(&mut db, false).await;
    credentials.invalidate("user").await;
    credentials.login("user", USER).await.unwrap();
    let stored = stored_refresh_token(&bed).await.unwrap();
    assert_eq!(
        bed.idp.live_refresh_tokens("client-desktop"),
        vec![stored],
        "the newest refresh token is the stored one"
    );
    // And a new process (a restart) goes on with it.
    registers_one(&bed).await;
}

/// The registry that keeps the refresh tokens cannot be reached (here its connections are
/// closed, as a database restart leaves them): a temporary failure, so the scheduler polls again
/// at its next tick instead of backing off as for a fault an administrator must fix. A stored
/// token that cannot be decrypted (another key) is such a fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_store_that_cannot_be_reached_is_a_temporary_failure() {
    use mailintake::credentials::{CredentialError, Credentials};
    let bed = delegated_bed("entra-delegated", "http://localhost/").await;
    let (status, stdout, stderr, _) = browser_login(&bed).await;
    assert!(status.success(), "{stdout}\n{stderr}");
    let config = mailintake::config::Config::load(&bed.config).unwrap();
    let registry = bed.registry().await;
    let store = TokenStore::new(registry.clone(), TokenKey::parse(KEY_HEX).unwrap());
    let credentials = Credentials::from_config(&config, Some(store)).unwrap();
    registry.close().await;
    let unreachable = credentials.login("user", USER).await.err().unwrap();
    assert!(
        matches!(unreachable, CredentialError::Store { .. }),
        "{unreachable}"
    );
    assert!(unreachable.is_transient(), "{unreachable}");

    let other_key = TokenKey::parse(&KEY_HEX.replace('0', "f")).unwrap();
    let store = TokenStore::new(bed.registry().await, other_key);
    let credentials = Credentials::from_config(&config, Some(store)).unwrap();
    let undecryptable = credentials.login("user", USER).await.err().unwrap();
    assert!(
        matches!(undecryptable, CredentialError::Store { .. }),
        "{undecryptable}"
    );
    assert!(!undecryptable.is_transient(), "{undecryptable}");
}

/// Two workers on one registry (two processes, each with its own pool and cache) whose access
/// tokens run out together refresh the same delegated credential at once, against a slow
/// provider that rotates refresh tokens and refuses a used one. They take turns: each exchanges
/// the refresh token the other stored, neither is refused, and the newest one is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_refreshing_one_delegated_credential_at_once_take_turns() {
    let (bed, _db, first) = signed_in_service().await;
    let config = mailintake::config::Config::load(&bed.config).unwrap();
    let store = TokenStore::new(bed.registry().await, TokenKey::parse(KEY_HEX).unwrap());
    let second = mailintake::credentials::Credentials::from_config(&config, Some(store)).unwrap();
    bed.idp.set_token_delay(Duration::from_millis(400));
    for round in 1..=2 {
        first.invalidate("user").await;
        second.invalidate("user").await;
        let before = bed.idp.refresh_requests();
        let (a, b) = tokio::join!(first.login("user", USER), second.login("user", USER));
        assert!(a.is_ok(), "round {round}, first worker: {:?}", a.err());
        assert!(b.is_ok(), "round {round}, second worker: {:?}", b.err());
        assert_eq!(bed.idp.refresh_requests() - before, 2, "round {round}");
        let stored = stored_refresh_token(&bed).await.unwrap();
        assert_eq!(
            bed.idp.live_refresh_tokens("client-desktop"),
            vec![stored],
            "round {round}: the newest refresh token is the stored one"
        );
    }
    bed.idp.set_token_delay(Duration::ZERO);
    registers_one(&bed).await;
}

/// An administrator's `auth login` (here as another user, as when the mailbox's delegate
/// changes) that finishes while a worker is refreshing the old sign-in, against a slow provider:
/// the login waits for the worker to store its rotated token, then stores the new sign-in over
/// it. Without taking turns the worker's rotated token of the old sign-in, stored last, would
/// replace the new sign-in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_in_stored_during_a_refresh_of_the_old_one_wins() {
    const DELEGATE: &str = "spisovna@urad.example";
    let (bed, _db, worker) = signed_in_service().await;
    bed.idp.add_user(TENANT, DELEGATE);
    bed.idp.set_signed_in_user(DELEGATE);
    bed.idp.set_token_delay(Duration::from_secs(2));
    worker.invalidate("user").await;
    let asked = bed.idp.token_requests();
    let refresh = tokio::spawn(async move { worker.login("user", USER).await.map(|_| ()) });
    // Once the worker's refresh is at the provider, the sign-in goes through at full speed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while bed.idp.token_requests() == asked {
        assert!(
            Instant::now() < deadline,
            "the worker never asked for a token"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    bed.idp.set_token_delay(Duration::ZERO);
    let (status, stdout, stderr, _) = browser_login(&bed).await;
    assert!(status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("Signed in as {DELEGATE}")),
        "{stdout}"
    );
    refresh.await.unwrap().unwrap();
    let stored = stored_refresh_token(&bed).await.unwrap();
    assert_eq!(
        bed.idp
            .refresh_token_user(&stored)
            .map(|u| u.to_ascii_lowercase()),
        Some(DELEGATE.to_owned()),
        "the stored refresh token is the new sign-in's"
    );
    assert_eq!(
        bed.idp.live_refresh_tokens("client-desktop").len(),
        2,
        "the worker's rotated token of the old sign-in is live too, but not stored"
    );
}

/// A token kept in memory (the store refused it) gives way to a newer sign-in: an
/// administrator's `auth login` stored meanwhile is what the next refresh uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_sign_in_wins_over_a_refresh_token_kept_in_memory() {
    let (bed, mut db, credentials) = signed_in_service().await;
    refuse_token_writes(&mut db, true).await;
    credentials.login("user", USER).await.unwrap(); // rotated, kept in memory
    let kept = bed.idp.live_refresh_tokens("client-desktop");
    assert_eq!(kept.len(), 1);
    refuse_token_writes(&mut db, false).await;
    // Stored_at has one-second steps at most: make the new sign-in's visibly later.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, stdout, stderr, _) = browser_login(&bed).await;
    assert!(status.success(), "{stdout}\n{stderr}");
    let signed_in = stored_refresh_token(&bed).await.unwrap();
    credentials.invalidate("user").await;
    credentials.login("user", USER).await.unwrap();
    let live = bed.idp.live_refresh_tokens("client-desktop");
    assert!(
        !live.contains(&signed_in),
        "the new sign-in's token was used (and rotated)"
    );
    assert!(live.contains(&kept[0]), "the kept one was not used");
    let stored = stored_refresh_token(&bed).await.unwrap();
    assert!(live.contains(&stored) && stored != kept[0], "{live:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegated_device_code_for_headless_servers() {
    let bed = delegated_bed("entra-delegated", "http://localhost/").await;
    bed.idp.set_device_interval(0);
    let mut login = Interactive::spawn(&bed, &["auth", "login", "podatelna", "--device-code"]);
    let code = login.until(|l| {
        l.split_whitespace()
            .skip_while(|w| *w != "code")
            .nth(1)
            .map(str::to_owned)
    });
    bed.idp.approve_device_code(&code, USER);
    let (status, stdout, stderr) = login.finish().await;
    assert!(status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("Signed in as {USER}")), "{stdout}");
    registers_one(&bed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_oauth2_provider_with_oauthbearer() {
    // A fixed port in the redirect URI: the login listens on exactly that one and sends it.
    let fixed = format!("http://localhost:{}/", fixed_port());
    let bed = delegated_bed("oauth2", &fixed).await;
    let (status, stdout, stderr, redirect_uri) = browser_login(&bed).await;
    assert!(status.success(), "{stdout}\n{stderr}");
    assert_eq!(redirect_uri, fixed);
    registers_one(&bed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_with_authenticate_plain_and_with_login() {
    for mechanism in ["plain", "login"] {
        let mut bed = Bed::start_with_passwords(&[(USER, "on-prem-pass")]).await;
        let pw = bed.file("pw", b"on-prem-pass\n");
        bed.credentials_toml = format!(
            "[credentials.onprem]\nkind = \"password\"\npassword_file = \"{}\"\nmechanism = \"{mechanism}\"\n",
            pw.display()
        );
        bed.configure(&[mailbox_with("onprem")]);
        registers_one(&bed).await;
    }
}

// ---- 3. diagnoses ------------------------------------------------------------------------------

fn app_bed_toml(bed: &Bed, client: &str, secret_file: &std::path::Path) -> String {
    format!(
        "[credentials.app]\nkind = \"entra-app-secret\"\nauthority = \"{}\"\ntenant_id = \"{TENANT}\"\n\
         client_id = \"{client}\"\nclient_secret_file = \"{}\"\n",
        bed.idp.authority(),
        secret_file.display()
    )
}

async fn app_bed(mailboxes: &[&str]) -> Bed {
    let mut bed = Bed::start().await;
    bed.idp
        .add_app(TENANT, "client-app", "right-secret", mailboxes);
    let secret = bed.file("app.secret", b"right-secret");
    bed.credentials_toml = app_bed_toml(&bed, "client-app", &secret);
    bed.configure(&[mailbox_with("app")]);
    bed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_every_step_and_speaks_json() {
    let bed = app_bed(&[USER]).await;
    bed.dovecot
        .deliver(USER, "INBOX", &fixtures()[0].1)
        .unwrap();
    let out = bed.command(&["check"], &[]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    for step in ["connect", "tls", "token", "authenticate", "select"] {
        assert!(stdout.contains(&format!("[ok  ] {step}")), "{stdout}");
    }
    assert!(stdout.contains("CN=localhost"), "{stdout}");
    assert!(stdout.contains("1 messages, 1 unseen"), "{stdout}");
    let out = bed.command(&["check", "podatelna", "--json"], &[]).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["ok"], true);
    assert_eq!(json[0]["steps"].as_array().unwrap().len(), 5);
    // check looks, never takes: the message is still unseen.
    assert!(bed.seen(USER, "INBOX").values().all(|s| !*s));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_aadsts_code_gets_its_own_diagnosis_and_check_fails() {
    let bed = app_bed(&[USER]).await;
    let cases: [(u64, &str); 9] = [
        (7000215, "the client secret is wrong"),
        (7000222, "the client secret has expired"),
        (700016, "does not exist in this tenant"),
        (90002, "the tenant was not found"),
        (65001, "admin consent for the permission is missing"),
        (700082, "expired after 90 days without use"),
        (50173, "the grant was revoked"),
        (9002325, "requires PKCE"),
        (1002012, "the requested scope is not valid"),
    ];
    for (code, meaning) in cases {
        bed.idp.fail_next_token_request("client-app", code);
        let out = bed.command(&["check", "podatelna"], &[]).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "AADSTS{code}: {}", text(&out));
        assert!(stdout.contains("[FAIL] token"), "AADSTS{code}: {stdout}");
        assert!(
            stdout.contains(&format!("AADSTS{code}")),
            "AADSTS{code}: {stdout}"
        );
        assert!(
            stdout.contains(meaning),
            "AADSTS{code} lacks {meaning:?}: {stdout}"
        );
        assert!(stdout.contains("fix:"), "{stdout}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_the_server_refuses_is_explained_claim_by_claim() {
    // The app may open no mailbox: the token is right, Exchange lacks the service principal.
    let bed = app_bed(&[]).await;
    let out = bed.command(&["check", "podatelna"], &[]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(stdout.contains("[FAIL] authenticate"), "{stdout}");
    let sp = bed.idp.service_principal_id("client-app");
    assert!(
        stdout.contains(&format!(
            "New-ServicePrincipal -AppId client-app -ObjectId {sp}"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "Add-MailboxPermission -Identity \"{USER}\" -User {sp} -AccessRights FullAccess"
        )),
        "{stdout}"
    );
    assert!(stdout.contains("ImapEnabled"), "{stdout}");

    // The app lacks the IMAP.AccessAsApp role: named as the cause.
    let bed = app_bed(&[USER]).await;
    bed.idp.set_app_roles("client-app", &[]);
    let out = bed.command(&["check", "podatelna"], &[]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout.contains("lack IMAP.AccessAsApp"), "{stdout}");

    // A token for another audience.
    let bed = app_bed(&[USER]).await;
    bed.idp
        .set_token_audience("client-app", "https://graph.microsoft.com");
    let out = bed.command(&["check", "podatelna"], &[]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("audience"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_are_called_temporary_not_credential_problems() {
    let mut bed = app_bed(&[USER]).await;
    bed.idp.set_down(true);
    let out = bed.command(&["check", "podatelna"], &[]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout.contains("[TEMP] token"), "{stdout}");
    assert!(stdout.contains("not a credential problem"), "{stdout}");
    bed.idp.set_down(false);
    bed.dovecot.stop().unwrap();
    let out = bed.command(&["check", "podatelna"], &[]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout.contains("[TEMP] connect"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_answer_oauth2_cannot_parse_is_reported_without_its_tokens() {
    const TOKEN: &str = "quirkTOKENq";
    let bed = app_bed(&[USER]).await;
    bed.idp.set_token_prefix(TOKEN);
    // A successful answer, tokens included, with `expires_in` as a string.
    bed.idp.set_expires_in_as_string(true);
    let trace = [("MAILINTAKE_LOG", "trace"), ("RUST_LOG", "trace")];
    for args in [
        &["check", "podatelna"][..],
        &["check", "podatelna", "--json"],
    ] {
        let out = bed.command(args, &trace).await;
        let all = text(&out);
        assert_eq!(out.status.code(), Some(1), "{all}");
        assert!(all.contains("not an OAuth2 token response"), "{all}");
        assert!(
            all.contains("expires_in") && all.contains("access_token"),
            "{all}"
        );
        assert!(!all.contains(TOKEN), "the token leaked:\n{all}");
    }
    let out = bed.run_once_env(&trace).await;
    assert!(
        !text(&out).contains(TOKEN),
        "the token leaked:\n{}",
        text(&out)
    );

    // An absurd lifetime (u64::MAX seconds) is believed for a day at most: no overflow, the
    // token is used.
    bed.idp.set_expires_in_as_string(false);
    bed.idp.set_token_lifetime(u64::MAX);
    registers_one(&bed).await;
}

// ---- 4. canary ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_any_output_even_at_trace_level() {
    const SECRET: &str = "canary-secret-Zq81";
    const TOKEN: &str = "canaryTOKENx";
    let mut bed = Bed::start_with_passwords(&[("archiv@urad.example", "canary-password-77")]).await;
    bed.idp.set_token_prefix(TOKEN);
    bed.idp.add_app(TENANT, "client-app", SECRET, &[USER]);
    let secret = bed.file("app.secret", SECRET.as_bytes());
    let pw = bed.file("pw", b"canary-password-77");
    bed.credentials_toml = format!(
        "{}\n[credentials.pw]\nkind = \"password\"\npassword_file = \"{}\"\n",
        app_bed_toml(&bed, "client-app", &secret),
        pw.display()
    );
    let mut archiv = MailboxSpec::new("archiv", "archiv@urad.example", "unused", "unused");
    archiv.credential_name = Some("pw".into());
    bed.configure(&[mailbox_with("app"), archiv]);
    bed.dovecot
        .deliver(USER, "INBOX", &fixtures()[0].1)
        .unwrap();
    bed.dovecot
        .deliver("archiv@urad.example", "INBOX", &fixtures()[1].1)
        .unwrap();
    let trace = [("MAILINTAKE_LOG", "trace"), ("RUST_LOG", "trace")];
    let mut outputs = vec![bed.run_once_env(&trace).await];
    outputs.push(bed.command(&["check"], &trace).await);
    outputs.push(bed.command(&["check", "--json"], &trace).await);
    outputs.push(bed.command(&["check-config"], &trace).await);
    assert!(outputs[0].status.success(), "{}", text(&outputs[0]));
    // The XOAUTH2 initial response as it goes over the wire, base64: a prefix of it is enough.
    let sasl = format!("user={USER}\x01auth=Bearer {TOKEN}");
    let whole = sasl.len() / 3 * 3;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&sasl.as_bytes()[..whole]);
    for out in &outputs {
        let all = text(out);
        for canary in [SECRET, TOKEN, "canary-password-77", &b64] {
            assert!(!all.contains(canary), "{canary:?} leaked:\n{all}");
        }
    }
    // Debug output of the loaded configuration shows no secret either.
    let config = mailintake::config::Config::load(&bed.config).unwrap();
    let debug = format!("{config:?}");
    assert!(
        !debug.contains(SECRET) && !debug.contains("canary-password"),
        "{debug}"
    );
}

// ---- 5. single-flight ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_mailboxes_sharing_an_app_cause_one_token_request() {
    let mut bed = Bed::start().await;
    let addresses: Vec<String> = (0..200)
        .map(|i| format!("box{i:03}@urad.example"))
        .collect();
    let refs: Vec<&str> = addresses.iter().map(String::as_str).collect();
    bed.idp
        .add_app(TENANT, "client-shared", "shared-secret", &refs);
    let secret = bed.file("shared.secret", b"shared-secret");
    bed.credentials_toml = app_bed_toml(&bed, "client-shared", &secret)
        .replace("[credentials.app]", "[credentials.shared]");
    let specs: Vec<MailboxSpec> = addresses
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let id: &'static str = Box::leak(format!("box{i:03}").into_boxed_str());
            let addr: &'static str = Box::leak(a.clone().into_boxed_str());
            let mut mb = MailboxSpec::new(id, addr, "unused", "unused");
            mb.credential_name = Some("shared".into());
            mb
        })
        .collect();
    bed.configure(&specs);
    let raw = &fixtures()[0].1;
    for a in &addresses {
        bed.dovecot.deliver(a, "INBOX", raw).unwrap();
    }
    let before = bed.idp.token_requests();
    let out = bed.run_once().await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        bed.idp.token_requests() - before,
        1,
        "one token request for 200 mailboxes"
    );
    assert_eq!(
        bed.registry().await.list(None, 1000).await.unwrap().len(),
        200
    );
}

// ---- expiry before it bites ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiring_secrets_and_certificates_are_warned_about_in_check_status_and_the_worker_log() {
    let mut bed = Bed::start().await;
    bed.idp
        .add_app(TENANT, "client-app", "right-secret", &[USER]);
    let (cert, key) = IdentityPlatform::make_test_certificate("soon-expiring", 5);
    bed.idp
        .add_app_certificate(TENANT, "client-cert", &cert, &["archiv@urad.example"]);
    let secret = bed.file("app.secret", b"right-secret");
    let pem = bed.file("app.pem", format!("{cert}{key}").as_bytes());
    let in_20_days = (chrono::Local::now() + chrono::Duration::days(20)).format("%Y-%m-%d");
    bed.credentials_toml = format!(
        "{}client_secret_expires = \"{in_20_days}\"\n\n[credentials.cert]\nkind = \"entra-app-certificate\"\n\
         authority = \"{}\"\ntenant_id = \"{TENANT}\"\nclient_id = \"client-cert\"\ncertificate_file = \"{}\"\n",
        app_bed_toml(&bed, "client-app", &secret),
        bed.idp.authority(),
        pem.display()
    );
    let mut archiv = MailboxSpec::new("archiv", "archiv@urad.example", "unused", "unused");
    archiv.credential_name = Some("cert".into());
    bed.configure(&[mailbox_with("app"), archiv]);

    let check = bed.command(&["check"], &[]).await;
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(
        stdout.contains("credential app: client secret expires within 30 days"),
        "{stdout}"
    );
    assert!(
        stdout.contains("certificate CN=soon-expiring expires within 7 days"),
        "{stdout}"
    );
    let status = bed.command(&["auth", "status"], &[]).await;
    let out = String::from_utf8_lossy(&status.stdout);
    assert_eq!(
        status.status.code(),
        Some(1),
        "warnings make status fail: {out}"
    );
    assert!(
        out.contains("within 30 days") && out.contains("within 7 days"),
        "{out}"
    );
    let run = bed.run_once().await;
    assert!(run.status.success(), "{}", text(&run));
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(
        log.contains("WARN") && log.contains("expires within 7 days"),
        "{log}"
    );
}
