//! Importing customers and events through the real binary.

use engaged::domain::CustomerId;
use serde_json::json;

use crate::helpers::{TestApp, track};

#[tokio::test(flavor = "multi_thread")]
async fn bad_csv_rows_are_rejected_with_line_numbers_and_good_rows_are_kept() {
    let app = TestApp::new().await;
    let mut csv = b"id,email,name,created_at,timezone,model,owner,plan,seats\n".to_vec();
    csv.extend_from_slice(
        b"c1,ana@example.com,Ana,2026-01-01T00:00:00Z,Europe/Zagreb,hybrid,csm@acme.test,pro,12\n",
    );
    csv.extend_from_slice(b"c2,not-an-email,Ben,,,,,,\n"); // line 3
    csv.extend_from_slice(b"c3,cem@example.com,Cem,,,,,,,extra\n"); // line 4: too many columns
    csv.extend_from_slice(b"c4,dia@example.com,D\xffia,,,,,,\n"); // line 5: not UTF-8
    csv.extend_from_slice(b"c5,eva@example.com,Eva,yesterday,,,,,\n"); // line 6: bad timestamp
    csv.extend_from_slice(b",fay@example.com,Fay,,,,,,\n"); // line 7: no id
    csv.extend_from_slice(b"c8,gus@example.com,Gus,,Mars/Base,,,,\n"); // line 8: kept, warned
    csv.extend_from_slice(b"c9,hal@example.com,Hal,,,medium-touch,,,\n"); // line 9: bad model
    let path = app.write("customers.csv", &csv);
    let r = app
        .engaged(&["import", "customers", path.to_str().unwrap()])
        .await;
    assert_eq!(r.code, 1, "rejections make the import exit 1");
    for (line, why) in [
        (3, "invalid email"),
        (4, "expected 9 fields"),
        (5, "UTF-8"),
        (6, "created_at"),
        (7, "id"),
        (9, "model"),
    ] {
        let needle = format!("customers.csv:{line}: ");
        let l = r
            .stderr
            .lines()
            .find(|l| l.contains(&needle))
            .unwrap_or_else(|| panic!("no error for line {line} in:\n{}", r.stderr));
        assert!(l.contains(why), "line {line} should mention {why:?}: {l}");
    }
    assert!(
        r.stderr
            .contains("customers.csv:8: warning: unknown time zone"),
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
    let ana = store
        .customer(&CustomerId::parse("c1").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ana.owner.unwrap().as_str(), "csm@acme.test");
    assert_eq!(ana.traits.get("plan"), Some(&json!("pro")));
    assert_eq!(
        ana.traits.get("seats"),
        Some(&json!(12)),
        "numeric traits are typed"
    );
    let gus = store
        .customer(&CustomerId::parse("c8").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(gus.timezone, None);
    assert_eq!(store.customer_count().await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn reimporting_customers_updates_them() {
    let app = TestApp::new().await;
    let r = app
        .import_customers("id,email,name,plan\nc1,ana@example.com,Ana,starter\n")
        .await;
    assert!(r.stdout.contains("1 imported, 0 updated"), "{}", r.stdout);
    let r = app
        .import_customers("email,id,model,seats\nana.novak@example.com,c1,high-touch,5\n")
        .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("0 imported, 1 updated"), "{}", r.stdout);
    let c = app
        .store()
        .await
        .customer(&CustomerId::parse("c1").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.email.unwrap().as_str(), "ana.novak@example.com");
    assert_eq!(
        c.name.as_deref(),
        Some("Ana"),
        "columns absent from the new file are kept"
    );
    assert_eq!(c.model.as_str(), "high-touch");
    assert_eq!(c.traits.get("plan"), Some(&json!("starter")));
    assert_eq!(c.traits.get("seats"), Some(&json!(5)));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_customer_named_twice_in_a_large_file_ends_with_the_later_rows_and_is_counted_once() {
    // More rows than one statement and than one transaction take, so the
    // repeats fall in the same statement, in the next batch, and across a
    // rejected row.
    const N: usize = 12_000;
    let app = TestApp::new().await;
    let mut csv = String::from("id,email,name,model,plan,seats\n");
    csv.push_str("c00000,first@example.com,First,hybrid,pro,\n"); // line 2
    csv.push_str("c00000,second@example.com,Second,,,\n"); // line 3: model, plan kept
    for i in 1..N {
        csv.push_str(&format!("c{i:05},c{i:05}@example.com,Name {i},,free,\n"));
        if i == 6_000 {
            csv.push_str("c00001,not-an-email,Bad,,,\n"); // line 6004: rejected
        }
    }
    csv.push_str("c00000,last@example.com,,,gold,3\n"); // the last line
    let r = app.import_customers(&csv).await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("customers.csv:6004: "), "{}", r.stderr);
    assert!(
        r.stdout.contains(&format!(
            "{N} imported, 2 updated, 0 duplicate, 0 ignored, 1 rejected"
        )),
        "{}",
        r.stdout
    );
    let check = |c: engaged::domain::Customer| {
        assert_eq!(c.email.unwrap().as_str(), "last@example.com");
        assert_eq!(c.name.as_deref(), Some("Second"), "an empty cell keeps");
        assert_eq!(c.model.as_str(), "hybrid", "no model given: kept");
        assert_eq!(c.traits.get("plan"), Some(&json!("gold")));
        assert_eq!(c.traits.get("seats"), Some(&json!(3)));
    };
    let store = app.store().await;
    let c0 = CustomerId::parse("c00000").unwrap();
    check(store.customer(&c0).await.unwrap().unwrap());
    let c1 = store
        .customer(&CustomerId::parse("c00001").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c1.email.unwrap().as_str(), "c00001@example.com");
    assert_eq!(
        c1.model.as_str(),
        "low-touch",
        "a new customer gets the default"
    );
    assert_eq!(store.customer_count().await.unwrap(), N as u64);

    // The same file again: every good row is an update, nothing changes.
    let r = app.import_customers(&csv).await;
    assert!(
        r.stdout.contains(&format!(
            "0 imported, {} updated, 0 duplicate, 0 ignored, 1 rejected",
            N + 2
        )),
        "{}",
        r.stdout
    );
    check(store.customer(&c0).await.unwrap().unwrap());
    assert_eq!(store.customer_count().await.unwrap(), N as u64);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_jsonl_lines_are_rejected_and_duplicates_and_early_events_are_handled() {
    let app = TestApp::new().await;
    let good = track("c1", "login", "2026-06-01T10:00:00Z", json!({}));
    let lines = [
        good.clone(),                                                       // 1
        "{not json".to_owned(),                                             // 2
        json!({"type": "track", "event": "login"}).to_string(),             // 3 no userId
        good.clone(),                                                       // 4 duplicate messageId
        json!({"type": "track", "userId": "c1", "event": "login",
               "timestamp": "9999-01-01T00:00:00Z", "messageId": "far"}).to_string(), // 5
        json!({"type": "page", "userId": "c1", "name": "Home"}).to_string(), // 6 ignored
        String::new(),                                                      // 7 blank
        json!({"type": "identify", "userId": "c1", "traits": {"email": "ana@example.com", "name": "Ana", "vip": true},
               "anonymousId": null, "context": {"ip": "1.2.3.4"}}).to_string(), // 8
        track("c1", "order_completed", "2026-06-02T10:00:00.250+02:00", json!({"total": 5})), // 9
    ];
    let r = app.import_events(&(lines.join("\n") + "\n")).await;
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("events.jsonl:2: invalid JSON"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("events.jsonl:3: missing \"userId\""),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("events.jsonl:5: timestamp"),
        "{}",
        r.stderr
    );
    // 2 events + 1 customer imported; 1 duplicate; 1 ignored; 3 rejected.
    assert!(
        r.stdout
            .contains("3 imported, 0 updated, 1 duplicate, 1 ignored, 3 rejected"),
        "{}",
        r.stdout
    );

    // Importing the same file again adds nothing.
    let r = app.import_events(&(lines.join("\n") + "\n")).await;
    assert!(
        r.stdout.contains("0 imported, 1 updated, 3 duplicate"),
        "{}",
        r.stdout
    );

    // Events that arrived before the customer was known are kept and used.
    let store = app.store().await;
    let id = CustomerId::parse("c1").unwrap();
    let until = chrono::Utc::now();
    let events = store.events_in_id_range(&id, &id, until).await.unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].at.to_rfc3339(), "2026-06-02T08:00:00.250+00:00");
    let c = store.customer(&id).await.unwrap().unwrap();
    assert_eq!(c.traits.get("vip"), Some(&json!(true)));
}
