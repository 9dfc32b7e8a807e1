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
