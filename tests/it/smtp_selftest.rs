//! Self-tests for the in-process SMTP server in `smtp_server.rs`,
//! driven by real `lettre` sends over TCP.

use std::time::Duration;

use crate::smtp_server::SmtpServer;
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

const WAIT: Duration = Duration::from_secs(5);

fn transport(server: &SmtpServer) -> AsyncSmtpTransport<Tokio1Executor> {
    AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(server.port())
        .timeout(Some(Duration::from_secs(10)))
        .build()
}

fn mailbox(addr: &str) -> Mailbox {
    addr.parse().expect("valid mailbox")
}

fn plain(to: &str, subject: &str, body: &str) -> Message {
    Message::builder()
        .from(mailbox("Sender <sender@example.com>"))
        .to(mailbox(to))
        .subject(subject)
        .body(body.to_string())
        .expect("build message")
}

#[tokio::test]
async fn plain_and_multipart_messages_round_trip_subject_bodies_and_custom_header() {
    let server = SmtpServer::start().await;
    let mailer = transport(&server);
    assert_eq!(server.url(), format!("smtp://127.0.0.1:{}", server.port()));

    mailer
        .send(plain(
            "alice@example.com",
            "Plain hello",
            "Hi Alice,\nsee you soon.\n",
        ))
        .await
        .expect("send plain");

    let multipart = Message::builder()
        .from(mailbox("Sender <sender@example.com>"))
        .to(mailbox("bob@example.com"))
        .subject("Bonjour, ça va? 👋")
        .raw_header(HeaderValue::new(
            HeaderName::new_from_ascii_str("X-Campaign-Id"),
            "spring-42".to_string(),
        ))
        .multipart(
            MultiPart::alternative()
                .singlepart(SinglePart::plain("Plain part for Bob\n".to_string()))
                .singlepart(SinglePart::html(
                    "<p>HTML part for <b>Bob</b></p>\n".to_string(),
                )),
        )
        .expect("build multipart");
    mailer.send(multipart).await.expect("send multipart");

    let msgs = server.wait_for(2, WAIT).await;
    assert_eq!(msgs.len(), 2);
    assert_eq!(server.count(), 2);

    let first = &msgs[0];
    assert_eq!(first.mail_from, "sender@example.com");
    assert_eq!(first.rcpt_to, vec!["alice@example.com".to_string()]);
    assert_eq!(first.subject(), "Plain hello");
    // lettre ends DATA with "\r\n.\r\n" after the body, so the body's own
    // final line break is followed by one more (RFC 5321 keeps it as data).
    assert_eq!(first.text_body(), "Hi Alice,\nsee you soon.\n\n");
    assert!(
        first.data.ends_with(b"see you soon.\r\n\r\n"),
        "{:?}",
        String::from_utf8_lossy(&first.data)
    );
    assert_eq!(first.html_body(), None);
    assert!(first.data.windows(2).any(|w| w == b"\r\n"), "CRLF kept");

    let second = &msgs[1];
    assert_eq!(second.rcpt_to, vec!["bob@example.com".to_string()]);
    assert_eq!(second.subject(), "Bonjour, ça va? 👋");
    assert_eq!(second.header("x-campaign-id").as_deref(), Some("spring-42"));
    assert_eq!(second.header("X-Missing"), None);
    assert_eq!(second.text_body(), "Plain part for Bob\n");
    assert_eq!(
        second.html_body().as_deref(),
        Some("<p>HTML part for <b>Bob</b></p>\n")
    );
    assert_eq!(second.parsed().ctype.mimetype, "multipart/alternative");
}

#[tokio::test]
async fn sequential_sends_reuse_one_pooled_connection() {
    let server = SmtpServer::start().await;
    let mailer = transport(&server);
    for i in 0..5 {
        mailer
            .send(plain("carol@example.com", &format!("msg {i}"), "body\n"))
            .await
            .expect("send");
        // lettre returns the connection to its pool from a spawned task;
        // let that finish so the next send can pick it up.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let msgs = server.wait_for(5, WAIT).await;
    let subjects: Vec<String> = msgs.iter().map(|m| m.subject()).collect();
    assert_eq!(subjects, ["msg 0", "msg 1", "msg 2", "msg 3", "msg 4"]);
    assert_eq!(server.connections(), 1);
}

#[tokio::test]
async fn fifty_concurrent_sends_over_a_pooled_transport_all_arrive() {
    let server = SmtpServer::start().await;
    let mailer = transport(&server);

    let sends = (0..50).map(|i| {
        let mailer = mailer.clone();
        async move {
            mailer
                .send(plain(
                    &format!("user{i}@example.com"),
                    &format!("bulk {i}"),
                    &format!("message number {i}\n"),
                ))
                .await
        }
    });
    for result in futures::future::join_all(sends).await {
        result.expect("concurrent send");
    }

    let msgs = server.wait_for(50, WAIT).await;
    assert_eq!(msgs.len(), 50);
    let mut subjects: Vec<String> = msgs.iter().map(|m| m.subject()).collect();
    subjects.sort();
    let mut expected: Vec<String> = (0..50).map(|i| format!("bulk {i}")).collect();
    expected.sort();
    assert_eq!(subjects, expected);
    assert!(server.connections() >= 1);
}

#[tokio::test]
async fn fail_next_twice_gives_two_transient_errors_then_succeeds() {
    let server = SmtpServer::start().await;
    let mailer = transport(&server);
    server.fail_next("flaky@example.com", 2, 451, "4.3.0 Try again later");

    for attempt in 1..=2 {
        let err = mailer
            .send(plain("flaky@example.com", "retry me", "body\n"))
            .await
            .expect_err("refused send");
        assert!(err.is_transient(), "attempt {attempt}: {err:?}");
        assert!(!err.is_permanent());
    }
    assert_eq!(server.count(), 0);

    mailer
        .send(plain("flaky@example.com", "retry me", "body\n"))
        .await
        .expect("third attempt succeeds");

    let msgs = server.wait_for(1, WAIT).await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].subject(), "retry me");
    assert_eq!(server.attempts("flaky@example.com"), 3);
    assert_eq!(server.attempts("nobody@example.com"), 0);
}

#[tokio::test]
async fn reject_always_gives_a_permanent_error_and_stores_nothing() {
    let server = SmtpServer::start().await;
    let mailer = transport(&server);
    server.reject_always("gone@example.com", 550, "5.1.1 No such user");

    for _ in 0..2 {
        let err = mailer
            .send(plain("gone@example.com", "hello?", "body\n"))
            .await
            .expect_err("rejected send");
        assert!(err.is_permanent(), "{err:?}");
        assert!(!err.is_transient());
    }
    assert_eq!(server.attempts("gone@example.com"), 2);

    // Other recipients are unaffected, on the same (reused) connection.
    mailer
        .send(plain("fine@example.com", "ok", "body\n"))
        .await
        .expect("unrelated send");
    let msgs = server.wait_for(1, WAIT).await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].rcpt_to, vec!["fine@example.com".to_string()]);
    assert!(
        msgs.iter()
            .all(|m| !m.rcpt_to.iter().any(|r| r == "gone@example.com"))
    );
}

#[tokio::test]
async fn a_body_line_starting_with_a_dot_survives_dot_stuffing() {
    let server = SmtpServer::start().await;
    let mailer = transport(&server);
    let body = "first line\n.leading dot\n..two dots\n.\nlast line\n";
    mailer
        .send(plain("dots@example.com", "dots", body))
        .await
        .expect("send");

    let msgs = server.wait_for(1, WAIT).await;
    assert_eq!(msgs.len(), 1);
    // See the plain-message test for the extra final line break.
    assert_eq!(msgs[0].text_body(), format!("{body}\n"));
}

#[tokio::test]
async fn a_client_disconnecting_mid_session_does_not_break_the_server() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    let server = SmtpServer::start().await;
    {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", server.port()))
            .await
            .unwrap();
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        assert_eq!(line, "220 localhost ESMTP test\r\n");
        for (cmd, expect) in [
            ("ehlo client\r\n", "250-localhost\r\n"),
            ("bogus\r\n", "502"),
            ("mail from:<a@example.com> BODY=8BITMIME\r\n", "250"),
            ("rcpt to:<b@example.com>\r\n", "250"),
            ("data\r\n", "354"),
        ] {
            w.write_all(cmd.as_bytes()).await.unwrap();
            line.clear();
            r.read_line(&mut line).await.unwrap();
            assert!(line.starts_with(expect), "{cmd:?} -> {line:?}");
            if cmd.starts_with("ehlo") {
                for ext in ["250-8BITMIME\r\n", "250 SMTPUTF8\r\n"] {
                    line.clear();
                    r.read_line(&mut line).await.unwrap();
                    assert_eq!(line, ext);
                }
            }
        }
        w.write_all(b"Subject: half\r\n\r\nunfinished")
            .await
            .unwrap();
        // Dropping both halves closes the socket mid-DATA.
    }

    let mailer = transport(&server);
    mailer
        .send(plain("after@example.com", "still alive", "body\n"))
        .await
        .expect("send after abrupt disconnect");
    let msgs = server.wait_for(1, WAIT).await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].subject(), "still alive");
    assert_eq!(server.connections(), 2);
}
