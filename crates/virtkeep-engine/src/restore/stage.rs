//! Restoring without destroying first: every disk is written under a temporary name
//! beside its destination (a file, LV or RBD image virtkeep names), and only once all
//! disks are written are they swapped in (rename, `lvrename`, `rbd rename`), replacing
//! the old data. The temporaries are recorded in the restore's job directory on the host,
//! so `virtkeep cleanup HOST` can finish a killed restore from the host's state alone:
//! before the swap began it removes the temporaries (the originals are untouched), once
//! it began it completes it (every temporary is then fully written).
//!
//! This module imports neither the rest of the restore nor healing (both use it).

use virtkeep_ssh::RemoteCommand;

use crate::error::{Error, ErrorKind, Result};
use crate::host::{HOST_STATE_DIR, Host};

/// Marks a temporary of a restore: `.{file}{MARKER}{job}` for files,
/// `{name}{MARKER}{job}` for LVs and RBD images.
pub const TEMP_MARKER: &str = ".vkrestore-";
/// File in the job directory listing the temporaries, one `KIND\tTEMP\tDEST` a line.
const STAGED: &str = "staged";
/// File in the job directory present once the swap has begun.
const COMMITTING: &str = "committing";
/// File in the job directory holding the key of the lock the restore holds.
pub const LOCK_FILE: &str = "lock";
/// Prefix of restore job directories under `jobs/`.
pub const JOB_PREFIX: &str = "restore-";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    /// `temp`/`dest` are `VG/NAME`.
    Lv,
    /// `temp`/`dest` are `POOL/IMAGE`.
    Rbd,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Lv => "lv",
            Kind::Rbd => "rbd",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        match s {
            "file" => Some(Kind::File),
            "lv" => Some(Kind::Lv),
            "rbd" => Some(Kind::Rbd),
            _ => None,
        }
    }
}

/// One disk written under a temporary name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    pub kind: Kind,
    pub temp: String,
    pub dest: String,
}

/// Cuts `s` to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The temporary file beside `dest` (hidden, within `NAME_MAX`).
pub fn temp_file(dest: &str, job: &str) -> String {
    let (dir, file) = dest.rsplit_once('/').unwrap_or(("", dest));
    let room = super::guard::NAME_MAX - 1 - TEMP_MARKER.len() - job.len();
    format!("{dir}/.{}{TEMP_MARKER}{job}", truncate(file, room))
}

/// The temporary LV or RBD image name for `name`, within `max` bytes.
pub fn temp_name(name: &str, job: &str, max: usize) -> String {
    let room = max.saturating_sub(TEMP_MARKER.len() + job.len());
    format!("{}{TEMP_MARKER}{job}", truncate(name, room))
}

fn split(spec: &str) -> (&str, &str) {
    spec.split_once('/').unwrap_or(("", spec))
}

/// Writes the list of temporaries into the job directory (before any is created).
pub async fn record(host: &Host, job_dir: &str, staged: &[Staged]) -> Result<()> {
    let text: String = staged
        .iter()
        .map(|s| format!("{}\t{}\t{}\n", s.kind.as_str(), s.temp, s.dest))
        .collect();
    host.upload(&format!("{job_dir}/{STAGED}"), text.as_bytes())
        .await
}

fn parse_staged(text: &str) -> Vec<Staged> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let (kind, temp, dest) = (Kind::parse(f.next()?)?, f.next()?, f.next()?);
            // Only names of ours are ever removed or renamed.
            temp.contains(TEMP_MARKER).then(|| Staged {
                kind,
                temp: temp.to_string(),
                dest: dest.to_string(),
            })
        })
        .collect()
}

async fn temp_exists(host: &Host, s: &Staged) -> Result<bool> {
    match s.kind {
        Kind::File => Ok(host
            .exec(&RemoteCommand::new("test").arg("-f").arg(&s.temp))
            .await?
            .status
            == 0),
        Kind::Lv => {
            let (vg, name) = split(&s.temp);
            Ok(crate::lvm::list_lvs(host, Some(vg))
                .await?
                .iter()
                .any(|l| l.name == name))
        }
        Kind::Rbd => {
            let ceph = crate::rbd::ceph(host)?;
            let (pool, image) = split(&s.temp);
            crate::rbd::image_exists(host, &ceph, pool, image).await
        }
    }
}

/// Swaps every temporary in: from here on a killed restore is completed, not undone.
pub async fn commit(host: &Host, job_dir: &str, staged: &[Staged]) -> Result<()> {
    host.upload(&format!("{job_dir}/{COMMITTING}"), b"").await?;
    for s in staged {
        commit_one(host, s).await?;
    }
    Ok(())
}

/// Replaces the destination with the temporary (the old data goes only now).
async fn commit_one(host: &Host, s: &Staged) -> Result<()> {
    match s.kind {
        // rename(2): the destination is the old file or the new one, never neither.
        Kind::File => {
            host.run(
                &RemoteCommand::new("mv")
                    .args(["-f", "-T", "--"])
                    .arg(&s.temp)
                    .arg(&s.dest),
            )
            .await?;
        }
        Kind::Lv => {
            let (vg, temp) = split(&s.temp);
            let (_, dest) = split(&s.dest);
            crate::lvm::remove_lv(host, vg, dest).await?;
            host.run(&crate::lvm::lvrename(vg, temp, dest)).await?;
        }
        Kind::Rbd => {
            let ceph = crate::rbd::ceph(host)?;
            let (pool, temp) = split(&s.temp);
            let (_, dest) = split(&s.dest);
            if crate::rbd::image_exists(host, &ceph, pool, dest).await? {
                host.run(&ceph.rbd(&["snap", "purge"]).arg(&s.dest)).await?;
                host.run(&ceph.rm(pool, dest)).await?;
            }
            host.run(&ceph.rbd(&["rename"]).arg(&s.temp).arg(&s.dest))
                .await
                .map_err(|e| e.context(format!("renaming RBD image {pool}/{temp}")))?;
        }
    }
    Ok(())
}

/// Removes a temporary (the destination is left as it was).
pub async fn remove(host: &Host, s: &Staged) -> Result<()> {
    match s.kind {
        Kind::File => {
            host.run(&RemoteCommand::new("rm").args(["-f", "--"]).arg(&s.temp))
                .await?;
        }
        Kind::Lv => {
            let (vg, name) = split(&s.temp);
            crate::lvm::remove_lv(host, vg, name).await?;
        }
        Kind::Rbd => {
            let ceph = crate::rbd::ceph(host)?;
            let (pool, image) = split(&s.temp);
            if crate::rbd::image_exists(host, &ceph, pool, image).await? {
                host.run(&ceph.rm(pool, image)).await?;
            }
        }
    }
    Ok(())
}

/// Removes every temporary that exists; the first error is returned after trying all.
pub async fn remove_all(host: &Host, staged: &[Staged]) -> Result<()> {
    let mut first = None;
    for s in staged {
        if let Err(e) = remove(host, s).await {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// The restore job directories on the host, with the key of the lock each one's
/// restore held.
pub async fn killed_jobs(host: &Host) -> Result<Vec<(String, String)>> {
    const SCRIPT: &str = r#"for d in "$1"/restore-*; do
  [ -d "$d" ] || continue
  printf '%s\t%s\n' "$d" "$(head -c 200 "$d/lock" 2>/dev/null | tr -d '\t\n')"
done"#;
    let out = host
        .run_string(
            &RemoteCommand::new("sh")
                .arg("-c")
                .arg(SCRIPT)
                .arg("sh")
                .arg(format!("{HOST_STATE_DIR}/jobs")),
        )
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
        .exec(&RemoteCommand::new("cat").arg(format!("{job_dir}/{STAGED}")))
        .await?;
    let staged = parse_staged(&String::from_utf8_lossy(&text.stdout));
    let committing = host
        .exec(
            &RemoteCommand::new("test")
                .arg("-e")
                .arg(format!("{job_dir}/{COMMITTING}")),
        )
        .await?
        .status
        == 0;
    let mut actions = vec![format!("stopped the exports of killed restore {job_dir}")];
    if !dry_run {
        stop_exports(host, job_dir).await?;
    }
    for s in &staged {
        if !temp_exists(host, s).await? {
            continue;
        }
        if committing {
            actions.push(format!("completed the swap of {} into {}", s.temp, s.dest));
            if !dry_run {
                commit_one(host, s).await?;
            }
        } else {
            actions.push(format!("removed restore temporary {}", s.temp));
            if !dry_run {
                remove(host, s).await?;
            }
        }
    }
    if !dry_run {
        host.run(&RemoteCommand::new("rm").args(["-rf", "--"]).arg(job_dir))
            .await?;
    }
    Ok(actions)
}

/// Kills the qemu-nbd processes named by the job's pid files.
async fn stop_exports(host: &Host, job_dir: &str) -> Result<()> {
    const SCRIPT: &str = r#"for p in "$1"/*.pid; do
  [ -f "$p" ] || continue
  pid=$(cat "$p")
  case "$pid" in ''|*[!0-9]*) continue;; esac
  case "$(tr '\0' ' ' < /proc/$pid/cmdline 2>/dev/null)" in *qemu-nbd*) kill "$pid";; esac
done
sleep 0.2"#;
    host.run(
        &RemoteCommand::new("sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg("sh")
            .arg(job_dir),
    )
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
    fn temp_names() {
        assert_eq!(
            temp_file("/img/vm.qcow2", "ab12cd34"),
            "/img/.vm.qcow2.vkrestore-ab12cd34"
        );
        let long = format!("/img/{}", "é".repeat(127));
        let t = temp_file(&long, "ab12cd34");
        assert!(t.rsplit('/').next().expect("file").len() <= 255, "{t}");
        assert_eq!(
            temp_name("vm-vda", "ab12cd34", 127),
            "vm-vda.vkrestore-ab12cd34"
        );
        assert!(temp_name(&"x".repeat(200), "ab12cd34", 127).len() <= 127);
    }

    #[test]
    fn staged_lists_keep_only_our_temporaries() {
        let text = "file\t/img/.a.vkrestore-1\t/img/a\nfile\t/etc/passwd\t/x\nlv\tvg/b.vkrestore-1\tvg/b\nbogus\n";
        let s = parse_staged(text);
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].kind, Kind::Lv);
        assert!(is_restore_job_dir("/run/virtkeep/jobs/restore-x"));
        assert!(!is_restore_job_dir("/run/virtkeep/jobs/restore-"));
        assert!(!is_restore_job_dir("/etc"));
    }
}
