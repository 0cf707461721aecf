//! The first step of a restore: which backup, which domain, which VM lock.

use virtkeep_libvirt::parse_domain;

use super::guard::safe_component;
use super::job::Job;
use super::options::RestoreOptions;
use crate::error::Result;
use crate::host::Host;

/// Loads the backup `opts.snapshot` names and looks up the domain it is restored to
/// (by name only: `virsh domuuid 14` would answer for the domain running with id 14).
pub async fn resolve(
    host: &Host,
    repo: &virtkeep_repo::Repository,
    opts: &RestoreOptions,
) -> Result<Job> {
    let id = crate::snapshot_ref::resolve(repo, &opts.snapshot).await?;
    let manifest = repo.manifest(&id).await?;
    let domain = parse_domain(&manifest.domain_xml)?;
    let name = opts.name.clone().unwrap_or_else(|| domain.name.clone());
    let existing_uuid = crate::vm::Vm::uuid_by_name(host, &name).await?;
    let lock_key = lock_key(&name, existing_uuid.as_deref());
    Ok(Job {
        manifest,
        domain,
        name,
        existing_uuid,
        lock_key,
    })
}

/// The lock a restore takes: the existing domain's UUID (the key its backups take), or
/// a key derived from the new name.
fn lock_key(name: &str, existing_uuid: Option<&str>) -> String {
    match existing_uuid {
        Some(u) => u.to_string(),
        None => {
            let mut s = format!("name-{}", safe_component(name));
            s.truncate(120);
            s
        }
    }
}
