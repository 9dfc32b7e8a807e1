//! The CPU-time budget of one evaluation. Rhai's operation limit counts
//! steps, but one step can be container-sized (`a.contains(x)` on a
//! 10,000-item array, `a == b`, `m.keys()`), so 200,000 steps can take
//! seconds. The budget is what the thread spent on this evaluation, not
//! the time that passed: a stopped process (SIGSTOP) or a busy machine does
//! not fail a rule that would fit.
//!
//! Reading a thread's CPU clock is a system call, so it is read only when
//! the cheap wall clock says the budget could be spent (CPU time never runs
//! ahead of wall time on one thread), and evaluations are only measured
//! once they have run for a while (see `super::BUDGET_FROM_OPS`).

use std::time::{Duration, Instant};

/// A running budget, started part-way into an evaluation.
#[derive(Debug)]
pub(super) struct Budget {
    limit: Duration,
    cpu_at_start: Duration,
    /// No need to read the CPU clock before this (wall) time.
    next_look: Instant,
}

impl Budget {
    pub(super) fn start(limit: Duration) -> Self {
        Self {
            limit,
            cpu_at_start: thread_cpu_time(),
            next_look: Instant::now() + limit,
        }
    }

    /// The CPU time spent since the start, once it is past the limit.
    pub(super) fn exceeded(&mut self) -> Option<Duration> {
        let now = Instant::now();
        if now < self.next_look {
            return None;
        }
        let used = thread_cpu_time().saturating_sub(self.cpu_at_start);
        if used > self.limit {
            return Some(used);
        }
        // The thread was not running all that time; the budget cannot run
        // out before the rest of it could have been spent.
        self.next_look = now + (self.limit - used);
        None
    }
}

/// CPU time this thread has used.
#[cfg(unix)]
fn thread_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// Elsewhere, wall time since an arbitrary fixed point stands in for it.
#[cfg(not(unix))]
fn thread_cpu_time() -> Duration {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_is_not_exceeded_by_waiting() {
        let mut b = Budget::start(Duration::from_millis(5));
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(b.exceeded(), None, "sleeping uses no CPU");
    }

    #[test]
    fn a_budget_is_exceeded_by_work() {
        let mut b = Budget::start(Duration::from_millis(5));
        let mut x = 0u64;
        let exceeded = loop {
            for i in 0..10_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            std::hint::black_box(x);
            if let Some(used) = b.exceeded() {
                break used;
            }
        };
        assert!(exceeded > Duration::from_millis(5), "{exceeded:?}");
    }
}
