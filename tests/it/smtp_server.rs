//! A small, real, in-process SMTP server for integration tests.
//!
//! It speaks enough ESMTP for `lettre` (EHLO/HELO, MAIL, RCPT, DATA, RSET,
//! NOOP, QUIT), stores every accepted message in memory, and can be told to
//! refuse messages for particular recipients at end-of-DATA, either a limited
//! number of times (`fail_next`) or permanently (`reject_always`).
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// One message accepted by the server (after end-of-DATA was answered 250).
#[derive(Clone, Debug)]
pub struct ReceivedMessage {
    /// Reverse path from `MAIL FROM:<...>`, without the angle brackets.
    pub mail_from: String,
    /// Forward paths from each `RCPT TO:<...>`, without the angle brackets.
    pub rcpt_to: Vec<String>,
    /// The message as transmitted, dot-stuffing undone, CRLF line endings kept,
    /// without the terminating `.` line.
    pub data: Vec<u8>,
    /// The user name the session authenticated as (AUTH PLAIN), if any.
    pub authenticated_as: Option<String>,
    /// When the server accepted it.
    pub received_at: Instant,
}

impl ReceivedMessage {
    /// The message parsed by `mailparse` (panics if it cannot be parsed).
    pub fn parsed(&self) -> mailparse::ParsedMail<'_> {
        mailparse::parse_mail(&self.data).unwrap()
    }

    /// First value of the named top-level header, decoded.
    pub fn header(&self, name: &str) -> Option<String> {
        use mailparse::MailHeaderMap;
        self.parsed().headers.get_first_value(name)
    }

    /// The decoded `Subject` header, or an empty string if there is none.
    pub fn subject(&self) -> String {
        self.header("Subject").unwrap_or_default()
    }

    /// The first inline `text/plain` part (searching subparts depth-first),
    /// decoded, with `\r\n` normalised to `\n`. Empty string if there is none.
    pub fn text_body(&self) -> String {
        find_part(&self.parsed(), "text/plain").unwrap_or_default()
    }

    /// The first inline `text/html` part, decoded, `\r\n` normalised to `\n`.
    pub fn html_body(&self) -> Option<String> {
        find_part(&self.parsed(), "text/html")
    }
}

fn find_part(part: &mailparse::ParsedMail<'_>, mimetype: &str) -> Option<String> {
    let is_attachment =
        part.get_content_disposition().disposition == mailparse::DispositionType::Attachment;
    if part.subparts.is_empty() {
        if !is_attachment && part.ctype.mimetype.eq_ignore_ascii_case(mimetype) {
            let body = part.get_body().unwrap_or_else(|err| {
                panic!("cannot decode {mimetype} part: {err}");
            });
            return Some(body.replace("\r\n", "\n"));
        }
        return None;
    }
    part.subparts
        .iter()
        .find_map(|sub| find_part(sub, mimetype))
}

/// A refusal answered at end-of-DATA.
#[derive(Clone, Debug)]
struct Refusal {
    code: u16,
    text: String,
}

#[derive(Default)]
struct State {
    messages: Vec<ReceivedMessage>,
    /// Lower-cased recipient -> (remaining times, refusal).
    fail_next: HashMap<String, (usize, Refusal)>,
    /// Lower-cased recipient -> refusal.
    reject_always: HashMap<String, Refusal>,
    /// Lower-cased recipient -> DATA transactions seen.
    attempts: HashMap<String, usize>,
    connections: usize,
    /// When set, sessions must `AUTH PLAIN` with these credentials before MAIL.
    required_auth: Option<(String, String)>,
    /// Pause before answering end-of-DATA (a slow server).
    delay: Duration,
}

type Shared = Arc<Mutex<State>>;

fn lock(state: &Shared) -> MutexGuard<'_, State> {
    // A panicking test thread must not make every later call panic too.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// In-process SMTP server bound to `127.0.0.1` on an ephemeral port.
///
/// Dropping it stops accepting new connections; sessions already open keep
/// running until their client goes away (or the runtime shuts down).
pub struct SmtpServer {
    port: u16,
    state: Shared,
    accept_task: JoinHandle<()>,
}

impl SmtpServer {
    /// Bind `127.0.0.1:0` and spawn the accept loop on the current runtime.
    pub async fn start() -> SmtpServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind test SMTP server");
        let port = listener.local_addr().expect("local addr").port();
        let state: Shared = Arc::default();
        let accept_state = state.clone();
        let accept_task = tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        // Transient accept failures (e.g. EMFILE): back off briefly.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                lock(&accept_state).connections += 1;
                let session_state = accept_state.clone();
                tokio::spawn(async move {
                    // I/O errors just end the session: the client went away.
                    let _ = session(stream, session_state).await;
                });
            }
        });
        SmtpServer {
            port,
            state,
            accept_task,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Messages accepted so far, in the order they were accepted.
    pub fn messages(&self) -> Vec<ReceivedMessage> {
        lock(&self.state).messages.clone()
    }

    pub fn count(&self) -> usize {
        lock(&self.state).messages.len()
    }

    /// Poll every 10ms until at least `n` messages were accepted or `timeout`
    /// elapsed, then return `messages()` (never panics on timeout).
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<ReceivedMessage> {
        let deadline = Instant::now() + timeout;
        while self.count() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.messages()
    }

    /// The next `times` messages addressed to `rcpt` are answered with
    /// `code text` at end-of-DATA and are not stored. Calling it again for
    /// the same recipient replaces the previous setting.
    pub fn fail_next(&self, rcpt: &str, times: usize, code: u16, text: &str) {
        let refusal = Refusal {
            code,
            text: text.to_string(),
        };
        lock(&self.state)
            .fail_next
            .insert(normalise(rcpt), (times, refusal));
    }

    /// Every message addressed to `rcpt` is answered with `code text` at
    /// end-of-DATA and is not stored (after any pending `fail_next`).
    pub fn reject_always(&self, rcpt: &str, code: u16, text: &str) {
        let refusal = Refusal {
            code,
            text: text.to_string(),
        };
        lock(&self.state)
            .reject_always
            .insert(normalise(rcpt), refusal);
    }

    /// DATA transactions (accepted or refused) that included `rcpt`.
    pub fn attempts(&self, rcpt: &str) -> usize {
        lock(&self.state)
            .attempts
            .get(&normalise(rcpt))
            .copied()
            .unwrap_or(0)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        lock(&self.state).connections
    }

    /// From now on, answer each end-of-DATA only after `delay`.
    pub fn set_delay(&self, delay: Duration) {
        lock(&self.state).delay = delay;
    }

    /// From now on, sessions must `AUTH PLAIN` as `user`/`pass` before sending.
    pub fn require_auth(&self, user: &str, pass: &str) {
        lock(&self.state).required_auth = Some((user.to_owned(), pass.to_owned()));
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

/// Recipient addresses are matched case-insensitively.
fn normalise(addr: &str) -> String {
    addr.trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_ascii_lowercase()
}

/// Extract the address from `<addr> PARAMS...` (or a bare `addr PARAMS...`).
fn parse_path(arg: &str) -> Option<String> {
    let arg = arg.trim_start();
    if let Some(rest) = arg.strip_prefix('<') {
        let end = rest.find('>')?;
        Some(rest[..end].to_string())
    } else {
        arg.split_whitespace().next().map(str::to_string)
    }
}

/// Case-insensitive prefix strip (`MAIL FROM:`, `RCPT TO:`).
fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

async fn reply<W: AsyncWrite + Unpin>(w: &mut W, text: &str) -> std::io::Result<()> {
    w.write_all(text.as_bytes()).await?;
    w.flush().await
}

async fn session(stream: TcpStream, state: Shared) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let (read_half, mut w) = stream.into_split();
    let mut r = BufReader::new(read_half);

    let mut mail_from: Option<String> = None;
    let mut rcpt_to: Vec<String> = Vec::new();
    let mut line = Vec::new();
    let mut authenticated_as: Option<String> = None;

    reply(&mut w, "220 localhost ESMTP test\r\n").await?;

    loop {
        line.clear();
        if r.read_until(b'\n', &mut line).await? == 0 {
            return Ok(()); // client disconnected
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        let (verb, arg) = match text.find(' ') {
            Some(i) => (&text[..i], &text[i + 1..]),
            None => (text, ""),
        };

        match verb.to_ascii_uppercase().as_str() {
            "EHLO" => {
                mail_from = None;
                rcpt_to.clear();
                if lock(&state).required_auth.is_some() {
                    reply(
                        &mut w,
                        "250-localhost\r\n250-8BITMIME\r\n250-AUTH PLAIN\r\n250 SMTPUTF8\r\n",
                    )
                    .await?;
                } else {
                    reply(&mut w, "250-localhost\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n").await?;
                }
            }
            "AUTH" => {
                use base64::Engine as _;
                let required = lock(&state).required_auth.clone();
                let given = strip_prefix_ci(arg, "PLAIN ")
                    .and_then(|b| {
                        base64::engine::general_purpose::STANDARD
                            .decode(b.trim())
                            .ok()
                    })
                    .and_then(|raw| String::from_utf8(raw).ok())
                    .and_then(|s| {
                        let mut parts = s.split('\0').skip(1);
                        Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
                    });
                match (required, given) {
                    (Some(req), Some(given)) if req == given => {
                        authenticated_as = Some(given.0);
                        reply(&mut w, "235 2.7.0 Authentication successful\r\n").await?;
                    }
                    _ => reply(&mut w, "535 5.7.8 Authentication credentials invalid\r\n").await?,
                }
            }
            "MAIL" if lock(&state).required_auth.is_some() && authenticated_as.is_none() => {
                reply(&mut w, "530 5.7.0 Authentication required\r\n").await?;
            }
            "HELO" => {
                mail_from = None;
                rcpt_to.clear();
                reply(&mut w, "250 localhost\r\n").await?;
            }
            "MAIL" => match strip_prefix_ci(arg, "FROM:").and_then(parse_path) {
                _ if mail_from.is_some() => {
                    reply(&mut w, "503 5.5.1 Nested MAIL command\r\n").await?
                }
                Some(from) => {
                    mail_from = Some(from);
                    rcpt_to.clear();
                    reply(&mut w, "250 2.1.0 OK\r\n").await?;
                }
                None => reply(&mut w, "501 5.5.4 Syntax: MAIL FROM:<address>\r\n").await?,
            },
            "RCPT" => match strip_prefix_ci(arg, "TO:").and_then(parse_path) {
                _ if mail_from.is_none() => {
                    reply(&mut w, "503 5.5.1 Need MAIL before RCPT\r\n").await?
                }
                Some(to) if !to.is_empty() => {
                    rcpt_to.push(to);
                    reply(&mut w, "250 2.1.5 OK\r\n").await?;
                }
                _ => reply(&mut w, "501 5.5.4 Syntax: RCPT TO:<address>\r\n").await?,
            },
            "DATA" => {
                let Some(from) = mail_from.take() else {
                    reply(&mut w, "503 5.5.1 Need MAIL command\r\n").await?;
                    continue;
                };
                if rcpt_to.is_empty() {
                    mail_from = Some(from);
                    reply(&mut w, "503 5.5.1 Need RCPT command\r\n").await?;
                    continue;
                }
                let rcpts = std::mem::take(&mut rcpt_to);
                reply(&mut w, "354 End data with <CR><LF>.<CR><LF>\r\n").await?;

                let Some(data) = read_data(&mut r).await? else {
                    return Ok(()); // disconnected mid-DATA: drop the message
                };
                let answer =
                    finish_transaction(&state, from, rcpts, data, authenticated_as.clone());
                reply(&mut w, &answer).await?;
            }
            "RSET" => {
                mail_from = None;
                rcpt_to.clear();
                reply(&mut w, "250 2.0.0 OK\r\n").await?;
            }
            "NOOP" => reply(&mut w, "250 2.0.0 OK\r\n").await?,
            "QUIT" => {
                reply(&mut w, "221 2.0.0 Bye\r\n").await?;
                let _ = w.shutdown().await;
                return Ok(());
            }
            _ => reply(&mut w, "502 5.5.2 Command not implemented\r\n").await?,
        }
    }
}

/// Read the DATA payload up to the lone `.` line. `None` on EOF.
async fn read_data<R: AsyncBufReadExt + Unpin>(r: &mut R) -> std::io::Result<Option<Vec<u8>>> {
    let mut data = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line).await? == 0 {
            return Ok(None);
        }
        if line == b".\r\n" || line == b".\n" {
            return Ok(Some(data));
        }
        if line.starts_with(b"..") {
            data.extend_from_slice(&line[1..]);
        } else {
            data.extend_from_slice(&line);
        }
    }
}

/// Record the attempt, apply refusal rules, store if accepted; returns the reply.
fn finish_transaction(
    state: &Shared,
    from: String,
    rcpts: Vec<String>,
    data: Vec<u8>,
    authenticated_as: Option<String>,
) -> String {
    let mut st = lock(state);
    let keys: Vec<String> = rcpts.iter().map(|r| normalise(r)).collect();
    for key in &keys {
        *st.attempts.entry(key.clone()).or_insert(0) += 1;
    }

    // Pending one-off failures first: consume one for every matching recipient.
    let mut refusal: Option<Refusal> = None;
    for key in &keys {
        if let Some((remaining, r)) = st.fail_next.get_mut(key)
            && *remaining > 0
        {
            *remaining -= 1;
            refusal.get_or_insert_with(|| r.clone());
        }
    }
    if refusal.is_none() {
        refusal = keys
            .iter()
            .find_map(|key| st.reject_always.get(key).cloned());
    }

    match refusal {
        Some(Refusal { code, text }) => format!("{code} {text}\r\n"),
        None => {
            st.messages.push(ReceivedMessage {
                mail_from: from,
                rcpt_to: rcpts,
                data,
                authenticated_as,
                received_at: Instant::now(),
            });
            "250 2.0.0 OK: queued\r\n".to_string()
        }
    }
}
