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
    status              TEXT    NOT NULL CHECK (status IN ('registered', 'quarantined')),
    registry_number     TEXT    UNIQUE,
    registry_year       BIGINT,
    registry_seq        BIGINT,
    reason_code         TEXT,
    reason_detail       TEXT,
    raw_sha256          TEXT    NOT NULL,
    raw_size            BIGINT  NOT NULL,
    rfc822_message_id   TEXT,
    message_id_derived  BIGINT  NOT NULL DEFAULT 0,
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
);

CREATE INDEX messages_registered_at ON messages (registered_at);
CREATE INDEX messages_status ON messages (status);

CREATE TABLE message_locations (
    id           BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id   BIGINT  NOT NULL REFERENCES messages (id),
    mailbox_id   TEXT    NOT NULL,
    folder       TEXT    NOT NULL,
    uidvalidity  BIGINT,
    uid          BIGINT,
    source       TEXT    NOT NULL,
    source_ref   TEXT,
    seen_at      TEXT    NOT NULL,
    UNIQUE (mailbox_id, folder, uidvalidity, uid)
);

CREATE INDEX message_locations_message ON message_locations (message_id);

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

CREATE INDEX attachments_sha256 ON attachments (sha256);

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

CREATE TABLE processing_attempts (
    mailbox_id   TEXT    NOT NULL,
    folder       TEXT    NOT NULL,
    uidvalidity  BIGINT  NOT NULL,
    uid          BIGINT  NOT NULL,
    attempts     BIGINT  NOT NULL,
    last_error   TEXT,
    updated_at   TEXT    NOT NULL,
    PRIMARY KEY (mailbox_id, folder, uidvalidity, uid)
);

CREATE TABLE registry_sequences (
    registry    TEXT    NOT NULL,
    year        BIGINT  NOT NULL,
    last_value  BIGINT  NOT NULL,
    PRIMARY KEY (registry, year)
);

CREATE TABLE events (
    id           BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at           TEXT    NOT NULL,
    kind         TEXT    NOT NULL,
    mailbox_id   TEXT,
    folder       TEXT,
    uidvalidity  BIGINT,
    uid          BIGINT,
    message_id   BIGINT,
    detail       TEXT
);

CREATE INDEX events_message ON events (message_id);

CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the events table is append-only';
END;
$$;

CREATE TRIGGER events_no_update BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_append_only();
