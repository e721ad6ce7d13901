//! Small X.509 helpers shared by certificate credentials and `check`'s TLS step.

use openssl::asn1::{Asn1Time, Asn1TimeRef};
use openssl::x509::X509NameRef;

/// `CN=…, O=…` for people.
pub fn name(name: &X509NameRef) -> String {
    name.entries()
        .map(|e| {
            format!(
                "{}={}",
                e.object().nid().short_name().unwrap_or("?"),
                e.data().to_string().unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// An ASN.1 time as UTC.
pub fn to_chrono(t: &Asn1TimeRef) -> Option<chrono::DateTime<chrono::Utc>> {
    let epoch = Asn1Time::from_unix(0).ok()?;
    let diff = epoch.diff(t).ok()?;
    chrono::DateTime::from_timestamp(i64::from(diff.days) * 86_400 + i64::from(diff.secs), 0)
}
