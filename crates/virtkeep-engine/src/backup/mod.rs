//! `virtkeep backup HOST/VM`: one crash-consistent instant for every included disk,
//! exported over SSH into the repository, and the VM back on its own files.
//!
//! The job, in order (each step asks every disk strategy, see [`strategy::Strategy`]):
//! 1. take the per-VM lock on the host (two backups of one VM never overlap) and heal
//!    what an earlier killed run left (the VM must run on its own files first);
//! 2. plan the disks; a VM whose disks all suit libvirt's backup API goes through
//!    [`cbt`] as a whole job;
//! 3. prepare (check sizes), pre-snapshot command, freeze, post-snapshot command (also
//!    when the freeze failed);
//! 4. find the bases and decide full or incremental;
//! 5. export every disk into the repository and publish the manifest only when every
//!    disk was exported; after publishing, keep the next base;
//! 6. heal again, which commits the overlays and removes them, success or not.

pub mod cbt;
mod data;
mod decide;
pub mod file;
mod freeze;
pub mod image;
pub mod job;
pub mod kept;
pub mod lvm;
mod nvram;
pub mod overlay;
pub mod rbd;
pub mod strategy;

use std::sync::Arc;

use crate::error::Result;
use crate::heal::{heal_loaded, heal_vm};
use crate::host::Host;
use crate::phases::{Phase, PhaseClock};
pub use crate::plan::{
    BackupOptions, BackupResult, BaseOnHost, DiskResult, FreezeMethod, ModeRequest, Plan,
    PlannedDisk, SkippedDisk, Transport, plan_backup,
};
use crate::progress::Progress;
use crate::vm::Vm;
use job::{Job, disk_results};
use strategy::Strategy;

/// Backs up one VM. See the module docs for the order of events.
pub async fn backup_vm(
    host: &Host,
    repo: &virtkeep_repo::Repository,
    vm_name: &str,
    opts: &BackupOptions,
    progress: Arc<dyn Progress>,
) -> Result<BackupResult> {
    let mut clock = PhaseClock::new();
    // Loaded under the lock: another job of this VM may have changed it until then.
    let uuid = Vm::find_uuid(host, vm_name).await?;
    let lock = host.lock_vm(&uuid, 60).await?;
    if opts.transport == Transport::Ssh {
        // Connected while the plan and freeze run (each connection costs a key exchange
        // and a login); after the lock, not to slow the command shells' start.
        host.prewarm_data_sessions(opts.parallel.max(1));
    }
    let res = match Vm::load(host, &uuid).await {
        Ok(vm) => {
            clock.lap(Phase::LockLoad);
            let (id, dir, warnings) = (String::new(), String::new(), Vec::new());
            let job = Job {
                host,
                repo,
                vm,
                opts,
                progress,
                id,
                dir,
                clock,
                warnings,
            };
            run(job).await
        }
        Err(e) => Err(e),
    };
    lock.release().await;
    res
}

/// Steps 1 and 2: heal, plan, and the backup API when it applies.
async fn run(mut job: Job<'_>) -> Result<BackupResult> {
    let chain_in_use = kept::settle(job.host, &job.vm.uuid, job.opts.mode).await?;
    let healed = heal_loaded(job.host, job.vm.clone(), false).await?;
    if !healed.actions.is_empty() {
        job.warn(format!(
            "healed leftovers of an earlier run: {}",
            healed.actions.join("; ")
        ));
        job.vm.reload(job.host).await?;
    }
    let plan = plan_backup(&job.vm.domain, job.vm.state, job.opts)?;
    for s in &plan.skipped {
        job.notice(format!("skipping disk {}: {}", s.target, s.reason));
    }
    if let Some(choice) = cbt::choose(&job, &plan).await? {
        return cbt::run(job, &plan, choice).await;
    }
    let strategies = strategies(&job, &plan, chain_in_use);
    run_strategies(job, &plan, strategies).await
}

/// The strategies of the plan's disks, one per disk kind; the order is the order of
/// every step (see `freeze.rs` for why the file disks come last).
fn strategies(job: &Job<'_>, plan: &Plan, chain_in_use: bool) -> Vec<Box<dyn Strategy>> {
    let files = file::Overlays::new(plan);
    let live = plan.method == FreezeMethod::LiveSnapshot;
    // An incremental reads what the kept overlays hold and leaves its new overlays as
    // the next base; so does a full of a chain in use (auto never leaves an overlay).
    let files: Box<dyn Strategy> =
        if live && (job.opts.mode == ModeRequest::Incremental || chain_in_use) {
            Box::new(kept::Kept::new(files, job.opts.mode, job.opts.base))
        } else {
            Box::new(files)
        };
    vec![
        Box::new(rbd::Snapshots::new(plan)),
        Box::new(lvm::Snapshots::new(plan)),
        files,
    ]
}

/// Steps 3 to 6.
async fn run_strategies(
    mut job: Job<'_>,
    plan: &Plan,
    mut strategies: Vec<Box<dyn Strategy>>,
) -> Result<BackupResult> {
    job.open_dir().await?;
    job.clock.lap(Phase::Plan);
    job.pre_snapshot().await?;
    job.phase("snapshot");
    let snapshot_time = time::OffsetDateTime::now_utc();
    let frozen = freeze::freeze(&job, plan, &mut strategies).await;
    job.post_snapshot().await;
    if let Err(e) = frozen {
        let _ = heal_vm(job.host, &job.vm.uuid, false).await;
        return Err(e);
    }
    job.clock.lap(Phase::Freeze);
    job.phase("export");
    // The VM is frozen from here on: a failure to find the bases heals before returning.
    let ready = match nvram::capture(&job).await {
        Ok(nv) => (decide::decide(&mut job, plan, &mut strategies).await).map(|d| (d, nv)),
        Err(e) => Err(e),
    };
    let (decided, captured) = match ready {
        Ok(d) => d,
        Err(e) => {
            let _ = heal_vm(job.host, &job.vm.uuid, false).await;
            job.remove_dir().await;
            return Err(e);
        }
    };
    let meta = virtkeep_repo::BackupMeta {
        host: job.host.name.clone(),
        vm: job.vm.name.clone(),
        mode: decided.mode,
        reason: decided.reason.clone(),
        parent: decided.parent,
        domain_xml: job.vm.inactive_xml.clone(),
        time: Some(snapshot_time),
    };
    job.clock.lap(Phase::Plan);
    let exported = publish(&mut job, plan, &mut strategies, (meta, &captured)).await;
    job.phase("commit");
    crate::failpoint::hit("before-heal").await;
    let thawed = heal_vm(job.host, &job.vm.uuid, false).await;
    job.remove_dir().await;
    job.clock.lap(Phase::Heal);
    let (manifest, stats, _) = exported?;
    if let Err(e) = thawed {
        return Err(e.context(format!(
            "backup {} is stored, but the VM could not be returned to its own files",
            manifest.id
        )));
    }
    Ok(BackupResult {
        id: manifest.id.clone(),
        host: job.host.name.clone(),
        vm: job.vm.name.clone(),
        mode: decided.mode.to_string(),
        reason: decided.reason,
        method: plan.method,
        disks: disk_results(&manifest, stats),
        skipped: plan.skipped.clone(),
        warnings: job.warnings,
        duration_secs: job.clock.elapsed_secs(),
        phases: job.clock.phases(),
    })
}

/// Step 5: export and publish; after publishing every strategy keeps its next base,
/// and at the end each settles what it leaves for healing.
async fn publish(
    job: &mut Job<'_>,
    plan: &Plan,
    strategies: &mut [Box<dyn Strategy>],
    meta: (virtkeep_repo::BackupMeta, &nvram::Captured),
) -> Result<data::Exported> {
    let mut exported = data::export_all(job, plan, strategies, meta).await;
    let publish_secs = exported.as_ref().map_or(0.0, |e| e.2);
    job.clock
        .lap_split(Phase::Data, Phase::Publish, publish_secs);
    for s in strategies.iter_mut() {
        if exported.is_err() {
            break;
        }
        if let Err(e) = s.after_publish(job).await {
            exported = Err(e);
        }
    }
    for s in strategies.iter_mut() {
        s.finish(job, exported.is_ok()).await;
    }
    job.clock.lap(Phase::Publish);
    exported
}
