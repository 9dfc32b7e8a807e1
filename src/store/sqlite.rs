//! The embedded SQLite store: WAL, a small pool, `BEGIN IMMEDIATE` for every
//! transaction that reads before it writes (a deferred transaction would
//! fail with "database is locked" under concurrent writers, busy timeout or not).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};

use super::rows::{
    action_from_row, corrupt, customer_from_row, decision_from_row, escalation_from_row,
    event_from_row, id_of, ids_json, initial_status, json_of, partition_from_rows,
    partition_ranges, partition_record_from_row, tag_from_row, unfinished_run_from_row,
};
use super::*;
use crate::domain::{Customer, CustomerId, CustomerPatch, Email, EngagementModel, Event};

/// Rows per multi-row INSERT (each event binds 5 values; SQLite allows 32766).
const EVENT_CHUNK: usize = 500;
/// Customers per existence check and multi-row upsert (9 values each).
const CUSTOMER_CHUNK: usize = 1_000;
/// Actions per multi-row INSERT (10 values each).
const ACTION_CHUNK: usize = 500;

pub struct SqliteStore {
    pool: SqlitePool,
}

/// Marks a running firing done with its run, if `f`'s holder still has it
/// (`LeaseLost` otherwise: another process took it over).
async fn mark_firing_done(
    tx: &mut sqlx::Transaction<'static, Sqlite>,
    f: &Firing,
    run_id: i64,
    at: i64,
) -> StoreResult<()> {
    let n = sqlx::query(
        "UPDATE schedule_firings SET status = 'done', run_id = ?, finished_at = ?, lease_until = NULL
         WHERE schedule = ? AND fire_at = ? AND status = 'running' AND holder = ?",
    )
    .bind(run_id)
    .bind(at)
    .bind(&f.schedule)
    .bind(to_millis(f.fire_at))
    .bind(&f.holder)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if n == 0 {
        return Err(StoreError::LeaseLost(format!(
            "schedule {:?} firing at {}",
            f.schedule, f.fire_at
        )));
    }
    Ok(())
}

/// Records that these customers' data changed at `at` (for schedules that
/// evaluate only what changed).
async fn mark_changed(
    tx: &mut sqlx::Transaction<'static, Sqlite>,
    ids: &[&str],
    at: i64,
) -> StoreResult<()> {
    // `WHERE true` keeps SQLite from reading ON CONFLICT as a join clause.
    sqlx::query(
        "INSERT INTO customer_changes (customer_id, changed_at)
         SELECT value, ? FROM json_each(?) WHERE true
         ON CONFLICT (customer_id) DO UPDATE SET changed_at = excluded.changed_at",
    )
    .bind(at)
    .bind(serde_json::to_string(ids).unwrap_or_else(|_| "[]".into()))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The histories of a page's customers from one JSON array of `[customer,
/// name, at, properties]` (`json_group_array`), grouped by customer in the
/// order they first appear. One row per page: a row per customer crossed
/// the driver's channel, a thread wake-up each, 2,000 times a page.
fn histories_from_json(json: &str) -> StoreResult<Vec<(CustomerId, Vec<HistoryEvent>)>> {
    let raw: Vec<(String, String, i64, Value)> =
        serde_json::from_str(json).map_err(|e| corrupt("events", e.to_string()))?;
    let mut out: Vec<(CustomerId, Vec<HistoryEvent>)> = Vec::new();
    let mut position: HashMap<String, usize> = HashMap::new();
    for (id, name, at, properties) in raw {
        let i = match out.last() {
            Some((last, _)) if last.as_str() == id => out.len() - 1,
            _ => match position.get(&id) {
                Some(&i) => i,
                None => {
                    out.push((id_of(&id, "events")?, Vec::new()));
                    position.insert(id, out.len() - 1);
                    out.len() - 1
                }
            },
        };
        out[i].1.push((name, from_millis(at), properties));
    }
    Ok(out)
}

impl SqliteStore {
    /// (customer, rule, reason) of the escalations of these pairs that are
    /// resolved (`resolved`) or still open (open or acknowledged).
    async fn escalations_of_pairs(
        &self,
        pairs: &[(CustomerId, String)],
        resolved: bool,
    ) -> StoreResult<Vec<(CustomerId, String, String)>> {
        let sql = if resolved {
            "SELECT customer_id, rule, reason FROM escalations WHERE status = 'resolved'
             AND customer_id IN (SELECT value FROM json_each(?))"
        } else {
            "SELECT customer_id, rule, reason FROM escalations
             WHERE status IN ('open', 'acknowledged') AND customer_id IN (SELECT value FROM json_each(?))"
        };
        let wanted: HashSet<&(CustomerId, String)> = pairs.iter().collect();
        let ids: Vec<&str> = pairs.iter().map(|(c, _)| c.as_str()).collect();
        let mut found = Vec::new();
        for chunk in ids.chunks(5000) {
            let rows = sqlx::query(sql)
                .bind(serde_json::to_string(chunk).unwrap_or_else(|_| "[]".into()))
                .fetch_all(&self.pool)
                .await?;
            for r in rows {
                let c: String = r.try_get("customer_id")?;
                let pair = (id_of(&c, "escalations")?, r.try_get::<String, _>("rule")?);
                if wanted.contains(&pair) {
                    found.push((pair.0, pair.1, r.try_get("reason")?));
                }
            }
        }
        Ok(found)
    }

    /// Opens (creating if missing) the database at `url` and migrates it.
    pub async fn open(url: &str) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(Self { pool })
    }

    async fn immediate(&self) -> StoreResult<sqlx::Transaction<'static, Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn upsert_customers(&self, patches: &[CustomerPatch]) -> StoreResult<Vec<Upsert>> {
        let mut tx = self.immediate().await?;
        let now = to_millis(Utc::now());
        let mut outcomes = Vec::with_capacity(patches.len());
        for chunk in patches.chunks(CUSTOMER_CHUNK) {
            let ids: Vec<&str> = chunk.iter().map(|p| p.id.as_str()).collect();
            // Which of them exist (exact: BEGIN IMMEDIATE holds the write
            // lock). One row comes back, the positions of the stored ids,
            // not a row per customer: each row is a message between threads.
            let positions: Option<String> = sqlx::query_scalar(
                "SELECT json_group_array(j.key) FROM json_each(?) AS j
                 WHERE EXISTS (SELECT 1 FROM customers WHERE id = j.value)",
            )
            .bind(serde_json::to_string(&ids).unwrap_or_else(|_| "[]".into()))
            .fetch_one(&mut *tx)
            .await?;
            let positions: Vec<usize> = serde_json::from_str(positions.as_deref().unwrap_or("[]"))
                .map_err(|e| corrupt("customers", e.to_string()))?;
            let mut stored = vec![false; chunk.len()];
            for i in positions {
                if let Some(s) = stored.get_mut(i) {
                    *s = true;
                }
            }
            // A file may name the same customer twice; later rows win, and
            // each row after the first counts as an update. SQLite applies
            // the rows of one INSERT in order, each seeing the ones before.
            let mut seen: HashSet<&str> = HashSet::with_capacity(chunk.len());
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO customers (id, email, name, created_at, timezone, model, owner, traits, updated_at) ",
            );
            qb.push_values(chunk.iter().zip(stored), |mut b, (p, stored)| {
                let new = !stored && seen.insert(p.id.as_str());
                outcomes.push(if new {
                    Upsert::Inserted
                } else {
                    Upsert::Updated
                });
                // `model` is NOT NULL, and SQLite checks that before it
                // turns a conflict into an update, so "no model given" on
                // an existing customer is sent as '' (kept by the update
                // below); a new customer gets the default instead.
                let model = match (p.model, new) {
                    (Some(m), _) => m.as_str(),
                    (None, true) => EngagementModel::default().as_str(),
                    (None, false) => "",
                };
                b.push_bind(p.id.as_str())
                    .push_bind(p.email.as_ref().map(Email::as_str))
                    .push_bind(p.name.as_deref())
                    .push_bind(p.created_at.map(to_millis))
                    .push_bind(p.timezone.as_deref())
                    .push_bind(model)
                    .push_bind(p.owner.as_ref().map(Email::as_str))
                    .push_bind(serde_json::to_string(&p.traits).unwrap_or_else(|_| "{}".into()))
                    .push_bind(now);
            });
            qb.push(
                " ON CONFLICT (id) DO UPDATE SET
                    email = COALESCE(excluded.email, email),
                    name = COALESCE(excluded.name, name),
                    created_at = COALESCE(excluded.created_at, created_at),
                    timezone = COALESCE(excluded.timezone, timezone),
                    model = COALESCE(NULLIF(excluded.model, ''), model),
                    owner = COALESCE(excluded.owner, owner),
                    traits = json_patch(traits, excluded.traits),
                    updated_at = excluded.updated_at",
            );
            qb.build().execute(&mut *tx).await?;
            mark_changed(&mut tx, &ids, now).await?;
        }
        tx.commit().await?;
        Ok(outcomes)
    }

    async fn insert_events(&self, events: &[Event]) -> StoreResult<EventInsert> {
        let mut tx = self.immediate().await?;
        let mut inserted = 0usize;
        for chunk in events.chunks(EVENT_CHUNK) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO events (message_id, customer_id, name, properties, at) ",
            );
            qb.push_values(chunk, |mut b, e| {
                b.push_bind(e.message_id.clone())
                    .push_bind(e.customer_id.as_str().to_owned())
                    .push_bind(e.name.clone())
                    .push_bind(e.properties.to_string())
                    .push_bind(to_millis(e.at));
            });
            qb.push(" ON CONFLICT (message_id) DO NOTHING");
            inserted += qb.build().execute(&mut *tx).await?.rows_affected() as usize;
        }
        let mut ids: Vec<&str> = events.iter().map(|e| e.customer_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        for chunk in ids.chunks(CUSTOMER_CHUNK) {
            mark_changed(&mut tx, chunk, to_millis(Utc::now())).await?;
        }
        tx.commit().await?;
        Ok(EventInsert {
            inserted,
            duplicates: events.len() - inserted,
        })
    }

    async fn customer(&self, id: &CustomerId) -> StoreResult<Option<Customer>> {
        let row = sqlx::query("SELECT * FROM customers WHERE id = ?")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(customer_from_row).transpose()
    }

    async fn customer_count(&self) -> StoreResult<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM customers")
            .fetch_one(&self.pool)
            .await?;
        Ok(n as u64)
    }

    async fn customers_page(
        &self,
        after: Option<&CustomerId>,
        limit: usize,
    ) -> StoreResult<Vec<Customer>> {
        let rows = sqlx::query("SELECT * FROM customers WHERE id > ? ORDER BY id LIMIT ?")
            .bind(after.map(CustomerId::as_str).unwrap_or(""))
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(customer_from_row).collect()
    }

    async fn events_in_id_range(
        &self,
        first: &CustomerId,
        last: &CustomerId,
        until: DateTime<Utc>,
    ) -> StoreResult<Vec<Event>> {
        let rows = sqlx::query(
            "SELECT message_id, customer_id, name, properties, at FROM events
             WHERE customer_id >= ? AND customer_id <= ? AND at <= ?
             ORDER BY customer_id, at, seq",
        )
        .bind(first.as_str())
        .bind(last.as_str())
        .bind(to_millis(until))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(event_from_row).collect()
    }

    async fn histories_in_id_range(
        &self,
        first: &CustomerId,
        last: &CustomerId,
        until: DateTime<Utc>,
    ) -> StoreResult<Vec<(CustomerId, Vec<HistoryEvent>)>> {
        let json: String = sqlx::query_scalar(
            "SELECT json_group_array(json_array(customer_id, name, at, json(properties)))
             FROM events WHERE customer_id >= ? AND customer_id <= ? AND at <= ?",
        )
        .bind(first.as_str())
        .bind(last.as_str())
        .bind(to_millis(until))
        .fetch_one(&self.pool)
        .await?;
        histories_from_json(&json)
    }

    async fn tags_in_id_range(
        &self,
        first: &CustomerId,
        last: &CustomerId,
    ) -> StoreResult<Vec<(CustomerId, String)>> {
        let rows = sqlx::query(
            "SELECT customer_id, tag FROM customer_tags
             WHERE customer_id >= ? AND customer_id <= ? ORDER BY customer_id, tag",
        )
        .bind(first.as_str())
        .bind(last.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(tag_from_row).collect()
    }

    async fn existing_dedup_keys(&self, keys: &[String]) -> StoreResult<HashSet<String>> {
        let mut found = HashSet::new();
        for chunk in keys.chunks(5000) {
            let list = serde_json::to_string(chunk).unwrap_or_else(|_| "[]".into());
            let rows: Vec<String> = sqlx::query_scalar(
                "SELECT dedup_key FROM actions WHERE dedup_key IN (SELECT value FROM json_each(?))",
            )
            .bind(list)
            .fetch_all(&self.pool)
            .await?;
            found.extend(rows);
        }
        Ok(found)
    }

    async fn resolved_escalation_reasons(
        &self,
        pairs: &[(CustomerId, String)],
    ) -> StoreResult<HashSet<(CustomerId, String, String)>> {
        Ok(self
            .escalations_of_pairs(pairs, true)
            .await?
            .into_iter()
            .collect())
    }

    async fn open_escalation_pairs(
        &self,
        pairs: &[(CustomerId, String)],
    ) -> StoreResult<HashSet<(CustomerId, String)>> {
        Ok(self
            .escalations_of_pairs(pairs, false)
            .await?
            .into_iter()
            .map(|(c, rule, _)| (c, rule))
            .collect())
    }

    async fn commit_plan(&self, plan: PlanCommit) -> StoreResult<CommitOutcome> {
        let started = std::time::Instant::now();
        let mut tx = self.immediate().await?;
        let now_ms = to_millis(plan.started_at);
        let staged = plan.partition.is_some();
        let run_id: i64 = match &plan.partition {
            // A partition is committed only by the holder of its claim,
            // while its run is still planning: one taken over by another
            // process (this one was too slow to renew) is theirs now.
            Some(p) => {
                let n = sqlx::query(
                    "UPDATE run_partitions SET status = 'done', summary = ?, done_at = ?, lease_until = NULL
                     WHERE run_id = ? AND idx = ? AND holder = ? AND status = 'claimed'
                       AND EXISTS (SELECT 1 FROM runs WHERE id = ? AND status = 'planning')",
                )
                .bind(p.summary.to_string())
                .bind(to_millis(Utc::now()))
                .bind(p.run_id)
                .bind(i64::from(p.index))
                .bind(&p.holder)
                .bind(p.run_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if n == 0 {
                    return Err(StoreError::LeaseLost(format!(
                        "partition {} of run {}",
                        p.index, p.run_id
                    )));
                }
                p.run_id
            }
            None => {
                sqlx::query_scalar(
                    "INSERT INTO runs (trigger, now, started_at, status, summary) VALUES (?, ?, ?, 'planned', ?)
                     RETURNING id",
                )
                .bind(&plan.trigger)
                .bind(to_millis(plan.now))
                .bind(now_ms)
                .bind(plan.summary.to_string())
                .fetch_one(&mut *tx)
                .await?
            }
        };
        if let Some(f) = plan.firing.as_ref().filter(|_| !staged) {
            mark_firing_done(&mut tx, f, run_id, now_ms).await?;
        }

        let mut per_rule: BTreeMap<String, RuleCommitCounts> = BTreeMap::new();
        // A plan may name the same key twice (two rules tagging alike); the
        // first occurrence is the one written, the rest are deduplicated.
        let mut seen: HashSet<&str> = HashSet::new();
        let mut unique: Vec<&NewAction> = Vec::with_capacity(plan.actions.len());
        for a in &plan.actions {
            if seen.insert(a.dedup_key.as_str()) {
                unique.push(a);
            } else {
                per_rule.entry(a.rule.clone()).or_default().deduplicated += 1;
            }
        }
        let plan_ms = to_millis(plan.now);
        let mut new_emails: BTreeMap<&str, usize> = BTreeMap::new();
        // Multi-row inserts: one statement per chunk instead of per action.
        // A key already in the ledger is not planned again; its row records
        // the repeat (the "deduplicated" audit), and RETURNING tells new rows
        // (this run's id) from repeats.
        for chunk in unique.chunks(ACTION_CHUNK) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO actions (run_id, customer_id, rule, kind, dedup_key, payload, status,
                                      next_attempt_at, created_at, finished_at, last_error, cap_at) ",
            );
            qb.push_values(chunk, |mut b, a| {
                let is_tag = a.kind == OutboxKind::Tag;
                let status = initial_status(a, staged);
                b.push_bind(run_id)
                    .push_bind(a.customer_id.as_str().to_owned())
                    .push_bind(a.rule.clone())
                    .push_bind(a.kind.as_str())
                    .push_bind(a.dedup_key.clone())
                    .push_bind(a.payload.clone())
                    .push_bind(status)
                    .push_bind(a.not_before.map_or(now_ms, to_millis).max(now_ms))
                    .push_bind(now_ms)
                    .push_bind((is_tag || a.dropped.is_some()).then_some(now_ms))
                    .push_bind(a.dropped.clone())
                    .push_bind(a.not_before.map_or(plan_ms, to_millis).max(plan_ms));
            });
            // Tags re-fire for most customers every night and carry no
            // story worth a write each time: their repeats are not recorded.
            qb.push(" ON CONFLICT (dedup_key) DO UPDATE SET repeats = repeats + 1, ");
            qb.push("repeated_run = excluded.run_id, repeated_at = ");
            qb.push_bind(plan_ms);
            qb.push(" WHERE actions.kind <> 'tag' RETURNING dedup_key, run_id");
            let mut inserted: HashSet<String> = HashSet::new();
            for r in qb.build().fetch_all(&mut *tx).await? {
                if r.try_get::<i64, _>(1)? == run_id {
                    inserted.insert(r.try_get(0)?);
                }
            }
            let mut tags = Vec::new();
            for &a in chunk {
                let counts = per_rule.entry(a.rule.clone()).or_default();
                if inserted.contains(&a.dedup_key) {
                    counts.planned += 1;
                    if a.kind == OutboxKind::Email && a.dropped.is_none() {
                        *new_emails.entry(a.rule.as_str()).or_default() += 1;
                    }
                    if a.kind == OutboxKind::Tag {
                        tags.push(a);
                    }
                } else {
                    counts.deduplicated += 1;
                }
            }
            if !tags.is_empty() {
                let mut qb: QueryBuilder<Sqlite> =
                    QueryBuilder::new("INSERT INTO customer_tags (customer_id, tag, created_at) ");
                qb.push_values(tags, |mut b, a| {
                    b.push_bind(a.customer_id.as_str().to_owned())
                        .push_bind(a.subject.clone())
                        .push_bind(now_ms);
                });
                qb.push(" ON CONFLICT DO NOTHING");
                qb.build().execute(&mut *tx).await?;
            }
        }

        // The blast-radius guard (decided by the pipeline): the rule's new
        // emails of this run wait for approval.
        let mut held = BTreeMap::new();
        for (rule, reason) in plan.hold.iter().filter(|_| !staged) {
            let n = new_emails.get(rule.as_str()).copied().unwrap_or(0);
            if n == 0 {
                continue;
            }
            sqlx::query(
                "UPDATE actions SET status = 'held', last_error = ?
                 WHERE run_id = ? AND rule = ? AND kind = 'email' AND status = 'pending'",
            )
            .bind(reason)
            .bind(run_id)
            .bind(rule)
            .execute(&mut *tx)
            .await?;
            held.insert(rule.clone(), n);
        }
        if !held.is_empty() {
            sqlx::query("UPDATE runs SET status = 'held' WHERE id = ?")
                .bind(run_id)
                .execute(&mut *tx)
                .await?;
        }
        drop(new_emails);

        // Escalations and their notices, decisions and rule errors: one
        // multi-row statement per chunk (a night at 1M customers opens
        // hundreds of thousands of escalations).
        let created = to_millis(plan.now); // escalation times follow the evaluation clock (--now replays)
        for chunk in plan.escalations.chunks(ACTION_CHUNK) {
            // One open escalation per customer and rule (the unique index);
            // one a human resolved is not reopened for the same reason.
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO escalations (run_id, customer_id, rule, reason, owner, status, created_at, notified_at)
                 SELECT v.column1, v.column2, v.column3, v.column4, v.column5, 'open', v.column6, v.column6
                 FROM (",
            );
            qb.push_values(chunk, |mut b, e| {
                b.push_bind(run_id)
                    .push_bind(e.customer_id.as_str().to_owned())
                    .push_bind(e.rule.clone())
                    .push_bind(e.reason.clone())
                    .push_bind(e.owner.clone())
                    .push_bind(created);
            });
            qb.push(
                ") AS v WHERE NOT EXISTS (SELECT 1 FROM escalations r WHERE r.customer_id = v.column2
                   AND r.rule = v.column3 AND r.reason = v.column4 AND r.status = 'resolved')
                 ON CONFLICT DO NOTHING RETURNING id, customer_id, rule",
            );
            let mut opened: HashMap<(String, String), i64> = HashMap::new();
            for r in qb.build().fetch_all(&mut *tx).await? {
                opened.insert((r.try_get(1)?, r.try_get(2)?), r.try_get(0)?);
            }
            let mut notices: Vec<(&NewEscalation, i64)> = Vec::new();
            for e in chunk {
                let counts = per_rule.entry(e.rule.clone()).or_default();
                // The first of a pair in the plan is the one opened.
                match opened.remove(&(e.customer_id.as_str().to_owned(), e.rule.clone())) {
                    Some(id) => {
                        counts.planned += 1;
                        notices.push((e, id));
                    }
                    None => counts.deduplicated += 1,
                }
            }
            if notices.is_empty() {
                continue;
            }
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO actions (run_id, customer_id, rule, kind, dedup_key, payload, status,
                                      next_attempt_at, created_at) ",
            );
            qb.push_values(notices, |mut b, (e, id)| {
                let mut notice = e.notice.clone();
                if let Value::Object(m) = &mut notice {
                    m.insert("escalation_id".into(), Value::from(id));
                }
                b.push_bind(run_id)
                    .push_bind(e.customer_id.as_str().to_owned())
                    .push_bind(e.rule.clone())
                    .push_bind("escalation_notice")
                    .push_bind(format!("escalation\u{1f}{id}"))
                    .push_bind(notice.to_string())
                    .push_bind("pending")
                    .push_bind(now_ms)
                    .push_bind(now_ms);
            });
            qb.build().execute(&mut *tx).await?;
        }

        for chunk in plan.decisions.chunks(ACTION_CHUNK) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO decisions (run_id, customer_id, rule, subject, decision, reason, at,
                                        first_at, dedup_key) ",
            );
            qb.push_values(chunk, |mut b, d| {
                b.push_bind(run_id)
                    .push_bind(d.customer_id.as_str().to_owned())
                    .push_bind(d.rule.clone())
                    .push_bind(d.subject.clone())
                    .push_bind(d.decision.clone())
                    .push_bind(d.reason.clone())
                    .push_bind(created)
                    .push_bind(created)
                    .push_bind(d.dedup_key.clone());
            });
            // A key decided twice in one plan is one row counted twice.
            qb.push(
                " ON CONFLICT (dedup_key, decision) DO UPDATE SET
                     run_id = excluded.run_id, subject = excluded.subject,
                     reason = excluded.reason, at = excluded.at, times = times + 1",
            );
            qb.build().execute(&mut *tx).await?;
        }

        for chunk in plan.errors.chunks(ACTION_CHUNK) {
            let mut qb: QueryBuilder<Sqlite> =
                QueryBuilder::new("INSERT INTO run_errors (run_id, rule, customer_id, message) ");
            qb.push_values(chunk, |mut b, err| {
                b.push_bind(run_id)
                    .push_bind(err.rule.clone())
                    .push_bind(err.customer_id.as_str().to_owned())
                    .push_bind(err.message.clone());
            });
            qb.build().execute(&mut *tx).await?;
        }
        if let Some(p) = &plan.partition {
            sqlx::query(
                "UPDATE run_partitions SET counts = ?, commit_seconds = ? WHERE run_id = ? AND idx = ?",
            )
            .bind(serde_json::to_string(&per_rule).unwrap_or_else(|_| "{}".into()))
            .bind(started.elapsed().as_secs_f64())
                .bind(p.run_id)
                .bind(i64::from(p.index))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(CommitOutcome {
            run_id,
            per_rule,
            held,
        })
    }

    async fn begin_run(
        &self,
        trigger: &str,
        spec: &RunSpec,
        started_at: DateTime<Utc>,
        partition_size: usize,
        firing: Option<&Firing>,
    ) -> StoreResult<(i64, u32)> {
        let mut tx = self.immediate().await?;
        let spec_json = serde_json::to_string(spec).map_err(|e| corrupt("runs", e.to_string()))?;
        let run_id: i64 = sqlx::query_scalar(
            "INSERT INTO runs (trigger, now, started_at, status, summary, spec)
             VALUES (?, ?, ?, 'planning', '{}', ?) RETURNING id",
        )
        .bind(trigger)
        .bind(to_millis(spec.now))
        .bind(to_millis(started_at))
        .bind(spec_json)
        .fetch_one(&mut *tx)
        .await?;
        if let Some(f) = firing {
            mark_firing_done(&mut tx, f, run_id, to_millis(started_at)).await?;
        }
        // The first id of every `partition_size` customers (of those changed
        // since the spec's time, when it has one) starts a partition.
        let starts: Vec<String> = match spec.changed_since {
            None => sqlx::query_scalar(
                "SELECT id FROM (SELECT id, ROW_NUMBER() OVER (ORDER BY id) AS n FROM customers)
                     WHERE (n - 1) % ? = 0 ORDER BY id",
            )
            .bind(partition_size.max(1) as i64)
            .fetch_all(&mut *tx)
            .await?,
            Some(since) => {
                sqlx::query_scalar(
                    "SELECT customer_id FROM (
                        SELECT customer_id, ROW_NUMBER() OVER (ORDER BY customer_id) AS n
                        FROM customer_changes WHERE changed_at >= ?)
                     WHERE (n - 1) % ? = 0 ORDER BY customer_id",
                )
                .bind(to_millis(since))
                .bind(partition_size.max(1) as i64)
                .fetch_all(&mut *tx)
                .await?
            }
        };
        let ranges = partition_ranges(starts);
        for chunk in ranges.chunks(ACTION_CHUNK) {
            let mut qb: QueryBuilder<Sqlite> =
                QueryBuilder::new("INSERT INTO run_partitions (run_id, idx, start_id, end_id) ");
            qb.push_values(chunk, |mut b, (i, start, end)| {
                b.push_bind(run_id)
                    .push_bind(i64::from(*i))
                    .push_bind(start.clone())
                    .push_bind(end.clone());
            });
            qb.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok((run_id, ranges.len() as u32))
    }

    async fn claim_partition(
        &self,
        run: Option<i64>,
        holder: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> StoreResult<Option<Partition>> {
        // SQLite has one writer at a time: the claim is one UPDATE.
        let row = sqlx::query(
            "UPDATE run_partitions SET status = 'claimed', holder = ?1, lease_until = ?2, claims = claims + 1
             WHERE rowid = (
                SELECT p.rowid FROM run_partitions p JOIN runs r ON r.id = p.run_id
                WHERE r.status = 'planning' AND (?4 IS NULL OR p.run_id = ?4)
                  AND (p.status = 'pending' OR (p.status = 'claimed' AND p.lease_until < ?3))
                ORDER BY p.run_id, p.idx LIMIT 1)
             RETURNING run_id, idx, start_id, end_id",
        )
        .bind(holder)
        .bind(to_millis(until))
        .bind(to_millis(now))
        .bind(run)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let run_id: i64 = row.try_get("run_id")?;
        let run = sqlx::query("SELECT trigger, started_at, spec FROM runs WHERE id = ?")
            .bind(run_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(Some(partition_from_rows(&row, &run, holder)?))
    }

    async fn renew_partitions(&self, holder: &str, until: DateTime<Utc>) -> StoreResult<u64> {
        Ok(sqlx::query(
            "UPDATE run_partitions SET lease_until = ? WHERE holder = ? AND status = 'claimed'",
        )
        .bind(to_millis(until))
        .bind(holder)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn release_partitions(&self, holder: &str) -> StoreResult<u64> {
        Ok(sqlx::query(
            "UPDATE run_partitions SET status = 'pending', lease_until = NULL
             WHERE holder = ? AND status = 'claimed'",
        )
        .bind(holder)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn run_partitions(&self, run_id: i64) -> StoreResult<Vec<PartitionRecord>> {
        let rows = sqlx::query("SELECT * FROM run_partitions WHERE run_id = ? ORDER BY idx")
            .bind(run_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(partition_record_from_row).collect()
    }

    async fn runs_ready_to_finish(&self) -> StoreResult<Vec<UnfinishedRun>> {
        let rows = sqlx::query(
            "SELECT id, trigger, started_at, spec FROM runs r WHERE status = 'planning' AND spec IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM run_partitions p WHERE p.run_id = r.id AND p.status <> 'done')
             ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(unfinished_run_from_row).collect()
    }

    async fn run_status(&self, run_id: i64) -> StoreResult<Option<(String, Value)>> {
        let row = sqlx::query("SELECT status, summary FROM runs WHERE id = ?")
            .bind(run_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            let summary: String = r.try_get("summary")?;
            Ok((r.try_get("status")?, json_of(&summary, "runs")?))
        })
        .transpose()
    }

    async fn changes_seen_by_last_run(&self, trigger: &str) -> StoreResult<Option<DateTime<Utc>>> {
        let at: Option<i64> = sqlx::query_scalar(
            "SELECT started_at FROM runs WHERE trigger = ? AND spec IS NOT NULL AND status <> 'abandoned'
             ORDER BY id DESC LIMIT 1",
        )
        .bind(trigger)
        .fetch_optional(&self.pool)
        .await?;
        Ok(at.map(from_millis))
    }

    async fn partition_customers(&self, p: &Partition) -> StoreResult<Vec<Customer>> {
        // The range's end is in the statement only when it has one: `(end
        // IS NULL OR id < end)` would keep the index from stopping at the
        // end, and every partition would scan to the last customer. The
        // changed customers are found by time (the planner, left alone,
        // walked every customer of the range and looked each one up).
        let sql = match (p.spec.changed_since.is_some(), p.end.is_some()) {
            (false, true) => "SELECT * FROM customers WHERE id >= ?1 AND id < ?2 ORDER BY id",
            (false, false) => "SELECT * FROM customers WHERE id >= ?1 ORDER BY id",
            (true, true) => {
                "SELECT c.* FROM customer_changes ch INDEXED BY customer_changes_by_time
                 CROSS JOIN customers c ON c.id = ch.customer_id
                 WHERE ch.changed_at >= ?3 AND ch.customer_id >= ?1 AND ch.customer_id < ?2
                 ORDER BY ch.customer_id"
            }
            (true, false) => {
                "SELECT c.* FROM customer_changes ch INDEXED BY customer_changes_by_time
                 CROSS JOIN customers c ON c.id = ch.customer_id
                 WHERE ch.changed_at >= ?3 AND ch.customer_id >= ?1 AND ?2 = ''
                 ORDER BY ch.customer_id"
            }
        };
        let since = p.spec.changed_since.map(to_millis).unwrap_or(0);
        let end = p.end.as_deref().unwrap_or("");
        let mut q = sqlx::query(sql).bind(&p.start);
        if p.end.is_some() || p.spec.changed_since.is_some() {
            q = q.bind(end);
        }
        if p.spec.changed_since.is_some() {
            q = q.bind(since);
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(customer_from_row).collect()
    }

    async fn histories_of(
        &self,
        ids: &[CustomerId],
        until: DateTime<Utc>,
    ) -> StoreResult<Vec<(CustomerId, Vec<HistoryEvent>)>> {
        let json: String = sqlx::query_scalar(
            "SELECT json_group_array(json_array(customer_id, name, at, json(properties)))
             FROM events WHERE customer_id IN (SELECT value FROM json_each(?)) AND at <= ?",
        )
        .bind(ids_json(ids))
        .bind(to_millis(until))
        .fetch_one(&self.pool)
        .await?;
        histories_from_json(&json)
    }

    async fn tags_of(&self, ids: &[CustomerId]) -> StoreResult<Vec<(CustomerId, String)>> {
        let rows = sqlx::query(
            "SELECT customer_id, tag FROM customer_tags
             WHERE customer_id IN (SELECT value FROM json_each(?)) ORDER BY customer_id, tag",
        )
        .bind(ids_json(ids))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(tag_from_row).collect()
    }

    async fn open_escalations_of(&self, ids: &[CustomerId]) -> StoreResult<Vec<EscalationRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM escalations WHERE customer_id IN (SELECT value FROM json_each(?))
               AND status IN ('open', 'acknowledged') ORDER BY id",
        )
        .bind(ids_json(ids))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(escalation_from_row).collect()
    }

    async fn finish_plan(
        &self,
        run_id: i64,
        hold: &BTreeMap<String, String>,
        summary: &Value,
    ) -> StoreResult<BTreeMap<String, usize>> {
        let mut tx = self.immediate().await?;
        let open: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM run_partitions WHERE run_id = ? AND status <> 'done'",
        )
        .bind(run_id)
        .fetch_one(&mut *tx)
        .await?;
        if open > 0 {
            return Err(StoreError::LeaseLost(format!(
                "run {run_id}, which still has {open} partitions to plan"
            )));
        }
        let mut held = BTreeMap::new();
        for (rule, reason) in hold {
            let n = sqlx::query(
                "UPDATE actions SET status = 'held', last_error = ?
                 WHERE run_id = ? AND rule = ? AND status = 'staged'",
            )
            .bind(reason)
            .bind(run_id)
            .bind(rule)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n > 0 {
                held.insert(rule.clone(), n as usize);
            }
        }
        sqlx::query("UPDATE actions SET status = 'pending' WHERE run_id = ? AND status = 'staged'")
            .bind(run_id)
            .execute(&mut *tx)
            .await?;
        let n = sqlx::query(
            "UPDATE runs SET status = ?, summary = ? WHERE id = ? AND status = 'planning'",
        )
        .bind(if held.is_empty() { "planned" } else { "held" })
        .bind(summary.to_string())
        .bind(run_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(StoreError::LeaseLost(format!(
                "run {run_id}, which is no longer planning"
            )));
        }
        tx.commit().await?;
        Ok(held)
    }

    async fn open_escalations_in_id_range(
        &self,
        first: &CustomerId,
        last: &CustomerId,
    ) -> StoreResult<Vec<EscalationRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM escalations WHERE customer_id >= ? AND customer_id <= ?
               AND status IN ('open', 'acknowledged') ORDER BY id",
        )
        .bind(first.as_str())
        .bind(last.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(escalation_from_row).collect()
    }

    async fn try_lock_planner(
        &self,
        holder: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let taken = sqlx::query(
            "UPDATE planner_lock SET holder = ?1, until = ?2
             WHERE id = 1 AND (holder IS NULL OR holder = ?1 OR until < ?3)",
        )
        .bind(holder)
        .bind(to_millis(until))
        .bind(to_millis(now))
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(taken == 1)
    }

    async fn renew_planner(&self, holder: &str, until: DateTime<Utc>) -> StoreResult<bool> {
        let n = sqlx::query("UPDATE planner_lock SET until = ? WHERE id = 1 AND holder = ?")
            .bind(to_millis(until))
            .bind(holder)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    async fn unlock_planner(&self, holder: &str) -> StoreResult<()> {
        sqlx::query("UPDATE planner_lock SET holder = NULL, until = 0 WHERE id = 1 AND holder = ?")
            .bind(holder)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn finish_run(&self, run_id: i64, status: &str, summary: &Value) -> StoreResult<()> {
        // A held run stays held until someone approves or rejects it.
        sqlx::query(
            "UPDATE runs SET status = CASE WHEN status = 'held' THEN status ELSE ? END,
             summary = ?, finished_at = ? WHERE id = ?",
        )
        .bind(status)
        .bind(summary.to_string())
        .bind(to_millis(Utc::now()))
        .bind(run_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn runs(&self, limit: usize) -> StoreResult<Vec<RunRecord>> {
        let rows = sqlx::query("SELECT * FROM runs ORDER BY id DESC LIMIT ?")
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        let held_rows = sqlx::query(
            "SELECT run_id, rule, COUNT(*) AS n FROM actions WHERE status = 'held' GROUP BY run_id, rule",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut progress: std::collections::HashMap<i64, (u64, u64)> = Default::default();
        for r in sqlx::query(
            "SELECT run_id, SUM(status = 'done') AS done, COUNT(*) AS n FROM run_partitions
             WHERE run_id IN (SELECT id FROM runs ORDER BY id DESC LIMIT ?) GROUP BY run_id",
        )
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?
        {
            progress.insert(
                r.try_get("run_id")?,
                (
                    r.try_get::<i64, _>("done")? as u64,
                    r.try_get::<i64, _>("n")? as u64,
                ),
            );
        }
        let mut held: std::collections::HashMap<i64, BTreeMap<String, u64>> = Default::default();
        for r in held_rows {
            held.entry(r.try_get("run_id")?)
                .or_default()
                .insert(r.try_get("rule")?, r.try_get::<i64, _>("n")? as u64);
        }
        rows.iter()
            .map(|r| {
                let summary: String = r.try_get("summary")?;
                let id: i64 = r.try_get("id")?;
                let (partitions_done, partitions) = progress.get(&id).copied().unwrap_or_default();
                Ok(RunRecord {
                    id,
                    partitions_done,
                    partitions,
                    held: held.remove(&id).unwrap_or_default(),
                    trigger: r.try_get("trigger")?,
                    now: from_millis(r.try_get("now")?),
                    started_at: from_millis(r.try_get("started_at")?),
                    finished_at: r.try_get::<Option<i64>, _>("finished_at")?.map(from_millis),
                    status: r.try_get("status")?,
                    summary: json_of(&summary, "runs")?,
                })
            })
            .collect()
    }

    async fn run_errors(&self, run_id: i64) -> StoreResult<Vec<RuleErrorRecord>> {
        let rows = sqlx::query(
            "SELECT rule, customer_id, message FROM run_errors WHERE run_id = ? ORDER BY rowid",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let c: String = r.try_get("customer_id")?;
                Ok(RuleErrorRecord {
                    rule: r.try_get("rule")?,
                    customer_id: CustomerId::parse(&c)
                        .map_err(|e| corrupt("run_errors", e.to_string()))?,
                    message: r.try_get("message")?,
                })
            })
            .collect()
    }

    async fn decide_held(
        &self,
        run_id: i64,
        rule: Option<&str>,
        approve: bool,
        at: DateTime<Utc>,
    ) -> StoreResult<u64> {
        let at_ms = to_millis(at);
        let mut tx = self.immediate().await?;
        // The audit trail keeps the decision after the action moves on.
        sqlx::query(
            "INSERT INTO decisions (run_id, customer_id, rule, subject, decision, reason, at,
                                    first_at, dedup_key)
             SELECT run_id, customer_id, rule, 'email ' || json_extract(payload, '$.template'),
                    ?1, ?2, ?3, ?3, dedup_key
             FROM actions WHERE run_id = ?4 AND status = 'held' AND (?5 IS NULL OR rule = ?5)
             ON CONFLICT DO NOTHING",
        )
        .bind(if approve { "approved" } else { "rejected" })
        .bind(if approve {
            "released after the blast-radius guard held it"
        } else {
            "dropped after the blast-radius guard held it"
        })
        .bind(at_ms)
        .bind(run_id)
        .bind(rule)
        .execute(&mut *tx)
        .await?;
        let n = if approve {
            sqlx::query(
                // Released now, so it counts against the cap from now.
                "UPDATE actions SET status = 'pending', next_attempt_at = MAX(next_attempt_at, ?1),
                 cap_at = MAX(cap_at, ?1), last_error = 'approved after the blast-radius guard held it'
                 WHERE run_id = ?2 AND status = 'held' AND (?3 IS NULL OR rule = ?3)",
            )
        } else {
            sqlx::query(
                "UPDATE actions SET status = 'rejected', finished_at = ?1,
                 last_error = 'rejected after the blast-radius guard held it'
                 WHERE run_id = ?2 AND status = 'held' AND (?3 IS NULL OR rule = ?3)",
            )
        }
        .bind(at_ms)
        .bind(run_id)
        .bind(rule)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query(
            "UPDATE runs SET status = ?1 WHERE id = ?2 AND status = 'held'
             AND NOT EXISTS (SELECT 1 FROM actions WHERE run_id = ?2 AND status = 'held')",
        )
        .bind(if approve { "approved" } else { "rejected" })
        .bind(run_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(n)
    }

    async fn recent_email_counts(
        &self,
        customers: &[CustomerId],
        since: DateTime<Utc>,
    ) -> StoreResult<std::collections::HashMap<CustomerId, u32>> {
        let mut counts = std::collections::HashMap::new();
        let ids: Vec<&str> = customers.iter().map(CustomerId::as_str).collect();
        for chunk in ids.chunks(5000) {
            let rows = sqlx::query(
                // cap_at is on the evaluation clock (a replay with --now
                // sees the cap as it was), moved later by a send window or
                // an approval.
                "SELECT customer_id, COUNT(*) AS n FROM actions
                 WHERE kind = 'email' AND status IN ('staged', 'pending', 'sending', 'sent', 'held')
                   AND cap_at >= ? AND customer_id IN (SELECT value FROM json_each(?))
                 GROUP BY customer_id",
            )
            .bind(to_millis(since))
            .bind(serde_json::to_string(chunk).unwrap_or_else(|_| "[]".into()))
            .fetch_all(&self.pool)
            .await?;
            for r in rows {
                let id: String = r.try_get("customer_id")?;
                let id = id_of(&id, "actions")?;
                counts.insert(id, r.try_get::<i64, _>("n")? as u32);
            }
        }
        Ok(counts)
    }

    async fn claim_due(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> StoreResult<Vec<OutboxItem>> {
        let now_ms = to_millis(now);
        let token = crate::liveness::holder_token();
        let mut tx = self.immediate().await?;
        let rows = sqlx::query(
            "UPDATE actions SET status = 'sending', lease_until = ?1, attempts = attempts + 1, claim_token = ?4
             WHERE id IN (
                SELECT id FROM actions
                WHERE (status = 'pending' AND next_attempt_at <= ?2)
                   OR (status = 'sending' AND lease_until < ?2)
                ORDER BY next_attempt_at, id LIMIT ?3)
             RETURNING id, run_id, customer_id, rule, kind, dedup_key, payload, attempts",
        )
        .bind(to_millis(lease_until))
        .bind(now_ms)
        .bind(limit as i64)
        .bind(&token)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut items = rows
            .iter()
            .map(|r| {
                let kind: String = r.try_get("kind")?;
                let c: String = r.try_get("customer_id")?;
                let payload: String = r.try_get("payload")?;
                Ok(OutboxItem {
                    id: r.try_get("id")?,
                    run_id: r.try_get("run_id")?,
                    customer_id: CustomerId::parse(&c)
                        .map_err(|e| corrupt("actions", e.to_string()))?,
                    rule: r.try_get("rule")?,
                    kind: OutboxKind::parse(&kind)
                        .ok_or_else(|| corrupt("actions", format!("unknown kind {kind:?}")))?,
                    dedup_key: r.try_get("dedup_key")?,
                    payload: json_of(&payload, "actions")?,
                    attempts: r.try_get::<i64, _>("attempts")? as u32,
                    lease_until,
                    claim_token: token.clone(),
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        items.sort_by_key(|i| i.id);
        Ok(items)
    }

    async fn record_attempts(
        &self,
        claim_token: &str,
        results: &[(i64, AttemptResult)],
        at: DateTime<Utc>,
    ) -> StoreResult<()> {
        let at = to_millis(at);
        let mut tx = self.immediate().await?;
        for (id, result) in results {
            let q = match result {
                AttemptResult::Sent { detail } => sqlx::query(
                    "UPDATE actions SET status = 'sent', last_error = NULL, finished_at = ?, lease_until = NULL,
                     payload = json_set(payload, '$.delivery', ?) WHERE id = ? AND status = 'sending' AND claim_token = ?",
                )
                .bind(at)
                .bind(detail.clone()),
                AttemptResult::Retry { error, retry_at } => sqlx::query(
                    "UPDATE actions SET status = 'pending', last_error = ?, next_attempt_at = ?, lease_until = NULL
                     WHERE id = ? AND status = 'sending' AND claim_token = ?",
                )
                .bind(error.clone())
                .bind(to_millis(*retry_at)),
                AttemptResult::Failed { error } => sqlx::query(
                    "UPDATE actions SET status = 'failed', last_error = ?, finished_at = ?, lease_until = NULL
                     WHERE id = ? AND status = 'sending' AND claim_token = ?",
                )
                .bind(error.clone())
                .bind(at),
                AttemptResult::Released => sqlx::query(
                    "UPDATE actions SET status = 'pending', attempts = attempts - 1, lease_until = NULL
                     WHERE id = ? AND status = 'sending' AND claim_token = ?",
                ),
                AttemptResult::Wait { until, reason } => sqlx::query(
                    "UPDATE actions SET status = 'pending', attempts = attempts - 1, lease_until = NULL,
                     next_attempt_at = ?, last_error = ?
                     WHERE id = ? AND status = 'sending' AND claim_token = ?",
                )
                .bind(to_millis(*until))
                .bind(reason.clone()),
                AttemptResult::Suppressed { reason } => sqlx::query(
                    "UPDATE actions SET status = 'suppressed', last_error = ?, finished_at = ?, lease_until = NULL
                     WHERE id = ? AND status = 'sending' AND claim_token = ?",
                )
                .bind(reason.clone())
                .bind(at),
                AttemptResult::Dead { error } => sqlx::query(
                    "UPDATE actions SET status = 'dead', last_error = ?, finished_at = ?, lease_until = NULL
                     WHERE id = ? AND status = 'sending' AND claim_token = ?",
                )
                .bind(error.clone())
                .bind(at),
            };
            q.bind(id).bind(claim_token).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn next_due_at(&self) -> StoreResult<Option<DateTime<Utc>>> {
        let next: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(CASE WHEN status = 'pending' THEN next_attempt_at ELSE lease_until END)
             FROM actions WHERE status IN ('pending', 'sending')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(next.map(from_millis))
    }

    async fn outbox_counts(&self) -> StoreResult<OutboxCounts> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM actions GROUP BY status")
            .fetch_all(&self.pool)
            .await?;
        let mut c = OutboxCounts::default();
        for r in rows {
            let n = r.try_get::<i64, _>("n")? as u64;
            match r.try_get::<String, _>("status")?.as_str() {
                "pending" => c.pending = n,
                "sending" => c.sending = n,
                "sent" => c.sent = n,
                "failed" => c.failed = n,
                "dead" => c.dead = n,
                _ => {}
            }
        }
        Ok(c)
    }

    async fn actions_for_customer(&self, id: &CustomerId) -> StoreResult<Vec<ActionRecord>> {
        let rows = sqlx::query("SELECT * FROM actions WHERE customer_id = ? ORDER BY id")
            .bind(id.as_str())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(action_from_row).collect()
    }

    async fn actions_for_run(&self, run_id: i64) -> StoreResult<Vec<ActionRecord>> {
        let rows = sqlx::query("SELECT * FROM actions WHERE run_id = ? ORDER BY id")
            .bind(run_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(action_from_row).collect()
    }

    async fn decisions_for_customer(&self, id: &CustomerId) -> StoreResult<Vec<DecisionRecord>> {
        let rows = sqlx::query("SELECT * FROM decisions WHERE customer_id = ? ORDER BY id")
            .bind(id.as_str())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(decision_from_row).collect()
    }

    async fn escalations(&self, only_open: bool) -> StoreResult<Vec<EscalationRecord>> {
        let rows =
            sqlx::query(
                "SELECT * FROM escalations WHERE (?1 = 0 OR status IN ('open', 'acknowledged')) ORDER BY id",
            )
                .bind(i64::from(only_open))
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(escalation_from_row).collect()
    }

    async fn escalations_for_customer(
        &self,
        id: &CustomerId,
    ) -> StoreResult<Vec<EscalationRecord>> {
        let rows = sqlx::query("SELECT * FROM escalations WHERE customer_id = ? ORDER BY id")
            .bind(id.as_str())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(escalation_from_row).collect()
    }

    async fn resolve_escalation(&self, id: i64, at: DateTime<Utc>) -> StoreResult<bool> {
        let n = sqlx::query(
            "UPDATE escalations SET status = 'resolved', resolved_at = ?
             WHERE id = ? AND status IN ('open', 'acknowledged')",
        )
        .bind(to_millis(at))
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    async fn escalations_to_renotify(
        &self,
        before: DateTime<Utc>,
    ) -> StoreResult<Vec<EscalationRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM escalations
             WHERE status = 'open' AND recovered_at IS NULL AND notified_at < ? ORDER BY id",
        )
        .bind(to_millis(before))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(escalation_from_row).collect()
    }

    async fn renotify(
        &self,
        id: i64,
        n: u32,
        to: &str,
        run_id: i64,
        at: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let at_ms = to_millis(at);
        let mut tx = self.immediate().await?;
        // Still open and unacknowledged now, inside the transaction?
        let open: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM escalations WHERE id = ? AND status = 'open'")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        if open.is_none() {
            tx.commit().await?;
            return Ok(false);
        }
        // A copy of the first notice, marked as reminder n, to `to`.
        let inserted = sqlx::query(
            "INSERT INTO actions (run_id, customer_id, rule, kind, dedup_key, payload, status,
                                  next_attempt_at, created_at)
             SELECT ?1, customer_id, rule, kind, ?2,
                    json_set(payload, '$.reminder', ?3, '$.owner', ?4), 'pending', ?5, ?5
             FROM actions WHERE dedup_key = ?6
             ON CONFLICT (dedup_key) DO NOTHING",
        )
        .bind(run_id)
        .bind(format!("escalation\u{1f}{id}\u{1f}reminder\u{1f}{n}"))
        .bind(i64::from(n))
        .bind(to)
        .bind(at_ms)
        .bind(format!("escalation\u{1f}{id}"))
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if inserted {
            sqlx::query(
                "UPDATE escalations SET notified_at = ?, notifications = notifications + 1 WHERE id = ?",
            )
            .bind(at_ms)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(inserted)
    }

    async fn owner_escalation_counts(
        &self,
        owners: &[String],
        since: DateTime<Utc>,
    ) -> StoreResult<std::collections::HashMap<String, u32>> {
        let rows = sqlx::query(
            "SELECT e.owner, COUNT(*) AS n FROM escalations e JOIN runs r ON r.id = e.run_id
             WHERE r.now >= ? AND e.owner IN (SELECT value FROM json_each(?)) GROUP BY e.owner",
        )
        .bind(to_millis(since))
        .bind(serde_json::to_string(owners).unwrap_or_else(|_| "[]".into()))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("owner")?, r.try_get::<i64, _>("n")? as u32)))
            .collect()
    }

    async fn set_recovered(
        &self,
        ids: &[i64],
        recovered: bool,
        at: DateTime<Utc>,
    ) -> StoreResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "UPDATE escalations SET recovered_at = CASE WHEN ?1 THEN COALESCE(recovered_at, ?2) ELSE NULL END
             WHERE id IN (SELECT value FROM json_each(?3))",
        )
        .bind(recovered)
        .bind(to_millis(at))
        .bind(serde_json::to_string(ids).unwrap_or_else(|_| "[]".into()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn acknowledge_escalation(&self, id: i64, at: DateTime<Utc>) -> StoreResult<bool> {
        let n = sqlx::query(
            "UPDATE escalations SET status = 'acknowledged', acknowledged_at = ?
             WHERE id = ? AND status = 'open'",
        )
        .bind(to_millis(at))
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    async fn suppress(&self, email: &str, reason: &str, at: DateTime<Utc>) -> StoreResult<bool> {
        let n = sqlx::query(
            // Lower-cased in Rust, as `suppressions_among` looks them up:
            // SQLite's lower() folds ASCII only ("Ünsub@…" would stay).
            "INSERT INTO suppressions (email, reason, created_at) VALUES (?, ?, ?)
             ON CONFLICT DO NOTHING",
        )
        .bind(email.to_lowercase())
        .bind(reason)
        .bind(to_millis(at))
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    async fn suppression(&self, email: &str) -> StoreResult<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT reason FROM suppressions WHERE email = ?")
                .bind(email.to_lowercase())
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn unsuppress(&self, email: &str) -> StoreResult<bool> {
        let n = sqlx::query("DELETE FROM suppressions WHERE email = ?")
            .bind(email.to_lowercase())
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    async fn suppressions(&self) -> StoreResult<Vec<SuppressionRecord>> {
        let rows = sqlx::query(
            "SELECT email, reason, created_at FROM suppressions ORDER BY created_at, email",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(SuppressionRecord {
                    email: r.try_get("email")?,
                    reason: r.try_get("reason")?,
                    created_at: from_millis(r.try_get("created_at")?),
                })
            })
            .collect()
    }

    async fn suppressions_among(
        &self,
        emails: &[String],
    ) -> StoreResult<std::collections::HashMap<String, String>> {
        let mut found = std::collections::HashMap::new();
        for chunk in emails.chunks(5000) {
            let lowered: Vec<String> = chunk.iter().map(|e| e.to_lowercase()).collect();
            let rows = sqlx::query(
                "SELECT email, reason FROM suppressions WHERE email IN (SELECT value FROM json_each(?))",
            )
            .bind(serde_json::to_string(&lowered).unwrap_or_else(|_| "[]".into()))
            .fetch_all(&self.pool)
            .await?;
            for r in rows {
                found.insert(r.try_get("email")?, r.try_get("reason")?);
            }
        }
        Ok(found)
    }

    async fn last_firing(&self, schedule: &str) -> StoreResult<Option<DateTime<Utc>>> {
        let at: Option<i64> =
            sqlx::query_scalar("SELECT MAX(fire_at) FROM schedule_firings WHERE schedule = ?")
                .bind(schedule)
                .fetch_one(&self.pool)
                .await?;
        Ok(at.map(from_millis))
    }

    async fn record_firing(
        &self,
        schedule: &str,
        fire_at: DateTime<Utc>,
        status: &str,
        note: Option<&str>,
        now: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let n = sqlx::query(
            "INSERT INTO schedule_firings (schedule, fire_at, status, note, created_at, finished_at)
             VALUES (?, ?, ?, ?, ?, CASE WHEN ? = 'pending' THEN NULL ELSE ? END)
             ON CONFLICT DO NOTHING",
        )
        .bind(schedule)
        .bind(to_millis(fire_at))
        .bind(status)
        .bind(note)
        .bind(to_millis(now))
        .bind(status)
        .bind(to_millis(now))
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    async fn claim_firing(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        holder: &str,
    ) -> StoreResult<Option<Firing>> {
        let now_ms = to_millis(now);
        let mut tx = self.immediate().await?;
        // The oldest waiting firing of a schedule that is not running right
        // now (a running firing whose lease expired counts as waiting).
        let row = sqlx::query(
            "SELECT schedule, fire_at FROM schedule_firings f
             WHERE (status = 'pending' OR (status = 'running' AND lease_until < ?1))
               AND NOT EXISTS (
                   SELECT 1 FROM schedule_firings r
                   WHERE r.schedule = f.schedule AND r.status = 'running'
                     AND r.lease_until >= ?1 AND r.fire_at <> f.fire_at)
             ORDER BY fire_at LIMIT 1",
        )
        .bind(now_ms)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.commit().await?;
            return Ok(None);
        };
        let schedule: String = row.try_get("schedule")?;
        let fire_at: i64 = row.try_get("fire_at")?;
        sqlx::query(
            "UPDATE schedule_firings SET status = 'running', lease_until = ?, holder = ?
             WHERE schedule = ? AND fire_at = ?",
        )
        .bind(to_millis(lease_until))
        .bind(holder)
        .bind(&schedule)
        .bind(fire_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(Firing {
            schedule,
            fire_at: from_millis(fire_at),
            holder: holder.to_owned(),
        }))
    }

    async fn renew_firing(&self, firing: &Firing, until: DateTime<Utc>) -> StoreResult<bool> {
        let n = sqlx::query(
            "UPDATE schedule_firings SET lease_until = ?
             WHERE schedule = ? AND fire_at = ? AND status = 'running' AND holder = ?",
        )
        .bind(to_millis(until))
        .bind(&firing.schedule)
        .bind(to_millis(firing.fire_at))
        .bind(&firing.holder)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    async fn finish_firing(
        &self,
        firing: &Firing,
        status: &str,
        run_id: Option<i64>,
        note: Option<&str>,
        at: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let n = sqlx::query(
            "UPDATE schedule_firings SET status = ?, run_id = COALESCE(?, run_id), note = ?,
                 finished_at = ?, lease_until = NULL, holder = NULL
             WHERE schedule = ? AND fire_at = ? AND status = 'running' AND holder = ?",
        )
        .bind(status)
        .bind(run_id)
        .bind(note)
        .bind(to_millis(at))
        .bind(&firing.schedule)
        .bind(to_millis(firing.fire_at))
        .bind(&firing.holder)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    async fn lease_holders(&self) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT holder FROM schedule_firings WHERE status = 'running' AND holder IS NOT NULL
             UNION SELECT holder FROM planner_lock WHERE holder IS NOT NULL
             UNION SELECT claim_token FROM actions WHERE status = 'sending' AND claim_token IS NOT NULL
             UNION SELECT holder FROM run_partitions WHERE status = 'claimed' AND holder IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    async fn release_holder(
        &self,
        process: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<ReleasedLeases> {
        let mut tx = self.immediate().await?;
        let prefix = format!("{process}/");
        let firings = sqlx::query(
            "UPDATE schedule_firings SET status = 'pending', lease_until = NULL, holder = NULL,
                 note = 'its process died; queued again'
             WHERE status = 'running' AND substr(holder, 1, length(?1)) = ?1",
        )
        .bind(&prefix)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let planner_lock = sqlx::query(
            "UPDATE planner_lock SET holder = NULL, until = 0
             WHERE id = 1 AND substr(holder, 1, length(?1)) = ?1",
        )
        .bind(&prefix)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        // The attempt stays counted: the dead process may have sent it.
        let actions = sqlx::query(
            "UPDATE actions SET status = 'pending', lease_until = NULL, claim_token = NULL,
                 next_attempt_at = MIN(next_attempt_at, ?2)
             WHERE status = 'sending' AND substr(claim_token, 1, length(?1)) = ?1",
        )
        .bind(&prefix)
        .bind(to_millis(now))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let partitions = sqlx::query(
            "UPDATE run_partitions SET status = 'pending', lease_until = NULL
             WHERE status = 'claimed' AND substr(holder, 1, length(?1)) = ?1",
        )
        .bind(&prefix)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(ReleasedLeases {
            firings,
            planner_lock,
            actions,
            partitions,
        })
    }

    async fn firings(&self, schedule: &str) -> StoreResult<Vec<FiringRecord>> {
        let rows = sqlx::query(
            "SELECT schedule, fire_at, status, run_id, note FROM schedule_firings
             WHERE schedule = ? ORDER BY fire_at",
        )
        .bind(schedule)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(FiringRecord {
                    schedule: r.try_get("schedule")?,
                    fire_at: from_millis(r.try_get("fire_at")?),
                    status: r.try_get("status")?,
                    run_id: r.try_get("run_id")?,
                    note: r.try_get("note")?,
                })
            })
            .collect()
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn setting_or_init(&self, key: &str, init: &str) -> StoreResult<String> {
        let mut tx = self.immediate().await?;
        sqlx::query("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT DO NOTHING")
            .bind(key)
            .bind(init)
            .execute(&mut *tx)
            .await?;
        let v: String = sqlx::query_scalar("SELECT value FROM settings WHERE key = ?")
            .bind(key)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(v)
    }
}
