//! A small, real, in-process SMTP server for integration tests.
//!
//! It speaks enough ESMTP for `lettre` (EHLO/HELO, MAIL, RCPT, DATA, RSET,
//! NOOP, QUIT), stores every accepted message in memory, and can be told to
//! refuse messages for particular recipients at end-of-DATA, either a limited
//! number of times (`fail_next`) or permanently (`reject_always`).
//!
//! [`SmtpServer::start_tls`] serves TLS with a certificate from [`TestCa`]:
//! implicit TLS (`smtps://`) or STARTTLS (advertised in EHLO; a new EHLO is
//! required after the upgrade). Each message records whether it came over TLS.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

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
    /// Whether the message arrived over TLS (implicit or after STARTTLS).
    pub tls: bool,
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
    /// TLS handshakes that failed (e.g. the client refused our certificate).
    tls_failures: usize,
    /// `MAIL` commands received without TLS on a TLS server.
    plaintext_mail_commands: usize,
}

/// A private CA and a `localhost`/`127.0.0.1` server certificate it signed,
/// generated at test time.
pub struct TestCa {
    /// The CA certificate, PEM (what `mail.tls_ca_file` points at).
    pub ca_pem: String,
    server_config: Arc<rustls::ServerConfig>,
}

impl TestCa {
    pub fn generate() -> TestCa {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "engaged test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = ca_params.self_signed(&ca_key).expect("self-signed CA");

        let leaf_key = KeyPair::generate().expect("leaf key");
        let mut leaf_params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("leaf params");
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf_params.use_authority_key_identifier_extension = true;
        let leaf = leaf_params
            .signed_by(&leaf_key, &ca, &ca_key)
            .expect("leaf signed by CA");

        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
        let server_config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .expect("server certificate");
        TestCa {
            ca_pem: ca.pem(),
            server_config: Arc::new(server_config),
        }
    }
}

/// How a TLS test server speaks TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// TLS from the first byte (`smtps://`).
    Implicit,
    /// Plaintext greeting, `STARTTLS` advertised in EHLO.
    StartTls,
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
    tls: Option<TlsMode>,
}

impl SmtpServer {
    /// Bind `127.0.0.1:0` and spawn the accept loop on the current runtime.
    pub async fn start() -> SmtpServer {
        Self::bind(None).await
    }

    /// Like [`SmtpServer::start`], serving TLS with `ca`'s server certificate.
    pub async fn start_tls(mode: TlsMode, ca: &TestCa) -> SmtpServer {
        Self::bind(Some((mode, TlsAcceptor::from(ca.server_config.clone())))).await
    }

    async fn bind(tls: Option<(TlsMode, TlsAcceptor)>) -> SmtpServer {
        let mode = tls.as_ref().map(|(m, _)| *m);
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
                let tls = tls.clone();
                tokio::spawn(async move {
                    // I/O errors just end the session: the client went away.
                    let _ = connection(stream, session_state, tls).await;
                });
            }
        });
        SmtpServer {
            port,
            state,
            accept_task,
            tls: mode,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `smtp://127.0.0.1:PORT`; for a TLS server the matching form:
    /// `smtps://…` (implicit) or `smtp://…?tls=required` (STARTTLS).
    pub fn url(&self) -> String {
        match self.tls {
            None => format!("smtp://127.0.0.1:{}", self.port),
            Some(TlsMode::Implicit) => format!("smtps://127.0.0.1:{}", self.port),
            Some(TlsMode::StartTls) => format!("smtp://127.0.0.1:{}?tls=required", self.port),
        }
    }

    /// TLS handshakes that failed (the client gave up on our certificate).
    pub fn tls_failures(&self) -> usize {
        lock(&self.state).tls_failures
    }

    /// `MAIL` commands received without TLS on a TLS server.
    pub fn plaintext_mail_commands(&self) -> usize {
        lock(&self.state).plaintext_mail_commands
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

/// A byte stream a session can run on: plain TCP or TLS over it.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// How a session ended.
enum Ended {
    Closed,
    /// The client asked for STARTTLS and was told to go ahead.
    StartTls(Box<dyn Io>),
}

async fn handshake(
    acceptor: &TlsAcceptor,
    io: Box<dyn Io>,
    state: &Shared,
) -> std::io::Result<Box<dyn Io>> {
    match acceptor.accept(io).await {
        Ok(tls) => Ok(Box::new(tls)),
        Err(e) => {
            lock(state).tls_failures += 1;
            Err(e)
        }
    }
}

async fn connection(
    stream: TcpStream,
    state: Shared,
    tls: Option<(TlsMode, TlsAcceptor)>,
) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let (mut io, mut secure): (Box<dyn Io>, bool) = match &tls {
        Some((TlsMode::Implicit, acceptor)) => {
            (handshake(acceptor, Box::new(stream), &state).await?, true)
        }
        _ => (Box::new(stream), false),
    };
    let offer_starttls = matches!(tls, Some((TlsMode::StartTls, _)));
    let mut greet = true;
    loop {
        let starttls = offer_starttls && !secure;
        match session(io, &state, secure, starttls, tls.is_some(), greet).await? {
            Ended::Closed => return Ok(()),
            Ended::StartTls(plain) => {
                let (_, acceptor) = tls.as_ref().expect("STARTTLS only when offered");
                io = handshake(acceptor, plain, &state).await?;
                secure = true;
                greet = false;
            }
        }
    }
}

/// One SMTP session on `io`. After STARTTLS (`greet` false) there is no
/// greeting, and the client must send EHLO again before MAIL.
async fn session(
    io: Box<dyn Io>,
    state: &Shared,
    secure: bool,
    offer_starttls: bool,
    tls_server: bool,
    greet: bool,
) -> std::io::Result<Ended> {
    // `BufReader` passes writes through to the stream.
    let mut r = BufReader::new(io);
    let state = state.clone();

    let mut mail_from: Option<String> = None;
    let mut rcpt_to: Vec<String> = Vec::new();
    let mut line = Vec::new();
    let mut authenticated_as: Option<String> = None;
    let mut said_ehlo = greet;

    if greet {
        reply(&mut r, "220 localhost ESMTP test\r\n").await?;
    }

    loop {
        line.clear();
        if r.read_until(b'\n', &mut line).await? == 0 {
            return Ok(Ended::Closed); // client disconnected
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
                said_ehlo = true;
                let mut ehlo = String::from("250-localhost\r\n250-8BITMIME\r\n");
                if offer_starttls {
                    ehlo.push_str("250-STARTTLS\r\n");
                }
                if lock(&state).required_auth.is_some() {
                    ehlo.push_str("250-AUTH PLAIN\r\n");
                }
                ehlo.push_str("250 SMTPUTF8\r\n");
                reply(&mut r, &ehlo).await?;
            }
            "STARTTLS" if offer_starttls => {
                if !r.buffer().is_empty() {
                    // Commands pipelined before the handshake would be
                    // injected into the TLS session: refuse (RFC 3207).
                    reply(&mut r, "501 5.5.2 Data after STARTTLS\r\n").await?;
                    return Ok(Ended::Closed);
                }
                reply(&mut r, "220 2.0.0 Ready to start TLS\r\n").await?;
                return Ok(Ended::StartTls(r.into_inner()));
            }
            "MAIL" if tls_server && !secure => {
                lock(&state).plaintext_mail_commands += 1;
                reply(&mut r, "530 5.7.0 Must issue a STARTTLS command first\r\n").await?;
            }
            "MAIL" if !said_ehlo => {
                reply(&mut r, "503 5.5.1 EHLO first\r\n").await?;
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
                        reply(&mut r, "235 2.7.0 Authentication successful\r\n").await?;
                    }
                    _ => reply(&mut r, "535 5.7.8 Authentication credentials invalid\r\n").await?,
                }
            }
            "MAIL" if lock(&state).required_auth.is_some() && authenticated_as.is_none() => {
                reply(&mut r, "530 5.7.0 Authentication required\r\n").await?;
            }
            "HELO" => {
                mail_from = None;
                rcpt_to.clear();
                reply(&mut r, "250 localhost\r\n").await?;
            }
            "MAIL" => match strip_prefix_ci(arg, "FROM:").and_then(parse_path) {
                _ if mail_from.is_some() => {
                    reply(&mut r, "503 5.5.1 Nested MAIL command\r\n").await?
                }
                Some(from) => {
                    mail_from = Some(from);
                    rcpt_to.clear();
                    reply(&mut r, "250 2.1.0 OK\r\n").await?;
                }
                None => reply(&mut r, "501 5.5.4 Syntax: MAIL FROM:<address>\r\n").await?,
            },
            "RCPT" => match strip_prefix_ci(arg, "TO:").and_then(parse_path) {
                _ if mail_from.is_none() => {
                    reply(&mut r, "503 5.5.1 Need MAIL before RCPT\r\n").await?
                }
                Some(to) if !to.is_empty() => {
                    rcpt_to.push(to);
                    reply(&mut r, "250 2.1.5 OK\r\n").await?;
                }
                _ => reply(&mut r, "501 5.5.4 Syntax: RCPT TO:<address>\r\n").await?,
            },
            "DATA" => {
                let Some(from) = mail_from.take() else {
                    reply(&mut r, "503 5.5.1 Need MAIL command\r\n").await?;
                    continue;
                };
                if rcpt_to.is_empty() {
                    mail_from = Some(from);
                    reply(&mut r, "503 5.5.1 Need RCPT command\r\n").await?;
                    continue;
                }
                let rcpts = std::mem::take(&mut rcpt_to);
                reply(&mut r, "354 End data with <CR><LF>.<CR><LF>\r\n").await?;

                let Some(data) = read_data(&mut r).await? else {
                    return Ok(Ended::Closed); // disconnected mid-DATA: drop the message
                };
                // A slow server: the message is only accepted after the pause.
                let delay = lock(&state).delay;
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let answer =
                    finish_transaction(&state, from, rcpts, data, authenticated_as.clone(), secure);
                reply(&mut r, &answer).await?;
            }
            "RSET" => {
                mail_from = None;
                rcpt_to.clear();
                reply(&mut r, "250 2.0.0 OK\r\n").await?;
            }
            "NOOP" => reply(&mut r, "250 2.0.0 OK\r\n").await?,
            "QUIT" => {
                reply(&mut r, "221 2.0.0 Bye\r\n").await?;
                let _ = r.shutdown().await;
                return Ok(Ended::Closed);
            }
            _ => reply(&mut r, "502 5.5.2 Command not implemented\r\n").await?,
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
    tls: bool,
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
                tls,
                received_at: Instant::now(),
            });
            "250 2.0.0 OK: queued\r\n".to_string()
        }
    }
}
