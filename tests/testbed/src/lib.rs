//! Real local servers for mailintake's tests and demo.
//!
//! * [`IdentityPlatform`] — an in-process stand-in for the Microsoft identity platform
//!   (Entra ID) v2 endpoints: client credentials (secret or certificate), authorization
//!   code with PKCE, rotating refresh tokens and the device code flow; JWT-shaped Exchange
//!   tokens; Entra's error shapes and `AADSTS` codes ([`AAD_ERRORS`]) with error
//!   injection; and a token validation endpoint for Dovecot.
//! * [`make_test_certificate`] / [`make_test_pkcs12`] — self-signed client certificates
//!   for certificate-credential tests.
//! * [`Dovecot`] — a private, real Dovecot IMAP server per test, with implicit TLS and
//!   STARTTLS under a throw-away CA, XOAUTH2/OAUTHBEARER checked against the
//!   [`IdentityPlatform`], optional password users, and `doveadm`-based helpers to deliver
//!   mail and inspect flags.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use mailintake_testbed::{Dovecot, IdentityPlatform};
//!
//! let idp = IdentityPlatform::start().await?;
//! idp.add_app("tenant-1", "client-1", "secret-1", &["podatelna@urad.example"]);
//! let dovecot = Dovecot::start(&idp).await?;
//! let uid = dovecot.deliver("podatelna@urad.example", "INBOX", b"Subject: hi\r\n\r\nbody\r\n")?;
//! // Point the product at idp.authority(), dovecot.host(), dovecot.imaps_port() and
//! // trust only dovecot.ca_file(); then check dovecot.flags(..) afterwards.
//! # let _ = uid;
//! # Ok(())
//! # }
//! ```

mod certs;
mod dovecot;
mod idp;
mod sysuser;
mod tls;

pub use certs::{make_test_certificate, make_test_pkcs12};
pub use dovecot::{Dovecot, DovecotOptions};
pub use idp::{
    AAD_ERRORS, AadErrorKind, DEFAULT_DEVICE_CODE_LIFETIME_SECS, DEFAULT_TOKEN_LIFETIME_SECS,
    EXCHANGE_APP_AUDIENCE, EXCHANGE_USER_AUDIENCE, IMAP_APP_ROLE, IMAP_USER_PERMISSION,
    IdentityPlatform, OUTLOOK_SCOPE, OUTLOOK_USER_SCOPE, aad_error_kind,
};
