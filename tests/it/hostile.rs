//! Hostile input (issue 4, point 8): every bad input gives a clear error
//! naming its line, rule or template; the rest of the work continues; and
//! nothing panics. Header injection, invalid addresses, huge fields, absurd
//! timestamps, runaway rules and templates, and property tests over the
//! parsing and rule-API surfaces.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Datelike, Utc};
use engaged::domain::{Customer, CustomerId, Email, EngagementModel, Event, parse_timestamp};
use engaged::engine::RuleSet;
use engaged::facts::Facts;
use engaged::ingest::segment::{Message, parse_message};
use engaged::plan::ActionRequest;
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use serde_json::{Value, json};

use crate::helpers::{NOW, TestApp, track};

fn at(s: &str) -> DateTime<Utc> {
    parse_timestamp(s).unwrap()
}

/// The stderr line reporting `FILE:LINE: `, or a panic that shows all of stderr.
fn line_error<'a>(stderr: &'a str, file: &str, line: u64) -> &'a str {
    let needle = format!("{file}:{line}: ");
    stderr
        .lines()
        .find(|l| l.contains(&needle))
        .unwrap_or_else(|| panic!("no error for {file}:{line} in:\n{stderr}"))
}

/// The messages of a run summary's `errors`.
fn error_messages(summary: &Value) -> Vec<String> {
    summary["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("no errors array in {summary}"))
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_owned())
        .collect()
}

// ---------------------------------------------------------------------------
// 1. CR/LF in names and subjects
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_name_with_crlf_cannot_inject_headers_or_recipients_into_an_email() {
    let app = TestApp::new().await;
    app.write(
        "templates/inject.txt",
        "---\nsubject: \"Hi {{ customer.name }}\"\n---\nHello there.\n",
    );
    app.write("rules/inject.rhai", "send_email(\"inject\");\n");
    let r = app
        .import_customers(
            "id,email,name,created_at\n\
             c1,ana@example.com,\"Ana\r\nBcc: evil@example.com\",2026-06-15T01:59:00Z\n",
        )
        .await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("1 imported"), "{}", r.stdout);

    let s = app.run_at(NOW).await;
    assert_eq!(s["delivery"]["sent"], 2, "{s}");
    assert_eq!(s["rules"]["inject"]["planned"], 1, "{s}");
    assert_eq!(s["rules"]["welcome"]["planned"], 1, "{s}");
    let messages = app.smtp.messages();
    assert_eq!(messages.len(), 2, "the welcome email and the inject email");

    for m in &messages {
        let raw = String::from_utf8_lossy(&m.data).into_owned();
        assert_eq!(m.rcpt_to, ["ana@example.com"], "one envelope recipient");
        assert!(
            !raw.lines().any(|l| l.starts_with("Bcc:")),
            "an injected Bcc line:\n{raw}"
        );
        // Header section: every physical line is a new `Name: value` or a
        // folded continuation (starting with whitespace); no bare CR or LF.
        let head = raw.split("\r\n\r\n").next().unwrap();
        let mut names = Vec::new();
        for line in head.split("\r\n") {
            assert!(
                !line.contains(['\r', '\n']),
                "bare CR/LF in header line {line:?}"
            );
            if !line.starts_with([' ', '\t']) {
                let (name, _) = line
                    .split_once(':')
                    .unwrap_or_else(|| panic!("not a header line: {line:?}\n{raw}"));
                names.push(name.to_ascii_lowercase());
            }
        }
        assert_eq!(names.iter().filter(|n| *n == "to").count(), 1, "{raw}");
        assert!(
            !names.iter().any(|n| n == "bcc" || n == "cc"),
            "extra recipients in {names:?}"
        );
        let to = m.header("To").unwrap();
        assert!(!to.contains(['\r', '\n']), "{to:?}");
        assert!(to.contains("<ana@example.com>"), "{to:?}");
        assert!(!to.contains("<evil@example.com>"), "{to:?}");
        assert!(!m.subject().contains(['\r', '\n']), "{:?}", m.subject());
    }
    let subjects: Vec<String> = messages.iter().map(|m| m.subject()).collect();
    assert!(
        subjects.iter().any(|s| s == "Welcome aboard, Ana!"),
        "{subjects:?}"
    );
    assert!(
        subjects.iter().any(|s| s == "Hi Ana Bcc: evil@example.com"),
        "the name's CR/LF became a space in the subject: {subjects:?}"
    );
}

// ---------------------------------------------------------------------------
// 2. Invalid email addresses
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn invalid_email_addresses_in_csv_are_rejected_with_line_numbers_and_good_rows_kept() {
    let app = TestApp::new().await;
    let csv = "id,email,name,owner\n\
               c1,ana@example.com,Ana,\n\
               c2,bad@@example.com,Bad,\n\
               c3,\"x@y.com, z@w.com\",Two,\n\
               c4,\"x@y.com\r\nBcc: evil@example.com\",Inj,\n\
               c5,<angle@example.com>,Angle,\n\
               c6,ben@example.com,Ben,not-an-owner\n\
               c7,cem@example.com,Cem,csm@acme.test\n\
               c8,,Empty,\n";
    let r = app.import_customers(csv).await;
    assert_eq!(r.code, 1, "rejections make the import exit 1");
    for (line, why) in [
        (3, "email: invalid email address \"bad@@example.com\""),
        (4, "email: invalid email address"),
        // The CR/LF is escaped in the report: the error stays on one line.
        (
            5,
            "email: invalid email address \"x@y.com\\r\\nBcc: evil@example.com\"",
        ),
        (7, "email: invalid email address \"<angle@example.com>\""),
        (8, "owner: invalid email address \"not-an-owner\""),
        (10, "email is required"),
    ] {
        let l = line_error(&r.stderr, "customers.csv", line);
        assert!(l.contains(why), "line {line} should say {why:?}: {l}");
    }
    assert!(
        !r.stderr.lines().any(|l| l.starts_with("Bcc:")),
        "{}",
        r.stderr
    );
    assert!(
        r.stdout
            .contains("2 imported, 0 updated, 0 duplicate, 0 ignored, 6 rejected"),
        "{}",
        r.stdout
    );
    let store = app.store().await;
    assert_eq!(store.customer_count().await.unwrap(), 2);
    let cem = store
        .customer(&CustomerId::parse("c7").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cem.owner.unwrap().as_str(), "csm@acme.test");
    assert!(
        store
            .customer(&CustomerId::parse("c4").unwrap())
            .await
            .unwrap()
            .is_none()
    );
}

#[test]
fn invalid_email_addresses_in_identify_traits_are_rejected_with_a_reason() {
    let now = at(NOW);
    for (traits, why) in [
        (
            json!({"email": "nope"}),
            "email: invalid email address \"nope\"",
        ),
        (
            json!({"email": "a@b.com\r\nBcc: x@y.com"}),
            "email: invalid email address",
        ),
        (
            json!({"email": "a@b.com, c@d.com"}),
            "email: invalid email address",
        ),
        (json!({"email": 42}), "email: invalid email address \"42\""),
        (
            json!({"email": "ana@example.com", "owner": "csm"}),
            "owner: invalid email address \"csm\"",
        ),
    ] {
        let v = json!({"type": "identify", "userId": "u1", "traits": traits});
        let e = parse_message(&v, now).unwrap_err();
        assert!(
            e.starts_with(why),
            "{traits}: {e:?} should start with {why:?}"
        );
    }
    // A valid address is trimmed and its domain lower-cased; an empty one is absent.
    let v = json!({"type": "identify", "userId": "u1", "traits": {"email": " Ana@Example.COM "}});
    let Ok(Message::Identify { patch, .. }) = parse_message(&v, now) else {
        panic!("a valid identify is accepted")
    };
    assert_eq!(patch.email.unwrap().as_str(), "Ana@example.com");
    let v = json!({"type": "identify", "userId": "u1", "traits": {"email": ""}});
    let Ok(Message::Identify { patch, .. }) = parse_message(&v, now) else {
        panic!("an empty email is treated as absent")
    };
    assert_eq!(patch.email, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_identify_line_with_a_bad_email_is_rejected_and_its_neighbours_imported() {
    let app = TestApp::new().await;
    let lines = [
        json!({"type": "identify", "userId": "c1", "traits": {"email": "ana@example.com"}}).to_string(),
        json!({"type": "identify", "userId": "c2", "traits": {"email": "ben@example.com\nBcc: evil@example.com"}}).to_string(),
        json!({"type": "identify", "userId": "c3", "traits": {"email": "cem@example.com"}}).to_string(),
    ];
    let r = app.import_events(&(lines.join("\n") + "\n")).await;
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    let l = line_error(&r.stderr, "events.jsonl", 2);
    assert!(l.contains("email: invalid email address"), "{l}");
    assert!(
        r.stdout
            .contains("2 imported, 0 updated, 0 duplicate, 0 ignored, 1 rejected"),
        "{}",
        r.stdout
    );
    assert_eq!(app.store().await.customer_count().await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_email_address_accepted_at_import_is_still_there_when_read_back() {
    let app = TestApp::new().await;
    let r = app
        .import_customers("id,email,name\nc1,ana@exİmple.com,Ana\n")
        .await;
    if r.code == 1 {
        // Rejecting the address outright is also a correct outcome.
        let l = line_error(&r.stderr, "customers.csv", 2);
        assert!(l.contains("invalid email address"), "{l}");
        return;
    }
    assert!(r.stdout.contains("1 imported"), "{}", r.stdout);
    let c = app
        .store()
        .await
        .customer(&CustomerId::parse("c1").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(c.email.is_some(), "the imported address was lost: {c:?}");
}

// ---------------------------------------------------------------------------
// 3. Huge fields
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_300_kb_csv_field_is_rejected_by_size_and_the_rows_around_it_are_imported() {
    let app = TestApp::new().await;
    let huge = "x".repeat(300 * 1024);
    let csv = format!(
        "id,email,name\n\
         c1,ana@example.com,Ana\n\
         c2,ben@example.com,{huge}\n\
         c3,cem@example.com,Cem\n\
         c4,dia@example.com,{long}\n\
         c5,eva@example.com,Eva\n",
        long = "y".repeat(501),
    );
    let r = app.import_customers(&csv).await;
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    let l = line_error(&r.stderr, "customers.csv", 3);
    assert!(
        l.contains("column \"name\" is longer than 262144 bytes"),
        "{l}"
    );
    assert!(
        l.len() < 500,
        "the report does not echo the field: {l:.200}"
    );
    let l = line_error(&r.stderr, "customers.csv", 5);
    assert!(l.contains("name is longer than 500 characters"), "{l}");
    assert!(
        r.stdout
            .contains("3 imported, 0 updated, 0 duplicate, 0 ignored, 2 rejected"),
        "{}",
        r.stdout
    );
    let store = app.store().await;
    assert_eq!(store.customer_count().await.unwrap(), 3);
    for id in ["c1", "c3", "c5"] {
        assert!(
            store
                .customer(&CustomerId::parse(id).unwrap())
                .await
                .unwrap()
                .is_some(),
            "{id} is kept"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_2_mb_jsonl_line_is_rejected_by_size_and_the_lines_around_it_are_imported() {
    let app = TestApp::new().await;
    let big = track(
        "c1",
        "login",
        "2026-06-02T00:00:00Z",
        json!({"blob": "z".repeat(2 * 1024 * 1024)}),
    );
    assert!(big.len() > 2 * 1024 * 1024);
    let lines = [
        track("c1", "login", "2026-06-01T00:00:00Z", json!({})),
        big,
        json!({"type": "identify", "userId": "c1", "traits": {"email": "ana@example.com"}})
            .to_string(),
    ];
    let r = app.import_events(&(lines.join("\n") + "\n")).await;
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    let l = line_error(&r.stderr, "events.jsonl", 2);
    assert!(l.contains("line is longer than 1048576 bytes"), "{l:.300}");
    assert!(l.len() < 500, "the report does not echo the line: {l:.200}");
    assert!(
        r.stdout
            .contains("2 imported, 0 updated, 0 duplicate, 0 ignored, 1 rejected"),
        "{}",
        r.stdout
    );
    let store = app.store().await;
    assert_eq!(store.customer_count().await.unwrap(), 1);
    let id = CustomerId::parse("c1").unwrap();
    let events = store
        .events_in_id_range(&id, &id, Utc::now())
        .await
        .unwrap();
    assert_eq!(events.len(), 1, "only the small login is kept");
    assert_eq!(events[0].at, at("2026-06-01T00:00:00Z"));
}

#[test]
fn an_overlong_event_name_or_message_id_is_rejected_with_its_limit() {
    let now = at(NOW);
    let v = json!({"type": "track", "userId": "u", "event": "e".repeat(201)});
    let e = parse_message(&v, now).unwrap_err();
    assert!(e.contains("1 to 200 characters"), "{e}");
    let v = json!({"type": "track", "userId": "u", "event": "ok", "messageId": "m".repeat(257)});
    let e = parse_message(&v, now).unwrap_err();
    assert!(e.contains("longer than 256 characters"), "{e}");
    let v = json!({"type": "track", "userId": "u".repeat(257), "event": "ok"});
    let e = parse_message(&v, now).unwrap_err();
    assert!(e.starts_with("userId: id is 257 bytes long"), "{e}");
}

// ---------------------------------------------------------------------------
// 4. Unparseable and far-future timestamps
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn unparseable_and_far_future_timestamps_are_rejected_naming_the_field() {
    let app = TestApp::new().await;
    let ev = |ts: Value, id: &str| {
        json!({"type": "track", "userId": "c1", "event": "login", "timestamp": ts, "messageId": id})
            .to_string()
    };
    let lines = [
        track("c1", "login", "2026-06-01T00:00:00Z", json!({})), // 1
        ev(json!("9999-01-01T00:00:00Z"), "far"),                // 2
        ev(json!(12), "number"),                                 // 3
        ev(json!("2026-02-30T00:00:00Z"), "no-such-day"),        // 4
        ev(json!("1969-12-31T23:59:59Z"), "before-1970"),        // 5
        ev(json!("soon"), "words"),                              // 6
        json!({"type": "identify", "userId": "c1",
               "traits": {"email": "ana@example.com", "createdAt": "9999-01-01"}})
        .to_string(), // 7
        ev(json!({"$date": 1}), "object"),                       // 8
        ev(json!("2200-12-31T23:00:00-05:00"), "past-2200-in-utc"), // 9
        track("c1", "login", "2026-06-02T00:00:00+02:00", json!({})), // 10
    ];
    let r = app.import_events(&(lines.join("\n") + "\n")).await;
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    for (line, why) in [
        (2, "timestamp: invalid timestamp \"9999-01-01T00:00:00Z\""),
        (3, "timestamp must be an RFC 3339 string"),
        (4, "timestamp: invalid timestamp"),
        (5, "timestamp: invalid timestamp"),
        (6, "timestamp: invalid timestamp \"soon\""),
        (7, "createdAt: invalid timestamp \"9999-01-01\""),
        (8, "timestamp must be an RFC 3339 string"),
        (9, "timestamp: invalid timestamp"),
    ] {
        let l = line_error(&r.stderr, "events.jsonl", line);
        assert!(l.contains(why), "line {line} should say {why:?}: {l}");
    }
    assert!(
        r.stdout
            .contains("2 imported, 0 updated, 0 duplicate, 0 ignored, 8 rejected"),
        "{}",
        r.stdout
    );
    let store = app.store().await;
    let id = CustomerId::parse("c1").unwrap();
    let events = store
        .events_in_id_range(&id, &id, Utc::now())
        .await
        .unwrap();
    let times: Vec<String> = events.iter().map(|e| e.at.to_rfc3339()).collect();
    assert_eq!(
        times,
        ["2026-06-01T00:00:00+00:00", "2026-06-01T22:00:00+00:00"]
    );
    assert_eq!(store.customer_count().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_far_future_created_at_in_csv_is_rejected_naming_the_column() {
    let app = TestApp::new().await;
    let r = app
        .import_customers(
            "id,email,created_at\n\
             c1,ana@example.com,9999-01-01T00:00:00Z\n\
             c2,ben@example.com,2200-12-31\n",
        )
        .await;
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    let l = line_error(&r.stderr, "customers.csv", 2);
    assert!(
        l.contains("created_at: invalid timestamp \"9999-01-01T00:00:00Z\""),
        "{l}"
    );
    assert!(
        r.stdout
            .contains("1 imported, 0 updated, 0 duplicate, 0 ignored, 1 rejected"),
        "{}",
        r.stdout
    );
}

#[test]
fn timestamps_at_the_edges_of_the_accepted_range() {
    let now = at(NOW);
    let year = |ts: &str| {
        let v = json!({"type": "track", "userId": "u", "event": "e", "timestamp": ts});
        match parse_message(&v, now) {
            Ok(Message::Track(e)) => Ok(e.at.year()),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        }
    };
    assert_eq!(year("1970-01-01T00:00:00Z"), Ok(1970));
    assert_eq!(year("2200-12-31T23:59:59Z"), Ok(2200));
    assert!(year("1970-01-01T00:30:00+01:00").is_err(), "1969 in UTC");
    assert!(year("2200-12-31T23:00:00-05:00").is_err(), "2201 in UTC");
    assert!(year("+10000-01-01T00:00:00Z").is_err());
    assert!(year("").is_err());
}

// ---------------------------------------------------------------------------
// 5. Runaway rules
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn runaway_rules_next_to_the_shipped_ones_are_stopped_and_reported_by_file_line_col() {
    let app = TestApp::new().await;
    const SIZE: &str =
        "grew past the limit (strings 65536 bytes, arrays 10000 items, maps 10000 entries)";
    const OPS: &str = "stopped after 200000 operations (an endless loop?)";
    // Growing a value one item at a time re-checks the whole value at every
    // step (depth and size, see hostile_rules.rs), so the CPU budget stops
    // these before the size limit; zz_pad and zz_doubling still reach it.
    const CPU: &str = "a rule runs once per customer, so its work must stay small: look for a loop over a large array or map, or a search through one inside a loop";
    // (rule, source, the line that runs away, what the error says)
    let runaway = [
        (
            "zz_recurse",
            "// endless recursion\nfn f(n) { f(n + 1) }\nf(0);\n",
            3,
            "calls nested deeper than 32 levels (endless recursion?)",
        ),
        ("zz_array", "let a = [];\nloop {\n  a.push(1);\n}\n", 3, CPU),
        ("zz_pad", "let a = [];\na.pad(1000000, 0);\n", 2, SIZE),
        (
            "zz_doubling",
            "let a = [1, 2, 3];\nloop {\n  a += a;\n}\n",
            3,
            SIZE,
        ),
        (
            "zz_nested_map",
            "let m = #{ a: 1 };\nloop {\n  m = #{ a: m, b: m };\n}\n",
            3,
            SIZE,
        ),
        (
            "zz_map_keys",
            "let m = #{};\nlet i = 0;\nloop {\n  m[`k${i}`] = i;\n  i += 1;\n}\n",
            4,
            CPU,
        ),
        (
            "zz_spin",
            "let n = 0;\nwhile true {\n  n += 1;\n}\n",
            3,
            OPS,
        ),
    ];
    for (name, src, ..) in runaway {
        app.write(&format!("rules/{name}.rhai"), src);
    }
    app.import_customers(
        "id,email,name,created_at\n\
         c1,ana@example.com,Ana Novak,2026-06-15T01:59:00Z\n",
    )
    .await;

    let started = Instant::now();
    let r = app.engaged(&["run", "--now", NOW, "--json"]).await;
    let took = started.elapsed();
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    // A guard against "minutes", not a speed test.
    assert!(took < Duration::from_secs(60), "the run took {took:?}");

    let s = r.json();
    let messages = error_messages(&s);
    assert_eq!(messages.len(), runaway.len(), "{messages:?}");
    for (name, _, line, why) in runaway {
        assert_eq!(s["rules"][name]["errors"], 1, "{name}: {s}");
        assert_eq!(s["rules"][name]["planned"], 0, "{name}: {s}");
        let needle = format!("rules/{name}.rhai:{line}:");
        let m = messages
            .iter()
            .find(|m| m.contains(&needle))
            .unwrap_or_else(|| panic!("no error at {needle} in {messages:?}"));
        // FILE:LINE:COL: message
        let rest = &m[m.find(&needle).unwrap() + needle.len()..];
        let (col, message) = rest.split_once(": ").unwrap_or_else(|| panic!("{m}"));
        assert!(col.parse::<usize>().is_ok_and(|c| c >= 1), "{m}");
        assert!(message.ends_with(why), "{name}: {m}");
    }

    // The shipped rules still act.
    assert_eq!(s["rules"]["welcome"]["planned"], 1, "{s}");
    assert_eq!(s["delivery"]["sent"], 1, "{s}");
    let sent = app.smtp.messages();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].subject(), "Welcome aboard, Ana!");
    assert_eq!(sent[0].rcpt_to, ["ana@example.com"]);
}

#[test]

fn a_rule_cannot_grow_a_map_past_the_map_size_limit() {
    // A map just under the limit from the customer's traits, so a few
    // index assignments cross it (growing one from empty would spend the
    // CPU budget first).
    let mut customer = customer_with("login", 1, 0);
    customer.traits = (0..9_995).map(|i| (format!("t{i}"), json!(i))).collect();
    let facts = Arc::new(Facts::new(customer, vec![], vec![], at(NOW)));
    let src = "let m = customer.traits;\nfor i in 0..20 {\n  m[`k${i}`] = i;\n}\n";
    let rules = RuleSet::from_sources(&[("big_map", src)], Default::default()).unwrap();
    let result = rules.evaluate_all(&facts).remove(0);
    let e = result.expect_err("10,015 entries is past the 10000-entry limit");
    let e = e.to_string();
    assert!(
        e.starts_with("rules/big_map.rhai:3:")
            && e.contains("Size of object map grew past the limit"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------
// 6. A template that loops forever
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_template_that_loops_forever_fails_its_one_action_naming_the_file() {
    let app = TestApp::new().await;
    app.write(
        "templates/forever.txt",
        "---\nsubject: Forever\n---\nHello,\n\
         {% for i in range(100000) %}{% for j in range(100000) %}.{% endfor %}{% endfor %}\n",
    );
    app.write("rules/forever.rhai", "send_email(\"forever\");\n");
    app.import_customers(
        "id,email,name,created_at\n\
         c1,ana@example.com,Ana,2026-06-15T01:59:00Z\n\
         c2,ben@example.com,Ben,2026-06-15T01:59:00Z\n",
    )
    .await;

    let started = Instant::now();
    let r = app.engaged(&["run", "--now", NOW, "--json"]).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(60), "the run took {took:?}");
    assert_eq!(
        r.code, 1,
        "failed deliveries make run exit 1: {}{}",
        r.stdout, r.stderr
    );
    let s = r.json();
    assert!(s["errors"].as_array().unwrap().is_empty(), "{s}");
    assert_eq!(s["rules"]["forever"]["planned"], 2, "{s}");
    assert_eq!(s["delivery"]["sent"], 2, "{s}");
    assert_eq!(s["delivery"]["failed"], 2, "{s}");
    assert_eq!(s["delivery"]["retrying"], 0, "{s}");

    let mut subjects: Vec<(String, String)> = app
        .smtp
        .messages()
        .iter()
        .map(|m| (m.rcpt_to[0].clone(), m.subject()))
        .collect();
    subjects.sort();
    assert_eq!(
        subjects,
        [
            ("ana@example.com".into(), "Welcome aboard, Ana!".into()),
            ("ben@example.com".into(), "Welcome aboard, Ben!".into()),
        ]
    );

    let store = app.store().await;
    for id in ["c1", "c2"] {
        let actions = store
            .actions_for_customer(&CustomerId::parse(id).unwrap())
            .await
            .unwrap();
        let forever = actions.iter().find(|a| a.rule == "forever").unwrap();
        assert_eq!(forever.status, "failed", "{forever:?}");
        assert_eq!(forever.attempts, 1, "a template error is not retried");
        let error = forever.last_error.as_deref().unwrap();
        assert!(
            error.contains("templates/forever.txt:") && error.contains("fuel"),
            "{error}"
        );
        let welcome = actions.iter().find(|a| a.rule == "welcome").unwrap();
        assert_eq!(welcome.status, "sent", "{welcome:?}");
    }
}

// ---------------------------------------------------------------------------
// 7. Properties
// ---------------------------------------------------------------------------

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // No proptest-regressions files in the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Strings that are sometimes meaningful to the parser, mostly not.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        Just("track".to_owned()),
        Just("identify".to_owned()),
        Just("Track".to_owned()),
        Just("page".to_owned()),
        Just(String::new()),
        Just("   ".to_owned()),
        "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(Z|[+-][0-9]{2}:[0-9]{2})",
        "[0-9]{4}-[0-9]{2}-[0-9]{2}",
        "[a-z]{1,8}@[a-z]{1,8}\\.[a-z]{2,3}",
        "[a-z ]{0,10}[\r\n\t\u{0}][a-z:@. ]{0,20}",
    ]
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        text().prop_map(Value::String),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
    ]
}

/// A scalar, or (for `traits` and `properties`) an object of scalars.
fn value() -> impl Strategy<Value = Value> {
    let keys = prop::sample::select(vec![
        "email",
        "name",
        "createdAt",
        "created_at",
        "timezone",
        "model",
        "owner",
        "plan",
        "total",
    ]);
    prop_oneof![
        1 => scalar(),
        2 => prop::collection::btree_map(keys, scalar(), 0..6).prop_map(|m| {
            Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
        }),
    ]
}

/// Timestamps that are well-formed, mostly within the accepted years, some
/// beyond them, some at the edges (where an offset moves the UTC year).
fn timestamp() -> impl Strategy<Value = String> {
    let year = prop_oneof![6 => 1970i32..=2200, 1 => 0i32..=9999];
    let offset = prop_oneof![
        Just("Z".to_owned()),
        (prop::bool::ANY, 0u32..=14, 0u32..60)
            .prop_map(|(west, h, m)| { format!("{}{h:02}:{m:02}", if west { '-' } else { '+' }) }),
    ];
    let full = (
        year,
        1u32..=12,
        1u32..=31,
        0u32..24,
        0u32..60,
        0u32..60,
        offset,
    )
        .prop_map(|(y, mo, d, h, mi, s, off)| {
            format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{off}")
        });
    prop_oneof![
        6 => full,
        1 => (1970i32..=2200, 1u32..=12, 1u32..=28)
            .prop_map(|(y, m, d)| format!("{y:04}-{m:02}-{d:02}")),
        1 => Just("1970-01-01T00:00:00+00:01".to_owned()),
        1 => Just("2200-12-31T23:59:59-00:01".to_owned()),
        1 => Just("2200-12-31T23:59:59Z".to_owned()),
    ]
}

/// One optional entry per Segment key, each either a plausible value or an
/// arbitrary one, so that both accepted and rejected messages are common.
fn message() -> impl Strategy<Value = Value> {
    let kind = prop_oneof![
        4 => Just(json!("track")),
        2 => Just(json!("identify")),
        1 => Just(json!("IDENTIFY")),
        1 => Just(json!("page")),
        1 => scalar(),
    ];
    let user = prop_oneof![4 => "[a-z0-9]{1,8}".prop_map(Value::String), 1 => scalar()];
    let event = prop_oneof![4 => "[a-zA-Z _]{1,20}".prop_map(Value::String), 1 => scalar()];
    let at = prop_oneof![4 => timestamp().prop_map(Value::String), 1 => scalar()];
    let id = prop_oneof![4 => "[a-z0-9-]{1,12}".prop_map(Value::String), 1 => scalar()];
    let opt = |s: BoxedStrategy<Value>| prop::option::weighted(0.9, s);
    (
        opt(kind.boxed()),
        opt(user.boxed()),
        opt(event.boxed()),
        opt(at.boxed()),
        opt(id.boxed()),
        opt(value().boxed()),
        opt(value().boxed()),
    )
        .prop_map(|(kind, user, event, at, id, traits, properties)| {
            let mut m = serde_json::Map::new();
            for (k, v) in [
                ("type", kind),
                ("userId", user),
                ("event", event),
                ("timestamp", at),
                ("messageId", id),
                ("traits", traits),
                ("properties", properties),
            ] {
                if let Some(v) = v {
                    m.insert(k.to_owned(), v);
                }
            }
            Value::Object(m)
        })
}

#[test]
fn parse_message_never_panics_and_accepted_times_stay_within_1970_to_2200() {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    let received_at = at(NOW);
    // Outcomes seen, so the properties below cannot hold vacuously.
    let (tracks_with_time, identifies, rejected) = (
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    );
    proptest!(config(256), |(v in message())| {
        match parse_message(&v, received_at) {
            Ok(Message::Track(e)) => {
                prop_assert!((1970..=2200).contains(&e.at.year()), "{} from {}", e.at, v);
                prop_assert!(!e.name.is_empty() && e.name.len() <= 200, "{v}");
                prop_assert!(!e.name.chars().any(char::is_control), "{v}");
                prop_assert!(e.message_id.len() <= 256, "{v}");
                prop_assert!(e.properties.is_object(), "{v}");
                if v["timestamp"].is_string() {
                    tracks_with_time.fetch_add(1, Relaxed);
                } else {
                    prop_assert_eq!(e.at, received_at, "{}", v);
                }
            }
            Ok(Message::Identify { patch, .. }) => {
                identifies.fetch_add(1, Relaxed);
                if let Some(t) = patch.created_at {
                    prop_assert!((1970..=2200).contains(&t.year()), "{} from {}", t, v);
                }
                for e in patch.email.iter().chain(patch.owner.iter()) {
                    prop_assert_eq!(e.as_str().matches('@').count(), 1, "{}", v);
                }
            }
            Ok(Message::Ignored(kind)) => {
                prop_assert!(kind != "track" && kind != "identify", "{v}");
            }
            Err(reason) => {
                rejected.fetch_add(1, Relaxed);
                prop_assert!(!reason.is_empty(), "{v}");
            }
        }
    });
    let seen = (
        tracks_with_time.into_inner(),
        identifies.into_inner(),
        rejected.into_inner(),
    );
    assert!(
        seen.0 >= 3 && seen.1 >= 3 && seen.2 >= 3,
        "too few tracks with a timestamp / identifies / rejections: {seen:?}"
    );
}

fn email_like() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "\\PC{0,12}@\\PC{0,12}",
        "[ \t]{0,2}[a-zA-Z0-9.+_-]{0,10}@[a-zA-Z0-9.-]{0,12}[ \t\r\n]{0,2}",
        "[a-z]{1,5}[@,;<> \r\n\u{0}\u{85}\u{a0}][a-z]{1,5}@[a-z]{1,5}\\.[a-z]{2}",
        "[a-z]{1,5}@[a-zA-Z\u{c0}-\u{24f}\u{370}-\u{3ff}\u{400}-\u{4ff}\u{1e00}-\u{1eff}]{1,6}\\.[a-zA-Z]{2,3}",
    ]
}

#[test]
fn email_parse_never_panics_and_accepts_only_single_at_addresses_without_whitespace() {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    let accepted = AtomicUsize::new(0);
    proptest!(config(256), |(raw in email_like())| {
        if let Ok(e) = Email::parse(&raw) {
            accepted.fetch_add(1, Relaxed);
            let s = e.as_str();
            prop_assert_eq!(s, s.trim());
            prop_assert_eq!(s.matches('@').count(), 1, "{:?} -> {:?}", raw, s);
            prop_assert!(
                !s.chars().any(|c| c.is_whitespace() || c.is_control()),
                "{:?} -> {:?}", raw, s
            );
            prop_assert_eq!(raw.trim().matches('@').count(), 1, "{:?}", raw);
            // What is stored parses again to itself (serde and the store re-parse).
            prop_assert_eq!(Email::parse(s), Ok(e.clone()), "{:?}", raw);
        }
    });
    let accepted = accepted.into_inner();
    assert!(
        (10..250).contains(&accepted),
        "{accepted} of 256 addresses accepted"
    );
}

#[test]
fn an_accepted_email_address_parses_again_to_itself() {
    // `İ` lower-cases to `i` + a combining dot, which is not a valid domain
    // character: such an address must be rejected, not stored unreadable.
    assert!(Email::parse("ana@exİmple.com").is_err());
    for (raw, stored) in [
        ("Ana@Example.COM", "Ana@example.com"),
        ("ana@ÉXAMPLE.com", "ana@éxample.com"),
        (" ana@example.com\t", "ana@example.com"),
    ] {
        let e = Email::parse(raw).unwrap();
        assert_eq!(e.as_str(), stored);
        assert_eq!(Email::parse(e.as_str()).as_ref(), Ok(&e), "{raw:?}");
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Email>(&json).unwrap(), e, "{json}");
    }
}

fn customer_with(event: &str, days: i64, expected: i64) -> Customer {
    Customer {
        id: CustomerId::parse("c1").unwrap(),
        email: Some(Email::parse("ana@example.com").unwrap()),
        name: Some("Ana".into()),
        created_at: Some(at("2026-06-01T12:00:00Z")),
        timezone: None,
        model: EngagementModel::Hybrid,
        owner: None,
        traits: serde_json::from_value(json!({"event": event, "days": days, "expected": expected}))
            .unwrap(),
    }
}

#[test]
fn the_rule_api_never_fails_on_arbitrary_event_names_and_day_counts() {
    // The name and the day count reach the rule as traits, so no value can
    // break the rule's source.
    let rule = r#"
        let name = customer.traits.event;
        let days = customer.traits.days;
        let total = count(name);
        if total != customer.traits.expected { throw `count(name) = ${total}`; }
        let recent = count(name, days);
        if recent < 0 || recent > total { throw `count(name, ${days}) = ${recent} of ${total}`; }
        let since = days_since(name);
        let latest = last(name);
        if (total == 0) != (since == ()) { throw "days_since disagrees with count"; }
        if (total == 0) != (latest == ()) { throw "last disagrees with count"; }
        if since != () && since < 0 { throw "days_since is negative"; }
        if latest != () && latest.name != name { throw "last names another event"; }
        tag("evaluated");
    "#;
    let rules = RuleSet::from_sources(&[("api", rule)], Default::default()).unwrap();
    let now = at(NOW);
    let names = prop_oneof![
        any::<String>(),
        Just("login".to_owned()),
        Just(String::new()),
        "[a-z_]{1,12}",
    ];
    let days = prop_oneof![
        any::<i64>(),
        Just(i64::MIN),
        Just(i64::MAX),
        Just(0i64),
        -3i64..40,
    ];
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    // Cases where the event happened / never happened, so neither branch is vacuous.
    let (happened, never) = (AtomicUsize::new(0), AtomicUsize::new(0));
    proptest!(config(256), |(name in names, days in days, present in any::<bool>())| {
        let event = |n: &str, t: &str, i: usize| Event {
            message_id: format!("m{i}"),
            customer_id: CustomerId::parse("c1").unwrap(),
            name: n.to_owned(),
            properties: json!({"n": i}),
            at: at(t),
        };
        let mut events = vec![
            event("login", "2026-06-10T00:00:00Z", 0),
            event("order_completed", "2026-06-14T02:00:00Z", 1),
        ];
        if present {
            events.push(event(&name, "1970-01-01T00:00:00Z", 2));
            events.push(event(&name, "2026-06-15T02:00:00Z", 3));
            events.push(event(&name, "2199-01-01T00:00:00Z", 4)); // after now: invisible
        }
        // Events up to now with this name (the name may be "login").
        let expected = events.iter().filter(|e| e.name == name && e.at <= now).count() as i64;
        if expected == 0 { &never } else { &happened }.fetch_add(1, Relaxed);
        let customer = customer_with(&name, days, expected);
        let facts = Arc::new(Facts::new(customer, events, vec![], now));
        let results = rules.evaluate_all(&facts);
        prop_assert_eq!(results.len(), 1);
        match &results[0] {
            Ok(actions) => {
                prop_assert_eq!(actions.len(), 1);
                prop_assert_eq!(
                    &actions[0].kind,
                    &ActionRequest::Tag { name: "evaluated".into() }
                );
            }
            Err(e) => prop_assert!(false, "{:?} / {}: {}", name, days, e),
        }
    });
    let (happened, never) = (happened.into_inner(), never.into_inner());
    assert!(happened >= 10 && never >= 10, "{happened} / {never}");
}
