//! LVM disks in a backup: one `lvcreate -s` snapshot per logical volume, sized against
//! the VG's free space before anything is made, read through the same qemu-nbd path as a
//! raw image, checked for overflow before the backup is published, and removed by
//! healing (after success, failure, or a killed run).
//!
//! LVM keeps no change map, so an LVM "incremental" reads the whole snapshot and stores
//! only the chunks that changed: the previous backup's index is handed to the writer, so
//! unchanged chunks are recognised by their digest and never uploaded again.
//!
//! Thin LVs do better when the host has `thin_delta` (thin-provisioning-tools): the
//! thin snapshot of every backup (`--mode full` too) stays on the host, tagged
//! [`lvm::BASE_TAG`] and recorded in the manifest; the next backup asks the pool's
//! metadata which blocks differ between that base and its new snapshot and reads only
//! those, patched onto the parent's chunks. The base is replaced after each published
//! backup and dropped only by `--no-keep-base`; healing leaves tagged snapshots alone.

use std::collections::BTreeMap;

use async_trait::async_trait;

use super::image::{ImageRead, export_image};
use super::job::Job;
use super::strategy::{BaseSummary, DiskOut, Freeze, Strategy};
use crate::error::{Error, Result};
use crate::export::ExportStats;
use crate::host::Host;
use crate::lvm::{self, LvDisk, LvSnapshot, SnapshotRequest};
use crate::plan::{BackupExtra, DiskKind, LvmRecord, ModeRequest, Plan, PlannedDisk};

/// One LVM disk of a running job.
#[derive(Debug, Clone)]
pub struct FrozenLv {
    pub vg: String,
    pub lv: String,
    /// The thin pool of a thin LV (a restore recreates the LV thin in it).
    pub thin_pool: Option<String>,
    /// The snapshot this backup leaves on the host as the next incremental's base.
    pub kept: Option<String>,
    /// Origin size in bytes.
    pub size: u64,
    /// The snapshot the data is read from.
    pub snapshot: LvSnapshot,
}

impl FrozenLv {
    /// What the manifest records of it (`extra.lvm.TARGET`).
    pub fn record(&self) -> LvmRecord {
        LvmRecord {
            vg: self.vg.clone(),
            lv: self.lv.clone(),
            thin_pool: self.thin_pool.clone(),
            kept: self.kept.clone(),
        }
    }
}

/// The LVM disks of a job, by target.
pub type FrozenLvs = BTreeMap<String, FrozenLv>;

/// What [`prepare`] found and decided: the snapshots to make, all sizes checked.
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    requests: Vec<SnapshotRequest>,
    disks: Vec<(String, FrozenLv)>,
}

impl Prepared {
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }
}

/// Looks the LVs up (one `lvs` per VG) and sizes their snapshots from the host's
/// `[hosts.NAME.lvm]` settings; refuses when a VG lacks room or a thin pool is nearly
/// full. Nothing is created here, so a refusal leaves nothing behind.
pub async fn prepare(host: &Host, disks: &[PlannedDisk], job_id: &str) -> Result<Prepared> {
    let lvm_disks: Vec<(&PlannedDisk, &str, &str)> = disks
        .iter()
        .filter_map(|d| match &d.kind {
            DiskKind::Lvm { vg, lv } => Some((d, vg.as_str(), lv.as_str())),
            _ => None,
        })
        .collect();
    if lvm_disks.is_empty() {
        return Ok(Prepared::default());
    }
    let mut by_vg: BTreeMap<&str, Vec<virtkeep_libvirt::lvm::LvInfo>> = BTreeMap::new();
    for (_, vg, _) in &lvm_disks {
        if !by_vg.contains_key(vg) {
            by_vg.insert(vg, lvm::list_lvs(host, Some(vg)).await?);
        }
    }
    let mut infos = Vec::new();
    let mut out = Prepared::default();
    for (d, vg, lv) in &lvm_disks {
        let info = by_vg
            .get(vg)
            .and_then(|lvs| lvs.iter().find(|l| l.name == *lv))
            .ok_or_else(|| {
                Error::domain(format!(
                    "disk {} names the logical volume {vg}/{lv}, which host {} does not have",
                    d.target, host.name
                ))
                .hint("`lvs` on the host lists its logical volumes; fix the domain definition or exclude the disk with --exclude-disk")
            })?;
        if info.origin.is_some() && !info.is_thin() {
            return Err(Error::unsupported(format!(
                "disk {} is the LVM snapshot {vg}/{lv}: a snapshot of a snapshot is not supported",
                d.target
            ))
            .hint(format!("exclude it with --exclude-disk {}", d.target)));
        }
        let disk = LvDisk::from_info(info);
        let name = lvm::snapshot_name(vg, lv, job_id);
        out.disks.push((
            d.target.clone(),
            FrozenLv {
                vg: vg.to_string(),
                lv: lv.to_string(),
                thin_pool: if disk.thin {
                    info.pool_lv.clone()
                } else {
                    None
                },
                kept: None,
                size: disk.size,
                snapshot: LvSnapshot {
                    vg: vg.to_string(),
                    origin: lv.to_string(),
                    path: lvm::lv_path(vg, &name),
                    name,
                    thin: disk.thin,
                },
            },
        ));
        infos.push(disk);
    }
    let cfg = host.config.lvm.unwrap_or_default();
    let sizes = lvm::plan_snapshot_space(
        host,
        &infos,
        cfg.snapshot_share,
        cfg.snapshot_floor_mib.saturating_mul(1 << 20),
    )
    .await?;
    out.requests = SnapshotRequest::planned(&infos, &sizes);
    Ok(out)
}

/// Makes the planned snapshots (all or nothing). The caller holds the guest still when
/// other disks must share the instant.
pub async fn snapshot(host: &Host, prepared: &Prepared, job_id: &str) -> Result<FrozenLvs> {
    if prepared.is_empty() {
        return Ok(FrozenLvs::new());
    }
    let made = lvm::create_snapshots(host, &prepared.requests, job_id).await?;
    let mut out = FrozenLvs::new();
    for ((target, mut frozen), snap) in prepared.disks.iter().cloned().zip(made) {
        frozen.snapshot = snap;
        out.insert(target, frozen);
    }
    Ok(out)
}

/// Every snapshot still holds the backup instant (none overflowed while it was read).
pub async fn check_valid(host: &Host, frozen: &FrozenLvs) -> Result<()> {
    for f in frozen.values() {
        lvm::check_snapshot_valid(host, &f.snapshot).await?;
    }
    Ok(())
}

/// What thin_delta gives a backup: the changed ranges of each thin LV whose base (kept
/// by the parent backup) is still on the host, and why the others are read whole.
#[derive(Debug, Default)]
pub struct ThinDeltas {
    pub ranges: BTreeMap<String, Vec<(u64, u64)>>,
    pub read_whole: Vec<String>,
}

/// Changed ranges per target, for thin LVs whose base (kept by the parent backup) is
/// still on the host; also decides which thin snapshots this backup keeps (all of
/// them, on a host with thin_delta, unless `keep` is false: `--no-keep-base`).
pub async fn thin_deltas(
    host: &Host,
    frozen: &mut FrozenLvs,
    parent: Option<&virtkeep_repo::Manifest>,
    keep: bool,
) -> Result<ThinDeltas> {
    let mut out = ThinDeltas::default();
    if !keep || !frozen.values().any(|f| f.thin_pool.is_some()) {
        return Ok(out);
    }
    if !lvm::has_thin_delta(host).await? {
        return Ok(out);
    }
    for (target, f) in frozen.iter_mut() {
        let Some(pool) = f.thin_pool.clone() else {
            continue;
        };
        f.kept = Some(f.snapshot.name.clone());
        let Some(parent) = parent else { continue };
        match thin_base(host, parent, target, f).await? {
            Ok(base) => {
                let ranges =
                    lvm::thin_changed_ranges(host, &f.vg, &pool, &base, &f.snapshot.name).await?;
                out.ranges.insert(target.clone(), ranges);
            }
            Err(why) => out.read_whole.push(format!("{target}: {why}")),
        }
    }
    Ok(out)
}

/// The thin snapshot `parent` kept of this LV, when it can serve as the base, or why not.
async fn thin_base(
    host: &Host,
    parent: &virtkeep_repo::Manifest,
    target: &str,
    f: &FrozenLv,
) -> Result<std::result::Result<String, String>> {
    let extra = BackupExtra::of(parent);
    if extra.base_removed_on_request() {
        return Ok(Err(format!(
            "backup {} left no base on the host, as asked (--no-keep-base)",
            parent.id
        )));
    }
    let Some(base) = extra.lvm_base(target) else {
        return Ok(Err(format!(
            "backup {} kept no thin snapshot of it",
            parent.id
        )));
    };
    let same_size = parent
        .disks
        .iter()
        .any(|m| m.spec.target == target && m.spec.size == f.size);
    if !same_size {
        return Ok(Err("the LV was resized".into()));
    }
    let on_host = lvm::base_snapshots(host, &f.vg, &f.lv)
        .await?
        .iter()
        .any(|l| l.name == base);
    if !on_host {
        return Ok(Err(format!(
            "its base {base} is no longer on the host (removed, or the LV was replaced)"
        )));
    }
    Ok(Ok(base.to_string()))
}

/// After the backup is published: the kept thin snapshots become the bases (tagged),
/// older bases of the same LVs go.
pub async fn replace_bases(host: &Host, frozen: &FrozenLvs) -> Result<()> {
    for f in frozen.values().filter(|f| f.thin_pool.is_some()) {
        let old: Vec<LvSnapshot> = lvm::base_snapshots(host, &f.vg, &f.lv)
            .await?
            .into_iter()
            .filter(|l| Some(&l.name) != f.kept.as_ref())
            .map(|l| LvSnapshot {
                vg: f.vg.clone(),
                origin: f.lv.clone(),
                path: lvm::lv_path(&f.vg, &l.name),
                name: l.name,
                thin: true,
            })
            .collect();
        if let Some(kept) = &f.kept {
            lvm::set_base_tag(host, &f.vg, kept, true).await?;
        }
        lvm::remove_snapshots(host, &old).await?;
    }
    Ok(())
}

/// The newest earlier backup of this VM that has every LVM disk of `frozen` from the same
/// LV: its chunks are not stored again. `None` for a first backup.
pub async fn parent(
    host: &Host,
    repo: &virtkeep_repo::Repository,
    vm: &str,
    frozen: &FrozenLvs,
) -> Result<Option<virtkeep_repo::Manifest>> {
    if frozen.is_empty() {
        return Ok(None);
    }
    let Some(manifest) = crate::store::latest_backup(repo, &host.name, vm).await? else {
        return Ok(None);
    };
    let all = frozen.iter().all(|(target, f)| {
        manifest.disks.iter().any(|m| {
            &m.spec.target == target
                && m.spec.backend == virtkeep_repo::Storage::Lvm
                && m.spec.source == lvm::lv_path(&f.vg, &f.lv)
        })
    });
    Ok(all.then_some(manifest))
}

/// How an LVM incremental read its volumes, for the reason.
fn lvm_reason(thin: &ThinDeltas, lvs: usize) -> String {
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

/// The LVM snapshot strategy of a job's LVM disks.
pub struct Snapshots {
    disks: Vec<PlannedDisk>,
    prepared: Prepared,
    frozen: FrozenLvs,
    /// The backup whose chunks (and kept thin snapshots) this one builds on.
    parent: Option<virtkeep_repo::Manifest>,
    thin: ThinDeltas,
}

impl Snapshots {
    pub fn new(plan: &Plan) -> Snapshots {
        Snapshots {
            disks: plan
                .disks
                .iter()
                .filter(|d| matches!(d.kind, DiskKind::Lvm { .. }))
                .cloned()
                .collect(),
            prepared: Prepared::default(),
            frozen: FrozenLvs::new(),
            parent: None,
            thin: ThinDeltas::default(),
        }
    }
}

#[async_trait]
impl Strategy for Snapshots {
    fn owns(&self, disk: &PlannedDisk) -> bool {
        matches!(disk.kind, DiskKind::Lvm { .. })
    }

    /// LV sizes are checked before anything is made: a refusal leaves nothing behind.
    async fn prepare(&mut self, job: &Job<'_>) -> Result<()> {
        self.prepared = prepare(job.host, &self.disks, &job.id).await?;
        Ok(())
    }

    fn freeze_calls(&self) -> usize {
        self.disks.len()
    }

    async fn freeze(&mut self, job: &Job<'_>, _freeze: Freeze) -> Result<()> {
        self.frozen = snapshot(job.host, &self.prepared, &job.id).await?;
        Ok(())
    }

    async fn bases(&mut self, job: &mut Job<'_>) -> Result<BaseSummary> {
        if job.opts.mode != ModeRequest::Full {
            self.parent = parent(job.host, job.repo, &job.vm.name, &self.frozen).await?;
        }
        let keep = job.opts.base == crate::plan::BaseOnHost::Keep;
        self.thin = match thin_deltas(job.host, &mut self.frozen, self.parent.as_ref(), keep).await
        {
            Ok(r) => r,
            Err(e) => {
                job.warn(format!(
                    "thin_delta failed, the thin LVs are read whole: {e}"
                ));
                ThinDeltas::default()
            }
        };
        let Some(parent) = &self.parent else {
            return Ok(BaseSummary::default());
        };
        Ok(BaseSummary {
            parent: Some(parent.id.clone()),
            based: self.frozen.len(),
            problem: None,
            detail: Some(lvm_reason(&self.thin, self.frozen.len())),
        })
    }

    /// An LVM disk is read from its snapshot, as a block device.
    async fn export(
        &self,
        job: &Job<'_>,
        out: &DiskOut<'_>,
        disk: &PlannedDisk,
    ) -> Result<ExportStats> {
        let frozen = self.frozen.get(&disk.target).ok_or_else(|| {
            Error::domain(format!("internal: LVM disk {} was not frozen", disk.target))
        })?;
        let parent = self.parent.as_ref().map(|p| p.id.as_str());
        let read = ImageRead {
            disk,
            path: &frozen.snapshot.path,
            block_device: true,
            parent,
            ranges: parent.and(self.thin.ranges.get(&disk.target).cloned()),
        };
        export_image(job, out, read).await
    }

    /// An overflowed snapshot no longer holds the instant: nothing of it is published.
    async fn publish(&self, job: &Job<'_>, extra: &mut BackupExtra) -> Result<()> {
        check_valid(job.host, &self.frozen).await?;
        extra.lvm = Some(
            self.frozen
                .iter()
                .map(|(t, f)| (t.clone(), f.record()))
                .collect(),
        );
        Ok(())
    }

    async fn after_publish(&mut self, job: &mut Job<'_>) -> Result<()> {
        if let Err(e) = replace_bases(job.host, &self.frozen).await {
            job.warnings.push(format!(
                "the backup is stored, but its thin snapshots could not be kept as the next base (the next backup reads them whole): {e}"
            ));
        }
        Ok(())
    }
}
