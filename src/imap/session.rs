//! One authenticated IMAP session. Every network wait runs under a timeout; nothing here
//! reconnects behind the caller's back (a silent reselect would break UID bookkeeping).

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use async_imap::Authenticator;
use futures::StreamExt;
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::stream::ImapStream;
use super::{ImapError, uid_set};
use crate::config::TlsMode;
use crate::credentials::SaslLogin;

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Endpoint<'a> {
    pub host: &'a str,
    pub port: u16,
    pub tls: TlsMode,
    /// An extra root certificate (PEM) to trust besides the system store, e.g. an on-premises CA.
    pub ca_file: Option<&'a Path>,
    pub connect_timeout: Duration,
    pub io_timeout: Duration,
}

/// What a poll looks at: see [`MailSession::candidates`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Candidates {
    /// Every unseen message and every message above the high-water mark, sorted ascending.
    pub uids: Vec<u32>,
    /// The unseen ones among them, sorted ascending.
    pub unseen: Vec<u32>,
}

/// The state of a folder after SELECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selected {
    pub uidvalidity: u32,
    pub exists: u32,
    pub uid_next: Option<u32>,
}

/// One message as the server served it. It keeps the FETCH response it arrived in, so the
/// bytes are never copied out of the buffer they were received into.
pub struct Fetched {
    pub uid: u32,
    response: async_imap::types::Fetch,
}

impl Fetched {
    /// The message's raw bytes (`BODY[]`).
    pub fn raw(&self) -> &[u8] {
        self.response.body().unwrap_or_default()
    }
}

impl AsRef<[u8]> for Fetched {
    fn as_ref(&self) -> &[u8] {
        self.raw()
    }
}

impl std::fmt::Debug for Fetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetched")
            .field("uid", &self.uid)
            .field("bytes", &self.raw().len())
            .finish()
    }
}

pub struct MailSession {
    session: async_imap::Session<ImapStream>,
    io_timeout: Duration,
    has_move: bool,
    /// UIDPLUS (RFC 4315): `UID EXPUNGE`, for moving without MOVE.
    has_uidplus: bool,
}

/// A one-step SASL exchange: our response to the first (empty) challenge; on failure the server
/// may send an error challenge (XOAUTH2/OAUTHBEARER send JSON), answered with an empty response
/// (RFC 7628), after which it sends the tagged NO.
struct Sasl {
    response: Option<String>,
}

impl Sasl {
    fn new(response: String) -> Sasl {
        Sasl {
            response: Some(response),
        }
    }
}

impl Authenticator for Sasl {
    type Response = Vec<u8>;

    fn process(&mut self, _challenge: &[u8]) -> Vec<u8> {
        self.response
            .take()
            .map(String::into_bytes)
            .unwrap_or_default()
    }
}

/// A connection with the greeting read and TLS in place, not yet logged in.
pub struct Opened {
    client: async_imap::Client<ImapStream>,
    host: String,
    port: u16,
    /// The server's certificate (None for plain loopback connections).
    pub certificate: Option<PeerCertificate>,
}

/// What `check` shows of the server's certificate.
#[derive(Debug, Clone)]
pub struct PeerCertificate {
    pub subject: String,
    pub issuer: String,
    pub not_after: Option<chrono::DateTime<chrono::Utc>>,
}

fn peer_certificate(stream: &ImapStream) -> Option<PeerCertificate> {
    let ImapStream::Tls(tls) = stream else {
        return None;
    };
    let der = tls.peer_certificate().ok()??.to_der().ok()?;
    let cert = openssl::x509::X509::from_der(&der).ok()?;
    Some(PeerCertificate {
        subject: crate::x509::name(cert.subject_name()),
        issuer: crate::x509::name(cert.issuer_name()),
        not_after: crate::x509::to_chrono(cert.not_after()),
    })
}

/// TCP to the server, under the connect timeout.
pub async fn connect_tcp(ep: &Endpoint<'_>) -> Result<TcpStream, ImapError> {
    let addr = format!("{}:{}", ep.host, ep.port);
    let tcp = within(
        "connect",
        ep.connect_timeout,
        TcpStream::connect((ep.host, ep.port)),
        |source| ImapError::Connect {
            addr: addr.clone(),
            source,
        },
    )
    .await?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Greeting and TLS (implicit or STARTTLS) on a connected socket.
pub async fn establish(ep: &Endpoint<'_>, tcp: TcpStream) -> Result<Opened, ImapError> {
    let client = match ep.tls {
        TlsMode::Implicit => {
            let mut c = async_imap::Client::new(tls_wrap(ep, tcp).await?);
            read_greeting(&mut c, ep.io_timeout).await?;
            c
        }
        TlsMode::Plain => {
            let mut c = async_imap::Client::new(ImapStream::Plain(tcp));
            read_greeting(&mut c, ep.io_timeout).await?;
            c
        }
        TlsMode::StartTls => {
            let mut c = async_imap::Client::new(ImapStream::Plain(tcp));
            read_greeting(&mut c, ep.io_timeout).await?;
            within(
                "STARTTLS",
                ep.io_timeout,
                c.run_command_and_check_ok("STARTTLS", None),
                |e| ImapError::from_imap("STARTTLS", e),
            )
            .await?;
            let ImapStream::Plain(tcp) = c.into_inner() else {
                return Err(ImapError::Protocol {
                    step: "STARTTLS",
                    detail: "stream already encrypted".into(),
                });
            };
            // Nothing from before TLS is trusted: a fresh client over the TLS stream.
            async_imap::Client::new(tls_wrap(ep, tcp).await?)
        }
    };
    let certificate = peer_certificate(client.get_ref());
    Ok(Opened {
        client,
        host: ep.host.to_owned(),
        port: ep.port,
        certificate,
    })
}

async fn within<T, E>(
    step: &'static str,
    after: Duration,
    fut: impl Future<Output = Result<T, E>>,
    map: impl FnOnce(E) -> ImapError,
) -> Result<T, ImapError> {
    match timeout(after, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(map(e)),
        Err(_) => Err(ImapError::Timeout { step, after }),
    }
}

/// Bytes read from the socket at once under TLS. OpenSSL asks for a record's 5-byte header and
/// then its body, and Dovecot's records are small: unbuffered, a 300 MiB message took 158,348
/// `recvfrom` calls, with this buffer 6,865 (`strace -c`). On the e-filing benchmark (Intel, 6
/// runs each, alternating) the client's system time fell from 6.20 to 5.39 s and its CPU from
/// 19.27 to 18.54 s (bench/README.md, 2026-12-04 19:42).
const TLS_READ_BUFFER: usize = 256 * 1024;

async fn tls_wrap(ep: &Endpoint<'_>, tcp: TcpStream) -> Result<ImapStream, ImapError> {
    let mut connector = async_native_tls::TlsConnector::new();
    if let Some(ca) = ep.ca_file {
        let pem = std::fs::read(ca).map_err(|e| ImapError::Tls {
            host: ep.host.to_owned(),
            detail: format!("cannot read CA file {}: {e}", ca.display()),
        })?;
        let cert = async_native_tls::Certificate::from_pem(&pem).map_err(|e| ImapError::Tls {
            host: ep.host.to_owned(),
            detail: format!("CA file {} is not a PEM certificate: {e}", ca.display()),
        })?;
        connector = connector.add_root_certificate(cert);
    }
    let tls = within(
        "TLS handshake",
        ep.io_timeout,
        connector.connect(ep.host, BufReader::with_capacity(TLS_READ_BUFFER, tcp)),
        |e| ImapError::Tls {
            host: ep.host.to_owned(),
            detail: e.to_string(),
        },
    )
    .await?;
    Ok(ImapStream::Tls(Box::new(tls)))
}

async fn read_greeting(
    client: &mut async_imap::Client<ImapStream>,
    io_timeout: Duration,
) -> Result<(), ImapError> {
    let greeting = within("greeting", io_timeout, client.read_response(), |e| {
        ImapError::Io {
            step: "greeting",
            source: e,
        }
    })
    .await?;
    match greeting {
        None => Err(ImapError::ConnectionLost { step: "greeting" }),
        Some(resp) => {
            use async_imap::imap_proto::{Response, Status};
            match resp.parsed() {
                Response::Data {
                    status: Status::Ok, ..
                } => Ok(()),
                other => Err(ImapError::Protocol {
                    step: "greeting",
                    detail: format!("unexpected greeting {other:?}"),
                }),
            }
        }
    }
}

impl MailSession {
    /// Connects, reads the greeting, upgrades to TLS as configured and logs in.
    pub async fn connect(ep: &Endpoint<'_>, login: &SaslLogin) -> Result<MailSession, ImapError> {
        let tcp = connect_tcp(ep).await?;
        let opened = establish(ep, tcp).await?;
        MailSession::login(opened, login, ep.io_timeout).await
    }

    /// Logs in on an established connection with the given SASL mechanism (or IMAP LOGIN).
    pub async fn login(
        opened: Opened,
        login: &SaslLogin,
        io_timeout: Duration,
    ) -> Result<MailSession, ImapError> {
        let client = opened.client;
        let step = match login {
            SaslLogin::XOAuth2 { .. } => "AUTHENTICATE XOAUTH2",
            SaslLogin::OAuthBearer { .. } => "AUTHENTICATE OAUTHBEARER",
            SaslLogin::Plain { .. } => "AUTHENTICATE PLAIN",
            SaslLogin::Login { .. } => "LOGIN",
        };
        let attempt = match login {
            SaslLogin::XOAuth2 { user, token } => {
                let response = format!("user={user}\x01auth=Bearer {}\x01\x01", token.expose());
                timeout(
                    io_timeout,
                    client.authenticate("XOAUTH2", Sasl::new(response)),
                )
                .await
            }
            SaslLogin::OAuthBearer { user, token } => {
                let response = format!(
                    "n,a={},\x01host={}\x01port={}\x01auth=Bearer {}\x01\x01",
                    // RFC 5801 saslname: "=" and "," escaped.
                    user.replace('=', "=3D").replace(',', "=2C"),
                    opened.host,
                    opened.port,
                    token.expose()
                );
                timeout(
                    io_timeout,
                    client.authenticate("OAUTHBEARER", Sasl::new(response)),
                )
                .await
            }
            SaslLogin::Plain { user, password } => {
                let response = format!("\0{user}\0{}", password.expose());
                timeout(
                    io_timeout,
                    client.authenticate("PLAIN", Sasl::new(response)),
                )
                .await
            }
            SaslLogin::Login { user, password } => {
                timeout(io_timeout, client.login(user, password.expose())).await
            }
        };
        let user = match login {
            SaslLogin::XOAuth2 { user, .. }
            | SaslLogin::OAuthBearer { user, .. }
            | SaslLogin::Plain { user, .. }
            | SaslLogin::Login { user, .. } => user,
        };
        let session = match attempt {
            Err(_) => {
                return Err(ImapError::Timeout {
                    step,
                    after: io_timeout,
                });
            }
            Ok(Ok(session)) => session,
            Ok(Err((e, _client))) => return Err(auth_error(user, e)),
        };
        let mut session = MailSession {
            session,
            io_timeout,
            has_move: false,
            has_uidplus: false,
        };
        let caps = within(
            "CAPABILITY",
            session.io_timeout,
            session.session.capabilities(),
            |e| ImapError::from_imap("CAPABILITY", e),
        )
        .await?;
        session.has_move = caps.has_str("MOVE");
        session.has_uidplus = caps.has_str("UIDPLUS");
        client_drop_unsolicited(&mut session.session);
        Ok(session)
    }

    /// SELECT (read-write) and report UIDVALIDITY, which must be present.
    pub async fn select(&mut self, folder: &str) -> Result<Selected, ImapError> {
        let mailbox = within(
            "SELECT",
            self.io_timeout,
            self.session.select(folder),
            |e| ImapError::from_imap("SELECT", e),
        )
        .await?;
        client_drop_unsolicited(&mut self.session);
        let uidvalidity = mailbox
            .uid_validity
            .ok_or_else(|| ImapError::NoUidValidity {
                folder: folder.to_owned(),
            })?;
        Ok(Selected {
            uidvalidity,
            exists: mailbox.exists,
            uid_next: mailbox.uid_next,
        })
    }

    pub async fn noop(&mut self) -> Result<(), ImapError> {
        within("NOOP", self.io_timeout, self.session.noop(), |e| {
            ImapError::from_imap("NOOP", e)
        })
        .await?;
        client_drop_unsolicited(&mut self.session);
        Ok(())
    }

    /// Which of `uids` are still in the selected folder, asked after a FETCH that did not return
    /// them. async-imap ends a FETCH, and a SEARCH, quietly when the server drops the connection
    /// in the middle (as Dovecot does with a message file it cannot read), which would make a
    /// message the server cannot serve look expunged. So a NOOP answered with a tagged OK first
    /// proves the session alive; a dead one is an error.
    pub async fn present(&mut self, uids: &[u32]) -> Result<Vec<u32>, ImapError> {
        if uids.is_empty() {
            return Ok(Vec::new());
        }
        within(
            "NOOP",
            self.io_timeout,
            self.session.run_command_and_check_ok("NOOP"),
            |e| ImapError::from_imap("NOOP", e),
        )
        .await?;
        client_drop_unsolicited(&mut self.session);
        let found = self
            .uid_search(&format!("UID {}", uid_set::format(uids)))
            .await?;
        Ok(uids.iter().copied().filter(|u| found.contains(u)).collect())
    }

    /// `UID SEARCH`, sorted ascending.
    pub async fn uid_search(&mut self, query: &str) -> Result<Vec<u32>, ImapError> {
        let set = within(
            "UID SEARCH",
            self.io_timeout,
            self.session.uid_search(query),
            |e| ImapError::from_imap("UID SEARCH", e),
        )
        .await?;
        client_drop_unsolicited(&mut self.session);
        let mut uids: Vec<u32> = set.into_iter().collect();
        uids.sort_unstable();
        Ok(uids)
    }

    /// The UIDs to look at in this poll: every unseen message, plus every message above the
    /// high-water mark whatever its flags (someone may have read it in another client before we
    /// saw it). Sends NOOP first so mail delivered since SELECT is visible.
    pub async fn candidates(&mut self, high_water: u32) -> Result<Candidates, ImapError> {
        self.noop().await?;
        let unseen = self.uid_search("UNSEEN").await?;
        let mut uids = unseen.clone();
        if let Some(next) = high_water.checked_add(1) {
            // `n:*` with n above the highest UID still matches the highest message: filter.
            let above = self.uid_search(&format!("UID {next}:*")).await?;
            uids.extend(above.into_iter().filter(|u| *u > high_water));
        }
        uids.sort_unstable();
        uids.dedup();
        Ok(Candidates { uids, unseen })
    }

    /// `UID FETCH set (UID RFC822.SIZE)`: sizes for batching by bytes, sorted by UID.
    pub async fn sizes(&mut self, uids: &[u32]) -> Result<Vec<(u32, u32)>, ImapError> {
        // Each response owns a whole read-buffer block in async-imap: keep only the numbers,
        // or 10,000 responses hold ~80 MB.
        let mut out = Vec::with_capacity(uids.len());
        self.fetch_each(uids, "(UID RFC822.SIZE)", "UID FETCH RFC822.SIZE", |f| {
            if let Some(uid) = f.uid {
                out.push((uid, f.size.unwrap_or(0)));
            }
        })
        .await?;
        out.sort_unstable();
        Ok(out)
    }

    /// `UID FETCH set (UID BODY.PEEK[])`: the raw messages, never setting `\Seen`. UIDs the
    /// server did not return (expunged meanwhile, or a silent failure) are reported by the
    /// caller comparing with what it asked for. Each response is turned into its bytes as it
    /// arrives, so a batch is held once, not twice.
    pub async fn fetch_raw(&mut self, uids: &[u32]) -> Result<Vec<Fetched>, ImapError> {
        let mut out = Vec::with_capacity(uids.len());
        self.fetch_each(uids, "(UID BODY.PEEK[])", "UID FETCH BODY.PEEK[]", |f| {
            if let (Some(uid), Some(_)) = (f.uid, f.body()) {
                out.push(Fetched { uid, response: f });
            }
        })
        .await?;
        out.sort_unstable_by_key(|f| f.uid);
        Ok(out)
    }

    /// `UID FETCH uid (UID BODY.PEEK[]<offset.length>)`: at most `length` bytes of one message
    /// from `offset` (RFC 3501 partial fetch; fewer at its end), never setting `\Seen`. `None`:
    /// the server returned no bytes for this UID (expunged, or `offset` is past the end and the
    /// server says so with NIL). The caller checks the length: a server that returns more than
    /// was asked for has ignored the range.
    pub async fn fetch_part(
        &mut self,
        uid: u32,
        offset: u64,
        length: u32,
    ) -> Result<Option<Fetched>, ImapError> {
        let step = "UID FETCH BODY.PEEK[]<partial>";
        let query = format!("(UID BODY.PEEK[]<{offset}.{length}>)");
        let mut part = None;
        self.fetch_each(&[uid], &query, step, |f| {
            if f.uid == Some(uid) && f.body().is_some() {
                part = Some(Fetched { uid, response: f });
            }
        })
        .await?;
        Ok(part)
    }

    /// Runs a UID FETCH and hands each response to `each` as it arrives, draining the whole
    /// stream (each item under the I/O timeout) before anything else is sent.
    async fn fetch_each(
        &mut self,
        uids: &[u32],
        query: &str,
        step: &'static str,
        each: impl FnMut(async_imap::types::Fetch),
    ) -> Result<(), ImapError> {
        if uids.is_empty() {
            return Ok(());
        }
        let set = uid_set::format(uids);
        let io_timeout = self.io_timeout;
        let stream = within(step, io_timeout, self.session.uid_fetch(&set, query), |e| {
            ImapError::from_imap(step, e)
        })
        .await?;
        drain(step, io_timeout, stream, each).await?;
        client_drop_unsolicited(&mut self.session);
        Ok(())
    }

    /// `UID STORE set +FLAGS.SILENT (\Seen)`. Succeeds only on the server's tagged OK: async-imap's
    /// `uid_store` stream ends quietly on a tagged NO/BAD and on a connection the server closed
    /// (e.g. `* BYE` at shutdown), which would let an acknowledgement be forgotten undone.
    pub async fn mark_seen(&mut self, uids: &[u32]) -> Result<(), ImapError> {
        if uids.is_empty() {
            return Ok(());
        }
        let set = uid_set::format(uids);
        let step = "UID STORE +FLAGS (\\Seen)";
        within(
            step,
            self.io_timeout,
            self.session
                .run_command_and_check_ok(format!("UID STORE {set} +FLAGS.SILENT (\\Seen)")),
            |e| ImapError::from_imap(step, e),
        )
        .await?;
        client_drop_unsolicited(&mut self.session);
        Ok(())
    }

    /// Whether [`MailSession::move_to`] can move messages here: MOVE, or UIDPLUS for
    /// copy + `UID EXPUNGE`.
    pub fn can_move(&self) -> bool {
        self.has_move || self.has_uidplus
    }

    /// Moves messages to `folder` (RFC 6851 `UID MOVE`; where the server lacks MOVE, copy then
    /// mark `\Deleted` and `UID EXPUNGE` exactly those UIDs, which needs UIDPLUS). Callers check
    /// [`MailSession::can_move`] first: the poll turns a move it cannot do into
    /// [`ImapError::CannotMove`], naming the configuration key, before anything is copied.
    pub async fn move_to(&mut self, uids: &[u32], folder: &str) -> Result<(), ImapError> {
        if uids.is_empty() {
            return Ok(());
        }
        let set = uid_set::format(uids);
        if self.has_move {
            within(
                "UID MOVE",
                self.io_timeout,
                self.session.uid_mv(&set, folder),
                |e| ImapError::from_imap("UID MOVE", e),
            )
            .await?;
        } else {
            within(
                "UID COPY",
                self.io_timeout,
                self.session.uid_copy(&set, folder),
                |e| ImapError::from_imap("UID COPY", e),
            )
            .await?;
            within(
                "UID STORE +FLAGS (\\Deleted)",
                self.io_timeout,
                self.session
                    .run_command_and_check_ok(format!("UID STORE {set} +FLAGS.SILENT (\\Deleted)")),
                |e| ImapError::from_imap("UID STORE +FLAGS (\\Deleted)", e),
            )
            .await?;
            within(
                "UID EXPUNGE",
                self.io_timeout,
                self.session
                    .run_command_and_check_ok(format!("UID EXPUNGE {set}")),
                |e| ImapError::from_imap("UID EXPUNGE", e),
            )
            .await?;
        }
        client_drop_unsolicited(&mut self.session);
        Ok(())
    }

    /// Creates a folder if it does not exist yet (for `move:` targets).
    pub async fn ensure_folder(&mut self, folder: &str) -> Result<(), ImapError> {
        match within(
            "CREATE",
            self.io_timeout,
            self.session.create(folder),
            |e| ImapError::from_imap("CREATE", e),
        )
        .await
        {
            Ok(()) => Ok(()),
            // Already exists ([ALREADYEXISTS] or a plain NO): the following MOVE tells if not.
            Err(ImapError::No { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// LOGOUT, best effort: the work is done whatever the server answers.
    pub async fn logout(mut self) {
        let _ = timeout(Duration::from_secs(5), self.session.logout()).await;
    }
}

/// Reads a command's response stream to its end (nothing else may be sent before), each item
/// under the I/O timeout, handing every FETCH response to `each`.
async fn drain(
    step: &'static str,
    io_timeout: Duration,
    stream: impl futures::Stream<Item = async_imap::error::Result<async_imap::types::Fetch>>,
    mut each: impl FnMut(async_imap::types::Fetch),
) -> Result<(), ImapError> {
    let mut stream = std::pin::pin!(stream);
    loop {
        match timeout(io_timeout, stream.next()).await {
            Err(_) => {
                return Err(ImapError::Timeout {
                    step,
                    after: io_timeout,
                });
            }
            Ok(None) => return Ok(()),
            Ok(Some(Ok(fetch))) => each(fetch),
            Ok(Some(Err(e))) => return Err(ImapError::from_imap(step, e)),
        }
    }
}

fn auth_error(user: &str, e: async_imap::error::Error) -> ImapError {
    use async_imap::error::Error;
    match e {
        Error::No(text) | Error::Bad(text) => {
            if text.contains("UNAVAILABLE") || text.contains("Temporary") {
                ImapError::AuthUnavailable {
                    user: user.to_owned(),
                    text,
                }
            } else {
                ImapError::AuthFailed {
                    user: user.to_owned(),
                    text,
                }
            }
        }
        other => ImapError::from_imap("AUTHENTICATE", other),
    }
}

/// Unsolicited EXISTS/RECENT/EXPUNGE go to a bounded channel that drops on overflow; nothing
/// here needs them (every poll starts with NOOP + SEARCH), so drain it after each command.
fn client_drop_unsolicited(session: &mut async_imap::Session<ImapStream>) {
    while session.unsolicited_responses.try_recv().is_ok() {}
}
