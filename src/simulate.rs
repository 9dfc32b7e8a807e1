//! `engaged simulate`: moves a virtual clock through the next N days at the
//! schedules' fire times, evaluates the rules with dedup and the policies,
//! treats what it planned as sent, and reports a calendar. It reads the
//! database and writes nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use crate::config::Config;
use crate::domain::{CustomerId, Email};
use crate::engine::RuleSet;
use crate::facts::Facts;
use crate::pipeline::{
    Outgoing, action_keys, evaluate, guard_decision, kind_label, overflow_owners, to_outgoing,
};
use crate::plan::OutboxKind;
use crate::policy::{CapDecision, RulePolicy, apply_cap};
use crate::schedule::Schedule;
use crate::store::{Store, StoreError};

/// One simulated happening.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Happening {
    pub at: DateTime<Utc>,
    pub schedule: String,
    pub customer_id: String,
    pub rule: String,
    /// `email`, `escalation`, `tag`, `webhook`.
    pub kind: String,
    pub what: String,
    /// For escalations: who gets it.
    pub owner: Option<String>,
    /// For emails held back by the send window: when it would go out.
    pub goes_out_at: Option<DateTime<Utc>>,
    /// What a policy did to it (held by the guard, sent to the default
    /// owner because the owner's daily cap was reached).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A fire time, the schedule's name and its rule subset.
pub type FireTime = (DateTime<Utc>, String, Option<Vec<String>>);

/// Fire times in (from, to], per schedule (all rules daily at 02:00 UTC when
/// no schedule is configured).
pub fn fire_times(
    config: &Config,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<FireTime>, String> {
    let mut schedules: Vec<Schedule> = config
        .schedules
        .iter()
        .map(Schedule::parse)
        .collect::<Result<_, _>>()?;
    if schedules.is_empty() {
        schedules.push(Schedule::parse(&crate::config::ScheduleConfig {
            name: "nightly (default)".into(),
            cron: "0 2 * * *".into(),
            timezone: "UTC".into(),
            rules: None,
            missed: Default::default(),
            grace_minutes: 0,
        })?);
    }
    let mut times = Vec::new();
    for s in &schedules {
        let mut t = from;
        while let Some(next) = s.next_after(t) {
            if next > to || times.len() > 10_000 {
                break;
            }
            times.push((next, s.name.clone(), s.rules.clone()));
            t = next;
        }
    }
    times.sort_by_key(|(t, ..)| *t);
    Ok(times)
}

/// A rule error met during the simulation (the first time for each rule,
/// customer and message).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SimulatedError {
    pub at: DateTime<Utc>,
    pub rule: String,
    pub customer_id: String,
    pub message: String,
}

/// What a simulation found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Simulation {
    pub happenings: Vec<Happening>,
    pub errors: Vec<SimulatedError>,
}

/// The simulated ledger: what the database already holds plus what the
/// simulation "sent".
struct Ledger {
    keys: HashSet<String>,
    open: HashSet<(String, String)>,
    /// A resolved escalation is not reopened for the same reason.
    resolved: HashSet<(CustomerId, String, String)>,
    emails: HashMap<String, Vec<DateTime<Utc>>>,
    tags: HashMap<String, Vec<String>>,
    /// Escalations opened by the simulation: owner and when.
    escalations: Vec<(String, DateTime<Utc>)>,
    /// Errors already reported.
    errors: HashSet<(String, String, String)>,
}

/// One fire time's evaluation: what the rules asked for, how many customers
/// were evaluated, and the rule errors.
struct Firing {
    outgoing: Vec<Outgoing>,
    customers: u64,
    errors: Vec<crate::store::RuleErrorRecord>,
}

/// Runs the simulation for one customer (`Some`) or everyone.
pub async fn simulate(
    store: &dyn Store,
    config: &Config,
    rules: Arc<RuleSet>,
    customer: Option<&CustomerId>,
    from: DateTime<Utc>,
    days: u32,
) -> Result<Simulation, StoreError> {
    let default_owner = Email::parse(&config.escalation.default_owner)
        .unwrap_or_else(|_| Email::parse("success@engaged.example").expect("a valid address"));
    let times = fire_times(config, from, from + Duration::days(i64::from(days))).map_err(|e| {
        StoreError::Corrupt {
            table: "config",
            message: e,
        }
    })?;
    let all = store.escalations(false).await?;
    let mut ledger = Ledger {
        keys: HashSet::new(),
        open: all
            .iter()
            .filter(|e| e.status == "open" || e.status == "acknowledged")
            .map(|e| (e.customer_id.clone(), e.rule.clone()))
            .collect(),
        resolved: all
            .into_iter()
            .filter(|e| e.status == "resolved")
            .filter_map(|e| Some((CustomerId::parse(&e.customer_id).ok()?, e.rule, e.reason)))
            .collect(),
        emails: HashMap::new(),
        tags: HashMap::new(),
        escalations: Vec::new(),
        errors: HashSet::new(),
    };
    let mut sim = Simulation::default();
    for (at, schedule, only) in times {
        let only_set: Option<HashSet<String>> = only.map(|r| r.into_iter().collect());
        let firing = match customer {
            Some(id) => {
                one_customer(
                    store,
                    &rules,
                    only_set.as_ref(),
                    id,
                    at,
                    &default_owner,
                    &ledger,
                )
                .await?
            }
            None => {
                let eval = evaluate(
                    store,
                    Arc::clone(&rules),
                    only_set.map(Arc::new),
                    at,
                    &default_owner,
                    None,
                    None,
                )
                .await
                .map_err(|e| match e {
                    crate::pipeline::RunError::Store(e) => e,
                    // Nothing cancels a simulation (it passes no token).
                    crate::pipeline::RunError::Cancelled => StoreError::Corrupt {
                        table: "simulation",
                        message: "cancelled".into(),
                    },
                })?;
                Firing {
                    outgoing: eval.outgoing,
                    customers: eval.customers,
                    errors: eval.errors,
                }
            }
        };
        for e in &firing.errors {
            let id = (e.rule.clone(), e.customer_id.to_string(), e.message.clone());
            if ledger.errors.insert(id) {
                sim.errors.push(SimulatedError {
                    at,
                    rule: e.rule.clone(),
                    customer_id: e.customer_id.to_string(),
                    message: e.message.clone(),
                });
            }
        }
        let judge_guard = customer.is_none();
        apply_policies(
            store,
            config,
            &rules,
            &default_owner,
            &mut ledger,
            (at, &schedule),
            firing,
            judge_guard,
            &mut sim.happenings,
        )
        .await?;
    }
    Ok(sim)
}

/// What a run at `at` would do with what the rules asked for: dedup,
/// suppression, the blast-radius guard (judged on everyone, so only with
/// `--all`), the frequency cap, the send window and owners' daily caps. What
/// it would send is added to the ledger as sent.
#[allow(clippy::too_many_arguments)]
async fn apply_policies(
    store: &dyn Store,
    config: &Config,
    rules: &RuleSet,
    default_owner: &Email,
    ledger: &mut Ledger,
    (at, schedule): (DateTime<Utc>, &str),
    firing: Firing,
    judge_guard: bool,
    out: &mut Vec<Happening>,
) -> Result<(), StoreError> {
    let mut outgoing = firing.outgoing;
    let keys = action_keys(&outgoing);
    let mut existing = store.existing_dedup_keys(&keys).await?;
    existing.extend(
        keys.into_iter()
            .filter(|k| ledger.keys.contains(k))
            .collect::<Vec<_>>(),
    );
    let held = if judge_guard {
        guard_decision(&outgoing, &existing, firing.customers, &config.guard)
    } else {
        BTreeMap::new()
    };
    if config.escalation.owner_daily_cap > 0 {
        let since = at - Duration::days(1);
        let mut counts = store.owner_escalation_counts(since).await?;
        for (owner, t) in &ledger.escalations {
            if *t >= since {
                *counts.entry(owner.clone()).or_default() += 1;
            }
        }
        let open: HashSet<(CustomerId, String)> = ledger
            .open
            .iter()
            .filter_map(|(c, r)| Some((CustomerId::parse(c).ok()?, r.clone())))
            .collect();
        overflow_owners(
            &mut outgoing,
            &open,
            &ledger.resolved,
            &mut counts,
            config.escalation.owner_daily_cap,
            default_owner,
        );
    }
    let emails: Vec<String> = outgoing
        .iter()
        .filter_map(|o| match o {
            Outgoing::Action(a) if a.kind == OutboxKind::Email => a.customer_email.clone(),
            _ => None,
        })
        .collect();
    let suppressed = store.suppressions_among(&emails).await?;
    // New emails per customer, for the frequency cap.
    let mut candidates: BTreeMap<String, Vec<&Outgoing>> = BTreeMap::new();
    for o in &outgoing {
        match o {
            Outgoing::Action(a) => {
                if existing.contains(&a.dedup_key) {
                    continue;
                }
                if a.kind == OutboxKind::Email {
                    let address = a.customer_email.clone().unwrap_or_default().to_lowercase();
                    if suppressed.contains_key(&address) {
                        continue;
                    }
                    candidates
                        .entry(a.customer_id.to_string())
                        .or_default()
                        .push(o);
                    continue;
                }
                ledger.keys.insert(a.dedup_key.clone());
                if a.kind == OutboxKind::Tag {
                    ledger
                        .tags
                        .entry(a.customer_id.to_string())
                        .or_default()
                        .push(a.subject.clone());
                }
                out.push(happening(at, schedule, o, None));
            }
            Outgoing::Escalation(e) => {
                let was_resolved = ledger.resolved.contains(&(
                    e.customer_id.clone(),
                    e.rule.clone(),
                    e.reason.clone(),
                ));
                let pair = (e.customer_id.to_string(), e.rule.clone());
                if !was_resolved && ledger.open.insert(pair) {
                    ledger.escalations.push((e.owner.clone(), at));
                    let mut h = happening(at, schedule, o, None);
                    h.note = e
                        .notice
                        .get("overflow")
                        .and_then(|v| v.as_str())
                        .map(|why| format!("to the default owner: {why}"));
                    out.push(h);
                }
            }
        }
    }
    let window = config.policy.window().ok().flatten();
    let fallback_tz = config.policy.default_tz().unwrap_or(chrono_tz::UTC);
    for (customer_id, list) in candidates {
        let room = match config.policy.frequency_cap {
            None => usize::MAX,
            Some(cap) => {
                let since = at - Duration::days(i64::from(cap.days));
                let recent = store
                    .recent_email_counts(
                        &[CustomerId::parse(&customer_id).unwrap_or_default()],
                        since,
                    )
                    .await?
                    .values()
                    .sum::<u32>() as usize;
                let simulated = ledger
                    .emails
                    .get(&customer_id)
                    .map_or(0, |v| v.iter().filter(|t| **t >= since).count());
                (cap.emails as usize).saturating_sub(recent + simulated)
            }
        };
        let policies: Vec<RulePolicy> = list
            .iter()
            .map(|o| {
                rules.rule(o.rule()).map_or(
                    RulePolicy {
                        priority: 0,
                        drop_when_capped: false,
                    },
                    |r| r.policy,
                )
            })
            .collect();
        for (o, decision) in list.iter().zip(apply_cap(&policies, room)) {
            let Outgoing::Action(a) = o else { continue };
            match decision {
                CapDecision::Allow => {
                    ledger.keys.insert(a.dedup_key.clone());
                    ledger
                        .emails
                        .entry(customer_id.clone())
                        .or_default()
                        .push(at);
                    let tz = a
                        .customer_timezone
                        .as_deref()
                        .and_then(|t| t.parse().ok())
                        .unwrap_or(fallback_tz);
                    // Held emails take their place under the cap too (as the
                    // store counts them), but wait for an approval.
                    match held.get(&a.rule) {
                        Some(reason) => {
                            let mut h = happening(at, schedule, o, None);
                            h.note = Some(format!("{reason}; sent only if approved"));
                            out.push(h);
                        }
                        None => {
                            let goes_out = window.and_then(|w| w.next_open(at, tz));
                            out.push(happening(at, schedule, o, goes_out));
                        }
                    }
                }
                CapDecision::Drop => {
                    ledger.keys.insert(a.dedup_key.clone());
                }
                CapDecision::Defer => {}
            }
        }
    }
    Ok(())
}

fn happening(
    at: DateTime<Utc>,
    schedule: &str,
    o: &Outgoing,
    goes_out_at: Option<DateTime<Utc>>,
) -> Happening {
    let (kind, what) = kind_label(o);
    let (customer_id, owner) = match o {
        Outgoing::Action(a) => (a.customer_id.to_string(), None),
        Outgoing::Escalation(e) => (e.customer_id.to_string(), Some(e.owner.clone())),
    };
    Happening {
        at,
        schedule: schedule.to_owned(),
        customer_id,
        rule: o.rule().to_owned(),
        kind: kind.to_owned(),
        what,
        owner,
        goes_out_at,
        note: None,
    }
}

async fn one_customer(
    store: &dyn Store,
    rules: &RuleSet,
    only: Option<&HashSet<String>>,
    id: &CustomerId,
    at: DateTime<Utc>,
    default_owner: &Email,
    ledger: &Ledger,
) -> Result<Firing, StoreError> {
    let nothing = Firing {
        outgoing: Vec::new(),
        customers: 0,
        errors: Vec::new(),
    };
    let Some(customer) = store.customer(id).await? else {
        return Ok(nothing);
    };
    if customer.created_at.is_some_and(|c| c > at) {
        return Ok(nothing);
    }
    let events = store.events_in_id_range(id, id, at).await?;
    let mut tags: Vec<String> = store
        .tags_in_id_range(id, id)
        .await?
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    tags.extend(ledger.tags.get(id.as_str()).cloned().unwrap_or_default());
    let facts = Arc::new(Facts::new(customer, events, tags, at));
    let mut firing = Firing {
        customers: 1,
        ..nothing
    };
    for (rule, result) in rules.evaluate_selected(&facts, only) {
        match result {
            Ok(actions) => firing.outgoing.extend(
                actions
                    .into_iter()
                    .map(|a| to_outgoing(a, &facts, default_owner)),
            ),
            Err(e) => firing.errors.push(crate::store::RuleErrorRecord {
                rule: rule.id.clone(),
                customer_id: id.clone(),
                message: e.to_string(),
            }),
        }
    }
    Ok(firing)
}
