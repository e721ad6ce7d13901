-- mailintake registry, SQLite dialect. Same logical schema as migrations/postgres/0001_registry.sql.
-- Timestamps are RFC 3339 UTC text; UIDs and UIDVALIDITY (u32) are stored as 64-bit integers.

-- Sync state per polled folder: the UIDVALIDITY we know and the high-water mark, the UID up to
-- which every message has been registered or quarantined (mail above it is taken whatever its
-- flags).
CREATE TABLE mailboxes (
    mailbox_id      TEXT    NOT NULL,
    folder          TEXT    NOT NULL,
    address         TEXT    NOT NULL,
    uidvalidity     INTEGER,
    high_water_uid  INTEGER NOT NULL DEFAULT 0,
    last_poll_at    TEXT,
    PRIMARY KEY (mailbox_id, folder)
) STRICT;

-- One row per distinct submission (raw bytes) of a mailbox: registered, with its registry
-- number, or quarantined, with a reason. The same bytes seen again are linked, not re-registered.
CREATE TABLE messages (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    mailbox_id          TEXT    NOT NULL,
    status              TEXT    NOT NULL CHECK (status IN ('registered', 'quarantined')),
    registry_number     TEXT    UNIQUE,
    registry_year       INTEGER,
    registry_seq        INTEGER,
    reason_code         TEXT,
    reason_detail       TEXT,
    raw_sha256          TEXT    NOT NULL,
    raw_size            INTEGER NOT NULL,
    rfc822_message_id   TEXT,
    message_id_derived  INTEGER NOT NULL DEFAULT 0,
    from_name           TEXT,
    from_address        TEXT,
    to_addresses        TEXT    NOT NULL DEFAULT '[]',
    cc_addresses        TEXT    NOT NULL DEFAULT '[]',
    date_header         TEXT,
    subject             TEXT,
    text_body           TEXT,
    html_body           TEXT,
    registered_at       TEXT    NOT NULL,
    UNIQUE (mailbox_id, raw_sha256),
    CHECK ((status = 'registered') = (registry_number IS NOT NULL))
) STRICT;

CREATE INDEX messages_registered_at ON messages (registered_at);
CREATE INDEX messages_status ON messages (status);

-- Where a submission was seen: (mailbox, folder, UIDVALIDITY, UID) for IMAP, a reference for
-- imports. One message may have several locations (a UIDVALIDITY change, a copy, a re-import).
CREATE TABLE message_locations (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id   INTEGER NOT NULL REFERENCES messages (id),
    mailbox_id   TEXT    NOT NULL,
    folder       TEXT    NOT NULL,
    uidvalidity  INTEGER,
    uid          INTEGER,
    source       TEXT    NOT NULL,
    source_ref   TEXT,
    seen_at      TEXT    NOT NULL,
    UNIQUE (mailbox_id, folder, uidvalidity, uid)
) STRICT;

CREATE INDEX message_locations_message ON message_locations (message_id);

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

CREATE INDEX attachments_sha256 ON attachments (sha256);

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

-- Processing attempts of messages not yet registered: counted before processing, cleared by the
-- registration, so a message that keeps failing (or keeps killing the worker) is quarantined.
CREATE TABLE processing_attempts (
    mailbox_id   TEXT    NOT NULL,
    folder       TEXT    NOT NULL,
    uidvalidity  INTEGER NOT NULL,
    uid          INTEGER NOT NULL,
    attempts     INTEGER NOT NULL,
    last_error   TEXT,
    updated_at   TEXT    NOT NULL,
    PRIMARY KEY (mailbox_id, folder, uidvalidity, uid)
) STRICT;

-- Registry number sequences: one per registry (prefix) and year, advanced inside the
-- registration transaction, so numbers have no gaps and no duplicates.
CREATE TABLE registry_sequences (
    registry    TEXT    NOT NULL,
    year        INTEGER NOT NULL,
    last_value  INTEGER NOT NULL,
    PRIMARY KEY (registry, year)
) STRICT;

-- Audit trail, append-only.
CREATE TABLE events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    at           TEXT    NOT NULL,
    kind         TEXT    NOT NULL,
    mailbox_id   TEXT,
    folder       TEXT,
    uidvalidity  INTEGER,
    uid          INTEGER,
    message_id   INTEGER,
    detail       TEXT
) STRICT;

CREATE INDEX events_message ON events (message_id);

CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN
    SELECT RAISE(ABORT, 'the events table is append-only');
END;

CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN
    SELECT RAISE(ABORT, 'the events table is append-only');
END;
