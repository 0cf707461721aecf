//! `virtkeep backup HOST/VM`: one crash-consistent instant for every included disk,
//! exported over SSH into the repository, and the VM back on its own files.
//!
//! Order of events, and why:
//! 1. take the per-VM lock on the host (two backups of one VM never overlap);
//! 2. heal what an earlier killed run left (the VM must run on its own files first);
//! 3. pre-snapshot command; freeze; post-snapshot command (also when the freeze failed);
//! 4. export every frozen base through qemu-nbd + NBD over SSH into the repository;
//! 5. heal again, which commits the overlays and removes them, success or not;
//! 6. publish the manifest only when every disk was exported.

use std::sync::Arc;

use serde::Serialize;
use virtkeep_libvirt::{
    Backend, Disk, DiskSource, Domain, NewSource, Rewrite, cmd, rewrite_domain,
};
use virtkeep_ssh::RemoteCommand;

use crate::error::{Error, ErrorKind, Result};
use crate::export::{ExportStats, NbdExport, export_disk, export_stream};
use crate::heal::{define, heal_vm};
use crate::hold::Hold;
use crate::host::{Host, OVERLAY_MARKER};
use crate::lvm_backup::FrozenLvs;
use crate::phases::{Phase, PhaseClock, Phases};
pub use crate::plan::{BaseOnHost, ModeRequest, Transport};
use crate::progress::{Event, Progress};
use crate::store::RepoSink;
use crate::vm::{DomainState, Vm};

/// Manifest `extra` key: `false` when the backup left no base on the host on request.
pub const BASE_KEPT_KEY: &str = "base_kept";

/// Whether `manifest` was taken with the base removed on request (`--no-keep-base`).
pub fn base_removed_on_request(manifest: &virtkeep_repo::Manifest) -> bool {
    manifest.extra.get(BASE_KEPT_KEY) == Some(&serde_json::Value::Bool(false))
}

/// The reason of a full whose parent left no base on request.
pub fn removed_on_request_reason(parent: &str) -> String {
    format!(
        "full: backup {parent} left no base on the host, as asked (--no-keep-base or keep_base = false)"
    )
}

/// Options of one backup run (`virtkeep backup`).
#[derive(Debug, Clone, Default)]
pub struct BackupOptions {
    pub mode: ModeRequest,
    /// Leave the next incremental's base on the host (the default) or nothing.
    pub base: BaseOnHost,
    /// Disk targets (`vdb`) to leave out.
    pub exclude_disks: Vec<String>,
    /// Freeze guest filesystems through the QEMU guest agent.
    pub quiesce: bool,
    /// Shell command run on the host before the snapshot; failing aborts the backup.
    pub pre_snapshot: Option<String>,
    /// Shell command run on the host after the snapshot, also when it failed.
    pub post_snapshot: Option<String>,
    pub transport: Transport,
    /// Parallel data connections per disk.
    pub parallel: usize,
}

/// How the disks are frozen at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FreezeMethod {
    /// Running VM: `virsh snapshot-create-as --disk-only --atomic --no-metadata`.
    LiveSnapshot,
    /// Stopped VM: `qemu-img create` overlays, and the domain redefined on them so a
    /// start during the backup writes into the overlays, never into the frozen bases.
    OfflineOverlay,
    /// qcow2 disks on a host with libvirt's backup API: `virsh backup-begin` in pull
    /// mode with a checkpoint (dirty bitmaps), no overlay and no blockcommit. A stopped
    /// VM is started paused for the job and destroyed again afterwards.
    BackupApi,
}

/// Which disks a backup takes and how.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub method: FreezeMethod,
    pub disks: Vec<PlannedDisk>,
    pub skipped: Vec<SkippedDisk>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlannedDisk {
    pub target: String,
    /// File path, or `pool/image` for RBD.
    pub path: String,
    pub format: String,
    /// `(pool, image)` of a Ceph RBD disk.
    pub rbd: Option<(String, String)>,
    /// `(vg, lv)` of a disk on an LVM logical volume (`path` is `/dev/VG/LV`).
    pub lvm: Option<(String, String)>,
}

impl PlannedDisk {
    /// A file disk: frozen with a qcow2 overlay (neither RBD nor LVM).
    pub fn is_file(&self) -> bool {
        self.rbd.is_none() && self.lvm.is_none()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SkippedDisk {
    pub target: String,
    pub reason: String,
}

/// Decides method and disks from the definition alone (unit-tested with fixtures).
pub fn plan_backup(domain: &Domain, state: DomainState, opts: &BackupOptions) -> Result<Plan> {
    for ex in &opts.exclude_disks {
        if !domain.disks.iter().any(|d| &d.target == ex) {
            return Err(
                Error::config(format!("--exclude-disk {ex}: the domain has no disk {ex}"))
                    .hint(format!("its disks are: {}", targets(domain))),
            );
        }
    }
    let is_xen = domain.kind == "xen";
    if is_xen && state.is_active() {
        return Err(Error::unsupported(format!(
            "{:?} is a running Xen domain: libvirt's Xen driver cannot take external disk snapshots",
            domain.name
        ))
        .hint("shut the domain down and run the backup again (stopped domains are frozen with qemu-img overlays)"));
    }
    let mut disks = Vec::new();
    let mut skipped = Vec::new();
    for disk in &domain.disks {
        if opts.exclude_disks.contains(&disk.target) {
            skipped.push(SkippedDisk {
                target: disk.target.clone(),
                reason: "excluded with --exclude-disk".into(),
            });
            continue;
        }
        if let Err(reason) = disk.is_backup_candidate() {
            skipped.push(SkippedDisk {
                target: disk.target.clone(),
                reason: reason.to_string(),
            });
            continue;
        }
        if let Some(problem) = disk.rbd_name_problem() {
            return Err(Error::unsupported(format!("disk {}: {problem}", disk.target))
                .hint(format!("virtkeep passes no other RBD names to rbd; rename the image or leave the disk out with --exclude-disk {}", disk.target)));
        }
        match (disk.backend(), &disk.source) {
            (Backend::QcowFile | Backend::RawFile, DiskSource::File { path }) => {
                // A path with the overlay marker here is a kept overlay (healing ran
                // first and committed every other one); it is read as the frozen layer.
                if is_xen && !matches!(disk.driver_name.as_deref(), Some("qemu" | "qdisk")) {
                    return Err(Error::unsupported(format!(
                        "Xen disk {} uses driver {:?}: only qdisk file disks can be frozen with an overlay",
                        disk.target,
                        disk.driver_name.as_deref().unwrap_or("default")
                    ))
                    .hint(format!("exclude it with --exclude-disk {}", disk.target)));
                }
                disks.push(PlannedDisk {
                    target: disk.target.clone(),
                    path: path.clone(),
                    format: disk.format.clone().unwrap_or_else(|| "raw".into()),
                    rbd: None,
                    lvm: None,
                });
            }
            (Backend::Rbd { pool, image }, _) => {
                disks.push(PlannedDisk {
                    target: disk.target.clone(),
                    path: format!("{pool}/{image}"),
                    format: "raw".into(),
                    rbd: Some((pool, image)),
                    lvm: None,
                });
            }
            // An LV is frozen with an LVM snapshot (no overlay), read like a raw image.
            (Backend::Lvm { vg, lv }, _) => {
                disks.push(PlannedDisk {
                    target: disk.target.clone(),
                    path: crate::lvm::lv_path(&vg, &lv),
                    format: disk.format.clone().unwrap_or_else(|| "raw".into()),
                    rbd: None,
                    lvm: Some((vg, lv)),
                });
            }
            (backend, _) => {
                return Err(Error::unsupported(format!(
                    "disk {} ({}) is on a storage backend this version cannot back up yet",
                    disk.target,
                    describe(disk, &backend)
                ))
                .hint(format!("leave it out with --exclude-disk {}", disk.target)));
            }
        }
    }
    if disks.is_empty() {
        return Err(Error::domain(format!("{:?} has no disk to back up", domain.name))
            .hint("every disk was excluded or skipped (CD-ROMs, floppies, read-only and shareable disks are skipped)"));
    }
    let method = if state.is_active() {
        FreezeMethod::LiveSnapshot
    } else {
        FreezeMethod::OfflineOverlay
    };
    Ok(Plan {
        method,
        disks,
        skipped,
    })
}

fn describe(disk: &Disk, backend: &Backend) -> String {
    match backend {
        Backend::Rbd { pool, image } => format!("Ceph RBD {pool}/{image}"),
        Backend::Lvm { vg, lv } => format!("LVM volume {vg}/{lv}"),
        Backend::Block => "block device".into(),
        _ => format!("{:?}", disk.source),
    }
}

fn targets(domain: &Domain) -> String {
    domain
        .disks
        .iter()
        .map(|d| d.target.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// One disk in the result of a backup.
#[derive(Debug, Clone, Serialize)]
pub struct DiskResult {
    pub target: String,
    pub size: u64,
    pub bytes_read: u64,
    pub bytes_new: u64,
    pub chunks_new: u64,
    pub chunks_reused: u64,
    pub chunks_zero: u64,
}

/// The per-disk lines of a result: the manifest's statistics and what crossed the wire.
pub(crate) fn disk_results(
    manifest: &virtkeep_repo::Manifest,
    stats: Vec<ExportStats>,
) -> Vec<DiskResult> {
    manifest
        .disks
        .iter()
        .zip(stats)
        .map(|(d, s)| DiskResult {
            target: d.spec.target.clone(),
            size: d.spec.size,
            bytes_read: s.bytes_read,
            bytes_new: d.stats.bytes_new,
            chunks_new: d.stats.chunks_new,
            chunks_reused: d.stats.chunks_reused,
            chunks_zero: d.stats.chunks_zero,
        })
        .collect()
}

/// What `virtkeep backup` reports (stable in `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct BackupResult {
    pub id: String,
    pub host: String,
    pub vm: String,
    pub mode: String,
    pub reason: String,
    pub method: FreezeMethod,
    pub disks: Vec<DiskResult>,
    pub skipped: Vec<SkippedDisk>,
    pub warnings: Vec<String>,
    pub duration_secs: f64,
    /// Where the time went (`connect_secs` is the caller's).
    pub phases: Phases,
}

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
    let res = match Vm::load(host, &uuid).await {
        Ok(vm) => {
            clock.lap(Phase::LockLoad);
            backup_locked(host, repo, vm, opts, &progress, clock).await
        }
        Err(e) => Err(e),
    };
    lock.release().await;
    res
}

async fn backup_locked(
    host: &Host,
    repo: &virtkeep_repo::Repository,
    mut vm: Vm,
    opts: &BackupOptions,
    progress: &Arc<dyn Progress>,
    mut clock: PhaseClock,
) -> Result<BackupResult> {
    let mut warnings = Vec::new();
    // `--mode incremental` starts and continues the overlay chain of disks without a
    // dirty bitmap; a full continues one that is in use (it never starts one: running
    // on an overlay is a cost a user asks for). Any other backup returns the VM to its
    // own files first.
    let chain_in_use =
        opts.mode == ModeRequest::Full && !crate::kept::read(host, &vm.uuid).await?.is_empty();
    if opts.mode != ModeRequest::Incremental {
        crate::kept::clear(host, &vm.uuid).await?;
    }
    let healed = crate::heal::heal_loaded(host, vm.clone(), false).await?;
    if !healed.actions.is_empty() {
        let msg = format!(
            "healed leftovers of an earlier run: {}",
            healed.actions.join("; ")
        );
        progress.event(Event::Notice {
            vm: vm.name.clone(),
            message: msg.clone(),
        });
        warnings.push(msg);
        vm.reload(host).await?;
    }
    let plan = plan_backup(&vm.domain, vm.state, opts)?;
    for s in &plan.skipped {
        progress.event(Event::Notice {
            vm: vm.name.clone(),
            message: format!("skipping disk {}: {}", s.target, s.reason),
        });
    }
    if let Some(cbt) = cbt_choice(host, &vm, &plan, opts).await? {
        return crate::cbt_backup::run(
            host, repo, &vm, &plan, opts, progress, cbt, warnings, clock,
        )
        .await;
    }
    let (mode, reason) = match opts.mode {
        ModeRequest::Full => (
            virtkeep_repo::BackupMode::Full,
            "full backup requested".to_string(),
        ),
        ModeRequest::Auto | ModeRequest::Incremental => (
            virtkeep_repo::BackupMode::Full,
            incremental_unavailable(&plan),
        ),
    };

    let job_id = crate::job_id();
    let job_dir = host.job_dir(&format!("{}-{job_id}", vm.uuid)).await?;
    clock.lap(Phase::Plan);

    if let Some(cmd) = &opts.pre_snapshot {
        progress.event(Event::Phase {
            vm: vm.name.clone(),
            phase: "pre-snapshot",
        });
        run_hook(host, &vm, "pre-snapshot", cmd)
            .await
            .map_err(|e| e.context("the pre-snapshot command failed, nothing was snapshotted"))?;
    }
    progress.event(Event::Phase {
        vm: vm.name.clone(),
        phase: "snapshot",
    });
    let snapshot_time = time::OffsetDateTime::now_utc();
    let frozen = freeze(host, &vm, &plan, &job_id, &job_dir, opts.quiesce).await;
    if let Some(cmd) = &opts.post_snapshot {
        progress.event(Event::Phase {
            vm: vm.name.clone(),
            phase: "post-snapshot",
        });
        if let Err(e) = run_hook(host, &vm, "post-snapshot", cmd).await {
            let msg = format!("the post-snapshot command failed: {e}");
            progress.event(Event::Notice {
                vm: vm.name.clone(),
                message: msg.clone(),
            });
            warnings.push(msg);
        }
    }
    let mut frozen_lvs = match frozen {
        Ok(f) => f,
        Err(e) => {
            let _ = heal_vm(host, &vm.uuid, false).await;
            return Err(e);
        }
    };
    clock.lap(Phase::Freeze);

    progress.event(Event::Phase {
        vm: vm.name.clone(),
        phase: "export",
    });
    let live = plan.method == FreezeMethod::LiveSnapshot;
    // An incremental reads what the kept overlays hold and leaves its new overlays as
    // the next base; so does a full of a chain in use (auto never leaves an overlay).
    let use_kept = live && opts.mode == ModeRequest::Incremental;
    let keep = live
        && opts.base == BaseOnHost::Keep
        && (opts.mode == ModeRequest::Incremental || chain_in_use);
    // The VM is frozen from here on: a failure to find the bases heals before returning.
    let bases = async {
        let rbd_bases = crate::rbd::bases(host, repo, &vm, &plan, opts.mode).await?;
        let kept = if use_kept {
            crate::kept::bases(host, repo, &vm, &plan).await?
        } else {
            (crate::rbd::Bases::new(), None)
        };
        let lvm_parent = if opts.mode == ModeRequest::Full {
            None
        } else {
            crate::lvm_backup::parent(host, repo, &vm.name, &frozen_lvs).await?
        };
        Ok::<_, Error>((rbd_bases, kept, lvm_parent))
    }
    .await;
    let ((rbd_bases, rbd_problem), (kept_bases, kept_problem), lvm_parent) = match bases {
        Ok(b) => b,
        Err(e) => {
            let _ = heal_vm(host, &vm.uuid, false).await;
            let _ = host
                .run(&RemoteCommand::new("rm").arg("-rf").arg("--").arg(&job_dir))
                .await;
            return Err(e);
        }
    };
    let reason = kept_problem.or(rbd_problem).unwrap_or(reason);
    let thin = match crate::lvm_backup::thin_deltas(
        host,
        &mut frozen_lvs,
        lvm_parent.as_ref(),
        opts.base == BaseOnHost::Keep,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            let msg = format!("thin_delta failed, the thin LVs are read whole: {e}");
            progress.event(Event::Notice {
                vm: vm.name.clone(),
                message: msg.clone(),
            });
            warnings.push(msg);
            Default::default()
        }
    };
    let lvm_based = if lvm_parent.is_some() {
        frozen_lvs.len()
    } else {
        0
    };
    let lvm_how = lvm_reason(&thin, frozen_lvs.len());
    let bases = rbd_bases
        .values()
        .chain(kept_bases.values())
        .map(|(parent, _)| parent)
        .chain(lvm_parent.iter().map(|m| &m.id));
    let (mode, reason, parent) = match bases.clone().next() {
        Some(parent) => {
            let all = rbd_bases.len() + kept_bases.len() + lvm_based == plan.disks.len();
            (
                virtkeep_repo::BackupMode::Incremental,
                if lvm_based == plan.disks.len() {
                    format!("incremental since backup {parent}: {lvm_how}")
                } else if all {
                    format!(
                        "incremental since backup {parent} (kept RBD snapshots / kept overlays; LVM volumes read whole, only changed chunks stored)"
                    )
                } else {
                    format!("incremental since backup {parent} for some disks; {reason}")
                },
                Some(parent.clone()),
            )
        }
        None => (mode, reason, None),
    };
    // Under --mode incremental the new overlays stay under the running VM.
    let kept_new: std::collections::BTreeMap<String, String> = if keep {
        plan.disks
            .iter()
            .filter(|d| d.is_file())
            .map(|d| (d.target.clone(), overlay_path(base_of(&d.path), &job_id)))
            .collect()
    } else {
        Default::default()
    };
    let meta = virtkeep_repo::BackupMeta {
        host: host.name.clone(),
        vm: vm.name.clone(),
        mode,
        reason: reason.clone(),
        parent,
        domain_xml: vm.inactive_xml.clone(),
        time: Some(snapshot_time),
    };
    let snap = format!("virtkeep-{job_id}");
    clock.lap(Phase::Plan);
    let mut exported = export_all(
        host,
        repo,
        &vm,
        &plan,
        meta,
        &job_dir,
        opts,
        progress,
        &rbd_bases,
        &snap,
        &kept_bases,
        &kept_new,
        &frozen_lvs,
        lvm_parent.as_ref(),
        &thin.ranges,
    )
    .await;
    let publish_secs = exported.as_ref().map_or(0.0, |e| e.2);
    clock.lap_split(Phase::Data, Phase::Publish, publish_secs);
    if exported.is_ok()
        && let Err(e) = crate::lvm_backup::replace_bases(host, &frozen_lvs).await
    {
        warnings.push(format!(
            "the backup is stored, but its thin snapshots could not be kept as the next base (the next backup reads them whole): {e}"
        ));
    }
    if keep && exported.is_ok() {
        let kept = async {
            for d in plan
                .disks
                .iter()
                .filter(|d| kept_bases.contains_key(&d.target))
            {
                crate::kept::commit_kept(host, &vm.uuid, &d.target, &d.path, base_of(&d.path))
                    .await?;
            }
            let entries: Vec<(String, String)> = kept_new.clone().into_iter().collect();
            crate::kept::write(host, &vm.uuid, &entries).await
        }
        .await;
        if let Err(e) = kept {
            exported = Err(e);
        }
    }
    if exported.is_err() || !keep {
        // Nothing is kept after a failure (or when not asked): healing commits every overlay.
        let _ = crate::kept::clear(host, &vm.uuid).await;
    }

    clock.lap(Phase::Publish);
    progress.event(Event::Phase {
        vm: vm.name.clone(),
        phase: "commit",
    });
    crate::failpoint::hit("before-heal").await;
    let thawed = heal_vm(host, &vm.uuid, false).await;
    let _ = host
        .run(&RemoteCommand::new("rm").arg("-rf").arg("--").arg(&job_dir))
        .await;

    clock.lap(Phase::Heal);
    let (manifest, stats, _) = exported?;
    if let Err(e) = thawed {
        return Err(e.context(format!(
            "backup {} is stored, but the VM could not be returned to its own files",
            manifest.id
        )));
    }
    let disks = disk_results(&manifest, stats);
    Ok(BackupResult {
        id: manifest.id.clone(),
        host: host.name.clone(),
        vm: vm.name.clone(),
        mode: mode.to_string(),
        reason,
        method: plan.method,
        disks,
        skipped: plan.skipped.clone(),
        warnings,
        duration_secs: clock.elapsed_secs(),
        phases: clock.phases(),
    })
}

/// How an LVM incremental read its volumes, for the reason.
fn lvm_reason(thin: &crate::lvm_backup::ThinDeltas, lvs: usize) -> String {
    let mut how = if !thin.ranges.is_empty() && thin.ranges.len() == lvs {
        "thin_delta listed the changed blocks of the thin LVs and only those were read".to_string()
    } else if !thin.ranges.is_empty() {
        "thin_delta listed the changed blocks of the thin LVs (only those were read); the other LVs were read whole and only their changed chunks stored".to_string()
    } else {
        "each snapshot was read whole and only the chunks that changed were stored (LVM keeps no change map)".to_string()
    };
    if !thin.read_whole.is_empty() {
        how.push_str(&format!(
            "; thin LVs read whole: {}",
            thin.read_whole.join("; ")
        ));
    }
    how
}

/// Why this backup cannot be incremental, for the manifest and the output.
fn incremental_unavailable(plan: &Plan) -> String {
    if plan.disks.iter().any(|d| d.lvm.is_some()) {
        "full: no earlier backup of these LVM volumes (LVM keeps no change map: later backups read each snapshot whole and store only the chunks that changed)".into()
    } else if plan.disks.iter().any(|d| d.format != "qcow2")
        && plan.method == FreezeMethod::LiveSnapshot
    {
        "full: raw disks carry no dirty bitmap; --mode incremental keeps an overlay under the running VM for the next incremental (auto never leaves one)".into()
    } else if plan.disks.iter().any(|d| d.format != "qcow2") {
        "full: raw disks carry no dirty bitmap (only qcow2 disks can be backed up incrementally)"
            .into()
    } else {
        "full: the host's libvirt has no backup API (checkpoints), so no dirty bitmap".into()
    }
}

/// Decides whether the backup goes through libvirt's backup API, and from which base.
async fn cbt_choice(
    host: &Host,
    vm: &Vm,
    plan: &Plan,
    opts: &BackupOptions,
) -> Result<Option<crate::cbt_backup::Choice>> {
    if vm.domain.kind == "xen"
        || opts.transport != Transport::Ssh
        || plan.disks.iter().any(|d| d.format != "qcow2" || !d.is_file())
        // A disk on a kept overlay belongs to the kept-snapshot method.
        || plan.disks.iter().any(|d| d.path.contains(OVERLAY_MARKER))
        || !crate::cbt::backup_api_supported(host, false).await
    {
        return Ok(None);
    }
    crate::cbt_backup::choose(host, plan, opts).await.map(Some)
}

#[allow(clippy::too_many_arguments)]
async fn export_all(
    host: &Host,
    repo: &virtkeep_repo::Repository,
    vm: &Vm,
    plan: &Plan,
    meta: virtkeep_repo::BackupMeta,
    job_dir: &str,
    opts: &BackupOptions,
    progress: &Arc<dyn Progress>,
    rbd_bases: &crate::rbd::Bases,
    snap: &str,
    kept_bases: &crate::rbd::Bases,
    kept_new: &std::collections::BTreeMap<String, String>,
    lvm: &FrozenLvs,
    lvm_parent: Option<&virtkeep_repo::Manifest>,
    thin_ranges: &std::collections::BTreeMap<String, Vec<(u64, u64)>>,
) -> Result<(virtkeep_repo::Manifest, Vec<ExportStats>, f64)> {
    let mut transport = opts.transport;
    if transport != Transport::Stream {
        let probe = RemoteCommand::new("sh")
            .arg("-c")
            .arg("command -v qemu-nbd");
        if host.exec(&probe).await?.status != 0 {
            progress.event(Event::Notice {
                vm: vm.name.clone(),
                message: "qemu-nbd is not installed on the host: falling back to a dd stream (every byte is read)".into(),
            });
            transport = Transport::Stream;
        }
    }
    if transport == Transport::Stream
        && let Some(d) = plan
            .disks
            .iter()
            .find(|d| d.format != "raw" && d.rbd.is_none())
    {
        return Err(Error::unsupported(format!(
            "disk {} is {}: without qemu-nbd only raw images can be streamed",
            d.target, d.format
        ))
        .hint("install qemu-nbd on the host (Debian: qemu-utils, RHEL: qemu-img)"));
    }
    let writer = repo.begin_backup(meta).await?;
    let mut stats = Vec::new();
    for (i, disk) in plan.disks.iter().enumerate() {
        // An LVM disk is read from its snapshot, as a block device.
        let frozen_lv = lvm.get(&disk.target);
        let read_path = frozen_lv.map_or(disk.path.as_str(), |f| f.snapshot.path.as_str());
        let block_device = frozen_lv.is_some();
        let lvm_previous = match (frozen_lv, lvm_parent) {
            (Some(_), Some(parent)) => Some(repo.fixed_index(&parent.id, &disk.target).await?),
            _ => None,
        };
        let spec = |size| virtkeep_repo::DiskSpec {
            name: disk.target.clone(),
            size,
            backend: if block_device {
                virtkeep_repo::Storage::Lvm
            } else {
                virtkeep_repo::Storage::File
            },
            format: disk.format.clone(),
            target: disk.target.clone(),
            source: disk.path.clone(),
        };
        if let Some((pool, image)) = &disk.rbd {
            let ceph = crate::rbd::ceph(host)?;
            let size = crate::rbd::image_size(host, &ceph, pool, image).await?;
            let mut spec = spec(size);
            spec.backend = virtkeep_repo::Storage::Rbd;
            let (previous, from) = match rbd_bases.get(&disk.target) {
                Some((parent, base_snap)) => (
                    Some(repo.fixed_index(parent, &disk.target).await?),
                    Some((
                        base_snap.as_str(),
                        Arc::new(repo.disk_reader(parent, &disk.target).await?),
                    )),
                ),
                None => (None, None),
            };
            let sink = Arc::new(RepoSink::new(writer.disk(spec, previous.as_ref()).await?));
            let st = crate::rbd::export(
                host,
                &ceph,
                pool,
                image,
                snap,
                from,
                size,
                sink.clone(),
                &vm.name,
                &disk.target,
                progress,
            )
            .await?;
            sink.finish().await?;
            stats.push(st);
            continue;
        }
        if transport == Transport::Stream {
            let size = if block_device {
                host.block_device_size(read_path).await?
            } else {
                host.file_size(read_path).await?
            };
            let sink = Arc::new(RepoSink::new(
                writer.disk(spec(size), lvm_previous.as_ref()).await?,
            ));
            let st = export_stream(
                host,
                read_path,
                size,
                sink.clone(),
                &vm.name,
                &disk.target,
                progress,
            )
            .await?;
            sink.finish().await?;
            stats.push(st);
            continue;
        }
        let export = if transport == Transport::Netcat {
            NbdExport::start_readonly_tcp(host, job_dir, i, read_path, &disk.format, block_device)
                .await?
        } else {
            NbdExport::start_readonly(host, job_dir, i, read_path, &disk.format, block_device)
                .await?
        };
        let res = async {
            let probe = export.connect(host.session(), &[]).await?;
            let size = probe.size();
            let _ = probe.disconnect().await;
            let (previous, scope) = match kept_bases.get(&disk.target) {
                Some((parent, kept)) => {
                    let ranges = crate::kept::changed_ranges(host, kept).await?;
                    let reader = Arc::new(repo.disk_reader(parent, &disk.target).await?);
                    (
                        Some(repo.fixed_index(parent, &disk.target).await?),
                        crate::export::ReadScope::Ranges {
                            ranges,
                            parent: reader,
                        },
                    )
                }
                None => match (thin_ranges.get(&disk.target), lvm_parent) {
                    (Some(ranges), Some(parent)) => (
                        lvm_previous,
                        crate::export::ReadScope::Ranges {
                            ranges: ranges.clone(),
                            parent: Arc::new(repo.disk_reader(&parent.id, &disk.target).await?),
                        },
                    ),
                    _ => (lvm_previous, crate::export::ReadScope::default()),
                },
            };
            let sink = Arc::new(RepoSink::new(
                writer.disk(spec(size), previous.as_ref()).await?,
            ));
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
            Ok::<_, Error>(st)
        }
        .await;
        let stopped = export.stop(host).await;
        let st = res?;
        stopped?;
        stats.push(st);
    }
    // Snapshot housekeeping happens as the manifest is published, before the VM is
    // healed: the kept snapshot is then the recorded base, which healing keeps.
    let keep = (opts.base == BaseOnHost::Keep).then_some(snap);
    let rbd: std::collections::BTreeMap<&str, Option<&str>> = plan
        .disks
        .iter()
        .filter(|d| d.rbd.is_some())
        .map(|d| (d.target.as_str(), keep))
        .collect();
    // An overflowed LVM snapshot no longer holds the instant: nothing of it is published.
    crate::lvm_backup::check_valid(host, lvm).await?;
    let publishing = std::time::Instant::now();
    let manifest = writer
        .finish(serde_json::json!({
            "method": plan.method,
            "transport": transport,
            "rbd": rbd,
            "kept": kept_new,
            "lvm": lvm,
            BASE_KEPT_KEY: opts.base == BaseOnHost::Keep,
        }))
        .await?;
    for d in &plan.disks {
        if let Some((pool, image)) = &d.rbd {
            let ceph = crate::rbd::ceph(host)?;
            crate::rbd::housekeep(host, &ceph, pool, image, keep).await?;
        }
    }
    Ok((manifest, stats, publishing.elapsed().as_secs_f64()))
}

/// Runs a user hook on the host with `sh -c`; its output goes to the log.
pub(crate) async fn run_hook(host: &Host, vm: &Vm, phase: &str, command: &str) -> Result<()> {
    let cmd = RemoteCommand::new("sh")
        .arg("-c")
        .arg(command)
        .env("VIRTKEEP_PHASE", phase)
        .env("VIRTKEEP_VM", &vm.name)
        .env("VIRTKEEP_VM_UUID", &vm.uuid)
        .env("VIRTKEEP_HOST", &host.name);
    let out = host.exec(&cmd).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    tracing::info!(vm = %vm.name, phase, status = out.status, stdout = %stdout.trim(), stderr = %stderr.trim(), "hook ran");
    if out.status != 0 {
        return Err(Error::new(
            ErrorKind::Remote,
            format!(
                "{phase} command exited with status {}: {}",
                out.status,
                stderr.trim()
            ),
        ));
    }
    Ok(())
}

/// `rbd snap create` of every RBD disk; all or nothing.
async fn snap_rbds(host: &Host, rbds: &[&PlannedDisk], snap: &str) -> Result<()> {
    if rbds.is_empty() {
        return Ok(());
    }
    let ceph = crate::rbd::ceph(host)?;
    let mut made: Vec<(&str, &str)> = Vec::new();
    for d in rbds {
        let Some((pool, image)) = &d.rbd else {
            continue;
        };
        if let Err(e) = crate::rbd::snap_create(host, &ceph, pool, image, snap).await {
            for (p, i) in made {
                let _ = crate::rbd::snap_rm(host, &ceph, p, i, snap).await;
            }
            return Err(e);
        }
        made.push((pool, image));
    }
    Ok(())
}

/// The VM's own image under a (kept) overlay path.
fn base_of(path: &str) -> &str {
    crate::heal::overlay_base(path).unwrap_or(path)
}

fn overlay_path(base: &str, job_id: &str) -> String {
    format!("{base}{OVERLAY_MARKER}{job_id}")
}

async fn freeze(
    host: &Host,
    vm: &Vm,
    plan: &Plan,
    job_id: &str,
    job_dir: &str,
    quiesce: bool,
) -> Result<FrozenLvs> {
    let planned: Vec<&PlannedDisk> = plan.disks.iter().collect();
    // LVM sizes are checked before anything is made: a refusal leaves nothing behind.
    let lvs = crate::lvm_backup::prepare(host, &planned, job_id).await?;
    match plan.method {
        FreezeMethod::BackupApi => Err(Error::new(
            ErrorKind::Domain,
            "internal: the backup-API path takes no overlay",
        )),
        FreezeMethod::LiveSnapshot => {
            if quiesce {
                let ping = host
                    .exec(&host.virsh().qemu_agent_ping(&vm.uuid, 5))
                    .await?;
                if ping.status != 0 {
                    return Err(Error::domain(format!(
                        "--quiesce needs the QEMU guest agent, and it does not answer in {:?}",
                        vm.name
                    ))
                    .hint("install and start qemu-guest-agent in the guest (with a virtio-serial channel org.qemu.guest_agent.0), or back up without --quiesce (crash-consistent)"));
                }
            }
            let files: Vec<&PlannedDisk> = plan.disks.iter().filter(|d| d.is_file()).collect();
            let rbds: Vec<&PlannedDisk> = plan.disks.iter().filter(|d| d.rbd.is_some()).collect();
            let specs: Vec<(String, String)> = files
                .iter()
                .map(|d| (d.target.clone(), overlay_path(base_of(&d.path), job_id)))
                .collect();
            let excluded: Vec<String> = vm
                .domain
                .disks
                .iter()
                .filter(|d| !files.iter().any(|p| p.target == d.target))
                .filter(|d| !matches!(d.source, DiskSource::Empty))
                .map(|d| d.target.clone())
                .collect();
            let name = format!("virtkeep-{job_id}");
            // RBD and LVM snapshots are taken by separate calls: hold the guest still
            // around all of them (fsfreeze with --quiesce, else a short pause) so every
            // disk shares one instant. One LV alone is one atomic call.
            let calls = usize::from(!specs.is_empty())
                + rbds.len()
                + plan.disks.iter().filter(|d| d.lvm.is_some()).count();
            let hold = !rbds.is_empty() || calls > 1;
            let how = if quiesce {
                Hold::FsFreeze
            } else {
                Hold::Suspend
            };
            if hold {
                crate::hold::hold(host, &vm.uuid, job_dir, how)
                    .await
                    .map_err(|e| e.context("holding the guest still for its snapshots"))?;
            }
            let res = async {
                if !specs.is_empty() {
                    let specs: Vec<(&str, &str)> = specs
                        .iter()
                        .map(|(t, p)| (t.as_str(), p.as_str()))
                        .collect();
                    let excluded: Vec<&str> = excluded.iter().map(String::as_str).collect();
                    host.run(&host.virsh().snapshot_create_disk_only(
                        &vm.uuid,
                        &name,
                        &specs,
                        &excluded,
                        quiesce && !hold,
                    ))
                    .await
                    .map_err(|e| e.context("taking the disk-only snapshot"))?;
                }
                snap_rbds(host, &rbds, &name).await?;
                crate::lvm_backup::snapshot(host, &lvs, job_id).await
            }
            .await;
            if hold {
                crate::hold::release(host, &vm.uuid, job_dir, how)
                    .await
                    .map_err(|e| e.context("resuming the guest after its snapshots"))?;
            }
            res
        }
        FreezeMethod::OfflineOverlay => {
            if quiesce {
                return Err(Error::config(
                    "--quiesce applies to running VMs only; this one is shut off",
                ));
            }
            let rbds: Vec<&PlannedDisk> = plan.disks.iter().filter(|d| d.rbd.is_some()).collect();
            snap_rbds(host, &rbds, &format!("virtkeep-{job_id}")).await?;
            let frozen = crate::lvm_backup::snapshot(host, &lvs, job_id).await?;
            if !plan.disks.iter().any(PlannedDisk::is_file) {
                return Ok(frozen);
            }
            let mut sources = std::collections::BTreeMap::new();
            for d in plan.disks.iter().filter(|d| d.is_file()) {
                let overlay = overlay_path(&d.path, job_id);
                host.run(&cmd::qemu_img_create_overlay(&overlay, &d.path, &d.format))
                    .await?;
                host.run(
                    &RemoteCommand::new("chown")
                        .arg("--reference")
                        .arg(&d.path)
                        .arg("--")
                        .arg(&overlay),
                )
                .await?;
                host.run(
                    &RemoteCommand::new("chmod")
                        .arg("--reference")
                        .arg(&d.path)
                        .arg("--")
                        .arg(&overlay),
                )
                .await?;
                sources.insert(
                    d.target.clone(),
                    NewSource::File {
                        path: overlay,
                        format: "qcow2".into(),
                    },
                );
            }
            let rw = Rewrite {
                disk_sources: sources,
                ..Rewrite::default()
            };
            let xml = rewrite_domain(&vm.inactive_xml, &rw)?;
            define(host, &vm.uuid, &xml).await?;
            // A start between our read of the state and the define would run on the
            // bases we are about to read: check, and give up cleanly if it happened.
            let now = Vm::load(host, &vm.uuid).await?;
            if now.state.is_active() {
                let on_overlays = now.domain.disks.iter().all(|d| match &d.source {
                    DiskSource::File { path } => {
                        !plan.disks.iter().any(|p| p.is_file() && &p.path == path)
                    }
                    _ => true,
                });
                if !on_overlays {
                    return Err(Error::conflict(format!(
                        "{:?} was started while the backup was preparing its snapshot",
                        vm.name
                    ))
                    .hint("run the backup again: a running VM is snapshotted through libvirt"));
                }
            }
            Ok(frozen)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Domain {
        let path = format!(
            "{}/../virtkeep-libvirt/tests/fixtures/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let xml = std::fs::read_to_string(&path).expect("fixture");
        virtkeep_libvirt::parse_domain(&xml).expect("parses")
    }

    fn opts(exclude: &[&str]) -> BackupOptions {
        BackupOptions {
            exclude_disks: exclude.iter().map(|s| s.to_string()).collect(),
            ..BackupOptions::default()
        }
    }

    #[test]
    fn kvm_running_uses_live_snapshot_and_skips_media_and_shared_disks() {
        let plan = plan_backup(
            &fixture("kvm-multi-disk.xml"),
            DomainState::Running,
            &opts(&[]),
        )
        .expect("plan");
        assert_eq!(plan.method, FreezeMethod::LiveSnapshot);
        let disks: Vec<_> = plan.disks.iter().map(|d| d.target.as_str()).collect();
        assert_eq!(disks, ["vda", "vdb"]);
        assert_eq!(plan.disks[1].path, "/srv/vm disks/web01, data.img");
        let skipped: Vec<_> = plan.skipped.iter().map(|s| s.target.as_str()).collect();
        assert_eq!(skipped, ["vdc", "sda", "sdb"]);
    }

    #[test]
    fn stopped_vm_uses_overlays_and_excludes() {
        let plan = plan_backup(
            &fixture("kvm-multi-disk.xml"),
            DomainState::ShutOff,
            &opts(&["vdb"]),
        )
        .expect("plan");
        assert_eq!(plan.method, FreezeMethod::OfflineOverlay);
        assert_eq!(plan.disks.len(), 1);
        assert!(
            plan.skipped
                .iter()
                .any(|s| s.target == "vdb" && s.reason.contains("exclude"))
        );
        let err = plan_backup(
            &fixture("kvm-multi-disk.xml"),
            DomainState::ShutOff,
            &opts(&["vdz"]),
        )
        .expect_err("refused");
        assert_eq!(err.kind, ErrorKind::Config);
    }

    /// Xen: libvirt's Xen driver has no external disk snapshots, so a running Xen domain
    /// is refused with what to do; a stopped one uses the overlay method for qdisk file
    /// disks, and other Xen disk drivers are refused unless excluded.
    #[test]
    fn xen_choices() {
        let hvm = fixture("xen-hvm.xml");
        let err = plan_backup(&hvm, DomainState::Running, &opts(&[])).expect_err("refused");
        assert_eq!(err.kind, ErrorKind::Unsupported);
        assert!(
            err.hint
                .as_deref()
                .is_some_and(|h| h.contains("shut the domain down"))
        );

        let err = plan_backup(&hvm, DomainState::ShutOff, &opts(&["hdb"])).expect_err("refused");
        assert!(err.message.contains("xvdc"), "{}", err.message);

        let plan = plan_backup(&hvm, DomainState::ShutOff, &opts(&["hdb", "xvdc"])).expect("plan");
        assert_eq!(plan.method, FreezeMethod::OfflineOverlay);
        assert_eq!(
            plan.disks
                .iter()
                .map(|d| d.target.as_str())
                .collect::<Vec<_>>(),
            ["hda"]
        );
        assert!(plan.skipped.iter().any(|s| s.target == "hdc"));
        assert!(plan.skipped.iter().any(|s| s.target == "fda"));

        let pv = fixture("xen-pv.xml");
        let err = plan_backup(&pv, DomainState::ShutOff, &opts(&[])).expect_err("refused");
        assert_eq!(err.kind, ErrorKind::Unsupported);
    }

    /// An RBD name that could be read as an rbd option is refused with the disk and
    /// the name, before anything runs; the disk can be left out.
    #[test]
    fn rbd_names_that_look_like_options_are_refused() {
        let path = format!(
            "{}/../virtkeep-libvirt/tests/fixtures/rbd-auth.xml",
            env!("CARGO_MANIFEST_DIR")
        );
        let xml = std::fs::read_to_string(&path).expect("fixture");
        for bad in ["--keyring=/tmp/k/db", "vms/-db-ceph-root", "vms/a b"] {
            let xml = xml.replace("vms/db-ceph-root", bad);
            let dom = virtkeep_libvirt::parse_domain(&xml).expect("parses");
            let err = plan_backup(&dom, DomainState::Running, &opts(&["vdc", "vdd"]))
                .expect_err("refused");
            assert_eq!(err.kind, ErrorKind::Unsupported, "{err}");
            assert!(err.message.contains("disk vda: RBD"), "{err}");
            assert!(
                err.hint
                    .as_deref()
                    .is_some_and(|h| h.contains("--exclude-disk vda"))
            );
            let plan = plan_backup(&dom, DomainState::Running, &opts(&["vda", "vdc", "vdd"]))
                .expect("without vda");
            assert_eq!(plan.disks.len(), 1);
        }
    }
}
