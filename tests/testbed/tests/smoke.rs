//! Smoke tests of the testbed against the real servers (no mocks).

mod common;

use std::time::{Duration, Instant};

use common::*;
use mailintake_testbed::{Dovecot, DovecotOptions, IdentityPlatform, OUTLOOK_SCOPE};
use serde_json::Value;
use tokio::io::BufReader;

// ---------------------------------------------------------------------------------------
// Identity platform
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn token_endpoint_follows_the_entra_contract() {
    let idp = IdentityPlatform::start().await.unwrap();
    idp.add_app(TENANT, "app-a", "secret-a", &[MAILBOX_A]);

    let (status, json) =
        token_request(&idp, TENANT, &client_credentials("app-a", "secret-a")).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["token_type"], "Bearer");
    assert_eq!(json["expires_in"], 3599);
    assert_eq!(json["ext_expires_in"], 3599);
    let token = json["access_token"].as_str().unwrap();
    assert!(token.len() >= 80, "{token}");
    assert_eq!(json.as_object().unwrap().len(), 4, "{json}");

    let (status, json) = token_request(&idp, TENANT, &client_credentials("app-a", "wrong")).await;
    assert_eq!(status, 401);
    let description = assert_aad_error(&json, "invalid_client", 7000215);
    assert!(
        description.starts_with(
            "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the \
             request is the client secret value, not the client secret ID, for a secret added \
             to app 'app-a'."
        ),
        "{description}"
    );

    let (status, json) = token_request(
        &idp,
        "no-such-tenant",
        &client_credentials("app-a", "secret-a"),
    )
    .await;
    assert_eq!(status, 400);
    let description = assert_aad_error(&json, "invalid_request", 90002);
    assert!(
        description.contains("Tenant 'no-such-tenant' not found"),
        "{description}"
    );

    let (status, json) =
        token_request(&idp, TENANT, &client_credentials("app-x", "secret-a")).await;
    assert_eq!(status, 400);
    let description = assert_aad_error(&json, "unauthorized_client", 700016);
    assert!(description.contains(&format!(
        "Application with identifier 'app-x' was not found in the directory '{TENANT}'"
    )));

    let (status, json) = token_request(
        &idp,
        TENANT,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "app-a"),
            ("scope", OUTLOOK_SCOPE),
        ],
    )
    .await;
    assert_eq!(status, 401);
    assert_aad_error(&json, "invalid_client", 7000216);

    let mut form = client_credentials("app-a", "secret-a");
    form[3].1 = "https://outlook.office365.com/IMAP.AccessAsApp";
    let (status, json) = token_request(&idp, TENANT, &form).await;
    assert_eq!(status, 400);
    let description = assert_aad_error(&json, "invalid_scope", 1002012);
    assert!(description.contains("/.default suffixed"), "{description}");

    let mut form = client_credentials("app-a", "secret-a");
    form[0].1 = "password";
    let (status, json) = token_request(&idp, TENANT, &form).await;
    assert_eq!(status, 400);
    assert_aad_error(&json, "unsupported_grant_type", 70003);

    // HTTP Basic client authentication, and the correlation id echoed back.
    let response = http()
        .post(idp.token_url(TENANT))
        .basic_auth("app-a", Some("wrong"))
        .header("client-request-id", "c0ffee00-0000-4000-8000-000000000001")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_body(&[
            ("grant_type", "client_credentials"),
            ("scope", OUTLOOK_SCOPE),
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    let json: Value = response.json().await.unwrap();
    assert_aad_error(&json, "invalid_client", 7000215);
    assert_eq!(
        json["correlation_id"],
        "c0ffee00-0000-4000-8000-000000000001"
    );
    let response = http()
        .post(idp.token_url(TENANT))
        .basic_auth("app-a", Some("secret-a"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_body(&[
            ("grant_type", "client_credentials"),
            ("scope", OUTLOOK_SCOPE),
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);

    idp.expire_secret("app-a");
    let (status, json) =
        token_request(&idp, TENANT, &client_credentials("app-a", "secret-a")).await;
    assert_eq!(status, 401);
    let description = assert_aad_error(&json, "invalid_client", 7000222);
    assert!(description.contains("client secret keys for app 'app-a' are expired"));

    idp.set_down(true);
    let response = http()
        .post(idp.token_url(TENANT))
        .body(form_body(&client_credentials("app-a", "secret-a")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);

    assert_eq!(idp.token_requests(), 11);
    idp.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Dovecot
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn xoauth2_logins_are_checked_against_the_identity_platform() {
    let idp = IdentityPlatform::start().await.unwrap();
    idp.add_app(TENANT, "app-a", "secret-a", &[MAILBOX_A]);
    idp.add_app(
        TENANT,
        "app-ab",
        "secret-ab",
        &["A@Urad.Example", MAILBOX_B],
    );
    let started = Instant::now();
    let dovecot = Dovecot::start(&idp).await.unwrap();
    let startup = started.elapsed();
    assert!(
        startup < Duration::from_secs(3),
        "start-up took {startup:?}"
    );

    let token_a = get_token(&idp, "app-a", "secret-a").await;
    assert_ok(&xoauth2(&dovecot, MAILBOX_A, &token_a).await);
    // Case of the login name does not matter.
    assert_ok(&xoauth2(&dovecot, "A@URAD.EXAMPLE", &token_a).await);

    let failed = Instant::now();
    assert_auth_failed(&xoauth2(&dovecot, MAILBOX_B, &token_a).await);
    assert!(
        failed.elapsed() < Duration::from_secs(2),
        "failed logins must not be delayed"
    );
    assert_auth_failed(&xoauth2(&dovecot, MAILBOX_A, "not-a-token-we-issued").await);

    // One app, several mailboxes: the answer depends on the mailbox logged in to.
    let token_ab = get_token(&idp, "app-ab", "secret-ab").await;
    assert_ok(&xoauth2(&dovecot, MAILBOX_A, &token_ab).await);
    assert_ok(&xoauth2(&dovecot, MAILBOX_B, &token_ab).await);
    assert_auth_failed(&xoauth2(&dovecot, "c@urad.example", &token_ab).await);

    // OAUTHBEARER (RFC 7628) goes through the same check.
    let mut imap = imaps(&dovecot).await;
    let bearer = format!("n,a={MAILBOX_B},\x01auth=Bearer {token_ab}\x01\x01");
    assert_ok(&imap.authenticate("OAUTHBEARER", bearer.as_bytes()).await);

    // STARTTLS on the plain port, trusting only the per-run CA.
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", dovecot.imap_port()))
        .await
        .unwrap();
    let mut plain = Imap::new(tcp).await;
    let capability = plain.command("c", "CAPABILITY").await;
    assert!(capability.starts_with("c OK"), "{capability}");
    let response = plain.command("s", "STARTTLS").await;
    assert!(response.starts_with("s OK"), "{response}");
    let tcp = plain.stream.into_inner();
    let tls = tls_connector(&dovecot)
        .connect(dovecot.host(), tcp)
        .await
        .expect("STARTTLS handshake");
    let mut imap = Imap {
        stream: BufReader::new(tls),
    };
    assert_ok(
        &imap
            .authenticate("XOAUTH2", &xoauth2_response(MAILBOX_A, &token_a))
            .await,
    );

    // Revoked and expired tokens are refused for good.
    idp.revoke_tokens("app-a");
    assert_auth_failed(&xoauth2(&dovecot, MAILBOX_A, &token_a).await);
    let fresh = get_token(&idp, "app-a", "secret-a").await;
    assert_ok(&xoauth2(&dovecot, MAILBOX_A, &fresh).await);
    idp.set_token_lifetime(0);
    let expired = get_token(&idp, "app-a", "secret-a").await;
    assert_auth_failed(&xoauth2(&dovecot, MAILBOX_A, &expired).await);

    // The identity platform being down is a temporary failure, not a wrong token.
    idp.set_down(true);
    assert_unavailable(&xoauth2(&dovecot, MAILBOX_A, &fresh).await);
    idp.set_down(false);
    assert_ok(&xoauth2(&dovecot, MAILBOX_A, &fresh).await);
    assert!(idp.tokeninfo_requests() >= 14);
}

#[tokio::test]
async fn password_users_do_not_weaken_xoauth2() {
    let idp = IdentityPlatform::start().await.unwrap();
    idp.add_app(TENANT, "app-a", "secret-a", &[MAILBOX_A]);
    let dovecot = Dovecot::start_with(DovecotOptions {
        passwords: vec![(MAILBOX_B.to_string(), "heslo".to_string())],
        ..DovecotOptions::new(&idp)
    })
    .await
    .unwrap();

    let mut imap = imaps(&dovecot).await;
    assert_ok(&imap.command("a", &format!("LOGIN {MAILBOX_B} heslo")).await);
    let mut imap = imaps(&dovecot).await;
    assert_auth_failed(&imap.command("a", &format!("LOGIN {MAILBOX_B} wrong")).await);
    let mut imap = imaps(&dovecot).await;
    assert_ok(
        &imap
            .authenticate("PLAIN", format!("\0{MAILBOX_B}\0heslo").as_bytes())
            .await,
    );

    // XOAUTH2 never falls through to the password database.
    assert_auth_failed(&xoauth2(&dovecot, MAILBOX_B, "heslo").await);
    assert_auth_failed(&xoauth2(&dovecot, MAILBOX_A, "heslo").await);
    let token = get_token(&idp, "app-a", "secret-a").await;
    assert_ok(&xoauth2(&dovecot, MAILBOX_A, &token).await);
    assert_auth_failed(&xoauth2(&dovecot, MAILBOX_B, &token).await);
    idp.set_down(true);
    assert_unavailable(&xoauth2(&dovecot, MAILBOX_A, &token).await);
}

#[tokio::test]
async fn delivered_mail_and_flags_survive_a_restart() {
    let idp = IdentityPlatform::start().await.unwrap();
    let mut dovecot = Dovecot::start(&idp).await.unwrap();

    let first = dovecot
        .deliver(
            MAILBOX_A,
            "INBOX",
            b"Subject: one\r\nMessage-ID: <1@x>\r\n\r\nbody\r\n",
        )
        .unwrap();
    let second = dovecot
        .deliver(MAILBOX_A, "INBOX", b"Subject: two\r\n\r\nbody\r\n")
        .unwrap();
    assert_eq!((first, second), (1, 2));
    let archived = dovecot
        .deliver(MAILBOX_A, "Archive/2026", b"Subject: three\r\n\r\nbody\r\n")
        .unwrap();
    assert_eq!(archived, 1);
    assert_eq!(dovecot.uids(MAILBOX_A, "INBOX").unwrap(), [1, 2]);
    assert_eq!(dovecot.uids(MAILBOX_A, "Archive/2026").unwrap(), [1]);
    assert!(dovecot.uids(MAILBOX_A, "No such folder").is_err());

    let flags = dovecot.flags(MAILBOX_A, "INBOX").unwrap();
    assert_eq!(flags.len(), 2);
    assert!(flags.values().all(Vec::is_empty), "{flags:?}");
    dovecot
        .add_flags(MAILBOX_A, "INBOX", second, "\\Seen $Registered")
        .unwrap();
    assert!(dovecot.add_flags(MAILBOX_A, "INBOX", 99, "\\Seen").is_err());
    let flags = dovecot.flags(MAILBOX_A, "INBOX").unwrap();
    assert_eq!(flags[&first], Vec::<String>::new());
    assert_eq!(flags[&second], ["\\Seen", "$Registered"]);

    let uidvalidity = dovecot.uidvalidity(MAILBOX_A, "INBOX").unwrap();
    assert!(uidvalidity > 0);
    let ports = (dovecot.imap_port(), dovecot.imaps_port());

    dovecot.stop().unwrap();
    assert!(!dovecot.is_running());
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", dovecot.imaps_port()))
            .await
            .is_err()
    );
    dovecot.start_again().await.unwrap();
    assert_eq!((dovecot.imap_port(), dovecot.imaps_port()), ports);
    assert_eq!(dovecot.uids(MAILBOX_A, "INBOX").unwrap(), [1, 2]);
    assert_eq!(
        dovecot.uidvalidity(MAILBOX_A, "INBOX").unwrap(),
        uidvalidity
    );
    assert_eq!(
        dovecot.flags(MAILBOX_A, "INBOX").unwrap()[&second],
        ["\\Seen", "$Registered"]
    );
    assert_eq!(
        dovecot
            .deliver(MAILBOX_A, "INBOX", b"Subject: four\r\n\r\nbody\r\n")
            .unwrap(),
        3
    );

    // The mailbox is reachable over IMAP with what was delivered.
    idp.add_app(TENANT, "app-a", "secret-a", &[MAILBOX_A]);
    let token = idp.issue_token("app-a").unwrap();
    let mut imap = imaps(&dovecot).await;
    assert_ok(
        &imap
            .authenticate("XOAUTH2", &xoauth2_response(MAILBOX_A, &token))
            .await,
    );
    let select = imap.command("b", "SELECT INBOX").await;
    assert!(select.starts_with("b OK"), "{select}");
    let search = imap.command("c", "UID SEARCH UNSEEN").await;
    assert!(search.starts_with("c OK"), "{search}");

    let dir = dovecot.dir().to_path_buf();
    assert!(dovecot.log().contains("starting up"));
    drop(dovecot);
    assert!(!dir.exists(), "the temp dir is removed on drop");
}
