//! `engaged simulate`: moves a virtual clock through the next N days at the
//! schedules' fire times, evaluates the rules with dedup and the policies,
//! treats what it planned as sent, and reports a calendar. It reads the
//! database and writes nothing.
//!
//! The customer base is simulated a page at a time: each page of customers
//! goes through every fire time (its simulated ledger, what it "sent", is
//! its own, since every dedup key, escalation and cap belongs to one
//! customer), then is let go. What needs the whole base is kept as counters
//! per fire time and decided at the end: the blast-radius guard's reach per
//! rule, and owners' daily escalation caps (overflow changes only who gets
//! an escalation, never what a later evaluation sees, so it can be settled
//! afterwards, in the order a run would meet them). Memory follows the page,
//! not the base: `--all` lists the first [`SAMPLE`] happenings and counts
//! the rest.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use crate::config::Config;
use crate::domain::{Customer, CustomerId, Email};
use crate::engine::RuleSet;
use crate::facts::Facts;
use crate::pipeline::{Outgoing, action_keys, evaluate_page, guard_holds, kind_label};
use crate::plan::OutboxKind;
use crate::policy::{CapDecision, RulePolicy, apply_cap};
use crate::schedule::Schedule;
use crate::store::{HistoryEvent, RuleErrorRecord, Store, StoreError};

/// Customers simulated together.
const PAGE: usize = 2_000;
/// Happenings and rule errors `--all` lists (all are counted).
pub const SAMPLE: usize = 1_000;

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
            customers: Default::default(),
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

/// One day's totals over everyone (by fire time, UTC).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DayTotals {
    pub day: String,
    pub emails: u64,
    /// Emails the blast-radius guard would hold until approved.
    pub held: u64,
    pub escalations: u64,
    pub tags: u64,
    pub webhooks: u64,
}

/// What a simulation found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Simulation {
    /// In time order: every happening for one customer; with `--all`, those
    /// of the first customers, up to [`SAMPLE`].
    pub happenings: Vec<Happening>,
    pub happenings_total: u64,
    /// Everyone's happenings per day.
    pub days: Vec<DayTotals>,
    /// Escalations per owner (after daily-cap overflow): the CSM workload.
    pub owners: BTreeMap<String, u64>,
    /// The first time each rule failed for each customer with a message, up
    /// to [`SAMPLE`]; `errors_total` counts them all.
    pub errors: Vec<SimulatedError>,
    pub errors_total: u64,
}

/// Counters over the whole base, per fire time, and the listed sample.
struct Tally {
    /// Whether the guard is judged (everyone; not for one customer).
    judge_guard: bool,
    sample_limit: usize,
    sample: Vec<Sampled>,
    happenings: u64,
    errors: Vec<SimulatedError>,
    errors_total: u64,
    /// Per fire time: customers evaluated.
    customers: Vec<u64>,
    /// Per fire time and rule: customers with a new email (the guard's reach).
    reach: Vec<BTreeMap<String, usize>>,
    /// Per fire time and rule: emails let through by the cap.
    emails: Vec<BTreeMap<String, u64>>,
    /// Per fire time and owner: escalations opened, before the daily cap.
    escalations: Vec<BTreeMap<String, u64>>,
    tags: Vec<u64>,
    webhooks: Vec<u64>,
}

/// A listed happening and what is needed to settle it at the end.
struct Sampled {
    happening: Happening,
    firing: usize,
    /// An escalation's place among its owner's at that fire time.
    ordinal: Option<u64>,
}

impl Tally {
    fn new(firings: usize, judge_guard: bool, sample_limit: usize) -> Self {
        Self {
            judge_guard,
            sample_limit,
            sample: Vec::new(),
            happenings: 0,
            errors: Vec::new(),
            errors_total: 0,
            customers: vec![0; firings],
            reach: vec![BTreeMap::new(); firings],
            emails: vec![BTreeMap::new(); firings],
            escalations: vec![BTreeMap::new(); firings],
            tags: vec![0; firings],
            webhooks: vec![0; firings],
        }
    }

    fn record(&mut self, happening: Happening, firing: usize, ordinal: Option<u64>) {
        self.happenings += 1;
        if self.sample.len() < self.sample_limit {
            self.sample.push(Sampled {
                happening,
                firing,
                ordinal,
            });
        }
    }

    fn error(&mut self, e: SimulatedError) {
        self.errors_total += 1;
        if self.errors.len() < self.sample_limit {
            self.errors.push(e);
        }
    }
}

/// What is known about one customer's simulated past: the database's
/// ledger plus what the simulation "sent".
#[derive(Default)]
struct Ledger {
    keys: HashSet<String>,
    /// Escalations open (in the database or opened by the simulation).
    open: HashSet<(CustomerId, String)>,
    /// Resolved escalations by reason: not opened again.
    resolved: HashSet<(CustomerId, String, String)>,
    /// (customer, rule) pairs whose resolved reasons were looked up.
    looked_up: HashSet<(CustomerId, String)>,
    emails: HashMap<CustomerId, Vec<DateTime<Utc>>>,
    tags: HashMap<CustomerId, Vec<String>>,
    errors: HashSet<(String, CustomerId, String)>,
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
    let sim = Simulator {
        store,
        config,
        rules,
        default_owner,
        times,
    };
    let mut tally = match customer {
        Some(_) => Tally::new(sim.times.len(), false, usize::MAX),
        None => Tally::new(sim.times.len(), true, SAMPLE),
    };
    match customer {
        Some(id) => {
            if let Some(c) = store.customer(id).await? {
                sim.page(vec![c], &mut tally).await?;
            }
        }
        None => {
            let mut after: Option<CustomerId> = None;
            loop {
                let page = store.customers_page(after.as_ref(), PAGE).await?;
                let Some(last) = page.last() else { break };
                after = Some(last.id.clone());
                sim.page(page, &mut tally).await?;
            }
        }
    }
    sim.finish(tally).await
}

struct Simulator<'a> {
    store: &'a dyn Store,
    config: &'a Config,
    rules: Arc<RuleSet>,
    default_owner: Email,
    times: Vec<FireTime>,
}

impl Simulator<'_> {
    /// Takes one page of customers through every fire time.
    async fn page(&self, customers: Vec<Customer>, tally: &mut Tally) -> Result<(), StoreError> {
        let (Some(first), Some(last), Some((until, ..))) =
            (customers.first(), customers.last(), self.times.last())
        else {
            return Ok(());
        };
        let (first, last) = (first.id.clone(), last.id.clone());
        let mut histories: HashMap<CustomerId, Vec<HistoryEvent>> = self
            .store
            .histories_in_id_range(&first, &last, *until)
            .await?
            .into_iter()
            .collect();
        let mut stored_tags: HashMap<CustomerId, Vec<String>> = HashMap::new();
        for (id, tag) in self.store.tags_in_id_range(&first, &last).await? {
            stored_tags.entry(id).or_default().push(tag);
        }
        let mut ledger = Ledger {
            open: self
                .store
                .open_escalations_in_id_range(&first, &last)
                .await?
                .into_iter()
                .filter_map(|e| Some((CustomerId::parse(&e.customer_id).ok()?, e.rule)))
                .collect(),
            ..Ledger::default()
        };
        let people: Vec<(Customer, Vec<HistoryEvent>)> = customers
            .into_iter()
            .map(|c| {
                let h = histories.remove(&c.id).unwrap_or_default();
                (c, h)
            })
            .collect();
        for (firing, (at, schedule, only)) in self.times.iter().enumerate() {
            let at = *at;
            let facts: Vec<Facts> = people
                .iter()
                .filter(|(c, _)| c.created_at.is_none_or(|t| t <= at))
                .map(|(c, history)| {
                    let mut tags = stored_tags.get(&c.id).cloned().unwrap_or_default();
                    tags.extend(ledger.tags.get(&c.id).cloned().unwrap_or_default());
                    Facts::from_history(c.clone(), history.iter().cloned(), tags, at)
                })
                .collect();
            tally.customers[firing] += facts.len() as u64;
            let rules = Arc::clone(&self.rules);
            let only: Option<HashSet<String>> = only.as_ref().map(|r| r.iter().cloned().collect());
            let owner = self.default_owner.clone();
            let results = tokio::task::spawn_blocking(move || {
                evaluate_page(&rules, only.as_ref(), facts, &owner, None, false)
            })
            .await
            .map_err(|e| StoreError::Corrupt {
                table: "simulation",
                message: format!("evaluation task failed: {e}"),
            })?;
            let mut outgoing = Vec::new();
            for (o, errors) in results {
                outgoing.extend(o);
                for e in errors {
                    note_error(&mut ledger, tally, at, e);
                }
            }
            self.firing(&mut ledger, tally, firing, (at, schedule), outgoing)
                .await?;
        }
        Ok(())
    }

    /// What one fire time does with what a page's rules asked for: dedup,
    /// suppression, the frequency cap and the send window; escalations and
    /// guard reach are counted for [`Simulator::finish`]. What it would
    /// send is added to the ledger as sent.
    async fn firing(
        &self,
        ledger: &mut Ledger,
        tally: &mut Tally,
        firing: usize,
        (at, schedule): (DateTime<Utc>, &str),
        outgoing: Vec<Outgoing>,
    ) -> Result<(), StoreError> {
        let keys = action_keys(&outgoing);
        let mut existing = self.store.existing_dedup_keys(&keys).await?;
        existing.extend(keys.into_iter().filter(|k| ledger.keys.contains(k)));
        self.look_up_resolved(ledger, &outgoing).await?;
        let emails: Vec<String> = outgoing
            .iter()
            .filter_map(|o| match o {
                Outgoing::Action(a) if a.kind == OutboxKind::Email => a.customer_email.clone(),
                _ => None,
            })
            .collect();
        let suppressed = self.store.suppressions_among(&emails).await?;
        let mut reached: BTreeMap<&str, HashSet<&CustomerId>> = BTreeMap::new();
        // New emails per customer, for the frequency cap.
        let mut candidates: BTreeMap<CustomerId, Vec<&Outgoing>> = BTreeMap::new();
        for o in &outgoing {
            match o {
                Outgoing::Action(a) => {
                    if existing.contains(&a.dedup_key) {
                        continue;
                    }
                    if a.kind == OutboxKind::Email {
                        reached
                            .entry(a.rule.as_str())
                            .or_default()
                            .insert(&a.customer_id);
                        let address = a.customer_email.clone().unwrap_or_default().to_lowercase();
                        if !suppressed.contains_key(&address) {
                            candidates.entry(a.customer_id.clone()).or_default().push(o);
                        }
                        continue;
                    }
                    ledger.keys.insert(a.dedup_key.clone());
                    match a.kind {
                        OutboxKind::Tag => {
                            ledger
                                .tags
                                .entry(a.customer_id.clone())
                                .or_default()
                                .push(a.subject.clone());
                            tally.tags[firing] += 1;
                        }
                        _ => tally.webhooks[firing] += 1,
                    }
                    tally.record(happening(at, schedule, o, None), firing, None);
                }
                Outgoing::Escalation(e) => {
                    let key = (e.customer_id.clone(), e.rule.clone());
                    let was_resolved =
                        ledger
                            .resolved
                            .contains(&(key.0.clone(), key.1.clone(), e.reason.clone()));
                    if !was_resolved && ledger.open.insert(key) {
                        let n = tally.escalations[firing]
                            .entry(e.owner.clone())
                            .or_default();
                        let ordinal = *n;
                        *n += 1;
                        tally.record(happening(at, schedule, o, None), firing, Some(ordinal));
                    }
                }
            }
        }
        for (rule, who) in reached {
            *tally.reach[firing].entry(rule.to_owned()).or_default() += who.len();
        }
        self.cap_emails(ledger, tally, firing, (at, schedule), candidates)
            .await
    }

    /// Resolved escalations of the (customer, rule) pairs a firing would
    /// escalate, looked up once per pair.
    async fn look_up_resolved(
        &self,
        ledger: &mut Ledger,
        outgoing: &[Outgoing],
    ) -> Result<(), StoreError> {
        let pairs: Vec<(CustomerId, String)> = outgoing
            .iter()
            .filter_map(|o| match o {
                Outgoing::Escalation(e) => Some((e.customer_id.clone(), e.rule.clone())),
                Outgoing::Action(_) => None,
            })
            .filter(|p| ledger.looked_up.insert(p.clone()))
            .collect();
        if !pairs.is_empty() {
            ledger
                .resolved
                .extend(self.store.resolved_escalation_reasons(&pairs).await?);
        }
        Ok(())
    }

    /// The frequency cap over each customer's new emails; what it lets
    /// through goes out in the send window (or waits for the guard).
    async fn cap_emails(
        &self,
        ledger: &mut Ledger,
        tally: &mut Tally,
        firing: usize,
        (at, schedule): (DateTime<Utc>, &str),
        candidates: BTreeMap<CustomerId, Vec<&Outgoing>>,
    ) -> Result<(), StoreError> {
        let policy = &self.config.policy;
        let recent = match policy.frequency_cap {
            Some(cap) if !candidates.is_empty() => {
                let ids: Vec<CustomerId> = candidates.keys().cloned().collect();
                let since = at - Duration::days(i64::from(cap.days));
                self.store.recent_email_counts(&ids, since).await?
            }
            _ => HashMap::new(),
        };
        let window = policy.window().ok().flatten();
        let fallback_tz = policy.default_tz().unwrap_or(chrono_tz::UTC);
        for (customer_id, list) in candidates {
            let room = match policy.frequency_cap {
                None => usize::MAX,
                Some(cap) => {
                    let since = at - Duration::days(i64::from(cap.days));
                    let stored = recent.get(&customer_id).copied().unwrap_or(0) as usize;
                    let simulated = ledger
                        .emails
                        .get(&customer_id)
                        .map_or(0, |v| v.iter().filter(|t| **t >= since).count());
                    (cap.emails as usize).saturating_sub(stored + simulated)
                }
            };
            let policies: Vec<RulePolicy> = list
                .iter()
                .map(|o| {
                    self.rules.rule(o.rule()).map_or(
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
                        *tally.emails[firing].entry(a.rule.clone()).or_default() += 1;
                        let tz = a
                            .customer_timezone
                            .as_deref()
                            .and_then(|t| t.parse().ok())
                            .unwrap_or(fallback_tz);
                        let goes_out = window.and_then(|w| w.next_open(at, tz));
                        tally.record(happening(at, schedule, o, goes_out), firing, None);
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

    /// Settles what needed the whole base (the guard per fire time, owners'
    /// daily caps in fire-time and id order) and adds up the days.
    async fn finish(&self, tally: Tally) -> Result<Simulation, StoreError> {
        let held: Vec<BTreeMap<String, String>> = (0..self.times.len())
            .map(|k| {
                if tally.judge_guard {
                    guard_holds(&tally.reach[k], tally.customers[k], &self.config.guard)
                } else {
                    BTreeMap::new()
                }
            })
            .collect();
        let accepted = self.owner_caps(&tally.escalations).await?;
        let default_owner = self.default_owner.to_string();
        let cap = self.config.escalation.owner_daily_cap;

        let mut days: BTreeMap<String, DayTotals> = BTreeMap::new();
        let mut owners: BTreeMap<String, u64> = BTreeMap::new();
        for (k, (at, ..)) in self.times.iter().enumerate() {
            let day_name = at.format("%Y-%m-%d").to_string();
            let day = days.entry(day_name.clone()).or_insert_with(|| DayTotals {
                day: day_name,
                ..DayTotals::default()
            });
            for (rule, n) in &tally.emails[k] {
                if held[k].contains_key(rule) {
                    day.held += n;
                } else {
                    day.emails += n;
                }
            }
            day.escalations += tally.escalations[k].values().sum::<u64>();
            day.tags += tally.tags[k];
            day.webhooks += tally.webhooks[k];
            for (owner, n) in &accepted[k] {
                *owners.entry(owner.clone()).or_default() += n;
            }
        }

        let mut happenings: Vec<Happening> = tally
            .sample
            .into_iter()
            .map(|s| {
                let mut h = s.happening;
                let k = s.firing;
                if h.kind == "email"
                    && let Some(reason) = held[k].get(&h.rule)
                {
                    h.note = Some(format!("{reason}; sent only if approved"));
                    h.goes_out_at = None;
                }
                if let (Some(ordinal), Some(owner)) = (s.ordinal, h.owner.clone())
                    && owner != default_owner
                    && ordinal >= accepted[k].get(&owner).copied().unwrap_or(0)
                {
                    h.note = Some(format!(
                        "to the default owner: {owner} reached the daily cap of {cap} escalations"
                    ));
                    h.owner = Some(default_owner.clone());
                }
                h
            })
            .collect();
        // Listed page by page; shown in time order (then customer order).
        happenings.sort_by_key(|h| h.at);
        Ok(Simulation {
            happenings,
            happenings_total: tally.happenings,
            days: days.into_values().collect(),
            owners,
            errors: tally.errors,
            errors_total: tally.errors_total,
        })
    }

    /// Escalations each owner keeps per fire time under the daily cap (the
    /// rest go to the default owner, who has no cap), counting what the
    /// database holds and what earlier fire times opened in the last day.
    async fn owner_caps(
        &self,
        proposed: &[BTreeMap<String, u64>],
    ) -> Result<Vec<BTreeMap<String, u64>>, StoreError> {
        let cap = u64::from(self.config.escalation.owner_daily_cap);
        let default_owner = self.default_owner.to_string();
        let mut accepted: Vec<BTreeMap<String, u64>> = Vec::with_capacity(proposed.len());
        for (k, (at, ..)) in self.times.iter().enumerate() {
            if cap == 0 {
                accepted.push(proposed[k].clone());
                continue;
            }
            let since = *at - Duration::days(1);
            let owners: Vec<String> = proposed[k].keys().cloned().collect();
            let mut used: HashMap<String, u64> = self
                .store
                .owner_escalation_counts(&owners, since)
                .await?
                .into_iter()
                .map(|(o, n)| (o, u64::from(n)))
                .collect();
            for (j, (earlier, ..)) in self.times[..k].iter().enumerate() {
                if *earlier >= since {
                    for (o, n) in &accepted[j] {
                        *used.entry(o.clone()).or_default() += n;
                    }
                }
            }
            let mut kept: BTreeMap<String, u64> = BTreeMap::new();
            for (owner, &n) in &proposed[k] {
                if *owner == default_owner {
                    *kept.entry(owner.clone()).or_default() += n;
                    continue;
                }
                let room = cap.saturating_sub(used.get(owner).copied().unwrap_or(0));
                let keep = n.min(room);
                if keep > 0 {
                    *kept.entry(owner.clone()).or_default() += keep;
                }
                if n > keep {
                    *kept.entry(default_owner.clone()).or_default() += n - keep;
                }
            }
            accepted.push(kept);
        }
        Ok(accepted)
    }
}

/// A rule error, listed the first time its rule fails for its customer
/// with that message.
fn note_error(ledger: &mut Ledger, tally: &mut Tally, at: DateTime<Utc>, e: RuleErrorRecord) {
    let id = (e.rule.clone(), e.customer_id.clone(), e.message.clone());
    if ledger.errors.insert(id) {
        tally.error(SimulatedError {
            at,
            rule: e.rule,
            customer_id: e.customer_id.to_string(),
            message: e.message,
        });
    }
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
