//! Command-line commands, one file each. `main.rs` only parses and dispatches.

pub mod auth;
pub mod check;
pub mod check_config;
pub mod logging;
pub mod registry;
pub mod run;

/// The configured data dir's blob store, with the error every command gives when it cannot open.
pub(crate) fn open_store(
    config: &crate::config::Config,
) -> anyhow::Result<crate::raw_store::RawStore> {
    use anyhow::Context as _;
    crate::raw_store::RawStore::open(&config.data_dir)
        .with_context(|| format!("cannot open the data dir {}", config.data_dir.display()))
}
