//! `engaged test`: rule fixtures. A fixture file (`rules/tests/*.toml`)
//! holds cases: a customer, their events (relative like `-3d` or absolute),
//! `now`, and the actions the rules must plan, or none. Evaluation is the
//! real engine with the real rules; nothing touches the database.
//!
//! ```toml
//! [[case]]
//! name = "welcomed on the day they sign up"
//! rules = ["welcome"]                # default: the rule named like the file
//! now = "2026-06-15T02:00:00Z"       # default: 2026-06-15T02:00:00Z
//! customer = { created_at = "-2h", model = "low-touch", traits = { plan = "pro" } }
//! events = [ { name = "login", at = "-1h" } ]
//! expect = [ { email = "welcome" } ]  # or [] for "nothing"
//! ```
//!
//! An expectation names one action: `{ email = "TEMPLATE", key = "K" }`
//! (key optional), `{ escalate = "text the reason contains" }`,
//! `{ tag = "NAME" }` or `{ webhook = "NAME" }`, optionally with
//! `rule = "ID"` when a case runs several rules.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use serde::Deserialize;
use serde_json::Value;

use crate::domain::{Customer, CustomerId, Email, EngagementModel, Event, parse_timestamp};
use crate::engine::RuleSet;
use crate::facts::Facts;
use crate::plan::ActionRequest;

const DEFAULT_NOW: &str = "2026-06-15T02:00:00Z";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FixtureFile {
    #[serde(rename = "case", default)]
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    rules: Option<Vec<String>>,
    now: Option<String>,
    #[serde(default)]
    customer: CustomerSpec,
    #[serde(default)]
    events: Vec<EventSpec>,
    expect: Vec<Expect>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CustomerSpec {
    id: Option<String>,
    email: Option<String>,
    name: Option<String>,
    created_at: Option<String>,
    timezone: Option<String>,
    model: Option<String>,
    owner: Option<String>,
    #[serde(default)]
    traits: toml::Table,
    #[serde(default)]
    tags: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventSpec {
    name: String,
    at: String,
    #[serde(default)]
    properties: toml::Table,
    /// Repeat the event this many times (same time), e.g. 12 orders.
    #[serde(default = "one")]
    times: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct Expect {
    /// Only an action of this rule matches (default: any of the case's rules).
    rule: Option<String>,
    email: Option<String>,
    key: Option<String>,
    escalate: Option<String>,
    tag: Option<String>,
    webhook: Option<String>,
}

impl Expect {
    fn describe(&self) -> String {
        let what = self.describe_action();
        match &self.rule {
            Some(r) => format!("{what}  [rule {r}]"),
            None => what,
        }
    }

    fn describe_action(&self) -> String {
        match (&self.email, &self.escalate, &self.tag, &self.webhook) {
            (Some(t), ..) => match &self.key {
                Some(k) => format!("email {t} (key {k})"),
                None => format!("email {t}"),
            },
            (_, Some(r), ..) => format!("escalate \"…{r}…\""),
            (_, _, Some(t), _) => format!("tag {t}"),
            (_, _, _, Some(w)) => format!("webhook {w}"),
            _ => "(an empty expectation)".into(),
        }
    }

    fn matches(&self, rule: &str, a: &ActionRequest) -> bool {
        if self.rule.as_deref().is_some_and(|r| r != rule) {
            return false;
        }
        match a {
            ActionRequest::Email { template, key, .. } => {
                self.email.as_deref() == Some(template)
                    && self.key.as_deref().is_none_or(|k| k == key)
            }
            ActionRequest::Escalate { reason } => {
                self.escalate.as_deref().is_some_and(|r| reason.contains(r))
            }
            ActionRequest::Tag { name } => self.tag.as_deref() == Some(name),
            ActionRequest::Webhook { name, .. } => self.webhook.as_deref() == Some(name),
        }
    }
}

fn describe_action(rule: &str, a: &ActionRequest) -> String {
    let what = match a {
        ActionRequest::Email { template, key, .. } => format!("email {template} (key {key})"),
        ActionRequest::Escalate { reason } => format!("escalate \"{reason}\""),
        ActionRequest::Tag { name } => format!("tag {name}"),
        ActionRequest::Webhook { name, .. } => format!("webhook {name}"),
    };
    format!("{what}  [rule {rule}]")
}

/// `-3d`, `+2h`, `-30m` relative to `now`, or an absolute timestamp.
fn time_of(raw: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let s = raw.trim();
    let relative = s
        .char_indices()
        .last()
        .filter(|(_, unit)| matches!(unit, 'd' | 'h' | 'm' | 's'))
        .and_then(|(i, unit)| {
            let number = &s[..i];
            let signed = number.starts_with('-') || number.starts_with('+');
            signed.then(|| number.parse::<i64>().ok().map(|n| (n, unit)))?
        });
    if let Some((n, unit)) = relative {
        let seconds = match unit {
            'd' => n.checked_mul(86_400),
            'h' => n.checked_mul(3_600),
            'm' => n.checked_mul(60),
            _ => Some(n),
        };
        return seconds
            .and_then(Duration::try_seconds)
            .and_then(|d| now.checked_add_signed(d))
            .ok_or_else(|| format!("{s:?} is too far from now"));
    }
    parse_timestamp(s).map_err(|e| format!("{e} (or a relative time like -3d, -2h, +30m)"))
}

fn to_json(t: &toml::Table) -> serde_json::Map<String, Value> {
    match serde_json::to_value(t) {
        Ok(Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    }
}

/// Builds the facts of a case.
fn facts_of(case: &Case, now: DateTime<Utc>) -> Result<Facts, String> {
    let c = &case.customer;
    let id = CustomerId::parse(c.id.as_deref().unwrap_or("fixture")).map_err(|e| e.to_string())?;
    let customer = Customer {
        email: Some(
            Email::parse(c.email.as_deref().unwrap_or("fixture@example.com"))
                .map_err(|e| e.to_string())?,
        ),
        name: c.name.clone().or_else(|| Some("Fixture Customer".into())),
        created_at: c
            .created_at
            .as_deref()
            .map(|t| time_of(t, now))
            .transpose()
            .map_err(|e| format!("customer.created_at: {e}"))?,
        timezone: c.timezone.clone(),
        model: c
            .model
            .as_deref()
            .map(EngagementModel::parse)
            .transpose()
            .map_err(|e| e.to_string())?
            .unwrap_or_default(),
        owner: c
            .owner
            .as_deref()
            .map(Email::parse)
            .transpose()
            .map_err(|e| format!("customer.owner: {e}"))?,
        traits: to_json(&c.traits),
        id: id.clone(),
    };
    let mut events = Vec::new();
    for (i, e) in case.events.iter().enumerate() {
        let at = time_of(&e.at, now).map_err(|err| format!("events[{i}].at: {err}"))?;
        for n in 0..e.times {
            events.push(Event {
                message_id: format!("{i}-{n}"),
                customer_id: id.clone(),
                name: e.name.clone(),
                properties: Value::Object(to_json(&e.properties)),
                at,
            });
        }
    }
    Ok(Facts::new(customer, events, c.tags.clone(), now))
}

/// The outcome of one case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseResult {
    pub file: PathBuf,
    pub name: String,
    /// `None` when it passed; otherwise what to show.
    pub failure: Option<String>,
}

/// Runs every case of one fixture file against the rules.
pub fn run_file(path: &Path, rules: &RuleSet) -> Vec<CaseResult> {
    let fail = |name: &str, message: String| CaseResult {
        file: path.to_owned(),
        name: name.to_owned(),
        failure: Some(message),
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return vec![fail("(file)", format!("cannot read: {e}"))],
    };
    let file: FixtureFile = match toml::from_str(&text) {
        Ok(f) => f,
        Err(e) => return vec![fail("(file)", e.to_string().trim_end().to_owned())],
    };
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    file.cases
        .iter()
        .map(|case| match run_case(case, &stem, rules) {
            Ok(()) => CaseResult {
                file: path.to_owned(),
                name: case.name.clone(),
                failure: None,
            },
            Err(message) => fail(&case.name, message),
        })
        .collect()
}

fn run_case(case: &Case, stem: &str, rules: &RuleSet) -> Result<(), String> {
    let now = parse_timestamp(case.now.as_deref().unwrap_or(DEFAULT_NOW))
        .map_err(|e| format!("now: {e}"))?;
    let selected: Vec<String> = case.rules.clone().unwrap_or_else(|| vec![stem.to_owned()]);
    for r in &selected {
        if rules.rule(r).is_none() {
            return Err(format!("no rule named {r:?} in the rules directory"));
        }
    }
    let facts = Arc::new(facts_of(case, now)?);
    let only: std::collections::HashSet<String> = selected.iter().cloned().collect();
    let mut actual: Vec<(String, ActionRequest)> = Vec::new();
    for (rule, result) in rules.evaluate_selected(&facts, Some(&only)) {
        match result {
            Ok(actions) => actual.extend(actions.into_iter().map(|a| (rule.id.clone(), a.kind))),
            Err(e) => return Err(format!("the rule failed: {e}")),
        }
    }
    // Match expectations to actions one to one, in any order.
    let mut unmatched: Vec<Option<&(String, ActionRequest)>> = actual.iter().map(Some).collect();
    let mut missing = Vec::new();
    for e in &case.expect {
        match unmatched
            .iter_mut()
            .find(|a| a.is_some_and(|(rule, act)| e.matches(rule, act)))
        {
            Some(slot) => *slot = None,
            None => missing.push(e.describe()),
        }
    }
    let extra: Vec<String> = unmatched
        .into_iter()
        .flatten()
        .map(|(rule, a)| describe_action(rule, a))
        .collect();
    if missing.is_empty() && extra.is_empty() {
        return Ok(());
    }
    let list = |v: Vec<String>| {
        if v.is_empty() {
            "nothing".to_owned()
        } else {
            v.join("\n              ")
        }
    };
    let expected: Vec<String> = case.expect.iter().map(Expect::describe).collect();
    let actual_desc: Vec<String> = actual.iter().map(|(r, a)| describe_action(r, a)).collect();
    Err(format!(
        "    expected: {}\n    actual:   {}\n    missing:  {}\n    extra:    {}",
        list(expected),
        list(actual_desc),
        list(missing),
        list(extra)
    ))
}

/// Every `*.toml` under the given paths (files or directories), sorted.
pub fn collect(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            if let Ok(rd) = std::fs::read_dir(p) {
                files.extend(
                    rd.filter_map(Result::ok)
                        .map(|e| e.path())
                        .filter(|f| f.extension().is_some_and(|x| x == "toml")),
                );
            }
        } else {
            files.push(p.clone());
        }
    }
    files.sort();
    files
}

/// Totals of a fixture run.
pub fn summarize(results: &[CaseResult]) -> BTreeMap<&'static str, usize> {
    let failed = results.iter().filter(|r| r.failure.is_some()).count();
    BTreeMap::from([("passed", results.len() - failed), ("failed", failed)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_and_absolute_times() {
        let now = parse_timestamp("2026-06-15T02:00:00Z").unwrap();
        assert_eq!(
            time_of("-3d", now).unwrap(),
            parse_timestamp("2026-06-12T02:00:00Z").unwrap()
        );
        assert_eq!(
            time_of("+2h", now).unwrap(),
            parse_timestamp("2026-06-15T04:00:00Z").unwrap()
        );
        assert_eq!(
            time_of("2026-01-01", now).unwrap(),
            parse_timestamp("2026-01-01T00:00:00Z").unwrap()
        );
        assert!(time_of("yesterday", now).is_err());
        assert!(
            time_of("-2é", now).is_err(),
            "no panic on a multi-byte last character"
        );
        assert!(time_of("-200000000d", now).is_err(), "no panic on overflow");
    }
}
