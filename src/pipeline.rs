//! One evaluation run: page through customers, evaluate every rule for each
//! (in parallel on all cores), turn what the rules asked for into outbox rows,
//! commit them with the run's record in one transaction, then deliver.
//!
//! Because the plan is committed before delivery starts, a crash after
//! planning loses nothing: the next run (or the daemon) delivers what is
//! pending, and dedup keys make re-planning harmless.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::deliver::{Deliverer, DeliveryReport};
use crate::domain::{CustomerId, Email};
use crate::engine::RuleSet;
use crate::facts::Facts;
use crate::plan::{
    ActionRequest, EmailPayload, EscalationPayload, OutboxKind, PlannedAction, WebhookPayload,
    dedup_key,
};
use crate::store::{
    Decision, HistoryEvent, NewAction, NewEscalation, Partition, PartitionDone, PlanCommit,
    RuleErrorRecord, RunSpec, Store, StoreError, UnfinishedRun,
};
use tokio_util::sync::CancellationToken;

/// Customers evaluated per page of a dry run.
const PAGE: usize = 2_000;
/// Customers per partition of a run: the unit that processes claim,
/// evaluate and commit in one transaction.
pub const PARTITION: usize = 2_000;
/// How long a claimed partition stays its holder's without a renewal; the
/// holder renews every `RENEW_EVERY`, so a holder that died elsewhere is
/// replaced within seconds (on this machine at once, see `liveness`).
const PARTITION_LEASE: chrono::Duration = chrono::Duration::seconds(15);
const RENEW_EVERY: Duration = Duration::from_secs(3);
/// How often a run's starter looks whether the others finished its run.
const WAIT_FOR_OTHERS: Duration = Duration::from_millis(100);
/// Rule errors kept in a summary (all are stored with the run).
const MAX_ERRORS_IN_SUMMARY: usize = 50;

/// Per-rule counts in a run summary.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RuleSummary {
    pub planned: usize,
    pub deduplicated: usize,
    /// Emails not planned because the address is suppressed.
    pub suppressed: usize,
    /// Emails over the frequency cap: not planned now (defer) or dropped.
    pub capped: usize,
    /// Emails that wait for the customer's send window to open.
    pub waiting_for_window: usize,
    /// Emails held by the blast-radius guard for approval.
    pub held: usize,
    pub errors: usize,
    pub emails: usize,
    pub escalations: usize,
    pub tags: usize,
    pub webhooks: usize,
}

/// What a run did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RunSummary {
    pub run_id: Option<i64>,
    pub dry_run: bool,
    pub now: DateTime<Utc>,
    pub customers: u64,
    pub evaluations: u64,
    pub evaluation_seconds: f64,
    /// Of that, the time rules ran (all cores), without loading data.
    pub rule_seconds: f64,
    pub rules: BTreeMap<String, RuleSummary>,
    pub errors: Vec<RuleErrorRecord>,
    pub delivery: DeliveryReport,
    /// For `--dry-run`: what would happen (the first `would_limit` actions).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub would: Vec<WouldDo>,
    /// For `--dry-run`: how many actions it would take in all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub would_total: Option<u64>,
    /// Where the run's time went, in seconds (each phase's time, added up
    /// over the partitions: with several replicas, more than the wall time).
    pub phases: Phases,
    /// How many partitions the run had (real runs).
    pub partitions: u64,
    /// For a run over what changed: since when.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changed_since: Option<DateTime<Utc>>,
    /// Per process that planned partitions of the run (its identity, see
    /// `liveness`): how many partitions and customers.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub replicas: BTreeMap<String, ReplicaCounts>,
}

/// One process's share of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReplicaCounts {
    pub partitions: u64,
    pub customers: u64,
}

/// What one partition's evaluation and policies counted: stored with the
/// partition when it is committed, added up when the run is finished.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PartitionSummary {
    pub customers: u64,
    pub evaluations: u64,
    pub rule_seconds: f64,
    pub phases: Phases,
    pub rules: BTreeMap<String, RuleSummary>,
    /// Its first rule errors (all are stored with the run).
    pub errors: Vec<RuleErrorRecord>,
    /// The blast-radius guard's count: customers each rule asked to email anew.
    pub reach: BTreeMap<String, usize>,
    /// Who planned it.
    pub holder: String,
}

impl RunSummary {
    /// Adds one partition's counts.
    fn absorb(&mut self, part: PartitionSummary) {
        self.customers += part.customers;
        self.evaluations += part.evaluations;
        self.rule_seconds += part.rule_seconds;
        self.phases.load += part.phases.load;
        self.phases.evaluate += part.phases.evaluate;
        self.phases.dedup += part.phases.dedup;
        self.phases.policies += part.phases.policies;
        self.phases.commit += part.phases.commit;
        for (rule, r) in part.rules {
            let s = self.rules.entry(rule).or_default();
            s.planned += r.planned;
            s.deduplicated += r.deduplicated;
            s.suppressed += r.suppressed;
            s.capped += r.capped;
            s.waiting_for_window += r.waiting_for_window;
            s.held += r.held;
            s.errors += r.errors;
            s.emails += r.emails;
            s.escalations += r.escalations;
            s.tags += r.tags;
            s.webhooks += r.webhooks;
        }
        let room = MAX_ERRORS_IN_SUMMARY.saturating_sub(self.errors.len());
        self.errors.extend(part.errors.into_iter().take(room));
    }
}

/// Wall time of a run's phases, in seconds. Loading overlaps evaluation
/// (the next page loads while this one evaluates), so `load` counts only
/// the time spent waiting for data.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Phases {
    pub load: f64,
    pub evaluate: f64,
    pub dedup: f64,
    pub policies: f64,
    pub commit: f64,
    pub deliver: f64,
}

/// One line of a dry run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WouldDo {
    pub customer_id: String,
    pub rule: String,
    /// `email`, `escalation`, `tag` or `webhook`.
    pub kind: String,
    pub action: String,
    pub deduplicated: bool,
}

/// Something ready for the store: an outbox row or an escalation.
#[derive(Clone, Debug)]
pub enum Outgoing {
    Action(NewAction),
    Escalation(NewEscalation),
}

impl Outgoing {
    pub fn rule(&self) -> &str {
        match self {
            Self::Action(a) => &a.rule,
            Self::Escalation(e) => &e.rule,
        }
    }
}

/// Everything evaluation produced.
#[derive(Debug, Default)]
pub struct Evaluation {
    pub customers: u64,
    pub evaluations: u64,
    pub outgoing: Vec<Outgoing>,
    pub errors: Vec<RuleErrorRecord>,
    /// Wall time of the whole evaluation phase (loading included).
    pub seconds: f64,
    /// Wall time spent running rules (on all cores), loading excluded.
    pub rule_seconds: f64,
    /// Wall time spent waiting for data after the rules were done.
    pub load_seconds: f64,
}

impl Evaluation {
    /// Adds another page's evaluation to this one.
    pub fn merge(&mut self, other: Evaluation) {
        self.customers += other.customers;
        self.evaluations += other.evaluations;
        self.rule_seconds += other.rule_seconds;
        self.load_seconds += other.load_seconds;
        self.seconds += other.seconds;
        self.outgoing.extend(other.outgoing);
        self.errors.extend(other.errors);
    }
}

/// Turns one planned action into what the store keeps. Pure. Without
/// `payloads` (dry runs, simulations: nothing is written) the payloads are
/// left empty (`null`), which spares serialising a copy of the customer per
/// action.
pub fn to_outgoing(
    action: PlannedAction,
    facts: &Facts,
    default_owner: &Email,
    payloads: bool,
) -> Outgoing {
    let customer = &facts.customer;
    let customer_email = customer.email.as_ref().map(ToString::to_string);
    let customer_tz = customer.timezone.clone();
    let key = dedup_key(&action);
    let PlannedAction {
        rule,
        customer_id,
        kind,
    } = action;
    let action = |kind: OutboxKind, subject: String, payload: Result<String, serde_json::Error>| {
        Outgoing::Action(NewAction {
            customer_id: customer_id.clone(),
            rule: rule.clone(),
            kind,
            dedup_key: key.clone().unwrap_or_default(),
            customer_email: customer_email.clone(),
            customer_timezone: customer_tz.clone(),
            not_before: None,
            dropped: None,
            subject,
            payload: payload.unwrap_or_else(|_| "null".into()),
        })
    };
    // Built and serialised only when kept.
    fn json<T: serde::Serialize>(
        keep: bool,
        value: impl FnOnce() -> T,
    ) -> Result<String, serde_json::Error> {
        if keep {
            serde_json::to_string(&value())
        } else {
            Ok("null".into())
        }
    }
    match kind {
        ActionRequest::Email {
            template,
            key: k,
            vars,
        } => action(
            OutboxKind::Email,
            format!("{template} (key {k})"),
            json(payloads, || EmailPayload {
                template: template.clone(),
                key: k.clone(),
                vars,
                customer: customer.clone(),
            }),
        ),
        ActionRequest::Tag { name } => action(
            OutboxKind::Tag,
            name.clone(),
            json(payloads, || json!({ "name": name })),
        ),
        ActionRequest::Webhook { name, payload } => action(
            OutboxKind::Webhook,
            name.clone(),
            json(payloads, || WebhookPayload {
                name,
                rule: rule.clone(),
                customer_id: customer_id.clone(),
                payload,
            }),
        ),
        ActionRequest::Escalate { reason } => {
            let owner = customer
                .owner
                .clone()
                .unwrap_or_else(|| default_owner.clone());
            let notice = if payloads {
                serde_json::to_value(EscalationPayload {
                    escalation_id: 0,
                    rule: rule.clone(),
                    reason: reason.clone(),
                    owner: owner.clone(),
                    customer: customer.clone(),
                    facts: facts.summary(),
                    reminder: 0,
                    overflow: None,
                })
                .unwrap_or(Value::Null)
            } else {
                Value::Null
            };
            Outgoing::Escalation(NewEscalation {
                customer_id,
                rule,
                reason,
                owner: owner.to_string(),
                notice,
            })
        }
    }
}

/// Loads the facts of these customers: their histories and tags, by id
/// range when they are every customer of the range (one index scan), by id
/// when they are a sample of it (the changed ones).
async fn load_facts(
    store: &dyn Store,
    customers: Vec<crate::domain::Customer>,
    whole_range: bool,
    now: DateTime<Utc>,
) -> Result<Vec<Facts>, StoreError> {
    let (Some(first), Some(last)) = (customers.first(), customers.last()) else {
        return Ok(Vec::new());
    };
    let (histories, tag_rows) = if whole_range {
        (
            store
                .histories_in_id_range(&first.id, &last.id, now)
                .await?,
            store.tags_in_id_range(&first.id, &last.id).await?,
        )
    } else {
        let ids: Vec<CustomerId> = customers.iter().map(|c| c.id.clone()).collect();
        (
            store.histories_of(&ids, now).await?,
            store.tags_of(&ids).await?,
        )
    };
    let mut histories: HashMap<CustomerId, Vec<HistoryEvent>> = histories.into_iter().collect();
    let mut tags: HashMap<CustomerId, Vec<String>> = HashMap::new();
    for (id, tag) in tag_rows {
        tags.entry(id).or_default().push(tag);
    }
    Ok(customers
        .into_iter()
        .map(|c| {
            let history = histories.remove(&c.id).unwrap_or_default();
            let t = tags.remove(&c.id).unwrap_or_default();
            Facts::from_history(c, history, t, now)
        })
        .collect())
}

/// What the rules ask for each customer of a page, and their errors, in
/// the page's order (on the rayon pool: call it from a blocking thread). A
/// cancelled run stops at once, leaving the rest empty.
pub(crate) fn evaluate_page(
    rules: &RuleSet,
    only: Option<&HashSet<String>>,
    page: Vec<Facts>,
    default_owner: &Email,
    cancel: Option<&CancellationToken>,
    payloads: bool,
) -> Vec<(Vec<Outgoing>, Vec<RuleErrorRecord>)> {
    page.into_par_iter()
        .map(|facts| {
            if cancel.is_some_and(|c| c.is_cancelled()) {
                return (Vec::new(), Vec::new());
            }
            let facts = Arc::new(facts);
            let mut outgoing = Vec::new();
            let mut errors = Vec::new();
            for (rule, result) in rules.evaluate_selected(&facts, only) {
                match result {
                    Ok(actions) => outgoing.extend(
                        actions
                            .into_iter()
                            .map(|a| to_outgoing(a, &facts, default_owner, payloads)),
                    ),
                    Err(e) => errors.push(RuleErrorRecord {
                        rule: rule.id.clone(),
                        customer_id: facts.customer.id.clone(),
                        message: e.to_string(),
                    }),
                }
            }
            (outgoing, errors)
        })
        .collect()
}

/// One page of customers, evaluated: a partition claimed for a run, or a
/// page of the base for a dry run.
pub struct EvaluatedPage {
    /// The customers evaluated (those that existed at the run's `now`).
    pub ids: Vec<CustomerId>,
    pub eval: Evaluation,
    /// The claimed partition this page is (real runs).
    pub partition: Option<Partition>,
}

/// Where pages come from.
enum Source {
    /// Every customer, `PAGE` at a time (dry runs): after this id.
    Base { after: Option<CustomerId> },
    /// Partitions of run `run` claimed for `holder`; `first` was claimed
    /// before (the daemon found the run by claiming it).
    Claims {
        run: i64,
        holder: String,
        first: Option<Partition>,
    },
}

/// One page, loaded but not evaluated.
struct Loaded {
    facts: Vec<Facts>,
    partition: Option<Partition>,
}

/// What `evaluate_page` gives for a page, and its seconds.
type Results = (Vec<(Vec<Outgoing>, Vec<RuleErrorRecord>)>, f64);

/// One page whose rules run on the rayon pool.
struct Evaluating {
    ids: Vec<CustomerId>,
    partition: Option<Partition>,
    /// Customers loaded (before those created after `now` were left out).
    loaded: u64,
    /// Seconds spent loading it that nothing else overlapped.
    load_seconds: f64,
    task: tokio::task::JoinHandle<Results>,
}

/// The customers of a run, evaluated a page at a time, in a pipeline: while
/// the caller commits one page, the next evaluates on the rayon pool, and
/// the one after loads (and, in a real run, is claimed) while the caller
/// waits for it. Only three pages' facts and plans are held at once.
pub struct Pages<'a> {
    store: &'a dyn Store,
    rules: Arc<RuleSet>,
    only: Option<Arc<HashSet<String>>>,
    now: DateTime<Utc>,
    default_owner: Email,
    progress: Option<&'a indicatif::ProgressBar>,
    cancel: Option<&'a CancellationToken>,
    selected: u64,
    source: Source,
    /// The page evaluating now; `None` before the first and after the last.
    evaluating: Option<Evaluating>,
    /// The source has no more pages.
    exhausted: bool,
}

impl<'a> Pages<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        store: &'a dyn Store,
        rules: Arc<RuleSet>,
        only: Option<Arc<HashSet<String>>>,
        now: DateTime<Utc>,
        default_owner: &Email,
        progress: Option<&'a indicatif::ProgressBar>,
        cancel: Option<&'a CancellationToken>,
        source: Source,
    ) -> Self {
        let selected = rules
            .rules()
            .iter()
            .filter(|r| only.as_ref().is_none_or(|o| o.contains(&r.id)))
            .count() as u64;
        Self {
            store,
            rules,
            only,
            now,
            default_owner: default_owner.clone(),
            progress,
            cancel,
            selected,
            source,
            evaluating: None,
            exhausted: false,
        }
    }

    fn stopped(&self) -> bool {
        self.cancel.is_some_and(|c| c.is_cancelled())
    }

    /// Loads the next page from the source; `None` after the last.
    async fn load_next(&mut self) -> Result<Option<Loaded>, StoreError> {
        match &mut self.source {
            Source::Base { after } => {
                let customers = self.store.customers_page(after.as_ref(), PAGE).await?;
                let Some(last) = customers.last() else {
                    return Ok(None);
                };
                *after = Some(last.id.clone());
                let facts = load_facts(self.store, customers, true, self.now).await?;
                Ok(Some(Loaded {
                    facts,
                    partition: None,
                }))
            }
            Source::Claims { run, holder, first } => {
                let partition = match first.take() {
                    Some(p) => p,
                    None => {
                        let now = Utc::now();
                        match self
                            .store
                            .claim_partition(Some(*run), holder, now, now + PARTITION_LEASE)
                            .await?
                        {
                            Some(p) => p,
                            None => return Ok(None),
                        }
                    }
                };
                let customers = self.store.partition_customers(&partition).await?;
                let whole = partition.spec.changed_since.is_none();
                let facts = load_facts(self.store, customers, whole, self.now).await?;
                Ok(Some(Loaded {
                    facts,
                    partition: Some(partition),
                }))
            }
        }
    }

    /// Starts evaluating a loaded page on the rayon pool.
    fn start(&self, loaded: Loaded, load_seconds: f64) -> Evaluating {
        let Loaded {
            facts: mut page,
            partition,
        } = loaded;
        let count = page.len() as u64;
        let now = self.now;
        // Customers who signed up after `now` did not exist yet: a replay of
        // the past must not welcome them.
        page.retain(|f| f.customer.created_at.is_none_or(|c| c <= now));
        let ids: Vec<CustomerId> = page.iter().map(|f| f.customer.id.clone()).collect();
        let rules = Arc::clone(&self.rules);
        let only = self.only.clone();
        let owner = self.default_owner.clone();
        let cancel = self.cancel.cloned();
        // A dry run (pages of the base) writes nothing: no payloads.
        let payloads = matches!(self.source, Source::Claims { .. });
        let task = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let results = evaluate_page(
                &rules,
                only.as_deref(),
                page,
                &owner,
                cancel.as_ref(),
                payloads,
            );
            (results, started.elapsed().as_secs_f64())
        });
        Evaluating {
            ids,
            partition,
            loaded: count,
            load_seconds,
            task,
        }
    }

    /// Loads the next page and starts its evaluation; notes when there is
    /// none. `waited`: nothing overlapped the load (the first page), so its
    /// seconds count as the page's loading time.
    async fn load_and_start(&mut self, waited: bool) -> Result<Option<Evaluating>, StoreError> {
        if self.exhausted {
            return Ok(None);
        }
        let started = Instant::now();
        match self.load_next().await? {
            Some(loaded) => {
                let seconds = if waited {
                    started.elapsed().as_secs_f64()
                } else {
                    0.0
                };
                Ok(Some(self.start(loaded, seconds)))
            }
            None => {
                self.exhausted = true;
                Ok(None)
            }
        }
    }

    /// Evaluates the next page; `None` after the last. Rule errors are
    /// collected, never fatal; a cancelled run stops at once.
    pub async fn next(&mut self) -> Result<Option<EvaluatedPage>, RunError> {
        let waited = Instant::now();
        if self.evaluating.is_none() {
            self.evaluating = self.load_and_start(true).await?;
        }
        let Some(current) = self.evaluating.take() else {
            return Ok(None);
        };
        if self.stopped() {
            return Err(RunError::Cancelled);
        }
        // The page after this one loads while this one evaluates; its
        // evaluation then runs while the caller commits this one.
        let loading = Instant::now();
        let following = self.load_and_start(false).await;
        let loading = loading.elapsed().as_secs_f64();
        let (results, rule_seconds) = current.task.await.map_err(|e| StoreError::Corrupt {
            table: "evaluation",
            message: format!("evaluation task failed: {e}"),
        })?;
        let evaluated = waited.elapsed().as_secs_f64();
        self.evaluating = following?;
        if self.stopped() {
            return Err(RunError::Cancelled);
        }
        let n = results.len() as u64;
        let mut eval = Evaluation {
            customers: n,
            evaluations: n * self.selected,
            rule_seconds,
            // Loading overlaps evaluating: only the part of it that outlasted
            // the rules was waited for.
            load_seconds: current.load_seconds + (loading - rule_seconds).max(0.0),
            seconds: evaluated,
            ..Default::default()
        };
        for (o, e) in results {
            eval.outgoing.extend(o);
            eval.errors.extend(e);
        }
        if let Some(p) = self.progress {
            p.inc(current.loaded);
        }
        Ok(Some(EvaluatedPage {
            ids: current.ids,
            eval,
            partition: current.partition,
        }))
    }
}

pub fn kind_label(o: &Outgoing) -> (&'static str, String) {
    match o {
        Outgoing::Escalation(e) => ("escalation", format!("escalate: {}", e.reason)),
        Outgoing::Action(a) => match a.kind {
            OutboxKind::Email => ("email", format!("email {}", a.subject)),
            OutboxKind::Tag => ("tag", format!("tag {}", a.subject)),
            OutboxKind::Webhook => ("webhook", format!("webhook {}", a.subject)),
            OutboxKind::EscalationNotice => ("escalation", "escalation notice".into()),
        },
    }
}

/// Options for one run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub now: DateTime<Utc>,
    pub dry_run: bool,
    pub trigger: String,
    /// How long to keep retrying transient delivery failures.
    pub retry_window: Duration,
    /// Evaluate only these rules (a schedule's subset); `None` = all.
    pub only_rules: Option<Vec<String>>,
    /// Evaluate only customers whose data changed at or after this (a
    /// schedule with `customers = "changed"`); `None` = every customer.
    pub changed_since: Option<DateTime<Utc>>,
    pub policy: crate::policy::PolicyConfig,
    pub guard: crate::policy::GuardConfig,
    pub escalation: crate::config::EscalationConfig,
    /// The schedule firing this run is for: beginning the run marks it done
    /// (the run, which any process can finish, carries its work from then).
    pub firing: Option<crate::store::Firing>,
    /// Cancelled by a shutdown: evaluation stops at once. Partitions
    /// committed stay; the rest are finished by whoever claims them next.
    pub cancel: Option<CancellationToken>,
    /// A dry run keeps this many of its actions in `would` (`None`: all,
    /// which `plan` needs to compare rule sets); the rest are only counted.
    pub would_limit: Option<usize>,
}

/// Why a run did not finish.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the run was stopped before its plan was committed")]
    Cancelled,
}

/// What a participant needs to plan partitions of any run: the rules, the
/// policies' settings, and a way to stop.
pub struct Planner<'a> {
    pub store: &'a Arc<dyn Store>,
    pub rules: &'a Arc<RuleSet>,
    pub default_owner: &'a Email,
    pub policy: &'a crate::policy::PolicyConfig,
    pub guard: &'a crate::policy::GuardConfig,
    pub escalation: &'a crate::config::EscalationConfig,
    pub cancel: Option<&'a CancellationToken>,
}

impl<'a> Planner<'a> {
    fn from_options(
        store: &'a Arc<dyn Store>,
        rules: &'a Arc<RuleSet>,
        default_owner: &'a Email,
        opts: &'a RunOptions,
    ) -> Self {
        Self {
            store,
            rules,
            default_owner,
            policy: &opts.policy,
            guard: &opts.guard,
            escalation: &opts.escalation,
            cancel: opts.cancel.as_ref(),
        }
    }
}

/// Evaluates, plans and (unless dry) commits and delivers.
///
/// A real run is recorded with its spec and split into partitions (ranges
/// of about `PARTITION` customers) that any process can claim with a lease:
/// this one, `serve` replicas next to it, the next `engaged run` if this
/// one dies. Each partition is evaluated, deduplicated against the ledger,
/// passed through the policies and committed together with its "done" mark,
/// then let go, so a run's memory does not grow with the base. What needs
/// the whole run is kept as counters per partition (the blast-radius
/// guard's customers per rule) or read from the ledger under the planner
/// lock (owners' escalations today). A partition's new emails are committed
/// `staged` and become deliverable only when the run is finished, by
/// whoever commits its last partition, with the guard's decision (or held
/// by it). This call returns once the run is finished, by anyone.
pub async fn run(
    store: Arc<dyn Store>,
    rules: Arc<RuleSet>,
    deliverer: Option<&Deliverer>,
    default_owner: &Email,
    opts: &RunOptions,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<RunSummary, RunError> {
    if opts.dry_run {
        return dry_run(&store, &rules, default_owner, opts, progress).await;
    }
    let planner = Planner::from_options(&store, &rules, default_owner, opts);
    // What a planner that died left unfinished is finished first (its
    // partitions' leases ended, or its process is gone from this machine).
    finish_abandoned(&planner).await?;
    let started_at = Utc::now();
    let spec = RunSpec {
        now: opts.now,
        only_rules: opts.only_rules.clone(),
        changed_since: opts.changed_since,
        base_customers: store.customer_count().await?,
    };
    let (run_id, partitions) = store
        .begin_run(
            &opts.trigger,
            &spec,
            started_at,
            PARTITION,
            opts.firing.as_ref(),
        )
        .await?;
    tracing::info!(
        run = run_id,
        partitions,
        changed_since = ?opts.changed_since,
        "Run begun."
    );
    let mut summary = loop {
        participate(
            &planner,
            run_id,
            None,
            crate::liveness::holder_token(),
            progress,
        )
        .await?;
        if let Some((status, summary)) = store.run_status(run_id).await?
            && status != "planning"
        {
            break serde_json::from_value::<RunSummary>(summary).unwrap_or_default();
        }
        // Other processes hold the rest: wait for them, taking over the
        // partitions of any that died.
        crate::liveness::reap_dead_holders(&*store, Utc::now()).await?;
        match opts.cancel.as_ref() {
            Some(c) => tokio::select! {
                _ = tokio::time::sleep(WAIT_FOR_OTHERS) => {}
                _ = c.cancelled() => return Err(RunError::Cancelled),
            },
            None => tokio::time::sleep(WAIT_FOR_OTHERS).await,
        }
    };
    summary.run_id = Some(run_id);
    tracing::info!(
        run = run_id,
        customers = summary.customers,
        "Run planned; delivering."
    );
    if let Some(d) = deliverer {
        let started = Instant::now();
        summary.delivery = d.drain(opts.retry_window).await?;
        summary.phases.deliver = started.elapsed().as_secs_f64();
    }
    let status = if summary.delivery.retrying > 0 {
        "delivered_with_retries_pending"
    } else {
        "completed"
    };
    store
        .finish_run(
            run_id,
            status,
            &serde_json::to_value(&summary).unwrap_or(Value::Null),
        )
        .await?;
    Ok(summary)
}

/// One step of a `serve` replica's share of the runs: claims a partition of
/// any run still planning and plans that run's partitions while there are
/// any to claim, or finishes a run whose partitions are all done (its
/// finisher died). Returns the run it worked on, `None` when there was
/// nothing to do.
pub async fn help_with_runs(planner: &Planner<'_>) -> Result<Option<i64>, RunError> {
    let holder = crate::liveness::holder_token();
    let now = Utc::now();
    if let Some(first) = planner
        .store
        .claim_partition(None, &holder, now, now + PARTITION_LEASE)
        .await?
    {
        let run_id = first.run_id;
        tracing::info!(
            run = run_id,
            partition = first.index,
            "Joining a run that has partitions to plan."
        );
        participate(planner, run_id, Some(first), holder, None).await?;
        return Ok(Some(run_id));
    }
    let ready = planner.store.runs_ready_to_finish().await?;
    let Some(run) = ready.into_iter().next() else {
        return Ok(None);
    };
    finish(planner, &run).await?;
    Ok(Some(run.id))
}

/// Finishes the runs other planners left: claims what is claimable of each
/// run still planning, and finishes those whose partitions are all done.
async fn finish_abandoned(planner: &Planner<'_>) -> Result<(), RunError> {
    crate::liveness::reap_dead_holders(&**planner.store, Utc::now()).await?;
    loop {
        let holder = crate::liveness::holder_token();
        let now = Utc::now();
        let Some(first) = planner
            .store
            .claim_partition(None, &holder, now, now + PARTITION_LEASE)
            .await?
        else {
            break;
        };
        tracing::warn!(
            run = first.run_id,
            "A run that stopped between partitions is finished first."
        );
        participate(planner, first.run_id, Some(first), holder, None).await?;
    }
    for run in planner.store.runs_ready_to_finish().await? {
        finish(planner, &run).await?;
    }
    Ok(())
}

/// Plans partitions of run `run_id` for `holder` while there are any to
/// claim (starting with `first`, when the caller claimed one), then
/// finishes the run if they are all done.
async fn participate(
    planner: &Planner<'_>,
    run_id: i64,
    first: Option<Partition>,
    holder: String,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<(), RunError> {
    // The spec comes with the first claim; without one, claim to learn it.
    let first = match first {
        Some(p) => p,
        None => {
            let now = Utc::now();
            match planner
                .store
                .claim_partition(Some(run_id), &holder, now, now + PARTITION_LEASE)
                .await?
            {
                Some(p) => p,
                None => {
                    try_finish_run(planner, run_id).await?;
                    return Ok(());
                }
            }
        }
    };
    let unfinished = UnfinishedRun {
        id: run_id,
        trigger: first.trigger.clone(),
        started_at: first.started_at,
        spec: first.spec.clone(),
    };
    let renewal = {
        let (store, holder) = (Arc::clone(planner.store), holder.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RENEW_EVERY).await;
                if let Err(e) = store
                    .renew_partitions(&holder, Utc::now() + PARTITION_LEASE)
                    .await
                {
                    tracing::warn!("Could not renew the leases of this run's partitions: {e}");
                }
            }
        })
    };
    let planned = plan_claimed(planner, &unfinished, first, holder.clone(), progress).await;
    renewal.abort();
    if planned.is_err() {
        // Stopped (a shutdown) or failed: what this holder claimed and did
        // not commit is anyone's again at once, not when its lease ends.
        match planner.store.release_partitions(&holder).await {
            Ok(n) if n > 0 => tracing::warn!(
                run = run_id,
                partitions = n,
                "Partitions of this run were left unplanned; they are pending again for any process to claim."
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(
                "Could not give back this run's claimed partitions: {e}; their leases end by themselves."
            ),
        }
    }
    planned?;
    try_finish_run(planner, run_id).await
}

/// Evaluates and commits claimed partitions until none is left to claim.
async fn plan_claimed(
    planner: &Planner<'_>,
    run: &UnfinishedRun,
    first: Partition,
    holder: String,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<(), RunError> {
    let only: Option<Arc<HashSet<String>>> = run
        .spec
        .only_rules
        .as_ref()
        .map(|r| Arc::new(r.iter().cloned().collect()));
    let mut pages = Pages::new(
        &**planner.store,
        Arc::clone(planner.rules),
        only,
        run.spec.now,
        planner.default_owner,
        progress,
        planner.cancel,
        Source::Claims {
            run: run.id,
            holder: holder.clone(),
            first: Some(first),
        },
    );
    while let Some(page) = pages.next().await? {
        let mut part = PartitionSummary::default();
        plan_partition(planner, run.spec.now, Some(&run.trigger), page, &mut part).await?;
    }
    Ok(())
}

/// Finishes run `run_id` if its partitions are all done and nobody else
/// finished it.
async fn try_finish_run(planner: &Planner<'_>, run_id: i64) -> Result<(), RunError> {
    let ready = planner.store.runs_ready_to_finish().await?;
    if let Some(run) = ready.iter().find(|r| r.id == run_id) {
        finish(planner, run).await?;
    }
    Ok(())
}

/// Finishes a run whose partitions are all done: adds up their counts, makes
/// the blast-radius guard's decision per rule, releases (or holds) the
/// staged emails and records the summary, once: a second finisher finds
/// the run finished and leaves it. Then reminders of escalations are due.
async fn finish(planner: &Planner<'_>, run: &UnfinishedRun) -> Result<(), RunError> {
    let parts = planner.store.run_partitions(run.id).await?;
    if parts.iter().any(|p| p.status != "done") {
        return Ok(());
    }
    let mut summary = RunSummary {
        run_id: Some(run.id),
        now: run.spec.now,
        rules: planner
            .rules
            .rules()
            .iter()
            .filter(|r| {
                run.spec
                    .only_rules
                    .as_ref()
                    .is_none_or(|o| o.contains(&r.id))
            })
            .map(|r| (r.id.clone(), RuleSummary::default()))
            .collect(),
        partitions: parts.len() as u64,
        changed_since: run.spec.changed_since,
        ..Default::default()
    };
    let mut reach: BTreeMap<String, usize> = BTreeMap::new();
    for p in &parts {
        let part: PartitionSummary = p
            .summary
            .clone()
            .and_then(|s| serde_json::from_value(s).ok())
            .unwrap_or_default();
        let replica = summary
            .replicas
            .entry(crate::liveness::process_of(p.holder.as_deref().unwrap_or("unknown")).to_owned())
            .or_default();
        replica.partitions += 1;
        replica.customers += part.customers;
        for (rule, n) in &part.reach {
            *reach.entry(rule.clone()).or_default() += n;
        }
        summary.absorb(part);
        summary.phases.commit += p.commit_seconds;
        for (rule, c) in p.counts.iter().flatten() {
            let s = summary.rules.entry(rule.clone()).or_default();
            s.planned += c.planned;
            s.deduplicated += c.deduplicated;
        }
    }
    summary.evaluation_seconds = (Utc::now() - run.started_at).as_seconds_f64();
    // The guard's denominator is the base: a run over what changed must
    // not hold a welcome to most of the few who signed up this minute.
    let base = if run.spec.changed_since.is_some() {
        run.spec.base_customers
    } else {
        summary.customers
    };
    let hold = guard_holds(&reach, base, planner.guard);
    let held = match planner
        .store
        .finish_plan(
            run.id,
            &hold,
            &serde_json::to_value(&summary).unwrap_or(Value::Null),
        )
        .await
    {
        Ok(held) => held,
        // Someone else finished it meanwhile.
        Err(StoreError::LeaseLost(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for (rule, n) in &held {
        summary.rules.entry(rule.clone()).or_default().held = *n;
        tracing::warn!(
            run = run.id,
            rule,
            emails = n,
            customers = summary.customers,
            "The blast-radius guard held this rule's emails; approve with `engaged runs approve {} --rule {rule}`.",
            run.id
        );
    }
    renotify(&**planner.store, planner.escalation, run.id, run.spec.now).await?;
    // The summary with the held counts; a run's starter adds its delivery.
    planner
        .store
        .finish_run(
            run.id,
            "completed",
            &serde_json::to_value(&summary).unwrap_or(Value::Null),
        )
        .await?;
    tracing::info!(
        run = run.id,
        trigger = %run.trigger,
        partitions = summary.partitions,
        customers = summary.customers,
        "Run finished planning."
    );
    Ok(())
}

/// A dry run: the base a page at a time through the same evaluation and
/// policies, reading (never writing) the ledger.
async fn dry_run(
    store: &Arc<dyn Store>,
    rules: &Arc<RuleSet>,
    default_owner: &Email,
    opts: &RunOptions,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<RunSummary, RunError> {
    let planner = Planner::from_options(store, rules, default_owner, opts);
    let only: Option<Arc<HashSet<String>>> = opts
        .only_rules
        .as_ref()
        .map(|r| Arc::new(r.iter().cloned().collect()));
    let mut summary = RunSummary {
        dry_run: true,
        now: opts.now,
        rules: rules
            .rules()
            .iter()
            .filter(|r| only.as_ref().is_none_or(|o| o.contains(&r.id)))
            .map(|r| (r.id.clone(), RuleSummary::default()))
            .collect(),
        ..Default::default()
    };
    let started = Instant::now();
    let mut pages = Pages::new(
        &**store,
        Arc::clone(rules),
        only,
        opts.now,
        default_owner,
        progress,
        opts.cancel.as_ref(),
        Source::Base { after: None },
    );
    let mut reach: BTreeMap<String, usize> = BTreeMap::new();
    let mut owners: HashMap<String, u32> = HashMap::new();
    while let Some(page) = pages.next().await? {
        let mut part = PartitionSummary::default();
        let dry = DryRun {
            owners: &mut owners,
            would_limit: opts.would_limit,
            would: &mut summary.would,
            would_total: &mut summary.would_total,
        };
        plan_dry_partition(&planner, opts.now, page, &mut part, dry).await?;
        for (rule, n) in &part.reach {
            *reach.entry(rule.clone()).or_default() += n;
        }
        summary.absorb(part);
    }
    summary.evaluation_seconds = started.elapsed().as_secs_f64();
    for rule in guard_holds(&reach, summary.customers, &opts.guard).keys() {
        let s = summary.rules.entry(rule.clone()).or_default();
        s.held = s.emails;
    }
    Ok(summary)
}

/// What a dry run keeps across its pages.
struct DryRun<'a> {
    /// Owners' escalations today: from the ledger, plus this dry run's.
    owners: &'a mut HashMap<String, u32>,
    would_limit: Option<usize>,
    would: &'a mut Vec<WouldDo>,
    would_total: &'a mut Option<u64>,
}

/// Counts what the rules asked for, per rule.
fn tally(eval: &Evaluation, per_rule: &mut BTreeMap<String, RuleSummary>) {
    for o in &eval.outgoing {
        let s = per_rule.entry(o.rule().to_owned()).or_default();
        match kind_label(o).0 {
            "email" => s.emails += 1,
            "escalation" => s.escalations += 1,
            "tag" => s.tags += 1,
            _ => s.webhooks += 1,
        }
    }
    for e in &eval.errors {
        per_rule.entry(e.rule.clone()).or_default().errors += 1;
    }
}

/// A page's evaluation counts into its partition summary.
fn count_evaluation(page: &EvaluatedPage, part: &mut PartitionSummary) {
    part.customers += page.eval.customers;
    part.evaluations += page.eval.evaluations;
    part.rule_seconds += page.eval.rule_seconds;
    part.phases.load += page.eval.load_seconds;
    part.phases.evaluate += page.eval.rule_seconds;
    tally(&page.eval, &mut part.rules);
    part.errors
        .extend(page.eval.errors.iter().take(MAX_ERRORS_IN_SUMMARY).cloned());
}

/// The policies over one page's plan, in order: what the ledger already
/// has, copies, the guard's count, suppressions, the frequency cap, send
/// windows, owners' caps. Returns the decisions to record and the copies
/// that rejoin the plan. `owners` holds the owners' escalations today.
async fn apply_policies(
    planner: &Planner<'_>,
    now: DateTime<Utc>,
    eval: &mut Evaluation,
    existing: &HashSet<String>,
    part: &mut PartitionSummary,
    owners: &mut HashMap<String, u32>,
) -> Result<Vec<Decision>, StoreError> {
    let store = &**planner.store;
    // An action asked for twice in one run (send_email in a loop, two rules
    // tagging alike) is one action: only its first request meets the
    // policies (a copy must not eat cap room or repeat a decision); the
    // copies rejoin the plan below, where committing counts them as
    // deduplicated, unless a policy removed the first.
    let copies = take_copies(&mut eval.outgoing);
    // The guard judges what each rule wants to send (before suppressions and
    // the cap trim it), so a bad edit cannot trickle out under the cap. A
    // customer is in one partition only, so the counts add up.
    part.reach = guard_reach(&eval.outgoing, existing);
    let mut decisions = drop_suppressed(store, existing, &mut eval.outgoing).await?;
    for d in &decisions {
        part.rules.entry(d.rule.clone()).or_default().suppressed += 1;
    }
    if let Some(cap) = planner.policy.frequency_cap {
        let (capped, deferred) =
            apply_frequency_cap(store, planner.rules, existing, cap, now, &mut eval.outgoing)
                .await?;
        for rule in capped {
            part.rules.entry(rule).or_default().capped += 1;
        }
        decisions.extend(deferred);
    }
    if let Some(window) = planner.policy.window().ok().flatten() {
        let fallback = planner.policy.default_tz().unwrap_or(chrono_tz::UTC);
        for d in apply_send_window(window, fallback, now, existing, &mut eval.outgoing) {
            part.rules
                .entry(d.rule.clone())
                .or_default()
                .waiting_for_window += 1;
            decisions.push(d);
        }
    }
    if planner.escalation.owner_daily_cap > 0 {
        // Re-fires of escalations already open open nothing new: they do
        // not count against an owner's cap.
        let pairs = escalation_pairs(&eval.outgoing);
        let open = store.open_escalation_pairs(&pairs).await?;
        let resolved = store.resolved_escalation_reasons(&pairs).await?;
        overflow_owners(
            &mut eval.outgoing,
            &open,
            &resolved,
            owners,
            planner.escalation.owner_daily_cap,
            planner.default_owner,
        );
    }
    let planned: HashSet<String> = action_keys(&eval.outgoing).into_iter().collect();
    eval.outgoing.extend(copies.into_iter().filter(|o| match o {
        Outgoing::Action(a) => planned.contains(&a.dedup_key),
        Outgoing::Escalation(_) => true,
    }));
    Ok(decisions)
}

/// Owners of a plan's escalations that no count is known for yet.
fn unknown_owners(outgoing: &[Outgoing], known: &HashMap<String, u32>) -> Vec<String> {
    let owners: HashSet<&str> = outgoing
        .iter()
        .filter_map(|o| match o {
            Outgoing::Escalation(e) if !known.contains_key(&e.owner) => Some(e.owner.as_str()),
            _ => None,
        })
        .collect();
    owners.into_iter().map(str::to_owned).collect()
}

/// One page of a dry run: dedup against the ledger and the policies, read
/// only; what it would do goes into `dry`.
async fn plan_dry_partition(
    planner: &Planner<'_>,
    now: DateTime<Utc>,
    mut page: EvaluatedPage,
    part: &mut PartitionSummary,
    dry: DryRun<'_>,
) -> Result<(), StoreError> {
    count_evaluation(&page, part);
    let store = &**planner.store;
    let started = Instant::now();
    let keys = action_keys(&page.eval.outgoing);
    let existing = store.existing_dedup_keys(&keys).await?;
    part.phases.dedup += started.elapsed().as_secs_f64();
    let started = Instant::now();
    if planner.escalation.owner_daily_cap > 0 {
        let missing = unknown_owners(&page.eval.outgoing, dry.owners);
        if !missing.is_empty() {
            let since = now - chrono::Duration::days(1);
            let counts = store.owner_escalation_counts(&missing, since).await?;
            for owner in missing {
                let n = counts.get(&owner).copied().unwrap_or(0);
                dry.owners.insert(owner, n);
            }
        }
    }
    apply_policies(planner, now, &mut page.eval, &existing, part, dry.owners).await?;
    mark_dry_run_duplicates(store, &existing, &page.eval, part, dry).await?;
    part.phases.policies += started.elapsed().as_secs_f64();
    Ok(())
}

/// One claimed partition of a real run: dedup against the ledger, the
/// policies and the commit (with the partition's "done" mark) under the
/// planner lock, and what the run says about the open escalations of the
/// partition's customers.
async fn plan_partition(
    planner: &Planner<'_>,
    now: DateTime<Utc>,
    trigger: Option<&str>,
    mut page: EvaluatedPage,
    part: &mut PartitionSummary,
) -> Result<(), RunError> {
    count_evaluation(&page, part);
    let Some(partition) = page.partition.take() else {
        return Ok(());
    };
    // One planner at a time reads the ledger the policies need and writes
    // it: another run (another schedule, a CLI run next to `serve`) must not
    // see the same room under a cap.
    let lock = PlannerLock::acquire(planner.store, planner.cancel).await?;
    let planned = commit_partition(planner, now, trigger, page, part, &partition).await;
    if let Err(e) = lock.release().await {
        tracing::warn!("Could not release the planner lock: {e}; it frees when its lease ends.");
    }
    planned?;
    Ok(())
}

async fn commit_partition(
    planner: &Planner<'_>,
    now: DateTime<Utc>,
    trigger: Option<&str>,
    page: EvaluatedPage,
    part: &mut PartitionSummary,
    partition: &Partition,
) -> Result<(), StoreError> {
    let store = &**planner.store;
    let EvaluatedPage { ids, mut eval, .. } = page;
    // Keys already in the ledger: those actions are deduplicated, so only
    // the rest compete for the guard, the cap and the audit trail.
    let started = Instant::now();
    let keys = action_keys(&eval.outgoing);
    let existing = store.existing_dedup_keys(&keys).await?;
    part.phases.dedup += started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut owners = HashMap::new();
    if planner.escalation.owner_daily_cap > 0 {
        // From the ledger, under the lock: earlier partitions' escalations
        // (this run's, other replicas') are committed and count.
        let wanted = unknown_owners(&eval.outgoing, &owners);
        owners = store
            .owner_escalation_counts(&wanted, now - chrono::Duration::days(1))
            .await?;
    }
    let decisions = apply_policies(planner, now, &mut eval, &existing, part, &mut owners).await?;
    part.phases.policies += started.elapsed().as_secs_f64();
    let started = Instant::now();
    // What this run says about open escalations: which (customer, rule)
    // pairs escalated again, and which could not be evaluated.
    let escalated: HashSet<(String, String)> = eval
        .outgoing
        .iter()
        .filter_map(|o| match o {
            Outgoing::Escalation(e) => Some((e.customer_id.to_string(), e.rule.clone())),
            Outgoing::Action(_) => None,
        })
        .collect();
    let errored: HashSet<(String, String)> = eval
        .errors
        .iter()
        .map(|e| (e.customer_id.to_string(), e.rule.clone()))
        .collect();
    part.holder = partition.holder.clone();
    let mut commit = PlanCommit {
        trigger: trigger.unwrap_or_default().to_owned(),
        now,
        started_at: partition.started_at,
        errors: eval.errors,
        decisions,
        partition: Some(PartitionDone {
            run_id: partition.run_id,
            index: partition.index,
            holder: partition.holder.clone(),
            summary: serde_json::to_value(&*part).unwrap_or(Value::Null),
        }),
        ..Default::default()
    };
    for o in eval.outgoing {
        match o {
            Outgoing::Action(a) => commit.actions.push(a),
            Outgoing::Escalation(e) => commit.escalations.push(e),
        }
    }
    store.commit_plan(commit).await?;
    // Still under the lock: another run's new escalations must not be judged
    // by this run's (older) evaluation as recovered.
    let open = store.open_escalations_of(&ids).await?;
    let evaluated: HashSet<&str> = planner
        .rules
        .rules()
        .iter()
        .filter(|r| {
            partition
                .spec
                .only_rules
                .as_ref()
                .is_none_or(|o| o.contains(&r.id))
        })
        .map(|r| r.id.as_str())
        .collect();
    mark_recovered(store, &open, &evaluated, &escalated, &errored, now).await?;
    part.phases.commit += started.elapsed().as_secs_f64();
    Ok(())
}

/// Takes out of a plan the actions whose dedup key an earlier action of the
/// plan already has.
fn take_copies(outgoing: &mut Vec<Outgoing>) -> Vec<Outgoing> {
    let mut seen = HashSet::new();
    let (mut keep, mut copies) = (Vec::with_capacity(outgoing.len()), Vec::new());
    for o in outgoing.drain(..) {
        match &o {
            Outgoing::Action(a) if !seen.insert(a.dedup_key.clone()) => copies.push(o),
            _ => keep.push(o),
        }
    }
    *outgoing = keep;
    copies
}

/// The planner lock, held from the policies to the commit of one run. Its
/// lease is short and renewed while held, so a planner that dies (Ctrl-C on
/// `engaged run`, a crash) blocks the others for at most one lease, and not
/// at all when it died on this machine (its holder token names a process
/// that is gone: see `liveness`).
struct PlannerLock {
    store: Arc<dyn Store>,
    holder: String,
    renewal: tokio::task::JoinHandle<()>,
}

impl PlannerLock {
    const LEASE: chrono::Duration = chrono::Duration::seconds(15);
    const RENEW_EVERY: Duration = Duration::from_secs(3);

    /// Waits for the lock; a cancelled wait (a shutdown) ends the run.
    async fn acquire(
        store: &Arc<dyn Store>,
        cancel: Option<&CancellationToken>,
    ) -> Result<Self, RunError> {
        let holder = crate::liveness::holder_token();
        let mut pause = Duration::from_millis(20);
        let mut told = false;
        loop {
            let now = Utc::now();
            if store
                .try_lock_planner(&holder, now, now + Self::LEASE)
                .await?
            {
                break;
            }
            // A holder that died on this machine is released at once.
            if crate::liveness::reap_dead_holders(&**store, now).await? > 0 {
                continue;
            }
            if !told {
                tracing::info!("Another run is applying its policies; waiting for it to commit.");
                told = true;
            }
            match cancel {
                Some(c) => tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = c.cancelled() => return Err(RunError::Cancelled),
                },
                None => tokio::time::sleep(pause).await,
            }
            pause = (pause * 2).min(Duration::from_millis(500));
        }
        let renewal = {
            let (store, holder) = (Arc::clone(store), holder.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Self::RENEW_EVERY).await;
                    let now = Utc::now();
                    // Renewing never re-takes the lock: a renewal that runs
                    // late (after the release) must not lock everyone out.
                    match store.renew_planner(&holder, now + Self::LEASE).await {
                        Ok(true) => {}
                        Ok(false) => tracing::warn!(
                            "The planner lock's lease ran out while this run held it; another run may be planning too."
                        ),
                        Err(e) => tracing::warn!("Could not renew the planner lock: {e}"),
                    }
                }
            })
        };
        Ok(Self {
            store: Arc::clone(store),
            holder,
            renewal,
        })
    }

    async fn release(self) -> Result<(), StoreError> {
        self.renewal.abort();
        self.store.unlock_planner(&self.holder).await
    }
}

impl Drop for PlannerLock {
    /// A run dropped mid-plan (a shutdown) stops renewing; the lease then
    /// frees the lock.
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

/// The dedup key of every action in a plan.
pub(crate) fn action_keys(outgoing: &[Outgoing]) -> Vec<String> {
    outgoing
        .iter()
        .filter_map(|o| match o {
            Outgoing::Action(a) => Some(a.dedup_key.clone()),
            Outgoing::Escalation(_) => None,
        })
        .collect()
}

/// The (customer, rule) of every escalation in a plan.
fn escalation_pairs(outgoing: &[Outgoing]) -> Vec<(CustomerId, String)> {
    outgoing
        .iter()
        .filter_map(|o| match o {
            Outgoing::Escalation(e) => Some((e.customer_id.clone(), e.rule.clone())),
            Outgoing::Action(_) => None,
        })
        .collect()
}

/// The blast-radius guard's count: per rule, the distinct customers a plan
/// asks to email anew.
pub(crate) fn guard_reach(
    outgoing: &[Outgoing],
    existing: &HashSet<String>,
) -> BTreeMap<String, usize> {
    let mut reached: BTreeMap<&str, HashSet<&CustomerId>> = BTreeMap::new();
    for a in new_emails(outgoing, existing) {
        reached
            .entry(a.rule.as_str())
            .or_default()
            .insert(&a.customer_id);
    }
    reached
        .into_iter()
        .map(|(rule, who)| (rule.to_owned(), who.len()))
        .collect()
}

/// The blast-radius guard: rules whose new emails in this run would reach
/// more customers than `guard` allows, with the reason recorded on them.
pub(crate) fn guard_holds(
    reach: &BTreeMap<String, usize>,
    customers: u64,
    guard: &crate::policy::GuardConfig,
) -> BTreeMap<String, String> {
    reach
        .iter()
        .filter(|&(_, &n)| guard.holds(n, customers))
        .map(|(rule, n)| {
            (
                rule.clone(),
                format!("held by the blast-radius guard: {n} of {customers} customers in one run"),
            )
        })
        .collect()
}

/// The marketing emails of a plan that are not in the ledger yet.
fn new_emails<'a>(
    outgoing: &'a [Outgoing],
    existing: &'a HashSet<String>,
) -> impl Iterator<Item = &'a NewAction> {
    outgoing.iter().filter_map(|o| match o {
        Outgoing::Action(a) if a.kind == OutboxKind::Email && !existing.contains(&a.dedup_key) => {
            Some(a)
        }
        _ => None,
    })
}

/// Per-owner daily cap: escalations beyond it go to the default owner, and
/// the reason says so. Only escalations that will open count: not re-fires
/// of open ones, not ones a human resolved for the same reason, not a
/// second request for the same (customer, rule) in this plan.
pub(crate) fn overflow_owners(
    outgoing: &mut [Outgoing],
    already_open: &HashSet<(CustomerId, String)>,
    resolved: &HashSet<(CustomerId, String, String)>,
    counts: &mut HashMap<String, u32>,
    cap: u32,
    default_owner: &Email,
) {
    let mut seen = HashSet::new();
    for o in outgoing.iter_mut() {
        let Outgoing::Escalation(e) = o else { continue };
        let pair = (e.customer_id.clone(), e.rule.clone());
        if already_open.contains(&pair)
            || !seen.insert(pair)
            || resolved.contains(&(e.customer_id.clone(), e.rule.clone(), e.reason.clone()))
        {
            continue;
        }
        let used = counts.entry(e.owner.clone()).or_default();
        if *used < cap || e.owner == default_owner.as_str() {
            *used += 1;
            continue;
        }
        // The reason stays as the rule wrote it (it identifies the
        // escalation); the notice says why it came to the default owner.
        let note = format!("{} reached the daily cap of {cap} escalations", e.owner);
        tracing::info!(customer = %e.customer_id, rule = %e.rule, "Escalation overflows to the default owner: {note}.");
        e.owner = default_owner.to_string();
        if let Value::Object(m) = &mut e.notice {
            m.insert("owner".into(), Value::String(default_owner.to_string()));
            m.insert("overflow".into(), Value::String(note));
        }
    }
}

/// After a partition is committed: its customers' open escalations whose
/// rule no longer fires are marked recovered (not closed: a human decides),
/// or unmarked if it fires again.
async fn mark_recovered(
    store: &dyn Store,
    open: &[crate::store::EscalationRecord],
    evaluated_rules: &HashSet<&str>,
    escalated: &HashSet<(String, String)>,
    errored: &HashSet<(String, String)>,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let (mut recovered, mut relapsed) = (Vec::new(), Vec::new());
    for e in open {
        if !evaluated_rules.contains(e.rule.as_str()) {
            continue;
        }
        let pair = (e.customer_id.clone(), e.rule.clone());
        if escalated.contains(&pair) {
            if e.recovered_at.is_some() {
                relapsed.push(e.id);
            }
        } else if !errored.contains(&pair) && e.recovered_at.is_none() {
            recovered.push(e.id);
        }
    }
    store.set_recovered(&recovered, true, now).await?;
    store.set_recovered(&relapsed, false, now).await
}

/// After a run is planned: unacknowledged escalations due a reminder get
/// one (to `escalation.lead` when set).
async fn renotify(
    store: &dyn Store,
    config: &crate::config::EscalationConfig,
    run_id: i64,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    if config.renotify_days == 0 {
        return Ok(());
    }
    let before = now - chrono::Duration::days(i64::from(config.renotify_days));
    for e in store.escalations_to_renotify(before).await? {
        let to = config.lead.as_deref().unwrap_or(&e.owner);
        if store
            .renotify(e.id, e.notifications, to, run_id, now)
            .await?
        {
            tracing::info!(
                escalation = e.id,
                to,
                "Escalation not acknowledged; reminder sent."
            );
        }
    }
    Ok(())
}

/// The frequency cap: per customer, new marketing emails beyond the room
/// left in the cap's window are deferred (left out of this plan) or dropped
/// (recorded, never sent), lowest priority first. Returns the rule of each
/// email capped.
async fn apply_frequency_cap(
    store: &dyn Store,
    rules: &RuleSet,
    existing: &HashSet<String>,
    cap: crate::policy::FrequencyCap,
    now: DateTime<Utc>,
    outgoing: &mut Vec<Outgoing>,
) -> Result<(Vec<String>, Vec<Decision>), StoreError> {
    use crate::policy::{CapDecision, RulePolicy, apply_cap};
    // Only emails that are new (not already in the ledger) compete for room.
    let mut per_customer: HashMap<CustomerId, Vec<usize>> = HashMap::new();
    for (i, o) in outgoing.iter().enumerate() {
        if let Outgoing::Action(a) = o
            && a.kind == OutboxKind::Email
            && !existing.contains(&a.dedup_key)
        {
            per_customer
                .entry(a.customer_id.clone())
                .or_default()
                .push(i);
        }
    }
    let ids: Vec<CustomerId> = per_customer.keys().cloned().collect();
    let since = now - chrono::Duration::days(i64::from(cap.days));
    let recent = store.recent_email_counts(&ids, since).await?;
    let mut decisions: HashMap<usize, CapDecision> = HashMap::new();
    for (customer, idx) in &per_customer {
        let used = recent.get(customer).copied().unwrap_or(0);
        let room = cap.emails.saturating_sub(used) as usize;
        let policies: Vec<RulePolicy> = idx
            .iter()
            .map(|&i| {
                rules.rule(outgoing[i].rule()).map_or(
                    RulePolicy {
                        priority: 0,
                        drop_when_capped: false,
                    },
                    |r| r.policy,
                )
            })
            .collect();
        for (&i, d) in idx.iter().zip(apply_cap(&policies, room)) {
            decisions.insert(i, d);
        }
    }
    let mut capped = Vec::new();
    let mut deferred = Vec::new();
    let reason = format!(
        "frequency cap: at most {} emails in {} days",
        cap.emails, cap.days
    );
    let mut i = 0;
    outgoing.retain_mut(|o| {
        let keep = match decisions.get(&i) {
            Some(CapDecision::Defer) => {
                capped.push(o.rule().to_owned());
                if let Outgoing::Action(a) = o {
                    deferred.push(Decision {
                        customer_id: a.customer_id.clone(),
                        rule: a.rule.clone(),
                        subject: format!("email {}", a.subject),
                        decision: "deferred".into(),
                        reason: format!("{reason}; planned again when there is room"),
                        dedup_key: a.dedup_key.clone(),
                    });
                }
                false
            }
            Some(CapDecision::Drop) => {
                capped.push(o.rule().to_owned());
                if let Outgoing::Action(a) = o {
                    a.dropped = Some(format!("dropped by the {reason}"));
                }
                true
            }
            _ => true,
        };
        i += 1;
        keep
    });
    Ok((capped, deferred))
}

/// Send windows: marketing emails planned while the customer's window is
/// closed wait until it opens. Returns the rule of each email that waits.
fn apply_send_window(
    window: crate::policy::SendWindow,
    fallback: chrono_tz::Tz,
    now: DateTime<Utc>,
    existing: &HashSet<String>,
    outgoing: &mut [Outgoing],
) -> Vec<Decision> {
    let mut waiting = Vec::new();
    for o in outgoing.iter_mut() {
        if let Outgoing::Action(a) = o
            && a.kind == OutboxKind::Email
            && a.dropped.is_none()
            && !existing.contains(&a.dedup_key)
        {
            let tz = a
                .customer_timezone
                .as_deref()
                .and_then(|t| t.parse().ok())
                .unwrap_or(fallback);
            if let Some(open) = window.next_open(now, tz) {
                a.not_before = Some(open);
                waiting.push(Decision {
                    customer_id: a.customer_id.clone(),
                    rule: a.rule.clone(),
                    subject: format!("email {}", a.subject),
                    decision: "outside window".into(),
                    reason: format!("planned outside the send window; waits until {open}"),
                    dedup_key: a.dedup_key.clone(),
                });
            }
        }
    }
    waiting
}

/// Removes new emails to suppressed addresses from the plan (checked again
/// right before sending); returns the decision for each one removed. (One
/// already in the ledger is deduplicated at commit, suppressed or not.)
async fn drop_suppressed(
    store: &dyn Store,
    existing: &HashSet<String>,
    outgoing: &mut Vec<Outgoing>,
) -> Result<Vec<Decision>, StoreError> {
    let email_of = |o: &Outgoing| match o {
        Outgoing::Action(a) if a.kind == OutboxKind::Email && !existing.contains(&a.dedup_key) => {
            a.customer_email.clone()
        }
        _ => None,
    };
    let emails: Vec<String> = outgoing.iter().filter_map(email_of).collect();
    if emails.is_empty() {
        return Ok(Vec::new());
    }
    let suppressed = store.suppressions_among(&emails).await?;
    if suppressed.is_empty() {
        return Ok(Vec::new());
    }
    let mut dropped = Vec::new();
    outgoing.retain(|o| match (o, email_of(o)) {
        (Outgoing::Action(a), Some(e)) if suppressed.contains_key(&e.to_lowercase()) => {
            dropped.push(Decision {
                customer_id: a.customer_id.clone(),
                rule: a.rule.clone(),
                subject: kind_label(o).1,
                decision: "suppressed".into(),
                reason: format!("{e} is suppressed ({})", suppressed[&e.to_lowercase()]),
                dedup_key: a.dedup_key.clone(),
            });
            false
        }
        _ => true,
    });
    Ok(dropped)
}

/// Fills `planned` / `deduplicated` and the action list for a dry run,
/// reading (never writing) the ledger.
async fn mark_dry_run_duplicates(
    store: &dyn Store,
    existing: &HashSet<String>,
    eval: &Evaluation,
    part: &mut PartitionSummary,
    dry: DryRun<'_>,
) -> Result<(), StoreError> {
    let limit = dry.would_limit;
    let pairs = escalation_pairs(&eval.outgoing);
    let open = store.open_escalation_pairs(&pairs).await?;
    let mut seen = std::collections::HashSet::new();
    for o in &eval.outgoing {
        let (dup, customer) = match o {
            Outgoing::Action(a) => (
                existing.contains(&a.dedup_key) || !seen.insert(a.dedup_key.clone()),
                &a.customer_id,
            ),
            Outgoing::Escalation(e) => (
                open.contains(&(e.customer_id.clone(), e.rule.clone())),
                &e.customer_id,
            ),
        };
        let s = part.rules.entry(o.rule().to_owned()).or_default();
        if dup {
            s.deduplicated += 1;
        } else {
            s.planned += 1;
        }
        *dry.would_total.get_or_insert(0) += 1;
        if limit.is_some_and(|n| dry.would.len() >= n) {
            continue;
        }
        let (kind, action) = kind_label(o);
        dry.would.push(WouldDo {
            customer_id: customer.to_string(),
            rule: o.rule().to_owned(),
            kind: kind.to_owned(),
            action,
            deduplicated: dup,
        });
    }
    Ok(())
}
