-- The daemon: a durable schedule ledger, suppressions, acknowledged escalations.

-- One row per schedule firing. The primary key makes a firing happen once
-- even with several replicas ticking; `running` rows carry a lease so a
-- firing claimed by a process that died is run again by another.
CREATE TABLE schedule_firings (
    schedule    TEXT NOT NULL,
    fire_at     INTEGER NOT NULL,
    status      TEXT NOT NULL,          -- pending, running, done, skipped, failed
    lease_until INTEGER,
    run_id      INTEGER REFERENCES runs (id),
    note        TEXT,
    created_at  INTEGER NOT NULL,
    finished_at INTEGER,
    PRIMARY KEY (schedule, fire_at)
);
CREATE INDEX schedule_firings_status ON schedule_firings (status, fire_at);

-- Addresses that get no marketing email (unsubscribed, bounced, complained).
CREATE TABLE suppressions (
    email      TEXT PRIMARY KEY NOT NULL,
    reason     TEXT NOT NULL,
    created_at INTEGER NOT NULL
);

-- Acknowledged escalations are still open for dedup purposes.
DROP INDEX escalations_one_open;
CREATE UNIQUE INDEX escalations_one_open ON escalations (customer_id, rule)
    WHERE status IN ('open', 'acknowledged');
ALTER TABLE escalations ADD COLUMN acknowledged_at INTEGER;

-- Each claim gets a token; only the claimant may record the outcome, so a
-- worker whose lease expired cannot overwrite what another worker did.
ALTER TABLE actions ADD COLUMN claim_token TEXT;
