//! Changed-block tracking through libvirt's backup API: checkpoints (persistent dirty
//! bitmaps in the qcow2 images) and `virsh backup-begin` in pull mode, whose NBD server
//! listens on a unix socket on the host that the node reaches through SSH; no port is
//! opened on the host.
//!
//! Chain health: the checkpoint a backup was taken at is recorded in its manifest with
//! the VM's UUID and disk sizes. The next backup is incremental only when that
//! checkpoint still exists on the host, belongs to the same VM and the disks are
//! unchanged; otherwise (VM redefined, checkpoint deleted, disk restored or resized,
//! bitmap lost in a host crash) it is a full backup with the reason recorded. An
//! incremental never depends on anything but its parent's index, so a broken chain
//! costs one full read, never a wrong restore.

use virtkeep_libvirt::{coreutils, sh, virsh};

use crate::error::Result;
use crate::host::{HOST_STATE_DIR, Host};

/// Prefix of the checkpoints virtkeep creates (others' checkpoints are left alone).
pub const CHECKPOINT_PREFIX: &str = "virtkeep-";

pub use crate::plan::CbtRecord;

/// The backup an incremental builds on.
pub struct Base {
    pub id: String,
    pub record: CbtRecord,
}

/// Where the host keeps the answer of the last capability probe (tmpfs: a reboot, which
/// may change device permissions, re-probes).
const CAPS_CACHE: &str = "/run/virtkeep/caps-backup-api";

/// The cached answer in the output of [`sh::installation_key_and_cache`] (a fingerprint
/// of the host's libvirt and QEMU installation, then the cached answer), when it belongs to the
/// installation the host has now.
pub fn cached_backup_api(out: &str) -> Option<bool> {
    let mut lines = out.lines();
    let key = lines.next()?.trim();
    let (cached_key, answer) = lines.next()?.split_once('\t')?;
    if key.is_empty() || cached_key != key {
        return None;
    }
    match answer {
        "yes" => Some(true),
        "no" => Some(false),
        _ => None,
    }
}

/// Whether the host's libvirt offers the backup API. `virsh domcapabilities` can take
/// seconds (libvirt re-probes QEMU on every call on some hosts), and a host's answer only
/// changes with its libvirt or QEMU: it is asked once per installation and the answer
/// kept on the host; `refresh` (from `host check`) asks again.
pub async fn backup_api_supported(host: &Host, refresh: bool) -> bool {
    let probe = sh::installation_key_and_cache(CAPS_CACHE);
    let Ok(out) = host.exec(&probe).await else {
        return false;
    };
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    if !refresh && let Some(answer) = cached_backup_api(&out) {
        return answer;
    }
    let answer = match host.exec(&host.virsh().domcapabilities(None)).await {
        Ok(out) if out.status == 0 => {
            virsh::parse_domcapabilities_backup_supported(&String::from_utf8_lossy(&out.stdout))
                .unwrap_or(false)
        }
        _ => return false,
    };
    if let Some(key) = out.lines().next().filter(|k| !k.trim().is_empty()) {
        let entry = format!("{}\t{}\n", key.trim(), if answer { "yes" } else { "no" });
        let stored = async {
            host.run(&coreutils::mkdir_p_mode(HOST_STATE_DIR, 0o700))
                .await?;
            host.upload(CAPS_CACHE, entry.as_bytes()).await
        };
        if let Err(e) = stored.await {
            tracing::warn!(host = %host.name, error = %e, "could not keep the capability probe's answer");
        }
    }
    answer
}

pub async fn checkpoints(host: &Host, uuid: &str) -> Result<Vec<String>> {
    let out = host.run_string(&host.virsh().checkpoint_list(uuid)).await?;
    Ok(virsh::parse_virsh_list_names(&out))
}

/// Why an incremental cannot build on `base`, or `None` when it can.
pub fn base_problem(
    base: &Base,
    uuid: &str,
    checkpoints: &[String],
    disks: &[(String, u64)],
) -> Option<String> {
    if base.record.vm_uuid != uuid {
        return Some(format!(
            "full: the VM's UUID changed since backup {} (redefined or replaced)",
            base.id
        ));
    }
    if !checkpoints.contains(&base.record.checkpoint) {
        return Some(format!(
            "full: checkpoint {} of backup {} no longer exists on the host (VM redefined, checkpoint deleted or host rebuilt)",
            base.record.checkpoint, base.id
        ));
    }
    if base.record.disks != disks {
        return Some(format!(
            "full: the VM's disks or their sizes changed since backup {}",
            base.id
        ));
    }
    None
}

pub fn backup_xml(
    socket: &str,
    job_dir: &str,
    incremental: Option<&str>,
    targets: &[String],
    excluded: &[String],
) -> String {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('\'', "&apos;")
            .replace('"', "&quot;")
    };
    let mut x = String::from("<domainbackup mode='pull'>\n");
    if let Some(cp) = incremental {
        x.push_str(&format!("  <incremental>{}</incremental>\n", esc(cp)));
    }
    x.push_str(&format!(
        "  <server transport='unix' socket='{}'/>\n  <disks>\n",
        esc(socket)
    ));
    for (i, t) in targets.iter().enumerate() {
        x.push_str(&format!(
            "    <disk name='{}' backup='yes' type='file'><scratch file='{}/scratch-{i}.qcow2'/></disk>\n",
            esc(t),
            esc(job_dir)
        ));
    }
    for t in excluded {
        x.push_str(&format!("    <disk name='{}' backup='no'/>\n", esc(t)));
    }
    x.push_str("  </disks>\n</domainbackup>\n");
    x
}

pub fn checkpoint_xml(name: &str, targets: &[String], excluded: &[String]) -> String {
    let mut x = format!("<domaincheckpoint>\n  <name>{name}</name>\n  <disks>\n");
    for t in targets {
        x.push_str(&format!("    <disk name='{t}' checkpoint='bitmap'/>\n"));
    }
    for t in excluded {
        x.push_str(&format!("    <disk name='{t}' checkpoint='no'/>\n"));
    }
    x.push_str("  </disks>\n</domaincheckpoint>\n");
    x
}

/// Ends a pull-mode backup job of ours left by a killed node (its NBD socket lives in
/// virtkeep's state dir); a job of another tool is left alone.
pub async fn abort_stale_job(host: &Host, uuid: &str) -> Result<bool> {
    let out = host.exec(&host.virsh().backup_dumpxml(uuid)).await?;
    if out.status != 0 {
        return Ok(false);
    }
    let xml = String::from_utf8_lossy(&out.stdout);
    if !xml.contains(&format!("{HOST_STATE_DIR}/jobs/")) {
        return Ok(false);
    }
    host.exec(&host.virsh().domjobabort(uuid)).await?;
    Ok(true)
}

/// The marker in a job dir of a VM a backup-API job started paused (healing stops it).
pub const PAUSED_MARKER: &str = "started-paused";

/// For `heal`: a VM virtkeep started paused for a job that did not finish goes down again.
pub async fn undo_paused_start(host: &Host, uuid: &str) -> Result<Option<String>> {
    let jobs = format!("{HOST_STATE_DIR}/jobs");
    let found = host.exec(&sh::has_started_paused_job(&jobs, uuid)).await?;
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

/// Deletes the virtkeep checkpoints of `listed` (the domain's, as listed under the job's
/// lock) other than `keep` (bitmaps merge into their successors).
pub async fn prune_checkpoints(
    host: &Host,
    uuid: &str,
    listed: &[String],
    keep: &str,
) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for cp in listed.iter().cloned() {
        if cp.starts_with(CHECKPOINT_PREFIX) && cp != keep {
            host.run(&host.virsh().checkpoint_delete(uuid, &cp, false))
                .await?;
            removed.push(cp);
        }
    }
    Ok(removed)
}

/// Ends the backup job on the VM, then [`prune_checkpoints`]. The usual case, one older
/// checkpoint with a plain name, takes one virsh process; the abort's failure (no job
/// left) is ignored either way.
pub async fn end_job_and_prune(
    host: &Host,
    uuid: &str,
    listed: &[String],
    keep: &str,
) -> Result<Vec<String>> {
    let older: Vec<&String> = listed
        .iter()
        .filter(|cp| cp.starts_with(CHECKPOINT_PREFIX) && cp.as_str() != keep)
        .collect();
    if let ([one], Some(u)) = (older.as_slice(), virsh::DomainUuid::parse(uuid))
        && let Some(cp) = virsh::CheckpointName::parse(one)
    {
        host.run(&host.virsh().abort_job_then_delete_checkpoint(&u, &cp))
            .await?;
        return Ok(vec![one.to_string()]);
    }
    let _ = host.exec(&host.virsh().domjobabort(uuid)).await;
    prune_checkpoints(host, uuid, listed, keep).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_capability_only_for_the_same_installation() {
        assert_eq!(cached_backup_api("123 45\n123 45\tyes\n"), Some(true));
        assert_eq!(cached_backup_api("123 45\n123 45\tno\n"), Some(false));
        // libvirt or QEMU changed since the answer was kept: ask again.
        assert_eq!(cached_backup_api("999 45\n123 45\tyes\n"), None);
        // Nothing kept yet, or a damaged file.
        assert_eq!(cached_backup_api("123 45\n"), None);
        assert_eq!(cached_backup_api("123 45\n123 45\tmaybe\n"), None);
        assert_eq!(cached_backup_api("\n\tyes\n"), None);
    }

    fn base() -> Base {
        Base {
            id: "b1".into(),
            record: CbtRecord {
                checkpoint: "virtkeep-1".into(),
                vm_uuid: "u".into(),
                disks: vec![("vda".into(), 10)],
            },
        }
    }

    #[test]
    fn chain_problems_are_named() {
        let disks = vec![("vda".to_string(), 10)];
        assert_eq!(
            base_problem(&base(), "u", &["virtkeep-1".into()], &disks),
            None
        );
        assert!(
            base_problem(&base(), "other", &["virtkeep-1".into()], &disks)
                .is_some_and(|r| r.contains("UUID"))
        );
        assert!(
            base_problem(&base(), "u", &["other-tool".into()], &disks)
                .is_some_and(|r| r.contains("no longer exists"))
        );
        assert!(
            base_problem(&base(), "u", &["virtkeep-1".into()], &[("vda".into(), 20)])
                .is_some_and(|r| r.contains("sizes"))
        );
    }

    #[test]
    fn job_xml_escapes_and_lists_disks() {
        let x = backup_xml(
            "/run/virtkeep/jobs/j/b.sock",
            "/run/virtkeep/jobs/j",
            Some("virtkeep-1"),
            &["vda".into()],
            &["vdb".into()],
        );
        assert!(x.contains("<incremental>virtkeep-1</incremental>"));
        assert!(x.contains("<disk name='vdb' backup='no'/>"));
        let c = checkpoint_xml("virtkeep-2", &["vda".into()], &["vdb".into()]);
        assert!(c.contains("<disk name='vda' checkpoint='bitmap'/>"));
    }
}
