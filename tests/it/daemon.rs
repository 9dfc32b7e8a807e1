//! `engaged serve`: the real daemon (in process on port 0 with an injected
//! clock, or as a subprocess for signals) with a real SQLite file, a real
//! SMTP server and real HTTP.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use chrono::{DateTime, Utc};
use engaged::clock::ManualClock;
use engaged::daemon::Daemon;
use serde_json::{Value, json};

use crate::helpers::{ADMIN_TOKEN, DEFAULT_OWNER, NOW, TestApp, WRITE_KEY, free_port, terminate};

const NIGHTLY: &str = r#"
[[schedules]]
name = "nightly"
cron = "0 2 * * *"
timezone = "Europe/Zagreb"
"#;

fn at(s: &str) -> DateTime<Utc> {
    engaged::domain::parse_timestamp(s).unwrap()
}

/// A daemon serving on 127.0.0.1:0 inside the test, stopped on drop.
struct Running {
    daemon: Arc<Daemon>,
    clock: Arc<ManualClock>,
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    async fn start(app: &TestApp, now: DateTime<Utc>) -> Self {
        let clock = Arc::new(ManualClock::new(now));
        let daemon = Daemon::new(app.config(), clock.clone()).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(Arc::clone(&daemon).serve(listener, async move {
            let _ = rx.await;
        }));
        Self {
            daemon,
            clock,
            base,
            stop: Some(tx),
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let result = tokio::time::timeout(Duration::from_secs(20), self.task.take().unwrap())
            .await
            .expect("the daemon stops within its grace period");
        result.unwrap().unwrap();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

fn basic(key: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{key}:"))
    )
}

async fn post_json(url: &str, auth: Option<&str>, body: Value) -> (u16, Value) {
    let mut req = client().post(url).json(&body);
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn segment_sdk_payloads_are_ingested_and_the_nightly_schedule_mails_them() {
    let app = TestApp::new().await;
    app.write_config(NIGHTLY);
    // 01:59:30 in Zagreb (CEST, UTC+2) on 15 June.
    let d = Running::start(&app, at("2026-06-14T23:59:30Z")).await;
    let auth = basic(WRITE_KEY);

    // identify, as analytics-node sends it.
    let (status, body) = post_json(
        &format!("{}/v1/identify", d.base),
        Some(&auth),
        json!({
            "userId": "u1", "anonymousId": null,
            "traits": {"email": "ana@example.com", "name": "Ana Novak", "createdAt": "2026-06-14T20:00:00.000+02:00",
                       "model": "low-touch", "plan": "pro"},
            "context": {"library": {"name": "analytics-node", "version": "6.2.0"}},
            "integrations": {}, "timestamp": "2026-06-14T20:00:00.123+02:00",
            "sentAt": "2026-06-14T18:00:00.200Z", "messageId": "node-1", "_metadata": {"nodeVersion": "20"}
        }),
    )
    .await;
    assert_eq!((status, body), (200, json!({"success": true})));

    // track with the write key in the body instead of Basic auth.
    let (status, _) = post_json(
        &format!("{}/v1/track", d.base),
        None,
        json!({"writeKey": WRITE_KEY, "userId": "u1", "event": "login",
               "timestamp": "2026-06-14T20:05:00Z", "messageId": "node-2"}),
    )
    .await;
    assert_eq!(status, 200);

    // A gzipped batch (RudderStack compresses) with one bad message.
    let batch = json!({
        "batch": [
            {"type": "identify", "userId": "u2", "traits": {"email": "ben@example.com", "name": "Ben", "createdAt": "2026-06-14T21:00:00Z"},
             "messageId": "b-1", "timestamp": "2026-06-14T21:00:00Z"},
            {"type": "track", "userId": "u2", "event": "login", "messageId": "b-2", "timestamp": "2026-06-14T21:10:00Z"},
            {"type": "track", "event": "no user", "messageId": "b-3"},
            {"type": "page", "userId": "u2", "name": "Home", "messageId": "b-4"}
        ],
        "context": {"library": {"name": "rudder-sdk"}}, "sentAt": "2026-06-14T21:11:00Z"
    });
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, batch.to_string().as_bytes()).unwrap();
    let resp = client()
        .post(format!("{}/v1/batch", d.base))
        .header("Authorization", &auth)
        .header("Content-Type", "application/json")
        .header("Content-Encoding", "gzip")
        .body(gz.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["rejected"].as_array().unwrap().len(), 1, "{body}");
    assert_eq!(body["rejected"][0]["index"], 2);
    assert!(
        body["rejected"][0]["error"]
            .as_str()
            .unwrap()
            .contains("userId")
    );

    // Authentication and malformed input.
    let (status, _) = post_json(
        &format!("{}/v1/track", d.base),
        Some(&basic("wrong")),
        json!({"userId": "u1", "event": "x"}),
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = post_json(
        &format!("{}/v1/track", d.base),
        None,
        json!({"userId": "u1", "event": "x"}),
    )
    .await;
    assert_eq!(status, 401);
    let (status, body) = post_json(
        &format!("{}/v1/track", d.base),
        Some(&auth),
        json!({"userId": "u1", "event": "x", "timestamp": "tomorrow"}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("timestamp"),
        "{body}"
    );
    let resp = client()
        .post(format!("{}/v1/track", d.base))
        .header("Authorization", &auth)
        .body(vec![b'x'; 600 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413, "bodies are limited");

    // Re-sending a messageId is harmless.
    let (status, _) = post_json(
        &format!("{}/v1/track", d.base),
        Some(&auth),
        json!({"userId": "u1", "event": "login", "timestamp": "2026-06-14T20:05:00Z", "messageId": "node-2"}),
    )
    .await;
    assert_eq!(status, 200);
    let store = app.store().await;
    let u1 = engaged::domain::CustomerId::parse("u1").unwrap();
    let events = store
        .events_in_id_range(&u1, &u1, Utc::now())
        .await
        .unwrap();
    assert_eq!(events.len(), 1, "{events:?}");

    // Nothing is due before 02:00 local.
    assert_eq!(d.daemon.tick().await.unwrap(), 0);
    // 02:00:20 local: the nightly fires, the run worker plans, delivery sends.
    d.clock.set(at("2026-06-15T00:00:20Z"));
    assert_eq!(d.daemon.tick().await.unwrap(), 1);
    let got = app.smtp.wait_for(2, Duration::from_secs(15)).await;
    let mut to: Vec<String> = got.iter().map(|m| m.rcpt_to[0].clone()).collect();
    to.sort();
    assert_eq!(to, ["ana@example.com", "ben@example.com"]);
    assert!(
        got.iter()
            .all(|m| m.subject().starts_with("Welcome aboard"))
    );
    assert_eq!(d.daemon.tick().await.unwrap(), 0, "one firing per night");
    d.stop().await;
    // The ledger: last night's 02:00 predates the schedule (recorded as
    // skipped, not run); tonight's ran once.
    let firings = store.firings("nightly").await.unwrap();
    let seen: Vec<(String, &str)> = firings
        .iter()
        .map(|f| (f.fire_at.to_rfc3339(), f.status.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("2026-06-14T00:00:00+00:00".to_owned(), "skipped"),
            ("2026-06-15T00:00:00+00:00".to_owned(), "done"),
        ]
    );
    assert!(firings[1].run_id.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn missed_firings_catch_up_once_and_a_schedule_never_runs_twice_at_once() {
    let app = TestApp::new().await;
    app.write_config(NIGHTLY);
    let clock = Arc::new(ManualClock::new(at("2026-06-14T23:59:59Z")));
    let daemon = Daemon::new(app.config(), clock.clone()).await.unwrap();
    let store = daemon.store();
    assert_eq!(daemon.tick().await.unwrap(), 0, "first sight: a baseline");
    clock.set(at("2026-06-15T00:00:05Z"));
    assert_eq!(daemon.tick().await.unwrap(), 1);
    assert!(daemon.run_next_firing().await.unwrap().is_some());
    assert!(daemon.run_next_firing().await.unwrap().is_none());

    // The daemon was down for three nights; it comes back at 07:00 local.
    clock.set(at("2026-06-18T05:00:00Z"));
    assert_eq!(daemon.tick().await.unwrap(), 1, "one catch-up run");
    let firings = store.firings("nightly").await.unwrap();
    let statuses: Vec<(&str, &str)> = firings
        .iter()
        .map(|f| (f.status.as_str(), f.note.as_deref().unwrap_or("")))
        .collect();
    assert_eq!(statuses.len(), 5, "{statuses:?}");
    assert_eq!(statuses[0].0, "skipped", "the baseline");
    assert_eq!(statuses[1].0, "done");
    assert_eq!(statuses[2].0, "skipped");
    assert_eq!(statuses[3].0, "skipped");
    assert_eq!(statuses[4].0, "pending");
    assert!(statuses[4].1.starts_with("catch-up"), "{statuses:?}");

    // While one firing of a schedule runs, another of the same schedule waits.
    let now = clock.now_for_test();
    assert!(
        store
            .record_firing("nightly", at("2026-06-18T04:00:00Z"), "pending", None, now)
            .await
            .unwrap()
    );
    let first = store
        .claim_firing(now, now + chrono::Duration::minutes(5), "first")
        .await
        .unwrap()
        .unwrap();
    assert!(
        store
            .claim_firing(now, now + chrono::Duration::minutes(5), "second")
            .await
            .unwrap()
            .is_none(),
        "the second firing waits for the first"
    );
    store
        .finish_firing(&first, "done", None, None, now)
        .await
        .unwrap();
    assert!(
        store
            .claim_firing(now, now + chrono::Duration::minutes(5), "second")
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_click_unsubscribe_stops_marketing_mail_but_not_escalation_notices() {
    let app = TestApp::new().await;
    app.import_customers(
        "id,email,name,created_at,model\n\
         new1,ana@example.com,Ana,2026-06-14T20:00:00Z,low-touch\n\
         stall,cem@example.com,Cem,2026-06-05T00:00:00Z,low-touch\n",
    )
    .await;
    let d = Running::start(&app, at(NOW)).await;
    let admin = format!("Bearer {ADMIN_TOKEN}");
    let trigger = || async {
        let r = client()
            .post(format!("{}/admin/runs", d.base))
            .header("Authorization", &admin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    };
    trigger().await;
    let first = app.smtp.wait_for(3, Duration::from_secs(15)).await;
    let welcome = first
        .iter()
        .find(|m| m.rcpt_to[0] == "ana@example.com")
        .unwrap();
    let header = welcome.header("List-Unsubscribe").unwrap();
    let link = &header[1..header.find('>').unwrap()];
    let path = link.strip_prefix("https://engage.acme.test").unwrap();

    // The page shows a button; a tampered token is refused.
    let page = client()
        .get(format!("{}{path}", d.base))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("ana@example.com") && html.contains("<form method=\"post\""));
    let tampered = format!("{}{}x", d.base, path);
    let r = client()
        .post(&tampered)
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // RFC 8058 one-click: a POST with that body, no further interaction.
    let r = client()
        .post(format!("{}{path}", d.base))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("unsubscribed"));

    // The owner unsubscribing from some marketing mail still gets escalations.
    let owner_token = engaged::unsubscribe::Signer::new("test-secret").token("x", DEFAULT_OWNER);
    let r = client()
        .post(format!("{}/unsubscribe/{owner_token}", d.base))
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Next day: Ana's tip 1 is due but suppressed; a new stalled customer's
    // escalation notice reaches the (unsubscribed) owner.
    app.import_customers(
        "id,email,name,created_at,model\nstall2,dia@example.com,Dia,2026-06-06T00:00:00Z,low-touch\n",
    )
    .await;
    d.clock.set(at("2026-06-16T02:00:00Z"));
    let before = app.smtp.count();
    trigger().await;
    let all = app.smtp.wait_for(before + 2, Duration::from_secs(15)).await;
    let new: Vec<(String, String)> = all[before..]
        .iter()
        .map(|m| (m.rcpt_to[0].clone(), m.subject()))
        .collect();
    assert!(
        new.iter()
            .any(|(to, s)| to == DEFAULT_OWNER && s.contains("Dia needs a human")),
        "{new:?}"
    );
    assert!(
        !new.iter().any(|(to, _)| to == "ana@example.com"),
        "{new:?}"
    );
    d.stop().await;
    let store = app.store().await;
    let ana = store
        .actions_for_customer(&engaged::domain::CustomerId::parse("new1").unwrap())
        .await
        .unwrap();
    assert!(
        !ana.iter().any(|a| a.dedup_key.contains("tip-1")),
        "tip 1 is not even planned for a suppressed address"
    );
    let last_run = &store.runs(1).await.unwrap()[0];
    assert_eq!(
        last_run.summary["rules"]["onboarding_tips"]["suppressed"], 1,
        "{}",
        last_run.summary
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rate_limit_holds_under_load() {
    let app = TestApp::new().await;
    app.write_config("");
    let mut csv = String::from("id,email,created_at\n");
    for i in 0..100 {
        csv.push_str(&format!(
            "c{i:03},c{i:03}@example.com,2026-06-14T20:00:00Z\n"
        ));
    }
    app.import_customers(&csv).await;
    std::fs::write(
        app.path("engaged.toml"),
        std::fs::read_to_string(app.path("engaged.toml"))
            .unwrap()
            .replace("[mail]\n", "[mail]\nrate_per_second = 20\n"),
    )
    .unwrap();
    let d = Running::start(&app, at(NOW)).await;
    let r = client()
        .post(format!("{}/admin/runs", d.base))
        .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let got = app.smtp.wait_for(100, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 100);
    let first = got.iter().map(|m| m.received_at).min().unwrap();
    let last = got.iter().map(|m| m.received_at).max().unwrap();
    let span = last - first;
    assert!(
        span >= Duration::from_millis(4_500),
        "100 messages at 20/s took only {span:?}"
    );
    let mut times: Vec<Instant> = got.iter().map(|m| m.received_at).collect();
    times.sort();
    for (i, t) in times.iter().enumerate() {
        let in_window = times[i..]
            .iter()
            .take_while(|u| **u - *t < Duration::from_secs(1))
            .count();
        assert!(in_window <= 21, "{in_window} messages within one second");
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn actions_claimed_by_a_dead_worker_are_delivered_after_the_lease_expires() {
    let app = TestApp::new().await;
    app.import_customers(
        "id,email,name,created_at\nnew1,ana@example.com,Ana,2026-06-14T20:00:00Z\nnew2,ben@example.com,Ben,2026-06-14T21:00:00Z\n",
    )
    .await;
    let clock = Arc::new(ManualClock::new(at(NOW)));
    let daemon = Daemon::new(app.config(), clock.clone()).await.unwrap();
    let store = daemon.store();
    // Plan only (the daemon's run worker does not deliver).
    store
        .record_firing(
            "manual",
            clock.now_for_test(),
            "pending",
            None,
            clock.now_for_test(),
        )
        .await
        .unwrap();
    daemon.run_next_firing().await.unwrap().unwrap();
    // A worker claims everything (a 30 s lease, real time) and dies.
    let now = Utc::now();
    let claimed = store
        .claim_due(now, now + chrono::Duration::seconds(30), 100)
        .await
        .unwrap();
    clock.set(now);
    assert_eq!(claimed.len(), 2);
    let report = daemon.deliver_step().await.unwrap();
    assert_eq!(report.sent, 0, "the lease is still valid");
    assert_eq!(app.smtp.count(), 0);
    // Time passes beyond the lease.
    clock.set(now + chrono::Duration::seconds(31));
    let report = daemon.deliver_step().await.unwrap();
    assert_eq!(report.sent, 2);
    assert_eq!(app.smtp.count(), 2);
    // The dead worker's late report cannot overwrite the new outcome.
    store
        .record_attempts(
            &claimed[0].claim_token,
            &[(
                claimed[0].id,
                engaged::store::AttemptResult::Failed {
                    error: "late".into(),
                },
            )],
            Utc::now(),
        )
        .await
        .unwrap();
    assert_eq!(store.outbox_counts().await.unwrap().sent, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_parse_as_prometheus_text_and_health_endpoints_answer() {
    let app = TestApp::new().await;
    app.import_customers("id,email,created_at\nc1,ana@example.com,2026-06-14T20:00:00Z\n")
        .await;
    let d = Running::start(&app, at(NOW)).await;
    client()
        .post(format!("{}/admin/runs", d.base))
        .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
        .send()
        .await
        .unwrap();
    app.smtp.wait_for(1, Duration::from_secs(15)).await;
    let wait_until = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = client()
            .get(format!("{}/metrics", d.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        // The counter moves when the server accepts; the outbox gauge when
        // the outcome is recorded (group commit, within 20 ms): wait for both.
        if (text.contains("engaged_actions_sent_total{kind=\"email\"} 1")
            && text.contains("engaged_outbox_depth{status=\"sent\"} 1"))
            || Instant::now() > wait_until
        {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    let value = |name: &str| {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
                prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum::<f64>()
    };
    assert_eq!(value("engaged_runs_total"), 1.0, "{text}");
    assert_eq!(value("engaged_actions_sent_total"), 1.0, "{text}");
    assert!(value("engaged_evaluations_total") >= 1.0);
    assert!(
        text.contains("engaged_delivery_latency_seconds_bucket"),
        "{text}"
    );
    assert!(
        text.contains("engaged_outbox_depth{status=\"sent\"} 1"),
        "{text}"
    );

    let health = client()
        .get(format!("{}/healthz", d.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let ready = client()
        .get(format!("{}/readyz", d.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let denied = client()
        .get(format!("{}/admin/escalations", d.base))
        .header("Authorization", "Bearer nope")
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 401);

    // Escalations over the admin API: list, acknowledge, resolve.
    app.import_customers("id,email,created_at\nstall,s@example.com,2026-06-05T00:00:00Z\n")
        .await;
    let admin = format!("Bearer {ADMIN_TOKEN}");
    // A new manual firing needs a new moment (one per schedule and time).
    d.clock.set(at(NOW) + chrono::Duration::minutes(1));
    client()
        .post(format!("{}/admin/runs", d.base))
        .header("Authorization", &admin)
        .send()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let id = loop {
        let list: Value = client()
            .get(format!("{}/admin/escalations", d.base))
            .header("Authorization", &admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(id) = list[0]["id"].as_i64() {
            assert_eq!(list[0]["customer_id"], "stall");
            break id;
        }
        assert!(Instant::now() < deadline, "no escalation appeared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for (action, status, code) in [
        ("acknowledge", "acknowledged", 200),
        ("acknowledge", "", 404),
        ("resolve", "resolved", 200),
        ("resolve", "", 404),
    ] {
        let r = client()
            .post(format!("{}/admin/escalations/{id}/{action}", d.base))
            .header("Authorization", &admin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), code, "{action}");
        if code == 200 {
            assert_eq!(r.json::<Value>().await.unwrap()["status"], status);
        }
    }

    // Suppressions over the admin API (a provider's complaint feedback loop).
    let r = client()
        .post(format!("{}/admin/suppressions", d.base))
        .header("Authorization", &admin)
        .json(&json!({"email": "Zed@Example.com"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let list: Value = client()
        .get(format!("{}/admin/suppressions", d.base))
        .header("Authorization", &admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list[0]["email"], "zed@example.com");
    assert_eq!(list[0]["reason"], "complained");
    let bad = client()
        .post(format!("{}/admin/suppressions", d.base))
        .header("Authorization", &admin)
        .json(&json!({"email": "not an address"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    for expected in [200, 404] {
        let r = client()
            .delete(format!("{}/admin/suppressions/zed@example.com", d.base))
            .header("Authorization", &admin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), expected);
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hot_reload_keeps_the_last_good_rules_when_an_edit_is_broken() {
    let app = TestApp::new().await;
    app.import_customers("id,email,created_at\nc1,ana@example.com,2026-01-01T00:00:00Z\n")
        .await;
    let clock = Arc::new(ManualClock::new(at(NOW)));
    let daemon = Daemon::new(app.config(), clock.clone()).await.unwrap();
    let mut fingerprint = 0;
    daemon.reload_if_changed(&mut fingerprint);
    app.write("rules/vip.rhai", "let x = ;\n");
    assert!(
        !daemon.reload_if_changed(&mut fingerprint),
        "a broken edit is not loaded"
    );
    app.write(
        "rules/vip.rhai",
        "if customer.email == \"ana@example.com\" {\n  send_email(\"winback\", #{ days_inactive: 99 });\n}\n",
    );
    assert!(daemon.reload_if_changed(&mut fingerprint));
    let store = daemon.store();
    store
        .record_firing("manual", at(NOW), "pending", None, at(NOW))
        .await
        .unwrap();
    let summary = daemon.run_next_firing().await.unwrap().unwrap();
    assert_eq!(summary.rules["vip"].emails, 1, "the new rule runs");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_delivery_exits_0_and_a_restart_delivers_the_rest_exactly_once() {
    let app = TestApp::new().await;
    let port = free_port();
    app.write_config("");
    std::fs::write(
        app.path("engaged.toml"),
        std::fs::read_to_string(app.path("engaged.toml"))
            .unwrap()
            .replace(
                "[http]\n",
                &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n"),
            )
            .replace(
                "[delivery]\n",
                "[delivery]\nconcurrency = 2\nshutdown_grace_ms = 5000\n",
            ),
    )
    .unwrap();
    // `serve` runs on the real clock: these customers signed up an hour ago.
    let signed_up = (Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let mut csv = String::from("id,email,created_at\n");
    for i in 0..40 {
        csv.push_str(&format!("c{i:02},c{i:02}@example.com,{signed_up}\n"));
    }
    app.import_customers(&csv).await;
    app.smtp.set_delay(Duration::from_millis(100));

    let mut child = app.serve(port, &mut app.command(&["serve"])).await;
    let r = client()
        .post(format!("http://127.0.0.1:{port}/admin/runs"))
        .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    app.smtp.wait_for(5, Duration::from_secs(20)).await;
    terminate(&child);
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("serve exits within its grace period")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let delivered_before = app.smtp.count();
    assert!(
        delivered_before < 40,
        "stopped mid-delivery ({delivered_before})"
    );
    let store = app.store().await;
    let counts = store.outbox_counts().await.unwrap();
    assert_eq!(counts.sent as usize, delivered_before, "{counts:?}");
    assert_eq!(counts.sending, 0, "claimed work was released");
    assert_eq!(counts.pending as usize, 40 - delivered_before);

    app.smtp.set_delay(Duration::ZERO);
    let mut child = app.serve(port, &mut app.command(&["serve"])).await;
    let got = app.smtp.wait_for(40, Duration::from_secs(20)).await;
    let mut to: Vec<String> = got.iter().map(|m| m.rcpt_to[0].clone()).collect();
    to.sort();
    to.dedup();
    assert_eq!(to.len(), 40, "every customer got the welcome");
    assert_eq!(got.len(), 40, "and exactly once");
    terminate(&child);
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cli_run_while_serve_runs_on_the_same_database_sends_no_duplicates() {
    let app = TestApp::new().await;
    let mut csv = String::from("id,email,created_at\n");
    for i in 0..30 {
        csv.push_str(&format!(
            "c{i:02},c{i:02}@example.com,2026-06-14T20:00:00Z\n"
        ));
    }
    app.import_customers(&csv).await;
    app.smtp.set_delay(Duration::from_millis(20));
    let d = Running::start(&app, at(NOW)).await;
    let trigger = client()
        .post(format!("{}/admin/runs", d.base))
        .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
        .send();
    let (cli, r) = tokio::join!(app.engaged(&["run", "--now", NOW, "--json"]), trigger);
    assert_eq!(cli.code, 0, "{}", cli.stderr);
    assert_eq!(r.unwrap().status(), 202);
    let got = app.smtp.wait_for(30, Duration::from_secs(20)).await;
    // Give both a moment to (wrongly) send more; then count.
    d.daemon.deliver_step().await.unwrap();
    let got_after = app.smtp.messages();
    assert_eq!(got.len(), 30);
    assert_eq!(got_after.len(), 30, "no duplicates");
    let mut to: Vec<String> = got_after.iter().map(|m| m.rcpt_to[0].clone()).collect();
    to.sort();
    to.dedup();
    assert_eq!(to.len(), 30);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_zagreb_nightly_fires_once_a_night_at_local_0200_through_both_dst_changes() {
    let app = TestApp::new().await;
    app.write_config(NIGHTLY);
    let clock = Arc::new(ManualClock::new(at("2026-03-26T12:00:00Z")));
    let daemon = Daemon::new(app.config(), clock.clone()).await.unwrap();
    daemon.tick().await.unwrap(); // first sight: baseline only
    // Step the injected clock minute by minute through the nights around the
    // changes (no sleeping) and note when a firing is queued.
    let mut fired = Vec::new();
    for (from, to) in [
        ("2026-03-27T22:00:00Z", "2026-03-30T04:00:00Z"),
        ("2026-10-23T22:00:00Z", "2026-10-26T04:00:00Z"),
    ] {
        let mut t = at(from);
        while t < at(to) {
            clock.set(t);
            if daemon.tick().await.unwrap() > 0 {
                fired.push(
                    t.with_timezone(&chrono_tz::Europe::Zagreb)
                        .format("%m-%d %H:%M %Z")
                        .to_string(),
                );
                while daemon.run_next_firing().await.unwrap().is_some() {}
            }
            t += chrono::Duration::minutes(1);
        }
    }
    assert_eq!(
        fired,
        [
            "03-28 02:00 CET",
            "03-29 03:00 CEST", // 02:00 does not exist: first minute after the gap
            "03-30 02:00 CEST",
            "10-24 02:00 CEST",
            "10-25 02:00 CEST", // 02:00 happens twice: once only
            "10-26 02:00 CET",
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_admin_run_requests_in_the_same_millisecond_queue_two_runs() {
    let app = TestApp::new().await;
    // The daemon's clock is frozen: both requests arrive at the same instant.
    let d = Running::start(&app, at(NOW)).await;
    let admin = format!("Bearer {ADMIN_TOKEN}");
    let mut queued_at = Vec::new();
    for _ in 0..2 {
        let r = client()
            .post(format!("{}/admin/runs", d.base))
            .header("Authorization", &admin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let body: serde_json::Value = r.json().await.unwrap();
        queued_at.push(body["at"].as_str().unwrap().to_owned());
    }
    assert_ne!(queued_at[0], queued_at[1], "{queued_at:?}");
    let firings = app.store().await.firings("manual").await.unwrap();
    assert_eq!(firings.len(), 2, "{firings:?}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_interrupted_by_shutdown_is_finished_at_the_next_start() {
    let app = TestApp::new().await;
    app.write_config("[delivery]\nshutdown_grace_ms = 300\n");
    app.import_customers(
        "id,email,name,created_at\nnew1,ana@example.com,Ana,2026-06-14T20:00:00Z\n",
    )
    .await;
    // Another planner holds the lock, so the run waits mid-plan.
    let store = app.store().await;
    let wall = Utc::now();
    assert!(
        store
            .try_lock_planner("elsewhere", wall, wall + chrono::Duration::hours(1))
            .await
            .unwrap()
    );
    let d = Running::start(&app, at(NOW)).await;
    let r = client()
        .post(format!("{}/admin/runs", d.base))
        .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let status = |store: Arc<dyn engaged::store::Store>| async move {
        store.firings("manual").await.unwrap()[0].status.clone()
    };
    // The firing began a run (which now carries its work); the run waits
    // for the lock before its first partition's policies.
    let deadline = Instant::now() + Duration::from_secs(15);
    while status(Arc::clone(&store)).await != "done" {
        assert!(Instant::now() < deadline, "the run never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    d.stop().await;
    let runs = store.runs(10).await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].status, "planning");
    assert_eq!((runs[0].partitions_done, runs[0].partitions), (0, 1));
    let parts = store.run_partitions(runs[0].id).await.unwrap();
    assert_eq!(parts[0].status, "pending", "given back at the shutdown");
    assert_eq!(app.smtp.count(), 0);

    // The lock is free again: the next start finishes the run at once.
    store.unlock_planner("elsewhere").await.unwrap();
    let d = Running::start(&app, at(NOW)).await;
    let sent = app.smtp.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(sent[0].rcpt_to[0], "ana@example.com");
    d.stop().await;
    let runs = store.runs(10).await.unwrap();
    assert_eq!(runs.len(), 1, "the same run, finished");
    assert_eq!(runs[0].status, "completed");
    assert_eq!(app.smtp.count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn after_clock_steps_back_and_forth_each_fire_time_still_runs_once() {
    let app = TestApp::new().await;
    app.write_config(NIGHTLY);
    let clock = Arc::new(ManualClock::new(at("2026-06-14T12:00:00Z")));
    let daemon = Daemon::new(app.config(), clock.clone()).await.unwrap();
    assert_eq!(daemon.tick().await.unwrap(), 0, "first sight: a baseline");
    clock.set(at("2026-06-15T00:00:03Z")); // 02:00:03 in Zagreb
    assert_eq!(daemon.tick().await.unwrap(), 1);
    while daemon.run_next_firing().await.unwrap().is_some() {}
    // The clock steps back an hour, then returns: nothing runs twice.
    clock.set(at("2026-06-14T23:00:03Z"));
    assert_eq!(daemon.tick().await.unwrap(), 0);
    clock.set(at("2026-06-15T00:00:04Z"));
    assert_eq!(daemon.tick().await.unwrap(), 0);
    // It steps forward two days (a suspended VM): the latest nightly catches
    // up once, the one in between is recorded as missed.
    clock.set(at("2026-06-17T03:00:00Z"));
    assert_eq!(daemon.tick().await.unwrap(), 1);
    while daemon.run_next_firing().await.unwrap().is_some() {}
    // And the night after that runs on time as usual.
    clock.set(at("2026-06-18T00:00:01Z"));
    assert_eq!(daemon.tick().await.unwrap(), 1);
    while daemon.run_next_firing().await.unwrap().is_some() {}
    let firings = daemon.store().firings("nightly").await.unwrap();
    let seen: Vec<(String, &str)> = firings
        .iter()
        .map(|f| (f.fire_at.to_rfc3339(), f.status.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("2026-06-14T00:00:00+00:00".to_owned(), "skipped"),
            ("2026-06-15T00:00:00+00:00".to_owned(), "done"),
            ("2026-06-16T00:00:00+00:00".to_owned(), "skipped"),
            ("2026-06-17T00:00:00+00:00".to_owned(), "done"),
            ("2026-06-18T00:00:00+00:00".to_owned(), "done"),
        ]
    );
}
