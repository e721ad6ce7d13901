//! JWTs: the access tokens the stand-in issues (HS256) and the client assertions it checks
//! (RS256, RFC 7523, as Entra's certificate credentials).

use base64::Engine as _;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Public};
use openssl::sign::{Signer, Verifier};
use openssl::x509::X509;
use serde_json::Value;

use super::errors::{AadError, entra_datetime};

/// `client_assertion_type` of RFC 7523 client authentication.
pub(super) const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

pub(super) fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// Decodes base64url with or without padding.
pub(super) fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .ok()
}

/// Signs `claims` as a compact HS256 JWT.
pub(super) fn sign_hs256(key: &[u8], kid: &str, claims: &Value) -> String {
    let header = serde_json::json!({"typ": "JWT", "alg": "HS256", "kid": kid});
    let input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let signature = PKey::hmac(key)
        .and_then(|pkey| {
            let mut signer = Signer::new(MessageDigest::sha256(), &pkey)?;
            signer.update(input.as_bytes())?;
            signer.sign_to_vec()
        })
        .expect("HMAC-SHA256 with OpenSSL");
    format!("{input}.{}", b64url(&signature))
}

/// A compact JWS split into its parts (nothing verified yet).
pub(super) struct Jws {
    pub header: serde_json::Map<String, Value>,
    pub claims: serde_json::Map<String, Value>,
    signing_input: String,
    signature: Vec<u8>,
}

impl Jws {
    pub(super) fn parse(token: &str) -> Option<Jws> {
        let mut parts = token.trim().split('.');
        let (header, claims, signature) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let object = |part: &str| match serde_json::from_slice(&b64url_decode(part)?) {
            Ok(Value::Object(map)) => Some(map),
            _ => None,
        };
        Some(Jws {
            header: object(header)?,
            claims: object(claims)?,
            signing_input: format!("{header}.{claims}"),
            signature: b64url_decode(signature)?,
        })
    }

    pub(super) fn header_str(&self, name: &str) -> Option<&str> {
        self.header.get(name).and_then(Value::as_str)
    }

    pub(super) fn claim_str(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(Value::as_str)
    }

    fn claim_i64(&self, name: &str) -> Option<i64> {
        let value = self.claims.get(name)?;
        value
            .as_i64()
            .or_else(|| value.as_f64().map(|f| f as i64))
            .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
    }

    fn verify_rs256(&self, key: &PKey<Public>) -> bool {
        Verifier::new(MessageDigest::sha256(), key)
            .and_then(|mut verifier| {
                verifier.update(self.signing_input.as_bytes())?;
                verifier.verify(&self.signature)
            })
            .unwrap_or(false)
    }
}

/// A certificate registered as an app credential.
pub(super) struct AppCertificate {
    /// base64url(SHA-256(DER)), the `x5t#S256` header value that selects it.
    pub x5t_s256: String,
    public_key: PKey<Public>,
    not_before: i64,
    not_after: i64,
}

impl AppCertificate {
    pub(super) fn from_pem(pem: &str) -> anyhow::Result<AppCertificate> {
        let cert = X509::from_pem(pem.as_bytes())?;
        let der = cert.to_der()?;
        let epoch = openssl::asn1::Asn1Time::from_unix(0)?;
        let unix = |t: &openssl::asn1::Asn1TimeRef| -> anyhow::Result<i64> {
            let diff = epoch.diff(t)?;
            Ok(i64::from(diff.days) * 86_400 + i64::from(diff.secs))
        };
        Ok(AppCertificate {
            x5t_s256: b64url(&openssl::sha::sha256(&der)),
            public_key: cert.public_key()?,
            not_before: unix(cert.not_before())?,
            not_after: unix(cert.not_after())?,
        })
    }

    /// `, Found key 'Start=MM/DD/YYYY HH:MM:SS, End=…'` as in Entra's 700027 messages.
    fn found_key(&self) -> String {
        let date = |unix: i64| {
            chrono::DateTime::from_timestamp(unix, 0)
                .unwrap_or_default()
                .format("%m/%d/%Y %H:%M:%S")
                .to_string()
        };
        format!(
            ", Found key 'Start={}, End={}'",
            date(self.not_before),
            date(self.not_after)
        )
    }
}

/// Checks an RS256 client assertion the way Entra does for certificate credentials.
///
/// `client_id` is the client the request names (the `client_id` parameter or, without it,
/// the assertion's `iss`); `token_url` the URL the request was sent to.
pub(super) fn verify_client_assertion(
    assertion: &str,
    client_id: &str,
    token_url: &str,
    certificates: &[AppCertificate],
    now: i64,
) -> Result<(), AadError> {
    let jws = Jws::parse(assertion)
        .ok_or_else(|| AadError::invalid_jwt("The token is not a well-formed compact JWS."))?;
    match jws.header_str("alg") {
        Some("RS256") => {}
        Some(other) => {
            return Err(AadError::invalid_jwt(&format!(
                "Unsupported signing algorithm '{other}'; certificate credentials are signed \
                 with RS256."
            )));
        }
        None => return Err(AadError::invalid_jwt("The 'alg' header is missing.")),
    }
    if jws.claim_str("iss") != Some(client_id) || jws.claim_str("sub") != Some(client_id) {
        return Err(AadError::new(700021, &[]));
    }
    if !jws
        .claim_str("aud")
        .is_some_and(|aud| aud.eq_ignore_ascii_case(token_url))
    {
        return Err(AadError::new(50012, &[]));
    }
    let Some(x5t) = jws.header_str("x5t#S256") else {
        return Err(AadError::invalid_jwt(
            "No certificate thumbprint specified in token header.",
        ));
    };
    let x5t = x5t.trim_end_matches('=');
    let thumbprint = b64url_decode(x5t)
        .map(|bytes| bytes.iter().map(|b| format!("{b:02X}")).collect::<String>())
        .unwrap_or_else(|| x5t.to_string());
    let invalid_signature = |reason: &str, found_key: &str| {
        AadError::new(
            700027,
            &[
                ("reason", reason),
                ("thumbprint", &thumbprint),
                ("found_key", found_key),
                ("client_id", client_id),
            ],
        )
    };
    let Some(cert) = certificates.iter().find(|c| c.x5t_s256 == x5t) else {
        return Err(invalid_signature("The key was not found.", ""));
    };
    if !jws.verify_rs256(&cert.public_key) {
        return Err(invalid_signature(
            "The provided signature value did not match the expected signature value.",
            &cert.found_key(),
        ));
    }
    if now < cert.not_before || now >= cert.not_after {
        return Err(invalid_signature(
            "The key used is expired.",
            &cert.found_key(),
        ));
    }
    let Some(exp) = jws.claim_i64("exp") else {
        return Err(AadError::invalid_jwt("The 'exp' claim is missing."));
    };
    let nbf = jws.claim_i64("nbf").unwrap_or(0);
    // Entra tolerates five minutes of clock skew for nbf, none for exp.
    if exp <= now || nbf > now + 300 {
        return Err(AadError::new(
            700024,
            &[
                ("now", &entra_datetime(now)),
                ("nbf", &entra_datetime(nbf)),
                ("exp", &entra_datetime(exp)),
            ],
        ));
    }
    if jws.claim_str("jti").is_none_or(str::is_empty) {
        return Err(AadError::invalid_jwt("The 'jti' claim is missing."));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hs256_round_trip() {
        let token = sign_hs256(b"key", "kid-1", &serde_json::json!({"a": 1}));
        let jws = Jws::parse(&token).unwrap();
        assert_eq!(jws.header_str("alg"), Some("HS256"));
        assert_eq!(jws.header_str("typ"), Some("JWT"));
        assert_eq!(jws.claims["a"], 1);
        assert!(Jws::parse("a.b").is_none());
        assert!(Jws::parse("a.b.c.d").is_none());
    }
}
