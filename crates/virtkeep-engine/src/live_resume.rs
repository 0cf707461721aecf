//! `virtkeep restore --resume JOB --to HOST`: finishes a live restore
//! (`live_restore.rs`) whose node died after its domain started.
//!
//! With the node gone, the guest runs (or pauses at its next read of data not yet
//! copied) on overlays over an NBD export nobody serves, and the job directory
//! (`/run/virtkeep/jobs/live-…`) is all that is left of the run. Before the domain
//! starts the run writes its record there ([`crate::live_record`]): the backup,
//! the repository's id, the new domain's name, `--storage` and each disk's target,
//! format, destination and overlay. The resume takes the job's host lock (a job whose
//! node still holds it is refused), checks the record against the repository given and
//! against what a restore of that backup under that name with that `--storage` places
//! (the record alone never names a path the resume acts on), and the domain (the job's
//! UUID, its name, running or paused) and each disk's live `<disk>` against the record.
//! Then it serves the backup again on the job's socket path
//! ([`LiveBackup::reforward`]), resumes a guest paused on an I/O error, and runs the
//! copy of `live_copy.rs` as after a reconnect: a disk that already pivoted is skipped,
//! a block job that still runs is followed, one that ended is started again; then the
//! pivot, the overlays and the job directory go, as at the end of an uninterrupted run.
//! A failure removes nothing: the command may be run again.

use std::time::Instant;

use virtkeep_libvirt::coreutils;

use crate::error::{Error, ErrorKind, Result};
use crate::host::{HOST_STATE_DIR, Host};
use crate::live::LiveBackup;
use crate::live_copy::{CopyDisk, Link, resume_if_io_paused};
use crate::live_record::{JobRecord, resume_command};
use crate::live_restore::{
    LiveRestoreResult, LiveTarget, PlanFor, Planned, STARTED_FILE, check_detached, final_xml, plan,
    stage_copies,
};
use crate::progress::{Event, Progress};
use crate::restore::Storage;

/// What the checks found: the record, the domain's UUID, the backup (not served yet)
/// and the disks as planned (equal to the record's).
struct Found {
    rec: JobRecord,
    uuid: String,
    live: LiveBackup,
    disks: Vec<Planned>,
}

/// Finishes live restore `job` on `host` from `repo` (see the module doc); the result
/// is that of an uninterrupted `restore --live`, with `resumed` set.
pub async fn resume_live(
    host: &Host,
    repo: &virtkeep_repo::Repository,
    job: &str,
    progress: &dyn Progress,
) -> Result<LiveRestoreResult> {
    let started = Instant::now();
    let dir = existing_job(host, job).await?;
    let lock = match host.lock_vm(job, 0).await {
        Ok(lock) => lock,
        Err(e) if e.kind == ErrorKind::Conflict => {
            return Err(Error::conflict(format!(
                "live restore job {job} on {} is still running: its process holds the job's lock",
                host.name
            ))
            .hint("only a live restore whose node died is resumed; a detached one is followed with `virtkeep jobs`"));
        }
        Err(e) => return Err(e),
    };
    let found = match check(host, repo, job, &dir, progress).await {
        Ok(f) => f,
        Err(e) => {
            lock.release().await;
            return Err(e);
        }
    };
    let Found {
        rec,
        uuid,
        mut live,
        disks,
    } = found;
    let mut link = Link::new(host, lock, job);
    link.settle_from_now();
    let watch = (started, progress);
    let res = complete(&mut link, &mut live, (&rec.name, &uuid), &disks, watch).await;
    let served_bytes = live.served_bytes();
    if res.is_ok() {
        live.finish(link.host()).await;
    } else {
        live.abandon(link.host()).await;
    }
    let reconnects = link.reconnects;
    link.release().await;
    let (running, copied) = res.map_err(|e| not_finished(e, host, job, &rec.name))?;
    Ok(LiveRestoreResult {
        snapshot: rec.backup,
        host: host.name.clone(),
        vm: rec.name,
        disks: disks.into_iter().map(|d| d.report).collect(),
        time_to_running_secs: running,
        time_to_copied_secs: copied,
        reconnects,
        served_bytes,
        resumed: true,
    })
}

/// The job directory of `job`, which must be a live restore job's name and exist.
async fn existing_job(host: &Host, job: &str) -> Result<String> {
    if !crate::cleanup_live::is_live_job(job) {
        return Err(Error::config(format!(
            "{:?} is not a live restore job (live- and 1 to 32 letters or digits, as `cleanup` reports it)",
            job.escape_debug().to_string()
        )));
    }
    let dir = format!("{HOST_STATE_DIR}/jobs/{job}");
    if host.exec(&coreutils::exists(&dir)).await?.status != 0 {
        return Err(
            Error::domain(format!("no live restore job {job} on {}", host.name)).hint(format!(
                "`virtkeep cleanup {} --dry-run` lists the live restore jobs left on the host",
                host.name
            )),
        );
    }
    Ok(dir)
}

/// Checks the job's record, domain and disks (see the module doc); the caller holds
/// the job's lock. Nothing is changed on the host.
async fn check(
    host: &Host,
    repo: &virtkeep_repo::Repository,
    job: &str,
    dir: &str,
    progress: &dyn Progress,
) -> Result<Found> {
    let rec = JobRecord::read(host, dir).await?;
    if rec.repository != repo.id() {
        return Err(Error::config(format!(
            "live restore job {job} restores backup {} of repository {}, not of this one ({})",
            rec.backup,
            rec.repository,
            repo.id()
        ))
        .hint("give the repository the live restore ran from (--repo)"));
    }
    let uuid = domain_of(host, job, dir, &rec.name).await?;
    let storage = Storage::parse((!rec.storage.is_empty()).then_some(rec.storage.as_str()))?;
    let live = LiveBackup::reopen(repo, &rec.backup, dir).await?;
    let to = LiveTarget {
        name: &rec.name,
        storage: &storage,
        progress,
    };
    let disks = plan(host, &live, to, job, PlanFor::Resume).await?;
    let planned: Vec<_> = disks.iter().map(Planned::recorded).collect();
    if planned != rec.disks {
        return Err(Error::domain(format!(
            "live restore job {job}: its record names other disks than a live restore of backup {} as {} places; nothing was done",
            rec.backup, rec.name
        )));
    }
    Ok(Found {
        rec,
        uuid,
        live,
        disks,
    })
}

/// The UUID of the job's domain: started, still defined under `name`, running or
/// paused.
async fn domain_of(host: &Host, job: &str, dir: &str, name: &str) -> Result<String> {
    let h = &host.name;
    let cleanup = format!("`virtkeep cleanup {h}` handles what the job left");
    let started = format!("{dir}/{STARTED_FILE}");
    if host.exec(&coreutils::exists(&started)).await?.status != 0 {
        return Err(Error::conflict(format!(
            "live restore job {job} was stopped before its domain started: nothing to resume"
        ))
        .hint(cleanup));
    }
    let gone = || {
        Error::domain(format!(
            "the domain {name} of live restore job {job} is gone: nothing to resume"
        ))
        .hint(cleanup.clone())
    };
    let uuid = crate::cleanup_live::job_uuid(host, dir)
        .await?
        .ok_or_else(gone)?;
    let out = host.exec(&host.virsh().domname(&uuid)).await?;
    if out.status != 0 || String::from_utf8_lossy(&out.stdout).trim() != name {
        return Err(gone());
    }
    let state = host.run_string(&host.virsh().domstate(&uuid)).await?;
    let state = state.trim();
    if !(state.starts_with("running") || state.starts_with("paused")) {
        return Err(Error::domain(format!(
            "{name} (live restore job {job}) is {state}: a resume needs it running or paused on its overlays"
        )));
    }
    Ok(uuid)
}

/// Serves the backup again, resumes the guest, copies what is not copied yet and
/// checks that nothing refers to the node. Returns (time to running, time to copied)
/// since `started`.
async fn complete(
    link: &mut Link<'_>,
    live: &mut LiveBackup,
    (name, uuid): (&str, &str),
    disks: &[Planned],
    (started, progress): (Instant, &dyn Progress),
) -> Result<(f64, f64)> {
    live.reforward(link.host()).await?;
    link.attempt(live, async |h| resume_if_io_paused(h, uuid).await)
        .await?;
    let running = started.elapsed().as_secs_f64();
    progress.event(Event::Phase {
        vm: name.to_string(),
        phase: "running",
    });
    let finals = final_xml(live, disks)?;
    let dir = live.dir().to_string();
    let copies = link
        .attempt(live, async |h: &Host| {
            to_copy(h, (&dir, &finals), uuid, disks).await
        })
        .await?;
    crate::live_copy::copy(link, live, (name, uuid), &copies, progress).await?;
    // A guest that paused meanwhile retries its request on its own disk now.
    link.attempt(live, async |h| resume_if_io_paused(h, uuid).await)
        .await?;
    link.attempt(live, async |h: &Host| {
        check_detached(h, (name, uuid), &dir).await
    })
    .await?;
    Ok((running, started.elapsed().as_secs_f64()))
}

/// The disks still to copy, by the domain's live XML: a disk that names its overlay
/// is copied (its block job, if one still runs, is followed at full speed); one that
/// pivoted before the node died must name its destination and nothing of the job, and
/// only loses its overlay. `(job dir, final XML)`.
async fn to_copy(
    host: &Host,
    (dir, finals): (&str, &str),
    uuid: &str,
    disks: &[Planned],
) -> Result<Vec<CopyDisk>> {
    let xml = host.run_string(&host.virsh().dumpxml(uuid, false)).await?;
    let staged = stage_copies(host, dir, finals, disks).await?;
    let mut out = Vec::new();
    for (d, mut c) in disks.iter().zip(staged) {
        let target = &d.report.target;
        let disk = virtkeep_libvirt::disk_element(&xml, target)?;
        let dest = d.report.path.strip_prefix("rbd:").unwrap_or(&d.report.path);
        if !disk.contains(&d.overlay) {
            if disk.contains(dir) || disk.contains("protocol='nbd'") || !disk.contains(dest) {
                return Err(Error::domain(format!(
                    "disk {target} names neither its overlay nor its destination {dest} only; nothing was copied"
                )));
            }
            tracing::info!(target = %target, "pivoted before the node died; removing its overlay");
            host.run(&coreutils::rm_f(&d.overlay)).await?;
            continue;
        }
        let info = host
            .run_string(&host.virsh().blockjob_info(uuid, target))
            .await?;
        if !info.trim().is_empty() {
            let mirror = disk.split_once("<mirror").map(|(_, m)| m);
            if !mirror.is_some_and(|m| m.contains(dest)) {
                return Err(Error::domain(format!(
                    "disk {target} has a block job that is not the copy into {dest}; nothing was copied"
                )));
            }
            // Best effort: a job that ends meanwhile is started again by the copy.
            let _ = host
                .exec(&host.virsh().blockjob_bandwidth(uuid, target, 0))
                .await?;
            tracing::info!(target = %target, "its block job still runs; following it");
            c.running = true;
        }
        out.push(c);
    }
    Ok(out)
}

/// The error of a resume that did not finish: nothing was removed, and it may be run
/// again.
fn not_finished(e: Error, host: &Host, job: &str, name: &str) -> Error {
    let cmd = resume_command(job, &host.name);
    let kind = e.kind;
    Error::new(
        kind,
        format!("resuming live restore job {job}: {e}; {name} is left on {} as it is", host.name),
    )
    .hint(format!(
        "nothing was removed (the guest's writes are in its overlays); run `{cmd}` again once the cause is fixed"
    ))
}
