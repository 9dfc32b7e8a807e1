//! engaged: customer-engagement automation with rules as code.
//!
//! # Layout
//! Data flows one way, and the modules follow it:
//!
//! ```text
//! ingest (csv, jsonl) → store → facts → engine (Rhai rules) → plan/policy → outbox → deliver (smtp, file, webhook)
//! ```
//!
//! - [`diagnostic`]: `FILE:LINE:COL: message` for problems in users' files.
//! - [`domain`]: ids, email addresses, customers and events, parsed once at the edge.
//! - [`config`]: typed, strict settings with working defaults and `ENGAGED_*` overrides.
//! - [`ingest`]: CSV and Segment JSON-lines parsing (pure) and streaming import.
//! - [`store`]: the `Store` trait, its SQLite (embedded default) and PostgreSQL (replicas)
//!   implementations, and their migrations; one conformance suite runs on both.
//! - [`facts`]: a customer's events as of `now`, and the questions rules ask of them.
//! - [`fixtures`]: `engaged test`: rule fixtures run against the real engine.
//! - [`engine`]: the locked-down Rhai engine; evaluates rules into planned actions, no I/O.
//! - [`plan`]: planned actions, outbox payloads and dedup keys (pure).
//! - [`policy`]: blast-radius guard, send windows, frequency cap (pure decisions).
//! - [`templates`]: MiniJinja templates with front matter; rendering is pure once loaded.
//! - [`deliver`]: the only code that talks SMTP/HTTP; `deliver_one` and a loop around it.
//! - [`pipeline`]: one evaluation run: evaluate → plan → commit → deliver.
//! - [`library`]: the rules and templates in use, swapped atomically on hot reload.
//! - [`schedule`]: cron fire times (DST-correct) and the durable firing ledger; a tick only enqueues.
//! - [`simulate`]: `engaged simulate`: the next N days on a virtual clock, nothing written.
//! - [`liveness`]: lease-holder tokens naming this process, and taking over leases of processes that died.
//! - [`heartbeat`]: when the scheduler last ticked; stalls and clock steps, for `/readyz` and the watchdog.
//! - [`daemon`]: `engaged serve`: scheduler, run worker, delivery workers, HTTP, reload, shutdown.
//! - [`api`]: the HTTP API (Segment ingestion, unsubscribe, health, metrics, admin).
//! - [`metrics`]: Prometheus metrics. [`clock`]: time as a parameter.
//! - [`compare`]: `engaged plan`: per-rule plans and the diff against other rules.
//! - [`cli`]: command-line parsing and output; no business logic.

pub mod api;
pub mod cli;
pub mod clock;
pub mod compare;
pub mod config;
pub mod daemon;
pub mod deliver;
pub mod demo_data;
pub mod diagnostic;
pub mod domain;
pub mod engine;
pub mod facts;
pub mod fixtures;
pub mod heartbeat;
pub mod ingest;
pub mod library;
pub mod liveness;
pub mod metrics;
pub mod pipeline;
pub mod plan;
pub mod policy;
pub mod schedule;
pub mod simulate;
pub mod store;
pub mod templates;
pub mod unsubscribe;
