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

use serde::{Deserialize, Serialize};
use virtkeep_ssh::RemoteCommand;

use crate::error::Result;
use crate::host::{HOST_STATE_DIR, Host};

/// Prefix of the checkpoints virtkeep creates (others' checkpoints are left alone).
pub const CHECKPOINT_PREFIX: &str = "virtkeep-";

/// What a CBT backup records in its manifest (`extra.cbt`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CbtRecord {
    pub checkpoint: String,
    pub vm_uuid: String,
    /// (target, size) of every disk in the backup.
    pub disks: Vec<(String, u64)>,
}

/// The backup an incremental builds on.
pub struct Base {
    pub id: String,
    pub record: CbtRecord,
}

/// Whether the host's libvirt offers the backup API.
pub async fn backup_api_supported(host: &Host) -> bool {
    match host.exec(&host.virsh().domcapabilities(None)).await {
        Ok(out) if out.status == 0 => {
            virtkeep_libvirt::parse::parse_domcapabilities_backup_supported(
                &String::from_utf8_lossy(&out.stdout),
            )
            .unwrap_or(false)
        }
        _ => false,
    }
}

pub async fn checkpoints(host: &Host, uuid: &str) -> Result<Vec<String>> {
    let out = host.run_string(&host.virsh().checkpoint_list(uuid)).await?;
    Ok(virtkeep_libvirt::parse::parse_virsh_list_names(&out))
}

/// The newest CBT backup of this VM in the repository, if any.
pub async fn latest_record(
    repo: &virtkeep_repo::Repository,
    host: &str,
    vm: &str,
) -> Result<Option<Base>> {
    let mut snaps = repo.snapshots().await?;
    snaps.retain(|s| s.host == host && s.vm == vm);
    snaps.sort_by_key(|s| s.time);
    if let Some(last) = snaps.last() {
        let manifest = repo.manifest(&last.id).await?;
        if let Some(rec) = manifest.extra.get("cbt").cloned()
            && let Ok(record) = serde_json::from_value::<CbtRecord>(rec)
        {
            {
                return Ok(Some(Base {
                    id: manifest.id,
                    record,
                }));
            }
        }
    }
    Ok(None)
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
    let out = host
        .exec(
            &host
                .virsh()
                .command("backup-dumpxml")
                .arg("--domain")
                .arg(uuid),
        )
        .await?;
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

/// Deletes virtkeep checkpoints other than `keep` (bitmaps merge into their successors).
pub async fn prune_checkpoints(host: &Host, uuid: &str, keep: &str) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for cp in checkpoints(host, uuid).await? {
        if cp.starts_with(CHECKPOINT_PREFIX) && cp != keep {
            host.run(&host.virsh().checkpoint_delete(uuid, &cp, false))
                .await?;
            removed.push(cp);
        }
    }
    Ok(removed)
}

/// Makes the job dir usable by QEMU (the NBD socket and scratch files are QEMU's).
pub async fn hand_job_dir_to_qemu(host: &Host, job_dir: &str) -> Result<()> {
    let (user, group) = host.qemu_owner().await?;
    host.run(
        &RemoteCommand::new("chown")
            .arg(format!("{user}:{group}"))
            .arg("--")
            .arg(job_dir),
    )
    .await?;
    host.run(
        &RemoteCommand::new("chmod")
            .arg("0750")
            .arg("--")
            .arg(job_dir),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
