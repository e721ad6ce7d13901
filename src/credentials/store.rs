//! Refresh tokens at rest: AES-256-GCM with a key from a file, an environment variable or a
//! systemd credential; the credential's name is the associated data, so a ciphertext cannot be
//! moved to another credential's row.

use base64::Engine as _;
use openssl::symm::{Cipher, decrypt_aead, encrypt_aead};

use super::CredentialError;
use crate::config::TokenKey;
use crate::registry::{CredentialLock, Registry, RegistryError};
use crate::secret::Secret;

const NONCE: usize = 12;
const TAG: usize = 16;

#[derive(Clone)]
pub struct TokenStore {
    registry: Registry,
    key: TokenKey,
}

/// A stored refresh token, decrypted.
#[derive(Debug, Clone)]
pub struct StoredToken {
    pub refresh_token: Secret,
    pub account: Option<String>,
    pub stored_at: String,
    pub last_used_at: String,
}

fn store_error(credential: &str, detail: String) -> CredentialError {
    CredentialError::Store {
        credential: credential.to_owned(),
        detail,
        transient: false,
    }
}

/// The registry failed: temporary if the database could not be reached, so that the scheduler
/// retries at the next tick instead of backing off as for a fault an administrator must fix.
fn registry_error(credential: &str, e: RegistryError) -> CredentialError {
    CredentialError::Store {
        credential: credential.to_owned(),
        transient: e.is_transient(),
        detail: e.to_string(),
    }
}

impl TokenStore {
    pub fn new(registry: Registry, key: TokenKey) -> TokenStore {
        TokenStore { registry, key }
    }

    pub fn seal(&self, credential: &str, plaintext: &str) -> Result<String, CredentialError> {
        let nonce: [u8; NONCE] = rand::random();
        let mut tag = [0u8; TAG];
        let ciphertext = encrypt_aead(
            Cipher::aes_256_gcm(),
            &self.key.0,
            Some(&nonce),
            credential.as_bytes(),
            plaintext.as_bytes(),
            &mut tag,
        )
        .map_err(|e| store_error(credential, format!("encryption failed: {e}")))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ciphertext);
        out.extend_from_slice(&tag);
        Ok(base64::engine::general_purpose::STANDARD.encode(out))
    }

    pub fn open(&self, credential: &str, sealed: &str) -> Result<Secret, CredentialError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .map_err(|e| store_error(credential, format!("stored token is not base64: {e}")))?;
        if bytes.len() < NONCE + TAG {
            return Err(store_error(credential, "stored token is truncated".into()));
        }
        let (nonce, rest) = bytes.split_at(NONCE);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG);
        let plain = decrypt_aead(
            Cipher::aes_256_gcm(),
            &self.key.0,
            Some(nonce),
            credential.as_bytes(),
            ciphertext,
            tag,
        )
        .map_err(|_| {
            store_error(
                credential,
                "the stored token cannot be decrypted: the token key changed, or the row was tampered with; run `mailintake auth login` again".into(),
            )
        })?;
        String::from_utf8(plain)
            .map(Secret::new)
            .map_err(|_| store_error(credential, "decrypted token is not text".into()))
    }

    /// Waits until no other process is refreshing this credential, then holds it off until
    /// the lock is released (see [`CredentialLock`]).
    pub async fn lock(&self, credential: &str) -> Result<CredentialLock, CredentialError> {
        self.registry
            .lock_credential(credential)
            .await
            .map_err(|e| registry_error(credential, e))
    }

    pub async fn load(&self, credential: &str) -> Result<Option<StoredToken>, CredentialError> {
        let Some(row) = self
            .registry
            .credential_token(credential)
            .await
            .map_err(|e| registry_error(credential, e))?
        else {
            return Ok(None);
        };
        Ok(Some(StoredToken {
            refresh_token: self.open(credential, &row.ciphertext)?,
            account: row.account,
            stored_at: row.stored_at,
            last_used_at: row.last_used_at,
        }))
    }

    /// Stores a (new or rotated) refresh token, replacing the old one in the same statement.
    pub async fn save(
        &self,
        credential: &str,
        refresh_token: &str,
        account: Option<&str>,
    ) -> Result<(), CredentialError> {
        let sealed = self.seal(credential, refresh_token)?;
        self.registry
            .put_credential_token(credential, &sealed, account)
            .await
            .map_err(|e| registry_error(credential, e))
    }

    pub async fn touch(&self, credential: &str) -> Result<(), CredentialError> {
        self.registry
            .touch_credential_token(credential)
            .await
            .map_err(|e| registry_error(credential, e))
    }
}
