//! Ceph RBD disks: one `rbd snap create` per image (all or nothing, with the guest held
//! still so every disk shares the instant), read through `rbd export-diff` from the
//! snapshot the newest backup kept when it is still the image's recorded base; the new
//! snapshot is kept as the next base once the backup is published (see [`crate::rbd`]
//! for the host side).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use virtkeep_libvirt::rbd::CephArgs;

use super::job::Job;
use super::strategy::{BaseSummary, DiskOut, Freeze, Strategy};
use crate::error::Result;
use crate::export::ExportStats;
use crate::plan::{
    BackupExtra, BaseOnHost, DiskKind, ModeRequest, Plan, PlannedDisk, removed_on_request_reason,
};
use crate::rbd::{self as ops, DiffExport};
use crate::store::RepoSink;

/// One RBD disk of the job.
struct RbdDisk {
    target: String,
    pool: String,
    image: String,
}

/// The RBD snapshot strategy of a job's RBD disks.
pub struct Snapshots {
    disks: Vec<RbdDisk>,
    /// Per disk (target): the backup id and the kept snapshot an incremental builds on.
    bases: BTreeMap<String, (String, String)>,
}

impl Snapshots {
    pub fn new(plan: &Plan) -> Snapshots {
        let disks = plan
            .disks
            .iter()
            .filter_map(|d| match &d.kind {
                DiskKind::Rbd { pool, image } => Some(RbdDisk {
                    target: d.target.clone(),
                    pool: pool.clone(),
                    image: image.clone(),
                }),
                _ => None,
            })
            .collect();
        Snapshots {
            disks,
            bases: BTreeMap::new(),
        }
    }

    /// The snapshot the newest backup kept of each image, when it is still on the
    /// image, still recorded as its base, and the image has the same size; and, for the
    /// disks without one, why (for the manifest's reason).
    async fn find_bases(&mut self, job: &Job<'_>) -> Result<BaseSummary> {
        let mut out = BaseSummary::default();
        let Some(manifest) =
            crate::store::latest_backup(job.repo, &job.host.name, &job.vm.name).await?
        else {
            out.problem = Some("full: no earlier backup of this VM".into());
            return Ok(out);
        };
        let extra = BackupExtra::of(&manifest);
        if extra.base_removed_on_request() {
            out.problem = Some(removed_on_request_reason(&manifest.id));
            return Ok(out);
        }
        let ceph = ops::ceph(job.host)?;
        let mut problems = Vec::new();
        for d in &self.disks {
            match base_of_disk(job, &ceph, &manifest, &extra, d).await? {
                Ok(snap) => {
                    self.bases
                        .insert(d.target.clone(), (manifest.id.clone(), snap));
                }
                Err(problem) => problems.push(format!("{}: {problem}", d.target)),
            }
        }
        out.based = self.bases.len();
        out.parent = (!self.bases.is_empty()).then(|| manifest.id.clone());
        out.problem = (!problems.is_empty()).then(|| {
            format!(
                "full for RBD disks without a base of backup {} ({})",
                manifest.id,
                problems.join("; ")
            )
        });
        Ok(out)
    }
}

/// The snapshot of the disk's image that backup `manifest` kept, or why it cannot serve.
async fn base_of_disk(
    job: &Job<'_>,
    ceph: &CephArgs,
    manifest: &virtkeep_repo::Manifest,
    extra: &BackupExtra,
    d: &RbdDisk,
) -> Result<std::result::Result<String, String>> {
    let (host, pool, image) = (job.host, d.pool.as_str(), d.image.as_str());
    let Some(snap) = extra.rbd_base(&d.target) else {
        return Ok(Err("that backup kept no snapshot of it".into()));
    };
    let Some(old) = manifest.disks.iter().find(|m| m.spec.target == d.target) else {
        return Ok(Err("not in that backup".into()));
    };
    if old.spec.source != format!("{pool}/{image}") {
        return Ok(Err(format!("the disk was {} then", old.spec.source)));
    }
    if old.spec.size != ops::image_size(host, ceph, pool, image).await? {
        return Ok(Err("the image was resized".into()));
    }
    if ops::recorded_base(host, ceph, pool, image).await.as_deref() != Some(snap) {
        return Ok(Err(format!(
            "the image's recorded base is no longer {snap} (image replaced or metadata removed)"
        )));
    }
    if !ops::snapshots(host, ceph, pool, image)
        .await?
        .iter()
        .any(|s| s == snap)
    {
        return Ok(Err(format!(
            "snapshot {snap} no longer exists (deleted on the host, or the image was replaced)"
        )));
    }
    Ok(Ok(snap.to_string()))
}

#[async_trait]
impl Strategy for Snapshots {
    fn owns(&self, disk: &PlannedDisk) -> bool {
        matches!(disk.kind, DiskKind::Rbd { .. })
    }

    /// Read through `rbd export-diff`, never as an image.
    fn reads_image(&self) -> bool {
        false
    }

    fn freeze_calls(&self) -> usize {
        self.disks.len()
    }

    fn needs_hold(&self) -> bool {
        !self.disks.is_empty()
    }

    /// `rbd snap create` of every RBD disk; all or nothing.
    async fn freeze(&mut self, job: &Job<'_>, _freeze: Freeze) -> Result<()> {
        if self.disks.is_empty() {
            return Ok(());
        }
        let ceph = ops::ceph(job.host)?;
        let snap = job.snapshot_name();
        for (i, d) in self.disks.iter().enumerate() {
            if let Err(e) = ops::snap_create(job.host, &ceph, &d.pool, &d.image, &snap).await {
                for made in &self.disks[..i] {
                    let _ = ops::snap_rm(job.host, &ceph, &made.pool, &made.image, &snap).await;
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// `--mode full` looks for none.
    async fn bases(&mut self, job: &mut Job<'_>) -> Result<BaseSummary> {
        if job.opts.mode == ModeRequest::Full || self.disks.is_empty() {
            return Ok(BaseSummary::default());
        }
        self.find_bases(job).await
    }

    async fn export(
        &self,
        job: &Job<'_>,
        out: &DiskOut<'_>,
        disk: &PlannedDisk,
    ) -> Result<ExportStats> {
        let DiskKind::Rbd { pool, image } = &disk.kind else {
            return Err(crate::Error::domain("internal: not an RBD disk"));
        };
        let (host, repo) = (job.host, job.repo);
        let ceph = ops::ceph(host)?;
        let size = ops::image_size(host, &ceph, pool, image).await?;
        let (previous, from) = match self.bases.get(&disk.target) {
            Some((parent, base_snap)) => (
                Some(repo.fixed_index(parent, &disk.target).await?),
                Some((
                    base_snap.as_str(),
                    Arc::new(repo.disk_reader(parent, &disk.target).await?),
                )),
            ),
            None => (None, None),
        };
        let spec = disk.spec(size);
        let sink = Arc::new(RepoSink::new(
            out.writer.disk(spec, previous.as_ref()).await?,
        ));
        let snap = job.snapshot_name();
        let req = DiffExport {
            ceph: &ceph,
            pool,
            image,
            snap: &snap,
            from,
            size,
            vm: &job.vm.name,
            disk: &disk.target,
        };
        let st = ops::export(host, req, sink.clone(), &job.progress).await?;
        sink.finish().await?;
        Ok(st)
    }

    async fn publish(&self, job: &Job<'_>, extra: &mut BackupExtra) -> Result<()> {
        let keep = (job.opts.base == BaseOnHost::Keep).then(|| job.snapshot_name());
        extra.rbd = Some(
            self.disks
                .iter()
                .map(|d| (d.target.clone(), keep.clone()))
                .collect(),
        );
        Ok(())
    }

    /// Snapshot housekeeping happens as the manifest is published, before the VM is
    /// healed: the kept snapshot is then the recorded base, which healing keeps.
    async fn after_publish(&mut self, job: &mut Job<'_>) -> Result<()> {
        if self.disks.is_empty() {
            return Ok(());
        }
        let keep = (job.opts.base == BaseOnHost::Keep).then(|| job.snapshot_name());
        for d in &self.disks {
            let ceph = ops::ceph(job.host)?;
            ops::housekeep(job.host, &ceph, &d.pool, &d.image, keep.as_deref()).await?;
        }
        Ok(())
    }
}
