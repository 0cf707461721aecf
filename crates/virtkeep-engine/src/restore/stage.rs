//! Restoring without destroying first: every disk is written under a temporary name
//! beside its destination (a file, LV or RBD image virtkeep names, see [`super::staged`]),
//! and only once all disks are written are they swapped in (rename, `lvrename`,
//! `rbd rename`), replacing the old data. The temporaries are recorded in the restore's
//! job directory on the host, so `virtkeep cleanup HOST` can finish a killed restore from
//! the host's state alone: before the swap began it removes the temporaries (the
//! originals are untouched), once it began it completes it (every temporary is then
//! fully written).
//!
//! This module imports neither the rest of the restore nor healing (both use it): only
//! the destinations ([`super::file`], [`super::lvm`], [`super::rbd`]) and the record.

use virtkeep_libvirt::{coreutils, qemu_nbd, sh};

use super::destination::Destination;
use super::file::FileDest;
use super::lvm::LvDest;
use super::rbd::RbdDest;
use super::staged::{Kind, Staged, parse_record};
use crate::error::{Error, ErrorKind, Result};
use crate::host::{HOST_STATE_DIR, Host};

/// File in the job directory listing the temporaries, one `KIND\tTEMP\tDEST` a line.
const STAGED: &str = "staged";
/// File in the job directory present once the swap has begun.
const COMMITTING: &str = "committing";
/// File in the job directory holding the key of the lock the restore holds.
pub const LOCK_FILE: &str = "lock";
/// Prefix of restore job directories under `jobs/`.
pub const JOB_PREFIX: &str = "restore-";

/// A destination and the temporary written for it.
pub type Swap<'a> = (&'a dyn Destination, &'a Staged);

/// The destination a record of the host names (to finish a killed restore).
fn recorded(s: &Staged) -> Box<dyn Destination> {
    match s.kind {
        Kind::File => Box::new(FileDest {
            path: s.dest.clone(),
        }),
        Kind::Lv => Box::new(LvDest::recorded(&s.dest)),
        Kind::Rbd => Box::new(RbdDest::recorded(&s.dest)),
    }
}

/// Writes the list of temporaries into the job directory (before any is created).
pub async fn record(host: &Host, job_dir: &str, staged: &[Staged]) -> Result<()> {
    let text: String = staged.iter().map(Staged::line).collect();
    host.upload(&format!("{job_dir}/{STAGED}"), text.as_bytes())
        .await
}

/// Swaps every temporary in: from here on a killed restore is completed, not undone.
pub async fn commit(host: &Host, job_dir: &str, swaps: &[Swap<'_>]) -> Result<()> {
    host.upload(&format!("{job_dir}/{COMMITTING}"), b"").await?;
    for (dest, s) in swaps {
        dest.commit(host, s).await?;
    }
    Ok(())
}

/// Removes every temporary that exists; the first error is returned after trying all.
pub async fn roll_back_all(host: &Host, swaps: &[Swap<'_>]) -> Result<()> {
    let mut first = None;
    for (dest, s) in swaps {
        if let Err(e) = dest.roll_back(host, s).await {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// The restore job directories on the host, with the key of the lock each one's
/// restore held.
pub async fn killed_jobs(host: &Host) -> Result<Vec<(String, String)>> {
    let out = host
        .run_string(&sh::list_restore_jobs(&format!("{HOST_STATE_DIR}/jobs")))
        .await?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(d, k)| (d.to_string(), k.to_string()))
        .collect())
}

/// Stops the exports of a killed restore job, finishes or undoes its swap, removes its
/// directory. The caller holds the job's lock. Returns what was done (or would be).
pub async fn finish_killed(host: &Host, job_dir: &str, dry_run: bool) -> Result<Vec<String>> {
    let text = host
        .exec(&coreutils::cat(&format!("{job_dir}/{STAGED}")))
        .await?;
    let staged = parse_record(&String::from_utf8_lossy(&text.stdout));
    let committing = host
        .exec(&coreutils::exists(&format!("{job_dir}/{COMMITTING}")))
        .await?
        .status
        == 0;
    let mut actions = vec![format!("stopped the exports of killed restore {job_dir}")];
    if !dry_run {
        stop_exports(host, job_dir).await?;
    }
    for s in &staged {
        let dest = recorded(s);
        if !dest.temp_exists(host, s).await? {
            continue;
        }
        if committing {
            actions.push(format!("completed the swap of {} into {}", s.temp, s.dest));
            if !dry_run {
                dest.commit(host, s).await?;
            }
        } else {
            actions.push(format!("removed restore temporary {}", s.temp));
            if !dry_run {
                dest.roll_back(host, s).await?;
            }
        }
    }
    if !dry_run {
        host.run(&coreutils::rm_rf(job_dir)).await?;
    }
    Ok(actions)
}

/// Kills the qemu-nbd processes named by the job's pid files.
async fn stop_exports(host: &Host, job_dir: &str) -> Result<()> {
    host.run(&qemu_nbd::kill_exports_in(job_dir))
        .await
        .map(|_| ())
        .map_err(|e: Error| e.context("stopping a killed restore's exports"))
}

/// A restore job's directory name is ours and under the jobs directory.
pub fn is_restore_job_dir(dir: &str) -> bool {
    dir.strip_prefix(&format!("{HOST_STATE_DIR}/jobs/{JOB_PREFIX}"))
        .is_some_and(|rest| !rest.is_empty() && !rest.contains('/') && !rest.contains(".."))
}

/// For an error message: the swap of a committed restore could not finish.
pub fn commit_failed(e: Error, job_dir: &str) -> Error {
    Error::new(
        ErrorKind::Remote,
        format!("{} (swapping the restored disks in)", e.message),
    )
    .hint(format!(
        "every disk was written; `virtkeep cleanup HOST` completes the swap (state in {job_dir})"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_job_dirs() {
        assert!(is_restore_job_dir("/run/virtkeep/jobs/restore-x"));
        assert!(!is_restore_job_dir("/run/virtkeep/jobs/restore-"));
        assert!(!is_restore_job_dir("/etc"));
    }
}
