//! The PostgreSQL store, for several replicas on one database. Semantics
//! match `sqlite.rs` method for method (one conformance suite runs on both);
//! what differs is how they hold under concurrency:
//!
//! - claims (`claim_due`) lock candidate rows with `FOR UPDATE SKIP LOCKED`,
//!   so two replicas never claim the same outbox row;
//! - dedup is the unique index on `actions.dedup_key` with
//!   `ON CONFLICT … DO UPDATE` (never read-then-write), so concurrent commits
//!   of the same key record one action and one repeat;
//! - the planner lock is one conditional `UPDATE` of one row;
//! - firing claims serialise on a transaction-scoped advisory lock, so two
//!   firings of one schedule never run at once; plan commits take turns on
//!   another (as SQLite's write lock makes them), which keeps commits of
//!   overlapping keys from deadlocking;
//! - a transaction that loses a deadlock anyway is run again whole.
//!
//! Multi-row writes bind one array per column and `unnest` them: a statement
//! has a dozen parameters however many rows it writes (PostgreSQL allows
//! 65,535). `ON CONFLICT DO UPDATE` may not touch one row twice in a
//! statement, so keys are made unique per statement first (see [`rounds`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::Hash;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgPool, Postgres, Row};

use super::rows::{
    action_from_row, corrupt, customer_from_row, decision_from_row, escalation_from_row,
    event_from_row, id_of, json_of, partition_from_rows, partition_ranges,
    partition_record_from_row, tag_from_row, unfinished_run_from_row,
};
use super::*;
use crate::domain::{Customer, CustomerId, CustomerPatch, Event};

/// Rows per multi-row statement. Arrays keep the parameter count fixed, so
/// this only bounds the size of one statement and of its RETURNING rows.
const CHUNK: usize = 5_000;
/// How often a transaction that lost a deadlock (or a serialisation check)
/// to a concurrent one is tried again before the error is returned.
const RETRIES: usize = 10;
/// Keys of the advisory locks that serialise firing claims and plan
/// commits (constants unlikely to collide with another application's locks
/// in the same database: "engaged" and a number).
const FIRING_LOCK: i64 = 0x656e_6761_6765_6401;
const COMMIT_LOCK: i64 = 0x656e_6761_6765_6402;

pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// (customer, rule, reason) of the escalations of these pairs that are
    /// resolved (`resolved`) or still open (open or acknowledged).
    async fn escalations_of_pairs(
        &self,
        pairs: &[(CustomerId, String)],
        resolved: bool,
    ) -> StoreResult<Vec<(CustomerId, String, String)>> {
        let sql = if resolved {
            "SELECT customer_id, rule, reason FROM escalations WHERE status = 'resolved'
             AND customer_id = ANY($1)"
        } else {
            "SELECT customer_id, rule, reason FROM escalations
             WHERE status IN ('open', 'acknowledged') AND customer_id = ANY($1)"
        };
        let wanted: HashSet<&(CustomerId, String)> = pairs.iter().collect();
        let ids: Vec<&str> = pairs.iter().map(|(c, _)| c.as_str()).collect();
        let mut found = Vec::new();
        for chunk in ids.chunks(CHUNK) {
            let rows = sqlx::query(sql).bind(chunk).fetch_all(&self.pool).await?;
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

    /// Connects to the database at `url` (`postgres://` or `postgresql://`)
    /// and migrates it. Several replicas may start at once: sqlx holds an
    /// advisory lock while it migrates.
    pub async fn open(url: &str) -> StoreResult<Self> {
        let redacted = crate::config::redact_url(url);
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::BadUrl {
                url: redacted.clone(),
                message: e.to_string(),
            })?
            .application_name("engaged");
        let connect_error = |e: sqlx::Error| StoreError::Connect {
            url: redacted.clone(),
            message: e.to_string(),
        };
        // One connection first, outside the pool: the pool retries a
        // refused connection until its timeout and then reports only that
        // it timed out; this says at once what is wrong.
        sqlx::ConnectOptions::connect(&options)
            .await
            .map_err(connect_error)?
            .close()
            .await
            .map_err(connect_error)?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await
            .map_err(connect_error)?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(Self { pool })
    }
}

/// Whether a transaction failed only because a concurrent one won (a
/// deadlock or a serialisation failure) and may simply be run again.
fn is_retryable(e: &StoreError) -> bool {
    match e {
        StoreError::Database(e) => e
            .as_database_error()
            .and_then(|d| d.code())
            .is_some_and(|code| code == "40P01" || code == "40001"),
        _ => false,
    }
}

/// Runs a whole transaction again when it lost a deadlock or a
/// serialisation check to a concurrent one (it left nothing behind).
async fn retrying<T, F, Fut>(what: &'static str, mut attempt_once: F) -> StoreResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = StoreResult<T>>,
{
    let mut attempt = 0;
    loop {
        match attempt_once().await {
            Err(e) if is_retryable(&e) && attempt < RETRIES => {
                attempt += 1;
                tracing::info!(attempt, error = %e, "{what} lost to a concurrent transaction; trying again.");
                // Jitter, so the same transactions do not meet in the same order again.
                let pause = rand::random_range(10..50u64) * attempt as u64;
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            result => return result,
        }
    }
}

/// Splits `items` into rounds in which every key occurs once: the n-th
/// occurrence of a key goes to round n. Running the rounds in order gives
/// the same result as one statement per item (later items win), with as
/// few multi-row statements as the data allows (usually one).
fn rounds<'a, T, K: Hash + Eq>(items: &'a [T], key: impl Fn(&'a T) -> K) -> Vec<Vec<&'a T>> {
    let mut seen: HashMap<K, usize> = HashMap::new();
    let mut out: Vec<Vec<&T>> = Vec::new();
    for item in items {
        let n = seen.entry(key(item)).or_insert(0);
        if out.len() <= *n {
            out.push(Vec::new());
        }
        out[*n].push(item);
        *n += 1;
    }
    out
}

fn strings<'a>(items: impl Iterator<Item = &'a str>) -> Vec<String> {
    items.map(str::to_owned).collect()
}

type Tx = sqlx::Transaction<'static, Postgres>;

/// Marks a running firing done with its run, if `f`'s holder still has it
/// (`LeaseLost` otherwise: another process took it over).
async fn mark_firing_done(tx: &mut Tx, f: &Firing, run_id: i64, at: i64) -> StoreResult<()> {
    let n = sqlx::query(
        "UPDATE schedule_firings SET status = 'done', run_id = $1, finished_at = $2, lease_until = NULL
         WHERE schedule = $3 AND fire_at = $4 AND status = 'running' AND holder = $5",
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
/// evaluate only what changed). Sorted and distinct: concurrent batches take
/// row locks in one order, and one statement touches each row once.
async fn mark_changed<'a>(
    tx: &mut Tx,
    ids: impl Iterator<Item = &'a str>,
    at: i64,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO customer_changes (customer_id, changed_at)
         SELECT DISTINCT u.id, $2::bigint FROM unnest($1::text[]) AS u(id) ORDER BY u.id
         ON CONFLICT (customer_id) DO UPDATE SET changed_at = excluded.changed_at",
    )
    .bind(strings(ids))
    .bind(at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// One customer's history from `json_agg(json_build_array(name, at, properties))`.
fn history_from_row(r: &sqlx::postgres::PgRow) -> StoreResult<(CustomerId, Vec<HistoryEvent>)> {
    let id: String = r.try_get(0)?;
    let history: &str = r.try_get(1)?;
    let raw: Vec<(String, i64, Value)> =
        serde_json::from_str(history).map_err(|e| corrupt("events", e.to_string()))?;
    Ok((
        id_of(&id, "events")?,
        raw.into_iter()
            .map(|(name, at, props)| (name, from_millis(at), props))
            .collect(),
    ))
}

impl PostgresStore {
    async fn upsert_customers_once(&self, patches: &[CustomerPatch]) -> StoreResult<Vec<Upsert>> {
        let mut tx = self.pool.begin().await?;
        let now = to_millis(Utc::now());
        let mut outcomes = Vec::with_capacity(patches.len());
        for chunk in patches.chunks(CHUNK) {
            // A file may name the same customer twice; later rows win, and
            // each row after the first counts as an update. Rounds keep each
            // id once per statement and apply repeats in file order.
            let mut first: HashMap<&str, Upsert> = HashMap::new();
            for (n, round) in rounds(chunk, |p| p.id.as_str()).into_iter().enumerate() {
                let inserted = insert_new_customers(&mut tx, now, &round).await?;
                let known: Vec<&CustomerPatch> = round
                    .iter()
                    .copied()
                    .filter(|p| !inserted.contains(p.id.as_str()))
                    .collect();
                patch_customers(&mut tx, now, &known).await?;
                mark_changed(&mut tx, round.iter().map(|p| p.id.as_str()), now).await?;
                if n == 0 {
                    for p in &round {
                        let outcome = if inserted.contains(p.id.as_str()) {
                            Upsert::Inserted
                        } else {
                            Upsert::Updated
                        };
                        first.insert(p.id.as_str(), outcome);
                    }
                }
            }
            let mut told: HashSet<&str> = HashSet::new();
            for p in chunk {
                outcomes.push(if told.insert(p.id.as_str()) {
                    first[p.id.as_str()]
                } else {
                    Upsert::Updated
                });
            }
        }
        tx.commit().await?;
        Ok(outcomes)
    }

    async fn insert_events_once(&self, events: &[Event]) -> StoreResult<EventInsert> {
        let mut tx = self.pool.begin().await?;
        let mut inserted = 0usize;
        for chunk in events.chunks(CHUNK) {
            // DO NOTHING (unlike DO UPDATE) copes with a key repeated in one
            // statement: the second occurrence is a duplicate of the first.
            inserted += sqlx::query(
                "INSERT INTO events (message_id, customer_id, name, properties, at)
                 SELECT u.message_id, u.customer_id, u.name, u.properties, u.at
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[])
                      WITH ORDINALITY AS u(message_id, customer_id, name, properties, at, n)
                 ORDER BY u.n
                 ON CONFLICT (message_id) DO NOTHING",
            )
            .bind(strings(chunk.iter().map(|e| e.message_id.as_str())))
            .bind(strings(chunk.iter().map(|e| e.customer_id.as_str())))
            .bind(strings(chunk.iter().map(|e| e.name.as_str())))
            .bind(
                chunk
                    .iter()
                    .map(|e| e.properties.to_string())
                    .collect::<Vec<_>>(),
            )
            .bind(chunk.iter().map(|e| to_millis(e.at)).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?
            .rows_affected() as usize;
            mark_changed(
                &mut tx,
                chunk.iter().map(|e| e.customer_id.as_str()),
                to_millis(Utc::now()),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(EventInsert {
            inserted,
            duplicates: events.len() - inserted,
        })
    }

    async fn record_attempts_once(
        &self,
        claim_token: &str,
        results: &[(i64, AttemptResult)],
        at: DateTime<Utc>,
    ) -> StoreResult<()> {
        let at = to_millis(at);
        // One statement per kind of outcome instead of one per row. An id
        // listed twice keeps its first outcome, as applying them in order
        // would (the first moves the row out of `sending`).
        let mut seen = HashSet::new();
        let mut sent: (Vec<i64>, Vec<String>) = Default::default();
        let mut retry: (Vec<i64>, Vec<String>, Vec<i64>) = Default::default();
        let mut wait: (Vec<i64>, Vec<String>, Vec<i64>) = Default::default();
        let mut released: Vec<i64> = Vec::new();
        // Final outcomes with a message: (ids, messages, statuses).
        let mut finals: (Vec<i64>, Vec<String>, Vec<&str>) = Default::default();
        for (id, result) in results {
            if !seen.insert(*id) {
                continue;
            }
            match result {
                AttemptResult::Sent { detail } => {
                    sent.0.push(*id);
                    sent.1.push(detail.clone());
                }
                AttemptResult::Retry { error, retry_at } => {
                    retry.0.push(*id);
                    retry.1.push(error.clone());
                    retry.2.push(to_millis(*retry_at));
                }
                AttemptResult::Released => released.push(*id),
                AttemptResult::Wait { until, reason } => {
                    wait.0.push(*id);
                    wait.1.push(reason.clone());
                    wait.2.push(to_millis(*until));
                }
                AttemptResult::Failed { error } => {
                    finals.0.push(*id);
                    finals.1.push(error.clone());
                    finals.2.push("failed");
                }
                AttemptResult::Dead { error } => {
                    finals.0.push(*id);
                    finals.1.push(error.clone());
                    finals.2.push("dead");
                }
                AttemptResult::Suppressed { reason } => {
                    finals.0.push(*id);
                    finals.1.push(reason.clone());
                    finals.2.push("suppressed");
                }
            }
        }
        let mut tx = self.pool.begin().await?;
        if !sent.0.is_empty() {
            sqlx::query(
                "UPDATE actions a SET status = 'sent', last_error = NULL, finished_at = $1, lease_until = NULL,
                 payload = jsonb_set(a.payload::jsonb, '{delivery}', to_jsonb(u.detail))::text
                 FROM unnest($2::bigint[], $3::text[]) AS u(id, detail)
                 WHERE a.id = u.id AND a.status = 'sending' AND a.claim_token = $4",
            )
            .bind(at)
            .bind(&sent.0)
            .bind(&sent.1)
            .bind(claim_token)
            .execute(&mut *tx)
            .await?;
        }
        if !retry.0.is_empty() {
            sqlx::query(
                "UPDATE actions a SET status = 'pending', last_error = u.error, next_attempt_at = u.retry_at,
                 lease_until = NULL
                 FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS u(id, error, retry_at)
                 WHERE a.id = u.id AND a.status = 'sending' AND a.claim_token = $4",
            )
            .bind(&retry.0)
            .bind(&retry.1)
            .bind(&retry.2)
            .bind(claim_token)
            .execute(&mut *tx)
            .await?;
        }
        if !released.is_empty() {
            sqlx::query(
                "UPDATE actions SET status = 'pending', attempts = attempts - 1, lease_until = NULL
                 WHERE id = ANY($1) AND status = 'sending' AND claim_token = $2",
            )
            .bind(&released)
            .bind(claim_token)
            .execute(&mut *tx)
            .await?;
        }
        if !wait.0.is_empty() {
            sqlx::query(
                "UPDATE actions a SET status = 'pending', attempts = attempts - 1, lease_until = NULL,
                 next_attempt_at = u.until, last_error = u.reason
                 FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS u(id, reason, until)
                 WHERE a.id = u.id AND a.status = 'sending' AND a.claim_token = $4",
            )
            .bind(&wait.0)
            .bind(&wait.1)
            .bind(&wait.2)
            .bind(claim_token)
            .execute(&mut *tx)
            .await?;
        }
        if !finals.0.is_empty() {
            sqlx::query(
                "UPDATE actions a SET status = u.status, last_error = u.message, finished_at = $1,
                 lease_until = NULL
                 FROM unnest($2::bigint[], $3::text[], $4::text[]) AS u(id, message, status)
                 WHERE a.id = u.id AND a.status = 'sending' AND a.claim_token = $5",
            )
            .bind(at)
            .bind(&finals.0)
            .bind(&finals.1)
            .bind(&finals.2)
            .bind(claim_token)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// One attempt at `commit_plan`; [`retrying`] runs it again whole if
    /// it lost a deadlock.
    async fn commit_plan_once(&self, plan: &PlanCommit) -> StoreResult<CommitOutcome> {
        let started = std::time::Instant::now();
        let mut tx = self.pool.begin().await?;
        // One commit at a time per database, as SQLite's write lock gives.
        // Dedup does not depend on it (the unique indexes decide), but two
        // commits upserting overlapping keys in different orders deadlock,
        // and PostgreSQL takes a second (deadlock_timeout) to notice.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(COMMIT_LOCK)
            .execute(&mut *tx)
            .await?;
        let now_ms = to_millis(plan.started_at);
        let plan_ms = to_millis(plan.now);
        let staged = plan.partition.is_some();
        let run_id: i64 = match &plan.partition {
            // A partition is committed only by the holder of its claim,
            // while its run is still planning: one taken over by another
            // replica (this one was too slow to renew) is theirs now.
            Some(p) => {
                let n = sqlx::query(
                    "UPDATE run_partitions SET status = 'done', summary = $1, done_at = $2, lease_until = NULL
                     WHERE run_id = $3 AND idx = $4 AND holder = $5 AND status = 'claimed'
                       AND EXISTS (SELECT 1 FROM runs WHERE id = $3 AND status = 'planning')",
                )
                .bind(p.summary.to_string())
                .bind(to_millis(Utc::now()))
                .bind(p.run_id)
                .bind(i64::from(p.index))
                .bind(&p.holder)
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
                    "INSERT INTO runs (trigger, now, started_at, status, summary)
                     VALUES ($1, $2, $3, 'planned', $4) RETURNING id",
                )
                .bind(&plan.trigger)
                .bind(plan_ms)
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
        // This also keeps each key once per statement, which PostgreSQL's
        // ON CONFLICT DO UPDATE requires.
        let mut seen: HashSet<&str> = HashSet::new();
        let mut unique: Vec<&NewAction> = Vec::with_capacity(plan.actions.len());
        for a in &plan.actions {
            if seen.insert(a.dedup_key.as_str()) {
                unique.push(a);
            } else {
                per_rule.entry(a.rule.clone()).or_default().deduplicated += 1;
            }
        }
        drop(seen);
        let mut new_emails: BTreeMap<&str, usize> = BTreeMap::new();
        for chunk in unique.chunks(CHUNK) {
            let inserted = insert_actions(&mut tx, run_id, now_ms, plan_ms, chunk, staged).await?;
            let mut tags = Vec::new();
            for &a in chunk {
                let counts = per_rule.entry(a.rule.clone()).or_default();
                if inserted.contains(a.dedup_key.as_str()) {
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
                sqlx::query(
                    "INSERT INTO customer_tags (customer_id, tag, created_at)
                     SELECT u.customer_id, u.tag, $1 FROM unnest($2::text[], $3::text[]) AS u(customer_id, tag)
                     ON CONFLICT DO NOTHING",
                )
                .bind(now_ms)
                .bind(strings(tags.iter().map(|a| a.customer_id.as_str())))
                .bind(strings(tags.iter().map(|a| a.subject.as_str())))
                .execute(&mut *tx)
                .await?;
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
                "UPDATE actions SET status = 'held', last_error = $1
                 WHERE run_id = $2 AND rule = $3 AND kind = 'email' AND status = 'pending'",
            )
            .bind(reason)
            .bind(run_id)
            .bind(rule)
            .execute(&mut *tx)
            .await?;
            held.insert(rule.clone(), n);
        }
        if !held.is_empty() {
            sqlx::query("UPDATE runs SET status = 'held' WHERE id = $1")
                .bind(run_id)
                .execute(&mut *tx)
                .await?;
        }
        drop(new_emails);

        for chunk in plan.escalations.chunks(CHUNK) {
            open_escalations(&mut tx, run_id, now_ms, plan_ms, chunk, &mut per_rule).await?;
        }

        // A decision repeated by later runs updates its row; one repeated
        // within this plan does too (a later round of the same statement).
        for round in rounds(&plan.decisions, |d| (&d.dedup_key, &d.decision)) {
            for chunk in round.chunks(CHUNK) {
                sqlx::query(
                    "INSERT INTO decisions (run_id, customer_id, rule, subject, decision, reason, at,
                                            first_at, dedup_key)
                     SELECT $1, u.customer_id, u.rule, u.subject, u.decision, u.reason, $2, $2, u.dedup_key
                     FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[])
                          WITH ORDINALITY AS u(customer_id, rule, subject, decision, reason, dedup_key, n)
                     ORDER BY u.n
                     ON CONFLICT (dedup_key, decision) DO UPDATE SET
                         run_id = EXCLUDED.run_id, subject = EXCLUDED.subject,
                         reason = EXCLUDED.reason, at = EXCLUDED.at, times = decisions.times + 1",
                )
                .bind(run_id)
                .bind(plan_ms)
                .bind(strings(chunk.iter().map(|d| d.customer_id.as_str())))
                .bind(strings(chunk.iter().map(|d| d.rule.as_str())))
                .bind(strings(chunk.iter().map(|d| d.subject.as_str())))
                .bind(strings(chunk.iter().map(|d| d.decision.as_str())))
                .bind(strings(chunk.iter().map(|d| d.reason.as_str())))
                .bind(strings(chunk.iter().map(|d| d.dedup_key.as_str())))
                .execute(&mut *tx)
                .await?;
            }
        }

        for chunk in plan.errors.chunks(CHUNK) {
            sqlx::query(
                "INSERT INTO run_errors (run_id, rule, customer_id, message)
                 SELECT $1, u.rule, u.customer_id, u.message
                 FROM unnest($2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS u(rule, customer_id, message, n)
                 ORDER BY u.n",
            )
            .bind(run_id)
            .bind(strings(chunk.iter().map(|e| e.rule.as_str())))
            .bind(strings(chunk.iter().map(|e| e.customer_id.as_str())))
            .bind(strings(chunk.iter().map(|e| e.message.as_str())))
            .execute(&mut *tx)
            .await?;
        }
        if let Some(p) = &plan.partition {
            sqlx::query(
                "UPDATE run_partitions SET counts = $1, commit_seconds = $4 WHERE run_id = $2 AND idx = $3",
            )
            .bind(serde_json::to_string(&per_rule).unwrap_or_else(|_| "{}".into()))
                .bind(p.run_id)
                .bind(i64::from(p.index))
                .bind(started.elapsed().as_secs_f64())
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
}

/// Inserts one chunk of actions (keys unique within it); a key already in
/// the ledger is not planned again, its row records the repeat instead.
/// Returns the keys this run inserted: RETURNING gives every row touched,
/// and a new row carries this run's id while a repeat keeps its own.
async fn insert_actions(
    tx: &mut Tx,
    run_id: i64,
    now_ms: i64,
    plan_ms: i64,
    chunk: &[&NewAction],
    staged: bool,
) -> StoreResult<HashSet<String>> {
    let status = |a: &NewAction| super::rows::initial_status(a, staged);
    let finished =
        |a: &NewAction| (a.kind == OutboxKind::Tag || a.dropped.is_some()).then_some(now_ms);
    let rows = sqlx::query(
        "INSERT INTO actions (run_id, customer_id, rule, kind, dedup_key, payload, status,
                              next_attempt_at, created_at, finished_at, last_error, cap_at)
         SELECT $1, u.customer_id, u.rule, u.kind, u.dedup_key, u.payload, u.status,
                u.next_attempt_at, $2, u.finished_at, u.last_error, u.cap_at
         FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
                     $9::bigint[], $10::bigint[], $11::text[], $12::bigint[])
              WITH ORDINALITY AS u(customer_id, rule, kind, dedup_key, payload, status,
                                   next_attempt_at, finished_at, last_error, cap_at, n)
         ORDER BY u.n
         ON CONFLICT (dedup_key) DO UPDATE SET repeats = actions.repeats + 1,
             repeated_run = EXCLUDED.run_id, repeated_at = $13
             WHERE actions.kind <> 'tag'
         RETURNING dedup_key, run_id",
    )
    .bind(run_id)
    .bind(now_ms)
    .bind(strings(chunk.iter().map(|a| a.customer_id.as_str())))
    .bind(strings(chunk.iter().map(|a| a.rule.as_str())))
    .bind(strings(chunk.iter().map(|a| a.kind.as_str())))
    .bind(strings(chunk.iter().map(|a| a.dedup_key.as_str())))
    .bind(strings(chunk.iter().map(|a| a.payload.as_str())))
    .bind(strings(chunk.iter().map(|a| status(a))))
    .bind(
        chunk
            .iter()
            .map(|a| a.not_before.map_or(now_ms, to_millis).max(now_ms))
            .collect::<Vec<i64>>(),
    )
    .bind(
        chunk
            .iter()
            .map(|a| finished(a))
            .collect::<Vec<Option<i64>>>(),
    )
    .bind(
        chunk
            .iter()
            .map(|a| a.dropped.clone())
            .collect::<Vec<Option<String>>>(),
    )
    .bind(
        chunk
            .iter()
            .map(|a| a.not_before.map_or(plan_ms, to_millis).max(plan_ms))
            .collect::<Vec<i64>>(),
    )
    .bind(plan_ms)
    .fetch_all(&mut **tx)
    .await?;
    let mut inserted = HashSet::new();
    for r in rows {
        if r.try_get::<i64, _>(1)? == run_id {
            inserted.insert(r.try_get(0)?);
        }
    }
    Ok(inserted)
}

/// Opens one chunk of escalations and enqueues a notice for each opened.
/// The partial unique index keeps one open escalation per customer and
/// rule (a concurrent commit of the same pair waits for this one, then does
/// nothing); one a human resolved is not reopened for the same reason.
async fn open_escalations(
    tx: &mut Tx,
    run_id: i64,
    now_ms: i64,
    plan_ms: i64,
    chunk: &[NewEscalation],
    per_rule: &mut BTreeMap<String, RuleCommitCounts>,
) -> StoreResult<()> {
    let rows = sqlx::query(
        "INSERT INTO escalations (run_id, customer_id, rule, reason, owner, status, created_at, notified_at)
         SELECT $1, u.customer_id, u.rule, u.reason, u.owner, 'open', $2, $2
         FROM unnest($3::text[], $4::text[], $5::text[], $6::text[])
              WITH ORDINALITY AS u(customer_id, rule, reason, owner, n)
         WHERE NOT EXISTS (SELECT 1 FROM escalations r
                           WHERE r.customer_id = u.customer_id AND r.rule = u.rule
                             AND r.reason = u.reason AND r.status = 'resolved')
         ORDER BY u.n
         ON CONFLICT DO NOTHING
         RETURNING id, customer_id, rule, reason",
    )
    .bind(run_id)
    .bind(plan_ms) // escalation times follow the evaluation clock (--now replays)
    .bind(strings(chunk.iter().map(|e| e.customer_id.as_str())))
    .bind(strings(chunk.iter().map(|e| e.rule.as_str())))
    .bind(strings(chunk.iter().map(|e| e.reason.as_str())))
    .bind(strings(chunk.iter().map(|e| e.owner.as_str())))
    .fetch_all(&mut **tx)
    .await?;
    // At most one row per (customer, rule) came back; it belongs to the
    // first request for that pair with its reason (rows went in in order).
    let mut opened: HashMap<(String, String), (i64, String)> = HashMap::new();
    for r in rows {
        opened.insert(
            (r.try_get("customer_id")?, r.try_get("rule")?),
            (r.try_get("id")?, r.try_get("reason")?),
        );
    }
    let mut notices: Vec<(&NewEscalation, i64, String)> = Vec::new();
    for e in chunk {
        let counts = per_rule.entry(e.rule.clone()).or_default();
        let pair = (e.customer_id.as_str().to_owned(), e.rule.clone());
        match opened.get(&pair) {
            Some((id, reason)) if *reason == e.reason => {
                let id = *id;
                opened.remove(&pair);
                counts.planned += 1;
                let mut notice = e.notice.clone();
                if let Value::Object(m) = &mut notice {
                    m.insert("escalation_id".into(), Value::from(id));
                }
                notices.push((e, id, notice.to_string()));
            }
            _ => counts.deduplicated += 1,
        }
    }
    if notices.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO actions (run_id, customer_id, rule, kind, dedup_key, payload, status,
                              next_attempt_at, created_at)
         SELECT $1, u.customer_id, u.rule, 'escalation_notice', u.dedup_key, u.payload, 'pending', $2, $2
         FROM unnest($3::text[], $4::text[], $5::text[], $6::text[])
              WITH ORDINALITY AS u(customer_id, rule, dedup_key, payload, n)
         ORDER BY u.n",
    )
    .bind(run_id)
    .bind(now_ms)
    .bind(strings(notices.iter().map(|(e, _, _)| e.customer_id.as_str())))
    .bind(strings(notices.iter().map(|(e, _, _)| e.rule.as_str())))
    .bind(
        notices
            .iter()
            .map(|(_, id, _)| format!("escalation\u{1f}{id}"))
            .collect::<Vec<_>>(),
    )
    .bind(strings(notices.iter().map(|(_, _, p)| p.as_str())))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Inserts the customers of `round` (ids unique) that do not exist yet;
/// returns their ids. The others are left to [`patch_customers`]: an upsert
/// cannot tell "no model given" from the default it fills in, and re-import
/// keeps a stored model unless the file names one.
async fn insert_new_customers(
    tx: &mut Tx,
    now: i64,
    round: &[&CustomerPatch],
) -> StoreResult<HashSet<String>> {
    let ids: Vec<String> = sqlx::query_scalar(
        "INSERT INTO customers (id, email, name, created_at, timezone, model, owner, traits, updated_at)
         SELECT u.id, u.email, u.name, u.created_at, u.timezone, COALESCE(u.model, 'low-touch'),
                u.owner, u.traits, $1
         FROM unnest($2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::text[],
                     $8::text[], $9::text[])
              WITH ORDINALITY AS u(id, email, name, created_at, timezone, model, owner, traits, n)
         ORDER BY u.n
         ON CONFLICT (id) DO NOTHING
         RETURNING id",
    )
    .bind(now)
    .bind(strings(round.iter().map(|p| p.id.as_str())))
    .bind(round.iter().map(|p| p.email.as_ref().map(|e| e.as_str().to_owned())).collect::<Vec<_>>())
    .bind(round.iter().map(|p| p.name.clone()).collect::<Vec<_>>())
    .bind(round.iter().map(|p| p.created_at.map(to_millis)).collect::<Vec<_>>())
    .bind(round.iter().map(|p| p.timezone.clone()).collect::<Vec<_>>())
    .bind(round.iter().map(|p| p.model.map(|m| m.as_str().to_owned())).collect::<Vec<_>>())
    .bind(round.iter().map(|p| p.owner.as_ref().map(|e| e.as_str().to_owned())).collect::<Vec<_>>())
    .bind(round.iter().map(|p| serde_json::to_string(&p.traits).unwrap_or_else(|_| "{}".into())).collect::<Vec<_>>())
    .fetch_all(&mut **tx)
    .await?;
    Ok(ids.into_iter().collect())
}

/// Applies patches to existing customers (ids unique): given fields
/// replace, missing ones stay, traits merge (RFC 7396, as SQLite's
/// json_patch). A row another transaction inserted concurrently was waited
/// for by the insert and is patched here.
async fn patch_customers(tx: &mut Tx, now: i64, patches: &[&CustomerPatch]) -> StoreResult<()> {
    if patches.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE customers c SET
            email = COALESCE(u.email, c.email),
            name = COALESCE(u.name, c.name),
            created_at = COALESCE(u.created_at, c.created_at),
            timezone = COALESCE(u.timezone, c.timezone),
            model = COALESCE(u.model, c.model),
            owner = COALESCE(u.owner, c.owner),
            traits = engaged_json_patch(c.traits::jsonb, u.traits::jsonb)::text,
            updated_at = $1
         FROM unnest($2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::text[],
                     $8::text[], $9::text[])
              AS u(id, email, name, created_at, timezone, model, owner, traits)
         WHERE c.id = u.id",
    )
    .bind(now)
    .bind(strings(patches.iter().map(|p| p.id.as_str())))
    .bind(
        patches
            .iter()
            .map(|p| p.email.as_ref().map(|e| e.as_str().to_owned()))
            .collect::<Vec<_>>(),
    )
    .bind(patches.iter().map(|p| p.name.clone()).collect::<Vec<_>>())
    .bind(
        patches
            .iter()
            .map(|p| p.created_at.map(to_millis))
            .collect::<Vec<_>>(),
    )
    .bind(
        patches
            .iter()
            .map(|p| p.timezone.clone())
            .collect::<Vec<_>>(),
    )
    .bind(
        patches
            .iter()
            .map(|p| p.model.map(|m| m.as_str().to_owned()))
            .collect::<Vec<_>>(),
    )
    .bind(
        patches
            .iter()
            .map(|p| p.owner.as_ref().map(|e| e.as_str().to_owned()))
            .collect::<Vec<_>>(),
    )
    .bind(
        patches
            .iter()
            .map(|p| serde_json::to_string(&p.traits).unwrap_or_else(|_| "{}".into()))
            .collect::<Vec<_>>(),
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[async_trait]
impl Store for PostgresStore {
    async fn upsert_customers(&self, patches: &[CustomerPatch]) -> StoreResult<Vec<Upsert>> {
        // Two imports (or ingestion batches on two replicas) that touch the
        // same customers in different orders can deadlock; the loser runs again.
        retrying("Upserting customers", || {
            self.upsert_customers_once(patches)
        })
        .await
    }

    async fn insert_events(&self, events: &[Event]) -> StoreResult<EventInsert> {
        retrying("Inserting events", || self.insert_events_once(events)).await
    }

    async fn customer(&self, id: &CustomerId) -> StoreResult<Option<Customer>> {
        let row = sqlx::query("SELECT * FROM customers WHERE id = $1")
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
        let rows = sqlx::query("SELECT * FROM customers WHERE id > $1 ORDER BY id LIMIT $2")
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
             WHERE customer_id >= $1 AND customer_id <= $2 AND at <= $3
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
        // One JSON array per customer, as in SQLite: rows cross the wire
        // once per customer instead of once per event. `json` (not jsonb)
        // keeps each event's properties as they were written.
        let rows = sqlx::query(
            "SELECT customer_id,
                    json_agg(json_build_array(name, at, properties::json) ORDER BY at, seq)::text AS history
             FROM events WHERE customer_id >= $1 AND customer_id <= $2 AND at <= $3
             GROUP BY customer_id ORDER BY customer_id",
        )
        .bind(first.as_str())
        .bind(last.as_str())
        .bind(to_millis(until))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(history_from_row).collect()
    }

    async fn tags_in_id_range(
        &self,
        first: &CustomerId,
        last: &CustomerId,
    ) -> StoreResult<Vec<(CustomerId, String)>> {
        let rows = sqlx::query(
            "SELECT customer_id, tag FROM customer_tags
             WHERE customer_id >= $1 AND customer_id <= $2 ORDER BY customer_id, tag",
        )
        .bind(first.as_str())
        .bind(last.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(tag_from_row).collect()
    }

    async fn existing_dedup_keys(&self, keys: &[String]) -> StoreResult<HashSet<String>> {
        let mut found = HashSet::new();
        for chunk in keys.chunks(CHUNK) {
            let rows: Vec<String> =
                sqlx::query_scalar("SELECT dedup_key FROM actions WHERE dedup_key = ANY($1)")
                    .bind(chunk)
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
        retrying("Committing the plan", || self.commit_plan_once(&plan)).await
    }

    async fn begin_run(
        &self,
        trigger: &str,
        spec: &RunSpec,
        started_at: DateTime<Utc>,
        partition_size: usize,
        firing: Option<&Firing>,
    ) -> StoreResult<(i64, u32)> {
        let mut tx = self.pool.begin().await?;
        let spec_json = serde_json::to_string(spec).map_err(|e| corrupt("runs", e.to_string()))?;
        let run_id: i64 = sqlx::query_scalar(
            "INSERT INTO runs (trigger, now, started_at, status, summary, spec)
             VALUES ($1, $2, $3, 'planning', '{}', $4) RETURNING id",
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
        let size = partition_size.max(1) as i64;
        let starts: Vec<String> = match spec.changed_since {
            None => sqlx::query_scalar(
                "SELECT id FROM (SELECT id, ROW_NUMBER() OVER (ORDER BY id) AS n FROM customers) s
                     WHERE (n - 1) % $1 = 0 ORDER BY id",
            )
            .bind(size)
            .fetch_all(&mut *tx)
            .await?,
            Some(since) => {
                sqlx::query_scalar(
                    "SELECT customer_id FROM (
                        SELECT customer_id, ROW_NUMBER() OVER (ORDER BY customer_id) AS n
                        FROM customer_changes WHERE changed_at >= $1) s
                     WHERE (n - 1) % $2 = 0 ORDER BY customer_id",
                )
                .bind(to_millis(since))
                .bind(size)
                .fetch_all(&mut *tx)
                .await?
            }
        };
        let ranges = partition_ranges(starts);
        sqlx::query(
            "INSERT INTO run_partitions (run_id, idx, start_id, end_id)
             SELECT $1, u.idx, u.start_id, u.end_id
             FROM unnest($2::bigint[], $3::text[], $4::text[]) AS u(idx, start_id, end_id)",
        )
        .bind(run_id)
        .bind(ranges.iter().map(|r| i64::from(r.0)).collect::<Vec<_>>())
        .bind(ranges.iter().map(|r| r.1.clone()).collect::<Vec<_>>())
        .bind(ranges.iter().map(|r| r.2.clone()).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
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
        // Replicas claiming at once each skip the rows the others lock.
        let row = sqlx::query(
            "UPDATE run_partitions SET status = 'claimed', holder = $1, lease_until = $2, claims = claims + 1
             WHERE (run_id, idx) = (
                SELECT p.run_id, p.idx FROM run_partitions p JOIN runs r ON r.id = p.run_id
                WHERE r.status = 'planning' AND ($4::bigint IS NULL OR p.run_id = $4)
                  AND (p.status = 'pending' OR (p.status = 'claimed' AND p.lease_until < $3))
                ORDER BY p.run_id, p.idx LIMIT 1
                FOR UPDATE OF p SKIP LOCKED)
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
        let run = sqlx::query("SELECT trigger, started_at, spec FROM runs WHERE id = $1")
            .bind(run_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(Some(partition_from_rows(&row, &run, holder)?))
    }

    async fn renew_partitions(&self, holder: &str, until: DateTime<Utc>) -> StoreResult<u64> {
        Ok(sqlx::query(
            "UPDATE run_partitions SET lease_until = $1 WHERE holder = $2 AND status = 'claimed'",
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
             WHERE holder = $1 AND status = 'claimed'",
        )
        .bind(holder)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn run_partitions(&self, run_id: i64) -> StoreResult<Vec<PartitionRecord>> {
        let rows = sqlx::query("SELECT * FROM run_partitions WHERE run_id = $1 ORDER BY idx")
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
        let row = sqlx::query("SELECT status, summary FROM runs WHERE id = $1")
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
            "SELECT started_at FROM runs WHERE trigger = $1 AND spec IS NOT NULL AND status <> 'abandoned'
             ORDER BY id DESC LIMIT 1",
        )
        .bind(trigger)
        .fetch_optional(&self.pool)
        .await?;
        Ok(at.map(|ms| from_millis(ms) - chrono::Duration::seconds(60)))
    }

    async fn partition_customers(&self, p: &Partition) -> StoreResult<Vec<Customer>> {
        // The range's end is in the statement only when it has one: `(end
        // IS NULL OR id < end)` would keep the index from stopping at the
        // end, and every partition would scan to the last customer.
        let sql = match (p.spec.changed_since.is_some(), p.end.is_some()) {
            (false, true) => "SELECT * FROM customers WHERE id >= $1 AND id < $2 ORDER BY id",
            (false, false) => "SELECT * FROM customers WHERE id >= $1 ORDER BY id",
            (true, true) => {
                "SELECT c.* FROM customer_changes ch JOIN customers c ON c.id = ch.customer_id
                 WHERE ch.changed_at >= $3 AND ch.customer_id >= $1 AND ch.customer_id < $2
                 ORDER BY c.id"
            }
            (true, false) => {
                "SELECT c.* FROM customer_changes ch JOIN customers c ON c.id = ch.customer_id
                 WHERE ch.changed_at >= $3 AND ch.customer_id >= $1 AND $2 = ''
                 ORDER BY c.id"
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
        let rows = sqlx::query(
            "SELECT customer_id,
                    json_agg(json_build_array(name, at, properties::json) ORDER BY at, seq)::text AS history
             FROM events WHERE customer_id = ANY($1) AND at <= $2
             GROUP BY customer_id ORDER BY customer_id",
        )
        .bind(strings(ids.iter().map(CustomerId::as_str)))
        .bind(to_millis(until))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(history_from_row).collect()
    }

    async fn tags_of(&self, ids: &[CustomerId]) -> StoreResult<Vec<(CustomerId, String)>> {
        let rows = sqlx::query(
            "SELECT customer_id, tag FROM customer_tags
             WHERE customer_id = ANY($1) ORDER BY customer_id, tag",
        )
        .bind(strings(ids.iter().map(CustomerId::as_str)))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(tag_from_row).collect()
    }

    async fn open_escalations_of(&self, ids: &[CustomerId]) -> StoreResult<Vec<EscalationRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM escalations WHERE customer_id = ANY($1)
               AND status IN ('open', 'acknowledged') ORDER BY id",
        )
        .bind(strings(ids.iter().map(CustomerId::as_str)))
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
        let mut tx = self.pool.begin().await?;
        // The run's row first: two replicas finishing it at once take turns,
        // and the second finds it no longer planning.
        sqlx::query("SELECT 1 FROM runs WHERE id = $1 FOR UPDATE")
            .bind(run_id)
            .execute(&mut *tx)
            .await?;
        let open: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM run_partitions WHERE run_id = $1 AND status <> 'done'",
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
                "UPDATE actions SET status = 'held', last_error = $1
                 WHERE run_id = $2 AND rule = $3 AND status = 'staged'",
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
        sqlx::query(
            "UPDATE actions SET status = 'pending' WHERE run_id = $1 AND status = 'staged'",
        )
        .bind(run_id)
        .execute(&mut *tx)
        .await?;
        let n = sqlx::query(
            "UPDATE runs SET status = $1, summary = $2 WHERE id = $3 AND status = 'planning'",
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
            "SELECT * FROM escalations WHERE customer_id >= $1 AND customer_id <= $2
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
        // One statement on one row: a concurrent taker waits for the row
        // lock, then re-checks the condition against the new holder.
        let taken = sqlx::query(
            "UPDATE planner_lock SET holder = $1, until = $2
             WHERE id = 1 AND (holder IS NULL OR holder = $1 OR until < $3)",
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
        let n = sqlx::query("UPDATE planner_lock SET until = $1 WHERE id = 1 AND holder = $2")
            .bind(to_millis(until))
            .bind(holder)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    async fn unlock_planner(&self, holder: &str) -> StoreResult<()> {
        sqlx::query(
            "UPDATE planner_lock SET holder = NULL, until = 0 WHERE id = 1 AND holder = $1",
        )
        .bind(holder)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn finish_run(&self, run_id: i64, status: &str, summary: &Value) -> StoreResult<()> {
        // A held run stays held until someone approves or rejects it.
        sqlx::query(
            "UPDATE runs SET status = CASE WHEN status = 'held' THEN status ELSE $1 END,
             summary = $2, finished_at = $3 WHERE id = $4",
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
        let rows = sqlx::query("SELECT * FROM runs ORDER BY id DESC LIMIT $1")
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        let held_rows = sqlx::query(
            "SELECT run_id, rule, COUNT(*) AS n FROM actions WHERE status = 'held' GROUP BY run_id, rule",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut progress: HashMap<i64, (u64, u64)> = HashMap::new();
        for r in sqlx::query(
            "SELECT run_id, COUNT(*) FILTER (WHERE status = 'done') AS done, COUNT(*) AS n
             FROM run_partitions
             WHERE run_id IN (SELECT id FROM runs ORDER BY id DESC LIMIT $1) GROUP BY run_id",
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
        let mut held: HashMap<i64, BTreeMap<String, u64>> = HashMap::new();
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
            "SELECT rule, customer_id, message FROM run_errors WHERE run_id = $1 ORDER BY seq",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let c: String = r.try_get("customer_id")?;
                Ok(RuleErrorRecord {
                    rule: r.try_get("rule")?,
                    customer_id: id_of(&c, "run_errors")?,
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
        let mut tx = self.pool.begin().await?;
        // Lock the run's held rows first, so two deciders do not both
        // record a decision for the same emails.
        sqlx::query(
            "SELECT id FROM actions WHERE run_id = $1 AND status = 'held'
             AND ($2::text IS NULL OR rule = $2) ORDER BY id FOR UPDATE",
        )
        .bind(run_id)
        .bind(rule)
        .execute(&mut *tx)
        .await?;
        // The audit trail keeps the decision after the action moves on.
        sqlx::query(
            "INSERT INTO decisions (run_id, customer_id, rule, subject, decision, reason, at,
                                    first_at, dedup_key)
             SELECT run_id, customer_id, rule, 'email ' || (payload::jsonb ->> 'template'),
                    $1, $2, $3, $3, dedup_key
             FROM actions WHERE run_id = $4 AND status = 'held' AND ($5::text IS NULL OR rule = $5)
             ORDER BY id
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
                "UPDATE actions SET status = 'pending', next_attempt_at = GREATEST(next_attempt_at, $1),
                 cap_at = GREATEST(cap_at, $1), last_error = 'approved after the blast-radius guard held it'
                 WHERE run_id = $2 AND status = 'held' AND ($3::text IS NULL OR rule = $3)",
            )
        } else {
            sqlx::query(
                "UPDATE actions SET status = 'rejected', finished_at = $1,
                 last_error = 'rejected after the blast-radius guard held it'
                 WHERE run_id = $2 AND status = 'held' AND ($3::text IS NULL OR rule = $3)",
            )
        }
        .bind(at_ms)
        .bind(run_id)
        .bind(rule)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query(
            "UPDATE runs SET status = $1 WHERE id = $2 AND status = 'held'
             AND NOT EXISTS (SELECT 1 FROM actions WHERE run_id = $2 AND status = 'held')",
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
    ) -> StoreResult<HashMap<CustomerId, u32>> {
        let mut counts = HashMap::new();
        let ids: Vec<&str> = customers.iter().map(CustomerId::as_str).collect();
        for chunk in ids.chunks(CHUNK) {
            let rows = sqlx::query(
                // cap_at is on the evaluation clock (a replay with --now
                // sees the cap as it was), moved later by a send window or
                // an approval.
                "SELECT customer_id, COUNT(*) AS n FROM actions
                 WHERE kind = 'email' AND status IN ('staged', 'pending', 'sending', 'sent', 'held')
                   AND cap_at >= $1 AND customer_id = ANY($2)
                 GROUP BY customer_id",
            )
            .bind(to_millis(since))
            .bind(chunk)
            .fetch_all(&self.pool)
            .await?;
            for r in rows {
                let id: String = r.try_get("customer_id")?;
                counts.insert(id_of(&id, "actions")?, r.try_get::<i64, _>("n")? as u32);
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
        let token = crate::liveness::holder_token();
        // SKIP LOCKED: rows another replica is claiming right now are left
        // to it instead of waited for; a row it claimed and committed no
        // longer matches (PostgreSQL re-checks the condition on the newest
        // version of a row it locks).
        let rows = sqlx::query(
            "UPDATE actions SET status = 'sending', lease_until = $1, attempts = attempts + 1, claim_token = $4
             WHERE id IN (
                SELECT id FROM actions
                WHERE (status = 'pending' AND next_attempt_at <= $2)
                   OR (status = 'sending' AND lease_until < $2)
                ORDER BY next_attempt_at, id LIMIT $3
                FOR UPDATE SKIP LOCKED)
             RETURNING id, run_id, customer_id, rule, kind, dedup_key, payload, attempts",
        )
        .bind(to_millis(lease_until))
        .bind(to_millis(now))
        .bind(limit as i64)
        .bind(&token)
        .fetch_all(&self.pool)
        .await?;
        let mut items = rows
            .iter()
            .map(|r| {
                let kind: String = r.try_get("kind")?;
                let c: String = r.try_get("customer_id")?;
                let payload: String = r.try_get("payload")?;
                Ok(OutboxItem {
                    id: r.try_get("id")?,
                    run_id: r.try_get("run_id")?,
                    customer_id: id_of(&c, "actions")?,
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
        // A commit recording repeats on rows this batch holds can deadlock
        // with it; either side is run again.
        retrying("Recording delivery outcomes", || {
            self.record_attempts_once(claim_token, results, at)
        })
        .await
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
        let rows = sqlx::query("SELECT * FROM actions WHERE customer_id = $1 ORDER BY id")
            .bind(id.as_str())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(action_from_row).collect()
    }

    async fn actions_for_run(&self, run_id: i64) -> StoreResult<Vec<ActionRecord>> {
        let rows = sqlx::query("SELECT * FROM actions WHERE run_id = $1 ORDER BY id")
            .bind(run_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(action_from_row).collect()
    }

    async fn decisions_for_customer(&self, id: &CustomerId) -> StoreResult<Vec<DecisionRecord>> {
        let rows = sqlx::query("SELECT * FROM decisions WHERE customer_id = $1 ORDER BY id")
            .bind(id.as_str())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(decision_from_row).collect()
    }

    async fn escalations(&self, only_open: bool) -> StoreResult<Vec<EscalationRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM escalations WHERE (NOT $1 OR status IN ('open', 'acknowledged')) ORDER BY id",
        )
        .bind(only_open)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(escalation_from_row).collect()
    }

    async fn escalations_for_customer(
        &self,
        id: &CustomerId,
    ) -> StoreResult<Vec<EscalationRecord>> {
        let rows = sqlx::query("SELECT * FROM escalations WHERE customer_id = $1 ORDER BY id")
            .bind(id.as_str())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(escalation_from_row).collect()
    }

    async fn resolve_escalation(&self, id: i64, at: DateTime<Utc>) -> StoreResult<bool> {
        let n = sqlx::query(
            "UPDATE escalations SET status = 'resolved', resolved_at = $1
             WHERE id = $2 AND status IN ('open', 'acknowledged')",
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
             WHERE status = 'open' AND recovered_at IS NULL AND notified_at < $1 ORDER BY id",
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
        let mut tx = self.pool.begin().await?;
        // Still open and unacknowledged now? The row lock holds off an
        // acknowledgement or resolution until this reminder is decided.
        let open: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM escalations WHERE id = $1 AND status = 'open' FOR UPDATE",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        if open.is_none() {
            tx.commit().await?;
            return Ok(false);
        }
        // A copy of the first notice, marked as reminder n, to `to`; the
        // dedup key makes reminder n happen once across replicas.
        let inserted = sqlx::query(
            "INSERT INTO actions (run_id, customer_id, rule, kind, dedup_key, payload, status,
                                  next_attempt_at, created_at)
             SELECT $1, customer_id, rule, kind, $2,
                    jsonb_set(jsonb_set(payload::jsonb, '{reminder}', to_jsonb($3::bigint)),
                              '{owner}', to_jsonb($4::text))::text,
                    'pending', $5, $5
             FROM actions WHERE dedup_key = $6
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
                "UPDATE escalations SET notified_at = $1, notifications = notifications + 1 WHERE id = $2",
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
    ) -> StoreResult<HashMap<String, u32>> {
        let rows = sqlx::query(
            "SELECT e.owner, COUNT(*) AS n FROM escalations e JOIN runs r ON r.id = e.run_id
             WHERE r.now >= $1 AND e.owner = ANY($2) GROUP BY e.owner",
        )
        .bind(to_millis(since))
        .bind(owners)
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
            "UPDATE escalations SET recovered_at = CASE WHEN $1 THEN COALESCE(recovered_at, $2) ELSE NULL END
             WHERE id = ANY($3)",
        )
        .bind(recovered)
        .bind(to_millis(at))
        .bind(ids)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn acknowledge_escalation(&self, id: i64, at: DateTime<Utc>) -> StoreResult<bool> {
        let n = sqlx::query(
            "UPDATE escalations SET status = 'acknowledged', acknowledged_at = $1
             WHERE id = $2 AND status = 'open'",
        )
        .bind(to_millis(at))
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    // Addresses are lower-cased here, as `suppressions_among` does, rather
    // than with SQL lower(): PostgreSQL's lower() follows the database's
    // locale, and the key must not depend on it.
    async fn suppress(&self, email: &str, reason: &str, at: DateTime<Utc>) -> StoreResult<bool> {
        let n = sqlx::query(
            "INSERT INTO suppressions (email, reason, created_at) VALUES ($1, $2, $3)
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
            sqlx::query_scalar("SELECT reason FROM suppressions WHERE email = $1")
                .bind(email.to_lowercase())
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn unsuppress(&self, email: &str) -> StoreResult<bool> {
        let n = sqlx::query("DELETE FROM suppressions WHERE email = $1")
            .bind(email.to_lowercase())
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    async fn suppressions(&self) -> StoreResult<Vec<SuppressionRecord>> {
        let rows = sqlx::query(
            "SELECT email, reason, created_at FROM suppressions ORDER BY created_at, email COLLATE \"C\"",
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

    async fn suppressions_among(&self, emails: &[String]) -> StoreResult<HashMap<String, String>> {
        let mut found = HashMap::new();
        for chunk in emails.chunks(CHUNK) {
            let lowered: Vec<String> = chunk.iter().map(|e| e.to_lowercase()).collect();
            let rows = sqlx::query("SELECT email, reason FROM suppressions WHERE email = ANY($1)")
                .bind(&lowered)
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
            sqlx::query_scalar("SELECT MAX(fire_at) FROM schedule_firings WHERE schedule = $1")
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
             VALUES ($1, $2, $3, $4, $5, CASE WHEN $3 = 'pending' THEN NULL ELSE $5 END)
             ON CONFLICT DO NOTHING",
        )
        .bind(schedule)
        .bind(to_millis(fire_at))
        .bind(status)
        .bind(note)
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
        let mut tx = self.pool.begin().await?;
        // "Not running" spans rows (another firing of the same schedule), so
        // row locks cannot guard it: claims take turns on an advisory lock
        // held until commit. The query below starts after the lock is ours,
        // so it sees every claim committed before.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(FIRING_LOCK)
            .execute(&mut *tx)
            .await?;
        // The oldest waiting firing of a schedule that is not running right
        // now (a running firing whose lease expired counts as waiting).
        let row = sqlx::query(
            "SELECT schedule, fire_at FROM schedule_firings f
             WHERE (status = 'pending' OR (status = 'running' AND lease_until < $1))
               AND NOT EXISTS (
                   SELECT 1 FROM schedule_firings r
                   WHERE r.schedule = f.schedule AND r.status = 'running'
                     AND r.lease_until >= $1 AND r.fire_at <> f.fire_at)
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
            "UPDATE schedule_firings SET status = 'running', lease_until = $1, holder = $4
             WHERE schedule = $2 AND fire_at = $3",
        )
        .bind(to_millis(lease_until))
        .bind(&schedule)
        .bind(fire_at)
        .bind(holder)
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
            "UPDATE schedule_firings SET lease_until = $1
             WHERE schedule = $2 AND fire_at = $3 AND status = 'running' AND holder = $4",
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
            "UPDATE schedule_firings SET status = $1, run_id = COALESCE($2, run_id), note = $3,
                 finished_at = $4, lease_until = NULL, holder = NULL
             WHERE schedule = $5 AND fire_at = $6 AND status = 'running' AND holder = $7",
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
        let mut tx = self.pool.begin().await?;
        let prefix = format!("{process}/");
        let firings = sqlx::query(
            "UPDATE schedule_firings SET status = 'pending', lease_until = NULL, holder = NULL,
                 note = 'its process died; queued again'
             WHERE status = 'running' AND substr(holder, 1, length($1)) = $1",
        )
        .bind(&prefix)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let planner_lock = sqlx::query(
            "UPDATE planner_lock SET holder = NULL, until = 0
             WHERE id = 1 AND substr(holder, 1, length($1)) = $1",
        )
        .bind(&prefix)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        // The attempt stays counted: the dead process may have sent it.
        let actions = sqlx::query(
            "UPDATE actions SET status = 'pending', lease_until = NULL, claim_token = NULL,
                 next_attempt_at = LEAST(next_attempt_at, $2)
             WHERE status = 'sending' AND substr(claim_token, 1, length($1)) = $1",
        )
        .bind(&prefix)
        .bind(to_millis(now))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let partitions = sqlx::query(
            "UPDATE run_partitions SET status = 'pending', lease_until = NULL
             WHERE status = 'claimed' AND substr(holder, 1, length($1)) = $1",
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
             WHERE schedule = $1 ORDER BY fire_at",
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
        // A concurrent first caller's insert makes ours wait and then do
        // nothing; the SELECT (a new snapshot) then sees its value.
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(key)
            .bind(init)
            .execute(&mut *tx)
            .await?;
        let v: String = sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
            .bind(key)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::rounds;

    #[test]
    fn rounds_put_the_nth_occurrence_of_a_key_in_round_n() {
        let items = ["a", "b", "a", "c", "a", "b"];
        let r = rounds(&items, |s| *s);
        assert_eq!(
            r,
            vec![vec![&"a", &"b", &"c"], vec![&"a", &"b"], vec![&"a"]]
        );
    }
}
