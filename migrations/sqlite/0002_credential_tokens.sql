-- Refresh tokens of delegated credentials, encrypted (AES-256-GCM, the credential name as
-- associated data). One row per credential; a rotated token replaces the old one in place.
CREATE TABLE credential_tokens (
    credential    TEXT    NOT NULL PRIMARY KEY,
    ciphertext    TEXT    NOT NULL,
    account       TEXT,
    stored_at     TEXT    NOT NULL,
    last_used_at  TEXT    NOT NULL
) STRICT;
