//! `engaged serve`: one process running the scheduler heartbeat, the run
//! worker, the delivery loop, hot reload and the HTTP API, with a clean
//! shutdown. Each part is also a single callable step (`tick`,
//! `run_next_firing`, `deliver_step`, `reload_if_changed`) so tests drive
//! them with an injected clock instead of sleeping.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiState};
use crate::clock::Clock;
use crate::config::Config;
use crate::deliver::{Deliverer, DeliveryReport};
use crate::domain::Email;
use crate::library::{Library, LibraryHandle, fingerprint};
use crate::metrics::Metrics;
use crate::pipeline::{self, RunOptions, RunSummary};
use crate::schedule::{Schedule, decide};
use crate::store::{Firing, Store};
use crate::unsubscribe::{Signer, random_secret};
use std::sync::atomic::{AtomicI64, Ordering};

/// How long a claimed firing stays reserved for the process running it.
const FIRING_LEASE: chrono::Duration = chrono::Duration::minutes(30);
/// Longest idle wait of the worker loops (they also wake on notifications).
const IDLE: Duration = Duration::from_millis(500);

/// The running daemon's parts.
pub struct Daemon {
    config: Config,
    store: Arc<dyn Store>,
    library: Arc<LibraryHandle>,
    deliverer: Arc<Deliverer>,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    schedules: Vec<Schedule>,
    signer: Signer,
    run_requested: Arc<Notify>,
    delivery_wake: Arc<Notify>,
    default_owner: Email,
    /// The firing being run, so a shutdown that interrupts it can queue it
    /// again instead of leaving it leased.
    running: std::sync::Mutex<Option<(Firing, Arc<AtomicI64>)>>,
}

impl Daemon {
    /// Opens the database and loads rules and templates (which must be
    /// valid at start; later broken edits are reported and ignored).
    pub async fn new(config: Config, clock: Arc<dyn Clock>) -> Result<Arc<Self>> {
        let store = crate::store::open(&config.database.url)
            .await
            .context("opening the database")?;
        let library = Library::load(&config).map_err(|errors| {
            anyhow::anyhow!("rules or templates have errors:\n{}", errors.join("\n"))
        })?;
        let library = Arc::new(LibraryHandle::new(library));
        let secret = match &config.http.signing_secret {
            Some(s) => s.expose().to_owned(),
            None => {
                store
                    .setting_or_init("signing_secret", &random_secret())
                    .await?
            }
        };
        let signer = Signer::new(&secret);
        let metrics = Arc::new(Metrics::default());
        let deliverer = Deliverer::new(
            &config,
            Arc::clone(&store),
            Arc::clone(&library),
            signer.clone(),
        )?
        .with_metrics(Arc::clone(&metrics));
        let schedules = config
            .schedules
            .iter()
            .map(Schedule::parse)
            .collect::<Result<Vec<_>, _>>()
            .map_err(anyhow::Error::msg)?;
        let default_owner = Email::parse(&config.escalation.default_owner)?;
        Ok(Arc::new(Self {
            config,
            store,
            library,
            deliverer: Arc::new(deliverer),
            metrics,
            clock,
            schedules,
            signer,
            run_requested: Arc::new(Notify::new()),
            delivery_wake: Arc::new(Notify::new()),
            default_owner,
            running: std::sync::Mutex::new(None),
        }))
    }

    pub fn store(&self) -> Arc<dyn Store> {
        Arc::clone(&self.store)
    }

    /// The HTTP API router.
    pub fn router(&self) -> axum::Router {
        api::router(Arc::new(ApiState {
            store: Arc::clone(&self.store),
            metrics: Arc::clone(&self.metrics),
            signer: self.signer.clone(),
            clock: Arc::clone(&self.clock),
            write_key: self.config.http.write_key.clone(),
            admin_token: self.config.http.admin_token.clone(),
            run_requested: Arc::clone(&self.run_requested),
        }))
    }

    /// One scheduler tick: records the firings due now in the ledger (once,
    /// whatever the number of replicas) and wakes the run worker. Returns
    /// how many firings were queued to run.
    pub async fn tick(&self) -> Result<usize> {
        let now = self.clock.now();
        let mut queued = 0;
        for s in &self.schedules {
            let last = self.store.last_firing(&s.name).await?;
            for entry in decide(s, last, now) {
                let recorded = self
                    .store
                    .record_firing(
                        &s.name,
                        entry.fire_at,
                        entry.status,
                        entry.note.as_deref(),
                        now,
                    )
                    .await?;
                if recorded && entry.status == "pending" {
                    queued += 1;
                    tracing::info!(schedule = %s.name, fire_at = %entry.fire_at, note = entry.note.as_deref().unwrap_or(""), "Schedule fired.");
                } else if recorded {
                    tracing::warn!(schedule = %s.name, fire_at = %entry.fire_at, "Schedule firing skipped: {}", entry.note.as_deref().unwrap_or(""));
                }
            }
        }
        if queued > 0 {
            self.run_requested.notify_one();
        }
        Ok(queued)
    }

    /// One step of the run worker: claims the oldest queued firing (never
    /// two of one schedule at once), evaluates and commits its plan, and
    /// wakes delivery. `None` when nothing is queued.
    pub async fn run_next_firing(&self) -> Result<Option<RunSummary>> {
        let now = self.clock.now();
        let Some(firing) = self.store.claim_firing(now, now + FIRING_LEASE).await? else {
            return Ok(None);
        };
        let committed = Arc::new(AtomicI64::new(0));
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((firing.clone(), Arc::clone(&committed)));
        let result = self.run_firing(&firing, committed).await;
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match result {
            Ok(summary) => {
                self.store
                    .finish_firing(&firing, "done", summary.run_id, None, self.clock.now())
                    .await?;
                self.delivery_wake.notify_one();
                Ok(Some(summary))
            }
            Err(e) => {
                tracing::error!(schedule = %firing.schedule, "Run failed: {e:#}");
                self.store
                    .finish_firing(
                        &firing,
                        "failed",
                        None,
                        Some(&format!("{e:#}")),
                        self.clock.now(),
                    )
                    .await?;
                Err(e)
            }
        }
    }

    async fn run_firing(&self, firing: &Firing, committed: Arc<AtomicI64>) -> Result<RunSummary> {
        let library = self.library.current();
        let only = self
            .schedules
            .iter()
            .find(|s| s.name == firing.schedule)
            .and_then(|s| s.rules.clone());
        let opts = RunOptions {
            now: self.clock.now(),
            dry_run: false,
            trigger: format!("schedule:{}", firing.schedule),
            retry_window: Duration::ZERO,
            only_rules: only,
            policy: self.config.policy.clone(),
            guard: self.config.guard.clone(),
            escalation: self.config.escalation.clone(),
            committed: Some(committed),
        };
        let summary = pipeline::run(
            Arc::clone(&self.store),
            Arc::clone(&library.rules),
            None,
            &self.default_owner,
            &opts,
            None,
        )
        .await?;
        self.metrics.runs.inc();
        self.metrics.evaluations.inc_by(summary.evaluations);
        self.metrics
            .rule_errors
            .inc_by(summary.rules.values().map(|r| r.errors as u64).sum());
        for r in summary.rules.values() {
            for (kind, n) in [
                ("email", r.emails),
                ("escalation", r.escalations),
                ("tag", r.tags),
                ("webhook", r.webhooks),
            ] {
                if n > 0 {
                    self.metrics
                        .planned
                        .get_or_create(&Metrics::kind(kind))
                        .inc_by(n as u64);
                }
            }
        }
        tracing::info!(
            run = summary.run_id,
            schedule = %firing.schedule,
            customers = summary.customers,
            "Run planned."
        );
        Ok(summary)
    }

    /// One delivery pass as of the injected clock.
    pub async fn deliver_step(&self) -> Result<DeliveryReport> {
        Ok(self.deliverer.deliver_pass(self.clock.now()).await?)
    }

    /// Reloads rules and templates when their files changed. A broken edit
    /// is logged with `FILE:LINE:COL` and the last good version stays.
    pub fn reload_if_changed(&self, last: &mut u64) -> bool {
        let dirs = [
            self.config.rules.dir.clone(),
            self.config.templates.dir.clone(),
        ];
        let now = fingerprint(&dirs);
        if now == *last {
            return false;
        }
        *last = now;
        match Library::load(&self.config) {
            Ok(lib) => {
                tracing::info!(
                    rules = lib.rules.rules().len(),
                    "Reloaded rules and templates."
                );
                self.library.replace(lib);
                true
            }
            Err(errors) => {
                for e in errors {
                    tracing::error!("{e}");
                }
                tracing::error!(
                    "The edit has errors; the last good rules and templates keep running."
                );
                false
            }
        }
    }

    /// Runs everything until `shutdown` resolves, then stops taking work,
    /// lets sends in flight finish within `delivery.shutdown_grace_ms`,
    /// releases what was claimed but not started, and returns.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        let cancel = CancellationToken::new();
        let addr = listener.local_addr()?;
        tracing::info!(%addr, schedules = self.schedules.len(), "engaged is serving.");

        let http = {
            let stop = cancel.clone();
            let router = self.router();
            tokio::spawn(async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await
            })
        };

        // The heartbeat: tokio-cron-scheduler fires every second; each firing
        // only calls `tick`, which decides from the ledger and the clock.
        let mut heartbeat = tokio_cron_scheduler::JobScheduler::new().await?;
        {
            let me = Arc::clone(&self);
            heartbeat
                .add(tokio_cron_scheduler::Job::new_repeated_async(
                    Duration::from_secs(1),
                    move |_, _| {
                        let me = Arc::clone(&me);
                        Box::pin(async move {
                            if let Err(e) = me.tick().await {
                                tracing::error!("Scheduler tick failed: {e:#}");
                            }
                        })
                    },
                )?)
                .await?;
        }
        heartbeat.start().await?;
        // Catch up at start without waiting for the first heartbeat.
        if let Err(e) = self.tick().await {
            tracing::error!("Scheduler tick failed: {e:#}");
        }

        let runs = {
            let me = Arc::clone(&self);
            let stop = cancel.clone();
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    // Run queued firings back to back; errors are logged and recorded.
                    if let Ok(Some(_)) = me.run_next_firing().await {
                        continue;
                    }
                    tokio::select! {
                        _ = me.run_requested.notified() => {}
                        _ = tokio::time::sleep(IDLE) => {}
                        _ = stop.cancelled() => {}
                    }
                }
            })
        };

        let delivery = {
            let me = Arc::clone(&self);
            tokio::spawn(async move {
                let stopping = me.deliverer.stopping();
                while !stopping.is_cancelled() {
                    if let Err(e) = me.deliver_step().await {
                        tracing::error!("Delivery pass failed: {e:#}");
                    }
                    let wait = match me.store.next_due_at().await {
                        Ok(Some(next)) => (next - chrono::Utc::now())
                            .to_std()
                            .unwrap_or_default()
                            .clamp(Duration::from_millis(5), IDLE),
                        _ => IDLE,
                    };
                    tokio::select! {
                        _ = me.delivery_wake.notified() => {}
                        _ = tokio::time::sleep(wait) => {}
                        _ = stopping.cancelled() => {}
                    }
                }
            })
        };

        let reload = {
            let me = Arc::clone(&self);
            let stop = cancel.clone();
            tokio::spawn(async move {
                let dirs = [me.config.rules.dir.clone(), me.config.templates.dir.clone()];
                let mut last = fingerprint(&dirs);
                while !stop.is_cancelled() {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.cancelled() => break,
                    }
                    me.reload_if_changed(&mut last);
                }
            })
        };

        shutdown.await;
        tracing::info!("Shutting down: no new work; finishing sends in flight.");
        cancel.cancel();
        self.deliverer.stopping().cancel();
        let _ = heartbeat.shutdown().await;
        let grace = Duration::from_millis(self.config.delivery.shutdown_grace_ms);
        if tokio::time::timeout(grace, delivery).await.is_err() {
            tracing::warn!(
                "Sends still in flight after the grace period; their leases will expire and another process will deliver them."
            );
        }
        let mut runs = runs;
        if tokio::time::timeout(grace, &mut runs).await.is_err() {
            runs.abort();
            let _ = runs.await;
            let interrupted = self
                .running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some((firing, committed)) = interrupted {
                // A plan is committed in one transaction: before it, nothing
                // of the run is stored and the firing can run again; after
                // it, the firing is done (delivery picks up what it planned).
                let run_id = committed.load(Ordering::SeqCst);
                let (status, run_id, note) = if run_id > 0 {
                    (
                        "done",
                        Some(run_id),
                        "stopped by a shutdown after its plan was committed",
                    )
                } else {
                    ("pending", None, "interrupted by a shutdown; queued again")
                };
                tracing::warn!(
                    schedule = %firing.schedule,
                    "A run was still going at shutdown; it was stopped: {note}."
                );
                self.store
                    .finish_firing(&firing, status, run_id, Some(note), self.clock.now())
                    .await?;
            }
        }
        let _ = tokio::time::timeout(grace, http).await;
        reload.abort();
        tracing::info!("Stopped.");
        Ok(())
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
