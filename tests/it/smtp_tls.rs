//! SMTP delivery over TLS through the real binary: implicit TLS (`smtps://`)
//! and STARTTLS (`?tls=required`) to the in-process server, trusting a
//! private CA via `mail.tls_ca_file`; refusals never fall back to plaintext.

use engaged::domain::CustomerId;

use crate::helpers::{NOW, TestApp};
use crate::smtp_server::{SmtpServer, TestCa, TlsMode};

/// One customer who signed up the evening before `NOW`: the shipped
/// `welcome` rule sends them exactly one email.
const ANA: &str = "\
id,email,name,created_at,timezone,model,owner,plan
new1,ana@example.com,Ana Novak,2026-06-14T20:00:00Z,Europe/Zagreb,low-touch,,pro
";

/// An app whose SMTP server speaks TLS (`mode`) with a certificate from a
/// fresh private CA, and Ana imported. With `trust_ca`, the CA's PEM file is
/// configured as `mail.tls_ca_file`.
async fn tls_app(mode: Option<TlsMode>, trust_ca: bool) -> TestApp {
    let ca = TestCa::generate();
    let mut app = TestApp::new().await;
    if let Some(mode) = mode {
        app.smtp = SmtpServer::start_tls(mode, &ca).await;
    }
    let mut extra = String::from("[delivery]\nrun_retry_window_ms = 0\n");
    if trust_ca {
        let ca_file = app.write("ca.pem", &ca.ca_pem);
        extra.push_str(&format!(
            "[mail]\ntls_ca_file = \"{}\"\n",
            ca_file.display()
        ));
    }
    app.write_config(&extra);
    let r = app.import_customers(ANA).await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    app
}

async fn welcome_action(app: &TestApp) -> engaged::store::ActionRecord {
    let store = app.store().await;
    let actions = store
        .actions_for_customer(&CustomerId::parse("new1").unwrap())
        .await
        .unwrap();
    actions
        .into_iter()
        .find(|a| a.kind == "email")
        .expect("a welcome email action")
}

async fn assert_welcome_delivered_over_tls(app: &TestApp) {
    let summary = app.run_at(NOW).await;
    assert_eq!(summary["delivery"]["sent"], 1, "{summary}");
    let messages = app.smtp.messages();
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert!(m.tls, "the message arrived over TLS");
    assert_eq!(m.mail_from, "hello@acme.test");
    assert_eq!(m.rcpt_to, vec!["ana@example.com".to_owned()]);
    assert_eq!(m.header("To").unwrap(), "\"Ana Novak\" <ana@example.com>");
    assert!(m.text_body().starts_with("Hi Ana,\n"), "{}", m.text_body());
    assert!(
        m.html_body()
            .unwrap()
            .contains("<h1>Welcome aboard, Ana!</h1>")
    );
    assert_eq!(app.smtp.plaintext_mail_commands(), 0);
    assert_eq!(app.smtp.tls_failures(), 0);
    assert_eq!(welcome_action(app).await.status, "sent");
}

#[tokio::test(flavor = "multi_thread")]
async fn smtps_delivers_over_implicit_tls_trusting_the_configured_ca() {
    let app = tls_app(Some(TlsMode::Implicit), true).await;
    assert!(app.smtp.url().starts_with("smtps://127.0.0.1:"));
    assert_welcome_delivered_over_tls(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_required_upgrades_with_starttls_and_delivers_over_tls() {
    let app = tls_app(Some(TlsMode::StartTls), true).await;
    assert!(app.smtp.url().ends_with("?tls=required"));
    assert_welcome_delivered_over_tls(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_required_against_a_server_without_starttls_sends_nothing() {
    // A plaintext server that does not advertise STARTTLS.
    let app = tls_app(None, true).await;
    let url = format!("{}?tls=required", app.smtp.url());
    let r = app
        .command(&["run", "--now", NOW, "--json"])
        .env("ENGAGED_MAIL__SMTP_URL", &url)
        .output()
        .await
        .unwrap();
    let summary: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}", String::from_utf8_lossy(&r.stderr));
    });
    assert_eq!(summary["delivery"]["sent"], 0, "{summary}");
    assert_eq!(app.smtp.count(), 0, "nothing was sent in plaintext");
    assert_eq!(app.smtp.attempts("ana@example.com"), 0, "no DATA at all");
    assert!(app.smtp.connections() >= 1, "it did connect and look");
    let action = welcome_action(&app).await;
    assert_eq!(action.status, "pending", "{action:?}");
    let error = action.last_error.as_deref().unwrap();
    assert!(
        error.contains("does not offer STARTTLS") && error.contains("tls=required"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_from_an_untrusted_ca_is_refused_for_both_tls_modes() {
    for mode in [TlsMode::Implicit, TlsMode::StartTls] {
        // No mail.tls_ca_file: the server's private CA is not trusted.
        let app = tls_app(Some(mode), false).await;
        let r = app.engaged(&["run", "--now", NOW, "--json"]).await;
        let summary = r.json();
        assert_eq!(summary["delivery"]["sent"], 0, "{mode:?}: {summary}");
        assert_eq!(app.smtp.count(), 0, "{mode:?}: nothing was accepted");
        assert_eq!(app.smtp.attempts("ana@example.com"), 0, "{mode:?}");
        assert_eq!(
            app.smtp.plaintext_mail_commands(),
            0,
            "{mode:?}: no fallback to plaintext"
        );
        // The server notices the aborted handshake in its own task.
        for _ in 0..200 {
            if app.smtp.tls_failures() >= 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(
            app.smtp.tls_failures() >= 1,
            "{mode:?}: the client aborted the handshake"
        );
        let action = welcome_action(&app).await;
        assert_eq!(action.status, "pending", "{mode:?}: {action:?}");
        let error = action.last_error.as_deref().unwrap();
        assert!(
            error.to_lowercase().contains("certificate"),
            "{mode:?}: {error}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_or_invalid_tls_ca_file_stops_startup_naming_the_file() {
    let app = TestApp::new().await;
    let missing = app.path("no-such-ca.pem");
    let not_pem = app.write("not-a-cert.pem", "hello\n");
    let bad_der = app.write(
        "bad-der.pem",
        "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
    );
    for (file, why) in [
        (&missing, "cannot read"),
        (&not_pem, "no PEM certificate"),
        (&bad_der, "not a usable CA certificate"),
    ] {
        let r = app
            .command(&["run", "--now", NOW, "--json"])
            .env("ENGAGED_MAIL__TLS_CA_FILE", file)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{file:?} was accepted");
        assert!(
            stderr.contains(&format!("mail.tls_ca_file {}", file.display()))
                && stderr.contains(why),
            "{file:?}: {stderr}"
        );
    }
    assert_eq!(app.smtp.connections(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_opportunistic_upgrades_when_offered_and_sends_plainly_when_not() {
    // Offered: STARTTLS is used.
    let app = tls_app(Some(TlsMode::StartTls), true).await;
    let url = app.smtp.url().replace("tls=required", "tls=opportunistic");
    app.write_config(&format!(
        "[delivery]\nrun_retry_window_ms = 0\n[mail]\nsmtp_url = \"{url}\"\ntls_ca_file = \"{}\"\n",
        app.path("ca.pem").display()
    ));
    assert_welcome_delivered_over_tls(&app).await;

    // Not offered: delivered without TLS rather than not at all.
    let app = tls_app(None, false).await;
    app.write_config(&format!(
        "[delivery]\nrun_retry_window_ms = 0\n[mail]\nsmtp_url = \"{}?tls=opportunistic\"\n",
        app.smtp.url()
    ));
    let summary = app.run_at(NOW).await;
    assert_eq!(summary["delivery"]["sent"], 1, "{summary}");
    let messages = app.smtp.messages();
    assert_eq!(messages.len(), 1);
    assert!(!messages[0].tls);
    assert_eq!(messages[0].rcpt_to, vec!["ana@example.com".to_owned()]);
}
