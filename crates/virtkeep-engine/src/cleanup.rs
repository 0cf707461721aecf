//! `virtkeep cleanup`: healing every VM of a host (or one) that a killed job left
//! changed, and finishing the restores killed there. It sits above both healing and
//! restore's staging, which import neither it nor each other.

use crate::error::{ErrorKind, Result};
use crate::heal::{HealReport, heal_vm};
use crate::host::Host;
use crate::vm::Vm;

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
    let uuids = host.run_string(&host.virsh().list_all_uuids()).await?;
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
