//! The kept-overlay method, for running VMs whose disks cannot use the backup API (raw
//! files, or hosts without it), with `--mode incremental`: the newest overlay stays under
//! the running VM between backups; the next backup puts a new overlay on top, reads only
//! what the kept overlay holds (`qemu-img map`, depth 0: the guest's writes since the last
//! backup), patches that onto the parent's chunks, then commits the kept overlay into the
//! base (`blockcommit --top KEPT --base BASE`).
//!
//! `--mode full` of a VM whose chain is in use (a kept overlay under it) reads the base
//! whole and keeps its new overlay the same way, so the next incremental builds on it; a
//! full never starts a chain (running on an overlay is a cost the user asks for). Which
//! overlays are kept is recorded on the host in `/run/virtkeep/kept/UUID` (and in the
//! manifest); healing leaves those alone while the VM runs on them. Anything else (an
//! auto backup, `--no-keep-base`, a stopped VM, a lost record after a host reboot)
//! commits them, and the next backup is a full with the reason said.

use std::collections::BTreeMap;

use async_trait::async_trait;

use super::file::Overlays;
use super::image::{ImageRead, export_image};
use super::job::Job;
use super::overlay::{base_of, clear_kept, overlay_path, read_kept, write_kept};
use super::strategy::{BaseSummary, DiskOut, Freeze, Strategy};
use crate::error::{Error, ErrorKind, Result};
use crate::export::ExportStats;
use crate::host::{Host, OVERLAY_MARKER};
use crate::plan::{BackupExtra, BaseOnHost, ModeRequest, PlannedDisk, removed_on_request_reason};

/// Before healing: whether a full continues a chain in use, and the record cleared
/// when this backup will not continue it (healing then commits the overlays).
/// `--mode incremental` starts and continues the chain of disks without a dirty bitmap;
/// a full continues one that is in use; any other backup returns the VM to its files.
pub async fn settle(host: &Host, uuid: &str, mode: ModeRequest) -> Result<bool> {
    let chain_in_use = mode == ModeRequest::Full && !read_kept(host, uuid).await?.is_empty();
    if mode != ModeRequest::Incremental {
        clear_kept(host, uuid).await?;
    }
    Ok(chain_in_use)
}

/// The overlay strategy of a running VM's file disks whose overlays stay as the next base.
pub struct Kept {
    files: Overlays,
    /// Read only what the kept overlays hold (`--mode incremental`).
    read_kept: bool,
    /// Leave this job's overlays under the VM.
    keep: bool,
    /// Per disk (target): the backup id and the kept overlay an incremental builds on.
    bases: BTreeMap<String, (String, String)>,
}

impl Kept {
    pub fn new(files: Overlays, mode: ModeRequest, base: BaseOnHost) -> Kept {
        Kept {
            files,
            read_kept: mode == ModeRequest::Incremental,
            keep: base == BaseOnHost::Keep,
            bases: BTreeMap::new(),
        }
    }

    /// The overlays this job leaves under the VM (target, path).
    fn kept_new(&self, job: &Job<'_>) -> BTreeMap<String, String> {
        if !self.keep {
            return BTreeMap::new();
        }
        self.files
            .disks
            .iter()
            .map(|d| (d.target.clone(), overlay_path(base_of(&d.path), &job.id)))
            .collect()
    }

    /// Per disk, whether the newest backup kept the overlay the VM runs on; and, when
    /// some have none, why (for the manifest's reason).
    async fn find_bases(&mut self, job: &Job<'_>) -> Result<BaseSummary> {
        let mut out = BaseSummary::default();
        if self.files.disks.is_empty() {
            return Ok(out);
        }
        let Some(manifest) =
            crate::store::latest_backup(job.repo, &job.host.name, &job.vm.name).await?
        else {
            out.problem = Some("full: no earlier backup; the new overlay stays under the VM for the next incremental".into());
            return Ok(out);
        };
        let extra = BackupExtra::of(&manifest);
        if extra.base_removed_on_request() {
            out.problem = Some(removed_on_request_reason(&manifest.id));
            return Ok(out);
        }
        let kept_now = read_kept(job.host, &job.vm.uuid).await?;
        let mut problems = Vec::new();
        for d in &self.files.disks {
            let recorded = extra.kept_overlay(&d.target) == Some(d.path.as_str());
            let on_host = kept_now.iter().any(|(t, p)| t == &d.target && p == &d.path);
            match (recorded, on_host) {
                (true, true) => {
                    self.bases
                        .insert(d.target.clone(), (manifest.id.clone(), d.path.clone()));
                }
                // The VM runs on its own file: that backup kept no overlay of this disk.
                (false, _) if !d.path.contains(OVERLAY_MARKER) => problems.push(format!(
                    "{}: backup {} left no overlay under it (only --mode incremental starts the overlay chain; a backup in auto mode, of a stopped VM or by another method leaves none)",
                    d.target, manifest.id
                )),
                _ => problems.push(format!(
                    "{}: the overlay backup {} kept is no longer the VM's recorded top (VM stopped or redefined, host rebooted, or the record lost)",
                    d.target, manifest.id
                )),
            }
        }
        out.based = self.bases.len();
        out.parent = (!self.bases.is_empty()).then(|| manifest.id.clone());
        out.problem = (!problems.is_empty()).then(|| format!("full: {}", problems.join("; ")));
        Ok(out)
    }
}

/// The guest ranges a kept overlay holds itself (not inherited from its backing).
async fn changed_ranges(host: &Host, overlay: &str) -> Result<Vec<(u64, u64)>> {
    let out = host
        .run_string(&virtkeep_libvirt::qemu_img::map_json(
            overlay,
            Some("qcow2"),
            true,
        ))
        .await?;
    let map = virtkeep_libvirt::qemu_img::parse_qemu_img_map(&out)
        .map_err(|e| Error::new(ErrorKind::Remote, format!("qemu-img map {overlay}: {e}")))?;
    Ok(map
        .iter()
        .filter(|e| e.depth == 0)
        .map(|e| (e.start, e.length))
        .collect())
}

/// Merges the kept overlay below the running VM's new overlay into the base.
async fn commit_kept(host: &Host, uuid: &str, target: &str, kept: &str, base: &str) -> Result<()> {
    let cmd = host.virsh().blockcommit(uuid, target, kept, base);
    host.run_within(&cmd, crate::host::Deadline::Data)
        .await
        .map_err(|e| e.context(format!("committing kept overlay {kept} into {base}")))?;
    host.run(&virtkeep_libvirt::coreutils::rm_f(kept)).await?;
    Ok(())
}

#[async_trait]
impl Strategy for Kept {
    fn owns(&self, disk: &PlannedDisk) -> bool {
        self.files.owns(disk)
    }

    fn freeze_calls(&self) -> usize {
        self.files.freeze_calls()
    }

    async fn freeze(&mut self, job: &Job<'_>, freeze: Freeze) -> Result<()> {
        self.files.freeze_disks(job, freeze).await
    }

    async fn bases(&mut self, job: &mut Job<'_>) -> Result<BaseSummary> {
        if !self.read_kept {
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
        let Some((parent, kept)) = self.bases.get(&disk.target) else {
            return self.files.export_whole(job, out, disk).await;
        };
        let read = ImageRead {
            disk,
            path: &disk.path,
            block_device: false,
            parent: Some(parent),
            ranges: Some(changed_ranges(job.host, kept).await?),
        };
        export_image(job, out, read).await
    }

    async fn publish(&self, job: &Job<'_>, extra: &mut BackupExtra) -> Result<()> {
        extra.kept = Some(self.kept_new(job));
        Ok(())
    }

    /// The kept overlays below the new ones are committed, and the new ones recorded.
    async fn after_publish(&mut self, job: &mut Job<'_>) -> Result<()> {
        if !self.keep {
            return Ok(());
        }
        for d in self
            .files
            .disks
            .iter()
            .filter(|d| self.bases.contains_key(&d.target))
        {
            commit_kept(job.host, &job.vm.uuid, &d.target, &d.path, base_of(&d.path)).await?;
        }
        let entries: Vec<(String, String)> = self.kept_new(job).into_iter().collect();
        write_kept(job.host, &job.vm.uuid, &entries).await
    }

    /// Nothing is kept after a failure (or when not asked): healing commits every overlay.
    async fn finish(&mut self, job: &Job<'_>, ok: bool) {
        if !ok || !self.keep {
            let _ = clear_kept(job.host, &job.vm.uuid).await;
        }
    }
}
