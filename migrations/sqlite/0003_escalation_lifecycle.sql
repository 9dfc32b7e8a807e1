-- Escalation lifecycle: when the owner was last told, how often, and
-- whether the customer recovered while it was open.
ALTER TABLE escalations ADD COLUMN notified_at INTEGER;
ALTER TABLE escalations ADD COLUMN notifications INTEGER NOT NULL DEFAULT 1;
ALTER TABLE escalations ADD COLUMN recovered_at INTEGER;
ALTER TABLE escalations ADD COLUMN note TEXT;
UPDATE escalations SET notified_at = created_at;
