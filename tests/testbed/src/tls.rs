//! A throw-away CA and a `localhost` server certificate, made with the `openssl` CLI.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

/// Paths of the generated PEM files.
#[derive(Debug, Clone)]
pub(crate) struct Certificates {
    /// The CA certificate clients must trust.
    pub ca_cert: PathBuf,
    /// The server certificate (CN and SAN `localhost`, SAN IP `127.0.0.1`).
    pub server_cert: PathBuf,
    /// The server's private key.
    pub server_key: PathBuf,
}

const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no

[dn]
CN = placeholder

[ca_ext]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
";

/// Creates a CA and a server certificate signed by it in `dir` (P-256 keys, valid for
/// two days from now).
pub(crate) fn generate(dir: &Path) -> anyhow::Result<Certificates> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cnf = dir.join("openssl.cnf");
    std::fs::write(&cnf, OPENSSL_CNF).with_context(|| format!("writing {}", cnf.display()))?;
    let certs = Certificates {
        ca_cert: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
    };
    let ca_key = dir.join("ca.key");
    openssl(&[
        "req".as_ref(),
        "-x509".as_ref(),
        "-new".as_ref(),
        "-config".as_ref(),
        cnf.as_os_str(),
        "-newkey".as_ref(),
        "ec".as_ref(),
        "-pkeyopt".as_ref(),
        "ec_paramgen_curve:prime256v1".as_ref(),
        "-nodes".as_ref(),
        "-days".as_ref(),
        "2".as_ref(),
        "-subj".as_ref(),
        "/CN=mailintake-testbed throw-away CA".as_ref(),
        "-extensions".as_ref(),
        "ca_ext".as_ref(),
        "-keyout".as_ref(),
        ca_key.as_os_str(),
        "-out".as_ref(),
        certs.ca_cert.as_os_str(),
    ])
    .context("creating the throw-away CA")?;
    openssl(&[
        "req".as_ref(),
        "-x509".as_ref(),
        "-new".as_ref(),
        "-config".as_ref(),
        cnf.as_os_str(),
        "-newkey".as_ref(),
        "ec".as_ref(),
        "-pkeyopt".as_ref(),
        "ec_paramgen_curve:prime256v1".as_ref(),
        "-nodes".as_ref(),
        "-days".as_ref(),
        "2".as_ref(),
        "-subj".as_ref(),
        "/CN=localhost".as_ref(),
        "-CA".as_ref(),
        certs.ca_cert.as_os_str(),
        "-CAkey".as_ref(),
        ca_key.as_os_str(),
        "-extensions".as_ref(),
        "server_ext".as_ref(),
        "-keyout".as_ref(),
        certs.server_key.as_os_str(),
        "-out".as_ref(),
        certs.server_cert.as_os_str(),
    ])
    .context("creating the server certificate")?;
    Ok(certs)
}

fn openssl(args: &[&std::ffi::OsStr]) -> anyhow::Result<()> {
    let output = Command::new(openssl_binary())
        .args(args)
        .output()
        .context("running openssl (is /usr/bin/openssl installed?)")?;
    if !output.status.success() {
        bail!(
            "openssl {:?} failed ({}): {}",
            args,
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn openssl_binary() -> PathBuf {
    std::env::var_os("MAILINTAKE_TESTBED_OPENSSL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("openssl"))
}
