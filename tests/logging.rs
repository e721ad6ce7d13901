//! The `log` bridge's maximum level follows `MAILINTAKE_LOG`. Its own process: the subscriber
//! and the `log` maximum are global.

#[test]
fn dependencies_log_calls_below_the_filter_are_not_evaluated() {
    // SAFETY: the only test in this binary; no other thread reads the environment.
    unsafe { std::env::remove_var("MAILINTAKE_LOG") };
    mailintake::cli::logging::init(false);
    // `log::trace!(..)` in a dependency (async-imap traces each decoded response's whole
    // buffer) evaluates its arguments only up to this level.
    assert_eq!(log::max_level(), log::LevelFilter::Info);
    assert!(!log::log_enabled!(target: "async_imap::imap_stream", log::Level::Trace));
    assert!(log::log_enabled!(target: "mailintake", log::Level::Info));
}
