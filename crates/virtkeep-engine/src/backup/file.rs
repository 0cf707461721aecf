//! File disks frozen with a qcow2 overlay: one atomic `virsh snapshot-create-as
//! --disk-only` for a running VM, or `qemu-img create` overlays and the domain
//! redefined on them for a stopped one. The frozen base is read whole; healing commits
//! the overlays back at the end of the job.

use std::collections::BTreeMap;

use async_trait::async_trait;
use virtkeep_libvirt::{DiskSource, NewSource, Rewrite, coreutils, qemu_img, rewrite_domain};

use super::image::{ImageRead, export_image};
use super::job::Job;
use super::overlay::{base_of, clear_kept, overlay_path};
use super::strategy::{BaseSummary, DiskOut, Freeze, Strategy};
use crate::define::define;
use crate::error::{Error, Result};
use crate::export::ExportStats;
use crate::plan::{BackupExtra, Plan, PlannedDisk};
use crate::vm::Vm;

/// The overlay strategy of a job's file disks.
pub struct Overlays {
    pub disks: Vec<PlannedDisk>,
}

impl Overlays {
    pub fn new(plan: &Plan) -> Overlays {
        Overlays {
            disks: plan.disks.iter().filter(|d| d.is_file()).cloned().collect(),
        }
    }

    /// One disk read whole from its frozen base.
    pub async fn export_whole(
        &self,
        job: &Job<'_>,
        out: &DiskOut<'_>,
        disk: &PlannedDisk,
    ) -> Result<ExportStats> {
        let read = ImageRead {
            disk,
            path: &disk.path,
            block_device: false,
            parent: None,
            ranges: None,
        };
        export_image(job, out, read).await
    }

    /// Running VM: one atomic disk-only snapshot of every file disk.
    async fn snapshot_live(&self, job: &Job<'_>, held: bool) -> Result<()> {
        let specs: Vec<(String, String)> = self
            .disks
            .iter()
            .map(|d| (d.target.clone(), overlay_path(base_of(&d.path), &job.id)))
            .collect();
        let excluded: Vec<&str> = job
            .vm
            .domain
            .disks
            .iter()
            .filter(|d| !self.disks.iter().any(|p| p.target == d.target))
            .filter(|d| !matches!(d.source, DiskSource::Empty))
            .map(|d| d.target.as_str())
            .collect();
        let specs: Vec<(&str, &str)> = specs
            .iter()
            .map(|(t, p)| (t.as_str(), p.as_str()))
            .collect();
        let quiesce = job.opts.quiesce && !held;
        let snapshot = job.host.virsh().snapshot_create_disk_only(
            &job.vm.uuid,
            &job.snapshot_name(),
            &specs,
            &excluded,
            quiesce,
        );
        job.host
            .run(&snapshot)
            .await
            .map_err(|e| e.context("taking the disk-only snapshot"))?;
        Ok(())
    }

    /// Stopped VM: an overlay per disk, owned like its base, and the domain redefined
    /// on them, so that a start during the backup writes into the overlays.
    async fn overlay_offline(&self, job: &Job<'_>) -> Result<()> {
        let host = job.host;
        let mut sources = BTreeMap::new();
        for d in &self.disks {
            let overlay = overlay_path(&d.path, &job.id);
            host.run(&qemu_img::create_overlay(&overlay, &d.path, &d.format))
                .await?;
            host.run(&coreutils::chown_like(&d.path, &overlay)).await?;
            host.run(&coreutils::chmod_like(&d.path, &overlay)).await?;
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
        let xml = rewrite_domain(&job.vm.inactive_xml, &rw)?;
        define(host, &job.vm.uuid, &xml).await?;
        self.check_not_started(job).await
    }

    /// A start between our read of the state and the define would run on the bases we
    /// are about to read: check, and give up cleanly if it happened.
    async fn check_not_started(&self, job: &Job<'_>) -> Result<()> {
        let now = Vm::load(job.host, &job.vm.uuid).await?;
        if !now.state.is_active() {
            return Ok(());
        }
        let on_overlays = now.domain.disks.iter().all(|d| match &d.source {
            DiskSource::File { path } => !self.disks.iter().any(|p| &p.path == path),
            _ => true,
        });
        if !on_overlays {
            return Err(Error::conflict(format!(
                "{:?} was started while the backup was preparing its snapshot",
                job.vm.name
            ))
            .hint("run the backup again: a running VM is snapshotted through libvirt"));
        }
        Ok(())
    }

    pub async fn freeze_disks(&self, job: &Job<'_>, freeze: Freeze) -> Result<()> {
        match (self.disks.is_empty(), freeze.live) {
            (true, _) => Ok(()),
            (false, true) => self.snapshot_live(job, freeze.held).await,
            (false, false) => self.overlay_offline(job).await,
        }
    }
}

#[async_trait]
impl Strategy for Overlays {
    fn owns(&self, disk: &PlannedDisk) -> bool {
        disk.is_file()
    }

    fn freeze_calls(&self) -> usize {
        usize::from(!self.disks.is_empty())
    }

    async fn freeze(&mut self, job: &Job<'_>, freeze: Freeze) -> Result<()> {
        self.freeze_disks(job, freeze).await
    }

    async fn bases(&mut self, _job: &mut Job<'_>) -> Result<BaseSummary> {
        Ok(BaseSummary::default())
    }

    async fn export(
        &self,
        job: &Job<'_>,
        out: &DiskOut<'_>,
        disk: &PlannedDisk,
    ) -> Result<ExportStats> {
        self.export_whole(job, out, disk).await
    }

    async fn publish(&self, _job: &Job<'_>, extra: &mut BackupExtra) -> Result<()> {
        extra.kept = Some(BTreeMap::new());
        Ok(())
    }

    /// No overlay stays: nothing is recorded as kept, and healing commits them all.
    async fn finish(&mut self, job: &Job<'_>, _ok: bool) {
        let _ = clear_kept(job.host, &job.vm.uuid).await;
    }
}
