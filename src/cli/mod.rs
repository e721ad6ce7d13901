//! Command-line commands, one file each. `main.rs` only parses and dispatches.

pub mod check_config;
pub mod registry;
pub mod run;
