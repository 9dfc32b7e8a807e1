//! Rows → records, shared by both backends: each backend's row type gives
//! typed column access through [`Columns`], and the mapping is written once.

use serde_json::Value;

use super::{ActionRecord, DecisionRecord, EscalationRecord, StoreError, StoreResult, from_millis};
use crate::domain::{Customer, CustomerId, Email, EngagementModel, Event};

/// The column types the stores use: integers (times are Unix milliseconds)
/// and text (JSON is stored as text).
pub(crate) trait Columns {
    fn int(&self, column: &str) -> StoreResult<i64>;
    fn opt_int(&self, column: &str) -> StoreResult<Option<i64>>;
    fn text(&self, column: &str) -> StoreResult<String>;
    fn opt_text(&self, column: &str) -> StoreResult<Option<String>>;
    fn opt_float(&self, column: &str) -> StoreResult<Option<f64>>;
}

macro_rules! columns_for {
    ($row:ty) => {
        impl Columns for $row {
            fn int(&self, column: &str) -> StoreResult<i64> {
                Ok(sqlx::Row::try_get(self, column)?)
            }
            fn opt_int(&self, column: &str) -> StoreResult<Option<i64>> {
                Ok(sqlx::Row::try_get(self, column)?)
            }
            fn text(&self, column: &str) -> StoreResult<String> {
                Ok(sqlx::Row::try_get(self, column)?)
            }
            fn opt_text(&self, column: &str) -> StoreResult<Option<String>> {
                Ok(sqlx::Row::try_get(self, column)?)
            }
            fn opt_float(&self, column: &str) -> StoreResult<Option<f64>> {
                Ok(sqlx::Row::try_get(self, column)?)
            }
        }
    };
}

columns_for!(sqlx::sqlite::SqliteRow);
columns_for!(sqlx::postgres::PgRow);

pub(crate) fn corrupt(table: &'static str, message: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        table,
        message: message.into(),
    }
}

pub(crate) fn json_of(text: &str, table: &'static str) -> StoreResult<Value> {
    serde_json::from_str(text).map_err(|e| corrupt(table, e.to_string()))
}

pub(crate) fn id_of(raw: &str, table: &'static str) -> StoreResult<CustomerId> {
    CustomerId::parse(raw).map_err(|e| corrupt(table, e.to_string()))
}

fn count(row: &impl Columns, column: &str) -> StoreResult<u32> {
    Ok(u32::try_from(row.int(column)?).unwrap_or(u32::MAX))
}

fn opt_time(
    row: &impl Columns,
    column: &str,
) -> StoreResult<Option<chrono::DateTime<chrono::Utc>>> {
    Ok(row.opt_int(column)?.map(from_millis))
}

pub(crate) fn customer_from_row(row: &impl Columns) -> StoreResult<Customer> {
    let traits = match json_of(&row.text("traits")?, "customers")? {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    Ok(Customer {
        id: id_of(&row.text("id")?, "customers")?,
        email: row.opt_text("email")?.and_then(|e| Email::parse(&e).ok()),
        name: row.opt_text("name")?,
        created_at: opt_time(row, "created_at")?,
        timezone: row.opt_text("timezone")?,
        model: EngagementModel::parse(&row.text("model")?).unwrap_or_default(),
        owner: row.opt_text("owner")?.and_then(|o| Email::parse(&o).ok()),
        traits,
    })
}

pub(crate) fn event_from_row(row: &impl Columns) -> StoreResult<Event> {
    Ok(Event {
        message_id: row.text("message_id")?,
        customer_id: id_of(&row.text("customer_id")?, "events")?,
        name: row.text("name")?,
        properties: json_of(&row.text("properties")?, "events")?,
        at: from_millis(row.int("at")?),
    })
}

pub(crate) fn action_from_row(row: &impl Columns) -> StoreResult<ActionRecord> {
    Ok(ActionRecord {
        id: row.int("id")?,
        run_id: row.int("run_id")?,
        customer_id: row.text("customer_id")?,
        rule: row.text("rule")?,
        kind: row.text("kind")?,
        dedup_key: row.text("dedup_key")?,
        status: row.text("status")?,
        attempts: count(row, "attempts")?,
        last_error: row.opt_text("last_error")?,
        created_at: from_millis(row.int("created_at")?),
        finished_at: opt_time(row, "finished_at")?,
        next_attempt_at: from_millis(row.int("next_attempt_at")?),
        payload: json_of(&row.text("payload")?, "actions")?,
        repeats: count(row, "repeats")?,
        repeated_run: row.opt_int("repeated_run")?,
        repeated_at: opt_time(row, "repeated_at")?,
    })
}

pub(crate) fn escalation_from_row(row: &impl Columns) -> StoreResult<EscalationRecord> {
    Ok(EscalationRecord {
        id: row.int("id")?,
        customer_id: row.text("customer_id")?,
        rule: row.text("rule")?,
        reason: row.text("reason")?,
        owner: row.text("owner")?,
        status: row.text("status")?,
        created_at: from_millis(row.int("created_at")?),
        resolved_at: opt_time(row, "resolved_at")?,
        acknowledged_at: opt_time(row, "acknowledged_at")?,
        notified_at: opt_time(row, "notified_at")?,
        notifications: count(row, "notifications")?,
        recovered_at: opt_time(row, "recovered_at")?,
    })
}

pub(crate) fn decision_from_row(row: &impl Columns) -> StoreResult<DecisionRecord> {
    let at = from_millis(row.int("at")?);
    Ok(DecisionRecord {
        run_id: row.int("run_id")?,
        rule: row.text("rule")?,
        subject: row.text("subject")?,
        decision: row.text("decision")?,
        reason: row.text("reason")?,
        at,
        first_at: opt_time(row, "first_at")?.unwrap_or(at),
        times: count(row, "times")?,
    })
}

/// The status a new outbox row starts in: tags are applied at once (done),
/// capped emails recorded as dropped, the emails of a run still planning in
/// partitions wait as staged for the run's guard decision, the rest pending.
pub(super) fn initial_status(a: &super::NewAction, staged: bool) -> &'static str {
    if a.kind == crate::plan::OutboxKind::Tag {
        "done"
    } else if a.dropped.is_some() {
        "dropped"
    } else if staged && a.kind == crate::plan::OutboxKind::Email {
        "staged"
    } else {
        "pending"
    }
}

/// Partitions from the first id of each: `(index, start, end)`, where the
/// first starts at the beginning of the id space (customers added below its
/// first id since are still someone's) and each ends where the next starts.
pub(crate) fn partition_ranges(starts: Vec<String>) -> Vec<(u32, String, Option<String>)> {
    let n = starts.len();
    let mut ranges = Vec::with_capacity(n);
    for i in 0..n {
        let start = if i == 0 {
            String::new()
        } else {
            starts[i].clone()
        };
        ranges.push((i as u32, start, starts.get(i + 1).cloned()));
    }
    ranges
}

/// A (customer, tag) row of `customer_tags`.
pub(crate) fn tag_from_row(row: &impl Columns) -> StoreResult<(CustomerId, String)> {
    Ok((
        id_of(&row.text("customer_id")?, "customer_tags")?,
        row.text("tag")?,
    ))
}

/// The spec of a partitioned run, from its row's `spec` column.
fn spec_of(run: &impl Columns) -> StoreResult<super::RunSpec> {
    let spec = run
        .opt_text("spec")?
        .ok_or_else(|| corrupt("runs", "a partitioned run without a spec"))?;
    serde_json::from_str(&spec).map_err(|e| corrupt("runs", e.to_string()))
}

/// A claimed partition from its row (`run_id, idx, start_id, end_id`) and
/// its run's (`trigger, started_at, spec`).
pub(crate) fn partition_from_rows(
    p: &impl Columns,
    run: &impl Columns,
    holder: &str,
) -> StoreResult<super::Partition> {
    Ok(super::Partition {
        run_id: p.int("run_id")?,
        index: p.int("idx")? as u32,
        start: p.text("start_id")?,
        end: p.opt_text("end_id")?,
        holder: holder.to_owned(),
        trigger: run.text("trigger")?,
        started_at: from_millis(run.int("started_at")?),
        spec: spec_of(run)?,
    })
}

pub(crate) fn partition_record_from_row(row: &impl Columns) -> StoreResult<super::PartitionRecord> {
    let summary = row
        .opt_text("summary")?
        .map(|s| json_of(&s, "run_partitions"))
        .transpose()?;
    let counts = row
        .opt_text("counts")?
        .map(|s| serde_json::from_str(&s).map_err(|e| corrupt("run_partitions", e.to_string())))
        .transpose()?;
    Ok(super::PartitionRecord {
        index: row.int("idx")? as u32,
        status: row.text("status")?,
        holder: row.opt_text("holder")?,
        claims: count(row, "claims")?,
        summary,
        counts,
        commit_seconds: row.opt_float("commit_seconds")?.unwrap_or(0.0),
    })
}

/// Customer ids as one JSON array (SQLite's `json_each`).
pub(crate) fn ids_json(ids: &[CustomerId]) -> String {
    let ids: Vec<&str> = ids.iter().map(CustomerId::as_str).collect();
    serde_json::to_string(&ids).unwrap_or_else(|_| "[]".into())
}

/// A run still planning from its row (`id, trigger, started_at, spec`).
pub(crate) fn unfinished_run_from_row(row: &impl Columns) -> StoreResult<super::UnfinishedRun> {
    Ok(super::UnfinishedRun {
        id: row.int("id")?,
        trigger: row.text("trigger")?,
        started_at: from_millis(row.int("started_at")?),
        spec: spec_of(row)?,
    })
}
