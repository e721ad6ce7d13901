//! What an identity-platform or IMAP login failure means, and what the administrator should do.

use base64::Engine as _;
use serde_json::Value;

/// A failure explained: what it means and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnosis {
    pub meaning: String,
    pub fix: String,
}

fn d(meaning: &str, fix: &str) -> Diagnosis {
    Diagnosis {
        meaning: meaning.to_owned(),
        fix: fix.to_owned(),
    }
}

/// The Microsoft identity platform's AADSTS codes that mailintake's users actually meet.
pub fn aadsts(code: u64) -> Option<Diagnosis> {
    Some(match code {
        7000215 => d(
            "the client secret is wrong",
            "in the Entra admin center open App registrations → your app → Certificates & secrets, create a new client secret and put its Value (not the Secret ID) where client_secret_env/_file/_credential points",
        ),
        7000222 => d(
            "the client secret has expired",
            "create a new client secret under App registrations → your app → Certificates & secrets, store its Value for client_secret_*, and set client_secret_expires to its expiry date so mailintake warns next time",
        ),
        700016 => d(
            "this application (client) ID does not exist in this tenant",
            "check client_id against App registrations → your app → Overview, and tenant_id against the tenant the app is registered in",
        ),
        90002 => d(
            "the tenant was not found",
            "check tenant_id (Directory (tenant) ID on the app's Overview page) and authority (the public cloud is https://login.microsoftonline.com)",
        ),
        65001 => d(
            "admin consent for the permission is missing",
            "in App registrations → your app → API permissions, press \"Grant admin consent\" (app-only: Office 365 Exchange Online → Application → IMAP.AccessAsApp; delegated: IMAP.AccessAsUser.All and offline_access)",
        ),
        700082 => d(
            "the refresh token expired after 90 days without use",
            "run `mailintake auth login <mailbox>` again; afterwards mailintake uses the token at every poll, which keeps it alive",
        ),
        50173 => d(
            "the grant was revoked, typically by a password reset or a session revocation",
            "run `mailintake auth login <mailbox>` again with the mailbox owner's current credentials",
        ),
        9002325 => d(
            "the app registration requires PKCE (a single-page-app or cross-origin redirect)",
            "register http://localhost:<port>/ under \"Mobile and desktop applications\" (not SPA) or keep pkce enabled, then run `mailintake auth login` again",
        ),
        1002012 => d(
            "the requested scope is not valid",
            "app-only access must ask for scope = \"https://outlook.office365.com/.default\"; delegated access for [\"https://outlook.office.com/IMAP.AccessAsUser.All\", \"offline_access\"]",
        ),
        70000 | 70008 => d(
            "the refresh token or authorization code is no longer valid",
            "run `mailintake auth login <mailbox>` again",
        ),
        700024 => d(
            "the certificate's client assertion is outside its valid time range",
            "check the server's clock (NTP); the assertion is valid for ten minutes from now",
        ),
        700027 => d(
            "the client assertion's signature or certificate is not the one registered",
            "upload the certificate's public part under App registrations → your app → Certificates & secrets, and point certificate_file at the matching certificate + private key",
        ),
        _ => return None,
    })
}

/// The standard OAuth2 errors (RFC 6749 section 5.2), for providers that give no AADSTS code
/// (Google, Keycloak, Okta…); Microsoft's codes say more and come first.
pub fn oauth_error(error: &str) -> Option<Diagnosis> {
    Some(match error {
        "invalid_grant" => d(
            "the provider no longer accepts the refresh token or authorization code: it expired, was revoked (a password change, a signed-out session) or was already used",
            "run `mailintake auth login <mailbox>` again",
        ),
        "invalid_client" => d(
            "the provider does not recognise the client: a wrong client_id or client secret",
            "check client_id and the secret that client_secret_env/_file/_credential points at against the provider's app registration",
        ),
        "unauthorized_client" => d(
            "the client may not use this grant type",
            "allow the grant at the provider (client credentials for app-only, authorization code with refresh tokens for delegated)",
        ),
        "invalid_scope" => d(
            "the provider refuses the requested scopes",
            "check scopes against what the provider grants this client for IMAP (and offline_access for refresh tokens)",
        ),
        _ => return None,
    })
}

/// Decodes a JWT's claims without verifying it (we only read what we were issued).
pub fn jwt_claims(token: &str) -> Option<Value> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The audience values of Exchange Online for app-only IMAP.
const EXCHANGE_AUDIENCES: [&str; 2] = [
    "https://outlook.office365.com",
    "00000002-0000-0ff1-ce00-000000000000",
];

/// An app-only token was issued but the server refused the login: which claim is wrong, or,
/// if they are all right, the Exchange Online setup that is missing.
pub fn app_only_login_refused(
    claims: Option<&Value>,
    tenant_id: &str,
    client_id: &str,
    mailbox: &str,
) -> Diagnosis {
    let Some(claims) = claims else {
        return d(
            "the server refused the token, and the token is not a JWT whose claims could be checked",
            "check that authority points at Microsoft Entra ID and scope is https://outlook.office365.com/.default",
        );
    };
    let text = |k: &str| {
        claims
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let aud = text("aud");
    if !EXCHANGE_AUDIENCES
        .iter()
        .any(|a| aud.trim_end_matches('/') == *a)
    {
        return d(
            &format!("the token's audience (aud) is {aud:?}, not Exchange Online"),
            "set scope = \"https://outlook.office365.com/.default\" (the default) for this credential",
        );
    }
    let roles: Vec<String> = claims
        .get("roles")
        .and_then(Value::as_array)
        .map(|r| {
            r.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    if !roles.iter().any(|r| r == "IMAP.AccessAsApp") {
        return d(
            &format!("the token's roles {roles:?} lack IMAP.AccessAsApp"),
            "in App registrations → your app → API permissions add Office 365 Exchange Online → Application permissions → IMAP.AccessAsApp, then \"Grant admin consent\"",
        );
    }
    let tid = text("tid");
    if !tid.eq_ignore_ascii_case(tenant_id) {
        return d(
            &format!("the token is for tenant {tid:?}, the configuration says {tenant_id:?}"),
            "set tenant_id to the tenant that holds the mailbox",
        );
    }
    let appid = text("appid");
    if !appid.eq_ignore_ascii_case(client_id) {
        return d(
            &format!("the token is for app {appid:?}, the configuration says {client_id:?}"),
            "set client_id to the Application (client) ID that was granted access",
        );
    }
    let oid = text("oid");
    let oid = if oid.is_empty() {
        "<Enterprise application Object ID>".to_owned()
    } else {
        oid
    };
    Diagnosis {
        meaning: format!(
            "the token is right (aud {aud}, role IMAP.AccessAsApp, tenant {tid}, app {appid}), so Exchange Online does not let this app open {mailbox}"
        ),
        fix: format!(
            "register the app's service principal in Exchange Online and give it the mailbox (Exchange Online PowerShell, Connect-ExchangeOnline first):\n\
             \x20   New-ServicePrincipal -AppId {client_id} -ObjectId {oid} -DisplayName \"mailintake\"\n\
             \x20   Add-MailboxPermission -Identity \"{mailbox}\" -User {oid} -AccessRights FullAccess\n\
             other usual causes: IMAP is disabled for the mailbox (Set-CASMailbox -Identity \"{mailbox}\" -ImapEnabled $true); \
             the configured address is the UPN rather than the primary SMTP address; a permission added minutes ago (allow up to an hour)"
        ),
    }
}

/// A delegated token was issued but the server refused the login.
pub fn delegated_login_refused(claims: Option<&Value>, mailbox: &str) -> Diagnosis {
    let user = claims
        .and_then(|c| {
            c.get("upn")
                .or_else(|| c.get("unique_name"))
                .or_else(|| c.get("email"))
        })
        .and_then(Value::as_str)
        .unwrap_or("(unknown)");
    if !user.eq_ignore_ascii_case(mailbox) {
        return d(
            &format!("the token belongs to {user}, not to the mailbox {mailbox}"),
            "run `mailintake auth login <mailbox>` and sign in as the mailbox's owner (or give that user FullAccess to the mailbox)",
        );
    }
    d(
        &format!("the server refused {user}'s token"),
        "check that IMAP is enabled for the mailbox (Set-CASMailbox -ImapEnabled $true) and that the app's permissions include IMAP.AccessAsUser.All; then `mailintake auth login` again",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_listed_code_is_explained() {
        for code in [
            7000215, 7000222, 700016, 90002, 65001, 700082, 50173, 9002325, 1002012,
        ] {
            assert!(aadsts(code).is_some(), "{code}");
        }
        assert!(aadsts(1).is_none());
    }

    #[test]
    fn the_wrong_claim_is_named() {
        let good = json!({"aud": "https://outlook.office365.com", "roles": ["IMAP.AccessAsApp"], "tid": "t", "appid": "c", "oid": "sp-1"});
        let mut no_role = good.clone();
        no_role["roles"] = json!([]);
        assert!(
            app_only_login_refused(Some(&no_role), "t", "c", "m@x")
                .meaning
                .contains("lack IMAP.AccessAsApp")
        );
        let mut aud = good.clone();
        aud["aud"] = json!("https://graph.microsoft.com");
        assert!(
            app_only_login_refused(Some(&aud), "t", "c", "m@x")
                .meaning
                .contains("audience")
        );
        let ok = app_only_login_refused(Some(&good), "t", "c", "m@x");
        assert!(
            ok.fix
                .contains("New-ServicePrincipal -AppId c -ObjectId sp-1"),
            "{}",
            ok.fix
        );
        assert!(ok.fix.contains(
            "Add-MailboxPermission -Identity \"m@x\" -User sp-1 -AccessRights FullAccess"
        ));
    }

    #[test]
    fn jwt_claims_are_read_without_verification() {
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"aud":"x"}"#);
        let token = format!("e30.{claims}.sig");
        assert_eq!(jwt_claims(&token).unwrap()["aud"], "x");
        assert!(jwt_claims("opaque").is_none());
    }
}
