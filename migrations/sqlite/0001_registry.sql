-- mailintake registry, SQLite dialect. Same logical schema as migrations/postgres/0001_registry.sql.
-- Timestamps are RFC 3339 UTC text; UIDs and UIDVALIDITY (u32) are stored as 64-bit integers.

-- Sync state per polled folder: the UIDVALIDITY we know and the high-water mark, the UID up to
-- which every message has been registered (mail above it is taken whatever its flags).
CREATE TABLE mailboxes (
    mailbox_id      TEXT    NOT NULL,
    folder          TEXT    NOT NULL,
    address         TEXT    NOT NULL,
    uidvalidity     INTEGER,
    high_water_uid  INTEGER NOT NULL DEFAULT 0,
    last_poll_at    TEXT,
    PRIMARY KEY (mailbox_id, folder)
) STRICT;

-- One row per registered submission.
CREATE TABLE messages (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    mailbox_id          TEXT    NOT NULL,
    folder              TEXT    NOT NULL,
    uidvalidity         INTEGER,
    uid                 INTEGER,
    source              TEXT    NOT NULL,
    source_ref          TEXT,
    raw_sha256          TEXT    NOT NULL,
    raw_size            INTEGER NOT NULL,
    rfc822_message_id   TEXT    NOT NULL,
    message_id_derived  INTEGER NOT NULL,
    from_name           TEXT,
    from_address        TEXT,
    to_addresses        TEXT    NOT NULL,
    cc_addresses        TEXT    NOT NULL,
    date_header         TEXT,
    subject             TEXT,
    text_body           TEXT,
    html_body           TEXT,
    registered_at       TEXT    NOT NULL,
    UNIQUE (mailbox_id, folder, uidvalidity, uid)
) STRICT;

CREATE INDEX messages_registered_at ON messages (registered_at);
CREATE INDEX messages_raw_sha256 ON messages (mailbox_id, raw_sha256);

CREATE TABLE attachments (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id      INTEGER NOT NULL REFERENCES messages (id),
    ordinal         INTEGER NOT NULL,
    parent_ordinal  INTEGER,
    filename        TEXT,
    content_type    TEXT    NOT NULL,
    size            INTEGER NOT NULL,
    sha256          TEXT    NOT NULL,
    UNIQUE (message_id, ordinal)
) STRICT;

-- Acknowledgements still to perform on the server (\Seen or MOVE), written in the same
-- transaction as the registration and deleted once the server confirmed them.
CREATE TABLE pending_acks (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    mailbox_id   TEXT    NOT NULL,
    folder       TEXT    NOT NULL,
    uidvalidity  INTEGER NOT NULL,
    uid          INTEGER NOT NULL,
    action       TEXT    NOT NULL,
    message_id   INTEGER NOT NULL REFERENCES messages (id),
    created_at   TEXT    NOT NULL,
    UNIQUE (mailbox_id, folder, uidvalidity, uid)
) STRICT;
