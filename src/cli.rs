//! The command line: parse arguments, build the parts a command needs,
//! print results. No business logic lives here.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::deliver::Deliverer;
use crate::domain::{CustomerId, Email, parse_timestamp};
use crate::engine::RuleSet;
use crate::facts::Facts;
use crate::ingest::{self, ImportReport};
use crate::library::{Library, LibraryHandle};
use crate::pipeline::{self, RunOptions, RunSummary};
use crate::store::{self, Store};
use crate::templates::Templates;
use crate::unsubscribe::{Signer, random_secret};

#[derive(Debug, Parser)]
#[command(
    name = "engaged",
    version,
    about = "Customer-engagement automation with rules as code"
)]
pub struct Cli {
    /// Configuration file (TOML) [default: engaged.toml, optional]. Without
    /// one, every setting has a working default.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Import customers (CSV) or events (Segment JSON lines).
    Import {
        #[command(subcommand)]
        what: ImportCommand,
    },
    /// Compile every rule and template; report errors as FILE:LINE:COL: message.
    Check,
    /// Run rule fixtures (default: every *.toml in <rules dir>/tests).
    Test {
        /// Fixture files or directories.
        paths: Vec<PathBuf>,
    },
    /// One evaluation pass, then delivery of what it planned.
    Run {
        /// Evaluation time (RFC 3339); default now.
        #[arg(long, value_parser = parse_now)]
        now: Option<DateTime<Utc>>,
        /// Show what would happen; write and send nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
        /// Run as this schedule of engaged.toml fires it: its rules, and
        /// with `customers = "changed"` only the customers changed since its
        /// last run (a dry run evaluates its rules over every customer).
        #[arg(long, value_name = "NAME")]
        schedule: Option<String>,
    },
    /// What a run would do now (no side effects), and with --against, how
    /// another version of the rules would change it.
    Plan {
        #[arg(long, value_parser = parse_now)]
        now: Option<DateTime<Utc>>,
        /// Another rules directory (e.g. a git worktree of main) to compare with.
        #[arg(long)]
        against: Option<PathBuf>,
        /// List the customers whose actions change.
        #[arg(long)]
        customers: bool,
        #[arg(long)]
        json: bool,
    },
    /// The next N days on a virtual clock at the schedules' fire times:
    /// what each customer would receive and which escalations would open.
    /// Writes and sends nothing.
    Simulate {
        /// How many days (1 to 366).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=366))]
        days: u32,
        /// One customer's calendar.
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        customer: Option<String>,
        /// Everyone: per-day totals and escalations per owner.
        #[arg(long)]
        all: bool,
        #[arg(long, value_parser = parse_now)]
        now: Option<DateTime<Utc>>,
        #[arg(long)]
        json: bool,
    },
    /// The daemon: schedules, delivery and the HTTP API.
    Serve,
    /// List escalations, or resolve one.
    Escalations {
        #[arg(long)]
        json: bool,
        /// Include resolved escalations.
        #[arg(long)]
        all: bool,
        #[command(subcommand)]
        action: Option<EscalationCommand>,
    },
    /// List runs (held ones show what waits for approval); approve or reject holds.
    Runs {
        #[arg(long)]
        json: bool,
        /// How many runs to list, newest first.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[command(subcommand)]
        action: Option<RunsCommand>,
    },
    /// Addresses that get no marketing email: list, add, remove, import.
    Suppressions {
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<SuppressionCommand>,
    },
    /// A customer's facts and every rule's outcome for them.
    Explain {
        customer_id: String,
        #[arg(long, value_parser = parse_now)]
        now: Option<DateTime<Utc>>,
        #[arg(long)]
        json: bool,
    },
    /// Generate sample customers and events, import them, run the rules.
    Demo {
        /// How many customers to generate.
        #[arg(long, default_value_t = 300)]
        customers: usize,
        /// Average events per customer.
        #[arg(long, default_value_t = 10)]
        events_per_customer: usize,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Where the generated files go.
        #[arg(long, default_value = "demo-data")]
        dir: PathBuf,
    },
    /// Write sample customers.csv and events.jsonl (for trying things and benchmarks).
    SampleData {
        /// Output directory.
        dir: PathBuf,
        #[arg(long, default_value_t = 300)]
        customers: usize,
        #[arg(long, default_value_t = 10)]
        events_per_customer: usize,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// The generated histories end at this time (RFC 3339); default now.
        #[arg(long, value_parser = parse_now)]
        now: Option<DateTime<Utc>>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImportCommand {
    /// CSV with a header row: id,email,name,created_at,timezone,model,owner (+ traits).
    Customers { file: PathBuf },
    /// One Segment message (identify or track) per line.
    Events { file: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// Release emails the blast-radius guard held (all rules, or one).
    Approve {
        run_id: i64,
        #[arg(long)]
        rule: Option<String>,
    },
    /// Drop held emails for good (recorded as rejected).
    Reject {
        run_id: i64,
        #[arg(long)]
        rule: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SuppressionCommand {
    /// Suppress an address (works before the customer exists).
    Add {
        email: String,
        #[arg(long, default_value = "added by hand")]
        reason: String,
    },
    /// Lift a suppression.
    Remove { email: String },
    /// Suppress every address in a CSV file (column `email`, optional `reason`).
    Import { file: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum EscalationCommand {
    /// Someone is on it: stops reminders.
    Acknowledge { id: i64 },
    /// Mark an open escalation resolved.
    Resolve { id: i64 },
}

fn parse_now(s: &str) -> Result<DateTime<Utc>, String> {
    parse_timestamp(s).map_err(|e| e.to_string())
}

/// Runs the command line; returns the process exit code.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve) {
        init_logging();
    }
    match dispatch(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn serve(config_path: Option<&Path>) -> Result<ExitCode> {
    let config = load_config(config_path)?;
    init_service_logging(&config.log);
    let listener = tokio::net::TcpListener::bind(&config.http.listen)
        .await
        .with_context(|| format!("listening on {} (http.listen)", config.http.listen))?;
    let daemon = crate::daemon::Daemon::new(config, Arc::new(crate::clock::SystemClock)).await?;
    daemon
        .serve(listener, crate::daemon::shutdown_signal())
        .await?;
    Ok(ExitCode::SUCCESS)
}

/// `engaged serve` logs to stdout, human-readable or JSON (`[log]`).
fn init_service_logging(log: &crate::config::LogConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("ENGAGED_LOG")
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    let _ = match log.format {
        crate::config::LogFormat::Json => builder.json().try_init(),
        crate::config::LogFormat::Human => builder.try_init(),
    };
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("ENGAGED_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The parts most commands need.
struct App {
    config: Config,
    store: Arc<dyn Store>,
}

/// Loads the config: an explicitly named file must exist; the default
/// `engaged.toml` is optional.
fn load_config(path: Option<&Path>) -> Result<Config> {
    Ok(match path {
        Some(p) => Config::load(p, true)?,
        None => Config::load(Path::new("engaged.toml"), false)?,
    })
}

impl App {
    /// Like `open`, for commands that must not write: an SQLite database
    /// that does not exist yet is an error instead of being created.
    async fn open_existing(config_path: Option<&Path>) -> Result<Self> {
        let config = load_config(config_path)?;
        if let Some(path) = config
            .database
            .url
            .strip_prefix("sqlite://")
            .or_else(|| config.database.url.strip_prefix("sqlite:"))
            .map(|p| p.split('?').next().unwrap_or(p))
            && !path.is_empty()
            && path != ":memory:"
            && !Path::new(path).exists()
        {
            bail!("there is no database at {path} yet; import customers and events first");
        }
        Self::open(config_path).await
    }

    async fn open(config_path: Option<&Path>) -> Result<Self> {
        let config = load_config(config_path)?;
        let store = store::open(&config.database.url).await.with_context(|| {
            format!(
                "opening the database {}",
                crate::config::redact_url(&config.database.url)
            )
        })?;
        Ok(Self { config, store })
    }

    fn default_owner(&self) -> Result<Email> {
        Ok(Email::parse(&self.config.escalation.default_owner)?)
    }

    /// Templates and rules; errors are printed, and with `strict` they stop the command.
    fn load_rules_and_templates(&self, strict: bool) -> Result<(Arc<RuleSet>, Arc<Templates>)> {
        let (library, errors) = Library::load_lenient(&self.config);
        for e in &errors {
            eprintln!("{e}");
        }
        if strict && !errors.is_empty() {
            bail!(
                "{} rule or template error(s); fix them or run `engaged check`",
                errors.len()
            );
        }
        Ok((library.rules, library.templates))
    }

    async fn signer(&self) -> Result<Signer> {
        let secret = match &self.config.http.signing_secret {
            Some(s) => s.expose().to_owned(),
            None => {
                self.store
                    .setting_or_init("signing_secret", &random_secret())
                    .await?
            }
        };
        Ok(Signer::new(&secret))
    }

    async fn deliverer(&self, library: Arc<LibraryHandle>) -> Result<Deliverer> {
        let signer = self.signer().await?;
        Ok(Deliverer::new(
            &self.config,
            Arc::clone(&self.store),
            library,
            signer,
        )?)
    }
}

async fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Check => check(cli.config.as_deref()),
        Command::Test { paths } => test_fixtures(cli.config.as_deref(), paths),
        Command::Import { what } => {
            let app = App::open(cli.config.as_deref()).await?;
            let bar = import_bar();
            let report = match what {
                ImportCommand::Customers { file } => {
                    ingest::import_customers_with(Arc::clone(&app.store), &file, bar.clone())
                        .await?
                }
                ImportCommand::Events { file } => {
                    ingest::import_events_with(Arc::clone(&app.store), &file, bar.clone()).await?
                }
            };
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            print_import(&report);
            Ok(if report.rejected > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Run {
            now,
            dry_run,
            json,
            schedule,
        } => {
            let app = if dry_run {
                App::open_existing(cli.config.as_deref()).await?
            } else {
                App::open(cli.config.as_deref()).await?
            };
            let scope = match &schedule {
                None => RunScope::all("cli"),
                Some(name) => RunScope::of_schedule(&app, name, dry_run).await?,
            };
            let summary = run(&app, now.unwrap_or_else(Utc::now), dry_run, scope).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                print_summary(&summary);
            }
            Ok(if summary.delivery.failed + summary.delivery.dead > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Serve => serve(cli.config.as_deref()).await,
        Command::Simulate {
            days,
            customer,
            all: _,
            now,
            json,
        } => {
            let app = App::open_existing(cli.config.as_deref()).await?;
            simulate(
                &app,
                days,
                customer.as_deref(),
                now.unwrap_or_else(Utc::now),
                json,
            )
            .await
        }
        Command::Plan {
            now,
            against,
            customers,
            json,
        } => {
            let app = App::open_existing(cli.config.as_deref()).await?;
            plan(
                &app,
                now.unwrap_or_else(Utc::now),
                against.as_deref(),
                customers,
                json,
            )
            .await
        }
        Command::Escalations { json, all, action } => {
            let app = App::open(cli.config.as_deref()).await?;
            match action {
                Some(EscalationCommand::Acknowledge { id }) => {
                    if app.store.acknowledge_escalation(id, Utc::now()).await? {
                        println!("Escalation {id} acknowledged.");
                        Ok(ExitCode::SUCCESS)
                    } else {
                        eprintln!(
                            "error: there is no open, unacknowledged escalation with id {id}"
                        );
                        Ok(ExitCode::from(1))
                    }
                }
                Some(EscalationCommand::Resolve { id }) => {
                    if app.store.resolve_escalation(id, Utc::now()).await? {
                        println!("Escalation {id} resolved.");
                        Ok(ExitCode::SUCCESS)
                    } else {
                        eprintln!("error: there is no open escalation with id {id}");
                        Ok(ExitCode::from(1))
                    }
                }
                None => {
                    let list = app.store.escalations(!all).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&list)?);
                    } else if list.is_empty() {
                        println!("No {}escalations.", if all { "" } else { "open " });
                    } else {
                        println!(
                            "{:>5}  {:<8}  {:<16}  {:<20}  {:<28}  reason",
                            "id", "status", "opened", "customer", "owner"
                        );
                        for e in list {
                            let status = if e.recovered_at.is_some() {
                                format!("{}, recovered", e.status)
                            } else {
                                e.status.clone()
                            };
                            println!(
                                "{:>5}  {:<8}  {:<16}  {:<20}  {:<28}  {} (rule {})",
                                e.id,
                                status,
                                e.created_at.format("%Y-%m-%d %H:%M"),
                                e.customer_id,
                                e.owner,
                                e.reason,
                                e.rule
                            );
                        }
                    }
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
        Command::Runs {
            json,
            limit,
            action,
        } => {
            let app = App::open(cli.config.as_deref()).await?;
            runs(&app, json, limit, action).await
        }
        Command::Suppressions { json, action } => {
            let app = App::open(cli.config.as_deref()).await?;
            suppressions(&app, json, action).await
        }
        Command::Explain {
            customer_id,
            now,
            json,
        } => {
            explain(
                cli.config.as_deref(),
                &customer_id,
                now.unwrap_or_else(Utc::now),
                json,
            )
            .await
        }
        Command::Demo {
            customers,
            events_per_customer,
            seed,
            dir,
        } => {
            demo(
                cli.config.as_deref(),
                customers,
                events_per_customer,
                seed,
                &dir,
            )
            .await
        }
        Command::SampleData {
            dir,
            customers,
            events_per_customer,
            seed,
            now,
        } => {
            let spec = crate::demo_data::SampleSpec {
                customers,
                events_per_customer,
                seed,
                now: now.unwrap_or_else(Utc::now),
            };
            let files = crate::demo_data::write_sample_data(&spec, &dir)
                .with_context(|| format!("writing sample data to {}", dir.display()))?;
            println!(
                "Wrote {} customers to {} and {} events to {}",
                files.customers,
                files.customers_csv.display(),
                files.events,
                files.events_jsonl.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn simulate(
    app: &App,
    days: u32,
    customer: Option<&str>,
    now: DateTime<Utc>,
    json: bool,
) -> Result<ExitCode> {
    let (rules, _) = app.load_rules_and_templates(true)?;
    let id = customer.map(CustomerId::parse).transpose()?;
    if let Some(id) = &id
        && app.store.customer(id).await?.is_none()
    {
        eprintln!("error: no customer with id {id:?}");
        return Ok(ExitCode::from(1));
    }
    let sim =
        crate::simulate::simulate(&*app.store, &app.config, rules, id.as_ref(), now, days).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&sim)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "Simulated {days} days from {} (nothing written or sent):",
        now.format("%Y-%m-%d %H:%M UTC")
    );
    if id.is_some() {
        print_calendar(&sim.happenings);
    } else {
        print_day_totals(&sim);
    }
    if !sim.errors.is_empty() {
        println!(
            "Rule errors ({}; the rule did nothing for that customer that day):",
            sim.errors_total
        );
        for e in sim.errors.iter().take(20) {
            println!(
                "  {}  rule {} for {}: {}",
                e.at.format("%Y-%m-%d %H:%M"),
                e.rule,
                e.customer_id,
                e.message
            );
        }
        if sim.errors_total > 20 {
            println!(
                "  … {} more (--json lists the first {})",
                sim.errors_total - 20,
                crate::simulate::SAMPLE
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One customer's simulated calendar.
fn print_calendar(happenings: &[crate::simulate::Happening]) {
    if happenings.is_empty() {
        println!("  nothing would happen");
    }
    for h in happenings {
        let mut line = format!(
            "  {}  {}  [rule {}]",
            h.at.format("%Y-%m-%d %H:%M"),
            h.what,
            h.rule
        );
        if let Some(owner) = &h.owner {
            line.push_str(&format!(" → {owner}"));
        }
        if let Some(t) = h.goes_out_at {
            line.push_str(&format!(
                " (goes out {} UTC, send window)",
                t.format("%Y-%m-%d %H:%M")
            ));
        }
        if let Some(note) = &h.note {
            line.push_str(&format!(" ({note})"));
        }
        println!("{line}");
    }
}

/// Everyone: per-day totals and escalations per owner (CSM workload).
fn print_day_totals(sim: &crate::simulate::Simulation) {
    println!(
        "  {:<10} {:>7} {:>5} {:>11} {:>5} {:>8}",
        "day", "emails", "held", "escalations", "tags", "webhooks"
    );
    for d in &sim.days {
        println!(
            "  {:<10} {:>7} {:>5} {:>11} {:>5} {:>8}",
            d.day, d.emails, d.held, d.escalations, d.tags, d.webhooks
        );
    }
    if sim.days.iter().any(|d| d.held > 0) {
        println!("  (held: the blast-radius guard would hold them until approved)");
    }
    println!("Escalations per owner (CSM workload):");
    if sim.owners.is_empty() {
        println!("  none");
    }
    for (owner, n) in &sim.owners {
        println!("  {owner:<32} {n}");
    }
}

/// A dry run's action list with the given rules.
async fn would_do(
    app: &App,
    rules: Arc<RuleSet>,
    now: DateTime<Utc>,
) -> Result<Vec<crate::pipeline::WouldDo>> {
    let opts = RunOptions {
        now,
        dry_run: true,
        trigger: "plan".into(),
        retry_window: Duration::ZERO,
        only_rules: None,
        changed_since: None,
        policy: app.config.policy.clone(),
        guard: app.config.guard.clone(),
        escalation: app.config.escalation.clone(),
        firing: None,
        cancel: None,
        would_limit: None,
    };
    let summary = pipeline::run(
        Arc::clone(&app.store),
        rules,
        None,
        &app.default_owner()?,
        &opts,
        None,
    )
    .await?;
    Ok(summary.would)
}

async fn plan(
    app: &App,
    now: DateTime<Utc>,
    against: Option<&Path>,
    list_customers: bool,
    json: bool,
) -> Result<ExitCode> {
    let (rules, _) = app.load_rules_and_templates(true)?;
    let current = would_do(app, rules, now).await?;
    let plans = crate::compare::per_rule(&current);
    let diff = match against {
        None => None,
        Some(dir) => {
            let mut other = app.config.clone();
            other.rules.dir = dir.to_owned();
            let (library, errors) = Library::load_lenient(&other);
            if !errors.is_empty() {
                for e in &errors {
                    eprintln!("{e}");
                }
                bail!("the rules in {} have errors", dir.display());
            }
            let theirs = would_do(app, library.rules, now).await?;
            Some(crate::compare::diff(&current, &theirs))
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "now": now, "rules": plans, "against": diff,
            }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "A run at {} would newly do (nothing is written or sent):",
        now.to_rfc3339()
    );
    println!(
        "{:<24} {:>7} {:>11} {:>5} {:>8}  for example",
        "rule", "emails", "escalations", "tags", "webhooks"
    );
    for (rule, p) in &plans {
        println!(
            "{:<24} {:>7} {:>11} {:>5} {:>8}  {}",
            rule,
            p.counts.emails,
            p.counts.escalations,
            p.counts.tags,
            p.counts.webhooks,
            p.sample.join(", ")
        );
    }
    if let (Some(d), Some(dir)) = (&diff, against) {
        println!(
            "\nWith the rules in {}: {}",
            dir.display(),
            crate::compare::headline(d)
        );
        if list_customers {
            for (customer, change) in &d.customers {
                println!("  {customer}");
                for a in &change.added {
                    println!("    + {a}");
                }
                for r in &change.removed {
                    println!("    - {r}");
                }
            }
        } else if !d.customers.is_empty() {
            println!("(--customers lists them)");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn runs(
    app: &App,
    json: bool,
    limit: usize,
    action: Option<RunsCommand>,
) -> Result<ExitCode> {
    let (run_id, rule, approve) = match action {
        None => {
            let list = app.store.runs(limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!("No runs yet.");
            } else {
                println!(
                    "{:>5}  {:<10}  {:<20}  {:<22}  held",
                    "id", "status", "trigger", "evaluated as of"
                );
                for r in list {
                    let mut held: Vec<String> = r
                        .held
                        .iter()
                        .map(|(rule, n)| format!("{rule}: {n}"))
                        .collect();
                    // A run still planning shows how far it got.
                    if r.status == "planning" {
                        held.push(format!(
                            "{} of {} partitions planned",
                            r.partitions_done, r.partitions
                        ));
                    }
                    println!(
                        "{:>5}  {:<10}  {:<20}  {:<22}  {}",
                        r.id,
                        r.status,
                        r.trigger,
                        r.now.format("%Y-%m-%d %H:%M UTC"),
                        held.join(", ")
                    );
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        Some(RunsCommand::Approve { run_id, rule }) => (run_id, rule, true),
        Some(RunsCommand::Reject { run_id, rule }) => (run_id, rule, false),
    };
    let n = app
        .store
        .decide_held(run_id, rule.as_deref(), approve, Utc::now())
        .await?;
    let what = rule.map_or_else(|| "all rules".to_owned(), |r| format!("rule {r}"));
    if n == 0 {
        eprintln!("error: run {run_id} has no held emails for {what}");
        return Ok(ExitCode::from(1));
    }
    if approve {
        println!(
            "Approved {n} held emails of run {run_id} ({what}); they go out with the next delivery (the daemon, or the next `engaged run`)."
        );
        tracing::info!(run = run_id, emails = n, "Held emails approved.");
    } else {
        println!("Rejected {n} held emails of run {run_id} ({what}); they will not be sent.");
    }
    Ok(ExitCode::SUCCESS)
}

async fn suppressions(
    app: &App,
    json: bool,
    action: Option<SuppressionCommand>,
) -> Result<ExitCode> {
    let now = Utc::now();
    match action {
        None => {
            let list = app.store.suppressions().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!("No suppressed addresses.");
            } else {
                for s in list {
                    println!(
                        "{:<40}  {}  {}",
                        s.email,
                        s.created_at.format("%Y-%m-%d %H:%M"),
                        s.reason
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(SuppressionCommand::Add { email, reason }) => {
            let email = Email::parse(&email)?;
            if app.store.suppress(email.as_str(), &reason, now).await? {
                println!("{email} is suppressed.");
            } else {
                println!("{email} was already suppressed.");
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(SuppressionCommand::Remove { email }) => {
            if app.store.unsuppress(&email).await? {
                println!("{email} is no longer suppressed.");
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("error: {email} is not suppressed");
                Ok(ExitCode::from(1))
            }
        }
        Some(SuppressionCommand::Import { file }) => {
            let r = ingest::import_suppressions(&*app.store, &file, now).await?;
            for p in &r.errors {
                eprintln!("{}:{}: {}", r.file.display(), p.line, p.message);
            }
            println!(
                "{}: {} suppressed, {} already suppressed, {} rejected",
                file.display(),
                r.imported,
                r.duplicate,
                r.rejected
            );
            let rejected = r.rejected;
            Ok(if rejected > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

/// Which rules and customers a CLI run evaluates, and under which trigger.
struct RunScope {
    trigger: String,
    only_rules: Option<Vec<String>>,
    changed_since: Option<DateTime<Utc>>,
}

impl RunScope {
    /// Every rule over every customer, under `trigger`.
    fn all(trigger: &str) -> Self {
        Self {
            trigger: trigger.into(),
            only_rules: None,
            changed_since: None,
        }
    }

    /// As the daemon fires schedule `name` (its runs' trigger, so the next
    /// firing over what changed starts where this run's view ended).
    async fn of_schedule(app: &App, name: &str, dry_run: bool) -> Result<Self> {
        let Some(s) = app.config.schedules.iter().find(|s| s.name == name) else {
            let names: Vec<&str> = app
                .config
                .schedules
                .iter()
                .map(|s| s.name.as_str())
                .collect();
            bail!(
                "no schedule named {name:?} in the configuration (schedules: {})",
                if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                }
            );
        };
        let trigger = format!("schedule:{name}");
        let changed_since = match s.customers {
            crate::config::CustomerScope::Changed if !dry_run => {
                app.store.changes_seen_by_last_run(&trigger).await?
            }
            _ => None,
        };
        Ok(Self {
            trigger,
            only_rules: s.rules.clone(),
            changed_since,
        })
    }
}

async fn run(app: &App, now: DateTime<Utc>, dry_run: bool, scope: RunScope) -> Result<RunSummary> {
    let (rules, templates) = app.load_rules_and_templates(true)?;
    let deliverer = if dry_run {
        None
    } else {
        let library = Library::from_parts(Arc::clone(&rules), templates);
        Some(app.deliverer(Arc::new(LibraryHandle::new(library))).await?)
    };
    let progress = progress_bar(app.store.customer_count().await?);
    let opts = RunOptions {
        now,
        dry_run,
        trigger: scope.trigger,
        retry_window: Duration::from_millis(app.config.delivery.run_retry_window_ms),
        only_rules: scope.only_rules,
        changed_since: scope.changed_since,
        policy: app.config.policy.clone(),
        guard: app.config.guard.clone(),
        escalation: app.config.escalation.clone(),
        firing: None,
        cancel: None,
        // Enough to read; a dry run over millions must not hold them all.
        would_limit: Some(1000),
    };
    let summary = pipeline::run(
        Arc::clone(&app.store),
        rules,
        deliverer.as_ref(),
        &app.default_owner()?,
        &opts,
        progress.as_ref(),
    )
    .await?;
    if let Some(p) = progress {
        p.finish_and_clear();
    }
    Ok(summary)
}

/// A progress bar over an import file's bytes, on a terminal only.
fn import_bar() -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "importing {bar:40} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
    ) {
        bar.set_style(style);
    }
    Some(bar)
}

fn progress_bar(total: u64) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "evaluating {bar:40} {pos}/{len} customers ({per_sec}, eta {eta})",
    ) {
        bar.set_style(style);
    }
    Some(bar)
}

fn check(config_path: Option<&Path>) -> Result<ExitCode> {
    let config = load_config(config_path)?;
    let (library, errors) = Library::load_lenient(&config);
    for e in &errors {
        println!("{e}");
    }
    if errors.is_empty() {
        println!(
            "ok: {} rules, {} templates, {} schedules",
            library.rules.rules().len(),
            library.templates.names().len(),
            config.schedules.len()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{} error(s)", errors.len());
        Ok(ExitCode::from(1))
    }
}

fn test_fixtures(config_path: Option<&Path>, paths: Vec<PathBuf>) -> Result<ExitCode> {
    let config = load_config(config_path)?;
    let (library, errors) = Library::load_lenient(&config);
    if !errors.is_empty() {
        for e in &errors {
            println!("{e}");
        }
        bail!("{} rule or template error(s); fix them first", errors.len());
    }
    let paths = if paths.is_empty() {
        vec![config.rules.dir.join("tests")]
    } else {
        paths
    };
    let files = crate::fixtures::collect(&paths);
    if files.is_empty() {
        bail!(
            "no fixture files (*.toml) in {}",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut results = Vec::new();
    for file in &files {
        for r in crate::fixtures::run_file(file, &library.rules) {
            let label = format!(
                "{}::{}",
                file.file_stem().unwrap_or_default().to_string_lossy(),
                r.name
            );
            match &r.failure {
                None => println!("test {label} ... ok"),
                Some(f) => println!("test {label} ... FAILED\n{f}"),
            }
            results.push(r);
        }
    }
    let totals = crate::fixtures::summarize(&results);
    println!(
        "\ntest result: {}. {} passed, {} failed",
        if totals["failed"] == 0 {
            "ok"
        } else {
            "FAILED"
        },
        totals["passed"],
        totals["failed"]
    );
    Ok(if totals["failed"] == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_import(r: &ImportReport) {
    for p in &r.errors {
        eprintln!("{}:{}: {}", r.file.display(), p.line, p.message);
    }
    for p in &r.warnings {
        eprintln!("{}:{}: warning: {}", r.file.display(), p.line, p.message);
    }
    if r.rejected as usize > r.errors.len() {
        eprintln!(
            "… and {} more rejected lines",
            r.rejected as usize - r.errors.len()
        );
    }
    println!(
        "{}: {} imported, {} updated, {} duplicate, {} ignored, {} rejected",
        r.file.display(),
        r.imported,
        r.updated,
        r.duplicate,
        r.ignored,
        r.rejected
    );
}

fn print_summary(s: &RunSummary) {
    let title = if s.dry_run { "Dry run" } else { "Run" };
    match s.run_id {
        Some(id) => println!("{title} #{id} at {}", s.now.to_rfc3339()),
        None => println!(
            "{title} at {} (nothing written, nothing sent)",
            s.now.to_rfc3339()
        ),
    }
    println!(
        "{} customers, {} evaluations in {:.2}s",
        s.customers, s.evaluations, s.evaluation_seconds
    );
    let p = &s.phases;
    println!(
        "time: load {:.2}s, evaluate {:.2}s, dedup {:.2}s, policies {:.2}s, commit {:.2}s, deliver {:.2}s",
        p.load, p.evaluate, p.dedup, p.policies, p.commit, p.deliver
    );
    println!(
        "{:<20} {:>7} {:>6} {:>5} {:>6} {:>6} {:>5} {:>6} {:>6} {:>6} {:>5} {:>8}",
        "rule",
        "planned",
        "dedup",
        "suppr",
        "capped",
        "window",
        "held",
        "errors",
        "emails",
        "escal",
        "tags",
        "webhooks"
    );
    for (rule, r) in &s.rules {
        println!(
            "{:<20} {:>7} {:>6} {:>5} {:>6} {:>6} {:>5} {:>6} {:>6} {:>6} {:>5} {:>8}",
            rule,
            r.planned,
            r.deduplicated,
            r.suppressed,
            r.capped,
            r.waiting_for_window,
            r.held,
            r.errors,
            r.emails,
            r.escalations,
            r.tags,
            r.webhooks
        );
    }
    for e in &s.errors {
        let shown = crate::diagnostic::Diagnostic::parse(&e.message)
            .map_or_else(|| e.message.clone(), |d| d.pretty());
        println!("error: customer {}: {shown}", e.customer_id);
    }
    for (rule, r) in s.rules.iter().filter(|(_, r)| r.held > 0) {
        println!(
            "HELD: rule {rule} would email {} of {} customers; nothing of it was sent. Review, then `engaged runs approve {} --rule {rule}` or `engaged runs reject …`.",
            r.held,
            s.customers,
            s.run_id.unwrap_or_default()
        );
    }
    if s.dry_run {
        for w in s.would.iter().take(200) {
            println!(
                "would {}: {} → {}{}",
                if w.deduplicated { "skip" } else { "do" },
                w.customer_id,
                w.action,
                if w.deduplicated {
                    " (already done)"
                } else {
                    ""
                }
            );
        }
        let total = s.would_total.unwrap_or(s.would.len() as u64);
        if total > 200 {
            println!("… {} more", total - 200);
        }
    } else {
        println!(
            "delivery: {} sent, {} failed, {} retrying later, {} dead, {} suppressed",
            s.delivery.sent,
            s.delivery.failed,
            s.delivery.retrying,
            s.delivery.dead,
            s.delivery.suppressed
        );
    }
}

async fn explain(
    config_path: Option<&Path>,
    customer_id: &str,
    now: DateTime<Utc>,
    json: bool,
) -> Result<ExitCode> {
    let app = App::open(config_path).await?;
    let id = CustomerId::parse(customer_id)?;
    let Some(customer) = app.store.customer(&id).await? else {
        eprintln!("error: no customer with id {customer_id:?}");
        return Ok(ExitCode::from(1));
    };
    let (rules, _) = app.load_rules_and_templates(false)?;
    let events = app.store.events_in_id_range(&id, &id, now).await?;
    let tags = app
        .store
        .tags_in_id_range(&id, &id)
        .await?
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    let facts = Arc::new(Facts::new(customer, events, tags, now));
    let history = app.store.actions_for_customer(&id).await?;
    let escalations = app.store.escalations_for_customer(&id).await?;
    let decisions = app.store.decisions_for_customer(&id).await?;
    let suppression = match &facts.customer.email {
        Some(e) => app.store.suppression(e.as_str()).await?,
        None => None,
    };
    // What the policies would do with a new marketing email for this customer now.
    let over_cap = match app.config.policy.frequency_cap {
        Some(cap) => {
            let since = now - chrono::Duration::days(i64::from(cap.days));
            let recent = app
                .store
                .recent_email_counts(std::slice::from_ref(&id), since)
                .await?
                .get(&id)
                .copied()
                .unwrap_or(0);
            (recent >= cap.emails).then(|| {
                format!(
                    "over the frequency cap ({recent} emails in the last {} days; at most {})",
                    cap.days, cap.emails
                )
            })
        }
        None => None,
    };
    let window_wait = app.config.policy.window().ok().flatten().and_then(|w| {
        let tz = facts
            .customer
            .timezone
            .as_deref()
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| app.config.policy.default_tz().unwrap_or(chrono_tz::UTC));
        w.next_open(now, tz)
            .map(|t| format!("would wait for the send window until {t}"))
    });
    let mut outcomes = Vec::new();
    for (index, rule) in rules.rules().iter().enumerate() {
        let (result, reads) = rules.explain(index, &facts);
        let outcome = match result {
            Ok(actions) if actions.is_empty() => {
                serde_json::json!({"rule": rule.id, "outcome": "nothing"})
            }
            Ok(actions) => {
                let items: Vec<_> = actions
                    .into_iter()
                    .map(|a| {
                        let key = crate::plan::dedup_key(&a);
                        let done = key
                            .as_ref()
                            .and_then(|k| history.iter().find(|h| &h.dedup_key == k));
                        let open = matches!(a.kind, crate::plan::ActionRequest::Escalate { .. })
                            .then(|| {
                                escalations.iter().find(|e| {
                                    e.rule == rule.id
                                        && (e.status == "open" || e.status == "acknowledged")
                                })
                            })
                            .flatten();
                        let status = match (done, open) {
                            (Some(h), _) => {
                                format!("already planned in run {} ({})", h.run_id, h.status)
                            }
                            (None, Some(e)) => format!("escalation {} is already open", e.id),
                            (None, None) => match (&a.kind, &suppression, &over_cap, &window_wait) {
                                (crate::plan::ActionRequest::Email { .. }, Some(reason), ..) => {
                                    format!("new, but not sent: the address is suppressed ({reason})")
                                }
                                (crate::plan::ActionRequest::Email { .. }, None, Some(cap), _) => {
                                    format!("new, but {cap}: deferred or dropped per the rule's @when_capped")
                                }
                                (crate::plan::ActionRequest::Email { .. }, None, None, Some(w)) => {
                                    format!("new: the next run would plan it; it {w}")
                                }
                                _ => "new: the next run would do it".into(),
                            },
                        };
                        serde_json::json!({"action": a.kind, "status": status})
                    })
                    .collect();
                serde_json::json!({"rule": rule.id, "outcome": "actions", "actions": items})
            }
            Err(e) => {
                serde_json::json!({"rule": rule.id, "outcome": "error", "error": e.to_string()})
            }
        };
        let mut outcome = outcome;
        outcome["read"] = serde_json::json!(reads);
        outcomes.push(outcome);
    }
    let report = serde_json::json!({
        "customer": crate::deliver::customer_context(&facts.customer),
        "tags": facts.tags,
        "now": now,
        "facts": facts.summary(),
        "rules": outcomes,
        "history": history.iter().map(|h| serde_json::json!({
            "run": h.run_id, "rule": h.rule, "kind": h.kind, "status": h.status,
            "attempts": h.attempts, "reason": h.last_error,
            "subject": h.payload.get("template").or_else(|| h.payload.get("name")),
            "key": h.payload.get("key"),
            "server_reply": h.payload.get("delivery"),
            "planned_at": h.created_at, "finished_at": h.finished_at,
            "due_at": (h.status == "pending").then_some(h.next_attempt_at),
            "deduplicated": (h.repeats > 0).then(|| serde_json::json!({
                "times": h.repeats, "last_run": h.repeated_run, "last_at": h.repeated_at,
            })),
        })).collect::<Vec<_>>(),
        "decisions": decisions,
        "escalations": escalations,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_explain(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_explain(r: &serde_json::Value) {
    let c = &r["customer"];
    println!(
        "Customer {} <{}> ({}, {})",
        c["id"].as_str().unwrap_or("?"),
        c["email"].as_str().unwrap_or("no email"),
        c["name"].as_str().unwrap_or("no name"),
        c["model"].as_str().unwrap_or("?")
    );
    println!("As of {}", r["now"].as_str().unwrap_or("?"));
    println!(
        "Facts: {}",
        serde_json::to_string_pretty(&r["facts"]).unwrap_or_default()
    );
    println!("Rules:");
    for o in r["rules"].as_array().into_iter().flatten() {
        let rule = o["rule"].as_str().unwrap_or("?");
        let read: Vec<&str> = o["read"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str())
            .collect();
        if !read.is_empty() {
            println!("  {rule} read: {}", read.join("; "));
        }
        match o["outcome"].as_str() {
            Some("nothing") => println!("  {rule}: nothing to do"),
            Some("error") => println!("  {rule}: error: {}", o["error"].as_str().unwrap_or("")),
            _ => {
                for a in o["actions"].as_array().into_iter().flatten() {
                    println!(
                        "  {rule}: {} — {}",
                        a["action"],
                        a["status"].as_str().unwrap_or("")
                    );
                }
            }
        }
    }
    println!("History (every action ever planned, with its outcome):");
    for h in r["history"].as_array().into_iter().flatten() {
        let what = [h["subject"].as_str(), h["key"].as_str()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" key ");
        let mut line = format!(
            "  run {} {} {} {what}: {}",
            h["run"],
            h["rule"].as_str().unwrap_or(""),
            h["kind"].as_str().unwrap_or(""),
            h["status"].as_str().unwrap_or("")
        );
        if let Some(due) = h["due_at"].as_str() {
            line.push_str(&format!(", due {due}"));
        }
        if let Some(reply) = h["server_reply"].as_str() {
            line.push_str(&format!(" ({reply})"));
        }
        let dedup = &h["deduplicated"];
        if !dedup.is_null() {
            line.push_str(&format!(
                "; deduplicated {} time(s) since, last by run {} at {}",
                dedup["times"],
                dedup["last_run"],
                dedup["last_at"].as_str().unwrap_or("?")
            ));
        }
        // Last, as a template error is several lines (the source line and a
        // caret under the column): the rest is indented under this one.
        if let Some(reason) = h["reason"].as_str() {
            line.push_str(&format!(" — {}", reason.replace('\n', "\n      ")));
        }
        println!("{line}");
    }
    for d in r["decisions"].as_array().into_iter().flatten() {
        let mut line = format!(
            "  run {} {} {}: {} — {}",
            d["run_id"],
            d["rule"].as_str().unwrap_or(""),
            d["subject"].as_str().unwrap_or(""),
            d["decision"].as_str().unwrap_or(""),
            d["reason"].as_str().unwrap_or("")
        );
        if d["times"].as_u64().is_some_and(|n| n > 1) {
            line.push_str(&format!(
                " ({} runs since {})",
                d["times"],
                d["first_at"].as_str().unwrap_or("?")
            ));
        }
        println!("{line}");
    }
    for e in r["escalations"].as_array().into_iter().flatten() {
        println!(
            "Escalation {} ({}) to {}: {}",
            e["id"],
            e["status"].as_str().unwrap_or(""),
            e["owner"].as_str().unwrap_or(""),
            e["reason"].as_str().unwrap_or("")
        );
    }
}

async fn demo(
    config_path: Option<&Path>,
    customers: usize,
    events_per_customer: usize,
    seed: u64,
    dir: &Path,
) -> Result<ExitCode> {
    let app = App::open(config_path).await?;
    let now = Utc::now();
    let spec = crate::demo_data::SampleSpec {
        customers,
        events_per_customer,
        seed,
        now,
    };
    let files = crate::demo_data::write_sample_data(&spec, dir)
        .with_context(|| format!("writing sample data to {}", dir.display()))?;
    println!(
        "Generated {} customers and {} events in {}",
        files.customers,
        files.events,
        dir.display()
    );
    let r = ingest::import_customers(Arc::clone(&app.store), &files.customers_csv).await?;
    print_import(&r);
    let r = ingest::import_events(Arc::clone(&app.store), &files.events_jsonl).await?;
    print_import(&r);
    let summary = run(&app, now, false, RunScope::all("demo")).await?;
    print_summary(&summary);
    if app.config.mail.effective_transport() == crate::config::Transport::File {
        println!("Mail written to {}/", app.config.mail.outbox_dir.display());
    }
    println!("Try: engaged escalations · engaged explain cus_00001 · engaged run --dry-run");
    Ok(ExitCode::SUCCESS)
}
