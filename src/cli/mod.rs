//! Command-line commands, one file each. `main.rs` only parses and dispatches.

pub mod auth;
pub mod check;
pub mod check_config;
pub mod logging;
pub mod registry;
pub mod run;
