//! mailintake: turns mailboxes into a registry.
//!
//! Data flows one way: credentials → imap → raw store → parse → registry → imap acks, with
//! [`pipeline::ingest_one`] as the one seam every message passes through.

pub mod cli;
pub mod config;
pub mod credentials;
pub mod failpoint;
pub mod imap;
pub mod parse;
pub mod pipeline;
pub mod poll;
pub mod raw_store;
pub mod registry;
pub mod scheduler;
pub mod secret;
#[cfg(test)]
mod test_data;
pub mod x509;
