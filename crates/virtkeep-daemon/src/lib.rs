//! virtkeep-daemon: unattended backups.
//!
//! ```text
//! config file ─▶ policy (DaemonConfig, Policy, Selection) ─▶ schedule (when)
//!                                   │
//! daemon::run ── due schedules ─▶ runs + jobs in the catalog (SQLite) ─▶ dispatch (limits,
//!      │                          priority, one job per VM, retries) ─▶ task (engine calls)
//!      └── api (axum, token auth, OpenAPI) + metrics (Prometheus text)
//! ```
//! The binary's `virtkeep daemon`, `virtkeep jobs` and `virtkeep policy list` are thin
//! shells over this crate. docs/daemon.md has the rules (missed runs, retries, SIGTERM).

pub mod catalog;
pub mod error;
pub mod history;
pub mod idle;
pub mod maintenance;
pub mod maintenance_config;
pub mod policy;
pub mod recorded;
pub mod schedule;
pub mod scope;
pub mod sync_config;
pub mod sync_jobs;
pub mod tls;

pub use error::{ConfigError, DaemonError, Result};
pub mod api;
pub mod daemon;
pub mod dispatch;
pub mod files_api;
pub mod live_jobs;
pub mod metrics;
pub mod task;
pub mod verify_jobs;
pub mod web;
