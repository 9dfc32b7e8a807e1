//! The rule engine: the rule API's semantics, the sandbox's limits, and how
//! rule errors are reported without stopping anything else.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use engaged::domain::{Customer, CustomerId, Email, EngagementModel, Event};
use engaged::engine::RuleSet;
use engaged::facts::Facts;
use engaged::plan::ActionRequest;
use serde_json::json;

use crate::helpers::{NOW, TestApp};

fn at(s: &str) -> DateTime<Utc> {
    engaged::domain::parse_timestamp(s).unwrap()
}

fn facts(events: &[(&str, &str, serde_json::Value)]) -> Arc<Facts> {
    let customer = Customer {
        id: CustomerId::parse("c1").unwrap(),
        email: Some(Email::parse("ana@example.com").unwrap()),
        name: Some("Ana".into()),
        created_at: Some(at("2026-06-01T12:00:00Z")),
        timezone: None,
        model: EngagementModel::Hybrid,
        owner: None,
        traits: serde_json::from_value(json!({"plan": "pro", "seats": 3})).unwrap(),
    };
    let events = events.iter().enumerate().map(|(i, (name, t, p))| Event {
        message_id: i.to_string(),
        customer_id: customer.id.clone(),
        name: (*name).into(),
        properties: p.clone(),
        at: at(t),
    });
    let events: Vec<Event> = events.collect();
    Arc::new(Facts::new(customer, events, vec!["vip".into()], at(NOW)))
}

fn eval(source: &str, f: &Arc<Facts>) -> Result<Vec<ActionRequest>, String> {
    let rules =
        RuleSet::from_sources(&[("r", source)], Default::default()).map_err(|e| e.to_string())?;
    let results = rules.evaluate_all(f);
    results
        .into_iter()
        .next()
        .unwrap()
        .map(|v| v.into_iter().map(|a| a.kind).collect())
        .map_err(|e| e.to_string())
}

#[test]
fn the_rule_api_answers_questions_about_the_customer() {
    let f = facts(&[
        ("login", "2026-06-08T02:00:00Z", json!({})), // exactly 7 days before NOW: outside count(e, 7)
        ("login", "2026-06-10T00:00:00Z", json!({})),
        (
            "order_completed",
            "2026-06-14T02:00:00Z",
            json!({"total": 12.5}),
        ),
        (
            "order_completed",
            "2026-06-20T00:00:00Z",
            json!({"total": 99}),
        ), // future: invisible
    ]);
    let script = r#"
        if days_since_signup() != 13 { throw "days_since_signup " + days_since_signup(); }
        if count("login") != 2 { throw "count"; }
        if count("login", 7) != 1 { throw "count window " + count("login", 7); }
        if count("order_completed") != 1 { throw "future events are invisible"; }
        if days_since("order_completed") != 1 { throw "days_since"; }
        if days_since("never") != () { throw "days_since never"; }
        if last("never") != () { throw "last never"; }
        let o = last("order_completed");
        if o.properties.total != 12.5 || o.name != "order_completed" { throw "last"; }
        if o.at.day != 14 || !(o.at < now) { throw "timestamps"; }
        if days_between(o.at, now) != 1 { throw "days_between"; }
        if customer.model != "hybrid" || customer.traits.seats != 3 || customer.owner != () { throw "customer"; }
        if !has_tag("vip") || customer.tags[0] != "vip" { throw "tags"; }
        if sum("order_completed", "total") != 12.5 { throw "sum"; }
        if `${now}` != "2026-06-15T02:00:00Z" { throw "now prints as RFC 3339: " + now; }
        send_email("welcome");
        send_email("milestone", #{ key: "orders-" + 10, orders: 10 });
        escalate("needs help");
        tag("level:awareness");
        webhook("crm", #{ event: "x", at: now });
    "#;
    let actions = eval(script, &f).unwrap();
    assert_eq!(actions.len(), 5);
    assert!(
        matches!(&actions[0], ActionRequest::Email { template, key, .. } if template == "welcome" && key == "welcome")
    );
    match &actions[1] {
        ActionRequest::Email { key, vars, .. } => {
            assert_eq!(key, "orders-10");
            assert_eq!(vars.get("orders"), Some(&json!(10)));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        actions[2],
        ActionRequest::Escalate {
            reason: "needs help".into()
        }
    );
    assert_eq!(
        actions[3],
        ActionRequest::Tag {
            name: "level:awareness".into()
        }
    );
    assert_eq!(
        actions[4],
        ActionRequest::Webhook {
            name: "crm".into(),
            payload: json!({"event": "x", "at": "2026-06-15T02:00:00Z"})
        }
    );
}

#[test]
fn the_sandbox_refuses_eval_import_and_undeclared_variables() {
    let f = facts(&[]);
    for (src, why) in [
        ("eval(\"1\")", "keyword 'eval' is disabled"),
        ("import \"x\" as y;", "'import' is a reserved keyword"),
        ("let a = undeclared + 1;", "Undefined variable: undeclared"),
        ("let t = timestamp();", "timestamp() is not available"),
    ] {
        let e = eval(src, &f).unwrap_err();
        assert!(e.starts_with("rules/r.rhai:1:"), "{src}: {e}");
        assert!(e.contains(why), "{src}: {e} should say {why:?}");
    }
}

#[test]
fn runaway_rules_are_stopped_in_milliseconds_with_a_located_error() {
    let f = facts(&[]);
    for (src, needle) in [
        ("let x = 0;\nloop { x += 1; }", "operations"),
        ("let s = \"x\";\nwhile true { s += s; }", "limit"),
        // Growing a value item by item re-checks all of it at every step
        // (depth and size), so the CPU budget stops these two first.
        ("let a = [];\nloop { a.push(1); }", "of CPU time"),
        (
            "let m = #{};\nlet i = 0;\nloop { m[`k${i}`] = i; i += 1; }",
            "of CPU time",
        ),
        ("fn f(n) { f(n + 1) }\nf(0);", "nested"),
    ] {
        let started = Instant::now();
        let e = eval(src, &f).unwrap_err();
        let took = started.elapsed();
        assert!(e.contains(needle), "{src}: {e}");
        assert!(e.starts_with("rules/r.rhai:"), "{e}");
        // A debug build is ~20x slower than release; even so this stays far
        // below a second. (Not a timing test of speed, a guard against "minutes".)
        assert!(took < Duration::from_secs(5), "{src} took {took:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_rule_is_recorded_while_the_other_rules_still_act() {
    let app = TestApp::new().await;
    app.write(
        "rules/zz_loop.rhai",
        "// loops forever\nlet n = 0;\nloop {\n  n += 1;\n}\n",
    );
    app.write(
        "rules/zz_huge.rhai",
        "let s = \"0123456789\";\nfor i in 0..100 {\n  s += s;\n}\n",
    );
    app.import_customers("id,email,name,created_at\nc1,ana@example.com,Ana,2026-06-15T00:00:00Z\nc2,ben@example.com,Ben,2026-06-15T00:00:00Z\n")
        .await;
    let r = app.engaged(&["run", "--now", NOW, "--json"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let s = r.json();
    assert_eq!(s["rules"]["zz_loop"]["errors"], 2);
    assert_eq!(s["rules"]["zz_huge"]["errors"], 2);
    assert_eq!(s["rules"]["welcome"]["planned"], 2, "other rules still act");
    assert_eq!(app.smtp.count(), 2);
    let errors = s["errors"].as_array().unwrap();
    let messages: Vec<&str> = errors
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert!(
        messages.iter().any(|m| m.contains("zz_loop.rhai:4:")
            && m.contains("stopped after")
            && m.contains("operations")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("zz_huge.rhai:3:5: Length of string grew past the limit")),
        "{messages:?}"
    );
    let store = app.store().await;
    let recorded = store
        .run_errors(s["run_id"].as_i64().unwrap())
        .await
        .unwrap();
    assert_eq!(recorded.len(), 4);
    // The human-readable summary shows the source line with a caret.
    let text = app.engaged(&["run", "--now", NOW]).await.stdout;
    assert!(text.contains(" 4 |   n += 1;\n   |   "), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reports_rule_and_template_errors_as_file_line_col() {
    let app = TestApp::new().await;
    let r = app.engaged(&["check"]).await;
    assert_eq!(
        r.code, 0,
        "the shipped rules and templates are clean: {}",
        r.stdout
    );
    app.write("rules/broken.rhai", "// comment\nlet x = ;\n");
    app.write(
        "templates/bad.txt",
        "---\nsubject: hi\n---\nline\n{% if %}\n",
    );
    let r = app.engaged(&["check"]).await;
    assert_eq!(r.code, 1);
    assert!(r.stdout.contains("rules/broken.rhai:2:9: "), "{}", r.stdout);
    assert!(r.stdout.contains("templates/bad.txt:5:"), "{}", r.stdout);
    // A run refuses to start with broken rules rather than silently skipping them.
    let r = app.engaged(&["run", "--now", NOW]).await;
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("rules/broken.rhai:2:9"), "{}", r.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn check_finds_unknown_template_filters_and_tests_and_suggests_the_real_name() {
    let app = TestApp::new().await;
    // MiniJinja alone would only notice when the line renders, and the test
    // sits in a branch that rarely does.
    app.write(
        "templates/typo.txt",
        "---\nsubject: \"Hi {{ customer.name | titel }}\"\n---\nHi {{ customer.name | uper }},\n{% if orders is defined and orders is evn %}even{% endif %}\n",
    );
    let r = app.engaged(&["check"]).await;
    assert_eq!(r.code, 1, "{}", r.stdout);
    let lines: Vec<&str> = r.stdout.lines().collect();
    let find = |suffix: &str| {
        lines
            .iter()
            .position(|l| l.ends_with(suffix))
            .unwrap_or_else(|| panic!("no {suffix:?} in\n{}", r.stdout))
    };
    let at = find("templates/typo.txt:4:23: unknown filter \"uper\"; did you mean \"upper\"?");
    assert_eq!(lines[at + 1], " 4 | Hi {{ customer.name | uper }},");
    let caret_at = |col: usize| format!("   | {}^", " ".repeat(col - 1));
    assert_eq!(lines[at + 2], caret_at(23));
    let at = find("templates/typo.txt:5:39: unknown test \"evn\"; did you mean \"even\"?");
    assert_eq!(lines[at + 2], caret_at(39));
    // The subject's line and column are the file's.
    let at = find("templates/typo.txt:2:33: unknown filter \"titel\"; did you mean \"title\"?");
    assert_eq!(
        lines[at + 1],
        " 2 | subject: \"Hi {{ customer.name | titel }}\""
    );
    assert_eq!(lines[at + 2], caret_at(33));
    assert!(r.stdout.contains("3 error(s)"), "{}", r.stdout);
    // `run` reports it at load, like a syntax error, and does not start.
    let r = app.engaged(&["run", "--now", NOW]).await;
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .contains("templates/typo.txt:4:23: unknown filter \"uper\""),
        "{}",
        r.stderr
    );
    // Real filters and tests are fine.
    app.write(
        "templates/typo.txt",
        "---\nsubject: \"Hi {{ customer.name | title }}\"\n---\nHi {{ customer.name | upper }},\n{% if orders is defined and orders is even %}even{% endif %}\n",
    );
    let r = app.engaged(&["check"]).await;
    assert_eq!(r.code, 0, "{}", r.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_template_in_send_email_is_a_rule_error() {
    let app = TestApp::new().await;
    app.write("rules/typo.rhai", "send_email(\"welcom\");\n");
    app.import_customers("id,email\nc1,ana@example.com\n").await;
    let s = app.run_at(NOW).await;
    let m = s["errors"][0]["message"].as_str().unwrap();
    assert!(
        m.contains("typo.rhai:1:1") && m.contains("no template named \"welcom\""),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn webhooks_post_json_and_are_retried_until_2xx() {
    use axum::{Json, Router, extract::State, http::StatusCode, routing::post};
    use std::sync::Mutex;

    type Calls = Arc<Mutex<Vec<serde_json::Value>>>;
    let calls: Calls = Arc::default();
    async fn hook(State(calls): State<Calls>, Json(body): Json<serde_json::Value>) -> StatusCode {
        let mut c = calls.lock().unwrap();
        c.push(body);
        if c.len() == 1 {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        }
    }
    let router = Router::new()
        .route("/hook", post(hook))
        .with_state(calls.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });

    let app = TestApp::new().await;
    app.write_config(&format!("[webhooks.crm]\nurl = \"http://{addr}/hook\"\n"));
    app.write("rules/notify.rhai", "if customer.traits.plan == \"pro\" {\n  webhook(\"crm\", #{ plan: customer.traits.plan, key: \"pro-signup\" });\n}\n");
    app.import_customers("id,email,plan\nc1,ana@example.com,pro\nc2,ben@example.com,starter\n")
        .await;
    let s = app.run_at(NOW).await;
    assert_eq!(s["rules"]["notify"]["webhooks"], 1);
    let c = calls.lock().unwrap().clone();
    assert_eq!(c.len(), 2, "a 503 is retried");
    assert_eq!(c[1]["customer_id"], "c1");
    assert_eq!(c[1]["payload"]["plan"], "pro");
    assert_eq!(c[1]["rule"], "notify");
    app.run_at(NOW).await;
    assert_eq!(
        calls.lock().unwrap().len(),
        2,
        "the same webhook is not sent twice"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn check_finds_calls_to_functions_that_do_not_exist_and_suggests_the_api_name() {
    let app = TestApp::new().await;
    // The typo sits in a branch that rarely runs: Rhai alone would only
    // notice on the night a customer reaches it.
    app.write(
        "rules/typo.rhai",
        "// rare branch\nif customer.model == \"none\" {\n    let n = cout(\"login\", 7);\n}\n",
    );
    let r = app.engaged(&["check"]).await;
    assert_eq!(r.code, 1);
    let lines: Vec<&str> = r.stdout.lines().collect();
    let at = lines
        .iter()
        .position(|l| {
            l.contains("rules/typo.rhai:3:13: unknown function `cout`; did you mean `count`?")
        })
        .unwrap_or_else(|| panic!("{}", r.stdout));
    assert_eq!(lines[at + 1], " 3 |     let n = cout(\"login\", 7);");
    assert_eq!(lines[at + 2], "   |             ^");
    // Functions the rule defines itself, and Rhai's own, are known.
    app.write(
        "rules/typo.rhai",
        "fn twice(x) { x * 2 }\nlet n = twice(count(\"login\"));\nlet s = `${n}`.to_upper();\nprint(type_of(s));\n",
    );
    let r = app.engaged(&["check"]).await;
    assert_eq!(r.code, 0, "{}", r.stdout);
}

#[test]
fn check_knows_exactly_the_keys_the_customer_map_has() {
    let f = facts(&[]);
    let actions = eval("webhook(\"keys\", #{ keys: customer.keys() });", &f).unwrap();
    let ActionRequest::Webhook { payload, .. } = &actions[0] else {
        panic!("{actions:?}")
    };
    let mut seen: Vec<String> = payload["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect();
    seen.sort();
    let mut known: Vec<String> = engaged::engine::CUSTOMER_KEYS
        .iter()
        .map(|k| (*k).to_owned())
        .collect();
    known.sort();
    assert_eq!(seen, known);
}

#[tokio::test(flavor = "multi_thread")]
async fn check_names_the_customer_property_that_does_not_exist() {
    let app = TestApp::new().await;
    app.write(
        "rules/typo.rhai",
        "if customer.emial == () {\n  tag(\"x\");\n}\nlet plan = customer.traits.plan;\n",
    );
    let r = app.engaged(&["check"]).await;
    assert_eq!(r.code, 1);
    assert!(
        r.stdout.contains(
            "rules/typo.rhai:1:13: customer has no property `emial`; did you mean `email`? customer has: id, email,"
        ),
        "{}",
        r.stdout
    );
    assert_eq!(
        r.stdout.matches("customer has no property").count(),
        1,
        "traits.plan is fine"
    );
}

#[test]
fn a_property_the_event_map_does_not_have_is_a_compile_error_that_points_to_properties() {
    let f = facts(&[("nps_submitted", "2026-06-14T00:00:00Z", json!({"score": 3}))]);
    let e = eval(
        "let answer = last(\"nps_submitted\");\nif answer != () && answer.score <= 6 {\n    tag(\"x\");\n}\n",
        &f,
    )
    .unwrap_err();
    assert!(
        e.starts_with("rules/r.rhai:2:27: last(…) gives #{name, at, properties}: no property `score`; the event's own data is in `.properties.score`; it has: name, at, properties"),
        "{e}"
    );
    let e = eval("let t = last(\"login\").nme;", &f).unwrap_err();
    assert!(
        e.contains(
            "1:23: last(…) gives #{name, at, properties}: no property `nme`; did you mean `name`?"
        ),
        "{e}"
    );
    // What the map has is fine; so are variables that are not (only) events.
    let ok = [
        "let answer = last(\"nps_submitted\");\nif answer != () && answer.properties.score <= 6 { tag(answer.name); }",
        "let a = last(\"nps_submitted\");\na = #{ score: 1 };\nif a.score == 1 { tag(\"reassigned\"); }",
        "fn score(answer) { answer.score }\nlet answer = last(\"nps_submitted\");\nif score(#{ score: 2 }) == 2 { tag(\"param\"); }",
        "let a = last(\"nps_submitted\");\nif true { let a = #{ score: 4 }; if a.score == 4 { tag(\"shadowed\"); } }",
        "let ev = last(\"nps_submitted\");\ntry { throw \"x\"; } catch (ev) { tag(ev); }",
        "let ev = last(\"nps_submitted\");\nev.score = ev.properties.score;\nif ev.score == 3 { tag(\"copied\"); }",
    ];
    for source in ok {
        let actions = eval(source, &f).unwrap_or_else(|e| panic!("{source}\n{e}"));
        assert_eq!(actions.len(), 1, "{source}");
    }
    // The list matches the map the rule API really builds.
    let actions = eval(
        "webhook(\"keys\", #{ keys: last(\"nps_submitted\").keys() });",
        &f,
    )
    .unwrap();
    let ActionRequest::Webhook { payload, .. } = &actions[0] else {
        panic!("{actions:?}")
    };
    let mut seen: Vec<&str> = payload["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    seen.sort();
    let mut known = engaged::engine::EVENT_KEYS.to_vec();
    known.sort();
    assert_eq!(seen, known);
}

#[test]
fn a_call_with_the_wrong_argument_types_says_what_was_expected() {
    let f = facts(&[]);
    let e = eval("let n = count(7);", &f).unwrap_err();
    assert!(
        e.contains("no function count (i64)")
            && e.contains("expected count(string) or count(string, i64)"),
        "{e}"
    );
}

#[test]
fn comparing_missing_data_or_text_with_a_number_is_an_error_that_says_so() {
    let f = facts(&[]);
    let e = eval("if days_since(\"login\") > 30 { tag(\"x\"); }", &f).unwrap_err();
    assert!(
        e.starts_with("rules/r.rhai:1:") && e.contains("compares a number with () (missing data"),
        "{e}"
    );
    let e = eval("if customer.traits.plan > 3 { tag(\"x\"); }", &f).unwrap_err();
    assert!(e.contains("compares a number with a string"), "{e}");
    // Testing for missing data first is the way, and works.
    let ok = eval(
        "let d = days_since(\"login\");\nif d != () && d > 30 { tag(\"x\"); }\nif d == () { tag(\"never\"); }",
        &f,
    )
    .unwrap();
    assert_eq!(
        ok,
        [ActionRequest::Tag {
            name: "never".into()
        }]
    );
}

#[test]
fn an_unknown_timestamp_property_lists_the_ones_that_exist() {
    let f = facts(&[]);
    let e = eval("let y = now.yeer;", &f).unwrap_err();
    assert!(
        e.contains("'yeer'") && e.contains("a Timestamp has .year .month .day"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn previews_refuse_to_create_a_database_that_does_not_exist() {
    let app = TestApp::new().await;
    for args in [
        vec!["plan"],
        vec!["run", "--dry-run"],
        vec!["simulate", "--days", "2", "--all"],
    ] {
        let r = app.engaged(&args).await;
        assert_eq!(r.code, 2, "{args:?}");
        assert!(
            r.stderr.contains("no database at"),
            "{args:?}: {}",
            r.stderr
        );
    }
    assert!(!app.path("engaged.db").exists(), "nothing was created");
}
