//! mailintake command line: parsing and dispatch only.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use mailintake::cli;

#[derive(Parser)]
#[command(
    name = "mailintake",
    version,
    about = "Turns mailboxes into a registry"
)]
struct Args {
    /// Configuration file.
    #[arg(
        long,
        short,
        env = "MAILINTAKE_CONFIG",
        default_value = "/etc/mailintake/mailintake.toml",
        global = true
    )]
    config: PathBuf,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Poll the mailboxes on their schedules until SIGINT/SIGTERM.
    Run {
        /// Poll every mailbox once and exit: 0 only if every mailbox succeeded.
        #[arg(long)]
        once: bool,
    },
    /// Validate the configuration and exit (what the systemd unit runs before starting).
    CheckConfig,
    /// Look into the registry.
    Registry {
        #[command(subcommand)]
        command: RegistryCommand,
    },
}

#[derive(Subcommand)]
enum RegistryCommand {
    /// Registered messages, newest first.
    List {
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
}

const EXIT_FAILED: u8 = 1;
const EXIT_CONFIG: u8 = 2;

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MAILINTAKE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    if let Command::CheckConfig = args.command {
        return match cli::check_config::run(&args.config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        };
    }
    let config = match mailintake::config::Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let result: anyhow::Result<bool> = runtime.block_on(async {
        match args.command {
            Command::Run { once: true } => cli::run::once(config).await,
            Command::Run { once: false } => cli::run::forever(config).await.map(|()| true),
            Command::Registry {
                command: RegistryCommand::List { limit },
            } => cli::registry::list(&config, limit).await.map(|()| true),
            Command::CheckConfig => Ok(true),
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_FAILED),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}
