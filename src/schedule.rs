//! Schedules: DST-correct fire times (croner + chrono-tz) and the decision of
//! what a tick should record. A tick only enqueues: it writes firings to the
//! durable ledger, and the run worker runs them.
//!
//! tokio-cron-scheduler freezes a time zone into a fixed UTC offset when a
//! job is created, can overlap runs, has no catch-up and immature
//! persistence, so it only provides the daemon's heartbeat; every decision
//! is made here, from the ledger and an injected `now`.

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use croner::Cron;

use crate::config::{MissedPolicy, ScheduleConfig};

/// How late a tick may notice a firing and still call it on time.
pub const ON_TIME: Duration = Duration::seconds(60);
/// At most this many missed firings are recorded individually as skipped.
const MAX_RECORDED_MISSES: usize = 100;

/// A parsed `[[schedules]]` entry.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub name: String,
    cron: Cron,
    /// The cron's resolution: a second with 6 fields, a minute with 5.
    /// Fire times are whole multiples of it, whatever the clock's fraction.
    step: Duration,
    pub tz: Tz,
    pub rules: Option<Vec<String>>,
    pub missed: MissedPolicy,
    pub grace: Duration,
    pub customers: crate::config::CustomerScope,
}

impl Schedule {
    /// Parses a schedule; errors name the schedule and say what to fix.
    pub fn parse(c: &ScheduleConfig) -> Result<Self, String> {
        let fields = c.cron.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err(format!(
                "schedule {:?}: cron {:?} has {fields} fields; use 5 (minute hour day month weekday) or 6 (seconds first)",
                c.name, c.cron
            ));
        }
        let cron: Cron = c
            .cron
            .parse()
            .map_err(|e| format!("schedule {:?}: invalid cron {:?}: {e}", c.name, c.cron))?;
        let tz: Tz = c.timezone.parse().map_err(|_| {
            format!(
                "schedule {:?}: unknown time zone {:?}; use an IANA name such as Europe/Zagreb",
                c.name, c.timezone
            )
        })?;
        if c.name.trim().is_empty() {
            return Err("a schedule needs a name".into());
        }
        Ok(Self {
            name: c.name.clone(),
            cron,
            step: if fields == 6 {
                Duration::seconds(1)
            } else {
                Duration::minutes(1)
            },
            tz,
            rules: c.rules.clone(),
            customers: c.customers,
            missed: c.missed,
            grace: Duration::minutes(i64::from(c.grace_minutes)),
        })
    }

    /// `t` rounded down to the cron's resolution. croner keeps the
    /// fraction of the time it is asked about, so without this each tick of
    /// one second would see a "new" fire time.
    fn floor(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        let step = self.step.num_milliseconds();
        DateTime::from_timestamp_millis(t.timestamp_millis().div_euclid(step) * step).unwrap_or(t)
    }

    /// The first fire time strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&self.floor(t).with_timezone(&self.tz), false)
            .ok()
            .map(|d| self.floor(d.with_timezone(&Utc)))
    }

    /// The latest fire time at or before `t`.
    pub fn latest_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&self.floor(t).with_timezone(&self.tz), true)
            .ok()
            .map(|d| self.floor(d.with_timezone(&Utc)))
    }
}

/// What a tick records for one schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub fire_at: DateTime<Utc>,
    /// `pending` (to run) or `skipped`.
    pub status: &'static str,
    pub note: Option<String>,
}

/// Decides what to record, given the latest recorded firing (`last`) and
/// the time now. Pure.
///
/// - A firing noticed within a minute of its time runs.
/// - Firings missed while the daemon was down: the latest runs once if the
///   policy is `catch_up` and it is within the grace window; every other one
///   is recorded as skipped, so the ledger tells what happened.
/// - A schedule seen for the first time does not run for times before it
///   existed, however recent: its latest fire time is recorded as skipped.
pub fn decide(s: &Schedule, last: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Vec<Entry> {
    let Some(latest) = s.latest_at_or_before(now) else {
        return Vec::new();
    };
    if last.is_some_and(|l| l >= latest) {
        return Vec::new();
    }
    let on_time = now - latest <= ON_TIME;
    let mut entries = Vec::new();
    if let Some(last) = last {
        // Firings between the last recorded one and the latest were missed.
        let mut t = last;
        while let Some(next) = s.next_after(t) {
            if next >= latest || entries.len() >= MAX_RECORDED_MISSES {
                break;
            }
            entries.push(Entry {
                fire_at: next,
                status: "skipped",
                note: Some("missed while the daemon was down or stalled".into()),
            });
            t = next;
        }
    } else {
        // First sight: the latest fire time is before the schedule existed
        // (even a second before); it is recorded as the baseline, not run.
        return vec![Entry {
            fire_at: latest,
            status: "skipped",
            note: Some("before the schedule was first seen".into()),
        }];
    }
    let latest_entry = if on_time {
        Entry {
            fire_at: latest,
            status: "pending",
            note: None,
        }
    } else if s.missed == MissedPolicy::CatchUp && now - latest <= s.grace {
        Entry {
            fire_at: latest,
            status: "pending",
            note: Some(format!(
                "catch-up: missed while the daemon was down, run at {now}"
            )),
        }
    } else {
        let why = if s.missed == MissedPolicy::Skip {
            "missed while the daemon was down (policy: skip)".to_owned()
        } else {
            format!(
                "missed while the daemon was down, older than the {} min grace window",
                s.grace.num_minutes()
            )
        };
        Entry {
            fire_at: latest,
            status: "skipped",
            note: Some(why),
        }
    };
    entries.push(latest_entry);
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(cron: &str, tz: &str, missed: MissedPolicy) -> Schedule {
        Schedule::parse(&ScheduleConfig {
            name: "nightly".into(),
            cron: cron.into(),
            timezone: tz.into(),
            rules: None,
            missed,
            grace_minutes: 720,
            customers: Default::default(),
        })
        .unwrap()
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn local(s: &Schedule, t: DateTime<Utc>) -> String {
        t.with_timezone(&s.tz)
            .format("%Y-%m-%d %H:%M %Z")
            .to_string()
    }

    #[test]
    fn a_0200_zagreb_nightly_fires_at_local_0200_across_both_dst_changes() {
        let s = schedule("0 2 * * *", "Europe/Zagreb", MissedPolicy::CatchUp);
        // March: clocks jump 02:00 → 03:00 on Sunday 29 March 2026.
        let mut t = utc("2026-03-26T12:00:00Z");
        let mut fired = Vec::new();
        for _ in 0..6 {
            t = s.next_after(t).unwrap();
            fired.push(local(&s, t));
        }
        assert_eq!(
            fired,
            [
                "2026-03-27 02:00 CET",
                "2026-03-28 02:00 CET",
                // 02:00 does not exist that night: the run goes at the first moment after the gap.
                "2026-03-29 03:00 CEST",
                "2026-03-30 02:00 CEST",
                "2026-03-31 02:00 CEST",
                "2026-04-01 02:00 CEST",
            ]
        );
        assert_eq!(
            utc("2026-03-30T00:00:00Z"),
            s.next_after(utc("2026-03-29T12:00:00Z")).unwrap(),
            "after the change 02:00 local is 00:00 UTC"
        );
        // October: 03:00 → 02:00 on Sunday 25 October 2026; 02:00 happens twice, we fire once.
        let mut t = utc("2026-10-22T12:00:00Z");
        let mut fired = Vec::new();
        for _ in 0..5 {
            t = s.next_after(t).unwrap();
            fired.push((local(&s, t), t));
        }
        let labels: Vec<&str> = fired.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(
            labels,
            [
                "2026-10-23 02:00 CEST",
                "2026-10-24 02:00 CEST",
                "2026-10-25 02:00 CEST",
                "2026-10-26 02:00 CET",
                "2026-10-27 02:00 CET",
            ]
        );
        assert_eq!(fired[3].1, utc("2026-10-26T01:00:00Z"));
    }

    #[test]
    fn five_and_six_field_crons_work_and_bad_ones_name_the_schedule() {
        let s = schedule("30 0 2 * * *", "UTC", MissedPolicy::CatchUp);
        assert_eq!(
            s.next_after(utc("2026-01-01T00:00:00Z")).unwrap(),
            utc("2026-01-01T02:00:30Z")
        );
        for (cron, tz, needle) in [
            ("0 25 * * *", "UTC", "invalid cron"),
            ("* * *", "UTC", "has 3 fields"),
            ("0 2 * * *", "Europe/Atlantis", "unknown time zone"),
        ] {
            let e = Schedule::parse(&ScheduleConfig {
                name: "weekly".into(),
                cron: cron.into(),
                timezone: tz.into(),
                rules: None,
                missed: MissedPolicy::CatchUp,
                grace_minutes: 60,
                customers: Default::default(),
            })
            .unwrap_err();
            assert!(
                e.contains("schedule \"weekly\"") && e.contains(needle),
                "{e}"
            );
        }
    }

    #[test]
    fn ticks_decide_on_time_runs_catch_up_and_skip() {
        let s = schedule("0 2 * * *", "UTC", MissedPolicy::CatchUp);
        let two = utc("2026-05-10T02:00:00Z");
        // First ever sight, a second after 02:00: that firing predates the
        // schedule; it is the baseline, not a run.
        let e = decide(&s, None, two + Duration::seconds(1));
        assert_eq!(
            e,
            vec![Entry {
                fire_at: two,
                status: "skipped",
                note: Some("before the schedule was first seen".into())
            }]
        );
        // Seen since yesterday: on time (noticed 1 s late), it runs.
        let e = decide(
            &s,
            Some(two - Duration::days(1)),
            two + Duration::seconds(1),
        );
        assert_eq!(
            e,
            vec![Entry {
                fire_at: two,
                status: "pending",
                note: None
            }]
        );
        // Already recorded: nothing.
        assert!(decide(&s, Some(two), two + Duration::seconds(2)).is_empty());
        // First seen at 10:00: nothing runs for 02:00, the baseline is recorded.
        let e = decide(&s, None, utc("2026-05-10T10:00:00Z"));
        assert_eq!(e[0].status, "skipped");
        // Down from the 10th to the 13th at 05:00: the 11th and 12th are skipped,
        // the 13th runs once as a catch-up.
        let e = decide(&s, Some(two), utc("2026-05-13T05:00:00Z"));
        let statuses: Vec<_> = e
            .iter()
            .map(|x| (x.fire_at.to_rfc3339(), x.status))
            .collect();
        assert_eq!(
            statuses,
            [
                ("2026-05-11T02:00:00+00:00".to_owned(), "skipped"),
                ("2026-05-12T02:00:00+00:00".to_owned(), "skipped"),
                ("2026-05-13T02:00:00+00:00".to_owned(), "pending"),
            ]
        );
        assert!(e[2].note.as_deref().unwrap().starts_with("catch-up"));
        // Beyond the grace window (12 h): skipped.
        let e = decide(&s, Some(two), utc("2026-05-13T15:00:00Z"));
        assert_eq!(e.last().unwrap().status, "skipped");
        // Policy skip: skipped even when recent.
        let skip = schedule("0 2 * * *", "UTC", MissedPolicy::Skip);
        let e = decide(&skip, Some(two), utc("2026-05-11T03:00:00Z"));
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].status, "skipped");
    }

    /// Ticks once a second at a fraction past the second, as the daemon's
    /// heartbeat does, recording what `decide` says like the ledger would.
    fn tick_through(s: &Schedule, from: &str, seconds: i64) -> Vec<Entry> {
        let start = utc(from);
        let mut last = Some(start - Duration::days(400));
        let mut ledger = Vec::new();
        for i in 0..seconds {
            let now = start + Duration::seconds(i) + Duration::milliseconds(137 + 61 * (i % 13));
            for e in decide(s, last, now) {
                last = Some(last.map_or(e.fire_at, |l| l.max(e.fire_at)));
                ledger.push(e);
            }
        }
        ledger
    }

    #[test]
    fn each_fire_time_is_recorded_once_whatever_fraction_of_a_second_the_ticks_come_at() {
        let daily = schedule("20 06 * * *", "UTC", MissedPolicy::CatchUp);
        let e = tick_through(&daily, "2026-05-10T06:19:30Z", 120);
        // The baseline of the first tick (yesterday's 06:20, missed long
        // ago) and today's 06:20 once, on time.
        let runs: Vec<_> = e.iter().filter(|e| e.status == "pending").collect();
        assert_eq!(runs.len(), 1, "{e:?}");
        assert_eq!(runs[0].fire_at, utc("2026-05-10T06:20:00Z"));
        assert_eq!(runs[0].note, None);

        let every5 = schedule("*/5 * * * * *", "UTC", MissedPolicy::CatchUp);
        let e = tick_through(&every5, "2026-05-10T06:19:30Z", 60);
        let runs: Vec<_> = e.iter().filter(|e| e.status == "pending").collect();
        assert_eq!(runs.len(), 12, "one run per fire time: {e:?}");
        assert!(
            runs.iter()
                .all(|r| r.fire_at.timestamp_subsec_nanos() == 0 && r.fire_at.timestamp() % 5 == 0)
        );
        let skipped: Vec<_> = e
            .iter()
            .filter(|e| e.status == "skipped" && e.fire_at >= utc("2026-05-10T06:19:30Z"))
            .collect();
        assert!(skipped.is_empty(), "nothing missed while up: {skipped:?}");
    }

    #[test]
    fn a_stall_or_a_clock_step_catches_up_once_and_a_step_back_runs_nothing_twice() {
        let every5 = schedule("*/5 * * * * *", "UTC", MissedPolicy::CatchUp);
        let t = utc("2026-05-10T06:00:00.250Z");
        let last = Some(utc("2026-05-10T06:00:00Z"));
        // Stopped for 12 s: the two fire times in between are skipped, the
        // latest runs (within the on-time minute).
        let e = decide(&every5, last, t + Duration::seconds(12));
        let statuses: Vec<_> = e.iter().map(|e| e.status).collect();
        assert_eq!(statuses, ["skipped", "pending"]);
        assert_eq!(e[1].fire_at, utc("2026-05-10T06:00:10Z"));
        // The wall clock steps back an hour: nothing is due again.
        assert!(decide(&every5, Some(e[1].fire_at), t - Duration::hours(1)).is_empty());
        // And forward a day: one catch-up run, the misses recorded (bounded).
        let e = decide(
            &every5,
            Some(utc("2026-05-10T06:00:10Z")),
            t + Duration::days(1),
        );
        assert_eq!(e.iter().filter(|e| e.status == "pending").count(), 1);
        assert!(e.len() <= MAX_RECORDED_MISSES + 1);
    }
}
