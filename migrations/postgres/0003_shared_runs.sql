-- Runs in partitions that any replica can claim (see the SQLite migration
-- 0008 for the design).
ALTER TABLE runs ADD COLUMN spec TEXT;
CREATE INDEX runs_by_trigger ON runs (trigger, id);

CREATE TABLE run_partitions (
    run_id      BIGINT NOT NULL REFERENCES runs (id),
    idx         BIGINT NOT NULL,
    start_id    TEXT COLLATE "C" NOT NULL,
    end_id      TEXT COLLATE "C",
    status      TEXT NOT NULL DEFAULT 'pending',
    holder      TEXT,
    lease_until BIGINT,
    claims      BIGINT NOT NULL DEFAULT 0,
    summary     TEXT,
    counts      TEXT,
    commit_seconds DOUBLE PRECISION,
    done_at     BIGINT,
    PRIMARY KEY (run_id, idx)
);
CREATE INDEX run_partitions_open ON run_partitions (run_id, idx) WHERE status <> 'done';

CREATE TABLE customer_changes (
    customer_id TEXT COLLATE "C" PRIMARY KEY,
    changed_at  BIGINT NOT NULL
);
CREATE INDEX customer_changes_by_time ON customer_changes (changed_at, customer_id);
INSERT INTO customer_changes (customer_id, changed_at) SELECT id, updated_at FROM customers;

CREATE INDEX escalations_by_owner ON escalations (owner, run_id);
