//! Returning a VM to its own files: the one procedure that ends every backup and that
//! `virtkeep cleanup` runs after a killed one.
//!
//! It derives what to do from the host's state alone (never from node-side memory),
//! so it heals equally after success, failure, a dropped link or SIGKILL of the node:
//! 1. stop the qemu-nbd exports of this VM's jobs and remove their state dirs;
//! 2. a running VM whose disk runs on a virtkeep overlay: active blockcommit + pivot;
//! 3. a stopped VM whose definition names an overlay: `qemu-img commit` it (it holds
//!    whatever the guest wrote if it was started during the backup);
//! 4. a persistent definition naming an overlay: redefine it on the base files;
//! 5. overlay files nothing refers to any more: remove.

use std::collections::BTreeMap;

use virtkeep_libvirt::qemu_img::{self, parse_qemu_img_info};
use virtkeep_libvirt::{DiskSource, NewSource, Rewrite, coreutils, qemu_nbd, rewrite_domain, sh};

use crate::backup::overlay::{clear_kept, overlay_base, read_kept};
use crate::define::define;
use crate::error::{Error, ErrorKind, Result};
use crate::host::{Deadline, HOST_STATE_DIR, Host, OVERLAY_MARKER};
use crate::vm::Vm;

/// What healing did, or (dry run) would do.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct HealReport {
    pub vm: String,
    pub actions: Vec<String>,
}

fn file_sources(xml_disks: &[virtkeep_libvirt::Disk]) -> Vec<(String, String)> {
    xml_disks
        .iter()
        .filter_map(|d| match &d.source {
            DiskSource::File { path } => Some((d.target.clone(), path.clone())),
            _ => None,
        })
        .collect()
}

/// Stops leftover exports of this VM's jobs (all of them, so call it under the VM lock).
pub async fn stop_job_exports(host: &Host, vm_uuid: &str) -> Result<()> {
    let cmd = qemu_nbd::kill_job_exports(&format!("{HOST_STATE_DIR}/jobs"), vm_uuid);
    host.run(&cmd).await?;
    Ok(())
}

/// Whether any job dir of this VM exists on the host (a job runs, or a killed one left it).
async fn has_job_dirs(host: &Host, vm_uuid: &str) -> Result<bool> {
    let cmd = sh::has_job_dirs(&format!("{HOST_STATE_DIR}/jobs"), vm_uuid);
    Ok(host.exec(&cmd).await?.status == 0)
}

/// Heals one VM. The caller holds the VM lock.
pub async fn heal_vm(host: &Host, vm_uuid: &str, dry_run: bool) -> Result<HealReport> {
    heal_loaded(host, Vm::load(host, vm_uuid).await?, dry_run).await
}

/// [`heal_vm`] of a VM the caller has just loaded (each load costs a few `virsh` calls;
/// the VM is loaded again only after healing changed it).
pub async fn heal_loaded(host: &Host, mut vm: Vm, dry_run: bool) -> Result<HealReport> {
    let mut actions = Vec::new();
    if !dry_run {
        actions.extend(end_jobs(host, &vm.uuid).await?);
        if !actions.is_empty() {
            vm.reload(host).await?;
        }
    }
    // Kept overlays (the kept-overlay incremental method) stay while the VM runs on
    // them; a stopped VM's are committed like any other.
    let kept = if vm.state.is_active() {
        read_kept(host, &vm.uuid).await?
    } else {
        if !dry_run {
            clear_kept(host, &vm.uuid).await?;
        }
        Vec::new()
    };
    if vm.state.is_active() {
        actions.extend(commit_live(host, &vm, &kept, dry_run).await?);
    }
    let inactive = virtkeep_libvirt::parse_domain(&vm.inactive_xml)?;
    actions.extend(redefine_on_bases(host, &vm, &inactive, &kept, dry_run).await?);
    actions.extend(rbd_leftovers(host, &vm, dry_run).await?);
    actions.extend(lvm_leftovers(host, &vm, &inactive, dry_run).await?);
    // 5. Overlay files no definition refers to any more (against the definitions as
    // they are now: reloaded when a commit or redefine above changed them).
    if !dry_run && actions.iter().any(|a| !a.starts_with("remove ")) {
        vm.reload(host).await?;
    }
    actions.extend(remove_unreferenced(host, &vm, dry_run).await?);
    Ok(HealReport {
        vm: vm.name.clone(),
        actions,
    })
}

/// A paused start, a pull-mode job and exports of ours all live in a job dir of this
/// VM: with none (the usual case) their three checks, one a `virsh` call, are skipped.
async fn end_jobs(host: &Host, vm_uuid: &str) -> Result<Vec<String>> {
    let mut actions = Vec::new();
    if !has_job_dirs(host, vm_uuid).await? {
        return Ok(actions);
    }
    if let Some(action) = crate::cbt::undo_paused_start(host, vm_uuid).await? {
        actions.push(action);
    }
    if crate::cbt::abort_stale_job(host, vm_uuid).await? {
        actions.push("ended a backup job a killed run left on the VM".into());
    }
    // Before the job dirs (and their hold records) go with the exports below.
    actions.extend(crate::hold::undo_left_holds(host, vm_uuid).await?);
    stop_job_exports(host, vm_uuid).await?;
    Ok(actions)
}

fn is_kept(kept: &[(String, String)], target: &str, path: &str) -> bool {
    kept.iter().any(|(t, p)| t == target && p == path)
}

/// 2. Live disks on an overlay (not a kept one): active commit and pivot.
async fn commit_live(
    host: &Host,
    vm: &Vm,
    kept: &[(String, String)],
    dry_run: bool,
) -> Result<Vec<String>> {
    let mut actions = Vec::new();
    for (target, path) in file_sources(&vm.domain.disks) {
        let Some(base) = overlay_base(&path) else {
            continue;
        };
        if is_kept(kept, &target, &path) {
            continue;
        }
        actions.push(format!(
            "blockcommit {target} from {path} into {base} and pivot"
        ));
        if !dry_run {
            commit_live_disk(host, &vm.uuid, &target, base).await?;
        }
    }
    Ok(actions)
}

/// 3 + 4. The persistent definition: a stopped VM's overlays committed, and the
/// definition put back on the base files.
async fn redefine_on_bases(
    host: &Host,
    vm: &Vm,
    inactive: &virtkeep_libvirt::Domain,
    kept: &[(String, String)],
    dry_run: bool,
) -> Result<Vec<String>> {
    let mut actions = Vec::new();
    let mut sources = BTreeMap::new();
    for (target, path) in file_sources(&inactive.disks) {
        let Some(base) = overlay_base(&path) else {
            continue;
        };
        if vm.state.is_active() && is_kept(kept, &target, &path) {
            continue;
        }
        let base_format = backing_format(host, &path, base).await?;
        if !vm.state.is_active() && exists(host, &path).await? {
            actions.push(format!("qemu-img commit {path} into {base}"));
            if !dry_run {
                host.run_within(&qemu_img::commit(&path), Deadline::Data)
                    .await
                    .map_err(|e| e.context(format!("committing overlay {path}")))?;
            }
        }
        sources.insert(
            target,
            NewSource::File {
                path: base.to_string(),
                format: base_format,
            },
        );
    }
    if sources.is_empty() {
        return Ok(actions);
    }
    actions.push(format!("redefine {:?} on its base files", vm.name));
    if !dry_run {
        let rw = Rewrite {
            disk_sources: sources,
            drop_backing_store: true,
            ..Rewrite::default()
        };
        let xml = rewrite_domain(&vm.inactive_xml, &rw)?;
        define(host, &vm.uuid, &xml).await?;
    }
    Ok(actions)
}

/// RBD snapshots of a killed run (not the recorded base of the next incremental).
async fn rbd_leftovers(host: &Host, vm: &Vm, dry_run: bool) -> Result<Vec<String>> {
    let mut actions = Vec::new();
    let Some(ceph) = host.config.ceph_args() else {
        return Ok(actions);
    };
    for d in &vm.domain.disks {
        if let virtkeep_libvirt::Backend::Rbd { pool, image } = d.backend() {
            actions.extend(crate::rbd::heal_image(host, &ceph, &pool, &image, dry_run).await?);
        }
    }
    Ok(actions)
}

/// LVM snapshots of this VM's volumes, whichever job made them: no job of this VM runs
/// (the caller holds its lock), so each is a leftover.
async fn lvm_leftovers(
    host: &Host,
    vm: &Vm,
    inactive: &virtkeep_libvirt::Domain,
    dry_run: bool,
) -> Result<Vec<String>> {
    let mut origins: Vec<(String, String)> = vm
        .domain
        .disks
        .iter()
        .chain(&inactive.disks)
        .filter_map(|d| match d.backend() {
            virtkeep_libvirt::Backend::Lvm { vg, lv } => Some((vg, lv)),
            _ => None,
        })
        .collect();
    origins.sort();
    origins.dedup();
    if origins.is_empty() {
        return Ok(Vec::new());
    }
    let removed = if dry_run {
        crate::lvm::find_leftover_snapshots(host, &origins)
            .await
            .map(|l| l.into_iter().map(|(vg, n)| format!("{vg}/{n}")).collect())
    } else {
        crate::lvm::remove_leftover_snapshots(host, &origins).await
    };
    match removed {
        Ok(removed) => Ok(removed
            .into_iter()
            .map(|s| format!("remove LVM snapshot {s}"))
            .collect()),
        // No LVM tools: a /dev/mapper path that only looked like an LV.
        Err(e) if e.kind == ErrorKind::Unsupported => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// 5. Overlay files of the VM's images that no definition refers to.
async fn remove_unreferenced(host: &Host, vm: &Vm, dry_run: bool) -> Result<Vec<String>> {
    let inactive = virtkeep_libvirt::parse_domain(&vm.inactive_xml)?;
    let referenced: Vec<String> = file_sources(&vm.domain.disks)
        .into_iter()
        .chain(file_sources(&inactive.disks))
        .map(|(_, p)| p)
        .collect();
    let mut bases: Vec<String> = referenced
        .iter()
        .map(|p| overlay_base(p).unwrap_or(p).to_string())
        .collect();
    bases.sort();
    bases.dedup();
    let mut actions = Vec::new();
    for base in bases {
        for overlay in overlays_of(host, &base).await? {
            if referenced.contains(&overlay) {
                continue;
            }
            actions.push(format!("remove overlay {overlay}"));
            if !dry_run {
                host.run(&coreutils::rm_f(&overlay)).await?;
            }
        }
    }
    Ok(actions)
}

/// Active commit of one disk into `base` (the image our overlay was put on, never
/// further down: without `--base` libvirt flattens the whole chain, which for a linked
/// clone writes the VM's data into the shared template), then pivot; also when a killed
/// run left a commit job behind (then it is pivoted or aborted and done again).
async fn commit_live_disk(host: &Host, uuid: &str, target: &str, base: &str) -> Result<()> {
    let commit = || host.virsh().blockcommit_active_pivot(uuid, target, base);
    let out = host.exec_within(&commit(), Deadline::Data).await?;
    if out.status == 0 {
        return Ok(());
    }
    let first = String::from_utf8_lossy(&out.stderr).trim().to_string();
    tracing::warn!(
        disk = target,
        "blockcommit failed ({first}); looking for a leftover block job"
    );
    // A job left by a killed node: pivot it if it is ready, otherwise abort and redo.
    let pivot = host
        .exec(&host.virsh().blockjob_pivot(uuid, target))
        .await?;
    if pivot.status == 0 {
        return Ok(());
    }
    let _ = host
        .exec(&host.virsh().blockjob_abort(uuid, target))
        .await?;
    let again = host.exec_within(&commit(), Deadline::Data).await?;
    if again.status == 0 {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Remote,
        format!(
            "could not commit disk {target} back into its base: {}",
            String::from_utf8_lossy(&again.stderr).trim()
        ),
    )
    .hint("the VM still runs on a virtkeep overlay, which is safe; run `virtkeep cleanup HOST` again, or `virsh blockcommit DOMAIN DISK --active --pivot --base BASE` by hand"))
}

async fn backing_format(host: &Host, overlay: &str, base: &str) -> Result<String> {
    for path in [overlay, base] {
        let out = host.exec(&qemu_img::info_json(path, None, true)).await?;
        if out.status != 0 {
            continue;
        }
        let Ok(info) = parse_qemu_img_info(&String::from_utf8_lossy(&out.stdout)) else {
            continue;
        };
        if path == overlay {
            if let Some(f) = info.backing_format {
                return Ok(f);
            }
        } else {
            return Ok(info.format);
        }
    }
    Ok("raw".to_string())
}

async fn exists(host: &Host, path: &str) -> Result<bool> {
    Ok(host.exec(&coreutils::exists(path)).await?.status == 0)
}

/// virtkeep overlays of `base` that exist on the host.
pub async fn overlays_of(host: &Host, base: &str) -> Result<Vec<String>> {
    let (dir, file) = match base.rfind('/') {
        Some(i) => (&base[..i.max(1)], &base[i + 1..]),
        None => return Ok(Vec::new()),
    };
    let out = host.exec(&coreutils::list_files(dir)).await?;
    let prefix = format!("{file}{OVERLAY_MARKER}");
    Ok(out
        .stdout
        .split(|b| *b == 0)
        .filter_map(|p| std::str::from_utf8(p).ok())
        .filter(|p| {
            p.rsplit('/')
                .next()
                .is_some_and(|name| name.starts_with(&prefix))
        })
        .filter(|p| overlay_base(p).is_some())
        .map(str::to_string)
        .collect())
}
