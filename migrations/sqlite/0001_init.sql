-- Tenancy: applications (OAuth clients) and the bearer tokens issued to their organizers.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE applications (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);

CREATE TABLE tokens (
    token_hash    TEXT PRIMARY KEY,
    app_id        INTEGER NOT NULL REFERENCES applications(id),
    organizer_key INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    revoked_at    INTEGER
);

CREATE TABLE secret_keys (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    app_id     INTEGER NOT NULL REFERENCES applications(id),
    value      TEXT NOT NULL,
    valid_from INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX secret_keys_app ON secret_keys (app_id, valid_from);

CREATE TABLE webhooks (
    webhook_key   TEXT PRIMARY KEY,
    app_id        INTEGER NOT NULL REFERENCES applications(id),
    event_name    TEXT NOT NULL,
    event_version TEXT NOT NULL,
    callback_url  TEXT NOT NULL,
    state         TEXT NOT NULL,
    secret_key    TEXT,
    created_at    INTEGER NOT NULL,
    UNIQUE (app_id, event_name, callback_url)
);

CREATE TABLE user_subscriptions (
    subscription_key TEXT PRIMARY KEY,
    app_id           INTEGER NOT NULL REFERENCES applications(id),
    organizer_key    INTEGER NOT NULL,
    webhook_key      TEXT NOT NULL REFERENCES webhooks(webhook_key) ON DELETE CASCADE,
    callback_url     TEXT,
    state            TEXT NOT NULL,
    inactive_reason  TEXT,
    failing_since    INTEGER,
    created_at       INTEGER NOT NULL
);
CREATE INDEX user_subscriptions_owner ON user_subscriptions (app_id, organizer_key);
CREATE INDEX user_subscriptions_fanout ON user_subscriptions (organizer_key, webhook_key);
CREATE INDEX user_subscriptions_webhook ON user_subscriptions (webhook_key);

-- Delivery: events as published, one delivery per (event, subscription), one row per attempt.
CREATE TABLE events (
    event_key     TEXT PRIMARY KEY,
    organizer_key INTEGER NOT NULL,
    event_name    TEXT NOT NULL,
    body          BLOB NOT NULL,
    deliveries    INTEGER NOT NULL,
    created_at    INTEGER NOT NULL
);

CREATE TABLE deliveries (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    event_key        TEXT NOT NULL REFERENCES events(event_key),
    event_name       TEXT NOT NULL,
    app_id           INTEGER NOT NULL,
    webhook_key      TEXT NOT NULL,
    subscription_key TEXT NOT NULL,
    url              TEXT NOT NULL,
    state            TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER NOT NULL,
    lease_owner      TEXT,
    lease_until      INTEGER NOT NULL DEFAULT 0,
    last_status      INTEGER,
    last_error       TEXT,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL
);
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX deliveries_event ON deliveries (event_key);
CREATE INDEX deliveries_subscription ON deliveries (subscription_key, state);

CREATE TABLE attempts (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id      INTEGER NOT NULL REFERENCES deliveries(id),
    number           INTEGER NOT NULL,
    node             TEXT NOT NULL,
    started_at       INTEGER NOT NULL,
    duration_ms      INTEGER NOT NULL,
    status_code      INTEGER,
    error            TEXT,
    response_excerpt TEXT
);
CREATE INDEX attempts_delivery ON attempts (delivery_id);
