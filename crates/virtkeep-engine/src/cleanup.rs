//! `virtkeep cleanup`: healing every VM of a host (or one) that a killed job left
//! changed, and finishing the restores killed there. It sits above both healing and
//! restore's staging, which import neither it nor each other.

use crate::error::{ErrorKind, Result};
use crate::heal::{HealReport, heal_vm};
use crate::host::{HOST_STATE_DIR, Host};
use crate::verify_boot::DOMAIN_PREFIX;
use crate::vm::Vm;
use std::collections::BTreeSet;
use virtkeep_libvirt::{coreutils, sh};

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
    reports.extend(cleanup_verifications(host, dry_run).await?);
    let live =
        crate::cleanup_live::cleanup_live_restores(host, dry_run, CLEANUP_LOCK_WAIT_SECS).await?;
    reports.extend(live.reports);
    let uuids = host.run_string(&host.virsh().list_all_uuids()).await?;
    for uuid in uuids.lines().map(str::trim).filter(|l| !l.is_empty()) {
        // A live restore's domain runs on overlays over the backup, not a backup's
        // overlays: healing would commit or abort what the live restore does.
        if live.domains.contains(uuid) {
            continue;
        }
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

/// Whether `name` is one virtkeep gives a boot verification: the prefix and 1 to 32
/// letters or digits (anything else on the host is not ours to remove).
fn is_verify_name(name: &str) -> bool {
    name.strip_prefix(DOMAIN_PREFIX).is_some_and(|rest| {
        (1..=32).contains(&rest.len()) && rest.chars().all(|c| c.is_ascii_alphanumeric())
    })
}

/// Removes what killed boot verifications left: the transient `virtkeep-verify-…`
/// domain, its job directory (overlays, serial log, the forwarded socket). A
/// verification whose lock is held still runs and is not touched.
async fn cleanup_verifications(host: &Host, dry_run: bool) -> Result<Vec<HealReport>> {
    let jobs = format!("{HOST_STATE_DIR}/jobs");
    let dirs = host
        .run_string(&sh::list_job_dirs(&jobs, DOMAIN_PREFIX))
        .await?;
    let domains = host.run_string(&host.virsh().list_all_names()).await?;
    let mut names = BTreeSet::new();
    for line in dirs.lines().chain(domains.lines()) {
        let name = line.trim().rsplit('/').next().unwrap_or_default();
        if is_verify_name(name) {
            names.insert(name.to_string());
        }
    }
    let domains: BTreeSet<&str> = domains.lines().map(str::trim).collect();
    let mut reports = Vec::new();
    for name in names {
        let vm = format!("verify job {name}");
        let lock = match host.lock_vm(&name, CLEANUP_LOCK_WAIT_SECS).await {
            Ok(lock) => lock,
            Err(e) if e.kind == ErrorKind::Conflict => {
                reports.push(HealReport {
                    vm,
                    actions: vec!["skipped: the verification is still running".into()],
                });
                continue;
            }
            Err(e) => return Err(e),
        };
        let res = remove_verification(host, &name, domains.contains(name.as_str()), dry_run).await;
        lock.release().await;
        reports.push(HealReport { vm, actions: res? });
    }
    Ok(reports)
}

/// Destroys a killed verification's domain (transient: that also undefines it) and
/// removes its job directory. The caller holds the job's lock.
async fn remove_verification(
    host: &Host,
    name: &str,
    has_domain: bool,
    dry_run: bool,
) -> Result<Vec<String>> {
    let mut actions = Vec::new();
    if has_domain {
        actions.push(format!("destroyed the verification domain {name}"));
        if !dry_run {
            // Transient: destroying undefines it. One made persistent (or already shut
            // off) is still defined afterwards: it is ours, undefine it too.
            let _ = host.exec(&host.virsh().destroy(name)).await;
            if host.exec(&host.virsh().domuuid(name)).await?.status == 0 {
                let opts = virtkeep_libvirt::virsh::UndefineOptions::default();
                host.run(&host.virsh().undefine(name, opts)).await?;
            }
        }
    }
    let dir = format!("{HOST_STATE_DIR}/jobs/{name}");
    if host.exec(&coreutils::exists(&dir)).await?.status == 0 {
        actions.push(format!(
            "removed the verification job directory {dir} (overlays, socket)"
        ));
        if !dry_run {
            host.run(&coreutils::rm_rf(&dir)).await?;
        }
    }
    Ok(actions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_verification_names_are_taken() {
        assert!(is_verify_name("virtkeep-verify-0123456789ab"));
        assert!(!is_verify_name("virtkeep-verify-"));
        assert!(!is_verify_name("virtkeep-verify-../etc"));
        assert!(!is_verify_name("virtkeep-verify-a b"));
        assert!(!is_verify_name("vm-virtkeep-verify-a"));
        assert!(!is_verify_name(&format!(
            "virtkeep-verify-{}",
            "a".repeat(33)
        )));
    }
}
