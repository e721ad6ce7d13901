//! Helpers shared by the testbed's integration tests.
#![allow(dead_code)]

use std::time::Duration;

use base64::Engine as _;
use mailintake_testbed::{Dovecot, IdentityPlatform, OUTLOOK_SCOPE};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader};

pub const TENANT: &str = "11111111-2222-3333-4444-555555555555";
pub const MAILBOX_A: &str = "a@urad.example";
pub const MAILBOX_B: &str = "b@urad.example";
/// Bound on any single network step, so a hang fails the test instead of stalling it.
pub const STEP: Duration = Duration::from_secs(10);

thread_local! {
    /// One HTTP client per test thread (each test has its own runtime): building a client
    /// loads the system trust store, which is slow enough to matter per request.
    static HTTP: reqwest::Client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("an HTTP client");
}

/// The test thread's HTTP client; it does not follow redirects.
pub fn http() -> reqwest::Client {
    HTTP.with(Clone::clone)
}

pub async fn token_request(
    idp: &IdentityPlatform,
    tenant: &str,
    form: &[(&str, &str)],
) -> (u16, Value) {
    let body: String = form_body(form);
    let response = tokio::time::timeout(
        STEP,
        http()
            .post(idp.token_url(tenant))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send(),
    )
    .await
    .expect("token request timed out")
    .expect("token request failed");
    let status = response.status().as_u16();
    let json = response
        .json::<Value>()
        .await
        .expect("token response is JSON");
    (status, json)
}

pub fn form_body(form: &[(&str, &str)]) -> String {
    form.iter()
        .map(|(k, v)| format!("{k}={}", urlencode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn client_credentials<'a>(client_id: &'a str, secret: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("grant_type", "client_credentials"),
        ("client_id", client_id),
        ("client_secret", secret),
        ("scope", OUTLOOK_SCOPE),
    ]
}

pub async fn get_token(idp: &IdentityPlatform, client_id: &str, secret: &str) -> String {
    let (status, json) = token_request(idp, TENANT, &client_credentials(client_id, secret)).await;
    assert_eq!(status, 200, "{json}");
    json["access_token"].as_str().unwrap().to_string()
}

/// Asserts an error response has exactly Entra's shape and returns its description.
pub fn assert_aad_error(json: &Value, error: &str, code: u64) -> String {
    let object = json.as_object().expect("error body is an object");
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "correlation_id",
            "error",
            "error_codes",
            "error_description",
            "error_uri",
            "timestamp",
            "trace_id"
        ],
        "{json}"
    );
    assert_eq!(json["error"], error, "{json}");
    assert_eq!(json["error_codes"], serde_json::json!([code]), "{json}");
    assert_eq!(
        json["error_uri"],
        format!("https://login.microsoftonline.com/error?code={code}")
    );
    let description = json["error_description"].as_str().unwrap().to_string();
    assert!(
        description.starts_with(&format!("AADSTS{code}: ")),
        "{description}"
    );
    let trace_id = json["trace_id"].as_str().unwrap();
    let correlation_id = json["correlation_id"].as_str().unwrap();
    let timestamp = json["timestamp"].as_str().unwrap();
    assert_eq!(trace_id.len(), 36, "{trace_id}");
    assert!(description.contains(&format!("\r\nTrace ID: {trace_id}\r\n")));
    assert!(description.contains(&format!("\r\nCorrelation ID: {correlation_id}\r\n")));
    assert!(description.ends_with(&format!("\r\nTimestamp: {timestamp}")));
    assert!(
        timestamp.ends_with('Z') && timestamp.len() == 20,
        "{timestamp}"
    );
    description
}

pub fn tls_connector(dovecot: &Dovecot) -> tokio_native_tls::TlsConnector {
    let pem = std::fs::read(dovecot.ca_file()).unwrap();
    native_tls::TlsConnector::builder()
        .add_root_certificate(native_tls::Certificate::from_pem(&pem).unwrap())
        .disable_built_in_roots(true)
        .build()
        .unwrap()
        .into()
}

/// A minimal IMAP client: enough for greetings and authentication.
pub struct Imap<S> {
    pub stream: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Imap<S> {
    pub async fn new(stream: S) -> Self {
        let mut imap = Imap {
            stream: BufReader::new(stream),
        };
        let greeting = imap.line().await;
        assert!(greeting.starts_with("* OK"), "{greeting}");
        imap
    }

    pub async fn line(&mut self) -> String {
        let mut line = String::new();
        tokio::time::timeout(STEP, self.stream.read_line(&mut line))
            .await
            .expect("IMAP read timed out")
            .expect("IMAP read failed");
        line
    }

    pub async fn send(&mut self, data: &str) {
        let stream = self.stream.get_mut();
        stream.write_all(data.as_bytes()).await.unwrap();
        stream.flush().await.unwrap();
    }

    /// Sends a tagged command and returns the tagged response line.
    pub async fn command(&mut self, tag: &str, command: &str) -> String {
        self.send(&format!("{tag} {command}\r\n")).await;
        loop {
            let line = self.line().await;
            assert!(!line.is_empty(), "connection closed");
            if line.starts_with(&format!("{tag} ")) {
                return line;
            }
        }
    }

    /// SASL with an initial response; answers a failure challenge with an empty line
    /// (as XOAUTH2/OAUTHBEARER require) and returns the tagged response.
    pub async fn authenticate(&mut self, mechanism: &str, initial: &[u8]) -> String {
        let encoded = base64::engine::general_purpose::STANDARD.encode(initial);
        self.send(&format!("a AUTHENTICATE {mechanism} {encoded}\r\n"))
            .await;
        loop {
            let line = self.line().await;
            assert!(!line.is_empty(), "connection closed");
            if line.starts_with("+") {
                self.send("\r\n").await;
            } else if line.starts_with("a ") {
                return line;
            }
        }
    }
}

pub async fn imaps(dovecot: &Dovecot) -> Imap<tokio_native_tls::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", dovecot.imaps_port()))
        .await
        .unwrap();
    let tls = tokio::time::timeout(STEP, tls_connector(dovecot).connect(dovecot.host(), tcp))
        .await
        .unwrap()
        .expect("TLS handshake with the per-run CA");
    Imap::new(tls).await
}

pub fn xoauth2_response(user: &str, token: &str) -> Vec<u8> {
    format!("user={user}\x01auth=Bearer {token}\x01\x01").into_bytes()
}

/// Logs in with XOAUTH2 over implicit TLS and returns the tagged response.
pub async fn xoauth2(dovecot: &Dovecot, user: &str, token: &str) -> String {
    let mut imap = imaps(dovecot).await;
    imap.authenticate("XOAUTH2", &xoauth2_response(user, token))
        .await
}

pub fn assert_ok(response: &str) {
    assert!(response.starts_with("a OK"), "expected OK, got {response}");
}

pub fn assert_auth_failed(response: &str) {
    assert!(
        response.starts_with("a NO [AUTHENTICATIONFAILED]"),
        "expected AUTHENTICATIONFAILED, got {response}"
    );
}

pub fn assert_unavailable(response: &str) {
    assert!(
        response.starts_with("a NO [UNAVAILABLE]"),
        "expected UNAVAILABLE, got {response}"
    );
}

// ---------------------------------------------------------------------------------------
// JWTs, PKCE, client assertions and the authorize endpoint
// ---------------------------------------------------------------------------------------

pub fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// Decodes one part (0 header, 1 claims) of a JWT as JSON.
pub fn jwt_part(token: &str, index: usize) -> Value {
    let part = token.split('.').nth(index).expect("a JWT part");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("base64url JWT part");
    serde_json::from_slice(&bytes).expect("JSON JWT part")
}

pub fn jwt_claims(token: &str) -> Value {
    jwt_part(token, 1)
}

/// A PKCE pair (verifier, S256 challenge).
pub fn pkce() -> (String, String) {
    let verifier = b64url(&rand_bytes(32));
    let challenge = b64url(&openssl::sha::sha256(verifier.as_bytes()));
    (verifier, challenge)
}

pub fn rand_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    openssl::rand::rand_bytes(&mut buf).unwrap();
    buf
}

/// base64url(SHA-256(DER)) of a PEM certificate: the `x5t#S256` header value.
pub fn x5t_s256(cert_pem: &str) -> String {
    let cert = openssl::x509::X509::from_pem(cert_pem.as_bytes()).unwrap();
    b64url(&openssl::sha::sha256(&cert.to_der().unwrap()))
}

/// Signs an RS256 JWT with `key` (any private key PEM).
pub fn sign_rs256(key_pem: &str, header: &Value, claims: &Value) -> String {
    let key = openssl::pkey::PKey::private_key_from_pem(key_pem.as_bytes()).unwrap();
    sign_rs256_with(&key, header, claims)
}

pub fn sign_rs256_with(
    key: &openssl::pkey::PKeyRef<openssl::pkey::Private>,
    header: &Value,
    claims: &Value,
) -> String {
    let input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let mut signer =
        openssl::sign::Signer::new(openssl::hash::MessageDigest::sha256(), key).unwrap();
    signer.update(input.as_bytes()).unwrap();
    format!("{input}.{}", b64url(&signer.sign_to_vec().unwrap()))
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The claims of a well-formed client assertion, valid for ten minutes.
pub fn assertion_claims(client_id: &str, token_url: &str) -> Value {
    let now = unix_now();
    serde_json::json!({
        "aud": token_url,
        "iss": client_id,
        "sub": client_id,
        "jti": b64url(&rand_bytes(16)),
        "nbf": now,
        "iat": now,
        "exp": now + 600,
    })
}

/// A well-formed client assertion for `cert_pem` signed with `key_pem`.
pub fn client_assertion(key_pem: &str, cert_pem: &str, client_id: &str, token_url: &str) -> String {
    sign_rs256(
        key_pem,
        &serde_json::json!({"alg": "RS256", "typ": "JWT", "x5t#S256": x5t_s256(cert_pem)}),
        &assertion_claims(client_id, token_url),
    )
}

/// The form of a client-credentials request with a client assertion.
pub fn assertion_form<'a>(client_id: &'a str, assertion: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("grant_type", "client_credentials"),
        ("client_id", client_id),
        (
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ),
        ("client_assertion", assertion),
        ("scope", OUTLOOK_SCOPE),
    ]
}

/// `GET authorize?…` without following the redirect: (status, Location or body).
pub async fn authorize(
    idp: &IdentityPlatform,
    tenant: &str,
    query: &[(&str, &str)],
) -> (u16, String) {
    let url = format!("{}?{}", idp.authorize_url(tenant), form_body(query));
    let response = tokio::time::timeout(STEP, http().get(url).send())
        .await
        .expect("authorize request timed out")
        .expect("authorize request failed");
    let status = response.status().as_u16();
    match response.headers().get("location") {
        Some(location) => (status, location.to_str().unwrap().to_string()),
        None => (status, response.text().await.unwrap()),
    }
}

/// A query parameter of a URL (decoded).
pub fn query_param(url: &str, name: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    let query = query.split('#').next().unwrap_or_default();
    form_urlencoded_pairs(query)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

fn form_urlencoded_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

/// `GET /tokeninfo` as Dovecot does it: (status, body).
pub async fn tokeninfo(idp: &IdentityPlatform, token: &str) -> (u16, Value) {
    let url = format!("{}{}", idp.tokeninfo_url(), urlencode(token));
    let response = http().get(url).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}
