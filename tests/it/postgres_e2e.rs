//! The real binary on PostgreSQL: the same night as `pipeline.rs` sends the
//! same emails, and several processes on one database (CLI runs, `serve`
//! replicas) send each email exactly once. Each test has a fresh database;
//! PostgreSQL must be reachable (these tests fail, never skip, without it).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;

use crate::helpers::{ADMIN_TOKEN, NOW, TestApp, free_port, terminate};
use crate::pipeline::{CUSTOMERS, events, expected, received};

/// How many messages each recipient got.
fn per_recipient(app: &TestApp) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for m in app.smtp.messages() {
        assert_eq!(m.rcpt_to.len(), 1, "one envelope recipient per message");
        *counts.entry(m.rcpt_to[0].clone()).or_insert(0) += 1;
    }
    counts
}

fn customers_csv(n: usize, created_at: &str) -> String {
    let mut csv = String::from("id,email,created_at\n");
    for i in 0..n {
        csv.push_str(&format!("c{i:02},c{i:02}@example.com,{created_at}\n"));
    }
    csv
}

#[tokio::test(flavor = "multi_thread")]
async fn import_and_run_on_postgres_send_the_expected_emails_once_and_a_rerun_sends_nothing() {
    let app = TestApp::with_postgres().await;
    assert!(app.db_url().starts_with("postgres://"), "{}", app.db_url());
    let r = app.import_customers(CUSTOMERS).await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let r = app.import_events(&events()).await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);

    let summary = app.run_at(NOW).await;
    assert_eq!(app.smtp.count(), 8, "{:#?}", received(&app));
    assert_eq!(received(&app), expected());
    assert_eq!(summary["delivery"]["sent"], 8, "{summary}");
    assert_eq!(summary["customers"], 8);
    assert_eq!(summary["rules"]["welcome"]["planned"], 1);
    assert_eq!(summary["rules"]["engagement_level"]["tags"], 8);

    // The same night again: everything is deduplicated, nothing is sent.
    let again = app.run_at(NOW).await;
    assert_eq!(again["delivery"]["sent"], 0, "{again}");
    assert_eq!(again["rules"]["welcome"]["planned"], 0, "{again}");
    assert_eq!(again["rules"]["welcome"]["deduplicated"], 1, "{again}");
    assert_eq!(app.smtp.count(), 8);
    assert!(per_recipient(&app).values().all(|n| *n == 1));

    // The ledger is in PostgreSQL, where the other commands read it.
    let store = app.store().await;
    let counts = store.outbox_counts().await.unwrap();
    assert_eq!(
        (counts.sent, counts.pending, counts.sending),
        (8, 0, 0),
        "{counts:?}"
    );
    assert_eq!(store.runs(10).await.unwrap().len(), 2);
    let r = app.engaged(&["escalations", "--json"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json().as_array().map(Vec::len), Some(2), "{}", r.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_concurrent_runs_on_one_postgres_database_send_each_email_once() {
    let app = TestApp::with_postgres().await;
    let r = app
        .import_customers(&customers_csv(40, "2026-06-14T20:00:00Z"))
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Slow delivery, so both runs are still delivering when the other plans.
    app.smtp.set_delay(Duration::from_millis(20));
    let (a, b) = tokio::join!(
        app.engaged(&["run", "--now", NOW, "--json"]),
        app.engaged(&["run", "--now", NOW, "--json"]),
    );
    assert_eq!(a.code, 0, "{}", a.stderr);
    assert_eq!(b.code, 0, "{}", b.stderr);
    let (a, b) = (a.json(), b.json());
    assert_eq!(
        a["rules"]["welcome"]["planned"].as_u64().unwrap()
            + b["rules"]["welcome"]["planned"].as_u64().unwrap(),
        40,
        "one run planned each welcome, the other found it planned:\n{a}\n{b}"
    );
    let per = per_recipient(&app);
    assert_eq!(per.len(), 40, "{per:?}");
    assert!(per.values().all(|n| *n == 1), "{per:?}");
    let store = app.store().await;
    assert_eq!(store.outbox_counts().await.unwrap().sent, 40);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_serve_replicas_on_one_postgres_database_send_each_email_once() {
    let app = TestApp::with_postgres().await;
    app.write_config("[delivery]\nconcurrency = 2\nshutdown_grace_ms = 5000\n");
    // `serve` runs on the real clock: these customers signed up an hour ago.
    let signed_up = (Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let r = app.import_customers(&customers_csv(60, &signed_up)).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    app.smtp.set_delay(Duration::from_millis(20));

    let ports = [free_port(), free_port()];
    let mut replicas = Vec::new();
    for port in ports {
        let mut cmd = app.command(&["serve"]);
        cmd.env("ENGAGED_HTTP__LISTEN", format!("127.0.0.1:{port}"));
        replicas.push(app.serve(port, &mut cmd).await);
    }
    // Both replicas are asked for a run at once: both evaluate, one plans
    // each email, and both delivery workers drain the same outbox.
    let client = reqwest::Client::new();
    let trigger = |port: u16| {
        client
            .post(format!("http://127.0.0.1:{port}/admin/runs"))
            .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
            .send()
    };
    let (r0, r1) = tokio::join!(trigger(ports[0]), trigger(ports[1]));
    assert_eq!(r0.unwrap().status(), 202);
    assert_eq!(r1.unwrap().status(), 202);
    app.smtp.wait_for(60, Duration::from_secs(30)).await;
    // Give a duplicate, if there were one, time to arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per = per_recipient(&app);
    assert_eq!(per.len(), 60, "{per:?}");
    assert!(per.values().all(|n| *n == 1), "{per:?}");

    for child in &replicas {
        terminate(child);
    }
    for mut child in replicas {
        let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
            .await
            .expect("serve exits within its grace period")
            .unwrap();
        assert_eq!(status.code(), Some(0));
    }
    let store = app.store().await;
    let counts = store.outbox_counts().await.unwrap();
    assert_eq!(
        (counts.sent, counts.pending, counts.sending),
        (60, 0, 0),
        "{counts:?}"
    );
    // Each requested run is one firing in the shared ledger, run once by
    // whichever replica claimed it.
    let firings = store.firings("manual").await.unwrap();
    assert!(!firings.is_empty());
    assert!(firings.iter().all(|f| f.status == "done"), "{firings:?}");
    assert_eq!(store.runs(10).await.unwrap().len(), firings.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_postgres_server_is_named_without_its_password() {
    let app = TestApp::new().await;
    // Nothing listens on port 1.
    app.write_config("[database]\nurl = \"postgres://engaged:s3cret@127.0.0.1:1/engaged\"\n");
    let r = app.engaged(&["run", "--now", NOW]).await;
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains(
            "cannot connect to the database at postgres://engaged:***@127.0.0.1:1/engaged"
        ),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("s3cret"), "{}", r.stderr);

    let err = match engaged::store::open("postgres://engaged:s3cret@127.0.0.1:1/engaged").await {
        Ok(_) => panic!("opened a database on port 1"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("postgres://engaged:***@127.0.0.1:1/engaged"),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");
    let err = match engaged::store::open("postgres://engaged:s3cret@127.0.0.1:notaport/x").await {
        Ok(_) => panic!("opened a database with a bad port"),
        Err(e) => e.to_string(),
    };
    assert!(err.starts_with("invalid database url"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_opening_a_fresh_postgres_database_at_once_migrate_it_once() {
    let db = crate::helpers::PgDb::create().await;
    let opened = futures::future::join_all((0..4).map(|_| engaged::store::open(&db.url))).await;
    let stores: Vec<_> = opened
        .into_iter()
        .map(|s| s.unwrap_or_else(|e| panic!("{e}")))
        .collect();
    assert!(
        stores[0]
            .try_lock_planner("a", Utc::now(), Utc::now())
            .await
            .unwrap()
    );
    let applied: i64 = {
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
        sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
            .fetch_one(&mut conn)
            .await
            .unwrap()
    };
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres"))
        .unwrap()
        .count();
    assert_eq!(applied as usize, files);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_url_that_requires_tls_connects_over_tls() {
    // sslmode=require refuses a plain connection, so opening and using the
    // store proves TLS was negotiated (the local server has a certificate).
    let db = crate::helpers::PgDb::create().await;
    let mut url = url::Url::parse(&db.url).unwrap();
    url.query_pairs_mut().append_pair("sslmode", "require");
    let store = engaged::store::open(url.as_str())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(store.customer_count().await.unwrap(), 0);
    store.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn three_serve_replicas_share_a_run_and_one_killed_mid_run_loses_and_repeats_nothing() {
    const N: usize = 24_000;
    let app = TestApp::with_postgres().await;
    app.write_config(
        "[delivery]\nconcurrency = 8\nshutdown_grace_ms = 5000\n[guard]\nmin_count = 1000000\n",
    );
    // A welcome, and a rule that takes a little time per customer, so the
    // run's twelve partitions are still being planned when one replica dies.
    for f in std::fs::read_dir(app.path("rules")).unwrap() {
        let path = f.unwrap().path();
        if path.is_file() {
            std::fs::remove_file(path).unwrap();
        }
    }
    app.write(
        "rules/welcome.rhai",
        "if days_since_signup() <= 1 { send_email(\"welcome\"); }\n",
    );
    app.write(
        "rules/busy.rhai",
        "let x = 0;\nfor i in 0..150 { x += i; }\nif x < 0 { tag(\"never\"); }\n",
    );
    let signed_up = (Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let mut csv = String::from("id,email,created_at\n");
    for i in 0..N {
        csv.push_str(&format!("r{i:05},r{i:05}@example.com,{signed_up}\n"));
    }
    let r = app.import_customers(&csv).await;
    assert_eq!(r.code, 0, "{}", r.stderr);

    let ports = [free_port(), free_port(), free_port()];
    let mut replicas = Vec::new();
    for port in ports {
        let mut cmd = app.command(&["serve"]);
        cmd.env("ENGAGED_HTTP__LISTEN", format!("127.0.0.1:{port}"));
        replicas.push(app.serve(port, &mut cmd).await);
    }
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/admin/runs", ports[0]))
        .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);

    // Wait until the third replica holds a partition of the run, then kill
    // it (SIGKILL: no shutdown, its claims stay behind).
    let store = app.store().await;
    let victim = replicas[2].id().unwrap();
    let mark = format!(":{victim}:");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let run_id = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the third replica never joined the run"
        );
        if let Some(run) = store.runs(1).await.unwrap().pop() {
            let parts = store.run_partitions(run.id).await.unwrap();
            let theirs = parts.iter().any(|p| {
                p.status == "claimed" && p.holder.as_deref().is_some_and(|h| h.contains(&mark))
            });
            if run.status == "planning" && theirs {
                break run.id;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Frozen first, so what it holds cannot change before it dies.
    let signal = |sig: &str| {
        let sent = std::process::Command::new("kill")
            .args([sig, &victim.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    };
    signal("-STOP");
    let held: Vec<u32> = store
        .run_partitions(run_id)
        .await
        .unwrap()
        .iter()
        .filter(|p| p.status == "claimed" && p.holder.as_deref().is_some_and(|h| h.contains(&mark)))
        .map(|p| p.index)
        .collect();
    assert!(!held.is_empty());
    let started = std::time::Instant::now();
    signal("-KILL");
    let mut victim_child = replicas.pop().unwrap();
    victim_child.wait().await.unwrap();
    assert_eq!(
        app.smtp.count(),
        0,
        "nothing is sent before the run's guard decision"
    );

    // The others take its partitions over and finish the run; every welcome
    // arrives once.
    let wait_planned = std::time::Instant::now() + Duration::from_secs(120);
    while store.runs(1).await.unwrap()[0].status == "planning" {
        assert!(
            std::time::Instant::now() < wait_planned,
            "the run was never finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("planned {:?} after the kill", started.elapsed());
    app.smtp.wait_for(N, Duration::from_secs(240)).await;
    eprintln!("delivered {:?} after the kill", started.elapsed());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let per = per_recipient(&app);
    assert_eq!(per.len(), N, "every expected email arrived");
    assert!(per.values().all(|n| *n == 1), "each once");
    for child in &replicas {
        terminate(child);
    }
    for mut child in replicas {
        let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
            .await
            .expect("serve exits within its grace period")
            .unwrap();
        assert_eq!(status.code(), Some(0));
    }

    let parts = store.run_partitions(run_id).await.unwrap();
    assert_eq!(parts.len(), N / engaged::pipeline::PARTITION);
    assert!(parts.iter().all(|p| p.status == "done"), "{parts:?}");
    for i in held {
        let p = &parts[i as usize];
        assert!(p.claims >= 2, "partition {i} was taken over: {p:?}");
        assert!(!p.holder.as_deref().unwrap().contains(&mark), "{p:?}");
    }
    let runs = store.runs(10).await.unwrap();
    assert_eq!(runs.len(), 1, "one run");
    let run = &runs[0];
    assert_eq!(run.status, "completed");
    let summary = &run.summary;
    assert_eq!(summary["customers"], N as u64, "{summary}");
    assert_eq!(
        summary["rules"]["welcome"]["planned"], N as u64,
        "{summary}"
    );
    let shares = summary["replicas"].as_object().unwrap();
    assert!(shares.len() >= 2, "several replicas planned it: {shares:?}");
    let (mut partitions, mut customers) = (0, 0);
    for share in shares.values() {
        partitions += share["partitions"].as_u64().unwrap();
        customers += share["customers"].as_u64().unwrap();
    }
    assert_eq!((partitions as usize, customers as usize), (parts.len(), N));
    let counts = store.outbox_counts().await.unwrap();
    assert_eq!(
        (counts.sent, counts.pending, counts.sending),
        (N as u64, 0, 0)
    );
}
