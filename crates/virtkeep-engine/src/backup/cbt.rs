//! The backup-API path of `virtkeep backup`, a whole-job strategy (see [`crate::cbt`]
//! for the model):
//!
//! 1. decide full or incremental from the repository's record and the host's checkpoints;
//! 2. a stopped VM is started paused (a marker in the job dir lets `cleanup` undo that);
//! 3. pre command, `virsh backup-begin` (pull mode, new checkpoint at the same instant),
//!    post command; an incremental whose bitmap turns out unusable becomes a full;
//! 4. read each disk's export (libvirt's NBD server on a unix socket, through SSH):
//!    allocated extents for a full, dirty extents patched onto the parent's chunks for
//!    an incremental;
//! 5. publish, end the job, drop older virtkeep checkpoints; on failure end the job and
//!    delete the new checkpoint so the next incremental still starts from the last good one.

use std::sync::Arc;

use virtkeep_libvirt::qemu_img;

use super::job::{Job, disk_results};
use crate::cbt::{self, Base, CHECKPOINT_PREFIX, CbtRecord, PAUSED_MARKER};
use crate::error::{Error, ErrorKind, Result};
use crate::export::{DiskRead, ExportStats, NbdExport, ReadScope, export_disk};
use crate::host::{Host, OVERLAY_MARKER};
use crate::phases::Phase;
use crate::plan::{
    BackupExtra, BackupResult, BaseOnHost, FreezeMethod, ModeRequest, Plan, Transport,
    removed_on_request_reason,
};
use crate::store::RepoSink;

/// Full or incremental, and the disks' sizes (recorded with the checkpoint).
pub struct Choice {
    base: Option<Base>,
    reason: String,
    sizes: Vec<(String, u64)>,
}

/// The names one job's backup-API calls use.
struct Names {
    socket: String,
    checkpoint: String,
    checkpoint_xml: String,
    backup_xml: String,
    targets: Vec<String>,
    excluded: Vec<String>,
}

async fn disk_size(host: &Host, path: &str, format: &str) -> Result<u64> {
    let out = host
        .run_string(&qemu_img::info_json(path, Some(format), true))
        .await?;
    let info = qemu_img::parse_qemu_img_info(&out)
        .map_err(|e| Error::new(ErrorKind::Remote, format!("qemu-img info {path}: {e}")))?;
    Ok(info.virtual_size)
}

/// Whether the backup goes through libvirt's backup API: qcow2 file disks only (a disk
/// on a kept overlay belongs to the kept-overlay method), the SSH transport, and a host
/// whose libvirt has the API.
pub async fn choose(job: &Job<'_>, plan: &Plan) -> Result<Option<Choice>> {
    let host = job.host;
    if job.vm.domain.kind == "xen"
        || job.opts.transport != Transport::Ssh
        || plan
            .disks
            .iter()
            .any(|d| d.format != "qcow2" || !d.is_file())
        || plan.disks.iter().any(|d| d.path.contains(OVERLAY_MARKER))
    {
        return Ok(None);
    }
    // Side by side, one round trip for all: the capability answer, the disks' sizes and
    // the QEMU user the job dir is handed to (the host keeps it; an error here is asked
    // again there).
    let sizes = futures::future::try_join_all(plan.disks.iter().map(|d| async move {
        Ok::<_, Error>((d.target.clone(), disk_size(host, &d.path, &d.format).await?))
    }));
    let (supported, sizes, _) = tokio::join!(
        cbt::backup_api_supported(host, false),
        sizes,
        host.qemu_owner()
    );
    if !supported {
        return Ok(None);
    }
    let sizes = sizes?;
    let reason = match job.opts.mode {
        ModeRequest::Full => "full backup requested".into(),
        _ => String::new(),
    };
    Ok(Some(Choice {
        base: None,
        reason,
        sizes,
    }))
}

/// The newest backup of this VM, as a CBT base, or why a full is needed.
async fn latest_record(job: &Job<'_>) -> Result<std::result::Result<Base, String>> {
    let Some(manifest) =
        crate::store::latest_backup(job.repo, &job.host.name, &job.vm.name).await?
    else {
        return Ok(Err("full: no earlier backup of this VM".into()));
    };
    let extra = BackupExtra::of(&manifest);
    if extra.base_removed_on_request() {
        return Ok(Err(removed_on_request_reason(&manifest.id)));
    }
    match extra.cbt {
        Some(record) => Ok(Ok(Base {
            id: manifest.id,
            record,
        })),
        None => Ok(Err(format!(
            "full: the newest backup {} was not taken with a checkpoint (another method or an older virtkeep)",
            manifest.id
        ))),
    }
}

/// The failpoint that makes [`pick_base`] fail (a fault test of the job dir made beside it).
const PICK_BASE_FAILS: &str = "pick-base-fails";

/// The failpoint that makes a backup-API job fail once its job runs in QEMU (a fault test
/// of what a failed job leaves on the host).
const EXPORT_FAILS: &str = "export-fails";

/// Picks the base in the repository, unless a full was asked for.
async fn pick_base(job: &Job<'_>, choice: &mut Choice) -> Result<()> {
    if !choice.reason.is_empty() {
        return Ok(());
    }
    if crate::failpoint::is_active(PICK_BASE_FAILS) {
        return Err(Error::new(
            ErrorKind::Remote,
            format!("failpoint {PICK_BASE_FAILS}"),
        ));
    }
    let base = match latest_record(job).await? {
        Ok(base) => base,
        Err(reason) => {
            choice.reason = reason;
            return Ok(());
        }
    };
    let mut checkpoints = job.vm.checkpoints.clone();
    if !checkpoints.contains(&base.record.checkpoint) {
        // The load's list is also empty when listing failed: ask again before saying
        // that the checkpoint is gone (a failure to list is an error, not a full).
        checkpoints = cbt::checkpoints(job.host, &job.vm.uuid).await?;
    }
    match cbt::base_problem(&base, &job.vm.uuid, &checkpoints, &choice.sizes) {
        Some(problem) => choice.reason = problem,
        None => {
            choice.reason = format!(
                "incremental since backup {} (checkpoint {})",
                base.id, base.record.checkpoint
            );
            choice.base = Some(base);
        }
    }
    Ok(())
}

/// Runs the whole job through the backup API.
pub async fn run(mut job: Job<'_>, plan: &Plan, mut choice: Choice) -> Result<BackupResult> {
    // The base and the job dir side by side (the dir is QEMU's: the NBD socket).
    job.name_dir();
    let (picked, made) = tokio::join!(pick_base(&job, &mut choice), job.make_dir_for_qemu());
    if picked.is_err() || made.is_err() {
        // Made side by side: a failed base leaves a made (or half-made) dir behind.
        job.remove_dir().await;
    }
    picked?;
    made?;
    job.clock.lap(Phase::Plan);
    let started_paused = start_paused(&job).await?;
    let res = run_job(&mut job, plan, &mut choice).await;
    job.clock.lap(Phase::Publish);
    let checkpoint = format!("{CHECKPOINT_PREFIX}{}", job.id);
    let (host, uuid) = (job.host, job.vm.uuid.clone());
    let (manifest, stats) = match res {
        Ok(v) => v,
        Err(e) => {
            end_failed_job(&mut job, &checkpoint, started_paused).await;
            return Err(e);
        }
    };
    // Every mode keeps its checkpoint for the next incremental, unless asked not to.
    let keep = match job.opts.base {
        BaseOnHost::Keep => checkpoint.as_str(),
        BaseOnHost::Remove => "",
    };
    // What the host had when the VM was loaded under this job's lock, and this job's.
    let mut listed = job.vm.checkpoints.clone();
    if !listed.contains(&checkpoint) {
        listed.push(checkpoint.clone());
    }
    // The job ends together with the pruning (one virsh for both), before a VM started
    // for the job goes down (libvirt deletes no checkpoint of an inactive domain), and
    // before the job dir goes (healing finds a left job by its dir).
    let pruned = cbt::end_job_and_prune(host, &uuid, &listed, keep).await;
    if started_paused {
        stop_started_paused(&mut job).await;
    }
    job.remove_dir().await;
    match pruned {
        Ok(removed) if !removed.is_empty() => {
            tracing::info!(vm = %job.vm.name, ?removed, "older virtkeep checkpoints deleted")
        }
        Ok(_) => {}
        Err(e) => job
            .warnings
            .push(format!("could not delete older virtkeep checkpoints: {e}")),
    }
    job.clock.lap(Phase::Heal);
    Ok(BackupResult {
        id: manifest.id.clone(),
        host: host.name.clone(),
        vm: job.vm.name.clone(),
        mode: manifest.mode.to_string(),
        reason: manifest.reason.clone(),
        method: FreezeMethod::BackupApi,
        disks: disk_results(&manifest, stats),
        skipped: plan.skipped.clone(),
        warnings: job.warnings,
        duration_secs: job.clock.elapsed_secs(),
        phases: job.clock.phases(),
    })
}

/// A stopped VM is started paused for the job (and a marker left for healing).
async fn start_paused(job: &Job<'_>) -> Result<bool> {
    if job.vm.state.is_active() {
        return Ok(false);
    }
    job.phase("start-paused");
    let host = job.host;
    host.upload(&format!("{}/{PAUSED_MARKER}", job.dir), b"")
        .await?;
    host.run(&host.virsh().start_paused(&job.vm.uuid))
        .await
        .map_err(|e| e.context("starting the stopped VM paused for its backup job"))?;
    Ok(true)
}

/// A failed job ends; its new checkpoint goes, which merges the bitmap back, so the next
/// incremental starts from the last checkpoint a published backup recorded. That is
/// while a VM started for the job still runs (libvirt deletes no checkpoint of an
/// inactive domain); then the VM goes down (unless somebody resumed it), and the job dir
/// last (healing finds a left job by its dir).
async fn end_failed_job(job: &mut Job<'_>, checkpoint: &str, started_paused: bool) {
    let (host, uuid) = (job.host, job.vm.uuid.clone());
    let _ = host.exec(&host.virsh().domjobabort(&uuid)).await;
    let listed = cbt::checkpoints(host, &uuid).await.unwrap_or_default();
    if listed.iter().any(|c| c == checkpoint) {
        let _ = host
            .exec(&host.virsh().checkpoint_delete(&uuid, checkpoint, false))
            .await;
    }
    if started_paused {
        stop_started_paused(job).await;
    }
    job.remove_dir().await;
}

/// A VM started paused for the job goes down again, unless somebody resumed it.
async fn stop_started_paused(job: &mut Job<'_>) {
    let (host, uuid) = (job.host, job.vm.uuid.as_str());
    let state = host
        .run_string(&host.virsh().domstate(uuid))
        .await
        .unwrap_or_default();
    if state.trim() == "paused" {
        let _ = host.exec(&host.virsh().destroy(uuid)).await;
    } else {
        job.warnings
            .push("the VM was resumed by someone during its backup and is left running".into());
    }
}

fn names(job: &Job<'_>, plan: &Plan) -> Names {
    let targets: Vec<String> = plan.disks.iter().map(|d| d.target.clone()).collect();
    let excluded: Vec<String> = job
        .vm
        .domain
        .disks
        .iter()
        .filter(|d| !targets.contains(&d.target))
        .filter(|d| {
            matches!(
                d.device,
                virtkeep_libvirt::DiskDevice::Disk | virtkeep_libvirt::DiskDevice::Lun
            )
        })
        .map(|d| d.target.clone())
        .collect();
    Names {
        socket: format!("{}/nbd.sock", job.dir),
        checkpoint: format!("{CHECKPOINT_PREFIX}{}", job.id),
        checkpoint_xml: format!("{}/checkpoint.xml", job.dir),
        backup_xml: format!("{}/backup.xml", job.dir),
        targets,
        excluded,
    }
}

async fn run_job(
    job: &mut Job<'_>,
    plan: &Plan,
    choice: &mut Choice,
) -> Result<(virtkeep_repo::Manifest, Vec<ExportStats>)> {
    let names = names(job, plan);
    let xml = cbt::checkpoint_xml(&names.checkpoint, &names.targets, &names.excluded);
    // Both job files in one round trip (the backup's is written again for a fallback full).
    let base = choice.base.as_ref();
    tokio::try_join!(
        job.host.upload(&names.checkpoint_xml, xml.as_bytes()),
        upload_backup_xml(job, &names, base)
    )?;
    let snapshot_time = freeze(job, &names, choice).await?;
    if crate::failpoint::is_active(EXPORT_FAILS) {
        return Err(Error::new(
            ErrorKind::Remote,
            format!("failpoint {EXPORT_FAILS}"),
        ));
    }
    let nvram = super::nvram::capture(job).await?;
    job.clock.lap(Phase::Freeze);
    job.phase("export");
    let mode = if choice.base.is_some() {
        virtkeep_repo::BackupMode::Incremental
    } else {
        virtkeep_repo::BackupMode::Full
    };
    let meta = virtkeep_repo::BackupMeta {
        host: job.host.name.clone(),
        vm: job.vm.name.clone(),
        mode,
        reason: choice.reason.clone(),
        parent: choice.base.as_ref().map(|b| b.id.clone()),
        domain_xml: job.vm.inactive_xml.clone(),
        time: Some(snapshot_time),
    };
    let writer = job.repo.begin_backup(meta).await?;
    let mut stats = Vec::new();
    for (disk, (_, size)) in plan.disks.iter().zip(&choice.sizes) {
        stats.push(read_disk(job, &writer, &names.socket, disk, *size, choice).await?);
    }
    job.clock.lap(Phase::Data);
    let extra = BackupExtra {
        method: Some(FreezeMethod::BackupApi),
        transport: Some(Transport::Ssh),
        cbt: Some(CbtRecord {
            checkpoint: names.checkpoint,
            vm_uuid: job.vm.uuid.clone(),
            disks: choice.sizes.clone(),
        }),
        base_kept: Some(job.opts.base == BaseOnHost::Keep),
        ..BackupExtra::default()
    };
    super::nvram::store(&writer, &nvram).await?;
    let manifest = writer.finish(extra.to_value()).await?;
    Ok((manifest, stats))
}

/// Pre command, `backup-begin` (a full instead when the base's bitmap is unusable),
/// post command. Returns the instant.
async fn freeze(
    job: &mut Job<'_>,
    names: &Names,
    choice: &mut Choice,
) -> Result<time::OffsetDateTime> {
    job.pre_snapshot().await?;
    job.phase("snapshot");
    let (host, uuid) = (job.host, job.vm.uuid.clone());
    if job.opts.quiesce {
        job.ping_agent("install and start qemu-guest-agent in the guest, or back up without --quiesce (crash-consistent)").await?;
        crate::hold::hold(host, &uuid, &job.dir, crate::hold::Hold::FsFreeze).await?;
    }
    let snapshot_time = time::OffsetDateTime::now_utc();
    let mut begun = begin(job, names, choice.base.as_ref(), false).await;
    if let (Err(e), Some(base)) = (&begun, &choice.base) {
        // A checkpoint whose bitmap is gone or inconsistent (disk replaced, host crash):
        // never a wrong incremental, a full instead.
        choice.reason = format!(
            "full: the dirty bitmap of checkpoint {} is unusable ({})",
            base.record.checkpoint,
            e.message.lines().next().unwrap_or("")
        );
        choice.base = None;
        begun = begin(job, names, None, true).await;
    }
    if job.opts.quiesce {
        // A failed thaw keeps the record: healing at the end of this job retries it.
        let _ = crate::hold::release(host, &uuid, &job.dir, crate::hold::Hold::FsFreeze).await;
    }
    job.post_snapshot().await;
    begun.map_err(|e| e.context("starting the backup job (virsh backup-begin)"))?;
    crate::failpoint::hit("backup-begun").await;
    Ok(snapshot_time)
}

/// Writes the job's backup XML (pull mode, incremental from `base` when given).
async fn upload_backup_xml(job: &Job<'_>, names: &Names, base: Option<&Base>) -> Result<()> {
    let xml = cbt::backup_xml(
        &names.socket,
        &job.dir,
        base.map(|b| b.record.checkpoint.as_str()),
        &names.targets,
        &names.excluded,
    );
    job.host.upload(&names.backup_xml, xml.as_bytes()).await
}

/// `virsh backup-begin`; `rewrite`: the backup XML uploaded before was for another base.
async fn begin(job: &Job<'_>, names: &Names, base: Option<&Base>, rewrite: bool) -> Result<()> {
    if rewrite {
        upload_backup_xml(job, names, base).await?;
    }
    job.host
        .run(&job.host.virsh().backup_begin(
            &job.vm.uuid,
            &names.backup_xml,
            Some(&names.checkpoint_xml),
        ))
        .await?;
    Ok(())
}

/// One disk from libvirt's NBD export: allocated extents, or the dirty ones since the base.
async fn read_disk(
    job: &Job<'_>,
    writer: &virtkeep_repo::BackupWriter,
    socket: &str,
    disk: &crate::plan::PlannedDisk,
    size: u64,
    choice: &Choice,
) -> Result<ExportStats> {
    let export = NbdExport::libvirt_pull(socket, &disk.target);
    let spec = disk.spec(size);
    let (previous, scope) = match &choice.base {
        Some(b) => {
            let index = job.repo.fixed_index(&b.id, &disk.target).await?;
            let reader = Arc::new(job.repo.disk_reader(&b.id, &disk.target).await?);
            (
                Some(index),
                ReadScope::Dirty {
                    context: format!("qemu:dirty-bitmap:backup-{}", disk.target),
                    parent: reader,
                },
            )
        }
        None => (None, ReadScope::default()),
    };
    let sink = Arc::new(RepoSink::new(writer.disk(spec, previous.as_ref()).await?));
    let read = DiskRead {
        scope,
        ..DiskRead::whole(&job.vm.name, &disk.target, job.parallel())
    };
    let st = export_disk(job.host, &export, sink.clone(), &read, &job.progress).await?;
    sink.finish().await?;
    Ok(st)
}
