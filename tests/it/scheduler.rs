//! The daemon under real time and real signals: `engaged serve` as a child
//! process on the real clock, a real SMTP server, SIGSTOP/SIGCONT, SIGKILL
//! and SIGTERM. One run per fire time; a scheduler that survives stalls;
//! leases of dead processes taken over at once; a bounded shutdown; and a
//! chaos run that kills the daemon a dozen times and loses nothing.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::{DateTime, Timelike, Utc};
use rand::Rng;

use crate::helpers::{ADMIN_TOKEN, TestApp, free_port};

/// `engaged serve` as a child process, its log in a file.
struct Serve {
    child: tokio::process::Child,
    pid: u32,
    port: u16,
    log: PathBuf,
}

impl Serve {
    /// Starts `engaged serve` and waits until `/healthz` answers.
    async fn start(app: &TestApp, port: u16) -> Self {
        let log = app.path("serve.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = app.command(&["serve"]);
        cmd.stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out));
        let child = app.serve(port, &mut cmd).await;
        let pid = child.id().unwrap();
        Self {
            child,
            pid,
            port,
            log,
        }
    }

    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {}", self.pid);
    }

    async fn kill(mut self) {
        self.signal("KILL");
        let _ = self.child.wait().await;
    }

    /// SIGTERM; returns the exit code and how long the exit took.
    async fn terminate(mut self) -> (Option<i32>, Duration) {
        let started = Instant::now();
        self.signal("TERM");
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("serve exits after SIGTERM")
            .unwrap();
        (status.code(), started.elapsed())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn readyz(&self) -> (u16, String) {
        match reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/readyz", self.port))
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    }
}

/// Config for a daemon on `port`: `delivery` lines added to `[delivery]`,
/// then `schedules` (`[[schedules]]` tables).
fn daemon_config(app: &TestApp, port: u16, delivery: &str, schedules: &str) {
    app.write_config(&format!(
        "[http]\nlisten = \"127.0.0.1:{port}\"\n\n[delivery]\nshutdown_grace_ms = 2000\n{delivery}\n{schedules}"
    ));
}

fn schedule(name: &str, cron: &str) -> String {
    format!("[[schedules]]\nname = \"{name}\"\ncron = \"{cron}\"\ntimezone = \"UTC\"\n\n")
}

/// Leaves only the welcome rule, so every email is a welcome to a customer.
fn only_welcome(app: &TestApp) {
    for entry in std::fs::read_dir(app.path("rules")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path).unwrap();
        } else if path.file_stem().is_some_and(|s| s != "welcome") {
            std::fs::remove_file(&path).unwrap();
        }
    }
}

/// `n` customers who signed up an hour ago (the welcome rule mails them).
fn customers(prefix: &str, n: usize) -> String {
    let signed_up = (Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let mut csv = String::from("id,email,created_at\n");
    for i in 0..n {
        csv.push_str(&format!(
            "{prefix}{i:03},{prefix}{i:03}@example.com,{signed_up}\n"
        ));
    }
    csv
}

/// Waits for `cond` (checked every 100 ms) or fails after `timeout`.
async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daily_and_an_every_5_s_schedule_run_once_per_fire_time_over_a_minute() {
    let app = TestApp::new().await;
    let port = free_port();
    // The daily schedule is due at the next whole minute, within the minute
    // the daemon is up.
    let due = Utc::now() + chrono::Duration::minutes(1);
    let due = due.with_second(0).unwrap().with_nanosecond(0).unwrap();
    daemon_config(
        &app,
        port,
        "",
        &format!(
            "{}{}",
            schedule("every5", "*/5 * * * * *"),
            schedule("daily", &format!("{} {} * * *", due.minute(), due.hour()))
        ),
    );
    only_welcome(&app);
    app.import_customers(&customers("c", 3)).await;
    let started = Utc::now();
    let serve = Serve::start(&app, port).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    let log = serve.log();
    let (code, _) = serve.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    let stopped = Utc::now();

    let store = app.store().await;
    let every5 = store.firings("every5").await.unwrap();
    assert_eq!(every5[0].status, "skipped", "{every5:#?}");
    assert_eq!(
        every5[0].note.as_deref(),
        Some("before the schedule was first seen")
    );
    assert!(
        every5[0].fire_at <= started,
        "the baseline predates the start"
    );
    let ran = &every5[1..];
    assert!(ran.len() >= 11, "about 12 fire times in 60 s: {every5:#?}");
    for (i, f) in ran.iter().enumerate() {
        assert_eq!(f.fire_at.timestamp_subsec_nanos(), 0, "{f:?}");
        assert_eq!(f.fire_at.timestamp() % 5, 0, "{f:?}");
        assert_eq!(
            f.fire_at,
            every5[0].fire_at + chrono::Duration::seconds(5 * (i as i64 + 1)),
            "consecutive fire times, none missed or repeated: {every5:#?}"
        );
        let last = i == ran.len() - 1;
        let status_ok = f.status == "done" || (last && f.status == "pending");
        assert!(status_ok, "{f:?} in {every5:#?}");
        if f.status == "done" {
            assert!(f.run_id.is_some(), "{f:?}");
        }
    }
    assert!(
        !log.contains("missed"),
        "nothing was missed while up:\n{log}"
    );

    let daily = store.firings("daily").await.unwrap();
    let seen: Vec<(DateTime<Utc>, &str)> = daily
        .iter()
        .map(|f| (f.fire_at, f.status.as_str()))
        .collect();
    assert_eq!(
        seen,
        [(due - chrono::Duration::days(1), "skipped"), (due, "done")],
        "{daily:#?}"
    );
    assert!(due < stopped);

    // One run per fire time: as many runs as done firings, each its own.
    let runs = store.runs(1000).await.unwrap();
    let mut per_trigger: BTreeMap<String, usize> = BTreeMap::new();
    for r in &runs {
        *per_trigger.entry(r.trigger.clone()).or_default() += 1;
    }
    let done =
        |fs: &[engaged::store::FiringRecord]| fs.iter().filter(|f| f.status == "done").count();
    assert_eq!(per_trigger.get("schedule:every5"), Some(&done(&every5)));
    assert_eq!(per_trigger.get("schedule:daily"), Some(&1));
    let mut ids: Vec<i64> = every5
        .iter()
        .chain(&daily)
        .filter_map(|f| f.run_id)
        .collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "each firing has a run of its own");
    // The three customers were welcomed once, by whichever run came first.
    assert_eq!(app.smtp.count(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_5_s_sigstop_the_scheduler_notices_and_the_next_fire_times_still_run() {
    let app = TestApp::new().await;
    let port = free_port();
    daemon_config(&app, port, "", &schedule("every2", "*/2 * * * * *"));
    only_welcome(&app);
    app.import_customers(&customers("c", 2)).await;
    let serve = Serve::start(&app, port).await;
    let store = app.store().await;
    let done_after = |t: DateTime<Utc>| {
        let store = std::sync::Arc::clone(&store);
        async move {
            store
                .firings("every2")
                .await
                .unwrap()
                .iter()
                .filter(|f| f.status == "done" && f.fire_at > t)
                .count()
        }
    };
    wait_until(
        "two runs before the stall",
        Duration::from_secs(20),
        || async { done_after(DateTime::<Utc>::MIN_UTC).await >= 2 },
    )
    .await;
    serve.signal("STOP");
    tokio::time::sleep(Duration::from_secs(5)).await;
    serve.signal("CONT");
    let resumed = Utc::now();
    wait_until(
        "two fire times after the stall to run",
        Duration::from_secs(20),
        || async { done_after(resumed).await >= 2 },
    )
    .await;
    assert_eq!(serve.readyz().await.0, 200);
    let log = serve.log();
    assert!(
        log.contains("did not run for"),
        "the stall is logged:\n{log}"
    );
    let (code, _) = serve.terminate().await;
    assert_eq!(code, Some(0));
    // The fire times during the stall: the latest ran late (catch-up within
    // the on-time minute), the earlier ones are recorded as missed.
    let firings = store.firings("every2").await.unwrap();
    assert!(
        firings
            .iter()
            .all(|f| matches!(f.status.as_str(), "done" | "skipped" | "pending")),
        "{firings:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scheduler_that_cannot_tick_fails_readyz_and_says_so_until_it_ticks_again() {
    use sqlx::Connection;
    let app = TestApp::new().await;
    let port = free_port();
    daemon_config(&app, port, "", &schedule("every1", "* * * * * *"));
    let serve = Serve::start(&app, port).await;
    wait_until("ticks", Duration::from_secs(10), || async {
        serve.log().contains("Schedule fired.")
    })
    .await;
    assert_eq!(serve.readyz().await.0, 200);
    // Another process holds SQLite's write lock: each tick's write waits.
    let mut blocker = sqlx::SqliteConnection::connect(&app.db_url())
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut blocker)
        .await
        .unwrap();
    wait_until("readyz to fail", Duration::from_secs(25), || async {
        let (status, body) = serve.readyz().await;
        status == 503 && body.contains("the scheduler has not ticked")
    })
    .await;
    wait_until("the stall to be logged", Duration::from_secs(5), || async {
        serve.log().contains("The scheduler has not ticked for")
    })
    .await;
    sqlx::query("COMMIT").execute(&mut blocker).await.unwrap();
    wait_until("readyz to recover", Duration::from_secs(25), || async {
        serve.readyz().await.0 == 200
    })
    .await;
    wait_until(
        "the recovery to be logged",
        Duration::from_secs(5),
        || async { serve.log().contains("The scheduler is ticking again.") },
    )
    .await;
    let (code, _) = serve.terminate().await;
    assert_eq!(code, Some(0));
}

/// The identity of a process that ran on this machine and is gone.
async fn dead_process_holder() -> String {
    let mut child = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let id = engaged::liveness::identity_of(child.id()).expect("/proc is readable");
    child.kill().unwrap();
    child.wait().unwrap();
    format!("{id}/gone")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_killed_mid_plan_is_taken_over_at_the_next_start_not_when_its_lease_ends() {
    let app = TestApp::new().await;
    let port = free_port();
    daemon_config(&app, port, "", "");
    only_welcome(&app);
    app.import_customers(&customers("c", 1)).await;
    let store = app.store().await;
    // A planner elsewhere holds the lock, so the run waits mid-plan.
    let wall = Utc::now();
    assert!(
        store
            .try_lock_planner("elsewhere", wall, wall + chrono::Duration::hours(1))
            .await
            .unwrap()
    );
    let serve = Serve::start(&app, port).await;
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/admin/runs"))
        .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // The firing began a run; its one partition is claimed, waiting.
    let claimed = || async {
        let run = store.runs(1).await.unwrap().pop()?;
        let parts = store.run_partitions(run.id).await.unwrap();
        Some((run, parts))
    };
    wait_until(
        "the run to claim its partition",
        Duration::from_secs(15),
        || async {
            claimed()
                .await
                .is_some_and(|(_, parts)| parts[0].status == "claimed")
        },
    )
    .await;
    serve.kill().await;
    let (run, parts) = claimed().await.unwrap();
    assert_eq!(run.status, "planning", "left planning by the kill");
    assert_eq!(parts[0].status, "claimed");
    assert_eq!(store.firings("manual").await.unwrap()[0].status, "done");

    // The next start reaps the claim (its holder is a dead process here)
    // instead of waiting for its lease (15 s) to end, and finishes the run.
    store.unlock_planner("elsewhere").await.unwrap();
    let restarted = std::time::Instant::now();
    let serve = Serve::start(&app, port).await;
    app.smtp.wait_for(1, Duration::from_secs(15)).await;
    assert!(
        restarted.elapsed() < Duration::from_secs(12),
        "taken over because its process died, not because its lease ended: {:?}",
        restarted.elapsed()
    );
    let (run, parts) = claimed().await.unwrap();
    assert_eq!(run.status, "completed");
    assert_eq!((parts[0].status.as_str(), parts[0].claims), ("done", 2));
    let (code, _) = serve.terminate().await;
    assert_eq!(code, Some(0));
    assert_eq!(app.smtp.count(), 1, "one welcome, once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_planner_lock_left_by_a_dead_process_does_not_hold_up_the_next_run() {
    let app = TestApp::new().await;
    only_welcome(&app);
    app.import_customers(&customers("c", 1)).await;
    let store = app.store().await;
    let wall = Utc::now();
    let dead = dead_process_holder().await;
    assert!(
        store
            .try_lock_planner(&dead, wall, wall + chrono::Duration::hours(1))
            .await
            .unwrap()
    );
    // Without the takeover this run would wait an hour (the helper gives up
    // after a minute).
    let r = app.engaged(&["run", "--json"]).await;
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(app.smtp.count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_exits_within_the_grace_period_with_a_send_a_slow_client_and_an_evaluation_in_flight()
 {
    let app = TestApp::new().await;
    let port = free_port();
    daemon_config(&app, port, "concurrency = 2", "");
    app.import_customers(&customers("w", 40)).await;
    // Many long-standing customers for a slow rule to chew on.
    let mut old = String::from("id,email,created_at\n");
    for i in 0..3000 {
        old.push_str(&format!(
            "o{i:04},o{i:04}@example.com,2020-01-01T00:00:00Z\n"
        ));
    }
    app.import_customers(&old).await;
    only_welcome(&app);
    app.smtp.set_delay(Duration::from_secs(20));
    let serve = Serve::start(&app, port).await;
    let admin_run = || async {
        let r = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{port}/admin/runs"))
            .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    };
    admin_run().await;
    let store = app.store().await;
    wait_until("two sends in flight", Duration::from_secs(20), || async {
        store.outbox_counts().await.unwrap().sending >= 2
    })
    .await;
    // A slow rule arrives by hot reload, and a second run evaluates it.
    app.write(
        "rules/slow.rhai",
        "let x = 0;\nfor i in 0..20000 { x += i; }\nif x < 0 { send_email(\"welcome\"); }\n",
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Admin requests in one millisecond would merge; wait a little.
    admin_run().await;
    let second_run = || async {
        let runs = store.runs(10).await.unwrap();
        let run = runs.into_iter().find(|r| r.id > 1)?;
        let parts = store.run_partitions(run.id).await.unwrap();
        Some((run, parts))
    };
    wait_until(
        "the second run to evaluate",
        Duration::from_secs(20),
        || async {
            second_run()
                .await
                .is_some_and(|(_, parts)| parts.iter().any(|p| p.status == "claimed"))
        },
    )
    .await;
    // A client that sends half a request and waits.
    let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut slow, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();

    let (code, took) = serve.terminate().await;
    assert_eq!(code, Some(0));
    assert!(
        took <= Duration::from_millis(2000 + 1000),
        "exited {took:?} after SIGTERM with a 2 s grace"
    );
    // What was claimed but not being sent was released at once; only the
    // two sends in flight stay claimed, by a process that is gone.
    let counts = store.outbox_counts().await.unwrap();
    assert!(counts.sending <= 2, "{counts:?}");
    assert_eq!(counts.sent, 0, "{counts:?}");
    // The second run stays planning; the shutdown gave its claimed
    // partitions back, for the next start to take at once.
    let (run, parts) = second_run().await.unwrap();
    assert_eq!(run.status, "planning");
    assert!(parts.iter().all(|p| p.status == "pending"), "{parts:?}");

    // A restart delivers at once (no waiting for leases) and runs the
    // interrupted firing; only the sends that were in flight may repeat.
    std::fs::remove_file(app.path("rules/slow.rhai")).unwrap();
    app.smtp.set_delay(Duration::ZERO);
    let serve = Serve::start(&app, port).await;
    app.smtp.wait_for(40, Duration::from_secs(30)).await;
    wait_until("the interrupted run", Duration::from_secs(20), || async {
        second_run()
            .await
            .is_some_and(|(run, _)| run.status == "completed")
    })
    .await;
    let (code, _) = serve.terminate().await;
    assert_eq!(code, Some(0));
    let mut to: Vec<String> = app
        .smtp
        .messages()
        .iter()
        .map(|m| m.rcpt_to[0].clone())
        .collect();
    to.sort();
    let total = to.len();
    to.dedup();
    assert_eq!(to.len(), 40, "every customer got the welcome");
    assert!(
        total <= 40 + 2,
        "only the two sends in flight may repeat: {total}"
    );
}

/// Message-ID → how many copies arrived, and when the first one did.
fn copies(app: &TestApp) -> HashMap<String, (usize, Instant)> {
    let mut by_id: HashMap<String, (usize, Instant)> = HashMap::new();
    for m in app.smtp.messages() {
        let id = m.header("Message-ID").unwrap_or_default();
        let e = by_id.entry(id).or_insert((0, m.received_at));
        e.0 += 1;
        e.1 = e.1.min(m.received_at);
    }
    by_id
}

#[tokio::test(flavor = "multi_thread")]
async fn chaos_a_dozen_sigkills_and_a_stall_lose_no_email_and_run_each_fire_time_once() {
    let app = TestApp::new().await;
    let port = free_port();
    daemon_config(
        &app,
        port,
        "concurrency = 4",
        // Every new customer is welcomed: the blast-radius guard would
        // rightly hold a run that mails them all.
        &format!(
            "[guard]\nmin_count = 1000000\n\n{}",
            schedule("chaos", "*/2 * * * * *")
        ),
    );
    only_welcome(&app);
    // A little latency per message, so kills land during sends too.
    app.smtp.set_delay(Duration::from_millis(30));
    let mut rng = rand::rng();
    let mut kills: Vec<Instant> = Vec::new();
    let mut expected = 0;
    for round in 0..12 {
        // New customers each round: later firings have new work to do.
        app.import_customers(&customers(&format!("r{round:02}_"), 60))
            .await;
        expected += 60;
        let serve = Serve::start(&app, port).await;
        if round == 5 {
            tokio::time::sleep(Duration::from_millis(700)).await;
            serve.signal("STOP");
            tokio::time::sleep(Duration::from_secs(3)).await;
            serve.signal("CONT");
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..3000))).await;
        kills.push(Instant::now());
        serve.kill().await;
    }
    // A last start finishes the work, then stops cleanly.
    let serve = Serve::start(&app, port).await;
    let store = app.store().await;
    let deadline = Instant::now() + Duration::from_secs(90);
    while copies(&app).len() < expected {
        if Instant::now() > deadline {
            let runs: Vec<(i64, String)> = store
                .runs(100)
                .await
                .unwrap()
                .into_iter()
                .map(|r| (r.id, r.status))
                .collect();
            use sqlx::Connection;
            let mut db = sqlx::SqliteConnection::connect(&app.db_url())
                .await
                .unwrap();
            let statuses: Vec<(String, i64, i64)> = sqlx::query_as(
                "SELECT a.status, a.run_id, COUNT(*) FROM actions a GROUP BY a.status, a.run_id",
            )
            .fetch_all(&mut db)
            .await
            .unwrap();
            panic!(
                "{} of {expected} welcomes; outbox {:?}; actions {statuses:?}; runs {runs:?}",
                copies(&app).len(),
                store.outbox_counts().await.unwrap(),
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_until("the outbox to drain", Duration::from_secs(30), || async {
        let c = store.outbox_counts().await.unwrap();
        c.pending == 0 && c.sending == 0
    })
    .await;
    let log = serve.log();
    let (code, _) = serve.terminate().await;
    assert_eq!(code, Some(0), "{log}");

    // Nothing lost: every customer got their welcome.
    let by_id = copies(&app);
    let mut recipients: Vec<String> = app
        .smtp
        .messages()
        .iter()
        .map(|m| m.rcpt_to[0].clone())
        .collect();
    recipients.sort();
    recipients.dedup();
    assert_eq!(recipients.len(), expected, "0 lost");
    assert_eq!(by_id.len(), expected, "one Message-ID per email");
    // Duplicates only for sends in flight at a kill: the first copy arrived
    // within a moment of one.
    for (id, (n, first)) in &by_id {
        if *n > 1 {
            let near_a_kill = kills.iter().any(|k| {
                let (a, b) = if first <= k {
                    (*first, *k)
                } else {
                    (*k, *first)
                };
                b.duration_since(a) < Duration::from_secs(1)
            });
            assert!(near_a_kill, "{id} arrived {n} times, not around a kill");
        }
    }
    let duplicates: usize = by_id.values().map(|(n, _)| n - 1).sum();
    eprintln!(
        "chaos: {} kills, {expected} emails, {duplicates} duplicates, {} messages",
        kills.len(),
        app.smtp.count()
    );
    // At most the sends in flight (concurrency 4) and those accepted within
    // the last group commit (20 ms) per kill.
    assert!(
        duplicates <= kills.len() * 8,
        "{duplicates} duplicates for {} kills",
        kills.len()
    );

    // One run per fire time, and no firing stuck.
    let firings = store.firings("chaos").await.unwrap();
    let runs = store.runs(10_000).await.unwrap();
    // A run killed mid-plan is abandoned by the next one (its staged emails
    // planned afresh); every other run belongs to one firing.
    let chaos_runs: Vec<i64> = runs
        .iter()
        .filter(|r| r.trigger == "schedule:chaos" && r.status != "abandoned")
        .map(|r| r.id)
        .collect();
    let mut fired: Vec<i64> = firings.iter().filter_map(|f| f.run_id).collect();
    fired.sort();
    let mut sorted_runs = chaos_runs.clone();
    sorted_runs.sort();
    assert_eq!(
        fired, sorted_runs,
        "every run belongs to exactly one firing"
    );
    for f in &firings {
        assert_ne!(f.status, "running", "stuck: {f:?}");
        if f.status == "done" {
            assert!(f.run_id.is_some(), "{f:?}");
        }
        if f.status == "pending" {
            assert!(
                Utc::now() - f.fire_at < chrono::Duration::seconds(10),
                "left pending: {f:?}"
            );
        }
    }
    assert!(
        firings.iter().filter(|f| f.status == "done").count() >= 6,
        "{firings:#?}"
    );
}
