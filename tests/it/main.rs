//! Integration tests: one binary, real parts (SQLite files, PostgreSQL
//! databases, a real SMTP server over TCP, the real `engaged` executable).

mod daemon;
mod docs;
mod fixtures;
mod helpers;
mod hostile;
mod hostile_input;
mod hostile_rules;
mod import;
mod pipeline;
mod policy;
mod postgres_e2e;
mod properties;
mod rules;
mod scheduler;
mod smtp_selftest;
mod smtp_server;
mod smtp_tls;
mod store_conformance;
