//! The UEFI variable store of a restored domain. A backup that holds the store (see
//! `backup/nvram.rs`) restores its bytes: in place over the domain's `<nvram>` file, for
//! a renamed copy into a store of its own, `NAME_VARS.fd` beside the original's (two
//! domains on one NVRAM file overwrite each other's boot entries). The bytes are written
//! into a temporary beside the store and renamed over it together with the disks (the
//! same record, so `cleanup` finishes or undoes it). A backup without a store (made
//! before virtkeep kept it) gives a renamed copy the original's current file.

use virtkeep_libvirt::coreutils;

use super::file;
use super::guard::{self, safe_component};
use super::job::{Job, NvramPlan};
use super::options::RestoreOptions;
use super::staged::temp_file;
use crate::error::{Error, Result};
use crate::host::Host;

/// What the restore does with the UEFI store; refuses an existing one without
/// `--force`. Reads the backup's bytes now, so a damaged backup refuses before
/// anything is written.
pub async fn plan(
    host: &Host,
    repo: &virtkeep_repo::Repository,
    opts: &RestoreOptions,
    job: &Job,
    tag: &str,
) -> Result<Option<NvramPlan>> {
    let Some(old) = &job.domain.nvram else {
        return Ok(None);
    };
    let renamed = job.renamed();
    if renamed && !opts.define {
        return Ok(None); // no domain would use the copy's store
    }
    if !renamed && !opts.disks.is_empty() {
        return Ok(None); // `--disk` puts back those disks only, not the firmware's state
    }
    let dest = if renamed {
        path_for(old, &job.name)
    } else {
        old.clone()
    };
    guard::check_path(&dest)?;
    let exists = file::check_on_host(host, &dest).await?;
    if exists && !opts.force {
        return Err(
            Error::conflict(format!("NVRAM file {dest} exists on host {}", host.name))
                .hint("restore under another name (--name), or overwrite with --force"),
        );
    }
    let bytes = repo.nvram(&job.manifest).await?;
    if bytes.is_none() && !renamed {
        return Ok(None); // in place without a backed-up store: the domain keeps its own
    }
    Ok(Some(NvramPlan {
        temp: temp_file(&dest, tag),
        copy_from: old.clone(),
        rewrite: renamed.then(|| dest.clone()),
        dest,
        bytes,
    }))
}

/// `NAME_VARS.fd` beside the original's store (libvirt's own naming).
fn path_for(old: &str, name: &str) -> String {
    let dir = match old.rsplit_once('/') {
        Some((d, _)) if !d.is_empty() => d,
        _ => "/var/lib/libvirt/qemu/nvram",
    };
    format!("{dir}/{}_VARS.fd", safe_component(name))
}

/// Writes the backup's bytes into the plan's temporary: owned and moded like the store
/// it replaces, else like libvirt makes one (the qemu user, 0600).
pub async fn write_temp(host: &Host, p: &NvramPlan, owner: &(String, String)) -> Result<()> {
    let Some(bytes) = &p.bytes else {
        return Ok(());
    };
    if let Some(i) = p.temp.rfind('/') {
        host.run(&coreutils::mkdir_p(&p.temp[..i.max(1)])).await?;
    }
    host.upload(&p.temp, bytes).await?;
    if host.exec(&coreutils::is_file(&p.dest)).await?.status == 0 {
        host.run(&coreutils::chown_like(&p.dest, &p.temp)).await?;
        host.run(&coreutils::chmod_like(&p.dest, &p.temp)).await?;
    } else {
        let (user, group) = owner;
        host.run(&coreutils::chown(&format!("{user}:{group}"), &p.temp))
            .await?;
        host.run(&coreutils::chmod(0o600, &p.temp)).await?;
    }
    Ok(())
}

/// For a backup without a store: gives a renamed copy the original domain's current
/// variables; without an original store, libvirt creates one from the firmware's
/// template at the first start. (A backup's own store is swapped in with the disks.)
pub async fn finish(host: &Host, p: &NvramPlan) -> Result<String> {
    let (old, new) = (&p.copy_from, &p.dest);
    let have_old = host.exec(&coreutils::is_file(old)).await?.status == 0;
    if have_old {
        host.run(&coreutils::cp(old, new)).await?;
        Ok(format!(
            "UEFI variables: {new}, copied from the original's current {old} (the backup holds none)"
        ))
    } else {
        host.run(&coreutils::rm_f(new)).await?;
        Ok(format!(
            "UEFI variables: {new}, created by libvirt from the firmware template at first start ({old} is gone)"
        ))
    }
}
