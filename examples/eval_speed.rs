//! How long the rule engine takes per evaluation, without the store:
//! `cargo run --release --example eval_speed -- RULES_DIR [CUSTOMERS]`.
//! Builds synthetic customers (about nine events each) and evaluates every
//! rule for each on one thread, then prints microseconds per evaluation.

use std::sync::Arc;
use std::time::Instant;

use chrono::{Duration, TimeZone, Utc};
use engaged::domain::{Customer, CustomerId, Email, EngagementModel};
use engaged::engine::{Known, RuleSet};
use engaged::facts::Facts;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .expect("usage: eval_speed RULES_DIR [CUSTOMERS]");
    let n: usize = args
        .next()
        .map_or(100_000, |s| s.parse().expect("a number"));
    let (rules, errors) = RuleSet::load(std::path::Path::new(&dir), Known::default());
    assert!(errors.is_empty(), "{errors:?}");
    let now = Utc.with_ymd_and_hms(2026, 3, 10, 12, 0, 0).unwrap();
    let names = [
        "login",
        "onboarding_step",
        "order_completed",
        "feature_used",
        "nps_response",
    ];
    let facts: Vec<Arc<Facts>> = (0..n)
        .map(|i| {
            let customer = Customer {
                id: CustomerId::parse(&format!("c{i:07}")).unwrap(),
                email: Some(Email::parse(&format!("c{i}@example.test")).unwrap()),
                name: Some(format!("Customer {i}")),
                created_at: Some(now - Duration::days((i % 400) as i64)),
                timezone: Some("Europe/Berlin".into()),
                model: EngagementModel::LowTouch,
                owner: None,
                traits: serde_json::from_str(r#"{"plan":"pro","seats":3}"#).unwrap(),
            };
            let history = (0..9).map(|k| {
                let name = names[(i + k) % names.len()].to_owned();
                let props = if name == "nps_response" {
                    serde_json::json!({ "score": (i % 11) as i64 })
                } else {
                    serde_json::json!({})
                };
                (name, now - Duration::hours((k * 37 + i % 50) as i64), props)
            });
            Arc::new(Facts::from_history(customer, history, Vec::new(), now))
        })
        .collect();
    let started = Instant::now();
    let mut actions = 0usize;
    for f in &facts {
        for (_, r) in rules.evaluate_selected(f, None) {
            actions += r.map(|a| a.len()).unwrap_or(0);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let evals = n * rules.rules().len();
    println!(
        "{evals} evaluations in {secs:.2} s: {:.2} µs each, {actions} actions",
        secs * 1e6 / evals as f64
    );
}
