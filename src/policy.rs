//! Policy decisions, pure functions of (what was planned, history, now):
//! the blast-radius guard, send windows and the frequency cap.

use chrono::{DateTime, Duration, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde::Deserialize;

/// `[guard]`: hold a rule's emails for approval when one run would mail
/// too many customers (a bad edit must not mail everyone).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    /// Share of the customers evaluated above which a rule's emails are held.
    pub max_share: f64,
    /// … and only when more than this many customers would be mailed.
    pub min_count: usize,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            max_share: 0.5,
            min_count: 100,
        }
    }
}

impl GuardConfig {
    /// Whether `emails` new emails from one rule to `customers` evaluated
    /// customers must be held.
    pub fn holds(&self, emails: usize, customers: u64) -> bool {
        emails > self.min_count && emails as f64 > self.max_share * customers as f64
    }
}

/// `send_window = "09:00-18:00"`: marketing mail goes out only between these
/// local times (in the customer's time zone). A window may wrap midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendWindow {
    pub start: NaiveTime,
    pub end: NaiveTime,
}

impl SendWindow {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("policy.send_window {s:?}: use \"HH:MM-HH:MM\", e.g. \"09:00-18:00\"");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let t = |x: &str| NaiveTime::parse_from_str(x.trim(), "%H:%M").map_err(|_| bad());
        let w = Self {
            start: t(a)?,
            end: t(b)?,
        };
        if w.start == w.end {
            return Err(format!("policy.send_window {s:?} is empty"));
        }
        Ok(w)
    }

    fn contains(&self, t: NaiveTime) -> bool {
        if self.start < self.end {
            t >= self.start && t < self.end
        } else {
            t >= self.start || t < self.end
        }
    }

    /// `None` when `now` is inside the window in `tz`; otherwise the next
    /// moment it opens (DST-correct: a start time that does not exist that
    /// day opens at the first moment after the gap).
    pub fn next_open(&self, now: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        let local = now.with_timezone(&tz);
        if self.contains(local.time()) {
            return None;
        }
        let mut day = local.date_naive();
        for _ in 0..3 {
            let start = day.and_time(self.start);
            let candidate = match tz.from_local_datetime(&start) {
                chrono::LocalResult::Single(t) => Some(t),
                chrono::LocalResult::Ambiguous(first, _) => Some(first),
                chrono::LocalResult::None => {
                    // In a DST gap: the first valid minute after it.
                    (1..=180).find_map(|m| {
                        tz.from_local_datetime(&(start + Duration::minutes(m)))
                            .earliest()
                    })
                }
            };
            if let Some(c) = candidate
                && c.with_timezone(&Utc) > now
            {
                return Some(c.with_timezone(&Utc));
            }
            day = day.succ_opt()?;
        }
        None
    }
}

/// `frequency_cap = { emails = 2, days = 3 }`: at most `emails` marketing
/// emails per customer in any `days`-day window, across rules.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FrequencyCap {
    pub emails: u32,
    pub days: u32,
}

/// `[policy]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    pub send_window: Option<String>,
    /// For customers without a (valid) time zone.
    pub default_timezone: String,
    pub frequency_cap: Option<FrequencyCap>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            send_window: None,
            default_timezone: "UTC".into(),
            frequency_cap: None,
        }
    }
}

impl PolicyConfig {
    pub fn window(&self) -> Result<Option<SendWindow>, String> {
        self.send_window
            .as_deref()
            .map(SendWindow::parse)
            .transpose()
    }

    pub fn default_tz(&self) -> Result<Tz, String> {
        self.default_timezone.parse().map_err(|_| {
            format!(
                "policy.default_timezone {:?} is not an IANA time zone",
                self.default_timezone
            )
        })
    }
}

/// What the frequency cap decides for one candidate email.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapDecision {
    Allow,
    /// Over the cap: not planned now; the rule may plan it again later.
    Defer,
    /// Over the cap: recorded as dropped, never sent.
    Drop,
}

/// What the cap needs to know about a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RulePolicy {
    pub priority: i64,
    pub drop_when_capped: bool,
}

/// Decides, for one customer's candidate emails (given as rule policies in
/// plan order), which go out: the highest priorities win the `room` left
/// under the cap; ties keep plan order. Pure.
pub fn apply_cap(candidates: &[RulePolicy], room: usize) -> Vec<CapDecision> {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(candidates[i].priority));
    let mut decisions = vec![CapDecision::Allow; candidates.len()];
    for (rank, &i) in order.iter().enumerate() {
        if rank >= room {
            decisions[i] = if candidates[i].drop_when_capped {
                CapDecision::Drop
            } else {
                CapDecision::Defer
            };
        }
    }
    decisions
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn the_guard_needs_both_share_and_count() {
        let g = GuardConfig::default();
        assert!(!g.holds(100, 150), "not more than min_count");
        assert!(!g.holds(400, 1000), "not more than half");
        assert!(g.holds(501, 1000));
    }

    #[test]
    fn send_windows_open_in_the_customers_time_zone() {
        let w = SendWindow::parse("09:00-18:00").unwrap();
        let tokyo: Tz = "Asia/Tokyo".parse().unwrap();
        // 02:00 UTC is 11:00 in Tokyo: inside.
        assert_eq!(w.next_open(utc("2026-06-15T02:00:00Z"), tokyo), None);
        // 12:00 UTC is 21:00 in Tokyo: opens at 09:00 Tokyo the next day.
        assert_eq!(
            w.next_open(utc("2026-06-15T12:00:00Z"), tokyo),
            Some(utc("2026-06-16T00:00:00Z"))
        );
        let night = SendWindow::parse("22:00-06:00").unwrap();
        assert_eq!(
            night.next_open(utc("2026-06-15T23:00:00Z"), chrono_tz::UTC),
            None
        );
        assert_eq!(
            night.next_open(utc("2026-06-15T12:00:00Z"), chrono_tz::UTC),
            Some(utc("2026-06-15T22:00:00Z"))
        );
        assert!(SendWindow::parse("9-5").is_err());
    }

    #[test]
    fn the_cap_keeps_the_highest_priorities() {
        let p = |priority, drop| RulePolicy {
            priority,
            drop_when_capped: drop,
        };
        let d = apply_cap(&[p(0, false), p(10, false), p(5, true)], 1);
        assert_eq!(
            d,
            [CapDecision::Defer, CapDecision::Allow, CapDecision::Drop]
        );
        assert_eq!(apply_cap(&[p(0, false)], 0), [CapDecision::Defer]);
    }
}
