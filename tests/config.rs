//! Bad configuration is rejected at start with the file, the line, the key and what to do.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use mailintake::config::{AfterAction, Config, ConfigError, SecretEnv, TlsMode};

struct FakeEnv(HashMap<&'static str, &'static str>);

impl SecretEnv for FakeEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).map(|v| v.to_string())
    }
    fn credentials_directory(&self) -> Option<PathBuf> {
        None
    }
}

fn env() -> FakeEnv {
    FakeEnv(HashMap::from([
        ("MAILINTAKE_PODATELNA_SECRET", "s3cret"),
        (
            "MAILINTAKE_TOKEN_KEY",
            "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
        ),
    ]))
}

const GOOD: &str = r#"
data_dir = "data"

[credentials.app]
kind = "entra-app-secret"
tenant_id = "t1"
client_id = "c1"
client_secret_env = "MAILINTAKE_PODATELNA_SECRET"

[[mailbox]]
id = "podatelna"
address = "podatelna@urad.example"
host = "outlook.office365.com"
after = "move:Registered"
credential = "app"
"#;

fn problems(text: &str) -> Vec<mailintake::config::Problem> {
    match Config::parse(Path::new("/etc/mailintake/test.toml"), text, &env()) {
        Err(ConfigError::Invalid { problems, .. }) => problems,
        Err(other) => panic!("expected validation problems, got {other}"),
        Ok(_) => panic!("expected the configuration to be rejected"),
    }
}

#[test]
fn the_example_configuration_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mailintake.example.toml");
    let config = Config::load_with(&path, &env()).expect("example config must load");
    let mb = &config.mailboxes[0];
    assert_eq!(mb.port, 993);
    assert_eq!(mb.tls, TlsMode::Implicit);
    assert_eq!(mb.folder, "INBOX");
    assert_eq!(mb.after, AfterAction::Seen);
    assert!(config.database_url.starts_with("sqlite://"));
}

#[test]
fn defaults_and_relative_paths() {
    let c = Config::parse(Path::new("/etc/mailintake/test.toml"), GOOD, &env()).unwrap();
    assert_eq!(c.data_dir, PathBuf::from("/etc/mailintake/data"));
    assert_eq!(
        c.database_url,
        "sqlite:///etc/mailintake/data/registry.sqlite3"
    );
    let mb = &c.mailboxes[0];
    assert_eq!(mb.after, AfterAction::Move("Registered".into()));
    // Default schedule: every minute at second 0.
    assert_eq!(mb.schedule.to_string(), "0 * * * * *");
}

#[test]
fn unknown_key_is_rejected_with_its_line() {
    let text = GOOD.replace("after = ", "afterr = \"seen\"\nafter = ");
    let err = Config::parse(Path::new("/x/test.toml"), &text, &env()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ConfigError::Syntax { .. }), "{msg}");
    assert!(msg.contains("/x/test.toml"), "{msg}");
    assert!(msg.contains("afterr"), "{msg}");
    assert!(msg.contains("line 14"), "{msg}");
}

#[test]
fn bad_cron_names_line_key_and_fix() {
    let text = GOOD.replace("after = ", "schedule = \"every minute\"\nafter = ");
    let p = problems(&text);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].key, "mailbox[podatelna].schedule");
    assert_eq!(p[0].line, Some(14));
    assert!(p[0].fix.contains("seconds first"), "{:?}", p[0]);
}

#[test]
fn missing_secret_and_unknown_credential_are_both_reported() {
    let text = GOOD
        .replace("MAILINTAKE_PODATELNA_SECRET", "NOT_SET_ANYWHERE")
        .replace("credential = \"app\"", "credential = \"ap\"");
    let p = problems(&text);
    let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
    assert!(keys.contains(&"credentials.app.client_secret_env"), "{p:?}");
    assert!(keys.contains(&"mailbox[podatelna].credential"), "{p:?}");
    let secret = p
        .iter()
        .find(|p| p.key == "credentials.app.client_secret_env")
        .unwrap();
    assert!(secret.problem.contains("NOT_SET_ANYWHERE"));
    assert_eq!(secret.line, Some(8));
}

#[test]
fn secret_must_not_be_inline() {
    let text = GOOD.replace("client_secret_env", "client_secret");
    let err = Config::parse(Path::new("/x.toml"), &text, &env()).unwrap_err();
    assert!(err.to_string().contains("client_secret"), "{err}");
}

#[test]
fn plain_imap_only_to_loopback() {
    let text = GOOD.replace("after = ", "tls = \"plain\"\nafter = ");
    let p = problems(&text);
    assert_eq!(p[0].key, "mailbox[podatelna].tls");
    let loopback = text.replace("outlook.office365.com", "127.0.0.1");
    let c = Config::parse(Path::new("/x.toml"), &loopback, &env()).unwrap();
    assert_eq!(c.mailboxes[0].port, 143);
}

#[test]
fn check_config_command_exits_2_with_file_line_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mailintake.toml");
    std::fs::write(
        &path,
        GOOD.replace("after = \"move:Registered\"", "after = \"delete\""),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mailintake"))
        .args(["--config"])
        .arg(&path)
        .arg("check-config")
        .env("MAILINTAKE_PODATELNA_SECRET", "x")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:14", path.display())),
        "{stderr}"
    );
    assert!(stderr.contains("mailbox[podatelna].after"), "{stderr}");
    assert!(stderr.contains("move:<folder>"), "{stderr}");

    std::fs::write(&path, GOOD).unwrap();
    let ok = Command::new(env!("CARGO_BIN_EXE_mailintake"))
        .arg("--config")
        .arg(&path)
        .arg("check-config")
        .env("MAILINTAKE_PODATELNA_SECRET", "x")
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(stdout.contains("mailbox podatelna"), "{stdout}");
    assert!(!stdout.contains('x') || !stdout.contains("secret: x"));
}

#[test]
fn commit_mode_is_checked_and_batch_needs_room_for_one_crash() {
    let c = Config::parse(Path::new("/etc/mailintake/test.toml"), GOOD, &env()).unwrap();
    assert_eq!(c.commit, mailintake::pipeline::CommitMode::PerMessage);
    let batch = GOOD.replace(
        "data_dir = \"data\"\n",
        "data_dir = \"data\"\n[registry]\ncommit = \"batch\"\n",
    );
    let c = Config::parse(Path::new("/etc/mailintake/test.toml"), &batch, &env()).unwrap();
    assert_eq!(c.commit, mailintake::pipeline::CommitMode::PerBatch);

    let typo = GOOD.replace(
        "data_dir = \"data\"\n",
        "data_dir = \"data\"\n[registry]\ncommit = \"batches\"\n",
    );
    let p = problems(&typo);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].key, "registry.commit");
    assert_eq!(p[0].line, Some(4));
    assert!(p[0].problem.contains("\"batches\""), "{p:?}");

    let one_attempt = format!("{batch}\n[limits]\nmax_attempts = 1\n");
    let p = problems(&one_attempt);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].key, "registry.commit");
    assert!(p[0].problem.contains("max_attempts"), "{p:?}");
}

#[test]
fn delegated_redirect_uri_is_loopback_with_or_without_a_port() {
    let with = |uri: &str| {
        format!(
            "{GOOD}\n[secrets]\ntoken_key_env = \"MAILINTAKE_TOKEN_KEY\"\n\n[credentials.user]\nkind = \"entra-delegated\"\ntenant_id = \"t1\"\nclient_id = \"c2\"\nredirect_uri = \"{uri}\"\n"
        )
    };
    for ok in [
        "http://localhost:3017/",
        "http://localhost/",
        "http://127.0.0.1:8400/cb",
        "http://127.0.0.1",
    ] {
        let c = Config::parse(Path::new("/x.toml"), &with(ok), &env());
        assert!(c.is_ok(), "{ok}: {:?}", c.err().map(|e| e.to_string()));
    }
    for bad in [
        "https://login.example/cb",
        "http://localhost.evil.example/",
        "http://example.org:3017/",
    ] {
        let p = problems(&with(bad));
        assert_eq!(p.len(), 1, "{bad}: {p:?}");
        assert_eq!(p[0].key, "credentials.user.redirect_uri", "{p:?}");
        assert!(p[0].problem.contains("not a loopback"), "{p:?}");
    }
}

#[test]
fn a_providers_endpoints_must_be_https_urls() {
    let with = |token_url: &str| {
        format!(
            "{GOOD}\n[secrets]\ntoken_key_env = \"MAILINTAKE_TOKEN_KEY\"\n\n[credentials.google]\nkind = \"oauth2\"\nclient_id = \"c3\"\nauthorization_url = \"https://accounts.google.com/o/oauth2/v2/auth\"\ntoken_url = \"{token_url}\"\nscopes = [\"https://mail.google.com/\"]\n"
        )
    };
    for ok in [
        "https://oauth2.googleapis.com/token",
        "http://127.0.0.1:8080/token",
        "http://localhost/token",
    ] {
        let c = Config::parse(Path::new("/x.toml"), &with(ok), &env());
        assert!(c.is_ok(), "{ok}: {:?}", c.err().map(|e| e.to_string()));
    }
    for (bad, says) in [
        ("oauth2.googleapis.com/token", "not a URL"),
        ("http://oauth2.googleapis.com/token", "not an https:// URL"),
        ("ftp://idp.example/token", "not an https:// URL"),
    ] {
        let p = problems(&with(bad));
        assert_eq!(p.len(), 1, "{bad}: {p:?}");
        assert_eq!(p[0].key, "credentials.google.token_url", "{p:?}");
        assert!(p[0].problem.contains(says), "{bad}: {p:?}");
        assert!(p[0].line.is_some(), "{p:?}");
    }
    // Microsoft's authority likewise: no look-alike of a loopback name passes.
    let entra = |authority: &str| {
        GOOD.replace(
            "kind = \"entra-app-secret\"\n",
            &format!("kind = \"entra-app-secret\"\nauthority = \"{authority}\"\n"),
        )
    };
    for ok in [
        "https://login.microsoftonline.us",
        "http://127.0.0.1:8080",
        "http://[::1]:8080",
    ] {
        let c = Config::parse(Path::new("/x.toml"), &entra(ok), &env());
        assert!(c.is_ok(), "{ok}: {:?}", c.err().map(|e| e.to_string()));
    }
    for bad in [
        "http://localhost.evil.example",
        "http://127.attacker.example",
        "login.microsoftonline.com",
    ] {
        let p = problems(&entra(bad));
        assert_eq!(p.len(), 1, "{bad}: {p:?}");
        assert_eq!(p[0].key, "credentials.app.authority", "{p:?}");
    }
}

#[test]
fn a_secret_on_a_mistyped_line_is_not_echoed() {
    // `client_secret` is not a key (only `client_secret_env` / `_file` are): the TOML error
    // names the key and the line, never the line's text.
    let text = GOOD.replace(
        "client_secret_env = \"MAILINTAKE_PODATELNA_SECRET\"",
        "client_secret = \"Xk9-literal-secret-Q2\"",
    );
    let err = Config::parse(Path::new("/x/test.toml"), &text, &env()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ConfigError::Syntax { .. }), "{msg}");
    assert!(msg.contains("client_secret"), "{msg}");
    assert!(msg.contains("line 8"), "{msg}");
    assert!(!msg.contains("Xk9-literal-secret-Q2"), "{msg}");
}

#[test]
fn zero_timeouts_are_refused_and_huge_session_counts_capped() {
    let text = GOOD.replace(
        "data_dir = \"data\"",
        "data_dir = \"data\"\n[imap]\nio_timeout_secs = 0\nconnect_timeout_secs = 0",
    );
    // The [imap] table must come before the credentials' tables it would otherwise swallow.
    let p = problems(&text);
    let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        ["imap.connect_timeout_secs", "imap.io_timeout_secs"],
        "{p:?}"
    );
    let text = GOOD.replace(
        "data_dir = \"data\"",
        "data_dir = \"data\"\n[imap]\nmax_sessions = 18446744073709551615",
    );
    let c = Config::parse(Path::new("/x/test.toml"), &text, &env()).unwrap();
    assert_eq!(c.imap.max_sessions, 4096);
}

#[test]
fn the_bytes_in_flight_default_to_four_batches() {
    let parse = |imap: &str| {
        let text = GOOD.replace(
            "data_dir = \"data\"",
            &format!("data_dir = \"data\"\n[imap]\n{imap}"),
        );
        Config::parse(Path::new("/x/test.toml"), &text, &env())
            .unwrap()
            .imap
    };
    let default = parse("");
    assert_eq!(default.batch_max_bytes, 16 << 20);
    assert_eq!(default.in_flight_max_bytes, 64 << 20);
    assert_eq!(parse("batch_max_bytes = 1000").in_flight_max_bytes, 4000);
    let both = parse("batch_max_bytes = 1000\nin_flight_max_bytes = 1500");
    assert_eq!(both.in_flight_max_bytes, 1500);
}

/// A secret file that other users may read is accepted with a warning naming the key, the line,
/// the file and the fix, printed by `check-config`; a private one (0600) gives none.
#[test]
fn a_secret_file_others_may_read_is_warned_about() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client.secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let path = dir.path().join("mailintake.toml");
    std::fs::write(
        &path,
        GOOD.replace(
            "client_secret_env = \"MAILINTAKE_PODATELNA_SECRET\"",
            "client_secret_file = \"client.secret\"",
        ),
    )
    .unwrap();
    let check = || {
        Command::new(env!("CARGO_BIN_EXE_mailintake"))
            .arg("--config")
            .arg(&path)
            .arg("check-config")
            .output()
            .unwrap()
    };
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = Config::load_with(&path, &env()).unwrap();
    assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
    let warning = &config.warnings[0];
    assert!(
        warning.starts_with("credentials.app.client_secret_file, line 8: "),
        "{warning}"
    );
    assert!(warning.contains(&secret.display().to_string()), "{warning}");
    assert!(
        warning.contains("mode 0644") && warning.contains("chmod 600"),
        "{warning}"
    );
    assert!(!warning.contains("s3cret"), "{warning}");
    let out = check();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("warning: credentials.app.client_secret_file"),
        "{stdout}"
    );

    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(
        Config::load_with(&path, &env())
            .unwrap()
            .warnings
            .is_empty()
    );
    let stdout = String::from_utf8_lossy(&check().stdout).into_owned();
    assert!(!stdout.contains("warning"), "{stdout}");
}
