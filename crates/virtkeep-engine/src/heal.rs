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

use virtkeep_libvirt::parse::parse_qemu_img_info;
use virtkeep_libvirt::{DiskSource, NewSource, Rewrite, cmd, rewrite_domain};
use virtkeep_ssh::RemoteCommand;

use crate::error::{Error, ErrorKind, Result};
use crate::host::{Deadline, HOST_STATE_DIR, Host, OVERLAY_MARKER};
use crate::vm::Vm;

/// What healing did, or (dry run) would do.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct HealReport {
    pub vm: String,
    pub actions: Vec<String>,
}

/// The base image an overlay path of ours belongs to, when the path is one of ours.
pub fn overlay_base(path: &str) -> Option<&str> {
    let idx = path.rfind(OVERLAY_MARKER)?;
    let tail = &path[idx + OVERLAY_MARKER.len()..];
    if tail.is_empty() || tail.contains('/') {
        return None;
    }
    Some(&path[..idx])
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

const KILL_JOB_EXPORTS: &str = r#"for d in "$1"/"$2"-*; do
  [ -d "$d" ] || continue
  for p in "$d"/*.pid; do
    [ -f "$p" ] || continue
    pid=$(cat "$p")
    case "$pid" in ''|*[!0-9]*) continue;; esac
    case "$(tr '\0' ' ' < /proc/$pid/cmdline 2>/dev/null)" in *qemu-nbd*) kill "$pid";; esac
  done
  rm -rf "$d"
done"#;

/// Stops leftover exports of this VM's jobs (all of them, so call it under the VM lock).
pub async fn stop_job_exports(host: &Host, vm_uuid: &str) -> Result<()> {
    let cmd = RemoteCommand::new("sh")
        .arg("-c")
        .arg(KILL_JOB_EXPORTS)
        .arg("sh")
        .arg(format!("{HOST_STATE_DIR}/jobs"))
        .arg(vm_uuid);
    host.run(&cmd).await?;
    Ok(())
}

/// Whether any job dir of this VM exists on the host (a job runs, or a killed one left it).
async fn has_job_dirs(host: &Host, vm_uuid: &str) -> Result<bool> {
    let script = r#"for d in "$1"/"$2"-*; do [ -e "$d" ] && exit 0; done; exit 1"#;
    let cmd = RemoteCommand::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .arg(format!("{HOST_STATE_DIR}/jobs"))
        .arg(vm_uuid);
    Ok(host.exec(&cmd).await?.status == 0)
}

/// Heals one VM. The caller holds the VM lock.
pub async fn heal_vm(host: &Host, vm_uuid: &str, dry_run: bool) -> Result<HealReport> {
    heal_loaded(host, Vm::load(host, vm_uuid).await?, dry_run).await
}

/// [`heal_vm`] of a VM the caller has just loaded (each load costs a few `virsh` calls;
/// the VM is loaded again only after healing changed it).
pub async fn heal_loaded(host: &Host, mut vm: Vm, dry_run: bool) -> Result<HealReport> {
    let vm_uuid = vm.uuid.clone();
    let vm_uuid = vm_uuid.as_str();
    let mut report = HealReport {
        vm: vm.name.clone(),
        actions: Vec::new(),
    };

    // A paused start, a pull-mode job and exports of ours all live in a job dir of this
    // VM: with none (the usual case) their three checks, one a `virsh` call, are skipped.
    if !dry_run && has_job_dirs(host, vm_uuid).await? {
        if let Some(action) = crate::cbt_backup::undo_paused_start(host, vm_uuid).await? {
            report.actions.push(action);
        }
        if crate::cbt::abort_stale_job(host, vm_uuid).await? {
            report
                .actions
                .push("ended a backup job a killed run left on the VM".into());
        }
        // Before the job dirs (and their hold records) go with the exports below.
        report
            .actions
            .extend(crate::hold::undo_left_holds(host, vm_uuid).await?);
        stop_job_exports(host, vm_uuid).await?;
        if !report.actions.is_empty() {
            vm.reload(host).await?;
        }
    }

    // Kept overlays (the kept-snapshot incremental method) stay while the VM runs on
    // them; a stopped VM's are committed like any other.
    let kept = if vm.state.is_active() {
        crate::kept::read(host, vm_uuid).await?
    } else {
        if !dry_run {
            crate::kept::clear(host, vm_uuid).await?;
        }
        Vec::new()
    };
    let is_kept = |target: &str, path: &str| kept.iter().any(|(t, p)| t == target && p == path);

    // 2. Live disks on an overlay.
    if vm.state.is_active() {
        for (target, path) in file_sources(&vm.domain.disks) {
            let Some(base) = overlay_base(&path) else {
                continue;
            };
            if is_kept(&target, &path) {
                continue;
            }
            report.actions.push(format!(
                "blockcommit {target} from {path} into {base} and pivot"
            ));
            if !dry_run {
                commit_live_disk(host, vm_uuid, &target, base).await?;
            }
        }
    }

    // 3 + 4. The persistent definition.
    let inactive = virtkeep_libvirt::parse_domain(&vm.inactive_xml)?;
    let mut sources = BTreeMap::new();
    for (target, path) in file_sources(&inactive.disks) {
        let Some(base) = overlay_base(&path) else {
            continue;
        };
        if vm.state.is_active() && is_kept(&target, &path) {
            continue;
        }
        let base_format = backing_format(host, &path, base).await?;
        if !vm.state.is_active() && exists(host, &path).await? {
            report
                .actions
                .push(format!("qemu-img commit {path} into {base}"));
            if !dry_run {
                host.run_within(&cmd::qemu_img_commit(&path), Deadline::Data)
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
    if !sources.is_empty() {
        report
            .actions
            .push(format!("redefine {:?} on its base files", vm.name));
        if !dry_run {
            let rw = Rewrite {
                disk_sources: sources,
                drop_backing_store: true,
                ..Rewrite::default()
            };
            let xml = rewrite_domain(&vm.inactive_xml, &rw)?;
            define(host, vm_uuid, &xml).await?;
        }
    }

    // RBD snapshots of a killed run (not the recorded base of the next incremental).
    if let Some(ceph) = host.config.ceph_args() {
        for d in &vm.domain.disks {
            if let virtkeep_libvirt::Backend::Rbd { pool, image } = d.backend() {
                report
                    .actions
                    .extend(crate::rbd::heal_image(host, &ceph, &pool, &image, dry_run).await?);
            }
        }
    }

    // LVM snapshots of this VM's volumes, whichever job made them: no job of this VM
    // runs (the caller holds its lock), so each is a leftover.
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
    if !origins.is_empty() {
        let lvm_actions = if dry_run {
            crate::lvm::find_leftover_snapshots(host, &origins)
                .await
                .map(|l| l.into_iter().map(|(vg, n)| format!("{vg}/{n}")).collect())
        } else {
            crate::lvm::remove_leftover_snapshots(host, &origins).await
        };
        match lvm_actions {
            Ok(removed) => report.actions.extend(
                removed
                    .into_iter()
                    .map(|s| format!("remove LVM snapshot {s}")),
            ),
            // No LVM tools: a /dev/mapper path that only looked like an LV.
            Err(e) if e.kind == ErrorKind::Unsupported => {}
            Err(e) => return Err(e),
        }
    }

    // 5. Overlay files no definition refers to any more (against the definitions as
    // they are now: reloaded when a commit or redefine above changed them).
    if !dry_run && report.actions.iter().any(|a| !a.starts_with("remove ")) {
        vm.reload(host).await?;
    }
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
    for base in bases {
        for overlay in overlays_of(host, &base).await? {
            if referenced.contains(&overlay) {
                continue;
            }
            report.actions.push(format!("remove overlay {overlay}"));
            if !dry_run {
                host.run(&RemoteCommand::new("rm").arg("-f").arg("--").arg(&overlay))
                    .await?;
            }
        }
    }
    Ok(report)
}

/// Active commit of one disk into `base` (the image our overlay was put on, never
/// further down: without `--base` libvirt flattens the whole chain, which for a linked
/// clone writes the VM's data into the shared template), then pivot; also when a killed
/// run left a commit job behind (then it is pivoted or aborted and done again).
async fn commit_live_disk(host: &Host, uuid: &str, target: &str, base: &str) -> Result<()> {
    let commit = || {
        host.virsh()
            .blockcommit_active_pivot(uuid, target)
            .arg("--base")
            .arg(base)
    };
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
        let out = host
            .exec(&cmd::qemu_img_info_json(path, None, true))
            .await?;
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
    Ok(host
        .exec(&RemoteCommand::new("test").arg("-e").arg(path))
        .await?
        .status
        == 0)
}

/// virtkeep overlays of `base` that exist on the host.
pub async fn overlays_of(host: &Host, base: &str) -> Result<Vec<String>> {
    let (dir, file) = match base.rfind('/') {
        Some(i) => (&base[..i.max(1)], &base[i + 1..]),
        None => return Ok(Vec::new()),
    };
    let out = host
        .exec(
            &RemoteCommand::new("find")
                .arg(dir)
                .arg("-maxdepth")
                .arg("1")
                .arg("-type")
                .arg("f")
                .arg("-print0"),
        )
        .await?;
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

/// `virsh list --all --uuid`: every domain, addressed by UUID.
pub fn list_all_uuids(host: &Host) -> RemoteCommand {
    host.virsh().command("list").arg("--all").arg("--uuid")
}

/// `virsh define` of an XML document, uploaded to a private file first.
pub async fn define(host: &Host, vm_key: &str, xml: &str) -> Result<()> {
    let dir = host
        .job_dir(&format!("define-{}", uuid::Uuid::new_v4()))
        .await?;
    let path = format!("{dir}/domain.xml");
    host.upload(&path, xml.as_bytes()).await?;
    let res = host.run(&host.virsh().define(&path)).await;
    let _ = host
        .run(&RemoteCommand::new("rm").arg("-rf").arg("--").arg(&dir))
        .await;
    res.map(|_| ())
        .map_err(|e| e.context(format!("defining domain {vm_key}")))
}

/// How long `cleanup` waits for a VM's lock before skipping that VM.
pub const CLEANUP_LOCK_WAIT_SECS: u32 = 20;

/// Heals one VM (by name or UUID), waiting a while for a running job's lock.
pub async fn cleanup_vm(host: &Host, vm_key: &str, dry_run: bool) -> Result<HealReport> {
    let vm = Vm::find(host, vm_key).await?;
    let lock = host.lock_vm(&vm.uuid, CLEANUP_LOCK_WAIT_SECS).await?;
    let res = heal_vm(host, &vm.uuid, dry_run).await;
    lock.release().await;
    res
}

/// Heals every domain on the host that carries virtkeep leftovers; VMs whose lock is
/// held by a running job are skipped and said so.
pub async fn cleanup_host(host: &Host, dry_run: bool) -> Result<Vec<HealReport>> {
    let mut reports = cleanup_restores(host, dry_run).await?;
    let uuids = host.run_string(&list_all_uuids(host)).await?;
    for uuid in uuids.lines().map(str::trim).filter(|l| !l.is_empty()) {
        // A killed node's lock goes away once sshd has torn its session down (seconds);
        // a running backup's stays, and that VM is skipped.
        let lock = match host.lock_vm(uuid, CLEANUP_LOCK_WAIT_SECS).await {
            Ok(lock) => lock,
            Err(e) if e.kind == ErrorKind::Conflict => {
                reports.push(HealReport {
                    vm: uuid.to_string(),
                    actions: vec!["skipped: a job holds this VM's lock".into()],
                });
                continue;
            }
            Err(e) => return Err(e),
        };
        let res = heal_vm(host, uuid, dry_run).await;
        lock.release().await;
        let report = match res {
            Ok(r) => r,
            // Undefined between the listing and now: nothing of it to heal.
            Err(_) if host.exec(&host.virsh().domuuid(uuid)).await?.status != 0 => continue,
            Err(e) => return Err(e),
        };
        if !report.actions.is_empty() {
            reports.push(report);
        }
    }
    Ok(reports)
}

/// Finishes the restores killed on this host: exports stopped, temporaries removed (or,
/// once the swap had begun, swapped in). A restore whose lock is held still runs.
async fn cleanup_restores(host: &Host, dry_run: bool) -> Result<Vec<HealReport>> {
    use crate::restore::stage;
    let mut reports = Vec::new();
    for (dir, key) in stage::killed_jobs(host).await? {
        let key_ok = !key.is_empty()
            && !key.starts_with('.')
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !stage::is_restore_job_dir(&dir) || !key_ok {
            continue;
        }
        let vm = format!("restore job {}", dir.rsplit('/').next().unwrap_or(&dir));
        let lock = match host.lock_vm(&key, CLEANUP_LOCK_WAIT_SECS).await {
            Ok(lock) => lock,
            Err(e) if e.kind == ErrorKind::Conflict => {
                reports.push(HealReport {
                    vm,
                    actions: vec!["skipped: the restore is still running".into()],
                });
                continue;
            }
            Err(e) => return Err(e),
        };
        let res = stage::finish_killed(host, &dir, dry_run).await;
        lock.release().await;
        reports.push(HealReport { vm, actions: res? });
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::overlay_base;

    #[test]
    fn overlay_names_are_recognised() {
        assert_eq!(
            overlay_base("/img/a.qcow2.virtkeep-20260101T000000Z-ab12"),
            Some("/img/a.qcow2")
        );
        assert_eq!(overlay_base("/img/a.qcow2"), None);
        assert_eq!(overlay_base("/img/a.qcow2.virtkeep-"), None);
        assert_eq!(overlay_base("/img.virtkeep-x/a.qcow2"), None);
    }
}
