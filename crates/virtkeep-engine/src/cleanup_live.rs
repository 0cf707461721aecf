//! `cleanup` of live restores whose node was killed: the job directory
//! (`/run/virtkeep/jobs/live-…`, named like the job's host lock) tells which domain is
//! the job's ([`UUID_FILE`]) and whether it was started ([`STARTED_FILE`]).
//!
//! A domain that may have run is never destroyed nor its overlays removed: the guest's
//! writes live there, and with the node gone its reads of the backup fail into a pause.
//! Cleanup reports it and what to do, naming the command that finishes it
//! (`restore --resume JOB`, `live_resume.rs`; cleanup has no repository). A domain
//! whose copy had finished (nothing refers to the job directory) only loses the
//! directory; a job killed before its domain was started has its definition and
//! directory removed, and what it had created outside the directory
//! ([`CREATED_FILE`]: destinations, overlays beside files) removed when it is provably
//! still what the job created ([`Created`]: the restore's name checks, the same
//! identity, a file unchanged); anything else is reported as left. A removal that
//! fails keeps the directory (the record) for the next cleanup.

use std::collections::BTreeSet;

use virtkeep_libvirt::{coreutils, sh};

use crate::error::{ErrorKind, Result};
use crate::heal::HealReport;
use crate::host::{HOST_STATE_DIR, Host};
use crate::live_restore::{CREATED_FILE, JOB_PREFIX, STARTED_FILE, UUID_FILE};
use crate::restore::{Created, Outcome};

/// At most this many bytes of a job's [`CREATED_FILE`] are read, and lines of at most
/// [`CREATED_LINE_MAX`] characters taken (a few disks; more is not ours).
const CREATED_MAX: u64 = 64 * 1024;
const CREATED_LINE_MAX: usize = 4096;

/// What the live-restore pass found: its reports, and the domains of live restores
/// (running or left) that healing must not touch (their overlays are not a backup's).
#[derive(Debug, Default)]
pub struct LiveCleanup {
    pub reports: Vec<HealReport>,
    pub domains: BTreeSet<String>,
}

/// Whether `name` is one virtkeep gives a live restore's job: the prefix and 1 to 32
/// letters or digits (anything else on the host is not ours to remove).
pub(crate) fn is_live_job(name: &str) -> bool {
    name.strip_prefix(JOB_PREFIX).is_some_and(|rest| {
        (1..=32).contains(&rest.len()) && rest.chars().all(|c| c.is_ascii_alphanumeric())
    })
}

/// Finishes the live restores killed on this host (see the module doc). A live restore
/// whose lock is held still runs and is not touched.
/// `lock_wait_secs`: how long to wait for a job's lock.
pub async fn cleanup_live_restores(
    host: &Host,
    dry_run: bool,
    lock_wait_secs: u32,
) -> Result<LiveCleanup> {
    let jobs = format!("{HOST_STATE_DIR}/jobs");
    let dirs = host
        .run_string(&sh::list_job_dirs(&jobs, JOB_PREFIX))
        .await?;
    let mut out = LiveCleanup::default();
    for line in dirs.lines() {
        let name = line.trim().rsplit('/').next().unwrap_or_default();
        if !is_live_job(name) {
            continue;
        }
        let dir = format!("{jobs}/{name}");
        let uuid = job_uuid(host, &dir).await?;
        out.domains.extend(uuid.clone());
        let vm = format!("live restore job {name}");
        let lock = match host.lock_vm(name, lock_wait_secs).await {
            Ok(lock) => lock,
            Err(e) if e.kind == ErrorKind::Conflict => {
                let actions = vec!["skipped: the live restore is still running".into()];
                out.reports.push(HealReport { vm, actions });
                continue;
            }
            Err(e) => return Err(e),
        };
        let res = finish_killed(host, &dir, uuid.as_deref(), dry_run).await;
        lock.release().await;
        out.reports.push(HealReport { vm, actions: res? });
    }
    Ok(out)
}

/// The UUID the job recorded for its domain, if it got that far (and it is one).
pub(crate) async fn job_uuid(host: &Host, dir: &str) -> Result<Option<String>> {
    let out = host
        .exec(&coreutils::head_bytes(&format!("{dir}/{UUID_FILE}"), 64))
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok((out.status == 0)
        .then(|| uuid::Uuid::parse_str(text.trim()).ok())
        .flatten()
        .map(|u| u.hyphenated().to_string()))
}

/// One killed live restore: the caller holds its lock. Returns what was done.
async fn finish_killed(
    host: &Host,
    dir: &str,
    uuid: Option<&str>,
    dry_run: bool,
) -> Result<Vec<String>> {
    let started_file = format!("{dir}/{STARTED_FILE}");
    let started = host.exec(&coreutils::exists(&started_file)).await?.status == 0;
    let defined = match uuid {
        Some(u) => host.exec(&host.virsh().domname(u)).await?.status == 0,
        None => false,
    };
    let mut actions = Vec::new();
    match (started, uuid) {
        (true, Some(uuid)) if defined => {
            if still_on_export(host, uuid, dir).await? {
                return Ok(vec![left_running(host, uuid, dir).await]);
            }
            // Copied and pivoted before the kill: only the directory is left.
            actions.push(format!(
                "removed the job directory {dir} of a live restore that had finished copying"
            ));
        }
        (true, _) => {
            return Ok(vec![format!(
                "left as is: the domain of the live restore in {dir} is gone, but the directory may hold overlays with what its guest wrote; remove it once nothing in it is needed"
            )]);
        }
        (false, Some(uuid)) if defined => {
            // Defined, never started: nothing of it ever ran.
            actions.push(format!(
                "undefined the live restore's domain {uuid} (never started)"
            ));
            if !dry_run {
                let opts = virtkeep_libvirt::virsh::UndefineOptions::default();
                host.run(&host.virsh().undefine(uuid, opts)).await?;
            }
        }
        (false, _) => {}
    }
    let mut keep_dir = false;
    if !started {
        let (lines, failed) = created_by(host, dir, dry_run).await?;
        actions.extend(lines);
        keep_dir = failed;
        actions.push(if keep_dir {
            format!(
                "kept the job directory {dir} (its record of what to remove) for the next cleanup"
            )
        } else {
            format!(
                "removed the job directory {dir} of a live restore killed before its domain started"
            )
        });
    }
    if !dry_run && !keep_dir {
        host.run(&coreutils::rm_rf(dir)).await?;
    }
    Ok(actions)
}

/// Removes what the killed job recorded as created outside its directory and is still
/// that ([`Created::remove_if_unchanged`]); reports the rest. Returns the report lines
/// and whether a removal failed (the record is then kept for a retry).
async fn created_by(host: &Host, dir: &str, dry_run: bool) -> Result<(Vec<String>, bool)> {
    let out = host
        .exec(&coreutils::head_bytes(
            &format!("{dir}/{CREATED_FILE}"),
            CREATED_MAX,
        ))
        .await?;
    if out.status != 0 {
        return Ok((Vec::new(), false));
    }
    let mut lines = Vec::new();
    let mut failed = false;
    for rec in records(&String::from_utf8_lossy(&out.stdout)) {
        let c = match rec {
            Ok(c) => c,
            Err(line) => {
                lines.push(format!(
                    "left: {line} (created by the killed live restore, recorded without a checkable identity; remove it if unwanted)"
                ));
                continue;
            }
        };
        let what = c.describe().escape_debug().to_string();
        if dry_run {
            lines.push(format!(
                "would remove {what} (created by the killed live restore) if it is still the one it created"
            ));
            continue;
        }
        lines.push(match c.remove_if_unchanged(host).await {
            Ok(Outcome::Removed) => format!("removed {what} (created by the killed live restore)"),
            Ok(Outcome::Gone) => {
                format!("{what} (created by the killed live restore) is gone already")
            }
            Ok(Outcome::Kept(why)) => format!("left: {what} (kept: {why})"),
            Err(e) => {
                failed = true;
                format!("left: {what} (removing it failed: {e})")
            }
        });
    }
    Ok((lines, failed))
}

/// The records of a [`CREATED_FILE`]'s text (bounded); a line that is not one comes
/// back as `Err` with its control characters escaped, for the report.
fn records(text: &str) -> Vec<std::result::Result<Created, String>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && l.len() <= CREATED_LINE_MAX)
        .map(|l| Created::parse(l).ok_or_else(|| l.escape_debug().to_string()))
        .collect()
}

/// Whether the domain (running or defined) still reads from the job's NBD export.
async fn still_on_export(host: &Host, uuid: &str, dir: &str) -> Result<bool> {
    for inactive in [false, true] {
        let out = host.exec(&host.virsh().dumpxml(uuid, inactive)).await?;
        if out.status == 0 && String::from_utf8_lossy(&out.stdout).contains(dir) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The report for a domain left running on a dead export: never destroyed.
async fn left_running(host: &Host, uuid: &str, dir: &str) -> String {
    let name = host
        .run_string(&host.virsh().domname(uuid))
        .await
        .map(|n| n.trim().to_string())
        .unwrap_or_else(|_| uuid.to_string());
    let state = host
        .run_string(&host.virsh().domstate(uuid))
        .await
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let job = dir.rsplit('/').next().unwrap_or(dir);
    let resume = crate::live_record::resume_command(job, &host.name);
    format!(
        "left as is: the live-restored domain {name} ({uuid}, {state}) ran on the backup's NBD export, which went with the killed node; what its guest wrote is in its overlays (beside its disks or in {dir}), so neither is removed. \
         The guest pauses on its next read of the backup. To finish the restore (serve the backup again, resume {name}, copy and pivot its disks): `{resume}` (with the backup's repository); \
         or keep {name} as it is, or `virsh destroy` and `virsh undefine` it and remove its disks and {dir}, then run `restore --live` again or restore normally"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_records_are_parsed_bounded() {
        let long = "x".repeat(CREATED_LINE_MAX + 1);
        let text = format!(
            "path\t1:2:3:4\t/pool/a.raw\n\nRBD image p/a-vdc\n{long}\n/pool/b\u{1b}\nlv\tU-1\tvg0/a-vda"
        );
        let got = records(&text);
        assert_eq!(got.len(), 4);
        assert_eq!(
            got[0],
            Ok(Created::File {
                path: "/pool/a.raw".into(),
                id: "1:2:3:4".into()
            })
        );
        assert_eq!(got[1], Err("RBD image p/a-vdc".into()));
        assert_eq!(got[2], Err("/pool/b\\u{1b}".into()));
        assert!(matches!(&got[3], Ok(Created::Lv { vg, .. }) if vg == "vg0"));
    }

    #[test]
    fn only_live_job_names_are_taken() {
        assert!(is_live_job("live-0123456789ab"));
        assert!(!is_live_job("live-"));
        assert!(!is_live_job("live-../etc"));
        assert!(!is_live_job("live-a b"));
        assert!(!is_live_job("xlive-a"));
        assert!(!is_live_job(&format!("live-{}", "a".repeat(33))));
    }
}
