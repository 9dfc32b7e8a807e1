-- Runs in partitions that any process can claim (issue 10): a run records
-- what it evaluates with (its spec: now, the rules, which customers), and
-- its partitions are ranges of customer ids, claimed with a lease, each
-- committed together with its "done" mark. A planner that dies leaves its
-- partitions to be taken over; the run is finished once, by whoever
-- completes the last one.
ALTER TABLE runs ADD COLUMN spec TEXT;
CREATE INDEX runs_by_trigger ON runs (trigger, id);

CREATE TABLE run_partitions (
    run_id      INTEGER NOT NULL REFERENCES runs (id),
    idx         INTEGER NOT NULL,
    start_id    TEXT NOT NULL,          -- customers with id >= start_id
    end_id      TEXT,                   -- and < end_id (NULL: no end)
    status      TEXT NOT NULL DEFAULT 'pending',   -- pending, claimed, done
    holder      TEXT,
    lease_until INTEGER,
    claims      INTEGER NOT NULL DEFAULT 0,
    summary     TEXT,                   -- what its evaluation counted
    counts      TEXT,                   -- what its commit counted per rule
    commit_seconds REAL,                -- how long its commit took
    done_at     INTEGER,
    PRIMARY KEY (run_id, idx)
);
CREATE INDEX run_partitions_open ON run_partitions (run_id, idx) WHERE status <> 'done';

-- When each customer's data last changed (import, identify, a new event),
-- for schedules that evaluate only what changed. A customer's events may
-- arrive before the customer does, so there is no foreign key.
CREATE TABLE customer_changes (
    customer_id TEXT PRIMARY KEY,
    changed_at  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX customer_changes_by_time ON customer_changes (changed_at, customer_id);
INSERT INTO customer_changes (customer_id, changed_at) SELECT id, updated_at FROM customers;

-- Owners' daily escalation caps count per owner.
CREATE INDEX escalations_by_owner ON escalations (owner, run_id);
