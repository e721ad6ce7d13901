//! `mailintake-testbed up` — runs an identity platform stand-in and a private Dovecot for a
//! demo, until SIGINT/SIGTERM or end of stdin.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mailintake_testbed::{Dovecot, IdentityPlatform};
use tokio::io::AsyncReadExt as _;

#[derive(Parser)]
#[command(version, about = "Real local servers for mailintake's tests and demo")]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Start the identity platform stand-in and Dovecot, write DIR/testbed.json and
    /// DIR/client-secret, print `ready`, and run until SIGINT/SIGTERM or EOF on stdin.
    Up(UpArgs),
}

#[derive(clap::Args)]
struct UpArgs {
    /// Directory for testbed.json and client-secret (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// Directory whose *.eml files are delivered to the mailbox's INBOX, sorted by name.
    #[arg(long)]
    fixtures: Option<PathBuf>,
    /// The mailbox the app may open.
    #[arg(long, default_value = "podatelna@urad.example")]
    mailbox: String,
    /// Tenant id of the app registration.
    #[arg(long, default_value = "11111111-2222-3333-4444-555555555555")]
    tenant: String,
    /// Client id of the app registration.
    #[arg(long, default_value = "demo-client")]
    client_id: String,
    /// Client secret of the app registration.
    #[arg(long, default_value = "demo-secret")]
    client_secret: String,
    /// Do not stop at EOF on stdin (for running in the background with stdin from
    /// /dev/null); stop with SIGINT/SIGTERM only.
    #[arg(long)]
    ignore_stdin: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    match cli.command {
        Commands::Up(args) => runtime.block_on(up(args)),
    }
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let fixtures = match &args.fixtures {
        Some(dir) => eml_files(dir)?,
        None => Vec::new(),
    };

    let idp = IdentityPlatform::start().await?;
    idp.add_app(
        &args.tenant,
        &args.client_id,
        &args.client_secret,
        &[&args.mailbox],
    );
    let mut dovecot = Dovecot::start(&idp).await?;
    for path in &fixtures {
        let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let uid = dovecot
            .deliver(&args.mailbox, "INBOX", &raw)
            .with_context(|| format!("delivering {}", path.display()))?;
        eprintln!("delivered {} as UID {uid}", path.display());
    }

    let info = serde_json::json!({
        "authority": idp.authority(),
        "host": dovecot.host(),
        "imaps_port": dovecot.imaps_port(),
        "imap_port": dovecot.imap_port(),
        "ca_file": dovecot.ca_file(),
        "mailbox": args.mailbox,
        "tenant": args.tenant,
        "client_id": args.client_id,
        "dovecot_dir": dovecot.dir(),
    });
    write_atomically(
        &args.dir.join("client-secret"),
        args.client_secret.as_bytes(),
        0o600,
    )?;
    write_atomically(
        &args.dir.join("testbed.json"),
        format!("{}\n", serde_json::to_string_pretty(&info)?).as_bytes(),
        0o644,
    )?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "ready").context("writing to stdout")?;
        stdout.flush().context("flushing stdout")?;
    }

    let reason = wait_for_stop(args.ignore_stdin).await?;
    eprintln!("stopping ({reason})");
    let stopped = dovecot.stop();
    idp.shutdown().await;
    stopped
}

/// The `*.eml` files in `dir`, sorted by name.
fn eml_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        if path.extension().is_some_and(|ext| ext == "eml") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Writes via a temp file and rename, so readers never see a partial file.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(contents)
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(file);
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Waits for SIGINT, SIGTERM or (unless ignored) EOF on stdin; returns which.
async fn wait_for_stop(ignore_stdin: bool) -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let stdin_eof = async {
        if ignore_stdin {
            return std::future::pending().await;
        }
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 1024];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => return "end of stdin",
                Ok(_) => {}
            }
        }
    };
    Ok(tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
        reason = stdin_eof => reason,
    })
}
