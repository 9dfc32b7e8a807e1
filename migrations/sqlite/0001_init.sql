-- engaged schema (SQLite). Times are Unix milliseconds (UTC).

CREATE TABLE customers (
    id          TEXT PRIMARY KEY NOT NULL,
    email       TEXT,
    name        TEXT,
    created_at  INTEGER,
    timezone    TEXT,
    model       TEXT NOT NULL DEFAULT 'low-touch',
    owner       TEXT,
    traits      TEXT NOT NULL DEFAULT '{}',
    updated_at  INTEGER NOT NULL
);

CREATE TABLE customer_tags (
    customer_id TEXT NOT NULL,
    tag         TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (customer_id, tag)
);

-- Events are kept even when their customer is not known yet (Segment often
-- sends `track` before `identify`), so there is no foreign key.
CREATE TABLE events (
    seq         INTEGER PRIMARY KEY,
    message_id  TEXT NOT NULL UNIQUE,
    customer_id TEXT NOT NULL,
    name        TEXT NOT NULL,
    properties  TEXT NOT NULL DEFAULT '{}',
    at          INTEGER NOT NULL
);
CREATE INDEX events_by_customer ON events (customer_id, at);

CREATE TABLE runs (
    id          INTEGER PRIMARY KEY,
    trigger     TEXT NOT NULL,
    now         INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    status      TEXT NOT NULL,
    summary     TEXT NOT NULL DEFAULT '{}'
);

CREATE TABLE run_errors (
    run_id      INTEGER NOT NULL REFERENCES runs (id),
    rule        TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    message     TEXT NOT NULL
);
CREATE INDEX run_errors_by_run ON run_errors (run_id);

-- The outbox and the ledger of everything ever planned. A dedup key exists
-- at most once, ever: that is what makes "at most once per customer, rule
-- and key" hold across reruns, retries and overlapping runs.
CREATE TABLE actions (
    id              INTEGER PRIMARY KEY,
    run_id          INTEGER NOT NULL REFERENCES runs (id),
    customer_id     TEXT NOT NULL,
    rule            TEXT NOT NULL,
    kind            TEXT NOT NULL,
    dedup_key       TEXT NOT NULL UNIQUE,
    payload         TEXT NOT NULL,
    status          TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    lease_until     INTEGER,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    finished_at     INTEGER
);
CREATE INDEX actions_due ON actions (status, next_attempt_at);
CREATE INDEX actions_by_customer ON actions (customer_id);
CREATE INDEX actions_by_run ON actions (run_id);

CREATE TABLE escalations (
    id          INTEGER PRIMARY KEY,
    run_id      INTEGER REFERENCES runs (id),
    customer_id TEXT NOT NULL,
    rule        TEXT NOT NULL,
    reason      TEXT NOT NULL,
    owner       TEXT NOT NULL,
    status      TEXT NOT NULL DEFAULT 'open',
    created_at  INTEGER NOT NULL,
    resolved_at INTEGER
);
-- At most one open escalation per customer and rule.
CREATE UNIQUE INDEX escalations_one_open ON escalations (customer_id, rule) WHERE status = 'open';

CREATE TABLE settings (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
