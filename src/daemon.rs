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
use crate::heartbeat::{Heartbeat, Notice};
use crate::library::{Library, LibraryHandle, fingerprint};
use crate::metrics::Metrics;
use crate::pipeline::{self, RunError, RunOptions, RunSummary};
use crate::schedule::{Schedule, decide};
use crate::store::{Firing, Store};
use crate::unsubscribe::{Signer, random_secret};

/// How long a claimed firing stays reserved for the process running it; the
/// lease is renewed every `FIRING_RENEW` while the run goes on, so a holder
/// that died elsewhere is replaced within seconds (on this machine at once,
/// see `liveness`).
const FIRING_LEASE: chrono::Duration = chrono::Duration::seconds(15);
const FIRING_RENEW: Duration = Duration::from_secs(3);
/// Longest idle wait of the worker loops (they also wake on notifications).
const IDLE: Duration = Duration::from_millis(500);
/// How often the watchdog looks at the heartbeat.
const WATCHDOG_EVERY: Duration = Duration::from_secs(1);

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
    running: std::sync::Mutex<Option<Firing>>,
    /// Cancelled at shutdown: a run still evaluating stops at once.
    stop_runs: tokio_util::sync::CancellationToken,
    /// Ticks take turns (the cron heartbeat and the watchdog may both try).
    ticking: tokio::sync::Mutex<()>,
    heartbeat: Arc<Heartbeat>,
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
            stop_runs: tokio_util::sync::CancellationToken::new(),
            ticking: tokio::sync::Mutex::new(()),
            heartbeat: Arc::new(Heartbeat::new(std::time::Instant::now())),
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
            heartbeat: Some(Arc::clone(&self.heartbeat)),
        }))
    }

    /// One scheduler tick: takes over the leases of processes of this
    /// machine that died, records the firings due now in the ledger (once,
    /// whatever the number of replicas) and wakes the run worker. Returns
    /// how many firings were queued to run. Ticks take turns; a tick that
    /// finds another one going returns 0.
    pub async fn tick(&self) -> Result<usize> {
        let Ok(_turn) = self.ticking.try_lock() else {
            return Ok(0);
        };
        let now = self.clock.now();
        if crate::liveness::reap_dead_holders(&*self.store, now).await? > 0 {
            self.run_requested.notify_one();
            self.delivery_wake.notify_one();
        }
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
        self.heartbeat.ticked(std::time::Instant::now());
        if queued > 0 {
            self.run_requested.notify_one();
        }
        Ok(queued)
    }

    /// A tick from one of the heartbeats; errors are logged.
    async fn beat(&self) {
        if let Err(e) = self.tick().await {
            tracing::error!("Scheduler tick failed: {e:#}");
        }
    }

    /// The watchdog's look at the heartbeat: logs stalls and clock steps,
    /// and starts a tick itself when the cron heartbeat has not ticked for
    /// two seconds (in a task of its own: a tick that hangs must not stop
    /// the watchdog from reporting it).
    fn watch(self: &Arc<Self>) {
        let at = std::time::Instant::now();
        for notice in self.heartbeat.beat(at, chrono::Utc::now()) {
            match notice {
                Notice::Gap(d) => tracing::warn!(
                    seconds = d.as_secs_f64(),
                    "The daemon did not run for {:.1} s (stopped, or the machine was overloaded); catching up.",
                    d.as_secs_f64()
                ),
                Notice::ClockStep(d) => tracing::warn!(
                    seconds = d.num_milliseconds() as f64 / 1000.0,
                    "The wall clock stepped by {:.1} s; fire times are judged by the new time.",
                    d.num_milliseconds() as f64 / 1000.0
                ),
                Notice::Stalled(d) => tracing::error!(
                    seconds = d.as_secs_f64(),
                    "The scheduler has not ticked for {:.0} s; /readyz reports it until it does.",
                    d.as_secs_f64()
                ),
                Notice::Recovered(_) => tracing::info!("The scheduler is ticking again."),
            }
        }
        if self.heartbeat.since_ok(at) >= 2 * WATCHDOG_EVERY {
            let me = Arc::clone(self);
            tokio::spawn(async move { me.beat().await });
        }
    }

    /// One step of the run worker: claims the oldest queued firing (never
    /// two of one schedule at once), evaluates and commits its plan (which
    /// marks the firing done in the same transaction), and wakes delivery.
    /// `None` when nothing is queued.
    pub async fn run_next_firing(&self) -> Result<Option<RunSummary>> {
        let now = self.clock.now();
        let holder = crate::liveness::holder_token();
        let Some(firing) = self
            .store
            .claim_firing(now, now + FIRING_LEASE, &holder)
            .await?
        else {
            return Ok(None);
        };
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) = Some(firing.clone());
        let renewal = {
            let (store, clock, firing) = (
                Arc::clone(&self.store),
                Arc::clone(&self.clock),
                firing.clone(),
            );
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(FIRING_RENEW).await;
                    match store
                        .renew_firing(&firing, clock.now() + FIRING_LEASE)
                        .await
                    {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!(schedule = %firing.schedule, "This run's firing was taken over by another process.");
                            break;
                        }
                        Err(e) => tracing::warn!("Could not renew the firing's lease: {e}"),
                    }
                }
            })
        };
        let result = self.run_firing(&firing).await;
        renewal.abort();
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let (status, note) = match &result {
            Ok(summary) => {
                self.delivery_wake.notify_one();
                if summary.run_id.is_some() {
                    // The commit marked the firing done.
                    return Ok(result.ok());
                }
                ("done", None)
            }
            Err(RunError::Cancelled) => (
                "pending",
                Some("interrupted by a shutdown; queued again".to_owned()),
            ),
            Err(e) => {
                tracing::error!(schedule = %firing.schedule, "Run failed: {e:#}");
                ("failed", Some(format!("{e:#}")))
            }
        };
        self.store
            .finish_firing(&firing, status, None, note.as_deref(), self.clock.now())
            .await?;
        Ok(Some(result?))
    }

    async fn run_firing(&self, firing: &Firing) -> Result<RunSummary, RunError> {
        let library = self.library.current();
        let schedule = self.schedules.iter().find(|s| s.name == firing.schedule);
        let only = schedule.and_then(|s| s.rules.clone());
        let trigger = format!("schedule:{}", firing.schedule);
        // A schedule over what changed starts where its last run's view of
        // the changes ended; its first run covers everyone.
        let changed_since = match schedule.map(|s| s.customers) {
            Some(crate::config::CustomerScope::Changed) => {
                self.store.changes_seen_by_last_run(&trigger).await?
            }
            _ => None,
        };
        let opts = RunOptions {
            now: self.clock.now(),
            dry_run: false,
            trigger,
            retry_window: Duration::ZERO,
            only_rules: only,
            changed_since,
            policy: self.config.policy.clone(),
            guard: self.config.guard.clone(),
            escalation: self.config.escalation.clone(),
            firing: Some(firing.clone()),
            cancel: Some(self.stop_runs.clone()),
            would_limit: None,
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

    /// One step of this replica's share of other processes' runs: plans
    /// partitions of a run still planning, or finishes one whose finisher
    /// died. False when there was nothing to do.
    pub async fn help_with_runs(&self) -> Result<bool> {
        let library = self.library.current();
        let planner = pipeline::Planner {
            store: &self.store,
            rules: &library.rules,
            default_owner: &self.default_owner,
            policy: &self.config.policy,
            guard: &self.config.guard,
            escalation: &self.config.escalation,
            cancel: Some(&self.stop_runs),
        };
        match pipeline::help_with_runs(&planner).await {
            Ok(Some(_)) => {
                self.delivery_wake.notify_one();
                Ok(true)
            }
            Ok(None) | Err(RunError::Cancelled) => Ok(false),
            Err(e) => Err(e.into()),
        }
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

    /// Runs everything until `shutdown` resolves, then stops taking work:
    /// a run still evaluating stops at once and its firing is queued again,
    /// claimed actions not being sent are released at once, and sends in
    /// flight get until `delivery.shutdown_grace_ms` (one deadline for
    /// everything) before the process lets them go.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        let cancel = CancellationToken::new();
        let addr = listener.local_addr()?;
        tracing::info!(%addr, schedules = self.schedules.len(), "engaged is serving.");

        let mut http = {
            let stop = cancel.clone();
            let router = self.router();
            tokio::spawn(async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await
            })
        };

        // The heartbeat: a tokio-cron-scheduler job on a UTC cron that fires
        // every second. Cron jobs compute their next tick from the time they
        // fire, so a stall or a forward clock step does not stop them (its
        // `new_repeated` jobs add the interval to the previous tick and die
        // for good after a stall: tokio-cron-scheduler issue #113), but a
        // backward clock step pauses them for the size of the step. Time
        // zones are never given to it (it freezes them into a fixed offset):
        // each tick decides from the ledger and the clock, DST included.
        let mut heartbeat = tokio_cron_scheduler::JobScheduler::new().await?;
        {
            let me = Arc::clone(&self);
            heartbeat
                .add(tokio_cron_scheduler::Job::new_async(
                    "* * * * * *",
                    move |_, _| {
                        let me = Arc::clone(&me);
                        Box::pin(async move { me.beat().await })
                    },
                )?)
                .await?;
        }
        heartbeat.start().await?;
        // The watchdog runs on tokio's monotonic timer, which neither stalls
        // nor clock steps can derail: it logs them, and ticks itself
        // whenever the cron heartbeat has not ticked for two seconds.
        let watchdog = {
            let me = Arc::clone(&self);
            let stop = cancel.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(WATCHDOG_EVERY);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while !stop.is_cancelled() {
                    tokio::select! {
                        _ = every.tick() => me.watch(),
                        _ = stop.cancelled() => break,
                    }
                }
            })
        };
        // Catch up at start without waiting for the first heartbeat.
        self.beat().await;

        let mut runs = {
            let me = Arc::clone(&self);
            let stop = cancel.clone();
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    // Run queued firings back to back; errors are logged and recorded.
                    if let Ok(Some(_)) = me.run_next_firing().await {
                        continue;
                    }
                    // Then a share of runs begun elsewhere (another replica,
                    // a CLI run, one whose planner died).
                    match me.help_with_runs().await {
                        Ok(true) => continue,
                        Ok(false) => {}
                        Err(e) => tracing::error!("Planning a share of a run failed: {e:#}"),
                    }
                    tokio::select! {
                        _ = me.run_requested.notified() => {}
                        _ = tokio::time::sleep(IDLE) => {}
                        _ = stop.cancelled() => {}
                    }
                }
            })
        };

        let mut delivery = {
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
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(self.config.delivery.shutdown_grace_ms);
        tracing::info!("Shutting down: no new work; finishing sends in flight.");
        cancel.cancel();
        self.stop_runs.cancel();
        self.deliverer.stopping().cancel();
        let _ = tokio::time::timeout_at(deadline, heartbeat.shutdown()).await;
        // One deadline for everything that is still finishing.
        let all = futures::future::join3(&mut delivery, &mut runs, &mut http);
        if tokio::time::timeout_at(deadline, all).await.is_err() {
            tracing::warn!(
                "Work still in flight when the shutdown grace ended was stopped; a restart on this machine takes its claims over at once (elsewhere when their leases end)."
            );
        }
        for task in [&delivery, &runs, &watchdog, &reload] {
            task.abort();
        }
        http.abort();
        let interrupted = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(firing) = interrupted {
            // Before the commit nothing of the run is stored and the firing
            // can run again; a committed firing is done already, and
            // finishing only changes a firing that is still running.
            let requeue = self.store.finish_firing(
                &firing,
                "pending",
                None,
                Some("interrupted by a shutdown; queued again"),
                self.clock.now(),
            );
            match tokio::time::timeout(Duration::from_millis(500), requeue).await {
                Ok(Ok(true)) => tracing::warn!(
                    schedule = %firing.schedule,
                    "A run was still going at shutdown; it was stopped and queued again."
                ),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => tracing::warn!("Could not queue the interrupted run again: {e}"),
                Err(_) => tracing::warn!(
                    "Queueing the interrupted run again timed out; a restart on this machine does it."
                ),
            }
        }
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
