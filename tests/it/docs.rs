//! Every ```rhai example in RULES.md compiles (including the unknown-function
//! and customer-property checks) and runs without error on a sample customer.

use std::sync::Arc;

use chrono::Utc;
use engaged::domain::{Customer, CustomerId, Email, EngagementModel, Event};
use engaged::engine::RuleSet;
use engaged::facts::Facts;
use serde_json::json;

fn examples(markdown: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut lines = markdown.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        if line.trim() == "```rhai" {
            let mut body = String::new();
            for (_, l) in lines.by_ref() {
                if l.trim() == "```" {
                    break;
                }
                body.push_str(l);
                body.push('\n');
            }
            out.push((i + 1, body));
        }
    }
    out
}

#[test]
fn every_rhai_example_in_rules_md_compiles_and_runs() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/RULES.md")).unwrap();
    let blocks = examples(&text);
    assert!(blocks.len() >= 15, "found only {} examples", blocks.len());
    let now = Utc::now();
    let id = CustomerId::parse("c1").unwrap();
    let customer = Customer {
        id: id.clone(),
        email: Some(Email::parse("ana@example.com").unwrap()),
        name: Some("Ana".into()),
        created_at: Some(now - chrono::Duration::days(400)),
        timezone: None,
        model: EngagementModel::LowTouch,
        owner: None,
        traits: serde_json::from_value(json!({"plan": "enterprise"})).unwrap(),
    };
    let events = [
        ("login", 40, json!({})),
        ("order_completed", 2, json!({"total": 12.5})),
        ("nps_submitted", 3, json!({"score": 10})),
        ("support_ticket", 1, json!({})),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (name, days_ago, properties))| Event {
        message_id: i.to_string(),
        customer_id: id.clone(),
        name: name.into(),
        properties,
        at: now - chrono::Duration::days(days_ago),
    })
    .collect::<Vec<_>>();
    let facts = Arc::new(Facts::new(customer, events, vec![], now));
    for (line, source) in blocks {
        let name = format!("example_line_{line}");
        let rules = RuleSet::from_sources(&[(name.as_str(), source.as_str())], Default::default())
            .unwrap_or_else(|e| panic!("RULES.md:{line}: {e}\n{source}"));
        for result in rules.evaluate_all(&facts) {
            result.unwrap_or_else(|e| panic!("RULES.md:{line}: {e}\n{source}"));
        }
    }
}

#[test]
fn the_template_example_in_rules_md_loads_and_renders() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/RULES.md")).unwrap();
    let start = text.find("```text\n---\n").expect("a template example");
    let body = &text[start + "```text\n".len()..];
    let body = &body[..body.find("```").unwrap()];
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("example.txt"), body).unwrap();
    let (templates, errors) = engaged::templates::Templates::load(dir.path());
    assert!(errors.is_empty(), "{errors:?}");
    let rendered = templates
        .render(
            "example",
            &json!({
                "customer": {"first_name": "Ana", "name": "Ana Novak"},
                "orders": 3,
                "unsubscribe_url": "https://engage.example/unsubscribe/t",
            }),
        )
        .unwrap();
    assert_eq!(rendered.subject, "Welcome aboard, Ana!");
    assert!(
        rendered.text.contains("You have 3 orders."),
        "{}",
        rendered.text
    );
}
