//! The embedded catalog: one SQLite file (WAL) for one node.
//!
//! One daemon writes a catalog (it holds an exclusive `flock` on `<catalog>.lock`);
//! `virtkeep jobs`, `virtkeep policy list` and the API read it concurrently, which WAL
//! allows without blocking the writer. All access goes through one connection per
//! process behind a mutex: statements are short, and SQLite serialises writers anyway.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::{
    Claim, JobFilter, JobOutcome, JobRecord, JobStatus, NewJob, NodeRecord, NodeRegistration,
    RunRecord, SCHEMA_VERSION, Store, VmStats, now, rfc3339,
};
use crate::error::{DaemonError, Result};

/// Version 1: the tables of a single node.
const V1: &str = r#"
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
/// Version 2: the nodes of a cluster, and which node runs each job until when.
const V2: &str = r#"
ALTER TABLE jobs ADD COLUMN node TEXT;
ALTER TABLE jobs ADD COLUMN lease_until INTEGER;
CREATE TABLE IF NOT EXISTS nodes (
    name       TEXT PRIMARY KEY,
    address    TEXT,
    capacity   INTEGER NOT NULL,
    started    INTEGER NOT NULL,
    heartbeat  INTEGER NOT NULL,
    lease_secs INTEGER NOT NULL,
    leader     INTEGER NOT NULL DEFAULT 0
);
"#;
/// Version 3: jobs by kind (boot verifications and sync runs beside the backups).
const V3: &str = r#"
CREATE INDEX IF NOT EXISTS jobs_by_kind ON jobs(kind, host, vm, finished);
"#;

pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
    /// Held by the writing daemon for its lifetime.
    _lock: Option<std::fs::File>,
}

fn lock_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

impl SqliteStore {
    /// Opens (creating it if needed) the catalog for the daemon, which writes it: takes
    /// the exclusive daemon lock, so a second daemon on the same catalog fails at once.
    pub fn open_writer(path: &Path) -> Result<SqliteStore> {
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
        let cat = SqliteStore {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
            _lock: Some(file),
        };
        cat.init()?;
        Ok(cat)
    }

    /// Opens an existing catalog to queue a job beside its daemon: as a reader, but
    /// refused when this user may only read it.
    pub fn open_submitter(path: &Path) -> Result<Option<SqliteStore>> {
        let Some(cat) = SqliteStore::open_reader(path)? else {
            return Ok(None);
        };
        let read_only = cat.conn().is_readonly("main");
        if read_only.map_err(cat.err("opening to write"))? {
            return Err(DaemonError::Io {
                what: "writing the catalog (this user may only read it)",
                path: path.to_path_buf(),
                source: std::io::ErrorKind::PermissionDenied.into(),
            });
        }
        Ok(Some(cat))
    }

    /// Opens an existing catalog to read (CLI commands); `None` when none exists yet.
    pub fn open_reader(path: &Path) -> Result<Option<SqliteStore>> {
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
        let cat = SqliteStore {
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
        // A catalog of an older version (the daemon was not restarted since the
        // upgrade) is upgraded when this user may write it; the old daemon's statements
        // name their columns, so they keep working.
        if cat.check_version().is_err() {
            let _ = cat.migrate();
        }
        cat.check_version()?;
        Ok(Some(cat))
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
        }
        self.migrate()?;
        self.check_version()
    }

    /// Brings the tables to [`SCHEMA_VERSION`], one migration at a time, in one
    /// transaction (a reader never sees tables without their version).
    fn migrate(&self) -> Result<()> {
        let mut c = self.conn();
        let tx = c
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(self.err("creating the schema"))?;
        tx.execute_batch(V1)
            .map_err(self.err("creating the schema"))?;
        tx.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', '1')",
            [],
        )
        .map_err(self.err("creating the schema"))?;
        let found: i64 = tx
            .query_row(
                "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .map_err(self.err("reading the schema version"))?;
        if found < 2 {
            tx.execute_batch(V2)
                .map_err(self.err("upgrading the schema to version 2"))?;
        }
        if found < 3 {
            tx.execute_batch(V3)
                .map_err(self.err("upgrading the schema to version 3"))?;
        }
        if found < SCHEMA_VERSION {
            tx.execute(
                "UPDATE meta SET value = ?1 WHERE key = 'schema_version'",
                params![SCHEMA_VERSION.to_string()],
            )
            .map_err(self.err("upgrading the schema"))?;
        }
        tx.commit().map_err(self.err("creating the schema"))?;
        drop(c);
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
    fn query_jobs(&self, tail: &str, p: impl rusqlite::Params) -> Result<Vec<JobRecord>> {
        let sql = format!(
            "SELECT id, run_id, kind, host, vm, policy, status, attempt, retry_of, priority,
                    created, not_before, started, finished, error, snapshot, mode, bytes_read,
                    bytes_new, duration, pruned, note, request, node
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
                    node: r.get(23)?,
                })
            })
            .map_err(self.err("listing jobs"))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(self.err("listing jobs"))
    }
}

impl Store for SqliteStore {
    #[cfg(test)]
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn next_run(&self, policy: &str, schedule: &str) -> Result<Option<i64>> {
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

    fn last_run(&self, policy: &str, schedule: &str) -> Result<Option<i64>> {
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

    fn set_next_run(
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

    fn start_run(&self, policy: &str, mode: &str, trigger: &str) -> Result<i64> {
        let c = self.conn();
        c.execute(
            "INSERT INTO runs(policy, mode, trigger, started, status) VALUES (?1, ?2, ?3, ?4, 'running')",
            params![policy, mode, trigger, now()],
        )
        .map_err(self.err("recording a run"))?;
        Ok(c.last_insert_rowid())
    }

    fn finish_run(&self, id: i64, status: &str, note: Option<&str>) -> Result<()> {
        self.conn()
            .execute(
                "UPDATE runs SET finished = ?2, status = ?3, note = COALESCE(?4, note) WHERE id = ?1",
                params![id, now(), status, note],
            )
            .map_err(self.err("finishing a run"))?;
        Ok(())
    }

    fn finish_run_note(&self, id: i64, note: &str) -> Result<()> {
        self.conn()
            .execute("UPDATE runs SET note = ?2 WHERE id = ?1", params![id, note])
            .map_err(self.err("annotating a run"))?;
        Ok(())
    }

    fn runs(&self, policy: Option<&str>, limit: u32) -> Result<Vec<RunRecord>> {
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

    fn open_runs(&self) -> Result<Vec<(i64, String)>> {
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

    fn add_job(&self, j: &NewJob<'_>) -> Result<i64> {
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

    fn start_job(&self, j: &NewJob<'_>, node: &str, lease_until: i64) -> Result<i64> {
        let c = self.conn();
        c.execute(
            "INSERT INTO jobs(run_id, kind, host, vm, policy, request, status, attempt, retry_of,
                              priority, created, not_before, started, node, lease_until)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'running', ?7, ?8, ?9, ?10, ?10, ?10, ?11, ?12)",
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
                node,
                lease_until
            ],
        )
        .map_err(self.err("recording a job"))?;
        Ok(c.last_insert_rowid())
    }

    fn last_jobs(&self, kind: &str) -> Result<Vec<JobRecord>> {
        self.query_jobs(
            "WHERE id IN (SELECT MAX(id) FROM jobs
                          WHERE kind = ?1 AND status IN ('succeeded', 'failed', 'cancelled')
                          GROUP BY host, vm)
             ORDER BY host, vm",
            params![kind],
        )
    }

    fn mark_running(&self, id: i64, node: &str, lease_until: i64) -> Result<()> {
        self.conn()
            .execute(
                "UPDATE jobs SET status = 'running', started = ?2, node = ?3, lease_until = ?4
                 WHERE id = ?1 AND status = 'queued'",
                params![id, now(), node, lease_until],
            )
            .map_err(self.err("starting a job"))?;
        Ok(())
    }

    fn set_job_note(&self, id: i64, note: &str) -> Result<()> {
        self.conn()
            .execute(
                "UPDATE jobs SET note = ?2 WHERE id = ?1 AND status = 'running'",
                params![id, note],
            )
            .map_err(self.err("noting a job's progress"))?;
        Ok(())
    }

    fn cancel_queued(&self, id: i64, error: &str) -> Result<bool> {
        let n = self
            .conn()
            .execute(
                "UPDATE jobs SET status = 'cancelled', finished = ?2, error = ?3
                 WHERE id = ?1 AND status = 'queued'",
                params![id, now(), error],
            )
            .map_err(self.err("cancelling a job"))?;
        Ok(n == 1)
    }

    fn finish_job(&self, id: i64, o: &JobOutcome) -> Result<()> {
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

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn shared(&self) -> bool {
        false
    }

    fn job(&self, id: i64) -> Result<JobRecord> {
        let mut list = self.query_jobs("WHERE id = ?1", params![id])?;
        list.pop().ok_or(DaemonError::NoSuchJob(id))
    }

    fn jobs(&self, f: &JobFilter) -> Result<Vec<JobRecord>> {
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

    fn has_open_job(&self, host: &str, vm: &str, policy: &str, kind: &str) -> Result<bool> {
        self.conn()
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM jobs WHERE host = ?1 AND vm = ?2 AND policy = ?3
                                AND kind = ?4 AND status IN ('queued', 'running'))",
                params![host, vm, policy, kind],
                |r| r.get(0),
            )
            .map_err(self.err("reading jobs"))
    }

    fn not_before(&self, id: i64) -> Result<i64> {
        self.conn()
            .query_row(
                "SELECT not_before FROM jobs WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .map_err(self.err("reading a job"))
    }

    fn run_counts(&self, run_id: i64) -> Result<(i64, i64, i64)> {
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

    fn finished_jobs(&self) -> Result<Vec<crate::history::FinishedJob>> {
        let c = self.conn();
        let mut st = c
            .prepare(
                "SELECT id, host, vm, kind,
                        status = 'succeeded'
                          AND kind IN ('backup', 'verify_boot', 'sync', 'gc', 'verify'),
                        finished FROM jobs
                 WHERE status IN ('succeeded', 'failed', 'cancelled') AND finished IS NOT NULL",
            )
            .map_err(self.err("listing finished jobs"))?;
        let rows = st
            .query_map([], |r| {
                Ok(crate::history::FinishedJob {
                    id: r.get(0)?,
                    host: r.get(1)?,
                    vm: r.get(2)?,
                    kind: r.get(3)?,
                    success: r.get(4)?,
                    finished: r.get(5)?,
                })
            })
            .map_err(self.err("listing finished jobs"))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(self.err("listing finished jobs"))
    }

    fn forget_jobs(&self, ids: &[i64]) -> Result<usize> {
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

    fn recent_backups(&self, per_vm: u32) -> Result<Vec<JobRecord>> {
        self.query_jobs(
            "WHERE id IN (SELECT id FROM (SELECT id, ROW_NUMBER() OVER
                 (PARTITION BY host, vm ORDER BY id DESC) AS n FROM jobs WHERE kind = 'backup')
               WHERE n <= ?1)
             ORDER BY host, vm, id DESC",
            params![per_vm],
        )
    }

    fn vm_stats_of(&self, kind: &str) -> Result<Vec<VmStats>> {
        let c = self.conn();
        let mut st = c
            .prepare(
                "SELECT host, vm,
                    MAX(finished) FILTER (WHERE status = 'succeeded'),
                    COUNT(*) FILTER (WHERE status = 'failed'),
                    COUNT(*) FILTER (WHERE status = 'succeeded')
                 FROM jobs WHERE kind = ?1 GROUP BY host, vm ORDER BY host, vm",
            )
            .map_err(self.err("reading metrics"))?;
        let rows = st
            .query_map(params![kind], |r| {
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
                 WHERE kind = ?3 AND status = 'succeeded' AND host = ?1 AND vm = ?2
                 ORDER BY finished DESC, id DESC LIMIT 1",
            )
            .map_err(self.err("reading metrics"))?;
        for s in &mut list {
            if let Some((r, n, d)) = last
                .query_row(params![s.host, s.vm, kind], |r| {
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

    fn status_counts(&self) -> Result<Vec<(String, i64)>> {
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

    fn register_node(&self, n: &NodeRegistration<'_>) -> Result<()> {
        self.conn()
            .execute(
                "INSERT INTO nodes(name, address, capacity, started, heartbeat, lease_secs)
                 VALUES (?1, ?2, ?3, ?4, ?4, ?5)
                 ON CONFLICT(name) DO UPDATE SET address = ?2, capacity = ?3, started = ?4,
                    heartbeat = ?4, lease_secs = ?5",
                params![n.name, n.address, n.capacity, n.now, n.lease_secs],
            )
            .map_err(self.err("registering the node"))?;
        Ok(())
    }

    fn heartbeat(&self, node: &str, now: i64, lease_until: i64, leader: bool) -> Result<()> {
        let mut c = self.conn();
        let tx = c.transaction().map_err(self.err("heartbeat"))?;
        tx.execute(
            "UPDATE nodes SET heartbeat = ?2, leader = ?3 WHERE name = ?1",
            params![node, now, leader],
        )
        .and_then(|_| {
            tx.execute(
                "UPDATE jobs SET lease_until = ?2 WHERE node = ?1 AND status = 'running'",
                params![node, lease_until],
            )
        })
        .map_err(self.err("heartbeat"))?;
        tx.commit().map_err(self.err("heartbeat"))
    }

    fn nodes(&self, now: i64) -> Result<Vec<NodeRecord>> {
        let c = self.conn();
        let mut st = c
            .prepare(
                "SELECT name, address, capacity,
                    (SELECT COUNT(*) FROM jobs WHERE jobs.node = nodes.name AND status = 'running'),
                    started, heartbeat, heartbeat + lease_secs >= ?1, leader != 0
                 FROM nodes ORDER BY name",
            )
            .map_err(self.err("listing nodes"))?;
        let rows = st
            .query_map(params![now], |r| {
                Ok(NodeRecord {
                    name: r.get(0)?,
                    address: r.get(1)?,
                    capacity: r.get(2)?,
                    running: r.get(3)?,
                    started: rfc3339(r.get(4)?),
                    heartbeat: rfc3339(r.get(5)?),
                    alive: r.get(6)?,
                    leader: r.get(7)?,
                })
            })
            .map_err(self.err("listing nodes"))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(self.err("listing nodes"))
    }

    fn claim(&self, c: &Claim<'_>) -> Result<Vec<JobRecord>> {
        // One writer holds the file: the queue and the running set cannot change under us.
        let queued = self.query_jobs(
            "WHERE status = 'queued' AND not_before <= ?1
             ORDER BY priority DESC, not_before, id LIMIT 500",
            params![c.now],
        )?;
        // Sync, GC and verify runs (kinds 'sync', 'gc', 'verify') work on repositories,
        // beside the backup queue: they take none of the dispatch slots (a long sync or a
        // 12 h verify must not stop the backups).
        let running = self.query_jobs(
            "WHERE status = 'running' AND kind NOT IN ('sync', 'gc', 'verify')",
            [],
        )?;
        let mut taken = Vec::new();
        for id in (c.choose)(&queued, &running) {
            self.mark_running(id, c.node, c.lease_until)?;
            taken.push(self.job(id)?);
        }
        Ok(taken)
    }

    fn take_orphans(&self, own: Option<&str>, now: i64, why: &str) -> Result<Vec<JobRecord>> {
        let orphans = self.query_jobs(
            "WHERE status = 'running' AND (node IS NULL OR node = ?1 OR lease_until < ?2)",
            params![own, now],
        )?;
        let mut failed = Vec::new();
        for j in orphans {
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

    fn try_lead(&self) -> Result<bool> {
        // The writer lock makes this process the only node.
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;

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
            c.mark_running(id, "n1", now() + 60).expect("running");
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
    fn a_version_1_catalog_is_upgraded_and_keeps_its_jobs() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("c.sqlite");
        {
            let old = Connection::open(&path).expect("open");
            old.execute_batch(V1).expect("v1");
            old.execute_batch(
                "INSERT INTO meta(key, value) VALUES ('schema_version', '1');
                 INSERT INTO jobs(kind, host, vm, request, status, created, not_before)
                    VALUES ('backup', 'kvm1', 'a', '{}', 'succeeded', 1, 1);",
            )
            .expect("v1 rows");
        }
        // A reader upgrades it (the file is writable), then the daemon opens it.
        let r = Catalog::open_reader(&path)
            .expect("reader")
            .expect("exists");
        assert_eq!(r.jobs(&JobFilter::default()).expect("jobs")[0].node, None);
        drop(r);
        let c = Catalog::open_writer(&path).expect("writer");
        let id = c.add_job(&job(None, "b")).expect("job");
        c.mark_running(id, "n1", now() + 60).expect("running");
        assert_eq!(c.job(id).expect("job").node.as_deref(), Some("n1"));
        assert_eq!(c.jobs(&JobFilter::default()).expect("jobs").len(), 2);
        let v: String = c
            .as_any()
            .downcast_ref::<SqliteStore>()
            .expect("sqlite")
            .conn()
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .expect("version");
        assert_eq!(v, SCHEMA_VERSION.to_string());
    }

    /// A version 2 catalog (before boot verification and sync runs were jobs) is
    /// upgraded in place: its jobs stay, the kind index appears, and the new kinds are
    /// counted apart from the backups.
    #[test]
    fn a_version_2_catalog_is_upgraded_in_place_to_3() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("c.sqlite");
        {
            let old = Connection::open(&path).expect("open");
            old.execute_batch(V1).expect("v1");
            old.execute_batch(V2).expect("v2");
            old.execute_batch(
                "INSERT INTO meta(key, value) VALUES ('schema_version', '2');
                 INSERT INTO jobs(kind, host, vm, request, status, created, not_before, finished)
                    VALUES ('backup', 'kvm1', 'a', '{}', 'succeeded', 1, 1, 5);",
            )
            .expect("v2 rows");
        }
        let c = Catalog::open_writer(&path).expect("writer");
        let conn = c
            .as_any()
            .downcast_ref::<SqliteStore>()
            .expect("sqlite")
            .conn();
        let (v, index): (String, bool) = conn
            .query_row(
                "SELECT (SELECT value FROM meta WHERE key = 'schema_version'),
                        EXISTS(SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'jobs_by_kind')",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("version");
        drop(conn);
        assert_eq!((v.as_str(), index), ("3", true));
        let verify = c
            .add_job(&NewJob {
                kind: "verify_boot",
                ..job(None, "a")
            })
            .expect("job");
        c.finish_job(
            verify,
            &JobOutcome {
                error: Some("no marker".into()),
                ..Default::default()
            },
        )
        .expect("finish");
        let sync = c
            .start_job(
                &NewJob {
                    kind: "sync",
                    host: "",
                    ..job(None, "offsite")
                },
                "n1",
                now() + 60,
            )
            .expect("sync");
        assert_eq!(c.job(sync).expect("job").status, JobStatus::Running);
        let backups = c.vm_stats().expect("stats");
        assert_eq!((backups.len(), backups[0].successes), (1, 1));
        let verified = c.vm_stats_of("verify_boot").expect("stats");
        assert_eq!((verified[0].failures, verified[0].last_success), (1, None));
        let last = c.last_jobs("verify_boot").expect("last");
        assert_eq!(last.iter().map(|j| j.id).collect::<Vec<_>>(), vec![verify]);
        assert!(
            c.last_jobs("sync").expect("last").is_empty(),
            "still running"
        );
    }

    /// A running sync run takes no slot: with one job per node, a backup still starts.
    #[test]
    fn a_running_sync_does_not_take_a_dispatch_slot() {
        use crate::dispatch::{Pending, Running};
        let dir = tempfile::tempdir().expect("tmp");
        let c = Catalog::open_writer(&dir.path().join("c.sqlite")).expect("open");
        let sync = NewJob {
            kind: "sync",
            host: "",
            ..job(None, "offsite")
        };
        c.start_job(&sync, "n1", now() + 60).expect("sync");
        let backup = c.add_job(&job(None, "a")).expect("job");
        let choose = |q: &[JobRecord], r: &[JobRecord]| {
            let q: Vec<Pending> = q
                .iter()
                .map(|j| Pending {
                    id: j.id,
                    host: j.host.clone(),
                    vm: j.vm.clone(),
                    slot: j.host.clone(),
                    priority: j.priority,
                    not_before: 0,
                    run_id: j.run_id,
                })
                .collect();
            let r: Vec<Running> = r
                .iter()
                .map(|j| Running {
                    node: j.node.clone().unwrap_or_default(),
                    host: j.host.clone(),
                    vm: j.vm.clone(),
                    slot: j.host.clone(),
                })
                .collect();
            crate::dispatch::choose("n1", &q, &r, 1, &|_| 4)
        };
        let taken = c
            .claim(&Claim {
                node: "n1",
                now: now(),
                lease_until: now() + 60,
                choose: &choose,
            })
            .expect("claim");
        assert_eq!(taken.iter().map(|j| j.id).collect::<Vec<_>>(), vec![backup]);
    }

    #[test]
    fn recent_backups_are_the_newest_per_vm_and_only_backups() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = Catalog::open_writer(&dir.path().join("c.sqlite")).expect("open");
        let mut ids = Vec::new();
        for vm in ["b", "a", "b", "a", "b"] {
            ids.push(c.add_job(&job(None, vm)).expect("job"));
        }
        let restore = NewJob {
            kind: "restore",
            ..job(None, "a")
        };
        c.add_job(&restore).expect("restore");
        let got: Vec<(String, i64)> = c
            .recent_backups(2)
            .expect("recent")
            .into_iter()
            .map(|j| (j.vm, j.id))
            .collect();
        let want = [
            ("a".to_string(), ids[3]),
            ("a".to_string(), ids[1]),
            ("b".to_string(), ids[4]),
            ("b".to_string(), ids[2]),
        ];
        assert_eq!(got, want);
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

    /// Sync, GC and verify runs work beside the backup queue: a running one is not
    /// among the running jobs the chooser counts against the job limits.
    #[test]
    fn repository_runs_take_no_dispatch_slot() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = Catalog::open_writer(&dir.path().join("c.sqlite")).expect("open");
        let backup = c.add_job(&job(None, "a")).expect("job");
        c.mark_running(backup, "n1", now() + 60).expect("running");
        for kind in ["sync", "gc", "verify"] {
            let id = c
                .add_job(&NewJob {
                    kind,
                    host: "",
                    vm: "default",
                    ..job(None, "default")
                })
                .expect("job");
            c.mark_running(id, "n1", now() + 60).expect("running");
        }
        let seen = std::sync::Mutex::new(Vec::new());
        let choose = |_: &[JobRecord], running: &[JobRecord]| {
            *seen.lock().expect("lock") = running.iter().map(|j| j.id).collect();
            Vec::new()
        };
        c.claim(&Claim {
            node: "n1",
            now: now(),
            lease_until: now() + 60,
            choose: &choose,
        })
        .expect("claim");
        assert_eq!(*seen.lock().expect("lock"), vec![backup]);
    }

    /// History limits keep the newest successful GC and verify run of a repository
    /// (and of a sync), like a VM's last backup: older successes go.
    #[test]
    fn history_limits_keep_the_last_gc_verify_and_sync_success() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = Catalog::open_writer(&dir.path().join("c.sqlite")).expect("open");
        let mut kept = Vec::new();
        for kind in ["gc", "verify", "sync"] {
            for _ in 0..2 {
                let id = c
                    .add_job(&NewJob {
                        kind,
                        host: "",
                        ..job(None, "default")
                    })
                    .expect("job");
                c.finish_job(id, &JobOutcome::default()).expect("finish");
                kept.push(id);
            }
        }
        let limits = crate::history::HistoryLimits {
            max_age: std::time::Duration::from_secs(86400),
            max_jobs: 1000,
        };
        let removed = c
            .apply_history_limits(limits, now() + 365 * 86400)
            .expect("apply");
        // Same finish second: the higher id is the newer one of each kind.
        let mut left: Vec<i64> = c
            .jobs(&JobFilter::default())
            .expect("jobs")
            .iter()
            .map(|j| j.id)
            .collect();
        left.sort_unstable();
        assert_eq!((removed, left), (3, vec![kept[1], kept[3], kept[5]]));
    }
}
