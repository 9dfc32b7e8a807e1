//! A customer's engagement data as of an evaluation time, and the questions
//! rules ask of it. Pure: `now` is a parameter and events after it are invisible,
//! so evaluating with a past `now` replays history.
//!
//! A "day" is a whole elapsed 24-hour period (rounded down).
//! `count_within(e, d)` counts events in the half-open window (now − d days, now].

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use serde_json::{Map, Value};

use crate::domain::{Customer, Event};

const DAY_MS: i64 = 86_400_000;

/// One occurrence of an event.
#[derive(Clone, Debug, PartialEq)]
pub struct Occurrence {
    pub at: DateTime<Utc>,
    pub properties: Value,
}

/// What rules can see about one customer at one moment.
#[derive(Clone, Debug)]
pub struct Facts {
    pub customer: Customer,
    pub tags: Vec<String>,
    pub now: DateTime<Utc>,
    /// Occurrences per event name, oldest first, none after `now`.
    events: HashMap<String, Vec<Occurrence>>,
}

/// Whole 24-hour periods from `from` to `to` (negative when `to` is earlier).
pub fn whole_days(from: DateTime<Utc>, to: DateTime<Utc>) -> i64 {
    (to - from).num_milliseconds().div_euclid(DAY_MS)
}

impl Facts {
    /// Builds facts from a customer's events (any order); events after `now` are dropped.
    pub fn new(
        customer: Customer,
        events: impl IntoIterator<Item = Event>,
        tags: Vec<String>,
        now: DateTime<Utc>,
    ) -> Self {
        Self::from_history(
            customer,
            events.into_iter().map(|e| (e.name, e.at, e.properties)),
            tags,
            now,
        )
    }

    /// Builds facts from (name, time, properties) triples in any order.
    pub fn from_history(
        customer: Customer,
        history: impl IntoIterator<Item = (String, DateTime<Utc>, Value)>,
        tags: Vec<String>,
        now: DateTime<Utc>,
    ) -> Self {
        let mut by_name: HashMap<String, Vec<Occurrence>> = HashMap::new();
        for (name, at, properties) in history {
            if at <= now {
                by_name
                    .entry(name)
                    .or_default()
                    .push(Occurrence { at, properties });
            }
        }
        for list in by_name.values_mut() {
            list.sort_by_key(|o| o.at);
        }
        Self {
            customer,
            tags,
            now,
            events: by_name,
        }
    }

    /// Whole days since signup, or `None` when the signup time is unknown.
    pub fn days_since_signup(&self) -> Option<i64> {
        self.customer.created_at.map(|c| whole_days(c, self.now))
    }

    /// How many times `event` happened, ever (up to `now`).
    pub fn count(&self, event: &str) -> i64 {
        self.events.get(event).map_or(0, |v| v.len() as i64)
    }

    /// How many times `event` happened in (now − days, now].
    pub fn count_within(&self, event: &str, days: i64) -> i64 {
        let Some(list) = self.events.get(event) else {
            return 0;
        };
        if days <= 0 {
            return 0;
        }
        // A window reaching before the representable past covers everything.
        let Some(since) = Duration::try_milliseconds(days.saturating_mul(DAY_MS))
            .and_then(|d| self.now.checked_sub_signed(d))
        else {
            return list.len() as i64;
        };
        let first = list.partition_point(|o| o.at <= since);
        (list.len() - first) as i64
    }

    /// The most recent occurrence of `event`.
    pub fn last(&self, event: &str) -> Option<&Occurrence> {
        self.events.get(event).and_then(|v| v.last())
    }

    /// Whole days since the most recent `event`, or `None` if it never happened.
    pub fn days_since(&self, event: &str) -> Option<i64> {
        self.last(event).map(|o| whole_days(o.at, self.now))
    }

    /// Sum of a numeric property over all occurrences of `event`.
    pub fn sum(&self, event: &str, property: &str) -> f64 {
        self.events.get(event).map_or(0.0, |v| {
            v.iter()
                .filter_map(|o| o.properties.get(property).and_then(Value::as_f64))
                .sum()
        })
    }

    /// Event names with their counts, for reports (`explain`, escalation notices).
    pub fn event_counts(&self) -> Vec<(String, i64)> {
        let mut v: Vec<_> = self
            .events
            .iter()
            .map(|(k, list)| (k.clone(), list.len() as i64))
            .collect();
        v.sort();
        v
    }

    /// Key facts as a JSON map: signup age, per-event totals and last-seen days.
    pub fn summary(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert(
            "days_since_signup".into(),
            self.days_since_signup().map_or(Value::Null, Value::from),
        );
        let mut events = Map::new();
        for (name, count) in self.event_counts() {
            let mut e = Map::new();
            e.insert("count".into(), Value::from(count));
            e.insert(
                "last_7_days".into(),
                Value::from(self.count_within(&name, 7)),
            );
            e.insert(
                "days_since_last".into(),
                self.days_since(&name).map_or(Value::Null, Value::from),
            );
            events.insert(name, Value::Object(e));
        }
        m.insert("events".into(), Value::Object(events));
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{CustomerId, EngagementModel};
    use serde_json::json;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn facts(now: &str, events: &[(&str, &str)]) -> Facts {
        let customer = Customer {
            id: CustomerId::parse("c1").unwrap(),
            email: None,
            name: None,
            created_at: Some(at("2026-01-01T12:00:00Z")),
            timezone: None,
            model: EngagementModel::LowTouch,
            owner: None,
            traits: Map::new(),
        };
        let events = events.iter().enumerate().map(|(i, (name, t))| Event {
            message_id: i.to_string(),
            customer_id: customer.id.clone(),
            name: (*name).into(),
            properties: json!({"n": i}),
            at: at(t),
        });
        Facts::new(customer.clone(), events, vec![], at(now))
    }

    #[test]
    fn a_day_is_a_whole_elapsed_24_hours() {
        assert_eq!(
            facts("2026-01-02T11:59:59Z", &[]).days_since_signup(),
            Some(0)
        );
        assert_eq!(
            facts("2026-01-02T12:00:00Z", &[]).days_since_signup(),
            Some(1)
        );
    }

    #[test]
    fn count_within_is_a_half_open_window_ending_at_now() {
        let f = facts(
            "2026-01-10T12:00:00Z",
            &[
                ("login", "2026-01-03T12:00:00Z"), // exactly 7 days before: outside (now-7d, now]
                ("login", "2026-01-03T12:00:01Z"), // inside
                ("login", "2026-01-10T12:00:00Z"), // exactly now: inside
                ("login", "2026-01-10T12:00:01Z"), // future: invisible
            ],
        );
        assert_eq!(f.count_within("login", 7), 2);
        assert_eq!(
            f.count_within("login", i64::MAX),
            3,
            "huge windows do not overflow"
        );
        assert_eq!(f.count("login"), 3);
        assert_eq!(f.count("never"), 0);
    }

    #[test]
    fn last_and_days_since_ignore_the_future() {
        let f = facts(
            "2026-01-10T12:00:00Z",
            &[
                ("order", "2026-01-05T00:00:00Z"),
                ("order", "2026-01-12T00:00:00Z"),
            ],
        );
        assert_eq!(f.last("order").unwrap().at, at("2026-01-05T00:00:00Z"));
        assert_eq!(f.days_since("order"), Some(5));
        assert_eq!(f.days_since("nothing"), None);
    }
}
