//! The seed's kept-snapshot method, for running VMs whose disks cannot use the backup
//! API (raw files, or hosts without it), with `--mode incremental`: the newest overlay
//! stays under the running VM between backups; the next backup puts a new overlay on top,
//! reads only what the kept overlay holds (`qemu-img map`, depth 0: the guest's writes
//! since the last backup), patches that onto the parent's chunks, then commits the kept
//! overlay into the base (`blockcommit --top KEPT --base BASE`).
//!
//! `--mode full` of a VM whose chain is in use (a kept overlay under it) reads the base
//! whole and keeps its new overlay the same way, so the next incremental builds on it;
//! a full never starts a chain (running on an overlay is a cost the user asks for). Which overlays are kept is recorded on the host in
//! `/run/virtkeep/kept/UUID` (and in the manifest); healing leaves those alone while the
//! VM runs on them. Anything else (an auto backup, `--no-keep-base`, a stopped VM, a lost
//! record after a host reboot) commits them, and the next backup is a full with the
//! reason said.

use virtkeep_ssh::RemoteCommand;

use crate::error::{Error, ErrorKind, Result};
use crate::host::{HOST_STATE_DIR, Host};

fn path(uuid: &str) -> String {
    format!("{HOST_STATE_DIR}/kept/{uuid}")
}

/// The (target, overlay) pairs kept for this VM.
pub async fn read(host: &Host, uuid: &str) -> Result<Vec<(String, String)>> {
    let out = host
        .exec(&RemoteCommand::new("cat").arg(path(uuid)))
        .await?;
    if out.status != 0 {
        return Ok(Vec::new());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(t, p)| (t.to_string(), p.to_string()))
        .collect())
}

pub async fn write(host: &Host, uuid: &str, entries: &[(String, String)]) -> Result<()> {
    host.run(
        &RemoteCommand::new("mkdir")
            .arg("-p")
            .arg("-m")
            .arg("0700")
            .arg(format!("{HOST_STATE_DIR}/kept")),
    )
    .await?;
    let text: String = entries.iter().map(|(t, p)| format!("{t}\t{p}\n")).collect();
    host.upload(&path(uuid), text.as_bytes()).await
}

pub async fn clear(host: &Host, uuid: &str) -> Result<()> {
    host.run(&RemoteCommand::new("rm").arg("-f").arg("--").arg(path(uuid)))
        .await?;
    Ok(())
}

/// The guest ranges a kept overlay holds itself (not inherited from its backing).
pub async fn changed_ranges(host: &Host, overlay: &str) -> Result<Vec<(u64, u64)>> {
    let out = host
        .run_string(&virtkeep_libvirt::cmd::qemu_img_map_json(
            overlay,
            Some("qcow2"),
            true,
        ))
        .await?;
    let map = virtkeep_libvirt::parse::parse_qemu_img_map(&out)
        .map_err(|e| Error::new(ErrorKind::Remote, format!("qemu-img map {overlay}: {e}")))?;
    Ok(map
        .iter()
        .filter(|e| e.depth == 0)
        .map(|e| (e.start, e.length))
        .collect())
}

/// Merges the kept overlay below the running VM's new overlay into the base.
pub async fn commit_kept(
    host: &Host,
    uuid: &str,
    target: &str,
    kept: &str,
    base: &str,
) -> Result<()> {
    let cmd = host
        .virsh()
        .command("blockcommit")
        .arg("--domain")
        .arg(uuid)
        .arg("--path")
        .arg(target)
        .arg("--top")
        .arg(kept)
        .arg("--base")
        .arg(base)
        .arg("--wait");
    host.run_within(&cmd, crate::host::Deadline::Data)
        .await
        .map_err(|e| e.context(format!("committing kept overlay {kept} into {base}")))?;
    host.run(&RemoteCommand::new("rm").arg("-f").arg("--").arg(kept))
        .await?;
    Ok(())
}

/// Per file disk (by target): the backup id and the kept overlay an incremental builds
/// on; and, when none applies, why (for the manifest's reason).
pub async fn bases(
    host: &Host,
    repo: &virtkeep_repo::Repository,
    vm: &crate::vm::Vm,
    plan: &crate::backup::Plan,
) -> Result<(crate::rbd::Bases, Option<String>)> {
    let mut out = crate::rbd::Bases::new();
    let files: Vec<_> = plan.disks.iter().filter(|d| d.is_file()).collect();
    if files.is_empty() {
        return Ok((out, None));
    }
    let Some(manifest) = crate::store::latest_backup(repo, &host.name, &vm.name).await? else {
        return Ok((out, Some("full: no earlier backup; the new overlay stays under the VM for the next incremental".into())));
    };
    if crate::backup::base_removed_on_request(&manifest) {
        return Ok((
            out,
            Some(crate::backup::removed_on_request_reason(&manifest.id)),
        ));
    }
    let kept_now = read(host, &vm.uuid).await?;
    let mut problems = Vec::new();
    for d in files {
        let recorded = manifest.extra["kept"][&d.target].as_str() == Some(d.path.as_str());
        let on_host = kept_now.iter().any(|(t, p)| t == &d.target && p == &d.path);
        match (recorded, on_host) {
            (true, true) => {
                out.insert(d.target.clone(), (manifest.id.clone(), d.path.clone()));
            }
            // The VM runs on its own file: that backup kept no overlay of this disk.
            (false, _) if !d.path.contains(crate::host::OVERLAY_MARKER) => problems.push(format!(
                "{}: backup {} left no overlay under it (only --mode incremental starts the overlay chain; a backup in auto mode, of a stopped VM or by another method leaves none)",
                d.target, manifest.id
            )),
            _ => problems.push(format!(
                "{}: the overlay backup {} kept is no longer the VM's recorded top (VM stopped or redefined, host rebooted, or the record lost)",
                d.target, manifest.id
            )),
        }
    }
    let reason = (!problems.is_empty()).then(|| format!("full: {}", problems.join("; ")));
    Ok((out, reason))
}
