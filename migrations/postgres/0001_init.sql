-- Tenancy: applications (OAuth clients) and the bearer tokens issued to their organizers.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE applications (
    id         BIGSERIAL PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

CREATE TABLE tokens (
    token_hash    TEXT PRIMARY KEY,
    app_id        BIGINT NOT NULL REFERENCES applications(id),
    organizer_key BIGINT NOT NULL,
    created_at    BIGINT NOT NULL,
    revoked_at    BIGINT
);

CREATE TABLE secret_keys (
    id         BIGSERIAL PRIMARY KEY,
    app_id     BIGINT NOT NULL REFERENCES applications(id),
    value      TEXT NOT NULL,
    valid_from BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX secret_keys_app ON secret_keys (app_id, valid_from);

CREATE TABLE webhooks (
    webhook_key   TEXT PRIMARY KEY,
    app_id        BIGINT NOT NULL REFERENCES applications(id),
    event_name    TEXT NOT NULL,
    event_version TEXT NOT NULL,
    callback_url  TEXT NOT NULL,
    state         TEXT NOT NULL,
    secret_key    TEXT,
    created_at    BIGINT NOT NULL,
    UNIQUE (app_id, event_name, callback_url)
);

CREATE TABLE user_subscriptions (
    subscription_key TEXT PRIMARY KEY,
    app_id           BIGINT NOT NULL REFERENCES applications(id),
    organizer_key    BIGINT NOT NULL,
    webhook_key      TEXT NOT NULL REFERENCES webhooks(webhook_key) ON DELETE CASCADE,
    callback_url     TEXT,
    state            TEXT NOT NULL,
    inactive_reason  TEXT,
    failing_since    BIGINT,
    created_at       BIGINT NOT NULL
);
CREATE INDEX user_subscriptions_owner ON user_subscriptions (app_id, organizer_key);
CREATE INDEX user_subscriptions_fanout ON user_subscriptions (organizer_key, webhook_key);
CREATE INDEX user_subscriptions_webhook ON user_subscriptions (webhook_key);

-- Delivery: events as published, one delivery per (event, subscription), one row per attempt.
CREATE TABLE events (
    event_key     TEXT PRIMARY KEY,
    organizer_key BIGINT NOT NULL,
    event_name    TEXT NOT NULL,
    body          BYTEA NOT NULL,
    deliveries    BIGINT NOT NULL,
    created_at    BIGINT NOT NULL
);

CREATE TABLE deliveries (
    id               BIGSERIAL PRIMARY KEY,
    event_key        TEXT NOT NULL REFERENCES events(event_key),
    event_name       TEXT NOT NULL,
    app_id           BIGINT NOT NULL,
    webhook_key      TEXT NOT NULL,
    subscription_key TEXT NOT NULL,
    url              TEXT NOT NULL,
    state            TEXT NOT NULL,
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT NOT NULL,
    lease_owner      TEXT,
    lease_until      BIGINT NOT NULL DEFAULT 0,
    last_status      BIGINT,
    last_error       TEXT,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL
);
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX deliveries_event ON deliveries (event_key);
CREATE INDEX deliveries_subscription ON deliveries (subscription_key, state);

CREATE TABLE attempts (
    id               BIGSERIAL PRIMARY KEY,
    delivery_id      BIGINT NOT NULL REFERENCES deliveries(id),
    number           BIGINT NOT NULL,
    node             TEXT NOT NULL,
    started_at       BIGINT NOT NULL,
    duration_ms      BIGINT NOT NULL,
    status_code      BIGINT,
    error            TEXT,
    response_excerpt TEXT
);
CREATE INDEX attempts_delivery ON attempts (delivery_id);
