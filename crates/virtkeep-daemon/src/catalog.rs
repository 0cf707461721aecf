//! The daemon's memory: job history, policy runs, each schedule's next run, the nodes
//! of a cluster and the job queue they share.
//!
//! Two backends behind one [`Store`] trait: an embedded SQLite database (the default,
//! one node: [`sqlite`]) and PostgreSQL (`[daemon] catalog = "postgres://…"`, several
//! nodes sharing one queue: [`pg`]). Both have the same tables, created and upgraded by
//! versioned migrations. The methods are synchronous: statements are short, and every
//! caller (the daemon loop, the API handlers, the CLI) already treats them as such.

pub mod pg;
pub mod sqlite;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::Result;

/// Bumped on every schema change; a newer catalog is refused rather than misread.
/// 1: jobs, runs, schedule state. 2: nodes, the node and lease of each job.
/// 3: an index on jobs by kind (boot verifications and sync runs are jobs too, and
/// the metrics and per-VM states read each kind's newest jobs).
pub const SCHEMA_VERSION: i64 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    /// Stopped through `DELETE /api/jobs/{id}` (a running one with its VM healed).
    Cancelled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub(crate) fn parse(s: &str) -> JobStatus {
        match s {
            "queued" => JobStatus::Queued,
            "running" => JobStatus::Running,
            "succeeded" => JobStatus::Succeeded,
            "cancelled" => JobStatus::Cancelled,
            _ => JobStatus::Failed,
        }
    }
}

/// One job as the catalog has it (stable in `virtkeep jobs --json` and the API).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct JobRecord {
    pub id: i64,
    /// The policy run it belongs to; none for jobs started through the API.
    pub run_id: Option<i64>,
    /// `backup`, `restore`, `verify_boot` (a policy's boot verification of the VM's
    /// newest backup; `snapshot` is the backup booted), `sync` (a `[sync.NAME]` run:
    /// `host` is empty and `vm` is the sync job's name), `gc` or `verify` (a
    /// `[maintenance.REPOSITORY]` run: `host` is empty, `vm` the repository's name).
    pub kind: String,
    pub host: String,
    pub vm: String,
    pub policy: Option<String>,
    pub status: JobStatus,
    /// 1 for the first try; a retry has `attempt` + 1 and `retry_of` = the failed job.
    pub attempt: i64,
    pub retry_of: Option<i64>,
    pub priority: i64,
    /// RFC 3339 times.
    pub created: String,
    pub not_before: String,
    pub started: Option<String>,
    pub finished: Option<String>,
    pub error: Option<String>,
    /// The backup id the job wrote (backup) or read (restore).
    pub snapshot: Option<String>,
    /// `full` or `incremental` as the engine chose.
    pub mode: Option<String>,
    pub bytes_read: Option<i64>,
    pub bytes_new: Option<i64>,
    pub duration_secs: Option<f64>,
    /// Backups removed by the policy's retention after this one succeeded.
    pub pruned: Option<i64>,
    pub note: Option<String>,
    /// The node that ran (or runs) the job; none while it is queued.
    pub node: Option<String>,
    #[serde(skip)]
    pub request: String,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RunRecord {
    pub id: i64,
    pub policy: String,
    pub mode: String,
    /// `schedule`, `missed` (caught up at start-up) or `manual`.
    pub trigger: String,
    pub started: String,
    pub finished: Option<String>,
    /// `running`, `succeeded` or `failed`.
    pub status: String,
    pub note: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    pub run_id: Option<i64>,
    pub kind: &'a str,
    pub host: &'a str,
    pub vm: &'a str,
    pub policy: Option<&'a str>,
    pub request: &'a str,
    pub attempt: i64,
    pub retry_of: Option<i64>,
    pub priority: i64,
    pub not_before: i64,
}

/// What a finished job reports.
#[derive(Debug, Clone, Default)]
pub struct JobOutcome {
    /// Cancelled through the API: recorded as `cancelled` (with `error` saying so), never retried.
    pub cancelled: bool,
    pub error: Option<String>,
    pub snapshot: Option<String>,
    pub mode: Option<String>,
    pub bytes_read: Option<i64>,
    pub bytes_new: Option<i64>,
    pub duration: Option<f64>,
    pub pruned: Option<i64>,
    pub note: Option<String>,
}

/// Filters for [`Catalog::jobs`].
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub status: Option<JobStatus>,
    pub host: Option<String>,
    pub vm: Option<String>,
    pub run_id: Option<i64>,
    pub limit: Option<u32>,
}

/// Per-VM facts for `/metrics`.
#[derive(Debug, Clone)]
pub struct VmStats {
    pub host: String,
    pub vm: String,
    pub last_success: Option<i64>,
    pub last_bytes_read: Option<i64>,
    pub last_bytes_new: Option<i64>,
    pub last_duration: Option<f64>,
    pub failures: i64,
    pub successes: i64,
}

/// Where the catalog lives (`[daemon] catalog`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogLocation {
    /// A SQLite file: one daemon writes it.
    Sqlite(PathBuf),
    /// A PostgreSQL database shared by the nodes of a cluster.
    Postgres(pg::PgLocation),
}

impl CatalogLocation {
    /// For messages: the file, or the URL (which never holds a password).
    pub fn display(&self) -> String {
        match self {
            CatalogLocation::Sqlite(p) => p.display().to_string(),
            CatalogLocation::Postgres(l) => l.url.clone(),
        }
    }
}

/// What a node tells the cluster about itself.
#[derive(Debug, Clone)]
pub struct NodeRegistration<'a> {
    pub name: &'a str,
    /// Where its API listens, if it has one.
    pub address: Option<&'a str>,
    /// How many jobs it runs at once (`max_jobs`).
    pub capacity: i64,
    pub now: i64,
    /// Seconds after its last heartbeat at which the node counts as dead.
    pub lease_secs: i64,
}

/// One node as the catalog has it (stable in `virtkeep nodes --json` and `GET /api/nodes`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct NodeRecord {
    pub name: String,
    pub address: Option<String>,
    pub capacity: i64,
    /// Jobs it runs now.
    pub running: i64,
    /// RFC 3339 times.
    pub started: String,
    pub heartbeat: String,
    /// Its heartbeat is younger than its lease.
    pub alive: bool,
    /// It fires the schedules of the cluster.
    pub leader: bool,
}

/// Chooses, among queued jobs due now (best first) and the jobs running anywhere in the
/// cluster, the ids this node starts (`dispatch::choose` with the node's limits).
pub type Chooser<'a> = &'a (dyn Fn(&[JobRecord], &[JobRecord]) -> Vec<i64> + Sync);

/// A node taking jobs from the shared queue.
pub struct Claim<'a> {
    pub node: &'a str,
    pub now: i64,
    /// The lease the claimed jobs get: another node takes them over after it.
    pub lease_until: i64,
    pub choose: Chooser<'a>,
}

/// The catalog's operations, the same on every backend.
pub trait Store: Send + Sync {
    /// For messages: the file or the URL.
    fn describe(&self) -> String;
    #[cfg(test)]
    fn as_any(&self) -> &dyn std::any::Any;
    /// Whether several nodes share this catalog (claims and leases matter).
    fn shared(&self) -> bool;

    fn next_run(&self, policy: &str, schedule: &str) -> Result<Option<i64>>;
    fn last_run(&self, policy: &str, schedule: &str) -> Result<Option<i64>>;
    fn set_next_run(
        &self,
        policy: &str,
        schedule: &str,
        next: Option<i64>,
        ran_at: Option<i64>,
    ) -> Result<()>;
    fn start_run(&self, policy: &str, mode: &str, trigger: &str) -> Result<i64>;
    fn finish_run(&self, id: i64, status: &str, note: Option<&str>) -> Result<()>;
    fn finish_run_note(&self, id: i64, note: &str) -> Result<()>;
    fn runs(&self, policy: Option<&str>, limit: u32) -> Result<Vec<RunRecord>>;
    /// Runs still marked running: their jobs decide when they end.
    fn open_runs(&self) -> Result<Vec<(i64, String)>>;

    fn add_job(&self, j: &NewJob<'_>) -> Result<i64>;
    /// Records that `node` runs job `id` now, with a lease until `lease_until`; only a
    /// job still queued (one cancelled meanwhile, e.g. by `restore --detach` giving up,
    /// stays as it is: the caller reads it back).
    fn mark_running(&self, id: i64, node: &str, lease_until: i64) -> Result<()>;
    /// Replaces the note of a running job (a live restore's "running after …").
    fn set_job_note(&self, id: i64, note: &str) -> Result<()>;
    /// Cancels job `id` with `error` if it is still queued; whether it was.
    fn cancel_queued(&self, id: i64, error: &str) -> Result<bool>;
    fn finish_job(&self, id: i64, o: &JobOutcome) -> Result<()>;
    fn job(&self, id: i64) -> Result<JobRecord>;
    fn jobs(&self, f: &JobFilter) -> Result<Vec<JobRecord>>;
    /// Whether `policy` already has a queued or running job of `kind` for this VM.
    fn has_open_job(&self, host: &str, vm: &str, policy: &str, kind: &str) -> Result<bool>;
    /// Records a job that starts at once on `node` (a sync run, which is not queued):
    /// inserted as running, so no other node can claim it.
    fn start_job(&self, j: &NewJob<'_>, node: &str, lease_until: i64) -> Result<i64>;
    /// The newest finished job of `kind` of each (host, VM), by host and VM.
    fn last_jobs(&self, kind: &str) -> Result<Vec<JobRecord>>;
    /// Raw `not_before` of a queued job (unix seconds), for the dispatcher.
    fn not_before(&self, id: i64) -> Result<i64>;
    /// Counts of a run's jobs: (total tries that are final, failed among them,
    /// queued or running).
    fn run_counts(&self, run_id: i64) -> Result<(i64, i64, i64)>;
    /// Finished jobs, for the history retention (`history::expired`).
    fn finished_jobs(&self) -> Result<Vec<crate::history::FinishedJob>>;
    /// Deletes finished jobs (never queued or running ones), in one transaction: a
    /// retry that pointed at a deleted try no longer does, and finished runs left
    /// without jobs go too. Returns the number of jobs deleted.
    fn forget_jobs(&self, ids: &[i64]) -> Result<usize>;
    /// Per-VM figures of the jobs of `kind` (`backup`, `verify_boot`, `sync`).
    fn vm_stats_of(&self, kind: &str) -> Result<Vec<VmStats>>;
    /// Per-VM figures of the backups, for `/metrics`.
    fn vm_stats(&self) -> Result<Vec<VmStats>> {
        self.vm_stats_of("backup")
    }
    /// The newest `per_vm` backup jobs of every VM, by host, VM and newest first, in one
    /// query (the web console's dashboard).
    fn recent_backups(&self, per_vm: u32) -> Result<Vec<JobRecord>>;
    /// Number of jobs per status.
    fn status_counts(&self) -> Result<Vec<(String, i64)>>;

    /// Registers (or re-registers after a restart) a node.
    fn register_node(&self, n: &NodeRegistration<'_>) -> Result<()>;
    /// The node is alive: its heartbeat and the leases of the jobs it runs move to
    /// `lease_until`; `leader` records whether it leads now.
    fn heartbeat(&self, node: &str, now: i64, lease_until: i64, leader: bool) -> Result<()>;
    fn nodes(&self, now: i64) -> Result<Vec<NodeRecord>>;
    /// Takes the jobs the chooser picks from the shared queue, atomically across nodes
    /// (`FOR UPDATE SKIP LOCKED` under one claim lock); they are `running` on this node.
    fn claim(&self, c: &Claim<'_>) -> Result<Vec<JobRecord>>;
    /// Running jobs whose lease expired (their node died), or whose node is `own` (this
    /// node, restarted), become failed with `why`; returns them, each to one caller only.
    fn take_orphans(&self, own: Option<&str>, now: i64, why: &str) -> Result<Vec<JobRecord>>;
    /// Whether this process leads the cluster (fires the schedules): takes the lead
    /// when nobody holds it; keeps it while this process lives.
    fn try_lead(&self) -> Result<bool>;

    /// At start-up of a single node: every job left `running` is an orphan.
    fn fail_orphans(&self, why: &str) -> Result<Vec<JobRecord>> {
        let orphans = self.jobs(&JobFilter {
            status: Some(JobStatus::Running),
            ..Default::default()
        })?;
        let mut failed = Vec::new();
        for j in &orphans {
            self.finish_job(
                j.id,
                &JobOutcome {
                    error: Some(why.to_string()),
                    ..Default::default()
                },
            )?;
            failed.push(self.job(j.id)?);
        }
        Ok(failed)
    }

    /// Applies the history limits at `now`; returns the number of jobs removed.
    fn apply_history_limits(
        &self,
        limits: crate::history::HistoryLimits,
        now: i64,
    ) -> Result<usize> {
        let ids = crate::history::expired(&self.finished_jobs()?, now, limits);
        if ids.is_empty() {
            return Ok(0);
        }
        self.forget_jobs(&ids)
    }
}

/// An open catalog; its operations are those of [`Store`].
pub struct Catalog {
    store: Box<dyn Store>,
}

impl std::ops::Deref for Catalog {
    type Target = dyn Store;
    fn deref(&self) -> &Self::Target {
        self.store.as_ref()
    }
}

impl Catalog {
    #[cfg(test)]
    pub(crate) fn as_pg(&self) -> &pg::PgStore {
        let any: &dyn std::any::Any = self.store.as_any();
        any.downcast_ref().expect("a PostgreSQL catalog")
    }

    /// Opens (creating it if needed) a SQLite catalog for the daemon, which writes it:
    /// takes the exclusive daemon lock, so a second daemon on the same file fails at once.
    pub fn open_writer(path: &Path) -> Result<Catalog> {
        Ok(Catalog {
            store: Box::new(sqlite::SqliteStore::open_writer(path)?),
        })
    }

    /// Opens an existing SQLite catalog to read (CLI commands); `None` when none exists yet.
    pub fn open_reader(path: &Path) -> Result<Option<Catalog>> {
        Ok(sqlite::SqliteStore::open_reader(path)?.map(|s| Catalog { store: Box::new(s) }))
    }

    /// Opens the catalog at `loc` for a daemon (creating or upgrading its tables).
    pub fn open(loc: &CatalogLocation) -> Result<Catalog> {
        match loc {
            CatalogLocation::Sqlite(p) => Catalog::open_writer(p),
            CatalogLocation::Postgres(l) => Ok(Catalog {
                store: Box::new(pg::PgStore::open(l)?),
            }),
        }
    }

    /// Opens the catalog at `loc` for a command that queues a job beside the daemon
    /// (`restore --live --detach`): a SQLite file must exist (the daemon made it) and
    /// be writable by this user; its daemon lock is not taken.
    pub fn open_submitter(loc: &CatalogLocation) -> Result<Option<Catalog>> {
        match loc {
            CatalogLocation::Sqlite(p) => {
                Ok(sqlite::SqliteStore::open_submitter(p)?.map(|s| Catalog { store: Box::new(s) }))
            }
            CatalogLocation::Postgres(_) => Catalog::open_reader_at(loc),
        }
    }

    /// Opens the catalog at `loc` to read; `None` when a SQLite file does not exist yet.
    pub fn open_reader_at(loc: &CatalogLocation) -> Result<Option<Catalog>> {
        match loc {
            CatalogLocation::Sqlite(p) => Catalog::open_reader(p),
            CatalogLocation::Postgres(l) => Ok(Some(Catalog {
                store: Box::new(pg::PgStore::open(l)?),
            })),
        }
    }
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

pub fn rfc3339(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}
