//! Typed settings. Every key has a default that works with no config file at
//! all (SQLite `./engaged.db`, `./rules`, `./templates`, mail as `.eml` files in
//! `./outbox/`). Unknown keys are errors, so a typo never silently does nothing.
//!
//! Any key can be overridden from the environment as
//! `ENGAGED_<SECTION>__<KEY>` (e.g. `ENGAGED_HTTP__WRITE_KEY`), which is how
//! secrets are meant to arrive in production.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::diagnostic::Diagnostic;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub database: DatabaseConfig,
    pub rules: DirConfig<RulesDir>,
    pub templates: DirConfig<TemplatesDir>,
    pub mail: MailConfig,
    pub delivery: DeliveryConfig,
    pub escalation: EscalationConfig,
    pub http: HttpConfig,
    pub webhooks: BTreeMap<String, WebhookConfig>,
    pub schedules: Vec<ScheduleConfig>,
    pub log: LogConfig,
    pub policy: crate::policy::PolicyConfig,
    pub guard: crate::policy::GuardConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub url: String,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://engaged.db".into(),
        }
    }
}

/// Marker types so `rules.dir` and `templates.dir` get different defaults.
pub trait DefaultDir {
    const DIR: &'static str;
}
#[derive(Debug, Clone, Default)]
pub struct RulesDir;
#[derive(Debug, Clone, Default)]
pub struct TemplatesDir;
impl DefaultDir for RulesDir {
    const DIR: &'static str = "rules";
}
impl DefaultDir for TemplatesDir {
    const DIR: &'static str = "templates";
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirConfig<D: DefaultDir> {
    pub dir: PathBuf,
    #[serde(skip)]
    _kind: std::marker::PhantomData<D>,
}

impl<D: DefaultDir> Default for DirConfig<D> {
    fn default() -> Self {
        Self {
            dir: PathBuf::from(D::DIR),
            _kind: std::marker::PhantomData,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Smtp,
    File,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MailConfig {
    pub from: String,
    /// `smtp` or `file`; when absent: `smtp` if `smtp_url` is set, else `file`.
    pub transport: Option<Transport>,
    /// lettre's URL form: `smtp://user:pass@host:port?tls=required`, `smtps://host`.
    pub smtp_url: Option<Secret>,
    /// PEM file of CA certificates trusted for SMTP TLS in addition to the
    /// public roots (a private CA of an internal relay). Default: none.
    pub tls_ca_file: Option<PathBuf>,
    /// Where the file transport writes `.eml` files.
    pub outbox_dir: PathBuf,
    /// Provider limit in messages per second; 0 means unlimited.
    #[serde(deserialize_with = "number")]
    pub rate_per_second: u32,
    /// Address for `List-Unsubscribe: <mailto:…>`; default `unsubscribe@<from domain>`.
    pub unsubscribe_mailto: Option<String>,
}

impl Default for MailConfig {
    fn default() -> Self {
        Self {
            from: "Engaged <hello@engaged.example>".into(),
            transport: None,
            smtp_url: None,
            tls_ca_file: None,
            outbox_dir: PathBuf::from("outbox"),
            rate_per_second: 0,
            unsubscribe_mailto: None,
        }
    }
}

impl MailConfig {
    pub fn effective_transport(&self) -> Transport {
        self.transport.unwrap_or(if self.smtp_url.is_some() {
            Transport::Smtp
        } else {
            Transport::File
        })
    }
}

/// How delivery retries and how many sends run at once.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Concurrent SMTP connections / webhook requests.
    #[serde(deserialize_with = "number")]
    pub concurrency: usize,
    /// Attempts before an action is given up as dead.
    #[serde(deserialize_with = "number")]
    pub max_attempts: u32,
    /// First retry delay in milliseconds; doubles each attempt (with jitter).
    #[serde(deserialize_with = "number")]
    pub retry_base_ms: u64,
    /// Longest retry delay in milliseconds.
    #[serde(deserialize_with = "number")]
    pub retry_max_ms: u64,
    /// How long `engaged run` keeps retrying transient failures before leaving
    /// them pending for the next run or the daemon, in milliseconds.
    #[serde(deserialize_with = "number")]
    pub run_retry_window_ms: u64,
    /// SMTP command timeout in milliseconds.
    #[serde(deserialize_with = "number")]
    pub timeout_ms: u64,
    /// `engaged serve`: how long shutdown waits for sends in flight.
    #[serde(deserialize_with = "number")]
    pub shutdown_grace_ms: u64,
    /// How long a claimed action stays reserved for the process that claimed
    /// it; if that process dies, another delivers the action after this.
    #[serde(deserialize_with = "number")]
    pub lease_ms: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            concurrency: 4,
            max_attempts: 8,
            retry_base_ms: 30_000,
            retry_max_ms: 6 * 3600 * 1000,
            run_retry_window_ms: 60_000,
            timeout_ms: 30_000,
            shutdown_grace_ms: 10_000,
            lease_ms: 120_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EscalationConfig {
    /// Owner for customers that have none (and overflow from capped owners).
    pub default_owner: String,
    /// Re-notify an open escalation nobody acknowledged after this many days
    /// (0 = never).
    #[serde(deserialize_with = "number")]
    pub renotify_days: u32,
    /// Send re-notifications here instead of to the owner.
    pub lead: Option<String>,
    /// At most this many new escalations per owner per day; the rest go to
    /// `default_owner` (0 = no cap).
    #[serde(deserialize_with = "number")]
    pub owner_daily_cap: u32,
}

impl Default for EscalationConfig {
    fn default() -> Self {
        Self {
            default_owner: "success@engaged.example".into(),
            renotify_days: 0,
            lead: None,
            owner_daily_cap: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: String,
    /// Base of links in emails; default `http://{listen}`.
    pub public_url: Option<String>,
    pub write_key: Option<Secret>,
    pub admin_token: Option<Secret>,
    /// HMAC key for unsubscribe links; when absent a random one is generated
    /// once and kept in the database so links stay valid across restarts.
    pub signing_secret: Option<Secret>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            public_url: None,
            write_key: None,
            admin_token: None,
            signing_secret: None,
        }
    }
}

impl HttpConfig {
    pub fn public_base(&self) -> String {
        let base = self
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.listen));
        base.trim_end_matches('/').to_owned()
    }
}

/// `[webhooks.NAME]`: where `webhook(NAME, payload)` posts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: Secret,
    /// Extra request headers, e.g. an Authorization token.
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
}

/// `[[schedules]]` (used by `engaged serve`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    pub name: String,
    /// 5 fields, or 6 with seconds first.
    pub cron: String,
    /// IANA name; fire times follow this zone's wall clock across DST changes.
    #[serde(default = "utc")]
    pub timezone: String,
    /// Optional subset of rule ids; default all rules.
    #[serde(default)]
    pub rules: Option<Vec<String>>,
    /// What to do about a firing missed while the daemon was down.
    #[serde(default)]
    pub missed: MissedPolicy,
    /// `catch_up` only runs a missed firing this recent (minutes).
    #[serde(default = "default_grace_minutes", deserialize_with = "number")]
    pub grace_minutes: u32,
    /// Which customers a firing evaluates: `"all"` (the default), or
    /// `"changed"`: only those whose data changed (an event, an identify,
    /// an import) since this schedule's last run that finished planning.
    #[serde(default)]
    pub customers: CustomerScope,
}

/// Which customers a schedule's runs evaluate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CustomerScope {
    /// Every customer (the nightly run).
    #[default]
    All,
    /// Only customers whose data changed since the schedule's last run.
    Changed,
}

/// Policy for firings missed while the daemon was down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissedPolicy {
    /// Run once at start (within `grace_minutes`), then resume the schedule.
    #[default]
    CatchUp,
    /// Record the missed firing as skipped and wait for the next one.
    Skip,
}

fn utc() -> String {
    "UTC".into()
}

fn default_grace_minutes() -> u32 {
    12 * 60
}

/// `[log]`: how `engaged serve` logs (to stdout).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `human` or `json`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `engaged=debug`; `ENGAGED_LOG` wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

/// A string that is never printed: `Debug` shows `"***"`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// A config that cannot be used. No variant's text holds a secret value:
/// see [`is_secret`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A problem with the settings as a whole (found after parsing).
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    /// A problem at a place in the file: `FILE:LINE:COL: message`, then the
    /// line as `shown`, with secret values replaced by `***`.
    #[error("{}", .at.pretty_with_line(.shown))]
    At { at: Diagnostic, shown: String },
    /// A problem with an `ENGAGED_*` override.
    #[error("environment variable {variable}: {message}")]
    Env { variable: String, message: String },
}

impl Config {
    /// Loads `path` if it exists (a missing default file is fine; a missing
    /// explicitly named file is an error), then applies `ENGAGED_*` overrides.
    pub fn load(path: &Path, explicit: bool) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => String::new(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Self::from_toml_with_env(&text, std::env::vars(), path)
    }

    /// Parses TOML text, then applies `ENGAGED_SECTION__KEY=value` overrides
    /// taken from `env`.
    pub fn from_toml_with_env(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
        path: &Path,
    ) -> Result<Self, ConfigError> {
        use std::borrow::Cow;
        use toml::Spanned;
        use toml::de::{DeTable, DeValue};

        let mut root =
            DeTable::parse(text).map_err(|e| located(path, text, e.span(), e.message(), false))?;
        // Values from the environment get spans past the end of the text,
        // one per variable, so an error about one names the variable.
        let mut overrides: Vec<(String, String)> = Vec::new();
        for (key, value) in env {
            let Some(rest) = key.strip_prefix("ENGAGED_") else {
                continue;
            };
            // ENGAGED_HTTP__WRITE_KEY → http.write_key;
            // ENGAGED_WEBHOOKS__CRM__URL → webhooks.crm.url.
            let parts: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            if parts.len() < 2 || parts.iter().any(String::is_empty) {
                continue;
            }
            let at = text.len() + 1 + overrides.len();
            let span = at..at + 1;
            overrides.push((key.clone(), parts.join(".")));
            let mut t = root.get_mut();
            for part in &parts[..parts.len() - 1] {
                let entry = t
                    .entry(Spanned::new(span.clone(), Cow::Owned(part.clone())))
                    .or_insert_with(|| Spanned::new(span.clone(), DeValue::Table(DeTable::new())));
                let DeValue::Table(inner) = entry.get_mut() else {
                    return Err(ConfigError::Env {
                        variable: key,
                        message: format!("it overrides {part:?}, which is not a table"),
                    });
                };
                t = inner;
            }
            // Values stay strings (a digits-only secret must stay a secret);
            // numeric settings accept strings.
            t.insert(
                Spanned::new(span.clone(), Cow::Owned(parts[parts.len() - 1].clone())),
                Spanned::new(span, DeValue::String(Cow::Owned(value))),
            );
        }
        let config =
            Config::deserialize(toml::de::Deserializer::from(root)).map_err(|e| {
                match e.span() {
                    Some(span) if span.start > text.len() => {
                        let (variable, key) = &overrides[span.start - text.len() - 1];
                        let message = if is_secret(key) {
                            scrub(e.message(), None)
                        } else {
                            e.message().to_owned()
                        };
                        ConfigError::Env {
                            variable: variable.clone(),
                            message: format!("{key}: {message}"),
                        }
                    }
                    span => located(path, text, span, e.message(), true),
                }
            })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        self.mail
            .from
            .parse::<lettre::message::Mailbox>()
            .map_err(|e| format!("mail.from {:?} is not a valid mailbox: {e}", self.mail.from))?;
        crate::domain::Email::parse(&self.escalation.default_owner)
            .map_err(|e| format!("escalation.default_owner: {e}"))?;
        if let Some(lead) = &self.escalation.lead {
            crate::domain::Email::parse(lead).map_err(|e| format!("escalation.lead: {e}"))?;
        }
        if self.mail.effective_transport() == Transport::Smtp && self.mail.smtp_url.is_none() {
            return Err("mail.transport is \"smtp\" but mail.smtp_url is not set".into());
        }
        if self.delivery.concurrency == 0 {
            return Err("delivery.concurrency must be at least 1".into());
        }
        if self.delivery.lease_ms <= 2 * self.delivery.timeout_ms {
            return Err(format!(
                "delivery.lease_ms ({}) must be more than twice delivery.timeout_ms ({}): a send (connect + transfer) must fit in a claim",
                self.delivery.lease_ms, self.delivery.timeout_ms
            ));
        }
        self.policy.window()?;
        self.policy.default_tz()?;
        if let Some(cap) = self.policy.frequency_cap
            && (cap.emails == 0 || cap.days == 0)
        {
            return Err("policy.frequency_cap needs emails >= 1 and days >= 1".into());
        }
        if !(0.0..=1.0).contains(&self.guard.max_share) {
            return Err("guard.max_share is a share between 0 and 1".into());
        }
        for s in &self.schedules {
            crate::schedule::Schedule::parse(s)?;
        }
        if self.delivery.max_attempts == 0 {
            return Err("delivery.max_attempts must be at least 1".into());
        }
        Ok(())
    }
}

/// Settings whose values are secret. Everything under `[webhooks.*]` is
/// too: URLs carry tokens and headers carry credentials. A database URL may
/// hold a password.
const SECRET_KEYS: [&str; 5] = [
    "http.write_key",
    "http.admin_token",
    "http.signing_secret",
    "mail.smtp_url",
    "database.url",
];

/// Whether the value at a dotted `path` is or may hold a secret: a secret
/// key, anything under `webhooks`, or a table that holds a secret key
/// (`http = { admin_token = "…" }`).
fn is_secret(path: &str) -> bool {
    path == "webhooks"
        || path.starts_with("webhooks.")
        || SECRET_KEYS.iter().any(|k| {
            *k == path
                || k.strip_prefix(path)
                    .is_some_and(|rest| !path.is_empty() && rest.starts_with('.'))
        })
}

/// A `key = value` statement (or a `[table]` header, with an empty value)
/// as the TOML lexer sees it, found even in a file that does not parse, so
/// that secret values can be masked in the line an error shows.
#[derive(Debug)]
struct Statement {
    /// Dotted, with the table: `http.admin_token`, `webhooks.crm.headers`.
    path: String,
    key: std::ops::Range<usize>,
    /// The value, across lines for multi-line strings, arrays and inline
    /// tables; for a line without `=`, everything after its first word.
    value: std::ops::Range<usize>,
}

fn statements(text: &str) -> Vec<Statement> {
    use toml_parser::lexer::{Token, TokenKind as K};
    let tokens = toml_parser::Source::new(text).lex().into_vec();
    let key_part = |t: &Token| {
        let raw = text.get(t.span().start()..t.span().end())?;
        match t.kind() {
            K::Atom => Some(raw.to_owned()),
            K::BasicString | K::LiteralString => Some(raw.trim_matches(['"', '\'']).to_owned()),
            _ => None,
        }
    };
    let ends_line = |t: &Token| matches!(t.kind(), K::Newline | K::Eof);
    let mut table: Vec<String> = Vec::new();
    let mut out = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let t = tokens[i];
        match t.kind() {
            K::Whitespace | K::Newline | K::Comment => {
                i += 1;
                continue;
            }
            K::Eof => break,
            // `[a.b]` or `[[a]]`
            K::LeftSquareBracket => {
                table.clear();
                let mut end = t.span().end();
                while i < tokens.len() && !ends_line(&tokens[i]) {
                    table.extend(key_part(&tokens[i]));
                    end = tokens[i].span().end();
                    i += 1;
                }
                // Errors about a whole table (a missing key) point here.
                out.push(Statement {
                    path: table.join("."),
                    key: t.span().start()..end,
                    value: end..end,
                });
                continue;
            }
            _ => {}
        }
        let first = i;
        let mut path = table.clone();
        while i < tokens.len() && !ends_line(&tokens[i]) && tokens[i].kind() != K::Equals {
            path.extend(key_part(&tokens[i]));
            i += 1;
        }
        let key_start = t.span().start();
        if i < tokens.len() && tokens[i].kind() == K::Equals {
            let key_end = tokens[i].span().start();
            i += 1;
            let mut depth = 0usize;
            let mut value: Option<std::ops::Range<usize>> = None;
            while i < tokens.len() {
                let v = tokens[i];
                match v.kind() {
                    K::Eof => break,
                    K::Newline if depth == 0 => break,
                    K::LeftSquareBracket | K::LeftCurlyBracket => depth += 1,
                    K::RightSquareBracket | K::RightCurlyBracket => depth = depth.saturating_sub(1),
                    _ => {}
                }
                if !matches!(v.kind(), K::Whitespace | K::Newline | K::Comment) {
                    let start = value.map_or(v.span().start(), |r| r.start);
                    value = Some(start..v.span().end());
                }
                i += 1;
            }
            out.push(Statement {
                path: path.join("."),
                key: key_start..key_end,
                value: value.unwrap_or(key_end..key_end),
            });
        } else {
            let key_end = t.span().end();
            let rest = &tokens[first + 1..i];
            let value_start = rest
                .iter()
                .find(|t| t.kind() != K::Whitespace)
                .map_or(key_end, |t| t.span().start());
            let line_end = rest.last().map_or(key_end, |t| t.span().end());
            path.truncate(table.len() + 1);
            out.push(Statement {
                path: path.join("."),
                key: key_start..key_end,
                value: value_start..line_end,
            });
        }
    }
    out
}

/// An error at `span` of the file, as `FILE:LINE:COL: key: message` and
/// the line, with every secret value in it shown as `***`; an unknown
/// key's value is masked too (it may be a misspelled secret). toml prints
/// the raw source line (`N | line` under `TOML parse error at line N,
/// column C`), so its `Display` is never used. Syntax errors' messages are
/// the parser's fixed descriptions; messages `about_values` (serde's, from
/// deserializing) quote the value, and for a secret that part is cut.
fn located(
    path: &Path,
    text: &str,
    span: Option<std::ops::Range<usize>>,
    message: &str,
    about_values: bool,
) -> ConfigError {
    let Some(span) = span else {
        // No place: cannot tell whose value the message quotes.
        return ConfigError::Invalid {
            path: path.to_owned(),
            message: scrub(message, None),
        };
    };
    let mut at = span.start.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let statements = statements(text);
    let statement = statements
        .iter()
        .rfind(|s| s.key.start <= at && at <= s.value.end.max(s.key.end));
    let about_key = ["unknown field", "missing field", "duplicate"]
        .iter()
        .any(|p| message.starts_with(p));
    let mut hidden: Vec<std::ops::Range<usize>> = statements
        .iter()
        .filter(|s| is_secret(&s.path))
        .map(|s| s.value.clone())
        .collect();
    let mut message = message.to_owned();
    if let Some(s) = statement {
        if message.starts_with("unknown field") {
            hidden.push(s.value.clone());
        }
        if about_values && is_secret(&s.path) && !about_key {
            message = scrub(&message, text.get(s.value.clone()));
        }
        message = format!("{}: {message}", s.path);
    }
    let (line, shown, col) = masked_line(text, at, &hidden);
    ConfigError::At {
        at: Diagnostic {
            path: path.to_owned(),
            line,
            col,
            message,
        },
        shown,
    }
}

/// The line of `text` that holds byte `at`: its number, the line with the
/// bytes in `hidden` shown as `***`, and the column of `at` in it.
fn masked_line(text: &str, at: usize, hidden: &[std::ops::Range<usize>]) -> (usize, String, usize) {
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    let number = text[..start].matches('\n').count() + 1;
    let mut shown = String::new();
    let mut col = None;
    let mut chars = 0;
    let mut mask_col = None;
    for (i, c) in text[start..end].char_indices() {
        let i = start + i;
        if hidden.iter().any(|r| r.contains(&i)) {
            let here = *mask_col.get_or_insert_with(|| {
                shown.push_str("***");
                chars += 3;
                chars - 2
            });
            if i >= at {
                col.get_or_insert(here);
            }
            continue;
        }
        mask_col = None;
        if i >= at {
            col.get_or_insert(chars + 1);
        }
        shown.push(c);
        chars += 1;
    }
    let shown = shown.trim_end_matches('\r').to_owned();
    (number, shown, col.unwrap_or(chars + 1))
}

/// A serde message about a secret's value without the value: quoted or
/// back-ticked parts (`invalid type: integer `123`, expected a string`)
/// are cut, and so is any other appearance of the value's text.
fn scrub(message: &str, value: Option<&str>) -> String {
    let mut out = String::new();
    let mut chars = message.chars();
    while let Some(c) = chars.next() {
        if c != '`' && c != '"' {
            out.push(c);
            continue;
        }
        // Cut up to the closing quote (to the end if there is none); serde
        // writes strings with Debug escapes, so `\"` does not close one.
        out.truncate(out.trim_end().len());
        while let Some(d) = chars.next() {
            if d == '\\' && c == '"' {
                chars.next();
            } else if d == c {
                break;
            }
        }
    }
    if let Some(value) = value.map(|v| v.trim().trim_matches(['"', '\'']))
        && value.len() >= 4
    {
        out = out.replace(value, "***");
    }
    out
}

/// Numbers in the config may also be strings (as environment overrides
/// always are): `ENGAGED_MAIL__RATE_PER_SECOND=5`.
fn number<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr + TryFrom<u64>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Text(String),
    }
    let bad = || serde::de::Error::custom("expected a non-negative whole number");
    match Raw::deserialize(d)? {
        Raw::Int(i) => T::try_from(i).map_err(|_| bad()),
        Raw::Text(s) => s.trim().parse().map_err(|_| bad()),
    }
}

/// A URL with its password replaced by `***`, for messages. A URL too
/// broken to parse (a bad port, say) still has `user:password@` masked.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(_) => raw.to_owned(),
        Err(_) => {
            let Some((scheme, rest)) = raw.split_once("://") else {
                return raw.to_owned();
            };
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let (authority, tail) = rest.split_at(authority_end);
            match authority.rsplit_once('@') {
                Some((userinfo, host)) if userinfo.contains(':') => {
                    let user = userinfo.split(':').next().unwrap_or_default();
                    format!("{scheme}://{user}:***@{host}{tail}")
                }
                _ => raw.to_owned(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_toml_with_env(
            text,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
            Path::new("engaged.toml"),
        )
    }

    #[test]
    fn passwords_are_redacted_even_in_urls_that_do_not_parse() {
        assert_eq!(
            redact_url("postgres://u:pw@db.example:5432/x"),
            "postgres://u:***@db.example:5432/x"
        );
        assert_eq!(
            redact_url("postgres://u:p@w@db.example:nope/x?sslmode=require"),
            "postgres://u:***@db.example:nope/x?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://u@db:nope/x"),
            "postgres://u@db:nope/x"
        );
        assert_eq!(redact_url("sqlite://engaged.db"), "sqlite://engaged.db");
    }

    #[test]
    fn an_empty_file_gives_working_defaults() {
        let c = parse("", &[]).unwrap();
        assert_eq!(c.database.url, "sqlite://engaged.db");
        assert_eq!(c.rules.dir, PathBuf::from("rules"));
        assert_eq!(c.templates.dir, PathBuf::from("templates"));
        assert_eq!(c.mail.effective_transport(), Transport::File);
        assert_eq!(c.http.public_base(), "http://127.0.0.1:8080");
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        let err = parse("[mail]\nform = \"x\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("form"), "{err}");
    }

    #[test]
    fn environment_overrides_secrets_and_numbers() {
        let c = parse(
            "[http]\nwrite_key = \"from-file\"\n",
            &[
                ("ENGAGED_HTTP__WRITE_KEY", "from-env"),
                ("ENGAGED_MAIL__RATE_PER_SECOND", "7"),
            ],
        )
        .unwrap();
        assert_eq!(c.http.write_key.as_ref().unwrap().expose(), "from-env");
        assert_eq!(c.mail.rate_per_second, 7);
        assert!(
            !format!("{c:?}").contains("from-env"),
            "secrets are redacted"
        );
    }

    /// The error for `text`, checked to hold no `secret`.
    fn error_without(text: &str, env: &[(&str, &str)], secret: &str) -> String {
        let err = parse(text, env).unwrap_err().to_string();
        assert!(!err.contains(secret), "{secret:?} is shown in:\n{err}");
        err
    }

    #[test]
    fn a_syntax_error_on_a_secret_line_shows_the_line_with_the_value_masked() {
        let err = error_without("[http]\nadmin_token = \"tok-123\n", &[], "tok-123");
        assert!(err.starts_with("engaged.toml:2:"), "{err}");
        assert!(
            err.contains("http.admin_token: invalid basic string"),
            "{err}"
        );
        assert!(err.contains(" 2 | admin_token = ***"), "{err}");
        let err = error_without("[http]\nwrite_key \"key-123\"\n", &[], "key-123");
        assert!(err.contains(" 2 | write_key ***"), "{err}");
    }

    #[test]
    fn a_type_error_on_a_secret_does_not_quote_the_value() {
        let err = error_without("[http]\nsigning_secret = 98765\n", &[], "98765");
        assert!(
            err.contains(
                "engaged.toml:2:18: http.signing_secret: invalid type: integer, expected a string"
            ),
            "{err}"
        );
        // A non-secret's value stays in the message.
        let err = parse("[[schedules]]\nname = \"n\"\ncron = 5\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("schedules.cron: invalid type: integer `5`"),
            "{err}"
        );
        assert!(err.contains(" 3 | cron = 5"), "{err}");
    }

    #[test]
    fn every_value_under_webhooks_is_masked() {
        let text = "[webhooks.crm]\nurl = \"https://h/tok-1\"\nheaders = { Authorization = \"Bearer tok-2\" \n";
        let err = error_without(text, &[], "tok-2");
        assert!(
            err.contains("webhooks.crm.headers: unclosed inline table"),
            "{err}"
        );
        let text = "[webhooks.crm]\nurl = 7\n";
        let err = error_without(text, &[], "7\n");
        assert!(err.contains(" 2 | url = ***"), "{err}");
    }

    #[test]
    fn an_unknown_keys_value_is_masked_as_it_may_be_a_misspelled_secret() {
        let err = error_without("[http]\nadmin_tokn = \"tok-123\"\n", &[], "tok-123");
        assert!(err.contains("unknown field `admin_tokn`"), "{err}");
        assert!(err.contains(" 2 | admin_tokn = ***"), "{err}");
    }

    #[test]
    fn only_secret_values_are_masked_in_a_line_with_several() {
        let text = "http = { listen = \"x\", admin_token = 5 }\n";
        let err = error_without(text, &[], "= 5");
        assert!(err.contains(" 1 | http = ***"), "{err}");
        let (line, shown, col) =
            masked_line("a = 1, b = 22\n", 11, std::slice::from_ref(&(11..13)));
        assert_eq!((line, shown.as_str(), col), (1, "a = 1, b = ***", 12));
    }

    #[test]
    fn an_override_error_names_the_environment_variable() {
        let err = error_without("", &[("ENGAGED_DELIVERY__CONCURENCY", "3")], "engaged.toml");
        assert!(
            err.starts_with("environment variable ENGAGED_DELIVERY__CONCURENCY: delivery.concurency: unknown field"),
            "{err}"
        );
        let err = error_without("", &[("ENGAGED_WEBHOOKS__CRM", "tok-123")], "tok-123");
        assert!(err.contains("ENGAGED_WEBHOOKS__CRM"), "{err}");
    }

    #[test]
    fn scrubbing_cuts_quoted_parts_and_the_value() {
        assert_eq!(
            scrub("invalid type: integer `123`, expected a string", None),
            "invalid type: integer, expected a string"
        );
        assert_eq!(
            scrub("invalid type: string \"abcd\", expected u32", None),
            "invalid type: string, expected u32"
        );
        assert_eq!(
            scrub(r#"invalid type: string "a\"b`c", expected struct X"#, None),
            "invalid type: string, expected struct X"
        );
        assert_eq!(scrub("cut `to the end", None), "cut");
        assert_eq!(scrub("bad abcdef here", Some("\"abcdef\"")), "bad *** here");
    }

    #[test]
    fn the_readme_example_config_parses() {
        let readme = include_str!("../README.md");
        let start = readme.find("```toml\n").expect("README has a toml example");
        let body = &readme[start + 8..];
        let end = body.find("```").unwrap();
        let c = parse(&body[..end], &[]).unwrap();
        assert_eq!(c.mail.effective_transport(), Transport::Smtp);
        assert_eq!(c.schedules.len(), 2);
        assert_eq!(c.schedules[0].customers, CustomerScope::All);
        assert_eq!(c.schedules[1].customers, CustomerScope::Changed);
    }
}
