//! Holding a guest still around several snapshot calls (a pause, or a filesystem freeze
//! through the guest agent with `--quiesce`), recorded on the host *before* it happens:
//! a node killed, a link cut or a job aborted inside the window would otherwise leave
//! the VM paused or frozen with nothing to resume it. The record is a file
//! `held-suspend` or `held-fsfreeze` in the job's directory on the host; healing (end of
//! every job, `cleanup`, the daemon's orphan rule) resumes or thaws what such a record
//! names, and never a VM virtkeep did not pause or freeze.

use virtkeep_libvirt::virsh::{DomainState, parse_domstate};
use virtkeep_libvirt::{coreutils, sh};
use virtkeep_ssh::RemoteCommand;

use crate::error::Result;
use crate::host::{HOST_STATE_DIR, Host};

/// How the guest is held still.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// `virsh suspend` / `resume`.
    Suspend,
    /// `virsh domfsfreeze` / `domfsthaw` (guest agent).
    FsFreeze,
}

impl Hold {
    fn marker(self) -> &'static str {
        match self {
            Hold::Suspend => "held-suspend",
            Hold::FsFreeze => "held-fsfreeze",
        }
    }

    fn from_marker(name: &str) -> Option<Hold> {
        match name {
            "held-suspend" => Some(Hold::Suspend),
            "held-fsfreeze" => Some(Hold::FsFreeze),
            _ => None,
        }
    }

    fn start(self, host: &Host, uuid: &str) -> RemoteCommand {
        match self {
            Hold::Suspend => host.virsh().suspend(uuid),
            Hold::FsFreeze => host.virsh().domfsfreeze(uuid),
        }
    }

    fn end(self, host: &Host, uuid: &str) -> RemoteCommand {
        match self {
            Hold::Suspend => host.virsh().resume(uuid),
            Hold::FsFreeze => host.virsh().domfsthaw(uuid),
        }
    }
}

/// Records the hold in `job_dir`, then holds the guest.
pub async fn hold(host: &Host, uuid: &str, job_dir: &str, how: Hold) -> Result<()> {
    let marker = format!("{job_dir}/{}", how.marker());
    host.upload(&marker, b"").await?;
    if let Err(e) = host.run(&how.start(host, uuid)).await {
        let _ = host.run(&coreutils::rm_f(&marker)).await;
        return Err(e);
    }
    crate::failpoint::hit("held").await;
    Ok(())
}

/// Lets the guest go again, then removes the record (a failed resume keeps it, so that
/// healing tries again).
pub async fn release(host: &Host, uuid: &str, job_dir: &str, how: Hold) -> Result<()> {
    host.run(&how.end(host, uuid)).await?;
    host.run(&coreutils::rm_f(&format!("{job_dir}/{}", how.marker())))
        .await?;
    Ok(())
}

/// For healing: ends every hold a job of this VM recorded and did not release (the
/// caller holds the VM lock, so no job of the VM runs). Returns what it did.
pub async fn undo_left_holds(host: &Host, uuid: &str) -> Result<Vec<String>> {
    let list = sh::list_holds(&format!("{HOST_STATE_DIR}/jobs"), uuid);
    let out = host.run_string(&list).await?;
    let mut done = Vec::new();
    for (dir, how) in parse_holds(&out) {
        // A paused VM that is no longer paused (resumed by someone) needs nothing; the
        // resume or thaw is tried anyway only when the state says it is still held.
        match how {
            Hold::Suspend => {
                let state = host.run_string(&host.virsh().domstate(uuid)).await?;
                if parse_domstate(&state).is_ok_and(|s| s == DomainState::Paused) {
                    host.run(&how.end(host, uuid)).await?;
                    done.push("resumed the VM a killed job had paused".to_string());
                }
            }
            // The frozen state is not visible from outside: thaw (harmless when thawed).
            // An agent that does not answer keeps the record, so the next heal retries.
            Hold::FsFreeze => {
                if host.exec(&how.end(host, uuid)).await?.status != 0 {
                    done.push(
                        "could not thaw the guest filesystems a killed job had frozen (the guest agent does not answer); will retry"
                            .to_string(),
                    );
                    continue;
                }
                done.push("thawed the guest filesystems a killed job had frozen".to_string());
            }
        }
        host.run(&coreutils::rm_f(&format!("{dir}/{}", how.marker())))
            .await?;
    }
    Ok(done)
}

/// The records in the output of [`sh::list_holds`]; anything else on a line is ignored.
fn parse_holds(out: &str) -> Vec<(String, Hold)> {
    out.lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(dir, _)| {
            dir.starts_with(&format!("{HOST_STATE_DIR}/jobs/")) && !dir.contains("..")
        })
        .filter_map(|(dir, m)| Hold::from_marker(m).map(|h| (dir.to_string(), h)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_read_only_from_job_dirs() {
        let out = "/run/virtkeep/jobs/u-1/\theld-suspend\n\
                   /run/virtkeep/jobs/u-2\theld-fsfreeze\n\
                   /etc\theld-suspend\n\
                   /run/virtkeep/jobs/../x\theld-suspend\n\
                   /run/virtkeep/jobs/u-3\theld-other\n";
        let holds = parse_holds(out);
        assert_eq!(
            holds,
            vec![
                ("/run/virtkeep/jobs/u-1/".to_string(), Hold::Suspend),
                ("/run/virtkeep/jobs/u-2".to_string(), Hold::FsFreeze),
            ]
        );
    }
}
