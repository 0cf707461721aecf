//! The third step of a restore: every disk is written under its temporary name, then
//! all are swapped in; a failure before the swap removes the temporaries and leaves
//! every destination as it was ([`super::stage`] keeps the record `cleanup` finishes
//! a killed restore from).

use std::sync::Arc;

use virtkeep_libvirt::coreutils;

use super::context::{DiskWrite, WriteCtx};
use super::file::FileDest;
use super::job::{Checked, Job};
use super::nvram;
use super::options::{RestoreOptions, RestoredDisk};
use super::stage::{self, Swap};
use crate::error::{Error, Result};
use crate::host::Host;
use crate::progress::{Event, Progress};

pub async fn write(
    host: &Host,
    repo: &virtkeep_repo::Repository,
    opts: &RestoreOptions,
    job: &Job,
    checked: &Checked<'_>,
    progress: &Arc<dyn Progress>,
) -> Result<Vec<RestoredDisk>> {
    let owner = match &opts.owner {
        Some(o) => o.clone(),
        None => host.qemu_owner().await?,
    };
    let ctx = WriteCtx {
        host,
        vm: &job.name,
        repo,
        id: &job.manifest.id,
        owner: &owner,
        parallel: opts.parallel,
        progress,
    };
    let job_dir = host
        .job_dir(&format!("{}{}", stage::JOB_PREFIX, checked.job_id))
        .await?;
    // The UEFI store is swapped in with the disks, as one more file.
    let nvram = checked.nvram.as_ref().and_then(|n| {
        let dest = FileDest {
            path: n.dest.clone(),
        };
        n.staged().map(|s| (dest, s))
    });
    let mut swaps: Vec<Swap<'_>> = checked
        .plan
        .iter()
        .map(|p| (p.dest.as_ref(), &p.staged))
        .collect();
    if let Some((dest, s)) = &nvram {
        swaps.push((dest, s));
    }
    let rm_job_dir = coreutils::rm_rf(&job_dir);
    let restored = match write_all(&ctx, checked, &job_dir, &job.lock_key).await {
        Ok(r) => r,
        Err(e) => {
            let _ = stage::roll_back_all(host, &swaps).await;
            let _ = host.run(&rm_job_dir).await;
            return Err(e);
        }
    };
    stage::commit(host, &job_dir, &swaps)
        .await
        .map_err(|e| stage::commit_failed(e, &job_dir))?;
    let _ = host.run(&rm_job_dir).await;
    Ok(restored)
}

/// Records the temporaries and the lock on the host, then writes every disk into its
/// temporary.
async fn write_all(
    ctx: &WriteCtx<'_>,
    checked: &Checked<'_>,
    job_dir: &str,
    lock_key: &str,
) -> Result<Vec<RestoredDisk>> {
    let host = ctx.host;
    host.upload(
        &format!("{job_dir}/{}", stage::LOCK_FILE),
        lock_key.as_bytes(),
    )
    .await?;
    let mut staged: Vec<_> = checked.plan.iter().map(|p| p.staged.clone()).collect();
    staged.extend(checked.nvram.as_ref().and_then(|n| n.staged()));
    stage::record(host, job_dir, &staged).await?;
    if let Some(n) = &checked.nvram {
        nvram::write_temp(host, n, ctx.owner).await?;
    }
    let mut restored = Vec::new();
    for (index, p) in checked.plan.iter().enumerate() {
        ctx.progress.event(Event::Phase {
            vm: ctx.vm.to_string(),
            phase: "restore",
        });
        let disk = DiskWrite {
            m: p.m,
            format: &p.format,
            staged: &p.staged,
            job_dir,
            index,
        };
        let n = p.dest.write(ctx, &disk).await?;
        restored.push(p.report(n));
    }
    Ok::<_, Error>(restored)
}
