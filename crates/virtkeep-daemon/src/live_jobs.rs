//! A live restore run by the daemon (`restore --live --detach`, or `POST /api/jobs` with
//! `"kind": "restore", "live": true`): job kind `live_restore`, run by the engine's
//! live restore (`virtkeep_engine::live_restore`) with the daemon's progress map.
//!
//! The engine holds the job's host lock (`live-…`) from before its job directory exists
//! until the copy is done, so a `cleanup` never touches the running copy. Once the
//! domain runs, the job's note in the catalog says so ([`running_note`]): that is what
//! `restore --detach` waits for. A cancel interrupts the engine as SIGINT interrupts
//! the attached command (the new domain and what the job created are removed); so do
//! the daemon's shutdown and `job_timeout` before the domain ran. After it ran, these
//! end the job as `unfinished` and leave the domain as it is, as does a link lost for
//! good: the guest's writes are only in its overlays, so it is never rolled back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{oneshot, watch};
use virtkeep_engine::live_restore::{LiveRestoreResult, LiveTarget, restore_live};
use virtkeep_engine::progress::{Event, Progress};
use virtkeep_engine::{Error as EngineError, ErrorKind};

use crate::catalog::{Catalog, JobOutcome, JobRecord};
use crate::task::{Env, JobRequest, ProgressMap, Stops, Tracker, error_text, open_repository};

/// The start of a live restore's note once its domain runs.
const RUNNING: &str = "running after ";

/// The note of a live restore whose domain runs (`secs` after the job started).
pub fn running_note(secs: f64) -> String {
    format!("{RUNNING}{secs:.1} s; its disks are being copied")
}

/// The time until the domain ran, from a live restore's note (running or finished).
pub fn running_after(note: &str) -> Option<f64> {
    note.strip_prefix(RUNNING)?.split_once(" s")?.0.parse().ok()
}

/// The final note of a live restore that succeeded.
fn done_note(r: &LiveRestoreResult) -> String {
    let disks: Vec<String> = r
        .disks
        .iter()
        .map(|d| format!("{} -> {} ({})", d.target, d.path, d.format))
        .collect();
    format!(
        "{RUNNING}{:.1} s, copied after {:.1} s: {}; {} reconnects",
        r.time_to_running_secs,
        r.time_to_copied_secs,
        disks.join(", "),
        r.reconnects
    )
}

/// Progress for the API, and the catalog note once the domain runs.
struct LiveTracker {
    inner: Tracker,
    catalog: Arc<Catalog>,
    started: Instant,
    /// Set once the domain runs.
    running: Arc<AtomicBool>,
}

impl Progress for LiveTracker {
    fn event(&self, event: Event) {
        if let Event::Phase {
            phase: "running", ..
        } = &event
        {
            self.running.store(true, Ordering::SeqCst);
            let note = running_note(self.started.elapsed().as_secs_f64());
            if let Err(e) = self.catalog.set_job_note(self.inner.job, &note) {
                tracing::warn!(job = self.inner.job, "recording that the domain runs: {e}");
            }
        }
        self.inner.event(event);
    }
}

/// What stopped a live restore before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Shutdown,
    Cancel,
    Timeout,
}

/// Runs one live-restore job to its end.
///
/// On a blocking thread that drives it with the runtime's handle: the engine's live
/// restore future is not `Send` (its copy loop's async closures borrow across awaits,
/// which the compiler cannot prove `Send` for every lifetime), so it cannot be a task.
/// Its SSH sessions' own tasks run on the runtime as usual.
pub async fn run(
    env: Arc<Env>,
    catalog: Arc<Catalog>,
    job: JobRecord,
    progress: ProgressMap,
    stops: Stops,
) -> JobOutcome {
    let id = job.id;
    let handle = tokio::runtime::Handle::current();
    let map = progress.clone();
    let ran = tokio::task::spawn_blocking(move || {
        handle.block_on(async move { live(&env, catalog, &job, map, stops).await })
    })
    .await;
    let outcome = match ran {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => JobOutcome {
            error: Some(error_text(&e)),
            ..Default::default()
        },
        Err(e) => JobOutcome {
            error: Some(format!("the live restore's thread failed: {e}")),
            ..Default::default()
        },
    };
    if let Ok(mut m) = progress.lock() {
        m.remove(&id);
    }
    outcome
}

async fn live(
    env: &Env,
    catalog: Arc<Catalog>,
    job: &JobRecord,
    progress: ProgressMap,
    stops: Stops,
) -> Result<JobOutcome, EngineError> {
    let Ok(JobRequest::Restore {
        snapshot,
        name: Some(name),
        storage,
        repository,
        live: true,
        ..
    }) = serde_json::from_str::<JobRequest>(&job.request)
    else {
        return Err(EngineError::config(
            "not a live restore request with a new domain name",
        ));
    };
    let tracker = LiveTracker {
        inner: Tracker {
            job: job.id,
            map: progress,
        },
        catalog,
        started: Instant::now(),
        running: Arc::default(),
    };
    let storage = crate::task::parse_storage(storage.as_deref())?;
    let host = env.connect(&job.host).await?;
    let repo = open_repository(env.repository_config(repository.as_deref())?).await?;
    let to = LiveTarget {
        name: &name,
        storage: &storage,
        progress: &tracker,
    };
    let ctl = Stopping {
        running: tracker.running.clone(),
        stopped: Mutex::new(None),
    };
    let Stops { shutdown, cancel } = stops;
    let stops = interrupted(cancel, shutdown.clone(), &ctl);
    let r = tokio::select! {
        r = restore_live(&host, &repo, &snapshot, to, stops) => r,
        why = left_as_is(shutdown, &ctl) => {
            return Ok(left_outcome(why, (&name, &job.host), snapshot));
        }
    };
    let stop = *ctl.stopped.lock().unwrap_or_else(|p| p.into_inner());
    Ok(outcome(r, snapshot, stop))
}

/// What a stop of the job means for its live restore, decided once: a cancel always
/// interrupts the engine (it rolls back, as SIGINT does to the attached command); the
/// daemon's shutdown or `job_timeout` interrupt it before the domain ran, and after
/// that end the job leaving the domain as it is ([`left_as_is`]).
struct Stopping {
    /// Set once the domain runs.
    running: Arc<AtomicBool>,
    /// The stop that took effect.
    stopped: Mutex<Option<Stop>>,
}

impl Stopping {
    fn running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// Records `why` unless another stop took effect first.
    fn claim(&self, why: Stop) -> bool {
        let mut s = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        s.is_none() && s.replace(why).is_none()
    }
}

/// Resolves when the daemon shuts down (aborting jobs) or `job_timeout` passes.
async fn stopping(mut shutdown: watch::Receiver<bool>) -> Stop {
    // A dropped sender is no stop.
    let shut = async {
        if shutdown.wait_for(|c| *c).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = shut => Stop::Shutdown,
        _ = tokio::time::sleep(crate::policy::DEFAULT_JOB_TIMEOUT) => Stop::Timeout,
    }
}

/// The engine's interruption: resolves on a cancel, or on a stop before the domain ran.
async fn interrupted(
    cancel: oneshot::Receiver<()>,
    shutdown: watch::Receiver<bool>,
    ctl: &Stopping,
) {
    let cancelled = async {
        if cancel.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let before_running = async {
        let why = stopping(shutdown).await;
        if ctl.running() {
            std::future::pending::<()>().await;
        }
        why
    };
    let why = tokio::select! {
        _ = cancelled => Stop::Cancel,
        why = before_running => why,
    };
    if !ctl.claim(why) {
        std::future::pending::<()>().await;
    }
}

/// Resolves on a stop after the domain ran: the job ends, the engine's work is dropped
/// (the node's NBD server with it), and the domain stays as it is.
async fn left_as_is(shutdown: watch::Receiver<bool>, ctl: &Stopping) -> Stop {
    let why = stopping(shutdown).await;
    if !ctl.running() || !ctl.claim(why) {
        std::future::pending::<()>().await;
    }
    why
}

/// The outcome of a live restore stopped after its domain `name` ran on `host`.
fn left_outcome(why: Stop, (name, host): (&str, &str), snapshot: String) -> JobOutcome {
    let by = match why {
        Stop::Timeout => "its job_timeout",
        _ => "the daemon's shutdown",
    };
    JobOutcome {
        error: Some(format!(
            "unfinished: stopped by {by} after {name} ran: {name} is left on {host} as it is, not rolled back (its writes are only in its overlays, whose NBD server stopped with the job: the guest pauses at its next read of data not yet copied) (hint: `virtkeep cleanup {host}` reports the job as left as is: keep the guest to save its writes, or destroy and undefine {name} and remove its disks and job directory)"
        )),
        snapshot: Some(snapshot),
        ..Default::default()
    }
}

fn outcome(
    r: Result<LiveRestoreResult, EngineError>,
    snapshot: String,
    stop: Option<Stop>,
) -> JobOutcome {
    match r {
        Ok(r) => JobOutcome {
            note: Some(done_note(&r)),
            snapshot: Some(snapshot),
            bytes_read: Some(i64::try_from(r.served_bytes).unwrap_or(i64::MAX)),
            duration: Some(r.time_to_copied_secs),
            ..Default::default()
        },
        Err(e) => {
            let why = match stop {
                Some(Stop::Cancel) => "cancelled through the API: ",
                Some(Stop::Shutdown) => "stopped by the daemon's shutdown: ",
                Some(Stop::Timeout) => "stopped after the job_timeout: ",
                None if e.kind == ErrorKind::Unfinished => "unfinished: ",
                None => "",
            };
            JobOutcome {
                cancelled: stop == Some(Stop::Cancel),
                error: Some(format!("{why}{}", error_text(&e))),
                snapshot: Some(snapshot),
                ..Default::default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_time_to_running_reads_back_from_either_note() {
        assert_eq!(running_after(&running_note(2.345)), Some(2.3));
        let done = "running after 1.5 s, copied after 9.0 s: vda -> /p (raw); 0 reconnects";
        assert_eq!(running_after(done), Some(1.5));
        assert_eq!(running_after("restored x to /p"), None);
    }
}
