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
use serde::Serialize;
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
    Decision, HistoryEvent, NewAction, NewEscalation, PlanCommit, RuleErrorRecord, Store,
    StoreError,
};
use tokio_util::sync::CancellationToken;

/// Customers evaluated per page.
const PAGE: usize = 2_000;
/// Rule errors kept in a summary (all are stored with the run).
const MAX_ERRORS_IN_SUMMARY: usize = 50;

/// Per-rule counts in a run summary.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
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
#[derive(Clone, Debug, Default, Serialize)]
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
    /// Where the run's time went, in seconds (wall time of each phase).
    pub phases: Phases,
}

/// Wall time of a run's phases, in seconds. Loading overlaps evaluation
/// (the next page loads while this one evaluates), so `load` counts only
/// the time spent waiting for data.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Phases {
    pub load: f64,
    pub evaluate: f64,
    pub dedup: f64,
    pub policies: f64,
    pub commit: f64,
    pub deliver: f64,
}

/// One line of a dry run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
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

/// Turns one planned action into what the store keeps. Pure.
pub fn to_outgoing(action: PlannedAction, facts: &Facts, default_owner: &Email) -> Outgoing {
    let customer = facts.customer.clone();
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
    match kind {
        ActionRequest::Email {
            template,
            key: k,
            vars,
        } => action(
            OutboxKind::Email,
            format!("{template} (key {k})"),
            serde_json::to_string(&EmailPayload {
                template: template.clone(),
                key: k.clone(),
                vars,
                customer,
            }),
        ),
        ActionRequest::Tag { name } => action(
            OutboxKind::Tag,
            name.clone(),
            Ok(json!({ "name": name }).to_string()),
        ),
        ActionRequest::Webhook { name, payload } => action(
            OutboxKind::Webhook,
            name.clone(),
            serde_json::to_string(&WebhookPayload {
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
            let notice = serde_json::to_value(EscalationPayload {
                escalation_id: 0,
                rule: rule.clone(),
                reason: reason.clone(),
                owner: owner.clone(),
                customer,
                facts: facts.summary(),
                reminder: 0,
                overflow: None,
            })
            .unwrap_or(Value::Null);
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

/// Loads the facts of one page of customers.
async fn load_page(
    store: &dyn Store,
    after: Option<&CustomerId>,
    now: DateTime<Utc>,
) -> Result<Vec<Facts>, StoreError> {
    let customers = store.customers_page(after, PAGE).await?;
    let (Some(first), Some(last)) = (customers.first(), customers.last()) else {
        return Ok(Vec::new());
    };
    let mut histories: HashMap<CustomerId, Vec<HistoryEvent>> = store
        .histories_in_id_range(&first.id, &last.id, now)
        .await?
        .into_iter()
        .collect();
    let mut tags: HashMap<CustomerId, Vec<String>> = HashMap::new();
    for (id, tag) in store.tags_in_id_range(&first.id, &last.id).await? {
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
                            .map(|a| to_outgoing(a, &facts, default_owner)),
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

/// One page of customers (ids `first..=last`), evaluated.
pub struct EvaluatedPage {
    pub first: CustomerId,
    pub last: CustomerId,
    pub eval: Evaluation,
}

/// The customer base, evaluated a page at a time: the next page loads while
/// this one evaluates on the rayon pool, and only one page's facts and plan
/// are held at once.
pub struct Pages<'a> {
    store: &'a dyn Store,
    rules: Arc<RuleSet>,
    only: Option<Arc<HashSet<String>>>,
    now: DateTime<Utc>,
    default_owner: Email,
    progress: Option<&'a indicatif::ProgressBar>,
    cancel: Option<&'a CancellationToken>,
    selected: u64,
    /// The next page, loaded but not evaluated; `None` before the first load.
    loaded: Option<Vec<Facts>>,
}

impl<'a> Pages<'a> {
    pub fn new(
        store: &'a dyn Store,
        rules: Arc<RuleSet>,
        only: Option<Arc<HashSet<String>>>,
        now: DateTime<Utc>,
        default_owner: &Email,
        progress: Option<&'a indicatif::ProgressBar>,
        cancel: Option<&'a CancellationToken>,
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
            loaded: None,
        }
    }

    fn stopped(&self) -> bool {
        self.cancel.is_some_and(|c| c.is_cancelled())
    }

    /// Evaluates the next page; `None` after the last. Rule errors are
    /// collected, never fatal; a cancelled run stops at once.
    pub async fn next(&mut self) -> Result<Option<EvaluatedPage>, RunError> {
        let first_load = Instant::now();
        let mut page = match self.loaded.take() {
            Some(page) => page,
            None => load_page(self.store, None, self.now).await?,
        };
        let first_load = first_load.elapsed().as_secs_f64();
        if self.stopped() {
            return Err(RunError::Cancelled);
        }
        let (Some(first), Some(last)) = (
            page.first().map(|f| f.customer.id.clone()),
            page.last().map(|f| f.customer.id.clone()),
        ) else {
            self.loaded = Some(page);
            return Ok(None);
        };
        let loaded = page.len() as u64;
        let rules = Arc::clone(&self.rules);
        let only = self.only.clone();
        let owner = self.default_owner.clone();
        let cancel = self.cancel.cloned();
        let now = self.now;
        // Customers who signed up after `now` did not exist yet: a replay of
        // the past must not welcome them.
        page.retain(|f| f.customer.created_at.is_none_or(|c| c <= now));
        let evaluating = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let results = evaluate_page(&rules, only.as_deref(), page, &owner, cancel.as_ref());
            (results, started.elapsed().as_secs_f64())
        });
        let started = Instant::now();
        self.loaded = Some(load_page(self.store, Some(&last), self.now).await?);
        let loading = started.elapsed().as_secs_f64();
        let (results, rule_seconds) = evaluating.await.map_err(|e| StoreError::Corrupt {
            table: "evaluation",
            message: format!("evaluation task failed: {e}"),
        })?;
        if self.stopped() {
            return Err(RunError::Cancelled);
        }
        let n = results.len() as u64;
        let mut eval = Evaluation {
            customers: n,
            evaluations: n * self.selected,
            rule_seconds,
            // The next page loaded while this one evaluated: only the part
            // of loading that outlasted the rules was waited for.
            load_seconds: first_load + (loading - rule_seconds).max(0.0),
            seconds: started.elapsed().as_secs_f64(),
            ..Default::default()
        };
        for (o, e) in results {
            eval.outgoing.extend(o);
            eval.errors.extend(e);
        }
        if let Some(p) = self.progress {
            p.inc(loaded);
        }
        Ok(Some(EvaluatedPage { first, last, eval }))
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
    pub policy: crate::policy::PolicyConfig,
    pub guard: crate::policy::GuardConfig,
    pub escalation: crate::config::EscalationConfig,
    /// The schedule firing this run is for; the commit marks it done.
    pub firing: Option<crate::store::Firing>,
    /// Cancelled by a shutdown: evaluation stops at once (before the
    /// commit, nothing of the run is stored).
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

/// Evaluates, plans and (unless dry) commits and delivers.
///
/// The customer base goes through in pages (partitions): each is evaluated,
/// deduplicated against the ledger, passed through the policies and
/// committed, then let go, so a run's memory does not grow with the base.
/// What needs the whole run is kept as counters: the blast-radius guard's
/// customers per rule, owners' escalations today. A partition's new emails
/// are committed `staged` and only become deliverable when the run's guard
/// decision is made at its end (or are held by it). A real run holds the
/// planner lock throughout, so the ledger the policies read is the one its
/// commits write, even with another run next door.
pub async fn run(
    store: Arc<dyn Store>,
    rules: Arc<RuleSet>,
    deliverer: Option<&Deliverer>,
    default_owner: &Email,
    opts: &RunOptions,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<RunSummary, RunError> {
    let started_at = Utc::now();
    let only: Option<Arc<HashSet<String>>> = opts
        .only_rules
        .as_ref()
        .map(|r| Arc::new(r.iter().cloned().collect()));
    let mut summary = RunSummary {
        dry_run: opts.dry_run,
        now: opts.now,
        rules: rules
            .rules()
            .iter()
            .filter(|r| only.as_ref().is_none_or(|o| o.contains(&r.id)))
            .map(|r| (r.id.clone(), RuleSummary::default()))
            .collect(),
        ..Default::default()
    };
    let lock = if opts.dry_run {
        None
    } else {
        Some(PlannerLock::acquire(&store, opts.cancel.as_ref()).await?)
    };
    let planned = plan_in_partitions(
        &store,
        &rules,
        only,
        default_owner,
        opts,
        progress,
        &mut summary,
        started_at,
    )
    .await;
    if let Some(lock) = lock
        && let Err(e) = lock.release().await
    {
        // The plan is committed (or failed) either way; the lease frees the
        // lock by itself.
        tracing::warn!("Could not release the planner lock: {e}; it frees when its lease ends.");
    }
    let Some(outcome) = planned? else {
        return Ok(summary);
    };
    summary.run_id = Some(outcome.run_id);
    for (rule, n) in &outcome.held {
        summary.rules.entry(rule.clone()).or_default().held = *n;
        tracing::warn!(
            run = outcome.run_id,
            rule,
            emails = n,
            customers = summary.customers,
            "The blast-radius guard held this rule's emails; approve with `engaged runs approve {} --rule {rule}`.",
            outcome.run_id
        );
    }
    tracing::info!(
        run = outcome.run_id,
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
            outcome.run_id,
            status,
            &serde_json::to_value(&summary).unwrap_or(Value::Null),
        )
        .await?;
    Ok(summary)
}

/// What planning a whole run committed.
struct Planned {
    run_id: i64,
    /// Rules whose emails the guard held, with how many.
    held: BTreeMap<String, usize>,
}

/// What one run keeps across its partitions: counters, never actions.
struct RunCounters {
    /// Distinct customers each rule asked to email anew (the guard's count).
    reach: BTreeMap<String, usize>,
    /// Escalations each owner got in the last day, this run's included.
    owners: HashMap<String, u32>,
}

/// Evaluates and plans a run page by page; `None` for a dry run.
#[allow(clippy::too_many_arguments)]
async fn plan_in_partitions(
    store: &Arc<dyn Store>,
    rules: &Arc<RuleSet>,
    only: Option<Arc<HashSet<String>>>,
    default_owner: &Email,
    opts: &RunOptions,
    progress: Option<&indicatif::ProgressBar>,
    summary: &mut RunSummary,
    started_at: DateTime<Utc>,
) -> Result<Option<Planned>, RunError> {
    let run_id = if opts.dry_run {
        None
    } else {
        // Under the planner lock: a run still planning is one whose planner
        // died; its staged emails go (never sent), the rest of it stays.
        let abandoned = store.abandon_unfinished_runs(Utc::now()).await?;
        if abandoned > 0 {
            tracing::warn!(
                runs = abandoned,
                "A run that stopped mid-plan was abandoned; its staged emails are planned afresh."
            );
        }
        Some(store.begin_run(&opts.trigger, opts.now, started_at).await?)
    };
    let mut counters = RunCounters {
        reach: BTreeMap::new(),
        owners: if opts.escalation.owner_daily_cap > 0 {
            store
                .owner_escalation_counts(opts.now - chrono::Duration::days(1))
                .await?
        } else {
            HashMap::new()
        },
    };
    let started = Instant::now();
    let total = match run_id {
        Some(_) => store.customer_count().await?,
        None => 0,
    };
    let mut pages = Pages::new(
        &**store,
        Arc::clone(rules),
        only,
        opts.now,
        default_owner,
        progress,
        opts.cancel.as_ref(),
    );
    while let Some(page) = pages.next().await? {
        summary.customers += page.eval.customers;
        summary.evaluations += page.eval.evaluations;
        summary.rule_seconds += page.eval.rule_seconds;
        summary.phases.load += page.eval.load_seconds;
        summary.phases.evaluate += page.eval.rule_seconds;
        tally(&page.eval, &mut summary.rules);
        let room = MAX_ERRORS_IN_SUMMARY.saturating_sub(summary.errors.len());
        summary
            .errors
            .extend(page.eval.errors.iter().take(room).cloned());
        plan_partition(
            &**store,
            rules,
            default_owner,
            opts,
            page,
            summary,
            &mut counters,
            run_id,
            started_at,
        )
        .await?;
        if let Some(id) = run_id {
            // `engaged runs` shows how far a run got while it goes.
            let progress = json!({"progress": {"customers": summary.customers, "of": total}});
            store.record_progress(id, &progress).await?;
        }
    }
    summary.evaluation_seconds = started.elapsed().as_secs_f64();
    let hold = guard_holds(&counters.reach, summary.customers, &opts.guard);
    let Some(run_id) = run_id else {
        for rule in hold.keys() {
            let s = summary.rules.entry(rule.clone()).or_default();
            s.held = s.emails;
        }
        return Ok(None);
    };
    let held = store
        .finish_plan(
            run_id,
            &hold,
            &serde_json::to_value(&*summary).unwrap_or(Value::Null),
            opts.firing.as_ref(),
        )
        .await?;
    renotify(&**store, &opts.escalation, run_id, opts.now).await?;
    Ok(Some(Planned { run_id, held }))
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

/// One partition of a run: dedup against the ledger, the policies, the
/// commit (unless dry), and what the run says about the open escalations of
/// the partition's customers.
#[allow(clippy::too_many_arguments)]
async fn plan_partition(
    store: &dyn Store,
    rules: &RuleSet,
    default_owner: &Email,
    opts: &RunOptions,
    page: EvaluatedPage,
    summary: &mut RunSummary,
    counters: &mut RunCounters,
    run_id: Option<i64>,
    started_at: DateTime<Utc>,
) -> Result<(), StoreError> {
    let EvaluatedPage {
        first,
        last,
        mut eval,
    } = page;
    // Keys already in the ledger: those actions are deduplicated, so only
    // the rest compete for the guard, the cap and the audit trail.
    let started = Instant::now();
    let keys = action_keys(&eval.outgoing);
    let existing = store.existing_dedup_keys(&keys).await?;
    summary.phases.dedup += started.elapsed().as_secs_f64();
    let started = Instant::now();
    // An action asked for twice in one run (send_email in a loop, two rules
    // tagging alike) is one action: only its first request meets the
    // policies (a copy must not eat cap room or repeat a decision); the
    // copies rejoin the plan below, where committing counts them as
    // deduplicated, unless a policy removed the first.
    let copies = take_copies(&mut eval.outgoing);
    // The guard judges what each rule wants to send (before suppressions and
    // the cap trim it), so a bad edit cannot trickle out under the cap. A
    // customer is in one partition only, so the counts add up.
    for (rule, n) in guard_reach(&eval.outgoing, &existing) {
        *counters.reach.entry(rule).or_default() += n;
    }
    let mut decisions = drop_suppressed(store, &existing, &mut eval.outgoing).await?;
    for d in &decisions {
        summary.rules.entry(d.rule.clone()).or_default().suppressed += 1;
    }
    if let Some(cap) = opts.policy.frequency_cap {
        let (capped, deferred) =
            apply_frequency_cap(store, rules, &existing, cap, opts.now, &mut eval.outgoing).await?;
        for rule in capped {
            summary.rules.entry(rule).or_default().capped += 1;
        }
        decisions.extend(deferred);
    }
    if let Some(window) = opts.policy.window().ok().flatten() {
        let fallback = opts.policy.default_tz().unwrap_or(chrono_tz::UTC);
        for d in apply_send_window(window, fallback, opts.now, &existing, &mut eval.outgoing) {
            summary
                .rules
                .entry(d.rule.clone())
                .or_default()
                .waiting_for_window += 1;
            decisions.push(d);
        }
    }
    if opts.escalation.owner_daily_cap > 0 {
        // Re-fires of escalations already open open nothing new: they do
        // not count against an owner's cap.
        let pairs = escalation_pairs(&eval.outgoing);
        let open = store.open_escalation_pairs(&pairs).await?;
        let resolved = store.resolved_escalation_reasons(&pairs).await?;
        overflow_owners(
            &mut eval.outgoing,
            &open,
            &resolved,
            &mut counters.owners,
            opts.escalation.owner_daily_cap,
            default_owner,
        );
    }
    let planned: HashSet<String> = action_keys(&eval.outgoing).into_iter().collect();
    eval.outgoing.extend(copies.into_iter().filter(|o| match o {
        Outgoing::Action(a) => planned.contains(&a.dedup_key),
        Outgoing::Escalation(_) => true,
    }));
    let Some(run_id) = run_id else {
        mark_dry_run_duplicates(store, &existing, &eval, summary, opts.would_limit).await?;
        summary.phases.policies += started.elapsed().as_secs_f64();
        return Ok(());
    };
    summary.phases.policies += started.elapsed().as_secs_f64();
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
    let mut commit = PlanCommit {
        trigger: opts.trigger.clone(),
        now: opts.now,
        started_at,
        errors: eval.errors,
        decisions,
        partition_of: Some(run_id),
        ..Default::default()
    };
    for o in eval.outgoing {
        match o {
            Outgoing::Action(a) => commit.actions.push(a),
            Outgoing::Escalation(e) => commit.escalations.push(e),
        }
    }
    let outcome = store.commit_plan(commit).await?;
    for (rule, counts) in &outcome.per_rule {
        let s = summary.rules.entry(rule.clone()).or_default();
        s.planned += counts.planned;
        s.deduplicated += counts.deduplicated;
    }
    // Still under the lock: another run's new escalations must not be judged
    // by this run's (older) evaluation as recovered.
    let open = store.open_escalations_in_id_range(&first, &last).await?;
    let evaluated: HashSet<&str> = summary.rules.keys().map(String::as_str).collect();
    mark_recovered(store, &open, &evaluated, &escalated, &errored, opts.now).await?;
    summary.phases.commit += started.elapsed().as_secs_f64();
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
    summary: &mut RunSummary,
    limit: Option<usize>,
) -> Result<(), StoreError> {
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
        let s = summary.rules.entry(o.rule().to_owned()).or_default();
        if dup {
            s.deduplicated += 1;
        } else {
            s.planned += 1;
        }
        *summary.would_total.get_or_insert(0) += 1;
        if limit.is_some_and(|n| summary.would.len() >= n) {
            continue;
        }
        let (kind, action) = kind_label(o);
        summary.would.push(WouldDo {
            customer_id: customer.to_string(),
            rule: o.rule().to_owned(),
            kind: kind.to_owned(),
            action,
            deduplicated: dup,
        });
    }
    Ok(())
}
