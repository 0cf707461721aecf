//! The backup-API path of `virtkeep backup` (see [`crate::cbt`] for the model).
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

use virtkeep_libvirt::cmd;
use virtkeep_ssh::RemoteCommand;

use crate::backup::{
    BASE_KEPT_KEY, BackupOptions, BackupResult, BaseOnHost, FreezeMethod, ModeRequest, Plan,
    run_hook,
};
use crate::cbt::{self, Base, CHECKPOINT_PREFIX, CbtRecord};
use crate::error::{Error, ErrorKind, Result};
use crate::export::{NbdExport, ReadScope, export_disk};
use crate::host::Host;
use crate::phases::{Phase, PhaseClock};
use crate::progress::{Event, Progress};
use crate::store::RepoSink;
use crate::vm::Vm;

pub struct Choice {
    pub base: Option<Base>,
    pub reason: String,
    pub sizes: Vec<(String, u64)>,
}

const PAUSED_MARKER: &str = "started-paused";

async fn disk_size(host: &Host, path: &str, format: &str) -> Result<u64> {
    let out = host
        .run_string(&cmd::qemu_img_info_json(path, Some(format), true))
        .await?;
    let info = virtkeep_libvirt::parse::parse_qemu_img_info(&out)
        .map_err(|e| Error::new(ErrorKind::Remote, format!("qemu-img info {path}: {e}")))?;
    Ok(info.virtual_size)
}

pub async fn choose(host: &Host, plan: &Plan, opts: &BackupOptions) -> Result<Choice> {
    let mut sizes = Vec::new();
    for d in &plan.disks {
        sizes.push((d.target.clone(), disk_size(host, &d.path, &d.format).await?));
    }
    if opts.mode == ModeRequest::Full {
        return Ok(Choice {
            base: None,
            reason: "full backup requested".into(),
            sizes,
        });
    }
    Ok(Choice {
        base: None,
        reason: String::new(),
        sizes,
    })
}

/// Picks the base in the repository (needs the repository, so separate from `choose`).
async fn pick_base(
    host: &Host,
    repo: &virtkeep_repo::Repository,
    vm: &Vm,
    choice: &mut Choice,
) -> Result<()> {
    if !choice.reason.is_empty() {
        return Ok(());
    }
    let base = match cbt::latest_record(repo, &host.name, &vm.name).await? {
        cbt::Latest::Base(base) => base,
        cbt::Latest::None(reason) => {
            choice.reason = reason;
            return Ok(());
        }
    };
    let checkpoints = cbt::checkpoints(host, &vm.uuid).await?;
    match cbt::base_problem(&base, &vm.uuid, &checkpoints, &choice.sizes) {
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

#[allow(clippy::too_many_arguments)]
pub async fn run(
    host: &Host,
    repo: &virtkeep_repo::Repository,
    vm: &Vm,
    plan: &Plan,
    opts: &BackupOptions,
    progress: &Arc<dyn Progress>,
    mut choice: Choice,
    mut warnings: Vec<String>,
    mut clock: PhaseClock,
) -> Result<BackupResult> {
    pick_base(host, repo, vm, &mut choice).await?;
    let job_id = crate::job_id();
    let job_dir = host.job_dir(&format!("{}-{job_id}", vm.uuid)).await?;
    cbt::hand_job_dir_to_qemu(host, &job_dir).await?;
    clock.lap(Phase::Plan);
    let started_paused = if vm.state.is_active() {
        false
    } else {
        progress.event(Event::Phase {
            vm: vm.name.clone(),
            phase: "start-paused",
        });
        host.upload(&format!("{job_dir}/{PAUSED_MARKER}"), b"")
            .await?;
        host.run(
            &host
                .virsh()
                .command("start")
                .arg("--domain")
                .arg(&vm.uuid)
                .arg("--paused"),
        )
        .await
        .map_err(|e| e.context("starting the stopped VM paused for its backup job"))?;
        true
    };
    let res = run_job(
        host,
        repo,
        vm,
        plan,
        opts,
        progress,
        &mut choice,
        &job_dir,
        &job_id,
        &mut warnings,
        &mut clock,
    )
    .await;
    clock.lap(Phase::Publish);
    // End the job whatever happened; a VM we started (and nobody resumed) goes down again.
    let _ = host.exec(&host.virsh().domjobabort(&vm.uuid)).await;
    if started_paused {
        let state = host
            .run_string(&host.virsh().domstate(&vm.uuid))
            .await
            .unwrap_or_default();
        if state.trim() == "paused" {
            let _ = host.exec(&host.virsh().destroy(&vm.uuid)).await;
        } else {
            warnings
                .push("the VM was resumed by someone during its backup and is left running".into());
        }
    }
    let checkpoint = format!("{CHECKPOINT_PREFIX}{job_id}");
    let _ = host
        .run(&RemoteCommand::new("rm").arg("-rf").arg("--").arg(&job_dir))
        .await;
    let (manifest, stats) = match res {
        Ok(v) => v,
        Err(e) => {
            // Merge the new checkpoint's bitmap back: the next incremental then starts
            // from the last checkpoint a published backup recorded.
            if cbt::checkpoints(host, &vm.uuid)
                .await
                .unwrap_or_default()
                .contains(&checkpoint)
            {
                let _ = host
                    .exec(&host.virsh().checkpoint_delete(&vm.uuid, &checkpoint, false))
                    .await;
            }
            return Err(e);
        }
    };
    // Every mode keeps its checkpoint for the next incremental, unless asked not to.
    let keep = match opts.base {
        BaseOnHost::Keep => checkpoint.as_str(),
        BaseOnHost::Remove => "",
    };
    match cbt::prune_checkpoints(host, &vm.uuid, keep).await {
        Ok(removed) if !removed.is_empty() => {
            tracing::info!(vm = %vm.name, ?removed, "older virtkeep checkpoints deleted")
        }
        Ok(_) => {}
        Err(e) => warnings.push(format!("could not delete older virtkeep checkpoints: {e}")),
    }
    clock.lap(Phase::Heal);
    let disks = crate::backup::disk_results(&manifest, stats);
    Ok(BackupResult {
        id: manifest.id.clone(),
        host: host.name.clone(),
        vm: vm.name.clone(),
        mode: manifest.mode.to_string(),
        reason: manifest.reason.clone(),
        method: FreezeMethod::BackupApi,
        disks,
        skipped: plan.skipped.clone(),
        warnings,
        duration_secs: clock.elapsed_secs(),
        phases: clock.phases(),
    })
}

#[allow(clippy::too_many_arguments)]
async fn run_job(
    host: &Host,
    repo: &virtkeep_repo::Repository,
    vm: &Vm,
    plan: &Plan,
    opts: &BackupOptions,
    progress: &Arc<dyn Progress>,
    choice: &mut Choice,
    job_dir: &str,
    job_id: &str,
    warnings: &mut Vec<String>,
    clock: &mut PhaseClock,
) -> Result<(virtkeep_repo::Manifest, Vec<crate::export::ExportStats>)> {
    let targets: Vec<String> = plan.disks.iter().map(|d| d.target.clone()).collect();
    let excluded: Vec<String> = vm
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
    let socket = format!("{job_dir}/nbd.sock");
    let checkpoint = format!("{CHECKPOINT_PREFIX}{job_id}");
    let cp_path = format!("{job_dir}/checkpoint.xml");
    host.upload(
        &cp_path,
        cbt::checkpoint_xml(&checkpoint, &targets, &excluded).as_bytes(),
    )
    .await?;

    if let Some(cmd) = &opts.pre_snapshot {
        progress.event(Event::Phase {
            vm: vm.name.clone(),
            phase: "pre-snapshot",
        });
        run_hook(host, vm, "pre-snapshot", cmd)
            .await
            .map_err(|e| e.context("the pre-snapshot command failed, nothing was snapshotted"))?;
    }
    progress.event(Event::Phase {
        vm: vm.name.clone(),
        phase: "snapshot",
    });
    if opts.quiesce {
        let ping = host
            .exec(&host.virsh().qemu_agent_ping(&vm.uuid, 5))
            .await?;
        if ping.status != 0 {
            return Err(Error::domain(format!("--quiesce needs the QEMU guest agent, and it does not answer in {:?}", vm.name))
                .hint("install and start qemu-guest-agent in the guest, or back up without --quiesce (crash-consistent)"));
        }
        crate::hold::hold(host, &vm.uuid, job_dir, crate::hold::Hold::FsFreeze).await?;
    }
    let snapshot_time = time::OffsetDateTime::now_utc();
    let mut begun = begin(
        host,
        vm,
        &socket,
        job_dir,
        choice.base.as_ref(),
        &targets,
        &excluded,
        &cp_path,
    )
    .await;
    if let (Err(e), Some(base)) = (&begun, &choice.base) {
        // A checkpoint whose bitmap is gone or inconsistent (disk replaced, host crash):
        // never a wrong incremental, a full instead.
        choice.reason = format!(
            "full: the dirty bitmap of checkpoint {} is unusable ({})",
            base.record.checkpoint,
            e.message.lines().next().unwrap_or("")
        );
        choice.base = None;
        begun = begin(
            host, vm, &socket, job_dir, None, &targets, &excluded, &cp_path,
        )
        .await;
    }
    if opts.quiesce {
        // A failed thaw keeps the record: healing at the end of this job retries it.
        let _ = crate::hold::release(host, &vm.uuid, job_dir, crate::hold::Hold::FsFreeze).await;
    }
    if let Some(cmd) = &opts.post_snapshot {
        progress.event(Event::Phase {
            vm: vm.name.clone(),
            phase: "post-snapshot",
        });
        if let Err(e) = run_hook(host, vm, "post-snapshot", cmd).await {
            let msg = format!("the post-snapshot command failed: {e}");
            progress.event(Event::Notice {
                vm: vm.name.clone(),
                message: msg.clone(),
            });
            warnings.push(msg);
        }
    }
    begun.map_err(|e| e.context("starting the backup job (virsh backup-begin)"))?;
    clock.lap(Phase::Freeze);

    progress.event(Event::Phase {
        vm: vm.name.clone(),
        phase: "export",
    });
    let mode = if choice.base.is_some() {
        virtkeep_repo::BackupMode::Incremental
    } else {
        virtkeep_repo::BackupMode::Full
    };
    let meta = virtkeep_repo::BackupMeta {
        host: host.name.clone(),
        vm: vm.name.clone(),
        mode,
        reason: choice.reason.clone(),
        parent: choice.base.as_ref().map(|b| b.id.clone()),
        domain_xml: vm.inactive_xml.clone(),
        time: Some(snapshot_time),
    };
    let writer = repo.begin_backup(meta).await?;
    let mut stats = Vec::new();
    for (disk, (_, size)) in plan.disks.iter().zip(&choice.sizes) {
        let export = NbdExport::libvirt_pull(&socket, &disk.target);
        let spec = virtkeep_repo::DiskSpec {
            name: disk.target.clone(),
            size: *size,
            backend: virtkeep_repo::Storage::File,
            format: disk.format.clone(),
            target: disk.target.clone(),
            source: disk.path.clone(),
        };
        let (previous, scope) = match &choice.base {
            Some(b) => {
                let index = repo.fixed_index(&b.id, &disk.target).await?;
                let reader = Arc::new(repo.disk_reader(&b.id, &disk.target).await?);
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
        let st = export_disk(
            host,
            &export,
            sink.clone(),
            &scope,
            opts.parallel.max(1),
            &vm.name,
            &disk.target,
            progress,
        )
        .await?;
        sink.finish().await?;
        stats.push(st);
    }
    clock.lap(Phase::Data);
    let record = CbtRecord {
        checkpoint,
        vm_uuid: vm.uuid.clone(),
        disks: choice.sizes.clone(),
    };
    let manifest = writer
        .finish(serde_json::json!({
            "method": FreezeMethod::BackupApi,
            "transport": "ssh",
            "cbt": record,
            BASE_KEPT_KEY: opts.base == BaseOnHost::Keep,
        }))
        .await?;
    Ok((manifest, stats))
}

#[allow(clippy::too_many_arguments)]
async fn begin(
    host: &Host,
    vm: &Vm,
    socket: &str,
    job_dir: &str,
    base: Option<&Base>,
    targets: &[String],
    excluded: &[String],
    cp_path: &str,
) -> Result<()> {
    let xml = cbt::backup_xml(
        socket,
        job_dir,
        base.map(|b| b.record.checkpoint.as_str()),
        targets,
        excluded,
    );
    let path = format!("{job_dir}/backup.xml");
    host.upload(&path, xml.as_bytes()).await?;
    host.run(&host.virsh().backup_begin(&vm.uuid, &path, Some(cp_path)))
        .await?;
    Ok(())
}

/// For `heal`: a VM virtkeep started paused for a job that did not finish goes down again.
pub async fn undo_paused_start(host: &Host, uuid: &str) -> Result<Option<String>> {
    let script = r#"for f in "$1"/"$2"-*/started-paused; do [ -e "$f" ] && exit 0; done; exit 1"#;
    let found = host
        .exec(
            &RemoteCommand::new("sh")
                .arg("-c")
                .arg(script)
                .arg("sh")
                .arg(format!("{}/jobs", crate::host::HOST_STATE_DIR))
                .arg(uuid),
        )
        .await?;
    if found.status != 0 {
        return Ok(None);
    }
    let state = host.run_string(&host.virsh().domstate(uuid)).await?;
    if state.trim() == "paused" {
        let _ = host.exec(&host.virsh().domjobabort(uuid)).await;
        host.run(&host.virsh().destroy(uuid)).await?;
        return Ok(Some(
            "stopped the VM a killed job had started paused".into(),
        ));
    }
    Ok(None)
}
