//! Delivery: the only code that sends anything. `Deliverer::deliver_one`
//! performs one attempt for one claimed outbox item and returns how it ended;
//! `deliver_pass` claims due items and runs attempts concurrently;
//! `drain` repeats passes while retries are due within a window.
//!
//! Nothing is marked sent before the server accepted it: an item is claimed
//! with a lease, and only the server's acceptance records it as sent.

pub mod message;
pub mod smtp;
mod webhook;

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use lettre::message::Mailbox;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::config::{Config, DeliveryConfig, Transport, WebhookConfig};
use crate::domain::Email;
use crate::library::LibraryHandle;
use crate::metrics::Metrics;
use crate::plan::{EmailPayload, EscalationPayload, OutboxKind, WebhookPayload, short_hash};
use crate::store::{AttemptResult, OutboxItem, Store, StoreError};
use crate::templates::RenderedEmail;
use crate::unsubscribe::Signer;
use tokio_util::sync::CancellationToken;

use message::{Envelope, Unsubscribe};
use smtp::{SendError, SmtpPool, SmtpTarget};

/// Template used for escalation notices to owners.
pub const ESCALATION_TEMPLATE: &str = "escalation";
/// Items claimed at once per unit of concurrency: small claims keep the
/// work a dead process leaves behind (until its lease expires) small.
const CLAIM_PER_WORKER: usize = 32;
/// Longest time a delivery outcome waits to be recorded.
const GROUP_COMMIT: Duration = Duration::from_millis(20);

/// Where email goes.
pub enum MailTransport {
    /// `.eml` files in a directory.
    File(PathBuf),
    Smtp(SmtpPool),
}

/// Counts from delivery passes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DeliveryReport {
    pub sent: usize,
    pub failed: usize,
    pub retrying: usize,
    pub dead: usize,
    pub suppressed: usize,
}

impl DeliveryReport {
    fn add(&mut self, r: &AttemptResult) {
        match r {
            AttemptResult::Sent { .. } => self.sent += 1,
            AttemptResult::Failed { .. } => self.failed += 1,
            AttemptResult::Retry { .. } => self.retrying += 1,
            AttemptResult::Dead { .. } => self.dead += 1,
            AttemptResult::Suppressed { .. } => self.suppressed += 1,
            AttemptResult::Released | AttemptResult::Wait { .. } => {}
        }
    }

    fn merge(&mut self, other: &DeliveryReport) {
        self.sent += other.sent;
        self.failed += other.failed;
        self.dead += other.dead;
        self.suppressed += other.suppressed;
        self.retrying = other.retrying;
    }
}

/// Delivers outbox items.
pub struct Deliverer {
    store: Arc<dyn Store>,
    library: Arc<LibraryHandle>,
    metrics: Option<Arc<Metrics>>,
    /// Set when shutting down: claimed items not yet started are released.
    stopping: CancellationToken,
    transport: MailTransport,
    from: Mailbox,
    from_domain: String,
    public_base: String,
    unsubscribe_mailto: String,
    signer: Signer,
    webhooks: std::collections::BTreeMap<String, WebhookConfig>,
    http: reqwest::Client,
    limiter: Option<DefaultDirectRateLimiter>,
    /// Marketing mail only goes out inside this window (customer's zone).
    window: Option<crate::policy::SendWindow>,
    default_tz: chrono_tz::Tz,
    rate_per_second: u32,
    policy: DeliveryConfig,
}

/// Errors setting up delivery.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Deliverer {
    pub fn new(
        config: &Config,
        store: Arc<dyn Store>,
        library: Arc<LibraryHandle>,
        signer: Signer,
    ) -> Result<Self, DeliverError> {
        let from: Mailbox = config
            .mail
            .from
            .parse()
            .map_err(|e| DeliverError::Config(format!("mail.from: {e}")))?;
        let from_domain = from.email.domain().to_owned();
        let transport = match config.mail.effective_transport() {
            Transport::File => MailTransport::File(config.mail.outbox_dir.clone()),
            Transport::Smtp => {
                let url = config
                    .mail
                    .smtp_url
                    .as_ref()
                    .ok_or_else(|| DeliverError::Config("mail.smtp_url is not set".into()))?;
                let target = SmtpTarget::parse(url.expose()).map_err(DeliverError::Config)?;
                let mut pool = SmtpPool::new(
                    target,
                    Duration::from_millis(config.delivery.timeout_ms),
                    config.delivery.concurrency,
                );
                if let Some(path) = &config.mail.tls_ca_file {
                    pool = pool
                        .with_extra_roots(smtp::load_ca_file(path).map_err(DeliverError::Config)?);
                }
                MailTransport::Smtp(pool)
            }
        };
        let limiter = NonZeroU32::new(config.mail.rate_per_second)
            .map(|r| RateLimiter::direct(Quota::per_second(r).allow_burst(NonZeroU32::MIN)));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.delivery.timeout_ms))
            .build()
            .map_err(|e| DeliverError::Config(format!("HTTP client: {e}")))?;
        Ok(Self {
            store,
            library,
            metrics: None,
            stopping: CancellationToken::new(),
            transport,
            unsubscribe_mailto: config
                .mail
                .unsubscribe_mailto
                .clone()
                .unwrap_or_else(|| format!("unsubscribe@{from_domain}")),
            from,
            from_domain,
            public_base: config.http.public_base(),
            signer,
            webhooks: config.webhooks.clone(),
            http,
            limiter,
            rate_per_second: config.mail.rate_per_second,
            window: config.policy.window().map_err(DeliverError::Config)?,
            default_tz: config.policy.default_tz().map_err(DeliverError::Config)?,
            policy: config.delivery.clone(),
        })
    }

    /// Reports deliveries to these metrics.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Cancelled when shutting down: no new claims; claimed items that have
    /// not started are released for another process.
    pub fn stopping(&self) -> CancellationToken {
        self.stopping.clone()
    }

    /// One pass: claims due items (repeatedly, until none are due) and
    /// delivers them with the configured concurrency.
    pub async fn deliver_pass(&self, now: DateTime<Utc>) -> Result<DeliveryReport, StoreError> {
        let mut report = DeliveryReport::default();
        while !self.stopping.is_cancelled() {
            // A long pass must not shorten later leases: claim as of the real
            // time, or of `now` if the caller's clock is ahead (tests).
            let now = now.max(Utc::now());
            let lease_until = now + chrono::Duration::milliseconds(self.policy.lease_ms as i64);
            let items = self
                .store
                .claim_due(now, lease_until, self.claim_size())
                .await?;
            if items.is_empty() {
                return Ok(report);
            }
            let token = items[0].claim_token.clone();
            // Suppressions are read once per claim, milliseconds before the
            // sends; the per-item work below touches no database connection.
            let suppressed = self.suppressions_for(&items).await?;
            // Claimed items that no attempt has started yet: a shutdown
            // releases them at once, not when the sends ahead of them end.
            let unstarted: std::sync::Mutex<std::collections::HashSet<i64>> =
                std::sync::Mutex::new(items.iter().map(|i| i.id).collect());
            let start = |id: i64| {
                unstarted
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id)
            };
            // Outcomes are recorded as they become known, grouped into one
            // transaction per 20 ms (group commit): a crash loses the record
            // of at most the sends of its last 20 ms, and a fast server is
            // not slowed by a transaction per message.
            let finished = futures::stream::iter(items)
                .map(|item| {
                    let reason = customer_email(&item)
                        .and_then(|e| suppressed.get(&e.to_lowercase()))
                        .map(|r| {
                            format!(
                                "{} is suppressed ({r})",
                                customer_email(&item).unwrap_or_default()
                            )
                        });
                    let start = &start;
                    async move {
                        if !start(item.id) {
                            return None; // released by the shutdown
                        }
                        let result = match reason {
                            Some(reason) => AttemptResult::Suppressed { reason },
                            None => self.attempt(&item, now).await,
                        };
                        let bounced = hard_bounce(&item, &result);
                        Some((item.id, result, bounced))
                    }
                })
                .buffer_unordered(self.policy.concurrency)
                .filter_map(std::future::ready);
            let mut finished = std::pin::pin!(tokio_stream::StreamExt::chunks_timeout(
                finished,
                256,
                GROUP_COMMIT
            ));
            let done = CancellationToken::new();
            let record = async {
                let result = async {
                    while let Some(chunk) = finished.next().await {
                        self.record_chunk(&token, chunk, &mut report).await?;
                    }
                    Ok::<(), StoreError>(())
                }
                .await;
                done.cancel();
                result
            };
            let release = async {
                tokio::select! {
                    _ = self.stopping.cancelled() => {
                        let ids: Vec<i64> = unstarted
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .drain()
                            .collect();
                        if !ids.is_empty() {
                            let results: Vec<(i64, AttemptResult)> =
                                ids.into_iter().map(|id| (id, AttemptResult::Released)).collect();
                            self.store.record_attempts(&token, &results, Utc::now()).await?;
                            tracing::info!(
                                actions = results.len(),
                                "Shutting down: released claimed actions no send had started."
                            );
                        }
                    }
                    _ = done.cancelled() => {}
                }
                Ok::<(), StoreError>(())
            };
            let (recorded, released) = tokio::join!(record, release);
            recorded?;
            released?;
        }
        Ok(report)
    }

    /// Records one group of outcomes; a hard bounce suppresses the address.
    async fn record_chunk(
        &self,
        token: &str,
        chunk: Vec<(i64, AttemptResult, Option<String>)>,
        report: &mut DeliveryReport,
    ) -> Result<(), StoreError> {
        let (results, bounces): (Vec<(i64, AttemptResult)>, Vec<Option<String>>) = chunk
            .into_iter()
            .map(|(id, result, bounced)| ((id, result), bounced))
            .unzip();
        self.store
            .record_attempts(token, &results, Utc::now())
            .await?;
        for (id, result) in &results {
            log_result(*id, result);
            report.add(result);
        }
        // A hard bounce suppresses the address for marketing mail.
        for (email, (_, result)) in bounces.iter().zip(&results) {
            if let (Some(email), AttemptResult::Failed { error }) = (email, result) {
                self.store
                    .suppress(email, &format!("bounced: {error}"), Utc::now())
                    .await?;
                tracing::warn!(email, "Hard bounce; the address is now suppressed.");
            }
        }
        Ok(())
    }

    /// How many items to claim at once: enough to keep every connection
    /// busy, but no more than the rate limit lets us start within half a lease.
    fn claim_size(&self) -> usize {
        let size = self.policy.concurrency * CLAIM_PER_WORKER;
        match self.rate_per_second {
            0 => size,
            rate => size.min(((rate as u64 * self.policy.lease_ms / 2000) as usize).max(1)),
        }
    }

    /// One claimed item: waits for the rate limit, makes sure the claim
    /// still has time for a whole send, delivers, and reports metrics.
    async fn attempt(&self, item: &OutboxItem, now: DateTime<Utc>) -> AttemptResult {
        if self.stopping.is_cancelled() {
            return AttemptResult::Released;
        }
        // The send window is checked when the mail would really go out (an
        // approval, a retry or a late run must not mail at 3 a.m.).
        if item.kind == OutboxKind::Email
            && let Some(window) = self.window
        {
            let tz = item.payload["customer"]["timezone"]
                .as_str()
                .and_then(|t| t.parse().ok())
                .unwrap_or(self.default_tz);
            if let Some(until) = window.next_open(now.max(Utc::now()), tz) {
                return AttemptResult::Wait {
                    until,
                    reason: format!("outside the send window; it opens at {until}"),
                };
            }
        }
        if matches!(item.kind, OutboxKind::Email | OutboxKind::EscalationNotice)
            && let Some(limiter) = &self.limiter
        {
            tokio::select! {
                _ = limiter.until_ready() => {}
                _ = self.stopping.cancelled() => return AttemptResult::Released,
            }
        }
        // A send may take a connect and a transfer, each bounded by the
        // timeout; starting one closer than that to the lease's end could
        // let another worker take the item over mid-send.
        let needed = chrono::Duration::milliseconds(2 * self.policy.timeout_ms as i64);
        if self.stopping.is_cancelled() || Utc::now() + needed > item.lease_until {
            return AttemptResult::Released;
        }
        let started = std::time::Instant::now();
        let result = self.deliver_one(item).await;
        self.observe(item, &result, started.elapsed());
        result
    }

    fn observe(&self, item: &OutboxItem, result: &AttemptResult, took: Duration) {
        let Some(m) = &self.metrics else { return };
        let kind = Metrics::kind(item.kind.as_str());
        match result {
            AttemptResult::Sent { .. } => {
                m.sent.get_or_create(&kind).inc();
                m.delivery_seconds.observe(took.as_secs_f64());
            }
            AttemptResult::Failed { .. } => {
                m.failed.get_or_create(&kind).inc();
            }
            AttemptResult::Dead { .. } => {
                m.dead.get_or_create(&kind).inc();
            }
            AttemptResult::Suppressed { .. } => {
                m.suppressed.get_or_create(&kind).inc();
            }
            AttemptResult::Retry { .. } | AttemptResult::Released | AttemptResult::Wait { .. } => {}
        }
    }

    /// Delivers until nothing is due, waiting for retries that fall due
    /// within `window`; what is still pending after that stays in the outbox.
    pub async fn drain(&self, window: Duration) -> Result<DeliveryReport, StoreError> {
        let deadline = Utc::now() + chrono::Duration::from_std(window).unwrap_or_default();
        let mut total = DeliveryReport::default();
        loop {
            let pass = self.deliver_pass(Utc::now()).await?;
            total.merge(&pass);
            match self.store.next_due_at().await? {
                Some(next) if next <= deadline => {
                    let wait = (next - Utc::now()).to_std().unwrap_or_default();
                    tokio::time::sleep(wait.min(Duration::from_secs(5))).await;
                }
                Some(_) => return Ok(total),
                None => {
                    total.retrying = 0;
                    return Ok(total);
                }
            }
        }
    }

    /// One attempt for one claimed item. Never panics, never returns an error:
    /// every way it can end is an `AttemptResult`.
    pub async fn deliver_one(&self, item: &OutboxItem) -> AttemptResult {
        let outcome = match item.kind {
            OutboxKind::Email => self.send_customer_email(item).await,
            OutboxKind::EscalationNotice => self.send_escalation_notice(item).await,
            OutboxKind::Webhook => self.call_webhook(item).await,
            OutboxKind::Tag => Ok("applied".into()),
        };
        match outcome {
            Ok(detail) => AttemptResult::Sent { detail },
            Err(e) if e.permanent => AttemptResult::Failed { error: e.message },
            Err(e) if item.attempts >= self.policy.max_attempts => AttemptResult::Dead {
                error: format!("{} (gave up after {} attempts)", e.message, item.attempts),
            },
            Err(e) => AttemptResult::Retry {
                error: e.message,
                retry_at: Utc::now() + backoff(&self.policy, item.attempts),
            },
        }
    }

    /// Suppressed addresses among the customer emails of these items.
    async fn suppressions_for(
        &self,
        items: &[OutboxItem],
    ) -> Result<std::collections::HashMap<String, String>, StoreError> {
        let emails: Vec<String> = items
            .iter()
            .filter_map(customer_email)
            .map(str::to_owned)
            .collect();
        if emails.is_empty() {
            return Ok(Default::default());
        }
        self.store.suppressions_among(&emails).await
    }

    fn message_id(&self, item: &OutboxItem) -> String {
        format!(
            "{}.{}@{}",
            short_hash(&item.dedup_key),
            item.id,
            self.from_domain
        )
    }

    async fn send_customer_email(&self, item: &OutboxItem) -> Result<String, SendError> {
        let p: EmailPayload = parse_payload(item)?;
        let to = p
            .customer
            .email
            .clone()
            .ok_or_else(|| permanent("the customer has no email address"))?;
        let token = self.signer.token(p.customer.id.as_str(), to.as_str());
        let unsubscribe_url = format!("{}/unsubscribe/{token}", self.public_base);
        let mut ctx = Map::new();
        for (k, v) in &p.vars {
            ctx.insert(k.clone(), v.clone());
        }
        ctx.insert("customer".into(), customer_context(&p.customer));
        ctx.insert(
            "unsubscribe_url".into(),
            Value::String(unsubscribe_url.clone()),
        );
        let rendered = self.render(&p.template, &Value::Object(ctx))?;
        let envelope = Envelope {
            from: &self.from,
            to: &to,
            to_name: p.customer.name.as_deref(),
            message_id: self.message_id(item),
            unsubscribe: Some(Unsubscribe {
                url: unsubscribe_url,
                mailto: format!(
                    "mailto:{}?subject=unsubscribe%20{token}",
                    self.unsubscribe_mailto
                ),
            }),
        };
        self.send(item, &envelope, &rendered).await
    }

    async fn send_escalation_notice(&self, item: &OutboxItem) -> Result<String, SendError> {
        let p: EscalationPayload = parse_payload(item)?;
        let mut ctx = Map::new();
        ctx.insert("customer".into(), customer_context(&p.customer));
        ctx.insert("reason".into(), Value::String(p.reason.clone()));
        ctx.insert("rule".into(), Value::String(p.rule.clone()));
        ctx.insert("owner".into(), Value::String(p.owner.to_string()));
        ctx.insert("escalation_id".into(), Value::from(p.escalation_id));
        ctx.insert("facts".into(), Value::Object(p.facts.clone()));
        ctx.insert("reminder".into(), Value::from(p.reminder));
        ctx.insert(
            "overflow".into(),
            p.overflow.clone().map_or(Value::Null, Value::String),
        );
        let rendered = self.render(ESCALATION_TEMPLATE, &Value::Object(ctx))?;
        let envelope = Envelope {
            from: &self.from,
            to: &p.owner,
            to_name: None,
            message_id: self.message_id(item),
            unsubscribe: None,
        };
        self.send(item, &envelope, &rendered).await
    }

    fn render(&self, template: &str, ctx: &Value) -> Result<RenderedEmail, SendError> {
        self.library
            .current()
            .templates
            .render(template, ctx)
            // The source line and a caret: this lands in the action's
            // `last_error`, which `explain` shows as the reason.
            .map_err(|e| permanent(&format!("template error: {}", e.pretty())))
    }

    async fn send(
        &self,
        item: &OutboxItem,
        envelope: &Envelope<'_>,
        rendered: &RenderedEmail,
    ) -> Result<String, SendError> {
        let msg = message::build(envelope, rendered).map_err(|e| permanent(&e))?;
        match &self.transport {
            MailTransport::File(dir) => {
                let path = dir.join(format!(
                    "{:06}-{}.eml",
                    item.id,
                    short_hash(&item.dedup_key)
                ));
                write_atomically(&path, &msg.formatted())
                    .await
                    .map_err(|e| SendError {
                        permanent: false,
                        message: format!("cannot write {}: {e}", path.display()),
                    })?;
                Ok(format!("written to {}", path.display()))
            }
            MailTransport::Smtp(pool) => pool.send(msg.envelope(), &msg.formatted()).await,
        }
    }

    async fn call_webhook(&self, item: &OutboxItem) -> Result<String, SendError> {
        let p: WebhookPayload = parse_payload(item)?;
        let hook = self.webhooks.get(&p.name).ok_or_else(|| {
            permanent(&format!(
                "no webhook named {:?} in [webhooks] of the config",
                p.name
            ))
        })?;
        webhook::post(&self.http, hook, item, &p).await
    }
}

/// The address to suppress when a customer email was refused because the
/// mailbox does not exist (550 / 551 / 553, or an enhanced 5.1.x status).
fn hard_bounce(item: &OutboxItem, result: &AttemptResult) -> Option<String> {
    let AttemptResult::Failed { error } = result else {
        return None;
    };
    let code = error
        .split(|c: char| !c.is_ascii_digit() && c != '.')
        .find(|w| w.len() == 3 && w.starts_with('5'));
    let mailbox = matches!(code, Some("550" | "551" | "553")) || error.contains(" 5.1.");
    if mailbox {
        customer_email(item).map(str::to_owned)
    } else {
        None
    }
}

/// The customer address of a marketing email (suppression applies to these only).
fn customer_email(item: &OutboxItem) -> Option<&str> {
    match item.kind {
        OutboxKind::Email => item.payload["customer"]["email"].as_str(),
        _ => None,
    }
}

fn parse_payload<T: serde::de::DeserializeOwned>(item: &OutboxItem) -> Result<T, SendError> {
    serde_json::from_value(item.payload.clone())
        .map_err(|e| permanent(&format!("unreadable outbox payload: {e}")))
}

fn permanent(message: &str) -> SendError {
    SendError {
        permanent: true,
        message: message.to_owned(),
    }
}

/// The `customer` object templates see: the stored fields, `first_name`,
/// and RFC 3339 times.
pub fn customer_context(c: &crate::domain::Customer) -> Value {
    let mut v = serde_json::to_value(c).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        let first = c
            .name
            .as_deref()
            .and_then(|n| n.split_whitespace().next())
            .map(str::to_owned);
        m.insert(
            "first_name".into(),
            first.map_or(Value::Null, Value::String),
        );
        m.insert(
            "email".into(),
            c.email
                .as_ref()
                .map_or(Value::Null, |e: &Email| Value::String(e.to_string())),
        );
    }
    v
}

/// Exponential backoff with ±20 % jitter: base · 2^(attempt−1), capped.
pub fn backoff(policy: &DeliveryConfig, attempt: u32) -> chrono::Duration {
    use rand::Rng;
    let exp = policy
        .retry_base_ms
        .saturating_mul(1u64 << attempt.saturating_sub(1).min(30))
        .min(policy.retry_max_ms);
    let jitter = rand::rng().random_range(0.8..1.2);
    chrono::Duration::milliseconds((exp as f64 * jitter) as i64)
}

async fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    let tmp = path.with_extension("eml.tmp");
    tokio::fs::write(&tmp, bytes).await?;
    tokio::fs::rename(&tmp, path).await
}

fn log_result(id: i64, r: &AttemptResult) {
    match r {
        AttemptResult::Sent { .. } => tracing::debug!(action = id, "Delivered."),
        AttemptResult::Retry { error, retry_at } => {
            tracing::warn!(action = id, %retry_at, "Delivery failed for now and will be retried: {error}")
        }
        AttemptResult::Failed { error } => {
            // A template error's first line is `FILE:LINE:COL: message`; the
            // source line and caret under it stay in `last_error` (explain),
            // out of one-line logs.
            let error = error.lines().next().unwrap_or_default();
            tracing::warn!(action = id, "Delivery failed permanently: {error}")
        }
        AttemptResult::Dead { error } => tracing::error!(action = id, "Delivery gave up: {error}"),
        AttemptResult::Suppressed { reason } => tracing::info!(action = id, "Not sent: {reason}"),
        AttemptResult::Released => tracing::info!(action = id, "Released for another worker."),
        AttemptResult::Wait { reason, .. } => tracing::info!(action = id, "Not sent yet: {reason}"),
    }
}
