//! The daemon's memory: job history, policy runs and each schedule's next run, in an
//! embedded SQLite database (WAL) that survives restarts.
//!
//! One daemon writes a catalog (it holds an exclusive `flock` on `<catalog>.lock`);
//! `virtkeep jobs`, `virtkeep policy list` and the API read it concurrently, which WAL
//! allows without blocking the writer. All access goes through one connection per
//! process behind a mutex: statements are short, and SQLite serialises writers anyway.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Serialize;

use crate::error::{DaemonError, Result};

/// Bumped on every schema change; a newer catalog is refused rather than misread.
pub const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS schedule_state (
    policy   TEXT NOT NULL,
    schedule TEXT NOT NULL,
    next_run INTEGER,
    last_run INTEGER,
    PRIMARY KEY (policy, schedule)
);
CREATE TABLE IF NOT EXISTS runs (
    id       INTEGER PRIMARY KEY,
    policy   TEXT NOT NULL,
    mode     TEXT NOT NULL,
    trigger  TEXT NOT NULL,
    started  INTEGER NOT NULL,
    finished INTEGER,
    status   TEXT NOT NULL,
    note     TEXT
);
CREATE TABLE IF NOT EXISTS jobs (
    id          INTEGER PRIMARY KEY,
    run_id      INTEGER REFERENCES runs(id),
    kind        TEXT NOT NULL,
    host        TEXT NOT NULL,
    vm          TEXT NOT NULL,
    policy      TEXT,
    request     TEXT NOT NULL,
    status      TEXT NOT NULL,
    attempt     INTEGER NOT NULL DEFAULT 1,
    retry_of    INTEGER REFERENCES jobs(id),
    priority    INTEGER NOT NULL DEFAULT 0,
    created     INTEGER NOT NULL,
    not_before  INTEGER NOT NULL,
    started     INTEGER,
    finished    INTEGER,
    error       TEXT,
    snapshot    TEXT,
    mode        TEXT,
    bytes_read  INTEGER,
    bytes_new   INTEGER,
    duration    REAL,
    pruned      INTEGER,
    note        TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs(status);
CREATE INDEX IF NOT EXISTS jobs_by_vm ON jobs(host, vm, finished);
"#;

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

    fn parse(s: &str) -> JobStatus {
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
    /// `backup` or `restore`.
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

pub struct Catalog {
    path: PathBuf,
    conn: Mutex<Connection>,
    /// Held by the writing daemon for its lifetime.
    _lock: Option<std::fs::File>,
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

pub fn rfc3339(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

fn lock_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

impl Catalog {
    /// Opens (creating it if needed) the catalog for the daemon, which writes it: takes
    /// the exclusive daemon lock, so a second daemon on the same catalog fails at once.
    pub fn open_writer(path: &Path) -> Result<Catalog> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|source| DaemonError::Io {
                what: "creating the catalog directory",
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let lock = lock_path(path);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock)
            .map_err(|source| DaemonError::Io {
                what: "opening",
                path: lock.clone(),
                source,
            })?;
        // std's advisory lock (flock on Unix), released when the file closes with the catalog.
        if file.try_lock().is_err() {
            return Err(DaemonError::CatalogBusy {
                path: path.to_path_buf(),
                lock,
            });
        }
        let conn = Connection::open(path).map_err(DaemonError::catalog(path, "opening"))?;
        let cat = Catalog {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
            _lock: Some(file),
        };
        cat.init()?;
        Ok(cat)
    }

    /// Opens an existing catalog to read (CLI commands); `None` when none exists yet.
    pub fn open_reader(path: &Path) -> Result<Option<Catalog>> {
        if !path.exists() {
            return Ok(None);
        }
        // Read-write lets SQLite use the WAL index like the daemon does; a user who may
        // only read the file (an operator looking at the daemon's history) still can.
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .or_else(|_| {
            Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
        })
        .map_err(DaemonError::catalog(path, "opening"))?;
        let cat = Catalog {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
            _lock: None,
        };
        cat.setup_connection()?;
        // A daemon that is creating the catalog right now: nothing to read yet.
        let initialised: bool = cat
            .conn()
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta')
                    AND EXISTS(SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs')",
                [],
                |r| r.get(0),
            )
            .map_err(cat.err("reading the schema"))?;
        if !initialised {
            return Ok(None);
        }
        cat.check_version()?;
        Ok(Some(cat))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves the connection usable: SQLite rolls
        // back any open statement.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn err(&self, what: &'static str) -> impl FnOnce(rusqlite::Error) -> DaemonError {
        DaemonError::catalog(&self.path, what)
    }

    fn setup_connection(&self) -> Result<()> {
        let c = self.conn();
        c.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(self.err("setting the busy timeout"))?;
        c.pragma_update(None, "foreign_keys", "ON")
            .map_err(self.err("enabling foreign keys"))?;
        Ok(())
    }

    fn init(&self) -> Result<()> {
        self.setup_connection()?;
        {
            let c = self.conn();
            c.pragma_update(None, "journal_mode", "WAL")
                .map_err(self.err("enabling WAL"))?;
            c.pragma_update(None, "synchronous", "NORMAL")
                .map_err(self.err("setting synchronous"))?;
            // One transaction: a reader never sees the tables without the version.
            c.execute_batch(&format!(
                "BEGIN IMMEDIATE; {SCHEMA}
                 INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', '{SCHEMA_VERSION}');
                 COMMIT;"
            ))
            .map_err(self.err("creating the schema"))?;
        }
        self.check_version()
    }

    fn check_version(&self) -> Result<()> {
        let found: Option<String> = self
            .conn()
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.err("reading the schema version"))?;
        let found = found.and_then(|v| v.parse().ok()).unwrap_or(0);
        if found != SCHEMA_VERSION {
            return Err(DaemonError::CatalogVersion {
                path: self.path.clone(),
                found,
                known: SCHEMA_VERSION,
            });
        }
        Ok(())
    }

    // ---- schedules ----------------------------------------------------------------

    pub fn next_run(&self, policy: &str, schedule: &str) -> Result<Option<i64>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT next_run FROM schedule_state WHERE policy = ?1 AND schedule = ?2",
                params![policy, schedule],
                |r| r.get::<_, Option<i64>>(0),
            )
            .optional()
            .map_err(self.err("reading a schedule"))?
            .flatten())
    }

    pub fn last_run(&self, policy: &str, schedule: &str) -> Result<Option<i64>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT last_run FROM schedule_state WHERE policy = ?1 AND schedule = ?2",
                params![policy, schedule],
                |r| r.get::<_, Option<i64>>(0),
            )
            .optional()
            .map_err(self.err("reading a schedule"))?
            .flatten())
    }

    pub fn set_next_run(
        &self,
        policy: &str,
        schedule: &str,
        next: Option<i64>,
        ran_at: Option<i64>,
    ) -> Result<()> {
        self.conn()
            .execute(
                "INSERT INTO schedule_state(policy, schedule, next_run, last_run) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(policy, schedule) DO UPDATE SET next_run = ?3,
                    last_run = COALESCE(?4, last_run)",
                params![policy, schedule, next, ran_at],
            )
            .map_err(self.err("writing a schedule"))?;
        Ok(())
    }

    // ---- runs -------------------------------------------------------------------------

    pub fn start_run(&self, policy: &str, mode: &str, trigger: &str) -> Result<i64> {
        let c = self.conn();
        c.execute(
            "INSERT INTO runs(policy, mode, trigger, started, status) VALUES (?1, ?2, ?3, ?4, 'running')",
            params![policy, mode, trigger, now()],
        )
        .map_err(self.err("recording a run"))?;
        Ok(c.last_insert_rowid())
    }

    pub fn finish_run(&self, id: i64, status: &str, note: Option<&str>) -> Result<()> {
        self.conn()
            .execute(
                "UPDATE runs SET finished = ?2, status = ?3, note = COALESCE(?4, note) WHERE id = ?1",
                params![id, now(), status, note],
            )
            .map_err(self.err("finishing a run"))?;
        Ok(())
    }

    pub fn finish_run_note(&self, id: i64, note: &str) -> Result<()> {
        self.conn()
            .execute("UPDATE runs SET note = ?2 WHERE id = ?1", params![id, note])
            .map_err(self.err("annotating a run"))?;
        Ok(())
    }

    pub fn runs(&self, policy: Option<&str>, limit: u32) -> Result<Vec<RunRecord>> {
        let c = self.conn();
        let mut st = c
            .prepare(
                "SELECT id, policy, mode, trigger, started, finished, status, note FROM runs
                 WHERE (?1 IS NULL OR policy = ?1) ORDER BY id DESC LIMIT ?2",
            )
            .map_err(self.err("listing runs"))?;
        let rows = st
            .query_map(params![policy, limit], |r| {
                Ok(RunRecord {
                    id: r.get(0)?,
                    policy: r.get(1)?,
                    mode: r.get(2)?,
                    trigger: r.get(3)?,
                    started: rfc3339(r.get(4)?),
                    finished: r.get::<_, Option<i64>>(5)?.map(rfc3339),
                    status: r.get(6)?,
                    note: r.get(7)?,
                })
            })
            .map_err(self.err("listing runs"))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(self.err("listing runs"))
    }

    /// Runs still marked running: their jobs decide when they end.
    pub fn open_runs(&self) -> Result<Vec<(i64, String)>> {
        let c = self.conn();
        let mut st = c
            .prepare("SELECT id, policy FROM runs WHERE status = 'running'")
            .map_err(self.err("listing runs"))?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.err("listing runs"))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(self.err("listing runs"))
    }

    // ---- jobs ---------------------------------------------------------------------------

    pub fn add_job(&self, j: &NewJob<'_>) -> Result<i64> {
        let c = self.conn();
        c.execute(
            "INSERT INTO jobs(run_id, kind, host, vm, policy, request, status, attempt, retry_of,
                              priority, created, not_before)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'queued', ?7, ?8, ?9, ?10, ?11)",
            params![
                j.run_id,
                j.kind,
                j.host,
                j.vm,
                j.policy,
                j.request,
                j.attempt,
                j.retry_of,
                j.priority,
                now(),
                j.not_before
            ],
        )
        .map_err(self.err("recording a job"))?;
        Ok(c.last_insert_rowid())
    }

    pub fn mark_running(&self, id: i64) -> Result<()> {
        self.conn()
            .execute(
                "UPDATE jobs SET status = 'running', started = ?2 WHERE id = ?1",
                params![id, now()],
            )
            .map_err(self.err("starting a job"))?;
        Ok(())
    }

    pub fn finish_job(&self, id: i64, o: &JobOutcome) -> Result<()> {
        let status = if o.cancelled {
            JobStatus::Cancelled
        } else if o.error.is_some() {
            JobStatus::Failed
        } else {
            JobStatus::Succeeded
        }
        .as_str();
        self.conn()
            .execute(
                "UPDATE jobs SET status = ?2, finished = ?3, error = ?4, snapshot = ?5, mode = ?6,
                    bytes_read = ?7, bytes_new = ?8, duration = ?9, pruned = ?10, note = ?11
                 WHERE id = ?1",
                params![
                    id,
                    status,
                    now(),
                    o.error,
                    o.snapshot,
                    o.mode,
                    o.bytes_read,
                    o.bytes_new,
                    o.duration,
                    o.pruned,
                    o.note
                ],
            )
            .map_err(self.err("finishing a job"))?;
        Ok(())
    }

    pub fn job(&self, id: i64) -> Result<JobRecord> {
        let mut list = self.query_jobs("WHERE id = ?1", params![id])?;
        list.pop().ok_or(DaemonError::NoSuchJob(id))
    }

    pub fn jobs(&self, f: &JobFilter) -> Result<Vec<JobRecord>> {
        self.query_jobs(
            "WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR host = ?2)
               AND (?3 IS NULL OR vm = ?3) AND (?4 IS NULL OR run_id = ?4)
             ORDER BY id DESC LIMIT ?5",
            params![
                f.status.map(JobStatus::as_str),
                f.host,
                f.vm,
                f.run_id,
                f.limit.unwrap_or(u32::MAX)
            ],
        )
    }

    fn query_jobs(&self, tail: &str, p: impl rusqlite::Params) -> Result<Vec<JobRecord>> {
        let sql = format!(
            "SELECT id, run_id, kind, host, vm, policy, status, attempt, retry_of, priority,
                    created, not_before, started, finished, error, snapshot, mode, bytes_read,
                    bytes_new, duration, pruned, note, request
             FROM jobs {tail}"
        );
        let c = self.conn();
        let mut st = c.prepare(&sql).map_err(self.err("listing jobs"))?;
        let rows = st
            .query_map(p, |r| {
                Ok(JobRecord {
                    id: r.get(0)?,
                    run_id: r.get(1)?,
                    kind: r.get(2)?,
                    host: r.get(3)?,
                    vm: r.get(4)?,
                    policy: r.get(5)?,
                    status: JobStatus::parse(&r.get::<_, String>(6)?),
                    attempt: r.get(7)?,
                    retry_of: r.get(8)?,
                    priority: r.get(9)?,
                    created: rfc3339(r.get(10)?),
                    not_before: rfc3339(r.get(11)?),
                    started: r.get::<_, Option<i64>>(12)?.map(rfc3339),
                    finished: r.get::<_, Option<i64>>(13)?.map(rfc3339),
                    error: r.get(14)?,
                    snapshot: r.get(15)?,
                    mode: r.get(16)?,
                    bytes_read: r.get(17)?,
                    bytes_new: r.get(18)?,
                    duration_secs: r.get(19)?,
                    pruned: r.get(20)?,
                    note: r.get(21)?,
                    request: r.get(22)?,
                })
            })
            .map_err(self.err("listing jobs"))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(self.err("listing jobs"))
    }

    /// Whether `policy` already has a queued or running job for this VM.
    pub fn has_open_job(&self, host: &str, vm: &str, policy: &str) -> Result<bool> {
        self.conn()
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM jobs WHERE host = ?1 AND vm = ?2 AND policy = ?3
                                AND status IN ('queued', 'running'))",
                params![host, vm, policy],
                |r| r.get(0),
            )
            .map_err(self.err("reading jobs"))
    }

    /// Raw `not_before` of a queued job (unix seconds), for the dispatcher.
    pub fn not_before(&self, id: i64) -> Result<i64> {
        self.conn()
            .query_row(
                "SELECT not_before FROM jobs WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .map_err(self.err("reading a job"))
    }

    /// At start-up: jobs a dead daemon left `running` become failed; returns them.
    pub fn fail_orphans(&self, why: &str) -> Result<Vec<JobRecord>> {
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

    /// Counts of a run's jobs: (total tries that are final, failed among them,
    /// queued or running).
    pub fn run_counts(&self, run_id: i64) -> Result<(i64, i64, i64)> {
        // A job that was retried is not final: its retry (retry_of = it) decides.
        self.conn()
            .query_row(
                "SELECT
                   COUNT(*) FILTER (WHERE status IN ('succeeded','failed','cancelled')
                                    AND id NOT IN (SELECT retry_of FROM jobs WHERE retry_of IS NOT NULL)),
                   COUNT(*) FILTER (WHERE status IN ('failed','cancelled')
                                    AND id NOT IN (SELECT retry_of FROM jobs WHERE retry_of IS NOT NULL)),
                   COUNT(*) FILTER (WHERE status IN ('queued','running'))
                 FROM jobs WHERE run_id = ?1",
                params![run_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map_err(self.err("counting a run's jobs"))
    }

    /// Finished jobs, for the history retention (`history::expired`).
    pub fn finished_jobs(&self) -> Result<Vec<crate::history::FinishedJob>> {
        let c = self.conn();
        let mut st = c
            .prepare(
                "SELECT id, host, vm, kind = 'backup' AND status = 'succeeded', finished FROM jobs
                 WHERE status IN ('succeeded', 'failed', 'cancelled') AND finished IS NOT NULL",
            )
            .map_err(self.err("listing finished jobs"))?;
        let rows = st
            .query_map([], |r| {
                Ok(crate::history::FinishedJob {
                    id: r.get(0)?,
                    host: r.get(1)?,
                    vm: r.get(2)?,
                    backup_success: r.get(3)?,
                    finished: r.get(4)?,
                })
            })
            .map_err(self.err("listing finished jobs"))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(self.err("listing finished jobs"))
    }

    /// Deletes finished jobs (never queued or running ones), in one transaction: a
    /// retry that pointed at a deleted try no longer does, and finished runs left
    /// without jobs go too. Returns the number of jobs deleted.
    pub fn forget_jobs(&self, ids: &[i64]) -> Result<usize> {
        let mut c = self.conn();
        let tx = c.transaction().map_err(self.err("forgetting jobs"))?;
        let mut deleted = 0;
        let mut runs = std::collections::BTreeSet::new();
        for id in ids {
            let run: Option<Option<i64>> = tx
                .query_row(
                    "SELECT run_id FROM jobs WHERE id = ?1 AND status IN ('succeeded','failed','cancelled')",
                    params![id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(self.err("forgetting jobs"))?;
            let Some(run) = run else { continue };
            runs.extend(run);
            tx.execute(
                "UPDATE jobs SET retry_of = NULL WHERE retry_of = ?1",
                params![id],
            )
            .and_then(|_| tx.execute("DELETE FROM jobs WHERE id = ?1", params![id]))
            .map_err(self.err("forgetting jobs"))?;
            deleted += 1;
        }
        for run in runs {
            tx.execute(
                "DELETE FROM runs WHERE id = ?1 AND status != 'running'
                   AND NOT EXISTS (SELECT 1 FROM jobs WHERE run_id = ?1)",
                params![run],
            )
            .map_err(self.err("forgetting runs"))?;
        }
        tx.commit().map_err(self.err("forgetting jobs"))?;
        Ok(deleted)
    }

    /// Applies the history limits at `now`; returns the number of jobs removed.
    pub fn apply_history_limits(
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

    /// Per-VM figures for `/metrics`.
    pub fn vm_stats(&self) -> Result<Vec<VmStats>> {
        let c = self.conn();
        let mut st = c
            .prepare(
                "SELECT host, vm,
                    MAX(finished) FILTER (WHERE status = 'succeeded'),
                    COUNT(*) FILTER (WHERE status = 'failed'),
                    COUNT(*) FILTER (WHERE status = 'succeeded')
                 FROM jobs WHERE kind = 'backup' GROUP BY host, vm ORDER BY host, vm",
            )
            .map_err(self.err("reading metrics"))?;
        let rows = st
            .query_map([], |r| {
                Ok(VmStats {
                    host: r.get(0)?,
                    vm: r.get(1)?,
                    last_success: r.get(2)?,
                    failures: r.get(3)?,
                    successes: r.get(4)?,
                    last_bytes_read: None,
                    last_bytes_new: None,
                    last_duration: None,
                })
            })
            .map_err(self.err("reading metrics"))?;
        let mut list: Vec<VmStats> = rows
            .collect::<std::result::Result<_, _>>()
            .map_err(self.err("reading metrics"))?;
        let mut last = c
            .prepare(
                "SELECT bytes_read, bytes_new, duration FROM jobs
                 WHERE kind = 'backup' AND status = 'succeeded' AND host = ?1 AND vm = ?2
                 ORDER BY finished DESC, id DESC LIMIT 1",
            )
            .map_err(self.err("reading metrics"))?;
        for s in &mut list {
            if let Some((r, n, d)) = last
                .query_row(params![s.host, s.vm], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()
                .map_err(self.err("reading metrics"))?
            {
                s.last_bytes_read = r;
                s.last_bytes_new = n;
                s.last_duration = d;
            }
        }
        Ok(list)
    }

    /// Number of jobs per status.
    pub fn status_counts(&self) -> Result<Vec<(String, i64)>> {
        let c = self.conn();
        let mut st = c
            .prepare("SELECT status, COUNT(*) FROM jobs GROUP BY status ORDER BY status")
            .map_err(self.err("reading metrics"))?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.err("reading metrics"))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(self.err("reading metrics"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job<'a>(run: Option<i64>, vm: &'a str) -> NewJob<'a> {
        NewJob {
            run_id: run,
            kind: "backup",
            host: "kvm1",
            vm,
            policy: Some("p"),
            request: "{}",
            attempt: 1,
            retry_of: None,
            priority: 0,
            not_before: 0,
        }
    }

    #[test]
    fn state_survives_reopening_and_orphans_fail() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("c.sqlite");
        let (run, id) = {
            let c = Catalog::open_writer(&path).expect("open");
            // A second daemon on the same catalog is refused.
            assert!(matches!(
                Catalog::open_writer(&path),
                Err(DaemonError::CatalogBusy { .. })
            ));
            c.set_next_run("p", "every 5s auto", Some(100), None)
                .expect("set");
            let run = c.start_run("p", "auto", "schedule").expect("run");
            let id = c.add_job(&job(Some(run), "a")).expect("job");
            c.add_job(&job(Some(run), "b")).expect("job");
            c.mark_running(id).expect("running");
            (run, id)
        };
        let c = Catalog::open_writer(&path).expect("reopen");
        assert_eq!(c.next_run("p", "every 5s auto").expect("n"), Some(100));
        let orphans = c.fail_orphans("daemon died").expect("orphans");
        assert_eq!(orphans.iter().map(|j| j.id).collect::<Vec<_>>(), vec![id]);
        assert_eq!(orphans[0].status, JobStatus::Failed);
        let j = c.job(id).expect("job");
        assert_eq!(j.status, JobStatus::Failed);
        assert_eq!(j.error.as_deref(), Some("daemon died"));
        assert_eq!(c.run_counts(run).expect("counts"), (1, 1, 1));
        // A retry replaces the failed try in the run's counts.
        let mut retry = job(Some(run), "a");
        retry.attempt = 2;
        retry.retry_of = Some(id);
        let r = c.add_job(&retry).expect("retry");
        c.finish_job(r, &JobOutcome::default()).expect("finish");
        assert_eq!(c.run_counts(run).expect("counts"), (1, 0, 1));
        let reader = Catalog::open_reader(&path)
            .expect("reader")
            .expect("exists");
        assert_eq!(reader.jobs(&JobFilter::default()).expect("jobs").len(), 3);
        assert!(
            Catalog::open_reader(&dir.path().join("none"))
                .expect("ok")
                .is_none()
        );
    }

    #[test]
    fn history_limits_remove_old_finished_jobs_and_their_empty_runs() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = Catalog::open_writer(&dir.path().join("c.sqlite")).expect("open");
        let run = c.start_run("p", "auto", "schedule").expect("run");
        let first = c.add_job(&job(Some(run), "a")).expect("job");
        c.finish_job(
            first,
            &JobOutcome {
                error: Some("boom".into()),
                ..Default::default()
            },
        )
        .expect("finish");
        let mut retry = job(Some(run), "a");
        retry.attempt = 2;
        retry.retry_of = Some(first);
        let second = c.add_job(&retry).expect("retry");
        c.finish_job(second, &JobOutcome::default())
            .expect("finish");
        c.finish_run(run, "succeeded", None).expect("run done");
        let queued = c.add_job(&job(None, "b")).expect("queued");
        let cancelled = c.add_job(&job(None, "b")).expect("job");
        c.finish_job(
            cancelled,
            &JobOutcome {
                cancelled: true,
                error: Some("x".into()),
                ..Default::default()
            },
        )
        .expect("cancel");
        assert_eq!(c.job(cancelled).expect("job").status, JobStatus::Cancelled);
        // Everything finished is "old" a year later; a's success stays as its last one.
        let limits = crate::history::HistoryLimits {
            max_age: std::time::Duration::from_secs(86400),
            max_jobs: 1000,
        };
        let removed = c
            .apply_history_limits(limits, now() + 365 * 86400)
            .expect("apply");
        assert_eq!(removed, 2);
        let left: Vec<i64> = c
            .jobs(&JobFilter::default())
            .expect("jobs")
            .iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(left, vec![queued, second]);
        // The retry no longer points at the deleted try; the run still has a job.
        assert_eq!(c.job(second).expect("job").retry_of, None);
        assert_eq!(c.runs(None, 10).expect("runs").len(), 1);
        // Queued and running jobs are never removed, whatever is asked.
        assert_eq!(c.forget_jobs(&[queued, second]).expect("forget"), 1);
        assert_eq!(
            c.runs(None, 10).expect("runs").len(),
            0,
            "an empty finished run goes"
        );
        assert_eq!(c.job(queued).expect("job").status, JobStatus::Queued);
    }

    #[test]
    fn vm_stats_take_the_last_success() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = Catalog::open_writer(&dir.path().join("c.sqlite")).expect("open");
        for (bytes, err) in [(10, None), (20, None), (0, Some("boom".to_string()))] {
            let id = c.add_job(&job(None, "a")).expect("job");
            c.finish_job(
                id,
                &JobOutcome {
                    error: err,
                    bytes_new: Some(bytes),
                    ..Default::default()
                },
            )
            .expect("finish");
        }
        let s = c.vm_stats().expect("stats");
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].successes, s[0].failures), (2, 1));
        assert_eq!(s[0].last_bytes_new, Some(20));
        assert!(s[0].last_success.is_some());
    }
}
