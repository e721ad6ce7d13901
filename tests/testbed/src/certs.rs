//! Self-signed client certificates for Entra certificate-credential tests.

use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::{BigNum, MsbOption};
use openssl::hash::MessageDigest;
use openssl::pkcs12::Pkcs12;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::x509::extension::{BasicConstraints, KeyUsage};
use openssl::x509::{X509, X509NameBuilder};

/// A self-signed RSA 2048 certificate with subject `CN=cn`, as you would upload to an app
/// registration, and its private key. Returns `(certificate PEM, PKCS#8 private key PEM)`.
///
/// The certificate is valid until `days_valid` days from now. For `days_valid > 0` it
/// became valid an hour ago; for `days_valid <= 0` it is already expired (it expired
/// `-days_valid` days ago and became valid a day before that), which the identity platform
/// answers with `AADSTS700027` "The key used is expired.".
///
/// # Panics
/// If OpenSSL fails (it does not on a working installation).
pub fn make_test_certificate(cn: &str, days_valid: i64) -> (String, String) {
    let (cert, key) = build(cn, days_valid).expect("generating a test certificate with OpenSSL");
    (
        pem_string(cert.to_pem().expect("certificate to PEM")),
        pem_string(key.private_key_to_pem_pkcs8().expect("private key to PEM")),
    )
}

/// Like [`make_test_certificate`], but the key and certificate come as a PKCS#12 bundle
/// (DER, protected with `password`; OpenSSL 3 defaults: AES-256-CBC, PBKDF2, SHA-256 MAC).
/// Returns `(certificate PEM, PKCS#12 DER)`; the bundle's friendly name is `cn`.
///
/// # Panics
/// If OpenSSL fails (it does not on a working installation).
pub fn make_test_pkcs12(cn: &str, days_valid: i64, password: &str) -> (String, Vec<u8>) {
    let (cert, key) = build(cn, days_valid).expect("generating a test certificate with OpenSSL");
    let p12 = Pkcs12::builder()
        .name(cn)
        .pkey(&key)
        .cert(&cert)
        .build2(password)
        .and_then(|p12| p12.to_der())
        .expect("building a PKCS#12 bundle with OpenSSL");
    (pem_string(cert.to_pem().expect("certificate to PEM")), p12)
}

fn build(cn: &str, days_valid: i64) -> Result<(X509, PKey<Private>), openssl::error::ErrorStack> {
    let key = PKey::from_rsa(Rsa::generate(2048)?)?;
    let now = chrono::Utc::now().timestamp();
    let not_after = now + days_valid * 86_400;
    let not_before = if days_valid > 0 {
        now - 3_600
    } else {
        not_after - 86_400
    };

    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_text("CN", cn)?;
    let name = name.build();
    let mut serial = BigNum::new()?;
    serial.rand(127, MsbOption::MAYBE_ZERO, false)?;
    let serial = Asn1Integer::from_bn(&serial)?;

    let mut builder = X509::builder()?;
    builder.set_version(2)?;
    builder.set_serial_number(&serial)?;
    builder.set_subject_name(&name)?;
    builder.set_issuer_name(&name)?;
    builder.set_pubkey(&key)?;
    let not_before = Asn1Time::from_unix(not_before)?;
    let not_after = Asn1Time::from_unix(not_after)?;
    builder.set_not_before(&not_before)?;
    builder.set_not_after(&not_after)?;
    builder.append_extension(BasicConstraints::new().critical().build()?)?;
    builder.append_extension(
        KeyUsage::new()
            .critical()
            .digital_signature()
            .key_encipherment()
            .build()?,
    )?;
    builder.sign(&key, MessageDigest::sha256())?;
    Ok((builder.build(), key))
}

fn pem_string(pem: Vec<u8>) -> String {
    String::from_utf8(pem).expect("PEM is ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_validity_follows_days_valid() {
        let (cert_pem, key_pem) = make_test_certificate("valid", 30);
        assert!(cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let cert = X509::from_pem(cert_pem.as_bytes()).unwrap();
        let now = Asn1Time::days_from_now(0).unwrap();
        assert!(cert.not_before() < now && cert.not_after() > now);
        let key = PKey::private_key_from_pem(key_pem.as_bytes()).unwrap();
        assert!(cert.public_key().unwrap().public_eq(&key));

        let (expired, _) = make_test_certificate("expired", -1);
        let expired = X509::from_pem(expired.as_bytes()).unwrap();
        assert!(expired.not_after() < now);
        assert!(expired.not_before() < expired.not_after());
    }

    #[test]
    fn pkcs12_opens_with_its_password() {
        let (cert_pem, der) = make_test_pkcs12("bundle", 1, "heslo");
        let parsed = Pkcs12::from_der(&der).unwrap().parse2("heslo").unwrap();
        let cert = X509::from_pem(cert_pem.as_bytes()).unwrap();
        assert_eq!(
            parsed.cert.unwrap().to_der().unwrap(),
            cert.to_der().unwrap()
        );
        assert!(cert.public_key().unwrap().public_eq(&parsed.pkey.unwrap()));
        assert!(Pkcs12::from_der(&der).unwrap().parse2("wrong").is_err());
    }
}
