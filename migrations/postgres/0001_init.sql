-- engaged schema (PostgreSQL): the SQLite migrations 0001–0006 collapsed
-- into one. Times are Unix milliseconds (UTC) in BIGINT, as in SQLite.
--
-- JSON is kept as TEXT, as the application wrote it (payloads, properties,
-- summaries round-trip byte for byte); the few statements that change JSON
-- cast to jsonb for that step.
--
-- Customer ids sort bytewise (COLLATE "C") whatever the database's locale:
-- evaluation pages customers by id and reads their events by id range, and
-- both must agree with each other and with SQLite's order.
--
-- Every integer column is BIGINT so that one row decoder (i64) fits all.

CREATE TABLE customers (
    id          TEXT COLLATE "C" PRIMARY KEY,
    email       TEXT,
    name        TEXT,
    created_at  BIGINT,
    timezone    TEXT,
    model       TEXT NOT NULL DEFAULT 'low-touch',
    owner       TEXT,
    traits      TEXT NOT NULL DEFAULT '{}',
    updated_at  BIGINT NOT NULL
);

CREATE TABLE customer_tags (
    customer_id TEXT COLLATE "C" NOT NULL,
    tag         TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (customer_id, tag)
);

-- Events are kept even when their customer is not known yet (Segment often
-- sends `track` before `identify`), so there is no foreign key.
CREATE TABLE events (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id  TEXT NOT NULL UNIQUE,
    customer_id TEXT COLLATE "C" NOT NULL,
    name        TEXT NOT NULL,
    properties  TEXT NOT NULL DEFAULT '{}',
    at          BIGINT NOT NULL
);
CREATE INDEX events_by_customer ON events (customer_id, at);

CREATE TABLE runs (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    trigger     TEXT NOT NULL,
    now         BIGINT NOT NULL,
    started_at  BIGINT NOT NULL,
    finished_at BIGINT,
    status      TEXT NOT NULL,
    summary     TEXT NOT NULL DEFAULT '{}'
);

-- `seq` keeps the order errors were recorded in (SQLite's rowid).
CREATE TABLE run_errors (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id      BIGINT NOT NULL REFERENCES runs (id),
    rule        TEXT NOT NULL,
    customer_id TEXT COLLATE "C" NOT NULL,
    message     TEXT NOT NULL
);
CREATE INDEX run_errors_by_run ON run_errors (run_id);

-- The outbox and the ledger of everything ever planned. A dedup key exists
-- at most once, ever: that is what makes "at most once per customer, rule
-- and key" hold across reruns, retries, overlapping runs and replicas
-- (concurrent commits of one key meet at this unique index).
CREATE TABLE actions (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id          BIGINT NOT NULL REFERENCES runs (id),
    customer_id     TEXT COLLATE "C" NOT NULL,
    rule            TEXT NOT NULL,
    kind            TEXT NOT NULL,
    dedup_key       TEXT NOT NULL UNIQUE,
    payload         TEXT NOT NULL,
    status          TEXT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    lease_until     BIGINT,
    last_error      TEXT,
    created_at      BIGINT NOT NULL,
    finished_at     BIGINT,
    -- Each claim gets a token; only the claimant may record the outcome, so
    -- a worker whose lease expired cannot overwrite what another worker did.
    claim_token     TEXT,
    -- The frequency cap counts an email at the time it counts for the
    -- customer: the evaluation time of the run that planned it, or later
    -- when it waited for the send window or was released from a hold.
    cap_at          BIGINT,
    -- "Deduplicated" is part of the audit trail: how often later runs
    -- wanted an action again, and the last run that did.
    repeats         BIGINT NOT NULL DEFAULT 0,
    repeated_run    BIGINT,
    repeated_at     BIGINT
);
CREATE INDEX actions_due ON actions (status, next_attempt_at);
CREATE INDEX actions_by_customer ON actions (customer_id);
CREATE INDEX actions_by_run ON actions (run_id);

CREATE TABLE escalations (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id          BIGINT REFERENCES runs (id),
    customer_id     TEXT COLLATE "C" NOT NULL,
    rule            TEXT NOT NULL,
    reason          TEXT NOT NULL,
    owner           TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'open',
    created_at      BIGINT NOT NULL,
    resolved_at     BIGINT,
    acknowledged_at BIGINT,
    -- When the owner was last told, how often, and whether the customer
    -- recovered while it was open.
    notified_at     BIGINT,
    notifications   BIGINT NOT NULL DEFAULT 1,
    recovered_at    BIGINT,
    note            TEXT
);
-- At most one open escalation per customer and rule; acknowledged ones are
-- still open for this purpose.
CREATE UNIQUE INDEX escalations_one_open ON escalations (customer_id, rule)
    WHERE status IN ('open', 'acknowledged');
-- "Not reopened for the same reason" looks escalations up by customer and
-- rule on every escalate().
CREATE INDEX escalations_by_customer_rule ON escalations (customer_id, rule);

CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- One row per schedule firing. The primary key makes a firing happen once
-- even with several replicas ticking; `running` rows carry a lease so a
-- firing claimed by a process that died is run again by another.
CREATE TABLE schedule_firings (
    schedule    TEXT NOT NULL,
    fire_at     BIGINT NOT NULL,
    status      TEXT NOT NULL,          -- pending, running, done, skipped, failed
    lease_until BIGINT,
    run_id      BIGINT REFERENCES runs (id),
    note        TEXT,
    created_at  BIGINT NOT NULL,
    finished_at BIGINT,
    PRIMARY KEY (schedule, fire_at)
);
CREATE INDEX schedule_firings_status ON schedule_firings (status, fire_at);

-- Addresses that get no marketing email (unsubscribed, bounced,
-- complained), stored lower-cased.
CREATE TABLE suppressions (
    email      TEXT PRIMARY KEY,
    reason     TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- The audit trail of decisions that leave no outbox row. A decision that
-- repeats every run is one row with a count, not one row per run.
CREATE TABLE decisions (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id      BIGINT NOT NULL REFERENCES runs (id),
    customer_id TEXT COLLATE "C" NOT NULL,
    rule        TEXT NOT NULL,
    subject     TEXT NOT NULL,
    decision    TEXT NOT NULL,
    reason      TEXT NOT NULL,
    at          BIGINT NOT NULL,
    dedup_key   TEXT,
    first_at    BIGINT,
    times       BIGINT NOT NULL DEFAULT 1
);
CREATE INDEX decisions_by_customer ON decisions (customer_id);
CREATE UNIQUE INDEX decisions_once ON decisions (dedup_key, decision);

-- One planner at a time: the policies (suppression, caps, guard) read the
-- ledger and the commit writes it; two overlapping runs (a CLI `run` next
-- to `serve`, two replicas) must not both see room under a cap. A crashed
-- holder's lease expires.
CREATE TABLE planner_lock (
    id     BIGINT PRIMARY KEY CHECK (id = 1),
    holder TEXT,
    until  BIGINT NOT NULL
);
INSERT INTO planner_lock (id, holder, until) VALUES (1, NULL, 0);

-- RFC 7396 JSON merge patch, as SQLite's json_patch() applies it to a
-- customer's traits on re-import: objects merge key by key (recursively),
-- a null removes the key, anything else replaces.
CREATE FUNCTION engaged_json_patch(target jsonb, patch jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    result jsonb;
    k text;
    v jsonb;
BEGIN
    IF patch IS NULL OR jsonb_typeof(patch) <> 'object' THEN
        RETURN patch;
    END IF;
    IF target IS NULL OR jsonb_typeof(target) <> 'object' THEN
        result := '{}'::jsonb;
    ELSE
        result := target;
    END IF;
    FOR k, v IN SELECT key, value FROM jsonb_each(patch) LOOP
        IF jsonb_typeof(v) = 'null' THEN
            result := result - k;
        ELSE
            result := jsonb_set(result, ARRAY[k], engaged_json_patch(result -> k, v));
        END IF;
    END LOOP;
    RETURN result;
END
$$;
