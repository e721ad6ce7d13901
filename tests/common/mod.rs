//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod bed;
pub mod pg;
pub mod proxy;
pub mod tmpfs;

use std::path::PathBuf;

/// `../shared` beside the checkout (CI always has it; a user's clone may not). Tests that need
/// it print that they read it, or print why they skip.
pub fn shared_dir(test: &str, what: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("MAILINTAKE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    let path = dir.join(what);
    if path.exists() {
        eprintln!("{test}: reading shared material {}", path.display());
        Some(path)
    } else {
        eprintln!(
            "{test}: SKIPPED: {} is absent (the shared material sits beside the checkout in CI; set MAILINTAKE_SHARED to point at it)",
            path.display()
        );
        None
    }
}
