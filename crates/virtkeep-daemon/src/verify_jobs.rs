//! A policy's boot verification (`[policies.NAME.verify_boot]`): on its schedule, the
//! newest backup of each VM the policy selects is booted as a transient domain on the
//! verification host (`virtkeep verify --boot`), one `verify_boot` job per VM.
//!
//! The VMs come from the repository, not from the host: a VM whose backups exist is
//! verified even when its host does not answer. A verify job carries the source VM's
//! host and name, so the queue never runs it beside a backup of the same VM (which
//! would make "the newest backup" a moving target).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use virtkeep_engine::Error as EngineError;
use virtkeep_engine::verify_boot::{BootVerifyOptions, verify_boot};

use crate::catalog::{Catalog, JobOutcome, JobRecord, NewJob, now};
use crate::policy::{Policy, VerifyBootPolicy};
use crate::task::{Env, JobRequest, Stops, open_repository};

/// The newest backup of each (host, VM) the policy selects: (host, VM, backup id).
pub async fn newest_backups(
    env: &Env,
    p: &Policy,
) -> Result<Vec<(String, String, String)>, EngineError> {
    let rc = env.repository_config(p.repository.as_deref())?;
    let repo = open_repository(rc).await?;
    let mut newest: BTreeMap<(String, String), (time::OffsetDateTime, String)> = BTreeMap::new();
    for b in repo.snapshots().await? {
        let selected = p
            .selections
            .iter()
            .any(|s| s.host == b.host && s.matches(&b.vm));
        if !selected {
            continue;
        }
        let e = newest
            .entry((b.host.clone(), b.vm.clone()))
            .or_insert((b.time, b.id.clone()));
        if b.time > e.0 {
            *e = (b.time, b.id);
        }
    }
    Ok(newest
        .into_iter()
        .map(|((h, v), (_, id))| (h, v, id))
        .collect())
}

/// Creates a boot verification run of policy `p`: one queued `verify_boot` job per VM
/// for its newest backup (listed within 120 s), each handed to `queue`. Runs off the
/// daemon's loop (a slow repository must not hold up its heartbeat).
pub async fn queue_run(
    env: &Env,
    catalog: &Catalog,
    p: &Policy,
    trigger: &str,
    queue: impl Fn(i64),
) -> crate::error::Result<()> {
    let listed = tokio::time::timeout(Duration::from_secs(120), newest_backups(env, p)).await;
    let (backups, problem) = match listed {
        Ok(Ok(b)) => (b, None),
        Ok(Err(e)) => (Vec::new(), Some(format!("the repository: {e}"))),
        Err(_) => (
            Vec::new(),
            Some("the repository: no answer in 120 s".into()),
        ),
    };
    let run = catalog.start_run(&p.name, "verify_boot", trigger)?;
    let queued = add_jobs(
        catalog,
        (&p.name, i64::from(p.priority)),
        run,
        &backups,
        queue,
    )?;
    tracing::info!(policy = %p.name, run, jobs = queued, trigger, "boot verification run");
    if queued == 0 {
        let note = problem.unwrap_or_else(|| "no backup of a selected VM to verify".into());
        tracing::warn!(policy = %p.name, run, "{note}");
        let failed = backups.is_empty();
        catalog.finish_run(
            run,
            if failed { "failed" } else { "succeeded" },
            Some(&note),
        )?;
    }
    Ok(())
}

/// Adds run `run`'s jobs, one per backup whose VM has no open verify job, then hands
/// them to `queue`. All exist before the loop gets the first: a first job finished
/// early (a refusal) would otherwise find the run without open jobs and close it, and
/// `fail_rest_above_percent` would cancel the jobs added after it.
fn add_jobs(
    catalog: &Catalog,
    (policy, priority): (&str, i64),
    run: i64,
    backups: &[(String, String, String)],
    queue: impl Fn(i64),
) -> crate::error::Result<usize> {
    let mut ids = Vec::new();
    for (host, vm, snapshot) in backups {
        if catalog.has_open_job(host, vm, policy, "verify_boot")? {
            continue;
        }
        let request = serde_json::to_string(&JobRequest::VerifyBoot {
            policy: policy.to_string(),
            snapshot: snapshot.clone(),
        })
        .unwrap_or_default();
        ids.push(catalog.add_job(&NewJob {
            run_id: Some(run),
            kind: "verify_boot",
            host,
            vm,
            policy: Some(policy),
            request: &request,
            attempt: 1,
            retry_of: None,
            priority,
            not_before: now(),
        })?);
    }
    for id in &ids {
        queue(*id);
    }
    Ok(ids.len())
}

/// The host whose job limit a job counts against: where it runs. A boot verification
/// runs on its policy's verification host (the job's own host is the backed-up VM's,
/// which keeps it from running beside a backup of that VM).
pub fn slot_host(env: &Env, j: &JobRecord) -> String {
    let verify_host = (j.kind == "verify_boot")
        .then(|| j.policy.as_deref().and_then(|p| env.daemon.policies.get(p)))
        .flatten()
        .and_then(|p| p.verify_boot.as_ref())
        .map(|v| v.host.clone());
    verify_host.unwrap_or_else(|| j.host.clone())
}

/// Runs one verify job: boots `snapshot` on the policy's verification host. A shutdown,
/// a cancel through the API and the policy's `job_timeout` end the verification early,
/// which then destroys its domain and removes its overlays before the job ends (the
/// future is never dropped halfway, which would leave them behind).
pub async fn run_job(env: Arc<Env>, policy: &str, snapshot: &str, stops: Stops) -> JobOutcome {
    run(env, policy, snapshot, stops)
        .await
        .unwrap_or_else(|e| JobOutcome {
            error: Some(match &e.hint {
                Some(h) => format!("{e} (hint: {h})"),
                None => e.to_string(),
            }),
            snapshot: Some(snapshot.to_string()),
            ..Default::default()
        })
}

async fn run(
    env: Arc<Env>,
    policy: &str,
    snapshot: &str,
    stops: Stops,
) -> Result<JobOutcome, EngineError> {
    let p = env.daemon.policies.get(policy).ok_or_else(|| {
        EngineError::config(format!(
            "policy {policy:?} is no longer in the configuration"
        ))
    })?;
    let v: &VerifyBootPolicy = p.verify_boot.as_ref().ok_or_else(|| {
        EngineError::config(format!("policy {policy:?} no longer has verify_boot"))
    })?;
    let repo = open_repository(env.repository_config(p.repository.as_deref())?).await?;
    let host = env.connect(&v.host).await?;
    let opts = BootVerifyOptions {
        timeout: v.timeout,
        expect_serial: v.expect_serial.clone(),
        agent: v.agent,
    };
    let cancelled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = cancelled.clone();
    let Stops {
        mut shutdown,
        cancel,
    } = stops;
    let limit = p.job_timeout;
    let interrupted = async move {
        let down = async {
            if shutdown.wait_for(|s| *s).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let asked = async {
            if cancel.await.is_err() {
                std::future::pending::<()>().await;
            } else {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        };
        tokio::select! {
            _ = down => {},
            _ = asked => {},
            _ = tokio::time::sleep(limit) => {},
        }
    };
    let started = std::time::Instant::now();
    let res = verify_boot(&host, &repo, snapshot, &opts, interrupted).await;
    let cancelled = cancelled.load(std::sync::atomic::Ordering::SeqCst);
    let r = match res {
        Ok(r) => r,
        Err(e) if cancelled => {
            return Ok(JobOutcome {
                cancelled: true,
                error: Some(e.to_string()),
                snapshot: Some(snapshot.to_string()),
                ..Default::default()
            });
        }
        Err(e) => return Err(e),
    };
    Ok(JobOutcome {
        error: r.reason.clone(),
        snapshot: Some(snapshot.to_string()),
        duration: Some(started.elapsed().as_secs_f64()),
        note: Some(format!(
            "booted as {} on {}: running after {:.1} s, watched {:.1} s{}",
            r.domain,
            r.host,
            r.time_to_running_secs,
            r.ran_secs,
            match r.serial_matched {
                Some(true) => ", serial output matched",
                Some(false) => ", serial output did not match",
                None => "",
            }
        )),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loop may finish a job as soon as it gets it: by then every job of the run
    /// exists, so the run's open jobs are all of them (not the first one alone, which
    /// would let the run close and its later jobs be cancelled).
    #[test]
    fn a_runs_jobs_all_exist_before_the_first_is_handed_over() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = Catalog::open_writer(&dir.path().join("c.sqlite")).expect("open");
        let run = c.start_run("p", "verify_boot", "schedule").expect("run");
        let backups: Vec<(String, String, String)> = ["a", "b", "c"]
            .iter()
            .map(|vm| ("kvm1".into(), (*vm).into(), format!("{vm}-1")))
            .collect();
        let handed = std::cell::RefCell::new(Vec::new());
        let queue = |id| {
            assert_eq!(c.run_counts(run).expect("counts"), (0, 0, 3), "job {id}");
            handed.borrow_mut().push(id);
        };
        assert_eq!(
            add_jobs(&c, ("p", 5), run, &backups, queue).expect("add"),
            3
        );
        assert_eq!(handed.borrow().len(), 3);
        // A VM whose verification is still open gets no second job.
        let again = add_jobs(&c, ("p", 5), run, &backups, |_| {}).expect("add");
        assert_eq!(again, 0);
    }
}
