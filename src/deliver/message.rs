//! Building the MIME message for an email (pure: no I/O).

use lettre::Message;
use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart, SinglePart};

use crate::domain::Email;
use crate::templates::RenderedEmail;

/// Headers that make a customer email one-click unsubscribable (RFC 8058).
#[derive(Clone, Debug)]
pub struct Unsubscribe {
    pub url: String,
    pub mailto: String,
}

/// Everything a message needs besides its rendered content.
#[derive(Clone, Debug)]
pub struct Envelope<'a> {
    pub from: &'a Mailbox,
    pub to: &'a Email,
    pub to_name: Option<&'a str>,
    /// Without angle brackets: `id@domain`.
    pub message_id: String,
    pub unsubscribe: Option<Unsubscribe>,
}

/// A display name safe for a header: control characters become spaces.
fn clean_name(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Builds the message: one recipient, a stable Message-ID, and for customer
/// mail `List-Unsubscribe` + `List-Unsubscribe-Post`.
pub fn build(env: &Envelope<'_>, content: &RenderedEmail) -> Result<Message, String> {
    let to_addr = env
        .to
        .as_str()
        .parse()
        .map_err(|e| format!("invalid recipient {:?}: {e}", env.to.as_str()))?;
    let to = Mailbox::new(
        env.to_name.map(clean_name).filter(|n| !n.is_empty()),
        to_addr,
    );
    let mut builder = Message::builder()
        .from(env.from.clone())
        .to(to)
        .subject(clean_name(&content.subject))
        .message_id(Some(format!("<{}>", env.message_id)));
    if let Some(u) = &env.unsubscribe {
        builder = builder
            .raw_header(HeaderValue::new(
                HeaderName::new_from_ascii_str("List-Unsubscribe"),
                format!("<{}>, <{}>", u.url, u.mailto),
            ))
            .raw_header(HeaderValue::new(
                HeaderName::new_from_ascii_str("List-Unsubscribe-Post"),
                "List-Unsubscribe=One-Click".to_owned(),
            ));
    }
    let result = match &content.html {
        Some(html) => builder.multipart(MultiPart::alternative_plain_html(
            content.text.clone(),
            html.clone(),
        )),
        None => builder.singlepart(
            SinglePart::builder()
                .header(ContentType::TEXT_PLAIN)
                .body(content.text.clone()),
        ),
    };
    result.map_err(|e| format!("cannot build the message: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_subjects_cannot_inject_headers() {
        let from: Mailbox = "Acme <hello@acme.test>".parse().unwrap();
        let to = Email::parse("ana@example.com").unwrap();
        let env = Envelope {
            from: &from,
            to: &to,
            to_name: Some("Ana\r\nBcc: evil@example.com"),
            message_id: "x.1@acme.test".into(),
            unsubscribe: None,
        };
        let content = RenderedEmail {
            subject: "Hi\r\nBcc: evil@example.com".into(),
            text: "body".into(),
            html: None,
        };
        let msg = build(&env, &content).unwrap();
        let raw = String::from_utf8(msg.formatted()).unwrap();
        assert!(!raw.lines().any(|l| l.starts_with("Bcc:")), "{raw}");
        assert_eq!(msg.envelope().to().len(), 1);
    }
}
