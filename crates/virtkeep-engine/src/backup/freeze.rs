//! One crash-consistent instant for every disk: each strategy takes its part, with the
//! guest held still (fsfreeze with `--quiesce`, else a short pause) around all of them
//! when they are separate calls.

use super::job::Job;
use super::strategy::{Freeze, Strategy};
use crate::error::{Error, ErrorKind, Result};
use crate::hold::Hold;
use crate::plan::{FreezeMethod, Plan};

/// Prepares every strategy, then freezes (the pre- and post-snapshot commands are the
/// job's). The strategies come in the order rbd, lvm, file: for a stopped VM the
/// overlays and the redefine come last, so the check after the redefine also covers a
/// start during the other snapshots.
pub async fn freeze(
    job: &Job<'_>,
    plan: &Plan,
    strategies: &mut [Box<dyn Strategy>],
) -> Result<()> {
    // Sizes are checked before anything is made: a refusal leaves nothing behind.
    for s in strategies.iter_mut() {
        s.prepare(job).await?;
    }
    match plan.method {
        FreezeMethod::BackupApi => Err(Error::new(
            ErrorKind::Domain,
            "internal: the backup-API path takes no overlay",
        )),
        FreezeMethod::LiveSnapshot => freeze_live(job, strategies).await,
        FreezeMethod::OfflineOverlay => {
            if job.opts.quiesce {
                return Err(Error::config(
                    "--quiesce applies to running VMs only; this one is shut off",
                ));
            }
            let how = Freeze {
                live: false,
                held: false,
            };
            for s in strategies.iter_mut() {
                s.freeze(job, how).await?;
            }
            Ok(())
        }
    }
}

async fn freeze_live(job: &Job<'_>, strategies: &mut [Box<dyn Strategy>]) -> Result<()> {
    let (host, uuid) = (job.host, job.vm.uuid.as_str());
    if job.opts.quiesce {
        job.ping_agent("install and start qemu-guest-agent in the guest (with a virtio-serial channel org.qemu.guest_agent.0), or back up without --quiesce (crash-consistent)").await?;
    }
    // Snapshots taken by separate calls share one instant only with the guest held
    // still; one atomic call alone needs no hold.
    let calls: usize = strategies.iter().map(|s| s.freeze_calls()).sum();
    let held = strategies.iter().any(|s| s.needs_hold()) || calls > 1;
    let how = if job.opts.quiesce {
        Hold::FsFreeze
    } else {
        Hold::Suspend
    };
    if held {
        crate::hold::hold(host, uuid, &job.dir, how)
            .await
            .map_err(|e| e.context("holding the guest still for its snapshots"))?;
    }
    let mut res = Ok(());
    for s in strategies.iter_mut() {
        res = s.freeze(job, Freeze { live: true, held }).await;
        if res.is_err() {
            break;
        }
    }
    if held {
        crate::hold::release(host, uuid, &job.dir, how)
            .await
            .map_err(|e| e.context("resuming the guest after its snapshots"))?;
    }
    res
}
