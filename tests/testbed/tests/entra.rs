//! The identity platform stand-in's Entra v2 contract over real HTTP: JWT claims,
//! certificate credentials, authorization code + PKCE, rotating refresh tokens, the device
//! code flow, error injection, the `oauth2` crate as a client, and delegated tokens in a
//! real Dovecot.

mod common;

use std::time::Duration;

use common::*;
use mailintake_testbed::{
    AAD_ERRORS, Dovecot, EXCHANGE_APP_AUDIENCE, EXCHANGE_USER_AUDIENCE, IMAP_APP_ROLE,
    IdentityPlatform, OUTLOOK_SCOPE, make_test_certificate, make_test_pkcs12,
};
use serde_json::{Value, json};

const PUBLIC: &str = "public-client";
const REDIRECT: &str = "http://localhost/callback";
const DELEGATED_SCOPE: &str = "https://outlook.office.com/IMAP.AccessAsUser.All offline_access";
const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// An identity platform with a public client, users A and B, and A signed in.
async fn idp_with_users() -> IdentityPlatform {
    let idp = IdentityPlatform::start().await.unwrap();
    idp.add_public_client(TENANT, PUBLIC, None, &[REDIRECT], false);
    idp.add_user(TENANT, MAILBOX_A);
    idp.add_user(TENANT, MAILBOX_B);
    idp.set_signed_in_user(MAILBOX_A);
    idp
}

/// Authorize (with PKCE) and redeem the code; returns the token response.
async fn sign_in(idp: &IdentityPlatform, client_id: &str, secret: Option<&str>) -> Value {
    let (verifier, challenge) = pkce();
    let (status, location) = authorize(
        idp,
        TENANT,
        &[
            ("client_id", client_id),
            ("response_type", "code"),
            ("redirect_uri", REDIRECT),
            ("scope", DELEGATED_SCOPE),
            ("state", "s"),
            ("code_challenge", &challenge),
            ("code_challenge_method", "S256"),
        ],
    )
    .await;
    assert_eq!(status, 302, "{location}");
    let code = query_param(&location, "code").expect("a code");
    let mut form = vec![
        ("grant_type", "authorization_code"),
        ("client_id", client_id),
        ("code", &code),
        ("redirect_uri", REDIRECT),
        ("code_verifier", &verifier),
    ];
    if let Some(secret) = secret {
        form.push(("client_secret", secret));
    }
    let (status, json) = token_request(idp, TENANT, &form).await;
    assert_eq!(status, 200, "{json}");
    json
}

/// `GET authorize` for the public client with an S256 challenge and `state=st 1/2`.
async fn authorize_pkce(idp: &IdentityPlatform, challenge: &str, redirect: &str) -> (u16, String) {
    authorize(
        idp,
        TENANT,
        &[
            ("client_id", PUBLIC),
            ("response_type", "code"),
            ("redirect_uri", redirect),
            ("scope", DELEGATED_SCOPE),
            ("state", "st 1/2"),
            ("code_challenge", challenge),
            ("code_challenge_method", "S256"),
        ],
    )
    .await
}

/// Redeems a code of the public client sent to [`REDIRECT`].
async fn redeem(idp: &IdentityPlatform, code: &str, verifier: &str) -> (u16, Value) {
    token_request(
        idp,
        TENANT,
        &[
            ("grant_type", "authorization_code"),
            ("client_id", PUBLIC),
            ("code", code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", verifier),
        ],
    )
    .await
}

fn refresh_form<'a>(client_id: &'a str, refresh_token: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("grant_type", "refresh_token"),
        ("client_id", client_id),
        ("refresh_token", refresh_token),
    ]
}

async fn device_code(idp: &IdentityPlatform, client_id: &str, scope: &str) -> (u16, Value) {
    let response = http()
        .post(idp.device_code_url(TENANT))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_body(&[("client_id", client_id), ("scope", scope)]))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn poll(idp: &IdentityPlatform, client_id: &str, device_code: &str) -> (u16, Value) {
    token_request(
        idp,
        TENANT,
        &[
            ("grant_type", DEVICE_GRANT),
            ("client_id", client_id),
            ("device_code", device_code),
        ],
    )
    .await
}

fn str_of<'a>(json: &'a Value, key: &str) -> &'a str {
    json[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} missing in {json}"))
}

/// The description without the trace/correlation/timestamp trailer.
fn message(description: &str) -> &str {
    description.split("\r\n").next().unwrap()
}

// ---------------------------------------------------------------------------------------
// Access tokens
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn app_tokens_are_jwts_with_exchange_claims() {
    let idp = IdentityPlatform::start().await.unwrap();
    idp.add_app(TENANT, "app-a", "secret-a", &[MAILBOX_A]);

    let before = unix_now();
    let token = get_token(&idp, "app-a", "secret-a").await;
    let header = jwt_part(&token, 0);
    assert_eq!(header["alg"], "HS256", "{header}");
    assert_eq!(header["typ"], "JWT", "{header}");
    let claims = jwt_claims(&token);
    assert_eq!(claims["aud"], "https://outlook.office365.com", "{claims}");
    assert_eq!(claims["iss"], format!("https://sts.windows.net/{TENANT}/"));
    assert_eq!(claims["tid"], TENANT);
    assert_eq!(claims["appid"], "app-a");
    assert_eq!(claims["appidacr"], "1");
    assert_eq!(claims["roles"], json!(["IMAP.AccessAsApp"]));
    assert_eq!(claims["ver"], "1.0");
    assert_eq!(claims["idtyp"], "app");
    let oid = idp.service_principal_id("app-a");
    assert_eq!(claims["oid"], oid);
    assert_eq!(claims["sub"], oid);
    assert_eq!(oid.len(), 36);
    assert_eq!(oid, idp.service_principal_id("app-a"));
    assert_ne!(oid, idp.service_principal_id("app-b"));
    let iat = claims["iat"].as_i64().unwrap();
    assert!(iat >= before && iat <= unix_now(), "{claims}");
    assert_eq!(claims["nbf"], iat);
    assert_eq!(claims["exp"], iat + 3599);
    assert!(claims.get("scp").is_none() && claims.get("upn").is_none());

    let (status, info) = tokeninfo(&idp, &token).await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["active"], true);
    assert_eq!(info["email"], MAILBOX_A);

    // Exchange refuses tokens without the app role or for another audience.
    idp.set_app_roles("app-a", &["Mail.Read"]);
    let without_role = get_token(&idp, "app-a", "secret-a").await;
    assert_eq!(jwt_claims(&without_role)["roles"], json!(["Mail.Read"]));
    assert_eq!(tokeninfo(&idp, &without_role).await.0, 401);
    idp.set_app_roles("app-a", &[]);
    assert_eq!(
        tokeninfo(&idp, &get_token(&idp, "app-a", "secret-a").await)
            .await
            .0,
        401
    );
    idp.set_app_roles("app-a", &[IMAP_APP_ROLE, "Other.Role"]);
    idp.set_token_audience("app-a", "https://graph.microsoft.com");
    let wrong_audience = get_token(&idp, "app-a", "secret-a").await;
    assert_eq!(
        jwt_claims(&wrong_audience)["aud"],
        "https://graph.microsoft.com"
    );
    let (status, info) = tokeninfo(&idp, &wrong_audience).await;
    assert_eq!((status, &info), (401, &json!({"active": false})));
    idp.set_token_audience("app-a", EXCHANGE_APP_AUDIENCE);
    assert_eq!(
        tokeninfo(&idp, &get_token(&idp, "app-a", "secret-a").await)
            .await
            .0,
        200
    );

    // The canary prefix is on every token; the claims still decode.
    idp.set_token_prefix("CANARY-5f1e-");
    idp.set_token_lifetime(60);
    let (status, json) =
        token_request(&idp, TENANT, &client_credentials("app-a", "secret-a")).await;
    assert_eq!(status, 200);
    assert_eq!(json["expires_in"], 60);
    let canary = str_of(&json, "access_token");
    assert!(canary.starts_with("CANARY-5f1e-"), "{canary}");
    let claims = jwt_claims(canary);
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        60
    );
    assert_eq!(tokeninfo(&idp, canary).await.0, 200);
    assert_eq!(
        tokeninfo(&idp, &canary["CANARY-5f1e-".len()..]).await.0,
        401
    );
}

// ---------------------------------------------------------------------------------------
// Certificate credentials
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn certificate_assertions_are_checked_like_entra() {
    let idp = IdentityPlatform::start().await.unwrap();
    let (cert, key) = make_test_certificate("mailintake test", 30);
    idp.add_app_certificate(TENANT, "app-cert", &cert, &[MAILBOX_A]);
    let url = idp.token_url(TENANT);
    let header = json!({"alg": "RS256", "typ": "JWT", "x5t#S256": x5t_s256(&cert)});

    // Accepted, with and without the client_id parameter.
    let assertion = client_assertion(&key, &cert, "app-cert", &url);
    let (status, json) = token_request(&idp, TENANT, &assertion_form("app-cert", &assertion)).await;
    assert_eq!(status, 200, "{json}");
    let claims = jwt_claims(str_of(&json, "access_token"));
    assert_eq!(claims["appidacr"], "2");
    assert_eq!(claims["appid"], "app-cert");
    assert_eq!(claims["roles"], json!(["IMAP.AccessAsApp"]));
    let assertion = client_assertion(&key, &cert, "app-cert", &url);
    let mut form = assertion_form("app-cert", &assertion);
    form.remove(1);
    let (status, json) = token_request(&idp, TENANT, &form).await;
    assert_eq!(status, 200, "{json}");

    // The app has no secret.
    let (status, json) = token_request(&idp, TENANT, &client_credentials("app-cert", "x")).await;
    assert_eq!(status, 401);
    assert_aad_error(&json, "invalid_client", 7000215);

    // Signed by another key under the registered certificate's thumbprint.
    let (_, other_key) = make_test_certificate("attacker", 30);
    let forged = sign_rs256(&other_key, &header, &assertion_claims("app-cert", &url));
    let (status, json) = token_request(&idp, TENANT, &assertion_form("app-cert", &forged)).await;
    assert_eq!(status, 401);
    let description = assert_aad_error(&json, "invalid_client", 700027);
    assert!(
        description.starts_with(
            "AADSTS700027: Client assertion contains an invalid signature. [Reason - The \
             provided signature value did not match the expected signature value., Thumbprint \
             of key used by client: '"
        ),
        "{description}"
    );
    assert!(description.contains(", Found key 'Start="), "{description}");
    assert!(description.contains("configured keys for app Id 'app-cert'"));

    // A certificate that is not registered.
    let (other_cert, other_key) = make_test_certificate("unregistered", 30);
    let unknown = client_assertion(&other_key, &other_cert, "app-cert", &url);
    let (status, json) = token_request(&idp, TENANT, &assertion_form("app-cert", &unknown)).await;
    assert_eq!(status, 401);
    let description = assert_aad_error(&json, "invalid_client", 700027);
    assert!(
        description
            .contains("[Reason - The key was not found., Thumbprint of key used by client: '"),
        "{description}"
    );

    // An expired assertion.
    let mut claims = assertion_claims("app-cert", &url);
    claims["nbf"] = json!(unix_now() - 900);
    claims["exp"] = json!(unix_now() - 60);
    let expired = sign_rs256(&key, &header, &claims);
    let (status, json) = token_request(&idp, TENANT, &assertion_form("app-cert", &expired)).await;
    assert_eq!(status, 401);
    let description = assert_aad_error(&json, "invalid_client", 700024);
    assert!(
        description.starts_with(
            "AADSTS700024: Client assertion is not within its valid time range. Current time: 20"
        ),
        "{description}"
    );
    assert!(description.contains(", expiry time of assertion 20"));

    // An expired certificate, registered next to the good one.
    let (old_cert, old_key) = make_test_certificate("expired", -1);
    idp.add_app_certificate(TENANT, "app-cert", &old_cert, &[]);
    let old = client_assertion(&old_key, &old_cert, "app-cert", &url);
    let (status, json) = token_request(&idp, TENANT, &assertion_form("app-cert", &old)).await;
    assert_eq!(status, 401);
    let description = assert_aad_error(&json, "invalid_client", 700027);
    assert!(
        description.contains("[Reason - The key used is expired."),
        "{description}"
    );

    // Wrong audience, issuer, missing thumbprint, missing assertion type.
    let wrong_aud = client_assertion(
        &key,
        &cert,
        "app-cert",
        "https://login.microsoftonline.com/x",
    );
    let (status, json) = token_request(&idp, TENANT, &assertion_form("app-cert", &wrong_aud)).await;
    assert_eq!(status, 401);
    assert_aad_error(&json, "invalid_client", 50012);
    let wrong_iss = client_assertion(&key, &cert, "someone-else", &url);
    let (status, json) = token_request(&idp, TENANT, &assertion_form("app-cert", &wrong_iss)).await;
    assert_eq!(status, 401);
    assert_aad_error(&json, "invalid_client", 700021);
    let no_x5t = sign_rs256(
        &key,
        &json!({"alg": "RS256", "typ": "JWT"}),
        &assertion_claims("app-cert", &url),
    );
    let (status, json) = token_request(&idp, TENANT, &assertion_form("app-cert", &no_x5t)).await;
    assert_eq!(status, 400);
    let description = assert_aad_error(&json, "invalid_request", 50027);
    assert!(description.contains("No certificate thumbprint specified in token header."));
    let assertion = client_assertion(&key, &cert, "app-cert", &url);
    let mut form = assertion_form("app-cert", &assertion);
    form.remove(2);
    let (status, json) = token_request(&idp, TENANT, &form).await;
    assert_eq!(status, 400);
    assert_aad_error(&json, "invalid_request", 900144);

    // A secret and a certificate on one app both work.
    idp.add_app(TENANT, "app-both", "secret-both", &[MAILBOX_B]);
    idp.add_app_certificate(TENANT, "app-both", &cert, &[]);
    get_token(&idp, "app-both", "secret-both").await;
    let assertion = client_assertion(&key, &cert, "app-both", &url);
    let (status, json) = token_request(&idp, TENANT, &assertion_form("app-both", &assertion)).await;
    assert_eq!(status, 200, "{json}");

    // The key and certificate from a PKCS#12 bundle.
    let (p12_cert, der) = make_test_pkcs12("bundle", 30, "heslo");
    idp.add_app_certificate(TENANT, "app-p12", &p12_cert, &[MAILBOX_B]);
    let bundle = openssl::pkcs12::Pkcs12::from_der(&der)
        .unwrap()
        .parse2("heslo")
        .unwrap();
    let bundle_cert = bundle.cert.unwrap().to_pem().unwrap();
    assert_eq!(String::from_utf8(bundle_cert).unwrap(), p12_cert);
    let assertion = sign_rs256_with(
        &bundle.pkey.unwrap(),
        &json!({"alg": "RS256", "typ": "JWT", "x5t#S256": x5t_s256(&p12_cert)}),
        &assertion_claims("app-p12", &url),
    );
    let (status, json) = token_request(&idp, TENANT, &assertion_form("app-p12", &assertion)).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(
        tokeninfo(&idp, str_of(&json, "access_token")).await.1["email"],
        MAILBOX_B
    );
}

// ---------------------------------------------------------------------------------------
// Authorization code + PKCE
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn authorization_code_with_pkce() {
    let idp = idp_with_users().await;
    let (verifier, challenge) = pkce();
    let (status, location) = authorize_pkce(&idp, &challenge, REDIRECT).await;
    assert_eq!(status, 302, "{location}");
    assert!(
        location.starts_with("http://localhost/callback?code="),
        "{location}"
    );
    assert_eq!(query_param(&location, "state").as_deref(), Some("st 1/2"));
    let code = query_param(&location, "code").unwrap();
    let (status, json) = redeem(&idp, &code, &verifier).await;
    assert_eq!(status, 200, "{json}");
    let mut keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "access_token",
            "expires_in",
            "ext_expires_in",
            "refresh_token",
            "scope",
            "token_type"
        ]
    );
    assert_eq!(json["token_type"], "Bearer");
    assert_eq!(json["expires_in"], 3599);
    assert_eq!(
        json["scope"],
        "https://outlook.office.com/IMAP.AccessAsUser.All"
    );
    let claims = jwt_claims(str_of(&json, "access_token"));
    assert_eq!(claims["aud"], "https://outlook.office.com", "{claims}");
    assert_eq!(claims["scp"], "IMAP.AccessAsUser.All");
    assert_eq!(claims["upn"], MAILBOX_A);
    assert_eq!(claims["unique_name"], MAILBOX_A);
    assert_eq!(claims["oid"], idp.user_id(TENANT, MAILBOX_A));
    assert_eq!(claims["tid"], TENANT);
    assert_eq!(claims["appid"], PUBLIC);
    assert_eq!(claims["appidacr"], "0");
    assert_eq!(claims["iss"], format!("https://sts.windows.net/{TENANT}/"));
    assert!(claims.get("roles").is_none());
    let info = tokeninfo(&idp, str_of(&json, "access_token")).await;
    assert_eq!(info.0, 200);
    assert_eq!(info.1["email"], MAILBOX_A);

    // Codes are single-use.
    let (status, json) = redeem(&idp, &code, &verifier).await;
    assert_eq!(status, 400);
    assert_aad_error(&json, "invalid_grant", 54005);

    // A verifier that does not match the challenge.
    let (_, location) = authorize_pkce(&idp, &challenge, REDIRECT).await;
    let code = query_param(&location, "code").unwrap();
    let (status, json) = redeem(&idp, &code, "another-verifier-another-verifier-0123456789").await;
    assert_eq!(status, 400);
    let description = assert_aad_error(&json, "invalid_grant", 501481);
    assert_eq!(
        message(&description),
        "AADSTS501481: The Code_Verifier does not match the code_challenge supplied in the \
         authorization request."
    );

    // A loopback redirect URI with any port; redemption must repeat it exactly.
    let (status, location) =
        authorize_pkce(&idp, &challenge, "http://localhost:53682/callback").await;
    assert_eq!(status, 302);
    assert!(
        location.starts_with("http://localhost:53682/callback?"),
        "{location}"
    );
    let code = query_param(&location, "code").unwrap();
    let (status, json) = redeem(&idp, &code, &verifier).await;
    assert_eq!(status, 400);
    let description = assert_aad_error(&json, "invalid_grant", 500112);
    assert!(
        description.contains("'http://localhost:53682/callback'"),
        "{description}"
    );

    // An unregistered redirect URI gets Entra's error page, not a redirect.
    let (status, page) = authorize_pkce(&idp, &challenge, "https://evil.example/cb?x=<b>").await;
    assert_eq!(status, 400);
    assert!(page.contains("AADSTS50011: The redirect URI"), "{page}");
    assert!(
        page.contains("https://evil.example/cb?x=&lt;b&gt;"),
        "{page}"
    );
    assert!(
        page.contains(&format!("the application &#39;{PUBLIC}&#39;")),
        "{page}"
    );
    let (status, page) = authorize(&idp, TENANT, &[("client_id", "nobody")]).await;
    assert_eq!(status, 400);
    assert!(page.contains("AADSTS700016"), "{page}");
    let (status, page) = authorize(&idp, "no-such-tenant", &[("client_id", PUBLIC)]).await;
    assert_eq!(status, 400);
    assert!(page.contains("AADSTS90002"), "{page}");

    // After the redirect URI is trusted, errors are redirected.
    let (status, location) = authorize(
        &idp,
        TENANT,
        &[
            ("client_id", PUBLIC),
            ("response_type", "token"),
            ("state", "x"),
        ],
    )
    .await;
    assert_eq!(status, 302);
    assert!(location.starts_with(REDIRECT), "{location}");
    assert_eq!(
        query_param(&location, "error").as_deref(),
        Some("unsupported_response_type")
    );
    assert!(
        query_param(&location, "error_description")
            .unwrap()
            .starts_with("AADSTS700054: ")
    );
    assert_eq!(query_param(&location, "state").as_deref(), Some("x"));

    // PKCE required: a code from a request without a challenge is refused.
    idp.add_public_client(TENANT, "spa", None, &[REDIRECT], true);
    let (status, location) = authorize(
        &idp,
        TENANT,
        &[
            ("client_id", "spa"),
            ("response_type", "code"),
            ("redirect_uri", REDIRECT),
            ("scope", DELEGATED_SCOPE),
        ],
    )
    .await;
    assert_eq!(status, 302);
    let code = query_param(&location, "code").unwrap();
    let (status, json) = token_request(
        &idp,
        TENANT,
        &[
            ("grant_type", "authorization_code"),
            ("client_id", "spa"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
        ],
    )
    .await;
    assert_eq!(status, 400);
    let description = assert_aad_error(&json, "invalid_request", 9002325);
    assert_eq!(
        message(&description),
        "AADSTS9002325: Proof Key for Code Exchange is required for cross-origin \
         authorization code redemption."
    );

    // Discovery.
    let config: Value = http()
        .get(format!(
            "{}/{TENANT}/v2.0/.well-known/openid-configuration",
            idp.authority()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config["authorization_endpoint"], idp.authorize_url(TENANT));
    assert_eq!(config["token_endpoint"], idp.token_url(TENANT));
    assert_eq!(
        config["device_authorization_endpoint"],
        idp.device_code_url(TENANT)
    );

    // A signed-in user who is not in the tenant.
    idp.set_signed_in_user("stranger@elsewhere.example");
    let (status, page) = authorize_pkce(&idp, &challenge, REDIRECT).await;
    assert_eq!(status, 400);
    assert!(page.contains("AADSTS50034"), "{page}");
}

#[tokio::test]
async fn without_a_signed_in_user_login_hint_decides() {
    let idp = IdentityPlatform::start().await.unwrap();
    idp.add_public_client(TENANT, PUBLIC, None, &[REDIRECT], false);
    idp.add_user(TENANT, "Jana.Novakova@urad.example");
    let query = |hint: &'static str| {
        vec![
            ("client_id", PUBLIC),
            ("response_type", "code"),
            ("scope", "https://mail.google.com/"),
            ("login_hint", hint),
        ]
    };
    let (status, location) = authorize(&idp, TENANT, &query("nobody@urad.example")).await;
    assert_eq!(status, 302);
    assert_eq!(
        query_param(&location, "error").as_deref(),
        Some("login_required")
    );
    assert!(
        query_param(&location, "error_description")
            .unwrap()
            .starts_with("AADSTS50058: ")
    );
    // No redirect_uri: the registered one; no PKCE: allowed for this client.
    let (status, location) = authorize(&idp, TENANT, &query("jana.novakova@urad.example")).await;
    assert_eq!(status, 302, "{location}");
    let code = query_param(&location, "code").unwrap();
    let (status, json) = token_request(
        &idp,
        TENANT,
        &[
            ("grant_type", "authorization_code"),
            ("client_id", PUBLIC),
            ("code", &code),
            ("redirect_uri", REDIRECT),
        ],
    )
    .await;
    assert_eq!(status, 200, "{json}");
    // A generic scope is echoed; the token is still an Exchange token for the user.
    assert_eq!(json["scope"], "https://mail.google.com/");
    let claims = jwt_claims(str_of(&json, "access_token"));
    assert_eq!(claims["upn"], "Jana.Novakova@urad.example");
    assert_eq!(claims["aud"], EXCHANGE_USER_AUDIENCE);
}

// ---------------------------------------------------------------------------------------
// Refresh tokens
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn refresh_tokens_rotate() {
    let idp = idp_with_users().await;
    let first = sign_in(&idp, PUBLIC, None).await;
    let rt1 = str_of(&first, "refresh_token").to_string();
    assert_eq!(idp.live_refresh_tokens(PUBLIC), std::slice::from_ref(&rt1));

    let (status, second) = token_request(&idp, TENANT, &refresh_form(PUBLIC, &rt1)).await;
    assert_eq!(status, 200, "{second}");
    let rt2 = str_of(&second, "refresh_token").to_string();
    assert_ne!(rt1, rt2);
    assert_ne!(first["access_token"], second["access_token"]);
    assert_eq!(
        second["scope"],
        "https://outlook.office.com/IMAP.AccessAsUser.All"
    );
    assert_eq!(
        jwt_claims(str_of(&second, "access_token"))["upn"],
        MAILBOX_A
    );
    assert_eq!(idp.live_refresh_tokens(PUBLIC), std::slice::from_ref(&rt2));

    // The old refresh token is dead.
    let (status, json) = token_request(&idp, TENANT, &refresh_form(PUBLIC, &rt1)).await;
    assert_eq!(status, 400);
    let description = assert_aad_error(&json, "invalid_grant", 70000);
    assert_eq!(
        message(&description),
        "AADSTS70000: The provided value for the 'refresh_token' is not valid."
    );
    assert_eq!(idp.refresh_requests(), 2);

    // Refresh tokens are bound to their client.
    idp.add_public_client(TENANT, "other-client", None, &[REDIRECT], false);
    let (status, json) = token_request(&idp, TENANT, &refresh_form("other-client", &rt2)).await;
    assert_eq!(status, 400);
    assert_aad_error(&json, "invalid_grant", 70000);

    // A public client must not send a secret.
    let mut form = refresh_form(PUBLIC, &rt2);
    form.push(("client_secret", "whatever"));
    let (status, json) = token_request(&idp, TENANT, &form).await;
    assert_eq!(status, 401);
    assert_aad_error(&json, "invalid_client", 700025);

    // A confidential client must.
    idp.add_public_client(TENANT, "web-app", Some("web-secret"), &[REDIRECT], false);
    let web = sign_in(&idp, "web-app", Some("web-secret")).await;
    assert_eq!(jwt_claims(str_of(&web, "access_token"))["appidacr"], "1");
    let web_rt = str_of(&web, "refresh_token").to_string();
    let (status, json) = token_request(&idp, TENANT, &refresh_form("web-app", &web_rt)).await;
    assert_eq!(status, 401);
    assert_aad_error(&json, "invalid_client", 7000218);
    let mut form = refresh_form("web-app", &web_rt);
    form.push(("client_secret", "web-secret"));
    let (status, json) = token_request(&idp, TENANT, &form).await;
    assert_eq!(status, 200, "{json}");

    // Revocation (password reset) and inactivity.
    idp.revoke_tokens(PUBLIC);
    assert!(idp.live_refresh_tokens(PUBLIC).is_empty());
    let (status, json) = token_request(&idp, TENANT, &refresh_form(PUBLIC, &rt2)).await;
    assert_eq!(status, 400);
    let description = assert_aad_error(&json, "invalid_grant", 50173);
    assert!(
        description.contains(
            "The user might have changed or reset their password. The grant was issued on '20"
        ),
        "{description}"
    );
    assert_eq!(
        tokeninfo(&idp, str_of(&second, "access_token")).await.0,
        401
    );
    let fresh = sign_in(&idp, PUBLIC, None).await;
    idp.expire_refresh_tokens(PUBLIC);
    let (status, json) = token_request(
        &idp,
        TENANT,
        &refresh_form(PUBLIC, str_of(&fresh, "refresh_token")),
    )
    .await;
    assert_eq!(status, 400);
    let description = assert_aad_error(&json, "invalid_grant", 700082);
    assert!(
        description.contains("The token was issued on 20")
            && description.contains("and was inactive for 90.00:00:00."),
        "{description}"
    );
}

// ---------------------------------------------------------------------------------------
// Device code
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn device_code_pending_then_approved() {
    let idp = IdentityPlatform::start().await.unwrap();
    idp.add_public_client(TENANT, PUBLIC, None, &[], false);
    idp.add_user(TENANT, MAILBOX_A);

    let (status, json) = device_code(&idp, PUBLIC, DELEGATED_SCOPE).await;
    assert_eq!(status, 200, "{json}");
    let user_code = str_of(&json, "user_code").to_string();
    let device = str_of(&json, "device_code").to_string();
    assert_eq!(user_code.len(), 9);
    assert!(
        user_code.chars().enumerate().all(|(i, c)| if i == 4 {
            c == '-'
        } else {
            c.is_ascii_uppercase()
        }),
        "{user_code}"
    );
    let verification_uri = format!("{}/devicelogin", idp.authority());
    assert_eq!(json["verification_uri"], verification_uri);
    assert_eq!(json["expires_in"], 900);
    assert_eq!(json["interval"], 1);
    assert_eq!(
        json["message"],
        format!(
            "To sign in, use a web browser to open the page {verification_uri} and enter the \
             code {user_code} to authenticate."
        )
    );
    assert_eq!(
        http()
            .get(&verification_uri)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    assert_eq!(idp.device_codes_pending(), std::slice::from_ref(&user_code));

    for _ in 0..2 {
        let (status, json) = poll(&idp, PUBLIC, &device).await;
        assert_eq!(status, 400);
        let description = assert_aad_error(&json, "authorization_pending", 70016);
        assert!(description.contains("Authorization is pending. Continue polling."));
    }
    idp.approve_device_code(&user_code.to_lowercase(), "A@Urad.Example");
    assert!(idp.device_codes_pending().is_empty());
    let (status, json) = poll(&idp, PUBLIC, &device).await;
    assert_eq!(status, 200, "{json}");
    assert!(json["refresh_token"].is_string());
    assert_eq!(
        json["scope"],
        "https://outlook.office.com/IMAP.AccessAsUser.All"
    );
    assert_eq!(jwt_claims(str_of(&json, "access_token"))["upn"], MAILBOX_A);
    let (status, json) = poll(&idp, PUBLIC, &device).await;
    assert_eq!(status, 400);
    assert_aad_error(&json, "invalid_grant", 70000);

    // Expiry.
    idp.set_device_code_lifetime(0);
    let (_, json) = device_code(&idp, PUBLIC, DELEGATED_SCOPE).await;
    assert_eq!(json["expires_in"], 0);
    assert!(idp.device_codes_pending().is_empty());
    let (status, json) = poll(&idp, PUBLIC, str_of(&json, "device_code")).await;
    assert_eq!(status, 400);
    assert_aad_error(&json, "expired_token", 70020);

    // The signed-in user approves after the first poll.
    idp.set_device_code_lifetime(900);
    idp.set_device_interval(0);
    idp.set_signed_in_user(MAILBOX_A);
    let (_, json) = device_code(&idp, PUBLIC, "https://mail.google.com/").await;
    assert_eq!(json["interval"], 0);
    let device = str_of(&json, "device_code").to_string();
    assert_eq!(poll(&idp, PUBLIC, &device).await.0, 400);
    let (status, json) = poll(&idp, PUBLIC, &device).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["scope"], "https://mail.google.com/");

    // Unknown clients and missing parameters.
    let (status, json) = device_code(&idp, "nobody", DELEGATED_SCOPE).await;
    assert_eq!(status, 400);
    assert_aad_error(&json, "unauthorized_client", 700016);
    let (status, json) = device_code(&idp, PUBLIC, "").await;
    assert_eq!(status, 400);
    assert_aad_error(&json, "invalid_request", 900144);
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// Entra's HTTP status and `error` for the codes a product must tell apart.
const EXPECTED_ERRORS: &[(u64, u16, &str)] = &[
    (7000215, 401, "invalid_client"),
    (7000222, 401, "invalid_client"),
    (700016, 400, "unauthorized_client"),
    (90002, 400, "invalid_request"),
    (65001, 400, "invalid_grant"),
    (700082, 400, "invalid_grant"),
    (50173, 400, "invalid_grant"),
    (9002325, 400, "invalid_request"),
    (1002012, 400, "invalid_scope"),
    (70000, 400, "invalid_grant"),
    (700024, 401, "invalid_client"),
    (700027, 401, "invalid_client"),
];

#[tokio::test]
async fn injected_errors_have_entra_shapes() {
    let idp = idp_with_users().await;
    idp.add_app(TENANT, "app-a", "secret-a", &[MAILBOX_A]);
    for &(code, status, error) in EXPECTED_ERRORS {
        let kind = AAD_ERRORS.iter().find(|k| k.code == code).unwrap();
        assert_eq!((kind.status, kind.error), (status, error), "AADSTS{code}");

        idp.fail_next_token_request("app-a", code);
        let (got, json) =
            token_request(&idp, TENANT, &client_credentials("app-a", "secret-a")).await;
        assert_eq!(got, status, "AADSTS{code}: {json}");
        let description = assert_aad_error(&json, error, code);
        assert!(
            !description.contains('{'),
            "unfilled placeholder: {description}"
        );
        match code {
            700082 => assert!(
                description.contains(
                    "The refresh token has expired due to inactivity. The token was issued on 20"
                ) && description.contains("and was inactive for 90.00:00:00."),
                "{description}"
            ),
            50173 => assert!(
                description.starts_with(
                    "AADSTS50173: The provided grant has expired due to it being revoked, a \
                     fresh auth token is needed. The user might have changed or reset their \
                     password."
                ),
                "{description}"
            ),
            70000 => assert_eq!(
                message(&description),
                "AADSTS70000: The provided value for the 'refresh_token' is not valid."
            ),
            7000215 => assert!(description.contains("for a secret added to app 'app-a'.")),
            90002 => assert!(description.contains(&format!("Tenant '{TENANT}' not found."))),
            _ => {}
        }
        // One request only.
        let (got, json) =
            token_request(&idp, TENANT, &client_credentials("app-a", "secret-a")).await;
        assert_eq!(got, 200, "after AADSTS{code}: {json}");
    }

    // Injections queue up, and apply to any grant and way of naming the client.
    idp.fail_next_token_request(PUBLIC, 700082);
    idp.fail_next_token_request(PUBLIC, 50173);
    let tokens = {
        idp.fail_next_token_request("unused", 70000);
        let (verifier, challenge) = pkce();
        let (_, location) = authorize(
            &idp,
            TENANT,
            &[
                ("client_id", PUBLIC),
                ("response_type", "code"),
                ("redirect_uri", REDIRECT),
                ("scope", DELEGATED_SCOPE),
                ("code_challenge", &challenge),
                ("code_challenge_method", "S256"),
            ],
        )
        .await;
        let code = query_param(&location, "code").unwrap();
        let form = [
            ("grant_type", "authorization_code"),
            ("client_id", PUBLIC),
            ("code", code.as_str()),
            ("redirect_uri", REDIRECT),
            ("code_verifier", verifier.as_str()),
        ];
        let (status, json) = token_request(&idp, TENANT, &form).await;
        assert_eq!(status, 400);
        assert_aad_error(&json, "invalid_grant", 700082);
        let (status, json) = token_request(&idp, TENANT, &form).await;
        assert_eq!(status, 400);
        assert_aad_error(&json, "invalid_grant", 50173);
        // The code was not touched by the injected failures.
        let (status, json) = token_request(&idp, TENANT, &form).await;
        assert_eq!(status, 200, "{json}");
        json
    };
    assert!(tokens["refresh_token"].is_string());
    idp.fail_next_token_request("app-a", 7000222);
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
    assert_eq!(response.status().as_u16(), 401);
    assert_aad_error(&response.json().await.unwrap(), "invalid_client", 7000222);

    let unknown = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        idp.fail_next_token_request("app-a", 123);
    }));
    assert!(unknown.is_err());
}

#[tokio::test]
async fn missing_consent_reads_like_the_injected_error() {
    let idp = idp_with_users().await;
    idp.add_app(TENANT, "app-a", "secret-a", &[MAILBOX_A]);
    idp.fail_next_token_request("app-a", 65001);
    let (_, injected) = token_request(&idp, TENANT, &client_credentials("app-a", "secret-a")).await;
    let injected = assert_aad_error(&injected, "invalid_grant", 65001);

    idp.set_consent("app-a", false);
    let (status, natural) =
        token_request(&idp, TENANT, &client_credentials("app-a", "secret-a")).await;
    assert_eq!(status, 400);
    let natural = assert_aad_error(&natural, "invalid_grant", 65001);
    assert_eq!(message(&natural), message(&injected));
    assert_eq!(
        message(&natural),
        "AADSTS65001: The user or administrator has not consented to use the application \
         with ID 'app-a' named 'app-a'. Send an interactive authorization request for this \
         user and resource."
    );
    idp.set_consent("app-a", true);
    get_token(&idp, "app-a", "secret-a").await;

    // Delegated grants too: the code is issued, its redemption refused.
    idp.set_consent(PUBLIC, false);
    let (verifier, challenge) = pkce();
    let (_, location) = authorize(
        &idp,
        TENANT,
        &[
            ("client_id", PUBLIC),
            ("response_type", "code"),
            ("scope", DELEGATED_SCOPE),
            ("code_challenge", &challenge),
            ("code_challenge_method", "S256"),
        ],
    )
    .await;
    let code = query_param(&location, "code").unwrap();
    let (status, json) = token_request(
        &idp,
        TENANT,
        &[
            ("grant_type", "authorization_code"),
            ("client_id", PUBLIC),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", &verifier),
        ],
    )
    .await;
    assert_eq!(status, 400);
    assert_aad_error(&json, "invalid_grant", 65001);
}

// ---------------------------------------------------------------------------------------
// The oauth2 crate (what the product uses) as the client
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn the_oauth2_crate_works_against_the_stand_in() {
    use oauth2::basic::{BasicClient, BasicErrorResponseType};
    use oauth2::{
        AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken,
        DeviceAuthorizationUrl, PkceCodeChallenge, RedirectUrl, RequestTokenError, Scope,
        StandardDeviceAuthorizationResponse, TokenResponse, TokenUrl,
    };

    let idp = idp_with_users().await;
    idp.add_app(TENANT, "app-a", "secret-a", &[MAILBOX_A]);
    let http = oauth2::reqwest::Client::builder()
        .redirect(oauth2::reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let token_url = TokenUrl::new(idp.token_url(TENANT)).unwrap();

    // Client credentials, secret in the body.
    let app = BasicClient::new(ClientId::new("app-a".into()))
        .set_client_secret(ClientSecret::new("secret-a".into()))
        .set_auth_type(AuthType::RequestBody)
        .set_token_uri(token_url.clone());
    let token = app
        .exchange_client_credentials()
        .add_scope(Scope::new(OUTLOOK_SCOPE.into()))
        .request_async(&http)
        .await
        .unwrap();
    assert_eq!(token.expires_in(), Some(Duration::from_secs(3599)));
    assert_eq!(
        jwt_claims(token.access_token().secret())["roles"],
        json!(["IMAP.AccessAsApp"])
    );
    idp.expire_secret("app-a");
    match app
        .exchange_client_credentials()
        .add_scope(Scope::new(OUTLOOK_SCOPE.into()))
        .request_async(&http)
        .await
    {
        Err(RequestTokenError::ServerResponse(error)) => {
            assert_eq!(*error.error(), BasicErrorResponseType::InvalidClient);
            assert!(
                error
                    .error_description()
                    .unwrap()
                    .starts_with("AADSTS7000222: ")
            );
        }
        other => panic!("expected a server error, got {other:?}"),
    }

    // Authorization code + PKCE for a generic (non-Entra) scope.
    let public = BasicClient::new(ClientId::new(PUBLIC.into()))
        .set_auth_uri(AuthUrl::new(idp.authorize_url(TENANT)).unwrap())
        .set_token_uri(token_url)
        .set_device_authorization_url(
            DeviceAuthorizationUrl::new(idp.device_code_url(TENANT)).unwrap(),
        )
        .set_redirect_uri(RedirectUrl::new(REDIRECT.into()).unwrap());
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (url, csrf) = public
        .authorize_url(CsrfToken::new_random)
        .add_scope(Scope::new("https://mail.google.com/".into()))
        .set_pkce_challenge(challenge)
        .url();
    let response = http.get(url.as_str()).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 302);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    assert_eq!(
        query_param(&location, "state").as_deref(),
        Some(csrf.secret().as_str())
    );
    let code = AuthorizationCode::new(query_param(&location, "code").unwrap());
    let token = public
        .exchange_code(code)
        .set_pkce_verifier(verifier)
        .request_async(&http)
        .await
        .unwrap();
    assert_eq!(
        token.scopes().unwrap(),
        &vec![Scope::new("https://mail.google.com/".into())]
    );
    let refresh = token.refresh_token().unwrap().clone();
    let refreshed = public
        .exchange_refresh_token(&refresh)
        .request_async(&http)
        .await
        .unwrap();
    let new_refresh = refreshed.refresh_token().unwrap();
    assert_ne!(new_refresh.secret(), refresh.secret());
    assert_eq!(
        idp.live_refresh_tokens(PUBLIC),
        [new_refresh.secret().clone()]
    );
    match public
        .exchange_refresh_token(&refresh)
        .request_async(&http)
        .await
    {
        Err(RequestTokenError::ServerResponse(error)) => {
            assert_eq!(*error.error(), BasicErrorResponseType::InvalidGrant);
        }
        other => panic!("expected invalid_grant, got {other:?}"),
    }

    // Device code, polled by the crate until the signed-in user approves.
    idp.set_device_interval(0);
    let details: StandardDeviceAuthorizationResponse = public
        .exchange_device_code()
        .add_scope(Scope::new(DELEGATED_SCOPE.into()))
        .request_async(&http)
        .await
        .unwrap();
    assert_eq!(details.user_code().secret().len(), 9);
    let token = public
        .exchange_device_access_token(&details)
        .request_async(&http, tokio::time::sleep, Some(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(jwt_claims(token.access_token().secret())["upn"], MAILBOX_A);
}

// ---------------------------------------------------------------------------------------
// Delegated tokens in Dovecot
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn delegated_tokens_open_only_their_users_mailbox() {
    let idp = idp_with_users().await;
    idp.add_app(TENANT, "app-a", "secret-a", &[MAILBOX_A]);
    let dovecot = Dovecot::start(&idp).await.unwrap();

    let token_a = sign_in(&idp, PUBLIC, None).await;
    let token_a = str_of(&token_a, "access_token").to_string();
    assert_ok(&xoauth2(&dovecot, MAILBOX_A, &token_a).await);
    assert_ok(&xoauth2(&dovecot, "A@URAD.EXAMPLE", &token_a).await);
    assert_auth_failed(&xoauth2(&dovecot, MAILBOX_B, &token_a).await);

    // OAUTHBEARER (RFC 7628) with host and port.
    let bearer = |user: &str, token: &str| {
        format!(
            "n,a={user},\x01host={}\x01port={}\x01auth=Bearer {token}\x01\x01",
            dovecot.host(),
            dovecot.imaps_port()
        )
    };
    let mut imap = imaps(&dovecot).await;
    assert_ok(
        &imap
            .authenticate("OAUTHBEARER", bearer(MAILBOX_A, &token_a).as_bytes())
            .await,
    );
    let select = imap.command("b", "SELECT INBOX").await;
    assert!(select.starts_with("b OK"), "{select}");
    let mut imap = imaps(&dovecot).await;
    assert_auth_failed(
        &imap
            .authenticate("OAUTHBEARER", bearer(MAILBOX_B, &token_a).as_bytes())
            .await,
    );

    // User B's token opens B, not A.
    let token_b = idp.issue_user_token(PUBLIC, MAILBOX_B).unwrap();
    assert_ok(&xoauth2(&dovecot, MAILBOX_B, &token_b).await);
    assert_auth_failed(&xoauth2(&dovecot, MAILBOX_A, &token_b).await);

    // App tokens without the role, and tokens for another audience, are refused.
    idp.set_app_roles("app-a", &[]);
    let no_role = get_token(&idp, "app-a", "secret-a").await;
    assert_auth_failed(&xoauth2(&dovecot, MAILBOX_A, &no_role).await);
    idp.set_app_roles("app-a", &[IMAP_APP_ROLE]);
    assert_ok(
        &xoauth2(
            &dovecot,
            MAILBOX_A,
            &get_token(&idp, "app-a", "secret-a").await,
        )
        .await,
    );
    idp.set_token_audience(PUBLIC, "https://graph.microsoft.com");
    let graph = idp.issue_user_token(PUBLIC, MAILBOX_A).unwrap();
    assert_auth_failed(&xoauth2(&dovecot, MAILBOX_A, &graph).await);
    idp.set_token_audience(PUBLIC, EXCHANGE_USER_AUDIENCE);

    // Canary-prefixed tokens are still valid tokens.
    idp.set_token_prefix("CANARY-");
    let canary = idp.issue_user_token(PUBLIC, MAILBOX_A).unwrap();
    assert!(canary.starts_with("CANARY-"));
    assert_ok(&xoauth2(&dovecot, MAILBOX_A, &canary).await);
}
