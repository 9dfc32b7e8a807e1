//! SMTP delivery through lettre, on connections we open ourselves.
//!
//! lettre 0.11 writes the final `.` of DATA as its own small packet and its
//! transports do not set TCP_NODELAY, so each message waits ~40 ms for a
//! delayed ACK. We open the `TcpStream`, set `nodelay`, and hand it to
//! `AsyncSmtpConnection::connect_with_transport`; a small pool keeps these
//! connections open between messages. Implicit TLS (`smtps://`) uses lettre's
//! own connector.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use lettre::address::Envelope as SmtpEnvelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use url::Url;

/// How TLS is used on an `smtp://` URL (`?tls=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tls {
    None,
    Opportunistic,
    Required,
    Implicit,
}

/// Parsed `mail.smtp_url` (lettre's URL form).
#[derive(Clone, PartialEq, Eq)]
pub struct SmtpTarget {
    pub host: String,
    pub port: u16,
    pub tls: Tls,
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Debug for SmtpTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("credentials", &self.credentials.as_ref().map(|_| "***"))
            .finish()
    }
}

impl SmtpTarget {
    /// `smtp://[user:pass@]host[:port][?tls=required|opportunistic]`, `smtps://host[:port]`.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let url = Url::parse(raw).map_err(|e| format!("mail.smtp_url is not a URL: {e}"))?;
        let host = url
            .host_str()
            .ok_or("mail.smtp_url has no host")?
            .trim_matches(['[', ']'])
            .to_owned();
        let tls_param = url
            .query_pairs()
            .find(|(k, _)| k == "tls")
            .map(|(_, v)| v.into_owned());
        let tls = match (url.scheme(), tls_param.as_deref()) {
            ("smtps", _) => Tls::Implicit,
            ("smtp", None | Some("none")) => Tls::None,
            ("smtp", Some("opportunistic")) => Tls::Opportunistic,
            ("smtp", Some("required")) => Tls::Required,
            ("smtp", Some(other)) => {
                return Err(format!(
                    "mail.smtp_url: unknown tls={other:?}; use required, opportunistic or none"
                ));
            }
            (scheme, _) => {
                return Err(format!(
                    "mail.smtp_url: unknown scheme {scheme:?}; use smtp:// or smtps://"
                ));
            }
        };
        let port = url.port().unwrap_or(match tls {
            Tls::Implicit => 465,
            Tls::Required => 587,
            _ => 25,
        });
        let credentials = (!url.username().is_empty()).then(|| {
            let decode = |s: &str| percent_decode(s);
            (
                decode(url.username()),
                decode(url.password().unwrap_or_default()),
            )
        });
        Ok(Self {
            host,
            port,
            tls,
            credentials,
        })
    }
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// A failed send, classified for retry decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendError {
    pub permanent: bool,
    pub message: String,
}

/// Reads `mail.tls_ca_file`: PEM CA certificates to trust for SMTP TLS. Every
/// failure names the file, so a bad path stops startup with a clear message.
pub fn load_ca_file(path: &Path) -> Result<Certificate, String> {
    let what = || format!("mail.tls_ca_file {}", path.display());
    let pem = std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", what()))?;
    if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
        return Err(format!(
            "{}: no PEM certificate (-----BEGIN CERTIFICATE-----) in the file",
            what()
        ));
    }
    let cert = Certificate::from_pem(&pem).map_err(|e| format!("{}: invalid PEM: {e}", what()))?;
    // Build TLS parameters once now, so a certificate rustls cannot use as a
    // trust anchor fails at startup rather than at the first send.
    TlsParameters::builder("localhost".to_owned())
        .add_root_certificate(cert.clone())
        .build()
        .map_err(|e| format!("{}: not a usable CA certificate: {e}", what()))?;
    Ok(cert)
}

/// A small pool of open SMTP connections.
pub struct SmtpPool {
    target: SmtpTarget,
    /// Extra trusted CA certificates (`mail.tls_ca_file`).
    extra_roots: Option<Certificate>,
    hello: ClientId,
    timeout: Duration,
    idle: Mutex<Vec<AsyncSmtpConnection>>,
    max_idle: usize,
}

impl SmtpPool {
    pub fn new(target: SmtpTarget, timeout: Duration, max_idle: usize) -> Self {
        Self {
            target,
            extra_roots: None,
            hello: ClientId::default(),
            timeout,
            idle: Mutex::new(Vec::new()),
            max_idle,
        }
    }

    /// Also trust the CA certificates in `roots` for TLS (`mail.tls_ca_file`).
    pub fn with_extra_roots(mut self, roots: Certificate) -> Self {
        self.extra_roots = Some(roots);
        self
    }

    fn tls_parameters(&self) -> Result<TlsParameters, SendError> {
        let mut builder = TlsParameters::builder(self.target.host.clone());
        if let Some(roots) = &self.extra_roots {
            builder = builder.add_root_certificate(roots.clone());
        }
        builder.build().map_err(classify)
    }

    async fn connect(&self) -> Result<AsyncSmtpConnection, SendError> {
        let t = &self.target;
        let mut conn = if t.tls == Tls::Implicit {
            AsyncSmtpConnection::connect_tokio1(
                (t.host.as_str(), t.port),
                Some(self.timeout),
                &self.hello,
                Some(self.tls_parameters()?),
                None,
            )
            .await
            .map_err(classify)?
        } else {
            let tcp = tokio::time::timeout(
                self.timeout,
                tokio::net::TcpStream::connect((t.host.as_str(), t.port)),
            )
            .await
            .map_err(|_| transient(format!("connecting to {}:{} timed out", t.host, t.port)))?
            .map_err(|e| transient(format!("cannot connect to {}:{}: {e}", t.host, t.port)))?;
            tcp.set_nodelay(true)
                .map_err(|e| transient(e.to_string()))?;
            let mut conn = AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &self.hello)
                .await
                .map_err(classify)?;
            if t.tls == Tls::Required && !conn.can_starttls() {
                // Never fall back to plaintext when TLS is required.
                let _ = conn.quit().await;
                return Err(transient(format!(
                    "{}:{} does not offer STARTTLS but mail.smtp_url has tls=required; not sending without TLS",
                    t.host, t.port
                )));
            }
            let wants_tls = match t.tls {
                Tls::Required => true,
                Tls::Opportunistic => conn.can_starttls(),
                _ => false,
            };
            if wants_tls {
                let params = self.tls_parameters()?;
                conn.starttls(params, &self.hello).await.map_err(|e| {
                    transient(format!("STARTTLS with {}:{} failed: {e}", t.host, t.port))
                })?;
            }
            conn
        };
        if let Some((user, pass)) = &t.credentials {
            conn.auth(
                &[Mechanism::Plain, Mechanism::Login],
                &Credentials::new(user.clone(), pass.clone()),
            )
            .await
            .map_err(|e| transient(format!("SMTP login as {user:?} failed: {e}")))?;
        }
        Ok(conn)
    }

    /// Sends one message; returns the server's reply.
    pub async fn send(&self, envelope: &SmtpEnvelope, body: &[u8]) -> Result<String, SendError> {
        let pooled = self.idle.lock().ok().and_then(|mut v| v.pop());
        let mut conn = match pooled {
            Some(c) => c,
            // Failing to connect, greet, start TLS or log in is our problem or
            // the server's, never the message's: always retried.
            None => tokio::time::timeout(self.timeout, self.connect())
                .await
                .map_err(|_| {
                    transient(format!(
                        "no SMTP greeting from {}:{} within {:?}",
                        self.target.host, self.target.port, self.timeout
                    ))
                })?
                .map_err(|e| SendError {
                    permanent: false,
                    ..e
                })?,
        };
        let sent = tokio::time::timeout(self.timeout, conn.send(envelope, body)).await;
        match sent {
            Ok(Ok(response)) => {
                if let Ok(mut idle) = self.idle.lock()
                    && idle.len() < self.max_idle
                    && !conn.has_broken()
                {
                    idle.push(conn);
                }
                Ok(format!(
                    "{} {}",
                    response.code(),
                    response.message().collect::<Vec<_>>().join(" ")
                ))
            }
            Ok(Err(e)) => {
                // A refused message leaves the session usable after RSET; a
                // broken connection is dropped.
                if !conn.has_broken()
                    && conn
                        .command(lettre::transport::smtp::commands::Rset)
                        .await
                        .is_ok()
                    && let Ok(mut idle) = self.idle.lock()
                    && idle.len() < self.max_idle
                {
                    idle.push(conn);
                }
                Err(classify(e))
            }
            Err(_) => Err(SendError {
                permanent: false,
                message: format!("SMTP timed out after {:?}", self.timeout),
            }),
        }
    }
}

fn transient(message: String) -> SendError {
    SendError {
        permanent: false,
        message,
    }
}

/// 5xx replies are permanent; 4xx replies and connection problems are transient.
fn classify(e: lettre::transport::smtp::Error) -> SendError {
    SendError {
        permanent: e.is_permanent(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smtp_urls_parse_like_lettre() {
        let t = SmtpTarget::parse("smtp://127.0.0.1:2525").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.tls),
            ("127.0.0.1", 2525, Tls::None)
        );
        let t = SmtpTarget::parse("smtp://user:p%40ss@mail.example.com?tls=required").unwrap();
        assert_eq!((t.port, t.tls), (587, Tls::Required));
        assert_eq!(t.credentials, Some(("user".into(), "p@ss".into())));
        assert_eq!(
            SmtpTarget::parse("smtps://mail.example.com").unwrap().port,
            465
        );
        assert!(SmtpTarget::parse("http://x").is_err());
        assert!(!format!("{t:?}").contains("p@ss"));
    }
}
