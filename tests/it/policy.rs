//! Policy and safety: suppressions (CLI, bounces, planning and sending).

use crate::helpers::{DEFAULT_OWNER, NOW, TestApp};

#[tokio::test(flavor = "multi_thread")]
async fn a_suppressed_address_gets_no_marketing_mail_even_before_the_customer_exists() {
    let app = TestApp::new().await;
    let r = app
        .engaged(&[
            "suppressions",
            "add",
            "Ana@Example.com",
            "--reason",
            "asked by phone",
        ])
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = app.engaged(&["suppressions", "add", "not an email"]).await;
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("invalid email"), "{}", r.stderr);

    let csv = app.write(
        "suppress.csv",
        "email,reason\nben@example.com,complained\nbroken,\n\"cem@example.com\",\n",
    );
    let r = app
        .engaged(&["suppressions", "import", csv.to_str().unwrap()])
        .await;
    assert_eq!(r.code, 1, "a bad row makes the import exit 1");
    assert!(
        r.stderr.contains("suppress.csv:3: invalid email"),
        "{}",
        r.stderr
    );
    assert!(
        r.stdout
            .contains("2 suppressed, 0 already suppressed, 1 rejected"),
        "{}",
        r.stdout
    );
    let list = app.engaged(&["suppressions", "--json"]).await.json();
    let emails: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["email"].as_str().unwrap())
        .collect();
    assert_eq!(emails.len(), 3, "{emails:?}");
    assert!(
        emails.contains(&"ana@example.com"),
        "addresses match case-insensitively"
    );

    // Ana signs up; she is due a welcome; her owner is due an escalation from
    // another customer. The suppression stops only the marketing email.
    app.import_customers(
        "id,email,name,created_at\nnew1,ana@example.com,Ana,2026-06-14T20:00:00Z\nstall,dia@example.com,Dia,2026-06-05T00:00:00Z\n",
    )
    .await;
    app.engaged(&["suppressions", "add", DEFAULT_OWNER]).await;
    let s = app.run_at(NOW).await;
    assert_eq!(s["rules"]["welcome"]["suppressed"], 1);
    assert_eq!(
        s["rules"]["welcome"]["planned"], 0,
        "ana's welcome is not planned"
    );
    let to: Vec<String> = app
        .smtp
        .messages()
        .iter()
        .map(|m| m.rcpt_to[0].clone())
        .collect();
    assert!(!to.contains(&"ana@example.com".to_owned()), "{to:?}");
    assert!(
        to.contains(&DEFAULT_OWNER.to_owned()),
        "escalation notices are operational: {to:?}"
    );

    // Lifting the suppression lets the (never planned) welcome go out.
    let r = app
        .engaged(&["suppressions", "remove", "ana@example.com"])
        .await;
    assert_eq!(r.code, 0);
    let r = app
        .engaged(&["suppressions", "remove", "ana@example.com"])
        .await;
    assert_eq!(r.code, 1);
    app.run_at(NOW).await;
    assert!(
        app.smtp
            .messages()
            .iter()
            .any(|m| m.rcpt_to[0] == "ana@example.com" && m.subject().starts_with("Welcome"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hard_bounce_suppresses_the_address() {
    let app = TestApp::new().await;
    app.smtp.reject_always(
        "gone@example.com",
        550,
        "5.1.1 <gone@example.com>: no such user",
    );
    app.smtp
        .reject_always("big@example.com", 552, "5.3.4 message too big");
    app.import_customers(
        "id,email,name,created_at\nc1,gone@example.com,Gone,2026-06-14T20:00:00Z\nc2,big@example.com,Big,2026-06-14T20:00:00Z\n",
    )
    .await;
    let r = app.engaged(&["run", "--now", NOW, "--json"]).await;
    assert_eq!(r.code, 1);
    assert_eq!(r.json()["delivery"]["failed"], 2);
    let list = app.engaged(&["suppressions", "--json"]).await.json();
    let list = list.as_array().unwrap();
    assert_eq!(
        list.len(),
        1,
        "only the mailbox error is a hard bounce: {list:?}"
    );
    assert_eq!(list[0]["email"], "gone@example.com");
    assert!(list[0]["reason"].as_str().unwrap().starts_with("bounced: "));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_blast_radius_guard_holds_a_rule_that_would_mail_everyone_until_approved() {
    let app = TestApp::new().await;
    // A bad edit: mail every customer.
    app.write(
        "rules/blast.rhai",
        "send_email(\"winback\", #{ key: \"blast\", days_inactive: 0 });\n",
    );
    let mut csv = String::from("id,email,created_at\n");
    for i in 0..150 {
        csv.push_str(&format!(
            "c{i:03},c{i:03}@example.com,2026-06-14T20:00:00Z\n"
        ));
    }
    app.import_customers(&csv).await;
    let r = app.engaged(&["run", "--now", NOW]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout
            .contains("HELD: rule blast would email 150 of 150 customers"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("HELD: rule welcome"), "{}", r.stdout);
    assert_eq!(app.smtp.count(), 0, "nothing of a held rule is sent");

    let runs = app.engaged(&["runs", "--json"]).await.json();
    let run = &runs.as_array().unwrap()[0];
    assert_eq!(run["status"], "held");
    assert_eq!(run["held"]["blast"], 150);
    assert_eq!(run["held"]["welcome"], 150);
    let id = run["id"].as_i64().unwrap().to_string();

    // Approve the welcome, reject the blast.
    let r = app
        .engaged(&["runs", "approve", &id, "--rule", "welcome"])
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("Approved 150"), "{}", r.stdout);
    let r = app
        .engaged(&["runs", "reject", &id, "--rule", "blast"])
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = app.engaged(&["runs", "reject", &id]).await;
    assert_eq!(r.code, 1, "nothing left to reject");
    let runs = app.engaged(&["runs", "--json"]).await.json();
    assert_eq!(runs[0]["status"], "rejected");

    // The next run delivers the approved welcomes; the blast never goes.
    let s = app.run_at(NOW).await;
    assert_eq!(s["delivery"]["sent"], 150);
    assert!(
        app.smtp
            .messages()
            .iter()
            .all(|m| m.subject().starts_with("Welcome"))
    );
    let store = app.store().await;
    let c0 = store
        .actions_for_customer(&engaged::domain::CustomerId::parse("c000").unwrap())
        .await
        .unwrap();
    let blast = c0.iter().find(|a| a.rule == "blast").unwrap();
    assert_eq!(blast.status, "rejected");
    // The audit trail keeps both decisions after the welcome was sent.
    let decided: Vec<(String, String)> = store
        .decisions_for_customer(&engaged::domain::CustomerId::parse("c000").unwrap())
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.rule, d.decision))
        .collect();
    assert!(
        decided.contains(&("welcome".into(), "approved".into())),
        "{decided:?}"
    );
    assert!(
        decided.contains(&("blast".into(), "rejected".into())),
        "{decided:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_frequency_cap_lets_the_higher_priority_win_and_defers_or_drops_the_rest() {
    let app = TestApp::new().await;
    for f in std::fs::read_dir(app.path("rules")).unwrap() {
        let path = f.unwrap().path();
        if path.is_file() {
            std::fs::remove_file(path).unwrap();
        }
    }
    app.write(
        "rules/vip.rhai",
        "// @priority 10\nsend_email(\"winback\", #{ key: \"vip\", days_inactive: 1 });\n",
    );
    app.write(
        "rules/news.rhai",
        "send_email(\"winback\", #{ key: \"news\", days_inactive: 2 });\n",
    );
    app.write(
        "rules/promo.rhai",
        "// @priority -1\n// @when_capped drop\nsend_email(\"winback\", #{ key: \"promo\", days_inactive: 3 });\n",
    );
    app.write_config("[policy]\nfrequency_cap = { emails = 1, days = 3 }\n");
    app.import_customers("id,email,created_at\nc1,ana@example.com,2026-01-01T00:00:00Z\n")
        .await;
    let s = app.run_at(NOW).await;
    assert_eq!(s["rules"]["vip"]["planned"], 1);
    assert_eq!(s["rules"]["news"]["capped"], 1);
    assert_eq!(s["rules"]["promo"]["capped"], 1);
    assert_eq!(app.smtp.count(), 1);
    assert!(app.smtp.messages()[0].text_body().contains("1 days"));

    // Two days later the cap still bites: news waits again.
    let s = app.run_at("2026-06-17T02:00:00Z").await;
    assert_eq!(s["rules"]["news"]["capped"], 1);
    assert_eq!(app.smtp.count(), 1);
    // After the window, news goes out; promo was dropped for good.
    let s = app.run_at("2026-06-18T03:00:00Z").await;
    assert_eq!(s["rules"]["news"]["planned"], 1);
    assert_eq!(app.smtp.count(), 2);
    let store = app.store().await;
    let actions = store
        .actions_for_customer(&engaged::domain::CustomerId::parse("c1").unwrap())
        .await
        .unwrap();
    let promo = actions.iter().find(|a| a.rule == "promo").unwrap();
    assert_eq!(promo.status, "dropped");
    assert!(
        promo
            .last_error
            .as_deref()
            .unwrap()
            .contains("frequency cap")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn marketing_mail_waits_for_the_customers_send_window() {
    use engaged::clock::ManualClock;
    use engaged::daemon::Daemon;
    use std::sync::Arc;

    let app = TestApp::new().await;
    app.write_config(
        "[policy]\nsend_window = \"09:00-18:00\"\ndefault_timezone = \"America/New_York\"\n",
    );
    // 2027-06-15 02:00 UTC: 11:00 in Tokyo, 04:00 in Zagreb, 22:00 (the 14th) in New York.
    let r = app
        .import_customers(
            "id,email,created_at,timezone\n\
             tokyo,t@example.com,2027-06-14T20:00:00Z,Asia/Tokyo\n\
             zagreb,z@example.com,2027-06-14T20:00:00Z,Europe/Zagreb\n\
             nowhere,n@example.com,2027-06-14T20:00:00Z,Mars/Base\n",
        )
        .await;
    assert!(
        r.stderr
            .contains("customers.csv:4: warning: unknown time zone"),
        "{}",
        r.stderr
    );
    let start = engaged::domain::parse_timestamp("2027-06-15T02:00:00Z").unwrap();
    let clock = Arc::new(ManualClock::new(start));
    let daemon = Daemon::new(app.config(), clock.clone()).await.unwrap();
    let store = daemon.store();
    store
        .record_firing("manual", start, "pending", None, start)
        .await
        .unwrap();
    let summary = daemon.run_next_firing().await.unwrap().unwrap();
    assert_eq!(summary.rules["welcome"].waiting_for_window, 2);
    let zagreb = store
        .decisions_for_customer(&engaged::domain::CustomerId::parse("zagreb").unwrap())
        .await
        .unwrap();
    assert_eq!(zagreb[0].decision, "outside window");
    assert!(
        zagreb[0]
            .reason
            .contains("waits until 2027-06-15 07:00:00 UTC"),
        "{zagreb:?}"
    );
    let sent_by = |when: &str| {
        let daemon = Arc::clone(&daemon);
        let clock = Arc::clone(&clock);
        let when = engaged::domain::parse_timestamp(when).unwrap();
        async move {
            clock.set(when);
            daemon.deliver_step().await.unwrap().sent
        }
    };
    assert_eq!(
        sent_by("2027-06-15T02:00:00Z").await,
        1,
        "Tokyo is inside its window"
    );
    assert_eq!(app.smtp.messages()[0].rcpt_to[0], "t@example.com");
    assert_eq!(sent_by("2027-06-15T06:59:00Z").await, 0);
    assert_eq!(sent_by("2027-06-15T07:00:00Z").await, 1, "09:00 in Zagreb");
    assert_eq!(app.smtp.messages()[1].rcpt_to[0], "z@example.com");
    assert_eq!(sent_by("2027-06-15T12:59:00Z").await, 0);
    assert_eq!(
        sent_by("2027-06-15T13:00:00Z").await,
        1,
        "09:00 in New York (the default zone)"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn escalations_overflow_capped_owners_remind_the_lead_and_record_recovery() {
    use crate::helpers::track;
    use serde_json::json;

    let app = TestApp::new().await;
    app.write_config(
        "[escalation]\ndefault_owner = \"success@acme.test\"\nrenotify_days = 2\nlead = \"lead@acme.test\"\nowner_daily_cap = 1\n",
    );
    app.import_customers(
        "id,email,name,created_at,model,owner\n\
         d1,d1@example.com,Dee One,2026-01-01T00:00:00Z,hybrid,csm@acme.test\n\
         d2,d2@example.com,Dee Two,2026-01-01T00:00:00Z,hybrid,csm@acme.test\n\
         stall,s@example.com,Stan,2026-06-05T00:00:00Z,low-touch,\n",
    )
    .await;
    let mut events = vec![
        track(
            "d1",
            "nps_submitted",
            "2026-06-14T10:00:00Z",
            json!({"score": 2}),
        ),
        track(
            "d2",
            "nps_submitted",
            "2026-06-14T11:00:00Z",
            json!({"score": 3}),
        ),
        track(
            "stall",
            "onboarding_step",
            "2026-06-05T01:00:00Z",
            json!({"step": 1}),
        ),
    ];
    for c in ["d1", "d2"] {
        events.push(track(c, "login", "2026-06-14T09:00:00Z", json!({})));
        events.push(track(
            c,
            "onboarding_completed",
            "2026-01-02T00:00:00Z",
            json!({}),
        ));
    }
    app.import_events(&(events.join("\n") + "\n")).await;
    app.run_at(NOW).await;

    let list = app.engaged(&["escalations", "--json"]).await.json();
    let by = |c: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|e| e["customer_id"] == c)
            .unwrap()
            .clone()
    };
    assert_eq!(by("d1")["owner"], "csm@acme.test");
    assert_eq!(
        by("d2")["owner"],
        "success@acme.test",
        "over the owner's daily cap"
    );
    assert_eq!(
        by("d2")["reason"],
        "NPS detractor: scored 3 on 2026-06-14T11:00:00Z",
        "the reason stays as the rule wrote it"
    );
    let notice = app
        .smtp
        .messages()
        .into_iter()
        .find(|m| m.rcpt_to[0] == "success@acme.test" && m.subject().contains("Dee Two"))
        .expect("the overflow notice went to the default owner");
    assert!(
        notice
            .text_body()
            .contains("instead of the customer's owner: csm@acme.test reached the daily cap of 1"),
        "{}",
        notice.text_body()
    );
    // d2's escalation is acknowledged; d1's is not.
    let id = by("d2")["id"].as_i64().unwrap().to_string();
    assert_eq!(
        app.engaged(&["escalations", "acknowledge", &id]).await.code,
        0
    );

    // Three days later: Stan logged in (recovered: no reminder), d1 gets a
    // reminder to the lead.
    app.import_events(&(track("stall", "login", "2026-06-17T10:00:00Z", json!({})) + "\n"))
        .await;
    let before = app.smtp.count();
    app.run_at("2026-06-18T02:00:00Z").await;
    let new: Vec<(String, String)> = app.smtp.messages()[before..]
        .iter()
        .map(|m| (m.rcpt_to[0].clone(), m.text_body()))
        .collect();
    let reminders: Vec<_> = new
        .iter()
        .filter(|(to, _)| to == "lead@acme.test")
        .collect();
    assert_eq!(
        reminders.len(),
        1,
        "only d1's: d2's was acknowledged and Stan recovered: {new:?}"
    );
    assert!(reminders.iter().any(|(_, body)| body.contains("Dee One")));
    assert!(reminders[0].1.contains("Reminder"), "{}", reminders[0].1);
    let list = app.engaged(&["escalations", "--json"]).await.json();
    let stan = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["customer_id"] == "stall")
        .unwrap();
    assert_eq!(stan["status"], "open", "recovery does not close it");
    assert!(stan["recovered_at"].is_string(), "{stan}");
    let d1 = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["customer_id"] == "d1")
        .unwrap();
    assert!(d1["recovered_at"].is_null(), "d1 is still a detractor");
    assert_eq!(d1["notifications"], 2);
    // No second reminder the same day.
    let count = app.smtp.count();
    app.run_at("2026-06-18T03:00:00Z").await;
    assert_eq!(app.smtp.count(), count);
}

#[tokio::test(flavor = "multi_thread")]
async fn explain_answers_why_a_customer_did_or_did_not_get_an_email() {
    let app = TestApp::new().await;
    app.write(
        "rules/vip.rhai",
        "// @priority 10\nif customer.id == \"c1\" {\n  send_email(\"winback\", #{ key: \"vip\", days_inactive: 1 });\n}\n",
    );
    app.write(
        "rules/news.rhai",
        "if customer.id == \"c1\" {\n  send_email(\"winback\", #{ key: \"news\", days_inactive: 2 });\n}\n",
    );
    app.write_config("[policy]\nfrequency_cap = { emails = 1, days = 3 }\n");
    app.smtp
        .reject_always("c3@example.com", 550, "5.1.1 no such user");
    app.import_customers(
        "id,email,created_at\nc1,c1@example.com,2026-01-01T00:00:00Z\nc2,c2@example.com,2026-06-14T20:00:00Z\nc3,c3@example.com,2026-06-14T20:00:00Z\n",
    )
    .await;
    app.engaged(&[
        "suppressions",
        "add",
        "c2@example.com",
        "--reason",
        "complained",
    ])
    .await;
    app.engaged(&["run", "--now", NOW]).await;

    let explain = |id: &'static str| {
        let app = &app;
        async move {
            app.engaged(&["explain", id, "--now", NOW, "--json"])
                .await
                .json()
        }
    };
    let c1 = explain("c1").await;
    let vip = c1["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["rule"] == "vip")
        .unwrap();
    assert_eq!(vip["status"], "sent");
    assert!(
        vip["server_reply"].as_str().unwrap().starts_with("250"),
        "{vip}"
    );
    let news_now = c1["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rule"] == "news")
        .unwrap();
    assert!(
        news_now["actions"][0]["status"]
            .as_str()
            .unwrap()
            .contains("over the frequency cap (1 emails in the last 3 days; at most 1)"),
        "{news_now}"
    );
    let news = &c1["decisions"][0];
    assert_eq!(news["rule"], "news");
    assert_eq!(news["decision"], "deferred");
    assert!(
        news["reason"].as_str().unwrap().contains("frequency cap"),
        "{news}"
    );

    let c2 = explain("c2").await;
    assert_eq!(c2["decisions"][0]["decision"], "suppressed");
    let welcome_now = c2["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rule"] == "welcome")
        .unwrap();
    assert!(
        welcome_now["actions"][0]["status"]
            .as_str()
            .unwrap()
            .contains("suppressed (complained)"),
        "{welcome_now}"
    );
    assert!(
        c2["decisions"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("complained")
    );

    let c3 = explain("c3").await;
    let welcome = c3["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["rule"] == "welcome")
        .unwrap();
    assert_eq!(welcome["status"], "failed");
    assert!(
        welcome["reason"].as_str().unwrap().contains("550"),
        "{welcome}"
    );

    // The human-readable form says the same.
    let text = app.engaged(&["explain", "c1", "--now", NOW]).await.stdout;
    assert!(text.contains("deferred — frequency cap"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_never_appear_in_logs_or_output() {
    use crate::helpers::{ADMIN_TOKEN, WRITE_KEY};
    use std::time::Duration;

    let app = TestApp::new().await;
    app.smtp.require_auth("mailer", "the-right-one");
    let port = crate::helpers::free_port();
    let smtp_password = "smtp-pass-8843";
    let config = std::fs::read_to_string(app.path("engaged.toml"))
        .unwrap()
        .replace(
            &format!("smtp_url = \"{}\"", app.smtp.url()),
            &format!(
                "smtp_url = \"smtp://mailer:{smtp_password}@127.0.0.1:{}\"",
                app.smtp.port()
            ),
        )
        .replace(
            "[http]\n",
            &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n"),
        );
    std::fs::write(app.path("engaged.toml"), config).unwrap();
    app.import_customers("id,email,created_at\nc1,ana@example.com,2026-06-14T20:00:00Z\n")
        .await;

    // A run that fails to log in, with debug logs.
    let run = app
        .command(&["run", "--now", NOW])
        .env("ENGAGED_LOG", "debug")
        .env("ENGAGED_DELIVERY__RUN_RETRY_WINDOW_MS", "0")
        .output()
        .await
        .unwrap();
    let mut seen = String::from_utf8_lossy(&run.stdout).into_owned();
    seen.push_str(&String::from_utf8_lossy(&run.stderr));
    assert!(seen.contains("login as \"mailer\" failed"), "{seen}");

    // The daemon, poked with wrong credentials, then stopped.
    let mut cmd = app.command(&["serve"]);
    cmd.env("ENGAGED_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = app.serve(port, &mut cmd).await;
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let r = client
        .post(format!("{base}/v1/track"))
        .basic_auth("wrong-key", None::<&str>)
        .json(&serde_json::json!({"userId": "c1", "event": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body = r.text().await.unwrap();
    let r = client
        .get(format!("{base}/admin/escalations"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "a missing admin token is refused");
    let r = client
        .post(format!("{base}/admin/runs"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // Wait until the daemon has planned and tried to deliver (its logs are what we read).
    let store = app.store().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while store.runs(5).await.unwrap().len() < 2 || store.outbox_counts().await.unwrap().sending > 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon's run never happened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    crate::helpers::terminate(&child);
    let out = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    seen.push_str(&String::from_utf8_lossy(&out.stdout));
    seen.push_str(&String::from_utf8_lossy(&out.stderr));
    seen.push_str(&body);
    assert!(seen.contains("engaged is serving"), "{seen}");
    for secret in [smtp_password, WRITE_KEY, ADMIN_TOKEN, "test-secret"] {
        assert!(!seen.contains(secret), "{secret} leaked:\n{seen}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_send_window_is_checked_again_when_mail_would_really_go_out() {
    // A window that is closed right now (real time): it opens in two hours.
    let open = chrono::Utc::now() + chrono::Duration::hours(2);
    let close = open + chrono::Duration::hours(1);
    let app = TestApp::new().await;
    app.write_config(&format!(
        "[policy]\nsend_window = \"{}-{}\"\n",
        open.format("%H:%M"),
        close.format("%H:%M")
    ));
    app.import_customers("id,email,created_at\nc1,ana@example.com,2026-06-14T20:00:00Z\n")
        .await;
    // Evaluated as of a past moment inside the window; delivered now, outside it.
    let s = app.run_at(NOW).await;
    assert_eq!(s["delivery"]["sent"], 0);
    assert_eq!(app.smtp.count(), 0, "no mail outside the window");
    let store = app.store().await;
    let actions = store
        .actions_for_customer(&engaged::domain::CustomerId::parse("c1").unwrap())
        .await
        .unwrap();
    let welcome = actions.iter().find(|a| a.rule == "welcome").unwrap();
    assert_eq!(welcome.status, "pending");
    assert_eq!(welcome.attempts, 0, "waiting is not an attempt");
    assert!(
        welcome
            .last_error
            .as_deref()
            .unwrap()
            .contains("outside the send window"),
        "{welcome:?}"
    );
    assert!(welcome.next_attempt_at > chrono::Utc::now() + chrono::Duration::minutes(100));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_guard_judges_what_a_rule_wants_to_send_so_the_cap_cannot_let_it_trickle_out() {
    let app = TestApp::new().await;
    app.write(
        "rules/blast.rhai",
        "// @priority -1\nsend_email(\"winback\", #{ key: \"blast\", days_inactive: 0 });\n",
    );
    app.write_config("[policy]\nfrequency_cap = { emails = 1, days = 3 }\n");
    let mut csv = String::from("id,email,created_at\n");
    for i in 0..150 {
        csv.push_str(&format!(
            "c{i:03},c{i:03}@example.com,2026-06-14T20:00:00Z\n"
        ));
    }
    app.import_customers(&csv).await;
    // The preview says it would be held, and writes nothing.
    let dry = app
        .engaged(&["run", "--now", NOW, "--dry-run", "--json"])
        .await
        .json();
    assert_eq!(dry["rules"]["blast"]["held"], 150, "{}", dry["rules"]);
    // The real run: the cap defers blast behind the welcome, and the guard
    // still holds it, so it cannot go out over the next nights.
    let s = app.run_at(NOW).await;
    assert_eq!(s["rules"]["blast"]["capped"], 150);
    let runs = app.engaged(&["runs", "--json"]).await.json();
    assert_eq!(runs[0]["status"], "held", "{runs}");
    assert_eq!(runs[0]["held"]["welcome"], 150);
    // Nights later the blast still wants everyone: whatever the cap lets
    // through is held too, so none of it is ever sent without approval.
    let s = app.run_at("2026-06-19T02:00:00Z").await;
    assert_eq!(
        s["rules"]["blast"]["planned"].as_u64().unwrap(),
        s["rules"]["blast"]["held"].as_u64().unwrap(),
        "{}",
        s["rules"]
    );
    assert!(
        app.smtp
            .messages()
            .iter()
            .all(|m| !m.subject().starts_with("We miss you")),
        "nothing of the blast was sent"
    );
}

/// Leaves only the given rules in the app's rules directory.
fn only_rules(app: &TestApp, rules: &[(&str, &str)]) {
    for f in std::fs::read_dir(app.path("rules")).unwrap() {
        let path = f.unwrap().path();
        if path.is_file() {
            std::fs::remove_file(path).unwrap();
        }
    }
    for (name, source) in rules {
        app.write(&format!("rules/{name}.rhai"), source);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_waits_for_another_planner_and_counts_its_emails_against_the_cap() {
    use engaged::domain::CustomerId;
    use engaged::plan::{ActionRequest, PlannedAction};
    use engaged::store::PlanCommit;
    let app = TestApp::new().await;
    only_rules(
        &app,
        &[(
            "news",
            "send_email(\"winback\", #{ key: \"news\", days_inactive: 2 });\n",
        )],
    );
    app.write_config("[policy]\nfrequency_cap = { emails = 1, days = 3 }\n");
    app.import_customers("id,email,created_at\nc1,ana@example.com,2026-01-01T00:00:00Z\n")
        .await;
    let store = app.store().await;
    let now = chrono::Utc::now();
    assert!(
        store
            .try_lock_planner("other planner", now, now + chrono::Duration::hours(1))
            .await
            .unwrap()
    );
    assert!(
        !store
            .try_lock_planner("third", now, now + chrono::Duration::hours(1))
            .await
            .unwrap(),
        "a held lock is not taken"
    );
    let mut child = app
        .command(&["run", "--now", NOW, "--json"])
        .env("ENGAGED_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The run evaluates, then waits for the lock: it cannot finish.
    if let Ok(status) =
        tokio::time::timeout(std::time::Duration::from_millis(1500), child.wait()).await
    {
        let out = child.wait_with_output().await.unwrap();
        panic!(
            "the run finished ({status:?}) while another planner held the lock:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Meanwhile the other planner commits an email for the same customer.
    let id = CustomerId::parse("c1").unwrap();
    let customer = store.customer(&id).await.unwrap().unwrap();
    let at = chrono::DateTime::parse_from_rfc3339(NOW).unwrap().to_utc();
    let facts = engaged::facts::Facts::new(customer, vec![], vec![], at);
    let planned = PlannedAction {
        rule: "vip".into(),
        customer_id: id.clone(),
        kind: ActionRequest::Email {
            template: "winback".into(),
            key: "vip".into(),
            vars: serde_json::from_value(serde_json::json!({"days_inactive": 1})).unwrap(),
        },
    };
    let owner = engaged::domain::Email::parse(DEFAULT_OWNER).unwrap();
    let engaged::pipeline::Outgoing::Action(vip) =
        engaged::pipeline::to_outgoing(planned, &facts, &owner, true)
    else {
        panic!("an email is an action")
    };
    store
        .commit_plan(PlanCommit {
            trigger: "other planner".into(),
            now: at,
            started_at: chrono::Utc::now(),
            actions: vec![vip],
            ..Default::default()
        })
        .await
        .unwrap();
    store.unlock_planner("other planner").await.unwrap();

    let out = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("waiting for it to commit"), "{stderr}");
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["rules"]["news"]["capped"], 1, "{s}");
    assert_eq!(s["rules"]["news"]["planned"], 0, "{s}");
    // The other planner's email went out (this run drained it); news did not.
    assert_eq!(app.smtp.count(), 1);
    assert!(app.smtp.messages()[0].text_body().contains("1 days"));
    // The lock is free again.
    assert!(
        store
            .try_lock_planner("third", now, now + chrono::Duration::hours(1))
            .await
            .unwrap()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashed_planners_lock_frees_when_its_lease_ends() {
    let app = TestApp::new().await;
    let store = app.store().await;
    let t = chrono::DateTime::parse_from_rfc3339(NOW).unwrap().to_utc();
    let minutes = chrono::Duration::minutes;
    assert!(
        store
            .try_lock_planner("a", t, t + minutes(10))
            .await
            .unwrap()
    );
    assert!(
        !store
            .try_lock_planner("b", t + minutes(9), t + minutes(19))
            .await
            .unwrap()
    );
    assert!(
        store
            .try_lock_planner("b", t + minutes(11), t + minutes(21))
            .await
            .unwrap()
    );
    // The crashed holder's late release does not free b's lock.
    store.unlock_planner("a").await.unwrap();
    assert!(
        !store
            .try_lock_planner("c", t + minutes(12), t + minutes(22))
            .await
            .unwrap()
    );
    store.unlock_planner("b").await.unwrap();
    assert!(
        store
            .try_lock_planner("c", t + minutes(12), t + minutes(22))
            .await
            .unwrap()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_email_released_from_a_hold_counts_against_the_cap_from_its_release() {
    let app = TestApp::new().await;
    only_rules(
        &app,
        &[
            (
                "blast",
                "send_email(\"winback\", #{ key: \"blast\", days_inactive: 1 });\n",
            ),
            (
                "news",
                "if days_since_signup() >= 5 { send_email(\"winback\", #{ key: \"news\", days_inactive: 2 }); }\n",
            ),
        ],
    );
    app.write_config(
        "[policy]\nfrequency_cap = { emails = 1, days = 3 }\n[guard]\nmin_count = 0\n",
    );
    let held_at = chrono::Utc::now() - chrono::Duration::days(5);
    app.import_customers(&format!(
        "id,email,created_at\nc1,ana@example.com,{}\n",
        (held_at - chrono::Duration::days(1)).to_rfc3339()
    ))
    .await;
    // Five days ago the guard held the blast (one of one customers).
    let s = app.run_at(&held_at.to_rfc3339()).await;
    assert_eq!(s["rules"]["blast"]["held"], 1, "{s}");
    let run = s["run_id"].as_i64().unwrap().to_string();
    let r = app.engaged(&["runs", "approve", &run]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Released now, it counts from now: news (an hour from now) is capped,
    // although the blast was planned five days (beyond the cap's 3) ago.
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let s = app.run_at(&later.to_rfc3339()).await;
    assert_eq!(s["rules"]["news"]["capped"], 1, "{s}");
    assert_eq!(app.smtp.count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_decision_repeated_by_later_runs_is_one_row_and_deduplication_is_recorded() {
    use engaged::domain::CustomerId;
    let app = TestApp::new().await;
    app.engaged(&["suppressions", "add", "ana@example.com"])
        .await;
    app.import_customers(
        "id,email,name,created_at\nana,ana@example.com,Ana,2026-06-14T20:00:00Z\nben,ben@example.com,Ben,2026-06-14T20:00:00Z\n",
    )
    .await;
    let first = app.run_at(NOW).await;
    let second = app.run_at("2026-06-16T02:00:00Z").await;
    assert_eq!(second["rules"]["welcome"]["suppressed"], 1);
    assert_eq!(second["rules"]["welcome"]["deduplicated"], 1, "{second}");
    let store = app.store().await;
    let ana = store
        .decisions_for_customer(&CustomerId::parse("ana").unwrap())
        .await
        .unwrap();
    let suppressed: Vec<_> = ana
        .iter()
        .filter(|d| d.decision == "suppressed" && d.rule == "welcome")
        .collect();
    assert_eq!(suppressed.len(), 1, "{ana:?}");
    assert_eq!(suppressed[0].times, 2);
    assert_eq!(
        suppressed[0].first_at.to_rfc3339(),
        "2026-06-15T02:00:00+00:00"
    );
    assert_eq!(suppressed[0].at.to_rfc3339(), "2026-06-16T02:00:00+00:00");
    assert_eq!(suppressed[0].run_id, second["run_id"].as_i64().unwrap());

    // Ben's welcome went out in the first run; the second wanted it again.
    let ben = store
        .actions_for_customer(&CustomerId::parse("ben").unwrap())
        .await
        .unwrap();
    let welcome = ben.iter().find(|a| a.rule == "welcome").unwrap();
    assert_eq!(welcome.run_id, first["run_id"].as_i64().unwrap());
    assert_eq!(welcome.repeats, 1);
    assert_eq!(welcome.repeated_run, second["run_id"].as_i64());
    let r = app
        .engaged(&["explain", "ben", "--now", "2026-06-16T03:00:00Z"])
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains(&format!(
            "deduplicated 1 time(s) since, last by run {} at 2026-06-16T02:00:00Z",
            second["run_id"]
        )),
        "{}",
        r.stdout
    );
    let r = app
        .engaged(&["explain", "ana", "--now", "2026-06-16T03:00:00Z"])
        .await;
    assert!(
        r.stdout.contains("(2 runs since 2026-06-15T02:00:00Z)"),
        "{}",
        r.stdout
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn simulate_models_owner_caps_and_the_guard_and_reports_rule_errors() {
    let app = TestApp::new().await;
    only_rules(
        &app,
        &[
            ("stall", "escalate(\"stalled\");\n"),
            (
                "blast",
                "send_email(\"winback\", #{ key: \"blast\", days_inactive: 1 });\n",
            ),
            (
                "broken",
                "if customer.id == \"c2\" { throw \"no plan for c2\"; }\n",
            ),
        ],
    );
    app.write_config("[escalation]\nowner_daily_cap = 2\n[guard]\nmin_count = 1\n");
    let mut csv = String::from("id,email,created_at,owner\n");
    for i in 1..=4 {
        csv.push_str(&format!(
            "c{i},c{i}@example.com,2026-06-01T00:00:00Z,csm@acme.test\n"
        ));
    }
    app.import_customers(&csv).await;
    let r = app
        .engaged(&["simulate", "--days", "2", "--all", "--now", NOW, "--json"])
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let sim = r.json();
    let happenings = sim["happenings"].as_array().unwrap();
    let escalations: Vec<&serde_json::Value> = happenings
        .iter()
        .filter(|h| h["kind"] == "escalation")
        .collect();
    assert_eq!(escalations.len(), 4, "one per customer, once: {sim}");
    let to_csm = escalations
        .iter()
        .filter(|h| h["owner"] == "csm@acme.test")
        .count();
    assert_eq!(to_csm, 2, "the owner's daily cap: {sim}");
    for h in escalations.iter().filter(|h| h["owner"] == DEFAULT_OWNER) {
        assert!(
            h["note"]
                .as_str()
                .unwrap()
                .contains("csm@acme.test reached the daily cap of 2"),
            "{h}"
        );
    }
    let emails: Vec<&serde_json::Value> =
        happenings.iter().filter(|h| h["kind"] == "email").collect();
    assert_eq!(emails.len(), 4, "{sim}");
    assert!(
        emails.iter().all(|h| h["note"]
            .as_str()
            .unwrap()
            .contains("held by the blast-radius guard: 4 of 4 customers")),
        "{sim}"
    );
    let errors = sim["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "reported once, not per day: {sim}");
    assert_eq!(errors[0]["rule"], "broken");
    assert_eq!(errors[0]["customer_id"], "c2");
    assert!(
        errors[0]["message"]
            .as_str()
            .unwrap()
            .contains("no plan for c2")
    );

    let r = app
        .engaged(&["simulate", "--days", "2", "--all", "--now", NOW])
        .await;
    assert!(r.stdout.contains("Rule errors (1;"), "{}", r.stdout);
    assert!(
        r.stdout.contains("would hold them until approved"),
        "{}",
        r.stdout
    );
    let r = app
        .engaged(&["simulate", "--days", "1", "--customer", "c2", "--now", NOW])
        .await;
    assert!(
        r.stdout.contains("rule broken for c2:") && r.stdout.contains("no plan for c2"),
        "{}",
        r.stdout
    );
    let store = app.store().await;
    assert!(store.runs(10).await.unwrap().is_empty(), "nothing written");
    assert_eq!(app.smtp.count(), 0, "nothing sent");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_email_asked_for_twice_in_one_run_takes_one_place_under_the_cap() {
    let app = TestApp::new().await;
    only_rules(
        &app,
        &[
            (
                "loop",
                "// @priority 5\nfor i in 0..3 { send_email(\"winback\", #{ key: \"loop\", days_inactive: 1 }); }\n",
            ),
            (
                "news",
                "send_email(\"winback\", #{ key: \"news\", days_inactive: 2 });\n",
            ),
        ],
    );
    app.write_config("[policy]\nfrequency_cap = { emails = 2, days = 3 }\n");
    app.import_customers("id,email,created_at\nc1,ana@example.com,2026-01-01T00:00:00Z\n")
        .await;
    let s = app.run_at(NOW).await;
    assert_eq!(s["rules"]["loop"]["planned"], 1, "{s}");
    assert_eq!(s["rules"]["loop"]["deduplicated"], 2, "{s}");
    assert_eq!(
        s["rules"]["news"]["planned"], 1,
        "the copies took no room: {s}"
    );
    assert_eq!(s["rules"]["news"]["capped"], 0, "{s}");
    assert_eq!(app.smtp.count(), 2);
    let decisions = app
        .store()
        .await
        .decisions_for_customer(&engaged::domain::CustomerId::parse("c1").unwrap())
        .await
        .unwrap();
    assert!(decisions.is_empty(), "{decisions:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resolved_escalation_firing_again_does_not_use_up_its_owners_daily_cap() {
    let app = TestApp::new().await;
    only_rules(&app, &[("stall", "escalate(\"stalled\");\n")]);
    app.write_config("[escalation]\nowner_daily_cap = 1\n");
    app.import_customers(
        "id,email,created_at,owner\na,a@example.com,2026-06-01T00:00:00Z,csm@acme.test\n",
    )
    .await;
    app.run_at(NOW).await;
    let store = app.store().await;
    let first = &store.escalations(true).await.unwrap()[0];
    assert_eq!(first.owner, "csm@acme.test");
    assert!(
        store
            .resolve_escalation(first.id, chrono::Utc::now())
            .await
            .unwrap()
    );
    // Two days later A's rule fires again for the same reason (it stays
    // resolved) and B escalates for the first time: the owner got nothing
    // today, so B's escalation is theirs.
    app.import_customers(
        "id,email,created_at,owner\nb,b@example.com,2026-06-01T00:00:00Z,csm@acme.test\n",
    )
    .await;
    app.run_at("2026-06-17T02:00:00Z").await;
    let open = store.escalations(true).await.unwrap();
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0].customer_id, "b");
    assert_eq!(open[0].owner, "csm@acme.test", "{open:?}");
}

/// `n` customers, ids `p00000…`, who signed up the evening before `NOW`.
fn many_customers(n: usize) -> String {
    let mut csv = String::from("id,email,created_at\n");
    for i in 0..n {
        csv.push_str(&format!(
            "p{i:05},p{i:05}@example.com,2026-06-14T20:00:00Z\n"
        ));
    }
    csv
}

#[tokio::test(flavor = "multi_thread")]
async fn the_guard_counts_a_rule_over_every_partition_of_a_run() {
    let app = TestApp::new().await;
    // Three partitions of customers (a page is 2,000); the rule mails two in
    // three. No page alone passes min_count, the run does.
    only_rules(
        &app,
        &[(
            "blast",
            "let n = parse_int(customer.id.sub_string(1));\nif n % 3 != 0 { send_email(\"winback\", #{ key: \"blast\", days_inactive: 0 }); }\n",
        )],
    );
    app.write_config("[guard]\nmin_count = 2500\nmax_share = 0.5\n");
    app.import_customers(&many_customers(4500)).await;
    let s = app.run_at(NOW).await;
    assert_eq!(s["customers"], 4500);
    assert_eq!(s["rules"]["blast"]["emails"], 3000);
    assert_eq!(s["rules"]["blast"]["held"], 3000, "{s}");
    assert_eq!(app.smtp.count(), 0, "nothing of the held rule was sent");
    let runs = app.engaged(&["runs", "--json"]).await.json();
    assert_eq!(runs[0]["status"], "held");
    assert_eq!(runs[0]["held"]["blast"], 3000);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_that_died_between_partitions_is_finished_by_the_next_run_and_sends_once() {
    let app = TestApp::new().await;
    only_rules(&app, &[("welcome", "send_email(\"welcome\");\n")]);
    app.write_config("[guard]\nmin_count = 1000000\n");
    app.import_customers(&many_customers(3000)).await;
    let store = app.store().await;
    // A planner began a run of two partitions, committed the first, then
    // died (its lease on the partition has ended): its emails are staged,
    // never deliverable, and the second partition is pending.
    let now: chrono::DateTime<chrono::Utc> = NOW.parse().unwrap();
    let spec = engaged::store::RunSpec {
        now,
        only_rules: None,
        changed_since: None,
        base_customers: 3000,
    };
    let (dead, partitions) = store
        .begin_run("cli", &spec, now, engaged::pipeline::PARTITION, None)
        .await
        .unwrap();
    assert_eq!(partitions, 2);
    let wall = chrono::Utc::now();
    let first = store
        .claim_partition(
            Some(dead),
            "gone/x",
            wall,
            wall - chrono::Duration::seconds(1),
        )
        .await
        .unwrap()
        .unwrap();
    // What that planner committed, as a planner writes it.
    let customers = store.customers_page(None, 2000).await.unwrap();
    let actions: Vec<engaged::store::NewAction> = customers
        .into_iter()
        .map(|c| engaged::store::NewAction {
            customer_id: c.id.clone(),
            rule: "welcome".into(),
            kind: engaged::plan::OutboxKind::Email,
            dedup_key: format!("email\u{1f}{}\u{1f}welcome\u{1f}welcome", c.id),
            customer_email: c.email.as_ref().map(ToString::to_string),
            customer_timezone: None,
            not_before: None,
            dropped: None,
            subject: "welcome (key welcome)".into(),
            payload: serde_json::to_string(&engaged::plan::EmailPayload {
                template: "welcome".into(),
                key: "welcome".into(),
                vars: Default::default(),
                customer: c,
            })
            .unwrap(),
        })
        .collect();
    store
        .commit_plan(engaged::store::PlanCommit {
            trigger: "cli".into(),
            now,
            started_at: now,
            actions,
            partition: Some(engaged::store::PartitionDone {
                run_id: dead,
                index: first.index,
                holder: first.holder.clone(),
                summary: serde_json::json!({"customers": 2000, "rules": {"welcome": {"emails": 2000}}}),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(app.smtp.count(), 0);
    // The next run finishes it first (its second partition, then its
    // guard decision), then plans its own night: every welcome once.
    let s = app.run_at(NOW).await;
    assert_eq!(s["rules"]["welcome"]["planned"], 0, "{s}");
    assert_eq!(s["rules"]["welcome"]["deduplicated"], 3000, "{s}");
    assert_eq!(s["delivery"]["sent"], 3000);
    let mut to: Vec<String> = app
        .smtp
        .messages()
        .iter()
        .map(|m| m.rcpt_to[0].clone())
        .collect();
    to.sort();
    to.dedup();
    assert_eq!(to.len(), 3000);
    assert_eq!(app.smtp.count(), 3000, "each once");
    let runs = app.engaged(&["runs", "--json"]).await.json();
    let statuses: Vec<&str> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["completed", "completed"], "{runs}");
    let finished = &runs[1];
    assert_eq!(finished["id"], dead);
    assert_eq!(
        finished["summary"]["rules"]["welcome"]["planned"], 3000,
        "{finished}"
    );
    assert_eq!(finished["summary"]["customers"], 3000);
    assert_eq!(
        (
            finished["partitions_done"].as_u64(),
            finished["partitions"].as_u64()
        ),
        (Some(2), Some(2))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn simulate_all_settles_the_guard_and_owner_caps_over_every_page_of_the_base() {
    // 4,500 customers: three pages of the simulation, which keeps only
    // counters across them.
    let app = TestApp::new().await;
    only_rules(
        &app,
        &[
            ("stall", "escalate(\"stalled\");\n"),
            ("late", "if now.day == 17 { escalate(\"late\"); }\n"),
            (
                "blast",
                "send_email(\"winback\", #{ key: \"blast\", days_inactive: 1 });\n",
            ),
        ],
    );
    app.write_config("[escalation]\nowner_daily_cap = 100\n");
    let mut csv = String::from("id,email,created_at,owner\n");
    for i in 0..4500 {
        csv.push_str(&format!(
            "p{i:05},p{i:05}@example.com,2026-06-01T00:00:00Z,csm@acme.test\n"
        ));
    }
    app.import_customers(&csv).await;
    let r = app
        .engaged(&["simulate", "--days", "2", "--all", "--now", NOW, "--json"])
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let sim = r.json();
    // Fire times 06-16 02:00 and 06-17 02:00 (the default nightly schedule).
    assert_eq!(
        sim["days"],
        serde_json::json!([
            {"day": "2026-06-16", "emails": 0, "held": 4500, "escalations": 4500, "tags": 0, "webhooks": 0},
            {"day": "2026-06-17", "emails": 0, "held": 0, "escalations": 4500, "tags": 0, "webhooks": 0},
        ]),
        "the blast is held (judged on all 4,500), sent once; stall opens once per customer"
    );
    // The cap of 100 a day: 100 on the first night, none the next (the
    // first night's 100 are within its day), the rest to the default owner.
    assert_eq!(
        sim["owners"],
        serde_json::json!({"csm@acme.test": 100, DEFAULT_OWNER: 8900}),
        "{}",
        sim["owners"]
    );
    assert_eq!(sim["happenings_total"], 13_500);
    let listed = sim["happenings"].as_array().unwrap();
    assert_eq!(listed.len(), 1000, "--all lists a sample, counts the rest");
    let to_csm = listed
        .iter()
        .filter(|h| h["owner"] == "csm@acme.test")
        .count();
    assert_eq!(to_csm, 100, "the first 100 in id order keep their owner");
    let overflowed: Vec<_> = listed
        .iter()
        .filter(|h| h["owner"] == DEFAULT_OWNER)
        .collect();
    assert_eq!(overflowed.len(), 900);
    assert!(
        overflowed.iter().all(|h| h["note"]
            .as_str()
            .is_some_and(|n| n.contains("csm@acme.test reached the daily cap of 100"))),
        "{overflowed:?}"
    );
    assert_eq!(
        listed[99]["customer_id"], "p00099",
        "listed in time, then id order"
    );
    assert_eq!(listed[100]["owner"], DEFAULT_OWNER);

    let r = app
        .engaged(&["simulate", "--days", "2", "--all", "--now", NOW])
        .await;
    assert!(
        r.stdout.contains("2026-06-16       0  4500        4500"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("csm@acme.test                    100"),
        "{}",
        r.stdout
    );
    let store = app.store().await;
    assert!(store.runs(10).await.unwrap().is_empty(), "nothing written");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schedule_over_what_changed_evaluates_only_the_customers_changed_since_its_last_run() {
    let app = TestApp::new().await;
    only_rules(
        &app,
        &[
            (
                "welcome",
                "if days_since_signup() <= 1 { send_email(\"welcome\"); }\n",
            ),
            ("everyone", "tag(\"seen\");\n"),
        ],
    );
    app.write_config(
        "[[schedules]]\nname = \"minutely\"\ncron = \"0 * * * * *\"\nrules = [\"welcome\"]\ncustomers = \"changed\"\n",
    );
    let mut old = String::from("id,email,created_at\n");
    for i in 0..2500 {
        old.push_str(&format!(
            "o{i:05},o{i:05}@example.com,2020-01-01T00:00:00Z\n"
        ));
    }
    app.import_customers(&old).await;
    // Its first run has no last run to start from: everyone, its rules only.
    let first = run_minutely(&app).await;
    assert_eq!(first["customers"], 2500, "{first}");
    assert_eq!(first["rules"]["welcome"]["emails"], 0);
    assert!(first["rules"].get("everyone").is_none(), "{first}");
    assert!(first.get("changed_since").is_none());

    // Two sign-ups and an event of a long-standing customer since then.
    app.import_customers(
        "id,email,created_at\nn1,n1@example.com,2026-06-15T01:00:00Z\nn2,n2@example.com,2026-06-15T01:30:00Z\n",
    )
    .await;
    app.import_events(
        "{\"type\":\"track\",\"userId\":\"o00007\",\"event\":\"login\",\"timestamp\":\"2026-06-15T01:00:00Z\",\"messageId\":\"m1\"}\n",
    )
    .await;
    let second = run_minutely(&app).await;
    assert_eq!(second["customers"], 3, "{second}");
    assert!(second["changed_since"].is_string(), "{second}");
    assert_eq!(second["rules"]["welcome"]["planned"], 2, "{second}");
    let mut to: Vec<String> = app
        .smtp
        .messages()
        .iter()
        .map(|m| m.rcpt_to[0].clone())
        .collect();
    to.sort();
    assert_eq!(to, ["n1@example.com", "n2@example.com"]);

    // Nothing changed since: nobody is evaluated.
    let third = run_minutely(&app).await;
    assert_eq!(third["customers"], 0, "{third}");
    assert_eq!(third["partitions"], 0);
    // The nightly default (every customer) is untouched by the watermark.
    let all = app.run_at(NOW).await;
    assert_eq!(all["customers"], 2502, "{all}");
    assert_eq!(app.smtp.count(), 2, "the welcomes went once");

    let r = app.engaged(&["run", "--schedule", "hourly"]).await;
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("no schedule named \"hourly\"") && r.stderr.contains("minutely"),
        "{}",
        r.stderr
    );
}

async fn run_minutely(app: &TestApp) -> serde_json::Value {
    let r = app
        .engaged(&["run", "--now", NOW, "--json", "--schedule", "minutely"])
        .await;
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    r.json()
}
