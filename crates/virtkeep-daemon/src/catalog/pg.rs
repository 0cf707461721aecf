//! The shared catalog: PostgreSQL, for several nodes with one queue.
//!
//! The [`Store`] methods are synchronous like SQLite's; each runs its statements on a
//! small runtime of its own (the pool's connections live there), from a scoped thread,
//! so that a caller inside or outside an async runtime waits the same way.
//!
//! Claims are serialised by one transaction-scoped advisory lock and take queued rows
//! with `FOR UPDATE SKIP LOCKED`: the per-VM and per-host rules see every node's running
//! jobs, and no job is taken twice. The leader holds a session advisory lock on a
//! connection of its own, which PostgreSQL releases when that connection (the node) dies.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_postgres::{NoTls, Row};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{
    Claim, JobFilter, JobOutcome, JobRecord, JobStatus, NewJob, NodeRecord, NodeRegistration,
    RunRecord, SCHEMA_VERSION, Store, VmStats, now, rfc3339,
};
use crate::error::{DaemonError, Result};

/// Advisory lock keys (arbitrary, fixed: every node must use the same).
const MIGRATE_LOCK: i64 = 0x7669_726b_0001;
const CLAIM_LOCK: i64 = 0x7669_726b_0002;
const LEADER_LOCK: i64 = 0x7669_726b_0003;

/// Each statement's deadline (set on the server: `statement_timeout`).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Migrations, applied in order; `schema_version` records the ones done.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        r#"
CREATE TABLE IF NOT EXISTS schedule_state (
    policy TEXT NOT NULL, schedule TEXT NOT NULL, next_run BIGINT, last_run BIGINT,
    PRIMARY KEY (policy, schedule)
);
CREATE TABLE IF NOT EXISTS runs (
    id BIGSERIAL PRIMARY KEY, policy TEXT NOT NULL, mode TEXT NOT NULL, trigger TEXT NOT NULL,
    started BIGINT NOT NULL, finished BIGINT, status TEXT NOT NULL, note TEXT
);
CREATE TABLE IF NOT EXISTS jobs (
    id BIGSERIAL PRIMARY KEY, run_id BIGINT REFERENCES runs(id), kind TEXT NOT NULL,
    host TEXT NOT NULL, vm TEXT NOT NULL, policy TEXT, request TEXT NOT NULL,
    status TEXT NOT NULL, attempt BIGINT NOT NULL DEFAULT 1, retry_of BIGINT REFERENCES jobs(id),
    priority BIGINT NOT NULL DEFAULT 0, created BIGINT NOT NULL, not_before BIGINT NOT NULL,
    started BIGINT, finished BIGINT, error TEXT, snapshot TEXT, mode TEXT, bytes_read BIGINT,
    bytes_new BIGINT, duration DOUBLE PRECISION, pruned BIGINT, note TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs(status);
CREATE INDEX IF NOT EXISTS jobs_by_vm ON jobs(host, vm, finished);
"#,
    ),
    (
        2,
        r#"
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS node TEXT;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS lease_until BIGINT;
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY, address TEXT, capacity BIGINT NOT NULL, started BIGINT NOT NULL,
    heartbeat BIGINT NOT NULL, lease_secs BIGINT NOT NULL, leader BOOLEAN NOT NULL DEFAULT FALSE
);
"#,
    ),
    (
        3,
        r#"
CREATE INDEX IF NOT EXISTS jobs_by_kind ON jobs(kind, host, vm, finished);
"#,
    ),
];

const JOB_COLUMNS: &str = "id, run_id, kind, host, vm, policy, status, attempt, retry_of, priority,
    created, not_before, started, finished, error, snapshot, mode, bytes_read, bytes_new,
    duration, pruned, note, request, node";

/// Where the password of a PostgreSQL catalog comes from (never the configuration file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    /// Trust, peer or certificate authentication.
    None,
    /// `catalog_password_file`: the first line of the file.
    File(PathBuf),
    /// `catalog_password_env`: an environment variable of the daemon.
    Env(String),
}

/// A PostgreSQL catalog: the URL (without a password) and where the password is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgLocation {
    pub url: String,
    pub password: PasswordSource,
    /// `catalog_ca_file`: TLS to the server, verified against these PEM certificates
    /// (with `sslmode=require` in the URL, TLS is then mandatory). None: no TLS.
    pub ca_file: Option<PathBuf>,
}

impl PgLocation {
    /// Checks a `postgres://` URL: it parses and names no password.
    pub fn new(url: &str, password: PasswordSource) -> std::result::Result<PgLocation, String> {
        let cfg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| format!("not a PostgreSQL URL: {e}"))?;
        if cfg.get_password().is_some() {
            return Err(
                "the catalog URL holds a password: give it in catalog_password_file or catalog_password_env instead"
                    .into(),
            );
        }
        Ok(PgLocation {
            url: url.to_string(),
            password,
            ca_file: None,
        })
    }

    pub fn with_ca_file(self, ca_file: Option<PathBuf>) -> PgLocation {
        PgLocation { ca_file, ..self }
    }

    /// The TLS connector for `ca_file`, if one is set.
    fn tls(&self) -> Result<Option<MakeRustlsConnect>> {
        let Some(file) = &self.ca_file else {
            return Ok(None);
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(file)
            .map_err(|e| self.error("reading catalog_ca_file", e))?
        {
            let cert = cert.map_err(|e| self.error("reading catalog_ca_file", e))?;
            roots
                .add(cert)
                .map_err(|e| self.error("reading catalog_ca_file", e))?;
        }
        if roots.is_empty() {
            return Err(DaemonError::Io {
                what: "reading the catalog CA file (no certificate in it)",
                path: file.clone(),
                source: std::io::Error::from(std::io::ErrorKind::InvalidData),
            });
        }
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Some(MakeRustlsConnect::new(config)))
    }

    fn config(&self) -> Result<tokio_postgres::Config> {
        let mut cfg: tokio_postgres::Config = self
            .url
            .parse()
            .map_err(|e| self.error("reading the URL", e))?;
        match &self.password {
            PasswordSource::None => {}
            PasswordSource::File(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| DaemonError::Io {
                    what: "reading the catalog password file",
                    path: p.clone(),
                    source,
                })?;
                cfg.password(text.lines().next().unwrap_or_default());
            }
            PasswordSource::Env(var) => match std::env::var(var) {
                Ok(v) if !v.is_empty() => {
                    cfg.password(v);
                }
                _ => return Err(DaemonError::TokenEnv { var: var.clone() }),
            },
        }
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(Duration::from_secs(10));
        }
        // A peer that vanishes without closing (power off, cut link) is noticed in about
        // 25 s on both ends: here, so no call hangs on a half-open connection; on the
        // server, so a dead leader's advisory lock (held by its session) is released and
        // another node leads, instead of after the kernel's default two hours.
        cfg.keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3)
            .tcp_user_timeout(Duration::from_secs(30));
        cfg.options(format!(
            "-c statement_timeout={} -c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3",
            STATEMENT_TIMEOUT.as_millis()
        ));
        Ok(cfg)
    }

    fn error(
        &self,
        what: &'static str,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> DaemonError {
        DaemonError::CatalogDb {
            catalog: self.url.clone(),
            what,
            source: Box::new(e),
        }
    }
}

type Client = deadpool_postgres::Object;

pub struct PgStore {
    loc: PgLocation,
    cfg: tokio_postgres::Config,
    /// Some until dropped (a runtime must not be dropped inside another one).
    rt: Option<tokio::runtime::Runtime>,
    pool: Pool,
    tls: Option<MakeRustlsConnect>,
    /// The connection holding the leader lock, while this process leads.
    leader: Mutex<Option<tokio_postgres::Client>>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn job_row(r: &Row) -> JobRecord {
    JobRecord {
        id: r.get(0),
        run_id: r.get(1),
        kind: r.get(2),
        host: r.get(3),
        vm: r.get(4),
        policy: r.get(5),
        status: JobStatus::parse(r.get(6)),
        attempt: r.get(7),
        retry_of: r.get(8),
        priority: r.get(9),
        created: rfc3339(r.get(10)),
        not_before: rfc3339(r.get(11)),
        started: r.get::<_, Option<i64>>(12).map(rfc3339),
        finished: r.get::<_, Option<i64>>(13).map(rfc3339),
        error: r.get(14),
        snapshot: r.get(15),
        mode: r.get(16),
        bytes_read: r.get(17),
        bytes_new: r.get(18),
        duration_secs: r.get(19),
        pruned: r.get(20),
        note: r.get(21),
        request: r.get(22),
        node: r.get(23),
    }
}

type PgResult<T> = std::result::Result<T, tokio_postgres::Error>;

impl PgStore {
    /// Connects and brings the tables to [`SCHEMA_VERSION`].
    pub fn open(loc: &PgLocation) -> Result<PgStore> {
        let cfg = loc.config()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("virtkeep-catalog")
            .enable_all()
            .build()
            .map_err(|e| loc.error("starting the catalog runtime", e))?;
        let tls = loc.tls()?;
        let mc = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let mgr = match &tls {
            Some(t) => Manager::from_config(cfg.clone(), t.clone(), mc),
            None => Manager::from_config(cfg.clone(), NoTls, mc),
        };
        let pool = Pool::builder(mgr)
            .max_size(8)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(15)))
            .build()
            .map_err(|e| loc.error("creating the connection pool", e))?;
        let store = PgStore {
            loc: loc.clone(),
            cfg,
            rt: Some(rt),
            pool,
            tls,
            leader: Mutex::new(None),
        };
        store.migrate()?;
        Ok(store)
    }

    /// Runs `f` with a pooled connection, on the catalog's runtime, and waits for it.
    fn run<T: Send, F>(&self, what: &'static str, f: F) -> Result<T>
    where
        F: AsyncFnOnce(&mut Client) -> PgResult<T> + Send,
    {
        let rt = self
            .rt
            .as_ref()
            .expect("the runtime lives until the store drops");
        let pool = &self.pool;
        let out = std::thread::scope(|s| {
            s.spawn(move || {
                rt.block_on(async move {
                    let mut c = pool.get().await.map_err(|e| self.loc.error(what, e))?;
                    f(&mut c).await.map_err(|e| self.loc.error(what, e))
                })
            })
            .join()
        });
        out.unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    fn migrate(&self) -> Result<()> {
        let found = self.run("migrating the schema", async |c| {
            let tx = c.transaction().await?;
            // Nodes starting together: one migrates, the others wait and find it done.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
                .await?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_version (
                    version BIGINT PRIMARY KEY, applied BIGINT NOT NULL)",
            )
            .await?;
            let found: i64 = tx
                .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])
                .await?
                .get(0);
            if found > SCHEMA_VERSION {
                return Ok(found);
            }
            for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
                tx.batch_execute(sql).await?;
                tx.execute(
                    "INSERT INTO schema_version(version, applied) VALUES ($1, $2)",
                    &[version, &now()],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(found)
        })?;
        if found > SCHEMA_VERSION {
            return Err(DaemonError::CatalogVersion {
                path: PathBuf::from(&self.loc.url),
                found,
                known: SCHEMA_VERSION,
            });
        }
        Ok(())
    }

    fn query_jobs(
        &self,
        what: &'static str,
        tail: &str,
        p: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<JobRecord>> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs {tail}");
        self.run(what, async |c| {
            Ok(c.query(&sql, p).await?.iter().map(job_row).collect())
        })
    }

    fn exec(
        &self,
        what: &'static str,
        sql: &str,
        p: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64> {
        self.run(what, async |c| c.execute(sql, p).await)
    }

    /// Whether the leader connection still holds the lock; takes it if free.
    async fn lead(
        cfg: &tokio_postgres::Config,
        tls: Option<&MakeRustlsConnect>,
        held: Option<tokio_postgres::Client>,
    ) -> PgResult<Option<tokio_postgres::Client>> {
        if let Some(c) = held
            && !c.is_closed()
            && c.simple_query("SELECT 1").await.is_ok()
        {
            return Ok(Some(c));
        }
        let client = match tls {
            Some(t) => {
                let (client, conn) = cfg.connect(t.clone()).await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                client
            }
            None => {
                let (client, conn) = cfg.connect(NoTls).await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                client
            }
        };
        let got: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK])
            .await?
            .get(0);
        Ok(got.then_some(client))
    }
}

impl Store for PgStore {
    #[cfg(test)]
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn describe(&self) -> String {
        self.loc.url.clone()
    }

    fn shared(&self) -> bool {
        true
    }

    fn next_run(&self, policy: &str, schedule: &str) -> Result<Option<i64>> {
        self.run("reading a schedule", async |c| {
            Ok(c.query_opt(
                "SELECT next_run FROM schedule_state WHERE policy = $1 AND schedule = $2",
                &[&policy, &schedule],
            )
            .await?
            .and_then(|r| r.get(0)))
        })
    }

    fn last_run(&self, policy: &str, schedule: &str) -> Result<Option<i64>> {
        self.run("reading a schedule", async |c| {
            Ok(c.query_opt(
                "SELECT last_run FROM schedule_state WHERE policy = $1 AND schedule = $2",
                &[&policy, &schedule],
            )
            .await?
            .and_then(|r| r.get(0)))
        })
    }

    fn set_next_run(
        &self,
        policy: &str,
        schedule: &str,
        next: Option<i64>,
        ran_at: Option<i64>,
    ) -> Result<()> {
        self.exec(
            "writing a schedule",
            "INSERT INTO schedule_state(policy, schedule, next_run, last_run) VALUES ($1, $2, $3, $4)
             ON CONFLICT(policy, schedule) DO UPDATE SET next_run = $3,
                last_run = COALESCE($4, schedule_state.last_run)",
            &[&policy, &schedule, &next, &ran_at],
        )
        .map(drop)
    }

    fn start_run(&self, policy: &str, mode: &str, trigger: &str) -> Result<i64> {
        self.run("recording a run", async |c| {
            Ok(c.query_one(
                "INSERT INTO runs(policy, mode, trigger, started, status)
                 VALUES ($1, $2, $3, $4, 'running') RETURNING id",
                &[&policy, &mode, &trigger, &now()],
            )
            .await?
            .get(0))
        })
    }

    fn finish_run(&self, id: i64, status: &str, note: Option<&str>) -> Result<()> {
        self.exec(
            "finishing a run",
            "UPDATE runs SET finished = $2, status = $3, note = COALESCE($4, note) WHERE id = $1",
            &[&id, &now(), &status, &note],
        )
        .map(drop)
    }

    fn finish_run_note(&self, id: i64, note: &str) -> Result<()> {
        self.exec(
            "annotating a run",
            "UPDATE runs SET note = $2 WHERE id = $1",
            &[&id, &note],
        )
        .map(drop)
    }

    fn runs(&self, policy: Option<&str>, limit: u32) -> Result<Vec<RunRecord>> {
        let limit = i64::from(limit);
        self.run("listing runs", async |c| {
            let rows = c
                .query(
                    "SELECT id, policy, mode, trigger, started, finished, status, note FROM runs
                     WHERE ($1::text IS NULL OR policy = $1) ORDER BY id DESC LIMIT $2",
                    &[&policy, &limit],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| RunRecord {
                    id: r.get(0),
                    policy: r.get(1),
                    mode: r.get(2),
                    trigger: r.get(3),
                    started: rfc3339(r.get(4)),
                    finished: r.get::<_, Option<i64>>(5).map(rfc3339),
                    status: r.get(6),
                    note: r.get(7),
                })
                .collect())
        })
    }

    fn open_runs(&self) -> Result<Vec<(i64, String)>> {
        self.run("listing runs", async |c| {
            let rows = c
                .query("SELECT id, policy FROM runs WHERE status = 'running'", &[])
                .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    fn add_job(&self, j: &NewJob<'_>) -> Result<i64> {
        self.run("recording a job", async |c| {
            Ok(c.query_one(
                "INSERT INTO jobs(run_id, kind, host, vm, policy, request, status, attempt,
                                  retry_of, priority, created, not_before)
                 VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7, $8, $9, $10, $11) RETURNING id",
                &[
                    &j.run_id,
                    &j.kind,
                    &j.host,
                    &j.vm,
                    &j.policy,
                    &j.request,
                    &j.attempt,
                    &j.retry_of,
                    &j.priority,
                    &now(),
                    &j.not_before,
                ],
            )
            .await?
            .get(0))
        })
    }

    fn start_job(&self, j: &NewJob<'_>, node: &str, lease_until: i64) -> Result<i64> {
        self.run("recording a job", async |c| {
            Ok(c.query_one(
                "INSERT INTO jobs(run_id, kind, host, vm, policy, request, status, attempt,
                                  retry_of, priority, created, not_before, started, node,
                                  lease_until)
                 VALUES ($1, $2, $3, $4, $5, $6, 'running', $7, $8, $9, $10, $10, $10, $11, $12)
                 RETURNING id",
                &[
                    &j.run_id,
                    &j.kind,
                    &j.host,
                    &j.vm,
                    &j.policy,
                    &j.request,
                    &j.attempt,
                    &j.retry_of,
                    &j.priority,
                    &now(),
                    &node,
                    &lease_until,
                ],
            )
            .await?
            .get(0))
        })
    }

    fn last_jobs(&self, kind: &str) -> Result<Vec<JobRecord>> {
        self.query_jobs(
            "listing jobs",
            "WHERE id IN (SELECT MAX(id) FROM jobs
                          WHERE kind = $1 AND status IN ('succeeded', 'failed', 'cancelled')
                          GROUP BY host, vm)
             ORDER BY host, vm",
            &[&kind],
        )
    }

    fn mark_running(&self, id: i64, node: &str, lease_until: i64) -> Result<()> {
        self.exec(
            "starting a job",
            "UPDATE jobs SET status = 'running', started = $2, node = $3, lease_until = $4
             WHERE id = $1 AND status = 'queued'",
            &[&id, &now(), &node, &lease_until],
        )
        .map(drop)
    }

    fn set_job_note(&self, id: i64, note: &str) -> Result<()> {
        self.exec(
            "noting a job's progress",
            "UPDATE jobs SET note = $2 WHERE id = $1 AND status = 'running'",
            &[&id, &note],
        )
        .map(drop)
    }

    fn cancel_queued(&self, id: i64, error: &str) -> Result<bool> {
        self.exec(
            "cancelling a job",
            "UPDATE jobs SET status = 'cancelled', finished = $2, error = $3
             WHERE id = $1 AND status = 'queued'",
            &[&id, &now(), &error],
        )
        .map(|n| n == 1)
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
        // A job another node took over (its lease expired) keeps the status the
        // takeover gave it: its retry decides, and it is never counted twice.
        self.exec(
            "finishing a job",
            "UPDATE jobs SET status = $2, finished = $3, error = $4, snapshot = $5, mode = $6,
                bytes_read = $7, bytes_new = $8, duration = $9, pruned = $10, note = $11
             WHERE id = $1 AND status IN ('queued', 'running')",
            &[
                &id,
                &status,
                &now(),
                &o.error,
                &o.snapshot,
                &o.mode,
                &o.bytes_read,
                &o.bytes_new,
                &o.duration,
                &o.pruned,
                &o.note,
            ],
        )
        .map(drop)
    }

    fn job(&self, id: i64) -> Result<JobRecord> {
        let mut list = self.query_jobs("reading a job", "WHERE id = $1", &[&id])?;
        list.pop().ok_or(DaemonError::NoSuchJob(id))
    }

    fn jobs(&self, f: &JobFilter) -> Result<Vec<JobRecord>> {
        let limit = i64::from(f.limit.unwrap_or(u32::MAX));
        self.query_jobs(
            "listing jobs",
            "WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR host = $2)
               AND ($3::text IS NULL OR vm = $3) AND ($4::bigint IS NULL OR run_id = $4)
             ORDER BY id DESC LIMIT $5",
            &[
                &f.status.map(JobStatus::as_str),
                &f.host,
                &f.vm,
                &f.run_id,
                &limit,
            ],
        )
    }

    fn has_open_job(&self, host: &str, vm: &str, policy: &str, kind: &str) -> Result<bool> {
        self.run("reading jobs", async |c| {
            Ok(c.query_one(
                "SELECT EXISTS(SELECT 1 FROM jobs WHERE host = $1 AND vm = $2 AND policy = $3
                                AND kind = $4 AND status IN ('queued', 'running'))",
                &[&host, &vm, &policy, &kind],
            )
            .await?
            .get(0))
        })
    }

    fn not_before(&self, id: i64) -> Result<i64> {
        self.run("reading a job", async |c| {
            Ok(
                c.query_one("SELECT not_before FROM jobs WHERE id = $1", &[&id])
                    .await?
                    .get(0),
            )
        })
    }

    fn run_counts(&self, run_id: i64) -> Result<(i64, i64, i64)> {
        self.run("counting a run's jobs", async |c| {
            let r = c
                .query_one(
                    "SELECT
                       COUNT(*) FILTER (WHERE status IN ('succeeded','failed','cancelled')
                            AND id NOT IN (SELECT retry_of FROM jobs WHERE retry_of IS NOT NULL)),
                       COUNT(*) FILTER (WHERE status IN ('failed','cancelled')
                            AND id NOT IN (SELECT retry_of FROM jobs WHERE retry_of IS NOT NULL)),
                       COUNT(*) FILTER (WHERE status IN ('queued','running'))
                     FROM jobs WHERE run_id = $1",
                    &[&run_id],
                )
                .await?;
            Ok((r.get(0), r.get(1), r.get(2)))
        })
    }

    fn finished_jobs(&self) -> Result<Vec<crate::history::FinishedJob>> {
        self.run("listing finished jobs", async |c| {
            let rows = c
                .query(
                    "SELECT id, host, vm, kind,
                        status = 'succeeded'
                          AND kind IN ('backup', 'verify_boot', 'sync', 'gc', 'verify'),
                        finished
                     FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled')
                       AND finished IS NOT NULL",
                    &[],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| crate::history::FinishedJob {
                    id: r.get(0),
                    host: r.get(1),
                    vm: r.get(2),
                    kind: r.get(3),
                    success: r.get(4),
                    finished: r.get(5),
                })
                .collect())
        })
    }

    fn forget_jobs(&self, ids: &[i64]) -> Result<usize> {
        self.run("forgetting jobs", async |c| {
            let tx = c.transaction().await?;
            forget_linked(tx, ids).await
        })
    }

    fn recent_backups(&self, per_vm: u32) -> Result<Vec<JobRecord>> {
        self.query_jobs(
            "listing jobs",
            "WHERE id IN (SELECT id FROM (SELECT id, ROW_NUMBER() OVER
                 (PARTITION BY host, vm ORDER BY id DESC) AS n FROM jobs WHERE kind = 'backup') AS r
               WHERE n <= $1)
             ORDER BY host, vm, id DESC",
            &[&i64::from(per_vm)],
        )
    }

    fn vm_stats_of(&self, kind: &str) -> Result<Vec<VmStats>> {
        self.run("reading metrics", async |c| {
            let rows = c
                .query(
                    "SELECT host, vm,
                        MAX(finished) FILTER (WHERE status = 'succeeded'),
                        COUNT(*) FILTER (WHERE status = 'failed'),
                        COUNT(*) FILTER (WHERE status = 'succeeded'),
                        (ARRAY_AGG(bytes_read ORDER BY finished DESC, id DESC)
                            FILTER (WHERE status = 'succeeded'))[1],
                        (ARRAY_AGG(bytes_new ORDER BY finished DESC, id DESC)
                            FILTER (WHERE status = 'succeeded'))[1],
                        (ARRAY_AGG(duration ORDER BY finished DESC, id DESC)
                            FILTER (WHERE status = 'succeeded'))[1]
                     FROM jobs WHERE kind = $1 GROUP BY host, vm ORDER BY host, vm",
                    &[&kind],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| VmStats {
                    host: r.get(0),
                    vm: r.get(1),
                    last_success: r.get(2),
                    failures: r.get(3),
                    successes: r.get(4),
                    last_bytes_read: r.get(5),
                    last_bytes_new: r.get(6),
                    last_duration: r.get(7),
                })
                .collect())
        })
    }

    fn status_counts(&self) -> Result<Vec<(String, i64)>> {
        self.run("reading metrics", async |c| {
            let rows = c
                .query(
                    "SELECT status, COUNT(*) FROM jobs GROUP BY status ORDER BY status",
                    &[],
                )
                .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    fn register_node(&self, n: &NodeRegistration<'_>) -> Result<()> {
        self.exec(
            "registering the node",
            "INSERT INTO nodes(name, address, capacity, started, heartbeat, lease_secs)
             VALUES ($1, $2, $3, $4, $4, $5)
             ON CONFLICT(name) DO UPDATE SET address = $2, capacity = $3, started = $4,
                heartbeat = $4, lease_secs = $5, leader = FALSE",
            &[&n.name, &n.address, &n.capacity, &n.now, &n.lease_secs],
        )
        .map(drop)
    }

    fn heartbeat(&self, node: &str, now: i64, lease_until: i64, leader: bool) -> Result<()> {
        self.run("heartbeat", async |c| {
            let tx = c.transaction().await?;
            tx.execute(
                "UPDATE nodes SET heartbeat = $2, leader = $3 WHERE name = $1",
                &[&node, &now, &leader],
            )
            .await?;
            if leader {
                tx.execute("UPDATE nodes SET leader = FALSE WHERE name != $1", &[&node])
                    .await?;
            }
            tx.execute(
                "UPDATE jobs SET lease_until = $2 WHERE node = $1 AND status = 'running'",
                &[&node, &lease_until],
            )
            .await?;
            tx.commit().await
        })
    }

    fn nodes(&self, now: i64) -> Result<Vec<NodeRecord>> {
        self.run("listing nodes", async |c| {
            let rows = c
                .query(
                    "SELECT name, address, capacity,
                        (SELECT COUNT(*) FROM jobs WHERE jobs.node = nodes.name
                            AND status = 'running'),
                        started, heartbeat, heartbeat + lease_secs >= $1, leader
                     FROM nodes ORDER BY name",
                    &[&now],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| NodeRecord {
                    name: r.get(0),
                    address: r.get(1),
                    capacity: r.get(2),
                    running: r.get(3),
                    started: rfc3339(r.get(4)),
                    heartbeat: rfc3339(r.get(5)),
                    alive: r.get(6),
                    leader: r.get(7),
                })
                .collect())
        })
    }

    fn claim(&self, cl: &Claim<'_>) -> Result<Vec<JobRecord>> {
        self.run("claiming jobs", async |c| {
            let tx = c.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&CLAIM_LOCK])
                .await?;
            let queued: Vec<JobRecord> = tx
                .query(
                    &format!(
                        "SELECT {JOB_COLUMNS} FROM jobs WHERE status = 'queued' AND not_before <= $1
                         ORDER BY priority DESC, not_before, id LIMIT 500 FOR UPDATE SKIP LOCKED"
                    ),
                    &[&cl.now],
                )
                .await?
                .iter()
                .map(job_row)
                .collect();
            let running: Vec<JobRecord> = tx
                .query(
                    // Sync, GC and verify runs take no dispatch slot (see the SQLite store).
                    &format!(
                        "SELECT {JOB_COLUMNS} FROM jobs WHERE status = 'running'
                         AND kind NOT IN ('sync', 'gc', 'verify')"
                    ),
                    &[],
                )
                .await?
                .iter()
                .map(job_row)
                .collect();
            let ids = (cl.choose)(&queued, &running);
            let taken = tx
                .query(
                    &format!(
                        "UPDATE jobs SET status = 'running', started = $2, node = $3,
                            lease_until = $4
                         WHERE id = ANY($1) AND status = 'queued' RETURNING {JOB_COLUMNS}"
                    ),
                    &[&ids, &now(), &cl.node, &cl.lease_until],
                )
                .await?;
            tx.commit().await?;
            let mut taken: Vec<JobRecord> = taken.iter().map(job_row).collect();
            // In the chooser's order (best first).
            taken.sort_by_key(|j| ids.iter().position(|i| *i == j.id));
            Ok(taken)
        })
    }

    fn take_orphans(&self, own: Option<&str>, now: i64, why: &str) -> Result<Vec<JobRecord>> {
        self.run("taking over jobs", async |c| {
            let rows = c
                .query(
                    &format!(
                        "UPDATE jobs SET status = 'failed', finished = $3, error = $4
                         WHERE id IN (SELECT id FROM jobs WHERE status = 'running'
                            AND (node IS NULL OR node = $1::text OR lease_until < $2)
                            FOR UPDATE SKIP LOCKED)
                         RETURNING {JOB_COLUMNS}"
                    ),
                    &[&own, &now, &now, &why],
                )
                .await?;
            Ok(rows.iter().map(job_row).collect())
        })
    }

    fn try_lead(&self) -> Result<bool> {
        let mut held = self.leader.lock().unwrap_or_else(|p| p.into_inner());
        let cfg = &self.cfg;
        let tls = self.tls.as_ref();
        let current = held.take();
        let rt = self
            .rt
            .as_ref()
            .expect("the runtime lives until the store drops");
        let got = std::thread::scope(|s| {
            s.spawn(move || rt.block_on(PgStore::lead(cfg, tls, current)))
                .join()
        })
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
        .map_err(|e| self.loc.error("taking the lead", e))?;
        let leads = got.is_some();
        *held = got;
        Ok(leads)
    }
}

/// Deletes finished jobs; a retry pointing at a deleted try is unlinked first.
async fn forget_linked(tx: deadpool_postgres::Transaction<'_>, ids: &[i64]) -> PgResult<usize> {
    tx.execute(
        "UPDATE jobs SET retry_of = NULL WHERE retry_of = ANY($1) AND retry_of IN
            (SELECT id FROM jobs WHERE status IN ('succeeded','failed','cancelled'))",
        &[&ids],
    )
    .await?;
    let gone = tx
        .query(
            "DELETE FROM jobs WHERE id = ANY($1)
               AND status IN ('succeeded','failed','cancelled') RETURNING run_id",
            &[&ids],
        )
        .await?;
    let runs: Vec<i64> = gone.iter().filter_map(|r| r.get(0)).collect();
    delete_empty_runs(&tx, &runs).await?;
    tx.commit().await?;
    Ok(gone.len())
}

async fn delete_empty_runs(tx: &deadpool_postgres::Transaction<'_>, runs: &[i64]) -> PgResult<u64> {
    tx.execute(
        "DELETE FROM runs WHERE id = ANY($1) AND status != 'running'
           AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.run_id = runs.id)",
        &[&runs],
    )
    .await
}

/// A private PostgreSQL cluster for tests, from `lab/postgres.sh`.
#[cfg(test)]
pub(crate) mod testpg {
    use super::{PasswordSource, PgLocation};
    use std::path::PathBuf;
    use std::process::Command;

    pub struct TestPg {
        dir: tempfile::TempDir,
        pub loc: PgLocation,
    }

    fn script() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../lab/postgres.sh")
    }

    impl TestPg {
        /// Starts one; `None` (the test is skipped) where PostgreSQL is not installed,
        /// as on a machine without the lab.
        pub fn start() -> Option<TestPg> {
            let dir = tempfile::Builder::new()
                .prefix("vkt-pg")
                .tempdir()
                .expect("tmp");
            let out = Command::new(script())
                .arg("start")
                .arg(dir.path())
                .output()
                .expect("lab/postgres.sh runs");
            if out.status.code() == Some(3) {
                eprintln!("skipped: PostgreSQL is not installed (lab/install-deps.sh)");
                return None;
            }
            assert!(
                out.status.success(),
                "lab/postgres.sh start: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let url = String::from_utf8(out.stdout).expect("utf-8");
            let loc = PgLocation::new(
                url.trim(),
                PasswordSource::File(dir.path().join("password")),
            )
            .expect("url");
            Some(TestPg { dir, loc })
        }
    }

    impl TestPg {
        pub fn dir(&self) -> &std::path::Path {
            self.dir.path()
        }
    }

    impl Drop for TestPg {
        fn drop(&mut self) {
            let _ = Command::new(script())
                .arg("stop")
                .arg(self.dir.path())
                .status();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testpg::TestPg;
    use super::*;
    use crate::catalog::{Catalog, CatalogLocation};
    use crate::dispatch::{Pending, Running, choose};
    use std::collections::HashSet;
    use std::sync::Arc;

    fn open(pg: &TestPg) -> Catalog {
        Catalog::open(&CatalogLocation::Postgres(pg.loc.clone())).expect("open")
    }

    fn job<'a>(run: Option<i64>, host: &'a str, vm: &'a str) -> NewJob<'a> {
        NewJob {
            run_id: run,
            kind: "backup",
            host,
            vm,
            policy: Some("p"),
            request: "{}",
            attempt: 1,
            retry_of: None,
            priority: 0,
            not_before: 0,
        }
    }

    fn chooser(node: &str, max: usize) -> impl Fn(&[JobRecord], &[JobRecord]) -> Vec<i64> + Sync {
        let node = node.to_string();
        move |q, r| {
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
            choose(&node, &q, &r, max, &|_| 3)
        }
    }

    #[test]
    fn migrations_run_once_and_the_catalog_works_like_sqlite() {
        let Some(pg) = TestPg::start() else { return };
        let c = open(&pg);
        // A second node opening the same database finds the schema done.
        let c2 = open(&pg);
        let versions: Vec<i64> = c2
            .as_pg()
            .run("test", async |c| {
                Ok(
                    c.query("SELECT version FROM schema_version ORDER BY 1", &[])
                        .await?
                        .iter()
                        .map(|r| r.get(0))
                        .collect(),
                )
            })
            .expect("versions");
        assert_eq!(versions, vec![1, 2, 3]);
        c.set_next_run("p", "every 5s auto", Some(100), None)
            .expect("set");
        assert_eq!(c2.next_run("p", "every 5s auto").expect("n"), Some(100));
        let run = c.start_run("p", "auto", "schedule").expect("run");
        let a = c.add_job(&job(Some(run), "h", "a")).expect("job");
        c.mark_running(a, "n1", now() + 60).expect("running");
        c.finish_job(
            a,
            &JobOutcome {
                error: Some("boom".into()),
                ..Default::default()
            },
        )
        .expect("finish");
        let mut retry = job(Some(run), "h", "a");
        retry.attempt = 2;
        retry.retry_of = Some(a);
        let b = c.add_job(&retry).expect("retry");
        c.finish_job(
            b,
            &JobOutcome {
                bytes_new: Some(7),
                ..Default::default()
            },
        )
        .expect("finish");
        assert_eq!(c.run_counts(run).expect("counts"), (1, 0, 0));
        let j = c2.job(b).expect("job");
        assert_eq!(
            (j.status, j.retry_of, j.node.clone()),
            (JobStatus::Succeeded, Some(a), None)
        );
        assert_eq!(c.job(a).expect("a").node.as_deref(), Some("n1"));
        let s = c.vm_stats().expect("stats");
        assert_eq!(
            (s[0].successes, s[0].failures, s[0].last_bytes_new),
            (1, 1, Some(7))
        );
        let recent: Vec<i64> = c
            .recent_backups(1)
            .expect("recent")
            .iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(recent, [b], "the newest backup job of the VM");
        c.finish_run(run, "succeeded", None).expect("run");
        // History: the failed try goes, the retry no longer points at it.
        assert_eq!(c.forget_jobs(&[a]).expect("forget"), 1);
        assert_eq!(c.job(b).expect("b").retry_of, None);
        assert_eq!(c.forget_jobs(&[b]).expect("forget"), 1);
        assert!(
            c.runs(None, 10).expect("runs").is_empty(),
            "an empty finished run goes"
        );
        // Version 3: other kinds beside the backups. A sync run starts as running (no
        // other node can claim it); a verification counts apart from the backups.
        let sync = c
            .start_job(
                &NewJob {
                    kind: "sync",
                    ..job(None, "", "offsite")
                },
                "n1",
                now() + 60,
            )
            .expect("sync");
        let sync_job = c2.job(sync).expect("sync job");
        assert_eq!(
            (sync_job.status, sync_job.node.as_deref()),
            (JobStatus::Running, Some("n1"))
        );
        assert!(c.last_jobs("sync").expect("last").is_empty());
        let v = c
            .add_job(&NewJob {
                kind: "verify_boot",
                ..job(None, "h", "a")
            })
            .expect("verify");
        assert!(c.has_open_job("h", "a", "p", "verify_boot").expect("open"));
        assert!(!c.has_open_job("h", "a", "p", "backup").expect("open"));
        c.finish_job(v, &JobOutcome::default()).expect("finish");
        let last = c.last_jobs("verify_boot").expect("last");
        assert_eq!(last.iter().map(|j| j.id).collect::<Vec<_>>(), vec![v]);
        let s = c.vm_stats_of("verify_boot").expect("stats");
        assert_eq!((s.len(), s[0].successes), (1, 1));
        assert!(
            c.vm_stats().expect("stats").is_empty(),
            "backups were forgotten"
        );
        // A password in the URL is refused: it belongs in a file or the environment.
        assert!(PgLocation::new("postgres://u:secret@127.0.0.1/db", PasswordSource::None).is_err());
    }

    #[test]
    fn tls_is_verified_against_the_ca_file_and_required_when_asked() {
        let Some(pg) = TestPg::start() else { return };
        let ca = pg.dir().join("ca.pem");
        let required = PgLocation {
            url: format!("{}?sslmode=require", pg.loc.url),
            ..pg.loc.clone()
        };
        let tls = Catalog::open(&CatalogLocation::Postgres(
            required.clone().with_ca_file(Some(ca)),
        ))
        .expect("open over TLS");
        let ssl: bool = tls
            .as_pg()
            .run("test", async |c| {
                Ok(c.query_one(
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                    &[],
                )
                .await?
                .get(0))
            })
            .expect("ssl");
        assert!(ssl, "the connection is encrypted");
        assert!(tls.try_lead().expect("lead"), "the leader connection too");
        // Required but no CA file: refused rather than sent in clear.
        assert!(Catalog::open(&CatalogLocation::Postgres(required.clone())).is_err());
        // A CA that did not sign the server's certificate: refused.
        let other = pg.dir().join("other.pem");
        let status = std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=other", "-keyout"])
            .arg(pg.dir().join("other.key"))
            .arg("-out")
            .arg(&other)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl");
        assert!(status.success());
        assert!(
            Catalog::open(&CatalogLocation::Postgres(
                required.with_ca_file(Some(other))
            ))
            .is_err()
        );
    }

    #[test]
    fn three_nodes_claim_a_hundred_jobs_once_each_and_fast() {
        let Some(pg) = TestPg::start() else { return };
        let setup = open(&pg);
        for i in 0..100 {
            let vm = format!("vm{}", i % 10);
            setup
                .add_job(&job(None, if i % 2 == 0 { "h1" } else { "h2" }, &vm))
                .expect("job");
        }
        let busy = Arc::new(std::sync::Mutex::new(HashSet::<String>::new()));
        let mut threads = Vec::new();
        for n in ["n1", "n2", "n3"] {
            let loc = pg.loc.clone();
            let busy = busy.clone();
            threads.push(std::thread::spawn(move || {
                let c = Catalog::open(&CatalogLocation::Postgres(loc)).expect("open");
                let choose = chooser(n, 2);
                let (mut ran, mut claims) = (Vec::new(), Vec::new());
                loop {
                    let t = std::time::Instant::now();
                    let got = c
                        .claim(&Claim {
                            node: n,
                            now: now(),
                            lease_until: now() + 60,
                            choose: &choose,
                        })
                        .expect("claim");
                    claims.push(t.elapsed());
                    for j in &got {
                        assert!(
                            busy.lock().expect("l").insert(j.vm.clone()),
                            "{} runs twice at once",
                            j.vm
                        );
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    for j in &got {
                        busy.lock().expect("l").remove(&j.vm);
                        c.finish_job(j.id, &JobOutcome::default()).expect("finish");
                        ran.push(j.id);
                    }
                    let left = c
                        .status_counts()
                        .expect("counts")
                        .iter()
                        .any(|(s, n)| s == "queued" && *n > 0);
                    if got.is_empty() && !left {
                        return (ran, claims);
                    }
                }
            }));
        }
        let mut all = Vec::new();
        let mut claims = Vec::new();
        for t in threads {
            let (ran, c) = t.join().expect("node");
            assert!(!ran.is_empty(), "every node took some jobs");
            all.extend(ran);
            claims.extend(c);
        }
        all.sort();
        let unique: HashSet<i64> = all.iter().copied().collect();
        assert_eq!(
            (all.len(), unique.len()),
            (100, 100),
            "each job ran exactly once"
        );
        // Counted from the catalog too: 100 succeeded, each with the node that ran it.
        let jobs = setup.jobs(&JobFilter::default()).expect("jobs");
        assert!(
            jobs.iter()
                .all(|j| j.status == JobStatus::Succeeded && j.node.is_some())
        );
        claims.sort();
        let median = claims[claims.len() / 2];
        eprintln!(
            "claim: median {median:?}, max {:?} over {} claims",
            claims.last(),
            claims.len()
        );
        assert!(
            median < Duration::from_millis(50),
            "a claim took {median:?}"
        );
    }

    #[test]
    fn a_dead_nodes_jobs_and_lead_pass_to_another() {
        let Some(pg) = TestPg::start() else { return };
        let a = open(&pg);
        let b = open(&pg);
        let id = a.add_job(&job(None, "h", "vm")).expect("job");
        let taken = a
            .claim(&Claim {
                node: "a",
                now: now(),
                lease_until: now() + 2,
                choose: &chooser("a", 1),
            })
            .expect("claim");
        assert_eq!(taken.iter().map(|j| j.id).collect::<Vec<_>>(), vec![id]);
        assert!(a.try_lead().expect("lead"), "the first node leads");
        assert!(!b.try_lead().expect("lead"), "one leader at a time");
        // Node a dies: its connections close, its lease is not renewed.
        drop(a);
        assert!(
            b.take_orphans(None, now(), "dead")
                .expect("none yet")
                .is_empty(),
            "lease still valid"
        );
        let orphans = b.take_orphans(None, now() + 3, "dead").expect("orphans");
        assert_eq!(
            orphans.iter().map(|j| (j.id, j.status)).collect::<Vec<_>>(),
            vec![(id, JobStatus::Failed)]
        );
        assert!(
            b.take_orphans(None, now() + 3, "dead")
                .expect("again")
                .is_empty(),
            "taken over once"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !b.try_lead().expect("lead") {
            assert!(
                std::time::Instant::now() < deadline,
                "b never took the lead"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // A late finish of the dead node does not overwrite the takeover.
        b.finish_job(id, &JobOutcome::default()).expect("finish");
        assert_eq!(b.job(id).expect("job").status, JobStatus::Failed);
    }

    /// As in SQLite: running sync, GC and verify runs are not counted against the job
    /// limits, and the newest success of each stays when the history is trimmed.
    #[test]
    fn repository_runs_take_no_slot_and_their_last_success_stays() {
        let Some(pg) = TestPg::start() else { return };
        let c = open(&pg);
        let backup = c.add_job(&job(None, "h1", "a")).expect("job");
        c.mark_running(backup, "n1", now() + 60).expect("running");
        let mut done = Vec::new();
        for kind in ["sync", "gc", "verify"] {
            let repo_job = NewJob {
                kind,
                ..job(None, "", "default")
            };
            for _ in 0..2 {
                let id = c.add_job(&repo_job).expect("job");
                c.finish_job(id, &JobOutcome::default()).expect("finish");
                done.push(id);
            }
            let id = c.add_job(&repo_job).expect("job");
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
        let limits = crate::history::HistoryLimits {
            max_age: std::time::Duration::from_secs(86400),
            max_jobs: 1000,
        };
        c.apply_history_limits(limits, now() + 365 * 86400)
            .expect("apply");
        let left: HashSet<i64> = c
            .jobs(&JobFilter::default())
            .expect("jobs")
            .iter()
            .map(|j| j.id)
            .collect();
        for (i, id) in done.iter().enumerate() {
            // The second of each kind's two successes is the newer (same second: id).
            assert_eq!(left.contains(id), i % 2 == 1, "job {id}");
        }
    }
}
