//! Rules and templates that used to take down or stall the process (issue
//! 9, point 6): values nested 10,000 deep overflowed the stack and aborted
//! `engaged run` and `serve`; container-sized work inside the operation
//! limit took seconds per customer; a template doubling a list forty times
//! never finished. Each now fails its own customer (or its own email) with
//! `FILE:LINE:COL: message` while the shipped rules deliver, and `check`
//! rejects what can be seen in the source.

use engaged::domain::CustomerId;
use serde_json::Value;

use crate::helpers::{NOW, TestApp};

/// The messages of a run summary's `errors`.
fn error_messages(summary: &Value) -> Vec<String> {
    summary["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("no errors array in {summary}"))
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_owned())
        .collect()
}

const DEEP: &str = "holds arrays, maps or functions nested more than 64 levels deep; keep rule data small and flat";
/// The end of the CPU budget's message (its number depends on the build).
const CPU: &str = "of CPU time for customer c1 (";

#[tokio::test(flavor = "multi_thread")]
async fn deep_and_slow_rules_next_to_the_shipped_ones_fail_their_customer_only_by_file_line_col() {
    let app = TestApp::new().await;
    // (rule, source, the line of the error, what the error says)
    let hostile = [
        (
            "zz_nested_maps",
            "let m = #{};\nfor i in 0..10000 {\n  m = #{ inner: m };\n}\nsend_email(\"welcome\", #{ x: m });\n",
            3,
            DEEP,
        ),
        (
            "zz_nested_maps_compared",
            "let m = #{};\nlet n = #{};\nfor i in 0..10000 {\n  m = #{ inner: m };\n  n = #{ inner: n };\n}\nif m == n { print(m); }\n",
            4,
            DEEP,
        ),
        (
            "zz_nested_arrays",
            "let a = [];\nfor i in 0..10000 {\n  a = [a];\n}\nprint(a);\n",
            3,
            DEEP,
        ),
        (
            // Closures inside closures, each holding the last (as a
            // curried argument: closures may not capture, see below).
            "zz_nested_closures",
            "let f = |x| x;\nfor i in 0..10000 {\n  f = (|g, x| g.call(x)).curry(f);\n}\nf.call(1);\n",
            3,
            DEEP,
        ),
        (
            "zz_contains_in_a_loop",
            "let a = [];\nfor i in 0..10000 { a.push(i) }\nloop {\n  a.contains(-1);\n}\n",
            // Building the array by push (Rhai re-checks the whole array
            // after each push) already spends the budget.
            2,
            CPU,
        ),
        (
            "zz_contains_on_a_padded_array",
            "let a = [];\na.pad(10000, 0);\nloop {\n  a.contains(-1);\n}\n",
            4,
            CPU,
        ),
        (
            "zz_big_arrays_compared",
            "let a = [];\na.pad(10000, 7);\nlet b = a;\nlet same = 0;\nwhile a == b {\n  same += 1;\n}\n",
            5,
            CPU,
        ),
        (
            "zz_keys_in_a_loop",
            // Not bigger: building a map by index assignment is itself
            // quadratic (every assignment re-checks the whole map).
            "let m = #{};\nfor i in 0..1000 { m[`k${i}`] = i; }\nloop {\n  m.keys();\n}\n",
            4,
            CPU,
        ),
        (
            "zz_curry_in_a_loop",
            "let f = |a, b| a;\nloop {\n  f = f.curry(1);\n}\n",
            3,
            CPU,
        ),
    ];
    for (name, src, ..) in hostile {
        app.write(&format!("rules/{name}.rhai"), src);
    }
    app.import_customers(
        "id,email,name,created_at\n\
         c1,ana@example.com,Ana Novak,2026-06-15T01:59:00Z\n",
    )
    .await;

    // TestApp::engaged gives the child 60 s; these took minutes, or aborted.
    let r = app.engaged(&["run", "--now", NOW, "--json"]).await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(!r.stderr.contains("overflow"), "{}", r.stderr);

    let s = r.json();
    let messages = error_messages(&s);
    assert_eq!(messages.len(), hostile.len(), "{messages:?}");
    for (name, _, line, why) in hostile {
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
        assert!(message.contains(why), "{name}: {m}");
    }

    // The shipped rules still act.
    assert_eq!(s["rules"]["welcome"]["planned"], 1, "{s}");
    assert_eq!(s["delivery"]["sent"], 1, "{s}");
    let sent = app.smtp.messages();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].subject(), "Welcome aboard, Ana!");
    assert_eq!(sent[0].rcpt_to, ["ana@example.com"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_template_doubling_a_list_fails_its_one_email_with_its_line_and_the_others_go() {
    let app = TestApp::new().await;
    app.write(
        "templates/doubling.txt",
        "---\nsubject: Doubling\n---\nHello,\n\
         {% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|length }} {{ ns.l }}\n",
    );
    app.write(
        "templates/doubling_text.txt",
        "---\nsubject: Doubling text\n---\nHello,\n\
         {% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}\n",
    );
    app.write(
        "rules/doubling.rhai",
        "send_email(\"doubling\");\nsend_email(\"doubling_text\", #{ key: \"text\" });\n",
    );
    app.import_customers(
        "id,email,name,created_at\n\
         c1,ana@example.com,Ana,2026-06-15T01:59:00Z\n\
         c2,ben@example.com,Ben,2026-06-15T01:59:00Z\n",
    )
    .await;

    let r = app.engaged(&["run", "--now", NOW, "--json"]).await;
    assert_eq!(
        r.code, 1,
        "failed deliveries make run exit 1: {}{}",
        r.stdout, r.stderr
    );
    let s = r.json();
    assert!(error_messages(&s).is_empty(), "{s}");
    assert_eq!(s["rules"]["doubling"]["planned"], 4, "{s}");
    assert_eq!(s["delivery"]["sent"], 2, "{s}");
    assert_eq!(s["delivery"]["failed"], 4, "{s}");
    assert_eq!(s["delivery"]["retrying"], 0, "{s}");

    let mut welcomed: Vec<String> = app
        .smtp
        .messages()
        .iter()
        .map(|m| format!("{} {}", m.rcpt_to[0], m.subject()))
        .collect();
    welcomed.sort();
    assert_eq!(
        welcomed,
        [
            "ana@example.com Welcome aboard, Ana!",
            "ben@example.com Welcome aboard, Ben!"
        ]
    );

    let store = app.store().await;
    for id in ["c1", "c2"] {
        let actions = store
            .actions_for_customer(&CustomerId::parse(id).unwrap())
            .await
            .unwrap();
        let doubling: Vec<_> = actions.iter().filter(|a| a.rule == "doubling").collect();
        assert_eq!(doubling.len(), 2, "{actions:?}");
        for a in doubling {
            assert_eq!(a.status, "failed", "{a:?}");
            assert_eq!(a.attempts, 1, "a template error is not retried");
            let error = a.last_error.as_deref().unwrap();
            // Line 5 of the file: the body's second line.
            if error.contains("templates/doubling.txt:") {
                assert!(
                    error.contains("templates/doubling.txt:5:")
                        && error.contains("a list would grow past 10000 items"),
                    "{error}"
                );
            } else {
                assert!(
                    error.contains("templates/doubling_text.txt:5:") && error.contains("fuel"),
                    "{error}"
                );
            }
        }
        let welcome = actions.iter().find(|a| a.rule == "welcome").unwrap();
        assert_eq!(welcome.status, "sent", "{welcome:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn check_rejects_capturing_closures_this_and_included_templates_by_file_line_col() {
    let app = TestApp::new().await;
    // The tester's nested closures: each captures the one before.
    app.write(
        "rules/zz_captures.rhai",
        "let f = || 1;\nfor i in 0..10000 { let g = f; f = || g.call(); }\nf.call();\n",
    );
    app.write(
        "rules/zz_this.rhai",
        "fn grow() { this.inner = #{ inner: this.inner }; }\nlet m = #{ inner: 1 };\nm.grow();\n",
    );
    app.write("templates/footer.txt", "---\nsubject: Footer\n---\nBye.\n");
    app.write(
        "templates/with_footer.txt",
        "---\nsubject: Hi\n---\nHello,\n{% include 'footer.txt' %}\n",
    );
    let r = app.engaged(&["check"]).await;
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    for (at, what) in [
        (
            "rules/zz_captures.rhai:2:39: ",
            "this closure captures `g`; closures in rules cannot capture variables",
        ),
        (
            "rules/zz_this.rhai:1:13: ",
            "`this` is not available in rules",
        ),
        (
            "templates/with_footer.txt:5:4: ",
            "include, import and extends are not supported",
        ),
    ] {
        let line = r
            .stdout
            .lines()
            .find(|l| l.contains(at))
            .unwrap_or_else(|| panic!("no error at {at} in:\n{}", r.stdout));
        assert!(line.contains(what), "{line}");
    }
    assert!(r.stdout.contains("3 error(s)"), "{}", r.stdout);
}
