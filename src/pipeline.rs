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
    /// For `--dry-run`: what would happen (capped list).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub would: Vec<WouldDo>,
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

/// Evaluates every rule for every customer as of `now`. Rule errors are
/// collected, never fatal.
pub async fn evaluate(
    store: &dyn Store,
    rules: Arc<RuleSet>,
    only: Option<Arc<HashSet<String>>>,
    now: DateTime<Utc>,
    default_owner: &Email,
    progress: Option<&indicatif::ProgressBar>,
    cancel: Option<&CancellationToken>,
) -> Result<Evaluation, RunError> {
    let stopped = || cancel.is_some_and(|c| c.is_cancelled());
    let selected = rules
        .rules()
        .iter()
        .filter(|r| only.as_ref().is_none_or(|o| o.contains(&r.id)))
        .count() as u64;
    let started = Instant::now();
    let mut out = Evaluation::default();
    let mut after: Option<CustomerId> = None;
    let mut page = load_page(store, None, now).await?;
    while !page.is_empty() {
        if stopped() {
            return Err(RunError::Cancelled);
        }
        let loaded = page.len() as u64;
        after = page.last().map(|f| f.customer.id.clone()).or(after);
        let rules_for_page = Arc::clone(&rules);
        let only_for_page = only.clone();
        let owner = default_owner.clone();
        let cancel_page = cancel.cloned();
        // Customers who signed up after `now` did not exist yet: a replay of
        // the past must not welcome them.
        page.retain(|f| f.customer.created_at.is_none_or(|c| c <= now));
        // Evaluate this page on the rayon pool while the next page loads.
        let evaluating = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let results: Vec<(Vec<Outgoing>, Vec<RuleErrorRecord>)> = page
                .into_par_iter()
                .map(|facts| {
                    // A shutdown stops the page at once; the run is discarded.
                    if cancel_page.as_ref().is_some_and(|c| c.is_cancelled()) {
                        return (Vec::new(), Vec::new());
                    }
                    let facts = Arc::new(facts);
                    let mut outgoing = Vec::new();
                    let mut errors = Vec::new();
                    for (rule, result) in
                        rules_for_page.evaluate_selected(&facts, only_for_page.as_deref())
                    {
                        match result {
                            Ok(actions) => outgoing.extend(
                                actions.into_iter().map(|a| to_outgoing(a, &facts, &owner)),
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
                .collect();
            (results, started.elapsed().as_secs_f64())
        });
        let next = load_page(store, after.as_ref(), now).await?;
        let (results, rule_seconds) = evaluating.await.map_err(|e| StoreError::Corrupt {
            table: "evaluation",
            message: format!("evaluation task failed: {e}"),
        })?;
        if stopped() {
            return Err(RunError::Cancelled);
        }
        out.rule_seconds += rule_seconds;
        let n = results.len() as u64;
        out.customers += n;
        out.evaluations += n * selected;
        for (o, e) in results {
            out.outgoing.extend(o);
            out.errors.extend(e);
        }
        if let Some(p) = progress {
            p.inc(loaded);
        }
        page = next;
    }
    out.seconds = started.elapsed().as_secs_f64();
    Ok(out)
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

fn tally(
    rules: &RuleSet,
    only: Option<&HashSet<String>>,
    eval: &Evaluation,
) -> BTreeMap<String, RuleSummary> {
    let mut per_rule: BTreeMap<String, RuleSummary> = rules
        .rules()
        .iter()
        .filter(|r| only.is_none_or(|o| o.contains(&r.id)))
        .map(|r| (r.id.clone(), RuleSummary::default()))
        .collect();
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
    per_rule
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
    let eval = evaluate(
        &*store,
        Arc::clone(&rules),
        only.clone(),
        opts.now,
        default_owner,
        progress,
        opts.cancel.as_ref(),
    )
    .await?;
    let mut summary = RunSummary {
        dry_run: opts.dry_run,
        now: opts.now,
        customers: eval.customers,
        evaluations: eval.evaluations,
        evaluation_seconds: eval.seconds,
        rule_seconds: eval.rule_seconds,
        rules: tally(&rules, only.as_deref(), &eval),
        errors: eval
            .errors
            .iter()
            .take(MAX_ERRORS_IN_SUMMARY)
            .cloned()
            .collect(),
        ..Default::default()
    };

    let Some(Committed { outcome, .. }) = plan_and_commit(
        &store,
        &rules,
        default_owner,
        opts,
        eval,
        &mut summary,
        started_at,
    )
    .await?
    else {
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
    for (rule, counts) in &outcome.per_rule {
        let s = summary.rules.entry(rule.clone()).or_default();
        s.planned = counts.planned;
        s.deduplicated = counts.deduplicated;
    }
    tracing::info!(
        run = outcome.run_id,
        customers = summary.customers,
        "Run planned; delivering."
    );
    if let Some(d) = deliverer {
        summary.delivery = d.drain(opts.retry_window).await?;
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

/// What committing a plan did, and what it said about open escalations.
struct Committed {
    outcome: crate::store::CommitOutcome,
    /// (customer, rule) pairs that escalated again in this run.
    escalated: HashSet<(String, String)>,
    /// (customer, rule) pairs that could not be evaluated.
    errored: HashSet<(String, String)>,
}

/// Applies the policies to what the rules asked for and commits the plan;
/// `None` for a dry run. A real run holds the planner lock meanwhile, so the
/// ledger the policies read (caps, dedup, open escalations) is the one the
/// commit writes to, even with another run planning next door.
async fn plan_and_commit(
    store: &Arc<dyn Store>,
    rules: &RuleSet,
    default_owner: &Email,
    opts: &RunOptions,
    eval: Evaluation,
    summary: &mut RunSummary,
    started_at: DateTime<Utc>,
) -> Result<Option<Committed>, RunError> {
    let lock = if opts.dry_run {
        None
    } else {
        Some(PlannerLock::acquire(store, opts.cancel.as_ref()).await?)
    };
    let mut result = apply_policies_and_commit(
        &**store,
        rules,
        default_owner,
        opts,
        eval,
        summary,
        started_at,
    )
    .await;
    // Still under the lock: another run's new escalations must not be judged
    // by this run's (older) evaluation as recovered.
    if let Ok(Some(c)) = &result
        && let Err(e) = escalation_lifecycle(
            &**store,
            &opts.escalation,
            c.outcome.run_id,
            opts.now,
            summary.rules.keys().cloned().collect(),
            &c.escalated,
            &c.errored,
        )
        .await
    {
        result = Err(e);
    }
    if let Some(lock) = lock
        && let Err(e) = lock.release().await
    {
        // The plan is committed (or failed) either way; the lease frees the
        // lock by itself.
        tracing::warn!("Could not release the planner lock: {e}; it frees when its lease ends.");
    }
    Ok(result?)
}

async fn apply_policies_and_commit(
    store: &dyn Store,
    rules: &RuleSet,
    default_owner: &Email,
    opts: &RunOptions,
    mut eval: Evaluation,
    summary: &mut RunSummary,
    started_at: DateTime<Utc>,
) -> Result<Option<Committed>, StoreError> {
    // Keys already in the ledger: those actions are deduplicated, so only
    // the rest compete for the guard, the cap and the audit trail.
    let keys = action_keys(&eval.outgoing);
    let existing = store.existing_dedup_keys(&keys).await?;
    // An action asked for twice in one run (send_email in a loop, two rules
    // tagging alike) is one action: only its first request meets the
    // policies (a copy must not eat cap room or repeat a decision); the
    // copies rejoin the plan below, where committing counts them as
    // deduplicated, unless a policy removed the first.
    let copies = take_copies(&mut eval.outgoing);
    // The guard judges what each rule wants to send (before suppressions and
    // the cap trim it), so a bad edit cannot trickle out under the cap.
    let hold = guard_decision(&eval.outgoing, &existing, summary.customers, &opts.guard);
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
        let since = opts.now - chrono::Duration::days(1);
        let counts = store.owner_escalation_counts(since).await?;
        // Re-fires of escalations already open open nothing new: they do
        // not count against an owner's cap.
        let pairs = escalation_pairs(&eval.outgoing);
        let open = store.open_escalation_pairs(&pairs).await?;
        let resolved = store.resolved_escalation_reasons(&pairs).await?;
        overflow_owners(
            &mut eval.outgoing,
            &open,
            &resolved,
            counts,
            opts.escalation.owner_daily_cap,
            default_owner,
        );
    }
    let planned: HashSet<String> = action_keys(&eval.outgoing).into_iter().collect();
    eval.outgoing.extend(copies.into_iter().filter(|o| match o {
        Outgoing::Action(a) => planned.contains(&a.dedup_key),
        Outgoing::Escalation(_) => true,
    }));
    if opts.dry_run {
        mark_dry_run_duplicates(store, &existing, &eval, summary).await?;
        for rule in hold.keys() {
            let s = summary.rules.entry(rule.clone()).or_default();
            s.held = s.emails;
        }
        return Ok(None);
    }
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
        summary: serde_json::to_value(&summary).unwrap_or(Value::Null),
        hold,
        decisions,
        firing: opts.firing.clone(),
        ..Default::default()
    };
    for o in eval.outgoing {
        match o {
            Outgoing::Action(a) => commit.actions.push(a),
            Outgoing::Escalation(e) => commit.escalations.push(e),
        }
    }
    let outcome = store.commit_plan(commit).await?;
    Ok(Some(Committed {
        outcome,
        escalated,
        errored,
    }))
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

/// The blast-radius guard: rules whose new emails in this run would reach
/// more customers than `guard` allows, with the reason recorded on them.
pub(crate) fn guard_decision(
    outgoing: &[Outgoing],
    existing: &HashSet<String>,
    customers: u64,
    guard: &crate::policy::GuardConfig,
) -> BTreeMap<String, String> {
    let mut reached: BTreeMap<&str, HashSet<&CustomerId>> = BTreeMap::new();
    for a in new_emails(outgoing, existing) {
        reached
            .entry(a.rule.as_str())
            .or_default()
            .insert(&a.customer_id);
    }
    reached
        .into_iter()
        .filter(|(_, who)| guard.holds(who.len(), customers))
        .map(|(rule, who)| {
            (
                rule.to_owned(),
                format!(
                    "held by the blast-radius guard: {} of {customers} customers in one run",
                    who.len()
                ),
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
    mut counts: HashMap<String, u32>,
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

/// After a plan is committed: open escalations whose rule no longer fires
/// for the customer are marked recovered (not closed: a human decides), or
/// unmarked if it fires again; unacknowledged ones due a reminder get one
/// (to `escalation.lead` when set).
async fn escalation_lifecycle(
    store: &dyn Store,
    config: &crate::config::EscalationConfig,
    run_id: i64,
    now: DateTime<Utc>,
    evaluated_rules: HashSet<String>,
    escalated: &HashSet<(String, String)>,
    errored: &HashSet<(String, String)>,
) -> Result<(), StoreError> {
    let open = store.escalations(true).await?;
    let (mut recovered, mut relapsed) = (Vec::new(), Vec::new());
    for e in &open {
        if !evaluated_rules.contains(&e.rule) {
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
    store.set_recovered(&relapsed, false, now).await?;
    if config.renotify_days > 0 {
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
