//! `restore SNAPSHOT --to HOST --live --name NEW --detach`: the live restore as a job of
//! the daemon (kind `live_restore`), which serves the backup and follows the copy; the
//! command returns once the new domain runs.
//!
//! The job goes into the configuration's catalog as `virtkeep jobs` reads it; a running
//! daemon takes it within a second (a cluster node claims it). If none has taken it
//! within [`CLAIM_ENV`] seconds (default 60), the command cancels it (only if it is
//! still queued) and fails, saying to start `virtkeep daemon`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde::Serialize;
use virtkeep_daemon::catalog::{Catalog, JobRecord, JobStatus, NewJob, now};
use virtkeep_daemon::live_jobs::running_after;
use virtkeep_daemon::task::JobRequest;
use virtkeep_engine::restore::Storage;
use virtkeep_engine::{Error as EngineError, ErrorKind};

use crate::cli::{RepoArgs, RestoreArgs};
use crate::output::print_json;
use crate::settings::Settings;

/// Seconds a daemon has to take the job before the command gives up (default 60).
pub const CLAIM_ENV: &str = "VIRTKEEP_DETACH_CLAIM_SECS";
const DEFAULT_CLAIM_SECS: u64 = 60;
/// How long a taken job may take until its domain runs (the plan, creating the disks).
const RUNNING_WITHIN: Duration = Duration::from_secs(900);
const POLL: Duration = Duration::from_millis(250);

/// What `restore --live --detach --json` prints (stable: additions only).
#[derive(Debug, Serialize)]
pub struct Detached {
    /// The daemon's job (`virtkeep jobs`, `GET /api/jobs/{job}`).
    pub job: i64,
    pub host: String,
    pub vm: String,
    pub snapshot: String,
    /// `running` (the copy goes on in the daemon) or `succeeded` (already copied).
    pub status: JobStatus,
    /// From the start of the job until the domain ran.
    pub time_to_running_secs: Option<f64>,
    /// How to follow the copy: `virtkeep jobs HOST/VM` (also `GET /api/jobs/{job}`
    /// and the web console's `/ui/jobs/{job}`).
    pub follow: String,
}

/// Queues the live restore, waits until its domain runs, and prints how to follow it.
pub async fn restore_live_detached(
    settings: &Settings,
    args: RestoreArgs,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let config = crate::daemon::load(settings)?;
    let host = args.to.clone().unwrap_or_default();
    settings.config.host(&host)?;
    Storage::parse(args.storage.as_deref())?;
    let repository = repository_name(settings, &args.repo)?;
    let repo = settings.open_repo(&args.repo).await?;
    let snapshot =
        virtkeep_engine::snapshot_ref::resolve(&repo, args.snapshot.as_deref().unwrap_or_default())
            .await?;
    let name = args.name.clone().unwrap_or_default();
    let request = JobRequest::Restore {
        snapshot: snapshot.clone(),
        name: Some(name.clone()),
        storage: args.storage.clone(),
        define: false,
        start: false,
        force: false,
        repository,
        live: true,
    };
    let catalog = Catalog::open_submitter(&config.catalog)
        .map_err(crate::daemon::user_error)?
        .ok_or_else(|| no_daemon(&format!("no catalog at {} yet", config.catalog.display())))?;
    let id = queue(&catalog, &host, &name, &request)?;
    if !json {
        eprintln!("queued live restore job {id}; waiting for the daemon to start {name}");
    }
    let job = wait(&catalog, id).await?;
    let out = Detached {
        job: id,
        follow: format!("virtkeep jobs {host}/{name}"),
        host,
        vm: name,
        snapshot,
        status: job.status,
        time_to_running_secs: job.note.as_deref().and_then(running_after),
    };
    print(&out, json)?;
    Ok(ExitCode::SUCCESS)
}

fn print(out: &Detached, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(out);
    }
    let after = out
        .time_to_running_secs
        .map(|s| format!(" after {s:.1} s"))
        .unwrap_or_default();
    println!(
        "{} running on {}{after}; the daemon copies its disks (job {})",
        out.vm, out.host, out.job
    );
    println!(
        "follow it: {}, or the web console's /ui/jobs/{}",
        out.follow, out.job
    );
    Ok(())
}

/// The daemon opens repositories by their configuration: the default one, or one of
/// `[repositories]` (by location).
fn repository_name(settings: &Settings, args: &RepoArgs) -> anyhow::Result<Option<String>> {
    let wanted = settings.repo_config(args).0.location;
    if wanted == settings.default_repository().location {
        return Ok(None);
    }
    let named = settings.config.repositories.iter();
    match named.into_iter().find(|(_, rc)| rc.location == wanted) {
        Some((n, _)) => Ok(Some(n.clone())),
        None => Err(EngineError::config(format!(
            "--detach: the daemon opens only the configuration's repositories, and {wanted} is not one of them"
        ))
        .hint("add it under [repositories.NAME] in the configuration, or leave out --detach")
        .into()),
    }
}

fn queue(catalog: &Catalog, host: &str, name: &str, request: &JobRequest) -> anyhow::Result<i64> {
    let text = serde_json::to_string(request)?;
    let id = catalog
        .add_job(&NewJob {
            run_id: None,
            kind: request.kind(),
            host,
            vm: name,
            policy: None,
            request: &text,
            attempt: 1,
            retry_of: None,
            priority: 0,
            not_before: now(),
        })
        .map_err(crate::daemon::user_error)?;
    Ok(id)
}

fn claim_within() -> Duration {
    let secs = std::env::var(CLAIM_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(DEFAULT_CLAIM_SECS);
    Duration::from_secs(secs.max(1))
}

/// Waits until job `id` runs its domain (or already succeeded); fails when no daemon
/// takes it in time (it is cancelled then, if still queued) or when it fails.
async fn wait(catalog: &Catalog, id: i64) -> anyhow::Result<JobRecord> {
    let started = Instant::now();
    let claim = claim_within();
    loop {
        let job = catalog.job(id).map_err(crate::daemon::user_error)?;
        match job.status {
            JobStatus::Queued if started.elapsed() >= claim => {
                let why = format!(
                    "no daemon took the job within {} s (restore --detach gave up)",
                    claim.as_secs()
                );
                if catalog
                    .cancel_queued(id, &why)
                    .map_err(crate::daemon::user_error)?
                {
                    return Err(no_daemon(&format!("job {id} cancelled: {why}")).into());
                }
            }
            JobStatus::Queued => {}
            JobStatus::Running if job.note.as_deref().and_then(running_after).is_some() => {
                return Ok(job);
            }
            JobStatus::Running if started.elapsed() >= claim + RUNNING_WITHIN => {
                return Err(EngineError::new(
                    ErrorKind::Remote,
                    format!(
                        "job {id} runs, but its domain did not start within {} s",
                        RUNNING_WITHIN.as_secs()
                    ),
                )
                .hint(format!("follow it with `virtkeep jobs` (job {id})"))
                .into());
            }
            JobStatus::Running => {}
            JobStatus::Succeeded => return Ok(job),
            JobStatus::Failed | JobStatus::Cancelled => return Err(job_failed(&job).into()),
        }
        tokio::time::sleep(POLL).await;
    }
}

fn job_failed(job: &JobRecord) -> EngineError {
    let error = job.error.as_deref().unwrap_or("no reason recorded");
    EngineError::new(
        ErrorKind::Remote,
        format!(
            "live restore job {} {}: {error}",
            job.id,
            job.status.as_str()
        ),
    )
}

fn no_daemon(why: &str) -> EngineError {
    EngineError::new(ErrorKind::Conflict, why.to_string()).hint(
        "--detach hands the live restore to the daemon: start `virtkeep daemon` with this configuration (or run without --detach)",
    )
}
