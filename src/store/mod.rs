//! Storage behind one trait, with two implementations that pass one
//! conformance suite (`tests/it/store_conformance.rs`):
//!
//! - `sqlite.rs`: the embedded default (`sqlite://PATH`), one process or a
//!   few on one machine;
//! - `postgres.rs`: several replicas sharing one PostgreSQL
//!   (`postgres://` or `postgresql://`); claims skip rows other replicas
//!   hold, dedup is enforced by unique indexes;
//! - `rows.rs`: rows → records, written once for both.
//!
//! [`open`] picks one by the URL's scheme and applies its migrations
//! (`migrations/sqlite/`, `migrations/postgres/`). Times cross this boundary
//! as `DateTime<Utc>` and are stored as Unix milliseconds, which both
//! databases index and compare cheaply.

mod postgres;
mod rows;
mod sqlite;

use std::collections::{BTreeMap, HashSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::domain::{Customer, CustomerId, CustomerPatch, Event};
use crate::plan::OutboxKind;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// Errors from storage.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt row in {table}: {message}")]
    Corrupt {
        table: &'static str,
        message: String,
    },
    /// A lease this process relied on was taken over (its holder was too
    /// slow to renew it); what needed it was not done.
    #[error("the lease on {0} was lost to another process")]
    LeaseLost(String),
    #[error("unsupported database url {0:?}; use sqlite://PATH or postgres://USER@HOST/DATABASE")]
    UnsupportedUrl(String),
    /// The URL names PostgreSQL but does not parse (`url` is redacted).
    #[error("invalid database url {url}: {message}")]
    BadUrl { url: String, message: String },
    /// The database server did not answer or refused us (`url` is redacted).
    #[error("cannot connect to the database at {url}: {message}")]
    Connect { url: String, message: String },
}

pub type StoreResult<T> = Result<T, StoreError>;

/// One event in a customer's history (what evaluation needs of an event).
pub type HistoryEvent = (String, DateTime<Utc>, Value);

/// Outcome of upserting one customer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upsert {
    Inserted,
    Updated,
}

/// Counts from inserting a batch of events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventInsert {
    pub inserted: usize,
    pub duplicates: usize,
}

/// One row for the outbox, produced by planning.
#[derive(Clone, Debug, PartialEq)]
pub struct NewAction {
    pub customer_id: CustomerId,
    pub rule: String,
    pub kind: OutboxKind,
    pub dedup_key: String,
    /// The customer's address when the action was planned (suppression checks).
    pub customer_email: Option<String>,
    /// The customer's time zone when planned (send windows).
    pub customer_timezone: Option<String>,
    /// Not to be delivered before this (the send window opens).
    pub not_before: Option<DateTime<Utc>>,
    /// Recorded but never delivered, with this reason (frequency cap: drop).
    pub dropped: Option<String>,
    /// What the action is about, for reports: `template/key` of an email,
    /// the tag's name (which committing applies), the webhook's name.
    pub subject: String,
    /// The payload as JSON text (kept serialized: a big run holds many).
    pub payload: String,
}

/// A request to open an escalation (and notify its owner).
#[derive(Clone, Debug, PartialEq)]
pub struct NewEscalation {
    pub customer_id: CustomerId,
    pub rule: String,
    pub reason: String,
    pub owner: String,
    /// The notice payload; the store fills in the escalation id.
    pub notice: Value,
}

/// A decision that leaves no outbox row (suppressed at planning, deferred
/// by the frequency cap), kept for the audit trail.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Decision {
    pub customer_id: CustomerId,
    pub rule: String,
    /// What was decided about: `email welcome (key welcome)`.
    pub subject: String,
    /// `suppressed`, `deferred` or `outside window`.
    pub decision: String,
    pub reason: String,
    /// The action's dedup key: a decision repeated by later runs updates
    /// its row (count, last run) instead of adding one per run.
    pub dedup_key: String,
}

/// A decision as recorded.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DecisionRecord {
    /// The last run that made this decision.
    pub run_id: i64,
    pub rule: String,
    pub subject: String,
    pub decision: String,
    pub reason: String,
    /// When it was last made (the run's evaluation time).
    pub at: DateTime<Utc>,
    /// When it was first made.
    pub first_at: DateTime<Utc>,
    /// How many runs made it.
    pub times: u32,
}

/// A rule error recorded in a run's report.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct RuleErrorRecord {
    pub rule: String,
    pub customer_id: CustomerId,
    pub message: String,
}

/// What planning hands to the store in one transaction.
#[derive(Clone, Debug, Default)]
pub struct PlanCommit {
    pub trigger: String,
    pub now: DateTime<Utc>,
    pub started_at: DateTime<Utc>,
    pub actions: Vec<NewAction>,
    pub escalations: Vec<NewEscalation>,
    pub errors: Vec<RuleErrorRecord>,
    /// The run's summary so far (evaluation counts); stored as JSON.
    pub summary: Value,
    /// Rules whose new emails the blast-radius guard holds, with the reason.
    pub hold: BTreeMap<String, String>,
    /// Decisions to record in the audit trail.
    pub decisions: Vec<Decision>,
    /// The schedule firing this run is for: marked done with the run, in
    /// the same transaction, so a crash after the commit never runs it again.
    pub firing: Option<Firing>,
    /// A partition of a run begun with `begin_run`, claimed by its holder:
    /// its actions join that run, its new emails are `staged` (never
    /// delivered) until `finish_plan` releases or holds them, and the
    /// partition is marked done with its summary in the same transaction
    /// (so a crash leaves it all or nothing). `firing` and `hold` are then
    /// `finish_plan`'s business and ignored here.
    pub partition: Option<PartitionDone>,
}

/// A claimed partition being committed: the claim it must still hold, and
/// what its evaluation counted (`PartitionSummary` as JSON).
#[derive(Clone, Debug, Default)]
pub struct PartitionDone {
    pub run_id: i64,
    pub index: u32,
    pub holder: String,
    pub summary: Value,
}

/// What every participant of a partitioned run evaluates with, stored with
/// the run so that any replica (or a later `engaged run`) can finish it
/// exactly as it was begun.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct RunSpec {
    /// The evaluation time.
    pub now: DateTime<Utc>,
    /// Only these rules (a schedule's subset); `None` = all.
    pub only_rules: Option<Vec<String>>,
    /// Only customers whose data changed at or after this (a schedule with
    /// `customers = "changed"`); `None` = the whole base.
    pub changed_since: Option<DateTime<Utc>>,
    /// Customers in the base when the run began: the blast-radius guard's
    /// denominator, whether the run covers all of them or what changed.
    pub base_customers: u64,
}

/// One claimed partition of a run: the customers with ids in `[start, end)`
/// (no `end`: to the last), restricted to what changed when the run's spec
/// says so.
#[derive(Clone, Debug, PartialEq)]
pub struct Partition {
    pub run_id: i64,
    pub index: u32,
    pub start: String,
    pub end: Option<String>,
    pub holder: String,
    pub trigger: String,
    pub started_at: DateTime<Utc>,
    pub spec: RunSpec,
}

/// A run still planning, as its finisher needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct UnfinishedRun {
    pub id: i64,
    pub trigger: String,
    pub started_at: DateTime<Utc>,
    pub spec: RunSpec,
}

/// A partition of a run as recorded.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PartitionRecord {
    pub index: u32,
    /// `pending`, `claimed` or `done`.
    pub status: String,
    pub holder: Option<String>,
    /// How many times it was claimed (more than once: taken over).
    pub claims: u32,
    /// Its `PartitionSummary` (done partitions).
    pub summary: Option<Value>,
    /// What its commit counted per rule (done partitions).
    pub counts: Option<BTreeMap<String, RuleCommitCounts>>,
    /// How long its commit took, in seconds (done partitions).
    pub commit_seconds: f64,
}

/// Per-rule counts of what committing a plan did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RuleCommitCounts {
    pub planned: usize,
    pub deduplicated: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CommitOutcome {
    pub run_id: i64,
    pub per_rule: BTreeMap<String, RuleCommitCounts>,
    /// Rules whose emails the guard held, with how many.
    pub held: BTreeMap<String, usize>,
}

/// An outbox row claimed for delivery.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxItem {
    pub id: i64,
    pub run_id: i64,
    pub customer_id: CustomerId,
    pub rule: String,
    pub kind: OutboxKind,
    pub dedup_key: String,
    pub payload: Value,
    /// Including the attempt this claim is for.
    pub attempts: u32,
    /// Until when this claim is ours; nothing may start after it is too close.
    pub lease_until: DateTime<Utc>,
    /// Identifies this claim; recording an outcome needs it.
    pub claim_token: String,
}

/// Delivery state of an outbox row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionStatus {
    Pending,
    Sending,
    Sent,
    Failed,
    Dead,
    Done,
}

impl ActionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Sending => "sending",
            Self::Sent => "sent",
            Self::Failed => "failed",
            Self::Dead => "dead",
            Self::Done => "done",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "sending" => Self::Sending,
            "sent" => Self::Sent,
            "failed" => Self::Failed,
            "dead" => Self::Dead,
            "done" => Self::Done,
            _ => return None,
        })
    }
}

/// How one delivery attempt ended, as the store records it.
#[derive(Clone, Debug, PartialEq)]
pub enum AttemptResult {
    /// Accepted by the server; `detail` is its reply (or the file written).
    Sent { detail: String },
    /// Transient failure: try again at `retry_at`.
    Retry {
        error: String,
        retry_at: DateTime<Utc>,
    },
    /// Permanent failure (5xx, render error, bad address).
    Failed { error: String },
    /// Transient failures until attempts ran out.
    Dead { error: String },
    /// Not attempted (shutting down): back to pending, the attempt uncounted.
    Released,
    /// Not attempted yet (outside the send window): pending until `until`,
    /// the attempt uncounted.
    Wait {
        until: DateTime<Utc>,
        reason: String,
    },
    /// Not sent: the address is suppressed (unsubscribed, bounced…).
    Suppressed { reason: String },
}

/// A suppressed address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SuppressionRecord {
    pub email: String,
    pub reason: String,
    pub created_at: DateTime<Utc>,
}

/// A schedule firing claimed to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Firing {
    pub schedule: String,
    pub fire_at: DateTime<Utc>,
    /// The claim's holder token (see `liveness`): only its holder renews
    /// or finishes the firing.
    pub holder: String,
}

/// What releasing a dead holder's leases freed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReleasedLeases {
    /// Running firings queued again (or marked done when their plan was committed).
    pub firings: u64,
    pub planner_lock: bool,
    /// Claimed outbox rows made pending again.
    pub actions: u64,
    /// Claimed partitions of runs made pending again.
    pub partitions: u64,
}

/// A schedule firing as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FiringRecord {
    pub schedule: String,
    pub fire_at: DateTime<Utc>,
    pub status: String,
    pub run_id: Option<i64>,
    pub note: Option<String>,
}

/// An outbox row for reports (`explain`, tests).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ActionRecord {
    pub id: i64,
    pub run_id: i64,
    pub customer_id: String,
    pub rule: String,
    pub kind: String,
    pub dedup_key: String,
    pub status: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// When a pending action is next due (send window, retry backoff).
    pub next_attempt_at: DateTime<Utc>,
    pub payload: Value,
    /// How many later runs wanted this action again (deduplicated), and the
    /// last of them (not recorded for tags, which re-fire every night).
    pub repeats: u32,
    pub repeated_run: Option<i64>,
    pub repeated_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EscalationRecord {
    pub id: i64,
    pub customer_id: String,
    pub rule: String,
    pub reason: String,
    pub owner: String,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub acknowledged_at: Option<DateTime<Utc>>,
    /// When the owner (or lead) was last told, and how many times in all.
    pub notified_at: Option<DateTime<Utc>>,
    pub notifications: u32,
    /// Set while open when the rule no longer fires for the customer.
    pub recovered_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunRecord {
    pub id: i64,
    pub trigger: String,
    pub now: DateTime<Utc>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub status: String,
    pub summary: Value,
    /// Emails of this run waiting for approval, per rule.
    pub held: BTreeMap<String, u64>,
    /// Partitions done and in all (a run still planning shows how far it got).
    pub partitions_done: u64,
    pub partitions: u64,
}

/// Outbox counts by status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OutboxCounts {
    pub pending: u64,
    pub sending: u64,
    pub sent: u64,
    pub failed: u64,
    pub dead: u64,
}

/// Everything engaged keeps. Implementations must be safe to share between
/// tasks and between processes on the same database.
#[async_trait]
pub trait Store: Send + Sync {
    // --- ingest ---
    /// Inserts or updates each customer; returns one outcome per patch, in order.
    /// A new customer without an email address is stored without one.
    async fn upsert_customers(&self, patches: &[CustomerPatch]) -> StoreResult<Vec<Upsert>>;
    /// Inserts events; a repeated `message_id` is a duplicate and is ignored.
    async fn insert_events(&self, events: &[Event]) -> StoreResult<EventInsert>;

    // --- read ---
    async fn customer(&self, id: &CustomerId) -> StoreResult<Option<Customer>>;
    async fn customer_count(&self) -> StoreResult<u64>;
    /// Customers ordered by id, strictly after `after`, at most `limit`.
    async fn customers_page(
        &self,
        after: Option<&CustomerId>,
        limit: usize,
    ) -> StoreResult<Vec<Customer>>;
    /// Events of customers with ids in `first..=last`, at or before `until`,
    /// ordered by customer then time.
    async fn events_in_id_range(
        &self,
        first: &CustomerId,
        last: &CustomerId,
        until: DateTime<Utc>,
    ) -> StoreResult<Vec<Event>>;
    /// The same events grouped per customer, as (name, time, properties),
    /// for evaluation (SQLite reads a page's in one JSON row, PostgreSQL one
    /// row per customer).
    async fn histories_in_id_range(
        &self,
        first: &CustomerId,
        last: &CustomerId,
        until: DateTime<Utc>,
    ) -> StoreResult<Vec<(CustomerId, Vec<HistoryEvent>)>>;
    async fn tags_in_id_range(
        &self,
        first: &CustomerId,
        last: &CustomerId,
    ) -> StoreResult<Vec<(CustomerId, String)>>;
    /// Which of these dedup keys already exist in the outbox.
    async fn existing_dedup_keys(&self, keys: &[String]) -> StoreResult<HashSet<String>>;
    /// The reasons of resolved escalations of these (customer, rule) pairs:
    /// an escalation with one of them is not opened again.
    async fn resolved_escalation_reasons(
        &self,
        pairs: &[(CustomerId, String)],
    ) -> StoreResult<HashSet<(CustomerId, String, String)>>;
    /// Which of these (customer, rule) pairs have an open escalation.
    async fn open_escalation_pairs(
        &self,
        pairs: &[(CustomerId, String)],
    ) -> StoreResult<HashSet<(CustomerId, String)>>;

    // --- plan ---
    /// Records the run and its planned actions in one transaction, before any
    /// delivery. Actions whose dedup key exists are skipped (deduplicated);
    /// escalations are opened unless one is open for that customer and rule,
    /// and each opened escalation enqueues a notice to its owner. Tags are
    /// applied at once.
    async fn commit_plan(&self, plan: PlanCommit) -> StoreResult<CommitOutcome>;
    /// Records a run that will be committed in partitions (`planning`), in
    /// one transaction: the run with its spec, its partitions (ranges of
    /// about `partition_size` customers of the base, or of those changed
    /// since `spec.changed_since`), and its firing marked done with it (the
    /// run now carries the firing's work: whoever finishes the run finishes
    /// it). Fails with `LeaseLost` if the firing is no longer this holder's.
    /// Returns the run's id and how many partitions it has.
    async fn begin_run(
        &self,
        trigger: &str,
        spec: &RunSpec,
        started_at: DateTime<Utc>,
        partition_size: usize,
        firing: Option<&Firing>,
    ) -> StoreResult<(i64, u32)>;
    /// Claims the first partition (of run `run`, or of any run still
    /// planning) that is pending, or claimed by a holder whose lease ended
    /// before `now`, for `holder` until `until`. Replicas skip partitions
    /// others are claiming (`FOR UPDATE SKIP LOCKED`).
    async fn claim_partition(
        &self,
        run: Option<i64>,
        holder: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> StoreResult<Option<Partition>>;
    /// Extends the leases of the partitions `holder` has claimed and not
    /// finished; returns how many.
    async fn renew_partitions(&self, holder: &str, until: DateTime<Utc>) -> StoreResult<u64>;
    /// Gives back the partitions `holder` claimed and did not finish (a
    /// shutdown): pending again, for anyone to claim at once.
    async fn release_partitions(&self, holder: &str) -> StoreResult<u64>;
    /// The partitions of a run, in order.
    async fn run_partitions(&self, run_id: i64) -> StoreResult<Vec<PartitionRecord>>;
    /// Runs still planning whose partitions are all done (their finisher
    /// died before finishing them), oldest first.
    async fn runs_ready_to_finish(&self) -> StoreResult<Vec<UnfinishedRun>>;
    /// The status of a run, if it exists.
    async fn run_status(&self, run_id: i64) -> StoreResult<Option<(String, Value)>>;
    /// Every change to customers' data (`customer_changes`) stamped before
    /// this time was visible to the last run of `trigger` when it began (it
    /// covers those customers, finished or not); `None` before its first
    /// run. On SQLite that is the run's start (a change is stamped under the
    /// write lock, so one committed later is stamped later); on PostgreSQL
    /// a minute earlier, for transactions in flight and replicas' clocks.
    async fn changes_seen_by_last_run(&self, trigger: &str) -> StoreResult<Option<DateTime<Utc>>>;
    /// The customers of a partition, by id (its changed ones when the spec
    /// says so).
    async fn partition_customers(&self, partition: &Partition) -> StoreResult<Vec<Customer>>;
    /// Histories (as `histories_in_id_range`) of these customers.
    async fn histories_of(
        &self,
        ids: &[CustomerId],
        until: DateTime<Utc>,
    ) -> StoreResult<Vec<(CustomerId, Vec<HistoryEvent>)>>;
    /// Tags of these customers.
    async fn tags_of(&self, ids: &[CustomerId]) -> StoreResult<Vec<(CustomerId, String)>>;
    /// Open (or acknowledged) escalations of these customers.
    async fn open_escalations_of(&self, ids: &[CustomerId]) -> StoreResult<Vec<EscalationRecord>>;
    /// Ends the planning of a partitioned run whose partitions are all done,
    /// in one transaction: the staged emails of the rules in `hold` are held
    /// (with the reason), the others become pending; the run is `planned`
    /// (or `held`) with `summary`. Returns how many emails each held rule
    /// has waiting. `LeaseLost` when the run is no longer planning (someone
    /// else finished it) or still has partitions to plan.
    async fn finish_plan(
        &self,
        run_id: i64,
        hold: &BTreeMap<String, String>,
        summary: &Value,
    ) -> StoreResult<BTreeMap<String, usize>>;
    /// Open (or acknowledged) escalations of customers with ids in `first..=last`.
    async fn open_escalations_in_id_range(
        &self,
        first: &CustomerId,
        last: &CustomerId,
    ) -> StoreResult<Vec<EscalationRecord>>;
    /// Takes the planner lock for `holder` until `until` if it is free or
    /// its lease ended before `now`; false if another holder has it.
    async fn try_lock_planner(
        &self,
        holder: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> StoreResult<bool>;
    /// Extends `holder`'s lease to `until` if it still holds the lock (never
    /// takes a released or expired-and-taken lock back); false otherwise.
    async fn renew_planner(&self, holder: &str, until: DateTime<Utc>) -> StoreResult<bool>;
    /// Releases the planner lock if `holder` still has it.
    async fn unlock_planner(&self, holder: &str) -> StoreResult<()>;
    async fn finish_run(&self, run_id: i64, status: &str, summary: &Value) -> StoreResult<()>;
    async fn runs(&self, limit: usize) -> StoreResult<Vec<RunRecord>>;
    async fn run_errors(&self, run_id: i64) -> StoreResult<Vec<RuleErrorRecord>>;
    /// Releases (approve) or drops (reject) a run's held emails, all or one
    /// rule's; returns how many changed.
    async fn decide_held(
        &self,
        run_id: i64,
        rule: Option<&str>,
        approve: bool,
        at: DateTime<Utc>,
    ) -> StoreResult<u64>;
    /// Marketing emails that count against each customer's frequency cap
    /// at or after `since`: sent or still to be sent, counted at their
    /// planning time or later when a send window or a hold delayed them.
    async fn recent_email_counts(
        &self,
        customers: &[CustomerId],
        since: DateTime<Utc>,
    ) -> StoreResult<std::collections::HashMap<CustomerId, u32>>;

    // --- deliver ---
    /// Claims up to `limit` actions that are due at `now` (pending, or
    /// claimed by someone whose lease expired) until `lease_until`.
    async fn claim_due(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> StoreResult<Vec<OutboxItem>>;
    /// Records how attempts ended, in one transaction. Only rows still
    /// claimed with the given token change (a worker whose lease expired and
    /// was taken over cannot overwrite the new claimant's outcome).
    async fn record_attempts(
        &self,
        claim_token: &str,
        results: &[(i64, AttemptResult)],
        at: DateTime<Utc>,
    ) -> StoreResult<()>;
    /// When the next pending action becomes due, if any.
    async fn next_due_at(&self) -> StoreResult<Option<DateTime<Utc>>>;
    async fn outbox_counts(&self) -> StoreResult<OutboxCounts>;
    async fn actions_for_customer(&self, id: &CustomerId) -> StoreResult<Vec<ActionRecord>>;
    async fn actions_for_run(&self, run_id: i64) -> StoreResult<Vec<ActionRecord>>;
    async fn decisions_for_customer(&self, id: &CustomerId) -> StoreResult<Vec<DecisionRecord>>;

    // --- escalations ---
    async fn escalations(&self, only_open: bool) -> StoreResult<Vec<EscalationRecord>>;
    async fn escalations_for_customer(&self, id: &CustomerId)
    -> StoreResult<Vec<EscalationRecord>>;
    /// Returns false when there is no open escalation with that id.
    async fn resolve_escalation(&self, id: i64, at: DateTime<Utc>) -> StoreResult<bool>;

    /// Open, unacknowledged escalations last notified before `before`.
    async fn escalations_to_renotify(
        &self,
        before: DateTime<Utc>,
    ) -> StoreResult<Vec<EscalationRecord>>;
    /// Enqueues reminder `n` of an escalation's notice (to `to`), once.
    async fn renotify(
        &self,
        id: i64,
        n: u32,
        to: &str,
        run_id: i64,
        at: DateTime<Utc>,
    ) -> StoreResult<bool>;
    /// Escalations opened for each of `owners` by runs evaluated since
    /// `since` (those already committed, the current run's included).
    async fn owner_escalation_counts(
        &self,
        owners: &[String],
        since: DateTime<Utc>,
    ) -> StoreResult<std::collections::HashMap<String, u32>>;
    /// Marks escalations recovered (`recovered = true`) or not any more.
    async fn set_recovered(
        &self,
        ids: &[i64],
        recovered: bool,
        at: DateTime<Utc>,
    ) -> StoreResult<()>;
    /// Returns false when there is no open escalation with that id.
    async fn acknowledge_escalation(&self, id: i64, at: DateTime<Utc>) -> StoreResult<bool>;

    // --- suppressions ---
    /// Suppresses an address (case-insensitively); false if it already was.
    async fn suppress(&self, email: &str, reason: &str, at: DateTime<Utc>) -> StoreResult<bool>;
    /// The reason an address is suppressed, if it is.
    async fn suppression(&self, email: &str) -> StoreResult<Option<String>>;
    /// Lifts a suppression; false if the address was not suppressed.
    async fn unsuppress(&self, email: &str) -> StoreResult<bool>;
    /// Every suppression, oldest first.
    async fn suppressions(&self) -> StoreResult<Vec<SuppressionRecord>>;
    /// Which of these addresses are suppressed (lower-cased address → reason).
    async fn suppressions_among(
        &self,
        emails: &[String],
    ) -> StoreResult<std::collections::HashMap<String, String>>;

    // --- schedules ---
    /// The latest recorded firing time of a schedule (any status).
    async fn last_firing(&self, schedule: &str) -> StoreResult<Option<DateTime<Utc>>>;
    /// Records a firing once; false if that (schedule, time) is already recorded.
    async fn record_firing(
        &self,
        schedule: &str,
        fire_at: DateTime<Utc>,
        status: &str,
        note: Option<&str>,
        now: DateTime<Utc>,
    ) -> StoreResult<bool>;
    /// Claims the oldest pending firing of a schedule that is not running,
    /// for `holder` until `lease_until` (a running firing whose lease ended
    /// counts as pending).
    async fn claim_firing(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        holder: &str,
    ) -> StoreResult<Option<Firing>>;
    /// Extends a running firing's lease if its holder still has it.
    async fn renew_firing(&self, firing: &Firing, until: DateTime<Utc>) -> StoreResult<bool>;
    /// Records how a running firing ended; only its holder can, and only
    /// while it is running (a firing a commit marked done stays done).
    /// False when the firing was not this holder's any more.
    async fn finish_firing(
        &self,
        firing: &Firing,
        status: &str,
        run_id: Option<i64>,
        note: Option<&str>,
        at: DateTime<Utc>,
    ) -> StoreResult<bool>;
    async fn firings(&self, schedule: &str) -> StoreResult<Vec<FiringRecord>>;

    // --- leases ---
    /// Every holder token of a lease now held: running firings, the planner
    /// lock, claimed outbox rows, claimed partitions of runs.
    async fn lease_holders(&self) -> StoreResult<Vec<String>>;
    /// Releases every lease of the process `process` (the part of holder
    /// tokens before `/`), which died: its running firings are pending again,
    /// the planner lock is free, its claimed outbox rows are pending again.
    async fn release_holder(
        &self,
        process: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<ReleasedLeases>;

    /// Whether the database answers.
    async fn ping(&self) -> StoreResult<()>;

    // --- settings ---
    /// Returns the stored value for `key`, storing `init` first if there is none.
    async fn setting_or_init(&self, key: &str, init: &str) -> StoreResult<String>;
}

/// Opens the store named by a database URL and applies migrations.
pub async fn open(url: &str) -> StoreResult<std::sync::Arc<dyn Store>> {
    if url.starts_with("sqlite:") {
        Ok(std::sync::Arc::new(SqliteStore::open(url).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(std::sync::Arc::new(PostgresStore::open(url).await?))
    } else {
        Err(StoreError::UnsupportedUrl(crate::config::redact_url(url)))
    }
}

pub(crate) fn to_millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub(crate) fn from_millis(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}
