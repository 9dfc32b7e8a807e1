-- The frequency cap counts an email at the time it counts for the customer:
-- the evaluation time of the run that planned it, or later when it waited
-- for the send window or was released from a blast-radius hold.
ALTER TABLE actions ADD COLUMN cap_at INTEGER;
UPDATE actions SET cap_at = (SELECT now FROM runs WHERE runs.id = actions.run_id);

-- "Deduplicated" is part of the audit trail: how often later runs wanted an
-- action again, and the last run that did.
ALTER TABLE actions ADD COLUMN repeats INTEGER NOT NULL DEFAULT 0;
ALTER TABLE actions ADD COLUMN repeated_run INTEGER;
ALTER TABLE actions ADD COLUMN repeated_at INTEGER;

-- A decision that repeats every run (an email suppressed or deferred night
-- after night) is one row with a count, not one row per run.
ALTER TABLE decisions ADD COLUMN dedup_key TEXT;
ALTER TABLE decisions ADD COLUMN first_at INTEGER;
ALTER TABLE decisions ADD COLUMN times INTEGER NOT NULL DEFAULT 1;
UPDATE decisions SET first_at = at;
CREATE UNIQUE INDEX decisions_once ON decisions (dedup_key, decision);

-- One planner at a time: the policies (suppression, caps, guard) read the
-- ledger and the commit writes it; two overlapping runs (a CLI `run` next
-- to `serve`, two schedules) must not both see room under a cap. A crashed
-- holder's lease expires.
CREATE TABLE planner_lock (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    holder TEXT,
    until  INTEGER NOT NULL
);
INSERT INTO planner_lock (id, holder, until) VALUES (1, NULL, 0);
