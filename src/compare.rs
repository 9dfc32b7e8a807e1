//! `engaged plan`: what a run would do now, and how another version of the
//! rules would change it. Pure: works on the dry-run action lists.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::pipeline::WouldDo;

/// Counts of new actions by kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KindCounts {
    pub emails: i64,
    pub escalations: i64,
    pub tags: i64,
    pub webhooks: i64,
}

impl KindCounts {
    fn add(&mut self, kind: &str, n: i64) {
        match kind {
            "email" => self.emails += n,
            "escalation" => self.escalations += n,
            "tag" => self.tags += n,
            _ => self.webhooks += n,
        }
    }
}

/// One rule's part of a plan.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RulePlan {
    pub counts: KindCounts,
    /// Up to five customers it would act on.
    pub sample: Vec<String>,
}

/// Per rule, what a run would newly do (deduplicated actions left out).
pub fn per_rule(would: &[WouldDo]) -> BTreeMap<String, RulePlan> {
    let mut plans: BTreeMap<String, RulePlan> = BTreeMap::new();
    for w in would.iter().filter(|w| !w.deduplicated) {
        let p = plans.entry(w.rule.clone()).or_default();
        p.counts.add(&w.kind, 1);
        if p.sample.len() < 5 && !p.sample.contains(&w.customer_id) {
            p.sample.push(w.customer_id.clone());
        }
    }
    plans
}

/// How the plan of other rules (`against`) differs from the current one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PlanDiff {
    /// `against` minus current, by kind.
    pub change: KindCounts,
    /// Customers whose new actions differ, with what is added and removed.
    pub customers: BTreeMap<String, CustomerChange>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CustomerChange {
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

/// Compares two dry runs action by action (rule and action label), per customer.
pub fn diff(current: &[WouldDo], against: &[WouldDo]) -> PlanDiff {
    let set = |w: &[WouldDo]| -> BTreeSet<(String, String, String, String)> {
        w.iter()
            .filter(|x| !x.deduplicated)
            .map(|x| {
                (
                    x.customer_id.clone(),
                    x.rule.clone(),
                    x.kind.clone(),
                    x.action.clone(),
                )
            })
            .collect()
    };
    let (a, b) = (set(current), set(against));
    let mut d = PlanDiff::default();
    for (customer, rule, kind, action) in b.difference(&a) {
        d.change.add(kind, 1);
        d.customers
            .entry(customer.clone())
            .or_default()
            .added
            .push(format!("{action} [rule {rule}]"));
    }
    for (customer, rule, kind, action) in a.difference(&b) {
        d.change.add(kind, -1);
        d.customers
            .entry(customer.clone())
            .or_default()
            .removed
            .push(format!("{action} [rule {rule}]"));
    }
    d
}

/// "+37 escalations, −120 emails, 12 customers changed".
pub fn headline(d: &PlanDiff) -> String {
    let mut parts = Vec::new();
    for (n, what) in [
        (d.change.emails, "emails"),
        (d.change.escalations, "escalations"),
        (d.change.tags, "tags"),
        (d.change.webhooks, "webhooks"),
    ] {
        if n != 0 {
            parts.push(format!(
                "{}{} {what}",
                if n > 0 { "+" } else { "−" },
                n.abs()
            ));
        }
    }
    if parts.is_empty() {
        parts.push("no change in counts".into());
    }
    parts.push(format!("{} customers changed", d.customers.len()));
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(c: &str, rule: &str, kind: &str, action: &str) -> WouldDo {
        WouldDo {
            customer_id: c.into(),
            rule: rule.into(),
            kind: kind.into(),
            action: action.into(),
            deduplicated: false,
        }
    }

    #[test]
    fn the_diff_counts_added_and_removed_actions_per_customer() {
        let current = vec![
            w("c1", "welcome", "email", "email welcome"),
            w("c2", "welcome", "email", "email welcome"),
        ];
        let against = vec![
            w("c1", "welcome", "email", "email welcome"),
            w("c2", "stall", "escalation", "escalate: x"),
            w("c3", "stall", "escalation", "escalate: x"),
        ];
        let d = diff(&current, &against);
        assert_eq!(d.change.emails, -1);
        assert_eq!(d.change.escalations, 2);
        assert_eq!(d.customers.len(), 2);
        assert_eq!(
            headline(&d),
            "−1 emails, +2 escalations, 2 customers changed"
        );
        let plan = per_rule(&current);
        assert_eq!(plan["welcome"].counts.emails, 2);
        assert_eq!(plan["welcome"].sample, ["c1", "c2"]);
    }
}
