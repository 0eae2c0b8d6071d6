-- Outbox: events written in the business transaction, relayed to the broker.
-- Times are microseconds since the Unix epoch.
CREATE TABLE IF NOT EXISTS outbox_events (
    seq             BIGSERIAL PRIMARY KEY,
    id              TEXT    NOT NULL UNIQUE,          -- the event id
    tenant_id       BIGINT,
    aggregate_type  TEXT    NOT NULL,
    aggregate_id    TEXT    NOT NULL,
    event_type      TEXT    NOT NULL,
    event_version   BIGINT  NOT NULL,
    topic           TEXT    NOT NULL,
    envelope        TEXT    NOT NULL,                 -- the envelope's JSON, as published
    trace_id        TEXT,
    correlation_id  TEXT,
    status          TEXT    NOT NULL DEFAULT 'pending', -- pending | published | dead_lettered
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT  NOT NULL,
    last_error      TEXT,
    created_at      BIGINT  NOT NULL,
    published_at    BIGINT,
    idempotency_key TEXT    NOT NULL UNIQUE,
    claimed_by      TEXT,
    lease_until     BIGINT
);
CREATE INDEX IF NOT EXISTS outbox_events_pending ON outbox_events (status, aggregate_id, event_version);
CREATE INDEX IF NOT EXISTS outbox_events_published ON outbox_events (status, published_at);

-- Wakes relays (LISTEN outbox_events) as soon as rows commit.
CREATE OR REPLACE FUNCTION outbox_events_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('outbox_events', '');
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS outbox_events_notify ON outbox_events;
CREATE TRIGGER outbox_events_notify AFTER INSERT ON outbox_events
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_events_notify();

CREATE TABLE IF NOT EXISTS outbox_relay_lease (
    name        TEXT PRIMARY KEY,
    holder      TEXT   NOT NULL,
    lease_until BIGINT NOT NULL
);

-- Inbox: one row per (event, handler) whose effects are committed.
CREATE TABLE IF NOT EXISTS inbox_events (
    event_id     TEXT   NOT NULL,
    handler      TEXT   NOT NULL,
    processed_at BIGINT NOT NULL,
    PRIMARY KEY (event_id, handler)
);
