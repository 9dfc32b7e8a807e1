//! Who holds a lease, and whether that process is dead.
//!
//! Every lease engaged takes (a schedule firing being run, the planner lock,
//! a claim of outbox rows) names its holder with a token that starts with
//! this process's identity: `boot id:pid namespace:pid:start time`. A lease
//! whose holder died on this machine can then be taken over at once instead
//! of when it expires ([`reap_dead_holders`]); a holder on another machine
//! (or an identity that cannot be read) is only ever taken over when its
//! lease ends.
//!
//! The start time (in clock ticks since boot, from `/proc/PID/stat`) tells a
//! reused pid from the original process; the boot id tells a pid of a
//! previous boot; the pid namespace keeps containers on one kernel from
//! judging each other's pids. Off Linux, or without `/proc`, nothing is ever
//! judged dead.

use std::sync::OnceLock;

use chrono::{DateTime, Utc};

use crate::store::{Store, StoreResult};

/// What `identity` reads for a process: `(boot id, pid namespace, start time)`.
fn proc_identity(pid: &str) -> Option<(String, String, String)> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let ns = std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some((
        boot.trim().to_owned(),
        ns_number(&ns.to_string_lossy())?,
        start_time(&stat)?,
    ))
}

/// `pid:[4026531836]` → `4026531836`.
fn ns_number(link: &str) -> Option<String> {
    let inner = link.strip_prefix("pid:[")?.strip_suffix(']')?;
    inner
        .chars()
        .all(|c| c.is_ascii_digit())
        .then(|| inner.to_owned())
}

/// Field 22 of `/proc/PID/stat` (the command name, field 2, may hold spaces
/// and parentheses, so fields are counted after its last `)`).
fn start_time(stat: &str) -> Option<String> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19).map(str::to_owned)
}

/// This process's identity, or `None` where it cannot be read.
fn this_process() -> Option<&'static str> {
    static ID: OnceLock<Option<String>> = OnceLock::new();
    ID.get_or_init(|| {
        let (boot, ns, start) = proc_identity("self")?;
        Some(format!("{boot}:{ns}:{}:{start}", std::process::id()))
    })
    .as_deref()
}

/// The identity of a running process (for tests that need a process to kill).
pub fn identity_of(pid: u32) -> Option<String> {
    let (boot, ns, start) = proc_identity(&pid.to_string())?;
    Some(format!("{boot}:{ns}:{pid}:{start}"))
}

/// A new lease-holder token for this process: its identity, `/`, and a
/// random part that makes each lease's token unique.
pub fn holder_token() -> String {
    let random = crate::unsubscribe::random_secret();
    match this_process() {
        Some(id) => format!("{id}/{random}"),
        None => format!("unknown/{random}"),
    }
}

/// The process part of a holder token (`identity` of `identity/random`).
pub fn process_of(holder: &str) -> &str {
    holder.split_once('/').map_or(holder, |(p, _)| p)
}

/// Whether `holder` names a process of this machine (same boot, same pid
/// namespace) that is no longer running. Anything else is presumed alive.
pub fn is_dead_here(holder: &str) -> bool {
    let Some(me) = this_process() else {
        return false;
    };
    let mut mine = me.split(':');
    let theirs: Vec<&str> = process_of(holder).split(':').collect();
    let [boot, ns, pid, start] = theirs[..] else {
        return false;
    };
    if mine.next() != Some(boot) || mine.next() != Some(ns) || pid.parse::<u32>().is_err() {
        return false;
    }
    if process_of(holder) == me {
        return false;
    }
    let dir = std::path::Path::new("/proc").join(pid);
    match std::fs::read_to_string(dir.join("stat")) {
        // Gone: dead. (A zombie still has its stat; it cannot send either,
        // but its parent may yet reap it, so wait for that.)
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        // Unreadable for another reason (permissions): presume alive.
        Err(_) => false,
        // The pid was reused by a later process.
        Ok(stat) => start_time(&stat).is_some_and(|s| s != start),
    }
}

/// Releases every lease held by processes of this machine that died: their
/// running firings are queued again (unless their plan was committed), the
/// planner lock is freed, their claimed outbox rows and partitions of runs
/// are pending again.
/// Returns how many holders were reaped.
pub async fn reap_dead_holders(store: &dyn Store, now: DateTime<Utc>) -> StoreResult<usize> {
    let mut dead: Vec<String> = store
        .lease_holders()
        .await?
        .iter()
        .filter(|h| is_dead_here(h))
        .map(|h| process_of(h).to_owned())
        .collect();
    dead.sort();
    dead.dedup();
    for process in &dead {
        let released = store.release_holder(process, now).await?;
        tracing::warn!(
            holder = %process,
            firings = released.firings,
            planner_lock = released.planner_lock,
            actions = released.actions,
            partitions = released.partitions,
            "A process holding leases died; what it held is released."
        );
    }
    Ok(dead.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_time_is_read_after_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(start_time(stat).as_deref(), Some("987654"));
        assert_eq!(ns_number("pid:[4026531836]").as_deref(), Some("4026531836"));
        assert_eq!(ns_number("net:[1]"), None);
    }

    #[test]
    fn this_process_is_alive_and_foreign_or_unknown_holders_are_presumed_alive() {
        let me = holder_token();
        assert!(!is_dead_here(&me));
        assert!(!is_dead_here("elsewhere"));
        assert!(!is_dead_here("unknown/abc"));
        // Another boot of this machine, or another pid namespace: not ours to judge.
        assert!(!is_dead_here("otherboot:1:999999:1/x"));
    }

    #[test]
    fn a_process_that_exited_is_dead_and_a_reused_pid_is_told_apart() {
        let Some(me) = this_process() else {
            return; // no /proc here: nothing is ever judged dead
        };
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let id = identity_of(child.id()).unwrap();
        assert!(!is_dead_here(&format!("{id}/r")), "running");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(is_dead_here(&format!("{id}/r")), "exited");
        // Our own pid with another start time: a reused pid, so the holder is dead.
        let fields: Vec<&str> = me.split(':').collect();
        let reused = format!("{}:{}:{}:1/r", fields[0], fields[1], fields[2]);
        assert!(is_dead_here(&reused));
    }
}
