//! Encrypted refresh tokens of delegated credentials (the ciphertext only; keys and
//! encryption live in `credentials::store`).

use sqlx::Row;

use super::{Registry, RegistryError, now};

/// One stored token row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub ciphertext: String,
    pub account: Option<String>,
    pub stored_at: String,
    pub last_used_at: String,
}

impl Registry {
    /// Stores (or replaces) the credential's token: the old one is gone in the same statement.
    pub async fn put_credential_token(
        &self,
        credential: &str,
        ciphertext: &str,
        account: Option<&str>,
    ) -> Result<(), RegistryError> {
        let at = now();
        sqlx::query(
            "INSERT INTO credential_tokens (credential, ciphertext, account, stored_at, last_used_at) \
             VALUES ($1, $2, $3, $4, $4) \
             ON CONFLICT (credential) DO UPDATE SET ciphertext = $2, \
             account = COALESCE($3, credential_tokens.account), stored_at = $4, last_used_at = $4",
        )
        .bind(credential)
        .bind(ciphertext)
        .bind(account)
        .bind(&at)
        .execute(&self.pool)
        .await
        .map_err(RegistryError::db("store credential token"))?;
        Ok(())
    }

    pub async fn credential_token(
        &self,
        credential: &str,
    ) -> Result<Option<TokenRow>, RegistryError> {
        let row = sqlx::query(
            "SELECT ciphertext, account, stored_at, last_used_at FROM credential_tokens WHERE credential = $1",
        )
        .bind(credential)
        .fetch_optional(&self.pool)
        .await
        .map_err(RegistryError::db("read credential token"))?;
        Ok(row.map(|r| TokenRow {
            ciphertext: r.get(0),
            account: r.get(1),
            stored_at: r.get(2),
            last_used_at: r.get(3),
        }))
    }

    /// Records a successful use (a refresh that returned no new refresh token).
    pub async fn touch_credential_token(&self, credential: &str) -> Result<(), RegistryError> {
        sqlx::query("UPDATE credential_tokens SET last_used_at = $1 WHERE credential = $2")
            .bind(now())
            .bind(credential)
            .execute(&self.pool)
            .await
            .map_err(RegistryError::db("record credential token use"))?;
        Ok(())
    }
}
