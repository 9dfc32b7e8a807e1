//! Hostile input, continued (issue 9, points 7 and 8), through the real
//! binary: CSV quotes that do not close or close too late, line endings of
//! every kind, byte-order marks and files that are not UTF-8; and config
//! errors that must never print a secret.

use engaged::domain::CustomerId;
use serde_json::json;

use crate::helpers::{Run, TestApp, track};

/// The stderr line reporting `FILE:LINE: `, or a panic that shows all of stderr.
fn line_error<'a>(r: &'a Run, file: &str, line: u64) -> &'a str {
    let needle = format!("{file}:{line}: ");
    r.stderr
        .lines()
        .find(|l| l.contains(&needle))
        .unwrap_or_else(|| panic!("no error for {file}:{line} in:\n{}", r.stderr))
}

fn assert_counts(r: &Run, counts: &str) {
    assert!(
        r.stdout.contains(counts),
        "expected {counts:?}:\n{}\n{}",
        r.stdout,
        r.stderr
    );
}

async fn name_of(app: &TestApp, id: &str) -> Option<Option<String>> {
    app.store()
        .await
        .customer(&CustomerId::parse(id).unwrap())
        .await
        .unwrap()
        .map(|c| c.name)
}

async fn import_bytes(app: &TestApp, csv: &[u8]) -> Run {
    let path = app.write("customers.csv", csv);
    app.engaged(&["import", "customers", path.to_str().unwrap()])
        .await
}

// ---------------------------------------------------------------------------
// 1. Quotes
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn an_unterminated_quote_in_the_last_column_rejects_its_line_and_the_rows_after_it_are_imported()
 {
    let app = TestApp::new().await;
    let r = app
        .import_customers(
            "id,email,name\n\
             c1,ana@example.com,\"Ana\n\
             c2,ben@example.com,Ben\n\
             c3,cem@example.com,Cem\n",
        )
        .await;
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    let l = line_error(&r, "customers.csv", 2);
    assert!(l.contains("unterminated quote"), "{l}");
    assert!(l.contains("\"name\" field"), "{l}");
    assert_eq!(r.stderr.lines().count(), 1, "one error: {}", r.stderr);
    assert_counts(
        &r,
        "2 imported, 0 updated, 0 duplicate, 0 ignored, 1 rejected",
    );
    assert_eq!(name_of(&app, "c1").await, None);
    assert_eq!(name_of(&app, "c2").await, Some(Some("Ben".into())));
    assert_eq!(name_of(&app, "c3").await, Some(Some("Cem".into())));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unterminated_quote_in_a_middle_column_names_the_line_it_opened_on() {
    let app = TestApp::new().await;
    let r = app
        .import_customers(
            "id,email,name\n\
             c1,ana@example.com,Ana\n\
             c2,\"ben@example.com,Ben\n\
             c3,cem@example.com,Cem\n\
             c4,dia@example.com,Dia\n",
        )
        .await;
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    let l = line_error(&r, "customers.csv", 3);
    assert!(l.contains("unterminated quote"), "{l}");
    assert!(l.contains("\"email\" field"), "{l}");
    assert!(
        !r.stderr.contains("customers.csv:2:"),
        "the line before is not blamed: {}",
        r.stderr
    );
    assert_counts(
        &r,
        "3 imported, 0 updated, 0 duplicate, 0 ignored, 1 rejected",
    );
    for id in ["c1", "c3", "c4"] {
        assert!(name_of(&app, id).await.is_some(), "{id} was imported");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stray_quote_closed_further_down_cannot_swallow_the_rows_between() {
    let app = TestApp::new().await;
    // The quote opened on line 2 is closed by the one on line 4: valid CSV
    // with Ana's name spanning three lines, the way the csv crate reads it.
    let r = app
        .import_customers(
            "id,email,name\n\
             c1,ana@example.com,\"Ana\n\
             c2,ben@example.com,Ben\n\
             c3,cem@example.com,5\" screen\"\n\
             c4,dia@example.com,Dia\n",
        )
        .await;
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    let l = line_error(&r, "customers.csv", 2);
    assert!(l.contains("stray quote"), "{l}");
    assert!(l.contains("line 3 inside it reads as a row"), "{l}");
    assert_counts(
        &r,
        "3 imported, 0 updated, 0 duplicate, 0 ignored, 1 rejected",
    );
    assert_eq!(name_of(&app, "c2").await, Some(Some("Ben".into())));
    assert_eq!(name_of(&app, "c3").await, Some(Some("5\" screen\"".into())));
    assert_eq!(name_of(&app, "c4").await, Some(Some("Dia".into())));

    // Closed by a properly quoted field in a later row, in a middle column.
    let app = TestApp::new().await;
    let r = app
        .import_customers(
            "id,email,name\n\
             c1,\"ana@example.com,Ana\n\
             c2,ben@example.com,\"Ben, Jr\"\n\
             c3,cem@example.com,Cem\n",
        )
        .await;
    let l = line_error(&r, "customers.csv", 2);
    assert!(l.contains("stray quote"), "{l}");
    assert_counts(
        &r,
        "2 imported, 0 updated, 0 duplicate, 0 ignored, 1 rejected",
    );
    assert_eq!(name_of(&app, "c2").await, Some(Some("Ben, Jr".into())));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quoted_field_with_line_breaks_is_still_imported_and_the_line_count_stays_right() {
    let app = TestApp::new().await;
    let r = app
        .import_customers(
            "id,email,name,notes\n\
             c1,ana@example.com,\"Ana\nNovak\",\"called twice,\r\nno answer\"\n\
             c2,not-an-email,Ben,\n",
        )
        .await;
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    // c1 takes lines 2 to 4.
    let l = line_error(&r, "customers.csv", 5);
    assert!(l.contains("invalid email"), "{l}");
    assert_counts(
        &r,
        "1 imported, 0 updated, 0 duplicate, 0 ignored, 1 rejected",
    );
    assert_eq!(name_of(&app, "c1").await, Some(Some("Ana\nNovak".into())));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_with_too_many_fields_after_a_multi_line_field_says_where_it_ends() {
    let app = TestApp::new().await;
    let r = app
        .import_customers(
            "id,email,name\n\
             c1,ana@example.com,\"Ana\nNovak\",extra\n\
             c2,ben@example.com,Ben\n",
        )
        .await;
    let l = line_error(&r, "customers.csv", 2);
    assert!(
        l.contains("expected 3 fields like the header row, found 4"),
        "{l}"
    );
    assert!(l.contains("run to line 3"), "{l}");
    assert_counts(
        &r,
        "1 imported, 0 updated, 0 duplicate, 0 ignored, 1 rejected",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn suppression_imports_read_quotes_the_same_way() {
    let app = TestApp::new().await;
    let path = app.write(
        "suppress.csv",
        "email,reason\n\
         ana@example.com,\"asked us\n\
         ben@example.com,bounced\n\
         cem@example.com,complained\n",
    );
    let r = app
        .engaged(&["suppressions", "import", path.to_str().unwrap()])
        .await;
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    let l = line_error(&r, "suppress.csv", 2);
    assert!(l.contains("unterminated quote"), "{l}");
    assert!(
        r.stdout
            .contains("2 suppressed, 0 already suppressed, 1 rejected"),
        "{}",
        r.stdout
    );
}

// ---------------------------------------------------------------------------
// 2. Line endings
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_row_is_reported_on_its_own_line_with_lf_crlf_cr_or_mixed_endings() {
    let app = TestApp::new().await;
    for (what, eols) in [
        ("LF", ["\n"; 5]),
        ("CRLF", ["\r\n"; 5]),
        ("CR", ["\r"; 5]),
        // Never a CR before the blank line's LF, which would make one CRLF.
        ("mixed", ["\r\n", "\n", "\r", "\r", "\r\n"]),
    ] {
        // Line 3 is blank; line 5 is bad.
        let rows = [
            "id,email,name",
            "c1,ana@example.com,Ana",
            "",
            "c2,ben@example.com,Ben",
            "c3,not-an-email,Cem",
            "c4,dia@example.com,Dia",
        ];
        let mut csv = String::new();
        for (i, row) in rows.iter().enumerate() {
            csv.push_str(row);
            if i < eols.len() {
                csv.push_str(eols[i]);
            }
        }
        let r = app.import_customers(&csv).await;
        assert_eq!(r.code, 1, "{what}: {}{}", r.stdout, r.stderr);
        let l = line_error(&r, "customers.csv", 5);
        assert!(l.contains("invalid email address"), "{what}: {l}");
        assert_eq!(r.stderr.lines().count(), 1, "{what}: {}", r.stderr);
        assert!(
            r.stdout.contains("rejected") && r.stdout.contains(", 1 rejected"),
            "{what}: {}",
            r.stdout
        );
    }
    assert_eq!(app.store().await.customer_count().await.unwrap(), 3);
}

// ---------------------------------------------------------------------------
// 3. Encodings
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_utf8_byte_order_mark_is_skipped_and_the_id_column_is_found() {
    let app = TestApp::new().await;
    let r = import_bytes(
        &app,
        b"\xef\xbb\xbfid,email,name\r\nc1,ana@example.com,Ana\r\n",
    )
    .await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_counts(
        &r,
        "1 imported, 0 updated, 0 duplicate, 0 ignored, 0 rejected",
    );
    assert_eq!(name_of(&app, "c1").await, Some(Some("Ana".into())));

    let path = app.write("suppress.csv", b"\xef\xbb\xbfemail\nben@example.com\n");
    let r = app
        .engaged(&["suppressions", "import", path.to_str().unwrap()])
        .await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
}

fn utf16(text: &str, little_endian: bool, bom: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let units = bom.then_some(0xfeff).into_iter().chain(text.encode_utf16());
    for u in units {
        out.extend(if little_endian {
            u.to_le_bytes()
        } else {
            u.to_be_bytes()
        });
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_utf16_file_is_refused_with_one_error_naming_the_encoding() {
    let app = TestApp::new().await;
    let csv = "id,email,name\nc1,ana@example.com,Ana\n";
    for (little_endian, bom, name) in [
        (true, true, "UTF-16LE"),
        (false, true, "UTF-16BE"),
        (true, false, "UTF-16LE"),
        (false, false, "UTF-16BE"),
    ] {
        let r = import_bytes(&app, &utf16(csv, little_endian, bom)).await;
        assert_eq!(r.code, 2, "{name}: {}{}", r.stdout, r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{name}: {}", r.stderr);
        assert!(r.stderr.contains("customers.csv: "), "{}", r.stderr);
        assert!(r.stderr.contains(name), "{name}: {}", r.stderr);
        assert!(r.stderr.contains("not UTF-8"), "{}", r.stderr);
        assert!(r.stderr.contains("iconv -f UTF-16"), "{}", r.stderr);
    }
    let path = app.write(
        "events.jsonl",
        utf16(
            &track("c1", "login", "2026-06-01T10:00:00Z", json!({})),
            true,
            true,
        ),
    );
    let r = app
        .engaged(&["import", "events", path.to_str().unwrap()])
        .await;
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("UTF-16LE") && r.stderr.contains("not UTF-8"),
        "{}",
        r.stderr
    );
    assert_eq!(app.store().await.customer_count().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_utf8_in_one_row_rejects_that_row_and_keeps_the_others() {
    let app = TestApp::new().await;
    // "Bén" in Latin-1 inside an otherwise UTF-8 file.
    let r = import_bytes(
        &app,
        b"id,email,name\r\nc1,ana@example.com,Ana\r\nc2,ben@example.com,B\xe9n\r\nc3,cem@example.com,C\xc3\xa9m\r\n",
    )
    .await;
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    let l = line_error(&r, "customers.csv", 3);
    assert!(l.contains("\"name\" is not valid UTF-8"), "{l}");
    assert_counts(
        &r,
        "2 imported, 0 updated, 0 duplicate, 0 ignored, 1 rejected",
    );
    assert_eq!(name_of(&app, "c3").await, Some(Some("Cém".into())));

    // A header that is not UTF-8 means the whole file is in another encoding.
    let r = import_bytes(&app, b"id,email,pr\xe9nom\nc4,dia@example.com,Dia\n").await;
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("not valid UTF-8") && r.stderr.contains("iconv"),
        "{}",
        r.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_jsonl_file_with_a_utf8_byte_order_mark_is_imported() {
    let app = TestApp::new().await;
    let lines = format!(
        "\u{feff}{}\n{}\n",
        track("c1", "login", "2026-06-01T10:00:00Z", json!({})),
        track("c1", "login", "2026-06-02T10:00:00Z", json!({})),
    );
    let r = app.import_events(&lines).await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_counts(
        &r,
        "2 imported, 0 updated, 0 duplicate, 0 ignored, 0 rejected",
    );
}

// ---------------------------------------------------------------------------
// 4. Config errors never print a secret
// ---------------------------------------------------------------------------

const SECRET: &str = "Zq7-hunter2-Zq7";

/// Writes `engaged.toml` as given, runs `engaged check` and checks that
/// the error names the file, the line and `key`, and holds no secret.
async fn config_error(app: &TestApp, toml: &str, line: usize, key: &str) -> Run {
    app.write("engaged.toml", toml);
    let r = app.engaged(&["check"]).await;
    assert_eq!(r.code, 2, "{toml}\n{}{}", r.stdout, r.stderr);
    for secret in [SECRET, "hunter2"] {
        assert!(
            !r.stderr.contains(secret) && !r.stdout.contains(secret),
            "the secret is printed for\n{toml}\n{}",
            r.stderr
        );
    }
    assert!(
        r.stderr.contains(&format!("engaged.toml:{line}:")),
        "line {line} for\n{toml}\n{}",
        r.stderr
    );
    assert!(r.stderr.contains(key), "{key} for\n{toml}\n{}", r.stderr);
    r
}

#[tokio::test(flavor = "multi_thread")]
async fn config_syntax_and_type_errors_on_secret_keys_never_show_the_secret() {
    let app = TestApp::new().await;
    let s = SECRET;
    for key in ["admin_token", "write_key", "signing_secret"] {
        let path = format!("http.{key}");
        for (toml, line) in [
            (
                format!("[http]\nlisten = \"127.0.0.1:0\"\n{key} = \"{s}\n"),
                3,
            ),
            (format!("[http]\n{key} = {s}\n"), 2),
            (format!("[http]\n{key} = \"{s}\" \"{s}\"\n"), 2),
            (format!("[http]\n{key} \"{s}\"\n"), 2),
            (format!("[http]\n{key} = [\"{s}\"]\n"), 2),
            (format!("[http]\n{key} = 123{s}\n"), 2),
            (format!("http.{key} = {{ value = \"{s}\" }}\n"), 1),
        ] {
            let r = config_error(&app, &toml, line, &path).await;
            assert!(r.stderr.contains("***"), "{}", r.stderr);
        }
    }
    // Digits only: a type error would print the number.
    let r = config_error(
        &app,
        "[http]\nadmin_token = 7777123\n",
        2,
        "http.admin_token",
    )
    .await;
    assert!(!r.stderr.contains("7777123"), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("invalid type: integer, expected a string"),
        "{}",
        r.stderr
    );

    let url = format!("smtp://mailer:{s}@smtp.example:587");
    for (toml, line) in [
        (format!("[mail]\nsmtp_url = \"{url}\n"), 2),
        (format!("[mail]\nsmtp_url = \"{url}\" ?tls=required\n"), 2),
        (format!("[mail]\nsmtp_url = {{ url = \"{url}\" }}\n"), 2),
        (
            format!("[database]\nurl = \"postgres://u:{s}@db/x\" x\n"),
            2,
        ),
    ] {
        config_error(&app, &toml, line, "url").await;
    }

    // Every line of a webhook: its URL and headers carry credentials.
    for (toml, line, key) in [
        (
            format!("[webhooks.crm]\nurl = \"https://crm.example/hook?token={s}\nheaders = {{}}\n"),
            2,
            "webhooks.crm.url",
        ),
        (
            format!(
                "[webhooks.crm]\nurl = \"https://crm.example/\"\nheaders = {{ Authorization = \"Bearer {s}\" \n"
            ),
            3,
            "webhooks.crm.headers",
        ),
        (
            format!(
                "[webhooks.crm]\nurl = \"https://crm.example/\"\nheaders = {{ Authorization = 55{s} }}\n"
            ),
            3,
            "webhooks.crm.headers",
        ),
        (
            format!(
                "[webhooks.crm]\nurl = \"https://crm.example/\"\n[webhooks.crm.headers]\nAuthorization = [\"Bearer {s}\"]\n"
            ),
            4,
            "webhooks.crm.headers.Authorization",
        ),
        (
            format!(
                "[webhooks.crm]\nurl = \"https://crm.example/\"\nheader = {{ Authorization = \"Bearer {s}\" }}\n"
            ),
            3,
            "unknown field `header`",
        ),
    ] {
        config_error(&app, &toml, line, key).await;
    }

    // A misspelled secret key: the value of an unknown key is not shown.
    config_error(
        &app,
        &format!("[http]\nadmin_tokn = \"{s}\"\n"),
        2,
        "unknown field `admin_tokn`",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn config_errors_elsewhere_still_show_their_line() {
    let app = TestApp::new().await;
    let r = config_error(
        &app,
        &format!("[http]\nadmin_token = \"{SECRET}\"\n\n[delivery]\nconcurrency = \"many\"\n"),
        5,
        "delivery.concurrency",
    )
    .await;
    assert!(
        r.stderr.contains("5 | concurrency = \"many\""),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("expected a non-negative whole number"),
        "{}",
        r.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_override_with_a_misspelled_key_names_the_environment_variable() {
    let app = TestApp::new().await;
    let out = app
        .command(&["check"])
        .env("ENGAGED_DELIVERY__CONCURENCY", "3")
        .env("ENGAGED_HTTP__ADMIN_TOKEN", SECRET)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("environment variable ENGAGED_DELIVERY__CONCURENCY: delivery.concurency: unknown field `concurency`"),
        "{stderr}"
    );
    assert!(!stderr.contains("engaged.toml"), "{stderr}");
    assert!(!stderr.contains(SECRET), "{stderr}");

    let out = app
        .command(&["check"])
        .env("ENGAGED_WEBHOOKS__CRM", SECRET)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("ENGAGED_WEBHOOKS__CRM"), "{stderr}");
    assert!(!stderr.contains(SECRET), "{stderr}");
}
