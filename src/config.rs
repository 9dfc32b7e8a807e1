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

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
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
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            invalid(e.to_string().trim_end().replace('\n', "\n  "))
        })?;
        for (key, value) in env {
            let Some(rest) = key.strip_prefix("ENGAGED_") else {
                continue;
            };
            // ENGAGED_HTTP__WRITE_KEY → http.write_key;
            // ENGAGED_WEBHOOKS__CRM__URL → webhooks.crm.url.
            let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            if path.len() < 2 || path.iter().any(String::is_empty) {
                continue;
            }
            let mut t = &mut table;
            for part in &path[..path.len() - 1] {
                let entry = t
                    .entry(part.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                let toml::Value::Table(inner) = entry else {
                    return Err(invalid(format!(
                        "environment variable {key} overrides {part:?}, which is not a table"
                    )));
                };
                t = inner;
            }
            // Values stay strings (a digits-only secret must stay a secret);
            // numeric settings accept strings.
            t.insert(path[path.len() - 1].clone(), toml::Value::String(value));
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| invalid(e.to_string().trim_end().to_owned()))?;
        config.validate().map_err(invalid)?;
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

    #[test]
    fn the_readme_example_config_parses() {
        let readme = include_str!("../README.md");
        let start = readme.find("```toml\n").expect("README has a toml example");
        let body = &readme[start + 8..];
        let end = body.find("```").unwrap();
        let c = parse(&body[..end], &[]).unwrap();
        assert_eq!(c.mail.effective_transport(), Transport::Smtp);
        assert_eq!(c.schedules.len(), 1);
    }
}
