-- "Not reopened for the same reason" looks escalations up by customer and
-- rule on every escalate(); without an index that is quadratic in a big run.
CREATE INDEX escalations_by_customer_rule ON escalations (customer_id, rule);
