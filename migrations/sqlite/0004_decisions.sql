-- The audit trail of decisions that leave no outbox row: an email not
-- planned because the address is suppressed, or deferred by the frequency cap.
-- (Everything else is on the action itself: status, reason, times.)
CREATE TABLE decisions (
    id          INTEGER PRIMARY KEY,
    run_id      INTEGER NOT NULL REFERENCES runs (id),
    customer_id TEXT NOT NULL,
    rule        TEXT NOT NULL,
    subject     TEXT NOT NULL,
    decision    TEXT NOT NULL,
    reason      TEXT NOT NULL,
    at          INTEGER NOT NULL
);
CREATE INDEX decisions_by_customer ON decisions (customer_id);
