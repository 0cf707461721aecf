//! One job: connect, run the engine's backup or restore, apply retention, report.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use virtkeep_engine::backup::{BackupOptions, backup_vm};
use virtkeep_engine::config::{Config as EngineConfig, RepositoryConfig};
use virtkeep_engine::host::Host;
use virtkeep_engine::progress::{Event, Progress};
use virtkeep_engine::repo_key::KeyChoice;
use virtkeep_engine::restore::{RestoreOptions, Storage, restore};
use virtkeep_engine::{Error as EngineError, ErrorKind, heal};
use virtkeep_repo::{Location, RepoError, Repository};

use crate::catalog::{JobOutcome, JobRecord};
use crate::policy::DaemonConfig;
use virtkeep_engine::plan::ModeRequest;

/// What a job does, as stored in the catalog (so that a restarted daemon can retry it).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum JobRequest {
    Backup {
        /// The policy whose options apply; none: defaults and the default repository.
        #[serde(default)]
        policy: Option<String>,
        /// `auto` (default), `full` or `incremental`.
        #[serde(default)]
        #[schema(value_type = String)]
        mode: ModeRequest,
    },
    Restore {
        snapshot: String,
        /// New domain name (fresh UUID and MACs).
        #[serde(default)]
        name: Option<String>,
        /// `file:/DIR`, `rbd:POOL` or `lvm:VG`; the original places otherwise.
        #[serde(default)]
        storage: Option<String>,
        #[serde(default)]
        define: bool,
        #[serde(default)]
        start: bool,
        #[serde(default)]
        force: bool,
        /// A name from `[repositories]`; the default repository otherwise.
        #[serde(default)]
        repository: Option<String>,
        /// A live restore (`restore --live`, needs `name`; `define`, `start` and `force`
        /// do not apply): the domain runs from the repository at once while its disks
        /// are copied; the job (kind `live_restore`) ends when the copy is done.
        #[serde(default)]
        live: bool,
    },
    /// A policy's boot verification of one backup (`verify_jobs`; not submitted
    /// through the API, and run by `verify_jobs::run`, not here).
    #[serde(rename = "verify_boot")]
    VerifyBoot { policy: String, snapshot: String },
}

impl JobRequest {
    pub fn kind(&self) -> &'static str {
        match self {
            JobRequest::Backup { .. } => "backup",
            JobRequest::Restore { live: true, .. } => "live_restore",
            JobRequest::Restore { .. } => "restore",
            JobRequest::VerifyBoot { .. } => "verify_boot",
        }
    }
}

/// Everything a job needs from the node's configuration.
pub struct Env {
    pub engine: EngineConfig,
    pub daemon: DaemonConfig,
    /// The node-wide known_hosts file.
    pub known_hosts: PathBuf,
    /// The repository used when neither the policy nor the request names one.
    pub default_repository: RepositoryConfig,
}

impl Env {
    pub fn repository_config(&self, name: Option<&str>) -> Result<&RepositoryConfig, EngineError> {
        match name {
            None => Ok(&self.default_repository),
            Some(n) => self.engine.repositories.get(n).ok_or_else(|| {
                EngineError::config(format!("no repository named {n:?} in the configuration"))
            }),
        }
    }

    pub async fn connect(&self, host: &str) -> Result<Host, EngineError> {
        Host::connect(host, self.engine.host(host)?, &self.known_hosts).await
    }
}

/// Opens a repository as `virtkeep` commands do (S3 endpoint from the config or AWS_*).
pub async fn open_repository(rc: &RepositoryConfig) -> Result<Repository, EngineError> {
    let mut location = Location::parse(&rc.location)?;
    if let Location::S3 { .. } = location {
        location = location.with_s3_options(rc.s3_options());
    }
    let in_context = |e: EngineError| e.context(format!("repository {}", rc.location));
    // The repository's own key settings (docs/daemon.md); when it names none and turns
    // out to be encrypted, VIRTKEEP_PASSWORD_FILE / _COMMAND in the daemon's environment,
    // where the CLI would prompt (so the variables never break an unencrypted one).
    let own = KeyChoice::of_repository(rc);
    let key = own.resolve().await.map_err(in_context)?;
    let opened = match Repository::open(location.clone(), key).await {
        Err(RepoError::KeyRequired {
            location: l,
            message,
        }) if own.is_empty() => match KeyChoice::from_env().resolve().await.map_err(in_context)? {
            Some(key) => Repository::open(location, Some(key)).await,
            None => Err(RepoError::KeyRequired {
                location: l,
                message,
            }),
        },
        other => other,
    };
    opened.map_err(|e| in_context(EngineError::from(e)))
}

/// How far a running job is, for the API.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct JobProgress {
    pub phase: String,
    /// Bytes the transfer will move (allocated data of the disks started so far).
    pub bytes_total: u64,
    pub bytes_done: u64,
}

pub type ProgressMap = Arc<Mutex<HashMap<i64, JobProgress>>>;

/// Records progress for the API and logs phases (the log is what an operator tails).
pub(crate) struct Tracker {
    pub job: i64,
    pub map: ProgressMap,
}

impl Progress for Tracker {
    fn event(&self, event: Event) {
        let Ok(mut map) = self.map.lock() else {
            return;
        };
        let p = map.entry(self.job).or_default();
        match event {
            Event::Phase { vm, phase } => {
                tracing::info!(job = self.job, vm = %vm, phase, "phase");
                p.phase = phase.to_string();
            }
            Event::DiskStart { vm, disk, bytes } => {
                tracing::info!(job = self.job, vm = %vm, disk = %disk, bytes, "disk transfer starts");
                p.bytes_total += bytes;
            }
            Event::DiskBytes { bytes, .. } => p.bytes_done += bytes,
            Event::DiskDone { disk } => tracing::info!(job = self.job, disk = %disk, "disk done"),
            Event::Notice { vm, message } => tracing::warn!(job = self.job, vm = %vm, "{message}"),
        }
    }
}

pub(crate) fn error_text(e: &EngineError) -> String {
    match &e.hint {
        Some(h) => format!("{e} (hint: {h})"),
        None => e.to_string(),
    }
}

/// Returns a VM that an interrupted job of this node left on overlays to its own files
/// (the job's future is dropped; its lock goes with it).
pub async fn heal_after_interruption(host: &Host, vm: &str) -> Vec<String> {
    let Ok(v) = virtkeep_engine::vm::Vm::find(host, vm).await else {
        return Vec::new();
    };
    heal_uuid(host, &v.uuid).await
}

/// Heals the VM of a job taken over from a node whose lease expired: under the VM's
/// lock, as `cleanup` does. That node may only be cut off from the catalog and still be
/// backing the VM up, and healing would undo its snapshot mid-run; the lock of a node
/// that really died goes with its SSH session within seconds.
pub async fn heal_taken_over(host: &Host, vm: &str) -> Vec<String> {
    use virtkeep_engine::cleanup::CLEANUP_LOCK_WAIT_SECS;
    let Ok(v) = virtkeep_engine::vm::Vm::find(host, vm).await else {
        return Vec::new();
    };
    let lock = match host.lock_vm(&v.uuid, CLEANUP_LOCK_WAIT_SECS).await {
        Ok(lock) => lock,
        Err(e) => return vec![format!("not healed: {e}")],
    };
    let actions = heal_uuid(host, &v.uuid).await;
    lock.release().await;
    actions
}

async fn heal_uuid(host: &Host, uuid: &str) -> Vec<String> {
    let _ = heal::stop_job_exports(host, uuid).await;
    match heal::heal_vm(host, uuid, false).await {
        Ok(r) => r.actions,
        Err(e) => vec![format!("healing failed: {e}")],
    }
}

/// What can stop a job before its end.
pub struct Stops {
    /// Turns true when the daemon's shutdown aborts running jobs.
    pub shutdown: watch::Receiver<bool>,
    /// Fires when the job is cancelled through the API.
    pub cancel: oneshot::Receiver<()>,
}

/// Runs one job to its end. A shutdown abort, a cancel and `job_timeout` all stop it
/// the same clean way: the engine's future is dropped, then the VM is healed the way
/// `virtkeep cleanup` would.
pub async fn run(env: Arc<Env>, job: JobRecord, progress: ProgressMap, stops: Stops) -> JobOutcome {
    let Stops {
        shutdown: mut cancel,
        cancel: cancel_one,
    } = stops;
    let req: JobRequest = match serde_json::from_str(&job.request) {
        Ok(r) => r,
        Err(e) => {
            return JobOutcome {
                error: Some(format!("unreadable job request in the catalog: {e}")),
                ..Default::default()
            };
        }
    };
    let tracker: Arc<dyn Progress> = Arc::new(Tracker {
        job: job.id,
        map: progress.clone(),
    });
    let host = match env.connect(&job.host).await {
        Ok(h) => h,
        Err(e) => {
            return JobOutcome {
                error: Some(error_text(&e)),
                ..Default::default()
            };
        }
    };
    let work = async {
        match &req {
            JobRequest::Backup { policy, mode } => {
                backup(&env, &host, &job, policy.as_deref(), *mode, tracker).await
            }
            JobRequest::Restore { .. } => restore_job(&env, &host, &req, tracker).await,
            JobRequest::VerifyBoot { .. } => Err(EngineError::config(
                "a verify_boot job runs through verify_jobs::run",
            )),
        }
    };
    let limit = match &req {
        JobRequest::Backup {
            policy: Some(name), ..
        } => env
            .daemon
            .policies
            .get(name)
            .map_or(crate::policy::DEFAULT_JOB_TIMEOUT, |p| p.job_timeout),
        _ => crate::policy::DEFAULT_JOB_TIMEOUT,
    };
    let cancelled = async {
        // A dropped sender means no abort can come any more.
        let fired = cancel.wait_for(|c| *c).await.is_ok();
        if !fired {
            std::future::pending::<()>().await;
        }
    };
    let cancelled_here = async {
        // A dropped sender (the job ended the loop's bookkeeping) is no cancel.
        if cancel_one.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let outcome = tokio::select! {
        r = work => r.unwrap_or_else(|e| JobOutcome { error: Some(error_text(&e)), ..Default::default() }),
        _ = cancelled => aborted(&host, &job.vm, "aborted by the daemon's shutdown").await,
        _ = cancelled_here => JobOutcome {
            cancelled: true,
            ..aborted(&host, &job.vm, "cancelled through the API (DELETE /api/jobs/ID)").await
        },
        _ = tokio::time::sleep(limit) => {
            let why = format!("aborted: the job ran longer than its job_timeout ({} s)", limit.as_secs());
            aborted(&host, &job.vm, &why).await
        }
    };
    if let Ok(mut m) = progress.lock() {
        m.remove(&job.id);
    }
    outcome
}

/// The outcome of a job whose engine future was dropped: the VM healed as `cleanup` would.
async fn aborted(host: &Host, vm: &str, why: &str) -> JobOutcome {
    let healed = heal_after_interruption(host, vm).await;
    JobOutcome {
        error: Some(EngineError::new(ErrorKind::Interrupted, why).to_string()),
        note: (!healed.is_empty()).then(|| format!("healed: {}", healed.join("; "))),
        ..Default::default()
    }
}

async fn backup(
    env: &Env,
    host: &Host,
    job: &JobRecord,
    policy: Option<&str>,
    mode: ModeRequest,
    progress: Arc<dyn Progress>,
) -> Result<JobOutcome, EngineError> {
    let policy = match policy {
        None => None,
        Some(name) => Some(env.daemon.policies.get(name).ok_or_else(|| {
            EngineError::config(format!("policy {name:?} is no longer in the configuration"))
        })?),
    };
    let opts = match policy {
        Some(p) => p.backup_options(mode),
        None => BackupOptions {
            mode,
            parallel: 2,
            ..BackupOptions::default()
        },
    };
    let rc = env.repository_config(policy.and_then(|p| p.repository.as_deref()))?;
    let repo = open_repository(rc).await?;
    let r = backup_vm(host, &repo, &job.vm, &opts, progress).await?;
    let mut outcome = JobOutcome {
        snapshot: Some(r.id.clone()),
        mode: Some(r.mode.clone()),
        bytes_read: Some(r.disks.iter().map(|d| d.bytes_read as i64).sum()),
        bytes_new: Some(r.disks.iter().map(|d| d.bytes_new as i64).sum()),
        duration: Some(r.duration_secs),
        note: (!r.warnings.is_empty()).then(|| r.warnings.join("; ")),
        ..Default::default()
    };
    // Retention runs only after a success, and only over this VM's backups: a failed
    // backup never costs an older one.
    if let Some(keep) = policy.and_then(|p| p.retention) {
        match repo.prune(&keep, Some((&r.host, &r.vm)), false).await {
            Ok(decisions) => {
                let removed = decisions.iter().filter(|d| !d.keep).count() as i64;
                tracing::info!(job = job.id, vm = %r.vm, removed, "retention applied");
                outcome.pruned = Some(removed);
            }
            Err(e) => {
                let note = format!("retention failed: {e}");
                tracing::warn!(job = job.id, "{note}");
                outcome.note = Some(match outcome.note {
                    Some(n) => format!("{n}; {note}"),
                    None => note,
                });
            }
        }
    }
    Ok(outcome)
}

pub fn parse_storage(s: Option<&str>) -> Result<Storage, EngineError> {
    Storage::parse(s)
}

async fn restore_job(
    env: &Env,
    host: &Host,
    req: &JobRequest,
    progress: Arc<dyn Progress>,
) -> Result<JobOutcome, EngineError> {
    let JobRequest::Restore {
        snapshot,
        name,
        storage,
        define,
        start,
        force,
        repository,
        live: false,
    } = req
    else {
        return Err(EngineError::config("not a restore request"));
    };
    let repo = open_repository(env.repository_config(repository.as_deref())?).await?;
    let opts = RestoreOptions {
        snapshot: snapshot.clone(),
        name: name.clone(),
        storage: parse_storage(storage.as_deref())?,
        owner: None,
        disks: Vec::new(),
        define: *define || *start,
        start: *start,
        force: *force,
        parallel: 2,
        ..RestoreOptions::default()
    };
    let r = restore(host, &repo, &opts, progress).await?;
    Ok(JobOutcome {
        snapshot: Some(r.snapshot.clone()),
        bytes_new: Some(r.disks.iter().map(|d| d.bytes_written as i64).sum()),
        duration: Some(r.duration_secs),
        note: Some(format!(
            "restored {} to {}{}",
            r.vm,
            r.disks
                .iter()
                .map(|d| d.path.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            if r.defined { " (defined)" } else { "" }
        )),
        ..Default::default()
    })
}
