-- mailintake registry, PostgreSQL dialect. Same logical schema as migrations/sqlite/0001_registry.sql.
-- Timestamps are RFC 3339 UTC text (portable, sortable; cast with ::timestamptz when querying);
-- UIDs and UIDVALIDITY (u32) are stored as BIGINT.

CREATE TABLE mailboxes (
    mailbox_id      TEXT    NOT NULL,
    folder          TEXT    NOT NULL,
    address         TEXT    NOT NULL,
    uidvalidity     BIGINT,
    high_water_uid  BIGINT  NOT NULL DEFAULT 0,
    last_poll_at    TEXT,
    PRIMARY KEY (mailbox_id, folder)
);

CREATE TABLE messages (
    id                  BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    mailbox_id          TEXT    NOT NULL,
    folder              TEXT    NOT NULL,
    uidvalidity         BIGINT,
    uid                 BIGINT,
    source              TEXT    NOT NULL,
    source_ref          TEXT,
    raw_sha256          TEXT    NOT NULL,
    raw_size            BIGINT  NOT NULL,
    rfc822_message_id   TEXT    NOT NULL,
    message_id_derived  BIGINT  NOT NULL,
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
);

CREATE INDEX messages_registered_at ON messages (registered_at);
CREATE INDEX messages_raw_sha256 ON messages (mailbox_id, raw_sha256);

CREATE TABLE attachments (
    id              BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id      BIGINT  NOT NULL REFERENCES messages (id),
    ordinal         BIGINT  NOT NULL,
    parent_ordinal  BIGINT,
    filename        TEXT,
    content_type    TEXT    NOT NULL,
    size            BIGINT  NOT NULL,
    sha256          TEXT    NOT NULL,
    UNIQUE (message_id, ordinal)
);

CREATE TABLE pending_acks (
    id           BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    mailbox_id   TEXT    NOT NULL,
    folder       TEXT    NOT NULL,
    uidvalidity  BIGINT  NOT NULL,
    uid          BIGINT  NOT NULL,
    action       TEXT    NOT NULL,
    message_id   BIGINT  NOT NULL REFERENCES messages (id),
    created_at   TEXT    NOT NULL,
    UNIQUE (mailbox_id, folder, uidvalidity, uid)
);
