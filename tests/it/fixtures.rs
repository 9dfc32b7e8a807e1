//! `engaged test`: the shipped rules pass their fixtures (`rules/tests/*.toml`),
//! a failing case is reported clearly, and the fixtures are strong enough that
//! changing a threshold or a comparison in any shipped rule makes them fail.

use std::path::Path;

use futures::future::join_all;

use crate::helpers::TestApp;

/// How many `[[case]]` entries the shipped fixture files hold.
fn shipped_cases() -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/tests");
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let table: toml::Table = toml::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not valid TOML: {e}", path.display()));
        total += table
            .get("case")
            .and_then(toml::Value::as_array)
            .map_or(0, Vec::len);
    }
    total
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shipped_rules_pass_their_fixtures() {
    let cases = shipped_cases();
    assert!(cases > 0, "no fixture cases in rules/tests/*.toml");
    let app = TestApp::new().await;
    let r = app.engaged(&["test"]).await;
    assert_eq!(
        r.code, 0,
        "engaged test failed:\n{}\n{}",
        r.stdout, r.stderr
    );
    assert!(
        r.stdout
            .contains(&format!("test result: ok. {cases} passed, 0 failed")),
        "expected {cases} passing cases:\n{}",
        r.stdout
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_case_shows_expected_and_actual_and_exits_1() {
    let app = TestApp::new().await;
    app.write(
        "rules/tests/wrong.toml",
        r#"
[[case]]
name = "a new customer is tagged instead of welcomed"
rules = ["welcome"]
customer = { created_at = "-2h" }
expect = [ { tag = "vip" } ]
"#,
    );
    let r = app.engaged(&["test"]).await;
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    let at = lines
        .iter()
        .position(|l| *l == "test wrong::a new customer is tagged instead of welcomed ... FAILED")
        .unwrap_or_else(|| panic!("no FAILED line:\n{}", r.stdout));
    assert_eq!(lines[at + 1].trim(), "expected: tag vip", "{}", r.stdout);
    assert_eq!(
        lines[at + 2].trim(),
        "actual:   email welcome (key welcome)  [rule welcome]",
        "{}",
        r.stdout
    );
    let passed = shipped_cases();
    assert!(
        r.stdout
            .contains(&format!("test result: FAILED. {passed} passed, 1 failed")),
        "{}",
        r.stdout
    );
}

/// (rule file, exact text, replacement): each one a behaviour change the
/// fixtures must notice.
const MUTATIONS: &[(&str, &str, &str)] = &[
    ("welcome.rhai", "days <= 1", "days <= 2"),
    ("welcome.rhai", "days <= 1", "days < 1"),
    ("onboarding_tips.rhai", "days >= 7", "days >= 8"),
    ("onboarding_tips.rhai", "days >= 7", "days >= 6"),
    ("onboarding_tips.rhai", "days >= 3", "days > 3"),
    ("onboarding_tips.rhai", "days >= 3", "days >= 2"),
    ("onboarding_tips.rhai", "days >= 1", "days >= 2"),
    ("onboarding_tips.rhai", "days >= 1", "days >= 0"),
    ("onboarding_tips.rhai", "tip > 0", "tip >= 0"),
    ("onboarding_tips.rhai", "days <= 14", "days < 14"),
    ("onboarding_tips.rhai", "days <= 14", "days <= 15"),
    (
        "onboarding_tips.rhai",
        r#"count("onboarding_completed") > 0"#,
        r#"count("onboarding_completed") > 1"#,
    ),
    (
        "stalled_onboarding.rhai",
        r#"customer.model == "high-touch""#,
        r#"customer.model == "hybrid""#,
    ),
    ("stalled_onboarding.rhai", "days < 7", "days < 6"),
    ("stalled_onboarding.rhai", "days < 7", "days <= 7"),
    ("stalled_onboarding.rhai", "days > 30", "days >= 30"),
    ("stalled_onboarding.rhai", "days > 30", "days > 31"),
    (
        "stalled_onboarding.rhai",
        r#"count("onboarding_completed") == 0"#,
        r#"count("onboarding_completed") <= 1"#,
    ),
    (
        "stalled_onboarding.rhai",
        r#"count("login", 7) == 0"#,
        r#"count("login", 8) == 0"#,
    ),
    (
        "stalled_onboarding.rhai",
        r#"count("login", 7) == 0"#,
        r#"count("login", 6) == 0"#,
    ),
    ("milestones.rhai", "[10, 50]", "[10, 51]"),
    ("milestones.rhai", "[10, 50]", "[11, 50]"),
    (
        "milestones.rhai",
        "orders >= milestone",
        "orders > milestone",
    ),
    (
        "milestones.rhai",
        "orders < milestone * 2",
        "orders <= milestone * 2",
    ),
    (
        "milestones.rhai",
        "orders < milestone * 2",
        "orders < milestone * 2 - 1",
    ),
    ("milestones.rhai", "years >= 1", "years >= 0"),
    ("milestones.rhai", "years >= 1", "years >= 2"),
    ("milestones.rhai", "now) < 7", "now) <= 7"),
    ("milestones.rhai", "now) < 7", "now) < 6"),
    (
        "nps.rhai",
        r#"days_since("nps_submitted") > 30"#,
        r#"days_since("nps_submitted") >= 30"#,
    ),
    (
        "nps.rhai",
        r#"days_since("nps_submitted") > 30"#,
        r#"days_since("nps_submitted") > 31"#,
    ),
    (
        "nps.rhai",
        r#"type_of(score) != "i64""#,
        r#"type_of(score) != "f64""#,
    ),
    ("nps.rhai", "score <= 6", "score < 6"),
    ("nps.rhai", "score <= 6", "score <= 7"),
    ("nps.rhai", "score >= 9", "score > 9"),
    ("nps.rhai", "score >= 9", "score >= 8"),
    ("winback.rhai", "idle < 30", "idle < 29"),
    ("winback.rhai", "idle < 30", "idle < 31"),
    ("winback.rhai", "days >= 30", "days >= 29"),
    ("winback.rhai", "days >= 30", "days >= 31"),
    (
        "engagement_level.rhai",
        r#"count("login", 30)"#,
        r#"count("login", 31)"#,
    ),
    (
        "engagement_level.rhai",
        r#"count("login", 30)"#,
        r#"count("login", 29)"#,
    ),
    ("engagement_level.rhai", "posts >= 3", "posts >= 2"),
    ("engagement_level.rhai", "posts >= 3", "posts > 3"),
    ("engagement_level.rhai", "orders >= 10", "orders >= 9"),
    ("engagement_level.rhai", "orders >= 10", "orders > 10"),
    ("engagement_level.rhai", "logins >= 8", "logins >= 7"),
    ("engagement_level.rhai", "logins >= 8", "logins > 8"),
    (
        "engagement_level.rhai",
        "orders >= 10 && logins",
        "orders >= 10 || logins",
    ),
    ("engagement_level.rhai", "orders >= 1 {", "orders >= 2 {"),
    ("engagement_level.rhai", "orders >= 1 {", "orders >= 0 {"),
    (
        "engagement_level.rhai",
        r#"count("onboarding_completed") > 0"#,
        r#"count("onboarding_completed") >= 0"#,
    ),
    (
        "engagement_level.rhai",
        r#"count("onboarding_completed") > 0"#,
        r#"count("onboarding_completed") > 1"#,
    ),
];

/// Applies one mutation in a fresh app and runs `engaged test`; `Err` says
/// what went wrong.
async fn mutant_is_caught(file: &str, find: &str, replace: &str) -> Result<(), String> {
    let what = format!("{file}: {find:?} -> {replace:?}");
    let app = TestApp::new().await;
    let rel = format!("rules/{file}");
    let source = std::fs::read_to_string(app.path(&rel))
        .map_err(|e| format!("{what}: cannot read the rule: {e}"))?;
    let found = source.matches(find).count();
    if found != 1 {
        return Err(format!("{what}: the text is found {found} times, not once"));
    }
    app.write(&rel, source.replacen(find, replace, 1));
    let r = app.engaged(&["test"]).await;
    if r.code != 1 || !r.stdout.contains("test result: FAILED.") {
        return Err(format!(
            "{what}: the fixtures did not notice (exit {}):\n{}{}",
            r.code,
            r.stdout
                .lines()
                .filter(|l| l.starts_with("test result"))
                .collect::<Vec<_>>()
                .join("\n"),
            r.stderr
        ));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn changing_a_threshold_or_comparison_in_a_shipped_rule_fails_the_fixtures() {
    let rules_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    for entry in std::fs::read_dir(rules_dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".rhai") {
            assert!(
                MUTATIONS.iter().any(|(file, ..)| *file == name),
                "no mutation covers rules/{name}"
            );
        }
    }
    let results = join_all(
        MUTATIONS
            .iter()
            .map(|(file, find, replace)| mutant_is_caught(file, find, replace)),
    )
    .await;
    let survivors: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    assert!(
        survivors.is_empty(),
        "{} of {} mutations were not caught:\n{}",
        survivors.len(),
        MUTATIONS.len(),
        survivors.join("\n")
    );
}
