-- Outbox: events written in the business transaction, relayed to the broker.
-- Times are microseconds since the Unix epoch.
CREATE TABLE IF NOT EXISTS outbox_events (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT    NOT NULL UNIQUE,          -- the event id
    tenant_id       INTEGER,
    aggregate_type  TEXT    NOT NULL,
    aggregate_id    TEXT    NOT NULL,
    event_type      TEXT    NOT NULL,
    event_version   INTEGER NOT NULL,
    topic           TEXT    NOT NULL,
    envelope        TEXT    NOT NULL,                 -- the envelope's JSON, as published
    trace_id        TEXT,
    correlation_id  TEXT,
    status          TEXT    NOT NULL DEFAULT 'pending', -- pending | published | dead_lettered
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    published_at    INTEGER,
    idempotency_key TEXT    NOT NULL UNIQUE,
    claimed_by      TEXT,
    lease_until     INTEGER
);
CREATE INDEX IF NOT EXISTS outbox_events_pending ON outbox_events (status, aggregate_id, event_version);
CREATE INDEX IF NOT EXISTS outbox_events_published ON outbox_events (status, published_at);

-- The single SQLite relay holds this lease while it runs.
CREATE TABLE IF NOT EXISTS outbox_relay_lease (
    name        TEXT PRIMARY KEY,
    holder      TEXT    NOT NULL,
    lease_until INTEGER NOT NULL
);

-- Inbox: one row per (event, handler) whose effects are committed.
CREATE TABLE IF NOT EXISTS inbox_events (
    event_id     TEXT    NOT NULL,
    handler      TEXT    NOT NULL,
    processed_at INTEGER NOT NULL,
    PRIMARY KEY (event_id, handler)
);
