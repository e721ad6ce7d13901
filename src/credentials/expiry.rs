//! Expiry before it bites: client secrets (date from the configuration), certificates (read
//! from the certificate) and delegated refresh tokens (90 days without use), with warnings at
//! 30, 7 and 1 days.

use chrono::{DateTime, NaiveDate, Utc};

use super::TokenStore;
use crate::config::{Config, CredentialConfig};

/// Refresh tokens of Microsoft's identity platform die after this many days without use.
pub const REFRESH_INACTIVITY_DAYS: i64 = 90;
/// Warn when this many days or fewer remain.
pub const THRESHOLDS: [i64; 3] = [30, 7, 1];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub credential: String,
    /// What expires: "client secret", "certificate CN=…", "refresh token (inactivity)".
    pub what: String,
    pub expires: DateTime<Utc>,
    pub days_left: i64,
}

impl Notice {
    /// The warning level this notice has reached: None above 30 days.
    pub fn level(&self) -> Option<&'static str> {
        match self.days_left {
            d if d < 0 => Some("EXPIRED"),
            d if d <= 1 => Some("expires within 1 day"),
            d if d <= 7 => Some("expires within 7 days"),
            d if d <= 30 => Some("expires within 30 days"),
            _ => None,
        }
    }

    pub fn render(&self) -> String {
        let when = self.expires.format("%Y-%m-%d");
        match self.level() {
            Some("EXPIRED") => format!(
                "credential {}: {} EXPIRED on {when}",
                self.credential, self.what
            ),
            Some(level) => format!(
                "credential {}: {} {level} ({} days left, on {when})",
                self.credential, self.what, self.days_left
            ),
            None => format!(
                "credential {}: {} valid until {when} ({} days)",
                self.credential, self.what, self.days_left
            ),
        }
    }
}

fn days_until(at: DateTime<Utc>, now: DateTime<Utc>) -> i64 {
    (at - now).num_days()
}

fn end_of(date: NaiveDate) -> DateTime<Utc> {
    date.and_hms_opt(23, 59, 59)
        .map(|d| d.and_utc())
        .unwrap_or_else(Utc::now)
}

/// Every expiry mailintake knows about, due or not.
pub async fn notices(config: &Config, store: Option<&TokenStore>) -> Vec<Notice> {
    let now = Utc::now();
    let mut out = Vec::new();
    for (name, cred) in &config.credentials {
        match cred {
            CredentialConfig::EntraAppSecret(app) => {
                if let Some(date) = app.secret_expires {
                    let expires = end_of(date);
                    out.push(Notice {
                        credential: name.clone(),
                        what: "client secret".into(),
                        expires,
                        days_left: days_until(expires, now),
                    });
                }
            }
            CredentialConfig::EntraAppCertificate(app) => out.push(Notice {
                credential: name.clone(),
                what: format!("certificate {}", app.certificate.subject),
                expires: app.certificate.not_after,
                days_left: days_until(app.certificate.not_after, now),
            }),
            CredentialConfig::Delegated(_) => {
                let Some(store) = store else { continue };
                let loaded = store.load(name).await.unwrap_or_else(|e| {
                    // A token that cannot be read (the key changed, the database is down)
                    // has no known expiry: said, not skipped silently.
                    tracing::warn!(credential = %name, error = %e, "cannot read the stored refresh token to check when it expires");
                    None
                });
                if let Some(token) = loaded
                    && let Ok(used) = DateTime::parse_from_rfc3339(&token.last_used_at)
                {
                    let expires =
                        used.with_timezone(&Utc) + chrono::Duration::days(REFRESH_INACTIVITY_DAYS);
                    out.push(Notice {
                        credential: name.clone(),
                        what: format!(
                            "refresh token (after {REFRESH_INACTIVITY_DAYS} days without use)"
                        ),
                        expires,
                        days_left: days_until(expires, now),
                    });
                }
            }
            CredentialConfig::Password(_) => {}
        }
    }
    out
}

/// Logs the notices that reached a warning level.
pub fn log_due(notices: &[Notice]) {
    for n in notices.iter().filter(|n| n.level().is_some()) {
        tracing::warn!(credential = %n.credential, what = %n.what, days_left = n.days_left, "{}", n.render());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(days: i64) -> Notice {
        Notice {
            credential: "c".into(),
            what: "client secret".into(),
            expires: Utc::now() + chrono::Duration::days(days),
            days_left: days,
        }
    }

    #[test]
    fn levels_at_30_7_and_1_days() {
        assert_eq!(notice(31).level(), None);
        assert_eq!(notice(30).level(), Some("expires within 30 days"));
        assert_eq!(notice(7).level(), Some("expires within 7 days"));
        assert_eq!(notice(1).level(), Some("expires within 1 day"));
        assert_eq!(notice(-1).level(), Some("EXPIRED"));
        assert!(notice(5).render().contains("5 days left"));
    }
}
