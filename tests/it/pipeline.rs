//! The whole pipeline through the real binary: import → rules → outbox →
//! a real SMTP server, and the guarantees around it (dedup, retries,
//! crash recovery, per-action failures).

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::json;

use crate::helpers::{DEFAULT_OWNER, NOW, TestApp, track};

pub(crate) const CUSTOMERS: &str = "\
id,email,name,created_at,timezone,model,owner,plan
new1,ana@example.com,Ana Novak,2026-06-14T20:00:00Z,Europe/Zagreb,low-touch,,pro
tip2,ben@example.com,Ben Ito,2026-06-11T12:00:00Z,,low-touch,,starter
stall,cem@example.com,Cem Kaya,2026-06-05T00:00:00Z,,low-touch,,
orders,dia@example.com,Dia Lee,2025-01-01T00:00:00Z,,high-touch,csm@acme.test,enterprise
promo,eva@example.com,Eva Berg,2026-03-01T00:00:00Z,,hybrid,,
detr,fay@example.com,Fay Oz,2026-02-01T00:00:00Z,,hybrid,csm@acme.test,
idle,gus@example.com,Gus Roe,2026-01-01T00:00:00Z,,low-touch,,
quiet,hal@example.com,Hal Poe,2026-04-01T00:00:00Z,,low-touch,,
";

pub(crate) fn events() -> String {
    let mut lines = vec![
        track("stall", "login", "2026-06-05T01:00:00Z", json!({})),
        track(
            "stall",
            "onboarding_step",
            "2026-06-05T01:10:00Z",
            json!({"step": 1}),
        ),
        track(
            "orders",
            "onboarding_completed",
            "2025-01-03T00:00:00Z",
            json!({}),
        ),
        track("orders", "login", "2026-06-14T09:00:00Z", json!({})),
        track(
            "promo",
            "onboarding_completed",
            "2026-03-02T00:00:00Z",
            json!({}),
        ),
        track("promo", "login", "2026-06-14T09:00:00Z", json!({})),
        track(
            "promo",
            "nps_submitted",
            "2026-06-10T10:00:00Z",
            json!({"score": 10}),
        ),
        track(
            "detr",
            "onboarding_completed",
            "2026-02-02T00:00:00Z",
            json!({}),
        ),
        track("detr", "login", "2026-06-14T09:00:00Z", json!({})),
        track(
            "detr",
            "nps_submitted",
            "2026-06-12T10:00:00Z",
            json!({"score": 3}),
        ),
        track(
            "idle",
            "onboarding_completed",
            "2026-01-02T00:00:00Z",
            json!({}),
        ),
        track("idle", "login", "2026-05-01T08:00:00Z", json!({})),
        track(
            "quiet",
            "onboarding_completed",
            "2026-04-02T00:00:00Z",
            json!({}),
        ),
        track("quiet", "login", "2026-06-14T09:00:00Z", json!({})),
        // After NOW: invisible to this run.
        track(
            "quiet",
            "nps_submitted",
            "2026-06-20T09:00:00Z",
            json!({"score": 0}),
        ),
    ];
    for i in 0..12 {
        lines.push(track(
            "orders",
            "order_completed",
            &format!("2026-05-{:02}T12:00:00Z", i + 1),
            json!({"total": 10.0 + f64::from(i), "order_number": i + 1}),
        ));
    }
    lines.join("\n") + "\n"
}

/// What the shipped rules must send for the dataset above, as (recipient, subject).
pub(crate) fn expected() -> BTreeSet<(String, String)> {
    [
        ("ana@example.com", "Welcome aboard, Ana!"),
        ("ben@example.com", "Tip 2: automate the boring parts"),
        ("cem@example.com", "Tip 3: bring your team"),
        (
            DEFAULT_OWNER,
            "[engaged] Cem Kaya needs a human: Onboarding stalled: 1 of 5 onboarding steps done, no login in the last 7 days",
        ),
        ("dia@example.com", "Your 10th order — thank you!"),
        ("eva@example.com", "Thanks for the 10/10 — would you tell others?"),
        (
            "csm@acme.test",
            "[engaged] Fay Oz needs a human: NPS detractor: scored 3 on 2026-06-12T10:00:00Z",
        ),
        ("gus@example.com", "We miss you, Gus"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b.to_owned()))
    .collect()
}

async fn app_with_data() -> TestApp {
    let app = TestApp::new().await;
    let r = app.import_customers(CUSTOMERS).await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let r = app.import_events(&events()).await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    app
}

pub(crate) fn received(app: &TestApp) -> BTreeSet<(String, String)> {
    app.smtp
        .messages()
        .iter()
        .map(|m| {
            assert_eq!(m.rcpt_to.len(), 1, "one envelope recipient per message");
            (m.rcpt_to[0].clone(), m.subject())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shipped_rules_send_exactly_the_expected_emails() {
    let app = app_with_data().await;
    let summary = app.run_at(NOW).await;

    let messages = app.smtp.messages();
    assert_eq!(messages.len(), 8, "{:#?}", received(&app));
    assert_eq!(received(&app), expected());
    assert_eq!(summary["delivery"]["sent"], 8);
    assert_eq!(summary["customers"], 8);
    assert_eq!(summary["rules"]["welcome"]["planned"], 1);
    assert_eq!(summary["rules"]["nps"]["escalations"], 1);
    assert_eq!(summary["rules"]["engagement_level"]["tags"], 8);

    for m in &messages {
        assert_eq!(m.mail_from, "hello@acme.test");
        let to = &m.rcpt_to[0];
        let message_id = m.header("Message-ID").expect("Message-ID");
        assert!(
            message_id.starts_with('<') && message_id.ends_with("@acme.test>"),
            "{message_id}"
        );
        let is_notice = to == DEFAULT_OWNER || to == "csm@acme.test";
        let unsubscribe = m.header("List-Unsubscribe");
        if is_notice {
            assert_eq!(unsubscribe, None, "escalation notices are not marketing");
        } else {
            let u = unsubscribe.expect("customer mail has List-Unsubscribe");
            assert!(
                u.starts_with("<https://engage.acme.test/unsubscribe/"),
                "{u}"
            );
            assert!(
                u.contains("<mailto:unsubscribe@acme.test?subject=unsubscribe%20"),
                "{u}"
            );
            assert_eq!(
                m.header("List-Unsubscribe-Post").as_deref(),
                Some("List-Unsubscribe=One-Click")
            );
            let link = u[1..u.find('>').unwrap()].to_owned();
            assert!(
                m.text_body().contains(&link),
                "unsubscribe_url is in the body"
            );
        }
    }
    let ids: BTreeSet<String> = messages
        .iter()
        .map(|m| m.header("Message-ID").unwrap())
        .collect();
    assert_eq!(ids.len(), 8, "Message-IDs are unique");

    let welcome = messages
        .iter()
        .find(|m| m.rcpt_to[0] == "ana@example.com")
        .unwrap();
    assert!(
        welcome
            .header("Content-Type")
            .unwrap()
            .starts_with("multipart/alternative"),
        "welcome has an html part"
    );
    assert!(welcome.text_body().starts_with("Hi Ana,\n"));
    assert!(
        welcome
            .html_body()
            .unwrap()
            .contains("<h1>Welcome aboard, Ana!</h1>")
    );
    assert_eq!(
        welcome.header("To").unwrap(),
        "\"Ana Novak\" <ana@example.com>"
    );

    let notice = messages
        .iter()
        .find(|m| m.rcpt_to[0] == DEFAULT_OWNER)
        .unwrap();
    let body = notice.text_body();
    assert!(body.contains("id:       stall"), "{body}");
    assert!(body.contains("onboarding_step: 1 in total"), "{body}");
    assert!(body.contains("engaged escalations resolve "), "{body}");
    let tip = messages
        .iter()
        .find(|m| m.rcpt_to[0] == "ben@example.com")
        .unwrap();
    assert!(tip.text_body().contains("Automations"), "tip 2 content");
    let milestone = messages
        .iter()
        .find(|m| m.rcpt_to[0] == "dia@example.com")
        .unwrap();
    assert!(milestone.text_body().contains("your 10th order"));

    // The store agrees: every delivered action is `sent`, and each Message-ID
    // names the action it came from.
    let store = app.store().await;
    let run_id = summary["run_id"].as_i64().unwrap();
    let actions = store.actions_for_run(run_id).await.unwrap();
    let sent: BTreeSet<i64> = actions
        .iter()
        .filter(|a| a.kind != "tag")
        .map(|a| {
            assert_eq!(a.status, "sent", "{a:?}");
            a.id
        })
        .collect();
    let from_ids: BTreeSet<i64> = ids
        .iter()
        .map(|id| {
            id.split('.')
                .nth(1)
                .unwrap()
                .split('@')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(sent, from_ids);
}

#[tokio::test(flavor = "multi_thread")]
async fn rerunning_the_same_night_sends_nothing_new() {
    let app = app_with_data().await;
    app.run_at(NOW).await;
    assert_eq!(app.smtp.count(), 8);
    let again = app.run_at(NOW).await;
    assert_eq!(app.smtp.count(), 8, "no new email");
    assert_eq!(again["delivery"]["sent"], 0);
    assert_eq!(again["rules"]["welcome"]["planned"], 0);
    assert_eq!(again["rules"]["welcome"]["deduplicated"], 1);
    assert_eq!(
        again["rules"]["nps"]["deduplicated"], 2,
        "the review request and the open escalation"
    );

    // A day later the drip moves on for the customers it should.
    app.run_at("2026-06-16T02:00:00Z").await;
    let new: Vec<_> = app.smtp.messages()[8..]
        .iter()
        .map(|m| (m.rcpt_to[0].clone(), m.subject()))
        .collect();
    assert_eq!(
        new,
        vec![(
            "ana@example.com".to_owned(),
            "Tip 1: set up your workspace".to_owned()
        )]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_escalation_is_recorded_listed_and_resolved() {
    let app = app_with_data().await;
    app.run_at(NOW).await;
    let list = app.engaged(&["escalations", "--json"]).await.json();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    let fay = list.iter().find(|e| e["customer_id"] == "detr").unwrap();
    assert_eq!(fay["owner"], "csm@acme.test");
    assert_eq!(fay["status"], "open");
    assert_eq!(fay["rule"], "nps");
    assert!(fay["reason"].as_str().unwrap().contains("scored 3"));
    let cem = list.iter().find(|e| e["customer_id"] == "stall").unwrap();
    assert_eq!(cem["owner"], DEFAULT_OWNER);

    let id = fay["id"].as_i64().unwrap().to_string();
    let r = app.engaged(&["escalations", "resolve", &id]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = app.engaged(&["escalations", "resolve", &id]).await;
    assert_eq!(r.code, 1, "resolving twice is an error");
    assert!(r.stderr.contains("no open escalation"), "{}", r.stderr);
    let open = app.engaged(&["escalations", "--json"]).await.json();
    assert_eq!(open.as_array().unwrap().len(), 1);

    // Once resolved, the same NPS answer does not reopen it the next night…
    app.run_at("2026-06-16T02:00:00Z").await;
    let open = app.engaged(&["escalations", "--json"]).await.json();
    assert_eq!(open.as_array().unwrap().len(), 1);
    // …but a new low score does.
    app.import_events(
        &(track(
            "detr",
            "nps_submitted",
            "2026-06-16T12:00:00Z",
            json!({"score": 2}),
        ) + "\n"),
    )
    .await;
    app.run_at("2026-06-17T02:00:00Z").await;
    let open = app.engaged(&["escalations", "--json"]).await.json();
    assert_eq!(open.as_array().unwrap().len(), 2);
    let to_csm: Vec<String> = app
        .smtp
        .messages()
        .iter()
        .filter(|m| m.rcpt_to[0] == "csm@acme.test")
        .map(|m| m.subject())
        .collect();
    assert_eq!(to_csm.len(), 2, "{to_csm:?}");
    assert!(to_csm[1].contains("scored 2"), "{to_csm:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn smtp_4xx_is_retried_and_5xx_is_recorded_as_failed() {
    let app = app_with_data().await;
    app.smtp
        .fail_next("ben@example.com", 2, 451, "4.3.0 try again later");
    app.smtp
        .reject_always("gus@example.com", 550, "5.1.1 no such user");
    let r = app.engaged(&["run", "--now", NOW, "--json"]).await;
    assert_eq!(r.code, 1, "a permanent failure makes run exit 1");
    let summary = r.json();
    assert_eq!(summary["delivery"]["sent"], 7);
    assert_eq!(summary["delivery"]["failed"], 1);
    assert_eq!(app.smtp.attempts("ben@example.com"), 3);
    assert_eq!(
        app.smtp.attempts("gus@example.com"),
        1,
        "5xx is not retried"
    );
    assert!(received(&app).contains(&(
        "ben@example.com".to_owned(),
        "Tip 2: automate the boring parts".to_owned()
    )));

    let store = app.store().await;
    let gus = store
        .actions_for_customer(&engaged::domain::CustomerId::parse("idle").unwrap())
        .await
        .unwrap();
    let email = gus.iter().find(|a| a.kind == "email").unwrap();
    assert_eq!(email.status, "failed");
    let error = email.last_error.as_deref().unwrap();
    assert!(
        error.contains("550") && error.contains("no such user"),
        "{error}"
    );
    let ben = store
        .actions_for_customer(&engaged::domain::CustomerId::parse("tip2").unwrap())
        .await
        .unwrap();
    let email = ben.iter().find(|a| a.kind == "email").unwrap();
    assert_eq!((email.status.as_str(), email.attempts), ("sent", 3));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_killed_after_planning_delivers_the_rest_exactly_once_on_the_next_run() {
    let app = app_with_data().await;
    // A mail server that accepts connections and never answers: delivery hangs
    // after the plan is committed, and we kill the process there.
    let blackhole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_url = format!("smtp://{}", blackhole.local_addr().unwrap());
    let _holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = blackhole.accept().await {
            held.push(s);
        }
    });
    let mut child = app
        .command(&["run", "--now", NOW])
        .env("ENGAGED_MAIL__SMTP_URL", &hole_url)
        .env("ENGAGED_DELIVERY__TIMEOUT_MS", "1000")
        .env("ENGAGED_DELIVERY__LEASE_MS", "2500")
        .spawn()
        .unwrap();
    let store = app.store().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let counts = store.outbox_counts().await.unwrap();
        if counts.sending > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "delivery never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().await.unwrap();
    let counts = store.outbox_counts().await.unwrap();
    assert_eq!(counts.sent, 0);
    assert_eq!(counts.pending + counts.sending, 8, "{counts:?}");
    assert_eq!(app.smtp.count(), 0);

    // The next run plans nothing new and delivers everything once the dead
    // process's leases expire.
    let summary = app.run_at(NOW).await;
    assert_eq!(summary["delivery"]["sent"], 8);
    assert_eq!(received(&app), expected());
    assert_eq!(app.smtp.count(), 8, "each exactly once");
    let counts = store.outbox_counts().await.unwrap();
    assert_eq!((counts.sent, counts.pending, counts.sending), (8, 0, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_template_fails_only_its_action() {
    let app = app_with_data().await;
    app.write(
        "templates/welcome.txt",
        "---\nsubject: Welcome {{ customer.name }}\n---\nHi {{ customer.nickname }}\n",
    );
    let r = app.engaged(&["run", "--now", NOW, "--json"]).await;
    assert_eq!(r.code, 1);
    let summary = r.json();
    assert_eq!(summary["delivery"]["failed"], 1);
    assert_eq!(summary["delivery"]["sent"], 7);
    assert!(!received(&app).iter().any(|(to, _)| to == "ana@example.com"));
    let store = app.store().await;
    let ana = store
        .actions_for_customer(&engaged::domain::CustomerId::parse("new1").unwrap())
        .await
        .unwrap();
    let email = ana.iter().find(|a| a.kind == "email").unwrap();
    assert_eq!(email.status, "failed");
    let error = email.last_error.as_deref().unwrap();
    assert!(error.contains("welcome.txt:4:"), "{error}");
    assert!(error.contains("undefined"), "{error}");
    assert!(
        error.contains("available: customer (") && error.contains("first_name"),
        "an undefined variable lists what is available: {error}"
    );
    // Then the template line, with a caret under `customer.nickname`.
    let lines: Vec<&str> = error.lines().collect();
    assert_eq!(lines.len(), 3, "{error}");
    assert!(
        lines[0].starts_with("template error: ") && lines[0].contains("welcome.txt:4:7: undefined"),
        "{error}"
    );
    assert_eq!(lines[1], " 4 | Hi {{ customer.nickname }}");
    assert_eq!(lines[2], "   |       ^");
    // `explain` shows it as the history's reason, the caret indented under it.
    let text = app.engaged(&["explain", "new1", "--now", NOW]).await.stdout;
    let shown: Vec<&str> = text.lines().collect();
    let at = shown
        .iter()
        .position(|l| l.contains("failed — template error: ") && l.contains("welcome.txt:4:7:"))
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(
        shown[at + 1],
        "       4 | Hi {{ customer.nickname }}",
        "{text}"
    );
    assert_eq!(shown[at + 2], "         |       ^", "{text}");
    let json = app
        .engaged(&["explain", "new1", "--now", NOW, "--json"])
        .await
        .json();
    let reasons: Vec<&str> = json["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h["reason"].as_str())
        .collect();
    assert_eq!(reasons, [error], "the JSON keeps the reason as stored");
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_writes_and_sends_nothing() {
    let app = app_with_data().await;
    let r = app
        .engaged(&["run", "--now", NOW, "--dry-run", "--json"])
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let s = r.json();
    assert_eq!(s["run_id"], serde_json::Value::Null);
    assert_eq!(s["rules"]["welcome"]["planned"], 1);
    assert!(
        s["would"].as_array().unwrap().iter().any(
            |w| w["customer_id"] == "new1" && w["action"].as_str().unwrap().contains("welcome")
        )
    );
    assert_eq!(app.smtp.count(), 0);
    let store = app.store().await;
    assert!(store.runs(10).await.unwrap().is_empty());
    assert_eq!(store.outbox_counts().await.unwrap().pending, 0);
    // The real run afterwards still sends everything.
    app.run_at(NOW).await;
    assert_eq!(app.smtp.count(), 8);
}

#[tokio::test(flavor = "multi_thread")]
async fn explain_shows_facts_rule_outcomes_and_history() {
    let app = app_with_data().await;
    let before = app
        .engaged(&["explain", "detr", "--now", NOW, "--json"])
        .await;
    assert_eq!(before.code, 0, "{}", before.stderr);
    let e = before.json();
    assert_eq!(e["customer"]["email"], "fay@example.com");
    assert_eq!(e["facts"]["events"]["nps_submitted"]["count"], 1);
    let nps = e["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rule"] == "nps")
        .unwrap();
    assert_eq!(nps["outcome"], "actions");
    assert!(
        nps["actions"][0]["status"]
            .as_str()
            .unwrap()
            .starts_with("new"),
        "{nps}"
    );
    let welcome = e["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rule"] == "welcome")
        .unwrap();
    assert_eq!(welcome["outcome"], "nothing");
    // Each rule lists the facts it read, with their values.
    assert_eq!(welcome["read"], json!(["days_since_signup() = 134"]));
    let reads: Vec<&str> = nps["read"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert_eq!(
        reads,
        [
            "last(\"nps_submitted\") = at 2026-06-12T10:00:00Z with {\"score\":3}",
            "days_since(\"nps_submitted\") = 2"
        ]
    );

    app.run_at(NOW).await;
    let after = app
        .engaged(&["explain", "detr", "--now", NOW, "--json"])
        .await
        .json();
    let nps = after["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rule"] == "nps")
        .unwrap();
    assert!(
        nps["actions"][0]["status"]
            .as_str()
            .unwrap()
            .contains("already open"),
        "{nps}"
    );
    let history = after["history"].as_array().unwrap();
    assert!(
        history
            .iter()
            .any(|h| h["kind"] == "escalation_notice" && h["status"] == "sent"),
        "{history:?}"
    );
    // The human-readable form names the same things.
    let text = app.engaged(&["explain", "detr", "--now", NOW]).await;
    assert!(text.stdout.contains("nps:"), "{}", text.stdout);
    assert!(text.stdout.contains("Escalation"), "{}", text.stdout);
    let missing = app.engaged(&["explain", "nobody"]).await;
    assert_eq!(missing.code, 1);
    assert!(missing.stderr.contains("no customer"), "{}", missing.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_runs_from_a_bare_directory_and_writes_eml_files() {
    let app = TestApp::new().await;
    // No config file at all: every default must work (SQLite ./engaged.db, ./outbox/).
    std::fs::remove_file(app.path("engaged.toml")).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_engaged"))
        .current_dir(app.dir.path())
        .args(["demo", "--customers", "60"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("60 imported"), "{stdout}");
    assert!(stdout.contains("welcome"), "{stdout}");
    assert!(app.path("engaged.db").exists());
    let emls: Vec<_> = std::fs::read_dir(app.path("outbox"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!emls.is_empty());
    assert!(emls.iter().all(|p| p.extension().unwrap() == "eml"));
    let sent: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("delivery: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert_eq!(sent as usize, emls.len(), "one file per delivered email");
    let first = std::fs::read_to_string(&emls[0]).unwrap();
    assert!(first.contains("Message-ID: <"), "{first}");
    assert_eq!(app.smtp.count(), 0, "the demo used the file transport");
}

#[tokio::test(flavor = "multi_thread")]
async fn smtp_credentials_from_the_url_are_used_and_wrong_ones_fail_clearly() {
    let app = app_with_data().await;
    app.smtp.require_auth("mailer", "s3cr3t/+");
    let port = app.smtp.port();
    let wrong = app
        .command(&["run", "--now", NOW, "--json"])
        .env(
            "ENGAGED_MAIL__SMTP_URL",
            format!("smtp://mailer:nope@127.0.0.1:{port}"),
        )
        .env("ENGAGED_DELIVERY__RUN_RETRY_WINDOW_MS", "0")
        .output()
        .await
        .unwrap();
    assert_eq!(app.smtp.count(), 0);
    let summary: serde_json::Value = serde_json::from_slice(&wrong.stdout).unwrap();
    assert_eq!(summary["delivery"]["sent"], 0);
    assert_eq!(
        summary["delivery"]["failed"], 0,
        "a login failure is not the message's fault"
    );
    let store = app.store().await;
    let actions = store
        .actions_for_run(summary["run_id"].as_i64().unwrap())
        .await
        .unwrap();
    let email = actions.iter().find(|a| a.kind == "email").unwrap();
    assert_eq!(email.status, "pending");
    let error = email.last_error.as_deref().unwrap();
    assert!(
        error.contains("login as \"mailer\" failed") && error.contains("535"),
        "{error}"
    );
    assert!(!error.contains("nope"), "{error}");
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        !stderr.contains("nope"),
        "the password is never printed: {stderr}"
    );

    // The password is percent-encoded in the URL, as in lettre's URL form.
    let ok = app
        .command(&["run", "--now", NOW, "--json"])
        .env(
            "ENGAGED_MAIL__SMTP_URL",
            format!("smtp://mailer:s3cr3t%2F%2B@127.0.0.1:{port}"),
        )
        .output()
        .await
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let messages = app.smtp.messages();
    assert_eq!(messages.len(), 8, "the failed attempts are delivered now");
    assert!(
        messages
            .iter()
            .all(|m| m.authenticated_as.as_deref() == Some("mailer"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn plan_shows_what_a_run_would_do_and_the_difference_other_rules_make() {
    let app = app_with_data().await;
    // Another version of the rules: no welcome, and win-back only after 60 days.
    let other = app.path("other-rules");
    std::fs::create_dir_all(&other).unwrap();
    for entry in std::fs::read_dir(app.path("rules")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() && path.file_name().unwrap() != "welcome.rhai" {
            let text = std::fs::read_to_string(&path)
                .unwrap()
                .replace("idle < 30", "idle < 60");
            std::fs::write(other.join(path.file_name().unwrap()), text).unwrap();
        }
    }
    let r = app
        .engaged(&[
            "plan",
            "--now",
            NOW,
            "--against",
            other.to_str().unwrap(),
            "--customers",
        ])
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("−2 emails, 2 customers changed"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("  new1\n    - email welcome"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("    - email winback"), "{}", r.stdout);
    let welcome = r
        .stdout
        .lines()
        .find(|l| l.starts_with("welcome "))
        .unwrap_or_else(|| panic!("{}", r.stdout));
    assert!(welcome.contains("new1"), "{welcome}");

    let j = app.engaged(&["plan", "--now", NOW, "--json"]).await.json();
    assert_eq!(j["rules"]["welcome"]["counts"]["emails"], 1);
    assert_eq!(j["rules"]["nps"]["counts"]["escalations"], 1);

    // No side effects: no run recorded, nothing in the outbox, no mail.
    let store = app.store().await;
    assert!(store.runs(10).await.unwrap().is_empty());
    assert_eq!(store.outbox_counts().await.unwrap(), Default::default());
    assert_eq!(app.smtp.count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn simulate_shows_a_customers_calendar_and_writes_nothing() {
    let app = app_with_data().await;
    let r = app
        .engaged(&[
            "simulate",
            "--days",
            "5",
            "--customer",
            "tip2",
            "--now",
            NOW,
            "--json",
        ])
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mut seen: Vec<(String, String)> = r.json()["happenings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["at"].as_str().unwrap().to_owned(),
                h["what"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    seen.sort();
    let expected: Vec<(String, String)> = [
        ("2026-06-16T02:00:00Z", "email onboarding_tip (key tip-2)"),
        ("2026-06-16T02:00:00Z", "tag level:exploration"),
        (
            "2026-06-19T02:00:00Z",
            "email onboarding_tip (key tip-3)",
        ),
        (
            "2026-06-19T02:00:00Z",
            "escalate: Onboarding stalled: 0 of 5 onboarding steps done, no login in the last 7 days",
        ),
        ("2026-06-19T02:00:00Z", "tag onboarding-stalled"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b.to_owned()))
    .collect();
    assert_eq!(seen, expected);

    // Everyone: per-day totals and the CSM workload.
    let r = app
        .engaged(&["simulate", "--days", "3", "--all", "--now", NOW])
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("2026-06-16"), "{}", r.stdout);
    assert!(r.stdout.contains("Escalations per owner"), "{}", r.stdout);
    assert!(r.stdout.contains("csm@acme.test"), "{}", r.stdout);

    let store = app.store().await;
    assert!(store.runs(10).await.unwrap().is_empty(), "nothing written");
    assert_eq!(store.outbox_counts().await.unwrap(), Default::default());
    assert_eq!(app.smtp.count(), 0, "nothing sent");
}

#[tokio::test(flavor = "multi_thread")]
async fn output_piped_into_a_reader_that_stops_early_ends_quietly() {
    use tokio::io::AsyncReadExt;
    let app = TestApp::new().await;
    let mut csv = String::from("id,email,created_at\n");
    for i in 0..3000 {
        csv.push_str(&format!("c{i},c{i}@example.com,2026-06-14T20:00:00Z\n"));
    }
    app.import_customers(&csv).await;
    let mut child = app
        .command(&["run", "--dry-run", "--json", "--now", NOW])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Like `| head -c 100`: read a little, then close the pipe.
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 100];
    stdout.read_exact(&mut first).await.unwrap();
    drop(stdout);
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        !out.status.success(),
        "the rest of the output could not be written: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_lists_its_first_thousand_actions_and_counts_them_all_and_runs_report_their_phases()
 {
    let app = TestApp::new().await;
    for f in std::fs::read_dir(app.path("rules")).unwrap() {
        let path = f.unwrap().path();
        if path.is_file() {
            std::fs::remove_file(path).unwrap();
        }
    }
    app.write("rules/welcome.rhai", "send_email(\"welcome\");\n");
    app.write_config("[guard]\nmin_count = 1000000\n");
    let mut csv = String::from("id,email,created_at\n");
    for i in 0..1200 {
        csv.push_str(&format!(
            "d{i:04},d{i:04}@example.com,2026-06-14T20:00:00Z\n"
        ));
    }
    app.import_customers(&csv).await;
    let r = app
        .engaged(&["run", "--dry-run", "--now", crate::helpers::NOW, "--json"])
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let s = r.json();
    assert_eq!(s["would"].as_array().unwrap().len(), 1000);
    assert_eq!(s["would_total"], 1200);
    let s = app.run_at(crate::helpers::NOW).await;
    assert_eq!(s["delivery"]["sent"], 1200);
    let phases = &s["phases"];
    for phase in ["load", "evaluate", "dedup", "policies", "commit", "deliver"] {
        assert!(phases[phase].as_f64().is_some(), "{phase} in {phases}");
    }
    assert!(phases["evaluate"].as_f64().unwrap() > 0.0, "{phases}");
    assert!(phases["commit"].as_f64().unwrap() > 0.0, "{phases}");
    assert!(phases["deliver"].as_f64().unwrap() > 0.0, "{phases}");
}
