//! The scheduler's pulse: when it last ticked successfully, on the
//! monotonic clock, so `/readyz` can say the scheduler is stalled and the
//! watchdog can tell a stall (SIGSTOP, an overloaded machine, a statement
//! that hangs) and a wall-clock step from a normal tick.
//!
//! Pure: every method takes the instants it reasons about.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

/// With no successful tick for this long, the scheduler is stalled:
/// `/readyz` answers 503 and the watchdog logs it.
pub const STALL_AFTER: Duration = Duration::from_secs(10);
/// A gap this long between two watchdog beats means the process did not
/// run (stopped, starved) in between.
pub const GAP: Duration = Duration::from_secs(3);
/// The wall clock moving this much more (or less) than the monotonic clock
/// between two beats is a clock step.
pub const STEP: chrono::Duration = chrono::Duration::seconds(2);

#[derive(Debug)]
struct Pulse {
    started: Instant,
    last_ok: Option<Instant>,
    /// The watchdog's previous beat: monotonic and wall-clock readings.
    last_beat: Option<(Instant, DateTime<Utc>)>,
    /// A stall was reported and has not ended yet.
    reported: bool,
}

/// Shared between the ticking tasks, the watchdog and `/readyz`.
#[derive(Debug)]
pub struct Heartbeat(Mutex<Pulse>);

/// What the watchdog noticed at one beat.
#[derive(Clone, Debug, PartialEq)]
pub enum Notice {
    /// The process did not run for this long.
    Gap(Duration),
    /// The wall clock moved by this much more than real time passed.
    ClockStep(chrono::Duration),
    /// No successful tick for this long (reported once per stall).
    Stalled(Duration),
    /// Ticking again after a stall of this long.
    Recovered(Duration),
}

impl Heartbeat {
    pub fn new(now: Instant) -> Self {
        Self(Mutex::new(Pulse {
            started: now,
            last_ok: None,
            last_beat: None,
            reported: false,
        }))
    }

    fn pulse(&self) -> std::sync::MutexGuard<'_, Pulse> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A tick finished without error.
    pub fn ticked(&self, at: Instant) {
        self.pulse().last_ok = Some(at);
    }

    /// How long since the last successful tick (or since start).
    pub fn since_ok(&self, at: Instant) -> Duration {
        let p = self.pulse();
        at.saturating_duration_since(p.last_ok.unwrap_or(p.started))
    }

    /// `Err(how long)` when the scheduler is stalled.
    pub fn readiness(&self, at: Instant) -> Result<(), Duration> {
        let since = self.since_ok(at);
        if since > STALL_AFTER {
            Err(since)
        } else {
            Ok(())
        }
    }

    /// One watchdog beat at monotonic `at`, wall-clock `wall`: what to log.
    pub fn beat(&self, at: Instant, wall: DateTime<Utc>) -> Vec<Notice> {
        let mut p = self.pulse();
        let mut notices = Vec::new();
        if let Some((then, then_wall)) = p.last_beat {
            let real = at.saturating_duration_since(then);
            if real > GAP {
                notices.push(Notice::Gap(real));
            }
            let real = chrono::Duration::from_std(real).unwrap_or_default();
            let step = (wall - then_wall) - real;
            if step.abs() > STEP {
                notices.push(Notice::ClockStep(step));
            }
        }
        p.last_beat = Some((at, wall));
        let since = at.saturating_duration_since(p.last_ok.unwrap_or(p.started));
        if since > STALL_AFTER && !p.reported {
            p.reported = true;
            notices.push(Notice::Stalled(since));
        } else if since <= STALL_AFTER && p.reported {
            p.reported = false;
            notices.push(Notice::Recovered(since));
        }
        notices
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_is_reported_once_and_its_end_too() {
        let t0 = Instant::now();
        let wall = Utc::now();
        let s = |n: u64| Duration::from_secs(n);
        let w = |n: i64| wall + chrono::Duration::seconds(n);
        let h = Heartbeat::new(t0);
        h.ticked(t0);
        assert!(h.beat(t0 + s(1), w(1)).is_empty());
        assert_eq!(h.readiness(t0 + s(5)), Ok(()));
        // No successful tick for 12 s (a statement hangs): stalled, once.
        assert_eq!(h.beat(t0 + s(2), w(2)), vec![]);
        let n = h.beat(t0 + s(12), w(12));
        assert!(n.contains(&Notice::Stalled(s(12))), "{n:?}");
        assert!(n.contains(&Notice::Gap(s(10))), "{n:?}");
        assert!(h.readiness(t0 + s(12)).is_err());
        assert!(
            !h.beat(t0 + s(13), w(13))
                .iter()
                .any(|n| matches!(n, Notice::Stalled(_)))
        );
        h.ticked(t0 + s(13));
        assert_eq!(h.readiness(t0 + s(14)), Ok(()));
        assert_eq!(h.beat(t0 + s(14), w(14)), vec![Notice::Recovered(s(1))]);
    }

    #[test]
    fn a_wall_clock_step_either_way_is_noticed() {
        let t0 = Instant::now();
        let wall = Utc::now();
        let h = Heartbeat::new(t0);
        h.ticked(t0);
        h.beat(t0, wall);
        let n = h.beat(
            t0 + Duration::from_secs(1),
            wall + chrono::Duration::hours(1),
        );
        assert!(matches!(n[..], [Notice::ClockStep(d)] if d > chrono::Duration::minutes(59)));
        let n = h.beat(
            t0 + Duration::from_secs(2),
            wall + chrono::Duration::seconds(2),
        );
        assert!(matches!(n[..], [Notice::ClockStep(d)] if d < -chrono::Duration::minutes(59)));
    }
}
