//! Structured logs on stderr, filtered by `MAILINTAKE_LOG` (default `info`).

use tracing::Level;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer as _, fmt};

/// Whether an event may be written at all, whatever `MAILINTAKE_LOG` asks for: async-imap logs
/// every protocol line at DEBUG/TRACE, including SASL responses (bearer tokens) and LOGIN
/// passwords, and message bodies; those never reach a log.
pub fn allowed(target: &str, level: &Level) -> bool {
    let protocol_dump = target.starts_with("async_imap") || target.starts_with("imap_proto");
    !(protocol_dump && *level > Level::INFO)
}

/// Installs the subscriber. Its most verbose level (`info` unless `MAILINTAKE_LOG` asks for
/// more) is also the `log` crate's maximum, which the `log` bridge takes from the subscriber's
/// hint: a dependency's `log::trace!` arguments are evaluated whenever that maximum allows the
/// level, before any filter sees the record. Without the hint it was TRACE, and async-imap
/// checked its whole receive buffer as UTF-8 for a trace line each time it decoded a response,
/// every fetched message included (2.7% of the client's CPU on the e-filing benchmark, on the
/// fetch path).
pub fn init(json: bool) {
    let filter =
        EnvFilter::try_from_env("MAILINTAKE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let most = filter.max_level_hint().unwrap_or(LevelFilter::TRACE);
    let guard =
        filter_fn(move |meta| *meta.level() <= most && allowed(meta.target(), meta.level()))
            .with_max_level_hint(most);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = if json {
        fmt::layer().json().with_writer(std::io::stderr).boxed()
    } else {
        fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .boxed()
    };
    let _ = tracing_subscriber::registry()
        .with(layer.with_filter(filter).with_filter(guard))
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::allowed;
    use tracing::Level;

    #[test]
    fn imap_protocol_dumps_are_never_logged() {
        assert!(!allowed("async_imap::imap_stream", &Level::TRACE));
        assert!(!allowed("async_imap", &Level::DEBUG));
        assert!(allowed("async_imap", &Level::WARN));
        assert!(allowed("mailintake::poll", &Level::TRACE));
    }
}
