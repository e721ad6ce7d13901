//! Crash injection for the crash-point tests: `MAILINTAKE_FAILPOINT=<point>[:<n>]` makes the
//! process kill itself with SIGKILL the n-th time (default: first) it passes `<point>`;
//! `panic@<point>[:<n>]` makes it panic there instead (a bug, as the scheduler sees one).
//!
//! Points: `after-fetch` (a batch fetched, nothing stored), `after-raw-write` (raw blob durable,
//! not committed), `after-commit` (registration committed, not acknowledged), `mid-batch` (the
//! middle message of a batch committed, the rest of the batch not), `after-ack` (acknowledged on
//! the server, its rows not yet deleted), `between-parts` (a part of a message fetched in parts
//! written, the rest not fetched), `prepare` (a message's preparation begins; as
//! `panic@prepare:<n>`, the n-th message prepared panics, as a parser bug would), `gc-aside`
//! (`registry gc --delete` has moved a blob aside and not yet read its age).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

pub const ENV: &str = "MAILINTAKE_FAILPOINT";

static SPEC: OnceLock<Option<(String, u32)>> = OnceLock::new();
static HITS: AtomicU32 = AtomicU32::new(0);

fn spec() -> &'static Option<(String, u32)> {
    SPEC.get_or_init(|| {
        let raw = std::env::var(ENV).ok()?;
        let (name, nth) = match raw.split_once(':') {
            Some((name, n)) => (name.to_owned(), n.parse().unwrap_or(1)),
            None => (raw.clone(), 1),
        };
        tracing::warn!(point = %name, nth, "{ENV} is set: this process will kill itself there");
        Some((name, nth.max(1)))
    })
}

/// Announces the failpoint configuration at start (a no-op when unset).
pub fn init() {
    let _ = spec();
}

/// Passes the named point: kills the process with SIGKILL if it is the armed one.
pub fn hit(point: &str) {
    let Some((name, nth)) = spec() else {
        return;
    };
    let (panics, name) = match name.strip_prefix("panic@") {
        Some(name) => (true, name),
        None => (false, name.as_str()),
    };
    if name != point {
        return;
    }
    if HITS.fetch_add(1, Ordering::SeqCst) + 1 == *nth {
        if panics {
            panic!("failpoint {point}: panic");
        }
        eprintln!("failpoint {point}: SIGKILL");
        // SAFETY: kill(2) on our own pid with a valid signal number has no memory effects.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
