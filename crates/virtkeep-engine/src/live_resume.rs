//! `virtkeep restore --resume JOB --to HOST`: finishes a live restore
//! (`live_restore.rs`) whose node died after its domain started.
//!
//! With the node gone, the guest runs (or pauses at its next read of data not yet
//! copied) on overlays over an NBD export nobody serves, and the job directory
//! (`/run/virtkeep/jobs/live-…`) is all that is left of the run. Before the domain
//! starts the run writes its record there ([`RESUME_FILE`], [`JobRecord`]): the backup,
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

use std::collections::BTreeSet;
use std::time::Instant;

use virtkeep_libvirt::coreutils;

use crate::error::{Error, ErrorKind, Result};
use crate::host::{HOST_STATE_DIR, Host};
use crate::live::LiveBackup;
use crate::live_copy::{CopyDisk, Link, resume_if_io_paused};
use crate::live_restore::{
    LiveRestoreResult, LiveTarget, Planned, STARTED_FILE, check_detached, final_xml, plan,
    stage_copies,
};
use crate::progress::{Event, Progress};
use crate::restore::Storage;

/// In the job directory: the job's [`JobRecord`], written before the domain starts.
pub const RESUME_FILE: &str = "resume";
/// The record's first line.
const HEADER: &str = "virtkeep live restore record v1";
/// At most this many bytes of a record are read, lines of at most [`LINE_MAX`]
/// characters and at most [`DISKS_MAX`] disks taken: the host's files are untrusted.
const RECORD_MAX: u64 = 64 * 1024;
const LINE_MAX: usize = 4096;
const DISKS_MAX: usize = 64;

/// The command that resumes `job` on `host`, for messages.
pub fn resume_command(job: &str, host: &str) -> String {
    format!("virtkeep restore --resume {job} --to {host}")
}

/// What a resume needs of a live restore, recorded in its job directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    pub backup: String,
    /// The repository's id (`Repository::id`).
    pub repository: String,
    /// The new domain.
    pub name: String,
    /// `--storage` as [`Storage::spec`] writes it; empty for each disk's own place.
    pub storage: String,
    pub disks: Vec<RecordedDisk>,
}

/// One disk of a [`JobRecord`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedDisk {
    pub target: String,
    pub format: String,
    /// The destination as the result reports it.
    pub path: String,
    pub overlay: String,
}

impl JobRecord {
    /// The record's text: a header, then one `key<TAB>value` line each and one
    /// `disk<TAB>target<TAB>format<TAB>path<TAB>overlay` line per disk.
    pub fn text(&self) -> Result<String> {
        let mut out = vec![HEADER.to_string()];
        for (k, v) in [
            ("backup", &self.backup),
            ("repository", &self.repository),
            ("name", &self.name),
            ("storage", &self.storage),
        ] {
            out.push(format!("{k}\t{v}"));
        }
        for d in &self.disks {
            let fields = [&d.target, &d.format, &d.path, &d.overlay];
            out.push(format!("disk\t{}", fields.map(|f| f.as_str()).join("\t")));
        }
        let text = out.join("\n") + "\n";
        match JobRecord::parse(&text) {
            Ok(back) if &back == self => Ok(text),
            _ => Err(Error::domain(
                "a name of this live restore cannot be recorded for a resume (a tab, a control character or a very long path)",
            )),
        }
    }

    /// Writes the record into the job directory `dir`.
    pub async fn write(&self, host: &Host, dir: &str) -> Result<()> {
        let text = self.text()?;
        host.upload(&format!("{dir}/{RESUME_FILE}"), text.as_bytes())
            .await
    }

    /// Reads the record of the job directory `dir` (bounded, every line checked).
    pub async fn read(host: &Host, dir: &str) -> Result<JobRecord> {
        let path = format!("{dir}/{RESUME_FILE}");
        let out = host
            .exec(&coreutils::head_bytes(&path, RECORD_MAX + 1))
            .await?;
        let bad = |why: &str| Error::domain(format!("{path}: {why}; nothing was done"));
        if out.status != 0 {
            return Err(bad("no record to resume from (the job was made by a virtkeep without resume, or killed before its plan)")
                .hint("keep the guest as it is, or destroy and undefine it and remove its disks and the job directory"));
        }
        if out.stdout.len() as u64 > RECORD_MAX {
            return Err(bad("larger than a record"));
        }
        let text = std::str::from_utf8(&out.stdout).map_err(|_| bad("not UTF-8"))?;
        JobRecord::parse(text).map_err(|e| bad(&e))
    }

    /// Parses and checks a record's text: the header, known keys once each, no control
    /// characters, 1 to [`DISKS_MAX`] disks with distinct targets.
    pub fn parse(text: &str) -> std::result::Result<JobRecord, String> {
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return Err("not a live restore record of this version".into());
        }
        let mut keys = std::collections::BTreeMap::new();
        let mut disks = Vec::new();
        for line in lines.filter(|l| !l.is_empty()) {
            if line.len() > LINE_MAX {
                return Err("a line is too long".into());
            }
            let f: Vec<&str> = line.split('\t').collect();
            if f.iter().any(|v| v.chars().any(char::is_control)) {
                return Err("a control character in a line".into());
            }
            match f.as_slice() {
                ["disk", t, fmt, p, o] if [t, fmt, p, o].iter().all(|v| !v.is_empty()) => {
                    disks.push(RecordedDisk {
                        target: t.to_string(),
                        format: fmt.to_string(),
                        path: p.to_string(),
                        overlay: o.to_string(),
                    });
                }
                [k @ ("backup" | "repository" | "name" | "storage"), v] => {
                    if keys.insert(*k, v.to_string()).is_some() {
                        return Err(format!("{k} recorded twice"));
                    }
                }
                _ => {
                    let head: String = line.chars().take(60).collect();
                    return Err(format!(
                        "unexpected line {:?}",
                        head.escape_debug().to_string()
                    ));
                }
            }
        }
        let targets: BTreeSet<&str> = disks.iter().map(|d| d.target.as_str()).collect();
        if disks.is_empty() || disks.len() > DISKS_MAX || targets.len() != disks.len() {
            return Err(format!("{} disks, or one twice", disks.len()));
        }
        let mut get = |k: &str| match keys.remove(k) {
            Some(v) if !v.is_empty() || k == "storage" => Ok(v),
            _ => Err(format!("no {k}")),
        };
        Ok(JobRecord {
            backup: get("backup")?,
            repository: get("repository")?,
            name: get("name")?,
            storage: get("storage")?,
            disks,
        })
    }
}

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
    let disks = plan(host, &live, to, job, false).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> JobRecord {
        JobRecord {
            backup: "b1".into(),
            repository: "r1".into(),
            name: "new".into(),
            storage: String::new(),
            disks: vec![RecordedDisk {
                target: "vda".into(),
                format: "raw".into(),
                path: "/pool/new-vda.img".into(),
                overlay: "/pool/.new-vda.img.vkrestore-live-1".into(),
            }],
        }
    }

    #[test]
    fn a_record_reads_back_as_written() {
        let rec = record();
        let text = rec.text().expect("text");
        assert_eq!(JobRecord::parse(&text), Ok(rec));
    }

    #[test]
    fn a_record_that_is_not_one_is_refused() {
        let good = record().text().expect("text");
        let mut two = record();
        two.disks.push(two.disks[0].clone());
        let long = format!("{good}name\t{}\n", "x".repeat(LINE_MAX));
        for bad in [
            String::new(),
            good.replacen(HEADER, "virtkeep live restore record v9", 1),
            good.replace("name\tnew\n", ""),
            good.replace("name\tnew", "name\tne\u{1b}w"),
            good.replace("backup\tb1", "backup\t"),
            format!("{good}name\tother\n"),
            format!("{good}path\t/etc\n"),
            good.replace("\traw\t", "\t\t"),
            format!("{HEADER}\nbackup\tb\nrepository\tr\nname\tn\nstorage\t\n"),
            long,
        ] {
            assert!(JobRecord::parse(&bad).is_err(), "{bad:?}");
        }
        assert!(two.text().is_err());
        let mut tab = record();
        tab.name = "a\tb".into();
        assert!(tab.text().is_err());
    }
}
